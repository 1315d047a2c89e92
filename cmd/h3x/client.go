package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/h3x-io/h3x"
)

// DefaultClientID is the client id the client commands use when neither
// --client nor $H3X_CLIENT_ID is given.
const defaultClientID = "h3x-cli"

// clientFlags are the connection flags shared by the client commands.
type clientFlags struct {
	addr        string
	clientID    string
	token       string
	fingerprint string
	caFile      string
	insecure    bool
	timeout     time.Duration
	verbose     bool
	namespaces  []string // asked for with h3x.WithNamespaces, for messages
	fs          *flagSet // where the flags were registered, for messages
}

func (c *clientFlags) register(fs *flagSet) {
	fs.stringVar(&c.addr, "addr", "H3X_ADDR", h3x.DefaultAddr, "server `address` (host:port, UDP)")
	c.registerCommon(fs)
}

// registerCommon registers every connection flag but --addr.
func (c *clientFlags) registerCommon(fs *flagSet) {
	c.fs = fs
	fs.stringVar(&c.clientID, "client", "H3X_CLIENT_ID", defaultClientID, "client `id` to authenticate as")
	fs.stringVar(&c.token, "token", "H3X_TOKEN", "", "client `token` (prefer $H3X_TOKEN: flags show in ps)")
	fs.stringVar(&c.fingerprint, "fingerprint", "H3X_FINGERPRINT", "", "trust exactly the server certificate with this SHA-256 `hex` (h3x serve logs it when it has no TLS files)")
	fs.stringVar(&c.caFile, "ca-file", "H3X_CA_FILE", "", "verify the server certificate against the CA certificates in this PEM `file`")
	fs.boolVar(&c.insecure, "insecure", "H3X_INSECURE", false, "accept any server certificate (development only)")
	fs.alternatives("fingerprint", "ca-file", "insecure")
	fs.durationVar(&c.timeout, "timeout", "", 10*time.Second, "give up connecting after this `duration`")
	fs.boolVar(&c.verbose, "v", "", false, "log the client's connection events to stderr")
}

// src names where the value of flag name came from, for messages: the
// flag, or the environment variable that set it.
func (c *clientFlags) src(name string) string { return c.fs.source(name) }

