package h3x

// Fourth review of segment storage (RELIABILITY.md finding 151).
// Each test's comment tells the defect as it was before its fix.

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestBadgerSegmentNumberReusedWhenAllMissing: countSegments returns early
// when no segment file is found, so count() never raises nextID past the
// segments that pointers name. The next segment written reuses the number
// of a missing segment (1); deleting the lost chunk (its pointer names
// segment 1) then drops a reference of the NEW segment 1, which is
// retired and removed while a live chunk is in it.
func TestBadgerSegmentNumberReusedWhenAllMissing(t *testing.T) {
	segmentsOnly(t)
	withSegmentSize(t, 1) // a segment per group
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	publishTest(t, q, segTestEvents("a", 1, 100)...)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	// The segment files are lost (e.g. a power loss before their names
	// reached the disk, without DurabilityFsync).
	for name := range segmentFiles(t, dir) {
		if err := os.Remove(filepath.Join(dir, segmentsDir, name)); err != nil {
			t.Fatal(err)
		}
	}
	q = openTestBadger(t, dir, QueueOptions{})
	bEvs := segTestEvents("b", 1, 100)
	publishTest(t, q, bEvs...)
	t.Logf("segments after publishing b: %v", segmentFiles(t, dir))
	if ls := leaseAll(t, q, "h", 10, "a"); len(ls) != 0 {
		t.Fatalf("leased %d lost events of a", len(ls))
	}
	// The next group deletes the lost chunk of a.
	publishTest(t, q, segTestEvents("c", 1, 100)...)
	publishTest(t, q, segTestEvents("d", 1, 100)...)
	time.Sleep(200 * time.Millisecond)
	t.Logf("segments after the fix: %v", segmentFiles(t, dir))
	q = reopenTestBadger(t, q, dir, QueueOptions{})
	checkLeased(t, leaseAll(t, q, "h", 10, "b"), bEvs)
}

// TestBadgerSegmentOpenCloseLeaksNoFiles: a queue that wrote and read
// segments, closed (twice), and a failed open (segments path is a file),
// leave no descriptor open.
func TestBadgerSegmentOpenCloseLeaksNoFiles(t *testing.T) {
	segmentsOnly(t)
	withSegmentSize(t, 1)
	base := openFDs(t)
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityFsync})
	for i := range 5 {
		publishTest(t, q, segTestEvents(string(rune('a'+i)), 3, 100)...)
	}
	q = reopenTestBadger(t, q, dir, QueueOptions{Durability: DurabilityFsync})
	ackAll(t, q, "h", leaseAll(t, q, "h", 100, "a", "b", "c", "d", "e"))
	q.Close()
	q.Close()
	if n := openFDs(t); n != base {
		t.Errorf("%d descriptors open after Close, %d before", n, base)
	}
	dir2 := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir2, segmentsDir), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	q2, err := OpenBadgerQueue(dir2, QueueOptions{})
	t.Logf("open with segments a file: %v", err)
	if err == nil {
		q2.Close()
	}
	if n := openFDs(t); n != base {
		t.Errorf("%d descriptors open after a failed open, %d before", n, base)
	}
}
