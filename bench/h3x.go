package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"strings"
	"time"

	"github.com/h3x-io/h3x"
)

// h3xServer is a running h3x-bench-server process.
type h3xServer struct {
	p         *proc
	addr, fp  string
	pprofAddr string
}

// startH3XServer starts the bench server with a Badger queue in dir.
func startH3XServer(ctx context.Context, bin, dir string, durability h3x.Durability, pprof bool, extra ...string) (*h3xServer, error) {
	d := "fsync"
	if durability == h3x.DurabilityNoSync {
		d = "nosync"
	}
	args := append([]string{"-data", filepath.Join(dir, "data"), "-durability", d}, extra...)
	s := &h3xServer{}
	if pprof {
		port, err := freeTCPPort()
		if err != nil {
			return nil, err
		}
		s.pprofAddr = fmt.Sprintf("127.0.0.1:%d", port)
		args = append(args, "-pprof", s.pprofAddr)
	}
	p, out, err := startProc("h3x-bench-server", filepath.Join(dir, "server.log"), true, bin, args...)
	if err != nil {
		return nil, err
	}
	s.p = p
	lines := make(chan string)
	go func() {
		defer close(lines)
		for {
			l, err := out.ReadString('\n')
			if l != "" {
				lines <- strings.TrimSpace(l)
			}
			if err != nil {
				return
			}
		}
	}()
	timeout := time.After(30 * time.Second)
	for s.addr == "" || s.fp == "" {
		select {
		case l, ok := <-lines:
			if !ok {
				p.stop()
				return nil, fmt.Errorf("h3x-bench-server exited before listening: %v\n%s", p.err, p.tail())
			}
			if v, ok := strings.CutPrefix(l, "fingerprint "); ok {
				s.fp = v
			} else if v, ok := strings.CutPrefix(l, "listening "); ok {
				s.addr = v
			}
		case <-timeout:
			p.stop()
			return nil, errors.New("h3x-bench-server did not report its address within 30 s")
		case <-ctx.Done():
			p.stop()
			return nil, ctx.Err()
		}
	}
	go func() { // drain
		for range lines {
		}
	}()
	return s, nil
}

func (s *h3xServer) dial(ctx context.Context, opts ...h3x.ClientOption) (*h3x.Client, error) {
	opts = append([]h3x.ClientOption{
		h3x.WithCredentials("bench", "bench-token"),
		h3x.WithTrustedFingerprint(s.fp),
	}, opts...)
	return h3x.Dial(ctx, s.addr, opts...)
}

// h3xParams are the client-side knobs of the H3X runs.
type h3xParams struct {
	batch, inflight    int // pipelining publisher: events per PublishAsync, calls in flight
	unacked, fetchSize int // consumer: SubscribeOptions
}

type h3xTarget struct {
	srv *h3xServer
	pub *h3x.Client // publishers
	sub *h3x.Client // the backlog's consumer
	// lat is the latency run's consumer. It is a client of its own because
	// a fetch lane answers in request order: the long poll that sub's
	// closed subscription left parked on the server (up to 30 s) would hold
	// back the answers to a new subscription's fetches on the same
	// connection.
	lat *h3x.Client
	prm h3xParams
}

