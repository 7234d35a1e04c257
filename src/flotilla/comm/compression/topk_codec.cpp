// Top-k sparsification: each rank sends only the elements of largest magnitude:
// ceil(density x size) of every *group* (layer-wise selection, as Deep Gradient Compression
// does; one global selection starves the tensors whose gradients are small by nature, such
// as norms or LoRA's A while B is small). Everything else stays in the residual and joins
// the next step's gradient (error feedback), so small but persistent gradients still get
// through, only later (Stich et al. 2018; Lin et al. 2018, "Deep Gradient Compression").
//
// Wire formats, by `--compression-dtype`:
//   - f32: an *entry* is (uint32 index, float value), 8 bytes; a group is a tensor;
//   - bf16 / fp16 / int8: a group is a *block* of at most 2^16 consecutive elements of a
//     tensor, and its entries travel in the cheaper of two layouts: with 16-bit offsets in
//     the block, or with a bitmap of the block (1 bit an element), which costs less from a
//     density of about 1/16 up. Halves: k words of (offset << 16 | half value), 4 bytes an
//     entry; or the bitmap followed by the k halves in the bitmap's order, two to a word
//     (at density 0.4: 2.6 bytes an entry). int8: the offsets two to a word or the bitmap,
//     then the k values in ascending offset, four to a word, then a float scale for each
//     run of 64 values (wire_sum.hpp's int8; at density 0.8: about 1.22 bytes an entry).
//     Every rank knows the blocks, their k and their layout, so a payload needs no other
//     header. fp16 values are scaled by a power of two into range (one float word leads
//     the payload). The residual keeps value - decode(encode(value)), the rounding, so
//     error feedback stays exact with respect to what was actually sent.
//
// Ranks pick different indices, so entries cannot be added on the way: an all_gather
// brings every rank's k entries to every rank, which scatters and adds them into a dense
// buffer. Per rank that sends (N-1) x 8k bytes in f32 (about (N-1) x (n/8 + 2k) with halves
// and bitmaps, (N-1) x (n/8 + 1.06k) with int8), against 2(N-1)/N x 4n for a float
// all-reduce: 1 / (density x N) times fewer in f32; at 2 ranks, halves at density 0.43 and
// int8 at density 0.8 still send 4x fewer.
#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/compression/codecs.hpp"
#include "flotilla/comm/compression/wire_sum.hpp"

namespace flotilla::comm::detail {
namespace {

constexpr int64_t kBlock = int64_t{1} << 16;  // elements a 16-bit offset reaches

int64_t k_of(double density, int64_t size) {
  return std::clamp<int64_t>(static_cast<int64_t>(std::ceil(density * static_cast<double>(size))), 1, size);
}

class TopKCodec final : public ErrorFeedbackCodec {
 public:
  TopKCodec(int64_t n, double density, const std::vector<MatrixShape>& tensors, WireDtype dtype)
      : ErrorFeedbackCodec(Compression::topk, n), dtype_(dtype) {  // the residual: gradient not yet sent
    // Groups: the tensors (or their blocks), or the whole gradient when none are given.
    // Elements outside every tensor (alignment padding) are never sent.
    std::vector<MatrixShape> parts = tensors;
    if (tensors.empty() && n > 0) parts.push_back({0, 1, n});
    for (const MatrixShape& t : parts) {
      const int64_t size = t.rows * t.cols;
      if (t.offset < 0 || size < 1 || t.offset + size > n)
        throw Error("comm/compression", fmt::format("top-k: tensor at {} of {} elements is outside the {} gradient "
                                                    "elements", t.offset, size, n));
      const int64_t step = dtype_ == WireDtype::f32 ? size : kBlock;
      for (int64_t at = 0; at < size; at += step) {
        const int64_t len = std::min(step, size - at);
        Group g{t.offset + at, len, k_of(density, len)};
        // The cheaper of the two layouts (see the top of this file).
        int64_t by_offsets = g.k, by_bitmap = bitmap_words(g) + (g.k + 1) / 2;  // halves
        if (dtype_ == WireDtype::int8) {
          const int64_t values = (g.k + 3) / 4 + (g.k + kInt8Run - 1) / kInt8Run;
          by_offsets = (g.k + 1) / 2 + values;
          by_bitmap = bitmap_words(g) + values;
        }
        g.bitmap = by_bitmap < by_offsets;
        g.words = g.bitmap ? by_bitmap : by_offsets;
        groups_.push_back(g);
      }
    }
    for (const Group& g : groups_) {
      k_ += g.k;
      words_ += g.words;
    }
  }

