package h3x

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

// Close from the state handler's terminal report, with one ack queued:
// nothing can be sent (the client has failed for good), yet Close waited
// for the whole ack-flush budget (5 s), because c.fail runs only after the
// handler returns and awaitConn kept waiting for a connection.
func TestCloseFromTerminalReportDoesNotWaitForAcks(t *testing.T) {
	s := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var c *Client
	ready := make(chan struct{})
	took := make(chan time.Duration, 1)
	c, err := Dial(ctx, s.Addr().String(), WithCredentials("alice", "alice-token"), WithTrustedFingerprint(s.Fingerprint()),
		WithAckFlush(1000, time.Minute),
		WithMaxReconnects(1), WithBackoff(fastBackoff), WithDialTimeout(300*time.Millisecond), WithStateHandler(func(sc StateChange) {
			if sc.State == StateClosed && sc.Err != nil {
				<-ready
				start := time.Now()
				c.Close()
				took <- time.Since(start)
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	publishOrders(ctx, t, c, 1)
	ds, err := c.Fetch(ctx, 1, "orders")
	if err != nil || len(ds) != 1 {
		t.Fatal(err, len(ds))
	}
	if err := ds[0].Ack(); err != nil {
		t.Fatal(err)
	}
	close(ready)
	s.Close()
	select {
	case d := <-took:
		t.Logf("Close from the terminal report took %v", d)
		if d > 2*time.Second {
			t.Errorf("Close from the terminal report took %v for a client that can send nothing", d)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("no Close")
	}
}

// slowCloseQueue takes 200 ms to close (a final flush).
type slowCloseQueue struct {
	Queue
	closed atomic.Bool
}

func (q *slowCloseQueue) Close() error {
	time.Sleep(200 * time.Millisecond)
	err := q.Queue.Close()
	q.closed.Store(true)
	return err
}

// Shutdown with a ctx that has already ended (the signal context of a
// program, say) returned before the queue was closed: a program that exits
// after `defer srv.Shutdown(ctx)` (README, package doc, h3x-bench-server)
// left its Badger queue unclosed (no clean mark: the next open recounts).
// It now waits up to a second for the stop it began.
func TestShutdownWithEndedCtxClosesTheQueue(t *testing.T) {
	q := &slowCloseQueue{Queue: NewMemoryQueue(QueueOptions{})}
	s := testServer(t, WithQueue(q))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := s.Shutdown(ctx)
	t.Logf("Shutdown: %v", err)
	if !q.closed.Load() {
		t.Errorf("Shutdown returned before the queue was closed")
	}
}

// A client with WithMaxFrameSize(4096) asks for max_bytes 2048 (half its
// frame), assuming a batch's encoding is at most twice the events' §6.3
// sizes. Metadata-heavy events (short keys, empty values) encode at ~3x
// their counted size: the batch exceeded the client's frame and the fetch
// failed with ErrFrameTooLarge, though every event alone fits (~1.1 KiB).
// The server now cuts batches by an upper bound of their encoding.
func TestFetchBatchFitsClientFrameDespiteMetadata(t *testing.T) {
	s := testServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pub := mustDial(t, s, "alice", "alice-token")
	md := map[string]string{}
	for i := 0; i < 150; i++ {
		md[string(rune('a'+i%26))+string(rune('a'+i/26))] = ""
	}
	for range 10 {
		if _, err := pub.Publish(ctx, Event{Namespace: "orders", Metadata: md}); err != nil {
			t.Fatal(err)
		}
	}
	c := mustDial(t, s, "alice", "alice-token", WithMaxFrameSize(4096))
	ds, err := c.Fetch(ctx, 100, "orders")
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	t.Logf("fetched %d", len(ds))
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_ = sub
}

// settle cuts chunks to min(client, server) frame size; while the client
// was reconnecting, only the client's own limit (1 MiB) was used: acks
// flushed during a reconnect went as one AckEvent, which a 4 KiB server
// refused whole (FRAME_TOO_LARGE). The last server's limit is kept.
func TestAckChunksDuringReconnect(t *testing.T) {
	s := testServer(t, WithMaxFrameSize(4096))
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	slow := &ExponentialBackoff{Initial: time.Second, Max: time.Second, Multiplier: 1, NoJitter: true}
	c := mustDial(t, s, "alice", "alice-token", WithAckFlush(1000, time.Hour), WithBackoff(slow))
	publishCopies(ctx, t, c, 200, Event{Namespace: "orders"})
	var ds []*Delivery
	for len(ds) < 200 {
		got, err := c.Fetch(ctx, 200-len(ds), "orders")
		if err != nil {
			t.Fatal(err)
		}
		ds = append(ds, got...)
	}
	for _, d := range ds {
		if err := d.Ack(); err != nil {
			t.Fatal(err)
		}
	}
	s.DropConnections()
	for c.current() != nil && ctx.Err() == nil {
		time.Sleep(time.Millisecond)
	}
	if err := c.Flush(ctx); err != nil {
		t.Errorf("Flush of 200 acks sent during a reconnect: %v", err)
	}
}
