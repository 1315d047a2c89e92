package h3xtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/h3x-io/h3x"
)

// QueueFactory opens a fresh, empty queue for the test t, configured by opts.
// The factory maps the semantic options (DedupWindow, MaxAttempts,
// MaxEventsPerNamespace, MaxBytesPerNamespace) to its backend; the others
// may be ignored.
//
// If the backend can reopen the same storage (a restart), the factory also
// returns reopen: each call closes the queue reopen last returned (q, the
// first time) and returns a new queue over the same storage with the same
// options. Otherwise reopen is nil and the subtests that need a restart are
// skipped.
//
// The factory may call t.Fatal, t.TempDir and t.Cleanup. The suite closes
// every queue it gets before the test that opened it ends; a factory may
// close it again in its own cleanup (Close must be idempotent).
type QueueFactory func(t testing.TB, opts h3x.QueueOptions) (q h3x.Queue, reopen func() h3x.Queue)

// TestQueue checks that the queues newQueue opens meet the contracts
// documented on h3x.Queue, h3x.LeaseRequest, h3x.LeaseRef,
// h3x.NamespaceStats and the semantic fields of h3x.QueueOptions. Every
// contract is a named subtest, so a failure names the broken contract, and
// one can be rerun alone, e.g. -run 'TestRedisQueue/Settle/Ack/StaleAfterReLease'.
//
// A backend runs the suite from its own tests:
//
//	func TestRedisQueue(t *testing.T) {
//		h3xtest.TestQueue(t, func(t testing.TB, opts h3x.QueueOptions) (h3x.Queue, func() h3x.Queue) {
//			q, err := redisqueue.Open(redisAddr(t), redisqueue.Options{
//				DedupWindow: opts.DedupWindow,
//				MaxAttempts: opts.MaxAttempts,
//				// ... and the per-namespace limits
//			})
//			if err != nil {
//				t.Fatal(err)
//			}
//			return q, nil // no reopen: the restart subtests are skipped
//		})
//	}
//
// Subtests that involve time (ack deadlines, nack delays, the dedup window,
// Wait, Stats) run inside testing/synctest bubbles, and the factory is called
// inside the bubble: the queue must take its time from the time package
// (time.Now, timers, time.Sleep) so that the bubble's fake clock drives it,
// and Wait must block on something the bubble can see (a channel, a
// sync.Cond or a timer created in the bubble), so that an idle Wait counts as
// durably blocked. The other subtests use the real clock.
//
// The suite uses namespaces "orders", "audit" and "billing" and their
// dead-letter namespaces, holders named "a", "b", "c" and "leaser-N", and
// client IDs of the form "evt-0001". Event byte sizes are only assumed to be
// the data length plus less than 250 bytes of overhead.
func TestQueue(t *testing.T, newQueue QueueFactory) {
	s := &queueSuite{newQueue: newQueue}
	s.probe(t)
	t.Run("Enqueue", s.testEnqueue)
	t.Run("Dedup", s.testDedup)
	t.Run("Order", s.testOrder)
	t.Run("Lease", s.testLease)
	t.Run("Settle", s.testSettle)
	t.Run("Extend", s.testExtend)
	t.Run("Attempts", s.testAttempts)
	t.Run("DeadLetter", s.testDeadLetter)
	t.Run("Limits", s.testLimits)
	t.Run("Wait", s.testWait)
	t.Run("Stats", s.testStats)
	t.Run("Reopen", s.testReopen)
	t.Run("Concurrency", s.testConcurrency)
	t.Run("Close", s.testClose)
}

// Names used throughout the suite.
const (
	nsA = "orders"
	nsB = "audit"
	nsC = "billing"

	// leaseTime is the AckDeadline of the suite's leases unless a subtest
	// needs its own.
	leaseTime = time.Minute
	// slack is how late (or early, for stored times) a deadline, delay or
	// timestamp may be observed: backends may store times at coarser
	// precision than the clock's.
	slack = time.Second
)

type queueSuite struct {
	newQueue  QueueFactory
	canReopen bool
}

// probe opens and closes one queue, to learn whether the backend can reopen.
func (s *queueSuite) probe(t *testing.T) {
	t.Helper()
	q, reopen := s.newQueue(t, h3x.QueueOptions{})
	if q == nil {
		t.Fatal("h3xtest: the QueueFactory returned a nil Queue")
	}
	s.canReopen = reopen != nil
	if err := q.Close(); err != nil {
		t.Fatalf("Close of a fresh queue: %v", err)
	}
}

// needReopen skips t if the backend cannot reopen its storage. Call it
// outside a synctest bubble.
func (s *queueSuite) needReopen(t *testing.T) {
	t.Helper()
	if !s.canReopen {
		t.Skip("the QueueFactory returns no reopen function")
	}
}

// inBubble runs f as subtest name inside a synctest bubble.
func inBubble(t *testing.T, name string, f func(t *testing.T)) {
	t.Run(name, func(t *testing.T) { synctest.Test(t, f) })
}

// harness wraps one queue under test with helpers that fail t on any
// contract violation they see on the way.
type harness struct {
	t        testing.TB
	ctx      context.Context
	q        h3x.Queue
	reopenFn func() h3x.Queue
	opened   []h3x.Queue
	n        int // events made so far, for IDs
}

func (s *queueSuite) open(t testing.TB, opts h3x.QueueOptions) *harness {
	t.Helper()
	q, reopen := s.newQueue(t, opts)
	if q == nil {
		t.Fatal("h3xtest: the QueueFactory returned a nil Queue")
	}
	h := &harness{t: t, ctx: context.Background(), q: q, reopenFn: reopen, opened: []h3x.Queue{q}}
	t.Cleanup(h.closeAll)
	return h
}

func (h *harness) closeAll() {
	for _, q := range h.opened {
		if err := q.Close(); err != nil && !errors.Is(err, h3x.ErrQueueClosed) {
			h.t.Errorf("Close: %v", err)
		}
	}
}

// reopen restarts the queue over the same storage.
func (h *harness) reopen() {
	h.t.Helper()
	if h.reopenFn == nil {
		h.t.Fatal("h3xtest: reopen needed but the QueueFactory returned none")
	}
	q := h.reopenFn()
	if q == nil {
		h.t.Fatal("h3xtest: reopen returned a nil Queue")
	}
	h.q = q
	h.opened = append(h.opened, q)
}

// event makes an event in ns with a fresh client ID.
func (h *harness) event(ns string) h3x.Event {
	h.n++
	return h3x.Event{
		ID:        fmt.Sprintf("evt-%04d", h.n),
		Namespace: ns,
		Type:      "h3xtest.event",
		Message:   fmt.Sprintf("event %d", h.n),
		Data:      fmt.Appendf(nil, `{"n":%d}`, h.n),
	}
}

// events makes n events in ns.
func (h *harness) events(ns string, n int) []h3x.Event {
	evs := make([]h3x.Event, n)
	for i := range evs {
		evs[i] = h.event(ns)
	}
	return evs
}

// bigEvent makes an event in ns with size bytes of data.
func (h *harness) bigEvent(ns string, size int) h3x.Event {
	e := h.event(ns)
	e.Data = bytes.Repeat([]byte{'x'}, size)
	return e
}

// enqueue enqueues evs, failing on an error or a malformed result list.
func (h *harness) enqueue(evs ...h3x.Event) []h3x.PublishResult {
	h.t.Helper()
	res, err := h.q.Enqueue(h.ctx, evs)
	if err != nil {
		h.t.Fatalf("Enqueue of %d events: %v", len(evs), err)
	}
	if len(res) != len(evs) {
		h.t.Fatalf("Enqueue of %d events returned %d results, want one per event", len(evs), len(res))
	}
	for i, r := range res {
		if evs[i].ID != "" && r.ID != evs[i].ID {
			h.t.Errorf("Enqueue result %d has ID %q, want the event's own ID %q", i, r.ID, evs[i].ID)
		}
		if r.ID == "" {
			h.t.Errorf("Enqueue result %d has no ID", i)
		}
		if r.Status == h3x.PublishRefused && r.Err == nil {
			h.t.Errorf("Enqueue result %d (%s) is refused without an Err", i, r.ID)
		}
	}
	return res
}

// publish enqueues evs and requires every one to be stored; it returns their IDs.
func (h *harness) publish(evs ...h3x.Event) []string {
	h.t.Helper()
	res := h.enqueue(evs...)
	ids := make([]string, len(res))
	for i, r := range res {
		if r.Status != h3x.PublishStored {
			h.t.Fatalf("Enqueue result %d (%s): %v (err %v), want stored", i, r.ID, r.Status, r.Err)
		}
		ids[i] = r.ID
	}
	return ids
}

func (h *harness) lease(holder string, limit int, namespaces ...string) []h3x.Lease {
	h.t.Helper()
	return h.leaseReq(h3x.LeaseRequest{Holder: holder, Namespaces: namespaces, Limit: limit, AckDeadline: leaseTime})
}

func (h *harness) leaseReq(req h3x.LeaseRequest) []h3x.Lease {
	h.t.Helper()
	ls, err := h.q.Lease(h.ctx, req)
	if err != nil {
		h.t.Fatalf("Lease(holder %q, %v, limit %d): %v", req.Holder, req.Namespaces, req.Limit, err)
	}
	checkLeases(h.t, req, ls)
	return ls
}

// checkLeases checks what holds for every Lease result. It may be called
// from any goroutine.
func checkLeases(t testing.TB, req h3x.LeaseRequest, ls []h3x.Lease) {
	t.Helper()
	if len(ls) > req.Limit {
		t.Errorf("Lease with Limit %d returned %d events", req.Limit, len(ls))
	}
	seen := make(map[string]bool, len(ls))
	for _, l := range ls {
		if seen[l.Event.ID] {
			t.Errorf("Lease returned event %s twice in one call", l.Event.ID)
		}
		seen[l.Event.ID] = true
		if l.Attempt < 1 {
			t.Errorf("Lease returned event %s with attempt %d, want >= 1", l.Event.ID, l.Attempt)
		}
		if !slices.Contains(req.Namespaces, l.Event.Namespace) {
			t.Errorf("Lease from %v returned event %s of namespace %q", req.Namespaces, l.Event.ID, l.Event.Namespace)
		}
		if l.Deadline.IsZero() {
			t.Errorf("Lease returned event %s without a Deadline", l.Event.ID)
		}
	}
}

// leaseOne leases from ns and requires exactly one event.
func (h *harness) leaseOne(holder, ns string) h3x.Lease {
	h.t.Helper()
	ls := h.lease(holder, 1, ns)
	if len(ls) != 1 {
		h.t.Fatalf("Lease by %q from %q returned no event, want one", holder, ns)
	}
	return ls[0]
}

// leaseNone requires that holder can lease nothing from namespaces.
func (h *harness) leaseNone(holder, when string, namespaces ...string) {
	h.t.Helper()
	if ls := h.lease(holder, 100, namespaces...); len(ls) != 0 {
		h.t.Fatalf("%s: Lease by %q from %v returned %s, want nothing", when, holder, namespaces, describe(ls))
	}
}

// drain leases (limit at a time) and acks everything ready in namespaces, and
// returns the leases in delivery order.
func (h *harness) drain(holder string, limit int, namespaces ...string) []h3x.Lease {
	h.t.Helper()
	var all []h3x.Lease
	for range 10_000 {
		ls := h.lease(holder, limit, namespaces...)
		if len(ls) == 0 {
			return all
		}
		wantAllOK(h.t, "Ack while draining", h.ack(holder, refsOf(ls)...))
		all = append(all, ls...)
	}
	h.t.Fatalf("drain: still events after 10000 leases")
	return nil
}

func (h *harness) ack(holder string, refs ...h3x.LeaseRef) []h3x.SettleStatus {
	h.t.Helper()
	res, err := h.q.Ack(h.ctx, holder, refs)
	return h.settled("Ack", holder, refs, res, err)
}

func (h *harness) nack(holder string, delay time.Duration, reason string, refs ...h3x.LeaseRef) []h3x.SettleStatus {
	h.t.Helper()
	res, err := h.q.Nack(h.ctx, holder, refs, delay, reason)
	return h.settled("Nack", holder, refs, res, err)
}

func (h *harness) extend(holder string, d time.Duration, refs ...h3x.LeaseRef) []h3x.SettleStatus {
	h.t.Helper()
	res, err := h.q.Extend(h.ctx, holder, refs, d)
	return h.settled("Extend", holder, refs, res, err)
}

func (h *harness) settled(op, holder string, refs []h3x.LeaseRef, res []h3x.SettleResult, err error) []h3x.SettleStatus {
	h.t.Helper()
	if err != nil {
		h.t.Fatalf("%s by %q of %v: %v", op, holder, refs, err)
	}
	if len(res) != len(refs) {
		h.t.Fatalf("%s of %d refs returned %d results, want one per ref", op, len(refs), len(res))
	}
	st := make([]h3x.SettleStatus, len(res))
	for i, r := range res {
		if r.ID != refs[i].ID {
			h.t.Errorf("%s result %d has ID %q, want %q (results in ref order)", op, i, r.ID, refs[i].ID)
		}
		if r.Status == h3x.SettleDenied {
			h.t.Errorf("%s result %d is SettleDenied, which only a server sets", op, i)
		}
		st[i] = r.Status
	}
	return st
}

func (h *harness) release(holder string) {
	h.t.Helper()
	if err := h.q.Release(h.ctx, holder); err != nil {
		h.t.Fatalf("Release(%q): %v", holder, err)
	}
}

