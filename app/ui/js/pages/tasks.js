// The task list (#/ or #/?status=...): one page of tasks, kept up to date by events.

import * as actions from "../actions.js";
import { ApiError, call, idsNamed, json } from "../api.js";
import { h, notify } from "../dom.js";
import { badge, duration, time } from "../format.js";
import { subscribe } from "../live.js";
import { coalescing } from "../refresh.js";

const STATUSES = ["created", "pending", "running", "completed", "failed", "cancelled"];
const PAGE_SIZE = 50;

export function tasksPage(main, { query }) {
  const status = query.get("status") ?? "";
  const rows = new Map(); // task id -> its <tr>
  const body = h("tbody");
  const pager = h("div", { class: "pager" });
  // Tasks left out of the page because their stored document cannot be read.
  const unreadableNote = h("div", { class: "error unreadable", role: "alert" });
  const cursors = [null]; // the cursor of each page seen so far; the last one is shown
  let nextCursor = null;
  let gone = false;

  const filter = h("select", { name: "status", "aria-label": "Status", onchange: () => {
    location.hash = filter.value ? `#/?status=${filter.value}` : "#/";
  } }, h("option", { value: "" }, "every status"),
  STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)));

  main.append(
    h("div", { class: "toolbar" }, h("h1", {}, "Tasks"), h("label", {}, "Show ", filter),
      h("a", { class: "button", href: "#/new" }, "New task")),
    unreadableNote,
    h("table", { class: "tasks" },
      h("thead", {}, h("tr", {}, ["ID", "Name", "Status", "Schedule", "Next run", "Last run", ""]
        .map((title) => h("th", {}, title)))),
      body),
    pager,
  );

  async function loadPage() {
    const response = await call("GET", "/tasks", {
      query: { status, limit: PAGE_SIZE, cursor: cursors.at(-1) },
    });
    const tasks = await response.json();
    if (gone) return;
    nextCursor = response.headers.get("X-Next-Cursor");
    showUnreadable(idsNamed(response, "X-Unreadable-Tasks"));
    rows.clear();
    body.replaceChildren(...tasks.map((task) => remember(task)));
    if (!tasks.length) body.append(h("tr", { class: "empty" }, h("td", { colspan: 7 }, "No tasks.")));
    showPager();
  }

  function showUnreadable(ids) {
    if (!ids.length) return unreadableNote.replaceChildren();
    const which = ids.length === 1 ? "Its stored document" : "Their stored documents";
    unreadableNote.replaceChildren(
      h("span", {}, `Not listed: ${ids.join(", ")}. ${which} cannot be read; only deleting works.`),
      ...ids.map((taskId) => h("button", { type: "button", class: "danger", onclick: async () => {
        if (await actions.remove(taskId)) loadPage().catch(showError);
      } }, `Delete ${taskId}`)),
    );
  }

  function showPager() {
    pager.replaceChildren(
      h("button", { type: "button", disabled: cursors.length === 1, onclick: () => {
        cursors.pop();
        loadPage().catch(showError);
      } }, "← Previous"),
      h("button", { type: "button", disabled: !nextCursor, onclick: () => {
        cursors.push(nextCursor);
        loadPage().catch(showError);
      } }, "Next →"),
    );
  }

  function remember(task) {
    const row = taskRow(task, async () => {
      if (await actions.execute(task.id)) refresh(task.id).catch(showError);
    });
    rows.set(task.id, row);
    return row;
  }

  /** Whether a task the page does not show yet belongs on it (ids in order). */
  function belongsHere(taskId) {
    const ids = [...rows.keys()];
    const afterStart = cursors.length === 1 || (ids.length > 0 && taskId > ids[0]);
    const beforeEnd = !nextCursor || (ids.length > 0 && taskId < ids.at(-1));
    return afterStart && beforeEnd;
  }

  const refresh = coalescing(async (taskId) => {
    let task = null;
    try {
      task = await json("GET", `/tasks/${encodeURIComponent(taskId)}`);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) throw error;
    }
    if (gone) return;
    const shown = rows.get(taskId);
    if (!task || (status && task.status !== status)) {
      shown?.remove();
      rows.delete(taskId);
    } else if (shown) {
      const row = remember(task);
      shown.replaceWith(row);
    } else if (belongsHere(taskId)) {
      insertInOrder(remember(task), taskId);
    }
  });

  function insertInOrder(row, taskId) {
    body.querySelector("tr.empty")?.remove();
    const following = [...rows.entries()].find(([id, other]) => id > taskId && other !== row);
    body.insertBefore(row, following ? following[1] : null);
  }

  /** Whether an event can change what the page shows (a task it shows, or one that
   * may join it), so that events about other tasks cost no request. */
  function concerns(event) {
    if (rows.has(event.task_id)) return true;
    const statusMatches = !status || !event.task_status || event.task_status === status;
    return statusMatches && belongsHere(event.task_id);
  }

  const unsubscribe = subscribe((event) => {
    if (event.type === "reset") loadPage().catch(showError);
    else if (event.type === "task.deleted") {
      rows.get(event.task_id)?.remove();
      rows.delete(event.task_id);
    } else if (event.task_id && concerns(event)) refresh(event.task_id).catch(showError);
  });

  loadPage().catch(showError);
  return () => {
    gone = true;
    unsubscribe();
  };
}

function showError(error) {
  notify(error.message, "error");
}

function taskRow(task, run) {
  const link = `#/tasks/${encodeURIComponent(task.id)}`;
  return h("tr", { dataset: { taskId: task.id, status: task.status } },
    h("td", {}, h("a", { href: link }, task.id)),
    h("td", {}, task.name),
    h("td", { class: "status" }, badge(h, task.status), task.paused ? badge(h, "paused") : null),
    h("td", {}, task.schedule_description ?? (task.scheduled_at ? "once" : "—")),
    h("td", {}, time(task.scheduled_at)),
    h("td", { class: "last-run" }, lastRun(task.last_run)),
    h("td", { class: "actions" },
      h("button", { type: "button", onclick: run }, "Run")),
  );
}

function lastRun(run) {
  if (!run) return "—";
  const exit = run.exit_code === null ? "" : ` · exit ${run.exit_code}`;
  return [badge(h, run.status), ` ${duration(run.duration)}${exit}`];
}
