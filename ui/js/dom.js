// Small helpers shared by the views: element builders, formatting, task-state styling.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** An HTML element: h("a", {href: "#"}, "text", child...). */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element, same call shape as h(). */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export const STATES = {
  pending: { color: "#8a94a6", icon: "○", label: "pending" },
  queued: { color: "#5b7db1", icon: "◔", label: "queued" },
  running: { color: "#1f6feb", icon: "▶", label: "running" },
  succeeded: { color: "#1a7f37", icon: "✓", label: "succeeded" },
  failed: { color: "#cf222e", icon: "✕", label: "failed" },
  up_for_retry: { color: "#d97706", icon: "↻", label: "up for retry" },
  skipped: { color: "#a0a7b4", icon: "»", label: "skipped" },
  upstream_failed: { color: "#9a3412", icon: "⚠", label: "upstream failed" },
  cancelled: { color: "#7c5e8a", icon: "⊘", label: "cancelled" },
  starting: { color: "#5b7db1", icon: "◔", label: "starting" },
  ready: { color: "#1a7f37", icon: "✓", label: "ready" },
  draining: { color: "#d97706", icon: "↘", label: "draining" },
  stopped: { color: "#8a94a6", icon: "■", label: "stopped" },
  creating: { color: "#5b7db1", icon: "◔", label: "creating" },
  degraded: { color: "#d97706", icon: "⚠", label: "degraded" },
  deleting: { color: "#7c5e8a", icon: "↘", label: "deleting" },
  deleted: { color: "#8a94a6", icon: "■", label: "deleted" },
};

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function stateOf(state) {
  return STATES[state] || { color: "#8a94a6", icon: "?", label: state };
}

/** A coloured state badge with its icon. */
export function badge(state) {
  const st = stateOf(state);
  return h("span", { class: `badge state-${state}`, style: `--c:${st.color}`, "data-state": state },
    h("span", { class: "icon", "aria-hidden": "true" }, st.icon), st.label);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} m ${Math.round(seconds % 60)} s`;
  const hrs = Math.floor(m / 60);
  if (hrs < 48) return `${hrs} h ${m % 60} m`;
  return `${Math.floor(hrs / 24)} d ${hrs % 24} h`;
}

export function since(iso, now = Date.now()) {
  if (!iso) return "—";
  const s = Math.max(0, (now - Date.parse(iso)) / 1000);
  if (s < 5) return "just now";
  return `${duration(s).replace(/ \d+ (s|m|h)$/, "")} ago`;
}

export function elapsed(start, end) {
  if (!start) return null;
  return ((end ? Date.parse(end) : Date.now()) - Date.parse(start)) / 1000;
}

export function time(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

export function shortId(id) {
  return id.length > 16 ? `${id.slice(0, 4)}…${id.slice(-8)}` : id;
}

export function json(value) {
  return JSON.stringify(value, null, 2);
}

/** Replace el's children. */
export function mount(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

export function errorBox(err) {
  return h("div", { class: "error-box", role: "alert" }, err instanceof Error ? err.message : String(err));
}

const LONG_TEXT = 300;
const expanded = new Set(); // keys of the long texts the reader opened: a refresh redraws them open

/** An error message. A long one shows its start and expands to the whole text, wrapped (a
 * traceback or a 2,000-character message must be readable, not cut at the box's edge); key
 * names the block across refreshes. */
export function errorText(text, { key = text, ...attrs } = {}) {
  if (text.length <= LONG_TEXT) return h("div", { class: "error-box", ...attrs }, text);
  const block = h("details", {
    class: "error-box long", ...attrs, open: expanded.has(key),
    ontoggle: () => (block.open ? expanded.add(key) : expanded.delete(key)),
  },
  h("summary", {}, h("span", { class: "preview" }, `${text.slice(0, LONG_TEXT)}…`),
    h("span", { class: "more" }, ` show all ${text.length.toLocaleString()} characters`),
    h("span", { class: "less" }, "show less")),
  h("div", { class: "full" }, text));
  return block;
}
