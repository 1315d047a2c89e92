// Package chaos kills a real H3X server with SIGKILL at random moments while
// publishers and consumers use it through the client SDK, and checks the
// delivery guarantees across the restarts.
//
//	go test -run TestChaos ./test/chaos/ -v                                  # 20 cycles (the default run)
//	H3X_CHAOS_CYCLES=1000 go test -run TestChaos -timeout 2h ./test/chaos/ -v
package chaos

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
)

// Chaos parameters.
const (
	publishers   = 3
	consumers    = 2
	publishBatch = 4 // events per Publish
	// asyncBurst: the async publisher's single-event PublishAsync calls at
	// each tick, most of them waiting in shared requests (all but the
	// client's first eight requests in flight).
	asyncBurst   = 32
	publishEvery = 20 * time.Millisecond // per publisher: 200 events/s each
	killMin      = 50 * time.Millisecond // a kill comes uniformly 50-400 ms after ready
	killMax      = 400 * time.Millisecond
	longEvery    = 10 // every 10th cycle the server stays up past the stuck bound
	stuckSlack   = 2 * time.Second
	// defaultIdle is the clients' idle timeout (H3X_CHAOS_IDLE overrides
	// it: "30s" runs with the SDK's default). A client that is only
	// waiting (a long poll, an answer) notices that the server died
	// through its heartbeat, which pings at a sixth of the idle timeout
	// and gives up after another sixth (at least 500 ms and 1 s): QUIC
	// gives no other signal of a killed peer until the client sends
	// again, and its retransmissions back off. See RELIABILITY.md,
	// finding 5.
	defaultIdle  = 3 * time.Second
	drainBound   = 10 * time.Minute // draining the backlog after the last cycle, at most
	drainStall   = 30 * time.Second // ... and without a new delivery, at most
	readyTimeout = 60 * time.Second
	callTimeout  = 30 * time.Second
)

// backoff is the clients' reconnect policy. The stuck bound is its maximum,
// plus how long a client that is only waiting may take to notice the server
// died (its heartbeat's interval and timeout), plus stuckSlack.
var backoff = &h3x.ExponentialBackoff{Initial: 50 * time.Millisecond, Max: time.Second, Multiplier: 2}

// idleTimeout is the clients' idle timeout: defaultIdle or H3X_CHAOS_IDLE.
var idleTimeout = func() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("H3X_CHAOS_IDLE")); err == nil && d >= time.Second {
		return d
	}
	return defaultIdle
}()

func stuckBound() time.Duration {
	notice := max(idleTimeout/6, 500*time.Millisecond) + max(idleTimeout/6, time.Second)
	return backoff.Max + min(notice, idleTimeout) + stuckSlack
}

func cyclesFromEnv(t *testing.T) int {
	n := 20
	if v := os.Getenv("H3X_CHAOS_CYCLES"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			t.Fatalf("H3X_CHAOS_CYCLES=%q: want a positive number", v)
		}
	}
	return n
}

// child is one run of the server child process.
type child struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stderr *tailBuffer
	exited chan struct{}
}

// tailBuffer keeps the last 64 KiB written to it.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if len(b.buf) > 64<<10 {
		b.buf = b.buf[len(b.buf)-64<<10:]
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}

// harness runs the server child on one directory and port, restarting it.
type harness struct {
	t                 *testing.T
	dir, addr         string
	certFile, keyFile string
	fingerprint       string
	cur               *child
	crashes           []string // stderr of children that exited on their own
}

func newHarness(t *testing.T) *harness {
	dir := t.TempDir()
	h := &harness{t: t, dir: filepath.Join(dir, "data"), certFile: filepath.Join(dir, "cert.pem"), keyFile: filepath.Join(dir, "key.pem")}
	h.fingerprint = writeCert(t, h.certFile, h.keyFile)
	// A fixed port for every restart: take a free one and release it.
	u, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	h.addr = u.LocalAddr().String()
	u.Close()
	return h
}

