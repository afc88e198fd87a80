// Browser tests of the operator console (issue 10), in headless Debian Chromium
// against the real sluice binary with two mock GPU backends:
// sign in with the admin token, see both backends healthy, kill one and see it
// turn unhealthy, deploy a policy by uploading a .wasm and see its version
// change, chat in the playground and see the text stream in. Screenshots of
// every step go to tests/browser/artifacts/.
//
//   bash scripts/test-browser.sh            (installs Chromium and playwright-core, then runs this)
//   SLUICE_BIN=path/to/sluice npm test      (from tests/browser)

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import {
  repoRoot, sluiceBin, useFake, startMock, startGateway, startFakeAdmin, launchBrowser,
  screenshot, stop, stopAll, until,
} from './harness.mjs';

const TOKEN = 'browser-test-token';
const STEP = 20_000; // longest wait for anything the page should show

let vm01;
let vm02;
let gateway;
let consoleUrl;
let browser;
let page;
const pageErrors = [];

function findWasm() {
  if (process.env.SLUICE_TEST_WASM) return path.resolve(process.env.SLUICE_TEST_WASM);
  const dir = path.join(repoRoot, 'target', 'guests', 'wasm32-wasip2', 'guest');
  const file = path.join(dir, 'model_router.wasm');
  if (existsSync(file)) return file;
  const any = existsSync(dir) ? readdirSync(dir).find((f) => f.endsWith('.wasm')) : null;
  return any ? path.join(dir, any) : null;
}

async function admin(pathname, init = {}) {
  const response = await fetch(`${gateway.admin}${pathname}`, {
    ...init,
    headers: { Authorization: `Bearer ${TOKEN}`, ...(init.headers || {}) },
  });
  assert.ok(response.ok, `${pathname}: HTTP ${response.status}`);
  return response.json();
}

const statusOf = (name) => page.locator(`#backends tr[data-backend="${name}"] td.status`);
const activeVersion = () => page.locator('#chain [data-policy="router"] .active-version');

before(async () => {
  assert.ok(existsSync(sluiceBin), `no sluice binary at ${sluiceBin} (build it, or set SLUICE_BIN)`);
  vm01 = await startMock('vm01', ['m1', 'm2'], 30, ['--engine', 'vllm']);
  vm02 = await startMock('vm02', ['m1']);
  gateway = await startGateway({
    token: TOKEN,
    backends: [
      { name: 'vm01', url: vm01.url, models: ['m1', 'm2'], maxConcurrent: 4, engine: 'vllm' },
      { name: 'vm02', url: vm02.url, models: ['m1'] },
    ],
  });
  consoleUrl = useFake ? (await startFakeAdmin({ ...gateway, token: TOKEN })).url : gateway.admin;
  const index = await fetch(`${consoleUrl}/`);
  assert.equal(index.status, 200,
    `GET / on the admin listener answered ${index.status}: this sluice does not serve the console` +
    ' (CONSOLE_FAKE_ADMIN=1 runs against the stand-in instead)');
  assert.match(index.headers.get('content-type') || '', /text\/html/);

  browser = await launchBrowser();
  page = browser.context.pages()[0] || await browser.context.newPage();
  page.setDefaultTimeout(STEP);
  page.on('pageerror', (error) => pageErrors.push(error.message));
  page.on('console', (message) => {
    if (/Content.Security.Policy/i.test(message.text())) pageErrors.push(message.text());
  });
}, { timeout: 120_000 });

after(async () => {
  if (browser) await browser.close();
  await stopAll();
  if (gateway) gateway.cleanup();
});

