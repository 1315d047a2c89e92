package h3xtest_test

import (
	"context"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

// brokenQueue wraps a memory queue and breaks one documented contract of
// h3x.Queue, chosen by mode. It tracks the leases it hands out.
type brokenQueue struct {
	h3x.Queue
	mode string

	mu     sync.Mutex
	live   map[string]map[string]int // holder -> event ID -> attempt
	latest map[string]int            // event ID -> latest attempt leased
	holder map[string]string         // event ID -> holder of the latest attempt
}

func newBrokenQueue(mode string, opts h3x.QueueOptions) *brokenQueue {
	return &brokenQueue{Queue: h3x.NewMemoryQueue(opts), mode: mode,
		live: map[string]map[string]int{}, latest: map[string]int{}, holder: map[string]string{}}
}

func (q *brokenQueue) Lease(ctx context.Context, req h3x.LeaseRequest) ([]h3x.Lease, error) {
	ls, err := q.Queue.Lease(ctx, req)
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, l := range ls {
		if q.live[req.Holder] == nil {
			q.live[req.Holder] = map[string]int{}
		}
		if old, ok := q.holder[l.Event.ID]; ok {
			delete(q.live[old], l.Event.ID)
		}
		q.live[req.Holder][l.Event.ID] = l.Attempt
		q.latest[l.Event.ID] = l.Attempt
		q.holder[l.Event.ID] = req.Holder
	}
	return ls, err
}

func (q *brokenQueue) Release(ctx context.Context, holder string) error {
	q.mu.Lock()
	delete(q.live, holder)
	q.mu.Unlock()
	return q.Queue.Release(ctx, holder)
}

func (q *brokenQueue) holds(holder string, ref h3x.LeaseRef) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	a, ok := q.live[holder][ref.ID]
	return ok && (ref.Attempt == 0 || a == ref.Attempt)
}

// Nack, in mode "nack-ended-no-delay", forgets the delay for a delivery
// whose lease was released: the event is ready again at once.
func (q *brokenQueue) Nack(ctx context.Context, holder string, refs []h3x.LeaseRef, delay time.Duration, reason string) ([]h3x.SettleResult, error) {
	if q.mode != "nack-ended-no-delay" {
		return q.Queue.Nack(ctx, holder, refs, delay, reason)
	}
	out := make([]h3x.SettleResult, 0, len(refs))
	for _, ref := range refs {
		d := delay
		if !q.holds(holder, ref) {
			d = 0 // the bug
		}
		res, err := q.Queue.Nack(ctx, holder, []h3x.LeaseRef{ref}, d, reason)
		if err != nil {
			return nil, err
		}
		out = append(out, res...)
	}
	return out, nil
}

// Extend, in mode "extend-ended", reports an extension of its holder's
// ended (released) lease as applied, although nothing was extended.
func (q *brokenQueue) Extend(ctx context.Context, holder string, refs []h3x.LeaseRef, d time.Duration) ([]h3x.SettleResult, error) {
	res, err := q.Queue.Extend(ctx, holder, refs, d)
	if err != nil || q.mode != "extend-ended" {
		return res, err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	for i, ref := range refs {
		if res[i].Status == h3x.SettleStale && q.holder[ref.ID] == holder && q.latest[ref.ID] == ref.Attempt {
			res[i].Status = h3x.SettleOK // the bug
		}
	}
	return res, nil
}

// TestQueueSuiteCatchesBrokenQueues runs h3xtest.TestQueue, in a child
// process, against queues that each break one documented contract, and
// requires the suite to fail.
func TestQueueSuiteCatchesBrokenQueues(t *testing.T) {
	if mode := os.Getenv("H3XTEST_BROKEN_QUEUE"); mode != "" {
		h3xtest.TestQueue(t, func(t testing.TB, opts h3x.QueueOptions) (h3x.Queue, func() h3x.Queue) {
			if q := mutantQueue(mode, h3x.NewMemoryQueue(opts)); q != nil {
				return q, nil
			}
			return newBrokenQueue(mode, opts), nil
		})
		return
	}
	for _, mode := range append([]string{"nack-ended-no-delay", "extend-ended"}, mutants...) {
		t.Run(mode, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestQueueSuiteCatchesBrokenQueues$", "-test.count=1")
			cmd.Env = append(os.Environ(), "H3XTEST_BROKEN_QUEUE="+mode)
			out, err := cmd.CombinedOutput()
			if ctx.Err() != nil {
				t.Fatalf("the suite did not finish: %s", out)
			}
			if err == nil {
				t.Errorf("h3xtest.TestQueue passed a queue that breaks %q", mode)
			} else {
				t.Logf("caught:\n%s", lastLines(string(out), 15))
			}
		})
	}
}

func lastLines(s string, n int) string {
	lines := []string{}
	start := len(s)
	for i := len(s) - 1; i >= 0 && len(lines) < n; i-- {
		if s[i] == '\n' {
			lines = append(lines, s[i+1:start])
			start = i
		}
	}
	return s[max(start, 0):]
}
