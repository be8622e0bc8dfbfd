package e2e

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
)

// Rule 13 on every transport: the bytes of eventData a client sends come
// back the same to the subscribers and in notify's answer, whichever
// transport sent it (POST, both websocket protocols, SSE) and whichever
// carries it back (websockets, SSE, GET, POST). Each value is sent compact
// and byte-exact; the checks compare the raw bytes of eventData in each
// response frame.

// byPayloads have what a re-encoding loses: key order, number spelling,
// string escapes, characters an HTML-safe encoder escapes.
var byPayloads = []struct{ name, json string }{
	{"key order", `{"b":1,"a":[2,"x"],"Z":{"y":null,"x":true},"":0,"A":{}}`},
	{"numbers", `[1.0,1e3,1E+3,-0,0.0000001,12345678901234567890123,1.5e-7,-2.50,100]`},
	{"unicode", `{"raw":"é日😀","esc":"\u00e9\ud83d\ude00\u0041","ctl":"\n\t\"\\\/","nul":"\u0000"}`},
	{"html", `{"html":"<a href=\"x\">&amp;</a>","ls":"\u2028 \u2029","rawls":"` + "\u2028\u2029" + `"}`},
	{"nesting", `{"a":{"b":{"c":[[[{"d":[],"c":{}}]]],"e":{"z":1,"y":2}}},"0":[{"q":1.10}]}`},
	{"big integer", `12345678901234567890`},
	{"escaped string", `"\u00e9\/\u001f"`},
}

// byBody is a GraphQL request body with the variables spelled exactly.
func byBody(query, rawVars string) []byte {
	q, _ := json.Marshal(query)
	return []byte(`{"query":` + string(q) + `,"variables":` + rawVars + `}`)
}

// byNotifyVars are notify's variables with data spelled exactly.
func byNotifyVars(ev, run, data string) string {
	v := `{"ev":` + rsQuote(ev)
	if run != "" {
		v += `,"run":` + rsQuote(run)
	}
	return v + `,"data":` + data + `}`
}

// byNotifier sends a notify request body over one transport and returns the
// response.
type byNotifier struct {
	name string
	send func(t *testing.T, e *env, body []byte) *gqlclient.Response
}

func byNotifiers(e *env) []byNotifier {
	overWS := func(c *gqlclient.Conn) func(t *testing.T, e *env, body []byte) *gqlclient.Response {
		return func(t *testing.T, e *env, body []byte) *gqlclient.Response {
			s, err := c.SubscribeRaw(ctxT(t), body)
			require.NoError(t, err)
			return byOne(t, s)
		}
	}
	return []byNotifier{
		{"POST", func(t *testing.T, e *env, body []byte) *gqlclient.Response {
			r, err := gqlclient.PostRaw(ctxT(t), e.endpoint, body)
			require.NoError(t, err)
			return r
		}},
		{"graphql-transport-ws", overWS(e.dial(gqlclient.TransportWS))},
		{"graphql-ws", overWS(e.dial(gqlclient.LegacyWS))},
		{"SSE", func(t *testing.T, e *env, body []byte) *gqlclient.Response {
			rs, err := gqlclient.SSEBody(ctxT(t), e.endpoint, body)
			require.NoError(t, err)
			require.Len(t, rs, 1)
			return rs[0]
		}},
	}
}

// byOne reads an operation's one response over a websocket, then its complete.
func byOne(t *testing.T, s *gqlclient.Sub) *gqlclient.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var r *gqlclient.Response
	for {
		ev, err := s.Next(ctx)
		require.NoError(t, err)
		switch {
		case ev.Errors != nil:
			t.Fatalf("error message: %+v", ev.Errors)
		case ev.Complete:
			require.NotNil(t, r, "complete without a response")
			return r
		default:
			require.Nil(t, r, "a second response")
			r = ev.Response
		}
	}
}

// byNotifyData is notify's eventData and lookback.eventData, raw.
func byNotifyData(t *testing.T, r *gqlclient.Response) (data, lookback json.RawMessage) {
	t.Helper()
	require.Empty(t, r.Errors)
	var out struct {
		Notify struct {
			EventData json.RawMessage `json:"eventData"`
			Lookback  *struct {
				EventData json.RawMessage `json:"eventData"`
			} `json:"lookback"`
		} `json:"notify"`
	}
	require.NoError(t, json.Unmarshal(r.Data, &out))
	if out.Notify.Lookback != nil {
		lookback = out.Notify.Lookback.EventData
	}
	return out.Notify.EventData, lookback
}

