// Drives Rendezvous with Upstash's own npm Client (@upstash/workflow),
// unchanged but for baseUrl and token, checking what a user's code reads;
// plus the interplay with GraphQL (waiters registered with waitForEvent over
// SSE, runs and lookback events read with workflowRun).
// Usage: node client.mjs <base url> <server token> <workflow url prefix>
// (the last: a receiver that Rendezvous may dispatch runs to)
// Prints one JSON line per check and exits non-zero if any failed.
import { Client } from '@upstash/workflow';

const [baseUrl, token, hook] = process.argv.slice(2);
const client = new Client({ baseUrl, token });
const endpoint = `${baseUrl}/query`;
const uniq = (p) => `${p}-${Date.now()}-${Math.random().toString(36).slice(2)}`;

let failed = 0;
async function check(name, fn) {
  try {
    await fn();
    console.log(JSON.stringify({ check: name, ok: true }));
  } catch (e) {
    failed++;
    console.log(JSON.stringify({ check: name, ok: false, error: String(e && e.stack || e) }));
  }
}
function assert(cond, msg) { if (!cond) throw new Error(msg); }
function eq(got, want, msg) {
  const g = JSON.stringify(got), w = JSON.stringify(want);
  if (g !== w) throw new Error(`${msg}: got ${g}, want ${w}`);
}

async function gql(query, variables) {
  const res = await fetch(endpoint, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify({ query, variables }),
  });
  const body = await res.json();
  if (body.errors) throw new Error(`${query}: ${JSON.stringify(body.errors)}`);
  return body.data;
}

async function trigger(label, body) {
  return (await gql('mutation($label: String, $body: JSON) { trigger(label: $label, body: $body) { workflowRunId } }', { label, body })).trigger.workflowRunId;
}
async function run(id) {
  return (await gql(`query($id: ID!) { workflowRun(workflowRunId: $id) {
    state lookbackEvents { eventId eventData } waiters { stepName state } } }`, { id })).workflowRun;
}

// waitForEvent over SSE (GraphQL's own transport): resolves with the one
// result. started resolves once the waiter is registered (getWaiters or
// GraphQL waiters list it).
function waitForEvent(variables) {
  const query = `subscription($ev: String!, $run: ID, $step: String, $timeout: Duration) {
    waitForEvent(eventId: $ev, workflowRunId: $run, stepName: $step, timeout: $timeout) { eventData timeout messageId } }`;
  const p = (async () => {
    const res = await fetch(endpoint, {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'text/event-stream', authorization: `Bearer ${token}` },
      body: JSON.stringify({ query, variables }),
    });
    assert(res.ok, `SSE status ${res.status}`);
    const decoder = new TextDecoder();
    let buf = '';
    let result;
    for await (const chunk of res.body) {
      buf += decoder.decode(chunk, { stream: true });
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const frame = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const data = frame.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('');
        if (frame.includes('event: next') && data) {
          const msg = JSON.parse(data);
          if (msg.errors) throw new Error(JSON.stringify(msg.errors));
          result = msg.data.waitForEvent;
        }
        if (frame.includes('event: complete')) return result;
      }
    }
    return result;
  })();
  // Handled here too: a stream may end in an error (its run canceled)
  // before the check awaits it, which node would report as unhandled.
  p.catch(() => {});
  return p;
}

async function until(what, fn) {
  const deadline = Date.now() + 10000;
  for (let delay = 5; Date.now() < deadline; delay = Math.min(delay * 2, 50)) {
    const v = await fn();
    if (v) return v;
    await new Promise((r) => setTimeout(r, delay));
  }
  throw new Error(`timed out waiting for ${what}`);
}
async function waitersOn(ev, n) {
  return until(`${n} waiters on ${ev}`, async () => {
    const ws = await client.getWaiters({ eventId: ev });
    return ws.length === n ? ws : null;
  });
}

// expectError runs fn, which must throw Upstash's QstashError with the status
// and a body in Upstash's shape ({"error": "..."}).
async function expectError(status, fn) {
  let err;
  try { await fn(); } catch (e) { err = e; }
  assert(err, `no error, want ${status}`);
  eq(err.name, 'QstashError', `error class (${err.message})`);
  eq(err.status, status, `status (${err.message})`);
  const body = JSON.parse(err.message);
  eq(Object.keys(body), ['error'], 'error shape');
  assert(typeof body.error === 'string' && body.error.length > 0, 'error message');
  return body.error;
}

