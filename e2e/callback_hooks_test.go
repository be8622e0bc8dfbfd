package e2e

// A callback waiter completed through its completion URL is called back
// with the posted bytes verbatim: the completion ends the waiter through the
// same WaiterEnd that makes its callback due.

import (
	"bytes"
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
)

func TestCallbackThroughCompletionURL(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e, rcv, url := callbackEnv(t, db)
		run, ev := e.trigger(), uid("cb-hook")
		var out struct {
			W struct {
				ID            string  `json:"id"`
				CompletionURL *string `json:"completionUrl"`
			} `json:"waitForEventCallback"`
		}
		e.ok(`mutation($ev: String!, $run: ID!, $cb: CallbackInput!) { waitForEventCallback(eventId: $ev, workflowRunId: $run, stepName: "s", callback: $cb) { id completionUrl } }`,
			map[string]any{"ev": ev, "run": run, "cb": map[string]any{"url": url}}, &out)
		require.NotNil(t, out.W.CompletionURL)
		resp, err := http.Post(*out.W.CompletionURL, "application/json", bytes.NewReader([]byte(`{"b":1,"a":"<&>"}`)))
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, 200, resp.StatusCode)
		raw, b := awaitCallback(t, e, rcv, run, out.W.ID)
		require.Equal(t, "NOTIFIED", b.State)
		require.Equal(t, `{"b":1,"a":"<&>"}`, string(b.EventData), "%s", raw)
	})
}
