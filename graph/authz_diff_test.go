package graph

// Authorization, differential: random documents (nested inline and named
// fragments, aliases, @skip/@include with variables, several operations and
// operationName; queries, mutations and subscriptions mixing allowed and
// forbidden root fields and other runs' ids) run with a run token on every
// transport against a real server. The oracle does not read the document:
// a hook innermost in gqlgen's field middleware records each root field the
// executor is about to resolve, with the arguments the resolver gets, and
// each must be one the token allows. Side effects are checked too: the
// other run keeps its state and its lookback event, no run is created.
//
// Short run: part of go test (TestRunTokenAuthorizationDifferential, 300
// documents on each of two servers, about a second; RENDEZVOUS_AUTHZ_DOCS=n for more). Long run:
//
//	go test -run '^$' -fuzz FuzzRunTokenAuthorization -fuzztime 5m ./graph/
//
// The fuzz input is the stream of the generator's choices; the corpus is
// testdata/fuzz/FuzzRunTokenAuthorization.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/99designs/gqlgen/graphql"
	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"

	"rendezvous/auth"
	"rendezvous/delivery"
	"rendezvous/engine"
	"rendezvous/hub"
	"rendezvous/storage"
)

const (
	diffServerToken = "diff-server-token-0123456789"
	diffSecret      = "diff-secret-diff-secret-diff-secret"
	diffMine        = "wfr_diff-mine"
	diffOther       = "wfr_diff-other"
	// diffOtherEvent is the event of the other run's lookback event, which
	// a leaked waitForEvent would consume.
	diffOtherEvent = "ev-other"
)

// resolved is a root field the executor was about to resolve.
type resolved struct {
	kind  auth.Kind
	runID string // the principal's run
	name  string
	args  map[string]any
}

// diffServer is a real server (engine on SQLite, the full handler, an HTTP
// listener) recording the root fields it resolves.
type diffServer struct {
	name     string
	srv      *httptest.Server
	endpoint string
	token    string // run token for diffMine

	mu       sync.Mutex
	codes    map[string]int // first error code of each answer ("" when none): what the documents exercise
	resolved []resolved
	allowed  int // fields resolved that the token allows: the harness is not vacuous
}

func newDiffServer(tb testing.TB, name string, fieldCheckOnly bool) *diffServer {
	tb.Helper()
	log.SetOutput(io.Discard) // gqlgen logs some refusals with the standard logger
	discard := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx := context.Background()
	store, err := storage.Open(ctx, "sqlite://"+filepath.Join(tb.TempDir(), "diff.db"), storage.Options{Logger: discard})
	if err != nil {
		tb.Fatal(err)
	}
	allow, err := delivery.ParseAllowList("http://127.0.0.1:9/")
	if err != nil {
		tb.Fatal(err)
	}
	eng := engine.New(store, hub.New(), nil, engine.Config{
		Outbound:        engine.OutboundConfig{Allow: allow}, // waitForEventCallback registers
		MaxPayloadBytes: 4 << 10,
		DefaultTimeout:  10 * time.Millisecond, // an allowed wait ends at once
		MaxTimeout:      time.Hour,
		SweepInterval:   50 * time.Millisecond,
		CatchUpInterval: 200 * time.Millisecond,
		Logger:          discard,
	})
	eng.Start(ctx)
	authn, err := auth.New(auth.Config{ServerTokens: []string{diffServerToken}, Secrets: []string{diffSecret}, RunTokenTTL: 24 * time.Hour})
	if err != nil {
		tb.Fatal(err)
	}
	s := &diffServer{name: name}
	h := NewHandler(eng, HandlerConfig{
		Auth:                          authn,
		MaxSubscriptionsPerConnection: 10,
		KeepAlive:                     time.Minute,
		InitTimeout:                   5 * time.Second,
		Playground:                    true, // introspection on: __schema must still be refused
		Logger:                        discard,
		resolvedRootField:             s.record,
		authzFieldCheckOnly:           fieldCheckOnly,
	})
	s.srv = httptest.NewServer(h)
	s.endpoint = s.srv.URL + "/query"
	tb.Cleanup(func() {
		s.srv.CloseClientConnections()
		s.srv.Close()
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		eng.DrainWaits(dctx)
		eng.Stop()
		store.Close()
	})
	for _, id := range []string{diffMine, diffOther} {
		if _, err := eng.Trigger(ctx, engine.TriggerParams{RunID: ptr(id)}); err != nil {
			tb.Fatal(err)
		}
	}
	s.token, _, _ = authn.RunToken(diffMine, time.Now())
	r := s.admin(tb, `mutation { notify(eventId: "`+diffOtherEvent+`", eventData: "secret", workflowRunId: "`+diffOther+`") { lookback { id } } }`)
	if !strings.Contains(r, `"lookback":{"id"`) {
		tb.Fatalf("seeding the other run's lookback event: %s", r)
	}
	return s
}

