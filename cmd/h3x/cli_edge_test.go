package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

// ackFailingQueue is a memory queue whose Ack always fails: tail's acks are
// never applied.
type ackFailingQueue struct{ h3x.Queue }

func (ackFailingQueue) Ack(context.Context, string, []h3x.LeaseRef) ([]h3x.SettleResult, error) {
	return nil, errors.New("disk on fire")
}

// TestTailMaxAckFailureExitCode: tail --max N prints N deliveries and
// acks them; the acks are batched and only sent by Client.Close, whose
// error tail used to ignore. When the acks fail, the events are not
// consumed (they will be delivered again): tail must not exit 0.
func TestTailMaxAckFailureExitCode(t *testing.T) {
	t.Parallel()
	srv := h3xtest.NewServer(t, h3xtest.WithQueue(ackFailingQueue{h3x.NewMemoryQueue(h3x.QueueOptions{})}))
	env := []string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}
	c := srv.Dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, h3x.Event{ID: "a", Namespace: "jobs"}, h3x.Event{ID: "b", Namespace: "jobs"}); err != nil {
		t.Fatal(err)
	}
	r := runH3X(t, "", env, "tail", "--max", "2", "jobs")
	if len(lines(r.stdout)) != 2 {
		t.Fatalf("tail --max 2 printed %q (exit %d, stderr %q)", r.stdout, r.code, r.stderr)
	}
	if r.code == 0 {
		t.Errorf("tail --max 2 exited 0 although none of its acks was applied (stderr %q)", r.stderr)
	}
	if !strings.Contains(r.stderr, "ack") {
		t.Errorf("tail's stderr does not mention the failed acks: %q", r.stderr)
	}
}

