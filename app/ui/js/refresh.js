// Re-fetching on events without piling up requests: while a fetch for a key is in flight,
// further events for it ask for one more fetch after it, not one each.

/** A function `refresh(key)` that runs `load(key)` at most once at a time per key. */
export function coalescing(load) {
  const running = new Map(); // key -> whether another run was asked for meanwhile
  return async function refresh(key) {
    if (running.has(key)) {
      running.set(key, true);
      return;
    }
    running.set(key, false);
    try {
      do {
        running.set(key, false);
        await load(key);
      } while (running.get(key));
    } finally {
      running.delete(key);
    }
  };
}
