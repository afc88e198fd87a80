#!/usr/bin/env node
// Development stand-in for the console's admin endpoints, for use before the
// gateway serves them itself. It sits in front of a running Sluice:
//
//   node fake-admin.mjs --admin http://127.0.0.1:8081 --gateway http://127.0.0.1:8080 \
//        [--listen 127.0.0.1:0] [--token T] [--consumers] [--no-events]
//
// - serves console/ at / and /console/NAME
// - fakes GET /admin/fleet (gateway /health + /load-stats), GET /admin/events
//   (one SSE event a second, rates derived from /load-stats and /metrics),
//   /admin/playground/v1/* (passed to the gateway's /v1/*) and /admin/consumers
//   (404, or a made-up list with --consumers)
// - passes every other /admin/* call to the real admin listener unchanged.
// Prints `admin listening on http://ADDR` like the gateway does.

import http from 'node:http';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = Object.fromEntries(process.argv.slice(2).reduce((pairs, arg, i, all) => {
  if (arg.startsWith('--')) pairs.push([arg.slice(2), all[i + 1] && !all[i + 1].startsWith('--') ? all[i + 1] : true]);
  return pairs;
}, []));
const adminUrl = new URL(args.admin || 'http://127.0.0.1:8081');
const gatewayUrl = new URL(args.gateway || 'http://127.0.0.1:8080');
const token = args.token === true ? '' : (args.token ?? process.env.SLUICE_ADMIN_TOKEN ?? '');
const consoleDir = path.resolve(args.console || path.join(here, '..', '..', 'console'));
const [listenHost, listenPort] = (args.listen || '127.0.0.1:0').split(':');

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8', '.svg': 'image/svg+xml' };

function send(res, status, body, type = 'application/json') {
  const data = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(data) });
  res.end(data);
}

function notFound(res, p) {
  send(res, 404, { error: { message: `Unknown path \`${p}\`.`, type: 'invalid_request_error', param: null, code: 'not_found' } });
}

function authorized(req, res) {
  if (!token || req.headers.authorization === `Bearer ${token}`) return true;
  res.writeHead(401, { 'content-type': 'application/json', 'www-authenticate': 'Bearer' });
  res.end(JSON.stringify({ error: { message: 'missing or wrong admin token', type: 'invalid_request_error', param: null, code: 'unauthorized' } }));
  return false;
}

async function gatewayJson(p) {
  const response = await fetch(new URL(p, gatewayUrl));
  return response.json();
}

async function fleet() {
  const [health, load] = await Promise.all([gatewayJson('/health'), gatewayJson('/load-stats')]);
  return { health, load };
}

async function completionTokens() {
  const text = await (await fetch(new URL('/metrics', gatewayUrl))).text();
  const totals = {};
  for (const line of text.split('\n')) {
    if (!line.startsWith('sluice_tokens_total{')) continue;
    const labels = Object.fromEntries([...line.matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]));
    if (labels.kind !== 'completion') continue;
    totals[labels.model] = (totals[labels.model] || 0) + Number(line.trim().split(/\s+/).pop());
  }
  return totals;
}

function events(req, res) {
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  let previous = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    try {
      const time = Date.now();
      const [snapshot, tokens] = await Promise.all([fleet(), completionTokens()]);
      const models = (snapshot.load.models || []).map((m) => {
        const before = previous && previous.models[m.model];
        const dt = previous ? (time - previous.time) / 1000 : 0;
        const total = m.served + m.failures;
        const dTotal = before ? total - (before.served + before.failures) : 0;
        const dFail = before ? m.failures - before.failures : 0;
        const dTokens = before ? (tokens[m.model] || 0) - (before.tokens || 0) : 0;
        return {
          model: m.model,
          requests_per_s: dt > 0 ? dTotal / dt : 0,
          tokens_per_s: dt > 0 ? dTokens / dt : 0,
          ttft_ms_p50: m.ttfb_ms ? m.ttfb_ms.p50 : null,
          error_rate: dTotal > 0 ? dFail / dTotal : 0,
        };
      });
      previous = {
        time,
        models: Object.fromEntries((snapshot.load.models || []).map((m) => [m.model, { ...m, tokens: tokens[m.model] || 0 }])),
      };
      res.write(`data: ${JSON.stringify({ time, fleet: snapshot, models })}\n\n`);
    } catch (error) {
      res.write(`: ${String(error.message).replace(/\n/g, ' ')}\n\n`);
    }
    if (!stopped) setTimeout(tick, 1000);
  };
  req.on('close', () => { stopped = true; });
  tick();
}

