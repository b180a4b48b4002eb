// The actions on a task, shared by the list and the task page. Each resolves to what the
// API answered (true for a delete) when it accepted it, to null when it refused: the
// refusal is shown to the user in the API's own words.

import { json } from "./api.js";
import { confirmAction, notify } from "./dom.js";

const path = (taskId) => `/tasks/${encodeURIComponent(taskId)}`;

async function attempt(what, request) {
  try {
    const answer = await request();
    notify(what);
    return answer ?? true;
  } catch (error) {
    notify(error.message, "error");
    return null;
  }
}

export const execute = (taskId) =>
  attempt(`Run of ${taskId} queued`, () => json("POST", `${path(taskId)}/execute`));

export const cancel = (taskId) =>
  attempt(`Cancel of ${taskId} requested`, () => json("POST", `${path(taskId)}/cancel`));

export const pause = (taskId) =>
  attempt(`${taskId} paused`, () => json("POST", `${path(taskId)}/pause`));

export const resume = (taskId) =>
  attempt(`${taskId} resumed`, () => json("POST", `${path(taskId)}/resume`));

/** Delete after the user confirmed it; null when they did not. */
export async function remove(taskId) {
  if (!(await confirmAction(`Delete task ${taskId} and all its runs?`, "Delete"))) return null;
  return attempt(`${taskId} deleted`, () => json("DELETE", path(taskId)));
}
