package h3x

import (
	"bytes"
	"context"
	"maps"
	"time"
)

// NewMemoryQueue returns a Queue that keeps everything in memory: the
// events, leases and dedup state are lost when the process ends or the queue
// is closed. It is meant for tests and for embedding where durability does
// not matter, and has exactly the semantics of the Badger queue (the two share
// their state machine), except that nothing survives Close.
//
// Defaults (the zero QueueOptions): a 2-minute dedup window, dead-lettering
// after 10 attempts, no per-namespace limits. Durability and Badger are
// ignored; Logger receives the few warnings it logs.
//
// Every operation is O(log n) or better in the number of stored events,
// except Release, which is linear in the holder's leases.
func NewMemoryQueue(opts QueueOptions) Queue {
	opts = normalizeQueueOptions(opts)
	q := &memoryQueue{}
	q.core = newQueueCore(opts, (*memoryStore)(q), true)
	return q
}

var _ Queue = (*memoryQueue)(nil)

type memoryQueue struct {
	core *queueCore
}

func (q *memoryQueue) announcedLimits() (int, time.Duration) { return q.core.announcedLimits() }

// memoryStore is the queueStore of a memoryQueue: every entry keeps its
// event, so there is nothing to read or write.
type memoryStore memoryQueue

func (s *memoryStore) refill(*qns, int) error { return nil }

// take returns the stored event itself, whose Data and Metadata are shared
// and never modified; memoryQueue.Lease copies them after the core's lock
// is released, so a large lease holds the lock (and every other namespace's
// publishes and fetches) only for its bookkeeping.
func (s *memoryStore) take(e *qentry) (Event, error) {
	return *e.ev, nil
}

func (s *memoryStore) barrier() *writeWait { return nil } // applied as submitted

func (s *memoryStore) submit(fx *effects, _ bool) *writeWait {
	c := s.core
	now := time.Now().UnixNano()
	for _, m := range fx.moves {
		ev := deadLetterEvent(*m.e.ev, m.e.ns.name, m.attempts, m.reason)
		m.e.ev = nil
		e := &qentry{id: ev.ID, ns: m.dst, seq: c.nextSeq, size: ev.size(), enq: now}
		c.nextSeq++
		c.arrived(m)
		c.land(e, &ev, m.size)
	}
	for _, e := range fx.deletes {
		e.ev = nil
	}
	return nil
}

// cloneEvent copies ev's Data and Metadata, so that the copy shares nothing
// mutable with ev.
func cloneEvent(ev Event) Event {
	if ev.Data != nil {
		ev.Data = bytes.Clone(ev.Data)
	}
	if ev.Metadata != nil {
		ev.Metadata = maps.Clone(ev.Metadata)
	}
	return ev
}

func (q *memoryQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	now := time.Now()
	evs := make([]Event, len(events))
	sizes := make([]int, len(events))
	res := make([]PublishResult, len(events))
	for i := range events {
		evs[i] = cloneEvent(events[i])
		sizes[i] = prepareEvent(&evs[i], now)
		refuseUnencodable(&evs[i], &res[i])
	}
	c := q.core
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrQueueClosed
	}
	accepted := c.accept(evs, sizes, now.UnixNano(), res, nil)
	k := 0
	for i := range evs {
		if res[i].Status == PublishStored {
			c.land(accepted[k], &evs[i], accepted[k].size)
			k++
		}
	}
	return res, nil
}

func (q *memoryQueue) Lease(ctx context.Context, req LeaseRequest) ([]Lease, error) {
	out, err := q.core.Lease(ctx, req)
	for i := range out {
		out[i].Event = cloneEvent(out[i].Event)
	}
	return out, err
}

func (q *memoryQueue) Wait(ctx context.Context, namespaces []string) error {
	return q.core.Wait(ctx, namespaces)
}

func (q *memoryQueue) Ack(ctx context.Context, holder string, refs []LeaseRef) ([]SettleResult, error) {
	return q.core.settle(ctx, settleAck, holder, refs, 0, "")
}

func (q *memoryQueue) Nack(ctx context.Context, holder string, refs []LeaseRef, delay time.Duration, reason string) ([]SettleResult, error) {
	return q.core.settle(ctx, settleNack, holder, refs, delay, reason)
}

func (q *memoryQueue) Extend(ctx context.Context, holder string, refs []LeaseRef, d time.Duration) ([]SettleResult, error) {
	return q.core.settle(ctx, settleExtend, holder, refs, d, "")
}

func (q *memoryQueue) Release(ctx context.Context, holder string) error {
	return q.core.Release(ctx, holder)
}

func (q *memoryQueue) Stats(ctx context.Context, namespaces ...string) ([]NamespaceStats, error) {
	return q.core.Stats(ctx, namespaces...)
}

// Close discards the queue's contents. It is safe to call more than once.
func (q *memoryQueue) Close() error {
	q.core.close()
	return nil
}
