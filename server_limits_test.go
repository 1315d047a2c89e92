package h3x

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// settled waits (at most limit) until progress stops changing for a second
// and returns its last value.
func settled(t *testing.T, limit time.Duration, progress func() int64) int64 {
	t.Helper()
	deadline := time.Now().Add(limit)
	last, since := progress(), time.Now()
	for time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		if v := progress(); v != last {
			last, since = v, time.Now()
		} else if time.Since(since) >= time.Second {
			return v
		}
	}
	t.Fatalf("still moving after %v (at %d)", limit, last)
	return 0
}

func heapInUse() int64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// A client that pipelines maximum-size requests and never reads the answers
// makes the server hold the answers (bounded by the lanes' depth), not the
// requests: each served request is dropped while its answer waits.
func TestServerUnreadAnswersHoldNoRequests(t *testing.T) {
	const frame = 256 << 10
	s := testServer(t, WithMaxFrameSize(frame))
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	before := heapInUse()

	// Answers that fill the server's write buffer: each SendEvent's 1,000
	// events are refused ("secret" is not granted), 1,000 outcomes each.
	refused := make([]*h3xpb.EventPayload, 1000)
	for i := range refused {
		refused[i] = &h3xpb.EventPayload{Namespace: "secret"}
	}
	small := frameBytes(t, FrameSendEvent, &h3xpb.SendEvent{RequestId: 1, Events: refused})
	big := frameBytes(t, FrameSendEvent, &h3xpb.SendEvent{RequestId: 2, Events: []*h3xpb.EventPayload{
		{Namespace: "secret", Data: []byte(strings.Repeat("x", frame-256))}}})
	const streams = 2
	var frames, written atomic.Int64
	var wg sync.WaitGroup
	for range streams {
		st, err := rc.qc.OpenStreamSync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			for range 60 {
				if _, err := st.Write(small); err != nil {
					return
				}
				frames.Add(1)
			}
			for range 600 { // more than laneDepth: the writes stall long before
				if _, err := st.Write(big); err != nil {
					return
				}
				frames.Add(1)
				written.Add(1)
			}
		})
	}
	for deadline := time.Now().Add(30 * time.Second); written.Load() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no large request written in 30 s")
		}
	}
	settled(t, 60*time.Second, frames.Load)
	n := written.Load()
	grew := heapInUse() - before
	t.Logf("%d maximum-size requests written on %d streams whose answers are not read; heap +%d MiB", n, streams, grew>>20)
	if n < 50 {
		t.Fatalf("only %d large requests were read: the test did not fill the lanes", n)
	}
	if grew > 48<<20 { // 2 streams × 256 requests × 256 KiB = 128 MiB if they were kept
		t.Fatalf("the server holds %d MiB for %d streams that are not read (%d requests)", grew>>20, streams, n)
	}
	rc.close()
	wg.Wait()
}

// gatedQueue holds every Enqueue until open is closed, and records the most
// Enqueue calls waiting at once.
type gatedQueue struct {
	Queue
	open           chan struct{}
	mu             sync.Mutex
	waiting, most  int64
	enqueuedEvents atomic.Int64
}

func (g *gatedQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	g.mu.Lock()
	g.waiting++
	g.most = max(g.most, g.waiting)
	g.mu.Unlock()
	<-g.open
	g.mu.Lock()
	g.waiting--
	g.mu.Unlock()
	g.enqueuedEvents.Add(int64(len(events)))
	return g.Queue.Enqueue(ctx, events)
}

func (g *gatedQueue) peak() int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.most
}

