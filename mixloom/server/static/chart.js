// A small SVG line chart: no library, sized to its container, redrawn on demand.
'use strict';

const SVG_NS = 'http://www.w3.org/2000/svg';

function svgEl(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

// Round tick steps (1, 2, 5 x 10^n) covering [lo, hi] in about `count` steps.
function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.floor(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

function fmtTick(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1).replace('.0e', 'e');
  return String(+v.toPrecision(4));
}

// series: [{name, color, points: [[x, y], ...]}]; draws into `svg` at its parent's width.
// opts: height, empty (the text with no points), yRange ([lo, hi]: a fixed y axis, e.g. a
// share's [0, 1], widened only by points outside it).
function drawLineChart(svg, series, opts) {
  opts = opts || {};
  const width = Math.max(240, svg.parentNode.clientWidth || 600);
  const height = opts.height || 220;
  const pad = { left: 48, right: 12, top: 10, bottom: 26 };
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('width', width);
  svg.setAttribute('height', height);
  while (svg.firstChild) svg.removeChild(svg.firstChild);

  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  svg.dataset.points = String(all.length);
  if (!all.length) {
    const t = svgEl('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle' });
    t.textContent = opts.empty || 'No data yet';
    svg.appendChild(t);
    return;
  }
  let x0 = Math.min(...all.map((p) => p[0]));
  let x1 = Math.max(...all.map((p) => p[0]));
  let y0 = Math.min(...all.map((p) => p[1]));
  let y1 = Math.max(...all.map((p) => p[1]));
  if (opts.yRange) { y0 = Math.min(y0, opts.yRange[0]); y1 = Math.max(y1, opts.yRange[1]); }
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const yt = niceTicks(y0, y1, 4);
  y0 = Math.min(y0, yt[0]);
  y1 = Math.max(y1, yt[yt.length - 1]);
  const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);

  for (const t of yt) {
    svg.appendChild(svgEl('line', { class: 'grid-line', x1: pad.left, x2: width - pad.right, y1: sy(t), y2: sy(t) }));
    const label = svgEl('text', { x: pad.left - 6, y: sy(t) + 4, 'text-anchor': 'end' });
    label.textContent = fmtTick(t);
    svg.appendChild(label);
  }
  const xt = niceTicks(x0, x1, Math.max(2, Math.floor(width / 110))).filter((t) => t >= x0 && t <= x1);
  for (const t of xt) {
    const label = svgEl('text', { x: sx(t), y: height - 8, 'text-anchor': 'middle' });
    label.textContent = fmtTick(t);
    svg.appendChild(label);
  }
  svg.appendChild(svgEl('line', { class: 'axis', x1: pad.left, x2: width - pad.right, y1: height - pad.bottom, y2: height - pad.bottom }));

  for (const s of series) {
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    if (!pts.length) continue;
    const d = pts.map((p, i) => `${i ? 'L' : 'M'}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join('');
    svg.appendChild(svgEl('path', { d, fill: 'none', stroke: s.color, 'stroke-width': 2, 'stroke-linejoin': 'round', 'data-series': s.name }));
    if (pts.length <= 40 || s.dots) {
      for (const p of pts) svg.appendChild(svgEl('circle', { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: s.color }));
    }
  }
}

window.drawLineChart = drawLineChart;
