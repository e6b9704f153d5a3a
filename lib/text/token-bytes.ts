/**
 * The bytes of one token, as OpenAI's log probabilities report them (`bytes`): a token of a byte-level
 * BPE or a byte-fallback piece may hold part of a UTF-8 character, which no decode of it alone can
 * show. The vocabulary entry is mapped by the per-token steps of tokenizer.json's decoder (ByteLevel,
 * ByteFallback, Replace, Metaspace); the steps over a whole sequence (Fuse, Strip, the first space a
 * SentencePiece decoder drops) do not apply to one token.
 */
import { isRecord } from '../validate';

type Step = (piece: string) => string | Uint8Array;

export const utf8 = new TextEncoder();
let byteOfChar: Map<string, number> | null = null;

/** GPT-2's byte-level alphabet, reversed: printable bytes stand for themselves, the others for U+0100 on. */
function byteLevelMap(): Map<string, number> {
  if (byteOfChar) return byteOfChar;
  byteOfChar = new Map();
  let shifted = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    byteOfChar.set(String.fromCodePoint(printable ? b : 256 + shifted++), b);
  }
  return byteOfChar;
}

function byteLevel(piece: string): Uint8Array {
  const map = byteLevelMap();
  const out: number[] = [];
  for (const c of piece) {
    const b = map.get(c);
    if (b !== undefined) out.push(b);
    else out.push(...utf8.encode(c)); // not of the alphabet: kept as text
  }
  return Uint8Array.from(out);
}

function stepOf(decoder: Record<string, unknown>): Step[] {
  switch (decoder.type) {
    case 'Sequence':
      return Array.isArray(decoder.decoders) ? decoder.decoders.filter(isRecord).flatMap(stepOf) : [];
    case 'ByteLevel':
      return [byteLevel];
    case 'ByteFallback':
      return [
        (piece) => {
          const m = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
          return m ? Uint8Array.of(parseInt(m[1], 16)) : piece;
        },
      ];
    case 'Replace': {
      const pattern = isRecord(decoder.pattern) ? decoder.pattern.String : undefined;
      const content = decoder.content;
      if (typeof pattern !== 'string' || pattern === '' || typeof content !== 'string') return [];
      return [(piece) => piece.split(pattern).join(content)];
    }
    case 'Metaspace': {
      const replacement = typeof decoder.replacement === 'string' ? decoder.replacement : '\u2581';
      return [(piece) => piece.split(replacement).join(' ')];
    }
    default:
      return [];
  }
}

/** A function from a vocabulary entry to its bytes, by the decoder of tokenizer.json (null: none). */
export function tokenBytesOf(decoder: unknown): (piece: string) => Uint8Array {
  const steps = isRecord(decoder) ? stepOf(decoder) : [];
  return (piece) => {
    let v: string | Uint8Array = piece;
    for (const step of steps) {
      v = step(v);
      if (typeof v !== 'string') return v;
    }
    return utf8.encode(v);
  };
}
