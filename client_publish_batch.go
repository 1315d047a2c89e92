package h3x

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/h3x-io/h3x/proto/h3xpb"
	"google.golang.org/protobuf/proto"
)

// Small publishes share SendEvent requests when they pile up. A Publish of
// one event used to cost a request of its own whatever the load: at 1,024
// single-event PublishAsync calls in flight the client and server spent most
// of their time on requests rather than events (34,000–49,000 events/s in
// process against 200,000–280,000 in batches of 64). Now, while fewer than sharedSendsInFlight
// shared requests are unanswered, a small chunk goes out at once, alone, as
// before (nothing waits for company: at a low rate every event still has a
// request of its own). Once that many are unanswered, further small chunks
// wait together and go out as one request when one of them is answered,
// the way the server's group commit batches its writes.
//
// A chunk is small when it has at most sharedChunkEvents events; larger
// ones are already batches and go out on their own, as they always did.
//
// A PublishAsync call that small joins the shared requests itself when it
// can go out as it is (publishShared), instead of running Publish in a
// worker goroutine: the goroutine, its contexts and its Publish were most
// of the client's CPU at one event per call. Its part of the answer
// completes it; what must be published again (rate limited, queue full)
// goes to a worker then.
const (
	sharedSendsInFlight = 8
	sharedChunkEvents   = 64
)

// errLimitsChanged: a chunk was cut by limits above those of the server it
// would now go to; Publish cuts it again.
var errLimitsChanged = errors.New("h3x: the server's limits changed")

// sendBatcher groups the small chunks of concurrent Publish calls into
// shared SendEvent requests.
type sendBatcher struct {
	c *Client

	mu       sync.Mutex
	inFlight int          // shared requests being sent or awaiting their answer
	pending  []*sendBatch // waiting for a request, oldest first; the last takes more chunks
	closed   bool         // Close has failed the pending batches: none is made any more
}

// sendBatch is one SendEvent request and the chunks it carries.
type sendBatch struct {
	events              []*h3xpb.EventPayload
	bytes               int // the frame size it would take, as Publish counts it
	maxEvents, maxBytes int // the limits its chunks were cut by
	live                int // chunks whose callers still wait for the answer
	cancel              context.CancelFunc
	parts               []*asyncPart // PublishAsync calls among its chunks, completed with it

	done     chan struct{} // closed once the fields below are set
	omitted  int
	outcomes []*h3xpb.PublishOutcome
	err      error
}

// sendEvents sends a chunk cut by the limits maxEvents and maxBytes (of
// chunkBytes, the sum of Publish's event sizes) and returns its omitted
// count and outcomes, as for a SendEvent of the chunk alone.
func (c *Client) sendEvents(ctx context.Context, chunk []*h3xpb.EventPayload, chunkBytes, maxEvents, maxBytes int) (int, []*h3xpb.PublishOutcome, error) {
	if len(chunk) > sharedChunkEvents {
		b := &sendBatch{events: chunk, bytes: 64 + chunkBytes, done: make(chan struct{})}
		c.sendBatch(ctx, b)
		return b.omitted, b.outcomes, b.err
	}
	sb := &c.sends
	sb.mu.Lock()
	if sb.closed {
		sb.mu.Unlock()
		return 0, nil, ErrClosed
	}
	b, off := sb.joinLocked(chunk, chunkBytes, maxEvents, maxBytes)
	next := sb.takeLocked()
	if next != b {
		ownBuffers(chunk)
		if next != nil {
			sb.startLocked(next)
		}
	}
	sb.mu.Unlock()
	if next == b {
		// A request was free and nothing waited: this chunk goes out alone,
		// in this goroutine and under the caller's ctx, as it would have
		// without batching (no other chunk joins a batch once taken).
		c.sendBatch(ctx, b)
		sb.sent()
		return b.omitted, b.outcomes, b.err
	}
	select {
	case <-b.done:
	case <-ctx.Done():
		sb.abandon(b)
		return 0, nil, ctx.Err()
	case <-c.closed:
		sb.abandon(b)
		return 0, nil, ErrClosed
	}
	if b.err != nil {
		return 0, nil, b.err
	}
	omitted, outcomes := chunkOutcomes(b.omitted, b.outcomes, off, len(chunk))
	return omitted, outcomes, nil
}

// ownBuffers gives the payloads (a call's own, from eventsToWire) copies of
// their Data and Metadata: another goroutine sends them, maybe after the
// call has ended (its ctx), when the caller may be reusing its buffers.
func ownBuffers(chunk []*h3xpb.EventPayload) {
	for _, p := range chunk {
		p.Data, p.Metadata = bytes.Clone(p.Data), maps.Clone(p.Metadata)
	}
}

