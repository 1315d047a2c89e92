package h3x

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// Regression tests for the chunked layout's failure paths (found in review):
// a commit that fails must leave the events it settled unsettled, on disk
// as in memory.

// failCommitsWith makes q's commits with a matching write fail (the first
// times ones, or all of them with times < 0); the returned func stops it.
func failCommitsWith(q *badgerQueue, times int, match func(w bwrite) bool) func() {
	undo, _ := failCommitsCounted(q, times, match)
	return undo
}

// failCommitsCounted is failCommitsWith that also returns how many commits
// have matched so far.
func failCommitsCounted(q *badgerQueue, times int, match func(w bwrite) bool) (undo func(), matched func() int) {
	var n atomic.Int32
	f := func(ws []bwrite) bool {
		return slices.ContainsFunc(ws, match) && (times < 0 || int(n.Add(1)) <= times)
	}
	storeCommitHook(q, &f)
	return func() { q.failCommit.Store(nil) }, func() int { return int(n.Load()) }
}

// openLeased opens a queue in dir, publishes ids to namespace "n" in one
// Enqueue (one chunk) and leases them all to holder "h".
func openLeased(t *testing.T, dir string, opts QueueOptions, ids ...string) (*badgerQueue, []Lease) {
	t.Helper()
	q := openTestBadger(t, dir, opts)
	evs := make([]Event, len(ids))
	for i, id := range ids {
		evs[i] = Event{ID: id, Namespace: "n"}
	}
	publishTest(t, q, evs...)
	return q, leaseAll(t, q, "h", len(ids), "n")
}

// failAckOfA makes the next times commits writing n's ack records fail,
// and acks a (leased to h by openLeased), which must fail; the returned
// func stops the failures.
func failAckOfA(t *testing.T, q *badgerQueue, times int) func() {
	t.Helper()
	undo := failCommitsWith(q, times, isKeyOf(keyAcks, "n"))
	if _, err := q.Ack(context.Background(), "h", []LeaseRef{{ID: "a", Attempt: 1}}); err == nil {
		t.Fatal("Ack whose commit failed: no error")
	}
	return undo
}

// isKeyOf matches the writes of a key of kind in namespace ns.
func isKeyOf(kind byte, ns string) func(w bwrite) bool {
	p := nsPrefix(kind, ns)
	return func(w bwrite) bool { return w.key != nil && bytes.HasPrefix(w.key, p) && len(w.key) == len(p)+8 }
}

func leasedIDs(ls []Lease) []string {
	var ids []string
	for _, l := range ls {
		ids = append(ids, l.Event.Namespace+"/"+l.Event.ID)
	}
	return ids
}

func TestBadgerQueueFailedMoveKeepsEvent(t *testing.T) {
	// A dead-letter move whose commit fails leaves the event where it was,
	// also after a neighbour's ack rewrites the chunk's ack record and a
	// reopen.
	dir := t.TempDir()
	ctx := context.Background()
	q, ls := openLeased(t, dir, QueueOptions{MaxAttempts: 1}, "a", "b", "c")
	undo := failCommitsWith(q, 1, isKeyOf(keyEvent, "n"+DeadLetterSuffix))
	if _, err := q.Nack(ctx, "h", []LeaseRef{{ID: "a", Attempt: 1}}, 0, "bad"); err == nil {
		t.Fatal("Nack whose move failed: no error")
	}
	undo()
	ackAll(t, q, "h", ls[1:3]) // b and c: a keeps the chunk alive
	q = reopenTestBadger(t, q, dir, QueueOptions{MaxAttempts: 1})
	// a kept its attempt count (its lease record), so it is overdue: the
	// first Lease moves it, the second delivers it from the dead-letter
	// namespace.
	got := leasedIDs(leaseAll(t, q, "h2", 10, "n", "n"+DeadLetterSuffix))
	got = append(got, leasedIDs(leaseAll(t, q, "h2", 10, "n", "n"+DeadLetterSuffix))...)
	if !slices.Contains(got, "n/a") && !slices.Contains(got, "n.dlq/a") {
		t.Errorf("event a (never acked, its dead-lettering failed) is gone: leased %v", got)
	}
}

func TestBadgerQueueFailedAckKeepsChunk(t *testing.T) {
	// An ack whose commit fails makes the event ready again; the
	// neighbour's ack must not delete the chunk under it, and the
	// namespace stays deliverable and counted right after a reopen.
	dir := t.TempDir()
	ctx := context.Background()
	q, ls := openLeased(t, dir, QueueOptions{}, "a", "b")
	undo := failAckOfA(t, q, 1)
	undo()
	ackAll(t, q, "h", ls[1:2])
	publishTest(t, q, Event{ID: "later", Namespace: "n"})
	got, err := q.Lease(ctx, LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 10, AckDeadline: time.Minute})
	if err != nil {
		t.Fatalf("Lease after a failed ack: %v", err)
	}
	if ids := leasedIDs(got); !slices.Equal(ids, []string{"n/a", "n/later"}) {
		t.Fatalf("leased %v, want a again and later", ids)
	}
	if err := q.Release(ctx, "h"); err != nil {
		t.Fatal(err)
	}
	q = reopenTestBadger(t, q, dir, QueueOptions{})
	st, err := q.Stats(ctx, "n")
	if err != nil || st[0].Ready != 2 {
		t.Fatalf("after reopen: %+v %v, want 2 ready", st, err)
	}
	got = leaseAll(t, q, "h", 10, "n")
	if ids := leasedIDs(got); !slices.Equal(ids, []string{"n/a", "n/later"}) {
		t.Fatalf("after reopen leased %v", ids)
	}
	ackAll(t, q, "h", got)
	if st, _ := q.Stats(ctx, "n"); st[0].Ready != 0 || st[0].Bytes != 0 {
		t.Errorf("after acking everything: %+v", st[0])
	}
}

