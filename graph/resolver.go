// Package graph is the GraphQL layer: gqlgen resolvers that parse
// arguments, call the engine and shape its results, plus the HTTP handler
// with its transports. It holds no business rule and no SQL.
package graph

//go:generate go run github.com/99designs/gqlgen generate

import (
	"log/slog"

	"rendezvous/engine"
)

// Resolver holds the resolvers' dependencies.
type Resolver struct {
	Engine *engine.Engine
	Log    *slog.Logger
}
