package reliability

import (
	"context"
	"fmt"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/internal/faultnet"
)

// netScenario is one network fault between the clients and the server.
type netScenario struct {
	name  string
	apply func(p *faultnet.Proxy)
	hole  time.Duration // a black hole of this length in the middle of the run
}

var netScenarios = []netScenario{
	{name: "clean", apply: func(p *faultnet.Proxy) {}},
	{name: "loss 1%", apply: func(p *faultnet.Proxy) { p.SetLoss(0.01) }},
	{name: "loss 5%", apply: func(p *faultnet.Proxy) { p.SetLoss(0.05) }},
	{name: "loss 10%", apply: func(p *faultnet.Proxy) { p.SetLoss(0.10) }},
	{name: "duplication 5%", apply: func(p *faultnet.Proxy) { p.SetDuplication(0.05) }},
	{name: "reordering 10%", apply: func(p *faultnet.Proxy) { p.SetReordering(0.10) }},
	{name: "delay 20 ms", apply: func(p *faultnet.Proxy) { p.SetDelay(20 * time.Millisecond) }},
	{name: "black hole 3 s", apply: func(p *faultnet.Proxy) {}, hole: 3 * time.Second},
}

// netBackoff is the clients' reconnect policy under network faults.
var netBackoff = &h3x.ExponentialBackoff{Initial: 50 * time.Millisecond, Max: time.Second, Multiplier: 2}

// TestNetworkFaults runs publishers and a consumer through a fault proxy
// under each scenario and checks the delivery guarantees: every event
// whose publish succeeded is delivered, nothing is leased after its ack
// was confirmed, and delivery resumes within the backoff bound after a
// black hole. It reports publish and consume throughput per scenario:
// publishing alone for H3X_NETFAULT_DURATION (default 3s; at most 20,000
// events), then consuming (Subscribe, synchronous acks pipelined by four
// ackers) until all
// of it was delivered.
//
//	H3X_NETFAULT_DURATION=20s go test -run TestNetworkFaults ./test/reliability/ -v
func TestNetworkFaults(t *testing.T) {
	dur := 3 * time.Second
	if v := os.Getenv("H3X_NETFAULT_DURATION"); v != "" {
		var err error
		if dur, err = time.ParseDuration(v); err != nil || dur < time.Second {
			t.Fatalf("H3X_NETFAULT_DURATION=%q: want a duration of at least 1s", v)
		}
	}
	var rows []string
	for _, sc := range netScenarios {
		t.Run(sc.name, func(t *testing.T) {
			d := dur
			if sc.hole > 0 {
				d = max(dur, 2*sc.hole)
			}
			r := runNetScenario(t, sc, d)
			rows = append(rows, fmt.Sprintf("| %s | %.0f | %.0f | %d | %.2f%% | %d | %v |", sc.name, r.pubRate, r.consRate,
				r.published, 100*float64(r.extra)/float64(max(r.deliveries, 1)), r.lost, r.stall.Round(time.Millisecond)))
		})
	}
	t.Logf("network faults, %v of load per scenario:\n| scenario | publish ev/s | consume ev/s | published | duplicates | lost | longest stall |\n|---|---|---|---|---|---|---|\n%s",
		dur, joinLines(rows))
}

func joinLines(rows []string) string {
	s := ""
	for _, r := range rows {
		s += r + "\n"
	}
	return s
}

type netResult struct {
	pubRate, consRate float64
	published         int
	deliveries, extra int
	lost              int
	stall             time.Duration // longest gap between deliveries while events were pending
}

