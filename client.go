package h3x

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

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
	backoff      Backoff
	maxReconnect int
	pubBuffer    int
	ackFlushSize int
	ackInterval  time.Duration
	onState      func(StateChange)
	dialTimeout  time.Duration
}

func defaultClientConfig() clientConfig {
	return clientConfig{
		maxFrameSize: DefaultMaxFrameSize,
		idleTimeout:  DefaultIdleTimeout,
		backoff:      DefaultBackoff(),
		pubBuffer:    DefaultPublishBuffer,
		ackFlushSize: DefaultAckFlushSize,
		ackInterval:  DefaultAckFlushInterval,
		dialTimeout:  10 * time.Second,
	}
}

func (c *clientConfig) validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, newError(CodeInvalidArgument, format, args...)) }
	if c.clientID == "" {
		bad("WithCredentials: a client id is required")
	}
	if !utf8.ValidString(c.clientID) || !utf8.ValidString(c.token) {
		bad("WithCredentials: the client id and token must be valid UTF-8")
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
	if c.backoff == nil {
		bad("WithBackoff: nil policy")
	}
	if c.maxReconnect < 0 {
		bad("WithMaxReconnects must not be negative, got %d", c.maxReconnect)
	}
	if c.pubBuffer <= 0 {
		bad("WithPublishBuffer must be positive, got %d", c.pubBuffer)
	}
	if c.ackFlushSize <= 0 || c.ackFlushSize > DefaultMaxEventsPerSend {
		bad("WithAckFlush size must be between 1 and %d, got %d", DefaultMaxEventsPerSend, c.ackFlushSize)
	}
	if c.ackInterval <= 0 {
		bad("WithAckFlush interval must be positive, got %v", c.ackInterval)
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

// Client defaults.
const (
	DefaultPublishBuffer    = 1024
	DefaultAckFlushSize     = 256
	DefaultAckFlushInterval = 5 * time.Millisecond
	DefaultMaxUnacked       = 1024
)

// WithBackoff sets the reconnect delay policy. Default DefaultBackoff():
// full jitter over an exponential from 100 ms to 10 s, doubling.
func WithBackoff(b Backoff) ClientOption {
	return clientOptionFunc(func(c *clientConfig) { c.backoff = b })
}

// WithMaxReconnects makes the client give up after n failed reconnect
// attempts in a row; its calls then fail with ErrReconnectFailed. Default 0:
// unlimited.
func WithMaxReconnects(n int) ClientOption {
	return clientOptionFunc(func(c *clientConfig) { c.maxReconnect = n })
}

// WithPublishBuffer bounds the Publish calls in flight or waiting for a
// connection, and the PublishAsync calls not yet done; further calls wait
// until one finishes or their ctx ends (PublishAsync, too, then returns
// only once its call is taken on). Default DefaultPublishBuffer (1,024).
func WithPublishBuffer(n int) ClientOption {
	return clientOptionFunc(func(c *clientConfig) { c.pubBuffer = n })
}

// WithAckFlush sets how Delivery.Ack, Nack and Extend are batched: a batch
// goes out when it holds size settlements or interval after its first one,
// and on Close. Up to eight batches wait for their answers at once, a ninth
// waits to be sent, and 4 × size settlements more queue behind them before
// Ack, Nack and Extend wait. Default DefaultAckFlushSize (256) and
// DefaultAckFlushInterval (5 ms).
func WithAckFlush(size int, interval time.Duration) ClientOption {
	return clientOptionFunc(func(c *clientConfig) { c.ackFlushSize, c.ackInterval = size, interval })
}

// WithStateHandler calls f on every connection state change, from one
// goroutine, in order; f must not block. StateClosed is reported once: with
// the error that ended the client (WithMaxReconnects ran out, credentials
// refused), from which f may call Close, or with a nil Err by Close. (A
// Close called elsewhere while f reports that terminal StateClosed does not
// wait for f to return.) Default: none.
func WithStateHandler(f func(StateChange)) ClientOption {
	return clientOptionFunc(func(c *clientConfig) { c.onState = f })
}

// WithDialTimeout bounds each connection attempt when reconnecting.
// Default 10 s.
func WithDialTimeout(d time.Duration) ClientOption {
	return clientOptionFunc(func(c *clientConfig) { c.dialTimeout = d })
}

// ConnState is a client's connection state.
type ConnState uint8

// Connection states.
const (
	StateConnected    ConnState = iota + 1 // authenticated and serving calls
	StateDisconnected                      // the connection ended; Err says why
	StateReconnecting                      // about to dial again after Delay
	StateClosed                            // Close was called, or a terminal error (Err)
)

// String returns the state's name.
func (s ConnState) String() string {
	switch s {
	case StateConnected:
		return "connected"
	case StateDisconnected:
		return "disconnected"
	case StateReconnecting:
		return "reconnecting"
	case StateClosed:
		return "closed"
	}
	return "unknown"
}

// StateChange reports a connection state change.
type StateChange struct {
	State   ConnState     // the state entered
	Err     error         // the cause, for StateDisconnected and a terminal StateClosed
	Attempt int           // the reconnect attempt, for StateReconnecting
	Delay   time.Duration // the wait before that attempt, for StateReconnecting
}

// ErrReconnectFailed is returned by a client's calls after WithMaxReconnects
// attempts in a row have failed; it wraps the last attempt's error.
var ErrReconnectFailed = errors.New("h3x: reconnecting failed")

// Client is a connection to an H3X server that survives restarts and
// network loss: it reconnects by itself with backoff and jitter,
// re-authenticates, resumes its subscriptions, and resends what was in
// flight (publishes are deduplicated by ID). Its methods are safe for
// concurrent use.
type Client struct {
	cfg    clientConfig
	addr   string
	logger *slog.Logger
	reqID  atomic.Uint64

	mu     sync.Mutex
	cc     *clientConn   // nil while disconnected
	ready  chan struct{} // closed when cc is set or the client failed
	failed error         // terminal error

	rateMu  sync.Mutex
	blocked map[string]time.Time // namespace → rate limited until

	pubSlots   chan struct{}
	asyncSlots chan struct{}     // one per PublishAsync call not yet done (WithPublishBuffer)
	asyncs     chan asyncPublish // PublishAsync calls for an idle worker
	idle       atomic.Int32      // idle PublishAsync workers
	sends      sendBatcher       // small publishes sharing requests
	acker      *acker

	ctx       context.Context // ends with Close
	cancel    context.CancelFunc
	closed    chan struct{}
	closeOnce sync.Once
	closing   atomic.Bool
	// goAwayGap is set from a GoAway until the next connection is up: a
	// subscription giving back unseen deliveries meanwhile waits for that
	// connection to nack them (see Subscription.giveBack).
	goAwayGap atomic.Bool
	// serverFrame is the frame size the last connection's server announced.
	serverFrame atomic.Int64
	wg          sync.WaitGroup // the acker, subscriptions, async publishes, connections' goroutines
	// supervisor counts the supervisor goroutine, which Close waits for
	// unless it is reporting the client's terminal failure: the state
	// handler may call Close from that report.
	supervisor sync.WaitGroup
	reportMu   sync.Mutex
	closeBegun bool // Close has begun: the supervisor reports nothing more
	// terminalReport: the supervisor reports (or has reported) StateClosed
	// with the terminal error; Close does not report it again.
	terminalReport bool
	wgMu           sync.Mutex // orders goOwned's Add before Close's close(closed) and Wait
	stateMu        sync.Mutex // serializes state callbacks
}

// Dial connects to the server at addr, authenticates and returns the
// client. The first connection must succeed: Dial fails with an error
// matching ErrUnauthenticated or ErrPermissionDenied when the server refuses
// the credentials or a namespace, and with the network error when the server
// cannot be reached, and with errors matching ErrInvalidArgument for invalid
// options. Later connection losses are repaired in the background.
func Dial(ctx context.Context, addr string, opts ...ClientOption) (*Client, error) {
	cfg := defaultClientConfig()
	for _, o := range opts {
		o.applyClient(&cfg)
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	c := &Client{
		cfg:        cfg,
		addr:       addr,
		logger:     cfg.logger,
		ready:      make(chan struct{}),
		blocked:    make(map[string]time.Time),
		pubSlots:   make(chan struct{}, cfg.pubBuffer),
		asyncSlots: make(chan struct{}, cfg.pubBuffer),
		asyncs:     make(chan asyncPublish),
		closed:     make(chan struct{}),
	}
	c.sends.c = c
	if c.logger == nil {
		c.logger = slog.New(slog.DiscardHandler)
	}
	cc, err := c.connect(ctx)
	if err != nil {
		return nil, err
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.setConn(cc)
	c.emit(StateChange{State: StateConnected})
	c.acker = newAcker(c)
	c.supervisor.Add(1)
	go func() {
		defer c.supervisor.Done()
		c.supervise(cc)
	}()
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.acker.run()
	}()
	return c, nil
}

func (c *Client) emit(sc StateChange) {
	if c.cfg.onState == nil {
		return
	}
	c.stateMu.Lock()
	defer c.stateMu.Unlock()
	c.cfg.onState(sc)
}

func (c *Client) setConn(cc *clientConn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cc != nil {
		_, server := sendLimits(cc)
		c.serverFrame.Store(int64(server))
		c.cc = cc
		close(c.ready)
		return
	}
	if c.cc != nil {
		c.cc = nil
		c.ready = make(chan struct{})
	}
}

// current returns the connection in use, or nil while the client
// reconnects.
func (c *Client) current() *clientConn {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cc
}

func (c *Client) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.failed = err
	if c.cc == nil {
		close(c.ready)
	}
}

// authRetryAfter returns how long a server that refused a connection with
// RATE_LIMITED (its authentication slow-down: too many failures from this
// address) asked the client to wait, at most a minute; 0 for other errors.
func authRetryAfter(err error) time.Duration {
	var e *Error
	if errors.As(err, &e) && e.Code == CodeRateLimited {
		return min(e.RetryAfter, time.Minute)
	}
	return 0
}

// shutting reports whether Close has begun (or the client's context ended).
func (c *Client) shutting() bool { return c.closing.Load() || c.ctx.Err() != nil }

// isTerminal reports whether a connection error must not be retried.
func isTerminal(err error) bool {
	return errors.Is(err, ErrUnauthenticated) || errors.Is(err, ErrPermissionDenied) || errors.Is(err, ErrInvalidArgument)
}

// supervise watches the current connection and replaces it when it ends
// or the server sends GoAway.
func (c *Client) supervise(cc *clientConn) {
	for {
		watched := cc
		c.goOwned(func() { c.heartbeat(watched) })
		var cause error
		goAway := false
		select {
		case <-c.ctx.Done():
			return
		case <-cc.qc.Context().Done():
			cause = connError(context.Cause(cc.qc.Context()))
		case <-cc.goAwayCh:
			goAway = true
			cause = ErrShuttingDown
		}
		c.goAwayGap.Store(goAway)
		c.setConn(nil)
		c.emit(StateChange{State: StateDisconnected, Err: cause})
		c.logger.Info("h3x: disconnected", "err", cause, "goaway", goAway)
		old := cc
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			old.drainAndClose(c.ctx)
		}()
		// A server's wish, within reason: at most a minute (as for an auth
		// refusal's retry-after, authRetryAfter).
		next, err := c.reconnect(goAway, min(time.Duration(cc.reconnectAfter.Load()), time.Minute))
		if err != nil {
			c.goAwayGap.Store(false)
			c.reportMu.Lock()
			if c.closeBegun {
				c.reportMu.Unlock()
				return // Close ended the reconnect; it reports StateClosed itself
			}
			c.terminalReport = true // Close will not report it again, nor wait for this report
			c.reportMu.Unlock()
			// Report the end first, so that a call failing with err never
			// precedes the StateClosed it causes. The handler may call Close.
			c.emit(StateChange{State: StateClosed, Err: err})
			c.fail(err)
			return
		}
		cc = next
		c.setConn(cc)
		c.goAwayGap.Store(false)
		c.emit(StateChange{State: StateConnected})
		c.logger.Info("h3x: reconnected")
	}
}

// heartbeatInterval returns how often a client pings a server while calls
// wait, and how long it waits for the Pong: a sixth of the idle timeout (5 s
// by default), at least 500 ms and 1 s.
func heartbeatInterval(idle time.Duration) (every, timeout time.Duration) {
	return max(idle/6, 500*time.Millisecond), max(idle/6, time.Second)
}

// heartbeat pings the server on cc while calls wait there (a long poll, an
// answer not yet come), and closes cc when a Pong does not come in time, so
// that the client reconnects. A server killed while its clients wait sends
// them nothing, and QUIC's retransmissions back off while it is down: on its
// own, a client could take up to the idle timeout to notice (RELIABILITY.md,
// finding 5). It returns when cc or the client ends.
func (c *Client) heartbeat(cc *clientConn) {
	every, timeout := heartbeatInterval(c.cfg.idleTimeout)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-cc.qc.Context().Done():
			return
		case <-t.C:
		}
		if cc.inflight.Load() == 0 {
			continue
		}
		// A Pong takes a round trip, and another if the Ping is lost: a
		// slow but healthy path must not count as a dead server.
		ctx, cancel := context.WithTimeout(c.ctx, max(timeout, probeTimeout(cc.qc)))
		_, err := cc.ping(ctx)
		cancel()
		if err != nil && ctx.Err() != nil && c.ctx.Err() == nil && cc.qc.Context().Err() == nil {
			c.logger.Info("h3x: no answer to a ping; reconnecting", "timeout", timeout)
			cc.qc.CloseWithError(quic.ApplicationErrorCode(CodeNone), "no answer to a ping")
			return
		}
	}
}

