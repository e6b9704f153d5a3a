/**
 * Tool calls in generated text (lib/server/tool-calls): the Hermes and Mistral syntaxes parsed into
 * OpenAI's tool_calls, and the same calls from text streamed in random pieces, the content before them
 * streamed as it comes.
 */
import { ToolCallStream, parseToolCalls, toolCallSyntaxOf } from '../lib/server/tool-calls';
import { rng } from './helpers/reference';

const call = (name: string, args: unknown) => `<tool_call>\n${JSON.stringify({ name, arguments: args })}\n</tool_call>`;
const strip = (calls: { function: { name: string; arguments: string } }[] | null) =>
  calls && calls.map((c) => [c.function.name, JSON.parse(c.function.arguments) as unknown]);

test("the syntax of a template: Hermes where it writes <tool_call>, Mistral's where [TOOL_CALLS], none otherwise", () => {
  expect(toolCallSyntaxOf('{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>')).toBe('hermes');
  expect(toolCallSyntaxOf("{% if m.tool_calls %}{{ '[TOOL_CALLS] [' }}{% endif %}")).toBe('mistral');
  expect(toolCallSyntaxOf('{{ messages }}')).toBeUndefined();
  expect(toolCallSyntaxOf(undefined)).toBeUndefined();
});

test.each([
  ['one call', call('get_weather', { city: 'Zürich', days: 3 }), null, [['get_weather', { city: 'Zürich', days: 3 }]]],
  [
    'text, then two calls',
    'Let me check. ' + call('a', {}) + '\n' + call('b', { x: [1, 2] }),
    'Let me check. ',
    [
      ['a', {}],
      ['b', { x: [1, 2] }],
    ],
  ],
  ['a call cut off by the end of the text', '<tool_call>{"name": "f", "arguments": {"q": 1}}', null, [['f', { q: 1 }]]],
  ['no arguments', '<tool_call>{"name": "now"}</tool_call>', null, [['now', {}]]],
])('%s', (_, text, content, calls) => {
  const parsed = parseToolCalls(text);
  expect(parsed?.content).toBe(content);
  expect(strip(parsed!.calls)).toEqual(calls);
  for (const c of parsed!.calls) {
    expect(c.type).toBe('function');
    expect(c.id).toMatch(/^call_[0-9a-f]{24}$/);
  }
  expect(new Set(parsed!.calls.map((c) => c.id)).size).toBe(parsed!.calls.length);
});

test('arguments given as a string stay that string; what is not a call is no call', () => {
  expect(
    parseToolCalls('<tool_call>{"name": "f", "arguments": "{\\"a\\":1}"}</tool_call>')!.calls[0].function.arguments,
  ).toBe('{"a":1}');
  expect(parseToolCalls('plain text, no call')).toBeNull();
  expect(parseToolCalls('<tool_call>not json</tool_call>')).toBeNull();
  expect(parseToolCalls('<tool_call>{"arguments": {}}</tool_call>')).toBeNull(); // no name
  expect(parseToolCalls('<tool_call>[1, 2]</tool_call>')).toBeNull();
  expect(parseToolCalls(call('ok', {}) + '<tool_call>{"name": broken')).toBeNull();
});

const mistral = (calls: [string, unknown][]) =>
  '[TOOL_CALLS] ' + JSON.stringify(calls.map(([name, args]) => ({ name, arguments: args })));

test.each([
  [
    'one call',
    mistral([['get_weather', { city: 'Zürich', days: 3 }]]),
    null,
    [['get_weather', { city: 'Zürich', days: 3 }]],
  ],
  [
    'text, then two calls in one array',
    'Let me check.\n' +
      mistral([
        ['a', {}],
        ['b', { x: [1, 2] }],
      ]),
    'Let me check.\n',
    [
      ['a', {}],
      ['b', { x: [1, 2] }],
    ],
  ],
  ['one object rather than an array', '[TOOL_CALLS]{"name": "f", "arguments": {"q": 1}}', null, [['f', { q: 1 }]]],
  ['no arguments', '[TOOL_CALLS] [{"name": "now"}]', null, [['now', {}]]],
])("Mistral's syntax: %s", (_, text, content, calls) => {
  const parsed = parseToolCalls(text, 'mistral');
  expect(parsed?.content).toBe(content);
  expect(strip(parsed!.calls)).toEqual(calls);
  // Mistral's templates take back only ids of 9 letters and digits.
  for (const c of parsed!.calls) expect(c.id).toMatch(/^[A-Za-z0-9]{9}$/);
  expect(new Set(parsed!.calls.map((c) => c.id)).size).toBe(parsed!.calls.length);
  expect(parseToolCalls(text)).toBeNull(); // not Hermes
});

test("Mistral's syntax: what is not a call is no call", () => {
  expect(parseToolCalls('plain text', 'mistral')).toBeNull();
  expect(parseToolCalls('[TOOL_CALLS] [{"name": "f", "arguments": {}}', 'mistral')).toBeNull(); // cut off
  expect(parseToolCalls('[TOOL_CALLS] [{"arguments": {}}]', 'mistral')).toBeNull(); // no name
  expect(parseToolCalls('[TOOL_CALLS] [1]', 'mistral')).toBeNull();
  expect(parseToolCalls('[TOOL_CALLS]', 'mistral')).toBeNull();
});

test.each([
  [
    'hermes' as const,
    [
      'Checking the weather. ' + call('get_weather', { city: 'Genève' }) + call('get_time', { tz: 'UTC+1' }),
      call('only', { a: '<tool_call>' }),
      'no call at all, though < and <tool are here <tool_ca',
      'a call that does not parse <tool_call>{"name": </tool_call>',
    ],
  ],
  [
    'mistral' as const,
    [
      'Checking. ' +
        mistral([
          ['get_weather', { city: 'Genève' }],
          ['get_time', { tz: 'UTC+1' }],
        ]),
      mistral([['only', { a: '[TOOL_CALLS]' }]]),
      'no call at all, though [TOOL and [TOOL_CALL are here [TOOL_CALLS',
      'a call that does not parse [TOOL_CALLS] [{"name": ',
    ],
  ],
])('%s, streamed in random pieces: the content as it comes, the calls at the end, as parsed whole', (syntax, texts) => {
  const rand = rng(syntax.length + 12);
  for (const text of texts)
    for (let trial = 0; trial < 20; trial++) {
      const stream = new ToolCallStream(syntax);
      let content = '';
      for (let at = 0; at < text.length;) {
        const n = 1 + Math.floor(rand() * 6);
        content += stream.push(text.slice(at, at + n));
        at += n;
      }
      const end = stream.finish();
      content += end.content;
      const whole = parseToolCalls(text, syntax);
      if (whole) {
        expect(content).toBe(whole.content ?? '');
        expect(strip(end.calls)).toEqual(strip(whole.calls));
      } else {
        expect(content).toBe(text);
        expect(end.calls).toBeNull();
      }
    }
});
