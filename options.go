package h3x

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"
)

// ServerOption configures a Server (see NewServer).
type ServerOption interface{ applyServer(*serverConfig) }

// ClientOption configures a Client (see Dial).
type ClientOption interface{ applyClient(*clientConfig) }

// Option configures both a Server and a Client.
type Option interface {
	ServerOption
	ClientOption
}

type serverOptionFunc func(*serverConfig)

func (f serverOptionFunc) applyServer(c *serverConfig) { f(c) }

type clientOptionFunc func(*clientConfig)

func (f clientOptionFunc) applyClient(c *clientConfig) { f(c) }

type sharedOption struct {
	server func(*serverConfig)
	client func(*clientConfig)
}

func (o sharedOption) applyServer(c *serverConfig) { o.server(c) }
func (o sharedOption) applyClient(c *clientConfig) { o.client(c) }

// Server defaults, in one place.
const (
	DefaultAddr                 = "127.0.0.1:4433"
	DefaultDataDir              = "h3x-data"
	DefaultAckDeadline          = 30 * time.Second
	DefaultAuthTimeout          = 5 * time.Second
	DefaultMaxConnections       = 10000
	DefaultMaxStreams           = 100
	DefaultMaxFetchLimit        = 1000
	DefaultMaxFetchWait         = 30 * time.Second
	DefaultMaxEventsPerSend     = 1000
	DefaultIdleTimeout          = 30 * time.Second
	DefaultFetchMaxBytes        = 512 << 10
	DefaultMaxUnackedPerSession = 10000
	// DefaultMaxUnackedPerSubscription caps the unsettled deliveries of one
	// subscription (WithMaxUnackedPerSubscription).
	DefaultMaxUnackedPerSubscription = 4096
)

type serverConfig struct {
	addr             string
	tlsConfig        *tls.Config
	certFile         string
	keyFile          string
	queue            Queue
	dataDir          string
	queueOpts        QueueOptions
	maxAttempts      int
	queueOptsSet     bool // WithQueueOptions was given
	registry         Registry
	logger           *slog.Logger
	ackDeadline      time.Duration
	authTimeout      time.Duration
	maxFrameSize     int
	maxConnections   int
	maxStreams       int
	maxFetchLimit    int
	maxFetchWait     time.Duration
	maxEventsPerSend int
	idleTimeout      time.Duration
	packetConn       net.PacketConn
	hooks            Hooks
	rateLimits       map[string]RateLimit
	maxUnacked       int
	maxUnackedPerSub int
	fetchLinger      time.Duration
	connRate         RateLimit
	connRatePerIP    RateLimit
	authSlowdownOff  bool
}

func defaultServerConfig() serverConfig {
	dataDir := os.Getenv("H3X_DATA_DIR")
	if dataDir == "" {
		dataDir = DefaultDataDir
	}
	return serverConfig{
		addr:             DefaultAddr,
		dataDir:          dataDir,
		ackDeadline:      DefaultAckDeadline,
		authTimeout:      DefaultAuthTimeout,
		maxFrameSize:     DefaultMaxFrameSize,
		maxConnections:   DefaultMaxConnections,
		maxStreams:       DefaultMaxStreams,
		maxFetchLimit:    DefaultMaxFetchLimit,
		maxFetchWait:     DefaultMaxFetchWait,
		maxEventsPerSend: DefaultMaxEventsPerSend,
		idleTimeout:      DefaultIdleTimeout,
		hooks:            NopHooks{},
		maxUnacked:       DefaultMaxUnackedPerSession,
		maxUnackedPerSub: DefaultMaxUnackedPerSubscription,
		connRate:         DefaultConnectionRate,
		connRatePerIP:    DefaultConnectionRatePerIP,
	}
}

