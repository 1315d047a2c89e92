package h3x

import (
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// Tests of the server against PROTOCOL.md statements a third-party client
// relies on (found by a conformance review, 2026-11-26).

// authWith opens the control stream, sends a and returns the AuthResult.
func (rc *rawConn) authWith(a *h3xpb.Auth) *h3xpb.AuthResult {
	rc.t.Helper()
	st, err := rc.qc.OpenStreamSync(context.Background())
	if err != nil {
		rc.t.Fatal(err)
	}
	rc.ctrl = st
	st.Write(frameBytes(rc.t, FrameAuth, a))
	var res h3xpb.AuthResult
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameAuthResult, &res); err != nil {
		rc.t.Fatalf("auth: %v", err)
	}
	return &res
}

// request writes one request on a new data stream (its send side left
// open) and reads the first answer, with the reader's maximum frame size
// set to max: a frame above it is an error.
func (rc *rawConn) request(b []byte, max uint32) (FrameType, []byte, error) {
	rc.t.Helper()
	st := rc.stream(b, false)
	defer st.CancelRead(0)
	defer st.CancelWrite(0)
	return newFrameReader(st, max).next()
}

// call sends m, a frame of type ft, on a new stream and decodes the answer,
// which must be a frame of type want, into into (with proto.Unmarshal, the
// reference decoder).
func (rc *rawConn) call(ft FrameType, m proto.Message, want FrameType, into proto.Message) {
	rc.t.Helper()
	got, payload, err := rc.request(frameBytes(rc.t, ft, m), DefaultMaxFrameSize)
	if err != nil || got != want {
		rc.t.Fatalf("answer to %v: %v, %v; want %v", ft, got, err, want)
	}
	if err := proto.Unmarshal(payload, into); err != nil {
		rc.t.Fatal(err)
	}
}

