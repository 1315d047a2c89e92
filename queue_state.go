package h3x

import (
	"cmp"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"log/slog"
	"math"
	mathrand "math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// This file holds the delivery state machine shared by the built-in queues
// (NewMemoryQueue and OpenBadgerQueue): leases, attempt counts, nack delays,
// lease expiry, dead-lettering, per-namespace limits, deduplication, Wait and
// Stats. Both queues run exactly this code, so their semantics cannot
// diverge; they differ only in the queueStore behind it, which keeps the
// events (a map in memory, or Badger on disk).
//
// Every event the core knows is a qentry in one state:
//
//	fresh    never leased since the queue was opened; in its namespace's
//	         fresh FIFO (or, for Badger, possibly still only on disk)
//	ready    leased before and deliverable again; in its namespace's ready
//	         heap, ordered by sequence number, so redeliveries go out in
//	         publish order and ahead of fresh events
//	leased   held by a holder until its deadline; in the timer heap
//	delayed  nacked with a delay; in the timer heap until it passes
//	gone     acked or dead-lettered
//
// One time.Timer (armed for the earliest deadline in the timer heap) drives
// expiry and delays; every call also catches up with the clock first, so a
// late timer never makes a call see stale state.

type entryState uint8

const (
	stFresh entryState = iota
	stReady
	stLeased
	stDelayed
	stGone
)

// qentry is one stored event as the state machine sees it.
type qentry struct {
	id      string
	ns      *qns
	seq     uint64 // storage sequence number: publish order within ns
	size    int    // Event.size(), for byte limits and MaxBytes
	enq     int64  // enqueue time, Unix nanoseconds (OldestReady)
	attempt int    // deliveries so far (since the last open, or persisted)
	// givenBack: the latest delivery was given back unseen (uncount), so
	// none is settleable by its attempt number until the next: the number
	// given back is the previous delivery's again, and that delivery was
	// superseded.
	givenBack bool
	state     entryState
	idx       int   // index in the heap holding the entry (timers or ns.ready), or its place in timers' FIFO (see deadlines)
	when      int64 // leased: deadline; delayed: ready time (Unix nanoseconds)
	reason    string

	holder       *qholder
	hprev, hnext *qentry   // the holder's list of leases
	idNext       *qentry   // other entries with the same ID (only when dedup is off)
	dkey         dedupKey  // the ID's dedup fingerprint, if computed
	dgen         *dedupGen // the dedup generation that holds it, if known

	// ev is the event itself. The memory queue keeps it for the entry's
	// lifetime; the Badger queue only while a fresh entry waits in the
	// read-ahead buffer, and drops it when it hands the event out.
	ev *Event

	// rec is the lease record that lists the entry's latest delivery
	// (Badger), or nil.
	rec *leaseRec

	// chunk is the stored chunk holding the event (Badger), or nil.
	chunk *qchunk
}

// leaseRec is a stored record of one Lease call's deliveries (Badger): what
// makes attempt counts and settlements survive a restart. n counts the
// entries whose latest delivery it lists; at zero the record is deleted.
type leaseRec struct {
	seq uint64
	n   int
	// put: a write of it was handed to Badger (it may be on disk, so it
	// needs a deletion); set by the writer, under mu, when n > 0.
	put bool
}

// qholder is a lease holder and its leases, as an intrusive list.
type qholder struct {
	name string
	head *qentry
	n    int
}

// qns is one namespace.
type qns struct {
	name string
	dlq  bool // a dead-letter namespace: its events are never dead-lettered again

	fresh     entryFIFO           // fresh entries in sequence order (for Badger, the read-ahead buffer)
	freshDisk int                 // Badger: fresh events not yet read into fresh
	diskNext  uint64              // Badger: where the next read-ahead starts
	diskChunk uint64              // Badger: the first sequence number of the chunk holding diskNext (or diskNext)
	chunks    map[uint64]*qchunk  // Badger: the chunks that entries in memory refer to, by first sequence number
	movedOut  map[uint64][]uint64 // Badger: dead-lettered events of chunks not in chunks, by chunk (read at open)
	ready     entryHeap           // leased before and ready again, by sequence number

	leased, delayed int
	preloaded       map[uint64]bool // Badger: sequence numbers of delivered-before-open entries, skipped by the read-ahead
	count           int             // stored events (fresh, ready, leased, delayed)
	bytes           int64           // their sizes
	deadLettered    int             // moved to the dead-letter namespace since open
	arriving        int             // dead letters moving in: counted, not landed yet (Stats waits for them)
	expired         int             // leases ended by their deadline since open
	known           bool            // has held events: listed by Stats()
	served          uint64          // the Lease turn (queueCore.served) in which it last gave an event
	warnedFull      bool            // a dead-letter namespace: logged that it is full
}

func (ns *qns) hasReady() bool {
	return ns.ready.len() > 0 || ns.fresh.len() > 0 || ns.freshDisk > 0
}

type qwaiter struct {
	ch    chan struct{}
	fired bool
}

// qmove is a dead-letter move for the store to carry out.
type qmove struct {
	e        *qentry // the entry leaving its namespace (state gone)
	dst      *qns
	attempts int
	reason   string
	size     int    // the size counted in dst
	seq      uint64 // Badger: the sequence number in dst, assigned by the writer
}

// recEntry is one delivery in a lease record.
type recEntry struct {
	ns      string
	seq     uint64
	id      string
	size    int
	enq     int64
	attempt int
}

// recPut is a lease record to store.
type recPut struct {
	rec     *leaseRec
	entries []recEntry
	enc     []byte // the record encoded, if the lease journal did it already
}

// effects are the storage writes a state change needs.
type effects struct {
	deletes    []*qentry // acked entries
	moves      []*qmove
	recPuts    []recPut // lease records to store (Badger)
	recDeletes []uint64 // lease records to delete (Badger)
	// journal: the records are a Lease call's, which the Badger queue may
	// append to its lease journal rather than have Lease wait for them.
	journal bool
}

func (fx *effects) empty() bool {
	return len(fx.deletes) == 0 && len(fx.moves) == 0 && len(fx.recPuts) == 0 && len(fx.recDeletes) == 0
}

// queueStore keeps the events behind a queueCore. Its methods are called with
// the core's mutex held and must not block on anything that needs it.
type queueStore interface {
	// refill reads up to n more fresh events of ns from storage into
	// ns.fresh (Badger's read-ahead). Stores that keep everything in memory
	// do nothing.
	refill(ns *qns, n int) error
	// take returns the event of e for a delivery; the caller owns the copy.
	take(e *qentry) (Event, error)
	// submit hands the storage writes of a state change to the store. It
	// returns nil if they are applied already; otherwise, with wait, a
	// wait for their durability, and without, a wait for them to be
	// written as far as a crash of the process (not of the machine)
	// keeps them (the store need not sync for writes nobody waits for).
	submit(fx *effects, wait bool) *writeWait
	// barrier returns a wait for every state change submitted before it to
	// have been applied (nil if they are; Stats waits for dead letters in
	// flight with it).
	barrier() *writeWait
}

// writeWait waits for a batch of writes to become durable.
type writeWait struct {
	done chan struct{}
	err  error
	also *writeWait // waited for after this one (see finishWait)
}

func (w *writeWait) wait(ctx context.Context) error {
	for ; w != nil; w = w.also {
		select {
		case <-w.done:
			if w.err != nil {
				return w.err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// queueCore is the state machine. All fields are guarded by mu.
type queueCore struct {
	mu    sync.Mutex
	store queueStore
	log   *slog.Logger

	maxAttempts int // <= 0: never dead-letter
	maxEvents   int
	maxBytes    int64
	indexAll    bool          // byID holds every entry (memory), not only those leased since open (Badger)
	leaseRecs   bool          // keep lease records (Badger)
	dedupWindow time.Duration // 0: no deduplication
	recMaxBytes int           // the largest lease record, about (0: no limit)

	nss      map[string]*qns
	byID     map[string]*qentry
	holders  map[string]*qholder
	timers   deadlines // leased and delayed entries, by when
	dedup    *dedupIndex
	nextSeq  uint64 // the next sequence number to assign
	applied  uint64 // the highest sequence number applied to the state (Badger read-ahead bound)
	served   uint64 // Lease's turns: the last given out (qns.served)
	closed   bool
	timer    *time.Timer
	timerAt  int64
	waiterCt int
	// goneUnmarked holds the dedup keys of the entries acked since the last
	// markGone, not marked gone yet.
	goneUnmarked []goneMark
	acceptKeys   []dedupKey // accept's buffer
	// waiting holds the Wait calls per namespace name, kept apart from nss
	// so that waiting on a name (any valid name a client may consume)
	// creates no namespace record: entries go when their last waiter does.
	waiting map[string]map[*qwaiter]struct{}
}

// readAheadMax bounds how many fresh events a Badger namespace keeps in
// memory; readAheadBytes bounds their bytes.
const (
	readAheadMax   = 1024
	readAheadBytes = 1 << 20
)

func newQueueCore(opts QueueOptions, store queueStore, inMemory bool) *queueCore {
	c := &queueCore{
		store:       store,
		log:         opts.Logger,
		maxAttempts: opts.MaxAttempts,
		maxEvents:   opts.MaxEventsPerNamespace,
		maxBytes:    opts.MaxBytesPerNamespace,
		indexAll:    inMemory,
		leaseRecs:   !inMemory,
		nss:         make(map[string]*qns),
		waiting:     make(map[string]map[*qwaiter]struct{}),
		byID:        make(map[string]*qentry),
		holders:     make(map[string]*qholder),
		nextSeq:     1,
	}
	c.timers.heap.byWhen = true
	if c.maxAttempts == 0 {
		c.maxAttempts = DefaultMaxAttempts
	}
	if opts.DedupWindow >= 0 {
		w := opts.DedupWindow
		if w == 0 {
			w = DefaultDedupWindow
		}
		c.dedup = newDedupIndex(w, dedupMaxIDs, opts.Logger)
		c.dedupWindow = w
	}
	return c
}

// announcedLimits is implemented by the built-in queues: the limits a
// server announces in AuthResult (ServerLimits.max_attempts and
// dedup_window_ms; 0: never dead-lettered, no deduplication).
type announcedLimits interface {
	announcedLimits() (maxAttempts int, dedupWindow time.Duration)
}

func (c *queueCore) announcedLimits() (int, time.Duration) {
	return max(c.maxAttempts, 0), c.dedupWindow
}

// normalizeQueueOptions fills in defaults.
func normalizeQueueOptions(opts QueueOptions) QueueOptions {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.DedupWindow == 0 {
		opts.DedupWindow = DefaultDedupWindow
	}
	if opts.MaxAttempts == 0 {
		opts.MaxAttempts = DefaultMaxAttempts
	}
	return opts
}

// ns returns the namespace called name, creating it.
func (c *queueCore) ns(name string) *qns {
	ns := c.nss[name]
	if ns == nil {
		// A new namespace's events are all still to come.
		ns = &qns{name: name, dlq: strings.HasSuffix(name, DeadLetterSuffix), diskNext: c.nextSeq, diskChunk: c.nextSeq}
		c.nss[name] = ns
	}
	return ns
}

// --- IDs ---------------------------------------------------------------------

// indexID adds e to the entries of its ID, kept newest (highest sequence
// number) first whenever they are indexed (the memory queue indexes an
// entry as it is stored, the Badger queue as it is first leased), so that
// a settlement several of them match settles the same one in both.
func (c *queueCore) indexID(e *qentry) {
	p := c.byID[e.id]
	if p == nil || p.seq < e.seq {
		e.idNext = p
		c.byID[e.id] = e
		return
	}
	for p.idNext != nil && p.idNext.seq > e.seq {
		p = p.idNext
	}
	e.idNext, p.idNext = p.idNext, e
}

func (c *queueCore) unindexID(e *qentry) {
	p := c.byID[e.id]
	if p == e {
		if e.idNext != nil {
			c.byID[e.id] = e.idNext
		} else {
			delete(c.byID, e.id)
		}
		e.idNext = nil
		return
	}
	for ; p != nil; p = p.idNext {
		if p.idNext == e {
			p.idNext = e.idNext
			e.idNext = nil
			return
		}
	}
}

// --- holders -----------------------------------------------------------------

func (c *queueCore) holder(name string) *qholder {
	h := c.holders[name]
	if h == nil {
		h = &qholder{name: name}
		c.holders[name] = h
	}
	return h
}

func (c *queueCore) holdAdd(h *qholder, e *qentry) {
	e.holder = h
	e.hprev = nil
	e.hnext = h.head
	if h.head != nil {
		h.head.hprev = e
	}
	h.head = e
	h.n++
}

func (c *queueCore) holdRemove(e *qentry) {
	h := e.holder
	if h == nil {
		return
	}
	if e.hprev != nil {
		e.hprev.hnext = e.hnext
	} else {
		h.head = e.hnext
	}
	if e.hnext != nil {
		e.hnext.hprev = e.hprev
	}
	e.holder, e.hprev, e.hnext = nil, nil, nil
	h.n--
	if h.n == 0 {
		delete(c.holders, h.name)
	}
}

// --- waiting -----------------------------------------------------------------

// wake wakes the waiters of ns.
func (c *queueCore) wake(ns *qns) { c.wakeName(ns.name) }

func (c *queueCore) wakeName(name string) {
	for w := range c.waiting[name] {
		if !w.fired {
			w.fired = true
			close(w.ch)
		}
	}
	delete(c.waiting, name)
}

// Wait blocks until an event may be ready in one of names.
func (c *queueCore) Wait(ctx context.Context, names []string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrQueueClosed
	}
	var fx effects
	c.advance(time.Now().UnixNano(), &fx)
	c.finishNoWait(&fx)
	for _, name := range names {
		if ns := c.nss[name]; ns != nil && ns.hasReady() {
			c.mu.Unlock()
			return nil
		}
	}
	w := &qwaiter{ch: make(chan struct{})}
	for _, name := range names {
		ws := c.waiting[name]
		if ws == nil {
			ws = make(map[*qwaiter]struct{}, 1)
			c.waiting[name] = ws
		}
		ws[w] = struct{}{}
	}
	c.waiterCt++
	c.mu.Unlock()

	var err error
	select {
	case <-w.ch:
	case <-ctx.Done():
		err = ctx.Err()
	}

	c.mu.Lock()
	c.waiterCt--
	for _, name := range names {
		if ws := c.waiting[name]; ws != nil {
			delete(ws, w)
			if len(ws) == 0 {
				delete(c.waiting, name)
			}
		}
	}
	closed := c.closed
	fired := w.fired
	c.mu.Unlock()
	if closed {
		return ErrQueueClosed
	}
	if fired {
		return nil
	}
	return err
}

// --- time --------------------------------------------------------------------

// advance applies every deadline and delay that has passed by now.
func (c *queueCore) advance(now int64, fx *effects) {
	for c.timers.len() > 0 {
		e := c.timers.min()
		if e.when > now {
			return
		}
		c.timers.remove(e)
		switch e.state {
		case stLeased:
			e.ns.leased--
			e.ns.expired++
			c.holdRemove(e)
			c.afterLease(e, now, 0, "lease expired", fx)
		case stDelayed:
			e.ns.delayed--
			c.makeReady(e)
		}
	}
}

// finish submits the storage writes of a state change and re-arms the timer.
// It returns what to wait on for durability, for callers that wait (see
// finishNoWait for the others).
func (c *queueCore) finish(fx *effects) *writeWait {
	return c.finishWait(fx, true)
}

// finishNoWait is finish for callers that do not wait for durability.
func (c *queueCore) finishNoWait(fx *effects) { c.finishWait(fx, false) }

func (c *queueCore) finishWait(fx *effects, wait bool) *writeWait {
	return c.finishRecords(fx, wait, wait)
}

// finishRecords is finishWait with fx's lease records waited for as
// recWait says (durable, or written). Lease records go apart from
// dead-letter moves, and first: a move can be refused for disk space where a
// record is still written (the Badger queue's reserve).
func (c *queueCore) finishRecords(fx *effects, recWait, wait bool) *writeWait {
	c.rearm()
	if fx.empty() {
		return nil
	}
	if len(fx.moves) > 0 && len(fx.recPuts) > 0 {
		recs := &effects{recPuts: fx.recPuts}
		fx.recPuts = nil
		rw := c.store.submit(recs, recWait)
		w := c.store.submit(fx, wait)
		if rw == nil {
			return w
		}
		rw.also = w
		return rw
	}
	return c.store.submit(fx, wait)
}

// rearm points the timer at the earliest deadline.
func (c *queueCore) rearm() {
	if c.closed || c.timers.len() == 0 {
		if c.timer != nil && c.timerAt != 0 {
			c.timer.Stop()
			c.timerAt = 0
		}
		return
	}
	at := c.timers.min().when
	if at == c.timerAt {
		return
	}
	c.timerAt = at
	d := time.Duration(at - time.Now().UnixNano())
	if d < 0 {
		d = 0
	}
	if c.timer == nil {
		c.timer = time.AfterFunc(d, c.onTimer)
	} else {
		c.timer.Reset(d)
	}
}

func (c *queueCore) onTimer() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.timerAt = 0
	var fx effects
	c.advance(time.Now().UnixNano(), &fx)
	c.finishNoWait(&fx) // nobody waits for expiry's writes
}

// --- transitions ---------------------------------------------------------------

// makeReady makes e deliverable again.
func (c *queueCore) makeReady(e *qentry) {
	e.state = stReady
	e.ns.ready.push(e)
	c.wake(e.ns)
}

// afterLease decides what happens to e when its lease ended without an ack
// (nack, expiry, release): dead-letter it if it has used its attempts,
// otherwise make it ready now or after delay.
func (c *queueCore) afterLease(e *qentry, now int64, delay time.Duration, reason string, fx *effects) {
	e.reason = reason
	if c.maxAttempts > 0 && e.attempt >= c.maxAttempts && !e.ns.dlq {
		if c.deadLetter(e, reason, fx) {
			return
		}
		// The dead-letter namespace is full: the event stays where it is,
		// to be dead-lettered after a later attempt.
		delay = 0
	}
	c.schedule(e, now, delay)
}

// schedule makes e ready at once, or delayed until now+delay.
func (c *queueCore) schedule(e *qentry, now int64, delay time.Duration) {
	if delay > 0 {
		e.state = stDelayed
		e.when = after(now, delay)
		e.ns.delayed++
		c.timers.push(e)
		return
	}
	c.makeReady(e)
}

// detach takes e out of whatever holds it (heaps, holder, counters), leaving
// its state to the caller.
func (c *queueCore) detach(e *qentry) {
	switch e.state {
	case stFresh:
		// Only the head of the FIFO is ever detached from it.
		if e.ns.fresh.len() > 0 && e.ns.fresh.peek() == e {
			e.ns.fresh.pop()
		} else {
			e.ns.fresh.removeEntry(e)
		}
	case stReady:
		e.ns.ready.remove(e)
	case stLeased:
		c.timers.remove(e)
		c.holdRemove(e)
		e.ns.leased--
	case stDelayed:
		c.timers.remove(e)
		e.ns.delayed--
	}
}

// remove deletes e for good (acked).
func (c *queueCore) remove(e *qentry, fx *effects) {
	c.detach(e)
	e.state = stGone
	c.dropRemovedRec(e, fx)
	c.unindexID(e)
	e.ns.count--
	e.ns.bytes -= int64(e.size)
	if c.dedup != nil && !c.indexAll {
		c.goneUnmarked = append(c.goneUnmarked, goneMark{key: c.dedupKeyOf(e), gen: e.dgen})
	}
	fx.deletes = append(fx.deletes, e)
}

// markGone marks the dedup entries of the entries acked since the last call
// gone (for dedupIndex.stored). settle calls it once for all of a call's
// acks rather than remove for each, so that their lookups wait for memory
// together (dedupIndex.markAllGone); what reads the marks (storedUnsettled)
// calls it first.
func (c *queueCore) markGone() {
	if len(c.goneUnmarked) == 0 {
		return
	}
	c.dedup.markAllGone(c.goneUnmarked)
	clear(c.goneUnmarked) // keeps no generation alive
	c.goneUnmarked = c.goneUnmarked[:0]
}

// deadLetterRoom reports whether the dead-letter namespace dst has room for
// an event of size bytes.
func (c *queueCore) deadLetterRoom(dst *qns, size int) bool {
	return !((c.maxEvents > 0 && dst.count >= c.maxEvents) || (c.maxBytes > 0 && dst.bytes+int64(size) > c.maxBytes))
}

// deadLetter moves e (already detached) to its dead-letter namespace, unless
// that namespace is at its limits; it reports whether it did.
func (c *queueCore) deadLetter(e *qentry, reason string, fx *effects) bool {
	dst := c.ns(DeadLetterNamespace(e.ns.name))
	size := deadLetterSize(e, reason)
	if !c.deadLetterRoom(dst, size) {
		if !dst.warnedFull {
			dst.warnedFull = true
			c.log.Warn("h3x: dead-letter namespace full; events stay in their namespace", "namespace", dst.name)
		}
		return false
	}
	dst.warnedFull = false
	e.state = stGone
	c.dropRemovedRec(e, fx)
	c.unindexID(e)
	e.ns.count--
	e.ns.bytes -= int64(e.size)
	e.ns.deadLettered++
	dst.count++
	dst.bytes += int64(size)
	dst.arriving++
	dst.known = true
	fx.moves = append(fx.moves, &qmove{e: e, dst: dst, attempts: e.attempt, reason: reason, size: size})
	return true
}

// deadLetterSize is the size e will have in its dead-letter namespace (if
// the dead-letter metadata keys are new to it).
func deadLetterSize(e *qentry, reason string) int {
	return e.size + len(DeadLetterSuffix) +
		len(MetaDeadLetterAttempts) + len(itoa(e.attempt)) +
		len(MetaDeadLetterReason) + len(reason) +
		len(MetaDeadLetterNamespace) + len(e.ns.name)
}

// dropRemovedRec is dropRec for an entry being removed (acked or
// dead-lettered). With lease records (Badger) it does nothing: the store
// drops the record once the removal is durable (badgerQueue.complete), so
// that a removal that fails keeps its record, which a neighbour's removal
// would otherwise delete.
func (c *queueCore) dropRemovedRec(e *qentry, fx *effects) {
	if !c.leaseRecs {
		c.dropRec(e, fx)
	}
}

// dropRec takes e off its lease record; a record listing nobody any more
// is deleted.
func (c *queueCore) dropRec(e *qentry, fx *effects) {
	if e.rec == nil {
		return
	}
	e.rec.n--
	if e.rec.n == 0 && e.rec.put {
		// (One never handed to Badger is not written any more.)
		fx.recDeletes = append(fx.recDeletes, e.rec.seq)
	}
	e.rec = nil
}

// uncount gives back e's last attempt: its delivery never reached the
// application (LeaseRef.Unseen).
func (c *queueCore) uncount(e *qentry, fx *effects) {
	if e.attempt > 0 {
		e.attempt--
		e.givenBack = true
		c.recountRec(e, fx)
	}
}

// recountRec replaces e's lease record after its attempt was given back (an
// unseen nack: the stored record lists the attempt that no longer counts,
// and a reopen would count it again) or after a failed removal (restore).
// The new record is written even at attempt 0: the old one may live on for
// the other deliveries of its Lease call, and at a reopen the newest record
// naming an event wins. (Were e acked or dead-lettered next, the new record
// is dropped once that is durable; a group writes an operation's record
// puts before its deletions.)
func (c *queueCore) recountRec(e *qentry, fx *effects) {
	if !c.leaseRecs {
		return
	}
	c.dropRec(e, fx)
	rec := &leaseRec{seq: c.nextSeq, n: 1}
	c.nextSeq++
	e.rec = rec
	fx.recPuts = append(fx.recPuts, recPut{rec: rec, entries: []recEntry{{ns: e.ns.name, seq: e.seq, id: e.id, size: e.size, enq: e.enq, attempt: e.attempt}}})
}

// maxNackReason is the longest nack reason kept, in bytes; longer ones are
// truncated (at a UTF-8 boundary).
const maxNackReason = 1 << 10

// nackReason is reason as it is kept: valid UTF-8 (anything else replaced
// by U+FFFD, since it is sent as a protobuf string in dead letters' metadata)
// and at most maxNackReason bytes.
func nackReason(reason string) string {
	return truncateUTF8(validUTF8(reason), maxNackReason)
}

// truncateUTF8 returns s cut to at most n bytes without splitting a rune.
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// deadLetterEvent returns ev as it is stored in its dead-letter namespace.
func deadLetterEvent(ev Event, from string, attempts int, reason string) Event {
	md := make(map[string]string, len(ev.Metadata)+3)
	for k, v := range ev.Metadata {
		md[k] = v
	}
	md[MetaDeadLetterAttempts] = itoa(attempts)
	md[MetaDeadLetterReason] = reason
	md[MetaDeadLetterNamespace] = from
	ev.Metadata = md
	ev.Namespace = DeadLetterNamespace(from)
	return ev
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b [20]byte
	i := len(b)
	neg := n < 0
	if neg {
		n = -n
	}
	for n > 0 {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
	}
	if neg {
		i--
		b[i] = '-'
	}
	return string(b[i:])
}

// land adds an event that has become durable to the state: an enqueued event
// or a dead letter, both already counted in their namespace (a dead letter
// with the estimated size counted, corrected here). ev may be nil for
// Badger, which then reads it from disk when its turn comes.
func (c *queueCore) land(e *qentry, ev *Event, counted int) {
	ns := e.ns
	ns.known = true
	ns.bytes += int64(e.size - counted)
	if e.seq > c.applied {
		c.applied = e.seq
	}
	e.state = stFresh
	if c.indexAll {
		e.ev = ev
		c.indexID(e)
		ns.fresh.push(e)
	} else if ns.freshDisk == 0 && ev != nil && ns.fresh.len() < readAheadMax && ns.fresh.bytes+e.size <= readAheadBytes {
		e.ev = ev
		ns.fresh.push(e)
		ns.diskNext = e.seq + 1
		if e.chunk != nil {
			ns.diskChunk = e.chunk.first
			ns.keepChunk(e.chunk)
		}
	} else {
		ns.freshDisk++
	}
	c.wake(ns)
}

// unmove reverts the dead-letter move m that did not become durable: the
// event is ready again where it was.
func (c *queueCore) unmove(m *qmove, fx *effects) {
	m.dst.count--
	m.dst.bytes -= int64(m.size)
	m.dst.arriving--
	c.restore(m.e, true, fx)
}

// arrived records that the dead letter of m has landed in its namespace
// (land counts it from now on).
func (c *queueCore) arrived(m *qmove) { m.dst.arriving-- }

// arrivingIn reports whether dead letters are being written to one of
// names (to any namespace if names is empty). c.mu is held.
func (c *queueCore) arrivingIn(names []string) bool {
	if len(names) == 0 {
		for _, ns := range c.nss {
			if ns.arriving > 0 {
				return true
			}
		}
		return false
	}
	for _, name := range names {
		if ns := c.nss[name]; ns != nil && ns.arriving > 0 {
			return true
		}
	}
	return false
}

// storedUnsettled reports whether the dedup index knows id as published
// within its window and not acked since (a dead-lettered event's ID is
// marked once its dead letter is acked).
func (c *queueCore) storedUnsettled(id string) bool {
	c.markGone()
	return c.dedup.stored(id, time.Now().UnixNano())
}

// dedupKeyOf returns e's dedup fingerprint.
func (c *queueCore) dedupKeyOf(e *qentry) dedupKey {
	if e.dkey == (dedupKey{}) {
		e.dkey = c.dedup.keyOf(e.id)
	}
	return e.dkey
}

// unaccept reverts accept for an event that did not become durable.
func (c *queueCore) unaccept(e *qentry) {
	e.ns.count--
	e.ns.bytes -= int64(e.size)
	if c.dedup != nil {
		c.dedup.forgetKey(c.dedupKeyOf(e))
	}
}

// restore puts back an entry whose removal (ack or dead-letter move) failed
// to become durable: it is ready again. A delivered entry gets a record of
// its own in fx: its lease record is intact (see dropRemovedRec), but may
// never have been written (a Lease whose record's commit failed).
func (c *queueCore) restore(e *qentry, moved bool, fx *effects) {
	if e.chunk != nil {
		// Even while closing: the chunk must not count it settled.
		e.chunk.unsettle(e.seq)
	}
	if c.closed {
		return
	}
	e.ns.count++
	e.ns.bytes += int64(e.size)
	if moved {
		e.ns.deadLettered--
	}
	if c.dedup != nil && !c.indexAll && !moved {
		c.dedup.setGoneIn(e.dgen, c.dedupKeyOf(e), false)
	}
	c.indexID(e)
	if e.chunk != nil {
		e.ns.keepChunk(e.chunk)
	}
	if e.attempt > 0 {
		c.recountRec(e, fx)
	}
	c.makeReady(e)
}

// --- Enqueue -----------------------------------------------------------------

// accept decides the fate of each prepared event: duplicate, refused, or
// accepted (dedup-recorded, counted against its namespace's limits, and given
// a sequence number). Accepted events are returned as entries to store.
// Caller holds mu.
func (c *queueCore) accept(evs []Event, sizes []int, enq int64, res []PublishResult, out []*qentry) []*qentry {
	var keys []dedupKey
	if c.dedup != nil {
		keys = c.dedup.keysOf(c.acceptKeys[:0], evs)
	}
	for i := range evs {
		ev := &evs[i]
		res[i].ID = ev.ID
		if res[i].Status == PublishRefused {
			continue // refused by the caller (refuseUnencodable)
		}
		var key dedupKey
		if c.dedup != nil {
			key = keys[i]
			if c.dedup.seen(key, enq) {
				res[i].Status = PublishDuplicate
				continue
			}
		}
		ns := c.ns(ev.Namespace)
		size := sizes[i]
		if c.maxBytes > 0 && int64(size) > c.maxBytes {
			// Not retryable: no room will ever be made for it (checked
			// first: a full namespace's retryable refusal would have its
			// publisher retry it for ever).
			res[i].Status = PublishRefused
			res[i].Err = newError(CodeInvalidArgument, "event of %d bytes is larger than the namespace byte limit (%d bytes)", size, c.maxBytes)
			continue
		}
		if c.maxEvents > 0 && ns.count >= c.maxEvents {
			res[i].Status = PublishRefused
			res[i].Err = queueFull(ns.name, "%d events", c.maxEvents)
			continue
		}
		if c.maxBytes > 0 && ns.bytes+int64(size) > c.maxBytes {
			res[i].Status = PublishRefused
			res[i].Err = queueFull(ns.name, "%d bytes", c.maxBytes)
			continue
		}
		var dgen *dedupGen
		if c.dedup != nil {
			dgen = c.dedup.addKey(key, enq)
		}
		ns.count++
		ns.bytes += int64(size)
		ns.known = true
		e := &qentry{id: ev.ID, ns: ns, seq: c.nextSeq, size: size, enq: enq, dkey: key, dgen: dgen}
		c.nextSeq++
		res[i].Status = PublishStored
		out = append(out, e)
	}
	c.acceptKeys = keys[:0]
	return out
}

// refuseUnencodable refuses, in res, the event ev if a text field of it is
// not valid UTF-8: the wire could carry it to no consumer, and every fetch
// of its namespace would stumble on it. It reports whether it refused.
func refuseUnencodable(ev *Event, res *PublishResult) bool {
	f := ev.notUTF8()
	if f == "" {
		return false
	}
	*res = PublishResult{ID: ev.ID, Status: PublishRefused, Err: newError(CodeInvalidArgument, "the event's %s is not valid UTF-8", f)}
	return true
}

// queueFullRetryAfter is the RetryAfter of a refusal for a full namespace.
const queueFullRetryAfter = time.Second

func queueFull(ns, format string, limit any) *Error {
	e := newError(CodeQueueFull, "namespace %q is at its limit of "+format, ns, limit)
	e.RetryAfter = queueFullRetryAfter
	return e
}

// --- Lease -------------------------------------------------------------------

// defaultAckDeadline is the lease duration of a LeaseRequest without one.
const defaultAckDeadline = 30 * time.Second

func (c *queueCore) Lease(ctx context.Context, req LeaseRequest) ([]Lease, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	limit := max(req.Limit, 1)
	deadline := req.AckDeadline
	if deadline <= 0 {
		deadline = defaultAckDeadline
	}
	c.mu.Lock()
	out, w, err := c.lease(req, limit, deadline)
	c.mu.Unlock()
	// Dead-letter moves the call made land before it returns (so that Stats
	// agree with what it did), and the lease record is written (see lease).
	// A failed move does not fail the lease. If ctx ends first, the
	// deliveries are given back unseen and the call fails: a delivery must
	// not go out before its record is written.
	if werr := w.wait(ctx); werr != nil {
		if cerr := ctx.Err(); cerr != nil && errors.Is(werr, cerr) {
			c.giveBack(req.Holder, out)
			return nil, cerr
		}
		c.log.Warn("h3x: queue: dead-lettering during a lease failed; the events stay", "err", werr)
	}
	return out, err
}

// giveBack ends the leases of deliveries that never left the queue, as an
// unseen nack would: their attempts do not count.
func (c *queueCore) giveBack(holder string, out []Lease) {
	if len(out) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return // every lease ended at Close
	}
	now := time.Now().UnixNano()
	var fx effects
	for _, l := range out {
		// Settled or delivered again meanwhile: nil. If its lease expired
		// meanwhile (an ack deadline shorter than the record's write), that
		// attempt does not count either; had the expiry dead-lettered it,
		// at MaxAttempts, it stays dead-lettered.
		if e, _ := c.resolve(holder, l.ref()); e != nil {
			c.nackEntry(e, now, 0, e.reason, true, &fx)
		}
	}
	c.finishNoWait(&fx)
}

// lease is Lease with c.mu held. It returns what to wait for before the
// deliveries go out.
func (c *queueCore) lease(req LeaseRequest, limit int, deadline time.Duration) ([]Lease, *writeWait, error) {
	if c.closed {
		return nil, nil, ErrQueueClosed
	}
	now := time.Now().UnixNano()
	var fx effects
	c.advance(now, &fx)

	// The namespaces that may have something, the least recently served
	// first (then in the request's order): calls that name different
	// namespaces, or the same ones in another order, still take turns.
	var active []*qns
	for _, name := range req.Namespaces {
		if ns := c.nss[name]; ns != nil && ns.hasReady() && !containsNS(active, ns) {
			active = append(active, ns)
		}
	}
	var out []Lease
	var leased []*qentry
	var err error
	if len(active) > 0 {
		// Room for what the namespaces hold, up to the limit (and 1,024:
		// a byte budget may stop the call well before it).
		avail := 0
		for _, ns := range active {
			avail += ns.ready.len() + ns.fresh.len() + ns.freshDisk
		}
		out = make([]Lease, 0, max(min(limit, avail, 1024), 0)) // counts are never negative; if they were, no panic
		if c.leaseRecs {
			leased = make([]*qentry, 0, cap(out))
		}
		slices.SortStableFunc(active, func(a, b *qns) int { return cmp.Compare(a.served, b.served) })
		h := c.holder(req.Holder)
		until := after(now, deadline)
		bytes := 0
	loop:
		for len(active) > 0 && len(out) < limit {
			for i := 0; i < len(active) && len(out) < limit; {
				ns := active[i]
				e, nerr := c.nextReady(ns, limit-len(out))
				if nerr != nil {
					err = nerr
					break loop
				}
				if e == nil {
					active = append(active[:i], active[i+1:]...)
					continue
				}
				if reason, ok := c.overdueDeadLetter(e); ok {
					// Delivered MaxAttempts times, yet ready again: its last
					// lease ended without being settled, by a restart (leases
					// end as if released) or when the dead-letter namespace
					// was full. It moves now, as a release would have moved
					// it. (With the dead-letter namespace still full it is
					// delivered once more.)
					c.detach(e)
					c.deadLetter(e, reason, &fx)
					continue
				}
				if req.MaxBytes > 0 && len(out) > 0 && bytes+e.size > req.MaxBytes {
					break loop
				}
				ev, terr := c.store.take(e)
				if terr != nil {
					err = terr
					break loop
				}
				c.detach(e)
				if e.state == stFresh && !c.indexAll {
					c.indexID(e)
				}
				c.dropRec(e, &fx)
				e.attempt++
				e.givenBack = false
				e.state = stLeased
				e.when = until
				ns.leased++
				c.served++
				ns.served = c.served
				c.timers.push(e)
				c.holdAdd(h, e)
				ev.Namespace = ns.name
				out = append(out, Lease{Event: ev, Attempt: e.attempt, Deadline: time.Unix(0, until)})
				if c.leaseRecs {
					leased = append(leased, e)
				}
				bytes += e.size
				i++
			}
		}
		if h.n == 0 {
			delete(c.holders, h.name)
		}
	}
	// One lease record per Lease call, split so that none is above
	// recMaxBytes (the Badger queue keeps every value below its value
	// threshold).
	for len(leased) > 0 {
		rec := &leaseRec{seq: c.nextSeq}
		c.nextSeq++
		put := recPut{rec: rec, entries: make([]recEntry, 0, len(leased))}
		recBytes := 0
		for len(leased) > 0 {
			e := leased[0]
			n := leaseRecBound(e.ns.name)
			if len(put.entries) > 0 && c.recMaxBytes > 0 && recBytes+n > c.recMaxBytes {
				break
			}
			recBytes += n
			e.rec = rec
			put.entries = append(put.entries, recEntry{ns: e.ns.name, seq: e.seq, id: e.id, size: e.size, enq: e.enq, attempt: e.attempt})
			leased = leased[1:]
		}
		rec.n = len(put.entries)
		fx.recPuts = append(fx.recPuts, put)
	}
	// The deliveries go out once their lease record is written (not
	// synced), to Badger or to the Badger queue's lease journal: a kill -9
	// after that cannot make the next delivery reuse their attempt
	// numbers. Dead-letter moves are waited for durable; a Lease that makes
	// them waits anyway, and its records are not journaled: were its ctx to
	// end during that wait, it would give its deliveries back unseen with
	// replacement records nothing journals, and its own, journaled, would
	// outlive them at a kill and count the attempts given back (finding
	// 155).
	fx.journal = len(fx.moves) == 0
	w := c.finishRecords(&fx, false, len(fx.moves) > 0)
	if err != nil && len(out) == 0 {
		return nil, w, err
	}
	if err != nil {
		c.log.Warn("h3x: queue read failed during a lease; returning the events read so far", "err", err)
	}
	return out, w, nil
}

// overdueDeadLetter reports whether e, about to be leased again, has had
// its MaxAttempts deliveries and can move to its dead-letter namespace now,
// and with which reason.
func (c *queueCore) overdueDeadLetter(e *qentry) (string, bool) {
	if c.maxAttempts <= 0 || e.attempt < c.maxAttempts || e.ns.dlq || e.state != stReady {
		return "", false
	}
	reason := cmp.Or(e.reason, "released")
	return reason, c.deadLetterRoom(c.ns(DeadLetterNamespace(e.ns.name)), deadLetterSize(e, reason))
}

func containsNS(list []*qns, ns *qns) bool {
	for _, x := range list {
		if x == ns {
			return true
		}
	}
	return false
}

// nextReady returns the next deliverable entry of ns without taking it:
// redeliveries first (lowest sequence number), then fresh events, read
// ahead from storage when the buffer is empty. want hints how many are
// wanted.
func (c *queueCore) nextReady(ns *qns, want int) (*qentry, error) {
	var r *qentry
	if ns.ready.len() > 0 {
		r = ns.ready.min()
		// Redeliveries come before fresh events, which all come later in
		// publish order, except after a restart, when events delivered
		// before it wait in ready among the fresh ones.
		if ns.fresh.len() == 0 && (ns.freshDisk == 0 || r.seq < ns.diskNext) {
			return r, nil
		}
	}
	if ns.fresh.len() == 0 && ns.freshDisk > 0 {
		if err := c.store.refill(ns, max(want, 256)); err != nil {
			return nil, err
		}
	}
	if ns.fresh.len() > 0 && (r == nil || ns.fresh.peek().seq < r.seq) {
		return ns.fresh.peek(), nil
	}
	return r, nil
}

// --- settling ------------------------------------------------------------------

// resolve finds the entry a settlement by holder of ref applies to. See
// LeaseRef.
func (c *queueCore) resolve(holder string, ref LeaseRef) (*qentry, SettleStatus) {
	first := c.byID[ref.ID]
	inNamespace := false
	for e := first; e != nil; e = e.idNext {
		if ref.Namespace != "" && e.ns.name != ref.Namespace {
			continue
		}
		inNamespace = true
		heldByHolder := e.state == stLeased && e.holder != nil && e.holder.name == holder
		heldByOther := e.state == stLeased && e.holder != nil && e.holder.name != holder
		switch {
		case ref.Attempt > 0 && ref.Namespace == "" && e.ns.dlq:
			// A dead letter is its event delivered afresh, attempts
			// counted from 1 again: by a number alone, a settlement of a
			// delivery of the original would settle it. Without its
			// namespace, only the holder of its lease settles it.
			if heldByHolder && e.attempt == ref.Attempt {
				return e, SettleOK
			}
		case ref.Attempt > 0:
			// The latest delivery, unless another holder holds its lease
			// now (a settlement never overrides someone else's live lease)
			// or it was given back (its number is the one before again).
			if e.attempt == ref.Attempt && !heldByOther && !e.givenBack {
				return e, SettleOK
			}
		case heldByHolder:
			return e, SettleOK
		}
	}
	if inNamespace {
		return nil, SettleStale
	}
	if first != nil {
		// Held, but in another namespace than the caller named.
		return nil, SettleUnknown
	}
	if !c.indexAll && c.dedup != nil && c.storedUnsettled(ref.ID) {
		// Stored, but not delivered since the queue was opened.
		return nil, SettleStale
	}
	return nil, SettleUnknown
}

type settleKind uint8

const (
	settleAck settleKind = iota
	settleNack
	settleExtend
)

func (c *queueCore) settle(ctx context.Context, kind settleKind, holder string, refs []LeaseRef, d time.Duration, reason string) ([]SettleResult, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	reason = nackReason(reason)
	res := make([]SettleResult, len(refs))
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrQueueClosed
	}
	now := time.Now().UnixNano()
	var fx effects
	if kind == settleAck {
		fx.deletes = make([]*qentry, 0, len(refs))
	}
	c.advance(now, &fx)
	for i, ref := range refs {
		res[i].ID = ref.ID
		e, st := c.resolve(holder, ref)
		if e != nil {
			switch kind {
			case settleAck:
				c.remove(e, &fx)
			case settleNack:
				c.nackEntry(e, now, d, reason, ref.Unseen, &fx)
			case settleExtend:
				if e.state != stLeased {
					st = SettleStale
					break
				}
				e.when = after(now, d)
				c.timers.fix(e)
			}
		}
		res[i].Status = st
	}
	c.markGone()
	w := c.finish(&fx)
	c.mu.Unlock()
	if err := w.wait(ctx); err != nil {
		return nil, err
	}
	return res, nil
}

// nackEntry ends e's delivery as a nack: after its lease, or, if the lease
// ended already and the event was not delivered again, by rescheduling it.
// An unseen delivery (one the application never got: its lease ended with
// its connection, say, while the client's next connection came up) is not
// counted either.
func (c *queueCore) nackEntry(e *qentry, now int64, d time.Duration, reason string, unseen bool, fx *effects) {
	leased := e.state == stLeased
	if !leased && e.state != stReady && e.state != stDelayed {
		return
	}
	c.detach(e)
	if unseen {
		c.uncount(e, fx)
	}
	if leased {
		c.afterLease(e, now, d, reason, fx)
	} else {
		e.reason = reason
		c.schedule(e, now, d)
	}
}

// Release ends every lease of holder as if nacked without delay.
func (c *queueCore) Release(ctx context.Context, holder string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrQueueClosed
	}
	now := time.Now().UnixNano()
	var fx effects
	c.advance(now, &fx)
	if h := c.holders[holder]; h != nil {
		for h.head != nil {
			e := h.head
			c.detach(e)
			c.afterLease(e, now, 0, "released", &fx)
		}
	}
	w := c.finish(&fx)
	c.mu.Unlock()
	return w.wait(ctx)
}

