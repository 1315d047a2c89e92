package h3x

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// update regenerates the golden vectors, the fuzz seed corpus and the
// example session in PROTOCOL.md:
//
//	go test -run 'TestGolden|TestProtocolExampleSession|TestFuzzSeedCorpus' -update .
var update = flag.Bool("update", false, "rewrite testdata/golden, testdata/fuzz seeds and the PROTOCOL.md example session")

const goldenDir = "testdata/golden"

// Values shared by the canonical messages.
const (
	exampleID1 = "0b8e4f7c-5b7a-4d6e-9c1f-2a3b4c5d6e7f"
	exampleID2 = "5d2c9a10-3e4f-4a8b-b7c6-1d2e3f405162"
	exampleID3 = "9f1e2d3c-4b5a-4968-8776-655443322110"
	exampleID4 = "c0ffee00-1234-4abc-9def-0123456789ab"

	exampleTime     = 1767225600 // 2026-01-01T00:00:00Z, Unix seconds
	exampleTimeNano = exampleTime * int64(time.Second)
)

// exampleEvent returns a fully populated event.
func exampleEvent() *h3xpb.EventPayload {
	return &h3xpb.EventPayload{
		Id:        exampleID1,
		Namespace: "orders",
		Type:      "order.created",
		Message:   "order 1234 created",
		Data:      []byte(`{"order_id":1234,"total":"49.90"}`),
		Timestamp: exampleTime,
		Metadata:  map[string]string{"severity": "info", "service": "checkout", "env": "prod"},
	}
}

// goldenMessages holds the canonical message of every frame type, with
// every field populated. testdata/golden/<Name>.txt holds each one in text
// format and its exact frame bytes.
func goldenMessages() map[FrameType]proto.Message {
	return map[FrameType]proto.Message{
		FrameAuth: &h3xpb.Auth{
			ClientId:   "orders-service",
			Token:      "s3cr3t-t0ken",
			Namespaces: []string{"orders", "payments"},
			ClientName: "h3x-go/1.0.0",
		},
		FrameAuthResult: &h3xpb.AuthResult{
			ProtocolVersion: 1,
			SessionId:       "sess-7f3a9c",
			Grants: []*h3xpb.Grant{
				{Namespace: "orders", Permission: h3xpb.Permission_PERMISSION_ALL},
				{Namespace: "payments", Permission: h3xpb.Permission_PERMISSION_CONSUME},
			},
			Limits: &h3xpb.ServerLimits{
				MaxFrameSize:     DefaultMaxFrameSize,
				MaxFetchLimit:    1000,
				MaxFetchWaitMs:   30000,
				AckDeadlineMs:    30000,
				MaxAttempts:      10,
				MaxEventsPerSend: 1000,
				DedupWindowMs:    120000,
				MaxUnacked:       5000,
			},
			ServerName: "h3x/1.0.0",
		},
		FramePing: &h3xpb.Ping{Sequence: 7, SentUnixNano: exampleTimeNano},
		FramePong: &h3xpb.Pong{Sequence: 7, PingSentUnixNano: exampleTimeNano, SentUnixNano: exampleTimeNano + 250_000},
		FrameGoAway: &h3xpb.GoAway{
			Reason:           "server shutting down",
			ReconnectAfterMs: 2000,
		},
		FrameRateLimitNotice: &h3xpb.RateLimitNotice{
			Namespace:    "orders",
			RetryAfterMs: 250,
			Limit:        100.5,
			Burst:        200,
		},
		FrameError: &h3xpb.Error{
			Code:         h3xpb.ErrorCode_ERROR_CODE_QUEUE_FULL,
			Message:      "namespace orders is full",
			RetryAfterMs: 1000,
			RequestId:    42,
		},
		FrameSendEvent: &h3xpb.SendEvent{
			RequestId: 1,
			Events: []*h3xpb.EventPayload{
				exampleEvent(),
				{Namespace: "payments", Type: "payment.failed", Data: []byte{0x00, 0x01, 0xfe, 0xff}},
			},
			OmitStored: true,
		},
		FrameSendResult: &h3xpb.SendResult{
			RequestId:     1,
			StoredOmitted: 1, // the first of four events: stored with its own id (the second had none)
			Outcomes: []*h3xpb.PublishOutcome{
				{Id: exampleID1, Status: h3xpb.PublishStatus_PUBLISH_STATUS_STORED},
				{Id: exampleID2, Status: h3xpb.PublishStatus_PUBLISH_STATUS_DUPLICATE},
				{
					Id:           exampleID3,
					Status:       h3xpb.PublishStatus_PUBLISH_STATUS_REFUSED,
					Code:         h3xpb.ErrorCode_ERROR_CODE_QUEUE_FULL,
					Message:      "namespace payments is full",
					RetryAfterMs: 1000,
				},
			},
		},
		FrameFetchEvents: &h3xpb.FetchEvents{
			Namespaces: []string{"orders", "payments"},
			Limit:      10,
			MaxWaitMs:  5000,
			RequestId:  2,
			MaxBytes:   65536,
		},
		FrameEventsBatch: &h3xpb.EventsBatch{
			Events: []*h3xpb.Delivery{
				{Event: exampleEvent(), Attempt: 2, LeaseDeadlineMs: exampleTime*1000 + 30000},
			},
			RequestId: 2,
		},
		FrameAckEvent: &h3xpb.AckEvent{
			EventIds:   []string{exampleID1, exampleID2},
			RequestId:  3,
			Attempts:   []uint32{2, 1},
			Namespaces: []string{"orders", "orders"},
			OmitOk:     true,
		},
		FrameAckResult: &h3xpb.AckResult{
			RequestId: 3,
			OkOmitted: 1, // the first of five ids: settled
			Outcomes: []*h3xpb.SettleOutcome{
				{Id: exampleID2, Status: h3xpb.SettleStatus_SETTLE_STATUS_STALE},
				{Id: exampleID1, Status: h3xpb.SettleStatus_SETTLE_STATUS_OK},
				{Id: exampleID3, Status: h3xpb.SettleStatus_SETTLE_STATUS_UNKNOWN},
				{Id: exampleID4, Status: h3xpb.SettleStatus_SETTLE_STATUS_DENIED},
			},
		},
		FrameNackEvent: &h3xpb.NackEvent{
			EventIds:   []string{exampleID1},
			RequestId:  4,
			Attempts:   []uint32{2},
			DelayMs:    5000,
			Reason:     "downstream unavailable",
			Namespaces: []string{"orders"},
			Unseen:     true,
			OmitOk:     true,
		},
		FrameExtendLease: &h3xpb.ExtendLease{
			EventIds:   []string{exampleID1},
			RequestId:  5,
			Attempts:   []uint32{2},
			ExtendMs:   60000,
			Namespaces: []string{"orders"},
			OmitOk:     true,
		},
	}
}

// mustFrame encodes one frame or fails the test.
func mustFrame(tb testing.TB, t FrameType, m proto.Message) []byte {
	tb.Helper()
	b, err := appendFrame(nil, t, m)
	if err != nil {
		tb.Fatalf("appendFrame(%v): %v", t, err)
	}
	return b
}

// ---------------------------------------------------------------------------
// Frame types and the codec's basic contract.

func TestFrameTypeString(t *testing.T) {
	for ft, name := range frameNames {
		if got := ft.String(); got != name {
			t.Errorf("FrameType(0x%02x).String() = %q, want %q", uint8(ft), got, name)
		}
	}
	for _, tc := range []struct {
		t    FrameType
		want string
	}{
		{0x00, "0x00"}, {0x08, "0x08"}, {0x7f, "0x7f"}, {0x80, "0x80"}, {0xff, "0xff"},
	} {
		if got := tc.t.String(); got != tc.want {
			t.Errorf("FrameType(0x%02x).String() = %q, want %q", uint8(tc.t), got, tc.want)
		}
	}
}

