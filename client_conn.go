package h3x

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// clientConn is one authenticated QUIC connection of a Client.
type clientConn struct {
	client   *Client
	qc       *quic.Conn
	tr       *quic.Transport
	udp      net.PacketConn // owned, if the client opened it
	ctrl     *quic.Stream
	ctrlMu   sync.Mutex
	auth     *h3xpb.AuthResult
	wg       sync.WaitGroup
	goAway   atomic.Bool
	goAwayCh chan struct{} // closed on GoAway
	// reconnectAfter is the GoAway's reconnect_after_ms, in nanoseconds:
	// the least wait before reconnecting (PROTOCOL.md §3.4).
	reconnectAfter atomic.Int64
	inflight       atomic.Int64 // calls in progress on this connection
	closeOnce      sync.Once
	pingMu         sync.Mutex
	pings          map[uint64]chan time.Time
	pingSeq        uint64
	streamsMu      sync.Mutex
	streams        [3]*rpcStream // publish and settle (the fetch slot is unused)
	idleFetch      []*rpcStream  // fetch streams with no long poll in flight
}

const (
	streamPublish = iota
	streamFetch
	streamSettle
)

func (c *Client) connect(ctx context.Context) (*clientConn, error) {
	udpAddr, err := net.ResolveUDPAddr("udp", c.addr)
	if err != nil {
		return nil, fmt.Errorf("h3x: resolving %q: %w", c.addr, err)
	}
	cc := &clientConn{client: c, pings: make(map[uint64]chan time.Time), goAwayCh: make(chan struct{})}
	pc := c.cfg.packetConn
	if pc == nil {
		u, err := net.ListenUDP("udp", nil)
		if err != nil {
			return nil, fmt.Errorf("h3x: opening a UDP socket: %w", err)
		}
		pc, cc.udp = u, u
	}
	cc.tr = &quic.Transport{Conn: pc}
	qconf := &quic.Config{
		HandshakeIdleTimeout:  10 * time.Second,
		MaxIdleTimeout:        c.cfg.idleTimeout,
		KeepAlivePeriod:       c.cfg.idleTimeout / 3,
		MaxIncomingStreams:    -1,
		MaxIncomingUniStreams: -1,
	}
	qc, err := cc.tr.Dial(ctx, udpAddr, c.cfg.tlsFor(c.addr), qconf)
	if err != nil {
		cc.closeTransport()
		return nil, fmt.Errorf("h3x: connecting to %s: %w", c.addr, connError(err))
	}
	cc.qc = qc
	if err := cc.authenticate(ctx); err != nil {
		qc.CloseWithError(0, "")
		cc.closeTransport()
		return nil, err
	}
	cc.wg.Add(1)
	go func() {
		defer cc.wg.Done()
		cc.controlLoop()
	}()
	return cc, nil
}

func (cc *clientConn) closeTransport() {
	if cc.tr != nil {
		cc.tr.Close()
	}
	if cc.udp != nil {
		cc.udp.Close()
	}
}

// connError turns the end of a QUIC connection into an H3X error.
func connError(err error) error {
	var ae *quic.ApplicationError
	if errors.As(err, &ae) && ae.ErrorCode != 0 {
		return &Error{Code: ErrorCode(ae.ErrorCode), Message: ae.ErrorMessage, Remote: ae.Remote, cause: err}
	}
	var te *quic.TransportError
	if errors.As(err, &te) && te.Remote && te.ErrorCode == quic.ConnectionRefused {
		// The server's admission control refused the attempt before the
		// handshake (rate or connection limits): retryable.
		return &Error{Code: CodeTooManyConnections, Message: "connection refused", Remote: true, cause: err}
	}
	var se *quic.StreamError
	if errors.As(err, &se) && se.ErrorCode != 0 {
		return &Error{Code: ErrorCode(se.ErrorCode), Message: "stream reset", Remote: se.Remote, cause: err}
	}
	return err
}

