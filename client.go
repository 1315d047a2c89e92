package h3x

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/quic-go/quic-go"
	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

type clientConfig struct {
	clientID     string
	token        string
	namespaces   []string
	tlsConfig    *tls.Config
	rootCAs      *x509.CertPool
	fingerprint  string
	insecure     bool
	logger       *slog.Logger
	maxFrameSize int
	packetConn   net.PacketConn
	idleTimeout  time.Duration
}

func defaultClientConfig() clientConfig {
	return clientConfig{
		maxFrameSize: DefaultMaxFrameSize,
		idleTimeout:  DefaultIdleTimeout,
	}
}

func (c *clientConfig) validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf("h3x: "+format, args...)) }
	if c.clientID == "" {
		bad("WithCredentials: a client id is required")
	}
	n := 0
	for _, set := range []bool{c.tlsConfig != nil, c.fingerprint != "", c.insecure} {
		if set {
			n++
		}
	}
	if n > 1 {
		bad("WithTLSConfig, WithTrustedFingerprint and WithInsecureSkipVerify are mutually exclusive")
	}
	if c.rootCAs != nil && (c.tlsConfig != nil || c.fingerprint != "" || c.insecure) {
		bad("WithRootCAs cannot be combined with WithTLSConfig, WithTrustedFingerprint or WithInsecureSkipVerify")
	}
	if c.fingerprint != "" {
		if err := pinnedVerifier(c.fingerprint)([][]byte{nil}, nil); err != nil && !errors.Is(err, errUntrustedCert) {
			bad("WithTrustedFingerprint: %v", err)
		}
	}
	if c.maxFrameSize < 1024 || c.maxFrameSize > 64<<20 {
		bad("max frame size must be between 1 KiB and 64 MiB, got %d", c.maxFrameSize)
	}
	for _, ns := range c.namespaces {
		if err := ValidateNamespace(ns); err != nil {
			bad("WithNamespaces: %q: %v", ns, err)
		}
	}
	return errors.Join(errs...)
}

// WithCredentials sets the client id and token the client authenticates
// with. Required.
func WithCredentials(clientID, token string) ClientOption {
	return clientOptionFunc(func(c *clientConfig) { c.clientID, c.token = clientID, token })
}

// WithNamespaces restricts the session to these namespaces (each must be
// granted) and makes them the default of Fetch. Default: none, that is every
// namespace the grants allow, with Fetch reading the explicitly granted ones.
func WithNamespaces(namespaces ...string) ClientOption {
	return clientOptionFunc(func(c *clientConfig) { c.namespaces = append([]string(nil), namespaces...) })
}

// WithTrustedFingerprint makes the client accept exactly the server
// certificate whose SHA-256 is fp (hex, as Server.Fingerprint returns it;
// ':' separators allowed), such as a server's self-signed development
// certificate. Default: certificates are verified against the system roots.
func WithTrustedFingerprint(fp string) ClientOption {
	return clientOptionFunc(func(c *clientConfig) { c.fingerprint = fp })
}

// WithInsecureSkipVerify makes the client accept any server certificate.
// For development only: it gives up protection against impostors. Default off.
func WithInsecureSkipVerify() ClientOption {
	return clientOptionFunc(func(c *clientConfig) { c.insecure = true })
}

// WithRootCAs verifies the server's certificate against pool instead of the
// system roots. Default: the system roots.
func WithRootCAs(pool *x509.CertPool) ClientOption {
	return clientOptionFunc(func(c *clientConfig) { c.rootCAs = pool })
}

func (c *clientConfig) tlsFor(addr string) *tls.Config {
	var conf *tls.Config
	if c.tlsConfig != nil {
		conf = c.tlsConfig.Clone()
	} else {
		conf = &tls.Config{RootCAs: c.rootCAs}
		if c.fingerprint != "" {
			conf.InsecureSkipVerify = true
			conf.VerifyPeerCertificate = pinnedVerifier(c.fingerprint)
		}
		if c.insecure {
			conf.InsecureSkipVerify = true
		}
	}
	if conf.ServerName == "" {
		if host, _, err := net.SplitHostPort(addr); err == nil {
			conf.ServerName = host
		}
	}
	conf.NextProtos = []string{ALPN}
	conf.MinVersion = tls.VersionTLS13
	return conf
}

