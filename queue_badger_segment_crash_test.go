package h3x

// Crash consistency of segment storage (found in review; see
// RELIABILITY.md). A segment's bytes and Badger's pointer to them reach the
// disk in no fixed order unless synced: these tests simulate a power loss by
// cutting the segment files back to what fdatasync covered.
// Each test's comment tells the defect as it was before its fix.

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

// syncTracker records, for each segment file, how many of its bytes an
// fdatasync has covered: what a power loss is certain to leave.
type syncTracker struct {
	mu     sync.Mutex
	synced map[string]int64 // base name -> size covered by the last fdatasync
}

func trackSegmentSyncs(t *testing.T) *syncTracker {
	tr := &syncTracker{synced: make(map[string]int64)}
	fdatasyncFn = func(f *os.File) error {
		var size int64 = -1
		if strings.HasSuffix(f.Name(), segmentSuffix) {
			if fi, err := f.Stat(); err == nil {
				size = fi.Size()
			}
		}
		err := fdatasync(f)
		if err == nil && size >= 0 {
			tr.mu.Lock()
			tr.synced[filepath.Base(f.Name())] = max(tr.synced[filepath.Base(f.Name())], size)
			tr.mu.Unlock()
		}
		return err
	}
	t.Cleanup(func() { fdatasyncFn = fdatasync })
	return tr
}

// powerLoss truncates every segment file of dir to the bytes an fdatasync
// covered (what an OS crash may leave of a file written without a sync
// since). Badger's own files are left as they are: after a clean Close
// Badger has synced its tables.
func (tr *syncTracker) powerLoss(t *testing.T, dir string) (lost map[string]int64) {
	t.Helper()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	lost = make(map[string]int64)
	for name, size := range segmentFiles(t, dir) {
		s := tr.synced[name]
		if size > s {
			lost[name] = size - s
			if err := os.Truncate(filepath.Join(dir, segmentsDir, name), s); err != nil {
				t.Fatal(err)
			}
		}
	}
	return lost
}

// TestBadgerSegmentCloseSyncsBeforeRemoving: with DurabilityFsync, the group
// Close writes for the pending chunk deletions (writeLastFixes) also moves
// chunks out of mostly settled segments (planMoves), completes with no sync,
// and Close then removes the old segment. The moved bytes were never
// fdatasynced, while Badger's Close made the new pointers durable: after a
// power loss following a clean Close, an event acknowledged long before is
// gone.
func TestBadgerSegmentCloseSyncsBeforeRemoving(t *testing.T) {
	segmentsOnly(t)
	withSegmentSize(t, 4096)
	tr := trackSegmentSyncs(t)
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityFsync}
	q := openTestBadger(t, dir, opts)
	keep := Event{ID: "keep-1", Namespace: "keep", Data: []byte(strings.Repeat("k", 100))}
	busy := segTestEvents("busy", 10, 500)
	publishTest(t, q, append([]Event{keep}, busy...)...)    // one segment: keep's chunk and busy's
	publishTest(t, q, Event{ID: "tick", Namespace: "tick"}) // seals it, starts the next
	// One Lease call (one lease record) for keep and busy; ack only busy:
	// the record stays, so no group follows and the busy chunk's deletion
	// is still pending at Close.
	ls := leaseAll(t, q, "h", 100, "keep", "busy")
	var acks []Lease
	for _, l := range ls {
		if l.Event.Namespace == "busy" {
			acks = append(acks, l)
		}
	}
	if len(acks) != len(busy) {
		t.Fatalf("leased %d busy events", len(acks))
	}
	ackAll(t, q, "h", acks)
	before := segmentFiles(t, dir)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	after := segmentFiles(t, dir)
	t.Logf("segments before Close %v, after %v", before, after)
	lost := tr.powerLoss(t, dir)
	t.Logf("unsynced segment bytes at Close (lost to a power loss): %v", lost)
	q = openTestBadger(t, dir, opts)
	got, err := q.Lease(context.Background(), LeaseRequest{Holder: "h2", Namespaces: []string{"keep"}, Limit: 10, AckDeadline: time.Minute})
	if err != nil || len(got) != 1 || got[0].Event.ID != keep.ID {
		t.Fatalf("after a clean Close and a power loss, the acknowledged event %s: leased %d, err %v", keep.ID, len(got), err)
	}
}