func (cc *clientConn) authenticate(ctx context.Context) error {
	st, err := cc.qc.OpenStreamSync(ctx)
	if err != nil {
		return fmt.Errorf("h3x: opening the control stream: %w", connError(err))
	}
	cc.ctrl = st
	cfg := &cc.client.cfg
	buf, err := appendFrame(nil, FrameAuth, &h3xpb.Auth{ClientId: cfg.clientID, Token: cfg.token, Namespaces: cfg.namespaces, ClientName: "h3x-go"})
	if err != nil {
		return err
	}
	if _, err := st.Write(buf); err != nil {
		return fmt.Errorf("h3x: sending Auth: %w", connError(err))
	}
	stop := context.AfterFunc(ctx, func() { st.SetReadDeadline(time.Now()) })
	defer stop()
	var res h3xpb.AuthResult
	fr := newFrameReader(st, uint32(cfg.maxFrameSize))
	if err := fr.readMessage(FrameAuthResult, &res); err != nil {
		var e *Error
		if errors.As(err, &e) {
			return e
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		// The server may be closing the connection with a code: wait a
		// moment for it (a server that ends the control stream and keeps
		// the connection open gets no longer).
		t := time.NewTimer(authCloseWait)
		defer t.Stop()
		select {
		case <-cc.qc.Context().Done():
			if cause := context.Cause(cc.qc.Context()); cause != nil {
				return fmt.Errorf("h3x: authenticating: %w", connError(cause))
			}
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		return fmt.Errorf("h3x: authenticating: %w", err)
	}
	cc.auth = &res
	return nil
}

// authCloseWait is how long authentication waits, after the control stream
// ended without an AuthResult, for the server's close of the connection
// and its error code.
const authCloseWait = time.Second

// controlLoop reads the control stream: Pong, GoAway, RateLimitNotice, Error.
func (cc *clientConn) controlLoop() {
	fr := newFrameReader(cc.ctrl, uint32(cc.client.cfg.maxFrameSize))
	for {
		t, payload, err := fr.next()
		if err != nil {
			return
		}
		switch t {
		case FramePong:
			var p h3xpb.Pong
			if unmarshalPayload(t, payload, &p) == nil {
				cc.pingMu.Lock()
				ch := cc.pings[p.GetSequence()]
				delete(cc.pings, p.GetSequence())
				cc.pingMu.Unlock()
				if ch != nil {
					ch <- time.Now()
				}
			}
		case FramePing:
			var p h3xpb.Ping
			if unmarshalPayload(t, payload, &p) == nil {
				cc.writeControl(FramePong, &h3xpb.Pong{Sequence: p.GetSequence(), PingSentUnixNano: p.GetSentUnixNano(), SentUnixNano: time.Now().UnixNano()})
			}
		case FrameGoAway:
			var g h3xpb.GoAway
			if unmarshalPayload(t, payload, &g) == nil {
				cc.reconnectAfter.Store(int64(time.Duration(g.GetReconnectAfterMs()) * time.Millisecond))
			}
			if cc.goAway.CompareAndSwap(false, true) {
				close(cc.goAwayCh)
			}
			cc.client.logger.Info("h3x: server is going away")
		case FrameRateLimitNotice:
			var n h3xpb.RateLimitNotice
			if unmarshalPayload(t, payload, &n) == nil {
				cc.client.logger.Debug("h3x: rate limited", "namespace", n.GetNamespace(), "retry_after_ms", n.GetRetryAfterMs())
				cc.client.rateLimited(n.GetNamespace(), time.Duration(n.GetRetryAfterMs())*time.Millisecond)
			}
		case FrameError:
			var e h3xpb.Error
			if unmarshalPayload(t, payload, &e) == nil {
				cc.client.logger.Warn("h3x: server error", "err", errorFromWire(&e))
			}
		}
	}
}

func (cc *clientConn) writeControl(t FrameType, m proto.Message) error {
	buf, err := appendFrame(nil, t, m)
	if err != nil {
		return err
	}
	cc.ctrlMu.Lock()
	defer cc.ctrlMu.Unlock()
	_, err = cc.ctrl.Write(buf)
	return connError(err)
}

// stream returns the connection's rpc stream of the given kind, opening it
// on first use.
func (cc *clientConn) stream(ctx context.Context, kind int) (*rpcStream, error) {
	cc.streamsMu.Lock()
	defer cc.streamsMu.Unlock()
	if s := cc.streams[kind]; s != nil && s.alive() {
		return s, nil
	}
	s, err := cc.openRPC(ctx)
	if err != nil {
		return nil, err
	}
	cc.streams[kind] = s
	return s, nil
}

// openRPC opens a stream for requests and starts its reader.
func (cc *clientConn) openRPC(ctx context.Context) (*rpcStream, error) {
	st, err := cc.qc.OpenStreamSync(ctx)
	if err != nil {
		return nil, connError(err)
	}
	s := newRPCStream(st, uint32(cc.client.cfg.maxFrameSize))
	cc.wg.Add(1)
	go func() {
		defer cc.wg.Done()
		s.readLoop()
	}()
	return s, nil
}

// fetchStream takes a fetch stream with no long poll in flight, opening one
// if there is none. Each long poll has a stream to itself, so a poll that
// its caller abandons can be cancelled (by resetting its stream) without
// holding up the fetches after it.
func (cc *clientConn) fetchStream(ctx context.Context) (*rpcStream, error) {
	cc.streamsMu.Lock()
	for len(cc.idleFetch) > 0 {
		s := cc.idleFetch[len(cc.idleFetch)-1]
		cc.idleFetch = cc.idleFetch[:len(cc.idleFetch)-1]
		if s.alive() {
			cc.streamsMu.Unlock()
			return s, nil
		}
	}
	cc.streamsMu.Unlock()
	s, err := cc.openRPC(ctx)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// putFetchStream returns a fetch stream after its poll was answered.
func (cc *clientConn) putFetchStream(s *rpcStream) {
	cc.streamsMu.Lock()
	defer cc.streamsMu.Unlock()
	if len(cc.idleFetch) < 4 {
		cc.idleFetch = append(cc.idleFetch, s)
		return
	}
	s.finish()
}

// closeWriteWait bounds how long closing a connection waits for the
// writes in progress on its streams.
const closeWriteWait = time.Second

// close ends the connection: it finishes the streams' send sides, closes
// the connection and waits for the connection's goroutines.
func (cc *clientConn) close() {
	cc.closeOnce.Do(cc.doClose)
}

func (cc *clientConn) doClose() {
	cc.streamsMu.Lock()
	// A write the server's flow control holds back ends within
	// closeWriteWait (the connection is closed only after the writes).
	deadline := time.Now().Add(closeWriteWait)
	for _, s := range cc.streams {
		if s != nil {
			s.st.SetWriteDeadline(deadline)
			s.fw.close()
		}
	}
	for _, s := range cc.idleFetch {
		s.st.SetWriteDeadline(deadline)
		s.fw.close()
	}
	cc.streamsMu.Unlock()
	cc.qc.CloseWithError(0, "client closed")
	cc.wg.Wait()
	cc.closeTransport()
}

// rpcStream carries requests and their answers, matched by request_id.
// Writes from concurrent callers are coalesced by a frameWriter.
type rpcStream struct {
	st      *quic.Stream
	fr      *frameReader
	fw      *frameWriter
	mu      sync.Mutex
	pending map[uint64]pendingCall
	err     error // set when the stream has failed
}

type rpcAnswer struct {
	t   FrameType
	msg proto.Message // nil for an EventsBatch: see ds
	err error

	// ds is an EventsBatch's deliveries, decoded by the stream's reader
	// (decodeDeliveries); the caller sets their client and subscription
	// (Client.own).
	ds []*Delivery

	rest []*Delivery // set by a subscription's hook: deliveries it could not hand out
}

// pendingCall is a request waiting for its answer.
type pendingCall struct {
	ch   chan rpcAnswer
	want FrameType // the answer's frame type (answerTo the request's)
	// before, if set, runs with a successful answer before it is sent on
	// ch (a subscription hands out its deliveries there). It runs in the
	// stream's hand-off goroutine, in answer order, not in the reader: a
	// before that waits for the application must not stop the stream from
	// being read, or its unread batches fill the connection's flow-control
	// window and hold up every other stream, the control stream included.
	// (What is read is bounded by the polls' credits.)
	before func(*rpcAnswer)
}

// errWrongAnswer marks an answer of the wrong type: a fault of the server,
// which a retry would not mend.
var errWrongAnswer = errors.New("h3x: wrong answer")

// answerTo returns the frame type that answers a request of type t.
func answerTo(t FrameType) FrameType {
	switch t {
	case FrameSendEvent:
		return FrameSendResult
	case FrameFetchEvents:
		return FrameEventsBatch
	default: // AckEvent, NackEvent, ExtendLease
		return FrameAckResult
	}
}

func newRPCStream(st *quic.Stream, maxFrame uint32) *rpcStream {
	return &rpcStream{st: st, fr: newFrameReader(st, maxFrame), fw: newFrameWriter(st), pending: make(map[uint64]pendingCall)}
}

// abort resets the stream in both directions (the server ends what it was
// doing for it).
func (s *rpcStream) abort() {
	s.resetWrite()
	s.st.CancelRead(quic.StreamErrorCode(CodeNone))
}

// resetWrite resets the stream's send side only: the server answers what
// is pending and ends its side.
func (s *rpcStream) resetWrite() {
	s.fw.close()
	s.st.CancelWrite(quic.StreamErrorCode(CodeNone))
}

// finish ends the stream's send side; the server answers what is pending
// and ends its side, which ends readLoop.
func (s *rpcStream) finish() {
	s.fw.close()
	s.st.Close()
}

func (s *rpcStream) alive() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err == nil
}

// call sends a request and waits for its answer or the end of ctx.
func (s *rpcStream) call(ctx context.Context, id uint64, t FrameType, m proto.Message) (rpcAnswer, error) {
	ch, err := s.start(ctx, id, t, m, nil)
	if err != nil {
		return rpcAnswer{}, err
	}
	select {
	case a := <-ch:
		return a, a.err
	case <-ctx.Done():
		s.forget(id)
		return rpcAnswer{}, ctx.Err()
	}
}

// start sends a request and returns the channel its answer (or the
// stream's failure) will arrive on; before, if not nil, runs first (see
// pendingCall).
func (s *rpcStream) start(ctx context.Context, id uint64, t FrameType, m proto.Message, before func(*rpcAnswer)) (<-chan rpcAnswer, error) {
	ch := make(chan rpcAnswer, 1)
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return nil, s.err
	}
	s.pending[id] = pendingCall{ch: ch, want: answerTo(t), before: before}
	s.mu.Unlock()
	if err := s.fw.writeCtx(ctx, t, m); err != nil {
		s.forget(id)
		if s.fw.failed() {
			// The stream's send side is broken (an interrupted write may
			// have sent part of a frame): end it, so that its calls fail
			// over and the next ones open another stream.
			s.abort()
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if errors.Is(err, errUnencodable) {
			return nil, err // not the stream's fault: not retried
		}
		return nil, fmt.Errorf("%w: %w", errStreamFailed, connError(err))
	}
	return ch, nil
}

func (s *rpcStream) forget(id uint64) {
	s.mu.Lock()
	delete(s.pending, id)
	s.mu.Unlock()
}

// decodeAnswer decodes an answer frame into its request id and the answer
// for its caller, or returns the failure that ends the stream.
func decodeAnswer(t FrameType, payload []byte) (uint64, rpcAnswer, error) {
	if t == FrameEventsBatch {
		// Straight into deliveries, without the messages in between.
		id, ds, err := decodeDeliveries(payload)
		if err != nil {
			return 0, rpcAnswer{}, malformedPayload(t)
		}
		return id, rpcAnswer{t: t, ds: ds}, nil
	}
	msg, err := decodeFrame(t, payload)
	if err != nil {
		return 0, rpcAnswer{}, err
	}
	switch m := msg.(type) {
	case *h3xpb.SendResult:
		return m.GetRequestId(), rpcAnswer{t: t, msg: m}, nil
	case *h3xpb.AckResult:
		return m.GetRequestId(), rpcAnswer{t: t, msg: m}, nil
	case *h3xpb.Error:
		ans := rpcAnswer{t: t, err: errorFromWire(m)}
		if m.GetRequestId() == 0 {
			return 0, ans, fmt.Errorf("%w: %w", errStreamFailed, ans.err)
		}
		return m.GetRequestId(), ans, nil
	}
	return 0, rpcAnswer{}, newError(CodeProtocolViolation, "unexpected %v frame", t)
}

// readLoop delivers answers to their callers until the stream ends; then it
// fails every pending call.
func (s *rpcStream) readLoop() {
	var failure error
	var handoff chan func() // answers with a before hook, in order
	var handoffDone chan struct{}
	for {
		t, payload, err := s.fr.next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("h3x: stream closed by the server")
			}
			failure = fmt.Errorf("%w: %w", errStreamFailed, connError(err))
			break
		}
		var id uint64
		var ans rpcAnswer
		if id, ans, failure = decodeAnswer(t, payload); failure != nil {
			break
		}
		s.mu.Lock()
		p, ok := s.pending[id]
		delete(s.pending, id)
		s.mu.Unlock()
		if ok {
			if ans.err == nil && ans.t != p.want {
				// Answers are matched by request id alone.
				ans = rpcAnswer{t: ans.t, err: fmt.Errorf("%w: %w", errWrongAnswer,
					newError(CodeProtocolViolation, "the server answered with a %v where a %v was due", ans.t, p.want))}
			}
			if p.before != nil && ans.err == nil {
				if handoff == nil {
					handoff = make(chan func(), 8)
					handoffDone = make(chan struct{})
					go func() {
						defer close(handoffDone)
						for f := range handoff {
							f()
						}
					}()
				}
				handoff <- func() {
					p.before(&ans)
					p.ch <- ans
				}
				continue
			}
			p.ch <- ans
		}
	}
	if handoff != nil {
		close(handoff)
		<-handoffDone
	}
	s.mu.Lock()
	s.err = failure
	pending := s.pending
	s.pending = nil
	s.mu.Unlock()
	for _, p := range pending {
		p.ch <- rpcAnswer{err: failure}
	}
	s.fw.close()
	var e *Error
	if !errors.Is(failure, errStreamFailed) && errors.As(failure, &e) && !e.Remote {
		// The server sent what it must not (an unexpected or malformed
		// frame): reset the stream with the violation's code (PROTOCOL.md
		// §5.2).
		s.st.CancelWrite(quic.StreamErrorCode(e.Code))
		s.st.CancelRead(quic.StreamErrorCode(e.Code))
		return
	}
	s.st.CancelRead(quic.StreamErrorCode(CodeNone))
}

