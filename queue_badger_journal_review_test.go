package h3x

import (
	"context"
	"errors"
	"testing"
	"time"
)

// Found by a review of e7cf345 (the lease journal); RELIABILITY.md finding 155.

// A Lease that also dead-letters an overdue event waits for that move
// (durable). If its ctx ends first, the deliveries are given back unseen
// (giveBack) and Lease fails: they never went out. The give-back's
// replacement record is not journaled and not waited for (finishNoWait),
// while the Lease's own record already is in the journal: a kill -9 before
// the writer gets to the replacement brings the given-back attempt back,
// counted. At MaxAttempts=1 the event is then dead-lettered after the
// restart without ever having been delivered. Without the journal (the
// control subtest) the record had not been written either, and the attempt
// is not counted.
func TestLeaseJournalGiveBackWithMoveNotCountedAfterKill(t *testing.T) {
	for _, journal := range []bool{true, false} {
		name := "journal"
		if !journal {
			name = "withoutJournal"
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			opts := QueueOptions{MaxAttempts: 1, Durability: DurabilityNoSync}
			q := openWithOverdueA(t, dir, opts)
			if !journal {
				withoutJournal(q)
			}
			slowLeaseRecords(q, 400*time.Millisecond)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
			defer cancel()
			ls, err := q.Lease(ctx, LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 1, AckDeadline: time.Minute})
			if !errors.Is(err, context.DeadlineExceeded) || len(ls) != 0 {
				t.Fatalf("lease whose ctx ended while its dead-letter move was written: %+v, %v; want none and ctx's error", ls, err)
			}
			// b was given back unseen: it never went out. kill -9 now.
			crashed := copyLive(t, dir)
			q.failCommit.Store(nil)
			q2 := openTestBadger(t, crashed, opts)
			got := leaseAll(t, q2, "h2", 10, "n")
			var b *Lease
			for i := range got {
				if got[i].Event.ID == "b" {
					b = &got[i]
				}
			}
			st, _ := q2.Stats(context.Background(), DeadLetterNamespace("n"))
			if b == nil || b.Attempt != 1 {
				t.Fatalf("after the kill: leased %+v (dead letters %+v); want b delivered at attempt 1: its only delivery was given back unseen, yet it is counted (and at MaxAttempts=1 dead-lettered without ever being delivered)", got, st)
			}
		})
	}
}
