package h3xtest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
)

// Credentials of the ready test client that NewServer's default registry
// holds. It may publish and consume every namespace.
const (
	ClientID = "test"
	Token    = "test-token"
)

// Option configures NewServer.
type Option func(*config)

type config struct {
	serverOpts []h3x.ServerOption
	queue      h3x.Queue
	badger     bool
	registry   h3x.Registry
}

// WithServerOptions passes options to h3x.NewServer (after h3xtest's own,
// so they win). Do not pass h3x.WithQueue, h3x.WithRegistry, h3x.WithAddr,
// h3x.WithPacketConn or h3x.WithTLSConfig here: use WithQueue and
// WithRegistry (the server must listen on h3xtest's own socket, which Addr,
// Dial and SetLatency use). Queue settings
// (h3x.WithQueueOptions, h3x.WithMaxAttempts) are refused by NewServer,
// since h3xtest always gives the server its queue: pass
// WithQueue(h3x.NewMemoryQueue(opts)) instead.
func WithServerOptions(opts ...h3x.ServerOption) Option {
	return func(c *config) { c.serverOpts = append(c.serverOpts, opts...) }
}

// WithBadger stores events in a Badger queue in a temporary directory
// instead of the in-memory queue.
func WithBadger() Option { return func(c *config) { c.badger = true } }

// WithQueue stores events in q; the server closes it when the test ends.
func WithQueue(q h3x.Queue) Option { return func(c *config) { c.queue = q } }

// WithRegistry replaces the default registry (which holds only the test
// client).
func WithRegistry(r h3x.Registry) Option { return func(c *config) { c.registry = r } }

// Server is a broker started for one test, with fault hooks.
type Server struct {
	t        testing.TB
	cfg      config
	queue    h3x.Queue // survives Restart
	tlsConf  *tls.Config
	fp       string
	addr     *net.UDPAddr
	registry *faultRegistry

	restartMu sync.Mutex // one Restart at a time
	closed    bool       // the test's cleanup has stopped the server (under restartMu)

	mu       sync.Mutex
	srv      *h3x.Server
	pc       *latencyConn
	handlers map[h3x.FrameType]h3x.Handler
	latency  atomic.Int64
}

// NewServer starts a broker for t on a random loopback port, with an
// in-memory queue and a registry holding the test client (ClientID, Token)
// with every permission on every namespace, no limit on the rate of new
// connections (h3x.WithConnectionRate) and no slow-down of failed
// authentications (h3x.WithAuthFailureSlowdown). t.Cleanup stops it.
//
//	srv := h3xtest.NewServer(t)
//	c := srv.Dial(t)
//	c.Publish(ctx, h3x.Event{Namespace: "orders", Message: "hello"})
func NewServer(t testing.TB, opts ...Option) *Server {
	t.Helper()
	s := &Server{t: t, handlers: make(map[h3x.FrameType]h3x.Handler)}
	for _, o := range opts {
		o(&s.cfg)
	}
	reg := s.cfg.registry
	if reg == nil {
		r, err := h3x.ParseRegistry(ClientID + ":*=" + Token)
		if err != nil {
			t.Fatalf("h3xtest: registry: %v", err)
		}
		reg = r
	}
	s.registry = &faultRegistry{Registry: reg}
	switch {
	case s.cfg.queue != nil:
		s.queue = s.cfg.queue
	case s.cfg.badger:
		q, err := h3x.OpenBadgerQueue(t.TempDir(), h3x.QueueOptions{Durability: h3x.DurabilityNoSync})
		if err != nil {
			t.Fatalf("h3xtest: Badger queue: %v", err)
		}
		s.queue = q
	default:
		s.queue = h3x.NewMemoryQueue(h3x.QueueOptions{})
	}
	cert, err := testCertificate()
	if err != nil {
		t.Fatalf("h3xtest: certificate: %v", err)
	}
	s.tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}}
	s.fp = h3x.Fingerprint(cert.Certificate[0])
	t.Cleanup(s.close)
	if err := s.start(&net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
		t.Fatal(err)
	}
	return s
}

