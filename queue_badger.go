package h3x

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
	"github.com/dgraph-io/badger/v4/skl"
	"github.com/google/uuid"
)

// OpenBadgerQueue opens (creating it if needed) the durable queue stored in
// the directory dir, with Badger. It is H3X's default queue.
//
// Defaults (the zero QueueOptions): DurabilityFsync, a 2-minute dedup
// window, dead-lettering after 10 attempts, no per-namespace limits, no
// logging. Badger is tuned for embedding: a process holding a backlog of a
// million 256-byte events has about 95–120 MB of RSS, and the one that has
// just published it peaked at about 165 MB (on Linux; see badgerOptions);
// opts.Badger can change any Badger option afterwards.
//
// What survives what:
//
//   - DurabilityFsync: a published or acked event is on stable storage
//     before Enqueue or Ack returns; it survives a process kill, a kernel
//     crash and power loss. Concurrent calls share one commit and one fsync
//     (group commit).
//   - DurabilityNoSync: written to the operating system before the call
//     returns; it survives a process kill (kill -9), not a kernel crash or
//     power loss.
//
// After a restart every published, unacked event is delivered again, in
// publish order; leases do not survive (they end as if released: an event
// whose last delivery was its MaxAttempts-th moves to its dead-letter
// namespace when it would next be leased), and so do nack delays (a delayed
// event is ready at once after a restart). Attempt
// counts and settlements survive: each Lease call stores one record of its
// deliveries and returns once it is written (appended to the queue's lease
// journal, or when that is full, in the next group commit; not synced, so it
// survives a process kill, and with DurabilityFsync a power loss only once a
// later sync has covered it), so after a restart the next
// delivery of an event delivered before continues its attempt count, an
// ack of a delivery made before the restart is stale once the event has
// been delivered again, and a client can still settle a delivery it
// received before the restart (see LeaseRef). The dedup window survives
// too: the IDs of each commit are stored with it, with a time to live.
//
// The backlog is not held in memory: only events delivered since the queue
// was opened (or listed in a lease record) are. Settling an event never
// delivered (whatever the attempt and namespace named) is refused as
// SettleStale if its ID was published within the dedup window,
// SettleUnknown otherwise (the memory queue: SettleStale). For the same
// reason, a settlement of an event acked before a restart, or one naming
// the namespace an event was dead-lettered from, is answered SettleStale
// where the memory queue answers SettleUnknown: the queue keeps no record
// of which IDs have left it. Either answer changes nothing.
//
// Storage: the events one group commit adds to a namespace are stored
// together, as one chunk of up to 1,024 events, appended to a segment file
// in the segments directory under Badger's directory (dir, unless
// opts.Badger moves it); Badger holds where each chunk is, its acks (a
// bitmap per chunk), the counters, the lease records and the dedup
// records. A segment's file is removed once none of its chunks is left;
// the live chunks of a full segment that is mostly settled and no longer
// being consumed are moved out, so the segments hold at most about four
// times the live events' bytes, plus the segment being written (32 MiB). A
// chunk that is not in its segment (after a kernel crash, what was not yet
// synced; or damage) is logged as lost and set aside, never delivered.
// A lease record lists each delivery's namespace, sequence number and
// attempt; the event's ID, size and enqueue time are read from its chunk
// when the queue opens. This is storage format 4: a directory of format 3
// (lease records that also held those three) or of format 2 (chunks in
// Badger, H3X before 2026-11-27) opens and is format 4 from then on, so an
// older version refuses it; one of format 1 (before 2026-11-26) is refused
// with an error saying so; drain it with the version that wrote it.
//
// With DurabilityFsync, a failed sync is final for this run: the group gets
// the error, and every later durable write fails with it until the queue is
// reopened (after a writeback error Linux reports the error once and marks
// the pages clean, so a later sync that succeeds proves nothing; reopening
// replays the log and rewrites what it holds).
//
// Only one process can open dir at a time; a second gets an error saying
// so, which matches ErrQueueInUse (errors.Is). When the disk is nearly
// full (less free space than Badger needs for its own flushes and
// compactions), Enqueue fails with an *Error of CodeInternal ("disk full"),
// retryable, and nothing already acknowledged is affected.
func OpenBadgerQueue(dir string, opts QueueOptions) (Queue, error) {
	opts = normalizeQueueOptions(opts)
	bo := badgerOptions(dir, opts)
	if opts.Badger != nil {
		opts.Badger(&bo)
	}
	// Whatever the escape hatch set, every value stays in the LSM tree
	// (see inlineThreshold).
	bo.ValueThreshold = inlineThreshold(bo.MemTableSize)
	db, err := badger.OpenManaged(bo) // versions given by the queue: queue_badger_ts.go
	if err != nil {
		if isLockError(err) {
			return nil, fmt.Errorf("%w: open badger queue in %s: %w", ErrQueueInUse, dir, err)
		}
		if isDiskFull(err) {
			return nil, diskFullError("open badger queue", err)
		}
		return nil, fmt.Errorf("h3x: open badger queue in %s: %w", dir, err)
	}
	q := &badgerQueue{
		encodeRec:     encodeLeaseRec,
		db:            db,
		ts:            newTSClock(db),
		dir:           dir,
		log:           opts.Logger,
		window:        opts.DedupWindow,
		fsync:         opts.Durability == DurabilityFsync && !bo.SyncWrites,
		bdir:          bo.Dir,
		vdir:          bo.ValueDir,
		counters:      make(map[string]*nsCounter),
		wsignal:       make(chan struct{}, 1),
		inflight:      make(chan *group, pipelineDepth),
		completerDone: make(chan struct{}),
		gcStop:        make(chan struct{}),
		gcDone:        make(chan struct{}),
		trimStop:      make(chan struct{}),
		trimDone:      make(chan struct{}),
		reserve:       uint64(2*bo.ValueLogFileSize + 4*bo.MemTableSize + 32<<20),
	}
	maxBatchSize := 15 * bo.MemTableSize / 100 // as Badger computes its limits
	q.txnMaxBytes = maxBatchSize / 3
	q.txnMaxWrites = min(maxTxnWrites, max(int(maxBatchSize/int64(skl.MaxNodeSize))/3, 1))
	q.maxValue = int(bo.ValueThreshold) - deadLetterReserve
	// A chunk stored in Badger goes in one transaction with its dedup
	// record (every ID again), neither of which can be split: with a small
	// MemTableSize, 16 KiB of them could exceed Badger's batch limit.
	if q.fsync {
		q.inlineBelow = min(fsyncInlineBytes, int(q.txnMaxBytes))
	}
	q.core = newQueueCore(opts, (*badgerStore)(q), false)
	// The segments go with Badger's own files, in the directory Badger
	// locks.
	q.segs = newSegStore(bo.Dir, opts.Logger, opts.Durability == DurabilityFsync,
		opts.Durability == DurabilityFsync && bo.SyncWrites, func(err error) { q.noteSyncFailure(err) })
	if bo.InMemory {
		q.segs.disabled.Store(true) // no files: chunks stay in Badger's memory
	}
	q.core.recMaxBytes = int(bo.ValueThreshold) / 2
	q.freeSpace = newFreeSpaceReader(diskFree, 2*q.reserve, time.Now)
	df := q.freeSpace.read
	q.diskFree.Store(&df)
	if mem, err := logFiles(q.bdir, ".mem"); err == nil && len(mem) > 0 {
		q.memFid = mem[len(mem)-1]
	}
	if vlog, err := logFiles(q.vdir, ".vlog"); err == nil && len(vlog) > 0 {
		q.vlogFid = vlog[len(vlog)-1]
	}
	if err := q.segs.open(); err != nil {
		db.Close()
		return nil, err
	}
	var journaled []journalRec // what the lease journal held, for load
	if !bo.InMemory {
		q.journal, journaled, err = openLeaseJournal(q, bo.Dir)
		if err != nil {
			q.segs.close(false)
			db.Close()
			return nil, err
		}
	}
	err = q.load(journaled)
	if err == nil {
		err = q.countSegments()
	}
	if err != nil {
		q.journal.close(false)
		q.segs.close(false)
		db.Close()
		return nil, err
	}
	q.startBallast(bo.ValueLogFileSize)
	go q.writer()
	go q.completer()
	go q.gcLoop(valueLogGCInterval)
	q.tdir = tableDir(q.bdir)
	go q.trimLoop(trimInterval)
	return q, nil
}

func (q *badgerQueue) announcedLimits() (int, time.Duration) { return q.core.announcedLimits() }

var _ Queue = (*badgerQueue)(nil)

// badgerOptions are H3X's Badger defaults: small caches and tables, no
// compression (event payloads are mostly incompressible or already
// compressed by their producers). The events' chunks are in segment files
// (queue_badger_segment.go); the values Badger holds (chunk pointers, ack
// records, lease records, and chunks only for dead letters, for small groups
// with DurabilityFsync (fsyncInlineBytes) or when a segment cannot be
// written) stay in the LSM tree, never in the value log (see
// inlineThreshold), so the value-log files are the minimum size, and the
// table blocks fit a chunk (see maxChunkBytes). Measured with a backlog of
// a million 256-byte events (H3X_RSS=1 go test -run TestQueueBadgerRSS,
// 2026-11-27, the fifteenth session): the process that publishes it at
// full speed peaks at 138 MB of RSS (VmHWM) and holds 76–105 MB once idle;
// one that opens it holds 95 MB, 98 MB after leasing and acking 10,000 of
// it; one that opens it after a kill -9 (and so reads all of it once, see
// load) peaks at 120 MB and holds 62–118 MB. The peak is the Go heap
// (54 MB once publishing is done: the memtable's arena, about 31 MB, and
// the dedup index, about 20 MB) with the collector's headroom. (Before
// the segments, when the chunks went through Badger's memtables, flushes
// and compactions, the publishing process peaked at 0.82–0.86 GB:
// Badger's table builders.) Badger
// memory-maps its table files, so the pages a process has written or read
// count in its RSS as file-backed memory; the trimmer
// (queue_badger_trim.go) gives them back while the queue reads none. The
// segments are read with pread, through the page cache, which is not the
// process's RSS.
func badgerOptions(dir string, opts QueueOptions) badger.Options {
	bo := badger.DefaultOptions(dir)
	bo.Logger = badgerLogger{opts.Logger}
	bo.SyncWrites = false // DurabilityFsync syncs once per run of commits (see syncFiles)
	// The memtable's arena (MemTableSize and the largest batch, 31 MB) is
	// allocated whole, half a publishing process's heap. 32 MiB peaked 12
	// MB higher with a million-event backlog (above issue 3's 150 MB) and
	// 58 MiB higher in the side-by-side server run at 600,000 events, where
	// it published 8% faster with a lower p99 around flushes (BENCHMARKS.md,
	// the fifteenth session's run): a memory default, which
	// QueueOptions.Badger can change. 16 MiB peaked higher (more flushes
	// and tables).
	bo.MemTableSize = 24 << 20
	bo.NumMemtables = 2
	bo.BlockCacheSize = 16 << 20
	bo.IndexCacheSize = 8 << 20
	bo.ValueLogFileSize = 1 << 20 // the value log stays empty (see inlineThreshold); Badger's minimum
	bo.BaseTableSize = 2 << 20
	bo.BlockSize = tableBlockSize // a chunk fits in a block (see maxChunkBytes)
	bo.NumCompactors = 2
	bo.ValueThreshold = inlineThreshold(bo.MemTableSize)
	bo.MetricsEnabled = false
	bo.DetectConflicts = false    // one writer goroutine does every write
	bo.Compression = options.None // saves CPU and table-builder memory
	return bo
}

// inlineThreshold is the ValueThreshold that keeps every value the queue
// writes in Badger's LSM tree: the largest Badger accepts for memTableSize
// (1 MiB, or 15% of the memtable if less). Values at or above the threshold
// would go to the value log, and Badger v4.9.6's value-log GC can bring
// deleted keys back: it rewrites a value whose exact version is still in the
// tree without seeing a newer tombstone, and a later compaction that drops
// the tombstone at the bottom level leaves the rewritten copy visible (an
// acked event delivered again, with the namespace's counts off; the
// first session's quarantined TestBadgerQueueValueLogGC failure, upstream
// dgraph-io/badger#2286, fixed there only while the rewrite runs). So the
// queue refuses events whose value would not fit (maxValue) and splits
// lease records below the threshold, and the value log stays empty.
func inlineThreshold(memTableSize int64) int64 {
	return min(1<<20, 15*memTableSize/100)
}

// deadLetterReserve is the room kept below the value threshold for the
// metadata an event gains when it is dead-lettered (nack reasons are
// truncated to maxNackReason bytes).
const deadLetterReserve = 2 << 10

// valueLogGCInterval is how often the value log is garbage-collected.
var valueLogGCInterval = time.Minute

// badgerLogger sends Badger's logs to a *slog.Logger: errors and warnings at
// their level, Badger's (chatty) INFO and DEBUG lines at Debug.
type badgerLogger struct{ l *slog.Logger }

func (b badgerLogger) logf(level slog.Level, format string, args []any) {
	if !b.l.Enabled(context.Background(), level) {
		return
	}
	b.l.Log(context.Background(), level, strings.TrimSpace(fmt.Sprintf(format, args...)), "component", "badger")
}

func (b badgerLogger) Errorf(f string, a ...any)   { b.logf(slog.LevelError, f, a) }
func (b badgerLogger) Warningf(f string, a ...any) { b.logf(slog.LevelWarn, f, a) }
func (b badgerLogger) Infof(f string, a ...any)    { b.logf(slog.LevelDebug, f, a) }
func (b badgerLogger) Debugf(f string, a ...any)   { b.logf(slog.LevelDebug, f, a) }

