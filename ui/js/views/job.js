// One job: its DAG with live task states, a timeline of attempts, tasks with their logs
// and outputs, loss curves, the audit trail, and cancel / retry.

import { api } from "../api.js";
import { dagSvg } from "../charts/dag.js";
import { ganttSvg } from "../charts/gantt.js";
import { lineChart, num } from "../charts/line.js";
import { badge, duration, elapsed, errorBox, h, json, mount, time, TERMINAL } from "../dom.js";

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

  const head = h("div", { class: "page-head" });
  const banner = h("div");
  const graph = h("div", { class: "card graph-box", id: "graph" });
  const gantt = h("div", { class: "card", id: "timeline" });
  const loss = h("div", { id: "loss" });
  const tbody = h("tbody", { id: "tasks-body" });
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
      h("div", {},
        h("h2", {}, "Tasks"),
        h("div", { class: "card flush" }, h("table", { class: "tasks" },
          h("thead", {}, h("tr", {}, ["Task", "Operator", "State", "Attempt", "Duration", "Result"].map((c) => h("th", {}, c)))),
          tbody))),
      h("div", {}, h("h2", {}, "Task"), detail)),
    h("h2", {}, "Events"), h("div", { class: "card" }, eventList));
  mount(main, root);

  function select(name) {
    selected = name;
    const params = new URLSearchParams({ task: name });
    history.replaceState(null, "", `#/jobs/${id}?${params}`);
    render();
  }

  async function act(path, button) {
    button.disabled = true;
    try {
      const out = await api(path, { method: "POST" });
      if (out.id !== id) ctx.navigate(`#/jobs/${out.id}`);
      else {
        finished = false;
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
      job.error ? h("div", { class: "error-box", id: "job-error" }, job.error) : null);
  }

  function renderTasks() {
    mount(tbody, tasks.map((t) => h("tr", { class: `row-link${selected === t.name ? " selected" : ""}`, "data-task": t.name, onclick: () => select(t.name) },
      h("td", {}, t.name), h("td", { class: "mono" }, t.operator), h("td", {}, badge(t.state)),
      h("td", {}, `${t.attempt}/${t.max_attempts}`),
      h("td", {}, duration(t.duration_s ?? (t.state === "running" ? elapsed(t.started_at) : null))),
      h("td", { class: "clip" }, t.error ? h("span", { class: "err" }, t.error) : t.output !== null ? JSON.stringify(t.output) : "—"))));
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
      h("td", {}, time(a.started_at)), h("td", {}, duration(a.duration_s ?? elapsed(a.started_at))),
      h("td", { class: "clip", title: a.error || "" }, a.error || "")));
    mount(detail,
      h("div", { class: "detail-head" }, h("h3", {}, task.name), badge(task.state)),
      h("dl", { class: "facts" },
        [["Operator", task.operator], ["Trigger rule", task.trigger_rule], ["Depends on", task.depends_on.join(", ") || "—"],
          ["Resource", task.resource_class], ["Timeout", duration(task.timeout_s)]].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      task.error ? h("div", { class: "error-box" }, task.error) : null,
      h("h4", {}, "Attempts"),
      attempts.length ? h("div", { class: "scroll" }, h("table", { class: "attempts" }, h("thead", {}, h("tr", {},
        ["#", "State", "Worker", "Started", "Duration", "Error"].map((c) => h("th", {}, c)))), h("tbody", {}, attempts)))
        : h("p", { class: "muted" }, "Not started yet."),
      h("h4", {}, "Log"), logTabs, logPre,
      h("h4", {}, "Output"), h("pre", { class: "output", id: "task-output" }, task.output === null ? "—" : json(task.output)));
    loadLog(task);
  }

  function renderEvents() {
    mount(eventList, events.slice(-200).reverse().map((e) => h("li", { "data-rule": e.rule },
      h("time", {}, new Date(e.created_at).toLocaleTimeString()),
      h("span", { class: "mono" }, e.entity_type === "task" ? (tasks.find((t) => t.id === e.entity_id) || {}).name || e.entity_id : e.entity_type),
      h("span", {}, `${e.from_state || "·"} → ${e.to_state}`),
      h("span", { class: "muted" }, e.rule, e.reason ? `: ${e.reason}` : ""))));
  }

  function render() {
    renderHead();
    mount(graph, dagSvg(tasks, { onSelect: select, selected }));
    mount(gantt, ganttSvg(tasks));
    const curves = lossChart(tasks);
    mount(loss, curves ? [h("h2", {}, "Loss"), h("div", { class: "charts two" }, curves)] : []);
    renderTasks();
    renderDetail();
    renderEvents();
  }

  const view = {
    async refresh() {
      if (finished) return;
      try {
        const after = events.length ? events.at(-1).id : undefined;
        const j = await api(`v1/jobs/${id}`); // first: another tenant's job is one 404
        const [t, e] = await Promise.all([
          api(`v1/jobs/${id}/tasks`),
          api(`v1/jobs/${id}/events`, { params: { after, limit: 1000 } }),
        ]);
        job = j;
        tasks = t.data;
        events = events.concat(e.data);
        finished = TERMINAL.has(job.state);
        render();
      } catch (err) {
        mount(banner, errorBox(err.status === 404 ? `No job ${id} (for this tenant).` : err));
        if (err.status === 404) finished = true;
      }
    },
  };
  return view;
}

export { mount_ as mount };