await check('notify: nobody waiting answers an empty list', async () => {
  const res = await client.notify({ eventId: uniq('nobody'), eventData: { a: 1 } });
  eq(res, [], 'notify result');
});

await check('notify: a waiter registered over GraphQL is listed by getWaiters and resolved by client.notify', async () => {
  const ev = uniq('order-paid');
  const runId = await trigger(null, null);
  const result = waitForEvent({ ev, run: runId, step: 'wait for payment', timeout: '1h' });
  const [w] = await waitersOn(ev, 1);
  eq([w.url, w.headers, w.eventId, w.workflowRunId, w.stepName], ['', {}, ev, runId, 'wait for payment'], 'waiter');
  const nowSec = Date.now() / 1000;
  assert(Math.abs(w.deadline - (nowSec + 3600)) < 60, `deadline ${w.deadline} is in Unix seconds, an hour ahead`);
  const res = await client.notify({ eventId: ev, eventData: { amount: 42, currency: 'EUR', note: 'ünïcode' } });
  eq(res.length, 1, 'one waiter notified');
  eq(res[0].waiter.workflowRunId, runId, 'notified waiter');
  eq(res[0].error, '', 'no error');
  assert(res[0].messageId, 'messageId');
  const got = await result;
  eq(got.eventData, { amount: 42, currency: 'EUR', note: 'ünïcode' }, 'eventData received');
  eq(got.messageId, res[0].messageId, 'same message');
  eq(await client.getWaiters({ eventId: ev }), [], 'no waiter left');
});

await check('notify: a string stays a string; no eventData is null', async () => {
  for (const [data, want] of [['just text', 'just text'], [undefined, null], [[1, 'two', null], [1, 'two', null]], [false, false]]) {
    const ev = uniq('kinds');
    const result = waitForEvent({ ev });
    await waitersOn(ev, 1);
    const res = await client.notify({ eventId: ev, eventData: data });
    eq(res.length, 1, 'notified');
    eq((await result).eventData, want, `eventData ${JSON.stringify(data)}`);
  }
});

await check('notify with workflowRunId: lookback seen through GraphQL workflowRun, then consumed by waitForEvent', async () => {
  const ev = uniq('lookback');
  const runId = await trigger(null, null);
  const res = await client.notify({ eventId: ev, eventData: 'early', workflowRunId: runId });
  eq(res, [], 'nobody waiting yet');
  const r = await run(runId);
  eq(r.lookbackEvents, [{ eventId: ev, eventData: 'early' }], 'stored lookback event');
  const got = await waitForEvent({ ev, run: runId, step: 'late waiter' });
  eq([got.eventData, got.timeout], ['early', false], 'delivered at once');
  eq((await run(runId)).lookbackEvents, [], 'consumed');
});

await check('notify: unknown run 404, canceled run 400, bad event id 400', async () => {
  await expectError(404, () => client.notify({ eventId: 'e', eventData: 1, workflowRunId: uniq('wfr_missing') }));
  const runId = await trigger(null, null);
  eq(await client.cancel(runId), { cancelled: 1 }, 'cancel');
  const msg = await expectError(400, () => client.notify({ eventId: 'e', eventData: 1, workflowRunId: runId }));
  assert(msg.includes('RUN_CANCELED'), msg);
  await expectError(400, () => client.notify({ eventId: 'x'.repeat(300), eventData: 1 }));
  await expectError(400, () => client.getWaiters({ eventId: 'x'.repeat(300) }));
});