func startH3X(ctx context.Context, bin, dir string, cls class, prm h3xParams, pprof bool) (*h3xTarget, error) {
	dur := h3x.DurabilityFsync
	if cls == crashSafe {
		dur = h3x.DurabilityNoSync
	}
	srv, err := startH3XServer(ctx, bin, dir, dur, pprof)
	if err != nil {
		return nil, err
	}
	t := &h3xTarget{srv: srv, prm: prm}
	if t.pub, err = srv.dial(ctx, h3x.WithPublishBuffer(max(prm.inflight, h3x.DefaultPublishBuffer))); err != nil {
		t.Close()
		return nil, err
	}
	if t.sub, err = srv.dial(ctx); err != nil {
		t.Close()
		return nil, err
	}
	if t.lat, err = srv.dial(ctx); err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

func (t *h3xTarget) Proc() *proc { return t.srv.p }

func (t *h3xTarget) Close() {
	if t.pub != nil {
		t.pub.Close()
	}
	if t.sub != nil {
		t.sub.Close()
	}
	if t.lat != nil {
		t.lat.Close()
	}
	t.srv.p.stop()
}

func (t *h3xTarget) Publish(ctx context.Context, n int) (int, time.Duration, error) {
	return t.publishOn(ctx, t.pub, "bench", n)
}

// Flood publishes into the flood namespace as Publish does, on a
// connection of its own, until ctx ends.
func (t *h3xTarget) Flood(ctx context.Context) (int, error) {
	c, err := t.srv.dial(ctx, h3x.WithPublishBuffer(max(t.prm.inflight, h3x.DefaultPublishBuffer)))
	if err != nil {
		return 0, err
	}
	defer c.Close()
	n, _, _ := t.publishOn(ctx, c, "flood", math.MaxInt)
	return n, nil
}

// publishOn publishes n events into namespace ns with c, pipelined.
func (t *h3xTarget) publishOn(ctx context.Context, c *h3x.Client, ns string, n int) (int, time.Duration, error) {
	calls := make(chan *h3x.PublishCall, t.prm.inflight)
	type result struct {
		stored int
		err    error
	}
	res := make(chan result, 1)
	go func() {
		var r result
		for c := range calls {
			rs, err := c.Result()
			if err != nil && r.err == nil {
				r.err = err
			}
			for _, x := range rs {
				if x.Status == h3x.PublishStored {
					r.stored++
				} else if r.err == nil {
					r.err = fmt.Errorf("publish: %v: %v", x.Status, x.Err)
				}
			}
		}
		res <- r
	}()
	start := time.Now()
	for sent := 0; sent < n && ctx.Err() == nil; {
		evs := make([]h3x.Event, min(t.prm.batch, n-sent))
		for i := range evs {
			evs[i] = h3x.Event{Namespace: ns, Type: "bench", Data: payload}
		}
		calls <- c.PublishAsync(ctx, evs...)
		sent += len(evs)
	}
	close(calls)
	r := <-res
	return r.stored, time.Since(start), r.err
}

func (t *h3xTarget) Consume(ctx context.Context, n int) (time.Duration, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	start := time.Now()
	sub, err := t.sub.Subscribe(ctx, []string{"bench"}, h3x.SubscribeOptions{MaxUnacked: t.prm.unacked, BatchSize: t.prm.fetchSize})
	if err != nil {
		return 0, err
	}
	defer sub.Close()
	for i := range n {
		d, ok := <-sub.Events()
		if !ok {
			return 0, fmt.Errorf("subscription ended after %d events: %v", i, sub.Err())
		}
		if i < n-1 {
			if err := d.Ack(); err != nil {
				return 0, err
			}
			continue
		}
		// The last ack is synchronous: it returns once the server has
		// applied it.
		if _, err := t.sub.Ack(ctx, d); err != nil {
			return 0, err
		}
	}
	// The acks batched by Delivery.Ack: every one answered before the
	// clock stops, as the peers' are.
	if err := t.sub.Flush(ctx); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

func (t *h3xTarget) Latency(ctx context.Context, rate int, warm, d time.Duration) ([]time.Duration, float64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	col := newLatencyCollector(rate, warm, d)
	sub, err := t.lat.Subscribe(ctx, []string{"lat"}, h3x.SubscribeOptions{})
	if err != nil {
		return nil, 0, err
	}
	defer sub.Close()
	go func() {
		for d := range sub.Events() {
			col.add(d.Event.Data)
			d.Ack()
		}
	}()
	_, achieved, err := pace(ctx, rate, warm+d, func(i int, at time.Time) error {
		t.pub.PublishAsync(ctx, h3x.Event{Namespace: "lat", Type: "bench", Data: latencyPayload(i, at)})
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	lat, err := col.wait(ctx)
	return lat, achieved, err
}
