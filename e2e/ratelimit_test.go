package e2e

// Rate limits per kind of caller, per token, and per client behind trusted
// proxies.

import (
	"bytes"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/graph"
	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// rlDefaults takes the rate limits ConfigFromEnv gives with env set.
func rlDefaults(t *testing.T, env map[string]string) func(*service.Config) {
	d, err := service.ConfigFromEnv(func(k string) string { return env[k] })
	require.NoError(t, err)
	return func(c *service.Config) {
		c.HTTP.RateLimit, c.HTTP.RateBurst = d.HTTP.RateLimit, d.HTTP.RateBurst
		c.HTTP.ServerRateLimit, c.HTTP.ServerRateBurst = d.HTTP.ServerRateLimit, d.HTTP.ServerRateBurst
		c.HTTP.TrustedProxies = d.HTTP.TrustedProxies
		if len(d.Auth.ServerTokens) > 0 {
			c.Auth.ServerTokens = d.Auth.ServerTokens
		}
	}
}

// rlBatch is one mutation of n aliased broadcast notifies (n mutations).
func rlBatch(n int) string {
	var q strings.Builder
	q.WriteString("mutation($ev: String!) { ")
	for i := range n {
		fmt.Fprintf(&q, "n%d: notify(eventId: $ev, eventData: %d) { eventId } ", i, i)
	}
	q.WriteString("}")
	return q.String()
}

// rlPost posts as a client: a token ("" for none) and X-Forwarded-For
// values (none: not sent).
func rlPost(t *testing.T, e *env, token, query string, vars map[string]any, xff ...string) secResp {
	t.Helper()
	h := secJSONHeader(token)
	for _, v := range xff {
		h.Add("X-Forwarded-For", v)
	}
	return secHTTP(t, http.MethodPost, e.endpoint, h, bytes.NewReader(secBody(t, query, vars)))
}

// The defaults: a server token is not limited (a backend sending 1,000
// mutations at once is not throttled, where the old 200/s burst 400 for
// every caller refused it), an anonymous caller is.
func TestRateLimitDefaults(t *testing.T) {
	const token = "backend-token-0123456789"
	e := newEnv(t, testdb.SQLite(t), rlDefaults(t, map[string]string{"RENDEZVOUS_TOKENS": token}))
	batch := rlBatch(50)
	for i := range 20 {
		r := rlPost(t, e, token, batch, map[string]any{"ev": uid("rl-srv")})
		require.Equal(t, http.StatusOK, r.Status, "server token, batch %d (%d mutations so far): %s", i, i*50, r.Body)
		require.Empty(t, r.R.Errors, r.Body)
	}

	open := newEnv(t, testdb.SQLite(t), rlDefaults(t, nil))
	// All 20 batches at once, as the message below says: sent one after
	// another, a slow machine (SQLite under -race on a loaded CI host) takes
	// longer per batch than the bucket needs to refill, and nothing is refused.
	results := make([]secResp, 20)
	var wg sync.WaitGroup
	for i := range results {
		wg.Go(func() { results[i] = rlPost(t, open, "", batch, map[string]any{"ev": uid("rl-anon")}) })
	}
	wg.Wait()
	refused := 0
	for _, r := range results {
		if r.Status == http.StatusTooManyRequests {
			refused++
			secRefused(t, r, http.StatusTooManyRequests, "RATE_LIMITED", "anonymous caller past the default limit")
		}
	}
	require.NotZero(t, refused, "1,000 mutations from one anonymous caller at once: none refused (default %d/s)", service.DefaultRateLimit)
}

// A token's own limit ("<token>;rate=R;burst=B") applies to it alone.
func TestRateLimitPerToken(t *testing.T) {
	const limited, free = "limited-token-0123456789", "free-token-0123456789"
	e := newEnv(t, testdb.SQLite(t), rlDefaults(t, map[string]string{
		"RENDEZVOUS_TOKENS":            limited + ";rate=0.5;burst=2," + free,
		"RENDEZVOUS_SERVER_RATE_LIMIT": "0",
	}))
	for i := range 2 {
		r := rlPost(t, e, limited, secTriggerQuery, map[string]any{"id": uid("pt")})
		require.Empty(t, r.R.Errors, "within the token's burst, %d: %s", i, r.Body)
	}
	r := rlPost(t, e, limited, secTriggerQuery, map[string]any{"id": uid("pt")})
	secRefused(t, r, http.StatusTooManyRequests, "RATE_LIMITED", "past the token's own burst")
	require.Equal(t, "2", r.Header.Get("Retry-After"), "0.5/s: one more in 2 s")
	for i := range 5 {
		r := rlPost(t, e, free, rlBatch(50), map[string]any{"ev": uid("pt-free")})
		require.Empty(t, r.R.Errors, "the other token, batch %d: %s", i, r.Body)
	}
}

// Behind a load balancer every client has the proxy's address. Only a
// trusted proxy's X-Forwarded-For tells them apart; anyone else's is
// ignored, so a client cannot escape its bucket by writing the header.
func TestRateLimitTrustedProxies(t *testing.T) {
	limit := func(c *service.Config) { c.HTTP.RateLimit, c.HTTP.RateBurst = 0.5, 2 }
	trigger := func(e *env, xff ...string) secResp {
		return rlPost(t, e, "", secTriggerQuery, map[string]any{"id": uid("tp")}, xff...)
	}

	// Not a trusted proxy (nothing is): a spoofed header changes nothing.
	e := newEnv(t, testdb.SQLite(t), limit)
	require.Empty(t, trigger(e, "203.0.113.1").R.Errors)
	require.Empty(t, trigger(e, "203.0.113.2").R.Errors)
	secRefused(t, trigger(e, "203.0.113.3"), http.StatusTooManyRequests, "RATE_LIMITED", "a new X-Forwarded-For from an untrusted peer")
	secRefused(t, trigger(e), http.StatusTooManyRequests, "RATE_LIMITED", "the same peer without the header")

	// The test server's peer address is loopback: trust it, as a load
	// balancer's address would be.
	trusted, err := graph.ParseTrustedProxies("127.0.0.1, ::1")
	require.NoError(t, err)
	e = newEnv(t, testdb.SQLite(t), limit, func(c *service.Config) { c.HTTP.TrustedProxies = trusted })
	for _, client := range []string{"203.0.113.1", "203.0.113.2"} {
		for i := range 2 {
			r := trigger(e, client)
			require.Empty(t, r.R.Errors, "client %s, mutation %d, a bucket of its own: %s", client, i, r.Body)
		}
		secRefused(t, trigger(e, client), http.StatusTooManyRequests, "RATE_LIMITED", "client "+client+" past its burst")
	}
	// What a client writes left of what the proxy appended is not believed.
	secRefused(t, trigger(e, "198.51.100.9, 203.0.113.1"), http.StatusTooManyRequests, "RATE_LIMITED", "a spoofed hop before the client's address")
	secRefused(t, trigger(e, "203.0.113.1", "127.0.0.1"), http.StatusTooManyRequests, "RATE_LIMITED", "a chain of trusted proxies")
	// A malformed header counts as the proxy itself.
	require.Empty(t, trigger(e, "not-an-address").R.Errors)
	require.Empty(t, trigger(e, "203.0.113.7, garbage").R.Errors)
	secRefused(t, trigger(e, "203.0.113.8, ???"), http.StatusTooManyRequests, "RATE_LIMITED", "garbage is the proxy's own bucket")

	// A websocket upgraded through the proxy is its client's too.
	for _, proto := range secProtocols {
		client := fmt.Sprintf("203.0.113.%d", 50+len(proto))
		c := mustDial(t, e.endpoint, proto, secHeader("X-Forwarded-For", client))
		c.init(nil)
		for i := range 3 {
			id := fmt.Sprint(i)
			c.subscribe(id, secTriggerQuery, map[string]any{"id": uid("tp-ws")})
			m := c.await(10*time.Second, "the trigger's answer", func(m secMsg) bool {
				return m.ID == id && (m.Type == "next" || m.Type == "data" || m.Type == "error")
			})
			errs := m.errors()
			if i < 2 {
				require.Empty(t, errs, "%s: client %s, mutation %d: %s", proto, client, i, m.Payload)
			} else if len(errs) == 0 || errs[0].Code() != "RATE_LIMITED" {
				t.Fatalf("%s: client %s past its burst: %s", proto, client, m.Payload)
			}
		}
	}
}

// The limiter counts the mutation fields the executor resolves, through
// any nesting of fragments, and not those @skip removes.
func TestRateLimitCountsExecutedFields(t *testing.T) {
	const token = "counted-token-0123456789"
	e := newEnv(t, testdb.SQLite(t), rlDefaults(t, map[string]string{"RENDEZVOUS_TOKENS": token + ";rate=0.001;burst=3"}))
	label := uid("counted")
	runs := func() int {
		r := rlPost(t, e, token, `query($l: String) { workflowRuns(label: $l, first: 100) { nodes { workflowRunId } } }`, map[string]any{"l": label})
		require.Empty(t, r.R.Errors, r.Body)
		return strings.Count(r.Body, "wfr_")
	}
	var four strings.Builder
	for i := range 4 {
		fmt.Fprintf(&four, "t%d: trigger(label: $l) { created } ", i)
	}
	nested := "mutation($l: String) { " + nestInline("Mutation", four.String(), 11) + " }"
	r := rlPost(t, e, token, nested, map[string]any{"l": label})
	secRefused(t, r, http.StatusTooManyRequests, "RATE_LIMITED", "4 triggers inside 11 inline fragments, burst 3")
	require.Zero(t, runs(), "a refused operation ran nothing")

	var skipped strings.Builder
	skipped.WriteString("mutation($l: String, $s: Boolean!) { ")
	for i := range 10 {
		fmt.Fprintf(&skipped, "s%d: trigger(label: $l) @skip(if: $s) { created } ", i)
	}
	skipped.WriteString("... on Mutation { ... @include(if: true) { one: trigger(label: $l) { created } } } }")
	for i := range 3 {
		r := rlPost(t, e, token, skipped.String(), map[string]any{"l": label, "s": true})
		require.Empty(t, r.R.Errors, "request %d: 10 skipped triggers and one executed cost 1: %s", i, r.Body)
	}
	require.Equal(t, 3, runs())
	r = rlPost(t, e, token, skipped.String(), map[string]any{"l": label, "s": true})
	secRefused(t, r, http.StatusTooManyRequests, "RATE_LIMITED", "the fourth executed trigger")
}
