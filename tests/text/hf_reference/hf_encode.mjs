// Reference encodings from Hugging Face's tokenizers.js (npm @huggingface/tokenizers), for
// tests/text/hf_tokenizer_test.cpp and bench/tokenizer_speed.cpp.
//
//   node hf_encode.mjs NPM_PREFIX TOKENIZER_DIR TEXTS_JSON OUT_JSON
//       TEXTS_JSON: a JSON array of strings. Writes {"ids": [[...], ...], "decoded": [...]}:
//       encode(text, add_special_tokens=false) and decode(ids, skip_special_tokens=true,
//       clean_up_tokenization_spaces=false) of each.
//   node hf_encode.mjs NPM_PREFIX TOKENIZER_DIR --bench TEXT_FILE SECONDS
//       Encodes the file's text repeatedly for about SECONDS; prints "MB/s <value>".
//
// NPM_PREFIX is the folder `npm install --prefix` installed the package into. A missing
// package is an error (exit 2), never a silent pass.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [prefix, tokenizerDir, ...rest] = process.argv.slice(2);
if (!prefix || !tokenizerDir || rest.length < 2) {
  console.error("usage: node hf_encode.mjs NPM_PREFIX TOKENIZER_DIR (TEXTS_JSON OUT_JSON | --bench FILE SECONDS)");
  process.exit(2);
}
const entry = path.join(prefix, "node_modules", "@huggingface", "tokenizers", "dist", "tokenizers.mjs");
if (!fs.existsSync(entry)) {
  console.error(`hf_encode.mjs: ${entry} is missing: npm install --prefix ${prefix} @huggingface/tokenizers@0.2.0`);
  process.exit(2);
}
const { Tokenizer } = await import(pathToFileURL(entry).href);

const readJson = (file) => JSON.parse(fs.readFileSync(file, "utf8"));
const configFile = path.join(tokenizerDir, "tokenizer_config.json");
const tokenizer = new Tokenizer(
  readJson(path.join(tokenizerDir, "tokenizer.json")),
  fs.existsSync(configFile) ? readJson(configFile) : {},
);

if (rest[0] === "--bench") {
  const text = fs.readFileSync(rest[1], "utf8");
  const seconds = Number(rest[2]);
  const bytes = Buffer.byteLength(text, "utf8");
  tokenizer.encode(text, { add_special_tokens: false });  // warm-up (fills the word cache)
  let runs = 0;
  const start = process.hrtime.bigint();
  let elapsed = 0;
  while (elapsed < seconds || runs === 0) {
    tokenizer.encode(text, { add_special_tokens: false });
    ++runs;
    elapsed = Number(process.hrtime.bigint() - start) / 1e9;
  }
  console.log(`MB/s ${(bytes * runs) / elapsed / 1e6}`);
} else {
  const texts = readJson(rest[0]);
  const ids = [];
  const decoded = [];
  for (const text of texts) {
    const encoding = tokenizer.encode(text, { add_special_tokens: false });
    ids.push(encoding.ids);
    decoded.push(encoding.ids.length === 0 ? "" : tokenizer.decode(encoding.ids, {
      skip_special_tokens: true,
      clean_up_tokenization_spaces: false,
    }));
  }
  fs.writeFileSync(rest[1], JSON.stringify({ ids, decoded }));
}