// TestBadgerSegmentSyncWritesEscapeHatch: DurabilityFsync with the escape
// hatch setting Badger's SyncWrites (Badger syncs each commit itself) makes
// q.fsync false, so the completer never syncs the segments: an acknowledged
// publish's bytes are only in the page cache, while Badger's pointer to
// them is synced.
func TestBadgerSegmentSyncWritesEscapeHatch(t *testing.T) {
	segmentsOnly(t)
	tr := trackSegmentSyncs(t)
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityFsync, Badger: func(o *badger.Options) { o.SyncWrites = true }}
	q := openTestBadger(t, dir, opts)
	evs := segTestEvents("n", 5, 200)
	publishTest(t, q, evs...) // acknowledged: on stable storage, per DurabilityFsync
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	lost := tr.powerLoss(t, dir)
	q = openTestBadger(t, dir, opts)
	ls, err := q.Lease(context.Background(), LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 10, AckDeadline: time.Minute})
	if err != nil || len(ls) != len(evs) {
		t.Fatalf("SyncWrites escape hatch: segment bytes never fdatasynced (%v); after a power loss, leased %d of %d acknowledged events, err %v", lost, len(ls), len(evs), err)
	}
}

// copyDirFiles copies src (files and subdirectories) to a new temporary
// directory.
func copyDirFiles(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	if err := copyFiles(src, dst); err != nil {
		t.Fatal(err)
	}
	return dst
}

// TestBadgerSegmentRemovedAtOpenAfterRepairSynced: with DurabilityFsync,
// open deletes the settled chunks it finds (writeRepairs, a write batch
// that is not synced) and then at once removes the segments no pointer
// names any more (countSegments -> removeUnused). An OS crash right after
// the open can keep the unlink and lose the unsynced deletions: the
// pointer comes back, its segment does not, and the namespace can no
// longer be read (events acknowledged-as-published after it included).
func TestBadgerSegmentRemovedAtOpenAfterRepairSynced(t *testing.T) {
	segmentsOnly(t)
	withSegmentSize(t, 1) // every group starts a segment of its own
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityFsync}
	q := openTestBadger(t, dir, opts)
	a := segTestEvents("n", 3, 100)
	publishTest(t, q, a...) // segment 1
	b := segTestEventsIDs("b-", "n", 3, 100)
	publishTest(t, q, b...) // segment 2
	// The chunk deletion after the acks never commits in this run (as if
	// the process were killed before its group): the acks are durable,
	// the chunk is still stored.
	failCommitsWith(q, -1, func(w bwrite) bool { return w.del && len(w.key) > 0 && w.key[0] == keyEvent })
	ackAll(t, q, "h", leaseAll(t, q, "h", 3, "n"))
	time.Sleep(50 * time.Millisecond)
	crashed := copyLive(t, dir) // kill -9
	q.Close()
	durable := copyDirFiles(t, crashed) // Badger's state as synced before the next open

	q2 := openTestBadger(t, crashed, opts) // deletes chunk a (unsynced) and removes segment 1
	segsAfterOpen := segmentFiles(t, crashed)
	t.Logf("segments in the durable state %v; after the open %v", segmentFiles(t, durable), segsAfterOpen)
	// OS crash now: Badger's unsynced repair batch is lost, the unlink kept.
	if err := os.RemoveAll(filepath.Join(durable, segmentsDir)); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(durable, segmentsDir), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := copyFiles(filepath.Join(crashed, segmentsDir), filepath.Join(durable, segmentsDir)); err != nil {
		t.Fatal(err)
	}
	q2.Close()

	q3 := openTestBadger(t, durable, opts)
	c := Event{ID: "c-1", Namespace: "n", Data: []byte("c")}
	publishTest(t, q3, c) // acknowledged after the restart
	ls, err := q3.Lease(context.Background(), LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 10, AckDeadline: time.Minute})
	if err != nil || len(ls) != len(b)+1 {
		t.Fatalf("after an OS crash following an open: leased %d events of namespace n, want %d (b's and c's, all acknowledged); err %v", len(ls), len(b)+1, err)
	}
}

