// Origins: CORS and the websocket origin check.

package graph

import (
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// origins answers CORS for HTTP and refuses cross-origin websocket upgrades
// whose Origin is not allowed. Same-origin requests and clients that send no
// Origin (servers, CLIs) always pass: CORS protects browsers' users, and
// browsers always send Origin across origins.
type origins struct {
	any     bool
	allowed map[string]bool
}

func newOrigins(list []string) origins {
	o := origins{allowed: map[string]bool{}}
	for _, s := range list {
		s = strings.TrimRight(strings.TrimSpace(s), "/")
		switch s {
		case "":
		case "*":
			o.any = true
		default:
			o.allowed[strings.ToLower(s)] = true
		}
	}
	return o
}

func (o origins) ok(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" || o.any || o.allowed[strings.ToLower(origin)] {
		return true
	}
	u, err := url.Parse(origin)
	return err == nil && strings.EqualFold(u.Host, r.Host)
}

func (o origins) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		origin := r.Header.Get("Origin")
		if !o.ok(r) {
			writeError(w, r, http.StatusForbidden, codeForbidden, "origin %s is not allowed (RENDEZVOUS_ALLOWED_ORIGINS)", strconv.Quote(origin))
			return
		}
		if origin != "" {
			w.Header().Add("Vary", "Origin")
			w.Header().Set("Access-Control-Allow-Origin", origin)
			w.Header().Set("Access-Control-Expose-Headers", "X-Request-Id, Retry-After")
			if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
				w.Header().Set("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
				w.Header().Set("Access-Control-Allow-Headers", "Authorization, Content-Type, Accept, X-Request-Id")
				w.Header().Set("Access-Control-Max-Age", "600")
				w.WriteHeader(http.StatusNoContent)
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}