// badgerQueue is the Badger-backed Queue. The state machine (core) is shared
// with the memory queue; this file is its storage.
//
// Keys:
//
//	'e' ns seq   a chunk: the events of ns that one commit adds, from seq on
//	             (queue_badger_chunk.go; each event encoded by encodeEvent), or
//	             a pointer to where it is in a segment file (queue_badger_segment.go)
//	'a' ns seq   the chunk's ack record: a bitmap of its acknowledged events
//	'x' ns seq s the marker of the chunk's event s, moved to the dead-letter namespace
//	'c' ns       the namespace's event count and bytes (written with every change)
//	'g' seq ...  the IDs of one commit, in the key, for dedup after a restart (TTL)
//	'l' seq      a lease record: the deliveries of one Lease call (ID, attempt,
//	             where the event is), deleted once none is the latest of its event
//	'm' "hwm"    the highest sequence number ever assigned
//	'm' "format" the storage format version
//
// ns is length-prefixed; seq is a big-endian uint64 from one sequence over
// all namespaces, so keys of a namespace sort in publish order. Every write
// goes through one writer goroutine (group commit): it takes every request
// waiting, writes them in one transaction (split only if Badger finds it too
// big), with the sequence high-water mark and the counters of the touched
// namespaces, commits (one fsync with DurabilityFsync), and only then
// answers the callers and makes the events deliverable.
//
// Delivery never scans: each namespace remembers where its fresh (never
// delivered) events start on disk (diskNext, in the chunk at diskChunk) and
// reads ahead from there, so the tombstones of settled chunks, all below
// that cursor, are never walked.
type badgerQueue struct {
	core   *queueCore
	db     *badger.DB
	segs   *segStore // the files of the enqueued chunks (queue_badger_segment.go)
	ts     *tsClock  // the versions of its commits and reads (managed mode)
	dir    string
	log    *slog.Logger
	window time.Duration
	fsync  bool
	// encodeRec encodes the lease records the writer stores:
	// encodeLeaseRec (tests set it, before any lease, to store records as
	// formats 2 and 3 did).
	encodeRec func([]recEntry) []byte
	// inlineBelow is the size under which a group's new chunks are
	// stored in Badger rather than in a segment: fsyncInlineBytes (or
	// less, with a small MemTableSize) with fsync, 0 without.
	inlineBelow int

	// counters are the namespaces' counts as the writer has written them.
	// Writer-owned (and load, before the writer starts).
	counters map[string]*nsCounter

	wmu     sync.Mutex
	wops    []*wop
	wstop   bool
	wsignal chan struct{}
	// Corrections left by failed commits (and by groups refused for disk
	// space), guarded by wmu: they ride on the next group the writer
	// builds, rather than waking it (a failing disk would make them spin).
	pendingCounters map[string]nsCounter
	pendingChunks   []*qchunk
	// pendingRecs are lease records whose write failed or was refused:
	// written again with the next group (or at Close) while they still
	// list an event's latest delivery.
	pendingRecs    []recPut
	pendingRecDels []uint64 // lease records to delete whose deletion failed

	inflight      chan *group // writer -> completer
	completerDone chan struct{}
	// wbusy (guarded by wmu): the writer is writing a round, from taking
	// its ops to handing its last group on; groupsOut counts the groups
	// handed to the completer and not yet completed. Both say whether the
	// writer is idle (journalIdle).
	wbusy     bool
	groupsOut atomic.Int32

	// journal keeps Lease calls' records until Badger has them
	// (queue_badger_journal.go); nil for an in-memory Badger.
	journal *leaseJournal

	// Guarded by core.mu: groups accepted, and the IDs of failed commits
	// that groups up to failCheckUntil may have answered as duplicates.
	groups         uint64
	failedIDs      map[string]error
	failCheckUntil uint64

	gcStop chan struct{}
	gcDone chan struct{}
	// trimStop and trimDone stop and wait for trimLoop
	// (queue_badger_trim.go).
	trimStop, trimDone chan struct{}
	// tableReads counts reads of stored events (read-ahead refills and
	// redeliveries): the trimmer leaves the maps alone while they grow.
	tableReads atomic.Int64
	// enqueued counts the events handed to the writer: the trimmer leaves
	// the maps alone while many are written (Badger flushes and compacts,
	// reading the new tables again).
	enqueued atomic.Int64

	reserve   uint64
	freeSpace *freeSpaceReader                                 // diskFree's readings, shared by the writer's rounds
	diskFree  atomic.Pointer[func(dir string) (uint64, error)] // freeSpace.read, or a test's hook
	// failCommit, a test hook, fails the transactions it returns true for.
	failCommit atomic.Pointer[func(writes []bwrite) bool]
	ballast    *ballast // queue_badger_ballast.go; nil without free-space figures

	// The transaction builder's reusable slices (writer-owned).
	bcur    []bwrite
	bstarts []int

	// Transaction bounds (a third of Badger's), and the largest encoded
	// event Enqueue accepts (below Badger's ValueThreshold).
	txnMaxWrites int
	txnMaxBytes  int64
	maxValue     int

	// syncMu serializes syncs and value-log GC; the rest is its.
	syncMu          sync.Mutex
	bdir, vdir      string   // Badger's Dir and ValueDir
	tdir            string   // bdir as /proc/self/maps names it (tableDir)
	memFid, vlogFid int      // the newest memtable and value-log files at the last sync
	walFile         *os.File // memFid's file, open for syncActiveWAL
	walFid          int

	closeOnce sync.Once
	closeErr  error

	// commitFailed is set once a commit of this run has failed: Close then
	// leaves the directory unmarked (see markClean).
	commitFailed atomic.Bool
	// syncBroken holds the first sync error: after it, nothing is
	// acknowledged as durable until the queue is reopened (Linux reports a
	// writeback error once and marks the pages clean).
	syncBroken atomic.Pointer[error]
	// closing is set by Close before its last group (writer-owned by then).
	closing bool

	statGroups, statOps, statTxns atomic.Int64 // group commits, the requests and transactions in them
	statSyncs                     atomic.Int64 // fsync rounds (DurabilityFsync)
	statJournaled                 atomic.Int64 // Lease calls whose records went to the journal
}

type nsCounter struct {
	count int64
	bytes int64
}

// wop is one request to the writer: an enqueue batch or the effects of a
// state change.
type wop struct {
	// enqueue
	evs   []Event
	sizes []int
	vals  [][]byte
	enq   int64
	res   []PublishResult
	ents  []*qentry

	// settle
	fx *effects

	durable bool // someone waits for it to be durable: sync before answering

	w      *writeWait
	failed error
	// written, if not nil, is closed once the group holding the op has
	// been written (or refused), before any sync: a lease record is then
	// in Badger's write-ahead log, which a killed process leaves behind.
	written chan struct{}
}

// --- keys and values -----------------------------------------------------------

const (
	keyEvent    = 'e'
	keyCounter  = 'c'
	keyGroup    = 'g'
	keyLeaseRec = 'l'
	keyMeta     = 'm'

	// storageFormat is the version of the layout; 5 keeps Lease calls'
	// records in a journal until Badger has them (queue_badger_journal.go:
	// an older version would not read it), 4 stores compact lease records
	// (encodeLeaseRec), 3 stored chunks in segment files
	// (queue_badger_segment.go) as 4 and 5 do, 2 stored them in Badger
	// (queue_badger_chunk.go); 2 to 4 are opened, and written as 5 from
	// then on; 1 stored one key per event.
	storageFormat = 5
	// eventFormat is the first byte of an encoded event.
	eventFormat = 1
)

var (
	metaHWM    = []byte{keyMeta, 'h', 'w', 'm'}
	metaFormat = []byte{keyMeta, 'f', 'o', 'r', 'm', 'a', 't'}
	// metaClean, written by Close as its last write (see markClean), says
	// the stored counters are exact; it holds the sequence high-water mark
	// at Close. Open deletes it, and recounts every namespace from its
	// chunks when it is missing or does not match (see load).
	metaClean = []byte{keyMeta, 'c', 'l', 'e', 'a', 'n'}
)

func nsPrefix(kind byte, ns string) []byte {
	b := make([]byte, 0, 1+binary.MaxVarintLen64+len(ns)+8)
	b = append(b, kind)
	b = binary.AppendUvarint(b, uint64(len(ns)))
	return append(b, ns...)
}

func appendSeqKey(b []byte, kind byte, ns string, seq uint64) []byte {
	b = append(b, kind)
	b = binary.AppendUvarint(b, uint64(len(ns)))
	b = append(b, ns...)
	return binary.BigEndian.AppendUint64(b, seq)
}

func seqKey(kind byte, ns string, seq uint64) []byte {
	return appendSeqKey(make([]byte, 0, 1+binary.MaxVarintLen64+len(ns)+8), kind, ns, seq)
}

func keySeq(k []byte) uint64 { return binary.BigEndian.Uint64(k[len(k)-8:]) }

func counterKey(ns string) []byte { return append([]byte{keyCounter}, ns...) }

// encodeCounter encodes a namespace's counters (negative ones as zero).
func encodeCounter(c nsCounter) []byte {
	v := binary.AppendUvarint(nil, uint64(max(c.count, 0)))
	return binary.AppendUvarint(v, uint64(max(c.bytes, 0)))
}

func leaseRecKey(seq uint64) []byte { return binary.BigEndian.AppendUint64([]byte{keyLeaseRec}, seq) }

// A lease record lists the deliveries of one Lease call, so that a
// reopened queue knows which events were out and at which attempt. Since
// storage format 4 it holds, for each run of deliveries from one
// namespace, the namespace and each delivery's sequence number and attempt,
// about 3 bytes a delivery: the event's ID, size and enqueue time are read
// back from its chunk when the queue opens (loadLeaseRecs). Formats 2 and 3
// also stored those three, about 58 bytes a delivery, which made lease
// records most of what consuming wrote to Badger (and so most of its
// memtable flushes); their records still decode.
//
// Compact record: 0x00, leaseRecCompact, then runs until the end, each
// the namespace (uvarint length and bytes), the number of deliveries
// (uvarint) and, for each, its sequence number as a zigzag varint of the
// difference from the previous one in the run (the first from 0), and
// its attempt (uvarint). A record in the older layout starts with its
// number of deliveries, so only an empty one starts with 0x00, and it has
// nothing after it.
const leaseRecCompact = 1

// leaseRecBound bounds what a delivery of namespace ns adds to a lease
// record: a run of its own at worst (its namespace and count), its
// sequence number's delta and its attempt. The record's two leading bytes
// come on top.
func leaseRecBound(ns string) int {
	return len(ns) + 2*binary.MaxVarintLen32 + binary.MaxVarintLen64 + binary.MaxVarintLen32
}

// encodeLeaseRec encodes a lease record of entries (their ns, seq and
// attempt; see above).
func encodeLeaseRec(entries []recEntry) []byte {
	n := 2
	for _, r := range entries {
		n += leaseRecBound(r.ns)
	}
	b := make([]byte, 0, n)
	b = append(b, 0, leaseRecCompact)
	for i := 0; i < len(entries); {
		run := 1
		for i+run < len(entries) && entries[i+run].ns == entries[i].ns {
			run++
		}
		b = appendString(b, entries[i].ns)
		b = binary.AppendUvarint(b, uint64(run))
		var prev uint64
		for _, r := range entries[i : i+run] {
			b = binary.AppendVarint(b, int64(r.seq-prev))
			b = binary.AppendUvarint(b, uint64(r.attempt))
			prev = r.seq
		}
		i += run
	}
	return b
}

// decodeLeaseRec decodes a lease record of either layout. The entries of a
// compact record have no id, size or enq (their chunks do).
func decodeLeaseRec(b []byte) ([]recEntry, error) {
	if len(b) > 1 && b[0] == 0 {
		return decodeCompactLeaseRec(b)
	}
	d := decoder{b: b}
	n := d.uvarint()
	if d.bad || n > uint64(len(b)) {
		return nil, errCorrupt
	}
	out := make([]recEntry, 0, n)
	for range n {
		var r recEntry
		r.ns = strings.Clone(d.string())
		r.seq = d.uvarint()
		r.id = strings.Clone(d.string())
		r.size = int(d.uvarint())
		r.enq = int64(d.uvarint())
		attempt := d.uvarint()
		if d.bad || attempt > math.MaxInt32 {
			return nil, errCorrupt
		}
		r.attempt = int(attempt)
		out = append(out, r)
	}
	return out, nil
}

func decodeCompactLeaseRec(b []byte) ([]recEntry, error) {
	if b[1] != leaseRecCompact {
		return nil, errCorrupt
	}
	d := decoder{b: b[2:]}
	var out []recEntry
	for len(d.b) > 0 {
		ns := strings.Clone(d.string())
		n := d.uvarint()
		if d.bad || n > uint64(len(d.b)) { // each delivery takes at least 2 bytes
			return nil, errCorrupt
		}
		var prev uint64
		for range n {
			seq := prev + uint64(d.varint())
			attempt := d.uvarint()
			if d.bad || attempt > math.MaxInt32 {
				return nil, errCorrupt
			}
			out = append(out, recEntry{ns: ns, seq: seq, attempt: int(attempt)})
			prev = seq
		}
	}
	return out, nil
}

// encodeEvent encodes ev (all but its namespace, which is in the key) with
// its enqueue time.
func encodeEvent(b []byte, ev *Event, enq int64) []byte {
	b = append(b, eventFormat)
	b = binary.AppendUvarint(b, uint64(enq))
	b = binary.AppendVarint(b, ev.Time.Unix())
	b = binary.AppendUvarint(b, uint64(ev.Time.Nanosecond()))
	b = appendString(b, ev.ID)
	b = appendString(b, ev.Type)
	b = appendString(b, ev.Message)
	b = binary.AppendUvarint(b, uint64(len(ev.Data)))
	b = append(b, ev.Data...)
	b = binary.AppendUvarint(b, uint64(len(ev.Metadata)))
	for k, v := range ev.Metadata {
		b = appendString(b, k)
		b = appendString(b, v)
	}
	return b
}

