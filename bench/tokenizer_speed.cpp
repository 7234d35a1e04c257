// Encode speed of HfTokenizer on English prose, one thread, against Hugging Face's
// tokenizers.js (the peer the reference tests compare ids with) run by Node.js on the same
// text and tokenizer in the same run.
//
//   tokenizer_speed [--corpus data/sample/corpus.txt] [--tokenizers DIR] [--seconds 3]
//                   [--npm-prefix BUILD/npm]
//
// Run from the repository root. Without --tokenizers the tokenizers are trained first by
// tests/text/hf_reference/make_tokenizers.py into a temporary folder (byte_llama3 — the
// Llama 3 layout — and sp_llama2). --npm-prefix defaults to the npm folder of the build
// that holds this binary, where the reference tests install @huggingface/tokenizers; the
// peer's row is left out when node or the package is missing.
//
// cold: the first encode of the corpus by a fresh tokenizer (its piece cache empty).
// warm: later encodes of the same text, best of the repeats within --seconds.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "flotilla/base/timer.hpp"
#include "flotilla/text/hf_tokenizer.hpp"

namespace {

namespace fs = std::filesystem;
using flotilla::Timer;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string quote(const std::string& s) {
  std::string out = "'";
  for (const char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Output of a shell command, or "" if it failed.
std::string capture(const std::string& command) {
  FILE* pipe = ::popen((command + " 2>/dev/null").c_str(), "r");
  if (!pipe) return "";
  std::string out;
  char buf[4096];
  while (const size_t n = std::fread(buf, 1, sizeof buf, pipe)) out.append(buf, n);
  return ::pclose(pipe) == 0 ? out : "";
}

struct Row {
  std::string tokenizer;
  std::string impl;
  double mb_per_s;
  double tokens_per_s;  // 0: not measured
};

}  // namespace

int main(int argc, char** argv) {
  fs::path corpus_path = "data/sample/corpus.txt";
  fs::path tokenizers;
  double seconds = 3.0;
  fs::path npm_prefix = fs::canonical("/proc/self/exe").parent_path().parent_path() / "npm";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--corpus") {
      corpus_path = argv[i + 1];
    } else if (flag == "--tokenizers") {
      tokenizers = argv[i + 1];
    } else if (flag == "--seconds") {
      seconds = std::atof(argv[i + 1]);
    } else if (flag == "--npm-prefix") {
      npm_prefix = argv[i + 1];
    } else {
      std::cerr << "unknown flag " << flag << "\n";
      return 2;
    }
  }
  try {
    const std::string corpus = read_file(corpus_path);
    fs::path trained_dir;
    if (tokenizers.empty()) {
      trained_dir = fs::temp_directory_path() / ("flotilla_tokenizer_speed_" + std::to_string(::getpid()));
      const std::string command = "python3 tests/text/hf_reference/make_tokenizers.py --corpus " +
                                  quote(corpus_path.string()) + " --out " + quote(trained_dir.string()) +
                                  " > /dev/null";
      if (std::system(command.c_str()) != 0) throw std::runtime_error("failed: " + command);
      tokenizers = trained_dir;
    }
    const bool have_peer =
        fs::exists(npm_prefix / "node_modules/@huggingface/tokenizers/package.json") &&
        std::system("command -v node > /dev/null 2>&1") == 0;

    std::vector<Row> rows;
    for (const char* name : {"byte_llama3", "sp_llama2"}) {
      const fs::path dir = tokenizers / name;
      const auto tok = flotilla::text::load_hf_tokenizer(dir);
      Timer timer;
      size_t tokens = tok->encode(corpus).size();
      const double cold_s = timer.elapsed_s();
      rows.push_back({name, "flotilla cold", corpus.size() / cold_s / 1e6, tokens / cold_s});
      double best_s = 1e30;
      Timer total;
      do {
        timer.reset();
        tokens = tok->encode(corpus).size();
        best_s = std::min(best_s, timer.elapsed_s());
      } while (total.elapsed_s() < seconds);
      rows.push_back({name, "flotilla warm", corpus.size() / best_s / 1e6, tokens / best_s});
      if (have_peer) {
        const std::string out = capture(fmt::format(
            "node tests/text/hf_reference/hf_encode.mjs {} {} --bench {} {}", quote(npm_prefix.string()),
            quote(dir.string()), quote(corpus_path.string()), seconds));
        double peer = 0;
        if (std::sscanf(out.c_str(), "MB/s %lf", &peer) == 1) rows.push_back({name, "tokenizers.js", peer, 0});
      }
      std::cout << fmt::format("{}: {} bytes, {} tokens, {:.2f} bytes/token\n", name, corpus.size(), tokens,
                               static_cast<double>(corpus.size()) / tokens);
    }
    if (!trained_dir.empty()) fs::remove_all(trained_dir);

    std::cout << fmt::format("\n{:<12} {:<14} {:>8} {:>12} {:>10}\n", "tokenizer", "impl", "MB/s",
                             "tokens/s", "vs peer");
    for (const Row& r : rows) {
      double peer = 0;
      for (const Row& p : rows) {
        if (p.tokenizer == r.tokenizer && p.impl == "tokenizers.js") peer = p.mb_per_s;
      }
      std::cout << fmt::format("{:<12} {:<14} {:>8.2f} {:>12} {:>10}\n", r.tokenizer, r.impl, r.mb_per_s,
                               r.tokens_per_s > 0 ? fmt::format("{:.0f}", r.tokens_per_s) : "-",
                               peer > 0 ? fmt::format("{:.1f}x", r.mb_per_s / peer) : "-");
    }
    if (!have_peer) std::cout << "(tokenizers.js not measured: node or " << npm_prefix.string() << " missing)\n";
  } catch (const std::exception& e) {
    std::cerr << "tokenizer_speed: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
