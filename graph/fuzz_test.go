package graph

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"net/url"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/parser"

	"rendezvous/auth"
	"rendezvous/engine"
	"rendezvous/hub"
	"rendezvous/storage"
)

// The HTTP request path under fuzzing: method, path, query string, content
// type, Accept, Authorization and one more header of any shape, and the
// body, all random, against the real handler (auth, origins, transports,
// limits, gqlgen, resolvers, engine) on a SQLite file. Whatever comes in,
// the handler must not panic, must return (a stream ends when its request
// context does), must not answer a bad input with an internal error, and
// must not show internals to the client.

const (
	fuzzServerToken = "fuzz-server-token-0123456789"
	fuzzSecret      = "fuzz-secret-fuzz-secret-fuzz-secret"
	// fuzzRequestTimeout ends streams (SSE waits) the fuzzer opens.
	fuzzRequestTimeout = 500 * time.Millisecond
	// fuzzHangAfter is how long past its context a request may take to return.
	fuzzHangAfter = 10 * time.Second
)

type fuzzEnv struct {
	handlers [2]http.Handler // Playground off, on
	runToken string          // for a run that exists
	expired  string          // a run token already expired
	runID    string
}

func newFuzzEnv(tb testing.TB) *fuzzEnv {
	tb.Helper()
	// gqlgen logs refused websocket upgrades with the standard logger.
	log.SetOutput(io.Discard)
	discard := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx := context.Background()
	store, err := storage.Open(ctx, "sqlite://"+filepath.Join(tb.TempDir(), "fuzz.db"), storage.Options{Logger: discard})
	if err != nil {
		tb.Fatal(err)
	}
	eng := engine.New(store, hub.New(), nil, engine.Config{
		MaxPayloadBytes: 4 << 10,
		DefaultTimeout:  time.Second,
		MaxTimeout:      time.Hour,
		SweepInterval:   100 * time.Millisecond,
		CatchUpInterval: 200 * time.Millisecond,
		Logger:          discard,
	})
	eng.Start(ctx)
	tb.Cleanup(func() {
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		eng.DrainWaits(dctx)
		eng.Stop()
		store.Close()
	})
	authn, err := auth.New(auth.Config{ServerTokens: []string{fuzzServerToken}, Secrets: []string{fuzzSecret}, RunTokenTTL: time.Hour})
	if err != nil {
		tb.Fatal(err)
	}
	env := &fuzzEnv{}
	for i, playground := range []bool{false, true} {
		env.handlers[i] = NewHandler(eng, HandlerConfig{
			Auth:                          authn,
			AllowedOrigins:                []string{"https://app.example.com"},
			MaxBodyBytes:                  64 << 10,
			MaxSubscriptionsPerConnection: 5,
			RateLimit:                     1e6, // exercised, never in the way
			KeepAlive:                     100 * time.Millisecond,
			InitTimeout:                   time.Second,
			Playground:                    playground,
			Logger:                        discard,
		})
	}
	res, err := eng.Trigger(ctx, engine.TriggerParams{RunID: ptr("fuzz-run")})
	if err != nil {
		tb.Fatal(err)
	}
	env.runID = res.WorkflowRunID
	env.runToken, _, _ = authn.RunToken(env.runID, time.Now())
	env.expired, _, _ = authn.RunToken(env.runID, time.Now().Add(-2*time.Hour))
	return env
}

func ptr[T any](v T) *T { return &v }

// fuzzInternals is what no error shown to a client may contain, unless the
// request itself carried it (errors may quote the input back).
var fuzzInternals = regexp.MustCompile(`(?i)(\bselect\b[^"]{0,200}\bfrom\b|\binsert\s+into\b|\.go:\d+|goroutine \d+|/work/|/root/|/home/|rendezvous/[a-z]+|\bgorm\b|sqlite|mysql|runtime\.|panic|\bsql:|database/sql)`)

