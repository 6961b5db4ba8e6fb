// The one-line message under the header that confirms an action or explains why it failed.

let timer = null;

/** Shows `message` for a few seconds; `kind` is `info` or `error`. */
export function flash(message, kind = 'info') {
  const el = document.getElementById('flash');
  if (!el) return;
  el.textContent = message;
  el.className = 'flash ' + kind;
  el.hidden = false;
  clearTimeout(timer);
  timer = setTimeout(() => { el.hidden = true; }, kind === 'error' ? 10000 : 4000);
}
