// What the training benches share: the random batches the PyTorch peers also draw, and one
// timed AdamW step of the mean loss with its phases.
#pragma once

#include <cstdint>
#include <vector>

#include "flotilla/base/rng.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/train/adamw.hpp"

namespace flotilla::bench {

// A fresh random batch per step, as the peers draw one: seq (B, T+1) uniform over the
// vocabulary, tokens = seq[:, :-1], targets = seq[:, 1:].
struct RandomBatch {
  int64_t B, T, V;
  std::vector<int32_t> seq, tokens, targets;  // (B, T+1), (B, T), (B, T)

  RandomBatch(int64_t b, int64_t t, int64_t v)
      : B(b), T(t), V(v), seq(static_cast<size_t>(b * (t + 1))), tokens(static_cast<size_t>(b * t)),
        targets(static_cast<size_t>(b * t)) {}

  void draw(Rng& rng) {
    for (auto& s : seq) s = static_cast<int32_t>(rng.below(static_cast<uint64_t>(V)));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        tokens[b * T + t] = seq[b * (T + 1) + t];
        targets[b * T + t] = seq[b * (T + 1) + t + 1];
      }
  }
};

struct PhaseMs {
  double zero_grads = 0, forward = 0, backward = 0, optimizer = 0;
};

// zero_grads, forward, backward of the mean loss, AdamW on what the model trains (every
// parameter, or the attached adapters); adds each phase's ms into `acc` when not null.
// Returns the mean loss.
inline double timed_adamw_step(model::Llama& model, train::AdamW& opt, const RandomBatch& batch, float lr,
                               PhaseMs* acc) {
  Timer t;
  model.zero_grads();
  const double t_zero = t.elapsed_ms();
  const model::LossSum loss = model.forward(batch.tokens.data(), batch.targets.data(), batch.B, batch.T);
  const double t_fwd = t.elapsed_ms();
  model.backward(1.0f / static_cast<float>(loss.num_tokens));
  const double t_bwd = t.elapsed_ms();
  const model::Llama::Trainable trainable = model.trainable();
  opt.step(trainable.params, trainable.grads, lr);
  const double t_opt = t.elapsed_ms();
  if (acc != nullptr) {
    acc->zero_grads += t_zero;
    acc->forward += t_fwd - t_zero;
    acc->backward += t_bwd - t_fwd;
    acc->optimizer += t_opt - t_bwd;
  }
  return loss.mean();
}

}  // namespace flotilla::bench
