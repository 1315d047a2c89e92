package h3x

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// publish stores a SendEvent's events and builds its SendResult.
func (ss *sessionStream) publish(ctx context.Context, m *h3xpb.SendEvent) (FrameType, proto.Message) {
	c := ss.c
	if n, limit := len(m.GetEvents()), c.srv.cfg.eventsPerSend(); n > limit {
		// Refused whole, before its namespaces are looked at: counted
		// under none.
		c.srv.cfg.hooks.Refused("", CodeInvalidArgument, n)
		return FrameError, errorToWire(newError(CodeInvalidArgument, "%d events in one SendEvent; the maximum is %d", n, limit), m.GetRequestId())
	}
	res := &h3xpb.SendResult{RequestId: m.GetRequestId(), Outcomes: make([]*h3xpb.PublishOutcome, len(m.GetEvents()))}
	events := make([]Event, 0, len(m.GetEvents()))
	index := make([]int, 0, len(m.GetEvents()))
	for i, p := range m.GetEvents() {
		ev := eventFromWire(p)
		var refuse *Error
		nsErr := ValidateNamespace(ev.Namespace)
		switch {
		case len(ev.ID) > MaxEventIDLen:
			// First: whatever else is wrong, an over-long id is not
			// echoed (the answer must fit a frame).
			refuse = newError(CodeInvalidArgument, "event id of %d bytes, longer than %d", len(ev.ID), MaxEventIDLen)
			ev.ID = ""
		case nsErr != nil:
			errors.As(nsErr, &refuse)
		case !c.session.allows(ev.Namespace, PermPublish):
			refuse = newError(CodePermissionDenied, "namespace %q is not granted for publishing", ev.Namespace)
		case !deliverable(p, c.srv.cfg.maxFrameSize):
			refuse = newError(CodeInvalidArgument, "event of %d bytes cannot be delivered in a frame of at most %d bytes (delivery and dead-lettering add up to %d)",
				proto.Size(p), c.srv.cfg.maxFrameSize, deliveryHeadroom(p))
		}
		if refuse != nil {
			res.Outcomes[i] = refusedOutcome(ev.ID, refuse)
			c.srv.cfg.hooks.Refused(ev.Namespace, refuse.Code, 1)
			continue
		}
		events = append(events, ev)
		index = append(index, i)
	}
	if c.rateLimited && len(events) > 0 {
		events, index = ss.applyRateLimits(events, index, res)
	}
	if len(events) > 0 {
		var results []PublishResult
		// Its namespaces' turn in the queue (server_fairshare.go); like
		// Enqueue, not given up when the client goes away.
		release, err := c.srv.fair.admit(c.srv.stopCtx, events)
		if err == nil {
			start := time.Now()
			results, err = c.srv.queue.Enqueue(c.srv.stopCtx, events) // not cancelled by the client's going away
			release()
			reportPublish(c.srv.cfg.hooks, events, results, err, time.Since(start))
		} else {
			err = ErrShuttingDown // the server stopped while it waited its turn: nothing stored
			reportPublish(c.srv.cfg.hooks, events, nil, err, 0)
		}
		if err == nil && len(results) != len(events) {
			err = newError(CodeInternal, "queue returned %d results for %d events", len(results), len(events))
		}
		omitted := 0
		if err == nil && m.GetOmitStored() {
			// Those stored that carried their own id (PROTOCOL.md §6.2).
			omitted = leadingRun(index, func(j int) bool {
				return m.GetEvents()[j].GetId() != "" && results[j].Status == PublishStored
			})
			res.StoredOmitted = uint32(omitted)
		}
		var slab []h3xpb.PublishOutcome // one allocation for the answer's outcomes
		if err == nil {
			slab = make([]h3xpb.PublishOutcome, len(index)-omitted)
		}
		for j := omitted; j < len(index); j++ {
			i := index[j]
			if err != nil {
				c.logger.Error("h3x: enqueue failed", "err", err)
				res.Outcomes[i] = refusedOutcome(events[j].ID, asRetryable(err))
				continue
			}
			r := results[j]
			o := &slab[j-omitted]
			o.Id, o.Status = r.ID, h3xpb.PublishStatus(r.Status)
			if r.Status == PublishRefused {
				o = refusedOutcome(r.ID, r.Err)
			}
			res.Outcomes[i] = o
		}
		res.Outcomes = res.Outcomes[omitted:]
	}
	if hasRefusal(res) && proto.Size(res) > c.srv.cfg.maxFrameSize {
		// Only refusal messages can take the answer past the frame size
		// (eventsPerSend bounds the rest): the codes say enough.
		for _, o := range res.Outcomes {
			o.Message = ""
		}
	}
	return FrameSendResult, res
}

