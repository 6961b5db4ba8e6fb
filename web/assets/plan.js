// The plan page: the compiled DAG (`/api/v2/plan`) drawn as SVG by a small layered layout —
// layers by longest path from the builders that need nothing (left to right), one band and
// cluster rectangle per repository, node order within a layer by barycentre of neighbours,
// arrows for `needs`. Nodes are coloured by their builder's last build.

import { enc, get } from './api.js';
import { errorBox, esc, statusClass } from './view.js';

export const name = 'plan';

const NODE_W = 190, NODE_H = 26, GAP_X = 70, GAP_Y = 10, PAD = 16, CLUSTER_PAD = 10, TITLE_H = 20;
const CHAR_W = 7; // average advance of the 12px UI font, for clipping labels

/** Longest-path layer of every builder (0 = needs nothing). A cycle (never in a valid plan) is cut. */
export function layers(builders) {
  const byId = new Map(builders.map((b) => [b.id, b]));
  const layer = new Map();
  const visiting = new Set();
  const visit = (id) => {
    if (layer.has(id)) return layer.get(id);
    if (visiting.has(id)) return 0;
    visiting.add(id);
    let l = 0;
    for (const n of byId.get(id).needs || []) if (byId.has(n)) l = Math.max(l, visit(n) + 1);
    visiting.delete(id);
    layer.set(id, l);
    return l;
  };
  for (const b of builders) visit(b.id);
  return layer;
}

/**
 * Positions of every node (`{x, y}` of its top-left corner), the cluster rectangle of every
 * repository and the edges, for `plan` (`/api/v2/plan`'s shape).
 */
export function layout(plan) {
  const builders = plan.builders || [];
  const layer = layers(builders);
  const byId = new Map(builders.map((b) => [b.id, b]));
  const repoNames = (plan.repos || []).map((r) => r.name);
  for (const b of builders) if (!repoNames.includes(b.repo)) repoNames.push(b.repo);
  const succ = new Map(builders.map((b) => [b.id, []]));
  const edges = [];
  for (const b of builders) {
    for (const n of b.needs || []) {
      if (!byId.has(n)) continue;
      succ.get(n).push(b.id);
      edges.push({ from: n, to: b.id });
    }
  }
  // cols[repo][layer] = ids in order
  const cols = new Map(repoNames.map((r) => [r, []]));
  for (const b of [...builders].sort((a, c) => a.id.localeCompare(c.id))) {
    const perLayer = cols.get(b.repo);
    const l = layer.get(b.id);
    (perLayer[l] || (perLayer[l] = [])).push(b.id);
  }
  // Bands: a repository's rows are as many as its widest layer.
  const bandTop = new Map();
  let y = PAD;
  const rowsOf = (r) => Math.max(1, ...cols.get(r).map((ids) => (ids ? ids.length : 0)));
  for (const r of repoNames) {
    bandTop.set(r, y);
    y += TITLE_H + CLUSTER_PAD * 2 + rowsOf(r) * (NODE_H + GAP_Y) - GAP_Y + GAP_Y * 2;
  }
  const height = y + PAD;
  const pos = new Map();
  const place = () => {
    for (const r of repoNames) {
      cols.get(r).forEach((ids, l) => {
        (ids || []).forEach((id, i) => {
          pos.set(id, { x: PAD + CLUSTER_PAD + l * (NODE_W + GAP_X), y: bandTop.get(r) + TITLE_H + CLUSTER_PAD + i * (NODE_H + GAP_Y) });
        });
      });
    }
  };
  place();
  // Barycentre sweeps: order each layer by the mean height of its neighbours, both ways.
  const maxLayer = Math.max(0, ...layer.values());
  const sweep = (neighbours, from, to, step) => {
    for (let l = from; l !== to; l += step) {
      for (const r of repoNames) {
        const ids = cols.get(r)[l];
        if (!ids || ids.length < 2) continue;
        const key = new Map(ids.map((id, i) => {
          const ns = neighbours(id).filter((n) => pos.has(n));
          return [id, ns.length ? ns.reduce((s, n) => s + pos.get(n).y, 0) / ns.length : pos.get(id).y + i * 1e-3];
        }));
        ids.sort((a, c) => key.get(a) - key.get(c));
      }
      place();
    }
  };
  for (let it = 0; it < 2; it++) {
    sweep((id) => byId.get(id).needs || [], 1, maxLayer + 1, 1);
    sweep((id) => succ.get(id), maxLayer - 1, -1, -1);
  }
  const clusters = repoNames.map((r) => {
    const ls = cols.get(r).map((ids, l) => (ids && ids.length ? l : null)).filter((l) => l !== null);
    const lo = ls.length ? Math.min(...ls) : 0, hi = ls.length ? Math.max(...ls) : 0;
    return {
      repo: r,
      x: PAD + lo * (NODE_W + GAP_X),
      y: bandTop.get(r),
      w: (hi - lo) * (NODE_W + GAP_X) + NODE_W + CLUSTER_PAD * 2,
      h: TITLE_H + CLUSTER_PAD * 2 + rowsOf(r) * (NODE_H + GAP_Y) - GAP_Y,
      empty: !ls.length,
    };
  });
  const width = PAD * 2 + CLUSTER_PAD * 2 + (maxLayer + 1) * (NODE_W + GAP_X) - GAP_X;
  return { pos, clusters, edges, width, height, layer };
}