// errStreamFailed marks a call that failed because its stream or
// connection did, not because the server refused it.
var errStreamFailed = errors.New("h3x: stream failed")

// call sends one request on the connection's stream of kind and waits for
// its answer.
func (cc *clientConn) call(ctx context.Context, kind int, t FrameType, build func(id uint64) proto.Message) (rpcAnswer, error) {
	cc.inflight.Add(1)
	defer cc.inflight.Add(-1)
	if kind == streamFetch {
		return cc.fetchCall(ctx, t, build)
	}
	s, err := cc.stream(ctx, kind)
	if err != nil {
		return rpcAnswer{}, fmt.Errorf("%w: %w", errStreamFailed, err)
	}
	id := cc.client.reqID.Add(1)
	return s.call(ctx, id, t, build(id))
}

// fetchCall runs one long poll on a stream of its own, which is reused once
// the poll is answered or refused (the stream goes on after an Error that
// names its request, PROTOCOL.md §5.2). If ctx ends first, the poll is
// abandoned as a subscription abandons its polls: the stream's send side is
// reset, so the server ends the poll at once, and a batch it had already
// sent is read and given back unseen (giveBackAbandoned) instead of staying
// leased until its deadline.
func (cc *clientConn) fetchCall(ctx context.Context, t FrameType, build func(id uint64) proto.Message) (rpcAnswer, error) {
	if err := ctx.Err(); err != nil {
		return rpcAnswer{}, err // before taking a stream
	}
	s, err := cc.fetchStream(ctx)
	if err != nil {
		return rpcAnswer{}, fmt.Errorf("%w: %w", errStreamFailed, err)
	}
	id := cc.client.reqID.Add(1)
	ch, err := s.start(ctx, id, t, build(id), nil)
	if err != nil {
		// Nothing was sent if the stream is still whole (start resets one
		// a write broke): it goes back to the pool, else it is ended.
		if s.alive() && !s.fw.failed() {
			cc.putFetchStream(s)
		} else {
			s.abort()
		}
		return rpcAnswer{}, err
	}
	select {
	case a := <-ch:
		if a.err == nil || (refused(a.err) && s.alive()) {
			cc.putFetchStream(s)
		} else {
			s.abort()
		}
		return a, a.err
	case <-ctx.Done():
		s.resetWrite()
		if !cc.client.goOwned(func() { cc.giveBackAbandoned(s, ch) }) {
			s.abort()
		}
		return rpcAnswer{}, ctx.Err()
	}
}

