package h3x

import (
	"math"
	"math/rand/v2"
	"time"
)

// Backoff decides how long a client waits before a reconnect attempt.
// Implementations must be safe for concurrent use.
type Backoff interface {
	// Delay returns the wait before reconnect attempt n (1 for the first
	// attempt after a connection loss).
	Delay(attempt int) time.Duration
}

// BackoffFunc adapts a function to Backoff.
type BackoffFunc func(attempt int) time.Duration

// Delay returns f(attempt).
func (f BackoffFunc) Delay(attempt int) time.Duration { return f(attempt) }

// ExponentialBackoff waits min(Max, Initial × Multiplier^(attempt-1)),
// randomized by full jitter unless NoJitter: a uniformly random duration in
// [0, that bound).
type ExponentialBackoff struct {
	Initial    time.Duration // the first attempt's bound
	Max        time.Duration // the largest bound
	Multiplier float64       // growth per attempt (at least 1)
	NoJitter   bool          // wait the bound itself instead of a random part of it

	rand func() float64 // uniform in [0, 1); nil means math/rand/v2
}

// DefaultBackoff returns the client's default policy: full jitter over an
// exponential from 100 ms to 10 s, doubling per attempt.
func DefaultBackoff() *ExponentialBackoff {
	return &ExponentialBackoff{Initial: 100 * time.Millisecond, Max: 10 * time.Second, Multiplier: 2}
}

// Bound returns the upper bound of attempt's delay.
func (b *ExponentialBackoff) Bound(attempt int) time.Duration {
	if attempt < 1 {
		attempt = 1
	}
	m := max(b.Multiplier, 1)
	d := float64(b.Initial) * math.Pow(m, float64(attempt-1))
	if b.Max > 0 && d > float64(b.Max) {
		return b.Max
	}
	if d > math.MaxInt64/2 {
		return math.MaxInt64 / 2
	}
	return time.Duration(d)
}

// Delay returns attempt's delay.
func (b *ExponentialBackoff) Delay(attempt int) time.Duration {
	bound := b.Bound(attempt)
	if b.NoJitter || bound <= 0 {
		return bound
	}
	r := rand.Float64
	if b.rand != nil {
		r = b.rand
	}
	return time.Duration(r() * float64(bound))
}