func (s *diffServer) record(ctx context.Context, fc *graphql.FieldContext) {
	p := principal(ctx)
	if p == nil || p.FullAccess() {
		return
	}
	args := map[string]any{}
	for k, v := range fc.Args {
		if sp, ok := v.(*string); ok && sp != nil {
			v = *sp
		}
		args[k] = v
	}
	r := resolved{kind: p.Kind, runID: p.RunID, name: fc.Field.Name, args: args}
	s.mu.Lock()
	s.resolved = append(s.resolved, r)
	s.mu.Unlock()
}

// take returns what was recorded since the last call.
func (s *diffServer) take() []resolved {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.resolved
	s.resolved = nil
	return out
}

// runTokenAllows is the oracle: what a run token for run may resolve. It
// is written from the contract (README, Security), not from the
// authorizer's code.
func runTokenAllows(run string, r resolved) bool {
	if r.kind != auth.Run || r.runID != run {
		return false
	}
	if r.name != "workflowRun" && r.name != "waitForEvent" && r.name != "waitForEventCallback" {
		return false
	}
	id, _ := r.args["workflowRunId"].(string)
	return id == run || engine.RunIDPrefix+id == run
}

// admin runs a query with the server token and returns the body.
func (s *diffServer) admin(tb testing.TB, query string) string {
	tb.Helper()
	b, _ := json.Marshal(map[string]any{"query": query})
	req, _ := http.NewRequest(http.MethodPost, s.endpoint, bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+diffServerToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return string(body)
}

// checkState fails when a forbidden call left a trace: both runs started,
// the other run's lookback event still pending, no other run.
func (s *diffServer) checkState(tb testing.TB, doc *diffDoc) {
	tb.Helper()
	got := s.admin(tb, `{ workflowRuns(first: 10) { nodes { workflowRunId state } }
	  other: workflowRun(workflowRunId: "`+diffOther+`") { lookbackEvents { eventId } } }`)
	want := `{"data":{"workflowRuns":{"nodes":[{"workflowRunId":"` + diffOther + `","state":"RUN_STARTED"},{"workflowRunId":"` + diffMine + `","state":"RUN_STARTED"}]},"other":{"lookbackEvents":[{"eventId":"` + diffOtherEvent + `"}]}}}`
	if got != want {
		tb.Fatalf("%s: state changed by a run token's request\n got %s\nwant %s\n%s", s.name, got, want, doc)
	}
}

// A transport sends one document and returns the error codes of the answers.
type diffTransport func(ctx context.Context, d *diffDoc) ([]string, error)

// check runs the document on every transport and applies the oracle.
func (s *diffServer) check(tb testing.TB, conns *diffConns, d *diffDoc) {
	tb.Helper()
	for _, tr := range []struct {
		name string
		send diffTransport
	}{
		{"POST", s.post},
		{"GET", s.get},
		{"SSE", s.sse},
		{"graphql-transport-ws", conns.ws("graphql-transport-ws")},
		{"graphql-ws", conns.ws("graphql-ws")},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		codes, err := tr.send(ctx, d)
		cancel()
		if err != nil {
			tb.Fatalf("%s %s: %v\n%s", s.name, tr.name, err, d)
		}
		first := "ok"
		if len(codes) > 0 {
			first = codes[0]
		}
		s.mu.Lock()
		if s.codes == nil {
			s.codes = map[string]int{}
		}
		s.codes[first]++
		s.mu.Unlock()
		for _, c := range codes {
			if c == "" || c == codeInternal {
				tb.Fatalf("%s %s: an error with code %q\n%s", s.name, tr.name, c, d)
			}
		}
		for _, r := range s.take() {
			if !runTokenAllows(diffMine, r) {
				tb.Fatalf("%s %s: a run token for %s resolved %s(%v)\n%s", s.name, tr.name, diffMine, r.name, r.args, d)
			}
			s.mu.Lock()
			s.allowed++
			s.mu.Unlock()
		}
	}
}

func (s *diffServer) request(ctx context.Context, method string, d *diffDoc, accept string) (*http.Response, error) {
	var req *http.Request
	var err error
	if method == http.MethodGet {
		q := url.Values{"query": {d.Query}}
		vars, _ := json.Marshal(d.Vars)
		q.Set("variables", string(vars))
		if d.OpName != "" {
			q.Set("operationName", d.OpName)
		}
		req, err = http.NewRequestWithContext(ctx, method, s.endpoint+"?"+q.Encode(), nil)
	} else {
		b, _ := json.Marshal(map[string]any{"query": d.Query, "variables": d.Vars, "operationName": d.OpName})
		req, err = http.NewRequestWithContext(ctx, method, s.endpoint, bytes.NewReader(b))
		req.Header.Set("Content-Type", "application/json")
	}
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+s.token)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	return http.DefaultClient.Do(req)
}

