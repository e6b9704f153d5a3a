/**
 * Which byte strings can continue a JSON text that a schema accepts: a pushdown automaton over bytes
 * (RFC 8259), small enough to copy for every candidate token. JSON mode is the schema of any object.
 *
 * Of JSON Schema it follows what decides which bytes may come: `type` (one or a list), `properties`
 * with `required` and `additionalProperties` (false, true or a schema), `items`, `enum` and `const`,
 * `anyOf` / `oneOf` whose branches start with different characters (an object and a string, say),
 * and `$ref` into `$defs` / `definitions` (recursion included). Keywords that only bound values
 * (`minLength`, `maximum`, `pattern`, `format`, `minItems`, ...) are not enforced; keywords that would
 * change the structure in other ways (`allOf`, `not`, `if`, `patternProperties`, `prefixItems`, ...)
 * are refused. Bytes from 0x80 on are accepted inside strings (the parts of UTF-8 characters a token
 * may hold) and nowhere else.
 */
import { argRangeError, argTypeError, messageOf } from '../errors';
import { describe, isRecord } from '../validate';

const TYPES = ['object', 'array', 'string', 'number', 'integer', 'boolean', 'null'] as const;
type JsonType = (typeof TYPES)[number];

export interface SchemaNode {
  types: ReadonlySet<JsonType>;
  /** Object: the known keys (as written inside a JSON string, escapes included) and their schemas. */
  keys: readonly string[];
  properties: ReadonlyMap<string, SchemaNode>;
  required: ReadonlySet<string>;
  /** Object: the schema of other keys, or null when no other key may come. */
  additional: SchemaNode | null;
  items: SchemaNode | null;
  /** enum / const: the JSON texts the value must be one of. */
  choices: readonly string[] | null;
  /** anyOf / oneOf: branches, told apart by the first byte of the value. */
  branches: readonly SchemaNode[] | null;
}

/** Any JSON value. */
const ANY: SchemaNode = {
  types: new Set(TYPES),
  keys: [],
  properties: new Map(),
  required: new Set(),
  additional: null,
  items: null,
  choices: null,
  branches: null,
};
(ANY as { additional: SchemaNode }).additional = ANY;
(ANY as { items: SchemaNode }).items = ANY;

/** Any object: what JSON mode asks for. */
export const ANY_OBJECT: SchemaNode = { ...ANY, types: new Set(['object']) };

/**
 * Bounds on a schema's size: each byte of the mask scans the enum values or the keys of the value being
 * written, so a request must not bring a hundred thousand of them.
 */
const MAX_CHOICES = 1024;
const MAX_PROPERTIES = 1024;
const MAX_NODES = 10000;
/** Schemas inside schemas, at most (the compiler recurses). */
const MAX_DEPTH = 64;

/** Keywords that only bound values or describe them: accepted, not enforced. */
const IGNORED = new Set([
  '$schema',
  '$id',
  '$comment',
  'title',
  'description',
  'default',
  'examples',
  'deprecated',
  'readOnly',
  'writeOnly',
  'format',
  'pattern',
  'minLength',
  'maxLength',
  'minimum',
  'maximum',
  'exclusiveMinimum',
  'exclusiveMaximum',
  'multipleOf',
  'minItems',
  'maxItems',
  'uniqueItems',
  'minProperties',
  'maxProperties',
  'strict',
]);
const HANDLED = new Set([
  'type',
  'properties',
  'required',
  'additionalProperties',
  'items',
  'enum',
  'const',
  'anyOf',
  'oneOf',
  '$ref',
  '$defs',
  'definitions',
]);

/** Which value kinds start with a byte: 0 object, 1 array, 2 string, 3 number, 4 boolean, 5 null. */
function kindsOf(node: SchemaNode, visiting = new Set<SchemaNode>()): Set<number> {
  if (node.branches) {
    // A branch that leads back here before any value starts would never start one.
    if (visiting.has(node)) throw argRangeError('a schema refers to itself through anyOf or $ref alone');
    visiting.add(node);
    const kinds = new Set(node.branches.flatMap((b) => [...kindsOf(b, visiting)]));
    visiting.delete(node);
    return kinds;
  }
  if (node.choices) return new Set(node.choices.map((c) => kindOfByte(c.charCodeAt(0))));
  const out = new Set<number>();
  for (const t of node.types)
    out.add(t === 'object' ? 0 : t === 'array' ? 1 : t === 'string' ? 2 : t === 'boolean' ? 4 : t === 'null' ? 5 : 3);
  return out;
}
function kindOfByte(b: number): number {
  if (b === 0x7b) return 0;
  if (b === 0x5b) return 1;
  if (b === 0x22) return 2;
  if (b === 0x74 || b === 0x66) return 4;
  if (b === 0x6e) return 5;
  return b === 0x2d || (b >= 0x30 && b <= 0x39) ? 3 : -1;
}

