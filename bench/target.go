package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"time"
)

// class is a durability class: H3X and each peer run in a configuration of
// matching durability.
type class int

const (
	// crashSafe survives a process crash (kill -9), not power loss: H3X
	// DurabilityNoSync, JetStream's default (fsync every 2 min), Redis AOF
	// appendfsync everysec.
	crashSafe class = iota
	// fsyncAck fsyncs before acknowledging a publish: H3X DurabilityFsync
	// (group commit), JetStream sync_interval always, Redis AOF appendfsync
	// always.
	fsyncAck
)

func (c class) String() string {
	if c == crashSafe {
		return "process-crash-safe"
	}
	return "fsync before ack"
}

// target is one system under test, started fresh for one run: its server
// process and the clients the harness holds to it.
type target interface {
	// Proc is the server process: its id, for its memory and CPU, and its
	// end (a run stops at once if the server dies).
	Proc() *proc
	// Publish publishes n 256-byte events into the backlog subject with a
	// pipelining publisher and returns how many were acknowledged and the
	// time until the last acknowledgement. (A fixed count, not a fixed
	// time: every system then holds the same backlog for the consume and
	// latency phases and the memory figures.)
	Publish(ctx context.Context, n int) (stored int, elapsed time.Duration, err error)
	// Consume consumes and acks n events of the backlog and returns the
	// time from the start of consumption to the last ack confirmed.
	Consume(ctx context.Context, n int) (time.Duration, error)
	// Latency publishes on a separate subject at rate events/s for warm+d
	// while a consumer receives and acks them, and returns the
	// publish→delivery latencies of the events sent after warm, and the
	// rate the publisher achieved (see pace).
	Latency(ctx context.Context, rate int, warm, d time.Duration) ([]time.Duration, float64, error)
	// Flood publishes into a namespace of its own at full speed, on
	// connections of its own, until ctx ends, and returns how many events
	// were stored (the fairness comparison, fairness.go).
	Flood(ctx context.Context) (int, error)
	// Close closes the clients and stops the server.
	Close()
}

// eventSize is the payload size of every event in every system.
const eventSize = 256

// payload is the body of the throughput runs: random, so that nothing
// compresses it.
var payload = func() []byte {
	b := make([]byte, eventSize)
	rand.Read(b)
	return b
}()

// clockBase is the origin of the latency payloads' timestamps: the
// publisher and the consumer are in this process, so a monotonic clock.
var clockBase = time.Now()

// latencyPayload returns a fresh payload carrying its scheduled send time
// (at) and sequence number in its first 16 bytes. The latency is measured
// from the schedule, not from the moment the event actually went out: a
// publisher that falls behind (one that waits for each reply) sees its
// delay counted instead of hidden (coordinated omission).
func latencyPayload(seq int, at time.Time) []byte {
	b := make([]byte, eventSize)
	copy(b, payload)
	binary.LittleEndian.PutUint64(b[8:], uint64(seq))
	binary.LittleEndian.PutUint64(b, uint64(at.Sub(clockBase)))
	return b
}

// latencyOf decodes a latency payload received now.
func latencyOf(b []byte) (lat time.Duration, seq int, ok bool) {
	if len(b) < 16 {
		return 0, 0, false
	}
	sent := time.Duration(binary.LittleEndian.Uint64(b))
	return time.Since(clockBase) - sent, int(binary.LittleEndian.Uint64(b[8:])), true
}

// pace calls send(i, at) for i = 0.. at rate per second for total, each at
// its scheduled time at: a late send goes at once and does not shift the
// schedule. It returns the sends made and the rate achieved. A system whose
// publisher cannot keep up (a JetStream that fsyncs every message, say)
// falls behind: the run goes on, its latencies count from the scheduled
// times (so the lag is in them), and the report shows the rate achieved.
func pace(ctx context.Context, rate int, total time.Duration, send func(i int, at time.Time) error) (int, float64, error) {
	interval := time.Second / time.Duration(rate)
	n := int(total / interval)
	start := time.Now()
	for i := range n {
		at := start.Add(time.Duration(i) * interval)
		if w := time.Until(at); w > 0 {
			time.Sleep(w)
		}
		if err := ctx.Err(); err != nil {
			return i, 0, err
		}
		if err := send(i, at); err != nil {
			return i, 0, err
		}
	}
	return n, float64(n) / time.Since(start).Seconds(), nil
}

// latencyCollector gathers the latencies of events sent after the warm-up.
type latencyCollector struct {
	mu           sync.Mutex
	warmN, total int
	got          int
	lat          []time.Duration
	done         chan struct{}
}

func newLatencyCollector(rate int, warm, d time.Duration) *latencyCollector {
	interval := time.Second / time.Duration(rate)
	return &latencyCollector{
		warmN: int(warm / interval),
		total: int((warm + d) / interval),
		lat:   make([]time.Duration, 0, int(d/interval)),
		done:  make(chan struct{}),
	}
}

// add records one received payload; it is called from one goroutine.
func (c *latencyCollector) add(b []byte) {
	lat, seq, ok := latencyOf(b)
	if !ok {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if seq >= c.warmN {
		c.lat = append(c.lat, lat)
	}
	c.got++
	if c.got == c.total { // duplicates (redeliveries) may push got past total
		close(c.done)
	}
}

// wait waits for every event or a timeout after the last send. It fails if
// a sample is missing (an event lost, or a publish that failed).
func (c *latencyCollector) wait(ctx context.Context) ([]time.Duration, error) {
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
	case <-ctx.Done():
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if want := c.total - c.warmN; len(c.lat) < want {
		return nil, fmt.Errorf("latency: %d samples of %d received", len(c.lat), want)
	}
	return slices.Clone(c.lat), nil
}
