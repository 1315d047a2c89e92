package h3x

import (
	"context"
	"testing"
	"time"
)

// CloseWrite's doc: "finishes the stream's send side: the peer reads io.EOF
// after the frames written so far", with the exceptions 7b1110c lists (a
// peer that stopped reading). After the connection ended, quic-go's Close
// returns nil (the stream was shut down, no FIN is sent), so CloseWrite
// reports success for frames the peer never got the end of. (Not a change
// of 7b1110c; its doc does not say so.)
func TestCloseWriteOnADeadConnection(t *testing.T) {
	s := testServer(t)
	s.Handle(0x91, HandlerFunc(func(ctx context.Context, hs *Stream) error {
		<-ctx.Done() // never answers; ends with the connection
		return nil
	}))
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.OpenStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.WriteFrame(0x91, []byte("request")); err != nil {
		t.Fatal(err)
	}
	s.Close() // the server goes away: the connection ends
	for deadline := time.Now().Add(5 * time.Second); st.st.Context().Err() == nil; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the stream did not end within 5 s of the server closing")
		}
	}
	if err := st.CloseWrite(); err == nil {
		t.Errorf("CloseWrite on a connection that has ended: nil (cause %v); want the connection's error", context.Cause(st.st.Context()))
	}
}
