package h3x

import (
	"sync"

	badger "github.com/dgraph-io/badger/v4"
)

// The Badger queue opens Badger in managed mode and gives the versions
// itself. In Badger's ordinary mode every transaction's start takes a read
// timestamp and first waits until every commit before it has been applied
// (its oracle's watermark): the writer, which starts a group's transaction
// while the previous group is still being written, waited there for most of
// a publishing run (57% of it with 256 single-event publishers, in a block
// profile), and every read (a refill, a redelivery) waited for the commits
// in flight too, each wait a round trip through the watermark's goroutine.
//
// In managed mode nothing waits. The queue numbers its commits itself
// (tsClock.next: one writer, so in the order Badger receives them, and
// Badger applies them in that order), remembers the highest version applied
// (tsClock.applied: set in each commit's callback, after Badger wrote it),
// and reads at that version: a read sees every commit applied when it
// started and nothing of one in flight, as the queue needs (its reads are of
// chunks whose commits have completed, see refill, and at open and close,
// when nothing else writes). The group transactions read nothing.
//
// What managed mode takes away is Badger's own bookkeeping of which old
// versions a read may still need: compactions drop the versions shadowed at
// or below the discard timestamp the queue sets (tsClock.discard). It is
// the applied version, held back to the oldest read still open, so that a
// read never finds a version discarded under it.
//
// A directory written in either mode opens in the other: Badger starts its
// versions after the highest stored one in both (DB.MaxVersion).
type tsClock struct {
	db *badger.DB

	mu          sync.Mutex
	last        uint64         // the last version handed out (next's)
	applied     uint64         // the highest version applied
	readers     map[uint64]int // open reads by their version
	discardedAt uint64         // the last discard timestamp set
}

func newTSClock(db *badger.DB) *tsClock {
	v := db.MaxVersion()
	return &tsClock{db: db, last: v, applied: v, readers: make(map[uint64]int)}
}

// next returns the version of the next commit.
func (t *tsClock) next() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.last++
	return t.last
}

// done records that the commit of version v has been applied (or failed:
// then some of it may have been written, as Badger's ordinary mode treats
// it too).
func (t *tsClock) done(v uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.applied = max(t.applied, v)
}

// read starts a read-only transaction at the applied version; end it with
// t.end(txn).
func (t *tsClock) read() *badger.Txn { return t.begin(false) }

// begin starts a transaction at the applied version, counted as a read
// until t.end.
func (t *tsClock) begin(update bool) *badger.Txn {
	t.mu.Lock()
	v := t.applied
	t.readers[v]++
	t.mu.Unlock()
	return t.db.NewTransactionAt(v, update)
}

// writeOnly starts a transaction that only writes (a group's): it reads
// nothing, so no version is kept for it.
func (t *tsClock) writeOnly() *badger.Txn {
	t.mu.Lock()
	v := t.applied
	t.mu.Unlock()
	return t.db.NewTransactionAt(v, true)
}

// end discards txn, started by begin or read, and forgets its read.
func (t *tsClock) end(txn *badger.Txn) {
	v := txn.ReadTs()
	txn.Discard()
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.readers[v]--; t.readers[v] <= 0 {
		delete(t.readers, v)
	}
}

// discard lets compactions drop the versions no read can need: those
// shadowed at or below the applied version, or below the oldest open read.
// It returns that version: no read, open or to come, sees less than it.
func (t *tsClock) discard() uint64 {
	t.mu.Lock()
	d := t.applied
	for v := range t.readers {
		d = min(d, v)
	}
	if d <= t.discardedAt {
		t.mu.Unlock()
		return d
	}
	t.discardedAt = d
	t.mu.Unlock()
	t.db.SetDiscardTs(d)
	return d
}

// view runs fn in a read-only transaction at the applied version.
func (t *tsClock) view(fn func(*badger.Txn) error) error {
	txn := t.read()
	defer t.end(txn)
	return fn(txn)
}

// update runs fn in a transaction at the applied version and commits it,
// synchronously, as the next version.
func (t *tsClock) update(fn func(*badger.Txn) error) error {
	txn := t.begin(true)
	defer t.end(txn)
	if err := fn(txn); err != nil {
		return err
	}
	v := t.next()
	err := txn.CommitAt(v, nil)
	t.done(v)
	t.discard()
	return err
}

// batch returns a write batch that commits as the next version; call
// t.flushed with that version after its Flush.
func (t *tsClock) batch() (*badger.WriteBatch, uint64) {
	v := t.next()
	return t.db.NewWriteBatchAt(v), v
}

// flushed records that the write batch of version v has been flushed.
func (t *tsClock) flushed(v uint64) {
	t.done(v)
	t.discard()
}