// §8: "A sender MUST NOT send a larger frame [than the maximum frame size];
// the server never sends one." An AckResult echoes every ID, so a request
// of many short IDs used to get an answer twice its size; a SendResult
// echoed over-long IDs and invalid namespaces, and could hold more
// outcomes than a frame.
func TestAnswersNeverExceedMaxFrameSize(t *testing.T) {
	const maxFrame = 4096
	s := testServerWith(t, "alice:*=alice-token", WithMaxFrameSize(maxFrame))
	rc := rawDial(t, s)
	res := rc.authWith(&h3xpb.Auth{ClientId: "alice", Token: "alice-token"})
	l := res.GetLimits()
	if l.GetMaxFrameSize() != maxFrame {
		t.Fatalf("announced max_frame_size %d", l.GetMaxFrameSize())
	}
	perSend := int(l.GetMaxEventsPerSend())
	if perSend < 1 || perSend*maxOutcomeSize > maxFrame {
		t.Fatalf("announced max_events_per_send %d: %d outcomes of up to %d bytes do not fit a %d-byte frame", perSend, perSend, maxOutcomeSize, maxFrame)
	}

	t.Run("AckResult", func(t *testing.T) {
		ack := &h3xpb.AckEvent{RequestId: 1}
		for range 1300 {
			ack.EventIds = append(ack.EventIds, "x")
		}
		b := frameBytes(t, FrameAckEvent, ack)
		if len(b)-5 > maxFrame {
			t.Fatalf("request of %d bytes", len(b)-5)
		}
		ft, payload, err := rc.request(b, maxFrame)
		if err != nil {
			t.Fatalf("answer to a %d-byte AckEvent: %v", len(b)-5, err)
		}
		var e h3xpb.Error
		if ft != FrameError || proto.Unmarshal(payload, &e) != nil || ErrorCode(e.GetCode()) != CodeInvalidArgument || e.GetRequestId() != 1 {
			t.Fatalf("answer %v %v, want Error{INVALID_ARGUMENT, request 1}", ft, &e)
		}
		// A request whose answer fits is answered as usual.
		ft, _, err = rc.request(frameBytes(t, FrameAckEvent, &h3xpb.AckEvent{RequestId: 2, EventIds: ack.EventIds[:100]}), maxFrame)
		if err != nil || ft != FrameAckResult {
			t.Fatalf("answer to 100 ids: %v %v", ft, err)
		}
	})

	t.Run("SendResult", func(t *testing.T) {
		send := &h3xpb.SendEvent{RequestId: 3}
		for i := range perSend {
			p := &h3xpb.EventPayload{Namespace: "orders", Id: strings.Repeat("i", 20)}
			switch i % 3 {
			case 0:
				p.Namespace = strings.Repeat("!", 40) // invalid
			case 1:
				p.Id = strings.Repeat("L", 40) + "-too-long-" + strings.Repeat("L", 100)
			}
			send.Events = append(send.Events, p)
		}
		b := frameBytes(t, FrameSendEvent, send)
		if len(b)-5 > maxFrame {
			t.Fatalf("request of %d bytes", len(b)-5)
		}
		ft, payload, err := rc.request(b, maxFrame)
		if err != nil || ft != FrameSendResult {
			t.Fatalf("answer to %d events: %v %v", perSend, ft, err)
		}
		var sr h3xpb.SendResult
		if err := proto.Unmarshal(payload, &sr); err != nil || len(sr.GetOutcomes()) != perSend {
			t.Fatalf("SendResult: %v, %d outcomes", err, len(sr.GetOutcomes()))
		}
		for i, o := range sr.GetOutcomes() {
			if i%3 == 1 && (o.GetStatus() != h3xpb.PublishStatus_PUBLISH_STATUS_REFUSED || o.GetId() != "") {
				t.Errorf("outcome %d of a too-long id: %v, id %q echoed", i, o.GetStatus(), o.GetId())
			}
		}
		// One event more than announced is refused as a whole.
		send.Events = append(send.Events, &h3xpb.EventPayload{Namespace: "orders"})
		ft, _, err = rc.request(frameBytes(t, FrameSendEvent, send), maxFrame)
		if err != nil || ft != FrameError {
			t.Fatalf("answer to %d events: %v %v, want Error", perSend+1, ft, err)
		}
	})
}

// §3.4 ServerLimits: "A value of 0 in max_attempts means events are never
// dead-lettered; 0 in dedup_window_ms means no deduplication." The
// built-in queues dead-letter after 10 attempts and deduplicate for 2
// minutes by default (§8); AuthResult.limits used to leave both at 0.
func TestAuthResultAnnouncesMaxAttemptsAndDedupWindow(t *testing.T) {
	for _, tc := range []struct {
		name          string
		q             Queue
		attempts      uint32
		dedupWindowMs uint32
	}{
		{"defaults", NewMemoryQueue(QueueOptions{}), DefaultMaxAttempts, uint32(DefaultDedupWindow / time.Millisecond)},
		{"set", NewMemoryQueue(QueueOptions{MaxAttempts: 3, DedupWindow: time.Minute}), 3, 60000},
		{"off", NewMemoryQueue(QueueOptions{MaxAttempts: -1, DedupWindow: -1}), 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := testServerWith(t, "alice:orders=alice-token", WithQueue(tc.q))
			rc := rawDial(t, s)
			l := rc.authWith(&h3xpb.Auth{ClientId: "alice", Token: "alice-token"}).GetLimits()
			if l.GetMaxAttempts() != tc.attempts || l.GetDedupWindowMs() != tc.dedupWindowMs {
				t.Errorf("AuthResult.limits: max_attempts=%d dedup_window_ms=%d, want %d and %d", l.GetMaxAttempts(), l.GetDedupWindowMs(), tc.attempts, tc.dedupWindowMs)
			}
		})
	}
}

