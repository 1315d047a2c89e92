package h3x

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// fakeServer is a QUIC listener speaking H3X badly on purpose: serve runs
// for the first connection (in a goroutine the test owns through Cleanup).
func fakeServer(t *testing.T, serve func(qc *quic.Conn)) string {
	t.Helper()
	ln := fakeListener(t, time.Second)
	done := make(chan struct{})
	accepted := make(chan *quic.Conn, 1)
	go func() {
		defer close(done)
		qc, err := ln.Accept(context.Background())
		if err != nil {
			return
		}
		accepted <- qc
		defer qc.CloseWithError(0, "")
		serve(qc)
	}()
	t.Cleanup(func() {
		ln.Close()
		select {
		case qc := <-accepted:
			qc.CloseWithError(0, "") // ends serve, and a client still waiting
		default:
		}
		<-done
	})
	return ln.Addr().String()
}

// fakeListener is a loopback QUIC listener with a self-signed certificate
// and H3X's ALPN, for the fake servers of client tests (keepAlive 0: none).
func fakeListener(t *testing.T, keepAlive time.Duration) *quic.Listener {
	t.Helper()
	cert, err := selfSignedCert()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{ALPN}},
		&quic.Config{MaxIdleTimeout: 30 * time.Second, KeepAlivePeriod: keepAlive})
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// fakeAuth accepts the control stream and answers Auth with success.
func fakeAuth(qc *quic.Conn) (*quic.Stream, error) {
	ctrl, err := qc.AcceptStream(context.Background())
	if err != nil {
		return nil, err
	}
	var a h3xpb.Auth
	if err := newFrameReader(ctrl, DefaultMaxFrameSize).readMessage(FrameAuth, &a); err != nil {
		return nil, err
	}
	b, _ := appendFrame(nil, FrameAuthResult, &h3xpb.AuthResult{ProtocolVersion: 1})
	_, err = ctrl.Write(b)
	return ctrl, err
}

// An answer of the wrong type (answers are matched to requests by id) is a
// protocol violation reported by the call, never a panic.
func TestClientWrongAnswerType(t *testing.T) {
	tests := []struct {
		name   string
		call   func(ctx context.Context, c *Client) error
		answer func(rid uint64) (FrameType, proto.Message)
	}{
		{"fetch answered with an AckResult", func(ctx context.Context, c *Client) error {
			_, err := c.Fetch(ctx, 1, "orders")
			return err
		}, func(rid uint64) (FrameType, proto.Message) {
			return FrameAckResult, &h3xpb.AckResult{RequestId: rid}
		}},
		{"publish answered with an AckResult", func(ctx context.Context, c *Client) error {
			_, err := c.Publish(ctx, Event{Namespace: "orders"})
			return err
		}, func(rid uint64) (FrameType, proto.Message) {
			return FrameAckResult, &h3xpb.AckResult{RequestId: rid}
		}},
		{"ack answered with a SendResult", func(ctx context.Context, c *Client) error {
			_, err := c.Ack(ctx, &Delivery{Event: Event{ID: "a", Namespace: "orders"}})
			return err
		}, func(rid uint64) (FrameType, proto.Message) {
			return FrameSendResult, &h3xpb.SendResult{RequestId: rid}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := oneAnswer(t, func(req proto.Message) (FrameType, proto.Message) {
				return tt.answer(req.(interface{ GetRequestId() uint64 }).GetRequestId())
			}, tt.call)
			if !errors.Is(err, ErrProtocolViolation) {
				t.Fatalf("got %v, want a protocol violation", err)
			}
		})
	}
}

