package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// natsParams are the client-side knobs of the JetStream runs.
type natsParams struct {
	maxPending    int // pipelining publisher: PublishAsync max pending
	maxAckPending int // consumer: MaxAckPending
	pullBatch     int // consumer: PullMaxMessages
}

// natsSyncAlways reports whether the nats-server binary accepts
// jetstream { sync_interval: always } (2.10 and later; 2.9 rejects the
// field as unknown).
func natsSyncAlways(bin, dir string) bool {
	conf := filepath.Join(dir, "probe.conf")
	os.WriteFile(conf, []byte("listen: 127.0.0.1:-1\njetstream { store_dir: \""+filepath.Join(dir, "probe")+"\", sync_interval: always }\n"), 0o644)
	return exec.Command(bin, "-t", "-c", conf).Run() == nil
}

type natsTarget struct {
	p         *proc
	url       string
	pubNC     *nats.Conn
	subNC     *nats.Conn
	pub, sub  jetstream.JetStream
	pubErrors atomic.Int64
	prm       natsParams
}

// startNATS starts nats-server with JetStream on file storage in dir.
// syncAlways adds sync_interval: always (the fsync class), when the binary
// supports it.
func startNATS(ctx context.Context, bin, dir string, syncAlways bool, prm natsParams) (*natsTarget, error) {
	port, err := freeTCPPort()
	if err != nil {
		return nil, err
	}
	sync := ""
	if syncAlways {
		sync = ", sync_interval: always"
	}
	conf := filepath.Join(dir, "nats.conf")
	text := fmt.Sprintf("listen: 127.0.0.1:%d\njetstream { store_dir: %q%s }\n", port, filepath.Join(dir, "js"), sync)
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		return nil, err
	}
	p, _, err := startProc("nats-server", filepath.Join(dir, "nats.log"), false, bin, "-c", conf)
	if err != nil {
		return nil, err
	}
	t := &natsTarget{p: p, prm: prm}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := waitTCP(wctx, p, addr); err != nil {
		p.stop()
		return nil, err
	}
	url := "nats://" + addr
	t.url = url
	if t.pubNC, err = nats.Connect(url); err != nil {
		t.Close()
		return nil, err
	}
	if t.subNC, err = nats.Connect(url); err != nil {
		t.Close()
		return nil, err
	}
	if t.pub, err = t.newPublisher(t.pubNC, &t.pubErrors); err != nil {
		t.Close()
		return nil, err
	}
	if t.sub, err = jetstream.New(t.subNC); err != nil {
		t.Close()
		return nil, err
	}
	for _, s := range []string{"bench", "lat"} {
		_, err := t.sub.CreateStream(ctx, jetstream.StreamConfig{
			Name: "S_" + s, Subjects: []string{s}, Storage: jetstream.FileStorage, Replicas: 1,
		})
		if err != nil {
			t.Close()
			return nil, fmt.Errorf("create stream: %w", err)
		}
	}
	return t, nil
}

func (t *natsTarget) Proc() *proc { return t.p }

func (t *natsTarget) Close() {
	if t.pubNC != nil {
		t.pubNC.Close()
	}
	if t.subNC != nil {
		t.subNC.Close()
	}
	t.p.stop()
}

// newPublisher returns a JetStream context on nc for pipelined publishes,
// whose failed ones count in failed.
func (t *natsTarget) newPublisher(nc *nats.Conn, failed *atomic.Int64) (jetstream.JetStream, error) {
	return jetstream.New(nc,
		jetstream.WithPublishAsyncMaxPending(t.prm.maxPending),
		jetstream.WithPublishAsyncErrHandler(func(jetstream.JetStream, *nats.Msg, error) { failed.Add(1) }))
}

// publishAsync publishes up to count events to subject with js, pipelined,
// until ctx ends, and returns how many it sent (their acks may be
// outstanding).
func publishAsync(ctx context.Context, js jetstream.JetStream, subject string, count int) (int, error) {
	n := 0
	for n < count && ctx.Err() == nil {
		for range min(64, count-n) {
			_, err := js.PublishAsync(subject, payload)
			if errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
				continue // the pipeline is full: try again
			}
			if err != nil {
				return n, err
			}
			n++
		}
	}
	return n, nil
}

