package h3x

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// Segments. The chunks of enqueued events (queue_badger_chunk.go) are not
// stored in Badger's LSM tree: the writer appends them to segment files
// (dir/segments/NNNNNNNNNNNN.seg, append-only, one written at a time), and
// Badger holds, under the chunk's key, a pointer to where the chunk is. An
// event's bytes are then written once, rather than to Badger's memtable log,
// its skiplist, a level-0 table and again by every compaction: with 256
// single-event publishers that was about a third of the enqueue path's CPU
// and most of its page faults, and the table builders of those flushes and
// compactions were most of a publishing process's memory.
//
// A segment's bytes are written (with DurabilityFsync, synced: syncFiles)
// before the commit that points to them is acknowledged, so a pointer Badger
// holds after a crash points to bytes that were written. A chunk's bytes
// never change; a pointer is rewritten only to move the chunk (relocate).
//
// Space comes back a segment at a time. A segment is removed once no chunk
// key points into it (its pointers deleted with their chunks, or moved) and
// no read still open could follow an older pointer into it (see
// tsClock.oldest). So that a few long-lived chunks (a namespace nobody
// consumes, sharing the segments of busy ones) do not keep whole segments,
// the writer moves the live chunks of a full segment that is mostly settled
// (less than a quarter of its bytes live, and none settled for moveQuiet:
// not one being consumed) to the segment being written, a
// bounded amount per group (planMoves): the disk holds at most about four
// times the live chunks' bytes, plus the segment being written, and moving
// adds at most a third to the bytes written. It finds them by reading the
// segment (each chunk is written with its namespace and first sequence
// number) and keeps those whose pointer in Badger still names that copy.
//
// Nothing per chunk is kept in memory (the backlog is on disk): a segment
// has a count of the pointers that may name it and of their bytes, and the
// writer knows which chunks have a deletion or move in flight (pending);
// any other chunk's pointer it reads from Badger, where every earlier
// change of it has been applied.
//
// Failures only ever keep space: a commit that fails leaves the references
// it would have added or dropped counted, so nothing a pointer may name is
// removed, and the next open counts the references again from the keys.
// A segment that cannot be written is abandoned, and the group's chunks are
// stored in Badger itself (the value format before segments; both are read).
//
// A pointer value is:
//
//	0x00, uvarint segment, uvarint offset, uvarint length, 4 bytes CRC-32C of the chunk
//
// A stored chunk starts with its event count, never 0, so the first byte
// tells the two apart.

const (
	segPtrTag      = 0x00
	maxSegPtrLen   = 1 + 3*binary.MaxVarintLen64 + 4
	segmentsDir    = "segments"
	segmentSuffix  = ".seg"
	relocateBelow  = 4       // move the chunks of a full segment less than 1/relocateBelow live
	relocateBudget = 1 << 20 // bytes moved per group at most
)

// segmentSize is the size at which the segment being written is closed and
// the next started (a variable for tests).
var segmentSize int64 = 32 << 20

// moveQuiet is how long a mostly settled segment's live bytes must not have
// gone down before its chunks are moved: a segment being consumed settles
// by itself, moving its tail would copy what is about to be acked (a
// variable for tests).
var moveQuiet = 10 * time.Second

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// segLoc is where a chunk is stored.
type segLoc struct {
	seg uint64
	off uint64
	n   uint32
	crc uint32
}

func encodeSegPtr(b []byte, l segLoc) []byte {
	b = append(b, segPtrTag)
	b = binary.AppendUvarint(b, l.seg)
	b = binary.AppendUvarint(b, l.off)
	b = binary.AppendUvarint(b, uint64(l.n))
	return binary.BigEndian.AppendUint32(b, l.crc)
}

// isSegPtr reports whether a chunk key's value is a pointer.
func isSegPtr(v []byte) bool { return len(v) > 0 && v[0] == segPtrTag }

func decodeSegPtr(v []byte) (segLoc, error) {
	if !isSegPtr(v) {
		return segLoc{}, fmt.Errorf("chunk pointer: %w", errCorrupt)
	}
	d := decoder{b: v[1:]}
	l := segLoc{seg: d.uvarint(), off: d.uvarint()}
	n := d.uvarint()
	if d.bad || len(d.b) != 4 || n == 0 || n > 1<<30 {
		return segLoc{}, fmt.Errorf("chunk pointer: %w", errCorrupt)
	}
	l.n, l.crc = uint32(n), binary.BigEndian.Uint32(d.b)
	return l, nil
}

// chunkID names a chunk: its namespace and first sequence number.
type chunkID struct {
	ns    string
	first uint64
}