// oneAnswer runs call with a client of a fake server that answers the
// first request on the client's first data stream with answer, and
// returns the request the server read (nil if none) and call's error.
func oneAnswer(t *testing.T, answer func(req proto.Message) (FrameType, proto.Message), call func(context.Context, *Client) error) (proto.Message, error) {
	t.Helper()
	got := make(chan proto.Message, 1)
	addr := fakeServer(t, func(qc *quic.Conn) {
		if _, err := fakeAuth(qc); err != nil {
			return
		}
		st, err := qc.AcceptStream(context.Background())
		if err != nil {
			return
		}
		ft, payload, err := newFrameReader(st, DefaultMaxFrameSize).next()
		if err != nil {
			return
		}
		req := newMessage(ft)
		if req == nil || unmarshalPayload(ft, payload, req) != nil {
			return
		}
		got <- req // before the answer: call cannot return with an answer and no request
		at, ans := answer(req)
		b, _ := appendFrame(nil, at, ans)
		st.Write(b)
		<-qc.Context().Done()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, WithCredentials("alice", "x"), WithInsecureSkipVerify())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = call(ctx, c)
	select {
	case req := <-got:
		return req, err
	default:
		return nil, err
	}
}

// Dial honours its context when the server ends the control stream without
// an AuthResult and keeps the connection open.
func TestDialControlStreamEndsWithoutAuthResult(t *testing.T) {
	addr := fakeServer(t, func(qc *quic.Conn) {
		st, err := qc.AcceptStream(context.Background())
		if err != nil {
			return
		}
		io.ReadFull(st, make([]byte, 5)) // the Auth frame's header
		st.Close()                       // no AuthResult; the connection stays
		<-qc.Context().Done()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		c, err := Dial(ctx, addr, WithCredentials("alice", "x"), WithInsecureSkipVerify())
		if err == nil {
			c.Close()
			err = errors.New("Dial succeeded without an AuthResult")
		}
		done <- err
	}()
	select {
	case err := <-done:
		if errors.Is(err, context.DeadlineExceeded) || err.Error() == "Dial succeeded without an AuthResult" {
			t.Fatal(err)
		}
		t.Logf("Dial failed after %v: %v", time.Since(start).Round(time.Millisecond), err)
	case <-time.After(authCloseWait + 4*time.Second):
		cancel()
		t.Fatalf("Dial still waiting after %v", time.Since(start))
	}
}

// PublishAsync does not write the IDs it assigns into the caller's slice
// (the caller may reuse it at once; under -race the old behaviour was a
// data race).
func TestPublishAsyncLeavesCallersEvents(t *testing.T) {
	s := testServer(t)
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	evs := []Event{{Namespace: "orders", Message: "first"}}
	p := c.PublishAsync(ctx, evs...)
	evs[0] = Event{Namespace: "orders", Message: "second"} // reused at once
	res, err := p.Result()
	if err != nil {
		t.Fatal(err)
	}
	if evs[0].ID != "" {
		t.Fatalf("the caller's event got ID %q from the background publish", evs[0].ID)
	}
	if res[0].Status != PublishStored || res[0].ID == "" {
		t.Fatalf("result %+v", res[0])
	}
	got, err := c.Fetch(ctx, 10, "orders")
	if err != nil || len(got) != 1 || got[0].Event.Message != "first" || got[0].Event.ID != res[0].ID {
		t.Fatalf("fetched %v, %v; want the first event with ID %s", got, err, res[0].ID)
	}
}

// Close keeps its 5 s bound on flushing acks when the server is gone, also
// for a batch whose send had started before Close (it waited for a
// connection for up to a minute), and reports that the ack was not sent;
// Flush honours its context while the ack queue is full.
func TestAckFlushBoundsWhileDisconnected(t *testing.T) {
	s := testServer(t)
	c := mustDial(t, s, "alice", "alice-token", WithBackoff(fastBackoff), WithDialTimeout(200*time.Millisecond), WithAckFlush(1, 5*time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for range 6 {
		if _, err := c.Publish(ctx, Event{Namespace: "orders"}); err != nil {
			t.Fatal(err)
		}
	}
	var ds []*Delivery
	for len(ds) < 6 {
		got, err := c.Fetch(ctx, 6-len(ds), "orders")
		if err != nil {
			t.Fatal(err)
		}
		ds = append(ds, got...)
	}
	s.Close()                           // for good
	time.Sleep(300 * time.Millisecond)  // the client notices and starts reconnecting
	if err := ds[0].Ack(); err != nil { // its send waits for a connection
		t.Fatal(err)
	}
	for _, d := range ds[1:5] { // fill the queue (4 × the flush size of 1)
		if err := d.Ack(); err != nil {
			t.Fatal(err)
		}
	}
	fctx, fcancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer fcancel()
	within := func(what string, d time.Duration, call func() error) error {
		t.Helper()
		done := make(chan error, 1)
		start := time.Now()
		go func() { done <- call() }()
		select {
		case err := <-done:
			t.Logf("%s returned after %v: %v", what, time.Since(start).Round(time.Millisecond), err)
			return err
		case <-time.After(d):
			t.Fatalf("%s still waiting after %v", what, d)
			return nil
		}
	}
	if err := within("Flush with a 300 ms context", 2*time.Second, func() error { return c.Flush(fctx) }); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Flush with a full queue: %v, want the context's error", err)
	}
	if err := within("Close", 8*time.Second, c.Close); err == nil {
		t.Fatal("Close reported no error although the acks were never sent")
	}
}

// A server whose handler stalls (it accepts streams and never reads them,
// so QUIC flow control blocks the client's writes) does not make a
// Publish outlive its context, nor Close hang.
func TestPublishHonoursContextWhenServerStopsReading(t *testing.T) {
	addr := fakeServer(t, func(qc *quic.Conn) {
		if _, err := fakeAuth(qc); err != nil {
			return
		}
		for { // accept streams, never read them
			if _, err := qc.AcceptStream(context.Background()); err != nil {
				return
			}
		}
	})
	dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer dcancel()
	c, err := Dial(dctx, addr, WithCredentials("alice", "x"), WithInsecureSkipVerify())
	if err != nil {
		t.Fatal(err)
	}
	big := strings.Repeat("x", 900<<10)
	const calls = 8
	done := make(chan error, calls)
	start := time.Now()
	for range calls {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_, err := c.Publish(ctx, Event{Namespace: "orders", Message: big})
			done <- err
		}()
	}
	for i := range calls {
		select {
		case err := <-done:
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Publish %d: %v, want the context's deadline", i, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of %d Publish calls with a 1 s context still waiting after %v", calls-i, calls, time.Since(start))
		}
	}
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close still waiting after 10 s")
	}
}

// Close racing PublishAsync, Subscribe and a reconnect: every goroutine
// the client starts is one Close waits for (no WaitGroup Add after its
// Wait), and a connection a reconnect installs as Close begins is closed
// too (goleak in TestMain catches one left open). A stress test: the races
// it covers need the right interleaving, which 20 rounds under -race
// usually produce.
func TestCloseRacesReconnectAndNewWork(t *testing.T) {
	s := testServer(t)
	for round := range 20 {
		c := mustDial(t, s, "alice", "alice-token", WithBackoff(fastBackoff))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		var wg sync.WaitGroup
		wg.Go(func() {
			for i := 0; ctx.Err() == nil && i < 200; i++ {
				p := c.PublishAsync(ctx, Event{Namespace: "orders"})
				if sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{}); err == nil {
					sub.Close()
				}
				if _, err := p.Result(); errors.Is(err, ErrClosed) {
					return
				}
			}
		})
		if round%2 == 0 {
			s.DropConnections() // a reconnect runs while Close starts
		}
		time.Sleep(time.Duration(round%5) * time.Millisecond)
		done := make(chan error, 1)
		go func() { done <- c.Close() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: Close still waiting after 10 s", round)
		}
		cancel()
		wg.Wait()
	}
}

