package h3x

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// longRetryQueue refuses every event whose ID starts with "slow-" as queue
// full with a long retry-after, and counts the refusals.
type longRetryQueue struct {
	Queue
	mu      sync.Mutex
	refused int
}

func (q *longRetryQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	return enqueueRefusing(ctx, q.Queue, events, func(ev Event) *Error {
		if !strings.HasPrefix(ev.ID, "slow-") {
			return nil
		}
		q.mu.Lock()
		q.refused++
		q.mu.Unlock()
		return &Error{Code: CodeQueueFull, Message: "full", RetryAfter: 20 * time.Second}
	})
}

func (q *longRetryQueue) refusals() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.refused
}

// publishAsyncTo starts a server over q and one PublishAsync call of n
// events with IDs prefix-0, prefix-1, … to "orders".
func publishAsyncTo(t *testing.T, q Queue, n int, prefix string) (*Client, *PublishCall) {
	t.Helper()
	s := testServer(t, WithQueue(q))
	c := mustDial(t, s, "alice", "alice-token")
	evs := make([]Event, n)
	for i := range evs {
		evs[i] = Event{Namespace: "orders", Type: "t", ID: fmt.Sprintf("%s-%d", prefix, i)}
	}
	return c, c.PublishAsync(context.Background(), evs...)
}

// closeWithin closes c and reports an error if Close takes more than 3 s,
// blocked by what; unblock, if not nil, then lets it return.
func closeWithin(t *testing.T, c *Client, what string, unblock func()) {
	t.Helper()
	closed := make(chan struct{})
	start := time.Now()
	go func() { c.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(3 * time.Second):
		t.Errorf("Close blocked for %v by %s", time.Since(start), what)
		if unblock != nil {
			unblock()
		}
		<-closed
		t.Logf("Close returned after %v", time.Since(start))
	}
}

// A PublishAsync call whose events were refused QUEUE_FULL with a long
// retry-after waits it out in a worker; Close must end that wait (as
// Publish's pause does with c.closed), not block for the retry-after.
// n=65 takes the old worker path (runAsync) as the reference.
func TestReviewPublishAsyncRetryAfterBlocksClose(t *testing.T) {
	for _, n := range []int{1, 65} {
		t.Run(fmt.Sprintf("events=%d", n), func(t *testing.T) {
			q := &longRetryQueue{Queue: NewMemoryQueue(QueueOptions{})}
			c, call := publishAsyncTo(t, q, n, "slow")
			deadline := time.Now().Add(5 * time.Second)
			for q.refusals() < n {
				if time.Now().After(deadline) {
					t.Fatal("never refused")
				}
				time.Sleep(time.Millisecond)
			}
			time.Sleep(100 * time.Millisecond) // the retry waits out its retry-after
			closeWithin(t, c, "a PublishAsync call waiting out a retry-after", nil)
			if _, err := call.Result(); !errors.Is(err, ErrClosed) {
				t.Errorf("call: %v, want ErrClosed", err)
			}
		})
	}
}

// retryThenHoldQueue refuses an event QUEUE_FULL (short retry-after) the
// first time it sees it, and holds the retry until open is closed.
type retryThenHoldQueue struct {
	Queue
	mu   sync.Mutex
	seen map[string]int
	held chan struct{} // closed when a retry is held
	open chan struct{}
	once sync.Once
}

func (q *retryThenHoldQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	q.mu.Lock()
	first := q.seen[events[0].ID] == 0
	for _, ev := range events {
		q.seen[ev.ID]++
	}
	q.mu.Unlock()
	if first {
		res := make([]PublishResult, len(events))
		for i, ev := range events {
			res[i] = PublishResult{ID: ev.ID, Status: PublishRefused, Err: &Error{Code: CodeQueueFull, Message: "full", RetryAfter: time.Millisecond}}
		}
		return res, nil
	}
	q.once.Do(func() { close(q.held) })
	select {
	case <-q.open:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return q.Queue.Enqueue(ctx, events)
}

// A PublishAsync call whose retry (sent inline, nothing else in flight) is
// held unanswered: Close waits for the retry's worker before it closes the
// connection, so the retry must end with the client, as runAsync's ctx
// does. n=65 takes the worker path, for reference.
func TestReviewPublishAsyncRetryInFlightBlocksClose(t *testing.T) {
	for _, n := range []int{1, 65} {
		t.Run(fmt.Sprintf("events=%d", n), func(t *testing.T) {
			q := &retryThenHoldQueue{Queue: NewMemoryQueue(QueueOptions{}), seen: map[string]int{}, held: make(chan struct{}), open: make(chan struct{})}
			c, call := publishAsyncTo(t, q, n, "x")
			select {
			case <-q.held:
			case <-time.After(5 * time.Second):
				t.Fatal("the retry never reached the queue")
			}
			closeWithin(t, c, "a PublishAsync retry in flight", func() { close(q.open) })
			select {
			case <-call.Done():
				if _, err := call.Result(); !errors.Is(err, ErrClosed) {
					t.Errorf("call: %v, want ErrClosed", err)
				}
			default:
				t.Error("call not done when Close returned")
			}
		})
	}
}

// Close amid sync Publish calls (inline senders that take pending batches in
// sent()) and shared PublishAsync calls: every PublishAsync call that had
// returned before Close returned is done when it returns.
func TestReviewPublishAsyncCloseStress(t *testing.T) {
	for round := range 30 {
		q := newFlakyQueue(time.Millisecond)
		s := testServer(t, WithQueue(q))
		c := mustDial(t, s, "alice", "alice-token")
		var mu sync.Mutex
		var calls []*PublishCall
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for g := range 40 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for r := 0; ; r++ {
					select {
					case <-stop:
						return
					default:
					}
					ev := Event{Namespace: "orders", Type: "t", ID: fmt.Sprintf("s%d-g%d-r%d", round, g, r)}
					if g%4 == 0 {
						if _, err := c.Publish(context.Background(), ev); errors.Is(err, ErrClosed) {
							return
						}
						continue
					}
					p := c.PublishAsync(context.Background(), ev)
					mu.Lock()
					calls = append(calls, p)
					mu.Unlock()
					if r%8 == 7 {
						<-p.Done()
					}
				}
			}()
		}
		time.Sleep(time.Duration(20+round%7*5) * time.Millisecond)
		c.Close()
		mu.Lock()
		snap := slices.Clone(calls)
		mu.Unlock()
		for i, p := range snap {
			select {
			case <-p.Done():
			default:
				t.Fatalf("round %d: call %d of %d not done when Close returned", round, i, len(snap))
			}
		}
		close(stop)
		wg.Wait()
	}
}