// TestNewMessage checks that exactly the types in frameNames carry a message,
// that the message is the one the type is named after, and that no
// protocol type is in the application range.
func TestNewMessage(t *testing.T) {
	for i := range 256 {
		ft := FrameType(i)
		m := newMessage(ft)
		name, known := frameNames[ft]
		if (m != nil) != known {
			t.Errorf("newMessage(0x%02x) = %T, but frameNames has it: %v", i, m, known)
			continue
		}
		if !known {
			continue
		}
		if ft >= FirstApplicationFrameType {
			t.Errorf("protocol frame type %v (0x%02x) is in the application range", ft, i)
		}
		if got := m.ProtoReflect().Descriptor().FullName(); got != protoreflect.FullName("h3x.v1."+name) {
			t.Errorf("newMessage(%v) is a %s", ft, got)
		}
	}
}

func TestErrorCodeString(t *testing.T) {
	want := map[ErrorCode]string{
		CodeNone:               "none",
		CodeProtocolViolation:  "protocol violation",
		CodeUnauthenticated:    "unauthenticated",
		CodePermissionDenied:   "permission denied",
		CodeFrameTooLarge:      "frame too large",
		CodeUnknownFrameType:   "unknown frame type",
		CodeRateLimited:        "rate limited",
		CodeQueueFull:          "queue full",
		CodeStaleLease:         "stale lease",
		CodeInternal:           "internal error",
		CodeShuttingDown:       "shutting down",
		CodeInvalidArgument:    "invalid argument",
		CodeTooManyConnections: "too many connections",
		CodeAuthTimeout:        "auth timeout",
		14:                     "error code 14",
		math.MaxUint32:         "error code 4294967295",
	}
	for c, s := range want {
		if got := c.String(); got != s {
			t.Errorf("ErrorCode(%d).String() = %q, want %q", uint32(c), got, s)
		}
	}
}

// TestErrorCodesMatchProto checks that the Go codes and the wire enum agree:
// same numbers, and names that differ only in spelling.
func TestErrorCodesMatchProto(t *testing.T) {
	if got, want := len(h3xpb.ErrorCode_name), len(codeNames); got != want {
		t.Fatalf("proto has %d error codes, errors.go %d", got, want)
	}
	for n, protoName := range h3xpb.ErrorCode_name {
		name := strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(protoName, "ERROR_CODE_"), "_", " "))
		if name == "internal" {
			name = "internal error"
		}
		if got := ErrorCode(n).String(); got != name {
			t.Errorf("ErrorCode(%d).String() = %q, proto name %s", n, got, protoName)
		}
	}
}

func TestErrorCodeRetryable(t *testing.T) {
	retryable := map[ErrorCode]bool{
		CodeRateLimited: true, CodeQueueFull: true, CodeInternal: true,
		CodeShuttingDown: true, CodeTooManyConnections: true,
	}
	for c := range ErrorCode(len(codeNames) + 1) {
		if got := c.Retryable(); got != retryable[c] {
			t.Errorf("%v.Retryable() = %v, want %v", c, got, retryable[c])
		}
		if got := (&Error{Code: c}).Temporary(); got != retryable[c] {
			t.Errorf("(&Error{Code: %v}).Temporary() = %v", c, got)
		}
	}
}

func TestErrorWireRoundTrip(t *testing.T) {
	local := &Error{Code: CodeQueueFull, Message: "namespace orders is full", RetryAfter: 1500 * time.Microsecond}
	w := errorToWire(local, 42)
	want := &h3xpb.Error{Code: h3xpb.ErrorCode_ERROR_CODE_QUEUE_FULL, Message: "namespace orders is full", RetryAfterMs: 2, RequestId: 42}
	if !proto.Equal(w, want) {
		t.Fatalf("errorToWire = %v, want %v", w, want)
	}
	got := errorFromWire(w)
	if !got.Remote || got.Code != CodeQueueFull || got.RetryAfter != 2*time.Millisecond || got.Message != local.Message {
		t.Fatalf("errorFromWire = %#v", got)
	}
	if !errors.Is(got, ErrQueueFull) {
		t.Errorf("remote error does not match ErrQueueFull")
	}
	if s := got.Error(); s != "h3x: queue full: namespace orders is full (from peer) (retry after 2ms)" {
		t.Errorf("Error() = %q", s)
	}
	// Errors without a code do not leak their text.
	if w := errorToWire(errors.New("disk on fire: /var/lib/h3x"), 7); w.GetCode() != h3xpb.ErrorCode_ERROR_CODE_INTERNAL || w.GetMessage() != "internal error" || w.GetRequestId() != 7 {
		t.Errorf("errorToWire(plain error) = %v", w)
	}
}

func TestAppendFrameAppends(t *testing.T) {
	ping := &h3xpb.Ping{Sequence: 1}
	pong := &h3xpb.Pong{Sequence: 1}
	buf := []byte("prefix")
	buf, err := appendFrame(buf, FramePing, ping)
	if err != nil {
		t.Fatal(err)
	}
	buf, err = appendFrame(buf, FramePong, pong)
	if err != nil {
		t.Fatal(err)
	}
	want := append([]byte("prefix"), mustFrame(t, FramePing, ping)...)
	want = append(want, mustFrame(t, FramePong, pong)...)
	if !bytes.Equal(buf, want) {
		t.Fatalf("got % x\nwant % x", buf, want)
	}
	// An empty message is a frame with payload_length 0.
	if got := mustFrame(t, FramePing, &h3xpb.Ping{}); !bytes.Equal(got, []byte{byte(FramePing), 0, 0, 0, 0}) {
		t.Errorf("empty Ping = % x", got)
	}
	// appendRawFrame produces the same bytes as appendFrame.
	payload, _ := proto.MarshalOptions{Deterministic: true}.Marshal(ping)
	if got := appendRawFrame([]byte("prefix"), FramePing, payload); !bytes.Equal(got, want[:len("prefix")+frameHeaderLen+len(payload)]) {
		t.Errorf("appendRawFrame = % x", got)
	}
}

func TestAppendFrameInvalidMessage(t *testing.T) {
	// Invalid UTF-8 in a proto3 string cannot be marshaled; dst is returned unchanged.
	dst := []byte("keep")
	out, err := appendFrame(dst, FrameAuth, &h3xpb.Auth{ClientId: "\xff"})
	if err == nil {
		t.Fatal("appendFrame with invalid UTF-8 succeeded")
	}
	if string(out) != "keep" {
		t.Errorf("dst after a failed append = %q", out)
	}
}

