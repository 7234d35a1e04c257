// Quantized decode (issue 14 item 4): the few-row products of a Mistral-7B-shaped 4-bit model
// (MLX layout, group 64, f16 scales) through the fused kernel (kernels::qmatmul_rows_fused,
// what qmatmul_forward runs for a few rows), against the previous path
// (kernels::qmatmul_rows_dequantized: each weight row dequantized to floats, then dotted)
// in the same run, and against the machine's memory bandwidth measured
// in the same run (a decode step must read every packed byte once: that is its bound).
//
//   quant_decode [--threads 2] [--rows 1,4,8] [--repeats 5] [--layers 2] [--group-size 64]
//                [--bits 4]
//
// One decoder layer's seven matrices (q 4096x4096, k and v 1024x4096, o 4096x4096, gate
// and up 14336x4096, down 4096x14336: 218 M weights, 117 MB packed with scales and biases)
// and the lm_head (32768x4096) hold random bits: the values do not change the work. --layers
// copies of the layer are cycled through so that no matrix is in cache when it is read (one
// copy already exceeds any L3 here). A token's time is 32 x one layer + the lm_head, the work
// `flotilla generate` does per decoded token (attention over a short cache is negligible).
//
// bandwidth: the best of --repeats reads of all the bytes (every thread summing its share of
// 64-bit words), the rate a decode step cannot beat; the bound row is that rate over a
// token's bytes.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/base/rng.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/kernels/quant.hpp"
#include "flotilla/tensor/dtype.hpp"
#include "flotilla/tensor/quant.hpp"

namespace {

using flotilla::QuantFormat;
using flotilla::QuantMatrix;
using flotilla::Rng;
using flotilla::Timer;

struct Args {
  int threads = 2, repeats = 5, layers = 2, bits = 4;
  int64_t group_size = 64;
  std::vector<int64_t> rows = {1, 4, 8};
};

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t comma = std::min(s.find(',', pos), s.size());
    out.push_back(std::stoll(s.substr(pos, comma - pos)));
    pos = comma + 1;
  }
  return out;
}

Args parse_args(int argc, char** argv) {
  Args a;
  auto need = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw std::invalid_argument(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string_view s = argv[i];
    if (s == "--threads") a.threads = std::stoi(need(i));
    else if (s == "--rows") a.rows = parse_list(need(i));
    else if (s == "--repeats") a.repeats = std::stoi(need(i));
    else if (s == "--layers") a.layers = std::stoi(need(i));
    else if (s == "--group-size") a.group_size = std::stoll(need(i));
    else if (s == "--bits") a.bits = std::stoi(need(i));
    else throw std::invalid_argument("unknown argument " + std::string(s));
  }
  return a;
}

// A quantized matrix of random bits with its own storage: scales in [0.001, 0.01) and
// biases in [-0.1, 0) as f16, the range of a trained model's.
struct RandomQuantMatrix {
  std::vector<uint32_t> packed;
  std::vector<uint16_t> scales, biases;
  QuantMatrix m;

  RandomQuantMatrix(Rng& rng, int64_t rows, int64_t cols, QuantFormat f)
      : packed(static_cast<size_t>(rows * cols / f.per_word())),
        scales(static_cast<size_t>(rows * cols / f.group_size)),
        biases(scales.size()) {
    for (uint32_t& w : packed) w = static_cast<uint32_t>(rng.next_u64());
    std::vector<float> u(scales.size());
    rng.fill_uniform(u, 0.001f, 0.01f);
    for (size_t i = 0; i < u.size(); ++i) scales[i] = flotilla::f32_to_f16(u[i]);
    rng.fill_uniform(u, -0.1f, 0.0f);
    for (size_t i = 0; i < u.size(); ++i) biases[i] = flotilla::f32_to_f16(u[i]);
    m = QuantMatrix{rows, cols, f, flotilla::DType::f16, reinterpret_cast<const std::byte*>(packed.data()),
                    reinterpret_cast<const std::byte*>(scales.data()), reinterpret_cast<const std::byte*>(biases.data())};
  }
};

struct Shape {
  const char* name;
  int64_t rows, cols;
};

// Mistral-7B-v0.3 (configs/mistral-7b-v0.3.json): one decoder layer, then the lm_head.
constexpr Shape kLayerShapes[] = {{"q", 4096, 4096},     {"k", 1024, 4096},    {"v", 1024, 4096},
                                  {"o", 4096, 4096},     {"gate", 14336, 4096}, {"up", 14336, 4096},
                                  {"down", 4096, 14336}};
constexpr Shape kLmHead = {"lm_head", 32768, 4096};
constexpr int kModelLayers = 32;

// Sum of every 64-bit word of the buffers, each thread reading its share: a read-bandwidth
// probe (the sum is returned so the reads cannot be dropped).
uint64_t read_all(const std::vector<const RandomQuantMatrix*>& ms) {
  uint64_t total = 0;
  for (const RandomQuantMatrix* q : ms) {
    for (const auto* buf : {static_cast<const void*>(q->packed.data()), static_cast<const void*>(q->scales.data()),
                            static_cast<const void*>(q->biases.data())}) {
      const size_t bytes = buf == q->packed.data() ? q->packed.size() * 4 : q->scales.size() * 2;
      const auto* w = static_cast<const uint64_t*>(buf);
      const int64_t n = static_cast<int64_t>(bytes / 8);
      uint64_t s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
      for (int64_t i = 0; i < n; ++i) s += w[i];
      total += s;
    }
  }
  return total;
}

}  // namespace