type diffResponse struct {
	Errors []struct {
		Extensions map[string]any `json:"extensions"`
	} `json:"errors"`
}

func (r diffResponse) codes() []string {
	var out []string
	for _, e := range r.Errors {
		c, _ := e.Extensions["code"].(string)
		out = append(out, c)
	}
	return out
}

func (s *diffServer) plain(ctx context.Context, method string, d *diffDoc) ([]string, error) {
	resp, err := s.request(ctx, method, d, "")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var r diffResponse
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("status %d, body %q: %w", resp.StatusCode, b, err)
	}
	return r.codes(), nil
}

func (s *diffServer) post(ctx context.Context, d *diffDoc) ([]string, error) {
	return s.plain(ctx, http.MethodPost, d)
}

func (s *diffServer) get(ctx context.Context, d *diffDoc) ([]string, error) {
	return s.plain(ctx, http.MethodGet, d)
}

func (s *diffServer) sse(ctx context.Context, d *diffDoc) ([]string, error) {
	resp, err := s.request(ctx, http.MethodPost, d, "text/event-stream")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(resp.Body)
		var r diffResponse
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("status %d, body %q: %w", resp.StatusCode, b, err)
		}
		return r.codes(), nil
	}
	var codes []string
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "event:") && strings.TrimSpace(strings.TrimPrefix(line, "event:")) == "complete" {
			return codes, nil
		}
		if data, ok := strings.CutPrefix(line, "data:"); ok {
			var r diffResponse
			if err := json.Unmarshal([]byte(strings.TrimSpace(data)), &r); err != nil {
				return nil, fmt.Errorf("SSE data %q: %w", line, err)
			}
			codes = append(codes, r.codes()...)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("SSE: %w", err)
	}
	return codes, nil // the server ended the stream
}

// diffConns keeps one websocket per protocol, authenticated with the run
// token in connection_init, and dials again when the server closed one.
type diffConns struct {
	s     *diffServer
	conns map[string]*websocket.Conn
	seq   int
}

func newDiffConns(tb testing.TB, s *diffServer) *diffConns {
	c := &diffConns{s: s, conns: map[string]*websocket.Conn{}}
	tb.Cleanup(func() {
		for _, ws := range c.conns {
			ws.CloseNow()
		}
	})
	return c
}

type wsMsg struct {
	ID      string          `json:"id,omitempty"`
	Type    string          `json:"type"`
	Payload json.RawMessage `json:"payload,omitempty"`
}

func (c *diffConns) dial(ctx context.Context, proto string) (*websocket.Conn, error) {
	ws, resp, err := websocket.Dial(ctx, strings.Replace(c.s.endpoint, "http://", "ws://", 1), &websocket.DialOptions{Subprotocols: []string{proto}})
	if err != nil {
		return nil, err
	}
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	ws.SetReadLimit(16 << 20)
	payload, _ := json.Marshal(map[string]any{"authToken": c.s.token})
	if err := wsjson.Write(ctx, ws, wsMsg{Type: "connection_init", Payload: payload}); err != nil {
		return nil, err
	}
	for {
		var m wsMsg
		if err := wsjson.Read(ctx, ws, &m); err != nil {
			return nil, fmt.Errorf("connection_ack: %w", err)
		}
		if m.Type == "connection_ack" {
			return ws, nil
		}
	}
}

