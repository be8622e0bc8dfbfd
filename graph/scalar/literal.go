package scalar

import (
	"bytes"
	"encoding/json"
	"unicode/utf8"

	"github.com/vektah/gqlparser/v2/ast"
)

// LiteralJSON renders a GraphQL literal given for a JSON argument
// (`eventData: {b: 1, a: [2, "x"]}`) as JSON. A literal is GraphQL, not JSON,
// so "byte for byte" means: objects keep their fields in source order,
// numbers are written as in the source (GraphQL's number grammar is JSON's,
// so 1.0, 1e3 and integers of any length stay as they are), strings are
// their value re-encoded (only ", \ and control characters escaped; escapes
// in the source are not kept). A variable inside the literal is replaced by
// its value: a JSON-typed variable by the bytes the client sent. An unset
// variable inside an object leaves its field out, as GraphQL's input
// coercion does; in a list it is null. An enum value is not JSON and is
// refused.
func LiteralJSON(v *ast.Value, vars map[string]any) (json.RawMessage, error) {
	return appendLiteral(nil, v, vars)
}

func appendLiteral(b []byte, v *ast.Value, vars map[string]any) ([]byte, error) {
	if v == nil {
		return append(b, "null"...), nil
	}
	switch v.Kind {
	case ast.Variable:
		val, ok := vars[v.Raw]
		if !ok {
			if d := v.VariableDefinition; d != nil && d.DefaultValue != nil {
				return appendLiteral(b, d.DefaultValue, vars)
			}
			return append(b, "null"...), nil
		}
		return appendValue(b, val)
	case ast.IntValue, ast.FloatValue, ast.BooleanValue:
		return append(b, v.Raw...), nil
	case ast.NullValue:
		return append(b, "null"...), nil
	case ast.StringValue, ast.BlockValue:
		if !utf8.ValidString(v.Raw) {
			return nil, badInput("JSON: a string in the literal is not valid UTF-8")
		}
		return appendString(b, v.Raw), nil
	case ast.ListValue:
		b = append(b, '[')
		for i, c := range v.Children {
			if i > 0 {
				b = append(b, ',')
			}
			var err error
			if b, err = appendLiteral(b, c.Value, vars); err != nil {
				return nil, err
			}
		}
		return append(b, ']'), nil
	case ast.ObjectValue:
		b = append(b, '{')
		first := true
		for _, c := range v.Children {
			if unsetVariable(c.Value, vars) {
				continue
			}
			if !first {
				b = append(b, ',')
			}
			first = false
			b = appendString(b, c.Name)
			b = append(b, ':')
			var err error
			if b, err = appendLiteral(b, c.Value, vars); err != nil {
				return nil, err
			}
		}
		return append(b, '}'), nil
	case ast.EnumValue:
		return nil, badInput("JSON: %s is not a JSON value; to send a string, quote it: \"%s\"", v.Raw, v.Raw)
	}
	return nil, badInput("JSON: the literal is not a JSON value")
}

func unsetVariable(v *ast.Value, vars map[string]any) bool {
	if v == nil || v.Kind != ast.Variable {
		return false
	}
	if _, ok := vars[v.Raw]; ok {
		return false
	}
	return v.VariableDefinition == nil || v.VariableDefinition.DefaultValue == nil
}

// appendValue appends a variable's value: raw JSON compacted, anything else
// (a String, Int or other variable used inside a JSON literal) encoded
// without HTML escaping.
func appendValue(b []byte, val any) ([]byte, error) {
	if raw, ok := val.(json.RawMessage); ok {
		var buf bytes.Buffer
		if err := json.Compact(&buf, raw); err != nil {
			return nil, badInput("JSON: invalid JSON value")
		}
		return append(b, buf.Bytes()...), nil
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(val); err != nil {
		return nil, badInput("JSON: value cannot be encoded as JSON")
	}
	return append(b, bytes.TrimSuffix(buf.Bytes(), []byte("\n"))...), nil
}

// appendString appends s as a JSON string, escaping only what JSON requires.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' {
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		case '\b':
			b = append(b, '\\', 'b')
		case '\f':
			b = append(b, '\\', 'f')
		default:
			b = append(b, `\u00`...)
			b = append(b, "0123456789abcdef"[c>>4], "0123456789abcdef"[c&0xF])
		}
		start = i + 1
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