// Requests read and not yet served are bounded in bytes per connection
// (requestBudget), across its streams: with 4 MiB frames, at most 4 wait on
// a queue that does not take them, whatever the streams and lanes allow.
func TestServerRequestBudget(t *testing.T) {
	const frame = 4 << 20
	gq := &gatedQueue{Queue: NewMemoryQueue(QueueOptions{}), open: make(chan struct{})}
	s := testServer(t, WithQueue(gq), WithMaxFrameSize(frame))
	open := sync.OnceFunc(func() { close(gq.open) })
	t.Cleanup(open) // before the server's Close, also when the test fails
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	req := frameBytes(t, FrameSendEvent, &h3xpb.SendEvent{RequestId: 1, Events: []*h3xpb.EventPayload{
		{Namespace: "orders", Data: []byte(strings.Repeat("x", frame-4096))}}})
	const streams, perStream = 3, 3
	var wg sync.WaitGroup
	answers := make(chan error, streams)
	for range streams {
		st, err := rc.qc.OpenStreamSync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			for range perStream {
				if _, err := st.Write(req); err != nil {
					answers <- err
					return
				}
			}
			st.Close()
			fr := newFrameReader(st, frame)
			for range perStream {
				var res h3xpb.SendResult
				st.SetReadDeadline(time.Now().Add(30 * time.Second))
				if err := fr.readMessage(FrameSendResult, &res); err != nil {
					answers <- err
					return
				}
				if got := res.GetOutcomes()[0].GetStatus(); got != h3xpb.PublishStatus_PUBLISH_STATUS_STORED {
					answers <- newError(CodeInternal, "outcome %v", got)
					return
				}
			}
			answers <- nil
		})
	}
	for deadline := time.Now().Add(30 * time.Second); gq.peak() == 0; time.Sleep(10 * time.Millisecond) {
		select {
		case err := <-answers:
			t.Fatalf("a stream ended before any request reached the queue: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no request reached the queue in 30 s")
		}
	}
	peak := settled(t, 30*time.Second, gq.peak)
	// The budget is 4 frames of the maximum size (16 MiB) here.
	if peak > 4 {
		t.Fatalf("%d requests of %d bytes waited on the queue at once; the connection's budget (16 MiB) allows 4", peak, frame)
	}
	open()
	wg.Wait()
	for range streams {
		if err := <-answers; err != nil {
			t.Fatal(err)
		}
	}
	if got := gq.enqueuedEvents.Load(); got != streams*perStream {
		t.Fatalf("%d events enqueued, want %d", got, streams*perStream)
	}
	t.Logf("at most %d requests of %d MiB waited on the queue at once", peak, frame>>20)
}

// An event that fits a SendEvent but would not fit an EventsBatch (with the
// ID and time the queue assigns, the delivery's fields, and what
// dead-lettering adds) is refused at publish; the largest event accepted
// can be delivered and, dead-lettered with the longest nack reason,
// delivered again from the dead-letter namespace.
func TestServerRefusesUndeliverableEvents(t *testing.T) {
	const frame = 64 << 10
	s := testServer(t, WithMaxFrameSize(frame), WithQueue(NewMemoryQueue(QueueOptions{MaxAttempts: 1})))
	c := mustDial(t, s, "alice", "alice-token", WithMaxFrameSize(frame))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	publish := func(ns string, size int) PublishResult {
		t.Helper()
		res, err := c.Publish(ctx, Event{Namespace: ns, Data: make([]byte, size)})
		if err != nil {
			t.Fatal(err)
		}
		return res[0]
	}
	if r := publish("audit", frame-200); r.Status != PublishRefused || !errors.Is(r.Err, ErrInvalidArgument) {
		t.Fatalf("an event filling the frame: %v %v, want refused as invalid", r.Status, r.Err)
	}
	// The largest accepted size, by bisection (each stored probe is
	// fetched and acked again).
	lo, hi := 0, frame
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		if publish("orders", mid).Status != PublishStored {
			hi = mid
			continue
		}
		lo = mid
		got, err := c.Fetch(ctx, 1, "orders")
		if err != nil || len(got) != 1 {
			t.Fatalf("fetching a probe of %d bytes: %v %v", mid, got, err)
		}
		if _, err := c.Ack(ctx, got[0]); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("largest event accepted: %d bytes of data in a %d-byte frame", lo, frame)
	if lo < frame-4096 {
		t.Fatalf("only %d bytes of data accepted in a %d-byte frame", lo, frame)
	}
	if r := publish("orders", lo); r.Status != PublishStored {
		t.Fatalf("publish: %v %v", r.Status, r.Err)
	}
	got, err := c.Fetch(ctx, 1, "orders")
	if err != nil || len(got) != 1 {
		t.Fatalf("fetching the largest event: %v %v", got, err)
	}
	reason := strings.Repeat("é", maxNackReason) // truncated to maxNackReason bytes
	if _, err := c.Nack(ctx, 0, reason, got[0]); err != nil {
		t.Fatal(err)
	}
	dl, err := c.Fetch(ctx, 1, "orders"+DeadLetterSuffix)
	if err != nil || len(dl) != 1 {
		t.Fatalf("fetching the dead-lettered event: %v %v", dl, err)
	}
	if len(dl[0].Event.Data) != lo || dl[0].Event.Metadata[MetaDeadLetterReason] == "" {
		t.Fatalf("dead-lettered event: %d bytes, metadata %v", len(dl[0].Event.Data), dl[0].Event.Metadata)
	}
}

