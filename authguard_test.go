package h3x

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

func TestAuthGuardDelays(t *testing.T) {
	var g authGuard
	addr := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1}
	other := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 2), Port: 1}
	now := time.Unix(1700000000, 0)
	want := []time.Duration{0, 0, 0, 100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, 1600 * time.Millisecond, 3200 * time.Millisecond, 5 * time.Second, 5 * time.Second}
	for i, w := range want {
		if got := g.failed(addr, now); got != w {
			t.Fatalf("failure %d: delay %v, want %v", i+1, got, w)
		}
	}
	if got := g.failed(other, now); got != 0 {
		t.Fatalf("another address is slowed: %v", got)
	}
	// A quiet minute resets.
	if got := g.failed(addr, now.Add(2*authFailWindow)); got != 0 {
		t.Fatalf("after the window: %v", got)
	}
	g.failed(addr, now)
	g.succeeded(addr)
	if got := g.failed(addr, now); got != 0 {
		t.Fatalf("after a success: %v", got)
	}
}

func TestRepeatedAuthFailuresAreSlowed(t *testing.T) {
	srv := testServer(t)
	var took []time.Duration
	for range 5 {
		start := time.Now()
		_, err := testDial(t, srv, "alice", "wrong")
		if !errors.Is(err, ErrUnauthenticated) {
			t.Fatalf("wrong token: %v", err)
		}
		took = append(took, time.Since(start))
	}
	if took[4] < 200*time.Millisecond || took[3] < 100*time.Millisecond {
		t.Fatalf("failures 4 and 5 answered in %v and %v; want slowed down", took[3], took[4])
	}
	// The right credentials from the same address still work at once.
	start := time.Now()
	mustDial(t, srv, "alice", "alice-token")
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("good client slowed to %v", d)
	}
}

func TestUnauthenticatedConnectionsCapped(t *testing.T) {
	srv := testServer(t, WithMaxConnections(160), WithAuthTimeout(5*time.Second)) // 16 may wait to authenticate
	existing := mustDial(t, srv, "alice", "alice-token")
	var refused int
	for range 24 {
		rc, err := rawTryDial(t, srv)
		if err != nil {
			var te *quic.TransportError
			if !errors.As(err, &te) || te.ErrorCode != quic.ConnectionRefused {
				t.Fatalf("dial: %v, want CONNECTION_REFUSED or success", err)
			}
			refused++ // before the handshake (admission.go)
			continue
		}
		select {
		case <-rc.qc.Context().Done():
			refused++
		case <-time.After(100 * time.Millisecond):
		}
	}
	if refused < 8 {
		t.Fatalf("%d of 24 unauthenticated connections refused, want at least 8", refused)
	}
	// Existing clients keep being served.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if res, err := existing.Publish(ctx, Event{Namespace: "orders"}); err != nil || res[0].Status != PublishStored {
		t.Fatalf("existing client during the flood: %v %+v", err, res)
	}
}

// WithAuthFailureSlowdown(false) answers every failure at once.
func TestAuthFailureSlowdownOff(t *testing.T) {
	srv := testServer(t, WithAuthFailureSlowdown(false))
	if !srv.authGuard.off {
		t.Fatal("WithAuthFailureSlowdown(false) left the slow-down on")
	}
	addr := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}
	for i := range 10 {
		if d := srv.authGuard.failed(addr, time.Now()); d != 0 {
			t.Fatalf("failure %d delayed by %v with the slow-down off", i+1, d)
		}
	}
}
