package h3x

// Tests for the security review of the tenth-plus-one session (RELIABILITY.md
// findings 78-81), each of which failed before its fix.

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// Settling an event id without a namespace must not tell a session whether
// an event it may not consume exists: a client with no consume grant at all
// (here publish-only on "audit") must get the same outcome for an id stored
// in "orders" as for an id that exists nowhere. On the reviewed code the
// first is STALE and the second UNKNOWN: an existence oracle across
// tenants, for as long as the event is stored (ids are often meaningful,
// such as order numbers, since publishers set them for deduplication).
func TestSettleWithoutNamespaceRevealsNoForeignEvent(t *testing.T) {
	s := testServerWith(t, "alice:orders=alice-token,eve:audit/pub=eve-token")
	alice := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if res, err := alice.Publish(ctx, Event{ID: "order-42", Namespace: "orders"}); err != nil || res[0].Status != PublishStored {
		t.Fatalf("publish: %v %+v", err, res)
	}

	rc := rawDial(t, s)
	rc.auth("eve", "eve-token")
	ids := []string{"order-42", "order-43"} // stored in orders; stored nowhere
	for _, tc := range []struct {
		name string
		t    FrameType
		m    proto.Message
	}{
		{"ack", FrameAckEvent, &h3xpb.AckEvent{RequestId: 1, EventIds: ids}},
		{"nack", FrameNackEvent, &h3xpb.NackEvent{RequestId: 2, EventIds: ids}},
		{"extend", FrameExtendLease, &h3xpb.ExtendLease{RequestId: 3, EventIds: ids}},
	} {
		st := rc.stream(frameBytes(t, tc.t, tc.m), true)
		var res h3xpb.AckResult
		if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameAckResult, &res); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		out := res.GetOutcomes()
		if len(out) != 2 {
			t.Fatalf("%s: %d outcomes", tc.name, len(out))
		}
		if out[0].GetStatus() != out[1].GetStatus() {
			t.Errorf("%s by a client with no consume grant: %v for an event stored in a foreign namespace, %v for an id stored nowhere: the answer reveals the event exists",
				tc.name, out[0].GetStatus(), out[1].GetStatus())
		}
	}
	// Nothing was changed meanwhile: alice still gets her event.
	if ds, err := alice.Fetch(ctx, 1, "orders"); err != nil || len(ds) != 1 || ds[0].Event.ID != "order-42" {
		t.Fatalf("fetch: %v %v", err, ds)
	}
}

// A registry entry whose token is the SHA-256 of the empty string lets a
// client in with an empty token, although ParseRegistry refuses an empty
// plain token ("After decoding, both must be non-empty") and Auth.token is
// required. A script that hashes an unset variable (echo -n "$TOKEN" |
// sha256sum) writes exactly this entry. Either ParseRegistry must refuse
// it, or authentication with an empty token must fail.
func TestEmptyTokenNeverAuthenticates(t *testing.T) {
	const emptyDigest = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" // SHA-256("")
	text := "alice:orders=sha256:" + emptyDigest
	if _, err := ParseRegistry(text); err == nil || !strings.Contains(err.Error(), "digest of the empty token") {
		t.Fatalf("ParseRegistry(%q): %v; want the digest of the empty token refused", text, err)
	}
	// Whatever the registry: a server refuses an empty token or client id
	// before asking it.
	s := testServerWith(t, "unused:orders=unused", WithRegistry(anyoneRegistry{}))
	for _, cred := range [][2]string{{"alice", ""}, {"", "token"}} {
		rc := rawDial(t, s)
		st, err := rc.qc.OpenStreamSync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		st.Write(frameBytes(t, FrameAuth, &h3xpb.Auth{ClientId: cred[0], Token: cred[1]}))
		if code := rc.closeCode(); code != CodeUnauthenticated {
			t.Fatalf("client %q with token %q: closed with %v; want UNAUTHENTICATED", cred[0], cred[1], code)
		}
	}
	var reg StaticRegistry
	if _, err := reg.Authenticate(context.Background(), "alice", ""); err == nil {
		t.Fatal("StaticRegistry authenticated an empty token")
	}
}