// leadingRun returns how many leading elements of a request may go without
// an outcome (SendEvent.omit_stored, omit_ok: PROTOCOL.md §6.2 and §6.4):
// index lists, in request order, the elements the queue was given (the
// others were refused or denied before it, which ends the run), and
// done(j) reports whether the queue's j-th result is one the client needs
// no outcome for.
func leadingRun(index []int, done func(j int) bool) int {
	k := 0
	for k < len(index) && index[k] == k && done(k) {
		k++
	}
	return k
}

// hasRefusal reports whether res refuses an event (only a refusal carries a
// message).
func hasRefusal(res *h3xpb.SendResult) bool {
	for _, o := range res.Outcomes {
		if o.Status == h3xpb.PublishStatus_PUBLISH_STATUS_REFUSED {
			return true
		}
	}
	return false
}

// MaxEventIDLen is the longest event ID the server accepts, in bytes.
const MaxEventIDLen = 128

// maxOutcomeSize bounds the encoding of one PublishOutcome without its
// message, in a SendResult: an ID of up to MaxEventIDLen bytes, status,
// code and retry-after, with their tags and lengths.
const maxOutcomeSize = MaxEventIDLen + 24

// eventsPerSend is the most events one SendEvent may carry (announced as
// ServerLimits.max_events_per_send): WithMaxEventsPerSend, lowered so that
// the SendResult always fits a frame.
func (c *serverConfig) eventsPerSend() int {
	return max(min(c.maxEventsPerSend, (c.maxFrameSize-64)/maxOutcomeSize), 1)
}

// ackResultFits reports whether the AckResult for ids fits a frame of
// maxFrame bytes: each SettleOutcome echoes its ID.
func ackResultFits(ids []string, maxFrame int) bool {
	n := 16
	for _, id := range ids {
		n += len(id) + 12
	}
	return n <= maxFrame
}

// deliveryHeadroom is the most that delivering p can add to its published
// encoding: the ID and time the queue assigns, the Delivery and EventsBatch
// around it (request id, attempt, lease deadline, lengths), and, once it is
// dead-lettered, the namespace's suffix and three metadata entries, the
// nack reason up to maxNackReason bytes.
func deliveryHeadroom(p *h3xpb.EventPayload) int {
	n := 48 + 8 // EventsBatch request id and field, Delivery's attempt, deadline and lengths; slack for longer varints
	if p.GetId() == "" {
		n += 2 + 36
	}
	if p.GetTimestamp() == 0 {
		n += 11
	}
	n += len(DeadLetterSuffix) + 3*8 + // suffix; per metadata entry, its tags and lengths
		len(MetaDeadLetterAttempts) + 10 +
		len(MetaDeadLetterReason) + maxNackReason +
		len(MetaDeadLetterNamespace) + len(p.GetNamespace())
	return n
}

// deliverable reports whether p, delivered alone, fits a frame of maxFrame
// bytes also after dead-lettering; an event that does not is refused at
// publish, since no consumer with that limit could ever receive it.
func deliverable(p *h3xpb.EventPayload, maxFrame int) bool {
	room := maxFrame - deliveryHeadroom(p)
	// A cheap bound first: proto.Size walks the message.
	bound := 64 + len(p.GetId()) + len(p.GetNamespace()) + len(p.GetType()) + len(p.GetMessage()) + len(p.GetData())
	for k, v := range p.GetMetadata() {
		bound += 16 + len(k) + len(v)
	}
	return bound <= room || proto.Size(p) <= room
}

