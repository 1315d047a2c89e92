package h3x

import (
	"context"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// TestBadgerRefusedLeaseRecordWrittenBeforeClose: with less free space than
// half the reserve, every group is refused, lease records included, and
// Lease still hands its deliveries out (consumers keep fetching on a full
// disk). The refused record is kept and written by Close: after a clean
// restart the next delivery continues the count, and an ack of the
// delivery made before is stale.
func TestBadgerRefusedLeaseRecordWrittenBeforeClose(t *testing.T) {
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityNoSync}
	q := openTestBadger(t, dir, opts)
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	low := q.reserve / 4
	hook := func(string) (uint64, error) { return low, nil }
	q.diskFree.Store(&hook)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ls, err := q.Lease(ctx, LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 1, AckDeadline: time.Minute})
	real := diskFree
	q.diskFree.Store(&real)
	if err != nil || len(ls) != 1 {
		t.Fatalf("Lease below half the reserve: %v, %v; want the delivery (consumers keep fetching on a full disk)", ls, err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	attemptContinues(t, openTestBadger(t, dir, opts), ls[0].Attempt)
}

// TestBadgerFailedLeaseRecordWrittenBeforeClose: a lease record whose
// commit fails (its Lease still returns the deliveries) is written again
// with a later group, at the latest by Close, for a first and for a later
// delivery.
func TestBadgerFailedLeaseRecordWrittenBeforeClose(t *testing.T) {
	for _, second := range []bool{false, true} {
		name := "first delivery"
		if second {
			name = "second delivery"
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			opts := QueueOptions{Durability: DurabilityNoSync}
			q := openTestBadger(t, dir, opts)
			publishTest(t, q, Event{ID: "a", Namespace: "n"})
			ctx := context.Background()
			if second {
				ls := leaseAll(t, q, "h", 1, "n")
				if _, err := q.Nack(ctx, "h", []LeaseRef{{ID: "a", Attempt: ls[0].Attempt}}, 0, "again"); err != nil {
					t.Fatal(err)
				}
			}
			undo := failCommitsWith(q, 1, func(w bwrite) bool { return len(w.key) > 0 && w.key[0] == keyLeaseRec && !w.del })
			lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			ls, err := q.Lease(lctx, LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 1, AckDeadline: time.Minute})
			undo()
			if err != nil || len(ls) != 1 {
				t.Fatalf("Lease whose record's commit failed: %v, %v; want the delivery", ls, err)
			}
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			attemptContinues(t, openTestBadger(t, dir, opts), ls[0].Attempt)
		})
	}
}

// liveRecords counts the lease records in q's database, once the writer
// has nothing waiting.
func liveRecords(t *testing.T, q *badgerQueue) (n int) {
	t.Helper()
	waitFor(t, func() bool { q.wmu.Lock(); defer q.wmu.Unlock(); return len(q.wops) == 0 })
	time.Sleep(50 * time.Millisecond)
	q.ts.view(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyLeaseRec}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			n++
		}
		return nil
	})
	return n
}