  void all_reduce_sum(std::span<float> gradient, Communicator& comm) override {
    check_size(gradient.size(), residual_.size());
    for (size_t i = 0; i < gradient.size(); ++i) residual_[i] += gradient[i];
    select();
    if (dtype_ == WireDtype::f32) exchange_pairs(gradient, comm);
    else exchange_compact(gradient, comm);
    ++calls_;
  }


 private:
  struct Group {
    int64_t offset, size, k;  // where it starts, its elements, how many are sent
    bool bitmap = false;      // narrow dtypes: entries marked in a bitmap, else by 16-bit offsets
    int64_t words = 0;        // narrow dtypes: 32-bit words of its entries in the payload
  };

  // chosen_ := every group's k largest |residual|, group after group.
  void select() {
    chosen_.resize(static_cast<size_t>(k_));
    size_t j = 0;
    for (const Group& g : groups_) {
      // nth_element puts the k largest first, in no particular order.
      order_.resize(static_cast<size_t>(g.size));
      std::iota(order_.begin(), order_.end(), static_cast<uint32_t>(g.offset));
      std::nth_element(order_.begin(), order_.begin() + g.k - 1, order_.end(),
                       [&](uint32_t a, uint32_t b) { return std::fabs(residual_[a]) > std::fabs(residual_[b]); });
      std::copy(order_.begin(), order_.begin() + g.k, chosen_.begin() + static_cast<std::ptrdiff_t>(j));
      j += static_cast<size_t>(g.k);
    }
  }

  // (uint32 index, float bits) pairs.
  void exchange_pairs(std::span<float> gradient, Communicator& comm) {
    const size_t k = static_cast<size_t>(k_);
    mine_.resize(2 * k);
    for (size_t j = 0; j < k; ++j) {
      const uint32_t i = chosen_[j];
      mine_[2 * j] = i;
      std::memcpy(&mine_[2 * j + 1], &residual_[i], sizeof(float));
      residual_[i] = 0.0f;  // sent: no longer owed
    }
    const int N = comm.size();
    all_.resize(mine_.size() * static_cast<size_t>(N));
    comm.all_gather(mine_, all_, Options{.name = "top-k pairs"});
    count_all_gather(static_cast<int64_t>(mine_.size() * sizeof(uint32_t)), N);
    std::fill(gradient.begin(), gradient.end(), 0.0f);
    for (size_t p = 0; p < k * static_cast<size_t>(N); ++p) {
      float v;
      std::memcpy(&v, &all_[2 * p + 1], sizeof(float));
      gradient[all_[2 * p]] += v;
    }
  }

