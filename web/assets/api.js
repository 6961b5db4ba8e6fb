// The UI's only door to the master: the public REST API (`/api/v2`, same origin) and its
// Server-Sent Events stream. Pages never build URLs or parse errors themselves.

const TOKEN_KEY = 'rbb.token';

/** An error reply of the API (`{ "error": { "code", "message" } }`) or a network failure. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The token lives in sessionStorage: it goes with the tab, never to disk for good.
export function token() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch { return ''; }
}

export function setToken(value) {
  try {
    if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
  } catch { /* private mode: the token lives only as long as the page */ }
}

/** The request headers: JSON, and the bearer token when one is set. */
function headersWith(extra) {
  const headers = { Accept: 'application/json', ...extra };
  const t = token();
  if (t) headers.Authorization = 'Bearer ' + t;
  return headers;
}

/**
 * Who the master takes this page for (`GET /api/v2/whoami`): `{ name, role, authenticated,
 * anonymous }`, or `{ refused: message }` for a token it does not know.
 */
export async function whoami() {
  const resp = await fetch('/api/v2/whoami', { headers: headersWith() });
  if (resp.status === 401) return { refused: (await errorOf(resp)).message };
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

async function errorOf(resp) {
  let code = 'http_' + resp.status, message = resp.statusText || ('HTTP ' + resp.status);
  try {
    const body = await resp.json();
    if (body && body.error) { code = body.error.code || code; message = body.error.message || message; }
  } catch { /* not JSON */ }
  if (resp.status === 401) {
    message += ' — set the API token (top right).';
    dispatch('need-token', { message, needs: resp.headers.get('x-rbb-needs') });
  }
  return new ApiError(resp.status, code, message);
}

/** GET a JSON resource; `path` starts with `/api/v2/`. */
export async function get(path, signal) {
  let resp;
  try {
    resp = await fetch(path, { signal, headers: headersWith() });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'cannot reach the master: ' + e.message);
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

/** POST a control action with the bearer token (if one is set); returns the JSON reply or null. */
export async function post(path, body) {
  const headers = headersWith(body !== undefined ? { 'Content-Type': 'application/json' } : {});
  let resp;
  try {
    resp = await fetch(path, { method: 'POST', headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, 'network', 'cannot reach the master: ' + e.message);
  }
  if (!resp.ok) throw await errorOf(resp);
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

/**
 * Bytes `[start, end)` of a log (a `Range` request). Returns the text, the log's current size
 * (`x-rbb-log-size`) and the range actually served.
 */
export async function logRange(id, start, end, signal) {
  const headers = { Range: `bytes=${start}-${Math.max(start, end - 1)}` };
  return rawLog(id, headers, signal);
}

/** The last `n` bytes of a log. */
export async function logTail(id, n, signal) {
  return rawLog(id, { Range: `bytes=-${n}` }, signal);
}

async function rawLog(id, headers, signal) {
  let resp;
  try {
    resp = await fetch(`/api/v2/logs/${id}/raw`, { headers: headersWith(headers), signal });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'cannot reach the master: ' + e.message);
  }
  if (resp.status === 416) {
    const size = Number((resp.headers.get('content-range') || '').split('/')[1]) || 0;
    return { bytes: new Uint8Array(0), start: size, end: size, size };
  }
  if (!resp.ok) throw await errorOf(resp);
  const bytes = new Uint8Array(await resp.arrayBuffer());
  let size = Number(resp.headers.get('x-rbb-log-size'));
  let start = 0;
  const range = resp.headers.get('content-range');
  const m = range && /bytes (\d+)-(\d+)\/(\d+)/.exec(range);
  if (m) { start = Number(m[1]); if (!Number.isFinite(size)) size = Number(m[3]); }
  if (!Number.isFinite(size)) size = start + bytes.length;
  return { bytes, start, end: start + bytes.length, size };
}

/** Percent-encodes a builder id (`repo/name[axis=v]`) for one path segment. */
export function enc(id) {
  return encodeURIComponent(id);
}

// ---- live events ----------------------------------------------------------------------

const handlers = new Map(); // type -> Set<fn>
let source = null;
let pollTimer = null;
let everOpen = false;
const POLL_MS = 5000;

function setLiveState(state, text) {
  const el = document.getElementById('live');
  if (!el) return;
  el.dataset.state = state;
  el.textContent = text;
}

function dispatch(type, data) {
  const set = handlers.get(type);
  if (!set) return;
  for (const fn of [...set]) {
    try { fn(data); } catch (e) { console.error('rbb: event handler failed', e); }
  }
}

/**
 * Subscribes `fn` to live events of `type` (`build`, `step`, `log`, `worker`) or to `resync`
 * (events may have been missed: refresh everything shown). Returns the unsubscribe function.
 */
export function on(type, fn) {
  if (!handlers.has(type)) handlers.set(type, new Set());
  handlers.get(type).add(fn);
  return () => handlers.get(type).delete(fn);
}

/** Whether live events are flowing (else pages are refreshed by polling). */
export function liveOpen() {
  return !!source && source.readyState === EventSource.OPEN;
}

/**
 * Opens the one EventSource of the page. If the stream cannot be opened at all, falls back to
 * a `resync` every few seconds so pages stay roughly current.
 */
export function startLive() {
  if (source || typeof EventSource === 'undefined') return;
  source = new EventSource('/api/v2/events');
  for (const type of ['build', 'step', 'log', 'worker']) {
    source.addEventListener(type, (ev) => {
      let data = null;
      try { data = JSON.parse(ev.data); } catch { return; }
      dispatch(type, data);
    });
  }
  // The master could not keep up with this page: events were missed, so refresh everything.
  source.addEventListener('reset', () => dispatch('resync', null));
  source.onopen = () => {
    setLiveState('open', 'live');
    if (pollTimer) { clearInterval(pollTimer); pollTimer = null; }
    if (everOpen) dispatch('resync', null); // reconnected: events may have been missed
    everOpen = true;
  };
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      setLiveState('polling', 'polling');
      source = null;
      if (!pollTimer) pollTimer = setInterval(() => dispatch('resync', null), POLL_MS);
      // Try the stream again later: the master may have been restarted or upgraded.
      setTimeout(startLive, 30000);
    } else {
      setLiveState('connecting', 'reconnecting');
    }
  };
}

/**
 * Coalesces calls: `fn` runs at most once per `ms`, `ms` after the first call of a burst, with
 * every argument collected since (`fn(argsArray)`). `cancel()` drops a pending run.
 */
export function coalesce(fn, ms) {
  let timer = null;
  let pending = [];
  const call = (arg) => {
    pending.push(arg);
    if (timer) return;
    timer = setTimeout(() => {
      timer = null;
      const args = pending;
      pending = [];
      fn(args);
    }, ms);
  };
  call.cancel = () => { if (timer) clearTimeout(timer); timer = null; pending = []; };
  return call;
}
