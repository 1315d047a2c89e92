package h3x

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/sync/semaphore"
	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// Session is an authenticated connection, as application handlers see it.
type Session struct {
	// ID identifies the session in logs; it is also its lease holder name.
	ID string
	// ClientID is the authenticated client.
	ClientID string
	// Grants are what the client may do.
	Grants Grants
	// Namespaces are the namespaces the client asked for in Auth (empty:
	// every namespace its grants allow).
	Namespaces []string
	// RemoteAddr is the client's address.
	RemoteAddr net.Addr
}

// allows reports whether the session may use namespace ns with permission p.
func (s *Session) allows(ns string, p Permission) bool {
	if len(s.Namespaces) > 0 && !slices.Contains(s.Namespaces, ns) {
		return false
	}
	return s.Grants.Allows(ns, p)
}

// consumeNamespaces lists the namespaces a fetch without names reads: the
// session's requested namespaces, or its explicit consume grants.
func (s *Session) consumeNamespaces() []string {
	var out []string
	if len(s.Namespaces) > 0 {
		for _, ns := range s.Namespaces {
			if s.Grants.Allows(ns, PermConsume) {
				out = append(out, ns)
			}
		}
		return out
	}
	for _, g := range s.Grants {
		if g.Namespace != "*" && g.Permission&PermConsume != 0 && !slices.Contains(out, g.Namespace) {
			out = append(out, g.Namespace)
		}
	}
	return out
}

// maxAuthFrameSize is the frame size limit before authentication.
const maxAuthFrameSize = 64 << 10

// serverConn serves one QUIC connection.
//
// An idle authenticated connection is kept as small as the QUIC API allows:
// two goroutines (one waiting in AcceptStream, one reading the control
// stream; quic-go offers no readiness callback that would let one goroutine
// wait for both), and no per-connection logger, map or channel until one is
// needed.
type serverConn struct {
	srv    *Server
	qc     *quic.Conn
	id     string
	logger connLogger

	authed    chan struct{} // closed once Auth succeeded
	session   *Session
	ctrlMu    sync.Mutex // serializes writes on the control stream
	ctrl      *quic.Stream
	inflight  atomic.Int64   // requests being served
	streams   sync.WaitGroup // stream handlers
	goingAway atomic.Bool
	// goAwaySeenAt is when the client answered the Ping sent after GoAway
	// (Unix nanoseconds; 0: not yet): it had read the GoAway (Shutdown's
	// drain, drainConns).
	goAwaySeenAt atomic.Int64
	// lastAnswerAt is when the last answer to a request was written after
	// the GoAway (Unix nanoseconds): the drain lingers after it too, so that
	// a lost packet of that answer can be sent again before the close.
	lastAnswerAt atomic.Int64

	rateLimited bool // rate limits apply to this session

	noticeMu   sync.Mutex
	lastNotice map[string]time.Time // namespace → last RateLimitNotice

	// reqGate bounds the bytes of requests read and not yet served
	// (requestBudget); made by the first request.
	reqGate atomic.Pointer[semaphore.Weighted]

	unackedMu sync.Mutex
	// unacked: the deliveries made on this connection and not settled, by
	// event id (made on first delivery). Ids need not be unique (with
	// deduplication off, or after its window), so each id has a list and
	// nUnacked counts them all.
	unacked   map[string]*unackedDelivery
	nUnacked  int
	reserved  int           // room taken by fetches leasing now (reserve), not yet in unacked
	unackedCh chan struct{} // closed and cleared when deliveries are settled; made when first asked for
}

// unackedDelivery is a delivery the connection holds unsettled: its event's
// namespace, its attempt, its lease deadline and the stream (subscription)
// whose fetch it answered; next is another delivery of the same id.
type unackedDelivery struct {
	deadline  time.Time
	namespace string
	attempt   int
	ss        *sessionStream
	next      *unackedDelivery
}

// matches reports whether settlement ref names d: its id (the list's),
// its namespace and its attempt, where given.
func (d *unackedDelivery) matches(ref LeaseRef) bool {
	return (ref.Namespace == "" || ref.Namespace == d.namespace) && (ref.Attempt <= 0 || ref.Attempt == d.attempt)
}

// findUnacked returns the first delivery of ref's id that ref names.
// unackedMu is held.
func (c *serverConn) findUnacked(ref LeaseRef) *unackedDelivery {
	for d := c.unacked[ref.ID]; d != nil; d = d.next {
		if d.matches(ref) {
			return d
		}
	}
	return nil
}

// forgetWhere removes the deliveries of id for which drop is true.
// unackedMu is held.
func (c *serverConn) forgetWhere(id string, drop func(*unackedDelivery) bool) {
	link := c.unacked[id]
	if link == nil {
		return
	}
	if link = c.dropFrom(link, drop); link == nil {
		delete(c.unacked, id)
	} else {
		c.unacked[id] = link
	}
}