func TestBadgerQueueDeadLettersAmongPublishes(t *testing.T) {
	// Events published to a dead-letter namespace in the same group commit
	// as a move into it: no stored chunk may overlap another, or the
	// read-ahead skips the dead letter.
	dir := t.TempDir()
	ctx := context.Background()
	q := openTestBadger(t, dir, QueueOptions{MaxAttempts: 1})
	publishTest(t, q, Event{ID: "x", Namespace: "n"})
	leaseAll(t, q, "h", 1, "n")
	c := q.core
	waiting := func(n int) {
		for range 5000 {
			q.wmu.Lock()
			k := len(q.wops)
			q.wmu.Unlock()
			if k == n {
				return
			}
			time.Sleep(time.Millisecond)
		}
		t.Fatalf("the writer never had %d requests waiting", n)
	}
	// Hold the core so that the three requests below land in one group.
	c.mu.Lock()
	blocker := &wop{fx: &effects{}, w: &writeWait{done: make(chan struct{})}}
	q.push(blocker)
	waiting(0) // the writer took it and waits for the core
	done := make(chan error, 2)
	go func() { _, err := q.Enqueue(ctx, []Event{{ID: "p1", Namespace: "n.dlq"}}); done <- err }()
	waiting(1)
	e := c.byID["x"]
	c.detach(e)
	var fx effects
	c.afterLease(e, time.Now().UnixNano(), 0, "bad", &fx)
	if len(fx.moves) != 1 {
		c.mu.Unlock()
		t.Fatal("no dead-letter move")
	}
	move := &wop{fx: &fx, w: &writeWait{done: make(chan struct{})}, durable: true}
	q.push(move)
	waiting(2)
	go func() { _, err := q.Enqueue(ctx, []Event{{ID: "p2", Namespace: "n.dlq"}}); done <- err }()
	waiting(3)
	c.mu.Unlock()
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	<-move.w.done
	q = reopenTestBadger(t, q, dir, QueueOptions{MaxAttempts: 1})
	got := leasedIDs(leaseAll(t, q, "h2", 10, "n.dlq"))
	if want := []string{"n.dlq/p1", "n.dlq/p2", "n.dlq/x"}; !slices.Equal(got, want) {
		t.Errorf("after reopen leased %v, want %v (publish order, the dead letter last)", got, want)
	}
}

// openSmallMemtables opens a Badger queue with 1 MiB memtables, publishes
// one event ("first" in n) and returns the queue and its memtable log's
// number after that publish's sync.
func openSmallMemtables(t *testing.T, dir string) (*badgerQueue, int) {
	t.Helper()
	q := openTestBadger(t, dir, QueueOptions{Badger: func(o *badger.Options) { o.MemTableSize = 1 << 20 }})
	publishTest(t, q, Event{ID: "first", Namespace: "n"})
	q.syncMu.Lock()
	defer q.syncMu.Unlock()
	return q, q.memFid
}

// rotateMemtables writes 100 KiB values straight into q's Badger (1 MiB
// memtables) until done reports true, at most 5,000 of them.
func rotateMemtables(t *testing.T, q *badgerQueue, done func() bool) {
	t.Helper()
	for i := 0; !done(); i++ {
		if i > 5000 {
			t.Fatal("no rotation")
		}
		q.ts.update(func(txn *badger.Txn) error {
			return txn.Set([]byte{'z', byte(i >> 8), byte(i)}, make([]byte, 100<<10))
		})
	}
}

func TestBadgerQueueSyncAfterRotations(t *testing.T) {
	// Two memtable rotations between syncs (commits nobody waits for, as
	// lease records): the next sync must sync the active memtable's log,
	// not the deleted one it synced before.
	dir := t.TempDir()
	q, stale := openSmallMemtables(t, dir)
	rotateMemtables(t, q, func() bool {
		mem, _ := logFiles(dir, ".mem")
		return len(mem) > 0 && mem[0] > stale+1
	})
	publishTest(t, q, Event{ID: "second", Namespace: "n"}) // the full sync
	publishTest(t, q, Event{ID: "third", Namespace: "n"})  // the fast one
	q.syncMu.Lock()
	defer q.syncMu.Unlock()
	mem, _ := logFiles(dir, ".mem")
	if _, err := os.Stat(memFilePath(dir, q.walFid)); err != nil || q.walFid != mem[len(mem)-1] {
		t.Errorf("the last sync fdatasynced %05d.mem (%v), not the active %05d.mem", q.walFid, err, mem[len(mem)-1])
	}
}

func TestBadgerQueueFailedMoveWhileClosing(t *testing.T) {
	// A dead-letter move whose commit fails while Close is under way (core
	// closed, writer not yet stopped): the event stays where it was.
	dir := t.TempDir()
	ctx := context.Background()
	q := openTestBadger(t, dir, QueueOptions{MaxAttempts: 1})
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	leaseAll(t, q, "h", 1, "n")
	release := make(chan struct{})
	var n atomic.Int32
	match := isKeyOf(keyEvent, "n"+DeadLetterSuffix)
	f := func(ws []bwrite) bool {
		if slices.ContainsFunc(ws, match) && n.Add(1) == 1 {
			<-release // the move's commit, held
			return true
		}
		return false
	}
	storeCommitHook(q, &f)
	done := make(chan error, 1)
	go func() { _, err := q.Nack(ctx, "h", []LeaseRef{{ID: "a", Attempt: 1}}, 0, "bad"); done <- err }()
	waitFor(t, func() bool { return n.Load() > 0 })
	q.core.close() // Close's first step; the writer stops after
	close(release)
	if err := <-done; err == nil {
		t.Fatal("Nack whose move failed: no error")
	}
	q.failCommit.Store(nil)
	q = reopenTestBadger(t, q, dir, QueueOptions{MaxAttempts: 1})
	// a had its one attempt: the first lease after the reopen moves it to
	// the dead-letter namespace (its lease ended as if released), and a
	// second one delivers it from there.
	got := leasedIDs(leaseAll(t, q, "h2", 10, "n", "n"+DeadLetterSuffix))
	got = append(got, leasedIDs(leaseAll(t, q, "h2", 10, "n", "n"+DeadLetterSuffix))...)
	if len(got) != 1 {
		t.Fatalf("after reopen leased %v, want a (its dead-lettering failed) once", got)
	}
}

func TestBadgerQueueFailedCorrection(t *testing.T) {
	// The ack fails, then the correction that follows it fails too: the
	// stored count must still end up right.
	dir := t.TempDir()
	ctx := context.Background()
	q, _ := openLeased(t, dir, QueueOptions{}, "a", "b")
	undo, matched := failCommitsCounted(q, 2, isKeyOf(keyAcks, "n"))
	if _, err := q.Ack(ctx, "h", []LeaseRef{{ID: "a", Attempt: 1}}); err == nil {
		t.Fatal("Ack whose commit failed: no error")
	}
	// The next group carries the correction, and fails with it: the one
	// writing the lease record the failed ack gave a, or this enqueue,
	// whichever the writer takes first.
	want := []string{"n/a", "n/b", "n/d"}
	if _, err := q.Enqueue(ctx, []Event{{ID: "c", Namespace: "n"}}); err == nil {
		want = []string{"n/a", "n/b", "n/c", "n/d"}
	}
	waitFor(t, func() bool { return matched() >= 2 })
	undo()
	publishTest(t, q, Event{ID: "d", Namespace: "n"}) // carries it again
	if err := q.Release(ctx, "h"); err != nil {
		t.Fatal(err)
	}
	q = reopenTestBadger(t, q, dir, QueueOptions{})
	if c := q.counters["n"]; c.count != int64(len(want)) {
		t.Errorf("stored count %d, want %d (%v)", c.count, len(want), want)
	}
	if got := leasedIDs(leaseAll(t, q, "h", 10, "n")); !slices.Equal(got, want) {
		t.Errorf("after reopen leased %v, want %v", got, want)
	}
}