function label(b) {
  const text = b.id.startsWith(b.repo + '/') ? b.id.slice(b.repo.length + 1) : b.id;
  const max = Math.floor((NODE_W - 12) / CHAR_W);
  return text.length > max ? text.slice(0, max - 1) + '…' : text;
}

/** The SVG markup of the plan's DAG; `last` maps builder id → its last build (for colour). */
export function planSvg(plan, last) {
  const { pos, clusters, edges, width, height } = layout(plan);
  const out = [`<svg xmlns="http://www.w3.org/2000/svg" class="dag" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">`];
  out.push('<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>');
  for (const c of clusters) {
    if (c.empty) continue;
    out.push(`<g class="cluster"><rect x="${c.x}" y="${c.y}" width="${c.w}" height="${c.h}" rx="6"/><text x="${c.x + 8}" y="${c.y + 15}">${esc(c.repo)}</text></g>`);
  }
  for (const e of edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x - 2, y2 = b.y + NODE_H / 2;
    const dx = Math.max(30, (x2 - x1) / 2);
    out.push(`<path class="edge" data-a="${esc(e.from)}" data-b="${esc(e.to)}" d="M${x1},${y1} C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2},${y2}" marker-end="url(#arrow)"/>`);
  }
  for (const b of plan.builders || []) {
    const p = pos.get(b.id);
    const lb = last.get(b.id);
    out.push(`<a href="#/builders/${esc(enc(b.id))}" class="node ${statusClass(lb)}" data-id="${esc(b.id)}"><title>${esc(b.id)}${(b.needs || []).length ? '\nneeds ' + esc(b.needs.join(', ')) : ''}${lb ? '\nlast build ' + lb.id + ': ' + esc(lb.result || lb.state) : ''}</title><rect x="${p.x}" y="${p.y}" width="${NODE_W}" height="${NODE_H}" rx="4"/><text x="${p.x + 8}" y="${p.y + 17}">${esc(label(b))}</text></a>`);
  }
  out.push('</svg>');
  return out.join('');
}

export function mount(view, { ctx }) {
  view.innerHTML = `<div class="page-head"><h1>Plan</h1><span class="spacer"></span><span id="plan-info" class="muted"></span></div>
    <div id="plan-box" class="panel plan-box"><p class="muted">Loading the plan…</p></div>`;
  const box = view.querySelector('#plan-box');
  const info = view.querySelector('#plan-info');
  (async () => {
    try {
      const [plan, builders] = await Promise.all([
        get('/api/v2/plan', ctx.signal),
        get('/api/v2/builders', ctx.signal).catch(() => ({ builders: [] })),
      ]);
      if (!ctx.alive) return;
      const last = new Map((builders.builders || []).filter((b) => b.last_build).map((b) => [b.id, b.last_build]));
      const n = (plan.builders || []).length;
      const edges = (plan.builders || []).reduce((s, b) => s + (b.needs || []).length, 0);
      info.innerHTML = `${(plan.repos || []).length} repositories · ${n} builders · ${edges} needs · <code title="${esc(plan.hash)}">${esc(String(plan.hash || '').slice(0, 19))}</code>`;
      if (!n) { box.innerHTML = '<p class="muted">The plan has no builders.</p>'; return; }
      box.innerHTML = planSvg(plan, last);
    } catch (e) {
      if (e.name !== 'AbortError') box.innerHTML = errorBox(e);
    }
  })();
  // Highlight a node's needs and dependents while hovered (one delegated listener).
  box.addEventListener('mouseover', (ev) => {
    const node = ev.target.closest('a.node');
    for (const e of box.querySelectorAll('path.edge.hl')) e.classList.remove('hl');
    if (!node) return;
    const id = node.dataset.id;
    for (const e of box.querySelectorAll('path.edge')) if (e.dataset.a === id || e.dataset.b === id) e.classList.add('hl');
  });
  return null;
}
