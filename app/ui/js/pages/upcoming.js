// Upcoming fires (#/upcoming): every fire due in the next hours, in time order.

import { call } from "../api.js";
import { h, notify } from "../dom.js";
import { time } from "../format.js";
import { subscribe } from "../live.js";
import { coalescing } from "../refresh.js";

const WINDOWS = [1, 6, 24, 72]; // hours
const PAGE_SIZE = 200;

export function upcomingPage(main, { query }) {
  const hours = Number(query.get("hours")) || 24;
  const body = h("tbody");
  const more = h("button", { type: "button", hidden: true }, "Show more");
  let cursor = null;
  let gone = false;
  let span = null;

  const choice = h("select", { name: "hours", "aria-label": "Window", onchange: () => {
    location.hash = `#/upcoming?hours=${choice.value}`;
  } }, WINDOWS.map((n) => h("option", { value: n, selected: n === hours }, `next ${n} h`)));

  main.append(
    h("div", { class: "toolbar" }, h("h1", {}, "Upcoming fires"), choice),
    h("table", { class: "upcoming" },
      h("thead", {}, h("tr", {}, ["Due", "Task", "Name", "Kind"].map((t) => h("th", {}, t)))),
      body),
    more,
  );

  async function load(first) {
    if (first) {
      const from = new Date();
      span = { from: from.toISOString(), to: new Date(from.getTime() + hours * 3600e3).toISOString() };
      cursor = null;
    }
    const response = await call("GET", "/tasks/scheduled", {
      query: { ...span, limit: PAGE_SIZE, cursor },
    });
    const fires = await response.json();
    if (gone) return;
    cursor = response.headers.get("X-Next-Cursor");
    if (first) body.replaceChildren();
    body.append(...fires.map(fireRow));
    if (first && !fires.length) body.append(h("tr", {}, h("td", { colspan: 4 }, `Nothing due in the next ${hours} h.`)));
    more.hidden = !cursor;
  }

  more.addEventListener("click", () => load(false).catch(showError));
  // A task created, rescheduled, paused or deleted changes what is due: read it again.
  const reload = coalescing(() => load(true));
  const unsubscribe = subscribe((event) => {
    if (event.type === "reset" || event.type?.startsWith("task.")) reload("all").catch(showError);
  });
  load(true).catch(showError);
  return () => {
    gone = true;
    unsubscribe();
  };
}

function fireRow(fire) {
  return h("tr", { dataset: { taskId: fire.task_id, due: fire.due_at } },
    h("td", {}, time(fire.due_at)),
    h("td", {}, h("a", { href: `#/tasks/${encodeURIComponent(fire.task_id)}` }, fire.task_id)),
    h("td", {}, fire.name),
    h("td", {}, fire.retry ? "retry" : fire.recurring ? "recurring" : "once"));
}

function showError(error) {
  notify(error.message, "error");
}
