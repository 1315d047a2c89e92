package h3x

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

// Admission control runs on a new connection attempt's first packet, before
// quic-go does any TLS work for it (quic.Transport.VerifySourceAddress and
// ConnContext, both called from the transport's packet loop):
//
//   - Under load (the new-connection bucket below half, the source IP's
//     bucket below half, or half the unauthenticated slots taken) an
//     attempt without an address-validation token is answered with a
//     stateless Retry (RFC 9000 §8.1.2): the server keeps no state and does
//     no handshake work until the client proves it owns its address, so a
//     spoofed flood costs a Retry packet each.
//   - An attempt is refused with the QUIC transport error CONNECTION_REFUSED
//     (an Initial packet, no TLS) when the server-wide or per-IP
//     new-connection bucket is empty, when the connection limit is reached,
//     or when the maximum number of connections waiting to authenticate
//     (handshaking included) is reached. The client sees
//     ErrTooManyConnections.
//
// A slot among the connections waiting to authenticate is taken here and
// given back when the connection authenticates or ends.

// Connection admission defaults.
var (
	// DefaultConnectionRate is the server-wide new-connection limit (see
	// WithConnectionRate).
	DefaultConnectionRate = RateLimit{Rate: 100, Burst: 200}
	// DefaultConnectionRatePerIP is the per-source-IP new-connection limit
	// (see WithConnectionRatePerIP): off.
	DefaultConnectionRatePerIP = RateLimit{}
)

// admissionMaxIPs bounds the per-IP buckets kept at once.
const admissionMaxIPs = 65536

// AdmissionStats counts what the server's admission control did with new
// connection attempts since the server started. Retried and the Refused
// counts are of Initial packets: an attempt's first flight can be two
// packets (a ClientHello with a post-quantum key share), and a refused
// client may retransmit.
type AdmissionStats struct {
	Admitted       uint64 // attempts handed to the TLS handshake
	Retried        uint64 // packets answered with a Retry (address validation)
	RefusedRate    uint64 // packets refused: the server-wide or per-IP new-connection rate, or unvalidated while busy
	RefusedLimit   uint64 // packets refused: the connection limit or the handshaking/unauthenticated limit
	Unvalidated    uint64 // admitted without address validation
	PendingNow     int64  // connections handshaking or waiting to authenticate now
	PendingMax     int64  // the limit of PendingNow
	ConnectionsNow int64  // admitted connections not yet closed (pending included)
}

type admission struct {
	global     *tokenBucket // nil: no server-wide rate
	perIP      RateLimit    // Rate 0: no per-IP rate
	maxPending int64
	maxConns   int64

	mu  sync.Mutex
	ips map[string]*tokenBucket

	pending                                                   atomic.Int64 // handshaking or waiting to authenticate
	live                                                      atomic.Int64 // admitted and not closed
	admitted, retried, refusedRate, refusedLimit, unvalidated atomic.Uint64
}

func newAdmission(global, perIP RateLimit, maxPending, maxConns int, now time.Time) *admission {
	a := &admission{perIP: perIP, maxPending: int64(maxPending), maxConns: int64(maxConns)}
	if global.Rate > 0 {
		a.global = newTokenBucket(global.Rate, burstOf(global), now)
	}
	if perIP.Rate > 0 {
		a.perIP.Burst = burstOf(perIP)
		a.ips = make(map[string]*tokenBucket)
	}
	return a
}

func burstOf(l RateLimit) int {
	if l.Burst > 0 {
		return l.Burst
	}
	return defaultBurst(l.Rate)
}

// level returns the tokens the bucket holds now, and its burst.
func (b *tokenBucket) level(now time.Time) (tokens, burst float64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refill(now)
	return b.tokens, b.burst
}

// ipBucket returns addr's bucket, made on first use when create is set.
func (a *admission) ipBucket(addr net.Addr, now time.Time, create bool) *tokenBucket {
	if a.ips == nil {
		return nil
	}
	key := addrKey(addr)
	a.mu.Lock()
	defer a.mu.Unlock()
	b := a.ips[key]
	if b == nil && create {
		if len(a.ips) >= admissionMaxIPs {
			for k, ob := range a.ips { // forget the buckets that are full again
				if tokens, burst := ob.level(now); tokens >= burst {
					delete(a.ips, k)
				}
			}
			if len(a.ips) >= admissionMaxIPs {
				clear(a.ips) // very many addresses at once: start over
			}
		}
		b = newTokenBucket(a.perIP.Rate, a.perIP.Burst, now)
		a.ips[key] = b
	}
	return b
}

// load reports whether new attempts are refused outright (full: the
// limits are reached or a bucket is empty, so a Retry would only cost a
// round trip before the refusal) or must validate their address first
// (busy: a bucket is below half, or half the pending slots are taken).
func (a *admission) load(addr net.Addr, now time.Time) (full, busy bool) {
	pending := a.pending.Load()
	if a.live.Load() >= a.maxConns || pending >= a.maxPending {
		return true, true
	}
	busy = pending*2 >= a.maxPending
	for _, b := range [2]*tokenBucket{a.global, a.ipBucket(addr, now, false)} {
		if b == nil {
			continue
		}
		tokens, burst := b.level(now)
		if tokens < 1 {
			return true, true
		}
		busy = busy || tokens < burst/2
	}
	return false, busy
}

