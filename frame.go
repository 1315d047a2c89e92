package h3x

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// FrameType is a frame's one-byte discriminant (PROTOCOL.md §3).
//
// Types 0x01-0x7f are reserved for the protocol; 0x80-0xff are free for
// application frames served through Server.Handle.
type FrameType uint8

// The protocol's frame types.
const (
	FrameAuth            FrameType = 0x01 // client → server, control stream: Auth
	FrameAuthResult      FrameType = 0x02 // server → client, control stream: AuthResult
	FramePing            FrameType = 0x03 // either way, control stream: Ping
	FramePong            FrameType = 0x04 // either way, control stream: Pong
	FrameGoAway          FrameType = 0x05 // server → client, control stream: GoAway
	FrameRateLimitNotice FrameType = 0x06 // server → client, control stream: RateLimitNotice
	FrameError           FrameType = 0x07 // server → client, any stream: Error
	FrameSendEvent       FrameType = 0x10 // client → server: SendEvent
	FrameSendResult      FrameType = 0x11 // server → client: SendResult
	FrameFetchEvents     FrameType = 0x20 // client → server: FetchEvents
	FrameEventsBatch     FrameType = 0x21 // server → client: EventsBatch
	FrameAckEvent        FrameType = 0x22 // client → server: AckEvent
	FrameAckResult       FrameType = 0x23 // server → client: AckResult (answers ack, nack and extend)
	FrameNackEvent       FrameType = 0x24 // client → server: NackEvent
	FrameExtendLease     FrameType = 0x25 // client → server: ExtendLease

	// FirstApplicationFrameType is the lowest type an application may serve
	// with Server.Handle.
	FirstApplicationFrameType FrameType = 0x80
)

// DefaultMaxFrameSize is the default maximum payload_length a receiver accepts: 1 MiB.
const DefaultMaxFrameSize = 1 << 20

// frameHeaderLen is the size of a frame header: type (1) and length (4).
const frameHeaderLen = 5

var frameNames = map[FrameType]string{
	FrameAuth:            "Auth",
	FrameAuthResult:      "AuthResult",
	FramePing:            "Ping",
	FramePong:            "Pong",
	FrameGoAway:          "GoAway",
	FrameRateLimitNotice: "RateLimitNotice",
	FrameError:           "Error",
	FrameSendEvent:       "SendEvent",
	FrameSendResult:      "SendResult",
	FrameFetchEvents:     "FetchEvents",
	FrameEventsBatch:     "EventsBatch",
	FrameAckEvent:        "AckEvent",
	FrameAckResult:       "AckResult",
	FrameNackEvent:       "NackEvent",
	FrameExtendLease:     "ExtendLease",
}

// String returns the frame type's name, or "0xNN" for a type the protocol
// does not define.
func (t FrameType) String() string {
	if n, ok := frameNames[t]; ok {
		return n
	}
	return fmt.Sprintf("0x%02x", uint8(t))
}

// newMessage returns an empty message of the type carried by frames of type
// t, or nil if t is not a protocol frame type.
func newMessage(t FrameType) proto.Message {
	switch t {
	case FrameAuth:
		return new(h3xpb.Auth)
	case FrameAuthResult:
		return new(h3xpb.AuthResult)
	case FramePing:
		return new(h3xpb.Ping)
	case FramePong:
		return new(h3xpb.Pong)
	case FrameGoAway:
		return new(h3xpb.GoAway)
	case FrameRateLimitNotice:
		return new(h3xpb.RateLimitNotice)
	case FrameError:
		return new(h3xpb.Error)
	case FrameSendEvent:
		return new(h3xpb.SendEvent)
	case FrameSendResult:
		return new(h3xpb.SendResult)
	case FrameFetchEvents:
		return new(h3xpb.FetchEvents)
	case FrameEventsBatch:
		return new(h3xpb.EventsBatch)
	case FrameAckEvent:
		return new(h3xpb.AckEvent)
	case FrameAckResult:
		return new(h3xpb.AckResult)
	case FrameNackEvent:
		return new(h3xpb.NackEvent)
	case FrameExtendLease:
		return new(h3xpb.ExtendLease)
	}
	return nil
}

// frameReader reads frames from a stream. It allocates a payload buffer
// only after checking payload_length against its maximum, and reuses that
// buffer: a payload is valid until the next call to next.
type frameReader struct {
	r   io.Reader
	max uint32
	hdr [frameHeaderLen]byte
	buf []byte
	// retain, if above 0, is the largest buffer kept while waiting for the
	// next frame (frameRetain on the server's streams, whose peers are not
	// trusted; a client keeps what its server's batches need).
	retain int
	// growFrom is the payload size above which the buffer grows as bytes
	// arrive, and its first step (frameGrowFrom; the fuzz test lowers it).
	growFrom int
}

// frameGrowFrom: payloads up to 4 KiB are allocated at once.
const frameGrowFrom = 4 << 10

func newFrameReader(r io.Reader, maxFrameSize uint32) *frameReader {
	if maxFrameSize == 0 {
		maxFrameSize = DefaultMaxFrameSize
	}
	return &frameReader{r: r, max: maxFrameSize, growFrom: frameGrowFrom}
}

