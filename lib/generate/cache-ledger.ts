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

  /**
   * Whether cutting `sequence` back to `length` positions copies its new last block (a partly filled
   * block that another sequence shares: MoeModel.truncateSequence copies it before it is written).
   */
  truncateCopies(sequence: ModelSequence, length: number): boolean {
    const table = this.#tables.get(sequence) ?? [];
    return length % this.blockTokens !== 0 && (table[Math.floor(length / this.blockTokens)]?.holders ?? 0) > 1;
  }

  /** `sequence` cut back to `length` positions (a shared, partly filled last block copied). */
  truncate(sequence: ModelSequence, length: number): void {
    const table = this.#table(sequence);
    const copies = this.truncateCopies(sequence, length);
    for (const b of table.splice(this.blocks(length))) if (--b.holders === 0) this.#used--;
    if (copies) {
      table[table.length - 1].holders--;
      table[table.length - 1] = this.#block();
    }
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