// segRef is a chunk's pointer into a segment, written or dropped by a
// transaction, as part of kind of change (pendPut, pendMove: a move writes
// one and drops one, pendDelete).
type segRef struct {
	id   chunkID
	loc  segLoc
	kind int
}

// A segment is a sequence of records, one per chunk:
//
//	uvarint len(ns), ns, 8 bytes first (big-endian), 4 bytes len(chunk), the chunk
//
// so that the writer can find the chunks of a segment to move them by
// reading the segment (planMoves); a pointer names the chunk's bytes.

// appendRecordHeader appends the header of the record of chunk first of ns,
// with the chunk's length to fill in (setRecordLen) once it is encoded.
func appendRecordHeader(b []byte, ns string, first uint64) []byte {
	b = appendString(b, ns)
	b = binary.BigEndian.AppendUint64(b, first)
	return append(b, 0, 0, 0, 0)
}

// setRecordLen fills in the length of the chunk that starts at chunkStart
// and ends at the end of b.
func setRecordLen(b []byte, chunkStart int) {
	binary.BigEndian.PutUint32(b[chunkStart-4:chunkStart], uint32(len(b)-chunkStart))
}

// parseRecord reads the record at the start of b: its chunk's ID, where the
// chunk starts in b and how long it is. ok is false if b holds only part
// of it (need: how many bytes it needs, if known) or bad if it cannot be
// a record.
func parseRecord(b []byte) (id chunkID, at, n int, need int, bad bool) {
	nsLen, w := binary.Uvarint(b)
	if w < 0 || nsLen > maxRecordNS {
		return chunkID{}, 0, 0, 0, true
	}
	if w == 0 || len(b) < w+int(nsLen)+12 {
		return chunkID{}, 0, 0, w + int(nsLen) + 12 + binary.MaxVarintLen64, false
	}
	at = w + int(nsLen) + 12
	n = int(binary.BigEndian.Uint32(b[at-4 : at]))
	if n == 0 || n > maxRecordChunk {
		return chunkID{}, 0, 0, 0, true
	}
	if len(b) < at+n {
		return chunkID{}, 0, 0, at + n, false
	}
	return chunkID{string(b[w : w+int(nsLen)]), binary.BigEndian.Uint64(b[at-12 : at-4])}, at, n, 0, false
}

const (
	maxRecordNS    = 64 << 10
	maxRecordChunk = 16 << 20
)

// segment is one segment file. Guarded by segStore.mu.
type segment struct {
	id   uint64
	f    *os.File // nil until opened (read) or created (written)
	size int64    // bytes in the file
	// live is the bytes of the chunks pointers name (counted when a
	// pointer is written, taken off once its deletion or move is
	// durable); refs is the pointers that may name it, likewise.
	live   int64
	refs   int
	sealed bool   // no longer written
	dirty  bool   // written since the last sync
	gone   uint64 // its last reference dropped at this version (0: not yet)
	// scan is how far planMoves has read it looking for chunks to move;
	// scanned, that it read to the end (or to something it cannot read).
	scan    int64
	scanned bool
	users   int  // reads using f
	reading bool // f is open for reading only (counted in segStore.readers)
	// settled is when its live bytes last went down: its chunks are
	// moved only once that has not happened for moveQuiet.
	settled  time.Time
	movedOut bool // chunks were moved out of it (see removeRetired)
	// nameSynced: its directory entry has been synced (at creation with
	// DurabilityFsync; before the first moved copies land in it otherwise).
	nameSynced bool
}

// pendingChunk counts the changes of one chunk's pointer in flight.
type pendingChunk struct {
	puts, moves, deletes int
	to                   segLoc // where the last move in flight takes it
}

// The kinds of change of a chunk's pointer.
const (
	pendPut = iota // written
	pendMove
	pendDelete
)

// segStore is a badgerQueue's segments.
type segStore struct {
	dir string
	log *slog.Logger
	// durable: DurabilityFsync (a new segment's name is synced at once);
	// syncEach: and Badger syncs each commit itself (the escape hatch's
	// SyncWrites), so each write is synced before its commit.
	durable, syncEach bool
	// syncFailed reports a failed sync (the queue's syncBroken).
	syncFailed func(error)
	// syncLock is held around each fdatasync of a segment and the
	// recording of its failure (see syncFile).
	syncLock sync.Mutex

	mu     sync.RWMutex
	segs   map[uint64]*segment
	active *segment
	nextID uint64
	// pending holds the chunks whose pointer the writer has written,
	// moved or deleted and whose commit has not completed; changedAt, the
	// version of each chunk's last completed change, until every open read
	// is at least as new (removeRetired prunes it). The writer reads any
	// other chunk's pointer from Badger, with a read that is not older
	// than its last change (freshLoc).
	pending   map[chunkID]*pendingChunk
	changedAt map[chunkID]uint64
	retired   []*segment // no references left, removed once no read can follow one
	readers   int        // files open for reading only (at most maxOpenSegments)
	buf       []byte     // the writer's buffer (writer-owned)
	window    []byte     // planMoves' read buffer (writer-owned)
	broken    bool       // logged once: a segment could not be written (writer-owned)

	// disabled, a test hook (and for Badger in memory), stores every
	// chunk in Badger.
	disabled atomic.Bool
}

