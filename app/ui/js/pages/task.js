// One task (#/tasks/<id>, or #/tasks/<id>/runs/<run_id> with that run open): its settings,
// its runs newest first, a run's output (live while the command runs) and notifications,
// and the actions on it. Kept up to date by events.

import * as actions from "../actions.js";
import { ApiError, call, idsNamed, json } from "../api.js";
import { h, notify } from "../dom.js";
import { badge, duration, program, time } from "../format.js";
import { subscribe } from "../live.js";
import { coalescing } from "../refresh.js";
import { readEvents } from "../sse.js";

const RUNS_SHOWN = 20;
const RECONNECT_MS = 1000;

export function taskPage(main, { taskId, runId }) {
  const path = `/tasks/${encodeURIComponent(taskId)}`;
  const head = h("div", { class: "task-head" });
  const settings = h("dl", { class: "settings" });
  const runs = h("tbody");
  const unreadableRuns = h("div", { class: "error unreadable", role: "alert" });
  const output = h("section", { class: "output", hidden: true });
  let gone = false;
  let selectedRun = null;
  let stream = null; // the AbortController of the live output being read

  main.append(head,
    h("section", {}, h("h2", {}, "Settings"), settings),
    h("section", {}, h("h2", {}, "Runs"),
      h("table", { class: "runs" },
        h("thead", {}, h("tr", {}, ["Run", "Attempt", "Status", "Queued", "Started", "Duration", "Exit code", "Worker"]
          .map((title) => h("th", {}, title)))),
        runs),
      unreadableRuns),
    output);

  const refresh = coalescing(async () => {
    let task;
    try {
      task = await json("GET", path);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) return showDeleted();
      throw error;
    }
    const response = await call("GET", `${path}/runs`, { query: { limit: RUNS_SHOWN } });
    const history = await response.json();
    if (gone) return;
    showTask(task);
    showRuns(history);
    showUnreadableRuns(idsNamed(response, "X-Unreadable-Runs"));
  });

  function act(action) {
    return async () => {
      if (await action(taskId)) refresh("task").catch(showError);
    };
  }

  function showTask(task) {
    const running = task.status === "pending" || task.status === "running";
    head.replaceChildren(
      h("h1", {}, task.name, " ", badge(h, task.status), task.paused ? badge(h, "paused") : null),
      h("p", { class: "muted" }, "id ", h("code", {}, task.id)),
      h("div", { class: "actions" },
        h("button", { type: "button", onclick: runNow }, "Run now"),
        h("button", { type: "button", disabled: !running, onclick: act(actions.cancel) }, "Cancel"),
        task.schedule
          ? task.paused
            ? h("button", { type: "button", onclick: act(actions.resume) }, "Resume")
            : h("button", { type: "button", onclick: act(actions.pause) }, "Pause")
          : null,
        h("button", { type: "button", class: "danger", onclick: removeTask }, "Delete")),
    );
    settings.replaceChildren(...taskSettings(task).flatMap(([term, value]) => [
      h("dt", {}, term), h("dd", {}, value),
    ]));
  }

  /** Run it, and show the new run's output as it comes. */
  async function runNow() {
    const run = await actions.execute(taskId);
    if (!run) return;
    await refresh("task").catch(showError);
    selectRun(run.run_id);
  }

  async function removeTask() {
    if (await actions.remove(taskId)) location.hash = "#/";
  }

  function showDeleted() {
    head.replaceChildren(h("h1", {}, taskId), h("p", { class: "message error" }, "This task was deleted."));
    settings.replaceChildren();
    runs.replaceChildren();
    unreadableRuns.replaceChildren();
  }

  function showRuns(history) {
    runs.replaceChildren(...history.map((run) => h("tr", {
      class: run.run_id === selectedRun ? "selected" : null,
      dataset: { runId: run.run_id, status: run.status },
      onclick: () => selectRun(run.run_id),
    },
    h("td", {}, h("button", { type: "button", class: "link" }, run.run_id)),
    h("td", {}, run.attempt),
    h("td", {}, badge(h, run.status), run.timed_out ? " timed out" : "",
      run.error ? h("div", { class: "muted" }, run.error) : null),
    h("td", {}, time(run.queued_at)),
    h("td", {}, time(run.started_at)),
    h("td", {}, duration(run.duration)),
    h("td", {}, run.exit_code ?? "—"),
    h("td", {}, run.worker ?? "—"))));
    if (!history.length) runs.append(h("tr", {}, h("td", { colspan: 8 }, "No runs yet.")));
  }

  /** The runs the history left out because their stored documents cannot be read. */
  function showUnreadableRuns(ids) {
    if (!ids.length) return unreadableRuns.replaceChildren();
    const which = ids.length === 1 ? "Its stored document" : "Their stored documents";
    unreadableRuns.replaceChildren(
      h("span", {}, `Runs not listed: ${ids.join(", ")}. ${which} cannot be read.`));
  }

  async function selectRun(runId) {
    selectedRun = runId;
    stream?.abort();
    // The address names the run shown (to share or bookmark), without a new page.
    history.replaceState(null, "", `#${path}/runs/${encodeURIComponent(runId)}`);
    for (const row of runs.querySelectorAll("tr")) row.classList.toggle("selected", row.dataset.runId === runId);
    const state = h("p", { class: "run-state" });
    const text = h("pre", { class: "run-output" });
    output.hidden = false;
    const hooks = h("ul", { class: "notifications" });
    const chain = h("ul", { class: "chain" });
    output.replaceChildren(h("h2", {}, "Output of run ", h("code", {}, runId)), state, chain, hooks, text);
    try {
      const run = await json("GET", `${path}/runs/${encodeURIComponent(runId)}`);
      showChain(chain, run);
      if (run.status === "queued" || run.status === "running") {
        stream = new AbortController();
        await followOutput(runId, state, text, stream.signal);
      } else {
        showRunEnd(state, run);
        showNotifications(hooks, run.notifications ?? []);
        text.textContent = run.output || "(no output)";
      }
    } catch (error) {
      if (error.name !== "AbortError") state.textContent = error.message;
    }
  }

  /** Append the run's output as it is printed, until its `end` event; after a drop, read
   * it again from the start (the stream begins with the output kept so far). */
  async function followOutput(runId, state, text, signal) {
    for (;;) {
      state.replaceChildren(badge(h, "running"), " live output…");
      text.textContent = "";
      let ended = false;
      const response = await call("GET", `${path}/runs/${encodeURIComponent(runId)}/output`, {
        query: { follow: true }, signal,
      });
      try {
        await readEvents(response, (message) => {
          const data = JSON.parse(message.data);
          if (message.event === "output") text.append(data.text);
          if (message.event === "end") {
            ended = true;
            refresh("task").catch(showError);
            if (data) showRunEnd(state, data);
            else state.textContent = "The run was deleted.";
          }
        });
      } catch (error) {
        if (signal.aborted) throw error;
      }
      if (ended || signal.aborted) return;
      await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
    }
  }

  const unsubscribe = subscribe((event) => {
    if (event.type === "reset" || event.task_id === taskId) refresh("task").catch(showError);
  });
  refresh("task").catch(showError);
  if (runId) selectRun(runId);
  return () => {
    gone = true;
    stream?.abort();
    unsubscribe();
  };
}