func encodedLen(ev *Event) int {
	n := 1 + 4*binary.MaxVarintLen64 + len(ev.ID) + len(ev.Type) + len(ev.Message) + len(ev.Data) + 4*binary.MaxVarintLen32
	for k, v := range ev.Metadata {
		n += len(k) + len(v) + 2*binary.MaxVarintLen32
	}
	return n
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

var errCorrupt = errors.New("corrupt event record")

// storedSize returns Event.size() of the event encoded in b, stored in
// namespace ns, without decoding it (no allocation; for counting).
func storedSize(b []byte, ns string) (int, error) {
	d := decoder{b: b}
	if d.byte() != eventFormat {
		return 0, errCorrupt
	}
	d.uvarint() // enqueued
	d.varint()  // time
	if d.uvarint() >= 1e9 {
		return 0, errCorrupt
	}
	n := len(ns) + 8
	for range 4 { // ID, Type, Message, Data
		n += len(d.bytes())
	}
	for range d.uvarint() {
		if d.bad {
			break
		}
		n += len(d.bytes()) + len(d.bytes())
	}
	if d.bad {
		return 0, errCorrupt
	}
	return n, nil
}

// decodeEvent decodes a value written by encodeEvent. The event's strings and
// Data share b, which the caller must not change or reuse afterwards.
func decodeEvent(b []byte) (ev Event, enq int64, err error) {
	d := decoder{b: b}
	if d.byte() != eventFormat {
		return ev, 0, errCorrupt
	}
	enq = int64(d.uvarint())
	sec := d.varint()
	nsec := d.uvarint()
	ev.ID = d.string()
	ev.Type = d.string()
	ev.Message = d.string()
	ev.Data = d.bytes()
	if n := d.uvarint(); n > 0 && !d.bad {
		if n > uint64(len(d.b)) {
			return ev, 0, errCorrupt
		}
		ev.Metadata = make(map[string]string, n)
		for range n {
			k := d.string()
			ev.Metadata[k] = d.string()
		}
	}
	if d.bad || nsec >= 1e9 {
		return Event{}, 0, errCorrupt
	}
	ev.Time = time.Unix(sec, int64(nsec)).UTC()
	return ev, enq, nil
}

type decoder struct {
	b   []byte
	bad bool
}

func (d *decoder) byte() byte {
	if len(d.b) == 0 {
		d.bad = true
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.bad = true
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint() int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.bad = true
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) bytes() []byte {
	n := d.uvarint()
	if d.bad || n > uint64(len(d.b)) {
		d.bad = true
		return nil
	}
	s := d.b[:n:n]
	d.b = d.b[n:]
	if n == 0 {
		return nil
	}
	return s
}

func (d *decoder) string() string {
	s := d.bytes()
	if len(s) == 0 {
		return ""
	}
	return unsafe.String(&s[0], len(s))
}

// --- open ------------------------------------------------------------------------

// load reads the queue's state from disk: the sequence, the namespaces'
// counts and where their events start, and the recent IDs for dedup.
func (q *badgerQueue) load(journaled []journalRec) error {
	c := q.core
	var swept []*qchunk
	var repaired []string // namespaces whose stored counters are rewritten
	err := q.ts.update(func(txn *badger.Txn) error {
		switch item, err := txn.Get(metaFormat); {
		case errors.Is(err, badger.ErrKeyNotFound):
			if err := txn.Set(metaFormat, []byte{storageFormat}); err != nil {
				return fmt.Errorf("h3x: badger queue: initialize: %w", err)
			}
		case err != nil:
			return fmt.Errorf("h3x: badger queue: read format: %w", err)
		default:
			v, err := item.ValueCopy(nil)
			if err != nil {
				return fmt.Errorf("h3x: badger queue: read format: %w", err)
			}
			if len(v) == 1 && v[0] == 1 {
				return fmt.Errorf("h3x: badger queue in %s: storage format 1 (one key per event, H3X before chunked storage) cannot be opened by this version, which writes format %d; drain the queue with the older version first", q.dir, storageFormat)
			}
			if len(v) != 1 || v[0] < 2 || v[0] > storageFormat {
				return fmt.Errorf("h3x: badger queue in %s: unknown storage format %v (this version writes %d)", q.dir, v, storageFormat)
			}
			if v[0] != storageFormat {
				// Format 2 holds chunks in place and 3 lease records in
				// the older layout, which format 5 reads too; older
				// versions must not open what follows (compact records,
				// the lease journal).
				if err := txn.Set(metaFormat, []byte{storageFormat}); err != nil {
					return fmt.Errorf("h3x: badger queue: upgrade format: %w", err)
				}
			}
		}
		var hwm uint64
		switch item, err := txn.Get(metaHWM); {
		case errors.Is(err, badger.ErrKeyNotFound):
		case err != nil:
			return fmt.Errorf("h3x: badger queue: read sequence: %w", err)
		default:
			v, err := item.ValueCopy(nil)
			if err != nil || len(v) != 8 {
				return fmt.Errorf("h3x: badger queue: read sequence: %w", errors.Join(err, errCorrupt))
			}
			hwm = binary.BigEndian.Uint64(v)
		}
		c.nextSeq = hwm + 1
		c.applied = hwm

		// The clean mark holds the sequence high-water mark at Close: a
		// mark that does not match was left by a run that did not delete
		// it (an older H3X) and is not trusted.
		clean := false
		switch item, err := txn.Get(metaClean); {
		case err == nil:
			v, err := item.ValueCopy(nil)
			if err != nil {
				return fmt.Errorf("h3x: badger queue: open: %w", err)
			}
			clean = len(v) == 8 && binary.BigEndian.Uint64(v) == hwm
			if err := txn.Delete(metaClean); err != nil {
				return fmt.Errorf("h3x: badger queue: open: %w", err)
			}
		case !errors.Is(err, badger.ErrKeyNotFound):
			return fmt.Errorf("h3x: badger queue: open: %w", err)
		}

		// Namespaces and their counts; where each one's events start.
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyCounter}})
		for it.Rewind(); it.Valid(); it.Next() {
			name := string(it.Item().Key()[1:])
			v, err := it.Item().ValueCopy(nil)
			if err != nil {
				it.Close()
				return fmt.Errorf("h3x: badger queue: read counters: %w", err)
			}
			d := decoder{b: v}
			cnt := &nsCounter{count: int64(d.uvarint()), bytes: int64(d.uvarint())}
			if d.bad {
				it.Close()
				return fmt.Errorf("h3x: badger queue: counters of %q: %w", name, errCorrupt)
			}
			q.counters[name] = cnt
			ns := c.ns(name)
			ns.known = cnt.count > 0
			ns.count = int(cnt.count)
			ns.bytes = cnt.bytes
			ns.freshDisk = int(cnt.count)
			ns.diskNext = hwm + 1
			ns.diskChunk = hwm + 1
		}
		it.Close()
		for name, ns := range c.nss {
			if ns.freshDisk == 0 {
				continue
			}
			// The one walk over a namespace's tombstones: from its start
			// to its first event, once per open.
			it := txn.NewIterator(badger.IteratorOptions{Prefix: nsPrefix(keyEvent, name)})
			it.Rewind()
			if it.Valid() {
				ns.diskNext = keySeq(it.Item().Key())
				ns.diskChunk = ns.diskNext
			} else {
				ns.freshDisk = 0
			}
			it.Close()
		}

		// Dead-lettered events of the stored chunks (few: markers go with
		// their chunk).
		mit := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyMoved}})
		for mit.Rewind(); mit.Valid(); mit.Next() {
			name, first, seq, ok := decodeMovedKey(mit.Item().Key())
			ns := c.nss[name]
			if !ok || ns == nil {
				continue
			}
			if ns.movedOut == nil {
				ns.movedOut = make(map[uint64][]uint64)
			}
			ns.movedOut[first] = append(ns.movedOut[first], seq)
		}
		mit.Close()

		// After a crash, or a Close whose corrections of the counters
		// failed, a stored count may be off by the changes of commits that
		// failed (Enqueue counts its events before they are written):
		// every namespace is recounted from its chunks. Otherwise only a
		// namespace counted empty is swept: a chunk still stored there
		// lost its deletion (a failed commit, or a Close before it was
		// written). Settled chunks are deleted after the lease records are
		// read (they read this transaction's snapshot, the chunks and
		// markers included).
		if !clean && len(c.nss) > 0 {
			q.log.Info("h3x: badger queue: recounting the stored events (the last run did not close cleanly)", "namespaces", len(c.nss))
		}
		for _, ns := range c.nss {
			if clean && ns.count != 0 {
				continue
			}
			cnt := q.counters[ns.name]
			if cnt == nil {
				cnt = &nsCounter{}
				q.counters[ns.name] = cnt
			}
			stored := *cnt
			count, bytes, freshDisk, diskNext, diskChunk := ns.count, ns.bytes, ns.freshDisk, ns.diskNext, ns.diskChunk
			ns.count, ns.bytes, ns.freshDisk = 0, 0, 0
			ns.diskNext, ns.diskChunk = hwm+1, hwm+1
			dead, err := q.sweepSettled(txn, ns, !clean)
			if err != nil {
				// A damaged chunk: keep the stored count, and let reading
				// the namespace fail where the damage is, as it does with
				// a clean mark; the other namespaces open.
				q.log.Error("h3x: badger queue: cannot count a namespace's stored events; keeping its stored count", "namespace", ns.name, "err", err)
				ns.count, ns.bytes, ns.freshDisk, ns.diskNext, ns.diskChunk = count, bytes, freshDisk, diskNext, diskChunk
				continue
			}
			swept = append(swept, dead...)
			if now := (nsCounter{int64(ns.count), ns.bytes}); now != stored {
				if !clean {
					q.log.Warn("h3x: badger queue: stored count repaired", "namespace", ns.name, "stored", stored.count, "stored_bytes", stored.bytes, "counted", now.count, "counted_bytes", now.bytes)
				}
				*cnt = now
				repaired = append(repaired, ns.name)
			}
			ns.known = ns.count > 0
		}

		// Deliveries made before the restart: each event's latest lease
		// record gives its attempt count and makes it settleable by ID.
		if err := q.loadLeaseRecs(txn, journaled); err != nil {
			return err
		}

		// IDs published within the dedup window: key-only records, read
		// from the LSM tree alone.
		if c.dedup != nil {
			now := time.Now().UnixNano()
			it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyGroup}})
			defer it.Close()
			for it.Rewind(); it.Valid(); it.Next() {
				enq, ids, ok := decodeGroupKey(it.Item().Key())
				if !ok {
					q.log.Warn("h3x: badger queue: unreadable dedup record skipped")
					continue
				}
				if now-enq >= int64(q.window) {
					continue
				}
				for _, id := range ids {
					c.dedup.add(id, enq)
				}
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	// After the lease records were read (from the load transaction's
	// snapshot, with these chunks and their markers still in it). A write
	// batch: any number of repairs fits.
	return q.writeRepairs(swept, repaired)
}

// sweepSettled counts, at open, the unsettled events in ns's chunks (its
// count starts at zero), makes them deliverable, and returns the chunks
// whose events are all settled (for writeRepairs). recount says every
// namespace is being recounted; otherwise ns was counted empty, and an
// unsettled event found there (the count drifted after a failed commit) is
// logged.
func (q *badgerQueue) sweepSettled(txn *badger.Txn, ns *qns, recount bool) ([]*qchunk, error) {
	var dead []*qchunk
	it := txn.NewIterator(badger.IteratorOptions{Prefix: nsPrefix(keyEvent, ns.name)})
	for it.Rewind(); it.Valid(); it.Next() {
		first := keySeq(it.Item().Key())
		err := q.withChunk(it.Item(), func(v []byte) error {
			st, _, err := loadChunk(txn, ns, first, v)
			if err != nil {
				return err
			}
			if st.live <= 0 {
				dead = append(dead, st)
				return nil
			}
			if !recount {
				q.log.Warn("h3x: badger queue: events found in a namespace counted empty; delivering them", "namespace", ns.name, "events", st.live)
			}
			if ns.freshDisk == 0 {
				ns.diskNext, ns.diskChunk = first, first
			}
			r, err := readChunk(v, first)
			for err == nil {
				seq, val, ok, rerr := r.next()
				if rerr != nil || !ok {
					return rerr
				}
				if st.isSettled(seq) {
					continue
				}
				var size int
				if size, err = storedSize(val, ns.name); err == nil {
					ns.count++
					ns.bytes += int64(size)
					ns.freshDisk++
				}
			}
			return err
		})
		if errors.Is(err, errLostChunk) {
			// Deleted with the settled chunks: whatever it held is lost.
			q.logLostChunk(ns, first, err)
			dead = append(dead, newStoredChunk(ns, first, nil, nil, ns.movedOut[first]))
			continue
		}
		if err != nil {
			it.Close()
			return nil, fmt.Errorf("h3x: badger queue: read %s: %w", ns.name, err)
		}
	}
	it.Close()
	return dead, nil
}

// writeRepairs writes, at open, the counters the recount corrected and
// deletes the settled chunks sweepSettled found, with their ack records and
// markers, through a write batch (any number fits).
func (q *badgerQueue) writeRepairs(dead []*qchunk, repaired []string) error {
	if len(dead) == 0 && len(repaired) == 0 {
		return nil
	}
	wb, v := q.ts.batch()
	defer wb.Cancel()
	for _, name := range repaired {
		if err := wb.Set(counterKey(name), encodeCounter(*q.counters[name])); err != nil {
			return fmt.Errorf("h3x: badger queue: repair counters of %q: %w", name, err)
		}
	}
	for _, st := range dead {
		ns := st.ns
		keys := [][]byte{seqKey(keyEvent, ns.name, st.first), seqKey(keyAcks, ns.name, st.first)}
		for _, seq := range st.movedSeqs() {
			keys = append(keys, movedKey(nil, ns.name, st.first, seq))
		}
		for _, k := range keys {
			if err := wb.Delete(k); err != nil {
				return fmt.Errorf("h3x: badger queue: delete settled chunks of %q: %w", ns.name, err)
			}
		}
		delete(ns.movedOut, st.first)
	}
	err := wb.Flush()
	q.ts.flushed(v)
	if err != nil {
		return fmt.Errorf("h3x: badger queue: delete settled chunks: %w", err)
	}
	return nil
}