func newSegStore(dir string, log *slog.Logger, durable, syncEach bool, syncFailed func(error)) *segStore {
	return &segStore{dir: filepath.Join(dir, segmentsDir), log: log, durable: durable, syncEach: syncEach, syncFailed: syncFailed,
		segs: make(map[uint64]*segment), pending: make(map[chunkID]*pendingChunk), changedAt: make(map[chunkID]uint64), nextID: 1}
}

// maxOpenSegments bounds the files kept open for reading full segments;
// beyond it, one not in use is closed (reopened when read again).
const maxOpenSegments = 64

// errLostChunk says a chunk is not where its pointer says: its segment is
// missing, shorter, or holds other bytes (a crash before the segment was
// written back, or damage). Such a chunk is set aside (see
// badgerQueue.lostChunk), never delivered.
var errLostChunk = errors.New("chunk not in its segment")

func lostChunk(l segLoc, what string, err error) error {
	return fmt.Errorf("segment %d at %d: %s: %w", l.seg, l.off, what, errors.Join(errLostChunk, errCorrupt, err))
}

func segmentPath(dir string, id uint64) string {
	return filepath.Join(dir, fmt.Sprintf("%012d%s", id, segmentSuffix))
}

// open finds the segment files, at open; new ones are numbered after them.
func (s *segStore) open() error {
	if s.disabled.Load() {
		return nil
	}
	entries, err := os.ReadDir(s.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("h3x: badger queue: read %s: %w", s.dir, err)
	}
	for _, e := range entries {
		id, err := strconv.ParseUint(strings.TrimSuffix(e.Name(), segmentSuffix), 10, 64)
		if err != nil || !strings.HasSuffix(e.Name(), segmentSuffix) {
			continue
		}
		info, err := e.Info()
		if err != nil {
			return fmt.Errorf("h3x: badger queue: %w", err)
		}
		s.segs[id] = &segment{id: id, size: info.Size(), sealed: true}
		s.nextID = max(s.nextID, id+1)
	}
	return nil
}

// count records, at open, a stored pointer to l.
func (s *segStore) count(l segLoc) {
	s.nextID = max(s.nextID, l.seg+1) // never reuse a number a pointer names, even a missing segment's
	if sg := s.segs[l.seg]; sg != nil {
		sg.refs++
		sg.live += int64(l.n)
		sg.settled = time.Now() // being consumed, maybe: see moveQuiet
	} // missing: reading the chunk reports it
}

// removeUnused removes, at open, the segments no pointer names.
func (s *segStore) removeUnused() {
	for id, sg := range s.segs {
		if sg.refs == 0 {
			delete(s.segs, id)
			s.closeFile(sg)
			if err := os.Remove(segmentPath(s.dir, id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				s.log.Warn("h3x: badger queue: cannot remove an unused segment", "segment", id, "err", err)
			}
		}
	}
}

// read calls fn with the chunk l names, valid only during the call.
func (s *segStore) read(l segLoc, fn func([]byte) error) error {
	f, release, err := s.reader(l.seg)
	if err != nil {
		return err
	}
	defer release()
	bp := readBufs.Get().(*[]byte)
	defer readBufs.Put(bp)
	if cap(*bp) < int(l.n) {
		*bp = make([]byte, l.n)
	}
	buf := (*bp)[:l.n]
	if n, err := f.ReadAt(buf, int64(l.off)); n < len(buf) {
		if errors.Is(err, io.EOF) {
			return lostChunk(l, "cut short", err)
		}
		return fmt.Errorf("segment %d at %d: %w", l.seg, l.off, err)
	}
	if crc32.Checksum(buf, castagnoli) != l.crc {
		return lostChunk(l, "checksum mismatch", nil)
	}
	return fn(buf)
}

// readBufs are the buffers chunks are read into (fn never keeps one).
var readBufs = sync.Pool{New: func() any { return new([]byte) }}

// reader returns the open file of segment id, and a release for when the
// read is done. A file in use stays open; one open only for reading is
// closed when more than maxOpenSegments are, and not in use.
func (s *segStore) reader(id uint64) (*os.File, func(), error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sg := s.segs[id]
	if sg == nil {
		return nil, nil, fmt.Errorf("segment %d is missing: %w", id, errors.Join(errLostChunk, errCorrupt))
	}
	if sg.f == nil {
		f, err := os.Open(segmentPath(s.dir, id))
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil, fmt.Errorf("segment %d: %w", id, errors.Join(errLostChunk, errCorrupt, err))
		}
		if err != nil {
			return nil, nil, fmt.Errorf("segment %d: %w", id, err)
		}
		sg.f, sg.reading = f, true
		s.readers++
		s.evict(sg)
	}
	sg.users++
	return sg.f, func() {
		s.mu.Lock()
		sg.users--
		s.mu.Unlock()
	}, nil
}

