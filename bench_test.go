package h3x

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// benchQueues are the queues the end-to-end benchmarks run on.
var benchQueues = []struct {
	name string
	open func(b *testing.B) Queue
}{
	{"memory", func(b *testing.B) Queue { return NewMemoryQueue(QueueOptions{}) }},
	{"badger-nosync", func(b *testing.B) Queue {
		q, err := OpenBadgerQueue(b.TempDir(), QueueOptions{Durability: DurabilityNoSync})
		if err != nil {
			b.Fatal(err)
		}
		return q
	}},
	{"badger-fsync", func(b *testing.B) Queue {
		q, err := OpenBadgerQueue(b.TempDir(), QueueOptions{})
		if err != nil {
			b.Fatal(err)
		}
		return q
	}},
}

func benchServer(b *testing.B, q Queue, opts ...ServerOption) (*Server, *Client) {
	b.Helper()
	reg, err := ParseRegistry("bench:*=bench-token")
	if err != nil {
		b.Fatal(err)
	}
	s, err := NewServer(append([]ServerOption{WithAddr("127.0.0.1:0"), WithQueue(q), WithRegistry(reg)}, opts...)...)
	if err != nil {
		b.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	c := benchClient(b, s)
	return s, c
}

func benchClient(b *testing.B, s *Server) *Client {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, s.Addr().String(), WithCredentials("bench", "bench-token"), WithTrustedFingerprint(s.Fingerprint()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

func benchEvent(ns string, size int) Event {
	return Event{Namespace: ns, Type: "bench", Data: make([]byte, size)}
}

// publishN publishes n events of size bytes in batches, with up to inflight
// batches outstanding.
func publishN(b *testing.B, c *Client, ns string, n, batch, inflight, size int) {
	ctx := context.Background()
	calls := make(chan *PublishCall, inflight)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for call := range calls {
			if _, err := call.Result(); err != nil {
				b.Error(err)
			}
		}
	}()
	for sent := 0; sent < n; {
		k := min(batch, n-sent)
		events := make([]Event, k)
		for i := range events {
			events[i] = benchEvent(ns, size)
		}
		calls <- c.PublishAsync(ctx, events...)
		sent += k
	}
	close(calls)
	wg.Wait()
}

// BenchmarkPublish: one client publishing 256-byte events, batches of 64,
// 16 batches in flight.
func BenchmarkPublish(b *testing.B) {
	for _, bq := range benchQueues {
		b.Run(bq.name, func(b *testing.B) {
			_, c := benchServer(b, bq.open(b))
			b.ResetTimer()
			start := time.Now()
			publishN(b, c, "bench", b.N, 64, 16, 256)
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "events/s")
		})
	}
}

// BenchmarkPublishOneEventPerCall: one client publishing 256-byte events one
// per call, as applications often do: "async" keeps 1,024 PublishAsync calls
// in flight (the JetStream idiom), "sync-64" runs 64 goroutines each calling
// Publish in a loop. Their requests share SendEvent frames under load
// (client_publish_batch.go).
func BenchmarkPublishOneEventPerCall(b *testing.B) {
	for _, bq := range benchQueues {
		b.Run(bq.name+"/async", func(b *testing.B) {
			_, c := benchServer(b, bq.open(b))
			b.ResetTimer()
			start := time.Now()
			publishN(b, c, "bench", b.N, 1, 1024, 256)
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "events/s")
		})
		b.Run(bq.name+"/sync-64", func(b *testing.B) {
			_, c := benchServer(b, bq.open(b))
			const goroutines = 64
			b.ResetTimer()
			start := time.Now()
			var wg sync.WaitGroup
			for g := range goroutines {
				n := b.N / goroutines
				if g < b.N%goroutines {
					n++
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range n {
						if _, err := c.Publish(context.Background(), benchEvent("bench", 256)); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "events/s")
		})
	}
}

// BenchmarkSubscribeAck: consume and ack a backlog of 256-byte events with
// Subscribe and Delivery.Ack.
func BenchmarkSubscribeAck(b *testing.B) {
	for _, bq := range benchQueues {
		b.Run(bq.name, func(b *testing.B) {
			_, c := benchServer(b, bq.open(b))
			publishN(b, c, "bench", b.N, 256, 8, 256)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			b.ResetTimer()
			start := time.Now()
			sub, err := c.Subscribe(ctx, []string{"bench"}, SubscribeOptions{MaxUnacked: 4096, BatchSize: 512})
			if err != nil {
				b.Fatal(err)
			}
			for range b.N {
				d := <-sub.Events()
				d.Ack()
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "events/s")
			sub.Close()
		})
	}
}

// BenchmarkEndToEnd: one client publishes, fetches and acks: events/s
// through the whole pipeline.
func BenchmarkEndToEnd(b *testing.B) {
	for _, bq := range benchQueues {
		b.Run(bq.name, func(b *testing.B) {
			_, c := benchServer(b, bq.open(b))
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			sub, err := c.Subscribe(ctx, []string{"bench"}, SubscribeOptions{MaxUnacked: 4096, BatchSize: 512})
			if err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			start := time.Now()
			published := make(chan struct{})
			go func() {
				defer close(published)
				publishN(b, c, "bench", b.N, 64, 16, 256)
			}()
			for range b.N {
				d := <-sub.Events()
				d.Ack()
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "events/s")
			<-published
			sub.Close()
		})
	}
}

// latencyRun publishes at rate events/s for d and returns the
// publish-to-delivery latencies observed by a subscriber.
func latencyRun(b *testing.B, pub, sub *Client, ns string, rate int, d time.Duration) []time.Duration {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := sub.Subscribe(ctx, []string{ns}, SubscribeOptions{})
	if err != nil {
		b.Fatal(err)
	}
	n := int(float64(rate) * d.Seconds())
	lat := make([]time.Duration, 0, n)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range n {
			dl, ok := <-s.Events()
			if !ok {
				return
			}
			sent := int64(binary.LittleEndian.Uint64(dl.Event.Data))
			lat = append(lat, time.Duration(time.Now().UnixNano()-sent))
			dl.Ack()
		}
	}()
	interval := time.Second / time.Duration(rate)
	start := time.Now()
	for i := range n {
		next := start.Add(time.Duration(i) * interval)
		if w := time.Until(next); w > 0 {
			time.Sleep(w)
		}
		ev := benchEvent(ns, 256)
		binary.LittleEndian.PutUint64(ev.Data, uint64(time.Now().UnixNano()))
		pub.PublishAsync(ctx, ev)
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		b.Fatal("deliveries missing")
	}
	s.Close()
	return lat
}

func percentile(lat []time.Duration, p float64) time.Duration {
	if len(lat) == 0 {
		return 0
	}
	s := slices.Clone(lat)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

// BenchmarkLatency5k: publish→delivery latency at a fixed 5,000 events/s
// for 2 s per iteration (run with -benchtime=1x).
func BenchmarkLatency5k(b *testing.B) {
	for _, bq := range benchQueues {
		b.Run(bq.name, func(b *testing.B) {
			s, pub := benchServer(b, bq.open(b))
			sub := benchClient(b, s)
			var all []time.Duration
			for range b.N {
				all = append(all, latencyRun(b, pub, sub, "lat", 5000, 2*time.Second)...)
			}
			b.ReportMetric(float64(percentile(all, 0.50).Microseconds()), "p50-µs")
			b.ReportMetric(float64(percentile(all, 0.99).Microseconds()), "p99-µs")
		})
	}
}

// BenchmarkFairness: namespace "calm" at 1,000 events/s, alone and while
// another client floods namespace "flood" at full speed; reports calm's
// publish→delivery p99 both ways and their ratio.
func BenchmarkFairness(b *testing.B) {
	s, pub := benchServer(b, NewMemoryQueue(QueueOptions{}))
	sub := benchClient(b, s)
	flooder := benchClient(b, s)
	floodSub := benchClient(b, s)
	for range b.N {
		alone := percentile(latencyRun(b, pub, sub, "calm", 1000, 2*time.Second), 0.99)
		ctx, cancel := context.WithCancel(context.Background())
		var flooded atomic.Int64
		var wg sync.WaitGroup
		wg.Add(2)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				events := make([]Event, 64)
				for i := range events {
					events[i] = benchEvent("flood", 256)
				}
				if _, err := flooder.Publish(ctx, events...); err == nil {
					flooded.Add(64)
				}
			}
		}()
		go func() {
			defer wg.Done()
			fs, err := floodSub.Subscribe(ctx, []string{"flood"}, SubscribeOptions{MaxUnacked: 4096, BatchSize: 512})
			if err != nil {
				return
			}
			for d := range fs.Events() {
				d.Ack()
			}
		}()
		time.Sleep(200 * time.Millisecond)
		start := time.Now()
		busy := percentile(latencyRun(b, pub, sub, "calm", 1000, 2*time.Second), 0.99)
		rate := float64(flooded.Load()) / time.Since(start).Seconds()
		cancel()
		wg.Wait()
		b.ReportMetric(float64(alone.Microseconds()), "p99-alone-µs")
		b.ReportMetric(float64(busy.Microseconds()), "p99-flooded-µs")
		b.ReportMetric(float64(busy)/float64(alone), "ratio")
		b.ReportMetric(rate, "flood-events/s")
	}
}

