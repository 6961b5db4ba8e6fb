// The grid page: builders (rows, grouped by repository) × recent commits (columns), each cell
// the newest build of that builder at that commit. One request (`/api/v2/grid`) per load; the
// table is built as one HTML string and set once; events are delegated to the table, never
// bound per cell. Live build events patch single cells (or reload when a column is new).

import { coalesce, enc, get } from './api.js';
import { ago, esc, firstLine, short, statusClass, when } from './view.js';

export const name = 'grid';

const COLLAPSED_KEY = 'rbb.grid.collapsed';
// When each commit without a change record was first seen ("repo commit" -> unix ms).
const seenAt = new Map();
// Widths in CSS pixels of the builder column and of a cell (app.css agrees). Cells widen to
// fill the screen, up to MAX_CELL_W; from WIDE_W on, a column's heading is written across.
const NAME_W = 260, CELL_W = 20, MAX_CELL_W = 240, WIDE_W = 110, ROW_H = 20, GROUP_H = 25;
// Height of a heading written upwards (narrow columns), and of one line of it.
const LINE_W = 14;
// Rows per separately laid-out table.
const CHUNK = 40;

function loadCollapsed() {
  try { return new Set(JSON.parse(localStorage.getItem(COLLAPSED_KEY) || '[]')); } catch { return new Set(); }
}

function saveCollapsed(set) {
  try { localStorage.setItem(COLLAPSED_KEY, JSON.stringify([...set])); } catch { /* not persistent then */ }
}

/** Builders matching every whitespace-separated term of `q` (in id, name, repo or tags). */
export function filterBuilders(builders, q) {
  const terms = String(q || '').toLowerCase().split(/\s+/).filter(Boolean);
  if (!terms.length) return builders;
  return builders.filter((b) => {
    const hay = (b.id + ' ' + b.name + ' ' + b.repo + ' ' + (b.tags || []).join(' ')).toLowerCase();
    return terms.every((t) => hay.includes(t));
  });
}

/** The cell width that fills `avail` pixels with `n` columns (never below the minimum). */
export function cellWidth(avail, n) {
  if (!n) return CELL_W;
  return Math.max(CELL_W, Math.min(MAX_CELL_W, Math.floor((avail - NAME_W) / n)));
}

/**
 * When a column's commit was made: the author time of its change (`time`, seconds), else when
 * the commit was first seen (`seen`, milliseconds, filled in by the page), in milliseconds.
 */
export function commitTime(c) {
  if (c.time != null) return c.time * 1000;
  return c.seen ?? null;
}

/**
 * Orders columns newest commit first, by `commitTime`, so a rebuild of an old commit stays
 * where the commit belongs; columns whose time is unknown keep the API's order, after the rest.
 */
export function orderColumns(cols) {
  return cols
    .map((c, i) => ({ c, i, t: commitTime(c) }))
    .sort((a, b) => (a.t == null) - (b.t == null) || (b.t ?? 0) - (a.t ?? 0) || a.i - b.i)
    .map((x) => x.c);
}

/** A column's heading: subject, author, time and repository, across or upwards as room allows. */
function headHtml(c, cw) {
  const t = commitTime(c);
  const hash = `<code>${esc(short(c.commit).slice(0, 7))}</code>`;
  const at = t ? `<time datetime="${new Date(t).toISOString()}">${esc(ago(t))}</time>` : '';
  let subject, who, where, tip;
  if (c.message != null || c.author != null) {
    subject = esc(firstLine(c.message) || short(c.commit));
    who = esc(c.author || '') + (at ? ' · ' + at : '');
    where = `${esc(c.repo)} ${hash}`;
    tip = `${firstLine(c.message)}\n${c.author || ''}${t ? ' · ' + when(t) : ''}\n${c.repo} ${c.branch} ${c.commit}`;
  } else {
    // No change was recorded for it (a forced build of a commit the poller never reported).
    subject = hash;
    who = at ? `seen ${at}` : '';
    where = esc(c.repo);
    tip = `${c.repo} ${c.branch} ${c.commit}${t ? '\nfirst seen ' + when(t) : ''}`;
  }
  if (cw >= WIDE_W) {
    return `<th class="col wide" title="${esc(tip)}"><div class="ch"><b class="subj">${subject}</b><span class="who">${who}</span><span class="where">${where}</span></div></th>`;
  }
  // Written upwards: as many lines as the width holds, the subject first.
  const lines = [`<b class="subj">${subject}</b>`, `<span class="who">${who}</span>`, `<span class="where">${where}</span>`];
  const k = Math.max(1, Math.min(lines.length, Math.floor(cw / LINE_W)));
  return `<th class="col up" title="${esc(tip)}"><div class="ch">${lines.slice(0, k).join('')}</div></th>`;
}