// Shutdown keeps to its context when clients do not read their control
// streams (each GoAway write waits for flow control): it sends GoAway to
// every connection at once and returns ctx's error once ctx ends.
func TestShutdownBoundedByContext(t *testing.T) {
	s := testServer(t)
	const conns = 3
	for range conns {
		rc := rawDial(t, s)
		rc.auth("alice", "alice-token")
		ping := frameBytes(t, FramePing, &h3xpb.Ping{Sequence: 1, SentUnixNano: time.Now().UnixNano()})
		var b []byte
		for len(b) < 1<<20 {
			b = append(b, ping...)
		}
		go rc.ctrl.Write(b) // Pings whose Pongs are never read
	}
	// Wait until every connection's control stream is full: a Pong write
	// blocked on flow control holds the stream's write lock (for at most
	// its 5 s deadline).
	blocked := func() bool {
		for _, c := range s.connList() {
			if c.ctrlMu.TryLock() {
				c.ctrlMu.Unlock()
				return false
			}
		}
		return true
	}
	for deadline, held := time.Now().Add(30*time.Second), 0; held < 40; time.Sleep(5 * time.Millisecond) {
		// Held through 40 samples (200 ms): not a Pong simply being written.
		if len(s.connList()) == conns && blocked() {
			held++
		} else {
			held = 0
		}
		if time.Now().After(deadline) {
			t.Fatal("the control streams did not fill in 30 s")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := s.Shutdown(ctx)
	took := time.Since(start)
	t.Logf("Shutdown returned %v after %v", err, took.Round(time.Millisecond))
	if took > 2*time.Second {
		t.Fatalf("Shutdown with a 500 ms context took %v", took)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v, want the context's error", err)
	}
}

// WithMaxUnacked bounds a connection's unsettled deliveries across its
// streams: long polls parked on several streams reserve room before they
// lease, so together they never take more than the cap.
func TestMaxUnackedAcrossStreams(t *testing.T) {
	const maxUnacked = 5
	s := testServer(t, WithMaxUnacked(maxUnacked), WithFetchLinger(200*time.Millisecond))
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	const streams = 4
	var sts []*quic.Stream
	for range streams {
		st := rc.stream(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 1, Namespaces: []string{"orders"}, Limit: maxUnacked, MaxWaitMs: 3000}), false)
		st.SetReadDeadline(time.Now().Add(15 * time.Second))
		sts = append(sts, st)
	}
	time.Sleep(200 * time.Millisecond) // the polls park
	pub := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for range 20 {
		if _, err := pub.Publish(ctx, Event{Namespace: "orders"}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond) // spread over the lingering polls
	}
	total := 0
	for _, st := range sts {
		var b h3xpb.EventsBatch
		if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameEventsBatch, &b); err != nil {
			t.Fatal(err)
		}
		total += len(b.GetEvents())
	}
	if total > maxUnacked {
		t.Fatalf("one connection with WithMaxUnacked(%d) got %d unsettled deliveries", maxUnacked, total)
	}
	if total == 0 {
		t.Fatal("no delivery at all")
	}
}

// An extended lease keeps its place under WithMaxUnacked until its new
// deadline: fetch, extend and wait past the original deadline does not
// let a connection hold more live leases than the cap.
func TestMaxUnackedCountsExtendedLeases(t *testing.T) {
	const maxUnacked = 5
	s := testServer(t, WithMaxUnacked(maxUnacked), WithAckDeadline(500*time.Millisecond))
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	evs := make([]Event, 20)
	for i := range evs {
		evs[i] = Event{Namespace: "orders"}
	}
	if _, err := c.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		fctx, fcancel := context.WithTimeout(ctx, time.Second)
		ds, _ := c.Fetch(fctx, maxUnacked, "orders")
		fcancel()
		if len(ds) > 0 {
			if _, err := c.Extend(ctx, time.Minute, ds...); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(700 * time.Millisecond) // past the original deadline
	}
	st, err := s.queue.Stats(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if st[0].Leased > maxUnacked {
		t.Fatalf("one connection with WithMaxUnacked(%d) holds %d live leases", maxUnacked, st[0].Leased)
	}
}

// A fetch that lingers for a fuller batch keeps its byte budget, and
// its EventsBatch never exceeds the maximum frame size. The linger used to
// lease each extra round with the whole budget again.
func TestFetchLingerKeepsByteBudget(t *testing.T) {
	const frame = 64 << 10
	s := testServer(t, WithMaxFrameSize(frame), WithFetchLinger(time.Second))
	pub := mustDial(t, s, "alice", "alice-token", WithMaxFrameSize(frame))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	big := func() Event { return Event{Namespace: "orders", Data: []byte(strings.Repeat("x", 60<<10))} }
	if res, err := pub.Publish(ctx, big()); err != nil || res[0].Status != PublishStored {
		t.Fatalf("publish: %v %+v", err, res)
	}
	rc := rawDial(t, s)
	defer rc.close()
	rc.auth("alice", "alice-token")
	// Budget: half the frame (32 KiB); the first event alone is over it,
	// which is allowed (at least one event), but nothing more may join it.
	st := rc.stream(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 1, Namespaces: []string{"orders"}, Limit: 10}), false)
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	time.Sleep(200 * time.Millisecond) // the fetch has leased the first event and lingers
	if _, err := pub.Publish(ctx, big(), big()); err != nil {
		t.Fatal(err)
	}
	typ, payload, err := newFrameReader(st, 1<<30).next()
	if err != nil {
		t.Fatal(err)
	}
	if len(payload) > frame {
		t.Fatalf("%v of %d bytes, over the maximum frame size of %d", typ, len(payload), frame)
	}
	var b h3xpb.EventsBatch
	if err := unmarshalPayload(typ, payload, &b); err != nil {
		t.Fatal(err)
	}
	if len(b.GetEvents()) != 1 {
		t.Fatalf("batch of %d events of 60 KiB for a budget of %d bytes", len(b.GetEvents()), frame/2)
	}
}