func TestBadgerQueueCorrectionAfterDiskFull(t *testing.T) {
	// A correction that meets a group refused for disk space is kept for a
	// later group, not dropped.
	dir := t.TempDir()
	ctx := context.Background()
	q, _ := openLeased(t, dir, QueueOptions{}, "a", "b")
	real := *q.diskFree.Load()
	full := func(string) (uint64, error) { return 0, nil }
	undo := failAckOfA(t, q, 1)
	undo()
	q.diskFree.Store(&full)
	if _, err := q.Enqueue(ctx, []Event{{ID: "refused", Namespace: "n"}}); err == nil {
		t.Fatal("publish on a full disk: no error")
	}
	q.diskFree.Store(&real)
	publishTest(t, q, Event{ID: "later", Namespace: "n"})
	if err := q.Release(ctx, "h"); err != nil {
		t.Fatal(err)
	}
	q = reopenTestBadger(t, q, dir, QueueOptions{})
	if st, _ := q.Stats(ctx, "n"); st[0].Ready != 3 {
		t.Errorf("after reopen %d ready, want 3 (a, b, later)", st[0].Ready)
	}
}

func TestBadgerQueueFailingDiskDoesNotSpin(t *testing.T) {
	// With every commit failing and nothing asked of the queue, the
	// corrections wait for the next request instead of retrying at once.
	q, _ := openLeased(t, t.TempDir(), QueueOptions{}, "a", "b")
	undo := failCommitsWith(q, -1, isKeyOf(keyAcks, "n"))
	defer undo()
	q.Ack(context.Background(), "h", []LeaseRef{{ID: "a", Attempt: 1}})
	g0 := q.statGroups.Load()
	time.Sleep(200 * time.Millisecond)
	if n := q.statGroups.Load() - g0; n > 2 {
		t.Errorf("%d group commits in 200 ms with nothing asked", n)
	}
}

func TestBadgerQueuePipelinedFailedAck(t *testing.T) {
	// A later group, built before an earlier one's failure is known,
	// writes the chunk's ack record with the failed ack's bit: the record
	// is rewritten from memory after the failure.
	dir := t.TempDir()
	ctx := context.Background()
	q, _ := openLeased(t, dir, QueueOptions{}, "a", "b", "c")
	var n atomic.Int32
	match := isKeyOf(keyAcks, "n")
	f := func(ws []bwrite) bool { return slices.ContainsFunc(ws, match) && n.Add(1) == 1 }
	storeCommitHook(q, &f)
	q.syncMu.Lock() // holds the completer before it completes the failed group
	errA := make(chan error, 1)
	go func() { _, err := q.Ack(ctx, "h", []LeaseRef{{ID: "a", Attempt: 1}}); errA <- err }()
	waitFor(t, func() bool { return n.Load() >= 1 })
	g := q.statGroups.Load()
	errB := make(chan error, 1)
	go func() { _, err := q.Ack(ctx, "h", []LeaseRef{{ID: "b", Attempt: 1}}); errB <- err }()
	waitFor(t, func() bool { return q.statGroups.Load() > g })
	q.syncMu.Unlock()
	if err := <-errA; err == nil {
		t.Fatal("ack of a: no error")
	}
	if err := <-errB; err != nil {
		t.Fatal(err)
	}
	q.failCommit.Store(nil)
	publishTest(t, q, Event{ID: "d", Namespace: "n"}) // carries the rewrite
	if err := q.Release(ctx, "h"); err != nil {
		t.Fatal(err)
	}
	q = reopenTestBadger(t, q, dir, QueueOptions{})
	if got := leasedIDs(leaseAll(t, q, "h", 10, "n")); !slices.Equal(got, []string{"n/a", "n/c", "n/d"}) {
		t.Errorf("after reopen leased %v, want a (its ack failed), c, d", got)
	}
}

func TestBadgerQueueNoDeletionWhileSettling(t *testing.T) {
	// A chunk's deletion must wait for every commit settling its events:
	// here the ack of b (the chunk's last live event but a) completes while
	// the ack of a, which will fail, is still in flight.
	ctx := context.Background()
	q, _ := openLeased(t, t.TempDir(), QueueOptions{}, "a", "b")
	release := make(chan struct{})
	var entered atomic.Bool
	isA := func(w bwrite) bool { return len(w.ents) == 1 && w.ents[0].id == "a" }
	f := func(ws []bwrite) bool {
		if slices.ContainsFunc(ws, isA) && !entered.Swap(true) {
			<-release
			return true
		}
		return false
	}
	storeCommitHook(q, &f)
	g0 := q.statGroups.Load()
	q.syncMu.Lock()
	errB := make(chan error, 1)
	go func() { _, err := q.Ack(ctx, "h", []LeaseRef{{ID: "b", Attempt: 1}}); errB <- err }()
	waitFor(t, func() bool { return q.statGroups.Load() >= g0+1 })
	errA := make(chan error, 1)
	go func() { _, err := q.Ack(ctx, "h", []LeaseRef{{ID: "a", Attempt: 1}}); errA <- err }()
	waitFor(t, entered.Load)
	q.syncMu.Unlock()
	if err := <-errB; err != nil {
		t.Fatal(err)
	}
	q.syncMu.Lock()
	close(release)
	waitFor(t, func() bool { return q.statGroups.Load() >= g0+2 })
	time.Sleep(50 * time.Millisecond) // a deletion request, if any, is built now
	q.syncMu.Unlock()
	if err := <-errA; err == nil {
		t.Fatal("ack of a: no error")
	}
	q.failCommit.Store(nil)
	ls, err := q.Lease(ctx, LeaseRequest{Holder: "h2", Namespaces: []string{"n"}, Limit: 10, AckDeadline: time.Minute})
	if got := leasedIDs(ls); err != nil || !slices.Equal(got, []string{"n/a"}) {
		t.Fatalf("leased %v %v, want a again", got, err)
	}
}

func TestBadgerQueueSettledChunkDeletedLater(t *testing.T) {
	// A chunk whose deletion failed (every event of it settled) is deleted
	// after a reopen, when the read-ahead passes it.
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	publishTest(t, q, Event{ID: "a", Namespace: "n"}, Event{ID: "b", Namespace: "n"})
	isDeletion := func(w bwrite) bool { return w.del && isKeyOf(keyEvent, "n")(w) }
	undo := failCommitsWith(q, -1, isDeletion)
	ackAll(t, q, "h", leaseAll(t, q, "h", 2, "n"))
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	undo()
	if n := storedKeys(t, dir, keyEvent, "n"); n != 1 {
		t.Fatalf("%d chunks stored after the failed deletion, want the settled one", n)
	}
	q = openTestBadger(t, dir, QueueOptions{})
	publishTest(t, q, Event{ID: "c", Namespace: "n"})
	got := leaseAll(t, q, "h", 10, "n")
	if ids := leasedIDs(got); !slices.Equal(ids, []string{"n/c"}) {
		t.Fatalf("leased %v, want only c", ids)
	}
	ackAll(t, q, "h", got)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if n := storedKeys(t, dir, keyEvent, "n") + storedKeys(t, dir, keyAcks, "n"); n != 0 {
		t.Errorf("%d keys left after every event was settled", n)
	}
}

