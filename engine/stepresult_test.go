package engine

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/models"
)

// Results as notify steps stored them before notifyStepResult existed: the
// models encoded with their Go field names. Such rows are in databases now
// and must read back the same whatever the models become.
const (
	storedV1Resolved = `{"EventID":"order-1-paid","EventData":{"b":2,"a":"<&>"},"NotifyResponse":[{"Waiter":{"ID":"wtr_7","EventID":"order-1-paid","WorkflowRunID":"wfr_target","StepName":"approve","State":"NOTIFIED","Deadline":"2026-12-06T11:11:12.345678Z","CreatedAt":"2026-12-06T10:11:12.345678Z","Owner":"rep_X","EndedAt":"2026-12-06T10:11:13.345678Z","MessageID":"msg_ABC","EventData":null},"MessageID":"msg_ABC","WorkflowRunID":"wfr_target","Deduplicated":false,"Error":null},{"Waiter":{"ID":"wtr_8","EventID":"order-1-paid","WorkflowRunID":null,"StepName":null,"State":"NOTIFIED","Deadline":"2026-12-06T11:11:12.345678Z","CreatedAt":"2026-12-06T10:11:12.345678Z","Owner":"","EndedAt":"2026-12-06T10:11:13.345678Z","MessageID":"msg_ABC","EventData":null},"MessageID":"msg_ABC","WorkflowRunID":null,"Deduplicated":false,"Error":null}],"Lookback":null,"Deduplicated":false}`
	storedV1Lookback = `{"EventID":"e","EventData":null,"NotifyResponse":[],"Lookback":{"ID":"lbe_3","WorkflowRunID":"wfr_target","EventID":"e","EventData":[1,"two"],"MessageID":"msg_ABC","CreatedAt":"2026-12-06T10:11:12.345678Z","ExpiresAt":"2026-12-13T10:11:12.345678Z"},"Deduplicated":false}`
)

func stepResultFixtures() (resolved, lookback *models.NotifyResult) {
	at := time.Date(2026, 12, 6, 10, 11, 12, 345678000, time.UTC)
	ended := at.Add(time.Second)
	run, step, msg := "wfr_target", "approve", "msg_ABC"
	resolved = &models.NotifyResult{
		EventID: "order-1-paid", EventData: []byte(`{"b":2,"a":"<&>"}`),
		NotifyResponse: []*models.NotifyResponse{{
			Waiter: &models.Waiter{ID: "wtr_7", EventID: "order-1-paid", WorkflowRunID: &run, StepName: &step, State: models.WaiterNotified,
				Deadline: at.Add(time.Hour), CreatedAt: at, EndedAt: &ended, MessageID: &msg},
			MessageID: msg, WorkflowRunID: &run,
		}, {
			Waiter:    &models.Waiter{ID: "wtr_8", EventID: "order-1-paid", State: models.WaiterNotified, Deadline: at.Add(time.Hour), CreatedAt: at, EndedAt: &ended, MessageID: &msg},
			MessageID: msg,
		}},
	}
	lookback = &models.NotifyResult{EventID: "e", NotifyResponse: []*models.NotifyResponse{},
		Lookback: &models.LookbackEvent{ID: "lbe_3", WorkflowRunID: run, EventID: "e", EventData: []byte(`[1,"two"]`), MessageID: msg, CreatedAt: at, ExpiresAt: at.Add(7 * 24 * time.Hour)}}
	return resolved, lookback
}

func TestNotifyStepResultReadsStoredV1(t *testing.T) {
	resolved, lookback := stepResultFixtures()
	got, err := decodeNotifyStepResult([]byte(storedV1Resolved))
	require.NoError(t, err)
	require.Equal(t, resolved, got)
	require.Equal(t, `{"b":2,"a":"<&>"}`, string(got.EventData), "the bytes as first returned")
	got, err = decodeNotifyStepResult([]byte(storedV1Lookback))
	require.NoError(t, err)
	require.Equal(t, lookback, got)
}

func TestNotifyStepResultRoundTrips(t *testing.T) {
	resolved, lookback := stepResultFixtures()
	for _, r := range []*models.NotifyResult{resolved, lookback} {
		b, err := encodeNotifyStepResult(r)
		require.NoError(t, err)
		got, err := decodeNotifyStepResult(b)
		require.NoError(t, err)
		require.Equal(t, r, got)
	}
	// The format written today, pinned: a renamed field shows here.
	b, err := encodeNotifyStepResult(lookback)
	require.NoError(t, err)
	require.Equal(t, `{"v":1,"EventID":"e","EventData":null,"NotifyResponse":[],"Lookback":{"ID":"lbe_3","WorkflowRunID":"wfr_target","EventID":"e","EventData":[1,"two"],"MessageID":"msg_ABC","CreatedAt":"2026-12-06T10:11:12.345678Z","ExpiresAt":"2026-12-13T10:11:12.345678Z"}}`, string(b))
}

func TestNotifyStepResultRefusesNewerFormat(t *testing.T) {
	_, err := decodeNotifyStepResult([]byte(`{"v":2,"EventID":"e"}`))
	require.ErrorContains(t, err, "newer")
}
