package h3x

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// segmentFiles returns the sizes of dir's segment files, by name.
func segmentFiles(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, segmentsDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]int64)
	for _, e := range ents {
		info, err := e.Info()
		if err != nil {
			continue // removed meanwhile
		}
		out[e.Name()] = info.Size()
	}
	return out
}

func segmentBytes(t *testing.T, dir string) (total int64) {
	for _, n := range segmentFiles(t, dir) {
		total += n
	}
	return total
}

// withSegmentSize sets segmentSize for the test, and moves chunks out of
// mostly settled segments without waiting for moveQuiet.
func withSegmentSize(t *testing.T, n int64) {
	oldSize, oldQuiet := segmentSize, moveQuiet
	segmentSize, moveQuiet = n, 0
	t.Cleanup(func() { segmentSize, moveQuiet = oldSize, oldQuiet })
}

// storedPointers counts the chunk keys of namespace ns that hold a pointer
// and those that hold the chunk itself, in a closed queue's directory.
func storedPointers(t *testing.T, dir, ns string) (pointers, inPlace int) {
	t.Helper()
	withStoredDB(t, dir, func(db *badger.DB) error {
		return db.View(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: nsPrefix(keyEvent, ns)})
			defer it.Close()
			for it.Rewind(); it.Valid(); it.Next() {
				err := it.Item().Value(func(v []byte) error {
					if isSegPtr(v) {
						pointers++
					} else {
						inPlace++
					}
					return nil
				})
				if err != nil {
					return err
				}
			}
			return nil
		})
	})
	return pointers, inPlace
}

func segTestEvents(ns string, n, size int) []Event {
	return segTestEventsIDs("", ns, n, size)
}

// segTestEventsIDs is segTestEvents with prefix before every ID (a second
// batch of the same namespace).
func segTestEventsIDs(prefix, ns string, n, size int) []Event {
	evs := make([]Event, n)
	for i := range evs {
		evs[i] = Event{ID: fmt.Sprintf("%s%s-%05d", prefix, ns, i), Namespace: ns, Data: bytes.Repeat([]byte{byte('a' + i%26)}, size)}
	}
	return evs
}

func checkLeased(t *testing.T, ls []Lease, want []Event) {
	t.Helper()
	if len(ls) != len(want) {
		t.Fatalf("leased %d events, want %d", len(ls), len(want))
	}
	for i, l := range ls {
		if l.Event.ID != want[i].ID || !bytes.Equal(l.Event.Data, want[i].Data) {
			t.Fatalf("event %d: %s (%d bytes), want %s (%d bytes)", i, l.Event.ID, len(l.Event.Data), want[i].ID, len(want[i].Data))
		}
	}
}

// TestBadgerSegmentsHoldTheChunks: enqueued chunks go to segment files and
// Badger holds pointers to them; the events read back intact, also after
// a reopen, in both durability modes.
func TestBadgerSegmentsHoldTheChunks(t *testing.T) {
	segmentsOnly(t)
	for _, d := range []Durability{DurabilityFsync, DurabilityNoSync} {
		t.Run(fmt.Sprint(d), func(t *testing.T) {
			dir := t.TempDir()
			opts := QueueOptions{Durability: d}
			q := openTestBadger(t, dir, opts)
			evs := segTestEvents("n", 300, 200)
			for i := 0; i < len(evs); i += 100 {
				publishTest(t, q, evs[i:i+100]...)
			}
			if len(segmentFiles(t, dir)) == 0 {
				t.Fatal("no segment file written")
			}
			checkLeased(t, leaseAll(t, q, "h", 1000, "n"), evs)
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			if ptrs, inPlace := storedPointers(t, dir, "n"); ptrs != 3 || inPlace != 0 {
				t.Fatalf("stored %d pointers and %d chunks in place, want 3 and 0", ptrs, inPlace)
			}
			q = openTestBadger(t, dir, opts)
			checkLeased(t, leaseAll(t, q, "h", 1000, "n"), evs)
		})
	}
}

