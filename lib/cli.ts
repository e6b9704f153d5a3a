/**
 * `fused-moe run <dir> -p "prompt"` and `fused-moe run <dir> --chat`: loads a checkpoint with a
 * progress bar, streams the generated text to stdout, and reports prompt and generation speed on
 * stderr (so that stdout holds the text alone).
 */
import * as readline from 'readline';
import { parseArgs } from 'util';
import type { ChatMessage } from './text/chat';
import { checkMaxTokens } from './generate/index';
import type { GenerateOptions, GenerationResult, Prompt } from './generate/index';
import { checkSampling } from './generate/sampling';
import { MoeModel } from './model/model';
import type { LoadOptions, LoadProgress } from './model/model';

export const RUN_USAGE = [
  'usage: fused-moe run <checkpoint-folder> (-p "prompt" | --chat) [options]',
  '',
  '  -p, --prompt TEXT         generate a continuation of TEXT (as it is, no chat template)',
  '  --chat                    chat on the terminal with the checkpoint chat template (Ctrl-C stops a reply,',
  '                            Ctrl-D leaves)',
  '  -n, --max-tokens N        tokens to generate at most (default 256)',
  "  --temperature T           0 is greedy (default: the checkpoint's generation_config.json, else 0.7)",
  '  --top-k K, --top-p P, --min-p P, --repetition-penalty R, --seed S',
  '  --presence-penalty P      subtracted from the logit of every token already output, -2 to 2',
  '  --frequency-penalty F     subtracted once for each time a token is already in the output, -2 to 2',
  '  --system TEXT             a system message that opens the chat',
  '  --quantize none|int8|int4 quantize the weights at load (default none)',
  '  --context N               context length in tokens (default min(4096, the model maximum))',
  '  --threads N               CPU threads (default all)',
].join('\n');

export interface Io {
  out: (s: string) => void;
  err: (s: string) => void;
}

const defaultIo: Io = { out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s) };

/** Whether `io` writes to a terminal's stderr (the progress bar redraws one line there). */
function errIsTerminal(io: Io): boolean {
  return io === defaultIo && process.stderr.isTTY === true;
}

function number(name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n)) throw new RangeError(`--${name} must be a number, got '${v}'`);
  return n;
}

/** One line of the loading progress bar. */
export function progressLine(p: LoadProgress): string {
  const width = 30;
  const done = p.totalBytes > 0 ? p.bytes / p.totalBytes : 1;
  const bar = '#'.repeat(Math.round(done * width)).padEnd(width, '.');
  const [unit, scale] = p.totalBytes >= 1e9 ? ['GB', 1e9] : ['MB', 1e6];
  const size = (b: number) => (b / scale).toFixed(2);
  return `loading [${bar}] ${Math.round(done * 100)}% ${size(p.bytes)}/${size(p.totalBytes)} ${unit}, ${p.tensors}/${p.totalTensors} tensors`;
}

/** Draws the progress bar on a terminal, one line per 10% otherwise (logs stay readable). */
export function progressPrinter(write: (s: string) => void, terminal: boolean): (p: LoadProgress) => void {
  let lastDecile = -1;
  return (p) => {
    if (terminal) {
      write(`\r${progressLine(p)}${p.tensors === p.totalTensors ? '\n' : ''}`);
      return;
    }
    const decile = Math.floor((p.totalBytes > 0 ? p.bytes / p.totalBytes : 1) * 10);
    if (decile > lastDecile) {
      lastDecile = decile;
      write(`loading: ${decile * 10}% (${p.tensors}/${p.totalTensors} tensors)\n`);
    }
  };
}