func TestBadgerQueueCountRepairedAtOpen(t *testing.T) {
	// A namespace counted empty that still holds an unsettled event (a
	// count drifted after a failed commit and a crash) delivers it again
	// after a reopen, and its count is repaired.
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	publishTest(t, q, Event{ID: "a", Namespace: "n", Data: []byte("x")})
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	setStored(t, dir, counterKey("n"), encodeCounter(nsCounter{}))
	q = openTestBadger(t, dir, QueueOptions{})
	st, err := q.Stats(context.Background(), "n")
	if err != nil || st[0].Ready != 1 || st[0].Bytes == 0 {
		t.Fatalf("after reopen: %+v %v, want 1 ready, its bytes counted", st, err)
	}
	if got := leasedIDs(leaseAll(t, q, "h", 10, "n")); !slices.Equal(got, []string{"n/a"}) {
		t.Fatalf("leased %v, want a", got)
	}
}

func TestBadgerQueueSweepKeepsMovesForLeaseRecords(t *testing.T) {
	// The open-time sweep of a namespace counted empty deletes a settled
	// chunk (here, its event dead-lettered) only after the lease records
	// are read: a delivery listed there must still see the move.
	dir := t.TempDir()
	ctx := context.Background()
	// Two attempts: a and c, leased once, are below the maximum when the
	// reopen ends their leases (at the maximum they would be dead-lettered
	// at their next lease, see TestMaxAttemptsAcrossReopen).
	opts := QueueOptions{MaxAttempts: 2}
	q := openTestBadger(t, dir, opts)
	for _, id := range []string{"a", "b", "c"} {
		publishTest(t, q, Event{ID: id, Namespace: "n"})
	}
	leaseAll(t, q, "h", 3, "n")
	if _, err := q.Nack(ctx, "h", []LeaseRef{{ID: "b", Attempt: 1}}, 0, "bad"); err != nil {
		t.Fatal(err)
	}
	if again := leaseAll(t, q, "h", 1, "n"); len(again) != 1 || again[0].Event.ID != "b" {
		t.Fatalf("lease after the nack: %+v", again)
	}
	isDeletion := func(w bwrite) bool { return w.del && isKeyOf(keyEvent, "n")(w) }
	undo := failCommitsWith(q, -1, isDeletion)
	if _, err := q.Nack(ctx, "h", []LeaseRef{{ID: "b", Attempt: 2}}, 0, "bad"); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	undo()
	// The count drifts to zero (as after a failed commit and a crash).
	setStored(t, dir, counterKey("n"), encodeCounter(nsCounter{}))
	q = openTestBadger(t, dir, opts)
	if st, _ := q.Stats(ctx, "n"); st[0].Ready != 2 {
		t.Errorf("after reopen %d ready, want 2 (a, c)", st[0].Ready)
	}
	if got := leasedIDs(leaseAll(t, q, "h2", 10, "n")); !slices.Equal(got, []string{"n/a", "n/c"}) {
		t.Errorf("after reopen leased %v, want a and c", got)
	}
}

func TestBadgerQueueRecountAfterUncleanClose(t *testing.T) {
	// A publish whose commit failed is counted before it is written; a
	// group already built with the higher count may commit, and the
	// correction rides on a later commit. When that one fails too (or the
	// process is killed first), the stored count stays too high (found by
	// TestQueueModel: namespaces drained with bytes left over). Close
	// marks the counters exact only once every correction is written, and
	// an open without the mark recounts every namespace from its chunks.
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	publishTest(t, q, Event{ID: "a", Namespace: "n", Data: []byte("x")}, Event{ID: "b", Namespace: "n", Data: []byte("yy")})
	want, _ := q.Stats(context.Background(), "n")
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if !storedClean(t, dir) {
		t.Fatal("no clean mark after a clean Close")
	}
	// What a crash leaves: no mark, a count off.
	withStoredDB(t, dir, func(db *badger.DB) error {
		return db.Update(func(txn *badger.Txn) error {
			if err := txn.Delete(metaClean); err != nil {
				return err
			}
			return txn.Set(counterKey("n"), encodeCounter(nsCounter{count: 7, bytes: 700}))
		})
	})
	q = openTestBadger(t, dir, QueueOptions{})
	got, err := q.Stats(context.Background(), "n")
	if err != nil || got[0].Ready != 2 || got[0].Bytes != want[0].Bytes {
		t.Fatalf("after an unclean close: %+v %v, want 2 ready and %d bytes", got, err, want[0].Bytes)
	}
	ls := leaseAll(t, q, "h", 10, "n")
	if ids := leasedIDs(ls); !slices.Equal(ids, []string{"n/a", "n/b"}) {
		t.Fatalf("leased %v, want a and b", ids)
	}
	ackAll(t, q, "h", ls)

	// A Close whose corrections fail leaves no mark.
	failCommitsWith(q, -1, func(bwrite) bool { return true })
	if _, err := q.Enqueue(context.Background(), []Event{{ID: "c", Namespace: "n"}}); err == nil {
		t.Fatal("Enqueue with failing commits succeeded")
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if storedClean(t, dir) {
		t.Fatal("clean mark after a Close whose corrections failed")
	}

	// After a clean Close the stored counts are trusted (no recount: a
	// count edited in between stays).
	q = openTestBadger(t, dir, QueueOptions{})
	publishTest(t, q, Event{ID: "e", Namespace: "n"})
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	setStored(t, dir, counterKey("n"), encodeCounter(nsCounter{count: 7, bytes: 700}))
	q = openTestBadger(t, dir, QueueOptions{})
	if got, _ := q.Stats(context.Background(), "n"); got[0].Bytes != 700 {
		t.Fatalf("after a clean close: %+v, want the stored count trusted", got)
	}
}

// storedClean reports whether a closed queue's directory has the clean mark.
func storedClean(t *testing.T, dir string) bool {
	t.Helper()
	var found bool
	withStoredDB(t, dir, func(db *badger.DB) error {
		return db.View(func(txn *badger.Txn) error {
			_, err := txn.Get(metaClean)
			found = err == nil
			if errors.Is(err, badger.ErrKeyNotFound) {
				return nil
			}
			return err
		})
	})
	return found
}

func TestBadgerQueueRecountSkipsDamagedNamespace(t *testing.T) {
	// One undecodable event must not keep the queue from opening after a
	// crash (found in review): the damaged namespace keeps its stored
	// count and fails where the damage is, the others are recounted.
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	publishTest(t, q, Event{ID: "a", Namespace: "good"})
	publishTest(t, q, Event{ID: "b", Namespace: "bad"})
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	withStoredDB(t, dir, func(db *badger.DB) error {
		return db.Update(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: nsPrefix(keyEvent, "bad")})
			it.Rewind()
			first := keySeq(it.Item().KeyCopy(nil))
			it.Close()
			// A well-formed chunk holding one event of an unknown format.
			if err := txn.Set(seqKey(keyEvent, "bad", first), encodeChunk(nil, []uint64{first}, [][]byte{{9, 9}})); err != nil {
				return err
			}
			if err := txn.Set(counterKey("good"), encodeCounter(nsCounter{count: 5, bytes: 500})); err != nil {
				return err
			}
			return txn.Delete(metaClean)
		})
	})
	q = openTestBadger(t, dir, QueueOptions{})
	if st, err := q.Stats(context.Background(), "good"); err != nil || st[0].Ready != 1 || st[0].Bytes == 500 {
		t.Fatalf("Stats(good) after the recount: %+v %v, want 1 ready, recounted", st, err)
	}
	if _, err := q.Lease(context.Background(), LeaseRequest{Holder: "h", Namespaces: []string{"bad"}, Limit: 1, AckDeadline: time.Minute}); err == nil {
		t.Fatal("leasing from the damaged namespace: no error")
	}
}

