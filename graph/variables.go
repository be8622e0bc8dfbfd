package graph

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"

	"github.com/99designs/gqlgen/graphql"
	"github.com/99designs/gqlgen/graphql/handler/lru"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/parser"
)

// Rule 13: eventData round-trips byte for byte. Decoding a request's
// variables into Go values (what gqlgen's transports do) sorts an object's
// keys and may respell its numbers and strings; so every transport of ours
// (POST, GET, websocket, SSE) reads the variables as raw JSON and hands a
// variable declared with the JSON scalar to the executor as the bytes the
// client sent (json.RawMessage), which scalar.UnmarshalJSON keeps. Other
// variables are decoded as before, numbers as json.Number. Inline JSON
// literals are jsonLiterals' business (jsonliteral.go).

// requestBody is a GraphQL request as POST, SSE and a websocket subscribe
// carry it.
type requestBody struct {
	Query         string                     `json:"query"`
	OperationName string                     `json:"operationName"`
	Variables     map[string]json.RawMessage `json:"variables"`
	Extensions    map[string]any             `json:"extensions"`
}

// variableDecoder turns a request's raw variables into the executor's.
type variableDecoder struct {
	// jsonVars caches, per query text and operation name, the names of
	// JSON-typed variables.
	jsonVars *lru.LRU[map[string]bool]
}

func newVariableDecoder() *variableDecoder {
	return &variableDecoder{jsonVars: lru.New[map[string]bool](1000)}
}

// params builds the executor's parameters from a decoded request body.
func (d *variableDecoder) params(ctx context.Context, rb *requestBody) (*graphql.RawParams, error) {
	vars, err := d.decode(ctx, rb)
	if err != nil {
		return nil, err
	}
	return &graphql.RawParams{
		Query:         rb.Query,
		OperationName: rb.OperationName,
		Variables:     vars,
		Extensions:    rb.Extensions,
	}, nil
}

// decode decodes each variable; JSON-typed ones stay raw.
func (d *variableDecoder) decode(ctx context.Context, rb *requestBody) (map[string]any, error) {
	if len(rb.Variables) == 0 {
		return nil, nil
	}
	raw := d.jsonTyped(ctx, rb.Query, rb.OperationName)
	vars := make(map[string]any, len(rb.Variables))
	for name, v := range rb.Variables {
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
func (d *variableDecoder) jsonTyped(ctx context.Context, query, operationName string) map[string]bool {
	key := operationName + "\x00" + query
	if names, ok := d.jsonVars.Get(ctx, key); ok {
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
		d.jsonVars.Add(ctx, key, names)
	}
	return names
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

// encodeJSON writes v as JSON without a trailing newline and without
// escaping <, > and &: JSON values (eventData) go out with the bytes they
// came in with. Responses are application/json or text/event-stream with
// nosniff, never HTML, so the escaping protected nothing.
func encodeJSON(w io.Writer, v any) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return err
	}
	_, err := w.Write(bytes.TrimSuffix(buf.Bytes(), []byte("\n")))
	return err
}
