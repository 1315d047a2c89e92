// Package embeddedtest shows how to test your own code against a real H3X
// broker started inside the test by h3xtest.NewServer: a random loopback
// port, an in-memory queue, stopped by t.Cleanup, with fault hooks to
// restart it or drop its connections.
//
// The code under test here is a small order service: Notifier publishes
// order events and Worker consumes them. Its tests are in orders_test.go;
// run them with
//
//	go test ./examples/embedded-test
package embeddedtest

import (
	"context"
	"time"

	"github.com/h3x-io/h3x"
)

// Namespace is where order events go.
const Namespace = "orders"

// Notifier publishes order events.
type Notifier struct {
	Client *h3x.Client
}

// OrderCreated publishes that order id was created. The event ID is derived
// from the order, so a retried call is stored once.
func (n Notifier) OrderCreated(ctx context.Context, id string) error {
	res, err := n.Client.Publish(ctx, h3x.Event{
		ID:        "order-" + id + "-created",
		Namespace: Namespace,
		Type:      "order.created",
		Message:   "order " + id + " created",
		Data:      []byte(`{"order":"` + id + `"}`),
	})
	if err != nil {
		return err
	}
	return res[0].Err // nil when stored or a duplicate
}

// Worker handles order events.
type Worker struct {
	Client *h3x.Client
	// Handle does the work for one event. An error hands the event back,
	// to be delivered again after RetryDelay.
	Handle     func(ctx context.Context, d *h3x.Delivery) error
	RetryDelay time.Duration
}

// Run handles events until ctx ends. Delivery is at least once, so Handle
// may see an event again (after a crash, a lost ack, a failed attempt).
func (w *Worker) Run(ctx context.Context) error {
	sub, err := w.Client.Subscribe(ctx, []string{Namespace}, h3x.SubscribeOptions{})
	if err != nil {
		return err
	}
	defer sub.Close()
	for d := range sub.Events() {
		if err := w.Handle(ctx, d); err != nil {
			d.Nack(w.RetryDelay)
			continue
		}
		d.Ack()
	}
	return sub.Err()
}
