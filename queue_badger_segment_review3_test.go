package h3x

// Third review of segment storage (RELIABILITY.md findings 146-150). Each
// test's comment tells the defect as it was before its fix.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// TestBadgerSegmentSyncOfEvictedFile: with DurabilityFsync, dirtyFiles
// clears a segment's dirty flag when the completer takes it to sync, before
// the sync runs. If the writer seals that segment meanwhile (the next
// group), seal sees it clean and makes it read-only (readOnly), so any
// read of another segment can evict it (closeFile) while syncFiles is about
// to fdatasync it (or is between files): the fdatasync of a closed
// descriptor fails (EBADF), the queue takes it for a failed sync
// (syncBroken) and fails that publish and every later durable write until
// reopened, with a healthy disk.
func TestBadgerSegmentSyncOfEvictedFile(t *testing.T) {
	segmentsOnly(t)
	withSegmentSize(t, 1) // a segment per group
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityFsync})
	for i := range maxOpenSegments + 6 {
		publishTest(t, q, Event{ID: fmt.Sprintf("e%03d", i), Namespace: "n", Data: []byte("x")})
	}
	// Block the sync of the next segment written.
	var mu sync.Mutex
	armed := true
	entered := make(chan string, 1)
	release := make(chan struct{})
	fdatasyncFn = func(f *os.File) error {
		mu.Lock()
		block := armed && strings.HasSuffix(f.Name(), segmentSuffix)
		if block {
			armed = false
		}
		mu.Unlock()
		if block {
			entered <- f.Name()
			select {
			case <-release:
			case <-time.After(20 * time.Second):
			}
		}
		return fdatasync(f)
	}
	t.Cleanup(func() { fdatasyncFn = fdatasync })

	ctx := context.Background()
	p1 := make(chan error, 1)
	go func() {
		_, err := q.Enqueue(ctx, []Event{{ID: "p1", Namespace: "n", Data: []byte("x")}})
		p1 <- err
	}()
	var name string
	select {
	case name = <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("no segment sync")
	}
	s := q.segs
	s.mu.RLock()
	a := s.active
	s.mu.RUnlock()
	if a == nil || segmentPath(s.dir, a.id) != name {
		t.Fatalf("blocked sync of %s, active %v", name, a)
	}
	// The next group seals a (its dirty flag was cleared by dirtyFiles).
	p2 := make(chan error, 1)
	go func() {
		_, err := q.Enqueue(ctx, []Event{{ID: "p2", Namespace: "n", Data: []byte("x")}})
		p2 <- err
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.mu.RLock()
		sealed := a.sealed
		s.mu.RUnlock()
		if sealed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a not sealed")
		}
		time.Sleep(time.Millisecond)
	}
	// Reads of other segments (a refill, planMoves) open their files and
	// evict others; a, read-only and unused, is one of them.
	evicted := false
	for i := 0; i < 5000 && !evicted; i++ {
		s.mu.RLock()
		var ids []uint64
		for id, sg := range s.segs {
			if sg.f == nil && sg != a {
				ids = append(ids, id)
			}
		}
		s.mu.RUnlock()
		for _, id := range ids {
			if _, rel, err := s.reader(id); err == nil {
				rel()
			}
			s.mu.RLock()
			evicted = a.f == nil
			s.mu.RUnlock()
			if evicted {
				break
			}
		}
	}
	t.Logf("segment %d sealed while its sync was in flight; evicted: %v (reading %v)", a.id, evicted, a.reading)
	close(release)
	for _, c := range []chan error{p1, p2} {
		select {
		case err := <-c:
			if err != nil {
				t.Errorf("publish failed with a healthy disk: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("publish did not return")
		}
	}
	if _, err := q.Enqueue(ctx, []Event{{ID: "p3", Namespace: "n", Data: []byte("x")}}); err != nil {
		t.Errorf("a later publish: %v", err)
	}
}

// TestBadgerSegmentWrittenFilesOpenBoundedSyncWrites: finding 142's fix
// makes a sealed segment read-only only once it is clean; with
// DurabilityFsync and the escape hatch's SyncWrites (syncEach), each write
// is synced by appendRecords but still marks the segment dirty, and nothing
// ever syncs it again (q.fsync is false: the completer never calls
// syncFiles), so every segment this run wrote keeps its descriptor until
// removed.
func TestBadgerSegmentWrittenFilesOpenBoundedSyncWrites(t *testing.T) {
	segmentsOnly(t)
	checkWrittenFilesBounded(t, QueueOptions{Durability: DurabilityFsync, Badger: func(o *badger.Options) { o.SyncWrites = true }}, maxOpenSegments+40)
}

// TestBadgerSegmentMoveDestinationNameSynced: without DurabilityFsync,
// finding 145's fix syncs Badger's files before removing a segment chunks
// were moved out of, and planMoves fdatasyncs the moved copies; but the
// segment they were moved to was created (create) without syncing its
// directory entry (only DurabilityFsync does), and syncFilesLocked syncs
// Badger's directory, not dir/segments. fdatasync does not make a new
// file's name durable (POSIX; create's own comment says so for
// DurabilityFsync): a kernel crash after the old segment's removal can
// leave the new pointer naming a segment file that does not exist, losing
// an event acknowledged long before: what finding 145 was to prevent.
func TestBadgerSegmentMoveDestinationNameSynced(t *testing.T) {
	withSegmentSize(t, 4096)
	dir := t.TempDir()
	segDir := filepath.Join(dir, segmentsDir)
	var mu sync.Mutex
	var log []string // "sync-dir" and "create N" events, in order
	syncPathFn = func(p string) error {
		if filepath.Clean(p) == segDir {
			mu.Lock()
			log = append(log, "sync-dir")
			mu.Unlock()
		}
		return fsyncPath(p)
	}
	t.Cleanup(func() { syncPathFn = fsyncPath })
	opts := QueueOptions{Durability: DurabilityNoSync}
	q := openTestBadger(t, dir, opts)
	keep := Event{ID: "keep-1", Namespace: "keep", Data: []byte(strings.Repeat("k", 50))}
	busy := segTestEvents("busy", 10, 500)
	publishTest(t, q, append([]Event{keep}, busy...)...)
	publishTest(t, q, Event{ID: "tick-1", Namespace: "tick"}) // seals segment 1, creates 2
	var acks []Lease
	for _, l := range leaseAll(t, q, "h", 100, "keep", "busy") {
		if l.Event.Namespace == "busy" {
			acks = append(acks, l)
		}
	}
	ackAll(t, q, "h", acks)
	first := segmentPath(q.segs.dir, 1)
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(first); err != nil {
			break
		}
		publishTest(t, q, Event{ID: fmt.Sprintf("tick-x%d", i), Namespace: "tick"})
		time.Sleep(2 * time.Millisecond)
	}
	if _, err := os.Stat(first); err == nil {
		t.Fatal("segment 1 was never emptied by a move")
	}
	// keep's chunk now lives in a segment created by this run.
	var keepSeg uint64
	err := q.ts.view(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: nsPrefix(keyEvent, "keep")})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			l, ok := storedLoc(txn, chunkID{"keep", keySeq(it.Item().Key())})
			if !ok {
				return fmt.Errorf("keep's chunk has no pointer")
			}
			keepSeg = l.seg
			return nil
		}
		return fmt.Errorf("no chunk of keep")
	})
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("keep's chunk moved to segment %d; segment 1 removed; syncs of %s: %v", keepSeg, segDir, log)
	if len(log) == 0 {
		t.Fatalf("segment 1 removed after its chunk moved to segment %d, whose directory entry was never synced", keepSeg)
	}
}