// TestBadgerSegmentsRemovedOnceSettled: once every chunk in a segment is
// acknowledged, the segment's file is removed; the one being written stays.
func TestBadgerSegmentsRemovedOnceSettled(t *testing.T) {
	withSegmentSize(t, 64<<10)
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	evs := segTestEvents("n", 2000, 500)
	for i := 0; i < len(evs); i += 100 {
		publishTest(t, q, evs[i:i+100]...)
	}
	if n := len(segmentFiles(t, dir)); n < 10 {
		t.Fatalf("%d segment files for 1 MB of events in segments of 64 KiB", n)
	}
	ls := leaseAll(t, q, "h", 2000, "n")
	checkLeased(t, ls, evs)
	ackAll(t, q, "h", ls)
	// The chunks' deletions ride on the next groups; segments go once
	// their deletions have completed.
	deadline := time.Now().Add(10 * time.Second)
	for len(segmentFiles(t, dir)) > 1 && time.Now().Before(deadline) {
		publishTest(t, q, Event{Namespace: "tick"})
		time.Sleep(10 * time.Millisecond)
	}
	if files := segmentFiles(t, dir); len(files) > 1 {
		t.Fatalf("%d segment files left after acknowledging everything: %v", len(files), files)
	}
	// Nothing of the chunks is kept in memory once their changes are done.
	q.segs.mu.RLock()
	pending := len(q.segs.pending)
	q.segs.mu.RUnlock()
	if pending != 0 {
		t.Errorf("%d chunk changes still pending", pending)
	}
	q = reopenTestBadger(t, q, dir, QueueOptions{Durability: DurabilityNoSync})
	if st, err := q.Stats(context.Background(), "n"); err != nil || st[0].Ready != 0 {
		t.Fatalf("after reopen: %+v %v", st, err)
	}
}

// TestBadgerSegmentsMoveLongLivedChunks: a namespace nobody consumes
// shares the segments of a busy one; once the busy one's events are
// acknowledged, the long-lived chunks are moved out, so the segments'
// total stays within a bound of what is live, and the moved events read
// back intact, also after a reopen.
func TestBadgerSegmentsMoveLongLivedChunks(t *testing.T) {
	segmentsOnly(t)
	for _, d := range []Durability{DurabilityFsync, DurabilityNoSync} {
		t.Run(fmt.Sprint(d), func(t *testing.T) {
			withSegmentSize(t, 64<<10)
			dir := t.TempDir()
			opts := QueueOptions{Durability: d}
			q := openTestBadger(t, dir, opts)
			var kept []Event
			for round := range 40 {
				keep := Event{ID: fmt.Sprintf("keep-%03d", round), Namespace: "keep", Data: []byte(strings.Repeat("k", 100))}
				kept = append(kept, keep)
				busy := segTestEvents(fmt.Sprintf("busy%d", round%2), 50, 500)
				for i := range busy {
					busy[i].ID = "" // the queue assigns one
				}
				publishTest(t, q, append(busy, keep)...)
				ls := leaseAll(t, q, "h", 100, "busy0", "busy1")
				ackAll(t, q, "h", ls)
			}
			deadline := time.Now().Add(10 * time.Second)
			for segmentBytes(t, dir) > 3*segmentSize && time.Now().Before(deadline) {
				publishTest(t, q, Event{Namespace: "tick"})
				time.Sleep(5 * time.Millisecond)
			}
			// Live: 40 events of about 100 bytes. Written: about 1 MB.
			if total := segmentBytes(t, dir); total > 3*segmentSize {
				t.Fatalf("segments hold %d bytes for 4 KB of live events (segments of %d bytes): %v", total, segmentSize, segmentFiles(t, dir))
			}
			checkLeased(t, leaseAll(t, q, "h", 100, "keep"), kept)
			q = reopenTestBadger(t, q, dir, opts)
			checkLeased(t, leaseAll(t, q, "h2", 100, "keep"), kept)
		})
	}
}

