// Calls to the taskq API. The token, when the API asks for one, lives in sessionStorage
// (this tab's session) and travels in the Authorization header, never in a URL.

const TOKEN_KEY = "taskq.token";

/** An error answer of the API: its status code and the problem's `detail`. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

/** Send a request; on 401 ask for a token and send it again. Resolves to the Response
 * (any 2xx); rejects with an ApiError for any other answer. */
export async function call(method, path, { query, body, headers, signal } = {}) {
  for (;;) {
    const response = await fetch(url(path, query), {
      method,
      signal,
      headers: { ...authorization(), ...(body === undefined ? {} : { "Content-Type": "application/json" }), ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      await askForToken(token() ? "That token was refused." : "");
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, await problemDetail(response));
    return response;
  }
}

/** A request whose answer is JSON (null for 204). */
/** The ids a response names in `header` (comma-separated, each percent-encoded). */
export function idsNamed(response, header) {
  return (response.headers.get(header) ?? "").split(",").filter(Boolean).map(decodeURIComponent);
}

export async function json(method, path, options) {
  const response = await call(method, path, options);
  return response.status === 204 ? null : response.json();
}

function url(path, query = {}) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    if (value !== null && value !== undefined && value !== "") params.set(name, value);
  }
  const search = params.toString();
  return search ? `${path}?${search}` : path;
}

async function problemDetail(response) {
  try {
    const problem = await response.json();
    return problem.detail ?? `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function authorization() {
  const value = token();
  return value ? { Authorization: `Bearer ${value}` } : {};
}

/** Whether a token is kept (the "forget" button shows then). */
export function hasToken() {
  return token() !== null;
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

let pendingLogin = null;

/** Show the sign-in dialog (once, however many calls wait) and resolve when a token
 * was entered. */
function askForToken(reason) {
  pendingLogin ??= new Promise((resolve) => {
    forgetToken();
    const dialog = document.getElementById("login");
    const form = dialog.querySelector("form");
    dialog.querySelector("[data-role=reason]").textContent = reason;
    form.reset();
    // The dialog only closes by entering a token: every call waits for one.
    dialog.oncancel = (event) => event.preventDefault();
    form.addEventListener("submit", () => {
      sessionStorage.setItem(TOKEN_KEY, form.elements.token.value.trim());
      document.getElementById("sign-out").hidden = false;
      pendingLogin = null;
      resolve();
    }, { once: true });
    dialog.showModal();
  });
  return pendingLogin;
}