// A Publish that starts while the client is disconnected splits its events
// by the limits of the server it reconnects to, not by the defaults.
func TestPublishWhileDisconnectedUsesServerLimits(t *testing.T) {
	s := testServer(t, WithMaxEventsPerSend(10))
	lost := make(chan struct{}, 1)
	c := mustDial(t, s, "alice", "alice-token",
		WithBackoff(&ExponentialBackoff{Initial: 300 * time.Millisecond, Max: time.Second, Multiplier: 2}),
		WithStateHandler(func(sc StateChange) {
			if sc.State == StateDisconnected {
				select {
				case lost <- struct{}{}:
				default:
				}
			}
		}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s.DropConnections()
	select {
	case <-lost: // reconnecting after 300 ms
	case <-ctx.Done():
		t.Fatal("the client did not notice the dropped connection")
	}
	evs := make([]Event, 25)
	for i := range evs {
		evs[i] = Event{Namespace: "orders"}
	}
	res, err := c.Publish(ctx, evs...)
	if err != nil {
		t.Fatalf("Publish of 25 events against a limit of 10 per SendEvent, started while disconnected: %v", err)
	}
	for i, r := range res {
		if r.Status != PublishStored {
			t.Fatalf("event %d: %v %v", i, r.Status, r.Err)
		}
	}
}

// A frame on a session stream that is no answer (here an AuthResult) makes
// the client reset the stream with PROTOCOL_VIOLATION (PROTOCOL.md §5.2);
// it used to stop reading without a word (a minor issue of the client
// review, RELIABILITY.md finding 109).
func TestClientResetsStreamOnUnexpectedFrame(t *testing.T) {
	got := make(chan error, 1)
	addr := fakeServer(t, func(qc *quic.Conn) {
		if _, err := fakeAuth(qc); err != nil {
			got <- err
			return
		}
		st, err := qc.AcceptStream(context.Background())
		if err != nil {
			got <- err
			return
		}
		if _, _, err := newFrameReader(st, DefaultMaxFrameSize).next(); err != nil {
			got <- err
			return
		}
		b, _ := appendFrame(nil, FrameAuthResult, &h3xpb.AuthResult{ProtocolVersion: 1})
		st.Write(b)
		st.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.Copy(io.Discard, st)
		got <- err
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, WithCredentials("alice", "x"), WithInsecureSkipVerify(), WithMaxReconnects(1))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pctx, pcancel := context.WithTimeout(ctx, 2*time.Second)
	defer pcancel()
	c.Publish(pctx, Event{Namespace: "orders"}) // fails: the answer is no answer
	select {
	case err := <-got:
		var se *quic.StreamError
		if !errors.As(err, &se) || !se.Remote || se.ErrorCode != quic.StreamErrorCode(CodeProtocolViolation) {
			t.Fatalf("the server's side of the stream ended with %v, want a reset with PROTOCOL_VIOLATION", err)
		}
	case <-time.After(8 * time.Second):
		t.Fatal("the client did not reset the stream")
	}
}

// The client asks for stored outcomes to be omitted (it sets every ID) and
// takes a SendResult either way: with every outcome (a server that
// predates omit_stored), with the leading stored ones omitted, or with
// counts that do not add up (a protocol violation).
func TestPublishTakesOmittedStoredOutcomes(t *testing.T) {
	stored := &h3xpb.PublishOutcome{Status: h3xpb.PublishStatus_PUBLISH_STATUS_STORED}
	denied := &h3xpb.PublishOutcome{Status: h3xpb.PublishStatus_PUBLISH_STATUS_REFUSED, Code: h3xpb.ErrorCode_ERROR_CODE_PERMISSION_DENIED, Message: "no"}
	tests := []struct {
		name      string
		omitted   uint32
		outcomes  []*h3xpb.PublishOutcome
		want      []PublishStatus
		violation bool
	}{
		{"every outcome", 0, []*h3xpb.PublishOutcome{stored, stored, stored}, []PublishStatus{PublishStored, PublishStored, PublishStored}, false},
		{"all omitted", 3, nil, []PublishStatus{PublishStored, PublishStored, PublishStored}, false},
		{"one omitted", 1, []*h3xpb.PublishOutcome{denied, stored}, []PublishStatus{PublishStored, PublishRefused, PublishStored}, false},
		{"too many omitted", 4, nil, nil, true},
		{"one outcome too many", 1, []*h3xpb.PublishOutcome{stored, stored, stored}, nil, true},
		{"one outcome short", 1, []*h3xpb.PublishOutcome{stored}, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			events := []Event{{ID: "own-id", Namespace: "orders"}, {Namespace: "orders"}, {Namespace: "orders"}}
			var results []PublishResult
			req, err := oneAnswer(t, func(req proto.Message) (FrameType, proto.Message) {
				sent := req.(*h3xpb.SendEvent)
				res := &h3xpb.SendResult{RequestId: sent.GetRequestId(), StoredOmitted: tt.omitted}
				for j, o := range tt.outcomes {
					o := proto.Clone(o).(*h3xpb.PublishOutcome)
					if k := int(tt.omitted) + j; k < len(sent.GetEvents()) {
						o.Id = sent.GetEvents()[k].GetId()
					}
					res.Outcomes = append(res.Outcomes, o)
				}
				return FrameSendResult, res
			}, func(ctx context.Context, c *Client) (err error) {
				results, err = c.Publish(ctx, events...)
				return err
			})
			if sent, ok := req.(*h3xpb.SendEvent); !ok || !sent.GetOmitStored() {
				t.Errorf("the server got %v, not a SendEvent with omit_stored (Publish: %v)", req, err)
			}
			if tt.violation {
				if !errors.Is(err, ErrProtocolViolation) {
					t.Fatalf("got %v, %v; want a protocol violation", results, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for i, r := range results {
				if r.Status != tt.want[i] || r.ID != events[i].ID || r.ID == "" {
					t.Errorf("result %d: %+v, want %v with ID %q", i, r, tt.want[i], events[i].ID)
				}
				if (r.Err != nil) != (r.Status == PublishRefused) {
					t.Errorf("result %d: status %v with error %v", i, r.Status, r.Err)
				}
			}
		})
	}
}

// Ack, Nack and Extend ask for applied outcomes to be omitted and take an
// AckResult either way: with every outcome (a server that predates
// omit_ok), with the leading OK ones omitted, or with counts that do not
// add up (a protocol violation).
func TestSettleTakesOmittedOKOutcomes(t *testing.T) {
	ok := &h3xpb.SettleOutcome{Status: h3xpb.SettleStatus_SETTLE_STATUS_OK}
	stale := &h3xpb.SettleOutcome{Status: h3xpb.SettleStatus_SETTLE_STATUS_STALE}
	settleCalls := []struct {
		name string
		ft   FrameType
		call func(ctx context.Context, c *Client, ds ...*Delivery) ([]SettleResult, error)
	}{
		{"ack", FrameAckEvent, func(ctx context.Context, c *Client, ds ...*Delivery) ([]SettleResult, error) {
			return c.Ack(ctx, ds...)
		}},
		{"nack", FrameNackEvent, func(ctx context.Context, c *Client, ds ...*Delivery) ([]SettleResult, error) {
			return c.Nack(ctx, time.Second, "r", ds...)
		}},
		{"extend", FrameExtendLease, func(ctx context.Context, c *Client, ds ...*Delivery) ([]SettleResult, error) {
			return c.Extend(ctx, time.Minute, ds...)
		}},
	}
	answers := []struct {
		name      string
		omitted   uint32
		outcomes  []*h3xpb.SettleOutcome
		want      []SettleStatus
		violation bool
	}{
		{"every outcome", 0, []*h3xpb.SettleOutcome{ok, ok, ok}, []SettleStatus{SettleOK, SettleOK, SettleOK}, false},
		{"all omitted", 3, nil, []SettleStatus{SettleOK, SettleOK, SettleOK}, false},
		{"one omitted", 1, []*h3xpb.SettleOutcome{stale, ok}, []SettleStatus{SettleOK, SettleStale, SettleOK}, false},
		{"too many omitted", 4, nil, nil, true},
		{"one outcome too many", 1, []*h3xpb.SettleOutcome{ok, ok, ok}, nil, true},
		{"one outcome short", 0, []*h3xpb.SettleOutcome{ok, ok}, nil, true},
	}
	for _, sc := range settleCalls {
		for _, tt := range answers {
			t.Run(sc.name+"/"+tt.name, func(t *testing.T) {
				ds := []*Delivery{{Event: Event{ID: "a", Namespace: "orders"}}, {Event: Event{ID: "b", Namespace: "orders"}}, {Event: Event{ID: "c", Namespace: "orders"}}}
				var results []SettleResult
				req, err := oneAnswer(t, func(req proto.Message) (FrameType, proto.Message) {
					r, _ := req.(settleRequest)
					if r == nil {
						return FrameError, &h3xpb.Error{}
					}
					res := &h3xpb.AckResult{RequestId: r.GetRequestId(), OkOmitted: tt.omitted}
					for j, o := range tt.outcomes {
						o := proto.Clone(o).(*h3xpb.SettleOutcome)
						if k := int(tt.omitted) + j; k < len(r.GetEventIds()) {
							o.Id = r.GetEventIds()[k]
						}
						res.Outcomes = append(res.Outcomes, o)
					}
					return FrameAckResult, res
				}, func(ctx context.Context, c *Client) (err error) {
					results, err = sc.call(ctx, c, ds...)
					return err
				})
				if r, ok := req.(settleRequest); !ok || !r.GetOmitOk() || req.ProtoReflect().Descriptor() != newMessage(sc.ft).ProtoReflect().Descriptor() {
					t.Errorf("the server got %v, not a %v with omit_ok (%v)", req, sc.ft, err)
				}
				if tt.violation {
					if !errors.Is(err, ErrProtocolViolation) {
						t.Fatalf("got %v, %v; want a protocol violation", results, err)
					}
					return
				}
				if err != nil || len(results) != len(ds) {
					t.Fatalf("got %v, %v", results, err)
				}
				for i, r := range results {
					if r.Status != tt.want[i] || r.ID != ds[i].Event.ID {
						t.Errorf("result %d: %+v, want %v with ID %q", i, r, tt.want[i], ds[i].Event.ID)
					}
				}
			})
		}
	}
}
