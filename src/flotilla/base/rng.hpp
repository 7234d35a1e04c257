// Deterministic random numbers: the same seed gives the same stream on every machine and
// compiler (no std::normal_distribution, whose output is implementation-defined).
#pragma once

#include <cstdint>
#include <span>

namespace flotilla {

// xoshiro256** seeded through splitmix64. State is four words: cheap to save in a
// checkpoint and restore.
class Rng {
 public:
  explicit Rng(uint64_t seed = 0);
  uint64_t next_u64();
  // Uniform in [0, 1), 24 random bits.
  float uniform();
  // Uniform integer in [0, n), n > 0.
  uint64_t below(uint64_t n);
  // Standard normal (Box-Muller). Draws exactly two words, always: skipping k normals of
  // a stream is discard(2 k).
  float normal();
  // Advances the stream by `n` words, as n calls of next_u64 would (without the
  // transcendental work of the draws skipped).
  void discard(uint64_t n);
  void fill_normal(std::span<float> out, float mean, float stddev);
  void fill_uniform(std::span<float> out, float lo, float hi);

  struct State { uint64_t s[4]; };
  State state() const;
  void set_state(const State& st);

 private:
  uint64_t s_[4];
};

}  // namespace flotilla
