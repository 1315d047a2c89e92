package h3x

// Durability of the Badger queue under storage errors. Tests 2-4
// replace package-level seams: syncPathFn and fdatasyncFn in
// queue_badger.go, allocateFn in queue_badger_ballast.go.

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// 1. Close must release the ballast when the disk is low ("and at Close when
// free space is low, it is deleted"), so Badger's final flush has room. It
// does not when the free space differs from the monitor's last reading.
func TestBallastReleasedAtCloseWhileFreeChanges(t *testing.T) {
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	path := filepath.Join(dir, ballastName)
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("no ballast after open: %v", err)
	}
	// Nearly full, and still moving (Badger's own compactions, or a writer
	// that has just stopped): each reading differs by a page.
	var n atomic.Uint64
	low := q.ballast.low / 4
	df := func(string) (uint64, error) { return low - n.Add(4096), nil }
	q.diskFree.Store(&df)
	time.Sleep(3 * ballastInterval)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err == nil {
		t.Fatalf("Close with ~%d bytes free (release below %d): the ballast is still there, Badger's final flush had no room", low, q.ballast.low)
	}
}

// 2. A failed directory fsync after a memtable rotation is never retried:
// memFid has already advanced, so later syncs take the fast path
// (fdatasync of the new .mem only) and acknowledge publishes stored in a
// file whose directory entry was never made durable.
func TestDirSyncFailureRetried(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	q, old := openSmallMemtables(t, dir)
	rotateMemtables(t, q, func() bool { return fileExists(memFilePath(dir, old+1)) })
	var mu sync.Mutex
	var synced []string
	failDir := true
	syncPathFn = func(p string) error {
		mu.Lock()
		defer mu.Unlock()
		if p == dir && failDir {
			failDir = false
			return syscall.EIO
		}
		synced = append(synced, p)
		return fsyncPath(p)
	}
	defer func() { syncPathFn = fsyncPath }()
	if _, err := q.Enqueue(ctx, []Event{{ID: "second", Namespace: "n"}}); err == nil {
		t.Fatal("publish whose directory sync failed: no error")
	}
	mu.Lock()
	synced = nil
	mu.Unlock()
	// Refused (a failed sync is sticky, see TestFailedSyncIsSticky), or
	// acknowledged only after a directory sync that worked.
	_, err := q.Enqueue(ctx, []Event{{ID: "third", Namespace: "n"}})
	q.syncMu.Lock()
	fid := q.memFid
	q.syncMu.Unlock()
	mu.Lock()
	defer mu.Unlock()
	if err == nil && fid > old && !slices.Contains(synced, dir) {
		t.Errorf("\"third\" acknowledged in %05d.mem, created after the last successful sync of %s, without syncing the directory (synced since the failure: %v)", fid, dir, synced)
	}
}

// 3. After a failed fdatasync, the queue keeps acknowledging: the retry of
// the failed publish is answered Duplicate without rewriting it, and later
// publishes succeed. On Linux a writeback error marks the dirty pages clean
// and is reported once: the next fdatasync returns 0 without writing them,
// and Badger's WAL replay stops at the first damaged entry, so both the
// "duplicate" and the later publishes can vanish at a power loss.
func TestFailedSyncIsSticky(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	q := openTestBadger(t, dir, QueueOptions{})
	publishTest(t, q, Event{ID: "warm", Namespace: "n"})
	var fail atomic.Bool
	fail.Store(true)
	fdatasyncFn = func(f *os.File) error {
		if fail.CompareAndSwap(true, false) {
			return syscall.EIO
		}
		return fdatasync(f)
	}
	defer func() { fdatasyncFn = fdatasync }()
	if _, err := q.Enqueue(ctx, []Event{{ID: "x", Namespace: "n"}}); err == nil {
		t.Fatal("publish whose fdatasync failed: no error")
	}
	txns := q.statTxns.Load()
	res, err := q.Enqueue(ctx, []Event{{ID: "x", Namespace: "n"}})
	if err == nil && q.statTxns.Load() == txns {
		t.Errorf("retry of x after its sync failed: answered %v with no error and nothing rewritten", res[0].Status)
	}
	if _, err := q.Enqueue(ctx, []Event{{ID: "y", Namespace: "n"}}); err == nil {
		t.Errorf("y acknowledged after an unrecovered sync failure earlier in the same WAL")
	}
}

// 4. Where fallocate is unsupported (EOPNOTSUPP), the ballast is created
// and deleted again every 20 ms, forever, and the .mem preallocation is
// retried (with a directory listing) on every tick.
func TestNoFallocateChurn(t *testing.T) {
	var calls atomic.Int32
	allocateFn = func(*os.File, int64) error { calls.Add(1); return syscall.EOPNOTSUPP }
	defer func() { allocateFn = allocate }()
	q := openTestBadger(t, t.TempDir(), QueueOptions{})
	time.Sleep(500 * time.Millisecond)
	q.Close()
	if n := calls.Load(); n > 4 {
		t.Errorf("fallocate unsupported: %d fallocate attempts in 0.5 s (ballast file created and removed each tick)", n)
	}
}
