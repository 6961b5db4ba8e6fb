// The log viewer: shows one step's log a window of bytes at a time (`Range` requests of
// 256 KiB), never the whole file, so a 50 MB log costs what one page costs. "Follow" tails a
// running step: it appends the bytes past what it has when a `log` event (or, without live
// events, a poll) says the log grew, and keeps at most a few pages in the page.
// Lines are numbered (each number a link to that line) wherever the number is known: from the
// start of the log and from any window reached by paging from it. ANSI colours are rendered;
// other escape sequences are dropped. Search marks matches in the window shown.
// Lines written to stderr are marked (and titled "stderr"), the worker's own header lines
// muted, from the stream runs of the bytes shown (`/api/v2/logs/{id}/streams`, read for the
// same byte range as the text, so a page costs its own runs).

import { get, liveOpen, logRange, logTail } from './api.js';
import { bytes as fmtBytes, esc } from './view.js';

export const PAGE = 256 * 1024;
const KEEP = 4 * PAGE; // most bytes kept in the DOM while following
const BLOCK = 200; // lines per separately laid-out block
// Escape sequences: SGR (`m`) sets colours; every other CSI, OSC or two-byte escape is dropped.
const ESCAPES = /\x1b\[([0-9;?]*)([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]/g;
// An escape sequence cut off at the end of a chunk: kept for the next chunk.
const CUT = /\x1b(?:\[[0-9;?]*|\][^\x07\x1b]*)?$/;

/**
 * The stream runs of bytes `[start, end)` (`end` null: to the end) of log `id`, asked at the
 * same time as the bytes themselves: `{ runs: [{offset, stream}], bytes }`, where `bytes` is
 * how far the runs are known (a live log may have grown since). Null when they cannot be read
 * (the lines then stay unmarked).
 */
async function streamRuns(id, start, end, signal) {
  const limit = end == null ? '' : `&limit=${Math.max(0, end - start)}`;
  try {
    return await get(`/api/v2/logs/${id}/streams?offset=${start}${limit}`, signal);
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    return null;
  }
}

/**
 * What marks the lines of a window: where each newline-separated piece of `bytes` (from
 * index `from`, the window at log offset `base`) starts and ends, and the stream runs.
 */
function streamMarks(bytes, from, base, streams) {
  if (!streams || !streams.runs || !streams.runs.length) return null;
  const starts = [base + from];
  for (let i = bytes.indexOf(10, from); i >= 0; i = bytes.indexOf(10, i + 1)) starts.push(base + i + 1);
  return { starts, end: base + bytes.length, runs: streams.runs, known: streams.bytes };
}

/**
 * A function of a byte range `[a, b)` (asked in increasing order) saying how its line is
 * marked: 'stderr' when any of it came from stderr, 'header' when all of it is the worker's
 * header, else '' (also for bytes past `known`, whose stream was not known yet).
 */
function streamMarker(runs, known) {
  let k = 0;
  return (a, b) => {
    if (a >= known) return '';
    b = Math.min(b, known);
    while (k + 1 < runs.length && runs[k + 1].offset <= a) k++;
    let err = false, hdr = true;
    for (let j = k; j < runs.length && (j === k || runs[j].offset < b); j++) {
      if (runs[j].stream === 'stderr') err = true;
      if (runs[j].stream !== 'header') hdr = false;
    }
    return err ? 'stderr' : hdr ? 'header' : '';
  };
}

const MARK_ATTRS = { stderr: ' s-err" title="stderr', header: ' s-hdr', '': '' };

/** Drops UTF-8 continuation bytes at the start of a window that begins mid-character. */
function skipPartial(b, start) {
  if (start === 0) return 0;
  let i = 0;
  while (i < 3 && i < b.length && (b[i] & 0xc0) === 0x80) i++;
  return i;
}

/** The colour of entry `n` of the xterm 256-colour palette (16–255). */
function xterm(n) {
  if (n >= 232) { const v = 8 + (n - 232) * 10; return `rgb(${v},${v},${v})`; }
  const i = n - 16, f = (c) => (c ? 55 + c * 40 : 0);
  return `rgb(${f(Math.floor(i / 36))},${f(Math.floor(i / 6) % 6)},${f(i % 6)})`;
}

/** Applies the SGR parameters `params` (`1;31`) to the text attributes `st`. */
export function applySgr(st, params) {
  const p = params === '' ? [0] : params.split(';').map((x) => Number(x) || 0);
  for (let i = 0; i < p.length; i++) {
    const n = p[i];
    if (n === 0) { st.fg = st.bg = null; st.bold = st.dim = st.italic = st.under = false; }
    else if (n === 1) st.bold = true;
    else if (n === 2) st.dim = true;
    else if (n === 3) st.italic = true;
    else if (n === 4) st.under = true;
    else if (n === 22) st.bold = st.dim = false;
    else if (n === 23) st.italic = false;
    else if (n === 24) st.under = false;
    else if (n >= 30 && n <= 37) st.fg = n - 30;
    else if (n >= 90 && n <= 97) st.fg = n - 90 + 8;
    else if (n === 39) st.fg = null;
    else if (n >= 40 && n <= 47) st.bg = n - 40;
    else if (n >= 100 && n <= 107) st.bg = n - 100 + 8;
    else if (n === 49) st.bg = null;
    else if ((n === 38 || n === 48) && p[i + 1] === 5) {
      const c = p[i + 2] ?? 0;
      const v = c < 16 ? c : xterm(c);
      if (n === 38) st.fg = v; else st.bg = v;
      i += 2;
    } else if ((n === 38 || n === 48) && p[i + 1] === 2) {
      const v = `rgb(${p[i + 2] ?? 0},${p[i + 3] ?? 0},${p[i + 4] ?? 0})`;
      if (n === 38) st.fg = v; else st.bg = v;
      i += 4;
    }
  }
}

/** A piece of text with the attributes `st`, as HTML. */
function styled(text, st) {
  if (!text) return '';
  const cls = [], style = [];
  if (typeof st.fg === 'number') cls.push('a-f' + st.fg); else if (st.fg) style.push('color:' + st.fg);
  if (typeof st.bg === 'number') cls.push('a-b' + st.bg); else if (st.bg) style.push('background:' + st.bg);
  if (st.bold) cls.push('a-bold');
  if (st.dim) cls.push('a-dim');
  if (st.italic) cls.push('a-it');
  if (st.under) cls.push('a-un');
  if (!cls.length && !style.length) return esc(text);
  return `<span class="${cls.join(' ')}"${style.length ? ` style="${style.join(';')}"` : ''}>${esc(text)}</span>`;
}

/** One line's text (escape sequences and all) as HTML; `st` carries the attributes across lines. */
export function ansiHtml(text, st) {
  // A carriage return inside a line (progress bars) overwrites it: keep what was written last.
  const cr = text.lastIndexOf('\r', text.length - (text.endsWith('\r\n') ? 3 : text.endsWith('\n') ? 2 : 1));
  let out = '', last = 0;
  ESCAPES.lastIndex = 0;
  for (let m; (m = ESCAPES.exec(text));) {
    if (m.index > cr) out += styled(text.slice(Math.max(last, cr + 1), m.index), st);
    if (m[2] === 'm') applySgr(st, m[1]);
    last = ESCAPES.lastIndex;
  }
  return out + styled(text.slice(Math.max(last, cr + 1)), st);
}

export class LogView {
  /** `el` is an empty container; `ctx` the page context (its signal and lifetime). */
  constructor(el, ctx) {
    this.el = el;
    this.ctx = ctx;
    this.id = null;
    this.where = {}; // { build, step } of the log shown, for line links
    this.size = 0; // the log's size as last heard
    this.start = 0; // first byte shown
    this.end = 0; // byte after the last one shown
    this.complete = true;
    this.follow = false;
    this.busy = false;
    this.again = false;
    this.decoder = new TextDecoder('utf-8');
    this.chunks = []; // what each appended piece added: { lines, n } (line elements, bytes)
    this.lineAt = new Map(); // byte offset -> number of the line holding it, where known
    this.next = null; // number of the next new line (null: unknown here)
    this.open = null; // the last line element, while its line has no newline yet
    this.carry = ''; // an escape sequence cut off at the end of the last chunk
    this.sgr = {}; // text attributes carried from line to line
    el.innerHTML = `
      <div class="log-bar">
        <span class="log-title"></span>
        <input type="search" class="log-search" placeholder="Search this page of the log" autocomplete="off" aria-label="Search the log">
        <span class="log-hits muted"></span>
        <span class="spacer"></span>
        <button type="button" data-log="first" title="Start of the log">« first</button>
        <button type="button" data-log="prev" title="Previous 256 KiB">‹ prev</button>
        <span class="log-range muted"></span>
        <button type="button" data-log="next" title="Next 256 KiB">next ›</button>
        <button type="button" data-log="last" title="End of the log">last »</button>
        <label class="follow"><input type="checkbox" data-log="follow"> follow</label>
        <a class="raw" target="_blank" rel="noopener">raw</a>
        <a class="download">download</a>
      </div>
      <pre class="log" tabindex="0"></pre>`;
    this.title = el.querySelector('.log-title');
    this.range = el.querySelector('.log-range');
    this.pre = el.querySelector('pre.log');
    this.raw = el.querySelector('a.raw');
    this.download = el.querySelector('a.download');
    this.search = el.querySelector('input.log-search');
    this.hitsEl = el.querySelector('.log-hits');
    this.hits = [];
    this.hit = -1;
    this.followBox = el.querySelector('input[data-log="follow"]');
    el.addEventListener('click', (ev) => {
      const b = ev.target.closest('button[data-log]');
      if (b) this.nav(b.dataset.log);
    });
    this.followBox.addEventListener('change', () => this.setFollow(this.followBox.checked));
    let searchTimer = null;
    this.search.addEventListener('input', () => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => this.find(), 150);
    });
    this.search.addEventListener('keydown', (ev) => {
      if (ev.key !== 'Enter') return;
      ev.preventDefault();
      clearTimeout(searchTimer);
      if (this.hits.length && this.search.value === this.term) this.nextHit(ev.shiftKey ? -1 : 1);
      else this.find();
    });
    ctx.onLeave(() => { clearTimeout(searchTimer); if (globalThis.CSS && CSS.highlights) CSS.highlights.delete('rbb-search'); });
    // Without live events, a followed log is polled.
    ctx.every(1000, () => { if (this.follow && !this.complete && !liveOpen()) this.grow(null); });
  }

  /**
   * Shows the log of `step` (a step of `/api/v2/builds/{id}`), or says it has none. `where`
   * names it for line links (`{ build, step, line }`, steps counted from 1); `line` is shown.
   */
  async show(step, where = {}) {
    this.id = step && step.log_id != null ? step.log_id : null;
    this.where = where;
    this.follow = false; // until the log's state is known
    this.start = this.end = this.size = 0;
    this.lineAt = new Map([[0, 1]]);
    this.clear(null);
    this.el.dataset.log = this.id ?? '';
    this.pre.classList.toggle('empty', this.id == null);
    if (this.id == null) {
      this.title.textContent = step ? `${step.name}: no log${step.state === 'pending' ? ' yet' : ''}` : 'No step selected';
      this.range.textContent = '';
      this.raw.removeAttribute('href');
      this.download.removeAttribute('href');
      this.setButtons();
      return;
    }
    this.title.innerHTML = `<b>${esc(step.name)}</b>`;
    this.raw.href = `/api/v2/logs/${this.id}/raw`;
    this.download.href = `/api/v2/logs/${this.id}/raw`;
    const file = `build-${where.build ?? ''}-step-${where.step ?? ''}-${step.name}`.replace(/[^A-Za-z0-9._-]+/g, '_');
    this.download.setAttribute('download', file + '.log');
    const id = this.id;
    try {
      const meta = await get(`/api/v2/logs/${id}`, this.ctx.signal);
      if (id !== this.id) return;
      this.size = meta.bytes;
      this.complete = meta.complete;
    } catch (e) {
      if (e.name === 'AbortError') return;
      this.size = step.log_bytes || 0;
      this.complete = step.state === 'finished';
    }
    // A running step is followed; a finished one opens at its end (where failures are), or
    // at the line the address names.
    this.follow = !this.complete && where.line == null;
    this.followBox.checked = this.follow;
    if (where.line != null) await this.goToLine(where.line);
    else await this.loadTail();
  }

  /** The step's state changed (e.g. it finished): a last read, then stop following. */
  stepChanged(step) {
    if (!step || step.log_id !== this.id) return;
    if (step.state === 'finished' && !this.complete) {
      this.complete = true;
      this.grow(null);
    }
  }

  setFollow(on) {
    this.follow = on;
    this.followBox.checked = on;
    if (on) this.loadTail();
  }

  async nav(where) {
    if (this.id == null) return;
    if (where === 'last') { await this.loadTail(); return; }
    this.setFollow(false);
    if (where === 'first') await this.load(0);
    else if (where === 'prev') await this.load(Math.max(0, this.start - PAGE));
    else if (where === 'next' && this.end < this.size) await this.load(this.end);
  }

  /**
   * Shows line `n` (counted from 1) and marks it. Lines are numbered from the start, so a line
   * past the window shown is looked for a page at a time from the nearest known place.
   */
  async goToLine(n) {
    if (this.id == null) return;
    this.setFollow(false);
    const id = this.id;
    if (!this.lineEl(n)) {
      // The nearest known line start at or before `n`.
      let from = 0;
      for (const [at, line] of this.lineAt) if (line <= n && at > from) from = at;
      await this.load(from);
      while (id === this.id && !this.lineEl(n) && this.end < this.size && this.next != null && this.next <= n) {
        await this.load(this.end);
      }
    }
    const el = this.lineEl(n);
    if (!el || id !== this.id) return;
    for (const old of this.pre.querySelectorAll('.l.target')) old.classList.remove('target');
    el.classList.add('target');
    this.pre.scrollTop = Math.max(0, el.offsetTop - this.pre.offsetTop - this.pre.clientHeight / 3);
  }

  lineEl(n) {
    return this.pre.querySelector(`#L${n}`);
  }

  /** Shows bytes `[start, start + PAGE)`. */
  async load(start) {
    const id = this.id;
    try {
      const [r, runs] = await Promise.all([
        logRange(id, start, start + PAGE, this.ctx.signal),
        streamRuns(id, start, start + PAGE, this.ctx.signal),
      ]);
      if (id !== this.id) return;
      this.size = Math.max(this.size, r.size);
      this.replace(r, runs);
      this.pre.scrollTop = 0;
      this.setButtons();
    } catch (e) {
      if (e.name !== 'AbortError') this.pre.textContent = 'Cannot read the log: ' + e.message;
    }
  }

  /** Shows the last page; while following, keeps the view at the bottom. */
  async loadTail() {
    const id = this.id;
    if (id == null) return;
    try {
      // The tail starts at or after the last page of the size known now: its runs are among
      // those from there on.
      const [r, runs] = await Promise.all([
        logTail(id, PAGE, this.ctx.signal),
        streamRuns(id, Math.max(0, this.size - PAGE), null, this.ctx.signal),
      ]);
      if (id !== this.id) return;
      this.size = Math.max(this.size, r.size);
      this.replace(r, runs);
      this.pre.scrollTop = this.pre.scrollHeight;
      this.setButtons();
      if (this.end < this.size) this.grow(null);
    } catch (e) {
      if (e.name !== 'AbortError') this.pre.textContent = 'Cannot read the log: ' + e.message;
    }
  }

  /** The log grew to `size` bytes (from a `log` event; null = ask the server). */
  async grow(size) {
    if (size != null) this.size = Math.max(this.size, size);
    if (!this.follow || this.id == null) { this.setButtons(); return; }
    if (this.busy) { this.again = true; return; }
    if (size != null && this.end >= this.size) return;
    this.busy = true;
    const id = this.id;
    try {
      do {
        this.again = false;
        // Far behind (a burst of output): jump to the tail instead of reading it all.
        if (this.size - this.end > KEEP) { this.busy = false; await this.loadTail(); return; }
        const [r, runs] = await Promise.all([
          logRange(id, this.end, this.end + PAGE, this.ctx.signal),
          streamRuns(id, this.end, this.end + PAGE, this.ctx.signal),
        ]);
        if (id !== this.id || !this.follow) return;
        this.size = Math.max(this.size, r.size);
        if (!r.bytes.length) break; // nothing new on disk yet: the next event or poll asks again
        const atBottom = this.pre.scrollTop + this.pre.clientHeight >= this.pre.scrollHeight - 24;
        const marks = streamMarks(r.bytes, 0, r.start, runs);
        this.append(this.decoder.decode(r.bytes, { stream: true }), r.end - r.start, marks);
        this.end = r.end;
        this.trim();
        if (atBottom) this.pre.scrollTop = this.pre.scrollHeight;
        this.setButtons();
        if (this.term) this.find(true);
      } while (this.again || this.end < this.size);
    } catch (e) {
      if (e.name !== 'AbortError') console.warn('rbb: log tail failed', e);
    } finally {
      this.busy = false;
      this.setButtons();
    }
  }

  /** Empties the viewer; the next line shown gets number `next` (null: unknown). */
  clear(next) {
    this.pre.replaceChildren();
    this.chunks = [];
    this.next = next;
    this.open = null;
    this.carry = '';
    this.sgr = {};
    this.decoder = new TextDecoder('utf-8');
  }

  /**
   * Replaces the text shown with the window `r` (a `logRange`/`logTail` answer), its lines
   * marked by the stream runs `runs` of its bytes (a `streamRuns` answer; null: unmarked).
   */
  replace(r, runs = null) {
    this.clear(this.lineAt.get(r.start) ?? null);
    this.start = r.start;
    this.end = r.end;
    const skip = skipPartial(r.bytes, r.start);
    // Line numbers are known from the start of the log and from pages reached by paging from it.
    this.pre.classList.toggle('unnumbered', this.next == null);
    this.range.title = this.next == null ? 'Line numbers start from « first »' : '';
    const marks = streamMarks(r.bytes, skip, r.start, runs);
    this.append(this.decoder.decode(r.bytes.subarray(skip), { stream: true }), r.end - r.start, marks);
    if (this.term) this.find(true);
  }

  /**
   * Appends decoded text that ends at byte `this.end + n`, line by line; `marks` (from
   * `streamMarks`, or null) says where each line's bytes are, to mark stderr and header lines.
   */
  append(text, n, marks = null) {
    text = this.carry + text;
    // A cut-off escape is kept for the next chunk; a long unterminated one is shown as it is.
    const cut = CUT.exec(text.slice(-256));
    this.carry = cut ? cut[0] : '';
    if (cut) text = text.slice(0, text.length - cut[0].length);
    const parts = text.split('\n');
    // An escape sequence holding a newline (rare) leaves pieces and bytes unaligned: no marks.
    const mark = marks && marks.starts.length === parts.length ? streamMarker(marks.runs, marks.known) : null;
    const html = [];
    for (let i = 0; i < parts.length; i++) {
      const last = i === parts.length - 1;
      const piece = last ? parts[i] : parts[i] + '\n';
      if (!piece) continue;
      const stream = mark ? mark(marks.starts[i], marks.starts[i + 1] ?? marks.end) : '';
      if (i === 0 && this.open) {
        // The rest of a line begun by the previous chunk.
        if (stream === 'stderr') { this.open.classList.add('s-err'); this.open.title = 'stderr'; }
        else if (stream !== 'header') this.open.classList.remove('s-hdr');
        this.open.insertAdjacentHTML('beforeend', ansiHtml(piece, this.sgr));
        if (!last) this.open = null;
        continue;
      }
      const num = this.next;
      if (num != null) this.next++;
      const link = num != null ? `#/builds/${this.where.build}?step=${this.where.step}&line=${num}` : null;
      html.push(`<span class="l${MARK_ATTRS[stream]}"${num != null ? ` id="L${num}"` : ''}><a class="n"${link ? ` href="${link}" data-l="${num}"` : ''}></a>${ansiHtml(piece, this.sgr)}</span>`);
    }
    this.addLines(html);
    if (html.length && !text.endsWith('\n')) this.open = this.pre.lastElementChild.lastElementChild;
    else if (text.endsWith('\n')) this.open = null;
    this.chunks.push({ lines: html.length, n });
    // Where the next window starts, the line number is now known.
    const end = this.start + this.chunks.reduce((a, c) => a + c.n, 0);
    if (this.next != null) this.lineAt.set(end, this.open ? this.next - 1 : this.next);
  }

  /**
   * Appends line elements (HTML strings) in blocks of `BLOCK` lines. Blocks off screen are
   * neither laid out nor painted (`content-visibility: auto`), so a page of 40,000 short lines
   * costs the layout of the few blocks in view.
   */
  addLines(html) {
    let i = 0;
    const tail = this.pre.lastElementChild;
    if (tail && tail.childElementCount < BLOCK && html.length) {
      i = Math.min(html.length, BLOCK - tail.childElementCount);
      tail.insertAdjacentHTML('beforeend', html.slice(0, i).join(''));
    }
    const blocks = [];
    for (; i < html.length; i += BLOCK) blocks.push(`<div class="blk">${html.slice(i, i + BLOCK).join('')}</div>`);
    if (blocks.length) this.pre.insertAdjacentHTML('beforeend', blocks.join(''));
  }

  /** Keeps at most about `KEEP` bytes in the page while following a long log. */
  trim() {
    while (this.end - this.start > KEEP && this.chunks.length > 1) {
      const { lines, n } = this.chunks.shift();
      const els = this.pre.querySelectorAll('.l');
      for (let i = 0; i < lines && i < els.length; i++) els[i].remove();
      while (this.pre.firstElementChild && !this.pre.firstElementChild.childElementCount) this.pre.firstElementChild.remove();
      this.start += n;
    }
  }

  /** Marks every match of the search box in the window shown; `keep` stays on the current hit. */
  find(keep = false) {
    const term = this.search.value;
    this.term = term;
    for (const el of this.pre.querySelectorAll('.l.hit')) el.classList.remove('hit', 'current');
    const hl = globalThis.CSS && CSS.highlights && typeof Highlight !== 'undefined';
    if (hl) CSS.highlights.delete('rbb-search');
    this.hits = [];
    if (!term) { this.hitsEl.textContent = ''; this.hit = -1; return; }
    const needle = term.toLowerCase();
    const ranges = [];
    for (const line of this.pre.querySelectorAll('.l')) {
      if (!line.textContent.toLowerCase().includes(needle)) continue;
      line.classList.add('hit');
      this.hits.push(line);
      if (!hl) continue;
      const walk = document.createTreeWalker(line, NodeFilter.SHOW_TEXT);
      for (let t; (t = walk.nextNode());) {
        const low = t.data.toLowerCase();
        for (let i = low.indexOf(needle); i >= 0; i = low.indexOf(needle, i + needle.length)) {
          const r = new Range();
          r.setStart(t, i);
          r.setEnd(t, i + needle.length);
          ranges.push(r);
        }
      }
    }
    if (hl && ranges.length) CSS.highlights.set('rbb-search', new Highlight(...ranges));
    this.el.dataset.hits = String(this.hits.length);
    if (!keep || this.hit >= this.hits.length) this.hit = -1;
    if (!this.hits.length) { this.hitsEl.textContent = 'no match on this page'; return; }
    if (!keep) this.nextHit(1);
    else this.showHits();
  }

  /** Moves to the next (`1`) or previous (`-1`) line with a match. */
  nextHit(dir) {
    if (!this.hits.length) return;
    this.hit = (this.hit + dir + this.hits.length) % this.hits.length;
    const el = this.hits[this.hit];
    this.pre.scrollTop = Math.max(0, el.offsetTop - this.pre.offsetTop - this.pre.clientHeight / 3);
    this.showHits();
  }

  showHits() {
    for (const el of this.pre.querySelectorAll('.l.current')) el.classList.remove('current');
    if (this.hit >= 0) this.hits[this.hit].classList.add('current');
    this.hitsEl.textContent = `${this.hit + 1} of ${this.hits.length} line${this.hits.length === 1 ? '' : 's'}`;
  }

  setButtons() {
    const has = this.id != null;
    const q = (n) => this.el.querySelector(`button[data-log="${n}"]`);
    q('first').disabled = !has || this.start === 0;
    q('prev').disabled = !has || this.start === 0;
    q('next').disabled = !has || this.end >= this.size;
    q('last').disabled = !has || (this.end >= this.size && this.follow);
    this.followBox.disabled = !has;
    this.search.disabled = !has;
    this.range.textContent = has
      ? `${fmtBytes(this.start)}–${fmtBytes(this.end)} of ${fmtBytes(this.size)}${this.complete ? '' : ' (growing)'}`
      : '';
    this.el.dataset.complete = String(this.complete);
  }
}
