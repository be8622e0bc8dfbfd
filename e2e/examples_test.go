package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/auth"
	"rendezvous/internal/testdb"
)

// buildExample builds ./examples/<name> into the test's temp dir.
func buildExample(t *testing.T, name string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), name)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./examples/"+name)
	cmd.Dir = ".."
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return bin
}

// startExample runs a built example with the environment until the test
// ends (then it is killed).
func startExample(t *testing.T, argv []string, env ...string) *syncBuffer {
	t.Helper()
	return startExampleProc(t, argv, env...).logs
}

// exampleProc is an example's process, which a test may kill and start
// again; its output, across restarts, is in logs.
type exampleProc struct {
	t    *testing.T
	argv []string
	env  []string
	logs *syncBuffer

	cancel context.CancelFunc
	cmd    *exec.Cmd
}

func startExampleProc(t *testing.T, argv []string, env ...string) *exampleProc {
	t.Helper()
	p := &exampleProc{t: t, argv: argv, env: env, logs: &syncBuffer{}}
	p.start()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("%s log:\n%s", filepath.Base(argv[0]), p.logs.String())
		}
	})
	return p
}

func (p *exampleProc) start() {
	p.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, p.argv[0], p.argv[1:]...)
	cmd.Env = p.env
	cmd.Stdout, cmd.Stderr = p.logs, p.logs
	require.NoError(p.t, cmd.Start())
	p.cancel, p.cmd = cancel, cmd
}

// kill SIGKILLs the process and waits for it; harmless when it is not running.
func (p *exampleProc) kill() {
	if p.cmd == nil {
		return
	}
	p.cancel()
	p.cmd.Wait()
	p.cmd = nil
}

func (e *env) awaitRunState(id, state string) *runView {
	e.t.Helper()
	var r *runView
	eventually(e.t, 20*time.Second, func() bool {
		r = e.run(id)
		return r != nil && r.State == state
	}, "run %s %s", id, state)
	return r
}

// examples/worker, as a real process: it takes a run from runsToStart,
// acks it, waits for the approval in a durable step and finishes the run.
func TestExampleWorker(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		bin := buildExample(t, "worker")
		e := newEnv(t, db)
		label := uid("orders")
		startExample(t, []string{bin}, "RENDEZVOUS_URL="+e.endpoint, "RENDEZVOUS_LABEL="+label)
		var out struct {
			Trigger struct {
				WorkflowRunID string `json:"workflowRunId"`
			} `json:"trigger"`
		}
		e.ok(triggerMutation, map[string]any{"id": uid("order"), "label": label, "body": map[string]any{"total": 42}}, &out)
		run := out.Trigger.WorkflowRunID
		// The approval may come before the worker waits: it is then kept
		// as a lookback event for the run.
		eventually(t, 20*time.Second, func() bool {
			var v struct {
				WorkflowRun struct {
					AckedAt *string `json:"ackedAt"`
				} `json:"workflowRun"`
			}
			e.ok(`query($id: ID!) { workflowRun(workflowRunId: $id) { ackedAt } }`, map[string]any{"id": run}, &v)
			return v.WorkflowRun.AckedAt != nil
		}, "the worker acks the run")
		e.notify("approve-"+run, map[string]any{"by": "alice"}, run)
		r := e.awaitRunState(run, "RUN_SUCCESS")
		require.JSONEq(t, `{"approval":{"by":"alice"}}`, string(r.Result))
	})
}