func runNetScenario(t *testing.T, sc netScenario, dur time.Duration) netResult {
	q := h3x.NewMemoryQueue(h3x.QueueOptions{})
	srv := startServer(t, h3x.WithQueue(q))
	proxy, err := faultnet.New(srv.Addr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	opts := []h3x.ClientOption{h3x.WithBackoff(netBackoff), h3x.WithDialTimeout(2 * time.Second)}
	pub := srv.dial(t, proxy.Addr(), opts...)
	con := srv.dial(t, proxy.Addr(), opts...)
	sc.apply(proxy)

	var (
		mu           sync.Mutex
		published    = map[string]bool{}
		leasedAt     = map[string][]time.Time{}
		ackConfirmed = map[string]time.Time{}
		deliveredAt  []time.Time
	)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// Phase 1: publish only, for dur (at most maxPublish events), with a
	// black hole in the middle if the scenario has one.
	const maxPublish = 20000
	pubCtx, stopPub := context.WithCancel(ctx)
	var wg sync.WaitGroup
	start := time.Now()
	for p := range 4 {
		wg.Go(func() {
			for seq := 0; pubCtx.Err() == nil; seq++ {
				evs := make([]h3x.Event, 10)
				for i := range evs {
					evs[i] = h3x.Event{ID: fmt.Sprintf("%d-%d-%d", p, seq, i), Namespace: namespace, Data: make([]byte, 200)}
				}
				cctx, ccancel := context.WithTimeout(pubCtx, 30*time.Second)
				res, err := pub.Publish(cctx, evs...)
				ccancel()
				if err != nil {
					continue
				}
				mu.Lock()
				for _, r := range res {
					if r.Status == h3x.PublishStored || r.Status == h3x.PublishDuplicate {
						published[r.ID] = true
					}
				}
				if len(published) >= maxPublish {
					stopPub()
				}
				mu.Unlock()
			}
		})
	}
	hole := func() {
		proxy.SetBlackhole(true)
		time.Sleep(sc.hole)
		proxy.SetBlackhole(false)
	}
	if sc.hole > 0 {
		time.Sleep(dur / 4)
		hole()
	}
	select {
	case <-pubCtx.Done():
	case <-time.After(time.Until(start.Add(dur))):
	}
	stopPub()
	wg.Wait()
	pubTime := time.Since(start)
	mu.Lock()
	pubCount := len(published)
	mu.Unlock()

	// Phase 2: consume until everything published was delivered (bounded),
	// with a black hole 1 s in if the scenario has one.
	sub, err := con.Subscribe(ctx, nil, h3x.SubscribeOptions{MaxUnacked: 256, BatchSize: 128})
	if err != nil {
		t.Fatal(err)
	}
	consStart := time.Now()
	// The consumer records each delivery and hands it to four ackers, which
	// ack what has accumulated (synchronously, to learn when each ack is
	// confirmed) so that acks are pipelined.
	ackCh := make(chan *h3x.Delivery, 1024)
	wg.Go(func() {
		defer close(ackCh)
		for d := range sub.Events() {
			now := time.Now()
			mu.Lock()
			leasedAt[d.Event.ID] = append(leasedAt[d.Event.ID], d.Deadline().Add(-h3x.DefaultAckDeadline))
			deliveredAt = append(deliveredAt, now)
			mu.Unlock()
			ackCh <- d
		}
	})
	for range 4 {
		wg.Go(func() {
			for d := range ackCh {
				batch := []*h3x.Delivery{d}
			more:
				for len(batch) < 128 {
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
				actx, acancel := context.WithTimeout(ctx, 30*time.Second)
				res, err := con.Ack(actx, batch...)
				acancel()
				done := time.Now()
				if err == nil {
					mu.Lock()
					for _, r := range res {
						if _, seen := ackConfirmed[r.ID]; r.Status == h3x.SettleOK && !seen {
							ackConfirmed[r.ID] = done // the first confirmed ack counts
						}
					}
					mu.Unlock()
				}
			}
		})
	}
	var holeEnd time.Time
	if sc.hole > 0 {
		// During the hole, events arrive (from a client that bypasses the
		// proxy), so that some are pending when it ends.
		time.Sleep(time.Second)
		proxy.SetBlackhole(true)
		direct := srv.dial(t, srv.addr)
		evs := make([]h3x.Event, 200)
		for i := range evs {
			evs[i] = h3x.Event{ID: fmt.Sprintf("hole-%d", i), Namespace: namespace}
		}
		if _, err := direct.Publish(ctx, evs...); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		for i := range evs {
			published[evs[i].ID] = true
		}
		mu.Unlock()
		time.Sleep(sc.hole)
		proxy.SetBlackhole(false)
		holeEnd = time.Now()
	}
	var missing []string
	var consTime time.Duration
	drainBound := time.Now().Add(2 * time.Minute)
	for {
		mu.Lock()
		missing = missing[:0]
		for id := range published {
			if len(leasedAt[id]) == 0 {
				missing = append(missing, id)
			}
		}
		mu.Unlock()
		consTime = time.Since(consStart)
		if len(missing) == 0 || time.Now().After(drainBound) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Everything delivered was acked: once the acks are confirmed, the
	// queue holds nothing (an ack confirmed but not applied leaves its
	// event leased until its deadline, long after this test).
	var left h3x.NamespaceStats
	for settleBound := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		st, err := q.Stats(context.Background(), namespace)
		if err != nil || len(st) != 1 {
			t.Fatalf("Stats: %v %v", st, err)
		}
		left = st[0]
		if left.Ready+left.Leased+left.Delayed == 0 || time.Now().After(settleBound) {
			break
		}
	}
	proxy.Reset()
	time.Sleep(200 * time.Millisecond) // late redeliveries of acked events would show here
	cancel()
	sub.Close()
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	r := netResult{pubRate: float64(pubCount) / pubTime.Seconds(), consRate: float64(pubCount-len(missing)) / consTime.Seconds(), published: len(published), lost: len(missing)}
	if pubCount == 0 {
		t.Errorf("nothing was published")
	}
	if n := left.Ready + left.Leased + left.Delayed; n > 0 && len(missing) == 0 {
		t.Errorf("every event delivered and acked, but the queue still holds %d (%+v)", n, left)
	}
	if len(missing) > 0 {
		t.Errorf("%d published events never delivered (e.g. %v)", len(missing), missing[:min(3, len(missing))])
	}
	afterAck := 0
	for id, ls := range leasedAt {
		r.deliveries += len(ls)
		r.extra += len(ls) - 1
		if at, ok := ackConfirmed[id]; ok {
			for _, l := range ls {
				if l.After(at.Add(time.Millisecond)) {
					afterAck++
				}
			}
		}
	}
	if afterAck > 0 {
		t.Errorf("%d deliveries leased after their ack was confirmed", afterAck)
	}
	// The longest gap between deliveries while events were pending.
	for i := 1; i < len(deliveredAt); i++ {
		r.stall = max(r.stall, deliveredAt[i].Sub(deliveredAt[i-1]))
	}
	if !holeEnd.IsZero() {
		bound := netBackoff.Max + 3*time.Second
		resumed := time.Time{}
		for _, at := range deliveredAt {
			if at.After(holeEnd) {
				resumed = at
				break
			}
		}
		if resumed.IsZero() || resumed.Sub(holeEnd) > bound {
			t.Errorf("deliveries did not resume within %v of the black hole's end (resumed %v after)", bound, resumed.Sub(holeEnd))
		}
		t.Logf("deliveries resumed %v after the black hole ended", resumed.Sub(holeEnd).Round(time.Millisecond))
	}
	t.Logf("%s: publish %.0f ev/s, consume %.0f ev/s, %d published, %d deliveries (%d extra), longest stall %v, proxy %+v",
		sc.name, r.pubRate, r.consRate, r.published, r.deliveries, r.extra, r.stall.Round(time.Millisecond), proxy.Stats())
	return r
}