// applyRateLimits refuses the events over their namespaces' rate limits
// (the latest ones of each namespace) and returns the rest.
func (ss *sessionStream) applyRateLimits(events []Event, index []int, res *h3xpb.SendResult) ([]Event, []int) {
	c := ss.c
	now := time.Now()
	counts := make(map[string]int, 1)
	for i := range events {
		counts[events[i].Namespace]++
	}
	type verdict struct {
		left  int
		wait  time.Duration
		limit RateLimit
	}
	verdicts := make(map[string]*verdict, len(counts))
	for ns, n := range counts {
		got, wait, lim := c.srv.limiters.allow(c.session, ns, n, now)
		verdicts[ns] = &verdict{left: got, wait: wait, limit: lim}
		if got < n {
			c.notifyRateLimit(ns, wait, lim)
		}
	}
	keptEvents, keptIndex := events[:0], index[:0]
	for j := range events {
		v := verdicts[events[j].Namespace]
		if v.left > 0 {
			v.left--
			keptEvents = append(keptEvents, events[j])
			keptIndex = append(keptIndex, index[j])
			continue
		}
		e := &Error{Code: CodeRateLimited, Message: fmt.Sprintf("namespace %q is over its publish rate of %g events/s", events[j].Namespace, v.limit.Rate), RetryAfter: v.wait}
		res.Outcomes[index[j]] = refusedOutcome(events[j].ID, e)
		c.srv.cfg.hooks.Refused(events[j].Namespace, CodeRateLimited, 1)
	}
	return keptEvents, keptIndex
}

func refusedOutcome(id string, err error) *h3xpb.PublishOutcome {
	w := errorToWire(err, 0)
	return &h3xpb.PublishOutcome{Id: id, Status: h3xpb.PublishStatus_PUBLISH_STATUS_REFUSED, Code: w.Code, Message: w.Message, RetryAfterMs: w.RetryAfterMs}
}

// asRetryable keeps an *Error as it is and turns any other error into a
// retryable internal error (storage details stay in the server's log).
func asRetryable(err error) error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return &Error{Code: CodeInternal, Message: "storage failure", RetryAfter: time.Second}
}

// MaxFetchNamespaces is the most namespaces one FetchEvents may name (a
// fetch's cost, and a long poll's registrations, grow with them).
const MaxFetchNamespaces = 1000