/** The red marker of a repository whose fetches fail (empty when they do not). */
export function fetchMarker(repo, error) {
  if (!error) return '';
  return ` <a class="fetch-err" data-fetch-error="${esc(repo)}" href="#/repositories" title="${esc(error)}">fetch failing: ${esc(error)}</a>`;
}

/**
 * The grid's HTML for `data` (`/api/v2/grid`'s shape, with `fetchErrors`: repository →
 * its failing fetch's error) showing `builders` (already filtered),
 * grouped by repository in first-seen order. Pure: a string in, so it can be timed and tested.
 *
 * Layout is what costs with 50,000 cells, so: a header table, then one small table per chunk
 * of rows, each in a `content-visibility: auto` box — the browser lays out and paints only
 * the chunks near the viewport. Every table has the same fixed column widths (`table-layout:
 * fixed` with a definite width), so the columns line up without measuring any cell.
 */
export function gridHtml(data, builders, collapsed, cw = CELL_W) {
  const cols = data.columns || [];
  const cells = data.cells || {};
  const fetchErrors = data.fetchErrors || {};
  const n = cols.length;
  const width = NAME_W + n * cw;
  const table = `<table class="grid" style="width:${width}px"><colgroup><col style="width:${NAME_W}px">${`<col style="width:${cw}px">`.repeat(n)}</colgroup>`;
  const mode = cw >= WIDE_W ? 'wide' : 'up';
  const out = [`<div class="grid-head ${mode}" style="width:${width}px">`, table, '<thead><tr><th class="corner">builder \\ commit</th>'];
  for (let j = 0; j < n; j++) out.push(headHtml(cols[j], cw));
  out.push('</tr></thead></table></div>');
  // Group rows by repository, keeping the API's order within a group.
  const groups = new Map();
  for (let i = 0; i < builders.length; i++) {
    const b = builders[i];
    let g = groups.get(b.repo);
    if (!g) { g = []; groups.set(b.repo, g); }
    g.push(i);
  }
  for (const [repo, idx] of groups) {
    const closed = collapsed.has(repo);
    // Columns of other repositories are shaded in this group.
    const own = cols.map((c) => c.repo === repo);
    for (let k = 0; k < idx.length; k += CHUNK) {
      const part = idx.slice(k, k + CHUNK);
      const h = part.length * ROW_H + (k === 0 ? GROUP_H : 0);
      out.push(`<div class="chunk${k ? ' cont' : ''}${closed ? ' collapsed' : ''}" data-repo="${esc(repo)}" style="width:${width}px;contain-intrinsic-size:auto ${width}px auto ${h}px">`, table, '<tbody>');
      if (k === 0) {
        out.push(`<tr class="group"><th colspan="${n + 1}"><span class="gh"><button type="button" class="toggle" data-toggle="${esc(repo)}" aria-expanded="${!closed}">${esc(repo)}</button> <span class="muted">${idx.length} builder${idx.length === 1 ? '' : 's'}</span>${fetchMarker(repo, fetchErrors[repo])}</span></th></tr>`);
      }
      for (const i of part) {
        const b = builders[i];
        const row = cells[b.id];
        out.push(`<tr data-b="${i}"><th class="name"><a href="#/builders/${esc(enc(b.id))}">${esc(b.id.slice(b.repo.length + 1) || b.name)}</a>`);
        if (b.tags && b.tags.length) out.push(`<span class="tags">${esc(b.tags.join(' '))}</span>`);
        out.push('</th>');
        for (let j = 0; j < n; j++) {
          const cell = row && row[cols[j].commit];
          if (cell) out.push(`<td class="${statusClass(cell)}"><a href="#/builds/${cell.build}"></a></td>`);
          else out.push(own[j] ? '<td></td>' : '<td class="o"></td>');
        }
        out.push('</tr>');
      }
      out.push('</tbody></table></div>');
    }
  }
  return out.join('');
}

