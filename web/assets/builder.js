// The builder page (how its last builds went, as a chart with the success rate and median
// duration; its history; its definition) and the force form that starts a build of it
// (`POST /api/v2/builders/{id}/force`).

import { coalesce, enc, get, post } from './api.js';
import { flash } from './flash.js';
import { badge, chips, duration, errorBox, esc, short, span, when } from './view.js';

export const name = 'builder';

const PER_PAGE = 25;
// Builds the chart covers (the newest ones).
const TREND = 50;
// Results that count as passing, and results left out of the success rate (nothing was judged).
const PASSED = new Set(['SUCCESS', 'WARNINGS', 'CACHED']);
const UNJUDGED = new Set(['CANCELLED', 'SKIPPED', 'NOT_AFFECTED']);

/** The median of `xs` (numbers), or null when empty. */
export function median(xs) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/**
 * Figures of the finished builds among `builds` (newest first, as the API lists them): success
 * rate (passed over judged), median duration of those that ran, and the bars of the chart.
 */
export function trend(builds) {
  const done = builds.filter((b) => b.state === 'finished').reverse(); // oldest first
  const judged = done.filter((b) => !UNJUDGED.has(b.result));
  const passed = judged.filter((b) => PASSED.has(b.result)).length;
  const ran = done.filter((b) => b.started_at && b.finished_at).map((b) => b.finished_at - b.started_at);
  return { done, rate: judged.length ? passed / judged.length : null, passed, judged: judged.length, median: median(ran) };
}

/** An inline SVG bar chart: one bar per finished build, height its duration, colour its result. */
export function chartSvg(done) {
  const W = 560, H = 90, top = 6, bottom = 16;
  const durs = done.map((b) => (b.started_at && b.finished_at ? b.finished_at - b.started_at : 0));
  const max = Math.max(1, ...durs);
  const slot = W / Math.max(done.length, 12);
  const bars = done.map((b, i) => {
    const h = Math.max(2, ((H - top - bottom) * durs[i]) / max);
    const x = i * slot + 1, y = H - bottom - h;
    const tip = `build ${b.id}: ${b.result}, ${durs[i] ? duration(durs[i]) : 'did not run'} · ${short(b.commit)} · ${when(b.submitted_at)}`;
    return `<a href="#/builds/${b.id}" data-build="${b.id}"><rect class="bar r-${esc(b.result)}" x="${x.toFixed(1)}" y="${y.toFixed(1)}" width="${Math.max(1, slot - 2).toFixed(1)}" height="${h.toFixed(1)}"><title>${esc(tip)}</title></rect></a>`;
  }).join('');
  return `<svg class="chart" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" aria-label="Duration and result of the last ${done.length} builds">
    <line class="axis" x1="0" x2="${W}" y1="${H - bottom + 0.5}" y2="${H - bottom + 0.5}"/>
    <text x="0" y="${H - 3}">older</text><text x="${W}" y="${H - 3}" text-anchor="end">newer</text>
    <text x="${W}" y="${top + 4}" text-anchor="end">${esc(duration(max))}</text>
    ${bars}</svg>`;
}

/** `key=value` lines into an object; blank lines and `#` comments are skipped. */
export function parseProperties(text) {
  const props = {};
  const lines = String(text || '').split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (!line || line.startsWith('#')) continue;
    const eq = line.indexOf('=');
    if (eq <= 0) throw new Error(`properties line ${i + 1}: expected key=value, got "${line}"`);
    props[line.slice(0, eq).trim()] = line.slice(eq + 1).trim();
  }
  return props;
}

async function findBuilder(id, signal) {
  const list = await get(`/api/v2/builders?id=${enc(id)}`, signal);
  return (list.builders || []).find((b) => b.id === id) || null;
}

export function mount(view, { params, ctx, force }) {
  const id = params[0];
  return force ? forceForm(view, id, ctx) : builderPage(view, id, ctx);
}

