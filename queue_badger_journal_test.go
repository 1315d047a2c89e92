package h3x

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func TestLeaseJournalCodec(t *testing.T) {
	r1 := encodeLeaseRec([]recEntry{{ns: "n", seq: 3, attempt: 1}, {ns: "n", seq: 4, attempt: 2}})
	r2 := encodeLeaseRec([]recEntry{{ns: "other", seq: 1 << 40, attempt: 7}})
	two := appendJournalFrame(appendJournalFrame(nil, 5, r1), 1<<33, r2)
	one := len(appendJournalFrame(nil, 5, r1))

	recs, good, err := decodeJournal(two)
	if err != nil || good != len(two) || len(recs) != 2 || recs[0].seq != 5 || recs[1].seq != 1<<33 ||
		!bytes.Equal(recs[0].rec, r1) || !bytes.Equal(recs[1].rec, r2) {
		t.Fatalf("two frames: %+v, %d of %d, %v", recs, good, len(two), err)
	}
	// Cut anywhere in the second frame: the first is kept, the rest is a
	// frame cut short.
	for cut := one; cut < len(two); cut++ {
		recs, good, err := decodeJournal(two[:cut])
		if len(recs) != 1 || good != one || (cut > one && !errors.Is(err, io.ErrUnexpectedEOF)) || (cut == one && err != nil) {
			t.Fatalf("cut at %d: %d records, good %d, %v", cut, len(recs), good, err)
		}
	}
	damaged := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(two)) }
	for _, c := range []struct {
		name string
		b    []byte
	}{
		{"checksum", damaged(func(b []byte) []byte { b[one+2]++; return b })},
		{"payload", damaged(func(b []byte) []byte { b[len(b)-1]++; return b })},
		{"zero length", append(bytes.Clone(two[:one]), 0, 0, 0, 0, 0)},
		{"length of two bytes where one does", append(bytes.Clone(two[:one]), 0x85, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 9)},
		{"length above the bound", append(bytes.Clone(two[:one]), 0xff, 0xff, 0xff, 0xff, 0x7f)},
		{"sequence number of two bytes where one does", append(bytes.Clone(two[:one]), appendCRCFrame([]byte{0x85, 0x00, 1})...)},
	} {
		recs, good, err := decodeJournal(c.b)
		if len(recs) != 1 || good != one || !errors.Is(err, errCorrupt) {
			t.Errorf("%s: %d records, good %d, %v; want the first frame and errCorrupt", c.name, len(recs), good, err)
		}
	}
	if recs, good, err := decodeJournal(nil); len(recs) != 0 || good != 0 || err != nil {
		t.Errorf("empty: %v %d %v", recs, good, err)
	}
}

// appendCRCFrame frames payload as it is, whatever it holds.
func appendCRCFrame(payload []byte) []byte {
	b := binary.AppendUvarint(nil, uint64(len(payload)))
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(payload, journalCRC))
	return append(b, payload...)
}