// dropFrom removes from the list link the deliveries for which drop is
// true, and returns what is left of it. unackedMu is held.
func (c *serverConn) dropFrom(link *unackedDelivery, drop func(*unackedDelivery) bool) *unackedDelivery {
	var prev *unackedDelivery
	for d := link; d != nil; d = d.next {
		if !drop(d) {
			prev = d
			continue
		}
		d.ss.unacked--
		c.nUnacked--
		if prev == nil {
			link = d.next
		} else {
			prev.next = d.next
		}
	}
	return link
}

// forgetOne removes the first delivery of ref's id that ref names.
// unackedMu is held.
func (c *serverConn) forgetOne(ref LeaseRef) {
	done := false
	c.forgetWhere(ref.ID, func(d *unackedDelivery) bool {
		if done || !d.matches(ref) {
			return false
		}
		done = true
		return true
	})
}

// tracksUnacked reports whether the server caps unsettled deliveries at all.
func (c *serverConn) tracksUnacked() bool {
	return c.srv.cfg.maxUnacked > 0 || c.srv.cfg.maxUnackedPerSub > 0
}

func newServerConn(s *Server, qc *quic.Conn, seq uint64) *serverConn {
	c := &serverConn{
		srv:    s,
		qc:     qc,
		id:     s.holderID + "-" + strconv.FormatUint(seq, 10),
		authed: make(chan struct{}),
	}
	c.logger.c = c
	return c
}

// requestGate returns the connection's request byte budget and its size.
func (c *serverConn) requestGate() (*semaphore.Weighted, int64) {
	budget := requestBudget(c.srv.cfg.maxFrameSize)
	if g := c.reqGate.Load(); g != nil {
		return g, budget
	}
	c.reqGate.CompareAndSwap(nil, semaphore.NewWeighted(budget))
	return c.reqGate.Load(), budget
}

// connLogger logs through the server's logger with the connection's id
// and remote address. It builds those attributes only for a record the
// handler takes, so a connection holds no logger of its own.
type connLogger struct{ c *serverConn }

func (l connLogger) log(level slog.Level, msg string, args ...any) {
	h := l.c.srv.logger.Handler()
	ctx := context.Background()
	if !h.Enabled(ctx, level) {
		return
	}
	// The record's source is the caller of Debug/Info/Warn/Error, as if
	// it had called a *slog.Logger (see log/slog's wrapping example).
	var pcs [1]uintptr
	runtime.Callers(3, pcs[:])
	r := slog.NewRecord(time.Now(), level, msg, pcs[0])
	r.Add(args...)
	h = h.WithAttrs([]slog.Attr{slog.String("conn", l.c.id), slog.String("remote", l.c.qc.RemoteAddr().String())})
	_ = h.Handle(ctx, r)
}

func (l connLogger) Debug(msg string, args ...any) { l.log(slog.LevelDebug, msg, args...) }
func (l connLogger) Info(msg string, args ...any)  { l.log(slog.LevelInfo, msg, args...) }
func (l connLogger) Warn(msg string, args ...any)  { l.log(slog.LevelWarn, msg, args...) }
func (l connLogger) Error(msg string, args ...any) { l.log(slog.LevelError, msg, args...) }

// noticeInterval is the least time between two RateLimitNotices of one
// namespace on one connection.
const noticeInterval = 100 * time.Millisecond

// notifyRateLimit sends a RateLimitNotice, at most one per namespace per
// noticeInterval.
func (c *serverConn) notifyRateLimit(ns string, retryAfter time.Duration, l RateLimit) {
	now := time.Now()
	c.noticeMu.Lock()
	if c.lastNotice == nil {
		c.lastNotice = make(map[string]time.Time)
	}
	if now.Sub(c.lastNotice[ns]) < noticeInterval {
		c.noticeMu.Unlock()
		return
	}
	if len(c.lastNotice) >= 64 {
		// Entries older than the interval decide nothing: keep the map to
		// the namespaces noticed lately.
		for k, at := range c.lastNotice {
			if now.Sub(at) >= noticeInterval {
				delete(c.lastNotice, k)
			}
		}
	}
	c.lastNotice[ns] = now
	c.noticeMu.Unlock()
	c.writeControl(FrameRateLimitNotice, &h3xpb.RateLimitNotice{Namespace: ns, RetryAfterMs: durationMs(retryAfter), Limit: l.Rate, Burst: uint32(l.Burst)})
}

