// The build page: what ran (builder, commit, branch, worker, times), why a pending build
// waits, the builds it needs, its steps, Stop and Rebuild, why it ran (reason and changes),
// and the log viewer for the selected step. Steps are numbered from 1 on the page and in its
// addresses (`?step=1`), as in the build's result line; the API counts from 0. Live: `build`
// and `step` events re-read the build, `log` events grow the followed log.

import { coalesce, enc, get, post } from './api.js';
import { flash } from './flash.js';
import { LogView } from './logview.js';
import { badge, duration, errorBox, esc, firstLine, short, span, statusClass, when } from './view.js';

export const name = 'build';

/** The page of a build the master does not have: no facts, panels or buttons. */
function notFoundHtml(id) {
  return `
    <div class="page-head"><h1 id="build-title">Build ${id} not found</h1></div>
    <div class="panel notfound">
      <p>The master has no build ${id}.</p>
      <p>It may have been mistyped, or removed by the retention policy. <a href="#/grid">Back to the grid</a> · <a href="#/workers">workers</a></p>
    </div>`;
}

/** The step to show when none is chosen: the running one, else the first that failed, else the last with a log. */
function defaultStep(b) {
  const steps = b.steps || [];
  const running = steps.find((s) => s.state === 'running');
  if (running) return running.number;
  const bad = steps.find((s) => s.state === 'finished' && ['FAILURE', 'EXCEPTION'].includes(s.result));
  if (bad) return bad.number;
  const withLog = steps.filter((s) => s.log_id != null);
  if (withLog.length) return withLog[withLog.length - 1].number;
  return steps.length ? steps[0].number : null;
}

/** A duration from `start` to `end`; while `end` is unset it counts up (the page timer updates `.tick`). */
function tick(start, end) {
  if (end) return esc(duration(end - start));
  return `<span class="tick" data-from="${start}">${esc(span(start, null))}</span>`;
}

function stepsHtml(b, selected) {
  if (!b.steps || !b.steps.length) return '<p class="muted">No steps.</p>';
  const rows = b.steps.map((s) => `
    <tr class="${s.number === selected ? 'selected' : ''}" data-step="${s.number}">
      <td class="num">${s.number + 1}</td>
      <td><a href="#/builds/${b.id}?step=${s.number + 1}">${esc(s.name)}</a></td>
      <td>${badge(s)}</td>
      <td class="num">${s.started_at ? tick(s.started_at, s.finished_at) : ''}</td>
      <td class="num">${s.exit_code == null ? '' : esc(s.exit_code)}</td>
      <td class="reason">${esc(s.reason || '')}</td>
    </tr>`).join('');
  const chosen = b.steps.find((s) => s.number === selected);
  return `<table class="list steps"><thead><tr><th class="num">#</th><th>step</th><th>result</th><th class="num">took</th><th class="num">exit</th><th>why</th></tr></thead><tbody>${rows}</tbody></table>
    <div id="step-cache" class="step-cache"${chosen && chosen.cache ? '' : ' hidden'}>${chosen ? cacheHtml(chosen) : ''}</div>`;
}

/** What the step cache did for a step: reused (from where), ran (and what changed), or not cacheable (why). */
function cacheHtml(s) {
  const c = s.cache;
  // Nothing until the cache has something to say about the step.
  if (!c) return '';
  const head = `<h3>Step cache · ${esc(s.name)}</h3>`;
  const key = c.key ? `<p class="muted">key <code title="${esc(c.key)}">${esc(c.key.slice(0, 19))}…</code></p>` : '';
  if (c.state === 'hit') {
    const f = c.from || {};
    const log = f.log_id != null ? ` · <a href="/api/v2/logs/${f.log_id}/raw" target="_blank">its log</a>` : '';
    return `${head}<p data-cache="hit"><b>Reused</b>, not run: the same key succeeded in <a href="#/builds/${f.build}?step=${(f.step ?? 0) + 1}">build ${esc(f.build)}</a> (${esc(f.builder)}, step <b>${esc(f.step_name)}</b>)${log}.</p>${key}`;
  }
  if (c.state === 'disabled') {
    return `${head}<p data-cache="disabled"><b>Not cacheable:</b> ${esc(c.reason || '')}</p>`;
  }
  const changed = c.changed && c.changed.length
    ? `<p>It ran because its key changed since the last success:</p><ul class="changed">${c.changed.map((x) => `<li><code>${esc(x)}</code></li>`).join('')}</ul>`
    : `<p>It ran: ${esc(c.reason || 'no earlier successful execution')}.</p>`;
  const stored = c.stored ? '<p class="muted">Its outputs were stored for reuse.</p>' : '';
  return `${head}<div data-cache="miss">${changed}</div>${stored}${key}`;
}

