package reliability

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/h3x-io/h3x"
)

// probe runs publish+fetch+ack round trips on an existing client and
// counts them, so a test can compare the rate before and during a flood.
type probe struct {
	n    atomic.Int64
	errs atomic.Int64
}

func (p *probe) run(ctx context.Context, c *h3x.Client) {
	for i := 0; ctx.Err() == nil; i++ {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := c.Publish(cctx, h3x.Event{Namespace: namespace})
		if err == nil {
			var ds []*h3x.Delivery
			if ds, err = c.Fetch(cctx, 1); err == nil {
				_, err = c.Ack(cctx, ds...)
			}
		}
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				p.errs.Add(1)
			}
			continue
		}
		p.n.Add(1)
	}
}

// rate measures the probe's round trips per second over d.
func (p *probe) rate(d time.Duration) float64 {
	start := p.n.Load()
	time.Sleep(d)
	return float64(p.n.Load()-start) / d.Seconds()
}

// heapPeak samples the heap every 50 ms until stop, and returns the peak.
func heapPeak(stop <-chan struct{}) uint64 {
	var peak uint64
	var ms runtime.MemStats
	for {
		runtime.ReadMemStats(&ms)
		peak = max(peak, ms.HeapAlloc)
		select {
		case <-stop:
			return peak
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func heapNow() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// dialer dials raw QUIC connections from a few sockets.
type dialer struct {
	trs []*quic.Transport
	i   atomic.Int64
}

func newDialer(t *testing.T, sockets int) *dialer {
	d := &dialer{}
	for range sockets {
		u, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		tr := &quic.Transport{Conn: u}
		d.trs = append(d.trs, tr)
		t.Cleanup(func() { tr.Close(); u.Close() })
	}
	return d
}

func (d *dialer) dial(ctx context.Context, addr string) (*quic.Conn, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	tr := d.trs[int(d.i.Add(1))%len(d.trs)]
	return tr.Dial(ctx, ua, rawTLS(), &quic.Config{HandshakeIdleTimeout: 2 * time.Second, MaxIdleTimeout: 10 * time.Second})
}

// isRefused reports whether a dial was refused by the server before its
// handshake (QUIC CONNECTION_REFUSED).
func isRefused(err error) bool {
	var te *quic.TransportError
	return errors.As(err, &te) && te.Remote && te.ErrorCode == quic.ConnectionRefused
}

// closeCode returns the application error code the server closed c with,
// or -1 if it did not close it within wait.
func closeCode(c *quic.Conn, wait time.Duration) int {
	select {
	case <-c.Context().Done():
		var ae *quic.ApplicationError
		if errors.As(context.Cause(c.Context()), &ae) {
			return int(ae.ErrorCode)
		}
		return -2
	case <-time.After(wait):
		return -1
	}
}

// TestFloods: a burst of connection attempts, unauthenticated connections
// held open, and wrong tokens in a loop. The server refuses beyond its
// limits, keeps its heap bounded, keeps serving an existing client, and
// slows repeated auth failures from one address. The burst comes from a
// child process (TestFloodAttacker). H3X_FLOOD_CONNS (default 1,000) sets
// the burst; RELIABILITY.md's figures use 10,000. H3X_FLOOD_RATE sets the
// server's new-connection rate (bursts of twice it; 0 turns it off)
// instead of the default, for comparisons.
//
//	H3X_FLOOD_CONNS=10000 go test -run TestFloods ./test/reliability/ -v
func TestFloods(t *testing.T) {
	if raceEnabled && os.Getenv("H3X_FLOOD_CONNS") == "" {
		t.Skip("a load test: under the race detector the server is too slow for its timing checks; run it without -race (figures in RELIABILITY.md)")
	}
	burst := 1000
	if v := os.Getenv("H3X_FLOOD_CONNS"); v != "" {
		var err error
		if burst, err = strconv.Atoi(v); err != nil || burst < 1 {
			t.Fatalf("H3X_FLOOD_CONNS=%q", v)
		}
	}
	const maxConns = 2000 // so at most 200 may wait to authenticate
	const maxUnauth = maxConns / 10
	rate := h3x.DefaultConnectionRate
	if v := os.Getenv("H3X_FLOOD_RATE"); v != "" {
		r, err := strconv.ParseFloat(v, 64)
		if err != nil || r < 0 {
			t.Fatalf("H3X_FLOOD_RATE=%q", v)
		}
		rate = h3x.RateLimit{Rate: r, Burst: int(2 * r)}
	}
	srv := startServer(t, h3x.WithQueue(h3x.NewMemoryQueue(h3x.QueueOptions{})),
		h3x.WithMaxConnections(maxConns), h3x.WithAuthTimeout(2*time.Second), h3x.WithConnectionRate(rate))
	existing := srv.dial(t, srv.addr)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	p := &probe{}
	wg.Go(func() { p.run(ctx, existing) })
	// A second existing client runs as a service does, at a fixed rate
	// (its normal rate), publishing and consuming its own namespace.
	pc := startPaced(ctx, t, srv.dial(t, srv.addr, h3x.WithNamespaces(pacedNS)), pacedNS, pacedRate)
	wg.Go(pc.wait)
	heap0 := heapNow()
	cpuBase := cpuTime()
	pacedBase0 := pc.now()
	base := p.rate(3 * time.Second)
	pacedBase1 := pc.now()
	t.Logf("baseline: %.0f round trips/s, process CPU %.2f cores, heap %.1f MiB", base, (cpuTime()-cpuBase).Seconds()/3, mib(heap0))

	// 1. A burst of connection attempts, 256 at a time, from another
	// process (this test binary, re-executed: see TestFloodAttacker), so
	// that the attackers' own TLS work is not charged to the server's
	// process. How many are refused depends on how fast the attacker
	// runs, so it is reported; the refusal itself is tested
	// deterministically in the root package (admission_test.go).
	stop := make(chan struct{})
	peakCh := make(chan uint64, 1)
	go func() { peakCh <- heapPeak(stop) }()
	n0 := p.n.Load()
	cpu0 := cpuTime()
	start := time.Now()
	pacedBurst0 := pc.now()
	res, err := runAttacker(ctx, srv.addr, burst, 256)
	took := time.Since(start)
	pacedBurst1 := pc.now()
	cpu := cpuTime() - cpu0
	during := float64(p.n.Load()-n0) / took.Seconds()
	close(stop)
	peak := <-peakCh
	if err != nil {
		t.Fatalf("attacker: %v", err)
	}
	codes := res.Codes
	refused, failed := res.Refused, res.Failed
	st := srv.AdmissionStats()
	t.Logf("burst: %d attempts in %v (%.0f/s): refused before the handshake %d, handshakes failed %d, left open by the server %d, closed TOO_MANY_CONNECTIONS %d, other %v",
		burst, took.Round(time.Millisecond), float64(burst)/took.Seconds(), refused, failed, codes[-1], codes[int(h3x.CodeTooManyConnections)], codes)
	t.Logf("burst: server admission %+v", st)
	// The probe's rate drifts by ±15% from one 3 s window to the next on
	// this machine, so the burst is compared with the mean of a window
	// before it and one after it.
	pacedAfter0 := pc.now()
	after := p.rate(3 * time.Second)
	pacedAfter1 := pc.now()
	normal := (base + after) / 2
	t.Logf("burst: existing client %.0f round trips/s during (%.0f before, %.0f after: %.0f%% of their mean); server process CPU %.2f cores (%v); heap peak %.1f MiB (before %.1f MiB)",
		during, base, after, 100*during/normal, cpu.Seconds()/took.Seconds(), cpu.Round(time.Millisecond), mib(peak), mib(heap0))
	// The documented memory bound (RELIABILITY.md, "Memory bound"): about
	// 40 KiB per pending connection, plus up to 64 KiB for a full-size
	// Auth frame, for at most maxUnauth of them; 32 MiB for the rest
	// (the probe, the paced client, GC slack).
	heapBound := heap0 + uint64(maxUnauth)*(40+64)<<10 + 32<<20
	if peak > heapBound {
		t.Errorf("heap peak %.1f MiB during the burst; the documented bound is %.1f MiB", mib(peak), mib(heapBound))
	}
	// The paced client's events due in each window, once the last of them
	// have had time to arrive.
	time.Sleep(time.Second)
	pacedWindows := []pacedWindow{pc.window(pacedBase0, pacedBase1), pc.window(pacedBurst0, pacedBurst1), pc.window(pacedAfter0, pacedAfter1)}
	for i, name := range []string{"before", "during", "after"} {
		t.Logf("burst: paced client (%d events/s) %s: %v", pacedRate, name, pacedWindows[i])
	}
	// Its normal rate, kept: every event due during the burst was
	// published and delivered (within the 4 s since the burst ended).
	if w := pacedWindows[1]; w.delivered < w.due {
		t.Errorf("the paced client got %d of its %d events due during the burst delivered", w.delivered, w.due)
	}
	// Every attempt is accounted for: handshaken (then closed), refused
	// before its handshake, or failed (a lost packet's timeout).
	handshaken := int64(0)
	for _, n := range codes {
		handshaken += int64(n)
	}
	if handshaken+refused+failed != int64(burst) {
		t.Errorf("attempts: %d handshaken + %d refused + %d failed != %d", handshaken, refused, failed, burst)
	}
	// The server admits no more than its new-connection bucket allows:
	// the burst plus the rate over the time the flood took (and some
	// slack for the time before and after it).
	if limit := uint64(float64(rate.Burst) + rate.Rate*(took.Seconds()+1)); rate.Rate > 0 && st.Admitted > limit+1 {
		t.Errorf("the server admitted %d connections in %v; its rate allows %d", st.Admitted, took, limit)
	}
	if st.RefusedRate+st.RefusedLimit < uint64(refused) {
		t.Errorf("the clients saw %d refusals, the server counted %d", refused, st.RefusedRate+st.RefusedLimit)
	}
	// The existing client must make progress without errors. (Its rate
	// during the burst is reported, not asserted beyond a loose bound:
	// here the attacker's handshakes run in the same process, on the same
	// two cores; see RELIABILITY.md.)
	if during < normal/20 {
		t.Errorf("the existing client fell to %.0f round trips/s during the burst (%.0f before and after)", during, normal)
	}

	// 2. Unauthenticated connections held open: the server keeps at most
	// maxUnauth of them, and closes them at the auth timeout.
	d := newDialer(t, 4)
	sem := make(chan struct{}, 256)
	held := make([]*quic.Conn, 0, 1000)
	var hmu sync.Mutex
	var hwg sync.WaitGroup
	var heldRefused atomic.Int64
	for range 1000 {
		sem <- struct{}{}
		hwg.Go(func() {
			defer func() { <-sem }()
			dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
			defer dcancel()
			c, err := d.dial(dctx, srv.addr)
			switch {
			case err == nil:
				hmu.Lock()
				held = append(held, c)
				hmu.Unlock()
			case isRefused(err):
				heldRefused.Add(1)
			}
		})
	}
	hwg.Wait()
	stHeld := srv.AdmissionStats()
	if stHeld.PendingNow > stHeld.PendingMax {
		t.Errorf("%d connections pending, the limit is %d", stHeld.PendingNow, stHeld.PendingMax)
	}
	time.Sleep(200 * time.Millisecond)
	open := 0
	for _, c := range held {
		if c.Context().Err() == nil {
			open++
		}
	}
	heapHeld := heapNow()
	rateHeld := p.rate(time.Second)
	t.Logf("held: 1000 attempts: %d handshakes, %d refused before the handshake; %d still open after 200 ms (limit %d); heap %.1f MiB; existing client %.0f round trips/s; server admission %+v",
		len(held), heldRefused.Load(), open, maxUnauth, mib(heapHeld), rateHeld, stHeld)
	if heapHeld > heapBound {
		t.Errorf("heap %.1f MiB with unauthenticated connections held; the documented bound is %.1f MiB", mib(heapHeld), mib(heapBound))
	}
	if open > maxUnauth+10 {
		t.Errorf("%d unauthenticated connections kept open; the limit is %d", open, maxUnauth)
	}
	time.Sleep(2500 * time.Millisecond) // the auth timeout (2 s) passes
	open = 0
	for _, c := range held {
		if c.Context().Err() == nil {
			open++
		}
		c.CloseWithError(0, "")
	}
	// The server closes every one of them at the auth timeout; under a
	// burst, a few CONNECTION_CLOSE packets can be dropped by a full
	// loopback socket buffer, and those clients only notice at their idle
	// timeout. More than a few percent would mean the server kept them.
	if open > len(held)/20+1 {
		t.Errorf("%d of %d unauthenticated connections still open after the auth timeout", open, len(held))
	} else if open > 0 {
		t.Logf("%d of %d unauthenticated connections still open after the auth timeout (close packets lost under the burst)", open, len(held))
	}

	// 3. Wrong tokens in a loop from one address: answered slower and slower.
	var delays []time.Duration
	for range 8 {
		var c *h3x.Client
		var err error
		var began time.Time
		// An attempt refused by the new-connection rate (the floods above
		// emptied its bucket) is retried: at most 50 times, 100 ms apart.
		for range 50 {
			dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
			began = time.Now()
			c, err = h3x.Dial(dctx, srv.addr, h3x.WithCredentials(clientID, "wrong"), h3x.WithTrustedFingerprint(srv.fp))
			dcancel()
			if !errors.Is(err, h3x.ErrTooManyConnections) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		delays = append(delays, time.Since(began).Round(time.Millisecond))
		if err == nil {
			c.Close()
			t.Fatal("a wrong token was accepted")
		}
		if !errors.Is(err, h3x.ErrUnauthenticated) {
			t.Fatalf("wrong token: %v, want ErrUnauthenticated", err)
		}
	}
	t.Logf("wrong tokens: time to each refusal %v", delays)
	if delays[7] < 500*time.Millisecond {
		t.Errorf("the 8th wrong token in a row was refused after %v; want slowed to >= 800 ms", delays[7])
	}
	if _, err := existing.Ping(ctx); err != nil {
		t.Fatalf("the existing client after the floods: %v", err)
	}
	cancel()
	wg.Wait()
	// Calls of the existing client that took over 5 s (a known weakness
	// under handshake floods, RELIABILITY.md finding 6): reported.
	t.Logf("existing client: %d round trips, %d calls over 5 s", p.n.Load(), p.errs.Load())
	t.Logf("paced client: %d published, %d publishes failed, %d delivered, %d redelivered", pc.pubOK.Load(), pc.pubErrs.Load(), pc.delivered(), pc.redelivered())
	if n := pc.pubErrs.Load(); n > 0 {
		t.Errorf("the paced client's publishes failed %d times", n)
	}
	t.Logf("after: heap %.1f MiB", mib(heapNow()))
}

// The paced existing client: a namespace of its own, at a rate a service
// might publish at.
const (
	pacedNS   = "rel-paced"
	pacedRate = 1000
)

// attackResult is what the attacker process reports.
type attackResult struct {
	Codes   map[int]int // handshaken attempts by the server's close code (-1: left open 50 ms, -2: closed otherwise)
	Refused int64       // refused before the handshake (CONNECTION_REFUSED)
	Failed  int64       // failed otherwise (timeouts)
}

const attackerEnv = "H3X_FLOOD_ATTACKER" // "addr count concurrency": run as the attacker

// attackerScheduling returns the command prefix that sets the attacker
// process's CPU scheduling. By default it runs under SCHED_IDLE (chrt -i 0),
// standing in for an attacker on another machine: it gets a core only when
// nothing else on this one wants it, so the flood takes from the server only
// what the server itself spends on it (its packets, refusals, Retries and
// admitted handshakes). nice -n 19 alone does not do that here: a niced
// process still takes its share of a core the server's goroutines are
// waiting for. H3X_FLOOD_SCHED=nice uses nice -n 19 instead (the figures
// before 2026-11-26 08:40), and H3X_FLOOD_SCHED=normal (or the older
// H3X_FLOOD_NICE=0) runs it at normal priority, sharing the two cores.
func attackerScheduling() []string {
	mode := os.Getenv("H3X_FLOOD_SCHED")
	if os.Getenv("H3X_FLOOD_NICE") == "0" {
		mode = "normal"
	}
	switch mode {
	case "normal":
		return nil
	case "", "idle":
		if chrt, err := exec.LookPath("chrt"); err == nil {
			return []string{chrt, "--idle", "0"}
		}
	}
	if nice, err := exec.LookPath("nice"); err == nil {
		return []string{nice, "-n", "19"}
	}
	return nil
}

// runAttacker runs count connection attempts against addr, conc at a time,
// in a child process, and returns their outcomes.
func runAttacker(ctx context.Context, addr string, count, conc int) (*attackResult, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	args := []string{os.Args[0], "-test.run=^TestFloodAttacker$", "-test.count=1"}
	args = append(attackerScheduling(), args...)
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d %d", attackerEnv, addr, count, conc))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%v: %s%s", err, out, stderr.Bytes())
	}
	for _, line := range strings.Split(string(out), "\n") {
		if rest, ok := strings.CutPrefix(line, "RESULT "); ok {
			var r attackResult
			if err := json.Unmarshal([]byte(rest), &r); err != nil {
				return nil, err
			}
			return &r, nil
		}
	}
	return nil, fmt.Errorf("no result in the attacker's output: %s", out)
}

// TestFloodAttacker is TestFloods' attacker process; it is skipped unless
// H3X_FLOOD_ATTACKER is set.
func TestFloodAttacker(t *testing.T) {
	spec := os.Getenv(attackerEnv)
	if spec == "" {
		t.Skip("the attacker process of TestFloods")
	}
	var addr string
	var count, conc int
	if _, err := fmt.Sscanf(spec, "%s %d %d", &addr, &count, &conc); err != nil {
		t.Fatalf("%s=%q: %v", attackerEnv, spec, err)
	}
	d := newDialer(t, 4)
	res := attackResult{Codes: map[int]int{}}
	var mu sync.Mutex
	var refused, failed atomic.Int64
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	for range count {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			dctx, dcancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer dcancel()
			c, err := d.dial(dctx, addr)
			if err != nil {
				if isRefused(err) {
					refused.Add(1)
				} else {
					failed.Add(1)
				}
				return
			}
			code := closeCode(c, 50*time.Millisecond)
			c.CloseWithError(0, "")
			mu.Lock()
			res.Codes[code]++
			mu.Unlock()
		})
	}
	wg.Wait()
	res.Refused, res.Failed = refused.Load(), failed.Load()
	b, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("RESULT %s\n", b)
}