// loadLeaseRecs loads the deliveries of the stored lease records whose
// events are still there, as ready entries, and deletes the records that
// list none.
func (q *badgerQueue) loadLeaseRecs(txn *badger.Txn, journal []journalRec) error {
	c := q.core
	recs := make(map[uint64]*leaseRec)
	deliveries := make(map[nsSeq]recDelivery)
	it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyLeaseRec}})
	for it.Rewind(); it.Valid(); it.Next() {
		k := it.Item().Key()
		if len(k) != 9 {
			continue
		}
		rec := &leaseRec{seq: binary.BigEndian.Uint64(k[1:]), put: true}
		recs[rec.seq] = rec
		v, err := it.Item().ValueCopy(nil)
		if err == nil {
			var entries []recEntry
			entries, err = decodeLeaseRec(v)
			for _, r := range entries {
				deliveries[nsSeq{r.ns, r.seq}] = recDelivery{r, rec}
			}
		}
		if err != nil {
			q.log.Warn("h3x: badger queue: unreadable lease record; its attempt counts are lost", "record", rec.seq, "err", err)
		}
	}
	it.Close()
	// Then the journal's records that Badger does not have (the kill came
	// before their commit, or after their deletion): by sequence number,
	// the newest record naming an event still wins. Those that name a
	// latest delivery are written to Badger by the first group.
	var journaled []recPut
	slices.SortFunc(journal, func(a, b journalRec) int { return cmp.Compare(a.seq, b.seq) })
	for _, jr := range journal {
		c.nextSeq = max(c.nextSeq, jr.seq+1) // record numbers are never reused
		if recs[jr.seq] != nil {
			continue // Badger has it
		}
		entries, err := decodeLeaseRec(jr.rec)
		if err != nil {
			q.log.Warn("h3x: badger queue: unreadable lease record in the journal; its attempt counts are lost", "record", jr.seq, "err", err)
			continue
		}
		rec := &leaseRec{seq: jr.seq}
		recs[jr.seq] = rec
		journaled = append(journaled, recPut{rec: rec, entries: entries})
		for _, r := range entries {
			if d, ok := deliveries[nsSeq{r.ns, r.seq}]; !ok || d.rec.seq < jr.seq {
				deliveries[nsSeq{r.ns, r.seq}] = recDelivery{r, rec}
			}
		}
	}
	// Find each delivered event's chunk, in order of sequence number with
	// one reverse iterator per namespace (the chunk holding seq is the one
	// with the largest first sequence number up to seq).
	keys := make([]nsSeq, 0, len(deliveries))
	for k := range deliveries {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b nsSeq) int {
		if a.ns != b.ns {
			return strings.Compare(a.ns, b.ns)
		}
		return cmp.Compare(a.seq, b.seq)
	})
	var (
		rit     *badger.Iterator
		ritNS   string
		cur     *qchunk
		curSeqs []uint64
	)
	defer func() {
		if rit != nil {
			rit.Close()
		}
	}()
	for i, k := range keys {
		ns := c.nss[k.ns]
		if ns == nil || k.seq < ns.diskNext || ns.freshDisk <= 0 {
			continue // acked or dead-lettered since
		}
		if rit == nil || ritNS != k.ns {
			if rit != nil {
				rit.Close()
			}
			rit = txn.NewIterator(badger.IteratorOptions{Prefix: nsPrefix(keyEvent, k.ns), Reverse: true})
			ritNS, cur = k.ns, nil
		}
		if cur == nil || len(curSeqs) == 0 || k.seq > curSeqs[len(curSeqs)-1] {
			rit.Seek(seqKey(keyEvent, k.ns, k.seq))
			if !rit.Valid() {
				continue
			}
			first := keySeq(rit.Item().Key())
			err := q.withChunk(rit.Item(), func(v []byte) error {
				var err error
				cur, curSeqs, err = loadChunk(txn, ns, first, v)
				if err != nil || len(curSeqs) == 0 {
					return err
				}
				// Every delivery in this chunk, while it is at hand.
				return q.fillFromChunk(v, first, curSeqs[len(curSeqs)-1], keys[i:], deliveries)
			})
			if errors.Is(err, errLostChunk) {
				cur = nil // set aside by the sweep, or when a read reaches it
				continue
			}
			if err != nil {
				return fmt.Errorf("h3x: badger queue: load lease records: %w", err)
			}
			if kept := ns.chunks[first]; kept != nil {
				cur = kept
			}
		}
		if _, found := slices.BinarySearch(curSeqs, k.seq); !found || cur.isSettled(k.seq) {
			continue // acked or dead-lettered since
		}
		d := deliveries[k]
		if d.r.id == "" {
			continue // unreadable (logged above): loaded as a fresh event
		}
		ns.keepChunk(cur)
		e := &qentry{id: d.r.id, ns: ns, seq: k.seq, size: d.r.size, enq: d.r.enq, attempt: d.r.attempt, rec: d.rec, state: stReady, chunk: cur}
		d.rec.n++
		c.indexID(e)
		ns.ready.push(e)
		if ns.preloaded == nil {
			ns.preloaded = make(map[uint64]bool)
		}
		ns.preloaded[k.seq] = true
		ns.freshDisk--
	}
	for _, p := range journaled {
		if p.rec.n > 0 {
			q.pendingRecs = append(q.pendingRecs, p)
		}
	}
	var dead [][]byte
	for seq, rec := range recs {
		if rec.n == 0 && rec.put {
			dead = append(dead, leaseRecKey(seq))
		}
	}
	if len(dead) > 0 {
		wb, v := q.ts.batch()
		defer wb.Cancel()
		for _, k := range dead {
			if err := wb.Delete(k); err != nil {
				return fmt.Errorf("h3x: badger queue: delete lease records: %w", err)
			}
		}
		err := wb.Flush()
		q.ts.flushed(v)
		if err != nil {
			return fmt.Errorf("h3x: badger queue: delete lease records: %w", err)
		}
	}
	return nil
}

// nsSeq names a delivered event in loadLeaseRecs.
type nsSeq struct {
	ns  string
	seq uint64
}

// recDelivery is the latest delivery of an event that the lease records
// list, and the record listing it.
type recDelivery struct {
	r   recEntry
	rec *leaseRec
}

// fillFromChunk gives the deliveries of compact lease records (no id)
// among keys (sorted, those from the chunk's namespace first) that are in
// the chunk v, of sequence numbers first to last, their id, size and
// enqueue time: in one pass over the chunk (chunkEvent for each would read
// it from its start each time).
func (q *badgerQueue) fillFromChunk(v []byte, first, last uint64, keys []nsSeq, deliveries map[nsSeq]recDelivery) error {
	r, err := readChunk(v, first)
	if err != nil {
		return err
	}
	ns := keys[0].ns
	inChunk := func() bool { return len(keys) > 0 && keys[0].ns == ns && keys[0].seq <= last }
	for inChunk() {
		seq, val, ok, err := r.next()
		if err != nil || !ok {
			return err
		}
		for inChunk() && keys[0].seq < seq {
			keys = keys[1:] // not in the chunk
		}
		if !inChunk() || keys[0].seq != seq {
			continue
		}
		k := keys[0]
		keys = keys[1:]
		d := deliveries[k]
		if d.r.id != "" {
			continue
		}
		ev, enq, err := decodeEvent(val)
		if err != nil {
			// Left to refill, which meets the same error.
			q.log.Warn("h3x: badger queue: unreadable leased event; its attempt count is lost", "namespace", k.ns, "seq", k.seq, "err", err)
			continue
		}
		ev.Namespace = ns
		d.r.id, d.r.size, d.r.enq = strings.Clone(ev.ID), ev.size(), enq
		deliveries[k] = d
	}
	return nil
}

// --- the store -----------------------------------------------------------------

// badgerStore is the queueStore of a badgerQueue.
type badgerStore badgerQueue

// refill reads up to n fresh events of ns from disk into its read-ahead
// buffer, starting at its cursor (diskNext, in the chunk starting at
// diskChunk). It reads only chunks already applied to the state (up to
// core.applied): later ones are still being committed and land by
// themselves.
func (s *badgerStore) refill(ns *qns, n int) error {
	q := (*badgerQueue)(s)
	c := q.core
	q.tableReads.Add(1)
	txn := q.ts.read()
	defer q.ts.end(txn)
	it := txn.NewIterator(badger.IteratorOptions{Prefix: nsPrefix(keyEvent, ns.name)})
	defer it.Close()

	loaded := 0
	exhausted := true
	for it.Seek(seqKey(keyEvent, ns.name, ns.diskChunk)); it.Valid() && exhausted; it.Next() {
		item := it.Item()
		first := keySeq(item.Key())
		if first > c.applied {
			break
		}
		if loaded >= n {
			exhausted = false
			break
		}
		// The chunk is read in place; the events taken are copied out.
		// Once started, a chunk is read to its end (as far as the
		// read-ahead buffer's bounds allow): Badger copies the whole value
		// of every item an iterator steps on.
		err := q.withChunk(item, func(v []byte) error {
			more, err := q.refillFrom(txn, ns, first, v)
			loaded += more
			if err == errReadAheadFull {
				ns.diskChunk = first
				exhausted = false
				return nil
			}
			return err
		})
		if errors.Is(err, errLostChunk) {
			// Set aside: deleted with the next group, and counted out at
			// the next open (the counts include its events until then).
			q.logLostChunk(ns, first, err)
			q.commitFailed.Store(true)
			if ns.chunks[first] == nil {
				q.deferFix(nil, []*qchunk{newStoredChunk(ns, first, nil, nil, ns.movedOut[first])})
			}
			ns.diskNext = max(ns.diskNext, first+1)
			err = nil
		}
		if err != nil {
			return fmt.Errorf("h3x: badger queue: read %s: %w", ns.name, err)
		}
		if exhausted {
			ns.diskChunk = ns.diskNext // past this chunk
		}
	}
	if exhausted {
		ns.freshDisk = 0
		ns.diskNext = max(ns.diskNext, c.applied+1)
		ns.diskChunk = ns.diskNext
	} else if ns.freshDisk < 0 {
		ns.freshDisk = 0
	}
	return nil
}

var errReadAheadFull = errors.New("read-ahead buffer full")

// logLostChunk reports a chunk set aside because it is not in its segment
// (errLostChunk): after a kernel crash or power loss, the tail of what was
// written without a sync (DurabilityNoSync, or a publish not yet
// acknowledged), or damage to the segment files.
func (q *badgerQueue) logLostChunk(ns *qns, first uint64, err error) {
	q.log.Error("h3x: badger queue: events lost: a chunk is not in its segment file; set aside", "namespace", ns.name, "first_seq", first, "err", err)
}

// refillFrom adds the fresh events of ns in chunk first (v, valid only
// during the call) from diskNext on to its read-ahead buffer, as far as its
// bounds allow. It returns how many it added, and errReadAheadFull if it
// stopped before the end of the chunk.
func (q *badgerQueue) refillFrom(txn *badger.Txn, ns *qns, first uint64, v []byte) (int, error) {
	r, err := readChunk(v, first)
	if err != nil {
		return 0, err
	}
	// The chunk's state: the one entries in memory share, or read.
	ch := ns.chunks[first]
	if ch == nil {
		if ch, _, err = loadChunk(txn, ns, first, v); err != nil {
			return 0, err
		}
		if ch.live <= 0 {
			// Every event settled, and its deletion lost (a failed
			// commit, a crash): delete it with the next group.
			q.deferFix(nil, []*qchunk{ch})
		}
	}
	loaded := 0
	var arena []byte
	for {
		seq, val, ok, err := r.next()
		if err != nil || !ok {
			return loaded, err
		}
		if seq < ns.diskNext {
			continue
		}
		if ch.isSettled(seq) {
			// Settled before the queue was opened.
			ns.diskNext = seq + 1
			continue
		}
		if ns.preloaded[seq] {
			// Delivered before the queue was opened: already in ready.
			delete(ns.preloaded, seq)
			ns.diskNext = seq + 1
			continue
		}
		if (loaded > 0 && ns.fresh.bytes >= readAheadBytes) || ns.fresh.len() >= 4*readAheadMax {
			return loaded, errReadAheadFull
		}
		if cap(arena)-len(arena) < len(val) {
			arena = make([]byte, 0, max(len(val), 64<<10))
		}
		at := len(arena)
		arena = append(arena, val...)
		ev, enq, err := decodeEvent(arena[at:len(arena):len(arena)])
		if err != nil {
			return loaded, fmt.Errorf("event %d: %w", seq, err)
		}
		ns.keepChunk(ch)
		ev.Namespace = ns.name
		ns.fresh.push(&qentry{id: ev.ID, ns: ns, seq: seq, size: ev.size(), enq: enq, ev: &ev, chunk: ch})
		ns.diskNext = seq + 1
		ns.freshDisk--
		loaded++
	}
}

// take returns e's event: the read-ahead copy if it has one, or the event
// read from disk (a redelivery).
func (s *badgerStore) take(e *qentry) (Event, error) {
	if e.ev != nil {
		ev := *e.ev
		e.ev = nil
		return ev, nil
	}
	q := (*badgerQueue)(s)
	q.tableReads.Add(1)
	var ev Event
	err := q.ts.view(func(txn *badger.Txn) error {
		v, err := q.readStoredEvent(txn, e)
		if err != nil {
			return err
		}
		ev, _, err = decodeEvent(v)
		return err
	})
	if err != nil {
		return Event{}, fmt.Errorf("h3x: badger queue: read event %s of %q: %w", e.id, e.ns.name, err)
	}
	return ev, nil
}

// submit hands the effects of a state change to the writer. Without wait it
// returns a wait for the writes to be written, not synced (see
// queueStore.submit).
func (s *badgerStore) submit(fx *effects, wait bool) *writeWait {
	q := (*badgerQueue)(s)
	op := &wop{fx: fx, w: &writeWait{done: make(chan struct{})}, durable: wait}
	// A Lease call's records alone, in the journal: nothing to wait for.
	journaled := !wait && fx.journal && len(fx.deletes) == 0 && len(fx.recPuts) > 0 &&
		q.journal.append(fx.recPuts) == nil
	if !wait && !journaled {
		op.written = make(chan struct{})
	}
	if err := q.push(op); err != nil {
		// Closed: the core refuses calls once closed, so only expiry
		// and the completer's last groups (record deletions of acks
		// completed during Close) get here: their lease records are
		// written by Close (writeLastFixes), after the completer.
		q.deferRecs(fx.recPuts, fx.recDeletes)
		return nil
	}
	if journaled {
		q.statJournaled.Add(1)
		return nil
	}
	if !wait {
		return &writeWait{done: op.written}
	}
	return op.w
}

// barrier queues an op that writes nothing: groups complete in order, so
// once its own has, every state change submitted before it is applied.
func (s *badgerStore) barrier() *writeWait {
	q := (*badgerQueue)(s)
	op := &wop{w: &writeWait{done: make(chan struct{})}}
	if q.push(op) != nil {
		return nil // closed
	}
	return op.w
}

// push queues op for the writer.
func (q *badgerQueue) push(op *wop) error {
	q.wmu.Lock()
	if q.wstop {
		q.wmu.Unlock()
		return ErrQueueClosed
	}
	q.wops = append(q.wops, op)
	q.wmu.Unlock()
	select {
	case q.wsignal <- struct{}{}:
	default:
	}
	return nil
}

// deferFix keeps corrections for the next group the writer builds.
func (q *badgerQueue) deferFix(counters map[string]nsCounter, chunks []*qchunk) {
	q.wmu.Lock()
	defer q.wmu.Unlock()
	for name, d := range counters {
		if q.pendingCounters == nil {
			q.pendingCounters = make(map[string]nsCounter)
		}
		p := q.pendingCounters[name]
		p.count += d.count
		p.bytes += d.bytes
		q.pendingCounters[name] = p
	}
	for _, ch := range chunks {
		if !slices.Contains(q.pendingChunks, ch) {
			q.pendingChunks = append(q.pendingChunks, ch)
		}
	}
}

// deferRecs keeps lease records whose write or deletion failed for the
// next group.
func (q *badgerQueue) deferRecs(recs []recPut, dels []uint64) {
	if len(recs) == 0 && len(dels) == 0 {
		return
	}
	q.wmu.Lock()
	defer q.wmu.Unlock()
	q.pendingRecs = append(q.pendingRecs, recs...)
	q.pendingRecDels = append(q.pendingRecDels, dels...)
}

// takeRecs returns the pending lease records and deletions, and clears
// them.
func (q *badgerQueue) takeRecs() ([]recPut, []uint64) {
	q.wmu.Lock()
	defer q.wmu.Unlock()
	recs, dels := q.pendingRecs, q.pendingRecDels
	q.pendingRecs, q.pendingRecDels = nil, nil
	return recs, dels
}

