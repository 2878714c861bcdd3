// The operator's view: the workers, what each holds and trains, and the queue, read from
// /v1/admin/workers and /v1/admin/queue with the admin key (MIXLOOM_ADMIN_KEY). The key is
// kept in this page's memory only (a reload asks for it again), never in a cookie or in
// storage, and sent as a Bearer header. No inline script or style (the CSP).
'use strict';

const REFRESH_MS = 3000;
const view = document.getElementById('view');
const nav = document.getElementById('nav');
const refreshed = document.getElementById('refreshed');
let adminKey = null;
let timer = null;

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.appendChild(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

async function admin(path) {
  const res = await fetch(path, { headers: { Authorization: `Bearer ${adminKey}` }, credentials: 'omit' });
  let body = null;
  try { body = await res.json(); } catch (_) { body = null; }
  if (!res.ok) {
    const err = new Error((body && body.error && body.error.message) || `HTTP ${res.status}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

function age(seconds) {
  if (seconds < 90) return `${seconds.toFixed(1)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// --- sign in -------------------------------------------------------------------------

function renderLogin(message) {
  clearTimeout(timer);
  adminKey = null;
  nav.hidden = true;
  view.replaceChildren();
  document.title = 'Operator sign in · mixloom';
  const error = h('div', { class: 'alert', id: 'login-error', role: 'alert', hidden: !message }, message || '');
  const input = h('input', { id: 'admin-key', type: 'password', autocomplete: 'off', required: true });
  const button = h('button', { class: 'primary', type: 'submit', id: 'sign-in' }, 'Sign in');
  const form = h('form', { class: 'card stack', id: 'login-form', novalidate: true,
    onsubmit: async (ev) => {
      ev.preventDefault();
      if (!input.value.trim()) { error.textContent = 'Paste the admin key first.'; error.hidden = false; return; }
      adminKey = input.value.trim();
      input.value = '';
      button.disabled = true;
      try { await refresh(); } finally { button.disabled = false; }
    } },
  h('h1', {}, 'Operator'),
  h('p', { class: 'muted small' }, 'The deployment\'s admin key (MIXLOOM_ADMIN_KEY), not a tenant\'s API key. It stays in this page only: a reload asks for it again.'),
  h('div', { class: 'field' }, h('label', { for: 'admin-key' }, 'Admin key'), input),
  error,
  h('div', { class: 'actions' }, button));
  view.appendChild(h('div', { class: 'login' }, form));
  input.focus();
}

document.getElementById('sign-out').addEventListener('click', () => renderLogin());

// --- the fleet -----------------------------------------------------------------------

function workersCard(workers) {
  const rows = workers.map((w) => h('tr', { 'data-worker': w.id },
    h('td', { class: 'mono' }, w.id),
    h('td', {}, w.host, h('span', { class: 'muted small' }, ` · pid ${w.pid}`)),
    h('td', { class: 'mono' }, w.base),
    h('td', {}, w.role),
    h('td', { class: 'mono' }, w.devices),
    h('td', { class: 'num' }, age(w.heartbeat_age_seconds)),
    h('td', {}, h('span', { class: `badge ${w.alive ? 'running' : 'failed'}` }, w.alive ? 'alive' : 'dead')),
    h('td', { class: 'small' },
      w.jobs.length
        ? w.jobs.map((j) => h('div', { class: 'mono', 'data-job': j.id }, `${j.id} · ${j.tenant_id}`))
        : h('span', { class: 'muted' }, 'none'),
      w.inference_requests ? h('div', { class: 'muted' }, `${w.inference_requests} inference request(s)`) : null)));
  return h('section', { class: 'card', id: 'workers' },
    h('h2', {}, `Workers (${workers.filter((w) => w.alive).length} alive)`),
    workers.length
      ? h('table', {},
        h('thead', {}, h('tr', {}, ...['Worker', 'Host', 'Base', 'Role', 'Device', 'Heartbeat', 'State', 'Trains (job · tenant)'].map((t) => h('th', {}, t)))),
        h('tbody', {}, rows))
      : h('div', { class: 'empty' }, 'No worker has registered.'));
}

function queueCard(queue) {
  const rows = queue.data.map((q) => h('tr', { 'data-base': q.base },
    h('td', { class: 'mono' }, q.base),
    h('td', { class: 'num' }, q.queued),
    h('td', { class: 'mono' }, q.oldest.job_id),
    h('td', { class: 'mono' }, q.oldest.tenant_id),
    h('td', { class: 'num' }, age(q.oldest.waited_seconds))));
  return h('section', { class: 'card', id: 'queue' },
    h('h2', {}, 'Queue'),
    queue.data.length
      ? h('table', {},
        h('thead', {}, h('tr', {}, ...['Base', 'Queued', 'Oldest job', 'Its tenant', 'Waiting'].map((t) => h('th', {}, t)))),
        h('tbody', {}, rows))
      : h('div', { class: 'empty' }, 'Nothing is queued.'));
}

function statesBar(byState) {
  return h('div', { class: 'stats', id: 'states' },
    Object.entries(byState).map(([state, n]) => h('div', { class: 'stat', 'data-state': state },
      h('div', { class: 'label' }, state.replace('_', ' ')),
      h('div', { class: 'value' }, n))));
}

async function refresh() {
  clearTimeout(timer);
  let workers, queue;
  try {
    [workers, queue] = await Promise.all([admin('/v1/admin/workers'), admin('/v1/admin/queue')]);
  } catch (e) {
    if (e.status === 401 || e.status === 403 || e.status === 404) { renderLogin(e.message); return; }
    refreshed.textContent = `not refreshed: ${e.message}`;
    timer = setTimeout(refresh, REFRESH_MS);
    return;
  }
  document.title = 'Operator · mixloom';
  nav.hidden = false;
  refreshed.textContent = `updated ${new Date().toLocaleTimeString()}`;
  view.replaceChildren(h('div', { class: 'stack' },
    statesBar(queue.jobs_by_state), workersCard(workers.data), queueCard(queue)));
  timer = setTimeout(refresh, REFRESH_MS);
}

renderLogin();
