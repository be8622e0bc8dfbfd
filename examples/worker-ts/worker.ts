// An example Rendezvous worker in TypeScript, with graphql-ws.
//
//   npm install && npm run build
//   RENDEZVOUS_URL=http://localhost:8080/query RENDEZVOUS_LABEL=orders npm start
//
// It takes runs from runsToStart (competing with every other worker on the
// label), acks each, waits for "approve-<run>" in a durable step, and
// finishes the run with the approval as its result. RENDEZVOUS_TOKEN, when
// set, is sent as a server token.
import { createClient, type Client } from "graphql-ws";
import WebSocket from "ws";

const endpoint = process.env.RENDEZVOUS_URL ?? "http://localhost:8080/query";
const label = process.env.RENDEZVOUS_LABEL || null;
const token = process.env.RENDEZVOUS_TOKEN;

type Run = { workflowRunId: string; body: unknown; attempts: number };
type WaitResult = { eventData: unknown; timeout: boolean };

// Mutations go over HTTP POST, each try bounded; a try that gets no answer
// (the network, a replica restarting) is made again. finishRun is safe to
// repeat: a repeat of one that had landed answers RUN_NOT_ACTIVE, which
// done() below accepts.
async function mutate<T>(query: string, variables: Record<string, unknown>, done?: (code?: string) => boolean): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      const res = await fetch(endpoint, {
        method: "POST",
        headers: { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) },
        body: JSON.stringify({ query, variables }),
        signal: AbortSignal.timeout(10_000),
      });
      const out = (await res.json()) as { data?: T; errors?: { message: string; extensions?: { code?: string } }[] };
      const e = out.errors?.[0];
      if (!e) return out.data as T;
      const code = e.extensions?.code;
      if (attempt > 1 && done?.(code)) return out.data as T;
      if (code !== "INTERNAL_SERVER_ERROR" && code !== "SERVICE_UNAVAILABLE" && code !== "OUTCOME_UNKNOWN") {
        throw Object.assign(new Error(e.message), { code, final: true });
      }
      console.error(`worker-ts: ${code}, trying again`);
    } catch (e) {
      if ((e as { final?: boolean }).final || attempt >= 5) throw e;
      console.error(`worker-ts: ${(e as Error).message}, trying again`);
    }
    await new Promise((r) => setTimeout(r, 200 * attempt));
  }
}

// The first result of a subscription (waitForEvent emits one, then completes).
function first<T>(client: Client, query: string, variables: Record<string, unknown>): Promise<T> {
  return new Promise((resolve, reject) => {
    let done = false;
    const stop = client.subscribe<T>({ query, variables }, {
      next: (r) => {
        if (r.errors?.length) reject(new Error(r.errors[0].message));
        else if (!done) { done = true; resolve(r.data as T); }
        stop();
      },
      error: reject,
      complete: () => { if (!done) reject(new Error("completed without a result")); },
    });
  });
}

async function runWorkflow(client: Client, run: Run) {
  // A durable step: if this process dies, the next worker that gets the
  // run subscribes to the same step and receives the same result.
  const r = await first<{ waitForEvent: WaitResult }>(client,
    `subscription($run: ID!, $ev: String!) {
       waitForEvent(eventId: $ev, workflowRunId: $run, stepName: "approval", timeout: "1d") { eventData timeout }
     }`, { run: run.workflowRunId, ev: `approve-${run.workflowRunId}` });
  const [state, result] = r.waitForEvent.timeout
    ? ["RUN_FAILED", { error: "no approval within a day" }]
    : ["RUN_SUCCESS", { approval: r.waitForEvent.eventData, worker: "ts" }];
  await mutate(`mutation($id: ID!, $state: RunState!, $result: JSON) {
    finishRun(workflowRunId: $id, state: $state, result: $result) { state } }`,
    { id: run.workflowRunId, state, result }, (code) => code === "RUN_NOT_ACTIVE");
  console.log(`worker-ts: finished ${run.workflowRunId} as ${state}`);
}

const client = createClient({
  url: endpoint.replace(/^http/, "ws"),
  webSocketImpl: WebSocket,
  connectionParams: token ? { Authorization: `Bearer ${token}` } : undefined,
  retryAttempts: Infinity, // a dropped connection gives our unacked runs back; come back for more
  shouldRetry: () => true,
});

client.subscribe<{ runsToStart: Run }>(
  { query: `subscription($label: String) { runsToStart(label: $label, lease: "60s", maxUnacked: 4) { workflowRunId body attempts } }`, variables: { label } },
  {
    next: async ({ data, errors }) => {
      if (errors?.length || !data) { console.error("worker-ts:", errors); return; }
      const run = data.runsToStart;
      try {
        // Ack first: from now on the run is ours alone. attempt names this
        // hand-over, so a late ack cannot take the run from its next worker.
        await mutate(`mutation($id: ID!, $attempt: Int) { ackRun(workflowRunId: $id, attempt: $attempt) { workflowRunId } }`,
          { id: run.workflowRunId, attempt: run.attempts });
      } catch (e) {
        console.log(`worker-ts: ${run.workflowRunId} is not ours (${(e as Error).message})`);
        return;
      }
      console.log(`worker-ts: started ${run.workflowRunId}`);
      runWorkflow(client, run).catch((e) => console.error(`worker-ts: ${run.workflowRunId}:`, e));
    },
    error: (e) => { console.error("worker-ts: subscription failed", e); process.exit(1); },
    complete: () => process.exit(0),
  },
);
console.log(`worker-ts: waiting for runs (label ${JSON.stringify(label)})`);
