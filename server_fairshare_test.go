package h3x

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

// fairShareAt is a fairShare with a share of limit events and a clock the
// test moves.
func fairShareAt(limit int) (*fairShare, *time.Time) {
	f := newFairShare()
	f.limit = limit
	now := time.Unix(1000, 0)
	f.now = func() time.Time { return now }
	return f, &now
}

func eventsIn(ns string, n int) []Event {
	evs := make([]Event, n)
	for i := range evs {
		evs[i].Namespace = ns
	}
	return evs
}

// shareAdmits reports whether admit lets events in within a short wait, and
// returns its release if so (the waiting call is abandoned otherwise).
func shareAdmits(t *testing.T, f *fairShare, events []Event) (func(), bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	release, err := f.admit(ctx, events)
	if err != nil {
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("admit: %v", err)
		}
		return nil, false
	}
	return release, true
}

func TestFairShare(t *testing.T) {
	t.Run("AloneNeverHeld", func(t *testing.T) {
		f, _ := fairShareAt(4)
		for i := range 10 {
			if _, ok := shareAdmits(t, f, eventsIn("flood", 3)); !ok {
				t.Fatalf("publish %d of a namespace publishing alone was held", i)
			}
		}
	})
	t.Run("HeldOverItsShareWhileAnotherIsActive", func(t *testing.T) {
		f, _ := fairShareAt(4)
		calm, ok := shareAdmits(t, f, eventsIn("calm", 1))
		if !ok {
			t.Fatal("calm held")
		}
		calm()
		first, ok := shareAdmits(t, f, eventsIn("flood", 3))
		if !ok {
			t.Fatal("the flood's first publish was held: nothing of it was in Enqueue")
		}
		if _, ok := shareAdmits(t, f, eventsIn("flood", 1)); !ok {
			t.Fatal("a publish within the share (3+1 of 4) was held")
		}
		if _, ok := shareAdmits(t, f, eventsIn("flood", 1)); ok {
			t.Fatal("a publish past the share (5 of 4) went in while calm was active")
		}
		// calm is never held by the flood's share.
		if _, ok := shareAdmits(t, f, eventsIn("calm", 1)); !ok {
			t.Fatal("calm held behind the flood")
		}
		// Once an earlier publish of the flood returns, the held one goes in.
		got := make(chan error, 1)
		go func() {
			_, err := f.admit(context.Background(), eventsIn("flood", 1))
			got <- err
		}()
		select {
		case err := <-got:
			t.Fatalf("admitted before any room was freed: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
		first()
		select {
		case err := <-got:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("still held after its namespace's earlier publish returned")
		}
	})
	t.Run("NothingPendingIsAlwaysLetIn", func(t *testing.T) {
		f, _ := fairShareAt(4)
		if _, ok := shareAdmits(t, f, eventsIn("calm", 1)); !ok {
			t.Fatal("calm held")
		}
		release, ok := shareAdmits(t, f, eventsIn("flood", 100))
		if !ok {
			t.Fatal("a batch larger than the share, with nothing of its namespace in Enqueue, was held: it would wait for ever")
		}
		release()
	})
	t.Run("AnotherIdlePastTheWindowHoldsNothing", func(t *testing.T) {
		f, now := fairShareAt(4)
		calm, _ := shareAdmits(t, f, eventsIn("calm", 1))
		calm()
		if _, ok := shareAdmits(t, f, eventsIn("flood", 4)); !ok {
			t.Fatal("first flood publish held")
		}
		if _, ok := shareAdmits(t, f, eventsIn("flood", 1)); ok {
			t.Fatal("not held while calm was active")
		}
		*now = now.Add(f.window + time.Millisecond)
		if _, ok := shareAdmits(t, f, eventsIn("flood", 1)); !ok {
			t.Fatal("held although calm published last more than the window ago")
		}
	})
	t.Run("AnotherStillInEnqueueIsActive", func(t *testing.T) {
		f, now := fairShareAt(4)
		calm, _ := shareAdmits(t, f, eventsIn("calm", 1)) // not returned yet
		if _, ok := shareAdmits(t, f, eventsIn("flood", 4)); !ok {
			t.Fatal("first flood publish held")
		}
		*now = now.Add(time.Hour)
		if _, ok := shareAdmits(t, f, eventsIn("flood", 1)); ok {
			t.Fatal("not held while calm's publish was still in Enqueue")
		}
		calm()
	})
	t.Run("EveryNamespaceOfAPublishCounts", func(t *testing.T) {
		f, _ := fairShareAt(4)
		if _, ok := shareAdmits(t, f, eventsIn("calm", 1)); !ok {
			t.Fatal("calm held")
		}
		if _, ok := shareAdmits(t, f, eventsIn("flood", 4)); !ok {
			t.Fatal("first flood publish held")
		}
		mixed := append(eventsIn("other", 1), eventsIn("flood", 1)...)
		if _, ok := shareAdmits(t, f, mixed); ok {
			t.Fatal("a publish naming a namespace over its share went in")
		}
	})
	t.Run("CancelledWhileHeld", func(t *testing.T) {
		f, _ := fairShareAt(4)
		shareAdmits(t, f, eventsIn("calm", 1))
		flood, _ := shareAdmits(t, f, eventsIn("flood", 4))
		ctx, cancel := context.WithCancel(context.Background())
		got := make(chan error, 1)
		go func() {
			_, err := f.admit(ctx, eventsIn("flood", 1))
			got <- err
		}()
		time.Sleep(10 * time.Millisecond)
		cancel()
		if err := <-got; !errors.Is(err, context.Canceled) {
			t.Fatalf("admit after its context ended: %v, want context.Canceled", err)
		}
		f.mu.Lock()
		waiting, pending := f.waiting, f.pending["flood"]
		f.mu.Unlock()
		if waiting != 0 || pending != 4 {
			t.Fatalf("after a cancelled wait: %d waiting, %d flood events pending; want 0 and 4", waiting, pending)
		}
		flood()
		f.mu.Lock()
		defer f.mu.Unlock()
		if len(f.pending) != 1 { // calm's, never released
			t.Fatalf("pending after every flood release: %v", f.pending)
		}
	})
	t.Run("IdleNamespacesForgotten", func(t *testing.T) {
		f, now := fairShareAt(4)
		for i := range 100 {
			r, _ := shareAdmits(t, f, eventsIn("ns-"+strings.Repeat("x", i%7)+string(rune('a'+i%26))+string(rune('a'+i/26)), 1))
			r()
		}
		*now = now.Add(2 * f.window)
		r, _ := shareAdmits(t, f, eventsIn("late", 1))
		r()
		f.mu.Lock()
		defer f.mu.Unlock()
		if len(f.last) != 1 {
			t.Fatalf("%d namespaces remembered, want only the one active", len(f.last))
		}
	})
}

// holdNSQueue holds the Enqueue calls of namespace ns until release is
// closed, and counts the events of ns in Enqueue calls.
type holdNSQueue struct {
	Queue
	ns      string
	release chan struct{}
	mu      sync.Mutex
	inside  int
	changed chan struct{} // closed and replaced when inside changes
}

func (q *holdNSQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	if len(events) > 0 && events[0].Namespace == q.ns {
		q.add(len(events))
		defer q.add(-len(events))
		<-q.release
	}
	return q.Queue.Enqueue(ctx, events)
}

func (q *holdNSQueue) add(n int) {
	q.mu.Lock()
	q.inside += n
	close(q.changed)
	q.changed = make(chan struct{})
	q.mu.Unlock()
}

// waitInside waits until n events of ns are in Enqueue calls, and reports
// whether that happened within d.
func (q *holdNSQueue) waitInside(n int, d time.Duration) bool {
	deadline := time.After(d)
	for {
		q.mu.Lock()
		in, ch := q.inside, q.changed
		q.mu.Unlock()
		if in == n {
			return true
		}
		select {
		case <-ch:
		case <-deadline:
			return false
		}
	}
}

// TestFairShareHoldsAFloodOverItsShare: through a real server, a namespace
// with its share of events in the queue's Enqueue calls gets no more in
// while another namespace publishes, and that namespace's publishes are
// not held; once the queue answers, the held publish goes in.
func TestFairShareHoldsAFloodOverItsShare(t *testing.T) {
	q := &holdNSQueue{Queue: NewMemoryQueue(QueueOptions{}), ns: "orders", release: make(chan struct{}), changed: make(chan struct{})}
	s := testServer(t, WithQueue(q))
	var releaseOnce sync.Once
	releaseAll := func() { releaseOnce.Do(func() { close(q.release) }) }
	defer releaseAll() // before the server's cleanup, which waits for the Enqueue calls
	calm := mustDial(t, s, "alice", "alice-token")
	flood := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	publishCalm := func() {
		t.Helper()
		if _, err := calm.Publish(ctx, Event{Namespace: "audit", Type: "t"}); err != nil {
			t.Fatal(err)
		}
	}
	publishCalm()
	batch := func() []Event {
		evs := make([]Event, fairShareEvents/2)
		for i := range evs {
			evs[i] = Event{Namespace: "orders", Type: "t"}
		}
		return evs
	}
	var calls []*PublishCall
	for range 2 {
		calls = append(calls, flood.PublishAsync(ctx, batch()...))
	}
	if !q.waitInside(fairShareEvents, 10*time.Second) {
		t.Fatalf("the flood's first %d events never reached the queue", fairShareEvents)
	}
	publishCalm()
	calls = append(calls, flood.PublishAsync(ctx, batch()...))
	if q.waitInside(fairShareEvents+fairShareEvents/2, 300*time.Millisecond) {
		t.Fatal("a publish past the flood's share reached the queue while another namespace was publishing")
	}
	publishCalm() // not held behind the flood
	releaseAll()
	for i, c := range calls {
		res, err := c.Result()
		if err != nil {
			t.Fatalf("flood publish %d: %v", i, err)
		}
		for _, r := range res {
			if r.Status != PublishStored {
				t.Fatalf("flood publish %d: %v %v", i, r.Status, r.Err)
			}
		}
	}
}
