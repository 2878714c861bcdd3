// The mixloom dashboard: a hash-routed page over the public /v1 API. A server-side
// session's token (never the API key) lives in an HttpOnly cookie (see
// server/dashboard.py); writes carry X-Mixloom-Dashboard. No inline script or style: the
// Content-Security-Policy (server/headers.py) allows this origin's files only.
'use strict';

const JOBS = '/v1/fine_tuning/jobs';
const FINISHED = new Set(['succeeded', 'failed', 'cancelled']);
const REFRESH_MS = 3000;
const view = document.getElementById('view');
const state = { tenant: null, hp: null, cleanups: [] };
const fileRows = new Map(); // file id -> rows (for progress estimates)
const metricCache = new Map(); // job id -> {first, last} metric records

// --- helpers -------------------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'style') el.style.cssText = v; // the CSSOM, which the CSP allows (no style attribute)
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.appendChild(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code;
    this.param = err.param;
    this.problems = err.problems || (err.param ? [{ where: err.param, message: err.message }] : []);
  }
}

async function api(method, path, body) {
  const opts = { method, credentials: 'same-origin', headers: { 'X-Mixloom-Dashboard': '1' } };
  if (body instanceof FormData) opts.body = body;
  else if (body !== undefined) {
    opts.body = JSON.stringify(body);
    opts.headers['Content-Type'] = 'application/json';
  }
  const res = await fetch(path, opts);
  let data = null;
  try { data = await res.json(); } catch (_) { data = null; }
  if (!res.ok) {
    const error = new ApiError(res.status, data);
    if (res.status === 401 && path.startsWith('/v1/')) { state.tenant = null; route(); }
    throw error;
  }
  return data;
}

function onCleanup(fn) { state.cleanups.push(fn); }
function every(ms, fn) { const t = setInterval(fn, ms); onCleanup(() => clearInterval(t)); }

