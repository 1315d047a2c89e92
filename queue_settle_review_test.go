package h3x

import (
	"context"
	"errors"
	"fmt"
	"math"
	"testing"
	"time"
)

type bothOpen func(t *testing.T, opts QueueOptions) Queue

func bothQueues() []struct {
	name string
	open bothOpen
} {
	return []struct {
		name string
		open bothOpen
	}{
		{"Memory", func(t *testing.T, opts QueueOptions) Queue {
			q := NewMemoryQueue(opts)
			t.Cleanup(func() { q.Close() })
			return q
		}},
		{"Badger", func(t *testing.T, opts QueueOptions) Queue {
			return openTestBadger(t, t.TempDir(), opts)
		}},
	}
}

func rqLease(t *testing.T, q Queue, holder, ns string, limit int, d time.Duration) []Lease {
	t.Helper()
	ls, err := q.Lease(context.Background(), LeaseRequest{Holder: holder, Namespaces: []string{ns}, Limit: limit, AckDeadline: d})
	if err != nil {
		t.Fatalf("Lease: %v", err)
	}
	return ls
}

func rqEnq(t *testing.T, q Queue, evs ...Event) []PublishResult {
	t.Helper()
	res, err := q.Enqueue(context.Background(), evs)
	if err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	return res
}

// A delivery of ns's event, whose lease ended by expiry at MaxAttempts
// (dead-lettering it), must not settle the dead-letter copy (same ID) in
// ns.dlq: "a later nack of it, Unseen included, is refused and the event
// stays dead-lettered"; an ack of that stale delivery must change nothing.
func TestStaleSettlementLeavesDeadLetterAlone(t *testing.T) {
	for _, tc := range bothQueues() {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			q := tc.open(t, QueueOptions{MaxAttempts: 1})
			rqEnq(t, q, Event{ID: "e1", Namespace: "ns"})
			if ls := rqLease(t, q, "a", "ns", 1, time.Minute); len(ls) != 1 || ls[0].Attempt != 1 {
				t.Fatalf("lease: %+v", ls)
			}
			// a's connection ends: release at max -> dead-lettered.
			if err := q.Release(ctx, "a"); err != nil {
				t.Fatal(err)
			}
			// A dlq consumer leases it (attempt 1 there) and its connection ends.
			if ls := rqLease(t, q, "c", "ns.dlq", 1, time.Minute); len(ls) != 1 || ls[0].Attempt != 1 {
				t.Fatalf("dlq lease: %+v", ls)
			}
			if err := q.Release(ctx, "c"); err != nil {
				t.Fatal(err)
			}
			// a reconnects and acks its (stale) delivery of ns's e1, attempt 1.
			res, err := q.Ack(ctx, "a", []LeaseRef{{ID: "e1", Attempt: 1}})
			if err != nil {
				t.Fatal(err)
			}
			st := statsOf(t, q, "ns", "ns.dlq")
			if res[0].Status == SettleOK || st[1].Ready != 1 {
				t.Fatalf("stale ack of ns's delivery: %v; dlq stats %+v (the dead letter was removed)", res[0].Status, st[1])
			}
		})
	}
}

// Unseen nack reuses the attempt number; a delivery that was superseded
// (leased again since) must not then become settleable again.
func TestSupersededDeliveryStaysStaleAfterUnseenNack(t *testing.T) {
	for _, tc := range bothQueues() {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			q := tc.open(t, QueueOptions{})
			rqEnq(t, q, Event{ID: "e1", Namespace: "ns"})
			rqLease(t, q, "a", "ns", 1, time.Minute) // attempt 1 to a
			if err := q.Release(ctx, "a"); err != nil {
				t.Fatal(err)
			}
			ls := rqLease(t, q, "b", "ns", 1, time.Minute) // attempt 2 to b
			if len(ls) != 1 || ls[0].Attempt != 2 {
				t.Fatalf("%+v", ls)
			}
			nackUnseen(t, q, "b", "e1", 2)
			// a's attempt-1 delivery was leased again since: stale.
			res, err := q.Ack(ctx, "a", []LeaseRef{{ID: "e1", Attempt: 1}})
			if err != nil {
				t.Fatal(err)
			}
			if res[0].Status != SettleStale {
				t.Fatalf("ack of superseded attempt 1 after an unseen nack of attempt 2: %v, want stale; stats %+v", res[0].Status, statsOf(t, q, "ns"))
			}
		})
	}
}

