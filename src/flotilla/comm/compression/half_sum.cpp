#include "flotilla/comm/compression/half_sum.hpp"

#include <algorithm>
#include <cmath>

#include "flotilla/base/error.hpp"
#include "flotilla/tensor/dtype.hpp"

namespace flotilla::comm::detail {

uint16_t encode_half(WireDtype dtype, float x) { return dtype == WireDtype::fp16 ? f32_to_f16(x) : f32_to_bf16(x); }
float decode_half(WireDtype dtype, uint16_t h) { return dtype == WireDtype::fp16 ? f16_to_f32(h) : bf16_to_f32(h); }

HalfSum::HalfSum(WireDtype dtype) : dtype_(dtype) {
  if (dtype == WireDtype::f32) throw Error("comm/compression", "a half sum needs fp16 or bf16");
}

uint16_t HalfSum::encode(float x) const { return encode_half(dtype_, x); }
float HalfSum::decode(uint16_t h) const { return decode_half(dtype_, h); }

int64_t HalfSum::run(std::span<float> data, Communicator& comm, std::span<float> rounding, std::string_view name) {
  const int N = comm.size();
  const size_t n = data.size();
  const size_t chunk = (n + static_cast<size_t>(N) - 1) / static_cast<size_t>(N);
  const size_t padded = chunk * static_cast<size_t>(N);
  int64_t bytes = 0;

  float scale = 1.0f;
  if (dtype_ == WireDtype::fp16) {
    double max_abs = 0.0;
    for (float x : data) max_abs = std::max(max_abs, static_cast<double>(std::fabs(x)));
    comm.all_reduce(std::span<double>(&max_abs, 1), ReduceOp::max, Options{.name = "fp16 scale"});
    bytes += ring_all_reduce_bytes(sizeof(double), N);
    if (max_abs > 0.0) scale = static_cast<float>((32768.0 / N) / max_abs);
  }

  send_.assign(padded, 0);
  for (size_t i = 0; i < n; ++i) {
    send_[i] = encode(data[i] * scale);
    if (!rounding.empty()) rounding[i] = data[i] - decode(send_[i]) / scale;
  }
  recv_.resize(padded);
  const auto as_bytes = [](std::vector<uint16_t>& v) {
    return std::span<uint8_t>(reinterpret_cast<uint8_t*>(v.data()), v.size() * 2);
  };
  comm.all_to_all(as_bytes(send_), as_bytes(recv_), Options{.name = name});
  bytes += ring_all_to_all_bytes(static_cast<int64_t>(padded * 2), N);

  // recv_ holds chunk `rank` of every rank: add them in float32, round once.
  summed_.resize(chunk);
  for (size_t i = 0; i < chunk; ++i) {
    float s = 0.0f;
    for (int r = 0; r < N; ++r) s += decode(recv_[static_cast<size_t>(r) * chunk + i]);
    summed_[i] = encode(s);
  }
  comm.all_gather(as_bytes(summed_), as_bytes(send_), Options{.name = name});
  bytes += ring_all_gather_bytes(static_cast<int64_t>(chunk * 2), N);
  for (size_t i = 0; i < n; ++i) data[i] = decode(send_[i]) / scale;
  return bytes;
}

}  // namespace flotilla::comm::detail
