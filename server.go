package h3x

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/sync/errgroup"
)

// Server is an H3X broker. Create one with NewServer, start it with Start,
// ListenAndServe or Serve, and stop it with Shutdown or Close.
type Server struct {
	cfg    serverConfig
	logger *slog.Logger
	queue  Queue
	// checksUTF8 is true when queue is (or unwraps to) a built-in one,
	// which refuses events that are not valid UTF-8: their leases need
	// no check.
	checksUTF8 bool
	registry   Registry
	tlsConf    *tls.Config
	quicConf   *quic.Config
	fp         string // SHA-256 fingerprint of the leaf certificate
	devCert    bool   // the certificate is a self-signed development one
	holderID   string // random prefix of this server's lease holders

	limiters limiters
	fair     *fairShare // each namespace's share of the queue's pipeline while several publish

	handlersMu sync.RWMutex
	handlers   map[FrameType]Handler

	mu        sync.Mutex
	started   bool
	closing   bool // Shutdown or Close has begun
	transport *quic.Transport
	listener  *quic.Listener
	ownConn   net.PacketConn // the socket the server opened itself, if any
	addr      net.Addr
	conns     map[*serverConn]struct{}
	connSeq   uint64

	shutdownCh  chan struct{}   // closed when Shutdown or Close begins
	shutdownCtx context.Context // cancelled when Shutdown or Close begins
	cancelShut  context.CancelFunc
	// stopCtx is the context of queue calls that a client's going away
	// must not cancel (a store in progress completes): cancelled when the
	// server stops at once (Close, or Shutdown's ctx ending), so that a
	// queue call cannot hold the stop up.
	stopCtx    context.Context
	cancelStop context.CancelFunc
	doneCh     chan struct{} // closed when everything is stopped
	closeOnce  sync.Once
	closeErr   error
	wg         sync.WaitGroup // the accept loop and every connection

	connCount atomic.Int64
	admission *admission // set by start
	authGuard authGuard
}

