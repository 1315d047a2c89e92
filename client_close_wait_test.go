package h3x

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// A Publish waiting out a rate limit's retry-after returns ErrClosed when
// the client is closed, not when the wait ends (it used to sleep the whole
// retry-after, 10 s here, through Close).
func TestPublishWaitingOutRateLimitEndsAtClose(t *testing.T) {
	s := testServer(t, WithRateLimit("orders", RateLimit{Rate: 0.1, Burst: 1}))
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := c.Publish(ctx, Event{Namespace: "orders"}) // over the limit: waits ~10 s
		errc <- err
	}()
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	c.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("Publish after Close: %v, want ErrClosed", err)
		}
		if took := time.Since(start); took > 2*time.Second {
			t.Fatalf("Publish returned %v after Close", took)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Publish still waiting out its retry-after 5 s after Close")
	}
}

// A Ping in flight when the client closes returns ErrClosed, not the QUIC
// connection's error (a minor issue the client review listed). The server
// here authenticates the client and then never answers.
func TestPingInFlightAtCloseReturnsErrClosed(t *testing.T) {
	addr := fakeServer(t, func(qc *quic.Conn) {
		if _, err := fakeAuth(qc); err != nil {
			return
		}
		<-qc.Context().Done() // never answers a Ping
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, WithCredentials("alice", "x"), WithInsecureSkipVerify())
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := c.Ping(ctx)
		errc <- err
	}()
	time.Sleep(200 * time.Millisecond) // the Ping waits for a Pong that never comes
	c.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("Ping at Close: %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Ping still waiting 5 s after Close")
	}
}