// TestMaxUnackedPerSubscription: the server caps each subscription's
// unsettled deliveries, so a subscription that holds its deliveries (here
// one that asks for more than the server allows) cannot take the
// connection's whole cap and starve the connection's other subscriptions.
func TestMaxUnackedPerSubscription(t *testing.T) {
	s := testServer(t, WithMaxUnacked(8), WithMaxUnackedPerSubscription(4))
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for range 10 {
		if _, err := c.Publish(ctx, Event{Namespace: "orders"}); err != nil {
			t.Fatal(err)
		}
	}
	a, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 100})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	var held []*Delivery
	for range 4 { // held, not acked: a slow handler
		select {
		case d := <-a.Events():
			held = append(held, d)
		case <-ctx.Done():
			t.Fatal("subscription A got fewer than 4 deliveries")
		}
	}
	select {
	case d := <-a.Events():
		t.Fatalf("subscription A got a 5th delivery (%s) over its cap of 4", d.Event.ID)
	case <-time.After(300 * time.Millisecond):
	}
	b, err := c.Subscribe(ctx, []string{"orders.dlq"}, SubscribeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if _, err := c.Publish(ctx, Event{Namespace: "orders.dlq"}); err != nil {
		t.Fatal(err)
	}
	select {
	case d := <-b.Events():
		d.Ack()
	case <-time.After(5 * time.Second):
		t.Fatal("subscription B got nothing: subscription A's deliveries took the connection's cap")
	}
	// A settlement frees room for A again.
	if _, err := c.Ack(ctx, held[0]); err != nil {
		t.Fatal(err)
	}
	select {
	case <-a.Events():
	case <-time.After(5 * time.Second):
		t.Fatal("subscription A got nothing after one of its deliveries was acked")
	}
}

// TestNegativeLimitsRefused: NewServer refuses negative caps with a clear
// error instead of treating them as "no cap".
func TestNegativeLimitsRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		opt  ServerOption
	}{
		{"WithMaxUnacked", WithMaxUnacked(-1)},
		{"WithMaxUnackedPerSubscription", WithMaxUnackedPerSubscription(-1)},
		{"WithFetchLinger", WithFetchLinger(-time.Second)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := NewServer(WithAddr("127.0.0.1:0"), tc.opt)
			if err == nil {
				s.Close()
				t.Fatalf("NewServer accepted %s with a negative value", tc.name)
			}
			if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), tc.name) {
				t.Errorf("NewServer: %v; want ErrInvalidArgument naming %s", err, tc.name)
			}
		})
	}
}

