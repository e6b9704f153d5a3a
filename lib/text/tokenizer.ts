/**
 * The checkpoint's own tokenizer: tokenizer.json run by @huggingface/tokenizers (the same format and
 * algorithms as the Rust `tokenizers` library: byte-level BPE, SentencePiece-style BPE with byte
 * fallback, ...), and tokenizer_config.json for the special tokens and the chat template.
 */
import { createHash } from 'crypto';
import * as path from 'path';
import type { Tokenizer } from '@huggingface/tokenizers';
import { MoeError, argRangeError, argTypeError, checkpointError, messageOf } from '../errors';
import { isFile, readJson } from '../safetensors/resolve';
import { describe, isRecord } from '../validate';
import { ChatMessage, ChatTemplate } from './chat';
import { EncodeWorker, TemplateRefusal, WorkerUnavailable } from './encode-worker';
import { tokenBytesOf, utf8 } from './token-bytes';

/** Options every decode uses, so that streamed pieces and the whole decode agree. */
const DECODE = { skip_special_tokens: true, clean_up_tokenization_spaces: false } as const;

/** A special token as tokenizer_config.json writes it: a string or an AddedToken object. */
function tokenText(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (isRecord(v) && typeof v.content === 'string') return v.content;
  return null;
}

/** The chat template of tokenizer_config.json: one string, or a list of named ones ('default' is used). */
function templateText(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (Array.isArray(v)) {
    const named = v.find((t) => isRecord(t) && t.name === 'default' && typeof t.template === 'string');
    return named ? (named.template as string) : null;
  }
  return null;
}

/**
 * The parts of tokenizer.json whose damage the library would report as a TypeError from inside itself
 * ("Cannot read properties of undefined"): checked first, so that the error names the key. Types of
 * models, normalizers and the like the library checks by name itself.
 */
function checkTokenizerJson(json: Record<string, unknown>, source: string): void {
  const fail = (key: string, expected: string, got: unknown): never => {
    throw checkpointError(source, `tokenizer.json: '${key}' must be ${expected}, got ${describe(got)}`);
  };
  const model = json.model;
  if (!isRecord(model)) return fail('model', 'an object', model);
  const vocab = model.vocab;
  if (model.type === 'Unigram') {
    if (!Array.isArray(vocab)) fail('model.vocab', 'an array of [piece, score] pairs', vocab);
    (vocab as unknown[]).forEach((entry, i) => {
      if (!Array.isArray(entry) || typeof entry[0] !== 'string' || typeof entry[1] !== 'number')
        fail(`model.vocab[${i}]`, 'a [piece, score] pair', entry);
    });
  } else {
    if (!isRecord(vocab)) return fail('model.vocab', 'an object of token ids', vocab);
    for (const [piece, id] of Object.entries(vocab))
      if (!Number.isSafeInteger(id) || (id as number) < 0)
        fail(`model.vocab[${JSON.stringify(piece)}]`, 'a token id (an integer >= 0)', id);
  }
  if (model.merges !== undefined) {
    if (!Array.isArray(model.merges)) fail('model.merges', 'an array', model.merges);
    (model.merges as unknown[]).forEach((m, i) => {
      const pair = typeof m === 'string' ? m.includes(' ') : Array.isArray(m) && m.length === 2;
      if (!pair || (Array.isArray(m) && !m.every((part) => typeof part === 'string')))
        fail(`model.merges[${i}]`, "a merge ('a b' or ['a', 'b'])", m);
    });
  }
  if (json.added_tokens !== undefined) {
    if (!Array.isArray(json.added_tokens)) fail('added_tokens', 'an array', json.added_tokens);
    (json.added_tokens as unknown[]).forEach((t, i) => {
      if (!isRecord(t) || !Number.isSafeInteger(t.id) || (t.id as number) < 0 || typeof t.content !== 'string')
        fail(`added_tokens[${i}]`, '{ id: an integer >= 0, content: a string, ... }', t);
    });
  }
  for (const key of ['normalizer', 'pre_tokenizer', 'post_processor', 'decoder']) {
    const v = json[key];
    if (v !== undefined && v !== null && !(isRecord(v) && typeof v.type === 'string'))
      fail(key, "null or an object with a string 'type'", v);
  }
}

function checkText(text: unknown): void {
  if (typeof text !== 'string') throw argTypeError(`text must be a string, got ${describe(text)}`);
}