// --- Stats -------------------------------------------------------------------

func (c *queueCore) Stats(ctx context.Context, names ...string) ([]NamespaceStats, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrQueueClosed
	}
	now := time.Now().UnixNano()
	var fx effects
	c.advance(now, &fx)
	c.finishNoWait(&fx)
	// Dead letters being written (moved by an expiry, a release, this
	// call's advance) are counted in their namespace but ready only once
	// written: wait for them (a few rounds at most), so that every event
	// is counted ready, leased or delayed somewhere.
	for range 3 {
		if !c.arrivingIn(names) {
			break
		}
		w := c.store.barrier()
		c.mu.Unlock()
		err := w.wait(ctx)
		c.mu.Lock()
		if c.closed {
			return nil, ErrQueueClosed
		}
		if err != nil && ctx.Err() != nil {
			return nil, ctx.Err()
		}
		now = time.Now().UnixNano()
	}
	if len(names) == 0 {
		for name, ns := range c.nss {
			if ns.known {
				names = append(names, name)
			}
		}
		sortStrings(names)
	}
	out := make([]NamespaceStats, 0, len(names))
	for _, name := range names {
		st := NamespaceStats{Namespace: name}
		if ns := c.nss[name]; ns != nil {
			if ns.fresh.len() == 0 && ns.freshDisk > 0 {
				if err := c.store.refill(ns, 1); err != nil {
					return nil, err
				}
			}
			st.Ready = ns.ready.len() + ns.fresh.len() + ns.freshDisk
			st.Leased = ns.leased
			st.Delayed = ns.delayed
			st.DeadLettered = ns.deadLettered
			st.Expired = ns.expired
			st.Bytes = ns.bytes
			oldest := int64(0)
			if ns.ready.len() > 0 {
				oldest = ns.ready.min().enq
			}
			if ns.fresh.len() > 0 {
				if t := ns.fresh.peek().enq; oldest == 0 || t < oldest {
					oldest = t
				}
			}
			if oldest != 0 && now > oldest {
				st.OldestReady = time.Duration(now - oldest)
			}
		}
		out = append(out, st)
	}
	return out, nil
}

