package h3x

import (
	"context"
	"testing"
	"testing/synctest"
	"time"
)

// TestQueueStatsExpired checks that both built-in queues count lease
// expiries per namespace in NamespaceStats.Expired, and only expiries: not
// acks, nacks, releases or extended leases. It runs in a synctest bubble,
// so the deadlines pass on the fake clock.
func TestQueueStatsExpired(t *testing.T) {
	for _, tc := range []struct {
		name string
		open func(t *testing.T, opts QueueOptions) (q Queue, reopen func() Queue)
	}{
		{"Memory", func(t *testing.T, opts QueueOptions) (Queue, func() Queue) {
			q := NewMemoryQueue(opts)
			t.Cleanup(func() { q.Close() })
			return q, nil
		}},
		{"Badger", func(t *testing.T, opts QueueOptions) (Queue, func() Queue) {
			dir := t.TempDir()
			var q Queue = openTestBadger(t, dir, opts)
			return q, func() Queue {
				if err := q.Close(); err != nil {
					t.Fatalf("Close before reopen: %v", err)
				}
				q = openTestBadger(t, dir, opts)
				return q
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				testQueueStatsExpired(t, tc.open)
			})
		})
	}
}

func testQueueStatsExpired(t *testing.T, open func(t *testing.T, opts QueueOptions) (Queue, func() Queue)) {
	ctx := context.Background()
	q, reopen := open(t, QueueOptions{MaxAttempts: 2})
	const deadline = 10 * time.Second
	lease := func(holder string, limit int, ns string) []Lease {
		t.Helper()
		ls, err := q.Lease(ctx, LeaseRequest{Holder: holder, Namespaces: []string{ns}, Limit: limit, AckDeadline: deadline})
		if err != nil {
			t.Fatalf("Lease: %v", err)
		}
		if len(ls) != limit {
			t.Fatalf("Lease of %d from %s returned %d events", limit, ns, len(ls))
		}
		return ls
	}
	settled := func(op string, res []SettleResult, err error) {
		t.Helper()
		if err != nil || len(res) != 1 || res[0].Status != SettleOK {
			t.Fatalf("%s: %+v, %v", op, res, err)
		}
	}
	ref := func(l Lease) []LeaseRef { return []LeaseRef{{ID: l.Event.ID, Attempt: l.Attempt}} }
	want := func(step string, wantExpired map[string]int) {
		t.Helper()
		all, err := q.Stats(ctx) // every namespace: the one read also catches up with the clock
		if err != nil {
			t.Fatalf("%s: Stats: %v", step, err)
		}
		got := map[string]int{}
		for _, st := range all {
			got[st.Namespace] = st.Expired
		}
		for ns, n := range wantExpired {
			if got[ns] != n {
				t.Errorf("%s: Stats(%s).Expired = %d, want %d (all: %v)", step, ns, got[ns], n, got)
			}
		}
	}

	publishTest(t, q, Event{Namespace: "orders"}, Event{Namespace: "orders"}, Event{Namespace: "orders"}, Event{Namespace: "orders"},
		Event{Namespace: "audit"})
	ls := lease("a", 4, "orders")
	audit := lease("b", 1, "audit")
	want("leased", map[string]int{"orders": 0, "audit": 0})

	// Of four leases, one is acked, one nacked, one extended past the
	// deadline, and one expires.
	r, err := q.Ack(ctx, "a", ref(ls[0]))
	settled("Ack", r, err)
	r, err = q.Nack(ctx, "a", ref(ls[1]), 0, "test")
	settled("Nack", r, err)
	r, err = q.Extend(ctx, "a", ref(ls[2]), time.Hour)
	settled("Extend", r, err)
	r, err = q.Extend(ctx, "b", ref(audit[0]), time.Hour)
	settled("Extend", r, err)
	time.Sleep(deadline + time.Second)
	want("one lease expired", map[string]int{"orders": 1, "audit": 0})

	// A released lease is not an expiry; the expired event is leased again
	// (its last attempt) and expires again: it is dead-lettered, and still
	// counts as an expiry.
	if err := q.Release(ctx, "b"); err != nil {
		t.Fatalf("Release: %v", err)
	}
	lease("c", 2, "orders") // the nacked and the expired event, at attempt 2
	time.Sleep(deadline + time.Second)
	want("two more expired", map[string]int{"orders": 3, "audit": 0})
	st, err := q.Stats(ctx, "orders", DeadLetterNamespace("orders"))
	if err != nil {
		t.Fatal(err)
	}
	if st[0].DeadLettered != 2 || st[0].Leased != 1 || st[1].Expired != 0 {
		t.Errorf("after expiries at the last attempt: %+v", st)
	}

	// Cumulative since open: a reopened queue counts from zero.
	if reopen != nil {
		q = reopen()
		want("reopened", map[string]int{"orders": 0, "audit": 0})
		lease("d", 1, "orders") // the extended one: its lease ended with the old queue
		lease("d", 1, "audit")
		time.Sleep(deadline + time.Second)
		want("expired after reopen", map[string]int{"orders": 1, "audit": 1})
	}
}