// A lease that expires and is delivered again to the same connection, on
// another stream, moves its place under WithMaxUnackedPerSubscription to
// that stream: once it is acked there, the first stream has its whole cap
// again.
func TestPerSubscriptionCountFollowsRedelivery(t *testing.T) {
	s := testServer(t, WithMaxUnackedPerSubscription(2), WithAckDeadline(300*time.Millisecond))
	pub := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := pub.Publish(ctx, Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	fetch := func(id uint64, limit uint32) *h3xpb.FetchEvents {
		return &h3xpb.FetchEvents{RequestId: id, Namespaces: []string{"orders"}, Limit: limit, MaxWaitMs: 0}
	}
	read := func(r *frameReader) *h3xpb.EventsBatch {
		t.Helper()
		var b h3xpb.EventsBatch
		if err := r.readMessage(FrameEventsBatch, &b); err != nil {
			t.Fatal(err)
		}
		return &b
	}
	s1 := rc.stream(frameBytes(t, FrameFetchEvents, fetch(1, 2)), false)
	r1 := newFrameReader(s1, DefaultMaxFrameSize)
	if b := read(r1); len(b.GetEvents()) != 1 {
		t.Fatalf("first fetch: %d events", len(b.GetEvents()))
	}
	time.Sleep(500 * time.Millisecond) // the lease expires, unsettled
	s2 := rc.stream(frameBytes(t, FrameFetchEvents, fetch(1, 2)), false)
	b := read(newFrameReader(s2, DefaultMaxFrameSize))
	if len(b.GetEvents()) != 1 || b.GetEvents()[0].GetAttempt() != 2 {
		t.Fatalf("second fetch: %v", b.GetEvents())
	}
	d := b.GetEvents()[0]
	typ, _, err := rc.request(frameBytes(t, FrameAckEvent, &h3xpb.AckEvent{RequestId: 2, EventIds: []string{d.GetEvent().GetId()},
		Attempts: []uint32{d.GetAttempt()}, Namespaces: []string{"orders"}}), DefaultMaxFrameSize)
	if err != nil || typ != FrameAckResult {
		t.Fatalf("ack: %v %v", typ, err)
	}
	if _, err := pub.Publish(ctx, Event{Namespace: "orders"}, Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	// s1 holds nothing unsettled now: its cap of 2 is free.
	s1.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := s1.Write(frameBytes(t, FrameFetchEvents, fetch(2, 2))); err != nil {
		t.Fatal(err)
	}
	if b := read(r1); len(b.GetEvents()) != 2 {
		t.Fatalf("stream 1 holds nothing unsettled, yet its fetch of 2 got %d events", len(b.GetEvents()))
	}
}

// Deliveries whose lease expired unsettled no longer count under
// WithMaxUnackedPerSubscription: the stream that held them may fetch
// again (and gets them again).
func TestPerSubscriptionExpiredLeasesFreeTheStream(t *testing.T) {
	s := testServer(t, WithMaxUnackedPerSubscription(2), WithAckDeadline(300*time.Millisecond))
	pub := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := pub.Publish(ctx, Event{Namespace: "orders"}, Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	st := rc.stream(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 1, Namespaces: []string{"orders"}, Limit: 2}), false)
	r := newFrameReader(st, DefaultMaxFrameSize)
	var b h3xpb.EventsBatch
	if err := r.readMessage(FrameEventsBatch, &b); err != nil || len(b.GetEvents()) != 2 {
		t.Fatalf("first fetch: %d events, %v", len(b.GetEvents()), err)
	}
	time.Sleep(500 * time.Millisecond) // both leases expire, unsettled
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := st.Write(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 2, Namespaces: []string{"orders"}, Limit: 2, MaxWaitMs: 1500})); err != nil {
		t.Fatal(err)
	}
	b.Reset()
	if err := r.readMessage(FrameEventsBatch, &b); err != nil {
		t.Fatal(err)
	}
	if len(b.GetEvents()) != 2 {
		t.Fatalf("after the leases expired, the stream's fetch got %d events, want the 2 again", len(b.GetEvents()))
	}
}

// A client that pipelines AckEvents of many short ids and does not read the
// answers: each 3-byte id of a request becomes a SettleOutcome of about 100
// bytes in memory, and the server used to hold every AckResult it computed
// (up to laneDepth per stream), 348 MiB for 14 MiB sent (RELIABILITY.md
// finding 96). The answers' memory now counts in the connection's request
// budget until they are written. (TestServerUnreadAnswersHoldNoRequests
// bounds the same situation for SendEvents.)
func TestServerUnreadAckResultsAreBounded(t *testing.T) {
	s := testServer(t)
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	before := heapInUse()
	ids := make([]string, 80000) // an AckResult that just fits a 1 MiB frame
	for i := range ids {
		ids[i] = "x"
	}
	req := frameBytes(t, FrameAckEvent, &h3xpb.AckEvent{RequestId: 1, EventIds: ids})
	st, err := rc.qc.OpenStreamSync(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	const requests = 64
	var sent atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		st.SetWriteDeadline(time.Now().Add(60 * time.Second))
		for range requests {
			if _, err := st.Write(req); err != nil {
				return
			}
			sent.Add(int64(len(req)))
		}
	}()
	settled(t, 90*time.Second, sent.Load)
	grew := heapInUse() - before
	t.Logf("sent %d MiB of AckEvents on one stream, answers unread; server heap +%d MiB", sent.Load()>>20, grew>>20)
	if grew > 128<<20 {
		t.Fatalf("one unread stream pins %d MiB of answers for %d MiB of requests", grew>>20, sent.Load()>>20)
	}
	rc.close()
	<-done
}