// releaseUnsent gives back the leases of a batch that could not be written
// (its stream was reset), so the events are ready again at once instead of
// after the ack deadline.
func (c *serverConn) releaseUnsent(b *h3xpb.EventsBatch) {
	refs := make([]LeaseRef, len(b.GetEvents()))
	for i, d := range b.GetEvents() {
		refs[i] = deliveryRef(d)
		refs[i].Unseen = true
	}
	c.giveBack(refs, "batch not delivered")
	c.settled(refs)
}

// deliveryRef names the delivery d of a batch, to settle it.
func deliveryRef(d *h3xpb.Delivery) LeaseRef {
	return LeaseRef{ID: d.GetEvent().GetId(), Attempt: int(d.GetAttempt()), Namespace: d.GetEvent().GetNamespace()}
}

// releaseUnencodable is releaseUnsent for a batch that could not be
// encoded: an event in it that is not valid UTF-8 (stored by an older
// version, say) is set aside as setAsideUndeliverable does, with a counted
// nack and a delay, and the others are given back unseen.
func (c *serverConn) releaseUnencodable(b *h3xpb.EventsBatch) {
	var unseen, bad []LeaseRef
	for _, d := range b.GetEvents() {
		ref := deliveryRef(d)
		if ev := eventFromWire(d.GetEvent()); ev.notUTF8() != "" {
			bad = append(bad, ref)
			continue
		}
		ref.Unseen = true
		unseen = append(unseen, ref)
	}
	if len(unseen) > 0 {
		c.giveBack(unseen, "batch not delivered")
	}
	if len(bad) > 0 {
		c.setAside(bad, "its text is not valid UTF-8")
	}
	c.settled(append(unseen, bad...))
}

// setAside nacks leases whose events cannot be delivered, for reason, with
// undeliverableDelay: a counted attempt, so that after MaxAttempts they
// move to their dead-letter namespace.
func (c *serverConn) setAside(refs []LeaseRef, reason string) {
	for _, r := range refs {
		c.logger.Warn("h3x: an event cannot be delivered: "+reason, "id", r.ID, "namespace", r.Namespace)
	}
	if _, err := c.srv.queue.Nack(c.srv.stopCtx, c.id, refs, undeliverableDelay, reason); err != nil {
		c.logger.Warn("h3x: setting aside events that cannot be delivered", "err", err)
	}
}

// giveBack nacks leases the server took but did not deliver, as unseen:
// their attempts do not count.
func (c *serverConn) giveBack(refs []LeaseRef, why string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.srv.queue.Nack(ctx, c.id, refs, 0, why); err != nil && !errors.Is(err, ErrQueueClosed) {
		c.logger.Warn("h3x: giving back leases not delivered", "reason", why, "err", err)
	}
}

// frameReader reads a client's frames on r, up to the server's frame size,
// keeping at most frameRetain between them (a peer's idle streams hold
// little).
func (c *serverConn) frameReader(r io.Reader) *frameReader {
	fr := newFrameReader(r, uint32(c.srv.cfg.maxFrameSize))
	fr.retain = frameRetain
	return fr
}

// giveBackLeases gives back, unseen, leases a fetch took and will not
// deliver.
func (c *serverConn) giveBackLeases(leases []Lease, why string) {
	refs := make([]LeaseRef, len(leases))
	for i := range leases {
		refs[i] = leases[i].ref()
		refs[i].Unseen = true
	}
	c.giveBack(refs, why)
}

// reserve takes room for up to limit more deliveries on ss, under the
// connection's cap and ss's (fetches on other streams cannot take it
// meanwhile), and returns how much it took; with no room, it returns 0 and a
// channel closed when room may have been freed. The fetch gives the room
// back with delivered (or unreserve).
func (c *serverConn) reserve(ss *sessionStream, limit int) (int, <-chan struct{}) {
	if !c.tracksUnacked() {
		return limit, nil
	}
	maxConn, maxSub := c.srv.cfg.maxUnacked, c.srv.cfg.maxUnackedPerSub
	room := func() int {
		r := limit
		if maxConn > 0 {
			r = min(r, maxConn-c.nUnacked-c.reserved)
		}
		if maxSub > 0 {
			r = min(r, maxSub-ss.unacked-ss.reserved)
		}
		return r
	}
	c.unackedMu.Lock()
	defer c.unackedMu.Unlock()
	if room() <= 0 {
		// Deliveries whose lease expired no longer count.
		now := time.Now()
		expired := func(d *unackedDelivery) bool { return !now.Before(d.deadline) }
		for id := range c.unacked {
			c.forgetWhere(id, expired)
		}
	}
	if n := room(); n > 0 {
		c.reserved += n
		ss.reserved += n
		return n, nil
	}
	if c.unackedCh == nil {
		c.unackedCh = make(chan struct{})
	}
	return 0, c.unackedCh
}