// TestBadgerSegmentDamageIsSetAside: a chunk whose bytes changed on disk
// (checksum), or whose segment is gone, is never delivered: it is logged as
// lost and set aside, and the namespace's other events are still delivered
// (after a clean close, and after a crash, whose open recounts).
func TestBadgerSegmentDamageIsSetAside(t *testing.T) {
	segmentsOnly(t)
	for _, damage := range []string{"flip", "remove"} {
		for _, crash := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/crash=%v", damage, crash), func(t *testing.T) {
				withSegmentSize(t, 1) // a segment per group
				dir := t.TempDir()
				q := openTestBadger(t, dir, QueueOptions{})
				bad := segTestEvents("n", 10, 100)
				publishTest(t, q, bad...) // segment 1
				good := segTestEventsIDs("good-", "n", 10, 100)
				publishTest(t, q, good...) // segment 2
				if crash {
					dir = copyLive(t, dir)
				}
				if err := q.Close(); err != nil {
					t.Fatal(err)
				}
				path := filepath.Join(dir, segmentsDir, fmt.Sprintf("%012d%s", 1, segmentSuffix))
				if damage == "remove" {
					if err := os.Remove(path); err != nil {
						t.Fatal(err)
					}
				} else {
					b, err := os.ReadFile(path)
					if err != nil {
						t.Fatal(err)
					}
					b[len(b)/2] ^= 0xff
					if err := os.WriteFile(path, b, 0o644); err != nil {
						t.Fatal(err)
					}
				}
				h := &captureHandler{}
				opts := QueueOptions{Logger: slog.New(h)}
				q = openTestBadger(t, dir, opts)
				ls, err := q.Lease(context.Background(), LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 100, AckDeadline: time.Minute})
				if err != nil {
					t.Fatalf("Lease with a damaged chunk: %v", err)
				}
				checkLeased(t, ls, good)
				h.mu.Lock()
				logged := false
				for _, r := range h.recs {
					logged = logged || (r.Level == slog.LevelError && strings.Contains(r.Message, "events lost"))
				}
				h.mu.Unlock()
				if !logged {
					t.Error("the lost chunk was not logged as an error")
				}
				ackAll(t, q, "h", ls)
				// Reopened, the lost chunk is gone and counted out.
				q = reopenTestBadger(t, q, dir, opts)
				st, err := q.Stats(context.Background(), "n")
				if err != nil || st[0].Ready != 0 || st[0].Leased != 0 {
					t.Fatalf("after reopening: %+v, %v", st, err)
				}
				if err := q.Close(); err != nil {
					t.Fatal(err)
				}
				if n := storedKeys(t, dir, keyEvent, "n"); n != 0 {
					t.Errorf("%d chunks of n still stored", n)
				}
			})
		}
	}
}

