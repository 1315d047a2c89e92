// Consumer receives events from a running H3X server, prints each one and
// acks it.
//
// Start a server and publish some events first (see ../producer):
//
//	H3X_REGISTRY='demo:orders=demo-token' go run ./cmd/h3x serve
//	go run ./examples/producer -client demo -token demo-token -fingerprint <sha256> -count 10
//
// then consume them:
//
//	go run ./examples/consumer -client demo -token demo-token -fingerprint <sha256> -max 10
//
// Without -max it runs until Ctrl-C. Credentials and TLS flags are the
// producer's: -client/-token or H3X_CLIENT_ID/H3X_TOKEN, and one of
// -fingerprint, -ca or -insecure.
//
// It prints one line per delivery and a summary:
//
//	delivered 6f1c…-… orders order.created attempt 1: order 1 of 3
//	delivered 1b0e…-… orders order.created attempt 1: order 2 of 3
//	delivered 93d4…-… orders order.created attempt 1: order 3 of 3
//	consumed 3 events
//
// Delivery is at least once: an event this consumer received but did not
// ack (it crashed, or lost its connection before the ack got through) is
// delivered again, with a higher attempt number.
package main

import (
	"context"
	"crypto/x509"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/h3x-io/h3x"
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("consumer: ")

	addr := flag.String("addr", h3x.DefaultAddr, "server address (host:port)")
	clientID := flag.String("client", os.Getenv("H3X_CLIENT_ID"), "client id (default $H3X_CLIENT_ID)")
	token := flag.String("token", os.Getenv("H3X_TOKEN"), "token (default $H3X_TOKEN)")
	fingerprint := flag.String("fingerprint", "", "trust exactly the server certificate with this SHA-256 (hex)")
	caFile := flag.String("ca", "", "verify the server against the CA certificates in this PEM file")
	insecure := flag.Bool("insecure", false, "trust any server certificate (development only)")
	namespaces := flag.String("namespace", "orders", "namespaces to consume, comma-separated")
	maxEvents := flag.Int("max", 0, "stop after this many events (0: run until interrupted)")
	flag.Parse()

	if *clientID == "" || *token == "" {
		log.Fatal("credentials required: -client and -token, or H3X_CLIENT_ID and H3X_TOKEN")
	}
	if *maxEvents < 0 {
		log.Fatal("-max must not be negative")
	}
	opts := []h3x.ClientOption{h3x.WithCredentials(*clientID, *token)}
	tlsOpts, err := trust(*fingerprint, *caFile, *insecure)
	if err != nil {
		log.Fatal(err)
	}
	opts = append(opts, tlsOpts...)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *addr, opts, strings.Split(*namespaces, ","), *maxEvents); err != nil {
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

func run(ctx context.Context, addr string, opts []h3x.ClientOption, namespaces []string, maxEvents int) error {
	dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := h3x.Dial(dialCtx, addr, opts...)
	if err != nil {
		return fmt.Errorf("connecting to %s: %w", addr, err)
	}
	// Close flushes the acks still batched and closes the connection.
	defer c.Close()

	// With -max, lease no more than that, so nothing is left leased (and
	// handed back) when the consumer stops.
	var subOpts h3x.SubscribeOptions
	if maxEvents > 0 && maxEvents < h3x.DefaultMaxUnacked {
		subOpts.MaxUnacked = maxEvents
	}
	// The subscription ends when ctx does (Ctrl-C): its channel closes.
	sub, err := c.Subscribe(ctx, namespaces, subOpts)
	if err != nil {
		return err
	}
	defer sub.Close()

	n := 0
	for d := range sub.Events() {
		e := d.Event
		fmt.Printf("delivered %s %s %s attempt %d: %s\n", e.ID, e.Namespace, e.Type, d.Attempt(), e.Message)
		// Handle the event here, then ack it. An event not acked before
		// its lease deadline is delivered again; d.Nack(delay) hands it
		// back at once.
		if err := d.Ack(); err != nil {
			return err
		}
		n++
		if n == maxEvents {
			break
		}
	}
	if err := sub.Err(); err != nil {
		return err
	}
	if ctx.Err() != nil {
		fmt.Printf("interrupted; consumed %d events\n", n)
		return nil
	}
	fmt.Printf("consumed %d events\n", n)
	return nil
}