function proxy(req, res, target, targetPath, dropAuth) {
  const headers = { ...req.headers, host: target.host };
  if (dropAuth) delete headers.authorization;
  const upstream = http.request({ host: target.hostname, port: target.port, method: req.method, path: targetPath, headers }, (answer) => {
    res.writeHead(answer.statusCode, answer.headers);
    answer.pipe(res);
  });
  upstream.on('error', (error) => {
    if (!res.headersSent) send(res, 502, { error: { message: error.message, type: 'server_error', param: null, code: 'fake_admin_upstream' } });
    else res.destroy();
  });
  res.on('close', () => upstream.destroy());
  req.pipe(upstream);
}

// The shape of the gateway's consumers (public view plus current usage).
const FAKE_CONSUMERS = [
  {
    name: 'team-a', keys: 2, models: ['m1'], disabled: false, managed_by: 'config',
    limits: { requests_per_minute: 60, tokens_per_day: 100000, max_concurrent_requests: 4 },
    usage: { requests_this_minute: 12, tokens_this_minute: 2400, tokens_today: 81234, in_flight: 1 },
  },
  {
    name: 'batch', keys: 1, models: [], disabled: true, managed_by: 'api',
    limits: { tokens_per_day: 5000 },
    usage: { requests_this_minute: 0, tokens_this_minute: 0, tokens_today: 5000, in_flight: 0 },
  },
];

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://x');
  const p = url.pathname;
  try {
    if (req.method === 'GET' && (p === '/' || p.startsWith('/console/'))) {
      const name = p === '/' ? 'index.html' : p.slice('/console/'.length);
      if (!/^[\w.-]+$/.test(name)) return notFound(res, p);
      try {
        const body = await readFile(path.join(consoleDir, name));
        res.writeHead(200, {
          'content-type': TYPES[path.extname(name)] || 'application/octet-stream',
          'cache-control': 'no-cache',
          // The strictest policy the console works under (no inline script or style).
          'content-security-policy': "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
          'x-content-type-options': 'nosniff',
        });
        return res.end(body);
      } catch {
        return notFound(res, p);
      }
    }
    if (!p.startsWith('/admin/')) return notFound(res, p);
    if (!authorized(req, res)) return;
    if (req.method === 'GET' && p === '/admin/fleet') return send(res, 200, await fleet());
    if (req.method === 'GET' && p === '/admin/events' && !args['no-events']) return events(req, res);
    if (req.method === 'GET' && p === '/admin/consumers') {
      return args.consumers ? send(res, 200, FAKE_CONSUMERS) : notFound(res, p);
    }
    if (p.startsWith('/admin/playground/')) {
      return proxy(req, res, gatewayUrl, p.slice('/admin/playground'.length) + url.search, true);
    }
    return proxy(req, res, adminUrl, p + url.search, false);
  } catch (error) {
    if (!res.headersSent) send(res, 500, { error: { message: error.message, type: 'server_error', param: null, code: 'fake_admin' } });
  }
});

server.listen(Number(listenPort), listenHost, () => {
  const { address, port } = server.address();
  console.log(`admin listening on http://${address}:${port}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => { server.close(); server.closeAllConnections(); process.exit(0); });
}
