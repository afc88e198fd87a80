// Shared helpers: the authenticated fetch, SSE reading, DOM building, formatting.

const TOKEN_KEY = 'sluice.adminToken';

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

// The login dialog is shown by app.js; `askToken` is set there. Concurrent 401s
// share one question.
let asking = null;
export const auth = { askToken: null };

function ask(reason) {
  if (!asking) {
    asking = auth.askToken(reason).finally(() => { asking = null; });
  }
  return asking;
}

/** fetch with the admin token; on 401 asks for a token once and retries. */
export async function api(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = new Headers(options.headers || {});
    const t = token();
    if (t) headers.set('Authorization', `Bearer ${t}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401 || attempt > 3) return response;
    // Drain so the connection can be reused.
    await response.arrayBuffer().catch(() => {});
    setToken('');
    await ask(attempt === 0 && !t ? 'This gateway needs its admin token.' : 'That token was refused.');
  }
}

export class HttpError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The error message of an OpenAI-shaped error body (or the raw text). */
export async function errorOf(response) {
  const text = await response.text().catch(() => '');
  try {
    const body = JSON.parse(text);
    if (body && body.error) {
      return new HttpError(response.status, body.error.message || String(body.error), body.error.code);
    }
  } catch { /* not JSON */ }
  return new HttpError(response.status, text.trim() || `HTTP ${response.status}`, null);
}

export async function getJson(path) {
  const response = await api(path);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/**
 * Reads a text/event-stream body, calling onData(dataString) for each event
 * (multi-line data joined with "\n"). Resolves when the stream ends.
 */
export async function readSse(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  const flush = (block) => {
    const lines = block.split(/\r?\n/);
    const data = [];
    for (const line of lines) {
      if (line.startsWith('data:')) data.push(line.slice(line[5] === ' ' ? 6 : 5));
    }
    if (data.length) onData(data.join('\n'));
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let index;
    while ((index = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, index);
      buffer = buffer.slice(index).replace(/^\r?\n\r?\n/, '');
      flush(block);
    }
  }
  buffer += decoder.decode();
  if (buffer.trim()) flush(buffer);
}

/** el('div.card#id', {attrs}, ...children) */
export function el(spec, attrs, ...children) {
  const match = /^([a-z0-9]+)?((?:[.#][\w-]+)*)$/i.exec(spec);
  const node = document.createElement((match && match[1]) || 'div');
  if (match && match[2]) {
    for (const part of match[2].match(/[.#][\w-]+/g)) {
      if (part[0] === '.') node.classList.add(part.slice(1));
      else node.id = part.slice(1);
    }
  }
  if (attrs && (typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key in node && key !== 'list' && typeof value !== 'string') node[key] = value;
    else node.setAttribute(key, value === true ? '' : value);
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(child instanceof Node ? child : String(child));
  }
}

export function clear(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

export function fmtNum(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return '–';
  return Number(value).toLocaleString(undefined, {
    maximumFractionDigits: digits,
    minimumFractionDigits: 0,
  });
}

export function fmtMs(value) {
  if (value === null || value === undefined) return '–';
  if (value >= 10000) return `${fmtNum(value / 1000, 1)} s`;
  return `${fmtNum(value, value < 10 ? 1 : 0)} ms`;
}

/** unix seconds or ms → Date */
export function toDate(unix) {
  if (unix === null || unix === undefined) return null;
  return new Date(unix < 1e12 ? unix * 1000 : unix);
}

export function fmtTime(unix) {
  const date = toDate(unix);
  return date ? date.toLocaleString() : '–';
}

export function fmtAgo(unixMs, now = Date.now()) {
  const date = toDate(unixMs);
  if (!date) return 'never';
  const seconds = Math.max(0, (now - date.getTime()) / 1000);
  if (seconds < 10) return `${seconds.toFixed(1)} s ago`;
  if (seconds < 120) return `${Math.round(seconds)} s ago`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

export function badge(ok, yes, no) {
  return el(`span.badge.${ok ? 'ok' : 'bad'}`, ok ? yes : no);
}

/** A small toast at the bottom of the page. */
export function toast(message, kind = 'info') {
  const host = document.getElementById('toasts');
  const node = el(`div.toast.${kind}`, { role: kind === 'error' ? 'alert' : 'status' }, message);
  host.append(node);
  setTimeout(() => node.remove(), kind === 'error' ? 8000 : 4000);
}