// Client is a connection to an H3X server. Its methods are safe for
// concurrent use.
type Client struct {
	cfg    clientConfig
	addr   string
	logger *slog.Logger
	cc     *clientConn
	reqID  atomic.Uint64

	closeOnce sync.Once
	closed    chan struct{}
}

// Dial connects to the server at addr, authenticates and returns the
// client. It fails with an error matching ErrUnauthenticated or
// ErrPermissionDenied when the server refuses the credentials or a
// namespace.
func Dial(ctx context.Context, addr string, opts ...ClientOption) (*Client, error) {
	cfg := defaultClientConfig()
	for _, o := range opts {
		o.applyClient(&cfg)
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	c := &Client{cfg: cfg, addr: addr, logger: cfg.logger, closed: make(chan struct{})}
	if c.logger == nil {
		c.logger = slog.New(slog.DiscardHandler)
	}
	cc, err := c.connect(ctx)
	if err != nil {
		return nil, err
	}
	c.cc = cc
	return c, nil
}

// clientConn is one authenticated QUIC connection of a Client.
type clientConn struct {
	client    *Client
	qc        *quic.Conn
	tr        *quic.Transport
	udp       net.PacketConn // owned, if the client opened it
	ctrl      *quic.Stream
	ctrlMu    sync.Mutex
	auth      *h3xpb.AuthResult
	wg        sync.WaitGroup
	goAway    atomic.Bool
	pingMu    sync.Mutex
	pings     map[uint64]chan time.Time
	pingSeq   uint64
	streamsMu sync.Mutex
	streams   [3]*rpcStream // publish, fetch, settle
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
	cc := &clientConn{client: c, pings: make(map[uint64]chan time.Time)}
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
		return nil, fmt.Errorf("h3x: connecting to %s: %w", c.addr, err)
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
		// The server may have closed the connection with a code.
		<-cc.qc.Context().Done()
		if cause := context.Cause(cc.qc.Context()); cause != nil {
			return fmt.Errorf("h3x: authenticating: %w", connError(cause))
		}
		return fmt.Errorf("h3x: authenticating: %w", err)
	}
	cc.auth = &res
	return nil
}

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
			cc.goAway.Store(true)
			cc.client.logger.Info("h3x: server is going away")
		case FrameRateLimitNotice:
			var n h3xpb.RateLimitNotice
			if unmarshalPayload(t, payload, &n) == nil {
				cc.client.logger.Debug("h3x: rate limited", "namespace", n.GetNamespace(), "retry_after_ms", n.GetRetryAfterMs())
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
	st, err := cc.qc.OpenStreamSync(ctx)
	if err != nil {
		return nil, connError(err)
	}
	s := newRPCStream(st, uint32(cc.client.cfg.maxFrameSize))
	cc.wg.Add(2)
	go func() {
		defer cc.wg.Done()
		s.fw.run()
	}()
	go func() {
		defer cc.wg.Done()
		s.readLoop()
	}()
	cc.streams[kind] = s
	return s, nil
}

// close ends the connection: it finishes the streams' send sides, closes
// the connection and waits for the connection's goroutines.
func (cc *clientConn) close() {
	cc.streamsMu.Lock()
	for _, s := range cc.streams {
		if s != nil {
			s.fw.close()
		}
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
	pending map[uint64]chan rpcAnswer
	err     error // set when the stream has failed
}

type rpcAnswer struct {
	t   FrameType
	msg proto.Message
	err error
}

func newRPCStream(st *quic.Stream, maxFrame uint32) *rpcStream {
	return &rpcStream{st: st, fr: newFrameReader(st, maxFrame), fw: newFrameWriter(st), pending: make(map[uint64]chan rpcAnswer)}
}

func (s *rpcStream) alive() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err == nil
}