// start runs a new child and waits until it is listening.
func (h *harness) start() time.Time {
	h.t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=1", childDirEnv+"="+h.dir, childAddrEnv+"="+h.addr,
		childCertEnv+"="+h.certFile, childKeyEnv+"="+h.keyFile)
	c := &child{cmd: cmd, stderr: &tailBuffer{}, exited: make(chan struct{})}
	cmd.Stderr = c.stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		h.t.Fatal(err)
	}
	c.stdin = stdin
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		h.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		ok := false
		for sc.Scan() {
			if sc.Text() == "ready" && !ok {
				ok = true
				ready <- true
			}
		}
		if !ok {
			ready <- false
		}
		cmd.Wait()
		close(c.exited)
	}()
	h.cur = c
	select {
	case ok := <-ready:
		if !ok {
			<-c.exited
			h.t.Fatalf("the server child exited before it was ready (%v):\n%s", cmd.ProcessState, c.stderr)
		}
	case <-time.After(readyTimeout):
		h.kill()
		h.t.Fatalf("the server child was not ready within %v:\n%s", readyTimeout, c.stderr)
	}
	return time.Now()
}

// kill sends SIGKILL to the child and waits until it is gone.
func (h *harness) kill() {
	c := h.cur
	if c == nil {
		return
	}
	h.cur = nil
	select {
	case <-c.exited:
		h.crashes = append(h.crashes, fmt.Sprintf("%v: %s", c.cmd.ProcessState, c.stderr))
		return
	default:
	}
	c.cmd.Process.Signal(syscall.SIGKILL)
	<-c.exited
}

// stop ends the child gracefully (closing its stdin), or kills it after 10 s.
func (h *harness) stop() {
	c := h.cur
	if c == nil {
		return
	}
	c.stdin.Close()
	select {
	case <-c.exited:
		h.cur = nil
	case <-time.After(10 * time.Second):
		h.kill()
	}
}

// writeCert writes a self-signed ECDSA certificate for 127.0.0.1 and returns
// its fingerprint, which clients pin across restarts.
func writeCert(t *testing.T, certFile, keyFile string) string {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "h3x chaos"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return h3x.Fingerprint(der)
}

// delivery is one delivery seen by a consumer.
type delivery struct {
	at       time.Time // handed out by the subscription
	leased   time.Time // leased by the server: its lease deadline less the ack deadline
	consumer int
	attempt  int
}

// record holds everything the clients saw.
type record struct {
	mu           sync.Mutex
	published    map[string]time.Time // publish returned stored or duplicate
	pubFailed    int                  // events whose Publish call failed (outcome unknown)
	pubErrs      map[string]int       // why: the failed calls' errors (a few kinds)
	pubDups      int                  // outcomes reported as duplicate
	deliveries   map[string][]delivery
	ackConfirmed map[string]time.Time // the first time Client.Ack returned SettleOK
	ackOther     map[h3x.SettleStatus]int
	ackFailed    int
	consumerAt   [consumers][]time.Time // each consumer's delivery times
	pubOKAt      []time.Time            // successful Publish calls

	pubInflight, ackInflight atomic.Int64
}

func newRecord() *record {
	return &record{published: make(map[string]time.Time), deliveries: make(map[string][]delivery),
		ackConfirmed: make(map[string]time.Time), ackOther: make(map[h3x.SettleStatus]int)}
}

func dial(ctx context.Context, t *testing.T, h *harness, name string) *h3x.Client {
	opts := []h3x.ClientOption{h3x.WithCredentials(clientID, token), h3x.WithTrustedFingerprint(h.fingerprint),
		h3x.WithBackoff(backoff), h3x.WithDialTimeout(time.Second), h3x.WithIdleTimeout(idleTimeout)}
	if os.Getenv("H3X_CHAOS_DEBUG") != "" {
		start := time.Now()
		opts = append(opts, h3x.WithStateHandler(func(sc h3x.StateChange) {
			t.Logf("%v %s: %v attempt=%d delay=%v err=%v", time.Since(start).Round(time.Millisecond), name, sc.State, sc.Attempt, sc.Delay, sc.Err)
		}))
	}
	c, err := h3x.Dial(ctx, h.addr, opts...)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	return c
}

