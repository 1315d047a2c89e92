package h3x

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// TestTokenBucketAccuracy runs 10 s of fake time with a publisher offering
// twice the limit: the stored rate stays within ±5% of the limit.
func TestTokenBucketAccuracy(t *testing.T) {
	for _, tc := range []struct {
		rate  float64
		burst int
		step  time.Duration
	}{
		{1000, 50, time.Millisecond},
		{100, 5, 3 * time.Millisecond},
		{5000, 250, 100 * time.Microsecond},
		{7.5, 2, 10 * time.Millisecond},
	} {
		start := time.Unix(1700000000, 0)
		b := newTokenBucket(tc.rate, tc.burst, start)
		offered, stored := 0.0, 0
		var owed float64
		for now := start; now.Before(start.Add(10 * time.Second)); now = now.Add(tc.step) {
			owed += 2 * tc.rate * tc.step.Seconds()
			n := int(owed)
			owed -= float64(n)
			offered += float64(n)
			got, wait := b.take(now, n)
			if got < n && wait <= 0 {
				t.Fatalf("refused without a retry-after")
			}
			stored += got
		}
		rate := float64(stored) / 10
		if rate < 0.95*tc.rate || rate > 1.05*tc.rate {
			t.Fatalf("rate %v burst %d: stored %.1f events/s (offered %.0f/s), want within 5%%", tc.rate, tc.burst, rate, offered/10)
		}
	}
}

func TestTokenBucketNothingUnderLimitRefused(t *testing.T) {
	start := time.Unix(1700000000, 0)
	b := newTokenBucket(100, 10, start)
	// Publishing at exactly the rate is never refused.
	for i := range 1000 {
		if got, _ := b.take(start.Add(time.Duration(i)*10*time.Millisecond), 1); got != 1 {
			t.Fatalf("event %d refused at the limit", i)
		}
	}
}

func TestRateLimitEndToEnd(t *testing.T) {
	reg, err := ParseRegistry("alice:orders=alice-token,alice:audit@20:3=alice-token")
	if err != nil {
		t.Fatal(err)
	}
	srv := testServer(t, WithRegistry(reg), WithRateLimit("orders", RateLimit{Rate: 50, Burst: 5}))
	rc := rawDial(t, srv)
	rc.auth("alice", "alice-token")
	for _, tc := range []struct {
		ns      string
		allowed int
		limit   float64
	}{{"orders", 5, 50}, {"audit", 3, 20}} {
		events := make([]*h3xpb.EventPayload, 20)
		for i := range events {
			events[i] = &h3xpb.EventPayload{Namespace: tc.ns}
		}
		st := rc.stream(frameBytes(t, FrameSendEvent, &h3xpb.SendEvent{RequestId: 1, Events: events}), true)
		var res h3xpb.SendResult
		if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameSendResult, &res); err != nil {
			t.Fatal(err)
		}
		for i, o := range res.GetOutcomes() {
			wantStored := i < tc.allowed
			if got := o.GetStatus() == h3xpb.PublishStatus_PUBLISH_STATUS_STORED; got != wantStored {
				t.Fatalf("%s event %d: %v (%v)", tc.ns, i, o.GetStatus(), o.GetMessage())
			}
			if !wantStored && (ErrorCode(o.GetCode()) != CodeRateLimited || o.GetRetryAfterMs() == 0) {
				t.Fatalf("%s event %d refused with %v retry %d", tc.ns, i, ErrorCode(o.GetCode()), o.GetRetryAfterMs())
			}
		}
		// A RateLimitNotice went out on the control stream.
		var n h3xpb.RateLimitNotice
		rc.ctrl.SetReadDeadline(time.Now().Add(5 * time.Second))
		if err := newFrameReader(rc.ctrl, DefaultMaxFrameSize).readMessage(FrameRateLimitNotice, &n); err != nil {
			t.Fatal(err)
		}
		if n.GetNamespace() != tc.ns || n.GetRetryAfterMs() == 0 || n.GetLimit() != tc.limit {
			t.Fatalf("notice %v", &n)
		}
	}

	// The client honours the limit: Publish waits and succeeds.
	c := mustDial(t, srv, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	batch := make([]Event, 15)
	for i := range batch {
		batch[i] = Event{Namespace: "orders"}
	}
	start := time.Now()
	res, err := c.Publish(ctx, batch...)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if r.Status != PublishStored {
			t.Fatalf("%+v", r)
		}
	}
	if took := time.Since(start); took < 100*time.Millisecond {
		t.Fatalf("15 events at 50/s with burst 5 took only %v", took)
	}
	// Publish fails only when its ctx ends first.
	short, scancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer scancel()
	if _, err := c.Publish(short, batch...); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("rate-limited publish with a short ctx: %v", err)
	}
}