func sortStrings(s []string) {
	// insertion sort is fine for the namespace counts Stats sees; avoids
	// pulling sort into the hot files.
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// close marks the core closed, wakes every waiter and stops the timer.
func (c *queueCore) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	for name := range c.waiting {
		c.wakeName(name)
	}
	if c.timer != nil {
		c.timer.Stop()
	}
}

// --- containers ------------------------------------------------------------------

// entryHeap is a binary min-heap of entries by sequence number, or by when
// (then sequence number) if byWhen. Each entry records its index.
type entryHeap struct {
	byWhen bool
	s      []*qentry
}

func (h *entryHeap) len() int     { return len(h.s) }
func (h *entryHeap) min() *qentry { return h.s[0] }
func (h *entryHeap) less(i, j int) bool {
	a, b := h.s[i], h.s[j]
	if h.byWhen {
		return before(a, b)
	}
	return a.seq < b.seq
}

func (h *entryHeap) swap(i, j int) {
	h.s[i], h.s[j] = h.s[j], h.s[i]
	h.s[i].idx = i
	h.s[j].idx = j
}

func (h *entryHeap) push(e *qentry) {
	e.idx = len(h.s)
	h.s = append(h.s, e)
	h.up(e.idx)
}

func (h *entryHeap) remove(e *qentry) {
	i := e.idx
	n := len(h.s) - 1
	if i != n {
		h.swap(i, n)
	}
	h.s[n] = nil
	h.s = h.s[:n]
	if i != n {
		if !h.down(i) {
			h.up(i)
		}
	}
	e.idx = -1
	if cap(h.s) > 1024 && len(h.s) < cap(h.s)/4 {
		h.s = append([]*qentry(nil), h.s...)
	}
}