// everyPublish runs f every publishEvery until ctx ends.
func everyPublish(ctx context.Context, f func()) {
	tick := time.NewTicker(publishEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		f()
	}
}

func publisher(ctx context.Context, c *h3x.Client, p int, rec *record) {
	seq := 0
	everyPublish(ctx, func() {
		events := make([]h3x.Event, publishBatch)
		for i := range events {
			seq++
			events[i] = h3x.Event{ID: fmt.Sprintf("p%d-%d", p, seq), Namespace: namespace, Type: "chaos", Data: []byte("payload")}
		}
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		rec.pubInflight.Add(1)
		res, err := c.Publish(cctx, events...)
		rec.pubInflight.Add(-1)
		cancel()
		rec.publishCall(ctx, len(events), res, err)
	})
}

// publishCall records a Publish call of n events (or a PublishAsync call's
// result): its stored IDs, or its failure (its outcome unknown).
func (rec *record) publishCall(ctx context.Context, n int, res []h3x.PublishResult, err error) {
	now := time.Now()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if err != nil {
		rec.pubFailed += n
		if rec.pubErrs == nil {
			rec.pubErrs = make(map[string]int)
		}
		if ctx.Err() != nil {
			err = fmt.Errorf("the run ended: %w", err)
		}
		if len(rec.pubErrs) < 8 {
			rec.pubErrs[err.Error()]++
		}
		return
	}
	rec.pubOKAt = append(rec.pubOKAt, now)
	for _, r := range res {
		switch r.Status {
		case h3x.PublishStored, h3x.PublishDuplicate:
			rec.published[r.ID] = now
			if r.Status == h3x.PublishDuplicate {
				rec.pubDups++
			}
		default:
			rec.pubFailed++
		}
	}
}

// asyncPublisher starts asyncBurst single-event PublishAsync calls at each
// tick and waits for them: the calls beyond the client's eighth request in
// flight share requests and have no goroutine of their own, across the
// server's kills like every other call.
func asyncPublisher(ctx context.Context, c *h3x.Client, p int, rec *record) {
	seq := 0
	everyPublish(ctx, func() {
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		calls := make([]*h3x.PublishCall, asyncBurst)
		rec.pubInflight.Add(1)
		for i := range calls {
			seq++
			calls[i] = c.PublishAsync(cctx, h3x.Event{ID: fmt.Sprintf("a%d-%d", p, seq), Namespace: namespace, Type: "chaos", Data: []byte("payload")})
		}
		for _, call := range calls {
			res, err := call.Result()
			rec.publishCall(ctx, 1, res, err)
		}
		rec.pubInflight.Add(-1)
		cancel()
	})
}

