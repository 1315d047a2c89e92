package h3x

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fastBackoff keeps reconnect tests quick.
var fastBackoff = &ExponentialBackoff{Initial: 20 * time.Millisecond, Max: 200 * time.Millisecond, Multiplier: 2}

// traffic runs publishers and a subscriber on one client and records what
// was published successfully and what was consumed.
type traffic struct {
	mu        sync.Mutex
	published map[string]bool
	consumed  map[string]int
	lastSeen  time.Time
	stop      atomic.Bool
	wg        sync.WaitGroup
}

func startTraffic(t *testing.T, c *Client, publishers int) *traffic {
	tr := &traffic{published: map[string]bool{}, consumed: map[string]int{}}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	for p := range publishers {
		tr.wg.Add(1)
		go func() {
			defer tr.wg.Done()
			for i := 0; i < 100000 && !tr.stop.Load(); i++ {
				pctx, pcancel := context.WithTimeout(ctx, 20*time.Second)
				res, err := c.Publish(pctx, Event{Namespace: "orders", Message: fmt.Sprintf("p%d-%d", p, i)})
				pcancel()
				if err != nil {
					if ctx.Err() == nil && !errors.Is(err, ErrClosed) {
						t.Errorf("publish: %v", err)
					}
					return
				}
				if res[0].Status == PublishStored || res[0].Status == PublishDuplicate {
					tr.mu.Lock()
					tr.published[res[0].ID] = true
					tr.mu.Unlock()
				}
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 64})
	if err != nil {
		t.Fatal(err)
	}
	tr.wg.Add(1)
	go func() {
		defer tr.wg.Done()
		for d := range sub.Events() {
			tr.mu.Lock()
			tr.consumed[d.Event.ID]++
			tr.lastSeen = time.Now()
			tr.mu.Unlock()
			d.Ack()
		}
	}()
	t.Cleanup(func() { sub.Close(); tr.wg.Wait() })
	return tr
}

func (tr *traffic) seenSince(t0 time.Time) bool {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.lastSeen.After(t0)
}

// finish stops the publishers and waits until every published event was
// consumed.
func (tr *traffic) finish(t *testing.T) {
	t.Helper()
	tr.stop.Store(true)
	deadline := time.Now().Add(30 * time.Second)
	for {
		tr.mu.Lock()
		missing := 0
		for id := range tr.published {
			if tr.consumed[id] == 0 {
				missing++
			}
		}
		n, dups := len(tr.published), 0
		for _, k := range tr.consumed {
			if k > 1 {
				dups++
			}
		}
		tr.mu.Unlock()
		if missing == 0 {
			t.Logf("%d events published and consumed, %d delivered more than once", n, dups)
			if n == 0 {
				t.Fatal("nothing was published")
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d published events never consumed", missing, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func testRegistry(t testing.TB) Registry {
	reg, err := ParseRegistry("alice:orders=alice-token,alice:orders.dlq=alice-token")
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

func TestClientSurvivesServerRestart(t *testing.T) {
	dir := t.TempDir()
	cert, err := selfSignedCert()
	if err != nil {
		t.Fatal(err)
	}
	tlsConf := &tls.Config{Certificates: []tls.Certificate{cert}}
	start := func(addr string) *Server {
		s, err := NewServer(WithAddr(addr), WithDataDir(dir), WithTLSConfig(tlsConf), WithRegistry(testRegistry(t)))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	srv := start("127.0.0.1:0")
	addr := srv.Addr().String()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, WithCredentials("alice", "alice-token"), WithTrustedFingerprint(Fingerprint(cert.Certificate[0])), WithBackoff(fastBackoff))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tr := startTraffic(t, c, 2)
	time.Sleep(300 * time.Millisecond)
	for round := range 2 {
		if err := srv.Close(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
		srv = start(addr)
		restarted := time.Now()
		// Consumption resumes within the backoff bound (plus slack for the
		// handshake and a long poll).
		bound := fastBackoff.Max + 2*time.Second
		for !tr.seenSince(restarted) {
			if time.Since(restarted) > bound {
				t.Fatalf("round %d: no delivery within %v of the restart", round, bound)
			}
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(200 * time.Millisecond)
	}
	tr.finish(t)
}

func TestClientSurvivesNetworkCut(t *testing.T) {
	srv := testServer(t)
	proxy := newUDPProxy(t, srv.Addr().(*net.UDPAddr))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, proxy.Addr(), WithCredentials("alice", "alice-token"), WithTrustedFingerprint(srv.Fingerprint()),
		WithBackoff(fastBackoff), WithIdleTimeout(time.Second), WithDialTimeout(500*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tr := startTraffic(t, c, 2)
	time.Sleep(300 * time.Millisecond)
	proxy.SetBlackhole(true)
	time.Sleep(2 * time.Second)
	proxy.SetBlackhole(false)
	restored := time.Now()
	for !tr.seenSince(restored) {
		if time.Since(restored) > 5*time.Second {
			t.Fatal("no delivery within 5s of the network coming back")
		}
		time.Sleep(5 * time.Millisecond)
	}
	tr.finish(t)
}

func TestBackoffDistribution(t *testing.T) {
	b := &ExponentialBackoff{Initial: 100 * time.Millisecond, Max: 3 * time.Second, Multiplier: 2}
	rng := rand.New(rand.NewPCG(1, 2))
	b.rand = rng.Float64
	bounds := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, 1600 * time.Millisecond, 3 * time.Second, 3 * time.Second}
	const samples = 20000
	for i, bound := range bounds {
		attempt := i + 1
		if got := b.Bound(attempt); got != bound {
			t.Fatalf("Bound(%d) = %v, want %v", attempt, got, bound)
		}
		var sum, sumSq float64
		for range samples {
			d := b.Delay(attempt)
			if d < 0 || d >= bound {
				t.Fatalf("Delay(%d) = %v outside [0, %v)", attempt, d, bound)
			}
			x := float64(d) / float64(bound)
			sum += x
			sumSq += x * x
		}
		// Full jitter is uniform on [0, bound): mean 1/2, variance 1/12.
		mean := sum / samples
		variance := sumSq/samples - mean*mean
		if math.Abs(mean-0.5) > 0.01 || math.Abs(variance-1.0/12) > 0.005 {
			t.Fatalf("attempt %d: mean %.4f variance %.4f, want uniform", attempt, mean, variance)
		}
	}
	noJitter := &ExponentialBackoff{Initial: time.Second, Max: time.Minute, Multiplier: 3, NoJitter: true}
	if got := noJitter.Delay(3); got != 9*time.Second {
		t.Fatalf("no jitter: %v", got)
	}
}

func TestClientReconnectUsesPolicy(t *testing.T) {
	srv := testServer(t)
	var mu sync.Mutex
	var attempts []int
	var states []StateChange
	policy := BackoffFunc(func(n int) time.Duration {
		mu.Lock()
		attempts = append(attempts, n)
		mu.Unlock()
		return time.Millisecond
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, srv.Addr().String(), WithCredentials("alice", "alice-token"), WithTrustedFingerprint(srv.Fingerprint()),
		WithBackoff(policy), WithMaxReconnects(3), WithDialTimeout(200*time.Millisecond),
		WithStateHandler(func(sc StateChange) { mu.Lock(); states = append(states, sc); mu.Unlock() }))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	srv.Close()
	_, err = c.Fetch(ctx, 1, "orders")
	if !errors.Is(err, ErrReconnectFailed) {
		t.Fatalf("after the server went away for good: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	// Close sends GoAway... no: Close closes at once, so attempt 1 waits too.
	if fmt.Sprint(attempts) != "[1 2 3]" {
		t.Fatalf("policy called for attempts %v", attempts)
	}
	var seen []ConnState
	for _, sc := range states {
		seen = append(seen, sc.State)
	}
	want := []ConnState{StateConnected, StateDisconnected, StateReconnecting, StateReconnecting, StateReconnecting, StateClosed}
	if fmt.Sprint(seen) != fmt.Sprint(want) {
		t.Fatalf("states %v, want %v", seen, want)
	}
}

func TestClientAuthFailureIsTerminalOnReconnect(t *testing.T) {
	reg := &switchRegistry{ok: testRegistry(t)}
	srv := testServer(t, WithRegistry(reg))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var dials atomic.Int32
	c, err := Dial(ctx, srv.Addr().String(), WithCredentials("alice", "alice-token"), WithTrustedFingerprint(srv.Fingerprint()),
		WithBackoff(BackoffFunc(func(int) time.Duration { dials.Add(1); return time.Millisecond })))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	reg.deny.Store(true)
	srv.Shutdown(ctx) // GoAway: the client reconnects at once ...
	srv2 := testServer(t, WithRegistry(reg), WithAddr(srv.Addr().String()), WithTLSConfig(srv.tlsConf))
	_ = srv2
	// ... and its refused authentication ends the client instead of a retry storm.
	_, err = c.Fetch(ctx, 1, "orders")
	if !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("fetch after auth refusal: %v", err)
	}
	if n := dials.Load(); n > 20 {
		t.Fatalf("%d reconnect attempts after a terminal refusal", n)
	}
}

type switchRegistry struct {
	ok   Registry
	deny atomic.Bool
}

func (r *switchRegistry) Authenticate(ctx context.Context, id, token string) (Grants, error) {
	if r.deny.Load() {
		return nil, &Error{Code: CodeUnauthenticated, Message: "revoked"}
	}
	return r.ok.Authenticate(ctx, id, token)
}

func TestCloseFlushesAcks(t *testing.T) {
	srv := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pub := mustDial(t, srv, "alice", "alice-token")
	if _, err := pub.Publish(ctx, Event{Namespace: "orders"}, Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	c, err := testDial(t, srv, "alice", "alice-token", WithAckFlush(100, time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		d := <-sub.Events()
		if err := d.Ack(); err != nil {
			t.Fatal(err)
		}
		if err := d.Ack(); err == nil {
			t.Fatal("second Ack accepted")
		}
	}
	c.Close()
	if _, ok := <-sub.Events(); ok {
		t.Fatal("channel open after Close")
	}
	if !errors.Is(sub.Err(), ErrClosed) {
		t.Fatalf("Err after client Close: %v", sub.Err())
	}
	short, scancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer scancel()
	if ds, err := pub.Fetch(short, 10, "orders"); err == nil {
		t.Fatalf("acked events delivered again: %d", len(ds))
	}
	if _, err := c.Publish(ctx, Event{Namespace: "orders"}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Publish after Close: %v", err)
	}
}

func TestSubscriptionFlowControl(t *testing.T) {
	srv := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := mustDial(t, srv, "alice", "alice-token")
	publishOrders(ctx, t, c, 10)
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 3})
	if err != nil {
		t.Fatal(err)
	}
	var held []*Delivery
	for range 3 {
		held = append(held, <-sub.Events())
	}
	select {
	case d := <-sub.Events():
		t.Fatalf("a 4th delivery (%s) with MaxUnacked 3", d.Event.ID)
	case <-time.After(200 * time.Millisecond):
	}
	held[0].Nack(0)
	got := 0
	for d := range sub.Events() {
		got++
		d.Ack()
		if got == 8 {
			break
		}
	}
	held[1].Ack()
	held[2].Ack()
	sub.Close()
	if sub.Err() != nil {
		t.Fatalf("Err after Close: %v", sub.Err())
	}
}

func TestPublishAsync(t *testing.T) {
	srv := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := mustDial(t, srv, "alice", "alice-token")
	var calls []*PublishCall
	for i := range 50 {
		calls = append(calls, c.PublishAsync(ctx, Event{Namespace: "orders", Message: fmt.Sprint(i)}))
	}
	for _, p := range calls {
		res, err := p.Result()
		if err != nil || res[0].Status != PublishStored {
			t.Fatalf("async publish: %v %+v", err, res)
		}
	}
	ds, err := c.Fetch(ctx, 100, "orders")
	if err != nil || len(ds) != 50 {
		t.Fatalf("fetched %d, %v", len(ds), err)
	}
}

func TestFlushWaitsForAcks(t *testing.T) {
	srv := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := testDial(t, srv, "alice", "alice-token", WithAckFlush(100, time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	c.Publish(ctx, Event{Namespace: "orders"})
	ds, err := c.Fetch(ctx, 1, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if err := ds[0].Ack(); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	other := mustDial(t, srv, "alice", "alice-token")
	short, scancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer scancel()
	if _, err := other.Fetch(short, 1, "orders"); err == nil {
		t.Fatal("the acked event came back after Flush")
	}
}

// TestSubscriptionCloseGivesBackUnseen: deliveries prefetched but never
// handed to the application do not count as attempts.
func TestSubscriptionCloseGivesBackUnseen(t *testing.T) {
	srv := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := mustDial(t, srv, "alice", "alice-token")
	publishOrders(ctx, t, c, 5)
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	first := <-sub.Events()
	first.Ack()
	sub.Close()
	c.Flush(ctx)
	ds, err := c.Fetch(ctx, 10, "orders")
	if err != nil || len(ds) != 4 {
		t.Fatalf("fetch: %v, %d deliveries", err, len(ds))
	}
	for _, d := range ds {
		if d.Attempt() != 1 {
			t.Fatalf("a prefetched, never seen delivery came back with attempt %d", d.Attempt())
		}
	}
}

// TestAbandonedLongPollDoesNotBlock: a long poll whose caller gave up must
// not hold up the fetches after it, nor keep events leased.
func TestAbandonedLongPollDoesNotBlock(t *testing.T) {
	srv := testServer(t)
	c := mustDial(t, srv, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for range 3 {
		abandoned, stop := context.WithCancel(ctx) // no deadline: a 30 s long poll
		go c.Fetch(abandoned, 10, "orders")
		time.Sleep(50 * time.Millisecond)
		stop()
	}
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	if _, err := c.Publish(ctx, Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	select {
	case d := <-sub.Events():
		if d.Attempt() != 1 {
			t.Fatalf("attempt %d: an abandoned poll took the event first", d.Attempt())
		}
		if took := time.Since(start); took > 2*time.Second {
			t.Fatalf("delivered after %v", took)
		}
		d.Ack()
	case <-time.After(5 * time.Second):
		t.Fatal("no delivery: the abandoned long polls block the subscription")
	}
}

// A subscription keeps two polls in flight on its stream; deliveries still
// come in publish order, with none lost or repeated, while events arrive
// during and between polls.
func TestSubscriptionPipelinedPollsKeepOrder(t *testing.T) {
	srv := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pub := mustDial(t, srv, "alice", "alice-token")
	c := mustDial(t, srv, "alice", "alice-token")
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 16, BatchSize: 4})
	if err != nil {
		t.Fatal(err)
	}
	const n = 400
	published := make(chan error, 1)
	go func() {
		for i := 0; i < n; {
			burst := make([]Event, 1+i%7)
			for j := range burst {
				if i < n {
					burst[j] = Event{Namespace: "orders", Message: strconv.Itoa(i)}
					i++
				} else {
					burst = burst[:j]
					break
				}
			}
			if _, err := pub.Publish(ctx, burst...); err != nil {
				published <- err
				return
			}
		}
		published <- nil
	}()
	for want := range n {
		select {
		case d, ok := <-sub.Events():
			if !ok {
				t.Fatalf("channel closed after %d deliveries: %v", want, sub.Err())
			}
			if d.Event.Message != strconv.Itoa(want) || d.Attempt() != 1 {
				t.Fatalf("delivery %d: event %q attempt %d", want, d.Event.Message, d.Attempt())
			}
			d.Ack()
		case <-ctx.Done():
			t.Fatalf("%d of %d delivered", want, n)
		}
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	sub.Close()
}

// PublishAsync reuses idle workers: sequential calls all complete, at most
// maxIdleAsyncWorkers stay idle, and Close ends them (TestMain checks for
// leaked goroutines).
func TestPublishAsyncWorkers(t *testing.T) {
	srv := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := mustDial(t, srv, "alice", "alice-token")
	for round := range 3 {
		var calls []*PublishCall
		for i := range 20 {
			calls = append(calls, c.PublishAsync(ctx, Event{Namespace: "orders", Message: fmt.Sprint(round, i)}))
		}
		for _, p := range calls {
			if res, err := p.Result(); err != nil || res[0].Status != PublishStored {
				t.Fatalf("async publish: %v %+v", err, res)
			}
		}
		if n := c.idle.Load(); n > maxIdleAsyncWorkers {
			t.Fatalf("%d idle workers, want at most %d", n, maxIdleAsyncWorkers)
		}
	}
	for i := range 10 {
		if res, err := c.PublishAsync(ctx, Event{Namespace: "orders", Message: fmt.Sprint("seq", i)}).Result(); err != nil || res[0].Status != PublishStored {
			t.Fatalf("sequential async publish: %v %+v", err, res)
		}
	}
	c.Close()
	if _, err := c.PublishAsync(ctx, Event{Namespace: "orders"}).Result(); !errors.Is(err, ErrClosed) {
		t.Fatalf("PublishAsync after Close: %v", err)
	}
	if n := c.idle.Load(); n != 0 {
		t.Fatalf("%d idle workers after Close", n)
	}
}

// Closing a subscription whose batches do not fit its channel gives back
// everything the application did not take, including a batch the pipelined
// second poll received meanwhile, without counting attempts.
func TestSubscriptionCloseGivesBackPipelinedBatch(t *testing.T) {
	srv := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := mustDial(t, srv, "alice", "alice-token")
	publishOrders(ctx, t, c, 20)
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 8, BatchSize: 4})
	if err != nil {
		t.Fatal(err)
	}
	first := <-sub.Events()
	first.Ack()
	sub.Close()
	c.Flush(ctx)
	// A batch the closing subscription never read (its stream reset
	// before the server wrote it) is given back by the server, a moment
	// later: wait for the leases to end (under load, 2 of them were still
	// held when the Fetch came, in about 2% of runs).
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		st, err := srv.queue.Stats(ctx, "orders")
		if err != nil {
			t.Fatal(err)
		}
		if st[0].Leased == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("5 s after the subscription closed, %d deliveries are still leased", st[0].Leased)
		}
	}
	ds, err := c.Fetch(ctx, 100, "orders")
	if err != nil || len(ds) != 19 {
		t.Fatalf("fetch: %v, %d deliveries, want 19", err, len(ds))
	}
	for _, d := range ds {
		if d.Attempt() != 1 {
			t.Fatalf("a delivery never handed out came back with attempt %d", d.Attempt())
		}
	}
}

// publishOrders publishes n events to "orders", one call each.
func publishOrders(ctx context.Context, t *testing.T, c *Client, n int) {
	t.Helper()
	for range n {
		if _, err := c.Publish(ctx, Event{Namespace: "orders"}); err != nil {
			t.Fatal(err)
		}
	}
}

// Control frames are never delayed behind data. Subscriptions whose
// application does not take its deliveries leave their batches unread in
// the client's QUIC buffers; a Pong (as GoAway or a RateLimitNotice) must
// still get through on the control stream.
func TestControlFramesNotBehindUnreadBatches(t *testing.T) {
	s := testServer(t)
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	body := []byte(strings.Repeat("x", 8<<10))
	for range 8 {
		batch := make([]Event, 100)
		for i := range batch {
			batch[i] = Event{Namespace: "orders", Data: body}
		}
		if _, err := c.Publish(ctx, batch...); err != nil {
			t.Fatal(err)
		}
	}
	for range 4 { // nobody reads their Events
		sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 200, BatchSize: 100})
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Close()
	}
	time.Sleep(time.Second) // the batches arrive and stay unread
	pctx, pcancel := context.WithTimeout(ctx, 2*time.Second)
	defer pcancel()
	if rtt, err := c.Ping(pctx); err != nil {
		t.Fatalf("Ping with unread batches on other streams: %v (rtt %v)", err, rtt)
	}
}
