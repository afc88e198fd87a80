// Usage totals from SQLite (/admin/usage) and consumers against their limits (/admin/consumers).

import { api, errorOf, getJson, el, clear, $, fmtNum, fmtMs } from './lib.js';

let root;

export function init(section) {
  root = section;
  for (const input of root.querySelectorAll('#usage-controls input, #usage-controls select')) {
    input.addEventListener('change', () => loadUsage());
  }
  $('#usage-refresh', root).addEventListener('click', () => { loadUsage(); loadConsumers(); });
  loadUsage();
  loadConsumers();
  setInterval(() => {
    if (!root.hidden && !document.hidden) { loadUsage(); loadConsumers(); }
  }, 10000);
}

export function show() {
  loadUsage();
  loadConsumers();
}

const COLUMNS = [
  ['requests', 'requests', fmtNum],
  ['errors', 'errors', fmtNum],
  ['prompt_tokens', 'prompt tokens', fmtNum],
  ['completion_tokens', 'completion tokens', fmtNum],
  ['total_tokens', 'total tokens', fmtNum],
  ['estimated_requests', 'estimated', fmtNum],
  ['avg_latency_ms', 'avg latency', fmtMs],
  ['avg_ttft_ms', 'avg TTFT', fmtMs],
];

async function loadUsage() {
  const groups = [...root.querySelectorAll('input[name="group_by"]:checked')].map((i) => i.value);
  const range = $('#usage-range', root).value;
  const params = new URLSearchParams();
  if (groups.length) params.set('group_by', groups.join(','));
  if (range !== 'all') params.set('from', String(Date.now() - Number(range)));
  const table = $('#usage-table', root);
  let rows;
  try {
    const query = params.toString();
    const body = await getJson(`/admin/usage${query ? `?${query}` : ''}`);
    rows = Array.isArray(body) ? body : body.rows || [];
  } catch (error) {
    clear(table, el('caption.error', `Usage is not available: ${error.message}`));
    return;
  }
  const keys = groups.length ? groups : [];
  const sum = (key) => rows.reduce((n, r) => n + (Number(r[key]) || 0), 0);
  const weighted = (key) => {
    const total = rows.reduce((n, r) => n + (r[key] !== null && r[key] !== undefined ? (r.requests || 0) : 0), 0);
    return total ? rows.reduce((n, r) => n + (r[key] || 0) * (r.requests || 0), 0) / total : null;
  };
  clear(table,
    el('thead', el('tr', keys.map((k) => el('th', k)), COLUMNS.map(([, label]) => el('th.num', label)))),
    el('tbody', rows.length ? rows.map((r) => el('tr',
      keys.map((k) => el('td', groupValue(r.group ? r.group[k] : r[k]))),
      COLUMNS.map(([key, , fmt]) => el(`td.num${key === 'errors' && r.errors ? '.error' : ''}`, fmt(r[key])))))
      : el('tr', el('td.muted', { colSpan: keys.length + COLUMNS.length }, 'No requests in this range.'))),
    rows.length > 1 ? el('tfoot', el('tr',
      keys.map((k, i) => el('th', i === 0 ? 'total' : '')),
      COLUMNS.map(([key, , fmt]) => el('th.num', fmt(key.startsWith('avg_') ? weighted(key) : sum(key)))))) : null,
  );
}

function groupValue(value) {
  if (value === null || value === undefined) return el('span.muted', 'none');
  return String(value);
}