// journalSize is the size of q's lease journal file.
func journalSize(t *testing.T, dir string) int64 {
	t.Helper()
	fi, err := os.Stat(filepath.Join(dir, journalFile))
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// A Lease goes through the journal, which is emptied once it is past
// journalTruncateAt and the writer is idle, and at a clean Close.
func TestLeaseJournalEmptiedWhenIdle(t *testing.T) {
	defer func(v int64) { journalTruncateAt = v }(journalTruncateAt)
	journalTruncateAt = 200
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	largest := int64(0)
	for i := range 40 {
		publishTest(t, q, Event{ID: fmt.Sprint("e", i), Namespace: "n"})
		ls := leaseAll(t, q, "h", 1, "n")
		ackAll(t, q, "h", ls)
		writerCaughtUp(q) // the writer idles
		largest = max(largest, journalSize(t, dir))
	}
	if n := q.statJournaled.Load(); n != 40 {
		t.Fatalf("%d Lease calls went through the journal, want 40", n)
	}
	if largest > journalTruncateAt+64 {
		t.Errorf("the journal reached %d bytes; it should be emptied past %d", largest, journalTruncateAt)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if n := journalSize(t, dir); n != 0 {
		t.Errorf("%d bytes in the journal after a clean Close", n)
	}
}

// While the writer never idles the journal stops at journalMax, and Lease
// waits for Badger as before: the records still outlive a kill.
func TestLeaseJournalFullFallsBackToBadger(t *testing.T) {
	defer func(v int64) { journalMax = v }(journalMax)
	journalMax = 1 // full after one append
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	publishTest(t, q, Event{ID: "a", Namespace: "n"}, Event{ID: "b", Namespace: "n"})
	slowLeaseRecords(q, 50*time.Millisecond) // the writer is busy: no emptying
	leaseAll(t, q, "h", 1, "n")              // journaled
	ls := leaseAll(t, q, "h", 1, "n")        // the journal is full: waits for Badger
	if n := q.statJournaled.Load(); n != 1 {
		t.Fatalf("%d Lease calls journaled, want 1", n)
	}
	if ls[0].Event.ID != "b" {
		t.Fatalf("second lease: %+v", ls)
	}
	secondAttemptsAfterKill(t, q, dir, 2)
}

// A failed journal write leaves no partial frame, and Lease waits for
// Badger from then on.
func TestLeaseJournalWriteFailureFallsBackToBadger(t *testing.T) {
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	publishTest(t, q, Event{ID: "a", Namespace: "n"}, Event{ID: "b", Namespace: "n"})
	leaseAll(t, q, "h", 1, "n")
	before := journalSize(t, dir)
	testHookJournalWrite = func(f *os.File, b []byte, off int64) (int, error) {
		n, _ := f.WriteAt(b[:len(b)/2], off) // half a frame, then a failure
		return n, errors.New("injected write failure")
	}
	defer func() { testHookJournalWrite = nil }()
	slowLeaseRecords(q, 50*time.Millisecond)
	leaseAll(t, q, "h", 1, "n")
	if n := q.statJournaled.Load(); n != 1 {
		t.Fatalf("%d Lease calls journaled, want 1 (the second write failed)", n)
	}
	if after := journalSize(t, dir); after != before {
		t.Fatalf("journal of %d bytes after the failed write, %d before: a partial frame was left", after, before)
	}
	secondAttemptsAfterKill(t, q, dir, 2)
	// Once the writes succeed again and the writer idles with every
	// record in Badger, the journal is emptied and used again.
	testHookJournalWrite = nil
	writerCaughtUp(q)
	publishTest(t, q, Event{ID: "c", Namespace: "n"})
	leaseAll(t, q, "h", 1, "n")
	if n := q.statJournaled.Load(); n != 2 {
		t.Errorf("%d Lease calls journaled after the writes succeed again, want 2", n)
	}
}

// At open the newest record naming an event wins, wherever it is: a record
// in the journal that Badger deleted (its delivery was given back unseen,
// which wrote a newer record) does not count the attempt again, and a
// journaled record newer than Badger's does count. Record numbers are not
// reused after the journal's.
func TestLeaseJournalNewestRecordWins(t *testing.T) {
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	publishTest(t, q, Event{ID: "a", Namespace: "n"}, Event{ID: "b", Namespace: "n"})
	leaseAll(t, q, "h", 1, "n") // a, attempt 1, journaled and then written
	nackUnseen(t, q, "h", "a", 1)
	ls := leaseAll(t, q, "h", 2, "n") // a and b at attempt 1
	if len(ls) != 2 {
		t.Fatalf("lease: %+v", ls)
	}
	ackAll(t, q, "h", ls[1:]) // b acked
	writerCaughtUp(q)
	// a's delivery at attempt 1 is journaled only: a nack that redelivers
	// it, whose record the writer is too slow to write before the kill.
	if _, err := q.Nack(context.Background(), "h", []LeaseRef{{ID: "a", Attempt: 1}}, 0, "again"); err != nil {
		t.Fatal(err)
	}
	slowLeaseRecords(q, 100*time.Millisecond)
	ls = leaseAll(t, q, "h", 1, "n")
	if len(ls) != 1 || ls[0].Attempt != 2 {
		t.Fatalf("redelivery: %+v", ls)
	}
	crashed := copyLive(t, dir)
	q.failCommit.Store(nil)
	q2 := openTestBadger(t, crashed, QueueOptions{Durability: DurabilityNoSync})
	var maxSeq uint64
	recs, _, err := decodeJournal(mustRead(t, filepath.Join(crashed, journalFile)))
	if err != nil || len(recs) == 0 {
		t.Fatalf("journal of the killed queue: %d records, %v", len(recs), err)
	}
	for _, r := range recs {
		maxSeq = max(maxSeq, r.seq)
	}
	if q2.core.nextSeq <= maxSeq {
		t.Errorf("next sequence number %d after reopening, not above the journal's %d", q2.core.nextSeq, maxSeq)
	}
	ls = leaseAll(t, q2, "h2", 10, "n")
	if len(ls) != 1 || ls[0].Event.ID != "a" || ls[0].Attempt != 3 {
		t.Fatalf("after the kill: %+v, want a alone at attempt 3", ls)
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// A journal ending in a damaged frame opens: the records before it count,
// and the file is cut there before anything is appended after it.
func TestLeaseJournalDamagedTailOpens(t *testing.T) {
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	slowLeaseRecords(q, 100*time.Millisecond)
	leaseAll(t, q, "h", 1, "n")
	crashed := copyLive(t, dir)
	q.failCommit.Store(nil)
	path := filepath.Join(crashed, journalFile)
	good := mustRead(t, path)
	if err := os.WriteFile(path, append(bytes.Clone(good), 0x20, 1, 2), 0o644); err != nil {
		t.Fatal(err)
	}
	q2 := openTestBadger(t, crashed, QueueOptions{Durability: DurabilityNoSync})
	if n := journalSize(t, crashed); n != int64(len(good)) {
		t.Fatalf("journal of %d bytes after open, want %d (cut after its last whole frame)", n, len(good))
	}
	attemptContinues(t, q2, 1)
}

// A record in the journal that Badger deleted, because the delivery it
// lists was given back unseen and a newer record says so, does not count
// the attempt again after a kill.
func TestLeaseJournalDeletedRecordStaysSuperseded(t *testing.T) {
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	leaseAll(t, q, "h", 1, "n") // attempt 1: journaled, then written
	nackUnseen(t, q, "h", "a", 1)
	writerCaughtUp(q)
	crashed := copyLive(t, dir)
	recs, _, err := decodeJournal(mustRead(t, filepath.Join(crashed, journalFile)))
	if err != nil || len(recs) != 1 {
		t.Fatalf("journal: %d records, %v; want the first lease's", len(recs), err)
	}
	q2 := openTestBadger(t, crashed, QueueOptions{Durability: DurabilityNoSync})
	ls := leaseAll(t, q2, "h2", 1, "n")
	if len(ls) != 1 || ls[0].Attempt != 1 {
		t.Fatalf("after the kill: %+v, want a at attempt 1 (the unseen delivery is not counted)", ls)
	}
}

// The journal is not emptied while a record in it may still be on its way
// to Badger, however large it is.
func TestLeaseJournalKeptWhileARecordIsPending(t *testing.T) {
	defer func(v int64) { journalTruncateAt = v }(journalTruncateAt)
	journalTruncateAt = 1 // every append may empty it
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	publishTest(t, q, Event{ID: "a", Namespace: "n"}, Event{ID: "b", Namespace: "n"})
	slowLeaseRecords(q, 200*time.Millisecond)
	leaseAll(t, q, "h", 1, "n") // a: its record waits in the slowed writer
	leaseAll(t, q, "h", 1, "n") // b: the journal must keep a's
	secondAttemptsAfterKill(t, q, dir, 2)
}

// secondAttemptsAfterKill kills q (a copy of its live directory dir), lets
// its writer go on, and checks that the copy delivers its n events of
// namespace "n", each delivered once before, at attempt 2.
func secondAttemptsAfterKill(t *testing.T, q *badgerQueue, dir string, n int) {
	t.Helper()
	crashed := copyLive(t, dir)
	q.failCommit.Store(nil)
	q2 := openTestBadger(t, crashed, QueueOptions{Durability: DurabilityNoSync})
	ls := leaseAll(t, q2, "h2", n+1, "n")
	if len(ls) != n {
		t.Fatalf("after the kill: %+v, want %d events", ls, n)
	}
	for _, l := range ls {
		if l.Attempt != 2 {
			t.Errorf("after the kill: %s at attempt %d, want 2", l.Event.ID, l.Attempt)
		}
	}
}

// A lease record whose Badger commit fails still outlives a kill: the
// journal holds it (before the journal, such deliveries went out without a
// record until a later group wrote it: RELIABILITY.md finding 3, "Left").
func TestLeaseJournalCoversAFailedRecordCommit(t *testing.T) {
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync})
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	fail := func(ws []bwrite) bool {
		return slices.ContainsFunc(ws, func(w bwrite) bool { return len(w.key) > 0 && w.key[0] == keyLeaseRec && !w.del })
	}
	q.failCommit.Store(&fail)
	leaseAll(t, q, "h", 1, "n")
	writerCaughtUp(q) // the record's commit has failed
	crashed := copyLive(t, dir)
	q.failCommit.Store(nil)
	attemptContinues(t, openTestBadger(t, crashed, QueueOptions{Durability: DurabilityNoSync}), 1)
}
