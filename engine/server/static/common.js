// Shared by the pages: the API key (sessionStorage only, sent as `Authorization: Key ...`, never in a URL), JSON
// calls to the server, the login form, and small DOM helpers.
"use strict";

const KEY_ITEM = "engine.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Key ${key}` } : { ...extra };
}

export class HttpError extends Error {
  constructor(status, body) {
    super(typeof body?.detail === "string" ? body.detail : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// fetch() with the key; a 401 opens the login form (and throws, so callers stop).
export async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  if (response.status === 401) {
    showLogin("The server needs an API key.");
    throw new HttpError(401, await response.json().catch(() => ({})));
  }
  return response;
}

export async function getJson(path) {
  const response = await call(path);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new HttpError(response.status, body);
  return body;
}

// An image the server stores (GET /files/... needs the key too): fetched with the key, shown from a blob URL.
export async function imageSrc(url) {
  if (!url || url.startsWith("data:")) return url;
  let target;
  try { target = new URL(url, location.href); } catch { return url; }
  if (target.origin !== location.origin) return url;
  const response = await call(target.pathname + target.search);
  if (!response.ok) throw new HttpError(response.status, await response.json().catch(() => ({})));
  return URL.createObjectURL(await response.blob());
}

let onLogin = () => {};

export function setupLogin(reload) {
  onLogin = reload;
  const form = document.getElementById("login-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("login-key");
    sessionStorage.setItem(KEY_ITEM, input.value);
    input.value = "";
    document.getElementById("login").hidden = true;
    onLogin();
  });
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_ITEM);
    showLogin("Signed out.");
  });
}

export function showLogin(message) {
  const box = document.getElementById("login");
  document.getElementById("login-message").textContent = message;
  box.hidden = false;
  document.getElementById("login-key").focus();
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return `${(value * 1000).toFixed(0)} ms`;
  if (value < 120) return `${value.toFixed(2)} s`;
  if (value < 7200) return `${(value / 60).toFixed(1)} min`;
  return `${(value / 3600).toFixed(1)} h`;
}
