package h3xtest_test

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
	"github.com/h3x-io/h3x/proto/h3xpb"
)

// rawLimits authenticates over a raw QUIC connection and returns the
// ServerLimits of the AuthResult.
func rawLimits(t *testing.T, addr string) *h3xpb.ServerLimits {
	t.Helper()
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: udp}
	defer udp.Close()
	defer tr.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	qc, err := tr.Dial(ctx, mustResolve(t, addr), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{h3x.ALPN}}, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer qc.CloseWithError(0, "")
	st, err := qc.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	payload, _ := proto.Marshal(&h3xpb.Auth{ClientId: h3xtest.ClientID, Token: h3xtest.Token})
	hdr := []byte{byte(h3x.FrameAuth), 0, 0, 0, 0}
	binary.LittleEndian.PutUint32(hdr[1:], uint32(len(payload)))
	if _, err := st.Write(append(hdr, payload...)); err != nil {
		t.Fatal(err)
	}
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(st, hdr); err != nil {
		t.Fatal(err)
	}
	if h3x.FrameType(hdr[0]) != h3x.FrameAuthResult {
		t.Fatalf("got frame %v, want AuthResult", h3x.FrameType(hdr[0]))
	}
	body := make([]byte, binary.LittleEndian.Uint32(hdr[1:]))
	if _, err := io.ReadFull(st, body); err != nil {
		t.Fatal(err)
	}
	var res h3xpb.AuthResult
	if err := proto.Unmarshal(body, &res); err != nil {
		t.Fatal(err)
	}
	return res.GetLimits()
}

func mustResolve(t *testing.T, addr string) *net.UDPAddr {
	a, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestNewServerAnnouncesQueueLimits: h3xtest's server runs a built-in queue
// (memory by default, Badger with WithBadger), whose dead-letter and dedup
// settings the server knows and must announce in ServerLimits
// (PROTOCOL.md §3.4: 0 is for custom queues only, and means "never
// dead-lettered" / "no deduplication").
func TestNewServerAnnouncesQueueLimits(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []h3xtest.Option
	}{
		{"memory", nil},
		{"badger", []h3xtest.Option{h3xtest.WithBadger()}},
		{"WithQueue", []h3xtest.Option{h3xtest.WithQueue(h3x.NewMemoryQueue(h3x.QueueOptions{MaxAttempts: 3, DedupWindow: time.Minute}))}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := h3xtest.NewServer(t, tc.opts...)
			check := func(when string) {
				l := rawLimits(t, srv.Addr())
				wantAttempts, wantWindow := uint32(h3x.DefaultMaxAttempts), uint64(h3x.DefaultDedupWindow.Milliseconds())
				if tc.name == "WithQueue" {
					wantAttempts, wantWindow = 3, 60_000
				}
				if l.GetMaxAttempts() != wantAttempts || uint64(l.GetDedupWindowMs()) != wantWindow {
					t.Errorf("%s: announced max_attempts %d, dedup_window_ms %d; want %d, %d (the queue dead-letters and deduplicates)",
						when, l.GetMaxAttempts(), l.GetDedupWindowMs(), wantAttempts, wantWindow)
				}
			}
			check("after NewServer")
			srv.Restart()
			check("after Restart")
		})
	}
}