// TestBadgerSegmentLostTailIsSetAside: a group's pointer and its
// segment bytes are written without order between them on disk (Badger's
// log is a memory map the kernel writes back when it likes; Badger's
// memtable flush syncs tables by itself), so an OS crash before the sync
// can leave a pointer to bytes that never reached the disk. That publish
// was never acknowledged, but its corrupt chunk then stops every read of
// the namespace: events published and acknowledged after the restart are
// never delivered. (With chunks in Badger's log this could not happen:
// replay drops a torn entry.)
func TestBadgerSegmentLostTailIsSetAside(t *testing.T) {
	segmentsOnly(t)
	tr := trackSegmentSyncs(t)
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityFsync}
	q := openTestBadger(t, dir, opts)
	a := segTestEvents("n", 3, 100)
	publishTest(t, q, a...) // acknowledged: synced
	tr.mu.Lock()
	syncedA := make(map[string]int64)
	for k, v := range tr.synced {
		syncedA[k] = v
	}
	tr.mu.Unlock()
	b := segTestEventsIDs("b-", "n", 3, 100)
	publishTest(t, q, b...)
	crashed := copyLive(t, dir)
	q.Close()
	// The crash came after b's commit reached the disk and before the
	// sync that would have acknowledged b: b's segment bytes are lost.
	for name := range segmentFiles(t, crashed) {
		if err := os.Truncate(filepath.Join(crashed, segmentsDir, name), syncedA[name]); err != nil {
			t.Fatal(err)
		}
	}
	q2 := openTestBadger(t, crashed, opts)
	c := Event{ID: "c-1", Namespace: "n", Data: []byte("c")}
	publishTest(t, q2, c) // acknowledged after the restart
	got := map[string]bool{}
	var ls []Lease
	var err error
	for range 3 { // a few tries: the first may stop at the damage
		ls, err = q2.Lease(context.Background(), LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 10, AckDeadline: time.Minute})
		for _, l := range ls {
			got[l.Event.ID] = true
		}
	}
	for _, ev := range append(a, c) {
		if !got[ev.ID] {
			t.Fatalf("acknowledged event %s not delivered after the crash (leased %d, err %v)", ev.ID, len(ls), err)
		}
	}
}

// TestBadgerSegmentMoveSyncedBeforePointer: the same lack of order, for a
// chunk moved out of a mostly settled segment in normal operation: the
// move's pointer is committed before its new bytes are synced (the sync
// comes after, in the completer). An OS crash after the commit reached the
// disk and before that sync leaves the pointer naming bytes that are not
// there, and the next open removes the old segment (no pointer names it):
// an event acknowledged long before is lost.
func TestBadgerSegmentMoveSyncedBeforePointer(t *testing.T) {
	segmentsOnly(t)
	withSegmentSize(t, 4096)
	tr := trackSegmentSyncs(t)
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityFsync}
	q := openTestBadger(t, dir, opts)
	keep := Event{ID: "keep-1", Namespace: "keep", Data: []byte("kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk")}
	busy := segTestEvents("busy", 10, 500)
	publishTest(t, q, append([]Event{keep}, busy...)...)
	publishTest(t, q, Event{ID: "tick-1", Namespace: "tick"})
	ls := leaseAll(t, q, "h", 100, "keep", "busy")
	var acks []Lease
	for _, l := range ls {
		if l.Event.Namespace == "busy" {
			acks = append(acks, l)
		}
	}
	ackAll(t, q, "h", acks)                                   // the busy chunk's deletion waits for the next group
	publishTest(t, q, Event{ID: "tick-2", Namespace: "tick"}) // deletes it; once done, segment 1 is mostly settled

	// The next group moves keep's chunk; snapshot the disk at the first
	// fdatasync of a segment from then on, as a power loss then leaves it
	// (unsynced segment bytes gone): if that is the completer's, after the
	// move's pointer was committed, keep is lost.
	snap := t.TempDir()
	var once sync.Once
	var snapErr error
	inner := fdatasyncFn
	fdatasyncFn = func(f *os.File) error {
		if strings.HasSuffix(f.Name(), segmentSuffix) {
			once.Do(func() { snapErr = copyFiles(dir, snap) })
		}
		return inner(f)
	}
	tr.mu.Lock()
	synced := make(map[string]int64)
	for k, v := range tr.synced {
		synced[k] = v
	}
	tr.mu.Unlock()
	publishTest(t, q, Event{ID: "tick-3", Namespace: "tick"})
	q.Close()
	if snapErr != nil {
		t.Fatal(snapErr)
	}
	t.Logf("segments at the crash %v; synced %v", segmentFiles(t, snap), synced)
	for name := range segmentFiles(t, snap) {
		if err := os.Truncate(filepath.Join(snap, segmentsDir, name), synced[name]); err != nil {
			t.Fatal(err)
		}
	}
	q2 := openTestBadger(t, snap, opts)
	got, err := q2.Lease(context.Background(), LeaseRequest{Holder: "h2", Namespaces: []string{"keep"}, Limit: 10, AckDeadline: time.Minute})
	if err != nil || len(got) != 1 {
		t.Fatalf("acknowledged event %s after a crash during a move's sync: leased %d, err %v", keep.ID, len(got), err)
	}
}