// TestNamespaceArgsOverrideEnv: .env.example presents H3X_NAMESPACE as
// the *default* namespaces of tail and stats, and flags/arguments are meant
// to win over the environment. namespacesFrom used to merge $H3X_NAMESPACE
// (applied to --ns) with the positional arguments: "h3x tail orders" with
// H3X_NAMESPACE=audit followed audit too, and a client granted only orders
// was refused.
func TestNamespaceArgsOverrideEnv(t *testing.T) {
	t.Parallel()
	reg, err := h3x.ParseRegistry(testRegistry)
	if err != nil {
		t.Fatal(err)
	}
	srv := h3xtest.NewServer(t, h3xtest.WithRegistry(reg))
	pub := srv.Dial(t, h3x.WithCredentials("admin", "admin-tok"))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := pub.Publish(ctx, h3x.Event{ID: "o1", Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	env := []string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=reader", "H3X_TOKEN=r-tok",
		"H3X_NAMESPACE=audit"} // a default, for when no namespace is named
	r := runH3X(t, "", env, "tail", "--max", "1", "orders")
	if r.code != 0 || len(lines(r.stdout)) != 1 {
		t.Errorf("tail --max 1 orders with $H3X_NAMESPACE=audit: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
}

// TestTrustFlagOverridesEnv: a trust flag given on the command line
// should override the trust mode set in the environment (flags override
// the environment); --fingerprint with $H3X_INSECURE=true (or
// $H3X_CA_FILE) set used to be a usage error.
func TestTrustFlagOverridesEnv(t *testing.T) {
	t.Parallel()
	srv := h3xtest.NewServer(t)
	env := []string{"H3X_ADDR=" + srv.Addr(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token, "H3X_INSECURE=true"}
	r := runH3X(t, "", env, "inject", "--ns", "jobs", "--id", "x1", "--fingerprint", srv.Fingerprint())
	if r.code != 0 || strings.TrimSpace(r.stdout) != "x1" {
		t.Errorf("inject --fingerprint F with $H3X_INSECURE=true: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
}

// TestServeBadAddrOneLine: requirement 3 — a bad input gives a
// one-line error. An unusable --addr (here: a UDP port already taken)
// used to print the self-signed-certificate warning first (logged before
// the listen), so stderr had two lines.
func TestServeBadAddrOneLine(t *testing.T) {
	t.Parallel()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := runH3X(t, "", nil, "serve", "--queue", "memory", "--registry", testRegistry, "--addr", c.LocalAddr().String())
	if r.code != 1 {
		t.Errorf("exit %d, want 1", r.code)
	}
	checkOneLineError(t, r, "h3x serve: ")
}

// TestTailTextOneLine: tail --format text promises "a line for
// people" per delivery; it quoted the message and metadata values but
// wrote the type, the id and metadata keys raw: a newline (or a terminal
// escape sequence) in them broke the line.
func TestTailTextOneLine(t *testing.T) {
	t.Parallel()
	srv := h3xtest.NewServer(t)
	env := []string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}
	c := srv.Dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, h3x.Event{ID: "id\nforged", Namespace: "jobs", Type: "order\ncreated", Metadata: map[string]string{"k\n\x1b[2J": "v"}}); err != nil {
		t.Fatal(err)
	}
	r := runH3X(t, "", env, "tail", "--max", "1", "--format", "text", "jobs")
	if r.code != 0 {
		t.Fatalf("tail: exit %d, stderr %q", r.code, r.stderr)
	}
	if n := len(lines(r.stdout)); n != 1 || strings.Contains(r.stdout, "\x1b") {
		t.Errorf("tail --format text printed %d lines for one delivery: %q", n, r.stdout)
	}
}

// TestInjectInterruptPrintsStored: inject prints "the stored ids".
// When it was interrupted (SIGINT), the publishes in flight were cancelled
// and their ids not printed, although the server may have stored them:
// the printed ids undercounted what was published.
func TestInjectInterruptPrintsStored(t *testing.T) {
	t.Parallel()
	srv := h3xtest.NewServer(t)
	srv.SetLatency(100 * time.Millisecond)
	env := []string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}
	p := startH3X(t, env, "inject", "--ns", "jobs", "--count", "100000", "--rate", "1000", "--inflight", "8")
	waitFor(t, 15*time.Second, "inject to print ids", func() bool { return len(lines(p.stdout.String())) >= 50 })
	code := p.stop(syscall.SIGINT, 10*time.Second)
	printed := len(lines(p.stdout.String()))
	srv.SetLatency(0)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	st, err := srv.Server().Stats(ctx, "jobs")
	if err != nil || len(st) != 1 {
		t.Fatalf("stats: %v %v", st, err)
	}
	t.Logf("inject exit %d, stderr %q", code, p.stderr.String())
	if st[0].Ready != printed {
		t.Errorf("interrupted inject printed %d ids, the server stored %d events", printed, st[0].Ready)
	}
}

// TestBenchRateCountEnd: with --rate and --count, publishing ends when
// the count is published; each of the --inflight (64 by default with
// --rate) workers used to notice that only after one more scheduled
// ticket: 64 extra ticket intervals were added to publish_seconds, and the
// reported publish rate was far below --rate.
func TestBenchRateCountEnd(t *testing.T) {
	t.Parallel()
	r := runH3X(t, "", nil, "bench", "--json", "--queue", "memory", "--rate", "20", "--count", "20")
	if r.code != 0 {
		t.Fatalf("bench: exit %d, stderr %q", r.code, r.stderr)
	}
	var res benchResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatalf("bench --json printed %q: %v", r.stdout, err)
	}
	// 20 events at 20/s are due over 0.95 s.
	if res.Published != 20 || res.PublishSeconds > 2 || res.PublishRate < 10 {
		t.Errorf("20 events at --rate 20: published %d in %vs, reported %v ev/s", res.Published, res.PublishSeconds, res.PublishRate)
	}
}

// TestInjectTinyRate: --rate below about 1e-9 events/s overflowed the
// per-event interval (float64 → time.Duration), which became negative: the
// rate was ignored and every event published at once. Such rates are now a
// usage error, in inject and bench.
func TestInjectTinyRate(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"inject", "--ns", "jobs", "--count", "5", "--rate", "1e-10", "--addr", "127.0.0.1:1", "--token", "x"},
		{"bench", "--queue", "memory", "--count", "5", "--rate", "1e-10"},
	} {
		r := runH3X(t, "", nil, args...)
		if r.code != 2 || !strings.Contains(r.stderr, "--rate") {
			t.Errorf("%v: exit %d, stderr %q, want a usage error about --rate", args, r.code, r.stderr)
		}
	}
}

