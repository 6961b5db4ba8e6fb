// The log viewer: shows one step's log a window of bytes at a time (`Range` requests of
// 256 KiB), never the whole file, so a 50 MB log costs what one page costs. "Follow" tails a
// running step: it appends the bytes past what it has when a `log` event (or, without live
// events, a poll) says the log grew, and keeps at most a few pages in the page.

import { get, liveOpen, logRange, logTail } from './api.js';
import { bytes as fmtBytes, esc } from './view.js';

export const PAGE = 256 * 1024;
const KEEP = 4 * PAGE; // most bytes kept in the DOM while following
const ANSI = /\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07/g;

/** Drops UTF-8 continuation bytes at the start of a window that begins mid-character. */
function skipPartial(b, start) {
  if (start === 0) return 0;
  let i = 0;
  while (i < 3 && i < b.length && (b[i] & 0xc0) === 0x80) i++;
  return i;
}

export class LogView {
  /** `el` is an empty container; `ctx` the page context (its signal and lifetime). */
  constructor(el, ctx) {
    this.el = el;
    this.ctx = ctx;
    this.id = null;
    this.size = 0; // the log's size as last heard
    this.start = 0; // first byte shown
    this.end = 0; // byte after the last one shown
    this.complete = true;
    this.follow = false;
    this.busy = false;
    this.again = false;
    this.decoder = new TextDecoder('utf-8');
    this.chunks = []; // text nodes shown, with their byte lengths
    el.innerHTML = `
      <div class="log-bar">
        <span class="log-title"></span>
        <span class="spacer"></span>
        <button type="button" data-log="first" title="Start of the log">« first</button>
        <button type="button" data-log="prev" title="Previous 256 KiB">‹ prev</button>
        <span class="log-range muted"></span>
        <button type="button" data-log="next" title="Next 256 KiB">next ›</button>
        <button type="button" data-log="last" title="End of the log">last »</button>
        <label class="follow"><input type="checkbox" data-log="follow"> follow</label>
        <a class="raw" target="_blank" rel="noopener">raw</a>
      </div>
      <pre class="log" tabindex="0"></pre>`;
    this.title = el.querySelector('.log-title');
    this.range = el.querySelector('.log-range');
    this.pre = el.querySelector('pre.log');
    this.raw = el.querySelector('a.raw');
    this.followBox = el.querySelector('input[data-log="follow"]');
    el.addEventListener('click', (ev) => {
      const b = ev.target.closest('button[data-log]');
      if (b) this.nav(b.dataset.log);
    });
    this.followBox.addEventListener('change', () => this.setFollow(this.followBox.checked));
    // Without live events, a followed log is polled.
    ctx.every(1000, () => { if (this.follow && !this.complete && !liveOpen()) this.grow(null); });
  }

  /** Shows the log of `step` (a step of `/api/v2/builds/{id}`), or says it has none. */
  async show(step) {
    this.id = step && step.log_id != null ? step.log_id : null;
    this.follow = false; // until the log's state is known
    this.start = this.end = this.size = 0;
    this.pre.replaceChildren();
    this.chunks = [];
    this.el.dataset.log = this.id ?? '';
    if (this.id == null) {
      this.title.textContent = step ? `${step.name}: no log${step.state === 'pending' ? ' yet' : ''}` : 'No step selected';
      this.range.textContent = '';
      this.raw.removeAttribute('href');
      this.setButtons();
      return;
    }
    this.title.innerHTML = `<b>${esc(step.name)}</b>`;
    this.raw.href = `/api/v2/logs/${this.id}/raw`;
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
    // A running step is followed; a finished one opens at its end (where failures are).
    this.follow = !this.complete;
    this.followBox.checked = this.follow;
    await this.loadTail();
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

  /** Shows bytes `[start, start + PAGE)`. */
  async load(start) {
    const id = this.id;
    try {
      const r = await logRange(id, start, start + PAGE, this.ctx.signal);
      if (id !== this.id) return;
      this.size = Math.max(this.size, r.size);
      this.replace(r);
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
      const r = await logTail(id, PAGE, this.ctx.signal);
      if (id !== this.id) return;
      this.size = Math.max(this.size, r.size);
      this.replace(r);
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
        const r = await logRange(id, this.end, this.end + PAGE, this.ctx.signal);
        if (id !== this.id || !this.follow) return;
        this.size = Math.max(this.size, r.size);
        if (!r.bytes.length) break; // nothing new on disk yet: the next event or poll asks again
        const atBottom = this.pre.scrollTop + this.pre.clientHeight >= this.pre.scrollHeight - 24;
        const node = document.createTextNode(this.decoder.decode(r.bytes, { stream: true }).replace(ANSI, ''));
        this.pre.append(node);
        this.chunks.push({ node, n: r.end - r.start });
        this.end = r.end;
        this.trim();
        if (atBottom) this.pre.scrollTop = this.pre.scrollHeight;
        this.setButtons();
      } while (this.again || this.end < this.size);
    } catch (e) {
      if (e.name !== 'AbortError') console.warn('rbb: log tail failed', e);
    } finally {
      this.busy = false;
      this.setButtons();
    }
  }

  /** Replaces the text shown with the window `r` (a `logRange`/`logTail` answer). */
  replace(r) {
    this.decoder = new TextDecoder('utf-8');
    this.start = r.start;
    this.end = r.end;
    const skip = skipPartial(r.bytes, r.start);
    const node = document.createTextNode(this.decoder.decode(r.bytes.subarray(skip), { stream: true }).replace(ANSI, ''));
    this.pre.replaceChildren(node);
    this.chunks = [{ node, n: r.end - r.start }];
  }

  /** Keeps at most about `KEEP` bytes in the page while following a long log. */
  trim() {
    while (this.end - this.start > KEEP && this.chunks.length > 1) {
      const { node, n } = this.chunks.shift();
      node.remove();
      this.start += n;
    }
  }

  setButtons() {
    const has = this.id != null;
    const q = (n) => this.el.querySelector(`button[data-log="${n}"]`);
    q('first').disabled = !has || this.start === 0;
    q('prev').disabled = !has || this.start === 0;
    q('next').disabled = !has || this.end >= this.size;
    q('last').disabled = !has || (this.end >= this.size && this.follow);
    this.followBox.disabled = !has;
    this.range.textContent = has
      ? `${fmtBytes(this.start)}–${fmtBytes(this.end)} of ${fmtBytes(this.size)}${this.complete ? '' : ' (growing)'}`
      : '';
    this.el.dataset.complete = String(this.complete);
  }
}