// examples/endpoint, as a real process: a dispatch reaches it, its
// signature check passes, and it finishes the run; a forged request is
// refused.
func TestExampleEndpoint(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		bin := buildExample(t, "endpoint")
		port := strconv.Itoa(freePort(t))
		url := "http://127.0.0.1:" + port + "/workflow"
		e := dispatchEnv(t, db, url)
		startExample(t, []string{bin}, "RENDEZVOUS_URL="+e.endpoint, "RENDEZVOUS_SIGNING_SECRET="+signingSecret, "PORT="+port)
		var out struct {
			Trigger struct {
				WorkflowRunID string `json:"workflowRunId"`
			} `json:"trigger"`
		}
		// The endpoint may not listen yet: the dispatch retries until it does.
		e.ok(dispatchTrigger, map[string]any{"id": uid("fn"), "body": map[string]any{"x": 1}, "d": map[string]any{"url": url, "retries": 20}}, &out)
		r := e.awaitRunState(out.Trigger.WorkflowRunID, "RUN_SUCCESS")
		var res struct {
			HandledBy string          `json:"handledBy"`
			Input     json.RawMessage `json:"input"`
		}
		require.NoError(t, json.Unmarshal(r.Result, &res))
		require.Equal(t, "endpoint", res.HandledBy)
		require.JSONEq(t, `{"x":1}`, string(res.Input))
		// The endpoint finished the run before it answered: the answer is
		// recorded just after.
		eventually(t, 10*time.Second, func() bool {
			_, _, d := e.dispatchOf(out.Trigger.WorkflowRunID)
			return d.State == "DELIVERED"
		}, "the dispatch is DELIVERED (not CANCELED by the run's end)")

		// A request with a signature made with another secret is refused.
		resp := secHTTP(t, "POST", url, secHeader("Rendezvous-Signature", "t="+strconv.FormatInt(time.Now().Unix(), 10)+",v1=00ff"), strings.NewReader(`{"workflowRunId":"wfr_x"}`))
		require.Equal(t, 401, resp.Status)
	})
}

// examples/worker-ts (TypeScript, graphql-ws), compiled and run with node:
// the same workflow as examples/worker. Needs node and `npm install` in
// examples/worker-ts (.ci/run does it; RENDEZVOUS_REQUIRE_JS=1 fails
// instead of skipping).
func TestExampleWorkerTS(t *testing.T) {
	node, err := exec.LookPath("node")
	dir := filepath.Join("..", "examples", "worker-ts")
	_, modErr := os.Stat(filepath.Join(dir, "node_modules", "graphql-ws"))
	if err != nil || modErr != nil {
		if os.Getenv("RENDEZVOUS_REQUIRE_JS") == "1" {
			t.Fatalf("node (%v) and examples/worker-ts/node_modules (%v) are required", err, modErr)
		}
		t.Skip("TypeScript worker example SKIPPED: need node and `cd examples/worker-ts && npm install --no-package-lock`")
	}
	out := filepath.Join(t.TempDir(), "dist")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tsc := exec.CommandContext(ctx, node, filepath.Join("node_modules", "typescript", "bin", "tsc"), "-p", ".", "--outDir", out)
	tsc.Dir = dir
	b, err := tsc.CombinedOutput()
	require.NoError(t, err, "tsc: %s", b)
	// The compiled file imports its packages from the example's node_modules.
	require.NoError(t, os.WriteFile(filepath.Join(out, "package.json"), []byte(`{"type":"module"}`), 0o644))
	require.NoError(t, os.Symlink(filepath.Join(mustAbs(t, dir), "node_modules"), filepath.Join(out, "node_modules")))
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		label := uid("ts")
		startExample(t, []string{node, filepath.Join(out, "worker.js")}, "RENDEZVOUS_URL="+e.endpoint, "RENDEZVOUS_LABEL="+label, "PATH="+os.Getenv("PATH"))
		var trig struct {
			Trigger struct {
				WorkflowRunID string `json:"workflowRunId"`
			} `json:"trigger"`
		}
		e.ok(triggerMutation, map[string]any{"id": uid("tsrun"), "label": label}, &trig)
		run := trig.Trigger.WorkflowRunID
		e.notify("approve-"+run, "yes", run)
		r := e.awaitRunState(run, "RUN_SUCCESS")
		require.JSONEq(t, `{"approval":"yes","worker":"ts"}`, string(r.Result))
	})
}

func mustAbs(t *testing.T, p string) string {
	a, err := filepath.Abs(p)
	require.NoError(t, err)
	return a
}