func (c *diffConns) ws(proto string) diffTransport {
	return func(ctx context.Context, d *diffDoc) ([]string, error) {
		ws := c.conns[proto]
		if ws == nil {
			var err error
			if ws, err = c.dial(ctx, proto); err != nil {
				return nil, err
			}
			c.conns[proto] = ws
		}
		c.seq++
		id := strconv.Itoa(c.seq)
		typ := "subscribe"
		if proto == "graphql-ws" {
			typ = "start"
		}
		payload, _ := json.Marshal(map[string]any{"query": d.Query, "variables": d.Vars, "operationName": d.OpName})
		if err := wsjson.Write(ctx, ws, wsMsg{ID: id, Type: typ, Payload: payload}); err != nil {
			return nil, c.closed(proto, err)
		}
		var codes []string
		for {
			var m wsMsg
			if err := wsjson.Read(ctx, ws, &m); err != nil {
				if websocket.CloseStatus(err) != -1 {
					// The server closed the connection (a protocol
					// error, say): nothing ran; dial again next time.
					delete(c.conns, proto)
					return codes, nil
				}
				return nil, c.closed(proto, err)
			}
			switch {
			case m.Type == "ping":
				wsjson.Write(ctx, ws, wsMsg{Type: "pong"})
			case m.ID != id:
			case m.Type == "next" || m.Type == "data":
				var r diffResponse
				if err := json.Unmarshal(m.Payload, &r); err != nil {
					return nil, fmt.Errorf("%s payload %s: %w", m.Type, m.Payload, err)
				}
				codes = append(codes, r.codes()...)
			case m.Type == "error":
				var r diffResponse
				if json.Unmarshal(m.Payload, &r.Errors) != nil {
					var one struct {
						Extensions map[string]any `json:"extensions"`
					}
					json.Unmarshal(m.Payload, &one)
					r.Errors = append(r.Errors, one)
				}
				return append(codes, r.codes()...), nil
			case m.Type == "complete":
				return codes, nil
			}
		}
	}
}

func (c *diffConns) closed(proto string, err error) error {
	if ws := c.conns[proto]; ws != nil {
		ws.CloseNow()
	}
	delete(c.conns, proto)
	return err
}

// diffDoc is a generated request.
type diffDoc struct {
	Query  string
	Vars   map[string]any
	OpName string
}

func (d *diffDoc) String() string {
	vars, _ := json.Marshal(d.Vars)
	return fmt.Sprintf("document:\n%s\nvariables: %s\noperationName: %q", d.Query, vars, d.OpName)
}

// chooser turns bytes into choices; past the end every choice is 0.
type chooser struct {
	data []byte
	i    int
}

func (c *chooser) n(k int) int {
	if k <= 1 || c.i >= len(c.data) {
		return 0
	}
	b := c.data[c.i]
	c.i++
	return int(b) % k
}

func (c *chooser) bool() bool { return c.n(2) == 1 }

// docGen writes a random document from a chooser.
type docGen struct {
	c         *chooser
	vars      map[string]any // values sent
	varTypes  map[string]string
	varDefs   map[string]string // default values, GraphQL literal
	fragments []genFragment
	defs      []string // fragment definitions
	seq       int
	budget    int // selections left, so that a document stays small
}

type genFragment struct {
	name, on string
	vars     []string
}

// genOp is the operation being written: the variables it uses.
type genOp struct {
	typ  string // Query, Mutation, Subscription
	vars map[string]bool
}

func generateDoc(data []byte) *diffDoc {
	g := &docGen{c: &chooser{data: data}, vars: map[string]any{}, varTypes: map[string]string{}, varDefs: map[string]string{}, budget: 24}
	nOps := 1 + g.c.n(3)
	var ops []string
	var names []string
	for i := range nOps {
		typ := []string{"Query", "Mutation", "Subscription"}[g.c.n(3)]
		op := &genOp{typ: typ, vars: map[string]bool{}}
		body := g.selections(op, 0)
		name := fmt.Sprintf("O%d", i+1)
		keyword := strings.ToLower(typ)
		header := keyword + " " + name
		if nOps == 1 && g.c.n(3) == 0 {
			header, name = keyword, ""
			if typ == "Query" && g.c.bool() {
				header = "" // the shorthand { … }
			}
		}
		if len(op.vars) > 0 && header != "" {
			var defs []string
			for v := range op.vars {
				d := "$" + v + ": " + g.varTypes[v]
				if def, ok := g.varDefs[v]; ok {
					d += " = " + def
				}
				defs = append(defs, d)
			}
			slices.Sort(defs)
			header += "(" + strings.Join(defs, ", ") + ")"
		}
		ops = append(ops, header+" { "+body+" }")
		names = append(names, name)
	}
	d := &diffDoc{Query: strings.Join(append(ops, g.defs...), "\n"), Vars: g.vars}
	switch g.c.n(4) {
	case 0:
		d.OpName = names[g.c.n(len(names))]
	case 1:
		d.OpName = names[len(names)-1]
	case 2:
		if g.c.bool() {
			d.OpName = "Nope"
		}
	}
	return d
}

