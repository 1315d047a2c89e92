package h3x

import (
	"context"
	"fmt"
	"testing"
	"time"
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
	if err := d.Ack(); err != errAlreadySettled {
		t.Fatalf("Delivery.Ack after Client.Ack: %v, want errAlreadySettled", err)
	}
}