// §8 "Auth frame size | 64 KiB | before authentication the server accepts
// frames up to 64 KiB only: FRAME_TOO_LARGE, connection closed".
func TestOversizedAuthClosesFrameTooLarge(t *testing.T) {
	s := testServerWith(t, "alice:orders=alice-token")
	rc := rawDial(t, s)
	st, err := rc.qc.OpenStreamSync(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	st.Write([]byte{byte(FrameAuth), 0x01, 0x00, 0x01, 0x00}) // payload_length 65,537
	if got := rc.closeCode(); got != CodeFrameTooLarge {
		t.Fatalf("close code %v (%d), want %v", got, got, CodeFrameTooLarge)
	}
}

// §7.3: the stream ending inside the header or the payload is
// PROTOCOL_VIOLATION, "on the control stream: close the connection" (the
// table makes a before-Auth exception only for unknown and disallowed frame
// types, not for truncation).
func TestTruncatedAuthClosesProtocolViolation(t *testing.T) {
	s := testServerWith(t, "alice:orders=alice-token")
	auth := frameBytes(t, FrameAuth, &h3xpb.Auth{ClientId: "alice", Token: "alice-token"})
	for _, tc := range []struct {
		name string
		b    []byte
	}{{"header", auth[:3]}, {"payload", auth[:len(auth)-2]}} {
		t.Run(tc.name, func(t *testing.T) {
			rc := rawDial(t, s)
			st, err := rc.qc.OpenStreamSync(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			st.Write(tc.b)
			st.Close()
			if got := rc.closeCode(); got != CodeProtocolViolation {
				t.Fatalf("truncated Auth %s: close code %v (%d), want %v", tc.name, got, got, CodeProtocolViolation)
			}
		})
	}
}

// §5.1 Open state: "A malformed frame or a truncated frame closes the
// connection with PROTOCOL_VIOLATION" — Pong is a known frame type of the
// control stream, so a Pong whose payload is not a valid Pong is malformed.
func TestMalformedPongClosesConnection(t *testing.T) {
	s := testServerWith(t, "alice:orders=alice-token")
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	rc.ctrl.Write([]byte{byte(FramePong), 2, 0, 0, 0, 0xff, 0xff}) // a tag varint that never ends
	rc.ctrl.Write(frameBytes(t, FramePing, &h3xpb.Ping{Sequence: 1}))
	rc.ctrl.SetReadDeadline(time.Now().Add(5 * time.Second))
	ft, _, err := newFrameReader(rc.ctrl, DefaultMaxFrameSize).next()
	if err == nil {
		t.Fatalf("the server answered %v after a malformed Pong; want the connection closed with PROTOCOL_VIOLATION", ft)
	}
	if got := rc.closeCode(); got != CodeProtocolViolation {
		t.Fatalf("close code %v, want %v", got, CodeProtocolViolation)
	}
}

// §5.2 "Ending a stream": the client ends a session stream by finishing its
// send side; the server answers what it received "and then finishes its own
// send side"; §7.3: "the stream ends cleanly between frames | — | ... the
// client finished its requests". A data stream finished before any frame
// is such a stream: it is not an error, so no reset.
func TestEmptyDataStreamIsFinishedNotReset(t *testing.T) {
	s := testServerWith(t, "alice:orders=alice-token")
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	st := rc.stream(nil, true)
	_, err := io.ReadAll(st)
	if err != nil {
		t.Fatalf("an empty, finished data stream ended with %v, want a clean FIN", err)
	}
}

// §5.2: "A client that resets only its send side ... the server ends every
// pending request at once". The fetch queued behind a parked long poll used
// to be answered Error{SHUTTING_DOWN}, which (§7.1: "the server is going
// away") sends a client reconnecting, though the server was not shutting
// down; it is now answered with an empty EventsBatch, like the long poll.
func TestSendResetQueuedFetchIsNotShuttingDown(t *testing.T) {
	s := testServerWith(t, "alice:orders=alice-token")
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	fetch := func(id uint64) []byte {
		return frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: id, Namespaces: []string{"orders"}, Limit: 1, MaxWaitMs: 20000})
	}
	st := rc.stream(append(fetch(1), fetch(2)...), false)
	time.Sleep(100 * time.Millisecond) // both fetches read: 1 parked, 2 queued
	st.CancelWrite(0)
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	fr := newFrameReader(st, DefaultMaxFrameSize)
	for answered := 0; ; answered++ {
		ft, payload, err := fr.next()
		if err != nil {
			if answered < 1 {
				t.Fatalf("stream ended (%v) before the long poll was answered", err)
			}
			return
		}
		switch ft {
		case FrameEventsBatch:
		case FrameError:
			var e h3xpb.Error
			proto.Unmarshal(payload, &e)
			if ErrorCode(e.GetCode()) == CodeShuttingDown {
				t.Fatalf("fetch %d answered with Error{SHUTTING_DOWN} while the server is not shutting down", e.GetRequestId())
			}
		default:
			t.Fatalf("answer %v", ft)
		}
	}
}

