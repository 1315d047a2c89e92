package h3x

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// TestQueueModel drives the built-in queues through random sequences of
// operations and checks the delivery contract against a model of what the
// queue answered. Operations: publishes (fresh IDs, and IDs published
// before), leases by three holders from any mix of namespaces and their
// dead-letter namespaces, acks (also by the wrong holder, and of settled
// events), nacks (with MaxAttempts 3, so events move to dead-letter
// namespaces, some delayed, some unseen), lease extensions, releases, and
// for the Badger queue reopens (after Close, or of a copy of the live
// files, as a kill -9 leaves them) and injected commit failures. Checked:
//
//   - a lease never hands out an event another holder holds, one never
//     published, or one whose ack was confirmed (SettleOK);
//   - a fresh ID is stored, an ID stored before is a duplicate;
//   - an ack or nack by the holder of a live lease is applied, one by
//     another holder is stale;
//   - no delivery reuses the attempt number of a counted delivery of its
//     event (across reopens, clean or kill -9, too; after a kill that
//     follows injected failures, deliveries made during them are excused);
//   - at the end, with failures off, every stored event is delivered and
//     acked (draining every namespace), and the stats show nothing left;
//     for the Badger queue, no lease record is left after Close, and no
//     segment file once it has been opened again.
//
// H3X_MODEL_SEEDS sets how many seeds run per queue (default 6);
// H3X_MODEL_STEPS the operations per seed (default 400).
func TestQueueModel(t *testing.T) {
	seeds, steps := envInt("H3X_MODEL_SEEDS", 6), envInt("H3X_MODEL_STEPS", 400)
	opts := QueueOptions{MaxAttempts: 3, Durability: DurabilityNoSync}
	var total modelCounts
	t.Run("memory", func(t *testing.T) {
		for seed := range seeds {
			m := newQueueModel(t, uint64(seed), NewMemoryQueue(opts))
			m.checkAttempts = true
			m.run(steps)
			total.add(m.counts)
		}
		t.Logf("%+v", total)
	})
	// A limit of 40 events per namespace: publishes and dead-letter moves
	// meet it often.
	limited := opts
	limited.MaxEventsPerNamespace = 40
	t.Run("memory-limited", func(t *testing.T) {
		total = modelCounts{}
		for seed := range seeds {
			m := newQueueModel(t, uint64(seed), NewMemoryQueue(limited))
			m.checkAttempts = true
			m.limit = limited.MaxEventsPerNamespace
			m.run(steps)
			total.add(m.counts)
		}
		t.Logf("%+v", total)
	})
	t.Run("badger", func(t *testing.T) { testBadgerModel(t, opts, seeds, steps) })
	t.Run("badger-limited", func(t *testing.T) { testBadgerModel(t, limited, seeds, steps) })
	// Segments of 4 KiB: segments are started, emptied, removed and their
	// live chunks moved all the time.
	t.Run("badger-small-segments", func(t *testing.T) {
		withSegmentSize(t, 4<<10)
		testBadgerModel(t, opts, seeds, steps)
	})
}

