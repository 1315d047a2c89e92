package h3x

import (
	"context"
	"testing"
	"time"
)

// A Fetch whose ctx has already ended used to take an idle fetch stream
// from the pool; the write was refused before anything was sent
// (writeCtx), and fetchCall neither put the stream back nor reset it. Each
// such call stranded one open stream until the server's stream limit was
// reached and every new stream of the connection hung (RELIABILITY.md
// finding 110, a review of finding 90's fix).
func TestCancelledFetchDoesNotLeakPooledStream(t *testing.T) {
	s := testServer(t) // DefaultMaxStreams (100) per connection
	c := mustDial(t, s, "bob", "bob-token")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pub := mustDial(t, s, "alice", "alice-token")
	evs := make([]Event, DefaultMaxStreams+5)
	for i := range evs {
		evs[i] = Event{Namespace: "orders"}
	}
	if _, err := pub.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
	dead, cancelDead := context.WithCancel(ctx)
	cancelDead()
	for i := range DefaultMaxStreams + 5 {
		// An answered fetch puts its stream in the idle pool.
		one, cancel1 := context.WithTimeout(ctx, 2*time.Second)
		ds, err := c.Fetch(one, 1, "orders")
		cancel1()
		if err != nil || len(ds) != 1 {
			t.Fatalf("fetch %d: %v (%d deliveries): the cancelled fetches' streams are still open", i, err, len(ds))
		}
		// A fetch whose ctx has ended takes it.
		if _, err := c.Fetch(dead, 1, "orders"); err == nil {
			t.Fatalf("fetch with an ended ctx succeeded")
		}
	}
}
