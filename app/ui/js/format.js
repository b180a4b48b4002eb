// How times, durations and outcomes read on the pages.

/** An RFC 3339 time in the browser's time zone as "2026-11-29 14:05:00", or "—". */
export function time(value) {
  if (!value) return "—";
  const moment = new Date(value);
  const two = (number) => String(number).padStart(2, "0");
  const day = `${moment.getFullYear()}-${two(moment.getMonth() + 1)}-${two(moment.getDate())}`;
  return `${day} ${two(moment.getHours())}:${two(moment.getMinutes())}:${two(moment.getSeconds())}`;
}

/** Seconds as "850 ms", "3.2 s", "4 min 5 s", "2 h 3 min". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

/** A status or outcome as a coloured badge's class and text. */
export function badge(h, status) {
  return h("span", { class: `badge status-${status}` }, status.replace("_", " "));
}

/** The program a task runs, as one line. */
export function program(task) {
  return task.command ?? JSON.stringify(task.args);
}
