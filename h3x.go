// Package h3x is a broker and client for structured events over QUIC.
//
// A Go program embeds a broker with NewServer and talks to one with Dial.
// Events are durable in a Queue (Badger by default), carry namespaced token
// auth, and are delivered at least once: fetched, leased, acked, or
// delivered again.
//
// PROTOCOL.md in the repository is the normative wire specification.
package h3x

import (
	"time"
)

// ProtocolVersion is the wire protocol version this package speaks.
const ProtocolVersion = 1

// ALPN is the TLS application protocol negotiated by H3X connections.
const ALPN = "h3x/1"

// Event is one structured event.
type Event struct {
	// ID identifies the event. Publishing assigns a UUIDv4 when it is empty;
	// a client-supplied ID published again within the dedup window is stored
	// once. IDs are unique across all namespaces of a queue.
	ID string
	// Namespace is the stream of events this one belongs to; it decides who
	// may publish and consume it, and ordering holds within it.
	Namespace string
	// Type is a free-form event type, such as "order.created".
	Type string
	// Message is a human-readable summary.
	Message string
	// Data is the body: JSON or arbitrary bytes.
	Data []byte
	// Time is when the event happened, with second precision on the wire.
	// Publishing sets it to the current time when it is zero.
	Time time.Time
	// Metadata holds free-form labels such as severity, service and env.
	Metadata map[string]string
}

// size is the event's size for byte limits: the lengths of its fields.
func (e *Event) size() int {
	n := len(e.ID) + len(e.Namespace) + len(e.Type) + len(e.Message) + len(e.Data) + 8
	for k, v := range e.Metadata {
		n += len(k) + len(v)
	}
	return n
}
