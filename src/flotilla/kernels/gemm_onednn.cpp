// gemm() on oneDNN (see gemm.hpp for the vocabulary).
//
// A primitive is created for one *signature*: transposes, M, N, K, leading dimensions,
// alpha, accumulate, input format and the thread count it will run with. oneDNN splits the
// work by the thread count when the primitive is created, so the count is part of the
// signature: a new count (set_num_threads) gets its own primitive. Called inside one of our OpenMP parallel regions, oneDNN does not nest: the
// product runs on the calling thread alone (the test runs it so and checks every element).
//
// accumulate is oneDNN's sum post-op (C = alpha * A @ B + 1 * C); alpha is the output
// scale. The engine and the cache are process-wide, as OpenBLAS's state was before them:
// they are a memo of compiled kernels, not state a caller can observe, and a oneDNN engine
// is meant to be shared.
#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>
#include <oneapi/dnnl/dnnl_debug.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>

#include "flotilla/base/buffer.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/gemm.hpp"
#include "flotilla/tensor/dtype.hpp"

namespace flotilla::kernels {
namespace {

// A bound on distinct signatures kept; past it the cache starts over (a run that keeps
// meeting new shapes, e.g. prompts of every length, must not grow without end).
constexpr size_t kMaxCachedPrimitives = 2048;

struct Signature {
  Transpose ta, tb;
  GemmInput input;
  bool accumulate;
  int32_t threads;
  uint32_t alpha_bits;
  int64_t M, N, K, lda, ldb, ldc;
  bool operator==(const Signature&) const = default;
};

struct SignatureHash {
  size_t operator()(const Signature& s) const noexcept {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields
    auto mix = [&h](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    mix(static_cast<uint64_t>(s.ta) | static_cast<uint64_t>(s.tb) << 8 |
        static_cast<uint64_t>(s.input) << 16 | static_cast<uint64_t>(s.accumulate) << 24 |
        static_cast<uint64_t>(static_cast<uint32_t>(s.threads)) << 32);
    mix(s.alpha_bits);
    for (int64_t v : {s.M, s.N, s.K, s.lda, s.ldb, s.ldc}) mix(static_cast<uint64_t>(v));
    return static_cast<size_t>(h);
  }
};

// One created primitive and the memory descriptors its arguments are wrapped in.
struct Compiled {
  dnnl::matmul primitive;
  dnnl::memory::desc a, b, c;
  size_t scratchpad_bytes = 0;
};

dnnl::memory::data_type input_data_type(GemmInput input) {
  switch (input) {
    case GemmInput::f32: return dnnl::memory::data_type::f32;
    case GemmInput::bf16: return dnnl::memory::data_type::bf16;
  }
  throw Error("kernels/gemm", "unknown input format");
}

class Engine {
 public:
  Engine() : engine_(dnnl::engine::kind::cpu, 0) {}

  const dnnl::engine& engine() const { return engine_; }

  std::shared_ptr<const Compiled> find_or_create(const Signature& s) {
    {
      std::lock_guard lock(mu_);
      auto it = cache_.find(s);
      if (it != cache_.end()) return it->second;
    }
    // Created outside the lock: creation takes milliseconds and other threads may be
    // looking up other signatures meanwhile. Two threads racing on one new signature both
    // create it; the first one stored wins, the same primitive either way.
    auto made = std::make_shared<const Compiled>(create(s));
    std::lock_guard lock(mu_);
    if (cache_.size() >= kMaxCachedPrimitives) cache_.clear();
    return cache_.emplace(s, std::move(made)).first->second;
  }

  size_t size() {
    std::lock_guard lock(mu_);
    return cache_.size();
  }

  void clear() {
    std::lock_guard lock(mu_);
    cache_.clear();
  }