// start starts a server instance on addr; the first call sets s.addr,
// which stays the same for the Server's life.
func (s *Server) start(addr *net.UDPAddr) error {
	udp, err := net.ListenUDP("udp", addr)
	if err != nil {
		return fmt.Errorf("h3xtest: listening: %w", err)
	}
	if s.addr == nil {
		s.addr = udp.LocalAddr().(*net.UDPAddr)
	}
	pc := &latencyConn{udp: udp, delay: &s.latency}
	opts := append([]h3x.ServerOption{
		h3x.WithQueue(keepOpen{s.queue}),
		h3x.WithRegistry(s.registry),
		h3x.WithTLSConfig(s.tlsConf),
		h3x.WithPacketConn(pc),
		// A test may open many clients at once from one address, and fail
		// to authenticate on purpose many times; the flood protection is
		// for servers on a network (WithServerOptions can turn both back
		// on).
		h3x.WithConnectionRate(h3x.RateLimit{}),
		h3x.WithAuthFailureSlowdown(false),
	}, s.cfg.serverOpts...)
	srv, err := h3x.NewServer(opts...)
	if err != nil {
		udp.Close()
		return fmt.Errorf("h3xtest: NewServer: %w", err)
	}
	if err := srv.Start(context.Background()); err != nil {
		srv.Close()
		udp.Close()
		return fmt.Errorf("h3xtest: Start: %w", err)
	}
	// The handlers go in under s.mu, with s.srv: a Handle call either
	// comes before (its handler is in s.handlers) or after (it sees s.srv).
	s.mu.Lock()
	for ft, h := range s.handlers {
		srv.Handle(ft, h)
	}
	s.srv, s.pc = srv, pc
	s.mu.Unlock()
	return nil
}

func (s *Server) stop() {
	s.mu.Lock()
	srv, pc := s.srv, s.pc
	s.srv, s.pc = nil, nil
	s.mu.Unlock()
	if srv == nil {
		return
	}
	if err := srv.Close(); err != nil {
		s.t.Errorf("h3xtest: closing the server: %v", err)
	}
	pc.close()
}

func (s *Server) close() {
	s.restartMu.Lock() // a Restart under way finishes first; none starts after
	s.closed = true
	s.restartMu.Unlock()
	s.stop()
	if err := s.queue.Close(); err != nil {
		s.t.Errorf("h3xtest: closing the queue: %v", err)
	}
}

// Addr returns the server's address (host:port) for h3x.Dial. It stays the
// same across Restart.
func (s *Server) Addr() string { return s.addr.String() }

// Fingerprint returns the SHA-256 fingerprint of the server's certificate,
// which stays the same across Restart.
func (s *Server) Fingerprint() string { return s.fp }

// Server returns the running h3x.Server (a new one after Restart; nil
// while a Restart is under way, and after the test).
func (s *Server) Server() *h3x.Server {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.srv
}

// Queue returns the server's queue, which survives Restart.
func (s *Server) Queue() h3x.Queue { return s.queue }

// Handle registers an application handler, kept across Restart.
func (s *Server) Handle(t h3x.FrameType, h h3x.Handler) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handlers[t] = h
	if s.srv != nil { // nil while a Restart is under way: it registers h
		s.srv.Handle(t, h)
	}
}

// ClientOptions returns the options that connect to this server as the
// test client: its credentials and the server's pinned certificate.
func (s *Server) ClientOptions() []h3x.ClientOption {
	return []h3x.ClientOption{
		h3x.WithCredentials(ClientID, Token),
		h3x.WithTrustedFingerprint(s.fp),
	}
}

