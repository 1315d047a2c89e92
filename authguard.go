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
// authMaxDelay) after the previous one's turn. Attempts still waiting count
// as failures for the delays of the ones behind them, so that opening many
// connections at once buys a guesser nothing; an attempt whose turn would
// come more than authMaxDelay from now is refused without a check. A
// success, or authFailWindow without failure, resets it.
const (
	authFreeFailures = 3
	authBaseDelay    = 100 * time.Millisecond
	authMaxDelay     = 5 * time.Second
	authFailWindow   = time.Minute
	authGuardMax     = 100000 // addresses tracked at most
)

type authGuard struct {
	off   bool // WithAuthFailureSlowdown(false)
	mu    sync.Mutex
	fails map[string]*authFailures
}

type authFailures struct {
	n       int       // failed checks within the window
	pending int       // attempts admitted and not yet decided
	last    time.Time // the last failure or admission
	next    time.Time // when the last admitted attempt's turn comes
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

// record returns addr's record, a fresh one if it has none or its last
// failure is older than the window. g.mu is held.
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

// admit takes the turn of an authentication attempt from addr: it returns
// how long the attempt must wait before its credentials are checked, or
// refused if it is not to be checked at all (its turn would come later than
// authMaxDelay from now). An admitted attempt must end with failed,
// succeeded or abandoned.
func (g *authGuard) admit(addr net.Addr, now time.Time) (wait time.Duration, refused bool) {
	if g.off {
		return 0, false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	f := g.record(addrKey(addr), now)
	k := f.n + f.pending - authFreeFailures // attempts past the free ones, this one excluded
	if k < 0 {
		f.pending++
		return 0, false
	}
	turn := f.next
	if turn.Before(now) {
		turn = now
	}
	turn = turn.Add(min(authBaseDelay<<min(k, 16), authMaxDelay))
	if turn.Sub(now) > authMaxDelay {
		return 0, true
	}
	f.pending++
	f.next = turn
	f.last = now
	return turn.Sub(now), false
}

// failed records that the credentials of an attempt admitted from addr were
// wrong.
func (g *authGuard) failed(addr net.Addr, now time.Time) {
	if g.off {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	key := addrKey(addr)
	f := g.fails[key]
	if f == nil {
		f = g.record(key, now)
		f.pending++ // admitted before a success reset the record
	}
	f.pending--
	f.n++
	f.last = now
}

// abandoned records that an attempt admitted from addr ended before its
// credentials were checked (its connection went away, or timed out waiting).
func (g *authGuard) abandoned(addr net.Addr) {
	if g.off {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if f := g.fails[addrKey(addr)]; f != nil && f.pending > 0 {
		f.pending--
	}
}

// succeeded forgets addr's failures: an attempt admitted from addr had the
// right credentials.
func (g *authGuard) succeeded(addr net.Addr) {
	key := addrKey(addr)
	g.mu.Lock()
	delete(g.fails, key)
	g.mu.Unlock()
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
// from 100 ms up to 5 s, one attempt at a time (attempts made in parallel
// wait their turn, and count as failures for the delays of the ones behind
// them); an attempt whose turn is more than 5 s away is refused at once,
// unchecked. A success, or a minute without failure, resets it. Turn it
// off only where clients are trusted (a test that checks wrong
// credentials, say: h3xtest does).
func WithAuthFailureSlowdown(on bool) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.authSlowdownOff = !on })
}
