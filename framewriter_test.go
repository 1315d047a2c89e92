package h3x

import (
	"errors"
	"sync"
	"testing"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// gateWriter is an io.Writer whose writes wait for a result from results,
// one per Write.
type gateWriter struct {
	results chan error
	mu      sync.Mutex
	started int
}

func (g *gateWriter) Write(p []byte) (int, error) {
	g.mu.Lock()
	g.started++
	g.mu.Unlock()
	if err := <-g.results; err != nil {
		return 0, err
	}
	return len(p), nil
}

func (g *gateWriter) writes() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.started
}

var errStopped = errors.New("stream stopped")

// writeAndWait reports each frame's own fate: a frame queued behind a write
// that fails was not written (its batch must be given back), and a frame
// that went out was written even if a later write failed (its batch must
// not be given back and delivered twice).
func TestFrameWriterWriteAndWait(t *testing.T) {
	batch := &h3xpb.EventsBatch{RequestId: 1, Events: []*h3xpb.Delivery{{Event: &h3xpb.EventPayload{Id: "a"}}}}
	ping := &h3xpb.Ping{Sequence: 1}

	t.Run("queued behind a failing write", func(t *testing.T) {
		g := &gateWriter{results: make(chan error, 2)}
		fw := newFrameWriter(g)
		first := make(chan error, 1)
		go func() { first <- fw.write(FramePing, ping) }() // the flusher
		waitFor(t, func() bool { return g.writes() == 1 })
		queued := make(chan error, 1)
		go func() { queued <- fw.writeAndWait(FrameEventsBatch, batch) }()
		waitFor(t, func() bool {
			fw.mu.Lock()
			defer fw.mu.Unlock()
			return len(fw.buf) > 0
		})
		g.results <- errStopped
		if err := <-first; !errors.Is(err, errStopped) {
			t.Fatalf("flusher: %v", err)
		}
		if err := <-queued; !errors.Is(err, errStopped) {
			t.Fatalf("a batch queued behind a failed write: %v, want the write's error", err)
		}
	})

	t.Run("written before a later write fails", func(t *testing.T) {
		g := &gateWriter{results: make(chan error, 2)}
		fw := newFrameWriter(g)
		own := make(chan error, 1)
		go func() { own <- fw.writeAndWait(FrameEventsBatch, batch) }() // the flusher
		waitFor(t, func() bool { return g.writes() == 1 })
		if err := fw.write(FramePing, ping); err != nil { // queued behind it
			t.Fatal(err)
		}
		g.results <- nil        // the batch is out
		g.results <- errStopped // the ping's write fails
		if err := <-own; err != nil {
			t.Fatalf("a batch that was written: %v, want nil", err)
		}
		if err := fw.write(FramePing, ping); !errors.Is(err, errStopped) {
			t.Fatalf("after the failure: %v", err)
		}
	})
}
