package h3x

import (
	"context"
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// leaseRecPublish enqueues chunks calls of per events each into ns (one
// Enqueue call, one group, one chunk each) and returns the IDs.
func leaseRecPublish(t testing.TB, q Queue, ns string, chunks, per int) []string {
	t.Helper()
	var ids []string
	for c := range chunks {
		evs := make([]Event, per)
		for i := range evs {
			evs[i] = Event{ID: fmt.Sprintf("%s-%d-%d", ns, c, i), Namespace: ns, Data: []byte("x")}
		}
		ids = append(ids, publishTest(t, q, evs...)...)
	}
	return ids
}

// leaseRecLeaseAll leases every event of ns, limit at a time.
func leaseRecLeaseAll(t *testing.T, q Queue, ns string, want int) []Lease {
	t.Helper()
	var out []Lease
	for len(out) < want {
		ls := leaseAll(t, q, "h", want-len(out), ns)
		if len(ls) == 0 {
			break
		}
		out = append(out, ls...)
	}
	if len(out) != want {
		t.Fatalf("leased %d of %d", len(out), want)
	}
	return out
}

// The tests below are a review's (the twenty-second session's, by a
// helper): they passed on the change they reviewed.

// TestLeaseRecordsMixedLayoutsAfterUpgradeCrash: a format 3 directory with
// old records opens (format 4), some events are leased again (compact
// records, latest), then the process is killed (no Close): each event
// comes back with its latest attempt, from either layout.
func TestLeaseRecordsMixedLayoutsAfterUpgradeCrash(t *testing.T) {
	dir := t.TempDir()
	q := mustOpenBadger(t, dir, QueueOptions{})
	q.(*badgerQueue).encodeRec = encodeLeaseRecFormat3
	leaseRecPublish(t, q, "a", 2, 5)
	leaseRecPublish(t, q, "b", 1, 5)
	first := leaseRecLeaseAll(t, q, "a", 10)
	leaseRecLeaseAll(t, q, "b", 5)
	// Attempt 2 of a's first three.
	var refs []LeaseRef
	for _, l := range first[:3] {
		refs = append(refs, LeaseRef{ID: l.Event.ID, Attempt: l.Attempt})
	}
	if _, err := q.Nack(context.Background(), "h", refs, 0, "again"); err != nil {
		t.Fatal(err)
	}
	if ls := leaseAll(t, q, "h", 3, "a"); len(ls) != 3 || ls[0].Attempt != 2 {
		t.Fatalf("second lease: %+v", ls)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	withStoredDB(t, dir, func(db *badger.DB) error {
		return db.Update(func(txn *badger.Txn) error { return txn.Set(metaFormat, []byte{3}) })
	})
	q = mustOpenBadger(t, dir, QueueOptions{}) // upgrades to 4; compact records from here
	// Everything is ready again: a's first three at attempt 2, the rest 1.
	ls := leaseAll(t, q, "h", 2, "a") // the two lowest: a's first two, attempt 3 now (compact records)
	if len(ls) != 2 || ls[0].Attempt != 3 || ls[1].Attempt != 3 {
		t.Fatalf("after upgrade: %+v", ls)
	}
	time.Sleep(100 * time.Millisecond)
	crashed := copyLive(t, dir) // kill -9
	q.Close()

	q = mustOpenBadger(t, crashed, QueueOptions{})
	defer q.Close()
	got := make(map[string]int)
	for _, l := range leaseRecLeaseAll(t, q, "a", 10) {
		got[l.Event.ID] = l.Attempt
	}
	for _, l := range leaseRecLeaseAll(t, q, "b", 5) {
		got[l.Event.ID] = l.Attempt
	}
	want := map[string]int{"a-0-0": 4, "a-0-1": 4, "a-0-2": 3, "a-0-3": 2, "a-0-4": 2, "a-1-0": 2, "a-1-4": 2, "b-0-0": 2, "b-0-4": 2}
	for id, w := range want {
		if got[id] != w {
			t.Errorf("after a crash following the upgrade: %s attempt %d, want %d", id, got[id], w)
		}
	}
	if len(got) != 15 {
		t.Errorf("leased %d events, want 15", len(got))
	}
}

// TestLeaseRecordsDeadLettersAcrossCrash: deliveries from a dead-letter
// namespace (chunks of one moved event each, stored in Badger) keep their
// attempts across a kill -9, as do deliveries of a namespace whose events
// span several chunks with a gap (a chunk fully acked and deleted).
func TestLeaseRecordsDeadLettersAcrossCrash(t *testing.T) {
	dir := t.TempDir()
	opts := QueueOptions{MaxAttempts: 1}
	q := mustOpenBadger(t, dir, opts)
	leaseRecPublish(t, q, "n", 3, 4)
	ls := leaseRecLeaseAll(t, q, "n", 12)
	// Chunk 1 acked (deleted); chunk 0 and 2 nacked: dead-lettered.
	ackAll(t, q, "h", ls[4:8])
	var refs []LeaseRef
	for _, l := range append(append([]Lease{}, ls[:4]...), ls[8:]...) {
		refs = append(refs, LeaseRef{ID: l.Event.ID, Attempt: l.Attempt})
	}
	if _, err := q.Nack(context.Background(), "h", refs, 0, "bad"); err != nil {
		t.Fatal(err)
	}
	dlq := DeadLetterNamespace("n")
	time.Sleep(100 * time.Millisecond)
	d1 := leaseRecLeaseAll(t, q, dlq, 8)
	for _, l := range d1 {
		if l.Attempt != 1 {
			t.Fatalf("dead letter first lease: %+v", l)
		}
	}
	// Give back half, lease them again: attempt 2.
	var back []LeaseRef
	for _, l := range d1[:4] {
		back = append(back, LeaseRef{ID: l.Event.ID, Attempt: l.Attempt})
	}
	if _, err := q.Nack(context.Background(), "h", back, 0, "again"); err != nil {
		t.Fatal(err)
	}
	d2 := leaseAll(t, q, "h2", 4, dlq)
	if len(d2) != 4 || d2[0].Attempt != 2 {
		t.Fatalf("dead letter second lease: %+v", d2)
	}
	time.Sleep(100 * time.Millisecond)
	crashed := copyLive(t, dir)
	q.Close()

	q = mustOpenBadger(t, crashed, opts)
	defer q.Close()
	want := make(map[string]int)
	for _, l := range d1 {
		want[l.Event.ID] = 1
	}
	for _, l := range d2 {
		want[l.Event.ID] = 2
	}
	st := statsOf(t, q, dlq, "n")
	if st[0].Ready != 8 || st[1].Ready != 0 {
		t.Errorf("after reopen: %+v", st)
	}
	// MaxAttempts does not apply to dead-letter namespaces.
	got := leaseRecLeaseAll(t, q, dlq, 8)
	for _, l := range got {
		if l.Attempt != want[l.Event.ID]+1 {
			t.Errorf("after reopen: dead letter %s attempt %d, want %d", l.Event.ID, l.Attempt, want[l.Event.ID]+1)
		}
	}
	ackAll(t, q, "h", got)
	st = statsOf(t, q, dlq)
	if st[0].Ready+st[0].Leased != 0 || st[0].Bytes != 0 {
		t.Errorf("after acking: %+v", st[0])
	}
}

// TestLeaseRecordsInjectedGapAndLayouts: records naming an event of a
// deleted chunk (its seek lands on the chunk before), events of the next
// chunk, and the same event in both layouts (the latest record wins).
func TestLeaseRecordsInjectedGapAndLayouts(t *testing.T) {
	dir := t.TempDir()
	q := mustOpenBadger(t, dir, QueueOptions{})
	leaseRecPublish(t, q, "n", 3, 4)
	ls := leaseRecLeaseAll(t, q, "n", 12)
	ackAll(t, q, "h", ls[4:8]) // chunk 1: deleted
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	var firsts []uint64
	var hwm uint64
	withStoredDB(t, dir, func(db *badger.DB) error {
		return db.Update(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: nsPrefix(keyEvent, "n")})
			for it.Rewind(); it.Valid(); it.Next() {
				firsts = append(firsts, keySeq(it.Item().Key()))
			}
			it.Close()
			item, err := txn.Get(metaHWM)
			if err != nil {
				return err
			}
			v, _ := item.ValueCopy(nil)
			hwm = binary.BigEndian.Uint64(v)
			if len(firsts) != 2 {
				return fmt.Errorf("chunks %v, want 2", firsts)
			}
			a, c := firsts[0], firsts[1]
			gap := a + 5 // chunk 1's second event
			// Compact, later than the queue's own: a0 at 7, a gap entry,
			// c's events at 3, 4, 5, 6 (out of order, mixed with a1).
			rec := encodeLeaseRec([]recEntry{{ns: "n", seq: a, attempt: 7}, {ns: "n", seq: gap, attempt: 9}, {ns: "n", seq: c + 3, attempt: 6},
				{ns: "n", seq: a + 1, attempt: 2}, {ns: "n", seq: c, attempt: 3}, {ns: "n", seq: c + 1, attempt: 4}, {ns: "n", seq: c + 2, attempt: 5}})
			if err := txn.Set(leaseRecKey(hwm+10), rec); err != nil {
				return err
			}
			// Old layout, later still, for a2: attempt 8 (with a stale ID:
			// the record's own is what a format 3 record gives).
			old := encodeLeaseRecFormat3([]recEntry{{ns: "n", seq: a + 2, id: "n-0-2", size: 1 + 1 + 5 + 8, enq: 1, attempt: 8}})
			if err := txn.Set(leaseRecKey(hwm+11), old); err != nil {
				return err
			}
			// A compact record earlier than that one for a2 again (loses).
			return txn.Set(leaseRecKey(hwm+5), encodeLeaseRec([]recEntry{{ns: "n", seq: a + 2, attempt: 20}}))
		})
	})
	q = mustOpenBadger(t, dir, QueueOptions{})
	defer q.Close()
	got := make(map[string]int)
	for _, l := range leaseRecLeaseAll(t, q, "n", 8) {
		got[l.Event.ID] = l.Attempt
	}
	want := map[string]int{"n-0-0": 8, "n-0-1": 3, "n-0-2": 9, "n-0-3": 2, "n-2-0": 4, "n-2-1": 5, "n-2-2": 6, "n-2-3": 7}
	for id, w := range want {
		if got[id] != w {
			t.Errorf("%s: attempt %d, want %d", id, got[id], w)
		}
	}
}
