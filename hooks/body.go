package hooks

import (
	"bytes"
	"encoding/json"
	"errors"
	"mime"
	"net/url"
	"strings"
	"unicode/utf8"
)

// errBadBody: the body cannot be event data (not UTF-8, or a form that
// does not decode).
var errBadBody = errors.New("bad body")

// eventDataOf turns a completion URL's request body into event data:
//   - an empty body: no data (null);
//   - application/x-www-form-urlencoded: a JSON object of its fields, in
//     the order they first appear; a field given once is a string, a field
//     given more than once an array of its values in order ("a=1&a=2" is
//     {"a":["1","2"]}); "a" alone is {"a":""};
//   - anything else: the body itself when it is JSON (its bytes kept as
//     they are, rule 13), else the body as a JSON string.
//
// A body that is not UTF-8, or a form whose %-escapes do not decode (or
// decode to something that is not UTF-8), is refused.
func eventDataOf(contentType string, body []byte) (json.RawMessage, error) {
	if len(body) == 0 {
		return nil, nil
	}
	if !utf8.Valid(body) {
		return nil, errBadBody
	}
	if mt, _, err := mime.ParseMediaType(contentType); err == nil && mt == "application/x-www-form-urlencoded" {
		return formJSON(string(body))
	}
	if json.Valid(body) {
		return body, nil
	}
	return jsonString(string(body)), nil
}

// formJSON renders a urlencoded form as a JSON object (see eventDataOf).
func formJSON(form string) (json.RawMessage, error) {
	var (
		order  []string
		values = map[string][]string{}
	)
	for _, pair := range strings.Split(form, "&") {
		if pair == "" {
			continue
		}
		k, v, _ := strings.Cut(pair, "=")
		key, err := url.QueryUnescape(k)
		if err != nil || !utf8.ValidString(key) {
			return nil, errBadBody
		}
		val, err := url.QueryUnescape(v)
		if err != nil || !utf8.ValidString(val) {
			return nil, errBadBody
		}
		if _, seen := values[key]; !seen {
			order = append(order, key)
		}
		values[key] = append(values[key], val)
	}
	var b bytes.Buffer
	b.WriteByte('{')
	for i, key := range order {
		if i > 0 {
			b.WriteByte(',')
		}
		b.Write(jsonString(key))
		b.WriteByte(':')
		vs := values[key]
		if len(vs) == 1 {
			b.Write(jsonString(vs[0]))
			continue
		}
		b.WriteByte('[')
		for j, v := range vs {
			if j > 0 {
				b.WriteByte(',')
			}
			b.Write(jsonString(v))
		}
		b.WriteByte(']')
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// jsonString is s as a JSON string, without HTML escaping (s is valid UTF-8).
func jsonString(s string) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	enc.Encode(s) // a string always encodes
	return bytes.TrimSuffix(b.Bytes(), []byte{'\n'})
}
