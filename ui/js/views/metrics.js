// Serving metrics over time for one deployment, and fine-tuning loss curves.

import { api } from "../api.js";
import { lineChart, num, pct } from "../charts/line.js";
import { fineTuningLoss } from "../charts/loss.js";
import { errorBox, h, mount as put, shortId } from "../dom.js";
import { deploymentCharts, listDeployments } from "./deployments.js";

const COLORS = ["#1f6feb", "#cf222e", "#1a7f37", "#d97706", "#8250df", "#0a7ea4"];
const FINETUNE_EVERY = 5;

export function mount(main, ctx, { query }) {
  let chosen = query.get("deployment");
  let ticks = 0;
  const picker = h("select", { id: "deployment-picker", "aria-label": "Deployment" });
  const charts = h("div", { class: "charts two", id: "serving-charts" });
  const notice = h("div");
  const losses = h("div", { class: "charts two", id: "loss-curves" });
  put(main, h("section", { class: "page" },
    h("div", { class: "page-head" }, h("h1", {}, "Metrics"), h("div", { class: "spacer" }), picker),
    notice,
    h("h2", {}, "Serving"), charts,
    h("h2", {}, "Fine-tuning loss"), losses));
  picker.addEventListener("change", () => {
    chosen = picker.value;
    history.replaceState(null, "", `#/metrics?deployment=${encodeURIComponent(chosen)}`);
    view.refresh();
  });

  async function serving() {
    const deps = await listDeployments(ctx);
    if (!deps.length) {
      put(picker);
      put(charts, h("p", { class: "muted", id: "no-deployments" }, "No deployments yet."));
      return;
    }
    if (!deps.some((d) => d.id === chosen)) chosen = deps[0].id;
    const sig = deps.map((d) => d.id).join();
    if (picker.dataset.sig !== sig) {
      picker.dataset.sig = sig;
      put(picker, deps.map((d) => h("option", { value: d.id }, `${d.model} · ${shortId(d.id)}`)));
    }
    picker.value = chosen;
    const points = (await api(`v1/deployments/${encodeURIComponent(chosen)}/metrics`)).data;
    const series = (key, name, color) => ({ name, color, points: points.map((p) => [p.t, p[key]]) });
    put(charts, deploymentCharts(points, "m-"),
      lineChart({ id: "m-load", title: "Requests in the engine", format: num,
        series: [series("running", "running", "#1f6feb"), series("waiting", "waiting", "#d97706")] }),
      lineChart({ id: "m-kv", title: "KV-cache use", format: pct, series: [series("kv_cache_usage", "mean of replicas", "#8250df")] }),
      lineChart({ id: "m-e2e", title: "End-to-end latency (mean)", format: (v) => `${v.toFixed(2)} s`,
        series: [series("e2e_mean", "mean", "#0a7ea4")] }));
  }

  async function finetuning() {
    const jobs = (await api("ui/api/jobs", { params: { kind: "finetune", limit: 6 } })).data;
    const curves = [];
    for (const job of jobs) {
      const curve = await fineTuningLoss(job.id, { id: `loss-${job.id}`, title: `${shortId(job.id)} (${job.state})` });
      if (curve) {
        curves.push(curve);
        continue;
      }
      const tasks = (await api(`v1/jobs/${job.id}/tasks`)).data;
      const withLoss = tasks.filter((t) => t.output && Array.isArray(t.output.loss_history));
      if (withLoss.length) {
        curves.push(lineChart({ id: `loss-${job.id}`, title: `${shortId(job.id)} (${job.state})`, time: false, format: num,
          series: withLoss.map((t, i) => ({ name: t.name, color: COLORS[i % COLORS.length], points: t.output.loss_history })) }));
      }
    }
    put(losses, curves.length ? curves : h("p", { class: "muted", id: "no-loss" },
      "No fine-tuning job has reported a loss history yet."));
  }

  const view = {
    async refresh() {
      try {
        await serving();
        if (ticks++ % FINETUNE_EVERY === 0) await finetuning();
        put(notice);
      } catch (err) {
        put(notice, errorBox(err));
      }
    },
  };
  return view;
}
