/**
 * The engine's count of the KV cache's blocks. It runs ahead of the native pool: a step's blocks are
 * counted when the step is planned, before it runs. Forked sequences share their full blocks
 * (MoeModel.forkSequence), so a block counts once however many sequences hold it, and freeing a
 * sequence gives back only the blocks no other sequence holds.
 */
import type { ModelSequence } from '../model/model';

interface Block {
  holders: number;
}

export class CacheLedger {
  readonly #tables = new Map<ModelSequence, Block[]>();
  #used = 0;

  constructor(
    readonly blockTokens: number,
    readonly total: number,
  ) {}

  /** Blocks no sequence holds. */
  get free(): number {
    return this.total - this.#used;
  }

  /** Blocks that holding `positions` positions would add to `sequence`. */
  growth(sequence: ModelSequence, positions: number): number {
    return Math.max(0, this.blocks(positions) - (this.#tables.get(sequence)?.length ?? 0));
  }

  /** Counts the blocks `sequence` needs to hold `positions` positions. */
  grow(sequence: ModelSequence, positions: number): void {
    const table = this.#table(sequence);
    while (table.length < this.blocks(positions)) table.push(this.#block());
  }

  /** `fork` holds the first `length` positions of `source`: its full blocks, and a copy of a partial one. */
  fork(source: ModelSequence, fork: ModelSequence, length: number): void {
    const shared = (this.#tables.get(source) ?? []).slice(0, Math.floor(length / this.blockTokens));
    for (const b of shared) b.holders++;
    this.#tables.set(fork, shared);
    this.grow(fork, length);
  }

  /** Gives back `sequence`'s blocks (those another sequence holds stay counted). */
  release(sequence: ModelSequence): void {
    for (const b of this.#tables.get(sequence) ?? []) if (--b.holders === 0) this.#used--;
    this.#tables.delete(sequence);
  }

  blocks(positions: number): number {
    return Math.ceil(positions / this.blockTokens);
  }

  #table(sequence: ModelSequence): Block[] {
    let table = this.#tables.get(sequence);
    if (!table) this.#tables.set(sequence, (table = []));
    return table;
  }

  #block(): Block {
    this.#used++;
    return { holders: 1 };
  }
}
