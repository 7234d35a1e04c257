#include "flotilla/data/batch_sampler.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "flotilla/base/error.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/base/rng.hpp"

namespace flotilla::data {
namespace {
constexpr std::string_view kBatchSamplerComponent = "data/sampler";
constexpr int32_t kIgnore = -100;  // model::kIgnoreIndex; data/ sits below model/
}  // namespace

TruncationStats truncation_at(const ExampleSource& examples, int64_t seq_len) {
  TruncationStats s;
  std::vector<uint8_t> mask;
  for (size_t e = 0; e < examples.num_examples(); ++e) {
    const ExampleView ex = examples.example(e);
    const auto n = static_cast<int64_t>(ex.tokens.size());
    mask.resize(static_cast<size_t>(n));
    ex.mask.unpack(mask);
    int64_t kept = 0, lost = 0;
    for (int64_t i = 1; i < n; ++i) (i <= seq_len ? kept : lost) += mask[static_cast<size_t>(i)];
    ++s.examples;
    s.targets += kept + lost;
    s.targets_lost += lost;
    s.longest = std::max(s.longest, n);
    if (n > seq_len + 1) ++s.truncated;
    if (kept == 0) ++s.without_targets;
  }
  return s;
}

BatchSampler::BatchSampler(const ExampleSource& examples, SamplerConfig cfg) : examples_(examples), cfg_(cfg) {
  if (examples.num_examples() == 0) throw InputError(kBatchSamplerComponent, "the split has no examples");
  if (cfg.seq_len <= 0 || cfg.micro_batch <= 0 || cfg.grad_accum <= 0 || cfg.world <= 0 || cfg.rank < 0 ||
      cfg.rank >= cfg.world)
    throw InputError(kBatchSamplerComponent, fmt::format("bad batch geometry: seq_len {}, micro_batch {}, grad_accum {}, rank {} of {}",
                                             cfg.seq_len, cfg.micro_batch, cfg.grad_accum, cfg.rank, cfg.world));
  start_epoch(0);
}

void BatchSampler::start_epoch(int64_t epoch) {
  epoch_ = epoch;
  position_ = 0;
  if (!cfg_.shuffle) return;
  // Fisher-Yates from an RNG seeded by (seed, epoch): every rank draws the same order.
  const size_t n = examples_.num_examples();
  permutation_.resize(n);
  for (size_t i = 0; i < n; ++i) permutation_[i] = static_cast<uint32_t>(i);
  Rng rng(cfg_.seed ^ (0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(epoch + 1)));
  for (size_t i = n; i > 1; --i) std::swap(permutation_[i - 1], permutation_[rng.below(i)]);
}

bool BatchSampler::build_global_batch() {
  const int64_t G = cfg_.global_rows(), T = cfg_.seq_len;
  tokens_.assign(static_cast<size_t>(G * T), cfg_.pad_id);
  targets_.assign(tokens_.size(), kIgnore);
  doc_start_.assign(tokens_.size(), 0);
  if (position_ >= examples_.num_examples()) {
    if (!cfg_.repeat) {
      exhausted_ = true;
      return false;
    }
    start_epoch(epoch_ + 1);
  }
  batch_epoch_ = epoch_;
  batch_start_ = position_;
  for (int64_t row = 0; row < G; ++row) {
    int64_t used = 0;     // positions of this row taken
    size_t visited = 0;   // examples drawn for this row
    while (true) {
      if (position_ >= examples_.num_examples()) {
        if (!cfg_.repeat) break;  // the last global batch of the epoch: the rest is padding
        start_epoch(epoch_ + 1);  // training runs on into the next epoch's order
      }
      const ExampleView ex = examples_.example(order(position_));
      const auto n = static_cast<int64_t>(ex.tokens.size());
      const int64_t take = std::min(n, T);
      if (used > 0 && (!cfg_.pack || used + take > T)) break;  // starts the next row
      if (n > T) ++truncated_;
      const size_t base = static_cast<size_t>(row * T + used);
      for (int64_t i = 0; i < take; ++i) {
        tokens_[base + static_cast<size_t>(i)] = static_cast<int32_t>(ex.tokens[static_cast<size_t>(i)]);
        doc_start_[base + static_cast<size_t>(i)] = static_cast<int32_t>(used);
        // Position i predicts token i+1 of the same example, where the mask allows.
        if (i + 1 < n && ex.mask[static_cast<size_t>(i + 1)])
          targets_[base + static_cast<size_t>(i)] = static_cast<int32_t>(ex.tokens[static_cast<size_t>(i + 1)]);
      }
      // Padding after the last example: each padded position is its own one-token
      // "example", so it attends to itself only and stays finite.
      used += take;
      ++position_;
      if (!cfg_.pack) break;
      // Examples without a token fill nothing: a whole epoch of them must end, not loop.
      if (++visited > examples_.num_examples() && used == 0)
        throw InputError(kBatchSamplerComponent, fmt::format("all {} examples of the split are empty: no token to train on",
                                                 examples_.num_examples()));
    }
    for (int64_t t = used; t < T; ++t) doc_start_[static_cast<size_t>(row * T + t)] = static_cast<int32_t>(t);
  }
  micro_step_ = 0;
  have_batch_ = true;
  return true;
}

bool BatchSampler::next(Batch& batch) {
  if (exhausted_) return false;
  const int64_t per_step = cfg_.grad_accum;  // micro-batches per rank per global batch
  if (!have_batch_ || micro_step_ >= per_step) {
    if (!build_global_batch()) return false;
  }
  const int64_t B = cfg_.micro_batch, T = cfg_.seq_len;
  const int64_t first_row = (micro_step_ * cfg_.world + cfg_.rank) * B;
  const auto begin = static_cast<size_t>(first_row * T), count = static_cast<size_t>(B * T);
  batch.B = B;
  batch.T = T;
  batch.tokens.assign(tokens_.begin() + static_cast<std::ptrdiff_t>(begin),
                      tokens_.begin() + static_cast<std::ptrdiff_t>(begin + count));
  batch.targets.assign(targets_.begin() + static_cast<std::ptrdiff_t>(begin),
                       targets_.begin() + static_cast<std::ptrdiff_t>(begin + count));
  batch.doc_start.assign(doc_start_.begin() + static_cast<std::ptrdiff_t>(begin),
                         doc_start_.begin() + static_cast<std::ptrdiff_t>(begin + count));
  ++micro_step_;
  return true;
}

void BatchSampler::next_batch(Batch& batch) {
  if (!next(batch)) throw Error(kBatchSamplerComponent, "next_batch after the end of a non-repeating epoch");
}

void BatchSampler::next_batch(int32_t* tokens, int32_t* targets, int B, int T) {
  if (cfg_.pack) throw Error(kBatchSamplerComponent, "packed batches need doc_start: call next_batch(Batch&)");
  if (B != cfg_.micro_batch || T != cfg_.seq_len)
    throw Error(kBatchSamplerComponent, fmt::format("asked for ({}, {}) but the sampler makes ({}, {})", B, T, cfg_.micro_batch,
                                        cfg_.seq_len));
  Batch batch;
  next_batch(batch);
  std::memcpy(tokens, batch.tokens.data(), batch.tokens.size() * sizeof(int32_t));
  std::memcpy(targets, batch.targets.data(), batch.targets.size() * sizeof(int32_t));
}

nlohmann::json BatchSampler::state() const {
  // Mid-batch, the batch is rebuilt from where it started; at a step boundary (all
  // micro-batches handed out) the next batch starts at position_.
  const bool mid = have_batch_ && micro_step_ < cfg_.grad_accum;
  return {{"kind", "batch_sampler"},
          {"epoch", mid ? batch_epoch_ : epoch_},
          {"position", mid ? batch_start_ : position_},
          {"micro_step", mid ? micro_step_ : 0},
          {"examples", examples_.num_examples()},
          {"global_rows", cfg_.global_rows()},
          {"seq_len", cfg_.seq_len},
          {"pack", cfg_.pack},
          {"seed", cfg_.seed}};
}

void BatchSampler::set_state(const nlohmann::json& st) {
  auto fail = [](const std::string& why) { throw InputError(kBatchSamplerComponent, "cannot resume the sampler: " + why); };
  try {
    if (st.at("kind") != "batch_sampler") fail("the state is not a batch sampler's");
    if (st.at("examples").get<size_t>() != examples_.num_examples()) fail("the data has a different number of examples");
    if (st.at("global_rows").get<int64_t>() != cfg_.global_rows() || st.at("seq_len").get<int64_t>() != cfg_.seq_len ||
        st.at("pack").get<bool>() != cfg_.pack || st.at("seed").get<uint64_t>() != cfg_.seed)
      fail("the global batch size, sequence length, packing or seed differ");
    const auto position = st.at("position").get<size_t>();
    const auto micro_step = st.at("micro_step").get<int64_t>();
    if (position > examples_.num_examples() || micro_step < 0 || micro_step >= cfg_.grad_accum)
      fail("position or micro-step out of range");
    start_epoch(st.at("epoch").get<int64_t>());
    position_ = position;
    have_batch_ = false;
    exhausted_ = false;
    if (micro_step > 0) {
      build_global_batch();
      micro_step_ = micro_step;
    }
  } catch (const nlohmann::json::exception& e) {
    fail("malformed state: " + json_error_text(e));
  }
}

}  // namespace flotilla::data
