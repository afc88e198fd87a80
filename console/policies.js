// The policy chain: versions, activation history, shadows and their differences,
// deploy by upload, rollback, activating a version by number.

import { api, errorOf, getJson, el, clear, $, fmtNum, fmtTime, toast } from './lib.js';

let root;
let chain = [];

export function init(section) {
  root = section;
  const form = $('#deploy-form', root);
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    deploy(form);
  });
  $('#deploy-name', root).addEventListener('input', () => describeTarget());
  $('#policies-refresh', root).addEventListener('click', () => load(true));
  load(true);
  // Shadow counts grow with traffic: refresh while this tab is on screen.
  setInterval(() => { if (!root.hidden && !document.hidden) load(); }, 5000);
}

export function show() {
  load(true);
}

let shown = '';

async function load(force = false) {
  const list = $('#chain', root);
  try {
    chain = await getJson('/admin/policies');
  } catch (error) {
    clear(list, el('p.error', `Could not load the policy chain: ${error.message}`));
    shown = '';
    return;
  }
  chain.sort((a, b) => (a.position ?? 0) - (b.position ?? 0));
  clear($('#policy-names', root), chain.map((p) => el('option', { value: p.name })));
  const shadows = await Promise.all(chain.map((p) => (p.shadow ? shadowReport(p.name) : null)));
  const state = JSON.stringify([chain, shadows]);
  if (!force && state === shown) return;
  shown = state;
  clear(list, chain.length ? chain.map((p, i) => policyCard(p, shadows[i])) : el('p.muted', 'The chain is empty.'));
  describeTarget();
}

async function shadowReport(name) {
  try {
    return await getJson(`/admin/policies/${encodeURIComponent(name)}/shadow`);
  } catch (error) {
    return { error: error.message };
  }
}

function activeVersion(p) {
  if (p.active_version !== undefined && p.active_version !== null) return p.active_version;
  const active = (p.versions || []).find((v) => v.active);
  return active ? active.version : null;
}

function policyCard(p, report) {
  const active = activeVersion(p);
  const versions = [...(p.versions || [])].sort((a, b) => b.version - a.version);
  // `rollback_to` is what served before the active version (null: nothing).
  const rollbackTo = 'rollback_to' in p ? p.rollback_to : null;
  const canRollBack = 'rollback_to' in p ? rollbackTo !== null : versions.some((v) => v.version < active);
  const name = encodeURIComponent(p.name);
  return el('article.card.policy', { dataset: { policy: p.name } },
    el('header.policy-head',
      el('span.position', `#${p.position ?? '?'}`),
      el('h3', p.name),
      el('span.badge.ok.active-version', { title: 'active version' }, active === null ? 'v?' : `v${active}`),
      el('span.meta', `contract ${p.contract || '?'}`),
      el('span.meta', `on error: ${p.on_error || '?'}`),
      el('span.spacer'),
      el('button.rollback', {
        type: 'button', disabled: !canRollBack,
        title: canRollBack
          ? `undo the last change: back to ${rollbackTo === null ? 'the previous version' : `v${rollbackTo}`}, which served before v${active}`
          : 'nothing served before the active version',
        onclick: () => act(`/admin/policies/${name}/rollback`, 'POST', `Rolled back ${p.name}`),
      }, rollbackTo === null ? 'Roll back' : `Roll back to v${rollbackTo}`),
      el('button.danger.remove', {
        type: 'button',
        onclick: () => {
          if (confirm(`Take ${p.name} out of the chain?`)) {
            act(`/admin/policies/${encodeURIComponent(p.name)}`, 'DELETE', `Removed ${p.name}`);
          }
        },
      }, 'Remove'),
    ),
    el('table.versions',
      el('thead', el('tr', ['version', '', 'source', 'sha256', 'deployed', 'config', ''].map((h) => el('th', h)))),
      el('tbody', versions.map((v) => el(`tr${v.version === active ? '.active' : ''}`, { dataset: { version: v.version } },
        el('td.num', `v${v.version}`),
        el('td', v.version === active ? el('span.badge.ok', 'active') : ''),
        el('td', v.source || v.module || ''),
        el('td', el('code', { title: v.sha256 || '' }, (v.sha256 || '').slice(0, 12))),
        el('td', fmtTime(v.deployed_at)),
        el('td', el('code.config', configText(v.config))),
        el('td', v.version === active ? '' : el('button.activate', {
          type: 'button',
          title: `make v${v.version} active (a rollback then returns to v${active})`,
          onclick: () => act(`/admin/policies/${name}/activate/${v.version}`, 'POST', `Activated ${p.name} v${v.version}`),
        }, 'Activate')),
      )))),
    historyTable(p),
    p.shadow ? shadowPanel(p, report) : null,
  );
}

const HOW = {
  config: 'from the config',
  deploy: 'deployed',
  rollback: 'rolled back',
  activate: 'activated by number',
  promote: 'shadow promoted',
  restart: 'resumed at a restart',
};

// Which version served from when to when, and how each came to serve.
function historyTable(p) {
  const history = p.history || [];
  if (!history.length) return null;
  return el('details.history', { open: history.length <= 6 },
    el('summary', `Activation history (${history.length})`),
    el('table.history',
      el('thead', el('tr', ['version', 'how', 'from', 'until', 'replica'].map((h) => el('th', h)))),
      el('tbody', history.map((a) => el(`tr${a.until_ms === null || a.until_ms === undefined ? '.active' : ''}`, { dataset: { version: a.version, how: a.how } },
        el('td.num', `v${a.version}`),
        el('td', (HOW[a.how] || a.how) + (a.undid ? ` (undid v${a.undid})` : '')),
        el('td', fmtTime(a.from_ms)),
        el('td', a.until_ms === null || a.until_ms === undefined ? 'serving' : fmtTime(a.until_ms)),
        el('td', a.followed ? `${a.replica || '?'} (followed here)` : `${a.replica || '?'} (this replica)`),
      )))),
  );
}