function builderPage(view, id, ctx) {
  let offset = 0;
  view.innerHTML = `
    <div class="page-head">
      <h1>${esc(id)}</h1>
      <span class="spacer"></span>
      <button type="button" id="btn-cache-reset" data-needs="admin" title="Give this builder's steps new cache keys: each runs once again">Reset cache</button>
      <a class="button primary" id="force-link" data-needs="control" href="#/builders/${esc(enc(id))}/force">Force build…</a>
    </div>
    <section class="panel" id="builder-trend"><h2>Last builds</h2><p class="muted">Loading…</p></section>
    <div class="cols">
      <section class="panel" id="builder-history"><h2>History</h2><p class="muted">Loading…</p></section>
      <section class="panel" id="builder-def"><h2>Definition</h2><p class="muted">Loading…</p></section>
    </div>`;
  const hist = view.querySelector('#builder-history');
  const def = view.querySelector('#builder-def');
  const trendEl = view.querySelector('#builder-trend');
  document.title = `${id} · rbb`;

  async function loadTrend() {
    try {
      const r = await get(`/api/v2/builds?builder=${enc(id)}&limit=${TREND}`, ctx.signal);
      if (!ctx.alive) return;
      const t = trend(r.builds || []);
      if (!t.done.length) { trendEl.innerHTML = '<h2>Last builds</h2><p class="muted">No finished builds yet.</p>'; return; }
      const pct = t.rate == null ? '–' : `${Math.round(t.rate * 100)}%`;
      trendEl.innerHTML = `
        <h2>Last ${t.done.length} finished build${t.done.length === 1 ? '' : 's'}</h2>
        <div class="trend">
          <div class="stat" id="builder-rate"><b>${pct}</b><span title="SUCCESS, WARNINGS or CACHED, of the builds not cancelled or skipped">success rate (${t.passed} of ${t.judged})</span></div>
          <div class="stat" id="builder-median"><b>${t.median == null ? '–' : esc(duration(t.median))}</b><span>median duration</span></div>
          <div class="stat" id="builder-cache"><b>–</b><span>steps reused from the cache</span></div>
          ${chartSvg(t.done)}
        </div>`;
      loadCache();
    } catch (e) {
      if (e.name !== 'AbortError') trendEl.innerHTML = '<h2>Last builds</h2>' + errorBox(e);
    }
  }

  /** Hits and misses of the builder's cacheable steps (`GET /api/v2/cache`). */
  async function loadCache() {
    try {
      const c = await get('/api/v2/cache', ctx.signal);
      const el = trendEl.querySelector('#builder-cache');
      if (!ctx.alive || !el) return;
      const mine = (c.builders || []).find((b) => b.builder === id);
      const hits = mine ? mine.hits : 0, misses = mine ? mine.misses : 0;
      el.innerHTML = hits + misses
        ? `<b>${Math.round((100 * hits) / (hits + misses))}%</b><span title="cacheable steps reused (hits) of all cacheable steps (hits and misses)">steps reused (${hits} of ${hits + misses})</span>`
        : '<b>–</b><span>no cacheable step has run</span>';
    } catch (e) {
      if (e.name === 'AbortError') return;
    }
  }

  view.querySelector('#btn-cache-reset').addEventListener('click', async (ev) => {
    const btn = ev.currentTarget;
    btn.disabled = true;
    try {
      const r = await post(`/api/v2/builders/${enc(id)}/cache/reset`);
      flash(`The cache of ${id} was reset (epoch ${r && r.epoch != null ? r.epoch : '?'}): its steps run once again.`);
    } catch (e) {
      flash(e.message, 'error');
    } finally {
      btn.disabled = false;
    }
  });

  async function loadDefinition() {
    try {
      const b = await findBuilder(id, ctx.signal);
      if (!ctx.alive) return;
      if (!b) { def.innerHTML = `<h2>Definition</h2><p class="muted">${esc(id)} is not in the current plan.</p>`; return; }
      def.innerHTML = `
        <h2>Definition</h2>
        ${b.description ? `<p>${esc(b.description)}</p>` : ''}
        <dl class="facts">
          <dt>repository</dt><dd>${esc(b.repo)}</dd>
          <dt>labels</dt><dd>${chips(b.labels) || '<span class="muted">any worker</span>'}</dd>
          <dt>tags</dt><dd>${chips(b.tags, 'tag') || '<span class="muted">none</span>'}</dd>
          <dt>needs</dt><dd>${(b.needs || []).map((n) => `<a href="#/builders/${esc(enc(n))}">${esc(n)}</a>`).join(', ') || '<span class="muted">nothing</span>'}</dd>
          <dt>last build</dt><dd>${b.last_build ? `<a href="#/builds/${b.last_build.id}">${b.last_build.id}</a> ${badge(b.last_build)}` : '<span class="muted">none</span>'}</dd>
        </dl>
        <h3>Steps</h3>
        <ol class="stepnames">${(b.steps || []).map((s) => `<li>${esc(s)}</li>`).join('')}</ol>
        <details id="compiled"><summary>Compiled definition (from the plan)</summary><p class="muted">Loading…</p></details>`;
      def.querySelector('#compiled').addEventListener('toggle', loadCompiled, { once: true });
    } catch (e) {
      if (e.name !== 'AbortError') def.innerHTML = '<h2>Definition</h2>' + errorBox(e);
    }
  }

  async function loadCompiled(ev) {
    const box = ev.target;
    try {
      const plan = await get('/api/v2/plan', ctx.signal);
      const pb = (plan.builders || []).find((b) => b.id === id);
      if (!pb) { box.lastElementChild.textContent = 'Not in the plan.'; return; }
      const steps = (pb.steps || []).map((s) => {
        const flags = ['halt_on_failure', 'flunk_on_failure', 'warn_on_failure', 'always_run'].filter((f) => s[f]);
        return `<li><b>${esc(s.name)}</b> ${chips(flags)}${s.if ? ` <span class="chip">if: ${esc(s.if)}</span>` : ''}${s.image ? ` <span class="chip">image: ${esc(s.image)}</span>` : ''}<pre class="run">${esc(s.run)}</pre></li>`;
      }).join('');
      box.lastElementChild.outerHTML = `<ol class="compiled">${steps}</ol><pre class="json">${esc(JSON.stringify({ ...pb, steps: undefined }, null, 2))}</pre>`;
    } catch (e) {
      if (e.name !== 'AbortError') box.lastElementChild.outerHTML = errorBox(e);
    }
  }

  async function loadHistory() {
    try {
      const r = await get(`/api/v2/builds?builder=${enc(id)}&limit=${PER_PAGE}&offset=${offset}`, ctx.signal);
      if (!ctx.alive) return;
      const total = r.meta ? r.meta.total : (r.builds || []).length;
      const rows = (r.builds || []).map((b) => `
        <tr>
          <td class="num"><a href="#/builds/${b.id}">${b.id}</a></td>
          <td>${badge(b)}</td>
          <td><code title="${esc(b.commit)}">${esc(short(b.commit))}</code> ${esc(b.branch)}</td>
          <td class="reason">${esc(b.reason)}</td>
          <td>${esc(when(b.submitted_at))}</td>
          <td class="num">${esc(span(b.started_at, b.finished_at))}</td>
          <td>${esc(b.worker || '')}</td>
        </tr>`).join('');
      hist.innerHTML = `
        <h2>History <span class="muted">(${total} build${total === 1 ? '' : 's'})</span></h2>
        ${rows ? `<table class="list"><thead><tr><th class="num">build</th><th>result</th><th>commit</th><th>reason</th><th>submitted</th><th class="num">took</th><th>worker</th></tr></thead><tbody>${rows}</tbody></table>` : '<p class="muted">No builds yet.</p>'}
        <div class="pager">
          <button type="button" data-page="newer" ${offset === 0 ? 'disabled' : ''}>◀ newer</button>
          <span class="muted">${total ? `${offset + 1}–${Math.min(total, offset + PER_PAGE)} of ${total}` : ''}</span>
          <button type="button" data-page="older" ${offset + PER_PAGE >= total ? 'disabled' : ''}>older ▶</button>
        </div>`;
    } catch (e) {
      if (e.name !== 'AbortError') hist.innerHTML = '<h2>History</h2>' + errorBox(e);
    }
  }

  hist.addEventListener('click', (ev) => {
    const b = ev.target.closest('button[data-page]');
    if (!b) return;
    offset = b.dataset.page === 'older' ? offset + PER_PAGE : Math.max(0, offset - PER_PAGE);
    loadHistory();
  });
  const reload = coalesce(() => { loadHistory(); loadTrend(); }, 1000);
  ctx.on('build', () => reload());
  ctx.on('resync', () => { reload(); });
  ctx.onLeave(() => reload.cancel());
  loadDefinition();
  loadHistory();
  loadTrend();
  return null;
}

