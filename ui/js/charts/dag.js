// A job's DAG as SVG: layers by topological depth (left to right), nodes ordered within a
// layer by the mean position of their upstream tasks, edges as curves.

import { duration, elapsed, s, stateOf } from "../dom.js";

const W = 176;
const H = 50;
const GAP_X = 64;
const GAP_Y = 18;
const PAD = 12;

/** Place tasks ({name, depends_on}) in layers; returns {pos: name -> {x, y}, width, height}. */
export function layout(tasks) {
  const byName = new Map(tasks.map((t) => [t.name, t]));
  const depth = new Map();
  const depthOf = (name, seen = new Set()) => {
    if (depth.has(name)) return depth.get(name);
    if (seen.has(name)) return 0; // a cycle cannot be stored; stay safe anyway
    seen.add(name);
    const ups = (byName.get(name) || { depends_on: [] }).depends_on.filter((u) => byName.has(u));
    const d = ups.length ? 1 + Math.max(...ups.map((u) => depthOf(u, seen))) : 0;
    depth.set(name, d);
    return d;
  };
  const layers = [];
  tasks.forEach((t) => {
    const d = depthOf(t.name);
    (layers[d] = layers[d] || []).push(t.name);
  });
  const index = new Map();
  layers.forEach((layer, d) => {
    if (d > 0) {
      const order = new Map(layer.map((n, i) => [n, i]));
      const center = (n) => {
        const ups = byName.get(n).depends_on.filter((u) => index.has(u));
        return ups.length ? ups.reduce((a, u) => a + index.get(u), 0) / ups.length : order.get(n);
      };
      layer.sort((a, b) => center(a) - center(b) || order.get(a) - order.get(b));
    }
    layer.forEach((n, i) => index.set(n, i));
  });
  const tallest = Math.max(1, ...layers.map((l) => l.length));
  const height = PAD * 2 + tallest * H + (tallest - 1) * GAP_Y;
  const pos = new Map();
  layers.forEach((layer, d) => {
    const span = layer.length * H + (layer.length - 1) * GAP_Y;
    const top = (height - span) / 2;
    layer.forEach((n, i) => pos.set(n, { x: PAD + d * (W + GAP_X), y: top + i * (H + GAP_Y) }));
  });
  return { pos, width: PAD * 2 + layers.length * W + Math.max(0, layers.length - 1) * GAP_X, height };
}

function clip(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

/** The graph; onSelect(name) when a node is clicked; selected = the highlighted task. */
export function dagSvg(tasks, { onSelect, selected } = {}) {
  const { pos, width, height } = layout(tasks);
  const svg = s("svg", { class: "dag", id: "dag", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": "Task graph" });
  svg.append(s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
    markerHeight: 7, orient: "auto-start-reverse" }, s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#9aa3b2" }))));
  const edges = s("g", { class: "edges" });
  for (const t of tasks) {
    const to = pos.get(t.name);
    for (const up of t.depends_on) {
      const from = pos.get(up);
      if (!from) continue;
      const x1 = from.x + W;
      const y1 = from.y + H / 2;
      const x2 = to.x - 2;
      const y2 = to.y + H / 2;
      const dx = (x2 - x1) / 2;
      edges.append(s("path", { d: `M${x1},${y1} C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2},${y2}`,
        class: `edge edge-${t.state}`, "marker-end": "url(#arrow)" }));
    }
  }
  svg.append(edges);
  for (const t of tasks) {
    const { x, y } = pos.get(t.name);
    const st = stateOf(t.state);
    const secs = t.duration_s ?? (t.state === "running" ? elapsed(t.started_at) : null);
    const sub = [`try ${t.attempt}/${t.max_attempts}`, secs !== null ? duration(secs) : st.label].join(" · ");
    const node = s("g", {
      class: `node state-${t.state}${selected === t.name ? " selected" : ""}`,
      transform: `translate(${x},${y})`, "data-task": t.name, "data-state": t.state, tabindex: 0, role: "button",
      style: `--c:${st.color}`,
    },
    s("title", {}, `${t.name} (${t.operator}): ${st.label}, attempt ${t.attempt} of ${t.max_attempts}`),
    s("rect", { class: "box", width: W, height: H, rx: 8 }),
    s("rect", { class: "strip", width: 5, height: H, rx: 2 }),
    s("circle", { class: "dot", cx: 24, cy: H / 2, r: 11 }),
    s("text", { class: "icon", x: 24, y: H / 2 + 4.5, "text-anchor": "middle" }, st.icon),
    s("text", { class: "name", x: 42, y: 21 }, clip(t.name, 17)),
    s("text", { class: "sub", x: 42, y: 38 }, clip(sub, 22)));
    if (onSelect) {
      node.addEventListener("click", () => onSelect(t.name));
      node.addEventListener("keydown", (e) => e.key === "Enter" && onSelect(t.name));
    }
    svg.append(node);
  }
  return svg;
}
