package h3x

import (
	"testing"
	"time"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// readNotice reads the control stream until a RateLimitNotice.
func (rc *rawConn) readNotice(t *testing.T) *h3xpb.RateLimitNotice {
	t.Helper()
	rc.ctrl.SetReadDeadline(time.Now().Add(5 * time.Second))
	fr := newFrameReader(rc.ctrl, DefaultMaxFrameSize)
	for range 10 {
		ft, payload, err := fr.next()
		if err != nil {
			t.Fatalf("control stream: %v", err)
		}
		if ft == FrameRateLimitNotice {
			var n h3xpb.RateLimitNotice
			if err := unmarshalPayload(ft, payload, &n); err != nil {
				t.Fatal(err)
			}
			return &n
		}
	}
	t.Fatal("no RateLimitNotice")
	return nil
}

// payloads returns n empty events of namespace ns.
func payloads(n int, ns string) []*h3xpb.EventPayload {
	evs := make([]*h3xpb.EventPayload, n)
	for i := range evs {
		evs[i] = &h3xpb.EventPayload{Namespace: ns}
	}
	return evs
}

func (rc *rawConn) send(t *testing.T, rid uint64, evs ...*h3xpb.EventPayload) *h3xpb.SendResult {
	t.Helper()
	ft, payload, err := rc.request(frameBytes(t, FrameSendEvent, &h3xpb.SendEvent{RequestId: rid, Events: evs}), DefaultMaxFrameSize)
	if err != nil {
		t.Fatal(err)
	}
	var res h3xpb.SendResult
	if err := unmarshalPayload(ft, payload, &res); err != nil {
		t.Fatalf("%v: %v", ft, err)
	}
	return &res
}

// §3.4: RateLimitNotice.burst is the burst the server enforces: a limit
// configured without a Burst (WithRateLimit's default: Rate rounded up)
// used to be announced with burst 0 (RELIABILITY.md finding 95).
func TestRateLimitNoticeCarriesTheEnforcedBurst(t *testing.T) {
	s := testServer(t, WithRateLimit("orders", RateLimit{Rate: 5}))
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	res := rc.send(t, 1, payloads(8, "orders")...)
	stored := 0
	for _, o := range res.GetOutcomes() {
		if o.GetStatus() == h3xpb.PublishStatus_PUBLISH_STATUS_STORED {
			stored++
		}
	}
	n := rc.readNotice(t)
	t.Logf("stored %d of 8; notice %v", stored, n)
	if int(n.GetBurst()) != stored {
		t.Fatalf("RateLimitNotice burst %d; the server let a burst of %d events through", n.GetBurst(), stored)
	}
}

// §3.4/§6.2: retry_after_ms says how long to wait before retrying. With a
// namespace limit (slow refill, big burst) and a client grant limit (fast
// refill, burst 1), a SendEvent over both used to be refused with the
// retry-after the namespace bucket computed before the grant bucket gave
// its tokens back: 10 s, though a retry 50 ms later was stored
// (RELIABILITY.md finding 94).
func TestRateLimitRetryAfterOfTwoLimits(t *testing.T) {
	s := testServerWith(t, "alice:orders@100:1=alice-token", WithRateLimit("orders", RateLimit{Rate: 0.1, Burst: 100}))
	rc := rawDial(t, s)
	rc.auth("alice", "alice-token")
	res := rc.send(t, 1, payloads(101, "orders")...)
	var retry uint32
	for _, o := range res.GetOutcomes() {
		if o.GetStatus() == h3xpb.PublishStatus_PUBLISH_STATUS_REFUSED {
			retry = o.GetRetryAfterMs()
		}
	}
	n := rc.readNotice(t)
	time.Sleep(50 * time.Millisecond)
	again := rc.send(t, 2, &h3xpb.EventPayload{Namespace: "orders"})
	ok := again.GetOutcomes()[0].GetStatus() == h3xpb.PublishStatus_PUBLISH_STATUS_STORED
	t.Logf("retry_after_ms %d; notice %v; retry after 50 ms stored: %v", retry, n, ok)
	if ok && retry > 1000 {
		t.Fatalf("refused with retry_after_ms %d (notice: limit %g/s burst %d, retry_after_ms %d), yet a retry 50 ms later was stored", retry, n.GetLimit(), n.GetBurst(), n.GetRetryAfterMs())
	}
}

// §8: events under a namespace's limit are not refused. A client over its
// own grant limit used to take its whole request's worth from the namespace
// bucket before its grant bucket refused it, and only then give the tokens
// back: meanwhile another client, well within the namespace's limit, was
// refused RATE_LIMITED (RELIABILITY.md finding 93).
func TestGrantLimitedClientDoesNotStarveNamespace(t *testing.T) {
	now := time.Now()
	l := &limiters{cfg: map[string]RateLimit{"orders": {Rate: 0.001, Burst: 1000}}}
	greedy := &Session{ClientID: "greedy", Grants: Grants{{Namespace: "orders", Permission: PermAll, Rate: 0.001, Burst: 1}}}
	calm := &Session{ClientID: "calm", Grants: Grants{{Namespace: "orders", Permission: PermAll}}}
	l.allow(greedy, "orders", 1, now) // the greedy client's grant bucket is now empty
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 2_000_000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if got, _, _ := l.allow(greedy, "orders", 5000, now); got != 0 {
				panic("greedy client allowed")
			}
		}
	}()
	refused := 0
	const calls = 200 // 200 events: the namespace has 999 tokens
	for i := 0; i < calls; i++ {
		if got, _, _ := l.allow(calm, "orders", 1, now); got == 0 {
			refused++
		}
		time.Sleep(100 * time.Microsecond)
	}
	close(stop)
	<-done
	if refused > 0 {
		t.Fatalf("%d of %d single-event publishes refused RATE_LIMITED by a namespace bucket holding ~999 of its 1000 tokens", refused, calls)
	}
}
