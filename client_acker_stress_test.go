package h3x

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Stress tests of the acker's queue (client_subscribe.go): many goroutines
// settling and flushing against a real server, for lost wake-ups, a Flush
// answered before what was queued before it, settlements dropped around
// Close, and the bound on what queues. (The acker was broken four ways, no
// wake-up for a full batch, Flush answered before its batches, Close
// leaving the remainder, the timer left armed, and the matching test failed
// each time; TestAckerQueuedBound fails if the acker takes every full batch
// at once.)

// recordingQueue records, after the inner queue has applied them, the IDs
// of every ack, nack and extension, and may hold each call a little so that
// batches stay in flight (filling the errgroup and the acker's queue).
type recordingQueue struct {
	Queue
	mu     sync.Mutex
	seen   map[string]int
	calls  atomic.Int64
	maxDly time.Duration
}

func newRecordingQueue(maxDly time.Duration) *recordingQueue {
	return &recordingQueue{Queue: NewMemoryQueue(QueueOptions{}), seen: map[string]int{}, maxDly: maxDly}
}

func (q *recordingQueue) delay() {
	if q.maxDly > 0 {
		time.Sleep(rand.N(q.maxDly))
	}
}

func (q *recordingQueue) record(refs []LeaseRef) {
	q.calls.Add(1)
	q.mu.Lock()
	for _, r := range refs {
		q.seen[r.ID]++
	}
	q.mu.Unlock()
}

func (q *recordingQueue) has(id string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.seen[id] > 0
}

func (q *recordingQueue) missing(ids []string) []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	var m []string
	for _, id := range ids {
		if q.seen[id] == 0 {
			m = append(m, id)
		}
	}
	return m
}

func (q *recordingQueue) Ack(ctx context.Context, holder string, refs []LeaseRef) ([]SettleResult, error) {
	q.delay()
	res, err := q.Queue.Ack(ctx, holder, refs)
	q.record(refs)
	return res, err
}

func (q *recordingQueue) Nack(ctx context.Context, holder string, refs []LeaseRef, d time.Duration, reason string) ([]SettleResult, error) {
	q.delay()
	res, err := q.Queue.Nack(ctx, holder, refs, d, reason)
	q.record(refs)
	return res, err
}

func (q *recordingQueue) Extend(ctx context.Context, holder string, refs []LeaseRef, d time.Duration) ([]SettleResult, error) {
	q.delay()
	res, err := q.Queue.Extend(ctx, holder, refs, d)
	q.record(refs)
	return res, err
}

// waitOrFail waits for wg, failing the test (a hang: a lost wake-up or an
// add waiting for room for good) after d.
func waitOrFail(t *testing.T, wg *sync.WaitGroup, d time.Duration, what string) {
	t.Helper()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s still running after %v: lost wake-up or deadlock", what, d)
	}
}

// fetchN publishes n events to "orders" and fetches them all.
func fetchN(ctx context.Context, t *testing.T, c *Client, n int) []*Delivery {
	t.Helper()
	evs := make([]Event, 0, 100)
	for left := n; left > 0; {
		evs = evs[:0]
		for range min(left, 100) {
			evs = append(evs, Event{Namespace: "orders"})
		}
		if _, err := c.Publish(ctx, evs...); err != nil {
			t.Fatal(err)
		}
		left -= len(evs)
	}
	var ds []*Delivery
	for len(ds) < n {
		got, err := c.Fetch(ctx, n-len(ds), "orders")
		if err != nil {
			t.Fatalf("fetch: %d of %d, %v", len(ds), n, err)
		}
		ds = append(ds, got...)
	}
	return ds
}

// settleOne settles d with one op chosen by i: Ack, Nack or Extend.
func settleOne(d *Delivery, i int) error {
	switch i % 3 {
	case 0:
		return d.Ack()
	case 1:
		return d.Nack(time.Hour)
	default:
		return d.Extend(time.Minute)
	}
}

