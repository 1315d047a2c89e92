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

// far is an auth deadline that never limits a turn.
var far = time.Unix(1<<40, 0)

func TestAuthGuardDelays(t *testing.T) {
	var g authGuard
	addr := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1}
	other := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 2), Port: 1}
	now := time.Unix(1700000000, 0)
	// One attempt after another, each made as soon as the previous failed.
	want := []time.Duration{0, 0, 0, 100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, 1600 * time.Millisecond, 3200 * time.Millisecond, 5 * time.Second, 5 * time.Second}
	for i, w := range want {
		got, ticket, _ := g.admit(addr, now, far)
		if got != w || ticket == nil {
			t.Fatalf("attempt %d: wait %v (refused %t), want %v", i+1, got, ticket == nil, w)
		}
		now = now.Add(got)
		ticket.failed(now)
	}
	if got, ticket, _ := g.admit(other, now, far); got != 0 || ticket == nil {
		t.Fatalf("another address is slowed: %v", got)
	} else {
		ticket.abandoned()
	}
	// A quiet minute resets.
	now = now.Add(2 * authFailWindow)
	got, ticket, _ := g.admit(addr, now, far)
	if got != 0 {
		t.Fatalf("after the window: %v", got)
	}
	ticket.failed(now)
	got, ticket, _ = g.admit(addr, now, far)
	if got != 0 {
		t.Fatalf("second failure in a new window: %v", got)
	}
	ticket.succeeded()
	if got, _, _ := g.admit(addr, now, far); got != 0 {
		t.Fatalf("after a success: %v", got)
	}
}

// admitted admits an attempt that must be admitted.
func admitted(t *testing.T, g *authGuard, addr net.Addr, now, deadline time.Time, want time.Duration) *authTicket {
	t.Helper()
	got, ticket, retry := g.admit(addr, now, deadline)
	if ticket == nil || got != want {
		t.Fatalf("admit: wait %v, refused %t (retry after %v); want a wait of %v", got, ticket == nil, retry, want)
	}
	return ticket
}

// failures makes n failed checks from addr, one after another from now, and
// returns the time of the last.
func failures(t *testing.T, g *authGuard, addr net.Addr, now time.Time, n int) time.Time {
	t.Helper()
	for range n {
		wait, ticket, _ := g.admit(addr, now, far)
		if ticket == nil {
			t.Fatal("refused")
		}
		now = now.Add(wait)
		ticket.failed(now)
	}
	return now
}

// Attempts made in parallel wait their turns one after another, each
// counting as a failure for the delays of those behind it, and the ones
// whose turn would be more than the longest delay away are refused
// unchecked, with when to try again. An attempt that goes away before its
// turn gives up its place in the count (not its turn: the next one still
// waits behind it).
func TestAuthGuardParallelAttemptsWaitTheirTurn(t *testing.T) {
	var g authGuard
	addr := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1}
	now := time.Unix(1700000000, 0)
	failures(t, &g, addr, now, authFreeFailures)
	ms := time.Millisecond
	var tickets []*authTicket
	for _, w := range []time.Duration{100 * ms, 300 * ms, 700 * ms, 1500 * ms, 3100 * ms} {
		tickets = append(tickets, admitted(t, &g, addr, now, far, w))
	}
	if _, ticket, retry := g.admit(addr, now, far); ticket != nil || retry != 3100*ms {
		t.Fatalf("an attempt whose turn is 6.3 s away: refused %t, retry after %v; want refused, retry after 3.1s", ticket == nil, retry)
	}
	// Four of them fail at their turns; one goes away before its own.
	for i, at := range []time.Duration{100 * ms, 300 * ms, 700 * ms, 1500 * ms} {
		tickets[i].failed(now.Add(at))
	}
	tickets[4].abandoned()
	tickets[4].abandoned() // once only
	// 7 failures: the next waits 1.6 s after the last turn given (3.1 s).
	admitted(t, &g, addr, now.Add(1500*ms), far, 3200*ms)
}

// The turns fit the auth deadline and the guard's longest delay (half the
// auth timeout): an attempt is never made to wait past its deadline, which
// it would reach with no time left for the check (finding 82).
func TestAuthGuardTurnsFitTheAuthDeadline(t *testing.T) {
	g := authGuard{maxDelay: 2500 * time.Millisecond}
	addr := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1}
	now := failures(t, &g, addr, time.Unix(1700000000, 0), 12)
	// Delays are capped at 2.5 s.
	ticket := admitted(t, &g, addr, now, now.Add(5*time.Second), 2500*time.Millisecond)
	ticket.failed(now.Add(2500 * time.Millisecond))
	// A turn after the deadline (less the check's margin): refused, and
	// nothing is charged for it.
	later := now.Add(2500 * time.Millisecond)
	if _, ticket, _ := g.admit(addr, later, later.Add(2*time.Second)); ticket != nil {
		t.Fatal("an attempt whose turn comes after its deadline was admitted")
	}
	admitted(t, &g, addr, later, later.Add(5*time.Second), 2500*time.Millisecond)
}

