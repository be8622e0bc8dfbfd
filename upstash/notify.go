package upstash

import (
	"encoding/json"
	"io"
	"net/http"
	"unicode/utf8"

	"rendezvous/engine"
)

// notify serves POST /v2/notify/{eventId} (broadcast) and
// POST /v2/notify/{workflowRunId}/{eventId} (targeted, with lookback).
// The raw body is the event data (see eventDataOf). The answer is the list
// of waiters resolved, empty when nobody was waiting, including when a
// targeted notify stored the event as lookback (Upstash answers the same;
// GraphQL's notify and workflowRun show the stored event).
func (a *api) notify(c *call) (any, error) {
	body, err := io.ReadAll(c.Body)
	if err != nil {
		return nil, err
	}
	data, err := eventDataOf(body)
	if err != nil {
		return nil, err
	}
	p := engine.NotifyParams{EventID: c.PathValue("eventId"), EventData: data}
	if id := c.PathValue("workflowRunId"); id != "" {
		p.RunID = &id
	}
	res, err := a.eng.Notify(c.Context(), p)
	if err != nil {
		return nil, err
	}
	return notifyResponsesOf(res), nil
}

// eventDataOf turns a raw body into event data: JSON if it parses (the npm
// client sends JSON.stringify(eventData) for anything but a string), else a
// JSON string of the body (the client sends a string as it is, so a string
// stays a string); an empty body is no data. A string that is itself valid
// JSON text ("42", "{}") cannot be told from that value: Upstash's own
// workflows read it the same way.
func eventDataOf(body []byte) (json.RawMessage, error) {
	if len(body) == 0 {
		return nil, nil
	}
	if !utf8.Valid(body) {
		return nil, apiErrorf(http.StatusBadRequest, codeBadUserInput, "the body (eventData) is not valid UTF-8")
	}
	if json.Valid(body) {
		return body, nil
	}
	s, err := json.Marshal(string(body))
	if err != nil {
		return nil, err
	}
	return s, nil
}
