package graph

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strconv"

	"github.com/99designs/gqlgen/graphql"
	"github.com/99designs/gqlgen/graphql/handler/lru"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"
	"github.com/vektah/gqlparser/v2/parser"
)

// httpTransport serves GraphQL over plain HTTP: POST with an application/json
// body, and GET for queries. It replaces gqlgen's POST and GET transports for
// three reasons: the body is read through a byte limit; variables declared
// with the JSON scalar reach the resolver as the exact bytes the client sent
// (json.RawMessage), so eventData keeps its key order and number spelling
// (gqlgen decodes them into Go maps, which sorts keys); and every refusal
// carries an extensions.code. A subscription is refused here: it needs a
// websocket or SSE (Accept: text/event-stream), or it would hold the
// request open until the wait ends.
type httpTransport struct {
	maxBodyBytes int64
	// jsonVars caches, per query text, the names of JSON-typed variables.
	jsonVars *lru.LRU[map[string]bool]
}

var _ graphql.Transport = httpTransport{}

func newHTTPTransport(maxBodyBytes int64) httpTransport {
	return httpTransport{maxBodyBytes: maxBodyBytes, jsonVars: lru.New[map[string]bool](1000)}
}

func (httpTransport) Supports(r *http.Request) bool {
	if r.Header.Get("Upgrade") != "" {
		return false
	}
	if r.Method == http.MethodGet {
		return true
	}
	if r.Method != http.MethodPost {
		return false
	}
	mediaType, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	return err == nil && mediaType == "application/json"
}

type requestBody struct {
	Query         string                     `json:"query"`
	OperationName string                     `json:"operationName"`
	Variables     map[string]json.RawMessage `json:"variables"`
	Extensions    map[string]any             `json:"extensions"`
}

func (t httpTransport) Do(w http.ResponseWriter, r *http.Request, exec graphql.GraphExecutor) {
	ctx := r.Context()
	w.Header().Set("Content-Type", "application/json")
	start := graphql.Now()

	var (
		rb     requestBody
		status int
		code   string
		msg    string
	)
	if r.Method == http.MethodGet {
		status, code, msg = readGET(r, &rb)
	} else {
		status, code, msg = t.readPOST(w, r, &rb)
	}
	if status != 0 {
		writeError(w, r, status, code, "%s", msg)
		return
	}
	params := &graphql.RawParams{
		Query:         rb.Query,
		OperationName: rb.OperationName,
		Extensions:    rb.Extensions,
		Headers:       r.Header,
	}
	var err error
	if params.Variables, err = t.variables(ctx, rb); err != nil {
		writeError(w, r, http.StatusBadRequest, codeBadRequest, "variables: %s", err.Error())
		return
	}
	params.ReadTime = graphql.TraceTiming{Start: start, End: graphql.Now()}

	rc, opErr := exec.CreateOperationContext(ctx, params)
	if opErr != nil {
		w.WriteHeader(http.StatusUnprocessableEntity)
		writeJSON(w, exec.DispatchError(graphql.WithOperationContext(ctx, rc), opErr))
		return
	}
	switch op := rc.Operation.Operation; {
	case op == ast.Subscription:
		writeError(w, r, http.StatusBadRequest, codeBadRequest,
			"subscriptions need a websocket (graphql-transport-ws or graphql-ws) or SSE (Accept: text/event-stream)")
		return
	case op != ast.Query && r.Method == http.MethodGet:
		writeError(w, r, http.StatusMethodNotAllowed, codeBadRequest, "GET only runs queries; send mutations as POST")
		return
	}
	responses, ctx := exec.DispatchOperation(ctx, rc)
	resp := responses(ctx)
	for _, e := range resp.Errors {
		if e.Extensions["code"] == codeRateLimited {
			if secs, ok := e.Extensions["retryAfter"].(int); ok {
				w.Header().Set("Retry-After", strconv.Itoa(secs))
			}
			w.WriteHeader(http.StatusTooManyRequests)
			break
		}
	}
	writeJSON(w, resp)
}

