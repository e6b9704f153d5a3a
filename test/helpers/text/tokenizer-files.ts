/**
 * Writes real Hugging Face tokenizer files into a checkpoint folder: a byte-level BPE (GPT-2 / Qwen
 * style) or a SentencePiece-style BPE (metaspace, byte fallback, BOS added: Llama / Mixtral style),
 * with exactly `vocabSize` ids so that every id the model can sample decodes. The merges are learnt
 * here, by plain BPE training on a small text with multi-byte characters, so that some tokens hold
 * only part of a UTF-8 character.
 */
import * as fs from 'fs';
import * as path from 'path';

export type TokenizerKind = 'byte-level' | 'sentencepiece';

/** Special tokens, at the ids the random models' configs name (unk 0, bos 1, eos 2). */
export const SPECIAL = { unk: '<unk>', bos: '<s>', eos: '</s>' } as const;

/** A chat template that uses every variable the renderer passes and refuses a bad role. */
export const CHAT_TEMPLATE =
  "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}" +
  "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}" +
  "[{{ m['role'] }}] {{ m['content'] }}{{ eos_token if m['role'] == 'assistant' else '' }}\n" +
  '{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}';

/**
 * A chat template with tools in the style of Qwen's: the tool definitions as JSON in a system turn, the
 * Hermes syntax for calls, an assistant turn's calls and a tool turn's answer.
 */
export const TOOLS_TEMPLATE =
  '{%- if tools %}[system] Tools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n' +
  'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call>\n{% endif %}' +
  "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}[assistant]" +
  '{% for c in m.tool_calls %}<tool_call>{"name": "{{ c.function.name }}", "arguments": ' +
  '{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}\n' +
  "{% elif m.role == 'tool' %}[tool {{ m.tool_call_id }}] {{ m.content }}\n" +
  '{% else %}[{{ m.role }}] {{ m.content }}\n{% endif %}{% endfor %}' +
  '{% if add_generation_prompt %}[assistant] {% endif %}';

/**
 * A chat template with tools in the style of Mistral's v3 templates (Mixtral-8x22B-Instruct): the tool
 * definitions as a JSON array before the last user turn, an assistant turn's calls as `[TOOL_CALLS]` and
 * a JSON array whose call ids must be 9 letters and digits, a tool turn's answer with its call's id.
 */
export const MISTRAL_TOOLS_TEMPLATE =
  '{{ bos_token }}{% for m in messages %}' +
  "{% if m.role == 'user' %}{% if tools and loop.last %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]" +
  '{% endif %}[INST] {{ m.content }}[/INST]' +
  "{% elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS] [{% for c in m.tool_calls %}" +
  "{% if c.id | length != 9 %}{{ raise_exception('tool call ids must be 9 letters and digits') }}{% endif %}" +
  '{"name": {{ c.function.name | tojson }}, "arguments": {{ c.function.arguments | tojson }}, "id": "{{ c.id }}"}' +
  "{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}{% elif m.role == 'tool' %}" +
  '[TOOL_RESULTS] {"content": {{ m.content | tojson }}, "call_id": "{{ m.tool_call_id }}"}[/TOOL_RESULTS]' +
  '{% else %} {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}';

/** Mistral's chat markers, special tokens of its v3 tokenizers. */
export const MISTRAL_SPECIALS = [
  '[INST]',
  '[/INST]',
  '[TOOL_CALLS]',
  '[AVAILABLE_TOOLS]',
  '[/AVAILABLE_TOOLS]',
  '[TOOL_RESULTS]',
  '[/TOOL_RESULTS]',
];

/** Text the merges are learnt from: English, accented Latin, CJK, emoji. */
export const CORPUS = [
  'the quick brown fox jumps over the lazy dog and the cat sat on the mat',
  'there is the thing that they thought through, then they went on',
  'café crème brûlée déjà vu naïve façade über straße',
  '日本語のテキストです 日本 東京 中文 汉字',
  'emoji 🙂 🚀 🙂 and more: ok, yes; no! why? 42 1234',
  'a model reads tokens and writes tokens, one step at a time, with every stream in one batch',
  'experts route each token; the router picks two of eight experts for every layer',
  'generation samples from probabilities with temperature, nucleus and minimum filters',
  'Wikipedia: Straßenbahn, Zürich, Genève, São Paulo, Kraków, Москва, Αθήνα',
  'programming: function return value; const let var; if else while for',
].join('\n');

/** GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell them. */
export function byteToUnicode(): string[] {
  const direct: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) direct.push(b);
  for (let b = 0xa1; b <= 0xac; b++) direct.push(b);
  for (let b = 0xae; b <= 0xff; b++) direct.push(b);
  const out: string[] = new Array(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) out[b] = String.fromCodePoint(direct.includes(b) ? b : 256 + extra++);
  return out;
}

/** Plain BPE training: merges the most frequent adjacent pair (ties: first in sorted order). */
function learnMerges(words: string[][], count: number): [string, string][] {
  const merges: [string, string][] = [];
  let seqs = words.map((w) => w.slice());
  while (merges.length < count) {
    const pairs = new Map<string, number>();
    for (const s of seqs)
      for (let i = 0; i + 1 < s.length; i++) {
        const key = s[i] + '\u0000' + s[i + 1];
        pairs.set(key, (pairs.get(key) ?? 0) + 1);
      }
    if (pairs.size === 0) break;
    let best = '';
    let bestCount = 0;
    for (const [k, c] of [...pairs].sort((a, b) => (a[0] < b[0] ? -1 : 1)))
      if (c > bestCount) [best, bestCount] = [k, c];
    const [a, b] = best.split('\u0000');
    merges.push([a, b]);
    seqs = seqs.map((s) => {
      const out: string[] = [];
      for (let i = 0; i < s.length; i++)
        if (i + 1 < s.length && s[i] === a && s[i + 1] === b) {
          out.push(a + b);
          i++;
        } else out.push(s[i]);
      return out;
    });
  }
  return merges;
}

