package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
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
	// PID is the server process's id, for its memory.
	PID() int
	// Publish publishes 256-byte events into the backlog subject for about
	// d with a pipelining publisher and returns how many were acknowledged
	// and the time until the last acknowledgement.
	Publish(ctx context.Context, d time.Duration) (n int, elapsed time.Duration, err error)
	// Consume consumes and acks n events of the backlog and returns the
	// time from the start of consumption to the last ack confirmed.
	Consume(ctx context.Context, n int) (time.Duration, error)
	// Latency publishes on a separate subject at rate events/s for warm+d
	// while a consumer receives and acks them, and returns the
	// publish→delivery latencies of the events sent after warm.
	Latency(ctx context.Context, rate int, warm, d time.Duration) ([]time.Duration, error)
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

// latencyPayload returns a fresh payload carrying its send time and
// sequence number in its first 16 bytes.
func latencyPayload(seq int) []byte {
	b := make([]byte, eventSize)
	copy(b, payload)
	binary.LittleEndian.PutUint64(b[8:], uint64(seq))
	binary.LittleEndian.PutUint64(b, uint64(time.Now().UnixNano()))
	return b
}

// latencyOf decodes a latency payload received now.
func latencyOf(b []byte) (lat time.Duration, seq int, ok bool) {
	if len(b) < 16 {
		return 0, 0, false
	}
	sent := int64(binary.LittleEndian.Uint64(b))
	return time.Duration(time.Now().UnixNano() - sent), int(binary.LittleEndian.Uint64(b[8:])), true
}

// pace calls send(i) for i = 0.. at rate per second for total, on
// schedule: a late send goes at once and does not shift the schedule.
func pace(ctx context.Context, rate int, total time.Duration, send func(i int) error) (int, error) {
	interval := time.Second / time.Duration(rate)
	n := int(total / interval)
	start := time.Now()
	for i := range n {
		if w := time.Until(start.Add(time.Duration(i) * interval)); w > 0 {
			time.Sleep(w)
		}
		if err := ctx.Err(); err != nil {
			return i, err
		}
		if err := send(i); err != nil {
			return i, err
		}
	}
	return n, nil
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

// wait waits for every event or a timeout after the last send.
func (c *latencyCollector) wait(ctx context.Context) []time.Duration {
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
	case <-ctx.Done():
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.lat)
}
