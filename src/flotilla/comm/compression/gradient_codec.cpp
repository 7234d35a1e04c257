#include "flotilla/comm/compression/gradient_codec.hpp"

#include <array>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/compression/codecs.hpp"

namespace flotilla::comm {

std::string_view compression_name(Compression c) {
  switch (c) {
    case Compression::none: return "none";
    case Compression::fp16: return "fp16";
    case Compression::bf16: return "bf16";
    case Compression::topk: return "topk";
    case Compression::powersgd: return "powersgd";
  }
  return "?";
}

Compression parse_compression(std::string_view name) {
  for (Compression c : {Compression::none, Compression::fp16, Compression::bf16, Compression::topk,
                        Compression::powersgd})
    if (compression_name(c) == name) return c;
  throw InputError("comm/compression",
                   fmt::format("unknown gradient compression '{}' (none, fp16, bf16, topk, powersgd)", name));
}

std::string_view wire_dtype_name(WireDtype d) {
  switch (d) {
    case WireDtype::f32: return "f32";
    case WireDtype::bf16: return "bf16";
    case WireDtype::fp16: return "fp16";
    case WireDtype::int8: return "int8";
  }
  return "?";
}

WireDtype parse_wire_dtype(std::string_view name) {
  for (WireDtype d : {WireDtype::f32, WireDtype::bf16, WireDtype::fp16, WireDtype::int8})
    if (wire_dtype_name(d) == name) return d;
  throw InputError("comm/compression", fmt::format("unknown compression dtype '{}' (f32, bf16, fp16, int8)", name));
}

void GradientCodec::check_size(size_t given, size_t expected) {
  if (given != expected)
    throw Error("comm/compression", fmt::format("codec made for {} gradient elements was given {}", expected, given));
}

void GradientCodec::count_all_reduce(int64_t bytes, int world) { bytes_sent_ += ring_all_reduce_bytes(bytes, world); }
void GradientCodec::count_all_gather(int64_t bytes_per_rank, int world) {
  bytes_sent_ += ring_all_gather_bytes(bytes_per_rank, world);
}
void GradientCodec::sum_floats(std::span<float> data, Communicator& comm, std::string_view name) {
  if (exact_ != nullptr) exact_->run(data, ReduceOp::sum, Options{.name = name});
  else comm.all_reduce(data, ReduceOp::sum, Options{.name = name});
}

void GradientCodec::count_bytes(int64_t bytes) { bytes_sent_ += bytes; }
void GradientCodec::count_all_to_all(int64_t total_bytes, int world) {
  bytes_sent_ += ring_all_to_all_bytes(total_bytes, world);
}

std::vector<float> GradientCodec::words_to_floats(std::span<const uint64_t> words) {
  std::vector<float> out;
  for (uint64_t w : words)
    for (int piece = 0; piece < 4; ++piece) out.push_back(static_cast<float>((w >> (16 * piece)) & 0xFFFF));
  return out;
}

void GradientCodec::floats_to_words(const std::vector<float>& values, std::span<uint64_t> words) {
  for (size_t i = 0; i < words.size(); ++i) {
    uint64_t w = 0;
    for (int piece = 0; piece < 4; ++piece) {
      const float v = values[i * 4 + static_cast<size_t>(piece)];
      if (!(v >= 0.0f && v <= 65535.0f && v == static_cast<float>(static_cast<uint64_t>(v))))
        throw InputError("comm/compression", "a saved codec state holds a count that is not a 16-bit piece");
      w |= static_cast<uint64_t>(v) << (16 * piece);
    }
    words[i] = w;
  }
}

const std::vector<float>& GradientCodec::state_part(const std::vector<CodecState>& state, std::string_view name,
                                                    size_t size) {
  for (const CodecState& s : state)
    if (s.name == name) {
      if (s.values.size() != size)
        throw InputError("comm/compression", fmt::format("the saved compression state '{}' has {} values, this run's "
                                                         "{} (another --compression setting?)",
                                                         name, s.values.size(), size));
      return s.values;
    }
  throw InputError("comm/compression",
                   fmt::format("the saved compression state has no '{}' (another --compression setting?)", name));
}

std::vector<CodecState> GradientCodec::save_state() const {
  const std::array<uint64_t, 2> counts = {static_cast<uint64_t>(calls_), static_cast<uint64_t>(bytes_sent_)};
  return {CodecState{"counts", words_to_floats(counts)}};
}

void GradientCodec::load_state(const std::vector<CodecState>& state) {
  std::array<uint64_t, 2> counts{};
  floats_to_words(state_part(state, "counts", 8), counts);
  calls_ = static_cast<int64_t>(counts[0]);
  bytes_sent_ = static_cast<int64_t>(counts[1]);
}

namespace {

// The baseline: one float32 all-reduce.
class PlainCodec final : public GradientCodec {
 public:
  PlainCodec() : GradientCodec(Compression::none) {}
  void all_reduce_sum(std::span<float> gradient, Communicator& comm) override {
    sum_floats(gradient, comm, "gradients");
    count_all_reduce(static_cast<int64_t>(gradient.size_bytes()), comm.size());
    ++calls_;
  }
};

// The first `warmup` calls dense, through `dense` (float32, or the compression dtype when
// it is narrower: halves are nearly exact at half the bytes), the rest through `inner`. What the dense
// codec still owes at the switch (its rounding) joins the first compressed gradient.
class WarmupCodec final : public GradientCodec {
 public:
  WarmupCodec(std::unique_ptr<GradientCodec> dense, std::unique_ptr<GradientCodec> inner, int64_t warmup)
      : GradientCodec(inner->kind()), dense_(std::move(dense)), inner_(std::move(inner)), warmup_(warmup) {}
  void all_reduce_sum(std::span<float> gradient, Communicator& comm) override {
    GradientCodec& codec = calls_ < warmup_ ? *dense_ : *inner_;
    if (calls_ == warmup_) {
      const std::span<const float> owed = dense_->residual();
      for (size_t i = 0; i < owed.size(); ++i) gradient[i] += owed[i];
    }
    const int64_t before = codec.bytes_sent();
    codec.all_reduce_sum(gradient, comm);
    count_bytes(codec.bytes_sent() - before);
    ++calls_;
  }
  std::span<const float> residual() const override {
    return calls_ <= warmup_ ? dense_->residual() : inner_->residual();
  }
  void set_exact_reducer(AllReducer* reducer) override {
    exact_ = reducer;
    dense_->set_exact_reducer(reducer);
    inner_->set_exact_reducer(reducer);
  }
  std::vector<CodecState> save_state() const override {
    std::vector<CodecState> state = GradientCodec::save_state();
    for (const auto& [prefix, codec] : {std::pair{"dense.", dense_.get()}, std::pair{"inner.", inner_.get()}})
      for (CodecState& s : codec->save_state()) state.push_back({prefix + s.name, std::move(s.values)});
    return state;
  }
  void load_state(const std::vector<CodecState>& state) override {
    GradientCodec::load_state(state);
    for (const auto& [prefix, codec] : {std::pair{"dense.", dense_.get()}, std::pair{"inner.", inner_.get()}}) {
      std::vector<CodecState> part;
      for (const CodecState& s : state)
        if (s.name.starts_with(prefix)) part.push_back({s.name.substr(std::string_view(prefix).size()), s.values});
      codec->load_state(part);
    }
  }

