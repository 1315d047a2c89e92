package reliability

import (
	"context"
	"math/bits"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
)

// TestSoak runs a steady moderate load for H3X_SOAK (e.g. 30m) against an
// in-process server on Badger, restarting the consumer every 30 s, and
// samples heap and goroutines every 10 s: they must stay flat.
//
//	H3X_SOAK=30m go test -run TestSoak -timeout 1h ./test/reliability/ -v
func TestSoak(t *testing.T) {
	v := os.Getenv("H3X_SOAK")
	if v == "" {
		t.Skip("set H3X_SOAK to a duration (e.g. 30m) to run the soak")
	}
	dur, err := time.ParseDuration(v)
	if err != nil || dur < time.Minute {
		t.Fatalf("H3X_SOAK=%q: want a duration of at least 1m", v)
	}
	const (
		rate           = 2000 // events/s
		batch          = 20
		restartEvery   = 30 * time.Second
		sampleEvery    = 10 * time.Second
		consumerBuffer = 512
	)
	q, err := h3x.OpenBadgerQueue(t.TempDir(), h3x.QueueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	srv := startServer(t, h3x.WithQueue(q))
	pub := srv.dial(t, srv.addr)

	var published, consumed, restarts atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pubCtx, stopPub := context.WithCancel(ctx)
	defer stopPub()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	// IDs are soak-<n>; two bitmaps (a few hundred KiB for 30 minutes, so the
	// heap figures are unchanged) record which were stored and which came out.
	maxIDs := int(dur/time.Second)*rate*2 + 1<<16
	storedIDs, gotIDs := make([]atomic.Uint64, maxIDs/64+1), make([]atomic.Uint64, maxIDs/64+1)
	setBit := func(b []atomic.Uint64, n int) { b[n/64].Or(1 << (n % 64)) }

	wg.Go(func() {
		tick := time.NewTicker(time.Second * batch / rate)
		defer tick.Stop()
		payload := make([]byte, 200)
		next := 0
		for next+batch <= maxIDs {
			select {
			case <-pubCtx.Done():
				return
			case <-tick.C:
			}
			evs := make([]h3x.Event, batch)
			for i := range evs {
				evs[i] = h3x.Event{ID: "soak-" + strconv.Itoa(next), Namespace: namespace, Type: "soak", Data: payload}
				next++
			}
			pctx, pcancel := context.WithTimeout(pubCtx, 10*time.Second)
			if res, err := pub.Publish(pctx, evs...); err == nil {
				published.Add(batch)
				for i, r := range res {
					if r.Status == h3x.PublishStored || r.Status == h3x.PublishDuplicate {
						setBit(storedIDs, next-batch+i)
					}
				}
			}
			pcancel()
		}
	})
	wg.Go(func() {
		for ctx.Err() == nil {
			// One consumer's life: subscribe and ack for restartEvery,
			// then close the client (its leases are released).
			dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
			c, err := h3x.Dial(dctx, srv.addr, h3x.WithCredentials(clientID, token), h3x.WithTrustedFingerprint(srv.fp), h3x.WithNamespaces(namespace))
			dcancel()
			if err != nil {
				if ctx.Err() == nil {
					t.Errorf("consumer dial: %v", err)
				}
				return
			}
			lctx, lcancel := context.WithTimeout(ctx, restartEvery)
			sub, err := c.Subscribe(lctx, nil, h3x.SubscribeOptions{MaxUnacked: consumerBuffer})
			if err == nil {
				for d := range sub.Events() {
					if n, err := strconv.Atoi(strings.TrimPrefix(d.Event.ID, "soak-")); err == nil && n >= 0 && n < maxIDs {
						setBit(gotIDs, n)
					}
					d.Ack()
					consumed.Add(1)
				}
			}
			lcancel()
			c.Close()
			restarts.Add(1)
		}
	})

	type sample struct {
		at                   time.Duration
		heapAlloc, heapInuse uint64
		sys                  uint64
		goroutines           int
		published, consumed  int64
		backlog              int
	}
	var samples []sample
	take := func(at time.Duration) sample {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		s := sample{at: at, heapAlloc: ms.HeapAlloc, heapInuse: ms.HeapInuse, sys: ms.Sys, goroutines: runtime.NumGoroutine(),
			published: published.Load(), consumed: consumed.Load()}
		if st, err := q.Stats(context.Background(), namespace); err == nil && len(st) == 1 {
			s.backlog = st[0].Ready + st[0].Leased + st[0].Delayed
		}
		return s
	}
	start := time.Now()
	tick := time.NewTicker(sampleEvery)
	for time.Since(start) < dur {
		<-tick.C
		s := take(time.Since(start).Round(time.Second))
		samples = append(samples, s)
		t.Logf("soak %v: heap alloc %.1f MiB, heap in use %.1f MiB, sys %.1f MiB, goroutines %d, published %d, consumed %d, backlog %d",
			s.at, mib(s.heapAlloc), mib(s.heapInuse), mib(s.sys), s.goroutines, s.published, s.consumed, s.backlog)
	}
	tick.Stop()
	// Stop publishing and let the consumer drain the backlog.
	stopPub()
	var left int
	for bound := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		st, err := q.Stats(context.Background(), namespace)
		if err != nil || len(st) != 1 {
			t.Fatalf("Stats: %v %v", st, err)
		}
		if left = st[0].Ready + st[0].Leased + st[0].Delayed; left == 0 || time.Now().After(bound) {
			break
		}
	}
	cancel()
	wg.Wait()
	lost := 0
	for i := range storedIDs {
		lost += bits.OnesCount64(storedIDs[i].Load() &^ gotIDs[i].Load())
	}
	if left > 0 {
		t.Errorf("%d events still in the queue a minute after publishing stopped", left)
	}
	if lost > 0 {
		t.Errorf("%d events stored (Publish said so) were never delivered", lost)
	}

	if len(samples) < 3 {
		t.Fatal("too few samples")
	}
	// Skip the first minute (warm-up: Badger's memtables and caches fill).
	warm := samples[min(6, len(samples)/3)]
	end := samples[len(samples)-1]
	mid := samples[len(samples)/2]
	var maxHeap uint64
	maxG := 0
	for _, s := range samples {
		maxHeap = max(maxHeap, s.heapAlloc)
		maxG = max(maxG, s.goroutines)
	}
	t.Logf("soak summary: %v, %d consumer restarts, published %d (%.0f ev/s), consumed %d", dur, restarts.Load(), end.published,
		float64(end.published)/dur.Seconds(), end.consumed)
	for _, s := range []struct {
		name string
		s    sample
	}{{"warm", warm}, {"middle", mid}, {"end", end}} {
		t.Logf("soak %s (%v): heap alloc %.1f MiB, goroutines %d, backlog %d", s.name, s.s.at, mib(s.s.heapAlloc), s.s.goroutines, s.s.backlog)
	}
	t.Logf("soak max: heap alloc %.1f MiB, goroutines %d", mib(maxHeap), maxG)
	// Flat: after the warm-up, the median of the last few samples is
	// within 10% (+4 MiB) of the median of the first few, goroutines
	// within 5, and the trend over the whole run (least squares) adds up
	// to no more than that either. Medians, so that one sample taken
	// during a memtable flush decides nothing; the trend, so that a slow
	// leak (a little per consumer restart) is caught.
	steady := samples[min(6, len(samples)/3):]
	k := max(len(steady)/4, 1)
	heapOf := func(ss []sample) []float64 {
		v := make([]float64, len(ss))
		for i, s := range ss {
			v[i] = float64(s.heapAlloc)
		}
		return v
	}
	goroutinesOf := func(ss []sample) []float64 {
		v := make([]float64, len(ss))
		for i, s := range ss {
			v[i] = float64(s.goroutines)
		}
		return v
	}
	heapFirst, heapLast := median(heapOf(steady[:k])), median(heapOf(steady[len(steady)-k:]))
	gFirst, gLast := median(goroutinesOf(steady[:k])), median(goroutinesOf(steady[len(steady)-k:]))
	at := make([]float64, len(steady))
	for i, s := range steady {
		at[i] = s.at.Seconds()
	}
	heapTrend, gTrend := trend(at, heapOf(steady)), trend(at, goroutinesOf(steady))
	t.Logf("soak flatness: heap median %.1f -> %.1f MiB, trend %+.1f MiB over the run; goroutines median %.0f -> %.0f, trend %+.1f",
		heapFirst/(1<<20), heapLast/(1<<20), heapTrend/(1<<20), gFirst, gLast, gTrend)
	heapSlack := heapFirst/10 + 4<<20
	if heapLast > heapFirst+heapSlack || heapTrend > heapSlack {
		t.Errorf("heap grew: median %.1f -> %.1f MiB, trend %+.1f MiB (allowed %.1f MiB)", heapFirst/(1<<20), heapLast/(1<<20), heapTrend/(1<<20), heapSlack/(1<<20))
	}
	if gLast > gFirst+5 || gTrend > 5 {
		t.Errorf("goroutines grew: median %.0f -> %.0f, trend %+.1f (allowed 5)", gFirst, gLast, gTrend)
	}
	if end.published-end.consumed > 10*rate {
		t.Errorf("consumers fell behind: %d published, %d consumed", end.published, end.consumed)
	}
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

func median(v []float64) float64 {
	v = slices.Clone(v)
	slices.Sort(v)
	if len(v) == 0 {
		return 0
	}
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// trend is the change of v (measured at times x) over x's span, by a
// least-squares line.
func trend(x, v []float64) float64 {
	n := float64(len(x))
	if n < 2 {
		return 0
	}
	var sx, sy, sxx, sxy float64
	for i := range x {
		sx, sy, sxx, sxy = sx+x[i], sy+v[i], sxx+x[i]*x[i], sxy+x[i]*v[i]
	}
	den := n*sxx - sx*sx
	if den == 0 {
		return 0
	}
	return (n*sxy - sx*sy) / den * (x[len(x)-1] - x[0])
}
