// Uses GraphQL Playground (GraphiQL 4) in headless Chromium as a person
// would: paste an operation into the query editor, press the run button, read
// the result pane. Run by e2e/browser_test.go.
//
// Usage: node playground.mjs http://127.0.0.1:PORT/ [screenshot.png]
//
// 1. The README's lookback race: trigger, notify (no waiter yet: stored as a
//    lookback event), then waitForEvent, whose result is there at once.
// 2. A live wait: waitForEvent runs in the page; once its waiter is WAITING,
//    this script notifies with fetch, and the result pane shows the eventData.
// 3. The README's two tabs: waitForEvent in one Playground tab, notify pasted
//    into a second tab.
//
// Chromium is Debian's (/usr/bin/chromium, or RENDEZVOUS_CHROMIUM) with a
// fresh profile and no network beyond the page's own origins; every request
// the page makes must go to the local service or the local asset server.
// Prints one line per step and exits non-zero on the first failure, after a
// screenshot of the page at that moment (<screenshot>-failure.png). On
// success it leaves <screenshot>-lookback.png (the lookback result),
// <screenshot>-waiting.png (the live wait before the notify) and
// <screenshot> (the live result); <screenshot> is /tmp/playground.png unless
// given.
import { chromium } from 'playwright-core';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isDeepStrictEqual } from 'node:util';

const pageURL = process.argv[2];
if (!pageURL) {
  console.error('usage: node playground.mjs http://127.0.0.1:PORT/ [screenshot.png]');
  process.exit(2);
}
const endpoint = new URL('/query', pageURL).href;
const screenshot = process.argv[3] || '/tmp/playground.png';
const executablePath = process.env.RENDEZVOUS_CHROMIUM || '/usr/bin/chromium';
const TIMEOUT = 20000; // any single wait in the page
const uniq = (p) => `${p}-${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(2)}s]`, ...a);

function check(cond, msg, detail) {
  if (!cond) throw new Error(detail === undefined ? msg : `${msg}: ${JSON.stringify(detail)}`);
}

// gql is the "second request": a plain POST from outside the browser.
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

// untilWaiting polls the waiters query until the run's waiter on the event is
// WAITING (the subscription in the page has registered).
async function untilWaiting(eventId, runId) {
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    const d = await gql('query($ev: String!) { waiters(eventId: $ev) { id workflowRunId state } }', { ev: eventId });
    const w = d.waiters.find((w) => w.workflowRunId === runId && w.state === 'WAITING');
    if (w) return w;
    check(Date.now() < deadline, `no WAITING waiter on ${eventId} for ${runId} within ${TIMEOUT}ms`, d.waiters);
    await new Promise((r) => setTimeout(r, 25)); // polling interval of the condition
  }
}

// Playground drives one GraphiQL page.
class Playground {
  constructor(page, name) {
    this.page = page;
    this.name = name;
    this.editor = page.locator('.graphiql-query-editor .CodeMirror');
    this.run = page.locator('button.graphiql-execute-button');
    this.result = page.locator('.result-window .CodeMirror');
  }

  async open() {
    await this.page.goto(pageURL);
    await this.editor.waitFor({ state: 'visible', timeout: TIMEOUT });
    await this.run.waitFor({ state: 'visible', timeout: TIMEOUT });
    log(`${this.name}: Playground loaded (${await this.page.title()})`);
  }

  // paste replaces the query editor's text as a person does: click into it,
  // select all, paste.
  async paste(text) {
    await this.editor.click();
    await this.page.keyboard.press('ControlOrMeta+A');
    await this.page.keyboard.press('Backspace');
    await this.page.keyboard.insertText(text);
    await this.page.keyboard.press('ControlOrMeta+Home'); // show the start of the text
    const got = await this.editor.evaluate((el) => el.CodeMirror.getValue());
    check(got === text, `${this.name}: the editor holds something else than what was pasted`, got);
    // GraphiQL parses the editor's text 100ms after the last change and picks
    // the transport (HTTP, or the websocket for a subscription) from that
    // parse: wait until it has parsed this text, as a person's pause would.
    await this.page
      .waitForFunction(
        (text) => document.querySelector('.graphiql-query-editor .CodeMirror')?.CodeMirror.documentAST?.loc?.source?.body === text,
        text,
        { timeout: TIMEOUT },
      )
      .catch((err) => {
        throw new Error(`${this.name}: GraphiQL did not parse the pasted operation: ${err.message.split('\n')[0]}`);
      });
  }

