// A job's tasks as a table, PAGE rows at a time, narrowed by a search (every word must match a
// task's name, operator or state), a state, or one group of the graph. It works on the tasks
// the page already holds: filtering 5,000 in the browser takes a few milliseconds.

import { badge, duration, elapsed, h, mount } from "../dom.js";

const PAGE = 50;

function matches(task, words) {
  const hay = `${task.name} ${task.operator} ${task.state}`.toLowerCase();
  return words.every((w) => hay.includes(w));
}

/** The table's element and its controls; onSelect(name) on a row's click, onChange() when the
 * rows shown change by the reader's hand (search, state, page, group). */
export function taskTable({ onSelect, onChange }) {
  let tasks = [];
  let selected = null;
  let page = 0;
  let only = null; // {label, names: Set}: a group of the graph
  let sig = "";
  const search = h("input", { type: "search", id: "task-search", placeholder: "Search name, operator or state",
    "aria-label": "Search tasks" });
  const stateSelect = h("select", { id: "task-state", "aria-label": "State" });
  const groupChip = h("span", { id: "task-group" });
  const tbody = h("tbody", { id: "tasks-body" });
  const pager = h("div", { class: "pager", id: "task-pager" });
  const el = h("div", { id: "tasks" },
    h("div", { class: "toolbar" }, search, stateSelect, groupChip),
    h("div", { class: "card flush" }, h("table", { class: "tasks" },
      h("thead", {}, h("tr", {}, ["Task", "Operator", "State", "Attempt", "Duration", "Result"].map((c) => h("th", {}, c)))),
      tbody)),
    pager);

  function filtered() {
    const words = search.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
    const state = stateSelect.value;
    return tasks.filter((t) => (!only || only.names.has(t.name)) && (!state || t.state === state) && matches(t, words));
  }

  let rows = [];
  function shown() {
    return rows.slice(page * PAGE, (page + 1) * PAGE);
  }

  function stateOptions() {
    const counts = {};
    for (const t of tasks) counts[t.state] = (counts[t.state] || 0) + 1;
    const next = JSON.stringify(counts);
    if (next === sig) return; // rebuilding would close an open dropdown
    sig = next;
    const value = stateSelect.value;
    mount(stateSelect, h("option", { value: "" }, `All states (${tasks.length})`),
      Object.entries(counts).map(([st, n]) => h("option", { value: st }, `${st} (${n})`)));
    stateSelect.value = counts[value] ? value : "";
  }

  function draw() {
    rows = filtered();
    page = Math.max(0, Math.min(page, Math.ceil(rows.length / PAGE) - 1));
    const page_ = shown();
    mount(tbody, page_.length ? page_.map((t) => h("tr", {
      class: `row-link${selected === t.name ? " selected" : ""}`, "data-task": t.name, onclick: () => onSelect(t.name),
    },
    h("td", {}, t.name), h("td", { class: "mono" }, t.operator), h("td", {}, badge(t.state)),
    h("td", {}, `${t.attempt}/${t.max_attempts}`),
    h("td", {}, duration(t.duration_s ?? (t.state === "running" ? elapsed(t.started_at) : null))),
    h("td", { class: "clip" }, t.error ? h("span", { class: "err" }, t.error) : t.output !== null ? JSON.stringify(t.output) : "—")))
      : h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No task matches.")));
    mount(groupChip, only ? h("button", { class: "chip on", id: "task-group-clear", title: "Show every task",
      onclick: () => change(() => { only = null; }) }, `${only.label} ×`) : null);
    const first = rows.length ? page * PAGE + 1 : 0;
    mount(pager,
      h("span", { id: "task-range" }, `${first}–${page * PAGE + page_.length} of ${rows.length}`),
      h("button", { class: "ghost", id: "task-prev", disabled: page === 0, onclick: () => change(() => { page -= 1; }) }, "‹ Previous"),
      h("button", { class: "ghost", id: "task-next", disabled: (page + 1) * PAGE >= rows.length,
        onclick: () => change(() => { page += 1; }) }, "Next ›"));
  }

  function change(how) {
    how();
    draw();
    onChange();
  }
  search.addEventListener("input", () => change(() => { page = 0; }));
  stateSelect.addEventListener("change", () => change(() => { page = 0; }));

  return {
    el,
    shown,
    /** Redraw with this refresh's tasks; the reader's search, state and page stay. */
    render(next, selectedName) {
      tasks = next;
      selected = selectedName;
      stateOptions();
      draw();
    },
    /** Narrow the table to a group of the graph (label names it in the chip). */
    only(label, names) {
      change(() => { only = { label, names: new Set(names) }; page = 0; });
    },
    /** Turn to the page that lists task name, if the filters keep it. */
    reveal(name) {
      const i = rows.findIndex((t) => t.name === name);
      if (i >= 0 && Math.floor(i / PAGE) !== page) change(() => { page = Math.floor(i / PAGE); });
    },
  };
}
