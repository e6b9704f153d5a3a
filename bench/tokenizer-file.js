// A tokenizer.json for the benchmark models, whose ids follow the layout the bench GGUF files use
// (<unk> 0, <s> 1, </s> 2, the 256 bytes from 3, then filler words): every id decodes to text, so
// streamed responses carry text the way a real model's do. No merges: prompts are sent as token ids.
'use strict';
const fs = require('fs');
const path = require('path');

/** GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell them. */
function byteChars() {
  const direct = [];
  for (let b = 0x21; b <= 0x7e; b++) direct.push(b);
  for (let b = 0xa1; b <= 0xac; b++) direct.push(b);
  for (let b = 0xae; b <= 0xff; b++) direct.push(b);
  let extra = 0;
  return Array.from({ length: 256 }, (_, b) => String.fromCodePoint(direct.includes(b) ? b : 256 + extra++));
}

const SPECIALS = ['<unk>', '<s>', '</s>'];

/** The vocabulary's first 259 ids: the three specials, then the 256 bytes. */
function baseVocab() {
  const vocab = {};
  SPECIALS.forEach((s, i) => (vocab[s] = i));
  byteChars().forEach((c, b) => (vocab[c] = 3 + b));
  return vocab;
}

/** tokenizer.json of a byte-level BPE (GPT-2 style pre-tokenizer and decoder) with these ids and merges. */
function byteLevelJson(vocab, merges) {
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: SPECIALS.map((content, id) => ({
      id,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    })),
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: null,
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges,
    },
  };
}

function writeBenchTokenizer(dir, vocabSize) {
  const file = path.join(dir, 'tokenizer.json');
  if (fs.existsSync(file)) return;
  const vocab = baseVocab();
  // 'Ġ' is the byte-level spelling of a space: filler id i decodes to " w<i>".
  for (let id = 259; id < vocabSize; id++) vocab[`\u0120w${id}`] = id;
  fs.writeFileSync(file + '.tmp', JSON.stringify(byteLevelJson(vocab, [])));
  fs.writeFileSync(
    path.join(dir, 'tokenizer_config.json'),
    JSON.stringify({ bos_token: '<s>', eos_token: '</s>', unk_token: '<unk>', add_bos_token: false }, null, 2) + '\n',
  );
  fs.renameSync(file + '.tmp', file);
}

module.exports = { writeBenchTokenizer, baseVocab, byteChars, byteLevelJson };
