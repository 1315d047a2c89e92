package h3x

import (
	"sync"
	"time"
)

// freeSpaceMaxAge is how long a reading of the free space stands in for
// the next ones while it is well above the reserve.
const freeSpaceMaxAge = 10 * time.Millisecond

// freeSpaceReader reads a directory's free space for the Badger queue's
// writer, which checks it on every round: a statfs a round was 3% of the
// server's CPU at 5,000 one-event publishes a second. A reading is reused
// for freeSpaceMaxAge while it is at least near (twice the reserve):
// nothing written in that time can bring it down to the reserve, unless
// another process fills hundreds of megabytes in a few milliseconds, which
// a reading made just before the write could miss as well. Below near, and
// after an error, every call reads.
type freeSpaceReader struct {
	read1 func(dir string) (uint64, error)
	near  uint64
	now   func() time.Time

	mu   sync.Mutex
	dir  string
	at   time.Time
	free uint64
	ok   bool
}

func newFreeSpaceReader(read func(dir string) (uint64, error), near uint64, now func() time.Time) *freeSpaceReader {
	return &freeSpaceReader{read1: read, near: near, now: now}
}

// read returns the bytes available on dir's filesystem, as read1 does.
func (r *freeSpaceReader) read(dir string) (uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now() // under mu: a reading is never older than it says
	if r.ok && r.dir == dir && r.free >= r.near {
		if age := now.Sub(r.at); age >= 0 && age < freeSpaceMaxAge {
			return r.free, nil
		}
	}
	free, err := r.read1(dir)
	r.dir, r.at, r.free, r.ok = dir, now, free, err == nil
	return free, err
}
