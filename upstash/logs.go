package upstash

import (
	"encoding/json"
	"net/http"
	"time"

	"rendezvous/engine"
	"rendezvous/models"
)

// defaultLogsCount is Upstash's default page size for logs.
const defaultLogsCount = 10

// logs serves GET /v2/workflows/events?groupBy=workflowRunId, Upstash's
// run logs: newest first, filtered by workflowRunId, state, label
// (repeated: any of them), fromDate and toDate (Unix ms), workflowUrl (the
// dispatch URL, exactly), paged by count
// and cursor. Other filters are refused rather than ignored.
func (a *api) logs(c *call) (any, error) {
	q, err := queryOf(c)
	if err != nil {
		return nil, err
	}
	if err := onlyParams(q, "groupBy", "workflowRunId", "state", "label", "fromDate", "toDate", "count", "cursor", "workflowUrl"); err != nil {
		return nil, err
	}
	if g := q.Get("groupBy"); g != "workflowRunId" {
		return nil, apiErrorf(http.StatusBadRequest, codeBadUserInput, "groupBy must be workflowRunId (ungrouped events are not served), got %q", g)
	}
	p := engine.RunLogsParams{Labels: q["label"]}
	if v, ok, err := single(q, "workflowRunId"); err != nil {
		return nil, err
	} else if ok {
		p.RunID = &v
	}
	if v, ok, err := single(q, "workflowUrl"); err != nil {
		return nil, err
	} else if ok {
		p.DispatchURL = &v
	}
	if v, ok, err := single(q, "state"); err != nil {
		return nil, err
	} else if ok {
		s := models.RunState(v)
		if !s.IsValid() {
			return nil, apiErrorf(http.StatusBadRequest, codeBadUserInput, "state must be RUN_STARTED, RUN_SUCCESS, RUN_FAILED or RUN_CANCELED, got %q", v)
		}
		p.State = &s
	}
	if p.CreatedFrom, err = millisParam(q, "fromDate"); err != nil {
		return nil, err
	}
	if p.CreatedTo, err = millisParam(q, "toDate"); err != nil {
		return nil, err
	}
	if p.Count, err = intParam(q, "count", defaultLogsCount); err != nil {
		return nil, err
	}
	if v, _, err := single(q, "cursor"); err != nil {
		return nil, err
	} else {
		p.Cursor = v
	}
	page, err := a.eng.RunLogs(c.Context(), p)
	if err != nil {
		return nil, err
	}
	out := runLogsJSON{Cursor: page.Cursor, Runs: make([]runLogJSON, 0, len(page.Runs))}
	for _, r := range page.Runs {
		out.Runs = append(out.Runs, runLogOf(r))
	}
	return out, nil
}

// runLogsJSON is Upstash's WorkflowRunLogs; cursor is left out on the last
// page ("if no cursor is returned, there are no more runs").
type runLogsJSON struct {
	Cursor string       `json:"cursor,omitempty"`
	Runs   []runLogJSON `json:"runs"`
}

// runLogJSON is Upstash's WorkflowRunLog. workflowUrl is the dispatch URL,
// "" for runs triggered without dispatch.
type runLogJSON struct {
	WorkflowRunID          string          `json:"workflowRunId"`
	WorkflowURL            string          `json:"workflowUrl"`
	WorkflowState          models.RunState `json:"workflowState"`
	WorkflowRunCreatedAt   int64           `json:"workflowRunCreatedAt"`
	WorkflowRunCompletedAt *int64          `json:"workflowRunCompletedAt,omitempty"`
	WorkflowRunResponse    *string         `json:"workflowRunResponse,omitempty"`
	Label                  *string         `json:"label,omitempty"`
	Labels                 []string        `json:"labels,omitempty"`
	Steps                  []stepGroupJSON `json:"steps"`
}

// stepGroupJSON is Upstash's StepLogGroup: "sequential" groups of one
// finished step, then one "next" group of the steps still in progress.
type stepGroupJSON struct {
	Type  string `json:"type"`
	Steps []any  `json:"steps"`
}

