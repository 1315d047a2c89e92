package h3x_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
)

// A Fetch whose ctx ends while its answer is on the way (the server has
// leased the events and sent the batch) must not leave those events leased
// until their ack deadline: the client drops the batch unseen. PROTOCOL.md
// §5.2 gives the way out (reset the send side only, read the answers, nack
// them unseen), which Subscription uses and Fetch now does too.
func TestCancelledFetchDoesNotKeepEventsLeased(t *testing.T) {
	srv := newServer(t) // ack deadline: 30 s
	c := srv.Dial(t, as("alice"))
	ctx := ctxT(t)
	srv.SetLatency(400 * time.Millisecond) // every packet the server sends
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := c.Fetch(fctx, 10, "orders")
		errc <- err
	}()
	time.Sleep(600 * time.Millisecond) // the long poll is parked on the server
	if _, err := srv.Queue().Enqueue(ctx, []h3x.Event{{Namespace: "orders", Message: "in flight"}}); err != nil {
		t.Fatal(err)
	}
	// The server leases the event for the poll and sends the batch, which
	// takes 400 ms to arrive; the caller gives up before it does.
	for deadline := time.Now().Add(300 * time.Millisecond); ; time.Sleep(5 * time.Millisecond) {
		st, err := srv.Queue().Stats(ctx, "orders")
		if err != nil {
			t.Fatal(err)
		}
		if st[0].Leased == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the parked poll did not lease the event: %+v", st[0])
		}
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Fetch: %v, want context.Canceled", err)
	}
	srv.SetLatency(0)
	// The client never handed the delivery out: it should be ready again
	// at once (given back), not after the 30 s ack deadline.
	var st h3x.NamespaceStats
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		s, err := srv.Queue().Stats(ctx, "orders")
		if err != nil {
			t.Fatal(err)
		}
		if st = s[0]; st.Ready == 1 && st.Leased == 0 {
			return
		}
	}
	t.Fatalf("3 s after the Fetch was cancelled the event is still leased (stats %+v): nobody got it, and nobody will until its ack deadline", st)
}
