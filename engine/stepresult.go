package engine

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	"rendezvous/models"
)

// notifyStepResult is how a notify step's first result is kept in
// steps.result, for its repeats to return. It is a storage format of its
// own: its JSON names are spelled out here and never follow the API models,
// so renaming a models field cannot make the results stored before
// unreadable. Change it only by adding fields, or by a new version that
// decodeNotifyStepResult still reads the old way.
//
// Version 1 is the format written before this type existed (the models
// encoded with their Go field names); rows of that time carry no "v" and
// a few fields this type ignores (Owner, Deduplicated, the waiters'
// EventData, always null).
type notifyStepResult struct {
	V              int                  `json:"v,omitempty"`
	EventID        string               `json:"EventID"`
	EventData      json.RawMessage      `json:"EventData"`
	NotifyResponse []notifyStepResponse `json:"NotifyResponse"`
	Lookback       *notifyStepLookback  `json:"Lookback"`
}

type notifyStepResponse struct {
	Waiter        notifyStepWaiter `json:"Waiter"`
	MessageID     string           `json:"MessageID"`
	WorkflowRunID *string          `json:"WorkflowRunID"`
	Error         *string          `json:"Error"`
}

type notifyStepWaiter struct {
	ID            string     `json:"ID"`
	EventID       string     `json:"EventID"`
	WorkflowRunID *string    `json:"WorkflowRunID"`
	StepName      *string    `json:"StepName"`
	State         string     `json:"State"`
	Deadline      time.Time  `json:"Deadline"`
	CreatedAt     time.Time  `json:"CreatedAt"`
	EndedAt       *time.Time `json:"EndedAt"`
	MessageID     *string    `json:"MessageID"`
}

type notifyStepLookback struct {
	ID            string          `json:"ID"`
	WorkflowRunID string          `json:"WorkflowRunID"`
	EventID       string          `json:"EventID"`
	EventData     json.RawMessage `json:"EventData"`
	MessageID     string          `json:"MessageID"`
	CreatedAt     time.Time       `json:"CreatedAt"`
	ExpiresAt     time.Time       `json:"ExpiresAt"`
}

const notifyStepResultVersion = 1

// encodeNotifyStepResult keeps a notify step's first result for its
// repeats. The data is in it once (the waiters' copies are left out: the
// Waiter type does not show them), and HTML characters are not escaped, so
// a repeat returns the same bytes.
func encodeNotifyStepResult(r *models.NotifyResult) ([]byte, error) {
	s := notifyStepResult{
		V: notifyStepResultVersion, EventID: r.EventID, EventData: r.EventData,
		NotifyResponse: make([]notifyStepResponse, len(r.NotifyResponse)),
	}
	for i, resp := range r.NotifyResponse {
		w := resp.Waiter
		s.NotifyResponse[i] = notifyStepResponse{
			Waiter: notifyStepWaiter{
				ID: w.ID, EventID: w.EventID, WorkflowRunID: w.WorkflowRunID, StepName: w.StepName, State: string(w.State),
				Deadline: w.Deadline, CreatedAt: w.CreatedAt, EndedAt: w.EndedAt, MessageID: w.MessageID,
			},
			MessageID: resp.MessageID, WorkflowRunID: resp.WorkflowRunID, Error: resp.Error,
		}
	}
	if lb := r.Lookback; lb != nil {
		s.Lookback = &notifyStepLookback{
			ID: lb.ID, WorkflowRunID: lb.WorkflowRunID, EventID: lb.EventID, EventData: lb.EventData,
			MessageID: lb.MessageID, CreatedAt: lb.CreatedAt, ExpiresAt: lb.ExpiresAt,
		}
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(&s); err != nil {
		return nil, err
	}
	return bytes.TrimRight(buf.Bytes(), "\n"), nil
}

// decodeNotifyStepResult reads a stored result back into the API's shape.
func decodeNotifyStepResult(b []byte) (*models.NotifyResult, error) {
	var s notifyStepResult
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, err
	}
	if s.V > notifyStepResultVersion {
		return nil, fmt.Errorf("stored by a newer version (format %d; this binary reads up to %d)", s.V, notifyStepResultVersion)
	}
	r := &models.NotifyResult{EventID: s.EventID, EventData: nullJSON(s.EventData), NotifyResponse: make([]*models.NotifyResponse, len(s.NotifyResponse))}
	for i, resp := range s.NotifyResponse {
		w := resp.Waiter
		r.NotifyResponse[i] = &models.NotifyResponse{
			Waiter: &models.Waiter{
				ID: w.ID, EventID: w.EventID, WorkflowRunID: w.WorkflowRunID, StepName: w.StepName, State: models.WaiterState(w.State),
				Deadline: w.Deadline, CreatedAt: w.CreatedAt, EndedAt: w.EndedAt, MessageID: w.MessageID,
			},
			MessageID: resp.MessageID, WorkflowRunID: resp.WorkflowRunID, Error: resp.Error,
		}
	}
	if lb := s.Lookback; lb != nil {
		r.Lookback = &models.LookbackEvent{
			ID: lb.ID, WorkflowRunID: lb.WorkflowRunID, EventID: lb.EventID, EventData: nullJSON(lb.EventData),
			MessageID: lb.MessageID, CreatedAt: lb.CreatedAt, ExpiresAt: lb.ExpiresAt,
		}
	}
	return r, nil
}
