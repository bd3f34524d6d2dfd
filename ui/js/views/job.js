// One job: its DAG with live task states, a timeline of attempts, tasks with their logs
// and outputs, loss curves, the audit trail, and cancel / retry. A job may have 5,000 tasks:
// the graph groups big levels (charts/dag_layout.js), the table pages and searches them, and
// the timeline draws the tasks the table shows.

import { api } from "../api.js";
import { dagShape, dagSvg } from "../charts/dag.js";
import { ganttSvg } from "../charts/gantt.js";
import { lineChart, num } from "../charts/line.js";
import { fineTuningLoss } from "../charts/loss.js";
import { badge, duration, elapsed, errorBox, errorText, h, json, mount, time, TERMINAL } from "../dom.js";
import { taskTable } from "./task_table.js";

/** A live job is read again no sooner than this many times its last read took (5,000 tasks
 * cost the server about half a second a read; a small job is still read every 2 s). */
const COST_RATIO = 5;
const COLORS = ["#1f6feb", "#cf222e", "#1a7f37", "#d97706", "#8250df", "#0a7ea4"];

function lossChart(tasks) {
  const curves = tasks.filter((t) => t.output && Array.isArray(t.output.loss_history) && t.output.loss_history.length);
  if (!curves.length) return null;
  return lineChart({
    id: "loss-chart", title: "Training loss", time: false, format: num,
    series: curves.map((t, i) => ({ name: t.name, color: COLORS[i % COLORS.length], points: t.output.loss_history })),
  });
}