// groupRecords returns the lease records a group writes and deletes: those
// left over from earlier groups, then its ops'. A record that no longer
// names any event's latest delivery is not written (its deletion is pushed,
// under c.mu, when its count reaches zero, so it comes after this group).
// Unless the group is refused, the records written are marked as handed to
// Badger (leaseRec.put): from then on, one that names nobody any more is
// deleted.
func (q *badgerQueue) groupRecords(ops []*wop, refused bool) ([]recPut, []uint64) {
	puts, dels := q.takeRecs()
	for _, op := range ops {
		if op.fx != nil {
			puts = append(puts, op.fx.recPuts...)
			dels = append(dels, op.fx.recDeletes...)
		}
	}
	if len(puts) == 0 {
		return nil, dels
	}
	c := q.core
	c.mu.Lock()
	defer c.mu.Unlock()
	puts = slices.DeleteFunc(puts, func(r recPut) bool { return r.rec.n <= 0 })
	if !refused {
		for _, r := range puts {
			r.rec.put = true
		}
	}
	return puts, dels
}

// fixesPending reports whether corrections wait for a group.
func (q *badgerQueue) fixesPending() bool {
	q.wmu.Lock()
	defer q.wmu.Unlock()
	return q.pendingCounters != nil || q.pendingChunks != nil || q.pendingRecs != nil || q.pendingRecDels != nil
}

// takeFixes returns the pending corrections and clears them.
func (q *badgerQueue) takeFixes() (map[string]nsCounter, []*qchunk) {
	q.wmu.Lock()
	defer q.wmu.Unlock()
	counters, chunks := q.pendingCounters, q.pendingChunks
	q.pendingCounters, q.pendingChunks = nil, nil
	return counters, chunks
}

// --- Enqueue ---------------------------------------------------------------------

func (q *badgerQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if len(events) == 0 {
		q.wmu.Lock()
		stopped := q.wstop
		q.wmu.Unlock()
		if stopped {
			return nil, ErrQueueClosed // as for a batch: later calls fail
		}
		return []PublishResult{}, nil
	}
	now := time.Now()
	enq := now.UnixNano()
	var op *wop
	if len(events) == 1 {
		// The common single-event publish, in one allocation.
		one := &struct {
			op   wop
			ev   [1]Event
			size [1]int
			val  [1][]byte
			res  [1]PublishResult
			w    writeWait
		}{}
		op = &one.op
		op.evs, op.sizes, op.vals, op.res, op.w = one.ev[:], one.size[:], one.val[:], one.res[:], &one.w
	} else {
		op = &wop{
			evs:   make([]Event, len(events)),
			sizes: make([]int, len(events)),
			vals:  make([][]byte, len(events)),
			res:   make([]PublishResult, len(events)),
			w:     &writeWait{},
		}
	}
	op.enq = enq
	op.durable = true
	op.w.done = make(chan struct{})
	total := 0
	for i := range events {
		op.evs[i] = events[i]
		op.sizes[i] = prepareEvent(&op.evs[i], now)
		refuseUnencodable(&op.evs[i], &op.res[i])
		n := encodedLen(&op.evs[i])
		if n > q.maxValue {
			return q.enqueueFitting(ctx, events)
		}
		total += n
	}
	// One buffer for every value of the batch.
	buf := make([]byte, 0, total)
	for i := range op.evs {
		start := len(buf)
		buf = encodeEvent(buf, &op.evs[i], enq)
		op.vals[i] = buf[start:len(buf):len(buf)]
		// The caller's event is not kept: the writer decodes what it needs
		// from the value.
		op.evs[i].Data, op.evs[i].Metadata = nil, nil
	}
	if err := q.push(op); err != nil {
		return nil, err
	}
	if err := op.w.wait(ctx); err != nil {
		return nil, err
	}
	return op.res, nil
}

// enqueueFitting refuses the events of a batch too large for the queue and
// enqueues the others.
func (q *badgerQueue) enqueueFitting(ctx context.Context, events []Event) ([]PublishResult, error) {
	res := make([]PublishResult, len(events))
	fit := make([]Event, 0, len(events))
	var at []int
	for i, ev := range events {
		if ev.ID == "" {
			ev.ID = newUUIDv4()
		}
		if n := encodedLen(&ev); n > q.maxValue {
			res[i] = PublishResult{ID: ev.ID, Status: PublishRefused,
				Err: newError(CodeInvalidArgument, "event %s is %d bytes stored, above the Badger queue's limit of %d (set by MemTableSize; at most about 1 MiB)", ev.ID, n, q.maxValue)}
			continue
		}
		fit = append(fit, ev)
		at = append(at, i)
	}
	if len(fit) > 0 {
		r, err := q.Enqueue(ctx, fit)
		if err != nil {
			return nil, err
		}
		for j, i := range at {
			res[i] = r[j]
		}
	}
	return res, nil
}

// --- the writer --------------------------------------------------------------------

// The writer is a two-stage pipeline. Stage one (writer) takes every request
// waiting, decides them (dedup, limits, sequence numbers) and hands their
// writes to Badger as one transaction without waiting for it; stage two
// (completer) waits for each group's commit in order, then makes its events
// deliverable, reverts what failed, and answers the callers. So the next
// group is prepared while Badger writes (and, with DurabilityFsync, syncs)
// the previous one. pipelineDepth bounds the groups in flight.
const pipelineDepth = 4

// fsyncInlineBytes: with DurabilityFsync, a group whose new chunks encode
// to fewer bytes than this stores them in Badger, as values, rather than in
// a segment. Its sync round is then one fdatasync (Badger's log) instead of
// two in parallel (the segment's and the log's, each committing the
// file system's journal), which at low rates is most of a publish's wait:
// 5,000 single-event publishes a second, with a consumer, had a round of
// 350–410 µs against 570–670 and an Enqueue p50 of 0.65–0.83 ms against
// 1.1–1.3 ms (BENCHMARKS.md, "The sixteenth session"). Small groups are
// what a low rate makes; a busy queue's groups are larger and go to the
// segments, whose syncs the many events of a round share, and which keep
// the bulk of the bytes out of Badger's tree. The cost: the bytes go
// through Badger's memtable, which then flushes more often, and a flush
// holds the next sync for 50–80 ms here (the p99 of minute-long runs at
// that rate rose from 17–26 to 35–37 ms). A variable so that tests can
// make every group use a segment.
var fsyncInlineBytes = 16 << 10

// group is one group commit.
type group struct {
	n       uint64 // its number, in acceptance order
	ops     []*wop
	moved   []*movedEvent
	diskErr error
	txns    []*gtxn
	chunks  []*qchunk    // chunks whose events it settles (inflight counted)
	pending atomic.Int32 // transactions not yet committed, +1 while building
	done    chan struct{}
}

// gtxn is one transaction of a group.
type gtxn struct {
	ents    []*qentry // the entries whose writes it holds
	recs    []recPut  // the lease records it writes
	recDels []uint64  // the lease records it deletes
	deltas  map[string]nsCounter
	// The chunk pointers it writes and those it deletes or replaces
	// (queue_badger_segment.go), and its version.
	segPuts, segDrops []segRef
	v                 uint64
	err               error
}

func (g *group) release() {
	if g.pending.Add(-1) == 0 {
		close(g.done)
		for _, op := range g.ops {
			if op.written != nil {
				close(op.written)
			}
		}
	}
}

func (q *badgerQueue) writer() {
	defer close(q.inflight)
	var ops []*wop
	for {
		q.wmu.Lock()
		for len(q.wops) == 0 && !q.wstop {
			q.wmu.Unlock()
			<-q.wsignal
			q.wmu.Lock()
		}
		if len(q.wops) == 0 {
			q.wmu.Unlock()
			return
		}
		ops, q.wops = q.wops, nil
		q.wbusy = true
		q.wmu.Unlock()
		for _, op := range ops {
			q.enqueued.Add(int64(len(op.evs)))
		}
		free, ferr := (*q.diskFree.Load())(q.dir) // one reading a round
		for _, part := range q.partition(ops, free, ferr) {
			g := q.write(part, free, ferr)
			q.statGroups.Add(1)
			q.statOps.Add(int64(len(part)))
			q.groupsOut.Add(1)
			q.inflight <- g
		}
		q.wmu.Lock()
		q.wbusy = false
		q.wmu.Unlock()
	}
}

// partition splits ops in two groups when the free space is below the
// reserve but above half of it, where write refuses a group that adds
// events and writes one that does not: the ops that add (enqueues and
// dead-letter moves) go in a group of their own, so that the settlements
// and lease records pushed with them are still written.
func (q *badgerQueue) partition(ops []*wop, free uint64, ferr error) [][]*wop {
	if ferr != nil || free >= q.reserve || free < q.reserve/2 {
		return [][]*wop{ops}
	}
	var adding, other []*wop
	for _, op := range ops {
		if op.evs != nil || (op.fx != nil && len(op.fx.moves) > 0) {
			adding = append(adding, op)
		} else {
			other = append(other, op)
		}
	}
	if len(adding) == 0 || len(other) == 0 {
		return [][]*wop{ops}
	}
	return [][]*wop{other, adding}
}

// completer is stage two. With DurabilityFsync it syncs once for every run
// of groups queued to it, and answers them after: one sync covers every
// group written before it started, however many, while the writer goes on
// with the next ones. The groups' segment writes are done when they are
// queued (write makes them first), so the segments' sync starts at once,
// alongside the commits still running; Badger's log is synced once they
// are done (see syncFiles).
func (q *badgerQueue) completer() {
	defer close(q.completerDone)
	var batch []*group
	for {
		g, ok := <-q.inflight
		if !ok {
			return
		}
		batch = append(batch[:0], g)
	gather:
		for {
			select {
			case g2, ok := <-q.inflight:
				if !ok {
					break gather
				}
				batch = append(batch, g2)
			default:
				break gather
			}
		}
		if q.fsync && (durable(batch) || dropsSegments(batch)) {
			q.syncAndComplete(batch)
		} else {
			// Nothing to sync: each group is answered as soon as its
			// commit is done, not after the later ones'.
			for _, g := range batch {
				<-g.done
				q.complete(g, nil)
			}
		}
		n := len(batch)
		clear(batch)
		// What the completed groups shadowed or deleted can go, and the
		// segments no read can reach.
		q.segs.removeRetired(q.ts.discard(), q.syncBeforeRemoval)
		q.groupsOut.Add(-int32(n))
		q.ballast.wake() // a new memtable log to preallocate, if Badger rotated
	}
}

// syncAndComplete syncs for batch, once its commits are done, and answers
// its groups. The segments' sync starts first, alongside the commits.
func (q *badgerQueue) syncAndComplete(batch []*group) {
	q.statSyncs.Add(1)
	var segSync <-chan error
	if q.syncBroken.Load() == nil {
		segSync = q.startSegmentSync()
	}
	for _, g := range batch {
		<-g.done
	}
	var syncErr error
	if p := q.syncBroken.Load(); p != nil {
		syncErr = *p
		if segSync != nil {
			<-segSync
		}
	} else if err := q.syncFiles(segSync); err != nil {
		syncErr = q.noteSyncFailure(err)
	} else if p := q.syncBroken.Load(); p != nil {
		// Another sync of a segment failed meanwhile (the writer's, of
		// moved copies): the error it got may have been the one for
		// these groups' bytes (see segStore.syncFile).
		syncErr = *p
	}
	for _, g := range batch {
		q.complete(g, syncErr)
	}
}

// syncBeforeRemoval makes the moves that emptied segments durable before
// those segments are removed. With DurabilityFsync they are already (see
// dropsSegments); without, a kernel crash could otherwise bring back a
// pointer into a removed segment, losing an event acknowledged long before.
// Badger's files only: the moved copies were synced before their pointers
// were written (planMoves). Moves are rare (see moveQuiet).
func (q *badgerQueue) syncBeforeRemoval() error {
	if q.fsync {
		return nil
	}
	return q.syncFiles(nil)
}

// noteSyncFailure records a failed sync: after it, nothing is acknowledged
// as durable until the queue is reopened (see syncBroken). It returns the
// error the writes it affects get.
func (q *badgerQueue) noteSyncFailure(err error) error {
	e := storageError("sync", fmt.Errorf("%w (writes are not durable until the queue is reopened)", err))
	if !q.syncBroken.CompareAndSwap(nil, &e) {
		e = *q.syncBroken.Load()
	}
	q.commitFailed.Store(true)
	q.log.Error("h3x: badger queue: sync failed", "err", err)
	return e
}

// durable reports whether someone waits for a group of batch to be durable.
// (Writes nobody waits for, such as lease records, are synced by the next
// sync anyone needs.)
func durable(batch []*group) bool {
	for _, g := range batch {
		for _, op := range g.ops {
			if op.durable {
				return true
			}
		}
	}
	return false
}

// dropsSegments reports whether a group of batch deletes or moves a chunk
// stored in a segment: it is synced before that segment can be removed.
func dropsSegments(batch []*group) bool {
	for _, g := range batch {
		for _, t := range g.txns {
			if len(t.segDrops) > 0 {
				return true
			}
		}
	}
	return false
}

// maxTxnWrites bounds the writes of one transaction, well below Badger's own
// limit (ErrTxnTooBig, which is handled anyway).
const maxTxnWrites = 4096

