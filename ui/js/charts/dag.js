// A job's DAG as SVG, on the shape dag_layout.js computes: a box per task (or per group of a
// big level, with its count and a bar of its tasks' states), edges as curves.

import { duration, elapsed, s, stateOf } from "../dom.js";
import { layout } from "./dag_layout.js";

const BOX = { w: 176, h: 50, gapX: 64, gapY: 18, pad: 12 };
const { w: W, h: H } = BOX;
/** A group's colour: the first of these states any of its tasks is in. */
const GROUP_STATE = ["failed", "upstream_failed", "up_for_retry", "running", "queued", "cancelled", "pending"];

/** The shape to draw tasks on; compute it once per job (a job's DAG never changes). */
export function dagShape(tasks) {
  return layout(tasks, BOX);
}

function clip(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

function taskNode(t, { onSelect, selected }) {
  const st = stateOf(t.state);
  const secs = t.duration_s ?? (t.state === "running" ? elapsed(t.started_at) : null);
  const sub = [`try ${t.attempt}/${t.max_attempts}`, secs !== null ? duration(secs) : st.label].join(" · ");
  const node = s("g", {
    class: `node state-${t.state}${selected === t.name ? " selected" : ""}`,
    "data-task": t.name, "data-state": t.state, tabindex: 0, role: "button", style: `--c:${st.color}`,
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
  return node;
}

function groupNode(unit, byName, { onGroup, selected }) {
  const counts = {};
  for (const n of unit.names) {
    const state = byName.get(n).state;
    counts[state] = (counts[state] || 0) + 1;
  }
  const total = unit.names.length;
  const state = GROUP_STATE.find((st) => counts[st]) || (counts.succeeded ? "succeeded" : "skipped");
  const levels = unit.from === unit.to ? `level ${unit.from + 1}` : `levels ${unit.from + 1}–${unit.to + 1}`;
  const tally = Object.entries(counts).map(([st, n]) => `${n} ${stateOf(st).label}`).join(", ");
  const node = s("g", {
    class: `group state-${state}${unit.names.includes(selected) ? " selected" : ""}`,
    "data-group": unit.key, "data-count": total, "data-state": state, tabindex: 0, role: "button",
    style: `--c:${stateOf(state).color}`,
  },
  s("title", {}, `${total} tasks (${levels}): ${tally}. Click to list them.`),
  s("rect", { class: "stack", x: 5, y: 5, width: W, height: H, rx: 8 }), // a pile of boxes
  s("rect", { class: "box", width: W, height: H, rx: 8 }),
  s("text", { class: "name", x: 12, y: 18 }, `${total.toLocaleString()} tasks`),
  s("text", { class: "sub", x: W - 10, y: 18, "text-anchor": "end" }, levels),
  s("text", { class: "sub", x: 12, y: 33 }, clip(`${unit.names[0]} … ${unit.names.at(-1)}`, 27)));
  let x = 12;
  for (const [st, n] of Object.entries(counts)) {
    const width = ((W - 24) * n) / total;
    node.append(s("rect", { class: "tally", x, y: 39, width, height: 5, fill: stateOf(st).color, "data-state": st, "data-count": n }));
    x += width;
  }
  if (onGroup) {
    node.addEventListener("click", () => onGroup(unit));
    node.addEventListener("keydown", (e) => e.key === "Enter" && onGroup(unit));
  }
  return node;
}

/** The graph of tasks on shape (dagShape); onSelect(name) when a task is clicked, onGroup(unit)
 * when a group is; selected = the highlighted task. */
export function dagSvg(tasks, shape, { onSelect, onGroup, selected } = {}) {
  const { width, height } = shape;
  const byName = new Map(tasks.map((t) => [t.name, t]));
  const svg = s("svg", { class: "dag", id: "dag", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": "Task graph" });
  svg.append(s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
    markerHeight: 7, orient: "auto-start-reverse" }, s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#9aa3b2" }))));
  const edges = s("g", { class: "edges" });
  for (const [from, to] of shape.edges) {
    const x1 = from.x + W;
    const y1 = from.y + H / 2;
    const x2 = to.x - 2;
    const y2 = to.y + H / 2;
    const dx = (x2 - x1) / 2;
    const state = to.kind === "task" ? byName.get(to.name).state : "group";
    edges.append(s("path", { d: `M${x1},${y1} C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2},${y2}`,
      class: `edge edge-${state}`, "marker-end": "url(#arrow)" }));
  }
  svg.append(edges);
  for (const unit of shape.units) {
    const node = unit.kind === "task"
      ? taskNode(byName.get(unit.name), { onSelect, selected })
      : groupNode(unit, byName, { onGroup, selected });
    node.setAttribute("transform", `translate(${unit.x},${unit.y})`);
    svg.append(node);
  }
  return svg;
}