// TestFrameReaderSequence reads every golden frame back to back through
// readers that return data in different chunkings.
func TestFrameReaderSequence(t *testing.T) {
	msgs := goldenMessages()
	var stream []byte
	var order []FrameType
	for ft := range FrameType(FirstApplicationFrameType) {
		if _, ok := msgs[ft]; ok {
			order = append(order, ft)
		}
	}
	for _, ft := range order {
		stream = append(stream, mustFrame(t, ft, msgs[ft])...)
	}
	// Add an application frame and an empty frame.
	stream = appendRawFrame(stream, 0x80, []byte("application bytes"))
	stream = appendRawFrame(stream, FramePing, nil)

	readers := map[string]func() io.Reader{
		"whole":   func() io.Reader { return bytes.NewReader(stream) },
		"onebyte": func() io.Reader { return iotest.OneByteReader(bytes.NewReader(stream)) },
		"half":    func() io.Reader { return iotest.HalfReader(bytes.NewReader(stream)) },
		"dataerr": func() io.Reader { return iotest.DataErrReader(bytes.NewReader(stream)) },
	}
	for name, mk := range readers {
		t.Run(name, func(t *testing.T) {
			fr := newFrameReader(mk(), 0)
			for _, ft := range order {
				got, payload, err := fr.next()
				if err != nil || got != ft {
					t.Fatalf("next() = %v, %v; want %v", got, err, ft)
				}
				m, err := decodeFrame(got, payload)
				if err != nil {
					t.Fatalf("decodeFrame(%v): %v", got, err)
				}
				if !proto.Equal(m, msgs[ft]) {
					t.Fatalf("%v decoded as %v", ft, m)
				}
			}
			ft, payload, err := fr.next()
			if err != nil || ft != 0x80 || string(payload) != "application bytes" {
				t.Fatalf("application frame: %v %q %v", ft, payload, err)
			}
			if _, err := decodeFrame(ft, payload); !errors.Is(err, ErrUnknownFrameType) {
				t.Errorf("decodeFrame(0x80) error = %v, want ErrUnknownFrameType", err)
			}
			ft, payload, err = fr.next()
			if err != nil || ft != FramePing || len(payload) != 0 {
				t.Fatalf("empty frame: %v %q %v", ft, payload, err)
			}
			if _, _, err := fr.next(); err != io.EOF {
				t.Fatalf("after the last frame: %v, want io.EOF", err)
			}
			if _, _, err := fr.next(); err != io.EOF {
				t.Fatalf("next() after io.EOF: %v, want io.EOF", err)
			}
		})
	}
}

// TestDecodedMessageOutlivesBuffer checks that a decoded message does not
// alias the reader's reused payload buffer.
func TestDecodedMessageOutlivesBuffer(t *testing.T) {
	first := &h3xpb.SendEvent{RequestId: 1, Events: []*h3xpb.EventPayload{exampleEvent()}}
	second := proto.Clone(first).(*h3xpb.SendEvent)
	second.RequestId = 2
	second.Events[0].Data = bytes.Repeat([]byte{'X'}, len(first.Events[0].Data))
	second.Events[0].Id = strings.Repeat("Y", len(first.Events[0].Id))
	stream := append(mustFrame(t, FrameSendEvent, first), mustFrame(t, FrameSendEvent, second)...)

	fr := newFrameReader(bytes.NewReader(stream), 0)
	ft, payload, err := fr.next()
	if err != nil {
		t.Fatal(err)
	}
	m, err := decodeFrame(ft, payload)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := fr.next(); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(m, first) {
		t.Fatalf("the first message changed after reading the second frame: %v", m)
	}
}

func TestReadMessage(t *testing.T) {
	auth := goldenMessages()[FrameAuth].(*h3xpb.Auth)
	t.Run("ok", func(t *testing.T) {
		fr := newFrameReader(bytes.NewReader(mustFrame(t, FrameAuth, auth)), 0)
		var got h3xpb.Auth
		if err := fr.readMessage(FrameAuth, &got); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(&got, auth) {
			t.Fatalf("got %v", &got)
		}
	})
	t.Run("wrong type", func(t *testing.T) {
		fr := newFrameReader(bytes.NewReader(mustFrame(t, FramePing, &h3xpb.Ping{})), 0)
		err := fr.readMessage(FrameAuthResult, new(h3xpb.AuthResult))
		if !errors.Is(err, ErrProtocolViolation) {
			t.Fatalf("err = %v, want ErrProtocolViolation", err)
		}
	})
	t.Run("error frame", func(t *testing.T) {
		frame := mustFrame(t, FrameError, &h3xpb.Error{Code: h3xpb.ErrorCode_ERROR_CODE_UNAUTHENTICATED, Message: "bad token"})
		fr := newFrameReader(bytes.NewReader(frame), 0)
		err := fr.readMessage(FrameAuthResult, new(h3xpb.AuthResult))
		var e *Error
		if !errors.As(err, &e) || !e.Remote || e.Code != CodeUnauthenticated || e.Message != "bad token" {
			t.Fatalf("err = %#v, want a remote unauthenticated error", err)
		}
	})
	t.Run("malformed", func(t *testing.T) {
		fr := newFrameReader(bytes.NewReader(appendRawFrame(nil, FrameAuth, []byte{0x0a, 0x05, 'a'})), 0)
		err := fr.readMessage(FrameAuth, new(h3xpb.Auth))
		if !errors.Is(err, ErrMalformedPayload) || !errors.Is(err, ErrProtocolViolation) {
			t.Fatalf("err = %v, want ErrMalformedPayload", err)
		}
	})
	t.Run("eof", func(t *testing.T) {
		fr := newFrameReader(bytes.NewReader(nil), 0)
		if err := fr.readMessage(FrameAuth, new(h3xpb.Auth)); err != io.EOF {
			t.Fatalf("err = %v, want io.EOF", err)
		}
	})
}

// TestDecodeIgnoresUnknownFields checks the forward-compatibility rule: a
// field this version does not know is skipped, and the known ones decode.
func TestDecodeIgnoresUnknownFields(t *testing.T) {
	payload, _ := proto.Marshal(&h3xpb.Ping{Sequence: 9})
	payload = protowire.AppendTag(payload, 99, protowire.BytesType)
	payload = protowire.AppendString(payload, "from a newer peer")
	payload = protowire.AppendTag(payload, 100, protowire.VarintType)
	payload = protowire.AppendVarint(payload, 1)
	m, err := decodeFrame(FramePing, payload)
	if err != nil {
		t.Fatal(err)
	}
	if got := m.(*h3xpb.Ping).GetSequence(); got != 9 {
		t.Errorf("sequence = %d", got)
	}
}

// ---------------------------------------------------------------------------
// Bad input: each case yields its own documented error.

// hugeFrameReader claims a 4 GiB payload and then supplies bytes forever.
type hugeFrameReader struct {
	hdr  []byte
	read int64 // bytes handed out after the header
}

func (r *hugeFrameReader) Read(p []byte) (int, error) {
	if len(r.hdr) > 0 {
		n := copy(p, r.hdr)
		r.hdr = r.hdr[n:]
		return n, nil
	}
	for i := range p {
		p[i] = 0xAA
	}
	r.read += int64(len(p))
	return len(p), nil
}

func TestFrameReaderHugeLength(t *testing.T) {
	for _, maxSize := range []uint32{0, 4096, math.MaxUint32 - 1} {
		t.Run(fmt.Sprintf("max=%d", maxSize), func(t *testing.T) {
			r := &hugeFrameReader{hdr: []byte{byte(FrameSendEvent), 0xff, 0xff, 0xff, 0xff}}
			fr := newFrameReader(r, maxSize)

			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			ft, payload, err := fr.next()
			runtime.ReadMemStats(&after)

			if !errors.Is(err, ErrFrameTooLarge) {
				t.Fatalf("err = %v, want ErrFrameTooLarge", err)
			}
			if ft != FrameSendEvent || payload != nil {
				t.Errorf("next() = %v, %d payload bytes", ft, len(payload))
			}
			if allocated := after.TotalAlloc - before.TotalAlloc; allocated >= 64<<10 {
				t.Errorf("allocated %d bytes for a frame it refused", allocated)
			}
			if r.read != 0 {
				t.Errorf("read %d payload bytes of a frame it refused", r.read)
			}
			if cap(fr.buf) != 0 {
				t.Errorf("buffer capacity %d", cap(fr.buf))
			}
		})
	}
}