// §5.1 GoAway: a client receiving GoAway "SHOULD let requests in flight
// complete: the server keeps answering requests already sent, and answers
// pending FetchEvents promptly (possibly with empty batches); SHOULD finish
// its data streams ... The server then closes the connection with
// SHUTTING_DOWN once its streams are drained or its shutdown deadline
// passes." §12 (frame 11): "The client opens no new stream, finishes
// streams 4 and 8 (FIN), to which the server answers with FIN; the server
// then closes the connection". With a 5 s shutdown deadline, a client with
// one parked long poll must get GoAway and the poll's answer, and, after
// handling the batch for 200 ms, finish its stream and get the server's FIN
// before the connection closes.
func TestGoAwayLetsClientDrain(t *testing.T) {
	s := testServerWith(t, "alice:orders=alice-token")
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	st := rc.stream(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 1, Namespaces: []string{"orders"}, MaxWaitMs: 20000}), false)
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	time.Sleep(100 * time.Millisecond) // the poll is parked
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done <- s.Shutdown(ctx)
	}()
	defer func() { <-done }()
	rc.ctrl.SetReadDeadline(time.Now().Add(10 * time.Second))
	var ga h3xpb.GoAway
	if err := newFrameReader(rc.ctrl, DefaultMaxFrameSize).readMessage(FrameGoAway, &ga); err != nil {
		t.Fatalf("GoAway not received: %v", err)
	}
	fr := newFrameReader(st, DefaultMaxFrameSize)
	var b h3xpb.EventsBatch
	if err := fr.readMessage(FrameEventsBatch, &b); err != nil {
		t.Fatalf("pending FetchEvents not answered after GoAway: %v", err)
	}
	time.Sleep(200 * time.Millisecond) // the client handles the batch
	st.Close()                         // and finishes its data stream
	if _, _, err := fr.next(); err != io.EOF {
		t.Fatalf("after the client's FIN: %v, want the server's FIN (io.EOF) before the connection closes", err)
	}
	if got := rc.closeCode(); got != CodeShuttingDown {
		t.Fatalf("close code %v, want %v", got, CodeShuttingDown)
	}
}

// An event refused for its (empty) namespace used to have its ID echoed
// whatever its length (the MaxEventIDLen check came after the namespace
// check), so the SendResult exceeded max_frame_size although the SendEvent
// fit and carried no more than max_events_per_send events.
func TestSendResultInvalidNamespaceLongIDFitsFrame(t *testing.T) {
	const maxFrame = 1024
	s := testServerWith(t, "alice:*=alice-token", WithMaxFrameSize(maxFrame))
	rc := rawDial(t, s)
	res := rc.authWith(&h3xpb.Auth{ClientId: "alice", Token: "alice-token"})
	perSend := int(res.GetLimits().GetMaxEventsPerSend())
	send := &h3xpb.SendEvent{RequestId: 1}
	for range perSend {
		send.Events = append(send.Events, &h3xpb.EventPayload{Namespace: "", Id: strings.Repeat("x", 164)})
	}
	b := frameBytes(t, FrameSendEvent, send)
	if len(b)-5 > maxFrame {
		t.Fatalf("request of %d bytes", len(b)-5)
	}
	ft, payload, err := rc.request(b, maxFrame)
	if err != nil {
		t.Fatalf("answer to a %d-byte SendEvent of %d events (announced max %d): %v", len(b)-5, perSend, perSend, err)
	}
	t.Logf("answer %v, %d bytes", ft, len(payload))
}

