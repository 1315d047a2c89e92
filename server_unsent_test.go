package h3x

import (
	"context"
	"crypto/tls"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// A batch queued on a stream behind answers that a client has not read is
// given back at once when the stream's write fails (the client stopped
// it): its event is ready again on a connection that is still alive, not
// leased until the ack deadline.
func TestServerUnsentBatchGivenBack(t *testing.T) {
	refused := &refusalCounter{}
	s := testServer(t, WithHooks(refused))
	udp, _ := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	tr := &quic.Transport{Conn: udp}
	defer tr.Close()
	qc, err := tr.Dial(context.Background(), s.Addr(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{ALPN}},
		&quic.Config{MaxIdleTimeout: 60 * time.Second,
			InitialStreamReceiveWindow: 256 << 10, MaxStreamReceiveWindow: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	rc := &rawConn{t: t, tr: tr, udp: udp, qc: qc}
	rc.auth("alice", "alice-token")

	evs := make([]*h3xpb.EventPayload, 1000)
	for i := range evs {
		evs[i] = &h3xpb.EventPayload{Namespace: "secret"}
	}
	small := frameBytes(t, FrameSendEvent, &h3xpb.SendEvent{RequestId: 1, Events: evs})
	// Size of one answer.
	probe := rc.stream(small, true)
	var res h3xpb.SendResult
	if err := newFrameReader(probe, DefaultMaxFrameSize).readMessage(FrameSendResult, &res); err != nil {
		t.Fatal(err)
	}
	size := len(frameBytes(t, FrameSendResult, &res))

	pub := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := pub.Publish(ctx, Event{Namespace: "orders", Message: "one"}); err != nil {
		t.Fatal(err)
	}

	// ~700 KiB of answers the client does not read: 256 KiB go out, the
	// rest stays buffered while the flusher waits for flow-control credit.
	var req []byte
	requests := 0
	for n := 0; n < 700<<10; n += size {
		req = append(req, small...)
		requests++
	}
	before := refused.n.Load()
	st := rc.stream(req, false)
	// Every answer computed, and the server's writes stalled on the
	// client's flow control (what the client receives stops growing past
	// its 256 KiB window), before the fetch.
	waitFor(t, func() bool { return refused.n.Load()-before == int64(requests*len(evs)) })
	settled(t, 30*time.Second, func() int64 { return int64(qc.ConnectionStats().BytesReceived) })
	if got := qc.ConnectionStats().BytesReceived; got < 256<<10 {
		t.Fatalf("the client received only %d bytes: the server's writes did not fill its window", got)
	}
	st.Write(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 9, Namespaces: []string{"orders"}, Limit: 10}))
	waitFor(t, func() bool { // the fetch has leased the event
		stats, err := s.queue.Stats(ctx, "orders")
		return err == nil && len(stats) == 1 && stats[0].Leased == 1
	})
	time.Sleep(50 * time.Millisecond)
	st.CancelRead(0) // STOP_SENDING: the server's pending write fails

	// The connection is alive; the event should be ready again at once.
	fctx, fcancel := context.WithTimeout(ctx, 3*time.Second)
	defer fcancel()
	got, err := pub.Fetch(fctx, 10, "orders")
	if len(got) != 1 {
		t.Logf("fetch error: %v", err)
		stats, _ := s.queue.Stats(ctx, "orders")
		t.Fatalf("after the batch's stream was stopped: fetched %d events, want 1; queue stats %+v", len(got), stats)
	}
}

// refusalCounter counts the events the server refuses.
type refusalCounter struct {
	NopHooks
	n atomic.Int64
}

func (r *refusalCounter) Refused(_ string, _ ErrorCode, n int) { r.n.Add(int64(n)) }
