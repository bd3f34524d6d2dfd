// "New job": a kind and its spec as JSON, posted to /v1/jobs. The open dialog is a history
// entry of its own, so the browser's Back closes it rather than leaving the page under it.

import { api } from "../api.js";
import { h } from "../dom.js";

const EXAMPLES = {
  dag: {
    tasks: [
      { name: "extract", operator: "echo", args: { rows: 3 } },
      { name: "train", operator: "sleep", args: { seconds: 2 }, depends_on: ["extract"], retries: 2 },
      { name: "evaluate", operator: "echo", args: { metric: "loss" }, depends_on: ["train"] },
      { name: "cleanup", operator: "noop", depends_on: ["evaluate"], trigger_rule: "all_done" },
    ],
  },
  serve: { model: "tiny-llama", replicas: 2, resource_class: "cpu", policy: "colocated" },
  finetune: { model: "tiny-llama", training_file: "file-train.jsonl", hyperparameters: { n_epochs: 1 } },
  batch: { model: "tiny-llama", input_file: "file-prompts.jsonl", num_shards: 4 },
};

export function newJobDialog(ctx) {
  const kind = h("select", { id: "new-job-kind", "aria-label": "Kind" },
    Object.keys(EXAMPLES).map((k) => h("option", { value: k }, k)));
  const spec = h("textarea", { id: "new-job-spec", rows: 16, spellcheck: "false", "aria-label": "Spec (JSON)" });
  spec.value = JSON.stringify(EXAMPLES.dag, null, 2);
  kind.addEventListener("change", () => {
    spec.value = JSON.stringify(EXAMPLES[kind.value], null, 2);
  });
  const message = h("p", { class: "form-error", id: "new-job-error", role: "alert" });
  const submit = h("button", { type: "submit", id: "new-job-submit" }, "Create job");
  const dialog = h("dialog", { class: "card dialog", id: "new-job-dialog" },
    h("form", { method: "dialog" },
      h("h2", {}, "New job"),
      h("label", { for: "new-job-kind" }, "Kind"), kind,
      h("label", { for: "new-job-spec" }, "Spec (JSON)"), spec,
      message,
      h("div", { class: "actions" },
        h("button", { type: "button", class: "ghost", onclick: () => dialog.close() }, "Cancel"),
        submit)));
  const mine = () => history.state && history.state.dialog === "new-job";
  const onBack = () => dialog.open && dialog.close();
  dialog.addEventListener("close", () => {
    window.removeEventListener("popstate", onBack);
    dialog.remove();
    if (mine()) history.back(); // closed by Cancel or Esc: drop its entry, or Back would do nothing once
  });
  dialog.querySelector("form").addEventListener("submit", async (event) => {
    event.preventDefault();
    message.textContent = "";
    let body;
    try {
      body = { kind: kind.value, spec: JSON.parse(spec.value) };
    } catch (err) {
      message.textContent = `The spec is not valid JSON: ${err.message}`;
      return;
    }
    submit.disabled = true;
    try {
      const job = await api("v1/jobs", { method: "POST", body });
      if (mine()) { // the dialog's entry becomes the new job's page: Back from it is the list
        history.replaceState(null, "", `#/jobs/${job.id}`);
        dialog.close();
        ctx.route();
      } else {
        dialog.close();
        ctx.navigate(`#/jobs/${job.id}`);
      }
    } catch (err) {
      message.textContent = err.message;
      submit.disabled = false;
    }
  });
  document.body.append(dialog);
  dialog.showModal();
  history.pushState({ dialog: "new-job" }, "");
  window.addEventListener("popstate", onBack);
}