// roomFreed wakes the fetches waiting for room under the unacked caps.
// unackedMu is held.
func (c *serverConn) roomFreed() {
	if c.unackedCh != nil {
		close(c.unackedCh)
		c.unackedCh = nil // made again by the next reserve that finds no room
	}
}

// unreserve gives back room reserve took for ss that no delivery used.
func (c *serverConn) unreserve(ss *sessionStream, n int) {
	if !c.tracksUnacked() || n == 0 {
		return
	}
	c.unackedMu.Lock()
	c.reserved -= n
	ss.reserved -= n
	c.roomFreed()
	c.unackedMu.Unlock()
}

// delivered records deliveries handed to the session by a fetch on ss, in
// place of the room reserved for them (reserved, from reserve).
func (c *serverConn) delivered(ss *sessionStream, leases []Lease, reserved int) {
	if !c.tracksUnacked() {
		return
	}
	c.unackedMu.Lock()
	c.reserved -= reserved
	ss.reserved -= reserved
	if len(leases) < reserved {
		c.roomFreed() // room left over
	}
	if c.unacked == nil {
		c.unacked = make(map[string]*unackedDelivery, len(leases))
	}
	for i := range leases {
		l := &leases[i]
		// One lookup and one store per delivery (the map is read on every
		// delivery and every settlement).
		link := c.unacked[l.Event.ID]
		if link != nil {
			// The same event delivered again: its earlier delivery here is
			// stale (the queue leased it again, so that lease had ended).
			link = c.dropFrom(link, func(d *unackedDelivery) bool {
				return d.namespace == l.Event.Namespace && d.attempt < l.Attempt
			})
		}
		c.unacked[l.Event.ID] = &unackedDelivery{deadline: l.Deadline, namespace: l.Event.Namespace, attempt: l.Attempt, ss: ss, next: link}
		c.nUnacked++
		ss.unacked++
	}
	c.unackedMu.Unlock()
}

// extended records the new deadline of deliveries whose lease was extended.
func (c *serverConn) extended(refs []LeaseRef, results []SettleResult, until time.Time) {
	if !c.tracksUnacked() {
		return
	}
	c.unackedMu.Lock()
	defer c.unackedMu.Unlock()
	for i, r := range results {
		if r.Status != SettleOK || i >= len(refs) {
			continue
		}
		if d := c.findUnacked(refs[i]); d != nil {
			d.deadline = until
		}
	}
}

// settledBy forgets the deliveries that an ack or nack ended, and wakes
// fetches waiting for capacity: those settled (SettleOK), and those the
// queue no longer holds (SettleUnknown), unless the request named another
// namespace than the delivery's, which the queue answers SettleUnknown too
// while the lease goes on.
func (c *serverConn) settledBy(refs []LeaseRef, results []SettleResult) {
	if !c.tracksUnacked() || len(refs) == 0 {
		return
	}
	c.unackedMu.Lock()
	for j, r := range results {
		if j >= len(refs) {
			break
		}
		if r.Status == SettleOK || r.Status == SettleUnknown {
			// Unknown: the queue no longer holds it, unless the request
			// named another namespace, which forgetOne matches only if it
			// is the delivery's.
			c.forgetOne(refs[j])
		}
	}
	c.roomFreed()
	c.unackedMu.Unlock()
}

// holdsDelivery reports whether event id was delivered on this connection
// and not settled since (false when the server does not track deliveries:
// WithMaxUnacked(0) and WithMaxUnackedPerSubscription(0)).
func (c *serverConn) holdsDelivery(id string) bool {
	if !c.tracksUnacked() {
		return false
	}
	c.unackedMu.Lock()
	_, ok := c.unacked[id]
	c.unackedMu.Unlock()
	return ok // a list is never empty
}

// settled forgets the deliveries refs name, whatever their state, and wakes
// fetches waiting for capacity.
func (c *serverConn) settled(refs []LeaseRef) {
	if !c.tracksUnacked() || len(refs) == 0 {
		return
	}
	c.unackedMu.Lock()
	for _, ref := range refs {
		c.forgetOne(ref)
	}
	c.roomFreed()
	c.unackedMu.Unlock()
}

func (c *serverConn) close(code ErrorCode, msg string) {
	c.qc.CloseWithError(quic.ApplicationErrorCode(code), msg)
}

