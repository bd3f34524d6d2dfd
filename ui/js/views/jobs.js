// The jobs list: filters (state, kind, search), paged from the server, live.

import { api } from "../api.js";
import { badge, duration, elapsed, errorBox, h, mount as put, shortId, since, STATES } from "../dom.js";
import { newJobDialog } from "./new_job.js";

const PAGE = 50;
const JOB_STATES = ["pending", "queued", "running", "succeeded", "failed", "cancelled"];

function progress(tasks) {
  const total = Object.values(tasks).reduce((a, b) => a + b, 0);
  if (!total) return h("span", { class: "muted" }, "—");
  const done = (tasks.succeeded || 0) + (tasks.skipped || 0);
  const bar = h("span", { class: "progress", title: Object.entries(tasks).map(([k, v]) => `${v} ${k}`).join(", ") },
    ...Object.entries(tasks).map(([state, n]) =>
      h("span", { style: `width:${(100 * n) / total}%;background:${(STATES[state] || {}).color || "#999"}` })));
  return h("span", { class: "progress-cell" }, bar, h("span", { class: "muted" }, `${done}/${total}`));
}

export function mount(main, ctx, { query }) {
  const filters = {
    state: query.get("state") || "",
    kind: query.get("kind") || "",
    q: query.get("q") || "",
    page: Math.max(0, Number(query.get("page") || 0)),
  };
  const search = h("input", { type: "search", id: "job-search", placeholder: "Search id, kind or error", value: filters.q });
  const stateSelect = h("select", { id: "state-filter", "aria-label": "State" });
  const kindSelect = h("select", { id: "kind-filter", "aria-label": "Kind" });
  const chips = h("div", { class: "chips", id: "state-chips" });
  const table = h("tbody", { id: "jobs-body" });
  const pager = h("div", { class: "pager", id: "pager" });
  const notice = h("div");
  const root = h("section", { class: "page" },
    h("div", { class: "page-head" },
      h("h1", {}, "Jobs"),
      h("div", { class: "spacer" }),
      h("button", { id: "new-job", onclick: () => newJobDialog(ctx) }, "+ New job")),
    h("div", { class: "toolbar" }, search, stateSelect, kindSelect),
    chips,
    notice,
    h("div", { class: "card flush" },
      h("table", { class: "jobs" },
        h("thead", {}, h("tr", {},
          ["Job", "Kind", "State", "Tenant", "Tasks", "Age", "Duration"].map((c) => h("th", {}, c)))),
        table)),
    pager);
  put(main, root);

  let timer = null;
  function apply(changes) {
    Object.assign(filters, changes);
    const params = new URLSearchParams();
    for (const k of ["state", "kind", "q"]) if (filters[k]) params.set(k, filters[k]);
    if (filters.page) params.set("page", filters.page);
    const hash = `#/jobs${params.toString() ? `?${params}` : ""}`;
    history.replaceState(null, "", hash);
    view.refresh();
  }
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => apply({ q: search.value.trim(), page: 0 }), 250);
  });
  stateSelect.addEventListener("change", () => apply({ state: stateSelect.value, page: 0 }));
  kindSelect.addEventListener("change", () => apply({ kind: kindSelect.value, page: 0 }));

  function options(select, values, selected, counts, allLabel) {
    const sig = JSON.stringify([values, selected, counts]);
    if (select.dataset.sig === sig) return; // rebuilding would close an open dropdown
    select.dataset.sig = sig;
    const opts = [h("option", { value: "" }, allLabel),
      ...values.map((v) => h("option", { value: v, selected: v === selected }, counts ? `${v} (${counts[v] || 0})` : v))];
    put(select, opts);
    select.value = selected;
  }

  function render(page) {
    const now = Date.now();
    options(stateSelect, JOB_STATES, filters.state, page.states, "All states");
    options(kindSelect, page.kinds, filters.kind, null, "All kinds");
    const all = Object.values(page.states).reduce((a, b) => a + b, 0);
    put(chips,
      h("button", { class: `chip ${filters.state ? "" : "on"}`, onclick: () => apply({ state: "", page: 0 }) }, `all ${all}`),
      JOB_STATES.filter((st) => page.states[st]).map((st) =>
        h("button", { class: `chip ${filters.state === st ? "on" : ""}`, style: `--c:${STATES[st].color}`, "data-state": st,
          onclick: () => apply({ state: st, page: 0 }) }, `${STATES[st].label} ${page.states[st]}`)));
    const rows = page.data.map((job) =>
      h("tr", { class: "row-link", "data-job": job.id, onclick: () => ctx.navigate(`#/jobs/${job.id}`) },
        h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono", title: job.id }, shortId(job.id))),
        h("td", {}, job.kind),
        h("td", {}, badge(job.state)),
        h("td", {}, page.tenant),
        h("td", {}, progress(job.tasks)),
        h("td", { title: new Date(job.created_at).toLocaleString() }, since(job.created_at, now)),
        h("td", {}, duration(job.duration_s ?? (job.started_at ? elapsed(job.started_at) : null)))));
    put(table, rows.length ? rows : h("tr", {}, h("td", { colspan: 7, class: "empty" },
      filters.q || filters.state || filters.kind ? "No job matches these filters." : "No jobs yet: create one with “+ New job”.")));
    const first = page.total ? page.offset + 1 : 0;
    const last = page.offset + page.data.length;
    put(pager,
      h("span", { id: "page-range" }, `${first}–${last} of ${page.total}`),
      h("button", { class: "ghost", id: "prev-page", disabled: page.offset === 0, onclick: () => apply({ page: filters.page - 1 }) }, "‹ Newer"),
      h("button", { class: "ghost", id: "next-page", disabled: last >= page.total, onclick: () => apply({ page: filters.page + 1 }) }, "Older ›"));
  }

  let seq = 0;
  const view = {
    async refresh() {
      const mine = ++seq;
      try {
        const page = await api("ui/api/jobs", {
          params: { state: filters.state, kind: filters.kind, q: filters.q, limit: PAGE, offset: filters.page * PAGE },
        });
        if (mine !== seq) return; // a newer request (a filter change) already answered
        put(notice);
        render(page);
      } catch (err) {
        put(notice, errorBox(err));
      }
    },
    destroy() {
      clearTimeout(timer);
    },
  };
  return view;
}
