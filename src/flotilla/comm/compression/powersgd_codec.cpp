// PowerSGD (Vogels, Karimireddy and Jaggi, NeurIPS 2019): each matrix M (rows x cols) of the
// gradient travels as two thin factors, P (rows x r) and Q (cols x r), found by one step of
// power iteration that starts from the previous step's Q (a warm start, which makes one
// step enough). With every rank's M_i and their sum S = sum_i M_i:
//   P   = sum_i M_i Q          one all-reduce of every matrix's P at once: P = S Q
//   P  := orthonormal columns of P (Gram-Schmidt, the same on every rank)
//   Q   = sum_i M_i^T P        one all-reduce of every Q at once: Q = S^T P
//   S  ~= P Q^T                the projection of S onto span(P)
// Both steps are linear in M_i, which is why summing the factors sums the matrices.
// Error feedback: this rank keeps M_i - (P Q^T) / N, so what the rank-r estimate misses
// on average is added back next step. Vectors (norms, biases) and matrices too small to
// gain (r (rows + cols) >= rows x cols) go in a third, plain all-reduce.
//
// With `--compression-dtype bf16|fp16|int8` all three sums carry the narrow type
// (wire_sum.hpp): half the bytes with halves, about a quarter with int8, so two or nearly
// four times the rank for the same traffic. Every rank decodes the same values, so P, Q
// and the estimate stay identical across ranks, and the residual is taken against that
// decoded estimate: what rounding lost is fed back like what the rank-r cut lost. The
// uncompressed part keeps its own rounding, as the fp16/bf16 codecs do.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/comm/compression/codecs.hpp"
#include "flotilla/comm/compression/wire_sum.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::comm::detail {
namespace {

struct Factorised {
  MatrixShape m;
  int64_t r = 0;
  int64_t p_offset = 0;  // into p_ (rows x r)
  int64_t q_offset = 0;  // into qt_ (r x cols): Q stored transposed
};

// Orthonormal columns of p (rows x r, row-major) by Gram-Schmidt, projecting twice
// ("twice is enough", Giraud et al. 2005): one pass leaves a nearly dependent column far
// from orthogonal in float. A column that (nearly) vanishes once projected, i.e. the
// gradient has rank below r, is set to zero, not blown up from rounding noise into a
// direction that would add garbage to the estimate.
void orthonormalise_columns(float* p, int64_t rows, int64_t r) {
  const auto norm_of = [&](int64_t c) {
    double sq = 0.0;
    for (int64_t i = 0; i < rows; ++i) sq += static_cast<double>(p[i * r + c]) * p[i * r + c];
    return std::sqrt(sq);
  };
  for (int64_t c = 0; c < r; ++c) {
    const double before = norm_of(c);
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t prev = 0; prev < c; ++prev) {
        double dot = 0.0;
        for (int64_t i = 0; i < rows; ++i) dot += static_cast<double>(p[i * r + c]) * p[i * r + prev];
        for (int64_t i = 0; i < rows; ++i) p[i * r + c] -= static_cast<float>(dot) * p[i * r + prev];
      }
    }
    const double after = norm_of(c);
    const float inv = after > 1e-4 * before && after > 1e-30 ? static_cast<float>(1.0 / after) : 0.0f;
    for (int64_t i = 0; i < rows; ++i) p[i * r + c] *= inv;
  }
}