// stats returns ns's stats; a namespace left out of the answer counts as all
// zero.
func (h *harness) stats(ns string) h3x.NamespaceStats {
	h.t.Helper()
	all, err := h.q.Stats(h.ctx, ns)
	if err != nil {
		h.t.Fatalf("Stats(%q): %v", ns, err)
	}
	for _, st := range all {
		if st.Namespace == ns {
			return st
		}
	}
	return h3x.NamespaceStats{Namespace: ns}
}

// counts are the integer counts of NamespaceStats.
type counts struct{ Ready, Leased, Delayed, DeadLettered int }

func (h *harness) wantCounts(step, ns string, want counts) h3x.NamespaceStats {
	h.t.Helper()
	st := h.stats(ns)
	if got := (counts{st.Ready, st.Leased, st.Delayed, st.DeadLettered}); got != want {
		h.t.Errorf("%s: Stats(%q) = %+v, want %+v", step, ns, got, want)
	}
	return st
}

func refOf(l h3x.Lease) h3x.LeaseRef { return h3x.LeaseRef{ID: l.Event.ID, Attempt: l.Attempt} }

func refsOf(ls []h3x.Lease) []h3x.LeaseRef {
	refs := make([]h3x.LeaseRef, len(ls))
	for i, l := range ls {
		refs[i] = refOf(l)
	}
	return refs
}

func idsOf(ls []h3x.Lease) []string {
	ids := make([]string, len(ls))
	for i, l := range ls {
		ids[i] = l.Event.ID
	}
	return ids
}

func describe(ls []h3x.Lease) string {
	parts := make([]string, len(ls))
	for i, l := range ls {
		parts[i] = fmt.Sprintf("%s#%d(%s)", l.Event.ID, l.Attempt, l.Event.Namespace)
	}
	return "[" + strings.Join(parts, " ") + "]"
}

func wantStatus(t testing.TB, what string, got []h3x.SettleStatus, want ...h3x.SettleStatus) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("%s: %v, want %v", what, got, want)
	}
}

func wantAllOK(t testing.TB, what string, got []h3x.SettleStatus) {
	t.Helper()
	for _, st := range got {
		if st != h3x.SettleOK {
			t.Errorf("%s: %v, want all ok", what, got)
			return
		}
	}
}

func wantIDs(t testing.TB, what string, got, want []string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("%s: got %v, want %v", what, got, want)
	}
}

// wantRefusedFull checks a result refused for a full namespace.
func wantRefusedFull(t testing.TB, r h3x.PublishResult) {
	t.Helper()
	if r.Status != h3x.PublishRefused {
		t.Errorf("Enqueue of %s into a full namespace: %v, want refused", r.ID, r.Status)
		return
	}
	if !errors.Is(r.Err, h3x.ErrQueueFull) {
		t.Errorf("refused %s: Err %v does not match h3x.ErrQueueFull", r.ID, r.Err)
	}
	var e *h3x.Error
	if !errors.As(r.Err, &e) {
		t.Errorf("refused %s: Err %v is not an *h3x.Error", r.ID, r.Err)
	} else if e.RetryAfter <= 0 {
		t.Errorf("refused %s: RetryAfter %v, want > 0", r.ID, e.RetryAfter)
	}
}

// isUUIDv4 reports whether s is a UUID in canonical text form with version 4
// and the RFC 9562 variant.
func isUUIDv4(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := range len(s) {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !strings.ContainsRune("0123456789abcdefABCDEF", rune(c)) {
				return false
			}
		}
	}
	return s[14] == '4' && strings.ContainsRune("89abAB", rune(s[19]))
}

// sameEvent reports how got differs from want, or "" if it does not.
func sameEvent(got, want h3x.Event) string {
	var diffs []string
	if got.ID != want.ID {
		diffs = append(diffs, fmt.Sprintf("ID %q, want %q", got.ID, want.ID))
	}
	if got.Namespace != want.Namespace {
		diffs = append(diffs, fmt.Sprintf("Namespace %q, want %q", got.Namespace, want.Namespace))
	}
	if got.Type != want.Type {
		diffs = append(diffs, fmt.Sprintf("Type %q, want %q", got.Type, want.Type))
	}
	if got.Message != want.Message {
		diffs = append(diffs, fmt.Sprintf("Message %q, want %q", got.Message, want.Message))
	}
	if !bytes.Equal(got.Data, want.Data) {
		diffs = append(diffs, fmt.Sprintf("Data %q, want %q", got.Data, want.Data))
	}
	if !got.Time.Equal(want.Time) {
		diffs = append(diffs, fmt.Sprintf("Time %v, want %v", got.Time, want.Time))
	}
	if !maps.Equal(got.Metadata, want.Metadata) {
		diffs = append(diffs, fmt.Sprintf("Metadata %v, want %v", got.Metadata, want.Metadata))
	}
	return strings.Join(diffs, "; ")
}

// --- Enqueue -----------------------------------------------------------------

func (s *queueSuite) testEnqueue(t *testing.T) {
	t.Run("AssignsUUIDv4", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		ids := h.publish(
			h3x.Event{Namespace: nsA, Type: "t"},
			h3x.Event{Namespace: nsA, Type: "t"},
			h3x.Event{Namespace: nsB, Type: "t"},
		)
		for i, id := range ids {
			if !isUUIDv4(id) {
				t.Errorf("event %d: assigned ID %q is not a UUIDv4 (8-4-4-4-12 hex digits, version 4, variant 10xx)", i, id)
			}
		}
		if len(slices.Compact(slices.Sorted(slices.Values(ids)))) != len(ids) {
			t.Errorf("assigned IDs %v are not distinct", ids)
		}
		got := idsOf(h.drain("c", 10, nsA, nsB))
		slices.Sort(got)
		wantIDs(t, "delivered IDs", got, slices.Sorted(slices.Values(ids)))
	})

	t.Run("KeepsID", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		e := h.event(nsA)
		e.ID = "client-chosen-id"
		ids := h.publish(e)
		wantIDs(t, "result ID", ids, []string{e.ID})
		wantIDs(t, "delivered ID", idsOf(h.drain("c", 10, nsA)), []string{e.ID})
	})

	t.Run("AssignsTime", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		before := time.Now()
		h.publish(h3x.Event{Namespace: nsA, Type: "t"})
		after := time.Now()
		got := h.leaseOne("c", nsA).Event.Time
		if got.IsZero() || got.Before(before.Add(-slack)) || got.After(after.Add(slack)) {
			t.Errorf("assigned Time %v, want the time of Enqueue (between %v and %v)", got, before, after)
		}
	})

	t.Run("KeepsTime", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		e := h.event(nsA)
		e.Time = time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)
		h.publish(e)
		if got := h.leaseOne("c", nsA).Event.Time; !got.Equal(e.Time) {
			t.Errorf("delivered Time %v, want the event's own %v", got, e.Time)
		}
	})

	t.Run("RoundTrip", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		e := h3x.Event{
			ID:        "round-trip",
			Namespace: nsA,
			Type:      "order.created",
			Message:   "héllo, wörld",
			Data:      []byte{0, 1, 2, 0xff, '{', '}', 0},
			Time:      time.Date(2022, 1, 2, 3, 4, 5, 0, time.UTC),
			Metadata:  map[string]string{"severity": "warn", "service": "api", "empty": ""},
		}
		h.publish(e)
		if d := sameEvent(h.leaseOne("c", nsA).Event, e); d != "" {
			t.Errorf("delivered event differs from the published one: %s", d)
		}
	})

	t.Run("CopiesEvents", func(t *testing.T) {
		// The queue stores the event, not the caller's buffers: changing the
		// published or the delivered event afterwards changes nothing stored.
		h := s.open(t, h3x.QueueOptions{})
		e := h.event(nsA)
		e.Metadata = map[string]string{"k": "v"}
		want := e
		want.Data = bytes.Clone(e.Data)
		want.Metadata = maps.Clone(e.Metadata)
		h.publish(e)
		e.Data[0] = '!'
		e.Metadata["k"] = "changed by the publisher"
		l := h.leaseOne("a", nsA)
		if !bytes.Equal(l.Event.Data, want.Data) || !maps.Equal(l.Event.Metadata, want.Metadata) {
			t.Errorf("after the publisher changed its event: delivered Data %q Metadata %v, want %q %v", l.Event.Data, l.Event.Metadata, want.Data, want.Metadata)
		}
		if len(l.Event.Data) > 0 {
			l.Event.Data[0] = '?'
		}
		if l.Event.Metadata != nil {
			l.Event.Metadata["k"] = "changed by the consumer"
		}
		wantAllOK(t, "Nack", h.nack("a", 0, "", refOf(l)))
		l = h.leaseOne("b", nsA)
		if !bytes.Equal(l.Event.Data, want.Data) || l.Event.Metadata["k"] != "v" {
			t.Errorf("after a consumer changed its delivered event: Data %q Metadata %v, want %q %v", l.Event.Data, l.Event.Metadata, want.Data, want.Metadata)
		}
	})

	t.Run("OneResultPerEventInOrder", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		nss := []string{nsA, nsB, nsC}
		var batch []h3x.Event
		for i := range 30 {
			e := h.event(nss[i%3])
			if i%4 == 0 {
				e.ID = "" // assigned
			}
			batch = append(batch, e)
		}
		ids := h.publish(batch...) // enqueue checks that given IDs come back in order
		for _, ns := range nss {
			var want []string
			for i, e := range batch {
				if e.Namespace == ns {
					want = append(want, ids[i])
				}
			}
			wantIDs(t, "delivery order of "+ns, idsOf(h.drain("c", 100, ns)), want)
		}
	})

	t.Run("NoLimitsByDefault", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.events(nsA, 500)...)
		h.wantCounts("after 500 events", nsA, counts{Ready: 500})
	})
}

// --- Dedup -------------------------------------------------------------------

func (s *queueSuite) testDedup(t *testing.T) {
	t.Run("SameBatch", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		e := h.event(nsA)
		res := h.enqueue(e, e)
		if res[0].Status != h3x.PublishStored || res[1].Status != h3x.PublishDuplicate {
			t.Errorf("one ID twice in a batch: %v, %v; want stored, duplicate", res[0].Status, res[1].Status)
		}
		wantIDs(t, "delivered", idsOf(h.drain("c", 10, nsA)), []string{e.ID})
	})

	// Republish the same ID while the first copy is in each state.
	for _, state := range []string{"Ready", "Leased", "Acked"} {
		t.Run("Republish"+state, func(t *testing.T) {
			h := s.open(t, h3x.QueueOptions{})
			e := h.event(nsA)
			h.publish(e)
			var delivered []string
			switch state {
			case "Leased":
				delivered = append(delivered, h.leaseOne("a", nsA).Event.ID)
			case "Acked":
				delivered = append(delivered, idsOf(h.drain("a", 10, nsA))...)
			}
			res := h.enqueue(e)
			if res[0].Status != h3x.PublishDuplicate {
				t.Errorf("republish of a %s ID: %v (err %v), want duplicate", strings.ToLower(state), res[0].Status, res[0].Err)
			}
			h.release("a")
			delivered = append(delivered, idsOf(h.drain("c", 10, nsA))...)
			if state == "Leased" {
				delivered = delivered[1:] // the released lease delivers it again
			}
			wantIDs(t, "deliveries", delivered, []string{e.ID})
		})
	}

	t.Run("DistinctIDsAreNotDuplicates", func(t *testing.T) {
		// Only the same ID is a duplicate: IDs that share all but their
		// last characters (sequential or time-ordered IDs a publisher
		// makes itself) are all stored, UUID-shaped or not.
		h := s.open(t, h3x.QueueOptions{})
		var events []h3x.Event
		for _, id := range []string{
			"00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002",
			"0b8e4f7c-1d2e-4f3a-9b8c-2a3b40000000", "0b8e4f7c-1d2e-4f3a-9b8c-2a3b4fffffff",
			"01890f3e-7b2a-7c3d-8e4f-5a6b7c8d9e00", "01890f3e-7b2a-7c3d-8e4f-5a6b7c8d9e01", // UUIDv7-like
			"order-1", "order-2",
		} {
			e := h.event(nsA)
			e.ID = id
			events = append(events, e)
		}
		res := h.enqueue(events...)
		want := make([]string, len(events))
		for i, r := range res {
			want[i] = events[i].ID
			if r.Status != h3x.PublishStored {
				t.Errorf("ID %s: %v (err %v), want stored: it is no other ID's duplicate", events[i].ID, r.Status, r.Err)
			}
		}
		wantIDs(t, "delivered", idsOf(h.drain("c", 20, nsA)), want)
	})

	t.Run("AcrossNamespaces", func(t *testing.T) {
		// IDs are unique across the namespaces of a queue.
		h := s.open(t, h3x.QueueOptions{})
		e := h.event(nsA)
		h.publish(e)
		e.Namespace = nsB
		if res := h.enqueue(e); res[0].Status != h3x.PublishDuplicate {
			t.Errorf("same ID into another namespace: %v, want duplicate", res[0].Status)
		}
		wantIDs(t, "delivered from "+nsA, idsOf(h.drain("c", 10, nsA)), []string{e.ID})
		h.leaseNone("c", "the duplicate in another namespace", nsB)
	})

	// Within the window an ID is a duplicate; after it, stored again.
	for _, tc := range []struct {
		name   string
		opts   h3x.QueueOptions
		window time.Duration
	}{
		{"DefaultWindow", h3x.QueueOptions{}, h3x.DefaultDedupWindow},
		{"ShortWindow", h3x.QueueOptions{DedupWindow: 10 * time.Second}, 10 * time.Second},
		{"LongWindow", h3x.QueueOptions{DedupWindow: 10 * time.Minute}, 10 * time.Minute},
	} {
		inBubble(t, tc.name, func(t *testing.T) {
			h := s.open(t, tc.opts)
			x, y := h.event(nsA), h.event(nsA)
			h.publish(x, y)
			h.drain("c", 10, nsA)
			time.Sleep(tc.window - slack)
			if res := h.enqueue(x); res[0].Status != h3x.PublishDuplicate {
				t.Errorf("republish %v after the first publish, window %v: %v, want duplicate", tc.window-slack, tc.window, res[0].Status)
			}
			time.Sleep(2 * slack)
			if res := h.enqueue(y); res[0].Status != h3x.PublishStored {
				t.Errorf("republish %v after the first publish, window %v: %v, want stored (the window has passed)", tc.window+slack, tc.window, res[0].Status)
			}
			wantIDs(t, "delivered after the window", idsOf(h.drain("c", 10, nsA)), []string{y.ID})
		})
	}

	t.Run("Disabled", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{DedupWindow: -1})
		e := h.event(nsA)
		h.publish(e)
		h.drain("c", 10, nsA)
		if res := h.enqueue(e); res[0].Status != h3x.PublishStored {
			t.Errorf("republish with deduplication disabled: %v, want stored", res[0].Status)
		}
		wantIDs(t, "delivered again", idsOf(h.drain("c", 10, nsA)), []string{e.ID})
	})

	t.Run("AcrossReopen", func(t *testing.T) {
		s.needReopen(t)
		h := s.open(t, h3x.QueueOptions{})
		x, y := h.event(nsA), h.event(nsA)
		h.publish(x, y)
		l := h.lease("a", 2, nsA)
		wantAllOK(t, "Ack of y", h.ack("a", refOf(l[1])))
		h.reopen()
		res := h.enqueue(x, y)
		if res[0].Status != h3x.PublishDuplicate || res[1].Status != h3x.PublishDuplicate {
			t.Errorf("republish after reopen (unacked, acked): %v, %v; want duplicate, duplicate", res[0].Status, res[1].Status)
		}
		wantIDs(t, "delivered after reopen", idsOf(h.drain("c", 10, nsA)), []string{x.ID})
	})

	t.Run("WindowAcrossReopen", func(t *testing.T) {
		s.needReopen(t)
		synctest.Test(t, func(t *testing.T) {
			h := s.open(t, h3x.QueueOptions{DedupWindow: 10 * time.Second})
			x, y := h.event(nsA), h.event(nsA)
			h.publish(x, y)
			h.drain("c", 10, nsA)
			time.Sleep(5 * time.Second)
			h.reopen()
			time.Sleep(4 * time.Second)
			if res := h.enqueue(x); res[0].Status != h3x.PublishDuplicate {
				t.Errorf("republish 9s after publish (10s window, reopened at 5s): %v, want duplicate", res[0].Status)
			}
			time.Sleep(2 * time.Second)
			if res := h.enqueue(y); res[0].Status != h3x.PublishStored {
				t.Errorf("republish 11s after publish (10s window, reopened at 5s): %v, want stored", res[0].Status)
			}
		})
	})
}