func TestBadgerQueueStaleCleanMark(t *testing.T) {
	// A clean mark that an older H3X left in place (it does not delete the
	// mark at open) is not trusted once the sequence moved on.
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	withStoredDB(t, dir, func(db *badger.DB) error {
		return db.Update(func(txn *badger.Txn) error {
			item, err := txn.Get(metaHWM)
			if err != nil {
				return err
			}
			v, _ := item.ValueCopy(nil)
			if err := txn.Set(metaHWM, binary.BigEndian.AppendUint64(nil, binary.BigEndian.Uint64(v)+10)); err != nil {
				return err
			}
			return txn.Set(counterKey("n"), encodeCounter(nsCounter{count: 3, bytes: 300}))
		})
	})
	q = openTestBadger(t, dir, QueueOptions{})
	if st, _ := q.Stats(context.Background(), "n"); st[0].Ready != 1 || st[0].Bytes == 300 {
		t.Fatalf("after a stale mark: %+v, want the events recounted", st)
	}
}

// A queue closed without ever storing an event used to warn at Close that
// "the next open recounts the stored events" (its clean mark could not be
// written: there was no high-water mark to copy): every clean stop of a
// fresh server logged a warning.
func TestBadgerQueueFreshCloseLogsNothing(t *testing.T) {
	var logs bytes.Buffer
	q, err := OpenBadgerQueue(t.TempDir(), QueueOptions{Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if logs.Len() != 0 {
		t.Errorf("Close of a fresh queue logged: %s", logs.String())
	}
}

// storeCommitHook installs f as q's commit hook (failCommit) once every
// state change submitted before has been written: a Lease returns before
// its record is committed when the lease journal has it, and a hook meant
// for what the test does next must not see (and fail, or hold) that record.
func storeCommitHook(q *badgerQueue, f *func([]bwrite) bool) {
	writerCaughtUp(q)
	q.failCommit.Store(f)
}

// slowLeaseRecords makes q's writer sleep for d before committing a
// transaction that writes a lease record (until failCommit is reset).
func slowLeaseRecords(q *badgerQueue, d time.Duration) {
	slow := func(ws []bwrite) bool {
		if slices.ContainsFunc(ws, func(w bwrite) bool { return len(w.key) > 0 && w.key[0] == keyLeaseRec && !w.del }) {
			time.Sleep(d)
		}
		return false
	}
	q.failCommit.Store(&slow)
}

// attemptContinues checks that q, reopened after event "a" of namespace "n"
// was delivered with attempt prev, delivers it next with prev+1, and that an
// ack of the old delivery is stale.
func attemptContinues(t *testing.T, q Queue, prev int) {
	t.Helper()
	ls := leaseAll(t, q, "h2", 1, "n")
	if len(ls) != 1 || ls[0].Attempt != prev+1 {
		t.Fatalf("after the reopen (attempt %d delivered before): %+v, want attempt %d", prev, ls, prev+1)
	}
	res, err := q.Ack(context.Background(), "h", []LeaseRef{{ID: "a", Attempt: prev}})
	if err != nil || res[0].Status != SettleStale {
		t.Fatalf("ack of the delivery before the reopen: %+v, %v; want stale", res, err)
	}
}

// withoutJournal closes q's lease journal: Lease then waits for Badger to
// have its records, as it does when the journal is full or broken.
func withoutJournal(q *badgerQueue) {
	q.journal.close(false)
}

// TestBadgerLeaseRecordOutlivesAKill: a Lease returns only once its lease
// record is written, to the lease journal or to Badger, so a kill -9 right
// after it cannot make the next delivery reuse the attempt number
// (RELIABILITY.md finding 3; the record used to be written by a later
// group, and a kill in between lost it: the old delivery's ack then settled
// the new one). The writer is slowed by a hook; the kill is a copy of the
// live directory.
func TestBadgerLeaseRecordOutlivesAKill(t *testing.T) {
	for _, d := range []Durability{DurabilityFsync, DurabilityNoSync} {
		for _, journal := range []bool{true, false} {
			t.Run(fmt.Sprintf("%v/journal=%v", d, journal), func(t *testing.T) {
				dir := t.TempDir()
				q := openTestBadger(t, dir, QueueOptions{Durability: d})
				if !journal {
					withoutJournal(q)
				}
				publishTest(t, q, Event{ID: "a", Namespace: "n"})
				slowLeaseRecords(q, 100*time.Millisecond)
				ls := leaseAll(t, q, "h", 1, "n")
				crashed := copyLive(t, dir)
				q.failCommit.Store(nil)

				attemptContinues(t, openTestBadger(t, crashed, QueueOptions{Durability: d}), ls[0].Attempt)
			})
		}
	}
}

// TestBadgerLeaseRecordBesideARefusedEnqueue: a lease record pushed with an
// enqueue refused for disk space (free between half the reserve and the
// reserve, where writes that add nothing are still made) is written all the
// same. It used to share the enqueue's group and be refused with it: the
// record was lost for good, and a restart (here a clean one) reused the
// attempt number, so the old delivery's ack settled the new one. (Found by
// review.)
func TestBadgerLeaseRecordBesideARefusedEnqueue(t *testing.T) {
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	publishTest(t, q, Event{ID: "a", Namespace: "n"})

	gate := make(chan struct{})
	held := make(chan struct{})
	tight := q.reserve * 3 / 4 // enough for a group that adds nothing
	hold := func(ws []bwrite) bool {
		for _, w := range ws {
			for _, e := range w.ents {
				if e.id == "x" {
					select { // the writer alone runs this hook
					case <-held:
					default:
						close(held)
					}
					<-gate // hold the writer in the group of x
				}
			}
		}
		return false
	}
	storeCommitHook(q, &hold)

	go q.Enqueue(context.Background(), []Event{{ID: "x", Namespace: "other"}}) // group 1, held
	waitOps := func(n int) {
		for range 500 {
			q.wmu.Lock()
			k := len(q.wops)
			q.wmu.Unlock()
			if k >= n {
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
		t.Fatalf("writer never had %d ops waiting", n)
	}
	<-held // group 1 taken by the writer, which waits in it
	enqErr := make(chan error, 1)
	go func() {
		_, err := q.Enqueue(context.Background(), []Event{{ID: "y", Namespace: "other"}})
		enqErr <- err
	}()
	waitOps(1)
	type res struct {
		ls  []Lease
		err error
	}
	lr := make(chan res, 1)
	go func() {
		ls, err := q.Lease(context.Background(), LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 1, AckDeadline: time.Minute})
		lr <- res{ls, err}
	}()
	waitOps(2) // the enqueue of y and the lease record wait for group 2
	hook := func(string) (uint64, error) { return tight, nil }
	q.diskFree.Store(&hook)
	close(gate)
	r := <-lr
	if r.err != nil || len(r.ls) != 1 {
		t.Fatalf("lease: %+v %v", r.ls, r.err)
	}
	var e *Error
	if err := <-enqErr; !errors.As(err, &e) || !strings.Contains(e.Message, "disk full") {
		t.Fatalf("enqueue below the reserve: %v, want a disk-full error", err)
	}
	real := diskFree
	q.diskFree.Store(&real)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}

	attemptContinues(t, openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync}), r.ls[0].Attempt)
}