// selections writes 1..3 selections of the root type.
func (g *docGen) selections(op *genOp, depth int) string {
	n := 1 + g.c.n(3)
	var parts []string
	for range n {
		if g.budget <= 0 {
			break
		}
		g.budget--
		parts = append(parts, g.selection(op, depth))
	}
	if len(parts) == 0 {
		return "__typename"
	}
	return strings.Join(parts, " ")
}

func (g *docGen) selection(op *genOp, depth int) string {
	choice := g.c.n(10)
	if depth >= 6 {
		choice = 0
	}
	switch choice {
	case 5, 6:
		cond := " on " + op.typ
		switch g.c.n(8) {
		case 0, 1:
			cond = "" // no type condition
		case 2:
			cond = " on " + []string{"Query", "Mutation", "Subscription"}[g.c.n(3)] // often invalid
		}
		return "..." + cond + g.directive(op) + " { " + g.selections(op, depth+1) + " }"
	case 7:
		g.seq++
		f := genFragment{name: fmt.Sprintf("F%d", g.seq), on: op.typ}
		inner := &genOp{typ: op.typ, vars: map[string]bool{}}
		body := g.selections(inner, depth+1)
		for v := range inner.vars {
			f.vars = append(f.vars, v)
			op.vars[v] = true
		}
		g.fragments = append(g.fragments, f)
		g.defs = append(g.defs, "fragment "+f.name+" on "+f.on+" { "+body+" }")
		return "..." + f.name + g.directive(op)
	case 8:
		var same []genFragment
		for _, f := range g.fragments {
			if f.on == op.typ || g.c.n(8) == 0 { // another type's now and then: invalid
				same = append(same, f)
			}
		}
		if len(same) > 0 {
			f := same[g.c.n(len(same))]
			for _, v := range f.vars {
				op.vars[v] = true
			}
			return "..." + f.name + g.directive(op)
		}
	case 9:
		// Deep nesting of inline fragments around one field: the shape
		// of the defect the walker let through.
		k := 1 + g.c.n(14)
		return strings.Repeat("... on "+op.typ+" { ", k) + g.field(op) + strings.Repeat(" }", k)
	}
	return g.field(op)
}

// directive is none, or @skip/@include with a literal or a variable.
func (g *docGen) directive(op *genOp) string {
	if g.c.n(3) != 0 {
		return ""
	}
	name := []string{"skip", "include"}[g.c.n(2)]
	switch g.c.n(3) {
	case 0:
		return fmt.Sprintf(" @%s(if: %v)", name, g.c.bool())
	default:
		v := g.variable(op, "Boolean!", g.c.bool(), "")
		return fmt.Sprintf(" @%s(if: $%s)", name, v)
	}
}

// variable declares a new variable used by op and returns its name.
func (g *docGen) variable(op *genOp, typ string, value any, def string) string {
	g.seq++
	v := fmt.Sprintf("v%d", g.seq)
	g.varTypes[v] = typ
	if def != "" {
		g.varDefs[v] = def
	}
	if value != nil {
		g.vars[v] = value
	}
	op.vars[v] = true
	return v
}

// diffRunIDs are the run ids arguments take: its own run (full and short,
// weighted so that allowed operations are common), the other run, a run
// that does not exist, the empty id.
var diffRunIDs = []string{
	diffMine, diffMine, strings.TrimPrefix(diffMine, "wfr_"), diffMine,
	diffOther, strings.TrimPrefix(diffOther, "wfr_"), "wfr_nobody", "",
}