func (h *entryHeap) fix(e *qentry) {
	if !h.down(e.idx) {
		h.up(e.idx)
	}
}

func (h *entryHeap) up(j int) {
	for j > 0 {
		i := (j - 1) / 2
		if !h.less(j, i) {
			break
		}
		h.swap(i, j)
		j = i
	}
}

func (h *entryHeap) down(i0 int) bool {
	i, n := i0, len(h.s)
	for {
		j := 2*i + 1
		if j >= n {
			break
		}
		if r := j + 1; r < n && h.less(r, j) {
			j = r
		}
		if !h.less(j, i) {
			break
		}
		h.swap(i, j)
		i = j
	}
	return i > i0
}

// deadlines holds the leased and delayed entries by when, then sequence
// number, as one heap would: most entries come in that order (leases are
// made in sequence order, with deadlines that only move forward) and wait
// in a FIFO in front of the heap, where removing one, at any place, costs
// O(1) instead of a heap's O(log n) steps through entries spread over
// memory (an ack removes its entry: this was about 5% of the server's CPU
// when consuming). An entry that comes out of order (a deadline before
// the last one pushed: a nack's delay, an extension, a shorter ack
// deadline) goes in the heap. min returns the lesser of the two heads.
//
// FIFO entries are numbered by position, counted from the queue's start
// (or the FIFO's last compaction), so that dropping removed entries from
// its front moves no entry: e.idx is -2-position, fifo[0] is at position
// base. A removed entry leaves a nil; nils at the front are dropped at
// once, and the others when they outnumber the entries (a compaction,
// paid for by the removals before it), as is room left after a peak.
type deadlines struct {
	heap entryHeap // out of order entries (byWhen)
	fifo []*qentry // in (when, seq) order; nil: removed; fifo[0] != nil if live > 0
	base int       // the position of fifo[0]
	live int       // the entries in fifo
	// The key of the last entry pushed into fifo, removed or not: an
	// entry goes in fifo only if it does not come before it.
	lastWhen int64
	lastSeq  uint64
}

