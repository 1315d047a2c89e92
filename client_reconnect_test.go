package h3x

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// A publish in flight across a graceful restart onto a server with a lower
// max_events_per_send: the chunks still to send are cut by the new limits,
// and a chunk resent to the new server is cut again (RELIABILITY.md,
// finding 57).
func TestPublishAcrossShutdownUsesNewServerLimits(t *testing.T) {
	publishAcrossRestart(t, false, 0, func(perSend int) []ServerOption { return []ServerOption{WithMaxEventsPerSend(perSend / 4)} })
}

// The same when the first server is closed (not gracefully) while a chunk
// is in flight: the chunk is resent, by Client.call, to the new server.
func TestPublishAcrossCloseUsesNewServerLimits(t *testing.T) {
	publishAcrossRestart(t, true, 0, func(perSend int) []ServerOption { return []ServerOption{WithMaxEventsPerSend(perSend / 4)} })
}

// The same with the replacement announcing a smaller max_frame_size: a
// 2.4 MB publish (three chunks of 1 MiB frames) is cut again.
func TestPublishAcrossShutdownUsesNewServerFrameSize(t *testing.T) {
	publishAcrossRestart(t, false, 16<<10, func(int) []ServerOption { return []ServerOption{WithMaxFrameSize(128 << 10)} })
}

// publishAcrossRestart publishes more events than fit one SendEvent (of
// body bytes each) while the server is stopped (closed if hard) and another
// takes its address with the options replacement returns (given the first
// server's max_events_per_send); every event must be stored.
func publishAcrossRestart(t *testing.T, hard bool, body int, replacement func(perSend int) []ServerOption) {
	cert, err := selfSignedCert()
	if err != nil {
		t.Fatal(err)
	}
	tlsConf := &tls.Config{Certificates: []tls.Certificate{cert}}
	start := func(addr string, opts ...ServerOption) *Server {
		return testServer(t, append([]ServerOption{WithAddr(addr), WithTLSConfig(tlsConf)}, opts...)...)
	}
	slow := &hookQueue{Queue: NewMemoryQueue(QueueOptions{}), delay: 300 * time.Millisecond}
	a := start("127.0.0.1:0", WithQueue(slow))
	addr := a.Addr().String()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, WithCredentials("alice", "alice-token"), WithTrustedFingerprint(Fingerprint(cert.Certificate[0])), WithBackoff(fastBackoff))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	perSend := int(c.cc.auth.GetLimits().GetMaxEventsPerSend())
	n := 2*perSend + 10
	if body > 0 {
		n = 150
	}
	data := []byte(strings.Repeat("x", body))
	events := make([]Event, n)
	for i := range events {
		events[i] = Event{ID: fmt.Sprintf("ev-%d", i), Namespace: "orders", Data: data}
	}
	call := c.PublishAsync(ctx, events...)
	time.Sleep(100 * time.Millisecond) // the first SendEvent is being stored
	sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
	if hard {
		a.Close()
	} else if err := a.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	scancel()
	start(addr, append([]ServerOption{WithQueue(NewMemoryQueue(QueueOptions{}))}, replacement(perSend)...)...)
	res, err := call.Result()
	if err != nil {
		t.Fatalf("Publish of %d events across a restart onto a server with other limits: %v", len(events), err)
	}
	for i, r := range res {
		if r.Status != PublishStored && r.Status != PublishDuplicate {
			t.Fatalf("event %d: %v %v", i, r.Status, r.Err)
		}
	}
}

// failFirstLease fails the first Lease call (a storage failure).
type failFirstLease struct {
	Queue
	calls atomic.Int32
}

func (q *failFirstLease) Lease(ctx context.Context, req LeaseRequest) ([]Lease, error) {
	if q.calls.Add(1) == 1 {
		return nil, errors.New("injected lease failure")
	}
	return q.Queue.Lease(ctx, req)
}