// serve runs the connection: authentication on the control stream, then the
// control loop and one goroutine per stream. It returns once the connection
// is gone and every handler has ended, after releasing the connection's
// leases.
func (c *serverConn) serve() {
	ctx := c.qc.Context()
	defer func() {
		release := func() {
			rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := c.srv.queue.Release(rctx, c.id); err != nil && !errors.Is(err, ErrQueueClosed) {
				c.logger.Error("h3x: releasing leases", "err", err)
			}
		}
		// The connection's leases end with it, at once: not after its
		// handlers (a slow publish, say) have returned. Again once they
		// have: a fetch may have leased as the connection ended (its
		// settlements, like any after the release, are stale).
		release()
		c.streams.Wait()
		release()
	}()
	err := c.authenticate(ctx)
	if err == nil {
		connAuthenticated(ctx) // frees its admission slot (admission.go); a refused connection keeps it until it is closed
	}
	if errors.Is(err, errGoneBeforeAuth) {
		// Nothing was refused: the peer went away (or the server closed
		// the connection) before it sent Auth.
		c.logger.Debug("h3x: connection ended before authentication", "err", err)
		return
	}
	if err != nil {
		var e *Error
		code, reason := CodeUnauthenticated, CodeUnauthenticated.String()
		if errors.As(err, &e) {
			// The Error frame's message, also as the close reason: a
			// client reports the close, which may overtake the frame.
			code, reason = e.Code, e.Message
		}
		c.logger.Info("h3x: authentication failed", "err", err)
		c.srv.cfg.hooks.AuthFailed(code)
		if e != nil && e.RetryAfter > 0 && c.ctrl != nil {
			// A refusal with a retry-after (an attempt refused unchecked,
			// authguard.go): the Error frame carries retry_after_ms, which
			// the close, overtaking it, would lose. The client closes once
			// it has read the frame; the server waits about a probe timeout
			// for that (10 to 500 ms), the connection still counted among
			// those waiting to authenticate.
			c.ctrl.Close()
			t := time.NewTimer(c.drainLinger())
			select {
			case <-c.qc.Context().Done():
			case <-t.C:
			case <-c.srv.shutdownCh:
			}
			t.Stop()
		}
		c.close(code, reason)
		return
	}
	c.streams.Add(1)
	go func() {
		defer c.streams.Done()
		c.controlLoop(ctx)
	}()
	for {
		st, err := c.qc.AcceptStream(ctx)
		if err != nil {
			return
		}
		c.streams.Add(1)
		go func() {
			defer c.streams.Done()
			c.serveStream(ctx, st)
		}()
	}
}

// errGoneBeforeAuth is authenticate's error when the connection ended before
// an Auth frame was read: not a refused authentication (Hooks.AuthFailed).
var errGoneBeforeAuth = errors.New("connection ended before Auth")

