package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xprom"
)

const serveAbout = `
Serve runs an H3X broker until SIGINT or SIGTERM, then shuts down gracefully
(a second signal stops it at once). Logs go to stderr.

Clients are authorized by a registry (format: see h3x.ParseRegistry), given
as text (--registry or $H3X_REGISTRY) or a file (--registry-file or
$H3X_REGISTRY_FILE). Without --tls-cert and --tls-key the server makes a
self-signed development certificate and logs its SHA-256 fingerprint, which
clients pin with --fingerprint: the "ready" line, with the address and the
fingerprint, is logged whatever --log-level.

With --metrics-addr it serves Prometheus metrics at /metrics: the h3x_*
metrics listed in the documentation of github.com/h3x-io/h3x/h3xprom, and
the Go runtime's and process's. It also serves the admin stats frame that
"h3x stats" uses (see "go doc ./cmd/h3x").`

type serveFlags struct {
	addr, registry, registryFile, dataDir string
	tlsCert, tlsKey, metricsAddr          string
	durability, queue, logFormat, logLvl  *choiceFlag
	ackDeadline, shutdownTimeout          time.Duration
	maxAttempts                           int
}

func runServe(ctx context.Context, e *cmdEnv, args []string) error {
	f := serveFlags{
		durability: newChoice("fsync", "fsync", "nosync"),
		queue:      newChoice("badger", "badger", "memory"),
		logFormat:  newChoice("text", "text", "json"),
		logLvl:     newChoice("info", "debug", "info", "warn", "error"),
	}
	fs := newFlagSet(e, "[flags]", serveAbout)
	fs.stringVar(&f.addr, "addr", "H3X_ADDR", h3x.DefaultAddr, "UDP `address` to listen on (\"127.0.0.1:0\": a random port)")
	fs.stringVar(&f.registry, "registry", "H3X_REGISTRY", "", "registry `text`: client:namespace=token entries separated by commas")
	fs.stringVar(&f.registryFile, "registry-file", "H3X_REGISTRY_FILE", "", "registry `file`, in the same format (wins over --registry)")
	fs.stringVar(&f.dataDir, "data-dir", "H3X_DATA_DIR", h3x.DefaultDataDir, "`directory` of the Badger queue")
	fs.stringVar(&f.tlsCert, "tls-cert", "H3X_TLS_CERT", "", "PEM certificate chain `file`")
	fs.stringVar(&f.tlsKey, "tls-key", "H3X_TLS_KEY", "", "PEM private key `file`")
	fs.value(f.durability, "durability", "H3X_DURABILITY", "`mode` of the badger queue: fsync (acknowledge a publish once fsynced: survives power loss) or nosync (survives a process kill)")
	fs.value(f.queue, "queue", "H3X_QUEUE", "queue `kind`: badger (durable, in --data-dir) or memory (lost on exit)")
	fs.stringVar(&f.metricsAddr, "metrics-addr", "H3X_METRICS_ADDR", "", "serve Prometheus metrics at http://`address`/metrics (TCP host:port)")
	fs.value(f.logFormat, "log-format", "H3X_LOG_FORMAT", "log `format`: text or json")
	fs.value(f.logLvl, "log-level", "H3X_LOG_LEVEL", "log `level`: debug, info, warn or error")
	fs.durationVar(&f.ackDeadline, "ack-deadline", "H3X_ACK_DEADLINE", h3x.DefaultAckDeadline, "how long a delivery stays leased without an ack")
	fs.intVar(&f.maxAttempts, "max-attempts", "H3X_MAX_ATTEMPTS", h3x.DefaultMaxAttempts, "deliveries before an event moves to its dead-letter namespace")
	fs.durationVar(&f.shutdownTimeout, "shutdown-timeout", "", 10*time.Second, "how long a graceful shutdown may take before connections are cut")
	if err := fs.parse(args); err != nil {
		return err
	}
	if err := fs.noArgs(); err != nil {
		return err
	}
	if _, _, err := net.SplitHostPort(f.addr); err != nil {
		return usagef("%s %q: %v", fs.source("addr"), f.addr, err)
	}
	if (f.tlsCert == "") != (f.tlsKey == "") {
		if !fs.cli["tls-cert"] && !fs.cli["tls-key"] {
			return usagef("$H3X_TLS_CERT and $H3X_TLS_KEY go together")
		}
		return usagef("--tls-cert and --tls-key go together")
	}
	if f.maxAttempts <= 0 {
		return usagef("%s must be positive", fs.source("max-attempts"))
	}
	if f.ackDeadline <= 0 {
		return usagef("%s must be positive", fs.source("ack-deadline"))
	}
	if f.shutdownTimeout <= 0 {
		return usagef("--shutdown-timeout must be positive")
	}
	// Flags given on the command line that would be ignored. Their
	// variables are not refused: $H3X_DATA_DIR may be set for other runs.
	if f.queue.v == "memory" {
		if err := fs.ignoredFlags(fmt.Sprintf("for the badger queue, not the memory queue (%s memory)", fs.source("queue")),
			"data-dir", "durability"); err != nil {
			return err
		}
	}

	logger := newLogger(e, f.logFormat.v, f.logLvl.v)
	quietStdLog(logger)

	useFile := fs.cli["registry-file"] || (!fs.cli["registry"] && f.registryFile != "")
	registry, err := loadRegistry(f.registry, f.registryFile, useFile)
	if err != nil {
		return err
	}
	opts := []h3x.ServerOption{
		h3x.WithAddr(f.addr),
		h3x.WithRegistry(registry),
		h3x.WithLogger(logger),
		h3x.WithAckDeadline(f.ackDeadline),
	}
	if f.tlsCert != "" {
		opts = append(opts, h3x.WithCertFiles(f.tlsCert, f.tlsKey))
	}
	qopts := h3x.QueueOptions{MaxAttempts: f.maxAttempts, Logger: logger}
	if f.durability.v == "nosync" {
		qopts.Durability = h3x.DurabilityNoSync
	}
	if f.queue.v == "memory" {
		opts = append(opts, h3x.WithQueue(h3x.NewMemoryQueue(qopts)))
	} else {
		opts = append(opts, h3x.WithDataDir(f.dataDir), h3x.WithQueueOptions(qopts))
	}

	var metrics *h3xprom.Metrics
	var metricsLn net.Listener
	if f.metricsAddr != "" {
		metrics = h3xprom.New()
		opts = append(opts, h3x.WithHooks(metrics))
		// Listen before opening the queue, so a taken port fails fast.
		metricsLn, err = net.Listen("tcp", f.metricsAddr)
		if err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		defer metricsLn.Close()
	}

	srv, err := h3x.NewServer(opts...)
	if err != nil {
		return err
	}
	srv.Handle(adminRequestFrame, adminHandler(srv))
	if err := srv.Start(context.Background()); err != nil {
		srv.Close()
		return err
	}

	var httpSrv *http.Server
	httpDone := make(chan struct{})
	if metricsLn != nil {
		reg := prometheus.NewRegistry()
		reg.MustRegister(metrics, h3xprom.NewQueueCollector(srv),
			collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
			ErrorHandling: promhttp.ContinueOnError,
			ErrorLog:      promLogger{logger},
		}))
		httpSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelWarn)}
		go func() {
			defer close(httpDone)
			if err := httpSrv.Serve(metricsLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				logger.Error("h3x serve: metrics server failed", "err", err)
			}
		}()
	} else {
		close(httpDone)
	}

	ready := []any{"addr", srv.Addr().String(), "sha256", srv.Fingerprint(), "version", versionString()}
	if metricsLn != nil {
		ready = append(ready, "metrics", "http://"+metricsLn.Addr().String()+"/metrics")
	}
	// The ready line is logged whatever --log-level (at level INFO, in the
	// --log-format): it tells where the server listens and the fingerprint
	// that clients pin.
	rec := slog.NewRecord(time.Now(), slog.LevelInfo, "h3x serve: ready", 0)
	rec.Add(ready...)
	logger.Handler().Handle(context.Background(), rec)

	<-ctx.Done()
	logger.Info("h3x serve: shutting down (a second signal stops at once)")
	again := make(chan os.Signal, 1)
	signal.Notify(again, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(again)
	sctx, cancel := context.WithTimeout(context.Background(), f.shutdownTimeout)
	defer cancel()
	go func() {
		select {
		case <-again:
			logger.Warn("h3x serve: second signal: stopping now")
			cancel()
		case <-sctx.Done():
		}
	}()
	if httpSrv != nil {
		hctx, hcancel := context.WithTimeout(sctx, time.Second)
		httpSrv.Shutdown(hctx)
		hcancel()
	}
	<-httpDone
	err = srv.Shutdown(sctx)
	if cerr := srv.Close(); cerr != nil {
		return fmt.Errorf("closing the queue: %w", cerr)
	}
	if err != nil {
		logger.Warn("h3x serve: shutdown cut short", "err", err)
	}
	logger.Info("h3x serve: stopped")
	return nil
}

