package h3x

import (
	"path/filepath"
	"time"
)

// Badger reads and writes its table files (.sst) through shared memory maps.
// Every page of a table the process wrote (all of them: Badger builds a
// table by copying it into its map) or read stays in the process's resident
// set until the table is deleted, so a process that published a large
// backlog shows it in its RSS as file-backed memory (about 300 MB for
// 1,000,000 256-byte events), although the kernel could drop those pages at
// any time. The trimmer gives them back: when the process's file-backed
// resident memory is above mappedBudget, it asks the kernel to reclaim the
// pages of the queue's table maps (madvise MADV_PAGEOUT on Linux, which never
// changes what the memory holds; a later read faults the page in again from
// the file), unless the queue read stored events since the last check (the
// pages of a backlog being consumed stay) or was given more than
// trimBusyEvents events to store (Badger flushes and compacts then, reading
// the tables it has just written). Elsewhere it does nothing.

const (
	// mappedBudget is the file-backed resident memory (VmRSS's RssFile,
	// the whole process's) above which the queue's table maps are trimmed.
	mappedBudget = 64 << 20
	// trimInterval is how often the trimmer checks.
	trimInterval = 10 * time.Second
	// trimBusyEvents is the number of events enqueued in an interval above
	// which the trimmer waits (1,000 events/s).
	trimBusyEvents = 10_000
)

// tableDir returns the absolute path, symbolic links resolved, of dir (where
// Badger keeps its tables: Options.Dir), as /proc/self/maps names the
// files in it; "" if it cannot be resolved. (Resolved at open: a later
// os.Chdir would change what a relative dir means.) An empty dir (Badger
// InMemory) has no table files: "", not the working directory.
func tableDir(dir string) string {
	if dir == "" {
		return ""
	}
	abs, err := filepath.Abs(dir)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return ""
	}
	return abs
}

// trimLoop runs the trimmer on the table maps in q.tdir every interval
// until Close.
func (q *badgerQueue) trimLoop(interval time.Duration) {
	defer close(q.trimDone)
	if q.tdir == "" {
		return
	}
	if err := trimSupported(); err != nil {
		q.log.Warn("h3x: badger queue: table maps cannot be trimmed; their pages stay in the process's RSS", "err", err)
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	seen := trimSeen{reads: q.tableReads.Load(), enqueued: q.enqueued.Load()}
	for {
		select {
		case <-q.trimStop:
			return
		case <-t.C:
		}
		// An error here is this round's (a /proc read failing, a range
		// unmapped and reused for a map madvise refuses): the next one
		// tries again.
		n, err := q.trimTick(q.tdir, &seen, mappedBudget)
		if err != nil {
			q.log.Debug("h3x: badger queue: table maps not all trimmed", "bytes", n, "err", err)
		} else if n > 0 {
			q.log.Debug("h3x: badger queue: table maps trimmed", "bytes", n)
		}
	}
}

// trimSeen is what the trimmer saw at its last check.
type trimSeen struct{ reads, enqueued int64 }

// trimTick is one check of trimLoop: it trims the table maps in dir unless
// stored events were read, or more than trimBusyEvents enqueued, since the
// last check (*seen, updated), or the process's file-backed resident memory
// is at most budget. It returns the bytes of the maps trimmed.
func (q *badgerQueue) trimTick(dir string, seen *trimSeen, budget int64) (int64, error) {
	now := trimSeen{reads: q.tableReads.Load(), enqueued: q.enqueued.Load()}
	last := *seen
	*seen = now
	if now.reads != last.reads || now.enqueued-last.enqueued > trimBusyEvents {
		return 0, nil
	}
	if resident, ok := fileResident(); !ok || resident <= budget {
		return 0, nil
	}
	return trimTableMaps(dir)
}