export function mount_(main, ctx, { id, query }) {
  let job = null;
  let tasks = [];
  let events = [];
  let selected = query.get("task");
  let logKey = null;
  let logAttempt = null;
  let finished = false;
  let shape = null; // the graph's layout: a job's DAG never changes
  let nextAt = 0;
  let fineTuned = null; // a finetune job's loss curve, read with the job

  const head = h("div", { class: "page-head" });
  const banner = h("div");
  const graph = h("div", { class: "card graph-box", id: "graph" });
  const gantt = h("div", { class: "card", id: "timeline" });
  const loss = h("div", { id: "loss" });
  const table = taskTable({ onSelect: select, onChange: renderTimeline });
  const detail = h("div", { class: "card detail", id: "task-detail", hidden: true });
  const logTabs = h("div", { class: "tabs", id: "log-tabs" });
  const logPre = h("pre", { class: "log", id: "task-log" });
  const eventList = h("ol", { class: "events", id: "events" });
  const root = h("section", { class: "page" },
    h("a", { href: "#/jobs", class: "back" }, "‹ Jobs"),
    head, banner,
    h("h2", {}, "Graph"), graph,
    h("h2", {}, "Timeline"), gantt,
    loss,
    h("div", { class: "split" },
      h("div", {}, h("h2", {}, "Tasks"), table.el),
      h("div", {}, h("h2", {}, "Task"), detail)),
    h("h2", {}, "Events"), h("div", { class: "card" }, eventList));
  mount(main, root);

  function select(name) {
    selected = name;
    const params = new URLSearchParams({ task: name });
    history.replaceState(null, "", `#/jobs/${id}?${params}`);
    render();
    table.reveal(name);
  }

  function showGroup(unit) {
    table.only(`${unit.names.length} tasks: ${unit.names[0]} … ${unit.names.at(-1)}`, unit.names);
    table.el.scrollIntoView({ block: "start" });
  }

  async function act(path, button) {
    button.disabled = true;
    try {
      const out = await api(path, { method: "POST" });
      if (out.id !== id) ctx.navigate(`#/jobs/${out.id}`);
      else {
        finished = false;
        nextAt = 0;
        await view.refresh();
      }
    } catch (err) {
      mount(banner, errorBox(err));
      button.disabled = false;
    }
  }

  function renderHead() {
    const prefect = ctx.session.prefect_ui_url;
    const live = !TERMINAL.has(job.state);
    mount(head,
      h("h1", {}, h("span", { class: "mono", id: "job-id" }, job.id)),
      h("span", { id: "job-state" }, badge(job.state)),
      h("div", { class: "spacer" }),
      job.flow_run_id && prefect
        ? h("a", { class: "button ghost", id: "prefect-link", href: `${prefect}/runs/flow-run/${job.flow_run_id}`, target: "_blank", rel: "noopener" }, "Prefect flow run ↗")
        : null,
      live ? h("button", { class: "danger", id: "cancel-job", onclick: (e) => act(`v1/jobs/${id}/cancel`, e.target) }, "Cancel")
        : h("button", { id: "retry-job", onclick: (e) => act(`v1/jobs/${id}/retry`, e.target), title: "Run the same spec as a new job" }, "Retry"));
    const facts = [
      ["Kind", job.kind], ["Tenant", ctx.session.tenant.name], ["Created", time(job.created_at)],
      ["Started", time(job.started_at)], ["Finished", time(job.finished_at)],
      ["Duration", duration(job.started_at ? elapsed(job.started_at, job.finished_at) : null)],
      ["Flow run", job.flow_run_id || "—"],
    ];
    mount(banner,
      h("dl", { class: "facts" }, facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      job.error ? errorText(job.error, { id: "job-error", key: `${id} error` }) : null);
  }

  function renderTimeline() {
    const rows = table.shown();
    if (rows.length === tasks.length) mount(gantt, ganttSvg(rows));
    else if (!rows.some((t) => t.attempts.length)) {
      mount(gantt, h("p", { class: "muted", id: "gantt-empty" }, "No task listed in the table below has started."));
    } else {
      mount(gantt, h("p", { class: "muted caption", id: "gantt-scope" },
        `The ${rows.length} tasks listed in the table below, of ${tasks.length}.`), ganttSvg(rows));
    }
  }

  async function loadLog(task) {
    const logged = task.attempts.filter((a) => a.log_chars !== null);
    const key = `${task.name}:${logged.length}`;
    if (!logged.length) {
      logKey = key;
      mount(logTabs);
      logPre.textContent = task.state === "running"
        ? "The attempt's log is stored when it ends."
        : "No log was stored for this task.";
      return;
    }
    if (logAttempt === null || !logged.some((a) => a.attempt === logAttempt)) logAttempt = logged.at(-1).attempt;
    mount(logTabs, logged.map((a) => h("button", {
      class: `tab ${a.attempt === logAttempt ? "on" : ""}`, "data-attempt": a.attempt,
      onclick: () => { logAttempt = a.attempt; logKey = null; renderDetail(); },
    }, `attempt ${a.attempt}`)));
    const want = `${key}:${logAttempt}`;
    if (logKey === want) return;
    logKey = want;
    try {
      const out = await api(`v1/jobs/${id}/tasks/${encodeURIComponent(task.name)}/logs`, { params: { attempt: logAttempt } });
      const log = out.data[0];
      logPre.textContent = log ? log.text || "(the attempt wrote nothing)" : "";
      logPre.dataset.attempt = logAttempt;
      logPre.dataset.outcome = log ? log.outcome : "";
    } catch (err) {
      logKey = null;
      logPre.textContent = err.message;
    }
  }

  function renderDetail() {
    const task = tasks.find((t) => t.name === selected);
    detail.hidden = !task;
    if (!task) return;
    if (!detail.firstChild || detail.dataset.task !== task.name) {
      logKey = null;
      logAttempt = null;
    }
    detail.dataset.task = task.name;
    const attempts = task.attempts.map((a) => h("tr", {},
      h("td", {}, a.attempt), h("td", {}, badge(a.state)), h("td", { class: "mono" }, a.worker || "—"),
      h("td", {}, time(a.started_at)), h("td", {}, duration(a.duration_s ?? elapsed(a.started_at)))));
    // Each attempt's error in full below the table: a table cell would cut it or squeeze it.
    const errors = task.attempts.filter((a) => a.error).map((a) => h("li", { "data-attempt": a.attempt },
      h("span", { class: "muted" }, `attempt ${a.attempt}`), errorText(a.error, { key: `${id} ${task.name} ${a.attempt}` })));
    mount(detail,
      h("div", { class: "detail-head" }, h("h3", {}, task.name), badge(task.state)),
      h("dl", { class: "facts" },
        [["Operator", task.operator], ["Trigger rule", task.trigger_rule], ["Depends on", task.depends_on.join(", ") || "—"],
          ["Resource", task.resource_class], ["Timeout", duration(task.timeout_s)]].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      task.error ? errorText(task.error, { id: "task-error", key: `${id} ${task.name} error` }) : null,
      h("h4", {}, "Attempts"),
      attempts.length ? h("div", { class: "scroll" }, h("table", { class: "attempts" }, h("thead", {}, h("tr", {},
        ["#", "State", "Worker", "Started", "Duration"].map((c) => h("th", {}, c)))), h("tbody", {}, attempts)))
        : h("p", { class: "muted" }, "Not started yet."),
      errors.length ? h("ol", { class: "attempt-errors", id: "attempt-errors" }, errors) : null,
      h("h4", {}, "Log"), logTabs, logPre,
      h("h4", {}, "Output"), h("pre", { class: "output", id: "task-output" }, task.output === null ? "—" : json(task.output)));
    loadLog(task);
  }

  function renderEvents() {
    const names = new Map(tasks.map((t) => [t.id, t.name]));
    mount(eventList, events.slice(-200).reverse().map((e) => h("li", { "data-rule": e.rule },
      h("time", {}, new Date(e.created_at).toLocaleTimeString()),
      h("span", { class: "mono" }, e.entity_type === "task" ? names.get(e.entity_id) || e.entity_id : e.entity_type),
      h("span", {}, `${e.from_state || "·"} → ${e.to_state}`),
      h("span", { class: "muted" }, e.rule, e.reason ? `: ${e.reason}` : ""))));
  }

  function render() {
    renderHead();
    mount(graph, dagSvg(tasks, shape, { onSelect: select, onGroup: showGroup, selected }));
    const curves = lossChart(tasks) || fineTuned;
    mount(loss, curves ? [h("h2", {}, "Loss"), h("div", { class: "charts two" }, curves)] : []);
    table.render(tasks, selected);
    renderTimeline();
    renderDetail();
  }

  const view = {
    async refresh() {
      if (finished || Date.now() < nextAt) return;
      const started = Date.now();
      try {
        const page = await api(`ui/api/jobs/${id}`); // first: another tenant's job is one 404
        const first = !shape;
        job = page.job;
        tasks = page.tasks;
        finished = TERMINAL.has(job.state);
        shape = shape || dagShape(tasks);
        if (job.kind === "finetune") fineTuned = await fineTuningLoss(id, { id: "loss-chart" });
        render();
        if (first && selected) table.reveal(selected);
        // After the tasks are drawn: the page is usable while the audit trail loads.
        const after = events.length ? events.at(-1).id : undefined;
        events = events.concat((await api(`v1/jobs/${id}/events`, { params: { after, limit: 1000 } })).data);
        renderEvents();
      } catch (err) {
        mount(banner, errorBox(err.status === 404 ? `No job ${id} (for this tenant).` : err));
        if (err.status === 404) finished = true;
      }
      nextAt = started + COST_RATIO * (Date.now() - started);
    },
  };
  return view;
}

export { mount_ as mount };