// maxFIFOPosition bounds positions (and -2-position, in an int): the FIFO
// is renumbered from 0 beyond it.
const maxFIFOPosition = 1 << 30

func (d *deadlines) len() int { return d.heap.len() + d.live }

// min returns the first entry; d is not empty.
func (d *deadlines) min() *qentry {
	if d.live == 0 {
		return d.heap.min()
	}
	if f := d.fifo[0]; d.heap.len() == 0 || !before(d.heap.min(), f) {
		return f
	}
	return d.heap.min()
}

// before reports whether a comes before b in the timers' order: by when,
// then sequence number.
func before(a, b *qentry) bool { return keyBefore(a.when, a.seq, b.when, b.seq) }

func keyBefore(aWhen int64, aSeq uint64, bWhen int64, bSeq uint64) bool {
	if aWhen != bWhen {
		return aWhen < bWhen
	}
	return aSeq < bSeq
}

func (d *deadlines) push(e *qentry) {
	if d.live > 0 && keyBefore(e.when, e.seq, d.lastWhen, d.lastSeq) {
		d.heap.push(e)
		return
	}
	pos := d.base + len(d.fifo)
	if pos >= maxFIFOPosition {
		d.compact()
		pos = d.base + len(d.fifo)
	}
	e.idx = -2 - pos
	d.fifo = append(d.fifo, e)
	d.live++
	d.lastWhen, d.lastSeq = e.when, e.seq
}

