package h3x

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// Benchmarks of the built-in queues. The headline ones:
//
//	go test -run '^$' -bench 'BenchmarkQueue(Enqueue|LeaseAck)' -benchtime 200000x -count 3
//
// report events/s (a custom metric) besides ns/op. BenchmarkQueueLeaseAfterAcks
// builds a queue that has acked 1,000,000 events (about half a minute); run it
// with a time-based -benchtime (its prefix-seek variants take ~0.1 s an op):
//
//	go test -run '^$' -bench BenchmarkQueueLeaseAfterAcks -benchtime 2s
//
// TestQueueBadgerRSS (in queue_internal_test.go, H3X_RSS=1) measures the memory
// of a 1,000,000-event backlog.

type queueBenchKind struct {
	name string
	open func(b *testing.B) Queue
}

func queueBenchQueues() []queueBenchKind {
	return []queueBenchKind{
		{"badger-fsync", func(b *testing.B) Queue { return openQueueBenchBadger(b, QueueOptions{Durability: DurabilityFsync}) }},
		{"badger-nosync", func(b *testing.B) Queue { return openQueueBenchBadger(b, QueueOptions{Durability: DurabilityNoSync}) }},
		{"memory", func(b *testing.B) Queue { return NewMemoryQueue(QueueOptions{}) }},
	}
}

func openQueueBenchBadger(b testing.TB, opts QueueOptions) Queue {
	q, err := OpenBadgerQueue(b.TempDir(), opts)
	if err != nil {
		b.Fatal(err)
	}
	return q
}

// queueBenchEvent is a 256-byte event (by Event.size(), with its assigned ID).
// Its Data and Metadata are shared: the queues copy what they keep.
func queueBenchEvent(ns string, i int) Event {
	return Event{
		Namespace: ns,
		Type:      "order.created",
		Message:   "order placed",
		Data:      queueBenchData,
		Metadata:  queueBenchMeta,
	}
}

var (
	queueBenchMeta = map[string]string{"service": "checkout"}
	queueBenchData = func() []byte {
		d := []byte(`{"order":123456789,"customer":"c-0042","total":"129.90","currency":"EUR","items":[`)
		// 36 bytes of ID are assigned at Enqueue.
		pad := 256 - 36 - (len("bench") + len("order.created") + len("order placed") + len(d) + 8 + len("service") + len("checkout")) - 2
		d = append(d, strings.Repeat("1", max(pad, 0))...)
		return append(d, "]}"...)
	}()
)

func reportQueueRate(b *testing.B, n int, d time.Duration) {
	if d > 0 {
		b.ReportMetric(float64(n)/d.Seconds(), "events/s")
	}
}

// BenchmarkQueueEnqueue: publishers concurrent publishers each publish
// batches of batch events until b.N events are stored in total.
func BenchmarkQueueEnqueue(b *testing.B) {
	for _, bq := range queueBenchQueues() {
		for _, batch := range []int{1, 10, 100} {
			for _, pubs := range []int{1, 16, 256} {
				b.Run(fmt.Sprintf("%s/batch=%d/publishers=%d", bq.name, batch, pubs), func(b *testing.B) {
					q := bq.open(b)
					defer q.Close()
					queueBenchEnqueue(b, q, batch, pubs)
				})
			}
		}
	}
}