/** A deterministic made-up grid of `nb` builders × `nc` commits, every cell filled. */
export function syntheticGrid(nb, nc) {
  let seed = 42;
  const rnd = () => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed / 0x7fffffff; };
  const hex = () => Array.from({ length: 40 }, () => '0123456789abcdef'[Math.floor(rnd() * 16)]).join('');
  const repos = Array.from({ length: Math.max(1, Math.ceil(nb / 25)) }, (_, i) => `repo-${String(i).padStart(3, '0')}`);
  const tagset = ['linux', 'windows', 'macos', 'release', 'nightly', 'docs', 'lint'];
  const builders = [];
  for (let i = 0; i < nb; i++) {
    const repo = repos[Math.floor(i / 25) % repos.length];
    const name = `builder-${String(i).padStart(4, '0')}`;
    builders.push({ id: `${repo}/${name}`, repo, name, tags: [tagset[i % tagset.length]] });
  }
  const columns = [];
  for (let j = 0; j < nc; j++) {
    columns.push({ repo: repos[j % repos.length], commit: hex(), branch: 'main', message: `Commit number ${nc - j}\n\nBody`, author: 'A U Thor', time: 1700000000 + (nc - j) * 60 });
  }
  const results = ['SUCCESS', 'SUCCESS', 'SUCCESS', 'SUCCESS', 'SUCCESS', 'SUCCESS', 'FAILURE', 'WARNINGS', 'CACHED', 'SKIPPED', 'EXCEPTION', 'CANCELLED', 'NOT_AFFECTED'];
  const cells = {};
  let id = 1;
  for (const b of builders) {
    const row = {};
    for (let j = 0; j < nc; j++) {
      const r = rnd();
      const state = j === 0 && r < 0.1 ? 'running' : j === 0 && r < 0.15 ? 'pending' : 'finished';
      row[columns[j].commit] = { build: id++, state, result: state === 'finished' ? results[Math.floor(rnd() * results.length)] : null };
    }
    cells[b.id] = row;
  }
  return { builders, columns, cells };
}