// BenchmarkFairnessSeparateFlood is BenchmarkFairness with the flooding
// publisher and its consumer in a child process (this test binary again, in
// TestFloodHelper), as they would be in a deployment. In BenchmarkFairness
// the server and all four clients share one process that the flood
// saturates, so the calm namespace's p99 also measures that process's
// scheduling of its clients.
func BenchmarkFairnessSeparateFlood(b *testing.B) {
	s, pub := benchServer(b, NewMemoryQueue(QueueOptions{}))
	sub := benchClient(b, s)
	for range b.N {
		alone := percentile(latencyRun(b, pub, sub, "calm", 1000, 2*time.Second), 0.99)
		cmd := exec.Command(os.Args[0], "-test.run=^TestFloodHelper$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), "H3X_FLOOD_ADDR="+s.Addr().String(), "H3X_FLOOD_FINGERPRINT="+s.Fingerprint(), "H3X_FLOOD_FOR=2700ms")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		time.Sleep(400 * time.Millisecond)
		busy := percentile(latencyRun(b, pub, sub, "calm", 1000, 2*time.Second), 0.99)
		if err := cmd.Wait(); err != nil {
			b.Fatalf("flood process: %v\n%s", err, out.String())
		}
		var rate float64
		if i := strings.Index(out.String(), "flood-events/s="); i >= 0 {
			fmt.Sscan(out.String()[i+len("flood-events/s="):], &rate)
		}
		b.ReportMetric(float64(alone.Microseconds()), "p99-alone-µs")
		b.ReportMetric(float64(busy.Microseconds()), "p99-flooded-µs")
		b.ReportMetric(float64(busy)/float64(alone), "ratio")
		b.ReportMetric(rate, "flood-events/s")
	}
}

// TestFloodHelper is BenchmarkFairnessSeparateFlood's flooding process; it
// does nothing in a normal test run.
func TestFloodHelper(t *testing.T) {
	addr := os.Getenv("H3X_FLOOD_ADDR")
	if addr == "" {
		t.Skip("the flooding process of BenchmarkFairnessSeparateFlood")
	}
	d, err := time.ParseDuration(os.Getenv("H3X_FLOOD_FOR"))
	if err != nil {
		t.Fatal(err)
	}
	dial := func() *Client {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := Dial(ctx, addr, WithCredentials("bench", "bench-token"), WithTrustedFingerprint(os.Getenv("H3X_FLOOD_FINGERPRINT")))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	flooder, floodSub := dial(), dial()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	fs, err := floodSub.Subscribe(ctx, []string{"flood"}, SubscribeOptions{MaxUnacked: 4096, BatchSize: 512})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for d := range fs.Events() {
			d.Ack()
		}
	}()
	start := time.Now()
	flooded := 0
	for ctx.Err() == nil {
		events := make([]Event, 64)
		for i := range events {
			events[i] = benchEvent("flood", 256)
		}
		if _, err := flooder.Publish(ctx, events...); err == nil {
			flooded += 64
		}
	}
	wg.Wait()
	fmt.Printf("flood-events/s=%.0f\n", float64(flooded)/time.Since(start).Seconds())
}

// BenchmarkRateLimitAccuracy: a publisher offers twice the limit for 10 s
// (real time); reports the stored rate against the limit (run with
// -benchtime=1x).
func BenchmarkRateLimitAccuracy(b *testing.B) {
	const limit = 2000.0
	counter := &storedCounter{}
	_, c := benchServer(b, NewMemoryQueue(QueueOptions{}), WithRateLimit("limited", RateLimit{Rate: limit, Burst: 100}), WithHooks(counter))
	for range b.N {
		ctx, cancel := context.WithCancel(context.Background())
		counter.n.Store(0)
		start := time.Now()
		const batch = 20
		interval := time.Second / time.Duration(2*limit/batch)
		var wg sync.WaitGroup
		for i := 0; time.Since(start) < 10*time.Second; i++ {
			if w := time.Until(start.Add(time.Duration(i) * interval)); w > 0 {
				time.Sleep(w)
			}
			events := make([]Event, batch)
			for j := range events {
				events[j] = benchEvent("limited", 64)
			}
			// The client retries refused events; the offered load stays at
			// twice the limit, and the server counts what it stored.
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.Publish(ctx, events...)
			}()
		}
		rate := float64(counter.n.Load()) / time.Since(start).Seconds()
		cancel()
		wg.Wait()
		b.ReportMetric(rate, "stored-events/s")
		b.ReportMetric(100*(rate-limit)/limit, "error-%")
	}
}

type storedCounter struct {
	NopHooks
	n atomic.Int64
}

func (s *storedCounter) Published(_ string, stored, _ int, _ time.Duration) { s.n.Add(int64(stored)) }

var _ = fmt.Sprint
