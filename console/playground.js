// Chat playground: talks to the gateway through the admin listener exactly as a client would.

import { api, errorOf, getJson, readSse, el, clear, $, fmtNum, fmtMs } from './lib.js';

const BASE = '/admin/playground/v1';
let root;
let history = [];
let running = null; // AbortController of the answer being streamed

export function init(section) {
  root = section;
  $('#pg-form', root).addEventListener('submit', (event) => {
    event.preventDefault();
    send();
  });
  $('#pg-input', root).addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $('#pg-stop', root).addEventListener('click', () => running && running.abort());
  $('#pg-clear', root).addEventListener('click', () => {
    if (running) running.abort();
    history = [];
    clear($('#pg-transcript', root), el('p.muted.empty', 'Messages you send go through the policy chain to a backend, like any client request.'));
  });
  $('#pg-models-refresh', root).addEventListener('click', () => loadModels());
  loadModels();
}

export function show() {
  if (!$('#pg-model', root).options.length) loadModels();
}

async function loadModels() {
  const select = $('#pg-model', root);
  const previous = select.value;
  try {
    const body = await getJson(`${BASE}/models`);
    const ids = (body.data || []).map((m) => m.id).sort();
    clear(select, ids.map((id) => el('option', { value: id, selected: id === previous }, id)));
    if (!ids.length) clear(select, el('option', { value: '' }, 'no model is served right now'));
  } catch (error) {
    clear(select, el('option', { value: '' }, `models: ${error.message}`));
  }
}

function bubble(role, text) {
  const node = el(`div.msg.${role}`, { dataset: { role } },
    el('div.role', role), el('div.text', text || ''));
  const transcript = $('#pg-transcript', root);
  const empty = $('.empty', transcript);
  if (empty) empty.remove();
  transcript.append(node);
  node.scrollIntoView({ block: 'end' });
  return node;
}

async function send() {
  if (running) return;
  const input = $('#pg-input', root);
  const model = $('#pg-model', root).value;
  const text = input.value.trim();
  if (!text || !model) return;
  input.value = '';

  const system = $('#pg-system', root).value.trim();
  history.push({ role: 'user', content: text });
  bubble('user', text);
  const answer = bubble('assistant');
  answer.dataset.state = 'waiting';
  const textNode = $('.text', answer);
  const meta = el('div.meta');
  answer.append(meta);

  const body = {
    model,
    messages: [...(system ? [{ role: 'system', content: system }] : []), ...history],
    stream: true,
    stream_options: { include_usage: true },
  };
  const maxTokens = Number($('#pg-max-tokens', root).value);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = $('#pg-temperature', root).value.trim();
  if (temperature !== '') body.temperature = Number(temperature);

  running = new AbortController();
  setBusy(true);
  const started = performance.now();
  const stats = { ttft: null, backend: null, model: null, usage: null, finish: null, error: null, chunks: 0 };
  let content = '';
  const render = () => renderMeta(meta, stats, performance.now() - started, content);
  const ticker = setInterval(render, 250);
  try {
    const response = await api(`${BASE}/chat/completions`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
      body: JSON.stringify(body),
      signal: running.signal,
    });
    stats.backend = response.headers.get('x-sluice-backend');
    stats.model = response.headers.get('x-sluice-model');
    if (!response.ok) throw await errorOf(response);
    answer.dataset.state = 'streaming';
    const type = response.headers.get('content-type') || '';
    const onChunk = (chunk) => {
      if (chunk.error) {
        stats.error = chunk.error.message || JSON.stringify(chunk.error);
        return;
      }
      if (chunk.usage) stats.usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) return;
      const piece = choice.delta ? choice.delta.content : choice.message ? choice.message.content : choice.text;
      if (piece) {
        if (stats.ttft === null) stats.ttft = performance.now() - started;
        content += piece;
        textNode.textContent = content;
        stats.chunks += 1;
        answer.scrollIntoView({ block: 'end' });
      }
      if (choice.finish_reason) stats.finish = choice.finish_reason;
    };
    if (type.includes('text/event-stream')) {
      await readSse(response.body, (data) => {
        if (data.trim() === '[DONE]') return;
        try { onChunk(JSON.parse(data)); } catch { /* not JSON: ignore */ }
      });
    } else {
      onChunk(await response.json());
    }
    answer.dataset.state = stats.error ? 'error' : 'done';
  } catch (error) {
    if (error.name === 'AbortError') {
      stats.finish = 'stopped';
      answer.dataset.state = 'done';
    } else {
      stats.error = error.message;
      answer.dataset.state = 'error';
    }
  } finally {
    clearInterval(ticker);
    running = null;
    setBusy(false);
  }
  if (content) history.push({ role: 'assistant', content });
  else if (!stats.error) textNode.textContent = '(empty answer)';
  if (stats.error) answer.append(el('div.error.msg-error', stats.error));
  render();
  $('#pg-input', root).focus();
}

function renderMeta(meta, stats, elapsed, content) {
  const parts = [];
  const item = (field, label, value) => parts.push(el('span.meta-item', { dataset: { field } }, el('span.label', label), ' ', el('b', value)));
  item('backend', 'backend', stats.backend || '–');
  if (stats.model) item('model', 'model', stats.model);
  item('ttft', 'TTFT', stats.ttft === null ? '–' : fmtMs(stats.ttft));
  if (stats.usage) {
    item('tokens', 'tokens', `${fmtNum(stats.usage.prompt_tokens)} + ${fmtNum(stats.usage.completion_tokens)} = ${fmtNum(stats.usage.total_tokens)}`);
  } else {
    item('tokens', 'tokens', content ? `~${fmtNum(stats.chunks)} chunks` : '–');
  }
  item('time', 'time', fmtMs(elapsed));
  const generated = stats.usage ? stats.usage.completion_tokens : null;
  if (generated && stats.ttft !== null && elapsed > stats.ttft) {
    item('rate', 'speed', `${fmtNum(generated / ((elapsed - stats.ttft) / 1000), 0)} tok/s`);
  }
  if (stats.finish) item('finish', 'finish', stats.finish);
  clear(meta, parts);
}

function setBusy(busy) {
  $('#pg-send', root).disabled = busy;
  $('#pg-stop', root).hidden = !busy;
}