export function mount(view, { query, ctx }) {
  const synthetic = /^(\d+)x(\d+)$/.exec(query.get('synthetic') || '');
  const limit = Math.min(500, Number(query.get('limit')) || 50);
  const collapsed = loadCollapsed();
  document.title = 'Grid · rbb';
  let data = null;
  let shown = []; // builders currently rendered (filtered)
  let rows = null; // builder id -> <tr>, built on first patch
  let phases = {}; // where the last render's time went
  let cw = CELL_W; // the cell width of the last render

  view.innerHTML = `
    <div class="page-head">
      <h1>Grid</h1>
      <input id="grid-filter" class="filter" type="search" placeholder="Filter builders by name or tag" value="${esc(query.get('q') || '')}" autocomplete="off">
      <span id="grid-count" class="muted"></span>
      <span class="spacer"></span>
      <span id="grid-status" class="muted"></span>
    </div>
    <div id="grid-wrap" class="grid-wrap"><p class="muted">Loading the grid…</p></div>
    <p class="legend">${['SUCCESS', 'WARNINGS', 'FAILURE', 'EXCEPTION', 'CANCELLED', 'SKIPPED', 'CACHED', 'NOT_AFFECTED', 'RETRY'].map((r) => `<span class="sw r-${r}"></span>${r.toLowerCase().replace('_', ' ')}`).join(' ')} <span class="sw s-running"></span>running <span class="sw s-pending"></span>pending</p>`;
  const wrap = view.querySelector('#grid-wrap');
  const filter = view.querySelector('#grid-filter');
  const count = view.querySelector('#grid-count');
  const status = view.querySelector('#grid-status');

  function render() {
    const t0 = performance.now();
    shown = filterBuilders(data.builders || [], filter.value);
    cw = cellWidth(wrap.clientWidth - 2, (data.columns || []).length);
    const html = gridHtml(data, shown, collapsed, cw);
    const t1 = performance.now();
    wrap.innerHTML = html;
    const t2 = performance.now();
    // Layout is part of what the user waits for: force it inside the measurement.
    void wrap.scrollHeight;
    const ms = performance.now() - t0;
    phases = { htmlMs: t1 - t0, domMs: t2 - t1, layoutMs: t0 + ms - t2 };
    rows = null;
    const nCols = (data.columns || []).length;
    count.textContent = `${shown.length} of ${(data.builders || []).length} builders × ${nCols} commit${nCols === 1 ? '' : 's'}`;
    if (!nCols && !synthetic) {
      wrap.insertAdjacentHTML('afterbegin', '<p class="muted">No commits seen yet. Builders run when their repositories get new commits, or force one from its builder page.</p>');
    }
    return ms;
  }

  // One listener each for the whole table: group toggles, and cell tooltips made on hover.
  wrap.addEventListener('click', (ev) => {
    const btn = ev.target.closest('button[data-toggle]');
    if (!btn) return;
    const repo = btn.dataset.toggle;
    const closed = !collapsed.has(repo);
    for (const chunk of wrap.querySelectorAll('div.chunk')) {
      if (chunk.dataset.repo === repo) chunk.classList.toggle('collapsed', closed);
    }
    btn.setAttribute('aria-expanded', String(!closed));
    if (closed) collapsed.add(repo); else collapsed.delete(repo);
    saveCollapsed(collapsed);
  });
  wrap.addEventListener('mouseover', (ev) => {
    const a = ev.target.closest('td > a');
    if (!a || a.title || !data) return;
    const td = a.parentElement, tr = td.parentElement;
    const b = shown[Number(tr.dataset.b)];
    const col = data.columns[td.cellIndex - 1];
    const cell = b && col && data.cells[b.id] && data.cells[b.id][col.commit];
    if (!cell) return;
    a.title = `${b.id} @ ${short(col.commit)} (${col.branch})\nbuild ${cell.build}: ${cell.state === 'finished' ? cell.result : cell.state}` + (col.message ? `\n${firstLine(col.message)}` : '');
  });
  const refilter = coalesce(() => {
    if (!data) return;
    const q = filter.value.trim();
    const hash = '#/grid' + (q ? '?q=' + encodeURIComponent(q) : '');
    if (!synthetic) history.replaceState(null, '', hash);
    render();
  }, 120);
  filter.addEventListener('input', () => refilter());

  if (synthetic) {
    const nb = Number(synthetic[1]), nc = Number(synthetic[2]);
    data = syntheticGrid(nb, nc);
    data.columns = orderColumns(data.columns);
    const ms = render();
    const t0 = performance.now() - ms;
    status.textContent = `synthetic: ${nb * nc} cells rendered in ${ms.toFixed(0)} ms`;
    requestAnimationFrame(() => setTimeout(() => {
      window.rbbGridRender = { builders: nb, columns: nc, cells: nb * nc, ms, paintMs: performance.now() - t0, ...phases };
      status.textContent += `, painted after ${window.rbbGridRender.paintMs.toFixed(0)} ms`;
    }, 0));
    return null;
  }

  let loads = 0; // the newest load wins when several overlap
  async function load() {
    const mine = ++loads;
    try {
      const fresh = await get(`/api/v2/grid?limit=${limit}`, ctx.signal);
      if (!ctx.alive || mine !== loads) return;
      await firstSeen(fresh);
      if (!ctx.alive || mine !== loads) return;
      fresh.columns = orderColumns(fresh.columns || []);
      fresh.fetchErrors = fetchErrors;
      data = fresh;
      const ms = render();
      status.textContent = `updated ${new Date().toLocaleTimeString()} (${ms.toFixed(0)} ms)`;
      wrap.dataset.loaded = String(Date.now());
    } catch (e) {
      if (e.name === 'AbortError') return;
      status.textContent = '';
      wrap.innerHTML = `<div class="error">Cannot load the grid: ${esc(e.message)}</div>`;
    }
  }

  /**
   * Fills `seen` (when the commit was first seen: its oldest build's submission) into the
   * columns that have no change time, from the oldest build of each column. Kept across loads:
   * a commit is first seen once.
   */
  async function firstSeen(fresh) {
    const missing = (fresh.columns || []).filter((c) => c.time == null);
    await Promise.all(missing.map(async (c) => {
      const key = c.repo + ' ' + c.commit;
      if (!seenAt.has(key)) {
        try {
          const r = await get(`/api/v2/builds?repo=${encodeURIComponent(c.repo)}&commit=${encodeURIComponent(c.commit)}&order=id&limit=1`, ctx.signal);
          const first = (r.builds || [])[0];
          if (!first) return;
          seenAt.set(key, first.submitted_at);
        } catch (e) {
          if (e.name === 'AbortError') throw e;
          return; // unknown: the column keeps the API's place
        }
      }
      c.seen = seenAt.get(key);
    }));
  }

  /** Puts the newest build of a (builder, commit) into its cell; false if a reload is needed. */
  function patch(build) {
    const colIdx = data.columns.findIndex((c) => c.commit === build.commit && c.repo === build.repo);
    if (colIdx < 0) return false;
    if (!data.builders.some((b) => b.id === build.builder)) return false;
    const row = data.cells[build.builder] || (data.cells[build.builder] = {});
    const old = row[build.commit];
    if (old && old.build > build.id) return true; // an older build: the cell shows a newer one
    const cell = { build: build.id, state: build.state, result: build.state === 'finished' ? build.result ?? null : null };
    row[build.commit] = cell;
    if (!rows) {
      rows = new Map();
      for (const tr of wrap.querySelectorAll('tr[data-b]')) rows.set(shown[Number(tr.dataset.b)].id, tr);
    }
    const tr = rows.get(build.builder);
    if (!tr) return true; // filtered out: the data is current for when it is shown again
    const td = tr.cells[colIdx + 1];
    td.className = statusClass(cell);
    td.innerHTML = `<a href="#/builds/${cell.build}"></a>`;
    return true;
  }

  const onBuilds = coalesce(async (ids) => {
    if (!ctx.alive || !data) return;
    const unique = [...new Set(ids)];
    if (unique.length > 25) { load(); return; }
    try {
      const before = loads;
      const builds = await Promise.all(unique.map((id) => get(`/api/v2/builds/${id}`, ctx.signal)));
      if (!ctx.alive) return;
      if (before !== loads) { load(); return; } // a reload replaced the table meanwhile
      let reload = false;
      for (const b of builds) if (!patch(b)) reload = true;
      if (reload) load();
      else status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      if (e.name !== 'AbortError') load();
    }
  }, 300);
  ctx.on('build', (ev) => onBuilds(ev.id));
  // A wider or narrower window gives the columns another width.
  const onResize = coalesce(() => {
    if (data && cellWidth(wrap.clientWidth - 2, (data.columns || []).length) !== cw) render();
  }, 150);
  window.addEventListener('resize', onResize);
  ctx.onLeave(() => { window.removeEventListener('resize', onResize); onResize.cancel(); });
  ctx.on('resync', () => load());
  ctx.onLeave(() => { onBuilds.cancel(); refilter.cancel(); });

  // Repositories whose fetches fail get a red marker on their group's header. Fetch health
  // has no live event: it is re-read every few seconds and the headers are patched in place.
  let fetchErrors = {};
  async function loadHealth() {
    try {
      const r = await get('/api/v2/repositories', ctx.signal);
      if (!ctx.alive) return;
      const next = {};
      for (const repo of r.repositories || []) if (repo.error) next[repo.name] = repo.error;
      if (JSON.stringify(next) === JSON.stringify(fetchErrors)) return;
      fetchErrors = next;
      if (!data) return;
      data.fetchErrors = next;
      for (const chunk of wrap.querySelectorAll('div.chunk:not(.cont)')) {
        const gh = chunk.querySelector('tr.group .gh');
        if (!gh) continue;
        for (const old of gh.querySelectorAll('.fetch-err')) old.remove();
        gh.insertAdjacentHTML('beforeend', fetchMarker(chunk.dataset.repo, next[chunk.dataset.repo]));
      }
    } catch (e) {
      if (e.name !== 'AbortError') console.warn('rbb: cannot read repository health', e);
    }
  }
  ctx.every(5000, () => loadHealth());
  loadHealth();
  load();
  return null;
}
