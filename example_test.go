package h3x_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/h3x-io/h3x"
)

// Every example starts its own broker on a random loopback port with an
// in-memory queue, and closes all it opens.

func ExampleNewServer() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// Client "app" may publish and consume namespace "orders".
	reg, err := h3x.ParseRegistry("app:orders=app-token")
	if err != nil {
		log.Fatal(err)
	}
	srv, err := h3x.NewServer(
		h3x.WithAddr("127.0.0.1:0"),
		h3x.WithRegistry(reg),
		// Without WithQueue, events go to a Badger queue in WithDataDir.
		h3x.WithQueue(h3x.NewMemoryQueue(h3x.QueueOptions{})),
		// Without TLS options, a self-signed development certificate.
	)
	if err != nil {
		log.Fatal(err)
	}
	if err := srv.Start(ctx); err != nil {
		log.Fatal(err)
	}

	// Clients pin the development certificate by its fingerprint.
	c, err := h3x.Dial(ctx, srv.Addr().String(),
		h3x.WithCredentials("app", "app-token"),
		h3x.WithTrustedFingerprint(srv.Fingerprint()),
	)
	if err != nil {
		log.Fatal(err)
	}
	if _, err := c.Publish(ctx, h3x.Event{Namespace: "orders", Message: "hello"}); err != nil {
		log.Fatal(err)
	}
	c.Close()

	stats, err := srv.Stats(ctx, "orders")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("ready in orders:", stats[0].Ready)

	// Shutdown drains: GoAway to clients, in-flight requests finish, then
	// the connections and the queue close.
	if err := srv.Shutdown(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("stopped")
	// Output:
	// ready in orders: 1
	// stopped
}

func ExampleDial() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reg, _ := h3x.ParseRegistry("app:orders=app-token, app:audit/pub=app-token")
	srv, err := h3x.NewServer(h3x.WithAddr("127.0.0.1:0"), h3x.WithRegistry(reg),
		h3x.WithQueue(h3x.NewMemoryQueue(h3x.QueueOptions{})))
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	if err := srv.Start(ctx); err != nil {
		log.Fatal(err)
	}
	addr := srv.Addr().String()

	// Dial connects and authenticates; after that the client reconnects
	// by itself when the connection is lost.
	c, err := h3x.Dial(ctx, addr,
		h3x.WithCredentials("app", "app-token"),
		h3x.WithTrustedFingerprint(srv.Fingerprint()),
	)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	fmt.Println("granted:", c.Granted())

	// Refused credentials fail Dial at once.
	_, err = h3x.Dial(ctx, addr,
		h3x.WithCredentials("app", "wrong-token"),
		h3x.WithTrustedFingerprint(srv.Fingerprint()),
	)
	fmt.Println("wrong token:", errors.Is(err, h3x.ErrUnauthenticated))
	// Output:
	// granted: [orders/all audit/pub]
	// wrong token: true
}

func ExampleClient_Publish() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reg, _ := h3x.ParseRegistry("app:orders=app-token")
	srv, err := h3x.NewServer(h3x.WithAddr("127.0.0.1:0"), h3x.WithRegistry(reg),
		h3x.WithQueue(h3x.NewMemoryQueue(h3x.QueueOptions{})))
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	if err := srv.Start(ctx); err != nil {
		log.Fatal(err)
	}
	c, err := h3x.Dial(ctx, srv.Addr().String(),
		h3x.WithCredentials("app", "app-token"), h3x.WithTrustedFingerprint(srv.Fingerprint()))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	// Publish returns one result per event once the stored ones are
	// durable. An ID of your own makes a retry safe: it is stored once.
	results, err := c.Publish(ctx,
		h3x.Event{ID: "order-1001-created", Namespace: "orders", Type: "order.created", Data: []byte(`{"order":1001}`)},
		h3x.Event{ID: "order-1001-created", Namespace: "orders", Type: "order.created", Data: []byte(`{"order":1001}`)},
		h3x.Event{Namespace: "billing", Type: "invoice.sent"}, // not granted
	)
	if err != nil {
		log.Fatal(err) // the whole call failed: ctx, closed client, ...
	}
	for _, r := range results {
		fmt.Print(r.Status)
		if r.Err != nil {
			fmt.Print(": permission denied = ", errors.Is(r.Err, h3x.ErrPermissionDenied))
		}
		fmt.Println()
	}
	// Output:
	// stored
	// duplicate
	// refused: permission denied = true
}