int main(int argc, char** argv) {
  namespace k = flotilla::kernels;
  try {
    const Args a = parse_args(argc, argv);
    omp_set_num_threads(a.threads);
    const QuantFormat f{a.bits, a.group_size};
    Rng rng(1234);

    std::vector<std::vector<RandomQuantMatrix>> layers(static_cast<size_t>(a.layers));
    for (auto& layer : layers)
      for (const Shape& s : kLayerShapes) layer.emplace_back(rng, s.rows, s.cols, f);
    const RandomQuantMatrix lm_head(rng, kLmHead.rows, kLmHead.cols, f);

    std::vector<const RandomQuantMatrix*> one_layer;
    int64_t layer_bytes = 0;
    for (const RandomQuantMatrix& q : layers[0]) {
      one_layer.push_back(&q);
      layer_bytes += q.m.bytes();
    }
    const double token_bytes = static_cast<double>(kModelLayers * layer_bytes + lm_head.m.bytes());

    std::printf("quant_decode: %d-bit, group %ld, f16 scales; %d threads; %d layer copies; kernel variant %s\n",
                a.bits, static_cast<long>(a.group_size), a.threads, a.layers, k::kernel_isa().c_str());
    std::printf("bytes per token: %.3f GB (32 layers x %.1f MB + lm_head %.1f MB)\n", token_bytes / 1e9,
                static_cast<double>(layer_bytes) / 1e6, static_cast<double>(lm_head.m.bytes()) / 1e6);

    // Bandwidth: all layer copies read in turn, best pass.
    std::vector<const RandomQuantMatrix*> all;
    for (auto& layer : layers)
      for (const RandomQuantMatrix& q : layer) all.push_back(&q);
    volatile uint64_t sink = 0;
    int64_t all_bytes = 0;
    for (const RandomQuantMatrix* q : all) all_bytes += q->m.bytes();
    const double read_ms = flotilla::best_of_ms(a.repeats, [&] { sink = sink + read_all(all); });
    const double gb_per_s = static_cast<double>(all_bytes) / (read_ms * 1e-3) / 1e9;
    std::printf("read bandwidth: %.1f GB/s -> bound %.2f tokens/s (%.0f ms per token)\n\n", gb_per_s,
                gb_per_s * 1e9 / token_bytes, token_bytes / (gb_per_s * 1e9) * 1e3);

    for (const int64_t N : a.rows) {
      const int64_t max_cols = 14336, max_rows = 32768;
      std::vector<float> x(static_cast<size_t>(N * max_cols)), out(static_cast<size_t>(N * max_rows));
      rng.fill_uniform(x, -1.0f, 1.0f);
      // ms of one pass over matrix index i of every layer copy, per copy (cold caches).
      using Product = void (*)(float*, const float*, const QuantMatrix&, const float*, int64_t);
      auto time_layer_matrix = [&](size_t i, Product fn) {
        const double ms = flotilla::best_of_ms(a.repeats, [&] {
          for (auto& layer : layers) fn(out.data(), x.data(), layer[i].m, nullptr, N);
        });
        return ms / a.layers;
      };
      std::printf("N = %ld input rows (ms per call; previous = dequantize-then-dot, fused = qmatmul_rows_fused)\n",
                  static_cast<long>(N));
      std::printf("%-8s %-12s %10s %10s %8s %16s %10s\n", "matrix", "shape", "previous", "fused", "ratio",
                  "fused G wts/s", "fused GB/s");
      double layer_ms[2] = {0.0, 0.0};
      for (size_t i = 0; i < std::size(kLayerShapes); ++i) {
        const Shape& s = kLayerShapes[i];
        const double prev = time_layer_matrix(i, &k::qmatmul_rows_dequantized);
        const double fused = time_layer_matrix(i, &k::qmatmul_rows_fused);
        layer_ms[0] += prev;
        layer_ms[1] += fused;
        const double weights = static_cast<double>(s.rows * s.cols);
        std::printf("%-8s %5ldx%-6ld %10.2f %10.2f %7.2fx %16.2f %10.1f\n", s.name, static_cast<long>(s.rows),
                    static_cast<long>(s.cols), prev, fused, prev / fused, weights / (fused * 1e-3) / 1e9,
                    static_cast<double>(layers[0][i].m.bytes()) / (fused * 1e-3) / 1e9);
      }
      const double head_prev = flotilla::best_of_ms(
          a.repeats, [&] { k::qmatmul_rows_dequantized(out.data(), x.data(), lm_head.m, nullptr, N); });
      const double head_fused = flotilla::best_of_ms(
          a.repeats, [&] { k::qmatmul_rows_fused(out.data(), x.data(), lm_head.m, nullptr, N); });
      std::printf("%-8s %5ldx%-6ld %10.2f %10.2f %7.2fx\n", kLmHead.name, static_cast<long>(kLmHead.rows),
                  static_cast<long>(kLmHead.cols), head_prev, head_fused, head_prev / head_fused);
      const double token_prev = kModelLayers * layer_ms[0] + head_prev;
      const double token_fused = kModelLayers * layer_ms[1] + head_fused;
      const double bound_ms = token_bytes / (gb_per_s * 1e9) * 1e3;
      std::printf("token: previous %.0f ms (%.2f tokens/s), fused %.0f ms (%.2f tokens/s): %.2fx; "
                  "bandwidth bound %.0f ms (fused at %.0f%% of it)\n\n",
                  token_prev, 1e3 / token_prev, token_fused, 1e3 / token_fused, token_prev / token_fused, bound_ms,
                  100.0 * bound_ms / token_fused);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quant_decode: %s\n", e.what());
    return 1;
  }
}
