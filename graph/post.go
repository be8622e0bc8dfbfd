package graph

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"

	"github.com/99designs/gqlgen/graphql"
	"github.com/99designs/gqlgen/graphql/handler/lru"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"
	"github.com/vektah/gqlparser/v2/parser"
)

// jsonPOST is gqlgen's POST transport with two differences that matter to
// Rendezvous: the body is read through a byte limit, and variables declared
// with the JSON scalar reach the resolver as the exact bytes the client sent
// (json.RawMessage), so eventData keeps its key order and number spelling.
// gqlgen's own transport decodes them into Go maps, which sorts keys.
type jsonPOST struct {
	maxBodyBytes int64
	// jsonVars caches, per query text, the names of JSON-typed variables.
	jsonVars *lru.LRU[map[string]bool]
}

var _ graphql.Transport = jsonPOST{}

func newJSONPost(maxBodyBytes int64) jsonPOST {
	return jsonPOST{maxBodyBytes: maxBodyBytes, jsonVars: lru.New[map[string]bool](1000)}
}

func (jsonPOST) Supports(r *http.Request) bool {
	if r.Header.Get("Upgrade") != "" || r.Method != http.MethodPost {
		return false
	}
	mediaType, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	return err == nil && mediaType == "application/json"
}

type postBody struct {
	Query         string                     `json:"query"`
	OperationName string                     `json:"operationName"`
	Variables     map[string]json.RawMessage `json:"variables"`
	Extensions    map[string]any             `json:"extensions"`
}

func (t jsonPOST) Do(w http.ResponseWriter, r *http.Request, exec graphql.GraphExecutor) {
	ctx := r.Context()
	w.Header().Set("Content-Type", "application/json")
	start := graphql.Now()

	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, t.maxBodyBytes))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			writeError(w, http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE", "request body is larger than the limit of %d bytes", t.maxBodyBytes)
			return
		}
		writeError(w, http.StatusBadRequest, "BAD_REQUEST", "could not read the request body")
		return
	}
	var pb postBody
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if err := dec.Decode(&pb); err != nil {
		writeError(w, http.StatusBadRequest, "BAD_REQUEST", "the request body is not a JSON object with a query")
		return
	}
	params := &graphql.RawParams{
		Query:         pb.Query,
		OperationName: pb.OperationName,
		Extensions:    pb.Extensions,
		Headers:       r.Header,
	}
	if params.Variables, err = t.variables(ctx, pb); err != nil {
		writeError(w, http.StatusBadRequest, "BAD_REQUEST", "variables: %s", err.Error())
		return
	}
	params.ReadTime = graphql.TraceTiming{Start: start, End: graphql.Now()}

	rc, opErr := exec.CreateOperationContext(ctx, params)
	if opErr != nil {
		w.WriteHeader(http.StatusUnprocessableEntity)
		writeJSON(w, exec.DispatchError(graphql.WithOperationContext(ctx, rc), opErr))
		return
	}
	responses, ctx := exec.DispatchOperation(ctx, rc)
	writeJSON(w, responses(ctx))
}

// variables decodes each variable; JSON-typed ones stay raw.
func (t jsonPOST) variables(ctx context.Context, pb postBody) (map[string]any, error) {
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
		dec := json.NewDecoder(bytes.NewReader(v))
		dec.UseNumber()
		if err := dec.Decode(&decoded); err != nil {
			return nil, errors.New("not valid JSON")
		}
		vars[name] = decoded
	}
	return vars, nil
}

// jsonTyped returns the names of the operation's variables of type JSON.
// A query that does not parse yields none; the executor reports its errors.
func (t jsonPOST) jsonTyped(ctx context.Context, query, operationName string) map[string]bool {
	key := operationName + "\x00" + query
	if names, ok := t.jsonVars.Get(ctx, key); ok {
		return names
	}
	names := map[string]bool{}
	doc, err := parser.ParseQuery(&ast.Source{Input: query})
	if err == nil {
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
	}
	t.jsonVars.Add(ctx, key, names)
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
func writeError(w http.ResponseWriter, status int, code, format string, args ...any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	writeJSON(w, &graphql.Response{Errors: gqlerror.List{{
		Message:    sprintf(format, args...),
		Extensions: map[string]any{"code": code},
	}}})
}
