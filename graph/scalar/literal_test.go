package scalar

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/parser"
)

// literalOf parses `{ f(a: <literal>) }` and returns the literal.
func literalOf(t *testing.T, literal string) *ast.Value {
	t.Helper()
	doc, err := parser.ParseQuery(&ast.Source{Input: "query($v: JSON, $w: JSON) { f(a: " + literal + ") }"})
	require.NoError(t, err)
	return doc.Operations[0].SelectionSet[0].(*ast.Field).Arguments[0].Value
}

func TestLiteralJSON(t *testing.T) {
	vars := map[string]any{"v": json.RawMessage(`{ "z" : 1.50 , "a" : [ ] }`), "s": "<é>", "n": json.Number("1e3")}
	for _, tc := range []struct{ literal, want string }{
		{`{b: 1, a: [2, "x"], Z: {y: null, x: true}}`, `{"b":1,"a":[2,"x"],"Z":{"y":null,"x":true}}`},
		{`[1.0, 1e3, 1E+3, -0, 12345678901234567890123, 1.5e-7, 1e999]`, `[1.0,1e3,1E+3,-0,12345678901234567890123,1.5e-7,1e999]`},
		{`"tab\tnl\ncr\rbs\bff\fnul\u0000us\u001f quote\" back\\ <&> é \u2028"`, `"tab\tnl\ncr\rbs\bff\fnul\u0000us\u001f quote\" back\\ <&> é ` + "\u2028" + `"`},
		{`"""  block "q" """`, `"  block \"q\" "`},
		{`{v: $v, s: $s, n: $n, unset: $w, l: [$w]}`, `{"v":{"z":1.50,"a":[]},"s":"<é>","n":1e3,"l":[null]}`},
		{`{}`, `{}`},
		{`[]`, `[]`},
		{`false`, `false`},
	} {
		got, err := LiteralJSON(literalOf(t, tc.literal), vars)
		require.NoError(t, err, tc.literal)
		require.Equal(t, tc.want, string(got), tc.literal)
		require.True(t, json.Valid(got), tc.literal)
	}
	_, err := LiteralJSON(literalOf(t, `{a: [FOO]}`), vars)
	require.ErrorContains(t, err, "FOO is not a JSON value")
}
