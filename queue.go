package h3x

import (
	"context"
	"time"
)

// Queue stores events durably and owns all delivery state: leases, attempt
// counts, delays and dead letters. Because the queue (not the server) holds
// that state, several servers can share one queue backend.
//
// Implementations must be safe for concurrent use. The conformance suite
// h3xtest.TestQueue checks every contract below.
//
// Terms: a holder is an opaque string naming who holds leases (the server
// uses one per connection). A delivery is one lease of an event; its attempt
// number is 1 for the first delivery and grows by one with every lease.
//
// A wrapper around a built-in queue (instrumentation, say) that has an
// Unwrap() Queue method returning it lets the server still announce that
// queue's MaxAttempts and DedupWindow to clients (PROTOCOL.md §3.4); for any
// other Queue they are announced as unknown (0).
type Queue interface {
	// Enqueue stores events durably and returns one result per event, in
	// order. It returns only after every stored event is durable (as the
	// queue's durability mode defines it).
	//
	// An event without an ID gets a UUIDv4; one without a Time gets the
	// current time. An ID already stored within the dedup window is reported
	// as PublishDuplicate and not stored again. A namespace at its event or
	// byte limit refuses the event with an *Error of CodeQueueFull and a
	// RetryAfter. The built-in queues also refuse, with CodeInvalidArgument,
	// an event whose ID, Namespace, Type, Message or Metadata is not valid
	// UTF-8, which the wire cannot carry (the server sets aside any such
	// event another Queue hands out, as undeliverable). A non-nil error
	// means the whole batch failed and nothing in
	// it was acknowledged (some events may still have been stored; a retry
	// with the same IDs is deduplicated).
	Enqueue(ctx context.Context, events []Event) ([]PublishResult, error)

	// Lease leases up to req.Limit ready events from req.Namespaces to
	// req.Holder, with lease deadlines of now + req.AckDeadline, and returns
	// them at once (possibly none; it does not wait). Events come in publish
	// order within a namespace, and namespaces are served fairly: when each
	// of req.Namespaces has enough events ready, each gets at least
	// req.Limit/len(req.Namespaces) (rounded down) of the call's events, and
	// calls with a smaller Limit take turns among them (the namespace served
	// least recently first, whichever holder calls and in whatever order
	// it names them). A leased
	// event goes to no other holder until its lease ends by Ack, Nack (after
	// the nack's delay), expiry of the deadline or Release of the holder.
	Lease(ctx context.Context, req LeaseRequest) ([]Lease, error)

	// Wait blocks until an event may be ready in one of namespaces (a new
	// event, a nack delay or a lease deadline passing), or ctx ends, and
	// returns ctx's error in the latter case. Wakeups may be spurious; Wait
	// does not poll.
	Wait(ctx context.Context, namespaces []string) error

	// Ack removes the referenced deliveries' events for good (durably, before
	// Ack returns). See LeaseRef for which acks are applied; refused ones are
	// reported as SettleStale or SettleUnknown and change nothing.
	Ack(ctx context.Context, holder string, refs []LeaseRef) ([]SettleResult, error)

	// Nack ends the referenced leases; the events become ready again after
	// delay. An event whose attempts have reached the maximum moves to its
	// namespace's dead-letter namespace instead, with reason (its first
	// KiB, cut at a character boundary) recorded (if that namespace is at
	// its limits, the event stays and is ready again); there its attempts
	// count from 1 again.
	// A nack of a delivery whose lease has already ended (expiry, release,
	// or an earlier nack of the same delivery) but that was not delivered
	// again reschedules the event with delay (a repeated Unseen nack is
	// SettleStale: its attempt was given back once). A release or expiry at
	// the maximum has already dead-lettered the event: a later nack of it,
	// Unseen included, is refused and the event stays dead-lettered.
	Nack(ctx context.Context, holder string, refs []LeaseRef, delay time.Duration, reason string) ([]SettleResult, error)

	// Extend sets the referenced leases' deadlines to now + d (d should be
	// positive: the server passes its ack deadline for a client's 0). Only
	// a live lease held by holder is extended (see LeaseRef); one that has
	// ended is SettleStale.
	Extend(ctx context.Context, holder string, refs []LeaseRef, d time.Duration) ([]SettleResult, error)

	// Release ends every lease held by holder, as if each were nacked without
	// delay (reason "released"): the events are ready again at once, or,
	// at the maximum number of attempts, dead-lettered.
	Release(ctx context.Context, holder string) error

	// Stats reports per-namespace counts for the given namespaces, or for
	// every namespace the queue knows when none are given. Its cumulative
	// counts (see NamespaceStats) never decrease while the queue is open.
	Stats(ctx context.Context, namespaces ...string) ([]NamespaceStats, error)

	// Close releases the queue's resources; later calls return
	// ErrQueueClosed. Close is safe to call more than once.
	Close() error
}

// PublishStatus is the outcome of publishing one event.
type PublishStatus uint8

// Publish outcomes.
const (
	PublishStored    PublishStatus = 1 // stored durably
	PublishDuplicate PublishStatus = 2 // its ID was stored before, within the dedup window
	PublishRefused   PublishStatus = 3 // not stored; Err says why
)

// String returns "stored", "duplicate" or "refused".
func (s PublishStatus) String() string {
	switch s {
	case PublishStored:
		return "stored"
	case PublishDuplicate:
		return "duplicate"
	case PublishRefused:
		return "refused"
	}
	return "unknown"
}