// NewServer returns a server configured by opts. It validates the
// configuration (reporting every problem at once, each matching
// ErrInvalidArgument), opens the queue (a Badger
// queue in the data directory unless WithQueue is given) and prepares TLS.
// It does not listen yet.
func NewServer(opts ...ServerOption) (*Server, error) {
	cfg := defaultServerConfig()
	for _, o := range opts {
		o.applyServer(&cfg)
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &Server{
		cfg:        cfg,
		logger:     cfg.logger,
		handlers:   make(map[FrameType]Handler),
		conns:      make(map[*serverConn]struct{}),
		shutdownCh: make(chan struct{}),
		doneCh:     make(chan struct{}),
		fair:       newFairShare(),
	}
	if s.logger == nil {
		s.logger = slog.New(slog.DiscardHandler)
	}
	s.shutdownCtx, s.cancelShut = context.WithCancel(context.Background())
	s.stopCtx, s.cancelStop = context.WithCancel(context.Background())
	s.limiters.cfg = cfg.rateLimits
	s.authGuard.off = cfg.authSlowdownOff
	s.authGuard.maxDelay, s.authGuard.margin = authGuardLimits(cfg.authTimeout) // a turn leaves time to authenticate
	var id [8]byte
	rand.Read(id[:])
	s.holderID = hex.EncodeToString(id[:])

	s.registry = cfg.registry
	if s.registry == nil {
		r, err := RegistryFromEnv()
		switch {
		case errors.Is(err, ErrNoRegistry):
			return nil, fmt.Errorf("h3x: no registry: pass WithRegistry or set H3X_REGISTRY: %w", err)
		case err != nil:
			return nil, err // it names H3X_REGISTRY and what is wrong
		}
		s.registry = r
	}
	if err := s.setupTLS(); err != nil {
		return nil, err
	}
	// QUIC settings, chosen for many modest clients rather than a few bulk
	// transfers:
	//   - handshake timeout = the auth timeout: a peer gets no longer to
	//     finish TLS than to authenticate;
	//   - idle timeout (default 30 s) with keep-alives at a third of it, so
	//     live but quiet connections stay up and dead ones go away;
	//   - MaxIncomingStreams caps concurrent client streams (stream credit
	//     is returned only when both directions of a stream are done, which
	//     every handler ensures); no unidirectional streams;
	//   - flow-control windows start at 512 KiB per stream / 128 KiB per
	//     connection and may grow to 2 MiB / 4 MiB (quic-go's defaults grow
	//     to 6 / 15 MiB), which bounds the memory a connection can pin. The
	//     connection's window starts small because it is granted at the
	//     handshake: a peer that never authenticates can make the server
	//     buffer that much on streams it opened (they are not read before
	//     Auth), so a few hundred KiB at most rather than 1 MiB, for each of
	//     up to 1,000 connections waiting to authenticate (maxUnauthenticated);
	//     an authenticated connection's window grows as its data is read.
	s.quicConf = &quic.Config{
		HandshakeIdleTimeout:           cfg.authTimeout,
		MaxIdleTimeout:                 cfg.idleTimeout,
		KeepAlivePeriod:                cfg.idleTimeout / 3,
		MaxIncomingStreams:             int64(cfg.maxStreams),
		MaxIncomingUniStreams:          -1,
		InitialStreamReceiveWindow:     512 << 10,
		MaxStreamReceiveWindow:         2 << 20,
		InitialConnectionReceiveWindow: preAuthConnectionWindow,
		MaxConnectionReceiveWindow:     4 << 20,
	}
	s.queue = cfg.queue
	if s.queue == nil {
		qo := cfg.queueOpts
		if cfg.maxAttempts != 0 {
			qo.MaxAttempts = cfg.maxAttempts
		}
		if qo.Logger == nil {
			qo.Logger = s.logger
		}
		q, err := OpenBadgerQueue(cfg.dataDir, qo)
		if err != nil {
			return nil, err
		}
		s.queue = q
	}
	switch unwrapQueue(s.queue).(type) {
	case *memoryQueue, *badgerQueue:
		// A wrapper (Unwrap) that rewrites events is still caught when
		// its batch fails to encode (releaseUnencodable).
		s.checksUTF8 = true
	}
	return s, nil
}

// preAuthConnectionWindow is a connection's initial flow-control window
// (see NewServer).
const preAuthConnectionWindow = 128 << 10

func (s *Server) setupTLS() error {
	var conf *tls.Config
	switch {
	case s.cfg.tlsConfig != nil:
		conf = s.cfg.tlsConfig.Clone()
	case s.cfg.certFile != "":
		c, err := loadCertFiles(s.cfg.certFile, s.cfg.keyFile)
		if err != nil {
			return err
		}
		conf = c
	default:
		var cert tls.Certificate
		var err error
		if s.cfg.queue == nil {
			// Kept in the data directory, so its fingerprint survives restarts.
			cert, err = devCertificate(s.cfg.dataDir)
		} else {
			cert, err = selfSignedCert()
		}
		if err != nil {
			return fmt.Errorf("h3x: making a self-signed certificate: %w", err)
		}
		conf = &tls.Config{Certificates: []tls.Certificate{cert}}
		s.fp = Fingerprint(cert.Certificate[0])
		s.devCert = true // said when the server starts (not for a failed start)
	}
	if s.fp == "" && len(conf.Certificates) > 0 && len(conf.Certificates[0].Certificate) > 0 {
		s.fp = Fingerprint(conf.Certificates[0].Certificate[0])
	}
	conf.NextProtos = []string{ALPN}
	conf.MinVersion = tls.VersionTLS13
	s.tlsConf = conf
	return nil
}

// Fingerprint returns the lower-case hex SHA-256 of the server's
// certificate, for clients to pin with WithTrustedFingerprint.
func (s *Server) Fingerprint() string { return s.fp }

// Handle registers h for streams whose first frame has type t, which must be
// at least FirstApplicationFrameType (0x80). It panics on a protocol frame
// type or a duplicate registration, like http.ServeMux.
func (s *Server) Handle(t FrameType, h Handler) {
	if t < FirstApplicationFrameType {
		panic(fmt.Sprintf("h3x: Handle(%v): frame types below 0x80 are reserved for the protocol", t))
	}
	if h == nil {
		panic("h3x: Handle: nil handler")
	}
	s.handlersMu.Lock()
	defer s.handlersMu.Unlock()
	if _, dup := s.handlers[t]; dup {
		panic(fmt.Sprintf("h3x: Handle(%v): already registered", t))
	}
	s.handlers[t] = h
}

func (s *Server) handler(t FrameType) Handler {
	s.handlersMu.RLock()
	defer s.handlersMu.RUnlock()
	return s.handlers[t]
}

// Addr returns the address the server listens on, or nil before it started.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Start listens on the configured address (or WithPacketConn's connection)
// and serves in the background; it returns once the server is listening, so
// Addr is set. Stop the server with Shutdown or Close. If ctx ends, the
// server shuts down (as Shutdown with a 5 s bound).
func (s *Server) Start(ctx context.Context) error {
	pc := s.cfg.packetConn
	var own net.PacketConn
	if pc == nil {
		udpAddr, err := net.ResolveUDPAddr("udp", s.cfg.addr)
		if err != nil {
			return fmt.Errorf("h3x: resolving %q: %w", s.cfg.addr, err)
		}
		c, err := net.ListenUDP("udp", udpAddr)
		if err != nil {
			return fmt.Errorf("h3x: listening on %s: %w", s.cfg.addr, err)
		}
		pc, own = c, c
	}
	if err := s.start(ctx, pc, own); err != nil {
		if own != nil {
			own.Close()
		}
		return err
	}
	return nil
}

// ListenAndServe is Start followed by waiting until the server stops. It
// returns ErrServerClosed once the server has been shut down or closed (by
// Shutdown, Close or the end of ctx).
func (s *Server) ListenAndServe(ctx context.Context) error {
	if err := s.Start(ctx); err != nil {
		return err
	}
	<-s.doneCh
	return ErrServerClosed
}

// Serve serves on conn, which the caller owns (the server does not close
// it), until the server stops, and returns ErrServerClosed.
func (s *Server) Serve(ctx context.Context, conn net.PacketConn) error {
	if err := s.start(ctx, conn, nil); err != nil {
		return err
	}
	<-s.doneCh
	return ErrServerClosed
}

func (s *Server) start(ctx context.Context, pc net.PacketConn, own net.PacketConn) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return ErrServerClosed
	}
	if s.started {
		return errors.New("h3x: server already started")
	}
	key := statelessResetKey(s.tlsConf)
	s.admission = newAdmission(s.cfg.connRate, s.cfg.connRatePerIP, s.maxUnauthenticated(), s.cfg.maxConnections, time.Now())
	tr := &quic.Transport{Conn: pc, StatelessResetKey: &key,
		VerifySourceAddress: s.admission.verifySourceAddress, ConnContext: s.admission.connContext}
	ln, err := tr.Listen(s.tlsConf, s.quicConf)
	if err != nil {
		tr.Close()
		return fmt.Errorf("h3x: listening: %w", err)
	}
	s.started = true
	s.transport, s.listener, s.ownConn, s.addr = tr, ln, own, ln.Addr()
	if s.devCert {
		s.logger.Warn("h3x: no TLS configured; using a self-signed development certificate",
			"sha256", s.fp)
	}
	s.logger.Info("h3x: serving", "addr", s.addr.String())
	s.wg.Add(1)
	go s.acceptLoop(ln)
	if ctx.Done() != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			select {
			case <-ctx.Done():
				// Not in this goroutine: Shutdown waits for s.wg, which
				// counts it. The bound's context belongs to the Shutdown
				// goroutine (cancelled here, it would end the drain at once).
				go func() {
					sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					defer cancel()
					s.Shutdown(sctx)
				}()
			case <-s.shutdownCh:
			}
		}()
	}
	return nil
}