// consumer subscribes and hands each delivery to four ackers, which ack
// what has accumulated with the synchronous Client.Ack (recording when each
// ack was confirmed), so acks are pipelined and the consumers keep up.
func consumer(ctx context.Context, c *h3x.Client, n int, rec *record) error {
	sub, err := c.Subscribe(ctx, []string{namespace}, h3x.SubscribeOptions{MaxUnacked: 64, BatchSize: 32})
	if err != nil {
		return err
	}
	defer sub.Close()
	ackCh := make(chan *h3x.Delivery, 64)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer close(ackCh)
	for range 4 {
		wg.Go(func() {
			for d := range ackCh {
				batch := []*h3x.Delivery{d}
			more:
				for len(batch) < 32 {
					select {
					case d2, ok := <-ackCh:
						if !ok {
							break more
						}
						batch = append(batch, d2)
					default:
						break more
					}
				}
				actx, cancel := context.WithTimeout(ctx, callTimeout)
				rec.ackInflight.Add(1)
				res, err := c.Ack(actx, batch...)
				rec.ackInflight.Add(-1)
				cancel()
				done := time.Now()
				rec.mu.Lock()
				if err != nil {
					rec.ackFailed++
				}
				for _, r := range res {
					if r.Status == h3x.SettleOK {
						// The first confirmed ack is the one that counts: a
						// later ack of a redelivery must not move it forward,
						// or the redelivery it follows is never checked.
						if _, ok := rec.ackConfirmed[r.ID]; !ok {
							rec.ackConfirmed[r.ID] = done
						}
					} else {
						rec.ackOther[r.Status]++
					}
				}
				rec.mu.Unlock()
			}
		})
	}
	for d := range sub.Events() {
		now := time.Now()
		rec.mu.Lock()
		rec.deliveries[d.Event.ID] = append(rec.deliveries[d.Event.ID], delivery{at: now, leased: d.Deadline().Add(-h3x.DefaultAckDeadline), consumer: n, attempt: d.Attempt()})
		rec.consumerAt[n] = append(rec.consumerAt[n], now)
		rec.mu.Unlock()
		ackCh <- d
	}
	return sub.Err()
}

// window is one period the server was up.
type window struct {
	ready, end time.Time
	long       bool
}

