package e2e

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
)

// A callback waiter completed by its URL is called back like one ended by
// a notify: once, with the URL's body as eventData and the completion's
// message id; a replay of the URL calls nobody back again.
func TestCompletionURLCallbackWaiter(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e, rcv, cbURL := callbackEnv(t, db)
		run, ev := e.trigger(), uid("ev")
		w := e.waitCallback(run, "s", ev, nil, map[string]any{"url": cbURL})
		u := *e.stepWaiter(run, "s").CompletionURL
		var reg struct {
			W struct {
				CompletionURL *string `json:"completionUrl"`
			} `json:"waitForEventCallback"`
		}
		e.ok(`mutation($ev: String!, $run: ID!, $cb: CallbackInput!) { waitForEventCallback(eventId: $ev, workflowRunId: $run, stepName: "s", callback: $cb) { completionUrl } }`,
			map[string]any{"ev": ev, "run": run, "cb": map[string]any{"url": cbURL}}, &reg)
		require.Equal(t, u, *reg.W.CompletionURL, "the registration hands the URL out at once")

		r := hookPost(t, u, "application/x-www-form-urlencoded", []byte("status=paid&id=pi_1"))
		require.Equal(t, http.StatusOK, r.Status, "%s", r.Raw)
		_, b := awaitCallback(t, e, rcv, run, w.ID)
		require.Equal(t, "NOTIFIED", b.State)
		require.False(t, b.Timeout)
		require.Equal(t, `{"status":"paid","id":"pi_1"}`, string(b.EventData))
		require.Equal(t, r.str("messageId"), *b.MessageID)

		again := hookPost(t, u, "text/plain", []byte("again"))
		require.Equal(t, http.StatusConflict, again.Status)
		require.Equal(t, r.str("messageId"), again.str("messageId"))
		n := e.notify(ev, "late", run)
		require.Empty(t, n.NotifyResponse)
		_, bodies := rcv.callbacks(w.ID)
		require.Len(t, bodies, 1, "called back once")
	})
}
