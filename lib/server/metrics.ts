/**
 * The server's Prometheus metrics, in a registry of its own (never prom-client's global one, so that
 * two servers in one process, or an application's own metrics, do not collide).
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';

/** Latency buckets in seconds: 5 ms to 60 s. */
const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
/** Tokens per second are averaged over this window. */
const RATE_WINDOW_MS = 10_000;

export interface MetricsSource {
  queueDepth(): number;
  activeSequences(): number;
  /** Tokens routed to each expert of each MoE layer since load, [layer][expert]; empty when unknown. */
  expertTokens(): ArrayLike<ArrayLike<number>>;
  /** Running generations that gave their KV cache back to wait again, since load. */
  preemptions?(): number;
}

export class ServerMetrics {
  readonly registry = new Registry();
  readonly requests: Counter<'endpoint' | 'status'>;
  readonly cancelled: Counter<'endpoint'>;
  readonly timeToFirstToken: Histogram<'endpoint'>;
  readonly interTokenLatency: Histogram<'endpoint'>;
  readonly promptTokens: Counter<'endpoint'>;
  readonly cachedPromptTokens: Counter<'endpoint'>;
  readonly generatedTokens: Counter<'endpoint'>;
  /** Generation times of the recent tokens, for the tokens-per-second gauge. */
  #recent: number[] = [];

  constructor(source: MetricsSource) {
    const registers = [this.registry];
    this.requests = new Counter({
      name: 'fused_moe_requests_total',
      help: 'HTTP requests answered, by endpoint and status code',
      labelNames: ['endpoint', 'status'],
      registers,
    });
    this.cancelled = new Counter({
      name: 'fused_moe_requests_cancelled_total',
      help: 'Generating requests whose client went away before the end (their sequences are freed)',
      labelNames: ['endpoint'],
      registers,
    });
    this.timeToFirstToken = new Histogram({
      name: 'fused_moe_time_to_first_token_seconds',
      help: 'From the arrival of a generating request to its first generated token',
      labelNames: ['endpoint'],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.interTokenLatency = new Histogram({
      name: 'fused_moe_inter_token_latency_seconds',
      help: 'Time between consecutive generated tokens of one request',
      labelNames: ['endpoint'],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.promptTokens = new Counter({
      name: 'fused_moe_prompt_tokens_total',
      help: 'Prompt tokens of finished requests',
      labelNames: ['endpoint'],
      registers,
    });
    this.cachedPromptTokens = new Counter({
      name: 'fused_moe_prompt_tokens_cached_total',
      help: 'Prompt tokens of finished requests whose KV cache was reused from another request, not computed',
      labelNames: ['endpoint'],
      registers,
    });
    this.generatedTokens = new Counter({
      name: 'fused_moe_generated_tokens_total',
      help: 'Tokens generated',
      labelNames: ['endpoint'],
      registers,
    });
    new Gauge({
      name: 'fused_moe_queue_depth',
      help: 'Requests waiting for a free sequence slot',
      registers,
      collect() {
        this.set(source.queueDepth());
      },
    });
    new Gauge({
      name: 'fused_moe_active_sequences',
      help: 'Sequences in the shared step loop',
      registers,
      collect() {
        this.set(source.activeSequences());
      },
    });
    const recent = () => this.#trim(performance.now());
    new Gauge({
      name: 'fused_moe_generated_tokens_per_second',
      help: `Tokens generated per second over the last ${RATE_WINDOW_MS / 1000} s`,
      registers,
      collect() {
        this.set(recent().length / (RATE_WINDOW_MS / 1000));
      },
    });
    new Counter({
      name: 'fused_moe_preemptions_total',
      help: 'Running generations that gave their KV cache back to wait for room again (a cache below max-sequences contexts)',
      registers,
      collect() {
        this.reset();
        this.inc(source.preemptions?.() ?? 0);
      },
    });
    new Counter({
      name: 'fused_moe_expert_tokens_total',
      help: 'Tokens routed to each expert of each MoE layer since the model was loaded',
      labelNames: ['layer', 'expert'],
      registers,
      collect() {
        this.reset();
        const counts = source.expertTokens();
        for (let l = 0; l < counts.length; l++)
          for (let e = 0; e < counts[l].length; e++) this.inc({ layer: String(l), expert: String(e) }, counts[l][e]);
      },
    });
  }

  /** One generated token of a request on `endpoint`. */
  token(endpoint: string): void {
    this.generatedTokens.inc({ endpoint });
    this.#recent.push(performance.now());
    if (this.#recent.length > 100_000) this.#trim(performance.now());
  }

  #trim(now: number): number[] {
    let drop = 0;
    while (drop < this.#recent.length && this.#recent[drop] < now - RATE_WINDOW_MS) drop++;
    if (drop > 0) this.#recent.splice(0, drop);
    return this.#recent;
  }
}
