package h3x

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"sync"

	"github.com/h3x-io/h3x/proto/h3xpb"
	"google.golang.org/protobuf/proto"
)

// Small publishes share SendEvent requests when they pile up. A Publish of
// one event used to cost a request of its own whatever the load: at 1,024
// single-event PublishAsync calls in flight the client and server spent most
// of their time on requests rather than events (59,000 events/s against
// 312,000 in batches of 64). Now, while fewer than sharedSendsInFlight
// shared requests are unanswered, a small chunk goes out at once, alone, as
// before (nothing waits for company: at a low rate every event still has a
// request of its own). Once that many are unanswered, further small chunks
// wait together and go out as one request when one of them is answered,
// the way the server's group commit batches its writes.
//
// A chunk is small when it has at most sharedChunkEvents events; larger
// ones are already batches and go out on their own, as they always did.
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
}

// sendBatch is one SendEvent request and the chunks it carries.
type sendBatch struct {
	events              []*h3xpb.EventPayload
	bytes               int // the frame size it would take, as Publish counts it
	maxEvents, maxBytes int // the limits its chunks were cut by
	live                int // chunks whose callers still wait for the answer
	cancel              context.CancelFunc

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
	next := sb.takeLocked()
	if next != b {
		// Another goroutine sends it, maybe after this call has returned
		// (its ctx ended): it must not read the caller's Data and Metadata
		// then. The payloads are this call's own (eventsToWire).
		for _, p := range chunk {
			p.Data, p.Metadata = bytes.Clone(p.Data), maps.Clone(p.Metadata)
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
	if next != nil {
		c.startShared(next)
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
	sb.inFlight--
	next := sb.takeLocked()
	sb.mu.Unlock()
	if next != nil {
		sb.c.startShared(next)
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

// startShared sends b, taken from the pending batches, in a goroutine of
// its own: its callers wait for it, each until its own ctx ends.
func (c *Client) startShared(b *sendBatch) {
	ctx, cancel := context.WithCancel(c.ctx)
	c.sends.mu.Lock()
	b.cancel = cancel
	if b.live == 0 {
		cancel() // every caller gave up while it waited
	}
	c.sends.mu.Unlock()
	if !c.goOwned(func() {
		defer cancel()
		c.sendBatch(ctx, b)
		c.sends.sent()
	}) {
		b.err = ErrClosed
		close(b.done)
		c.sends.sent()
	}
}

// sendBatch sends b as one SendEvent and records the answer in b.
func (c *Client) sendBatch(ctx context.Context, b *sendBatch) {
	defer close(b.done)
	if err := ctx.Err(); err != nil {
		b.err = err
		return
	}
	build := func(id uint64) proto.Message {
		// Every event has its ID (assignIDs): the outcomes of stored ones
		// would tell the client nothing.
		return &h3xpb.SendEvent{RequestId: id, Events: b.events, OmitStored: true}
	}
	var ans rpcAnswer
	var err error
	for {
		var cc *clientConn
		if cc, err = c.awaitConn(ctx); err != nil {
			break
		}
		// Its chunks were cut by the limits of the connection of their
		// time; a reconnect may have reached a server with lower ones
		// (whose answer to a frame above its size resets the stream, and
		// the other requests on it with it): the callers cut them again.
		if maxEvents, maxBytes := sendLimits(cc); len(b.events) > maxEvents || b.bytes > maxBytes {
			err = errLimitsChanged
			break
		}
		if ans, err = cc.call(ctx, streamPublish, FrameSendEvent, build); err == nil || !c.retryable(ctx, cc, err) {
			break
		}
		c.logger.Debug("h3x: retrying on the next connection", "frame", FrameSendEvent, "err", err)
	}
	if err != nil && ctx.Err() != nil && !errors.Is(err, ErrClosed) {
		err = ctx.Err()
	}
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