// options checks the flags and returns the client options they give.
func (c *clientFlags) options(e *cmdEnv) ([]h3x.ClientOption, error) {
	if c.token == "" {
		return nil, usagef("no token: set $H3X_TOKEN or pass --token")
	}
	if _, _, err := net.SplitHostPort(c.addr); err != nil {
		return nil, usagef("%s %q: %v", c.src("addr"), c.addr, err)
	}
	if c.timeout <= 0 {
		return nil, usagef("--timeout must be positive")
	}
	n := 0
	for _, set := range []bool{c.fingerprint != "", c.caFile != "", c.insecure} {
		if set {
			n++
		}
	}
	if n > 1 {
		// One of them on the command line overrides the environment of
		// all of them: here they all came from one or the other.
		if !c.fs.cliInGroup("fingerprint") {
			return nil, usagef("$H3X_FINGERPRINT, $H3X_CA_FILE and $H3X_INSECURE exclude each other (one of --fingerprint, --ca-file and --insecure overrides them all)")
		}
		return nil, usagef("--fingerprint, --ca-file and --insecure exclude each other")
	}
	opts := []h3x.ClientOption{
		h3x.WithCredentials(c.clientID, c.token),
		h3x.WithDialTimeout(c.timeout),
	}
	switch {
	case c.fingerprint != "":
		opts = append(opts, h3x.WithTrustedFingerprint(c.fingerprint))
	case c.caFile != "":
		pool, err := loadCAFile(c.caFile)
		if err != nil {
			return nil, err
		}
		opts = append(opts, h3x.WithRootCAs(pool))
	case c.insecure:
		opts = append(opts, h3x.WithInsecureSkipVerify())
	}
	logger := slog.New(slog.DiscardHandler)
	if c.verbose {
		logger = slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	opts = append(opts, h3x.WithLogger(logger))
	quietStdLog(logger)
	return opts, nil
}

// quietStdLog sends what libraries print through the standard log package
// (quic-go's one-time UDP buffer warning) to logger, so it does not break
// the one-line error output of the client commands.
func quietStdLog(logger *slog.Logger) {
	log.SetFlags(0)
	log.SetOutput(slogWriter{logger, slog.LevelWarn})
}

type slogWriter struct {
	l     *slog.Logger
	level slog.Level
}

func (w slogWriter) Write(p []byte) (int, error) {
	w.l.Log(context.Background(), w.level, strings.TrimSpace(string(p)))
	return len(p), nil
}

var _ io.Writer = slogWriter{}

func loadCAFile(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("CA file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("CA file %s holds no PEM certificate", path)
	}
	return pool, nil
}

// dial connects with the flags' options plus extra, and explains failures
// in one line.
func (c *clientFlags) dial(ctx context.Context, e *cmdEnv, extra ...h3x.ClientOption) (*h3x.Client, error) {
	opts, err := c.options(e)
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	client, err := h3x.Dial(dctx, c.addr, append(opts, extra...)...)
	if err != nil {
		return nil, c.explain(ctx, err)
	}
	return client, nil
}

// explain turns a Dial error into a message that names the problem.
func (c *clientFlags) explain(ctx context.Context, err error) error {
	var certErr *x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	var invalidErr x509.CertificateInvalidError
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, h3x.ErrUnauthenticated):
		return fmt.Errorf("authentication refused for client %q: unknown client or wrong token", c.clientID)
	case errors.Is(err, h3x.ErrPermissionDenied) && len(c.namespaces) > 0:
		return fmt.Errorf("permission denied: client %q is not granted all of %s", c.clientID, strings.Join(c.namespaces, ", "))
	case errors.Is(err, h3x.ErrPermissionDenied):
		return fmt.Errorf("permission denied for client %q", c.clientID)
	case strings.Contains(err.Error(), "does not match the pinned fingerprint"):
		return fmt.Errorf("the server at %s presented a certificate whose SHA-256 is not %s", c.addr, c.src("fingerprint"))
	case strings.Contains(err.Error(), "is not a hex SHA-256"):
		return usagef("%s must be the server certificate's SHA-256 in hex", c.src("fingerprint"))
	case errors.As(err, &certErr), errors.As(err, &hostErr), errors.As(err, &invalidErr),
		strings.Contains(err.Error(), "failed to verify certificate"):
		// quic-go reports TLS failures as text in a CRYPTO_ERROR.
		detail := err.Error()
		if i := strings.Index(detail, "x509: "); i >= 0 {
			detail = detail[i:]
		}
		msg := fmt.Sprintf("the server certificate at %s is not trusted: %s", c.addr, detail)
		if hint := c.trustHint(err, detail); hint != "" {
			msg += " (" + hint + ")"
		}
		return errors.New(msg)
	case isTimeout(err):
		return fmt.Errorf("cannot reach %s: no answer within %v (is the server running?)", c.addr, c.timeout)
	case strings.Contains(err.Error(), c.addr):
		return err
	}
	return fmt.Errorf("connecting to %s: %w", c.addr, err)
}

// trustHint says what to do about a server certificate that failed
// verification, given the trust flags in use: with none, pass one; with
// --ca-file, the name dialled must be one the certificate is valid for,
// and it must be signed by one of the file's CAs.
func (c *clientFlags) trustHint(err error, detail string) string {
	var hostErr x509.HostnameError
	var certErr x509.UnknownAuthorityError
	switch {
	case c.caFile == "":
		return "pass --fingerprint, --ca-file or --insecure"
	case errors.As(err, &hostErr), strings.Contains(detail, "certificate is valid for"),
		strings.Contains(detail, "doesn't contain any IP SANs"), strings.Contains(detail, "not valid for any names"):
		return "dial the server by a name or address the certificate is valid for"
	case errors.As(err, &certErr), strings.Contains(detail, "unknown authority"):
		return fmt.Sprintf("checked against the CA certificates of %s %s only", c.src("ca-file"), c.caFile)
	}
	return ""
}

func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// namespacesFrom merges --ns values and positional arguments (wherever
// they stood among the flags, or after "--"). A value of --ns that came
// from $H3X_NAMESPACE is a default: namespaces given as arguments replace
// it.
func namespacesFrom(fs *flagSet, ns listFlag, args []string) ([]string, error) {
	var out []string
	add := func(src string, names []string) error {
		for _, n := range names {
			if err := h3x.ValidateNamespace(n); err != nil {
				return badNamespace(src, err)
			}
		}
		out = append(out, names...)
		return nil
	}
	if fs.cli["ns"] || len(args) == 0 {
		if err := add(fs.source("ns"), ns); err != nil {
			return nil, err
		}
	}
	for _, a := range args {
		var l listFlag
		l.Set(a)
		if err := add("", l); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// badNamespace is the usage error for a namespace ValidateNamespace
// refused (its error quotes the name), given by src ("--ns",
// "$H3X_NAMESPACE", or "" for an argument).
func badNamespace(src string, err error) error {
	msg := strings.TrimPrefix(err.Error(), "h3x: invalid argument: ")
	if src == "" {
		return usagef("%s", msg)
	}
	return usagef("%s: %s", src, msg)
}
