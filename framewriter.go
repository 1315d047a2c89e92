package h3x

import (
	"io"
	"sync"

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
}

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
	_, err := fw.put(t, m)
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
	end, err := fw.put(t, m)
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
// and the writer's error. fw.mu is held.
func (fw *frameWriter) put(t FrameType, m proto.Message) (uint64, error) {
	for len(fw.buf) > maxPendingWrite && fw.err == nil && !fw.closed {
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