class PowerSgdCodec final : public ErrorFeedbackCodec {
 public:
  PowerSgdCodec(int64_t n, const std::vector<MatrixShape>& matrices, int rank, uint64_t seed, WireDtype dtype)
      : ErrorFeedbackCodec(Compression::powersgd, n), rng_(seed ^ 0x9E3779B97F4A7C15ull) {  // the residual: this rank's M, carried over
    if (dtype != WireDtype::f32) narrow_.emplace(dtype);
    std::vector<bool> in_matrix(static_cast<size_t>(n), false);
    int64_t p_size = 0, q_size = 0;
    for (const MatrixShape& m : matrices) {
      if (m.offset < 0 || m.rows < 1 || m.cols < 1 || m.offset + m.rows * m.cols > n)
        throw Error("comm/compression", fmt::format("PowerSGD: matrix at {} ({} x {}) is outside the {} gradient "
                                                    "elements", m.offset, m.rows, m.cols, n));
      const int64_t r = std::min<int64_t>({rank, m.rows, m.cols});
      if (r * (m.rows + m.cols) >= m.rows * m.cols) continue;  // nothing to gain: stays plain
      factorised_.push_back({m, r, p_size, q_size});
      p_size += m.rows * r;
      q_size += r * m.cols;
      std::fill(in_matrix.begin() + m.offset, in_matrix.begin() + m.offset + m.rows * m.cols, true);
    }
    for (int64_t i = 0; i < n; ++i)
      if (!in_matrix[static_cast<size_t>(i)]) plain_index_.push_back(i);
    p_.resize(static_cast<size_t>(p_size));
    qt_.resize(static_cast<size_t>(q_size));
    plain_.resize(plain_index_.size());
    // The first Q: standard normal, the same on every rank (same seed).
    for (float& q : qt_) q = rng_.normal();
  }

  void all_reduce_sum(std::span<float> gradient, Communicator& comm) override {
    check_size(gradient.size(), residual_.size());
    const int N = comm.size();
    for (size_t i = 0; i < gradient.size(); ++i) residual_[i] += gradient[i];
    const float* M = residual_.data();
    normalise_q_columns();
    // P = M Q for every matrix: (rows, cols) @ (cols, r), i.e. M @ Qt^T.
    for (const Factorised& f : factorised_)
      kernels::matmul_forward(&p_[f.p_offset], M + f.m.offset, &qt_[f.q_offset], nullptr, f.m.rows, f.m.cols, f.r);
    sum(p_, comm, {}, "PowerSGD P");
    for (const Factorised& f : factorised_) orthonormalise_columns(&p_[f.p_offset], f.m.rows, f.r);
    // Q = M^T P, kept as Qt = P^T M: (r, cols).
    std::fill(qt_.begin(), qt_.end(), 0.0f);
    for (const Factorised& f : factorised_)
      kernels::matmul_backward(nullptr, &qt_[f.q_offset], nullptr, &p_[f.p_offset], M + f.m.offset, nullptr,
                               f.m.rows, f.m.cols, f.r);
    sum(qt_, comm, {}, "PowerSGD Q");
    restart_vanished_directions();
    // Vectors and small matrices, exactly.
    for (size_t j = 0; j < plain_index_.size(); ++j) plain_[j] = residual_[static_cast<size_t>(plain_index_[j])];
    plain_rounding_.assign(narrow_ ? plain_.size() : 0, 0.0f);
    sum(plain_, comm, plain_rounding_, "PowerSGD uncompressed");

    // gradient := P Qt (the estimate of the sum); residual keeps M - estimate / N.
    for (const Factorised& f : factorised_) {
      float* g = gradient.data() + f.m.offset;
      std::fill(g, g + f.m.rows * f.m.cols, 0.0f);
      kernels::matmul_backward(g, nullptr, nullptr, &p_[f.p_offset], nullptr, &qt_[f.q_offset], f.m.rows,
                               f.m.cols, f.r);
      float* e = residual_.data() + f.m.offset;
      const float inv_n = 1.0f / static_cast<float>(N);
      for (int64_t i = 0; i < f.m.rows * f.m.cols; ++i) e[i] -= g[i] * inv_n;
    }
    for (size_t j = 0; j < plain_index_.size(); ++j) {
      const auto i = static_cast<size_t>(plain_index_[j]);
      gradient[i] = plain_[j];
      residual_[i] = narrow_ ? plain_rounding_[j] : 0.0f;
    }
    ++calls_;
  }

