package h3xtest_test

import (
	"context"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/h3x-io/h3x"
)

// Mutants of the memory queue: each breaks one contract of h3x.Queue
// subtly. TestQueueSuiteCatchesBrokenQueues requires the suite to fail
// every one.

// releaseLeavesOne: Release ends all of a holder's leases but one.
type releaseLeavesOne struct {
	h3x.Queue
	mu   sync.Mutex
	held map[string]map[string]int // holder -> id -> attempt
}

func (q *releaseLeavesOne) Lease(ctx context.Context, req h3x.LeaseRequest) ([]h3x.Lease, error) {
	ls, err := q.Queue.Lease(ctx, req)
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.held == nil {
		q.held = map[string]map[string]int{}
	}
	for _, l := range ls {
		if q.held[req.Holder] == nil {
			q.held[req.Holder] = map[string]int{}
		}
		for _, m := range q.held { // no longer anyone else's
			delete(m, l.Event.ID)
		}
		q.held[req.Holder][l.Event.ID] = l.Attempt
	}
	return ls, err
}

func (q *releaseLeavesOne) forget(res []h3x.SettleResult) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, r := range res {
		if r.Status == h3x.SettleOK {
			for _, m := range q.held {
				delete(m, r.ID)
			}
		}
	}
}

func (q *releaseLeavesOne) Ack(ctx context.Context, holder string, refs []h3x.LeaseRef) ([]h3x.SettleResult, error) {
	res, err := q.Queue.Ack(ctx, holder, refs)
	q.forget(res)
	return res, err
}

func (q *releaseLeavesOne) Nack(ctx context.Context, holder string, refs []h3x.LeaseRef, d time.Duration, reason string) ([]h3x.SettleResult, error) {
	res, err := q.Queue.Nack(ctx, holder, refs, d, reason)
	q.forget(res)
	return res, err
}

func (q *releaseLeavesOne) Release(ctx context.Context, holder string) error {
	q.mu.Lock()
	m := q.held[holder]
	delete(q.held, holder)
	q.mu.Unlock()
	if len(m) < 2 {
		return q.Queue.Release(ctx, holder)
	}
	ids := slices.Sorted(func(yield func(string) bool) {
		for id := range m {
			if !yield(id) {
				return
			}
		}
	})
	var refs []h3x.LeaseRef
	for _, id := range ids[:len(ids)-1] { // keep the last one
		refs = append(refs, h3x.LeaseRef{ID: id, Attempt: m[id]})
	}
	_, err := q.Queue.Nack(ctx, holder, refs, 0, "released")
	return err
}

// waitFirstOnly: Wait watches only the first namespace it is given.
type waitFirstOnly struct{ h3x.Queue }

func (q waitFirstOnly) Wait(ctx context.Context, nss []string) error {
	if len(nss) > 1 {
		nss = nss[:1]
	}
	return q.Queue.Wait(ctx, nss)
}

// waitIgnoresDLQ: Wait never wakes for a dead-letter namespace.
type waitIgnoresDLQ struct{ h3x.Queue }

func (q waitIgnoresDLQ) Wait(ctx context.Context, nss []string) error {
	var keep []string
	for _, ns := range nss {
		if !strings.HasSuffix(ns, h3x.DeadLetterSuffix) {
			keep = append(keep, ns)
		}
	}
	if len(keep) == 0 {
		<-ctx.Done()
		return ctx.Err()
	}
	return q.Queue.Wait(ctx, keep)
}

// waitPolls: Wait polls Stats every 10ms instead of blocking on a signal.
type waitPolls struct{ h3x.Queue }