// reconnect dials until it succeeds, a terminal error occurs, the attempts
// run out or the client closes. With now (after a GoAway) the first attempt
// is immediate, unless the GoAway asked for a wait (after).
func (c *Client) reconnect(now bool, after time.Duration) (*clientConn, error) {
	var last error
	for attempt := 1; ; attempt++ {
		if c.cfg.maxReconnect > 0 && attempt > c.cfg.maxReconnect {
			return nil, fmt.Errorf("%w after %d attempts: %w", ErrReconnectFailed, attempt-1, last)
		}
		delay := c.cfg.backoff.Delay(attempt)
		if now && attempt == 1 {
			delay = after // 0 unless the GoAway's reconnect_after_ms says otherwise
		}
		if ra := authRetryAfter(last); ra > delay {
			delay = ra // the server said when to come back
		}
		c.emit(StateChange{State: StateReconnecting, Attempt: attempt, Delay: delay})
		if delay > 0 {
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-c.ctx.Done():
				t.Stop()
				return nil, ErrClosed
			}
		}
		ctx, cancel := context.WithTimeout(c.ctx, c.cfg.dialTimeout)
		cc, err := c.connect(ctx)
		cancel()
		if err == nil {
			return cc, nil
		}
		if c.ctx.Err() != nil {
			return nil, ErrClosed
		}
		last = err
		c.logger.Debug("h3x: reconnect failed", "attempt", attempt, "err", err)
		if isTerminal(err) {
			return nil, err
		}
	}
}

