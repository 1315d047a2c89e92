package h3x

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/dgraph-io/badger/v4"
)

// OpenBadgerQueue opens (creating it if needed) the durable queue stored in
// the directory dir, with Badger. It is H3X's default queue.
//
// Defaults (the zero QueueOptions): DurabilityFsync, a 2-minute dedup
// window, dead-lettering after 10 attempts, no per-namespace limits, no
// logging. Badger is tuned for embedding: a process holding a backlog of a
// million 256-byte events stays around 100 MB of anonymous memory (see
// badgerOptions); opts.Badger can change any Badger option afterwards.
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
// publish order; leases do not survive (they end as if released). Attempt
// counts survive: a lease that ends without an ack (nack, expiry, release)
// records the event's attempt count along with it, so only the deliveries in
// progress at a crash are not counted. The dedup window survives too (the
// IDs of each commit are stored with a time to live).
//
// Settling (Ack, Nack, Extend) addresses events by ID. Events delivered
// since the queue was opened are found in memory; the backlog is not (it is
// not held in memory), so settling an event that has not been delivered since
// the queue was opened — a delivery made before a restart — is refused: as
// SettleStale if its ID was published within the dedup window, SettleUnknown
// otherwise. The event is simply delivered again.
//
// Only one process can open dir at a time; a second gets an error saying
// so. When the disk is nearly full (less free space than Badger needs for its
// own flushes and compactions), Enqueue fails with an *Error of CodeInternal
// ("disk full"), retryable, and nothing already acknowledged is affected.
func OpenBadgerQueue(dir string, opts QueueOptions) (Queue, error) {
	opts = normalizeQueueOptions(opts)
	bo := badgerOptions(dir, opts)
	if opts.Badger != nil {
		opts.Badger(&bo)
	}
	db, err := badger.Open(bo)
	if err != nil {
		if isLockError(err) {
			return nil, fmt.Errorf("h3x: open badger queue: directory %s is in use by another process: %w", dir, err)
		}
		if isDiskFull(err) {
			return nil, diskFullError("open badger queue", err)
		}
		return nil, fmt.Errorf("h3x: open badger queue in %s: %w", dir, err)
	}
	q := &badgerQueue{
		db:         db,
		dir:        dir,
		log:        opts.Logger,
		window:     opts.DedupWindow,
		counters:   make(map[string]*nsCounter),
		wsignal:    make(chan struct{}, 1),
		writerDone: make(chan struct{}),
		gcStop:     make(chan struct{}),
		gcDone:     make(chan struct{}),
		reserve:    uint64(2*bo.ValueLogFileSize + 4*bo.MemTableSize + 32<<20),
		diskFree:   diskFree,
	}
	q.core = newQueueCore(opts, (*badgerStore)(q), false)
	if err := q.load(); err != nil {
		db.Close()
		return nil, err
	}
	go q.writer()
	go q.gcLoop(valueLogGCInterval)
	return q, nil
}

var _ Queue = (*badgerQueue)(nil)

// badgerOptions are H3X's Badger defaults, tuned for a small memory footprint:
// event values live in the value log (ValueThreshold 64 bytes), so the LSM
// tree holds only small keys and its compactions stay cheap; small
// memtables, caches and tables. Measured: about 50 MB of anonymous memory
// after writing a million 256-byte events, against ~600 MB with Badger's
// defaults. (The value log is memory-mapped, so the pages the process wrote
// or read also count in its RSS, as file-backed, reclaimable page cache.)
func badgerOptions(dir string, opts QueueOptions) badger.Options {
	bo := badger.DefaultOptions(dir)
	bo.Logger = badgerLogger{opts.Logger}
	bo.SyncWrites = opts.Durability == DurabilityFsync
	bo.MemTableSize = 8 << 20
	bo.NumMemtables = 2
	bo.BlockCacheSize = 16 << 20
	bo.IndexCacheSize = 8 << 20
	bo.ValueLogFileSize = 64 << 20
	bo.BaseTableSize = 2 << 20
	bo.NumCompactors = 2
	bo.ValueThreshold = 64
	bo.MetricsEnabled = false
	bo.DetectConflicts = false // one writer goroutine does every write
	return bo
}

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
//	'e' ns seq   an event (value: encodeEvent)
//	'a' ns seq   its attempt count, once a lease of it ended without an ack
//	'c' ns       the namespace's event count and bytes (written with every change)
//	'g' seq      the IDs of one commit, for dedup after a restart (with a TTL)
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
// delivered) events start on disk (diskNext) and reads ahead from there, so
// the tombstones of acked events, all below that cursor, are never walked.
type badgerQueue struct {
	core   *queueCore
	db     *badger.DB
	dir    string
	log    *slog.Logger
	window time.Duration

	// counters are the namespaces' counts as the writer has written them.
	// Writer-owned (and load, before the writer starts).
	counters map[string]*nsCounter

	wmu        sync.Mutex
	wops       []*wop
	wstop      bool
	wsignal    chan struct{}
	writerDone chan struct{}

	gcStop chan struct{}
	gcDone chan struct{}

	reserve  uint64
	diskFree func(dir string) (uint64, error)

	closeOnce sync.Once
	closeErr  error
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

	w      *writeWait
	failed error
}