// Every Flush must answer only once the settlements its goroutine queued
// before it are applied, and must always answer.
func TestAckerFlushOrderingStress(t *testing.T) {
	for _, size := range []int{1, 2, 3, 7, 64} {
		for _, interval := range []time.Duration{time.Nanosecond, 50 * time.Microsecond, time.Hour} {
			t.Run(fmt.Sprintf("size%d/interval%v", size, interval), func(t *testing.T) {
				q := newRecordingQueue(200 * time.Microsecond)
				s := testServer(t, WithQueue(q))
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				defer cancel()
				c := mustDial(t, s, "alice", "alice-token", WithAckFlush(size, interval))
				const n, g = 600, 12
				ds := fetchN(ctx, t, c, n)
				var wg sync.WaitGroup
				errc := make(chan error, g)
				for w := range g {
					wg.Go(func() {
						var mine []string
						for i := w; i < len(ds); i += g {
							if err := settleOne(ds[i], i); err != nil {
								errc <- err
								return
							}
							mine = append(mine, ds[i].Event.ID)
							if rand.N(7) == 0 {
								fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
								err := c.Flush(fctx)
								fcancel()
								if err != nil {
									errc <- fmt.Errorf("Flush: %w", err)
									return
								}
								if m := q.missing(mine); len(m) > 0 {
									errc <- fmt.Errorf("Flush answered with %d of its goroutine's earlier settlements not applied (e.g. %s)", len(m), m[0])
									return
								}
							}
						}
						fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
						defer fcancel()
						if err := c.Flush(fctx); err != nil {
							errc <- fmt.Errorf("final Flush: %w", err)
							return
						}
						if m := q.missing(mine); len(m) > 0 {
							errc <- fmt.Errorf("final Flush answered with %d earlier settlements not applied", len(m))
						}
					})
				}
				waitOrFail(t, &wg, 30*time.Second, "settling goroutines")
				close(errc)
				for err := range errc {
					t.Error(err)
				}
			})
		}
	}
}

