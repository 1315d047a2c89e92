// Command h3x-scale-probe is the "new client" of the harness's scale test
// (see ../../scale.go), in a process of its own: it connects to an H3X
// server, publishes -n 256-byte events one after another and prints each
// publish's round trip in nanoseconds, one per line. Running it apart from
// the harness keeps the garbage collector and scheduler of the harness's
// thousands of idle clients out of its measurements.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/h3x-io/h3x"
)

func main() {
	addr := flag.String("addr", "", "server address")
	fp := flag.String("fp", "", "server certificate fingerprint")
	n := flag.Int("n", 1000, "sequential publishes")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("h3x-scale-probe: ")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	c, err := h3x.Dial(ctx, *addr, h3x.WithCredentials("bench", "bench-token"),
		h3x.WithTrustedFingerprint(*fp), h3x.WithMaxReconnects(1))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	fmt.Printf("dial %d\n", time.Since(start))
	data := make([]byte, 256)
	for range *n {
		t0 := time.Now()
		if _, err := c.Publish(ctx, h3x.Event{Namespace: "scale", Type: "bench", Data: data}); err != nil {
			log.Fatal(err)
		}
		fmt.Println(time.Since(t0).Nanoseconds())
	}
	os.Stdout.Sync()
}
