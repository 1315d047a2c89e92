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

// The ballast's monitor checks every ballastInterval while the queue writes
// (or has groups in Badger's hands) and for the quiet time after, then every
// idle interval until the next write; it preallocates only while active.
func TestBallastMonitorInterval(t *testing.T) {
	t0 := time.Unix(1_000_000, 0)
	var writes int64
	var inFlight bool
	const quiet, idle = 10 * time.Second, 250 * time.Millisecond
	b := &ballast{writes: func() int64 { return writes }, inFlight: func() bool { return inFlight },
		activeAt: t0, quiet: quiet, idleTick: idle}
	steps := []struct {
		name       string
		at         time.Duration // after t0
		writes     int64
		inFlight   bool
		wantActive bool
		want       time.Duration
	}{
		{"just opened", 0, 0, false, true, ballastInterval},
		{"no write yet, within the quiet time", quiet - time.Millisecond, 0, false, true, ballastInterval},
		{"no write for the quiet time", quiet, 0, false, false, idle},
		{"idle long", 10 * quiet, 0, false, false, idle},
		{"a write", 10*quiet + time.Second, 1, false, true, ballastInterval},
		{"more writes", 11 * quiet, 5, false, true, ballastInterval},
		{"quiet since the last write", 12*quiet - time.Millisecond, 5, false, true, ballastInterval},
		{"idle again", 12 * quiet, 5, false, false, idle},
		{"a group stalled in Badger", 13 * quiet, 5, true, true, ballastInterval},
		{"still stalled, no write completed", 20 * quiet, 5, true, true, ballastInterval},
		{"the stall over", 21*quiet - time.Millisecond, 6, false, true, ballastInterval},
		{"idle after it", 22 * quiet, 6, false, false, idle},
	}
	for _, s := range steps {
		writes, inFlight = s.writes, s.inFlight
		now := t0.Add(s.at)
		if got := b.active(now); got != s.wantActive {
			t.Errorf("%s: active = %v, want %v", s.name, got, s.wantActive)
		}
		if got := b.interval(now); got != s.want {
			t.Errorf("%s: interval = %v, want %v", s.name, got, s.want)
		}
	}
	// wake kicks only an idle monitor, once.
	b.kick = make(chan struct{}, 1)
	b.wake()
	if len(b.kick) != 0 {
		t.Error("wake kicked a monitor that is not idle")
	}
	b.idle.Store(true)
	b.wake()
	b.wake()
	if len(b.kick) != 1 {
		t.Errorf("wake of an idle monitor: %d kicks queued, want 1", len(b.kick))
	}
	var none *ballast
	none.wake() // a queue without a ballast
}

// An idle queue's monitor stops checking often; the first write group after
// the quiet spell wakes it at once (Badger may have rotated a memtable into
// a new .mem file, which it preallocates), not at its next idle tick.
func TestBallastMonitorWokenByWrite(t *testing.T) {
	quiet, idle := ballastQuiet, ballastIdleInterval
	t.Cleanup(func() { ballastQuiet, ballastIdleInterval = quiet, idle }) // after the queue's Close
	ballastQuiet, ballastIdleInterval = 100*time.Millisecond, time.Hour
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	var calls atomic.Int64
	df := func(string) (uint64, error) { calls.Add(1); return 1 << 40, nil }
	q.diskFree.Store(&df)
	b := q.ballast
	waitFor(t, b.idle.Load)
	n0 := calls.Load()
	time.Sleep(300 * time.Millisecond)
	if n := calls.Load() - n0; n != 0 {
		t.Fatalf("idle monitor (next tick in an hour): %d free-space readings in 300 ms", n)
	}
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	waitFor(t, func() bool { return !b.idle.Load() }) // only the wake-up can do it within the hour
}

// An idle monitor still releases the ballast when another process fills
// the disk, and makes it again once there is room.
func TestBallastReleasedWhileIdle(t *testing.T) {
	quiet, idle := ballastQuiet, ballastIdleInterval
	t.Cleanup(func() { ballastQuiet, ballastIdleInterval = quiet, idle })
	ballastQuiet, ballastIdleInterval = 50*time.Millisecond, 100*time.Millisecond
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	var low atomic.Bool
	df := func(string) (uint64, error) {
		if low.Load() {
			return 1 << 20, nil
		}
		return 1 << 40, nil
	}
	q.diskFree.Store(&df)
	waitFor(t, q.ballast.idle.Load)
	low.Store(true)
	path := filepath.Join(dir, ballastName)
	waitFor(t, func() bool { _, err := os.Stat(path); return os.IsNotExist(err) })
	low.Store(false)
	waitFor(t, func() bool { _, err := os.Stat(path); return err == nil })
}
