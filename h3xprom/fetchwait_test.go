package h3xprom_test

import (
	"context"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xprom"
	"github.com/h3x-io/h3x/h3xtest"
)

// TestFetchWaitObservedOncePerFetch: h3x_fetch_wait_seconds is documented
// as one observation "per fetch that delivered"; a fetch whose deliveries
// spanned several namespaces used to be observed once per run of a
// namespace in the lease order (6 for one fetch over three namespaces).
func TestFetchWaitObservedOncePerFetch(t *testing.T) {
	m := h3xprom.New()
	srv := h3xtest.NewServer(t, h3xtest.WithServerOptions(h3x.WithHooks(m)))
	url := serveMetrics(t, m)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c := srv.Dial(t)
	var evs []h3x.Event
	for _, ns := range []string{"a", "b", "c"} {
		for range 2 {
			evs = append(evs, h3x.Event{Namespace: ns})
		}
	}
	if _, err := c.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
	ds, err := c.Fetch(ctx, 10, "a", "b", "c")
	if err != nil {
		t.Fatal(err)
	}
	fetches := 1
	for len(ds) < 6 {
		more, err := c.Fetch(ctx, 10, "a", "b", "c")
		if err != nil {
			t.Fatal(err)
		}
		ds = append(ds, more...)
		fetches++
	}
	got := scrape(t, url)
	if n := got["h3x_fetch_wait_seconds_count"]; n != float64(fetches) {
		t.Errorf("h3x_fetch_wait_seconds_count = %v after %d fetches that delivered", n, fetches)
	}
	if d := got[`h3x_events_delivered_total{namespace="a"}`] + got[`h3x_events_delivered_total{namespace="b"}`] + got[`h3x_events_delivered_total{namespace="c"}`]; d != 6 {
		t.Errorf("delivered %v, want 6", d)
	}
}
