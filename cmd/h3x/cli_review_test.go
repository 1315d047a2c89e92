package main

// Regression tests from the thirteenth session's operator review of the h3x
// command (RELIABILITY.md findings 120–126). Each test names the defect it
// showed.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

// TestTailFlagAfterNamespaceIsNotANamespace: "h3x tail orders --max 1"
// (a flag after a namespace, as people type it and as "h3x tail orders"
// in the package doc invites) made Go's flag package stop at "orders":
// "--max" and "1" became namespaces (valid names: [A-Za-z0-9._-]), so tail
// followed three namespaces without a limit and acked everything in
// orders. The events are consumed and gone. A flag-looking argument after a
// namespace must either be parsed as the flag or be a usage error; it must
// never silently become a namespace.
func TestTailFlagAfterNamespaceIsNotANamespace(t *testing.T) {
	t.Parallel()
	srv := h3xtest.NewServer(t)
	c := srv.Dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, h3x.Event{ID: "e1", Namespace: "orders"}, h3x.Event{ID: "e2", Namespace: "orders"}, h3x.Event{ID: "e3", Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	env := []string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}
	p := startH3X(t, env, "tail", "orders", "--max", "1")
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		t.Errorf("h3x tail orders --max 1 was still running after 5 s: --max was taken for a namespace (stdout %d lines)", len(lines(p.stdout.String())))
	}
	code := p.cmd.ProcessState.ExitCode()
	if n := len(lines(p.stdout.String())); code == 0 && n != 1 {
		t.Errorf("h3x tail orders --max 1: exit %d with %d deliveries printed, want 1 (or a usage error)", code, n)
	}
	st, err := srv.Server().Stats(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 1 || st[0].Ready < 2 {
		t.Errorf("after h3x tail orders --max 1 (exit %d), orders holds %+v: more than one event was consumed", code, st)
	}
}

// TestStatsFlagAfterNamespaceIsNotANamespace: the same for stats: "h3x
// stats billing --client sub --token stok" showed four zero rows for the
// "namespaces" --client, sub, --token and stok, and connected with the
// credentials of the environment instead of the ones given, exit 0.
func TestStatsFlagAfterNamespaceIsNotANamespace(t *testing.T) {
	t.Parallel()
	srv := h3xtest.NewServer(t)
	srv.Handle(adminRequestFrame, adminHandler(srv.Server()))
	env := []string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}
	r := runH3X(t, "", env, "stats", "--json", "orders", "--timeout", "5s")
	if r.code == 0 {
		var shown []namespaceStats
		json.Unmarshal([]byte(r.stdout), &shown)
		for _, s := range shown {
			if strings.HasPrefix(s.Namespace, "-") || s.Namespace == "5s" {
				t.Errorf("h3x stats orders --timeout 5s reported namespace %q: a flag was taken for a namespace", s.Namespace)
			}
		}
	}
}

// TestBenchAllRefusedIsAFailure: a bench against a server that refuses
// every publish (the client may not publish the namespace) reported
// "0 events ... (N refused)" and exited 0, after waiting --drain (30 s by
// default) for consumers to catch up with nothing; its publish→ack
// latency even counted the refused events. inject exits 1 when events are
// refused; a benchmark that measured nothing must not say success.
func TestBenchAllRefusedIsAFailure(t *testing.T) {
	t.Parallel()
	reg, err := h3x.ParseRegistry(testRegistry)
	if err != nil {
		t.Fatal(err)
	}
	srv := h3xtest.NewServer(t, h3xtest.WithRegistry(reg))
	// reader may consume orders but not publish there.
	env := []string{"H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=reader", "H3X_TOKEN=r-tok"}
	r := runH3X(t, "", env, "bench", "--json", "--addr", srv.Addr(), "--ns", "orders", "--count", "50", "--drain", "1s")
	var res benchResult
	json.Unmarshal([]byte(r.stdout), &res)
	if r.code == 0 {
		t.Errorf("bench where all %d publishes were refused exited 0 (published %d, refused %d, publish→ack count %d)",
			50, res.Published, res.Refused, res.PublishToAck.Count)
	}
}

