package h3x_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

const registry = "alice:orders=alice-token,alice:orders.dlq=alice-token,alice:audit/pub=alice-token," +
	"bob:billing/sub=bob-token,bob:orders=bob-token"

func newServer(t *testing.T, opts ...h3x.ServerOption) *h3xtest.Server {
	reg, err := h3x.ParseRegistry(registry)
	if err != nil {
		t.Fatal(err)
	}
	return h3xtest.NewServer(t, h3xtest.WithRegistry(reg), h3xtest.WithServerOptions(opts...))
}

func as(id string) h3x.ClientOption { return h3x.WithCredentials(id, id+"-token") }

func TestPublishFetchAckNack(t *testing.T) {
	srv := newServer(t)
	c := srv.Dial(t, as("alice"))
	ctx := ctxT(t)

	res, err := c.Publish(ctx,
		h3x.Event{Namespace: "orders", Type: "order.created", Message: "first", Data: []byte(`{"n":1}`), Metadata: map[string]string{"env": "test"}},
		h3x.Event{Namespace: "orders", Type: "order.created", Message: "second"},
		h3x.Event{ID: "fixed-id", Namespace: "orders", Message: "third"},
	)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range res {
		if r.Status != h3x.PublishStored || r.ID == "" {
			t.Fatalf("result %d: %+v", i, r)
		}
	}
	// The same id again is a duplicate.
	dup, err := c.Publish(ctx, h3x.Event{ID: "fixed-id", Namespace: "orders"})
	if err != nil || dup[0].Status != h3x.PublishDuplicate {
		t.Fatalf("republish: %v %+v", err, dup)
	}

	ds, err := c.Fetch(ctx, 10, "orders")
	if err != nil || len(ds) != 3 {
		t.Fatalf("fetch: %v, %d deliveries", err, len(ds))
	}
	if ds[0].Event.Message != "first" || ds[1].Event.Message != "second" || ds[2].Event.ID != "fixed-id" {
		t.Fatalf("order: %q %q %q", ds[0].Event.Message, ds[1].Event.Message, ds[2].Event.ID)
	}
	if ds[0].Event.Metadata["env"] != "test" || string(ds[0].Event.Data) != `{"n":1}` || ds[0].Event.Time.IsZero() {
		t.Fatalf("event fields lost: %+v", ds[0].Event)
	}
	if ds[0].Attempt() != 1 || time.Until(ds[0].Deadline()) <= 0 {
		t.Fatalf("attempt %d deadline %v", ds[0].Attempt(), ds[0].Deadline())
	}

	acked, err := c.Ack(ctx, ds[0], ds[1])
	if err != nil || acked[0].Status != h3x.SettleOK || acked[1].Status != h3x.SettleOK {
		t.Fatalf("ack: %v %+v", err, acked)
	}
	again, err := c.Ack(ctx, ds[0])
	if err != nil || again[0].Status != h3x.SettleUnknown {
		t.Fatalf("second ack: %v %+v", err, again)
	}
	ext, err := c.Extend(ctx, time.Minute, ds[2])
	if err != nil || ext[0].Status != h3x.SettleOK {
		t.Fatalf("extend: %v %+v", err, ext)
	}
	nacked, err := c.Nack(ctx, 0, "try later", ds[2])
	if err != nil || nacked[0].Status != h3x.SettleOK {
		t.Fatalf("nack: %v %+v", err, nacked)
	}
	re, err := c.Fetch(ctx, 10, "orders")
	if err != nil || len(re) != 1 || re[0].Event.ID != "fixed-id" || re[0].Attempt() != 2 {
		t.Fatalf("redelivery: %v %+v", err, re)
	}
	if _, err := c.Ack(ctx, re...); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if _, err := c.Fetch(short, 10, "orders"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("fetch of an empty namespace: %v", err)
	}
	if rtt, err := c.Ping(ctx); err != nil || rtt <= 0 {
		t.Fatalf("ping: %v %v", rtt, err)
	}
}

func TestLongPollWakesOnPublish(t *testing.T) {
	srv := newServer(t)
	cons := srv.Dial(t, as("bob"))
	pub := srv.Dial(t, as("alice"))
	ctx := ctxT(t)
	got := make(chan []*h3x.Delivery, 1)
	go func() {
		ds, _ := cons.Fetch(ctx, 5, "orders")
		got <- ds
	}()
	time.Sleep(100 * time.Millisecond)
	if _, err := pub.Publish(ctx, h3x.Event{Namespace: "orders", Message: "wake"}); err != nil {
		t.Fatal(err)
	}
	select {
	case ds := <-got:
		if len(ds) != 1 || ds[0].Event.Message != "wake" {
			t.Fatalf("got %+v", ds)
		}
	case <-ctx.Done():
		t.Fatal("long poll not woken")
	}
}

