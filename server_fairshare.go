package h3x

import (
	"context"
	"slices"
	"sync"
	"time"
)

// fairShare keeps one namespace's publishes from filling the queue's write
// pipeline while another namespace publishes too (issue 6, fairness).
//
// A queue that commits in groups (the Badger queue) takes every event
// handed to it since its last group into the next one. A pipelining
// publisher can keep thousands of events in Enqueue calls at once, and a
// quiet namespace's event then waits for a group of all of them, and for
// the group after it: tens of milliseconds at the tail. So while more than
// one namespace has published in the last fairShareWindow (or still has a
// publish in Enqueue), each may have at most fairShareEvents events in
// Enqueue calls; a publish over that waits for its namespace's earlier ones
// to return.
//
//   - A namespace with nothing in Enqueue is always let in, whatever its
//     publish's size, and a namespace publishing alone is never held (a
//     held publish is looked at again when the others' window ends).
//   - Publishes of a namespace go in in the order they arrived: one that
//     waits is not overtaken by later, smaller ones of its namespace. A
//     publish naming several namespaces waits its turn in each.
//
// The gate costs a busy tenant throughput only while another is active,
// and only the pipeline depth past what keeps the queue's writer busy.
type fairShare struct {
	mu      sync.Mutex
	pending map[string]int           // events in Enqueue calls, by namespace
	last    map[string]time.Duration // when each namespace was last let in (since base)
	waiters []*fairWaiter            // held publishes, in arrival order
	pruned  time.Duration            // when last was last pruned
	base    time.Time                // times are durations since base (monotonic with the real clock)
	now     func() time.Time
	limit   int
	window  time.Duration
}

// fairWaiter is a held publish.
type fairWaiter struct {
	counts []nsCount
	in     chan struct{} // closed once let in (its events counted in pending)
	let    bool          // let in (under mu)
}

const (
	// fairShareEvents is each namespace's share of the events in Enqueue
	// calls while several publish: two of the harness's 256-event
	// publishes. Against a flood of 250,000–300,000 events/s, 512 cut a
	// calm namespace's p99 in the Badger queue's Enqueue from 17.3 to 7.6
	// ms (medians of 3 runs), with the flood's own rate within the runs'
	// noise; 256 cut it to 6.4 ms but took up to a tenth of the flood's
	// rate (BENCHMARKS.md, the twenty-fourth session).
	fairShareEvents = 512
	// fairShareWindow is how recently a namespace must have published to
	// count as active.
	fairShareWindow = 100 * time.Millisecond
)

func newFairShare() *fairShare {
	return newFairShareClock(time.Now)
}

func newFairShareClock(now func() time.Time) *fairShare {
	return &fairShare{
		pending: make(map[string]int),
		last:    make(map[string]time.Duration),
		base:    now(),
		now:     now,
		limit:   fairShareEvents,
		window:  fairShareWindow,
	}
}

// nsCount is a publish's number of events in one namespace.
type nsCount struct {
	ns string
	n  int
}

// countByNamespace counts events by namespace, in order of first
// appearance (a publish usually names one; past a few, a map finds them).
func countByNamespace(events []Event) []nsCount {
	var counts []nsCount
	var at map[string]int
	for i := range events {
		ns := events[i].Namespace
		j := -1
		if at != nil {
			if k, ok := at[ns]; ok {
				j = k
			}
		} else {
			j = slices.IndexFunc(counts, func(c nsCount) bool { return c.ns == ns })
		}
		if j >= 0 {
			counts[j].n++
			continue
		}
		counts = append(counts, nsCount{ns, 1})
		if at == nil && len(counts) > 8 {
			at = make(map[string]int, 2*len(counts))
			for k, c := range counts {
				at[c.ns] = k
			}
		} else if at != nil {
			at[ns] = len(counts) - 1
		}
	}
	return counts
}