function fmtTime(ts) {
  if (!ts) return '—';
  const d = new Date(ts * 1000);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false })
    : d.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', hour12: false });
}
function fmtDuration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return '—';
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}
function fmtNum(v, digits) {
  if (typeof v !== 'number' || !Number.isFinite(v)) return '—';
  if (Math.abs(v) !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e6)) return v.toExponential(2);
  return v.toFixed(digits === undefined ? 4 : digits).replace(/\.?0+$/, (m) => (m.startsWith('.') ? '' : m));
}
function fmtBytes(b) {
  if (typeof b !== 'number') return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return `${b.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function badge(status) { return h('span', { class: `badge ${status}`, 'data-status': status }, status.replace('_', ' ')); }
// A job's method in either spelling: mixloom's {type: "lora"|"mixlora", <type>: {...}}, or
// OpenAI's {type: "supervised"|"dpo", <type>: {hyperparameters, adapter: {type, hyperparameters}}}
// (a DPO body's hyperparameters hold beta and label_smoothing beside the training ones).
function methodBody(job) { return (job.method && job.method[job.method.type]) || {}; }
function methodType(job) {
  const adapter = methodBody(job).adapter;
  return (adapter && adapter.type) || (job.method && job.method.type) || '—';
}
const isDpo = (job) => !!(job && job.method && job.method.type === 'dpo');
const adapterName = (job) => (methodType(job) === 'mixlora' ? 'MixLoRA' : 'LoRA');
// The job page's method: "DPO · MixLoRA" for a preference job; a supervised one its adapter type.
function methodLabel(job) { return isDpo(job) ? `DPO · ${adapterName(job)}` : methodType(job); }
function hyper(job) {
  const body = methodBody(job);
  return { ...(body.hyperparameters || {}), ...((body.adapter && body.adapter.hyperparameters) || {}) };
}

// The metric names of mixloom/trainer/session.py (OpenAI's where it has one): a number, or
// undefined where the record has none.
function pick(m, names) {
  for (const n of names) if (typeof m[n] === 'number') return m[n];
  return undefined;
}
const trainLoss = (m) => pick(m, ['train_loss']);
const valLoss = (m) => pick(m, ['valid_loss']);
const learningRate = (m) => pick(m, ['learning_rate']);
const tokensPerS = (m) => pick(m, ['tokens_per_second']);
// A DPO step's rewards (beta x the policy's log-probability over the reference's), TRL's names.
const rewardsChosen = (m) => pick(m, ['rewards_chosen']);
const rewardsRejected = (m) => pick(m, ['rewards_rejected']);
const rewardMargin = (m) => pick(m, ['reward_margin']);
const rewardAccuracy = (m) => pick(m, ['reward_accuracy']);
const validRewardAccuracy = (m) => pick(m, ['valid_reward_accuracy']);
// Peak GPU memory when the worker has a GPU, else the worker process's resident memory.
function memory(m) {
  const gpu = pick(m, ['gpu_peak_memory_bytes', 'gpu_memory_bytes']);
  if (gpu !== undefined) return fmtBytes(gpu);
  const cpu = pick(m, ['cpu_memory_bytes']);
  if (cpu !== undefined) return `${fmtBytes(cpu)} (CPU)`;
  return '—';
}

// Optimizer steps in all: the worker's own figure, else ceil(rows / batch) * epochs capped by
// max_steps (mixloom/clients/progress.py computes the same).
function totalSteps(job, rows, latest) {
  if (latest && Number.isInteger(latest.metrics.total_steps)) return latest.metrics.total_steps;
  const hp = hyper(job);
  let est = null;
  if (rows) est = Math.ceil(rows / Math.max(1, hp.batch_size || 1)) * Math.max(1, hp.n_epochs || 1);
  if (hp.max_steps) return est ? Math.min(hp.max_steps, est) : hp.max_steps;
  return est;
}

function progressOf(job, first, last, rows) {
  const total = totalSteps(job, rows, last);
  let step = last ? last.step : 0;
  if (job.status === 'succeeded' && total) step = Math.max(step, total);
  const fraction = total ? Math.min(1, step / total) : null;
  let eta = null;
  if (job.status === 'running' && last && typeof last.metrics.eta_seconds === 'number') {
    eta = last.metrics.eta_seconds - Math.max(0, Date.now() / 1000 - last.created_at);
    eta = Math.max(0, eta);
  } else if (job.status === 'running' && total && first && last && last.step > first.step) {
    eta = Math.max(0, ((total - step) * (last.created_at - first.created_at)) / (last.step - first.step));
  }
  return { step, total, fraction, eta, tps: last ? tokensPerS(last.metrics) : undefined };
}

function progressBar(p) {
  const pct = p.fraction === null ? 0 : Math.round(p.fraction * 100);
  const label = p.total ? `${p.step}/${p.total}` : p.step ? `step ${p.step}` : '—';
  return h('div', { class: 'progress', title: label },
    h('div', { class: 'bar' }, h('span', { style: `width:${pct}%` })),
    h('span', { class: 'small muted num' }, p.fraction === null ? label : `${pct}%`));
}

async function rowsOf(fileId) {
  if (!fileRows.has(fileId)) {
    try { fileRows.set(fileId, (await api('GET', `/v1/files/${fileId}`)).rows); } catch (_) { fileRows.set(fileId, null); }
  }
  return fileRows.get(fileId);
}

// Newest metrics of a job, fetched incrementally (only steps after the last one seen).
async function latestMetrics(job) {
  let entry = metricCache.get(job.id) || { first: null, last: null, done: false };
  if (entry.done) return entry;
  for (let page = 0; page < 20; page++) {
    const after = entry.last ? `&after=${entry.last.step}` : '';
    const res = await api('GET', `${JOBS}/${job.id}/metrics?limit=1000${after}`);
    if (res.data.length) {
      entry = { ...entry, first: entry.first || res.data[0], last: res.data[res.data.length - 1] };
    }
    if (!res.has_more) break;
  }
  entry.done = FINISHED.has(job.status);
  metricCache.set(job.id, entry);
  return entry;
}

// --- routing -------------------------------------------------------------------------

function route() {
  for (const fn of state.cleanups.splice(0)) fn();
  view.replaceChildren();
  const nav = document.getElementById('nav');
  nav.hidden = !state.tenant;
  if (!state.tenant) { renderLogin(); return; }
  document.getElementById('tenant-name').textContent = state.tenant.name;
  const hash = location.hash || '#/';
  const job = hash.match(/^#\/jobs\/([\w-]+)$/);
  for (const a of nav.querySelectorAll('a')) a.classList.toggle('active', a.dataset.nav === (hash === '#/new' ? 'new' : job ? '' : 'jobs'));
  if (hash === '#/new') renderNewJob();
  else if (job) renderJob(job[1]);
  else renderJobs();
}
window.addEventListener('hashchange', route);

// --- sign in -------------------------------------------------------------------------

function renderLogin() {
  document.title = 'Sign in · mixloom';
  const error = h('div', { class: 'alert', id: 'login-error', role: 'alert', hidden: true });
  const input = h('input', { id: 'api-key', name: 'api_key', type: 'password', autocomplete: 'off', placeholder: 'mxl-…', required: true });
  const button = h('button', { class: 'primary', type: 'submit', id: 'sign-in' }, 'Sign in');
  const form = h('form', { class: 'card stack', id: 'login-form', novalidate: true,
    onsubmit: async (ev) => {
      ev.preventDefault();
      error.hidden = true;
      if (!input.value.trim()) { error.textContent = 'Paste your API key first.'; error.hidden = false; return; }
      button.disabled = true;
      try {
        const res = await api('POST', '/dashboard/session', { api_key: input.value.trim() });
        state.tenant = res.tenant;
        input.value = '';
        route();
      } catch (e) {
        error.textContent = e.message;
        error.hidden = false;
        input.focus();
      } finally { button.disabled = false; }
    } },
  h('h1', {}, 'Sign in'),
  h('p', { class: 'muted small' }, 'Use the API key an admin gave you (mixloom keys create TENANT). It is kept in a secure cookie for this browser only.'),
  h('div', { class: 'field' }, h('label', { for: 'api-key' }, 'API key'), input),
  error,
  h('div', { class: 'actions' }, button));
  view.appendChild(h('div', { class: 'login' }, form));
  input.focus();
}

document.getElementById('sign-out').addEventListener('click', async () => {
  await api('DELETE', '/dashboard/session');
  state.tenant = null;
  location.hash = '#/';
  route();
});

// --- jobs table ----------------------------------------------------------------------

function renderJobs() {
  document.title = 'Jobs · mixloom';
  const tbody = h('tbody');
  const more = h('button', { type: 'button', hidden: true }, 'Load more');
  const empty = h('div', { class: 'empty', hidden: true }, 'No jobs yet. ', h('a', { href: '#/new' }, 'Create your first job'), '.');
  const table = h('table', { class: 'responsive', id: 'jobs-table' },
    h('thead', {}, h('tr', {}, ...['Job', 'Status', 'Method', 'Progress', 'Tokens/s', 'ETA', 'Created'].map((t) => h('th', {}, t)))),
    tbody);
  view.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Jobs'), h('a', { class: 'button primary', href: '#/new' }, '+ New job')),
    h('div', { class: 'card jobs-card' }, table, empty, h('div', { class: 'actions', style: 'justify-content:center;margin-top:8px' }, more)));

  let pages = 1;
  let alive = true;
  onCleanup(() => { alive = false; });
  async function load() {
    const jobs = [];
    let after = null;
    let hasMore = false;
    for (let i = 0; i < pages; i++) {
      const res = await api('GET', `${JOBS}?limit=20${after ? `&after=${after}` : ''}`);
      jobs.push(...res.data);
      hasMore = res.has_more;
      if (!hasMore || !res.data.length) break;
      after = res.data[res.data.length - 1].id;
    }
    const rows = await Promise.all(jobs.map(jobRow));
    if (!alive) return;
    tbody.replaceChildren(...rows);
    empty.hidden = jobs.length > 0;
    table.hidden = jobs.length === 0;
    more.hidden = !hasMore;
  }
  more.addEventListener('click', () => { pages++; load(); });
  load().catch(showError);
  every(REFRESH_MS, () => load().catch(() => {}));
}

async function jobRow(job) {
  let p = { step: 0, total: null, fraction: null, eta: null, tps: undefined };
  if (job.started_at) {
    const [m, rows] = await Promise.all([latestMetrics(job), rowsOf(job.training_file)]);
    p = progressOf(job, m.first, m.last, rows);
  }
  const open = () => { location.hash = `#/jobs/${job.id}`; };
  return h('tr', { class: 'clickable', 'data-job-id': job.id, onclick: open },
    h('td', { 'data-label': 'Job' }, h('a', { href: `#/jobs/${job.id}`, class: 'mono' }, job.id), job.suffix ? h('div', { class: 'small muted' }, job.suffix) : null),
    h('td', { 'data-label': 'Status' }, badge(job.status)),
    h('td', { 'data-label': 'Method' }, (isDpo(job) ? 'DPO · ' : '') + (methodType(job) === 'mixlora' ? `MixLoRA ×${hyper(job).num_experts}` : 'LoRA')),
    h('td', { 'data-label': 'Progress' }, progressBar(p)),
    h('td', { 'data-label': 'Tokens/s', class: 'num' }, p.tps === undefined ? '—' : Math.round(p.tps).toLocaleString()),
    h('td', { 'data-label': 'ETA', class: 'num' }, job.status === 'running' ? fmtDuration(p.eta) : '—'),
    h('td', { 'data-label': 'Created', class: 'num' }, fmtTime(job.created_at)));
}

