// The dashboard's shell: log-in gate, hash routes, and the live-update loop (polling).

import { api, auth } from "./api.js";
import { h, mount } from "./dom.js";
import * as deployments from "./views/deployments.js";
import * as job from "./views/job.js";
import * as jobs from "./views/jobs.js";
import * as login from "./views/login.js";
import * as metrics from "./views/metrics.js";

const POLL_MS = 2000;
const ctx = { session: null, navigate, route };
let current = null;

export function navigate(path) {
  if (window.location.hash === path) route();
  else window.location.hash = path;
}

function parseHash() {
  const raw = window.location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(query) };
}

function header(section) {
  const link = (href, name, label) =>
    h("a", { href, class: section === name ? "active" : null, "data-nav": name }, label);
  const tenant = ctx.session ? ctx.session.tenant.name : null;
  return [
    h("a", { class: "brand", href: "#/jobs" }, h("span", { class: "logo", "aria-hidden": "true" }, "◆"), "DeepFlow"),
    ctx.session
      ? h("nav", {}, link("#/jobs", "jobs", "Jobs"), link("#/deployments", "deployments", "Deployments"),
        link("#/metrics", "metrics", "Metrics"))
      : null,
    h("div", { class: "spacer" }),
    ctx.session ? h("span", { class: "live", id: "live", title: "Live: refreshed every 2 s" }, "live") : null,
    tenant ? h("span", { class: "tenant", id: "tenant" }, "tenant ", h("b", {}, tenant)) : null,
    ctx.session ? h("button", { class: "ghost", id: "logout", onclick: logout }, "Log out") : null,
  ];
}

function logout() {
  auth.key = null;
  ctx.session = null;
  navigate("#/login");
}

async function route() {
  if (current && current.destroy) current.destroy();
  current = null;
  const main = document.getElementById("main");
  const top = document.getElementById("header");
  if (auth.key && !ctx.session) {
    try {
      ctx.session = await api("ui/api/session");
    } catch {
      auth.key = null;
    }
  }
  const { parts, query } = parseHash();
  if (!ctx.session) {
    mount(top, header(null));
    current = login.mount(main, ctx);
    return;
  }
  const section = ["deployments", "metrics"].includes(parts[0]) ? parts[0] : "jobs";
  mount(top, header(section));
  if (section === "jobs" && parts[1]) current = job.mount(main, ctx, { id: parts[1], query });
  else if (section === "deployments") current = deployments.mount(main, ctx, { query });
  else if (section === "metrics") current = metrics.mount(main, ctx, { query });
  else current = jobs.mount(main, ctx, { query });
  await tick(true);
}

async function tick(force = false) {
  const view = current;
  if (!view || !view.refresh || view.busy || (!force && document.hidden)) return;
  view.busy = true;
  try {
    await view.refresh();
    const live = document.getElementById("live");
    if (live) live.title = `Live: last refreshed ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    console.warn("refresh failed", err);
  } finally {
    view.busy = false;
  }
}

auth.onUnauthorized(() => {
  auth.key = null;
  if (ctx.session) {
    ctx.session = null;
    navigate("#/login");
  }
});
window.addEventListener("hashchange", route);
setInterval(tick, POLL_MS);
route();