 private:
  Compiled create(const Signature& s) const {
    using dims = dnnl::memory::dims;
    const auto in = input_data_type(s.input);
    // op(A) (M, K): row-major (M, K) with row stride lda, or the transpose of (K, M).
    const dims a_strides = s.ta == Transpose::no ? dims{s.lda, 1} : dims{1, s.lda};
    const dims b_strides = s.tb == Transpose::no ? dims{s.ldb, 1} : dims{1, s.ldb};
    dnnl::memory::desc a({s.M, s.K}, in, a_strides);
    dnnl::memory::desc b({s.K, s.N}, in, b_strides);
    dnnl::memory::desc c({s.M, s.N}, dnnl::memory::data_type::f32, dims{s.ldc, 1});
    dnnl::primitive_attr attr;
    // Scratchpad per call from the caller's thread (below), so that concurrent calls on
    // one primitive never share oneDNN's library-owned scratch.
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    float alpha;
    std::memcpy(&alpha, &s.alpha_bits, sizeof alpha);
    if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
    if (s.accumulate) {
      dnnl::post_ops po;
      po.append_sum(1.0f);
      attr.set_post_ops(po);
    }
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), attr, engine_);
    return Compiled{dnnl::matmul(pd), a, b, c, pd.scratchpad_desc().get_size()};
  }

  dnnl::engine engine_;
  std::mutex mu_;
  std::unordered_map<Signature, std::shared_ptr<const Compiled>, SignatureHash> cache_;
};

Engine& engine() {
  static Engine e;
  return e;
}

// Per-thread scratch for the primitives, 64-byte aligned (base/buffer.hpp), grown on demand.
struct Scratchpad {
  Buffer<std::byte> bytes;
  void* reserve(size_t n) {
    if (n > bytes.size()) bytes.resize(n);
    return bytes.data();
  }
};

// Bumped by gemm_clear_cache(): each thread's bindings (below) start over when they see a
// new value.
std::atomic<uint64_t> cache_generation{0};

// One thread's handles on one cached primitive: the memory objects its arguments are
// wrapped in, made once and pointed at each call's buffers. Wrapping the arguments anew
// on every call (three or four memory objects, an argument map and a stream) cost about
// 6 us a call on this project's AMD EPYC, a quarter of a 64 x 512 x 64 bf16 product, and
// W2's attention makes about 28,000 such products a step.
struct Bound {
  std::shared_ptr<const Compiled> compiled;
  dnnl::memory a, b, c, scratchpad;
};

// Everything a thread keeps between its calls: its bindings by signature, its stream and
// its scratch. Thread-local, so a call takes no lock once its signature is bound here.
struct ThreadBindings {
  uint64_t generation = 0;
  std::unordered_map<Signature, Bound, SignatureHash> bound;
  std::optional<dnnl::stream> stream;
  Scratchpad scratch;
};

Bound& bind(ThreadBindings& t, const Signature& s) {
  const uint64_t generation = cache_generation.load(std::memory_order_acquire);
  if (t.generation != generation || t.bound.size() >= kMaxCachedPrimitives) {
    t.bound.clear();
    t.generation = generation;
  }
  if (auto it = t.bound.find(s); it != t.bound.end()) return it->second;
  std::shared_ptr<const Compiled> p;
  try {
    p = engine().find_or_create(s);
  } catch (const dnnl::error& e) {
    throw Error("kernels/gemm", fmt::format("oneDNN could not create a {} matmul for M={} N={} K={} "
                                            "(lda {}, ldb {}, ldc {}): {}",
                                            s.input == GemmInput::bf16 ? "bf16" : "float32", s.M, s.N, s.K,
                                            s.lda, s.ldb, s.ldc, e.what()));
  }
  const dnnl::engine& eng = engine().engine();
  Bound made{p, dnnl::memory(p->a, eng, DNNL_MEMORY_NONE), dnnl::memory(p->b, eng, DNNL_MEMORY_NONE),
             dnnl::memory(p->c, eng, DNNL_MEMORY_NONE), {}};
  if (p->scratchpad_bytes > 0)
    made.scratchpad = dnnl::memory(dnnl::memory::desc({static_cast<int64_t>(p->scratchpad_bytes)},
                                                      dnnl::memory::data_type::u8, dnnl::memory::dims{1}),
                                   eng, DNNL_MEMORY_NONE);
  return t.bound.emplace(s, std::move(made)).first->second;
}

void run_sgemm(Transpose ta, Transpose tb, int64_t M, int64_t N, int64_t K, float alpha,
               const float* A, int64_t lda, const float* B, int64_t ldb, bool accumulate, float* C,
               int64_t ldc) {
  // dnnl_sgemm is row-major, like the rest of this file.
  const dnnl_status_t st = dnnl_sgemm(ta == Transpose::yes ? 'T' : 'N', tb == Transpose::yes ? 'T' : 'N',
                                      M, N, K, alpha, A, lda, B, ldb, accumulate ? 1.0f : 0.0f, C, ldc);
  if (st != dnnl_success)
    throw Error("kernels/gemm", fmt::format("oneDNN sgemm failed (status {}) on M={} N={} K={}",
                                            static_cast<int>(st), M, N, K));
}

// Runs the cached primitive of signature s on A and B (in s.input's format) into C.
void run_primitive(const Signature& s, const void* A, const void* B, float* C) {
  thread_local ThreadBindings t;
  Bound& p = bind(t, s);
  if (!t.stream) t.stream.emplace(engine().engine());
  // oneDNN takes non-const handles; it only reads A and B.
  p.a.set_data_handle(const_cast<void*>(A));
  p.b.set_data_handle(const_cast<void*>(B));
  p.c.set_data_handle(C);
  dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, p.a.get()}, {DNNL_ARG_WEIGHTS, p.b.get()}, {DNNL_ARG_DST, p.c.get()},
                             {DNNL_ARG_SCRATCHPAD, nullptr}};
  int nargs = 3;
  if (p.compiled->scratchpad_bytes > 0) {
    p.scratchpad.set_data_handle(t.scratch.reserve(p.compiled->scratchpad_bytes));
    args[nargs++].memory = p.scratchpad.get();
  }
  dnnl_status_t st = dnnl_primitive_execute(p.compiled->primitive.get(), t.stream->get(), nargs, args);
  if (st == dnnl_success) st = dnnl_stream_wait(t.stream->get());
  if (st != dnnl_success)
    throw Error("kernels/gemm", fmt::format("oneDNN matmul failed (status {}) on M={} N={} K={}",
                                            static_cast<int>(st), s.M, s.N, s.K));
}