func testBadgerModel(t *testing.T, opts QueueOptions, seeds, steps int) {
	var total modelCounts
	{
		// Small memtables: flushes and chunk boundaries come often.
		bopts := opts
		bopts.Badger = func(o *badger.Options) { o.MemTableSize = 1 << 20 }
		for seed := range seeds {
			dir := t.TempDir()
			q, err := OpenBadgerQueue(dir, bopts)
			if err != nil {
				t.Fatal(err)
			}
			m := newQueueModel(t, uint64(seed), q)
			m.limit = opts.MaxEventsPerNamespace
			m.checkAttempts, m.excuseFailedRecords = true, true
			m.reopen = func(q Queue, crash bool) Queue {
				if crash {
					// What a kill -9 leaves: the files as they are now
					// (no call is under way), without Close.
					crashed := copyLive(t, dir)
					defer q.Close() // the original, after the copy opened
					dir = crashed
				} else {
					// A clean Close writes what is pending (lease records
					// whose writes failed included): no failures during it.
					q.(*badgerQueue).failCommit.Store(nil)
					if err := q.Close(); err != nil {
						t.Fatalf("seed %d: close: %v", seed, err)
					}
				}
				q, err := OpenBadgerQueue(dir, bopts)
				if err != nil {
					t.Fatalf("seed %d: reopen (crash %v): %v", seed, crash, err)
				}
				return q
			}
			m.failures = func(q Queue, p float64) {
				bq := q.(*badgerQueue)
				if p == 0 {
					bq.failCommit.Store(nil)
					return
				}
				var mu sync.Mutex
				r := rand.New(rand.NewPCG(uint64(seed), 7))
				f := func([]bwrite) bool {
					mu.Lock()
					defer mu.Unlock()
					return r.Float64() < p
				}
				bq.failCommit.Store(&f)
			}
			m.run(steps)
			total.add(m.counts)
			// Everything settled and the queue closed: no lease record is
			// left (a failed write or deletion of one is retried).
			if n := storedPrefix(t, dir, []byte{keyLeaseRec}); n != 0 {
				t.Errorf("seed %d: every event settled, %d lease records left after Close", seed, n)
			}
			// And no segment is left once the directory has been opened
			// again (references a failed commit kept are counted anew).
			q, err = OpenBadgerQueue(dir, bopts)
			if err != nil {
				t.Fatalf("seed %d: open after the run: %v", seed, err)
			}
			if err := q.Close(); err != nil {
				t.Fatalf("seed %d: close after the run: %v", seed, err)
			}
			if files := segmentFiles(t, dir); len(files) != 0 {
				t.Errorf("seed %d: every event settled, segments left: %v", seed, files)
			}
		}
		t.Logf("%+v", total)
	}
}

func (c *modelCounts) add(o modelCounts) {
	c.stored += o.stored
	c.duplicates += o.duplicates
	c.refused += o.refused
	c.leased += o.leased
	c.deadLettered += o.deadLettered
	c.acked += o.acked
	c.nacked += o.nacked
	c.failedCalls += o.failedCalls
	c.reopens += o.reopens
}

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

// modelEvent is what the model knows of one published ID.
type modelEvent struct {
	ns      string // where it was published
	stored  bool   // the queue said PublishStored (or delivered it): it must come out
	acked   bool   // an ack of it returned SettleOK: it must never be leased again
	holder  string // who holds its lease, as far as the model knows ("": nobody, or unknown after a failed call)
	attempt int
	leaseNS string         // the namespace of that lease (ns or its dead-letter namespace)
	used    map[string]int // the highest attempt number handed out and still counted, by namespace
	unsure  bool           // delivered while commits were failing: its lease record may be lost
}

type queueModel struct {
	t        *testing.T
	seed     uint64
	r        *rand.Rand
	q        Queue
	reopen   func(q Queue, crash bool) Queue // nil: not supported
	failures func(q Queue, p float64)        // nil: not supported
	failing  bool
	events   map[string]*modelEvent
	ids      []string // every ID, in publish order
	next     int
	limit    int             // MaxEventsPerNamespace, if set
	excused  map[string]bool // namespaces that may be over the limit (see checkLimit)
	trail    []string        // the last operations (modelTrail), for failure messages
	counts   modelCounts
	// checkAttempts: no delivery reuses the attempt number of a counted
	// delivery of its event in its namespace. excuseFailedRecords: except
	// after a kill -9, for deliveries made while commits were failing (their
	// lease records may not have been written yet: RELIABILITY.md, finding
	// 3); a clean Close writes them.
	checkAttempts       bool
	excuseFailedRecords bool
}

// modelCounts say what a run exercised.
type modelCounts struct {
	stored, duplicates, refused, leased, deadLettered, acked, nacked, failedCalls, reopens int
}

var (
	modelNamespaces = []string{"a", "b", "c"}
	modelAll        = []string{"a", "b", "c", "a" + DeadLetterSuffix, "b" + DeadLetterSuffix, "c" + DeadLetterSuffix}
	modelHolders    = []string{"h1", "h2", "h3"}
)

func newQueueModel(t *testing.T, seed uint64, q Queue) *queueModel {
	return &queueModel{t: t, seed: seed, r: rand.New(rand.NewPCG(seed, 1)), q: q, events: make(map[string]*modelEvent)}
}