// write is stage one: it decides a group and starts committing it. free and
// ferr are the data directory's free space, as read for the round.
func (q *badgerQueue) write(ops []*wop, free uint64, ferr error) *group {
	c := q.core
	g := &group{ops: ops, done: make(chan struct{})}
	g.pending.Store(1)

	// Decide: dedup, limits and sequence numbers of the new events;
	// sequence numbers of the dead-letter moves.
	c.mu.Lock()
	q.groups++
	g.n = q.groups
	adds := false
	// Every enqueued event first, then the dead letters: a namespace's
	// chunk of enqueued events then holds no dead letter's sequence number,
	// and complete lands them in this order.
	for _, op := range ops {
		if op.evs != nil {
			op.ents = c.accept(op.evs, op.sizes, op.enq, op.res, nil)
			adds = adds || len(op.ents) > 0
		}
	}
	for _, op := range ops {
		if op.fx != nil {
			for _, m := range op.fx.moves {
				m.seq = c.nextSeq
				c.nextSeq++
				adds = true
			}
		}
	}
	hwm := c.nextSeq - 1
	c.mu.Unlock()

	// Refuse to write when the disk is (nearly) full.
	if ferr == nil {
		if adds && free < q.reserve {
			g.diskErr = diskFullError("enqueue", fmt.Errorf("%d bytes free in %s, %d kept in reserve", free, q.dir, q.reserve))
		} else if free < q.reserve/2 {
			g.diskErr = diskFullError("write", fmt.Errorf("%d bytes free in %s", free, q.dir))
		}
	}
	if g.diskErr == nil {
		g.diskErr = q.ballastOut()
	}
	fixCounters, fixChunks := q.takeFixes()
	recPuts, recDels := q.groupRecords(ops, g.diskErr != nil)
	if g.diskErr != nil {
		q.deferFix(fixCounters, fixChunks) // for a later group
		q.deferRecs(recPuts, recDels)
		g.release()
		return g
	}

	// The builder's bookkeeping slices are reused from group to group
	// (writer-owned), not regrown each time.
	b := txnBuilder{q: q, g: g, hwm: hwm, dedup: c.dedup != nil, window: q.window, cur: q.bcur, itemStarts: q.bstarts}
	b.start()
	defer func() {
		if b.txn != nil {
			b.txn.Discard()
		}
	}()
	for name, d := range fixCounters {
		b.item()
		b.add(bwrite{cnt: true, fix: true, ns: name, count: d.count, bytes: d.bytes})
	}
	q.writeChunks(&b, ops)

	// Dead letters are read (and rewritten) before the settlements are
	// decided: one that cannot be read stays where it is.
	var moves []*movedEvent
	for _, op := range ops {
		if op.fx == nil {
			continue
		}
		for _, m := range op.fx.moves {
			mv, err := q.readMove(m)
			if err != nil {
				q.log.Error("h3x: badger queue: dead-lettering failed; the event stays", "id", m.e.id, "err", err)
				continue
			}
			moves = append(moves, mv)
		}
	}
	g.moved = moves
	q.writeSettled(&b, g, ops, moves)
	q.writeChunkFixes(&b, g, fixChunks)
	q.moveChunks(&b) // after the deletions: a chunk deleted is not moved
	for i := range recPuts {
		b.item()
		val := recPuts[i].enc // encoded for the lease journal
		if val == nil {
			val = q.encodeRec(recPuts[i].entries)
		}
		b.add(bwrite{key: leaseRecKey(recPuts[i].rec.seq), val: val, rec: &recPuts[i]})
	}
	for _, seq := range recDels {
		b.item()
		b.add(bwrite{key: leaseRecKey(seq), del: true, recDel: seq})
	}
	b.commit()
	q.bcur, q.bstarts = b.cur[:0], b.itemStarts[:0]
	g.release()
	return g
}

// writeChunks writes the events the group adds: one chunk per namespace,
// split at maxChunkEvents or maxChunkBytes (a single event may be as large
// as the largest value the queue stores).
func (q *badgerQueue) writeChunks(b *txnBuilder, ops []*wop) {
	type pending struct {
		ents []*qentry
		vals [][]byte
	}
	var order []*pending
	var byNS map[*qns]*pending
	for _, op := range ops {
		if op.evs == nil {
			continue
		}
		k := 0
		for i := range op.evs {
			if op.res[i].Status != PublishStored {
				continue
			}
			e := op.ents[k]
			k++
			if byNS == nil {
				byNS = make(map[*qns]*pending)
			}
			p := byNS[e.ns]
			if p == nil {
				p = &pending{}
				byNS[e.ns] = p
				order = append(order, p)
			}
			p.ents = append(p.ents, e)
			p.vals = append(p.vals, op.vals[i])
		}
	}
	// Encode every chunk into one buffer, written to the segment at once.
	type chunkPlan struct {
		ns         *qns
		ents       []*qentry
		seqs       []uint64
		bytes      int64
		start, end int
	}
	var plans []chunkPlan
	buf := q.segs.buf[:0]
	for _, p := range order {
		ns := p.ents[0].ns
		for len(p.ents) > 0 {
			n, size := 0, binary.MaxVarintLen32
			for n < len(p.ents) && n < maxChunkEvents {
				sz := chunkEntrySize(p.vals[n])
				if n > 0 && size+sz > min(q.maxValue, maxChunkBytes) {
					break
				}
				size += sz
				n++
			}
			ents, vals := p.ents[:n:n], p.vals[:n]
			seqs := make([]uint64, n)
			var bytes int64
			for i, e := range ents {
				seqs[i] = e.seq
				bytes += int64(e.size)
			}
			buf = appendRecordHeader(buf, ns.name, seqs[0])
			start := len(buf)
			buf = encodeChunk(buf, seqs, vals)
			setRecordLen(buf, start)
			plans = append(plans, chunkPlan{ns: ns, ents: ents, seqs: seqs, bytes: bytes, start: start, end: len(buf)})
			p.ents, p.vals = p.ents[n:], p.vals[n:]
		}
	}
	if len(plans) == 0 {
		return
	}
	q.segs.buf = buf // the writer's, for the next group
	var sg *segment
	var off uint64
	var ptrs []byte
	inline := len(buf) < q.inlineBelow
	if !inline {
		var err error
		if sg, off, err = q.segs.appendRecords(buf); err != nil {
			inline = true
			if !q.segs.broken && err != errSegmentsDisabled {
				q.segs.broken = true
				q.log.Error("h3x: badger queue: cannot write a segment; storing chunks in Badger until one can be written", "err", err)
			}
		} else {
			q.segs.broken = false
			ptrs = make([]byte, 0, len(plans)*maxSegPtrLen)
		}
	}
	if inline {
		// Stored in place: the values keep their bytes until their
		// commit, so they get a copy of their own.
		buf = slices.Clone(buf)
	}
	for _, pl := range plans {
		ch := &qchunk{ns: pl.ns, first: pl.seqs[0], live: len(pl.ents)}
		for _, e := range pl.ents {
			e.chunk = ch
		}
		w := bwrite{key: b.seqKey(keyEvent, pl.ns.name, ch.first), newID: true, cnt: true, ns: pl.ns.name, count: int64(len(pl.ents)), bytes: pl.bytes}
		if ptrs == nil {
			w.val = buf[pl.start:pl.end:pl.end]
		} else {
			chunk := buf[pl.start:pl.end]
			r := &segRef{id: chunkID{pl.ns.name, ch.first}, loc: segLoc{seg: sg.id, off: off + uint64(pl.start), n: uint32(len(chunk)), crc: crc32.Checksum(chunk, castagnoli)}, kind: pendPut}
			at := len(ptrs)
			ptrs = encodeSegPtr(ptrs, r.loc)
			w.val = ptrs[at:len(ptrs):len(ptrs)]
			w.segPut = r
			q.segs.storing(*r)
		}
		b.item(pl.ents...)
		b.add(w)
	}
}

// moveChunks writes the pointers of the chunks planMoves moved out of
// mostly settled segments.
func (q *badgerQueue) moveChunks(b *txnBuilder) {
	if q.closing {
		return // nothing would sync the moved copies before Close removes the old ones
	}
	for _, m := range q.planMoves() {
		b.item()
		b.add(bwrite{key: b.seqKey(keyEvent, m.id.ns, m.id.first), val: encodeSegPtr(make([]byte, 0, maxSegPtrLen), m.to),
			segPut: &segRef{m.id, m.to, pendMove}, segDrop: &segRef{m.id, m.from, pendMove}})
	}
}

// writeSettled writes the group's settlements (acknowledged and
// dead-lettered events): for each chunk they touch, its new ack record if
// events of it were acknowledged, and the dead letters moved out of it, each
// with its marker in one item (so that a move is never half done). Chunks
// are deleted later (writeChunkFixes), once every commit that settled an
// event of them has completed.
func (q *badgerQueue) writeSettled(b *txnBuilder, g *group, ops []*wop, moves []*movedEvent) {
	// What the group settles, by chunk.
	type touch struct {
		ch       *qchunk
		ns       *qns
		acked    []*qentry // acknowledged
		ackBytes int64
		moves    []*movedEvent
		record   []byte // the ack record to write, if any acked
	}
	var touched []*touch
	var byChunk map[*qchunk]*touch // made on the first settlement
	of := func(e *qentry) *touch {
		if byChunk == nil {
			byChunk = make(map[*qchunk]*touch)
		}
		t := byChunk[e.chunk]
		if t == nil || e.chunk == nil {
			t = &touch{ch: e.chunk, ns: e.ns}
			byChunk[e.chunk] = t
			touched = append(touched, t)
		}
		return t
	}
	c := q.core
	c.mu.Lock()
	for _, op := range ops {
		if op.fx == nil {
			continue
		}
		for _, e := range op.fx.deletes {
			t := of(e)
			t.acked = append(t.acked, e)
			t.ackBytes += int64(e.size)
			if e.chunk != nil {
				// Settled again after a failed commit: the record is
				// rewritten all the same.
				e.chunk.settle(e.seq, false)
			}
		}
	}
	for _, mv := range moves {
		t := of(mv.m.e)
		t.moves = append(t.moves, mv)
		if mv.m.e.chunk != nil {
			mv.m.e.chunk.settle(mv.m.e.seq, true)
		}
	}
	for _, t := range touched {
		if t.ch == nil {
			continue
		}
		t.ch.inflight++
		g.chunks = append(g.chunks, t.ch)
		if len(t.acked) > 0 {
			t.record = append([]byte(nil), t.ch.acked...)
		}
	}
	c.mu.Unlock()

	for _, t := range touched {
		if t.ch == nil {
			q.log.Error("h3x: badger queue: settled an event without a chunk; it stays on disk", "namespace", t.ns.name)
			continue
		}
		if len(t.acked) > 0 {
			b.item(t.acked...)
			b.add(bwrite{key: b.seqKey(keyAcks, t.ns.name, t.ch.first), val: t.record,
				cnt: true, ns: t.ns.name, count: -int64(len(t.acked)), bytes: -t.ackBytes})
		}
		for _, mv := range t.moves {
			m := mv.m
			b.item(m.e)
			b.add(bwrite{key: movedKey(nil, t.ns.name, t.ch.first, m.e.seq), val: nil,
				cnt: true, ns: t.ns.name, count: -1, bytes: -int64(m.e.size)})
			b.add(bwrite{key: b.seqKey(keyEvent, m.dst.name, m.seq), val: encodeChunk(nil, []uint64{m.seq}, [][]byte{mv.val}),
				cnt: true, ns: m.dst.name, count: 1, bytes: int64(mv.size)})
		}
	}
}

// writeChunkFixes writes the pending chunk fixes: a chunk
// to delete (all its events settled, every commit settling one completed)
// or, after a failed commit, whose ack record to rewrite from memory.
func (q *badgerQueue) writeChunkFixes(b *txnBuilder, g *group, chunks []*qchunk) {
	type fixWrite struct {
		ch    *qchunk
		del   bool
		acked []byte
		moved []uint64
	}
	var fixes []fixWrite
	c := q.core
	c.mu.Lock()
	for _, ch := range chunks {
		if ch.deleted {
			continue
		}
		f := fixWrite{ch: ch}
		if ch.live <= 0 && ch.inflight == 0 {
			ch.deleted = true
			ch.ns.dropChunk(ch)
			f.del = true
			f.moved = ch.movedSeqs()
		} else {
			f.acked = append([]byte(nil), ch.acked...)
		}
		ch.inflight++
		g.chunks = append(g.chunks, ch)
		fixes = append(fixes, f)
	}
	c.mu.Unlock()
	fr := freshRead{q: q} // to read the pointers of the chunks deleted
	defer fr.end()
	for _, f := range fixes {
		name := f.ch.ns.name
		b.item()
		if !f.del {
			b.add(bwrite{key: b.seqKey(keyAcks, name, f.ch.first), val: f.acked})
			continue
		}
		w := bwrite{key: b.seqKey(keyEvent, name, f.ch.first), del: true}
		id := chunkID{name, f.ch.first}
		if l, ok := fr.chunkLoc(id); ok {
			w.segDrop = &segRef{id, l, pendDelete}
			q.segs.deleting(id)
		}
		b.add(w)
		b.add(bwrite{key: b.seqKey(keyAcks, name, f.ch.first), del: true})
		for _, seq := range f.moved {
			b.add(bwrite{key: movedKey(nil, name, f.ch.first, seq), del: true})
		}
	}
}

// complete is stage two: the group's transactions are done; apply what
// became durable, revert what did not, and answer.
func (q *badgerQueue) complete(g *group, syncErr error) {
	c := q.core
	var failed map[*qentry]error
	var fix map[string]nsCounter
	for _, t := range g.txns {
		if t.err == nil {
			continue
		}
		q.commitFailed.Store(true)
		err := storageError("commit", t.err)
		if failed == nil {
			failed = make(map[*qentry]error)
			fix = make(map[string]nsCounter)
		}
		for _, e := range t.ents {
			failed[e] = err
		}
		q.deferRecs(t.recs, t.recDels) // written again with the next group
		for name, d := range t.deltas {
			f := fix[name]
			f.count -= d.count
			f.bytes -= d.bytes
			fix[name] = f
		}
		q.log.Error("h3x: badger queue: commit failed", "err", t.err)
	}
	for _, t := range g.txns {
		q.segs.done(t.segPuts, t.segDrops, t.v, t.err == nil && syncErr == nil)
	}
	errOf := func(e *qentry) error {
		if g.diskErr != nil {
			return g.diskErr
		}
		return failed[e]
	}

	c.mu.Lock()
	mi := 0
	opErrs := make([]error, len(g.ops))
	for oi, op := range g.ops {
		if op.evs != nil {
			k := 0
			for i := range op.evs {
				if op.res[i].Status != PublishStored {
					continue
				}
				e := op.ents[k]
				k++
				if err := errOf(e); err != nil {
					opErrs[oi] = err
					c.unaccept(e)
					q.noteFailedID(e.id)
					continue
				}
				var ev *Event
				if c.wantsReadAhead(e.ns, e.size) {
					if dev, _, derr := decodeEvent(op.vals[i]); derr == nil {
						dev.Namespace = e.ns.name
						ev = &dev
					}
				}
				c.land(e, ev, e.size)
			}
		}
	}
	// Then the settlements (dead letters land after every enqueued event,
	// in the order of their sequence numbers).
	var refx effects // lease records of removed and restored entries
	for oi, op := range g.ops {
		opErr := opErrs[oi]
		if op.fx != nil {
			for _, e := range op.fx.deletes {
				if err := errOf(e); err != nil {
					opErr = err
					c.restore(e, false, &refx)
				} else {
					c.dropRec(e, &refx) // see dropRemovedRec
				}
			}
			for _, m := range op.fx.moves {
				if mi < len(g.moved) && g.moved[mi].m == m {
					mv := g.moved[mi]
					mi++
					if err := errOf(m.e); err == nil {
						c.dropRec(m.e, &refx) // see dropRemovedRec
						c.arrived(m)
						e := &qentry{id: m.e.id, ns: m.dst, seq: m.seq, size: mv.size, enq: mv.enq, chunk: mv.chunk}
						var ev *Event
						if c.wantsReadAhead(m.dst, mv.size) {
							ev = &mv.ev
						}
						c.land(e, ev, m.size)
						continue
					} else {
						opErr = err
					}
				} else if g.diskErr != nil {
					opErr = g.diskErr // refused: not read, not written
				}
				c.unmove(m, &refx)
			}
		}
		op.failed = opErr
	}
	if !refx.empty() {
		c.finishNoWait(&refx)
	}
	// A duplicate of an event whose commit failed was answered too early:
	// fail its batch instead (a retry stores it).
	if len(q.failedIDs) > 0 && g.n <= q.failCheckUntil {
		for _, op := range g.ops {
			for i := range op.res {
				if op.res[i].Status == PublishDuplicate && op.failed == nil {
					if err, ok := q.failedIDs[op.res[i].ID]; ok {
						op.failed = err
					}
				}
			}
		}
	}
	if g.n >= q.failCheckUntil {
		clear(q.failedIDs)
	}
	// The chunks whose events the group settled: delete those now fully
	// settled with no other settling commit in flight; after a failed
	// commit, rewrite their ack records from memory (a later commit may
	// have written a bit the failure cleared).
	var deletions, rewrites []*qchunk
	for _, ch := range g.chunks {
		ch.inflight--
	}
	for _, ch := range g.chunks {
		switch {
		case ch.deleted || slices.Contains(deletions, ch) || slices.Contains(rewrites, ch):
		case ch.live <= 0 && ch.inflight == 0:
			deletions = append(deletions, ch)
		case failed != nil:
			rewrites = append(rewrites, ch)
		}
	}
	c.mu.Unlock()

	if fix != nil || rewrites != nil || deletions != nil {
		// Correct the counters the failed transactions assumed, rewrite
		// the ack records they touched and delete the chunks now settled,
		// with the next group (or at Close): a group of its own for each
		// would add a commit per settling group.
		q.deferFix(fix, append(rewrites, deletions...))
	}
	for _, op := range g.ops {
		if op.failed == nil {
			// Applied, but maybe not durable: the caller retries, and a
			// retried publish is deduplicated.
			op.failed = syncErr
		}
		op.w.err = op.failed
		close(op.w.done)
	}
}

