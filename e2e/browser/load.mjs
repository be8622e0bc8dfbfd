// Opens Playground in headless Chromium and checks how its scripts loaded.
// Run by e2e/browser_test.go.
//
// Usage: node load.mjs http://127.0.0.1:PORT/ screenshot.png offline|loads
//
// offline: the scripts cannot be loaded (RENDEZVOUS_PLAYGROUND_ASSETS at a
// dead address); the page must say what failed and what to do in place of
// "Loading…". Prints the message.
// loads: GraphiQL must render, with no such message.
// Exits non-zero otherwise, within TIMEOUT; the screenshot shows the page.
import { chromium } from 'playwright-core';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [pageURL, screenshot = '/tmp/playground-load.png', mode = 'offline'] = process.argv.slice(2);
if (!pageURL || !['offline', 'loads'].includes(mode)) {
  console.error('usage: node load.mjs http://127.0.0.1:PORT/ screenshot.png offline|loads');
  process.exit(2);
}
const executablePath = process.env.RENDEZVOUS_CHROMIUM || '/usr/bin/chromium';
const TIMEOUT = 20000;

const userDataDir = await mkdtemp(join(tmpdir(), 'rendezvous-chromium-'));
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    viewport: { width: 1200, height: 700 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 60000,
  });
  const page = context.pages()[0] || (await context.newPage());
  await page.goto(pageURL);
  const box = page.locator('#rendezvous-playground-error');
  try {
    if (mode === 'offline') {
      await box.waitFor({ state: 'visible', timeout: TIMEOUT });
    } else {
      await page.locator('.graphiql-container').waitFor({ state: 'visible', timeout: TIMEOUT });
    }
  } finally {
    await page.screenshot({ path: screenshot });
  }
  const loading = await page.locator('.loading').count();
  if (mode === 'offline') {
    console.log(`message (${loading} "Loading…" left on the page):`);
    console.log(await box.innerText());
    if (loading !== 0) process.exitCode = 1;
  } else {
    const shown = await box.count();
    console.log(`GraphiQL rendered; load-failure message ${shown ? 'SHOWN' : 'absent'}`);
    if (shown) process.exitCode = 1;
  }
} catch (err) {
  console.error(`FAIL: ${err.stack || err}`);
  process.exitCode = 1;
} finally {
  await context?.close();
  await rm(userDataDir, { recursive: true, force: true });
}