/** The build's facts (the buttons above them stay put, so a click never lands on a replaced node). */
function factsHtml(b, needed) {
  const waited = b.started_at ? esc(duration(b.started_at - b.submitted_at)) : (b.state === 'pending' ? tick(b.submitted_at, null) : '');
  const ran = b.started_at ? tick(b.started_at, b.finished_at) : '';
  return `
      <dt>builder</dt><dd><a href="#/builders/${esc(enc(b.builder))}">${esc(b.builder)}</a></dd>
      <dt>commit</dt><dd><code title="${esc(b.commit)}">${esc(short(b.commit))}</code> on <b>${esc(b.branch)}</b> of ${esc(b.repo)}</dd>
      <dt>result</dt><dd class="${statusClass(b)}-text">${esc(b.state === 'finished' ? (b.result || 'finished') : b.state)}${b.result_reason ? ' — ' + esc(b.result_reason) : ''}</dd>
      <dt>reason</dt><dd>${esc(b.reason)}</dd>
      <dt>worker</dt><dd>${b.worker ? esc(b.worker) : '<span class="muted">none yet</span>'}</dd>
      <dt>submitted</dt><dd>${esc(when(b.submitted_at))}${waited ? ` <span class="muted">(waited ${waited})</span>` : ''}</dd>
      <dt>ran</dt><dd>${b.started_at ? esc(when(b.started_at)) + ` <span class="muted">(${ran})</span>` : '<span class="muted">not started</span>'}</dd>
      <dt>plan</dt><dd><code title="${esc(b.plan_hash)}">${esc(String(b.plan_hash || '').slice(0, 19))}</code>${b.pipeline_blob ? ` <span class="muted">pipeline blob ${esc(short(b.pipeline_blob))}</span>` : ''}</dd>
      ${b.waits_for && b.waits_for.length ? `<dt>needs</dt><dd id="build-needs">${neededHtml(b.waits_for, needed)}</dd>` : ''}`;
}