// authenticate accepts the control stream and handles Auth within the auth
// timeout. Streams the client opens meanwhile stay unaccepted; if auth fails
// the connection is closed, which resets them.
func (c *serverConn) authenticate(ctx context.Context) error {
	deadline := time.Now().Add(c.srv.cfg.authTimeout)
	actx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	st, err := c.qc.AcceptStream(actx)
	if err != nil {
		// A timeout only if the deadline has passed: a connection closed by
		// its peer fails AcceptStream before its context ends, and was
		// counted as an authentication that timed out (under load, in
		// TestAuthFailedOnlyForRefusals).
		if actx.Err() == context.DeadlineExceeded && ctx.Err() == nil {
			return ErrAuthTimeout
		}
		return fmt.Errorf("%w: %w", errGoneBeforeAuth, err)
	}
	c.ctrl = st
	st.SetReadDeadline(deadline)
	// Auth is small: an unauthenticated peer gets a 64 KiB frame limit, so
	// it cannot make the server allocate a full-size frame buffer.
	fr := newFrameReader(st, uint32(min(c.srv.cfg.maxFrameSize, maxAuthFrameSize)))
	t, payload, err := fr.next()
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
			c.writeControl(FrameError, errorToWire(ErrAuthTimeout, 0))
			return ErrAuthTimeout
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%w: %w", errGoneBeforeAuth, err)
		}
		var e *Error
		if errors.As(err, &e) {
			// A frame too large (FRAME_TOO_LARGE) or truncated
			// (PROTOCOL_VIOLATION): PROTOCOL.md §7.3 and §8.
			c.writeControl(FrameError, errorToWire(e, 0))
			return e
		}
		return newError(CodeUnauthenticated, "reading Auth: %v", err)
	}
	if t != FrameAuth {
		e := newError(CodeUnauthenticated, "the first frame on the control stream must be Auth, got %v", t)
		c.writeControl(FrameError, errorToWire(e, 0))
		return e
	}
	var auth h3xpb.Auth
	if err := unmarshalPayload(t, payload, &auth); err != nil {
		c.writeControl(FrameError, errorToWire(err, 0))
		return err
	}
	// After repeated failures from one address, its attempts wait their
	// turn before their credentials are checked (authguard.go).
	wait, ticket, retryAfter := c.srv.authGuard.admit(c.qc.RemoteAddr(), time.Now(), deadline)
	if ticket == nil {
		e := &Error{Code: CodeRateLimited, Message: "too many failed authentications from this address; try again later", RetryAfter: retryAfter}
		c.writeControl(FrameError, errorToWire(e, 0))
		return e
	}
	if wait > 0 {
		t := time.NewTimer(wait)
		var e error
		select {
		case <-t.C:
		case <-actx.Done():
			e = ErrAuthTimeout
			if ctx.Err() != nil {
				e = errGoneBeforeAuth
			}
		case <-c.srv.shutdownCh:
			e = newError(CodeShuttingDown, "server shutting down")
		}
		t.Stop()
		if e != nil {
			ticket.abandoned()
			if !errors.Is(e, errGoneBeforeAuth) {
				c.writeControl(FrameError, errorToWire(e, 0))
			}
			return e
		}
	}
	var grants Grants
	if auth.GetClientId() == "" || auth.GetToken() == "" {
		err = errBadCredentials() // both are required (PROTOCOL.md §5), whatever the registry says
	} else {
		grants, err = c.srv.registry.Authenticate(actx, auth.GetClientId(), auth.GetToken())
	}
	if err != nil {
		e := newError(CodeUnauthenticated, "invalid client id or token")
		if errors.Is(err, ErrUnauthenticated) {
			ticket.failed(time.Now())
		} else {
			ticket.abandoned()
			c.logger.Error("h3x: registry failure", "err", err)
			e = newError(CodeInternal, "registry unavailable")
		}
		c.writeControl(FrameError, errorToWire(e, 0))
		return e
	}
	ticket.succeeded()
	sess := &Session{ID: c.id, ClientID: auth.GetClientId(), Grants: grants, RemoteAddr: c.qc.RemoteAddr()}
	for _, ns := range auth.GetNamespaces() {
		if err := ValidateNamespace(ns); err != nil {
			e := newError(CodeInvalidArgument, "Auth.namespaces: %s", err.(*Error).Message)
			c.writeControl(FrameError, errorToWire(e, 0))
			return e
		}
		if !grants.Allows(ns, PermPublish) && !grants.Allows(ns, PermConsume) {
			e := newError(CodePermissionDenied, "namespace %q is not granted to %q", ns, sess.ClientID)
			c.writeControl(FrameError, errorToWire(e, 0))
			return e
		}
		if !slices.Contains(sess.Namespaces, ns) {
			sess.Namespaces = append(sess.Namespaces, ns)
		}
	}
	c.session = sess
	c.rateLimited = len(c.srv.cfg.rateLimits) > 0
	for _, g := range grants {
		if g.Rate > 0 {
			c.rateLimited = true
		}
	}
	st.SetReadDeadline(time.Time{})
	res := &h3xpb.AuthResult{
		ProtocolVersion: ProtocolVersion,
		SessionId:       c.id,
		Limits:          c.srv.limits(),
	}
	for _, g := range grants {
		res.Grants = append(res.Grants, &h3xpb.Grant{Namespace: g.Namespace, Permission: h3xpb.Permission(g.Permission)})
	}
	if err := c.writeControl(FrameAuthResult, res); err != nil {
		return err
	}
	c.logger.Debug("h3x: authenticated", "client", sess.ClientID)
	close(c.authed)
	return nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func (s *Server) limits() *h3xpb.ServerLimits {
	l := &h3xpb.ServerLimits{
		MaxFrameSize:     uint32(s.cfg.maxFrameSize),
		MaxFetchLimit:    uint32(s.cfg.maxFetchLimit),
		MaxFetchWaitMs:   durationMs(s.cfg.maxFetchWait),
		AckDeadlineMs:    durationMs(s.cfg.ackDeadline),
		MaxEventsPerSend: uint32(s.cfg.eventsPerSend()),
		MaxUnacked:       uint32(s.cfg.maxUnacked),
	}
	// The built-in queues say how they dead-letter and deduplicate; a
	// custom Queue's are not known, and are announced as 0 (PROTOCOL.md
	// §3.4).
	if q, ok := unwrapQueue(s.queue).(announcedLimits); ok {
		attempts, window := q.announcedLimits()
		l.MaxAttempts = uint32(attempts)
		l.DedupWindowMs = durationMs(window)
	}
	return l
}

// unwrapQueue returns the queue q wraps, through up to 16 wrappers with an
// Unwrap() Queue method (such as h3xtest's, which keeps a queue open across
// server restarts), so that a wrapped built-in queue's limits are still
// announced.
func unwrapQueue(q Queue) Queue {
	for range 16 {
		u, ok := q.(interface{ Unwrap() Queue })
		if !ok || u.Unwrap() == nil {
			return q
		}
		q = u.Unwrap()
	}
	return q
}

