package h3x

import (
	"context"
	"math"
	"strings"
	"testing"
	"time"
)

// TestRateAboveMaxRate: a default burst used to be int(math.Ceil(rate)),
// which overflows to a negative number above 2^63, and the limiter then
// fell back to a bucket of one token: a limit meant to be practically
// unlimited let one event per request through. Rates above MaxRate are now
// refused where they are configured, and a custom Registry's grant of one
// is treated as MaxRate.
func TestRateAboveMaxRate(t *testing.T) {
	for _, text := range []string{"a:orders/pub@1e19=tok", "a:orders/pub@2e9=tok", "a:orders/pub@inf=tok"} {
		if _, err := ParseRegistry(text); err == nil || !strings.Contains(err.Error(), "at most 1e9") {
			t.Errorf("ParseRegistry(%q) = %v, want an error about the maximum rate", text, err)
		}
	}
	if _, err := ParseRegistry("a:orders/pub@1e9=tok"); err != nil {
		t.Errorf("ParseRegistry at MaxRate: %v", err)
	}
	for _, opt := range []ServerOption{
		WithRateLimit("orders", RateLimit{Rate: 1e19}),
		WithRateLimit("orders", RateLimit{Rate: math.Inf(1)}),
		WithConnectionRate(RateLimit{Rate: 1e19}),
		WithConnectionRatePerIP(RateLimit{Rate: math.NaN()}),
	} {
		if s, err := NewServer(WithAddr("127.0.0.1:0"), opt); err == nil {
			s.Close()
			t.Errorf("NewServer accepted a rate above MaxRate")
		}
	}
	var l limiters
	sess := &Session{ClientID: "a", Grants: Grants{{Namespace: "orders", Permission: PermPublish, Rate: 1e19}}}
	if got, _, _ := l.allow(sess, "orders", 100, time.Unix(1700000000, 0)); got != 100 {
		t.Errorf("a custom registry's grant of 1e19 events/s let %d of 100 events through", got)
	}
	for _, rate := range []float64{math.Inf(1), math.NaN()} {
		var l limiters
		sess := &Session{ClientID: "a", Grants: Grants{{Namespace: "orders", Permission: PermPublish, Rate: rate}}}
		now := time.Unix(1700000000, 0)
		for i := range 3 {
			if got, _, _ := l.allow(sess, "orders", 100, now.Add(time.Duration(i)*time.Millisecond)); got != 100 {
				t.Errorf("a custom registry's grant of %v events/s let %d of 100 events through (call %d)", rate, got, i+1)
			}
		}
	}
	if b := burstOf(RateLimit{Rate: 1e19}); b != int(MaxRate) {
		t.Errorf("burstOf(1e19) = %d, want %d", b, int(MaxRate))
	}
}

// TestGrantRatePerToken: a client may have several entries with
// different tokens (ParseRegistry), each with its own rate. The limiter
// used to key a grant's bucket by client id and namespace only, so
// whichever token's session published first fixed the rate for every other
// token of that client: the token granted 1000 events/s got 1 event/s.
func TestGrantRatePerToken(t *testing.T) {
	r, err := ParseRegistry("svc:orders/pub@1:1=slow-token, svc:orders/pub@1000:1000=fast-token")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	slowG, err := r.Authenticate(ctx, "svc", "slow-token")
	if err != nil {
		t.Fatal(err)
	}
	fastG, err := r.Authenticate(ctx, "svc", "fast-token")
	if err != nil {
		t.Fatal(err)
	}
	var l limiters
	now := time.Unix(1700000000, 0)
	if got, _, _ := l.allow(&Session{ClientID: "svc", Grants: slowG}, "orders", 1, now); got != 1 {
		t.Fatalf("slow token: %d of 1 allowed", got)
	}
	got, _, lim := l.allow(&Session{ClientID: "svc", Grants: fastG}, "orders", 100, now)
	if got != 100 {
		t.Errorf("token granted 1000 events/s burst 1000: %d of 100 events allowed (limit reported: %+v)", got, lim)
	}

	// Two tokens with the same limit (one being rotated) share a bucket:
	// rotating a token does not double the client's rate.
	r, err = ParseRegistry("svc:orders/pub@10:10=old-token, svc:orders/pub@10:10=new-token")
	if err != nil {
		t.Fatal(err)
	}
	oldG, _ := r.Authenticate(ctx, "svc", "old-token")
	newG, _ := r.Authenticate(ctx, "svc", "new-token")
	var shared limiters
	if got, _, _ := shared.allow(&Session{ClientID: "svc", Grants: oldG}, "orders", 10, now); got != 10 {
		t.Fatalf("old token: %d of 10 allowed", got)
	}
	if got, _, _ := shared.allow(&Session{ClientID: "svc", Grants: newG}, "orders", 10, now); got != 0 {
		t.Errorf("new token with the same limit: %d of 10 allowed after the old token used the burst, want 0", got)
	}
}

// TestRetryAfterTinyRate: at a rate of one event in 10^12 seconds the wait
// for the next token overflowed time.Duration and came out as the 1 ms
// floor, so a client told to retry did so every millisecond.
func TestRetryAfterTinyRate(t *testing.T) {
	now := time.Unix(1700000000, 0)
	for _, rate := range []float64{1e-12, 1e-4, 0.5} {
		b := newTokenBucket(rate, 1, now)
		if got, _ := b.take(now, 1); got != 1 {
			t.Fatalf("rate %g: the first event was refused", rate)
		}
		got, wait := b.take(now, 1)
		want := time.Duration(min(float64(time.Second)/rate, float64(time.Hour))) // maxRetryAfter
		if got != 0 || wait < want-time.Millisecond || wait > want+time.Millisecond {
			t.Errorf("rate %g: took %d, retry after %v, want 0 and %v", rate, got, wait, want)
		}
	}
}