func (m *queueModel) fatalf(format string, args ...any) {
	m.t.Helper()
	m.t.Fatalf("seed %d: %s\nlast operations:\n  %s", m.seed, fmt.Sprintf(format, args...), strings.Join(m.trail, "\n  "))
}

// note records an operation for fatalf's trail of the last ones.
func (m *queueModel) note(format string, args ...any) {
	if len(m.trail) == modelTrail {
		m.trail = append(m.trail[:0], m.trail[1:]...)
	}
	m.trail = append(m.trail, fmt.Sprintf(format, args...))
}

const modelTrail = 12

// op is one operation: call runs it against the queue (concurrently with
// the other operations of its step), then apply checks its outcome and
// records it in the model.
type op struct {
	call  func()
	apply func()
}

func (m *queueModel) run(steps int) {
	defer func() { m.q.Close() }()
	for range steps {
		if m.r.IntN(3) == 0 {
			m.parallel()
			continue
		}
		holder := modelHolders[m.r.IntN(len(modelHolders))]
		var o op
		switch k := m.r.IntN(100); {
		case k < 30:
			o = m.publish()
		case k < 55:
			o = m.lease(holder)
		case k < 70:
			o = m.ack(holder, false)
		case k < 74:
			o = m.ack(holder, true)
		case k < 81:
			o = m.nack(holder)
		case k < 83:
			o = m.extend(holder, false)
		case k < 84:
			o = m.extend(holder, true)
		case k < 89:
			o = m.release(holder)
		case k < 94 && m.failures != nil:
			m.toggleFailures()
			continue
		case k < 97 && m.reopen != nil:
			m.doReopen()
			continue
		default:
			o = m.ackSettled()
		}
		o.call()
		o.apply()
		m.checkLimit()
	}
	m.drain()
}

// parallel runs a publish and operations of distinct holders at once, so
// that they meet in the same group commits (and the Badger queue's
// pipeline), then applies them: publishes first, then settlements and
// releases, then leases (a lease may hand out what they made ready).
func (m *queueModel) parallel() {
	holders := slices.Clone(modelHolders)
	m.r.Shuffle(len(holders), func(i, j int) { holders[i], holders[j] = holders[j], holders[i] })
	var first, second, last []op
	if m.r.IntN(2) == 0 {
		first = append(first, m.publish())
	}
	for _, h := range holders[:1+m.r.IntN(len(holders))] {
		switch m.r.IntN(4) {
		case 0:
			second = append(second, m.ack(h, false))
		case 1:
			second = append(second, m.nack(h))
		case 2:
			second = append(second, m.release(h))
		default:
			last = append(last, m.lease(h))
		}
	}
	all := slices.Concat(first, second, last)
	m.note("parallel: %d operations", len(all))
	var wg sync.WaitGroup
	for _, o := range all {
		wg.Go(o.call)
	}
	wg.Wait()
	for _, o := range all {
		o.apply()
	}
}

func (m *queueModel) toggleFailures() {
	m.failing = !m.failing && m.r.IntN(3) == 0
	p := 0.0
	if m.failing {
		p = 0.3
	}
	m.note("failures %v", p)
	m.failures(m.q, p)
}

