package engine

import (
	"context"
	"errors"

	"rendezvous/models"
)

// TriggerMany triggers several runs (a batch of Upstash's API), checking
// every one before creating any, so that a batch with a bad item creates
// nothing. The runs are then created one by one as Trigger creates them (a
// repeated id returns the existing run, Created false): a database failure
// part way leaves the earlier ones created, and repeating the batch with
// the same ids creates only the rest.
func (e *Engine) TriggerMany(ctx context.Context, ps []TriggerParams) ([]*models.TriggerResult, error) {
	for i, p := range ps {
		if err := e.checkTrigger(p); err != nil {
			var ee *Error
			if errors.As(err, &ee) {
				return nil, errorf(ee.Code, "message %d: %s", i, ee.Message)
			}
			return nil, err
		}
	}
	out := make([]*models.TriggerResult, 0, len(ps))
	for _, p := range ps {
		r, err := e.Trigger(ctx, p)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// checkTrigger makes Trigger's checks without writing anything.
func (e *Engine) checkTrigger(p TriggerParams) error {
	if p.RunID != nil {
		if _, err := e.normalizeRunID(*p.RunID); err != nil {
			return err
		}
	}
	if err := e.checkPayload("body", p.Body); err != nil {
		return err
	}
	if p.Label != nil {
		if err := e.checkText("label", *p.Label, false); err != nil {
			return err
		}
	}
	if p.Dispatch != nil {
		if _, err := e.outboxFor(p.Dispatch); err != nil {
			return err
		}
	}
	return nil
}