// With an interval of an hour and a number of settlements that is a
// multiple of the batch size, every settlement goes out in full batches:
// none may be left sleeping in the queue (a lost wake-up), no Flush, no timer.
func TestAckerNoLostWakeupFullBatches(t *testing.T) {
	for _, size := range []int{1, 2, 3, 5, 16, 50} {
		t.Run(fmt.Sprintf("size%d", size), func(t *testing.T) {
			q := newRecordingQueue(300 * time.Microsecond)
			s := testServer(t, WithQueue(q))
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			c := mustDial(t, s, "alice", "alice-token", WithAckFlush(size, time.Hour))
			n := size * (600 / size)
			ds := fetchN(ctx, t, c, n)
			var wg sync.WaitGroup
			const g = 16
			for w := range g {
				wg.Go(func() {
					for i := w; i < len(ds); i += g {
						if err := settleOne(ds[i], i); err != nil {
							t.Error(err)
							return
						}
						if rand.N(50) == 0 {
							time.Sleep(rand.N(200 * time.Microsecond))
						}
					}
				})
			}
			waitOrFail(t, &wg, 10*time.Second, "settling goroutines")
			ids := make([]string, len(ds))
			for i, d := range ds {
				ids[i] = d.Event.ID
			}
			deadline := time.Now().Add(5 * time.Second)
			for {
				m := q.missing(ids)
				if len(m) == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("size %d: %d of %d settlements (a multiple of the batch size) still unsent 5 s after the last add: lost wake-up", size, len(m), n)
				}
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
}

// With a short interval, whatever the count, everything goes out quickly.
func TestAckerNoLostWakeupInterval(t *testing.T) {
	for _, size := range []int{2, 7, 64, 300} {
		t.Run(fmt.Sprintf("size%d", size), func(t *testing.T) {
			q := newRecordingQueue(100 * time.Microsecond)
			s := testServer(t, WithQueue(q))
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			c := mustDial(t, s, "alice", "alice-token", WithAckFlush(size, 2*time.Millisecond))
			for round := range 20 {
				ds := fetchN(ctx, t, c, 1+rand.N(40))
				var wg sync.WaitGroup
				for i, d := range ds {
					wg.Go(func() {
						if err := settleOne(d, i); err != nil {
							t.Error(err)
						}
					})
				}
				waitOrFail(t, &wg, 10*time.Second, "settling goroutines")
				ids := make([]string, len(ds))
				for i, d := range ds {
					ids[i] = d.Event.ID
				}
				deadline := time.Now().Add(3 * time.Second)
				for len(q.missing(ids)) > 0 {
					if time.Now().After(deadline) {
						t.Fatalf("round %d: %d of %d settlements still unsent 3 s after the last add (interval 2 ms): lost wake-up", round, len(q.missing(ids)), len(ids))
					}
					time.Sleep(time.Millisecond)
				}
			}
		})
	}
}

// Close racing Ack/Nack/Extend/Flush: every settlement whose add returned
// nil is sent (the server is up, Close's flush has 5 s), every Flush returns.
func TestAckerCloseRacesAdd(t *testing.T) {
	for iter := range 12 {
		size := []int{1, 3, 16}[iter%3]
		withFlush := iter%2 == 1
		t.Run(fmt.Sprintf("iter%d/size%d/flush%v", iter, size, withFlush), func(t *testing.T) {
			q := newRecordingQueue(time.Duration(iter%2) * 200 * time.Microsecond)
			s := testServer(t, WithQueue(q))
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			c := mustDial(t, s, "alice", "alice-token", WithAckFlush(size, time.Hour))
			ds := fetchN(ctx, t, c, 400)
			slow := iter%4 < 2 // the settlers slower than the acker: remainders wait at Close
			var (
				wg       sync.WaitGroup
				okMu     sync.Mutex
				accepted []string
			)
			const g = 10
			start := make(chan struct{})
			for w := range g {
				wg.Go(func() {
					<-start
					for i := w; i < len(ds); i += g {
						err := settleOne(ds[i], i)
						if err == nil {
							okMu.Lock()
							accepted = append(accepted, ds[i].Event.ID)
							okMu.Unlock()
						} else if !errors.Is(err, ErrClosed) {
							t.Errorf("settle: %v", err)
						}
						if slow {
							time.Sleep(rand.N(300 * time.Microsecond))
						}
						if withFlush && rand.N(20) == 0 {
							fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
							err := c.Flush(fctx)
							fcancel()
							if errors.Is(err, context.DeadlineExceeded) {
								t.Errorf("Flush never answered around Close")
							}
						}
					}
				})
			}
			close(start)
			time.Sleep(time.Duration(rand.N(10000)) * time.Microsecond)
			if err := c.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
			waitOrFail(t, &wg, 20*time.Second, "settling goroutines")
			if m := q.missing(accepted); len(m) > 0 {
				t.Fatalf("%d of %d settlements accepted (add returned nil) were never sent", len(m), len(accepted))
			}
		})
	}
}

// A remainder (fewer than a batch, interval an hour) waiting when Close
// comes is sent by Close's flush; slow settlers racing Close likewise.
func TestAckerCloseSendsRemainder(t *testing.T) {
	for _, size := range []int{3, 16} {
		for r := 1; r < size; r += 5 {
			t.Run(fmt.Sprintf("size%d/r%d", size, r), func(t *testing.T) {
				q := newRecordingQueue(0)
				s := testServer(t, WithQueue(q))
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				c := mustDial(t, s, "alice", "alice-token", WithAckFlush(size, time.Hour))
				ds := fetchN(ctx, t, c, 2*size+r)
				ids := make([]string, len(ds))
				for i, d := range ds {
					ids[i] = d.Event.ID
					if err := settleOne(d, i); err != nil {
						t.Fatal(err)
					}
				}
				deadline := time.Now().Add(5 * time.Second)
				for len(q.missing(ids)) > r {
					if time.Now().After(deadline) {
						t.Fatalf("full batches not sent: %d missing", len(q.missing(ids)))
					}
					time.Sleep(time.Millisecond)
				}
				if m := len(q.missing(ids)); m != r {
					t.Fatalf("%d missing before Close, want the remainder %d (interval is an hour)", m, r)
				}
				if err := c.Close(); err != nil {
					t.Fatal(err)
				}
				if m := q.missing(ids); len(m) > 0 {
					t.Fatalf("%d of the remainder never sent by Close", len(m))
				}
			})
		}
	}
	for iter := range 6 {
		t.Run(fmt.Sprintf("slow%d", iter), func(t *testing.T) {
			q := newRecordingQueue(0)
			s := testServer(t, WithQueue(q))
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c := mustDial(t, s, "alice", "alice-token", WithAckFlush(7, time.Hour))
			ds := fetchN(ctx, t, c, 200)
			var (
				wg       sync.WaitGroup
				mu       sync.Mutex
				accepted []string
			)
			for w := range 3 {
				wg.Go(func() {
					for i := w; i < len(ds); i += 3 {
						time.Sleep(rand.N(2 * time.Millisecond))
						if err := settleOne(ds[i], i); err == nil {
							mu.Lock()
							accepted = append(accepted, ds[i].Event.ID)
							mu.Unlock()
						} else if !errors.Is(err, ErrClosed) {
							t.Error(err)
						}
					}
				})
			}
			time.Sleep(time.Duration(5+rand.N(30)) * time.Millisecond)
			if err := c.Close(); err != nil {
				t.Error(err)
			}
			waitOrFail(t, &wg, 20*time.Second, "settlers")
			if m := q.missing(accepted); len(m) > 0 {
				t.Fatalf("%d of %d accepted settlements never sent", len(m), len(accepted))
			}
		})
	}
}

// gatedAcks lets one Ack call through per token, holding the others.
type gatedAcks struct {
	Queue
	tokens chan struct{}
	done   chan struct{}
}

func (q *gatedAcks) Ack(ctx context.Context, holder string, refs []LeaseRef) ([]SettleResult, error) {
	select {
	case <-q.tokens:
	case <-q.done:
	}
	return q.Queue.Ack(ctx, holder, refs)
}

// While the server holds the acks, Delivery.Ack returns for eight batches in
// flight, the one the acker holds and 4 × size queued behind them (as
// WithAckFlush says), then waits, and again once those are answered: the
// acker takes a batch at a time, so it holds one, not every full batch
// queued.
func TestAckerQueuedBound(t *testing.T) {
	q := &gatedAcks{Queue: NewMemoryQueue(QueueOptions{}), tokens: make(chan struct{}, 100), done: make(chan struct{})}
	s := testServer(t, WithQueue(q))
	t.Cleanup(func() { close(q.done) })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	const size = 4
	const bound = (ackBatchesInFlight+1)*size + 4*size
	c := mustDial(t, s, "alice", "alice-token", WithAckFlush(size, time.Hour))
	ds := fetchN(ctx, t, c, 200)
	accepted, answered := 0, 0
	for round := range 4 {
		for accepted < len(ds) {
			d := ds[accepted]
			done := make(chan error, 1)
			go func() { done <- d.Ack() }()
			accepted++
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
				continue
			case <-time.After(300 * time.Millisecond):
			}
			break // this one waits for room
		}
		if out := accepted - answered - 1; out != bound {
			t.Errorf("round %d: %d settlements accepted and not answered, want %d", round, out, bound)
		}
		// Every batch in flight answered (the server answers a stream's
		// requests in order, so letting one arbitrary Ack through need not
		// answer any).
		for range ackBatchesInFlight {
			q.tokens <- struct{}{}
		}
		answered += ackBatchesInFlight * size
		time.Sleep(100 * time.Millisecond)
	}
}