/** A JSON text of `v` as the bytes the model writes (one char a byte). */
const latin1 = (text: string) => Buffer.from(text, 'utf8').toString('latin1');

/**
 * The automaton's schema from a JSON Schema; `name` is what errors call the argument. Refuses what the
 * automaton cannot follow, naming the keyword and where it is.
 */
export function compileSchema(schema: unknown, name: string): SchemaNode {
  if (!isRecord(schema)) throw argTypeError(`${name} must be a JSON Schema object, got ${describe(schema)}`);
  const root = schema;
  const defs = new Map<string, SchemaNode>();
  let nodes = 0;
  const compile = (s: unknown, at: string, depth = 0): SchemaNode => {
    if (++nodes > MAX_NODES) throw argRangeError(`${name} has more than ${MAX_NODES} schemas in it`);
    if (depth > MAX_DEPTH) throw argRangeError(`${at}: schemas nest deeper than ${MAX_DEPTH} levels`);
    const inner = (v: unknown, path: string) => compile(v, path, depth + 1);
    if (s === true || (isRecord(s) && Object.keys(s).every((k) => IGNORED.has(k)))) return ANY;
    if (!isRecord(s)) throw argTypeError(`${at} must be a schema object, got ${describe(s)}`);
    for (const k of Object.keys(s))
      if (!HANDLED.has(k) && !IGNORED.has(k))
        throw argRangeError(`${at}: the keyword '${k}' is not supported in a response schema`);
    if (typeof s.$ref === 'string') {
      const m = /^#\/(\$defs|definitions)\/(.+)$/.exec(s.$ref);
      const target = m && isRecord(root[m[1]]) ? (root[m[1]] as Record<string, unknown>)[m[2]] : undefined;
      if (!m || target === undefined) throw argRangeError(`${at}.$ref: ${JSON.stringify(s.$ref)} names no definition`);
      let node = defs.get(s.$ref);
      if (!node) {
        // Placed first, filled after: a definition may refer to itself.
        node = { ...ANY };
        defs.set(s.$ref, node);
        const resolved = inner(target, `${at}.$ref`);
        if (resolved === node) throw argRangeError(`${at}.$ref: ${JSON.stringify(s.$ref)} refers to itself alone`);
        Object.assign(node, resolved);
      }
      return node;
    }
    const alternatives = s.anyOf ?? s.oneOf;
    if (alternatives !== undefined) {
      const key = s.anyOf !== undefined ? 'anyOf' : 'oneOf';
      if (!Array.isArray(alternatives) || alternatives.length === 0)
        throw argTypeError(`${at}.${key} must be a non-empty array of schemas`);
      const branches = alternatives.map((a, i) => inner(a, `${at}.${key}[${i}]`));
      const seen = new Set<number>();
      branches.forEach((b, i) => {
        for (const k of kindsOf(b)) {
          if (seen.has(k))
            throw argRangeError(
              `${at}.${key}[${i}]: branches must start with different kinds of value (object, array, string, number, boolean, null)`,
            );
          seen.add(k);
        }
      });
      return { ...ANY, types: new Set(), branches };
    }
    let types: Set<JsonType>;
    if (s.type === undefined) types = new Set(TYPES);
    else {
      const list = Array.isArray(s.type) ? s.type : [s.type];
      for (const t of list)
        if (!TYPES.includes(t as JsonType))
          throw argRangeError(`${at}.type must be one of ${TYPES.join(', ')} (or a list of them), got ${describe(t)}`);
      types = new Set(list as JsonType[]);
    }
    let choices: string[] | null = null;
    if (s.const !== undefined) choices = [latin1(JSON.stringify(s.const))];
    else if (s.enum !== undefined) {
      if (!Array.isArray(s.enum) || s.enum.length === 0) throw argTypeError(`${at}.enum must be a non-empty array`);
      if (s.enum.length > MAX_CHOICES)
        throw argRangeError(`${at}.enum holds ${s.enum.length} values; at most ${MAX_CHOICES} are taken`);
      choices = s.enum.map((v) => latin1(JSON.stringify(v)));
    }
    const properties = new Map<string, SchemaNode>();
    const keys: string[] = [];
    if (s.properties !== undefined) {
      if (!isRecord(s.properties)) throw argTypeError(`${at}.properties must be an object of schemas`);
      if (Object.keys(s.properties).length > MAX_PROPERTIES)
        throw argRangeError(`${at}.properties holds more than ${MAX_PROPERTIES} keys`);
      for (const [k, v] of Object.entries(s.properties)) {
        const written = latin1(JSON.stringify(k).slice(1, -1));
        keys.push(written);
        properties.set(written, inner(v, `${at}.properties[${JSON.stringify(k)}]`));
      }
    }
    const required = new Set<string>();
    if (s.required !== undefined) {
      if (!Array.isArray(s.required) || !s.required.every((k) => typeof k === 'string'))
        throw argTypeError(`${at}.required must be an array of property names`);
      for (const k of s.required) {
        const written = latin1(JSON.stringify(k).slice(1, -1));
        if (!properties.has(written))
          throw argRangeError(`${at}.required names '${k}', which is not in its properties`);
        required.add(written);
      }
    }
    const extra = s.additionalProperties;
    const additional =
      extra === false ? null : extra === undefined || extra === true ? ANY : inner(extra, `${at}.additionalProperties`);
    const items = s.items === undefined ? ANY : inner(s.items, `${at}.items`);
    return { types, keys, properties, required, additional, items, choices, branches: null };
  };
  const compiled = compile(schema, name);
  // Every anyOf, now that each $ref is filled: which kinds of value each branch starts, once.
  const seen = new Set<SchemaNode>();
  const visit = (node: SchemaNode | null): void => {
    if (!node || seen.has(node)) return;
    seen.add(node);
    if (node.branches) {
      try {
        branchKinds.set(
          node,
          node.branches.map((b) => kindsOf(b)),
        );
      } catch (err) {
        throw argRangeError(`${name}: ${messageOf(err)}`);
      }
      node.branches.forEach(visit);
    }
    node.properties.forEach(visit);
    visit(node.additional);
    visit(node.items);
  };
  visit(compiled);
  return compiled;
}

