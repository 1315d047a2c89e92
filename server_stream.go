package h3x

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/sync/semaphore"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// laneDepth bounds the requests of one kind in flight on one stream; the
// stream's reader waits (and QUIC flow control pushes back on the client)
// beyond it.
const laneDepth = 256

// fetchLaneDepth bounds fetches queued on one stream. As deep as the other
// lanes: the reader waits when a lane is full, and the frames behind it
// (acks among them) are not read meanwhile, so a shallow fetch lane made an
// ack sent after a few pipelined long polls wait for the first poll to end
// (PROTOCOL.md §5.2: settling never queues behind a long poll). Queued
// fetches hold only their requests (in the request budget): the lane's one
// worker serves them one at a time and writes each batch before the next
// starts, so a client that stops reading pins one batch per stream.
const fetchLaneDepth = laneDepth

// requestBudget is the most bytes of requests one connection may have read
// and not yet served (see reply.compute), and of answers (estimated, see
// answerCost) computed and not yet written: at least 16 MiB, or 4 frames of
// the maximum size. A client that pipelines large frames faster than the
// queue takes them, or does not read the answers, waits on QUIC flow
// control beyond it, instead of growing the server's memory (laneDepth
// alone would let each of its streams hold 2 × laneDepth maximum-size
// frames, or as many answers).
func requestBudget(maxFrameSize int) int64 { return max(16<<20, 4*int64(maxFrameSize)) }

// reply is one answer being prepared; replies of a lane are written in the
// order their requests arrived.
type reply struct {
	work  func() (FrameType, proto.Message)
	gate  *semaphore.Weighted // the connection's request bytes (requestBudget)
	n     int64               // the request's bytes held in gate until computed
	held  int64               // its answer's estimated memory, held in gate until written (answerCost)
	ready bool                // guarded by the lane's mu
	t     FrameType
	msg   proto.Message
}

// lane answers one kind of request in arrival order, without a goroutine
// between a finished request and its answer on the wire.
//
// A concurrent lane (publishes, settlements) computes each request in a
// goroutine of its own; whichever finishes and finds its reply at the head
// of the queue writes it, and every finished reply behind it. A serial lane
// (fetches) has one worker that serves its requests one after the other and
// writes each answer itself: a fetch queued behind a long poll starts (and
// leases) only after that poll is answered, so it never leases events that
// would then wait behind the poll, and a client can keep a second fetch
// queued on the server while it handles the first one's batch.
type lane struct {
	serial bool
	depth  int
	slots  chan struct{} // one token per request in flight: bounds them to depth (made on first use)

	mu      sync.Mutex
	queue   []*reply // concurrent: in arrival order, not yet written
	writing bool     // concurrent: a goroutine is writing the queue's head

	work chan *reply // serial: the worker's requests
}

// compute runs r's work and drops it: the request it holds (a SendEvent
// can be a frame of up to the maximum size) is not kept while the answer
// waits for its turn on the stream, so the replies waiting behind a client
// that does not read hold only answers.
func (r *reply) compute() {
	r.t, r.msg = r.work()
	r.work = nil
	r.gate.Release(r.n)
}

func newLane(depth int, serial bool) lane {
	return lane{serial: serial, depth: depth}
}

// sessionStream serves a stream of built-in requests: SendEvent, FetchEvents,
// AckEvent, NackEvent and ExtendLease in any mix. Each kind has its own lane,
// so acks never wait behind a long poll and publishes never wait behind
// fetches; within a lane, answers keep request order.
type sessionStream struct {
	c                       *serverConn
	st                      *quic.Stream
	fr                      *frameReader
	fw                      *frameWriter
	wg                      sync.WaitGroup // the request workers
	sends, fetches, settles lane

	// The deliveries this stream's fetches hold unsettled, and the room
	// its fetch has reserved (the per-subscription cap); guarded by
	// c.unackedMu.
	unacked, reserved int
}

func newSessionStream(c *serverConn, st *quic.Stream, fr *frameReader) *sessionStream {
	return &sessionStream{c: c, st: st, fr: fr, fw: newFrameWriter(st),
		sends: newLane(laneDepth, false), fetches: newLane(fetchLaneDepth, true), settles: newLane(laneDepth, false)}
}

// run serves the stream until the client finishes its side or an error.
func (ss *sessionStream) run(connCtx context.Context, t FrameType, payload []byte) {
	// The stream's requests end with it: a client abandons a long poll by
	// resetting its stream.
	ctx, cancel := context.WithCancel(connCtx)
	defer cancel()
	var failure error
	for {
		if err := ss.dispatch(ctx, t, payload); err != nil {
			failure = err
			break
		}
		var err error
		t, payload, err = ss.fr.next()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				failure = err
			}
			break
		}
	}
	if failure != nil {
		cancel() // parked long polls end at once
	}
	if ss.fetches.work != nil {
		close(ss.fetches.work)
	}
	var e *Error
	if failure != nil && errors.As(failure, &e) {
		ss.fw.write(FrameError, errorToWire(e, 0))
	}
	// Wait for the requests in flight to be answered, then flush and finish
	// the send side.
	ss.wg.Wait()
	ss.fw.close()
	var se *quic.StreamError
	switch {
	case failure == nil:
		ss.st.Close()
	case e != nil:
		ss.st.CancelRead(quic.StreamErrorCode(e.Code))
		ss.st.Close()
	case errors.As(failure, &se) && se.Remote:
		// The client reset its side to abandon its long polls, which were
		// answered (empty) above: finish ours, so that every answer written,
		// batches included, reaches a client that still reads (a
		// subscription gives back what it will not hand out).
		ss.st.Close()
	default:
		ss.st.CancelRead(quic.StreamErrorCode(CodeNone))
		ss.st.CancelWrite(quic.StreamErrorCode(CodeNone))
	}
}

