package engine

import (
	"encoding/json"
	"strings"
	"time"
	"unicode/utf8"
)

// RunIDPrefix starts every run id. A caller-chosen id X becomes wfr_X
// (Upstash's rule); an id that already starts with wfr_ is taken as it is,
// so the id trigger returned can be passed back anywhere.
const RunIDPrefix = "wfr_"

func (e *Engine) checkText(field, v string, required bool) error {
	if v == "" {
		if required {
			return errorf(CodeBadUserInput, "%s must not be empty", field)
		}
		return nil
	}
	if len(v) > e.cfg.MaxIDBytes {
		return errorf(CodeBadUserInput, "%s is %d bytes; at most %d are allowed", field, len(v), e.cfg.MaxIDBytes)
	}
	if !utf8.ValidString(v) {
		return errorf(CodeBadUserInput, "%s is not valid UTF-8", field)
	}
	if strings.ContainsRune(v, 0) {
		return errorf(CodeBadUserInput, "%s must not contain NUL characters", field)
	}
	return nil
}

func (e *Engine) checkEventID(id string) error { return e.checkText("eventId", id, true) }

// normalizeRunID validates a run id given by a caller and adds the prefix.
func (e *Engine) normalizeRunID(id string) (string, error) {
	own := strings.TrimPrefix(id, RunIDPrefix)
	if own == "" {
		return "", errorf(CodeBadUserInput, "workflowRunId must not be empty")
	}
	if err := e.checkText("workflowRunId", own, true); err != nil {
		return "", err
	}
	return RunIDPrefix + own, nil
}

func (e *Engine) checkPayload(field string, v json.RawMessage) error {
	if len(v) > e.cfg.MaxPayloadBytes {
		return errorf(CodePayloadTooLarge, "%s is %d bytes; at most %d are allowed", field, len(v), e.cfg.MaxPayloadBytes)
	}
	if len(v) > 0 && !json.Valid(v) {
		return errorf(CodeBadUserInput, "%s is not valid JSON", field)
	}
	if !utf8.Valid(v) { // json.Valid lets invalid UTF-8 inside strings through
		return errorf(CodeBadUserInput, "%s is not valid UTF-8", field)
	}
	return nil
}

// nullJSON treats an explicit JSON null like no value, so that it is stored
// as NULL and returned as null.
func nullJSON(v json.RawMessage) json.RawMessage {
	if string(v) == "null" {
		return nil
	}
	return v
}

func (e *Engine) timeout(t *time.Duration) (time.Duration, error) {
	if t == nil {
		return e.cfg.DefaultTimeout, nil
	}
	switch {
	case *t <= 0:
		return 0, errorf(CodeBadUserInput, "timeout must be positive, got %s", *t)
	case *t > e.cfg.MaxTimeout:
		return 0, errorf(CodeBadUserInput, "timeout %s is over the maximum of %s", *t, e.cfg.MaxTimeout)
	}
	return *t, nil
}