// TestFrameReaderAtMaximum checks the boundary: payload_length == max is
// accepted, max+1 is refused before reading the payload.
func TestFrameReaderAtMaximum(t *testing.T) {
	const maxSize = 1000
	ok := appendRawFrame(nil, 0x80, bytes.Repeat([]byte{1}, maxSize))
	fr := newFrameReader(bytes.NewReader(ok), maxSize)
	if _, p, err := fr.next(); err != nil || len(p) != maxSize {
		t.Fatalf("frame of max size: %d bytes, %v", len(p), err)
	}
	if cap(fr.buf) > maxSize {
		t.Errorf("buffer capacity %d above the maximum %d", cap(fr.buf), maxSize)
	}

	tooBig := appendRawFrame(nil, 0x80, bytes.Repeat([]byte{1}, maxSize+1))
	r := bytes.NewReader(tooBig)
	fr = newFrameReader(r, maxSize)
	_, _, err := fr.next()
	if !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("frame of max+1 bytes: %v", err)
	}
	if consumed := len(tooBig) - r.Len(); consumed != frameHeaderLen {
		t.Errorf("consumed %d bytes of a refused frame, want only the header", consumed)
	}
	if want := "h3x: frame too large: 0x80 frame of 1001 bytes exceeds the maximum of 1000"; err.Error() != want {
		t.Errorf("error text %q, want %q", err, want)
	}

	// The default maximum is 1 MiB.
	if fr := newFrameReader(nil, 0); fr.max != DefaultMaxFrameSize || DefaultMaxFrameSize != 1<<20 {
		t.Errorf("default maximum = %d", fr.max)
	}
}

// TestFrameReaderSmallMaximum checks that the buffer never grows past a
// maximum below the reader's usual minimum allocation.
func TestFrameReaderSmallMaximum(t *testing.T) {
	fr := newFrameReader(bytes.NewReader(appendRawFrame(nil, 0x80, []byte("abc"))), 64)
	if _, _, err := fr.next(); err != nil {
		t.Fatal(err)
	}
	if cap(fr.buf) > 64 {
		t.Errorf("buffer capacity %d above the maximum 64", cap(fr.buf))
	}
}

var errStreamReset = errors.New("stream reset by peer")

func TestFrameReaderBadInput(t *testing.T) {
	ping := mustFrame(t, FramePing, &h3xpb.Ping{Sequence: 1, SentUnixNano: exampleTimeNano})
	concat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }

	tests := []struct {
		name   string
		r      io.Reader
		frames int   // good frames before the error
		want   error // the error next() returns after them
	}{
		{"clean EOF", bytes.NewReader(nil), 0, io.EOF},
		{"clean EOF after frame", bytes.NewReader(ping), 1, io.EOF},
		{"truncated header 1 byte", bytes.NewReader(ping[:1]), 0, ErrTruncatedHeader},
		{"truncated header 4 bytes", bytes.NewReader(ping[:4]), 0, ErrTruncatedHeader},
		{"truncated header after frame", bytes.NewReader(concat(ping, ping[:3])), 1, ErrTruncatedHeader},
		{"truncated payload", bytes.NewReader(ping[:len(ping)-1]), 0, ErrTruncatedPayload},
		{"EOF right after header", bytes.NewReader(ping[:frameHeaderLen]), 0, ErrTruncatedPayload},
		{"EOF mid-frame after frame", bytes.NewReader(concat(ping, ping[:7])), 1, ErrTruncatedPayload},
		{"EOF mid-frame, data with EOF", iotest.DataErrReader(bytes.NewReader(concat(ping, ping[:7]))), 1, ErrTruncatedPayload},
		{"EOF mid-frame, one byte at a time", iotest.OneByteReader(bytes.NewReader(concat(ping, ping[:7]))), 1, ErrTruncatedPayload},
		{"frame too large", bytes.NewReader([]byte{byte(FramePing), 0x01, 0x00, 0x10, 0x00}), 0, ErrFrameTooLarge},
		{"stream error before frame", iotest.ErrReader(errStreamReset), 0, errStreamReset},
		{"stream error in header", io.MultiReader(bytes.NewReader(ping[:2]), iotest.ErrReader(errStreamReset)), 0, errStreamReset},
		{"stream error in payload", io.MultiReader(bytes.NewReader(ping[:6]), iotest.ErrReader(errStreamReset)), 0, errStreamReset},
		{"timeout", iotest.TimeoutReader(bytes.NewReader(ping)), 0, iotest.ErrTimeout},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fr := newFrameReader(tc.r, 0)
			for i := range tc.frames {
				if _, _, err := fr.next(); err != nil {
					t.Fatalf("frame %d: %v", i, err)
				}
			}
			_, _, err := fr.next()
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}

	// A reader error inside the header is returned as is, not as a truncation.
	t.Run("timeout inside header", func(t *testing.T) {
		fr := newFrameReader(iotest.TimeoutReader(iotest.OneByteReader(bytes.NewReader(ping))), 0)
		if _, _, err := fr.next(); !errors.Is(err, iotest.ErrTimeout) {
			t.Fatalf("err = %v, want the reader's error", err)
		}
	})
}

func TestDecodeFrameBadInput(t *testing.T) {
	tests := []struct {
		name    string
		t       FrameType
		payload []byte
		want    error
	}{
		{"unknown frame type 0x00", 0x00, nil, ErrUnknownFrameType},
		{"unknown frame type 0x7f", 0x7f, []byte{0x08, 0x01}, ErrUnknownFrameType},
		{"application frame type", 0x80, []byte("anything"), ErrUnknownFrameType},
		{"truncated length-delimited field", FrameAuth, []byte{0x0a, 0x05, 'a'}, ErrMalformedPayload},
		{"truncated varint", FramePing, []byte{0x08, 0x80}, ErrMalformedPayload},
		{"invalid wire type", FramePing, []byte{0x0f}, ErrMalformedPayload},
		{"field number zero", FramePing, []byte{0x00, 0x01}, ErrMalformedPayload},
		{"invalid UTF-8 string", FrameAuth, []byte{0x0a, 0x01, 0xff}, ErrMalformedPayload},
		{"wrong wire type for nested message", FrameAuthResult, []byte{0x22, 0x02, 0xff, 0xff}, ErrMalformedPayload},
		{"varint overflow", FramePing, []byte{0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, ErrMalformedPayload},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, err := decodeFrame(tc.t, tc.payload)
			if !errors.Is(err, tc.want) {
				t.Fatalf("decodeFrame = %v, %v; want %v", m, err, tc.want)
			}
			if m != nil {
				t.Errorf("decodeFrame returned a message with an error")
			}
		})
	}
}