// byWaitData is a waitForEvent response's eventData, raw.
func byWaitData(t *testing.T, r *gqlclient.Response) string {
	t.Helper()
	require.Empty(t, r.Errors)
	var d struct {
		WaitForEvent struct {
			EventData json.RawMessage `json:"eventData"`
		} `json:"waitForEvent"`
	}
	require.NoError(t, json.Unmarshal(r.Data, &d))
	return string(d.WaitForEvent.EventData)
}

// bySubscribers waits on ev over graphql-transport-ws, graphql-ws and SSE;
// the returned function gives each one's eventData, by transport.
func bySubscribers(t *testing.T, e *env, wsT, wsL *gqlclient.Conn, ev, run string) func() map[string]string {
	t.Helper()
	vars := waitVars(ev, waitOpts{run: run})
	sT, err := wsT.Subscribe(ctxT(t), waitSubscription, vars)
	require.NoError(t, err)
	sL, err := wsL.Subscribe(ctxT(t), waitSubscription, vars)
	require.NoError(t, err)
	sse := tpSSE(t, e.endpoint, vars)
	return func() map[string]string {
		o := tpAwaitSSE(t, sse)
		require.NoError(t, o.err)
		require.Len(t, o.resps, 1)
		return map[string]string{
			"graphql-transport-ws": byWaitData(t, byOne(t, sT)),
			"graphql-ws":           byWaitData(t, byOne(t, sL)),
			"SSE":                  byWaitData(t, o.resps[0]),
		}
	}
}

// byLookbackOverGET reads the run's lookback events over GET and returns
// the eventData of the one on ev.
func byLookbackOverGET(t *testing.T, e *env, run, ev string) string {
	t.Helper()
	r, err := gqlclient.Get(ctxT(t), e.endpoint, runQuery, map[string]any{"id": run})
	require.NoError(t, err)
	require.Empty(t, r.Errors)
	var out struct {
		WorkflowRun struct {
			LookbackEvents []lookbackView `json:"lookbackEvents"`
		} `json:"workflowRun"`
	}
	require.NoError(t, json.Unmarshal(r.Data, &out))
	for _, l := range out.WorkflowRun.LookbackEvents {
		if l.EventID == ev {
			return string(l.EventData)
		}
	}
	t.Fatalf("no lookback event on %s", ev)
	return ""
}

func TestRule13BytesEveryTransport(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		wsT, wsL := e.dial(gqlclient.TransportWS), e.dial(gqlclient.LegacyWS)
		notifiers := byNotifiers(e)
		for _, p := range byPayloads {
			for _, n := range notifiers {
				t.Run(p.name+" over "+n.name, func(t *testing.T) {
					// A broadcast to a subscriber on each transport.
					ev := uid("b13")
					got := bySubscribers(t, e, wsT, wsL, ev, "")
					e.awaitWaiting(ev, 3)
					data, _ := byNotifyData(t, n.send(t, e, byBody(notifyMutation, byNotifyVars(ev, "", p.json))))
					require.Equal(t, p.json, string(data), "%s sent over %s: notify's eventData", p.name, n.name)
					for via, d := range got() {
						require.Equal(t, p.json, d, "%s sent over %s: the subscriber over %s", p.name, n.name, via)
					}

					// Stored as a lookback event, read over GET, consumed by a wait.
					run := e.trigger()
					lev := uid("b13lb")
					_, lb := byNotifyData(t, n.send(t, e, byBody(notifyMutation, byNotifyVars(lev, run, p.json))))
					require.Equal(t, p.json, string(lb), "%s sent over %s: notify's lookback.eventData", p.name, n.name)
					require.Equal(t, p.json, byLookbackOverGET(t, e, run, lev), "%s sent over %s: lookbackEvents over GET", p.name, n.name)
					consumer, err := wsT.Subscribe(ctxT(t), waitSubscription, waitVars(lev, waitOpts{run: run}))
					require.NoError(t, err)
					require.Equal(t, p.json, byWaitData(t, byOne(t, consumer)), "%s sent over %s: the lookback consumer", p.name, n.name)
				})
			}
		}
	})
}