// fetch leases events for a FetchEvents, long-polling up to its wait.
func (ss *sessionStream) fetch(ctx context.Context, m *h3xpb.FetchEvents) (FrameType, proto.Message) {
	c := ss.c
	cfg := &c.srv.cfg
	rid := m.GetRequestId()
	namespaces := m.GetNamespaces()
	if len(namespaces) > MaxFetchNamespaces {
		return FrameError, errorToWire(newError(CodeInvalidArgument, "FetchEvents names %d namespaces; the maximum is %d", len(namespaces), MaxFetchNamespaces), rid)
	}
	if len(namespaces) == 0 {
		namespaces = c.session.consumeNamespaces()
		if len(namespaces) == 0 {
			return FrameError, errorToWire(newError(CodeInvalidArgument, "FetchEvents names no namespace and the session has no explicit consume grant"), rid)
		}
	}
	for _, ns := range namespaces {
		if err := ValidateNamespace(ns); err != nil {
			return FrameError, errorToWire(err, rid)
		}
		if !c.session.allows(ns, PermConsume) {
			return FrameError, errorToWire(newError(CodePermissionDenied, "namespace %q is not granted for consuming", ns), rid)
		}
	}
	limit := int(m.GetLimit())
	limit = max(1, min(limit, cfg.maxFetchLimit))
	maxBytes := int(m.GetMaxBytes())
	if maxBytes <= 0 {
		maxBytes = DefaultFetchMaxBytes
	}
	maxBytes = min(maxBytes, cfg.maxFrameSize/2)
	wait := min(time.Duration(m.GetMaxWaitMs())*time.Millisecond, cfg.maxFetchWait)
	deadline := time.Now().Add(wait)
	req := LeaseRequest{Holder: c.id, Namespaces: namespaces, Limit: limit, MaxBytes: maxBytes, AckDeadline: cfg.ackDeadline}
	for {
		room, more := c.reserve(ss, limit)
		if room <= 0 {
			// At the unacked cap: wait for settlements (or the deadline).
			if !time.Now().Before(deadline) || c.srv.shutdownCtx.Err() != nil {
				return FrameEventsBatch, &h3xpb.EventsBatch{RequestId: rid}
			}
			t := time.NewTimer(min(time.Until(deadline), 100*time.Millisecond))
			select {
			case <-more:
			case <-t.C:
			case <-ctx.Done():
			}
			t.Stop()
			if ctx.Err() != nil {
				return FrameEventsBatch, &h3xpb.EventsBatch{RequestId: rid}
			}
			continue
		}
		req.Limit = room
		leases, err := c.srv.queue.Lease(ctx, req)
		if err != nil {
			c.unreserve(ss, room)
			if ctx.Err() != nil {
				if c.srv.shutdownCtx.Err() != nil {
					return FrameError, errorToWire(ErrShuttingDown, rid)
				}
				// The client ended the stream (or the connection went):
				// an empty batch, as for a long poll (PROTOCOL.md §5.2).
				return FrameEventsBatch, &h3xpb.EventsBatch{RequestId: rid}
			}
			c.logger.Error("h3x: lease failed", "err", err)
			return FrameError, errorToWire(asRetryable(err), rid)
		}
		if len(leases) > 0 && len(leases) < req.Limit && cfg.fetchLinger > 0 {
			leases = ss.linger(ctx, req, leases)
		}
		leases = ss.fitEncoded(leases, 2*maxBytes)
		leases = ss.setAsideUndeliverable(rid, leases)
		if len(leases) > 0 {
			c.delivered(ss, leases, room)
			reportDelivered(c.srv.cfg.hooks, leases, time.Since(deadline.Add(-wait)))
			return FrameEventsBatch, batchFromLeases(rid, leases)
		}
		c.unreserve(ss, room) // not held while parked
		if !time.Now().Before(deadline) || c.srv.shutdownCtx.Err() != nil || c.goingAway.Load() {
			return FrameEventsBatch, &h3xpb.EventsBatch{RequestId: rid}
		}
		_, werr := c.waitParked(ctx, deadline, namespaces)
		if ctx.Err() != nil {
			return FrameEventsBatch, &h3xpb.EventsBatch{RequestId: rid}
		}
		if werr != nil {
			// Leasing again at once would spin as long as the queue fails.
			c.logger.Error("h3x: waiting for events failed", "err", werr)
			return FrameError, errorToWire(asRetryable(werr), rid)
		}
	}
}

// waitParked waits, as a parked poll, until events are ready in namespaces,
// until, the end of ctx or shutdown. Meanwhile it does not count as a
// request in flight: a parked poll does not hold up Shutdown. It reports
// whether events are ready, and the queue's error if the queue failed (not
// a deadline or a cancellation).
func (c *serverConn) waitParked(ctx context.Context, until time.Time, namespaces []string) (bool, error) {
	wctx, cancel := context.WithDeadline(ctx, until)
	defer cancel()
	stop := context.AfterFunc(c.srv.shutdownCtx, cancel)
	defer stop()
	c.inflight.Add(-1)
	err := c.srv.queue.Wait(wctx, namespaces)
	c.inflight.Add(1)
	switch {
	case err == nil:
		return true, nil
	case wctx.Err() != nil:
		return false, nil
	}
	return false, err
}

