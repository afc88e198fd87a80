// The console shell: sign-in, tabs, and the live fleet view.

import { api, auth, setToken, token, getJson, readSse, el, clear, $, fmtNum, fmtMs, fmtAgo, toast } from './lib.js';
import { LineChart, colorOf, WINDOW_MS } from './charts.js';
import * as policies from './policies.js';
import * as usage from './usage.js';
import * as playground from './playground.js';

// ---------- sign-in ----------

auth.askToken = (reason) => new Promise((resolve) => {
  const overlay = $('#login');
  const form = $('#login-form');
  const input = $('#token-input');
  $('#login-reason').textContent = reason;
  overlay.hidden = false;
  input.value = '';
  input.focus();
  const submit = (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (!value) return;
    setToken(value);
    overlay.hidden = true;
    form.removeEventListener('submit', submit);
    $('#signout').hidden = false;
    resolve();
  };
  form.addEventListener('submit', submit);
});

$('#signout').hidden = !token();
$('#signout').addEventListener('click', () => {
  setToken('');
  location.reload();
});

// ---------- tabs ----------

const tabs = { overview: null, policies, usage, playground };
const started = new Set();

function showTab(name) {
  if (!(name in tabs)) name = 'overview';
  for (const button of document.querySelectorAll('nav.tabs button')) {
    button.setAttribute('aria-selected', String(button.dataset.tab === name));
  }
  for (const section of document.querySelectorAll('main > section')) {
    section.hidden = section.id !== `tab-${name}`;
  }
  const module = tabs[name];
  if (module) {
    if (!started.has(name)) {
      started.add(name);
      module.init($(`#tab-${name}`));
    } else if (module.show) {
      module.show();
    }
  }
  if (name === 'overview') redrawCharts();
}

for (const button of document.querySelectorAll('nav.tabs button')) {
  button.addEventListener('click', () => { location.hash = button.dataset.tab; });
}
window.addEventListener('hashchange', () => showTab(location.hash.slice(1)));

// ---------- live fleet ----------

const METRICS = [
  { key: 'requests_per_s', id: 'chart-requests', title: 'Requests', unit: 'per second' },
  { key: 'tokens_per_s', id: 'chart-tokens', title: 'Tokens', unit: 'per second' },
  { key: 'ttft_ms_p50', id: 'chart-ttft', title: 'Time to first token', unit: 'p50, ms' },
  { key: 'error_rate', id: 'chart-errors', title: 'Errors', unit: '% of requests',
    scale: 100, format: (v) => `${fmtNum(v, v < 10 ? 1 : 0)}%` },
];
const charts = METRICS.map((m) => new LineChart(m));
const samples = []; // {time, models: {name: {...}}}
let fleet = null;

const chartHost = $('#charts');
for (const chart of charts) chartHost.append(chart.node);

function redrawCharts() {
  if ($('#tab-overview').hidden) return;
  // The gateway's clock, not this browser's: the charts end at the latest sample.
  const now = samples.length ? samples[samples.length - 1].time : Date.now();
  charts.forEach((chart, i) => {
    const { key, scale = 1 } = METRICS[i];
    chart.update(samples.map((s) => ({
      time: s.time,
      values: Object.fromEntries(Object.entries(s.models).map(([model, m]) => [
        model, m[key] === null || m[key] === undefined ? null : m[key] * scale,
      ])),
    })), now);
  });
}

function addSample(time, models) {
  samples.push({ time, models });
  while (samples.length && samples[0].time < time - WINDOW_MS - 2000) samples.shift();
}

function setLive(state, text) {
  const node = $('#live-status');
  node.className = `live is-${state}`;
  node.dataset.state = state;
  node.textContent = text;
}

function percent(a, b) {
  return b > 0 ? Math.min(100, (a / b) * 100) : 0;
}

