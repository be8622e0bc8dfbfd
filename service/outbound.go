package service

import (
	"fmt"
	"strings"
	"time"

	"rendezvous/auth"
	"rendezvous/delivery"
	"rendezvous/engine"
	"rendezvous/graph/scalar"
)

// OutboundConfig is HTTP dispatch's configuration.
type OutboundConfig struct {
	// Allowed: RENDEZVOUS_OUTBOUND_ALLOWED, comma-separated URL prefixes.
	Allowed string
	// SigningSecrets: RENDEZVOUS_SIGNING_SECRET, comma-separated; the first
	// signs, every one adds its v1= (rotation).
	SigningSecrets []string
	// Delivery: timeouts, concurrency, poll (Allow, Sign, Logger and
	// Observer are filled in by New).
	Delivery delivery.Config
}

func outboundFromEnv(getenv func(string) string, cfg *Config) []error {
	var errs []error
	cfg.Outbound.Allowed = getenv("RENDEZVOUS_OUTBOUND_ALLOWED")
	for _, s := range strings.Split(getenv("RENDEZVOUS_SIGNING_SECRET"), ",") {
		if s = strings.TrimSpace(s); s != "" {
			cfg.Outbound.SigningSecrets = append(cfg.Outbound.SigningSecrets, s)
		}
	}
	dur := func(name string, dst *time.Duration) {
		if v := getenv(name); v != "" {
			d, err := scalar.ParseDuration(v)
			if err != nil || d <= 0 {
				errs = append(errs, fmt.Errorf("%s %q: want a positive duration such as 500ms, 1s or 10m", name, v))
				return
			}
			*dst = d
		}
	}
	dur("RENDEZVOUS_OUTBOUND_RETRY_BASE", &cfg.Engine.Outbound.RetryBase)
	dur("RENDEZVOUS_OUTBOUND_RETRY_MAX", &cfg.Engine.Outbound.RetryMax)
	dur("RENDEZVOUS_OUTBOUND_TIMEOUT", &cfg.Outbound.Delivery.Timeout)
	return errs
}

// prepareOutbound readies the delivery loop over the engine. Without an
// allow-list there is nothing to deliver to (trigger refuses dispatch), so
// the loop still runs, to fail rows an older configuration allowed.
func prepareOutbound(cfg *Config, authn *auth.Authenticator) (build func(*engine.Engine) *delivery.Deliverer, err error) {
	allow, err := delivery.ParseAllowList(cfg.Outbound.Allowed)
	if err != nil {
		return nil, err
	}
	dc := cfg.Outbound.Delivery
	dc.Allow, dc.Logger = allow, cfg.Logger
	if !allow.Empty() {
		signer, err := auth.NewDeliverySigner(cfg.Outbound.SigningSecrets)
		if err != nil {
			return nil, fmt.Errorf("RENDEZVOUS_OUTBOUND_ALLOWED is set, so dispatches must be signed: %w", err)
		}
		dc.Sign = signer.Sign
	}
	cfg.Engine.Outbound.Allow = allow
	cfg.Engine.Outbound.RunToken = func(runID string, now time.Time) (string, bool) {
		tok, _, ok := authn.RunToken(runID, now)
		return tok, ok
	}
	var d *delivery.Deliverer
	cfg.Engine.Outbound.Written = func() {
		if d != nil {
			d.Wake()
		}
	}
	// The loop is built once the engine exists (it is the loop's source);
	// that happens before anything is served, so Written never sees d
	// change.
	return func(eng *engine.Engine) *delivery.Deliverer {
		d = delivery.New(eng, dc)
		return d
	}, nil
}
