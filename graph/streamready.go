package graph

import (
	"context"
	"sync/atomic"
)

// A gqlgen subscription is a channel the transport reads; gqlgen's own
// transports park a goroutine per operation on that read. Ours does not: it
// puts a streamReady in the operation's context, and a resolver that knows
// when its stream is complete (waitForEvent sends at most one value, then
// closes) arms it before returning its channel and fires it once the
// channel is closed. The transport then reads the whole stream without
// blocking, on a goroutine of its own only for that moment. A resolver that
// does not arm it is read by a goroutine that waits, as in gqlgen.

type streamReadyKey struct{}

type streamReady struct {
	armed atomic.Bool
	fire  func()
}

// withStreamReady returns ctx carrying fire, to be called once the stream of
// the operation run with ctx is closed, if its resolver arms it.
func withStreamReady(ctx context.Context, fire func()) (context.Context, *streamReady) {
	s := &streamReady{fire: fire}
	return context.WithValue(ctx, streamReadyKey{}, s), s
}

// armStreamReady tells the transport that the resolver will call the
// returned function once its channel is closed; nil when the transport
// does not listen (it reads the channel the blocking way).
func armStreamReady(ctx context.Context) func() {
	s, _ := ctx.Value(streamReadyKey{}).(*streamReady)
	if s == nil {
		return nil
	}
	s.armed.Store(true)
	return s.fire
}

// Armed tells whether the resolver promised to fire.
func (s *streamReady) Armed() bool { return s.armed.Load() }