// An inline eventData is a GraphQL literal, not JSON: it comes back as the
// JSON rendering of the literal, in source order, numbers as written,
// strings as their value (JSON-escaped only where JSON needs it), on every
// transport. A variable inside the literal keeps its own bytes, and so does
// a JSON variable's default.
func TestRule13BytesInlineLiteral(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		wsT, wsL := e.dial(gqlclient.TransportWS), e.dial(gqlclient.LegacyWS)
		notifiers := byNotifiers(e)
		cases := []struct{ name, literal, vars, want string }{
			{"key order", `{b: 1, a: [2, "x"], Z: {y: null, x: true}}`, ``, `{"b":1,"a":[2,"x"],"Z":{"y":null,"x":true}}`},
			{"numbers", `[1.0, 1e3, 1E+3, -0, 0.0000001, 12345678901234567890123, 1.5e-7, -2.50, 1e999]`, ``, `[1.0,1e3,1E+3,-0,0.0000001,12345678901234567890123,1.5e-7,-2.50,1e999]`},
			{"strings", `{s: "é日😀 \u00e9 <&> \" \\ \/ \n", b: """  block "quoted" """, u: "\u{1F600}"}`, ``, `{"s":"é日😀 é <&> \" \\ / \n","b":"  block \"quoted\" ","u":"😀"}`},
			{"nesting", `{a: {b: {c: [[[{d: [], c: {}}]]], e: {z: 1, y: 2}}}}`, ``, `{"a":{"b":{"c":[[[{"d":[],"c":{}}]]],"e":{"z":1,"y":2}}}}`},
			{"scalar", `12345678901234567890`, ``, `12345678901234567890`},
			{"variable inside", `{y: 1, x: $inner, w: [$inner, $s]}`, `"inner":{"q":2,"p":1.0},"s":"é"`, `{"y":1,"x":{"q":2,"p":1.0},"w":[{"q":2,"p":1.0},"é"]}`},
		}
		for _, tc := range cases {
			for _, n := range notifiers {
				t.Run(tc.name+" over "+n.name, func(t *testing.T) {
					ev := uid("b13in")
					got := bySubscribers(t, e, wsT, wsL, ev, "")
					e.awaitWaiting(ev, 3)
					decls := `$ev: String!`
					if tc.vars != "" {
						decls += `, $inner: JSON, $s: String`
					}
					query := `mutation(` + decls + `) { notify(eventId: $ev, eventData: ` + tc.literal + `) { eventData lookback { eventData } } }`
					vars := `{"ev":` + rsQuote(ev)
					if tc.vars != "" {
						vars += "," + tc.vars
					}
					data, _ := byNotifyData(t, n.send(t, e, byBody(query, vars+"}")))
					require.Equal(t, tc.want, string(data), "%s over %s: notify's eventData", tc.name, n.name)
					for via, d := range got() {
						require.Equal(t, tc.want, d, "%s over %s: the subscriber over %s", tc.name, n.name, via)
					}
				})
			}
		}

		// A JSON variable's default is a literal too.
		ev := uid("b13def")
		got := bySubscribers(t, e, wsT, wsL, ev, "")
		e.awaitWaiting(ev, 3)
		query := `mutation($ev: String!, $d: JSON = {b: 1, a: [1.50]}) { notify(eventId: $ev, eventData: $d) { eventData } }`
		data, _ := byNotifyData(t, notifiers[0].send(t, e, byBody(query, `{"ev":`+rsQuote(ev)+`}`)))
		require.Equal(t, `{"b":1,"a":[1.50]}`, string(data))
		for via, d := range got() {
			require.Equal(t, `{"b":1,"a":[1.50]}`, d, "default: the subscriber over %s", via)
		}

		// An enum value is no JSON: refused, with a code.
		r, err := gqlclient.PostRaw(ctxT(t), e.endpoint, byBody(`mutation { notify(eventId: "x", eventData: {a: FOO}) { eventData } }`, `{}`))
		require.NoError(t, err)
		require.Equal(t, "BAD_USER_INPUT", r.FirstCode(), "errors: %+v", r.Errors)
		require.True(t, strings.Contains(r.Errors[0].Message, "FOO"), r.Errors[0].Message)
	})
}
