package h3x

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// flakyQueue refuses some events QUEUE_FULL the first time it sees them,
// slows every Enqueue a little, and counts how often each ID is stored.
type flakyQueue struct {
	Queue
	delay   time.Duration
	mu      sync.Mutex
	refused map[string]bool
	stored  map[string]int
	maxReq  atomic.Int32
}

func newFlakyQueue(delay time.Duration) *flakyQueue {
	return &flakyQueue{Queue: NewMemoryQueue(QueueOptions{}), delay: delay, refused: map[string]bool{}, stored: map[string]int{}}
}

func (q *flakyQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	for {
		m := q.maxReq.Load()
		if int32(len(events)) <= m || q.maxReq.CompareAndSwap(m, int32(len(events))) {
			break
		}
	}
	time.Sleep(q.delay)
	res, err := enqueueRefusing(ctx, q.Queue, events, func(ev Event) *Error {
		h := fnv.New32a()
		h.Write([]byte(ev.ID))
		q.mu.Lock()
		defer q.mu.Unlock()
		if h.Sum32()%3 != 0 || q.refused[ev.ID] {
			return nil
		}
		q.refused[ev.ID] = true
		return &Error{Code: CodeQueueFull, Message: "full", RetryAfter: time.Millisecond}
	})
	if err != nil {
		return nil, err
	}
	q.mu.Lock()
	for _, r := range res {
		if r.Status == PublishStored {
			q.stored[r.ID]++
		}
	}
	q.mu.Unlock()
	return res, nil
}

// enqueueRefusing refuses the events for which refuse returns an error and
// enqueues the others in inner, in order, merging the results.
func enqueueRefusing(ctx context.Context, inner Queue, events []Event, refuse func(Event) *Error) ([]PublishResult, error) {
	res := make([]PublishResult, len(events))
	var pass []Event
	var at []int
	for i, ev := range events {
		if e := refuse(ev); e != nil {
			res[i] = PublishResult{ID: ev.ID, Status: PublishRefused, Err: e}
			continue
		}
		pass = append(pass, ev)
		at = append(at, i)
	}
	if len(pass) > 0 {
		r, err := inner.Enqueue(ctx, pass)
		if err != nil {
			return nil, err
		}
		for j, i := range at {
			res[i] = r[j]
		}
	}
	return res, nil
}

// Many concurrent small publishes, some refused QUEUE_FULL once (retried by
// Publish), some whose ctx ends early and are retried by their caller with
// the same IDs: every caller gets its own events' results, and every event
// is stored exactly once.
func TestReviewSharedStress(t *testing.T) {
	q := newFlakyQueue(3 * time.Millisecond)
	s := testServer(t, WithQueue(q))
	c := mustDial(t, s, "alice", "alice-token")
	var wg sync.WaitGroup
	var bad atomic.Int32
	for g := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range 5 {
				n := 1 + (g+r)%4
				evs := make([]Event, n)
				for i := range evs {
					evs[i] = Event{Namespace: "orders", Type: "t", ID: fmt.Sprintf("g%d-r%d-e%d", g, r, i)}
				}
				if (g+r)%7 == 0 {
					// Give up almost at once, then retry with the same events.
					ctx, cancel := context.WithTimeout(context.Background(), time.Duration(g%3)*time.Millisecond)
					c.Publish(ctx, evs...)
					cancel()
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				res, err := c.Publish(ctx, evs...)
				cancel()
				if err != nil {
					t.Errorf("g%d r%d: %v", g, r, err)
					bad.Add(1)
					continue
				}
				for i, x := range res {
					if x.ID != evs[i].ID || (x.Status != PublishStored && x.Status != PublishDuplicate) {
						t.Errorf("g%d r%d e%d: got %+v", g, r, i, x)
						bad.Add(1)
					}
				}
			}
		}()
	}
	wg.Wait()
	q.mu.Lock()
	for id, n := range q.stored {
		if n != 1 {
			t.Errorf("%s stored %d times", id, n)
		}
	}
	q.mu.Unlock()
	t.Logf("largest request: %d events", q.maxReq.Load())
	waitSends(t, c, 0, 0)
}

