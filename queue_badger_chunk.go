package h3x

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/dgraph-io/badger/v4"
)

// Chunks. The Badger queue stores the events that one group commit adds to a
// namespace as one value, a chunk, in a segment file, with a pointer to it
// under the key of the chunk's first event ('e' ns first;
// queue_badger_segment.go), so Badger's per-entry work (write-ahead log
// record, skiplist insert, table entry, compaction) is paid once per group
// and namespace rather than once per event, on a pointer rather than the
// events. Events are acknowledged one by one,
// so a chunk has an ack record ('a' ns first): a bitmap over its sequence
// numbers, rewritten whole by every group commit that acknowledges events of
// the chunk. An event moved to its dead-letter namespace gets a marker of
// its own ('x' ns first seq), written in the same transaction as its copy
// in the dead-letter namespace, so that a move is never half done and no
// other commit records it. Once every event of a chunk is settled and every
// commit that settled one has completed, the chunk, its ack record and its
// markers are deleted: a few tombstones for the whole group instead of one
// per event.
//
// A commit that fails leaves the events it settled unsettled: their bits are
// cleared in memory and the ack record is rewritten from memory. (An ack
// record written by a later commit before the failure was known may carry
// the bit until then: such an ack may or may not take effect, as a failed
// ack may anyway. A move is recorded by nothing but its own marker.)
//
// A chunk value is:
//
//	uvarint n, then n times: uvarint (seq - first), uvarint len, the event (encodeEvent)
//
// with the sequence numbers increasing. The ack record's bit i (byte i/8,
// bit i%8) is set once the event with sequence number first+i has been
// acknowledged.

const (
	keyAcks  = 'a'
	keyMoved = 'x'
)

// maxChunkEvents bounds the events of one chunk, so that an ack record stays
// small: it is rewritten whole by each group commit that settles any event of
// the chunk.
const maxChunkEvents = 1024

// maxChunkBytes bounds the encoded size of a chunk of more than one event,
// and tableBlockSize, Badger's table block size, is twice as large, so that
// a chunk always fits in a fresh block. Badger builds a table in memory
// block by block, and a value larger than what is left of the block grows
// the block's buffer by doubling, keeping every smaller copy in the
// builder's arena until the table is written. With Badger's default 4 KiB
// blocks and chunks of up to 1,024 events, table builders held two to three
// times the bytes of the tables they built: the largest part of the
// publishing process's peak RSS (1.03–1.09 GB for a backlog of a million
// events, against 0.75–0.80 GB with these sizes; TestQueueBadgerRSS).
// Larger blocks cost reads little: the tables are not compressed, so Badger
// uses a block in place in the table's memory map, without copying it.
// (Chunks are in Badger's tables only when a segment cannot be written,
// for dead letters, and in directories of storage format 2; see
// queue_badger_segment.go.)
const (
	maxChunkBytes  = 128 << 10
	tableBlockSize = 2 * maxChunkBytes
)

// qchunk is the state of a stored chunk that an entry in memory refers to.
// ns.chunks holds the chunks of a namespace that entries in memory refer to
// (one object per chunk, so that every settlement of its events sees the
// others); a chunk no entry refers to is read back from disk when needed.
// Guarded by core.mu.
type qchunk struct {
	ns    *qns
	first uint64
	live  int    // events neither acknowledged nor dead-lettered
	acked []byte // the ack record's bitmap (nil: none yet)
	moved []byte // the events moved to the dead-letter namespace, as a bitmap

	kept     bool // in its namespace's chunks
	inflight int  // commits in flight that settle events of the chunk
	deleted  bool // its deletion has been written
}

func bitSet(b []byte, i uint64) bool { return i/8 < uint64(len(b)) && b[i/8]&(1<<(i%8)) != 0 }

func setBit(b []byte, i uint64) []byte {
	if need := int(i/8) + 1; need > len(b) {
		b = append(b, make([]byte, need-len(b))...)
	}
	b[i/8] |= 1 << (i % 8)
	return b
}

// isSettled reports whether the event seq of the chunk is acknowledged or
// dead-lettered.
func (ch *qchunk) isSettled(seq uint64) bool {
	return bitSet(ch.acked, seq-ch.first) || bitSet(ch.moved, seq-ch.first)
}

