package h3x

import (
	"context"
	"testing"
)

// With MaxAttempts 1, an event whose only allowed delivery was leased when
// the queue closed must not be delivered a second time after reopen: the
// lease ends "as if released", and a release at the maximum dead-letters.
func TestMaxAttemptsAcrossReopen(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	opts := QueueOptions{MaxAttempts: 1}
	q := rvOpen(t, dir, opts)
	if _, err := q.Enqueue(ctx, []Event{{ID: "e1", Namespace: "ns"}}); err != nil {
		t.Fatal(err)
	}
	if ls := rvLease(t, q, "a", "ns", 1); len(ls) != 1 || ls[0].Attempt != 1 {
		t.Fatalf("lease: %+v", ls)
	}
	// Reference: what an in-process Release does at the maximum.
	mq := NewMemoryQueue(opts)
	defer mq.Close()
	mq.Enqueue(ctx, []Event{{ID: "e1", Namespace: "ns"}})
	rvLease(t, mq, "a", "ns", 1)
	mq.Release(ctx, "a")
	if ls := rvLease(t, mq, "b", "ns", 1); len(ls) != 0 {
		t.Fatalf("memory: released at max attempts, delivered again: %+v", ls)
	}

	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q = rvOpen(t, dir, opts)
	defer q.Close()
	if ls := rvLease(t, q, "b", "ns", 1); len(ls) != 0 {
		t.Fatalf("after reopen: delivered again with attempt %d, but MaxAttempts is 1 (want it dead-lettered as if released)", ls[0].Attempt)
	}
}
