#include "flotilla/comm/compression/wire_sum.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "flotilla/base/error.hpp"
#include "flotilla/tensor/dtype.hpp"

namespace flotilla::comm::detail {

uint16_t encode_half(WireDtype dtype, float x) { return dtype == WireDtype::fp16 ? f32_to_f16(x) : f32_to_bf16(x); }
float decode_half(WireDtype dtype, uint16_t h) { return dtype == WireDtype::fp16 ? f16_to_f32(h) : bf16_to_f32(h); }

float int8_scale(const float* x, int64_t count) {
  float max_abs = 0.0f;
  for (int64_t i = 0; i < count; ++i) max_abs = std::max(max_abs, std::fabs(x[i]));
  // A NaN or infinity makes the scale non-finite, and every value of the run decodes to
  // NaN: a broken gradient stays visible instead of turning into numbers.
  for (int64_t i = 0; i < count; ++i)
    if (!std::isfinite(x[i])) return std::numeric_limits<float>::quiet_NaN();
  return max_abs / 127.0f;
}

int8_t encode_int8(float x, float scale) {
  if (!(scale > 0.0f) || !std::isfinite(scale)) return 0;
  const float q = std::nearbyint(x / scale);
  return static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f));
}

float encode_int8_run(const float* x, int64_t count, int8_t* q, float* rounding) {
  const float scale = int8_scale(x, count);
  for (int64_t i = 0; i < count; ++i) {
    q[i] = encode_int8(x[i], scale);
    if (rounding) rounding[i] = x[i] - decode_int8(q[i], scale);
  }
  return scale;
}

WireSum::WireSum(WireDtype dtype) : dtype_(dtype) {
  if (dtype == WireDtype::f32) throw Error("comm/compression", "a wire sum needs fp16, bf16 or int8");
}

size_t WireSum::encoded_bytes(size_t values) const {
  if (dtype_ != WireDtype::int8) return 2 * values;
  return values + sizeof(float) * (values / static_cast<size_t>(kInt8Run));  // values: whole runs
}

void WireSum::encode(const float* x, size_t count, uint8_t* out, float* rounding) const {
  if (dtype_ != WireDtype::int8) {
    for (size_t i = 0; i < count; ++i) {
      const uint16_t h = encode_half(dtype_, x[i] * scale_);
      std::memcpy(out + 2 * i, &h, 2);
      if (rounding) rounding[i] = x[i] - decode_half(dtype_, h) / scale_;
    }
    return;
  }
  const size_t runs = count / static_cast<size_t>(kInt8Run);
  auto* values = reinterpret_cast<int8_t*>(out + sizeof(float) * runs);
  for (size_t r = 0; r < runs; ++r) {
    const size_t at = r * kInt8Run;
    const float s = encode_int8_run(x + at, kInt8Run, values + at, rounding ? rounding + at : nullptr);
    std::memcpy(out + sizeof(float) * r, &s, sizeof(float));
  }
}

void WireSum::decode(const uint8_t* in, size_t count, float* out, bool add) const {
  if (dtype_ != WireDtype::int8) {
    for (size_t i = 0; i < count; ++i) {
      uint16_t h;
      std::memcpy(&h, in + 2 * i, 2);
      const float v = decode_half(dtype_, h) / scale_;
      out[i] = add ? out[i] + v : v;
    }
    return;
  }
  const size_t runs = count / static_cast<size_t>(kInt8Run);
  const auto* values = reinterpret_cast<const int8_t*>(in + sizeof(float) * runs);
  for (size_t r = 0; r < runs; ++r) {
    float s;
    std::memcpy(&s, in + sizeof(float) * r, sizeof(float));
    for (size_t i = r * kInt8Run; i < (r + 1) * kInt8Run; ++i) {
      const float v = decode_int8(values[i], s);
      out[i] = add ? out[i] + v : v;
    }
  }
}

size_t WireSum::chunk_size(size_t n, int N) const {
  size_t chunk = (n + static_cast<size_t>(N) - 1) / static_cast<size_t>(N);
  if (dtype_ == WireDtype::int8) chunk = (chunk + kInt8Run - 1) / kInt8Run * kInt8Run;  // whole runs
  return chunk;
}