// verifySourceAddress is quic.Transport.VerifySourceAddress: it asks for a
// Retry when the server is busy but may still admit the attempt. It takes
// no token.
func (a *admission) verifySourceAddress(addr net.Addr) bool {
	full, busy := a.load(addr, time.Now())
	if busy && !full {
		a.retried.Add(1)
		return true
	}
	return false
}

type admissionSlotKey struct{}

// admissionSlot is an admitted connection's place among the pending
// (handshaking or unauthenticated) connections and the live ones.
type admissionSlot struct {
	a           *admission
	pendingOnce sync.Once
}

// authenticated gives the pending slot back.
func (s *admissionSlot) authenticated() {
	s.pendingOnce.Do(func() { s.a.pending.Add(-1) })
}

// closed gives both slots back; it runs once, by context.AfterFunc.
func (s *admissionSlot) closed() {
	s.authenticated()
	s.a.live.Add(-1)
}

// errAdmission makes quic-go refuse the attempt with CONNECTION_REFUSED.
var errAdmission = &Error{Code: CodeTooManyConnections, Message: "refused before the handshake"}

// connContext is quic.Transport.ConnContext: it admits or refuses a new
// connection attempt before its handshake.
func (a *admission) connContext(ctx context.Context, ci *quic.ClientInfo) (context.Context, error) {
	now := time.Now()
	if a.live.Load() >= a.maxConns || a.pending.Load() >= a.maxPending {
		a.refusedLimit.Add(1)
		return nil, errAdmission
	}
	if !ci.AddrVerified {
		// Busy: only attempts that passed a Retry are admitted (an attempt
		// refused here found the server full, so it got no Retry).
		if _, busy := a.load(ci.RemoteAddr, now); busy {
			a.refusedRate.Add(1)
			return nil, errAdmission
		}
	}
	// The address's bucket and the server's are decided together (the
	// address's first): an address over its own rate never holds tokens of
	// the server's bucket, not even for a moment.
	buckets := make([]*tokenBucket, 0, 2)
	if ipb := a.ipBucket(ci.RemoteAddr, now, true); ipb != nil {
		buckets = append(buckets, ipb)
	}
	if a.global != nil {
		buckets = append(buckets, a.global)
	}
	if got, _, _ := takeAll(now, 1, buckets...); got == 0 {
		a.refusedRate.Add(1)
		return nil, errAdmission
	}
	a.pending.Add(1)
	a.live.Add(1)
	a.admitted.Add(1)
	if !ci.AddrVerified {
		a.unvalidated.Add(1)
	}
	slot := &admissionSlot{a: a}
	context.AfterFunc(ctx, slot.closed) // ctx ends when the connection or its handshake does
	return context.WithValue(ctx, admissionSlotKey{}, slot), nil
}

// connAuthenticated gives back the pending slot of the connection whose
// context is ctx.
func connAuthenticated(ctx context.Context) {
	if s, ok := ctx.Value(admissionSlotKey{}).(*admissionSlot); ok {
		s.authenticated()
	}
}

func (a *admission) stats() AdmissionStats {
	return AdmissionStats{
		Admitted:       a.admitted.Load(),
		Retried:        a.retried.Load(),
		RefusedRate:    a.refusedRate.Load(),
		RefusedLimit:   a.refusedLimit.Load(),
		Unvalidated:    a.unvalidated.Load(),
		PendingNow:     a.pending.Load(),
		PendingMax:     a.maxPending,
		ConnectionsNow: a.live.Load(),
	}
}

// AdmissionStats reports what admission control did with new connection
// attempts (zero before the server starts).
func (s *Server) AdmissionStats() AdmissionStats {
	s.mu.Lock()
	a := s.admission
	s.mu.Unlock()
	if a == nil {
		return AdmissionStats{}
	}
	return a.stats()
}

// WithConnectionRate limits new connection attempts, over all source
// addresses, to l (Rate per second, bursts of Burst). Attempts beyond it
// are refused before any TLS work, with the QUIC error CONNECTION_REFUSED
// (clients see ErrTooManyConnections, which is retryable; the client SDK's
// reconnect backs off and retries), and once the bucket is below half,
// attempts must first pass a stateless Retry (address validation). This
// bounds the CPU that handshakes can take from established connections; a
// TLS handshake costs the server about 1–2 ms of CPU. A Rate of 0 turns
// the limit off. Default DefaultConnectionRate (100/s, bursts of 200).
func WithConnectionRate(l RateLimit) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.connRate = l })
}

// WithConnectionRatePerIP limits new connection attempts from each source
// IP address to l, like WithConnectionRate (and in addition to it); the
// address of an attempt is trusted only after a Retry, which is demanded
// from an address whose bucket is below half. Default
// DefaultConnectionRatePerIP: off (clients behind one NAT share an address).
func WithConnectionRatePerIP(l RateLimit) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.connRatePerIP = l })
}