// --- Order -------------------------------------------------------------------

func (s *queueSuite) testOrder(t *testing.T) {
	t.Run("PublishOrder", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		want := map[string][]string{}
		for _, n := range []int{1, 5, 14, 3} {
			var batch []h3x.Event
			for i := range n {
				ns := nsA
				if i%3 == 2 {
					ns = nsB
				}
				e := h.event(ns)
				if i%4 == 1 {
					e.ID = ""
				}
				batch = append(batch, e)
			}
			for i, id := range h.publish(batch...) {
				want[batch[i].Namespace] = append(want[batch[i].Namespace], id)
			}
		}
		for _, ns := range []string{nsA, nsB} {
			wantIDs(t, "delivery order of "+ns+", 4 at a time", idsOf(h.drain("c", 4, ns)), want[ns])
		}
	})

	t.Run("LargeBacklog", func(t *testing.T) {
		// Thousands of events (megabytes) per namespace, more published
		// while draining: order holds across whatever paging the backend does.
		h := s.open(t, h3x.QueueOptions{})
		want := map[string][]string{}
		publish := func(n int) {
			for range n / 200 {
				for _, ns := range []string{nsA, nsB} {
					batch := make([]h3x.Event, 200)
					for i := range batch {
						batch[i] = h.bigEvent(ns, 1000)
					}
					want[ns] = append(want[ns], h.publish(batch...)...)
				}
			}
		}
		publish(1400)
		var got []h3x.Lease
		for range 1000 {
			if len(got) >= 1400 {
				break
			}
			ls := h.lease("c", 97, nsA, nsB)
			if len(ls) == 0 {
				t.Fatalf("Lease returned nothing after %d of 2800 events", len(got))
			}
			wantAllOK(t, "Ack", h.ack("c", refsOf(ls)...))
			got = append(got, ls...)
		}
		publish(400)
		got = append(got, h.drain("c", 97, nsA, nsB)...)
		for _, ns := range []string{nsA, nsB} {
			var ids []string
			for _, l := range got {
				if l.Event.Namespace == ns {
					ids = append(ids, l.Event.ID)
				}
			}
			if !slices.Equal(ids, want[ns]) {
				t.Errorf("%s: delivered %d events, want %d in publish order (first difference at %d)", ns, len(ids), len(want[ns]), firstDiff(ids, want[ns]))
			}
		}
	})

	t.Run("Limit", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		ids := h.publish(h.events(nsA, 10)...)
		wantIDs(t, "Limit 3", idsOf(h.lease("c", 3, nsA)), ids[:3])
		wantIDs(t, "Limit 100 after", idsOf(h.lease("c", 100, nsA)), ids[3:])
	})

	t.Run("MaxBytes", func(t *testing.T) {
		// Five events of 1000 data bytes each (plus < 250 bytes of overhead).
		for _, tc := range []struct {
			name     string
			limit    int
			maxBytes int
			want     int
		}{
			{"Unlimited", 10, 0, 5},
			{"TwoFit", 10, 2500, 2},
			{"OneFits", 10, 1300, 1},
			{"NoneFitsStillOne", 10, 100, 1},
			{"LimitFirst", 1, 2500, 1},
		} {
			t.Run(tc.name, func(t *testing.T) {
				h := s.open(t, h3x.QueueOptions{})
				var ids []string
				for range 5 {
					ids = append(ids, h.publish(h.bigEvent(nsA, 1000))...)
				}
				got := h.leaseReq(h3x.LeaseRequest{Holder: "c", Namespaces: []string{nsA}, Limit: tc.limit, MaxBytes: tc.maxBytes, AckDeadline: leaseTime})
				wantIDs(t, fmt.Sprintf("Limit %d, MaxBytes %d", tc.limit, tc.maxBytes), idsOf(got), ids[:tc.want])
			})
		}
	})

	t.Run("Fairness", func(t *testing.T) {
		// Every namespace of the request is busy, the first ones published
		// first; one Lease call must serve each of them.
		for _, tc := range []struct {
			name  string
			nss   []string
			limit int
		}{
			{"TwoNamespacesLimit2", []string{nsA, nsB}, 2},
			{"TwoNamespacesLimit10", []string{nsA, nsB}, 10},
			{"ThreeNamespacesLimit3", []string{nsA, nsB, nsC}, 3},
			{"ThreeNamespacesLimit7", []string{nsC, nsB, nsA}, 7},
		} {
			t.Run(tc.name, func(t *testing.T) {
				h := s.open(t, h3x.QueueOptions{})
				published := map[string][]string{}
				for _, ns := range []string{nsA, nsB, nsC} {
					published[ns] = h.publish(h.events(ns, 10)...)
				}
				ls := h.lease("c", tc.limit, tc.nss...)
				if len(ls) != tc.limit {
					t.Fatalf("Lease with Limit %d over %d busy namespaces returned %d events", tc.limit, len(tc.nss), len(ls))
				}
				checkPrefixes(t, ls, published)
				share := tc.limit / len(tc.nss)
				for _, ns := range tc.nss {
					if n := len(slices.DeleteFunc(slices.Clone(ls), func(l h3x.Lease) bool { return l.Event.Namespace != ns })); n < share {
						t.Errorf("Lease with Limit %d over busy namespaces %v returned %s: %d from %q, want at least its share %d", tc.limit, tc.nss, describe(ls), n, ns, share)
					}
				}
			})
		}
	})

	t.Run("FairnessAcrossCalls", func(t *testing.T) {
		// Lease calls with Limit 1 do not starve the second namespace.
		h := s.open(t, h3x.QueueOptions{})
		published := map[string][]string{nsA: h.publish(h.events(nsA, 30)...), nsB: h.publish(h.events(nsB, 30)...)}
		var all []h3x.Lease
		for range 20 {
			all = append(all, h.lease("c", 1, nsA, nsB)...)
		}
		checkPrefixes(t, all, published)
		for _, ns := range []string{nsA, nsB} {
			if !slices.ContainsFunc(all, func(l h3x.Lease) bool { return l.Event.Namespace == ns }) {
				t.Errorf("20 Lease calls with Limit 1 over two busy namespaces returned nothing from %q", ns)
			}
		}
	})

	t.Run("FairnessInterleavedCallers", func(t *testing.T) {
		// Turns are the namespaces', not a count of calls: two holders
		// alternating Limit-1 calls over different namespaces (or one
		// naming them in a different order each time) starve none.
		h := s.open(t, h3x.QueueOptions{})
		names := []string{"fair-0", "fair-1", "fair-2", "fair-3"}
		for _, ns := range names {
			h.publish(h.events(ns, 20)...)
		}
		got := map[string]int{}
		for range 8 {
			for _, l := range h.lease("a", 1, names[0], names[1]) {
				got[l.Event.Namespace]++
			}
			for _, l := range h.lease("b", 1, names[2], names[3]) {
				got[l.Event.Namespace]++
			}
		}
		for _, ns := range names {
			if got[ns] < 3 {
				t.Errorf("8 alternating Limit-1 calls of two holders, a over %v and b over %v: %v; want each namespace served about 4 times", names[:2], names[2:], got)
				break
			}
		}
		clear(got)
		for i := range 12 {
			order := append(slices.Clone(names[i%3:3]), names[:i%3]...) // rotated
			for _, l := range h.lease("c", 1, order...) {
				got[l.Event.Namespace]++
			}
		}
		for _, ns := range names[:3] {
			if got[ns] < 3 {
				t.Errorf("12 Limit-1 calls over three namespaces named in rotating order: %v; want each served about 4 times", got)
				break
			}
		}
	})

	t.Run("OnlyRequestedNamespaces", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		ids := h.publish(h.events(nsA, 3)...)
		h.publish(h.events(nsB, 3)...)
		wantIDs(t, "Lease from "+nsA, idsOf(h.lease("c", 10, nsA)), ids) // checkLeases checks namespaces
	})

	t.Run("Empty", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		h.leaseNone("c", "empty queue", nsA)
		h.publish(h.event(nsB))
		h.leaseNone("c", "another namespace has events", nsA)
	})
}

// firstDiff returns the first index where a and b differ.
func firstDiff(a, b []string) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// checkPrefixes checks that the leases of each namespace are, in order, the
// first events published to it.
func checkPrefixes(t testing.TB, ls []h3x.Lease, published map[string][]string) {
	t.Helper()
	got := map[string][]string{}
	for _, l := range ls {
		got[l.Event.Namespace] = append(got[l.Event.Namespace], l.Event.ID)
	}
	for ns, ids := range got {
		if len(ids) > len(published[ns]) || !slices.Equal(ids, published[ns][:len(ids)]) {
			t.Errorf("events of %q delivered as %v, want publish order %v", ns, ids, published[ns])
		}
	}
}

// --- Lease -------------------------------------------------------------------

