// Deployments: per model, its replicas (role, device, start path, load, KV-cache use,
// health), small latency and throughput charts, and its scaling events on a timeline.
// Replicas that ended (failed, stopped) leave the live table for a collapsed history.

import { api } from "../api.js";
import { lineChart, ms, num } from "../charts/line.js";
import { badge, errorBox, h, mount as put, s, shortId, since, stateOf } from "../dom.js";

const STALE_S = 30;
const ENDED = new Set(["failed", "stopped"]);

function health(inst, now) {
  if (inst.state !== "ready") return badge(inst.state);
  const age = inst.heartbeat_at ? (now - Date.parse(inst.heartbeat_at)) / 1000 : null;
  if (age !== null && age > STALE_S) {
    return h("span", { class: "badge", style: "--c:#d97706", "data-health": "stale" }, h("span", { class: "icon" }, "⚠"), "stale");
  }
  return h("span", { class: "badge", style: "--c:#1a7f37", "data-health": "healthy" }, h("span", { class: "icon" }, "✓"), "healthy");
}

function kvBar(value) {
  const p = Math.round(Math.max(0, Math.min(1, value)) * 100);
  const color = p > 90 ? "#cf222e" : p > 70 ? "#d97706" : "#1f6feb";
  return h("span", { class: "meter", title: `${p}% of the KV cache in use` },
    h("span", { class: "track" }, h("span", { style: `width:${p}%;background:${color}` })), `${p}%`);
}

function instancesTable(instances, now, anyEnded) {
  if (!instances.length) {
    return h("p", { class: "muted" }, anyEnded ? "No replica is running." : "No replica has registered yet.");
  }
  return h("table", { class: "instances" },
    h("thead", {}, h("tr", {}, ["Instance", "Address", "Process", "Role", "Device", "Start path", "Health", "Running", "Waiting", "KV cache", "Heartbeat"]
      .map((c) => h("th", {}, c)))),
    h("tbody", {}, instances.map((i) => h("tr", { "data-instance": i.id, "data-state": i.state },
      h("td", { class: "mono", title: i.id }, shortId(i.id)), h("td", { class: "mono" }, i.address || "—"),
      h("td", { class: "mono" }, i.pid ? `${i.host || "?"}:${i.pid}` : "—"),
      h("td", {}, i.role), h("td", {}, i.device), h("td", {}, i.start_path || "—"), h("td", {}, health(i, now)),
      h("td", { class: "num" }, i.running), h("td", { class: "num" }, i.waiting), h("td", {}, kvBar(i.kv_cache_usage)),
      h("td", {}, since(i.heartbeat_at, now))))));
}

/** Ended replicas, newest first, each with what ended it (its last event), in a <details>
 * that stays as the reader left it across refreshes (open: ids in openHistory). */
function historySection(dep, ended, events, openHistory) {
  if (!ended.length) return null;
  const last = new Map();
  for (const e of events) if (e.entity_type === "instance") last.set(e.entity_id, e);
  const rows = [...ended].reverse().map((i) => {
    const end = last.get(i.id);
    return h("tr", { "data-instance": i.id, "data-state": i.state },
      h("td", { class: "mono", title: i.id }, shortId(i.id)), h("td", {}, badge(i.state)),
      h("td", { class: "mono" }, i.address || "—"), h("td", { class: "mono" }, i.pid ? `${i.host || "?"}:${i.pid}` : "—"),
      h("td", {}, i.device), h("td", {}, i.start_path || "—"), h("td", {}, since(i.created_at)),
      h("td", { title: end ? new Date(end.created_at).toLocaleString() : "" }, end ? since(end.created_at) : "—"),
      h("td", { class: "wrap" }, end && end.reason ? end.reason : "—"));
  });
  const box = h("details", {
    class: "history", "data-history": dep.id, open: openHistory.has(dep.id),
    ontoggle: () => (box.open ? openHistory.add(dep.id) : openHistory.delete(dep.id)),
  },
  h("summary", {}, `History: ${ended.length} ended replica${ended.length === 1 ? "" : "s"}`),
  h("div", { class: "scroll" }, h("table", { class: "instances ended" },
    h("thead", {}, h("tr", {}, ["Instance", "State", "Address", "Process", "Device", "Start path", "Started", "Ended", "Why"]
      .map((c) => h("th", {}, c)))),
    h("tbody", {}, rows))));
  return box;
}

