package h3x

import (
	"context"
	"testing"
	"time"
)

func mustOpenBadger(t *testing.T, dir string, opts QueueOptions) Queue {
	t.Helper()
	q, err := OpenBadgerQueue(dir, opts)
	if err != nil {
		t.Fatalf("OpenBadgerQueue: %v", err)
	}
	return q
}

// openWithEvent opens a Badger queue in dir holding one event, e1 in ns.
func openWithEvent(t *testing.T, dir string, opts QueueOptions) Queue {
	t.Helper()
	q := mustOpenBadger(t, dir, opts)
	if _, err := q.Enqueue(context.Background(), []Event{{ID: "e1", Namespace: "ns"}}); err != nil {
		t.Fatal(err)
	}
	return q
}

func leaseN(t *testing.T, q Queue, holder, ns string, limit int) []Lease {
	t.Helper()
	ls, err := q.Lease(context.Background(), LeaseRequest{Holder: holder, Namespaces: []string{ns}, Limit: limit, AckDeadline: time.Minute})
	if err != nil {
		t.Fatalf("Lease: %v", err)
	}
	return ls
}

// An unseen nack gives the attempt back; after a clean reopen the next
// delivery must still carry attempt 1 (attempt counts survive a restart).
func TestUnseenNackAttemptSurvivesReopen(t *testing.T) {
	dir := t.TempDir()
	q := openWithEvent(t, dir, QueueOptions{})
	ls := leaseN(t, q, "a", "ns", 1)
	if len(ls) != 1 || ls[0].Attempt != 1 {
		t.Fatalf("lease: %+v", ls)
	}
	nackUnseen(t, q, "a", "e1", 1)
	// In process, the next delivery is attempt 1 again; give it back again.
	ls = leaseN(t, q, "a", "ns", 1)
	if len(ls) != 1 || ls[0].Attempt != 1 {
		t.Fatalf("in-process redelivery: %+v, want attempt 1", ls)
	}
	nackUnseen(t, q, "a", "e1", 1)
	q = closeAndReopen(t, q, dir, QueueOptions{})
	defer q.Close()
	ls = leaseN(t, q, "a", "ns", 1)
	if len(ls) != 1 {
		t.Fatalf("after reopen: %d leases", len(ls))
	}
	if ls[0].Attempt != 1 {
		t.Fatalf("after reopen: attempt %d, want 1 (the unseen nacks were not counted)", ls[0].Attempt)
	}
}

// Consequence: an event the application never saw is dead-lettered, though
// "the attempt is not counted, so it cannot lead to dead-lettering".
func TestUnseenNackNeverDeadLettersAfterReopen(t *testing.T) {
	dir := t.TempDir()
	opts := QueueOptions{MaxAttempts: 1}
	q := openWithEvent(t, dir, opts)
	for round := 0; round < 2; round++ {
		ls := leaseN(t, q, "a", "ns", 1)
		if len(ls) != 1 {
			t.Fatalf("round %d: event gone from ns (stats: %v)", round, statsOf(t, q))
		}
		nackUnseen(t, q, "a", "e1", ls[0].Attempt)
		q = closeAndReopen(t, q, dir, opts)
	}
	defer q.Close()
	st := statsOf(t, q, "ns", "ns.dlq")
	if st[0].Ready != 1 || st[1].Ready != 0 {
		t.Fatalf("never-seen event was dead-lettered: %+v", st)
	}
}