/** The kinds of value (kindOfByte) each branch of an anyOf starts with. */
const branchKinds = new WeakMap<SchemaNode, Set<number>[]>();

/**
 * Space bytes a gap between two tokens of the text may hold: enough for indented output, few enough
 * that a model cannot spend the rest of its tokens on space (a known way for constrained decoding to
 * go wrong).
 */
export const MAX_GAP = 32;

// Modes of the automaton: what the next byte may be.
const START = 0; // before the value
const VALUE = 1; // a value of `node` (after ':' or ',' in an array)
const OBJ_FIRST = 2; // after '{': a key or '}'
const OBJ_KEY = 3; // after ',' in an object: a key
const COLON = 4; // after a key
const ARR_FIRST = 5; // after '[': a value or ']'
const AFTER = 6; // after a value in a container: ',' or the closing bracket
const STR = 7; // inside a string (a key when `key`)
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
const CHOICE = 19; // inside an enum or const value (`text`: its bytes so far)
const DONE = 20; // the value is complete: space only
const PREFIX = 21; // in the text before the value (aux: bytes matched)
const SUFFIX = 22; // in the text after the value (aux: bytes matched)

const LITERALS = ['true', 'false', 'null'];
const LITERAL_OF: Record<number, number> = { 0x74: 0, 0x66: 1, 0x6e: 2 };

/** An open container: immutable, shared by the states that copy it. */
interface Frame {
  readonly object: boolean;
  readonly node: SchemaNode;
  /** Object: '1' for each of node.keys already written. */
  readonly seen: string;
  readonly parent: Frame | null;
}

/** Where the automaton is; step() changes it in place. */
export interface JsonState {
  mode: number;
  /** STR_HEX: digits left; LITERAL: bytes matched. */
  aux: number;
  /** STR: whether the string is an object key; numbers: whether only an integer fits. */
  key: boolean;
  /** LITERAL: which of true, false, null. */
  literal: number;
  /** The schema of the value to come (VALUE, START) or being written (CHOICE). */
  node: SchemaNode;
  /** A key's bytes so far (STR with key), an enum value's (CHOICE). */
  text: string;
  frame: Frame | null;
  /** Space bytes in the current gap between tokens of the text. */
  spaces: number;
  /** Exact text before and after the value (one char a byte), if any. */
  wrap: Readonly<{ prefix: string; suffix: string }> | null;
}

const isSpace = (b: number) => b === 0x20 || b === 0x0a || b === 0x0d || b === 0x09;
const isDigit = (b: number) => b >= 0x30 && b <= 0x39;
const isHex = (b: number) => isDigit(b) || (b >= 0x41 && b <= 0x46) || (b >= 0x61 && b <= 0x66);
const isEscape = (b: number) =>
  b === 0x22 || b === 0x5c || b === 0x2f || b === 0x62 || b === 0x66 || b === 0x6e || b === 0x72 || b === 0x74;

