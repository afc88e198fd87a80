// Small hand-written SVG line charts: one line per model over the last two minutes.

import { el, clear, fmtNum } from './lib.js';

const SVG = 'http://www.w3.org/2000/svg';
export const WINDOW_MS = 120_000;
const PALETTE = ['#2563eb', '#db2777', '#059669', '#d97706', '#7c3aed', '#0891b2', '#dc2626', '#65a30d'];
const colors = new Map();

export function colorOf(name) {
  if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length]);
  return colors.get(name);
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

/**
 * A chart card. `update(samples, now)` redraws from samples:
 * [{time, values: {model: number|null}}], oldest first.
 */
export class LineChart {
  constructor({ id, title, unit, format = (v) => fmtNum(v, v < 10 ? 2 : 0) }) {
    this.title = title;
    this.unit = unit;
    this.format = format;
    this.svg = svg('svg', { class: 'chart-svg', role: 'img', 'aria-label': title });
    this.legend = el('div.legend');
    this.node = el('figure.chart', { id, dataset: { chart: id } },
      el('figcaption', el('span.chart-title', title), el('span.chart-unit', unit)),
      this.svg, this.legend);
  }

  update(samples, now = Date.now()) {
    const width = Math.max(240, Math.round(this.svg.clientWidth || this.node.clientWidth || 320));
    const height = 140;
    const pad = { left: 44, right: 8, top: 8, bottom: 18 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    this.svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
    this.svg.setAttribute('width', width);
    this.svg.setAttribute('height', height);

    const start = now - WINDOW_MS;
    const visible = samples.filter((s) => s.time >= start - 1000);
    const models = [];
    let max = 0;
    for (const sample of visible) {
      for (const [model, value] of Object.entries(sample.values)) {
        if (!models.includes(model)) models.push(model);
        if (value !== null && value !== undefined && Number.isFinite(value)) max = Math.max(max, value);
      }
    }
    models.sort();
    const top = niceMax(max);
    const x = (t) => pad.left + ((t - start) / WINDOW_MS) * plotW;
    const y = (v) => pad.top + plotH - (v / top) * plotH;

    const nodes = [];
    // grid and axes
    for (const fraction of [0, 0.5, 1]) {
      const gy = pad.top + plotH - fraction * plotH;
      nodes.push(svg('line', { x1: pad.left, x2: width - pad.right, y1: gy, y2: gy, class: 'grid' }));
      const label = svg('text', { x: pad.left - 6, y: gy + 4, class: 'axis', 'text-anchor': 'end' });
      label.textContent = this.format(top * fraction);
      nodes.push(label);
    }
    for (const [t, text, anchor] of [[start, '−2 min', 'start'], [now - 60_000, '−1 min', 'middle'], [now, 'now', 'end']]) {
      const label = svg('text', { x: x(t), y: height - 4, class: 'axis', 'text-anchor': anchor });
      label.textContent = text;
      nodes.push(label);
    }

    // lines: a gap (null) breaks a line into segments
    for (const model of models) {
      let segment = [];
      const segments = [segment];
      let peak = 0; // the highest value drawn, for tests and tooltips
      for (const sample of visible) {
        const value = sample.values[model];
        if (value === null || value === undefined || !Number.isFinite(value)) {
          if (segment.length) segments.push(segment = []);
        } else {
          peak = Math.max(peak, value);
          segment.push(`${x(Math.max(sample.time, start)).toFixed(1)},${y(value).toFixed(1)}`);
        }
      }
      for (const points of segments) {
        if (!points.length) continue;
        if (points.length === 1) {
          const [cx, cy] = points[0].split(',');
          nodes.push(svg('circle', { cx, cy, r: 2, fill: colorOf(model), class: 'series', 'data-model': model, 'data-peak': peak }));
        } else {
          nodes.push(svg('polyline', {
            points: points.join(' '), fill: 'none', stroke: colorOf(model), 'stroke-width': 1.75,
            'stroke-linejoin': 'round', class: 'series', 'data-model': model, 'data-peak': peak,
          }));
        }
      }
    }
    this.svg.replaceChildren(...nodes);

    // legend with each model's latest value
    const latest = visible[visible.length - 1];
    clear(this.legend, models.length ? models.map((model) => {
      const value = latest ? latest.values[model] : null;
      const swatch = el('span.swatch');
      swatch.style.background = colorOf(model);
      return el('span.legend-item', { dataset: { model } }, swatch, model, ' ',
        el('b', value === null || value === undefined ? '–' : this.format(value)));
    }) : el('span.muted', 'waiting for traffic…'));
  }
}