// TestBadgerSegmentMoveRetriedAfterWriteFailure: planMoves records how far
// it read a segment (sg.scan) before it writes the copies (appendRecords);
// if that write fails, it returns no move, but the scan has passed the
// live chunks it had picked: they are never picked again, and the mostly
// settled segment stays until the next open. (Here the write failure is
// injected by disabling segments for one group.)
func TestBadgerSegmentMoveRetriedAfterWriteFailure(t *testing.T) {
	withSegmentSize(t, 4096)
	moveQuiet = time.Hour
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	keep := Event{ID: "keep-1", Namespace: "keep", Data: []byte(strings.Repeat("k", 50))}
	publishTest(t, q, append([]Event{keep}, segTestEvents("busy", 10, 500)...)...)
	publishTest(t, q, Event{ID: "tick-1", Namespace: "tick"}) // seals segment 1
	var acks []Lease
	for _, l := range leaseAll(t, q, "h", 100, "keep", "busy") {
		if l.Event.Namespace == "busy" {
			acks = append(acks, l)
		}
	}
	ackAll(t, q, "h", acks)
	publishTest(t, q, Event{ID: "tick-2", Namespace: "tick"}) // deletes busy's chunk
	publishTest(t, q, Event{ID: "tick-3", Namespace: "tick"})
	// The next group's move fails to be written.
	q.segs.disabled.Store(os.Getenv("H3X_R3_CONTROL") == "")
	moveQuiet = 0
	publishTest(t, q, Event{ID: "tick-4", Namespace: "tick"})
	q.segs.disabled.Store(false)
	first := segmentPath(q.segs.dir, 1)
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(first); err != nil {
			return // moved later: fine
		}
		publishTest(t, q, Event{ID: fmt.Sprintf("tick-x%d", i), Namespace: "tick"})
		time.Sleep(2 * time.Millisecond)
	}
	q.segs.mu.RLock()
	sg := q.segs.segs[1]
	t.Logf("segment 1: size %d live %d refs %d scan %d scanned %v", sg.size, sg.live, sg.refs, sg.scan, sg.scanned)
	q.segs.mu.RUnlock()
	t.Fatal("after one failed write of the moved copies, segment 1's live chunk is never moved again")
}