function showError(e) {
  view.prepend(h('div', { class: 'alert', role: 'alert' }, e.message || String(e)));
}

// --- one job -------------------------------------------------------------------------

function renderJob(jobId) {
  document.title = `${jobId} · mixloom`;
  const s = { job: null, metrics: [], events: [], rows: null, source: null };
  const title = h('div', { class: 'title' }, h('h1', { class: 'mono' }, jobId));
  const buttons = {
    pause: h('button', { type: 'button', id: 'pause-job', onclick: () => act('pause') }, 'Pause'),
    resume: h('button', { type: 'button', id: 'resume-job', onclick: () => act('resume') }, 'Resume'),
    cancel: h('button', { type: 'button', class: 'danger', id: 'cancel-job', onclick: () => act('cancel') }, 'Cancel'),
  };
  const download = h('a', { class: 'button primary', id: 'download-adapter', hidden: true, href: `${JOBS}/${jobId}/adapter`, download: '' }, 'Download adapter');
  const notice = h('div', { class: 'notice', hidden: true });
  const error = h('div', { class: 'alert', role: 'alert', hidden: true });
  const stats = h('div', { class: 'stats', id: 'job-stats' });
  const lossSvg = svgChart('loss-chart');
  const lossTitle = h('h2', {}, 'Loss');
  const rewardsSvg = svgChart('rewards-chart');
  const marginSvg = svgChart('margin-chart');
  const accuracySvg = svgChart('reward-accuracy-chart');
  const legendItem = (color, name) => h('span', {}, h('i', { style: `background:${color}` }), name);
  const dpoCharts = h('div', { class: 'stack', id: 'dpo-charts', hidden: true },
    h('section', { class: 'card' }, h('h2', {}, 'Rewards'), rewardsSvg,
      h('div', { class: 'legend' }, legendItem('var(--ok)', 'chosen'), legendItem('var(--bad)', 'rejected')),
      h('p', { class: 'small muted' }, 'beta × (policy − reference) log-probability of the preferred (chosen) and the other (rejected) answer, mean over the step\'s pairs.')),
    h('section', { class: 'grid', style: 'grid-template-columns:repeat(auto-fit,minmax(240px,1fr))' },
      h('div', { class: 'card' }, h('h2', {}, 'Reward margin'), marginSvg),
      h('div', { class: 'card' }, h('h2', {}, 'Reward accuracy'), accuracySvg,
        h('div', { class: 'legend' }, legendItem('var(--train)', 'train'), legendItem('var(--val)', 'validation')))));
  const lrSvg = svgChart('lr-chart');
  const tpsSvg = svgChart('tps-chart');
  const experts = h('div', { class: 'experts', id: 'router-load' });
  const expertsCard = h('section', { class: 'card', hidden: true }, h('h2', {}, 'Router load per expert'), experts,
    h('p', { class: 'small muted' }, 'Share of routed tokens per expert at the latest step; an even spread is the goal of the load-balance loss.'));
  const shared = h('div', { class: 'chips', id: 'shared-with' }, h('span', { class: 'muted small' }, '—'));
  const events = h('ul', { class: 'events', id: 'events' });
  const ckptBody = h('tbody');
  const ckptEmpty = h('div', { class: 'empty small' }, 'No checkpoints yet.');
  const details = h('dl', { class: 'kv', id: 'job-details' });
  const playground = renderPlayground();
  const evalBody = h('tbody');
  const evalNote = h('p', { class: 'small muted', id: 'evaluation-note' });
  const evalCard = h('section', { class: 'card', id: 'evaluation', hidden: true }, h('h2', {}, 'Evaluation'),
    h('table', { class: 'responsive', id: 'evaluation-table' }, h('thead', {}, h('tr', {},
      h('th', {}, 'Task'), h('th', {}, 'Questions'), h('th', {}, 'Base'), h('th', {}, 'Adapter'), h('th', {}, 'Difference'))), evalBody),
    evalNote);

  view.append(
    h('div', { class: 'page-head' }, title, h('div', { class: 'actions' }, buttons.pause, buttons.resume, buttons.cancel, download)),
    error, notice, stats,
    h('div', { class: 'grid two' },
      h('div', { class: 'stack' },
        h('section', { class: 'card' }, lossTitle, lossSvg,
          h('div', { class: 'legend' }, legendItem('var(--train)', 'train'), legendItem('var(--val)', 'validation'))),
        dpoCharts,
        h('section', { class: 'grid', style: 'grid-template-columns:repeat(auto-fit,minmax(240px,1fr))' },
          h('div', { class: 'card' }, h('h2', {}, 'Learning rate'), lrSvg),
          h('div', { class: 'card' }, h('h2', {}, 'Tokens/s'), tpsSvg)),
        expertsCard,
        evalCard,
        h('section', { class: 'card' }, h('h2', {}, 'Checkpoints'),
          h('table', { class: 'responsive', id: 'checkpoints' }, h('thead', {}, h('tr', {}, h('th', {}, 'Step'), h('th', {}, 'Saved'), h('th', {}, 'Loss'), h('th', {}, ''))), ckptBody), ckptEmpty)),
      h('div', { class: 'stack' },
        playground.card,
        h('section', { class: 'card' }, h('h2', {}, 'Shares steps with'), shared),
        h('section', { class: 'card' }, h('h2', {}, 'Events'), events),
        h('section', { class: 'card' }, h('h2', {}, 'Details'), details))));

  function svgChart(id) {
    const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
    svg.id = id;
    svg.setAttribute('class', 'chart');
    return h('div', {}, svg);
  }

  async function act(action) {
    error.hidden = true;
    try {
      s.job = await api('POST', `${JOBS}/${jobId}/${action}`);
      renderHead();
    } catch (e) { error.textContent = e.message; error.hidden = false; }
  }

  function renderHead() {
    const job = s.job;
    title.replaceChildren(h('h1', { class: 'mono' }, job.id), badge(job.status));
    const finished = FINISHED.has(job.status);
    buttons.cancel.disabled = finished || job.requested_action === 'cancel';
    buttons.pause.disabled = !['queued', 'running'].includes(job.status) || !!job.requested_action;
    buttons.resume.disabled = !(job.status === 'paused' || job.requested_action === 'pause');
    download.hidden = !job.adapter_available;
    playground.show(job.status === 'succeeded' && job.adapter_available ? job.fine_tuned_model : null);
    renderEvaluation(job.evaluation);
    const notes = [];
    if (job.requested_action) notes.push(`${job.requested_action} requested; the worker carries it out within a heartbeat.`);
    if (job.status === 'queued' && job.queue_position) notes.push(`Queued: position ${job.queue_position}.`);
    if (job.error) notes.push(`Error: ${job.error.message}`);
    notice.textContent = notes.join(' ');
    notice.hidden = !notes.length;
    lossTitle.textContent = isDpo(job) ? 'DPO loss' : 'Loss';
    dpoCharts.hidden = !isDpo(job);
    const hp = hyper(job);
    const rowsKv = [
      ['Model', job.model], ['Method', methodLabel(job)], ['Training file', job.training_file],
      ['Validation file', job.validation_file || '—'], ['Seed', job.seed], ['Created', fmtTime(job.created_at)],
      ['Started', fmtTime(job.started_at)], ['Finished', fmtTime(job.finished_at)],
      ['Trained tokens', job.trained_tokens ? job.trained_tokens.toLocaleString() : '—'],
    ];
    const objectiveFirst = (k) => (k === 'beta' || k === 'label_smoothing' ? 0 : 1);
    for (const [k, v] of Object.entries(hp).sort((a, b) => objectiveFirst(a[0]) - objectiveFirst(b[0]))) {
      if (v === null || typeof v === 'object' && !Array.isArray(v)) continue;
      if (k === 'label_smoothing' && v === 0) continue; // plain DPO: only beta is of note
      rowsKv.push([k, Array.isArray(v) ? v.join(', ') : v]);
    }
    details.replaceChildren(...rowsKv.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))]));
    renderStats();
  }

  function renderStats() {
    if (!s.job) return;
    const last = s.metrics[s.metrics.length - 1];
    const m = last ? last.metrics : {};
    const vals = s.metrics.map((x) => valLoss(x.metrics)).filter((v) => v !== undefined);
    const p = progressOf(s.job, s.metrics[0], last, s.rows);
    const stat = (label, value, id) => h('div', { class: 'stat' }, h('div', { class: 'label' }, label), h('div', { class: 'value', id }, value));
    stats.replaceChildren(
      h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Progress'), h('div', { class: 'value', id: 'stat-step' }, p.total ? `${p.step} / ${p.total}` : String(p.step)), progressBar(p)),
      stat('Train loss', fmtNum(trainLoss(m)), 'stat-loss'),
      stat('Val loss', fmtNum(vals[vals.length - 1]), 'stat-val-loss'),
      ...(isDpo(s.job) ? [stat('Reward accuracy', fmtNum(rewardAccuracy(m), 2), 'stat-reward-accuracy')] : []),
      stat('Learning rate', fmtNum(learningRate(m)), 'stat-lr'),
      stat('Tokens/s', tokensPerS(m) === undefined ? '—' : Math.round(tokensPerS(m)).toLocaleString(), 'stat-tps'),
      stat('Memory', memory(m), 'stat-memory'),
      stat('ETA', s.job.status === 'running' ? fmtDuration(p.eta) : '—', 'stat-eta'));
  }

  let drawPending = false;
  function redraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      const series = (f) => s.metrics.map((x) => [x.step, f(x.metrics)]).filter((p) => p[1] !== undefined);
      const empty = FINISHED.has(s.job && s.job.status) ? 'No steps were trained' : 'Waiting for the first step…';
      drawLineChart(lossSvg.firstChild, [
        { name: 'train', color: '#4f46e5', points: series(trainLoss) },
        { name: 'validation', color: '#f59e0b', points: series(valLoss), dots: true },
      ], { empty });
      drawLineChart(lrSvg.firstChild, [{ name: 'lr', color: '#0ea5e9', points: series(learningRate) }], { height: 150 });
      drawLineChart(tpsSvg.firstChild, [{ name: 'tokens/s', color: '#10b981', points: series(tokensPerS) }], { height: 150 });
      if (isDpo(s.job)) {
        drawLineChart(rewardsSvg.firstChild, [
          { name: 'chosen', color: '#059669', points: series(rewardsChosen) },
          { name: 'rejected', color: '#dc2626', points: series(rewardsRejected) },
        ], { empty });
        drawLineChart(marginSvg.firstChild, [{ name: 'margin', color: '#8b5cf6', points: series(rewardMargin) }], { height: 150 });
        drawLineChart(accuracySvg.firstChild, [
          { name: 'train', color: '#4f46e5', points: series(rewardAccuracy) },
          { name: 'validation', color: '#f59e0b', points: series(validRewardAccuracy), dots: true },
        ], { height: 150, yRange: [0, 1] });
      }
      const last = s.metrics[s.metrics.length - 1];
      const load = last && last.metrics.router_load;
      expertsCard.hidden = !(Array.isArray(load) && load.length) && methodType(s.job || {}) !== 'mixlora';
      if (Array.isArray(load) && load.length) {
        const max = Math.max(...load, 1e-9);
        experts.replaceChildren(...load.map((v, i) => h('div', { class: 'expert', 'data-expert': i },
          h('span', { class: 'muted' }, `expert ${i}`),
          h('div', { class: 'bar' }, h('span', { style: `width:${(100 * v) / max}%` })),
          h('span', { class: 'num' }, `${(100 * v).toFixed(1)}%`))));
      } else {
        experts.replaceChildren(h('span', { class: 'muted small' }, 'No routing data yet.'));
      }
      renderShared(last && last.metrics.shared_with, !!last);
      renderStats();
    });
  }

  // How many other jobs (of any tenant) shared the latest fused step: a count, never which.
  function renderShared(count, started) {
    const n = Array.isArray(count) ? count.length : count; // records stored before the count
    if (typeof n !== 'number' || !Number.isFinite(n) || !started) {
      shared.replaceChildren(h('span', { class: 'muted small' }, '—'));
    } else if (n === 0) {
      shared.replaceChildren(h('span', { class: 'muted small' }, 'Trained alone at the latest step.'));
    } else {
      shared.replaceChildren(h('span', { class: 'chip', 'data-shared': n }, n > 1 ? `${n} other jobs` : '1 other job'));
    }
  }

  // The job's adapter against its base on each task it asked for (accuracy, with its
  // standard error, and the difference in points).
  function renderEvaluation(ev) {
    evalCard.hidden = !ev;
    if (!ev) return;
    const pct = (r) => (r && typeof r.acc === 'number' ? `${(100 * r.acc).toFixed(1)}%` + (r.acc_stderr ? ` ± ${(100 * r.acc_stderr).toFixed(1)}` : '') : '—');
    const base = new Map(ev.results.filter((r) => r.model === 'base').map((r) => [r.task, r]));
    evalBody.replaceChildren(...ev.results.filter((r) => r.model !== 'base').map((r) => {
      const b = base.get(r.task);
      const diff = b ? 100 * (r.acc - b.acc) : null;
      return h('tr', { 'data-task': r.task },
        h('td', { 'data-label': 'Task', class: 'mono' }, r.task),
        h('td', { 'data-label': 'Questions', class: 'num' }, r.n),
        h('td', { 'data-label': 'Base', class: 'num' }, pct(b)),
        h('td', { 'data-label': 'Adapter', class: 'num' }, pct(r)),
        h('td', { 'data-label': 'Difference', class: `num ${diff > 0 ? 'up' : diff < 0 ? 'down' : ''}` }, diff === null ? '—' : `${diff >= 0 ? '+' : ''}${diff.toFixed(1)} points`));
    }));
    const notes = {
      pending: `Pending: ${ev.tasks.join(', ')} are scored once the job has trained.`,
      failed: `The evaluation failed (the job is unaffected): ${ev.error ? ev.error.message : ''}`,
      succeeded: `${ev.protocol} protocol${ev.num_fewshot ? `, ${ev.num_fewshot}-shot` : ''}; up to ${ev.limit || 'all'} questions a task.`,
    };
    evalNote.textContent = notes[ev.status] || '';
  }

  function addEvent(e) {
    events.prepend(h('li', { class: e.level }, h('span', { class: 'time' }, fmtTime(e.created_at)), h('span', { class: 'msg' }, e.message)));
  }

  async function loadCheckpoints() {
    const res = await api('GET', `${JOBS}/${jobId}/checkpoints?limit=100`);
    ckptBody.replaceChildren(...res.data.map((c) => h('tr', { 'data-checkpoint-id': c.id },
      h('td', { 'data-label': 'Step', class: 'num' }, c.step_number),
      h('td', { 'data-label': 'Saved', class: 'num' }, fmtTime(c.created_at)),
      h('td', { 'data-label': 'Loss', class: 'num' }, fmtNum(c.metrics && trainLoss(c.metrics))),
      h('td', { 'data-label': '' }, h('a', { href: `${JOBS}/${jobId}/checkpoints/${c.id}/adapter`, download: '', class: 'checkpoint-download' }, 'Download')))));
    ckptEmpty.hidden = res.data.length > 0;
  }

  async function refreshJob() {
    s.job = await api('GET', `${JOBS}/${jobId}`);
    renderHead();
  }

  function connect() {
    const source = new EventSource(`${JOBS}/${jobId}/stream`);
    s.source = source;
    source.addEventListener('metrics', (ev) => {
      const m = JSON.parse(ev.data);
      s.metrics.push(m);
      redraw();
    });
    source.addEventListener('event', (ev) => {
      const e = JSON.parse(ev.data);
      addEvent(e);
      if (e.type === 'status') refreshJob().catch(() => {});
      if (e.type === 'checkpoint') loadCheckpoints().catch(() => {});
    });
    source.addEventListener('end', () => {
      source.close();
      refreshJob().then(loadCheckpoints).catch(() => {});
    });
    // A reconnect the server refused (the session ended): the next API call gets its 401
    // and shows the sign-in form.
    source.addEventListener('error', () => {
      if (source.readyState === EventSource.CLOSED) refreshJob().catch(() => {});
    });
    onCleanup(() => source.close());
  }

  (async () => {
    try {
      await refreshJob();
      s.rows = await rowsOf(s.job.training_file);
      connect();
      await loadCheckpoints();
      redraw();
    } catch (e) {
      error.textContent = e.status === 404 ? `No job ${jobId} (or it belongs to another tenant).` : e.message;
      error.hidden = false;
    }
  })();
  every(REFRESH_MS * 2, () => { if (s.job && !FINISHED.has(s.job.status)) refreshJob().catch(() => {}); });
  const onResize = () => redraw();
  window.addEventListener('resize', onResize);
  onCleanup(() => window.removeEventListener('resize', onResize));
}