func statsOf(t *testing.T, q Queue, ns ...string) []NamespaceStats {
	t.Helper()
	st, err := q.Stats(context.Background(), ns...)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// With MaxAttempts 1, an event whose only allowed delivery was leased when
// the queue closed must not be delivered a second time after reopen: the
// lease ends "as if released", and a release at the maximum dead-letters.
func TestMaxAttemptsAcrossReopen(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	opts := QueueOptions{MaxAttempts: 1}
	q := openWithEvent(t, dir, opts)
	if ls := leaseN(t, q, "a", "ns", 1); len(ls) != 1 || ls[0].Attempt != 1 {
		t.Fatalf("lease: %+v", ls)
	}
	// Reference: what an in-process Release does at the maximum.
	mq := NewMemoryQueue(opts)
	defer mq.Close()
	mq.Enqueue(ctx, []Event{{ID: "e1", Namespace: "ns"}})
	leaseN(t, mq, "a", "ns", 1)
	mq.Release(ctx, "a")
	if ls := leaseN(t, mq, "b", "ns", 1); len(ls) != 0 {
		t.Fatalf("memory: released at max attempts, delivered again: %+v", ls)
	}

	q = closeAndReopen(t, q, dir, opts)
	defer q.Close()
	if ls := leaseN(t, q, "b", "ns", 1); len(ls) != 0 {
		t.Fatalf("after reopen: delivered again with attempt %d, but MaxAttempts is 1 (want it dead-lettered as if released)", ls[0].Attempt)
	}
}

// recountRec used to drop an unseen-nacked entry's lease record without
// writing a new one when the attempt was back at 0, on the premise that
// after a reopen the event is read from its chunk as never delivered. But
// the old record survives when it lists other deliveries of the same Lease
// call, and after a reopen it gave the event its old attempt back.
func TestUnseenNackSharedLeaseRecordSurvivesReopen(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	q := mustOpenBadger(t, dir, QueueOptions{})
	if _, err := q.Enqueue(ctx, []Event{{ID: "e1", Namespace: "ns"}, {ID: "e2", Namespace: "ns"}}); err != nil {
		t.Fatal(err)
	}
	ls := leaseN(t, q, "a", "ns", 2) // one lease record listing e1 and e2
	if len(ls) != 2 || ls[0].Attempt != 1 || ls[1].Attempt != 1 {
		t.Fatalf("lease: %+v", ls)
	}
	// e1 never reached the application: given back unseen (attempt back to 0).
	nackUnseen(t, q, "a", "e1", 1)
	q = closeAndReopen(t, q, dir, QueueOptions{})
	defer q.Close()
	ls = leaseN(t, q, "b", "ns", 2)
	for _, l := range ls {
		t.Logf("after reopen: %s attempt %d", l.Event.ID, l.Attempt)
		if l.Event.ID == "e1" && l.Attempt != 1 {
			t.Errorf("after reopen: e1 delivered with attempt %d, want 1 (its only delivery was given back unseen)", l.Attempt)
		}
	}
}

// The same stale lease record, with MaxAttempts 1: after the reopen the
// event that nobody ever saw is taken as delivered once, and the next Lease
// dead-letters it (overdueDeadLetter) instead of delivering it.
func TestUnseenNackSharedRecordNeverDeadLetters(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	opts := QueueOptions{MaxAttempts: 1}
	q := mustOpenBadger(t, dir, opts)
	if _, err := q.Enqueue(ctx, []Event{{ID: "e1", Namespace: "ns"}, {ID: "e2", Namespace: "ns"}}); err != nil {
		t.Fatal(err)
	}
	if ls := leaseN(t, q, "a", "ns", 2); len(ls) != 2 {
		t.Fatalf("lease: %+v", ls)
	}
	nackUnseen(t, q, "a", "e1", 1)
	// e2 stays leased (its consumer saw it) until the queue closes.
	q = closeAndReopen(t, q, dir, opts)
	defer q.Close()
	ls := leaseN(t, q, "b", "ns", 2)
	st, _ := q.Stats(ctx, "ns", "ns.dlq")
	t.Logf("after reopen: %d leases %+v; stats %+v", len(ls), ls, st)
	if len(ls) != 1 || ls[0].Event.ID != "e1" {
		t.Fatalf("after reopen: e1, never seen by anyone, was not delivered (dead-lettered?)")
	}
}

// nackUnseen gives holder's delivery of id at attempt back unseen.
func nackUnseen(t *testing.T, q Queue, holder, id string, attempt int) {
	t.Helper()
	res, err := q.Nack(context.Background(), holder, []LeaseRef{{ID: id, Attempt: attempt, Unseen: true}}, 0, "prefetch returned")
	if err != nil || res[0].Status != SettleOK {
		t.Fatalf("unseen nack of %s: %v %v", id, res, err)
	}
}

// closeAndReopen closes q and opens the Badger queue in dir again.
func closeAndReopen(t *testing.T, q Queue, dir string, opts QueueOptions) Queue {
	t.Helper()
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	return mustOpenBadger(t, dir, opts)
}