// call sends a request and waits for its answer or the end of ctx.
func (s *rpcStream) call(ctx context.Context, id uint64, t FrameType, m proto.Message) (rpcAnswer, error) {
	ch := make(chan rpcAnswer, 1)
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return rpcAnswer{}, s.err
	}
	s.pending[id] = ch
	s.mu.Unlock()
	if err := s.fw.write(t, m); err != nil {
		s.forget(id)
		return rpcAnswer{}, connError(err)
	}
	select {
	case a := <-ch:
		return a, a.err
	case <-ctx.Done():
		s.forget(id)
		return rpcAnswer{}, ctx.Err()
	}
}

func (s *rpcStream) forget(id uint64) {
	s.mu.Lock()
	delete(s.pending, id)
	s.mu.Unlock()
}

// readLoop delivers answers to their callers until the stream ends; then it
// fails every pending call.
func (s *rpcStream) readLoop() {
	var failure error
	for {
		t, payload, err := s.fr.next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("h3x: stream closed by the server")
			}
			failure = connError(err)
			break
		}
		msg, err := decodeFrame(t, payload)
		if err != nil {
			failure = err
			break
		}
		var id uint64
		var ans rpcAnswer
		switch m := msg.(type) {
		case *h3xpb.SendResult:
			id, ans = m.GetRequestId(), rpcAnswer{t: t, msg: m}
		case *h3xpb.EventsBatch:
			id, ans = m.GetRequestId(), rpcAnswer{t: t, msg: m}
		case *h3xpb.AckResult:
			id, ans = m.GetRequestId(), rpcAnswer{t: t, msg: m}
		case *h3xpb.Error:
			id, ans = m.GetRequestId(), rpcAnswer{t: t, err: errorFromWire(m)}
			if id == 0 {
				failure = ans.err
			}
		default:
			failure = newError(CodeProtocolViolation, "unexpected %v frame", t)
		}
		if failure != nil {
			break
		}
		s.mu.Lock()
		ch := s.pending[id]
		delete(s.pending, id)
		s.mu.Unlock()
		if ch != nil {
			ch <- ans
		}
	}
	s.mu.Lock()
	s.err = failure
	pending := s.pending
	s.pending = nil
	s.mu.Unlock()
	for _, ch := range pending {
		ch <- rpcAnswer{err: failure}
	}
	s.fw.close()
	s.st.CancelRead(quic.StreamErrorCode(CodeNone))
}

// conn returns the current connection, or ErrClosed.
func (c *Client) conn() (*clientConn, error) {
	select {
	case <-c.closed:
		return nil, ErrClosed
	default:
	}
	return c.cc, nil
}

func (c *Client) call(ctx context.Context, kind int, t FrameType, id uint64, m proto.Message) (rpcAnswer, error) {
	cc, err := c.conn()
	if err != nil {
		return rpcAnswer{}, err
	}
	s, err := cc.stream(ctx, kind)
	if err != nil {
		return rpcAnswer{}, err
	}
	return s.call(ctx, id, t, m)
}

