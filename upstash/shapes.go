package upstash

import (
	"encoding/json"
	"time"

	"rendezvous/models"
)

// waiterJSON is Upstash's Waiter. Rendezvous' waiters are not HTTP
// callbacks, so url is "" and headers {}; timeoutUrl, timeoutBody and
// timeoutHeaders are omitted (the npm client's types mark them optional).
// The fields after headers are Rendezvous' own, which Upstash's clients
// pass through untouched.
type waiterJSON struct {
	URL      string              `json:"url"`
	Deadline int64               `json:"deadline"` // Unix seconds, as Upstash
	Headers  map[string][]string `json:"headers"`

	ID            string  `json:"id"`
	EventID       string  `json:"eventId"`
	WorkflowRunID *string `json:"workflowRunId,omitempty"`
	StepName      *string `json:"stepName,omitempty"`
	CreatedAt     int64   `json:"createdAt"` // Unix milliseconds
}

func waiterOf(w *models.Waiter) waiterJSON {
	return waiterJSON{
		URL: "", Deadline: w.Deadline.Unix(), Headers: map[string][]string{},
		ID: w.ID, EventID: w.EventID, WorkflowRunID: w.WorkflowRunID, StepName: w.StepName, CreatedAt: millis(w.CreatedAt),
	}
}

// notifyResponseJSON is Upstash's NotifyResponse, one per waiter resolved.
type notifyResponseJSON struct {
	Waiter        waiterJSON `json:"waiter"`
	MessageID     string     `json:"messageId"`
	Deduplicated  bool       `json:"deduplicated"`
	Error         string     `json:"error"`
	WorkflowRunID *string    `json:"workflowRunId,omitempty"`
}

func notifyResponsesOf(res *models.NotifyResult) []notifyResponseJSON {
	out := make([]notifyResponseJSON, 0, len(res.NotifyResponse))
	for _, r := range res.NotifyResponse {
		nr := notifyResponseJSON{Waiter: waiterOf(r.Waiter), MessageID: r.MessageID, Deduplicated: r.Deduplicated || res.Deduplicated, WorkflowRunID: r.WorkflowRunID}
		if r.Error != nil {
			nr.Error = *r.Error
		}
		out = append(out, nr)
	}
	return out
}

func millis(t time.Time) int64 { return t.UnixMilli() }

// rawText is how Upstash shows a payload it was given as a raw body: a
// JSON string as its text, anything else as its JSON; "" for none. It is
// the inverse of eventDataOf, so a value round-trips as the client sent it.
func rawText(v json.RawMessage) string {
	if len(v) == 0 {
		return ""
	}
	var s string
	if v[0] == '"' && json.Unmarshal(v, &s) == nil {
		return s
	}
	return string(v)
}
