package h3x

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

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
// no read still open could follow an older pointer into it (see tsClock.oldest).
// So that a few long-lived chunks (a namespace nobody consumes, sharing the
// segments of busy ones) do not keep whole segments, the writer moves the
// chunks of a full segment that is mostly settled (less than a quarter of
// its bytes live) to the segment being written, a bounded amount per group:
// the disk holds at most about four times the live chunks' bytes, plus the
// segment being written, and moving adds at most a third to the bytes
// written.
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
// transaction.
type segRef struct {
	id  chunkID
	loc segLoc
}

type segment struct {
	id     uint64
	f      *os.File // nil until opened (read) or created (written)
	size   int64    // bytes in the file
	live   int64    // bytes of the chunks the writer's view has in it
	refs   int      // chunk keys that may point into it
	chunks map[chunkID]segLoc
	sealed bool   // no longer written
	dirty  bool   // written since the last sync
	gone   uint64 // its last reference dropped at this version (0: not yet)
}

// segStore is a badgerQueue's segments.
type segStore struct {
	dir   string
	log   *slog.Logger
	fsync bool

	mu     sync.RWMutex
	segs   map[uint64]*segment
	active *segment
	nextID uint64
	// where is the writer's view of each chunk stored in a segment: set
	// when its pointer is written, removed when its deletion is. The
	// chunks a segment's commits have confirmed (and the writer has not
	// deleted or moved since) are also in that segment's chunks: only
	// those are moved.
	where   map[chunkID]segLoc
	retired []*segment // no references left, removed once no read can follow one
	buf     []byte     // the writer's chunk buffer
	broken  bool       // logged once: a segment could not be written

	// disabled, a test hook, stores every chunk in Badger.
	disabled atomic.Bool
}

func newSegStore(dir string, log *slog.Logger, fsync bool) *segStore {
	return &segStore{dir: filepath.Join(dir, segmentsDir), log: log, fsync: fsync,
		segs: make(map[uint64]*segment), where: make(map[chunkID]segLoc), nextID: 1}
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
		s.segs[id] = &segment{id: id, size: info.Size(), sealed: true, chunks: make(map[chunkID]segLoc)}
		s.nextID = max(s.nextID, id+1)
	}
	return nil
}

// count records, at open, that chunk id's stored pointer names l.
func (s *segStore) count(id chunkID, l segLoc) {
	sg := s.segs[l.seg]
	if sg == nil {
		return // missing: reading the chunk reports it
	}
	sg.refs++
	sg.gone = 0
	sg.live += int64(l.n)
	sg.chunks[id] = l
	s.where[id] = l
}