  async resultText() {
    return this.result.evaluate((el) => el.CodeMirror.getValue());
  }

  async label() {
    return this.run.getAttribute('aria-label');
  }

  // execute presses the run button and returns once GraphiQL is running the
  // operation or already done with it (the result pane no longer shows the
  // previous result).
  async execute(text) {
    await this.paste(text);
    const before = await this.resultText();
    check((await this.label()).startsWith('Execute'), `${this.name}: run button not ready`, await this.label());
    await this.run.click();
    await this.page.waitForFunction(
      (before) => {
        const label = document.querySelector('button.graphiql-execute-button')?.getAttribute('aria-label') || '';
        const result = document.querySelector('.result-window .CodeMirror')?.CodeMirror.getValue();
        return label.startsWith('Stop') || result !== before;
      },
      before,
      { timeout: TIMEOUT },
    );
  }

  // waitResult waits until the result pane holds JSON for which pred is
  // true, and returns it.
  async waitResult(what, pred) {
    let last = '';
    const deadline = Date.now() + TIMEOUT;
    for (;;) {
      // Each round waits for the result pane to change, not for time.
      const handle = await this.page
        .waitForFunction(
          (last) => {
            const v = document.querySelector('.result-window .CodeMirror')?.CodeMirror.getValue() || '';
            return v !== last && v.trim() !== '' ? v : false;
          },
          last,
          { timeout: Math.max(1, deadline - Date.now()) },
        )
        .catch((err) => {
          throw new Error(`${this.name}: ${what}: not in the result pane within ${TIMEOUT}ms; it shows ${JSON.stringify(last)} (${err.message.split('\n')[0]})`);
        });
      last = await handle.jsonValue();
      let parsed;
      try {
        parsed = JSON.parse(last);
      } catch {
        continue; // not (yet) JSON, e.g. a streaming placeholder
      }
      if (pred(parsed)) return parsed;
    }
  }

  // untilIdle waits for the run button to offer "Execute" again: the
  // operation (for a subscription, the stream) has ended.
  async untilIdle(what) {
    await this.page
      .waitForFunction(
        () => (document.querySelector('button.graphiql-execute-button')?.getAttribute('aria-label') || '').startsWith('Execute'),
        null,
        { timeout: TIMEOUT },
      )
      .catch(async (err) => {
        throw new Error(`${this.name}: ${what}: still running (${await this.label()}): ${err.message.split('\n')[0]}`);
      });
  }

  // do runs a query or mutation and returns its data; errors fail.
  async do(what, text) {
    await this.execute(text);
    const r = await this.waitResult(what, (r) => r.data !== undefined || r.errors !== undefined);
    check(!r.errors, `${this.name}: ${what} failed`, r);
    await this.untilIdle(what);
    log(`${this.name}: ${what}: ${JSON.stringify(r.data)}`);
    return r.data;
  }
}

// Websocket frames of all pages, with the time they passed: they show which
// transport GraphiQL used and when the server answered.
const frames = [];
function watchSockets(page, name) {
  page.on('websocket', (ws) => {
    const record = (dir) => (f) => {
      let msg;
      try {
        msg = JSON.parse(String(f.payload));
      } catch {
        msg = { type: 'unparsable', payload: String(f.payload) };
      }
      frames.push({ at: Date.now(), page: name, dir, msg });
    };
    ws.on('framesent', record('sent'));
    ws.on('framereceived', record('received'));
  });
}

// subscribed finds the graphql-transport-ws subscribe frame that carried the
// operation mentioning marker, and the first frame the server sent back for it.
function subscribed(marker) {
  const sub = frames.find((f) => f.dir === 'sent' && f.msg.type === 'subscribe' && f.msg.payload?.query?.includes(marker));
  check(sub, `no websocket subscribe frame for ${marker}`, frames.map((f) => f.msg.type));
  const reply = frames.find((f) => f.dir === 'received' && f.msg.id === sub.msg.id && f.at >= sub.at);
  return { sub, reply };
}