function forceForm(view, id, ctx) {
  view.innerHTML = `
    <div class="page-head"><h1>Force a build of <a href="#/builders/${esc(enc(id))}">${esc(id)}</a></h1></div>
    <form id="force-form" class="panel form">
      <label>Branch <input name="branch" placeholder="the repository's default branch" autocomplete="off"></label>
      <label>Revision <input name="revision" placeholder="the branch's head (a commit id, tag or branch)" autocomplete="off"></label>
      <label>Reason <input name="reason" value="forced from the web UI" autocomplete="off"></label>
      <label>Properties <span class="muted">one <code>key=value</code> per line</span>
        <textarea name="properties" rows="4" placeholder="release=1.2.3"></textarea>
      </label>
      <div id="force-error"></div>
      <div class="actions">
        <button type="submit" class="primary" id="force-submit" data-needs="control">Force</button>
        <a href="#/builders/${esc(enc(id))}">Cancel</a>
      </div>
    </form>`;
  const form = view.querySelector('#force-form');
  const err = view.querySelector('#force-error');
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    err.innerHTML = '';
    const f = new FormData(form);
    const body = {};
    for (const k of ['branch', 'revision', 'reason']) {
      const v = String(f.get(k) || '').trim();
      if (v) body[k] = v;
    }
    try {
      const props = parseProperties(f.get('properties'));
      if (Object.keys(props).length) body.properties = props;
    } catch (e) {
      err.innerHTML = errorBox(e);
      return;
    }
    const submit = view.querySelector('#force-submit');
    submit.disabled = true;
    try {
      const r = await post(`/api/v2/builders/${enc(id)}/force`, body);
      if (!ctx.alive) return;
      const needed = r.needed && r.needed.length ? ` (and the builds it needs: ${r.needed.join(', ')})` : '';
      flash(`Build ${r.build} submitted${needed}.`);
      location.hash = `#/builds/${r.build}`;
    } catch (e) {
      err.innerHTML = errorBox(e);
      submit.disabled = false;
    }
  });
  return null;
}
