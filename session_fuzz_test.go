package h3x

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// sessionFuzzMarker separates the stream chunks of a FuzzSession input.
var sessionFuzzMarker = []byte("\xf0\x9f\x92\xa5|")

// FuzzSession feeds arbitrary frame sequences into an authenticated server
// session, in process. An input is a list of chunks separated by
// sessionFuzzMarker; each chunk's first byte says where its other bytes go
// (bit 0: the control stream, after Auth, else a new data stream; bit 1:
// leave the stream's send side open instead of finishing it). The
// connection is closed once the server finished the data streams, or after
// 150 ms. The seed corpus is in testdata/fuzz/FuzzSession
// (TestWriteSessionFuzzSeeds rewrites it). Then the server
// must still serve (a Ping from another client) and hold no lease of the
// fuzzed connection (queue Stats: Leased is 0 in every namespace within
// 2 s). Goroutine leaks are caught by the package's goleak TestMain.
//
//	go test -run '^$' -fuzz FuzzSession -parallel 1 -fuzztime 20m .
func FuzzSession(f *testing.F) {
	reg, err := ParseRegistry("fuzz:*=fuzz-token, fuzz:orders=fuzz-token, ctl:ping=ctl-token")
	if err != nil {
		f.Fatal(err)
	}
	q := NewMemoryQueue(QueueOptions{MaxEventsPerNamespace: 10000, DedupWindow: time.Second})
	srv, err := NewServer(WithAddr("127.0.0.1:0"), WithQueue(q), WithRegistry(reg),
		WithMaxFetchWait(100*time.Millisecond), WithAckDeadline(time.Minute),
		WithConnectionRate(RateLimit{})) // a connection per input, faster than the default rate at times
	if err != nil {
		f.Fatal(err)
	}
	if err := srv.Start(context.Background()); err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { srv.Close() })
	ctx := context.Background()
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	ctl, err := Dial(dctx, srv.Addr().String(), WithCredentials("ctl", "ctl-token"), WithTrustedFingerprint(srv.Fingerprint()))
	cancel()
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { ctl.Close() })
	tlsConf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{ALPN}, MinVersion: tls.VersionTLS13}
	// ctl's session is up on the server (its control loop answers) before
	// the goroutines are counted.
	pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
	_, err = ctl.Ping(pctx)
	pcancel()
	if err != nil {
		f.Fatal(err)
	}
	// Every goroutine a session starts must end with it.
	// (Also ignored: the fuzzing worker's own signal goroutine, and the
	// heartbeat of ctl's connection, which its supervisor starts on its own
	// schedule.)
	before := []goleak.Option{goleak.IgnoreCurrent(), goleak.IgnoreTopFunction("os/signal.NotifyContext.func1"),
		goleak.IgnoreTopFunction("github.com/h3x-io/h3x.(*Client).heartbeat")}

	f.Fuzz(func(t *testing.T, data []byte) {
		// A hang is a failure too: dump the goroutines after 30 s.
		watchdog := time.AfterFunc(30*time.Second, func() {
			buf := make([]byte, 1<<22)
			n := runtime.Stack(buf, true)
			os.WriteFile(filepath.Join(os.TempDir(), "h3x-fuzzsession-hang.txt"), append([]byte(strconv.Quote(string(data))+"\n"), buf[:n]...), 0o644)
			panic(fmt.Sprintf("FuzzSession: input still running after 30 s: %q", data))
		})
		defer watchdog.Stop()
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		qc, err := quic.DialAddr(dctx, srv.Addr().String(), tlsConf, &quic.Config{MaxIdleTimeout: 5 * time.Second})
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		ctrl, err := qc.OpenStreamSync(dctx)
		if err != nil {
			t.Fatal(err)
		}
		auth, _ := appendFrame(nil, FrameAuth, &h3xpb.Auth{ClientId: "fuzz", Token: "fuzz-token"})
		if _, err := ctrl.Write(auth); err != nil {
			t.Fatal(err)
		}
		ctrl.SetReadDeadline(time.Now().Add(5 * time.Second))
		var res h3xpb.AuthResult
		if err := newFrameReader(ctrl, DefaultMaxFrameSize).readMessage(FrameAuthResult, &res); err != nil {
			t.Fatalf("auth: %v", err)
		}
		var wg sync.WaitGroup
		until := time.Now().Add(150 * time.Millisecond)
		drain := func(r io.Reader, setDeadline func(time.Time) error) {
			setDeadline(until)
			io.Copy(io.Discard, r)
		}
		ctrlDone := make(chan struct{})
		go func() {
			defer close(ctrlDone)
			io.Copy(io.Discard, ctrl) // until the connection closes
		}()
		for chunk := range bytes.SplitSeq(data, sessionFuzzMarker) {
			if len(chunk) == 0 {
				continue
			}
			mode, body := chunk[0], chunk[1:]
			if mode&1 == 1 {
				ctrl.SetWriteDeadline(until)
				ctrl.Write(body)
				continue
			}
			octx, ocancel := context.WithDeadline(ctx, until)
			st, err := qc.OpenStreamSync(octx)
			ocancel()
			if err != nil {
				break // the server closed the connection, or no stream credit
			}
			st.SetWriteDeadline(until)
			st.Write(body)
			if mode&2 == 0 {
				st.Close()
			}
			wg.Go(func() { drain(st, st.SetReadDeadline) })
		}
		wg.Wait()
		qc.CloseWithError(0, "fuzz input done")
		<-ctrlDone

		// The server serves, and released the connection's leases.
		pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
		defer pcancel()
		if _, err := ctl.Ping(pctx); err != nil {
			t.Fatalf("server not answering a ping after the input: %v", err)
		}
		deadline := time.Now().Add(2 * time.Second)
		for {
			stats, err := q.Stats(pctx)
			if err != nil {
				t.Fatal(err)
			}
			leased := 0
			for _, s := range stats {
				leased += s.Leased
			}
			if leased == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d leases left 2 s after the connection ended: %+v", leased, stats)
			}
			time.Sleep(time.Millisecond)
		}
		if err := goleak.Find(before...); err != nil {
			t.Fatalf("goroutines left after the session ended: %v", err)
		}
	})
}