// An unchecked refusal is not a failure: a client retrying through a quiet
// minute after the guesser stopped is checked again (finding 82: admissions
// used to push the window's end forward).
func TestAuthGuardRefusalsDoNotExtendTheWindow(t *testing.T) {
	g := authGuard{maxDelay: 2500 * time.Millisecond}
	addr := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1}
	now := failures(t, &g, addr, time.Unix(1700000000, 0), 12)
	for i := range 10 { // a client retrying every 10 s, refused for its deadline
		at := now.Add(time.Duration(i) * 10 * time.Second)
		if _, ticket, _ := g.admit(addr, at, at.Add(time.Second)); ticket != nil {
			ticket.abandoned()
		}
	}
	at := now.Add(authFailWindow + time.Second)
	admitted(t, &g, addr, at, at.Add(time.Second), 0)
}

// A success while other attempts wait keeps their turns and counts, and
// their later failures count again (finding 84: the pending count went
// negative, and the record was never reset).
func TestAuthGuardSuccessWithAttemptsWaiting(t *testing.T) {
	var g authGuard
	addr := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1}
	now := time.Unix(1700000000, 0)
	failures(t, &g, addr, now, authFreeFailures)
	bad := admitted(t, &g, addr, now, far, 100*time.Millisecond)
	good := admitted(t, &g, addr, now, far, 300*time.Millisecond)
	var later []*authTicket
	for _, w := range []time.Duration{700, 1500, 3100} {
		later = append(later, admitted(t, &g, addr, now, far, w*time.Millisecond))
	}
	bad.failed(now.Add(100 * time.Millisecond))
	good.succeeded()
	for _, tk := range later {
		tk.failed(now.Add(time.Second))
	}
	g.mu.Lock()
	for key, f := range g.fails {
		if f.pending != 0 {
			t.Errorf("record %q: %d attempts pending, none in flight", key, f.pending)
		}
	}
	g.mu.Unlock()
	// The three failures after the success count; a quiet window resets.
	at := now.Add(3100 * time.Millisecond)
	admitted(t, &g, addr, at, far, 100*time.Millisecond).failed(at.Add(100 * time.Millisecond))
	at = at.Add(2 * authFailWindow)
	admitted(t, &g, addr, at, far, 0)
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
	// The attempts whose turns are past the longest delay (half the
	// 5 s auth timeout: turns at 100, 300, 700 and 1,500 ms fit, 3,100 ms
	// does not) are refused without a check, retryable.
	var refused int
	for _, rc := range rcs {
		select {
		case <-rc.qc.Context().Done():
		case <-time.After(10 * time.Second):
			t.Fatal("an attempt of the burst was neither answered nor refused in 10 s")
		}
		var ae *quic.ApplicationError
		if errors.As(context.Cause(rc.qc.Context()), &ae) && strings.Contains(ae.ErrorMessage, "too many failed authentications") {
			if ErrorCode(ae.ErrorCode) != CodeRateLimited {
				t.Fatalf("refused with %v; want RATE_LIMITED (retryable)", ErrorCode(ae.ErrorCode))
			}
			refused++
		}
	}
	if refused != burst-4 {
		t.Fatalf("%d attempts of the burst of %d were refused unchecked; want %d", refused, burst, burst-4)
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
		d, ticket, _ := srv.authGuard.admit(addr, time.Now(), time.Now())
		if d != 0 || ticket == nil {
			t.Fatalf("attempt %d delayed by %v (refused %t) with the slow-down off", i+1, d, ticket == nil)
		}
		ticket.failed(time.Now())
	}
}

// However short the auth timeout, a prompt attempt's longest turn leaves
// the check's margin before its deadline (finding 86).
func TestAuthGuardLimitsFitEveryTimeout(t *testing.T) {
	for _, timeout := range []time.Duration{4 * time.Millisecond, 100 * time.Millisecond, 200 * time.Millisecond, time.Second, 5 * time.Second, time.Minute} {
		maxDelay, margin := authGuardLimits(timeout)
		g := authGuard{maxDelay: maxDelay, margin: margin}
		addr := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1}
		now := failures(t, &g, addr, time.Unix(1700000000, 0), 20)
		wait, ticket, _ := g.admit(addr, now, now.Add(timeout))
		if ticket == nil || wait != maxDelay || maxDelay <= 0 || maxDelay > authMaxDelay {
			t.Errorf("auth timeout %v: wait %v (refused %t), longest turn %v, margin %v", timeout, wait, ticket == nil, maxDelay, margin)
		}
	}
}