// A subscription never has more than MaxUnacked deliveries handed out and
// not settled. When one of its pipelined polls is answered with an Error
// while the next poll's batch is still being handed out (the application
// is slow to read), the subscription used to give back the credits of that
// batch too, so it fetched MaxUnacked more on top of it.
func TestSubscriptionPollErrorKeepsMaxUnacked(t *testing.T) {
	q := &failFirstLease{Queue: NewMemoryQueue(QueueOptions{})}
	s := testServer(t, WithQueue(q))
	c := mustDial(t, s, "alice", "alice-token", WithBackoff(fastBackoff))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	evs := make([]Event, 40)
	for i := range evs {
		evs[i] = Event{Namespace: "orders"}
	}
	if _, err := c.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
	const maxUnacked = 8
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: maxUnacked, BatchSize: maxUnacked / 2})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	time.Sleep(300 * time.Millisecond) // the application is slow to start reading
	got := 0
	for {
		select {
		case <-sub.Events():
			got++ // never settled
			continue
		case <-time.After(500 * time.Millisecond):
		}
		break
	}
	if got > maxUnacked {
		t.Fatalf("%d deliveries handed out and not settled, MaxUnacked %d", got, maxUnacked)
	}
	if got == 0 {
		t.Fatal("nothing delivered")
	}
}

// Client.Close while the client is waiting to reconnect (the server is
// gone) is bounded: its doc promises that flushing takes "up to 5 s in
// all". Each subscription holding prefetched deliveries it never handed
// out used to spend up to a second trying to give them back (a nack that
// waits for a connection), one subscription after another, on top of the
// flush's 5 s.
func TestCloseWhileReconnectingIsBounded(t *testing.T) {
	s := testServer(t)
	slow := &ExponentialBackoff{Initial: 30 * time.Second, Max: 30 * time.Second, Multiplier: 1, NoJitter: true}
	c := mustDial(t, s, "alice", "alice-token", WithBackoff(slow))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	evs := make([]Event, 64)
	for i := range evs {
		evs[i] = Event{ID: fmt.Sprintf("e%d", i), Namespace: "orders"}
	}
	if _, err := c.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
	const subs = 6
	for range subs {
		// Each subscription prefetches a batch; the application reads none.
		if _, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 8}); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(300 * time.Millisecond)
	s.Close()                          // the server is gone
	time.Sleep(200 * time.Millisecond) // the client waits to reconnect
	t0 := time.Now()
	c.Close()
	if el := time.Since(t0); el > 5500*time.Millisecond {
		t.Fatalf("Close took %v with %d subscriptions while disconnected (bound: 5 s in all)", el, subs)
	}
}

