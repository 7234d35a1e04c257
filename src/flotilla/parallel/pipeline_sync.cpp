#include "flotilla/parallel/pipeline_sync.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <string>

#include "flotilla/base/error.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/parallel/zero.hpp"

namespace flotilla::parallel {
namespace {

// Above pipeline.cpp's per-micro-batch tags.
constexpr int kTiedEmbeddingTag = 32100;
constexpr int kModelWriteTag = 32101;

class PipelineSync final : public GradientSync {
 public:
  PipelineSync(model::Llama& model, PipelineStage& pipeline, DataParallel* dp, int zero_stage)
      : GradientSync(model), pipeline_(pipeline), dp_(dp) {
    model_.set_layer_range(pipeline_.range());
    const model::Llama::Trainable t = model_.trainable();
    owned_ = stage_owned_ranges(model_, t.table, pipeline_.ranges());
    tp_split_ = model_.tensor_parallel_split_ranges();
    // One range (a stage's tensors are adjacent in the arena, unless LoRA leaves gaps): its
    // gradients are used where backward left them; else they are gathered into a buffer.
    // ZeRO-1: the stage's ranges sharded over its dp group (parallel/zero.hpp), which then
    // reduce-scatters them, keeps the moments of its shard and all-gathers the update.
    if (zero_stage > 0 && dp_ && dp_->world() > 1 && !mine().empty())
      zero_ = make_zero_sync_over(model_, *dp_, mine());
    if (!zero_ && mine().size() != 1) {
      int64_t n = 0;
      for (const ArenaRange& r : mine()) n += r.size();
      owned_grads_.resize(static_cast<size_t>(n));
    }
    const model::ModelConfig& cfg = model_.config();
    // The head's product reads the embedding: the last stage computes a share of its
    // gradient and needs its updated weights.
    if (cfg.tie_embeddings && !model_.base_frozen() && pipeline_.stages() > 1) {
      const model::WeightRef& e = model_.layout().embed;
      tied_ = ArenaRange{e.offset(), e.offset() + cfg.vocab_size * cfg.dim};
      if (pipeline_.first()) tied_scratch_.resize(static_cast<size_t>(tied_.size()));
    }
  }

  std::string name() const override {
    if (zero_) return "pipeline + " + zero_->name();
    return dp_ && dp_->world() > 1 ? "pipeline + all-reduce" : "pipeline";
  }
  void zero_grads() override {
    if (zero_) zero_->zero_grads();
    else model_.zero_grads();
  }

  Exchanged exchange(const model::LossSum& local) override {
    comm::Communicator& pp = pipeline_.communicator();
    double loss[2] = {local.sum, static_cast<double>(local.num_tokens)};
    pp.all_reduce(comm::MutView(std::span<double>(loss)), comm::ReduceOp::sum, {.name = "pipeline loss"});
    const model::LossSum replica{loss[0], static_cast<int64_t>(loss[1])};
    const std::span<float> grads = model_.trainable().grads;
    if (tied_.size() > 0) {
      const std::span<float> g = grads.subspan(static_cast<size_t>(tied_.begin), static_cast<size_t>(tied_.size()));
      if (pipeline_.last()) {
        pp.send(comm::ConstView(std::span<const float>(g)), 0, kTiedEmbeddingTag, {.name = "tied embedding gradient"});
        tied_bytes_ += static_cast<int64_t>(g.size_bytes());
      } else if (pipeline_.first()) {
        pp.recv(comm::MutView(tied_scratch_.span()), pipeline_.stages() - 1, kTiedEmbeddingTag,
                {.name = "tied embedding gradient"});
        kernels::add_inplace(g.data(), tied_scratch_.data(), tied_.size());
      }
    }
    if (zero_) return zero_->exchange(replica);
    if (!owned_grads_.empty()) {
      float* out = owned_grads_.data();
      for (const ArenaRange& r : mine()) {
        std::copy(grads.begin() + r.begin, grads.begin() + r.end, out);
        out += r.size();
      }
    }
    const std::span<float> owned = owned_grads();
    model::LossSum global = replica;
    if (dp_ && dp_->world() > 1)
      global = owned.empty() ? dp_->all_reduce_loss(replica) : dp_->all_reduce_gradients(owned, replica);
    return {global, global.num_tokens};
  }

  std::vector<ArenaRange> owned() const override { return zero_ ? zero_->owned() : mine(); }
  std::vector<ArenaRange> sole_owned() const override { return zero_ ? zero_->sole_owned() : mine(); }
  // Whether this stage's ranges are sharded over its dp group too (ZeRO): each replica then
  // holds a part of the stage's optimizer state.
  bool zero_sharded() const { return zero_ != nullptr; }
  std::span<float> owned_grads() override {
    if (zero_) return zero_->owned_grads();
    if (mine().size() == 1)
      return model_.trainable().grads.subspan(static_cast<size_t>(mine()[0].begin), static_cast<size_t>(mine()[0].size()));
    return owned_grads_.span();
  }
  bool sharded() const override { return true; }

  // Under ZeRO the stage's squares are its dp group's (summed there), then over the stages.
  double grad_sum_squares() override {
    const std::span<float> owned = owned_grads();
    double sum = 0.0;
    if (zero_) {
      sum = zero_->grad_sum_squares();  // over the dp group (pp x tp: the split squares over tp too)
    } else if (model::TensorParallelGroup* tp = model_.tensor_parallel()) {
      // Each stage's tensors sliced over its tp group (pp x tp): the split tensors' squares
      // summed over the tp ranks, the replicated ones' counted once. The owned gradients
      // are this stage's ranges, one after another.
      model::SquareSums sums;
      int64_t at = 0;  // the range's start in `owned`
      for (const ArenaRange& r : mine()) {
        const model::SquareSums s = model::square_sums(owned.data() + at, r.begin, r.end, tp_split_);
        sums.replicated += s.replicated;
        sums.split += s.split;
        at += r.size();
      }
      std::vector<double> split(1, sums.split);
      tp->all_reduce_sum(std::span<double>(split), "pp x tp gradient norm");
      sum = sums.replicated + split[0];
    } else {
      sum = kernels::sum_squares(owned.data(), static_cast<int64_t>(owned.size()));
    }
    pipeline_.communicator().all_reduce(comm::MutView(std::span<double>(&sum, 1)), comm::ReduceOp::sum,
                                        {.name = "pipeline gradient norm"});
    return sum;
  }

  void after_update(int64_t step, bool last) override {
    if (zero_) zero_->after_update(step, last);  // the stage's updated shards, all-gathered over dp
    if (tied_.size() == 0) return;
    comm::Communicator& pp = pipeline_.communicator();
    const std::span<float> w =
        model_.trainable().params.subspan(static_cast<size_t>(tied_.begin), static_cast<size_t>(tied_.size()));
    if (pipeline_.first()) {
      pp.send(comm::ConstView(std::span<const float>(w)), pipeline_.stages() - 1, kTiedEmbeddingTag,
              {.name = "tied embedding weights"});
      tied_bytes_ += static_cast<int64_t>(w.size_bytes());
    } else if (pipeline_.last()) {
      pp.recv(comm::MutView(w), 0, kTiedEmbeddingTag, {.name = "tied embedding weights"});
    }
  }

  void complete_weights() override {
    comm::Communicator& pp = pipeline_.communicator();
    const std::span<float> params = model_.trainable().params;
    for (int stage = 0; stage < pipeline_.stages(); ++stage)
      for (const ArenaRange& r : owned_[static_cast<size_t>(stage)])
        pp.broadcast(comm::MutView(params.subspan(static_cast<size_t>(r.begin), static_cast<size_t>(r.size()))), stage,
                     {.name = "pipeline weights"});
  }

  // The final model: stage 0 of the first replica writes it tensor by tensor; each tensor
  // another stage owns comes from that stage into its place in the arena, which is handed
  // back once the writer has moved on (a stage never holds more than its own tensors and
  // the one being written). The other stages of that replica send theirs in layout order
  // in end_weight_pass; the other replicas have nothing to do.
  bool weights_sharded() const override { return !model_.base_frozen() && !model_.holds_all(); }

  void gather_weights_through(int64_t offset) override {
    release_received();
    const model::ParamInfo* info = tensor_at(offset);
    if (!info || owner_of(*info) == pipeline_.stage()) return;
    const std::span<float> w = model_.trainable().params.subspan(static_cast<size_t>(info->offset), static_cast<size_t>(info->numel));
    pipeline_.communicator().recv(comm::MutView(w), owner_of(*info), kModelWriteTag, {.name = "pipeline model write"});
    received_ = w;
  }

  void end_weight_pass() override {
    release_received();
    if (pipeline_.first() || (dp_ && dp_->rank() != 0)) return;
    const model::Llama::Trainable t = model_.trainable();
    for (const model::ParamInfo& info : t.table.params()) {
      if (owner_of(info) != pipeline_.stage()) continue;
      pipeline_.communicator().send(
          comm::ConstView(std::span<const float>(t.params.subspan(static_cast<size_t>(info.offset), static_cast<size_t>(info.numel)))),
          0, kModelWriteTag, {.name = "pipeline model write"});
    }
  }

  void take_owned(std::span<const float> whole, std::span<float> owned) const override {
    if (zero_) return zero_->take_owned(whole, owned);
    float* out = owned.data();
    for (const ArenaRange& r : mine()) {
      std::copy(whole.begin() + r.begin, whole.begin() + r.end, out);
      out += r.size();
    }
  }

  int64_t bytes_sent() const override {
    return (zero_ ? zero_->bytes_sent() : dp_ ? dp_->gradient_bytes_sent() : 0) + tied_bytes_;
  }
  int64_t exchanges() const override { return zero_ ? zero_->exchanges() : dp_ ? dp_->gradient_exchanges() : 0; }

 private:
  const std::vector<ArenaRange>& mine() const { return owned_[static_cast<size_t>(pipeline_.stage())]; }
  // The stage that owns (updates) tensor `info`.
  int owner_of(const model::ParamInfo& info) const {
    for (int s = 0; s < pipeline_.stages(); ++s)
      for (const ArenaRange& r : owned_[static_cast<size_t>(s)])
        if (info.offset >= r.begin && info.offset < r.end) return s;
    throw Error("parallel/pipeline", "tensor " + info.name + " is owned by no stage");
  }
  const model::ParamInfo* tensor_at(int64_t offset) const {
    for (const model::ParamInfo& info : model_.layout().params())
      if (info.offset == offset && !info.quantized) return &info;
    return nullptr;
  }
  void release_received() {
    if (!received_.empty()) release_zeroed(received_.data(), received_.size_bytes());
    received_ = {};
  }

  PipelineStage& pipeline_;
  DataParallel* dp_;
  std::vector<std::vector<ArenaRange>> owned_;
  std::vector<ArenaRange> tp_split_;  // pp x tp: the arena's slices of split tensors (ascending)
  Buffer<float> owned_grads_;  // this stage's owned gradients, concatenated in arena order
  ArenaRange tied_;            // the embedding, when the last stage's head reads it too
  Buffer<float> tied_scratch_;  // stage 0: the last stage's share of its gradient
  int64_t tied_bytes_ = 0;
  std::span<float> received_;  // the final model's write: another stage's tensor, held until the next
  std::unique_ptr<GradientSync> zero_;  // ZeRO-1 over the stage's dp group; null: all-reduce
};

}  // namespace

std::vector<std::vector<ArenaRange>> stage_owned_ranges(const model::Llama& model, const model::ParamTable& table,
                                                        std::span<const StageRange> stages) {
  const int64_t L = model.config().n_layers;
  const auto P = static_cast<int>(stages.size());
  auto stage_of_layer = [&](int64_t layer) {
    for (int s = 0; s < P; ++s)
      if (layer >= stages[static_cast<size_t>(s)].begin && layer < stages[static_cast<size_t>(s)].end) return s;
    throw Error("parallel/pipeline", fmt::format("layer {} is in no stage", layer));
  };
  std::vector<const model::ParamInfo*> by_offset;
  for (const model::ParamInfo& info : table.params()) by_offset.push_back(&info);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const model::ParamInfo* a, const model::ParamInfo* b) { return a->offset < b->offset; });
  std::vector<std::vector<ArenaRange>> owned(static_cast<size_t>(P));
  // As Llama::grad_groups: a tensor belongs to the layer its name holds ("...layers.7..."),
  // else to the embedding or the head; its range reaches to the next tensor's offset.
  for (size_t i = 0; i < by_offset.size(); ++i) {
    const model::ParamInfo& info = *by_offset[i];
    const int64_t end = i + 1 < by_offset.size() ? by_offset[i + 1]->offset : table.total_numel();
    int stage = P - 1;  // the head
    if (const size_t at = info.name.find("layers."); at != std::string::npos) {
      const int64_t layer = std::stoll(info.name.substr(at + 7));
      if (layer < 0 || layer >= L) throw Error("parallel/pipeline", "tensor " + info.name + " names no layer of the model");
      stage = stage_of_layer(layer);
    } else if (info.name == "model.embed_tokens.weight") {
      stage = 0;
    }
    std::vector<ArenaRange>& r = owned[static_cast<size_t>(stage)];
    if (!r.empty() && r.back().end == info.offset)
      r.back().end = end;
    else
      r.push_back({info.offset, end});
  }
  return owned;
}

bool pipeline_zero_sharded(const GradientSync& sync) {
  const auto* p = dynamic_cast<const PipelineSync*>(&sync);
  return p && p->zero_sharded();
}

std::unique_ptr<GradientSync> make_pipeline_sync(model::Llama& model, PipelineStage& pipeline, DataParallel* dp,
                                                 int zero_stage) {
  if (zero_stage > 1)
    throw InputError("parallel", fmt::format("--zero {} does not work with pipeline parallelism (pp > 1): a stage's "
                                             "gradient is whole until its last micro-batch's backward, so sharding "
                                             "it saves nothing at the peak (DeepSpeed allows only ZeRO-1 with "
                                             "pipelines too); use --zero 1",
                                             zero_stage));
  return std::make_unique<PipelineSync>(model, pipeline, dp, zero_stage);
}

}  // namespace flotilla::parallel