await check('cancel: one id, several ids, legacy ids; unknown and ended ids count nothing', async () => {
  const a = await trigger(null, null), b = await trigger(null, null), c = await trigger(null, null);
  const ev = uniq('cancel');
  const waiting = waitForEvent({ ev, run: a, step: 's' });
  await waitersOn(ev, 1);
  eq(await client.cancel(a), { cancelled: 1 }, 'cancel(id)');
  let err;
  try { await waiting; } catch (e) { err = e; }
  assert(err && String(err).includes('RUN_NOT_ACTIVE'), `subscriber hears RUN_NOT_ACTIVE: ${err}`);
  eq((await run(a)).state, 'RUN_CANCELED', 'state');
  eq(await client.cancel([a, b, uniq('wfr_unknown')]), { cancelled: 1 }, 'cancel([ids])');
  eq(await client.cancel({ ids: c }), { cancelled: 1 }, 'cancel({ids})');
  eq(await client.cancel(c), { cancelled: 0 }, 'again');
});

await check('cancel: by label, by date range, with count; all', async () => {
  const label = uniq('lbl').replace(/[^a-zA-Z0-9._-]/g, '');
  const l1 = await trigger(label, null), l2 = await trigger(label, null);
  const other = await trigger(`${label}-b`, null);
  eq(await client.cancel({ filter: { label }, count: 1 }), { cancelled: 1 }, 'label, count 1');
  eq((await run(l2)).state, 'RUN_CANCELED', 'newest first');
  eq(await client.cancel({ filter: { label: [label, `${label}-b`] } }), { cancelled: 2 }, 'labels');
  eq((await run(l1)).state, 'RUN_CANCELED', 'l1');
  eq((await run(other)).state, 'RUN_CANCELED', 'other');
  const future = new Date(Date.now() + 3600e3);
  eq(await client.cancel({ filter: { fromDate: future } }), { cancelled: 0 }, 'nothing created in the future');
  const x = await trigger(null, null);
  const res = await client.cancel({ filter: { fromDate: Date.now() - 3600e3, toDate: future } });
  assert(res.cancelled >= 1, `date range: ${JSON.stringify(res)}`);
  eq((await run(x)).state, 'RUN_CANCELED', 'in range');
  await trigger(null, null);
  const all = await client.cancel({ all: true });
  assert(all.cancelled >= 1, `all: ${JSON.stringify(all)}`);
  eq(await client.cancel({ all: true }), { cancelled: 0 }, 'nothing left');
});

await check('cancel: filters it cannot apply are refused, not ignored', async () => {
  const msg = await expectError(400, () => client.cancel({ filter: { callerIp: '1.2.3.4' } }));
  assert(msg.includes('callerIp'), msg);
});

await check('logs: a run with its steps and state, by id and by label with cursor paging', async () => {
  const label = uniq('logs').replace(/[^a-zA-Z0-9._-]/g, '');
  const runId = await trigger(label, { order: 7 });
  const ev = uniq('paid');
  const result = waitForEvent({ ev, run: runId, step: 'wait paid' });
  await waitersOn(ev, 1);
  await client.notify({ eventId: ev, eventData: 'paid!', workflowRunId: runId });
  await result;
  waitForEvent({ ev: uniq('later'), run: runId, step: 'pending' });
  await until('pending step', async () => (await run(runId)).waiters.length === 2);

  const { runs, cursor } = await client.logs({ workflowRunId: runId });
  eq(runs.length, 1, 'one run');
  eq(cursor, undefined, 'no more pages');
  const r = runs[0];
  eq([r.workflowRunId, r.workflowState, r.label], [runId, 'RUN_STARTED', label], 'run');
  assert(Math.abs(r.workflowRunCreatedAt - Date.now()) < 60e3, 'createdAt in ms');
  eq(r.steps.map((g) => g.type), ['sequential', 'sequential', 'next'], 'groups');
  eq(r.steps[0].steps[0].stepType, 'Initial', 'initial step');
  eq(JSON.parse(r.steps[0].steps[0].out), { order: 7 }, 'initial body');
  const wait = r.steps[1].steps[0];
  eq([wait.stepName, wait.stepType, wait.waitEventId, wait.out, wait.waitTimeout, wait.state],
    ['wait paid', 'Wait', ev, 'paid!', false, 'STEP_SUCCESS'], 'wait step');
  eq([r.steps[2].steps[0].stepName, r.steps[2].steps[0].state], ['pending', 'STEP_PROGRESS'], 'pending step');

  // The same through the filter object, and the state filter.
  eq((await client.logs({ filter: { workflowRunId: runId, state: 'RUN_STARTED' } })).runs.length, 1, 'filter');
  eq((await client.logs({ filter: { workflowRunId: runId, state: 'RUN_FAILED' } })).runs.length, 0, 'state filter');

  const ids = [];
  for (let i = 0; i < 5; i++) ids.unshift(await trigger(`${label}-p`, null));
  const seen = [];
  let next;
  for (let page = 0; page < 5; page++) {
    const res = await client.logs({ filter: { label: `${label}-p` }, count: 2, cursor: next });
    seen.push(...res.runs.map((x) => x.workflowRunId));
    next = res.cursor;
    if (!next) break;
  }
  eq(seen, ids, 'all runs, newest first, once each');
  await expectError(400, () => client.logs({ filter: { state: 'DONE' } }));
});