// acceptLoop accepts connections and hands each to its own goroutine; it
// never waits on per-connection work.
func (s *Server) acceptLoop(ln *quic.Listener) {
	defer s.wg.Done()
	for {
		qc, err := ln.Accept(context.Background())
		if err != nil {
			return
		}
		// Admission control (admission.go) refused attempts beyond the
		// limits before their handshake; this check is a backstop.
		if s.connCount.Load() >= int64(s.cfg.maxConnections) {
			qc.CloseWithError(quic.ApplicationErrorCode(CodeTooManyConnections), "too many connections")
			continue
		}
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			qc.CloseWithError(quic.ApplicationErrorCode(CodeShuttingDown), "shutting down")
			continue
		}
		s.connSeq++
		c := newServerConn(s, qc, s.connSeq)
		s.conns[c] = struct{}{}
		s.connCount.Add(1)
		s.wg.Add(1)
		s.mu.Unlock()
		s.cfg.hooks.ConnectionOpened()
		go func() {
			defer s.wg.Done()
			c.serve()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			s.connCount.Add(-1)
			s.cfg.hooks.ConnectionClosed()
		}()
	}
}

// maxUnauthenticated is how many connections may be handshaking or waiting
// to authenticate at once: a tenth of the connection limit, at least 16 and at
// most 1,000.
func (s *Server) maxUnauthenticated() int {
	return min(max(s.cfg.maxConnections/10, 16), 1000)
}

