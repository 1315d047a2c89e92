package h3x

import (
	"context"
	"testing"
	"time"
)

func rvOpen(t *testing.T, dir string, opts QueueOptions) Queue {
	t.Helper()
	q, err := OpenBadgerQueue(dir, opts)
	if err != nil {
		t.Fatalf("OpenBadgerQueue: %v", err)
	}
	return q
}

func rvLease(t *testing.T, q Queue, holder, ns string, limit int) []Lease {
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
	ctx := context.Background()
	dir := t.TempDir()
	q := rvOpen(t, dir, QueueOptions{})
	if _, err := q.Enqueue(ctx, []Event{{ID: "e1", Namespace: "ns"}}); err != nil {
		t.Fatal(err)
	}
	ls := rvLease(t, q, "a", "ns", 1)
	if len(ls) != 1 || ls[0].Attempt != 1 {
		t.Fatalf("lease: %+v", ls)
	}
	res, err := q.Nack(ctx, "a", []LeaseRef{{ID: "e1", Attempt: 1, Unseen: true}}, 0, "prefetch returned")
	if err != nil || res[0].Status != SettleOK {
		t.Fatalf("unseen nack: %v %v", res, err)
	}
	// In process, the next delivery is attempt 1 again; give it back again.
	ls = rvLease(t, q, "a", "ns", 1)
	if len(ls) != 1 || ls[0].Attempt != 1 {
		t.Fatalf("in-process redelivery: %+v, want attempt 1", ls)
	}
	if res, err := q.Nack(ctx, "a", []LeaseRef{{ID: "e1", Attempt: 1, Unseen: true}}, 0, "prefetch returned"); err != nil || res[0].Status != SettleOK {
		t.Fatalf("unseen nack: %v %v", res, err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q = rvOpen(t, dir, QueueOptions{})
	defer q.Close()
	ls = rvLease(t, q, "a", "ns", 1)
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
	ctx := context.Background()
	dir := t.TempDir()
	opts := QueueOptions{MaxAttempts: 1}
	q := rvOpen(t, dir, opts)
	if _, err := q.Enqueue(ctx, []Event{{ID: "e1", Namespace: "ns"}}); err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 2; round++ {
		ls := rvLease(t, q, "a", "ns", 1)
		if len(ls) != 1 {
			t.Fatalf("round %d: event gone from ns (stats: %v)", round, rvStats(t, q))
		}
		if res, err := q.Nack(ctx, "a", []LeaseRef{{ID: "e1", Attempt: ls[0].Attempt, Unseen: true}}, 0, "batch not delivered"); err != nil || res[0].Status != SettleOK {
			t.Fatalf("unseen nack: %v %v", res, err)
		}
		if err := q.Close(); err != nil {
			t.Fatal(err)
		}
		q = rvOpen(t, dir, opts)
	}
	defer q.Close()
	st := rvStats(t, q, "ns", "ns.dlq")
	if st[0].Ready != 1 || st[1].Ready != 0 {
		t.Fatalf("never-seen event was dead-lettered: %+v", st)
	}
}

func rvStats(t *testing.T, q Queue, ns ...string) []NamespaceStats {
	t.Helper()
	st, err := q.Stats(context.Background(), ns...)
	if err != nil {
		t.Fatal(err)
	}
	return st
}
