package h3x

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// leaseRecordEvents enqueues, in three calls (so several chunks), events of
// namespaces a and b, of different sizes, and two of namespace c; it
// returns them by ID.
func leaseRecordEvents(t *testing.T, q Queue) map[string]Event {
	t.Helper()
	byID := make(map[string]Event)
	for call := range 3 {
		var evs []Event
		for i := range 4 {
			for _, ns := range []string{"a", "b"} {
				ev := Event{ID: fmt.Sprintf("%s-%d-%d", ns, call, i), Namespace: ns, Type: "t",
					Data: bytes.Repeat([]byte{'x'}, 10+100*i), Metadata: map[string]string{"k": strings.Repeat("v", call)}}
				evs = append(evs, ev)
				byID[ev.ID] = ev
			}
		}
		if call == 0 {
			for i := range 2 {
				ev := Event{ID: fmt.Sprintf("c-%d", i), Namespace: "c", Data: []byte("c")}
				evs = append(evs, ev)
				byID[ev.ID] = ev
			}
		}
		publishTest(t, q, evs...)
	}
	return byID
}

// checkLeaseRecordsRestored leases some of the events twice and some once
// (two namespaces, several chunks, a redelivery among fresh events) and
// all of namespace c, closes the queue, reopens it (by reopen) and checks
// what the lease records gave back: each event's attempt count, its ID and
// data, the namespaces' counts, stored bytes and oldest age (c's from its
// lease records alone), and that acking everything leaves nothing counted.
func checkLeaseRecordsRestored(t *testing.T, dir string, opts QueueOptions, encode func([]recEntry) []byte, reopen func(Queue) Queue) {
	t.Helper()
	ctx := context.Background()
	before := time.Now()
	q := mustOpenBadger(t, dir, opts)
	q.(*badgerQueue).encodeRec = encode
	byID := leaseRecordEvents(t, q)
	first := leaseAll(t, q, "h", 5, "a", "b")
	refs := []LeaseRef{{ID: first[1].Event.ID, Attempt: 1}, {ID: first[3].Event.ID, Attempt: 1}}
	if _, err := q.Nack(ctx, "h", refs, 0, "again"); err != nil {
		t.Fatal(err)
	}
	second := leaseAll(t, q, "h", 7, "b", "a") // the two nacked among them
	third := leaseAll(t, q, "h", 10, "c")
	want := make(map[string]int) // attempts so far
	for _, l := range append(append(first, second...), third...) {
		want[l.Event.ID] = l.Attempt
	}
	if want[refs[0].ID] != 2 || want[refs[1].ID] != 2 || len(want) != 12 {
		t.Fatalf("before reopen: attempts %v", want)
	}
	stBefore := statsOf(t, q, "a", "b", "c")

	q = reopen(q)
	defer q.Close()
	st := statsOf(t, q, "a", "b", "c")
	for i, ready := range []int{12, 12, 2} {
		if st[i].Ready != ready || st[i].Bytes != stBefore[i].Bytes {
			t.Errorf("after reopen %s: ready %d, %d bytes; want %d, %d bytes", st[i].Namespace, st[i].Ready, st[i].Bytes, ready, stBefore[i].Bytes)
		}
		if st[i].OldestReady <= 0 || st[i].OldestReady > time.Since(before) {
			t.Errorf("after reopen %s: oldest ready %v, want within %v (the enqueue time)", st[i].Namespace, st[i].OldestReady, time.Since(before))
		}
	}
	all := leaseAll(t, q, "h2", 100, "a", "b", "c")
	if len(all) != len(byID) {
		t.Fatalf("after reopen: leased %d of %d events", len(all), len(byID))
	}
	var acks []LeaseRef
	for _, l := range all {
		ev, ok := byID[l.Event.ID]
		if !ok || !bytes.Equal(l.Event.Data, ev.Data) || l.Event.Namespace != ev.Namespace || l.Event.Metadata["k"] != ev.Metadata["k"] {
			t.Fatalf("after reopen: leased %+v, not an enqueued event", l.Event)
		}
		if l.Attempt != want[l.Event.ID]+1 {
			t.Errorf("after reopen: %s delivered as attempt %d, want %d", l.Event.ID, l.Attempt, want[l.Event.ID]+1)
		}
		acks = append(acks, LeaseRef{ID: l.Event.ID, Attempt: l.Attempt})
	}
	res, err := q.Ack(ctx, "h2", acks)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range res {
		if r.Status != SettleOK {
			t.Fatalf("ack %s: %v", acks[i].ID, r.Status)
		}
	}
	for _, s := range statsOf(t, q, "a", "b", "c") {
		if s.Ready+s.Leased != 0 || s.Bytes != 0 {
			t.Errorf("after acking everything, %s: %+v", s.Namespace, s)
		}
	}
}

