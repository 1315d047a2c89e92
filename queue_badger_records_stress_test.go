package h3x

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestBadgerLeaseRecordsUnderFailures: concurrent leases (short deadlines:
// expiry), nacks and acks while commits fail at random and the disk is at
// random below the reserve (partitioned rounds) or below half of it; then
// failures off and a clean Close. Checked: after a reopen no delivery
// reuses an attempt number handed out before ("reopen"); once everything is
// acked in the same run and the queue closed, no lease record is left
// ("settled"); and a Close while the workers still run leaves only records
// that name a latest delivery ("closing": the reopen deletes none). It
// caught, when planted, a retried record not marked as written, a window
// between filtering and marking records, and a deletion dropped during
// Close. H3X_RECORD_STRESS_SEEDS sets the seeds (default 2).
func TestBadgerLeaseRecordsUnderFailures(t *testing.T) {
	seeds := envInt("H3X_RECORD_STRESS_SEEDS", 2)
	for seed := range uint64(seeds) {
		t.Run(fmt.Sprint(seed, "-reopen"), func(t *testing.T) { recordStress(t, seed, false) })
		t.Run(fmt.Sprint(seed, "-settled"), func(t *testing.T) { recordStress(t, seed, true) })
		t.Run(fmt.Sprint(seed, "-closing"), func(t *testing.T) { recordStressClosing(t, seed) })
	}
}

// stressQueue opens a Badger queue (MaxAttempts 4) holding n events of
// namespace "n", whose commits fail at random (15%, seeded).
func stressQueue(t *testing.T, seed uint64, n int) (string, QueueOptions, *badgerQueue) {
	dir := t.TempDir()
	opts := QueueOptions{MaxAttempts: 4, Durability: DurabilityNoSync}
	q := openTestBadger(t, dir, opts)
	var evs []Event
	for i := range n {
		evs = append(evs, Event{ID: fmt.Sprintf("e%03d", i), Namespace: "n"})
	}
	publishTest(t, q, evs...)
	var fmu sync.Mutex
	fr := rand.New(rand.NewPCG(seed, 11))
	ff := func([]bwrite) bool { fmu.Lock(); defer fmu.Unlock(); return fr.Float64() < 0.15 }
	q.failCommit.Store(&ff)
	return dir, opts, q
}

func recordStress(t *testing.T, seed uint64, leak bool) {
	dir, opts, q := stressQueue(t, seed, 200)
	var mu sync.Mutex
	maxAtt := map[string]int{}
	acked := map[string]bool{}
	var stop atomic.Bool
	real := diskFree
	var dmode atomic.Int32
	hook := func(d string) (uint64, error) {
		switch dmode.Load() {
		case 1:
			return q.reserve * 3 / 4, nil
		case 2:
			return q.reserve / 4, nil
		}
		return real(d)
	}
	q.diskFree.Store(&hook)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewPCG(seed, 12))
		for !stop.Load() {
			dmode.Store(int32(r.IntN(5) % 3))
			time.Sleep(time.Duration(r.IntN(3)) * time.Millisecond)
		}
	}()
	nss := []string{"n", "n" + DeadLetterSuffix}
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(100+w)))
			h := fmt.Sprint("h", w)
			ctx := context.Background()
			for i := 0; i < 300; i++ {
				dl := time.Minute
				if leak {
					dl = 20 * time.Millisecond
				}
				if r.IntN(3) == 0 {
					dl = time.Duration(1+r.IntN(3)) * time.Millisecond
				}
				ls, err := q.Lease(ctx, LeaseRequest{Holder: h, Namespaces: nss, Limit: 1 + r.IntN(5), AckDeadline: dl})
				if err != nil {
					continue
				}
				mu.Lock()
				for _, l := range ls {
					key := l.Event.Namespace + "/" + l.Event.ID
					if l.Attempt > maxAtt[key] {
						maxAtt[key] = l.Attempt
					}
				}
				mu.Unlock()
				for _, l := range ls {
					ref := []LeaseRef{{ID: l.Event.ID, Attempt: l.Attempt}}
					switch r.IntN(3) {
					case 0:
						res, err := q.Ack(ctx, h, ref)
						if err == nil && res[0].Status == SettleOK && l.Event.Namespace == "n"+DeadLetterSuffix {
							mu.Lock()
							acked[l.Event.Namespace+"/"+l.Event.ID] = true
							mu.Unlock()
						}
					case 1:
						q.Nack(ctx, h, ref, 0, "x")
					}
				}
			}
		}(w)
	}
	for i := 0; q.statOps.Load() == 0; i++ { // the writer has started on them
		if i > 500 {
			t.Fatal("no write in 10 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// wait for the 4 workers: they are bounded; stop the toggler after a while
	time.Sleep(3 * time.Second)
	stop.Store(true)
	wg.Wait()
	q.failCommit.Store(nil)
	q.diskFree.Store(&real)
	if leak {
		time.Sleep(100 * time.Millisecond)
		for round := 0; ; round++ {
			if round > 10000 {
				t.Fatal("drain: events keep coming")
			}
			ls, err := q.Lease(context.Background(), LeaseRequest{Holder: "z", Namespaces: nss, Limit: 50, AckDeadline: time.Minute})
			if err != nil {
				t.Fatal(err)
			}
			if len(ls) == 0 {
				break
			}
			ackAll(t, q, "z", ls)
		}
		if err := q.Close(); err != nil {
			t.Fatal(err)
		}
		if n := storedPrefix(t, dir, []byte{keyLeaseRec}); n != 0 {
			t.Errorf("seed %d: %d lease records left after everything acked and closed (same run)", seed, n)
		}
		return
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q2 := openTestBadger(t, dir, opts)
	ctx := context.Background()
	for round := 0; ; round++ {
		if round > 10000 {
			t.Fatal("drain: events keep coming")
		}
		ls, err := q2.Lease(ctx, LeaseRequest{Holder: "z", Namespaces: nss, Limit: 50, AckDeadline: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		if len(ls) == 0 {
			break
		}
		for _, l := range ls {
			key := l.Event.Namespace + "/" + l.Event.ID
			mu.Lock()
			if l.Attempt <= maxAtt[key] {
				t.Errorf("seed %d: %s delivered with attempt %d after a clean reopen, %d delivered before", seed, key, l.Attempt, maxAtt[key])
			}
			mu.Unlock()
		}
		ackAll(t, q2, "z", ls)
	}
	if err := q2.Close(); err != nil {
		t.Fatal(err)
	}
	if n := storedPrefix(t, dir, []byte{keyLeaseRec}); n != 0 {
		t.Errorf("seed %d: %d lease records left after everything acked and closed", seed, n)
	}
}

// recordStressClosing: Close while workers lease, ack and nack (failures
// off just before): every record left on disk still names a latest
// delivery, so a reopen deletes none.
func recordStressClosing(t *testing.T, seed uint64) {
	dir, opts, q := stressQueue(t, seed, 3000)
	nss := []string{"n", "n" + DeadLetterSuffix}
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(100+w)))
			h := fmt.Sprint("h", w)
			ctx := context.Background()
			for {
				ls, err := q.Lease(ctx, LeaseRequest{Holder: h, Namespaces: nss, Limit: 1 + r.IntN(5), AckDeadline: time.Duration(1+r.IntN(5)) * time.Millisecond})
				if err == ErrQueueClosed {
					return
				}
				for _, l := range ls {
					ref := []LeaseRef{{ID: l.Event.ID, Attempt: l.Attempt}}
					switch r.IntN(3) {
					case 0:
						q.Ack(ctx, h, ref)
					case 1:
						q.Nack(ctx, h, ref, 0, "x")
					}
				}
			}
		}(w)
	}
	time.Sleep(time.Duration(50+rand.N(150)) * time.Millisecond)
	q.failCommit.Store(nil)
	time.Sleep(time.Duration(rand.N(3)) * time.Millisecond)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	clean := storedClean(t, dir)
	n1 := storedPrefix(t, dir, []byte{keyLeaseRec})
	q2 := openTestBadger(t, dir, opts)
	q2.Close()
	n2 := storedPrefix(t, dir, []byte{keyLeaseRec})
	t.Logf("clean %v, records %d -> %d", clean, n1, n2)
	if n1 != n2 {
		t.Errorf("seed %d: %d lease records after Close, %d named nobody (deleted by the reopen)", seed, n1, n1-n2)
	}
}