// heartbeatClient dials addr (a proxy in front of s) with idle timeout idle
// and onDisconnect as its state handler's reaction to StateDisconnected,
// and subscribes to "orders" so that calls wait on the connection.
func heartbeatClient(ctx context.Context, t *testing.T, s *Server, addr string, idle time.Duration, onDisconnect func()) (*Client, *Subscription) {
	t.Helper()
	c, err := Dial(ctx, addr, WithCredentials("alice", "alice-token"), WithTrustedFingerprint(s.Fingerprint()),
		WithIdleTimeout(idle), WithBackoff(fastBackoff),
		WithStateHandler(func(sc StateChange) {
			if sc.State == StateDisconnected {
				onDisconnect()
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sub.Close() })
	return c, sub
}

// A server that stops answering (killed, or cut off) while a subscription
// waits on it is noticed by the client's heartbeat within about a third of
// the idle timeout, not at the idle timeout: QUIC itself gets no signal,
// and its retransmissions back off (RELIABILITY.md, finding 5).
func TestHeartbeatNoticesASilentServer(t *testing.T) {
	s := testServer(t)
	proxy := newUDPProxy(t, s.Addr().(*net.UDPAddr))
	const idle = 6 * time.Second // heartbeat: a ping every 1 s, 1 s to answer
	lost := make(chan time.Time, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, sub := heartbeatClient(ctx, t, s, proxy.Addr(), idle, func() {
		select {
		case lost <- time.Now():
		default:
		}
	})
	time.Sleep(300 * time.Millisecond) // the subscription's polls wait on the server
	silent := time.Now()
	proxy.SetBlackhole(true)
	select {
	case at := <-lost:
		if d := at.Sub(silent); d > idle*2/3 {
			t.Fatalf("the client noticed the silent server after %v; the heartbeat should within about %v", d, idle/3)
		} else {
			t.Logf("noticed after %v (idle timeout %v)", d.Round(time.Millisecond), idle)
		}
	case <-ctx.Done():
		t.Fatal("the client never noticed the silent server")
	}
	proxy.SetBlackhole(false)
	if _, err := c.Publish(ctx, Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	select {
	case d := <-sub.Events():
		d.Ack()
	case <-ctx.Done():
		t.Fatal("the subscription did not resume after the reconnect")
	}
}

// A healthy connection over a slow path (a round trip of about 1.2 s,
// far inside the 6 s idle timeout that QUIC itself enforces) must not be
// torn down by the heartbeat while a subscription waits.
func TestHeartbeatNoFalseReconnectOnSlowPath(t *testing.T) {
	s := testServer(t)
	proxy := newUDPProxy(t, s.Addr().(*net.UDPAddr))
	proxy.SetDelay(550 * time.Millisecond) // each way, plus up to a quarter of jitter
	const idle = 6 * time.Second           // heartbeat: a ping every 1 s, 1 s to answer
	var lost atomic.Int32
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	heartbeatClient(ctx, t, s, proxy.Addr(), idle, func() { lost.Add(1) })
	time.Sleep(8 * time.Second) // the subscription's polls wait on the server
	if n := lost.Load(); n > 0 {
		t.Fatalf("a healthy connection with a 1.2 s round trip was dropped %d times in 8 s (idle timeout %v)", n, idle)
	}
}

// keepOpenQueue is a queue two servers share in turn (a rolling restart):
// a server's Close does not close it.
type keepOpenQueue struct{ Queue }

func (keepOpenQueue) Close() error { return nil }

// Deliveries a subscription prefetched but never handed out, given back
// around a graceful restart (GoAway, drain, a new server on the address,
// one queue), come back as the same attempt: the server released them
// with the old connection, and the client's unseen nack undoes that count.
func TestGiveBackAfterGoAwayIsUnseen(t *testing.T) {
	cert, err := selfSignedCert()
	if err != nil {
		t.Fatal(err)
	}
	tlsConf := &tls.Config{Certificates: []tls.Certificate{cert}}
	q := keepOpenQueue{NewMemoryQueue(QueueOptions{})}
	t.Cleanup(func() { q.Queue.Close() })
	a := testServer(t, WithTLSConfig(tlsConf), WithQueue(q))
	addr := a.Addr().String()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, WithCredentials("alice", "alice-token"), WithTrustedFingerprint(Fingerprint(cert.Certificate[0])),
		WithBackoff(fastBackoff))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const n = 10
	for range n {
		if _, err := c.Publish(ctx, Event{Namespace: "orders"}); err != nil {
			t.Fatal(err)
		}
	}
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: n, BatchSize: n})
	if err != nil {
		t.Fatal(err)
	}
	// All n are leased to the subscription; the application takes none.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		st, err := q.Stats(ctx, "orders")
		if err != nil {
			t.Fatal(err)
		}
		if st[0].Leased == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v, want %d leased", st[0], n)
		}
	}
	// A graceful restart: GoAway, drain, and a new server on the address.
	shut := make(chan error, 1)
	go func() {
		sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
		defer scancel()
		shut <- a.Shutdown(sctx)
	}()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		c.mu.Lock()
		gone := c.cc == nil
		c.mu.Unlock()
		if gone {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the client did not act on the GoAway")
		}
	}
	closed := make(chan struct{})
	go func() { sub.Close(); close(closed) }() // gives back what it never handed out
	if err := <-shut; err != nil {
		t.Fatal(err)
	}
	testServer(t, WithAddr(addr), WithTLSConfig(tlsConf), WithQueue(q))
	<-closed
	ds, err := c.Fetch(ctx, n, "orders")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range ds {
		if d.Attempt() != 1 {
			t.Errorf("event %s delivered again as attempt %d; it was never handed out, so want 1", d.Event.ID, d.Attempt())
		}
	}
	if len(ds) != n {
		t.Errorf("fetched %d events again, want %d", len(ds), n)
	}
}