// Publish stores events and returns one result per event, in order, once
// every stored event is durable. Events without an ID get a UUIDv4 here,
// before the first send, so a retry is deduplicated by the server. Events
// refused by the server (permission, rate limit, full queue) have status
// PublishRefused and an *Error in Err; the returned error is for failures
// of the whole call.
func (c *Client) Publish(ctx context.Context, events ...Event) ([]PublishResult, error) {
	id := c.reqID.Add(1)
	m := &h3xpb.SendEvent{RequestId: id, Events: make([]*h3xpb.EventPayload, len(events))}
	for i := range events {
		if events[i].ID == "" {
			events[i].ID = uuid.NewString()
		}
		m.Events[i] = eventToWire(&events[i])
	}
	ans, err := c.call(ctx, streamPublish, FrameSendEvent, id, m)
	if err != nil {
		return nil, err
	}
	res := ans.msg.(*h3xpb.SendResult)
	if len(res.GetOutcomes()) != len(events) {
		return nil, newError(CodeProtocolViolation, "SendResult has %d outcomes for %d events", len(res.GetOutcomes()), len(events))
	}
	out := make([]PublishResult, len(events))
	for i, o := range res.GetOutcomes() {
		out[i] = PublishResult{ID: o.GetId(), Status: PublishStatus(o.GetStatus())}
		if o.GetStatus() == h3xpb.PublishStatus_PUBLISH_STATUS_REFUSED {
			out[i].Err = &Error{Code: ErrorCode(o.GetCode()), Message: o.GetMessage(), RetryAfter: time.Duration(o.GetRetryAfterMs()) * time.Millisecond, Remote: true}
		}
	}
	return out, nil
}

// Delivery is one delivery of an event to this client: the event, its
// attempt number and its lease deadline. Settle it with Client.Ack,
// Client.Nack or Client.Extend.
type Delivery struct {
	Event    Event
	Attempt  int       // 1 for the first delivery
	Deadline time.Time // the lease ends then unless acked, nacked or extended
}