func (s *queueSuite) testLease(t *testing.T) {
	// Holder "a" leases the only event with a 30s deadline; 10s later its
	// lease ends in each of the ways the contract lists. Until then (and
	// until the end takes effect) no other holder gets it.
	const deadline = 30 * time.Second
	for _, tc := range []struct {
		name  string
		end   func(h *harness, l h3x.Lease)
		after time.Duration // how long after end the event is ready again
		gone  bool          // never delivered again
	}{
		{"Ack", func(h *harness, l h3x.Lease) { wantAllOK(h.t, "Ack", h.ack("a", refOf(l))) }, 0, true},
		{"Nack", func(h *harness, l h3x.Lease) { wantAllOK(h.t, "Nack", h.nack("a", 0, "r", refOf(l))) }, 0, false},
		{"NackDelay", func(h *harness, l h3x.Lease) { wantAllOK(h.t, "Nack", h.nack("a", 10*time.Second, "r", refOf(l))) }, 10 * time.Second, false},
		{"Expiry", func(h *harness, l h3x.Lease) {}, deadline - 10*time.Second, false},
		{"Release", func(h *harness, l h3x.Lease) { h.release("a") }, 0, false},
	} {
		inBubble(t, "EndsBy"+tc.name, func(t *testing.T) {
			h := s.open(t, h3x.QueueOptions{})
			id := h.publish(h.event(nsA))[0]
			l := h.leaseReq(h3x.LeaseRequest{Holder: "a", Namespaces: []string{nsA}, Limit: 1, AckDeadline: deadline})
			if len(l) != 1 {
				t.Fatal("Lease returned nothing")
			}
			h.leaseNone("b", "right after a leased it", nsA)
			time.Sleep(10 * time.Second)
			h.leaseNone("b", "10s into a's 30s lease", nsA)
			tc.end(h, l[0])
			if tc.after > 0 {
				time.Sleep(tc.after - slack)
				h.leaseNone("b", fmt.Sprintf("%v before the lease's end takes effect", slack), nsA)
				time.Sleep(2 * slack)
			}
			if tc.gone {
				h.leaseNone("b", "after the ack", nsA)
				time.Sleep(2 * deadline)
				h.release("a")
				h.leaseNone("b", "after the acked lease's deadline and a Release", nsA)
				return
			}
			l2 := h.leaseOne("b", nsA)
			if l2.Event.ID != id || l2.Attempt != 2 {
				t.Errorf("after the lease ended by %s, b leased %s with attempt %d, want %s with attempt 2", tc.name, l2.Event.ID, l2.Attempt, id)
			}
		})
	}

	t.Run("SkipsLeased", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		ids := h.publish(h.events(nsA, 2)...)
		wantIDs(t, "a's lease", idsOf(h.lease("a", 1, nsA)), ids[:1])
		wantIDs(t, "b's lease", idsOf(h.lease("b", 10, nsA)), ids[1:])
	})

	t.Run("NotToSameHolderAgain", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.event(nsA))
		h.leaseOne("a", nsA)
		h.leaseNone("a", "a leases again while holding it", nsA)
	})

	inBubble(t, "Deadline", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.event(nsA))
		time.Sleep(5 * time.Second)
		want := time.Now().Add(45 * time.Second)
		ls := h.leaseReq(h3x.LeaseRequest{Holder: "a", Namespaces: []string{nsA}, Limit: 1, AckDeadline: 45 * time.Second})
		if len(ls) != 1 {
			t.Fatal("Lease returned nothing")
		}
		if d := ls[0].Deadline.Sub(want); d < -slack || d > slack {
			t.Errorf("Lease.Deadline %v, want now + AckDeadline = %v", ls[0].Deadline, want)
		}
		if ls[0].Attempt != 1 {
			t.Errorf("first delivery has attempt %d, want 1", ls[0].Attempt)
		}
	})

	t.Run("ReleaseOnlyItsHolder", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		ids := h.publish(h.events(nsA, 2)...)
		h.lease("a", 1, nsA)
		h.lease("b", 1, nsA)
		h.release("a")
		wantIDs(t, "after Release(a)", idsOf(h.lease("c", 10, nsA)), ids[:1])
		wantAllOK(t, "b's ack after Release(a)", h.ack("b", h3x.LeaseRef{ID: ids[1], Attempt: 1}))
	})

	t.Run("ReleaseEndsEveryLease", func(t *testing.T) {
		// A holder with several leases, from several Lease calls and
		// namespaces: Release ends all of them, and no other holder's.
		h := s.open(t, h3x.QueueOptions{})
		idsA := h.publish(h.events(nsA, 4)...)
		idsB := h.publish(h.events(nsB, 2)...)
		mine := idsOf(h.lease("a", 2, nsA))
		mine = append(mine, idsOf(h.lease("a", 1, nsA))...)
		mine = append(mine, idsOf(h.lease("a", 2, nsB))...)
		other := h.leaseOne("b", nsA)
		h.release("a")
		h.wantCounts("after Release(a)", nsA, counts{Ready: 3, Leased: 1})
		h.wantCounts("after Release(a)", nsB, counts{Ready: 2})
		ls := h.lease("c", 100, nsA, nsB)
		got := idsOf(ls)
		slices.Sort(got)
		slices.Sort(mine)
		wantIDs(t, "leased after Release(a)", got, mine)
		for _, l := range ls {
			if l.Attempt != 2 {
				t.Errorf("%s after Release: attempt %d, want 2", l.Event.ID, l.Attempt)
			}
		}
		if want := slices.Concat(idsA[:3], idsB); !slices.Equal(mine, slices.Sorted(slices.Values(want))) {
			t.Fatalf("a leased %v, want %v", mine, want)
		}
		wantStatus(t, "b's ack after Release(a)", h.ack("b", refOf(other)), h3x.SettleOK)
	})

	t.Run("ReleaseWithoutLeases", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		h.release("nobody")
	})
}

// --- Settle (Ack, Nack, Extend and the LeaseRef rules) -------------------------

// settleOp is one of the three settlements, with a check that it took effect
// on the only event in nsA.
type settleOp struct {
	name    string
	do      func(h *harness, holder string, refs ...h3x.LeaseRef) []h3x.SettleStatus
	applied func(h *harness, id string)
}

var settleOps = []settleOp{
	{
		name: "Ack",
		do: func(h *harness, holder string, refs ...h3x.LeaseRef) []h3x.SettleStatus {
			return h.ack(holder, refs...)
		},
		applied: func(h *harness, id string) {
			h.t.Helper()
			h.release("a")
			h.release("b")
			h.leaseNone("c", "after the ack (and Release of every holder)", nsA)
		},
	},
	{
		name: "Nack",
		do: func(h *harness, holder string, refs ...h3x.LeaseRef) []h3x.SettleStatus {
			return h.nack(holder, 0, "h3xtest", refs...)
		},
		applied: func(h *harness, id string) {
			h.t.Helper()
			if l := h.leaseOne("c", nsA); l.Event.ID != id {
				h.t.Errorf("after the nack, leased %s, want %s", l.Event.ID, id)
			}
		},
	},
	{
		name: "Extend",
		do: func(h *harness, holder string, refs ...h3x.LeaseRef) []h3x.SettleStatus {
			return h.extend(holder, leaseTime, refs...)
		},
		applied: func(h *harness, id string) {
			h.t.Helper()
			h.leaseNone("c", "after the extension (the lease goes on)", nsA)
		},
	},
}

func (s *queueSuite) testSettle(t *testing.T) {
	// setup publishes one event and leases it to "a".
	setup := func(t *testing.T) (*harness, h3x.Lease) {
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.event(nsA))
		return h, h.leaseOne("a", nsA)
	}
	for _, op := range settleOps {
		t.Run(op.name, func(t *testing.T) {
			t.Run("ByHolder", func(t *testing.T) {
				h, l := setup(t)
				wantStatus(t, op.name+" by the holder", op.do(h, "a", refOf(l)), h3x.SettleOK)
				op.applied(h, l.Event.ID)
			})
			t.Run("OtherHolderSameAttempt", func(t *testing.T) {
				// A settlement never overrides another holder's live lease,
				// even with the right attempt.
				h, l := setup(t)
				wantStatus(t, op.name+" by another holder while a's lease lasts", op.do(h, "b", refOf(l)), h3x.SettleStale)
				h.leaseNone("c", "after a refused "+op.name+" (a still holds it)", nsA)
				wantStatus(t, "a's ack afterwards", h.ack("a", refOf(l)), h3x.SettleOK)
			})
			t.Run("ReconnectedHolderAfterRelease", func(t *testing.T) {
				// A client that reconnected settles, with its delivery's
				// attempt, what it received on its previous connection,
				// whose leases were released.
				h, l := setup(t)
				h.release("a")
				if op.name == "Extend" {
					wantStatus(t, "Extend of a released lease", op.do(h, "b", refOf(l)), h3x.SettleStale)
					return
				}
				wantStatus(t, op.name+" by the reconnected holder", op.do(h, "b", refOf(l)), h3x.SettleOK)
				if op.name == "Ack" {
					h.leaseNone("c", "after the ack", nsA)
				}
			})
			t.Run("Namespace", func(t *testing.T) {
				// A ref naming a namespace settles only an event in it.
				h, l := setup(t)
				wrong := refOf(l)
				wrong.Namespace = nsB
				wantStatus(t, op.name+" naming another namespace", op.do(h, "a", wrong), h3x.SettleUnknown)
				h.leaseNone("c", "after a refused "+op.name+" (a still holds it)", nsA)
				right := refOf(l)
				right.Namespace = nsA
				wantStatus(t, op.name+" naming the event's namespace", op.do(h, "a", right), h3x.SettleOK)
				op.applied(h, l.Event.ID)
			})
			t.Run("AttemptZeroByHolder", func(t *testing.T) {
				h, l := setup(t)
				wantStatus(t, op.name+" with attempt 0 by the holder", op.do(h, "a", h3x.LeaseRef{ID: l.Event.ID}), h3x.SettleOK)
				op.applied(h, l.Event.ID)
			})
			t.Run("AttemptZeroOtherHolder", func(t *testing.T) {
				h, l := setup(t)
				wantStatus(t, op.name+" with attempt 0 by a non-holder", op.do(h, "b", h3x.LeaseRef{ID: l.Event.ID}), h3x.SettleStale)
				h.leaseNone("c", "after a refused "+op.name+" (a still holds it)", nsA)
				wantStatus(t, "a's ack afterwards", h.ack("a", refOf(l)), h3x.SettleOK)
			})
			t.Run("AttemptZeroNotLeased", func(t *testing.T) {
				h := s.open(t, h3x.QueueOptions{})
				id := h.publish(h.event(nsA))[0]
				wantStatus(t, op.name+" with attempt 0 of a ready event", op.do(h, "a", h3x.LeaseRef{ID: id}), h3x.SettleStale)
				if l := h.leaseOne("c", nsA); l.Attempt != 1 {
					t.Errorf("after a refused %s, first delivery has attempt %d, want 1", op.name, l.Attempt)
				}
			})
			t.Run("StaleAfterReLease", func(t *testing.T) {
				h, l := setup(t)
				h.release("a")
				l2 := h.leaseOne("b", nsA)
				if l2.Attempt != 2 {
					t.Fatalf("redelivery after Release has attempt %d, want 2", l2.Attempt)
				}
				wantStatus(t, op.name+" of attempt 1 by its old holder after attempt 2", op.do(h, "a", refOf(l)), h3x.SettleStale)
				wantStatus(t, op.name+" of attempt 1 by the new holder", op.do(h, "b", refOf(l)), h3x.SettleStale)
				h.leaseNone("c", "after refused stale "+op.name+"s (b still holds it)", nsA)
				wantStatus(t, "b's ack of attempt 2", h.ack("b", refOf(l2)), h3x.SettleOK)
				h.release("b")
				h.leaseNone("c", "after b's ack", nsA)
			})
			t.Run("Unknown", func(t *testing.T) {
				h, _ := setup(t)
				wantStatus(t, op.name+" of IDs never stored",
					op.do(h, "a", h3x.LeaseRef{ID: "no-such-event", Attempt: 1}, h3x.LeaseRef{ID: "no-such-event-either"}),
					h3x.SettleUnknown, h3x.SettleUnknown)
			})
			t.Run("Acked", func(t *testing.T) {
				h, l := setup(t)
				wantStatus(t, "first ack", h.ack("a", refOf(l)), h3x.SettleOK)
				wantStatus(t, op.name+" of an acked event", op.do(h, "a", refOf(l)), h3x.SettleUnknown)
			})
		})
	}

	t.Run("ResultsInOrder", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		ids := h.publish(h.events(nsA, 3)...)
		ls := h.lease("a", 2, nsA)
		got := h.ack("a", refOf(ls[0]), h3x.LeaseRef{ID: "no-such-event", Attempt: 1}, h3x.LeaseRef{ID: ids[2]}, refOf(ls[1]))
		wantStatus(t, "mixed ack", got, h3x.SettleOK, h3x.SettleUnknown, h3x.SettleStale, h3x.SettleOK)
	})

	t.Run("AckAfterReleaseBeforeReLease", func(t *testing.T) {
		// No newer delivery exists, so the ack of attempt 1 applies.
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.event(nsA))
		l := h.leaseOne("a", nsA)
		h.release("a")
		wantStatus(t, "ack of a released, not yet redelivered attempt", h.ack("a", refOf(l)), h3x.SettleOK)
		h.leaseNone("c", "after the ack", nsA)
	})

	inBubble(t, "AckAfterExpiryBeforeReLease", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.event(nsA))
		l := h.leaseOne("a", nsA)
		time.Sleep(leaseTime + slack)
		wantStatus(t, "ack of an expired, not yet redelivered attempt", h.ack("a", refOf(l)), h3x.SettleOK)
		h.leaseNone("c", "after the ack", nsA)
	})

	// A nack of a delivery whose lease ended (Release, expiry) and that was
	// not delivered again reschedules the event with the nack's delay.
	for _, end := range []string{"Release", "Expiry"} {
		inBubble(t, "NackDelayAfter"+end+"BeforeReLease", func(t *testing.T) {
			h := s.open(t, h3x.QueueOptions{})
			id := h.publish(h.event(nsA))[0]
			l := h.leaseOne("a", nsA)
			if end == "Release" {
				h.release("a")
			} else {
				time.Sleep(leaseTime + slack)
			}
			wantStatus(t, "delayed nack of an ended, not yet redelivered attempt", h.nack("b", 10*time.Second, "later", refOf(l)), h3x.SettleOK)
			time.Sleep(10*time.Second - slack)
			h.leaseNone("c", "before the nack's delay has passed", nsA)
			time.Sleep(2 * slack)
			if l2 := h.leaseOne("c", nsA); l2.Event.ID != id {
				t.Errorf("after the nack's delay: leased %s, want %s", l2.Event.ID, id)
			}
		})
	}

	inBubble(t, "StaleAfterExpiryAndReLease", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.event(nsA))
		l := h.leaseOne("a", nsA)
		time.Sleep(leaseTime + slack)
		l2 := h.leaseOne("b", nsA)
		wantStatus(t, "ack of the expired attempt 1 after attempt 2", h.ack("a", refOf(l)), h3x.SettleStale)
		wantStatus(t, "nack of the expired attempt 1 after attempt 2", h.nack("a", 0, "late", refOf(l)), h3x.SettleStale)
		h.leaseNone("c", "after stale settlements (b still holds it)", nsA)
		wantStatus(t, "b's ack", h.ack("b", refOf(l2)), h3x.SettleOK)
		time.Sleep(2 * leaseTime)
		h.leaseNone("c", "after b's ack", nsA)
	})

	t.Run("AckDurable", func(t *testing.T) {
		s.needReopen(t)
		h := s.open(t, h3x.QueueOptions{})
		ids := h.publish(h.events(nsA, 3)...)
		ls := h.lease("a", 2, nsA)
		wantAllOK(t, "Ack", h.ack("a", refOf(ls[0])))
		h.reopen()
		wantIDs(t, "after reopen", idsOf(h.drain("c", 10, nsA)), ids[1:])
	})
}

