// Task runs on a time axis: one row per task, one bar per attempt (started_at..finished_at).

import { duration, h, s, stateOf } from "../dom.js";
import { niceTicks } from "./line.js";

const ROW = 22;
const LABEL = 150;
const WIDTH = 1200;
const AXIS = 22;

export function ganttSvg(tasks, now = Date.now()) {
  const rows = tasks.filter((t) => t.attempts.length);
  if (!rows.length) return h("p", { class: "muted", id: "gantt-empty" }, "No task has started yet.");
  const t = (iso) => (iso ? Date.parse(iso) : now);
  const start = Math.min(...rows.flatMap((r) => r.attempts.map((a) => t(a.started_at))));
  const end = Math.max(start + 1000, ...rows.flatMap((r) => r.attempts.map((a) => t(a.finished_at))));
  const span = (end - start) / 1000;
  const plot = WIDTH - LABEL - 16;
  const x = (ms) => LABEL + ((ms - start) / (end - start)) * plot;
  const height = AXIS + rows.length * ROW + 6;
  const svg = s("svg", { class: "gantt", id: "gantt", viewBox: `0 0 ${WIDTH} ${height}`, width: "100%",
    role: "img", "aria-label": "Task timeline" });
  for (const tick of niceTicks(0, span, 6)) {
    const tx = LABEL + (tick / span) * plot;
    svg.append(s("line", { class: "grid", x1: tx, x2: tx, y1: AXIS - 4, y2: height }),
      s("text", { class: "tick", x: tx, y: 12, "text-anchor": "middle" }, `+${duration(tick)}`));
  }
  rows.forEach((task, i) => {
    const y = AXIS + i * ROW;
    svg.append(s("text", { class: "label", x: LABEL - 8, y: y + 15, "text-anchor": "end" }, task.name));
    for (const a of task.attempts) {
      const x1 = x(t(a.started_at));
      const w = Math.max(2, x(t(a.finished_at)) - x1);
      const st = stateOf(a.state);
      svg.append(s("rect", { class: `bar state-${a.state}`, x: x1, y: y + 4, width: w, height: ROW - 8, rx: 3,
        fill: st.color, "data-task": task.name, "data-attempt": a.attempt },
      s("title", {}, `${task.name} attempt ${a.attempt}: ${st.label}, ${duration(a.duration_s ?? (now - t(a.started_at)) / 1000)}`)));
    }
  });
  return svg;
}