// TestBadgerSegmentWriteFailureStoresInBadger: when the segment cannot be
// written, the group's chunks are stored in Badger itself and the publish
// succeeds; the next group starts a new segment.
func TestBadgerSegmentWriteFailureStoresInBadger(t *testing.T) {
	segmentsOnly(t)
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	first := segTestEvents("a", 5, 100)
	publishTest(t, q, first...)
	// The writer's next write fails: its file is swapped for one open
	// only for reading.
	q.segs.mu.Lock()
	rw := q.segs.active.f
	ro, err := os.Open(rw.Name())
	if err != nil {
		q.segs.mu.Unlock()
		t.Fatal(err)
	}
	q.segs.active.f = ro
	q.segs.mu.Unlock()
	defer rw.Close()
	second := segTestEvents("b", 5, 100)
	publishTest(t, q, second...)
	third := segTestEvents("c", 5, 100)
	publishTest(t, q, third...)
	if n := len(segmentFiles(t, dir)); n != 2 {
		t.Errorf("%d segment files, want 2 (the failed one and the next)", n)
	}
	for _, evs := range [][]Event{first, second, third} {
		checkLeased(t, leaseAll(t, q, "h", 10, evs[0].Namespace), evs)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if ptrs, inPlace := storedPointers(t, dir, "b"); ptrs != 0 || inPlace != 1 {
		t.Errorf("namespace b: %d pointers, %d chunks in place, want 0 and 1", ptrs, inPlace)
	}
	if ptrs, inPlace := storedPointers(t, dir, "c"); ptrs != 1 || inPlace != 0 {
		t.Errorf("namespace c: %d pointers, %d chunks in place, want 1 and 0", ptrs, inPlace)
	}
	q = openTestBadger(t, dir, QueueOptions{})
	for _, evs := range [][]Event{first, second, third} {
		checkLeased(t, leaseAll(t, q, "h", 10, evs[0].Namespace), evs)
	}
}

// TestBadgerSegmentSyncFailureFailsThePublish: with DurabilityFsync, a
// publish whose segment cannot be synced is not acknowledged as durable.
func TestBadgerSegmentSyncFailureFailsThePublish(t *testing.T) {
	segmentsOnly(t)
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityFsync})
	injected := errors.New("injected segment sync failure")
	fdatasyncFn = func(f *os.File) error {
		if strings.HasSuffix(f.Name(), segmentSuffix) {
			return injected
		}
		return fdatasync(f)
	}
	defer func() { fdatasyncFn = fdatasync }()
	_, err := q.Enqueue(context.Background(), segTestEvents("n", 3, 100))
	if !errors.Is(err, injected) {
		t.Fatalf("Enqueue with a failing segment sync: %v, want the sync's error", err)
	}
}

// TestBadgerFormat2Opens: a directory of format 2 (chunks in Badger) opens,
// its chunks read back, and it is the current format from then on; a later format is
// refused by name.
func TestBadgerFormat2Opens(t *testing.T) {
	segmentsOnly(t)
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	q.segs.disabled.Store(true) // as format 2 stored them
	evs := segTestEvents("n", 5, 100)
	publishTest(t, q, evs...)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	setStored(t, dir, metaFormat, []byte{2})
	q = openTestBadger(t, dir, QueueOptions{})
	checkLeased(t, leaseAll(t, q, "h", 10, "n"), evs)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	checkStoredFormat(t, dir)
	setStored(t, dir, metaFormat, []byte{storageFormat + 1})
	q2, err := OpenBadgerQueue(dir, QueueOptions{})
	if err == nil {
		q2.Close()
		t.Fatal("a directory of a later format opened")
	}
	if !strings.Contains(err.Error(), "unknown storage format") {
		t.Errorf("error %q", err)
	}
}

func TestSegPtrCodec(t *testing.T) {
	l := segLoc{seg: 7, off: 1 << 40, n: 12345, crc: 0xdeadbeef}
	v := encodeSegPtr(nil, l)
	if len(v) > maxSegPtrLen || !isSegPtr(v) {
		t.Fatalf("pointer %x", v)
	}
	if got, err := decodeSegPtr(v); err != nil || got != l {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	for _, bad := range [][]byte{{0}, {0, 1}, append(v[:len(v)-1:len(v)-1], 1, 2), {0, 1, 1, 0, 0, 0, 0, 0}} {
		if _, err := decodeSegPtr(bad); !errors.Is(err, errCorrupt) {
			t.Errorf("decode %x: %v, want errCorrupt", bad, err)
		}
	}
	if ns, seq, ok := decodeSeqKey(seqKey(keyEvent, "orders", 42), keyEvent); !ok || ns != "orders" || seq != 42 {
		t.Errorf("decodeSeqKey: %q %d %v", ns, seq, ok)
	}
}

// segmentsOnly makes every group of the test's Badger queues store its
// chunks in a segment, however small (with DurabilityFsync, small groups
// are stored in Badger: fsyncInlineBytes). For the tests of the segments
// themselves.
func segmentsOnly(t testing.TB) { withInlineBytes(t, 0) }

// withInlineBytes sets fsyncInlineBytes for the test.
func withInlineBytes(t testing.TB, n int) {
	old := fsyncInlineBytes
	fsyncInlineBytes = n
	t.Cleanup(func() { fsyncInlineBytes = old })
}