// TestBadgerLeaseGivesBackWhenCtxEndsBeforeItsRecord: a Lease whose ctx ends
// before its lease record is written fails with ctx's error and gives its
// deliveries back unseen (they never went out). It used to return them
// with a nil error, so a kill -9 right after reused their attempt numbers.
// (Found by review.)
func TestBadgerLeaseGivesBackWhenCtxEndsBeforeItsRecord(t *testing.T) {
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	withoutJournal(q) // with it, Lease does not wait for Badger
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	slowLeaseRecords(q, 300*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	ls, err := q.Lease(ctx, LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 1, AckDeadline: time.Minute})
	if !errors.Is(err, context.DeadlineExceeded) || len(ls) != 0 {
		t.Fatalf("lease whose ctx ended before its record was written: %+v, %v; want none and the ctx error", ls, err)
	}
	q.failCommit.Store(nil)
	ls2 := leaseAll(t, q, "h2", 1, "n")
	if len(ls2) != 1 || ls2[0].Attempt != 1 {
		t.Fatalf("after the failed lease: %+v, want a at attempt 1 (given back unseen)", ls2)
	}
}

// openWithOverdueA opens a queue in dir (opts with MaxAttempts 1) holding
// a and b in namespace n, delivers a, and reopens it: the restart ends a's
// lease as released, so a is ready at attempt 1 = MaxAttempts, to be
// dead-lettered by the next Lease.
func openWithOverdueA(t *testing.T, dir string, opts QueueOptions) *badgerQueue {
	t.Helper()
	q := openTestBadger(t, dir, opts)
	publishTest(t, q, Event{ID: "a", Namespace: "n"}, Event{ID: "b", Namespace: "n"})
	if ls := leaseAll(t, q, "h", 1, "n"); len(ls) != 1 || ls[0].Event.ID != "a" {
		t.Fatalf("first lease: %+v", ls)
	}
	return reopenTestBadger(t, q, dir, opts)
}

// TestBadgerLeaseRecordApartFromItsMoves: a Lease that also dead-letters an
// overdue event writes its lease record apart from the move, which is
// refused for disk space below the reserve where the record is written. It
// used to push both in one op, refused whole: the record was lost, yet Lease
// returned the delivery. (Found by review.)
func TestBadgerLeaseRecordApartFromItsMoves(t *testing.T) {
	dir := t.TempDir()
	opts := QueueOptions{MaxAttempts: 1, Durability: DurabilityNoSync}
	q := openWithOverdueA(t, dir, opts)

	tight := q.reserve * 3 / 4 // between reserve/2 and reserve
	hook := func(string) (uint64, error) { return tight, nil }
	q.diskFree.Store(&hook)
	ls, err := q.Lease(context.Background(), LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 1, AckDeadline: time.Minute})
	if err != nil {
		t.Fatalf("lease: %v", err)
	}
	if len(ls) != 1 || ls[0].Event.ID != "b" || ls[0].Attempt != 1 {
		t.Fatalf("lease in the band: %+v, want b at attempt 1", ls)
	}
	real := diskFree
	q.diskFree.Store(&real)

	// kill -9 right after Lease returned.
	crash := copyLive(t, dir)
	q2 := openTestBadger(t, crash, opts)
	for _, l := range leaseAll(t, q2, "h2", 10, "n") {
		if l.Event.ID == "b" && l.Attempt <= ls[0].Attempt {
			t.Errorf("after a kill: b delivered at attempt %d again (its lease record was refused with the dead-letter move of a)", l.Attempt)
		}
	}
	res, err := q2.Ack(context.Background(), "h", []LeaseRef{{ID: "b", Attempt: ls[0].Attempt}})
	if err != nil || res[0].Status != SettleStale {
		t.Errorf("ack of the delivery before the kill: %+v, %v; want stale", res, err)
	}
}