// TestBadgerLeaseRecordsDoNotLeak: random leases (some with a ctx that ends
// at once), acks, nacks (delayed, unseen), extensions, releases and
// expiries with MaxAttempts, no failures; once everything is settled, no
// lease record is left in the running queue.
func TestBadgerLeaseRecordsDoNotLeak(t *testing.T) {
	for seed := range uint64(envInt("H3X_RECORD_SEEDS", 4)) {
		dir := t.TempDir()
		opts := QueueOptions{MaxAttempts: 3, Durability: DurabilityNoSync}
		q := openTestBadger(t, dir, opts)
		r := rand.New(rand.NewPCG(seed, 3))
		ctx := context.Background()
		holders := []string{"h1", "h2", "h3"}
		held := map[string][]Lease{}
		for i := 0; i < 40; i++ {
			var evs []Event
			for j := 0; j < 10; j++ {
				evs = append(evs, Event{Namespace: []string{"a", "b"}[r.IntN(2)]})
			}
			publishTest(t, q, evs...)
		}
		nss := []string{"a", "b", "a" + DeadLetterSuffix, "b" + DeadLetterSuffix}
		for step := 0; step < 1500; step++ {
			h := holders[r.IntN(3)]
			switch k := r.IntN(100); {
			case k < 35:
				dl := time.Minute
				if r.IntN(3) == 0 {
					dl = time.Duration(1+r.IntN(5)) * time.Millisecond
				}
				lctx, cancel := ctx, func() {}
				if r.IntN(10) == 0 {
					lctx, cancel = context.WithTimeout(ctx, time.Duration(r.IntN(200))*time.Microsecond)
				}
				ls, err := q.Lease(lctx, LeaseRequest{Holder: h, Namespaces: nss, Limit: 1 + r.IntN(8), AckDeadline: dl})
				cancel()
				if err == nil {
					held[h] = append(held[h], ls...)
				}
			case k < 60 && len(held[h]) > 0:
				n := 1 + r.IntN(len(held[h]))
				var refs []LeaseRef
				for _, l := range held[h][:n] {
					refs = append(refs, LeaseRef{ID: l.Event.ID, Namespace: l.Event.Namespace, Attempt: l.Attempt})
				}
				held[h] = held[h][n:]
				if _, err := q.Ack(ctx, h, refs); err != nil {
					t.Fatal(err)
				}
			case k < 80 && len(held[h]) > 0:
				n := 1 + r.IntN(len(held[h]))
				var refs []LeaseRef
				unseen := r.IntN(3) == 0
				for _, l := range held[h][:n] {
					refs = append(refs, LeaseRef{ID: l.Event.ID, Namespace: l.Event.Namespace, Attempt: l.Attempt, Unseen: unseen})
				}
				held[h] = held[h][n:]
				d := time.Duration(0)
				if r.IntN(2) == 0 {
					d = time.Duration(r.IntN(3)) * time.Millisecond
				}
				if _, err := q.Nack(ctx, h, refs, d, "x"); err != nil {
					t.Fatal(err)
				}
			case k < 85 && len(held[h]) > 0:
				l := held[h][0]
				q.Extend(ctx, h, []LeaseRef{{ID: l.Event.ID, Namespace: l.Event.Namespace, Attempt: l.Attempt}}, time.Millisecond)
			case k < 90:
				if err := q.Release(ctx, h); err != nil {
					t.Fatal(err)
				}
				held[h] = nil
			case k < 92:
				time.Sleep(3 * time.Millisecond) // expiries
			}
		}
		for _, h := range holders {
			q.Release(ctx, h)
		}
		// Drain.
		for round := 0; ; round++ {
			ls, err := q.Lease(ctx, LeaseRequest{Holder: "d", Namespaces: nss, Limit: 100, AckDeadline: time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			if len(ls) == 0 {
				st, _ := q.Stats(ctx, nss...)
				busy := false
				for _, s := range st {
					busy = busy || s.Delayed > 0 || s.Leased > 0 || s.Ready > 0
				}
				if !busy {
					break
				}
				if round > 10000 {
					t.Fatalf("drain: %+v", st)
				}
				time.Sleep(time.Millisecond)
				continue
			}
			ackAll(t, q, "d", ls)
		}
		if n := liveRecords(t, q); n != 0 {
			t.Errorf("seed %d: every event settled, %d lease records left in the running queue", seed, n)
		}
		if err := q.Close(); err != nil {
			t.Fatal(err)
		}
		if n := storedPrefix(t, dir, []byte{keyLeaseRec}); n != 0 {
			t.Errorf("seed %d: %d lease records left after Close", seed, n)
		}
	}
}

// TestBadgerLeaseRecordDeletionRetried: a lease record whose deletion
// failed to commit, or was refused for disk space, is deleted by a later
// group, not left for the next open to clean up.
func TestBadgerLeaseRecordDeletionRetried(t *testing.T) {
	for _, how := range []string{"failed", "refused"} {
		t.Run(how, func(t *testing.T) {
			dir := t.TempDir()
			opts := QueueOptions{Durability: DurabilityNoSync}
			q := openTestBadger(t, dir, opts)
			publishTest(t, q, Event{ID: "a", Namespace: "n"})
			ls := leaseAll(t, q, "h", 1, "n")
			var undo func()
			if how == "failed" {
				undo = failCommitsWith(q, 1, func(w bwrite) bool { return len(w.key) > 0 && w.key[0] == keyLeaseRec && w.del })
			} else {
				// The ack is written in the band; its record's deletion,
				// pushed when the ack completes, meets a group refused
				// below half the reserve.
				f := func(ws []bwrite) bool {
					if slices.ContainsFunc(ws, isKeyOf(keyAcks, "n")) {
						low := func(string) (uint64, error) { return q.reserve / 4, nil }
						q.diskFree.Store(&low)
					}
					return false
				}
				storeCommitHook(q, &f)
				undo = func() { real := diskFree; q.diskFree.Store(&real); q.failCommit.Store(nil) }
			}
			ackAll(t, q, "h", ls)
			waitFor(t, func() bool { q.wmu.Lock(); defer q.wmu.Unlock(); return len(q.wops) == 0 })
			time.Sleep(50 * time.Millisecond)
			undo()
			// Later activity: more groups are written.
			for range 3 {
				publishTest(t, q, Event{Namespace: "n"})
				ackAll(t, q, "h", leaseAll(t, q, "h", 1, "n"))
			}
			if n := liveRecords(t, q); n != 0 {
				t.Errorf("every event settled, %d lease records left in the running queue", n)
			}
		})
	}
}

// TestBadgerRefusedLeaseRecordWrittenWithNextGroup: a lease record refused
// for disk space is written with the next group once there is room, so a
// kill after that does not reuse the attempt number.
func TestBadgerRefusedLeaseRecordWrittenWithNextGroup(t *testing.T) {
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityNoSync}
	q := openTestBadger(t, dir, opts)
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	low := func(string) (uint64, error) { return q.reserve / 4, nil }
	q.diskFree.Store(&low)
	ls := leaseAll(t, q, "h", 1, "n")
	real := diskFree
	q.diskFree.Store(&real)
	publishTest(t, q, Event{ID: "b", Namespace: "m"}) // a group written
	attemptContinues(t, openTestBadger(t, copyLive(t, dir), opts), ls[0].Attempt)
}

// TestBadgerAckCompletedDuringCloseDeletesItsRecord: an ack in flight when
// Close starts is committed by the draining writer; its completion drops
// the event's lease record, whose deletion the stopped writer cannot take:
// Close writes it (it used to stay on disk until the next open).
func TestBadgerAckCompletedDuringCloseDeletesItsRecord(t *testing.T) {
	dir := t.TempDir()
	opts := QueueOptions{Durability: DurabilityNoSync}
	q := openTestBadger(t, dir, opts)
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	ls := leaseAll(t, q, "h", 1, "n")
	if len(ls) != 1 {
		t.Fatalf("lease: %+v", ls)
	}
	gate := make(chan struct{})
	inAck := make(chan struct{}, 1)
	isAck := isKeyOf(keyAcks, "n")
	hold := func(ws []bwrite) bool {
		for _, w := range ws {
			if isAck(w) {
				select {
				case inAck <- struct{}{}:
				default:
				}
				<-gate
				break
			}
		}
		return false
	}
	storeCommitHook(q, &hold)
	acked := make(chan error, 1)
	go func() {
		_, err := q.Ack(context.Background(), "h", []LeaseRef{{ID: "a", Attempt: ls[0].Attempt}})
		acked <- err
	}()
	select {
	case <-inAck:
	case <-time.After(5 * time.Second):
		close(gate)
		t.Fatal("the ack's group never reached its commit")
	}
	closed := make(chan error, 1)
	go func() { closed <- q.Close() }()
	waitFor(t, func() bool { q.wmu.Lock(); defer q.wmu.Unlock(); return q.wstop })
	close(gate)
	if err := <-acked; err != nil {
		t.Fatalf("ack: %v", err)
	}
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	q.failCommit.Store(nil)
	if n := storedPrefix(t, dir, []byte{keyLeaseRec}); n != 0 {
		t.Errorf("the only event acked, %d lease record(s) left after a clean Close", n)
	}
}

// TestBadgerLeaseRecordsBoundedOnAFullDisk: while every group is refused
// (free space below half the reserve), one event leased again and again
// (its lease expires) leaves at most a few lease records and deletions
// waiting, not one per delivery; Close writes the latest record.
func TestBadgerLeaseRecordsBoundedOnAFullDisk(t *testing.T) {
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	low := func(string) (uint64, error) { return q.reserve / 4, nil }
	q.diskFree.Store(&low)
	leases := 0
	for range 500 {
		ls, err := q.Lease(context.Background(), LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 1, AckDeadline: time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		leases += len(ls)
		time.Sleep(1200 * time.Microsecond)
	}
	q.wmu.Lock()
	recs, dels := len(q.pendingRecs), len(q.pendingRecDels)
	q.wmu.Unlock()
	if leases < 10 || recs > 10 || dels > 10 {
		t.Errorf("%d deliveries on a full disk: %d lease records and %d deletions waiting, want a few", leases, recs, dels)
	}
	real := diskFree
	q.diskFree.Store(&real)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if n := storedPrefix(t, dir, []byte{keyLeaseRec}); n != 1 {
		t.Errorf("%d lease records after Close, want 1 (the latest delivery's)", n)
	}
}

// TestBadgerRefusedMovesDoNotPileUpRecordDeletions: on a disk below half
// the reserve, an event past MaxAttempts is tried for dead-lettering at
// every Lease call; the refused move gives it a new lease record and drops
// the old one, never written. Consumers keep polling on a full disk: the
// deletions waiting must not grow with every poll (they did, one per poll,
// each group copying them all).
func TestBadgerRefusedMovesDoNotPileUpRecordDeletions(t *testing.T) {
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync, MaxAttempts: 1})
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	ls := leaseAll(t, q, "h", 1, "n")
	low := func(string) (uint64, error) { return q.reserve / 4, nil }
	q.diskFree.Store(&low)
	defer func() { real := diskFree; q.diskFree.Store(&real) }()
	q.Nack(context.Background(), "h", []LeaseRef{{ID: "a", Namespace: "n", Attempt: ls[0].Attempt}}, 0, "x") // its move refused
	for range 2000 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		q.Lease(ctx, LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 1, AckDeadline: time.Minute})
		cancel()
	}
	q.wmu.Lock()
	recs, dels := len(q.pendingRecs), len(q.pendingRecDels)
	q.wmu.Unlock()
	if recs > 10 || dels > 10 {
		t.Errorf("after 2,000 polls on a full disk: %d lease records and %d deletions waiting, want a few", recs, dels)
	}
}