await check('wrong token: 401 in Upstash\'s shape', async () => {
  const bad = new Client({ baseUrl, token: 'not-a-token' });
  await expectError(401, () => bad.notify({ eventId: 'e', eventData: 1 }));
  await expectError(401, () => bad.getWaiters({ eventId: 'e' }));
  await expectError(401, () => bad.logs());
  await expectError(401, () => bad.cancel({ all: true }));
});

await check('trigger: one run and a batch, ids as the client computes them, a repeated id deduplicated; logs and cancel by workflow URL', async () => {
  const label = uniq('trg').replace(/[^a-zA-Z0-9._-]/g, '');
  const own = uniq('order');
  const url = `${hook}/orders`;
  const res = await client.trigger({ url, body: { order: 1 }, workflowRunId: own, label, headers: { 'X-Tenant': 'acme' }, retries: 2, delay: '1h' });
  eq(res, { workflowRunId: `wfr_${own}` }, 'trigger result');
  const d = (await gql(`query($id: ID!) { workflowRun(workflowRunId: $id) { state label body dispatch { state url } } }`, { id: res.workflowRunId })).workflowRun;
  eq([d.state, d.label, d.body, d.dispatch.url, d.dispatch.state], ['RUN_STARTED', label, { order: 1 }, url, 'PENDING'], 'run with its dispatch, delayed');
  const again = await client.trigger({ url, body: 'other', workflowRunId: own });
  eq(again, res, 'same id again');
  eq((await run(res.workflowRunId)).state, 'RUN_STARTED', 'unchanged');

  const many = await client.trigger([{ url: `${hook}/a/1`, body: 'x' }, { url: `${hook}/a/2` }, { url: `${hook}/b` }]);
  eq(many.length, 3, 'batch');
  for (const m of many) assert(/^wfr_/.test(m.workflowRunId), m.workflowRunId);
  for (const m of many) eq((await run(m.workflowRunId)).state, 'RUN_STARTED', 'batch run');

  const logs = await client.logs({ filter: { workflowUrl: url } });
  eq(logs.runs.map((r) => [r.workflowRunId, r.workflowUrl]), [[res.workflowRunId, url]], 'logs by workflowUrl');

  eq(await client.cancel({ filter: { workflowUrl: `${hook}/a` } }), { cancelled: 0 }, 'exact URL: no run has it');
  eq(await client.cancel({ urlStartingWith: `${hook}/a/` }), { cancelled: 2 }, 'legacy urlStartingWith');
  eq(await client.cancel({ filter: { workflowUrl: `${hook}/b` } }), { cancelled: 1 }, 'exact URL');
  eq(await client.cancel({ filter: { workflowUrlStartingWith: hook } }), { cancelled: 1 }, 'prefix: the delayed one is left');
  const r = (await gql(`query($id: ID!) { workflowRun(workflowRunId: $id) { state dispatch { state } } }`, { id: res.workflowRunId })).workflowRun;
  eq([r.state, r.dispatch.state], ['RUN_CANCELED', 'CANCELED'], 'its pending dispatch canceled with it');
  await expectError(400, () => client.trigger({ url: 'http://not-allowed.example/wf' }));
  await expectError(400, () => client.trigger({ url, flowControl: { key: 'k', parallelism: 1 } }));
});

process.exit(failed ? 1 : 0);