func readGET(r *http.Request, rb *requestBody) (status int, code, msg string) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return http.StatusBadRequest, codeBadRequest, "the URL query string is malformed"
	}
	rb.Query, rb.OperationName = q.Get("query"), q.Get("operationName")
	if v := q.Get("variables"); v != "" {
		if err := decodeOne([]byte(v), &rb.Variables); err != nil {
			return http.StatusBadRequest, codeBadRequest, "variables is not a JSON object"
		}
	}
	if v := q.Get("extensions"); v != "" {
		if err := decodeOne([]byte(v), &rb.Extensions); err != nil {
			return http.StatusBadRequest, codeBadRequest, "extensions is not a JSON object"
		}
	}
	return 0, "", ""
}

func (t httpTransport) readPOST(w http.ResponseWriter, r *http.Request, rb *requestBody) (status int, code, msg string) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, t.maxBodyBytes))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE", sprintf("the request body is larger than the limit of %d bytes", t.maxBodyBytes)
		}
		return http.StatusBadRequest, codeBadRequest, "could not read the request body"
	}
	if err := decodeOne(body, rb); err != nil {
		return http.StatusBadRequest, codeBadRequest, "the request body is not a JSON object with a query"
	}
	return 0, "", ""
}

// decodeOne decodes exactly one JSON value: trailing data is an error.
func decodeOne(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data after the JSON value")
	}
	return nil
}

// unsupported answers requests to /query that no transport takes (another
// method, another content type) with a coded error instead of gqlgen's
// bare "transport not supported".
type unsupported struct{}

func (unsupported) Supports(*http.Request) bool { return true }

func (unsupported) Do(w http.ResponseWriter, r *http.Request, _ graphql.GraphExecutor) {
	if r.Method == http.MethodPost {
		writeError(w, r, http.StatusUnsupportedMediaType, codeBadRequest,
			"POST needs Content-Type: application/json (or a websocket upgrade, or Accept: text/event-stream)")
		return
	}
	w.Header().Set("Allow", "GET, POST, OPTIONS")
	writeError(w, r, http.StatusMethodNotAllowed, codeBadRequest, "%s is not supported; use GET, POST or a websocket", r.Method)
}

// variables decodes each variable; JSON-typed ones stay raw.
func (t httpTransport) variables(ctx context.Context, pb requestBody) (map[string]any, error) {
	if len(pb.Variables) == 0 {
		return nil, nil
	}
	raw := t.jsonTyped(ctx, pb.Query, pb.OperationName)
	vars := make(map[string]any, len(pb.Variables))
	for name, v := range pb.Variables {
		if raw[name] {
			if string(v) == "null" {
				vars[name] = nil
			} else {
				vars[name] = v
			}
			continue
		}
		var decoded any
		if err := decodeOne(v, &decoded); err != nil {
			return nil, errors.New("not valid JSON")
		}
		vars[name] = decoded
	}
	return vars, nil
}

// jsonTyped returns the names of the operation's variables of type JSON.
// A query that does not parse yields none; the executor reports its errors.
func (t httpTransport) jsonTyped(ctx context.Context, query, operationName string) map[string]bool {
	key := operationName + "\x00" + query
	if names, ok := t.jsonVars.Get(ctx, key); ok {
		return names
	}
	names := map[string]bool{}
	doc, err := parser.ParseQuery(&ast.Source{Input: query})
	if err != nil {
		return names // not cached: the executor refuses it anyway
	}
	for _, op := range doc.Operations {
		if operationName != "" && op.Name != operationName {
			continue
		}
		for _, v := range op.VariableDefinitions {
			if v.Type != nil && v.Type.Elem == nil && v.Type.NamedType == "JSON" {
				names[v.Variable] = true
			}
		}
	}
	if len(key) <= maxCachedQueryBytes {
		t.jsonVars.Add(ctx, key, names)
	}
	return names
}

func writeJSON(w io.Writer, resp *graphql.Response) {
	b, err := json.Marshal(resp)
	if err != nil {
		b = []byte(`{"errors":[{"message":"internal server error","extensions":{"code":"INTERNAL_SERVER_ERROR"}}]}`)
	}
	w.Write(b)
}

// writeError answers a request that never reached GraphQL execution.
func writeError(w http.ResponseWriter, r *http.Request, status int, code, format string, args ...any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	writeJSON(w, &graphql.Response{Errors: gqlerror.List{{
		Message:    sprintf(format, args...),
		Extensions: errorExtensions(r.Context(), code),
	}}})
}
