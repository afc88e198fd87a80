// Starts and stops what the browser tests need: mock GPU backends, the gateway
// (the real sluice binary), optionally the stand-in admin server, and Chromium.
// Everything listens on 127.0.0.1 only, every wait is bounded, and everything
// started is stopped (also when the test process dies).

import { spawn } from 'node:child_process';
import { createWriteStream, mkdirSync, mkdtempSync, rmSync, existsSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '..', '..');
export const artifacts = path.join(here, 'artifacts');
export const sluiceBin = path.resolve(repoRoot, process.env.SLUICE_BIN || 'target/release/sluice');
export const chromiumBin = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
// Set CONSOLE_FAKE_ADMIN=1 to put tests/browser/fake-admin.mjs in front of the
// gateway (for a binary that does not serve the console's endpoints yet).
export const useFake = /^(1|true|yes)$/i.test(process.env.CONSOLE_FAKE_ADMIN || '');

const children = new Set();

function cleanEnv(extra = {}) {
  const env = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!key.startsWith('SLUICE_') && key !== 'RUST_LOG') env[key] = value;
  }
  return { ...env, RUST_LOG: 'info', ...extra };
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `check` until it returns a truthy value or `ms` pass. */
export async function until(what, check, ms = 10_000, every = 100) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
    }
    await sleep(every);
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Spawns a process, logging its output to artifacts/NAME.log. */
function start(name, command, args, env) {
  mkdirSync(artifacts, { recursive: true });
  const log = createWriteStream(path.join(artifacts, `${name}.log`));
  const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  child.name = name;
  child.stdoutText = '';
  child.stdout.on('data', (chunk) => { child.stdoutText += chunk; log.write(chunk); });
  child.stderr.on('data', (chunk) => log.write(chunk));
  child.exited = new Promise((resolve) => child.on('exit', (code, signal) => {
    children.delete(child);
    log.end();
    resolve({ code, signal });
  }));
  child.on('error', (error) => log.write(`spawn error: ${error.message}\n`));
  children.add(child);
  return child;
}

export async function stop(child, ms = 5000) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const done = await Promise.race([child.exited, sleep(ms).then(() => null)]);
  if (!done) {
    child.kill('SIGKILL');
    await child.exited;
  }
}

export async function stopAll() {
  await Promise.all([...children].map((child) => stop(child)));
}

// Last resort when the test process ends without its `after` hook.
process.on('exit', () => {
  for (const child of children) {
    try { child.kill('SIGKILL'); } catch { /* already gone */ }
  }
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => process.exit(130));
}

function addressFrom(child, label, ms) {
  const pattern = new RegExp(`${label} listening on (http://[\\d.:]+)`);
  return until(`"${label} listening on" from ${child.name}`, () => {
    if (child.exitCode !== null) throw new Error(`${child.name} exited with ${child.exitCode} (see artifacts/${child.name}.log)`);
    const match = pattern.exec(child.stdoutText);
    return match && match[1];
  }, ms);
}

/** One simulated GPU backend (`sluice mock-backend`) on a free loopback port. */
export async function startMock(name, models, tokenIntervalMs = 30, extraArgs = []) {
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const child = start(`mock-${name}`, sluiceBin, [
      'mock-backend', '--listen', `127.0.0.1:${port}`, '--name', name,
      '--models', models.join(','), '--token-interval-ms', String(tokenIntervalMs), ...extraArgs,
    ], cleanEnv());
    const url = `http://127.0.0.1:${port}`;
    try {
      await until(`mock ${name} answering`, async () => {
        if (child.exitCode !== null) throw new Error(`mock ${name} exited with ${child.exitCode}`);
        return (await fetch(`${url}/v1/models`)).ok;
      }, 10_000);
      return { name, url, child };
    } catch (error) {
      await stop(child);
      if (attempt >= 2) throw error; // the port was taken between probe and bind: try another
    }
  }
}

/**
 * The gateway with the given backends, 200 ms health checks and an admin
 * token; state and usage database in a fresh temporary directory.
 */
export async function startGateway({ backends, token }) {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'sluice-browser-'));
  const config = [
    '[server]',
    'listen = "127.0.0.1:0"',
    'admin_listen = "127.0.0.1:0"',
    'response_timeout = "10s"',
    'shutdown_timeout = "2s"',
    '',
    '[health_check]',
    'interval = "200ms"',
    'timeout = "1s"',
    'unhealthy_after = 1',
    'healthy_after = 1',
    '',
    '[policy_store]',
    `state_dir = ${JSON.stringify(path.join(dir, 'state'))}`,
    '',
    '[usage]',
    `database = ${JSON.stringify(path.join(dir, 'usage.db'))}`,
    '',
    ...backends.flatMap((b) => [
      '[[backends]]',
      `name = ${JSON.stringify(b.name)}`,
      `url = ${JSON.stringify(b.url)}`,
      `models = ${JSON.stringify(b.models)}`,
      `max_concurrent_requests = ${b.maxConcurrent ?? 8}`,
      ...(b.engine ? [`engine = ${JSON.stringify(b.engine)}`] : []),
      '',
    ]),
  ].join('\n');
  const configPath = path.join(dir, 'sluice.toml');
  writeFileSync(configPath, config);
  const child = start('sluice', sluiceBin, [
    'serve', '--config', configPath, '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0',
  ], cleanEnv({ SLUICE_ADMIN_TOKEN: token }));
  const [admin, gateway] = await Promise.all([addressFrom(child, 'admin', 30_000), addressFrom(child, 'sluice', 30_000)]);
  return { admin, gateway, child, dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** tests/browser/fake-admin.mjs in front of a running gateway. */
export async function startFakeAdmin({ admin, gateway, token }) {
  const child = start('fake-admin', process.execPath, [
    path.join(here, 'fake-admin.mjs'), '--admin', admin, '--gateway', gateway, '--token', token,
    '--listen', '127.0.0.1:0',
  ], cleanEnv());
  return { url: await addressFrom(child, 'admin', 10_000), child };
}

/** Headless Chromium with a fresh profile, as the issue asks. */
export async function launchBrowser() {
  if (!existsSync(chromiumBin)) throw new Error(`no Chromium at ${chromiumBin} (apt-get install chromium)`);
  const profile = mkdtempSync(path.join(os.tmpdir(), 'sluice-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumBin,
    headless: true,
    timeout: 30_000,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic', '--no-first-run',
    ],
    viewport: { width: 1400, height: 900 },
  });
  return {
    context,
    async close() {
      await Promise.race([context.close(), sleep(10_000)]);
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

let shot = 0;
export async function screenshot(page, name) {
  mkdirSync(artifacts, { recursive: true });
  shot += 1;
  const file = path.join(artifacts, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}
