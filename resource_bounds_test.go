package h3x

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// Bounds on what an authenticated client can make the server hold (found
// by a resource-exhaustion audit, 2026-11-26).

// headerOnly is a frame header that claims a payload of size bytes and is
// followed by nothing.
func headerOnly(t FrameType, size uint32) []byte {
	b := make([]byte, frameHeaderLen)
	b[0] = byte(t)
	binary.LittleEndian.PutUint32(b[1:], size)
	return b
}

// A client that authenticated (any grant) opens streams and sends only a
// 5-byte frame header claiming a maximum-size payload on each, then never
// sends the payload. The server used to allocate the whole claimed payload
// per stream at once (frameReader.next), before reading a byte of it and
// before the connection's request budget (16 MiB, PROTOCOL.md §8) was
// consulted: 1,485 bytes of headers held 298 MiB. Its buffer now grows as
// the payload's bytes arrive.
func TestFrameHeadersAloneAllocateNothing(t *testing.T) {
	s := testServer(t) // default 1 MiB frames, 100 streams
	const conns = 3
	before := heapInUse()
	var rcs []*rawConn
	var streams []*quic.Stream
	for range conns {
		rc := rawDial(t, s)
		rc.auth("bob", "bob-token") // consume-only "billing": no publish grant needed
		rcs = append(rcs, rc)
		for range 99 { // the control stream takes one of the 100
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			st, err := rc.qc.OpenStreamSync(ctx)
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := st.Write(headerOnly(FrameSendEvent, DefaultMaxFrameSize)); err != nil {
				t.Fatal(err)
			}
			streams = append(streams, st)
		}
	}
	time.Sleep(1500 * time.Millisecond)
	grew := heapInUse() - before
	sent := len(streams) * frameHeaderLen
	t.Logf("%d connections × 99 streams, %d bytes sent in all: server heap +%d MiB", conns, sent, grew>>20)
	for _, rc := range rcs {
		rc.close()
	}
	// Headers alone: nothing to hold but the streams themselves (a few KiB
	// each, quic-go's included: 2 MiB for the three connections here); 4 MiB
	// per connection is above that and far below the 99 MiB each held
	// before.
	if limit := int64(conns) * (4 << 20); grew > limit {
		t.Fatalf("%d bytes of frame headers (no payload) made the server hold %d MiB (%d MiB per connection); documented request budget is 16 MiB per connection",
			sent, grew>>20, (grew/conns)>>20)
	}
}

// Long polls naming namespaces that never held an event used to leave a
// namespace record behind for each name, for the life of the server (1,000,000
// records and 461 MiB after 20 fetches of 50,000 names): Queue.Wait created
// one to hang its waiters on, and nothing removed it. Waiters are now kept
// apart, and one FetchEvents names at most MaxFetchNamespaces.
func TestLongPollsOnUnusedNamespacesLeaveNothing(t *testing.T) {
	q := NewMemoryQueue(QueueOptions{})
	s := testServerWith(t, "ops:*/sub=ops-token", WithQueue(q))
	core := q.(*memoryQueue).core
	rc := rawDial(t, s)
	rc.auth("ops", "ops-token")
	fetch := func(names []string) (FrameType, []byte) {
		st := rc.stream(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: 1, Namespaces: names, Limit: 1, MaxWaitMs: 200}), true)
		st.SetReadDeadline(time.Now().Add(30 * time.Second))
		ft, payload, err := newFrameReader(st, DefaultMaxFrameSize).next()
		if err != nil {
			t.Fatalf("fetch of %d names: %v", len(names), err)
		}
		return ft, payload
	}
	for f := range 5 {
		names := make([]string, MaxFetchNamespaces)
		for i := range names {
			names[i] = fmt.Sprintf("n%d-%d", f, i)
		}
		if ft, _ := fetch(names); ft != FrameEventsBatch {
			t.Fatalf("fetch %d answered %v, want an (empty) EventsBatch", f, ft)
		}
	}
	core.mu.Lock()
	n, w := len(core.nss), len(core.waiting)
	core.mu.Unlock()
	if n != 0 || w != 0 {
		t.Fatalf("after long polls on %d unused namespaces the queue holds %d namespace records and %d waiter lists", 5*MaxFetchNamespaces, n, w)
	}
	ft, payload := fetch(make([]string, MaxFetchNamespaces+1))
	var e h3xpb.Error
	if ft != FrameError || proto.Unmarshal(payload, &e) != nil || ErrorCode(e.GetCode()) != CodeInvalidArgument {
		t.Fatalf("a fetch naming %d namespaces answered %v %v, want INVALID_ARGUMENT", MaxFetchNamespaces+1, ft, e.GetCode())
	}
}

// leaseWireSize bounds a Delivery's encoding from above, for events of every
// shape (many tiny metadata entries included): the server cuts batches by
// it, so that a batch of twice the client's max_bytes fits its frame.
func TestLeaseWireSizeIsAnUpperBound(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	str := func(n int) string {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte('a' + rng.IntN(26))
		}
		return string(b)
	}
	for i := range 2000 {
		ev := Event{ID: str(rng.IntN(130)), Namespace: str(1 + rng.IntN(128)), Type: str(rng.IntN(40)), Message: str(rng.IntN(300)),
			Data: make([]byte, rng.IntN(70000)), Time: time.Unix(rng.Int64N(1<<40), rng.Int64N(1e9))}
		if n := rng.IntN(4); n > 0 {
			ev.Metadata = map[string]string{}
			for range rng.IntN([]int{1, 5, 200, 3000}[n]) {
				ev.Metadata[str(1+rng.IntN(4))+str(rng.IntN(200)%3)] = str(rng.IntN([]int{1, 3, 300}[rng.IntN(3)]))
			}
		}
		l := Lease{Event: ev, Attempt: 1 + rng.IntN(1<<20), Deadline: time.Now().Add(time.Hour)}
		enc := proto.Size(batchFromLeases(1, []Lease{l})) // the Delivery within its batch (request id 1)
		if est := leaseWireSize(&l); enc > est {
			t.Fatalf("event %d: encoded %d bytes, estimate %d (metadata %d entries)", i, enc, est, len(ev.Metadata))
		}
	}
}
