// Drives Rendezvous with the JavaScript clients a frontend would use:
// graphql-ws (graphql-transport-ws, what GraphiQL/Playground uses),
// subscriptions-transport-ws (legacy graphql-ws protocol) and graphql-sse.
// Usage: node clients.mjs http://127.0.0.1:PORT/query
// Prints one JSON line per check and exits non-zero if any failed.
import { createClient as createWSClient } from 'graphql-ws';
import { createClient as createSSEClient } from 'graphql-sse';
import subscriptionsTransportWS from 'subscriptions-transport-ws';
import WebSocket from 'ws';

const { SubscriptionClient } = subscriptionsTransportWS;
const endpoint = process.argv[2];
const wsEndpoint = endpoint.replace(/^http/, 'ws');
const uniq = (p) => `${p}-${Date.now()}-${Math.random().toString(36).slice(2)}`;

async function gql(query, variables) {
  const res = await fetch(endpoint, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ query, variables }),
  });
  const body = await res.json();
  if (body.errors) throw new Error(`${query}: ${JSON.stringify(body.errors)}`);
  return body.data;
}

const WAIT = `subscription($ev: String!, $run: ID) {
  waitForEvent(eventId: $ev, workflowRunId: $run, timeout: "1m") { eventId eventData timeout messageId }
}`;

async function trigger() {
  return (await gql('mutation { trigger { workflowRunId } }')).trigger.workflowRunId;
}

async function untilWaiting(ev, n) {
  const deadline = Date.now() + 10000;
  while (Date.now() < deadline) {
    const d = await gql('query($ev: String!) { waiters(eventId: $ev) { id } }', { ev });
    if (d.waiters.length === n) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`no waiter on ${ev}`);
}

// subscribeOnce adapts each client to: resolve with {data} or {errors}, and
// whether the stream completed.
function viaGraphqlWS(client) {
  return (variables) => new Promise((resolve) => {
    const out = { results: [], completed: false };
    client.subscribe({ query: WAIT, variables }, {
      next: (v) => out.results.push(v),
      error: (e) => { out.error = Array.isArray(e) ? e : [e]; resolve(out); },
      complete: () => { out.completed = true; resolve(out); },
    });
  });
}

function viaSSE(client) { return viaGraphqlWS(client); }

function viaLegacy(client) {
  return (variables) => new Promise((resolve) => {
    const out = { results: [], completed: false };
    client.request({ query: WAIT, variables }).subscribe({
      next: (v) => out.results.push(v),
      error: (e) => { out.error = Array.isArray(e) ? e : [e]; resolve(out); },
      complete: () => { out.completed = true; resolve(out); },
    });
  });
}

async function checkNotified(name, subscribe) {
  const run = await trigger();
  const ev = uniq('js');
  const pending = subscribe({ ev, run });
  await untilWaiting(ev, 1);
  const data = { client: name, 'ключ': 'значение', n: [1, 2.5, null, true] };
  const n = await gql(`mutation($ev: String!, $run: ID, $d: JSON) {
    notify(eventId: $ev, workflowRunId: $run, eventData: $d) { notifyResponse { messageId } }
  }`, { ev, run, d: data });
  const out = await pending;
  const got = out.results[0]?.data?.waitForEvent;
  const ok = out.results.length === 1 && out.completed && got &&
    JSON.stringify(got.eventData) === JSON.stringify(data) &&
    got.messageId === n.notify.notifyResponse[0].messageId && got.timeout === false;
  return { check: `${name}: notified`, ok, out };
}

async function checkCanceled(name, subscribe) {
  const run = await trigger();
  const ev = uniq('js-cancel');
  const pending = subscribe({ ev, run });
  await untilWaiting(ev, 1);
  await gql('mutation($run: ID!) { cancel(workflowRunId: $run) { state } }', { run });
  const out = await pending;
  const errs = out.error ?? out.results.flatMap((r) => r.errors ?? []);
  const ok = errs.length > 0 && errs[0].extensions?.code === 'RUN_NOT_ACTIVE';
  return { check: `${name}: canceled run → RUN_NOT_ACTIVE`, ok, out };
}

async function checkLookback(name, subscribe) {
  const run = await trigger();
  const ev = uniq('js-lookback');
  await gql('mutation($ev: String!, $run: ID) { notify(eventId: $ev, workflowRunId: $run, eventData: "early") { lookback { id } } }', { ev, run });
  const out = await subscribe({ ev, run });
  const got = out.results[0]?.data?.waitForEvent;
  return { check: `${name}: lookback delivered at once`, ok: out.completed && got?.eventData === 'early', out };
}

const wsClient = createWSClient({ url: wsEndpoint, webSocketImpl: WebSocket, lazy: true, retryAttempts: 0 });
const sseClient = createSSEClient({ url: endpoint, singleConnection: false, retryAttempts: 0 });
const legacyClient = new SubscriptionClient(wsEndpoint, { reconnect: false }, WebSocket);

const clients = [
  ['graphql-ws', viaGraphqlWS(wsClient)],
  ['graphql-sse', viaSSE(sseClient)],
  ['subscriptions-transport-ws', viaLegacy(legacyClient)],
];

let failed = 0;
for (const [name, subscribe] of clients) {
  for (const check of [checkNotified, checkCanceled, checkLookback]) {
    let r;
    try {
      r = await check(name, subscribe);
    } catch (e) {
      r = { check: `${name}: ${check.name}`, ok: false, error: String(e) };
    }
    if (!r.ok) failed++;
    console.log(JSON.stringify(r.ok ? { check: r.check, ok: true } : r));
  }
}
await wsClient.dispose();
sseClient.dispose();
legacyClient.close();
process.exit(failed ? 1 : 0);
