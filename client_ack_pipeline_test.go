package h3x

import (
	"context"
	"sync"
	"testing"
	"time"
)

// heldSettlements holds every Ack and Extend until open is called; each
// call first sends on entered what it is: "ack", or the extension's
// duration.
type heldSettlements struct {
	Queue
	entered chan string
	release chan struct{}
	once    sync.Once
}

func newHeldSettlements() *heldSettlements {
	return &heldSettlements{Queue: NewMemoryQueue(QueueOptions{}), entered: make(chan string, 16), release: make(chan struct{})}
}

// open lets every held call and every later one through.
func (q *heldSettlements) open() { q.once.Do(func() { close(q.release) }) }

func (q *heldSettlements) hold(what string) {
	q.entered <- what
	<-q.release
}

func (q *heldSettlements) Ack(ctx context.Context, holder string, refs []LeaseRef) ([]SettleResult, error) {
	q.hold("ack")
	return q.Queue.Ack(ctx, holder, refs)
}

func (q *heldSettlements) Extend(ctx context.Context, holder string, refs []LeaseRef, d time.Duration) ([]SettleResult, error) {
	q.hold(d.String())
	return q.Queue.Extend(ctx, holder, refs, d)
}

// The acker sent one batch at a time and waited for its answer, which
// waits for the server's commit (and sync): a consumer acking faster than
// that was held to one batch per round trip. Batches now go out while
// earlier ones are unanswered, up to ackBatchesInFlight, and Flush still
// answers only once every batch before it is answered.
func TestAckBatchesPipelined(t *testing.T) {
	q := newHeldSettlements()
	s := testServer(t, WithQueue(q))
	t.Cleanup(q.open) // before the server's Close, which waits for the held acks
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := mustDial(t, s, "alice", "alice-token", WithAckFlush(2, time.Hour)) // a batch per two acks
	batches := ackBatchesInFlight
	if batches < 2 {
		t.Fatalf("ackBatchesInFlight is %d: batches are not pipelined", batches)
	}
	publishOrders(ctx, t, c, 2*batches)
	ds, err := c.Fetch(ctx, 2*batches, "orders")
	if err != nil || len(ds) != 2*batches {
		t.Fatalf("fetch: %d deliveries, %v", len(ds), err)
	}
	for _, d := range ds {
		if err := d.Ack(); err != nil {
			t.Fatal(err)
		}
	}
	flushed := make(chan error, 1)
	go func() { flushed <- c.Flush(ctx) }()
	for i := range batches {
		select {
		case <-q.entered:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d ack batches reached the queue while the first was unanswered, want %d", i, batches)
		}
	}
	select {
	case err := <-flushed:
		t.Fatalf("Flush returned (%v) before the batches were answered", err)
	case <-time.After(50 * time.Millisecond):
	}
	q.open()
	if err := <-flushed; err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if n := countQueued(t, s, 300*time.Millisecond); n != 0 {
		t.Errorf("%d events left after every ack was answered", n)
	}
}

// Two Extends of one delivery in batches in flight at once could be
// applied in either order, leaving the server with the older deadline
// while Delivery.Deadline reports the newer one. A batch holding an Extend
// now waits for the batches before it.
func TestAckBatchesKeepExtendsInOrder(t *testing.T) {
	q := newHeldSettlements()
	s := testServer(t, WithQueue(q))
	t.Cleanup(q.open)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := mustDial(t, s, "alice", "alice-token", WithAckFlush(1, time.Hour)) // a batch per settlement
	publishOrders(ctx, t, c, 1)
	ds, err := c.Fetch(ctx, 1, "orders")
	if err != nil || len(ds) != 1 {
		t.Fatalf("fetch: %d deliveries, %v", len(ds), err)
	}
	for _, d := range []time.Duration{time.Minute, 2 * time.Minute} {
		if err := ds[0].Extend(d); err != nil {
			t.Fatal(err)
		}
	}
	if got := <-q.entered; got != time.Minute.String() {
		t.Fatalf("first Extend applied: %v, want 1m", got)
	}
	select {
	case got := <-q.entered:
		t.Fatalf("second Extend (%v) sent while the first was unanswered", got)
	case <-time.After(200 * time.Millisecond):
	}
	q.open()
	if got := <-q.entered; got != (2 * time.Minute).String() {
		t.Fatalf("second Extend applied: %v, want 2m", got)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
}