func (m *queueModel) publish() op {
	n := 1 + m.r.IntN(8)
	evs := make([]Event, 0, n)
	fresh := make([]bool, 0, n)
	inBatch := map[string]bool{}
	for range n {
		if len(m.ids) > 0 && m.r.IntN(8) == 0 {
			id := m.ids[m.r.IntN(len(m.ids))]
			if !inBatch[id] {
				inBatch[id] = true
				evs = append(evs, Event{ID: id, Namespace: m.events[id].ns, Type: "t"})
				fresh = append(fresh, false)
			}
			continue
		}
		m.next++
		id := fmt.Sprintf("s%d-%d", m.seed, m.next)
		inBatch[id] = true
		ns := modelNamespaces[m.r.IntN(len(modelNamespaces))]
		evs = append(evs, Event{ID: id, Namespace: ns, Type: "t", Data: make([]byte, m.r.IntN(300))})
		fresh = append(fresh, true)
		// Known from now on: a concurrent lease may hand it out.
		m.events[id] = &modelEvent{ns: ns}
		m.ids = append(m.ids, id)
	}
	var res []PublishResult
	var err error
	return op{
		call: func() { res, err = m.q.Enqueue(context.Background(), evs) },
		apply: func() {
			m.note("publish %d events: err %v", len(evs), err)
			if err != nil {
				if !m.failing {
					m.fatalf("Enqueue without injected failures: %v", err)
				}
				m.callFailed()
				return // stored or not: the drain tells
			}
			for i, ev := range evs {
				e := m.events[ev.ID]
				switch st := res[i].Status; {
				case st == PublishRefused && !e.stored && m.limit > 0 && errors.Is(res[i].Err, ErrQueueFull):
					m.counts.refused++ // at the limit (checked after each step)
				case fresh[i] && st != PublishStored:
					m.fatalf("fresh ID %s: %v %v, want stored", ev.ID, st, res[i].Err)
				case !fresh[i] && e.stored && st != PublishDuplicate:
					m.fatalf("ID %s published again: %v, want duplicate", ev.ID, st)
				case st == PublishStored:
					e.stored = true
					m.counts.stored++
				case st == PublishDuplicate:
					m.counts.duplicates++
				case st == PublishRefused:
					m.fatalf("ID %s refused: %v", ev.ID, res[i].Err)
				}
			}
		},
	}
}

func (m *queueModel) lease(holder string) op {
	var nss []string
	for _, ns := range modelAll {
		if m.r.IntN(2) == 0 {
			nss = append(nss, ns)
		}
	}
	if len(nss) == 0 {
		nss = modelAll
	}
	limit := 1 + m.r.IntN(30)
	var ls []Lease
	var err error
	return op{
		call: func() {
			ls, err = m.q.Lease(context.Background(), LeaseRequest{Holder: holder, Namespaces: nss, Limit: limit, AckDeadline: time.Hour})
		},
		apply: func() {
			m.note("lease %s %v: %d, err %v", holder, nss, len(ls), err)
			if err != nil {
				m.fatalf("Lease: %v", err)
			}
			if m.failing {
				// A lease moves events at their maximum attempts to
				// their dead-letter namespace; a move whose commit fails
				// brings its event back, as after a failed call (see
				// checkLimit), though the lease itself succeeds.
				m.excuse(nss...)
			}
			m.took(holder, ls)
		},
	}
}

// took records the leases ls of holder, checking each.
func (m *queueModel) took(holder string, ls []Lease) {
	for _, l := range ls {
		id := l.Event.ID
		e := m.events[id]
		switch {
		case e == nil:
			m.fatalf("leased %s, never published", id)
		case e.acked:
			m.fatalf("leased %s (attempt %d, from %s) after its ack was confirmed", id, l.Attempt, l.Event.Namespace)
		case e.holder != "":
			m.fatalf("leased %s to %s while %s holds it (attempt %d)", id, holder, e.holder, e.attempt)
		case l.Event.Namespace != e.ns && l.Event.Namespace != DeadLetterNamespace(e.ns):
			m.fatalf("leased %s from %s, published to %s", id, l.Event.Namespace, e.ns)
		}
		if m.checkAttempts {
			if e.used == nil {
				e.used = map[string]int{}
			}
			if l.Attempt <= e.used[l.Event.Namespace] {
				m.fatalf("leased %s/%s at attempt %d, already handed out (highest counted %d)", l.Event.Namespace, id, l.Attempt, e.used[l.Event.Namespace])
			}
			e.used[l.Event.Namespace] = l.Attempt
			if m.failing && m.excuseFailedRecords {
				e.unsure = true // its record may have failed (documented)
			}
		}
		e.stored = true
		e.holder, e.attempt, e.leaseNS = holder, l.Attempt, l.Event.Namespace
		m.counts.leased++
		if l.Event.Namespace != e.ns {
			m.counts.deadLettered++
		}
	}
}

// held picks up to n of the events holder holds.
func (m *queueModel) held(holder string, n int) []string {
	var ids []string
	for _, id := range m.ids {
		if m.events[id].holder == holder {
			ids = append(ids, id)
		}
	}
	m.r.Shuffle(len(ids), func(i, j int) { ids[i], ids[j] = ids[j], ids[i] })
	return ids[:min(n, len(ids))]
}

