// Parse Mermaid text from stdin with the real mermaid parser (the one GitHub renders with); exit 1 on error.
// Used by the tests: NODE_PATH must point at a node_modules with mermaid and jsdom (scripts/test installs them).
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(path.join(path.resolve(process.env.NODE_PATH || '.'), 'noop.js'));
const { JSDOM } = require('jsdom');
const dom = new JSDOM('<!DOCTYPE html><body></body>');
globalThis.window = dom.window;
globalThis.document = dom.window.document;
const mermaid = (await import(require.resolve('mermaid'))).default;

let text = '';
for await (const chunk of process.stdin) text += chunk;
try {
  const result = await mermaid.parse(text);
  console.log(JSON.stringify(result));
} catch (e) {
  console.error(String(e.message || e));
  process.exit(1);
}
