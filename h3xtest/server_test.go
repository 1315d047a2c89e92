package h3xtest_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestNewServerRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []h3xtest.Option
	}{{"memory", nil}, {"badger", []h3xtest.Option{h3xtest.WithBadger()}}} {
		t.Run(tc.name, func(t *testing.T) {
			srv := h3xtest.NewServer(t, tc.opts...)
			c := srv.Dial(t)
			ctx := ctxT(t)
			if _, err := c.Publish(ctx, h3x.Event{Namespace: "orders", Message: "hi"}); err != nil {
				t.Fatal(err)
			}
			ds, err := c.Fetch(ctx, 1, "orders")
			if err != nil || ds[0].Event.Message != "hi" {
				t.Fatalf("fetch: %v %v", err, ds)
			}
			if _, err := c.Ack(ctx, ds...); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestFaultHooks(t *testing.T) {
	srv := h3xtest.NewServer(t)
	states := make(chan h3x.StateChange, 64)
	c := srv.Dial(t, h3x.WithBackoff(h3x.BackoffFunc(func(int) time.Duration { return 10 * time.Millisecond })),
		h3x.WithStateHandler(func(sc h3x.StateChange) {
			select {
			case states <- sc:
			default:
			}
		}))
	ctx := ctxT(t)
	waitState := func(want h3x.ConnState) {
		t.Helper()
		for {
			select {
			case sc := <-states:
				if sc.State == want {
					return
				}
			case <-ctx.Done():
				t.Fatalf("no %v state", want)
			}
		}
	}

	t.Run("DropConnections", func(t *testing.T) {
		srv.DropConnections()
		waitState(h3x.StateDisconnected)
		waitState(h3x.StateConnected)
		if _, err := c.Ping(ctx); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("Restart keeps the queue", func(t *testing.T) {
		if _, err := c.Publish(ctx, h3x.Event{Namespace: "orders", Message: "before"}); err != nil {
			t.Fatal(err)
		}
		srv.Restart()
		ds, err := c.Fetch(ctx, 1, "orders")
		if err != nil || ds[0].Event.Message != "before" {
			t.Fatalf("after restart: %v %v", err, ds)
		}
		c.Ack(ctx, ds...)
	})
	t.Run("SetLatency", func(t *testing.T) {
		srv.SetLatency(30 * time.Millisecond)
		defer srv.SetLatency(0)
		rtt, err := c.Ping(ctx)
		if err != nil || rtt < 30*time.Millisecond {
			t.Fatalf("rtt %v with 30ms latency: %v", rtt, err)
		}
	})
	t.Run("RefuseAuth", func(t *testing.T) {
		srv.RefuseAuth(true)
		defer srv.RefuseAuth(false)
		_, err := h3x.Dial(ctx, srv.Addr(), srv.ClientOptions()...)
		if !errors.Is(err, h3x.ErrUnauthenticated) {
			t.Fatalf("Dial with auth refused: %v", err)
		}
	})
}
