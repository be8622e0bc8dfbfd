package metrics

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"rendezvous/engine"
	"rendezvous/storage"
)

func TestEverySeriesStartsAtZero(t *testing.T) {
	m := New()
	fams, err := m.Registry().Gather()
	require.NoError(t, err)
	series := map[string]int{}
	for _, f := range fams {
		series[f.GetName()] = len(f.GetMetric())
	}
	require.Equal(t, len(triggerCreated), series["rendezvous_triggers_total"])
	require.Equal(t, len(notifyKinds)*len(notifyResults), series["rendezvous_notifies_total"])
	require.Equal(t, len(waiterOutcomes), series["rendezvous_waiters_ended_total"])
	require.Equal(t, len(lookbackSteps), series["rendezvous_lookback_events_total"])
	require.Equal(t, len(retryCauses), series["rendezvous_db_retries_total"])
	require.Equal(t, len(ErrorCodes), series["rendezvous_graphql_errors_total"])
	require.Equal(t, len(transports), series["rendezvous_open_connections"])
	require.Equal(t, len(operationTypes), series["rendezvous_graphql_operation_duration_seconds"])
	for _, name := range []string{"rendezvous_live_subscriptions", "rendezvous_waiters_waiting", "rendezvous_lookback_events_pending", "rendezvous_delivery_duration_seconds", "go_goroutines", "process_cpu_seconds_total"} {
		require.Contains(t, series, name)
	}
	require.Zero(t, testutil.ToFloat64(m.notifies.WithLabelValues("broadcast", "resolved")))
}

// Two services in one process each have their own registry.
func TestMetricsAreIndependent(t *testing.T) {
	a, b := New(), New()
	a.RunTriggered(true)
	require.Equal(t, 1.0, testutil.ToFloat64(a.triggers.WithLabelValues("true")))
	require.Zero(t, testutil.ToFloat64(b.triggers.WithLabelValues("true")))
}

func TestRecordersMoveTheirSeries(t *testing.T) {
	m := New()
	m.RunTriggered(true)
	m.RunTriggered(false)
	m.NotifyDone(engine.NotifyTargeted, engine.NotifyLookback, 3*time.Millisecond)
	m.WaitersEnded(engine.WaiterTimedOut, 3)
	m.WaitersEnded(engine.WaiterCanceled, 0)
	m.LookbackEvents(engine.LookbackExpired, 2)
	m.Backlog(7, 4)
	m.DBRetry(storage.CauseDeadlock)
	m.GraphQLError("RUN_NOT_ACTIVE")
	m.OperationDone("mutation", time.Millisecond)
	m.ConnectionOpened("sse")
	m.ConnectionOpened("websocket")
	m.ConnectionClosed("sse")
	m.SubscriptionStarted()
	m.Delivered(time.Millisecond)

	require.Equal(t, 1.0, testutil.ToFloat64(m.triggers.WithLabelValues("false")))
	require.Equal(t, 1.0, testutil.ToFloat64(m.notifies.WithLabelValues("targeted", "lookback")))
	require.Equal(t, 3.0, testutil.ToFloat64(m.waitersEnded.WithLabelValues("timed_out")))
	require.Zero(t, testutil.ToFloat64(m.waitersEnded.WithLabelValues("canceled")))
	require.Equal(t, 2.0, testutil.ToFloat64(m.lookbackEvents.WithLabelValues("expired")))
	require.Equal(t, 7.0, testutil.ToFloat64(m.waitersWaiting))
	require.Equal(t, 4.0, testutil.ToFloat64(m.lookbackPending))
	require.Equal(t, 1.0, testutil.ToFloat64(m.dbRetries.WithLabelValues("deadlock")))
	require.Equal(t, 1.0, testutil.ToFloat64(m.graphqlErrors.WithLabelValues("RUN_NOT_ACTIVE")))
	require.Zero(t, testutil.ToFloat64(m.openConnections.WithLabelValues("sse")))
	require.Equal(t, 1.0, testutil.ToFloat64(m.openConnections.WithLabelValues("websocket")))
	require.Equal(t, 1.0, testutil.ToFloat64(m.liveSubs))
	require.Equal(t, 1, testutil.CollectAndCount(m.deliveryDuration))
}

// Whatever a caller manages to put in a code or a kind, the label values
// stay within the fixed sets plus "other".
func TestLabelsAreBounded(t *testing.T) {
	m := New()
	for i := range 100 {
		code := "CODE_" + strings.Repeat("X", i)
		m.GraphQLError(code)
		m.NotifyDone(engine.NotifyKind(code), engine.NotifyOutcome(code), time.Millisecond)
		m.WaitersEnded(engine.WaiterOutcome(code), 1)
		m.LookbackEvents(engine.LookbackStep(code), 1)
		m.DBRetry(code)
		m.OperationDone(code, time.Millisecond)
		m.ConnectionOpened(code)
	}
	require.Equal(t, 100.0, testutil.ToFloat64(m.graphqlErrors.WithLabelValues(other)))
	require.Equal(t, len(ErrorCodes)+1, testutil.CollectAndCount(m.graphqlErrors))
	require.Equal(t, len(notifyKinds)*len(notifyResults)+1, testutil.CollectAndCount(m.notifies))
	require.Equal(t, len(waiterOutcomes)+1, testutil.CollectAndCount(m.waitersEnded))
	require.Equal(t, len(lookbackSteps)+1, testutil.CollectAndCount(m.lookbackEvents))
	require.Equal(t, len(retryCauses)+1, testutil.CollectAndCount(m.dbRetries))
	require.Equal(t, len(operationTypes)+1, testutil.CollectAndCount(m.operationTime))
	require.Equal(t, len(transports)+1, testutil.CollectAndCount(m.openConnections))
}

func TestHandlerServesTheTextFormat(t *testing.T) {
	m := New()
	m.NotifyDone(engine.NotifyBroadcast, engine.NotifyNone, time.Millisecond)
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, resp.Header.Get("Content-Type"), "text/plain")
	require.Contains(t, string(b), `rendezvous_notifies_total{kind="broadcast",result="none"} 1`)
	require.Contains(t, string(b), `rendezvous_notify_duration_seconds_count{kind="broadcast"} 1`)
	require.Contains(t, string(b), "# HELP rendezvous_delivery_duration_seconds")
}