// TestBadgerSegmentsInBadgerDir: the escape hatch can move Badger's
// Dir and ValueDir, which before segments left dir holding nothing of the
// queue's (it was only where free space was measured). Segments are put in
// dir/segments regardless, so two queues whose Badger directories differ
// but that were given the same dir share one segment directory: opening
// the second removes the first's segments (no pointer in its own Badger
// names them), and the first queue's acknowledged events are lost.
func TestBadgerSegmentsInBadgerDir(t *testing.T) {
	segmentsOnly(t)
	base := t.TempDir()
	aDir, bDir := filepath.Join(base, "a"), filepath.Join(base, "b")
	optsFor := func(d string) QueueOptions {
		return QueueOptions{Badger: func(o *badger.Options) { o.Dir, o.ValueDir = d, d }}
	}
	qa := openTestBadger(t, base, optsFor(aDir))
	evs := segTestEvents("n", 5, 100)
	publishTest(t, qa, evs...)
	if err := qa.Close(); err != nil {
		t.Fatal(err)
	}
	qb := openTestBadger(t, base, optsFor(bDir)) // another queue, its own Badger
	if err := qb.Close(); err != nil {
		t.Fatal(err)
	}
	qa = openTestBadger(t, base, optsFor(aDir))
	ls, err := qa.Lease(context.Background(), LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 10, AckDeadline: time.Minute})
	if err != nil || len(ls) != len(evs) {
		t.Fatalf("queue a after queue b was opened with the same dir: leased %d of %d, err %v", len(ls), len(evs), err)
	}
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	return len(ents)
}

// TestBadgerSegmentFilesOpenBounded (measurement): every segment a read has
// touched keeps its file open until the segment is removed, so the
// descriptors a queue holds grow with the backlog read (after a kill -9,
// the recount at open reads every chunk: one descriptor per segment of the
// whole backlog, 1 per 32 MiB by default).
func TestBadgerSegmentFilesOpenBounded(t *testing.T) {
	withSegmentSize(t, 1) // a segment per group, standing in for 32 MiB each
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityNoSync}
	q := openTestBadger(t, dir, opts)
	for i := range 300 {
		publishTest(t, q, Event{ID: fmt.Sprintf("e%03d", i), Namespace: "n", Data: []byte("x")})
	}
	crashed := copyLive(t, dir) // kill -9: the next open recounts
	q.Close()
	before := openFDs(t)
	q = openTestBadger(t, crashed, opts)
	after := openFDs(t)
	t.Logf("segments %d; descriptors before open %d, after %d", len(segmentFiles(t, crashed)), before, after)
	if after-before > 100 {
		t.Fatalf("opening a queue of %d segments holds %d more descriptors", len(segmentFiles(t, crashed)), after-before)
	}
}
