// A new task (#/new): name and command, an id if the user wants one, and optionally a
// recurrence (a cron expression in a time zone, or an interval).

import { json } from "../api.js";
import { h, notify } from "../dom.js";

export function createPage(main) {
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const error = h("p", { class: "error", role: "alert" });
  const when = h("fieldset", { class: "when" });
  const form = h("form", { class: "create", onsubmit: submit },
    h("h1", {}, "New task"),
    field("Name", h("input", { name: "name", required: true, maxlength: 200 })),
    field("Command", h("textarea", { name: "command", required: true, rows: 3, placeholder: "echo hello" })),
    field("ID (optional)", h("input", { name: "id", pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,127}",
      placeholder: "generated when empty" })),
    h("fieldset", {}, h("legend", {}, "Repeat"),
      ["none", "cron", "every"].map((kind) => h("label", { class: "inline" },
        h("input", { type: "radio", name: "repeat", value: kind, checked: kind === "none", onchange: showWhen }),
        { none: " no", cron: " on a cron schedule", every: " every N seconds" }[kind]))),
    when,
    error,
    h("button", { type: "submit" }, "Create"));
  main.append(form);

  function showWhen() {
    const kind = form.elements.repeat.value;
    when.replaceChildren(...{
      none: [],
      cron: [
        field("Cron expression", h("input", { name: "cron", required: true, placeholder: "*/5 * * * *" })),
        field("Time zone", h("input", { name: "timezone", required: true, value: zone })),
      ],
      every: [field("Seconds", h("input", { name: "every", type: "number", min: 1, step: "any", required: true }))],
    }[kind]);
    when.hidden = kind === "none";
  }

  async function submit(event) {
    event.preventDefault();
    error.textContent = "";
    const values = Object.fromEntries(new FormData(form));
    let task;
    try {
      task = await json("POST", "/tasks", {
        body: { id: values.id || undefined, name: values.name, command: values.command },
      });
    } catch (failure) {
      error.textContent = failure.message;
      return;
    }
    const schedule = recurrence(values);
    if (schedule) {
      try {
        await json("POST", `/tasks/${encodeURIComponent(task.id)}/schedule`, { body: schedule });
      } catch (failure) {
        notify(`Task ${task.id} was created, but its schedule was refused: ${failure.message}`, "error");
      }
    }
    location.hash = `#/tasks/${encodeURIComponent(task.id)}`;
  }

  showWhen();
  return () => {};
}

function recurrence(values) {
  if (values.repeat === "cron") return { cron: values.cron, timezone: values.timezone };
  if (values.repeat === "every") return { every: Number(values.every) };
  return null;
}

function field(label, input) {
  return h("label", { class: "field" }, h("span", {}, label), input);
}