// --- Extend ------------------------------------------------------------------

func (s *queueSuite) testExtend(t *testing.T) {
	// leaseA publishes one event and leases it to "a" for 30s.
	leaseA := func(t *testing.T) (*harness, h3x.Lease) {
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.event(nsA))
		ls := h.leaseReq(h3x.LeaseRequest{Holder: "a", Namespaces: []string{nsA}, Limit: 1, AckDeadline: 30 * time.Second})
		if len(ls) != 1 {
			t.Fatal("Lease returned nothing")
		}
		return h, ls[0]
	}
	// A lease that ended is not extended, not even for its own holder, and
	// stays ended.
	for _, end := range []string{"Release", "Expiry"} {
		inBubble(t, "NotAfter"+end, func(t *testing.T) {
			h, l := leaseA(t)
			if end == "Release" {
				h.release("a")
			} else {
				time.Sleep(30*time.Second + slack)
			}
			wantStatus(t, "Extend by its holder of a lease that ended by "+end, h.extend("a", 60*time.Second, refOf(l)), h3x.SettleStale)
			if l2 := h.leaseOne("c", nsA); l2.Attempt != 2 {
				t.Errorf("after the refused extension: attempt %d, want 2", l2.Attempt)
			}
		})
	}
	// Extend at 20s to now + 60s = 80s: the lease survives 30s and expires at 80s.
	inBubble(t, "NotByAnotherHolder", func(t *testing.T) {
		// Another holder cannot extend a live lease; it ends on time.
		h, l := leaseA(t)
		time.Sleep(20 * time.Second)
		wantStatus(t, "Extend by b", h.extend("b", 60*time.Second, refOf(l)), h3x.SettleStale)
		time.Sleep(10*time.Second + slack)
		if l2 := h.leaseOne("c", nsA); l2.Attempt != 2 {
			t.Errorf("after the original deadline: attempt %d, want 2", l2.Attempt)
		}
	})
	inBubble(t, "PushesDeadline", func(t *testing.T) {
		h, l := leaseA(t)
		time.Sleep(20 * time.Second)
		wantStatus(t, "Extend by a", h.extend("a", 60*time.Second, refOf(l)), h3x.SettleOK)
		time.Sleep(10*time.Second + slack)
		h.leaseNone("c", "past the old deadline", nsA)
		time.Sleep(50*time.Second - 2*slack)
		h.leaseNone("c", "just before the new deadline", nsA)
		time.Sleep(2 * slack)
		if l2 := h.leaseOne("c", nsA); l2.Attempt != 2 {
			t.Errorf("after the extended lease expired: attempt %d, want 2", l2.Attempt)
		}
	})

	inBubble(t, "SetsNotAdds", func(t *testing.T) {
		// Extend sets the deadline to now + d, even if that is sooner.
		h, l := leaseA(t)
		time.Sleep(10 * time.Second)
		wantStatus(t, "Extend", h.extend("a", 5*time.Second, refOf(l)), h3x.SettleOK)
		time.Sleep(5*time.Second - slack)
		h.leaseNone("c", "before now + d", nsA)
		time.Sleep(2 * slack)
		h.leaseOne("c", nsA)
	})

	inBubble(t, "Repeatedly", func(t *testing.T) {
		// Slow work: extended every 20s for 5 minutes, the lease never ends.
		h, l := leaseA(t)
		for range 15 {
			time.Sleep(20 * time.Second)
			wantStatus(t, "Extend", h.extend("a", 30*time.Second, refOf(l)), h3x.SettleOK)
			h.leaseNone("c", "during the extended lease", nsA)
		}
		wantStatus(t, "Ack after 5 minutes", h.ack("a", refOf(l)), h3x.SettleOK)
	})
}

// --- Attempts ----------------------------------------------------------------

func (s *queueSuite) testAttempts(t *testing.T) {
	inBubble(t, "CountEveryDelivery", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		id := h.publish(h.event(nsA))[0]
		ends := []struct {
			name string
			end  func(l h3x.Lease)
		}{
			{"nack", func(l h3x.Lease) { wantAllOK(t, "Nack", h.nack("a", 0, "r", refOf(l))) }},
			{"expiry", func(h3x.Lease) { time.Sleep(leaseTime + slack) }},
			{"Release", func(h3x.Lease) { h.release("a") }},
			{"delayed nack", func(l h3x.Lease) {
				wantAllOK(t, "Nack", h.nack("a", 5*time.Second, "r", refOf(l)))
				time.Sleep(5*time.Second + slack)
			}},
			{"expiry", func(h3x.Lease) { time.Sleep(leaseTime + slack) }},
		}
		l := h.leaseOne("a", nsA)
		for i, e := range ends {
			if l.Event.ID != id || l.Attempt != i+1 {
				t.Fatalf("delivery %d: %s with attempt %d, want %s with attempt %d", i+1, l.Event.ID, l.Attempt, id, i+1)
			}
			e.end(l)
			l = h.leaseOne("a", nsA)
			if l.Attempt != i+2 {
				t.Errorf("delivery after a %s: attempt %d, want %d", e.name, l.Attempt, i+2)
			}
		}
	})

	t.Run("UnseenNackNotCounted", func(t *testing.T) {
		// A nack of deliveries the application never saw gives the attempt
		// back, so it cannot lead to dead-lettering.
		h := s.open(t, h3x.QueueOptions{MaxAttempts: 2})
		id := h.publish(h.event(nsA))[0]
		for range 5 {
			l := h.leaseOne("a", nsA)
			if l.Event.ID != id || l.Attempt != 1 {
				t.Fatalf("after unseen nacks: %s attempt %d, want %s attempt 1", l.Event.ID, l.Attempt, id)
			}
			ref := refOf(l)
			ref.Unseen = true
			wantAllOK(t, "unseen Nack", h.nack("a", 0, "prefetch returned", ref))
		}
		l := h.leaseOne("a", nsA)
		wantAllOK(t, "Nack", h.nack("a", 0, "failed", refOf(l)))
		if l2 := h.leaseOne("a", nsA); l2.Attempt != 2 {
			t.Fatalf("after a counted nack: attempt %d, want 2", l2.Attempt)
		}
	})

	t.Run("UnseenNackAfterReleaseNotCounted", func(t *testing.T) {
		// The same when the lease has already ended with its holder (a
		// connection that closed while the client's next one came up),
		// and the event was not delivered again: the release's count is
		// given back; once only.
		h := s.open(t, h3x.QueueOptions{MaxAttempts: 2})
		id := h.publish(h.event(nsA))[0]
		l := h.leaseOne("a", nsA)
		h.release("a")
		ref := refOf(l)
		ref.Unseen = true
		wantAllOK(t, "unseen Nack after the release", h.nack("b", 0, "prefetch returned", ref))
		wantStatus(t, "the same unseen Nack again", h.nack("b", 0, "prefetch returned", ref), h3x.SettleStale)
		if l2 := h.leaseOne("c", nsA); l2.Event.ID != id || l2.Attempt != 1 {
			t.Fatalf("after an unseen nack of a released delivery: %s attempt %d, want %s attempt 1", l2.Event.ID, l2.Attempt, id)
		}
	})

	t.Run("PerEvent", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		ids := h.publish(h.events(nsA, 2)...)
		wantAllOK(t, "Nack", h.nack("a", 0, "r", refOf(h.leaseOne("a", nsA))))
		ls := h.lease("a", 2, nsA)
		got := map[string]int{}
		for _, l := range ls {
			got[l.Event.ID] = l.Attempt
		}
		if want := map[string]int{ids[0]: 2, ids[1]: 1}; !maps.Equal(got, want) {
			t.Errorf("attempts %v, want %v", got, want)
		}
	})
}

// --- DeadLetter --------------------------------------------------------------

func (s *queueSuite) testDeadLetter(t *testing.T) {
	dlq := h3x.DeadLetterNamespace(nsA)

	// publishMeta publishes one event with user metadata.
	publishMeta := func(h *harness) h3x.Event {
		e := h.event(nsA)
		e.Metadata = map[string]string{"severity": "warn"}
		e.Time = time.Date(2023, 4, 5, 6, 7, 8, 0, time.UTC)
		h.publish(e)
		return e
	}
	// checkDead checks a delivery from the dead-letter namespace.
	checkDead := func(t *testing.T, l h3x.Lease, orig h3x.Event, attempts int, reason *string) {
		t.Helper()
		ev := l.Event
		if ev.ID != orig.ID || ev.Namespace != dlq || ev.Type != orig.Type || !bytes.Equal(ev.Data, orig.Data) ||
			ev.Message != orig.Message || !ev.Time.Equal(orig.Time) {
			t.Errorf("dead-lettered event is %s in %q (type %q, message %q, data %q, time %v), want %s in %q (type %q, message %q, data %q, time %v)",
				ev.ID, ev.Namespace, ev.Type, ev.Message, ev.Data, ev.Time, orig.ID, dlq, orig.Type, orig.Message, orig.Data, orig.Time)
		}
		want := maps.Clone(orig.Metadata)
		if want == nil {
			want = map[string]string{}
		}
		want[h3x.MetaDeadLetterAttempts] = strconv.Itoa(attempts)
		want[h3x.MetaDeadLetterNamespace] = nsA
		if reason != nil {
			want[h3x.MetaDeadLetterReason] = *reason
		} else if r, ok := ev.Metadata[h3x.MetaDeadLetterReason]; ok {
			want[h3x.MetaDeadLetterReason] = r
		}
		if !maps.Equal(ev.Metadata, want) {
			t.Errorf("dead-lettered event's metadata %v, want %v", ev.Metadata, want)
		}
	}
	ptr := func(s string) *string { return &s }

	t.Run("AfterMaxAttempts", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{MaxAttempts: 3})
		e := publishMeta(h)
		for i := 1; i <= 3; i++ {
			l := h.leaseOne("a", nsA)
			if l.Attempt != i {
				t.Fatalf("delivery %d has attempt %d", i, l.Attempt)
			}
			wantAllOK(t, "Nack", h.nack("a", 0, fmt.Sprintf("reason %d", i), refOf(l)))
		}
		h.leaseNone("a", "after the 3rd (maximum) attempt was nacked", nsA)
		h.wantCounts("after dead-lettering", nsA, counts{DeadLettered: 1})
		h.wantCounts("dead-letter namespace", dlq, counts{Ready: 1})
		l := h.leaseOne("b", dlq)
		checkDead(t, l, e, 3, ptr("reason 3"))
		wantAllOK(t, "Ack from the dead-letter namespace", h.ack("b", refOf(l)))
		h.leaseNone("b", "after the ack", dlq, nsA)
	})

	t.Run("NackDelayIgnored", func(t *testing.T) {
		// At the maximum, a nack moves the event at once, instead of after
		// its delay.
		h := s.open(t, h3x.QueueOptions{MaxAttempts: 1})
		e := publishMeta(h)
		wantAllOK(t, "Nack", h.nack("a", time.Hour, "slow", refOf(h.leaseOne("a", nsA))))
		checkDead(t, h.leaseOne("b", dlq), e, 1, ptr("slow"))
	})

	inBubble(t, "ByExpiry", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{MaxAttempts: 2})
		e := publishMeta(h)
		for i := 1; i <= 2; i++ {
			if l := h.leaseOne("a", nsA); l.Attempt != i {
				t.Fatalf("delivery %d has attempt %d", i, l.Attempt)
			}
			time.Sleep(leaseTime + slack)
		}
		h.leaseNone("a", "after the 2nd (maximum) attempt expired", nsA)
		h.wantCounts("after dead-lettering", nsA, counts{DeadLettered: 1})
		checkDead(t, h.leaseOne("b", dlq), e, 2, ptr("lease expired"))
	})

	t.Run("ByRelease", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{MaxAttempts: 2})
		e := publishMeta(h)
		for range 2 {
			h.leaseOne("a", nsA)
			h.release("a")
		}
		h.leaseNone("a", "after the 2nd (maximum) attempt was released", nsA)
		checkDead(t, h.leaseOne("b", dlq), e, 2, nil)
	})

	t.Run("DefaultMaxAttempts", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		e := publishMeta(h)
		for i := 1; i <= h3x.DefaultMaxAttempts; i++ {
			l := h.leaseOne("a", nsA)
			if l.Attempt != i {
				t.Fatalf("delivery %d has attempt %d", i, l.Attempt)
			}
			wantAllOK(t, "Nack", h.nack("a", 0, "r", refOf(l)))
		}
		h.leaseNone("a", "after the default maximum of attempts", nsA)
		checkDead(t, h.leaseOne("b", dlq), e, h3x.DefaultMaxAttempts, ptr("r"))
	})

	t.Run("Never", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{MaxAttempts: -1})
		publishMeta(h)
		n := h3x.DefaultMaxAttempts + 5
		for i := 1; i <= n; i++ {
			l := h.leaseOne("a", nsA)
			if l.Attempt != i {
				t.Fatalf("delivery %d has attempt %d", i, l.Attempt)
			}
			wantAllOK(t, "Nack", h.nack("a", 0, "r", refOf(l)))
		}
		h.leaseNone("a", "MaxAttempts < 0", dlq)
		h.wantCounts("MaxAttempts < 0", nsA, counts{Ready: 1})
	})

	t.Run("NotDeadLetteredAgain", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{MaxAttempts: 1})
		e := publishMeta(h)
		wantAllOK(t, "Nack", h.nack("a", 0, "first", refOf(h.leaseOne("a", nsA))))
		last := 0
		for i := range 3 {
			l := h.leaseOne("b", dlq)
			if l.Event.ID != e.ID || l.Attempt <= last {
				t.Fatalf("dead-letter delivery %d: %s attempt %d, want %s with attempt > %d", i+1, l.Event.ID, l.Attempt, e.ID, last)
			}
			last = l.Attempt
			wantAllOK(t, "Nack in the dead-letter namespace", h.nack("b", 0, "again", refOf(l)))
		}
		h.leaseNone("b", "dead letters of a dead-letter namespace", h3x.DeadLetterNamespace(dlq))
		h.wantCounts("dead-letter namespace", dlq, counts{Ready: 1})
	})

	t.Run("Durable", func(t *testing.T) {
		s.needReopen(t)
		h := s.open(t, h3x.QueueOptions{MaxAttempts: 1})
		e := publishMeta(h)
		wantAllOK(t, "Nack", h.nack("a", 0, "bad", refOf(h.leaseOne("a", nsA))))
		h.reopen()
		h.leaseNone("a", "after reopen", nsA)
		checkDead(t, h.leaseOne("b", dlq), e, 1, ptr("bad"))
	})
}