func (m *queueModel) refs(ids []string) []LeaseRef {
	refs := make([]LeaseRef, len(ids))
	for i, id := range ids {
		e := m.events[id]
		refs[i] = LeaseRef{ID: id, Attempt: e.attempt, Namespace: e.leaseNS}
	}
	return refs
}

var noop = op{call: func() {}, apply: func() {}}

// pick picks up to n of holder's events to settle, and who sends the call:
// holder, or with byOther the next holder (whose call is stale).
func (m *queueModel) pick(holder string, n int, byOther bool) ([]string, []LeaseRef, string) {
	ids := m.held(holder, n)
	sender := holder
	if byOther {
		sender = modelHolders[(slices.Index(modelHolders, holder)+1)%len(modelHolders)]
	}
	return ids, m.refs(ids), sender
}

// expect checks that every result of a call by sender has status want.
func (m *queueModel) expect(res []SettleResult, want SettleStatus, sender, holder string) {
	for _, r := range res {
		if r.Status != want {
			m.fatalf("%s's call for %s held by %s: %v, want %v", sender, r.ID, holder, r.Status, want)
		}
	}
}

// ack acks some of holder's events; byOther has another holder send the
// ack, which is stale and changes nothing.
func (m *queueModel) ack(holder string, byOther bool) op {
	ids, refs, sender := m.pick(holder, 1+m.r.IntN(10), byOther)
	if len(ids) == 0 {
		return noop
	}
	var res []SettleResult
	var err error
	return op{
		call: func() { res, err = m.q.Ack(context.Background(), sender, refs) },
		apply: func() {
			m.note("ack by %s of %v held by %s: err %v", sender, ids, holder, err)
			if !byOther {
				m.settled(ids, res, err, func(e *modelEvent) { e.acked = true; m.counts.acked++ })
				return
			}
			if err == nil { // an error changes nothing either way
				m.expect(res, SettleStale, sender, holder)
			}
		},
	}
}

func (m *queueModel) nack(holder string) op {
	ids := m.held(holder, 1+m.r.IntN(10))
	if len(ids) == 0 {
		return noop
	}
	refs := m.refs(ids)
	// Some nacks delay the event, some give back deliveries unseen (not
	// counted as attempts).
	var delay time.Duration
	if m.r.IntN(4) == 0 {
		delay = time.Duration(1+m.r.IntN(3)) * time.Millisecond
	}
	unseen := m.r.IntN(8) == 0
	for i := range refs {
		refs[i].Unseen = unseen
	}
	var res []SettleResult
	var err error
	return op{
		call: func() { res, err = m.q.Nack(context.Background(), holder, refs, delay, "model nack") },
		apply: func() {
			m.note("nack by %s of %v (delay %v, unseen %v): err %v", holder, ids, delay, unseen, err)
			if err != nil && unseen {
				// A failed call may have been applied: the count given back.
				for _, id := range ids {
					if e := m.events[id]; e.used != nil {
						e.used[e.leaseNS] = min(e.used[e.leaseNS], e.attempt-1)
					}
				}
			}
			m.settled(ids, res, err, func(e *modelEvent) {
				m.counts.nacked++
				if unseen && e.used != nil {
					e.used[e.leaseNS] = e.attempt - 1 // an unseen nack gives the count back
				}
			})
		},
	}
}

// extend extends some of holder's leases; byOther has another holder ask,
// which is stale.
func (m *queueModel) extend(holder string, byOther bool) op {
	ids, refs, sender := m.pick(holder, 1+m.r.IntN(5), byOther)
	if len(ids) == 0 {
		return noop
	}
	var res []SettleResult
	var err error
	return op{
		call: func() { res, err = m.q.Extend(context.Background(), sender, refs, time.Hour) },
		apply: func() {
			m.note("extend by %s of %v held by %s: err %v", sender, ids, holder, err)
			if err != nil {
				if !m.failing {
					m.fatalf("Extend without injected failures: %v", err)
				}
				m.callFailed()
				return // the leases stay as they were
			}
			want := SettleOK
			if byOther {
				want = SettleStale
			}
			m.expect(res, want, sender, holder)
		},
	}
}

