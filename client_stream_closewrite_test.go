package h3x

import (
	"context"
	"errors"
	"testing"
	"time"
)

// openWritten opens a stream on c and writes one frame of type t on it; the
// stream is closed when the test ends.
func openWritten(t *testing.T, ctx context.Context, c *Client, typ FrameType, payload []byte) *Stream {
	t.Helper()
	st, err := c.OpenStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if err := st.WriteFrame(typ, payload); err != nil {
		t.Fatal(err)
	}
	return st
}

// waitStreamEnded waits (up to 5 s) until st's send side has ended, after
// what.
func waitStreamEnded(t *testing.T, st *Stream, what string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); st.st.Context().Err() == nil; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the stream did not end within 5 s of %s", what)
		}
	}
}

// The custom-handler example's request (WriteFrame, CloseWrite, ReadFrame)
// failed when the server's STOP_SENDING for a refused stream (or a handler
// that returned) arrived before the client's CloseWrite: quic-go's Close
// then fails with "close called for canceled stream N", which is neither
// the reply nor ErrUnknownFrameType. Here the reset is waited for first, as
// a loaded machine sometimes orders it (RELIABILITY.md finding 130).
func TestCloseWriteAfterServerRefusedStream(t *testing.T) {
	s := testServer(t)
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st := openWritten(t, ctx, c, 0x8f, nil) // a frame type nobody serves
	if _, _, err := st.ReadFrame(); !errors.Is(err, ErrUnknownFrameType) {
		t.Fatalf("ReadFrame: %v, want ErrUnknownFrameType", err)
	}
	// The server's STOP_SENDING came with its RESET_STREAM.
	if err := st.CloseWrite(); err != nil && !errors.Is(err, ErrUnknownFrameType) {
		t.Errorf("CloseWrite after the server refused the stream: %v, want nil or ErrUnknownFrameType (a client that checks it, as examples/custom-handler's request did, fails instead of reading the reset)", err)
	}
	// The same after a handler answered and returned (STOP_SENDING with
	// code NONE): the FIN is not needed, and not an error.
	s.Handle(0x90, HandlerFunc(func(ctx context.Context, hs *Stream) error {
		return hs.WriteFrame(0x90, []byte("ok"))
	}))
	st2 := openWritten(t, ctx, c, 0x90, nil)
	if _, p, err := st2.ReadFrame(); err != nil || string(p) != "ok" {
		t.Fatalf("ReadFrame: %q %v", p, err)
	}
	waitStreamEnded(t, st2, "its handler returning (no STOP_SENDING from the server)")
	if err := st2.CloseWrite(); err != nil {
		t.Errorf("CloseWrite after the handler answered and returned: %v, want nil", err)
	}
}

// CloseWrite's doc: "finishes the stream's send side: the peer reads io.EOF
// after the frames written so far". After the connection ended, quic-go's
// Close returns nil (the stream was shut down, no FIN is sent), so
// CloseWrite reported success for frames the peer never got the end of
// (RELIABILITY.md finding 134).
func TestCloseWriteOnADeadConnection(t *testing.T) {
	s := testServer(t)
	s.Handle(0x91, HandlerFunc(func(ctx context.Context, hs *Stream) error {
		<-ctx.Done() // never answers; ends with the connection
		return nil
	}))
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st := openWritten(t, ctx, c, 0x91, []byte("request"))
	s.Close() // the server goes away: the connection ends
	waitStreamEnded(t, st, "the server closing")
	if err := st.CloseWrite(); err == nil {
		t.Errorf("CloseWrite on a connection that has ended: nil (cause %v); want the connection's error", context.Cause(st.st.Context()))
	}
}