// validate reports every problem of the configuration at once.
func (c *serverConfig) validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, newError(CodeInvalidArgument, format, args...)) }
	if c.packetConn == nil {
		if _, port, err := net.SplitHostPort(c.addr); err != nil {
			bad("WithAddr(%q): %v", c.addr, err)
		} else if _, err := net.LookupPort("udp", port); err != nil {
			bad("WithAddr(%q): invalid port %q", c.addr, port)
		}
	}
	if c.tlsConfig != nil && c.certFile != "" {
		bad("WithTLSConfig and WithCertFiles are mutually exclusive")
	}
	if t := c.tlsConfig; t != nil && len(t.Certificates) == 0 && t.GetCertificate == nil && t.GetConfigForClient == nil {
		bad("WithTLSConfig: the configuration holds no certificate")
	}
	if (c.certFile == "") != (c.keyFile == "") {
		bad("WithCertFiles needs both a certificate and a key file")
	}
	if c.queue != nil && c.maxAttempts != 0 {
		bad("WithMaxAttempts configures the queue the server opens; with WithQueue set it on that queue")
	}
	if c.queue != nil && c.queueOptsSet {
		bad("WithQueueOptions configures the queue the server opens; with WithQueue give them to that queue's constructor")
	}
	if c.ackDeadline <= 0 {
		bad("ack deadline must be positive, got %v", c.ackDeadline)
	}
	if c.authTimeout <= 0 {
		bad("auth timeout must be positive, got %v", c.authTimeout)
	}
	if c.maxFrameSize < 1024 || c.maxFrameSize > 64<<20 {
		bad("max frame size must be between 1 KiB and 64 MiB, got %d", c.maxFrameSize)
	}
	if c.maxConnections <= 0 {
		bad("max connections must be positive, got %d", c.maxConnections)
	}
	if c.maxStreams <= 0 {
		bad("max streams must be positive, got %d", c.maxStreams)
	}
	if c.maxFetchLimit <= 0 {
		bad("max fetch limit must be positive, got %d", c.maxFetchLimit)
	}
	if c.maxFetchWait < 0 {
		bad("max fetch wait must not be negative, got %v", c.maxFetchWait)
	}
	if c.maxEventsPerSend <= 0 {
		bad("max events per send must be positive, got %d", c.maxEventsPerSend)
	}
	for ns, l := range c.rateLimits {
		if ns != "*" && ValidateNamespace(ns) != nil {
			bad("WithRateLimit(%q): %v", ns, ValidateNamespace(ns))
		}
		if !(l.Rate > 0 && l.Rate <= MaxRate) || l.Burst < 0 {
			bad("WithRateLimit(%q): rate must be positive and at most MaxRate, burst not negative, got %+v", ns, l)
		}
	}
	if !(c.connRate.Rate >= 0 && c.connRate.Rate <= MaxRate) || c.connRate.Burst < 0 {
		bad("WithConnectionRate: rate must be between 0 and MaxRate and burst not negative, got %+v", c.connRate)
	}
	if !(c.connRatePerIP.Rate >= 0 && c.connRatePerIP.Rate <= MaxRate) || c.connRatePerIP.Burst < 0 {
		bad("WithConnectionRatePerIP: rate must be between 0 and MaxRate and burst not negative, got %+v", c.connRatePerIP)
	}
	if c.maxUnacked < 0 {
		bad("WithMaxUnacked must not be negative, got %d", c.maxUnacked)
	}
	if c.maxUnackedPerSub < 0 {
		bad("WithMaxUnackedPerSubscription must not be negative, got %d", c.maxUnackedPerSub)
	}
	if c.fetchLinger < 0 {
		bad("WithFetchLinger must not be negative, got %v", c.fetchLinger)
	}
	if c.hooks == nil {
		bad("WithHooks: nil hooks")
	}
	if c.idleTimeout < time.Second {
		bad("idle timeout must be at least 1s, got %v", c.idleTimeout)
	}
	return errors.Join(errs...)
}

// WithAddr sets the UDP address ListenAndServe and Start listen on.
// Default DefaultAddr ("127.0.0.1:4433"); use ":4433" for every interface
// and "127.0.0.1:0" for a random port.
func WithAddr(addr string) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.addr = addr })
}

// WithCertFiles makes the server use the PEM certificate chain and key in
// the given files. Default: none (see WithTLSConfig).
func WithCertFiles(certFile, keyFile string) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.certFile, c.keyFile = certFile, keyFile })
}

// WithQueue makes the server store events in q instead of opening a Badger
// queue in the data directory. The server owns q once NewServer has
// returned it: Shutdown and Close close it. (If NewServer fails, q is still
// the caller's to close.) Default: a Badger queue in WithDataDir's
// directory.
func WithQueue(q Queue) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.queue = q })
}

// WithDataDir sets the directory of the server's default Badger queue.
// Default: $H3X_DATA_DIR, or DefaultDataDir ("h3x-data") when unset.
func WithDataDir(dir string) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.dataDir = dir })
}

// WithQueueOptions configures the Badger queue the server opens (dedup
// window, limits, durability, ...). Default: the zero QueueOptions, that is
// every queue default. With WithQueue, NewServer refuses it: give the
// options to that queue's constructor.
func WithQueueOptions(o QueueOptions) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.queueOpts, c.queueOptsSet = o, true })
}

// WithMaxAttempts sets how many deliveries an event gets before it moves to
// its dead-letter namespace, for the queue the server opens. Default
// DefaultMaxAttempts (10).
func WithMaxAttempts(n int) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.maxAttempts = n })
}

// WithRegistry sets who may connect and what they may do. Default: the
// registry in $H3X_REGISTRY (see ParseRegistry); NewServer fails when neither
// is given.
func WithRegistry(r Registry) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.registry = r })
}

// WithAckDeadline sets how long a delivery stays leased without an ack,
// nack or extension. Default DefaultAckDeadline (30s).
func WithAckDeadline(d time.Duration) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.ackDeadline = d })
}

// WithAuthTimeout sets how long a new connection has to authenticate
// before it is closed with CodeAuthTimeout. Default DefaultAuthTimeout (5s).
func WithAuthTimeout(d time.Duration) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.authTimeout = d })
}