// writeControl writes one frame on the control stream.
func (c *serverConn) writeControl(t FrameType, m proto.Message) error {
	buf, err := appendFrame(nil, t, m)
	if err != nil {
		return err
	}
	c.ctrlMu.Lock()
	defer c.ctrlMu.Unlock()
	c.ctrl.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err = c.ctrl.Write(buf)
	return err
}

// goAwayPingSeq is the sequence of the Ping the server sends after GoAway.
const goAwayPingSeq = 1<<64 - 1

// goAway tells the client the server is going away.
func (c *serverConn) goAway(reason string) {
	if !c.goingAway.CompareAndSwap(false, true) {
		return
	}
	select {
	case <-c.authed:
		// The Ping after it tells when the client has read it: the control
		// stream is in order, so its Pong comes after the GoAway arrived.
		if c.writeControl(FrameGoAway, &h3xpb.GoAway{Reason: reason}) == nil {
			c.writeControl(FramePing, &h3xpb.Ping{Sequence: goAwayPingSeq, SentUnixNano: time.Now().UnixNano()})
		}
	default:
		c.close(CodeShuttingDown, reason)
	}
}

// controlLoop serves the control stream after Auth: Ping is answered with
// Pong, unknown frame types are ignored, anything else closes the
// connection with CodeProtocolViolation. The end of the control stream ends
// the session.
func (c *serverConn) controlLoop(ctx context.Context) {
	fr := c.frameReader(c.ctrl)
	for {
		t, payload, err := fr.next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				c.close(CodeNone, "control stream closed")
				return
			}
			var e *Error
			if errors.As(err, &e) {
				c.writeControl(FrameError, errorToWire(e, 0))
				c.close(e.Code, e.Message)
			} else {
				c.close(CodeNone, "")
			}
			return
		}
		switch {
		case t == FramePing:
			var p h3xpb.Ping
			if err := unmarshalPayload(t, payload, &p); err != nil {
				c.close(CodeProtocolViolation, err.Error())
				return
			}
			c.writeControl(FramePong, &h3xpb.Pong{Sequence: p.GetSequence(), PingSentUnixNano: p.GetSentUnixNano(), SentUnixNano: time.Now().UnixNano()})
		case t == FramePong:
			// Only the Pong to the Ping after GoAway matters; a malformed
			// one is a violation like any other (PROTOCOL.md §5.1).
			var p h3xpb.Pong
			if err := unmarshalPayload(t, payload, &p); err != nil {
				c.close(CodeProtocolViolation, err.Error())
				return
			}
			if p.GetSequence() == goAwayPingSeq && c.goingAway.Load() {
				c.goAwaySeenAt.CompareAndSwap(0, time.Now().UnixNano())
			}
		case newMessage(t) == nil:
			// Unknown frame types on the control stream are ignored.
		default:
			msg := fmt.Sprintf("%v frame is not allowed on the control stream", t)
			c.writeControl(FrameError, errorToWire(newError(CodeProtocolViolation, "%s", msg), 0))
			c.close(CodeProtocolViolation, msg)
			return
		}
	}
}

// serveStream routes a data stream by its first frame's type.
func (c *serverConn) serveStream(ctx context.Context, st *quic.Stream) {
	fr := c.frameReader(st)
	t, payload, err := fr.next()
	if errors.Is(err, io.EOF) {
		// Finished before any frame: no request, so nothing to answer but
		// the server's own FIN (PROTOCOL.md §5.2, §7.3).
		st.Close()
		return
	}
	if err != nil {
		c.failStream(st, err)
		return
	}
	switch t {
	case FrameSendEvent, FrameFetchEvents, FrameAckEvent, FrameNackEvent, FrameExtendLease:
		ss := newSessionStream(c, st, fr)
		ss.run(ctx, t, payload)
		return
	}
	if h := c.srv.handler(t); h != nil {
		as := &Stream{st: st, fr: fr, sess: c.session, first: true, firstType: t, firstPayload: payload, wmax: c.srv.cfg.maxFrameSize}
		err := c.serveHandler(ctx, h, as, t)
		if err != nil {
			code := CodeInternal
			var e *Error
			if errors.As(err, &e) {
				code = e.Code
			}
			st.CancelRead(quic.StreamErrorCode(code))
			st.CancelWrite(quic.StreamErrorCode(code))
			return
		}
		st.CancelRead(quic.StreamErrorCode(CodeNone))
		st.Close()
		return
	}
	st.CancelRead(quic.StreamErrorCode(CodeUnknownFrameType))
	st.CancelWrite(quic.StreamErrorCode(CodeUnknownFrameType))
}