func TestMaxUnackedPerSession(t *testing.T) {
	srv := testServer(t, WithMaxUnacked(3))
	c := mustDial(t, srv, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for range 10 {
		c.Publish(ctx, Event{Namespace: "orders"})
	}
	ds, err := c.Fetch(ctx, 10, "orders")
	if err != nil || len(ds) != 3 {
		t.Fatalf("fetch: %v, %d deliveries, want 3", err, len(ds))
	}
	short, scancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer scancel()
	if _, err := c.Fetch(short, 10, "orders"); err == nil {
		t.Fatal("fetched beyond the unacked cap")
	}
	if _, err := c.Ack(ctx, ds[0]); err != nil {
		t.Fatal(err)
	}
	more, err := c.Fetch(ctx, 10, "orders")
	if err != nil || len(more) != 1 {
		t.Fatalf("after one ack: %v, %d deliveries, want 1", err, len(more))
	}
}

// TestStalledConsumerBoundsMemory: a consumer that keeps asking for events
// but never reads its stream cannot grow the server's heap without bound,
// and other clients keep their pace meanwhile.
func TestStalledConsumerBoundsMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("publishes 20 MB")
	}
	srv := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pub := mustDial(t, srv, "alice", "alice-token")
	body := []byte(strings.Repeat("x", 1024))
	for range 20 {
		batch := make([]Event, 1000)
		for i := range batch {
			batch[i] = Event{Namespace: "orders", Data: body}
		}
		if _, err := pub.Publish(ctx, batch...); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)

	// The stalled consumer: 200 fetches of 1,000 events, never read.
	rc := rawDial(t, srv)
	rc.auth("alice", "alice-token")
	st, err := rc.qc.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range 200 {
			st.SetWriteDeadline(time.Now().Add(3 * time.Second))
			if _, err := st.Write(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: uint64(i + 1), Namespaces: []string{"orders"}, Limit: 1000})); err != nil {
				return // flow control pushed back
			}
		}
	}()

	// Meanwhile another client publishes and consumes at its normal pace.
	other := mustDial(t, srv, "alice", "alice-token")
	var done atomic.Int64
	for range 500 {
		if _, err := other.Publish(ctx, Event{Namespace: "orders.dlq"}); err != nil {
			t.Fatal(err)
		}
		ds, err := other.Fetch(ctx, 1, "orders.dlq")
		if err != nil {
			t.Fatal(err)
		}
		other.Ack(ctx, ds...)
		done.Add(1)
	}
	wg.Wait()
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapInuse) - int64(base.HeapInuse)
	const bound = 48 << 20
	t.Logf("heap in use grew by %.1f MiB with a stalled consumer (bound %d MiB); the other client did %d round trips", float64(grew)/(1<<20), bound>>20, done.Load())
	if grew > bound {
		t.Fatalf("heap grew by %d bytes, more than %d", grew, bound)
	}
}

