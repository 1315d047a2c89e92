package h3x

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

// countQueued returns how many events a fresh consumer can fetch from
// "orders" within d (leasing them).
func countQueued(t *testing.T, s *Server, d time.Duration) int {
	t.Helper()
	c := mustDial(t, s, "bob", "bob-token")
	defer c.Close()
	n := 0
	for {
		ctx, cancel := context.WithTimeout(context.Background(), d)
		ds, err := c.Fetch(ctx, 1000, "orders")
		cancel()
		if err != nil {
			return n
		}
		n += len(ds)
	}
}

// A server with a smaller frame size than the client's ack batch: the
// client split publishes by the server's announced limits, but sent an ack
// batch as one AckEvent, which the server refused. Every ack was lost and
// every event came again.
func TestAckBatchRespectsServerFrameSize(t *testing.T) {
	s := testServer(t, WithMaxFrameSize(4096))
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c := mustDial(t, s, "alice", "alice-token", WithAckFlush(200, time.Hour))
	evs := make([]Event, 200)
	for i := range evs {
		evs[i] = Event{Namespace: "orders", Message: fmt.Sprint(i)}
	}
	if _, err := c.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 200})
	if err != nil {
		t.Fatal(err)
	}
	for range 200 {
		d := <-sub.Events()
		if err := d.Ack(); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Flush(ctx); err != nil {
		t.Errorf("Flush of 200 acks against a server with a 4 KiB frame size: %v", err)
	}
	sub.Close()
	c.Close()
	if n := countQueued(t, s, 300*time.Millisecond); n != 0 {
		t.Errorf("%d of 200 acked events are still in the queue", n)
	}
}

// The same with the synchronous Client.Ack.
func TestSyncAckRespectsServerFrameSize(t *testing.T) {
	s := testServer(t, WithMaxFrameSize(4096))
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c := mustDial(t, s, "alice", "alice-token")
	publishCopies(ctx, t, c, 200, Event{Namespace: "orders"})
	var all []*Delivery
	for len(all) < 200 {
		ds, err := c.Fetch(ctx, 200, "orders")
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, ds...)
	}
	res, err := c.Ack(ctx, all...)
	if err != nil {
		t.Fatalf("Ack of 200 deliveries against a server with a 4 KiB frame size: %v", err)
	}
	if len(res) != 200 {
		t.Fatalf("%d results", len(res))
	}
}

// Client.Ack / Nack / Extend with a nil *Delivery panicked inside the
// library (markSettled tolerated nil, refsOf did not).
func TestSyncAckNilDelivery(t *testing.T) {
	s := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c := mustDial(t, s, "alice", "alice-token")
	var err error
	func() {
		defer func() {
			if r := recover(); r != nil {
				t.Errorf("Client.Ack(ctx, nil) panicked: %v", r)
			}
		}()
		_, err = c.Ack(ctx, nil)
	}()
	if err == nil && !t.Failed() {
		t.Errorf("Client.Ack(ctx, nil) returned no error")
	}
}

// Close while the client waited to reconnect reported StateClosed twice:
// first from the supervisor, as a terminal error ErrClosed, then from Close.
func TestCloseDuringReconnectEmitsClosedOnce(t *testing.T) {
	s := testServer(t)
	var mu sync.Mutex
	var closed []StateChange
	disc := make(chan struct{}, 1)
	slow := &ExponentialBackoff{Initial: 30 * time.Second, Max: 30 * time.Second, Multiplier: 1, NoJitter: true}
	c := mustDial(t, s, "alice", "alice-token", WithBackoff(slow), WithStateHandler(func(sc StateChange) {
		switch sc.State {
		case StateClosed:
			mu.Lock()
			closed = append(closed, sc)
			mu.Unlock()
		case StateReconnecting:
			select {
			case disc <- struct{}{}:
			default:
			}
		}
	}))
	s.Close()
	select {
	case <-disc:
	case <-time.After(10 * time.Second):
		t.Fatal("no reconnect attempt")
	}
	c.Close()
	mu.Lock()
	defer mu.Unlock()
	if len(closed) != 1 {
		t.Errorf("StateClosed reported %d times: %+v", len(closed), closed)
	}
	for _, sc := range closed {
		if sc.Err != nil {
			t.Errorf("Close reported as a terminal error: %v", sc.Err)
		}
	}
}

