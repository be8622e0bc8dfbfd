package delivery

import (
	"math/rand/v2"
	"time"
)

// Backoff is the wait before the retry that follows failed attempt n (1 for
// the first attempt): base·2^(n-1), ±20% jitter, capped at max (the cap is
// applied after the jitter, so no wait exceeds it).
func Backoff(base, max time.Duration, n int) time.Duration {
	if n < 1 {
		n = 1
	}
	d := base
	for i := 1; i < n && d < max; i++ {
		d *= 2
	}
	d = min(d, max)
	jitter := 0.8 + 0.4*rand.Float64()
	return min(time.Duration(float64(d)*jitter), max)
}