const userDataDir = await mkdtemp(join(tmpdir(), 'rendezvous-chromium-'));
const lookbackShot = screenshot.replace(/(\.png)?$/, '-lookback.png');
const waitingShot = screenshot.replace(/(\.png)?$/, '-waiting.png');
let context;
let page;
const foreign = [];
const problems = [];
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    timeout: 60000,
  });
  context.on('request', (req) => {
    const u = new URL(req.url());
    if (['http:', 'https:', 'ws:', 'wss:'].includes(u.protocol) && u.hostname !== '127.0.0.1' && u.hostname !== 'localhost') {
      foreign.push(req.url());
    }
  });
  // The browser's own request for /favicon.ico is a 404: the service has no
  // icon, which is harmless; anything else that fails is a problem.
  const harmless = (url) => new URL(url, pageURL).pathname === '/favicon.ico';
  context.on('response', (res) => {
    if (res.status() >= 400 && !harmless(res.url())) problems.push(`HTTP ${res.status()}: ${res.url()}`);
  });
  context.on('requestfailed', (req) => problems.push(`request failed: ${req.url()}: ${req.failure()?.errorText}`));
  context.on('weberror', (err) => problems.push(`page error: ${err.error().message}`));
  context.on('console', (msg) => {
    const where = msg.location().url;
    if (msg.type() === 'error' && !(where && harmless(where))) problems.push(`console error: ${msg.text()} (${where})`);
  });

  page = context.pages()[0] || (await context.newPage());
  watchSockets(page, 'tab 1');
  const pg = new Playground(page, 'tab 1');
  await pg.open();

  // 1. The README's lookback race: the notify arrives before the wait.
  {
    const id = uniq('race');
    const t = await pg.do('trigger', `mutation { trigger(workflowRunId: "${id}") { workflowRunId created } }`);
    check(isDeepStrictEqual(t.trigger, { workflowRunId: `wfr_${id}`, created: true }), 'trigger', t);

    const n = await pg.do('notify (no waiter yet)',
      `mutation { notify(eventId: "ready", workflowRunId: "wfr_${id}", eventData: "early bird") { lookback { id messageId } } }`);
    check(n.notify.lookback?.id && n.notify.lookback?.messageId, 'notify should find no waiter and store a lookback event', n);

    await pg.execute(`subscription { waitForEvent(eventId: "ready", workflowRunId: "wfr_${id}") { eventData messageId } }`);
    const r = await pg.waitResult('waitForEvent after the lookback', (r) => r.data?.waitForEvent || r.errors);
    check(isDeepStrictEqual(r, { data: { waitForEvent: { eventData: 'early bird', messageId: n.notify.lookback.messageId } } }),
      'waitForEvent should receive the lookback event', r);
    await pg.untilIdle('waitForEvent after the lookback');
    const { sub, reply } = subscribed(id);
    check(reply?.msg.type === 'next', 'the first answer to the subscription should be its result', reply?.msg);
    log(`tab 1: waitForEvent over the websocket got the lookback event ${reply.at - sub.at}ms after subscribing, then completed: ${JSON.stringify(r.data)}`);
    await page.screenshot({ path: lookbackShot });
  }

  // 2. A live wait: the subscription first, then the notify as a second
  //    request, from outside the browser.
  {
    const id = uniq('live');
    const t = await pg.do('trigger', `mutation { trigger(workflowRunId: "${id}", label: "browser") { workflowRunId created } }`);
    const run = t.trigger.workflowRunId;
    await pg.execute(`subscription {
  waitForEvent(eventId: "paid", workflowRunId: "${run}", stepName: "await-payment", timeout: "1m") {
    eventId eventData timeout waiterId messageId notifiedAt
  }
}`);
    const w = await untilWaiting('paid', run);
    check((await pg.label()).startsWith('Stop'), 'the subscription should be running in the page', await pg.label());
    const before = await pg.resultText();
    check(before.trim() === '', 'the result pane should be empty before the notify', before);
    log(`tab 1: waitForEvent is running, waiter ${w.id} is WAITING, the result pane is empty`);
    await page.screenshot({ path: waitingShot });

    const eventData = { paid: true, amount: 42, from: 'node' };
    const n = await gql(`mutation($run: ID!, $data: JSON) {
      notify(eventId: "paid", workflowRunId: $run, eventData: $data) { notifyResponse { messageId waiter { id state } } lookback { id } }
    }`, { run, data: eventData });
    const resolved = n.notify.notifyResponse;
    check(n.notify.lookback === null && resolved.length === 1 && resolved[0].waiter.id === w.id && resolved[0].waiter.state === 'NOTIFIED',
      'the notify should resolve the waiting subscription', n);
    const notifiedAt = Date.now();
    log(`node: notify resolved waiter ${w.id}`);

    const r = await pg.waitResult('live waitForEvent', (r) => r.data?.waitForEvent || r.errors);
    check(!r.errors, 'live waitForEvent failed', r);
    const got = r.data.waitForEvent;
    check(got.eventId === 'paid' && isDeepStrictEqual(got.eventData, eventData) && got.timeout === false
      && got.waiterId === w.id && got.messageId === resolved[0].messageId && typeof got.notifiedAt === 'string',
    'the result pane should show the notified event', r);
    log(`tab 1: ${Date.now() - notifiedAt}ms after the notify the result pane shows ${JSON.stringify(got)}`);
    await pg.untilIdle('live waitForEvent');
    await page.screenshot({ path: screenshot });
  }

  // 3. The README's way: waitForEvent in one Playground tab, the notify
  //    pasted into a second one.
  {
    const id = uniq('tabs');
    await pg.do('trigger', `mutation { trigger(workflowRunId: "${id}") { workflowRunId } }`);
    await pg.execute(`subscription { waitForEvent(eventId: "shipped", workflowRunId: "wfr_${id}", timeout: "1m") { eventData timeout } }`);
    await untilWaiting('shipped', `wfr_${id}`);

    const page2 = await context.newPage();
    watchSockets(page2, 'tab 2');
    const tab2 = new Playground(page2, 'tab 2');
    await tab2.open();
    const n = await tab2.do('notify',
      `mutation { notify(eventId: "shipped", workflowRunId: "wfr_${id}", eventData: {carrier: "DHL"}) { notifyResponse { waiter { state } } lookback { id } } }`);
    check(isDeepStrictEqual(n.notify, { notifyResponse: [{ waiter: { state: 'NOTIFIED' } }], lookback: null }),
      'tab 2: the notify should resolve the waiter of tab 1', n);

    const r = await pg.waitResult('waitForEvent notified from tab 2', (r) => r.data?.waitForEvent || r.errors);
    check(isDeepStrictEqual(r, { data: { waitForEvent: { eventData: { carrier: 'DHL' }, timeout: false } } }),
      'tab 1 should show the event sent from tab 2', r);
    await pg.untilIdle('waitForEvent notified from tab 2');
    log(`tab 1: the result pane shows ${JSON.stringify(r.data)}`);
    await page2.close();
  }

  // Queries and mutations went over HTTP; only subscriptions used the websocket.
  const overWS = frames.filter((f) => f.msg.type === 'subscribe').map((f) => f.msg.payload.query.trim().split(/[\s({]/)[0]);
  check(isDeepStrictEqual(overWS, ['subscription', 'subscription', 'subscription']), 'operations sent over the websocket', overWS);
  check(foreign.length === 0, 'the page made requests off this machine', foreign);
  check(problems.length === 0, 'the browser reported problems', problems);
  log(`OK; screenshots ${lookbackShot}, ${waitingShot}, ${screenshot}`);
} catch (err) {
  console.error(`FAIL: ${err.stack || err}`);
  for (const p of problems) console.error(`  ${p}`);
  for (const f of foreign) console.error(`  request off this machine: ${f}`);
  if (page) {
    const failShot = screenshot.replace(/(\.png)?$/, '-failure.png');
    await page.screenshot({ path: failShot }).then(() => console.error(`  screenshot: ${failShot}`), () => {});
  }
  process.exitCode = 1;
} finally {
  await context?.close();
  await rm(userDataDir, { recursive: true, force: true });
}
