package embeddedtest_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/h3x-io/h3x"
	embeddedtest "github.com/h3x-io/h3x/examples/embedded-test"
	"github.com/h3x-io/h3x/h3xtest"
)

// TestMain checks that no test leaves a goroutine behind: h3xtest's server
// and the clients it dials are closed by t.Cleanup.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// handled records what a worker did, for a test to wait on.
type handled struct {
	mu       sync.Mutex
	ids      map[string]int // event id → times handled
	attempts map[string]int // event id → last attempt number
	changed  chan struct{}
}

func newHandled() *handled {
	return &handled{ids: make(map[string]int), attempts: make(map[string]int), changed: make(chan struct{}, 1)}
}

func (h *handled) add(d *h3x.Delivery) {
	h.mu.Lock()
	h.ids[d.Event.ID]++
	h.attempts[d.Event.ID] = d.Attempt()
	h.mu.Unlock()
	select {
	case h.changed <- struct{}{}:
	default:
	}
}

// times returns how many distinct events were handled, and the last attempt
// number of id.
func (h *handled) times(id string) (distinct, attempt int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.ids), h.attempts[id]
}

// waitFor waits until every id was handled at least once.
func (h *handled) waitFor(t *testing.T, ctx context.Context, ids ...string) {
	t.Helper()
	for {
		h.mu.Lock()
		missing := ""
		for _, id := range ids {
			if h.ids[id] == 0 {
				missing = id
				break
			}
		}
		h.mu.Unlock()
		if missing == "" {
			return
		}
		select {
		case <-h.changed:
		case <-ctx.Done():
			t.Fatalf("%s was never handled: %v", missing, ctx.Err())
		}
	}
}

// startWorker runs w until the test ends.
func startWorker(t *testing.T, w *embeddedtest.Worker) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("worker: %v", err)
		}
	})
}

// waitDrained waits until the queue holds nothing for the namespace: every
// event acked.
func waitDrained(t *testing.T, ctx context.Context, srv *h3xtest.Server) {
	t.Helper()
	for {
		stats, err := srv.Queue().Stats(ctx, embeddedtest.Namespace)
		if err != nil {
			t.Fatal(err)
		}
		if s := stats[0]; s.Ready+s.Leased+s.Delayed == 0 {
			return
		}
		select {
		case <-time.After(10 * time.Millisecond):
		case <-ctx.Done():
			t.Fatalf("events left in the queue: %+v", stats[0])
		}
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestOrdersAreHandledAndAcked(t *testing.T) {
	srv := h3xtest.NewServer(t) // a broker for this test only
	c := srv.Dial(t)            // the ready test client, closed by t.Cleanup
	ctx := testCtx(t)

	n := embeddedtest.Notifier{Client: c}
	for _, id := range []string{"1", "2", "3"} {
		if err := n.OrderCreated(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	// A retried notification is stored once.
	if err := n.OrderCreated(ctx, "1"); err != nil {
		t.Fatal(err)
	}

	h := newHandled()
	startWorker(t, &embeddedtest.Worker{Client: c, Handle: func(_ context.Context, d *h3x.Delivery) error {
		h.add(d)
		return nil
	}})
	h.waitFor(t, ctx, "order-1-created", "order-2-created", "order-3-created")
	waitDrained(t, ctx, srv)
	if n, _ := h.times(""); n != 3 {
		t.Fatalf("handled %d distinct events, want the three orders", n)
	}
}

func TestFailedOrderIsRetried(t *testing.T) {
	srv := h3xtest.NewServer(t)
	c := srv.Dial(t)
	ctx := testCtx(t)

	h := newHandled()
	var once sync.Once
	startWorker(t, &embeddedtest.Worker{Client: c, Handle: func(_ context.Context, d *h3x.Delivery) error {
		failed := false
		once.Do(func() { failed = true })
		if failed {
			return errors.New("payment service down") // nacked: delivered again
		}
		h.add(d)
		return nil
	}})
	if err := (embeddedtest.Notifier{Client: c}).OrderCreated(ctx, "7"); err != nil {
		t.Fatal(err)
	}
	h.waitFor(t, ctx, "order-7-created")
	if _, got := h.times("order-7-created"); got != 2 {
		t.Fatalf("handled on attempt %d, want 2", got)
	}
	waitDrained(t, ctx, srv)
}

// TestWorkerSurvivesBrokerRestart crashes the broker under a running worker:
// the client reconnects by itself, the subscription resumes, and every order
// is handled (at least once: a lost ack means handling it again).
func TestWorkerSurvivesBrokerRestart(t *testing.T) {
	srv := h3xtest.NewServer(t)
	c := srv.Dial(t)
	ctx := testCtx(t)
	n := embeddedtest.Notifier{Client: c}

	h := newHandled()
	startWorker(t, &embeddedtest.Worker{Client: c, Handle: func(_ context.Context, d *h3x.Delivery) error {
		h.add(d)
		return nil
	}})
	for _, id := range []string{"1", "2"} {
		if err := n.OrderCreated(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	h.waitFor(t, ctx, "order-1-created", "order-2-created")

	srv.Restart() // same address, queue and certificate; every connection lost

	// Publish waits for the client to reconnect, then sends.
	for _, id := range []string{"3", "4"} {
		if err := n.OrderCreated(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	h.waitFor(t, ctx, "order-3-created", "order-4-created")
	waitDrained(t, ctx, srv)

	// DropConnections is the same without the restart: a network failure.
	srv.DropConnections()
	if err := n.OrderCreated(ctx, "5"); err != nil {
		t.Fatal(err)
	}
	h.waitFor(t, ctx, "order-5-created")
	waitDrained(t, ctx, srv)
}
