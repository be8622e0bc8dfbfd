package upstash

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"rendezvous/engine"
	"rendezvous/graph/scalar"
	"rendezvous/models"
)

// batchMessage is one message of QStash's POST /v2/batch, as the npm
// Client's trigger sends it.
type batchMessage struct {
	Destination string            `json:"destination"`
	Headers     map[string]string `json:"headers"`
	Body        *string           `json:"body"`
	Queue       *string           `json:"queue"`
}

// batchResultJSON is QStash's answer for one message: the client reads
// deduplicated (a run with that id existed already).
type batchResultJSON struct {
	MessageID    string `json:"messageId"`
	URL          string `json:"url"`
	Deduplicated bool   `json:"deduplicated"`
}

// maxBatch bounds the messages of one batch.
const maxBatch = 100

// batch serves POST /v2/batch: each message becomes a run dispatched to its
// destination (trigger with dispatch), with the run id, label, retries and
// delay the Upstash-* headers carry and the Upstash-Forward-* headers as
// the dispatch's headers. Every message is checked before any run is
// created, so a batch with a bad message creates nothing.
func (a *api) batch(c *call) (any, error) {
	raw, err := io.ReadAll(c.Body)
	if err != nil {
		return nil, err
	}
	var msgs []batchMessage
	if err := json.Unmarshal(raw, &msgs); err != nil {
		return nil, apiErrorf(http.StatusBadRequest, codeBadUserInput, "the body must be a JSON array of messages ({destination, headers, body})")
	}
	if len(msgs) == 0 || len(msgs) > maxBatch {
		return nil, apiErrorf(http.StatusBadRequest, codeBadUserInput, "a batch holds 1 to %d messages, got %d", maxBatch, len(msgs))
	}
	if err := c.charge(len(msgs)); err != nil {
		return nil, err
	}
	ps := make([]engine.TriggerParams, len(msgs))
	for i, m := range msgs {
		p, err := triggerOf(m, time.Now())
		if err != nil {
			return nil, apiErrorf(http.StatusBadRequest, codeBadUserInput, "message %d: %s", i, err.Error())
		}
		ps[i] = p
	}
	res, err := a.eng.TriggerMany(c.Context(), ps)
	if err != nil {
		return nil, err
	}
	out := make([]batchResultJSON, len(res))
	for i, r := range res {
		out[i] = batchResultJSON{MessageID: r.WorkflowRunID, URL: msgs[i].Destination, Deduplicated: !r.Created}
	}
	return out, nil
}

// Upstash-* headers a trigger may carry that change nothing here: the SDK's
// protocol and telemetry, and the failure callback, which the client sets
// to the workflow's own URL unless told otherwise (Rendezvous ends a run
// whose dispatch fails RUN_FAILED instead).
var ignoredHeaders = []string{
	"upstash-workflow-init", "upstash-workflow-url", "upstash-feature-set", "upstash-workflow-sdk-version",
	"upstash-telemetry-", "upstash-failure-callback", "upstash-workflow-unknown-sdk", "upstash-retry-delay",
}

// triggerOf reads one batch message. Headers that ask for what Rendezvous
// cannot do (flow control, callbacks, timeouts, deduplication ids, methods
// other than POST, queues, several labels) are refused rather than ignored.
func triggerOf(m batchMessage, now time.Time) (engine.TriggerParams, error) {
	var p engine.TriggerParams
	if m.Queue != nil {
		return p, errorText("queues are not supported")
	}
	if m.Destination == "" {
		return p, errorText("destination (the workflow's URL) is required")
	}
	d := &models.DispatchInput{URL: m.Destination}
	forward := map[string]string{}
	for k, v := range m.Headers {
		lk := strings.ToLower(k)
		switch {
		case strings.HasPrefix(lk, "upstash-forward-"):
			forward[k[len("upstash-forward-"):]] = v
		case lk == "upstash-workflow-runid":
			id := v
			p.RunID = &id
		case lk == "upstash-label":
			if strings.Contains(v, ",") {
				return p, errorText("a run has one label here; Upstash-Label has several")
			}
			label := v
			p.Label = &label
		case lk == "upstash-retries":
			n, err := strconv.Atoi(v)
			if err != nil {
				return p, errorText("Upstash-Retries must be an integer, got %q", v)
			}
			d.Retries = &n
		case lk == "upstash-delay":
			dl, err := scalar.ParseDuration(v)
			if err != nil {
				return p, errorText("Upstash-Delay: %v", err)
			}
			d.Delay = &dl
		case lk == "upstash-not-before":
			secs, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return p, errorText("Upstash-Not-Before must be Unix seconds, got %q", v)
			}
			dl := max(0, time.Unix(secs, 0).Sub(now))
			d.Delay = &dl
		case lk == "upstash-method":
			if !strings.EqualFold(v, http.MethodPost) {
				return p, errorText("only POST is dispatched, not %s", v)
			}
		case lk == "content-type":
		case ignored(lk):
		case strings.HasPrefix(lk, "upstash-"):
			return p, errorText("%s is not supported", k)
		}
	}
	if len(forward) > 0 {
		h, err := json.Marshal(forward)
		if err != nil {
			return p, err
		}
		d.Headers = h
	}
	p.Dispatch = d
	if m.Body != nil {
		body, err := eventDataOf([]byte(*m.Body))
		if err != nil {
			return p, err
		}
		p.Body = body
	}
	return p, nil
}

func ignored(lowerName string) bool {
	for _, h := range ignoredHeaders {
		if lowerName == h || (strings.HasSuffix(h, "-") && strings.HasPrefix(lowerName, h)) || strings.HasPrefix(lowerName, h+"-") {
			return true
		}
	}
	return false
}

// errorText is a message about one batch message.
func errorText(format string, args ...any) error { return fmt.Errorf(format, args...) }
