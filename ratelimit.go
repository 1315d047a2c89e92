package h3x

import (
	"math"
	"strconv"
	"sync"
	"time"
)

// tokenBucket is a token bucket: it holds up to burst tokens and gains rate
// tokens per second; publishing an event takes one token.
type tokenBucket struct {
	mu     sync.Mutex
	rate   float64 // tokens per second
	burst  float64
	tokens float64
	last   time.Time // of the last refill (for limiters' buckets, the last take)
}

func newTokenBucket(rate float64, burst int, now time.Time) *tokenBucket {
	b := float64(max(burst, 1))
	return &tokenBucket{rate: rate, burst: b, tokens: b, last: now}
}

func (b *tokenBucket) refill(now time.Time) {
	if dt := now.Sub(b.last); dt > 0 {
		b.tokens = math.Min(b.burst, b.tokens+dt.Seconds()*b.rate)
		b.last = now
	}
}

// take takes up to n whole tokens and returns how many it took; when it
// took fewer than n it also returns how long until the next token.
func (b *tokenBucket) take(now time.Time, n int) (int, time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refill(now)
	got := min(n, int(b.tokens))
	b.tokens -= float64(got)
	if got == n {
		return got, 0
	}
	if b.tokens >= 1 {
		return got, time.Millisecond
	}
	// In float first: at a tiny rate the wait would overflow a Duration.
	wait := (1 - (b.tokens - math.Floor(b.tokens))) / b.rate * float64(time.Second)
	return got, time.Duration(min(max(wait, float64(time.Millisecond)), float64(maxRetryAfter)))
}

// maxRetryAfter bounds the retry-after of a refusal by a rate limit (reached
// only by rates below one event in an hour).
const maxRetryAfter = time.Hour

// giveBack returns n tokens taken but not used.
func (b *tokenBucket) giveBack(n int) {
	b.mu.Lock()
	b.tokens = math.Min(b.burst, b.tokens+float64(n))
	b.mu.Unlock()
}

// RateLimit is a publish limit: Rate events per second with bursts of up
// to Burst events (default: Rate rounded up, at least 1). Rate is at most
// MaxRate.
type RateLimit struct {
	Rate  float64 // events (or connections) per second; 0: no limit
	Burst int     // the most at once; 0: the default
}

// MaxRate is the largest rate a RateLimit or a registry grant may set, in
// events (or connections) per second: far above what one server can do,
// and small enough that a default burst (one second's worth) is an int.
const MaxRate = 1e9

// defaultBurst is the burst of a limit of rate without one of its own: one
// second's worth, at least 1.
func defaultBurst(rate float64) int {
	return max(int(math.Ceil(capRate(rate))), 1)
}

// capRate is rate, or MaxRate for a larger one (or +Inf, or NaN), which a
// custom Registry may return.
func capRate(rate float64) float64 {
	if !(rate < MaxRate) {
		return MaxRate
	}
	return rate
}

// WithRateLimit limits publishing to namespace, over all clients of this
// server, to l (events over it are refused with CodeRateLimited and a
// RateLimitNotice). Namespace "*" sets the limit of every namespace
// without one of its own, each with its own bucket. Registry grants can
// add per-client limits (Grant.Rate). Default: no limits.
func WithRateLimit(namespace string, l RateLimit) ServerOption {
	return serverOptionFunc(func(c *serverConfig) {
		if c.rateLimits == nil {
			c.rateLimits = make(map[string]RateLimit)
		}
		c.rateLimits[namespace] = l
	})
}

// limiters holds the server's token buckets, made on first use. Buckets
// that have been full and unused for bucketIdle are dropped once there are
// many (a full bucket is what a new one starts as), so namespaces and
// clients that come and go, under a "*" limit, do not accumulate.
type limiters struct {
	cfg       map[string]RateLimit
	mu        sync.Mutex
	buckets   map[string]*tokenBucket
	nextSweep int // the bucket count that triggers the next sweep
}

const (
	bucketIdle     = time.Minute
	bucketSweepMin = 4096
)

func (l *limiters) bucket(key string, rate float64, burst int, now time.Time) *tokenBucket {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[key]
	if b == nil {
		rate = capRate(rate)
		if burst <= 0 {
			burst = defaultBurst(rate)
		}
		b = newTokenBucket(rate, burst, now)
		if l.buckets == nil {
			l.buckets = make(map[string]*tokenBucket)
		}
		if len(l.buckets) >= max(l.nextSweep, bucketSweepMin) {
			l.sweep(now)
		}
		l.buckets[key] = b
	}
	return b
}

// sweep drops the buckets that are full and unused for bucketIdle. l.mu is
// held.
func (l *limiters) sweep(now time.Time) {
	for key, b := range l.buckets {
		b.mu.Lock()
		idle := now.Sub(b.last) >= bucketIdle && b.tokens+now.Sub(b.last).Seconds()*b.rate >= b.burst
		b.mu.Unlock()
		if idle {
			delete(l.buckets, key)
		}
	}
	l.nextSweep = 2 * len(l.buckets)
}

// allow decides how many of n events client may publish to ns now; when
// fewer than n, it also says when to retry and which limit applied.
func (l *limiters) allow(sess *Session, ns string, n int, now time.Time) (int, time.Duration, RateLimit) {
	var buckets []*tokenBucket
	var limits []RateLimit
	if lim, ok := l.cfg[ns]; ok {
		buckets = append(buckets, l.bucket("ns\x00"+ns, lim.Rate, lim.Burst, now))
		limits = append(limits, lim)
	} else if lim, ok := l.cfg["*"]; ok {
		buckets = append(buckets, l.bucket("ns\x00"+ns, lim.Rate, lim.Burst, now))
		limits = append(limits, lim)
	}
	if g, ok := grantRate(sess.Grants, ns); ok {
		buckets = append(buckets, l.bucket(grantBucketKey(sess.ClientID, ns, g), g.Rate, g.Burst, now))
		limits = append(limits, RateLimit{Rate: g.Rate, Burst: g.Burst})
	}
	granted, wait := n, time.Duration(0)
	var applied RateLimit
	for i, b := range buckets {
		got, w := b.take(now, granted)
		for _, prev := range buckets[:i] {
			prev.giveBack(granted - got)
		}
		if got < granted {
			applied = limits[i]
			wait = max(wait, w)
		}
		granted = got
	}
	return granted, wait, applied
}

// grantBucketKey names the bucket of a client's grant limit g on ns. The
// limit is part of the name: a client whose tokens grant different rates
// (ParseRegistry allows several entries per client) gets a bucket per rate,
// each enforcing its own, while its tokens with the same limit (a token
// being rotated) share one.
func grantBucketKey(client, ns string, g Grant) string {
	b := make([]byte, 0, len("client")+len(client)+len(ns)+32)
	b = append(b, "client\x00"...)
	b = append(b, client...)
	b = append(b, 0)
	b = append(b, ns...)
	b = append(b, 0)
	b = strconv.AppendFloat(b, g.Rate, 'g', -1, 64)
	b = append(b, ':')
	b = strconv.AppendInt(b, int64(g.Burst), 10)
	return string(b)
}

// grantRate finds the rate limit of the grant for ns: an exact grant first,
// then "*".
func grantRate(g Grants, ns string) (Grant, bool) {
	var wild Grant
	found := false
	for _, gr := range g {
		if gr.Rate <= 0 || gr.Permission&PermPublish == 0 {
			continue
		}
		if gr.Namespace == ns {
			return gr, true
		}
		if gr.Namespace == "*" {
			wild, found = gr, true
		}
	}
	return wild, found
}
