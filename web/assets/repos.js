// The repositories page: each watched repository's fetch health from
// `/api/v2/repositories` — last fetch, last success, the error of a failing fetch (a forge
// that is down, refused credentials) and when the poller tries again. Re-read every few
// seconds: fetch health has no live event.

import { get } from './api.js';
import { ago, errorBox, esc, when } from './view.js';

export const name = 'repos';

/** When the poller tries `r` again (unix ms), or 0 when unknown. */
export function nextTry(r) {
  return r.last_attempt ? r.last_attempt + (r.retry_in_ms || 0) : 0;
}

/** `in 5s`, `in 3m`, or `now` for a time already passed. */
function until(ms) {
  if (!ms) return '';
  const s = (ms - Date.now()) / 1000;
  if (s <= 0) return 'now';
  if (s < 60) return `in ${Math.ceil(s)}s`;
  if (s < 3600) return `in ${Math.ceil(s / 60)}m`;
  return `in ${Math.round(s / 3600)}h`;
}

export function reposHtml(list) {
  if (!list.length) return '<p class="muted">No repositories are watched.</p>';
  return `<table class="list repos"><thead><tr><th></th><th>repository</th><th>url</th><th>last fetch</th><th>last success</th><th>error</th><th>next try</th></tr></thead><tbody>${list.map((r) => `
    <tr data-repo="${esc(r.name)}" class="${r.error ? 'failing' : 'ok'}">
      <td><span class="dot ${r.error ? 'bad' : 'on'}" title="${r.error ? 'fetch failing' : 'fetching fine'}"></span></td>
      <td><b>${esc(r.name)}</b></td>
      <td><code>${esc(r.url)}</code></td>
      <td title="${esc(when(r.last_attempt))}">${r.last_attempt ? esc(ago(r.last_attempt)) : '<span class="muted">not yet</span>'}</td>
      <td title="${esc(when(r.last_success))}">${esc(ago(r.last_success))}</td>
      <td class="fetch-error">${r.error ? `<span class="err-text">${esc(r.error)}</span>${r.failures > 1 ? ` <span class="muted">(${r.failures} failures in a row)</span>` : ''}` : '<span class="muted">none</span>'}</td>
      <td title="${esc(when(nextTry(r)))}">${esc(until(nextTry(r)))}</td>
    </tr>`).join('')}</tbody></table>`;
}

export function mount(view, { ctx }) {
  document.title = 'Repositories · rbb';
  view.innerHTML = `<div class="page-head"><h1>Repositories</h1><span class="spacer"></span><span id="repos-count" class="muted"></span></div>
    <section class="panel" id="repos"><p class="muted">Loading…</p></section>`;
  const box = view.querySelector('#repos');
  const count = view.querySelector('#repos-count');

  async function load() {
    try {
      const r = await get('/api/v2/repositories', ctx.signal);
      if (!ctx.alive) return;
      const list = r.repositories || [];
      const failing = list.filter((x) => x.error).length;
      count.textContent = `${list.length} watched${failing ? `, ${failing} failing to fetch` : ''}`;
      box.innerHTML = reposHtml(list);
      box.dataset.loaded = String(Date.now());
    } catch (e) {
      if (e.name !== 'AbortError') box.innerHTML = errorBox(e);
    }
  }

  ctx.every(5000, () => load());
  load();
  return null;
}