func ExampleClient_Subscribe() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reg, _ := h3x.ParseRegistry("app:orders=app-token")
	srv, err := h3x.NewServer(h3x.WithAddr("127.0.0.1:0"), h3x.WithRegistry(reg),
		h3x.WithQueue(h3x.NewMemoryQueue(h3x.QueueOptions{})))
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	if err := srv.Start(ctx); err != nil {
		log.Fatal(err)
	}
	c, err := h3x.Dial(ctx, srv.Addr().String(),
		h3x.WithCredentials("app", "app-token"), h3x.WithTrustedFingerprint(srv.Fingerprint()))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close() // also ends the subscription and flushes its acks

	for _, msg := range []string{"order 1 created", "order 2 created", "order 1 paid"} {
		if _, err := c.Publish(ctx, h3x.Event{Namespace: "orders", Message: msg}); err != nil {
			log.Fatal(err)
		}
	}

	// The subscription fetches in the background and hands deliveries out
	// on a channel it owns, in publish order. It ends with ctx, Close or a
	// terminal error (then see Err).
	sub, err := c.Subscribe(ctx, []string{"orders"}, h3x.SubscribeOptions{})
	if err != nil {
		log.Fatal(err)
	}
	n := 0
	for d := range sub.Events() {
		fmt.Printf("%s (attempt %d)\n", d.Event.Message, d.Attempt())
		d.Ack() // batched; an event not acked in time is delivered again
		if n++; n == 3 {
			break
		}
	}
	sub.Close()
	// Output:
	// order 1 created (attempt 1)
	// order 2 created (attempt 1)
	// order 1 paid (attempt 1)
}

func ExampleClient_Fetch() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reg, _ := h3x.ParseRegistry("app:orders=app-token")
	srv, err := h3x.NewServer(h3x.WithAddr("127.0.0.1:0"), h3x.WithRegistry(reg),
		h3x.WithQueue(h3x.NewMemoryQueue(h3x.QueueOptions{})))
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	if err := srv.Start(ctx); err != nil {
		log.Fatal(err)
	}
	c, err := h3x.Dial(ctx, srv.Addr().String(),
		h3x.WithCredentials("app", "app-token"), h3x.WithTrustedFingerprint(srv.Fingerprint()))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	if _, err := c.Publish(ctx,
		h3x.Event{Namespace: "orders", Message: "order 1 created"},
		h3x.Event{Namespace: "orders", Message: "order 2 created"},
	); err != nil {
		log.Fatal(err)
	}

	// Fetch waits for events (up to ctx) and leases up to 10 of them.
	ds, err := c.Fetch(ctx, 10, "orders")
	if err != nil {
		log.Fatal(err)
	}
	for _, d := range ds {
		fmt.Printf("%s (attempt %d)\n", d.Event.Message, d.Attempt())
	}
	// Ack the first; hand the second back, as after a failure.
	if _, err := c.Ack(ctx, ds[0]); err != nil {
		log.Fatal(err)
	}
	if _, err := c.Nack(ctx, 0, "payment service down", ds[1]); err != nil {
		log.Fatal(err)
	}

	// It comes again, with the next attempt number.
	ds, err = c.Fetch(ctx, 10, "orders")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s (attempt %d)\n", ds[0].Event.Message, ds[0].Attempt())
	res, err := c.Ack(ctx, ds...)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("ack:", res[0].Status)
	// Output:
	// order 1 created (attempt 1)
	// order 2 created (attempt 1)
	// order 2 created (attempt 2)
	// ack: ok
}