var errSegmentsDisabled = errors.New("segments disabled")

// appendRecords writes buf, the records of one group's chunks (or of the
// chunks it moves), to the segment being written, and returns where it
// starts. Writer-owned.
func (s *segStore) appendRecords(buf []byte) (*segment, uint64, error) {
	if s.disabled.Load() {
		return nil, 0, errSegmentsDisabled
	}
	s.mu.Lock()
	sg := s.active
	if sg != nil && sg.size >= segmentSize {
		s.seal(sg)
		sg = nil
	}
	s.mu.Unlock()
	if sg == nil {
		var err error
		if sg, err = s.create(); err != nil {
			return nil, 0, err
		}
	}
	off := sg.size
	_, err := sg.f.WriteAt(buf, off)
	if err == nil && s.syncEach {
		err = s.syncFile(sg.f)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sg.size += int64(len(buf))
	if err != nil {
		// Whatever part of it was written is named by no pointer; the
		// next group starts a new segment.
		s.seal(sg)
		return nil, 0, err
	}
	sg.dirty = !s.syncEach // synced already if syncEach
	return sg, uint64(off), nil
}

// syncNames syncs the segments directory and its parent, so that the names
// of the segments created in it (and the directory's own) survive a crash.
func (s *segStore) syncNames() error {
	for _, d := range []string{s.dir, filepath.Dir(s.dir)} {
		if err := syncPathFn(d); err != nil {
			return err
		}
	}
	return nil
}

// create starts the next segment.
func (s *segStore) create() (*segment, error) {
	if err := os.MkdirAll(s.dir, 0o755); err != nil {
		return nil, err
	}
	s.mu.Lock()
	id := s.nextID
	s.nextID++
	s.mu.Unlock()
	f, err := os.OpenFile(segmentPath(s.dir, id), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, err
	}
	if s.durable {
		// The new name must survive a crash before anything in it is
		// acknowledged (the file's data is synced by syncFiles).
		if err := s.syncNames(); err != nil {
			f.Close()
			os.Remove(f.Name())
			return nil, err
		}
	}
	sg := &segment{id: id, f: f, nameSynced: s.durable}
	s.mu.Lock()
	s.segs[id] = sg
	s.active = sg
	s.mu.Unlock()
	return sg, nil
}

// seal ends the writing of sg, the active segment. Its file is kept open
// for reading only as other full segments' are (maxOpenSegments) once
// nothing in it waits for a sync: with DurabilityFsync, a sync must go
// through a descriptor open before a writeback error, so a dirty file stays
// open until syncFiles has synced it. Caller holds s.mu.
func (s *segStore) seal(sg *segment) {
	sg.sealed = true
	s.active = nil
	if !s.durable || !sg.dirty {
		s.readOnly(sg)
	}
	s.retireIfUnused(sg)
}

// readOnly counts sg's open file among those kept for reading, closing
// another if there are too many. Caller holds s.mu.
func (s *segStore) readOnly(sg *segment) {
	if sg.f == nil || sg.reading {
		return
	}
	sg.reading = true
	s.readers++
	s.evict(sg)
}

// evict closes files kept for reading that no read uses, other than keep,
// while there are more than maxOpenSegments. Caller holds s.mu.
func (s *segStore) evict(keep *segment) {
	for _, o := range s.segs {
		if s.readers <= maxOpenSegments {
			return
		}
		if o.reading && o.users == 0 && o != keep {
			s.closeFile(o)
		}
	}
}

// storing counts the pointer r (a put or a move's put) the writer is
// writing, and records it in flight.
func (s *segStore) storing(r segRef) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sg := s.segs[r.loc.seg]
	sg.refs++
	sg.live += int64(r.loc.n)
	s.pend(r.id, r.kind, r.loc)
}