// The answers of gemm() that need no product; true when C is done.
bool trivial_product(int64_t M, int64_t N, int64_t K, bool accumulate, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return true;
  if (K > 0) return false;
  // An empty sum: oneDNN rejects zero-sized K, and the answer needs no product.
  if (!accumulate)
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
  return true;
}

// A product with a dimension longer than kPieceSplitAbove runs as pieces kPieceLength long
// along it (the last one shorter), one primitive call each: oneDNN 2.6's brgemm matmul runs
// the lm_head's products (K or M or N = the 32000-word vocabulary, rows 128000 bytes apart)
// well under its rate, and their pieces near it. Measured on this project's AMD EPYC, one
// thread, 512 rows x 768 x 32000: dx = dlogits @ W 110 -> 160 GFLOP/s split along K,
// dW = dlogits^T @ x 139 -> 160-185 along M, logits = x @ W^T 171 -> 175-188 along N; in
// bf16 280 -> 345, 290 -> 343, 330 -> 354. Pieces along K accumulate into C after the
// first, so the sum is the same product in a fixed order (deterministic as before).
constexpr int64_t kPieceSplitAbove = 8192;
constexpr int64_t kPieceLength = 4096;

// Calls run(m, n, k, A', B', accumulate', C') for each piece of C (M, N) = op(A) @ op(B).
template <class T, class Run>
void in_pieces(Transpose ta, Transpose tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
               const T* B, int64_t ldb, bool accumulate, float* C, int64_t ldc, const Run& run) {
  // Element (i, j) of op(X) sits at X[i * ld + j] untransposed, X[j * ld + i] transposed.
  auto at = [](const T* X, Transpose t, int64_t ld, int64_t i, int64_t j) {
    return t == Transpose::no ? X + i * ld + j : X + j * ld + i;
  };
  if (K > kPieceSplitAbove) {
    for (int64_t k0 = 0; k0 < K; k0 += kPieceLength)
      in_pieces(ta, tb, M, N, std::min(kPieceLength, K - k0), at(A, ta, lda, 0, k0), lda,
                at(B, tb, ldb, k0, 0), ldb, accumulate || k0 > 0, C, ldc, run);
  } else if (M > kPieceSplitAbove) {
    for (int64_t m0 = 0; m0 < M; m0 += kPieceLength)
      in_pieces(ta, tb, std::min(kPieceLength, M - m0), N, K, at(A, ta, lda, m0, 0), lda, B, ldb,
                accumulate, C + m0 * ldc, ldc, run);
  } else if (N > kPieceSplitAbove) {
    for (int64_t n0 = 0; n0 < N; n0 += kPieceLength)
      in_pieces(ta, tb, M, std::min(kPieceLength, N - n0), K, A, lda, at(B, tb, ldb, 0, n0), ldb,
                accumulate, C + n0, ldc, run);
  } else {
    run(M, N, K, A, B, accumulate, C);
  }
}

}  // namespace