// dispatch handles one request frame. It returns an error only for a
// stream-level failure.
func (ss *sessionStream) dispatch(ctx context.Context, t FrameType, payload []byte) error {
	var l *lane
	var m proto.Message
	switch t {
	case FrameSendEvent:
		l, m = &ss.sends, new(h3xpb.SendEvent)
	case FrameFetchEvents:
		l, m = &ss.fetches, new(h3xpb.FetchEvents)
	case FrameAckEvent:
		l, m = &ss.settles, new(h3xpb.AckEvent)
	case FrameNackEvent:
		l, m = &ss.settles, new(h3xpb.NackEvent)
	case FrameExtendLease:
		l, m = &ss.settles, new(h3xpb.ExtendLease)
	default:
		return newError(CodeProtocolViolation, "%v frame is not allowed on a session stream", t)
	}
	// The request's place in its lane, and in the connection's budget its
	// bytes and its answer's estimated memory, are taken before it is
	// decoded, in one acquisition: the answer's memory counts until it is
	// written (an AckEvent of 80,000 one-byte ids becomes 80,000 outcomes
	// of about 100 bytes each, held while a client that does not read
	// leaves it unsent). The stream's reader waits for it holding nothing,
	// and a compute never waits for budget (an answer at a lane's head
	// must not wait for room held by the answers queued behind it).
	r, err := ss.admit(ctx, l, len(payload), answerCost(t, payload))
	if err != nil {
		return err
	}
	if err := unmarshalPayload(t, payload, m); err != nil {
		ss.release(l, r)
		return err
	}
	ss.submit(l, r, ss.work(ctx, m))
	return nil
}

// answerCost estimates, from its encoding, the memory of the answer to a
// request of type t beyond the request's own bytes: the outcome of each
// event or id of a SendResult or AckResult (its message, its pointer and
// its echoed id). Fetches answer with batches bounded by their own byte
// budget, one at a time: 0. A malformed payload, refused when decoded,
// costs what was counted of it.
func answerCost(t FrameType, payload []byte) int64 {
	const perOutcome = 112
	switch t {
	case FrameSendEvent, FrameAckEvent, FrameNackEvent, FrameExtendLease:
	default:
		return 0
	}
	list := protowire.Number(1) // event_ids
	if t == FrameSendEvent {
		list = 2 // events
	}
	var n int64
	forFields(payload, func(f wireField) error {
		if f.num != list || f.typ != protowire.BytesType {
			return nil
		}
		id := len(f.b) // an event id
		if t == FrameSendEvent {
			// The event's id, or the UUID the server assigns: at most the
			// event's encoding, and never more than MaxEventIDLen (a longer
			// one is refused and not echoed). Nothing is decoded: the id
			// may be any field of the event, or several (the last counts).
			id = max(36, min(MaxEventIDLen, len(f.b)))
		}
		n += perOutcome + int64(id)
		return nil
	})
	return n
}

// work returns the work that answers request m.
func (ss *sessionStream) work(ctx context.Context, m proto.Message) func() (FrameType, proto.Message) {
	queue := ss.c.srv.queue
	settle := func(t FrameType, req settleRequest, apply func([]LeaseRef) ([]SettleResult, error)) func() (FrameType, proto.Message) {
		return func() (FrameType, proto.Message) { return ss.settle(ctx, t, req, apply) }
	}
	switch m := m.(type) {
	case *h3xpb.SendEvent:
		return func() (FrameType, proto.Message) { return ss.publish(ctx, m) }
	case *h3xpb.FetchEvents:
		return func() (FrameType, proto.Message) { return ss.fetch(ctx, m) }
	case *h3xpb.AckEvent:
		return settle(FrameAckEvent, m, func(refs []LeaseRef) ([]SettleResult, error) {
			return queue.Ack(ss.c.srv.stopCtx, ss.c.id, refs)
		})
	case *h3xpb.NackEvent:
		delay := time.Duration(m.GetDelayMs()) * time.Millisecond
		return settle(FrameNackEvent, m, func(refs []LeaseRef) ([]SettleResult, error) {
			for i := range refs {
				refs[i].Unseen = m.GetUnseen()
			}
			return queue.Nack(ss.c.srv.stopCtx, ss.c.id, refs, delay, m.GetReason())
		})
	case *h3xpb.ExtendLease:
		d := time.Duration(m.GetExtendMs()) * time.Millisecond
		if d <= 0 {
			d = ss.c.srv.cfg.ackDeadline
		}
		return settle(FrameExtendLease, m, func(refs []LeaseRef) ([]SettleResult, error) {
			until := time.Now().Add(d)
			res, err := queue.Extend(ss.c.srv.stopCtx, ss.c.id, refs, d)
			if err == nil {
				ss.c.extended(refs, res, until)
			}
			return res, err
		})
	}
	panic(fmt.Sprintf("h3x: no work for a %T", m)) // dispatch decodes only the types above
}

