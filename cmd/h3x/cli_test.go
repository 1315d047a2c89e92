package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

const testRegistry = "admin:*=admin-tok, writer:orders/pub=w-tok, reader:orders/sub=r-tok"

func TestUsageErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		env  []string
		want string
	}{
		{nil, nil, ""},
		{[]string{"frob"}, nil, `h3x: unknown command "frob"`},
		{[]string{"inject", "--frob"}, nil, "h3x inject: flag provided but not defined: -frob"},
		{[]string{"tail", "--max", "many"}, nil, `h3x tail: invalid value "many" for flag -max`},
		{[]string{"bench", "--size", "8"}, nil, "h3x bench: --size must be at least 16"},
		{[]string{"bench", "--count", "5", "--duration", "1s"}, nil, "h3x bench: give --duration or --count"},
		{[]string{"serve", "--addr", "127.0.0.1:0"}, nil, "h3x serve: no registry"},
		{[]string{"serve", "--registry", "a:*=b", "--tls-cert", "x.pem"}, nil, "h3x serve: --tls-cert and --tls-key go together"},
		{[]string{"serve", "--durability", "sometimes", "--registry", "a:*=b"}, nil, `h3x serve: invalid value "sometimes" for flag -durability: want one of fsync, nosync`},
		{[]string{"serve", "extra"}, []string{"H3X_REGISTRY=a:*=b"}, `h3x serve: unexpected argument "extra"`},
		{[]string{"stats"}, nil, "h3x stats: no token"},
		{[]string{"stats", "--token", "t", "--insecure", "--fingerprint", "ab"}, nil, "h3x stats: --fingerprint, --ca-file and --insecure exclude each other"},
		{[]string{"stats", "--token", "t"}, []string{"H3X_INSECURE=perhaps"}, "h3x stats: invalid value in $H3X_INSECURE"},
		{[]string{"inject", "--message", "m", "--token", "t"}, nil, "h3x inject: --ns is required"},
		{[]string{"inject", "--ns", "bad ns", "--message", "m", "--token", "t"}, nil, `h3x inject: --ns: invalid namespace "bad ns"`},
		{[]string{"tail", "--token", "t", "bad/ns"}, nil, `h3x tail: invalid namespace "bad/ns"`},
		{[]string{"version", "now"}, nil, `h3x version: unexpected argument "now"`},
		{[]string{"bench", "--token", "t"}, nil, "h3x bench: --token is for a running server (--addr); the embedded server makes its own"},
		{[]string{"bench", "--insecure", "--ca-file", "ca.pem"}, nil, "h3x bench: --ca-file and --insecure are for a running server (--addr)"},
		{[]string{"bench", "--queue", "memory", "--data-dir", "d"}, nil, "h3x bench: --data-dir is for the badger queue, not --queue memory"},
		{[]string{"bench", "--queue", "memory", "--durability", "nosync"}, nil, "h3x bench: --durability is for the badger queue, not --queue memory"},
		{[]string{"serve", "--registry", "a:*=b", "--data-dir", "d"}, []string{"H3X_QUEUE=memory"}, "h3x serve: --data-dir is for the badger queue, not the memory queue ($H3X_QUEUE memory)"},
		{[]string{"serve", "--registry", "a:*=b", "--queue", "memory", "--durability", "fsync", "--data-dir", "d"}, nil, "h3x serve: --data-dir and --durability are for the badger queue, not the memory queue (--queue memory)"},
		{[]string{"inject", "--ns", "jobs", "--size", "10", "--data", "x", "--token", "t"}, nil, "h3x inject: --size makes a body for events without --data"},
		{[]string{"serve", "--queue", "memory", "--registry", "a:*=b", "--addr", "nope"}, nil, `h3x serve: --addr "nope": address nope: missing port in address`},
		{[]string{"serve", "--queue", "memory", "--registry", "a:*=b"}, []string{"H3X_ADDR=nope"}, `h3x serve: $H3X_ADDR "nope": address nope: missing port in address`},
		{[]string{"serve", "--queue", "memory", "--registry", "a:*=b"}, []string{"H3X_MAX_ATTEMPTS=0"}, "h3x serve: $H3X_MAX_ATTEMPTS must be positive"},
		{[]string{"serve", "--queue", "memory", "--registry", "a:*=b"}, []string{"H3X_ACK_DEADLINE=-1s"}, "h3x serve: $H3X_ACK_DEADLINE must be positive"},
		{[]string{"serve", "--queue", "memory", "--registry", "a:*=b"}, []string{"H3X_TLS_KEY=k.pem"}, "h3x serve: $H3X_TLS_CERT and $H3X_TLS_KEY go together"},
		{[]string{"stats", "--token", "t"}, []string{"H3X_INSECURE=true", "H3X_FINGERPRINT=ab"}, "h3x stats: $H3X_FINGERPRINT, $H3X_CA_FILE and $H3X_INSECURE exclude each other"},
		{[]string{"stats", "--token", "t", "--addr", "localhost"}, nil, `h3x stats: --addr "localhost": address localhost: missing port in address`},
		{[]string{"stats", "--token", "t"}, []string{"H3X_ADDR=localhost"}, `h3x stats: $H3X_ADDR "localhost": address localhost: missing port in address`},
		{[]string{"version", "--", "-x"}, nil, `h3x version: unexpected argument "-x"`},
		{[]string{"inject", "--ns", "jobs", "extra", "--message", "m", "--token", "t"}, nil, `h3x inject: unexpected argument "extra"`},
		{[]string{"bench", "--queue", "memory", "now", "--count", "5"}, nil, `h3x bench: unexpected argument "now"`},
		{[]string{"serve", "--registry", "a:*=b", "extra", "--queue", "memory"}, nil, `h3x serve: unexpected argument "extra"`},
		{[]string{"tail", "--token", "t", "orders", "--max", "-1"}, nil, "h3x tail: --max must not be negative"},
		{[]string{"stats", "orders", "--frob"}, nil, "h3x stats: flag provided but not defined: -frob"},
	} {
		r := runH3X(t, "", tc.env, tc.args...)
		if r.code != 2 {
			t.Errorf("h3x %v: exit %d, want 2 (stderr %q)", tc.args, r.code, r.stderr)
			continue
		}
		if tc.want == "" {
			if !strings.Contains(r.stderr, "Usage:") {
				t.Errorf("h3x with no arguments: stderr %q, want the usage", r.stderr)
			}
			continue
		}
		checkOneLineError(t, r, tc.want)
	}
}