function configText(config) {
  if (config === null || config === undefined) return '';
  const text = JSON.stringify(config);
  return text === '{}' ? '{}' : text;
}

function shadowPanel(p, report) {
  const name = encodeURIComponent(p.name);
  const shadow = p.shadow;
  const version = typeof shadow === 'object' ? shadow.version : shadow;
  const examples = (report && report.examples) || [];
  return el('section.shadow', { dataset: { shadow: p.name } },
    el('div.shadow-head',
      el('span.badge.warn', `shadow v${version ?? report?.shadow_version ?? '?'}`),
      report && !report.error
        ? el('span', `saw ${fmtNum(report.compared)} requests, decided ${fmtNum(report.differed)} differently`)
        : el('span.error', report ? report.error : ''),
      el('span.spacer'),
      el('button.promote', { type: 'button', onclick: () => act(`/admin/policies/${name}/shadow/promote`, 'POST', `Promoted the shadow of ${p.name}`) }, 'Promote'),
      el('button.danger.discard', { type: 'button', onclick: () => act(`/admin/policies/${name}/shadow`, 'DELETE', `Discarded the shadow of ${p.name}`) }, 'Discard'),
    ),
    examples.length ? el('table.diffs',
      el('thead', el('tr', ['request', 'model', `active v${report.active_version ?? ''}`, `shadow v${report.shadow_version ?? ''}`].map((h) => el('th', h)))),
      el('tbody', examples.slice(-20).reverse().map((e) => el('tr',
        el('td.num', e.request_id ?? ''),
        el('td', e.model ?? ''),
        el('td', el('code', textOf(e.active))),
        el('td', el('code', textOf(e.shadow))),
      )))) : el('p.muted', 'No differences seen yet.'),
  );
}

function textOf(value) {
  return typeof value === 'string' ? value : JSON.stringify(value);
}

async function act(path, method, done) {
  try {
    const response = await api(path, { method });
    if (!response.ok) throw await errorOf(response);
    toast(done, 'ok');
  } catch (error) {
    toast(error.message, 'error');
  }
  await load(true);
}

function describeTarget() {
  const name = $('#deploy-name', root).value.trim();
  const existing = chain.find((p) => p.name === name);
  const hint = $('#deploy-hint', root);
  const config = $('#deploy-config', root);
  if (!name) {
    hint.textContent = 'Name an existing policy to deploy a new version, or a new name to add one to the chain.';
    config.placeholder = '{"aliases": {"glm4": "glm4-9b"}}';
  } else if (existing) {
    const active = (existing.versions || []).find((v) => v.version === activeVersion(existing));
    hint.textContent = `New version of ${name} (active: v${activeVersion(existing)}).`;
    config.placeholder = active ? `active config: ${configText(active.config) || 'none'}` : '';
  } else {
    hint.textContent = `Adds ${name} to the chain (last unless a position is given).`;
    config.placeholder = '{}';
  }
}

async function deploy(form) {
  const status = $('#deploy-status', root);
  const name = $('#deploy-name', root).value.trim();
  const file = $('#deploy-file', root).files[0];
  const configText = $('#deploy-config', root).value.trim();
  const position = $('#deploy-position', root).value.trim();
  const onError = $('#deploy-on-error', root).value;
  const shadow = $('#deploy-shadow', root).checked;
  const fail = (message) => {
    status.className = 'status error';
    status.textContent = message;
  };
  if (!/^[A-Za-z0-9_.-]+$/.test(name)) return fail('Name: letters, digits, "-", "_" or "." only.');
  if (!file) return fail('Choose a .wasm component to upload.');
  const params = new URLSearchParams();
  if (configText) {
    try {
      params.set('config', JSON.stringify(JSON.parse(configText)));
    } catch (error) {
      return fail(`Config is not JSON: ${error.message}`);
    }
  }
  if (position) params.set('position', position);
  if (onError) params.set('on_error', onError);
  if (shadow) params.set('shadow', 'true');
  const query = params.toString();
  const path = `/admin/policies/${encodeURIComponent(name)}${query ? `?${query}` : ''}`;

  const button = $('#deploy-submit', root);
  button.disabled = true;
  status.className = 'status';
  status.textContent = `Uploading ${file.name} (${fmtNum(file.size / 1024, 0)} KiB)… compiling and trialling…`;
  try {
    const body = await file.arrayBuffer();
    const init = { method: 'PUT', body, headers: { 'Content-Type': 'application/wasm' } };
    let response = await api(path, init);
    if (response.status === 404 || response.status === 405) {
      // A gateway that takes uploads with POST instead.
      const retry = await api(path, { ...init, method: 'POST' });
      if (retry.ok || retry.status !== 404) response = retry;
    }
    if (!response.ok) throw await errorOf(response);
    const version = await response.json().catch(() => ({}));
    status.className = 'status ok';
    status.textContent = `Deployed ${name} v${version.version ?? '?'}${shadow ? ' as a shadow' : ''} (sha256 ${(version.sha256 || '').slice(0, 12)}).`;
    $('#deploy-file', root).value = '';
  } catch (error) {
    fail(`Refused (${error.status || 'network'}${error.code ? ` ${error.code}` : ''}): ${error.message}`);
  } finally {
    button.disabled = false;
  }
  await load(true);
}
