package h3x

import (
	"log/slog"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// Durability says when a Badger queue acknowledges a write.
type Durability uint8

const (
	// DurabilityFsync (the default) acknowledges a write after its group
	// commit has been fsynced: it survives a process kill, a kernel crash and
	// power loss. One fsync covers every group committed before it started,
	// so concurrent writers share it.
	DurabilityFsync Durability = iota
	// DurabilityNoSync acknowledges a write once it is in the operating
	// system's page cache: it survives a process kill (kill -9), not a kernel
	// crash or power loss.
	DurabilityNoSync
)

// String returns "fsync" or "nosync".
func (d Durability) String() string {
	switch d {
	case DurabilityFsync:
		return "fsync"
	case DurabilityNoSync:
		return "nosync"
	}
	return "unknown"
}

// QueueOptions configure the built-in queues (NewMemoryQueue,
// OpenBadgerQueue). The zero value gives the documented defaults.
type QueueOptions struct {
	// DedupWindow is how long a published ID is remembered for
	// deduplication. Default DefaultDedupWindow (2 minutes); negative
	// disables deduplication.
	//
	// The built-in queues keep the window's IDs in memory as 80-bit
	// fingerprints, about 20 bytes each, and at most 2,097,152 of them
	// (40–60 MB): enough for a 2-minute window up to ~17,000 events/s.
	// Publishing faster than that shortens the effective window to the
	// newest 2 million IDs; a retry older than that is stored again (a
	// duplicate, which at-least-once consumers handle), never lost, and no
	// ID is ever wrongly reported as a duplicate. The Badger queue also
	// stores each commit's IDs (with a time to live), so the window
	// survives a restart.
	DedupWindow time.Duration
	// MaxAttempts is the number of deliveries after which an unacked event
	// moves to its dead-letter namespace. Default DefaultMaxAttempts (10);
	// negative means never.
	MaxAttempts int
	// MaxEventsPerNamespace refuses enqueues (CodeQueueFull) into a
	// namespace holding this many events (ready, leased or delayed).
	// Default 0: no limit.
	MaxEventsPerNamespace int
	// MaxBytesPerNamespace refuses enqueues (CodeQueueFull) that would take
	// a namespace past this many event bytes (§6.3's size); an event larger
	// than the limit itself is refused with CodeInvalidArgument (no room
	// will ever be made for it). Default 0: no limit.
	MaxBytesPerNamespace int64
	// Durability is when a Badger queue acknowledges writes. Default
	// DurabilityFsync. The memory queue ignores it.
	Durability Durability
	// Logger receives the queue's logs (Badger's included). Default: discard.
	Logger *slog.Logger
	// Badger, if set, adjusts the Badger options after H3X's defaults are
	// applied (an escape hatch). The memory queue ignores it.
	Badger func(*badger.Options)
}