/** The state before a text of `root`, with `wrap`'s exact text (bytes as chars) around the value. */
export function jsonStart(root: SchemaNode, wrap?: { prefix: string; suffix: string }): JsonState {
  const w = wrap && (wrap.prefix !== '' || wrap.suffix !== '') ? wrap : null;
  return {
    mode: w && w.prefix !== '' ? PREFIX : START,
    aux: 0,
    key: false,
    literal: 0,
    node: root,
    text: '',
    frame: null,
    spaces: 0,
    wrap: w,
  };
}

export function copyState(from: Readonly<JsonState>, to: JsonState): void {
  to.mode = from.mode;
  to.aux = from.aux;
  to.key = from.key;
  to.literal = from.literal;
  to.node = from.node;
  to.text = from.text;
  to.frame = from.frame;
  to.spaces = from.spaces;
  to.wrap = from.wrap;
}

/** Whether the text so far is a whole value (only space may follow). */
export function jsonComplete(s: Readonly<JsonState>): boolean {
  return s.mode === DONE;
}

/**
 * Whether any bytes but '"', '\' and control bytes may come next (inside a string of any text: a value,
 * or a key where keys the schema does not name may come).
 */
export function jsonTakesPlainText(s: Readonly<JsonState>): boolean {
  return s.mode === STR && (!s.key || s.frame!.node.additional !== null);
}

function valueDone(s: JsonState): void {
  if (s.frame !== null) s.mode = AFTER;
  else if (s.wrap && s.wrap.suffix !== '') [s.mode, s.aux] = [SUFFIX, 0];
  else s.mode = DONE;
}

/** The keys of the innermost object that may still be written (its known keys not yet written). */
function keyFits(frame: Frame, text: string, whole: boolean): boolean {
  const { keys } = frame.node;
  for (let i = 0; i < keys.length; i++)
    if (frame.seen.charCodeAt(i) !== 0x31 && (whole ? keys[i] === text : keys[i].startsWith(text))) return true;
  return false;
}

/** Whether the object of `frame` may take one more key. */
function moreKeys(frame: Frame): boolean {
  return frame.node.additional !== null || frame.seen.indexOf('0') >= 0 || frame.seen.length < frame.node.keys.length;
}

/** Whether the object of `frame` has every required key. */
function requiredDone(frame: Frame): boolean {
  const { keys, required } = frame.node;
  if (required.size === 0) return true;
  for (let i = 0; i < keys.length; i++) if (required.has(keys[i]) && frame.seen.charCodeAt(i) !== 0x31) return false;
  return true;
}

/** A value of `node` starting with byte b; false if none does. */
function startValue(s: JsonState, node: SchemaNode, b: number): boolean {
  if (node.branches) {
    const kind = kindOfByte(b);
    const kinds = branchKinds.get(node)!;
    const i = kinds.findIndex((k) => k.has(kind));
    return i >= 0 && startValue(s, node.branches[i], b);
  }
  if (node.choices) {
    const t = String.fromCharCode(b);
    if (!node.choices.some((c) => c.startsWith(t))) return false;
    [s.mode, s.node, s.text] = [CHOICE, node, t];
    return true;
  }
  const types = node.types;
  if (b === 0x7b && types.has('object')) {
    s.frame = { object: true, node, seen: '', parent: s.frame };
    s.mode = OBJ_FIRST;
  } else if (b === 0x5b && types.has('array')) {
    s.frame = { object: false, node, seen: '', parent: s.frame };
    s.mode = ARR_FIRST;
  } else if (b === 0x22 && types.has('string')) [s.mode, s.key] = [STR, false];
  else if ((b === 0x2d || isDigit(b)) && (types.has('number') || types.has('integer'))) {
    s.mode = b === 0x2d ? N_MINUS : b === 0x30 ? N_ZERO : N_INT;
    s.key = !types.has('number'); // an integer: no fraction, no exponent
  } else if (LITERAL_OF[b] !== undefined && types.has(b === 0x6e ? 'null' : 'boolean'))
    [s.mode, s.literal, s.aux] = [LITERAL, LITERAL_OF[b], 1];
  else return false;
  return true;
}

function closeContainer(s: JsonState): void {
  s.frame = s.frame!.parent;
  valueDone(s);
}

/** A space byte in a gap between tokens of the text, while the gap has room. */
function gap(s: JsonState, b: number): boolean {
  return isSpace(b) && ++s.spaces <= MAX_GAP;
}

