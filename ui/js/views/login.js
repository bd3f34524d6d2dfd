// Log in with an API key: checked against the API, then kept for this browser tab only.

import { api, auth } from "../api.js";
import { h, mount } from "../dom.js";

export function mount_(main, ctx) {
  const input = h("input", {
    id: "api-key", type: "password", name: "api-key", autocomplete: "off", required: true,
    placeholder: "df-…", "aria-label": "API key",
  });
  const message = h("p", { class: "form-error", id: "login-error", role: "alert" });
  const button = h("button", { type: "submit", id: "login-submit" }, "Log in");
  const form = h("form", { class: "login card", id: "login-form" },
    h("h1", {}, h("span", { class: "logo" }, "◆"), " DeepFlow"),
    h("p", { class: "muted" }, "Jobs, their task graphs, deployments and serving metrics."),
    h("label", { for: "api-key" }, "API key"),
    input,
    h("p", { class: "hint" }, "deepflow up prints one; ", h("code", {}, "deepflow keys create --tenant NAME"), " makes more."),
    message,
    button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    message.textContent = "";
    auth.key = input.value.trim();
    try {
      ctx.session = await api("ui/api/session");
      const target = window.location.hash.startsWith("#/login") || !window.location.hash ? "#/jobs" : window.location.hash;
      ctx.navigate(target);
    } catch (err) {
      auth.key = null;
      message.textContent = err.status === 401 ? "That API key is not valid." : err.message;
      button.disabled = false;
      input.focus();
    }
  });
  mount(main, h("div", { class: "login-page" }, form));
  input.focus();
  return {};
}

export { mount_ as mount };
