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
// one namespace has published in the last fairShareWindow, each may have
// at most fairShareEvents events in Enqueue calls; a publish over that
// waits for its namespace's earlier ones to return. A namespace with
// nothing in Enqueue is always let in, whatever its batch's size, and a
// namespace publishing alone is never held: the gate costs a busy tenant
// throughput only while another is active, and only the pipeline depth
// past what keeps the queue's writer busy.
type fairShare struct {
	mu      sync.Mutex
	pending map[string]int   // events in Enqueue calls, by namespace
	last    map[string]int64 // when each namespace was last let in (Unix ns)
	waiting int              // admit calls waiting for freed
	pruned  int64            // when last was last pruned (Unix ns)
	freed   chan struct{}    // closed (and replaced) when events leave while some wait
	now     func() time.Time
	limit   int
	window  time.Duration
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
	return &fairShare{
		pending: make(map[string]int),
		last:    make(map[string]int64),
		freed:   make(chan struct{}),
		now:     time.Now,
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
// appearance (a publish usually names one).
func countByNamespace(events []Event) []nsCount {
	var counts []nsCount
next:
	for i := range events {
		ns := events[i].Namespace
		for j := range counts {
			if counts[j].ns == ns {
				counts[j].n++
				continue next
			}
		}
		counts = append(counts, nsCount{ns, 1})
	}
	return counts
}

// admit waits until events may enter the queue, and returns the function
// that gives their place back once their Enqueue has returned. It fails
// only when ctx ends.
func (f *fairShare) admit(ctx context.Context, events []Event) (release func(), err error) {
	counts := countByNamespace(events)
	f.mu.Lock()
	for !f.fits(counts, f.now().UnixNano()) {
		f.waiting++
		ch := f.freed
		f.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			f.mu.Lock()
			f.waiting--
			f.mu.Unlock()
			return nil, ctx.Err()
		}
		f.mu.Lock()
		f.waiting--
	}
	now := f.now().UnixNano()
	for _, c := range counts {
		f.pending[c.ns] += c.n
		f.last[c.ns] = now
	}
	f.prune(now)
	f.mu.Unlock()
	return func() { f.release(counts) }, nil
}

func (f *fairShare) release(counts []nsCount) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range counts {
		if f.pending[c.ns] -= c.n; f.pending[c.ns] <= 0 {
			delete(f.pending, c.ns)
		}
	}
	if f.waiting > 0 {
		close(f.freed)
		f.freed = make(chan struct{})
	}
}

// fits reports whether events counted by namespace may enter now: each of
// their namespaces has nothing in Enqueue, or room in its share, or no
// other namespace active. mu is held.
func (f *fairShare) fits(counts []nsCount, now int64) bool {
	for _, c := range counts {
		p := f.pending[c.ns]
		if p == 0 || p+c.n <= f.limit {
			continue
		}
		if f.othersActive(counts, now) {
			return false
		}
	}
	return true
}

// othersActive reports whether a namespace the publish does not name has
// events in Enqueue or published within the window. mu is held.
func (f *fairShare) othersActive(counts []nsCount, now int64) bool {
	for other, at := range f.last {
		if slices.ContainsFunc(counts, func(c nsCount) bool { return c.ns == other }) {
			continue
		}
		if now-at <= int64(f.window) || f.pending[other] > 0 {
			return true
		}
	}
	return false
}

// prune forgets namespaces idle past the window with nothing in Enqueue,
// once there are many, so that last stays the size of the active set.
// mu is held.
func (f *fairShare) prune(now int64) {
	if len(f.last) < 64 || now-f.pruned < int64(f.window) {
		return
	}
	f.pruned = now
	for ns, at := range f.last {
		if now-at > int64(f.window) && f.pending[ns] == 0 {
			delete(f.last, ns)
		}
	}
}