 private:
  std::unique_ptr<GradientCodec> dense_, inner_;
  int64_t warmup_;
};

std::unique_ptr<GradientCodec> make_codec(const CompressionConfig& config, int64_t n,
                                          std::vector<MatrixShape> matrices);

}  // namespace

std::unique_ptr<GradientCodec> make_gradient_codec(const CompressionConfig& config, int64_t n,
                                                   std::vector<MatrixShape> matrices) {
  if (config.warmup_steps < 0)
    throw InputError("comm/compression", fmt::format("compression warm-up must be >= 0 steps, not {}", config.warmup_steps));
  if (config.dtype != WireDtype::f32 && config.kind != Compression::topk && config.kind != Compression::powersgd)
    throw InputError("comm/compression",
                     fmt::format("a compression dtype ({}) applies to top-k and PowerSGD only, not to '{}'",
                                 wire_dtype_name(config.dtype), compression_name(config.kind)));
  std::unique_ptr<GradientCodec> codec = make_codec(config, n, std::move(matrices));
  if (config.kind == Compression::none || config.warmup_steps == 0) return codec;
  std::unique_ptr<GradientCodec> dense =
      config.dtype == WireDtype::f32
          ? std::make_unique<PlainCodec>()
          : detail::make_dense_codec(config.kind, config.dtype, n);
  return std::make_unique<WarmupCodec>(std::move(dense), std::move(codec), config.warmup_steps);
}

namespace {

std::unique_ptr<GradientCodec> make_codec(const CompressionConfig& config, int64_t n,
                                          std::vector<MatrixShape> matrices) {
  switch (config.kind) {
    case Compression::none: return std::make_unique<PlainCodec>();
    case Compression::fp16:
    case Compression::bf16:
      return detail::make_dense_codec(config.kind, config.kind == Compression::fp16 ? WireDtype::fp16 : WireDtype::bf16, n);
    case Compression::topk:
      if (!(config.topk_density > 0.0 && config.topk_density <= 1.0))
        throw InputError("comm/compression",
                         fmt::format("top-k density must be in (0, 1], not {}", config.topk_density));
      return detail::make_topk_codec(n, config.topk_density, matrices, config.dtype);
    case Compression::powersgd:
      if (config.powersgd_rank < 1)
        throw InputError("comm/compression", fmt::format("PowerSGD rank must be >= 1, not {}", config.powersgd_rank));
      return detail::make_powersgd_codec(n, std::move(matrices), config.powersgd_rank, config.seed, config.dtype);
  }
  throw Error("comm/compression", "unknown compression");
}

}  // namespace

std::vector<CodecState> ErrorFeedbackCodec::save_state() const {
  std::vector<CodecState> state = GradientCodec::save_state();
  state.push_back({"residual", residual_});
  return state;
}

void ErrorFeedbackCodec::load_state(const std::vector<CodecState>& state) {
  GradientCodec::load_state(state);
  residual_ = state_part(state, "residual", residual_.size());
}

}  // namespace flotilla::comm
