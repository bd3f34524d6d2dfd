// Line charts as SVG: several series over a shared x axis (time or step), gaps where a
// value is null.

import { h, s } from "../dom.js";

/** About n round tick values covering [lo, hi]. */
export function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((v) => v >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

const W = 440;
const H = 190;
const M = { l: 54, r: 14, t: 10, b: 24 };

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/**
 * series: [{name, color, points: [[x, y|null], ...]}]; x is unix seconds when time is true.
 * format(y) labels the y axis.
 */
export function lineChart({ id, title, series, format = (v) => String(v), time = true, empty = "No data yet." }) {
  const xs = series.flatMap((sr) => sr.points.map((p) => p[0]));
  const ys = series.flatMap((sr) => sr.points.map((p) => p[1]).filter((v) => v !== null && Number.isFinite(v)));
  const figure = h("figure", { class: "chart card", id, "data-points": ys.length });
  figure.append(h("figcaption", {}, title,
    h("span", { class: "legend" }, series.map((sr) =>
      h("span", { class: "key" }, h("i", { style: `background:${sr.color}` }), sr.name)))));
  if (!ys.length) {
    figure.append(h("p", { class: "muted chart-empty" }, empty));
    return figure;
  }
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  if (x1 === x0) [x0, x1] = [x0 - 1, x1 + 1];
  const yMax = Math.max(...ys, 0) * 1.1 || 1;
  const yMin = Math.min(0, ...ys);
  const px = (x) => M.l + ((x - x0) / (x1 - x0)) * (W - M.l - M.r);
  const py = (y) => H - M.b - ((y - yMin) / (yMax - yMin)) * (H - M.t - M.b);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": title });
  for (const v of niceTicks(yMin, yMax, 4)) {
    svg.append(s("line", { class: "grid", x1: M.l, x2: W - M.r, y1: py(v), y2: py(v) }),
      s("text", { class: "tick", x: M.l - 6, y: py(v) + 4, "text-anchor": "end" }, format(v)));
  }
  for (const v of niceTicks(x0, x1, 5)) {
    svg.append(s("text", { class: "tick", x: px(v), y: H - 8, "text-anchor": "middle" }, time ? clock(v) : String(v)));
  }
  svg.append(s("line", { class: "axis", x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }));
  for (const sr of series) {
    let d = "";
    let pen = false;
    for (const [x, y] of sr.points) {
      if (y === null || !Number.isFinite(y)) {
        pen = false;
        continue;
      }
      d += `${pen ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)} `;
      pen = true;
    }
    svg.append(s("path", { class: "line", d, stroke: sr.color, "data-series": sr.name }));
    const last = [...sr.points].reverse().find((p) => p[1] !== null && Number.isFinite(p[1]));
    if (last) svg.append(s("circle", { cx: px(last[0]), cy: py(last[1]), r: 3, fill: sr.color },
      s("title", {}, `${sr.name}: ${format(last[1])}`)));
  }
  figure.append(svg);
  return figure;
}

export const ms = (v) => `${(v * 1000).toFixed(v < 0.01 ? 1 : 0)} ms`;
export const num = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2));
export const pct = (v) => `${Number((v * 100).toPrecision(2))}%`;