// TestQueueFullIsRetried: a namespace at its event limit refuses with
// queue-full and a retry-after; the client waits and retries like a rate
// limit, and its Publish completes once a consumer makes room.
func TestQueueFullIsRetried(t *testing.T) {
	srv := testServer(t, WithQueue(NewMemoryQueue(QueueOptions{MaxEventsPerNamespace: 2})))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := mustDial(t, srv, "alice", "alice-token")
	if _, err := c.Publish(ctx, Event{Namespace: "orders"}, Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	// The raw answer: refused with queue-full and a retry-after.
	rc := rawDial(t, srv)
	rc.auth("alice", "alice-token")
	st := rc.stream(frameBytes(t, FrameSendEvent, &h3xpb.SendEvent{RequestId: 1, Events: []*h3xpb.EventPayload{{Namespace: "orders"}}}), true)
	var res h3xpb.SendResult
	if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameSendResult, &res); err != nil {
		t.Fatal(err)
	}
	if o := res.GetOutcomes()[0]; ErrorCode(o.GetCode()) != CodeQueueFull || o.GetRetryAfterMs() == 0 {
		t.Fatalf("outcome %v", o)
	}
	// The client's Publish waits until a consumer acks.
	done := make(chan error, 1)
	go func() {
		res, err := c.Publish(ctx, Event{Namespace: "orders", Message: "third"})
		if err == nil && res[0].Status != PublishStored {
			err = fmt.Errorf("status %v", res[0].Status)
		}
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("Publish returned while the namespace was full: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	ds, err := c.Fetch(ctx, 1, "orders")
	if err != nil {
		t.Fatal(err)
	}
	c.Ack(ctx, ds...)
	if err := <-done; err != nil {
		t.Fatalf("Publish after room was made: %v", err)
	}
}

// Under a "*" limit every namespace gets a bucket; buckets full and unused
// for a minute are dropped once there are many, so namespaces that come
// and go do not accumulate, and dropping one changes nothing (a new bucket
// starts full).
func TestLimiterBucketsDoNotAccumulate(t *testing.T) {
	l := &limiters{cfg: map[string]RateLimit{"*": {Rate: 10, Burst: 5}}}
	sess := &Session{ClientID: "c"}
	t0 := time.Unix(1_700_000_000, 0)
	for i := range 3 * bucketSweepMin {
		now := t0.Add(time.Duration(i) * 50 * time.Millisecond) // 150 s in all
		if got, _, _ := l.allow(sess, fmt.Sprint("ns-", i), 1, now); got != 1 {
			t.Fatalf("namespace %d: %d of 1 allowed", i, got)
		}
	}
	// Every namespace used within the last minute keeps its bucket: 1,200
	// of them; the sweeps drop the older ones.
	if n := len(l.buckets); n > 2*bucketSweepMin {
		t.Fatalf("%d buckets kept for %d namespaces seen over 150 s", n, 3*bucketSweepMin)
	}
	// A namespace in use keeps its bucket (and its debt).
	busy := t0.Add(200 * time.Second)
	if got, _, _ := l.allow(sess, "busy", 5, busy); got != 5 {
		t.Fatalf("busy: %d of 5", got)
	}
	for i := range 2 * bucketSweepMin {
		l.allow(sess, fmt.Sprint("later-", i), 1, busy.Add(time.Duration(i)*time.Microsecond))
	}
	if got, _, _ := l.allow(sess, "busy", 5, busy.Add(10*time.Millisecond)); got != 0 {
		t.Fatalf("busy, just after emptying its bucket: %d allowed, want 0 (its bucket must survive a sweep)", got)
	}
}

// A Publish waiting out a rate limit of one namespace must not hold
// up a Publish to another namespace. Calls waiting out the limit hold the
// client's publish slots (WithPublishBuffer) while they sleep.
func TestRateLimitedNamespaceDoesNotHoldUpOthers(t *testing.T) {
	s := testServer(t, WithRateLimit("orders", RateLimit{Rate: 1, Burst: 1}))
	c := mustDial(t, s, "alice", "alice-token", WithPublishBuffer(4))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// A publisher over the limit of "orders", with PublishAsync.
	var calls []*PublishCall
	for range 8 {
		calls = append(calls, c.PublishAsync(ctx, Event{Namespace: "orders"}))
	}
	time.Sleep(300 * time.Millisecond)
	// "orders.dlq" has no limit: its publish must go through at once.
	short, scancel := context.WithTimeout(ctx, time.Second)
	defer scancel()
	start := time.Now()
	res, err := c.Publish(short, Event{Namespace: "orders.dlq"})
	if err != nil || res[0].Status != PublishStored {
		t.Fatalf("publish to an unlimited namespace after %v: %v %+v", time.Since(start), err, res)
	}
	cancel() // the rate-limited calls end
	for _, p := range calls {
		p.Result()
	}
}
