package h3x

import (
	"context"
	"errors"
	"testing"
	"time"
)

// The custom-handler example's request (WriteFrame, CloseWrite, ReadFrame)
// failed when the server's STOP_SENDING for a refused stream (or a handler
// that returned) arrived before the client's CloseWrite: quic-go's Close
// then fails with "close called for canceled stream N", which is neither
// the reply nor ErrUnknownFrameType. Here the reset is waited for first, as
// a loaded machine sometimes orders it.
func TestCloseWriteAfterServerRefusedStream(t *testing.T) {
	s := testServer(t)
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.OpenStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.WriteFrame(0x8f, nil); err != nil { // a frame type nobody serves
		t.Fatal(err)
	}
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
	st2, err := c.OpenStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer st2.Close()
	if err := st2.WriteFrame(0x90, nil); err != nil {
		t.Fatal(err)
	}
	if _, p, err := st2.ReadFrame(); err != nil || string(p) != "ok" {
		t.Fatalf("ReadFrame: %q %v", p, err)
	}
	for deadline := time.Now().Add(5 * time.Second); st2.st.Context().Err() == nil; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no STOP_SENDING from the server within 5 s of its handler returning")
		}
	}
	if err := st2.CloseWrite(); err != nil {
		t.Errorf("CloseWrite after the handler answered and returned: %v, want nil", err)
	}
}
