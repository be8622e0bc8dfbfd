// Package graph is the GraphQL layer: gqlgen resolvers that parse
// arguments, call the engine and shape its results, plus the HTTP handler
// with its transports. It holds no business rule and no SQL.
package graph

//go:generate go run github.com/99designs/gqlgen generate

import (
	"log/slog"
	"time"

	"rendezvous/auth"
	"rendezvous/engine"
	"rendezvous/models"
)

// Resolver holds the resolvers' dependencies.
type Resolver struct {
	Engine *engine.Engine
	Auth   *auth.Authenticator
	Now    func() time.Time
	Log    *slog.Logger
	Rec    Recorder
	// Hooks signs Waiter.completionUrl; nil: it is null.
	Hooks *auth.HookSigner
}

// runToken signs a token for the run, or returns nil when the server has no
// way to sign one.
func (r *Resolver) runToken(runID string) *models.RunToken {
	if r.Auth == nil {
		return nil
	}
	token, expires, ok := r.Auth.RunToken(runID, r.Now())
	if !ok {
		return nil
	}
	return &models.RunToken{Token: token, ExpiresAt: expires}
}
