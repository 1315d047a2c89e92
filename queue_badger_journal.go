package h3x

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sync"
)

// The lease journal: a Lease call's record, on its way to Badger, is first
// appended to a file of the queue's own with one write, and the deliveries
// go out as soon as that write returns, not once Badger has committed the
// record (a hand-off to the writer and three inside Badger's commit: about
// 90 µs of a delivery's path at 5,000 events/s, 350–400 µs with fsync,
// where the commit waits behind syncs; BENCHMARKS.md, the twenty-third
// session). The write is in the operating system's cache when
// it returns, as a Badger commit is without a sync, so a kill -9 keeps it:
// at open the journal's records count as lease records (the newest record
// naming an event wins, as ever) and are written to Badger. A Lease that
// also dead-letters events waits for those moves anyway, and its records
// go to Badger alone (see finishRecords).
//
// Once past journalTruncateAt, the journal is emptied the next time a
// Lease finds the writer idle with no record left over (journalIdle): every
// record appended before was then written to Badger, or named no event's
// latest delivery any more, with the settlement that made it so written
// too. Under a load that never lets the writer idle it stops at
// journalMax bytes, and Lease waits for Badger's commit as it did before
// the journal, until the next idle moment. A failed write does the same.
//
// A frame is the payload's length (uvarint), its CRC-32C (4 bytes, little
// endian) and the payload: the record's sequence number (uvarint) and the
// record as stored in Badger (encodeLeaseRec). Reading stops at the first
// frame that is cut short or does not match its checksum; the file is
// truncated there before anything is appended.
type leaseJournal struct {
	q    *badgerQueue
	mu   sync.Mutex // guards the fields below; appends run under the core's mutex too
	f    *os.File   // nil: no journal (in-memory Badger), or closed
	size int64
	// broken: a write (or an emptying) failed; the journal is not used
	// until it is emptied at an idle moment.
	broken bool
	buf    []byte
}

const (
	journalFile = "lease-journal"
	// journalFrameMax bounds a frame's payload when reading: a record is
	// below the queue's value threshold (recMaxBytes), far below this.
	journalFrameMax = 16 << 20
)

// Variables for tests.
var (
	// journalTruncateAt: the journal is emptied at an idle moment once it
	// holds this much (emptying it on every append would cost a system
	// call each).
	journalTruncateAt int64 = 256 << 10
	// journalMax: beyond this, Lease waits for Badger as without a journal.
	journalMax int64 = 8 << 20
)

var journalCRC = crc32.MakeTable(crc32.Castagnoli)

// journalRec is a lease record read back from the journal.
type journalRec struct {
	seq uint64
	rec []byte // as encodeLeaseRec wrote it
}

// appendJournalFrame appends the frame of record seq to b.
func appendJournalFrame(b []byte, seq uint64, rec []byte) []byte {
	n := uvarintLen(seq) + len(rec)
	b = binary.AppendUvarint(b, uint64(n))
	crcAt := len(b)
	b = append(b, 0, 0, 0, 0)
	b = binary.AppendUvarint(b, seq)
	b = append(b, rec...)
	binary.LittleEndian.PutUint32(b[crcAt:], crc32.Checksum(b[crcAt+4:], journalCRC))
	return b
}

// decodeJournal returns the records of the whole frames at the start of b
// and how many bytes they take; err says why it stopped before the end of
// b: errCorrupt for a damaged frame, io.ErrUnexpectedEOF for one cut short
// (a kill -9 does not cut a write short; a full disk or a crash of the
// machine may).
func decodeJournal(b []byte) (recs []journalRec, good int, err error) {
	for good < len(b) {
		rest := b[good:]
		n, k := binary.Uvarint(rest)
		switch {
		case k == 0:
			return recs, good, io.ErrUnexpectedEOF
		case k < 0 || k != uvarintLen(n) || n == 0 || n > journalFrameMax:
			return recs, good, errCorrupt
		case uint64(len(rest)-k) < 4+n:
			return recs, good, io.ErrUnexpectedEOF
		}
		payload := rest[k+4 : k+4+int(n)]
		if crc32.Checksum(payload, journalCRC) != binary.LittleEndian.Uint32(rest[k:]) {
			return recs, good, errCorrupt
		}
		seq, m := binary.Uvarint(payload)
		if m <= 0 || m != uvarintLen(seq) {
			return recs, good, errCorrupt
		}
		recs = append(recs, journalRec{seq: seq, rec: payload[m:]})
		good += k + 4 + int(n)
	}
	return recs, good, nil
}