// beginClose marks the server closing and stops accepting. It reports
// whether this call began it.
func (s *Server) beginClose() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.closing = true
	close(s.shutdownCh)
	s.cancelShut()
	if s.listener != nil {
		s.listener.Close()
	}
	return true
}

func (s *Server) connList() []*serverConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	list := make([]*serverConn, 0, len(s.conns))
	for c := range s.conns {
		list = append(list, c)
	}
	return list
}

// Shutdown stops the server gracefully: it stops accepting connections,
// sends GoAway on every control stream, ends long polls, lets in-flight
// publishes and acks finish, gives clients time to read their GoAway and
// last answers (until they close, or a few round trips after they have
// read the GoAway; at most 2 s), then closes the connections (releasing
// their leases) and the queue, and returns the queue's close error, if any.
// If ctx ends first, it stops what is left at once (connections closed,
// the contexts of queue calls and handlers cancelled), waits up to a
// second more for that to finish (the queue's close included), and returns
// ctx's error; Close waits for all of it (a Queue or Handler that ignores
// its context's end). Later calls, and Serve, return ErrServerClosed.
func (s *Server) Shutdown(ctx context.Context) error {
	if !s.beginClose() {
		return s.waitDone(ctx)
	}
	// GoAway goes out on every connection at once (a client that does not
	// read its control stream holds its write for up to 5 s), within ctx.
	var ctxErr error
	sent := s.sendGoAways("server shutting down")
	select {
	case <-sent:
	case <-ctx.Done():
		ctxErr = ctx.Err()
	}
	// Wait until every connection is idle (no request in flight) or gone.
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
wait:
	for ctxErr == nil {
		busy := false
		for _, c := range s.connList() {
			if c.inflight.Load() > 0 {
				busy = true
				break
			}
		}
		if !busy {
			break
		}
		select {
		case <-ctx.Done():
			ctxErr = ctx.Err()
			break wait
		case <-tick.C:
		}
	}
	if ctxErr == nil {
		ctxErr = s.drainConns(ctx)
	}
	// The rest stops at once: connections closed (which also ends GoAway
	// writes still waiting), queue calls' and handlers' contexts
	// cancelled, the queue closed. Once ctx has ended, Shutdown waits for
	// that only stopGrace more (a handler or queue that ignores its
	// context's end could hold it up for ever); Close waits for all of it.
	go s.finishClose()
	if ctxErr == nil {
		select {
		case <-s.doneCh:
			<-sent
			return s.closeErr
		case <-ctx.Done():
			ctxErr = ctx.Err()
		}
	}
	t := time.NewTimer(stopGrace)
	defer t.Stop()
	select {
	case <-s.doneCh:
	case <-t.C:
	}
	return ctxErr
}

// stopGrace is how long Shutdown, its ctx ended, still waits for the stop it
// began (the queue's close included, so that a program that exits next
// leaves its data directory closed cleanly).
const stopGrace = time.Second

// goAwayWorkers bounds the goroutines writing GoAway frames at Shutdown.
const goAwayWorkers = 64

