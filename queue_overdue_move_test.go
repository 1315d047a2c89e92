package h3x

import (
	"context"
	"testing"
	"time"
)

// A Lease that finds an event overdue for dead-lettering (it had its
// MaxAttempts deliveries while its dead-letter namespace was full) moves it
// there and may return nothing; the event is then ready in the dead-letter
// namespace for the next Lease, and Stats say so. (TestQueueModel's drain
// used to stop at such an empty Lease.)
func TestOverdueDeadLetterIsReadyAfterTheLeaseThatMovedIt(t *testing.T) {
	for _, tc := range bothQueues() {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			q := tc.open(t, QueueOptions{MaxAttempts: 1, MaxEventsPerNamespace: 1})
			rqEnq(t, q, Event{ID: "d", Namespace: "c.dlq"}) // the dead-letter namespace is full
			rqEnq(t, q, Event{ID: "e", Namespace: "c"})
			if ls := rqLease(t, q, "h", "c", 1, time.Minute); len(ls) != 1 {
				t.Fatalf("lease: %+v", ls)
			}
			if err := q.Release(ctx, "h"); err != nil { // at MaxAttempts, but no room: e stays in c
				t.Fatal(err)
			}
			ls := rqLease(t, q, "x", "c.dlq", 1, time.Minute)
			if res, err := q.Ack(ctx, "x", []LeaseRef{{ID: ls[0].Event.ID, Attempt: ls[0].Attempt, Namespace: "c.dlq"}}); err != nil || res[0].Status != SettleOK {
				t.Fatalf("ack of d: %+v %v", res, err)
			}
			// Room now: the next Lease over both moves e.
			got := 0
			for range 2 {
				ls, err := q.Lease(ctx, LeaseRequest{Holder: "drain", Namespaces: []string{"c", "c.dlq"}, Limit: 10, AckDeadline: time.Minute})
				if err != nil {
					t.Fatal(err)
				}
				for _, l := range ls {
					if l.Event.ID != "e" || l.Event.Namespace != "c.dlq" {
						t.Fatalf("leased %+v, want e in c.dlq", l.Event)
					}
					got++
				}
				if got == 0 {
					if st := statsOf(t, q, "c", "c.dlq"); st[1].Ready != 1 {
						t.Fatalf("after the Lease that moved it: %+v, want e ready in c.dlq", st)
					}
				}
			}
			if got != 1 {
				t.Fatalf("e leased %d times from c.dlq over two Leases, want 1", got)
			}
		})
	}
}