// §6.2, omitted outcomes: with SendEvent.omit_stored set, the server leaves
// out the outcomes of the leading events stored with the ids they carried,
// and counts them in stored_omitted; an event without an id, a duplicate
// or a refusal ends the run. Without the flag every outcome is sent.
func TestSendResultOmitsLeadingStoredOutcomes(t *testing.T) {
	s := testServerWith(t, "alice:*=alice-token")
	rc := rawDial(t, s)
	rc.authWith(&h3xpb.Auth{ClientId: "alice", Token: "alice-token"})
	ev := func(id string) *h3xpb.EventPayload {
		return &h3xpb.EventPayload{Id: id, Namespace: "orders", Type: "t"}
	}
	stored, dup, refused := h3xpb.PublishStatus_PUBLISH_STATUS_STORED, h3xpb.PublishStatus_PUBLISH_STATUS_DUPLICATE, h3xpb.PublishStatus_PUBLISH_STATUS_REFUSED
	tests := []struct {
		name     string
		events   []*h3xpb.EventPayload
		omit     bool
		omitted  uint32
		outcomes []h3xpb.PublishStatus // of the events after the omitted ones
	}{
		{"not asked", []*h3xpb.EventPayload{ev("a1"), ev("a2"), ev("a3")}, false, 0, []h3xpb.PublishStatus{stored, stored, stored}},
		{"all stored", []*h3xpb.EventPayload{ev("b1"), ev("b2"), ev("b3")}, true, 3, nil},
		{"one without an id", []*h3xpb.EventPayload{ev("c1"), ev(""), ev("c3")}, true, 1, []h3xpb.PublishStatus{stored, stored}},
		{"a refusal", []*h3xpb.EventPayload{ev("d1"), ev("d2"), {Id: "d3", Namespace: "not valid!"}, ev("d4")}, true, 2, []h3xpb.PublishStatus{refused, stored}},
		{"a duplicate first", []*h3xpb.EventPayload{ev("b1"), ev("e2")}, true, 0, []h3xpb.PublishStatus{dup, stored}},
		{"refused first", []*h3xpb.EventPayload{{Id: "f1"}, ev("f2")}, true, 0, []h3xpb.PublishStatus{refused, stored}},
		{"nothing", nil, true, 0, nil},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rid := uint64(i + 1)
			var res h3xpb.SendResult
			rc.call(FrameSendEvent, &h3xpb.SendEvent{RequestId: rid, Events: tt.events, OmitStored: tt.omit}, FrameSendResult, &res)
			if res.GetRequestId() != rid || res.GetStoredOmitted() != tt.omitted || len(res.GetOutcomes()) != len(tt.outcomes) {
				t.Fatalf("got %v, want request %d, %d omitted and %d outcomes", &res, rid, tt.omitted, len(tt.outcomes))
			}
			for j, o := range res.GetOutcomes() {
				sent := tt.events[int(tt.omitted)+j]
				if o.GetStatus() != tt.outcomes[j] {
					t.Errorf("outcome %d: %v, want %v", j, o.GetStatus(), tt.outcomes[j])
				}
				if sent.GetId() != "" && o.GetId() != sent.GetId() {
					t.Errorf("outcome %d names %q, want %q", j, o.GetId(), sent.GetId())
				}
				if sent.GetId() == "" && o.GetStatus() == stored && o.GetId() == "" {
					t.Errorf("outcome %d: the id assigned is not reported", j)
				}
			}
		})
	}
}