// TestCompactLeaseRecordsAcrossReopen: lease records list only each
// delivery's namespace, sequence number and attempt (storage format 4);
// a reopened queue reads the rest from the events' chunks, stored in
// Badger or in segment files.
func TestCompactLeaseRecordsAcrossReopen(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T)
	}{
		{"chunks in Badger", func(t *testing.T) {}},
		{"chunks in segments", func(t *testing.T) { segmentsOnly(t) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.setup(t)
			dir := t.TempDir()
			var written [][]byte // by the writer goroutine, read once the queue is closed
			encode := func(entries []recEntry) []byte {
				v := encodeLeaseRec(entries)
				written = append(written, v)
				return v
			}
			checkLeaseRecordsRestored(t, dir, QueueOptions{}, encode, func(q Queue) Queue {
				return closeAndReopen(t, q, dir, QueueOptions{})
			})
			if len(written) == 0 {
				t.Fatal("no lease record written")
			}
			for _, v := range written {
				if len(v) < 2 || v[0] != 0 || v[1] != leaseRecCompact {
					t.Errorf("lease record %x is not compact", v)
				}
			}
		})
	}
}

// TestFormat3LeaseRecordsOpen: a directory of storage format 3, whose lease
// records hold each delivery's ID, size and enqueue time, opens with its
// attempt counts, and is format 4 from then on.
func TestFormat3LeaseRecordsOpen(t *testing.T) {
	dir := t.TempDir()
	checkLeaseRecordsRestored(t, dir, QueueOptions{}, encodeLeaseRecFormat3, func(q Queue) Queue {
		if err := q.Close(); err != nil {
			t.Fatal(err)
		}
		n := 0
		withStoredDB(t, dir, func(db *badger.DB) error {
			return db.Update(func(txn *badger.Txn) error {
				it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyLeaseRec}})
				defer it.Close()
				for it.Rewind(); it.Valid(); it.Next() {
					v, err := it.Item().ValueCopy(nil)
					if err != nil {
						return err
					}
					if len(v) > 0 && v[0] == 0 {
						t.Errorf("lease record %x is compact", v)
					}
					n++
				}
				return txn.Set(metaFormat, []byte{3})
			})
		})
		if n == 0 {
			t.Fatal("no lease record stored")
		}
		return mustOpenBadger(t, dir, QueueOptions{})
	})
	checkStoredFormat(t, dir)
}

// BenchmarkBadgerReopenLeased: opening a queue with 49,152 events out on
// lease in 48 full chunks (each read once for its deliveries), with lease
// records of format 4 and of format 3.
func BenchmarkBadgerReopenLeased(b *testing.B) {
	const chunks, per = 48, 1024
	for _, bc := range []struct {
		name   string
		encode func([]recEntry) []byte
	}{{"compact", encodeLeaseRec}, {"format3", encodeLeaseRecFormat3}} {
		b.Run(bc.name, func(b *testing.B) {
			dir := b.TempDir()
			q := openTestBadger(b, dir, QueueOptions{})
			q.encodeRec = bc.encode
			leaseRecPublish(b, q, "n", chunks, per)
			if ls := leaseAll(b, q, "h", chunks*per, "n"); len(ls) != chunks*per {
				b.Fatalf("leased %d", len(ls))
			}
			if err := q.Close(); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for range b.N {
				q, err := OpenBadgerQueue(dir, QueueOptions{})
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				st, err := q.Stats(context.Background(), "n")
				if err != nil || st[0].Ready != chunks*per {
					b.Fatalf("after reopen: %+v, %v", st, err)
				}
				if err := q.Close(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