func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos: skipped in -short mode")
	}
	cycles := cyclesFromEnv(t)
	h := newHarness(t)
	defer h.stop()
	ready := h.start()

	rec := newRecord()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pubCtx, stopPublishing := context.WithCancel(ctx)
	defer stopPublishing()
	var wg sync.WaitGroup
	var clients []*h3x.Client
	defer func() {
		cancel()
		wg.Wait()
		for _, c := range clients {
			c.Close()
		}
	}()
	for p := range publishers {
		c := dial(ctx, t, h, fmt.Sprint("publisher ", p))
		clients = append(clients, c)
		wg.Go(func() { publisher(pubCtx, c, p, rec) })
	}
	{
		c := dial(ctx, t, h, "async publisher")
		clients = append(clients, c)
		wg.Go(func() { asyncPublisher(pubCtx, c, 0, rec) })
	}
	consumerErr := make(chan error, consumers)
	for n := range consumers {
		c := dial(ctx, t, h, fmt.Sprint("consumer ", n))
		clients = append(clients, c)
		wg.Go(func() {
			if err := consumer(ctx, c, n, rec); err != nil {
				consumerErr <- fmt.Errorf("consumer %d: %w", n, err)
			}
		})
	}

	// The kill cycles.
	var windows []window
	var killsPub, killsAck int
	began := time.Now()
	for cycle := 1; cycle <= cycles; cycle++ {
		w := window{ready: ready, long: cycle%longEvery == 0}
		up := killMin + time.Duration(mrand.Int64N(int64(killMax-killMin)))
		if w.long {
			up = stuckBound() + time.Second
		}
		select {
		case err := <-consumerErr:
			t.Fatal(err)
		case <-time.After(up):
		}
		if rec.pubInflight.Load() > 0 {
			killsPub++
		}
		if rec.ackInflight.Load() > 0 {
			killsAck++
		}
		h.kill()
		w.end = time.Now()
		if os.Getenv("H3X_CHAOS_DEBUG") != "" {
			t.Logf("cycle %d: killed after %v", cycle, w.end.Sub(w.ready).Round(time.Millisecond))
		}
		windows = append(windows, w)
		if cycles >= 100 && cycle%100 == 0 {
			t.Logf("cycle %d of %d (%v)", cycle, cycles, time.Since(began).Round(time.Second))
		}
		ready = h.start()
	}
	killing := time.Since(began)

	// Let it run undisturbed, then stop publishing and drain.
	time.Sleep(stuckBound())
	stopPublishing()
	pubStopped := time.Now()
	final := window{ready: ready, long: true}
	drainStart := time.Now()
	var missing []string
	rescued := 0
	lastProgress, lastCount := time.Now(), -1
	for {
		rec.mu.Lock()
		missing = missing[:0]
		for id := range rec.published {
			if len(rec.deliveries[id]) == 0 {
				missing = append(missing, id)
			}
		}
		rec.mu.Unlock()
		if len(missing) == 0 || time.Since(drainStart) > drainBound {
			break
		}
		if len(missing) != lastCount {
			lastProgress, lastCount = time.Now(), len(missing)
		}
		if rescued > 0 && time.Since(lastProgress) > drainStall {
			// Stalled again after the rescue restart: those events are
			// gone; report them now rather than at drainBound (or the
			// test binary's timeout, which comes first by default).
			break
		}
		if rescued == 0 && time.Since(lastProgress) > drainStall {
			// No progress: restart once more, to tell events the server
			// holds but does not hand out from events that are gone.
			rescued = len(missing)
			t.Logf("chaos: %d events undelivered and no progress for %v; restarting the server once more", rescued, drainStall)
			h.kill()
			final.ready = h.start()
			lastProgress = time.Now()
		}
		time.Sleep(100 * time.Millisecond)
	}
	drained := time.Since(drainStart)
	time.Sleep(500 * time.Millisecond) // late deliveries, to catch re-deliveries of acked events
	final.end = time.Now()
	windows = append(windows, final)
	cancel()
	wg.Wait()
	for _, c := range clients {
		c.Close()
	}
	clients = nil
	h.stop()

	rec.mu.Lock()
	defer rec.mu.Unlock()

	// Invariant 1: every id whose publish succeeded was delivered.
	slices.Sort(missing)
	if len(missing) > 0 {
		t.Errorf("%d published events were never delivered (first: %v)", len(missing), missing[:min(5, len(missing))])
	}
	if rescued > 0 {
		t.Errorf("%d published events were not delivered (no progress for %v); %d of them came only after one more restart", rescued, drainStall, rescued-len(missing))
	}
	// Invariant 2: nothing was delivered after its ack was confirmed. The
	// server's lease time (from the lease deadline, millisecond resolution)
	// is what counts: a subscription may hand out a delivery leased before
	// the ack some time later (its fetch was answered on a connection that
	// then died), which is reported but is not a violation.
	var afterAck []string
	receivedAfterAck, attemptReuse := 0, 0
	deliveries, dupIDs, extra := 0, 0, 0
	for id, ds := range rec.deliveries {
		deliveries += len(ds)
		if len(ds) > 1 {
			dupIDs++
			extra += len(ds) - 1
		}
		seen := map[int]bool{}
		for _, d := range ds {
			if seen[d.attempt] {
				attemptReuse++
			}
			seen[d.attempt] = true
		}
		if at, ok := rec.ackConfirmed[id]; ok {
			for _, d := range ds {
				if d.leased.After(at.Add(time.Millisecond)) {
					afterAck = append(afterAck, fmt.Sprintf("%s (attempt %d, leased %v after the ack)", id, d.attempt, d.leased.Sub(at)))
				}
				if d.at.After(at) {
					receivedAfterAck++
				}
			}
		}
	}
	if len(afterAck) > 0 {
		t.Errorf("%d deliveries leased after a confirmed ack: %v", len(afterAck), afterAck[:min(5, len(afterAck))])
	}
	// Invariant 3: after a restart, no consumer waits longer than the
	// backoff bound for its next delivery while events are pending
	// (publishers run throughout; measured on windows long enough).
	bound := stuckBound()
	var stuckMax, firstMaxShort time.Duration
	var shortServed, shortTotal, stuckViolations int
	for _, w := range windows {
		for n := range consumers {
			at := firstAfter(rec.consumerAt[n], w.ready)
			wait := w.end.Sub(w.ready)
			if !at.IsZero() && at.Before(w.end) {
				wait = at.Sub(w.ready)
			} else {
				at = time.Time{}
			}
			if w.long {
				stuckMax = max(stuckMax, wait)
				if at.IsZero() && wait >= bound || wait > bound {
					stuckViolations++
					t.Errorf("consumer %d: no delivery within %v of the restart at %v (window %v)", n, bound, w.ready.Sub(began).Round(time.Millisecond), w.end.Sub(w.ready).Round(time.Millisecond))
				}
				// Nor a gap that long later in the window, while the
				// publishers run (events are pending throughout).
				end := w.end
				if end.After(pubStopped) {
					end = pubStopped
				}
				prev := w.ready
				for _, d := range rec.consumerAt[n] {
					if d.Before(w.ready) {
						continue
					}
					if d.After(end) {
						break
					}
					if d.Sub(prev) > bound && prev != w.ready {
						stuckViolations++
						t.Errorf("consumer %d: no delivery for %v in the window that began at %v", n, d.Sub(prev).Round(time.Millisecond), w.ready.Sub(began).Round(time.Millisecond))
					}
					prev = d
				}
				if gap := end.Sub(prev); prev != w.ready && gap > bound {
					stuckViolations++
					t.Errorf("consumer %d: no delivery for the last %v of the window that began at %v", n, gap.Round(time.Millisecond), w.ready.Sub(began).Round(time.Millisecond))
				}
			} else {
				shortTotal++
				if !at.IsZero() {
					shortServed++
					firstMaxShort = max(firstMaxShort, wait)
				}
			}
		}
	}
	if len(h.crashes) > 0 {
		t.Errorf("%d server children exited on their own: %v", len(h.crashes), h.crashes)
	}

	ackOther := ""
	for s, n := range rec.ackOther {
		ackOther += fmt.Sprintf(" %v=%d", s, n)
	}
	t.Logf("chaos: %d kill cycles in %v (%d with a publish in flight, %d with an ack in flight), drain %v",
		cycles, killing.Round(time.Millisecond), killsPub, killsAck, drained.Round(time.Millisecond))
	t.Logf("chaos: published %d ids OK (%d reported duplicate on retry), %d events with a failed Publish call",
		len(rec.published), rec.pubDups, rec.pubFailed)
	if len(rec.pubErrs) > 0 {
		t.Logf("chaos: failed Publish calls: %v", rec.pubErrs)
	}
	t.Logf("chaos: %d deliveries of %d ids; %d ids delivered more than once, %d extra deliveries (%.2f%%)",
		deliveries, len(rec.deliveries), dupIDs, extra, 100*float64(extra)/float64(max(deliveries, 1)))
	t.Logf("chaos: acks confirmed %d, other outcomes:%s, failed calls %d", len(rec.ackConfirmed), ackOther, rec.ackFailed)
	t.Logf("chaos: lost %d, leased after a confirmed ack %d, stuck violations %d", len(missing), len(afterAck), stuckViolations)
	t.Logf("chaos: handed out by a subscription after another consumer's confirmed ack (leased before it) %d; redeliveries carrying an attempt number already used %d",
		receivedAfterAck, attemptReuse)
	t.Logf("chaos: longest wait for a first delivery after a restart (long windows, bound %v): %v; short windows served %d of %d (slowest %v)",
		bound, stuckMax.Round(time.Millisecond), shortServed, shortTotal, firstMaxShort.Round(time.Millisecond))
}

// firstAfter returns the first time in sorted ts at or after t, or zero.
func firstAfter(ts []time.Time, t time.Time) time.Time {
	i, _ := slices.BinarySearchFunc(ts, t, func(a, b time.Time) int { return a.Compare(b) })
	if i < len(ts) {
		return ts[i]
	}
	return time.Time{}
}