// settle marks seq acknowledged (moved: dead-lettered) and reports whether
// it was not settled already (only then does the chunk's live count go
// down).
func (ch *qchunk) settle(seq uint64, moved bool) bool {
	if ch.isSettled(seq) {
		return false
	}
	if moved {
		ch.moved = setBit(ch.moved, seq-ch.first)
	} else {
		ch.acked = setBit(ch.acked, seq-ch.first)
	}
	ch.live--
	return true
}

// unsettle reverts settle, for a settlement whose commit failed.
func (ch *qchunk) unsettle(seq uint64) {
	if !ch.isSettled(seq) {
		return
	}
	i := seq - ch.first
	if bitSet(ch.acked, i) {
		ch.acked[i/8] &^= 1 << (i % 8)
	}
	if bitSet(ch.moved, i) {
		ch.moved[i/8] &^= 1 << (i % 8)
	}
	ch.live++
}

// movedSeqs returns the sequence numbers of the chunk's dead-lettered
// events (whose markers go with the chunk).
func (ch *qchunk) movedSeqs() []uint64 {
	var out []uint64
	for i, b := range ch.moved {
		for j := range 8 {
			if b&(1<<j) != 0 {
				out = append(out, ch.first+uint64(i*8+j))
			}
		}
	}
	return out
}

// movedKey appends the marker key of the dead-lettered event seq of chunk
// first of ns.
func movedKey(b []byte, ns string, first, seq uint64) []byte {
	b = appendSeqKey(b, keyMoved, ns, first)
	return binary.BigEndian.AppendUint64(b, seq)
}

// decodeMovedKey decodes a movedKey.
func decodeMovedKey(k []byte) (ns string, first, seq uint64, ok bool) {
	d := decoder{b: k}
	if d.byte() != keyMoved {
		return "", 0, 0, false
	}
	name := d.bytes()
	if d.bad || len(d.b) != 16 || len(k) != 1+uvarintLen(uint64(len(name)))+len(name)+16 {
		return "", 0, 0, false // the length in more bytes than it needs: not a key movedKey makes
	}
	return string(name), binary.BigEndian.Uint64(d.b), binary.BigEndian.Uint64(d.b[8:]), true
}

// keepChunk makes ch the namespace's state of its chunk, for as long as
// entries in memory refer to it.
func (ns *qns) keepChunk(ch *qchunk) {
	if ch == nil || ch.kept {
		return
	}
	if ns.chunks == nil {
		ns.chunks = make(map[uint64]*qchunk)
	}
	ns.chunks[ch.first] = ch
	ch.kept = true
	delete(ns.movedOut, ch.first) // now in ch.moved
}

// dropChunk forgets ch (its events are all settled).
func (ns *qns) dropChunk(ch *qchunk) {
	if ch.kept {
		delete(ns.chunks, ch.first)
		ch.kept = false
	}
}

// chunkEntrySize bounds the encoded size of a chunk entry holding val.
func chunkEntrySize(val []byte) int {
	return 2*binary.MaxVarintLen32 + len(val)
}

// encodeChunk appends the chunk of the events with sequence numbers seqs
// (increasing, seqs[0] first) and encoded values vals.
func encodeChunk(b []byte, seqs []uint64, vals [][]byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(seqs)))
	for i, seq := range seqs {
		b = binary.AppendUvarint(b, seq-seqs[0])
		b = binary.AppendUvarint(b, uint64(len(vals[i])))
		b = append(b, vals[i]...)
	}
	return b
}

// chunkReader iterates over a chunk's events.
type chunkReader struct {
	d     decoder
	first uint64
	n     uint64 // events left
	prev  uint64
	began bool
}

// readChunk starts reading the chunk stored under first. It checks the
// header only; next reports what is wrong with the rest.
func readChunk(b []byte, first uint64) (chunkReader, error) {
	r := chunkReader{d: decoder{b: b}, first: first}
	r.n = r.d.uvarint()
	// Each event takes at least 2 bytes.
	if r.d.bad || r.n == 0 || r.n > uint64(len(r.d.b))/2 {
		return r, fmt.Errorf("chunk %d: %w", first, errCorrupt)
	}
	return r, nil
}

// count returns the number of events in the chunk, before any next.
func (r *chunkReader) count() int { return int(r.n) }

