package h3x

// The fifteenth session's review (RELIABILITY.md finding 152). Each
// test's comment tells the defect as it was before its fix
// (segStore.syncFile, and syncAndComplete's check after its sync).

import (
	"context"
	"errors"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// calledFrom reports whether a function whose name contains fn is on the
// caller's stack.
func calledFrom(fn string) bool {
	pc := make([]uintptr, 32)
	frames := runtime.CallersFrames(pc[:runtime.Callers(2, pc)])
	for {
		f, more := frames.Next()
		if strings.Contains(f.Function, fn) {
			return true
		}
		if !more {
			return false
		}
	}
}

// TestReview15MoveSyncFailureAfterCheck: a defect older than 268c20a and
// 781be92, which kept it. syncAndComplete reads syncBroken once, before it joins
// the segments' sync; planMoves fdatasyncs the active segment on the writer
// goroutine at the same time, through the same *os.File. When planMoves's
// fdatasync gets the writeback error (Linux reports it once per open file
// and marks the pages clean, as the code's own comments say), the
// completer's fdatasync of that file returns 0, and syncBroken is set only
// after the completer has read it: the group whose chunk was in the failed
// pages is acknowledged as durable. Here: X is written to segment S2, its
// segment sync is slow to run (the commit message measured 0.16–0.34 ms
// waiting for a processor); the next group's planMoves copies a chunk into
// S2 and its fdatasync fails; X's publish must not succeed.
func TestReview15MoveSyncFailureAfterCheck(t *testing.T) {
	segmentsOnly(t)
	withSegmentSize(t, 4096)
	moveQuiet = 400 * time.Millisecond
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityFsync})
	ctx := context.Background()

	publishTest(t, q, Event{ID: "a", Namespace: "keep", Data: make([]byte, 100)})  // S1
	publishTest(t, q, Event{ID: "b", Namespace: "drop", Data: make([]byte, 5000)}) // S1, now full
	ackAll(t, q, "h", leaseAll(t, q, "h", 10, "drop"))
	// The deletion of b's chunk goes with this group; S1 is sealed by it
	// and, once the deletion is done, mostly settled (moved moveQuiet later).
	publishTest(t, q, Event{ID: "f", Namespace: "filler", Data: make([]byte, 100)})
	settledAt := time.Now()

	var (
		mu        sync.Mutex
		armed     = true
		walSynced = make(chan struct{})
		consumed  = make(chan struct{})
		walOnce   sync.Once
		consOnce  sync.Once
	)
	fdatasyncFn = func(f *os.File) error {
		mu.Lock()
		on := armed
		mu.Unlock()
		if !on {
			return fdatasync(f)
		}
		switch {
		case strings.HasSuffix(f.Name(), ".mem"):
			walOnce.Do(func() { close(walSynced) }) // the completer is past its syncBroken check
			return fdatasync(f)
		case strings.HasSuffix(f.Name(), segmentSuffix) && calledFrom("planMoves"):
			select {
			case <-walSynced:
			case <-time.After(2 * time.Second):
			}
			// The writeback of the file's dirty pages (X's chunk and the
			// copies) fails; this call reports it, and the pages are clean.
			consOnce.Do(func() { close(consumed) })
			return syscall.EIO
		case strings.HasSuffix(f.Name(), segmentSuffix):
			// The completer's segment sync, once planMoves's has got the
			// error: the pages are clean, nothing is reported.
			select {
			case <-consumed:
				return nil
			default:
				return fdatasync(f)
			}
		}
		return fdatasync(f)
	}
	defer func() { fdatasyncFn = fdatasync }()
	// The completer's segment sync is slow to start (a goroutine waiting
	// for a processor): it runs after planMoves's.
	testHookSegmentSync = func() {
		mu.Lock()
		on := armed
		mu.Unlock()
		if !on {
			return
		}
		select {
		case <-consumed:
		case <-time.After(2 * time.Second):
		}
	}
	defer func() { testHookSegmentSync = nil }()

	xErr := enqueueAsync(ctx, q, Event{ID: "x", Namespace: "x", Data: make([]byte, 100)})
	time.Sleep(time.Until(settledAt.Add(moveQuiet + 50*time.Millisecond)))
	yErr := enqueueAsync(ctx, q, Event{ID: "y", Namespace: "y", Data: make([]byte, 100)})
	var errX error
	select {
	case errX = <-xErr:
	case <-time.After(5 * time.Second):
		t.Fatal("x not answered")
	}
	<-yErr
	mu.Lock()
	armed = false
	mu.Unlock()
	select {
	case <-consumed:
	default:
		t.Skip("planMoves did not run its fdatasync in the window (timing)")
	}
	if q.syncBroken.Load() == nil {
		t.Fatal("planMoves's sync failure was not recorded")
	}
	if errX == nil {
		t.Errorf("x acknowledged as durable although the fdatasync of its segment failed (reported to planMoves) and syncBroken was set")
	}
	if !errors.Is(errX, syscall.EIO) && errX != nil {
		t.Logf("x: %v", errX)
	}
}

// enqueueAsync enqueues evs in a goroutine of its own and returns where its
// error arrives.
func enqueueAsync(ctx context.Context, q Queue, evs ...Event) <-chan error {
	done := make(chan error, 1)
	go func() {
		_, err := q.Enqueue(ctx, evs)
		done <- err
	}()
	return done
}