// noteFailedID remembers the ID of an event whose commit failed, for the
// groups accepted meanwhile. Caller holds core.mu.
func (q *badgerQueue) noteFailedID(id string) {
	if q.failedIDs == nil {
		q.failedIDs = make(map[string]error)
	}
	q.failedIDs[id] = storageError("commit", errors.New("an earlier publish of this ID failed"))
	q.failCheckUntil = q.groups
}

func storageError(what string, err error) error {
	if isDiskFull(err) {
		return diskFullError(what, err)
	}
	return fmt.Errorf("h3x: badger queue: %s: %w", what, err)
}

// Dedup records. The IDs a transaction stores go into the same transaction,
// as keys with an empty value and a time to live: keys, so that reading them
// at open touches only the LSM tree, not the value log (which, memory-mapped,
// would otherwise pull most of a recent backlog into the process's RSS).
// Each key holds up to groupKeyMax bytes:
//
//	'g' seq(8) chunk(4) enq(8) id...
//
// where each id is 0x01 and 16 bytes for a canonical lowercase UUID, or 0x02,
// a uvarint length and the bytes. IDs longer than groupIDMax bytes are not
// recorded: their dedup window does not survive a restart.
const (
	groupKeyMax = 1024
	groupIDMax  = 512
)

// groupKeys returns the dedup record keys of the IDs a transaction stores.
func groupKeys(first uint64, enq int64, ids []string) [][]byte {
	var keys [][]byte
	var k []byte
	chunk := uint32(0)
	for _, id := range ids {
		if len(id) > groupIDMax {
			continue
		}
		if k == nil || len(k)+len(id)+1+binary.MaxVarintLen32 > groupKeyMax {
			if k != nil {
				keys = append(keys, k)
			}
			k = make([]byte, 0, groupKeyMax)
			k = append(k, keyGroup)
			k = binary.BigEndian.AppendUint64(k, first)
			k = binary.BigEndian.AppendUint32(k, chunk)
			k = binary.BigEndian.AppendUint64(k, uint64(enq))
			chunk++
		}
		if u, ok := parseCanonicalUUID(id); ok {
			k = append(k, 1)
			k = append(k, u[:]...)
		} else {
			k = append(k, 2)
			k = appendString(k, id)
		}
	}
	if k != nil {
		keys = append(keys, k)
	}
	return keys
}

// parseCanonicalUUID parses a UUID in canonical lowercase text form.
func parseCanonicalUUID(s string) (u [16]byte, ok bool) {
	if len(s) != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
		return u, false
	}
	j := 0
	for i := 0; i < 36; {
		if i == 8 || i == 13 || i == 18 || i == 23 {
			i++
			continue
		}
		hi, ok1 := lowerHex(s[i])
		lo, ok2 := lowerHex(s[i+1])
		if !ok1 || !ok2 {
			return u, false
		}
		u[j] = hi<<4 | lo
		j++
		i += 2
	}
	return u, true
}

func lowerHex(c byte) (byte, bool) {
	v := hexTable[c]
	return v & 0x0f, v != 0
}

// hexTable maps a lowercase hex digit to its value + 0x10, anything else to 0.
var hexTable = func() (t [256]byte) {
	for c := '0'; c <= '9'; c++ {
		t[c] = byte(c-'0') | 0x10
	}
	for c := 'a'; c <= 'f'; c++ {
		t[c] = byte(c-'a'+10) | 0x10
	}
	return t
}()

// decodeGroupKey decodes a dedup record key.
func decodeGroupKey(k []byte) (enq int64, ids []string, ok bool) {
	if len(k) < 21 || k[0] != keyGroup {
		return 0, nil, false
	}
	enq = int64(binary.BigEndian.Uint64(k[13:21]))
	b := k[21:]
	for len(b) > 0 {
		switch b[0] {
		case 1:
			if len(b) < 17 {
				return 0, nil, false
			}
			ids = append(ids, uuid.UUID(b[1:17]).String())
			b = b[17:]
		case 2:
			d := decoder{b: b[1:]}
			s := d.bytes()
			if d.bad {
				return 0, nil, false
			}
			ids = append(ids, string(s))
			b = d.b
		default:
			return 0, nil, false
		}
	}
	return enq, ids, true
}

// movedEvent is a dead letter, read and rewritten by the writer.
type movedEvent struct {
	m     *qmove
	ev    Event
	val   []byte
	size  int
	enq   int64
	chunk *qchunk // its chunk in the dead-letter namespace
}

// readMove reads the event m moves and makes its dead-letter version.
func (q *badgerQueue) readMove(m *qmove) (*movedEvent, error) {
	var old []byte
	err := q.ts.view(func(txn *badger.Txn) error {
		var err error
		old, err = q.readStoredEvent(txn, m.e)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("h3x: badger queue: read event %s to dead-letter it: %w", m.e.id, err)
	}
	ev, _, err := decodeEvent(old)
	if err != nil {
		return nil, fmt.Errorf("h3x: badger queue: event %s: %w", m.e.id, err)
	}
	ev = deadLetterEvent(ev, m.e.ns.name, m.attempts, m.reason)
	enq := time.Now().UnixNano()
	val := encodeEvent(make([]byte, 0, encodedLen(&ev)), &ev, enq)
	// The read-ahead copy gets its own buffer.
	dev, _, _ := decodeEvent(append([]byte(nil), val...))
	dev.Namespace = m.dst.name
	return &movedEvent{m: m, ev: dev, val: val, size: dev.size(), enq: enq,
		chunk: &qchunk{ns: m.dst, first: m.seq, live: 1}}, nil
}

// wantsReadAhead reports whether an event of size landing in ns now would
// go to its read-ahead buffer (so the caller should supply it).
func (c *queueCore) wantsReadAhead(ns *qns, size int) bool {
	return ns.freshDisk == 0 && ns.fresh.len() < readAheadMax && ns.fresh.bytes+size <= readAheadBytes
}

// txnBuilder writes a group's items into as few transactions as Badger
// allows, and starts committing each. Each transaction also carries the
// sequence high-water mark, the counters of the namespaces it touches and
// the dedup record of the events it adds, so whatever commits is
// self-consistent. An item (the writes of one entry: an event, an ack, a
// move) never spans two transactions. Transactions are kept to a third of
// Badger's limits, leaving room for that bookkeeping; should Badger still
// find one too big (ErrTxnTooBig), its last item moves to the next one.
type txnBuilder struct {
	q      *badgerQueue
	g      *group
	hwm    uint64
	dedup  bool
	window time.Duration

	txn        *badger.Txn
	writes     int
	bytes      int64     // estimated, as Badger counts them
	cur        []bwrite  // the current transaction's writes, to replay
	itemStarts []int     // where each of its items starts in cur
	ents       []*qentry // the current item's entries, until its first write takes them
	touched    map[string]*nsCounter
	before     map[string]nsCounter
	fixDelta   map[string]nsCounter // the corrections among the counter changes
	keys       []byte               // arena for keys
}

// bwrite is one write (a Set or, with del, a Delete of key) and/or (with
// cnt) a change of ns's counters.
type bwrite struct {
	key    []byte
	val    []byte
	del    bool
	newID  bool // enqueued events (a chunk): their IDs go in the dedup record
	cnt    bool
	fix    bool      // a correction of the counters: kept if its commit fails (see record)
	ents   []*qentry // the entries of the item the write begins (nil for its other writes)
	rec    *recPut   // the lease record it writes, written again if its commit fails
	recDel uint64    // the lease record it deletes (0: none), deleted again if its commit fails
	// segPut is the chunk pointer it writes, segDrop the one it deletes
	// or replaces (nil: none).
	segPut, segDrop *segRef

	ns           string
	count, bytes int64
}

func (b *txnBuilder) start() {
	if b.txn != nil {
		b.txn.Discard() // failNow started one already
	}
	b.txn = b.q.ts.writeOnly()
	b.writes = 0
	b.bytes = 0
	clear(b.cur) // drop references, the slice is reused
	b.cur = b.cur[:0]
	b.itemStarts = b.itemStarts[:0]
	b.touched = make(map[string]*nsCounter)
	b.before = make(map[string]nsCounter)
	b.fixDelta = nil
}

func (b *txnBuilder) seqKey(kind byte, ns string, seq uint64) []byte {
	n := 1 + binary.MaxVarintLen64 + len(ns) + 8
	if cap(b.keys)-len(b.keys) < n {
		// Grown by doubling from 1 KiB up to 64 KiB blocks: a group of
		// chunks needs few keys. (Keys stay referenced by their
		// transaction until it commits, so blocks are not reused.)
		b.keys = make([]byte, 0, max(min(2*cap(b.keys), 64<<10), 1<<10, n))
	}
	start := len(b.keys)
	b.keys = appendSeqKey(b.keys, kind, ns, seq)
	return b.keys[start:len(b.keys):len(b.keys)]
}

// item starts the writes of the entries ents (none: writes no entry
// depends on).
func (b *txnBuilder) item(ents ...*qentry) {
	b.ents = ents
	if b.writes >= b.q.txnMaxWrites || b.bytes >= b.q.txnMaxBytes {
		b.commit()
		b.start()
	}
	b.itemStarts = append(b.itemStarts, len(b.cur))
}

func (b *txnBuilder) add(w bwrite) {
	w.ents, b.ents = b.ents, nil
	b.cur = append(b.cur, w)
	err := b.apply(w)
	if err == nil {
		return
	}
	if errors.Is(err, badger.ErrTxnTooBig) && len(b.itemStarts) > 1 {
		b.splitLast()
		return
	}
	b.failNow(fmt.Errorf("one event exceeds a Badger transaction: %w", err))
}

// apply adds w to the transaction. Counter changes accumulate in the
// writer's counters and are written at commit.
func (b *txnBuilder) apply(w bwrite) error {
	if w.key != nil {
		b.writes++
		b.bytes += int64(len(w.key)) + 24
		b.bytes += int64(len(w.val)) // every value stays in the LSM tree (inlineThreshold)
		var err error
		if w.del {
			err = b.txn.Delete(w.key)
		} else {
			err = b.txn.Set(w.key, w.val)
		}
		if err != nil {
			return err
		}
	}
	if w.cnt {
		t := b.touched[w.ns]
		if t == nil {
			t = b.q.counters[w.ns]
			if t == nil {
				t = &nsCounter{}
				b.q.counters[w.ns] = t
			}
			b.before[w.ns] = *t
			b.touched[w.ns] = t
		}
		t.count += w.count
		t.bytes += w.bytes
		if w.fix {
			if b.fixDelta == nil {
				b.fixDelta = make(map[string]nsCounter)
			}
			f := b.fixDelta[w.ns]
			f.count += w.count
			f.bytes += w.bytes
			b.fixDelta[w.ns] = f
		}
	}
	return nil
}

// undoCounters puts the writer's counters back as they were before the
// current transaction.
func (b *txnBuilder) undoCounters() {
	for name, v := range b.before {
		*b.q.counters[name] = v
	}
}

// replay rebuilds the current transaction from b.cur.
func (b *txnBuilder) replay() error {
	b.txn.Discard()
	b.undoCounters()
	cur := append([]bwrite(nil), b.cur...)
	starts := append([]int(nil), b.itemStarts...)
	b.start()
	b.cur = append(b.cur, cur...)
	b.itemStarts = append(b.itemStarts, starts...)
	for _, w := range cur {
		if err := b.apply(w); err != nil {
			return err
		}
	}
	return nil
}

// splitLast commits the current transaction without its last item, and
// starts the next one with it.
func (b *txnBuilder) splitLast() {
	at := b.itemStarts[len(b.itemStarts)-1]
	last := append([]bwrite(nil), b.cur[at:]...)
	b.cur = b.cur[:at]
	b.itemStarts = b.itemStarts[:len(b.itemStarts)-1]
	if err := b.replay(); err != nil {
		b.failNow(err)
	} else {
		b.commit()
	}
	b.start()
	b.itemStarts = append(b.itemStarts, 0)
	for _, w := range last {
		b.cur = append(b.cur, w)
		if err := b.apply(w); err != nil {
			b.failNow(fmt.Errorf("one event exceeds a Badger transaction: %w", err))
			return
		}
	}
}

// record returns the record of the current transaction.
func (b *txnBuilder) record() *gtxn {
	t := &gtxn{deltas: make(map[string]nsCounter, len(b.touched))}
	for _, w := range b.cur {
		t.ents = append(t.ents, w.ents...)
		if w.rec != nil {
			t.recs = append(t.recs, *w.rec)
		}
		if w.recDel != 0 {
			t.recDels = append(t.recDels, w.recDel)
		}
		if w.segPut != nil {
			t.segPuts = append(t.segPuts, *w.segPut)
		}
		if w.segDrop != nil {
			t.segDrops = append(t.segDrops, *w.segDrop)
		}
	}
	for name, c := range b.touched {
		// A failed commit's changes are taken back from the writer's
		// counters (complete), except the corrections: those are right in
		// memory whatever the disk holds, and the next commit touching the
		// namespace writes the counters whole.
		before, fix := b.before[name], b.fixDelta[name]
		t.deltas[name] = nsCounter{count: c.count - before.count - fix.count, bytes: c.bytes - before.bytes - fix.bytes}
	}
	return t
}

// failNow records err for the current transaction's items without
// committing it, and starts a new transaction.
func (b *txnBuilder) failNow(err error) {
	t := b.record()
	t.err = err
	b.undoCounters()
	clear(t.deltas)
	if b.fixDelta != nil {
		b.q.deferFix(b.fixDelta, nil) // the corrections undone: again later
	}
	b.g.txns = append(b.g.txns, t)
	b.txn.Discard()
	b.start()
}

// commit adds the high-water mark, counters and dedup record to the
// current transaction and starts committing it. Whatever was added is
// committed (or failed) when it returns, even if it had to be split.
func (b *txnBuilder) commit() {
	txn := b.txn
	if b.writes == 0 && len(b.touched) == 0 {
		return
	}
	err := txn.Set(metaHWM, binary.BigEndian.AppendUint64(nil, b.hwm))
	for name, c := range b.touched {
		if err != nil {
			break
		}
		err = txn.Set(counterKey(name), encodeCounter(*c))
	}
	if err == nil && b.dedup {
		var ids []string
		var first uint64
		var enq int64
		for _, w := range b.cur {
			if !w.newID {
				continue
			}
			for _, e := range w.ents {
				if first == 0 {
					first = e.seq
				}
				ids = append(ids, e.id)
				enq = max(enq, e.enq)
			}
		}
		for _, key := range groupKeys(first, enq, ids) {
			if err = txn.SetEntry(badger.NewEntry(key, nil).WithTTL(b.window + time.Minute)); err != nil {
				break
			}
		}
	}
	if errors.Is(err, badger.ErrTxnTooBig) && len(b.itemStarts) > 1 {
		// The bookkeeping did not fit: move the last item on.
		b.splitLast()
		b.commit()
		return
	}
	if err != nil {
		b.failNow(err)
		return
	}
	t := b.record()
	b.g.txns = append(b.g.txns, t)
	g := b.g
	b.q.statTxns.Add(1)
	g.pending.Add(1)
	b.txn = nil
	if f := b.q.failCommit.Load(); f != nil && (*f)(b.cur) {
		// A test's injected failure: nothing is written.
		txn.Discard()
		t.err = errInjectedCommitFailure
		g.release()
	} else {
		v := b.q.ts.next()
		t.v = v
		txn.CommitAt(v, func(err error) {
			t.err = err
			b.q.ts.done(v)
			g.release()
		})
	}
	b.writes, b.bytes = 0, 0
	clear(b.cur)
	b.cur, b.itemStarts = b.cur[:0], b.itemStarts[:0]
	b.touched, b.before = nil, nil
}

var errInjectedCommitFailure = errors.New("injected commit failure")

// writeLastFixes writes, at Close, the corrections left after the writer
// stopped (chunk deletions, counter corrections), in one last group.
func (q *badgerQueue) writeLastFixes() {
	if !q.fixesPending() {
		return
	}
	q.closing = true
	free, ferr := (*q.diskFree.Load())(q.dir)
	g := q.write(nil, free, ferr)
	<-g.done
	var syncErr error
	if q.fsync && dropsSegments([]*group{g}) {
		// Before a segment its deletions emptied can go.
		if err := q.syncFiles(q.startSegmentSync()); err != nil {
			syncErr = q.noteSyncFailure(err)
		}
	}
	q.complete(g, syncErr)
}

// markClean writes metaClean, at Close, if every correction of the
// counters has been written (writeLastFixes can fail too) and no commit of
// this run failed.
func (q *badgerQueue) markClean() {
	switch {
	case q.fixesPending():
		q.log.Warn("h3x: badger queue: closing with corrections not written; the next open recounts the stored events")
		return
	case q.commitFailed.Load():
		// Badger fails every request of a batch when one fails, some
		// of them written: what a failed commit left is not known.
		q.log.Warn("h3x: badger queue: commits failed in this run; the next open recounts the stored events")
		return
	}
	err := q.ts.update(func(txn *badger.Txn) error {
		item, err := txn.Get(metaHWM)
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil // nothing was ever stored: nothing to recount
		}
		if err != nil {
			return err
		}
		hwm, err := item.ValueCopy(nil)
		if err != nil {
			return err
		}
		return txn.Set(metaClean, hwm)
	})
	if err != nil {
		q.log.Warn("h3x: badger queue: close: the next open recounts the stored events", "err", err)
	}
}

