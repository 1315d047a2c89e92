// Custom-handler serves an application protocol of its own next to H3X's
// events: frame types from 0x80 up route a stream to a handler registered
// with Server.Handle, which sees the authenticated session. It runs a
// server and a client in one process:
//
//	go run ./examples/custom-handler
//
// It prints:
//
//	whoami: gadgets (grants [orders/all audit/sub])
//	echo: gadgets said "hello"
//	echo: gadgets said "over"
//	echo: gadgets said "quic"
//	echo: server finished the stream
//	unknown frame type: stream reset with unknown frame type
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"strings"
	"time"

	"github.com/h3x-io/h3x"
)

// The application's frame types: 0x80 and above are free for applications.
const (
	frameWhoAmI h3x.FrameType = 0x80 // request: empty; reply: "client (grants ...)"
	frameEcho   h3x.FrameType = 0x81 // request: any text; reply: the text, attributed
)

// whoAmI answers one request with the session's identity.
func whoAmI(ctx context.Context, s *h3x.Stream) error {
	if _, _, err := s.ReadFrame(); err != nil { // the frame that routed the stream here
		return err
	}
	sess := s.Session()
	return s.WriteFrame(frameWhoAmI, fmt.Appendf(nil, "%s (grants %v)", sess.ClientID, sess.Grants))
}

// echo answers every frame until the client finishes its side. Returning
// nil finishes the server's side too.
func echo(ctx context.Context, s *h3x.Stream) error {
	for {
		t, payload, err := s.ReadFrame()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if t != frameEcho {
			return &h3x.Error{Code: h3x.CodeProtocolViolation, Message: "echo streams carry echo frames only"}
		}
		if err := s.WriteFrame(frameEcho, fmt.Appendf(nil, "%s said %q", s.Session().ClientID, payload)); err != nil {
			return err
		}
	}
}

func main() {
	log.SetFlags(0)
	if err := run(); err != nil {
		log.Fatal("custom-handler: ", err)
	}
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	reg, err := h3x.ParseRegistry("gadgets:orders=gadgets-token, gadgets:audit/sub=gadgets-token")
	if err != nil {
		return err
	}
	srv, err := h3x.NewServer(
		h3x.WithAddr("127.0.0.1:0"),
		h3x.WithRegistry(reg),
		h3x.WithQueue(h3x.NewMemoryQueue(h3x.QueueOptions{})), // this example stores no events
	)
	if err != nil {
		return err
	}
	defer srv.Close()
	srv.Handle(frameWhoAmI, h3x.HandlerFunc(whoAmI))
	srv.Handle(frameEcho, h3x.HandlerFunc(echo))
	if err := srv.Start(ctx); err != nil {
		return err
	}

	c, err := h3x.Dial(ctx, srv.Addr().String(),
		h3x.WithCredentials("gadgets", "gadgets-token"),
		h3x.WithTrustedFingerprint(srv.Fingerprint()),
	)
	if err != nil {
		return err
	}
	defer c.Close()

	// One request, one reply.
	reply, err := request(ctx, c, frameWhoAmI, nil)
	if err != nil {
		return fmt.Errorf("whoami: %w", err)
	}
	fmt.Printf("whoami: %s\n", reply)

	// A conversation: several frames each way on one stream.
	st, err := c.OpenStream(ctx)
	if err != nil {
		return err
	}
	defer st.Close()
	stopEcho := context.AfterFunc(ctx, func() { st.Close() })
	defer stopEcho()
	for _, word := range strings.Fields("hello over quic") {
		if err := st.WriteFrame(frameEcho, []byte(word)); err != nil {
			return err
		}
		_, payload, err := st.ReadFrame()
		if err != nil {
			return fmt.Errorf("echo: %w", err)
		}
		fmt.Printf("echo: %s\n", payload)
	}
	st.CloseWrite() // the handler reads io.EOF and returns
	if _, _, err := st.ReadFrame(); errors.Is(err, io.EOF) {
		fmt.Println("echo: server finished the stream")
	} else {
		return fmt.Errorf("echo: want the end of the stream, got %v", err)
	}

	// A frame type nobody serves resets that stream only.
	_, err = request(ctx, c, 0x8f, nil)
	if !errors.Is(err, h3x.ErrUnknownFrameType) {
		return fmt.Errorf("unserved frame type: got %v", err)
	}
	fmt.Println("unknown frame type: stream reset with", h3x.CodeUnknownFrameType)

	c.Close()
	return srv.Shutdown(ctx)
}

// request opens a stream, sends one frame and reads one reply.
func request(ctx context.Context, c *h3x.Client, t h3x.FrameType, payload []byte) ([]byte, error) {
	st, err := c.OpenStream(ctx)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	// Stream calls take no context; closing the stream ends a ReadFrame
	// that would otherwise wait for a reply as long as the connection lives.
	stop := context.AfterFunc(ctx, func() { st.Close() })
	defer stop()
	if err := st.WriteFrame(t, payload); err != nil {
		return nil, err
	}
	if err := st.CloseWrite(); err != nil {
		return nil, err
	}
	_, reply, err := st.ReadFrame()
	if err != nil {
		return nil, err
	}
	return append([]byte(nil), reply...), nil
}