// fitEncoded gives back (unseen) the last of leases until the batch's
// encoding is at most limit bytes, keeping at least one: the byte budget
// counts events as §6.3 sizes them, and an event of many tiny metadata
// entries encodes to several times that. A client asks for half its frame
// size (max_bytes), so it can read any batch of twice the budget.
func (ss *sessionStream) fitEncoded(leases []Lease, limit int) []Lease {
	total := 0
	for i := range leases {
		total += leaseWireSize(&leases[i])
	}
	keep := len(leases)
	for keep > 1 && total > limit {
		keep--
		total -= leaseWireSize(&leases[keep])
	}
	if keep < len(leases) {
		ss.c.giveBackLeases(leases[keep:], "over the batch's encoded size")
	}
	return leases[:keep]
}

// undeliverableDelay is how long an event no client of this server could
// read waits before it is leased again (see setAsideUndeliverable).
const undeliverableDelay = 30 * time.Second

// setAsideUndeliverable takes out of leases the events no client of this
// server could read, and nacks each with a delay and a reason, so that the
// namespace's other events go on; after MaxAttempts such an event moves to
// the dead-letter namespace. They are:
//   - an event with a text field that is not valid UTF-8, which a protobuf
//     string cannot carry (the built-in queues refuse such events, a custom
//     Queue may not);
//   - an event whose delivery alone would be a frame larger than the
//     server's maximum (stored under a larger one: a restart with a lower
//     WithMaxFrameSize, or a queue shared with such a server); it waits in
//     its dead-letter namespace for a server with larger frames. (Batches of
//     several leases fit: fitEncoded keeps them within twice the byte
//     budget, at most the frame size.)
func (ss *sessionStream) setAsideUndeliverable(rid uint64, leases []Lease) []Lease {
	if !ss.c.srv.checksUTF8 {
		keep := leases[:0]
		for i := range leases {
			if f := leases[i].Event.notUTF8(); f != "" {
				ss.c.setAside([]LeaseRef{leases[i].ref()}, fmt.Sprintf("its %s is not valid UTF-8", f))
				continue
			}
			keep = append(keep, leases[i])
		}
		leases = keep
	}
	limit := ss.c.srv.cfg.maxFrameSize
	if len(leases) != 1 || leaseWireSize(&leases[0]) <= limit {
		return leases
	}
	n := proto.Size(batchFromLeases(rid, leases))
	if n <= limit {
		return leases
	}
	ss.c.setAside([]LeaseRef{leases[0].ref()}, fmt.Sprintf("its delivery is a frame of %d bytes, larger than this server's maximum frame size of %d", n, limit))
	return nil
}

// leaseWireSize bounds the encoding of l's Delivery in an EventsBatch from
// above: the event's §6.3 size, its fields' tags and lengths and the
// Delivery around it (80 bytes), and each metadata entry's (12).
func leaseWireSize(l *Lease) int {
	return l.Event.size() + 80 + 12*len(l.Event.Metadata)
}

// linger waits up to the fetch linger for more events to fill a batch,
// within what is left of the batch's byte budget: each round leases with
// the bytes left, and a lease that would take the batch past the budget
// (a queue returns at least one event) is given back unseen.
func (ss *sessionStream) linger(ctx context.Context, req LeaseRequest, leases []Lease) []Lease {
	c := ss.c
	used := 0
	for i := range leases {
		used += leases[i].Event.size()
	}
	until := time.Now().Add(c.srv.cfg.fetchLinger)
	for len(leases) < req.Limit && time.Now().Before(until) && (req.MaxBytes <= 0 || used < req.MaxBytes) {
		if c.srv.shutdownCtx.Err() != nil || c.goingAway.Load() {
			break // a GoAway answers pending fetches promptly (PROTOCOL.md §5.1)
		}
		if ready, _ := c.waitParked(ctx, until, req.Namespaces); !ready {
			break
		}
		more := req
		more.Limit = req.Limit - len(leases)
		if req.MaxBytes > 0 {
			more.MaxBytes = req.MaxBytes - used
		}
		got, err := c.srv.queue.Lease(ctx, more)
		if err != nil {
			break
		}
		keep := 0
		for ; keep < len(got); keep++ {
			n := got[keep].Event.size()
			if req.MaxBytes > 0 && used+n > req.MaxBytes {
				break
			}
			used += n
		}
		leases = append(leases, got[:keep]...)
		if keep < len(got) { // over the budget: a queue leases at least one event
			c.giveBackLeases(got[keep:], "over the batch's byte budget")
			break
		}
	}
	return leases
}