// WithMaxUnacked must bound the deliveries a connection holds unsettled
// (PROTOCOL.md §8), whatever the events' ids. Ids need not be unique once
// deduplication is off (dedup_window_ms 0) or its window has passed (a
// dead-lettered event replayed, say): the server used to key its count by
// event id, so deliveries sharing an id counted once (RELIABILITY.md
// finding 102).
func TestMaxUnackedCountsDeliveriesSharingAnID(t *testing.T) {
	const maxUnacked = 2
	s := testServer(t, WithQueue(NewMemoryQueue(QueueOptions{DedupWindow: -1})), WithMaxUnacked(maxUnacked), WithMaxUnackedPerSubscription(0))
	pub := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	evs := make([]Event, 8)
	for i := range evs {
		evs[i] = Event{ID: "same-id", Namespace: "orders"}
	}
	res, err := pub.Publish(ctx, evs...)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if r.Status != PublishStored {
			t.Fatalf("publish: %+v", res)
		}
	}
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	st := rc.stream(nil, false)
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	r := newFrameReader(st, DefaultMaxFrameSize)
	total := 0
	for i := range 4 {
		if _, err := st.Write(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: uint64(i + 1), Namespaces: []string{"orders"}, Limit: 10})); err != nil {
			t.Fatal(err)
		}
		var b h3xpb.EventsBatch
		if err := r.readMessage(FrameEventsBatch, &b); err != nil {
			t.Fatal(err)
		}
		total += len(b.GetEvents())
	}
	stats, err := s.queue.Stats(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if total > maxUnacked || stats[0].Leased > maxUnacked {
		t.Fatalf("WithMaxUnacked(%d): one connection, settling nothing, got %d deliveries (%d live leases)", maxUnacked, total, stats[0].Leased)
	}
}

// §5.2: a client "can pipeline fetches on one stream", and settling "never
// queues behind a long poll": AckResults may overtake a long-polling
// EventsBatch. With five long polls pipelined on a stream, an AckEvent sent
// after them used not to be read until the first poll had ended
// (RELIABILITY.md finding 103).
func TestAckOvertakesPipelinedLongPolls(t *testing.T) {
	s := testServer(t)
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	var b []byte
	for i := range 5 {
		b = append(b, frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: uint64(i + 1), Namespaces: []string{"orders"}, MaxWaitMs: 3000})...)
	}
	st := rc.stream(b, false)
	time.Sleep(100 * time.Millisecond) // the polls park
	start := time.Now()
	if _, err := st.Write(frameBytes(t, FrameAckEvent, &h3xpb.AckEvent{RequestId: 99, EventIds: []string{"no-such-event"}, Namespaces: []string{"orders"}})); err != nil {
		t.Fatal(err)
	}
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	fr := newFrameReader(st, DefaultMaxFrameSize)
	for range 10 {
		ft, _, err := fr.next()
		if err != nil {
			t.Fatal(err)
		}
		if ft == FrameAckResult {
			break
		}
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("the AckResult came %v after the AckEvent: it waited behind a long poll", took.Round(time.Millisecond))
	}
	st.CancelRead(0)
	st.CancelWrite(0)
}

