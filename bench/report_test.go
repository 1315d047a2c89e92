package main

import (
	"context"
	"strings"
	"testing"
	"time"
)

func TestStatOf(t *testing.T) {
	for _, c := range []struct {
		in          []float64
		med, lo, hi float64
	}{
		{[]float64{3, 1, 2}, 2, 1, 3},
		{[]float64{4, 1, 3, 2}, 2.5, 1, 4},
		{[]float64{7}, 7, 7, 7},
	} {
		s := statOf(c.in)
		if s.med != c.med || s.lo != c.lo || s.hi != c.hi || s.n != len(c.in) {
			t.Errorf("statOf(%v) = %+v, want med %v lo %v hi %v", c.in, s, c.med, c.lo, c.hi)
		}
	}
	if s := statOf(nil); s != (stat{}) {
		t.Errorf("statOf(nil) = %+v", s)
	}
}

func TestLatencyPayload(t *testing.T) {
	b := latencyPayload(42, time.Now())
	if len(b) != eventSize {
		t.Fatalf("payload is %d bytes, want %d", len(b), eventSize)
	}
	lat, seq, ok := latencyOf(b)
	if !ok || seq != 42 || lat < 0 || lat > time.Second {
		t.Fatalf("latencyOf = %v, %d, %v", lat, seq, ok)
	}
	if _, _, ok := latencyOf(b[:10]); ok {
		t.Fatal("latencyOf accepted a short payload")
	}
}

func TestLatencyCollectorSkipsWarmUp(t *testing.T) {
	// 1,000/s: 100 ms of warm-up is 100 events, 200 ms measured 200 more.
	c := newLatencyCollector(1000, 100*time.Millisecond, 200*time.Millisecond)
	for i := range 300 {
		c.add(latencyPayload(i, time.Now()))
	}
	if got, err := c.wait(context.Background()); err != nil || len(got) != 200 {
		t.Fatalf("kept %d latencies (%v), want 200", len(got), err)
	}
}

func TestLatencyCollectorMissingSamples(t *testing.T) {
	c := newLatencyCollector(1000, 100*time.Millisecond, 200*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for i := range 299 { // one lost
		c.add(latencyPayload(i, time.Now()))
	}
	if _, err := c.wait(ctx); err == nil {
		t.Fatal("a missing sample went unnoticed")
	}
}

func TestLatencyFromSchedule(t *testing.T) {
	// An event scheduled 50 ms ago and sent only now is 50 ms late.
	lat, _, ok := latencyOf(latencyPayload(1, time.Now().Add(-50*time.Millisecond)))
	if !ok || lat < 50*time.Millisecond {
		t.Fatalf("latency %v, want at least 50 ms (from the schedule)", lat)
	}
}

func TestPace(t *testing.T) {
	start := time.Now()
	var sent []int
	n, achieved, err := pace(context.Background(), 1000, 50*time.Millisecond, func(i int, _ time.Time) error {
		sent = append(sent, i)
		return nil
	})
	if err != nil || n != 50 || len(sent) != 50 || sent[49] != 49 {
		t.Fatalf("pace sent %d (%d calls), err %v", n, len(sent), err)
	}
	if achieved < 900 || achieved > 1100 {
		t.Fatalf("pace reported %.0f events/s, want about 1,000", achieved)
	}
	if el := time.Since(start); el < 45*time.Millisecond {
		t.Fatalf("pace took %v, want about 50 ms", el)
	}
	// A sender that cannot keep up is reported at the rate it kept.
	n, achieved, err = pace(context.Background(), 1000, 50*time.Millisecond, func(int, time.Time) error {
		time.Sleep(3 * time.Millisecond)
		return nil
	})
	if err != nil || n != 50 || achieved > 400 {
		t.Fatalf("a sender at a third of the rate: %d sent, %.0f events/s reported, err %v", n, achieved, err)
	}
}

func TestTargetsUseTheirMetrics(t *testing.T) {
	// One run per system, each metric a distinct value: every target row
	// must compare the metric it names.
	r := func(pub, cons float64, p50, p99 time.Duration, rssKiB int64) runResult {
		return runResult{pubRate: pub, consRate: cons, p50: p50, p99: p99, hwmKiB: rssKiB, latAchieved: 5000}
	}
	res := &results{runs: map[key][]runResult{
		{crashSafe, "h3x"}:   {r(300e3, 90e3, 100*time.Microsecond, 700*time.Microsecond, 200<<10)},
		{crashSafe, "nats"}:  {r(100e3, 100e3, 300*time.Microsecond, 2000*time.Microsecond, 50<<10)},
		{crashSafe, "redis"}: {r(200e3, 150e3, 250*time.Microsecond, 1700*time.Microsecond, 100<<10)},
	}}
	var b strings.Builder
	writeTargets(&b, &config{classes: []class{crashSafe}}, envInfo{}, res)
	for _, want := range []string{
		"| process-crash-safe | publish ≥ 1.5× JetStream | 3.00× | yes |",
		"| process-crash-safe | publish ≥ 1.0× Redis | 1.50× | yes |",
		"| process-crash-safe | consume+ack ≥ 1.5× JetStream | 0.90× |",
		"| process-crash-safe | p50 ≤ 150 µs at 5k events/s | 100 µs | yes |",
		"| process-crash-safe | p99 ≤ 600 µs at 5k events/s | 700 µs |",
		"| process-crash-safe | peak RSS ≤ JetStream's | 4.00× |",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("targets lack %q:\n%s", want, b.String())
		}
	}
}