func batchFromLeases(rid uint64, leases []Lease) *h3xpb.EventsBatch {
	b := &h3xpb.EventsBatch{RequestId: rid, Events: make([]*h3xpb.Delivery, len(leases))}
	ds := make([]h3xpb.Delivery, len(leases)) // the messages in two allocations
	ps := make([]h3xpb.EventPayload, len(leases))
	for i := range leases {
		l, d := &leases[i], &ds[i]
		eventIntoWire(&l.Event, &ps[i])
		d.Event, d.Attempt, d.LeaseDeadlineMs = &ps[i], uint32(l.Attempt), unixMs(l.Deadline)
		b.Events[i] = d
	}
	return b
}

// settleRequest is what AckEvent, NackEvent and ExtendLease share.
type settleRequest interface {
	GetRequestId() uint64
	GetEventIds() []string
	GetAttempts() []uint32
	GetNamespaces() []string
	GetOmitOk() bool
}

// settle applies an ack, nack or extension and builds its AckResult.
func (ss *sessionStream) settle(ctx context.Context, kind FrameType, req settleRequest, apply func([]LeaseRef) ([]SettleResult, error)) (FrameType, proto.Message) {
	rid, ids, attempts, namespaces := req.GetRequestId(), req.GetEventIds(), req.GetAttempts(), req.GetNamespaces()
	sess := ss.c.session
	if (len(attempts) > 0 && len(attempts) != len(ids)) || (len(namespaces) > 0 && len(namespaces) != len(ids)) {
		return FrameError, errorToWire(newError(CodeInvalidArgument, "attempts and namespaces must be empty or as long as event_ids"), rid)
	}
	if !ackResultFits(ids, ss.c.srv.cfg.maxFrameSize) {
		// Nothing is settled: the answer, which echoes every ID, would not
		// fit a frame.
		return FrameError, errorToWire(newError(CodeInvalidArgument, "the AckResult for %d event ids would exceed the maximum frame size of %d bytes; send fewer per request", len(ids), ss.c.srv.cfg.maxFrameSize), rid)
	}
	// Without a namespace, a settlement applies only to this connection's own
	// leases (attempt 0), unless the session may consume everywhere.
	unrestricted := len(sess.Namespaces) == 0 && sess.Grants.Allows("*", PermConsume)
	res := &h3xpb.AckResult{RequestId: rid, Outcomes: make([]*h3xpb.SettleOutcome, len(ids))}
	refs := make([]LeaseRef, 0, len(ids))
	index := make([]int, 0, len(ids))
	for i, id := range ids {
		ref := LeaseRef{ID: id}
		if len(namespaces) > 0 && namespaces[i] != "" {
			ref.Namespace = namespaces[i]
			if !sess.allows(ref.Namespace, PermConsume) {
				res.Outcomes[i] = &h3xpb.SettleOutcome{Id: id, Status: h3xpb.SettleStatus_SETTLE_STATUS_DENIED}
				continue
			}
		}
		if len(attempts) > 0 && (ref.Namespace != "" || unrestricted) {
			ref.Attempt = int(attempts[i])
		}
		refs = append(refs, ref)
		index = append(index, i)
	}
	if len(refs) > 0 {
		results, err := apply(refs)
		if err == nil && len(results) != len(refs) {
			err = newError(CodeInternal, "queue returned %d results for %d refs", len(results), len(refs))
		}
		if err != nil {
			ss.c.logger.Error("h3x: settling failed", "err", err)
			return FrameError, errorToWire(asRetryable(err), rid)
		}
		omitted := 0
		if req.GetOmitOk() {
			omitted = leadingRun(index, func(j int) bool { return results[j].Status == SettleOK })
			res.OkOmitted = uint32(omitted)
		}
		ok := omitted
		slab := make([]h3xpb.SettleOutcome, len(index)-omitted) // one allocation for the answer's outcomes
		for j := omitted; j < len(index); j++ {
			i := index[j]
			status := results[j].Status
			if status == SettleStale && refs[j].Namespace == "" && !unrestricted && !ss.c.holdsDelivery(refs[j].ID) {
				// Not this connection's delivery, and its namespace may be
				// one the session may not consume: STALE would tell that
				// the event exists (PROTOCOL.md §6.4, rule 5).
				status = SettleUnknown
			}
			o := &slab[j-omitted]
			o.Id, o.Status = results[j].ID, h3xpb.SettleStatus(status)
			res.Outcomes[i] = o
			if status == SettleOK {
				ok++
			}
		}
		res.Outcomes = res.Outcomes[omitted:]
		if kind != FrameExtendLease {
			ss.c.settledBy(refs, results)
		}
		reportSettled(ss.c.srv.cfg.hooks, kind, refs, results, ok, len(ids)-ok)
	} else if len(ids) > 0 {
		// Every settlement was denied: the queue was not asked, but the
		// refusals count all the same.
		reportSettled(ss.c.srv.cfg.hooks, kind, nil, nil, 0, len(ids))
	}
	return FrameAckResult, res
}

