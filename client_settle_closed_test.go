package h3x

import (
	"context"
	"errors"
	"testing"
	"time"
)

// Close's doc: "Calls made afterwards return ErrClosed." Since f4543c2,
// settle answers a delivery whose ID is not valid UTF-8 SettleUnknown
// itself and sends nothing when no other delivery is left: Client.Ack,
// Nack and Extend of such deliveries succeed on a closed client (and with
// a context already ended), without ever looking at the client.
func TestSettleUnencodableAfterClose(t *testing.T) {
	s := testServer(t)
	c := mustDial(t, s, "alice", "alice-token")
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	bad := &Delivery{Event: Event{ID: "id-\xff", Namespace: "orders"}}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	// A valid delivery, for comparison: ErrClosed.
	if _, err := c.Ack(ctx, &Delivery{Event: Event{ID: "ok", Namespace: "orders"}}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Ack of a valid delivery after Close: %v, want ErrClosed", err)
	}
	res, err := c.Ack(ctx, bad)
	if !errors.Is(err, ErrClosed) {
		t.Errorf("Ack of a non-UTF-8 delivery after Close: %+v, %v; want ErrClosed", res, err)
	}
	done, cancelDone := context.WithCancel(context.Background())
	cancelDone()
	if res, err := c.Extend(done, time.Second, bad); err == nil {
		t.Errorf("Extend with an ended ctx on a closed client: %+v, nil; want an error", res)
	}
}