// joinLocked adds chunk to the newest pending batch if it fits, else to a
// new one, and returns the batch and the chunk's offset in it. With sb.mu
// held.
func (sb *sendBatcher) joinLocked(chunk []*h3xpb.EventPayload, chunkBytes, maxEvents, maxBytes int) (*sendBatch, int) {
	var b *sendBatch
	if n := len(sb.pending); n > 0 {
		last := sb.pending[n-1]
		if last.maxEvents == maxEvents && last.maxBytes == maxBytes &&
			len(last.events)+len(chunk) <= maxEvents && last.bytes+chunkBytes <= maxBytes {
			b = last
		}
	}
	if b == nil {
		b = &sendBatch{bytes: 64, maxEvents: maxEvents, maxBytes: maxBytes, done: make(chan struct{})}
		sb.pending = append(sb.pending, b)
	}
	off := len(b.events)
	b.events = append(b.events, chunk...)
	b.bytes += chunkBytes
	b.live++
	return b, off
}

// takeLocked returns the oldest pending batch if a shared request is free,
// counting it in flight. With sb.mu held.
func (sb *sendBatcher) takeLocked() *sendBatch {
	if sb.inFlight >= sharedSendsInFlight || len(sb.pending) == 0 {
		return nil
	}
	b := sb.pending[0]
	sb.pending[0] = nil
	if sb.pending = sb.pending[1:]; len(sb.pending) == 0 {
		sb.pending = nil
	}
	sb.inFlight++
	return b
}

// sent frees a shared request and starts the oldest pending batch on it.
func (sb *sendBatcher) sent() {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	sb.inFlight--
	if next := sb.takeLocked(); next != nil {
		sb.startLocked(next)
	}
}

// abandon records that a caller of b stopped waiting; once none waits, its
// request is cancelled (or, not yet sent, never made).
func (sb *sendBatcher) abandon(b *sendBatch) {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if b.live--; b.live == 0 && b.cancel != nil {
		b.cancel()
	}
}

// startLocked sends b, taken by takeLocked, in a goroutine of its own:
// its callers wait for it, each until its own ctx ends. With sb.mu held,
// which Close's failPending takes too: a batch taken as Close begins is
// either sent by a goroutine Close waits for, or failed here before Close
// returns.
func (sb *sendBatcher) startLocked(b *sendBatch) {
	c := sb.c
	ctx, cancel := context.WithCancel(c.ctx)
	b.cancel = cancel
	if b.live == 0 {
		cancel() // every caller gave up while it waited
	}
	if c.goOwned(func() {
		defer cancel()
		c.sendBatch(ctx, b)
		sb.sent()
	}) {
		return
	}
	cancel()
	sb.inFlight--
	b.finish(ErrClosed)
}

// failPending fails the batches no request has taken, at Close: their
// PublishAsync calls are done before Close returns.
func (sb *sendBatcher) failPending() {
	sb.mu.Lock()
	pending := sb.pending
	sb.pending, sb.closed = nil, true
	sb.mu.Unlock()
	for _, b := range pending {
		b.finish(ErrClosed)
	}
}

// finish records err (nil: the answer is in b already), wakes b's callers
// and completes its PublishAsync calls.
func (b *sendBatch) finish(err error) {
	if err != nil {
		b.err = err
	}
	close(b.done)
	for _, pt := range b.parts {
		pt.complete(b)
	}
}

// sendBatch sends b as one SendEvent, records the answer in b and finishes
// it.
func (c *Client) sendBatch(ctx context.Context, b *sendBatch) {
	defer b.finish(nil)
	if err := ctx.Err(); err != nil {
		b.err = err
		return
	}
	build := func(id uint64) proto.Message {
		// Every event has its ID (assignIDs): the outcomes of stored ones
		// would tell the client nothing.
		return &h3xpb.SendEvent{RequestId: id, Events: b.events, OmitStored: true}
	}
	// Its chunks were cut by the limits of the connection of their time; a
	// reconnect may have reached a server with lower ones (whose answer to
	// a frame above its size resets the stream, and the other requests on
	// it with it): the callers cut them again.
	fits := func(cc *clientConn) error {
		if maxEvents, maxBytes := sendLimits(cc); len(b.events) > maxEvents || b.bytes > maxBytes {
			return errLimitsChanged
		}
		return nil
	}
	ans, err := c.callOn(ctx, streamPublish, FrameSendEvent, fits, build)
	if err != nil {
		if c.ctx.Err() != nil && ctx.Err() != nil {
			err = ErrClosed
		}
		b.err = err
		return
	}
	res := ans.msg.(*h3xpb.SendResult) // the type is checked by the stream's reader
	b.omitted, b.err = omittedOutcomes(FrameSendResult, res.GetStoredOmitted(), len(res.GetOutcomes()), len(b.events), "events")
	b.outcomes = res.GetOutcomes()
}

// chunkOutcomes returns the omitted count and outcomes of the k events at
// off in a request whose first omitted events have no outcome.
func chunkOutcomes(omitted int, outcomes []*h3xpb.PublishOutcome, off, k int) (int, []*h3xpb.PublishOutcome) {
	own := min(max(omitted-off, 0), k)
	first := max(off, omitted) - omitted
	return own, outcomes[first : first+k-own]
}

