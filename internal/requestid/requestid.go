// Package requestid carries the id of the request being served in its
// context, and stamps it on every log line written with that context, so
// that one request's (or one subscription's) lines can be found together
// and an INTERNAL_SERVER_ERROR quoted by a client leads to its detail.
//
// It must never carry anything but the id: no tokens, no payloads.
package requestid

import (
	"context"
	"log/slog"
)

type key struct{}

// With returns ctx carrying the request id.
func With(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, key{}, id)
}

// From returns the request id ctx carries, or "".
func From(ctx context.Context) string {
	id, _ := ctx.Value(key{}).(string)
	return id
}

// Attr is the name of the log attribute holding the request id.
const Attr = "request_id"

// LogHandler wraps h so that every record logged with a context carrying a
// request id (the *Context methods of slog.Logger) gets a request_id
// attribute. Wrapping a handler it returned returns it unchanged.
func LogHandler(h slog.Handler) slog.Handler {
	if _, ok := h.(handler); ok {
		return h
	}
	return handler{h}
}

type handler struct{ slog.Handler }

func (h handler) Handle(ctx context.Context, r slog.Record) error {
	if ctx != nil {
		if id := From(ctx); id != "" {
			r = r.Clone()
			r.AddAttrs(slog.String(Attr, id))
		}
	}
	return h.Handler.Handle(ctx, r)
}

func (h handler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return handler{h.Handler.WithAttrs(attrs)}
}

func (h handler) WithGroup(name string) slog.Handler {
	return handler{h.Handler.WithGroup(name)}
}
