package h3x

import (
	"context"
	"crypto/tls"
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// blockingQueue blocks Enqueue (and Ack, when blockAck is set) until
// release is closed or the call's context ends: a storage backend that has
// stopped answering but honours its context.
type blockingQueue struct {
	Queue
	entered  chan struct{}
	once     sync.Once
	release  chan struct{}
	blockAck bool
}

func newBlockingQueue() *blockingQueue {
	return &blockingQueue{Queue: NewMemoryQueue(QueueOptions{}), entered: make(chan struct{}), release: make(chan struct{})}
}

func (q *blockingQueue) block(ctx context.Context) error {
	q.once.Do(func() { close(q.entered) })
	select {
	case <-q.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (q *blockingQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	if err := q.block(ctx); err != nil {
		return nil, err
	}
	return q.Queue.Enqueue(ctx, events)
}

// startBlockedPublish starts a server over a blocking queue and a publish
// that is stuck in Enqueue.
func startBlockedPublish(t *testing.T) (*Server, *blockingQueue) {
	t.Helper()
	q := newBlockingQueue()
	s := testServer(t, WithQueue(q))
	t.Cleanup(func() {
		select {
		case <-q.release:
		default:
			close(q.release)
		}
	})
	c := mustDial(t, s, "alice", "alice-token")
	pctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	t.Cleanup(cancel)
	c.PublishAsync(pctx, Event{ID: "stuck", Namespace: "orders"})
	select {
	case <-q.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("publish never reached the queue")
	}
	return s, q
}

// Shutdown's doc: "If ctx ends first, it closes what is left at once and
// returns ctx's error." With a queue whose Enqueue does not return (a hung
// storage backend), Shutdown must still return once its ctx ends (it used
// to wait for ever).
func TestShutdownReturnsWhenCtxEndsDespiteStuckQueue(t *testing.T) {
	s, q := startBlockedPublish(t)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.Shutdown(ctx) }()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Shutdown: %v, want context.DeadlineExceeded", err)
		}
	case <-time.After(3 * time.Second):
		close(q.release) // let the server finish, so the test ends cleanly
		<-done
		t.Fatal("Shutdown(ctx with a 300ms deadline) still running 3s later: it waits for a stuck Queue.Enqueue, whose ctx the server never cancels (context.WithoutCancel)")
	}
}

// Close is documented as stopping the server "at once" (issue 4: Close is
// immediate). A queue call that honours its context was never cancelled: the
// server passed context.WithoutCancel to Enqueue, Ack, Nack and Extend.
func TestCloseCancelsStuckQueueCalls(t *testing.T) {
	s, q := startBlockedPublish(t)
	done := make(chan error, 1)
	go func() { done <- s.Close() }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		close(q.release)
		<-done
		t.Fatal("Close still running 3s later: it waits for Queue.Enqueue, called with a context that Close never cancels")
	}
}

// A custom handler that does not watch its ctx (or is stuck in application
// code) made Shutdown(ctx) wait past ctx.
func TestShutdownReturnsWhenCtxEndsDespiteStuckHandler(t *testing.T) {
	s := testServer(t)
	entered := make(chan struct{})
	release := make(chan struct{})
	s.Handle(0x90, HandlerFunc(func(ctx context.Context, st *Stream) error {
		close(entered)
		<-release // application work that does not watch ctx
		return nil
	}))
	ctx := context.Background()
	st := openAppStream(t, s)
	defer st.Close()
	if err := st.WriteFrame(0x90, []byte("x")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("handler not called")
	}
	sctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.Shutdown(sctx) }()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Shutdown: %v, want context.DeadlineExceeded", err)
		}
		close(release)
	case <-time.After(3 * time.Second):
		close(release)
		<-done
		t.Fatal("Shutdown(ctx with a 300ms deadline) still running 3s later: it waits without bound for a stream handler")
	}
}