// WithMaxConnections caps concurrent connections; beyond it new connections
// are closed with CodeTooManyConnections. Default DefaultMaxConnections (10,000).
func WithMaxConnections(n int) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.maxConnections = n })
}

// WithMaxStreams caps the concurrent bidirectional streams a client may open
// on one connection (QUIC stream flow control: the client's next open
// waits). Default DefaultMaxStreams (100).
func WithMaxStreams(n int) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.maxStreams = n })
}

// WithMaxFetchLimit caps the events one FetchEvents may return. Default
// DefaultMaxFetchLimit (1,000).
func WithMaxFetchLimit(n int) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.maxFetchLimit = n })
}

// WithMaxFetchWait caps how long a FetchEvents may long-poll. Default
// DefaultMaxFetchWait (30s).
func WithMaxFetchWait(d time.Duration) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.maxFetchWait = d })
}

// WithMaxEventsPerSend caps the events of one SendEvent frame. Default
// DefaultMaxEventsPerSend (1,000).
func WithMaxEventsPerSend(n int) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.maxEventsPerSend = n })
}

// WithIdleTimeout closes connections that have been silent this long; the
// server and the client send keep-alives at a third of it. While calls wait
// (a subscription's long poll, say), the client also pings the server every
// sixth of it (at least 500 ms) and reconnects when a Pong does not come
// within a sixth (at least 1 s, or a few round trips on a slower path): a
// server that died sends nothing. Default DefaultIdleTimeout (30s).
func WithIdleTimeout(d time.Duration) Option {
	return sharedOption{
		server: func(c *serverConfig) { c.idleTimeout = d },
		client: func(c *clientConfig) { c.idleTimeout = d },
	}
}

// WithLogger sends logs to l. Default: discarded. Tokens are never logged.
func WithLogger(l *slog.Logger) Option {
	return sharedOption{
		server: func(c *serverConfig) { c.logger = l },
		client: func(c *clientConfig) { c.logger = l },
	}
}

// WithTLSConfig sets the TLS configuration. For a server it must hold a
// certificate; default: a self-signed ECDSA development certificate whose
// SHA-256 fingerprint is logged and returned by Server.Fingerprint (kept in
// the data directory as dev-cert.pem/dev-key.pem when the server opens its
// own Badger queue, so the fingerprint survives restarts; in memory with
// WithQueue). For a
// client, default: the system roots; ALPN and TLS 1.3 are set by H3X.
func WithTLSConfig(cfg *tls.Config) Option {
	return sharedOption{
		server: func(c *serverConfig) { c.tlsConfig = cfg },
		client: func(c *clientConfig) { c.tlsConfig = cfg },
	}
}

// WithMaxFrameSize sets the largest frame payload accepted from the peer.
// Default DefaultMaxFrameSize (1 MiB).
func WithMaxFrameSize(n int) Option {
	return sharedOption{
		server: func(c *serverConfig) { c.maxFrameSize = n },
		client: func(c *clientConfig) { c.maxFrameSize = n },
	}
}

// WithPacketConn makes the server listen on, or the client dial from, conn
// instead of a socket of its own (for tests with simulated networks).
// Default: none. The caller keeps ownership of conn.
func WithPacketConn(conn net.PacketConn) Option {
	return sharedOption{
		server: func(c *serverConfig) { c.packetConn = conn },
		client: func(c *clientConfig) { c.packetConn = conn },
	}
}

// loadCertFiles reads a PEM key pair into a TLS configuration.
func loadCertFiles(certFile, keyFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("h3x: loading TLS certificate %s and key %s: %w", certFile, keyFile, err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}}, nil
}

// normalizeFingerprint lower-cases a hex SHA-256 fingerprint and drops ':'
// separators.
func normalizeFingerprint(fp string) string {
	return strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(fp, "sha256:"), ":", ""))
}

// WithMaxUnacked caps the deliveries one connection holds unsettled (leased,
// not yet acked or nacked, lease not expired); fetches beyond it wait for
// acks. 0 means no cap (each subscription is still capped by
// WithMaxUnackedPerSubscription). Default DefaultMaxUnackedPerSession
// (10,000).
func WithMaxUnacked(n int) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.maxUnacked = n })
}

// WithMaxUnackedPerSubscription caps the deliveries one subscription holds
// unsettled, so that one subscription cannot take its connection's whole
// WithMaxUnacked: a subscription is a stream's fetches (the Go client's
// Subscribe has a stream of its own; its Fetch calls use pooled streams,
// concurrent ones different streams). A fetch returns at most the room left
// under both caps, and waits for acks when there is none. 0 means no cap.
// Default DefaultMaxUnackedPerSubscription (4,096).
func WithMaxUnackedPerSubscription(n int) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.maxUnackedPerSub = n })
}

// WithFetchLinger makes a fetch that found fewer events than it may return
// wait up to d for more before answering, trading latency for larger
// batches. Default 0: answer at once (latency first).
func WithFetchLinger(d time.Duration) ServerOption {
	return serverOptionFunc(func(c *serverConfig) { c.fetchLinger = d })
}