// refused reports whether err is the server's refusal of one request (an
// Error naming it), after which its stream goes on.
func refused(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Remote && !errors.Is(err, errStreamFailed) && !errors.Is(err, errWrongAnswer)
}

// giveBackAbandoned waits (a second at most) for the answer to an abandoned
// poll on s, whose send side is reset, nacks the deliveries of a batch
// unseen (their attempts do not count), and ends the stream.
func (cc *clientConn) giveBackAbandoned(s *rpcStream, ch <-chan rpcAnswer) {
	defer s.abort()
	t := time.NewTimer(time.Second)
	defer t.Stop()
	var a rpcAnswer
	select {
	case a = <-ch:
	case <-t.C:
		return
	case <-cc.qc.Context().Done():
		return // the connection is gone: the server ended its leases
	}
	if a.t == FrameEventsBatch && a.err == nil {
		cc.client.giveBackUnseen(context.Background(), cc.client.own(a.ds, nil), "fetch abandoned")
	}
}

// ping measures the round trip of a Ping on the control stream.
func (cc *clientConn) ping(ctx context.Context) (time.Duration, error) {
	ch := make(chan time.Time, 1)
	cc.pingMu.Lock()
	cc.pingSeq++
	seq := cc.pingSeq
	cc.pings[seq] = ch
	cc.pingMu.Unlock()
	defer func() {
		cc.pingMu.Lock()
		delete(cc.pings, seq)
		cc.pingMu.Unlock()
	}()
	start := time.Now()
	if err := cc.writeControl(FramePing, &h3xpb.Ping{Sequence: seq, SentUnixNano: start.UnixNano()}); err != nil {
		return 0, err
	}
	select {
	case at := <-ch:
		return at.Sub(start), nil
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-cc.qc.Context().Done():
		return 0, connError(context.Cause(cc.qc.Context()))
	}
}

// drainAndClose closes a replaced connection once its calls in flight have
// finished (after a GoAway) or at once if it is already gone, waiting at
// most 10 s.
func (cc *clientConn) drainAndClose(ctx context.Context) {
	deadline := time.Now().Add(10 * time.Second)
	for cc.inflight.Load() > 0 && cc.qc.Context().Err() == nil && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(5 * time.Millisecond)
	}
	cc.close()
}