// Delivery.Extend(0) asks the server for its ack deadline (as Client.Extend
// documents for d <= 0); it used to set Deadline to now.
func TestExtendZeroDeadline(t *testing.T) {
	s := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c := mustDial(t, s, "alice", "alice-token")
	publishOrders(ctx, t, c, 1)
	ds, err := c.Fetch(ctx, 1, "orders")
	if err != nil {
		t.Fatal(err)
	}
	d := ds[0]
	if err := d.Extend(0); err != nil {
		t.Fatal(err)
	}
	if !d.Deadline().After(time.Now().Add(time.Second)) {
		t.Errorf("Deadline after Extend(0) is %v from now; the server extended by its ack deadline", time.Until(d.Deadline()))
	}
}

// slowAnswerQueue stores events at once but answers Enqueue late, as a
// slow disk or a lost answer would look to the client.
type slowAnswerQueue struct {
	Queue
	delay time.Duration
}

func (q *slowAnswerQueue) Enqueue(ctx context.Context, evs []Event) ([]PublishResult, error) {
	res, err := q.Queue.Enqueue(context.WithoutCancel(ctx), evs)
	time.Sleep(q.delay)
	return res, err
}

// A PublishAsync whose ctx ends before the answer returns no results; the
// IDs it assigned used to be lost with them, so retrying the same events
// (as one does after an error) stored them twice. PublishCall.IDs gives
// them at once, and a retry with them is deduplicated.
func TestPublishAsyncRetryAfterTimeoutIsDeduplicated(t *testing.T) {
	q := &slowAnswerQueue{Queue: NewMemoryQueue(QueueOptions{}), delay: 500 * time.Millisecond}
	s := testServer(t, WithQueue(q))
	c := mustDial(t, s, "alice", "alice-token")
	evs := []Event{{Namespace: "orders", Message: "once"}}
	short, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	call := c.PublishAsync(short, evs...)
	res, err := call.Result()
	cancel()
	if err == nil {
		t.Fatalf("first attempt succeeded: %+v", res)
	}
	_ = res
	retry := slices.Clone(evs)
	for i, id := range call.IDs() {
		retry[i].ID = id
	}
	ctx, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	if _, err := c.PublishAsync(ctx, retry...).Result(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(600 * time.Millisecond)
	if n := countQueued(t, s, 300*time.Millisecond); n != 1 {
		t.Errorf("event published once (retried after a timeout) stored %d times", n)
	}
}

// failingAcks fails every Ack (a storage error).
type failingAcks struct{ Queue }

func (q failingAcks) Ack(ctx context.Context, holder string, refs []LeaseRef) ([]SettleResult, error) {
	return nil, errors.New("injected ack failure")
}

// Flush reported nil although an ack queued before it failed, when that
// ack's batch went out by the flush interval (or size) rather than with the
// Flush marker.
func TestFlushReportsEarlierFailedAcks(t *testing.T) {
	s := testServer(t, WithQueue(failingAcks{NewMemoryQueue(QueueOptions{})}))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c := mustDial(t, s, "alice", "alice-token") // default flush: 256 or 5 ms
	publishOrders(ctx, t, c, 1)
	ds, err := c.Fetch(ctx, 1, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if err := ds[0].Ack(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // the interval flush has gone out (and failed)
	if err := c.Flush(ctx); err == nil {
		t.Errorf("Flush returned nil, but the ack queued before it failed")
	}
}

// Subscription.Close says deliveries already received stay valid and can
// still be acked: their leases must not be given to another consumer
// meanwhile, and an Ack after Close must apply.
func TestAckAfterSubscriptionClose(t *testing.T) {
	s := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := mustDial(t, s, "alice", "alice-token")
	publishOrders(ctx, t, c, 3)
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 1})
	if err != nil {
		t.Fatal(err)
	}
	d := <-sub.Events()
	sub.Close()
	if n := countQueued(t, s, 300*time.Millisecond); n != 2 {
		t.Errorf("another consumer fetched %d events (want 2: the held delivery must stay leased)", n)
	}
	if err := d.Ack(); err != nil {
		t.Fatalf("Ack after Subscription.Close: %v", err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

// A closed client's calls return ErrClosed: Publish with no events included
// (a free publish slot used to win the select at random).
func TestPublishNoEventsAfterClose(t *testing.T) {
	s := testServer(t)
	c := mustDial(t, s, "alice", "alice-token")
	c.Close()
	for i := range 50 {
		if _, err := c.Publish(context.Background()); !errors.Is(err, ErrClosed) {
			t.Fatalf("call %d: Publish() after Close returned %v", i, err)
		}
	}
}

// A state handler that closes the client on a terminal error (a natural
// reaction: WithMaxReconnects ran out) deadlocked: Close waited for the
// supervisor, which waited in the handler, which waited in Close.
func TestCloseFromStateHandler(t *testing.T) {
	s := testServer(t)
	var c *Client
	ready := make(chan struct{})
	done := make(chan struct{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, s.Addr().String(), WithCredentials("alice", "alice-token"), WithTrustedFingerprint(s.Fingerprint()),
		WithMaxReconnects(1), WithBackoff(fastBackoff), WithDialTimeout(300*time.Millisecond), WithStateHandler(func(sc StateChange) {
			if sc.State == StateClosed && sc.Err != nil {
				<-ready
				c.Close()
				close(done)
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	close(ready)
	s.Close()
	select {
	case <-done:
		c.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("Close called from the state handler did not return")
	}
}

// While disconnected, PublishAsync calls wait in a buffer bounded by
// WithPublishBuffer; each call beyond the bound used to start a goroutine
// holding a copy of its events, without limit.
func TestPublishAsyncBoundedWhileDisconnected(t *testing.T) {
	s := testServer(t)
	slow := &ExponentialBackoff{Initial: 30 * time.Second, Max: 30 * time.Second, Multiplier: 1, NoJitter: true}
	c := mustDial(t, s, "alice", "alice-token", WithPublishBuffer(8), WithBackoff(slow))
	s.Close()
	deadline := time.Now().Add(5 * time.Second)
	for c.current() != nil && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	before := runtime.NumGoroutine()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const calls = 2000
	returned := make(chan struct{})
	go func() {
		defer close(returned)
		for range calls {
			c.PublishAsync(ctx, Event{Namespace: "orders", Data: make([]byte, 1024)})
		}
	}()
	select {
	case <-returned:
	case <-time.After(time.Second):
		// PublishAsync pushed back: that is the bound working.
	}
	grown := runtime.NumGoroutine() - before
	cancel()
	<-returned
	if grown > 100 {
		t.Errorf("%d PublishAsync calls while disconnected with WithPublishBuffer(8) left %d goroutines waiting (and their events in memory)", calls, grown)
	}
}

// Everything at once, then Close, under -race.
func TestClientStressClose(t *testing.T) {
	s := testServer(t)
	for round := range 5 {
		c := mustDial(t, s, "alice", "alice-token", WithAckFlush(8, time.Millisecond))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var wg sync.WaitGroup
		for p := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					call := c.PublishAsync(ctx, Event{Namespace: "orders", Message: fmt.Sprint(round, p, i)})
					if _, err := c.Publish(ctx, Event{Namespace: "orders"}); err != nil {
						if !errors.Is(err, ErrClosed) {
							t.Errorf("publish: %v", err)
						}
						call.Result()
						return
					}
				}
			}()
		}
		for range 3 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 16})
					if err != nil {
						if !errors.Is(err, ErrClosed) {
							t.Errorf("subscribe: %v", err)
						}
						return
					}
					n := 0
					for d := range sub.Events() {
						n++
						switch n % 3 {
						case 0:
							d.Ack()
						case 1:
							d.Nack(0)
						case 2:
							d.Extend(time.Second)
							d.Ack()
						}
						if n == 50 {
							sub.Close()
						}
					}
					if errors.Is(sub.Err(), ErrClosed) {
						return
					}
				}
			}()
		}
		time.Sleep(300 * time.Millisecond)
		done := make(chan struct{})
		go func() { c.Close(); close(done) }()
		go func() { c.Close() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("Close hung")
		}
		wg.Wait()
		cancel()
	}
}

// A client whose frame size is smaller than the server's batches (64 KiB
// against the server's default fetch budget of 512 KiB): the client did
// not send FetchEvents.max_bytes, so the server filled batches its reader
// refused, and the subscription got nothing.
func TestSubscribeWithSmallerClientFrameSize(t *testing.T) {
	s := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c := mustDial(t, s, "alice", "alice-token", WithBackoff(fastBackoff), WithMaxFrameSize(64<<10))
	publishCopies(ctx, t, c, 200, Event{Namespace: "orders", Data: make([]byte, 8<<10)})
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	got := 0
	timeout := time.After(5 * time.Second)
	for got < 200 {
		select {
		case d, ok := <-sub.Events():
			if !ok {
				t.Fatalf("channel closed after %d deliveries: %v", got, sub.Err())
			}
			d.Ack()
			got++
		case <-timeout:
			t.Fatalf("%d of 200 events (8 KiB each) delivered in 5 s to a client with a 64 KiB frame size", got)
		}
	}
}

// A server whose frame size (4 MiB) is larger than the client's default
// read limit (1 MiB): a default client may publish a 2 MiB event (Publish
// cuts by the server's announced limits), but its subscription can never
// read the batch that carries it. Nothing was delivered and nothing was
// reported (no error, no state change, not even a debug log): the
// subscription stalled on that event. It now ends with ErrFrameTooLarge.
func TestEventAboveClientFrameSizeEndsSubscription(t *testing.T) {
	s := testServer(t, WithMaxFrameSize(4<<20), WithAckDeadline(300*time.Millisecond),
		WithQueue(NewMemoryQueue(QueueOptions{MaxAttempts: 2})))
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c := mustDial(t, s, "alice", "alice-token", WithBackoff(fastBackoff)) // default WithMaxFrameSize
	if res, err := c.Publish(ctx, Event{Namespace: "orders", Data: make([]byte, 2<<20)}); err != nil || res[0].Status != PublishStored {
		t.Fatalf("%v %+v", err, res)
	}
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	select {
	case _, ok := <-sub.Events():
		if ok {
			t.Fatal("a 2 MiB event delivered through a 1 MiB reader")
		}
		if err := sub.Err(); !errors.Is(err, ErrFrameTooLarge) {
			t.Fatalf("subscription ended with %v, want ErrFrameTooLarge", err)
		}
	case <-time.After(3 * time.Second):
		t.Errorf("a stored 2 MiB event was neither delivered nor reported in 3 s (sub.Err=%v)", sub.Err())
	}
}

// Close while the path to the server silently drops packets (the client has
// not noticed yet): each subscription's stop waits up to 1 s for its polls
// and up to 1 s more to give back its buffered deliveries; they used to do
// so one after another, before the 5 s ack flush bound even started.
func TestCloseBoundedWhenPathGoesSilent(t *testing.T) {
	s := testServer(t)
	p := newUDPProxy(t, s.Addr().(*net.UDPAddr))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pub := mustDial(t, s, "alice", "alice-token")
	publishCopies(ctx, t, pub, 200, Event{Namespace: "orders"})
	c, err := Dial(ctx, p.Addr(), WithCredentials("alice", "alice-token"), WithTrustedFingerprint(s.Fingerprint()), WithBackoff(fastBackoff))
	if err != nil {
		t.Fatal(err)
	}
	const subs = 6
	for range subs {
		if _, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 16}); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(300 * time.Millisecond) // each prefetches into its buffer
	p.SetBlackhole(true)
	t0 := time.Now()
	c.Close()
	if el := time.Since(t0); el > 6*time.Second {
		t.Errorf("Close took %v with %d subscriptions on a silent path (documented bound: 5 s)", el.Round(100*time.Millisecond), subs)
	}
}

// publishCopies publishes n copies of ev (each with its own ID) in one call.
func publishCopies(ctx context.Context, t *testing.T, c *Client, n int, ev Event) {
	t.Helper()
	evs := make([]Event, n)
	for i := range evs {
		evs[i] = ev
	}
	if _, err := c.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
}