export class TextTokenizer {
  readonly bosToken: string | null;
  readonly eosToken: string | null;
  /** Ids of the configured end-of-sequence token (generation stops on it). */
  readonly eosTokenIds: number[];
  readonly chatTemplate: ChatTemplate | null;
  /** One past the largest id the tokenizer can produce. */
  readonly vocabLimit: number;
  /** Ids of the special tokens (BOS, EOS, chat markers, ...), which decode() leaves out. */
  readonly specialTokenIds: ReadonlySet<number>;
  /** Texts from this many UTF-16 code units on are tokenized on a worker thread by encodeAsync. */
  static readonly WORKER_MIN_CHARS = 8192;
  /**
   * Conversations of this many messages or more are rendered on a worker thread by renderChatAsync:
   * a template's time goes by the message, hardly by the length of the text.
   */
  static readonly WORKER_MIN_MESSAGES = 64;
  readonly #tokenizer: Tokenizer;
  readonly #source: string;
  readonly #worker: EncodeWorker | null;
  readonly #pieceBytes: (piece: string) => Uint8Array;
  /** Added tokens (specials among them) by id: their text is their content, not a vocabulary entry. */
  readonly #added = new Map<number, string>();

  /**
   * `file`: where tokenizerJson was read from and the SHA-256 of its text; without it encodeAsync
   * tokenizes on the calling thread.
   */
  constructor(
    tokenizerJson: object,
    config: Record<string, unknown>,
    source: string,
    file?: { path: string; sha256: string },
  ) {
    this.#source = source;
    checkTokenizerJson(tokenizerJson as Record<string, unknown>, source);
    const special = new Set<number>();
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded on first use: a program that reads no tokenizer does not pay for it
      const { Tokenizer: Impl } = require('@huggingface/tokenizers') as typeof import('@huggingface/tokenizers');
      this.#tokenizer = new Impl(tokenizerJson, config);
      for (const [id, token] of this.#tokenizer.get_added_tokens_decoder()) {
        this.#added.set(id, token.content);
        if (token.special) special.add(id);
      }
      this.bosToken = tokenText(config.bos_token);
      this.eosToken = tokenText(config.eos_token);
      const eos = this.eosToken === null ? undefined : this.#tokenizer.token_to_id(this.eosToken);
      this.eosTokenIds = eos === undefined ? [] : [eos];
      let limit = 0;
      for (const id of this.#tokenizer.get_vocab(true).values()) limit = Math.max(limit, id + 1);
      this.vocabLimit = limit;
    } catch (err) {
      throw checkpointError(source, `tokenizer.json cannot be read: ${messageOf(err)}`, err);
    }
    this.#pieceBytes = tokenBytesOf((tokenizerJson as Record<string, unknown>).decoder);
    this.specialTokenIds = special;
    const template = templateText(config.chat_template);
    try {
      this.chatTemplate = template === null ? null : new ChatTemplate(template, this.bosToken, this.eosToken);
    } catch (err) {
      throw checkpointError(
        source,
        `the chat_template of tokenizer_config.json does not parse: ${messageOf(err)}`,
        err,
      );
    }
    const chat = this.chatTemplate;
    this.#worker = file
      ? new EncodeWorker({
          file: file.path,
          sha256: file.sha256,
          config,
          chatTemplate: chat && { source: chat.source, bosToken: chat.bosToken ?? '', eosToken: chat.eosToken ?? '' },
        })
      : null;
  }

  /**
   * Reads tokenizer.json (and tokenizer_config.json when there is one) of a checkpoint folder;
   * undefined when the folder has no tokenizer.json.
   */
  static async load(dir: string): Promise<TextTokenizer | undefined> {
    const file = path.join(dir, 'tokenizer.json');
    if (!(await isFile(file))) return undefined;
    let sha256 = '';
    const json = await readJson(file, 'tokenizer', (text) => {
      sha256 = createHash('sha256').update(text).digest('hex');
    });
    if (!isRecord(json)) throw checkpointError(file, 'must hold a JSON object');
    const configFile = path.join(dir, 'tokenizer_config.json');
    const config = (await isFile(configFile)) ? await readJson(configFile, 'tokenizer config') : {};
    if (!isRecord(config)) throw checkpointError(configFile, 'must hold a JSON object');
    return new TextTokenizer(json, config, dir, { path: file, sha256 });
  }

