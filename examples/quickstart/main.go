// Quickstart runs the whole H3X loop in one process: it embeds a broker
// that stores events in Badger, connects a client, publishes three events,
// fetches them, acks them, and shuts everything down.
//
//	go run ./examples/quickstart
//
// It prints (ids vary):
//
//	published 3 events
//	delivered 0f6c…-… order.created attempt 1: order 1001 created
//	delivered 5a2e…-… order.paid attempt 1: order 1001 paid
//	delivered c81d…-… order.shipped attempt 1: order 1001 shipped
//	acked 3 events
//	orders: 0 ready, 0 leased
//	server stopped
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/h3x-io/h3x"
)

func main() {
	log.SetFlags(0)
	if err := run(); err != nil {
		log.Fatal("quickstart: ", err)
	}
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// The Badger queue lives in a directory of its own; a throwaway one
	// here, so every run starts empty.
	dir, err := os.MkdirTemp("", "h3x-quickstart-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	// Who may connect: client "quickstart" may publish and consume
	// namespace "orders" with token "quickstart-token". A real deployment
	// reads this from H3X_REGISTRY or a file (LoadRegistryFile).
	reg, err := h3x.ParseRegistry("quickstart:orders=quickstart-token")
	if err != nil {
		return err
	}

	// No TLS configuration: the server makes a self-signed development
	// certificate, which the client below pins by its fingerprint. No
	// logger: the server is silent.
	srv, err := h3x.NewServer(
		h3x.WithDataDir(dir),
		h3x.WithRegistry(reg),
		h3x.WithAddr("127.0.0.1:0"),
	)
	if err != nil {
		return err
	}
	defer srv.Close() // a no-op after the Shutdown below
	if err := srv.Start(ctx); err != nil {
		return err
	}

	c, err := h3x.Dial(ctx, srv.Addr().String(),
		h3x.WithCredentials("quickstart", "quickstart-token"),
		h3x.WithTrustedFingerprint(srv.Fingerprint()),
	)
	if err != nil {
		return err
	}
	defer c.Close()

	// Publish returns once every event is durable in the queue.
	events := []h3x.Event{
		{Namespace: "orders", Type: "order.created", Message: "order 1001 created", Data: []byte(`{"order":1001,"total":"42.00"}`)},
		{Namespace: "orders", Type: "order.paid", Message: "order 1001 paid"},
		{Namespace: "orders", Type: "order.shipped", Message: "order 1001 shipped", Metadata: map[string]string{"carrier": "ups"}},
	}
	results, err := c.Publish(ctx, events...)
	if err != nil {
		return err
	}
	for _, r := range results {
		if r.Status == h3x.PublishRefused {
			return fmt.Errorf("event %s refused: %w", r.ID, r.Err)
		}
	}
	fmt.Printf("published %d events\n", len(results))

	// Fetch leases the events to this client: nobody else gets them until
	// they are acked, nacked, or the lease runs out.
	var deliveries []*h3x.Delivery
	for len(deliveries) < len(events) {
		ds, err := c.Fetch(ctx, len(events)-len(deliveries), "orders")
		if err != nil {
			return err
		}
		for _, d := range ds {
			fmt.Printf("delivered %s %s attempt %d: %s\n", d.Event.ID, d.Event.Type, d.Attempt(), d.Event.Message)
		}
		deliveries = append(deliveries, ds...)
	}

	// Ack removes them for good. Unacked events would be delivered again,
	// even after a restart.
	acked, err := c.Ack(ctx, deliveries...)
	if err != nil {
		return err
	}
	n := 0
	for _, r := range acked {
		if r.Status == h3x.SettleOK {
			n++
		}
	}
	fmt.Printf("acked %d events\n", n)

	stats, err := srv.Stats(ctx, "orders")
	if err != nil {
		return err
	}
	for _, s := range stats {
		fmt.Printf("%s: %d ready, %d leased\n", s.Namespace, s.Ready, s.Leased)
	}

	// Close the client, then drain the server: Shutdown sends GoAway, lets
	// requests in flight finish and closes the queue.
	c.Close()
	if err := srv.Shutdown(ctx); err != nil {
		return err
	}
	fmt.Println("server stopped")
	return nil
}
