// The workers page: who is connected, what they offer (labels, slots, platform, the images
// their Docker engine runs and the host paths it may mount), what they
// run, when they were last heard from. Live: `worker` and `step` events re-read the list.

import { coalesce, get } from './api.js';
import { ago, chips, errorBox, esc, when } from './view.js';

export const name = 'workers';

export function mount(view, { ctx }) {
  view.innerHTML = `<div class="page-head"><h1>Workers</h1><span class="spacer"></span><span id="workers-count" class="muted"></span></div>
    <section class="panel" id="workers"><p class="muted">Loading…</p></section>`;
  const box = view.querySelector('#workers');
  const count = view.querySelector('#workers-count');

  async function load() {
    try {
      const r = await get('/api/v2/workers', ctx.signal);
      if (!ctx.alive) return;
      const list = r.workers || [];
      const on = list.filter((w) => w.connected).length;
      count.textContent = `${on} of ${list.length} connected`;
      if (!list.length) { box.innerHTML = '<p class="muted">No workers are configured.</p>'; return; }
      box.innerHTML = `<table class="list workers"><thead><tr><th></th><th>name</th><th>labels</th><th class="num">running</th><th>current step</th><th>platform</th><th>containers</th><th>last seen</th></tr></thead><tbody>${list.map((w) => `
        <tr data-worker="${esc(w.name)}" class="${w.connected ? 'on' : 'off'}">
          <td><span class="dot ${w.connected ? 'on' : 'off'}" title="${w.connected ? 'connected' : 'not connected'}"></span></td>
          <td><b>${esc(w.name)}</b></td>
          <td>${chips(w.labels) || '<span class="muted">none</span>'}</td>
          <td class="num"><span class="slots" style="--used:${w.max_steps ? Math.min(1, w.running / w.max_steps) : 0}"></span> ${w.running} / ${w.max_steps}</td>
          <td>${(w.current || []).map((c) => `<a href="#/builds/${c.build}">${esc(c.builder)} · ${esc(c.name)}</a>`).join('<br>') || '<span class="muted">idle</span>'}</td>
          <td>${esc(w.platform || '')}</td>
          <td class="containers">${w.image_platform ? `images: ${esc(w.image_platform)}${(w.allowed_mounts || []).length ? `<br><span class="muted" title="host paths its containers may mount (read-only)">mounts: ${w.allowed_mounts.map(esc).join(', ')}</span>` : ''}` : '<span class="muted">none</span>'}</td>
          <td title="${esc(when(w.last_seen))}" class="ago" data-ms="${w.last_seen || ''}">${w.connected && !w.last_seen ? 'now' : esc(ago(w.last_seen))}</td>
        </tr>`).join('')}</tbody></table>`;
    } catch (e) {
      if (e.name !== 'AbortError') box.innerHTML = errorBox(e);
    }
  }

  const reload = coalesce(() => load(), 500);
  ctx.on('worker', () => reload());
  ctx.on('step', () => reload()); // running counts change with steps
  ctx.on('resync', () => reload());
  ctx.every(10000, () => {
    for (const el of box.querySelectorAll('td.ago[data-ms]')) if (el.dataset.ms) el.textContent = ago(Number(el.dataset.ms));
  });
  ctx.onLeave(() => reload.cancel());
  load();
  return null;
}