// removeUnused removes, at open, the segments no pointer names.
func (s *segStore) removeUnused() {
	for id, sg := range s.segs {
		if sg.refs == 0 {
			delete(s.segs, id)
			if sg.f != nil {
				sg.f.Close()
			}
			if err := os.Remove(segmentPath(s.dir, id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				s.log.Warn("h3x: badger queue: cannot remove an unused segment", "segment", id, "err", err)
			}
		}
	}
}

// read calls fn with the chunk l names, valid only during the call.
func (s *segStore) read(l segLoc, fn func([]byte) error) error {
	f, err := s.reader(l.seg)
	if err != nil {
		return err
	}
	bp := readBufs.Get().(*[]byte)
	defer readBufs.Put(bp)
	if cap(*bp) < int(l.n) {
		*bp = make([]byte, l.n)
	}
	buf := (*bp)[:l.n]
	if _, err := f.ReadAt(buf, int64(l.off)); err != nil {
		return fmt.Errorf("segment %d at %d: %w", l.seg, l.off, errors.Join(err, errCorrupt))
	}
	if crc32.Checksum(buf, castagnoli) != l.crc {
		return fmt.Errorf("segment %d at %d: checksum mismatch: %w", l.seg, l.off, errCorrupt)
	}
	return fn(buf)
}

// readBufs are the buffers chunks are read into (fn never keeps one).
var readBufs = sync.Pool{New: func() any { return new([]byte) }}

// reader returns the open file of segment id. A file stays open until the
// segment is removed, which waits for every read that could name it.
func (s *segStore) reader(id uint64) (*os.File, error) {
	s.mu.RLock()
	sg := s.segs[id]
	var f *os.File
	if sg != nil {
		f = sg.f
	}
	s.mu.RUnlock()
	if f != nil {
		return f, nil
	}
	if sg == nil {
		return nil, fmt.Errorf("segment %d is missing: %w", id, errCorrupt)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if sg.f == nil {
		f, err := os.Open(segmentPath(s.dir, id))
		if err != nil {
			return nil, fmt.Errorf("segment %d: %w", id, errors.Join(err, errCorrupt))
		}
		sg.f = f
	}
	return sg.f, nil
}

// appendChunks writes buf, the encoded chunks of one group (or the chunks
// it moves), to the segment being written, and returns where it starts.
// Writer-owned.
func (s *segStore) appendChunks(buf []byte) (*segment, uint64, error) {
	if s.disabled.Load() {
		return nil, 0, errSegmentsDisabled
	}
	s.mu.Lock()
	sg := s.active
	if sg != nil && sg.size >= segmentSize {
		sg.sealed = true
		s.active = nil
		s.retireIfUnused(sg)
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
	if _, err := sg.f.WriteAt(buf, off); err != nil {
		// Whatever part of it was written stays unreferenced; the next
		// group starts a new segment.
		s.mu.Lock()
		sg.size += int64(len(buf))
		sg.sealed = true
		s.active = nil
		s.mu.Unlock()
		return nil, 0, err
	}
	s.mu.Lock()
	sg.size += int64(len(buf))
	sg.dirty = true
	s.mu.Unlock()
	return sg, uint64(off), nil
}

var errSegmentsDisabled = errors.New("segments disabled")

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
	if s.fsync {
		// The new name must survive a crash before anything in it is
		// acknowledged (the file's data is synced by syncFiles).
		if err := syncPathFn(s.dir); err != nil {
			f.Close()
			os.Remove(f.Name())
			return nil, err
		}
		if err := syncPathFn(filepath.Dir(s.dir)); err != nil {
			f.Close()
			os.Remove(f.Name())
			return nil, err
		}
	}
	sg := &segment{id: id, f: f, chunks: make(map[chunkID]segLoc)}
	s.mu.Lock()
	s.segs[id] = sg
	s.active = sg
	s.mu.Unlock()
	return sg, nil
}

// storedLocked is stored, taking s.mu.
func (s *segStore) storedLocked(id chunkID, l segLoc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stored(id, l)
}

// stored records that the writer has written chunk id's pointer to l.
// Writer-owned; s.mu held.
func (s *segStore) stored(id chunkID, l segLoc) {
	sg := s.segs[l.seg]
	sg.refs++
	sg.live += int64(l.n)
	s.where[id] = l
}

// dropping returns where chunk id is stored, if in a segment, and takes it
// out of the writer's view: its deletion is being written. Writer-owned.
func (s *segStore) dropping(id chunkID) (segLoc, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.where[id]
	if !ok {
		return segLoc{}, false
	}
	delete(s.where, id)
	if sg := s.segs[l.seg]; sg != nil {
		sg.live -= int64(l.n)
		delete(sg.chunks, id)
	}
	return l, true
}

// done applies what a transaction of version v did to the segments, once
// it is durable (ok) or has failed (!ok: every reference it added or would
// have dropped stays counted; what it wrote is not moved).
func (s *segStore) done(puts, drops []segRef, v uint64, ok bool) {
	if len(puts) == 0 && len(drops) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range puts {
		if !ok {
			if s.where[r.id] == r.loc {
				// Not confirmed: never moved, and its deletion (if it
				// was written after all) finds nothing to drop.
				delete(s.where, r.id)
				if sg := s.segs[r.loc.seg]; sg != nil {
					sg.live -= int64(r.loc.n)
				}
			}
			continue
		}
		if s.where[r.id] == r.loc {
			s.segs[r.loc.seg].chunks[r.id] = r.loc
		}
	}
	if !ok {
		return
	}
	for _, r := range drops {
		sg := s.segs[r.loc.seg]
		if sg == nil {
			continue
		}
		sg.refs--
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
// segment's last reference does not see it.
func (s *segStore) removeRetired(oldest uint64) {
	s.mu.Lock()
	var gone []*segment
	s.retired = slices.DeleteFunc(s.retired, func(sg *segment) bool {
		if sg.refs != 0 {
			return true // named again? never: a moved chunk goes to the active segment
		}
		if sg.gone > oldest {
			return false
		}
		gone = append(gone, sg)
		delete(s.segs, sg.id)
		return true
	})
	s.mu.Unlock()
	for _, sg := range gone {
		if sg.f != nil {
			sg.f.Close()
		}
		if err := os.Remove(segmentPath(s.dir, sg.id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.log.Warn("h3x: badger queue: cannot remove a segment", "segment", sg.id, "err", err)
		}
	}
}

// relocation is the move of one chunk, planned by the writer.
type relocation struct {
	id       chunkID
	from, to segLoc
}

// planMoves picks up to relocateBudget bytes of chunks to move out of full
// segments that are mostly settled, reads them, and appends them to the
// segment being written. Writer-owned.
func (s *segStore) planMoves() []relocation {
	s.mu.RLock()
	var victims []*segment
	for _, sg := range s.segs {
		if sg.sealed && sg != s.active && len(sg.chunks) > 0 && sg.live*relocateBelow < sg.size {
			victims = append(victims, sg)
		}
	}
	s.mu.RUnlock()
	if len(victims) == 0 {
		return nil
	}
	slices.SortFunc(victims, func(a, b *segment) int { return cmpUint64(a.id, b.id) })
	var moves []relocation
	buf := s.buf[:0]
	for _, sg := range victims {
		s.mu.RLock()
		var ids []segRef
		for id, l := range sg.chunks {
			ids = append(ids, segRef{id, l})
		}
		s.mu.RUnlock()
		slices.SortFunc(ids, func(a, b segRef) int { return cmpUint64(a.loc.off, b.loc.off) })
		for _, r := range ids {
			if len(buf) >= relocateBudget {
				break
			}
			err := s.read(r.loc, func(b []byte) error {
				buf = append(buf, b...)
				return nil
			})
			if err != nil {
				// Not tried again: the chunk and its segment stay.
				s.log.Error("h3x: badger queue: cannot move a chunk out of its segment; it stays", "segment", r.loc.seg, "err", err)
				s.mu.Lock()
				delete(sg.chunks, r.id)
				s.mu.Unlock()
				continue
			}
			moves = append(moves, relocation{id: r.id, from: r.loc, to: segLoc{n: r.loc.n, crc: r.loc.crc}})
		}
		if len(buf) >= relocateBudget {
			break
		}
	}
	s.buf = buf
	if len(moves) == 0 {
		return nil
	}
	to, off, err := s.appendChunks(buf)
	if err != nil {
		s.log.Error("h3x: badger queue: cannot move chunks out of a mostly settled segment", "err", err)
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range moves {
		m := &moves[i]
		m.to.seg, m.to.off = to.id, off
		off += uint64(m.to.n)
		from := s.segs[m.from.seg]
		from.live -= int64(m.from.n)
		delete(from.chunks, m.id)
		s.stored(m.id, m.to)
	}
	return moves
}

func cmpUint64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// dirtyFiles returns the files written since the last sync, and marks them
// clean (markDirty puts them back if the sync fails).
func (s *segStore) dirtyFiles() []*segment {
	s.mu.Lock()
	defer s.mu.Unlock()
	var d []*segment
	for _, sg := range s.segs {
		if sg.dirty && sg.f != nil {
			sg.dirty = false
			d = append(d, sg)
		}
	}
	return d
}

func (s *segStore) markDirty(d []*segment) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sg := range d {
		sg.dirty = true
	}
}

// syncFiles fdatasyncs d, from dirtyFiles; if one fails, all of them are
// synced again next time.
func (s *segStore) syncFiles(d []*segment) error {
	for _, sg := range d {
		if err := fdatasyncFn(sg.f); err != nil {
			s.markDirty(d)
			return fmt.Errorf("segment %d: %w", sg.id, err)
		}
	}
	return nil
}

// close closes the files and, with removeRetired, removes the retired
// segments (nothing reads any more).
func (s *segStore) close(removeRetired bool) {
	if removeRetired {
		s.removeRetired(^uint64(0))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sg := range s.segs {
		if sg.f != nil {
			sg.f.Close()
			sg.f = nil
		}
	}
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
	if len(s.segs) == 0 {
		return nil
	}
	err := q.ts.view(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyEvent}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			if item.ValueSize() > maxSegPtrLen {
				continue // a chunk stored in place
			}
			ns, first, ok := decodeSeqKey(item.Key(), keyEvent)
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
				s.count(chunkID{ns, first}, l)
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
	s.removeUnused()
	return nil
}

// decodeSeqKey splits a key made by appendSeqKey.
func decodeSeqKey(k []byte, kind byte) (ns string, seq uint64, ok bool) {
	if len(k) < 1+1+8 || k[0] != kind {
		return "", 0, false
	}
	n, w := binary.Uvarint(k[1:])
	if w <= 0 || uint64(len(k)-1-w) != n+8 {
		return "", 0, false
	}
	return string(k[1+w : 1+w+int(n)]), binary.BigEndian.Uint64(k[len(k)-8:]), true
}