/** The builds a build needs, by builder name and result, each a link to its page. */
function neededHtml(ids, needed) {
  return `<ul class="needs">${ids.map((w) => {
    const n = needed.get(w);
    const label = n ? esc(n.builder) : `build ${w}`;
    return `<li data-needs="${w}"><a href="#/builds/${w}">${label}</a> ${n ? badge(n) : ''} <span class="muted">#${w}</span></li>`;
  }).join('')}</ul>`;
}

function whyHtml(b, changes) {
  const list = changes === null
    ? '<p class="muted">Loading changes…</p>'
    : changes.length
      ? `<ul class="changes">${changes.map((c) => `<li><code>${esc(short(c.commit))}</code> ${esc(firstLine(c.message))} <span class="muted">— ${esc(c.author)}, ${esc(c.branch)}, ${esc(c.event)} via ${esc(c.source)}</span>${c.files && c.files.length ? `<div class="files muted">${c.files.slice(0, 20).map(esc).join(' ')}${c.files.length > 20 ? ` … ${c.files.length - 20} more` : ''}</div>` : ''}</li>`).join('')}</ul>`
      : '<p class="muted">No recorded changes (forced, rebuilt or scheduled).</p>';
  return `
    <h2>Why did this run?</h2>
    <p><b>${esc(b.reason)}</b>${b.result_reason ? ` · result: ${esc(b.result_reason)}` : ''}</p>
    ${list}`;
}

/** The API number of the step named in the address (`?step=1` is the first step), or null. */
function stepOf(q) {
  const n = Number(q.get('step'));
  return q.has('step') && Number.isInteger(n) && n >= 1 ? n - 1 : null;
}

/** The log line named in the address (`?line=12`), or null. */
function lineOf(q) {
  const n = Number(q.get('line'));
  return q.has('line') && Number.isInteger(n) && n >= 1 ? n : null;
}

export function mount(view, { params, query, ctx }) {
  const id = Number(params[0]);
  let build = null;
  let changes = null;
  let selected = stepOf(query);
  let needed = new Map(); // build id -> the build it needs, as last read

  view.innerHTML = `
    <div class="page-head">
      <h1 id="build-title">Build ${id}</h1>
      <span class="spacer"></span>
      <button type="button" id="btn-stop" class="danger" data-needs="control" disabled>Stop</button>
      <button type="button" id="btn-rebuild" data-needs="control" disabled>Rebuild</button>
    </div>
    <div id="build-error"></div>
    <div id="build-waiting" class="waiting-box" hidden></div>
    <dl class="facts wide" id="build-facts"><dd class="muted">Loading build ${id}…</dd></dl>
    <div class="cols">
      <section id="build-steps" class="panel"></section>
      <section id="build-why" class="panel why"></section>
    </div>
    <section id="build-log" class="panel logview"></section>`;
  const title = view.querySelector('#build-title');
  const facts = view.querySelector('#build-facts');
  const errorEl = view.querySelector('#build-error');
  const waitingEl = view.querySelector('#build-waiting');
  const stopBtn = view.querySelector('#btn-stop');
  const rebuildBtn = view.querySelector('#btn-rebuild');
  let stopping = false; // a stop was requested: keep the button off
  const stepsEl = view.querySelector('#build-steps');
  const whyEl = view.querySelector('#build-why');
  const log = new LogView(view.querySelector('#build-log'), ctx);
  let line = lineOf(query);
  document.title = `Build ${id} · rbb`;

  function current() {
    return selected ?? (build ? defaultStep(build) : null);
  }

  function showLog() {
    const step = build && (build.steps || []).find((s) => s.number === current());
    log.show(step || null, { build: id, step: step ? step.number + 1 : null, line });
  }

  async function loadChanges(b) {
    const ids = (b.changes || []).slice(0, 10);
    if (!ids.length) { changes = []; return; }
    // One filtered request per change (usually one); filtered again here in case the
    // server ignores the filter.
    const lists = await Promise.all(ids.map((c) => get(`/api/v2/changes?id=${c}`, ctx.signal).catch(() => ({ changes: [] }))));
    const want = new Set(ids);
    const seen = new Set();
    changes = lists.flatMap((l) => l.changes || []).filter((c) => want.has(c.id) && !seen.has(c.id) && seen.add(c.id));
  }

  /** Reads the builds this one needs that are not finished as last read. */
  async function loadNeeded(b) {
    const ids = (b.waits_for || []).filter((w) => !needed.has(w) || needed.get(w).state !== 'finished').slice(0, 50);
    if (!ids.length) return;
    const got = await Promise.all(ids.map((w) => get(`/api/v2/builds/${w}`, ctx.signal).catch((e) => {
      if (e.name === 'AbortError') throw e;
      return null;
    })));
    for (let i = 0; i < ids.length; i++) if (got[i]) needed.set(ids[i], got[i]);
  }

  /** Shows the page of a build the master does not have. */
  function notFound() {
    view.innerHTML = notFoundHtml(id);
    view.dataset.state = 'missing';
    document.title = `Build ${id} not found · rbb`;
  }

  let loads = 0; // the newest read wins when several overlap
  async function load(first) {
    const mine = ++loads;
    try {
      const b = await get(`/api/v2/builds/${id}`, ctx.signal);
      if (!ctx.alive || mine !== loads) return;
      await loadNeeded(b);
      if (!ctx.alive || mine !== loads) return;
      const before = build;
      build = b;
      title.innerHTML = `Build ${b.id} <span class="muted">${esc(b.builder)}</span> ${badge(b)}`;
      document.title = `Build ${b.id} · ${b.builder} · ${b.state === 'finished' ? b.result || 'finished' : b.state} · rbb`;
      waitingEl.hidden = !(b.state === 'pending' && b.waiting);
      waitingEl.innerHTML = b.state === 'pending' && b.waiting ? `<b>Waiting:</b> ${esc(b.waiting)}` : '';
      facts.innerHTML = factsHtml(b, needed);
      errorEl.innerHTML = '';
      stopBtn.disabled = stopping || b.state === 'finished';
      // A pending build has not run yet: there is nothing to run again.
      rebuildBtn.disabled = b.state === 'pending';
      rebuildBtn.title = b.state === 'pending' ? 'It has not run yet' : 'Run it again with the same plan and commit';
      stepsEl.innerHTML = stepsHtml(b, current());
      view.dataset.state = b.state;
      view.dataset.result = b.result || '';
      if (first) {
        whyEl.innerHTML = whyHtml(b, null);
        await loadChanges(b);
        if (!ctx.alive) return;
        whyEl.innerHTML = whyHtml(b, changes);
        showLog();
      } else {
        whyEl.querySelector('p').innerHTML = `<b>${esc(b.reason)}</b>${b.result_reason ? ` · result: ${esc(b.result_reason)}` : ''}`;
        const step = (b.steps || []).find((s) => s.number === current());
        const old = before && (before.steps || []).find((s) => s.number === current());
        // The shown step changed log (it started), or no step was chosen and another runs now.
        if (step && (!old || old.log_id !== step.log_id || (selected == null && log.id !== step.log_id))) showLog();
        else log.stepChanged(step);
      }
    } catch (e) {
      if (e.name === 'AbortError') return;
      if (e.status === 404) { if (mine === loads) notFound(); return; }
      errorEl.innerHTML = errorBox(e);
    }
  }

  view.addEventListener('click', async (ev) => {
    const btn = ev.target.closest('button');
    if (!btn || !build) return;
    if (btn.id === 'btn-stop') {
      btn.disabled = true;
      stopping = true;
      try {
        await post(`/api/v2/builds/${id}/stop`);
        flash(`Stop requested for build ${id}.`);
      } catch (e) {
        flash(e.message, 'error');
        stopping = false;
        btn.disabled = build.state === 'finished';
      }
    } else if (btn.id === 'btn-rebuild' && build.state !== 'pending') {
      btn.disabled = true;
      try {
        const r = await post(`/api/v2/builds/${id}/rebuild`);
        flash(`Build ${r.build} submitted (rebuild of ${id}).`);
        location.hash = `#/builds/${r.build}`;
      } catch (e) {
        flash(e.message, 'error');
        btn.disabled = false;
      }
    }
  });
  // A click on a step row (outside its link) selects it too.
  stepsEl.addEventListener('click', (ev) => {
    const tr = ev.target.closest('tr[data-step]');
    if (tr && !ev.target.closest('a')) location.hash = `#/builds/${id}?step=${Number(tr.dataset.step) + 1}`;
  });

  const reload = coalesce(() => load(false), 250);
  ctx.on('build', (ev) => { if (ev.id === id) reload(); });
  ctx.on('step', (ev) => { if (ev.build === id) reload(); });
  ctx.on('log', (ev) => { if (ev.id === log.id) log.grow(ev.bytes); });
  ctx.on('resync', () => reload());
  // Running durations count up.
  ctx.every(1000, () => {
    for (const el of view.querySelectorAll('.tick')) el.textContent = span(Number(el.dataset.from), null);
  });
  ctx.onLeave(() => reload.cancel());
  load(true);

  return {
    update(q) {
      const before = current();
      selected = stepOf(q);
      line = lineOf(q);
      if (!build) return;
      // Another line of the same log: no need to read the log again.
      if (current() === before && line != null && log.id != null) { log.goToLine(line); return; }
      stepsEl.innerHTML = stepsHtml(build, current());
      showLog();
    },
  };
}