// Fetch waits until at least one event is ready in namespaces (default: the
// namespaces of WithNamespaces, or the client's explicit consume grants) and
// returns up to max of them, leased to this connection until their
// deadline. It returns ctx's error if ctx ends first.
func (c *Client) Fetch(ctx context.Context, max int, namespaces ...string) ([]*Delivery, error) {
	if max <= 0 {
		return nil, newError(CodeInvalidArgument, "Fetch: max must be positive")
	}
	if len(namespaces) == 0 {
		namespaces = c.cfg.namespaces
	}
	for {
		wait := DefaultMaxFetchWait
		if dl, ok := ctx.Deadline(); ok {
			wait = min(wait, time.Until(dl)-10*time.Millisecond)
		}
		if wait < 0 {
			wait = 0
		}
		id := c.reqID.Add(1)
		m := &h3xpb.FetchEvents{RequestId: id, Namespaces: namespaces, Limit: uint32(max), MaxWaitMs: durationMs(wait)}
		ans, err := c.call(ctx, streamFetch, FrameFetchEvents, id, m)
		if err != nil {
			return nil, err
		}
		batch := ans.msg.(*h3xpb.EventsBatch)
		if len(batch.GetEvents()) > 0 {
			out := make([]*Delivery, len(batch.GetEvents()))
			for i, d := range batch.GetEvents() {
				out[i] = &Delivery{Event: eventFromWire(d.GetEvent()), Attempt: int(d.GetAttempt()), Deadline: time.UnixMilli(d.GetLeaseDeadlineMs())}
			}
			return out, nil
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if wait == 0 {
			return nil, context.DeadlineExceeded
		}
	}
}

func refsOf(ds []*Delivery) (ids []string, attempts []uint32, namespaces []string) {
	ids = make([]string, len(ds))
	attempts = make([]uint32, len(ds))
	namespaces = make([]string, len(ds))
	for i, d := range ds {
		ids[i], attempts[i], namespaces[i] = d.Event.ID, uint32(d.Attempt), d.Event.Namespace
	}
	return
}

func (c *Client) settle(ctx context.Context, t FrameType, build func(id uint64) proto.Message) ([]SettleResult, error) {
	id := c.reqID.Add(1)
	ans, err := c.call(ctx, streamSettle, t, id, build(id))
	if err != nil {
		return nil, err
	}
	res := ans.msg.(*h3xpb.AckResult)
	out := make([]SettleResult, len(res.GetOutcomes()))
	for i, o := range res.GetOutcomes() {
		out[i] = SettleResult{ID: o.GetId(), Status: SettleStatus(o.GetStatus())}
	}
	return out, nil
}

// Ack settles deliveries for good and returns one result per delivery:
// SettleOK, or SettleStale if the lease ended and the event was delivered
// again (it will come again), or SettleUnknown if it was already acked.
func (c *Client) Ack(ctx context.Context, deliveries ...*Delivery) ([]SettleResult, error) {
	ids, attempts, namespaces := refsOf(deliveries)
	return c.settle(ctx, FrameAckEvent, func(id uint64) proto.Message {
		return &h3xpb.AckEvent{RequestId: id, EventIds: ids, Attempts: attempts, Namespaces: namespaces}
	})
}

// Nack hands deliveries back: they are delivered again after delay (to any
// consumer), or dead-lettered after the maximum number of attempts. reason
// is recorded on dead-lettered events.
func (c *Client) Nack(ctx context.Context, delay time.Duration, reason string, deliveries ...*Delivery) ([]SettleResult, error) {
	ids, attempts, namespaces := refsOf(deliveries)
	return c.settle(ctx, FrameNackEvent, func(id uint64) proto.Message {
		return &h3xpb.NackEvent{RequestId: id, EventIds: ids, Attempts: attempts, Namespaces: namespaces, DelayMs: durationMs(delay), Reason: reason}
	})
}

// Extend pushes the deliveries' lease deadlines to now + d (d <= 0: the
// server's ack deadline), for slow work.
func (c *Client) Extend(ctx context.Context, d time.Duration, deliveries ...*Delivery) ([]SettleResult, error) {
	ids, attempts, namespaces := refsOf(deliveries)
	res, err := c.settle(ctx, FrameExtendLease, func(id uint64) proto.Message {
		return &h3xpb.ExtendLease{RequestId: id, EventIds: ids, Attempts: attempts, Namespaces: namespaces, ExtendMs: durationMs(d)}
	})
	if err == nil {
		for i, r := range res {
			if r.Status == SettleOK && i < len(deliveries) {
				deliveries[i].Deadline = time.Now().Add(d)
			}
		}
	}
	return res, err
}

// Ping measures the round-trip time to the server over the control stream.
func (c *Client) Ping(ctx context.Context) (time.Duration, error) {
	cc, err := c.conn()
	if err != nil {
		return 0, err
	}
	ch := make(chan time.Time, 1)
	cc.pingMu.Lock()
	cc.pingSeq++
	seq := cc.pingSeq
	cc.pings[seq] = ch
	cc.pingMu.Unlock()
	start := time.Now()
	if err := cc.writeControl(FramePing, &h3xpb.Ping{Sequence: seq, SentUnixNano: start.UnixNano()}); err != nil {
		return 0, err
	}
	select {
	case at := <-ch:
		return at.Sub(start), nil
	case <-ctx.Done():
		cc.pingMu.Lock()
		delete(cc.pings, seq)
		cc.pingMu.Unlock()
		return 0, ctx.Err()
	case <-cc.qc.Context().Done():
		return 0, connError(context.Cause(cc.qc.Context()))
	}
}

// OpenStream opens a stream for an application protocol served by
// Server.Handle: its first frame, of a type at least
// FirstApplicationFrameType, routes it to the handler. Close it when done.
func (c *Client) OpenStream(ctx context.Context) (*Stream, error) {
	cc, err := c.conn()
	if err != nil {
		return nil, err
	}
	st, err := cc.qc.OpenStreamSync(ctx)
	if err != nil {
		return nil, connError(err)
	}
	return &Stream{st: st, fr: newFrameReader(st, uint32(c.cfg.maxFrameSize))}, nil
}

// Granted returns the grants the server reported at authentication.
func (c *Client) Granted() Grants {
	var g Grants
	for _, pg := range c.cc.auth.GetGrants() {
		g = append(g, Grant{Namespace: pg.GetNamespace(), Permission: Permission(pg.GetPermission())})
	}
	return g
}

// Close closes the connection; leases still held are released by the
// server. Calls made afterwards return ErrClosed. Close is safe to call more
// than once and waits for the client's goroutines.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		close(c.closed)
		c.cc.close()
	})
	return nil
}
