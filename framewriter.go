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
	for len(fw.buf) > maxPendingWrite && fw.err == nil && !fw.closed {
		fw.cond.Wait()
	}
	if fw.err != nil {
		return fw.err
	}
	if fw.closed {
		return io.ErrClosedPipe
	}
	var err error
	fw.buf, err = appendFrame(fw.buf, t, m)
	if err != nil {
		return err
	}
	if fw.flushing {
		return nil
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
		}
		fw.cond.Broadcast()
	}
	fw.flushing = false
	fw.cond.Broadcast()
	return fw.err
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