// next reads one frame. It returns io.EOF if the stream ends cleanly between
// frames, ErrTruncatedHeader or ErrTruncatedPayload if it ends inside one,
// and an error matching ErrFrameTooLarge if payload_length is above the
// maximum (nothing of the payload is read or allocated then).
func (fr *frameReader) next() (FrameType, []byte, error) {
	if fr.retain > 0 && cap(fr.buf) > fr.retain {
		fr.buf = nil // the last payload is no longer valid: not kept while idle
	}
	n, err := io.ReadFull(fr.r, fr.hdr[:])
	if err != nil {
		if n == 0 && errors.Is(err, io.EOF) {
			return 0, nil, io.EOF
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, ErrTruncatedHeader
		}
		return 0, nil, err
	}
	t := FrameType(fr.hdr[0])
	size := binary.LittleEndian.Uint32(fr.hdr[1:])
	if size > fr.max {
		return t, nil, &Error{Code: CodeFrameTooLarge, Message: fmt.Sprintf("%v frame of %d bytes exceeds the maximum of %d", t, size, fr.max)}
	}
	if cap(fr.buf) >= int(size) || int(size) <= fr.growFrom {
		if cap(fr.buf) < int(size) {
			// Round small buffers up to 512 bytes, never past the maximum.
			fr.buf = make([]byte, size, max(size, min(512, fr.max)))
		}
		fr.buf = fr.buf[:size]
		if _, err := io.ReadFull(fr.r, fr.buf); err != nil {
			return t, nil, truncated(err)
		}
		return t, fr.buf, nil
	}
	// A large payload: the buffer grows as its bytes arrive (doubling from
	// 4 KiB), so that a header announcing a large frame, with
	// nothing after it, costs the receiver nothing. Memory follows the bytes
	// the peer actually sent, which QUIC's flow control bounds.
	buf := fr.buf[:0]
	for len(buf) < int(size) {
		step := min(int(size)-len(buf), max(fr.growFrom, len(buf)))
		if cap(buf)-len(buf) < step {
			grown := make([]byte, len(buf), len(buf)+step) // exactly: never past the frame's size
			copy(grown, buf)
			buf = grown
		}
		n, err := io.ReadFull(fr.r, buf[len(buf):len(buf)+step])
		buf = buf[:len(buf)+n]
		if err != nil {
			fr.buf = buf[:0]
			return t, nil, truncated(err)
		}
	}
	fr.buf = buf
	return t, fr.buf, nil
}

// frameRetain is the largest buffer a server's frameReader keeps while it
// waits for the next frame (so that a stream's requests of a usual size
// reuse it): an idle stream holds at most this much, a connection at most
// its stream limit times this (12.5 MiB with the default 100 streams).
const frameRetain = 128 << 10

func truncated(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return ErrTruncatedPayload
	}
	return err
}

// readMessage reads one frame that must be of type want and decodes it into m.
func (fr *frameReader) readMessage(want FrameType, m proto.Message) error {
	t, payload, err := fr.next()
	if err != nil {
		return err
	}
	if t != want {
		if t == FrameError {
			var e h3xpb.Error
			if proto.Unmarshal(payload, &e) == nil {
				return errorFromWire(&e)
			}
		}
		return newError(CodeProtocolViolation, "expected a %v frame, got %v", want, t)
	}
	return unmarshalPayload(t, payload, m)
}

// unmarshalPayload decodes a frame's payload into m, mapping failures to an
// error matching ErrMalformedPayload.
func unmarshalPayload(t FrameType, payload []byte, m proto.Message) error {
	ok, err := unmarshalFast(payload, m)
	if !ok {
		err = proto.Unmarshal(payload, m)
	}
	if err != nil {
		return malformedPayload(t)
	}
	return nil
}

// malformedPayload is the error for a frame of type t whose payload does
// not decode.
func malformedPayload(t FrameType) error {
	return &Error{Code: CodeProtocolViolation, Message: fmt.Sprintf("malformed %v payload", t), cause: ErrMalformedPayload}
}

// decodeFrame decodes a protocol frame's payload into a new message of its
// type. A type the protocol does not define gives an error matching
// ErrUnknownFrameType.
func decodeFrame(t FrameType, payload []byte) (proto.Message, error) {
	m := newMessage(t)
	if m == nil {
		return nil, newError(CodeUnknownFrameType, "unknown frame type %v", t)
	}
	if err := unmarshalPayload(t, payload, m); err != nil {
		return nil, err
	}
	return m, nil
}

// appendFrame appends the frame carrying m to dst. Many frames can be
// appended to one buffer and written with a single Write.
func appendFrame(dst []byte, t FrameType, m proto.Message) ([]byte, error) {
	start := len(dst)
	dst = append(dst, byte(t), 0, 0, 0, 0)
	out, ok, err := marshalFast(dst, m)
	if !ok {
		out, err = proto.MarshalOptions{Deterministic: true}.MarshalAppend(dst, m)
	}
	if err != nil {
		// Nothing was appended: the message cannot be encoded (a string
		// that is not valid UTF-8), whatever the stream.
		return dst[:start], &Error{Code: CodeInvalidArgument, Message: fmt.Sprintf("encoding %v frame: %v", t, err), cause: errUnencodable}
	}
	size := len(out) - start - frameHeaderLen
	if uint64(size) > 1<<32-1 {
		return out[:start], &Error{Code: CodeFrameTooLarge, Message: fmt.Sprintf("%v frame of %d bytes", t, size)}
	}
	binary.LittleEndian.PutUint32(out[start+1:], uint32(size))
	return out, nil
}

// errUnencodable marks the error of a frame that could not be encoded: the
// stream it was for is unharmed, and sending it again would fail again.
var errUnencodable = errors.New("h3x: frame cannot be encoded")

// appendRawFrame appends a frame with an already-encoded payload to dst.
func appendRawFrame(dst []byte, t FrameType, payload []byte) []byte {
	dst = append(dst, byte(t), 0, 0, 0, 0)
	binary.LittleEndian.PutUint32(dst[len(dst)-4:], uint32(len(payload)))
	return append(dst, payload...)
}
