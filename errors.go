package h3x

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// ErrorCode is a wire error code. The same set is used in Error frames,
// per-event refusals, stream resets and connection closes (PROTOCOL.md §7).
type ErrorCode uint32

// The wire error codes.
const (
	CodeNone               ErrorCode = 0
	CodeProtocolViolation  ErrorCode = 1  // a malformed, truncated or unexpected frame
	CodeUnauthenticated    ErrorCode = 2  // bad credentials, or no Auth yet
	CodePermissionDenied   ErrorCode = 3  // the namespace is not granted
	CodeFrameTooLarge      ErrorCode = 4  // payload_length above the receiver's maximum
	CodeUnknownFrameType   ErrorCode = 5  // no handler for the frame type
	CodeRateLimited        ErrorCode = 6  // over a namespace's publish rate; retryable
	CodeQueueFull          ErrorCode = 7  // a namespace at its event or byte limit; retryable
	CodeStaleLease         ErrorCode = 8  // the lease ended and the event was leased again
	CodeInternal           ErrorCode = 9  // a server-side failure (storage, ...); retryable
	CodeShuttingDown       ErrorCode = 10 // the server is going away; retryable elsewhere
	CodeInvalidArgument    ErrorCode = 11 // a well-formed frame with invalid content
	CodeTooManyConnections ErrorCode = 12 // the server's connection limit is reached; retryable
	CodeAuthTimeout        ErrorCode = 13 // no successful Auth within the auth timeout
)

var codeNames = [...]string{
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
}

// String returns the code's name, or "error code N" for a code this version
// does not know.
func (c ErrorCode) String() string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return fmt.Sprintf("error code %d", uint32(c))
}

// Retryable reports whether an operation refused with c may succeed later
// unchanged.
func (c ErrorCode) Retryable() bool {
	switch c {
	case CodeRateLimited, CodeQueueFull, CodeInternal, CodeShuttingDown, CodeTooManyConnections:
		return true
	}
	return false
}

// Error is an error that carries a wire code. Errors received from the peer
// have Remote set. Any *Error matches the code sentinels below with
// errors.Is: errors.Is(err, h3x.ErrQueueFull) holds for every *Error whose
// Code is CodeQueueFull.
type Error struct {
	Code       ErrorCode     // what went wrong; errors.Is matches the code's sentinel
	Message    string        // detail; empty for the code sentinels
	RetryAfter time.Duration // for retryable codes: when to try again, if known
	Remote     bool          // the peer sent this error
	cause      error
}

// Error returns "h3x: <code>: <message>", marked when the peer sent it.
func (e *Error) Error() string {
	var s string
	switch {
	case e.Message == "":
		s = "h3x: " + e.Code.String()
	default:
		s = "h3x: " + e.Code.String() + ": " + e.Message
	}
	if e.Remote {
		s += " (from peer)"
	}
	if e.RetryAfter > 0 {
		s += fmt.Sprintf(" (retry after %v)", e.RetryAfter)
	}
	return s
}

// Is makes a code sentinel (an *Error with no Message) match every *Error of
// the same code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	if !ok || t.Message != "" || t.Remote {
		return false
	}
	return t.Code == e.Code
}

// Unwrap returns the underlying cause, if any.
func (e *Error) Unwrap() error { return e.cause }

// Temporary reports whether retrying later may succeed.
func (e *Error) Temporary() bool { return e.Code.Retryable() }

// Code sentinels: compare with errors.Is. They match any *Error of their code,
// local or remote.
var (
	ErrProtocolViolation  = &Error{Code: CodeProtocolViolation}
	ErrUnauthenticated    = &Error{Code: CodeUnauthenticated}
	ErrPermissionDenied   = &Error{Code: CodePermissionDenied}
	ErrFrameTooLarge      = &Error{Code: CodeFrameTooLarge}
	ErrUnknownFrameType   = &Error{Code: CodeUnknownFrameType}
	ErrRateLimited        = &Error{Code: CodeRateLimited}
	ErrQueueFull          = &Error{Code: CodeQueueFull}
	ErrStaleLease         = &Error{Code: CodeStaleLease}
	ErrInternal           = &Error{Code: CodeInternal}
	ErrShuttingDown       = &Error{Code: CodeShuttingDown}
	ErrInvalidArgument    = &Error{Code: CodeInvalidArgument}
	ErrTooManyConnections = &Error{Code: CodeTooManyConnections}
	ErrAuthTimeout        = &Error{Code: CodeAuthTimeout}
)

// Frame decoding errors. Each is distinct (compare with errors.Is) and also
// matches the code sentinel of its code; the two truncation errors also match
// io.ErrUnexpectedEOF.
var (
	// ErrTruncatedHeader: the stream ended inside the 5-byte frame header.
	ErrTruncatedHeader = &Error{Code: CodeProtocolViolation, Message: "truncated frame header", cause: io.ErrUnexpectedEOF}
	// ErrTruncatedPayload: the stream ended before payload_length bytes arrived.
	ErrTruncatedPayload = &Error{Code: CodeProtocolViolation, Message: "truncated frame payload", cause: io.ErrUnexpectedEOF}
	// ErrMalformedPayload: the payload is not a valid protobuf message of the frame's type.
	ErrMalformedPayload = &Error{Code: CodeProtocolViolation, Message: "malformed frame payload"}
)

// Errors that carry no wire code.
var (
	// ErrClosed is returned by the calls of a closed Client.
	ErrClosed = errors.New("h3x: client closed")
	// ErrServerClosed is returned by ListenAndServe and Serve after Shutdown or Close.
	ErrServerClosed = errors.New("h3x: server closed")
	// ErrQueueClosed is returned by the methods of a closed Queue.
	ErrQueueClosed = errors.New("h3x: queue closed")
	// ErrQueueInUse is returned (wrapped) by OpenBadgerQueue when another
	// process, or another open queue of this one, has the directory open.
	ErrQueueInUse = errors.New("h3x: queue directory in use by another process or another open queue")
)

// newError returns an *Error of code with a formatted message.
func newError(code ErrorCode, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// errorFromWire turns a received Error frame into a remote *Error.
func errorFromWire(m *h3xpb.Error) *Error {
	return &Error{
		Code:       ErrorCode(m.GetCode()),
		Message:    m.GetMessage(),
		RetryAfter: time.Duration(m.GetRetryAfterMs()) * time.Millisecond,
		Remote:     true,
	}
}

// errorToWire turns err into an Error frame; errors without a code become
// CodeInternal with a generic message, so internal details are not leaked.
func errorToWire(err error, requestID uint64) *h3xpb.Error {
	var e *Error
	if !errors.As(err, &e) {
		return &h3xpb.Error{Code: h3xpb.ErrorCode(CodeInternal), Message: "internal error", RequestId: requestID}
	}
	return &h3xpb.Error{
		Code:         h3xpb.ErrorCode(e.Code),
		Message:      validUTF8(e.Message), // a custom Queue's text, a path: a protobuf string
		RetryAfterMs: durationMs(e.RetryAfter),
		RequestId:    requestID,
	}
}

// validUTF8 returns s with anything that is not valid UTF-8 replaced by
// U+FFFD.
func validUTF8(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	return strings.ToValidUTF8(s, "\uFFFD")
}

func durationMs(d time.Duration) uint32 {
	if d <= 0 {
		return 0
	}
	ms := (d + time.Millisecond - 1) / time.Millisecond
	if ms > 1<<32-1 {
		return 1<<32 - 1
	}
	return uint32(ms)
}