// runArg is a workflowRunId argument: a literal, a variable, or a
// variable's default value.
func (g *docGen) runArg(op *genOp, typ string) string {
	id := diffRunIDs[g.c.n(len(diffRunIDs))]
	switch g.c.n(4) {
	case 0, 1:
		return strconv.Quote(id)
	case 2:
		return "$" + g.variable(op, typ, id, "")
	default:
		// The default value, overridden or not by the variables sent.
		def := diffRunIDs[g.c.n(len(diffRunIDs))]
		var value any
		if g.c.bool() {
			value = id
		}
		return "$" + g.variable(op, strings.TrimSuffix(typ, "!"), value, strconv.Quote(def))
	}
}

// alias is mostly a fresh one (fields of one response name must agree),
// sometimes the name of an allowed field, sometimes none.
func (g *docGen) alias() string {
	switch g.c.n(8) {
	case 0:
		return "workflowRun: "
	case 1:
		return "waitForEvent: "
	case 2:
		return ""
	}
	g.seq++
	return "a" + strconv.Itoa(g.seq) + ": "
}

func (g *docGen) field(op *genOp) string {
	a := g.alias()
	d := g.directive(op)
	switch op.typ {
	case "Query":
		switch g.c.n(8) {
		case 0, 1, 2:
			return a + "workflowRun(workflowRunId: " + g.runArg(op, "ID!") + ")" + d + " { workflowRunId state lookbackEvents { eventId eventData } }"
		case 3:
			return a + "workflowRuns(first: 5)" + d + " { nodes { workflowRunId } }"
		case 4:
			return a + `waiters(eventId: "` + diffOtherEvent + `")` + d + " { id }"
		case 5:
			return a + "stats" + d + " { pendingLookbackEvents }"
		case 6:
			return a + "__schema" + d + " { queryType { name } }"
		default:
			return a + "__typename" + d
		}
	case "Mutation":
		switch g.c.n(7) {
		case 0:
			return a + "trigger(workflowRunId: " + g.runArg(op, "ID") + ")" + d + " { workflowRunId }"
		case 1:
			return a + `notify(eventId: "` + diffOtherEvent + `", eventData: 1, workflowRunId: ` + g.runArg(op, "ID") + ")" + d + " { eventId }"
		case 2, 3:
			return a + "cancel(workflowRunId: " + g.runArg(op, "ID!") + ")" + d + " { state }"
		case 4:
			return a + "finishRun(workflowRunId: " + g.runArg(op, "ID!") + ", state: RUN_SUCCESS)" + d + " { state }"
		case 5:
			// The other run's event: a leak would consume its lookback event.
			ev := []string{diffOtherEvent, "ev-mine"}[g.c.n(2)]
			return a + `waitForEventCallback(eventId: "` + ev + `", workflowRunId: ` + g.runArg(op, "ID!") + `, stepName: "cb` + strconv.Itoa(g.c.n(3)) +
				`", timeout: "1h", callback: {url: "http://127.0.0.1:9/cb"})` + d + " { id state }"
		default:
			return a + "__typename" + d
		}
	default:
		ev := []string{diffOtherEvent, "ev-mine", "ev-any"}[g.c.n(3)]
		args := `eventId: "` + ev + `"`
		if g.c.n(4) != 0 {
			args += ", workflowRunId: " + g.runArg(op, "ID")
		}
		if g.c.n(3) == 0 {
			args += `, stepName: "s` + strconv.Itoa(g.c.n(3)) + `"`
		}
		if g.c.bool() {
			args += `, timeout: "1ms"`
		}
		return a + "waitForEvent(" + args + ")" + d + " { eventId timeout }"
	}
}

// diffDocs is how many documents the short run sends (to each server,
// over each of the five transports).
func diffDocs(t *testing.T) int {
	if v := os.Getenv("RENDEZVOUS_AUTHZ_DOCS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("RENDEZVOUS_AUTHZ_DOCS=%q: want a number of documents", v)
		}
		return n
	}
	if testing.Short() {
		return 30
	}
	return 300
}

