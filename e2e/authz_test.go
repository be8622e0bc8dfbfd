package e2e

// Authorization of run tokens decided on the fields gqlgen executes: no
// nesting of fragments, directives or operation names may get a run token
// past its run, on any transport.

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
)

// nestInline wraps inner in n inline fragments on typ.
func nestInline(typ, inner string, n int) string {
	return strings.Repeat("... on "+typ+" { ", n) + inner + strings.Repeat(" }", n)
}

// A run token for run A cancelled run B through 11 nested inline fragments
// (the root-field walker stopped looking past 10 levels). Every transport,
// mutations, queries and subscriptions.
func TestSecurityRunTokenNestedFragments(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := secEnv(t, db)
		mine := e.aTrigger(uid("mine"))
		other := e.aTrigger(uid("other"))
		evOtherLB := uid("other-lb")
		require.NotNil(t, e.aNotify(evOtherLB, "secret-of-other", other.ID).Lookback)
		tok := mine.Token

		for _, n := range []int{1, 10, 11, 12} {
			cancelB := "mutation { " + nestInline("Mutation", `cancel(workflowRunId: "`+other.ID+`") { state }`, n) + " }"
			notifyB := "mutation { " + nestInline("Mutation", `notify(eventId: "x", eventData: 1, workflowRunId: "`+other.ID+`") { lookback { id } }`, n) + " }"
			readB := "query { " + nestInline("Query", `workflowRun(workflowRunId: "`+other.ID+`") { state lookbackEvents { eventData } }`, n) + " }"
			listing := "{ " + nestInline("Query", `workflowRuns { nodes { workflowRunId } }`, n) + " }"
			waitB := "subscription { " + nestInline("Subscription", `waitForEvent(eventId: "`+evOtherLB+`", workflowRunId: "`+other.ID+`") { eventData }`, n) + " }"

			for _, q := range []string{cancelB, notifyB, readB, listing} {
				body, _ := json.Marshal(map[string]any{"query": q})
				r := secHTTP(t, http.MethodPost, e.endpoint, secJSONHeader(tok), bytes.NewReader(body))
				secRefused(t, r, 0, "FORBIDDEN", "POST, "+q)
				assert.NotContains(t, r.Body, "secret-of-other")
			}
			for _, q := range []string{readB, listing} {
				r := e.get(tok, q, nil)
				secRefused(t, r, 0, "FORBIDDEN", "GET, "+q)
				assert.NotContains(t, r.Body, "secret-of-other")
			}
			for _, proto := range secProtocols {
				c := e.tokenDial(proto, map[string]any{"authToken": tok})
				for _, q := range []string{cancelB, notifyB, readB, listing, waitB} {
					s, err := c.Subscribe(ctxT(t), q, nil)
					require.NoError(t, err)
					o := result(t, s, 10*time.Second)
					assert.Nil(t, o.Result, "%s %s", proto, q)
					assert.Equal(t, "FORBIDDEN", o.code(), "%s: %s: %+v", proto, q, o.Errors)
				}
			}
			hdr := secHeader("Authorization", "Bearer "+tok)
			for _, q := range []string{cancelB, notifyB, readB, waitB} {
				o := awaitSSE(t, secSSEAsync(t, e.endpoint, hdr, q, nil, 10*time.Second), 15*time.Second)
				require.NoError(t, o.err, "SSE %s", q)
				if assert.NotEmpty(t, o.resps, "SSE %s", q) {
					assert.Equal(t, "FORBIDDEN", o.resps[0].FirstCode(), "SSE %s", q)
					b, _ := json.Marshal(o.resps)
					assert.NotContains(t, string(b), "secret-of-other")
				}
			}
		}

		// Nothing was touched: B runs, its lookback event is still there.
		require.Equal(t, "RUN_STARTED", e.aRun(other.ID).State)
		lbs := e.aRun(other.ID).LookbackEvents
		require.Len(t, lbs, 1)
		require.Equal(t, evOtherLB, lbs[0].EventID)
		require.Empty(t, e.aWaiters("x"))
		require.Equal(t, "RUN_STARTED", e.aRun(mine.ID).State)
	})
}

// Inline fragments count toward the depth limit: nesting them cannot make
// an operation as deep as it likes for free.
func TestSecurityQueryDepthCountsInlineFragments(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t))
	ok := "{ " + nestInline("Query", "__typename", 14) + " }" // 14 fragments + 1 field = 15
	e.postOK(secToken, ok, nil, nil)
	for _, q := range []string{
		"{ " + nestInline("Query", "__typename", 15) + " }",
		"{ " + nestInline("Query", "__typename", 200) + " }",
		"mutation { " + nestInline("Mutation", `cancel(workflowRunId: "x") { state }`, 14) + " }",
		"query { ...F } fragment F on Query { " + nestInline("Query", "__typename", 15) + " }",
	} {
		secRefused(t, e.post(secToken, q, nil), 0, "COMPLEXITY_LIMIT_EXCEEDED", q)
	}
}