async function loadConsumers() {
  const panel = $('#consumers', root);
  let response;
  try {
    response = await api('/admin/consumers');
  } catch (error) {
    clear(panel, el('p.error', `Consumers: ${error.message}`));
    return;
  }
  if (response.status === 404) {
    clear(panel, el('p.muted.not-available', 'Consumers are not available on this gateway (no /admin/consumers).'));
    return;
  }
  if (!response.ok) {
    clear(panel, el('p.error', `Consumers: ${(await errorOf(response)).message}`));
    return;
  }
  const body = await response.json();
  const consumers = Array.isArray(body) ? body : body.consumers || [];
  if (!consumers.length) {
    clear(panel, el('p.muted', 'No consumers configured.'));
    return;
  }
  clear(panel, el('table.consumers',
    el('thead', el('tr', ['consumer', 'state', 'models', 'usage against limits'].map((h) => el('th', h)))),
    el('tbody', consumers.map((c) => el(`tr${c.disabled ? '.down' : ''}`, { dataset: { consumer: c.name } },
      el('td', el('b', c.name), el('div.sub', [
        typeof c.keys === 'number' ? `${c.keys} key${c.keys === 1 ? '' : 's'}` : null,
        c.managed_by ? `from ${c.managed_by}` : null,
      ].filter(Boolean).join(' · '))),
      el('td', el(`span.badge.${c.disabled ? 'bad' : 'ok'}`, c.disabled ? 'disabled' : 'active')),
      el('td', c.models && c.models.length ? c.models.map((m) => el('span.chip', m)) : el('span.muted', 'all')),
      // No counters yet (nothing used since start): the gateway's own counters are 0.
      el('td', limitBars(c.limits || {}, c.usage || Object.fromEntries(Object.values(KNOWN).map((k) => [k, 0])))),
    )))));
}

// Pairs each limit with the usage figure of the same name (or its closest
// match: "tokens_per_day" ↔ "tokens_today"/"tokens"), and lists the rest.
function limitBars(limits, usage) {
  const used = new Set();
  const items = [];
  for (const [key, limit] of Object.entries(limits)) {
    if (limit === null || limit === undefined) continue;
    const match = findUsage(key, usage);
    if (match) used.add(match);
    const value = match ? usage[match] : null;
    if (typeof limit === 'number' && typeof value === 'number') {
      const share = limit > 0 ? Math.min(100, (value / limit) * 100) : 100;
      const bar = el('span.bar', el(`span.fill${share >= 90 ? '.bad' : share >= 70 ? '.warn' : ''}`));
      bar.firstChild.style.width = `${share}%`;
      items.push(el('div.limit', { dataset: { limit: key } },
        el('span.limit-name', label(key)), bar, el('span.sub', `${fmtNum(value)} / ${fmtNum(limit)}`)));
    } else {
      items.push(el('div.limit', { dataset: { limit: key } },
        el('span.limit-name', label(key)), el('span.sub', `limit ${typeof limit === 'object' ? JSON.stringify(limit) : limit}${value !== null ? `, used ${JSON.stringify(value)}` : ''}`)));
    }
  }
  const rest = Object.entries(usage).filter(([key]) => !used.has(key));
  if (rest.length) {
    items.push(el('div.sub', rest.map(([k, v]) => `${label(k)}: ${typeof v === 'number' ? fmtNum(v) : JSON.stringify(v)}`).join(' · ')));
  }
  return items.length ? items : el('span.muted', 'no limits');
}

// The gateway's own pairs (limits of config `[[consumers]]` ↔ the counters it keeps).
const KNOWN = {
  requests_per_minute: 'requests_this_minute',
  tokens_per_minute: 'tokens_this_minute',
  tokens_per_day: 'tokens_today',
  max_concurrent_requests: 'in_flight',
};

function findUsage(key, usage) {
  if (key in usage) return key;
  if (KNOWN[key] in usage) return KNOWN[key];
  const stem = key.replace(/^(max_)/, '').replace(/_(per_|a_)?(minute|min|hour|day|month|second|s)$/, '');
  const candidates = Object.keys(usage).filter((k) => k === stem || k.startsWith(`${stem}_`) || k.startsWith(stem));
  const unit = /(minute|min|hour|day|month|second)/.exec(key);
  if (unit) {
    const same = candidates.find((k) => k.includes(unit[1]) || (unit[1] === 'day' && k.includes('today')));
    if (same) return same;
  }
  return candidates[0] || null;
}

function label(key) {
  return key.replace(/_/g, ' ');
}