/** Moves `s` past byte `b`; false (and `s` in no useful state) when the byte cannot come next. */
export function jsonStep(s: JsonState, b: number): boolean {
  if (!isSpace(b)) s.spaces = 0;
  for (;;) {
    switch (s.mode) {
      case START:
      case VALUE:
        return gap(s, b) || startValue(s, s.node, b);
      case OBJ_FIRST:
      case OBJ_KEY: {
        const f = s.frame!;
        if (b === 0x22 && (f.node.additional !== null || keyFits(f, '', false)))
          [s.mode, s.key, s.text] = [STR, true, ''];
        else if (b === 0x7d && s.mode === OBJ_FIRST && requiredDone(f)) closeContainer(s);
        else return gap(s, b);
        return true;
      }
      case COLON:
        if (b === 0x3a) s.mode = VALUE;
        else return gap(s, b);
        return true;
      case ARR_FIRST:
        if (b === 0x5d) closeContainer(s);
        else return gap(s, b) || startValue(s, s.frame!.node.items!, b);
        return true;
      case AFTER: {
        const f = s.frame!;
        if (b === 0x2c && f.object && moreKeys(f)) s.mode = OBJ_KEY;
        else if (b === 0x2c && !f.object) [s.mode, s.node] = [VALUE, f.node.items!];
        else if ((b === 0x7d && f.object && requiredDone(f)) || (b === 0x5d && !f.object)) closeContainer(s);
        else return gap(s, b);
        return true;
      }
      case STR:
        if (b === 0x22) {
          if (!s.key) valueDone(s);
          else if (!endKey(s)) return false;
          return true;
        }
        if (b < 0x20) return false;
        if (s.key && !extendKey(s, b)) return false;
        if (b === 0x5c) s.mode = STR_ESC;
        return true;
      case STR_ESC:
        if (s.key && !extendKey(s, b)) return false;
        if (b === 0x75) [s.mode, s.aux] = [STR_HEX, 4];
        else if (isEscape(b)) s.mode = STR;
        else return false;
        return true;
      case STR_HEX:
        if (!isHex(b) || (s.key && !extendKey(s, b))) return false;
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
        if (b === 0x2e && !s.key && (s.mode === N_ZERO || s.mode === N_INT)) s.mode = N_DOT;
        else if ((b === 0x65 || b === 0x45) && !s.key && s.mode !== N_EXP) s.mode = N_E;
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
      case CHOICE: {
        const longer = s.text + String.fromCharCode(b);
        if (s.node.choices!.some((c) => c.startsWith(longer))) {
          s.text = longer;
          return true;
        }
        if (!s.node.choices!.includes(s.text)) return false;
        valueDone(s); // the value ended before this byte
        continue;
      }
      case PREFIX:
      case SUFFIX: {
        const text = s.mode === PREFIX ? s.wrap!.prefix : s.wrap!.suffix;
        if (b !== text.charCodeAt(s.aux)) return false;
        if (++s.aux === text.length) [s.mode, s.aux] = [s.mode === PREFIX ? START : DONE, 0];
        return true;
      }
      default: // DONE
        return gap(s, b);
    }
  }
}

/** A key's next byte: it must keep the key a prefix of one that may come (any, where others may). */
function extendKey(s: JsonState, b: number): boolean {
  const f = s.frame!;
  if (f.node.keys.length === 0) return f.node.additional !== null; // any key: no need to know which
  const text = s.text + String.fromCharCode(b);
  if (f.node.additional === null && !keyFits(f, text, false)) return false;
  s.text = text;
  return true;
}

/** The closing quote of a key: the value to come is that key's (a known key once only). */
function endKey(s: JsonState): boolean {
  const f = s.frame!;
  const i = f.node.keys.indexOf(s.text);
  if (i >= 0) {
    if (f.seen.charCodeAt(i) === 0x31) return false;
    const seen = f.seen.padEnd(f.node.keys.length, '0');
    s.frame = { ...f, seen: seen.slice(0, i) + '1' + seen.slice(i + 1) };
    s.node = f.node.properties.get(s.text)!;
  } else if (f.node.additional !== null) s.node = f.node.additional;
  else return false;
  s.mode = COLON;
  return true;
}

/**
 * The state after `bytes` from state `s` (left as it is), or null when they cannot continue a text
 * of the schema.
 */
export function jsonAdvance(s: Readonly<JsonState>, bytes: Uint8Array): JsonState | null {
  const next = { ...s };
  for (let i = 0; i < bytes.length; i++) if (!jsonStep(next, bytes[i])) return null;
  return next;
}