// settled records the outcome of an ack or nack of ids by their holder.
func (m *queueModel) settled(ids []string, res []SettleResult, err error, ok func(*modelEvent)) {
	if err != nil {
		if !m.failing {
			m.fatalf("settle without injected failures: %v", err)
		}
		for _, id := range ids {
			m.events[id].holder = "" // held or not: unknown
		}
		m.callFailed()
		return
	}
	for i, r := range res {
		e := m.events[ids[i]]
		if r.ID != ids[i] || r.Status != SettleOK {
			m.fatalf("settle of %s (attempt %d) by its holder %s: %s %v, want ok", ids[i], e.attempt, e.holder, r.ID, r.Status)
		}
		e.holder = ""
		ok(e)
	}
}

// ackSettled acks events already acked: never applied again.
func (m *queueModel) ackSettled() op {
	var refs []LeaseRef
	for _, id := range m.ids {
		if e := m.events[id]; e.acked && len(refs) < 3 && m.r.IntN(4) == 0 {
			refs = append(refs, LeaseRef{ID: id, Attempt: 1, Namespace: e.ns})
		}
	}
	if len(refs) == 0 {
		return noop
	}
	var res []SettleResult
	var err error
	return op{
		call: func() { res, err = m.q.Ack(context.Background(), modelHolders[0], refs) },
		apply: func() {
			m.note("ack of %d settled events: err %v", len(refs), err)
			if err != nil {
				return
			}
			for _, r := range res {
				if r.Status == SettleOK {
					m.fatalf("ack of %s, acked before: ok", r.ID)
				}
			}
		},
	}
}

func (m *queueModel) release(holder string) op {
	var err error
	return op{
		call: func() { err = m.q.Release(context.Background(), holder) },
		apply: func() {
			m.note("release %s: err %v", holder, err)
			if err != nil {
				if !m.failing {
					m.fatalf("Release: %v", err)
				}
				m.callFailed()
			}
			for _, e := range m.events {
				if e.holder == holder {
					e.holder = ""
				}
			}
		},
	}
}

func (m *queueModel) doReopen() {
	crash := m.r.IntN(2) == 0
	m.note("reopen (crash %v)", crash)
	m.counts.reopens++
	// The stored state survives a reopen: the same events (leased ones
	// ready again), the same bytes, whatever failed before.
	before := m.stats()
	m.q = m.reopen(m.q, crash)
	after := m.stats()
	for i, b := range before {
		if a := after[i]; b.Ready+b.Leased+b.Delayed != a.Ready+a.Leased+a.Delayed || b.Bytes != a.Bytes {
			m.fatalf("reopen changed %s: before %+v, after %+v (injected failures: %v)", b.Namespace, b, a, m.failing)
		}
	}
	m.failing = false
	for _, e := range m.events {
		e.holder = "" // leases end with the process
		if e.unsure && crash {
			// Delivered while commits failed: its lease record may be
			// lost with the process (RELIABILITY.md, finding 3).
			e.used = nil
		}
		e.unsure = false
	}
}

// drain turns failures off, reopens, and leases and acks everything left.
func (m *queueModel) drain() {
	if m.failures != nil {
		m.failures(m.q, 0)
		m.failing = false
	}
	for _, h := range modelHolders {
		o := m.release(h)
		o.call()
		o.apply()
	}
	if m.reopen != nil {
		m.doReopen()
	}
	for round := 0; ; round++ {
		if round > 10000 {
			m.fatalf("drain did not end")
		}
		ls, err := m.q.Lease(context.Background(), LeaseRequest{Holder: "drain", Namespaces: modelAll, Limit: 100, AckDeadline: time.Hour})
		if err != nil {
			m.fatalf("drain: Lease: %v", err)
		}
		if len(ls) == 0 {
			// None leased: done, unless events wait out a nack delay, or
			// are ready all the same: a Lease that finds an event overdue
			// for dead-lettering moves it to its dead-letter namespace and
			// may return nothing (the event is ready there for the next
			// call; a flake of this drain in CI, 2026-11-27).
			pending := 0
			for _, st := range m.stats() {
				pending += st.Delayed + st.Ready
			}
			if pending == 0 {
				break
			}
			time.Sleep(time.Millisecond) // nack delays of a few milliseconds
			continue
		}
		m.took("drain", ls)
		ids := make([]string, len(ls))
		for i, l := range ls {
			ids[i] = l.Event.ID
		}
		res, err := m.q.Ack(context.Background(), "drain", m.refs(ids))
		m.note("drain: ack %d: err %v", len(ids), err)
		m.settled(ids, res, err, func(e *modelEvent) { e.acked = true })
	}
	for _, id := range m.ids {
		if e := m.events[id]; e.stored && !e.acked {
			m.fatalf("%s (published to %s) was stored and never came out", id, e.ns)
		}
	}
	for _, s := range m.stats() {
		if s.Ready != 0 || s.Leased != 0 || s.Delayed != 0 || s.Bytes != 0 {
			m.fatalf("drained, but Stats(%s) = %+v", s.Namespace, s)
		}
	}
}

