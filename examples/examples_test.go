package examples_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

// runTimeout bounds each run of an example program.
const runTimeout = 60 * time.Second

// programs are the examples built into binaries (embedded-test is a
// package with tests, run by go test ./...).
var programs = []string{"quickstart", "producer", "consumer", "custom-handler"}

var (
	buildFlags []string // extended by race_test.go
	binDir     string
	buildOnce  sync.Once
	buildErr   error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "h3x-examples-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		// The in-test brokers and clients must be gone; the programs are
		// other processes and were waited for.
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// bin builds every program once and returns the path of name's binary.
func bin(t *testing.T, name string) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the example programs")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command to build the examples with")
	}
	buildOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		args := append([]string{"build", "-o", binDir + string(filepath.Separator)}, buildFlags...)
		for _, p := range programs {
			args = append(args, "./"+p)
		}
		out, err := exec.CommandContext(ctx, goTool, args...).CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, name)
}

// command prepares an example run bounded by runTimeout (and the test's
// deadline), killed if it outlives it.
func command(t *testing.T, name string, args ...string) *exec.Cmd {
	t.Helper()
	path := bin(t, name)
	deadline := time.Now().Add(runTimeout)
	if dl, ok := t.Deadline(); ok && dl.Add(-5*time.Second).Before(deadline) {
		deadline = dl.Add(-5 * time.Second)
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.WaitDelay = 5 * time.Second
	// No inherited credentials: each test passes what it means to.
	cmd.Env = append(os.Environ(), "H3X_CLIENT_ID=", "H3X_TOKEN=")
	return cmd
}

// run runs an example to its end and returns its standard output, failing
// the test if it does not exit 0.
func run(t *testing.T, cmd *exec.Cmd) string {
	t.Helper()
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s: %v\nstdout:\n%s\nstderr:\n%s", filepath.Base(cmd.Path), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// matchLines checks that out has exactly one line per pattern, each
// matching its pattern in full.
func matchLines(t *testing.T, out string, patterns ...string) []string {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != len(patterns) {
		t.Fatalf("got %d lines, want %d:\n%s", len(lines), len(patterns), out)
	}
	for i, p := range patterns {
		if !regexp.MustCompile(`^` + p + `$`).MatchString(lines[i]) {
			t.Fatalf("line %d is %q, want it to match %q; output:\n%s", i+1, lines[i], p, out)
		}
	}
	return lines
}

const uuid = `[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}`

func TestQuickstart(t *testing.T) {
	out := run(t, command(t, "quickstart"))
	matchLines(t, out,
		`published 3 events`,
		`delivered `+uuid+` order\.created attempt 1: order 1001 created`,
		`delivered `+uuid+` order\.paid attempt 1: order 1001 paid`,
		`delivered `+uuid+` order\.shipped attempt 1: order 1001 shipped`,
		`acked 3 events`,
		`orders: 0 ready, 0 leased`,
		`server stopped`,
	)
}

func TestCustomHandler(t *testing.T) {
	out := run(t, command(t, "custom-handler"))
	want := `whoami: gadgets (grants [orders/all audit/sub])
echo: gadgets said "hello"
echo: gadgets said "over"
echo: gadgets said "quic"
echo: server finished the stream
unknown frame type: stream reset with unknown frame type
`
	if out != want {
		t.Fatalf("output:\n%s\nwant:\n%s", out, want)
	}
}

// newBroker starts a broker in the test where the producer may only
// publish and the consumer may only consume.
func newBroker(t *testing.T) *h3xtest.Server {
	reg, err := h3x.ParseRegistry("producer:orders/pub=producer-token, consumer:orders/sub=consumer-token")
	if err != nil {
		t.Fatal(err)
	}
	return h3xtest.NewServer(t, h3xtest.WithRegistry(reg))
}

func TestProducerThenConsumer(t *testing.T) {
	srv := newBroker(t)

	out := run(t, command(t, "producer", "-addr", srv.Addr(), "-fingerprint", srv.Fingerprint(),
		"-client", "producer", "-token", "producer-token", "-count", "5"))
	lines := matchLines(t, out,
		`published `+uuid+` orders order\.created: order 1 of 5`,
		`published `+uuid+` orders order\.created: order 2 of 5`,
		`published `+uuid+` orders order\.created: order 3 of 5`,
		`published `+uuid+` orders order\.created: order 4 of 5`,
		`published `+uuid+` orders order\.created: order 5 of 5`,
		`published 5 events \(5 stored, 0 duplicates\)`,
	)
	var ids []string
	for _, l := range lines[:5] {
		ids = append(ids, strings.Fields(l)[1])
	}

	// Credentials from the environment this time.
	cmd := command(t, "consumer", "-addr", srv.Addr(), "-fingerprint", srv.Fingerprint(), "-max", "5")
	cmd.Env = append(cmd.Env, "H3X_CLIENT_ID=consumer", "H3X_TOKEN=consumer-token")
	out = run(t, cmd)
	var patterns []string
	for i, id := range ids {
		patterns = append(patterns, fmt.Sprintf(`delivered %s orders order\.created attempt 1: order %d of 5`, id, i+1))
	}
	matchLines(t, out, append(patterns, `consumed 5 events`)...)

	// The consumer acked everything before it exited.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stats, err := srv.Queue().Stats(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if s := stats[0]; s.Ready != 0 || s.Leased != 0 || s.Delayed != 0 {
		t.Fatalf("queue after the consumer: %+v, want it empty", s)
	}
}

func TestConsumerStopsOnInterrupt(t *testing.T) {
	srv := newBroker(t)
	ctx, cancel := context.WithTimeout(context.Background(), runTimeout)
	defer cancel()

	cmd := command(t, "consumer", "-addr", srv.Addr(), "-insecure", "-client", "consumer", "-token", "consumer-token")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Read its output line by line; on failure, cleanup kills it and
	// stops the reader.
	lines := make(chan string)
	stop := make(chan struct{})
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			case <-stop:
				return
			}
		}
	}()
	exited := false
	t.Cleanup(func() {
		close(stop)
		if !exited {
			cmd.Process.Kill()
			<-readerDone
			cmd.Wait()
		}
	})
	next := func() string {
		t.Helper()
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("consumer ended early; stderr:\n%s", stderr.String())
			}
			return l
		case <-ctx.Done():
			t.Fatalf("no output from the consumer: %v; stderr:\n%s", ctx.Err(), stderr.String())
			return ""
		}
	}

	pub := srv.Dial(t, h3x.WithCredentials("producer", "producer-token"))
	res, err := pub.Publish(ctx, h3x.Event{Namespace: "orders", Type: "order.created", Message: "while you wait"})
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("delivered %s orders order.created attempt 1: while you wait", res[0].ID)
	if got := next(); got != want {
		t.Fatalf("consumer printed %q, want %q", got, want)
	}

	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if got := next(); got != "interrupted; consumed 1 events" {
		t.Fatalf("after SIGINT the consumer printed %q", got)
	}
	for l := range lines {
		t.Errorf("unexpected output: %q", l)
	}
	exited = true
	if err := cmd.Wait(); err != nil {
		t.Fatalf("consumer: %v; stderr:\n%s", err, stderr.String())
	}
}

func TestProducerRefused(t *testing.T) {
	srv := newBroker(t)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"wrong token", []string{"-client", "producer", "-token", "nope"}, "unauthenticated"},
		{"no publish permission", []string{"-client", "consumer", "-token", "consumer-token"}, "permission denied"},
		{"no credentials", nil, "credentials required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"-addr", srv.Addr(), "-fingerprint", srv.Fingerprint(), "-count", "1"}, tc.args...)
			cmd := command(t, "producer", args...)
			var stderr strings.Builder
			cmd.Stderr = &stderr
			err := cmd.Run()
			if _, ok := err.(*exec.ExitError); !ok {
				t.Fatalf("producer: %v, want a non-zero exit; stderr:\n%s", err, stderr.String())
			}
			if !strings.Contains(stderr.String(), tc.want) {
				t.Fatalf("stderr %q does not say %q", stderr.String(), tc.want)
			}
		})
	}
}
