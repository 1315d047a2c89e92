package reliability

import (
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
)

// paced is an existing client as a service runs one: it publishes at a fixed
// rate (its normal rate) and consumes what it publishes with Subscribe, so a
// test can check that it keeps that rate, and how its publish→delivery
// latency moves, while something else loads the server.
//
// The schedule is open-loop: event i is due at start + i/rate whether or not
// earlier publishes have been answered (PublishAsync), and each event carries
// its due time, so a publisher that falls behind shows up as latency instead
// of hiding it (no coordinated omission).
type paced struct {
	ns       string
	interval time.Duration
	start    time.Time

	pubErrs atomic.Int64
	pubOK   atomic.Int64

	wg      sync.WaitGroup
	mu      sync.Mutex
	latency map[int64]time.Duration // by event index: delivery time − due time
	redeliv int
}

// pacedInFlight bounds the publishes awaiting their answers; a publisher
// that reaches it waits (and its later events show the delay as latency).
const pacedInFlight = 1024

// startPaced starts a paced client on c publishing to and consuming from ns
// at rate events/s until ctx ends; wait waits for it to stop.
func startPaced(ctx context.Context, t testing.TB, c *h3x.Client, ns string, rate int) *paced {
	p := &paced{ns: ns, interval: time.Second / time.Duration(rate), latency: map[int64]time.Duration{}}
	sub, err := c.Subscribe(ctx, []string{p.ns}, h3x.SubscribeOptions{})
	if err != nil {
		t.Fatalf("paced client: subscribe: %v", err)
	}
	p.start = time.Now()
	calls := make(chan *h3x.PublishCall, pacedInFlight)
	p.wg.Go(func() {
		for call := range calls {
			if res, err := call.Result(); err != nil || res[0].Status != h3x.PublishStored {
				if ctx.Err() == nil {
					p.pubErrs.Add(1)
				}
				continue
			}
			p.pubOK.Add(1)
		}
	})
	p.wg.Go(func() {
		for d := range sub.Events() {
			now := time.Since(p.start)
			if len(d.Event.Data) == 8 {
				i := int64(binary.BigEndian.Uint64(d.Event.Data))
				p.mu.Lock()
				if _, again := p.latency[i]; again {
					p.redeliv++
				} else {
					p.latency[i] = now - time.Duration(i)*p.interval
				}
				p.mu.Unlock()
			}
			_ = d.Ack()
		}
	})
	p.wg.Go(func() {
		defer func() { _ = sub.Close() }()
		defer close(calls)
		timer := time.NewTimer(0)
		defer timer.Stop()
		for i := int64(0); ; i++ {
			if wait := time.Until(p.start.Add(time.Duration(i) * p.interval)); wait > 0 {
				timer.Reset(wait)
				select {
				case <-ctx.Done():
				case <-timer.C:
				}
			}
			if ctx.Err() != nil {
				return
			}
			data := binary.BigEndian.AppendUint64(nil, uint64(i))
			calls <- c.PublishAsync(ctx, h3x.Event{Namespace: p.ns, Type: "paced", Data: data})
		}
	})
	return p
}

// wait waits until the paced client has stopped (its context ended).
func (p *paced) wait() { p.wg.Wait() }

// now is the time since the schedule started.
func (p *paced) now() time.Duration { return time.Since(p.start) }

// pacedWindow is what the paced client saw of the events due in a window.
type pacedWindow struct {
	due, delivered int
	rate           float64 // delivered events due in the window, per second of it
	p50, p99, max  time.Duration
}

func (w pacedWindow) String() string {
	return fmt.Sprintf("%d of %d delivered (%.0f/s), publish→delivery p50 %v p99 %v max %v",
		w.delivered, w.due, w.rate, w.p50.Round(time.Microsecond), w.p99.Round(time.Microsecond), w.max.Round(time.Microsecond))
}

// window summarizes the events due in [from, to) (times since the start).
func (p *paced) window(from, to time.Duration) pacedWindow {
	first := int64((from + p.interval - 1) / p.interval)
	last := int64((to - 1) / p.interval) // inclusive
	w := pacedWindow{due: int(max(last-first+1, 0))}
	var lat []time.Duration
	p.mu.Lock()
	for i := first; i <= last; i++ {
		if l, ok := p.latency[i]; ok {
			lat = append(lat, l)
		}
	}
	p.mu.Unlock()
	w.delivered = len(lat)
	if to > from {
		w.rate = float64(w.delivered) / (to - from).Seconds()
	}
	if len(lat) > 0 {
		slices.Sort(lat)
		w.p50 = lat[len(lat)/2]
		w.p99 = lat[min(len(lat)-1, len(lat)*99/100)]
		w.max = lat[len(lat)-1]
	}
	return w
}

func (p *paced) delivered() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.latency)
}

func (p *paced) redelivered() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.redeliv
}
