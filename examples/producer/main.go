// Producer publishes events to a running H3X server.
//
// Start a server first, with a registry (client:namespace=token entries)
// that lets this client publish:
//
//	H3X_REGISTRY='demo:orders=demo-token' go run ./cmd/h3x serve
//
// Without TLS files it makes a self-signed development certificate and logs
// its fingerprint (sha256=...). Any program that embeds h3x.NewServer works
// the same way (see ../quickstart). Then publish ten events, pinning that
// certificate:
//
//	go run ./examples/producer -client demo -token demo-token -fingerprint <sha256> -count 10
//
// Credentials can come from H3X_CLIENT_ID and H3X_TOKEN instead of flags.
// For TLS, pass exactly one of -fingerprint (pin a self-signed certificate),
// -ca (a PEM file of CA certificates) or -insecure (trust anything; for
// development only); with none, the system roots verify the server.
//
// It prints one line per event and a summary:
//
//	published 6f1c…-… orders order.created: order 1 of 3
//	published 1b0e…-… orders order.created: order 2 of 3
//	published 93d4…-… orders order.created: order 3 of 3
//	published 3 events (3 stored, 0 duplicates)
package main

import (
	"context"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/h3x-io/h3x"
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("producer: ")

	addr := flag.String("addr", h3x.DefaultAddr, "server address (host:port)")
	clientID := flag.String("client", os.Getenv("H3X_CLIENT_ID"), "client id (default $H3X_CLIENT_ID)")
	token := flag.String("token", os.Getenv("H3X_TOKEN"), "token (default $H3X_TOKEN)")
	fingerprint := flag.String("fingerprint", "", "trust exactly the server certificate with this SHA-256 (hex)")
	caFile := flag.String("ca", "", "verify the server against the CA certificates in this PEM file")
	insecure := flag.Bool("insecure", false, "trust any server certificate (development only)")
	namespace := flag.String("namespace", "orders", "namespace to publish to")
	eventType := flag.String("type", "order.created", "event type")
	count := flag.Int("count", 10, "number of events to publish")
	flag.Parse()

	if *clientID == "" || *token == "" {
		log.Fatal("credentials required: -client and -token, or H3X_CLIENT_ID and H3X_TOKEN")
	}
	if *count < 1 {
		log.Fatal("-count must be at least 1")
	}
	opts := []h3x.ClientOption{h3x.WithCredentials(*clientID, *token)}
	tlsOpts, err := trust(*fingerprint, *caFile, *insecure)
	if err != nil {
		log.Fatal(err)
	}
	opts = append(opts, tlsOpts...)

	// Ctrl-C stops a publish that waits for a server coming back.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *addr, opts, *namespace, *eventType, *count); err != nil {
		stop()
		log.Fatal(err)
	}
}

// trust turns the TLS flags into client options.
func trust(fingerprint, caFile string, insecure bool) ([]h3x.ClientOption, error) {
	var opts []h3x.ClientOption
	if fingerprint != "" {
		opts = append(opts, h3x.WithTrustedFingerprint(fingerprint))
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s holds no PEM certificate", caFile)
		}
		opts = append(opts, h3x.WithRootCAs(pool))
	}
	if insecure {
		opts = append(opts, h3x.WithInsecureSkipVerify())
	}
	return opts, nil // Dial reports conflicting choices
}

func run(ctx context.Context, addr string, opts []h3x.ClientOption, namespace, eventType string, count int) error {
	dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := h3x.Dial(dialCtx, addr, opts...)
	if err != nil {
		return fmt.Errorf("connecting to %s: %w", addr, err)
	}
	defer c.Close()

	events := make([]h3x.Event, count)
	for i := range events {
		events[i] = h3x.Event{
			Namespace: namespace,
			Type:      eventType,
			Message:   fmt.Sprintf("order %d of %d", i+1, count),
			Data:      fmt.Appendf(nil, `{"n":%d}`, i+1),
			Metadata:  map[string]string{"source": "producer"},
		}
	}
	// One call publishes them all: the client splits the batch to the
	// server's limits and waits out rate limits. It returns when every
	// event is durable, or refused for good.
	pubCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	results, err := c.Publish(pubCtx, events...)
	if err != nil {
		return err
	}
	var stored, dups int
	var refused []error
	for i, r := range results {
		switch r.Status {
		case h3x.PublishStored:
			stored++
		case h3x.PublishDuplicate:
			dups++
		default:
			refused = append(refused, fmt.Errorf("event %d (%s): %w", i+1, r.ID, r.Err))
			continue
		}
		fmt.Printf("published %s %s %s: %s\n", r.ID, namespace, eventType, events[i].Message)
	}
	fmt.Printf("published %d events (%d stored, %d duplicates)\n", stored+dups, stored, dups)
	return errors.Join(refused...)
}