func FuzzHandler(f *testing.F) {
	env := newFuzzEnv(f)

	add := func(method, path, rawQuery, contentType, accept string, authKind uint8, header string, body string) {
		f.Add(method, path, rawQuery, contentType, accept, authKind, header, []byte(body))
	}
	js := func(query string, vars map[string]any) string {
		b, _ := json.Marshal(map[string]any{"query": query, "variables": vars})
		return string(b)
	}
	const (
		ct  = "application/json"
		sse = "text/event-stream"
	)
	run := env.runID
	// Valid requests, each kind of caller.
	add("POST", "/query", "", ct, "", 1, "", js(`{ __typename }`, nil))
	add("POST", "/query", "", ct, "", 1, "", js(`mutation($id: ID) { trigger(workflowRunId: $id) { workflowRunId created runToken { token expiresAt } } }`, map[string]any{"id": "seed"}))
	add("POST", "/query", "", ct, "", 1, "", js(`mutation($ev: String!, $d: JSON, $r: ID) { notify(eventId: $ev, eventData: $d, workflowRunId: $r) { eventId eventData lookback { id } notifyResponse { messageId } } }`, map[string]any{"ev": "e", "d": map[string]any{"k": []any{1, "x", nil}}, "r": run}))
	add("POST", "/query", "", ct, "", 1, "", js(`mutation($ev: String!, $s: StepRef) { notify(eventId: $ev, step: $s) { deduplicated } }`, map[string]any{"ev": "e", "s": map[string]any{"workflowRunId": run, "stepName": "n"}}))
	add("POST", "/query", "", ct, "", 2, "", js(`query($id: ID!) { workflowRun(workflowRunId: $id) { workflowRunId state steps { stepName } waiters { id } lookbackEvents { id eventData } } }`, map[string]any{"id": run}))
	add("POST", "/query", "", ct, "", 1, "", js(`{ workflowRuns(first: 5) { nodes { workflowRunId } pageInfo { hasNextPage endCursor } } waiters(eventId: "e") { id } }`, nil))
	add("GET", "/query", "query="+url.QueryEscape(`query($id: ID!) { workflowRun(workflowRunId: $id) { state } }`)+"&variables="+url.QueryEscape(`{"id":"`+run+`"}`), "", "", 2, "", "")
	add("POST", "/query", "", ct, sse, 2, "", js(`subscription($ev: String!, $r: ID) { waitForEvent(eventId: $ev, workflowRunId: $r, timeout: "1s") { eventId timeout } }`, map[string]any{"ev": "e", "r": run}))
	add("POST", "/query", "", ct, sse, 1, "", js(`subscription { waitForEvent(eventId: "e", timeout: 1) { eventId } }`, nil))
	add("OPTIONS", "/query", "", "", "", 0, "Origin: https://app.example.com", "")
	add("GET", "/readyz", "", "", "", 0, "", "")
	add("GET", "/", "", "", "", 0, "", "")
	// Refusals: tokens, scope, origin, encodings, methods.
	add("POST", "/query", "", ct, "", 0, "", js(`{ __typename }`, nil))
	add("POST", "/query", "", ct, "", 3, "", js(`{ __typename }`, nil))
	add("POST", "/query", "", ct, "", 4, "Authorization: Bearer rt1.x.1.y", js(`{ __typename }`, nil))
	add("POST", "/query", "", ct, "", 2, "", js(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": run}))
	add("POST", "/query", "", ct, "", 2, "", `{"query":"query A { __typename } mutation B { trigger { created } }","operationName":"B"}`)
	add("POST", "/query", "", ct, "", 2, "", `{"query":"{ __typename }","query":"mutation { trigger { created } }"}`)
	add("POST", "/query", "", ct, "", 1, "Origin: https://evil.example", js(`{ __typename }`, nil))
	add("POST", "/query", "", "application/x-www-form-urlencoded", "", 1, "", "query=mutation+%7B+trigger+%7B+created+%7D+%7D")
	add("POST", "/query", "", "multipart/form-data; boundary=x", "", 1, "", "--x\r\nContent-Disposition: form-data; name=\"operations\"\r\n\r\n{\"query\":\"mutation { trigger { created } }\"}\r\n--x--\r\n")
	add("POST", "/query", "", "text/plain", "", 1, "", js(`{ __typename }`, nil))
	add("PUT", "/query", "", ct, "", 1, "", js(`{ __typename }`, nil))
	add("GET", "/query", "query="+url.QueryEscape(`mutation { trigger { created } }`), "", "", 1, "", "")
	add("POST", "/query", "", ct, "", 0, "Upgrade: websocket", js(`mutation { trigger { created } }`, nil))
	add("GET", "/query", "", "", "", 0, "Upgrade: websocket", "")
	// Malformed and hostile bodies.
	add("POST", "/query", "", ct, "", 1, "", `{"query": "{ __typename }"`)
	add("POST", "/query", "", ct, "", 1, "", `[{"query": "{ __typename }"}]`)
	add("POST", "/query", "", ct, "", 1, "", "{\"query\": \"{ waiters(eventId: \\\"\xff\xfe\\\") { id } }\"}")
	add("POST", "/query", "", ct, "", 1, "", `{"query": "mutation($d: JSON) { notify(eventId: \"e\", eventData: $d) { eventData } }", "variables": {"d": "`+"\xff"+`"}}`)
	add("POST", "/query", "", ct, "", 1, "", `{"query": "{ __typename }", "variables": {"a": `+strings.Repeat("[", 5000)+strings.Repeat("]", 5000)+`}}`)
	add("POST", "/query", "", ct, "", 1, "", strings.Repeat("[", 20000))
	add("POST", "/query", "", ct, "", 1, "", `{"query": "mutation($d: JSON) { trigger(body: $d) { created } }", "variables": {"d": 1e999}}`)
	add("POST", "/query", "", ct, "", 1, "", js(`{ workflowRun(workflowRunId: "x' OR '1'='1") { state } waiters(eventId: "%") { id } }`, nil))
	add("POST", "/query", "", ct, "", 1, "", js(`{ workflowRuns(first: 2, after: "!!!") { nodes { workflowRunId } } }`, nil))
	add("POST", "/query", "", ct, "", 1, "", js(`{ `+strings.Repeat("a: __typename ", 60)+`}`, nil))
	add("POST", "/query", "", ct, "", 1, "", js(`{ __schema { types { fields { type { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { name } } } } } } } } } } } } } } } }`, nil))
	add("POST", "/query", "", ct, "", 1, "", js(fragmentSpreads(8), nil))
	add("POST", "/query", "", ct, "", 1, "", js(`query { ...A } fragment A on Query { ...B } fragment B on Query { ...A }`, nil))
	add("POST", "/query", "", ct, "", 1, "", js(`{ __typename @include(if: true) @skip(if: false) }`, nil))
	add("POST", "/query", "", ct, "", 1, "", js(`subscription { waitForEvent(eventId: "e") { eventId } }`, nil))
	add("POST", "/query", "", ct, sse, 1, "", js(`subscription { waitForEvent(eventId: "", timeout: "-1s") { eventId } }`, nil))
	add("POST", "/query", "", ct, sse, 1, "", `{"query": "subscription {"`)
	add("POST", "/query", "", ct, "", 1, "X-Request-Id: ../../etc/passwd", `{"query": "{ nope }"}`)
	// Inline JSON literals (rewritten into variables of their own, rule 13).
	add("POST", "/query", "", ct, "", 1, "", js(`mutation($v: JSON, $s: String) { notify(eventId: "e", eventData: {b: 1, a: [2, "x", $v, $s], n: 123456789012345678901234567890, f: 1e999, u: $unset}) { eventData } }`, map[string]any{"v": map[string]any{"k": 1}, "s": "<&>"}))
	add("POST", "/query", "", ct, sse, 1, "", js(`mutation($d: JSON = {z: 1, a: [1.50]}) { notify(eventId: "e", eventData: $d) { eventData } }`, nil))
	add("POST", "/query", "", ct, "", 1, "", js(`mutation { ...M } fragment M on Mutation { trigger(body: {b: FOO}) { created } }`, nil))
	add("POST", "/query", "", ct, "", 1, "", js(`mutation { trigger(workflowRunId: "lit", body: """block""", dispatch: {url: "https://x.example", headers: {b: "1", a: "2"}}) { created } }`, nil))

	f.Fuzz(func(t *testing.T, method, path, rawQuery, contentType, accept string, authKind uint8, header string, body []byte) {
		if path == "" {
			path = "/query"
		}
		ctx, cancel := context.WithTimeout(context.Background(), fuzzRequestTimeout)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, method, "http://rendezvous.test/", bytes.NewReader(body))
		if err != nil {
			return // not a method net/http would hand to a handler
		}
		req.URL.Path, req.URL.RawQuery = path, rawQuery
		req.RequestURI = req.URL.RequestURI()
		req.RemoteAddr = "192.0.2.1:4321"
		if contentType != "" {
			req.Header.Set("Content-Type", contentType)
		}
		if accept != "" {
			req.Header.Set("Accept", accept)
		}
		switch authKind % 5 {
		case 1:
			req.Header.Set("Authorization", "Bearer "+fuzzServerToken)
		case 2:
			req.Header.Set("Authorization", "Bearer "+env.runToken)
		case 3:
			req.Header.Set("Authorization", "Bearer "+env.expired)
		}
		if name, value, ok := strings.Cut(header, ":"); ok {
			req.Header.Add(textproto.CanonicalMIMEHeaderKey(strings.TrimSpace(name)), strings.TrimSpace(value))
		}
		h := env.handlers[authKind/5%2]

		rec := httptest.NewRecorder()
		done := make(chan any, 1)
		go func() {
			defer func() {
				if p := recover(); p != nil {
					done <- fmt.Sprintf("%v\n%s", p, debug.Stack())
					return
				}
				done <- nil
			}()
			h.ServeHTTP(rec, req)
		}()
		select {
		case p := <-done:
			if p != nil {
				t.Fatalf("the handler panicked on %s %s (Content-Type %q, Accept %q, header %q, body %q): %v", method, path, contentType, accept, header, body, p)
			}
		case <-time.After(fuzzRequestTimeout + fuzzHangAfter):
			t.Fatalf("the handler did not return %s after its request context ended: %s %s (Content-Type %q, Accept %q, body %.200q)", fuzzHangAfter, method, path, contentType, accept, body)
		}

		res := rec.Result()
		out, _ := io.ReadAll(res.Body)
		if res.StatusCode >= 500 && res.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("status %d for %s %s (Content-Type %q, body %.200q): %s", res.StatusCode, method, path, contentType, body, out)
		}
		input := method + path + rawQuery + contentType + accept + header + string(body)
		for _, errs := range responseErrors(out) {
			for _, e := range errs {
				msg, _ := json.Marshal(e)
				if m := fuzzInternals.FindString(string(msg)); m != "" && !strings.Contains(strings.ToLower(input), strings.ToLower(m)) {
					t.Fatalf("an error shows internal detail %q: %s (request %.300q)", m, msg, input)
				}
				if code, _ := e.Extensions["code"].(string); code == codeInternal && ctx.Err() == nil {
					t.Fatalf("an input was answered with an internal error: %s (request %s %s, Content-Type %q, body %.300q)", msg, method, path, contentType, body)
				}
			}
		}
	})
}