// TestErrorsIsMatrix checks that each frame error matches itself, its code
// sentinel and (for the truncations) io.ErrUnexpectedEOF, and nothing else.
func TestErrorsIsMatrix(t *testing.T) {
	tooLarge := readErr(t, []byte{byte(FramePing), 0xff, 0xff, 0xff, 0xff})
	truncHeader := readErr(t, []byte{byte(FramePing), 0x01})
	truncPayload := readErr(t, []byte{byte(FramePing), 0x02, 0, 0, 0, 0x08})
	_, malformed := decodeFrame(FramePing, []byte{0x08})
	_, unknown := decodeFrame(0x7f, nil)

	targets := []struct {
		name string
		err  error
	}{
		{"ErrFrameTooLarge", ErrFrameTooLarge},
		{"ErrTruncatedHeader", ErrTruncatedHeader},
		{"ErrTruncatedPayload", ErrTruncatedPayload},
		{"ErrMalformedPayload", ErrMalformedPayload},
		{"ErrUnknownFrameType", ErrUnknownFrameType},
		{"ErrProtocolViolation", ErrProtocolViolation},
		{"io.ErrUnexpectedEOF", io.ErrUnexpectedEOF},
		{"io.EOF", io.EOF},
		{"ErrInternal", ErrInternal},
	}
	cases := []struct {
		name    string
		err     error
		matches []string
	}{
		{"frame too large", tooLarge, []string{"ErrFrameTooLarge"}},
		{"truncated header", truncHeader, []string{"ErrTruncatedHeader", "ErrProtocolViolation", "io.ErrUnexpectedEOF"}},
		{"truncated payload", truncPayload, []string{"ErrTruncatedPayload", "ErrProtocolViolation", "io.ErrUnexpectedEOF"}},
		{"malformed payload", malformed, []string{"ErrMalformedPayload", "ErrProtocolViolation"}},
		{"unknown frame type", unknown, []string{"ErrUnknownFrameType"}},
		{"clean EOF", readErr(t, nil), []string{"io.EOF"}},
	}
	for _, c := range cases {
		if c.err == nil {
			t.Fatalf("%s: no error", c.name)
		}
		for _, target := range targets {
			want := false
			for _, m := range c.matches {
				want = want || m == target.name
			}
			if got := errors.Is(c.err, target.err); got != want {
				t.Errorf("errors.Is(%s error %q, %s) = %v, want %v", c.name, c.err, target.name, got, want)
			}
		}
	}

	// Wire codes: what a receiver puts in its Error frame and stream reset.
	codes := map[string]ErrorCode{
		"frame too large":    CodeFrameTooLarge,
		"truncated header":   CodeProtocolViolation,
		"truncated payload":  CodeProtocolViolation,
		"malformed payload":  CodeProtocolViolation,
		"unknown frame type": CodeUnknownFrameType,
	}
	for _, c := range cases {
		want, ok := codes[c.name]
		if !ok {
			continue
		}
		var e *Error
		if !errors.As(c.err, &e) || e.Code != want {
			t.Errorf("%s: code %v, want %v", c.name, e, want)
		}
	}

	// Every code sentinel matches every *Error of its code, local or
	// remote, and no other.
	sentinels := []*Error{
		ErrProtocolViolation, ErrUnauthenticated, ErrPermissionDenied, ErrFrameTooLarge,
		ErrUnknownFrameType, ErrRateLimited, ErrQueueFull, ErrStaleLease, ErrInternal,
		ErrShuttingDown, ErrInvalidArgument, ErrTooManyConnections, ErrAuthTimeout,
	}
	for i, s := range sentinels {
		if s.Code != ErrorCode(i+1) {
			t.Errorf("sentinel %d has code %v", i, s.Code)
		}
		for _, other := range sentinels {
			for _, e := range []*Error{{Code: other.Code, Message: "x"}, {Code: other.Code, Remote: true}} {
				if got, want := errors.Is(e, s), s == other; got != want {
					t.Errorf("errors.Is(%v, %v) = %v", e, s, got)
				}
			}
		}
		// A specific error is not matched by a remote or detailed one.
		if errors.Is(s, &Error{Code: s.Code, Message: "detail"}) || errors.Is(s, &Error{Code: s.Code, Remote: true}) {
			t.Errorf("%v matched a detailed or remote target", s)
		}
	}
}

func readErr(t *testing.T, b []byte) error {
	t.Helper()
	_, _, err := newFrameReader(bytes.NewReader(b), 0).next()
	return err
}

// ---------------------------------------------------------------------------
// Allocations and benchmarks.

// loopReader replays one buffer forever, one frame per Read.
type loopReader struct {
	b   []byte
	off int
}

func (r *loopReader) Read(p []byte) (int, error) {
	n := copy(p, r.b[r.off:])
	r.off = (r.off + n) % len(r.b)
	return n, nil
}

// benchMessages returns typical event frames whose payloads are exactly 256 bytes.
func benchMessages(tb testing.TB) map[string]struct {
	t FrameType
	m proto.Message
} {
	tb.Helper()
	pad := func(size func(n int) int, set func(n int)) {
		for n := range 256 {
			if size(n) == 256 {
				set(n)
				return
			}
		}
		tb.Fatal("cannot pad to 256 bytes")
	}
	ev := exampleEvent()
	send := &h3xpb.SendEvent{RequestId: 1234, Events: []*h3xpb.EventPayload{ev}}
	pad(func(n int) int { ev.Data = bytes.Repeat([]byte{'x'}, n); return proto.Size(send) }, func(n int) { ev.Data = bytes.Repeat([]byte{'x'}, n) })

	ev2 := exampleEvent()
	batch := &h3xpb.EventsBatch{RequestId: 1234, Events: []*h3xpb.Delivery{{Event: ev2, Attempt: 1, LeaseDeadlineMs: exampleTime*1000 + 30000}}}
	pad(func(n int) int { ev2.Data = bytes.Repeat([]byte{'x'}, n); return proto.Size(batch) }, func(n int) { ev2.Data = bytes.Repeat([]byte{'x'}, n) })

	return map[string]struct {
		t FrameType
		m proto.Message
	}{
		"SendEvent":   {FrameSendEvent, send},
		"EventsBatch": {FrameEventsBatch, batch},
	}
}

// TestFrameAllocs enforces the allocation budget: reading a frame allocates
// nothing in steady state, and decoding one allocates at most one object
// besides what unmarshaling the protobuf message itself costs.
func TestFrameAllocs(t *testing.T) {
	if testing.CoverMode() != "" {
		t.Skip("allocation counts are not meaningful under -cover")
	}
	for name, bm := range benchMessages(t) {
		t.Run(name, func(t *testing.T) {
			frame := mustFrame(t, bm.t, bm.m)
			payload := frame[frameHeaderLen:]
			if len(payload) != 256 {
				t.Fatalf("payload is %d bytes", len(payload))
			}
			fr := newFrameReader(&loopReader{b: frame}, 0)

			read := testing.AllocsPerRun(1000, func() {
				if _, _, err := fr.next(); err != nil {
					t.Fatal(err)
				}
			})
			if read != 0 {
				t.Errorf("frameReader.next: %v allocs per frame, want 0", read)
			}

			message := testing.AllocsPerRun(1000, func() {
				m := newMessage(bm.t)
				if err := proto.Unmarshal(payload, m); err != nil {
					t.Fatal(err)
				}
			})
			decode := testing.AllocsPerRun(1000, func() {
				ft, p, err := fr.next()
				if err != nil {
					t.Fatal(err)
				}
				if _, err := decodeFrame(ft, p); err != nil {
					t.Fatal(err)
				}
			})
			if decode > message+1 {
				t.Errorf("read and decode: %v allocs per frame; the message alone costs %v", decode, message)
			}

			// Encoding costs what deterministic marshaling costs (protobuf-go
			// allocates while marshaling maps), and nothing more.
			buf := make([]byte, 0, 1024)
			marshal := testing.AllocsPerRun(1000, func() {
				var err error
				if buf, err = (proto.MarshalOptions{Deterministic: true}).MarshalAppend(buf[:0], bm.m); err != nil {
					t.Fatal(err)
				}
			})
			encode := testing.AllocsPerRun(1000, func() {
				var err error
				if buf, err = appendFrame(buf[:0], bm.t, bm.m); err != nil {
					t.Fatal(err)
				}
			})
			if encode > marshal {
				t.Errorf("appendFrame into a large enough buffer: %v allocs per frame; marshaling alone costs %v", encode, marshal)
			}
			t.Logf("allocs per frame: read %v, read+decode %v (unmarshal alone %v), encode %v (marshal alone %v)", read, decode, message, encode, marshal)
		})
	}
}

