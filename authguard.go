package h3x

import (
	"net"
	"sync"
	"time"
)

// Auth failure slow-down: after authFreeFailures failed authentications
// from one IP address within authFailWindow, the credentials of each further
// attempt from it are checked only after a delay, one attempt at a time:
// the n-th attempt past the free ones waits authBaseDelay << (n-1) (up to
// the guard's maxDelay: authMaxDelay, or about half the auth timeout if less) after
// the previous one's turn. Attempts still waiting count as failures for the
// delays of the ones behind them, so that opening many connections at once
// buys a guesser nothing. An attempt whose turn would come more than
// maxDelay from now, or too late for its auth deadline, is refused
// unchecked, with RATE_LIMITED (retryable: a client sharing the address
// with a guesser tries again later). A success, or authFailWindow without
// a failed check, resets it.
const (
	authFreeFailures = 3
	authBaseDelay    = 100 * time.Millisecond
	authMaxDelay     = 5 * time.Second
	authFailWindow   = time.Minute
	authGuardMax     = 100000 // addresses tracked at most
	// authCheckMargin is the time left for the credential check itself
	// after an attempt's turn, before its auth deadline (at most a quarter
	// of the auth timeout: see authGuardLimits).
	authCheckMargin = 100 * time.Millisecond
)

type authGuard struct {
	off      bool          // WithAuthFailureSlowdown(false)
	maxDelay time.Duration // the longest turn; 0: authMaxDelay
	margin   time.Duration // left for the check before the deadline; 0: authCheckMargin
	mu       sync.Mutex
	fails    map[string]*authFailures
}

// authGuardLimits returns the longest turn and the check's margin for an
// auth timeout: a prompt attempt (its Auth read at once) whose turn is the
// longest still leaves the margin before its deadline, however short the
// timeout.
func authGuardLimits(authTimeout time.Duration) (maxDelay, margin time.Duration) {
	margin = min(authCheckMargin, authTimeout/4)
	return min(authMaxDelay, (authTimeout-margin)/2), margin
}

type authFailures struct {
	n       int       // failed checks within the window
	pending int       // attempts admitted by this record and not yet decided
	last    time.Time // the last failed check
	next    time.Time // when the last admitted attempt's turn comes
}

// authTicket is an admitted attempt: it ends with exactly one of failed,
// succeeded or abandoned.
type authTicket struct {
	g   *authGuard
	key string
	rec *authFailures // the record that counts the attempt as pending
}

// addrKey is the map key of a's IP address (the raw bytes for UDP, with an
// IPv4 address in its 4-byte form, so that it costs no formatting).
func addrKey(a net.Addr) string {
	if u, ok := a.(*net.UDPAddr); ok {
		if ip4 := u.IP.To4(); ip4 != nil {
			return string(ip4)
		}
		return string(u.IP)
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return host
}

// record returns key's record, a fresh one if it has none or if nothing is
// pending on it and its last failure is older than the window. g.mu is held.
func (g *authGuard) record(key string, now time.Time) *authFailures {
	if g.fails == nil {
		g.fails = make(map[string]*authFailures)
	}
	f := g.fails[key]
	if f == nil || (f.pending == 0 && now.Sub(f.last) > authFailWindow) {
		if len(g.fails) >= authGuardMax {
			g.prune(now)
		}
		f = &authFailures{}
		g.fails[key] = f
	}
	return f
}

// admit takes the turn of an authentication attempt from addr whose
// credentials must be checked before deadline: it returns how long the
// attempt must wait before they are checked, and its ticket; or, if the
// attempt is refused unchecked, a nil ticket and when to try again.
func (g *authGuard) admit(addr net.Addr, now, deadline time.Time) (wait time.Duration, t *authTicket, retryAfter time.Duration) {
	key := addrKey(addr)
	if g.off {
		return 0, &authTicket{g: g, key: key}, 0
	}
	maxDelay, margin := g.maxDelay, g.margin
	if maxDelay <= 0 {
		maxDelay = authMaxDelay
	}
	if margin <= 0 {
		margin = authCheckMargin
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	f := g.record(key, now)
	k := f.n + f.pending - authFreeFailures // attempts past the free ones, this one excluded
	turn := now
	if k >= 0 {
		if f.next.After(turn) {
			turn = f.next
		}
		turn = turn.Add(min(authBaseDelay<<min(k, 16), maxDelay))
		if turn.Sub(now) > maxDelay || turn.After(deadline.Add(-margin)) {
			return 0, nil, max(f.next.Sub(now), authBaseDelay)
		}
		f.next = turn
	}
	f.pending++
	return turn.Sub(now), &authTicket{g: g, key: key, rec: f}, 0
}

// end ends the ticket's pending count, once, under the guard's lock, and
// then runs then (if not nil) under it too. Nothing is recorded while the
// slow-down is off.
func (t *authTicket) end(then func(g *authGuard)) {
	g := t.g
	if g.off {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if t.rec != nil && t.rec.pending > 0 {
		t.rec.pending--
	}
	t.rec = nil
	if then != nil {
		then(g)
	}
}

// failed records that the attempt's credentials were wrong: a failure of its
// address (in the address's current record, even if a success reset it
// while this attempt waited).
func (t *authTicket) failed(now time.Time) {
	t.end(func(g *authGuard) {
		f := g.record(t.key, now)
		f.n++
		f.last = now
	})
}

// abandoned records that the attempt ended before its credentials were
// checked (its connection went away, or the server is shutting down).
func (t *authTicket) abandoned() { t.end(nil) }

// succeeded forgets the address's failures: the attempt had the right
// credentials. Attempts still waiting keep their turns.
func (t *authTicket) succeeded() {
	t.end(func(g *authGuard) {
		f := g.fails[t.key]
		switch {
		case f == nil:
		case f.pending == 0:
			delete(g.fails, t.key)
		default:
			f.n = 0
		}
	})
}

func (g *authGuard) prune(now time.Time) {
	for k, f := range g.fails {
		if f.pending == 0 && now.Sub(f.last) > authFailWindow {
			delete(g.fails, k)
		}
	}
	if len(g.fails) >= authGuardMax {
		clear(g.fails) // under a flood from very many addresses, start over
	}
}

// WithAuthFailureSlowdown turns the slow-down of repeated authentication
// failures on (the default) or off. While on, after 3 failed
// authentications from one IP address within a minute, the credentials of
// each further attempt from it are checked only after a delay that doubles
// from 100 ms up to 5 s (or about half the auth timeout, if less), one
// attempt at a time (attempts made in parallel wait their turn, and count as
// failures for the delays of the ones behind them); an attempt whose turn is
// further away than that, or past its auth timeout, is refused at once,
// unchecked, with ErrRateLimited and a retry-after (Dial returns it; a
// client reconnecting waits that long before its next attempt). A success,
// or a minute without a failed check, resets it. Turn it
// off only where clients are trusted (a test that checks wrong
// credentials, say: h3xtest does).
func WithAuthFailureSlowdown(on bool) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.authSlowdownOff = !on })
}