// --- keys and values -----------------------------------------------------------

const (
	keyEvent    = 'e'
	keyAttempts = 'a'
	keyCounter  = 'c'
	keyGroup    = 'g'
	keyMeta     = 'm'

	storageFormat = 1
)

var (
	metaHWM    = []byte{keyMeta, 'h', 'w', 'm'}
	metaFormat = []byte{keyMeta, 'f', 'o', 'r', 'm', 'a', 't'}
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

// encodeEvent encodes ev (all but its namespace, which is in the key) with
// its enqueue time.
func encodeEvent(b []byte, ev *Event, enq int64) []byte {
	b = append(b, storageFormat)
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

// decodeEvent decodes a value written by encodeEvent. The event's strings and
// Data share b, which the caller must not change or reuse afterwards.
func decodeEvent(b []byte) (ev Event, enq int64, err error) {
	d := decoder{b: b}
	if d.byte() != storageFormat {
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
func (q *badgerQueue) load() error {
	c := q.core
	return q.db.Update(func(txn *badger.Txn) error {
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
			if len(v) != 1 || v[0] != storageFormat {
				return fmt.Errorf("h3x: badger queue in %s: unknown storage format %v", q.dir, v)
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
			} else {
				ns.freshDisk = 0
			}
			it.Close()
		}

		// IDs published within the dedup window.
		if c.dedup != nil {
			now := time.Now().UnixNano()
			it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyGroup}})
			defer it.Close()
			for it.Rewind(); it.Valid(); it.Next() {
				v, err := it.Item().ValueCopy(nil)
				if err != nil {
					return fmt.Errorf("h3x: badger queue: read dedup records: %w", err)
				}
				d := decoder{b: v}
				enq := int64(d.uvarint())
				n := d.uvarint()
				if now-enq >= int64(q.window) {
					continue
				}
				for range n {
					id := d.string()
					if d.bad {
						break
					}
					c.dedup.add(id, enq)
				}
			}
		}
		return nil
	})
}

// --- the store -----------------------------------------------------------------

// badgerStore is the queueStore of a badgerQueue.
type badgerStore badgerQueue

