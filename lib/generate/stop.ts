/**
 * Stop strings over streamed text: text that could be the start of a stop string is held back until
 * the next piece shows whether the stop string follows, so a stop string split over several tokens is
 * found and never emitted; the text before it is.
 */
import { argRangeError, argTypeError } from '../errors';
import { describe } from '../validate';

/** Checks `stop` (a string or a list of them, none empty); [] when undefined. */
export function checkStop(name: string, v: unknown): string[] {
  if (v === undefined) return [];
  const list = typeof v === 'string' ? [v] : v;
  if (!Array.isArray(list)) throw argTypeError(`${name} must be a string or an array of strings, got ${describe(v)}`);
  if (list.length > 64) throw argRangeError(`${name} must hold at most 64 strings, got ${list.length}`);
  list.forEach((s: unknown, i) => {
    if (typeof s !== 'string') throw argTypeError(`${name}[${i}] must be a string, got ${describe(s)}`);
    if (s.length === 0) throw argRangeError(`${name}[${i}] must not be empty`);
  });
  return list as string[];
}

export class StopMatcher {
  readonly #stops: readonly string[];
  #held = '';

  constructor(stops: readonly string[]) {
    this.#stops = stops;
  }

  /**
   * Adds text; returns the text now safe to emit, and whether a stop string was found (then `after`
   * holds what followed it).
   */
  push(text: string): { text: string; stopped: boolean; after?: string } {
    const buf = this.#held + text;
    // The stop string that ends first (ties: the longer one) wins, wherever the text was cut into pieces.
    let at = -1;
    let end = Infinity;
    for (const s of this.#stops) {
      const i = buf.indexOf(s);
      if (i >= 0 && (i + s.length < end || (i + s.length === end && i < at))) [at, end] = [i, i + s.length];
    }
    if (at >= 0) {
      this.#held = '';
      return { text: buf.slice(0, at), stopped: true, after: buf.slice(end) };
    }
    // Hold the longest end of the text that some stop string starts with.
    let hold = 0;
    for (const s of this.#stops)
      for (let k = Math.min(s.length - 1, buf.length); k > hold; k--)
        if (buf.endsWith(s.slice(0, k))) {
          hold = k;
          break;
        }
    this.#held = buf.slice(buf.length - hold);
    return { text: buf.slice(0, buf.length - hold), stopped: false };
  }

  /** The text held back, once no more text comes. */
  flush(): string {
    const rest = this.#held;
    this.#held = '';
    return rest;
  }
}