int64_t WireSum::reduce_scatter_into_sum(std::span<const float> data, Communicator& comm, std::span<float> rounding,
                                         std::string_view name) {
  const int N = comm.size();
  const size_t n = data.size();
  const size_t chunk = chunk_size(n, N);
  const size_t padded = chunk * static_cast<size_t>(N);
  const size_t chunk_bytes = encoded_bytes(chunk);
  int64_t bytes = 0;

  scale_ = 1.0f;
  if (dtype_ == WireDtype::fp16) {
    double max_abs = 0.0;
    for (float x : data) max_abs = std::max(max_abs, static_cast<double>(std::fabs(x)));
    comm.all_reduce(std::span<double>(&max_abs, 1), ReduceOp::max, Options{.name = "fp16 scale"});
    bytes += ring_all_reduce_bytes(sizeof(double), N);
    if (max_abs > 0.0) scale_ = static_cast<float>((32768.0 / N) / max_abs);
  }

  padded_.assign(padded, 0.0f);
  std::copy(data.begin(), data.end(), padded_.begin());
  sum_.resize(padded);  // the rounding of the padded values, then the chunk's sum
  send_.resize(chunk_bytes * static_cast<size_t>(N));
  for (int r = 0; r < N; ++r)
    encode(padded_.data() + static_cast<size_t>(r) * chunk, chunk, send_.data() + static_cast<size_t>(r) * chunk_bytes,
           rounding.empty() ? nullptr : sum_.data() + static_cast<size_t>(r) * chunk);
  if (!rounding.empty()) std::copy(sum_.begin(), sum_.begin() + static_cast<std::ptrdiff_t>(n), rounding.begin());
  recv_.resize(send_.size());
  comm.all_to_all(std::span<uint8_t>(send_), std::span<uint8_t>(recv_), Options{.name = name});
  bytes += ring_all_to_all_bytes(static_cast<int64_t>(send_.size()), N);

  // recv_ holds chunk `rank` of every rank: added in float32, in rank order.
  for (int r = 0; r < N; ++r) decode(recv_.data() + static_cast<size_t>(r) * chunk_bytes, chunk, sum_.data(), r > 0);
  return bytes;
}

int64_t WireSum::reduce_scatter(std::span<const float> data, Communicator& comm, std::span<float> mine,
                                std::span<float> rounding, std::string_view name) {
  const size_t chunk = chunk_size(data.size(), comm.size());
  if (mine.size() != chunk)
    throw Error("comm/compression", fmt::format("{}: a reduce-scatter of {} values over {} ranks gives chunks of {}, "
                                                "not {}",
                                                name, data.size(), comm.size(), chunk, mine.size()));
  const int64_t bytes = reduce_scatter_into_sum(data, comm, rounding, name);
  std::copy_n(sum_.begin(), chunk, mine.begin());
  return bytes;
}

int64_t WireSum::run(std::span<float> data, Communicator& comm, std::span<float> rounding, std::string_view name) {
  const int N = comm.size();
  const size_t n = data.size();
  const size_t chunk = chunk_size(n, N);
  const size_t chunk_bytes = encoded_bytes(chunk);
  int64_t bytes = reduce_scatter_into_sum(data, comm, rounding, name);
  // Each rank's summed chunk, encoded once more, goes to all.
  summed_.resize(chunk_bytes);
  encode(sum_.data(), chunk, summed_.data(), nullptr);
  comm.all_gather(std::span<uint8_t>(summed_), std::span<uint8_t>(send_), Options{.name = name});
  bytes += ring_all_gather_bytes(static_cast<int64_t>(chunk_bytes), N);
  for (int r = 0; r < N; ++r)
    decode(send_.data() + static_cast<size_t>(r) * chunk_bytes, chunk, padded_.data() + static_cast<size_t>(r) * chunk,
           false);
  std::copy(padded_.begin(), padded_.begin() + static_cast<std::ptrdiff_t>(n), data.begin());
  return bytes;
}

}  // namespace flotilla::comm::detail
