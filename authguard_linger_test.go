package h3x

// A regression test from the fourth look at the eleventh session's auth
// guard (RELIABILITY.md finding 89), written by the reviewing helper.

import (
	"context"
	"net"
	"testing"
	"time"
)

// dialFrom opens a raw connection to s from the loopback address ip (a
// second "host": the auth guard and admission control key on the IP), opens
// the control stream and sends Auth, without waiting for the answer. It
// returns nil if the attempt was refused before the handshake.
func dialFrom(t *testing.T, s *Server, ip net.IP, id, token string) *authAttempt {
	t.Helper()
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: ip})
	if err != nil {
		t.Skipf("cannot bind %v: %v", ip, err)
	}
	rc, err := rawDialOn(t, s, udp)
	if err != nil {
		return nil
	}
	a := attemptOn(t, rc)
	a.send(t, id, token)
	return a
}

// PROTOCOL.md §9 bounds the connections waiting to authenticate at a tenth
// of the connection limit (at least 16), so that peers without credentials
// cannot take the connection slots of clients that have them. A connection
// refused unchecked by the auth guard lingers a moment for its Error frame
// to arrive; it must stay counted among those waiting meanwhile (finding
// 89: it gave its slot back first, so a guesser that did not close its
// refused connections took all of WithMaxConnections(24), and a client with
// valid credentials from another address was refused).
func TestAuthRefusalLingerStaysWithinTheUnauthenticatedCap(t *testing.T) {
	s := testServer(t, WithMaxConnections(24), WithAuthTimeout(10*time.Second))
	defer s.Close()
	good := mustDial(t, s, "alice", "alice-token") // authenticated before the attack
	attacker := net.IPv4(127, 0, 0, 2)
	// 3 checked failures from the attacker's address.
	for range authFreeFailures {
		a := dialFrom(t, s, attacker, "alice", "wrong")
		if a == nil {
			t.Fatal("setup: attacker dial refused")
		}
		if r := a.result(t, 5*time.Second); r == "ok" {
			t.Fatal("wrong token accepted")
		}
		a.rc.close()
	}
	// Then as many wrong attempts as the server takes, none ever closed by
	// the attacker: some wait their turns, the rest are refused unchecked
	// and linger. All of them must stay within the cap on connections
	// waiting to authenticate.
	start := time.Now()
	held, most := 0, int64(0)
	var st AdmissionStats
	for held < 40 && time.Since(start) < 900*time.Millisecond {
		if dialFrom(t, s, attacker, "alice", "wrong") != nil {
			held++
		}
		st = s.AdmissionStats()
		most = max(most, st.ConnectionsNow-1) // less the good client's
	}
	if most > st.PendingMax {
		t.Fatalf("a peer without credentials held %d connections at once (%d opened in %v), above the cap of %d waiting to authenticate",
			most, held, time.Since(start).Round(time.Millisecond), st.PendingMax)
	}
	// The authenticated client was not disturbed.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := good.Publish(ctx, Event{Namespace: "orders"}); err != nil {
		t.Fatalf("the authenticated client, during the attack: %v", err)
	}
}