func (q waitPolls) Wait(ctx context.Context, nss []string) error {
	for {
		st, err := q.Stats(ctx, nss...)
		if err != nil {
			return err
		}
		for _, s := range st {
			if s.Ready > 0 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// unfair: one event from each other namespace, the rest from the first.
type unfair struct{ h3x.Queue }

func (q unfair) Lease(ctx context.Context, req h3x.LeaseRequest) ([]h3x.Lease, error) {
	if len(req.Namespaces) < 2 || req.Limit <= len(req.Namespaces) {
		return q.Queue.Lease(ctx, req)
	}
	var out []h3x.Lease
	sub := req
	for _, ns := range req.Namespaces[1:] {
		sub.Namespaces, sub.Limit = []string{ns}, 1
		ls, err := q.Queue.Lease(ctx, sub)
		if err != nil {
			return out, err
		}
		out = append(out, ls...)
	}
	sub.Namespaces, sub.Limit = req.Namespaces[:1], req.Limit-len(out)
	ls, err := q.Queue.Lease(ctx, sub)
	out = append(out, ls...)
	if err != nil || len(out) >= req.Limit {
		return out, err
	}
	sub.Namespaces, sub.Limit = req.Namespaces, req.Limit-len(out)
	ls, err = q.Queue.Lease(ctx, sub)
	return append(out, ls...), err
}

// extendOther: Extend by a non-holder silently extends the holder's lease
// (and reports stale).
type extendOther struct{ releaseLeavesOne }

func (q *extendOther) Release(ctx context.Context, holder string) error {
	q.mu.Lock()
	delete(q.held, holder)
	q.mu.Unlock()
	return q.Queue.Release(ctx, holder)
}

func (q *extendOther) Extend(ctx context.Context, holder string, refs []h3x.LeaseRef, d time.Duration) ([]h3x.SettleResult, error) {
	res, err := q.Queue.Extend(ctx, holder, refs, d)
	for i, r := range res {
		if r.Status != h3x.SettleStale {
			continue
		}
		q.mu.Lock()
		owner := ""
		for hd, m := range q.held {
			if _, ok := m[r.ID]; ok {
				owner = hd
			}
		}
		q.mu.Unlock()
		if owner != "" && owner != holder {
			q.Queue.Extend(ctx, owner, refs[i:i+1], d)
		}
	}
	return res, err
}

// dlqStrips: dead letters lose their reason, Message and Time.
type dlqStrips struct {
	h3x.Queue
	what string
}

func (q dlqStrips) Lease(ctx context.Context, req h3x.LeaseRequest) ([]h3x.Lease, error) {
	ls, err := q.Queue.Lease(ctx, req)
	for i := range ls {
		if !strings.HasSuffix(ls[i].Event.Namespace, h3x.DeadLetterSuffix) {
			continue
		}
		switch q.what {
		case "reason":
			delete(ls[i].Event.Metadata, h3x.MetaDeadLetterReason)
		case "attempts":
			delete(ls[i].Event.Metadata, h3x.MetaDeadLetterAttempts)
		case "content":
			ls[i].Event.Message = ""
			ls[i].Event.Time = time.Now()
		}
	}
	return ls, err
}

// statsBroken zeroes one Stats field, or lists only namespaces with ready events.
type statsBroken struct {
	h3x.Queue
	what string
}

func (q statsBroken) Stats(ctx context.Context, nss ...string) ([]h3x.NamespaceStats, error) {
	st, err := q.Queue.Stats(ctx, nss...)
	var out []h3x.NamespaceStats
	for _, s := range st {
		switch q.what {
		case "dead":
			s.DeadLettered = 0
		case "oldest":
			s.OldestReady = 0
		case "bytes":
			s.Bytes = 0
		case "allReadyOnly":
			if len(nss) == 0 && s.Ready == 0 {
				continue
			}
		}
		out = append(out, s)
	}
	return out, err
}

// fullBroken: a queue-full refusal without RetryAfter.
type fullBroken struct{ h3x.Queue }

func (q fullBroken) Enqueue(ctx context.Context, evs []h3x.Event) ([]h3x.PublishResult, error) {
	res, err := q.Queue.Enqueue(ctx, evs)
	for i := range res {
		if res[i].Err != nil {
			res[i].Err = &h3x.Error{Code: h3x.CodeQueueFull, Message: "full"}
		}
	}
	return res, err
}

// mutantQueue wraps q in the named mutant, or returns nil for an unknown
// name.
func mutantQueue(name string, q h3x.Queue) h3x.Queue {
	switch name {
	case "releaseLeavesOne":
		return &releaseLeavesOne{Queue: q}
	case "waitFirstOnly":
		return waitFirstOnly{q}
	case "waitIgnoresDLQ":
		return waitIgnoresDLQ{q}
	case "waitPolls":
		return waitPolls{q}
	case "unfair":
		return unfair{q}
	case "extendOther":
		return &extendOther{releaseLeavesOne{Queue: q}}
	case "dlqReason", "dlqAttempts", "dlqContent":
		return dlqStrips{q, strings.ToLower(strings.TrimPrefix(name, "dlq"))}
	case "statsDead", "statsOldest", "statsBytes", "statsAllReadyOnly":
		w := strings.TrimPrefix(name, "stats")
		return statsBroken{q, strings.ToLower(w[:1]) + w[1:]}
	case "fullNoRetryAfter":
		return fullBroken{q}
	}
	return nil
}

// mutants are the names mutantQueue knows.
var mutants = []string{"releaseLeavesOne", "waitFirstOnly", "waitIgnoresDLQ", "waitPolls", "unfair", "extendOther",
	"dlqReason", "dlqAttempts", "dlqContent", "statsDead", "statsOldest", "statsBytes", "statsAllReadyOnly", "fullNoRetryAfter"}