// --- playground ------------------------------------------------------------------------

// A chat with a succeeded job's model: POST /v1/chat/completions with stream: true, the
// answer drawn as its chunks come, then tokens/s (completion tokens over the time from the
// first to the last chunk) and the time to the first one.
function renderPlayground() {
  let model = null;
  let controller = null;
  const prompt = h('textarea', { id: 'playground-prompt', rows: 3, placeholder: 'Ask the fine-tuned model something…' });
  const maxTokens = h('input', { id: 'playground-max-tokens', type: 'number', min: 1, max: 4096, value: 128 });
  const temperature = h('input', { id: 'playground-temperature', type: 'number', min: 0, max: 2, step: 0.1, value: 0.7 });
  const send = h('button', { type: 'submit', class: 'primary', id: 'playground-send' }, 'Send');
  const stop = h('button', { type: 'button', id: 'playground-stop', hidden: true, onclick: () => controller && controller.abort() }, 'Stop');
  const answer = h('pre', { class: 'answer', id: 'playground-answer', hidden: true });
  const stats = h('p', { class: 'small muted', id: 'playground-stats' });
  const error = h('div', { class: 'alert', role: 'alert', hidden: true });
  const form = h('form', { class: 'playground', onsubmit: (ev) => { ev.preventDefault(); run(); } },
    prompt,
    h('div', { class: 'row' },
      h('label', {}, 'Max tokens ', maxTokens), h('label', {}, 'Temperature ', temperature), send, stop));
  const modelName = h('p', { class: 'small muted mono' });
  const card = h('section', { class: 'card', id: 'playground', hidden: true }, h('h2', {}, 'Try it'), modelName, form, error, answer, stats);

  async function run() {
    const text = prompt.value.trim();
    if (!model || !text) return;
    error.hidden = true;
    answer.textContent = '';
    answer.hidden = false;
    stats.textContent = 'Waiting for the first token…';
    send.disabled = true;
    stop.hidden = false;
    controller = new AbortController();
    const started = performance.now();
    let first = null;
    let last = null;
    let usage = null;
    try {
      const res = await fetch('/v1/chat/completions', {
        method: 'POST',
        credentials: 'same-origin',
        signal: controller.signal,
        headers: { 'Content-Type': 'application/json', 'X-Mixloom-Dashboard': '1' },
        body: JSON.stringify({
          model, stream: true, stream_options: { include_usage: true },
          messages: [{ role: 'user', content: text }],
          max_tokens: Number(maxTokens.value) || 128, temperature: Number(temperature.value) || 0,
        }),
      });
      if (!res.ok) {
        let body = null;
        try { body = await res.json(); } catch (_) { body = null; }
        throw new ApiError(res.status, body);
      }
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          const frame = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          if (!frame.startsWith('data: ') || frame === 'data: [DONE]') continue;
          const chunk = JSON.parse(frame.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const c of chunk.choices || []) {
            if (c.delta && c.delta.content) {
              const now = performance.now();
              if (first === null) first = now;
              last = now;
              answer.textContent += c.delta.content;
            }
          }
        }
      }
      const ttft = first === null ? null : (first - started) / 1000;
      const tokens = usage ? usage.completion_tokens : null;
      // tokens after the first over the time they took; all in one burst: over the whole wait
      const rate = !tokens ? null : last > first && tokens > 1
        ? (tokens - 1) / ((last - first) / 1000) : tokens / ((performance.now() - started) / 1000);
      stats.textContent = [
        tokens !== null ? `${tokens} tokens` : null,
        rate !== null ? `${rate.toFixed(1)} tokens/s` : null,
        ttft !== null ? `first token after ${ttft.toFixed(2)} s` : null,
      ].filter(Boolean).join(' · ');
    } catch (e) {
      if (e.name === 'AbortError') stats.textContent = 'Stopped.';
      else { error.textContent = e.message; error.hidden = false; stats.textContent = ''; }
    } finally {
      send.disabled = false;
      stop.hidden = true;
      controller = null;
    }
  }

  onCleanup(() => controller && controller.abort());
  return {
    card,
    show(id) {
      model = id;
      card.hidden = !id;
      modelName.textContent = id || '';
    },
  };
}