// --- the rest of Queue ----------------------------------------------------------

func (q *badgerQueue) Lease(ctx context.Context, req LeaseRequest) ([]Lease, error) {
	return q.core.Lease(ctx, req)
}

func (q *badgerQueue) Wait(ctx context.Context, namespaces []string) error {
	return q.core.Wait(ctx, namespaces)
}

func (q *badgerQueue) Ack(ctx context.Context, holder string, refs []LeaseRef) ([]SettleResult, error) {
	return q.core.settle(ctx, settleAck, holder, refs, 0, "")
}

func (q *badgerQueue) Nack(ctx context.Context, holder string, refs []LeaseRef, delay time.Duration, reason string) ([]SettleResult, error) {
	return q.core.settle(ctx, settleNack, holder, refs, delay, reason)
}

func (q *badgerQueue) Extend(ctx context.Context, holder string, refs []LeaseRef, d time.Duration) ([]SettleResult, error) {
	return q.core.settle(ctx, settleExtend, holder, refs, d, "")
}

func (q *badgerQueue) Release(ctx context.Context, holder string) error {
	return q.core.Release(ctx, holder)
}

func (q *badgerQueue) Stats(ctx context.Context, namespaces ...string) ([]NamespaceStats, error) {
	return q.core.Stats(ctx, namespaces...)
}

// Close stops the queue: it finishes the writes in progress, stops the
// background work (value-log GC, Badger's compactions) and closes Badger.
// It is safe to call more than once; later calls return what the first did.
func (q *badgerQueue) Close() error {
	q.closeOnce.Do(func() {
		q.core.close()
		q.wmu.Lock()
		q.wstop = true
		q.wmu.Unlock()
		select {
		case q.wsignal <- struct{}{}:
		default:
		}
		<-q.completerDone
		q.writeLastFixes()
		q.markClean()
		// Every record is in Badger, unless a last write failed.
		q.journal.close(!q.fixesPending())
		close(q.gcStop)
		<-q.gcDone
		close(q.trimStop)
		<-q.trimDone
		q.stopBallast()
		q.syncMu.Lock()
		if q.walFile != nil {
			q.walFile.Close()
			q.walFile = nil
		}
		q.syncMu.Unlock()
		err := q.db.Close()
		if err != nil {
			q.closeErr = fmt.Errorf("h3x: close badger queue: %w", err)
		}
		// Badger's Close wrote everything out: the segments no pointer
		// names can go (unless it failed).
		q.segs.close(err == nil)
	})
	return q.closeErr
}

// gcLoop garbage-collects the value log every interval until Close.
func (q *badgerQueue) gcLoop(interval time.Duration) {
	defer close(q.gcDone)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-q.gcStop:
			return
		case <-t.C:
		}
		for range 16 {
			select {
			case <-q.gcStop:
				return
			default:
			}
			if err := q.valueLogGC(); err != nil {
				if !errors.Is(err, badger.ErrNoRewrite) && !errors.Is(err, badger.ErrRejected) {
					q.log.Warn("h3x: badger value-log GC", "err", err)
				}
				break
			}
		}
	}
}

// valueLogGC runs one value-log GC pass. Badger moves the live values of the
// file it collects to the head of the log, then deletes the file, without
// syncing the moved values when SyncWrites is off. With DurabilityFsync an
// iterator is held open meanwhile: Badger defers deleting a value-log file
// until no iterator is open, so the file goes only after the moved values
// have been synced.
func (q *badgerQueue) valueLogGC() error {
	q.syncMu.Lock()
	defer q.syncMu.Unlock()
	if !q.fsync {
		return q.db.RunValueLogGC(0.5)
	}
	txn := q.ts.read()
	defer q.ts.end(txn)
	pin := txn.NewIterator(badger.IteratorOptions{Prefix: metaHWM})
	err := q.db.RunValueLogGC(0.5)
	if err == nil {
		if serr := q.syncFilesLocked(); serr != nil {
			q.log.Error("h3x: badger queue: sync after value-log GC", "err", serr)
		}
	}
	pin.Close() // may delete the collected file, now that its values are synced
	return err
}

// --- durability ----------------------------------------------------------------------

// With DurabilityFsync, Badger runs with SyncWrites off and the completer
// syncs once per run of commits (with SyncWrites on, every commit would sync
// by itself, one after the other). db.Sync syncs the active memtable's
// write-ahead log and the active value-log file; a file that Badger rotated
// away from since the last sync (a full memtable waiting to be flushed, a
// full value-log file) may still hold unsynced commits, so syncFiles syncs
// those too, and the directory when new files appeared.

// startSegmentSync starts the fdatasync of the segments written since the
// last, and returns its outcome's channel (nil: none to sync). The caller
// receives from it (syncFiles does).
func (q *badgerQueue) startSegmentSync() <-chan error {
	segs := q.segs.dirtyFiles()
	if len(segs) == 0 {
		return nil
	}
	// A goroutine of its own, started before the completer waits for the
	// commits: one started just before the completer's own fdatasync
	// waited for a processor about as long as the fdatasync took (about
	// 0.3 ms with 256 publishers), the completer holding its processor
	// through the system call.
	done := make(chan error, 1)
	go func() { done <- q.segs.syncFiles(segs) }()
	return done
}

// syncFiles syncs Badger's files (see syncFilesLocked) and joins segSync,
// the segments' sync from startSegmentSync (nil: none): two device flushes
// that overlap cost about one.
func (q *badgerQueue) syncFiles(segSync <-chan error) error {
	q.syncMu.Lock()
	err := q.syncFilesLocked()
	q.syncMu.Unlock()
	if segSync != nil {
		err = errors.Join(err, <-segSync)
	}
	return err
}

func (q *badgerQueue) syncFilesLocked() error {
	if fileExists(memFilePath(q.bdir, q.memFid)) && !fileExists(memFilePath(q.bdir, q.memFid+1)) && !fileExists(vlogFilePath(q.vdir, q.vlogFid+1)) {
		// Nothing rotated since the last sync: every commit to sync is in
		// the active memtable's write-ahead log, the one file to sync.
		// (memFid still there and no memFid+1 means no newer memtable
		// was started since, even one flushed and deleted since: Badger
		// flushes memtables in order.)
		// (db.Sync would sync the value log as well, which stays empty:
		// values are kept below ValueThreshold, see inlineThreshold; an
		// fsync of a clean file still costs a device cache flush.)
		return q.syncActiveWAL()
	}
	if err := q.db.Sync(); err != nil {
		return err
	}
	// Something rotated: sync every file from the last active ones on.
	mem, err := logFiles(q.bdir, ".mem")
	if err != nil {
		return err
	}
	vlog, err := logFiles(q.vdir, ".vlog")
	if err != nil {
		return err
	}
	newMem, newVlog := q.memFid, q.vlogFid
	for _, fid := range mem {
		if fid >= q.memFid {
			if err := syncPathFn(memFilePath(q.bdir, fid)); err != nil {
				return err
			}
			newMem = fid
		}
	}
	for _, fid := range vlog {
		if fid >= q.vlogFid {
			if err := syncPathFn(vlogFilePath(q.vdir, fid)); err != nil {
				return err
			}
			newVlog = fid
		}
	}
	if err := syncPathFn(q.bdir); err != nil {
		return err
	}
	if q.vdir != q.bdir {
		if err := syncPathFn(q.vdir); err != nil {
			return err
		}
	}
	// Only now: a failed sync leaves them, so the next sync is a full one.
	q.memFid, q.vlogFid = newMem, newVlog
	return nil
}

// syncActiveWAL fdatasyncs the active memtable's write-ahead log file
// (memFid), kept open between syncs. Caller holds syncMu.
func (q *badgerQueue) syncActiveWAL() error {
	if q.walFile == nil || q.walFid != q.memFid {
		if q.walFile != nil {
			q.walFile.Close()
			q.walFile = nil
		}
		f, err := os.OpenFile(memFilePath(q.bdir, q.memFid), os.O_RDWR, 0)
		if err != nil {
			// Not there (yet): the full sync.
			return q.db.Sync()
		}
		q.walFile, q.walFid = f, q.memFid
	}
	return fdatasyncFn(q.walFile)
}

// The sync primitives syncFilesLocked and syncActiveWAL call: variables so
// that tests can inject errors (queue_badger_durability_test.go).
var (
	syncPathFn  = fsyncPath
	fdatasyncFn = fdatasync
)

// Badger's file names (memtable.go, value.go).
func memFilePath(dir string, fid int) string { return filepath.Join(dir, fmt.Sprintf("%05d.mem", fid)) }
func vlogFilePath(dir string, fid int) string {
	return filepath.Join(dir, fmt.Sprintf("%06d.vlog", fid))
}

// logFiles returns the ids of dir's files with suffix ext, in order.
func logFiles(dir, ext string) ([]int, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var fids []int
	for _, e := range entries {
		name := e.Name()
		if !strings.HasSuffix(name, ext) {
			continue
		}
		if fid, err := strconv.Atoi(strings.TrimSuffix(name, ext)); err == nil {
			fids = append(fids, fid)
		}
	}
	slices.Sort(fids)
	return fids, nil
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// fsyncPath syncs the file or directory at path; one that is gone (a
// flushed memtable, a collected value-log file) needs no sync.
func fsyncPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// --- errors ----------------------------------------------------------------------

// diskFullRetryAfter is the RetryAfter of a disk-full refusal.
const diskFullRetryAfter = 5 * time.Second

func diskFullError(what string, cause error) *Error {
	return &Error{
		Code:       CodeInternal,
		Message:    "disk full: " + what + " refused: " + cause.Error(),
		RetryAfter: diskFullRetryAfter,
		cause:      cause,
	}
}

func isDiskFull(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) ||
		strings.Contains(err.Error(), "no space left on device")
}

func isLockError(err error) bool {
	return errors.Is(err, syscall.EWOULDBLOCK) || errors.Is(err, syscall.EAGAIN) ||
		strings.Contains(err.Error(), "Cannot acquire directory lock")
}
