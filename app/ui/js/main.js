// The dashboard's entry point: a router over hash URLs, and the live event follower.

import { forgetToken, hasToken } from "./api.js";
import { followEvents } from "./live.js";
import { createPage } from "./pages/create.js";
import { taskPage } from "./pages/task.js";
import { tasksPage } from "./pages/tasks.js";
import { upcomingPage } from "./pages/upcoming.js";

// [pattern over the hash's path, page, names of the captured groups]
const ROUTES = [
  [/^\/?$/, tasksPage, []],
  [/^\/tasks\/([^/]+)$/, taskPage, ["taskId"]],
  [/^\/tasks\/([^/]+)\/runs\/([^/]+)$/, taskPage, ["taskId", "runId"]],
  [/^\/upcoming$/, upcomingPage, []],
  [/^\/new$/, createPage, []],
];

let leavePage = () => {};

/** Show the page the hash names; each page returns the function that stops it. */
function route() {
  leavePage();
  const [path, search = ""] = location.hash.replace(/^#/, "").split("?");
  const main = document.querySelector("main");
  main.replaceChildren();
  for (const [pattern, page, names] of ROUTES) {
    const match = pattern.exec(path);
    if (!match) continue;
    const params = { query: new URLSearchParams(search) };
    names.forEach((name, index) => { params[name] = decodeURIComponent(match[index + 1]); });
    leavePage = page(main, params);
    markCurrent(path);
    return;
  }
  main.textContent = "No such page.";
  leavePage = () => {};
}

function markCurrent(path) {
  for (const link of document.querySelectorAll("header nav a")) {
    const target = link.getAttribute("href").replace(/^#/, "");
    link.classList.toggle("current", target === path || (target === "/" && path === ""));
  }
}

const signOut = document.getElementById("sign-out");
signOut.hidden = !hasToken();
signOut.addEventListener("click", () => {
  forgetToken();
  location.reload();
});

window.addEventListener("hashchange", route);
route();
followEvents(document.getElementById("live"));