// next returns the next event's sequence number and encoded value; ok is
// false at the end, err non-nil if the chunk is corrupt.
func (r *chunkReader) next() (seq uint64, val []byte, ok bool, err error) {
	if r.n == 0 {
		if len(r.d.b) != 0 {
			return 0, nil, false, fmt.Errorf("chunk %d: trailing bytes: %w", r.first, errCorrupt)
		}
		return 0, nil, false, nil
	}
	off := r.d.uvarint()
	val = r.d.bytes()
	if r.d.bad || (r.began && off <= r.prev) || (!r.began && off != 0) || off > ^uint64(0)-r.first {
		r.n = 0
		return 0, nil, false, fmt.Errorf("chunk %d: %w", r.first, errCorrupt)
	}
	r.began, r.prev = true, off
	r.n--
	return r.first + off, val, true, nil
}

// chunkSeqs decodes the sequence numbers of a chunk.
func chunkSeqs(b []byte, first uint64) ([]uint64, error) {
	r, err := readChunk(b, first)
	if err != nil {
		return nil, err
	}
	seqs := make([]uint64, 0, r.count())
	for {
		seq, _, ok, err := r.next()
		if err != nil {
			return nil, err
		}
		if !ok {
			return seqs, nil
		}
		seqs = append(seqs, seq)
	}
}

// chunkEvent finds the encoded value of the event seq in a chunk.
func chunkEvent(b []byte, first, seq uint64) ([]byte, error) {
	r, err := readChunk(b, first)
	if err != nil {
		return nil, err
	}
	for {
		s, val, ok, err := r.next()
		if err != nil {
			return nil, err
		}
		if !ok || s > seq {
			return nil, fmt.Errorf("event %d not in chunk %d: %w", seq, first, badger.ErrKeyNotFound)
		}
		if s == seq {
			return val, nil
		}
	}
}

// newStoredChunk makes the state of a chunk of ns read from disk: seqs its
// events, acked its ack record (nil if it has none), moved the sequence
// numbers of its dead-lettered events.
func newStoredChunk(ns *qns, first uint64, seqs []uint64, acked []byte, moved []uint64) *qchunk {
	ch := &qchunk{ns: ns, first: first, live: len(seqs), acked: acked}
	for _, seq := range moved {
		if seq >= first {
			ch.moved = setBit(ch.moved, seq-first)
		}
	}
	for _, seq := range seqs {
		if ch.isSettled(seq) {
			ch.live--
		}
	}
	return ch
}

// loadChunk makes the state of ns's stored chunk first, whose value is v:
// its events (returned), its ack record (read in txn) and the dead-letter
// markers read at open (ns.movedOut).
func loadChunk(txn *badger.Txn, ns *qns, first uint64, v []byte) (*qchunk, []uint64, error) {
	seqs, err := chunkSeqs(v, first)
	if err != nil {
		return nil, nil, err
	}
	acked, err := readChunkAcks(txn, ns.name, first)
	if err != nil {
		return nil, nil, err
	}
	return newStoredChunk(ns, first, seqs, acked, ns.movedOut[first]), seqs, nil
}

// readChunkAcks reads the ack record of chunk first of ns; nil if it has none.
func readChunkAcks(txn *badger.Txn, ns string, first uint64) ([]byte, error) {
	item, err := txn.Get(seqKey(keyAcks, ns, first))
	switch {
	case errors.Is(err, badger.ErrKeyNotFound):
		return nil, nil
	case err != nil:
		return nil, err
	}
	return item.ValueCopy(nil)
}

// readStoredEvent reads the encoded value of e's event from its chunk, in a
// buffer of its own.
func (q *badgerQueue) readStoredEvent(txn *badger.Txn, e *qentry) ([]byte, error) {
	if e.chunk == nil {
		return nil, fmt.Errorf("event %d of %q: no chunk: %w", e.seq, e.ns.name, errCorrupt)
	}
	item, err := txn.Get(seqKey(keyEvent, e.ns.name, e.chunk.first))
	if err != nil {
		return nil, err
	}
	var val []byte
	err = q.withChunk(item, func(v []byte) error {
		ev, err := chunkEvent(v, e.chunk.first, e.seq)
		if err == nil {
			val = append([]byte(nil), ev...)
		}
		return err
	})
	return val, err
}