void gemm(Transpose ta, Transpose tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  if (trivial_product(M, N, K, accumulate, C, ldc)) return;
  if (M < kGemmPrimitiveMinRows) {
    run_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, accumulate, C, ldc);
    return;
  }
  in_pieces(ta, tb, M, N, K, A, lda, B, ldb, accumulate, C, ldc,
            [&](int64_t m, int64_t n, int64_t k, const float* a, const float* b, bool acc, float* c) {
              run_primitive(Signature{ta, tb, GemmInput::f32, acc, omp_get_max_threads(),
                                      std::bit_cast<uint32_t>(alpha), m, n, k, lda, ldb, ldc},
                            a, b, c);
            });
}

void gemm_bf16(Transpose ta, Transpose tb, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A,
               int64_t lda, const uint16_t* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  if (trivial_product(M, N, K, accumulate, C, ldc)) return;
  // Every row count gets a primitive: oneDNN has no public bf16 GEMM routine, and the few
  // row counts below kGemmPrimitiveMinRows (a linear layer while decoding) are each cached.
  in_pieces(ta, tb, M, N, K, A, lda, B, ldb, accumulate, C, ldc,
            [&](int64_t m, int64_t n, int64_t k, const uint16_t* a, const uint16_t* b, bool acc, float* c) {
              run_primitive(Signature{ta, tb, GemmInput::bf16, acc, omp_get_max_threads(),
                                      std::bit_cast<uint32_t>(alpha), m, n, k, lda, ldb, ldc},
                            a, b, c);
            });
}

bool gemm_bf16_supported() {
  // Asked once: whether oneDNN implements a bf16 matmul on this CPU at all. oneDNN 2.6
  // has one from avx512_core up (native with avx512_core_bf16 or AMX, emulated on plain
  // avx512_core); on an AVX2-only CPU creating one fails with "unimplemented".
  static const bool supported = [] {
    try {
      const dnnl::engine eng(dnnl::engine::kind::cpu, 0);
      const dnnl::memory::desc a({16, 16}, dnnl::memory::data_type::bf16, dnnl::memory::format_tag::ab);
      const dnnl::memory::desc c({16, 16}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::ab);
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, a, c), eng);
      return true;
    } catch (const dnnl::error&) {
      return false;
    }
  }();
  return supported;
}

FLOTILLA_KERNEL void convert_to_bf16(const float* in, int64_t n, uint16_t* out) {
  // in (n) -> out (n), round to nearest even (tensor/dtype.hpp's f32_to_bf16).
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(in[i]);
}

GemmEngineInfo gemm_engine_info() {
  const dnnl_version_t* v = dnnl_version();
  GemmEngineInfo info;
  const char* runtime = v->cpu_runtime == DNNL_RUNTIME_OMP ? "OpenMP" : "not OpenMP";
  info.library = fmt::format("oneDNN {}.{}.{} (CPU runtime: {})", v->major, v->minor, v->patch, runtime);
  // "cpu_isa_avx512_core_bf16" -> "avx512_core_bf16"
  std::string isa = dnnl_cpu_isa2str(static_cast<dnnl_cpu_isa_t>(dnnl::get_effective_cpu_isa()));
  constexpr std::string_view kPrefix = "cpu_isa_";
  if (isa.starts_with(kPrefix)) isa.erase(0, kPrefix.size());
  info.isa = isa;
  info.cached_primitives = engine().size();
  return info;
}

void gemm_clear_cache() {
  engine().clear();
  cache_generation.fetch_add(1, std::memory_order_acq_rel);
}

}  // namespace flotilla::kernels