function renderFleet() {
  if (!fleet) return;
  const health = fleet.health || { backends: [] };
  const load = fleet.load || { backends: [], models: [] };
  const loadByName = new Map((load.backends || []).map((b) => [b.name, b]));
  const backends = (health.backends || []).map((h) => ({ ...(loadByName.get(h.name) || {}), ...h }));
  for (const b of load.backends || []) {
    if (!backends.some((x) => x.name === b.name)) backends.push(b);
  }
  const healthyByName = new Map(backends.map((b) => [b.name, b.healthy]));
  const now = Date.now();

  const healthy = backends.filter((b) => b.healthy).length;
  const inFlight = backends.reduce((n, b) => n + (b.in_flight || 0), 0);
  const queued = backends.reduce((n, b) => n + (b.queued || 0), 0);
  const served = backends.reduce((n, b) => n + (b.served || 0), 0);
  const failures = backends.reduce((n, b) => n + (b.failures || 0), 0);
  const ok = health.status ? health.status === 'ok' : healthy > 0;
  clear($('#summary'),
    card('Fleet', ok ? 'ok' : 'unavailable', ok ? 'ok' : 'bad', 'fleet-status'),
    card('Backends healthy', `${healthy} / ${backends.length}`, healthy === backends.length ? 'ok' : healthy ? 'warn' : 'bad', 'backends-healthy'),
    card('In flight', fmtNum(inFlight), '', 'in-flight'),
    card('Queued', fmtNum(queued), queued ? 'warn' : '', 'queued'),
    card('Served', fmtNum(served), '', 'served'),
    card('Failures', fmtNum(failures), failures ? 'warn' : '', 'failures'),
  );

  clear($('#backends tbody'), backends.length ? backends.map((b) => {
    const max = b.max_concurrent || 0;
    const bar = el('span.bar', el('span.fill'));
    bar.firstChild.style.width = `${max ? percent(b.in_flight || 0, max) : 0}%`;
    return el(`tr${b.healthy ? '' : '.down'}`, { dataset: { backend: b.name } },
      el('td', el('b', b.name), el('div.sub', b.url || '')),
      el('td.status', el(`span.badge.${b.healthy ? 'ok' : 'bad'}`, b.healthy ? 'healthy' : 'unhealthy')),
      el('td.num', el('div', `${fmtNum(b.in_flight)} / ${max ? fmtNum(max) : '∞'}`), max ? bar : null),
      el('td.num', fmtNum(b.queued)),
      ...engineCells(b),
      el('td.num', fmtNum(b.served)),
      el('td.num', fmtNum(b.failures)),
      el('td.num', fmtMs(b.ttfb_ms?.p50), el('div.sub', `p99 ${fmtMs(b.ttfb_ms?.p99)}`)),
      el('td.num', fmtMs(b.duration_ms?.p50), el('div.sub', `p99 ${fmtMs(b.duration_ms?.p99)}`)),
      el('td', (b.models || []).map((m) => el('span.chip', m))),
      el('td.sub', fmtAgo(b.last_check, now)),
      el('td.error', { title: b.last_error || '' }, b.last_error || ''),
    );
  }) : el('tr', el('td.muted', { colSpan: 14 }, 'No backends configured.')));

  const errors = backends
    .flatMap((b) => (b.recent_errors || []).map((e) => ({ ...e, backend: b.name })))
    .sort((a, b) => b.last_ms - a.last_ms)
    .slice(0, 30);
  clear($('#errors tbody'), errors.length ? errors.map((e) =>
    el('tr', { dataset: { backend: e.backend } },
      el('td.sub', fmtAgo(e.last_ms, now)),
      el('td', el('b', e.backend)),
      el('td.num', fmtNum(e.count)),
      el('td.sub', fmtAgo(e.first_ms, now)),
      el('td.error', { title: e.message }, e.message),
    )) : el('tr', el('td.muted', { colSpan: 5 }, 'No errors.')));

  const models = load.models || [];
  clear($('#models tbody'), models.length ? models.map((m) => {
    const swatch = el('span.swatch');
    swatch.style.background = colorOf(m.model);
    return el('tr', { dataset: { model: m.model } },
      el('td', swatch, el('b', m.model)),
      el('td', (m.backends || []).map((name) =>
        el(`span.chip.${healthyByName.get(name) === false ? 'bad' : 'ok'}`, name))),
      el('td.num', fmtNum(m.in_flight)),
      el('td.num', fmtNum(m.queued)),
      el('td.num', fmtNum(m.served)),
      el('td.num', fmtNum(m.failures)),
      el('td.num', fmtMs(m.ttfb_ms?.p50), el('div.sub', `p99 ${fmtMs(m.ttfb_ms?.p99)}`)),
      el('td.num', fmtMs(m.duration_ms?.p50), el('div.sub', `p99 ${fmtMs(m.duration_ms?.p99)}`)),
    );
  }) : el('tr', el('td.muted', { colSpan: 8 }, 'No models.')));
  $('#updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function card(label, value, kind, id) {
  return el(`div.stat${kind ? `.${kind}` : ''}`, { dataset: { stat: id } }, el('div.label', label), el('div.value', value));
}

// Without /admin/events: derive rates from /admin/fleet snapshots.
let previous = null;
function sampleFromLoad(time, load) {
  const current = new Map((load.models || []).map((m) => [m.model, m]));
  const models = {};
  for (const [name, m] of current) {
    const before = previous && previous.models.get(name);
    const dt = previous ? (time - previous.time) / 1000 : 0;
    const total = (m.served || 0) + (m.failures || 0);
    const totalBefore = before ? (before.served || 0) + (before.failures || 0) : total;
    const failed = (m.failures || 0) - (before ? before.failures || 0 : m.failures || 0);
    models[name] = {
      requests_per_s: dt > 0 ? (total - totalBefore) / dt : null,
      tokens_per_s: null,
      ttft_ms_p50: m.ttfb_ms ? m.ttfb_ms.p50 : null,
      error_rate: total - totalBefore > 0 ? failed / (total - totalBefore) : dt > 0 ? 0 : null,
    };
  }
  previous = { time, models: current };
  return models;
}

async function pollFleet() {
  try {
    fleet = await getJson('/admin/fleet');
    renderFleet();
    addSample(Date.now(), sampleFromLoad(Date.now(), fleet.load || {}));
    redrawCharts();
    return true;
  } catch (error) {
    setLive('down', `fleet: ${error.message}`);
    return false;
  }
}

async function liveLoop() {
  let eventsMissing = false;
  for (;;) {
    if (!eventsMissing) {
      let response;
      try {
        response = await api('/admin/events', { headers: { Accept: 'text/event-stream' }, cache: 'no-store' });
      } catch {
        response = null;
      }
      if (response && response.status === 404) {
        eventsMissing = true;
      } else if (response && response.ok && response.body) {
        setLive('live', 'live');
        try {
          await readSse(response.body, (data) => {
            let event;
            try { event = JSON.parse(data); } catch { return; }
            if (event.fleet) {
              fleet = event.fleet;
              renderFleet();
            }
            const models = {};
            for (const m of event.models || []) models[m.model] = m;
            addSample(event.time || Date.now(), models);
            redrawCharts();
            setLive('live', 'live');
          });
        } catch { /* dropped: reconnect below */ }
        setLive('down', 'reconnecting…');
        await pollFleet();
        await sleep(2000);
        continue;
      } else {
        setLive('down', response ? `events: HTTP ${response.status}` : 'offline');
        await pollFleet();
        await sleep(3000);
        continue;
      }
    }
    // polling mode
    if (await pollFleet()) setLive('polling', 'polling');
    await sleep(2000);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------- boot ----------

window.addEventListener('resize', () => redrawCharts());
showTab(location.hash.slice(1));
pollFleet().then(() => liveLoop());
setInterval(() => { if (fleet) renderFleet(); }, 5000);

// errors nobody caught end up visible rather than silent
window.addEventListener('unhandledrejection', (event) => {
  toast(String(event.reason && event.reason.message || event.reason), 'error');
});

// The engine's queue and batch, its KV-cache use, and the prefix index's hit
// rate, for one backend row. An engine whose signals are stale or unknown
// shows why (its saturation is unknown, not down).
function engineCells(b) {
  const engine = b.engine;
  const prefix = b.prefix_index;
  const hits = prefix && prefix.hit_rate != null
    ? el('td.num', `${fmtNum(prefix.hit_rate * 100)} %`, el('div.sub', `${fmtNum(prefix.blocks)} blocks`))
    : el('td.num.muted', prefix ? 'no traffic' : '—');
  if (!engine) return [el('td.num.muted', { title: 'no engine configured' }, '—'), el('td.num.muted', '—'), hits];
  const s = engine.signals || {};
  const status = engine.status === 'fresh' ? null
    : el('div.sub', el(`span.badge.${engine.status === 'stale' ? 'warn' : 'bad'}`,
      { title: engine.error || '' }, engine.status));
  const kv = s.kv_usage;
  const bar = el('span.bar', el('span.fill'));
  bar.firstChild.style.width = `${kv == null ? 0 : Math.min(100, kv * 100)}%`;
  return [
    el('td.num', { title: `${engine.engine}, read ${fmtNum(engine.age_ms)} ms ago` },
      el('div', `${fmtNum(s.waiting)} / ${fmtNum(s.running)}`), el('div.sub', engine.engine), status),
    el('td.num', el('div', kv == null ? '—' : `${fmtNum(kv * 100)} %`), kv == null ? null : bar),
    hits,
  ];
}
