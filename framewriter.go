package h3x

import (
	"context"
	"io"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
)

// maxPendingWrite bounds the bytes a frameWriter holds unwritten; writers
// wait beyond it, so a peer that stops reading bounds the buffer.
const maxPendingWrite = 1 << 20

// frameWriter lets several goroutines write frames to one stream and
// coalesces them into few writes without a goroutine of its own: a writer
// appends its frame to a buffer and, if no write is in progress, becomes the
// flusher and writes whatever has accumulated, looping until the buffer is
// empty. Under load, one Write carries many frames; when idle, a frame goes
// out at once, with no hand-off to another goroutine.
type frameWriter struct {
	w          io.Writer
	mu         sync.Mutex
	cond       *sync.Cond
	buf, spare []byte
	err        error
	closed     bool
	flushing   bool
	// appended counts the bytes of every frame taken, written those the
	// stream has accepted: a frame ending at offset n is out once written
	// >= n (see writeAndWait).
	appended, written uint64

	// The flush in progress, for writeCtx's interruption (guarded by mu).
	writes      uint64 // flushes made interruptible (interruptible)
	writing     uint64 // the one in progress (0: none)
	deadlineSet bool
}

// deadliner is a stream whose blocked writes a deadline can end.
type deadliner interface{ SetWriteDeadline(time.Time) error }

func newFrameWriter(w io.Writer) *frameWriter {
	fw := &frameWriter{w: w}
	fw.cond = sync.NewCond(&fw.mu)
	return fw
}

// write writes one frame (or leaves it to the goroutine flushing now) and
// reports an earlier write error.
func (fw *frameWriter) write(t FrameType, m proto.Message) error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	_, err := fw.put(nil, t, m)
	return err
}

// writeCtx is write for a caller whose context may end first: it stops
// waiting for room in the buffer when ctx ends (nothing written), and if
// it is flushing, an end of ctx interrupts the stream's Write (with a
// write deadline, when the stream has them). An interrupted Write may have
// written part of a frame, so it fails the writer for good, like any write
// error: the caller gets ctx's error and should abandon the stream.
func (fw *frameWriter) writeCtx(ctx context.Context, t FrameType, m proto.Message) error {
	if ctx.Done() == nil {
		return fw.write(t, m)
	}
	if err := ctx.Err(); err != nil {
		return err // nothing written
	}
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if len(fw.buf) > maxPendingWrite {
		// put will wait for room: wake it when ctx ends.
		stop := context.AfterFunc(ctx, func() {
			fw.mu.Lock()
			fw.cond.Broadcast()
			fw.mu.Unlock()
		})
		defer stop()
	}
	_, err := fw.put(ctx, t, m)
	if err != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// writeAndWait writes one frame and waits until the stream has accepted it:
// it returns nil once the frame is out, and the stream's error if the frame
// never will be (a write failed before it got out, its own or another
// goroutine's). Deliveries use it, so that a batch that was not written is
// given back at once and one that was written is not.
func (fw *frameWriter) writeAndWait(t FrameType, m proto.Message) error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	end, err := fw.put(nil, t, m)
	if end == 0 {
		return err // not taken
	}
	for fw.written < end && fw.err == nil {
		fw.cond.Wait()
	}
	if fw.written >= end {
		return nil
	}
	return fw.err
}

// put appends a frame and, unless another goroutine is flushing, flushes.
// It returns the offset at which the frame ends (0 if it was not taken)
// and the writer's error. fw.mu is held. With a ctx (writeCtx), it gives
// up waiting for room when ctx ends, and its Writes can be interrupted.
func (fw *frameWriter) put(ctx context.Context, t FrameType, m proto.Message) (uint64, error) {
	for len(fw.buf) > maxPendingWrite && fw.err == nil && !fw.closed {
		if ctx != nil && ctx.Err() != nil {
			return 0, ctx.Err()
		}
		fw.cond.Wait()
	}
	if fw.err != nil {
		return 0, fw.err
	}
	if fw.closed {
		return 0, io.ErrClosedPipe
	}
	n := len(fw.buf)
	var err error
	fw.buf, err = appendFrame(fw.buf, t, m)
	if err != nil {
		return 0, err
	}
	fw.appended += uint64(len(fw.buf) - n)
	end := fw.appended
	if fw.flushing {
		return end, nil
	}
	fw.flushing = true
	if ctx != nil {
		defer fw.interruptible(ctx)()
	}
	for len(fw.buf) > 0 && fw.err == nil {
		fw.buf, fw.spare = fw.spare[:0], fw.buf
		out := fw.spare
		fw.mu.Unlock()
		_, err := fw.w.Write(out)
		fw.mu.Lock()
		if err != nil {
			fw.err = err
			fw.buf = fw.buf[:0]
		} else {
			fw.written += uint64(len(out))
		}
		fw.cond.Broadcast()
	}
	fw.flushing = false
	fw.cond.Broadcast()
	return end, fw.err
}

// failed reports whether a write has failed (for good).
func (fw *frameWriter) failed() bool {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	return fw.err != nil
}

// close refuses further frames and waits until a write in progress has
// finished, so everything written before close is on the stream.
func (fw *frameWriter) close() {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	fw.closed = true
	for fw.flushing {
		fw.cond.Wait()
	}
	fw.cond.Broadcast()
}

// interruptible makes the end of ctx interrupt the flusher's Writes (with
// a write deadline, if the stream has them) until the returned function is
// called; see writeCtx. fw.mu is held.
func (fw *frameWriter) interruptible(ctx context.Context) func() {
	d, ok := fw.w.(deadliner)
	if !ok {
		return func() {}
	}
	fw.writes++
	this := fw.writes
	fw.writing = this
	stop := context.AfterFunc(ctx, func() {
		// The flusher holds fw.mu except while it writes.
		fw.mu.Lock()
		defer fw.mu.Unlock()
		if fw.writing == this { // not a later flush's
			d.SetWriteDeadline(time.Now())
			fw.deadlineSet = true
		}
	})
	return func() {
		stop() // does not wait for the function, which needs fw.mu
		fw.writing = 0
		if fw.deadlineSet {
			d.SetWriteDeadline(time.Time{})
			fw.deadlineSet = false
		}
	}
}
