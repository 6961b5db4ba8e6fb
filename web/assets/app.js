// The single-page app: hash routes to pages, the API token box, and the page lifecycle
// (each page gets a context whose fetches, timers and event subscriptions end when the user
// leaves). Pages render from the REST API only.

import { on, setToken, startLive, token, whoami } from './api.js';
import { flash } from './flash.js';
import * as grid from './grid.js';
import * as build from './build.js';
import * as builder from './builder.js';
import * as workers from './workers.js';
import * as plan from './plan.js';
import * as repos from './repos.js';

const ROUTES = [
  [/^\/?$/, grid, 'grid'],
  [/^\/grid$/, grid, 'grid'],
  [/^\/builds\/(\d+)$/, build, 'grid'],
  [/^\/builders\/([^/]+)\/force$/, builder, 'grid', { force: true }],
  [/^\/builders\/([^/]+)$/, builder, 'grid'],
  [/^\/workers$/, workers, 'workers'],
  [/^\/plan$/, plan, 'plan'],
  [/^\/repositories$/, repos, 'repos'],
];

/** What a page may use; everything registered through it ends when the page is left. */
class PageContext {
  constructor() {
    this.controller = new AbortController();
    this.signal = this.controller.signal;
    this.cleanups = [];
    this.alive = true;
  }
  /** Subscribes to live events for as long as the page is shown. */
  on(type, fn) { this.cleanups.push(on(type, fn)); }
  every(ms, fn) { const t = setInterval(fn, ms); this.cleanups.push(() => clearInterval(t)); }
  onLeave(fn) { this.cleanups.push(fn); }
  close() {
    this.alive = false;
    this.controller.abort();
    for (const fn of this.cleanups.splice(0)) {
      try { fn(); } catch (e) { console.error('rbb: cleanup failed', e); }
    }
  }
}

let current = null; // { key, ctx, page }

function parseHash() {
  const raw = location.hash.replace(/^#/, '');
  const q = raw.indexOf('?');
  const path = q < 0 ? raw : raw.slice(0, q);
  const query = new URLSearchParams(q < 0 ? '' : raw.slice(q + 1));
  return { path, query };
}

function route() {
  const { path, query } = parseHash();
  for (const [re, mod, nav, extra] of ROUTES) {
    const m = re.exec(path);
    if (!m) continue;
    const params = m.slice(1).map((p) => decodeURIComponent(p));
    const key = path;
    for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.nav === nav);
    // Same page, other query (a step of the build page): let the page update in place.
    if (current && current.key === key && current.page && current.page.update) {
      current.page.update(query);
      return;
    }
    if (current) current.ctx.close();
    const ctx = new PageContext();
    const view = document.getElementById('view');
    view.innerHTML = '';
    for (const k of Object.keys(view.dataset)) delete view.dataset[k];
    view.className = 'view-' + (mod.name || nav);
    document.title = 'rbb';
    let page = null;
    try {
      page = mod.mount(view, { params, query, ctx, ...(extra || {}) });
    } catch (e) {
      console.error(e);
      view.innerHTML = `<div class="error">This page failed: ${String(e.message || e)}</div>`;
    }
    current = { key, ctx, page };
    return;
  }
  if (current) current.ctx.close();
  current = null;
  document.title = 'Not found · rbb';
  document.getElementById('view').innerHTML = '<h1>Not found</h1><p>No page at this address. <a href="#/">Back to the grid</a>.</p>';
}

/**
 * The header's token box: shows who the master takes this page for (`/api/v2/whoami`), opens
 * itself when an action needs a token (or when this master shows nothing without one), and
 * marks the body with the role so buttons the role cannot use are hidden (`data-needs`).
 */
function tokenBox() {
  const box = document.getElementById('token-box');
  const summary = document.getElementById('token-summary');
  const input = document.getElementById('token-input');
  const note = document.getElementById('token-note');
  const ask = (message) => {
    note.textContent = message;
    note.hidden = false;
    box.open = true;
    input.focus();
  };
  const refresh = async () => {
    let who;
    try { who = await whoami(); } catch { return; }
    const body = document.body;
    if (who.refused) {
      body.dataset.role = 'none';
      body.dataset.authenticated = 'false';
      summary.textContent = 'API token ✗';
      ask('The master does not know this token: ' + who.refused);
      return;
    }
    body.dataset.role = who.role;
    body.dataset.authenticated = String(who.authenticated);
    summary.textContent = who.authenticated ? `${who.name} · ${who.role}` : `anonymous · ${who.role}`;
    summary.title = who.authenticated
      ? `Token ${who.name}: ${who.role}`
      : 'No token set: what anyone may do here. Set a token to do more.';
    if (!who.authenticated && who.role === 'none') ask('This master shows nothing without a token.');
    else if (who.authenticated) note.hidden = true;
  };
  on('need-token', (d) => {
    if (token()) return;
    const needs = d && d.needs;
    if (needs === 'read') ask('This master shows nothing without a token.');
    else ask(needs ? `This action needs a token with the role ${needs}.` : 'This action needs a token.');
  });
  document.getElementById('token-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    setToken(input.value.trim());
    input.value = '';
    box.open = false;
    note.hidden = true;
    flash(token() ? 'API token kept for this tab.' : 'API token cleared.');
    await refresh();
    route();
  });
  document.getElementById('token-clear').addEventListener('click', async () => {
    setToken('');
    input.value = '';
    flash('API token cleared.');
    await refresh();
    route();
  });
  refresh();
}

// Uncaught errors are kept (newest last) so a bug report or a browser test can show them.
window.rbbErrors = [];
window.addEventListener('error', (ev) => window.rbbErrors.push(String(ev.message || ev.error)));
window.addEventListener('unhandledrejection', (ev) => window.rbbErrors.push('unhandled: ' + String(ev.reason && ev.reason.stack || ev.reason)));

function start() {
  tokenBox();
  startLive();
  window.addEventListener('hashchange', route);
  route();
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
else start();
