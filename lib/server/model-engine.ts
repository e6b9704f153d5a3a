/** The server's engine over a MoeModel: each request is one model.generate in the model's step loop. */
import type { MoeModel } from '../model/model';
import { promptTokens } from '../generate/index';
import type { Generation, GenerationResult } from '../generate/index';
import type { GenerationEngine, GenerationRun } from './engine';
import type { CompletionRequest, TokenizeRequest } from './request';
import { invalidRequest } from './api-error';
import { messageOf } from '../errors';
import { checkLogitBias } from '../generate/sampling';
import { forcedCall, toolCallMarker, toolCallSyntaxOf } from './tool-calls';

export function modelEngine(model: MoeModel): GenerationEngine {
  // Long prompts are tokenized on the tokenizer's worker thread: started now, so the first one does
  // not wait for it to build its tokenizer.
  model.tokenizer?.startWorker();
  const toolCallSyntax = toolCallSyntaxOf(model.tokenizer?.chatTemplate?.source);
  const marker = toolCallSyntax && markerToken(model, toolCallMarker(toolCallSyntax));
  return {
    maxSequences: model.options.maxSequences,
    toolCallSyntax,
    start(request: CompletionRequest, signal: AbortSignal): GenerationRun {
      let result: GenerationResult | undefined;
      // generate() checks everything before queueing: its errors come out of the first next().
      let failure: unknown;
      let generation: Generation | undefined;
      try {
        // The ids of logit_bias against this model's vocabulary, as a 400 that names the field.
        if (request.logitBias !== undefined)
          try {
            checkLogitBias('logit_bias', request.logitBias, model.config.vocabSize);
          } catch (err) {
            throw invalidRequest(messageOf(err), 'logit_bias', 'invalid_value');
          }
        generation = model.generate(
          Array.isArray(request.prompt) && typeof request.prompt[0] === 'object'
            ? // Templates know system, user and assistant; OpenAI's newer 'developer' role is the system one.
              (request.prompt as { role: string; content: string }[]).map((m) =>
                m.role === 'developer' ? { ...m, role: 'system' } : m,
              )
            : request.prompt,
          {
            maxTokens: request.maxTokens,
            temperature: request.temperature,
            topP: request.topP,
            topK: request.topK,
            minP: request.minP,
            repetitionPenalty: request.repetitionPenalty,
            presencePenalty: request.presencePenalty,
            frequencyPenalty: request.frequencyPenalty,
            logitBias: request.logitBias,
            seed: request.seed,
            stop: request.stop,
            ignoreEos: request.ignoreEos,
            logprobs: request.topLogprobs !== undefined,
            promptLogprobs: request.echo && request.topLogprobs !== undefined,
            topLogprobs: request.topLogprobs,
            tools: request.tools,
            responseFormat: request.toolChoice
              ? forcedCall(request.tools!, request.toolChoice, toolCallSyntax)
              : request.responseFormat,
            signal,
          },
        );
      } catch (err) {
        failure = err;
      }
      return {
        async next() {
          if (!generation) throw failure;
          const r = await generation.next();
          // The calls' opening marker, which decoding leaves out, back in a request with tools.
          if (!r.done && marker && request.tools && r.value.token === marker.id)
            return { done: false, value: { ...r.value, text: r.value.text + marker.text } };
          if (!r.done) return r;
          result = r.value;
          return { done: true, value: undefined };
        },
        result() {
          if (!result) throw new Error('the generation has not finished');
          return {
            finishReason: result.finishReason,
            promptTokens: result.usage.promptTokens,
            completionTokens: result.usage.completionTokens,
            cachedTokens: result.usage.cachedPromptTokens,
          };
        },
      };
    },
    queueDepth: () => model.generationStats.waiting,
    activeSequences: () => model.generationStats.running,
    tokenBytes: (token) => model.tokenizer?.tokenBytes(token),
    expertTokens: () => model.expertTokenCounts(),
    preemptions: () => model.generationStats.preemptions,
    contextLength: model.options.contextLength,
    // Without a tokenizer.json both routes are absent, which the server answers with its 404.
    ...(model.tokenizer && textRoutes(model, model.tokenizer)),
  };
}

/**
 * The special token that spells a syntax's opening marker (Mistral's `[TOOL_CALLS]`), whose text
 * decoding leaves out; undefined where the marker is ordinary text (Hermes' `<tool_call>` in Qwen's
 * tokenizers decodes as itself).
 */
function markerToken(model: MoeModel, text: string): { id: number; text: string } | undefined {
  const id = model.tokenizer?.tokenId(text);
  return id !== undefined && model.tokenizer!.specialTokenIds.has(id) ? { id, text } : undefined;
}

/** `POST /detokenize` and `POST /tokenize` over the model's tokenizer. */
function textRoutes(
  model: MoeModel,
  tokenizer: NonNullable<MoeModel['tokenizer']>,
): Pick<GenerationEngine, 'detokenize' | 'tokenize'> {
  return {
    detokenize: (ids) => {
      const V = model.config.vocabSize;
      ids.forEach((t, i) => {
        if (t >= V) throw new RangeError(`tokens[${i}] must be a token id in [0, ${V}), got ${t}`);
      });
      return tokenizer.decode(ids);
    },
    tokenize: async ({ prompt, tools }: TokenizeRequest) => promptTokens(model, prompt, tools),
  };
}