// §8: "A sender MUST NOT send a larger frame [than the maximum frame size];
// the server never sends one." Events stored under a larger frame size (a
// restart with a lower WithMaxFrameSize, same data directory) are delivered
// were delivered in an EventsBatch over the announced limit: the client,
// which reads frames up to the announced size, could never receive the
// event, and every fetch of the namespace broke its stream on it
// (RELIABILITY.md finding 105). Such an event is now set aside (nacked with
// a delay, dead-lettered after MaxAttempts) and the namespace goes on.
func TestBatchNeverExceedsFrameSizeAfterRestart(t *testing.T) {
	dir := t.TempDir()
	reg, err := ParseRegistry("alice:orders=alice-token")
	if err != nil {
		t.Fatal(err)
	}
	start := func(opts ...ServerOption) *Server {
		s, err := NewServer(append([]ServerOption{WithAddr("127.0.0.1:0"), WithDataDir(dir), WithRegistry(reg)}, opts...)...)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		return s
	}
	s1 := start()
	pub := mustDial(t, s1, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := pub.Publish(ctx, Event{Namespace: "orders", Data: make([]byte, 200<<10)}, Event{ID: "small", Namespace: "orders"})
	if err != nil || res[0].Status != PublishStored || res[1].Status != PublishStored {
		t.Fatalf("publish: %v %+v", err, res)
	}
	pub.Close()
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	const frame = 64 << 10
	s2 := start(WithMaxFrameSize(frame))
	defer s2.Close()
	rc := rawDial(t, s2)
	rc.auth("alice", "alice-token")
	st := rc.stream(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 1, Namespaces: []string{"orders"}, Limit: 1, MaxWaitMs: 2000}), false)
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	ft, payload, err := newFrameReader(st, 1<<30).next()
	if err != nil {
		t.Fatal(err)
	}
	if len(payload) > frame {
		t.Fatalf("server sent a %v of %d bytes; it announced max_frame_size %d", ft, len(payload), frame)
	}
	var b h3xpb.EventsBatch
	if err := unmarshalPayload(ft, payload, &b); err != nil {
		t.Fatalf("%v: %v", ft, err)
	}
	if len(b.GetEvents()) != 1 || b.GetEvents()[0].GetEvent().GetId() != "small" {
		t.Fatalf("got %d deliveries (%v); want the event published after the one too large", len(b.GetEvents()), b.GetEvents())
	}
	stats, err := s2.queue.Stats(ctx, "orders")
	if err != nil || stats[0].Delayed != 1 {
		t.Fatalf("stats %+v, %v: want the event too large set aside (delayed)", stats, err)
	}
	rc.close()
}

// Three AckEvents of many short ids, sent at once on three streams of one
// connection. Finding 96's fix first took each request's answer estimate
// (answerCost) after the request's bytes: once the requests held their
// bytes, no estimate could ever be granted (each needed the others' request
// bytes, released only when they were computed, which waited for their
// estimates), and the streams, every later request of the connection and
// Shutdown hung (RELIABILITY.md finding 111). Both are now taken at once.
func TestConcurrentCostlyRequestsDoNotDeadlockTheBudget(t *testing.T) {
	s := testServer(t)
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	ids := make([]string, 300000) // ~900 KB: under the 1 MiB frame
	for i := range ids {
		ids[i] = "x"
	}
	const streams = 3
	reqs := make([][]byte, streams)
	for i := range reqs {
		reqs[i] = frameBytes(t, FrameAckEvent, &h3xpb.AckEvent{RequestId: uint64(i + 1), EventIds: ids})
	}
	answered := make(chan int, streams)
	for i := range streams {
		st, err := rc.qc.OpenStreamSync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			st.SetWriteDeadline(time.Now().Add(20 * time.Second))
			st.Write(reqs[i])
			st.SetReadDeadline(time.Now().Add(20 * time.Second))
			_, _, err := newFrameReader(st, 64<<20).next()
			if err == nil {
				answered <- i
			} else {
				answered <- -1
			}
		}()
	}
	got := 0
	timeout := time.After(10 * time.Second)
	for range streams {
		select {
		case i := <-answered:
			if i >= 0 {
				got++
			}
		case <-timeout:
			sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			serr := s.Shutdown(sctx)
			cancel()
			rc.close()
			t.Fatalf("%d of %d streams answered in 10 s: the request budget is deadlocked (then Shutdown(3 s): %v)", got, streams, serr)
		}
	}
	if got != streams {
		t.Fatalf("%d of %d streams answered", got, streams)
	}
}

// answerCost reads the list of each settling and publishing request from
// its encoding: one outcome per id or event.
func TestAnswerCostCountsEveryOutcome(t *testing.T) {
	ids := []string{"x", "yy", "zzz"}
	tests := []struct {
		t    FrameType
		m    proto.Message
		want int64
	}{
		{FrameAckEvent, &h3xpb.AckEvent{RequestId: 7, EventIds: ids, Attempts: []uint32{1, 2, 3}, Namespaces: []string{"a", "b", "c"}}, 3*112 + 6},
		{FrameNackEvent, &h3xpb.NackEvent{RequestId: 7, EventIds: ids, Reason: "r", DelayMs: 5}, 3*112 + 6},
		{FrameExtendLease, &h3xpb.ExtendLease{RequestId: 7, EventIds: ids, Namespaces: []string{"a", "b", "c"}}, 3*112 + 6},
		{FrameSendEvent, &h3xpb.SendEvent{RequestId: 7, Events: []*h3xpb.EventPayload{{Namespace: "n"}, {Id: strings.Repeat("i", 40), Namespace: "n"}}}, 2*112 + 36 + 45},
		{FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 7, Namespaces: []string{"a"}, Limit: 10}, 0},
	}
	for _, tc := range tests {
		b, err := proto.Marshal(tc.m)
		if err != nil {
			t.Fatal(err)
		}
		if got := answerCost(tc.t, b); got != tc.want {
			t.Errorf("%v: answerCost %d, want %d", tc.t, got, tc.want)
		}
	}
}