// TestErrorsNameTheEnvironmentVariable: the README's own session sets
// the trust and the address through H3X_FINGERPRINT and H3X_ADDR, but a
// bad value there was reported as a bad flag the operator never passed:
// "presented a certificate whose SHA-256 is not --fingerprint",
// "--fingerprint must be the server certificate's SHA-256 in hex",
// "--addr \"localhost\": missing port". The message must name where the
// value came from.
func TestErrorsNameTheEnvironmentVariable(t *testing.T) {
	t.Parallel()
	srv := h3xtest.NewServer(t)
	base := []string{"H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}
	for _, tc := range []struct {
		env     []string
		wantVar string
	}{
		{append([]string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=" + strings.Repeat("0", 64)}, base...), "H3X_FINGERPRINT"},
		{append([]string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=abc"}, base...), "H3X_FINGERPRINT"},
		{append([]string{"H3X_ADDR=localhost", "H3X_INSECURE=true"}, base...), "H3X_ADDR"},
	} {
		r := runH3X(t, "", tc.env, "inject", "--ns", "jobs", "--message", "m")
		if r.code == 0 {
			t.Errorf("env %v: exit 0", tc.env)
			continue
		}
		if !strings.Contains(r.stderr, tc.wantVar) {
			t.Errorf("env %v: stderr %q does not name $%s, where the bad value came from", tc.env[:2], strings.TrimSpace(r.stderr), tc.wantVar)
		}
	}
}

// TestIgnoredFlagsAreUsageErrors: flags accepted and silently ignored.
// bench refuses the embedded-server flags with --addr and --token without
// it, yet without --addr it silently ignored --client, --fingerprint,
// --ca-file and --insecure (the embedded server's own are used); serve
// --queue memory ignored --data-dir and --durability; inject --data
// ignored --size.
func TestIgnoredFlagsAreUsageErrors(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"bench", "--queue", "memory", "--count", "5", "--client", "someone"},
		{"bench", "--queue", "memory", "--count", "5", "--fingerprint", strings.Repeat("ab", 32)},
		{"inject", "--ns", "jobs", "--data", "x", "--size", "100", "--addr", "127.0.0.1:1", "--token", "t", "--timeout", "1s"},
	} {
		r := runH3X(t, "", nil, args...)
		if r.code != 2 {
			t.Errorf("h3x %s: exit %d (stderr %q), want a usage error: a flag was ignored", strings.Join(args, " "), r.code, strings.TrimSpace(r.stderr))
		}
	}
	// serve: runs until stopped, so check it refuses before starting.
	dir := t.TempDir()
	p := startH3X(t, nil, "serve", "--addr", "127.0.0.1:0", "--registry", testRegistry, "--queue", "memory", "--data-dir", dir, "--durability", "nosync")
	select {
	case <-p.done:
		if code := p.cmd.ProcessState.ExitCode(); code != 2 {
			t.Errorf("serve --queue memory --data-dir D --durability nosync: exit %d, want 2", code)
		}
	case <-time.After(3 * time.Second):
		code := p.stop(syscall.SIGINT, 10*time.Second)
		t.Errorf("serve --queue memory --data-dir D --durability nosync started (exit %d after SIGINT): --data-dir and --durability were ignored", code)
	}
}

// TestErrorKeepsPathsEndingInH3X: oneLine (main.go) drops every "h3x: "
// in an error's text, meant for the prefixes of wrapped library errors,
// but it also cuts the end of any path named h3x followed by ": " — the
// usual name of a data directory, a registry or CA file's directory:
// "open /etc/h3x: no such file or directory" was printed as
// "open /etc/no such file or directory", and --data-dir /var/lib/h3x
// (the README's own WithDataDir) as "mkdir /var/lib/operation not
// permitted".
func TestErrorKeepsPathsEndingInH3X(t *testing.T) {
	t.Parallel()
	missing := t.TempDir() + "/h3x"
	for _, args := range [][]string{
		{"inject", "--file", missing, "--token", "t"},
		{"serve", "--queue", "memory", "--registry-file", missing},
		{"stats", "--token", "t", "--ca-file", missing},
	} {
		r := runH3X(t, "", nil, args...)
		if r.code == 0 || !strings.Contains(r.stderr, missing+": no such file") {
			t.Errorf("h3x %s: exit %d, stderr %q, want it to name %s", args[0], r.code, strings.TrimSpace(r.stderr), missing)
		}
	}
}

// TestServeQuietLogsStillTellTheFingerprint: serve's help says that
// without TLS files it "logs its SHA-256 fingerprint, which clients pin
// with --fingerprint". With --log-level error (or warn for the address)
// it logged nothing at all: neither the address nor the fingerprint. With
// --queue memory the development certificate lives in memory only (no
// dev-cert.pem), so no client can pin it except with --insecure.
func TestServeQuietLogsStillTellTheFingerprint(t *testing.T) {
	t.Parallel()
	p := startH3X(t, nil, "serve", "--addr", "127.0.0.1:0", "--queue", "memory", "--registry", testRegistry, "--log-level", "error")
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) && !strings.Contains(p.stderr.String()+p.stdout.String(), "sha256") {
		time.Sleep(50 * time.Millisecond)
	}
	out := p.stderr.String() + p.stdout.String()
	if code := p.stop(syscall.SIGINT, 10*time.Second); code != 0 {
		t.Errorf("serve exited %d", code)
	}
	if !strings.Contains(out, "sha256") {
		t.Errorf("serve --queue memory --log-level error printed no certificate fingerprint (output %q): clients cannot pin it", out)
	}
}

// TestServeBadAddrNamesTheFlag: a malformed --addr (or $H3X_ADDR) reached
// the operator as the library's option name: "invalid argument:
// WithAddr(\"nope\"): ...", exit 1. The client commands check --addr
// themselves (a usage error naming --addr); serve should too.
func TestServeBadAddrNamesTheFlag(t *testing.T) {
	t.Parallel()
	r := runH3X(t, "", nil, "serve", "--queue", "memory", "--registry", testRegistry, "--addr", "nope")
	if r.code != 2 || strings.Contains(r.stderr, "WithAddr") || !strings.Contains(r.stderr, "--addr") {
		t.Errorf("serve --addr nope: exit %d, stderr %q; want a usage error naming --addr", r.code, strings.TrimSpace(r.stderr))
	}
}

// The tests below were added with the fixes of these findings.

// TestTailDashDashNamespace: after "--" every argument is a namespace,
// even one that begins with '-' (a valid name), and flags before it still
// apply.
func TestTailDashDashNamespace(t *testing.T) {
	t.Parallel()
	srv := h3xtest.NewServer(t)
	c := srv.Dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, h3x.Event{ID: "d1", Namespace: "-dash"}, h3x.Event{ID: "d2", Namespace: "-dash"}); err != nil {
		t.Fatal(err)
	}
	env := []string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}
	r := runH3X(t, "", env, "tail", "--max", "1", "--", "-dash")
	if r.code != 0 || len(lines(r.stdout)) != 1 || !strings.Contains(r.stdout, `"-dash"`) {
		t.Errorf("tail --max 1 -- -dash: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
}

// TestBenchAllRefusedEndsAtOnce: with every publish refused, bench does not
// wait out --drain (30 s by default) for consumers to catch up with
// nothing, prints its results without a publish→ack latency for the refused
// events, and says why it failed, as inject does.
func TestBenchAllRefusedEndsAtOnce(t *testing.T) {
	t.Parallel()
	reg, err := h3x.ParseRegistry(testRegistry)
	if err != nil {
		t.Fatal(err)
	}
	srv := h3xtest.NewServer(t, h3xtest.WithRegistry(reg))
	env := []string{"H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=reader", "H3X_TOKEN=r-tok"}
	start := time.Now()
	r := runH3X(t, "", env, "bench", "--json", "--addr", srv.Addr(), "--ns", "orders", "--count", "50")
	took := time.Since(start)
	var res benchResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatalf("bench --json printed %q (%v); stderr %q", r.stdout, err, r.stderr)
	}
	if took > 15*time.Second {
		t.Errorf("bench with every publish refused took %v: it waited --drain for nothing", took)
	}
	if res.Refused != 50 || res.Published != 0 || res.PublishToAck.Count != 0 {
		t.Errorf("refused %d, published %d, publish→ack count %d; want 50, 0, 0", res.Refused, res.Published, res.PublishToAck.Count)
	}
	if r.code != 1 {
		t.Errorf("exit %d, want 1", r.code)
	}
	checkOneLineError(t, r, "h3x bench: 50 of 50 events refused; first: ")
}

// TestServeReadyLineWhateverLogLevel: the ready line (address and
// fingerprint) is logged at every --log-level, in the --log-format, so a
// quiet server can still be pinned and reached.
func TestServeReadyLineWhateverLogLevel(t *testing.T) {
	t.Parallel()
	for _, level := range []string{"warn", "error"} {
		srv := serve(t, nil, "--queue", "memory", "--registry", testRegistry, "--log-level", level)
		r := runH3X(t, "", srv.clientEnv("writer", "w-tok"), "inject", "--ns", "orders", "--id", "quiet-"+level)
		if r.code != 0 || strings.TrimSpace(r.stdout) != "quiet-"+level {
			t.Errorf("--log-level %s: inject with the ready line's address and fingerprint: exit %d, stdout %q, stderr %q", level, r.code, r.stdout, r.stderr)
		}
		if code := srv.stop(syscall.SIGINT, 10*time.Second); code != 0 {
			t.Errorf("--log-level %s: serve exited %d", level, code)
		}
		if out := srv.stderr.String(); strings.Contains(out, "h3x serve: stopped") {
			t.Errorf("--log-level %s: serve logged %q: the other INFO lines are still to be left out", level, out)
		}
	}
}

// TestUntrustedCertificateHint: with --ca-file (or $H3X_CA_FILE) given, a
// certificate that fails verification used to be explained with "pass
// --fingerprint, --ca-file or --insecure", as if no trust had been given.
// The hint now depends on what was given and names where it came from.
func TestUntrustedCertificateHint(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	certFile, keyFile := dir+"/cert.pem", dir+"/key.pem"
	writeCert(t, certFile, keyFile) // valid for 127.0.0.1 only
	otherCA := dir + "/other.pem"
	writeCert(t, otherCA, dir+"/other-key.pem")
	srv := serve(t, []string{"H3X_REGISTRY=" + testRegistry, "H3X_TLS_CERT=" + certFile, "H3X_TLS_KEY=" + keyFile, "H3X_QUEUE=memory"})
	_, port, _ := strings.Cut(srv.addr, ":")
	for _, tc := range []struct {
		name string
		args []string
		env  []string
		want string
	}{
		{"name not in the certificate", []string{"stats", "--addr", "localhost:" + port, "--ca-file", certFile}, nil,
			"(dial the server by a name or address the certificate is valid for)"},
		{"other CA in the environment", []string{"stats"}, []string{"H3X_ADDR=" + srv.addr, "H3X_CA_FILE=" + otherCA},
			"(checked against the CA certificates of $H3X_CA_FILE " + otherCA + " only)"},
		{"other CA as a flag", []string{"stats", "--addr", srv.addr, "--ca-file", otherCA}, nil,
			"(checked against the CA certificates of --ca-file " + otherCA + " only)"},
		{"no trust given", []string{"stats", "--addr", srv.addr}, nil,
			"(pass --fingerprint, --ca-file or --insecure)"},
	} {
		r := runH3X(t, "", append(tc.env, "H3X_CLIENT_ID=admin", "H3X_TOKEN=admin-tok"), tc.args...)
		checkOneLineError(t, r, "h3x stats: the server certificate at ")
		if r.code != 1 || !strings.Contains(r.stderr, "is not trusted") || !strings.HasSuffix(strings.TrimSpace(r.stderr), tc.want) {
			t.Errorf("%s: exit %d, stderr %q; want it to end with %q", tc.name, r.code, strings.TrimSpace(r.stderr), tc.want)
		}
	}
	if code := srv.stop(syscall.SIGTERM, 15*time.Second); code != 0 {
		t.Errorf("h3x serve exited %d", code)
	}
}

// TestIgnoredVariablesAreNotRefused: only flags given on the command line
// are refused when they would be ignored. Variables set for the other
// commands (the package doc's first session exports H3X_FINGERPRINT and
// H3X_CLIENT_ID, then runs bench without --addr; a .env made from
// .env.example sets H3X_DATA_DIR and H3X_DURABILITY) are ignored as before.
func TestIgnoredVariablesAreNotRefused(t *testing.T) {
	t.Parallel()
	env := []string{"H3X_CLIENT_ID=me", "H3X_TOKEN=tok", "H3X_FINGERPRINT=" + strings.Repeat("ab", 32), "H3X_DATA_DIR=" + t.TempDir(), "H3X_DURABILITY=nosync"}
	r := runH3X(t, "", env, "bench", "--json", "--queue", "memory", "--count", "20")
	if r.code != 0 {
		t.Errorf("bench without --addr with client variables set: exit %d, stderr %q", r.code, r.stderr)
	}
	srv := serve(t, env, "--queue", "memory", "--registry", testRegistry)
	if code := srv.stop(syscall.SIGINT, 10*time.Second); code != 0 {
		t.Errorf("serve --queue memory with $H3X_DATA_DIR and $H3X_DURABILITY set: exit %d, stderr %q", code, srv.stderr.String())
	}
}

// TestBenchHelpInflightDefault: bench -h showed --inflight with two
// defaults, "(with --rate, default 64 ...) (default 4)".
func TestBenchHelpInflightDefault(t *testing.T) {
	t.Parallel()
	r := runH3X(t, "", nil, "bench", "-h")
	_, after, ok := strings.Cut(r.stdout, "  --inflight")
	desc, _, _ := strings.Cut(after, "\n  --")
	if r.code != 0 || !ok || strings.Count(desc, "default") != 1 || !strings.Contains(desc, "default 4") || !strings.Contains(desc, "64") {
		t.Errorf("bench -h (exit %d) describes --inflight as %q; want one default, 4 (64 with --rate)", r.code, desc)
	}
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"--count", "10"}, 4},
		{[]string{"--count", "10", "--rate", "1000"}, 64},
		{[]string{"--count", "10", "--rate", "1000", "--inflight", "2"}, 2},
	} {
		r := runH3X(t, "", nil, append([]string{"bench", "--json", "--queue", "memory"}, tc.args...)...)
		var res benchResult
		if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || r.code != 0 || res.Inflight != tc.want {
			t.Errorf("bench %v: exit %d, inflight %d (%v), want %d; stderr %q", tc.args, r.code, res.Inflight, err, tc.want, r.stderr)
		}
	}
	if r := runH3X(t, "", nil, "bench", "--queue", "memory", "--inflight", "0"); r.code != 2 || !strings.Contains(r.stderr, "--inflight must be at least 1") {
		t.Errorf("bench --inflight 0: exit %d, stderr %q", r.code, r.stderr)
	}
}

