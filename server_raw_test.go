package h3x

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// testServer starts a server on a random loopback port with an in-memory
// queue and a registry of two clients: "alice" (everything in "orders" and
// "orders.dlq", publish-only in "audit") and "bob" (consume-only "billing").
func testServer(t *testing.T, opts ...ServerOption) *Server {
	t.Helper()
	return testServerWith(t, "alice:orders=alice-token,alice:orders.dlq=alice-token,alice:audit/pub=alice-token,bob:billing/sub=bob-token,bob:orders=bob-token", opts...)
}

// testServerWith starts a loopback server with an in-memory queue (opts may
// replace it) and the registry text; it is closed when the test ends.
func testServerWith(t *testing.T, registry string, opts ...ServerOption) *Server {
	t.Helper()
	reg, err := ParseRegistry(registry)
	if err != nil {
		t.Fatal(err)
	}
	all := append([]ServerOption{WithAddr("127.0.0.1:0"), WithQueue(NewMemoryQueue(QueueOptions{})), WithRegistry(reg)}, opts...)
	s, err := NewServer(all...)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func testDial(t *testing.T, s *Server, id, token string, opts ...ClientOption) (*Client, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, s.Addr().String(), append([]ClientOption{WithCredentials(id, token), WithTrustedFingerprint(s.Fingerprint())}, opts...)...)
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

func mustDial(t *testing.T, s *Server, id, token string, opts ...ClientOption) *Client {
	t.Helper()
	c, err := testDial(t, s, id, token, opts...)
	if err != nil {
		t.Fatalf("Dial(%s): %v", id, err)
	}
	return c
}

// assertServing checks that the server still serves a fresh client.
func assertServing(t *testing.T, s *Server) {
	t.Helper()
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := c.Publish(ctx, Event{Namespace: "orders", Type: "check"})
	if err != nil || res[0].Status != PublishStored {
		t.Fatalf("server no longer serves: %v %+v", err, res)
	}
	c.Close()
}

// rawConn is a bare QUIC connection to a server, for speaking the protocol
// byte by byte.
type rawConn struct {
	t    *testing.T
	tr   *quic.Transport
	udp  *net.UDPConn
	qc   *quic.Conn
	ctrl *quic.Stream
}

func rawDial(t *testing.T, s *Server) *rawConn {
	t.Helper()
	rc, err := rawTryDial(t, s)
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// rawTryDial is rawDial returning the dial's error (a refusal before the
// handshake, for example).
func rawTryDial(t *testing.T, s *Server) (*rawConn, error) {
	t.Helper()
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	return rawDialOn(t, s, udp)
}

// rawDialOn dials s from udp, which it owns from then on.
func rawDialOn(t *testing.T, s *Server, udp *net.UDPConn) (*rawConn, error) {
	t.Helper()
	tr := &quic.Transport{Conn: udp}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	qc, err := tr.Dial(ctx, s.Addr(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{ALPN}}, &quic.Config{MaxIdleTimeout: 5 * time.Second})
	if err != nil {
		tr.Close()
		udp.Close()
		return nil, err
	}
	rc := &rawConn{t: t, tr: tr, udp: udp, qc: qc}
	t.Cleanup(rc.close)
	return rc, nil
}

func (rc *rawConn) close() {
	rc.qc.CloseWithError(0, "")
	rc.tr.Close()
	rc.udp.Close()
}

func frameBytes(t *testing.T, ft FrameType, m proto.Message) []byte {
	t.Helper()
	b, err := appendFrame(nil, ft, m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// auth opens the control stream and authenticates.
func (rc *rawConn) auth(id, token string) {
	rc.t.Helper()
	st, err := rc.qc.OpenStreamSync(context.Background())
	if err != nil {
		rc.t.Fatal(err)
	}
	rc.ctrl = st
	st.Write(frameBytes(rc.t, FrameAuth, &h3xpb.Auth{ClientId: id, Token: token}))
	var res h3xpb.AuthResult
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameAuthResult, &res); err != nil {
		rc.t.Fatalf("auth: %v", err)
	}
}

// closeCode waits for the connection to close and returns its application
// error code.
func (rc *rawConn) closeCode() ErrorCode {
	rc.t.Helper()
	select {
	case <-rc.qc.Context().Done():
	case <-time.After(10 * time.Second):
		rc.t.Fatal("connection not closed")
	}
	var ae *quic.ApplicationError
	if !errors.As(context.Cause(rc.qc.Context()), &ae) {
		rc.t.Fatalf("closed without an application error: %v", context.Cause(rc.qc.Context()))
	}
	return ErrorCode(ae.ErrorCode)
}

// stream opens a data stream, writes b and finishes the send side if fin.
func (rc *rawConn) stream(b []byte, fin bool) *quic.Stream {
	rc.t.Helper()
	st, err := rc.qc.OpenStreamSync(context.Background())
	if err != nil {
		rc.t.Fatal(err)
	}
	if _, err := st.Write(b); err != nil {
		rc.t.Fatal(err)
	}
	if fin {
		st.Close()
	}
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	return st
}

// streamError reads a stream to its end and returns the code of the Error
// frame it carried, or of the reset that ended it.
func streamError(t *testing.T, st *quic.Stream) ErrorCode {
	t.Helper()
	fr := newFrameReader(st, DefaultMaxFrameSize)
	for {
		ft, payload, err := fr.next()
		if err != nil {
			var se *quic.StreamError
			if errors.As(err, &se) {
				return ErrorCode(se.ErrorCode)
			}
			t.Fatalf("stream ended without an error: %v", err)
		}
		if ft == FrameError {
			var e h3xpb.Error
			if err := proto.Unmarshal(payload, &e); err != nil {
				t.Fatal(err)
			}
			return ErrorCode(e.GetCode())
		}
	}
}

func TestServerBadInputRaw(t *testing.T) {
	s := testServer(t, WithAuthTimeout(300*time.Millisecond), WithMaxFrameSize(4096))
	sendEvent := frameBytes(t, FrameSendEvent, &h3xpb.SendEvent{RequestId: 1, Events: []*h3xpb.EventPayload{{Namespace: "orders"}}})

	t.Run("frames before Auth", func(t *testing.T) {
		rc := rawDial(t, s)
		st, _ := rc.qc.OpenStreamSync(context.Background())
		st.Write(sendEvent)
		if got := rc.closeCode(); got != CodeUnauthenticated {
			t.Fatalf("close code %v, want %v", got, CodeUnauthenticated)
		}
	})
	t.Run("no Auth within the timeout", func(t *testing.T) {
		rc := rawDial(t, s)
		if got := rc.closeCode(); got != CodeAuthTimeout {
			t.Fatalf("close code %v, want %v", got, CodeAuthTimeout)
		}
	})
	t.Run("data stream before Auth is not served", func(t *testing.T) {
		rc := rawDial(t, s)
		ctrl, _ := rc.qc.OpenStreamSync(context.Background())
		_ = ctrl
		st, _ := rc.qc.OpenStreamSync(context.Background())
		st.Write(sendEvent)
		st.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := st.Read(make([]byte, 1)); err == nil {
			t.Fatal("a stream was answered before Auth")
		}
		if got := rc.closeCode(); got != CodeAuthTimeout {
			t.Fatalf("close code %v, want %v", got, CodeAuthTimeout)
		}
	})

	streamCases := []struct {
		name  string
		bytes []byte
		fin   bool
		want  ErrorCode
	}{
		{"oversized frame", []byte{byte(FrameSendEvent), 0xff, 0xff, 0xff, 0x7f}, false, CodeFrameTooLarge},
		{"random garbage", []byte{byte(FrameFetchEvents), 7, 0, 0, 0, 0xff, 0xfe, 0xfd, 0x01, 0x99, 0x42, 0x00}, true, CodeProtocolViolation},
		{"truncated frame then end of stream", sendEvent[:len(sendEvent)-3], true, CodeProtocolViolation},
		{"truncated header then end of stream", sendEvent[:3], true, CodeProtocolViolation},
		{"unknown frame type", []byte{0x7e, 0, 0, 0, 0}, false, CodeUnknownFrameType},
		{"server frame type on a session stream", append(append([]byte(nil), sendEvent...), frameBytes(t, FrameAuth, &h3xpb.Auth{})...), false, CodeProtocolViolation},
	}
	for _, tc := range streamCases {
		t.Run(tc.name, func(t *testing.T) {
			rc := rawDial(t, s)
			rc.auth("alice", "alice-token")
			st := rc.stream(tc.bytes, tc.fin)
			if got := streamError(t, st); got != tc.want {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			// The connection lives on.
			ok := rc.stream(sendEvent, true)
			var res h3xpb.SendResult
			if err := newFrameReader(ok, DefaultMaxFrameSize).readMessage(FrameSendResult, &res); err != nil {
				t.Fatalf("connection unusable after the bad stream: %v", err)
			}
			assertServing(t, s)
		})
	}

	t.Run("non-Ping frame on the control stream", func(t *testing.T) {
		rc := rawDial(t, s)
		rc.auth("alice", "alice-token")
		rc.ctrl.Write(sendEvent)
		if got := rc.closeCode(); got != CodeProtocolViolation {
			t.Fatalf("close code %v, want %v", got, CodeProtocolViolation)
		}
		assertServing(t, s)
	})
	t.Run("unknown frame type on the control stream is ignored", func(t *testing.T) {
		rc := rawDial(t, s)
		rc.auth("alice", "alice-token")
		rc.ctrl.Write([]byte{0x7d, 1, 0, 0, 0, 0})
		rc.ctrl.Write(frameBytes(t, FramePing, &h3xpb.Ping{Sequence: 9}))
		var pong h3xpb.Pong
		if err := newFrameReader(rc.ctrl, DefaultMaxFrameSize).readMessage(FramePong, &pong); err != nil || pong.GetSequence() != 9 {
			t.Fatalf("pong: %v %v", err, &pong)
		}
	})
}

func TestServerVanishedClientLeasesReturn(t *testing.T) {
	s := testServer(t, WithIdleTimeout(time.Second))
	pub := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := pub.Publish(ctx, Event{Namespace: "orders", Message: "one"}, Event{Namespace: "orders", Message: "two"}); err != nil {
		t.Fatal(err)
	}
	// A raw client leases both events, then starts a long poll and vanishes
	// without a CONNECTION_CLOSE (Transport.Close sends none).
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	st := rc.stream(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 1, Namespaces: []string{"orders"}, Limit: 10}), false)
	var batch h3xpb.EventsBatch
	if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameEventsBatch, &batch); err != nil || len(batch.GetEvents()) != 2 {
		t.Fatalf("fetch: %v, %d events", err, len(batch.GetEvents()))
	}
	st.Write(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 2, Namespaces: []string{"orders"}, Limit: 10, MaxWaitMs: 20000}))
	time.Sleep(50 * time.Millisecond)
	rc.tr.Close()
	rc.udp.Close()

	other := mustDial(t, s, "bob", "bob-token")
	got, err := other.Fetch(ctx, 10, "orders")
	if err != nil || len(got) != 2 {
		t.Fatalf("after the client vanished: %v, %d events", err, len(got))
	}
	if got[0].Attempt() != 2 {
		t.Fatalf("attempt %d, want 2", got[0].Attempt())
	}
}