  /** Token ids of `text`; `addSpecialTokens` adds what the tokenizer's post-processor adds (BOS, ...). */
  encode(text: string, addSpecialTokens = true): number[] {
    checkText(text);
    return this.#checked(
      this.#library('encode', () => this.#tokenizer.encode(text, { add_special_tokens: addSpecialTokens }).ids),
    );
  }

  /**
   * encode() without holding the event loop: a text of WORKER_MIN_CHARS or more is tokenized on a
   * worker thread (the same ids), shorter ones at once. Where the worker cannot serve (a tokenizer not
   * loaded from a folder, a tokenizer.json changed since, no threads) the text is tokenized here.
   */
  async encodeAsync(text: string, addSpecialTokens = true): Promise<number[]> {
    checkText(text);
    if (text.length < TextTokenizer.WORKER_MIN_CHARS || !this.#worker) return this.encode(text, addSpecialTokens);
    let ids: Float64Array;
    try {
      ids = await this.#worker.encode(text, addSpecialTokens);
    } catch (err) {
      if (err instanceof WorkerUnavailable) return this.encode(text, addSpecialTokens);
      throw err;
    }
    return this.#checked(Array.from(ids));
  }

  /**
   * Starts the worker thread now instead of at the first long text, which would otherwise wait while
   * the thread builds its tokenizer (0.8 s for a vocabulary of 150,000); the server does this.
   */
  startWorker(): void {
    this.#worker?.start();
  }

  /** Whether the worker thread runs (started, not failed, not disposed). */
  get workerRunning(): boolean {
    return this.#worker?.running ?? false;
  }

  /** Stops the worker thread: calls in flight there reject with `reason`, later ones run here. */
  dispose(reason: Error = new MoeError('ERR_MOE_DISPOSED', 'this tokenizer was disposed')): void {
    this.#worker?.close(reason);
  }

  #checked(ids: number[]): number[] {
    // A tokenizer.json whose post-processor names a token it does not have gives no id for it.
    for (let i = 0; i < ids.length; i++)
      if (!Number.isSafeInteger(ids[i]) || ids[i] < 0)
        throw checkpointError(
          this.#source,
          `tokenizer.json gave ${String(ids[i])} at position ${i} of an encoding, not a token id`,
        );
    return ids;
  }

  /** The id of a token's text as one whole token (an added or special token among them); else undefined. */
  tokenId(text: string): number | undefined {
    return this.#library('encode', () => this.#tokenizer.token_to_id(text)) ?? undefined;
  }

  /**
   * Runs a call into the tokenizer library: what it throws (a part of tokenizer.json it reads only when
   * it encodes or decodes, such as the post-processor's templates or the decoder's steps) becomes
   * ERR_MOE_CHECKPOINT naming the file, not a TypeError from inside the library. The model still loads
   * and runs from token ids, as before.
   */
  #library<T>(what: 'encode' | 'decode', call: () => T): T {
    try {
      return call();
    } catch (err) {
      throw checkpointError(this.#source, `tokenizer.json cannot ${what}: ${messageOf(err)}`, err);
    }
  }

  /** Text of `ids`, special tokens left out. */
  decode(ids: readonly number[]): string {
    return ids.length === 0 ? '' : this.#library('decode', () => this.#tokenizer.decode(ids as number[], DECODE));
  }

  /**
   * The bytes of token `id` alone, a special token's text included (the `bytes` of OpenAI's log
   * probabilities): a token may hold part of a UTF-8 character. Empty for an id the tokenizer lacks.
   */
  tokenBytes(id: number): Uint8Array {
    if (!Number.isSafeInteger(id) || id < 0)
      throw argRangeError(`id must be a token id (an integer >= 0), got ${describe(id)}`);
    const added = this.#added.get(id);
    if (added !== undefined) return utf8.encode(added);
    const piece = this.#library('decode', () => this.#tokenizer.id_to_token(id));
    return piece === undefined ? new Uint8Array(0) : this.#pieceBytes(piece);
  }

  /** The prompt text of a conversation (and the tools it may call), by the checkpoint's chat template. */
  renderChat(
    messages: readonly ChatMessage[],
    addGenerationPrompt: boolean,
    name: string,
    tools?: readonly object[],
  ): string {
    if (!this.chatTemplate)
      throw argTypeError(`${name} is a list of messages, but tokenizer_config.json has no chat_template`);
    return this.chatTemplate.render(messages, addGenerationPrompt, name, tools);
  }

  /**
   * renderChat() without holding the event loop: a conversation of WORKER_MIN_MESSAGES or more, each
   * a plain object, is rendered on the worker thread (the same text, the same RangeError when the
   * template refuses it); others, or where the worker cannot serve, here.
   */
  async renderChatAsync(
    messages: readonly ChatMessage[],
    addGenerationPrompt: boolean,
    name: string,
    tools?: readonly object[],
  ): Promise<string> {
    const worker = this.#worker;
    // Only plain objects reach the thread as they are: a class's getters or methods would not.
    const onWorker =
      worker &&
      this.chatTemplate &&
      messages.length >= TextTokenizer.WORKER_MIN_MESSAGES &&
      messages.every((m) => Object.getPrototypeOf(m) === Object.prototype);
    if (!onWorker) return this.renderChat(messages, addGenerationPrompt, name, tools);
    try {
      return await worker.render(messages, addGenerationPrompt, tools);
    } catch (err) {
      if (err instanceof TemplateRefusal) throw ChatTemplate.refusal(name, err.message);
      if (err instanceof WorkerUnavailable) return this.renderChat(messages, addGenerationPrompt, name, tools);
      throw err;
    }
  }
}