func TestHelp(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"-h"}, {"help"}, {"help", "tail"}, {"serve", "-h"}, {"inject", "--help"}, {"bench", "-h"}, {"stats", "-h"}} {
		r := runH3X(t, "", []string{"H3X_TOKEN=secret-token-value"}, args...)
		if r.code != 0 || !strings.Contains(r.stdout, "Usage") || r.stderr != "" {
			t.Errorf("h3x %v: exit %d, stdout %q, stderr %q", args, r.code, r.stdout, r.stderr)
		}
		if strings.Contains(r.stdout, "secret-token-value") {
			t.Errorf("h3x %v shows the token from the environment", args)
		}
	}
	r := runH3X(t, "", nil, "version")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "h3x ") || !strings.Contains(r.stdout, h3x.ALPN) {
		t.Errorf("h3x version: exit %d, %q", r.code, r.stdout)
	}
}

// TestBadInput checks that each kind of bad input gives a non-zero exit and
// one line naming the problem.
func TestBadInput(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	badPEM := write("bad.pem", "not a certificate\n")
	emptyReg := write("empty.registry", "# nobody\n")
	srv := serve(t, nil, "--queue", "memory", "--registry", testRegistry)

	for _, tc := range []struct {
		name string
		args []string
		env  []string
		want string
	}{
		{"malformed registry", []string{"serve", "--queue", "memory", "--registry", "admin:*"}, nil,
			"h3x serve: malformed registry: registry entry 1 (line 1)"},
		{"malformed registry in env", []string{"serve", "--queue", "memory"}, []string{"H3X_REGISTRY=a:b=c,nonsense"},
			"h3x serve: malformed registry: registry entry 2"},
		{"missing registry file", []string{"serve", "--queue", "memory", "--registry-file", filepath.Join(dir, "nope")}, nil,
			"h3x serve: cannot read registry file " + filepath.Join(dir, "nope") + ": no such file"},
		{"empty registry", []string{"serve", "--queue", "memory", "--registry-file", emptyReg}, nil,
			"h3x serve: registry file " + emptyReg + " holds no entries"},
		{"bad TLS file", []string{"serve", "--queue", "memory", "--registry", testRegistry, "--tls-cert", badPEM, "--tls-key", badPEM}, nil,
			"h3x serve: loading TLS certificate " + badPEM},
		{"missing TLS file", []string{"serve", "--queue", "memory", "--registry", testRegistry, "--tls-cert", filepath.Join(dir, "c.pem"), "--tls-key", filepath.Join(dir, "k.pem")}, nil,
			"h3x serve: loading TLS certificate"},
		{"taken metrics port", []string{"serve", "--queue", "memory", "--registry", testRegistry, "--metrics-addr", "256.0.0.1:1"}, nil,
			"h3x serve: metrics: listen tcp"},
		{"bad CA file", []string{"stats", "--addr", srv.addr, "--token", "t", "--ca-file", badPEM}, nil,
			"h3x stats: CA file " + badPEM + " holds no PEM certificate"},
		{"unreachable server", []string{"stats", "--addr", closedUDPPort(t), "--token", "t", "--insecure", "--timeout", "1s"}, nil,
			"h3x stats: cannot reach 127.0.0.1:"},
		{"unreachable server (bench)", []string{"bench", "--addr", closedUDPPort(t), "--token", "t", "--insecure", "--timeout", "1s"}, nil,
			"h3x bench: cannot reach 127.0.0.1:"},
		{"wrong token", []string{"inject", "--ns", "orders", "--message", "m"}, srv.clientEnv("writer", "wrong"),
			`h3x inject: authentication refused for client "writer": unknown client or wrong token`},
		{"unknown client", []string{"tail", "orders"}, srv.clientEnv("nobody", "r-tok"),
			`h3x tail: authentication refused for client "nobody"`},
		{"untrusted certificate", []string{"stats", "--addr", srv.addr, "--client", "admin", "--token", "admin-tok"}, nil,
			"h3x stats: the server certificate at " + srv.addr + " is not trusted: x509: certificate signed by unknown authority (pass --fingerprint"},
		{"wrong fingerprint", []string{"stats", "--addr", srv.addr, "--client", "admin", "--token", "admin-tok", "--fingerprint", strings.Repeat("ab", 32)}, nil,
			"h3x stats: the server at " + srv.addr + " presented a certificate whose SHA-256 is not --fingerprint"},
		{"ungranted namespace", []string{"tail", "audit"}, srv.clientEnv("reader", "r-tok"),
			`h3x tail: permission denied: client "reader" is not granted all of audit`},
		{"ungranted publish", []string{"inject", "--ns", "audit", "--message", "m"}, srv.clientEnv("writer", "w-tok"),
			`h3x inject: 1 of 1 events refused; first: event 1 refused: permission denied: namespace "audit" is not granted for publishing`},
		{"ungranted stats", []string{"stats", "audit"}, srv.clientEnv("reader", "r-tok"),
			`h3x stats: permission denied: namespace "audit" is not granted for consuming`},
		{"malformed JSON line", []string{"inject", "--file", "-"}, srv.clientEnv("writer", "w-tok"),
			`h3x inject: line 2: not a JSON event`},
		{"unknown JSON field", []string{"inject", "--file", "-", "--ns", "orders"}, srv.clientEnv("writer", "w-tok"),
			`h3x inject: line 1: not a JSON event: json: unknown field "colour"`},
	} {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			stdin := ""
			switch tc.name {
			case "malformed JSON line":
				stdin = `{"namespace":"orders"}` + "\n{oops\n"
			case "unknown JSON field":
				stdin = `{"colour":"red"}` + "\n"
			}
			r := runH3X(t, stdin, tc.env, tc.args...)
			if r.code != 1 {
				t.Errorf("exit %d, want 1; stderr %q", r.code, r.stderr)
			}
			checkOneLineError(t, r, tc.want)
			if tc.name == "malformed JSON line" && len(lines(r.stdout)) != 1 {
				// The line before the malformed one is published (its
				// batch used to be dropped with the bad line).
				t.Errorf("printed %q, want the id of line 1", r.stdout)
			}
		})
	}
	if code := srv.stop(syscall.SIGTERM, 15*time.Second); code != 0 {
		t.Errorf("h3x serve exited %d after SIGTERM; stderr:\n%s", code, srv.stderr.String())
	}
}