func (d *deadlines) remove(e *qentry) {
	if e.idx >= 0 {
		d.heap.remove(e)
		return
	}
	d.fifo[-2-e.idx-d.base] = nil
	e.idx = -1
	d.live--
	if d.live == 0 {
		d.base += len(d.fifo)
		d.fifo = d.fifo[:0]
		if cap(d.fifo) > 1024 {
			d.fifo = nil
		}
		return
	}
	for d.fifo[0] == nil {
		d.fifo = d.fifo[1:]
		d.base++
	}
	// Compact when the nils outnumber the entries, or when the slice
	// holds much more room than it needs (after a peak), so that its
	// array goes.
	if len(d.fifo)-d.live > d.live+32 || (cap(d.fifo) > 1024 && len(d.fifo) < cap(d.fifo)/4) {
		d.compact()
	}
}

// compact moves the FIFO's entries, in order, to a slice without nils,
// numbered from 0.
func (d *deadlines) compact() {
	s := make([]*qentry, 0, max(2*d.live, 8))
	for _, e := range d.fifo {
		if e != nil {
			e.idx = -2 - len(s)
			s = append(s, e)
		}
	}
	d.fifo, d.base = s, 0
}

// fix puts e, whose when changed, in its place.
func (d *deadlines) fix(e *qentry) {
	d.remove(e)
	d.push(e)
}

