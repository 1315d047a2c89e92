package h3x

import (
	"net"
	"sync"
	"time"
)

// Auth failure slow-down: after authFreeFailures failed authentications
// from one IP address within authFailWindow, each further failure is
// answered only after a delay that doubles from authBaseDelay up to
// authMaxDelay. A success, or authFailWindow without failure, resets it.
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
	n    int
	last time.Time
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

// failed records a failed authentication from addr and returns how long to
// wait before answering it.
func (g *authGuard) failed(addr net.Addr, now time.Time) time.Duration {
	if g.off {
		return 0
	}
	key := addrKey(addr)
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.fails == nil {
		g.fails = make(map[string]*authFailures)
	}
	f := g.fails[key]
	if f == nil || now.Sub(f.last) > authFailWindow {
		if len(g.fails) >= authGuardMax {
			g.prune(now)
		}
		f = &authFailures{}
		g.fails[key] = f
	}
	f.n++
	f.last = now
	if f.n <= authFreeFailures {
		return 0
	}
	d := authBaseDelay << min(f.n-authFreeFailures-1, 16)
	return min(d, authMaxDelay)
}

// succeeded forgets addr's failures.
func (g *authGuard) succeeded(addr net.Addr) {
	key := addrKey(addr)
	g.mu.Lock()
	delete(g.fails, key)
	g.mu.Unlock()
}

func (g *authGuard) prune(now time.Time) {
	for k, f := range g.fails {
		if now.Sub(f.last) > authFailWindow {
			delete(g.fails, k)
		}
	}
	if len(g.fails) >= authGuardMax {
		clear(g.fails) // under a flood from very many addresses, start over
	}
}

// WithAuthFailureSlowdown turns the slow-down of repeated authentication
// failures on (the default) or off. While on, after 3 failed
// authentications from one IP address within a minute, each further
// failure from it is answered only after a delay that doubles from 100 ms
// up to 5 s; a success, or a minute without failure, resets it. Turn it
// off only where clients are trusted (a test that checks wrong
// credentials, say: h3xtest does).
func WithAuthFailureSlowdown(on bool) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.authSlowdownOff = !on })
}