  // Besides the residual: the warm start (Q), the generator that restarts vanished
  // directions, and what the narrow dtype dropped.
  std::vector<CodecState> save_state() const override {
    std::vector<CodecState> state = ErrorFeedbackCodec::save_state();
    state.push_back({"q", qt_});
    state.push_back({"plain_rounding", plain_rounding_});
    const Rng::State st = rng_.state();
    state.push_back({"rng", words_to_floats(st.s)});
    return state;
  }
  void load_state(const std::vector<CodecState>& state) override {
    ErrorFeedbackCodec::load_state(state);
    qt_ = state_part(state, "q", qt_.size());
    // Sized at the first narrow exchange: empty before it, the plain elements' after.
    const auto rounding = std::find_if(state.begin(), state.end(), [](const CodecState& s) { return s.name == "plain_rounding"; });
    plain_rounding_ = state_part(state, "plain_rounding", rounding == state.end() ? 0 : rounding->values.size());
    if (!plain_rounding_.empty() && plain_rounding_.size() != plain_.size())
      throw InputError("comm/compression", fmt::format("the saved compression state 'plain_rounding' has {} values, "
                                                       "this run's {}", plain_rounding_.size(), plain_.size()));
    Rng::State st{};
    floats_to_words(state_part(state, "rng", 16), st.s);
    rng_.set_state(st);
  }

 private:
  // Q's columns to unit length before P = M Q. Only span(P) matters (P is orthonormalised
  // next), so this changes nothing in exact arithmetic; but the warm start's Q = S^T P has
  // columns as long as the singular values, which would make P's columns differ by their
  // squares, and a narrow dtype whose scale is shared by a run of values (int8) would
  // round the short columns away. Every rank holds the same Q, so all scale alike.
  void normalise_q_columns() {
    for (float* q = qt_.data(); const Factorised& f : factorised_)
      for (int64_t c = 0; c < f.r; ++c, q += f.m.cols) {
        double sq = 0.0;
        for (int64_t j = 0; j < f.m.cols; ++j) sq += static_cast<double>(q[j]) * q[j];
        if (sq == 0.0) continue;
        const auto inv = static_cast<float>(1.0 / std::sqrt(sq));
        for (int64_t j = 0; j < f.m.cols; ++j) q[j] *= inv;
      }
  }

  // A column of Q that came out zero (a matrix whose gradient was zero, as LoRA's A is
  // while B is still zero) would keep P = M Q at zero for good: the warm start would
  // never see the gradient again. Such columns restart from fresh random values. Every
  // rank holds the same Q after the all-reduce and draws from the same generator, so the
  // ranks stay in step.
  void restart_vanished_directions() {
    for (const Factorised& f : factorised_) {
      for (int64_t c = 0; c < f.r; ++c) {
        float* q = &qt_[static_cast<size_t>(f.q_offset + c * f.m.cols)];
        double sq = 0.0;
        for (int64_t j = 0; j < f.m.cols; ++j) sq += static_cast<double>(q[j]) * q[j];
        if (sq > 1e-60) continue;
        for (int64_t j = 0; j < f.m.cols; ++j) q[j] = rng_.normal();
      }
    }
  }

  // data := its sum over ranks, in float32 or in the narrow dtype; `rounding` as WireSum::run.
  void sum(std::span<float> data, Communicator& comm, std::span<float> rounding, std::string_view name) {
    if (narrow_) {
      count_bytes(narrow_->run(data, comm, rounding, name));
    } else {
      sum_floats(data, comm, name);
      count_all_reduce(static_cast<int64_t>(data.size() * sizeof(float)), comm.size());
    }
  }

  Rng rng_;
  std::optional<WireSum> narrow_;         // set when factors travel in a narrow dtype
  std::vector<float> plain_rounding_;     // (plain) what the narrow dtype dropped of this rank's part
  std::vector<Factorised> factorised_;
  std::vector<int64_t> plain_index_;      // elements sent uncompressed
  std::vector<float> p_, qt_, plain_;
};

}  // namespace

std::unique_ptr<GradientCodec> make_powersgd_codec(int64_t n, std::vector<MatrixShape> matrices, int rank,
                                                   uint64_t seed, WireDtype dtype) {
  return std::make_unique<PowerSgdCodec>(n, matrices, rank, seed, dtype);
}

}  // namespace flotilla::comm::detail
