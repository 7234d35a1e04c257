// One LoRA training step of two tensor-parallel ranks, each on its own thread (ThreadPair):
// what the tp LoRA tests and the float64 replay's dumper run against one rank's step.
#pragma once

#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/model/tensor_parallel.hpp"
#include "thread_pair.hpp"

namespace flotilla::model::test_models {

struct TpLoraStep {
  std::vector<std::unique_ptr<LoraAdapters>> adapters;  // rank r's slices of the whole adapters
  LossSum loss[2];
  double norm2[2] = {0, 0};  // each rank's clipping norm's square (split tensors summed over tp)
};

// Rank r's adapters are its slices of `whole`, attached to locals[r] (left attached: the
// caller detaches); each rank then runs forward and backward of (tokens, targets), B x T, as
// tp rank r of 2, and leaves the tp group.
inline TpLoraStep run_tp_lora_step(std::vector<Llama>& locals, const ModelConfig& full_cfg, const LoraAdapters& whole,
                                   const LoraConfig& lc, const int32_t* tokens, const int32_t* targets, int64_t B,
                                   int64_t T, bool sequence_parallel, bool checkpoint) {
  TpLoraStep step;
  for (int r = 0; r < 2; ++r) {
    step.adapters.push_back(std::make_unique<LoraAdapters>(locals[static_cast<size_t>(r)].config(), lc));
    for (const ParamInfo& info : whole.table().params())
      copy_slice_out(info, *step.adapters.back()->table().find(info.name), {r, 2}, whole.params(),
                     step.adapters.back()->params());
  }
  ThreadPair pair;
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      ThreadPair::Rank group(pair, r);
      Llama& m = locals[static_cast<size_t>(r)];
      m.attach_lora(step.adapters[static_cast<size_t>(r)].get());
      m.set_training(true);
      m.set_tensor_parallel(&group, full_cfg);
      m.set_sequence_parallel(sequence_parallel);
      m.set_grad_checkpoint(checkpoint);  // the recomputed blocks sum u again
      m.zero_grads();
      step.loss[r] = m.forward(tokens, targets, B, T);
      m.backward(1.0f / static_cast<float>(step.loss[r].num_tokens));
      step.norm2[r] = m.grad_sum_squares_tensor_parallel();
      m.set_tensor_parallel(nullptr, full_cfg);
    });
  }
  for (std::thread& t : threads) t.join();
  return step;
}

}  // namespace flotilla::model::test_models