// A panic in an application handler (Server.Handle) took the whole
// process down: the broker, its queue and every other client with it.
// As net/http does, the server now recovers it and resets that stream.
func TestHandlerPanicDoesNotCrashServer(t *testing.T) {
	if os.Getenv("H3X_AUDIT_CHILD") == "1" {
		s := testServer(t)
		s.Handle(0x91, HandlerFunc(func(ctx context.Context, st *Stream) error {
			var m map[string]int
			m["boom"] = 1 // a bug in application code
			return nil
		}))
		st := openAppStream(t, s)
		st.WriteFrame(0x91, nil)
		st.ReadFrame() // the stream should be reset (CodeInternal)
		st.Close()
		assertServing(t, s)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHandlerPanicDoesNotCrashServer$", "-test.count=1")
	cmd.Env = append(os.Environ(), "H3X_AUDIT_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		lines := strings.Split(string(out), "\n")
		if len(lines) > 4 {
			lines = lines[:4]
		}
		t.Fatalf("the server process died from a panic in an application handler: %v\n%s", err, strings.Join(lines, "\n"))
	}
}

// closeErrQueue fails its Close (a final flush that failed, say).
type closeErrQueue struct{ Queue }

var errAuditClose = errors.New("audit: final flush failed")

func (q closeErrQueue) Close() error {
	q.Queue.Close()
	return errAuditClose
}

// Shutdown closed the queue but dropped its error: a graceful stop whose
// queue failed to close (data not flushed) reported success. Close returns
// the same error.
func TestShutdownReportsQueueCloseError(t *testing.T) {
	s := testServer(t, WithQueue(closeErrQueue{NewMemoryQueue(QueueOptions{})}))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.Shutdown(ctx)
	if !errors.Is(err, errAuditClose) {
		t.Errorf("Shutdown returned %v; the queue's Close failed with %q (Close() returns %v)", err, errAuditClose, s.Close())
	}
}

// batchErrQueue refuses whole batches with a retryable QUEUE_FULL *Error.
type batchErrQueue struct{ Queue }

func (q batchErrQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	return nil, &Error{Code: CodeQueueFull, Message: "backend full", RetryAfter: time.Second}
}

type refusedRecorder struct {
	NopHooks
	mu    sync.Mutex
	codes []ErrorCode
}

func (h *refusedRecorder) Refused(_ string, code ErrorCode, n int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for range n {
		h.codes = append(h.codes, code)
	}
}

// An Enqueue that fails the batch with an *Error reaches the client with
// that error's code; Hooks.Refused reported CodeInternal: metrics said
// "internal" while clients were told "queue full".
func TestHooksRefusedCodeMatchesClientOutcome(t *testing.T) {
	h := &refusedRecorder{}
	s := testServer(t, WithQueue(batchErrQueue{NewMemoryQueue(QueueOptions{})}), WithHooks(h))
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	st := rc.stream(frameBytes(t, FrameSendEvent, &h3xpb.SendEvent{RequestId: 1, Events: []*h3xpb.EventPayload{{Id: "e1", Namespace: "orders"}}}), true)
	var res h3xpb.SendResult
	if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameSendResult, &res); err != nil {
		t.Fatal(err)
	}
	if got := ErrorCode(res.GetOutcomes()[0].GetCode()); got != CodeQueueFull {
		t.Fatalf("client outcome code %v, want %v", got, CodeQueueFull)
	}
	err := CodeQueueFull
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.codes) == 0 {
		t.Fatal("Refused never called")
	}
	for _, code := range h.codes {
		if code != CodeQueueFull {
			t.Fatalf("Hooks.Refused reported %v; the client was refused with %v (client error: %v)", code, CodeQueueFull, err)
		}
	}
}

// Issue 4 §1: "validation that reports every problem at once"; NewServer's
// doc: "reporting every problem at once, each matching ErrInvalidArgument".
// A TLS configuration without a certificate is a configuration problem,
// but it was reported only after every other one was fixed, and did not
// match ErrInvalidArgument.
func TestNewServerReportsTLSProblemWithOthers(t *testing.T) {
	reg, _ := ParseRegistry("a:orders=t")
	_, err := NewServer(WithQueue(NewMemoryQueue(QueueOptions{})), WithRegistry(reg),
		WithTLSConfig(&tls.Config{}), WithMaxStreams(0))
	if err == nil {
		t.Fatal("accepted")
	}
	if !strings.Contains(err.Error(), "certificate") {
		t.Errorf("NewServer reported only %q; the TLS configuration without a certificate is not reported with it", err)
	}
	_, err = NewServer(WithQueue(NewMemoryQueue(QueueOptions{})), WithRegistry(reg), WithTLSConfig(&tls.Config{}))
	if !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("TLS config without a certificate: %v does not match ErrInvalidArgument", err)
	}
}

// An address whose port is out of range passed NewServer's validation and
// failed only at Start.
func TestNewServerRejectsBadPort(t *testing.T) {
	reg, _ := ParseRegistry("a:orders=t")
	s, err := NewServer(WithAddr("127.0.0.1:99999"), WithQueue(NewMemoryQueue(QueueOptions{})), WithRegistry(reg))
	if err == nil {
		defer s.Close()
		serr := s.Start(context.Background())
		t.Fatalf("NewServer accepted WithAddr(\"127.0.0.1:99999\"); Start then fails with: %v", serr)
	}
}