function specialAdded(): object[] {
  return [SPECIAL.unk, SPECIAL.bos, SPECIAL.eos].map((content, id) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }));
}

function bpeModel(vocab: Record<string, number>, merges: [string, string][], byteFallback: boolean): object {
  return {
    type: 'BPE',
    dropout: null,
    unk_token: byteFallback ? SPECIAL.unk : null,
    continuing_subword_prefix: null,
    end_of_word_suffix: null,
    fuse_unk: byteFallback,
    byte_fallback: byteFallback,
    ignore_merges: false,
    vocab,
    merges,
  };
}

/** tokenizer.json of a byte-level BPE: 3 specials, the 256 bytes, then learnt merges up to vocabSize. */
export function byteLevelTokenizer(vocabSize: number): object {
  const bytes = byteToUnicode();
  const vocab: Record<string, number> = { [SPECIAL.unk]: 0, [SPECIAL.bos]: 1, [SPECIAL.eos]: 2 };
  bytes.forEach((c, b) => (vocab[c] = 3 + b));
  // Words as the ByteLevel pre-tokenizer cuts them, roughly: a leading space stays with its word.
  const words = CORPUS.split(/(?= )|\n/).map((w) => [...Buffer.from(w, 'utf8')].map((b) => bytes[b]));
  const merges = learnMerges(words, vocabSize - 259);
  if (merges.length !== vocabSize - 259) throw new Error(`the corpus gives only ${merges.length} merges`);
  for (const [a, b] of merges) vocab[a + b] = Object.keys(vocab).length;
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: specialAdded(),
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: null,
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: bpeModel(vocab, merges, false),
  };
}

/**
 * tokenizer.json of a SentencePiece-style BPE: 3 specials, the 256 byte-fallback pieces <0xNN>, the
 * corpus' most frequent characters except a few multi-byte ones (the others fall back to bytes),
 * then merges.
 */
export function sentencePieceTokenizer(vocabSize: number): object {
  const vocab: Record<string, number> = { [SPECIAL.unk]: 0, [SPECIAL.bos]: 1, [SPECIAL.eos]: 2 };
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`] = 3 + b;
  const text = CORPUS.replace(/ /g, '\u2581');
  const byteOnly = new Set(['ß', '東', '🚀']);
  // The most frequent half of the room goes to single characters, the rest to merges.
  const counts = new Map<string, number>();
  for (const c of text) if (c !== '\n' && !byteOnly.has(c)) counts.set(c, (counts.get(c) ?? 0) + 1);
  const chars = [...counts]
    .sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1))
    .slice(0, Math.floor((vocabSize - 259) / 2))
    .map(([c]) => c);
  for (const c of chars) vocab[c] = Object.keys(vocab).length;
  const words = text
    .split(/(?=\u2581)|\n/)
    .map((w) => [...w].filter((c) => c in vocab))
    .filter((w) => w.length > 0);
  const want = vocabSize - Object.keys(vocab).length;
  const merges = learnMerges(words, want);
  if (want < 0 || merges.length !== want) throw new Error(`vocabSize ${vocabSize} does not fit the corpus`);
  for (const [a, b] of merges) vocab[a + b] = Object.keys(vocab).length;
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: specialAdded(),
    normalizer: null,
    pre_tokenizer: { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'first', split: false },
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: SPECIAL.bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [
        { SpecialToken: { id: SPECIAL.bos, type_id: 0 } },
        { Sequence: { id: 'A', type_id: 0 } },
        { SpecialToken: { id: SPECIAL.bos, type_id: 1 } },
        { Sequence: { id: 'B', type_id: 1 } },
      ],
      special_tokens: { [SPECIAL.bos]: { id: SPECIAL.bos, ids: [1], tokens: [SPECIAL.bos] } },
    },
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: '\u2581' }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        { type: 'Strip', content: ' ', start: 1, stop: 0 },
      ],
    },
    model: bpeModel(vocab, merges, true),
  };
}

export interface TokenizerFileOptions {
  /** The chat template written to tokenizer_config.json; null for none. */
  chatTemplate?: string | null;
  /** More special tokens (chat markers), given the last ids of the vocabulary (byte-level only). */
  specials?: string[];
}

/** Writes tokenizer.json and tokenizer_config.json of the given kind into a checkpoint folder. */
export function writeTokenizer(
  dir: string,
  kind: TokenizerKind,
  vocabSize: number,
  options: TokenizerFileOptions = {},
): void {
  const specials = options.specials ?? [];
  if (specials.length > 0 && kind !== 'byte-level') throw new Error('specials are written for byte-level only');
  const json =
    kind === 'byte-level' ? byteLevelTokenizer(vocabSize - specials.length) : sentencePieceTokenizer(vocabSize);
  const { added_tokens: added, model } = json as { added_tokens: object[]; model: { vocab: Record<string, number> } };
  specials.forEach((content, i) => {
    const id = vocabSize - specials.length + i;
    model.vocab[content] = id;
    added.push({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
  });
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(json));
  const config: Record<string, unknown> = {
    bos_token: SPECIAL.bos,
    eos_token: SPECIAL.eos,
    unk_token: SPECIAL.unk,
    add_bos_token: kind === 'sentencepiece',
  };
  const template = options.chatTemplate === undefined ? CHAT_TEMPLATE : options.chatTemplate;
  if (template !== null) config.chat_template = template;
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(config, null, 2) + '\n');
}