// deleting records the deletion of chunk id's pointer in flight.
func (s *segStore) deleting(id chunkID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pend(id, pendDelete, segLoc{})
}

// pend records a change in flight of chunk id's pointer (pendPut,
// pendMove to to, pendDelete). Caller holds s.mu.
func (s *segStore) pend(id chunkID, kind int, to segLoc) {
	p := s.pending[id]
	if p == nil {
		p = &pendingChunk{}
		s.pending[id] = p
	}
	switch kind {
	case pendPut:
		p.puts++
	case pendMove:
		p.moves++
		p.to = to
	default:
		p.deletes++
	}
}

// unpend records that a change of chunk id's pointer, of version v (0: never
// committed), has completed or failed. Caller holds s.mu.
func (s *segStore) unpend(id chunkID, kind int, v uint64) {
	if p := s.pending[id]; p != nil {
		switch kind {
		case pendPut:
			p.puts--
		case pendMove:
			p.moves--
		default:
			p.deletes--
		}
		if p.puts <= 0 && p.moves <= 0 && p.deletes <= 0 {
			delete(s.pending, id)
		}
	}
	if v > s.changedAt[id] {
		s.changedAt[id] = v
	}
}

// done applies what a transaction of version v did to the segments, once
// it is durable (ok) or has failed (!ok: every reference it added or would
// have dropped stays counted, so nothing it may have written a pointer to is
// removed; the next open counts them again).
func (s *segStore) done(puts, drops []segRef, v uint64, ok bool) {
	if len(puts) == 0 && len(drops) == 0 {
		return
	}
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range puts {
		if r.kind == pendPut { // (a move is counted once, with its drop)
			s.unpend(r.id, pendPut, v)
		}
	}
	for _, r := range drops {
		s.unpend(r.id, r.kind, v)
		move := r.kind == pendMove
		if !ok {
			continue
		}
		sg := s.segs[r.loc.seg]
		if sg == nil {
			continue
		}
		sg.refs--
		sg.live -= int64(r.loc.n)
		if !move {
			sg.settled = now // (moving its chunks out is not consumption)
		}
		sg.movedOut = sg.movedOut || move
		if sg.refs == 0 {
			sg.gone = v
			s.retireIfUnused(sg)
		}
	}
}

// retireIfUnused puts sg on the list to remove if it is no longer written
// and nothing names it. Caller holds s.mu.
func (s *segStore) retireIfUnused(sg *segment) {
	if sg.refs == 0 && sg.gone == 0 {
		sg.gone = 1 // never named by any commit
	}
	if sg != s.active && sg.sealed && sg.refs == 0 && !slices.Contains(s.retired, sg) {
		s.retired = append(s.retired, sg)
	}
}