type fuzzError struct {
	Message    string         `json:"message"`
	Extensions map[string]any `json:"extensions"`
}

// responseErrors extracts the GraphQL errors of a JSON body, or of each
// data line of an event stream.
func responseErrors(body []byte) [][]fuzzError {
	var resp struct {
		Errors []fuzzError `json:"errors"`
	}
	if json.Unmarshal(body, &resp) == nil {
		return [][]fuzzError{resp.Errors}
	}
	var out [][]fuzzError
	for _, line := range strings.Split(string(body), "\n") {
		if d, ok := strings.CutPrefix(line, "data:"); ok && json.Unmarshal([]byte(strings.TrimSpace(d)), &resp) == nil {
			out = append(out, resp.Errors)
		}
	}
	return out
}

// fragmentSpreads is a query of n fragments each spreading the previous one
// twice: a few tokens per level, 2^n fields once expanded.
func fragmentSpreads(n int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "query { ...F%d }\nfragment F0 on Query { __typename }\n", n)
	for i := 1; i <= n; i++ {
		fmt.Fprintf(&b, "fragment F%d on Query { ...F%d ...F%d }\n", i, i-1, i-1)
	}
	return b.String()
}

// queryLimits' measurer must cost in proportion to the document, not to the
// fields it names once its fragments are expanded: the fuzzer's seeds keep
// n small, this shows the growth directly. (Over HTTP the same document is
// first priced by gqlgen's complexity.Calculate, which walks it the same
// way; see e2e TestSecurityQueryFragmentExplosion.)
func TestMeasureFragmentSpreadsCost(t *testing.T) {
	cost := func(n int) time.Duration {
		doc, err := parser.ParseQuery(&ast.Source{Input: fragmentSpreads(n)})
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		m := measurer{doc: doc, memo: map[string]size{}, visiting: map[string]bool{}}
		if sz := m.set(doc.Operations[0].SelectionSet); sz.fields != 1<<n {
			t.Fatalf("n=%d: counted %d fields, want %d", n, sz.fields, 1<<n)
		}
		return time.Since(start)
	}
	cost(4) // warm up
	small, large := cost(12), cost(20)
	t.Logf("measure: n=12 %s, n=20 %s", small, large)
	if large > 50*time.Millisecond {
		t.Errorf("measure took %s on a %d-byte document of 20 nested fragment spreads (%s for 12): it re-walks each fragment at every spread, 2^n work; memoize the depth and alias count per fragment",
			large, len(fragmentSpreads(20)), small)
	}
}
