package h3xprom_test

import (
	"bufio"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/goleak"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xprom"
	"github.com/h3x-io/h3x/h3xtest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// scrape fetches url and returns every sample by its text-format key, such
// as `h3x_events_published_total{namespace="orders"}`.
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		t.Fatalf("scraping: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scraping: status %s", resp.Status)
	}
	out := make(map[string]float64)
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("scraping: bad sample %q", line)
		}
		out[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("scraping: %v", err)
	}
	return out
}

func serveMetrics(t *testing.T, cs ...prometheus.Collector) string {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(cs...)
	hs := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	t.Cleanup(hs.Close)
	return hs.URL + "/metrics"
}

// TestMetricsMove runs publishes, deliveries, settlements and a failed
// authentication through a real server and checks that the scraped metrics
// follow.
func TestMetricsMove(t *testing.T) {
	m := h3xprom.New()
	srv := h3xtest.NewServer(t, h3xtest.WithServerOptions(h3x.WithHooks(m)))
	url := serveMetrics(t, m, h3xprom.NewQueueCollector(srv.Server()))

	before := scrape(t, url)
	if got := before["h3x_connections"]; got != 0 {
		t.Fatalf("h3x_connections before any client = %v, want 0", got)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c := srv.Dial(t)
	evs := []h3x.Event{
		{ID: "e1", Namespace: "orders", Type: "t"},
		{ID: "e2", Namespace: "orders", Type: "t"},
		{ID: "e3", Namespace: "orders", Type: "t"},
	}
	if _, err := c.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Publish(ctx, h3x.Event{ID: "e1", Namespace: "orders"}); err != nil { // a duplicate
		t.Fatal(err)
	}
	res, err := c.Publish(ctx, h3x.Event{Namespace: "bad namespace!"}) // refused: invalid
	if err != nil || res[0].Status != h3x.PublishRefused {
		t.Fatalf("publishing to an invalid namespace: %v, %+v", err, res)
	}

	var got []*h3x.Delivery
	for len(got) < 3 {
		ds, err := c.Fetch(ctx, 3-len(got), "orders")
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, ds...)
	}
	if _, err := c.Ack(ctx, got[0], got[1]); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ack(ctx, got[0]); err != nil { // refused: already acked
		t.Fatal(err)
	}
	if _, err := c.Nack(ctx, 0, "test", got[2]); err != nil {
		t.Fatal(err)
	}
	again, err := c.Fetch(ctx, 1, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if again[0].Attempt() != 2 {
		t.Fatalf("redelivery attempt = %d, want 2", again[0].Attempt())
	}
	if _, err := c.Extend(ctx, time.Minute, again[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ack(ctx, again[0]); err != nil {
		t.Fatal(err)
	}

	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	_, err = h3x.Dial(dctx, srv.Addr(), h3x.WithCredentials(h3xtest.ClientID, "wrong"), h3x.WithTrustedFingerprint(srv.Fingerprint()))
	dcancel()
	if !errors.Is(err, h3x.ErrUnauthenticated) {
		t.Fatalf("dialing with a wrong token: %v, want ErrUnauthenticated", err)
	}

	// The server counts the refused connection closed after the client
	// saw the refusal: wait for it.
	waitForSample(t, url, "h3x_connections", 1)
	after := scrape(t, url)
	want := map[string]float64{
		`h3x_events_published_total{namespace="orders"}`:                   3,
		`h3x_events_duplicate_total{namespace="orders"}`:                   1,
		`h3x_events_refused_total{namespace="",reason="invalid_argument"}`: 1,
		`h3x_events_delivered_total{namespace="orders"}`:                   4,
		`h3x_events_redelivered_total{namespace="orders"}`:                 1,
		`h3x_events_acked_total{namespace="orders"}`:                       3,
		`h3x_events_nacked_total{namespace="orders"}`:                      1,
		`h3x_lease_extensions_total{namespace="orders"}`:                   1,
		`h3x_settlements_refused_total{op="ack"}`:                          1,
		`h3x_auth_failures_total{reason="unauthenticated"}`:                1,
		`h3x_connections`:                    1,
		`h3x_publish_durable_seconds_count`:  2,
		`h3x_fetch_wait_seconds_count`:       2,
		`h3x_delivery_latency_seconds_count`: 4,
	}
	for k, v := range want {
		if after[k] != v {
			t.Errorf("%s = %v, want %v", k, after[k], v)
		}
	}
	if after["h3x_connections_opened_total"] < 2 {
		t.Errorf("h3x_connections_opened_total = %v, want at least 2", after["h3x_connections_opened_total"])
	}
	if got, ok := after[`h3x_leases_expired_total{namespace="orders"}`]; !ok || got != 0 {
		t.Errorf(`h3x_leases_expired_total{namespace="orders"} = %v (present %v), want 0`, got, ok)
	}

	// A lease that expires: extended to 1ms, it ends by its deadline. The
	// queue notices on its timer (or at the next scrape's Stats), so poll.
	if _, err := c.Publish(ctx, h3x.Event{ID: "x1", Namespace: "audit"}); err != nil {
		t.Fatal(err)
	}
	var ds []*h3x.Delivery
	for range 100 {
		if ds, err = c.Fetch(ctx, 1, "audit"); err != nil || len(ds) > 0 {
			break
		}
	}
	if err != nil || len(ds) != 1 {
		t.Fatalf("fetching from audit: %d deliveries, %v", len(ds), err)
	}
	if res, err := c.Extend(ctx, time.Millisecond, ds[0]); err != nil || res[0].Status != h3x.SettleOK {
		t.Fatalf("extending to 1ms: %+v, %v", res, err)
	}
	waitForSample(t, url, `h3x_leases_expired_total{namespace="audit"}`, 1)
	final := scrape(t, url)
	for k, v := range map[string]float64{
		`h3x_lease_extensions_total{namespace="audit"}`:  1,
		`h3x_lease_extensions_total{namespace="orders"}`: 1,
		`h3x_events_acked_total{namespace="audit"}`:      0,
	} {
		if final[k] != v {
			t.Errorf("%s = %v, want %v", k, final[k], v)
		}
	}
}

// waitForSample scrapes url until the sample key has the value want, for
// at most 10 seconds.
func waitForSample(t *testing.T, url, key string, want float64) {
	t.Helper()
	var got float64
	for range 500 {
		if got = scrape(t, url)[key]; got == want {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s = %v after 10s, want %v", key, got, want)
}

type fakeStats struct {
	stats []h3x.NamespaceStats
	err   error
	asked []string
}

func (f *fakeStats) Stats(_ context.Context, namespaces ...string) ([]h3x.NamespaceStats, error) {
	f.asked = namespaces
	return f.stats, f.err
}

func TestQueueCollector(t *testing.T) {
	src := &fakeStats{stats: []h3x.NamespaceStats{
		{Namespace: "orders", Ready: 5, Leased: 2, Delayed: 1, DeadLettered: 7, Expired: 3, OldestReady: 1500 * time.Millisecond, Bytes: 640},
		{Namespace: "audit"},
	}}
	url := serveMetrics(t, h3xprom.NewQueueCollector(src, h3xprom.WithPrefix("app"), h3xprom.WithNamespaces("orders", "audit")))
	got := scrape(t, url)
	want := map[string]float64{
		`app_queue_ready{namespace="orders"}`:                5,
		`app_queue_leased{namespace="orders"}`:               2,
		`app_queue_delayed{namespace="orders"}`:              1,
		`app_queue_bytes{namespace="orders"}`:                640,
		`app_queue_oldest_ready_seconds{namespace="orders"}`: 1.5,
		`app_events_dead_lettered_total{namespace="orders"}`: 7,
		`app_leases_expired_total{namespace="orders"}`:       3,
		`app_queue_ready{namespace="audit"}`:                 0,
		`app_events_dead_lettered_total{namespace="audit"}`:  0,
		`app_leases_expired_total{namespace="audit"}`:        0,
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
	if strings.Join(src.asked, ",") != "orders,audit" {
		t.Errorf("Stats asked for %q, want orders,audit", src.asked)
	}

	// The values move with the queue.
	src.stats[0].Ready = 9
	if g := scrape(t, url)[`app_queue_ready{namespace="orders"}`]; g != 9 {
		t.Errorf("after a change, app_queue_ready = %v, want 9", g)
	}

	// A failing Stats fails only its own metrics.
	m := h3xprom.New()
	m.ConnectionOpened()
	url = serveMetrics(t, m, h3xprom.NewQueueCollector(&fakeStats{err: errors.New("disk on fire")}))
	got = scrape(t, url)
	if got["h3x_connections"] != 1 {
		t.Errorf("with a failing queue collector, h3x_connections = %v, want 1", got["h3x_connections"])
	}
	for k := range got {
		if strings.HasPrefix(k, "h3x_queue_") {
			t.Errorf("failing queue collector still reported %s", k)
		}
	}
}

// TestRefusalLabels checks that names from refused publishes cannot grow
// the label set, while rate limits keep their namespace.
func TestRefusalLabels(t *testing.T) {
	m := h3xprom.New()
	m.Refused("not-mine", h3x.CodePermissionDenied, 2)
	m.Refused("orders", h3x.CodeRateLimited, 3)
	m.Refused("orders", h3x.CodeQueueFull, 1)
	got := scrape(t, serveMetrics(t, m))
	want := map[string]float64{
		`h3x_events_refused_total{namespace="",reason="permission_denied"}`:  2,
		`h3x_events_refused_total{namespace="orders",reason="rate_limited"}`: 3,
		`h3x_events_refused_total{namespace="orders",reason="queue_full"}`:   1,
		`h3x_events_rate_limited_total{namespace="orders"}`:                  3,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	for k := range got {
		if strings.Contains(k, "not-mine") {
			t.Errorf("a denied namespace became a label: %s", k)
		}
	}
}

func BenchmarkHooks(b *testing.B) {
	m := h3xprom.New()
	ages := []time.Duration{time.Millisecond}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			m.Published("orders", 1, 0, time.Millisecond)
			m.Delivered("orders", 1, 0, time.Millisecond, ages)
			m.Fetched(1, time.Millisecond)
			m.Settled(h3x.FrameAckEvent, 1, 0)
			m.SettledIn("orders", h3x.FrameAckEvent, 1)
		}
	})
}
