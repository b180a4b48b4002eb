// Building DOM nodes without HTML strings: every value from the API is text, never markup.

/** An element: `h("a", {href: "#/", class: "x", onclick: fn}, "text", child, ...)`. */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  element.append(...nodes(children));
  return element;
}

function nodes(children) {
  return children
    .flat(Infinity)
    .filter((child) => child !== null && child !== undefined && child !== false)
    .map((child) => (child instanceof Node ? child : String(child)));
}

/** Show a message for a few seconds at the top of the page (errors stay until closed). */
export function notify(text, kind = "info") {
  const close = h("button", { type: "button", class: "close", "aria-label": "close" }, "×");
  const message = h("div", { class: `message ${kind}`, role: kind === "error" ? "alert" : null },
    h("span", {}, text), close);
  close.addEventListener("click", () => message.remove());
  document.getElementById("messages").append(message);
  if (kind !== "error") setTimeout(() => message.remove(), 4000);
}

/** Ask a yes/no question in the confirmation dialog; resolves to true when confirmed. */
export function confirmAction(question, confirmLabel) {
  const dialog = document.getElementById("confirm");
  dialog.querySelector("[data-role=question]").textContent = question;
  dialog.querySelector("[data-role=confirm]").textContent = confirmLabel;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true });
  });
}