type sessionSeed struct {
	name string
	data []byte
}

// sessionSeeds builds valid (and a few deliberately broken) frame sequences.
func sessionSeeds(tb testing.TB) []sessionSeed {
	frame := func(t FrameType, m proto.Message) []byte {
		b, err := appendFrame(nil, t, m)
		if err != nil {
			tb.Fatal(err)
		}
		return b
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	chunk := func(mode byte, frames ...[]byte) []byte { return append([]byte{mode}, cat(frames...)...) }
	input := func(chunks ...[]byte) []byte { return bytes.Join(chunks, sessionFuzzMarker) }

	ev := func(id string) *h3xpb.EventPayload {
		return &h3xpb.EventPayload{Id: id, Namespace: "orders", Type: "t", Data: []byte(`{"n":1}`), Metadata: map[string]string{"k": "v"}}
	}
	send := frame(FrameSendEvent, &h3xpb.SendEvent{RequestId: 1, Events: []*h3xpb.EventPayload{ev("a"), ev("b")}})
	fetch := frame(FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 2, Namespaces: []string{"orders"}, Limit: 10, MaxWaitMs: 50})
	ack := frame(FrameAckEvent, &h3xpb.AckEvent{RequestId: 3, EventIds: []string{"a"}, Attempts: []uint32{1}, Namespaces: []string{"orders"}})
	nack := frame(FrameNackEvent, &h3xpb.NackEvent{RequestId: 4, EventIds: []string{"b"}, DelayMs: 10, Reason: "r"})
	extend := frame(FrameExtendLease, &h3xpb.ExtendLease{RequestId: 5, EventIds: []string{"a", "b"}, ExtendMs: 1000})
	ping := frame(FramePing, &h3xpb.Ping{Sequence: 7, SentUnixNano: 1})
	return []sessionSeed{
		{"publish", input(chunk(0, send))},
		{"publish-fetch-ack", input(chunk(0, send, fetch, ack))},
		{"fetch-held-open", input(chunk(0, send), chunk(2, fetch))},
		{"fetch-nack-extend", input(chunk(0, send, fetch, nack, extend))},
		{"two-streams", input(chunk(0, send), chunk(0, fetch, fetch, ack))},
		{"control-ping", input(chunk(1, ping, ping), chunk(0, send, fetch))},
		{"control-auth-again", input(chunk(0, send, fetch), chunk(1, frame(FrameAuth, &h3xpb.Auth{ClientId: "fuzz", Token: "x"})))},
		{"truncated", input(chunk(0, send, fetch[:len(fetch)-3]))},
		{"bad-first-frame", input(chunk(0, frame(FrameAuthResult, &h3xpb.AuthResult{})), chunk(0, send, fetch))},
		{"application-type", input(chunk(0, appendRawFrame(nil, 0x90, []byte("x"))))},
		{"huge-length", input(chunk(0, send, fetch, []byte{0x10, 0xff, 0xff, 0xff, 0x7f}))},
	}
}

// TestWriteSessionFuzzSeeds writes the seed corpus of FuzzSession to
// testdata/fuzz/FuzzSession when H3X_WRITE_FUZZ_SEEDS is set.
func TestWriteSessionFuzzSeeds(t *testing.T) {
	if os.Getenv("H3X_WRITE_FUZZ_SEEDS") == "" {
		t.Skip("set H3X_WRITE_FUZZ_SEEDS=1 to rewrite testdata/fuzz/FuzzSession")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzSession")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, s := range sessionSeeds(t) {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%s)\n", strconv.Quote(string(s.data)))
		if err := os.WriteFile(filepath.Join(dir, s.name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