// awaitConn returns the current connection, waiting for one while the
// client reconnects.
func (c *Client) awaitConn(ctx context.Context) (*clientConn, error) {
	for {
		select {
		case <-c.closed:
			return nil, ErrClosed
		default:
		}
		c.mu.Lock()
		cc, ready, failed := c.cc, c.ready, c.failed
		c.mu.Unlock()
		if failed != nil {
			return nil, failed
		}
		if cc != nil {
			return cc, nil
		}
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-c.closed:
			return nil, ErrClosed
		}
	}
}

// retryable reports whether a call that failed with err on connection cc
// should be tried again on the next connection.
func (c *Client) retryable(ctx context.Context, cc *clientConn, err error) bool {
	if ctx.Err() != nil || errors.Is(err, ErrClosed) || errors.Is(err, errWrongAnswer) {
		return false
	}
	if errors.Is(err, errUnencodable) {
		// The request cannot be encoded (a string that is not UTF-8):
		// it never will be.
		return false
	}
	if errors.Is(err, ErrFrameTooLarge) {
		// Either end refused a frame as too large: the same request, or
		// the same answer (an event above WithMaxFrameSize), would be too
		// large again.
		return false
	}
	var e *Error
	if errors.As(err, &e) && e.Remote && !e.Code.Retryable() && e.Code != CodeNone {
		// The server refused the request (permission, bad argument, a frame
		// too large): sending it again would fail the same way.
		return false
	}
	if errors.As(err, &e) && e.Remote && e.Code != CodeNone && e.Code != CodeShuttingDown && e.Code != CodeTooManyConnections {
		// The server refused the request for now (a full disk or queue, a
		// rate limit, an internal error): the caller gets the error and its
		// RetryAfter, rather than the call resending it in a loop until its
		// context ends.
		return false
	}
	// Wait until the supervisor notices the loss (bounded), so the retry
	// does not spin on the dead connection.
	select {
	case <-cc.qc.Context().Done():
	case <-cc.goAwayCh:
	case <-time.After(100 * time.Millisecond):
	case <-ctx.Done():
		return false
	}
	return true
}

// call sends one request and waits for its answer, on whatever connection
// is current, retrying on the next connection if this one fails.
func (c *Client) call(ctx context.Context, kind int, t FrameType, build func(id uint64) proto.Message) (rpcAnswer, error) {
	return c.callOn(ctx, kind, t, nil, build)
}

// callOn is call with fits, if not nil, checking each connection before
// the request goes out on it: its error ends the call.
func (c *Client) callOn(ctx context.Context, kind int, t FrameType, fits func(*clientConn) error, build func(id uint64) proto.Message) (rpcAnswer, error) {
	for {
		cc, err := c.awaitConn(ctx)
		if err != nil {
			return rpcAnswer{}, err
		}
		if fits != nil {
			if err := fits(cc); err != nil {
				return rpcAnswer{}, err
			}
		}
		ans, err := cc.call(ctx, kind, t, build)
		if err == nil {
			return ans, nil
		}
		if !c.retryable(ctx, cc, err) {
			if ctx.Err() != nil {
				return rpcAnswer{}, ctx.Err()
			}
			return rpcAnswer{}, err
		}
		c.logger.Debug("h3x: retrying on the next connection", "frame", t, "err", err)
	}
}

