package h3x

import (
	"context"
	"fmt"
	"testing"
	"time"
	"unsafe"
)

// Regression (chaos suite): a subscriber that settled its deliveries with
// the synchronous Client.Ack never got its subscription credit back, so the
// subscription stalled for good after MaxUnacked deliveries.
func TestSyncAckReleasesSubscriptionCredit(t *testing.T) {
	srv := testServer(t)
	c := mustDial(t, srv, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	const n = 10
	for i := range n {
		if _, err := c.Publish(ctx, Event{Namespace: "orders", Message: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	for i := range n {
		var d *Delivery
		select {
		case d = <-sub.Events():
		case <-time.After(3 * time.Second):
			t.Fatalf("delivery %d of %d did not come: the subscription stalled", i+1, n)
		}
		switch i % 2 {
		case 0:
			res, err := c.Ack(ctx, d)
			if err != nil || res[0].Status != SettleOK {
				t.Fatalf("Ack: %v %v", res, err)
			}
		case 1:
			// Nack, then ack the redelivery later: also frees the credit.
			if _, err := c.Nack(ctx, 0, "again", d); err != nil {
				t.Fatal(err)
			}
		}
	}
	// A delivery settled synchronously counts as settled.
	if _, err := c.Publish(ctx, Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	d := <-sub.Events()
	if _, err := c.Ack(ctx, d); err != nil {
		t.Fatal(err)
	}
	if err := d.Ack(); err != ErrAlreadySettled {
		t.Fatalf("Delivery.Ack after Client.Ack: %v, want ErrAlreadySettled", err)
	}
}

// TestFailedSyncAckReleasesSubscriptionCredit: a Client.Ack or Client.Nack
// that fails (here its context has ended) used to keep the subscription's
// credit for its deliveries, so with MaxUnacked failed settlements (an
// outage) the subscription stalled for good. The deliveries now count as
// settled whatever the outcome; a second Client.Ack retries the ack.
func TestFailedSyncAckReleasesSubscriptionCredit(t *testing.T) {
	c, ctx := aliceWithOrders(t, 3)
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{MaxUnacked: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	ended, endNow := context.WithCancel(ctx)
	endNow()
	next := func(i int) *Delivery {
		t.Helper()
		select {
		case d := <-sub.Events():
			return d
		case <-time.After(5 * time.Second):
			t.Fatalf("delivery %d did not come: the subscription stalled", i)
			return nil
		}
	}
	d := next(1)
	if _, err := c.Ack(ended, d); err == nil {
		t.Fatal("Ack with an ended context succeeded")
	}
	d2 := next(2) // its credit came back
	if _, err := c.Nack(ended, 0, "r", d2); err == nil {
		t.Fatal("Nack with an ended context succeeded")
	}
	next(3)
	// Retrying the failed ack still applies it.
	if res, err := c.Ack(ctx, d); err != nil || res[0].Status != SettleOK {
		t.Fatalf("retried Ack: %v %v", res, err)
	}
}

// TestSettleResultsKeepNoAnswer: Client.Ack's results name their
// deliveries with the deliveries' own ID strings, not the answer's echoed
// IDs (which share one copy of the answer's frame).
func TestSettleResultsKeepNoAnswer(t *testing.T) {
	c, ctx := aliceWithOrders(t, 3)
	ds, err := c.Fetch(ctx, 3, "orders")
	if err != nil || len(ds) != 3 {
		t.Fatalf("Fetch: %d deliveries, %v", len(ds), err)
	}
	res, err := c.Ack(ctx, ds...)
	if err != nil || len(res) != 3 {
		t.Fatalf("Ack: %v, %v", res, err)
	}
	for i, r := range res {
		if r.Status != SettleOK || r.ID != ds[i].Event.ID {
			t.Fatalf("result %d: %+v for %s", i, r, ds[i].Event.ID)
		}
		if unsafe.StringData(r.ID) != unsafe.StringData(ds[i].Event.ID) {
			t.Fatalf("result %d's ID is not the delivery's string", i)
		}
	}
}

// aliceWithOrders starts a server, dials it as alice and publishes n events
// to "orders"; the context ends with the test (at most 10 s).
func aliceWithOrders(t *testing.T, n int) (*Client, context.Context) {
	t.Helper()
	c := mustDial(t, testServer(t), "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	publishOrders(ctx, t, c, n)
	return c, ctx
}