// PublishResult is the outcome of publishing one event.
type PublishResult struct {
	ID     string        // the event's ID (assigned if it had none)
	Status PublishStatus // stored, duplicate or refused
	Err    error         // for PublishRefused: an *Error with the code and RetryAfter
}

// LeaseRequest asks a Queue for deliveries.
type LeaseRequest struct {
	Holder      string        // who will hold the leases
	Namespaces  []string      // where to take events from
	Limit       int           // at most this many events (0 or less: 1)
	MaxBytes    int           // stop before exceeding this many event bytes; 0 = no limit (at least one event is returned if any is ready)
	AckDeadline time.Duration // lease duration (0 or less: DefaultAckDeadline)
}

// Lease is one delivery of an event.
type Lease struct {
	Event    Event     // the event, with its ID and timestamp
	Attempt  int       // 1 for the first delivery
	Deadline time.Time // when the lease expires unless acked, nacked or extended
}

// ref names l's delivery, to settle it.
func (l *Lease) ref() LeaseRef {
	return LeaseRef{ID: l.Event.ID, Attempt: l.Attempt, Namespace: l.Event.Namespace}
}

// LeaseRef names one delivery to settle: the event's ID and the attempt
// number it was delivered with.
//
// A settlement with Attempt > 0 is applied when that attempt is the event's
// latest delivery (it has not been leased again since) and either holder
// holds its lease or nobody does (the lease ended by expiry or Release): this
// is how a client that reconnected settles deliveries received on its
// previous connection. Extend is the exception: it needs a live lease held by
// holder. With Attempt == 0 the settlement applies only if holder holds the
// event's current lease. Otherwise it is refused as SettleStale (an older
// attempt, or a lease held by another holder) and changes nothing; an ID the
// queue does not hold is SettleUnknown.
type LeaseRef struct {
	ID      string // the event's ID
	Attempt int    // the attempt number it was delivered with; 0: the lease holder holds now
	// Namespace, when not empty, is the namespace the settler believes
	// the event is in: an event of another namespace is not settled
	// (SettleUnknown). Empty matches any namespace, except that a dead
	// letter (its event delivered afresh in the dead-letter namespace,
	// attempts from 1 again) is then settled only by its lease's holder,
	// never by an Attempt alone, which could be the original's.
	Namespace string
	// Unseen, for Nack only, says the delivery never reached the
	// application (a client giving back prefetched deliveries): the attempt
	// is not counted, so it cannot lead to dead-lettering, and the next
	// delivery carries the same attempt number again; until then no
	// delivery of the event is settleable by its Attempt (the number given
	// back is an earlier delivery's, superseded). That holds also when
	// the lease has already ended (released with its holder, or expired)
	// and the event was neither delivered again nor, the lease having been
	// its last allowed attempt, dead-lettered by that end (see Nack).
	Unseen bool
}

// SettleStatus is the outcome of an ack, nack or lease extension.
type SettleStatus uint8

// Settle outcomes.
const (
	SettleOK      SettleStatus = 1 // applied
	SettleUnknown SettleStatus = 2 // no such event (never stored, or already acked)
	SettleStale   SettleStatus = 3 // the lease ended and the event was leased again, or another holder holds it
	SettleDenied  SettleStatus = 4 // not permitted (set by the server, never by a Queue)
)

// String returns "ok", "unknown", "stale" or "denied".
func (s SettleStatus) String() string {
	switch s {
	case SettleOK:
		return "ok"
	case SettleUnknown:
		return "unknown"
	case SettleStale:
		return "stale"
	case SettleDenied:
		return "denied"
	}
	return "unspecified"
}

// SettleResult is the outcome of settling one delivery.
type SettleResult struct {
	ID     string       // the LeaseRef's ID
	Status SettleStatus // what became of it
}

// NamespaceStats are a namespace's counts at one moment.
//
// DeadLettered and Expired are cumulative since the queue was opened (they
// restart from zero when it is reopened), so metrics can build counters on
// them. An expiry that moves its event to the dead-letter namespace counts in
// both. Expired is optional: a Queue that does not count expiries leaves it
// zero; the built-in queues count them.
type NamespaceStats struct {
	Namespace    string        // the namespace counted
	Ready        int           // deliverable now
	Leased       int           // leased and not yet settled
	Delayed      int           // nacked with a delay that has not passed
	DeadLettered int           // events moved to DeadLetterNamespace(Namespace) so far (cumulative since open)
	Expired      int           // leases that ended by expiry of their ack deadline so far (cumulative since open; 0 if not counted)
	OldestReady  time.Duration // how long the oldest ready event has been in the queue, since its enqueue (not Event.Time; 0 if none)
	Bytes        int64         // stored event bytes (ready, leased and delayed)
}

// DeadLetterSuffix is appended to a namespace's name to form its dead-letter
// namespace.
const DeadLetterSuffix = ".dlq"

// DeadLetterNamespace returns the namespace where events of ns go after the
// maximum number of attempts: ns + ".dlq". Events already in a dead-letter
// namespace are never dead-lettered again.
func DeadLetterNamespace(ns string) string { return ns + DeadLetterSuffix }

// Metadata keys set on a dead-lettered event.
const (
	MetaDeadLetterAttempts  = "h3x-attempts"           // attempt count when it was dead-lettered
	MetaDeadLetterReason    = "h3x-last-nack-reason"   // the last nack's reason ("lease expired" for an expiry)
	MetaDeadLetterNamespace = "h3x-original-namespace" // the namespace it was published to
)

// Queue defaults, used by both built-in queues.
const (
	DefaultDedupWindow = 2 * time.Minute
	DefaultMaxAttempts = 10
)