// serveHandler runs an application handler. A panic in it is the
// handler's failure, not the server's (as in net/http): it is logged with
// its stack and answered as an internal error on that stream alone.
func (c *serverConn) serveHandler(ctx context.Context, h Handler, st *Stream, t FrameType) (err error) {
	defer func() {
		if r := recover(); r != nil {
			c.logger.Error("h3x: panic in a stream handler", "frame_type", t, "panic", r, "stack", string(debug.Stack()))
			err = newError(CodeInternal, "handler failed")
		}
	}()
	return h.ServeStream(ctx, st)
}

// failStream answers a stream-level error: an Error frame, the end of the
// send side, and STOP_SENDING with the error's code.
func (c *serverConn) failStream(st *quic.Stream, err error) {
	var e *Error
	if !errors.As(err, &e) {
		// The stream or connection broke; nothing to answer.
		st.CancelRead(quic.StreamErrorCode(CodeNone))
		st.CancelWrite(quic.StreamErrorCode(CodeNone))
		return
	}
	if buf, merr := appendFrame(nil, FrameError, errorToWire(e, 0)); merr == nil {
		st.SetWriteDeadline(time.Now().Add(5 * time.Second))
		st.Write(buf)
	}
	st.CancelRead(quic.StreamErrorCode(e.Code))
	st.Close()
}

// Handler serves application streams registered with Server.Handle.
type Handler interface {
	// ServeStream serves one stream. The first ReadFrame returns the frame
	// that routed the stream here. Returning nil ends the stream cleanly;
	// returning an error resets it with the error's code (CodeInternal for
	// errors without one). ctx ends with the connection.
	ServeStream(ctx context.Context, s *Stream) error
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, s *Stream) error

// ServeStream calls f(ctx, s).
func (f HandlerFunc) ServeStream(ctx context.Context, s *Stream) error { return f(ctx, s) }

// Stream is an application stream handed to a Handler.
type Stream struct {
	st           *quic.Stream
	fr           *frameReader
	sess         *Session
	first        bool
	firstType    FrameType
	firstPayload []byte
	wbuf         []byte
	wmax         int // the largest payload WriteFrame sends: the frame size the server announces
}

// Session returns the authenticated session the stream belongs to (nil on
// a client's stream).
func (s *Stream) Session() *Session { return s.sess }

// SetReadDeadline makes a blocked or later ReadFrame fail once t passes
// (zero: no deadline). Use it, or context.AfterFunc with it, to bound reads
// by a context.
func (s *Stream) SetReadDeadline(t time.Time) error { return s.st.SetReadDeadline(t) }

// SetWriteDeadline makes a blocked or later WriteFrame fail once t passes.
func (s *Stream) SetWriteDeadline(t time.Time) error { return s.st.SetWriteDeadline(t) }

// CloseWrite finishes the stream's send side: the peer reads io.EOF after
// the frames written so far. If the peer has already stopped reading (a
// handler that answered and returned, or a stream the server refused), it
// returns nil, or the error the peer stopped it with (ErrUnknownFrameType
// for a frame type the server does not serve), as ReadFrame would. If the
// connection has ended, it returns the connection's error.
func (s *Stream) CloseWrite() error {
	err := s.st.Close()
	cause := context.Cause(s.st.Context())
	var se *quic.StreamError
	switch {
	case err != nil && errors.As(cause, &se) && se.Remote:
		// quic-go's Close fails with "close called for canceled stream"
		// once a STOP_SENDING has arrived, which only says that the
		// FIN is not needed.
		if se.ErrorCode == 0 {
			return nil
		}
		return connError(se)
	case err == nil && cause != nil && !errors.Is(cause, quic.ErrStreamClosed):
		// quic-go's Close succeeds, sending nothing, once the connection
		// has shut the stream down.
		return connError(cause)
	}
	return err
}

// Close ends the stream in both directions.
func (s *Stream) Close() error {
	s.st.CancelRead(quic.StreamErrorCode(CodeNone))
	return s.st.Close()
}

// ReadFrame reads the next frame. The payload is valid until the next call.
// It returns io.EOF when the client has finished its side.
func (s *Stream) ReadFrame() (FrameType, []byte, error) {
	if s.first {
		s.first = false
		return s.firstType, s.firstPayload, nil
	}
	t, payload, err := s.fr.next()
	return t, payload, connError(err)
}

// WriteFrame writes one frame. A payload larger than the server's maximum
// frame size (the one it announces to clients) is not sent: WriteFrame
// returns an error matching ErrFrameTooLarge, and the stream stays usable.
func (s *Stream) WriteFrame(t FrameType, payload []byte) error {
	if s.wmax > 0 && len(payload) > s.wmax {
		return &Error{Code: CodeFrameTooLarge, Message: fmt.Sprintf("%v frame of %d bytes exceeds the maximum frame size of %d", t, len(payload), s.wmax)}
	}
	s.wbuf = appendRawFrame(s.wbuf[:0], t, payload)
	_, err := s.st.Write(s.wbuf)
	return err
}
