// Live updates: one follower of GET /events for the whole page, shared by the pages.
// It resumes after a drop with Last-Event-ID; `event: reset` (events were missed) makes
// every page reload what it shows.

import { ApiError, call } from "./api.js";
import { readEvents } from "./sse.js";

const listeners = new Set();
const FIRST_RETRY_MS = 500;
const LAST_RETRY_MS = 30000;

/** Call `listener(event)` for each task or run event, and `listener({type: "reset"})`
 * when events were missed; returns the function that stops it. */
export function subscribe(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

function publish(event) {
  for (const listener of listeners) listener(event);
}

/** Follow /events for as long as the page lives, showing its state in `indicator`. */
export async function followEvents(indicator) {
  let lastEventId = null;
  let retryMs = FIRST_RETRY_MS;
  let connectedBefore = false;
  for (;;) {
    try {
      const headers = lastEventId ? { "Last-Event-ID": lastEventId } : {};
      const response = await call("GET", "/events", { headers });
      show(indicator, "live", "live");
      // Reconnected with no event id to resume from: what happened meanwhile is unknown.
      if (connectedBefore && !lastEventId) publish({ type: "reset" });
      connectedBefore = true;
      retryMs = FIRST_RETRY_MS;
      await readEvents(response, (message) => {
        if (message.id) lastEventId = message.id;
        if (message.event === "reset") publish({ type: "reset" });
        else publish(JSON.parse(message.data));
      });
      show(indicator, "reconnecting…", "down");
    } catch (error) {
      const unavailable = error instanceof ApiError && error.status === 404;
      show(indicator, unavailable ? "no live updates" : "reconnecting…", "down");
      if (unavailable) retryMs = LAST_RETRY_MS;
    }
    // Wait before reconnecting, longer after each failure (a server that is down).
    await new Promise((resolve) => setTimeout(resolve, retryMs));
    retryMs = Math.min(retryMs * 2, LAST_RETRY_MS);
  }
}

function show(indicator, text, state) {
  indicator.textContent = text;
  indicator.dataset.state = state;
}