// --- Limits ------------------------------------------------------------------

func (s *queueSuite) testLimits(t *testing.T) {
	for _, tc := range []struct {
		name                 string
		opts                 h3x.QueueOptions
		event                func(h *harness, ns string) h3x.Event
		minStored, maxStored int // how many of 6 events fit
	}{
		{"Events", h3x.QueueOptions{MaxEventsPerNamespace: 3}, (*harness).event, 3, 3},
		// 1000 data bytes per event; 3000 bytes hold two events, or three if
		// the limit is only checked before adding.
		{"Bytes", h3x.QueueOptions{MaxBytesPerNamespace: 3000}, func(h *harness, ns string) h3x.Event { return h.bigEvent(ns, 1000) }, 2, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := s.open(t, tc.opts)
			batch := make([]h3x.Event, 6)
			for i := range batch {
				batch[i] = tc.event(h, nsA)
			}
			res := h.enqueue(batch...)
			stored := 0
			for stored < len(res) && res[stored].Status == h3x.PublishStored {
				stored++
			}
			if stored < tc.minStored || stored > tc.maxStored {
				t.Fatalf("stored %d of 6 events, want %d to %d (then refused)", stored, tc.minStored, tc.maxStored)
			}
			for _, r := range res[stored:] {
				wantRefusedFull(t, r)
			}
			h.publish(tc.event(h, nsB)) // other namespaces are unaffected

			// Nothing was dropped: exactly the stored events are delivered.
			ls := h.lease("a", 10, nsA)
			wantIDs(t, "delivered", idsOf(ls), eventIDs(batch[:stored]))

			wantRefusedFull(t, h.enqueue(tc.event(h, nsA))[0]) // leased events still count
			wantAllOK(t, "Ack", h.ack("a", refOf(ls[0])))
			// Acking made room; the refused event was not stored, so it is
			// no duplicate.
			if r := h.enqueue(batch[stored])[0]; r.Status != h3x.PublishStored {
				t.Errorf("retry of refused %s after an ack freed room: %v (err %v), want stored", r.ID, r.Status, r.Err)
			}
			wantRefusedFull(t, h.enqueue(tc.event(h, nsA))[0]) // full again
		})
	}

	t.Run("EventLargerThanByteLimit", func(t *testing.T) {
		// An event that could never fit is refused for good (not queue
		// full, which tells the publisher to retry), also in an empty
		// namespace; the namespace stays usable.
		h := s.open(t, h3x.QueueOptions{MaxBytesPerNamespace: 3000})
		r := h.enqueue(h.bigEvent(nsA, 4000))[0]
		if r.Status != h3x.PublishRefused || !errors.Is(r.Err, h3x.ErrInvalidArgument) {
			t.Errorf("event larger than MaxBytesPerNamespace: %v (err %v), want refused with ErrInvalidArgument", r.Status, r.Err)
		}
		h.publish(h.bigEvent(nsA, 1000))
	})

	t.Run("AcrossReopen", func(t *testing.T) {
		s.needReopen(t)
		h := s.open(t, h3x.QueueOptions{MaxEventsPerNamespace: 3})
		h.publish(h.events(nsA, 3)...)
		h.reopen()
		wantRefusedFull(t, h.enqueue(h.event(nsA))[0])
		wantAllOK(t, "Ack", h.ack("a", refOf(h.leaseOne("a", nsA))))
		h.reopen()
		h.publish(h.event(nsA))
		wantRefusedFull(t, h.enqueue(h.event(nsA))[0])
	})

	t.Run("DeadLetterNotDropped", func(t *testing.T) {
		// Limits apply to dead-letter namespaces too, but a dead-letter
		// move is never a silent drop: the event stays somewhere.
		h := s.open(t, h3x.QueueOptions{MaxEventsPerNamespace: 1, MaxAttempts: 1})
		dlq := h3x.DeadLetterNamespace(nsA)
		for i := range 3 {
			id := h.publish(h.event(nsA))[0]
			wantAllOK(t, "Nack", h.nack("a", 0, "r", refOf(h.leaseOne("a", nsA))))
			h.release("a")
			var found bool
			for _, ns := range []string{nsA, dlq} {
				st := h.stats(ns)
				found = found || st.Ready+st.Delayed > 0 && slices.Contains(idsOf(h.lease("probe", 10, ns)), id)
			}
			h.release("probe")
			if !found {
				t.Fatalf("event %d (%s) is in neither %q nor %q after its last attempt was nacked", i+1, id, nsA, dlq)
			}
			if h.stats(nsA).Ready > 0 {
				break // kept in place; the namespace is full now
			}
		}
	})

	t.Run("BatchAcrossNamespaces", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{MaxEventsPerNamespace: 2})
		var batch []h3x.Event
		for range 3 {
			batch = append(batch, h.event(nsA), h.event(nsB))
		}
		res := h.enqueue(batch...)
		for i, r := range res {
			if i < 4 {
				if r.Status != h3x.PublishStored {
					t.Errorf("event %d (%s): %v (err %v), want stored", i, batch[i].Namespace, r.Status, r.Err)
				}
			} else {
				wantRefusedFull(t, r)
			}
		}
	})
}

func eventIDs(evs []h3x.Event) []string {
	out := make([]string, len(evs))
	for i, e := range evs {
		out[i] = e.ID
	}
	return out
}

// --- Wait --------------------------------------------------------------------

// consumer runs a consumer loop in its own goroutine: Lease, and Wait while
// nothing is ready, until it leases something, ctx ends or it has waited
// 100 times.
type consumer struct {
	cancel context.CancelFunc
	done   chan struct{}
	waits  atomic.Int64
	leases []h3x.Lease
	at     time.Time // when it leased
	err    error
}

func (h *harness) startConsumer(t testing.TB, holder string, namespaces ...string) *consumer {
	ctx, cancel := context.WithCancel(context.Background())
	c := &consumer{cancel: cancel, done: make(chan struct{})}
	q := h.q
	go func() {
		defer close(c.done)
		req := h3x.LeaseRequest{Holder: holder, Namespaces: namespaces, Limit: 10, AckDeadline: leaseTime}
		for range 100 {
			ls, err := q.Lease(ctx, req)
			if err != nil {
				c.err = fmt.Errorf("lease: %w", err)
				return
			}
			if len(ls) > 0 {
				c.leases, c.at = ls, time.Now()
				return
			}
			if err := q.Wait(ctx, namespaces); err != nil {
				c.err = fmt.Errorf("wait: %w", err)
				return
			}
			c.waits.Add(1)
		}
		c.err = errors.New("100 waits returned without an event becoming ready")
	}()
	t.Cleanup(c.stop)
	return c
}

// finished reports whether the consumer's goroutine has ended.
func (c *consumer) finished() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop cancels the consumer and waits for it.
func (c *consumer) stop() {
	c.cancel()
	<-c.done
}

// waiter calls Wait once in its own goroutine.
type waiter struct {
	done chan struct{}
	err  error
}

func (h *harness) startWaiter(t testing.TB, ctx context.Context, namespaces ...string) *waiter {
	ctx, cancel := context.WithCancel(ctx)
	w := &waiter{done: make(chan struct{})}
	q := h.q
	go func() {
		defer close(w.done)
		w.err = q.Wait(ctx, namespaces)
	}()
	t.Cleanup(func() { cancel(); <-w.done })
	return w
}

func (w *waiter) returned() bool {
	select {
	case <-w.done:
		return true
	default:
		return false
	}
}