test('the console asks for the admin token once and lists both backends healthy', async () => {
  await page.goto(`${consoleUrl}/`);
  await page.locator('#login').waitFor({ state: 'visible' });
  await screenshot(page, 'sign-in');

  await page.fill('#token-input', TOKEN);
  await page.press('#token-input', 'Enter');
  await page.locator('#login').waitFor({ state: 'hidden' });
  await until('vm01 and vm02 healthy', async () =>
    (await statusOf('vm01').textContent()) === 'healthy' && (await statusOf('vm02').textContent()) === 'healthy', STEP);
  assert.equal(await page.evaluate(() => sessionStorage.getItem('sluice.adminToken')), TOKEN);
  await page.locator('#live-status[data-state="live"]').waitFor();
  const models = await page.locator('#models tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.model));
  assert.deepEqual(models.sort(), ['m1', 'm2']);
  assert.match(await page.locator('#models tr[data-model="m1"]').textContent(), /vm01.*vm02/);
  assert.equal(await page.locator('[data-stat="backends-healthy"] .value').textContent(), '2 / 2');
  // vm01 runs a simulated vLLM engine: its queue, batch and KV cache show as
  // scraped from its /metrics; vm02 has no engine configured.
  const cell = (name, n) => page.locator(`#backends tr[data-backend="${name}"] td:nth-child(${n})`);
  await until('vm01 engine signals shown', async () => /^0 \/ 0vllm$/.test(await cell('vm01', 5).textContent()), STEP);
  assert.equal(await cell('vm01', 6).textContent(), '0 %');
  assert.equal(await cell('vm02', 5).textContent(), '—');
  await screenshot(page, 'fleet-healthy');

  // A reload keeps the token for this tab: no second question.
  await page.reload();
  await until('vm01 listed after reload', async () => (await statusOf('vm01').textContent()) === 'healthy', STEP);
  assert.equal(await page.locator('#login').isVisible(), false, 'asked for the token again after a reload');
});

test('a killed backend turns unhealthy', async () => {
  vm02.child.kill('SIGKILL');
  await vm02.child.exited;
  await until('vm02 unhealthy', async () => (await statusOf('vm02').textContent()) === 'unhealthy', STEP);
  assert.equal(await statusOf('vm01').textContent(), 'healthy');
  assert.equal(await page.locator('[data-stat="backends-healthy"] .value').textContent(), '1 / 2');
  assert.match(await page.locator('#backends tr[data-backend="vm02"]').getAttribute('class'), /down/);
  // The failed probes are listed under recent errors, for vm02 only.
  await until('vm02 in recent errors', async () => (await page.locator('#errors tr[data-backend="vm02"]').count()) > 0, STEP);
  assert.equal(await page.locator('#errors tr[data-backend="vm01"]').count(), 0);
  assert.ok((await page.locator('#errors tr[data-backend="vm02"] td.error').first().textContent()).length > 0);
  await screenshot(page, 'backend-unhealthy');
});

test('deploying a .wasm through the page changes the policy version; rollback changes it back', async () => {
  const wasm = findWasm();
  assert.ok(wasm, 'no policy .wasm to upload (target/guests/wasm32-wasip2/guest/*.wasm, or set SLUICE_TEST_WASM)');

  await page.click('nav.tabs button[data-tab="policies"]');
  await until('router at v1', async () => (await activeVersion().textContent()) === 'v1', STEP);
  await screenshot(page, 'policies-before');

  // A file that is not a component is refused, and the version stays.
  await page.fill('#deploy-name', 'router');
  await page.setInputFiles('#deploy-file', { name: 'broken.wasm', mimeType: 'application/wasm', buffer: Buffer.from('not wasm') });
  await page.click('#deploy-submit');
  await until('refusal shown', async () => /invalid_policy|Refused/.test(await page.locator('#deploy-status').textContent()), STEP);
  assert.equal(await activeVersion().textContent(), 'v1');

  await page.fill('#deploy-name', 'router');
  await page.setInputFiles('#deploy-file', wasm);
  await page.click('#deploy-submit');
  await until('router at v2', async () => (await activeVersion().textContent()) === 'v2', STEP);
  assert.match(await page.locator('#deploy-status').textContent(), /Deployed router v2/);
  const [router] = (await admin('/admin/policies')).filter((p) => p.name === 'router');
  assert.equal(router.active_version, 2, 'the admin API agrees that v2 is active');
  assert.equal(await page.locator('#chain [data-policy="router"] table.versions tbody tr').count(), 2);
  await screenshot(page, 'policy-deployed');

  await page.click('#chain [data-policy="router"] button.rollback');
  await until('router back at v1', async () => (await activeVersion().textContent()) === 'v1', STEP);
  await screenshot(page, 'policy-rolled-back');
});

test('the playground streams a chat through the gateway', async () => {
  await page.click('nav.tabs button[data-tab="playground"]');
  await until('m1 offered', async () =>
    (await page.locator('#pg-model option').evaluateAll((os) => os.map((o) => o.value))).includes('m1'), STEP);
  await page.selectOption('#pg-model', 'm1');

  // Record every change of the answer's text, to tell streaming from all-at-once.
  await page.evaluate(() => {
    window.__seen = [];
    new MutationObserver(() => {
      const answer = document.querySelector('#pg-transcript .msg.assistant:last-of-type');
      const text = answer ? answer.querySelector('.text').textContent : '';
      const last = window.__seen[window.__seen.length - 1];
      if (answer && text && (!last || last.length !== text.length)) {
        window.__seen.push({ length: text.length, at: performance.now(), state: answer.dataset.state });
      }
    }).observe(document.querySelector('#pg-transcript'), { childList: true, subtree: true, characterData: true });
  });
  await page.fill('#pg-input', 'Tell me about the fleet.');
  await page.click('#pg-send');
  const answer = page.locator('#pg-transcript .msg.assistant').last();
  await until('text streaming in', async () => ((await answer.locator('.text').textContent()) || '').length > 0, STEP, 20);
  await screenshot(page, 'playground-streaming');
  await until('the answer done', async () => {
    const state = await answer.getAttribute('data-state');
    assert.notEqual(state, 'error', `the chat failed: ${await answer.textContent()}`);
    return state === 'done';
  }, STEP);

  const text = await answer.locator('.text').textContent();
  assert.ok(text.length > 10, `answer text: ${JSON.stringify(text)}`);
  const seen = await page.evaluate(() => window.__seen);
  assert.ok(seen.length >= 3, `the text appeared in ${seen.length} step(s), not streamed: ${JSON.stringify(seen)}`);
  assert.ok(seen.filter((s) => s.state === 'streaming').length >= 2, 'text grew while the answer was streaming');
  assert.ok(seen[seen.length - 1].at - seen[0].at > 100, 'the text arrived over time');

  // vm02 is down, so vm01 answered; the usage chunk's tokens and the page's TTFT are shown.
  assert.equal(await answer.locator('[data-field="backend"] b').textContent(), 'vm01');
  assert.match(await answer.locator('[data-field="tokens"] b').textContent(), /^\d+ \+ \d+ = \d+$/);
  assert.match(await answer.locator('[data-field="ttft"] b').textContent(), /\d.*(ms|s)$/);
  await screenshot(page, 'playground-answered');
});

// A short, bounded burst of client traffic on both models (vm01 serves both now).
async function traffic(count = 12, everyMs = 200) {
  const requests = [];
  for (let i = 0; i < count; i++) {
    requests.push(fetch(`${gateway.gateway}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ model: i % 3 ? 'm1' : 'm2', stream: true, messages: [{ role: 'user', content: `hello ${i}` }] }),
      signal: AbortSignal.timeout(STEP),
    }).then((r) => r.text()).catch(() => null));
    await new Promise((resolve) => setTimeout(resolve, everyMs));
  }
  return Promise.all(requests);
}

test('live charts, usage and consumers show the traffic', async () => {
  await page.click('nav.tabs button[data-tab="overview"]');
  await traffic();
  await until('m2 seen as served', async () =>
    Number(await page.locator('#models tr[data-model="m2"] td:nth-child(5)').textContent()) > 0, STEP);
  // Drawn from the traffic, not a flat line of zeros: requests/s and
  // tokens/s of m1 rose above zero.
  const peakOf = async (chart) => {
    const peaks = await page.locator(`#${chart} .series[data-model="m1"]`)
      .evaluateAll((nodes) => nodes.map((n) => Number(n.getAttribute('data-peak'))));
    return Math.max(0, ...peaks);
  };
  await until('m1 requests drawn in the request-rate chart', async () => (await peakOf('chart-requests')) > 0, STEP);
  await until('m1 tokens drawn in the tokens chart', async () => (await peakOf('chart-tokens')) > 0, STEP);
  for (const chart of ['chart-requests', 'chart-tokens', 'chart-ttft', 'chart-errors']) {
    assert.ok(await page.locator(`#${chart} .legend-item[data-model="m1"]`).count(), `${chart} has m1 in its legend`);
  }
  assert.match(await page.locator('#backends tr[data-backend="vm01"]').textContent(), /m1/);
  await screenshot(page, 'fleet-live');

  await page.click('nav.tabs button[data-tab="usage"]');
  await until('a usage row for m1 on vm01', async () => {
    const rows = await page.locator('#usage-table tbody tr').allTextContents();
    return rows.some((r) => r.includes('m1') && r.includes('vm01'));
  }, STEP);
  await until('the consumers panel', async () => /No consumers/.test(await page.locator('#consumers').textContent()), STEP);
  await screenshot(page, 'usage');
});

test('consumers show their usage against their limits', async () => {
  const listed = await fetch(`${gateway.admin}/admin/consumers`, { headers: { Authorization: `Bearer ${TOKEN}` } });
  assert.equal(listed.status, 200);
  // Made last: a consumer may turn on key checks for the client API.
  const made = await fetch(`${gateway.admin}/admin/consumers`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ name: 'browser-test', models: ['m1'], limits: { requests_per_minute: 60, tokens_per_day: 100000 } }),
  });
  const madeText = await made.text();
  assert.ok(made.ok, `creating a consumer: HTTP ${made.status} ${madeText}`);
  const { key } = JSON.parse(madeText);
  // One request with its key: the page counts it against the limit (in
  // the same calendar minute as the refresh below).
  const second = (Date.now() / 1000) % 60;
  if (second > 54) await new Promise((resolve) => setTimeout(resolve, (61 - second) * 1000));
  const chat = await fetch(`${gateway.gateway}/v1/chat/completions`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ model: 'm1', messages: [{ role: 'user', content: 'hi' }], max_tokens: 8 }),
  });
  assert.equal(chat.status, 200, await chat.text());
  await page.click('#usage-refresh');
  const row = page.locator('#consumers tr[data-consumer="browser-test"]');
  await row.waitFor();
  assert.match(await row.locator('.badge').textContent(), /active/);
  assert.equal((await row.locator('.limit[data-limit="requests_per_minute"] .sub').textContent()).trim(), '1 / 60');
  assert.match(await row.locator('.limit[data-limit="tokens_per_day"]').textContent(), /\/ 100,?000/);
  await screenshot(page, 'consumers');
  assert.deepEqual(pageErrors, [], 'uncaught errors in the page');
});

after(async () => {
  // Make sure nothing we started outlives the tests, even after a failure above.
  await stop(vm01 && vm01.child);
  await stop(vm02 && vm02.child);
});