// TestBadgerSegmentIDReusedAfterLoss: open numbers new segments after the
// files it finds (segStore.open: nextID), not after the segments Badger's
// pointers name. When the newest segment file is missing (without
// DurabilityFsync, a kernel crash that kept Badger's log but not the new
// file's unsynced directory entry; or damage), the next segment created
// gets the lost one's number. The lost chunk's pointer then names the new
// file: when it is set aside and deleted, its deletion drops a reference
// of the new segment (done), whose count falls below the pointers that
// name it, so the new segment is removed while an acknowledged event is
// still in it.
func TestBadgerSegmentIDReusedAfterLoss(t *testing.T) {
	withSegmentSize(t, 1) // a segment per group
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityNoSync}
	q := openTestBadger(t, dir, opts)
	publishTest(t, q, Event{ID: "a-1", Namespace: "a", Data: []byte("aaaa")}) // segment 1
	publishTest(t, q, Event{ID: "b-1", Namespace: "b", Data: []byte("bbbb")}) // segment 2
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(segmentPath(filepath.Join(dir, segmentsDir), 2)); err != nil {
		t.Fatal(err)
	}
	q = openTestBadger(t, dir, opts)
	if ls := leaseAll(t, q, "h", 10, "b"); len(ls) != 0 { // b-1 is lost: set aside, deleted with the next group
		t.Fatalf("leased %d of the lost b", len(ls))
	}
	publishTest(t, q, Event{ID: "c-1", Namespace: "c", Data: []byte("cccc")}) // a new segment 2
	q.segs.mu.RLock()
	if sg := q.segs.segs[2]; sg != nil {
		t.Logf("new segment 2: refs %d live %d", sg.refs, sg.live)
	}
	q.segs.mu.RUnlock()
	for i := range 3 {
		publishTest(t, q, Event{ID: fmt.Sprintf("d-%d", i), Namespace: "d", Data: []byte("d")})
	}
	files := segmentFiles(t, dir)
	q = reopenTestBadger(t, q, dir, opts)
	ls := leaseAll(t, q, "h", 10, "c")
	if len(ls) != 1 {
		t.Logf("segment files before the reopen: %v", files)
		t.Fatalf("acknowledged publish c-1 lost: leased %d (segment files now %v)", len(ls), segmentFiles(t, dir))
	}
}
