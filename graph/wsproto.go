package graph

import (
	"bytes"
	"encoding/json"
	"sync"
	"unicode/utf8"

	"github.com/99designs/gqlgen/graphql"
	"github.com/vektah/gqlparser/v2/gqlerror"
)

// wsProtocol is what differs between the two subprotocols: the names of
// the operation messages, and whether it is the legacy one (no ping/pong
// messages: "ka" and websocket ping frames instead; connection_error before
// a refusal; connection_terminate).
type wsProtocol struct {
	name            string
	legacy          bool
	subscribe, stop string // from the client
	next            string // a result, to the client
}

var (
	// transportWS: graphql-transport-ws, of the graphql-ws library
	// (GraphiQL, Apollo Client, urql).
	transportWS = &wsProtocol{name: "graphql-transport-ws", subscribe: "subscribe", stop: "complete", next: "next"}
	// legacyWS: graphql-ws, of subscriptions-transport-ws.
	legacyWS = &wsProtocol{name: "graphql-ws", legacy: true, subscribe: "start", stop: "stop", next: "data"}
)

// protocolOf is the negotiated subprotocol; a client that offered none
// speaks the legacy one, as in gqlgen.
func protocolOf(subprotocol string) *wsProtocol {
	if subprotocol == transportWS.name {
		return transportWS
	}
	return legacyWS
}

// wsClose is a close code and reason. The 44xx codes and reasons are
// graphql-transport-ws's; legacy clients get the same.
type wsClose struct {
	code   int
	reason string
}

var (
	closeBadMessage      = wsClose{4400, "Invalid message received"}
	closeBadInit         = wsClose{4400, "connection_init payload must be an object"}
	closeUnauthenticated = wsClose{closeUnauthorized, "unauthenticated"}
	// closeTooEarly: an operation before connection_ack.
	closeTooEarly     = wsClose{closeUnauthorized, "Unauthorized"}
	closeTokenExpired = wsClose{closeUnauthorized, "token expired"}
	closeInitTimeout  = wsClose{4408, "Connection initialisation timeout"}
	closeTooManyInits = wsClose{4429, "Too many initialisation requests"}
	closeTerminated   = wsClose{1000, "terminated"}
	// closeGoingAway: graceful shutdown; clients reconnect (to another replica).
	closeGoingAway = wsClose{1001, "server shutting down"}
	closeInternal  = wsClose{1011, "internal error"}
)

// closeDuplicate: a subscribe whose id is already running.
func closeDuplicate(id string) wsClose {
	return wsClose{4409, truncateReason("Subscriber for " + id + " already exists")}
}

// truncateReason keeps a close reason within the 123 bytes a close frame
// holds, on a UTF-8 boundary (coder/websocket refuses longer ones).
func truncateReason(s string) string {
	const max = 123
	if len(s) <= max {
		return s
	}
	s = s[:max]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

// Frames without an id, made once.
var (
	ackFrame  = []byte(`{"type":"connection_ack"}`)
	kaFrame   = []byte(`{"type":"ka"}`)
	pingFrame = []byte(`{"type":"ping"}`)
)

// wsFrame builds one outgoing message: {"type":…,"id":…,"payload":…}. The
// payload is marshaled once, straight into the frame; buffers are pooled
// across connections, so an idle operation holds none.
type wsFrame struct{ b []byte }

var framePool = sync.Pool{New: func() any { return new(wsFrame) }}

// maxPooledFrame: bigger buffers (a large result) go back to the GC.
const maxPooledFrame = 64 << 10

func newFrame(typ, id string) *wsFrame {
	f := framePool.Get().(*wsFrame)
	f.b = append(f.b[:0], `{"type":"`...)
	f.b = append(f.b, typ...)
	f.b = append(f.b, '"')
	if id != "" {
		f.b = append(f.b, `,"id":`...)
		f.b = appendJSONString(f.b, id)
	}
	return f
}

// Write appends, for json.Encoder.
func (f *wsFrame) Write(p []byte) (int, error) {
	f.b = append(f.b, p...)
	return len(p), nil
}

// payload appends v as the payload, without escaping <, > and & (see
// encodeJSON): eventData goes out with the bytes it came in with.
func (f *wsFrame) payload(v any) error {
	n := len(f.b)
	f.b = append(f.b, `,"payload":`...)
	enc := json.NewEncoder(f)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		f.b = f.b[:n]
		return err
	}
	f.b = f.b[:len(f.b)-1] // Encode's newline
	return nil
}

// dataPayload appends a response that is data alone, as payload would,
// without reflection: {"data":…} with the data as gqlgen wrote it, when it
// is valid JSON without a whitespace byte (what encoding/json would
// compact; such data goes through payload). false: nothing was appended.
func (f *wsFrame) dataPayload(resp *graphql.Response) bool {
	d := resp.Data
	if len(resp.Errors) > 0 || resp.Extensions != nil || resp.Label != "" || resp.Path != nil || resp.HasNext != nil ||
		len(d) == 0 || bytes.IndexAny(d, " \t\r\n") >= 0 || !json.Valid(d) {
		return false
	}
	f.b = append(f.b, `,"payload":{"data":`...)
	f.b = append(f.b, d...)
	f.b = append(f.b, '}')
	return true
}

// rawPayload appends JSON that is already encoded.
func (f *wsFrame) rawPayload(raw json.RawMessage) {
	f.b = append(f.b, `,"payload":`...)
	f.b = append(f.b, raw...)
}

// bytes closes the object; valid until free.
func (f *wsFrame) bytes() []byte {
	f.b = append(f.b, '}')
	return f.b
}

func (f *wsFrame) free() {
	if cap(f.b) <= maxPooledFrame {
		framePool.Put(f)
	}
}

// appendJSONString appends s as a JSON string. Ids are short and plain;
// anything else goes through encoding/json.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

// pongFrame answers a graphql-transport-ws ping, echoing its payload.
func pongFrame(payload json.RawMessage) *wsFrame {
	f := newFrame("pong", "")
	if len(payload) > 0 {
		f.rawPayload(payload)
	}
	return f
}

// connectionErrorFrame tells a graphql-ws client why it is being closed.
func connectionErrorFrame(msg string) *wsFrame {
	f := newFrame("connection_error", "")
	f.payload(&gqlerror.Error{Message: msg})
	return f
}