function showRunEnd(state, run) {
  const exit = run.exit_code === null || run.exit_code === undefined ? "" : ` · exit ${run.exit_code}`;
  state.replaceChildren(badge(h, run.status), ` ${duration(run.duration)}${exit}`,
    run.truncated ? " · output truncated (head and tail kept)" : "",
    run.error ? ` · ${run.error}` : "");
}

/** How the run's webhooks went: one line each, as the API records them. */
function showNotifications(list, records) {
  list.replaceChildren(...records.map((record) => h("li", { dataset: { event: record.event } },
    h("code", {}, record.event), " → ", record.url, " ", badge(h, record.state),
    ` ${record.attempts} attempt${record.attempts === 1 ? "" : "s"}`,
    record.last_error ? ` · ${record.last_error}` : "",
    record.delivered_at ? ` · delivered ${time(record.delivered_at)}` : "")));
}

/** The task's webhooks, one line each. */
function notifySettings(notify) {
  if (!notify) return "—";
  return Object.entries(notify).map(([event, target]) => h("div", {}, h("code", {}, event), " → ",
    typeof target === "string" ? target : `${target.url} after ${duration(target.after)}`));
}

/** A link to another task's page (its id as the text). */
function taskLink(taskId) {
  return h("a", { href: `#/tasks/${encodeURIComponent(taskId)}` }, taskId);
}

/** The tasks this one's end triggers: a line for success, one for failure. */
function chainSettings(chain) {
  const lines = [["on_success", chain?.on_success ?? []], ["on_failure", chain?.on_failure ?? []]]
    .filter(([, targets]) => targets.length)
    .map(([when, targets]) => h("div", { dataset: { chain: when } }, h("code", {}, when), " → ",
      ...targets.flatMap((target, index) => [index ? ", " : "", taskLink(target)])));
  return lines.length ? lines : "—";
}

/** Where a run came from and what its end set off (chained tasks), a line each. */
function showChain(list, run) {
  const lines = [];
  if (run.triggered_by) {
    const by = run.triggered_by;
    lines.push(h("li", { dataset: { chain: "triggered-by" } }, "triggered by ", taskLink(by.task_id),
      " run ", h("a", { href: `#/tasks/${encodeURIComponent(by.task_id)}/runs/${encodeURIComponent(by.run_id)}` },
        by.run_id)));
  }
  for (const target of run.triggered ?? []) {
    lines.push(h("li", { dataset: { chain: "triggered" } }, "triggered ", taskLink(target.task_id), " ",
      badge(h, target.outcome), target.run_id ? ` run ${target.run_id}` : ""));
  }
  list.replaceChildren(...lines);
}

function taskSettings(task) {
  const schedule = task.schedule;
  return [
    [task.command !== null ? "Command" : "Arguments", h("code", {}, program(task))],
    ["Description", task.description || "—"],
    ["Schedule", schedule
      ? [task.schedule_description, " ", h("code", { class: "muted" }, schedule.cron ?? `every ${schedule.every} s`)]
      : task.scheduled_at ? `once, at ${time(task.scheduled_at)}` : "—"],
    ["Next runs", task.next_runs.length ? task.next_runs.map(time).join(", ") : time(task.scheduled_at)],
    ["Timeout", task.timeout ? duration(task.timeout) : "none"],
    ["Attempts", `${task.max_attempts} (backoff ${task.retry_backoff} s)`],
    ["Misfires", `${task.misfire} (grace ${task.misfire_grace} s)`],
    ["Overlap", task.overlap],
    ["Queue", h("code", {}, task.queue)],
    ["Chain", chainSettings(task.chain)],
    ["Working directory", task.cwd ?? "—"],
    ["Notifications", notifySettings(task.notify)],
    ["Environment", Object.entries(task.env).map(([name, value]) => `${name}=${value}`).join(" ") || "—"],
    ["Created", time(task.created_at)],
    ["Updated", time(task.updated_at)],
  ];
}

function showError(error) {
  notify(error.message, "error");
}