// TestBadgerRefusedMoveKeepsItsRecord: a dead-letter move refused for disk
// space (free space between half the reserve and the reserve) is undone;
// the event gets a lease record of its own again. It used to be left
// without one (the move had dropped it), so a neighbour's ack of the same
// Lease call, written there, deleted their shared record: after a kill the
// event came back at attempt 1 although it had had its MaxAttempts
// delivery. The refused move's Nack also answered success; it now fails
// with the disk-full error. (Found by review.)
func TestBadgerRefusedMoveKeepsItsRecord(t *testing.T) {
	dir := t.TempDir()
	opts := QueueOptions{MaxAttempts: 1, Durability: DurabilityNoSync}
	q := openTestBadger(t, dir, opts)
	publishTest(t, q, Event{ID: "a", Namespace: "n"}, Event{ID: "b", Namespace: "n"})
	ls := leaseAll(t, q, "h", 2, "n") // one Lease call: one record for a and b
	if len(ls) != 2 {
		t.Fatalf("lease: %+v", ls)
	}
	tight := q.reserve * 3 / 4
	hook := func(string) (uint64, error) { return tight, nil }
	q.diskFree.Store(&hook)
	ctx := context.Background()
	// The move is refused (it adds an event): the Nack fails, and a is
	// ready again in n, overdue.
	var e *Error
	if _, err := q.Nack(ctx, "h", []LeaseRef{{ID: "a", Attempt: 1}}, 0, "bad"); !errors.As(err, &e) || !strings.Contains(e.Message, "disk full") {
		t.Fatalf("nack whose move is refused: %v, want the disk-full error", err)
	}
	if st, _ := q.Stats(ctx, "n"+DeadLetterSuffix); len(st) == 1 && st[0].Ready != 0 {
		t.Fatalf("a was dead-lettered in the band: %+v", st)
	}
	if res, err := q.Ack(ctx, "h", []LeaseRef{{ID: "b", Attempt: 1}}); err != nil || res[0].Status != SettleOK {
		t.Fatalf("ack of b in the band: %+v %v (settlements are written there)", res, err)
	}
	real := diskFree
	q.diskFree.Store(&real)

	crash := copyLive(t, dir) // kill -9
	q2 := openTestBadger(t, crash, opts)
	for _, l := range leaseAll(t, q2, "h2", 10, "n", "n"+DeadLetterSuffix) {
		if l.Event.ID == "a" && l.Event.Namespace == "n" {
			t.Errorf("after a kill: a delivered in n at attempt %d; it had its MaxAttempts=1 delivery (attempt 1) already and should be dead-lettered", l.Attempt)
		}
	}
}

// TestBadgerFailedAckKeepsItsRecord: an event whose ack failed to commit
// gets a lease record of its own again. It used to be left without one, so
// the ack of a neighbour (same Lease call, same record) deleted it, and
// after a restart the event's next delivery reused attempt 1. (Found by
// review.)
func TestBadgerFailedAckKeepsItsRecord(t *testing.T) {
	dir := t.TempDir()
	q, ls := openLeased(t, dir, QueueOptions{}, "a", "b")
	undo := failAckOfA(t, q, 1)
	undo()
	ackAll(t, q, "h", ls[1:2])
	q = reopenTestBadger(t, q, dir, QueueOptions{})
	for _, l := range leaseAll(t, q, "h2", 10, "n") {
		if l.Event.ID == "a" && l.Attempt <= 1 {
			t.Errorf("after a restart: a delivered at attempt %d, reusing the attempt of its delivery before it", l.Attempt)
		}
	}
}

// TestBadgerGiveBackAfterExpiry: a Lease whose ctx ends before its record is
// written gives its deliveries back uncounted, also one whose lease expired
// meanwhile (an ack deadline shorter than the record's write). The expired
// one used to keep the attempt counted although it never went out. (Found
// by review; at MaxAttempts such an expiry dead-letters the event first,
// and it stays dead-lettered.)
func TestBadgerGiveBackAfterExpiry(t *testing.T) {
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{MaxAttempts: 2, Durability: DurabilityNoSync})
	withoutJournal(q) // with it, Lease does not wait for Badger
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	slowLeaseRecords(q, 300*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	ls, err := q.Lease(ctx, LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 1, AckDeadline: 20 * time.Millisecond})
	if !errors.Is(err, context.DeadlineExceeded) || len(ls) != 0 {
		t.Fatalf("lease: %+v %v, want none and ctx's error", ls, err)
	}
	q.failCommit.Store(nil)
	ls = leaseAll(t, q, "h2", 1, "n")
	if len(ls) != 1 || ls[0].Attempt != 1 {
		t.Fatalf("after the failed lease, whose lease expired first: %+v, want a at attempt 1", ls)
	}
}

// TestBadgerUnseenNackRecordApartFromMoves: an unseen Nack that also
// dead-letters another event writes the replacement lease record apart from
// the move, which is refused below the reserve. They used to share an op,
// refused whole: the record was lost, a neighbour's ack deleted the old
// shared one, and after a kill or a clean restart the event's attempt count
// was gone (the Lease-only split of c8fbaf8 missed it). (Found by review.)
func TestBadgerUnseenNackRecordApartFromMoves(t *testing.T) {
	for _, restart := range []string{"kill", "clean"} {
		t.Run(restart, func(t *testing.T) {
			dir := t.TempDir()
			opts := QueueOptions{MaxAttempts: 2, Durability: DurabilityNoSync}
			q := openTestBadger(t, dir, opts)
			ctx := context.Background()
			publishTest(t, q, Event{ID: "a", Namespace: "n"}, Event{ID: "b", Namespace: "n"}, Event{ID: "c", Namespace: "n"})
			leaseAll(t, q, "h", 2, "n") // a@1, b@1
			if _, err := q.Nack(ctx, "h", []LeaseRef{{ID: "a", Attempt: 1}, {ID: "b", Attempt: 1}}, 0, "again"); err != nil {
				t.Fatal(err)
			}
			att := map[string]int{}
			for _, l := range leaseAll(t, q, "h", 3, "n") { // one call, one record: a@2, b@2, c@1
				att[l.Event.ID] = l.Attempt
			}
			if att["a"] != 2 || att["b"] != 2 || att["c"] != 1 {
				t.Fatalf("second lease: %v", att)
			}
			tight := q.reserve * 3 / 4
			hook := func(string) (uint64, error) { return tight, nil }
			q.diskFree.Store(&hook)
			// a given back unseen (its count goes back to 1), b
			// dead-lettered (attempt 2 = MaxAttempts): one call, whose
			// move is refused.
			_, err := q.Nack(ctx, "h", []LeaseRef{{ID: "a", Attempt: 2, Unseen: true}, {ID: "b", Attempt: 2}}, 0, "bad")
			t.Logf("nack in the band: %v", err)
			if res, err := q.Ack(ctx, "h", []LeaseRef{{ID: "c", Attempt: 1}}); err != nil || res[0].Status != SettleOK {
				t.Fatalf("ack of c in the band: %+v %v", res, err)
			}
			real := diskFree
			q.diskFree.Store(&real)
			time.Sleep(50 * time.Millisecond)

			var q2 *badgerQueue
			if restart == "kill" {
				q2 = openTestBadger(t, copyLive(t, dir), opts)
			} else {
				q2 = reopenTestBadger(t, q, dir, opts)
			}
			for _, l := range leaseAll(t, q2, "h2", 10, "n") {
				if l.Event.ID == "a" {
					t.Logf("after the %s: a delivered at attempt %d", restart, l.Attempt)
					if l.Attempt <= 1 {
						t.Errorf("after a %s: a delivered at attempt %d, reusing the attempt of its seen delivery 1 (count 1 before)", restart, l.Attempt)
					}
				}
			}
			res, err := q2.Ack(ctx, "h", []LeaseRef{{ID: "a", Attempt: 1}})
			t.Logf("ack of a's attempt-1 delivery from before the %s: %+v %v", restart, res, err)
		})
	}
}

