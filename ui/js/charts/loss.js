// A fine-tuning job's loss curve: training loss at every step and held-out loss at each
// checkpoint, read from the job's metrics events (/v1/fine_tuning/jobs/{id}/events).

import { api } from "../api.js";
import { lineChart, num } from "./line.js";

/** The job's curve as a chart (id given), or null while it has no step yet. */
export async function fineTuningLoss(jobId, { id, title = "Training loss" } = {}) {
  const events = (await api(`v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events`, { params: { limit: 10000 } })).data;
  const steps = events.filter((e) => e.type === "metrics").map((e) => e.data).sort((a, b) => a.step - b.step);
  if (!steps.length) return null;
  const held = steps.filter((s) => s.valid_loss !== null && s.valid_loss !== undefined);
  return lineChart({
    id, title, time: false, format: num,
    series: [
      { name: "training", color: "#1f6feb", points: steps.map((s) => [s.step, s.train_loss]) },
      { name: "held-out", color: "#cf222e", points: held.map((s) => [s.step, s.valid_loss]) },
    ],
  });
}