/** Streams one generation to `io.out`; returns its result and timings. */
async function stream(
  model: MoeModel,
  prompt: Prompt,
  options: GenerateOptions,
  io: Io,
): Promise<{ result: GenerationResult; firstMs: number; lastMs: number }> {
  const start = performance.now();
  let firstMs = 0;
  let lastMs = 0;
  const generation = model.generate(prompt, options);
  for (;;) {
    const r = await generation.next();
    const now = performance.now() - start;
    if (r.done) {
      if (lastMs === 0) firstMs = lastMs = now;
      return { result: r.value, firstMs, lastMs };
    }
    if (firstMs === 0) firstMs = now;
    lastMs = now;
    if (r.value.text) io.out(r.value.text);
  }
}

function speedLine(result: GenerationResult, firstMs: number, lastMs: number): string {
  const { promptTokens, completionTokens, cachedPromptTokens } = result.usage;
  const computed = promptTokens - cachedPromptTokens;
  const promptRate = firstMs > 0 ? (computed / firstMs) * 1000 : 0;
  const genRate = completionTokens > 1 && lastMs > firstMs ? ((completionTokens - 1) / (lastMs - firstMs)) * 1000 : 0;
  const cached = cachedPromptTokens > 0 ? ` (${cachedPromptTokens} reused from the cache)` : '';
  return (
    `prompt: ${promptTokens} tokens${cached}, ${promptRate.toFixed(1)} tok/s; ` +
    `generation: ${completionTokens} tokens, ${genRate.toFixed(1)} tok/s (${result.finishReason})`
  );
}

