// Completion URLs: Waiter.completionUrl, and where its absolute base comes
// from. The URL is served by package hooks.

package graph

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"strings"

	"rendezvous/models"
)

// ParsePublicURL checks RENDEZVOUS_PUBLIC_URL: an absolute http(s) URL,
// with a path when the service is served under one, without query,
// fragment or user info. The result has no trailing slash.
func ParsePublicURL(s string) (string, error) {
	u, err := url.Parse(strings.TrimSpace(s))
	switch {
	case err != nil:
		return "", fmt.Errorf("not a URL")
	case u.Scheme != "http" && u.Scheme != "https":
		return "", errors.New("want an http:// or https:// URL")
	case u.Host == "":
		return "", errors.New("the URL names no host")
	case u.User != nil, u.RawQuery != "", u.Fragment != "", u.Opaque != "":
		return "", errors.New("want scheme://host[:port][/path] only (no user, query or fragment)")
	}
	return strings.TrimRight(u.Scheme+"://"+u.Host+u.EscapedPath(), "/"), nil
}

type publicBaseKey struct{}

// withPublicBase records, for Waiter.completionUrl, the base URL clients
// reached this server at: public when set (RENDEZVOUS_PUBLIC_URL), else the
// request's scheme and Host. X-Forwarded-Proto and X-Forwarded-Host are
// believed only from a trusted proxy (RENDEZVOUS_TRUSTED_PROXIES), as for
// client addresses; from anyone else they are ignored.
func withPublicBase(public string, trusted []netip.Prefix, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		base := public
		if base == "" {
			base = requestBase(trusted, r)
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), publicBaseKey{}, base)))
	})
}

func requestBase(trusted []netip.Prefix, r *http.Request) string {
	scheme, host := "http", r.Host
	if r.TLS != nil {
		scheme = "https"
	}
	if peer, err := netip.ParseAddrPort(r.RemoteAddr); err == nil && isTrusted(trusted, peer.Addr().Unmap().WithZone("")) {
		// The first value is what the outermost proxy saw the client ask for.
		if p := strings.ToLower(firstForwarded(r, "X-Forwarded-Proto")); p == "http" || p == "https" {
			scheme = p
		}
		if h := firstForwarded(r, "X-Forwarded-Host"); validHost(h) {
			host = h
		}
	}
	if !validHost(host) {
		return ""
	}
	return scheme + "://" + host
}

func firstForwarded(r *http.Request, name string) string {
	v, _, _ := strings.Cut(r.Header.Get(name), ",")
	return strings.TrimSpace(v)
}

// validHost: a host[:port] as a URL may hold it, nothing that would change
// the URL's meaning (no '/', '@', '?', '#', spaces or escapes).
func validHost(h string) bool {
	if h == "" || len(h) > 255 {
		return false
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == ':' || c == '[' || c == ']' || c == '_') {
			return false
		}
	}
	return true
}

// completionURL is Waiter.completionUrl: a URL for durable waiters, null
// for the others (and when no base URL is known). Only callers with full
// access may read it: it is a credential that notifies.
func (r *Resolver) completionURL(ctx context.Context, w *models.Waiter) (*string, error) {
	if w.WorkflowRunID == nil || w.StepName == nil || r.Hooks == nil || w.ID == "" || w.Deadline.Unix() <= 0 {
		return nil, nil
	}
	if p := principal(ctx); p == nil || !p.FullAccess() {
		return nil, forbidden(errors.New("a run token may not read completionUrl: it is a credential that completes the waiter"))
	}
	base, _ := ctx.Value(publicBaseKey{}).(string)
	if base == "" {
		return nil, nil
	}
	u := base + "/hooks/" + r.Hooks.Sign(w.ID, *w.WorkflowRunID, *w.StepName, w.Deadline)
	return &u, nil
}