// TestServeInjectTail runs a served broker through inject (flags and JSON
// lines), tail, stats and a metrics scrape, then stops it with SIGINT.
func TestServeInjectTail(t *testing.T) {
	t.Parallel()
	regFile := filepath.Join(t.TempDir(), "registry")
	if err := os.WriteFile(regFile, []byte("# test clients\n"+strings.ReplaceAll(testRegistry, ", ", "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The file wins over the (malformed) registry text in the environment.
	srv := serve(t, []string{"H3X_REGISTRY_FILE=" + regFile, "H3X_REGISTRY=malformed"}, "--queue", "memory", "--metrics-addr", "127.0.0.1:0")
	writer, reader, admin := srv.clientEnv("writer", "w-tok"), srv.clientEnv("reader", "r-tok"), srv.clientEnv("admin", "admin-tok")

	r := runH3X(t, "", writer, "inject", "--ns", "orders", "--type", "order.created", "--message", "hello", "--data", `{"sku":"A-1"}`, "--meta", "env=test", "--count", "3")
	if r.code != 0 || len(lines(r.stdout)) != 3 {
		t.Fatalf("inject --count 3: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	ids := lines(r.stdout)
	jsonl := `{"id":"fixed-1","namespace":"orders","type":"t","data":"plain text","time":"2026-01-02T03:04:05Z"}` + "\n\n" +
		`{"type":"u","data":[1,2,3],"metadata":{"k":"v"}}` + "\n"
	r = runH3X(t, jsonl, writer, "inject", "--ns", "orders") // stdin is not a terminal: JSON lines
	if r.code != 0 || len(lines(r.stdout)) != 2 || lines(r.stdout)[0] != "fixed-1" {
		t.Fatalf("inject from stdin: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	ids = append(ids, lines(r.stdout)...)
	// Publishing the same id again is deduplicated, and still printed.
	r = runH3X(t, `{"id":"fixed-1","namespace":"orders"}`+"\n", writer, "inject", "--file", "-")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "fixed-1" {
		t.Fatalf("inject a duplicate: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}

	r = runH3X(t, "", reader, "tail", "--max", "5", "orders")
	if r.code != 0 {
		t.Fatalf("tail: exit %d, stderr %q", r.code, r.stderr)
	}
	var got []string
	for _, l := range lines(r.stdout) {
		var j eventJSON
		if err := json.Unmarshal([]byte(l), &j); err != nil {
			t.Fatalf("tail printed %q: %v", l, err)
		}
		got = append(got, j.ID)
		switch j.ID {
		case "fixed-1":
			if string(j.Data) != `"plain text"` || j.Type != "t" || j.Attempt != 1 {
				t.Errorf("tail printed %s", l)
			}
		case ids[0]:
			if string(j.Data) != `{"sku":"A-1"}` || j.Message != "hello" || j.Metadata["env"] != "test" {
				t.Errorf("tail printed %s", l)
			}
		}
	}
	if !slices.Equal(got, ids) {
		t.Errorf("tail printed ids %v, want %v (publish order)", got, ids)
	}
	// tail acked them: nothing is left (a short --timeout run would block,
	// so ask stats, and check the metrics below).
	r = runH3X(t, "", admin, "stats", "--json", "orders")
	if r.code != 0 {
		t.Fatalf("stats: exit %d, stderr %q", r.code, r.stderr)
	}
	var stats []namespaceStats
	if err := json.Unmarshal([]byte(r.stdout), &stats); err != nil {
		t.Fatalf("stats --json printed %q: %v", r.stdout, err)
	}
	for _, s := range stats { // the queue may not report the namespace at all
		if s.Namespace == "orders" && (s.Ready != 0 || s.Leased != 0) {
			t.Errorf("after tail acked everything, stats says %+v", s)
		}
	}
	r = runH3X(t, "", admin, "stats")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "NAMESPACE") {
		t.Errorf("stats: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}

	// The metrics moved.
	var m map[string]float64
	waitFor(t, 10*time.Second, "the metrics to count the acks", func() bool {
		m = scrape(t, srv.metrics)
		return m[`h3x_events_acked_total{namespace="orders"}`] == 5
	})
	for k, v := range map[string]float64{
		`h3x_events_published_total{namespace="orders"}`: 5,
		`h3x_events_duplicate_total{namespace="orders"}`: 1,
		`h3x_events_delivered_total{namespace="orders"}`: 5,
	} {
		if m[k] != v {
			t.Errorf("%s = %v, want %v", k, m[k], v)
		}
	}
	if m["h3x_connections_opened_total"] < 5 || m["go_goroutines"] == 0 {
		t.Errorf("connections opened %v, go_goroutines %v", m["h3x_connections_opened_total"], m["go_goroutines"])
	}
	if got, ok := m[`h3x_leases_expired_total{namespace="orders"}`]; !ok || got != 0 {
		t.Errorf(`h3x_leases_expired_total{namespace="orders"} = %v (present %v), want 0`, got, ok)
	}

	// A lease that expires: a client fetches an event and extends its lease
	// to 1ms.
	if r = runH3X(t, "", writer, "inject", "--ns", "orders", "--message", "expire me"); r.code != 0 {
		t.Fatalf("inject: exit %d, stderr %q", r.code, r.stderr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := h3x.Dial(ctx, srv.addr, h3x.WithCredentials("reader", "r-tok"), h3x.WithTrustedFingerprint(srv.fingerprint))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var ds []*h3x.Delivery
	for range 100 {
		if ds, err = c.Fetch(ctx, 1, "orders"); err != nil || len(ds) > 0 {
			break
		}
	}
	if err != nil || len(ds) != 1 {
		t.Fatalf("fetching the event: %d deliveries, %v", len(ds), err)
	}
	if res, err := c.Extend(ctx, time.Millisecond, ds[0]); err != nil || res[0].Status != h3x.SettleOK {
		t.Fatalf("extending its lease to 1ms: %+v, %v", res, err)
	}
	waitFor(t, 10*time.Second, "the metrics to count the expired lease", func() bool {
		m = scrape(t, srv.metrics)
		return m[`h3x_leases_expired_total{namespace="orders"}`] == 1
	})
	c.Close()

	if code := srv.stop(syscall.SIGINT, 15*time.Second); code != 0 {
		t.Fatalf("h3x serve exited %d after SIGINT; stderr:\n%s", code, srv.stderr.String())
	}
	if !strings.Contains(srv.stderr.String(), "h3x serve: stopped") {
		t.Errorf("h3x serve did not log its stop:\n%s", srv.stderr.String())
	}
}

func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		t.Fatalf("scraping %s: %v", url, err)
	}
	defer resp.Body.Close()
	out := make(map[string]float64)
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		l := sc.Text()
		if l == "" || l[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		v, err := strconv.ParseFloat(l[i+1:], 64)
		if err == nil {
			out[l[:i]] = v
		}
	}
	return out
}

// TestTailInterrupt checks that tail --no-ack holds its deliveries and
// that Ctrl-C releases them at once and exits 0, and that tail --ack
// consumes.
func TestTailInterrupt(t *testing.T) {
	t.Parallel()
	srv := h3xtest.NewServer(t, h3xtest.WithServerOptions(h3x.WithAckDeadline(time.Minute)))
	env := []string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}
	c := srv.Dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, h3x.Event{ID: "a", Namespace: "jobs"}, h3x.Event{ID: "b", Namespace: "jobs"}); err != nil {
		t.Fatal(err)
	}

	tail := startH3X(t, env, "tail", "--no-ack", "--format", "text", "jobs")
	waitFor(t, 15*time.Second, "tail to print two deliveries", func() bool { return len(lines(tail.stdout.String())) == 2 })
	if out := tail.stdout.String(); !strings.Contains(out, " jobs id=a") || !strings.Contains(out, " jobs id=b") {
		t.Errorf("tail --format text printed %q", out)
	}
	if code := tail.stop(syscall.SIGINT, 10*time.Second); code != 0 {
		t.Fatalf("tail exited %d after SIGINT; stderr %q", code, tail.stderr.String())
	}
	// Released, not waiting for the one-minute deadline: delivered again.
	fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
	ds, err := c.Fetch(fctx, 2, "jobs")
	fcancel()
	if err != nil || len(ds) != 2 || ds[0].Attempt() != 2 {
		t.Fatalf("after tail --no-ack was interrupted, Fetch gave %d deliveries, %v", len(ds), err)
	}
	if _, err := c.Nack(ctx, 0, "back", ds...); err != nil {
		t.Fatal(err)
	}

	// tail --ack (the default) consumes them.
	r := runH3X(t, "", env, "tail", "--max", "2", "jobs")
	if r.code != 0 || len(lines(r.stdout)) != 2 {
		t.Fatalf("tail --max 2: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	fctx, fcancel = context.WithTimeout(ctx, 300*time.Millisecond)
	ds, err = c.Fetch(fctx, 2, "jobs")
	fcancel()
	if len(ds) != 0 {
		t.Fatalf("after tail acked, Fetch gave %d deliveries (%v)", len(ds), err)
	}
}

// TestBench runs bench on an embedded server and against a running one,
// and parses its JSON.
func TestBench(t *testing.T) {
	t.Parallel()
	check := func(r result, wantPublished int64) benchResult {
		t.Helper()
		if r.code != 0 {
			t.Fatalf("bench: exit %d, stderr %q", r.code, r.stderr)
		}
		var res benchResult
		if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
			t.Fatalf("bench --json printed %q: %v", r.stdout, err)
		}
		if res.Published == 0 || (wantPublished > 0 && res.Published != wantPublished) {
			t.Errorf("published %d, want %d", res.Published, wantPublished)
		}
		if !res.Drained || res.Consumed != res.Published {
			t.Errorf("consumed %d of %d (drained %v)", res.Consumed, res.Published, res.Drained)
		}
		for name, l := range map[string]latencySumm{"publish→ack": res.PublishToAck, "publish→delivery": res.PublishToDelivery} {
			if l.Count == 0 || l.P50 <= 0 || l.P50 > l.P90 || l.P90 > l.P99 || l.P99 > l.P999 || l.P999 > l.Max {
				t.Errorf("%s latency %+v", name, l)
			}
		}
		if res.PublishRate <= 0 || res.ConsumeRate <= 0 {
			t.Errorf("rates %v / %v", res.PublishRate, res.ConsumeRate)
		}
		return res
	}
	r := runH3X(t, "", nil, "bench", "--json", "--duration", "1s", "--queue", "memory", "--publishers", "2", "--consumers", "2", "--size", "64")
	res := check(r, 0)
	if res.Target != "embedded" || res.Publishers != 2 || res.EventSize != 64 {
		t.Errorf("bench reported %+v", res)
	}

	srv := h3xtest.NewServer(t)
	env := []string{"H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}
	r = runH3X(t, "", env, "bench", "--json", "--addr", srv.Addr(), "--count", "400", "--rate", "2000", "--batch", "1", "--ns", "bench-remote")
	res = check(r, 400)
	if res.Target != srv.Addr() || res.Rate != 2000 {
		t.Errorf("bench reported %+v", res)
	}
	// At 2,000 ev/s, 400 events take about 0.2 s.
	if res.PublishSeconds < 0.15 {
		t.Errorf("400 events at 2000/s took %vs", res.PublishSeconds)
	}

	// The human output.
	r = runH3X(t, "", nil, "bench", "--duration", "300ms", "--queue", "memory")
	if r.code != 0 || !strings.Contains(r.stdout, "publish→delivery") || !strings.Contains(r.stdout, "ev/s") {
		t.Errorf("bench: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
}

// statsQueue reports fixed statistics.
type statsQueue struct {
	h3x.Queue
	stats []h3x.NamespaceStats
}

func (q statsQueue) Stats(_ context.Context, namespaces ...string) ([]h3x.NamespaceStats, error) {
	var out []h3x.NamespaceStats
	for _, s := range q.stats {
		if len(namespaces) == 0 || slices.Contains(namespaces, s.Namespace) {
			out = append(out, s)
		}
	}
	return out, nil
}

// TestStats checks the admin stream: counts, and the grants filter.
func TestStats(t *testing.T) {
	t.Parallel()
	reg, err := h3x.ParseRegistry(testRegistry)
	if err != nil {
		t.Fatal(err)
	}
	q := statsQueue{Queue: h3x.NewMemoryQueue(h3x.QueueOptions{}), stats: []h3x.NamespaceStats{
		{Namespace: "orders", Ready: 3, Leased: 2, Delayed: 1, DeadLettered: 4, Expired: 5, OldestReady: 1500 * time.Millisecond, Bytes: 300},
		{Namespace: "audit", Ready: 9},
	}}
	srv := h3xtest.NewServer(t, h3xtest.WithQueue(q), h3xtest.WithRegistry(reg))
	srv.Handle(adminRequestFrame, adminHandler(srv.Server()))
	env := func(client, token string) []string {
		return []string{"H3X_ADDR=" + srv.Addr(), "H3X_FINGERPRINT=" + srv.Fingerprint(), "H3X_CLIENT_ID=" + client, "H3X_TOKEN=" + token}
	}

	r := runH3X(t, "", env("admin", "admin-tok"), "stats", "--json")
	var all []namespaceStats
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &all) != nil {
		t.Fatalf("stats --json: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	want := []namespaceStats{
		{Namespace: "audit", Ready: 9},
		{Namespace: "orders", Ready: 3, Leased: 2, Delayed: 1, DeadLettered: 4, Expired: 5, OldestReadyMs: 1500, Bytes: 300},
	}
	if !slices.Equal(all, want) {
		t.Errorf("admin sees %+v, want %+v", all, want)
	}

	// reader may consume orders only: it sees orders only.
	r = runH3X(t, "", env("reader", "r-tok"), "stats")
	if r.code != 0 {
		t.Fatalf("stats as reader: exit %d, stderr %q", r.code, r.stderr)
	}
	out := lines(r.stdout)
	if len(out) != 2 || !strings.HasPrefix(out[1], "orders ") || !strings.Contains(out[1], "1.5s") {
		t.Errorf("stats as reader printed:\n%s", r.stdout)
	}
	fields := strings.Fields(out[1])
	if !slices.Equal(fields[:7], []string{"orders", "3", "2", "1", "4", "5", "300"}) {
		t.Errorf("stats row %q", out[1])
	}

	// writer may consume nothing.
	r = runH3X(t, "", env("writer", "w-tok"), "stats", "--json")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "[]" {
		t.Errorf("stats as writer: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}

	// A server without the admin handler.
	plain := h3xtest.NewServer(t)
	r = runH3X(t, "", []string{"H3X_ADDR=" + plain.Addr(), "H3X_FINGERPRINT=" + plain.Fingerprint(), "H3X_CLIENT_ID=" + h3xtest.ClientID, "H3X_TOKEN=" + h3xtest.Token}, "stats")
	if r.code != 1 {
		t.Errorf("stats against a plain server: exit %d", r.code)
	}
	checkOneLineError(t, r, "h3x stats: the server does not serve stats")
}

// TestServeTLSFiles serves with certificate files and connects with
// --ca-file.
func TestServeTLSFiles(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	writeCert(t, certFile, keyFile)
	srv := serve(t, []string{"H3X_REGISTRY=" + testRegistry, "H3X_TLS_CERT=" + certFile, "H3X_TLS_KEY=" + keyFile, "H3X_QUEUE=memory"})
	env := []string{"H3X_ADDR=" + srv.addr, "H3X_CA_FILE=" + certFile, "H3X_CLIENT_ID=writer", "H3X_TOKEN=w-tok"}
	r := runH3X(t, "", env, "inject", "--ns", "orders", "--id", "tls-1", "--message", "over TLS")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "tls-1" {
		t.Fatalf("inject with --ca-file: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	if strings.Contains(srv.stderr.String(), "self-signed") {
		t.Errorf("h3x serve with TLS files made a self-signed certificate")
	}
	if code := srv.stop(syscall.SIGTERM, 15*time.Second); code != 0 {
		t.Errorf("h3x serve exited %d", code)
	}
}

func writeCert(t *testing.T, certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "h3x test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
}