func TestAckNeverWaitsBehindLongPoll(t *testing.T) {
	srv := newServer(t)
	c := srv.Dial(t, as("alice"))
	ctx := ctxT(t)
	c.Publish(ctx, h3x.Event{Namespace: "orders"})
	ds, err := c.Fetch(ctx, 1, "orders")
	if err != nil {
		t.Fatal(err)
	}
	// A long poll on an empty namespace is parked ...
	go c.Fetch(ctx, 1, "orders.dlq")
	time.Sleep(50 * time.Millisecond)
	// ... and an ack still completes at once.
	actx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if res, err := c.Ack(actx, ds...); err != nil || res[0].Status != h3x.SettleOK {
		t.Fatalf("ack behind a long poll: %v %+v", err, res)
	}
}

func TestAuthFailures(t *testing.T) {
	srv := newServer(t)
	cases := []struct {
		name string
		opts []h3x.ClientOption
		want error
	}{
		{"wrong token", []h3x.ClientOption{h3x.WithCredentials("alice", "wrong")}, h3x.ErrUnauthenticated},
		{"unknown client", []h3x.ClientOption{h3x.WithCredentials("mallory", "alice-token")}, h3x.ErrUnauthenticated},
		{"empty token", []h3x.ClientOption{h3x.WithCredentials("alice", "")}, h3x.ErrUnauthenticated},
		{"foreign namespace in Auth", []h3x.ClientOption{as("alice"), h3x.WithNamespaces("billing")}, h3x.ErrPermissionDenied},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := ctxT(t)
			_, err := h3x.Dial(ctx, srv.Addr(), append([]h3x.ClientOption{h3x.WithTrustedFingerprint(srv.Fingerprint())}, tc.opts...)...)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Dial: %v, want %v", err, tc.want)
			}
			var e *h3x.Error
			if !errors.As(err, &e) || !e.Remote {
				t.Fatalf("not a remote *h3x.Error: %#v", err)
			}
			// The server keeps serving others.
			if _, err := srv.Dial(t, as("alice")).Ping(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestUntrustedCertificateRefused(t *testing.T) {
	srv := newServer(t)
	ctx := ctxT(t)
	// No pin, no CA: the self-signed certificate is refused.
	if _, err := h3x.Dial(ctx, srv.Addr(), as("alice")); err == nil {
		t.Fatal("self-signed certificate accepted without trust")
	}
	wrongPin := "00" + srv.Fingerprint()[2:]
	if wrongPin == srv.Fingerprint() {
		wrongPin = "11" + srv.Fingerprint()[2:]
	}
	if _, err := h3x.Dial(ctx, srv.Addr(), as("alice"), h3x.WithTrustedFingerprint(wrongPin)); err == nil {
		t.Fatal("wrong pin accepted")
	}
	c, err := h3x.Dial(ctx, srv.Addr(), as("alice"), h3x.WithInsecureSkipVerify())
	if err != nil {
		t.Fatalf("insecure: %v", err)
	}
	c.Close()
}

func TestPermissions(t *testing.T) {
	srv := newServer(t)
	ctx := ctxT(t)
	alice := srv.Dial(t, as("alice"))
	bob := srv.Dial(t, as("bob"))

	// A foreign namespace in FetchEvents.
	if _, err := alice.Fetch(ctx, 1, "billing"); !errors.Is(err, h3x.ErrPermissionDenied) {
		t.Fatalf("fetch foreign: %v", err)
	}
	// Publish-only namespace cannot be fetched.
	if _, err := alice.Fetch(ctx, 1, "audit"); !errors.Is(err, h3x.ErrPermissionDenied) {
		t.Fatalf("fetch publish-only: %v", err)
	}
	// A foreign namespace in SendEvent is refused per event; the rest is stored.
	res, err := bob.Publish(ctx, h3x.Event{Namespace: "billing"}, h3x.Event{Namespace: "orders"}, h3x.Event{Namespace: "no such/ns"})
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Status != h3x.PublishRefused || !errors.Is(res[0].Err, h3x.ErrPermissionDenied) {
		t.Fatalf("publish to consume-only: %+v", res[0])
	}
	if res[1].Status != h3x.PublishStored {
		t.Fatalf("publish allowed: %+v", res[1])
	}
	if res[2].Status != h3x.PublishRefused || !errors.Is(res[2].Err, h3x.ErrInvalidArgument) {
		t.Fatalf("publish invalid namespace: %+v", res[2])
	}
}

func TestAckOfAnotherConnectionsLease(t *testing.T) {
	srv := newServer(t)
	ctx := ctxT(t)
	alice := srv.Dial(t, as("alice"))
	bob := srv.Dial(t, as("bob"))
	alice.Publish(ctx, h3x.Event{Namespace: "orders"})
	ds, err := alice.Fetch(ctx, 1, "orders")
	if err != nil {
		t.Fatal(err)
	}
	res, err := bob.Ack(ctx, ds...)
	if err != nil || res[0].Status != h3x.SettleStale {
		t.Fatalf("ack of a lease held by another connection: %v %+v", err, res)
	}
	unknown, err := bob.Ack(ctx, &h3x.Delivery{Event: h3x.Event{ID: "no-such-id", Namespace: "orders"}})
	if err != nil || unknown[0].Status != h3x.SettleUnknown {
		t.Fatalf("ack of an unknown id: %v %+v", err, unknown)
	}
	// Alice's lease is untouched.
	if res, err := alice.Ack(ctx, ds...); err != nil || res[0].Status != h3x.SettleOK {
		t.Fatalf("owner's ack: %v %+v", err, res)
	}
}

func TestTooManyConnections(t *testing.T) {
	srv := newServer(t, h3x.WithMaxConnections(1))
	ctx := ctxT(t)
	first := srv.Dial(t, as("alice"))
	_, err := h3x.Dial(ctx, srv.Addr(), as("bob"), h3x.WithTrustedFingerprint(srv.Fingerprint()))
	if !errors.Is(err, h3x.ErrTooManyConnections) {
		t.Fatalf("second connection: %v", err)
	}
	if _, err := first.Ping(ctx); err != nil {
		t.Fatalf("first connection broken: %v", err)
	}
}

func TestClosedClient(t *testing.T) {
	srv := newServer(t)
	c := srv.Dial(t, as("alice"))
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	if _, err := c.Publish(ctx, h3x.Event{Namespace: "orders"}); !errors.Is(err, h3x.ErrClosed) {
		t.Fatalf("Publish after Close: %v", err)
	}
	if _, err := c.Fetch(ctx, 1); !errors.Is(err, h3x.ErrClosed) {
		t.Fatalf("Fetch after Close: %v", err)
	}
}

func TestShutdownSendsGoAwayAndDrains(t *testing.T) {
	srv := newServer(t)
	states := make(chan h3x.StateChange, 16)
	c := srv.Dial(t, as("alice"), h3x.WithStateHandler(func(sc h3x.StateChange) {
		select {
		case states <- sc:
		default:
		}
	}))
	ctx := ctxT(t)
	if _, err := c.Publish(ctx, h3x.Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go c.Fetch(pctx, 1, "orders.dlq") // a parked long poll must not hold up Shutdown
	time.Sleep(50 * time.Millisecond)
	sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
	defer scancel()
	if err := srv.Server().Shutdown(sctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	for sc := range states {
		if sc.State == h3x.StateDisconnected {
			if !errors.Is(sc.Err, h3x.ErrShuttingDown) {
				t.Fatalf("disconnected by %v, want a GoAway (shutting down)", sc.Err)
			}
			break
		}
	}
	if err := srv.Server().Shutdown(ctx); !errors.Is(err, h3x.ErrServerClosed) {
		t.Fatalf("second Shutdown: %v", err)
	}
}

func TestCustomHandler(t *testing.T) {
	srv := newServer(t)
	const echo h3x.FrameType = 0x80
	srv.Handle(echo, h3x.HandlerFunc(func(ctx context.Context, s *h3x.Stream) error {
		for {
			ft, payload, err := s.ReadFrame()
			if err != nil {
				return nil
			}
			if err := s.WriteFrame(ft, append([]byte(s.Session().ClientID+":"), payload...)); err != nil {
				return err
			}
		}
	}))
	c := srv.Dial(t, as("alice"))
	ctx := ctxT(t)
	st, err := c.OpenStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.WriteFrame(echo, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	ft, payload, err := st.ReadFrame()
	if err != nil || ft != echo || string(payload) != "alice:hello" {
		t.Fatalf("echo: %v %v %q", ft, err, payload)
	}
	// An unregistered application type resets that stream only.
	other, _ := c.OpenStream(ctx)
	other.WriteFrame(0x81, nil)
	if _, _, err := other.ReadFrame(); !errors.Is(err, h3x.ErrUnknownFrameType) {
		t.Fatalf("unregistered type: %v", err)
	}
	other.Close()
	if _, err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}