  // The payload: (fp16 only) one word with the float scale, then every block's entries in
  // its format (see the top of this file).
  void exchange_compact(std::span<float> gradient, Communicator& comm) {
    const size_t header = dtype_ == WireDtype::fp16 ? 1 : 0;
    float scale = 1.0f;
    if (dtype_ == WireDtype::fp16) {
      // A power of two, so that dividing by it is exact: the largest value lands in
      // [2^14, 2^15), below fp16's 65504.
      float max_abs = 0.0f;
      for (uint32_t i : chosen_) max_abs = std::max(max_abs, std::fabs(residual_[i]));
      if (max_abs > 0.0f && std::isfinite(max_abs)) {
        int e = 0;
        std::frexp(max_abs, &e);  // max_abs < 2^e
        scale = std::ldexp(1.0f, 15 - e);
      }
    }
    mine_.assign(header + static_cast<size_t>(words_), 0u);
    if (header) std::memcpy(&mine_[0], &scale, sizeof(float));
    // Encodes residual_[i] and keeps what the rounding lost: still owed.
    const auto send = [&](uint32_t i) {
      const uint16_t h = encode_half(dtype_, residual_[i] * scale);
      residual_[i] -= decode_half(dtype_, h) / scale;
      return h;
    };
    uint32_t* out = mine_.data() + header;
    auto chosen = chosen_.begin();
    for (const Group& g : groups_) {
      const auto end = chosen + g.k;
      if (dtype_ == WireDtype::int8) {
        std::sort(chosen, end);  // values travel in ascending offset
        write_int8(g, std::span<const uint32_t>(&*chosen, static_cast<size_t>(g.k)), out);
      } else if (g.bitmap) {
        std::sort(chosen, end);  // values travel in the bitmap's order
        uint32_t* values = out + bitmap_words(g);
        for (auto c = chosen; c != end; ++c) {
          const int64_t offset = *c - g.offset, s = c - chosen;
          out[offset / 32] |= 1u << (offset % 32);
          values[s / 2] |= static_cast<uint32_t>(send(*c)) << (16 * (s % 2));
        }
      } else {
        for (auto c = chosen; c != end; ++c)
          out[c - chosen] = static_cast<uint32_t>(*c - g.offset) << 16 | send(*c);
      }
      out += g.words;
      chosen = end;
    }
    const int N = comm.size();
    all_.resize(mine_.size() * static_cast<size_t>(N));
    comm.all_gather(mine_, all_, Options{.name = "top-k entries"});
    count_all_gather(static_cast<int64_t>(mine_.size() * sizeof(uint32_t)), N);
    std::fill(gradient.begin(), gradient.end(), 0.0f);
    for (int r = 0; r < N; ++r) {
      const uint32_t* in = &all_[static_cast<size_t>(r) * mine_.size()];
      float their_scale = 1.0f;
      if (header) std::memcpy(&their_scale, &in[0], sizeof(float));
      in += header;
      const auto value = [&](uint16_t h) { return decode_half(dtype_, h) / their_scale; };
      for (const Group& g : groups_) {
        float* block = gradient.data() + g.offset;
        if (dtype_ == WireDtype::int8) {
          read_int8(g, in, block, r);
        } else if (g.bitmap) {
          const uint32_t* values = in + bitmap_words(g);
          for_each_marked(g, in, r, [&](int64_t offset, int64_t s) {
            block[offset] += value(static_cast<uint16_t>(values[s / 2] >> (16 * (s % 2))));
          });
        } else {
          for (int64_t s = 0; s < g.k; ++s)
            block[checked_offset(g, in[s] >> 16, r)] += value(static_cast<uint16_t>(in[s] & 0xffffu));
        }
        in += g.words;
      }
    }
  }

  // One group's entries in int8 (`entries` ascending): the bitmap or the offsets two to a
  // word, then the k values as bytes (four to a word), then a float scale per run of
  // kInt8Run values (wire_sum.hpp's runs). What the rounding lost stays in the residual.
  void write_int8(const Group& g, std::span<const uint32_t> entries, uint32_t* out) {
    const int64_t k = g.k;
    uint32_t* values = out + (g.bitmap ? bitmap_words(g) : (k + 1) / 2);
    uint32_t* scales = values + (k + 3) / 4;
    for (int64_t s = 0; s < k; ++s) {
      const uint32_t offset = entries[static_cast<size_t>(s)] - static_cast<uint32_t>(g.offset);
      if (g.bitmap) out[offset / 32] |= 1u << (offset % 32);
      else out[s / 2] |= offset << (16 * (s % 2));
    }
    auto* q = reinterpret_cast<int8_t*>(values);
    float run[kInt8Run], lost[kInt8Run];
    for (int64_t first = 0; first < k; first += kInt8Run) {
      const int64_t count = std::min(kInt8Run, k - first);
      for (int64_t j = 0; j < count; ++j) run[j] = residual_[entries[static_cast<size_t>(first + j)]];
      const float scale = encode_int8_run(run, count, q + first, lost);
      std::memcpy(&scales[first / kInt8Run], &scale, sizeof(float));
      for (int64_t j = 0; j < count; ++j) residual_[entries[static_cast<size_t>(first + j)]] = lost[j];
    }
  }