// rateLimited records a RateLimitNotice.
func (c *Client) rateLimited(ns string, d time.Duration) {
	if d <= 0 {
		return
	}
	c.rateMu.Lock()
	defer c.rateMu.Unlock()
	until := time.Now().Add(d)
	if until.After(c.blocked[ns]) {
		c.blocked[ns] = until
	}
}

// rateWait returns how long publishing to any of the namespaces of the
// events at the indices todo (nil: of every event) must wait.
func (c *Client) rateWait(events []Event, todo []int) time.Duration {
	c.rateMu.Lock()
	defer c.rateMu.Unlock()
	if len(c.blocked) == 0 {
		return 0
	}
	now := time.Now()
	var wait time.Duration
	check := func(ns string) {
		if until, ok := c.blocked[ns]; ok {
			if d := until.Sub(now); d > wait {
				wait = d
			} else if d <= 0 {
				delete(c.blocked, ns)
			}
		}
	}
	if todo == nil {
		for i := range events {
			check(events[i].Namespace)
		}
	}
	for _, i := range todo {
		check(events[i].Namespace)
	}
	return wait
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Publish stores events and returns one result per event, in order, once
// every stored event is durable. Events without an ID get a UUIDv4 here,
// before the first send, written into the caller's events: a publish resent
// after a reconnect, or retried by the caller with the same events after an
// error, is stored once. (So a slice reused for new events must have its
// IDs cleared, or they are duplicates; and one slice must not be published
// from two goroutines at once.) While the client is disconnected, Publish
// waits (within WithPublishBuffer's bound) and sends after reconnecting.
// Events refused as rate limited or queue full are retried after the
// server's retry-after, so Publish fails for them only if ctx ends first;
// events refused for good (permission, invalid) have status PublishRefused
// and an *Error in Err. The returned error is for the whole call (ctx,
// ErrClosed, a terminal error). Under load, the events of concurrent small
// publishes (up to 64 events each) share requests to the server; each call
// still gets only its own results, and a call whose ctx ends stops waiting
// without ending the others'.
func (c *Client) Publish(ctx context.Context, events ...Event) ([]PublishResult, error) {
	assignIDs(events)
	// A slot is held while the call is in flight or waits for a
	// connection, not while it waits out a rate limit or a full queue: a
	// namespace over its limit must not hold up publishes to others.
	held := false
	acquire := func() error {
		select {
		case <-c.closed: // first: a free slot must not hide a closed client
			return ErrClosed
		default:
		}
		select {
		case c.pubSlots <- struct{}{}:
			held = true
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-c.closed:
			return ErrClosed
		}
	}
	pause := func(d time.Duration) error {
		if d <= 0 {
			return ctx.Err()
		}
		if held {
			<-c.pubSlots
			held = false
		}
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		case <-c.closed: // a retry-after can be long: Close ends the wait
			return ErrClosed
		}
		return acquire()
	}
	if err := acquire(); err != nil {
		return nil, err
	}
	defer func() {
		if held {
			<-c.pubSlots
		}
	}()

	wire, sizes := wireWithSizes(events)
	results := make([]PublishResult, len(events))
	todo := make([]int, 0, len(events))
	for i := range events {
		if refuseUnencodable(&events[i], &results[i]) {
			continue // the frame could not carry it (nor its neighbours)
		}
		todo = append(todo, i)
	}
	for len(todo) > 0 {
		if err := pause(c.rateWait(events, todo)); err != nil {
			return nil, err
		}
		var again []int
		var wait time.Duration
		// Send in chunks that respect the limits of the server the chunk
		// goes to (announced at Auth): they are read again for every chunk,
		// after waiting for a connection, since a reconnect may reach a
		// server with other limits (a rolling restart with a new config).
		for start := 0; start < len(todo); {
			cc, err := c.awaitConn(ctx)
			if err != nil {
				return nil, err
			}
			maxEvents, maxBytes := sendLimits(cc)
			if i := todo[start]; sizes[i]+64 > maxBytes {
				results[i] = PublishResult{ID: events[i].ID, Status: PublishRefused,
					Err: &Error{Code: CodeFrameTooLarge, Message: fmt.Sprintf("event of %d bytes exceeds the server's frame size of %d", sizes[i], maxBytes)}}
				start++
				continue
			}
			end, bytes := start, 64
			for end < len(todo) && end-start < maxEvents && bytes+sizes[todo[end]] <= maxBytes {
				bytes += sizes[todo[end]]
				end++
			}
			chunk := todo[start:end]
			evs := make([]*h3xpb.EventPayload, len(chunk))
			for j, i := range chunk {
				evs[j] = wire[i]
			}
			omitted, outcomes, err := c.sendEvents(ctx, evs, bytes-64, maxEvents, maxBytes)
			if errors.Is(err, errLimitsChanged) {
				continue // cut it again by the limits of the connection now
			}
			if err != nil {
				var e *Error
				if errors.As(err, &e) && e.Remote && (e.Code == CodeInvalidArgument || e.Code == CodeFrameTooLarge) {
					// The call was retried on a server whose limits are
					// lower than those the chunk was cut by: cut it again.
					if now, werr := c.awaitConn(ctx); werr == nil {
						if me, mb := sendLimits(now); me != maxEvents || mb != maxBytes {
							continue
						}
					}
				}
				return nil, err
			}
			start = end
			again, wait = c.takeOutcomes(events, chunk, omitted, outcomes, results, again, wait)
		}
		todo = again
		if len(todo) > 0 {
			if err := pause(wait); err != nil {
				return nil, err
			}
		}
	}
	return results, nil
}

// omittedOutcomes checks the counts of an answer (t) to a request of n
// elements (what): the first omitted have no outcome (PROTOCOL.md §6.2,
// §6.4) and outcomes is one per element after them. It returns omitted.
func omittedOutcomes(t FrameType, omitted uint32, outcomes, n int, what string) (int, error) {
	if omitted > uint32(n) || outcomes != n-int(omitted) {
		return 0, newError(CodeProtocolViolation, "%v has %d outcomes and %d omitted for %d %s", t, outcomes, omitted, n, what)
	}
	return int(omitted), nil
}

