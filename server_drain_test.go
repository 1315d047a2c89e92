package h3x

import (
	"context"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/h3x-io/h3x/internal/faultnet"
	"github.com/h3x-io/h3x/proto/h3xpb"
)

// hookQueue delays every Enqueue by delay (a slow fsync) and runs before
// (if set) at its end, just before the server writes the SendResult.
type hookQueue struct {
	Queue
	delay  time.Duration
	before func()
}

func (q *hookQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	time.Sleep(q.delay)
	res, err := q.Queue.Enqueue(ctx, events)
	if q.before != nil {
		q.before()
	}
	return res, err
}

// PROTOCOL.md §5.1: once no request is in flight, the server closes a
// draining connection "a few round trips after that Pong (time for the last
// answers to be acknowledged: closing discards stream data not yet
// delivered)". A publish that was in flight when Shutdown began, and that
// is answered after the client's Pong, used to be followed by the close
// within 5 ms of its answer being written: if the packet carrying the
// answer was lost, it was never retransmitted, and the client never learnt
// that its publish was stored.
func TestShutdownLingersAfterLastAnswer(t *testing.T) {
	// Set after the server starts, read by its publish: through an atomic,
	// since the race detector does not see the UDP packets that order them.
	var proxyP atomic.Pointer[faultnet.Proxy]
	q := &hookQueue{Queue: NewMemoryQueue(QueueOptions{}), delay: 400 * time.Millisecond, before: func() {
		// The packet carrying the SendResult is lost (a 15 ms outage,
		// shorter than a probe timeout).
		proxy := proxyP.Load()
		proxy.SetBlackhole(true)
		time.AfterFunc(15*time.Millisecond, func() { proxy.SetBlackhole(false) })
	}}
	s := testServer(t, WithQueue(q))
	proxy := newUDPProxy(t, s.Addr().(*net.UDPAddr))
	proxyP.Store(proxy)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, proxy.Addr(), WithCredentials("alice", "alice-token"), WithTrustedFingerprint(s.Fingerprint()),
		WithBackoff(fastBackoff), WithIdleTimeout(time.Second), WithDialTimeout(300*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pctx, pcancel := context.WithTimeout(ctx, 3*time.Second)
	defer pcancel()
	call := c.PublishAsync(pctx, Event{ID: "in-flight", Namespace: "orders"})
	time.Sleep(100 * time.Millisecond) // the SendEvent is being stored
	sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
	defer scancel()
	if err := s.Shutdown(sctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	res, err := call.Result()
	if err != nil {
		t.Fatalf("publish in flight at Shutdown: %v (its answer was lost once and the connection closed before a retransmission)", err)
	}
	if res[0].Status != PublishStored {
		t.Fatalf("status %v", res[0].Status)
	}
}

// Start(ctx) documents that the end of ctx shuts the server down "as
// Shutdown with a 5 s bound": gracefully, so a publish in flight is answered
// on the draining connection and the client is told to go away (GoAway)
// rather than cut off. The bound's context used to be cancelled as soon as
// the Shutdown goroutine was started (a deferred cancel in the goroutine that
// starts it), so the end of ctx closed every connection at once.
func TestStartContextEndShutsDownGracefully(t *testing.T) {
	reg, err := ParseRegistry("alice:orders=alice-token")
	if err != nil {
		t.Fatal(err)
	}
	q := &hookQueue{Queue: NewMemoryQueue(QueueOptions{}), delay: 300 * time.Millisecond}
	s, err := NewServer(WithAddr("127.0.0.1:0"), WithQueue(q), WithRegistry(reg))
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	defer stop()
	if err := s.Start(sctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	disconnected := make(chan error, 1)
	c := mustDial(t, s, "alice", "alice-token", WithBackoff(fastBackoff), WithStateHandler(func(sc StateChange) {
		if sc.State == StateDisconnected {
			select {
			case disconnected <- sc.Err:
			default:
			}
		}
	}))
	pctx, pcancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer pcancel()
	call := c.PublishAsync(pctx, Event{ID: "in-flight", Namespace: "orders"})
	time.Sleep(100 * time.Millisecond) // the SendEvent is being stored
	stop()                             // the server's context ends: graceful shutdown
	if err := <-disconnected; !errors.Is(err, ErrShuttingDown) {
		t.Errorf("client disconnected by %v, want a GoAway (shutting down)", err)
	}
	res, err := call.Result()
	if err != nil {
		t.Fatalf("publish in flight when the server's context ended: %v (want it answered during the drain)", err)
	}
	if res[0].Status != PublishStored {
		t.Fatalf("status %v", res[0].Status)
	}
	select {
	case <-s.doneCh:
	case <-time.After(5 * time.Second):
		t.Fatal("server not stopped 5 s after its context ended")
	}
}

// Shutdown's drain closes a connection a linger after its client has read
// the GoAway, but only once nothing is in flight on it: a request that
// reaches the server after Shutdown's first wait for idle connections (one
// the client sent before it read the GoAway, say) is answered before the
// close. Here the client reads the GoAway, its SendEvent arrives and is
// stored slowly (600 ms, a slow disk), and only then does the client answer
// the drain's Ping; closing at Pong + linger would cut the answer off.
func TestDrainWaitsForRequestArrivedAfterGoAway(t *testing.T) {
	q := &hookQueue{Queue: NewMemoryQueue(QueueOptions{}), delay: 600 * time.Millisecond}
	s := testServerWith(t, "alice:orders=alice-token", WithQueue(q))
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	st, err := rc.qc.OpenStreamSync(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done <- s.Shutdown(ctx)
	}()
	defer func() {
		if err := <-done; err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	}()
	ctrl := newFrameReader(rc.ctrl, DefaultMaxFrameSize)
	rc.ctrl.SetReadDeadline(time.Now().Add(5 * time.Second))
	var ga h3xpb.GoAway
	if err := ctrl.readMessage(FrameGoAway, &ga); err != nil {
		t.Fatalf("GoAway not received: %v", err)
	}
	if _, err := st.Write(frameBytes(t, FrameSendEvent, &h3xpb.SendEvent{RequestId: 1, Events: []*h3xpb.EventPayload{{Id: "late", Namespace: "orders"}}})); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // the SendEvent is being stored
	var ping h3xpb.Ping
	if err := ctrl.readMessage(FramePing, &ping); err != nil {
		t.Fatalf("the drain's Ping not received: %v", err)
	}
	rc.ctrl.Write(frameBytes(t, FramePong, &h3xpb.Pong{Sequence: ping.GetSequence(), PingSentUnixNano: ping.GetSentUnixNano(), SentUnixNano: time.Now().UnixNano()}))
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	var res h3xpb.SendResult
	if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameSendResult, &res); err != nil {
		t.Fatalf("SendEvent that arrived after the GoAway not answered before the close: %v", err)
	}
	if o := res.GetOutcomes(); len(o) != 1 || o[0].GetStatus() != h3xpb.PublishStatus_PUBLISH_STATUS_STORED {
		t.Fatalf("outcomes %v, want the event stored", o)
	}
}

// §5.1: after GoAway "the server keeps answering requests already sent,
// and answers pending FetchEvents promptly". A fetch lingering for a fuller
// batch (WithFetchLinger) is a pending fetch: Shutdown should end the
// linger like it ends a long poll, not hold the answer (and itself) until
// the linger runs out (RELIABILITY.md finding 104).
func TestShutdownEndsFetchLinger(t *testing.T) {
	const linger = 4 * time.Second
	s := testServer(t, WithFetchLinger(linger))
	pub := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := pub.Publish(ctx, Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	pub.Close()
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	st := rc.stream(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 1, Namespaces: []string{"orders"}, Limit: 10, MaxWaitMs: 10000}), false)
	st.SetReadDeadline(time.Now().Add(15 * time.Second))
	time.Sleep(200 * time.Millisecond) // leased one event, lingering for more
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- s.Shutdown(ctx) }()
	var b h3xpb.EventsBatch
	if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameEventsBatch, &b); err != nil {
		t.Fatal(err)
	}
	answered := time.Since(start)
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	shut := time.Since(start)
	if answered > time.Second {
		t.Fatalf("the lingering fetch was answered %v after Shutdown began (linger %v); Shutdown took %v", answered.Round(time.Millisecond), linger, shut.Round(time.Millisecond))
	}
}