func newLogger(e *cmdEnv, format, level string) *slog.Logger {
	var lvl slog.Level
	lvl.UnmarshalText([]byte(level))
	ho := &slog.HandlerOptions{Level: lvl}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(e.stderr, ho))
	}
	return slog.New(slog.NewTextHandler(e.stderr, ho))
}

// loadRegistry reads the registry from file if useFile, else from text.
func loadRegistry(text, file string, useFile bool) (*h3x.StaticRegistry, error) {
	var r *h3x.StaticRegistry
	var err error
	source := ""
	switch {
	case useFile:
		source = "registry file " + file
		r, err = h3x.LoadRegistryFile(file)
	case strings.TrimSpace(text) != "":
		source = "registry"
		r, err = h3x.ParseRegistry(text)
	default:
		return nil, usagef("no registry: set $H3X_REGISTRY or $H3X_REGISTRY_FILE, or pass --registry or --registry-file")
	}
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			return nil, fmt.Errorf("cannot read %s: %v", source, pe.Err)
		}
		return nil, fmt.Errorf("malformed %s: %w", source, err)
	}
	if registryEmpty(r) {
		return nil, fmt.Errorf("%s holds no entries: nobody could connect", source)
	}
	return r, nil
}

// registryEmpty reports whether r holds no entry.
func registryEmpty(r *h3x.StaticRegistry) bool { return r.Len() == 0 }

// promLogger adapts slog to promhttp's error logger.
type promLogger struct{ l *slog.Logger }

func (p promLogger) Println(v ...any) { p.l.Warn("h3x serve: metrics: " + fmt.Sprint(v...)) }
