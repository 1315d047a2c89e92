package h3x

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/h3x-io/h3x/proto/h3xpb"
	"github.com/quic-go/quic-go"
)

// A Fetch the server refuses (PERMISSION_DENIED: the stream continues, as
// PROTOCOL.md §5.2 says) must not leave its stream open: after as many
// refused fetches as the server's stream limit, a permitted Fetch still works.
func TestRefusedFetchesDoNotExhaustStreams(t *testing.T) {
	s := testServer(t) // DefaultMaxStreams (100) per connection
	c := mustDial(t, s, "bob", "bob-token")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := range DefaultMaxStreams {
		one, cancel1 := context.WithTimeout(ctx, 2*time.Second)
		_, err := c.Fetch(one, 1, "audit")
		cancel1()
		if !errors.Is(err, ErrPermissionDenied) {
			t.Fatalf("refused fetch %d: %v (want permission denied: the earlier refused fetches' streams are still open)", i, err)
		}
	}
	short, cancel2 := context.WithTimeout(ctx, 2*time.Second)
	defer cancel2()
	pub := mustDial(t, s, "alice", "alice-token")
	if _, err := pub.Publish(ctx, Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	ds, err := c.Fetch(short, 1, "orders")
	if err != nil || len(ds) != 1 {
		t.Fatalf("a permitted Fetch after refused ones: %v (%d deliveries): the refused fetches' streams are still open", err, len(ds))
	}
}

// A GoAway carrying reconnect_after_ms asks the client to wait that long
// before reconnecting (PROTOCOL.md §3.4, §5.1 step 3: "SHOULD ... reconnect
// ... no sooner than reconnect_after_ms later"); the client used to ignore
// it and reconnect at once.
func TestGoAwayReconnectAfterIsHonoured(t *testing.T) {
	ln := fakeListener(t, 0)
	const hint = 1500 * time.Millisecond
	var sentAt time.Time
	second := make(chan time.Time, 1)
	done := make(chan struct{})
	var conns []*quic.Conn
	var mu sync.Mutex
	go func() {
		defer close(done)
		for i := 0; i < 2; i++ {
			qc, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, qc)
			mu.Unlock()
			if i == 1 {
				second <- time.Now()
				return
			}
			ctrl, err := fakeAuth(qc)
			if err != nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
			b, _ := appendFrame(nil, FrameGoAway, &h3xpb.GoAway{Reason: "restart", ReconnectAfterMs: uint32(hint / time.Millisecond)})
			sentAt = time.Now()
			ctrl.Write(b)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		mu.Lock()
		for _, qc := range conns {
			qc.CloseWithError(0, "")
		}
		mu.Unlock()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, ln.Addr().String(), WithCredentials("alice", "x"), WithInsecureSkipVerify(), WithBackoff(fastBackoff))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case at := <-second:
		if gap := at.Sub(sentAt); gap < hint*3/4 {
			t.Fatalf("reconnected %v after a GoAway asking for %v", gap.Round(time.Millisecond), hint)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no reconnect")
	}
}

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