func (t *natsTarget) Publish(ctx context.Context, count int) (int, time.Duration, error) {
	t.pubErrors.Store(0)
	start := time.Now()
	n, err := publishAsync(ctx, t.pub, "bench", count)
	if err != nil {
		return n, 0, err
	}
	select {
	case <-t.pub.PublishAsyncComplete():
	case <-time.After(2 * time.Minute):
		return n, 0, errors.New("jetstream: publish acks missing after 2 min")
	}
	elapsed := time.Since(start)
	if e := t.pubErrors.Load(); e > 0 {
		return n - int(e), elapsed, fmt.Errorf("jetstream: %d publishes failed", e)
	}
	return n, elapsed, nil
}

// Flood publishes into a stream of its own as Publish does, on a
// connection of its own, until ctx ends; it returns the publishes
// acknowledged.
func (t *natsTarget) Flood(ctx context.Context) (int, error) {
	if _, err := t.sub.CreateStream(ctx, jetstream.StreamConfig{
		Name: "S_flood", Subjects: []string{"flood"}, Storage: jetstream.FileStorage, Replicas: 1,
	}); err != nil {
		return 0, fmt.Errorf("create stream: %w", err)
	}
	nc, err := nats.Connect(t.url)
	if err != nil {
		return 0, err
	}
	defer nc.Close()
	var failed atomic.Int64
	js, err := t.newPublisher(nc, &failed)
	if err != nil {
		return 0, err
	}
	n, err := publishAsync(ctx, js, "flood", math.MaxInt)
	if err != nil {
		return n - int(failed.Load()), nil
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(10 * time.Second):
	}
	return n - int(failed.Load()), nil
}

func (t *natsTarget) Consume(ctx context.Context, n int) (time.Duration, error) {
	cons, err := t.sub.CreateOrUpdateConsumer(ctx, "S_bench", jetstream.ConsumerConfig{
		Durable: "bench", AckPolicy: jetstream.AckExplicitPolicy, MaxAckPending: t.prm.maxAckPending,
	})
	if err != nil {
		return 0, err
	}
	done := make(chan error, 1)
	var count atomic.Int64
	start := time.Now()
	cc, err := cons.Consume(func(m jetstream.Msg) {
		switch c := count.Add(1); {
		case c < int64(n):
			m.Ack()
		case c == int64(n):
			// The last ack waits for the server's confirmation.
			done <- m.DoubleAck(ctx)
		}
	}, jetstream.PullMaxMessages(t.prm.pullBatch))
	if err != nil {
		return 0, err
	}
	defer cc.Stop()
	select {
	case err := <-done:
		return time.Since(start), err
	case <-time.After(5 * time.Minute):
		return 0, fmt.Errorf("jetstream: consumed %d of %d in 5 min", count.Load(), n)
	}
}

func (t *natsTarget) Latency(ctx context.Context, rate int, warm, d time.Duration) ([]time.Duration, float64, error) {
	cons, err := t.sub.CreateOrUpdateConsumer(ctx, "S_lat", jetstream.ConsumerConfig{
		Durable: "lat", AckPolicy: jetstream.AckExplicitPolicy,
	})
	if err != nil {
		return nil, 0, err
	}
	col := newLatencyCollector(rate, warm, d)
	cc, err := cons.Consume(func(m jetstream.Msg) {
		col.add(m.Data())
		m.Ack()
	})
	if err != nil {
		return nil, 0, err
	}
	defer cc.Stop()
	_, achieved, err := pace(ctx, rate, warm+d, func(i int, at time.Time) error {
		data := latencyPayload(i, at)
		for {
			_, err := t.pub.PublishAsync("lat", data)
			if !errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
				return err
			}
			// The pipeline is full (an fsync per message keeps it so):
			// wait like a blocking publisher would.
			if err := ctx.Err(); err != nil {
				return err
			}
		}
	})
	if err != nil {
		return nil, 0, err
	}
	lat, err := col.wait(ctx)
	return lat, achieved, err
}