func (s *queueSuite) testWait(t *testing.T) {
	inBubble(t, "Enqueue", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		c := h.startConsumer(t, "c", nsA)
		synctest.Wait()
		if c.finished() {
			t.Fatalf("the consumer returned with nothing published: %v", c.err)
		}
		e := h.event(nsA)
		published := make(chan error)
		go func() { // from another goroutine
			_, err := h.q.Enqueue(context.Background(), []h3x.Event{e})
			published <- err
		}()
		if err := <-published; err != nil {
			t.Fatalf("Enqueue: %v", err)
		}
		synctest.Wait()
		if !c.finished() {
			t.Fatal("Wait did not return after an Enqueue into its namespace")
		}
		if c.err != nil || len(c.leases) != 1 || c.leases[0].Event.ID != e.ID {
			t.Errorf("consumer got %s, err %v; want %s", describe(c.leases), c.err, e.ID)
		}
	})

	inBubble(t, "AlreadyReady", func(t *testing.T) {
		// An event enqueued before Wait (say between a consumer's empty
		// Lease and its Wait) must not be missed: Wait returns at once.
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.event(nsA))
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		start := time.Now()
		if err := h.q.Wait(ctx, []string{nsA}); err != nil {
			t.Fatalf("Wait with an event ready: %v after %v, want nil at once", err, time.Since(start))
		}
	})

	// The event becomes ready when a lease ends, after some time.
	for _, tc := range []struct {
		name  string
		end   func(h *harness, l h3x.Lease)
		ready time.Duration
	}{
		{"NackDelay", func(h *harness, l h3x.Lease) { wantAllOK(h.t, "Nack", h.nack("a", 10*time.Second, "r", refOf(l))) }, 10 * time.Second},
		{"LeaseExpiry", func(h *harness, l h3x.Lease) {}, leaseTime},
		{"Nack", func(h *harness, l h3x.Lease) { wantAllOK(h.t, "Nack", h.nack("a", 0, "r", refOf(l))) }, 0},
		{"Release", func(h *harness, l h3x.Lease) { h.release("a") }, 0},
	} {
		inBubble(t, tc.name, func(t *testing.T) {
			h := s.open(t, h3x.QueueOptions{})
			id := h.publish(h.event(nsA))[0]
			l := h.leaseOne("a", nsA)
			start := time.Now()
			c := h.startConsumer(t, "b", nsA)
			synctest.Wait()
			if c.finished() {
				t.Fatalf("the consumer returned while the event was leased: %s, %v", describe(c.leases), c.err)
			}
			tc.end(h, l)
			time.Sleep(tc.ready + slack)
			synctest.Wait()
			if !c.finished() {
				t.Fatalf("Wait had not returned %v after the event became ready (%v after the lease)", slack, tc.ready)
			}
			if c.err != nil || len(c.leases) != 1 || c.leases[0].Event.ID != id {
				t.Fatalf("consumer got %s, err %v; want %s", describe(c.leases), c.err, id)
			}
			if d := c.at.Sub(start); d < tc.ready || d > tc.ready+slack {
				t.Errorf("consumer leased the event %v after it was leased, want %v", d, tc.ready)
			}
		})
	}

	// Wait watches every namespace it is given, not only the first.
	for _, pos := range []int{1, 2} {
		nss := []string{nsA, nsB, nsC}
		inBubble(t, fmt.Sprintf("AnyNamespace%d", pos), func(t *testing.T) {
			h := s.open(t, h3x.QueueOptions{})
			c := h.startConsumer(t, "c", nss...)
			synctest.Wait()
			if c.finished() {
				t.Fatalf("the consumer returned with nothing published: %v", c.err)
			}
			e := h.event(nss[pos])
			h.publish(e)
			synctest.Wait()
			if !c.finished() {
				t.Fatalf("Wait(%v) did not return after an Enqueue into %q", nss, nss[pos])
			}
			if c.err != nil || len(c.leases) != 1 || c.leases[0].Event.ID != e.ID {
				t.Errorf("consumer got %s, err %v; want %s", describe(c.leases), c.err, e.ID)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			h.publish(h.event(nss[pos]))
			if err := h.q.Wait(ctx, nss); err != nil {
				t.Errorf("Wait(%v) with an event ready in %q: %v, want nil at once", nss, nss[pos], err)
			}
		})
	}

	inBubble(t, "DeadLetter", func(t *testing.T) {
		// A dead-letter namespace is waited on like any other: a move
		// into it wakes its consumers.
		h := s.open(t, h3x.QueueOptions{MaxAttempts: 1})
		dlq := h3x.DeadLetterNamespace(nsA)
		id := h.publish(h.event(nsA))[0]
		l := h.leaseOne("a", nsA)
		c := h.startConsumer(t, "b", dlq)
		synctest.Wait()
		if c.finished() {
			t.Fatalf("the dead-letter consumer returned before anything was dead-lettered: %v", c.err)
		}
		wantAllOK(t, "Nack", h.nack("a", 0, "r", refOf(l)))
		synctest.Wait()
		if !c.finished() {
			t.Fatal("Wait on the dead-letter namespace did not return after an event moved into it")
		}
		if c.err != nil || len(c.leases) != 1 || c.leases[0].Event.ID != id {
			t.Errorf("dead-letter consumer got %s, err %v; want %s", describe(c.leases), c.err, id)
		}
	})

	inBubble(t, "AllWaiters", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		var ws []*waiter
		for range 3 {
			ws = append(ws, h.startWaiter(t, context.Background(), nsA))
		}
		synctest.Wait()
		for i, w := range ws {
			if w.returned() {
				t.Fatalf("waiter %d returned with nothing published: %v", i, w.err)
			}
		}
		h.publish(h.event(nsA))
		synctest.Wait()
		for i, w := range ws {
			if !w.returned() {
				t.Errorf("waiter %d of 3 still blocked after an Enqueue", i)
			} else if w.err != nil {
				t.Errorf("waiter %d: %v", i, w.err)
			}
		}
	})

	inBubble(t, "Idle", func(t *testing.T) {
		// With nothing pending, Wait is durably blocked (it does not poll)
		// and returns at most a few times in ten minutes.
		h := s.open(t, h3x.QueueOptions{})
		c := h.startConsumer(t, "c", nsA, nsB)
		synctest.Wait()
		if c.finished() {
			t.Fatalf("idle consumer returned: %v", c.err)
		}
		time.Sleep(10 * time.Minute)
		if n := c.waits.Load(); n > 5 || c.finished() {
			t.Errorf("Wait returned %d times in 10 idle minutes (consumer finished: %v, err %v), want at most 5: Wait must not poll", n, c.finished(), c.err)
		}
	})

	inBubble(t, "Canceled", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		ctx, cancel := context.WithCancel(context.Background())
		w := h.startWaiter(t, ctx, nsA)
		synctest.Wait()
		if w.returned() {
			t.Fatalf("Wait returned before cancellation: %v", w.err)
		}
		cancel()
		synctest.Wait()
		if !w.returned() {
			t.Fatal("Wait did not return when its context was canceled")
		}
		if !errors.Is(w.err, context.Canceled) {
			t.Errorf("Wait after cancellation: %v, want context.Canceled", w.err)
		}
	})

	inBubble(t, "DeadlineExceeded", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		start := time.Now()
		err := h.q.Wait(ctx, []string{nsA})
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Wait with a 5s timeout: %v, want context.DeadlineExceeded", err)
		}
		if d := time.Since(start); d < 5*time.Second || d > 5*time.Second+slack {
			t.Errorf("Wait with a 5s timeout returned after %v", d)
		}
	})
}

// --- Stats -------------------------------------------------------------------

func (s *queueSuite) testStats(t *testing.T) {
	inBubble(t, "Counts", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{MaxAttempts: 2})
		dlq := h3x.DeadLetterNamespace(nsA)
		ids := h.publish(h.events(nsA, 4)...)
		full := h.wantCounts("4 published", nsA, counts{Ready: 4}).Bytes
		if full <= 0 {
			t.Errorf("Bytes of 4 events: %d, want > 0", full)
		}
		wantBytes := func(step string, want int64) {
			t.Helper()
			if got := h.stats(nsA).Bytes; got != want {
				t.Errorf("%s: Bytes %d, want %d", step, got, want)
			}
		}

		ls := h.lease("a", 3, nsA) // ids 0, 1, 2 at attempt 1
		h.wantCounts("3 leased", nsA, counts{Ready: 1, Leased: 3})
		wantBytes("3 leased", full)

		wantAllOK(t, "Nack", h.nack("a", 10*time.Second, "r", refOf(ls[0])))
		h.wantCounts("1 nacked with a delay", nsA, counts{Ready: 1, Leased: 2, Delayed: 1})
		wantBytes("1 nacked with a delay", full)

		time.Sleep(10*time.Second + slack)
		h.wantCounts("after the delay", nsA, counts{Ready: 2, Leased: 2})

		wantAllOK(t, "Ack", h.ack("a", refOf(ls[1])))
		h.wantCounts("1 acked", nsA, counts{Ready: 2, Leased: 1})
		afterAck := h.stats(nsA).Bytes
		if afterAck <= 0 || afterAck >= full {
			t.Errorf("Bytes after acking 1 of 4 events: %d, want between 0 and %d", afterAck, full)
		}

		h.release("a")
		h.wantCounts("released", nsA, counts{Ready: 3})

		// ids 0 and 2 are at their 2nd (last) attempt, id 3 at its 1st.
		ls = h.lease("a", 3, nsA)
		var last []h3x.LeaseRef
		for _, l := range ls {
			if l.Attempt == 2 {
				last = append(last, refOf(l))
			} else if l.Event.ID != ids[3] {
				t.Fatalf("leased %s with attempt %d, want attempt 2 except for %s", l.Event.ID, l.Attempt, ids[3])
			}
		}
		if len(ls) != 3 || len(last) != 2 {
			t.Fatalf("leased %s, want 3 events, 2 of them at attempt 2", describe(ls))
		}
		wantAllOK(t, "Nack", h.nack("a", 0, "r", last...))
		h.wantCounts("2 dead-lettered", nsA, counts{Leased: 1, DeadLettered: 2})
		h.wantCounts("dead-letter namespace", dlq, counts{Ready: 2})
		if b := h.stats(nsA).Bytes; b <= 0 || b >= afterAck {
			t.Errorf("Bytes after 2 of 3 events were dead-lettered: %d, want between 0 and %d", b, afterAck)
		}

		time.Sleep(leaseTime + slack)
		h.wantCounts("lease expired", nsA, counts{Ready: 1, DeadLettered: 2})

		h.drain("a", 10, nsA)
		h.wantCounts("all acked", nsA, counts{DeadLettered: 2})
		wantBytes("all acked", 0)
	})

	// Expired is optional: a queue that leaves it zero passes (the subtest
	// is skipped), one that counts must count exactly the expired leases.
	inBubble(t, "Expired", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{MaxAttempts: 2})
		h.publish(h.events(nsA, 4)...)
		h.publish(h.event(nsB))
		ls := h.lease("a", 4, nsA)
		if len(ls) != 4 {
			t.Fatalf("leased %s, want 4 events", describe(ls))
		}
		h.leaseOne("b", nsB)
		// Of four leases, one is acked, one nacked, one extended, one
		// expires; nsB's lease is released.
		wantAllOK(t, "Ack", h.ack("a", refOf(ls[0])))
		wantAllOK(t, "Nack", h.nack("a", 0, "r", refOf(ls[1])))
		wantAllOK(t, "Extend", h.extend("a", 10*leaseTime, refOf(ls[2])))
		h.release("b")
		time.Sleep(leaseTime + slack)
		wantExpired := func(step, ns string, want int) {
			t.Helper()
			if got := h.stats(ns).Expired; got != want {
				t.Errorf("%s: Stats(%q).Expired = %d, want %d", step, ns, got, want)
			}
		}
		if h.stats(nsA).Expired == 0 {
			wantExpired("after a release", nsB, 0)
			t.Skip("the queue does not count lease expiries (NamespaceStats.Expired is optional)")
		}
		wantExpired("one of four leases expired", nsA, 1)
		wantExpired("a lease released", nsB, 0)

		// The nacked and the expired event, at their last attempt, expire
		// and are dead-lettered: still expiries, of their namespace.
		if ls := h.lease("c", 2, nsA); len(ls) != 2 {
			t.Fatalf("leased %s, want the nacked and the expired event", describe(ls))
		}
		time.Sleep(leaseTime + slack)
		h.wantCounts("expired at the last attempt", nsA, counts{Leased: 1, DeadLettered: 2})
		wantExpired("expired at the last attempt", nsA, 3)
		wantExpired("dead-letter namespace", h3x.DeadLetterNamespace(nsA), 0)
	})

	inBubble(t, "OldestReady", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		wantAge := func(step string, want time.Duration) {
			t.Helper()
			if got := h.stats(nsA).OldestReady; got < want-slack || got > want+slack {
				t.Errorf("%s: OldestReady %v, want %v", step, got, want)
			}
		}
		wantAge("empty", 0)
		h.publish(h.event(nsA))
		time.Sleep(5 * time.Second)
		h.publish(h.event(nsA))
		time.Sleep(3 * time.Second)
		wantAge("events 8s and 3s old", 8*time.Second)
		h.leaseOne("a", nsA)
		wantAge("the older one leased", 3*time.Second)
		h.leaseOne("a", nsA)
		wantAge("both leased", 0)
	})

	t.Run("OldestReadyAcrossReopen", func(t *testing.T) {
		s.needReopen(t)
		synctest.Test(t, func(t *testing.T) {
			h := s.open(t, h3x.QueueOptions{})
			h.publish(h.event(nsA))
			time.Sleep(10 * time.Second)
			h.reopen()
			time.Sleep(5 * time.Second)
			if got := h.stats(nsA).OldestReady; got < 15*time.Second-slack || got > 15*time.Second+slack {
				t.Errorf("OldestReady of an event published 15s ago, reopened at 10s: %v", got)
			}
		})
	})

	t.Run("AllNamespaces", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{MaxAttempts: 1})
		h.publish(h.event(nsA), h.event(nsB), h.event(nsB), h.event(nsC))
		h.leaseOne("a", nsC)                                                   // nsC: nothing ready, one leased
		wantAllOK(t, "Nack", h.nack("b", 0, "r", refOf(h.leaseOne("b", nsB)))) // one of nsB's dead-lettered
		all, err := h.q.Stats(h.ctx)
		if err != nil {
			t.Fatalf("Stats(): %v", err)
		}
		got := map[string]counts{}
		for _, st := range all {
			got[st.Namespace] = counts{st.Ready, st.Leased, st.Delayed, st.DeadLettered}
		}
		want := map[string]counts{
			nsA:                          {Ready: 1},
			nsB:                          {Ready: 1, DeadLettered: 1},
			nsC:                          {Leased: 1},
			h3x.DeadLetterNamespace(nsB): {Ready: 1},
		}
		for ns, w := range want {
			if g, ok := got[ns]; !ok || g != w {
				t.Errorf("Stats() with no namespaces: %q: %+v (listed: %v), want %+v", ns, g, ok, w)
			}
		}
	})

	t.Run("UnknownNamespace", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		h.wantCounts("never used", "no-such-namespace", counts{})
	})
}

// --- Reopen ------------------------------------------------------------------

