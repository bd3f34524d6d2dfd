// The platform's HTTP API, called with the API key kept in sessionStorage.

const KEY = "deepflow.apiKey";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let onUnauthorized = () => {};

export const auth = {
  get key() {
    return sessionStorage.getItem(KEY);
  },
  set key(value) {
    if (value) sessionStorage.setItem(KEY, value);
    else sessionStorage.removeItem(KEY);
  },
  onUnauthorized(fn) {
    onUnauthorized = fn;
  },
};

/** Call the API; resolves to the JSON body, rejects with ApiError (OpenAI's error shape). */
export async function api(path, { method = "GET", body, params } = {}) {
  const url = new URL(path, window.location.href);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, v);
  }
  const headers = { Authorization: `Bearer ${auth.key || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, `The platform did not answer (${err.message}).`, "network");
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const e = (data && data.error) || {};
    if (response.status === 401) onUnauthorized();
    throw new ApiError(response.status, e.message || response.statusText, e.code);
  }
  return data;
}