// reportPublish tells the hooks about one Enqueue, per namespace.
func reportPublish(h Hooks, events []Event, results []PublishResult, err error, took time.Duration) {
	if _, nop := h.(NopHooks); nop {
		return
	}
	type counts struct{ stored, dups int }
	per := make(map[string]*counts, 1)
	failCode := CodeInternal // a failed call: the code the client is refused with
	if err != nil {
		failCode = asRetryable(err).(*Error).Code
	}
	for i := range events {
		ns := events[i].Namespace
		if err != nil || i >= len(results) {
			h.Refused(ns, failCode, 1)
			continue
		}
		switch results[i].Status {
		case PublishRefused:
			code := CodeInternal
			var e *Error
			if errors.As(results[i].Err, &e) {
				code = e.Code
			}
			h.Refused(ns, code, 1)
			continue
		}
		k := per[ns]
		if k == nil {
			k = &counts{}
			per[ns] = k
		}
		if results[i].Status == PublishDuplicate {
			k.dups++
		} else {
			k.stored++
		}
	}
	for ns, k := range per {
		h.Published(ns, k.stored, k.dups, took)
	}
}

// reportDelivered tells the hooks about one fetch's deliveries: one
// Delivered call per namespace (the queue may interleave namespaces), then,
// for a FetchedHooks, one Fetched call.
func reportDelivered(h Hooks, leases []Lease, waited time.Duration) {
	if _, nop := h.(NopHooks); nop || len(leases) == 0 {
		return
	}
	now := time.Now()
	type nsReport struct {
		redelivered int
		ages        []time.Duration // one per delivery
	}
	var order []string
	per := make(map[string]*nsReport, 2)
	for i := range leases {
		ns := leases[i].Event.Namespace
		r := per[ns]
		if r == nil {
			r = &nsReport{}
			per[ns] = r
			order = append(order, ns)
		}
		if leases[i].Attempt > 1 {
			r.redelivered++
		}
		r.ages = append(r.ages, now.Sub(leases[i].Event.Time))
	}
	for _, ns := range order {
		r := per[ns]
		h.Delivered(ns, len(r.ages), r.redelivered, waited, r.ages)
	}
	if fh, ok := h.(FetchedHooks); ok {
		fh.Fetched(len(leases), waited)
	}
}