// Dial connects a client to the server (as the test client unless opts say
// otherwise), fails the test if it cannot, and closes the client in
// t.Cleanup.
func (s *Server) Dial(t testing.TB, opts ...h3x.ClientOption) *h3x.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := h3x.Dial(ctx, s.Addr(), append(s.ClientOptions(), opts...)...)
	if err != nil {
		t.Fatalf("h3xtest: Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// DropConnections closes every client connection at once, without a
// GoAway; their leases are released and clients reconnect by themselves.
// Clients see the close at once (it is a QUIC CONNECTION_CLOSE): for a
// network that goes silent, which clients must detect by themselves, put a
// fault proxy between them and the server. During a Restart there is no
// connection to drop.
func (s *Server) DropConnections() {
	if srv := s.Server(); srv != nil {
		srv.DropConnections()
	}
}

// RefuseAuth makes every authentication fail (refuse true) or work again.
func (s *Server) RefuseAuth(refuse bool) { s.registry.refuse.Store(refuse) }

// SetLatency delays every packet the server sends by d (0: none), adding d
// to every round trip.
func (s *Server) SetLatency(d time.Duration) { s.latency.Store(int64(d)) }

// Restart stops the server at once and starts a new one on the same
// address, with the same queue, registry, certificate and handlers, as a
// crashed and restarted broker would come back. It may be called from any
// goroutine, also while clients and other methods use the server;
// Restarts run one at a time. If the new instance cannot start (another
// process took the port meanwhile), Restart marks the test failed
// (t.Errorf of the test that made the server) and the server stays down.
func (s *Server) Restart() {
	s.restartMu.Lock()
	defer s.restartMu.Unlock()
	if s.closed {
		return // the test is over
	}
	s.stop()
	if err := s.start(s.addr); err != nil {
		s.t.Errorf("h3xtest: Restart: %v", err)
	}
}

// keepOpen keeps the shared queue open when a server instance closes.
type keepOpen struct{ h3x.Queue }

func (keepOpen) Close() error { return nil }

// Unwrap returns the wrapped queue, so the server still announces a
// built-in queue's dead-letter and dedup settings.
func (k keepOpen) Unwrap() h3x.Queue { return k.Queue }

// faultRegistry can refuse every authentication.
type faultRegistry struct {
	h3x.Registry
	refuse atomic.Bool
}

func (r *faultRegistry) Authenticate(ctx context.Context, clientID, token string) (h3x.Grants, error) {
	if r.refuse.Load() {
		return nil, &h3x.Error{Code: h3x.CodeUnauthenticated, Message: "refused by h3xtest"}
	}
	return r.Registry.Authenticate(ctx, clientID, token)
}

// latencyConn delays the packets the server writes. It wraps the socket as
// a plain net.PacketConn (not embedding *net.UDPConn, whose batch-write
// methods quic-go would otherwise use, bypassing WriteTo).
type latencyConn struct {
	udp    *net.UDPConn
	delay  *atomic.Int64
	wg     sync.WaitGroup
	closed atomic.Bool
}

func (c *latencyConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	d := time.Duration(c.delay.Load())
	if d <= 0 {
		return c.udp.WriteTo(b, addr)
	}
	pkt := append([]byte(nil), b...)
	c.wg.Add(1)
	time.AfterFunc(d, func() {
		defer c.wg.Done()
		if !c.closed.Load() {
			c.udp.WriteTo(pkt, addr)
		}
	})
	return len(b), nil
}

func (c *latencyConn) close() {
	c.closed.Store(true)
	c.wg.Wait()
	c.udp.Close()
}

func (c *latencyConn) SetReadBuffer(n int) error                { return c.udp.SetReadBuffer(n) }
func (c *latencyConn) SetWriteBuffer(n int) error               { return c.udp.SetWriteBuffer(n) }
func (c *latencyConn) ReadFrom(b []byte) (int, net.Addr, error) { return c.udp.ReadFrom(b) }
func (c *latencyConn) Close() error                             { return nil } // closed by the Server after the h3x.Server
func (c *latencyConn) LocalAddr() net.Addr                      { return c.udp.LocalAddr() }
func (c *latencyConn) SetDeadline(t time.Time) error            { return c.udp.SetDeadline(t) }
func (c *latencyConn) SetReadDeadline(t time.Time) error        { return c.udp.SetReadDeadline(t) }
func (c *latencyConn) SetWriteDeadline(t time.Time) error       { return c.udp.SetWriteDeadline(t) }

// testCertificate makes a self-signed certificate for the loopback
// addresses.
func testCertificate() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "h3xtest"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