// openLeaseJournal opens (or creates) the journal in dir and returns what it
// holds; the file is cut after its last whole frame.
func openLeaseJournal(q *badgerQueue, dir string) (*leaseJournal, []journalRec, error) {
	j := &leaseJournal{q: q}
	f, err := os.OpenFile(filepath.Join(dir, journalFile), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, nil, fmt.Errorf("h3x: badger queue: open the lease journal: %w", err)
	}
	b, err := io.ReadAll(f)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("h3x: badger queue: read the lease journal: %w", err)
	}
	recs, good, derr := decodeJournal(b)
	if derr != nil {
		q.log.Warn("h3x: badger queue: the lease journal ends in a damaged frame; the records after it are lost (their events' attempt counts may restart lower)",
			"kept", len(recs), "bytes_dropped", len(b)-good, "err", derr)
	}
	if good != len(b) {
		if err := f.Truncate(int64(good)); err != nil {
			f.Close()
			return nil, nil, fmt.Errorf("h3x: badger queue: truncate the lease journal: %w", err)
		}
	}
	// The records are copied: b is dropped.
	for i := range recs {
		recs[i].rec = append([]byte(nil), recs[i].rec...)
	}
	j.f, j.size = f, int64(good)
	return j, recs, nil
}

// errJournalUnavailable: the records were not appended (no journal, full
// until the next idle moment, or broken); the caller waits for Badger.
var errJournalUnavailable = errors.New("lease journal unavailable")

// testHookJournalWrite, if set, replaces the journal's write (tests).
var testHookJournalWrite func(f *os.File, b []byte, off int64) (int, error)

// append writes puts' records to the journal in one write. It is called with
// the core's mutex held, before the records are queued for the writer.
func (j *leaseJournal) append(puts []recPut) error {
	if j == nil {
		return errJournalUnavailable
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.f == nil {
		return errJournalUnavailable
	}
	if (j.broken || j.size >= journalTruncateAt) && j.q.journalIdle() {
		// Everything in it is in Badger: empty it (which also ends a
		// failed write's partial frame).
		if err := j.f.Truncate(0); err != nil {
			if !j.broken {
				j.q.log.Error("h3x: badger queue: emptying the lease journal failed; leases wait for Badger until it can be emptied", "err", err)
			}
			j.broken = true
			return errJournalUnavailable
		}
		j.size, j.broken = 0, false
	}
	if j.broken || j.size >= journalMax {
		return errJournalUnavailable
	}
	b := j.buf[:0]
	for i := range puts {
		puts[i].enc = j.q.encodeRec(puts[i].entries) // the writer stores these bytes too
		b = appendJournalFrame(b, puts[i].rec.seq, puts[i].enc)
	}
	j.buf = b
	write := (*os.File).WriteAt
	if testHookJournalWrite != nil {
		write = testHookJournalWrite
	}
	n, err := write(j.f, b, j.size)
	if err != nil {
		// A partial frame would end what is read back: cut it off, and
		// leave the journal alone until the writer is next idle with
		// everything in Badger (a full disk may have room by then).
		j.broken = true
		terr := j.f.Truncate(j.size)
		j.q.log.Error("h3x: badger queue: writing the lease journal failed; leases wait for Badger until it is emptied", "err", err, "truncate_err", terr)
		return errJournalUnavailable
	}
	j.size += int64(n)
	if cap(j.buf) > 64<<10 {
		j.buf = nil // a large Lease's buffer is not kept
	}
	return nil
}

// close empties the journal if empty says nothing in it is needed any more
// (Close wrote every record), and closes it.
func (j *leaseJournal) close(empty bool) {
	if j == nil {
		return
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.f == nil {
		return
	}
	if empty && !j.broken {
		if err := j.f.Truncate(0); err != nil {
			j.q.log.Warn("h3x: badger queue: emptying the lease journal at close failed; it is read again at open", "err", err)
		}
	}
	j.f.Close()
	j.f = nil
}

// journalIdle reports whether every lease record appended to the journal so
// far has been handled by the writer: nothing queued, no round being
// written, no group waiting for the completer and no record left over for
// a later group. A record dropped because it named no latest delivery any
// more was dropped for a settlement queued before it, written by now too.
func (q *badgerQueue) journalIdle() bool {
	q.wmu.Lock()
	defer q.wmu.Unlock()
	return len(q.wops) == 0 && !q.wbusy && q.groupsOut.Load() == 0 && q.pendingRecs == nil
}
