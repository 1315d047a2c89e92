package reliability

import (
	"context"
	"math/bits"
	"os"
	"runtime"
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
	if end.heapAlloc > warm.heapAlloc*3/2+16<<20 {
		t.Errorf("heap grew from %.1f MiB (warm) to %.1f MiB (end)", mib(warm.heapAlloc), mib(end.heapAlloc))
	}
	if end.goroutines > warm.goroutines+20 {
		t.Errorf("goroutines grew from %d (warm) to %d (end)", warm.goroutines, end.goroutines)
	}
	if end.published-end.consumed > 10*rate {
		t.Errorf("consumers fell behind: %d published, %d consumed", end.published, end.consumed)
	}
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }
