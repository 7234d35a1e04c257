// A training job's model: its tokenizer, the model (from a directory, a preset or a
// config.json), LoRA adapters over it (fresh, or continued from an adapter folder), the
// checks that it can be trained as asked, and its activation memory for the job's rows.
#pragma once

#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/text/tokenizer.hpp"
#include "flotilla/train/job.hpp"
#include "flotilla/train/job_context.hpp"

namespace flotilla::train {

// The model directory's tokenizer, or bytes for a preset or config.json.
std::unique_ptr<text::Tokenizer> make_tokenizer(const TrainJob& job);

// The config of the model the job trains, before any weight is read: exactly one of
// --model, --preset or --config (InputError otherwise); a new model speaks its tokenizer's
// special ids.
model::ModelConfig job_model_config(const TrainJob& job, const text::Tokenizer& tokenizer);

// The ranges of the parameter arena this rank builds: empty for the whole model; under
// --zero 3 on several ranks, a new model's ZeRO-3 shard (parallel/zero3.hpp), so that no
// rank ever writes (and holds) the whole model. Every rank computes its own from the
// config alone, before the model exists. A model directory is read the same way: only
// these ranges of its files (a quantized one, which cannot be fully trained, whole).
std::vector<model::ElementRange> build_ranges(const TrainJob& job, const text::Tokenizer& tokenizer);

// The part of the model this rank holds (model::Llama::HeldPart): a pipeline stage's
// layers (`stage`), and under expert parallelism (ep > 1) this rank's block of every MoE
// layer's experts, unless the run exchanges the whole arena over the data group (--zero,
// --compression), which then holds every expert as before.
model::Llama::HeldPart held_part(const TrainJob& job, const model::ModelConfig& cfg,
                                 std::optional<model::Llama::LayerRange> stage);

// The model: loaded, or initialised from job.seed. `held`: the model holds only that part's
// tensors (model::Llama::hold_only), and reads or draws only those. `shard` (from
// build_ranges): only those ranges are initialised or read, to the values the whole model
// would have there; the rest is never written.
model::Llama make_model(const TrainJob& job, const text::Tokenizer& tokenizer, const model::Llama::HeldPart& held = {},
                        std::span<const model::ElementRange> shard = {});

// A LoRA run: adapters (fresh from job.seed, or job.resume_adapter checked against the LoRA
// flags given) attached to `model`, which keeps a pointer to them: they must outlive it.
// A full run: null, after refusing --resume-adapter-file and a quantized model. `whole`:
// the full model's config (a tp rank's adapters are its slices of the full adapters').
std::unique_ptr<model::LoraAdapters> attach_lora(const TrainJob& job, model::Llama& model, const model::ModelConfig& whole,
                                                 const InfoSink& info);

// A fresh run's weights to train that hold a NaN or an Inf can only give a non-finite
// model, which is never written: InputError naming the tensor now, not after the run.
// With `shard`, only those ranges are read (the rest was never built).
void check_trainable_finite(const TrainJob& job, model::Llama& model, std::span<const model::ElementRange> shard = {});

// Gradient checkpointing as asked, and the activation memory of B x T rows checked (and
// told) before the data loads, not at the first step.
void plan_activations(const TrainJob& job, model::Llama& model, const InfoSink& info);

// adapter_config.json's base_model_name_or_path: the base as the user named it, made
// absolute (a relative path would name another folder from wherever the adapter is used).
std::string base_model_name(const TrainJob& job);

}  // namespace flotilla::train