// wireWithSizes converts events for a SendEvent and returns the size each
// takes in one (proto.Size's figure, wire_encode.go).
func wireWithSizes(events []Event) ([]*h3xpb.EventPayload, []int) {
	wire := eventsToWire(events)
	sizes := make([]int, len(events))
	for i := range wire {
		sizes[i] = payloadSize(wire[i]) + 8
	}
	return wire, sizes
}

// indices returns 0, 1, …, n-1: every event of a call.
func indices(n int) []int {
	all := make([]int, n)
	for i := range all {
		all[i] = i
	}
	return all
}

// takeOutcomes sets the results of chunk (indices into events) from an
// answer's omitted count and outcomes, and returns again with the events
// to publish again (rate limited, queue full, shutting down) appended, and
// wait raised to the longest retry-after among them.
func (c *Client) takeOutcomes(events []Event, chunk []int, omitted int, outcomes []*h3xpb.PublishOutcome, results []PublishResult, again []int, wait time.Duration) ([]int, time.Duration) {
	for _, i := range chunk[:omitted] {
		results[i] = PublishResult{ID: events[i].ID, Status: PublishStored}
	}
	for j, o := range outcomes {
		i := chunk[omitted+j]
		// The server leaves out an ID it refuses for its length
		// (PROTOCOL.md §7); the result still names the event.
		r := PublishResult{ID: events[i].ID, Status: PublishStatus(o.GetStatus())}
		if o.GetStatus() == h3xpb.PublishStatus_PUBLISH_STATUS_REFUSED {
			e := &Error{Code: ErrorCode(o.GetCode()), Message: o.GetMessage(), RetryAfter: time.Duration(o.GetRetryAfterMs()) * time.Millisecond, Remote: true}
			switch e.Code {
			case CodeRateLimited, CodeQueueFull, CodeShuttingDown:
				again = append(again, i)
				wait = max(wait, e.RetryAfter, 10*time.Millisecond)
				if e.Code == CodeRateLimited {
					c.rateLimited(events[i].Namespace, e.RetryAfter)
				}
				continue
			}
			r.Err = e
		}
		results[i] = r
	}
	return again, wait
}

// sendLimits returns the most events and bytes one SendEvent may carry, as
// the server announced them.
func sendLimits(cc *clientConn) (int, int) {
	maxEvents, maxBytes := DefaultMaxEventsPerSend, DefaultMaxFrameSize
	if cc != nil && cc.auth.GetLimits() != nil {
		if n := cc.auth.GetLimits().GetMaxEventsPerSend(); n > 0 {
			maxEvents = int(n)
		}
		if n := cc.auth.GetLimits().GetMaxFrameSize(); n > 0 {
			maxBytes = int(n)
		}
	}
	return maxEvents, maxBytes
}

// assignIDs gives every event without an ID a UUIDv4, in place, and
// returns the events' IDs.
func assignIDs(events []Event) []string {
	var gen uuidGen
	for i := range events {
		if events[i].ID == "" {
			gen.want++
		}
	}
	ids := make([]string, len(events))
	for i := range events {
		if events[i].ID == "" {
			events[i].ID = gen.next()
		}
		ids[i] = events[i].ID
	}
	return ids
}

// PublishCall is a Publish running in the background (see PublishAsync).
type PublishCall struct {
	done    chan struct{}
	ids     []string
	results []PublishResult
	err     error
}

// IDs returns the IDs of the call's events, in order: the caller's, or those
// PublishAsync assigned. They are known at once, also when the call fails
// (its outcome then unknown): publishing the events again with these IDs
// stores each at most once within the server's dedup window.
func (p *PublishCall) IDs() []string { return p.ids }

// Done is closed when the publish has finished.
func (p *PublishCall) Done() <-chan struct{} { return p.done }

// Result waits for the publish to finish and returns what Publish would.
func (p *PublishCall) Result() ([]PublishResult, error) {
	<-p.done
	return p.results, p.err
}

// PublishAsync starts Publish(ctx, events...) in the background and returns
// at once, so one goroutine can keep many batches in flight (bounded by
// WithPublishBuffer: beyond it, PublishAsync waits for a call to finish).
// It publishes a copy of events: the IDs it assigns (before it returns) are
// in PublishCall.IDs and the results, not in the caller's slice, which the
// caller may reuse at once (the events' Data and Metadata are shared, not
// copied: leave them unchanged until the call is done). To retry a failed
// call without storing its events twice, publish them again with those
// IDs. The client owns the background work: Close cancels and waits for
// it. A call of up to 64 events is cheap: under load it waits in a request
// shared with other small publishes, with no goroutine of its own, so
// publishing one event per call is a fine way to use it.
func (c *Client) PublishAsync(ctx context.Context, events ...Event) *PublishCall {
	copied := slices.Clone(events)
	p := &PublishCall{done: make(chan struct{}), ids: assignIDs(copied)}
	select {
	case <-c.closed:
		p.err = ErrClosed
		close(p.done)
		return p
	default:
	}
	// At most WithPublishBuffer calls outstanding: beyond, wait for one to
	// finish (while disconnected, nothing finishes until the reconnect).
	select {
	case c.asyncSlots <- struct{}{}:
	case <-ctx.Done():
		p.err = ctx.Err()
		close(p.done)
		return p
	case <-c.closed:
		p.err = ErrClosed
		close(p.done)
		return p
	}
	if len(copied) <= sharedChunkEvents && c.publishShared(ctx, copied, p) {
		return p // waits in a shared request, with no worker of its own
	}
	a := asyncPublish{ctx: ctx, events: copied, call: p}
	select {
	case c.asyncs <- a:
		// An idle worker took it.
	default:
		if !c.goOwned(func() { c.asyncWorker(a) }) {
			<-c.asyncSlots
			p.err = ErrClosed
			close(p.done)
		}
	}
	return p
}

// goOwned runs f in a goroutine Close waits for, unless Close is already
// waiting (then it reports false and f does not run).
func (c *Client) goOwned(f func()) bool {
	c.wgMu.Lock()
	defer c.wgMu.Unlock()
	select {
	case <-c.closed:
		return false
	default:
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		f()
	}()
	return true
}

// asyncPublish is one PublishAsync call.
type asyncPublish struct {
	ctx    context.Context
	events []Event
	call   *PublishCall
}