// admit takes a place for a request of size bytes in lane l and, in one
// acquisition, its bytes and its answer's estimated memory (answer) in the
// connection's request budget (never more than the whole budget, so that
// it is always granted eventually). It waits while the lane has depth
// requests in flight or the budget is spent (and QUIC flow control then
// pushes back on the client), until ctx ends.
func (ss *sessionStream) admit(ctx context.Context, l *lane, size int, answer int64) (*reply, error) {
	if l.slots == nil {
		l.slots = make(chan struct{}, l.depth)
	}
	select {
	case l.slots <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	gate, budget := ss.c.requestGate()
	n := min(int64(size), budget)
	held := min(answer, budget-n) // never more than the budget in all
	if err := gate.Acquire(ctx, n+held); err != nil {
		<-l.slots
		return nil, err
	}
	ss.c.inflight.Add(1)
	return &reply{gate: gate, n: n, held: held}, nil
}

// release gives back what admit took for a request that was not submitted.
func (ss *sessionStream) release(l *lane, r *reply) {
	r.gate.Release(r.n + r.held)
	ss.c.inflight.Add(-1)
	<-l.slots
}

// submit starts an admitted request.
func (ss *sessionStream) submit(l *lane, r *reply, work func() (FrameType, proto.Message)) {
	r.work = work
	if l.serial {
		if l.work == nil {
			l.work = make(chan *reply, l.depth)
			ss.wg.Add(1)
			go ss.serve(l)
		}
		l.work <- r
		return
	}
	l.mu.Lock()
	l.queue = append(l.queue, r)
	l.mu.Unlock()
	ss.wg.Add(1)
	go func() {
		defer ss.wg.Done()
		r.compute()
		ss.finished(l, r)
	}()
}

// serve is a serial lane's worker: it answers the lane's requests one at a
// time, in order, until the lane is closed.
func (ss *sessionStream) serve(l *lane) {
	defer ss.wg.Done()
	for r := range l.work {
		r.compute()
		ss.answer(l, r)
	}
}

// finished marks r of a concurrent lane done and, unless another goroutine
// is writing, writes the finished replies at the head of the lane.
func (ss *sessionStream) finished(l *lane, r *reply) {
	l.mu.Lock()
	r.ready = true
	if l.writing {
		// The writer rechecks the head under mu before it stops.
		l.mu.Unlock()
		return
	}
	l.writing = true
	for len(l.queue) > 0 && l.queue[0].ready {
		head := l.queue[0]
		l.queue[0] = nil
		l.queue = l.queue[1:]
		l.mu.Unlock()
		ss.answer(l, head)
		l.mu.Lock()
	}
	l.writing = false
	l.mu.Unlock()
}

// answerUnencodable answers the request of m, an answer that could not be
// encoded, with Error{INTERNAL}.
func (ss *sessionStream) answerUnencodable(m proto.Message) {
	var rid uint64
	if r, ok := m.(interface{ GetRequestId() uint64 }); ok {
		rid = r.GetRequestId()
	}
	ss.fw.write(FrameError, errorToWire(newError(CodeInternal, "the answer could not be encoded"), rid))
}

// answer writes r's answer and frees its place in the lane.
func (ss *sessionStream) answer(l *lane, r *reply) {
	if b, ok := r.msg.(*h3xpb.EventsBatch); ok && len(b.GetEvents()) > 0 {
		// A batch the stream did not take is given back at once.
		if err := ss.fw.writeAndWait(r.t, r.msg); errors.Is(err, errUnencodable) {
			// Not the stream's fault: the request still gets an answer.
			ss.c.logger.Error("h3x: a batch could not be encoded", "err", err)
			ss.c.releaseUnencodable(b)
			ss.answerUnencodable(b)
		} else if err != nil {
			ss.c.releaseUnsent(b)
		}
	} else if err := ss.fw.write(r.t, r.msg); errors.Is(err, errUnencodable) {
		// A string from a custom Queue that is not UTF-8, say: the
		// request still gets an answer.
		ss.c.logger.Error("h3x: an answer could not be encoded", "frame", r.t, "err", err)
		ss.answerUnencodable(r.msg)
	}
	if r.held > 0 {
		r.gate.Release(r.held)
		r.held = 0
	}
	if ss.c.goingAway.Load() {
		ss.c.lastAnswerAt.Store(time.Now().UnixNano()) // for the drain
	}
	ss.c.inflight.Add(-1)
	<-l.slots
}
