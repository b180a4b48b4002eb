// Server-Sent Events read with fetch(): EventSource cannot send the Authorization header.

/** Read the event stream of `response` and call `onEvent({id, event, data})` for each
 * event (comments, such as keep-alives, are skipped). Resolves when the stream ends. */
export async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = blankEvent();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // A line ends with CRLF, LF or CR; the last piece may be a line still arriving.
      const lines = buffer.split(/\r\n|\n|\r(?!$)/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (event.data.length) onEvent({ id: event.id, event: event.event, data: event.data.join("\n") });
          event = blankEvent();
        } else if (!line.startsWith(":")) {
          readField(event, line);
        }
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function blankEvent() {
  return { id: null, event: "message", data: [] };
}

function readField(event, line) {
  const colon = line.indexOf(":");
  const name = colon < 0 ? line : line.slice(0, colon);
  const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
  if (name === "data") event.data.push(value);
  else if (name === "event") event.event = value;
  else if (name === "id") event.id = value;
}
