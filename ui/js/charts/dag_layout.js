// Where a job's DAG is drawn: tasks in columns by topological depth (left to right), each
// column ordered by the mean row of its tasks' upstream tasks.
//
// Big jobs draw groups, not every task. A minimap or zoom would still draw 5,000 boxes and
// 7,500 curves (about 45,000 SVG elements, seconds of layout on every live refresh), and a
// level of 2,499 siblings is 170,000 px tall: zoomed out to fit, its boxes are a smear. What
// such a level says is how many tasks it has and in which states, so it becomes one group
// box with its count and a bar of its states, and the levels and how they connect stay in
// view; the task table (paged, searchable; a group's click narrows it to the group) is where
// one task is found.

/** A level with more tasks than this is drawn as one group. */
export const MAX_ROWS = 24;
/** More single boxes than this (many narrow levels: long chains) and every column is a group, */
export const MAX_NODES = 300;
/** consecutive levels sharing a column so that there are at most this many. */
export const MAX_COLUMNS = 20;

/** Each task's depth: 0 for a root, else one more than its deepest upstream task (iterative:
 * a chain of 5,000 would overflow a recursive walk). */
function depths(tasks) {
  const known = new Set(tasks.map((t) => t.name));
  const down = new Map(tasks.map((t) => [t.name, []]));
  const waiting = new Map();
  for (const t of tasks) {
    const ups = [...new Set(t.depends_on)].filter((u) => known.has(u));
    waiting.set(t.name, ups.length);
    for (const u of ups) down.get(u).push(t.name);
  }
  const depth = new Map();
  const queue = tasks.filter((t) => waiting.get(t.name) === 0).map((t) => t.name);
  for (const n of queue) depth.set(n, 0);
  for (let i = 0; i < queue.length; i++) {
    const n = queue[i];
    for (const d of down.get(n)) {
      depth.set(d, Math.max(depth.get(d) ?? 0, depth.get(n) + 1));
      waiting.set(d, waiting.get(d) - 1);
      if (waiting.get(d) === 0) queue.push(d);
    }
  }
  return depth; // a task on a cycle (the store refuses one) has none: depth 0 below
}

/** Levels as columns: [{from, to, names, group}], one level each unless banded. */
function columns(tasks) {
  const depth = depths(tasks);
  const levels = [];
  for (const t of tasks) (levels[depth.get(t.name) ?? 0] ||= []).push(t.name);
  const single = levels.filter((l) => l.length <= MAX_ROWS).reduce((a, l) => a + l.length, 0);
  if (single <= MAX_NODES) {
    return levels.map((names, d) => ({ from: d, to: d, names, group: names.length > MAX_ROWS }));
  }
  const band = Math.ceil(levels.length / MAX_COLUMNS);
  const cols = [];
  for (let d = 0; d < levels.length; d += band) {
    const to = Math.min(levels.length, d + band) - 1;
    cols.push({ from: d, to, names: levels.slice(d, to + 1).flat(), group: true });
  }
  return cols;
}

/** The drawing's shape for tasks ({name, depends_on}): {units, unitOf, edges, width, height}.
 * A unit is a task ({kind: "task", name}) or a group ({kind: "group", names, from, to}), with
 * its x, y; edges join units ([from, to], one per pair). A job's DAG never changes, so the
 * shape is computed once and drawn with each refresh's states. */
export function layout(tasks, box) {
  const byName = new Map(tasks.map((t) => [t.name, t]));
  const unitOf = new Map();
  const row = new Map();
  const cols = columns(tasks).map((col, c) => {
    if (col.group) {
      const unit = { kind: "group", key: `g${c}`, names: col.names, from: col.from, to: col.to };
      for (const n of col.names) unitOf.set(n, unit);
      row.set(unit, 0);
      return [unit];
    }
    const order = new Map(col.names.map((n, i) => [n, i]));
    const center = new Map(col.names.map((n) => {
      const ups = byName.get(n).depends_on.filter((u) => unitOf.has(u)).map((u) => row.get(unitOf.get(u)));
      return [n, ups.length ? ups.reduce((a, b) => a + b, 0) / ups.length : order.get(n)];
    }));
    const names = [...col.names].sort((a, b) => center.get(a) - center.get(b) || order.get(a) - order.get(b));
    return names.map((name, i) => {
      const unit = { kind: "task", key: `t:${name}`, name };
      unitOf.set(name, unit);
      row.set(unit, i);
      return unit;
    });
  });
  const { w, h, gapX, gapY, pad } = box;
  const tallest = Math.max(1, ...cols.map((c) => c.length));
  const height = pad * 2 + tallest * h + (tallest - 1) * gapY;
  cols.forEach((units, c) => {
    const top = (height - (units.length * h + (units.length - 1) * gapY)) / 2;
    units.forEach((u, i) => Object.assign(u, { x: pad + c * (w + gapX), y: top + i * (h + gapY) }));
  });
  const edges = new Map();
  for (const t of tasks) {
    const to = unitOf.get(t.name);
    for (const up of t.depends_on) {
      const from = unitOf.get(up);
      if (from && from !== to) edges.set(`${from.key}>${to.key}`, [from, to]);
    }
  }
  return {
    units: cols.flat(), unitOf, edges: [...edges.values()], height,
    width: pad * 2 + cols.length * w + Math.max(0, cols.length - 1) * gapX,
  };
}