func queueBenchEnqueue(b *testing.B, q Queue, batch, pubs int) {
	ctx := context.Background()
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for p := range pubs {
		wg.Go(func() {
			evs := make([]Event, batch)
			for {
				n := int(next.Add(int64(batch)))
				if n-batch >= b.N {
					return
				}
				k := min(batch, b.N-(n-batch))
				for i := range k {
					evs[i] = queueBenchEvent("bench", n-batch+i)
				}
				res, err := q.Enqueue(ctx, evs[:k])
				if err != nil {
					b.Errorf("publisher %d: %v", p, err)
					return
				}
				for _, r := range res {
					if r.Status != PublishStored {
						b.Errorf("publisher %d: %v %v", p, r.Status, r.Err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	reportQueueRate(b, b.N, time.Since(start))
	if bq, ok := q.(*badgerQueue); ok && bq.statGroups.Load() > 0 {
		b.ReportMetric(float64(bq.statOps.Load())/float64(bq.statGroups.Load()), "requests/group")
		if n := bq.statSyncs.Load(); n > 0 {
			b.ReportMetric(float64(b.N)/float64(n), "events/sync")
		}
	}
}

// BenchmarkQueueLeaseAck: b.N events are published (not timed), then
// consumers lease them 100 at a time and ack each lease batch (pipelined:
// a consumer's next lease does not wait for its previous ack).
func BenchmarkQueueLeaseAck(b *testing.B) {
	for _, bq := range queueBenchQueues() {
		for _, consumers := range []int{1, 4} {
			b.Run(fmt.Sprintf("%s/consumers=%d", bq.name, consumers), func(b *testing.B) {
				q := bq.open(b)
				defer q.Close()
				queueBenchPrefill(b, q, "bench", b.N)
				queueBenchLeaseAck(b, q, consumers, 100)
			})
		}
	}
}

func queueBenchPrefill(b testing.TB, q Queue, ns string, n int) {
	ctx := context.Background()
	const batch = 1000
	var wg sync.WaitGroup
	var next atomic.Int64
	for range 4 {
		wg.Go(func() {
			evs := make([]Event, batch)
			for {
				from := int(next.Add(batch)) - batch
				if from >= n {
					return
				}
				k := min(batch, n-from)
				for i := range k {
					evs[i] = queueBenchEvent(ns, from+i)
				}
				if _, err := q.Enqueue(ctx, evs[:k]); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}

func queueBenchLeaseAck(b *testing.B, q Queue, consumers, limit int) {
	ctx := context.Background()
	var leased, acked atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for c := range consumers {
		// Each consumer leases while its acker acks what it leased before
		// (up to two batches behind), as a server's connection does: acks
		// do not wait behind fetches.
		holder := fmt.Sprintf("consumer-%d", c)
		toAck := make(chan []LeaseRef, 2)
		wg.Go(func() {
			for refs := range toAck {
				res, err := q.Ack(ctx, holder, refs)
				if err != nil {
					b.Error(err)
					return
				}
				for _, r := range res {
					if r.Status != SettleOK {
						b.Errorf("ack: %v", r.Status)
						return
					}
				}
				acked.Add(int64(len(refs)))
			}
		})
		wg.Go(func() {
			defer close(toAck)
			req := LeaseRequest{Holder: holder, Namespaces: []string{"bench"}, Limit: limit, AckDeadline: time.Minute}
			for leased.Load() < int64(b.N) {
				ls, err := q.Lease(ctx, req)
				if err != nil {
					b.Error(err)
					return
				}
				if len(ls) == 0 {
					wctx, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
					_ = q.Wait(wctx, req.Namespaces)
					cancel()
					continue
				}
				refs := make([]LeaseRef, len(ls))
				for i, l := range ls {
					refs[i] = LeaseRef{ID: l.Event.ID, Attempt: l.Attempt}
				}
				leased.Add(int64(len(ls)))
				toAck <- refs
			}
		})
	}
	wg.Wait()
	if n := acked.Load(); n != int64(b.N) {
		b.Errorf("acked %d events, want %d", n, b.N)
	}
	reportQueueRate(b, b.N, time.Since(start))
}

// BenchmarkQueueLeaseAfterAcks compares leasing on a Badger queue that has
// acked 1,000,000 events (H3X_ACKED_N overrides the count) with leasing on a
// fresh one: each op leases one fresh event (acks are batched, untimed). The
// "prefix-seek" variants measure what the queue avoids: seeking to a
// namespace's first event from the start of its key range, through the
// tombstones. Building the acked queue takes a while (once per -count).
func BenchmarkQueueLeaseAfterAcks(b *testing.B) {
	acked := queueBenchAcked(b)
	defer acked.Close()
	for _, tc := range []struct {
		name string
		q    func() Queue
	}{
		{"empty", func() Queue { return openQueueBenchBadger(b, QueueOptions{Durability: DurabilityNoSync}) }},
		{"after-1M-acks", func() Queue { return acked }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			q := tc.q()
			if q != acked {
				defer q.Close()
			}
			ns := "bench"
			queueBenchPrefill(b, q, ns, b.N)
			ctx := context.Background()
			req := LeaseRequest{Holder: "h", Namespaces: []string{ns}, Limit: 1, AckDeadline: time.Minute}
			refs := make([]LeaseRef, 0, 1000)
			b.ResetTimer()
			for range b.N {
				ls, err := q.Lease(ctx, req)
				if err != nil || len(ls) != 1 {
					b.Fatalf("Lease: %d events, %v", len(ls), err)
				}
				refs = append(refs, LeaseRef{ID: ls[0].Event.ID, Attempt: 1})
				if len(refs) == cap(refs) {
					b.StopTimer()
					if _, err := q.Ack(ctx, "h", refs); err != nil {
						b.Fatal(err)
					}
					refs = refs[:0]
					b.StartTimer()
				}
			}
			b.StopTimer()
			if _, err := q.Ack(ctx, "h", refs); err != nil {
				b.Fatal(err)
			}
		})
		b.Run(tc.name+"/prefix-seek", func(b *testing.B) {
			q := tc.q()
			if q != acked {
				defer q.Close()
			}
			queueBenchPrefill(b, q, "bench", 1)
			ts := q.(*badgerQueue).ts
			prefix := nsPrefix(keyEvent, "bench")
			b.ResetTimer()
			for range b.N {
				err := ts.view(func(txn *badger.Txn) error {
					it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
					defer it.Close()
					it.Rewind()
					if !it.Valid() {
						return fmt.Errorf("no event")
					}
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// ackedQueue returns a Badger queue that has published, leased and acked
// 1,000,000 events.
func queueBenchAcked(b *testing.B) Queue {
	n := 1_000_000
	if s := os.Getenv("H3X_ACKED_N"); s != "" {
		fmt.Sscan(s, &n)
	}
	q := openQueueBenchBadger(b, QueueOptions{Durability: DurabilityNoSync})
	start := time.Now()
	queueBenchPrefill(b, q, "bench", n)
	ctx := context.Background()
	req := LeaseRequest{Holder: "setup", Namespaces: []string{"bench"}, Limit: 1000, AckDeadline: time.Minute}
	for total := 0; total < n; {
		ls, err := q.Lease(ctx, req)
		if err != nil || len(ls) == 0 {
			b.Fatalf("setup lease after %d: %v", total, err)
		}
		refs := make([]LeaseRef, len(ls))
		for i, l := range ls {
			refs[i] = LeaseRef{ID: l.Event.ID, Attempt: l.Attempt}
		}
		if _, err := q.Ack(ctx, "setup", refs); err != nil {
			b.Fatal(err)
		}
		total += len(ls)
	}
	b.Logf("published, leased and acked %d events in %v", n, time.Since(start))
	return q
}