// ackFailsBesideNeighbour opens a queue in dir, leases a (namespace n) and b
// (namespace m) in one call (one lease record), and acks both with the
// completer held in its sync (q.syncMu, still held on return): a's ack
// commit fails, then b's commits. onRecordOfA, if not nil, runs in the writer
// before a transaction that writes a lease record naming a.
func ackFailsBesideNeighbour(t *testing.T, dir string, opts QueueOptions, onRecordOfA func()) (q *badgerQueue, ackA, ackB chan error) {
	t.Helper()
	q = openTestBadger(t, dir, opts)
	ctx := context.Background()
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	publishTest(t, q, Event{ID: "b", Namespace: "m"})
	if ls := leaseAll(t, q, "h", 2, "n", "m"); len(ls) != 2 {
		t.Fatalf("lease: %+v", ls)
	}
	isAckN := isKeyOf(keyAcks, "n")
	isAckM := isKeyOf(keyAcks, "m")
	var once atomic.Bool
	failed := make(chan struct{}, 1)
	sawB := make(chan struct{}, 1)
	f := func(ws []bwrite) bool {
		for _, w := range ws {
			switch {
			case isAckN(w) && !w.del:
				if once.CompareAndSwap(false, true) {
					failed <- struct{}{}
					return true // a's ack fails, once
				}
			case isAckM(w):
				select {
				case sawB <- struct{}{}:
				default:
				}
			case onRecordOfA != nil && len(w.key) > 0 && w.key[0] == keyLeaseRec && !w.del && w.rec != nil:
				// The stored record names no ID (encodeLeaseRec): the
				// entries it was written from do.
				for _, e := range w.rec.entries {
					if e.id == "a" {
						onRecordOfA()
					}
				}
			}
		}
		return false
	}
	storeCommitHook(q, &f)
	q.syncMu.Lock() // the completer waits in its sync; the writer goes on
	ackA, ackB = make(chan error, 1), make(chan error, 1)
	go func() { _, err := q.Ack(ctx, "h", []LeaseRef{{ID: "a", Attempt: 1}}); ackA <- err }()
	<-failed
	go func() { _, err := q.Ack(ctx, "h", []LeaseRef{{ID: "b", Attempt: 1}}); ackB <- err }()
	<-sawB
	time.Sleep(100 * time.Millisecond) // b's group (deleting the shared record, once) commits
	return q, ackA, ackB
}

// attemptNotReused checks that q delivers a again above attempt 1.
func attemptNotReused(t *testing.T, q Queue, after string) {
	t.Helper()
	for _, l := range leaseAll(t, q, "h2", 10, "n", "m") {
		t.Logf("%s: %s/%s at attempt %d", after, l.Event.Namespace, l.Event.ID, l.Attempt)
		if l.Event.ID == "a" && l.Attempt <= 1 {
			t.Errorf("%s: a delivered at attempt %d again (its delivery at attempt 1 went out; the old ack would settle the new one)", after, l.Attempt)
		}
	}
}

// TestBadgerFailedAckRecordOutlivesNeighbourAck: the lease record of an event
// whose ack fails is never deleted by a neighbour's ack committed meanwhile:
// a removal takes its entry off the record only once it is durable. The
// failed ack's event used to get a new record later (pushed by the
// completer), after the writer had committed the neighbour's ack, which
// deleted the shared record: a kill in between lost the event's attempt
// count. (Found by review.)
func TestBadgerFailedAckRecordOutlivesNeighbourAck(t *testing.T) {
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityFsync}
	gate := make(chan struct{})
	blocked := make(chan struct{}, 1)
	q, ackA, ackB := ackFailsBesideNeighbour(t, dir, opts, func() {
		select {
		case blocked <- struct{}{}:
		default:
		}
		<-gate
	})
	q.syncMu.Unlock()
	if err := <-ackA; err == nil {
		t.Fatal("ack of a: no error")
	}
	if err := <-ackB; err != nil {
		t.Fatalf("ack of b: %v", err)
	}
	select {
	case <-blocked: // a record for a is being written (the old design)
	case <-time.After(300 * time.Millisecond):
	}
	crash := copyLive(t, dir) // kill -9 (before any new record for a is written)
	close(gate)
	q.failCommit.Store(nil)
	attemptNotReused(t, openTestBadger(t, crash, opts), "after a kill")
}

// TestBadgerFailedAckDuringCloseKeepsRecord: the same while the queue
// closes (restore does nothing once the core is closed): the event whose
// ack failed kept no record after a neighbour's ack, and a clean reopen
// reused its attempt number. (Found by review.)
func TestBadgerFailedAckDuringCloseKeepsRecord(t *testing.T) {
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityFsync}
	q, ackA, ackB := ackFailsBesideNeighbour(t, dir, opts, nil)
	closed := make(chan error, 1)
	go func() { closed <- q.Close() }()
	for {
		q.core.mu.Lock()
		c := q.core.closed
		q.core.mu.Unlock()
		if c {
			break
		}
		time.Sleep(time.Millisecond)
	}
	q.syncMu.Unlock()
	t.Logf("ack a: %v; ack b: %v; close: %v", <-ackA, <-ackB, <-closed)
	q.failCommit.Store(nil)
	attemptNotReused(t, openTestBadger(t, dir, opts), "after a clean reopen")
}

// TestBadgerUnwrittenRecordThenFailedAck: an event whose lease record was
// never written (its commit failed) and whose ack then failed too gets a
// record when it is made ready again, so a kill does not hand out its
// attempt number again. (Found by review: keeping the intact in-memory
// record on a failed removal skipped the new one.)
func TestBadgerUnwrittenRecordThenFailedAck(t *testing.T) {
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityNoSync}
	q := openTestBadger(t, dir, opts)
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	undo := failCommitsWith(q, 1, func(w bwrite) bool { return len(w.key) > 0 && w.key[0] == keyLeaseRec && !w.del })
	ls := leaseAll(t, q, "h", 1, "n")
	undo()
	if len(ls) != 1 || ls[0].Attempt != 1 {
		t.Fatalf("lease: %+v", ls)
	}
	undo = failCommitsWith(q, 1, isKeyOf(keyAcks, "n"))
	if _, err := q.Ack(context.Background(), "h", []LeaseRef{{ID: "a", Attempt: 1}}); err == nil {
		t.Fatal("ack whose commit failed: no error")
	}
	undo()
	// The restored record's group written: groups complete in order, so
	// it has once a barrier queued after it has.
	writerCaughtUp(q)
	q2 := openTestBadger(t, copyLive(t, dir), opts)
	got := leaseAll(t, q2, "h2", 1, "n")
	if len(got) != 1 || got[0].Attempt <= 1 {
		t.Fatalf("after a kill: %+v, want a at attempt 2 (delivered at 1 before)", got)
	}
}