// An event whose id is not its first field (protobuf allows any order) is
// counted with the longest id it can hold, not the 36 bytes of an assigned
// UUID: the estimate stays an upper bound.
func TestAnswerCostOfAnIDWrittenLast(t *testing.T) {
	var ev []byte
	ev = protowire.AppendTag(ev, 2, protowire.BytesType) // namespace first
	ev = protowire.AppendString(ev, "n")
	ev = protowire.AppendTag(ev, 1, protowire.BytesType) // then the id
	ev = protowire.AppendString(ev, strings.Repeat("i", 100))
	var b []byte
	b = protowire.AppendTag(b, 2, protowire.BytesType) // SendEvent.events
	b = protowire.AppendBytes(b, ev)
	if got, want := answerCost(FrameSendEvent, b), int64(112+len(ev)); got != want {
		t.Errorf("answerCost %d, want %d (the id may be as long as the event's encoding)", got, want)
	}
}

// corruptingQueue hands out the event with ID "bad" with a Message that is
// not valid UTF-8, as a custom Queue that does not check its input may.
type corruptingQueue struct{ Queue }

func (q corruptingQueue) Lease(ctx context.Context, req LeaseRequest) ([]Lease, error) {
	ls, err := q.Queue.Lease(ctx, req)
	for i := range ls {
		if ls[i].Event.ID == "bad" {
			ls[i].Event.Message = "not UTF-8: \xff"
		}
	}
	return ls, err
}

// An event a custom Queue hands out with a text field that is not valid
// UTF-8 cannot be encoded in an EventsBatch. The server gave the batch back
// unseen and left the fetch unanswered, so every fetch of the namespace
// stalled on it for good (RELIABILITY.md finding 115). Such an event is now
// set aside like one too large to deliver, and the fetch gets the others.
func TestUnencodableLeaseIsSetAside(t *testing.T) {
	q := NewMemoryQueue(QueueOptions{})
	s := testServer(t, WithQueue(corruptingQueue{q}))
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, Event{ID: "bad", Namespace: "orders"}, Event{ID: "good", Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	fctx, fcancel := context.WithTimeout(ctx, 4*time.Second)
	defer fcancel()
	ds, err := c.Fetch(fctx, 10, "orders")
	if err != nil {
		t.Fatalf("fetch: %v", err)
	}
	if len(ds) != 1 || ds[0].Event.ID != "good" {
		t.Fatalf("fetched %d deliveries %v, want the good event only", len(ds), ds)
	}
	stats, err := q.Stats(ctx, "orders")
	if err != nil || len(stats) != 1 || stats[0].Delayed != 1 {
		t.Fatalf("stats %+v, %v: want the unencodable event set aside (delayed)", stats, err)
	}
}

// A batch that cannot be encoded although the queue is trusted to refuse
// text that is not UTF-8 (an event stored by an older version): the event
// is set aside with a counted nack, the others are given back unseen, and
// the fetch is answered (RELIABILITY.md finding 128).
func TestUnencodableBatchIsAnsweredAndSetAside(t *testing.T) {
	reg, err := ParseRegistry("alice:orders=alice-token")
	if err != nil {
		t.Fatal(err)
	}
	q := NewMemoryQueue(QueueOptions{})
	s, err := NewServer(WithAddr("127.0.0.1:0"), WithQueue(corruptingQueue{q}), WithRegistry(reg))
	if err != nil {
		t.Fatal(err)
	}
	s.checksUTF8 = true // as if the queue were built in: no check before encoding
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, Event{ID: "bad", Namespace: "orders"}, Event{ID: "good", Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	fctx, fcancel := context.WithTimeout(ctx, 4*time.Second)
	defer fcancel()
	if _, err := c.Fetch(fctx, 10, "orders"); !errors.Is(err, ErrInternal) {
		t.Fatalf("fetch of a batch that cannot be encoded: %v, want ErrInternal at once", err)
	}
	stats, err := q.Stats(ctx, "orders")
	if err != nil || len(stats) != 1 || stats[0].Delayed != 1 || stats[0].Ready != 1 {
		t.Fatalf("stats %+v, %v: want the unencodable event set aside (delayed) and the other ready", stats, err)
	}
	ds, err := c.Fetch(fctx, 10, "orders")
	if err != nil || len(ds) != 1 || ds[0].Event.ID != "good" || ds[0].Attempt() != 1 {
		t.Fatalf("second fetch: %v %v, want the good event at attempt 1", ds, err)
	}
}