// entryFIFO is a ring buffer of entries in sequence order.
type entryFIFO struct {
	buf   []*qentry
	head  int
	n     int
	bytes int // sizes of the entries
}

func (f *entryFIFO) len() int { return f.n }

func (f *entryFIFO) peek() *qentry { return f.buf[f.head] }

func (f *entryFIFO) push(e *qentry) {
	if f.n == len(f.buf) {
		nb := make([]*qentry, max(16, 2*len(f.buf)))
		for i := 0; i < f.n; i++ {
			nb[i] = f.buf[(f.head+i)%len(f.buf)]
		}
		f.buf, f.head = nb, 0
	}
	f.buf[(f.head+f.n)%len(f.buf)] = e
	f.n++
	f.bytes += e.size
}

func (f *entryFIFO) pop() *qentry {
	e := f.buf[f.head]
	f.buf[f.head] = nil
	f.head = (f.head + 1) % len(f.buf)
	f.n--
	f.bytes -= e.size
	if f.n == 0 {
		f.head = 0
		if len(f.buf) > 1024 {
			f.buf = nil
		}
	}
	return e
}

// removeEntry removes e from anywhere in the FIFO (O(n); only for settling a
// fresh entry, which the LeaseRef rules never apply, so this is a safety net).
func (f *entryFIFO) removeEntry(e *qentry) {
	for i := 0; i < f.n; i++ {
		k := (f.head + i) % len(f.buf)
		if f.buf[k] == e {
			for j := i; j < f.n-1; j++ {
				f.buf[(f.head+j)%len(f.buf)] = f.buf[(f.head+j+1)%len(f.buf)]
			}
			f.buf[(f.head+f.n-1)%len(f.buf)] = nil
			f.n--
			f.bytes -= e.size
			return
		}
	}
}