// asyncPart is a PublishAsync call whose events wait in a shared request
// with no goroutine of their own: the request's answer completes it (or
// hands what must be published again to a worker), its ctx or Close fail
// it, whichever comes first.
type asyncPart struct {
	c      *Client
	ctx    context.Context
	call   *PublishCall
	events []Event // the call's copy, with their IDs
	off    int     // in the batch
	stop   func() bool
	ended  atomic.Bool // completed, failed or handed to a worker
	slot   bool        // holds a Publish slot (c.pubSlots)
}

// publishShared starts a PublishAsync call of at most sharedChunkEvents
// events on the shared requests, if it can go out at once as it is: the
// client is connected, no namespace of it waits out a rate limit, and it
// fits the connection's limits, every event encodable. Else it reports
// false, and the call runs in a worker as before. The caller holds an
// async slot for the call.
func (c *Client) publishShared(ctx context.Context, events []Event, p *PublishCall) bool {
	if ctx.Err() != nil {
		return false
	}
	select {
	case c.pubSlots <- struct{}{}:
	default:
		return false // the worker waits for one
	}
	joined := false
	defer func() {
		if !joined {
			<-c.pubSlots
		}
	}()
	cc := c.current()
	if cc == nil {
		return false
	}
	if c.rateWait(events, nil) > 0 {
		return false
	}
	maxEvents, maxBytes := sendLimits(cc)
	if len(events) > maxEvents {
		return false
	}
	wire, sizes := wireWithSizes(events)
	total := 0
	for i := range events {
		if events[i].notUTF8() != "" {
			return false
		}
		total += sizes[i]
	}
	if 64+total > maxBytes {
		return false
	}
	ownBuffers(wire)
	pt := &asyncPart{c: c, ctx: ctx, call: p, events: events, slot: true}
	sb := &c.sends
	sb.mu.Lock()
	if sb.closed {
		sb.mu.Unlock()
		return false
	}
	b, off := sb.joinLocked(wire, total, maxEvents, maxBytes)
	pt.off = off
	b.parts = append(b.parts, pt)
	// Registered under sb.mu: the batch cannot finish (and read stop)
	// before; the function runs in a goroutine of its own.
	pt.stop = context.AfterFunc(ctx, func() {
		if pt.ended.CompareAndSwap(false, true) {
			sb.abandon(b)
			pt.finish(nil, ctx.Err())
		}
	})
	if next := sb.takeLocked(); next != nil {
		sb.startLocked(next)
	}
	sb.mu.Unlock()
	joined = true
	return true
}

// complete ends the call with its part of b's answer, unless its ctx has
// ended it. Events to publish again go to a worker running Publish.
func (pt *asyncPart) complete(b *sendBatch) {
	if !pt.ended.CompareAndSwap(false, true) {
		return
	}
	pt.stop()
	all := indices(len(pt.events))
	if errors.Is(b.err, errLimitsChanged) {
		pt.again(nil, all, 0) // nothing was sent: Publish cuts them again
		return
	}
	if b.err != nil {
		pt.finish(nil, b.err)
		return
	}
	omitted, outcomes := chunkOutcomes(b.omitted, b.outcomes, pt.off, len(pt.events))
	results := make([]PublishResult, len(pt.events))
	again, wait := pt.c.takeOutcomes(pt.events, all, omitted, outcomes, results, nil, 0)
	if len(again) > 0 {
		pt.again(results, again, wait)
		return
	}
	pt.finish(results, nil)
}

// again publishes the events at the indices in a worker, after wait, and
// ends the call with their results merged into results (nil: all of them).
func (pt *asyncPart) again(results []PublishResult, again []int, wait time.Duration) {
	c := pt.c
	pt.releaseSlot() // Publish takes its own
	if !c.goOwned(func() {
		// Ended by Close too, as a worker's Publish is (runAsync): Close
		// waits for this goroutine.
		ctx, done := c.untilClose(pt.ctx)
		defer done()
		err := sleepCtx(ctx, wait)
		if err == nil {
			subset := make([]Event, len(again))
			for j, i := range again {
				subset[j] = pt.events[i]
			}
			var res []PublishResult
			if res, err = c.Publish(ctx, subset...); err == nil {
				if results == nil {
					results = make([]PublishResult, len(pt.events))
				}
				for j, i := range again {
					results[i] = res[j]
				}
			}
		}
		if err != nil {
			results = nil
		}
		pt.finish(results, c.closedErr(err))
	}) {
		pt.finish(nil, ErrClosed)
	}
}

// releaseSlot gives back the call's Publish slot, if it still holds it.
func (pt *asyncPart) releaseSlot() {
	if pt.slot {
		pt.slot = false
		<-pt.c.pubSlots
	}
}

// finish ends the call.
func (pt *asyncPart) finish(results []PublishResult, err error) {
	pt.releaseSlot()
	p := pt.call
	p.results, p.err = results, err
	<-pt.c.asyncSlots
	close(p.done)
}
