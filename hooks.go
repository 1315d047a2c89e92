package h3x

import (
	"context"
	"time"
)

// Hooks receives a server's metrics events, so metrics need no dependency
// in this package (the h3xprom package adapts them to Prometheus). Methods
// are called synchronously on hot paths: they must be fast, must not block,
// and must be safe for concurrent use. Embed NopHooks to implement only some.
type Hooks interface {
	// Published reports a SendEvent's outcome in one namespace: events
	// stored, duplicates, and the time until they were durable.
	Published(namespace string, stored, duplicates int, durable time.Duration)
	// Refused reports events refused with code (rate limited, queue full,
	// permission denied, invalid).
	Refused(namespace string, code ErrorCode, n int)
	// Delivered reports deliveries handed out by one fetch in one
	// namespace (one call per namespace of the fetch): how many, how many
	// of them were redeliveries (attempt > 1), how long the fetch waited,
	// and each event's age (now minus its timestamp). A Hooks that also
	// implements FetchedHooks gets one call per fetch as well.
	Delivered(namespace string, n, redelivered int, fetchWait time.Duration, ages []time.Duration)
	// Settled reports acks, nacks or extensions (t is FrameAckEvent,
	// FrameNackEvent or FrameExtendLease) applied (ok) or refused (stale,
	// unknown or denied) by one request. A Hooks that also implements
	// SettledInHooks gets the applied ones per namespace as well.
	Settled(t FrameType, ok, refused int)
	// AuthFailed reports a refused authentication: wrong credentials, a
	// malformed Auth, a first frame other than Auth, no Auth within the
	// auth timeout (CodeAuthTimeout), or the registry failing. A connection
	// that ends before it sends Auth (a health check, a client that gave
	// up) refuses nothing and is not reported.
	AuthFailed(code ErrorCode)
	// ConnectionOpened and ConnectionClosed track live connections.
	ConnectionOpened()
	ConnectionClosed()
}

// SettledInHooks is an optional extension of Hooks for metrics per
// namespace of acks, nacks and lease extensions. A server whose Hooks also
// implements it calls SettledIn after each Settled call. It is a separate
// interface, found by a type assertion, so that Hooks written before it
// still compile; a Hooks that wraps another must forward SettledIn too.
type SettledInHooks interface {
	Hooks
	// SettledIn reports the settlements of one request that were applied
	// (the ok of the Settled call before it), per namespace: it may be
	// called several times per request, and n is never zero. namespace is
	// the one the client named for the event (the queue checks it: the
	// built-in queues apply no settlement that names another namespace
	// than the event's), or "" when the client named none. t is as in
	// Settled.
	SettledIn(namespace string, t FrameType, n int)
}

// FetchedHooks is an optional extension of Hooks for metrics per fetch (a
// fetch's deliveries are reported per namespace by Delivered). A server
// whose Hooks also implements it calls Fetched once per fetch that
// delivered, after its Delivered calls; like SettledInHooks, it is found by
// a type assertion, and a Hooks that wraps another must forward it too.
type FetchedHooks interface {
	Hooks
	// Fetched reports one fetch that delivered n events (all namespaces)
	// after waiting wait for them.
	Fetched(n int, wait time.Duration)
}

// NopHooks implements Hooks with methods that do nothing.
type NopHooks struct{}

// Published does nothing.
func (NopHooks) Published(string, int, int, time.Duration) {}

// Refused does nothing.
func (NopHooks) Refused(string, ErrorCode, int) {}

// Delivered does nothing.
func (NopHooks) Delivered(string, int, int, time.Duration, []time.Duration) {}

// Settled does nothing.
func (NopHooks) Settled(FrameType, int, int) {}

// AuthFailed does nothing.
func (NopHooks) AuthFailed(ErrorCode) {}

// ConnectionOpened does nothing.
func (NopHooks) ConnectionOpened() {}

// ConnectionClosed does nothing.
func (NopHooks) ConnectionClosed() {}

var _ Hooks = NopHooks{}

// reportSettled tells the hooks about one settle request: its totals, then
// (for a SettledInHooks) its applied settlements per run of refs in one
// namespace. results are the queue's, one per ref.
func reportSettled(h Hooks, t FrameType, refs []LeaseRef, results []SettleResult, ok, refused int) {
	h.Settled(t, ok, refused)
	sh, per := h.(SettledInHooks)
	if !per || ok == 0 {
		return
	}
	ns, n := "", 0
	for j := range results {
		if results[j].Status != SettleOK {
			continue
		}
		if n > 0 && refs[j].Namespace != ns {
			sh.SettledIn(ns, t, n)
			n = 0
		}
		ns = refs[j].Namespace
		n++
	}
	if n > 0 {
		sh.SettledIn(ns, t, n)
	}
}

// WithHooks sends the server's metrics events to h. Default: NopHooks.
func WithHooks(h Hooks) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.hooks = h })
}

// Stats returns the queue's per-namespace statistics (see Queue.Stats).
func (s *Server) Stats(ctx context.Context, namespaces ...string) ([]NamespaceStats, error) {
	return s.queue.Stats(ctx, namespaces...)
}