func BenchmarkFrame(b *testing.B) {
	for name, bm := range benchMessages(b) {
		frame := mustFrame(b, bm.t, bm.m)
		b.Run(name+"/Encode", func(b *testing.B) {
			buf := make([]byte, 0, 1024)
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			for b.Loop() {
				var err error
				if buf, err = appendFrame(buf[:0], bm.t, bm.m); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(name+"/Read", func(b *testing.B) {
			fr := newFrameReader(&loopReader{b: frame}, 0)
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := fr.next(); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(name+"/Decode", func(b *testing.B) {
			fr := newFrameReader(&loopReader{b: frame}, 0)
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			for b.Loop() {
				ft, p, err := fr.next()
				if err != nil {
					b.Fatal(err)
				}
				if _, err := decodeFrame(ft, p); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(name+"/UnmarshalOnly", func(b *testing.B) {
			payload := frame[frameHeaderLen:]
			b.SetBytes(int64(len(payload)))
			b.ReportAllocs()
			for b.Loop() {
				if err := proto.Unmarshal(payload, newMessage(bm.t)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// ---------------------------------------------------------------------------
// Golden vectors.

// TestGoldenVectors checks every testdata/golden/<Name>.txt: the text-format
// message is the canonical one, encodes to exactly the frame bytes, and the
// frame bytes read and decode to the message.
func TestGoldenVectors(t *testing.T) {
	msgs := goldenMessages()
	if *update {
		for ft, m := range msgs {
			writeFile(t, filepath.Join(goldenDir, ft.String()+".txt"), goldenFile(t, ft, m))
		}
	}
	for ft, want := range msgs {
		t.Run(ft.String(), func(t *testing.T) {
			text, frame := readGolden(t, filepath.Join(goldenDir, ft.String()+".txt"))

			m := newMessage(ft)
			if err := prototext.Unmarshal([]byte(text), m); err != nil {
				t.Fatalf("message section: %v", err)
			}
			if !proto.Equal(m, want) {
				t.Fatalf("message section is\n%v\nwant (goldenMessages)\n%v\nrun with -update", m, want)
			}

			enc := mustFrame(t, ft, m)
			if !bytes.Equal(enc, frame) {
				t.Errorf("encoding differs from the golden bytes:\ngot  % x\nwant % x", enc, frame)
			}

			fr := newFrameReader(bytes.NewReader(frame), 0)
			gotType, payload, err := fr.next()
			if err != nil || gotType != ft {
				t.Fatalf("reading the golden bytes: %v, %v", gotType, err)
			}
			dec, err := decodeFrame(gotType, payload)
			if err != nil {
				t.Fatalf("decoding the golden bytes: %v", err)
			}
			if !proto.Equal(dec, m) {
				t.Errorf("golden bytes decode to\n%v\nwant\n%v", dec, m)
			}
			if _, _, err := fr.next(); err != io.EOF {
				t.Errorf("trailing bytes after the golden frame: %v", err)
			}

			// The golden file is what -update would write.
			if got, want := readFile(t, filepath.Join(goldenDir, ft.String()+".txt")), goldenFile(t, ft, want); got != want {
				t.Errorf("golden file is stale; run go test -run TestGoldenVectors -update")
			}
		})
	}
}

// TestGoldenCoversEveryFrameType checks that every protocol frame type has
// a canonical message with every field set, and no golden file is stray.
func TestGoldenCoversEveryFrameType(t *testing.T) {
	msgs := goldenMessages()
	for ft := range frameNames {
		m, ok := msgs[ft]
		if !ok {
			t.Errorf("no golden message for %v", ft)
			continue
		}
		if got, want := m.ProtoReflect().Descriptor(), newMessage(ft).ProtoReflect().Descriptor(); got != want {
			t.Errorf("golden message for %v is a %s", ft, got.FullName())
		}
		checkAllFieldsSet(t, ft.String(), m.ProtoReflect())
		if _, err := os.Stat(filepath.Join(goldenDir, ft.String()+".txt")); err != nil {
			t.Errorf("no golden file for %v: %v", ft, err)
		}
	}
	if len(msgs) != len(frameNames) {
		t.Errorf("%d golden messages for %d frame types", len(msgs), len(frameNames))
	}
	files, _ := filepath.Glob(filepath.Join(goldenDir, "*.txt"))
	names := make(map[string]bool)
	for _, n := range frameNames {
		names[n] = true
	}
	for _, f := range files {
		if !names[strings.TrimSuffix(filepath.Base(f), ".txt")] {
			t.Errorf("stray golden file %s", f)
		}
	}
}

// checkAllFieldsSet reports fields of m (and of its messages) left at zero.
func checkAllFieldsSet(t *testing.T, path string, m protoreflect.Message) {
	t.Helper()
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		if !m.Has(fd) {
			t.Errorf("%s.%s is not set in the golden message", path, fd.Name())
			continue
		}
		if fd.Kind() == protoreflect.MessageKind && !fd.IsMap() {
			if fd.IsList() {
				checkAllFieldsSetSomewhere(t, path+"."+string(fd.Name()), fd.Message(), m.Get(fd).List())
			} else {
				checkAllFieldsSet(t, path+"."+string(fd.Name()), m.Get(fd).Message())
			}
		}
	}
}

// checkAllFieldsSetSomewhere checks that each field of a repeated message is
// set in at least one element (a list may show optional fields only in some
// elements, as SendResult's refusal does).
func checkAllFieldsSetSomewhere(t *testing.T, path string, md protoreflect.MessageDescriptor, l protoreflect.List) {
	t.Helper()
	fields := md.Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		set := false
		for j := range l.Len() {
			if l.Get(j).Message().Has(fd) {
				set = true
				if fd.Kind() == protoreflect.MessageKind && !fd.IsMap() && !fd.IsList() {
					checkAllFieldsSet(t, path+"."+string(fd.Name()), l.Get(j).Message().Get(fd).Message())
				}
				break
			}
		}
		if !set {
			t.Errorf("%s[].%s is not set in any element of the golden message", path, fd.Name())
		}
	}
}

// doubleSpace undoes protobuf-go's deliberately unstable text output (it
// inserts a random second space after a field name) so that -update is
// reproducible.
var doubleSpace = regexp.MustCompile(`(?m)^(\s*[\w\[\].]+:) +`)

// goldenFile renders the golden vector file for one frame.
func goldenFile(tb testing.TB, ft FrameType, m proto.Message) string {
	tb.Helper()
	text, err := prototext.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(m)
	if err != nil {
		tb.Fatal(err)
	}
	frame := mustFrame(tb, ft, m)
	var sb strings.Builder
	fmt.Fprintf(&sb, "# H3X golden vector: the %v frame (type 0x%02x, message %s).\n", ft, uint8(ft), m.ProtoReflect().Descriptor().FullName())
	sb.WriteString("# Generated by `go test -run TestGoldenVectors -update`; see PROTOCOL.md.\n")
	sb.WriteString("#\n")
	sb.WriteString("# \"-- message --\" is the message in protobuf text format. \"-- frame --\" is\n")
	sb.WriteString("# the exact frame: hex bytes, each line commented after '#'. The payload\n")
	sb.WriteString("# is the deterministic protobuf encoding: fields in field-number order,\n")
	sb.WriteString("# map entries sorted by key. A receiver must accept any valid encoding.\n")
	sb.WriteString("-- message --\n")
	sb.WriteString(doubleSpace.ReplaceAllString(string(text), "$1 "))
	sb.WriteString("-- frame --\n")
	sb.WriteString(dumpFrame(frame))
	return sb.String()
}

// readGolden splits a golden file into its text-format message and its
// frame bytes.
func readGolden(t *testing.T, path string) (text string, frame []byte) {
	t.Helper()
	var msg, hexs strings.Builder
	section := ""
	for line := range strings.Lines(readFile(t, path)) {
		switch strings.TrimSpace(line) {
		case "-- message --", "-- frame --":
			section = strings.Trim(strings.TrimSpace(line), "- ")
			continue
		}
		switch section {
		case "message":
			msg.WriteString(line)
		case "frame":
			if i := strings.IndexByte(line, '#'); i >= 0 {
				line = line[:i]
			}
			hexs.WriteString(strings.Join(strings.Fields(line), ""))
		}
	}
	frame, err := hex.DecodeString(hexs.String())
	if err != nil {
		t.Fatalf("%s: frame section: %v", path, err)
	}
	if msg.Len() == 0 || len(frame) == 0 {
		t.Fatalf("%s: missing -- message -- or -- frame -- section", path)
	}
	return msg.String(), frame
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// ---------------------------------------------------------------------------
// Annotated hex dumps, used by the golden files and PROTOCOL.md.

// dumpFrame renders one frame as hex, one field per line, with comments
// naming the header fields and every protobuf field of the payload.
func dumpFrame(frame []byte) string {
	var d hexDump
	ft := FrameType(frame[0])
	size := binary.LittleEndian.Uint32(frame[1:frameHeaderLen])
	d.line(frame[:1], 0, fmt.Sprintf("frame_type = 0x%02x (%v)", uint8(ft), ft))
	d.line(frame[1:frameHeaderLen], 0, fmt.Sprintf("payload_length = %d (u32, little-endian)", size))
	payload := frame[frameHeaderLen:]
	m := newMessage(ft)
	if m == nil {
		d.chunks(payload, 0, "payload (application-defined)")
		return d.sb.String()
	}
	if len(payload) == 0 {
		d.comment(0, fmt.Sprintf("payload: %s, empty (every field has its default value)", m.ProtoReflect().Descriptor().FullName()))
		return d.sb.String()
	}
	d.comment(0, fmt.Sprintf("payload: %s", m.ProtoReflect().Descriptor().FullName()))
	d.message(payload, m.ProtoReflect().Descriptor(), 1)
	return d.sb.String()
}

type hexDump struct{ sb strings.Builder }

const hexColumn = 48 // 16 bytes per line: "xx " * 16

func (d *hexDump) line(b []byte, depth int, comment string) {
	fmt.Fprintf(&d.sb, "%-*s # %s%s\n", hexColumn, fmt.Sprintf("% x", b), strings.Repeat("  ", depth), comment)
}

func (d *hexDump) comment(depth int, comment string) {
	fmt.Fprintf(&d.sb, "%-*s # %s%s\n", hexColumn, "", strings.Repeat("  ", depth), comment)
}

// chunks writes b 16 bytes a line; the first line gets label, and every line
// shows its bytes as a quoted string when they are printable text.
func (d *hexDump) chunks(b []byte, depth int, label string) {
	for i := 0; i < len(b); i += 16 {
		c := b[i:min(i+16, len(b))]
		comment := ""
		if isPrintable(c) {
			comment = strconv.Quote(string(c))
		}
		if i == 0 && label != "" {
			comment = strings.TrimSpace(label + " " + comment)
		}
		if comment == "" {
			comment = "..."
		}
		d.line(c, depth, comment)
	}
}

func isPrintable(b []byte) bool {
	if !utf8.Valid(b) {
		return false
	}
	for _, r := range string(b) {
		if r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}

var wireTypeNames = map[protowire.Type]string{
	protowire.VarintType:     "VARINT",
	protowire.Fixed64Type:    "I64",
	protowire.BytesType:      "LEN",
	protowire.StartGroupType: "SGROUP",
	protowire.EndGroupType:   "EGROUP",
	protowire.Fixed32Type:    "I32",
}

// message annotates an encoded protobuf message of type md.
func (d *hexDump) message(b []byte, md protoreflect.MessageDescriptor, depth int) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			d.chunks(b, depth, "invalid tag")
			return
		}
		fd := md.Fields().ByNumber(num)
		name := "unknown field"
		if fd != nil {
			name = string(fd.Name())
			if fd.IsMap() {
				name += " (map entry)"
			}
		}
		d.line(b[:n], depth, fmt.Sprintf("%s: field %d, wire type %d (%s)", name, num, typ, wireTypeNames[typ]))
		b = b[n:]
		switch typ {
		case protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				d.chunks(b, depth+1, "invalid varint")
				return
			}
			d.line(b[:n], depth+1, describeVarint(fd, v))
			b = b[n:]
		case protowire.Fixed64Type:
			v, n := protowire.ConsumeFixed64(b)
			if n < 0 {
				d.chunks(b, depth+1, "truncated")
				return
			}
			desc := fmt.Sprintf("= %d (little-endian)", v)
			if fd != nil && fd.Kind() == protoreflect.DoubleKind {
				desc = fmt.Sprintf("= %v (IEEE 754 double, little-endian)", math.Float64frombits(v))
			}
			d.line(b[:n], depth+1, desc)
			b = b[n:]
		case protowire.Fixed32Type:
			v, n := protowire.ConsumeFixed32(b)
			if n < 0 {
				d.chunks(b, depth+1, "truncated")
				return
			}
			d.line(b[:n], depth+1, fmt.Sprintf("= %d (little-endian)", v))
			b = b[n:]
		case protowire.BytesType:
			l, n := protowire.ConsumeVarint(b)
			if n < 0 || uint64(len(b)-n) < l {
				d.chunks(b, depth+1, "truncated")
				return
			}
			d.line(b[:n], depth+1, fmt.Sprintf("length %d", l))
			b = b[n:]
			v := b[:l]
			b = b[l:]
			switch {
			case fd == nil:
				d.chunks(v, depth+1, "")
			case fd.Kind() == protoreflect.MessageKind:
				d.message(v, fd.Message(), depth+1)
			case fd.Kind() == protoreflect.StringKind:
				d.chunks(v, depth+1, "")
			case fd.Kind() == protoreflect.BytesKind:
				d.chunks(v, depth+1, "bytes")
			default: // packed repeated varints
				for i := 0; len(v) > 0; i++ {
					x, n := protowire.ConsumeVarint(v)
					if n < 0 {
						d.chunks(v, depth+1, "invalid varint")
						break
					}
					d.line(v[:n], depth+1, fmt.Sprintf("packed [%d] %s", i, describeVarint(fd, x)))
					v = v[n:]
				}
			}
		default:
			d.chunks(b, depth+1, "unsupported wire type")
			return
		}
	}
}

func describeVarint(fd protoreflect.FieldDescriptor, v uint64) string {
	if fd == nil {
		return fmt.Sprintf("= %d", v)
	}
	switch fd.Kind() {
	case protoreflect.EnumKind:
		if ev := fd.Enum().Values().ByNumber(protoreflect.EnumNumber(v)); ev != nil {
			return fmt.Sprintf("= %d (%s)", v, ev.Name())
		}
	case protoreflect.Int64Kind, protoreflect.Int32Kind:
		return fmt.Sprintf("= %d", int64(v))
	case protoreflect.BoolKind:
		return fmt.Sprintf("= %v", v != 0)
	}
	return fmt.Sprintf("= %d", v)
}

// ---------------------------------------------------------------------------
// PROTOCOL.md: the example session and the embedded schema are generated
// from the code and checked here.

const protocolDoc = "PROTOCOL.md"

type exampleFrame struct {
	dir    string // "client → server" or "server → client"
	stream string
	t      FrameType
	m      proto.Message
	note   string // what the frame does, and what follows it
}

func exampleSession() []exampleFrame {
	ev := &h3xpb.EventPayload{
		Id:        exampleID1,
		Namespace: "orders",
		Type:      "order.created",
		Data:      []byte(`{"order_id":1234}`),
		Timestamp: exampleTime,
		Metadata:  map[string]string{"service": "checkout"},
	}
	const c2s, s2c = "client → server", "server → client"
	return []exampleFrame{
		{c2s, "stream 0 (control)", FrameAuth,
			&h3xpb.Auth{ClientId: "orders-service", Token: "s3cr3t-t0ken", Namespaces: []string{"orders"}},
			"The client opens stream 0, its first bidirectional stream, and authenticates, asking for the namespace `orders`."},
		{s2c, "stream 0 (control)", FrameAuthResult,
			&h3xpb.AuthResult{
				ProtocolVersion: 1,
				SessionId:       "sess-7f3a9c",
				Grants:          []*h3xpb.Grant{{Namespace: "orders", Permission: h3xpb.Permission_PERMISSION_ALL}},
				Limits: &h3xpb.ServerLimits{
					MaxFrameSize: DefaultMaxFrameSize, MaxFetchLimit: 1000, MaxFetchWaitMs: 30000, AckDeadlineMs: 30000,
					MaxAttempts: 10, MaxEventsPerSend: 1000, DedupWindowMs: 120000,
				},
				ServerName: "h3x/1.0.0",
			},
			"The session is established: publish and consume on `orders`, the default limits except `max_unacked`, which is 0 here (this example's server has no unacked cap, `WithMaxUnacked(0)` in the Go implementation) and so omitted, as proto3 omits every zero value; a server with the default limits announces `max_unacked: 10000` (§8)."},
		{c2s, "stream 4 (session)", FrameSendEvent,
			&h3xpb.SendEvent{RequestId: 1, Events: []*h3xpb.EventPayload{ev}},
			"The client opens stream 4; its first frame, a `SendEvent`, makes it a session stream. The event carries its own id, so a retry would be deduplicated."},
		{s2c, "stream 4 (session)", FrameSendResult,
			&h3xpb.SendResult{RequestId: 1, Outcomes: []*h3xpb.PublishOutcome{{Id: exampleID1, Status: h3xpb.PublishStatus_PUBLISH_STATUS_STORED}}},
			"Sent once the event is durable."},
		{c2s, "stream 8 (session)", FrameFetchEvents,
			&h3xpb.FetchEvents{Namespaces: []string{"orders"}, Limit: 10, MaxWaitMs: 5000, RequestId: 2},
			"The client opens stream 8 for consuming: up to 10 events from `orders`, waiting up to 5 s."},
		{s2c, "stream 8 (session)", FrameEventsBatch,
			&h3xpb.EventsBatch{RequestId: 2, Events: []*h3xpb.Delivery{{Event: ev, Attempt: 1, LeaseDeadlineMs: exampleTime*1000 + 30000}}},
			"The event, first delivery, leased for 30 s."},
		{c2s, "stream 8 (session)", FrameAckEvent,
			&h3xpb.AckEvent{EventIds: []string{exampleID1}, RequestId: 3, Attempts: []uint32{1}, Namespaces: []string{"orders"}},
			"The client acks attempt 1 of the event, naming its namespace."},
		{s2c, "stream 8 (session)", FrameAckResult,
			&h3xpb.AckResult{RequestId: 3, Outcomes: []*h3xpb.SettleOutcome{{Id: exampleID1, Status: h3xpb.SettleStatus_SETTLE_STATUS_OK}}},
			"The event is gone for good."},
		{c2s, "stream 0 (control)", FramePing,
			&h3xpb.Ping{Sequence: 1, SentUnixNano: exampleTimeNano + 1_000_000},
			"The client measures the round-trip time."},
		{s2c, "stream 0 (control)", FramePong,
			&h3xpb.Pong{Sequence: 1, PingSentUnixNano: exampleTimeNano + 1_000_000, SentUnixNano: exampleTimeNano + 1_040_000},
			"The server echoes `sequence` and the ping's time, and adds its own."},
		{s2c, "stream 0 (control)", FrameGoAway,
			&h3xpb.GoAway{Reason: "server shutting down", ReconnectAfterMs: 1000},
			"The server shuts down. The client opens no new stream, finishes streams 4 and 8 (FIN), to which the server answers with FIN; the server then closes the connection with `CONNECTION_CLOSE` (type 0x1d) carrying error code 10 (`SHUTTING_DOWN`). The client reconnects after 1 s."},
	}
}

// exampleSessionMarkdown renders the example session for PROTOCOL.md.
func exampleSessionMarkdown(tb testing.TB) string {
	var sb strings.Builder
	var all []byte
	for i, f := range exampleSession() {
		frame := mustFrame(tb, f.t, f.m)
		all = append(all, frame...)
		fmt.Fprintf(&sb, "\n**%d. %s, %s: `%v`** (%d bytes). %s\n\n", i+1, f.dir, f.stream, f.t, len(frame), f.note)
		sb.WriteString("```text\n")
		sb.WriteString(dumpFrame(frame))
		sb.WriteString("```\n")
	}
	fmt.Fprintf(&sb, "\nIn all, %d frames and %d bytes of H3X frames.\n\n", len(exampleSession()), len(all))
	return sb.String()
}

// replaceBetween replaces the text between the marker lines
// <!-- name:begin --> and <!-- name:end -->.
func replaceBetween(doc, name, content string) (string, bool) {
	begin, end := "<!-- "+name+":begin -->\n", "<!-- "+name+":end -->"
	i := strings.Index(doc, begin)
	j := strings.Index(doc, end)
	if i < 0 || j < i {
		return doc, false
	}
	return doc[:i+len(begin)] + content + doc[j:], true
}

func TestProtocolExampleSession(t *testing.T) {
	doc := readFile(t, protocolDoc)
	want := doc
	want, ok1 := replaceBetween(want, "example-session", exampleSessionMarkdown(t))
	want, ok2 := replaceBetween(want, "proto", "\n```proto\n"+readFile(t, "proto/h3x.proto")+"```\n\n")
	if !ok1 || !ok2 {
		t.Fatalf("%s lacks the example-session or proto markers", protocolDoc)
	}
	if *update {
		writeFile(t, protocolDoc, want)
		return
	}
	if doc != want {
		t.Errorf("%s: the example session or Appendix A is stale; run go test -run TestProtocolExampleSession -update", protocolDoc)
	}

	// The example's bytes are a valid session: every frame reads and decodes.
	var stream []byte
	for _, f := range exampleSession() {
		stream = append(stream, mustFrame(t, f.t, f.m)...)
	}
	fr := newFrameReader(bytes.NewReader(stream), 0)
	for _, f := range exampleSession() {
		ft, payload, err := fr.next()
		if err != nil || ft != f.t {
			t.Fatalf("reading %v: %v, %v", f.t, ft, err)
		}
		m, err := decodeFrame(ft, payload)
		if err != nil || !proto.Equal(m, f.m) {
			t.Fatalf("decoding %v: %v, %v", f.t, m, err)
		}
	}
}
