// Package h3x is a broker and client for structured events over QUIC: a
// server you embed in any Go program (or test), and a client that publishes
// events, consumes them and acknowledges them, with namespaced token auth,
// durable queues and at-least-once delivery.
//
// # Basics
//
// A registry says who may do what, in entries of client:namespace=token
// (see ParseRegistry). NewServer makes a broker that keeps events in a
// Badger queue in its data directory; Start serves in the background:
//
//	reg, err := h3x.ParseRegistry("app:orders=s3cr3t")
//	srv, err := h3x.NewServer(h3x.WithRegistry(reg), h3x.WithDataDir("data"))
//	err = srv.Start(ctx) // on DefaultAddr, 127.0.0.1:4433
//	defer srv.Shutdown(ctx)
//
// Dial connects and authenticates. Publish returns once the events are
// durable. Subscribe hands deliveries out on a channel; ack each one when it
// is handled:
//
//	c, err := h3x.Dial(ctx, "127.0.0.1:4433", h3x.WithCredentials("app", "s3cr3t"),
//		h3x.WithTrustedFingerprint(srv.Fingerprint()))
//	defer c.Close()
//	_, err = c.Publish(ctx, h3x.Event{Namespace: "orders", Type: "order.created", Data: body})
//	sub, err := c.Subscribe(ctx, []string{"orders"}, h3x.SubscribeOptions{})
//	for d := range sub.Events() {
//		handle(d.Event)
//		d.Ack()
//	}
//
// Client.Fetch, Client.Ack and Client.Nack are the synchronous calls beneath
// Subscribe. Both ends take functional options, each documenting its
// default; every call that blocks takes a context; errors match the code
// sentinels (ErrPermissionDenied, ErrRateLimited, ...) with errors.Is.
//
// # Delivery
//
// Delivery is at least once. Fetching leases events to the client: no one
// else gets them until the lease ends. Ack removes an event for good. A
// nack, the lease deadline (WithAckDeadline) or the end of the client's
// connection makes it ready again, delivered with the next Attempt number;
// after WithMaxAttempts deliveries it moves to its dead-letter namespace
// (DeadLetterNamespace). After a restart, every event that was published and
// not acked is delivered again. A handler may therefore see an event twice:
// make it idempotent, keyed by Event.ID.
//
// The client reconnects by itself with jittered backoff (WithBackoff),
// re-authenticates, resumes its subscriptions and resends unanswered
// publishes, which the server stores once: an event ID is deduplicated
// within a window (QueueOptions.DedupWindow). Give events IDs of your own to
// make your own retries safe too.
//
// # Security
//
// Connections use TLS 1.3. Without WithCertFiles or WithTLSConfig, a server
// uses a self-signed development certificate, kept in its data directory
// (so its fingerprint survives restarts), or made anew by every NewServer
// that is given its queue with WithQueue; a client accepts it only when told
// to, by pinning its fingerprint (Server.Fingerprint,
// WithTrustedFingerprint) or with WithInsecureSkipVerify. Tokens are
// compared in constant time and never logged, and a registry may hold their
// SHA-256 instead.
//
// # Caveats
//
//   - Events of a namespace are handed out in publish order, redeliveries
//     first; an event that comes back after a nack or an expiry still
//     arrives after those delivered meanwhile. There is no order across
//     namespaces.
//   - Event.Time has second precision on the wire.
//   - One process at a time may open a Badger data directory.
//   - quic-go wants larger UDP socket buffers than Linux grants by default
//     and says so once through package log; raise them with
//     sysctl -w net.core.rmem_max=7500000 net.core.wmem_max=7500000.
//
// # More
//
// The library logs nothing unless given WithLogger, and reports metrics to
// WithHooks. Server.Handle serves application protocols on frame types from
// 0x80, which clients speak through Client.OpenStream.
//
// PROTOCOL.md in the repository is the normative wire specification. Package
// h3xtest starts a broker inside a test in one line, with fault hooks, and
// holds the conformance suites that Queue and Registry implementations must
// pass. The examples directory has runnable programs: a quickstart, a
// producer and a consumer, a custom stream handler, and a package whose
// tests embed a broker.
package h3x

import (
	"time"
	"unicode/utf8"
)

// ProtocolVersion is the wire protocol version this package speaks.
const ProtocolVersion = 1

// ALPN is the TLS application protocol negotiated by H3X connections.
const ALPN = "h3x/1"

// Event is one structured event. Its text fields (ID, Namespace, Type,
// Message and Metadata) must be valid UTF-8, as the wire carries them as
// protobuf strings: Publish and the built-in queues refuse an event whose
// text is not (CodeInvalidArgument). Data may hold any bytes.
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

// notUTF8 names the first of the event's text fields that is not valid
// UTF-8, or returns "". The wire carries them as protobuf strings, which
// must be valid UTF-8: such an event can be neither sent nor delivered.
func (e *Event) notUTF8() string {
	switch {
	case !utf8.ValidString(e.ID):
		return "ID"
	case !utf8.ValidString(e.Namespace):
		return "Namespace"
	case !utf8.ValidString(e.Type):
		return "Type"
	case !utf8.ValidString(e.Message):
		return "Message"
	}
	for k, v := range e.Metadata {
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return "Metadata"
		}
	}
	return ""
}