// maxIdleAsyncWorkers bounds the PublishAsync workers kept waiting for the
// next call. A worker that stays reuses its grown stack: with a fresh
// goroutine per call, growing its stack (UUIDs, marshalling) was ~14% of
// the CPU profile at 5,000 single-event PublishAsync calls a second.
const maxIdleAsyncWorkers = 4

// asyncWorker runs a, then the calls handed to it while it is idle, until
// the client closes or enough other workers are idle.
func (c *Client) asyncWorker(a asyncPublish) {
	for {
		c.runAsync(a)
		if !c.becomeIdle() {
			return
		}
		select {
		case a = <-c.asyncs:
			c.idle.Add(-1)
		case <-c.closed:
			c.idle.Add(-1)
			return
		}
	}
}

// becomeIdle counts a worker as idle unless maxIdleAsyncWorkers already are
// (the count never goes above it, even for a moment).
func (c *Client) becomeIdle() bool {
	for {
		n := c.idle.Load()
		if n >= maxIdleAsyncWorkers {
			return false
		}
		if c.idle.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

func (c *Client) runAsync(a asyncPublish) {
	ctx, done := c.untilClose(a.ctx)
	p := a.call
	p.results, p.err = c.Publish(ctx, a.events...)
	done()
	p.err = c.closedErr(p.err)
	<-c.asyncSlots
	close(p.done)
}

// untilClose returns ctx, also ended by Close, for the background work of
// a PublishAsync call; done releases it.
func (c *Client) untilClose(ctx context.Context) (context.Context, func()) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(c.ctx, cancel)
	return ctx, func() {
		stop()
		cancel()
	}
}

// closedErr returns err, or ErrClosed for an error once Close has begun
// (which ends the background work's ctx: untilClose).
func (c *Client) closedErr(err error) error {
	if err != nil && c.ctx.Err() != nil {
		return ErrClosed
	}
	return err
}

// Delivery is one delivery of an event to this client: the event, its
// attempt number and its lease deadline. Settle it with Ack, Nack or
// Extend (batched on the wire), or with Client.Ack, Client.Nack or
// Client.Extend (synchronous).
type Delivery struct {
	Event    Event // the event delivered
	attempt  int
	deadline time.Time
	client   *Client
	sub      *Subscription
	settled  atomic.Bool
}

// Attempt returns the delivery's attempt number: 1 for the first delivery.
func (d *Delivery) Attempt() int { return d.attempt }

// Deadline returns when the lease ends unless acked, nacked or extended.
func (d *Delivery) Deadline() time.Time { return d.deadline }

// ErrAlreadySettled is returned by Delivery.Ack, Nack and Extend for a
// delivery already acked or nacked (with either those or Client.Ack and
// Client.Nack).
var ErrAlreadySettled = errors.New("h3x: delivery already acked or nacked")

func (d *Delivery) settleOnce() error {
	if d.client == nil {
		return newError(CodeInvalidArgument, "delivery not obtained from a client")
	}
	if !d.markSettled() {
		return ErrAlreadySettled
	}
	return nil
}

// markSettled marks d settled, giving its subscription's credit back; it
// reports false if d was settled already.
func (d *Delivery) markSettled() bool {
	if !d.settled.CompareAndSwap(false, true) {
		return false
	}
	if d.sub != nil {
		d.sub.release(1)
	}
	return true
}

// Ack acknowledges the delivery: the event is removed for good. The ack is
// batched with others (see WithAckFlush) and resent after a reconnect; if
// the lease has meanwhile passed to another consumer, the server reports it
// stale and the event is delivered again: never lost, never acked for
// someone else. It returns an error only if the delivery was already settled
// or the client is closed. While 4 × the flush size of settlements wait
// behind the batches in flight (the server unreachable, say), it waits for
// room, or for Close.
func (d *Delivery) Ack() error {
	if err := d.settleOnce(); err != nil {
		return err
	}
	return d.client.acker.add(context.Background(), settleOp{kind: FrameAckEvent, d: d})
}

// Nack hands the delivery back for redelivery after delay (to any
// consumer), or to the dead-letter namespace after the maximum number of
// attempts. Batched like Ack.
func (d *Delivery) Nack(delay time.Duration) error {
	if err := d.settleOnce(); err != nil {
		return err
	}
	return d.client.acker.add(context.Background(), settleOp{kind: FrameNackEvent, d: d, delay: delay})
}

// Extend pushes the lease deadline to now + dur (dur <= 0: the server's ack
// deadline), for slow work. Batched like Ack.
func (d *Delivery) Extend(dur time.Duration) error {
	if d.client == nil {
		return newError(CodeInvalidArgument, "delivery not obtained from a client")
	}
	if d.settled.Load() {
		return ErrAlreadySettled
	}
	d.deadline = extendedDeadline(d.client, dur)
	return d.client.acker.add(context.Background(), settleOp{kind: FrameExtendLease, d: d, delay: dur})
}

// extendedDeadline is a lease's deadline once extended by d: now + d, or,
// for d <= 0, now + the ack deadline the server announced (the server's
// choice for d <= 0).
func extendedDeadline(c *Client, d time.Duration) time.Time {
	if d <= 0 {
		d = DefaultAckDeadline
		if cc := c.current(); cc != nil {
			if ms := cc.auth.GetLimits().GetAckDeadlineMs(); ms > 0 {
				d = time.Duration(ms) * time.Millisecond
			}
		}
	}
	return time.Now().Add(d)
}

// Fetch waits until at least one event is ready in namespaces (default: the
// namespaces of WithNamespaces, or the client's explicit consume grants) and
// returns up to max of them, leased to this client until their deadline. It
// returns ctx's error if ctx ends first, and keeps waiting across reconnects.
func (c *Client) Fetch(ctx context.Context, max int, namespaces ...string) ([]*Delivery, error) {
	limit := max
	if limit <= 0 {
		return nil, newError(CodeInvalidArgument, "Fetch: max must be positive")
	}
	if len(namespaces) == 0 {
		namespaces = c.cfg.namespaces
	}
	for {
		wait := fetchWait(ctx)
		ans, err := c.call(ctx, streamFetch, FrameFetchEvents, func(id uint64) proto.Message {
			return &h3xpb.FetchEvents{RequestId: id, Namespaces: namespaces, Limit: uint32(limit), MaxWaitMs: durationMs(wait), MaxBytes: c.fetchMaxBytes()}
		})
		if err != nil {
			return nil, err
		}
		if out := c.own(ans.ds, nil); len(out) > 0 {
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

// own makes ds, deliveries decoded by a stream's reader, this client's
// (and sub's, if not nil), and returns them.
func (c *Client) own(ds []*Delivery, sub *Subscription) []*Delivery {
	for _, d := range ds {
		d.client, d.sub = c, sub
	}
	return ds
}

// fetchMaxBytes is the byte budget of a fetch: batches the client can read
// (WithMaxFrameSize), with room for the batch's framing, and no more than
// the server's default. One event above it still comes alone, in a frame
// the client refuses (ErrFrameTooLarge) if it is larger than the limit.
func (c *Client) fetchMaxBytes() uint32 {
	return uint32(min(DefaultFetchMaxBytes, c.cfg.maxFrameSize/2))
}

// fetchWait is the long-poll wait to ask for under ctx: DefaultMaxFetchWait,
// or less to end before ctx's deadline.
func fetchWait(ctx context.Context) time.Duration {
	wait := DefaultMaxFetchWait
	if dl, ok := ctx.Deadline(); ok {
		wait = min(wait, time.Until(dl)-10*time.Millisecond)
	}
	return max(wait, 0)
}

type settleGroup struct {
	t      FrameType
	delay  time.Duration
	reason string
	unseen bool // a nack of deliveries never handed to the application
}

func refsOf(ds []*Delivery) (ids []string, attempts []uint32, namespaces []string) {
	ids = make([]string, len(ds))
	attempts = make([]uint32, len(ds))
	namespaces = make([]string, len(ds))
	for i, d := range ds {
		ids[i], attempts[i], namespaces[i] = d.Event.ID, uint32(d.attempt), d.Event.Namespace
	}
	return
}

// settle sends acks, nacks or extensions for deliveries and returns their
// results, retrying on the next connection if this one fails. Deliveries go
// in requests cut to the frame size both ends accept: the request, and the
// answer that echoes every ID.
func (c *Client) settle(ctx context.Context, k settleGroup, ds []*Delivery) ([]SettleResult, error) {
	for _, d := range ds {
		if d == nil {
			return nil, newError(CodeInvalidArgument, "a nil *Delivery")
		}
	}
	k.reason = nackReason(k.reason) // what the server keeps
	// A delivery whose ID or namespace is not valid UTF-8 (the application
	// changed its Event) names no event a queue could hold, and would make
	// the whole request unencodable: it is answered here, and the others
	// are sent.
	var unknown []bool // by index in ds; nil when every delivery is sent
	send := ds
	for i, d := range ds {
		if !utf8.ValidString(d.Event.ID) || !utf8.ValidString(d.Event.Namespace) {
			if unknown == nil {
				unknown = make([]bool, len(ds))
				send = append([]*Delivery(nil), ds[:i]...)
			}
			unknown[i] = true
		} else if unknown != nil {
			send = append(send, d)
		}
	}
	if len(send) == 0 {
		// Nothing to send, but the call is still one of a closed client,
		// or of an ended ctx.
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		select {
		case <-c.closed:
			return nil, ErrClosed
		default:
		}
	}
	res, err := c.settleSent(ctx, k, send)
	if err != nil || unknown == nil {
		return res, err
	}
	if len(res) != len(send) {
		return nil, newError(CodeProtocolViolation, "AckResult has %d outcomes for %d settlements", len(res), len(send))
	}
	out := make([]SettleResult, len(ds))
	for i, j := 0, 0; i < len(ds); i++ {
		if unknown[i] {
			out[i] = SettleResult{ID: ds[i].Event.ID, Status: SettleUnknown}
		} else {
			out[i] = res[j]
			j++
		}
	}
	return out, nil
}

// settleSent is settle for deliveries that can all be sent.
func (c *Client) settleSent(ctx context.Context, k settleGroup, ds []*Delivery) ([]SettleResult, error) {
	out := make([]SettleResult, 0, len(ds))
	for start := 0; start < len(ds); {
		// The answer is read with the client's limit; the request must fit
		// the server's, the last one announced while reconnecting.
		limit := c.cfg.maxFrameSize
		if server := int(c.serverFrame.Load()); server > 0 {
			limit = min(limit, server)
		}
		end, size := start, 64+len(k.reason) // the request's other fields
		for end < len(ds) {
			d := ds[end]
			// An ID and namespace with their tags and lengths, an attempt
			// (the answer's echo of the ID with a status is smaller).
			n := len(d.Event.ID) + len(d.Event.Namespace) + 16
			if end > start && size+n > limit {
				break
			}
			size += n
			end++
		}
		res, err := c.settleOnce(ctx, k, ds[start:end])
		if err != nil {
			return nil, err
		}
		out = append(out, res...)
		start = end
	}
	return out, nil
}

// settleOnce sends one request settling ds.
func (c *Client) settleOnce(ctx context.Context, k settleGroup, ds []*Delivery) ([]SettleResult, error) {
	ids, attempts, namespaces := refsOf(ds)
	// omit_ok: an outcome that says OK for an ID the client sent tells it
	// nothing.
	ans, err := c.call(ctx, streamSettle, k.t, func(id uint64) proto.Message {
		switch k.t {
		case FrameNackEvent:
			return &h3xpb.NackEvent{RequestId: id, EventIds: ids, Attempts: attempts, Namespaces: namespaces, DelayMs: durationMs(k.delay), Reason: k.reason, Unseen: k.unseen, OmitOk: true}
		case FrameExtendLease:
			return &h3xpb.ExtendLease{RequestId: id, EventIds: ids, Attempts: attempts, Namespaces: namespaces, ExtendMs: durationMs(k.delay), OmitOk: true}
		}
		return &h3xpb.AckEvent{RequestId: id, EventIds: ids, Attempts: attempts, Namespaces: namespaces, OmitOk: true}
	})
	if err != nil {
		return nil, err
	}
	res := ans.msg.(*h3xpb.AckResult)
	omitted, err := omittedOutcomes(FrameAckResult, res.GetOkOmitted(), len(res.GetOutcomes()), len(ds), "settlements")
	if err != nil {
		return nil, err
	}
	out := make([]SettleResult, len(ds))
	for i, d := range ds[:omitted] {
		out[i] = SettleResult{ID: d.Event.ID, Status: SettleOK}
	}
	for j, o := range res.GetOutcomes() {
		i := omitted + j
		id := o.GetId()
		if ds[i].Event.ID == id {
			// The caller's own string: a kept result keeps nothing of the
			// answer (its echoed IDs share one copy of it).
			id = ds[i].Event.ID
		}
		out[i] = SettleResult{ID: id, Status: SettleStatus(o.GetStatus())}
	}
	return out, nil
}

// Ack settles deliveries for good and returns one result per delivery:
// SettleOK; SettleStale if the lease passed to another consumer (the event
// will come again); SettleUnknown if it was already acked. Once the call
// returns, the deliveries count as settled, as with Delivery.Ack: a
// subscription may hand out more. That holds when it fails too (its
// context ended, the client closed): the outcome is then unknown, an event
// whose ack was not applied is delivered again, and calling Ack again
// retries it. (Otherwise every failed call would keep a subscription's
// credit, and enough of them, during an outage, would stall it.)
func (c *Client) Ack(ctx context.Context, deliveries ...*Delivery) ([]SettleResult, error) {
	res, err := c.settle(ctx, settleGroup{t: FrameAckEvent}, deliveries)
	markSettled(deliveries)
	return res, err
}

// markSettled marks deliveries settled by a synchronous Ack or Nack (done,
// failed or unknown), which gives their subscription's credit back (as
// Delivery.Ack does).
func markSettled(deliveries []*Delivery) {
	for _, d := range deliveries {
		if d != nil {
			d.markSettled()
		}
	}
}

// Nack hands deliveries back: they are delivered again after delay (to any
// consumer), or dead-lettered after the maximum number of attempts, with
// reason recorded.
func (c *Client) Nack(ctx context.Context, delay time.Duration, reason string, deliveries ...*Delivery) ([]SettleResult, error) {
	res, err := c.settle(ctx, settleGroup{t: FrameNackEvent, delay: delay, reason: reason}, deliveries)
	markSettled(deliveries) // whatever the outcome, as with Ack
	return res, err
}

// Extend pushes the deliveries' lease deadlines to now + d (d <= 0: the
// server's ack deadline), for slow work.
func (c *Client) Extend(ctx context.Context, d time.Duration, deliveries ...*Delivery) ([]SettleResult, error) {
	res, err := c.settle(ctx, settleGroup{t: FrameExtendLease, delay: d}, deliveries)
	if err == nil {
		for i, r := range res {
			if r.Status == SettleOK && i < len(deliveries) {
				deliveries[i].deadline = extendedDeadline(c, d)
			}
		}
	}
	return res, err
}

// Ping measures the round-trip time to the server over the control stream.
func (c *Client) Ping(ctx context.Context) (time.Duration, error) {
	cc, err := c.awaitConn(ctx)
	if err != nil {
		return 0, err
	}
	rtt, err := cc.ping(ctx)
	if err != nil && ctx.Err() == nil && c.shutting() {
		return 0, ErrClosed // the connection ended because the client closed
	}
	return rtt, err
}

// OpenStream opens a stream for an application protocol served by
// Server.Handle: its first frame, of a type at least
// FirstApplicationFrameType, routes it to the handler. Close it when done.
// Application streams are not moved to a new connection after a reconnect.
func (c *Client) OpenStream(ctx context.Context) (*Stream, error) {
	cc, err := c.awaitConn(ctx)
	if err != nil {
		return nil, err
	}
	st, err := cc.qc.OpenStreamSync(ctx)
	if err != nil {
		return nil, connError(err)
	}
	_, serverMax := sendLimits(cc)
	return &Stream{st: st, fr: newFrameReader(st, uint32(c.cfg.maxFrameSize)), wmax: serverMax}, nil
}

// Granted returns the grants the server reported at the last
// authentication.
func (c *Client) Granted() Grants {
	cc := c.current()
	if cc == nil {
		return nil
	}
	var g Grants
	for _, pg := range cc.auth.GetGrants() {
		g = append(g, Grant{Namespace: pg.GetNamespace(), Permission: Permission(pg.GetPermission())})
	}
	return g
}

// Flush sends the acks, nacks and extensions that Delivery.Ack, Nack and
// Extend queued so far and waits until the server has answered them. It
// returns an error if some could not be sent since the previous Flush,
// whether in this flush or in a batch sent earlier by size or interval
// (those deliveries will be delivered again); settlements the server
// refused as stale are not errors.
func (c *Client) Flush(ctx context.Context) error {
	ch := make(chan error, 1)
	if err := c.acker.add(ctx, settleOp{flush: ch}); err != nil {
		return err
	}
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close ends the client's subscriptions (closing their channels), flushes
// pending acks and nacks (for up to 5 s in all, a send already in progress
// included), and closes the connection; the server releases leases still
// held. It returns the error of the flushes it waited for, if any (see
// Flush). Calls made afterwards return ErrClosed. Close
// is safe to call more than once and waits for the client's goroutines.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.reportMu.Lock()
		c.closeBegun = true
		reported := c.terminalReport
		c.reportMu.Unlock()
		c.closing.Store(true)
		start := time.Now()
		c.acker.stopSubscriptions()
		// The acks' flush gets what is left of 5 s (at least 500 ms); none
		// after a terminal failure (no connection will come for them).
		flush := max(5*time.Second-time.Since(start), 500*time.Millisecond)
		if reported {
			flush = 0
		}
		c.acker.flushAndStop(flush)
		c.wgMu.Lock()
		close(c.closed)
		c.wgMu.Unlock()
		c.cancel()
		c.sends.failPending()
		if !reported {
			c.supervisor.Wait() // first: it starts goroutines of c.wg
		}
		c.wg.Wait()
		// Read after the supervisor has ended: a reconnect that finished
		// as Close began has installed its connection by then. (After a
		// terminal failure there is no connection.)
		if cc := c.current(); cc != nil {
			cc.close()
		}
		if !reported {
			c.emit(StateChange{State: StateClosed})
		}
	})
	return c.acker.lastErr
}