// --- new job -------------------------------------------------------------------------

const COMMON_FIELDS = ['r', 'lora_alpha', 'lora_dropout', 'learning_rate', 'n_epochs', 'batch_size', 'max_seq_len', 'max_steps', 'lr_scheduler', 'warmup_ratio', 'checkpoint_every'];
const MIXLORA_FIELDS = ['num_experts', 'routing', 'top_k', 'top_p', 'router_aux_loss_coef'];
const LABELS = {
  r: 'LoRA rank (r)', lora_alpha: 'LoRA alpha', lora_dropout: 'LoRA dropout', learning_rate: 'Learning rate',
  n_epochs: 'Epochs', batch_size: 'Batch size', max_seq_len: 'Max sequence length', max_steps: 'Max steps',
  lr_scheduler: 'LR schedule', warmup_ratio: 'Warmup ratio', checkpoint_every: 'Checkpoint every (steps)',
  num_experts: 'Experts', routing: 'Routing', top_k: 'Top-k', top_p: 'Top-p (dynamic routing)',
  router_aux_loss_coef: 'Router aux loss coef', training_file: 'Training data', validation_file: 'Validation data',
  model: 'Base model', seed: 'Seed', suffix: 'Name suffix',
};

// One property of a pydantic JSON schema, with anyOf-null and $ref resolved.
function spec(schema, name) {
  let p = schema.properties[name];
  const optional = !!(p.anyOf && p.anyOf.some((x) => x.type === 'null'));
  const base = p.anyOf ? p.anyOf.find((x) => x.type !== 'null') : p;
  let resolved = base;
  if (base.$ref) resolved = schema.$defs[base.$ref.split('/').pop()];
  return { ...resolved, default: p.default, optional, title: p.title };
}