// PROTOCOL.md §8: "A sender MUST NOT send a larger frame [than the maximum
// frame size]; the server never sends one." Stream.WriteFrame in a
// server handler sent any size: the client then failed the stream with
// FRAME_TOO_LARGE, and the handler was never told.
func TestHandlerWriteFrameRefusesOversizedFrame(t *testing.T) {
	s := testServer(t)
	werr := make(chan error, 1)
	s.Handle(0x92, HandlerFunc(func(ctx context.Context, st *Stream) error {
		if _, _, err := st.ReadFrame(); err != nil {
			return err
		}
		err := st.WriteFrame(0x92, make([]byte, DefaultMaxFrameSize+1))
		werr <- err
		return err
	}))
	st := openAppStream(t, s)
	defer st.Close()
	st.WriteFrame(0x92, nil)
	_, _, rerr := st.ReadFrame()
	st.Close() // the client gives up on the stream: the blocked write ends
	select {
	case err := <-werr:
		if !errors.Is(err, ErrFrameTooLarge) {
			t.Fatalf("server Stream.WriteFrame of a frame above the maximum size returned %v (want ErrFrameTooLarge before sending); the client read: %v", err, rerr)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("handler did not write")
	}
}

// Issue 4 §8: "every lease of a connection released the moment it ends, so
// its events are ready again at once". The server released a closed
// connection's leases only after every stream handler of the connection had
// returned (serverConn.serve: c.streams.Wait() before Queue.Release), so a
// slow publish (a slow disk) on another stream of that connection kept the
// leases held.
func TestLeasesReleasedAtOnceDespiteSlowPublish(t *testing.T) {
	q := &slowNSQueue{Queue: NewMemoryQueue(QueueOptions{}), ns: "audit", delay: 3 * time.Second}
	s := testServer(t, WithQueue(q))
	pub := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := pub.Publish(ctx, Event{Namespace: "orders", Message: "one"}); err != nil {
		t.Fatal(err)
	}
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	st := rc.stream(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 1, Namespaces: []string{"orders"}, Limit: 10}), false)
	var batch h3xpb.EventsBatch
	if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameEventsBatch, &batch); err != nil || len(batch.GetEvents()) != 1 {
		t.Fatalf("fetch: %v, %d events", err, len(batch.GetEvents()))
	}
	// A publish that storage takes 3 s to make durable, then the client goes.
	rc.stream(frameBytes(t, FrameSendEvent, &h3xpb.SendEvent{RequestId: 1, Events: []*h3xpb.EventPayload{{Namespace: "audit"}}}), true)
	time.Sleep(100 * time.Millisecond)
	rc.qc.CloseWithError(0, "bye")

	other := mustDial(t, s, "bob", "bob-token")
	fctx, fcancel := context.WithTimeout(ctx, time.Second)
	defer fcancel()
	start := time.Now()
	got, err := other.Fetch(fctx, 10, "orders")
	if err != nil || len(got) != 1 {
		t.Fatalf("1 s after the connection holding the lease closed: %v, %d events (its lease is held until its slow publish ends, %v later)", err, len(got), 3*time.Second)
	}
	_ = start
}

// slowNSQueue takes delay to store events of namespace ns.
type slowNSQueue struct {
	Queue
	ns    string
	delay time.Duration
}

func (q *slowNSQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	if len(events) > 0 && events[0].Namespace == q.ns {
		time.Sleep(q.delay)
	}
	return q.Queue.Enqueue(ctx, events)
}

// waitErrQueue's Wait fails at once (a backend whose notification channel
// is down) and counts Lease calls.
type waitErrQueue struct {
	Queue
	mu     sync.Mutex
	leases int
}

func (q *waitErrQueue) Wait(ctx context.Context, namespaces []string) error {
	return errors.New("audit: notifications unavailable")
}

func (q *waitErrQueue) Lease(ctx context.Context, req LeaseRequest) ([]Lease, error) {
	q.mu.Lock()
	q.leases++
	q.mu.Unlock()
	return q.Queue.Lease(ctx, req)
}

// A long poll ignored Queue.Wait's error and looped straight back to Lease:
// with a queue whose Wait fails, one parked fetch spun a CPU for its whole
// wait (up to 30 s), and the failure was never reported to the client or
// logged.
func TestLongPollDoesNotSpinWhenQueueWaitFails(t *testing.T) {
	q := &waitErrQueue{Queue: NewMemoryQueue(QueueOptions{})}
	s := testServer(t, WithQueue(q))
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	st := rc.stream(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 1, Namespaces: []string{"orders"}, Limit: 1, MaxWaitMs: 500}), true)
	ft, _, err := newFrameReader(st, DefaultMaxFrameSize).next()
	q.mu.Lock()
	n := q.leases
	q.mu.Unlock()
	if n > 50 {
		t.Fatalf("one 500 ms long poll called Queue.Lease %d times (answer: %v, %v): it busy-loops when Queue.Wait fails", n, ft, err)
	}
}

// Hooks.Refused "reports events refused with code (..., invalid)". A
// SendEvent over max_events_per_send refuses all its events with
// INVALID_ARGUMENT, and no hook hears of it.
func TestHooksRefusedCountsOversizedSendEvent(t *testing.T) {
	h := &refusedRecorder{}
	s := testServer(t, WithHooks(h), WithMaxEventsPerSend(2))
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	evs := []*h3xpb.EventPayload{{Namespace: "orders"}, {Namespace: "orders"}, {Namespace: "orders"}}
	st := rc.stream(frameBytes(t, FrameSendEvent, &h3xpb.SendEvent{RequestId: 1, Events: evs}), true)
	if code := streamError(t, st); code != CodeInvalidArgument {
		t.Fatalf("answer code %v, want INVALID_ARGUMENT", code)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.codes) != 3 {
		t.Fatalf("Hooks.Refused reported %d events (%v) for a SendEvent of 3 events refused INVALID_ARGUMENT", len(h.codes), h.codes)
	}
}

// openAppStream dials s as alice and opens an application stream.
func openAppStream(t *testing.T, s *Server) *Stream {
	t.Helper()
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := c.OpenStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}