/** The `run` command: resolves with the exit code; never rejects. */
export async function run(argv: string[], io: Io = defaultIo): Promise<number> {
  let values: Record<string, string | boolean | undefined>;
  let positionals: string[];
  try {
    ({ values, positionals } = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        prompt: { type: 'string', short: 'p' },
        chat: { type: 'boolean' },
        system: { type: 'string' },
        'max-tokens': { type: 'string', short: 'n' },
        temperature: { type: 'string' },
        'top-k': { type: 'string' },
        'top-p': { type: 'string' },
        'min-p': { type: 'string' },
        'repetition-penalty': { type: 'string' },
        'presence-penalty': { type: 'string' },
        'frequency-penalty': { type: 'string' },
        seed: { type: 'string' },
        quantize: { type: 'string' },
        context: { type: 'string' },
        threads: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (err) {
    io.err(`fused-moe run: ${(err as Error).message}\n${RUN_USAGE}\n`);
    return 2;
  }
  if (values.help) {
    io.out(RUN_USAGE + '\n');
    return 0;
  }
  const chat = values.chat === true;
  if (positionals.length !== 1 || (values.prompt === undefined) === !chat) {
    io.err(`fused-moe run: give one checkpoint folder, and either -p "prompt" or --chat\n${RUN_USAGE}\n`);
    return 2;
  }
  if (chat && !process.stdin.isTTY) {
    io.err('fused-moe run: --chat needs a terminal; use -p "prompt" otherwise\n');
    return 2;
  }
  if (!chat && values.prompt === '') {
    io.err(`fused-moe run: -p needs a prompt that is not empty\n${RUN_USAGE}\n`);
    return 2;
  }
  let model: MoeModel | undefined;
  // A reader that goes away (`fused-moe run ... | head`) ends the generation quietly. The listener stays:
  // a write already under way may report its EPIPE after this function has returned.
  const readerGone = new AbortController();
  const onStdoutError = (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') readerGone.abort();
    else io.err(`\nfused-moe run: cannot write the output: ${err.message}\n`);
  };
  if (io === defaultIo) process.stdout.on('error', onStdoutError);
  try {
    const generateOptions: GenerateOptions = {
      maxTokens: number('max-tokens', values['max-tokens'] as string | undefined) ?? 256,
      temperature: number('temperature', values.temperature as string | undefined),
      topK: number('top-k', values['top-k'] as string | undefined),
      topP: number('top-p', values['top-p'] as string | undefined),
      minP: number('min-p', values['min-p'] as string | undefined),
      repetitionPenalty: number('repetition-penalty', values['repetition-penalty'] as string | undefined),
      presencePenalty: number('presence-penalty', values['presence-penalty'] as string | undefined),
      frequencyPenalty: number('frequency-penalty', values['frequency-penalty'] as string | undefined),
      seed: number('seed', values.seed as string | undefined),
    };
    // Checked before the load, which may take minutes.
    checkSampling('options', generateOptions as Record<string, unknown>);
    checkMaxTokens('--max-tokens', generateOptions.maxTokens);
    const loadOptions: LoadOptions = {
      quantize: values.quantize as LoadOptions['quantize'],
      contextLength: number('context', values.context as string | undefined),
      threads: number('threads', values.threads as string | undefined),
      onProgress: progressPrinter(io.err, errIsTerminal(io)),
    };
    const t0 = performance.now();
    model = await MoeModel.load(positionals[0], loadOptions);
    // Without --temperature, the checkpoint's own (generation_config.json, greedy where do_sample is
    // false), else 0.7: the built-in 1 of generate() rambles on a terminal.
    generateOptions.temperature ??= model.generationDefaults.temperature ?? 0.7;
    io.err(`loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);
    if (!chat) {
      const { result, firstMs, lastMs } = await stream(
        model,
        values.prompt as string,
        { ...generateOptions, signal: readerGone.signal },
        io,
      );
      if (readerGone.signal.aborted) return 0;
      io.out('\n');
      io.err(speedLine(result, firstMs, lastMs) + '\n');
      return 0;
    }
    await chatLoop(model, generateOptions, values.system as string | undefined, io);
    return 0;
  } catch (err) {
    io.err(`fused-moe run: ${(err as Error).message}\n`);
    return 1;
  } finally {
    model?.dispose();
  }
}

/**
 * Reads a line per user turn; the reply streams; Ctrl-C stops a reply, Ctrl-D (or Ctrl-C at the prompt)
 * leaves. `input` and `output` are the terminal (other streams in tests).
 * @internal
 */
export async function chatLoop(
  model: MoeModel,
  options: GenerateOptions,
  system: string | undefined,
  io: Io,
  input: NodeJS.ReadableStream = process.stdin,
  output: NodeJS.WritableStream = process.stdout,
): Promise<void> {
  if (!model.tokenizer?.chatTemplate) throw new Error('the checkpoint has no chat template (tokenizer_config.json)');
  const messages: ChatMessage[] = system ? [{ role: 'system', content: system }] : [];
  const rl = readline.createInterface({ input, output, terminal: true });
  let controller: AbortController | null = null;
  let closed = false;
  rl.on('SIGINT', () => {
    if (controller) controller.abort();
    else rl.close();
  });
  rl.on('close', () => (closed = true));
  const ask = () =>
    new Promise<string | null>((resolve) => {
      if (closed) return resolve(null);
      const onClose = () => resolve(null);
      rl.once('close', onClose);
      rl.question('> ', (line) => {
        rl.off('close', onClose);
        resolve(line);
      });
    });
  const first = system ? 1 : 0; // the system message stays
  try {
    for (;;) {
      const line = await ask();
      if (line === null) break;
      if (line.trim() === '') continue;
      messages.push({ role: 'user', content: line });
      for (;;) {
        controller = new AbortController();
        try {
          const { result, firstMs, lastMs } = await stream(
            model,
            messages,
            { ...options, signal: controller.signal },
            io,
          );
          io.out('\n');
          io.err(speedLine(result, firstMs, lastMs) + '\n');
          messages.push({ role: 'assistant', content: result.text });
          break;
        } catch (err) {
          // A conversation past the context loses its oldest exchange and tries again; a turn that does
          // not fit alone, or any other failure, is reported and dropped, and the chat goes on.
          if (err instanceof RangeError && /context/.test(err.message) && messages.length - first > 1) {
            messages.splice(first, 2);
            io.err('(the oldest exchange was dropped to fit the context)\n');
            continue;
          }
          messages.pop();
          io.err(`fused-moe run: ${(err as Error).message}\n`);
          break;
        } finally {
          controller = null;
        }
      }
    }
  } finally {
    rl.close();
  }
}