// TestInjectClosedStdoutSaysHowManyPublished: "h3x inject --count 20000 |
// head -1" failed with "write /dev/stdout: broken pipe" alone, although
// part of the events were stored: the error now says how many.
func TestInjectClosedStdoutSaysHowManyPublished(t *testing.T) {
	t.Parallel()
	srv := h3xtest.NewServer(t)
	env := []string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}
	cmd := exec.Command(h3xBinary, "inject", "--ns", "jobs", "--count", "20000")
	cmd.Env = cleanEnv(env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	first, err := bufio.NewReader(out).ReadString('\n')
	out.Close() // as head -1 does
	if err != nil {
		t.Errorf("reading the first id: %v", err)
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("inject did not exit after its stdout was closed (first id %q)", first)
	}
	r := result{stderr: stderr.String(), code: cmd.ProcessState.ExitCode()}
	m := regexp.MustCompile(`^h3x inject: writing ids: .*broken pipe \((\d+) of 20000 events were published; not all of their ids were printed\)\n$`).FindStringSubmatch(r.stderr)
	if r.code != 1 || m == nil {
		t.Fatalf("exit %d, stderr %q; want status 1 and how many events were published", r.code, r.stderr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	st, err := srv.Server().Stats(ctx, "jobs")
	if err != nil || len(st) != 1 {
		t.Fatalf("stats: %v %v", st, err)
	}
	if n, _ := strconv.Atoi(m[1]); n != st[0].Ready || n == 0 || n == 20000 {
		t.Errorf("inject said %d events were published; the server stored %d", n, st[0].Ready)
	}
}