// The property test: random documents from a fixed seed, on a server with
// every check and on one where only the execution-time field check runs
// (it must hold alone).
func TestRunTokenAuthorizationDifferential(t *testing.T) {
	n := diffDocs(t)
	rng := rand.New(rand.NewPCG(10, uint64(n)))
	for _, mode := range []struct {
		name           string
		fieldCheckOnly bool
	}{{"all checks", false}, {"field check only", true}} {
		s := newDiffServer(t, mode.name, mode.fieldCheckOnly)
		conns := newDiffConns(t, s)
		for i := range n {
			data := make([]byte, 64+rng.IntN(192))
			for j := range data {
				data[j] = byte(rng.UintN(256))
			}
			s.check(t, conns, generateDoc(data))
			if i%25 == 24 {
				s.checkState(t, nil)
			}
		}
		s.checkState(t, nil)
		t.Logf("%s: %d documents × 5 transports; %d allowed root fields resolved, none forbidden; answers by first error code: %v", mode.name, n, s.allowed, s.codes)
		if s.allowed == 0 {
			t.Errorf("%s: no allowed field was ever resolved: the generator or the harness is broken", mode.name)
		}
	}
}

// Documents that broke authorization before, or nearly.
func TestRunTokenAuthorizationRegressions(t *testing.T) {
	nest := func(typ, inner string, n int) string {
		return strings.Repeat("... on "+typ+" { ", n) + inner + strings.Repeat(" }", n)
	}
	docs := []*diffDoc{
		{Query: "mutation { " + nest("Mutation", `cancel(workflowRunId: "`+diffOther+`") { state }`, 11) + " }"},
		{Query: "mutation { " + nest("Mutation", `cancel(workflowRunId: "`+diffOther+`") { state }`, 14) + " }"},
		{Query: "{ " + nest("Query", `workflowRun(workflowRunId: "`+diffOther+`") { lookbackEvents { eventData } }`, 11) + " }"},
		{Query: "subscription { " + nest("Subscription", `waitForEvent(eventId: "`+diffOtherEvent+`", workflowRunId: "`+diffOther+`") { eventId }`, 11) + " }"},
		{Query: `query($s: Boolean!) { workflowRun(workflowRunId: "` + diffMine + `") { state } ... @skip(if: $s) { workflowRuns { nodes { workflowRunId } } } }`, Vars: map[string]any{"s": false}},
		{Query: `query($id: ID! = "` + diffOther + `") { workflowRun(workflowRunId: $id) { state } }`},
		{Query: `query A { workflowRun(workflowRunId: "` + diffMine + `") { state } } mutation B { cancel(workflowRunId: "` + diffOther + `") { state } }`, OpName: "B"},
		{Query: `query { ...F } fragment F on Query { ...G } fragment G on Query { workflowRun: waiters(eventId: "x") { id } }`},
		{Query: `subscription($r: ID) { waitForEvent(eventId: "` + diffOtherEvent + `", workflowRunId: $r) { eventId } }`, Vars: map[string]any{"r": nil}},
		{Query: `subscription { waitForEvent(eventId: "` + diffOtherEvent + `") { eventId } }`},
	}
	for _, mode := range []bool{false, true} {
		s := newDiffServer(t, fmt.Sprintf("field check only: %v", mode), mode)
		conns := newDiffConns(t, s)
		for _, d := range docs {
			s.check(t, conns, d)
			s.checkState(t, d)
		}
		// The allowed call still works on every transport.
		s.allowed = 0
		s.check(t, conns, &diffDoc{Query: `{ workflowRun(workflowRunId: "` + diffMine + `") { state } }`})
		if s.allowed != 5 {
			t.Fatalf("the run token's own workflowRun resolved %d times over 5 transports", s.allowed)
		}
	}
}

func FuzzRunTokenAuthorization(f *testing.F) {
	for _, seed := range []string{
		"", "\x00\x01\x02", "\x09\x0d\x02\x02\x02", "\x01\x01\x09\x0d\x00\x02\x03",
		"\x02\x02\x05\x02\x01\x03\x02\x03\x07\x00\x03\x02\x02\x01\x09\x0a\x01\x00\x02",
	} {
		f.Add([]byte(seed))
	}
	// Each input on a server with every check and on one with the field
	// check alone.
	all := newDiffServer(f, "all checks", false)
	alone := newDiffServer(f, "field check only", true)
	allConns, aloneConns := newDiffConns(f, all), newDiffConns(f, alone)
	f.Fuzz(func(t *testing.T, data []byte) {
		d := generateDoc(data)
		all.check(t, allConns, d)
		all.checkState(t, d)
		alone.check(t, aloneConns, d)
		alone.checkState(t, d)
	})
}
