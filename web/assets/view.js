// Building blocks every page renders with: HTML escaping, result badges, times and durations.
// Pure functions of their arguments; no fetching, no DOM state.

const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

/** Escapes text for HTML content and attribute values. */
export function esc(s) {
  return String(s ?? '').replace(/[&<>"']/g, (c) => ESC[c]);
}

/** The CSS class of a build or step: its result once finished, else its state. */
export function statusClass(x) {
  if (!x) return 'none';
  if (x.state === 'finished' && x.result) return 'r-' + x.result;
  return 's-' + (x.state || 'pending');
}

/** The text of a status badge. */
export function statusText(x) {
  if (!x) return '';
  if (x.state === 'finished') return x.result || 'finished';
  return x.state || 'pending';
}

export function badge(x) {
  return `<span class="badge ${statusClass(x)}">${esc(statusText(x))}</span>`;
}

export function short(commit) {
  return String(commit || '').slice(0, 8);
}

export function firstLine(s) {
  return String(s || '').split('\n', 1)[0];
}

/** `1h 02m`, `3m 04s`, `5.2s`, `120ms`. */
export function duration(ms) {
  if (ms == null || !Number.isFinite(ms) || ms < 0) return '';
  if (ms < 1000) return Math.round(ms) + 'ms';
  const s = ms / 1000;
  if (s < 60) return s.toFixed(1) + 's';
  const m = Math.floor(s / 60), rs = Math.floor(s % 60);
  if (m < 60) return `${m}m ${String(rs).padStart(2, '0')}s`;
  const h = Math.floor(m / 60);
  return `${h}h ${String(m % 60).padStart(2, '0')}m`;
}

/** Duration from `start` to `end` (unix ms), or to now while it runs. */
export function span(start, end) {
  if (!start) return '';
  return duration((end || Date.now()) - start);
}

/** Local date and time of a unix-ms instant. */
export function when(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** `5s ago`, `3m ago`, `2h ago`, `4d ago`. */
export function ago(ms) {
  if (!ms) return 'never';
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return Math.floor(s) + 's ago';
  if (s < 3600) return Math.floor(s / 60) + 'm ago';
  if (s < 86400) return Math.floor(s / 3600) + 'h ago';
  return Math.floor(s / 86400) + 'd ago';
}

/** `12.3 MiB`. */
export function bytes(n) {
  if (!Number.isFinite(n)) return '';
  if (n < 1024) return n + ' B';
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n, i = -1;
  do { v /= 1024; i++; } while (v >= 1024 && i < units.length - 1);
  return v.toFixed(v < 10 ? 1 : 0) + ' ' + units[i];
}

export function errorBox(e) {
  return `<div class="error">${esc(e && e.message ? e.message : String(e))}</div>`;
}

/** A list of small chips (labels, tags). */
export function chips(list, cls = '') {
  return (list || []).map((t) => `<span class="chip ${cls}">${esc(t)}</span>`).join('');
}
