package graph

import (
	"errors"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strconv"

	"github.com/99designs/gqlgen/graphql"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"
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
	vars         *variableDecoder
}

var _ graphql.Transport = httpTransport{}

func newHTTPTransport(maxBodyBytes int64, vars *variableDecoder) httpTransport {
	return httpTransport{maxBodyBytes: maxBodyBytes, vars: vars}
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

func (t httpTransport) Do(w http.ResponseWriter, r *http.Request, exec graphql.GraphExecutor) {
	ctx := r.Context()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
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
	params, err := t.vars.params(ctx, &rb)
	if err != nil {
		writeError(w, r, http.StatusBadRequest, codeBadRequest, "variables: %s", err.Error())
		return
	}
	params.Headers = r.Header
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

func writeJSON(w io.Writer, resp *graphql.Response) {
	if encodeJSON(w, resp) != nil {
		io.WriteString(w, `{"errors":[{"message":"internal server error","extensions":{"code":"INTERNAL_SERVER_ERROR"}}]}`)
	}
}

// writeError answers a request that never reached GraphQL execution.
func writeError(w http.ResponseWriter, r *http.Request, status int, code, format string, args ...any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	writeJSON(w, &graphql.Response{Errors: gqlerror.List{{
		Message:    sprintf(format, args...),
		Extensions: errorExtensions(r.Context(), code),
	}}})
}
