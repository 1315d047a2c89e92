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
	got, wait, _ := takeAll(now, n, b)
	return got, wait
}

// takeAll takes the same number of whole tokens, up to n, from every bucket
// of buckets: as many as the emptiest has. It decides under all their locks
// at once (taken in the order given; callers give buckets of different
// kinds in one fixed order), so nobody else ever sees tokens taken here and
// then given back. When it took fewer than n it also returns how long until
// every bucket has a token again, and the index of the bucket that holds
// the retry back longest (the limit that applied).
func takeAll(now time.Time, n int, buckets ...*tokenBucket) (int, time.Duration, int) {
	for _, b := range buckets {
		b.mu.Lock()
	}
	defer func() {
		for _, b := range buckets {
			b.mu.Unlock()
		}
	}()
	got := n
	for _, b := range buckets {
		b.refill(now)
		got = min(got, int(b.tokens))
	}
	for _, b := range buckets {
		b.tokens -= float64(got)
	}
	if got == n {
		return got, 0, -1
	}
	var wait time.Duration
	binding := 0
	for i, b := range buckets {
		if w := b.untilToken(); w > wait {
			wait, binding = w, i
		}
	}
	return got, max(wait, time.Millisecond), binding
}

// untilToken is how long until b holds a whole token; 0 if it does. b.mu
// is held.
func (b *tokenBucket) untilToken() time.Duration {
	if b.tokens >= 1 {
		return 0
	}
	// In float first: at a tiny rate the wait would overflow a Duration.
	wait := (1 - b.tokens) / b.rate * float64(time.Second)
	return time.Duration(min(max(wait, float64(time.Millisecond)), float64(maxRetryAfter)))
}

// limit is the limit b enforces: its rate and its burst (the default one
// if the limit set none).
func (b *tokenBucket) limit() RateLimit {
	return RateLimit{Rate: b.rate, Burst: int(b.burst)}
}

// maxRetryAfter bounds the retry-after of a refusal by a rate limit (reached
// only by rates below one event in an hour).
const maxRetryAfter = time.Hour

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
// fewer than n, it also says when to retry (when every limit that applies
// has room for one more event) and which limit held it back longest, as it
// is enforced (its default burst if it set none). The namespace's bucket
// and the client's are decided together (takeAll, the namespace's first),
// so a client over its own limit never holds the namespace's tokens, not
// even for a moment, from clients under it.
func (l *limiters) allow(sess *Session, ns string, n int, now time.Time) (int, time.Duration, RateLimit) {
	buckets := make([]*tokenBucket, 0, 2)
	if lim, ok := l.cfg[ns]; ok {
		buckets = append(buckets, l.bucket("ns\x00"+ns, lim.Rate, lim.Burst, now))
	} else if lim, ok := l.cfg["*"]; ok {
		buckets = append(buckets, l.bucket("ns\x00"+ns, lim.Rate, lim.Burst, now))
	}
	if g, ok := grantRate(sess.Grants, ns); ok {
		buckets = append(buckets, l.bucket(grantBucketKey(sess.ClientID, ns, g), g.Rate, g.Burst, now))
	}
	if len(buckets) == 0 {
		return n, 0, RateLimit{}
	}
	granted, wait, binding := takeAll(now, n, buckets...)
	if granted == n {
		return n, 0, RateLimit{}
	}
	return granted, wait, buckets[binding].limit()
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