// §6.4, omitted outcomes: with omit_ok set, an AckEvent, NackEvent or
// ExtendLease is answered with the count of its leading applied
// settlements and outcomes for the rest only; the first element not
// applied ends the run. Without the flag every outcome is sent.
func TestAckResultOmitsLeadingOKOutcomes(t *testing.T) {
	s := testServerWith(t, "alice:orders=alice-token")
	rc := rawDial(t, s)
	rc.authWith(&h3xpb.Auth{ClientId: "alice", Token: "alice-token"})
	send := &h3xpb.SendEvent{RequestId: 1}
	for i := range 8 {
		send.Events = append(send.Events, &h3xpb.EventPayload{Id: fmt.Sprintf("e%d", i), Namespace: "orders", Type: "t"})
	}
	rc.call(FrameSendEvent, send, FrameSendResult, new(h3xpb.SendResult))
	var batch h3xpb.EventsBatch
	if rc.call(FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 2, Namespaces: []string{"orders"}, Limit: 8}, FrameEventsBatch, &batch); len(batch.GetEvents()) != 8 {
		t.Fatalf("fetch: %d deliveries", len(batch.GetEvents()))
	}
	ok, unknown, denied := h3xpb.SettleStatus_SETTLE_STATUS_OK, h3xpb.SettleStatus_SETTLE_STATUS_UNKNOWN, h3xpb.SettleStatus_SETTLE_STATUS_DENIED
	tests := []struct {
		name     string
		ft       FrameType
		msg      func(rid uint64) proto.Message
		omitted  uint32
		outcomes []h3xpb.SettleStatus // of the elements after the omitted ones
	}{
		{"extend all applied", FrameExtendLease, func(rid uint64) proto.Message {
			return &h3xpb.ExtendLease{RequestId: rid, EventIds: []string{"e0", "e1"}, OmitOk: true}
		}, 2, nil},
		{"ack with an unknown id", FrameAckEvent, func(rid uint64) proto.Message {
			return &h3xpb.AckEvent{RequestId: rid, EventIds: []string{"e0", "e1", "nope", "e2"}, OmitOk: true}
		}, 2, []h3xpb.SettleStatus{unknown, ok}},
		{"ack not asked", FrameAckEvent, func(rid uint64) proto.Message {
			return &h3xpb.AckEvent{RequestId: rid, EventIds: []string{"e3", "e4"}}
		}, 0, []h3xpb.SettleStatus{ok, ok}},
		{"nack denied first", FrameNackEvent, func(rid uint64) proto.Message {
			return &h3xpb.NackEvent{RequestId: rid, EventIds: []string{"e5", "e6"}, Namespaces: []string{"payments", "orders"}, OmitOk: true}
		}, 0, []h3xpb.SettleStatus{denied, ok}},
		{"ack already acked", FrameAckEvent, func(rid uint64) proto.Message {
			return &h3xpb.AckEvent{RequestId: rid, EventIds: []string{"e0", "e7"}, OmitOk: true}
		}, 0, []h3xpb.SettleStatus{unknown, ok}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rid := uint64(10 + i)
			var res h3xpb.AckResult
			rc.call(tt.ft, tt.msg(rid), FrameAckResult, &res)
			if res.GetRequestId() != rid || res.GetOkOmitted() != tt.omitted || len(res.GetOutcomes()) != len(tt.outcomes) {
				t.Fatalf("got %v, want request %d, %d omitted and %d outcomes", &res, rid, tt.omitted, len(tt.outcomes))
			}
			for j, o := range res.GetOutcomes() {
				if o.GetStatus() != tt.outcomes[j] {
					t.Errorf("outcome %d: %v, want %v", j, o.GetStatus(), tt.outcomes[j])
				}
			}
		})
	}
}