func TestServerTooManyStreams(t *testing.T) {
	s := testServer(t, WithMaxStreams(2))
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	// The control stream counts: one more may be open at once.
	if _, err := rc.qc.OpenStream(); err != nil {
		t.Fatalf("first data stream: %v", err)
	}
	_, err := rc.qc.OpenStream()
	var limit *quic.StreamLimitReachedError
	if !errors.As(err, &limit) {
		t.Fatalf("OpenStream beyond the limit: %v, want StreamLimitReachedError", err)
	}
	assertServing(t, s)
}

func TestServerAddrAndClose(t *testing.T) {
	s := testServer(t)
	if s.Addr() == nil {
		t.Fatal("no address")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := s.Start(context.Background()); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Start after Close: %v", err)
	}
	if err := s.Shutdown(context.Background()); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Shutdown after Close: %v", err)
	}
}

var _ = io.EOF

// Two long polls pipelined on one stream are served one after the other: the
// second starts only once the first is answered, so it never leases an event
// that would then wait behind the first, still parked, poll.
func TestServerPipelinedFetchesOnOneStream(t *testing.T) {
	s := testServer(t)
	pub := mustDial(t, s, "alice", "alice-token")
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	fetch := func(id uint64) []byte {
		return frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: id, Namespaces: []string{"orders"}, Limit: 10, MaxWaitMs: 30000})
	}
	st := rc.stream(append(fetch(1), fetch(2)...), false)
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	fr := newFrameReader(st, DefaultMaxFrameSize)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i, msg := range []string{"one", "two"} {
		if _, err := pub.Publish(ctx, Event{Namespace: "orders", Message: msg}); err != nil {
			t.Fatal(err)
		}
		var batch h3xpb.EventsBatch
		if err := fr.readMessage(FrameEventsBatch, &batch); err != nil {
			t.Fatalf("answer %d: %v", i+1, err)
		}
		if batch.GetRequestId() != uint64(i+1) || len(batch.GetEvents()) != 1 || batch.GetEvents()[0].GetEvent().GetMessage() != msg {
			t.Fatalf("answer %d: request %d with %d events (%v), want request %d with %q", i+1, batch.GetRequestId(), len(batch.GetEvents()), batch.GetEvents(), i+1, msg)
		}
	}
}