func (m *queueModel) stats() []NamespaceStats {
	stats, err := m.q.Stats(context.Background(), modelAll...)
	if err != nil || len(stats) != len(modelAll) {
		m.fatalf("Stats: %d namespaces, %v", len(stats), err)
	}
	return stats
}

// checkLimit checks that no namespace holds more events than the limit.
//
// A dead-letter move takes its event out of the namespace when it is
// decided; if its commit fails, the event comes back, even into a namespace
// that publishes have filled meanwhile: nothing is dropped to keep a limit.
// So after a failed call a namespace may be over the limit, until it is
// back under it.
func (m *queueModel) checkLimit() {
	if m.limit == 0 {
		return
	}
	for _, st := range m.stats() {
		n := st.Ready + st.Leased + st.Delayed
		switch {
		case n <= m.limit:
			delete(m.excused, st.Namespace)
		case !m.excused[st.Namespace]:
			m.fatalf("%s holds %d events, over its limit of %d: %+v", st.Namespace, n, m.limit, st)
		}
	}
}

// callFailed notes a call that failed (an injected commit failure).
func (m *queueModel) callFailed() {
	m.counts.failedCalls++
	m.excuse(modelAll...)
}

// excuse lets namespaces (and their dead-letter namespaces) be over the
// limit until they are back under it (see checkLimit).
func (m *queueModel) excuse(nss ...string) {
	if m.excused == nil {
		m.excused = make(map[string]bool)
	}
	for _, ns := range nss {
		m.excused[ns] = true
		m.excused[strings.TrimSuffix(ns, DeadLetterSuffix)+DeadLetterSuffix] = true
	}
}

// copyLive copies a live Badger directory as a kill -9 would leave it: a
// copy during which Badger's background work finished a flush or a
// compaction (files appeared or went, the manifest grew) mixes two states
// no crash can leave, and is made again.
func copyLive(t *testing.T, src string) string {
	t.Helper()
	for range 50 {
		before, err := dirState(src)
		if err != nil {
			t.Fatal(err)
		}
		dst := t.TempDir()
		if copyFiles(src, dst) != nil {
			continue // a file went away during the copy
		}
		if after, err := dirState(src); err == nil && after == before {
			return dst
		}
	}
	t.Fatal("no consistent copy of the live directory in 50 tries")
	return ""
}

// dirState lists a directory's files and subdirectories' files, with the
// manifest's size.
func dirState(dir string) (string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	var state string
	for _, e := range ents {
		state += e.Name() + " "
		if e.IsDir() {
			sub, err := dirState(filepath.Join(dir, e.Name()))
			if err != nil {
				return "", err
			}
			state += "[" + sub + "] "
		}
		if e.Name() == "MANIFEST" {
			if fi, err := e.Info(); err == nil {
				state += strconv.FormatInt(fi.Size(), 10) + " "
			}
		}
	}
	return state, nil
}

// copyFiles copies the files of directory src into dst, then its
// subdirectories (the segments: written before the Badger commits that
// point into them, so copied after those).
func copyFiles(src, dst string) error {
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	var dirs []string
	for _, e := range ents {
		if e.IsDir() {
			dirs = append(dirs, e.Name())
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
			return err
		}
	}
	for _, d := range dirs {
		if err := os.MkdirAll(filepath.Join(dst, d), 0o755); err != nil {
			return err
		}
		if err := copyFiles(filepath.Join(src, d), filepath.Join(dst, d)); err != nil {
			return err
		}
	}
	return nil
}
