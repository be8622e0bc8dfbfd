package graph

import (
	"bytes"
	"context"
	"io"
	"mime"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/99designs/gqlgen/graphql"
)

// sseTransport serves GraphQL over server-sent events: a POST with an
// application/json body and Accept: text/event-stream is answered with a
// stream of "event: next" (one per response) and a final "event: complete",
// the shape gqlgen's transport.SSE and graphql-sse's distinct connections
// mode use. It replaces gqlgen's for rule 13 (JSON-typed variables reach the
// executor as the bytes sent, responses are not HTML-escaped), for coded
// refusals of malformed bodies (gqlgen's echoed the body back), and so that
// the keep-alive goroutine ends before the handler returns (gqlgen's wrote
// to the finished response). The body has been read whole, within the
// limit, by limitBody.
type sseTransport struct {
	// keepAlive: a ": ping" comment this often keeps proxies from closing
	// an idle stream.
	keepAlive time.Duration
	vars      *variableDecoder
}

var _ graphql.Transport = sseTransport{}

func (sseTransport) Supports(r *http.Request) bool {
	if r.Method != http.MethodPost || !strings.Contains(r.Header.Get("Accept"), "text/event-stream") {
		return false
	}
	mediaType, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	return err == nil && mediaType == "application/json"
}

func (t sseTransport) Do(w http.ResponseWriter, r *http.Request, exec graphql.GraphExecutor) {
	ctx := r.Context()
	start := graphql.Now()
	body, err := io.ReadAll(r.Body)
	if err != nil {
		writeError(w, r, http.StatusBadRequest, codeBadRequest, "could not read the request body")
		return
	}
	var rb requestBody
	if err := decodeOne(body, &rb); err != nil {
		writeError(w, r, http.StatusBadRequest, codeBadRequest, "the request body is not a JSON object with a query")
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
	ctx = graphql.WithOperationContext(ctx, rc)

	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Content-Type-Options", "nosniff")
	s := &sseStream{w: w, flush: http.NewResponseController(w).Flush}
	s.write(":\n\n") // the stream is open: headers out, before the first result
	stop := s.keepAliveEvery(ctx, t.keepAlive)
	defer stop()

	if opErr != nil {
		s.next(exec.DispatchError(ctx, opErr))
	} else {
		responses, ctx := exec.DispatchOperation(ctx, rc)
		for {
			resp := responses(ctx)
			if resp == nil {
				break
			}
			s.next(resp)
		}
	}
	s.write("event: complete\n\n")
}

// sseStream writes whole events, one writer at a time (the handler and the
// keep-alive), each flushed at once. Write errors mean the client left; the
// request's context then ends the operation.
type sseStream struct {
	mu    sync.Mutex
	w     io.Writer
	flush func() error
}

func (s *sseStream) write(event string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	io.WriteString(s.w, event)
	s.flush()
}

// next sends one response. JSON holds no raw line break (encoding/json
// escapes them in strings and compacts raw values), so it fits on one data
// line.
func (s *sseStream) next(resp *graphql.Response) {
	var b bytes.Buffer
	b.WriteString("event: next\ndata: ")
	if encodeJSON(&b, resp) != nil {
		b.Truncate(len("event: next\ndata: "))
		b.WriteString(`{"errors":[{"message":"internal server error","extensions":{"code":"INTERNAL_SERVER_ERROR"}}]}`)
	}
	b.WriteString("\n\n")
	s.mu.Lock()
	defer s.mu.Unlock()
	s.w.Write(b.Bytes())
	s.flush()
}

// keepAliveEvery writes a comment every interval until the returned stop,
// which waits for the goroutine: nothing is written after the handler
// returns.
func (s *sseStream) keepAliveEvery(ctx context.Context, every time.Duration) (stop func()) {
	if every <= 0 {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-tick.C:
				s.write(": ping\n\n")
			}
		}
	}()
	return func() {
		close(done)
		wg.Wait()
	}
}
