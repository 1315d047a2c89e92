package h3x

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

func isConnectionRefused(err error) bool {
	var te *quic.TransportError
	return errors.As(err, &te) && te.Remote && te.ErrorCode == quic.ConnectionRefused
}

// waitPending waits (at most 5 s) until the server has n pending
// connections; slots are given back asynchronously.
func waitPending(t *testing.T, s *Server, n int64) {
	t.Helper()
	for range 500 {
		if s.AdmissionStats().PendingNow == n {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("pending connections %+v, want %d", s.AdmissionStats(), n)
}

func TestConnectionRateRefusesBeforeTheHandshake(t *testing.T) {
	// A bucket of 4 that does not refill within the test.
	srv := testServer(t, WithConnectionRate(RateLimit{Rate: 0.001, Burst: 4}))
	c := mustDial(t, srv, "alice", "alice-token") // token 1
	waitPending(t, srv, 0)
	for i := range 3 { // tokens 2-4; the 4th attempt must pass a Retry (bucket below half)
		if _, err := rawTryDial(t, srv); err != nil {
			t.Fatalf("attempt %d: %v", i+2, err)
		}
	}
	if _, err := rawTryDial(t, srv); !isConnectionRefused(err) {
		t.Fatalf("attempt 5: %v, want CONNECTION_REFUSED", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := Dial(ctx, srv.Addr().String(), WithCredentials("alice", "alice-token"), WithTrustedFingerprint(srv.Fingerprint()))
	var e *Error
	if !errors.Is(err, ErrTooManyConnections) || !errors.As(err, &e) || !e.Temporary() || !e.Remote {
		t.Fatalf("Dial beyond the rate: %v, want a retryable remote ErrTooManyConnections", err)
	}
	st := srv.AdmissionStats()
	if st.Admitted != 4 || st.Retried < 1 || st.RefusedRate < 2 || st.Unvalidated != 3 {
		t.Fatalf("stats %+v: want 4 admitted (3 unvalidated), at least 1 Retry and 2 refusals", st)
	}
	// The existing connection is unaffected.
	if _, err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestConnectionRatePerIP(t *testing.T) {
	srv := testServer(t, WithConnectionRate(RateLimit{}), WithConnectionRatePerIP(RateLimit{Rate: 0.001, Burst: 2}))
	for i := range 2 {
		if _, err := rawTryDial(t, srv); err != nil {
			t.Fatalf("attempt %d: %v", i+1, err)
		}
	}
	if _, err := rawTryDial(t, srv); !isConnectionRefused(err) {
		t.Fatalf("attempt 3 from the same address: %v, want CONNECTION_REFUSED", err)
	}
	if st := srv.AdmissionStats(); st.Admitted != 2 || st.RefusedRate < 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestConnectionRateValidation(t *testing.T) {
	_, err := NewServer(WithQueue(NewMemoryQueue(QueueOptions{})), WithRegistry(&StaticRegistry{}),
		WithConnectionRate(RateLimit{Rate: -1}), WithConnectionRatePerIP(RateLimit{Rate: 1, Burst: -1}))
	if err == nil {
		t.Fatal("negative connection rates accepted")
	}
}

// TestAdmissionUnderSpoofedLoad drives the admission hooks directly: under
// load, an attempt from an unvalidated address gets a Retry (no token
// taken) and is admitted only with a validated address; when a bucket is
// empty, attempts are refused without a Retry.
func TestAdmissionUnderSpoofedLoad(t *testing.T) {
	now := time.Now()
	a := newAdmission(RateLimit{Rate: 0.001, Burst: 4}, RateLimit{}, 100, 1000, now)
	spoofed := func(i int) *quic.ClientInfo {
		return &quic.ClientInfo{RemoteAddr: &net.UDPAddr{IP: net.IPv4(10, 0, byte(i>>8), byte(i)), Port: 1000 + i}}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	admit := func(ci *quic.ClientInfo) error {
		_, err := a.connContext(ctx, ci)
		return err
	}
	// Not busy: admitted without a Retry.
	for i := range 3 {
		ci := spoofed(i)
		if a.verifySourceAddress(ci.RemoteAddr) {
			t.Fatalf("attempt %d: Retry demanded with a full bucket", i)
		}
		if err := admit(ci); err != nil {
			t.Fatalf("attempt %d: %v", i, err)
		}
	}
	// Busy (1 token of 4): a Retry first; a flood of spoofed attempts that
	// never answer it takes no token.
	for i := range 1000 {
		if !a.verifySourceAddress(spoofed(100 + i).RemoteAddr) {
			t.Fatalf("spoofed attempt %d: no Retry under load", i)
		}
	}
	if err := admit(spoofed(5)); !errors.Is(err, ErrTooManyConnections) {
		t.Fatalf("unvalidated attempt under load: %v, want refused", err)
	}
	validated := spoofed(6)
	validated.AddrVerified = true
	if err := admit(validated); err != nil {
		t.Fatalf("validated attempt under load: %v", err)
	}
	// Empty: refused at once, no Retry (it would only cost a round trip).
	if a.verifySourceAddress(spoofed(7).RemoteAddr) {
		t.Fatal("Retry demanded with an empty bucket")
	}
	validated = spoofed(8)
	validated.AddrVerified = true
	if err := admit(validated); !errors.Is(err, ErrTooManyConnections) {
		t.Fatalf("attempt with an empty bucket: %v, want refused", err)
	}
	st := a.stats()
	if st.Admitted != 4 || st.Retried != 1000 || st.RefusedRate != 2 || st.PendingNow != 4 {
		t.Fatalf("stats %+v", st)
	}
	// The connections end: their slots come back.
	cancel()
	for range 500 {
		if a.stats().PendingNow == 0 && a.stats().ConnectionsNow == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("slots not given back: %+v", a.stats())
}

func TestAdmissionPendingSlotFreedByAuth(t *testing.T) {
	srv := testServer(t, WithMaxConnections(160)) // 16 pending at most
	for range 20 {
		c := mustDial(t, srv, "alice", "alice-token")
		defer c.Close()
	}
	waitPending(t, srv, 0)
	if st := srv.AdmissionStats(); st.Admitted != 20 || st.ConnectionsNow != 20 || st.PendingMax != 16 {
		t.Fatalf("stats %+v", st)
	}
}