// admit waits until events may enter the queue, and returns the function
// that gives their place back once their Enqueue has returned. It fails
// only when ctx ends before they were let in.
func (f *fairShare) admit(ctx context.Context, events []Event) (release func(), err error) {
	counts := countByNamespace(events)
	release = func() { f.release(counts) }
	f.mu.Lock()
	now := f.elapsed()
	if !queuedIn(counts, f.waiters) && f.fits(counts, now) {
		f.letIn(counts, now)
		f.mu.Unlock()
		return release, nil
	}
	w := &fairWaiter{counts: counts, in: make(chan struct{})}
	f.waiters = append(f.waiters, w)
	var timer *time.Timer // made at the first recheck, reset at the next
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		// Looked at again when a publish returns (release), and when
		// the window of the namespaces that hold it back ends.
		recheck := f.nextChange(counts, now)
		f.mu.Unlock()
		var fired <-chan time.Time
		if recheck > 0 {
			if timer == nil {
				timer = time.NewTimer(recheck)
			} else {
				timer.Reset(recheck)
			}
			fired = timer.C
		}
		select {
		case <-w.in:
			return release, nil
		case <-fired:
			f.mu.Lock()
			f.wake()
			if w.let {
				f.mu.Unlock()
				return release, nil
			}
			now = f.elapsed()
		case <-ctx.Done():
			f.mu.Lock()
			if w.let { // let in meanwhile: its place is taken
				f.mu.Unlock()
				return release, nil
			}
			f.waiters = slices.DeleteFunc(f.waiters, func(x *fairWaiter) bool { return x == w })
			f.wake() // those it held back in its namespaces
			f.mu.Unlock()
			return nil, ctx.Err()
		}
	}
}

func (f *fairShare) release(counts []nsCount) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range counts {
		if f.pending[c.ns] -= c.n; f.pending[c.ns] <= 0 {
			delete(f.pending, c.ns)
		}
	}
	f.wake()
}

// elapsed is the time since base. mu is held.
func (f *fairShare) elapsed() time.Duration { return f.now().Sub(f.base) }

// letIn counts a publish's events as in Enqueue. mu is held.
func (f *fairShare) letIn(counts []nsCount, now time.Duration) {
	for _, c := range counts {
		f.pending[c.ns] += c.n
		f.last[c.ns] = now
	}
	f.prune(now)
}

// wake lets in the held publishes that may go in now, in arrival order: one
// that cannot holds back the later ones of its namespaces. mu is held.
func (f *fairShare) wake() {
	if len(f.waiters) == 0 {
		return
	}
	now := f.elapsed()
	kept := f.waiters[:0]
	for i, w := range f.waiters {
		if !queuedIn(w.counts, kept) && f.fits(w.counts, now) {
			f.letIn(w.counts, now)
			w.let = true
			close(w.in)
			continue
		}
		kept = append(kept, f.waiters[i])
	}
	clear(f.waiters[len(kept):])
	f.waiters = kept
}

// queuedIn reports whether one of waiters names a namespace of counts.
func queuedIn(counts []nsCount, waiters []*fairWaiter) bool {
	for _, w := range waiters {
		for _, c := range counts {
			if slices.ContainsFunc(w.counts, func(x nsCount) bool { return x.ns == c.ns }) {
				return true
			}
		}
	}
	return false
}

// fits reports whether a publish's events may enter now: each of their
// namespaces has nothing in Enqueue, or room in its share, or no other
// namespace active. mu is held.
func (f *fairShare) fits(counts []nsCount, now time.Duration) bool {
	for _, c := range counts {
		p := f.pending[c.ns]
		if p == 0 || p+c.n <= f.limit {
			continue
		}
		if f.othersActive(c.ns, now) {
			return false
		}
	}
	return true
}

// othersActive reports whether a namespace other than ns has events in
// Enqueue or published within the window. mu is held.
func (f *fairShare) othersActive(ns string, now time.Duration) bool {
	for other, at := range f.last {
		if other != ns && (now-at <= f.window || f.pending[other] > 0) {
			return true
		}
	}
	return false
}

// nextChange returns how long until a namespace that holds counts back
// only by having published within the window stops counting as active (0:
// none does; a publish returning will wake the held one). mu is held.
func (f *fairShare) nextChange(counts []nsCount, now time.Duration) time.Duration {
	var soonest time.Duration
	for other, at := range f.last {
		if f.pending[other] > 0 || now-at > f.window || slices.ContainsFunc(counts, func(c nsCount) bool { return c.ns == other }) {
			continue
		}
		if d := at + f.window - now + time.Millisecond; soonest == 0 || d < soonest {
			soonest = d
		}
	}
	return soonest
}

// prune forgets namespaces idle past the window with nothing in Enqueue,
// once there are many, so that last stays the size of the active set.
// mu is held.
func (f *fairShare) prune(now time.Duration) {
	if len(f.last) < 64 || now-f.pruned < f.window {
		return
	}
	f.pruned = now
	for ns, at := range f.last {
		if now-at > f.window && f.pending[ns] == 0 {
			delete(f.last, ns)
		}
	}
}