// With deduplication off, two events may share an ID. The same settlement
// (Namespace empty, matching both) must settle the same event in both
// built-in queues ("any behaviour difference is a finding").
func TestDuplicateIDsSettleTheSameEventInBothQueues(t *testing.T) {
	got := map[string]string{}
	for _, tc := range bothQueues() {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			q := tc.open(t, QueueOptions{DedupWindow: -1})
			rqEnq(t, q, Event{ID: "x", Namespace: "a"})
			rqEnq(t, q, Event{ID: "x", Namespace: "b"})
			rqLease(t, q, "h", "b", 1, time.Minute)
			rqLease(t, q, "h", "a", 1, time.Minute)
			res, err := q.Ack(ctx, "h", []LeaseRef{{ID: "x", Attempt: 1}})
			if err != nil || res[0].Status != SettleOK {
				t.Fatalf("%v %v", res, err)
			}
			st := statsOf(t, q, "a", "b")
			got[tc.name] = fmt.Sprintf("a.leased=%d b.leased=%d", st[0].Leased, st[1].Leased)
		})
	}
	if got["Memory"] != got["Badger"] {
		t.Fatalf("the same ack settled different events: memory %s, badger %s", got["Memory"], got["Badger"])
	}
}

// "an event larger than the limit itself is refused with
// CodeInvalidArgument (no room will ever be made for it)" — also when the
// namespace is at its event limit.
func TestOversizeEventInFullNamespaceIsInvalid(t *testing.T) {
	for _, tc := range bothQueues() {
		t.Run(tc.name, func(t *testing.T) {
			q := tc.open(t, QueueOptions{MaxEventsPerNamespace: 1, MaxBytesPerNamespace: 100})
			rqEnq(t, q, Event{ID: "small", Namespace: "ns"})
			res := rqEnq(t, q, Event{ID: "big", Namespace: "ns", Data: make([]byte, 200)})
			var e *Error
			if res[0].Status != PublishRefused || !errors.As(res[0].Err, &e) || e.Code != CodeInvalidArgument {
				t.Fatalf("oversize event: %v %v, want refused with CodeInvalidArgument (not retryable)", res[0].Status, res[0].Err)
			}
		})
	}
}

// A lease with a very long ack deadline ("never expire") must not end at
// once: now + AckDeadline overflows int64 and the lease expires
// immediately, so a second holder gets the event while the first holds it.
func TestHugeAckDeadlineDoesNotWrap(t *testing.T) {
	for _, tc := range bothQueues() {
		t.Run(tc.name, func(t *testing.T) {
			q := tc.open(t, QueueOptions{})
			rqEnq(t, q, Event{ID: "e1", Namespace: "ns"})
			ls := rqLease(t, q, "a", "ns", 1, time.Duration(math.MaxInt64))
			if len(ls) != 1 {
				t.Fatal("no lease")
			}
			if ls2 := rqLease(t, q, "b", "ns", 1, time.Minute); len(ls2) != 0 {
				t.Fatalf("leased to b while a holds it (a's deadline %v)", ls[0].Deadline)
			}
		})
	}
}