// examples/serverless, as a real process: a workflow made of plain HTTP
// handlers. Its dispatch registers a callback wait with the run token and
// gives the waiter's completion URL to a fake payment provider as a webhook
// URL; the provider POSTs the charge there (JSON for one run, a form for
// the other); Rendezvous POSTs the result to the workflow's callback
// handler, which finishes the run with the provider's data (RUN_FAILED for
// a declined card, and at the deadline for a payment never completed). A
// canceled run, and a function down when its callback is due, are shown
// too. The server requires tokens and hands out run tokens, as in
// production.
func TestExampleServerless(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		bin := buildExample(t, "serverless")
		port := strconv.Itoa(freePort(t))
		base := "http://127.0.0.1:" + port
		e := dispatchEnv(t, db, base+"/workflow", secTokens)
		proc := startExampleProc(t, []string{bin}, "RENDEZVOUS_URL="+e.endpoint, "RENDEZVOUS_SIGNING_SECRET="+signingSecret,
			"RENDEZVOUS_TOKEN="+secToken, "PORT="+port, "PROVIDER_DELAY=50ms", "CALLBACK_RETRIES=20")
		logs := proc.logs

		cases := []struct{ format, card, state string }{
			{"json", "", "RUN_SUCCESS"},
			{"form", "", "RUN_SUCCESS"},
			{"json", "4000000000000002", "RUN_FAILED"},
		}
		runs := make([]string, len(cases))
		for i, c := range cases {
			var out struct {
				Trigger struct {
					WorkflowRunID string `json:"workflowRunId"`
				} `json:"trigger"`
			}
			// The example may not listen yet: the dispatch retries until it does.
			e.postOK(secAdminToken, dispatchTrigger, map[string]any{"id": uid("order"),
				"body": map[string]any{"amount": 4200 + i, "currency": "eur", "webhookFormat": c.format, "card": c.card},
				"d":    map[string]any{"url": base + "/workflow", "retries": 20}}, &out)
			runs[i] = out.Trigger.WorkflowRunID
		}

		type waiter struct {
			ID            string  `json:"id"`
			StepName      *string `json:"stepName"`
			State         string  `json:"state"`
			CompletionURL *string `json:"completionUrl"`
			Callback      *struct {
				State     string  `json:"state"`
				URL       string  `json:"url"`
				Attempts  int     `json:"attempts"`
				LastError *string `json:"lastError"`
			} `json:"callback"`
		}
		type run struct {
			State   string          `json:"state"`
			Result  json.RawMessage `json:"result"`
			Waiters []waiter        `json:"waiters"`
		}
		get := func(id string) run {
			var out struct {
				WorkflowRun run `json:"workflowRun"`
			}
			e.postOK(secAdminToken, `query($id: ID!) { workflowRun(workflowRunId: $id) {
  state result waiters { id stepName state completionUrl callback { state url attempts lastError } } } }`, map[string]any{"id": id}, &out)
			return out.WorkflowRun
		}
		resumed := func(id string) []string {
			return regexp.MustCompile(`resumed run `+regexp.QuoteMeta(id)+` \(delivery ([^,]+),`).FindAllString(logs.String(), -1)
		}

		signer, err := auth.NewDeliverySigner([]string{signingSecret})
		require.NoError(t, err)
		for i, id := range runs {
			var r run
			eventually(t, 20*time.Second, func() bool {
				r = get(id)
				return r.State != "RUN_STARTED"
			}, "run %s ends", id)
			require.Equal(t, cases[i].state, r.State, "result %s", r.Result)

			// The result holds what the provider sent to the completion URL.
			var res struct {
				Error     string         `json:"error"`
				Payment   map[string]any `json:"payment"`
				MessageID string         `json:"messageId"`
			}
			require.NoError(t, json.Unmarshal(r.Result, &res))
			require.NotEmpty(t, res.MessageID)
			if cases[i].state == "RUN_FAILED" {
				require.Equal(t, "payment failed", res.Error)
				require.Equal(t, "charge.failed", res.Payment["type"])
			} else {
				require.Equal(t, "charge.succeeded", res.Payment["type"])
			}
			if cases[i].format == "json" {
				data, _ := res.Payment["data"].(map[string]any)
				require.Equal(t, float64(4200+i), data["amount"], "result %s", r.Result)
				require.Equal(t, map[string]any{"workflowRunId": id}, data["metadata"])
				require.Regexp(t, `^ch_[0-9a-f]{16}$`, data["id"])
			} else {
				// A form body becomes a JSON object of its fields.
				require.Equal(t, strconv.Itoa(4200+i), res.Payment["amount"], "result %s", r.Result)
				require.Equal(t, id, res.Payment["workflow_run_id"])
				require.Equal(t, "eur", res.Payment["currency"])
				require.Regexp(t, `^ch_[0-9a-f]{16}$`, res.Payment["charge_id"])
			}

			// One payment step, notified, its callback delivered once.
			require.Len(t, r.Waiters, 1)
			w := r.Waiters[0]
			require.Equal(t, "payment", *w.StepName)
			require.Equal(t, "NOTIFIED", w.State)
			require.NotNil(t, w.CompletionURL)
			require.NotNil(t, w.Callback)
			require.Equal(t, base+"/workflow/callback", w.Callback.URL)
			eventually(t, 10*time.Second, func() bool {
				w := get(id).Waiters[0]
				return w.Callback.State == "DELIVERED"
			}, "the callback of %s is DELIVERED", id)
			eventually(t, 10*time.Second, func() bool { return len(resumed(id)) == 1 }, "the example logs the callback of %s", id)

			// The provider calling the completion URL again (a webhook
			// retry) completes nothing: 409.
			again := secHTTP(t, "POST", *w.CompletionURL, secHeader("Content-Type", "application/json"), strings.NewReader(`{"type":"charge.refunded"}`))
			require.Equal(t, http.StatusConflict, again.Status, again.Body)

			// The callback delivered again (same delivery id, validly
			// signed, as after a lost answer) is acknowledged, not redone.
			delivery := regexp.MustCompile(`\(delivery ([^,]+),`).FindStringSubmatch(resumed(id)[0])[1]
			body := []byte(fmt.Sprintf(`{"deliveryId":%q,"waiterId":%q,"workflowRunId":%q,"stepName":"payment","eventId":"payment-%s",`+
				`"state":"TIMED_OUT","timeout":true,"eventData":null,"messageId":null,"notifiedAt":null,"error":null}`, delivery, w.ID, id, id))
			dup := secHTTP(t, "POST", w.Callback.URL, secHeader("Rendezvous-Delivery-Id", delivery, "Rendezvous-Attempt", "2",
				"Rendezvous-Signature", signer.Sign(body, time.Now()), "Content-Type", "application/json"), bytes.NewReader(body))
			require.Equal(t, http.StatusOK, dup.Status, dup.Body)
			// A forged one (another secret) is refused.
			forged := secHTTP(t, "POST", w.Callback.URL, secHeader("Rendezvous-Delivery-Id", "forged-"+delivery,
				"Rendezvous-Signature", "t="+strconv.FormatInt(time.Now().Unix(), 10)+",v1=00ff"), bytes.NewReader(body))
			require.Equal(t, http.StatusUnauthorized, forged.Status)

			// The dispatch delivered again under a new delivery id (the
			// function lost its record of deliveries, a cold start): the
			// step is not registered again and the card not charged again.
			body = []byte(fmt.Sprintf(`{"workflowRunId":%q,"body":{"amount":%d,"webhookFormat":%q},"label":null}`, id, 4200+i, cases[i].format))
			redispatch := secHTTP(t, "POST", base+"/workflow", secHeader("Rendezvous-Delivery-Id", "dlv_again-"+id, "Rendezvous-Attempt", "1",
				"Rendezvous-Signature", signer.Sign(body, time.Now()), "Content-Type", "application/json"), bytes.NewReader(body))
			require.Less(t, redispatch.Status, 300, redispatch.Body)

			r2 := get(id)
			require.Equal(t, cases[i].state, r2.State)
			require.JSONEq(t, string(r.Result), string(r2.Result))
			require.Len(t, r2.Waiters, 1)
			require.Len(t, resumed(id), 1, "the callback was processed once")
			require.Equal(t, 1, strings.Count(logs.String(), "run "+id+": waiting for payment"), "one charge for the run")
		}
		require.Contains(t, logs.String(), "duplicate delivery")

		// A payment the customer never completes: the provider never calls
		// the completion URL; at the deadline (the example waits 1h) the
		// callback says timeout and the run ends RUN_FAILED; the URL is
		// then dead (404).
		var out struct {
			Trigger struct {
				WorkflowRunID string `json:"workflowRunId"`
			} `json:"trigger"`
		}
		e.postOK(secAdminToken, dispatchTrigger, map[string]any{"id": uid("order"),
			"body": map[string]any{"amount": 990, "card": "4000000000003220"},
			"d":    map[string]any{"url": base + "/workflow", "retries": 20}}, &out)
		id := out.Trigger.WorkflowRunID
		eventually(t, 20*time.Second, func() bool {
			return strings.Contains(logs.String(), "run "+id+": waiting for payment") && strings.Contains(logs.String(), "never comes")
		}, "the payment step of %s waits and the provider will not call", id)
		w := get(id).Waiters[0]
		require.Equal(t, "WAITING", w.State)
		require.NotNil(t, w.Callback)
		e.clock.Advance(time.Hour + time.Second)
		var r run
		eventually(t, 20*time.Second, func() bool {
			r = get(id)
			return r.State != "RUN_STARTED"
		}, "run %s ends", id)
		require.Equal(t, "RUN_FAILED", r.State)
		require.JSONEq(t, `{"error":"no payment within 1h"}`, string(r.Result))
		require.Equal(t, "TIMED_OUT", r.Waiters[0].State)
		eventually(t, 10*time.Second, func() bool { return len(resumed(id)) == 1 }, "the example logs the callback of %s", id)
		late := secHTTP(t, "POST", *w.CompletionURL, secHeader("Content-Type", "application/json"), strings.NewReader(`{"type":"charge.succeeded"}`))
		require.Equal(t, http.StatusNotFound, late.Status, late.Body)

		// The order canceled while it waits for the payment: the callback
		// tells the function (CANCELED, RUN_NOT_ACTIVE), which has nothing
		// to finish.
		e.postOK(secAdminToken, dispatchTrigger, map[string]any{"id": uid("order"),
			"body": map[string]any{"amount": 777, "card": "4000000000003220"},
			"d":    map[string]any{"url": base + "/workflow", "retries": 20}}, &out)
		id = out.Trigger.WorkflowRunID
		eventually(t, 20*time.Second, func() bool {
			return strings.Contains(logs.String(), "run "+id+": waiting for payment")
		}, "the payment step of %s waits", id)
		e.postOK(secAdminToken, `mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": id}, nil)
		eventually(t, 10*time.Second, func() bool {
			return strings.Contains(logs.String(), "run "+id+": payment step canceled") && len(resumed(id)) == 1
		}, "the example hears that %s was canceled", id)
		r = get(id)
		require.Equal(t, "RUN_CANCELED", r.State)
		require.Equal(t, "CANCELED", r.Waiters[0].State)
		require.Contains(t, logs.String(), "run "+id+": payment step canceled: workflow run "+id)

		// The function is down (SIGKILL) when the payment is confirmed:
		// the callback fails, is retried, and arrives, once, when the
		// function is back (with none of its memory).
		e.postOK(secAdminToken, dispatchTrigger, map[string]any{"id": uid("order"),
			"body": map[string]any{"amount": 1234, "card": "4000000000003220"},
			"d":    map[string]any{"url": base + "/workflow", "retries": 20}}, &out)
		id = out.Trigger.WorkflowRunID
		eventually(t, 20*time.Second, func() bool {
			return strings.Contains(logs.String(), "run "+id+": waiting for payment")
		}, "the payment step of %s waits", id)
		proc.kill()
		w = get(id).Waiters[0]
		paid := secHTTP(t, "POST", *w.CompletionURL, secHeader("Content-Type", "application/json"),
			strings.NewReader(`{"type":"charge.succeeded","data":{"id":"ch_confirmed_late","amount":1234}}`))
		require.Equal(t, http.StatusOK, paid.Status, paid.Body)
		eventually(t, 10*time.Second, func() bool {
			w := get(id).Waiters[0]
			return w.Callback.Attempts >= 1 && w.Callback.LastError != nil
		}, "the callback of %s fails while the function is down", id)
		require.Equal(t, "RUN_STARTED", get(id).State)
		proc.start()
		eventually(t, 20*time.Second, func() bool {
			r = get(id)
			return r.State != "RUN_STARTED"
		}, "run %s ends", id)
		require.Equal(t, "RUN_SUCCESS", r.State, "result %s", r.Result)
		require.JSONEq(t, `{"type":"charge.succeeded","data":{"id":"ch_confirmed_late","amount":1234}}`, string(jsonMember(t, r.Result, "payment")))
		eventually(t, 10*time.Second, func() bool { return get(id).Waiters[0].Callback.State == "DELIVERED" }, "the callback of %s is DELIVERED", id)
		eventually(t, 10*time.Second, func() bool { return len(resumed(id)) == 1 }, "the example logs the callback of %s", id)
	})
}

// jsonMember returns the member of a JSON object.
func jsonMember(t *testing.T, obj json.RawMessage, key string) json.RawMessage {
	t.Helper()
	var m map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(obj, &m))
	return m[key]
}