// removeRetired removes the retired segments that no open read can name:
// oldest is the version of the oldest read still open (or the applied
// version if none is), and a read at or after the version that dropped a
// segment's last reference does not see it. beforeRemove (if not nil) runs
// first when one to remove had chunks moved out of it (the new pointers
// must be durable before the old copies go; a deletion that a crash undoes
// only brings back a chunk whose events were all settled, which the next
// open sets aside); if it fails, they stay.
func (s *segStore) removeRetired(oldest uint64, beforeRemove func() error) {
	s.mu.Lock()
	for id, v := range s.changedAt {
		if v <= oldest {
			delete(s.changedAt, id)
		}
	}
	ready := slices.ContainsFunc(s.retired, func(sg *segment) bool { return sg.gone <= oldest })
	moved := slices.ContainsFunc(s.retired, func(sg *segment) bool { return sg.gone <= oldest && sg.movedOut })
	s.mu.Unlock()
	if !ready {
		return
	}
	if beforeRemove != nil && moved {
		if err := beforeRemove(); err != nil {
			s.log.Warn("h3x: badger queue: segments kept: the deletions that emptied them could not be synced", "err", err)
			return
		}
	}
	s.mu.Lock()
	var gone []*segment
	s.retired = slices.DeleteFunc(s.retired, func(sg *segment) bool {
		if sg.gone > oldest {
			return false
		}
		gone = append(gone, sg)
		delete(s.segs, sg.id)
		s.closeFile(sg)
		return true
	})
	s.mu.Unlock()
	for _, sg := range gone {
		if err := os.Remove(segmentPath(s.dir, sg.id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.log.Warn("h3x: badger queue: cannot remove a segment", "segment", sg.id, "err", err)
		}
	}
}

// freshRead reads chunk pointers for the writer at the applied version,
// starting a newer read when the current one is older than a chunk's last
// completed change (see segStore.changedAt). Writer-owned; end it with
// end.
type freshRead struct {
	q   *badgerQueue
	txn *badger.Txn
}

func (r *freshRead) end() {
	if r.txn != nil {
		r.q.ts.end(r.txn)
		r.txn = nil
	}
}

// state reports chunk id's changes in flight (inFlight: any) and whether
// the read, started afresh if needed, is as new as its last completed
// change.
func (r *freshRead) state(id chunkID) (p pendingChunk, inFlight, fresh bool) {
	s := r.q.segs
	for try := 0; ; try++ {
		if r.txn == nil {
			r.txn = r.q.ts.read()
		}
		s.mu.RLock()
		pp, changed := s.pending[id], s.changedAt[id]
		if pp != nil {
			p = *pp
		}
		s.mu.RUnlock()
		if pp != nil || changed <= r.txn.ReadTs() {
			return p, pp != nil, true
		}
		if try > 0 {
			return p, false, false // the applied version is behind it: try later
		}
		r.end() // a newer read sees it
	}
}

// chunkLoc returns where the pointer of chunk id names, for its deletion:
// the destination of a move in flight, or else the pointer Badger holds;
// false if it is stored in place, already being deleted, or not known for
// sure (its reference then stays counted until the next open).
func (r *freshRead) chunkLoc(id chunkID) (segLoc, bool) {
	p, inFlight, fresh := r.state(id)
	switch {
	case !fresh || p.deletes > 0 || p.puts > 0:
		return segLoc{}, false
	case inFlight && p.moves > 0:
		return p.to, true
	}
	return storedLoc(r.txn, id)
}

// storedLoc reads the pointer Badger holds for chunk id (false: none, the
// chunk is stored in place, or it cannot be read).
func storedLoc(txn *badger.Txn, id chunkID) (segLoc, bool) {
	item, err := txn.Get(seqKey(keyEvent, id.ns, id.first))
	if err != nil {
		return segLoc{}, false
	}
	var l segLoc
	ok := false
	item.Value(func(v []byte) error {
		if isSegPtr(v) {
			var err error
			l, err = decodeSegPtr(v)
			ok = err == nil
		}
		return nil
	})
	return l, ok
}

// Bounds of what planMoves does for one group.
const (
	moveMaxChunks  = 256       // chunks moved
	moveMaxRecords = 1024      // records read
	moveWindow     = 256 << 10 // bytes read at once
)

// planMoves reads on through full segments that are mostly settled and
// picks up to relocateBudget bytes (moveMaxChunks chunks) of chunks that
// are still live there, and appends them to the segment being written:
// the moves for the writer to write. A chunk is live if Badger's pointer
// (read at the applied version) names it and no change of it is in
// flight. Writer-owned.
func (q *badgerQueue) planMoves() []relocation {
	s := q.segs
	now := time.Now()
	s.mu.RLock()
	var victims []*segment
	for _, sg := range s.segs {
		if sg.sealed && sg != s.active && !sg.scanned && sg.refs > 0 && sg.live*relocateBelow < sg.size && now.Sub(sg.settled) >= moveQuiet {
			victims = append(victims, sg)
		}
	}
	s.mu.RUnlock()
	if len(victims) == 0 {
		return nil
	}
	slices.SortFunc(victims, func(a, b *segment) int { return cmp.Compare(a.id, b.id) })
	fr := freshRead{q: q}
	defer fr.end()
	var moves []relocation
	type scanMark struct {
		sg      *segment
		scan    int64
		scanned bool
	}
	var undo []scanMark
	buf := s.buf[:0]
	records := 0
	if s.window == nil {
		s.window = make([]byte, moveWindow)
	}
	window := s.window
	for _, sg := range victims {
		f, release, err := s.reader(sg.id)
		if err != nil {
			s.mu.Lock()
			sg.scanned = true
			if s.segs[sg.id] == sg {
				q.log.Error("h3x: badger queue: cannot read a segment to move its chunks; it stays", "segment", sg.id, "err", err)
			}
			s.mu.Unlock()
			continue
		}
		s.mu.RLock()
		pos, size := sg.scan, sg.size
		s.mu.RUnlock()
		var win []byte // window holds the file from winAt
		winAt := int64(-1)
		stop := false
		for pos < size && records < moveMaxRecords && len(moves) < moveMaxChunks && len(buf) < relocateBudget {
			rel := pos - winAt
			if winAt < 0 || rel >= int64(len(win)) {
				winAt, rel = pos, 0
				win, err = readWindow(f, window, pos, size)
				if err != nil {
					break
				}
			}
			id, at, n, need, bad := parseRecord(win[rel:])
			if bad {
				err = errCorrupt
				break
			}
			if need > 0 {
				if winAt != pos {
					winAt = -1 // read again from this record
					continue
				}
				// Larger than the window: read it whole.
				win, err = readWindow(f, make([]byte, need), pos, size)
				if err != nil || len(win) < need {
					err = cmp.Or(err, errCorrupt) // cut short: a write that failed
					break
				}
				continue
			}
			if _, inFlight, fresh := fr.state(id); inFlight || !fresh {
				// Being written or deleted, or changed after what can be
				// read yet: read on from here with a later group.
				stop = true
				break
			}
			records++
			rec := win[rel : rel+int64(at+n)]
			chunk := rec[at:]
			loc := segLoc{seg: sg.id, off: uint64(pos) + uint64(at), n: uint32(n)}
			pos += int64(at + n)
			cur, ok := storedLoc(fr.txn, id)
			if !ok || cur.seg != loc.seg || cur.off != loc.off || cur.n != loc.n {
				continue // settled, or not this copy
			}
			if crc32.Checksum(chunk, castagnoli) != cur.crc {
				q.log.Error("h3x: badger queue: a chunk to move fails its checksum; it stays", "segment", sg.id, "namespace", id.ns)
				continue
			}
			loc.crc = cur.crc
			start := len(buf)
			buf = append(buf, rec...)
			moves = append(moves, relocation{id: id, from: loc, to: segLoc{off: uint64(start + at), n: loc.n, crc: loc.crc}})
		}
		release()
		s.mu.Lock()
		undo = append(undo, scanMark{sg, sg.scan, sg.scanned})
		sg.scan = pos
		if pos >= size || err != nil {
			sg.scanned = true
			// (A segment whose last chunk was settled meanwhile may have
			// been removed under the read: nothing to say then.)
			if err != nil && s.segs[sg.id] == sg {
				q.log.Warn("h3x: badger queue: stopped reading a segment for chunks to move", "segment", sg.id, "at", pos, "err", err)
			}
		}
		s.mu.Unlock()
		if stop || records >= moveMaxRecords || len(moves) >= moveMaxChunks || len(buf) >= relocateBudget {
			break
		}
	}
	s.buf = buf
	if len(moves) == 0 {
		return nil
	}
	// If the copies cannot be written, the scan goes back to them.
	defer func() {
		if moves == nil {
			s.mu.Lock()
			for _, u := range undo {
				u.sg.scan, u.sg.scanned = u.scan, u.scanned
			}
			s.mu.Unlock()
		}
	}()
	to, off, err := s.appendRecords(buf)
	if err == nil && !s.syncEach {
		// The moved copies must be on disk before a pointer names them:
		// the events were acknowledged long ago, and the old copies go
		// once the pointers are durable.
		err = s.syncFile(to.f)
	}
	if err == nil && !to.nameSynced {
		// And the file's name, for the same reason.
		if err = s.syncNames(); err != nil {
			s.syncFailed(err)
		}
		to.nameSynced = err == nil
	}
	if err != nil {
		q.log.Error("h3x: badger queue: cannot move chunks out of a mostly settled segment", "err", err)
		moves = nil // (the deferred undo)
		return nil
	}
	for i := range moves {
		m := &moves[i]
		m.to.seg = to.id
		m.to.off += off
		s.storing(segRef{m.id, m.to, pendMove})
	}
	return moves
}

// readWindow reads into buf from the file at pos, up to size: what it could
// read.
func readWindow(f *os.File, buf []byte, pos, size int64) ([]byte, error) {
	buf = buf[:min(int64(len(buf)), size-pos)]
	n, err := f.ReadAt(buf, pos)
	if n == len(buf) {
		err = nil
	}
	return buf[:n], err
}

// relocation is the move of one chunk, planned by the writer.
type relocation struct {
	id       chunkID
	from, to segLoc
}

// segSync is a segment's file taken for a sync, pinned (users) so that
// it is not closed meanwhile.
type segSync struct {
	sg *segment
	f  *os.File
}

// dirtyFiles returns the files written since the last sync, pinned, and
// marks them clean (syncFiles puts them back if the sync fails).
func (s *segStore) dirtyFiles() []segSync {
	s.mu.Lock()
	defer s.mu.Unlock()
	var d []segSync
	for _, sg := range s.segs {
		if sg.dirty && sg.f != nil {
			sg.dirty = false
			sg.users++
			d = append(d, segSync{sg, sg.f})
		}
	}
	return d
}

// testHookSegmentSync, set by tests, runs as syncFiles starts (to hold
// the completer's sync of the segments back, as a goroutine waiting for a
// processor is).
var testHookSegmentSync func()

// syncFile fdatasyncs f, a segment, and records a failure (syncFailed)
// before another sync of a segment can start. Linux reports a write-back
// error once per open file: when the writer's sync of moved copies
// (planMoves) gets it, the completer's sync of the same file, which also
// covers publishes, then succeeds; with both under syncLock, a sync that
// succeeds after the other's failure finds it recorded (syncAndComplete
// checks once its sync is done).
func (s *segStore) syncFile(f *os.File) error {
	s.syncLock.Lock()
	defer s.syncLock.Unlock()
	err := fdatasyncFn(f)
	if err != nil {
		s.syncFailed(err)
	}
	return err
}

// syncFiles fdatasyncs d, from dirtyFiles, and unpins them; if one fails,
// all of them are synced again next time.
func (s *segStore) syncFiles(d []segSync) error {
	if testHookSegmentSync != nil {
		testHookSegmentSync()
	}
	var err error
	for _, x := range d {
		if err = s.syncFile(x.f); err != nil {
			err = fmt.Errorf("segment %d: %w", x.sg.id, err)
			break
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, x := range d {
		x.sg.users--
		if err != nil {
			x.sg.dirty = true
		} else if x.sg.sealed && !x.sg.dirty {
			s.readOnly(x.sg)
		}
	}
	return err
}

// close closes the files and, with removeRetired, removes the retired
// segments (nothing reads any more).
func (s *segStore) close(removeRetired bool) {
	if removeRetired {
		s.removeRetired(^uint64(0), nil)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sg := range s.segs {
		s.closeFile(sg)
	}
}

// closeFile closes sg's file, if open. Caller holds s.mu.
func (s *segStore) closeFile(sg *segment) {
	if sg.f == nil {
		return
	}
	sg.f.Close()
	if sg.reading {
		s.readers--
	}
	sg.f, sg.reading = nil, false
}

// withChunk calls fn with the chunk stored in item: in place, or read from
// its segment.
func (q *badgerQueue) withChunk(item *badger.Item, fn func(v []byte) error) error {
	return item.Value(func(v []byte) error {
		if !isSegPtr(v) {
			return fn(v)
		}
		l, err := decodeSegPtr(v)
		if err != nil {
			return err
		}
		return q.segs.read(l, fn)
	})
}

// countSegments counts, at open, the pointers into each segment, and
// removes the segments none names.
func (q *badgerQueue) countSegments() error {
	s := q.segs
	if s.disabled.Load() {
		return nil
	}
	// Counted even when no segment file is there: the pointers' segment
	// numbers are never reused (count).
	err := q.ts.view(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyEvent}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			if item.ValueSize() > maxSegPtrLen {
				continue // a chunk stored in place
			}
			ns, _, ok := decodeSeqKey(item.Key(), keyEvent)
			if !ok {
				continue
			}
			err := item.Value(func(v []byte) error {
				if !isSegPtr(v) {
					return nil
				}
				l, err := decodeSegPtr(v)
				if err != nil {
					q.log.Warn("h3x: badger queue: unreadable chunk pointer", "namespace", ns, "err", err)
					return nil
				}
				s.count(l)
				return nil
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("h3x: badger queue: count segment references: %w", err)
	}
	if s.durable {
		// What load deleted (writeRepairs) must be on disk before the
		// segments its pointers named go.
		if err := q.db.Sync(); err != nil {
			return fmt.Errorf("h3x: badger queue: sync before removing unused segments: %w", err)
		}
	}
	s.removeUnused()
	return nil
}

// decodeSeqKey splits a key made by appendSeqKey.
func decodeSeqKey(k []byte, kind byte) (ns string, seq uint64, ok bool) {
	if len(k) < 1+1+8 || k[0] != kind {
		return "", 0, false
	}
	n, w := binary.Uvarint(k[1:])
	if w <= 0 || uint64(len(k)-1-w) != n+8 || w != uvarintLen(n) {
		return "", 0, false // not a key seqKey makes: a length in more bytes than it needs names no key
	}
	return string(k[1+w : 1+w+int(n)]), binary.BigEndian.Uint64(k[len(k)-8:]), true
}

// uvarintLen is the length of n's shortest uvarint encoding, the one
// binary.AppendUvarint writes.
func uvarintLen(n uint64) int {
	var b [binary.MaxVarintLen64]byte
	return binary.PutUvarint(b[:], n)
}