// prepare fills in what Enqueue assigns (an ID, the time) and returns the
// event's size.
func prepareEvent(ev *Event, now time.Time) int {
	if ev.ID == "" {
		ev.ID = newUUIDv4()
	}
	if ev.Time.IsZero() {
		ev.Time = now
	}
	return ev.size()
}

// newUUIDv4 returns a random (version 4) UUID in canonical form.
func newUUIDv4() string {
	g := uuidGen{want: 1}
	return g.next()
}

// uuidGen hands out random (version 4) UUIDs in canonical form, made up to
// uuidBatch at a time: one string allocation per batch instead of one per
// UUID. An ID kept alone keeps its batch's string alive: at most uuidBatch
// × 36 bytes.
//
// The 122 random bits come from math/rand/v2's top-level generator:
// ChaCha8, a cryptographically strong generator, per thread, seeded by the
// runtime from the operating system's entropy. IDs must be unique, not
// secret, and it costs a few nanoseconds where crypto/rand's getrandom
// cost about 45 (the client names every event of a publish).
type uuidGen struct {
	want  int    // UUIDs still to be asked for (sizes the batches)
	batch string // UUIDs made and not handed out, 36 bytes each
}

// uuidBatch is the most UUIDs a uuidGen makes at a time.
const uuidBatch = 16

// next returns a new UUID.
func (g *uuidGen) next() string {
	if g.batch == "" {
		g.fill(min(max(g.want, 1), uuidBatch))
	}
	id := g.batch[:36]
	g.batch = g.batch[36:]
	g.want--
	return id
}

func (g *uuidGen) fill(n int) {
	var text [uuidBatch * 36]byte
	for i := range n {
		var u [16]byte
		binary.LittleEndian.PutUint64(u[:8], mathrand.Uint64())
		binary.LittleEndian.PutUint64(u[8:], mathrand.Uint64())
		u[6] = u[6]&0x0f | 0x40 // version 4
		u[8] = u[8]&0x3f | 0x80 // RFC 9562 variant
		putUUID((*[36]byte)(text[i*36:]), &u)
	}
	g.batch = string(text[:n*36])
}

// putUUID writes u in canonical form: 8-4-4-4-12 lower-case hex digits.
func putUUID(dst *[36]byte, u *[16]byte) {
	hex.Encode(dst[0:8], u[0:4])
	hex.Encode(dst[9:13], u[4:6])
	hex.Encode(dst[14:18], u[6:8])
	hex.Encode(dst[19:23], u[8:10])
	hex.Encode(dst[24:36], u[10:16])
	dst[8], dst[13], dst[18], dst[23] = '-', '-', '-', '-'
}

// after is the Unix-nanosecond time d after now, at most the largest one
// (an ack deadline or delay of "for ever", say math.MaxInt64, must not wrap
// into the past).
func after(now int64, d time.Duration) int64 {
	if d > 0 && now > math.MaxInt64-int64(d) {
		return math.MaxInt64
	}
	return now + int64(d)
}