func (s *queueSuite) testReopen(t *testing.T) {
	t.Run("UnackedReady", func(t *testing.T) {
		// Every published, unacked event is delivered again, leased ones
		// included, in publish order.
		s.needReopen(t)
		h := s.open(t, h3x.QueueOptions{})
		ids := h.publish(h.events(nsA, 5)...)
		idsB := h.publish(h.events(nsB, 2)...)
		ls := h.lease("a", 2, nsA)
		wantAllOK(t, "Ack", h.ack("a", refOf(ls[0])))
		h.lease("a", 1, nsB)
		bytesA, bytesB := h.stats(nsA).Bytes, h.stats(nsB).Bytes
		h.reopen()
		h.wantCounts("after reopen", nsA, counts{Ready: 4})
		if a, b := h.stats(nsA).Bytes, h.stats(nsB).Bytes; a != bytesA || b != bytesB {
			t.Errorf("Bytes after reopen %d, %d; want %d, %d as before", a, b, bytesA, bytesB)
		}
		wantIDs(t, "delivered from "+nsA+" after reopen", idsOf(h.drain("b", 3, nsA)), ids[1:])
		wantIDs(t, "delivered from "+nsB+" after reopen", idsOf(h.drain("b", 3, nsB)), idsB)
	})

	t.Run("SequenceContinues", func(t *testing.T) {
		// New events follow the old ones, even when the newest old ones
		// were acked before the restart.
		s.needReopen(t)
		h := s.open(t, h3x.QueueOptions{})
		publishN := func(n int) []string {
			var ids []string
			for range n { // one Enqueue each, IDs assigned by the queue
				ids = append(ids, h.publish(h3x.Event{Namespace: nsA, Type: "t"})...)
			}
			return ids
		}
		old := publishN(4)
		ls := h.lease("a", 4, nsA)
		wantAllOK(t, "Ack of the two newest", h.ack("a", refOf(ls[2]), refOf(ls[3])))
		h.reopen()
		fresh := publishN(3)
		want := slices.Concat(old[:2], fresh)
		wantIDs(t, "delivered after reopen", idsOf(h.drain("b", 2, nsA)), want)
		all := slices.Concat(old, fresh)
		if len(slices.Compact(slices.Sorted(slices.Values(all)))) != len(all) {
			t.Errorf("IDs before and after reopen %v are not distinct", all)
		}
		h.reopen()
		id := publishN(1)
		wantIDs(t, "delivered after a second reopen", idsOf(h.drain("b", 2, nsA)), id)
	})

	t.Run("Backlog", func(t *testing.T) {
		// A backlog of megabytes, partly leased and acked, comes back
		// whole and in order.
		s.needReopen(t)
		h := s.open(t, h3x.QueueOptions{})
		var ids []string
		for range 6 {
			batch := make([]h3x.Event, 250)
			for i := range batch {
				batch[i] = h.bigEvent(nsA, 1000)
			}
			ids = append(ids, h.publish(batch...)...)
		}
		ls := h.lease("a", 100, nsA)
		var acked []h3x.LeaseRef
		for i, l := range ls {
			if i%2 == 0 {
				acked = append(acked, refOf(l))
			}
		}
		wantAllOK(t, "Ack", h.ack("a", acked...))
		h.reopen()
		var want []string
		for i, id := range ids {
			if i >= 100 || i%2 == 1 {
				want = append(want, id)
			}
		}
		h.wantCounts("after reopen", nsA, counts{Ready: len(want)})
		got := idsOf(h.drain("b", 100, nsA))
		if !slices.Equal(got, want) {
			t.Errorf("after reopen delivered %d events, want %d in publish order (first difference at %d)", len(got), len(want), firstDiff(got, want))
		}
	})

	t.Run("AttemptsContinue", func(t *testing.T) {
		// A delivery before the restart counts: the next one is attempt 2,
		// so the old attempt's settlement is stale.
		s.needReopen(t)
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.event(nsA))
		l1 := h.leaseOne("a", nsA)
		h.reopen()
		l2 := h.leaseOne("b", nsA)
		if l2.Attempt != 2 {
			t.Errorf("first delivery after reopen has attempt %d, want 2 (attempt 1 was delivered before)", l2.Attempt)
		}
		wantStatus(t, "ack of the pre-restart attempt after a newer delivery", h.ack("a", refOf(l1)), h3x.SettleStale)
		h.leaseNone("c", "after a stale ack (b holds it)", nsA)
		wantStatus(t, "ack of the new delivery", h.ack("b", refOf(l2)), h3x.SettleOK)
	})

	t.Run("SettleAcrossReopen", func(t *testing.T) {
		// A client that received a delivery before the restart settles it
		// after, from a new connection: no newer delivery exists, so it
		// applies.
		s.needReopen(t)
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.events(nsA, 2)...)
		ls := h.lease("a", 2, nsA)
		h.reopen()
		wantStatus(t, "ack of a pre-restart delivery", h.ack("a-reconnected", refOf(ls[0])), h3x.SettleOK)
		wantStatus(t, "nack of a pre-restart delivery", h.nack("a-reconnected", 0, "r", refOf(ls[1])), h3x.SettleOK)
		wantIDs(t, "after reopen", idsOf(h.drain("c", 10, nsA)), []string{ls[1].Event.ID})
	})

	t.Run("AckedStayGone", func(t *testing.T) {
		s.needReopen(t)
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.events(nsA, 3)...)
		h.drain("a", 10, nsA)
		for i := range 2 {
			h.reopen()
			h.leaseNone("a", fmt.Sprintf("after reopen %d", i+1), nsA)
			h.wantCounts("after reopen", nsA, counts{})
		}
	})
}

// --- Concurrency -------------------------------------------------------------

func (s *queueSuite) testConcurrency(t *testing.T) {
	t.Run("Publishers", func(t *testing.T) {
		// 8 publishers, 10 batches of 5 each, into two namespaces.
		h := s.open(t, h3x.QueueOptions{})
		var wg sync.WaitGroup
		for p := range 8 {
			ns := []string{nsA, nsB}[p%2]
			wg.Go(func() {
				for b := range 10 {
					batch := make([]h3x.Event, 5)
					for i := range batch {
						batch[i] = h3x.Event{ID: fmt.Sprintf("pub%d-%03d", p, b*5+i), Namespace: ns, Type: "t"}
					}
					res, err := h.q.Enqueue(context.Background(), batch)
					if err != nil {
						t.Errorf("publisher %d: Enqueue: %v", p, err)
						return
					}
					for i, r := range res {
						if r.Status != h3x.PublishStored || r.ID != batch[i].ID {
							t.Errorf("publisher %d: result %s %v (err %v), want %s stored", p, r.ID, r.Status, r.Err, batch[i].ID)
						}
					}
				}
			})
		}
		wg.Wait()
		if t.Failed() {
			return
		}
		h.wantCounts("after 4 publishers x 50 events", nsA, counts{Ready: 200})
		got := idsOf(h.drain("c", 100, nsA, nsB))
		// Each publisher's events keep its order.
		next := map[string]int{}
		for _, id := range got {
			p, n, _ := strings.Cut(id, "-")
			if want := fmt.Sprintf("%03d", next[p]); n != want {
				t.Fatalf("delivered %s after %d events of %s: publisher order broken", id, next[p], p)
			}
			next[p]++
		}
		if len(got) != 400 {
			t.Errorf("delivered %d events, want 400", len(got))
		}
	})

	t.Run("Leasers", func(t *testing.T) {
		// 8 leasers ack while 2 publishers add to 300 events: no event is
		// held by two leasers at once, and each is acked exactly once.
		h := s.open(t, h3x.QueueOptions{})
		q := h.q
		nss := []string{nsA, nsB}
		var batch []h3x.Event
		for i := range 300 {
			batch = append(batch, h3x.Event{ID: fmt.Sprintf("pre-%03d", i), Namespace: nss[i%2], Type: "t"})
		}
		h.publish(batch...)
		const total = 300 + 2*100
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()

		var (
			mu    sync.Mutex
			held  = map[string]string{} // event ID -> leaser
			acked = map[string]int{}
			done  atomic.Int64
			wg    sync.WaitGroup
		)
		for p := range 2 {
			wg.Go(func() {
				for b := range 20 {
					evs := make([]h3x.Event, 5)
					for i := range evs {
						evs[i] = h3x.Event{ID: fmt.Sprintf("live%d-%03d", p, b*5+i), Namespace: nss[(b+i)%2], Type: "t"}
					}
					res, err := q.Enqueue(ctx, evs)
					if err != nil {
						t.Errorf("publisher %d: Enqueue: %v", p, err)
						return
					}
					for _, r := range res {
						if r.Status != h3x.PublishStored {
							t.Errorf("publisher %d: %s %v (err %v), want stored", p, r.ID, r.Status, r.Err)
						}
					}
				}
			})
		}
		for c := range 8 {
			holder := fmt.Sprintf("leaser-%d", c)
			wg.Go(func() {
				for i := 0; i < 20_000 && done.Load() < total && ctx.Err() == nil; i++ {
					req := h3x.LeaseRequest{Holder: holder, Namespaces: nss, Limit: 1 + i%7, AckDeadline: time.Minute}
					ls, err := q.Lease(ctx, req)
					if err != nil {
						if ctx.Err() == nil {
							t.Errorf("%s: Lease: %v", holder, err)
						}
						return
					}
					checkLeases(t, req, ls)
					if len(ls) == 0 {
						wctx, wcancel := context.WithTimeout(ctx, 20*time.Millisecond)
						_ = q.Wait(wctx, nss)
						wcancel()
						continue
					}
					mu.Lock()
					for _, l := range ls {
						if other, ok := held[l.Event.ID]; ok {
							t.Errorf("%s leased %s while %s held it", holder, l.Event.ID, other)
						}
						held[l.Event.ID] = holder
					}
					mu.Unlock()
					res, err := q.Ack(ctx, holder, refsOf(ls))
					if err != nil {
						t.Errorf("%s: Ack: %v", holder, err)
						return
					}
					mu.Lock()
					for _, l := range ls {
						delete(held, l.Event.ID)
					}
					for _, r := range res {
						if r.Status != h3x.SettleOK {
							t.Errorf("%s: Ack of its own lease of %s: %v", holder, r.ID, r.Status)
							continue
						}
						acked[r.ID]++
						done.Add(1)
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		if len(acked) != total {
			t.Errorf("%d distinct events acked, want %d (deadline: %v)", len(acked), total, ctx.Err())
		}
		for id, n := range acked {
			if n != 1 {
				t.Errorf("%s acked %d times", id, n)
			}
		}
		h.leaseNone("c", "after every event was acked", nss...)
	})

	t.Run("SameID", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		var (
			wg       sync.WaitGroup
			statuses = make([]h3x.PublishStatus, 8)
			start    = make(chan struct{})
		)
		for i := range statuses {
			wg.Go(func() {
				<-start
				res, err := h.q.Enqueue(context.Background(), []h3x.Event{{ID: "same", Namespace: nsOf(i), Type: "t"}})
				if err != nil || len(res) != 1 {
					t.Errorf("Enqueue: %v, %d results", err, len(res))
					return
				}
				statuses[i] = res[0].Status
			})
		}
		close(start)
		wg.Wait()
		n := map[h3x.PublishStatus]int{}
		for _, st := range statuses {
			n[st]++
		}
		if n[h3x.PublishStored] != 1 || n[h3x.PublishDuplicate] != 7 {
			t.Errorf("8 concurrent publishes of one ID: %v, want 1 stored and 7 duplicates", statuses)
		}
		wantIDs(t, "delivered", idsOf(h.drain("c", 10, nsA, nsB)), []string{"same"})
	})

	t.Run("RacingAcks", func(t *testing.T) {
		// Two holders ack the same 50 deliveries at once: each is applied
		// once (by a, the holder).
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.events(nsA, 50)...)
		ls := h.lease("a", 50, nsA)
		var (
			wg  sync.WaitGroup
			mu  sync.Mutex
			oks = map[string]int{}
		)
		for _, holder := range []string{"a", "b"} {
			wg.Go(func() {
				for i := range ls {
					if holder == "b" {
						i = len(ls) - 1 - i
					}
					res, err := h.q.Ack(context.Background(), holder, []h3x.LeaseRef{refOf(ls[i])})
					if err != nil || len(res) != 1 {
						t.Errorf("Ack: %v, %d results", err, len(res))
						return
					}
					switch res[0].Status {
					case h3x.SettleOK:
						mu.Lock()
						oks[res[0].ID]++
						mu.Unlock()
					case h3x.SettleUnknown, h3x.SettleStale:
						// Unknown if the other ack came first; stale for b
						// while a's lease lasts.
					default:
						t.Errorf("%s's ack of %s: %v, want ok, unknown or stale", holder, res[0].ID, res[0].Status)
					}
				}
			})
		}
		wg.Wait()
		for _, l := range ls {
			if n := oks[l.Event.ID]; n != 1 {
				t.Errorf("%s: %d acks applied, want 1", l.Event.ID, n)
			}
		}
	})
}

// nsOf maps i to one of two namespaces.
func nsOf(i int) string { return []string{nsA, nsB}[i%2] }

// --- Close -------------------------------------------------------------------

func (s *queueSuite) testClose(t *testing.T) {
	t.Run("MethodsReturnErrQueueClosed", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.event(nsA))
		ref := refOf(h.leaseOne("a", nsA))
		if err := h.q.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		q := h.q
		refs := []h3x.LeaseRef{ref}
		for _, c := range []struct {
			name string
			call func() error
		}{
			{"Enqueue", func() error { _, err := q.Enqueue(ctx, []h3x.Event{h.event(nsA)}); return err }},
			{"EnqueueNothing", func() error { _, err := q.Enqueue(ctx, nil); return err }},
			{"Lease", func() error {
				_, err := q.Lease(ctx, h3x.LeaseRequest{Holder: "a", Namespaces: []string{nsA}, Limit: 1, AckDeadline: leaseTime})
				return err
			}},
			{"Wait", func() error { return q.Wait(ctx, []string{nsA}) }},
			{"Ack", func() error { _, err := q.Ack(ctx, "a", refs); return err }},
			{"Nack", func() error { _, err := q.Nack(ctx, "a", refs, 0, "r"); return err }},
			{"Extend", func() error { _, err := q.Extend(ctx, "a", refs, leaseTime); return err }},
			{"Release", func() error { return q.Release(ctx, "a") }},
			{"Stats", func() error { _, err := q.Stats(ctx); return err }},
		} {
			t.Run(c.name, func(t *testing.T) {
				if err := c.call(); !errors.Is(err, h3x.ErrQueueClosed) {
					t.Errorf("%s after Close: %v, want h3x.ErrQueueClosed", c.name, err)
				}
			})
		}
	})

	t.Run("Twice", func(t *testing.T) {
		h := s.open(t, h3x.QueueOptions{})
		h.publish(h.event(nsA))
		if err := h.q.Close(); err != nil {
			t.Fatalf("first Close: %v", err)
		}
		if err := h.q.Close(); err != nil && !errors.Is(err, h3x.ErrQueueClosed) {
			t.Errorf("second Close: %v, want nil or h3x.ErrQueueClosed", err)
		}
	})
}