// Acking one's own delivery under another namespace the session may consume
// is answered UNKNOWN and changes nothing in the queue (the lease is still
// held), but the server then forgets the delivery in its unacked count: a
// connection can hold any number of leases despite WithMaxUnacked.
func TestUnknownSettlementDoesNotFreeUnackedRoom(t *testing.T) {
	s := testServer(t, WithMaxUnacked(2), WithMaxUnackedPerSubscription(0))
	pub := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	publishOrders(ctx, t, pub, 6)
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token") // alice may consume orders and orders.dlq
	st := rc.stream(nil, false)
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	fr := newFrameReader(st, DefaultMaxFrameSize)
	held := 0
	for i := range 3 {
		st.Write(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: uint64(10 + i), Namespaces: []string{"orders"}, Limit: 10}))
		var b h3xpb.EventsBatch
		if err := fr.readMessage(FrameEventsBatch, &b); err != nil {
			t.Fatal(err)
		}
		held += len(b.GetEvents())
		if len(b.GetEvents()) == 0 {
			continue
		}
		var ids, wrongNS []string
		for _, d := range b.GetEvents() {
			ids = append(ids, d.GetEvent().GetId())
			wrongNS = append(wrongNS, "orders.dlq")
		}
		st.Write(frameBytes(t, FrameAckEvent, &h3xpb.AckEvent{RequestId: uint64(100 + i), EventIds: ids, Namespaces: wrongNS}))
		var ar h3xpb.AckResult
		if err := fr.readMessage(FrameAckResult, &ar); err != nil {
			t.Fatal(err)
		}
		for _, o := range ar.GetOutcomes() {
			if o.GetStatus() == h3xpb.SettleStatus_SETTLE_STATUS_OK {
				t.Fatalf("ack under the wrong namespace applied: %v", o)
			}
		}
	}
	if held > 2 {
		t.Fatalf("one connection holds %d unsettled leases with WithMaxUnacked(2): acks answered UNKNOWN (wrong namespace) freed room although the leases are still held", held)
	}
}

// Before Auth, a peer should not be able to make the server buffer much
// more than an Auth frame: the server reads Auth with a 64 KiB frame limit
// "so it cannot make the server allocate a full-size frame buffer", yet
// data streams opened before Auth (which the server neither accepts nor
// reads until Auth succeeds) are granted the full initial flow-control
// window, 1 MiB per connection. With up to 1,000 connections waiting to
// authenticate (the default), that is about 1 GiB held for peers without
// credentials.
func TestPreAuthBufferedBytesBounded(t *testing.T) {
	s := testServer(t, WithAuthTimeout(10*time.Second))
	rc := rawDial(t, s)
	if _, err := rc.qc.OpenStreamSync(context.Background()); err != nil { // the control stream: no Auth
		t.Fatal(err)
	}
	chunk := make([]byte, 512<<10)
	var wg sync.WaitGroup
	for range 4 {
		ds, err := rc.qc.OpenStreamSync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		ds.SetWriteDeadline(time.Now().Add(time.Second))
		wg.Add(1)
		go func() {
			defer wg.Done()
			ds.Write(chunk)
		}()
	}
	wg.Wait()
	var taken uint64
	for _, c := range s.connList() {
		select {
		case <-c.authed:
			continue
		default:
		}
		taken += c.qc.ConnectionStats().BytesReceived
	}
	const limit = 256 << 10 // four Auth frames of the pre-Auth maximum
	if taken > limit {
		t.Fatalf("the server took in %d KiB from one connection that never authenticated (limit %d KiB)", taken>>10, limit>>10)
	}
}

// anyoneRegistry lets every client in, with every permission.
type anyoneRegistry struct{}

func (anyoneRegistry) Authenticate(context.Context, string, string) (Grants, error) {
	return Grants{{Namespace: "*", Permission: PermAll}}, nil
}

// Finding 78's fix keeps STALE where it tells nothing new: a connection that
// was delivered the event, whose lease then expired and went to another
// consumer, still learns that its namespace-less ack came too late.
func TestSettleWithoutNamespaceStaleForOwnDelivery(t *testing.T) {
	s := testServer(t, WithAckDeadline(200*time.Millisecond))
	alice := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := alice.Publish(ctx, Event{ID: "order-7", Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	fetch := func(rc *rawConn, rid uint64) int {
		st := rc.stream(frameBytes(t, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: rid, Namespaces: []string{"orders"}, Limit: 1}), true)
		st.SetReadDeadline(time.Now().Add(5 * time.Second))
		var b h3xpb.EventsBatch
		if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameEventsBatch, &b); err != nil {
			t.Fatal(err)
		}
		return len(b.GetEvents())
	}
	first := rawDial(t, s)
	first.auth("bob", "bob-token") // consumes orders and billing only: a restricted session
	if fetch(first, 1) != 1 {
		t.Fatal("first consumer got nothing")
	}
	time.Sleep(300 * time.Millisecond) // the lease expires
	second := rawDial(t, s)
	second.auth("alice", "alice-token")
	if fetch(second, 2) != 1 {
		t.Fatal("second consumer got nothing after the first one's lease expired")
	}
	st := first.stream(frameBytes(t, FrameAckEvent, &h3xpb.AckEvent{RequestId: 3, EventIds: []string{"order-7", "order-8"}}), true)
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	var res h3xpb.AckResult
	if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameAckResult, &res); err != nil {
		t.Fatal(err)
	}
	if got := res.GetOutcomes(); len(got) != 2 || got[0].GetStatus() != h3xpb.SettleStatus_SETTLE_STATUS_STALE || got[1].GetStatus() != h3xpb.SettleStatus_SETTLE_STATUS_UNKNOWN {
		t.Fatalf("late namespace-less ack of its own delivery: %v; want STALE, then UNKNOWN for an id stored nowhere", got)
	}
}