// An expiry at MaxAttempts moves the event to ns.dlq. At every moment Stats
// must count it somewhere (ns or ns.dlq) and Bytes must match the counts;
// the Badger queue's Stats used to count it nowhere while the move was
// being written (RELIABILITY.md finding 106).
func TestStatsCountADeadLetterWhileItMoves(t *testing.T) {
	for _, tc := range bothQueues() {
		t.Run(tc.name, func(t *testing.T) {
			q := tc.open(t, QueueOptions{MaxAttempts: 1})
			bad := 0
			var example string
			for i := range 40 {
				id := fmt.Sprintf("e%d", i)
				rqEnq(t, q, Event{ID: id, Namespace: "ns"})
				rqLease(t, q, "h", "ns", 1, 20*time.Millisecond)
				for until := time.Now().Add(2 * time.Second); time.Now().Before(until); {
					st := statsOf(t, q, "ns", "ns.dlq")
					n := 0
					for _, s := range st {
						n += s.Ready + s.Leased + s.Delayed
					}
					if n != 1 || (st[1].Bytes > 0) != (st[1].Ready > 0) {
						bad++
						example = fmt.Sprintf("%+v", st)
					}
					if st[1].Ready == 1 {
						break
					}
				}
				ls := rqLease(t, q, "d", "ns.dlq", 1, time.Minute)
				if len(ls) != 1 {
					t.Fatal("no dead letter")
				}
				q.Ack(context.Background(), "d", []LeaseRef{{ID: id, Attempt: 1}})
			}
			if bad > 0 {
				t.Fatalf("%d Stats snapshots counted the expiring event in no namespace (or Bytes without a count), e.g. %s", bad, example)
			}
		})
	}
}

// Both queues refuse an event whose text is not valid UTF-8, which no
// EventsBatch can carry, and store its neighbours (RELIABILITY.md finding
// 115).
func TestQueuesRefuseTextThatIsNotUTF8(t *testing.T) {
	for _, tc := range bothQueues() {
		t.Run(tc.name, func(t *testing.T) {
			q := tc.open(t, QueueOptions{})
			res := rqEnq(t, q,
				Event{ID: "id-\xff", Namespace: "ns"},
				Event{Namespace: "ns", Type: "t\xff"},
				Event{Namespace: "ns", Metadata: map[string]string{"k\xff": "v"}},
				Event{ID: "good", Namespace: "ns", Message: "ok"},
			)
			for i, r := range res[:3] {
				if r.Status != PublishRefused || !errors.Is(r.Err, ErrInvalidArgument) {
					t.Errorf("event %d: %v %v, want refused with ErrInvalidArgument", i, r.Status, r.Err)
				}
			}
			if res[3].Status != PublishStored {
				t.Fatalf("the valid neighbour: %v %v", res[3].Status, res[3].Err)
			}
			ls := rqLease(t, q, "h", "ns", 10, time.Minute)
			if len(ls) != 1 || ls[0].Event.ID != "good" {
				t.Fatalf("leased %v, want only the valid event", ls)
			}
		})
	}
}

// An ID acked twice in one call: the second is SettleUnknown (the event is
// gone), in both queues. Once acked, the Badger queue no longer holds the
// ID in its index of delivered entries, so it answers the second from its
// dedup index, whose gone marks it sets once per call (markGone): that
// answer must see the marks of the same call's acks.
func TestAckTwiceInOneCallIsUnknown(t *testing.T) {
	for _, tc := range bothQueues() {
		t.Run(tc.name, func(t *testing.T) {
			q := tc.open(t, QueueOptions{})
			rqEnq(t, q, Event{ID: "x", Namespace: "a"}, Event{ID: "y", Namespace: "a"})
			rqLease(t, q, "h", "a", 2, time.Minute)
			res, err := q.Ack(context.Background(), "h", []LeaseRef{{ID: "x", Attempt: 1}, {ID: "y", Attempt: 1}, {ID: "x", Attempt: 1}})
			if err != nil {
				t.Fatal(err)
			}
			want := []SettleStatus{SettleOK, SettleOK, SettleUnknown}
			for i, r := range res {
				if r.Status != want[i] {
					t.Errorf("settlement %d (%s): %v, want %v", i, r.ID, r.Status, want[i])
				}
			}
		})
	}
}
