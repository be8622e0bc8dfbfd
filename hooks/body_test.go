package hooks

import (
	"encoding/json"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

func TestEventDataOf(t *testing.T) {
	form := "application/x-www-form-urlencoded"
	for _, tc := range []struct {
		ct, body, want string
	}{
		{"", "", ""},
		{form, "", ""},
		{"application/json", ` {"b":1, "a":2} `, ` {"b":1, "a":2} `},
		{"text/plain", "hello", `"hello"`},
		{"text/plain", "<b>&</b>\n\t\u2028", `"<b>&</b>\n\t\u2028"`}, // no HTML escaping; U+2028 escaped as encoding/json does
		{"text/plain", "true", "true"},
		{"text/plain", `{"a":`, `"{\"a\":"`},
		{form, "a=1&b=2&a=3", `{"a":["1","3"],"b":"2"}`},
		{form, "b=2&a=1", `{"b":"2","a":"1"}`},
		{form, "a=1&&=x&a", `{"a":["1",""],"":"x"}`},
		{form, "q=%22%3C%3E%26+x", `{"q":"\"<>& x"}`},
		{"Application/X-WWW-Form-Urlencoded; charset=utf-8", "x=y", `{"x":"y"}`},
		{"application/x-www-form-urlencoded-not", "x=y", `"x=y"`},
		{"multipart/form-data; boundary=z", "--z--", `"--z--"`},
	} {
		got, err := eventDataOf(tc.ct, []byte(tc.body))
		require.NoError(t, err, "%q %q", tc.ct, tc.body)
		require.Equal(t, tc.want, string(got), "%q %q", tc.ct, tc.body)
	}
	for _, tc := range []struct{ ct, body string }{
		{"text/plain", "\xff"},
		{form, "a=%zz"},
		{form, "%zz=1"},
		{form, "a=%ff"},
		{"application/json", "\"\xc3\""},
	} {
		_, err := eventDataOf(tc.ct, []byte(tc.body))
		require.ErrorIs(t, err, errBadBody, "%q %q", tc.ct, tc.body)
	}
}

// FuzzEventDataOf: any body either is refused or becomes valid JSON, and
// JSON bodies are kept byte for byte.
func FuzzEventDataOf(f *testing.F) {
	for _, s := range []string{"", "a=1&a=2", `{"a":1}`, "text", "%zz", "\xff", `"\ud800"`} {
		f.Add("application/x-www-form-urlencoded", s)
		f.Add("text/plain", s)
	}
	f.Fuzz(func(t *testing.T, ct, body string) {
		got, err := eventDataOf(ct, []byte(body))
		if err != nil {
			return
		}
		if body == "" {
			if got != nil {
				t.Fatalf("empty body gave %q", got)
			}
			return
		}
		if !json.Valid(got) || !utf8.Valid(got) {
			t.Fatalf("%q %q gave invalid JSON %q", ct, body, got)
		}
	})
}