// drainMax bounds the time Shutdown gives clients to read their GoAway and
// last answers once no request is in flight (drainConns).
const drainMax = 2 * time.Second

// drainConns waits, once no request is in flight, until each connection is
// done with: closed by its client (the Go client closes it once its calls
// in flight are answered), or, for a client that keeps it open, answered
// the Ping sent after GoAway (so it has read the GoAway) and then had a
// few round trips more for the last answers to be acknowledged. Closing
// earlier would discard what the connection has not yet delivered: QUIC's
// CONNECTION_CLOSE drops unacknowledged stream data, the GoAway and the
// answers to the last long polls included. It waits at most drainMax, or
// until ctx ends (its error is returned).
func (s *Server) drainConns(ctx context.Context) error {
	deadline := time.Now().Add(drainMax)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		now := time.Now()
		pending := 0
		for _, c := range s.connList() {
			if c.qc.Context().Err() == nil && !c.drained(now) {
				pending++
			}
		}
		if pending == 0 || !now.Before(deadline) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// drained reports whether Shutdown is done with c: its client has read the
// GoAway, nothing is in flight (a request may have come in since Shutdown's
// wait), and the linger has passed since both that Pong and the last answer.
func (c *serverConn) drained(now time.Time) bool {
	seen := c.goAwaySeenAt.Load()
	if seen == 0 || c.inflight.Load() != 0 {
		return false
	}
	return now.Sub(time.Unix(0, max(seen, c.lastAnswerAt.Load()))) >= c.drainLinger()
}

// drainLinger is how long a connection stays open after its client has read
// the GoAway: enough for a lost packet of the last answers to be sent again
// (about a probe timeout, RFC 9002 §6.2), 10 ms to 500 ms.
func (c *serverConn) drainLinger() time.Duration {
	return min(max(probeTimeout(c.qc)+25*time.Millisecond, 10*time.Millisecond), 500*time.Millisecond)
}

// probeTimeout is about how long qc's peer takes to answer, a lost packet
// included: three smoothed round trips and four deviations (RFC 9002 §6.2's
// probe timeout, with room for one retransmission).
func probeTimeout(qc *quic.Conn) time.Duration {
	st := qc.ConnectionStats()
	return 3*st.SmoothedRTT + 4*st.MeanDeviation
}

// sendGoAways sends GoAway to every connection, goAwayWorkers at a time,
// and returns a channel closed when all are done.
func (s *Server) sendGoAways(reason string) <-chan struct{} {
	conns := s.connList()
	done := make(chan struct{})
	go func() {
		defer close(done)
		var g errgroup.Group
		g.SetLimit(goAwayWorkers)
		for _, c := range conns {
			g.Go(func() error {
				c.goAway(reason)
				return nil
			})
		}
		g.Wait()
	}()
	return done
}

// DropConnections closes every client connection at once, without a
// GoAway, as a network failure would; their leases are released. The server
// keeps accepting new connections. For tests and operators.
func (s *Server) DropConnections() {
	for _, c := range s.connList() {
		c.close(CodeNone, "dropped")
	}
}

// Close stops the server at once: connections are closed with
// CodeShuttingDown (their leases are released), the contexts of queue calls
// and handlers in progress are cancelled, then the queue is closed. It
// waits for every goroutine the server started (a Queue or Handler that
// ignores its context's end holds it up), and is safe to call more than
// once; it returns the queue's close error, if any.
func (s *Server) Close() error {
	s.beginClose()
	s.finishClose()
	return s.closeErr
}

func (s *Server) finishClose() {
	s.closeOnce.Do(func() {
		s.cancelStop()
		for _, c := range s.connList() {
			c.close(CodeShuttingDown, "server shutting down")
		}
		s.wg.Wait()
		if err := s.queue.Close(); err != nil {
			s.closeErr = err
		}
		s.mu.Lock()
		tr, own := s.transport, s.ownConn
		s.mu.Unlock()
		if tr != nil {
			tr.Close()
		}
		if own != nil {
			own.Close()
		}
		close(s.doneCh)
	})
	<-s.doneCh
}

func (s *Server) waitDone(ctx context.Context) error {
	select {
	case <-s.doneCh:
		return ErrServerClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}
