/**
 * Which byte strings can continue a JSON object text (RFC 8259, with an object at the top, as OpenAI's
 * JSON mode asks): a pushdown automaton over bytes, small enough to copy for every candidate token.
 * Bytes from 0x80 on are accepted inside strings (the parts of UTF-8 characters a token may hold) and
 * nowhere else.
 */

// Modes of the automaton: what the next byte may be.
const START = 0; // before the top-level object: space or '{'
const VALUE = 1; // a value (after ':' or ',' in an array)
const OBJ_FIRST = 2; // after '{': a key or '}'
const OBJ_KEY = 3; // after ',' in an object: a key
const COLON = 4; // after a key
const ARR_FIRST = 5; // after '[': a value or ']'
const AFTER = 6; // after a value in a container: ',' or the closing bracket
const STR = 7; // inside a string
const STR_ESC = 8; // after '\' in a string
const STR_HEX = 9; // in the 4 hex digits of '\u' (aux: digits left)
const N_MINUS = 10; // after '-': a digit
const N_ZERO = 11; // after a leading '0'
const N_INT = 12; // in the integer digits
const N_DOT = 13; // after '.': a digit
const N_FRAC = 14; // in the fraction digits
const N_E = 15; // after 'e': a sign or a digit
const N_ESIGN = 16; // after the exponent's sign: a digit
const N_EXP = 17; // in the exponent digits
const LITERAL = 18; // inside true, false or null (aux: bytes matched)
const DONE = 19; // the object is complete: space only

const LITERALS = ['true', 'false', 'null'];
const LITERAL_OF: Record<number, number> = { 0x74: 0, 0x66: 1, 0x6e: 2 };

/** Where the automaton is; jsonStep changes it in place. */
export interface JsonState {
  mode: number;
  /** STR_HEX: digits left; LITERAL: bytes matched. */
  aux: number;
  /** Whether the string being read is an object key. */
  key: boolean;
  /** LITERAL: which of true, false, null. */
  literal: number;
  /** Open containers, innermost last: 'o' an object, 'a' an array. */
  stack: string;
}

export const JSON_START: Readonly<JsonState> = { mode: START, aux: 0, key: false, literal: 0, stack: '' };

const isSpace = (b: number) => b === 0x20 || b === 0x0a || b === 0x0d || b === 0x09;
const isDigit = (b: number) => b >= 0x30 && b <= 0x39;
const isHex = (b: number) => isDigit(b) || (b >= 0x41 && b <= 0x46) || (b >= 0x61 && b <= 0x66);
const isEscape = (b: number) =>
  b === 0x22 || b === 0x5c || b === 0x2f || b === 0x62 || b === 0x66 || b === 0x6e || b === 0x72 || b === 0x74;

/** Whether the text so far is a whole JSON object (only space may follow). */
export function jsonComplete(s: Readonly<JsonState>): boolean {
  return s.mode === DONE;
}

/** Whether the state is inside a string, where any byte but '"', '\' and control bytes stays inside. */
export function jsonInString(s: Readonly<JsonState>): boolean {
  return s.mode === STR;
}

/** The end of a value: back to its container, or the end of the text. */
function valueDone(s: JsonState): void {
  s.mode = s.stack.length === 0 ? DONE : AFTER;
}

/** A value starting with byte b; false if no value starts with it. */
function startValue(s: JsonState, b: number): boolean {
  if (b === 0x7b) [s.mode, s.stack] = [OBJ_FIRST, s.stack + 'o'];
  else if (b === 0x5b) [s.mode, s.stack] = [ARR_FIRST, s.stack + 'a'];
  else if (b === 0x22) [s.mode, s.key] = [STR, false];
  else if (b === 0x2d) s.mode = N_MINUS;
  else if (b === 0x30) s.mode = N_ZERO;
  else if (isDigit(b)) s.mode = N_INT;
  else if (LITERAL_OF[b] !== undefined) [s.mode, s.literal, s.aux] = [LITERAL, LITERAL_OF[b], 1];
  else return false;
  return true;
}

function closeContainer(s: JsonState): void {
  s.stack = s.stack.slice(0, -1);
  valueDone(s);
}

/** Moves `s` past byte `b`; false (and `s` in no useful state) when the byte cannot come next. */
export function jsonStep(s: JsonState, b: number): boolean {
  for (;;) {
    switch (s.mode) {
      case START:
        if (b === 0x7b) [s.mode, s.stack] = [OBJ_FIRST, 'o'];
        else return isSpace(b);
        return true;
      case VALUE:
        return isSpace(b) || startValue(s, b);
      case OBJ_FIRST:
      case OBJ_KEY:
        if (b === 0x22) [s.mode, s.key] = [STR, true];
        else if (b === 0x7d && s.mode === OBJ_FIRST) closeContainer(s);
        else return isSpace(b);
        return true;
      case COLON:
        if (b === 0x3a) s.mode = VALUE;
        else return isSpace(b);
        return true;
      case ARR_FIRST:
        if (b === 0x5d) closeContainer(s);
        else return isSpace(b) || startValue(s, b);
        return true;
      case AFTER: {
        const top = s.stack.charCodeAt(s.stack.length - 1); // 0x6f 'o', 0x61 'a'
        if (b === 0x2c) s.mode = top === 0x6f ? OBJ_KEY : VALUE;
        else if ((b === 0x7d && top === 0x6f) || (b === 0x5d && top === 0x61)) closeContainer(s);
        else return isSpace(b);
        return true;
      }
      case STR:
        if (b === 0x22) {
          if (s.key) s.mode = COLON;
          else valueDone(s);
        } else if (b === 0x5c) s.mode = STR_ESC;
        else return b >= 0x20;
        return true;
      case STR_ESC:
        if (b === 0x75) [s.mode, s.aux] = [STR_HEX, 4];
        else if (isEscape(b)) s.mode = STR;
        else return false;
        return true;
      case STR_HEX:
        if (!isHex(b)) return false;
        if (--s.aux === 0) s.mode = STR;
        return true;
      case N_MINUS:
        if (b === 0x30) s.mode = N_ZERO;
        else if (isDigit(b)) s.mode = N_INT;
        else return false;
        return true;
      case N_DOT:
      case N_ESIGN:
        if (!isDigit(b)) return false;
        s.mode = s.mode === N_DOT ? N_FRAC : N_EXP;
        return true;
      case N_E:
        if (b === 0x2b || b === 0x2d) s.mode = N_ESIGN;
        else if (isDigit(b)) s.mode = N_EXP;
        else return false;
        return true;
      case N_ZERO:
      case N_INT:
      case N_FRAC:
      case N_EXP:
        if (isDigit(b) && s.mode !== N_ZERO) return true;
        if (b === 0x2e && (s.mode === N_ZERO || s.mode === N_INT)) s.mode = N_DOT;
        else if ((b === 0x65 || b === 0x45) && s.mode !== N_EXP) s.mode = N_E;
        else {
          // The number ended before this byte, which is read after the value.
          valueDone(s);
          continue;
        }
        return true;
      case LITERAL:
        if (b !== LITERALS[s.literal].charCodeAt(s.aux)) return false;
        if (++s.aux === LITERALS[s.literal].length) valueDone(s);
        return true;
      default: // DONE
        return isSpace(b);
    }
  }
}

/**
 * The state after `bytes` from state `s` (left as it is), or null when they cannot continue a JSON
 * object text.
 */
export function jsonAdvance(s: Readonly<JsonState>, bytes: Uint8Array): JsonState | null {
  const next = { ...s };
  for (let i = 0; i < bytes.length; i++) if (!jsonStep(next, bytes[i])) return null;
  return next;
}