  // Adds rank r's int8 entries of one group (write_int8's layout) into its block.
  void read_int8(const Group& g, const uint32_t* in, float* block, int r) const {
    const uint32_t* values = in + (g.bitmap ? bitmap_words(g) : (g.k + 1) / 2);
    const uint32_t* scales = values + (g.k + 3) / 4;
    const auto* q = reinterpret_cast<const int8_t*>(values);
    const auto value = [&](int64_t s) {
      float scale;
      std::memcpy(&scale, &scales[s / kInt8Run], sizeof(float));
      return decode_int8(q[s], scale);
    };
    if (g.bitmap) {
      for_each_marked(g, in, r, [&](int64_t offset, int64_t s) { block[offset] += value(s); });
    } else {
      for (int64_t s = 0; s < g.k; ++s) block[checked_offset(g, (in[s / 2] >> (16 * (s % 2))) & 0xffffu, r)] += value(s);
    }
  }

  // fn(offset, s) for the s-th entry marked in a group's bitmap, which must mark exactly k.
  template <typename Fn>
  static void for_each_marked(const Group& g, const uint32_t* bitmap, int r, Fn&& fn) {
    int64_t s = 0;
    for (int64_t w = 0; w < bitmap_words(g); ++w)
      for (uint32_t bits = bitmap[w]; bits != 0; bits &= bits - 1, ++s) {
        const int64_t offset = w * 32 + std::countr_zero(bits);
        if (offset >= g.size || s >= g.k)
          throw Error("comm/compression", fmt::format("top-k: rank {} marked more than the {} entries of a "
                                                      "block of {}", r, g.k, g.size));
        fn(offset, s);
      }
    if (s != g.k)
      throw Error("comm/compression", fmt::format("top-k: rank {} marked {} of a block's {} entries", r, s, g.k));
  }

  static int64_t checked_offset(const Group& g, uint32_t offset, int r) {
    if (offset >= g.size)
      throw Error("comm/compression", fmt::format("top-k: rank {} sent offset {} in a block of {}", r, offset, g.size));
    return offset;
  }

  static int64_t bitmap_words(const Group& g) { return (g.size + 31) / 32; }

  WireDtype dtype_;
  std::vector<Group> groups_;
  int64_t k_ = 0;                 // entries per rank and call: the sum of the groups' k
  int64_t words_ = 0;             // narrow dtypes: the payload's words after the header
  std::vector<uint32_t> order_;   // (group size) scratch for the selection
  std::vector<uint32_t> chosen_;  // (k) the indices sent, group after group
  std::vector<uint32_t> mine_;    // this rank's payload: 2k words (f32), header + words_ (narrow)
  std::vector<uint32_t> all_;     // (N, payload) every rank's payload
};

}  // namespace

std::unique_ptr<GradientCodec> make_topk_codec(int64_t n, double density, const std::vector<MatrixShape>& tensors,
                                               WireDtype dtype) {
  if (n > int64_t{UINT32_MAX})
    throw InputError("comm/compression", "top-k sends 32-bit indices: gradients above 2^32 elements need another codec");
  return std::make_unique<TopKCodec>(n, density, tensors, dtype);
}

}  // namespace flotilla::comm::detail