function validateField(sp, raw) {
  if (raw === '' || raw === null) return sp.optional ? null : 'Required.';
  if (sp.enum) return sp.enum.includes(raw) ? null : `Choose one of ${sp.enum.join(', ')}.`;
  const v = Number(raw);
  if (!Number.isFinite(v)) return 'Enter a number.';
  if (sp.type === 'integer' && !Number.isInteger(v)) return 'Enter a whole number.';
  const lo = sp.minimum !== undefined ? `≥ ${sp.minimum}` : sp.exclusiveMinimum !== undefined ? `> ${sp.exclusiveMinimum}` : null;
  const hi = sp.maximum !== undefined ? `≤ ${sp.maximum}` : sp.exclusiveMaximum !== undefined ? `< ${sp.exclusiveMaximum}` : null;
  const bad = (sp.minimum !== undefined && v < sp.minimum) || (sp.exclusiveMinimum !== undefined && v <= sp.exclusiveMinimum)
    || (sp.maximum !== undefined && v > sp.maximum) || (sp.exclusiveMaximum !== undefined && v >= sp.exclusiveMaximum);
  return bad ? `Must be ${[lo, hi].filter(Boolean).join(' and ')}.` : null;
}

async function renderNewJob() {
  document.title = 'New job · mixloom';
  if (!state.hp) state.hp = await api('GET', '/dashboard/hyperparameters');
  const [listed, files] = await Promise.all([api('GET', '/v1/models'), api('GET', '/v1/files?limit=100')]);
  const models = { data: listed.data.filter((m) => !m.fine_tuning_job_id) }; // jobs start from a base
  const schema = state.hp.mixlora;
  const fields = new Map(); // name -> {wrap, input, error, spec}
  const banner = h('div', { class: 'alert', role: 'alert', id: 'form-error', hidden: true });

  function field(name, input, hint) {
    const error = h('div', { class: 'field-error', id: `error-${name}`, role: 'alert' });
    const wrap = h('div', { class: 'field', 'data-field': name }, h('label', { for: `f-${name}` }, LABELS[name] || name), input, hint ? h('div', { class: 'hint' }, hint) : null, error);
    fields.set(name, { wrap, input, error });
    return wrap;
  }
  function setError(name, message) {
    const f = fields.get(name);
    if (!f) return false;
    f.error.textContent = message || '';
    f.wrap.classList.toggle('invalid', !!message);
    return true;
  }

  function hpInput(name) {
    const sp = spec(schema, name);
    let input;
    if (sp.enum) {
      input = h('select', { id: `f-${name}`, name }, ...sp.enum.map((v) => h('option', { value: v, selected: v === sp.default }, v)));
    } else {
      const step = sp.type === 'integer' ? '1' : 'any';
      input = h('input', { id: `f-${name}`, name, type: 'number', step, inputmode: sp.type === 'integer' ? 'numeric' : 'decimal', value: sp.default === null || sp.default === undefined ? '' : sp.default, placeholder: sp.optional ? 'none' : '' });
    }
    input.addEventListener('input', () => setError(name, validateField(sp, input.value)));
    const wrap = field(name, input, sp.optional ? 'Optional.' : null);
    fields.get(name).spec = sp;
    return wrap;
  }

  const fileSelect = (name) => h('select', { id: `f-${name}-id`, name: `${name}_id` },
    h('option', { value: '' }, name === 'training_file' ? 'Upload a new file…' : 'None (or upload)'),
    ...files.data.map((f) => h('option', { value: f.id }, `${f.filename} — ${f.rows} rows (${f.id})`)));
  const trainSelect = fileSelect('training_file');
  const trainUpload = h('input', { id: 'f-training_file', name: 'training_file', type: 'file', accept: '.jsonl,.json,application/jsonl,text/plain' });
  const valSelect = fileSelect('validation_file');
  const valUpload = h('input', { id: 'f-validation_file', name: 'validation_file', type: 'file', accept: '.jsonl,.json,application/jsonl,text/plain' });
  const modelSelect = h('select', { id: 'f-model', name: 'model' }, ...models.data.map((m) => h('option', { value: m.id }, m.id)));
  const methodRadios = ['lora', 'mixlora'].map((m) => h('label', {}, h('input', { type: 'radio', name: 'method', value: m, id: `f-method-${m}`, checked: m === 'lora' }), m === 'lora' ? 'LoRA' : 'MixLoRA (mixture of LoRA experts)'));
  const targets = state.hp.target_modules.map((m) => h('label', {}, h('input', { type: 'checkbox', name: 'target_modules', value: m, checked: true }), m));
  const mixFieldset = h('fieldset', { hidden: true, id: 'mixlora-fields' }, h('legend', {}, 'MixLoRA experts'), h('div', { class: 'form-grid' }, ...MIXLORA_FIELDS.map(hpInput)));
  const seed = h('input', { id: 'f-seed', name: 'seed', type: 'number', step: '1', min: '0', placeholder: 'random' });
  const suffix = h('input', { id: 'f-suffix', name: 'suffix', type: 'text', maxlength: '64', placeholder: 'e.g. support-bot' });
  const submit = h('button', { class: 'primary', type: 'submit', id: 'create-job' }, 'Create job');

  for (const r of methodRadios) {
    r.firstChild.addEventListener('change', () => { mixFieldset.hidden = method() !== 'mixlora'; });
  }
  const method = () => methodRadios.map((r) => r.firstChild).find((i) => i.checked).value;

  const form = h('form', { class: 'stack', id: 'new-job-form', novalidate: true, onsubmit: onSubmit },
    h('div', { class: 'page-head' }, h('h1', {}, 'New fine-tuning job')),
    banner,
    h('fieldset', {}, h('legend', {}, 'Data'), h('div', { class: 'form-grid' },
      field('training_file', h('div', { class: 'stack' }, trainSelect, trainUpload), 'JSONL: chat {"messages"}, {"prompt","completion"}, {"instruction","input","output"} or {"text"}, one example per line.'),
      field('validation_file', h('div', { class: 'stack' }, valSelect, valUpload), 'Optional: its loss is charted beside the training loss.'),
      field('model', modelSelect))),
    h('fieldset', {}, h('legend', {}, 'Method'), h('div', { class: 'choices' }, ...methodRadios)),
    h('fieldset', {}, h('legend', {}, 'Hyperparameters'), h('div', { class: 'form-grid' }, ...COMMON_FIELDS.map(hpInput)),
      h('div', { class: 'field', style: 'margin-top:14px' }, h('label', {}, 'Target modules'), h('div', { class: 'choices' }, ...targets), h('div', { class: 'field-error', id: 'error-target_modules' }))),
    mixFieldset,
    h('fieldset', {}, h('legend', {}, 'Run'), h('div', { class: 'form-grid' }, field('seed', seed, 'Empty: a random seed, reported.'), field('suffix', suffix, 'Letters, digits, _ . - (up to 64).'))),
    h('div', { class: 'actions' }, submit, h('a', { class: 'button', href: '#/' }, 'Cancel')));
  view.appendChild(form);

  const uploaded = new WeakMap(); // File -> id: a resubmitted form does not upload twice
  async function upload(input, name) {
    const file = input.files[0];
    if (uploaded.has(file)) return uploaded.get(file);
    const data = new FormData();
    data.append('file', file);
    data.append('purpose', 'fine-tune');
    try {
      const id = (await api('POST', '/v1/files', data)).id;
      uploaded.set(file, id);
      return id;
    } catch (e) {
      const lines = (e.problems && e.problems.length ? e.problems.map((p) => p.message ? `${p.where}: ${p.message}` : p.where) : [e.message]);
      setError(name, lines.join('\n'));
      throw e;
    }
  }

  async function onSubmit(ev) {
    ev.preventDefault();
    banner.hidden = true;
    let ok = true;
    for (const name of fields.keys()) setError(name, '');
    document.getElementById('error-target_modules').textContent = '';
    const m = method();
    const hp = {};
    for (const name of [...COMMON_FIELDS, ...(m === 'mixlora' ? MIXLORA_FIELDS : [])]) {
      const f = fields.get(name);
      const raw = f.input.value.trim();
      const msg = validateField(f.spec, raw);
      if (msg) { setError(name, msg); ok = false; continue; }
      if (raw === '') continue;
      const value = f.spec.enum ? raw : Number(raw);
      if (value !== f.spec.default) hp[name] = value;
    }
    const chosen = targets.map((l) => l.firstChild).filter((i) => i.checked).map((i) => i.value);
    if (!chosen.length) { document.getElementById('error-target_modules').textContent = 'Choose at least one module.'; ok = false; }
    if (chosen.length !== targets.length) hp.target_modules = chosen;
    if (!trainSelect.value && !trainUpload.files.length) { setError('training_file', 'Choose an uploaded file or pick a JSONL file to upload.'); ok = false; }
    if (seed.value && !(Number.isInteger(Number(seed.value)) && Number(seed.value) >= 0)) { setError('seed', 'A whole number ≥ 0.'); ok = false; }
    if (suffix.value && !/^[A-Za-z0-9_.-]{1,64}$/.test(suffix.value)) { setError('suffix', 'Use letters, digits, _ . - only.'); ok = false; }
    if (!ok) { banner.textContent = 'Please fix the fields marked below.'; banner.hidden = false; return; }

    submit.disabled = true;
    submit.textContent = 'Creating…';
    try {
      const training = trainSelect.value || await upload(trainUpload, 'training_file');
      let validation = valSelect.value || null;
      if (!validation && valUpload.files.length) validation = await upload(valUpload, 'validation_file');
      const body = { model: modelSelect.value, training_file: training, method: { type: m } };
      if (Object.keys(hp).length) body.method[m] = { hyperparameters: hp };
      if (validation) body.validation_file = validation;
      if (seed.value) body.seed = Number(seed.value);
      if (suffix.value) body.suffix = suffix.value;
      const job = await api('POST', JOBS, body);
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      let placed = false;
      for (const p of e.problems || []) {
        const name = (p.where || '').split('.').pop();
        if (setError(name, p.message)) placed = true;
      }
      banner.textContent = placed ? 'The server rejected some fields; see the messages below.' : e.message;
      banner.hidden = false;
    } finally {
      submit.disabled = false;
      submit.textContent = 'Create job';
    }
  }
}

// --- start ---------------------------------------------------------------------------

(async () => {
  try {
    const res = await fetch('/dashboard/session', { credentials: 'same-origin' });
    if (res.ok) state.tenant = (await res.json()).tenant;
  } catch (_) { /* offline: the sign-in form will say so on submit */ }
  route();
})();
