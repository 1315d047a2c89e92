package h3x

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/h3x-io/h3x/proto/h3xpb"

	"github.com/quic-go/quic-go"
)

func TestAuthGuardDelays(t *testing.T) {
	var g authGuard
	addr := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1}
	other := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 2), Port: 1}
	now := time.Unix(1700000000, 0)
	// One attempt after another, each made as soon as the previous failed.
	want := []time.Duration{0, 0, 0, 100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, 1600 * time.Millisecond, 3200 * time.Millisecond, 5 * time.Second, 5 * time.Second}
	for i, w := range want {
		got, refused := g.admit(addr, now)
		if got != w || refused {
			t.Fatalf("attempt %d: wait %v (refused %t), want %v", i+1, got, refused, w)
		}
		now = now.Add(got)
		g.failed(addr, now)
	}
	if got, refused := g.admit(other, now); got != 0 || refused {
		t.Fatalf("another address is slowed: %v, %t", got, refused)
	}
	g.abandoned(other)
	// A quiet minute resets.
	now = now.Add(2 * authFailWindow)
	if got, _ := g.admit(addr, now); got != 0 {
		t.Fatalf("after the window: %v", got)
	}
	g.failed(addr, now)
	if got, _ := g.admit(addr, now); got != 0 {
		t.Fatalf("second failure in a new window: %v", got)
	}
	g.succeeded(addr)
	if got, _ := g.admit(addr, now); got != 0 {
		t.Fatalf("after a success: %v", got)
	}
}

// Attempts made in parallel wait their turns one after another, each
// counting as a failure for the delays of those behind it, and the ones
// whose turn would be more than authMaxDelay away are refused unchecked.
// An attempt that goes away before its turn gives up its place in the count
// (not its turn: the next one still waits behind it).
func TestAuthGuardParallelAttemptsWaitTheirTurn(t *testing.T) {
	var g authGuard
	addr := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1}
	now := time.Unix(1700000000, 0)
	for range authFreeFailures {
		g.admit(addr, now)
		g.failed(addr, now)
	}
	ms := time.Millisecond
	want := []time.Duration{100 * ms, 300 * ms, 700 * ms, 1500 * ms, 3100 * ms}
	for i, w := range want {
		if got, refused := g.admit(addr, now); got != w || refused {
			t.Fatalf("parallel attempt %d: wait %v (refused %t), want %v", i+1, got, refused, w)
		}
	}
	if _, refused := g.admit(addr, now); !refused {
		t.Fatal("an attempt whose turn is 6.3 s away was admitted")
	}
	// Four of them fail at their turns; one goes away before its own.
	g.failed(addr, now.Add(100*ms))
	g.failed(addr, now.Add(300*ms))
	g.failed(addr, now.Add(700*ms))
	g.failed(addr, now.Add(1500*ms))
	g.abandoned(addr)
	// 7 failures: the next waits 1.6 s after the last turn given (3.1 s).
	if got, refused := g.admit(addr, now.Add(1500*ms)); got != 3200*ms || refused {
		t.Fatalf("after the parallel ones: wait %v (refused %t), want 3.2s", got, refused)
	}
}

// The helper's review (RELIABILITY.md finding 77): once an address has used
// its free failures, a burst of parallel attempts from it must not all reach
// the registry. Before, every attempt was checked at once and only the
// answers to failures were delayed, which a guesser does not wait for.
func TestAuthSlowdownThrottlesParallelGuesses(t *testing.T) {
	inner, err := ParseRegistry("alice:orders=alice-token")
	if err != nil {
		t.Fatal(err)
	}
	reg := &countingRegistry{inner: inner}
	s := testServerWith(t, "unused:orders=unused", WithRegistry(reg))
	for range authFreeFailures {
		if _, err := testDial(t, s, "alice", "wrong"); err == nil {
			t.Fatal("wrong token accepted")
		}
	}
	const burst = 8
	var rcs []*rawConn
	var frames [][]byte
	for i := range burst {
		rc := rawDial(t, s)
		st, err := rc.qc.OpenStreamSync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		rc.ctrl = st
		rcs = append(rcs, rc)
		frames = append(frames, frameBytes(t, FrameAuth, &h3xpb.Auth{ClientId: "alice", Token: "guess-" + string(rune('a'+i))}))
	}
	base := reg.checks.Load()
	for i, rc := range rcs {
		rc.ctrl.Write(frames[i])
	}
	// Turns at 100, 300, 700 ms...: at most two checks within 300 ms.
	time.Sleep(300 * time.Millisecond)
	if got := reg.checks.Load() - base; got > 3 {
		t.Fatalf("after %d failures from one address, %d of %d parallel guesses were checked within 300 ms", authFreeFailures, got, burst)
	}
	// The attempts past 5 s are refused without a check, with a clear
	// reason (the close's: it may overtake the Error frame).
	var refused int
	for _, rc := range rcs {
		select {
		case <-rc.qc.Context().Done():
		case <-time.After(10 * time.Second):
			t.Fatal("an attempt of the burst was neither answered nor refused in 10 s")
		}
		var ae *quic.ApplicationError
		if errors.As(context.Cause(rc.qc.Context()), &ae) && strings.Contains(ae.ErrorMessage, "too many failed authentications") {
			refused++
		}
	}
	if refused != burst-5 {
		t.Fatalf("%d attempts of the burst of %d were refused unchecked; want %d", refused, burst, burst-5)
	}
}

// countingRegistry counts credential checks.
type countingRegistry struct {
	inner  Registry
	checks atomic.Int64
}

func (r *countingRegistry) Authenticate(ctx context.Context, id, token string) (Grants, error) {
	r.checks.Add(1)
	return r.inner.Authenticate(ctx, id, token)
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
		if d, refused := srv.authGuard.admit(addr, time.Now()); d != 0 || refused {
			t.Fatalf("attempt %d delayed by %v (refused %t) with the slow-down off", i+1, d, refused)
		}
		srv.authGuard.failed(addr, time.Now())
	}
}