// refill reads up to n fresh events of ns from disk into its read-ahead
// buffer, starting at its cursor. It reads only keys of events already
// applied to the state (up to core.applied): later ones are still being
// committed and land by themselves.
func (s *badgerStore) refill(ns *qns, n int) error {
	q := (*badgerQueue)(s)
	c := q.core
	txn := q.db.NewTransaction(false)
	defer txn.Discard()
	it := txn.NewIterator(badger.IteratorOptions{Prefix: nsPrefix(keyEvent, ns.name)})
	defer it.Close()
	at := txn.NewIterator(badger.IteratorOptions{Prefix: nsPrefix(keyAttempts, ns.name)})
	defer at.Close()

	start := seqKey(keyEvent, ns.name, ns.diskNext)
	at.Seek(seqKey(keyAttempts, ns.name, ns.diskNext))
	loaded := 0
	exhausted := true
	for it.Seek(start); it.Valid(); it.Next() {
		item := it.Item()
		seq := keySeq(item.Key())
		if seq > c.applied {
			break
		}
		if loaded >= n || (loaded > 0 && ns.fresh.bytes >= readAheadBytes) || ns.fresh.len() >= 4*readAheadMax {
			exhausted = false
			break
		}
		v, err := item.ValueCopy(nil)
		if err != nil {
			return fmt.Errorf("h3x: badger queue: read %s: %w", ns.name, err)
		}
		ev, enq, err := decodeEvent(v)
		if err != nil {
			return fmt.Errorf("h3x: badger queue: event %d of %q: %w", seq, ns.name, err)
		}
		ev.Namespace = ns.name
		e := &qentry{id: ev.ID, ns: ns, seq: seq, size: ev.size(), enq: enq, ev: &ev}
		for at.Valid() && keySeq(at.Item().Key()) < seq {
			at.Next()
		}
		if at.Valid() && keySeq(at.Item().Key()) == seq {
			if err := at.Item().Value(func(v []byte) error {
				a, k := binary.Uvarint(v)
				if k <= 0 {
					return errCorrupt
				}
				e.attempt = int(a)
				return nil
			}); err != nil {
				return fmt.Errorf("h3x: badger queue: attempts of event %d of %q: %w", seq, ns.name, err)
			}
			e.attemptsStored = true
		}
		ns.fresh.push(e)
		ns.diskNext = seq + 1
		ns.freshDisk--
		loaded++
	}
	if exhausted {
		ns.freshDisk = 0
		ns.diskNext = max(ns.diskNext, c.applied+1)
	} else if ns.freshDisk < 0 {
		ns.freshDisk = 0
	}
	return nil
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
	var ev Event
	err := q.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(seqKey(keyEvent, e.ns.name, e.seq))
		if err != nil {
			return err
		}
		v, err := item.ValueCopy(nil)
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

// submit hands the effects of a state change to the writer.
func (s *badgerStore) submit(fx *effects) *writeWait {
	q := (*badgerQueue)(s)
	for _, a := range fx.attempts {
		a.e.attemptsStored = true
	}
	op := &wop{fx: fx, w: &writeWait{done: make(chan struct{})}}
	if err := q.push(op); err != nil {
		// Closed: the core refuses calls once closed, so only expiry
		// can get here; nothing is lost (attempt counts, at worst).
		return nil
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

// --- Enqueue ---------------------------------------------------------------------

func (q *badgerQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if len(events) == 0 {
		return []PublishResult{}, nil
	}
	now := time.Now()
	enq := now.UnixNano()
	op := &wop{
		evs:   make([]Event, len(events)),
		sizes: make([]int, len(events)),
		vals:  make([][]byte, len(events)),
		enq:   enq,
		res:   make([]PublishResult, len(events)),
		w:     &writeWait{done: make(chan struct{})},
	}
	total := 0
	for i := range events {
		op.evs[i] = events[i]
		op.sizes[i] = prepareEvent(&op.evs[i], now)
		total += encodedLen(&op.evs[i])
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

// --- the writer --------------------------------------------------------------------

func (q *badgerQueue) writer() {
	defer close(q.writerDone)
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
		ops, q.wops = q.wops, ops[:0]
		q.wmu.Unlock()
		q.process(ops)
		clear(ops)
	}
}

// maxTxnWrites bounds the writes of one transaction, well below Badger's own
// limit (ErrTxnTooBig, which is handled anyway).
const maxTxnWrites = 4096

// process commits one group of requests and answers them.
func (q *badgerQueue) process(ops []*wop) {
	c := q.core

	// 1. Decide: dedup, limits and sequence numbers of the new events;
	// sequence numbers of the dead-letter moves.
	c.mu.Lock()
	adds := false
	for _, op := range ops {
		if op.evs != nil {
			op.ents = c.accept(op.evs, op.sizes, op.enq, op.res, nil)
			adds = adds || len(op.ents) > 0
		}
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

	// 2. Refuse to write when the disk is (nearly) full.
	var diskErr error
	if free, err := q.diskFree(q.dir); err == nil {
		if adds && free < q.reserve {
			diskErr = diskFullError("enqueue", fmt.Errorf("%d bytes free in %s, %d needed in reserve", free, q.dir, q.reserve))
		} else if free < q.reserve/2 {
			diskErr = diskFullError("write", fmt.Errorf("%d bytes free in %s", free, q.dir))
		}
	}

	// 3. Write.
	b := txnBuilder{q: q, hwm: hwm, dedup: c.dedup != nil, window: q.window}
	var moved []*movedEvent
	if diskErr == nil {
		b.start()
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
				b.item(e)
				b.add(bwrite{key: seqKey(keyEvent, e.ns.name, e.seq), val: op.vals[i], newID: true})
				b.count(e.ns.name, 1, e.size)
			}
		}
		for _, op := range ops {
			if op.fx == nil {
				continue
			}
			for _, e := range op.fx.deletes {
				b.item(e)
				b.add(bwrite{key: seqKey(keyEvent, e.ns.name, e.seq), del: true})
				if e.attemptsStored {
					b.add(bwrite{key: seqKey(keyAttempts, e.ns.name, e.seq), del: true})
				}
				b.count(e.ns.name, -1, -e.size)
			}
			for _, a := range op.fx.attempts {
				b.item(nil)
				b.add(bwrite{key: seqKey(keyAttempts, a.e.ns.name, a.e.seq), val: binary.AppendUvarint(nil, uint64(a.attempt))})
			}
			for _, m := range op.fx.moves {
				mv, err := q.readMove(m)
				if err != nil {
					q.log.Error("h3x: badger queue: dead-lettering failed; the event stays", "id", m.e.id, "err", err)
					continue
				}
				moved = append(moved, mv)
				b.item(m.e)
				b.add(bwrite{key: seqKey(keyEvent, m.dst.name, m.seq), val: mv.val})
				b.add(bwrite{key: seqKey(keyEvent, m.e.ns.name, m.e.seq), del: true})
				if m.e.attemptsStored {
					b.add(bwrite{key: seqKey(keyAttempts, m.e.ns.name, m.e.seq), del: true})
				}
				b.count(m.e.ns.name, -1, -m.e.size)
				b.count(m.dst.name, 1, mv.size)
			}
		}
		b.commit()
	}
	failed := func(e *qentry) error {
		if diskErr != nil {
			return diskErr
		}
		if b.failed[e] {
			return b.err
		}
		return nil
	}

	// 4. Apply what became durable; revert what did not.
	c.mu.Lock()
	mi := 0
	for _, op := range ops {
		var opErr error
		if op.evs != nil {
			k := 0
			for i := range op.evs {
				if op.res[i].Status != PublishStored {
					continue
				}
				e := op.ents[k]
				k++
				if err := failed(e); err != nil {
					opErr = err
					c.unaccept(e)
					continue
				}
				var ev *Event
				if c.wantsReadAhead(e.ns, e.size) {
					if dev, _, derr := decodeEvent(op.vals[i]); derr == nil {
						dev.Namespace = e.ns.name
						ev = &dev
					}
				}
				c.land(e, ev, true)
			}
		}
		if op.fx != nil {
			for _, e := range op.fx.deletes {
				if err := failed(e); err != nil {
					opErr = err
					c.restore(e, false)
				}
			}
			for _, m := range op.fx.moves {
				if mi < len(moved) && moved[mi].m == m {
					mv := moved[mi]
					mi++
					if err := failed(m.e); err == nil {
						e := &qentry{id: m.e.id, ns: m.dst, seq: m.seq, size: mv.size, enq: mv.enq}
						var ev *Event
						if c.wantsReadAhead(m.dst, mv.size) {
							ev = &mv.ev
						}
						c.land(e, ev, false)
						continue
					} else {
						opErr = err
					}
				}
				c.restore(m.e, true)
			}
		}
		op.failed = opErr
	}
	c.mu.Unlock()

	// 5. Answer.
	for _, op := range ops {
		op.w.err = op.failed
		close(op.w.done)
	}
}

// encodeGroup encodes the dedup record of a transaction: a time and IDs.
func encodeGroup(enq int64, ids []string) []byte {
	n := 2 * binary.MaxVarintLen64
	for _, id := range ids {
		n += len(id) + binary.MaxVarintLen32
	}
	b := make([]byte, 0, n)
	b = binary.AppendUvarint(b, uint64(enq))
	b = binary.AppendUvarint(b, uint64(len(ids)))
	for _, id := range ids {
		b = appendString(b, id)
	}
	return b
}

// movedEvent is a dead letter, read and rewritten by the writer.
type movedEvent struct {
	m    *qmove
	ev   Event
	val  []byte
	size int
	enq  int64
}

// readMove reads the event m moves and makes its dead-letter version.
func (q *badgerQueue) readMove(m *qmove) (*movedEvent, error) {
	var old []byte
	err := q.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(seqKey(keyEvent, m.e.ns.name, m.e.seq))
		if err != nil {
			return err
		}
		old, err = item.ValueCopy(nil)
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
	return &movedEvent{m: m, ev: dev, val: val, size: dev.size(), enq: enq}, nil
}

// wantsReadAhead reports whether an event of size landing in ns now would
// go to its read-ahead buffer (so the caller should supply it).
func (c *queueCore) wantsReadAhead(ns *qns, size int) bool {
	return ns.freshDisk == 0 && ns.fresh.len() < readAheadMax && ns.fresh.bytes+size <= readAheadBytes
}

// txnBuilder writes a group's items into as few transactions as Badger
// allows. Each transaction also carries the sequence high-water mark, the
// counters of the namespaces it touches and the dedup record of the events
// it adds, so whatever commits is self-consistent. An item (one event, one
// ack, one move: the writes of one entry) never spans two transactions.
type txnBuilder struct {
	q      *badgerQueue
	hwm    uint64
	dedup  bool
	window time.Duration

	txn     *badger.Txn
	writes  int
	cur     []bwrite // the current transaction's writes, to replay on ErrTxnTooBig
	curItem int      // where the current item starts in cur
	ent     *qentry  // the current item's entry
	touched map[string]*nsCounter
	before  map[string]nsCounter

	failed map[*qentry]bool // items not durable
	err    error
}

type bwrite struct {
	key   []byte
	val   []byte
	del   bool
	newID bool // an enqueued event: its ID goes in the dedup record
	ent   *qentry
	cnt   *counterDelta
}

type counterDelta struct {
	ns    string
	count int64
	bytes int64
}

func (b *txnBuilder) start() {
	b.txn = b.q.db.NewTransaction(true)
	b.writes = 0
	b.cur = b.cur[:0]
	b.curItem = 0
	b.touched = make(map[string]*nsCounter)
	b.before = make(map[string]nsCounter)
}

func (b *txnBuilder) markFailed(e *qentry) {
	if e == nil {
		return
	}
	if b.failed == nil {
		b.failed = make(map[*qentry]bool)
	}
	b.failed[e] = true
}

// item starts the writes of entry e (nil: writes nothing depends on).
func (b *txnBuilder) item(e *qentry) {
	b.ent = e
	if b.err != nil {
		b.markFailed(e)
		return
	}
	if b.writes >= maxTxnWrites {
		b.commit()
		if b.err != nil {
			b.markFailed(e)
			return
		}
		b.start()
	}
	b.curItem = len(b.cur)
}

func (b *txnBuilder) count(ns string, n, bytes int) {
	b.add(bwrite{cnt: &counterDelta{ns: ns, count: int64(n), bytes: int64(bytes)}})
}

func (b *txnBuilder) add(w bwrite) {
	if b.err != nil {
		b.markFailed(b.ent)
		return
	}
	w.ent = b.ent
	b.cur = append(b.cur, w)
	err := b.apply(w)
	if err == nil {
		return
	}
	if !errors.Is(err, badger.ErrTxnTooBig) || b.curItem == 0 {
		b.fail(err)
		return
	}
	// Too big: commit the items before this one, and start this one
	// afresh in a new transaction.
	item := append([]bwrite(nil), b.cur[b.curItem:]...)
	b.cur = b.cur[:b.curItem]
	b.replay()
	b.commit()
	if b.err != nil {
		b.markFailed(b.ent)
		return
	}
	b.start()
	for _, w := range item {
		b.cur = append(b.cur, w)
		if err := b.apply(w); err != nil {
			b.fail(fmt.Errorf("one event exceeds a Badger transaction: %w", err))
			return
		}
	}
}

// apply adds w to the transaction. Counter deltas accumulate in the
// writer's counters and are written at commit.
func (b *txnBuilder) apply(w bwrite) error {
	if w.cnt != nil {
		t := b.touched[w.cnt.ns]
		if t == nil {
			t = b.q.counters[w.cnt.ns]
			if t == nil {
				t = &nsCounter{}
				b.q.counters[w.cnt.ns] = t
			}
			b.before[w.cnt.ns] = *t
			b.touched[w.cnt.ns] = t
		}
		t.count += w.cnt.count
		t.bytes += w.cnt.bytes
		return nil
	}
	b.writes++
	if w.del {
		return b.txn.Delete(w.key)
	}
	return b.txn.Set(w.key, w.val)
}

// undoCounters puts the writer's counters back as they were before the
// current transaction.
func (b *txnBuilder) undoCounters() {
	for name, v := range b.before {
		*b.q.counters[name] = v
	}
}

// replay rebuilds the current transaction from b.cur.
func (b *txnBuilder) replay() {
	b.txn.Discard()
	b.undoCounters()
	cur := b.cur
	b.start()
	b.cur = cur
	for _, w := range cur {
		if err := b.apply(w); err != nil {
			b.fail(err)
			return
		}
	}
}

// commit adds the high-water mark, counters and dedup record to the
// current transaction and commits it.
func (b *txnBuilder) commit() {
	if b.err != nil || b.txn == nil {
		return
	}
	txn := b.txn
	b.txn = nil
	if b.writes == 0 && len(b.touched) == 0 {
		txn.Discard()
		return
	}
	err := txn.Set(metaHWM, binary.BigEndian.AppendUint64(nil, b.hwm))
	for name, t := range b.touched {
		if err != nil {
			break
		}
		v := binary.AppendUvarint(nil, uint64(max(t.count, 0)))
		v = binary.AppendUvarint(v, uint64(max(t.bytes, 0)))
		err = txn.Set(counterKey(name), v)
	}
	if err == nil && b.dedup {
		var ids []string
		var first uint64
		var enq int64
		for _, w := range b.cur {
			if w.newID {
				if first == 0 {
					first = w.ent.seq
				}
				ids = append(ids, w.ent.id)
				enq = max(enq, w.ent.enq)
			}
		}
		if len(ids) > 0 {
			key := binary.BigEndian.AppendUint64([]byte{keyGroup}, first)
			err = txn.SetEntry(badger.NewEntry(key, encodeGroup(enq, ids)).WithTTL(b.window + time.Minute))
		}
	}
	if err == nil {
		err = txn.Commit()
	} else {
		txn.Discard()
	}
	if err != nil {
		b.undoCounters()
		b.fail(err)
	}
}

// fail fails the current transaction's items and every later one.
func (b *txnBuilder) fail(err error) {
	if b.err == nil {
		if isDiskFull(err) {
			b.err = diskFullError("commit", err)
		} else {
			b.err = fmt.Errorf("h3x: badger queue: commit: %w", err)
		}
	}
	if b.txn != nil {
		b.txn.Discard()
		b.txn = nil
	}
	for _, w := range b.cur {
		b.markFailed(w.ent)
	}
	b.markFailed(b.ent)
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
		<-q.writerDone
		close(q.gcStop)
		<-q.gcDone
		if err := q.db.Close(); err != nil {
			q.closeErr = fmt.Errorf("h3x: close badger queue: %w", err)
		}
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
			if err := q.db.RunValueLogGC(0.5); err != nil {
				if !errors.Is(err, badger.ErrNoRewrite) && !errors.Is(err, badger.ErrRejected) {
					q.log.Warn("h3x: badger value-log GC", "err", err)
				}
				break
			}
		}
	}
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