/** The deployment's scaling history (its, its instances' and its deploy jobs' events). */
function eventsTimeline(events) {
  const shown = events.filter((e) => e.entity_type !== "task");
  if (!shown.length) return h("p", { class: "muted" }, "No scaling events yet.");
  const W = 900;
  const t0 = Date.parse(shown[0].created_at);
  const t1 = Math.max(t0 + 1000, Date.parse(shown.at(-1).created_at));
  const x = (iso) => 20 + ((Date.parse(iso) - t0) / (t1 - t0)) * (W - 40);
  const svg = s("svg", { class: "timeline", viewBox: `0 0 ${W} 46`, width: "100%", role: "img", "aria-label": "Scaling events" },
    s("line", { class: "axis", x1: 20, x2: W - 20, y1: 24, y2: 24 }),
    shown.map((e) => s("circle", { cx: x(e.created_at), cy: 24, r: 6, fill: stateOf(e.to_state).color, class: "event-dot" },
      s("title", {}, `${new Date(e.created_at).toLocaleTimeString()} ${e.entity_type} ${e.entity_id}: ${e.from_state || "·"} → ${e.to_state} (${e.rule})`))),
    s("text", { class: "tick", x: 20, y: 44 }, new Date(t0).toLocaleTimeString()),
    s("text", { class: "tick", x: W - 20, y: 44, "text-anchor": "end" }, new Date(t1).toLocaleTimeString()));
  const list = h("ol", { class: "events" }, shown.slice(-8).reverse().map((e) => h("li", { "data-rule": e.rule },
    h("time", {}, new Date(e.created_at).toLocaleTimeString()), h("span", { class: "mono" }, `${e.entity_type} ${shortId(e.entity_id)}`),
    h("span", {}, `${e.from_state || "·"} → ${e.to_state}`), h("span", { class: "muted" }, e.rule, e.reason ? `: ${e.reason}` : ""))));
  return h("div", {}, svg, list);
}

export function deploymentCharts(points, prefix = "") {
  const series = (key, name, color) => ({ name, color, points: points.map((p) => [p.t, p[key]]) });
  return [
    lineChart({ id: `${prefix}ttft`, title: "Time to first token", format: ms,
      series: [series("ttft_p50", "p50", "#1f6feb"), series("ttft_mean", "mean", "#8250df")] }),
    lineChart({ id: `${prefix}tpot`, title: "Time per output token", format: ms,
      series: [series("tpot_p50", "p50", "#1a7f37"), series("tpot_mean", "mean", "#0a7ea4")] }),
    lineChart({ id: `${prefix}throughput`, title: "Throughput (per second)", format: num,
      series: [series("output_tokens_per_s", "output tokens", "#d97706"), series("requests_per_s", "requests", "#cf222e")] }),
  ];
}

export async function listDeployments(ctx) {
  return (await api("v1/deployments")).data;
}

export function mount(main, ctx) {
  const body = h("div", { id: "deployments" });
  put(main, h("section", { class: "page" }, h("div", { class: "page-head" }, h("h1", {}, "Deployments")), body));
  const eventsSeen = new Map();
  const openHistory = new Set();

  async function card(dep, now) {
    const id = encodeURIComponent(dep.id);
    const [metrics, events] = await Promise.all([
      api(`v1/deployments/${id}/metrics`).catch(() => ({ data: [] })),
      api(`ui/api/deployments/${id}/events`).then((r) => r.data).catch(() => eventsSeen.get(dep.id) || []),
    ]);
    eventsSeen.set(dep.id, events);
    const ready = dep.instances.filter((i) => i.state === "ready").length;
    const ended = dep.instances.filter((i) => ENDED.has(i.state));
    return h("article", { class: "card deployment", "data-deployment": dep.id },
      h("div", { class: "detail-head" },
        h("h2", {}, dep.model), badge(dep.state),
        h("span", { class: "muted" }, `${ready}/${dep.replicas} ready · ${dep.policy} · ${dep.resource_class}`),
        h("div", { class: "spacer" }),
        dep.job_id ? h("a", { href: `#/jobs/${dep.job_id}` }, "deploy job ›") : null,
        h("a", { href: `#/metrics?deployment=${encodeURIComponent(dep.id)}` }, "metrics ›")),
      instancesTable(dep.instances.filter((i) => !ENDED.has(i.state)), now, ended.length > 0),
      historySection(dep, ended, events, openHistory),
      h("div", { class: "charts three" }, deploymentCharts(metrics.data, `${dep.id}-`)),
      h("h3", {}, "Scaling events"),
      eventsTimeline(events));
  }

  return {
    async refresh() {
      try {
        const deps = await listDeployments(ctx);
        const now = Date.now();
        const cards = await Promise.all(deps.map((d) => card(d, now)));
        put(body, cards.length ? cards : h("div", { class: "card empty", id: "no-deployments" },
          "No deployments yet. A ", h("code", {}, "deploy"), " job starts one: ", h("a", { href: "#/jobs" }, "create it from the jobs page"), "."));
      } catch (err) {
        put(body, errorBox(err));
      }
    },
  };
}
