package h3x

import (
	"context"
	"errors"
	"io"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// laneDepth bounds the requests of one kind in flight on one stream; the
// stream's reader waits (and QUIC flow control pushes back on the client)
// beyond it.
const laneDepth = 256

// fetchLaneDepth bounds fetches in flight on one stream: each may hold a
// batch of up to the fetch byte budget, so a client that stops reading can
// pin at most this many batches.
const fetchLaneDepth = 4

// reply is one answer being prepared; replies of a lane are written in the
// order their requests arrived.
type reply struct {
	done chan struct{}
	t    FrameType
	msg  proto.Message
}

// lane answers one kind of request in arrival order.
type lane struct {
	ch    chan *reply
	depth int
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
	wg                      sync.WaitGroup // the writer and the request workers
	respWG                  sync.WaitGroup // the lanes' responders
	sends, fetches, settles lane
}

func newSessionStream(c *serverConn, st *quic.Stream, fr *frameReader) *sessionStream {
	return &sessionStream{c: c, st: st, fr: fr, fw: newFrameWriter(st),
		sends: lane{depth: laneDepth}, fetches: lane{depth: fetchLaneDepth}, settles: lane{depth: laneDepth}}
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
	for _, l := range []*lane{&ss.sends, &ss.fetches, &ss.settles} {
		if l.ch != nil {
			close(l.ch)
		}
	}
	var e *Error
	if failure != nil && errors.As(failure, &e) {
		ss.fw.write(FrameError, errorToWire(e, 0))
	}
	// Wait for the responders, then flush and finish the send side.
	ss.respWG.Wait()
	ss.fw.close()
	ss.wg.Wait()
	switch {
	case failure == nil:
		ss.st.Close()
	case e != nil:
		ss.st.CancelRead(quic.StreamErrorCode(e.Code))
		ss.st.Close()
	default:
		ss.st.CancelRead(quic.StreamErrorCode(CodeNone))
		ss.st.CancelWrite(quic.StreamErrorCode(CodeNone))
	}
}

// dispatch handles one request frame. It returns an error only for a
// stream-level failure.
func (ss *sessionStream) dispatch(ctx context.Context, t FrameType, payload []byte) error {
	switch t {
	case FrameSendEvent:
		m := new(h3xpb.SendEvent)
		if err := unmarshalPayload(t, payload, m); err != nil {
			return err
		}
		ss.submit(&ss.sends, func() (FrameType, proto.Message) { return ss.publish(ctx, m) })
	case FrameFetchEvents:
		m := new(h3xpb.FetchEvents)
		if err := unmarshalPayload(t, payload, m); err != nil {
			return err
		}
		ss.submit(&ss.fetches, func() (FrameType, proto.Message) { return ss.fetch(ctx, m) })
	case FrameAckEvent:
		m := new(h3xpb.AckEvent)
		if err := unmarshalPayload(t, payload, m); err != nil {
			return err
		}
		ss.submit(&ss.settles, func() (FrameType, proto.Message) {
			return ss.settle(ctx, t, m.GetRequestId(), m.GetEventIds(), m.GetAttempts(), m.GetNamespaces(), func(refs []LeaseRef) ([]SettleResult, error) {
				return ss.c.srv.queue.Ack(context.WithoutCancel(ctx), ss.c.id, refs)
			})
		})
	case FrameNackEvent:
		m := new(h3xpb.NackEvent)
		if err := unmarshalPayload(t, payload, m); err != nil {
			return err
		}
		delay := time.Duration(m.GetDelayMs()) * time.Millisecond
		ss.submit(&ss.settles, func() (FrameType, proto.Message) {
			return ss.settle(ctx, t, m.GetRequestId(), m.GetEventIds(), m.GetAttempts(), m.GetNamespaces(), func(refs []LeaseRef) ([]SettleResult, error) {
				for i := range refs {
					refs[i].Unseen = m.GetUnseen()
				}
				return ss.c.srv.queue.Nack(context.WithoutCancel(ctx), ss.c.id, refs, delay, m.GetReason())
			})
		})
	case FrameExtendLease:
		m := new(h3xpb.ExtendLease)
		if err := unmarshalPayload(t, payload, m); err != nil {
			return err
		}
		d := time.Duration(m.GetExtendMs()) * time.Millisecond
		if d <= 0 {
			d = ss.c.srv.cfg.ackDeadline
		}
		ss.submit(&ss.settles, func() (FrameType, proto.Message) {
			return ss.settle(ctx, t, m.GetRequestId(), m.GetEventIds(), m.GetAttempts(), m.GetNamespaces(), func(refs []LeaseRef) ([]SettleResult, error) {
				return ss.c.srv.queue.Extend(context.WithoutCancel(ctx), ss.c.id, refs, d)
			})
		})
	default:
		return newError(CodeProtocolViolation, "%v frame is not allowed on a session stream", t)
	}
	return nil
}

// submit queues a request on its lane and computes its answer in a new
// goroutine; the lane's responder writes answers in order.
func (ss *sessionStream) submit(l *lane, work func() (FrameType, proto.Message)) {
	if l.ch == nil {
		l.ch = make(chan *reply, l.depth)
		ss.respWG.Add(1)
		go ss.respond(l.ch)
	}
	r := &reply{done: make(chan struct{})}
	l.ch <- r
	ss.c.inflight.Add(1)
	ss.wg.Add(1)
	go func() {
		defer ss.wg.Done()
		r.t, r.msg = work()
		close(r.done)
	}()
}

// respond writes a lane's answers in request order.
func (ss *sessionStream) respond(ch chan *reply) {
	defer ss.respWG.Done()
	for r := range ch {
		<-r.done
		if err := ss.fw.write(r.t, r.msg); err != nil {
			if b, ok := r.msg.(*h3xpb.EventsBatch); ok && len(b.GetEvents()) > 0 {
				ss.c.releaseUnsent(b)
			}
		}
		ss.c.inflight.Add(-1)
	}
}