// stepLogJSON is Upstash's StepLog for the steps Rendezvous has: the
// initial step (the run's body), wait steps and notify steps.
type stepLogJSON struct {
	StepID     int                 `json:"stepId"`
	StepName   string              `json:"stepName"`
	StepType   string              `json:"stepType"` // Initial, Wait, Notify
	CallType   string              `json:"callType"`
	MessageID  string              `json:"messageId"`
	Out        *string             `json:"out,omitempty"`
	Concurrent int                 `json:"concurrent"`
	State      string              `json:"state"`
	CreatedAt  int64               `json:"createdAt"`
	Retries    int                 `json:"retries"`
	Headers    map[string][]string `json:"headers"`

	WaitEventID         string `json:"waitEventId,omitempty"`
	WaitTimeoutDuration string `json:"waitTimeoutDuration,omitempty"`
	WaitTimeoutDeadline int64  `json:"waitTimeoutDeadline,omitempty"` // Unix ms
	WaitTimeout         *bool  `json:"waitTimeout,omitempty"`
}

// nextStepJSON is a step of the "next" group: a wait step still waiting
// (STEP_PROGRESS) or ended by its run's end (STEP_CANCELED).
type nextStepJSON struct {
	MessageID string `json:"messageId"`
	StepName  string `json:"stepName"`
	State     string `json:"state"`
	Retries   int    `json:"retries"`
}

func runLogOf(r *engine.RunLog) runLogJSON {
	run := r.Run
	out := runLogJSON{
		WorkflowRunID: run.WorkflowRunID, WorkflowURL: r.DispatchURL, WorkflowState: run.State,
		WorkflowRunCreatedAt: millis(run.CreatedAt), Label: run.Label,
	}
	if run.Label != nil {
		out.Labels = []string{*run.Label}
	}
	if run.State != models.RunStarted {
		ms := millis(run.UpdatedAt)
		out.WorkflowRunCompletedAt = &ms
	}
	if len(run.Result) > 0 {
		s := rawText(run.Result)
		out.WorkflowRunResponse = &s
	}
	initial := stepLogJSON{StepName: "init", StepType: "Initial", State: "STEP_SUCCESS", CreatedAt: millis(run.CreatedAt)}
	if len(run.Body) > 0 {
		s := rawText(run.Body)
		initial.Out = &s
	}
	out.Steps = append(out.Steps, sequential(initial))
	var next []any
	for i, s := range r.Steps {
		l := stepLogJSON{StepID: i + 1, StepName: s.StepName, State: "STEP_SUCCESS", CreatedAt: millis(s.CreatedAt)}
		switch s.Type {
		case models.StepNotify:
			l.StepType = "Notify"
			if s.Notify != nil {
				if len(s.Notify.NotifyResponse) > 0 {
					l.MessageID = s.Notify.NotifyResponse[0].MessageID
				} else if s.Notify.Lookback != nil {
					l.MessageID = s.Notify.Lookback.MessageID
				}
				b, _ := json.Marshal(notifyStepOut{EventID: s.Notify.EventID, EventData: s.Notify.EventData, NotifyResponse: notifyResponsesOf(s.Notify)})
				o := string(b)
				l.Out = &o
			}
			out.Steps = append(out.Steps, sequential(l))
		case models.StepWaitForEvent:
			w := s.Waiter
			if w == nil {
				continue // its waiter was purged with nothing left to show
			}
			if w.State == models.WaiterWaiting || w.State == models.WaiterCanceled {
				state := "STEP_PROGRESS"
				if w.State == models.WaiterCanceled {
					state = "STEP_CANCELED"
				}
				next = append(next, nextStepJSON{StepName: s.StepName, State: state})
				continue
			}
			l.StepType = "Wait"
			l.WaitEventID = s.EventID
			l.WaitTimeoutDuration = (w.Deadline.Sub(w.CreatedAt) / time.Second * time.Second).String()
			l.WaitTimeoutDeadline = millis(w.Deadline)
			timedOut := w.State == models.WaiterTimedOut
			l.WaitTimeout = &timedOut
			if w.MessageID != nil {
				l.MessageID = *w.MessageID
			}
			if !timedOut {
				o := rawText(w.EventData)
				l.Out = &o
			}
			out.Steps = append(out.Steps, sequential(l))
		}
	}
	if len(next) > 0 {
		out.Steps = append(out.Steps, stepGroupJSON{Type: "next", Steps: next})
	}
	return out
}

// notifyStepOut is what a notify step's out holds, as Upstash's
// context.notify returns it.
type notifyStepOut struct {
	EventID        string               `json:"eventId"`
	EventData      json.RawMessage      `json:"eventData"`
	NotifyResponse []notifyResponseJSON `json:"notifyResponse"`
}

func sequential(l stepLogJSON) stepGroupJSON {
	l.CallType, l.Concurrent, l.Headers = "step", 1, map[string][]string{}
	return stepGroupJSON{Type: "sequential", Steps: []any{l}}
}