// TestBenchAddrIgnoresEmbeddedFlags: the embedded-server flags
// (--queue, --durability, --data-dir) were silently ignored with --addr,
// although the reverse mistake (--token without --addr) is a usage error.
func TestBenchAddrIgnoresEmbeddedFlags(t *testing.T) {
	t.Parallel()
	srv := h3xtest.NewServer(t)
	env := []string{"H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}
	r := runH3X(t, "", env, "bench", "--json", "--addr", srv.Addr(), "--count", "10", "--queue", "memory", "--durability", "nosync")
	if r.code != 2 {
		t.Errorf("bench --addr with --queue/--durability: exit %d (stderr %q), want a usage error", r.code, r.stderr)
	}
}

// Flag values that cannot work are usage errors (exit 2) naming the flag:
// --ack-deadline 0 used to fail later with the library's message (exit 1),
// a negative --shutdown-timeout was accepted, and --count 0 published one
// event.
func TestNonsenseFlagValuesAreUsageErrors(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"serve", "--queue", "memory", "--registry", testRegistry, "--ack-deadline", "0"},
		{"serve", "--queue", "memory", "--registry", testRegistry, "--shutdown-timeout", "-1s"},
		{"inject", "--ns", "jobs", "--count", "0", "--addr", "127.0.0.1:1", "--token", "x"},
	} {
		flag := args[len(args)-2]
		if args[0] == "inject" {
			flag = "--count"
		}
		r := runH3X(t, "", nil, args...)
		if r.code != 2 || !strings.Contains(r.stderr, flag) {
			t.Errorf("%v: exit %d, stderr %q, want a usage error naming %s", args, r.code, r.stderr, flag)
		}
	}
}

// Stats of more namespaces than fit one answer frame: the server's admin
// handler used to send the oversized frame (which the client refused), so
// stats failed altogether. It now answers with the first that fit, and
// stats prints them, then says how many it left out (exit 1).
func TestStatsMoreNamespacesThanFitAFrame(t *testing.T) {
	t.Parallel()
	var many []h3x.NamespaceStats
	for i := range 12000 { // ~130 bytes of JSON each: ~1.5 MiB
		many = append(many, h3x.NamespaceStats{Namespace: fmt.Sprintf("namespace-%05d", i), Ready: i})
	}
	q := statsQueue{Queue: h3x.NewMemoryQueue(h3x.QueueOptions{}), stats: many}
	srv := h3xtest.NewServer(t, h3xtest.WithQueue(q))
	srv.Handle(adminRequestFrame, adminHandler(srv.Server()))
	env := []string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}
	r := runH3X(t, "", env, "stats", "--json")
	var shown []namespaceStats
	if err := json.Unmarshal([]byte(r.stdout), &shown); err != nil || len(shown) == 0 || len(shown) >= len(many) {
		t.Fatalf("stats of %d namespaces: exit %d, %d shown (%v), stderr %q", len(many), r.code, len(shown), err, r.stderr)
	}
	if r.code != 1 || !strings.Contains(r.stderr, fmt.Sprintf("%d more namespaces", len(many)-len(shown))) {
		t.Errorf("exit %d, stderr %q; want exit 1 saying how many were left out", r.code, r.stderr)
	}
}