// Close while shared requests are in flight and chunks wait, with callers
// giving up at random: every call returns, Close returns, and nothing
// leaks (TestMain's goroutine check).
func TestReviewSharedCloseStress(t *testing.T) {
	for round := range 5 {
		q := newFlakyQueue(2 * time.Millisecond)
		s := testServer(t, WithQueue(q))
		c := mustDial(t, s, "alice", "alice-token")
		var wg sync.WaitGroup
		for g := range 100 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for r := 0; ; r++ {
					ctx, cancel := context.WithTimeout(context.Background(), time.Duration(1+g%5)*time.Millisecond)
					if g%2 == 0 {
						cancel()
						ctx, cancel = context.WithTimeout(context.Background(), 20*time.Second)
					}
					_, err := c.Publish(ctx, Event{Namespace: "orders", Type: "t", ID: fmt.Sprintf("x%d-g%d-r%d", round, g, r)})
					cancel()
					if errors.Is(err, ErrClosed) {
						return
					}
					if err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
						t.Errorf("g%d: %v", g, err)
						return
					}
				}
			}()
		}
		time.Sleep(time.Duration(20+round*15) * time.Millisecond)
		done := make(chan struct{})
		go func() { c.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Fatal("Close hangs")
		}
		ch := make(chan struct{})
		go func() { wg.Wait(); close(ch) }()
		select {
		case <-ch:
		case <-time.After(15 * time.Second):
			t.Fatal("a Publish outlived Close")
		}
		c.sends.mu.Lock()
		inFlight := c.sends.inFlight
		c.sends.mu.Unlock()
		if inFlight != 0 {
			t.Errorf("round %d: %d shared requests still counted in flight after Close", round, inFlight)
		}
	}
}

// Chunks waiting together for a shared request cut by the first server's
// limits; the server is replaced by one with lower limits (events per send,
// then frame size): every caller gets its events stored.
func TestReviewSharedAcrossRestartLowerEvents(t *testing.T) {
	sharedAcrossRestart(t, 0, func(perSend int) []ServerOption { return []ServerOption{WithMaxEventsPerSend(10)} })
}

func TestReviewSharedAcrossRestartLowerFrame(t *testing.T) {
	sharedAcrossRestart(t, 2000, func(int) []ServerOption { return []ServerOption{WithMaxFrameSize(32 << 10)} })
}

func sharedAcrossRestart(t *testing.T, body int, replacement func(perSend int) []ServerOption) {
	cert, err := selfSignedCert()
	if err != nil {
		t.Fatal(err)
	}
	tlsConf := &tls.Config{Certificates: []tls.Certificate{cert}}
	start := func(addr string, opts ...ServerOption) *Server {
		return testServer(t, append([]ServerOption{WithAddr(addr), WithTLSConfig(tlsConf)}, opts...)...)
	}
	q := newGateQueue()
	q.shut.Store(true)
	a := start("127.0.0.1:0", WithQueue(q))
	addr := a.Addr().String()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, WithCredentials("alice", "alice-token"), WithTrustedFingerprint(Fingerprint(cert.Certificate[0])), WithBackoff(fastBackoff))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	firsts := fillShared(t, c)
	data := []byte(strings.Repeat("x", body))
	const n = 100
	errs := make(chan error, n)
	for i := range n {
		go func() {
			res, err := c.Publish(ctx, Event{Namespace: "orders", Type: "t", ID: fmt.Sprintf("w-%d", i), Data: data})
			if err == nil && res[0].Status != PublishStored && res[0].Status != PublishDuplicate {
				err = fmt.Errorf("w-%d: %+v", i, res[0])
			}
			errs <- err
		}()
	}
	waitSends(t, c, sharedSendsInFlight, n)
	a.Close()
	close(q.open)
	start(addr, append([]ServerOption{WithQueue(NewMemoryQueue(QueueOptions{}))}, replacement(0)...)...)
	// The first requests were in the old server's queue when it closed:
	// their outcome is the old server's (a storage failure, retryable or
	// not), not the batching's.
	for range sharedSendsInFlight {
		<-firsts
	}
	for range n {
		if err := <-errs; err != nil {
			t.Errorf("waiting caller: %v", err)
		}
	}
}
