package reliability

import (
	"context"
	"errors"
	"net"
	"os"
	"runtime"
	"strconv"
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
// slows repeated auth failures from one address. H3X_FLOOD_CONNS (default
// 1,000) sets the burst; RELIABILITY.md's figures use 10,000.
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
	srv := startServer(t, h3x.WithQueue(h3x.NewMemoryQueue(h3x.QueueOptions{})),
		h3x.WithMaxConnections(maxConns), h3x.WithAuthTimeout(2*time.Second))
	existing := srv.dial(t, srv.addr)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	p := &probe{}
	wg.Go(func() { p.run(ctx, existing) })
	heap0 := heapNow()
	base := p.rate(time.Second)
	t.Logf("baseline: %.0f round trips/s, heap %.1f MiB", base, mib(heap0))

	// 1. A burst of connection attempts, 256 at a time; each is closed as
	// soon as the server has had 50 ms to refuse it.
	d := newDialer(t, 4)
	codes := map[int]int{}
	var codesMu sync.Mutex
	var failed atomic.Int64
	stop := make(chan struct{})
	peakCh := make(chan uint64, 1)
	go func() { peakCh <- heapPeak(stop) }()
	n0 := p.n.Load()
	start := time.Now()
	sem := make(chan struct{}, 256)
	var bwg sync.WaitGroup
	for range burst {
		sem <- struct{}{}
		bwg.Go(func() {
			defer func() { <-sem }()
			dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
			defer dcancel()
			c, err := d.dial(dctx, srv.addr)
			if err != nil {
				failed.Add(1)
				return
			}
			code := closeCode(c, 50*time.Millisecond)
			c.CloseWithError(0, "")
			codesMu.Lock()
			codes[code]++
			codesMu.Unlock()
		})
	}
	bwg.Wait()
	took := time.Since(start)
	during := float64(p.n.Load()-n0) / took.Seconds()
	close(stop)
	peak := <-peakCh
	t.Logf("burst: %d attempts in %v (%.0f/s): handshakes failed %d, left open by the server %d, closed TOO_MANY_CONNECTIONS %d, other %v",
		burst, took.Round(time.Millisecond), float64(burst)/took.Seconds(), failed.Load(), codes[-1], codes[int(h3x.CodeTooManyConnections)], codes)
	t.Logf("burst: existing client %.0f round trips/s during (%.0f before); heap peak %.1f MiB (before %.1f MiB, both ends of every connection in this process)",
		during, base, mib(peak), mib(heap0))
	// The existing client must make progress without errors. (Its rate
	// during the burst is reported, not asserted: here the attacker's
	// handshakes run in the same process, on the same two cores; see
	// RELIABILITY.md.)
	if during == 0 {
		t.Errorf("the existing client made no progress during the burst (%.0f round trips/s before)", base)
	}

	// 2. Unauthenticated connections held open: the server keeps at most
	// maxUnauth of them, and closes them at the auth timeout.
	held := make([]*quic.Conn, 0, 1000)
	var hmu sync.Mutex
	var hwg sync.WaitGroup
	for range 1000 {
		sem <- struct{}{}
		hwg.Go(func() {
			defer func() { <-sem }()
			dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
			defer dcancel()
			if c, err := d.dial(dctx, srv.addr); err == nil {
				hmu.Lock()
				held = append(held, c)
				hmu.Unlock()
			}
		})
	}
	hwg.Wait()
	time.Sleep(200 * time.Millisecond)
	open := 0
	for _, c := range held {
		if c.Context().Err() == nil {
			open++
		}
	}
	heapHeld := heapNow()
	rateHeld := p.rate(time.Second)
	t.Logf("held: %d handshakes, %d still open after 200 ms (limit %d); heap %.1f MiB; existing client %.0f round trips/s",
		len(held), open, maxUnauth, mib(heapHeld), rateHeld)
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
		dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
		began := time.Now()
		c, err := h3x.Dial(dctx, srv.addr, h3x.WithCredentials(clientID, "wrong"), h3x.WithTrustedFingerprint(srv.fp))
		dcancel()
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
	t.Logf("after: heap %.1f MiB", mib(heapNow()))
}
