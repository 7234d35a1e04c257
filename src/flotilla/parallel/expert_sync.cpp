#include "flotilla/parallel/expert_sync.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::parallel {
namespace {

// Above pipeline.cpp's and pipeline_sync.cpp's tags.
constexpr int kExpertModelWriteTag = 32110;

// A run of the owned arena of one kind: where it is in the arena and in the concatenated
// owned gradients.
struct OwnedPiece {
  ArenaRange arena;
  int64_t at = 0;       // its first float in owned_grads
  bool expert = false;  // this rank's experts (else shared)
};

void append_merged(std::vector<ArenaRange>& ranges, ArenaRange r) {
  if (r.size() <= 0) return;
  if (!ranges.empty() && ranges.back().end == r.begin)
    ranges.back().end = r.end;
  else
    ranges.push_back(r);
}

class ExpertSync final : public GradientSync {
 public:
  ExpertSync(model::Llama& model, DataParallel& data, ExpertParallel& experts)
      : GradientSync(model), data_(data), experts_(experts) {
    const model::Llama::HeldPart& held = model_.held_part();
    const auto [first, end] = model_.local_experts();
    if (!held.experts || held.experts->begin != first || held.experts->end != end)
      throw Error("parallel/expert", "the expert-parallel sync needs a model holding exactly the experts it runs");
    if (comm::Communicator* r = experts_.replica_group(); r && r->size() > 1) replicas_.emplace(*r);
    const int64_t El = end - first;
    const model::Llama::Trainable t = model_.trainable();
    const std::vector<model::ParamInfo>& params = t.table.params();
    // Each tensor's range reaches to the next one's offset (the layout's are ascending).
    int64_t at = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      const model::ParamInfo& info = params[i];
      const ArenaRange r{info.offset, i + 1 < params.size() ? params[i + 1].offset : t.table.total_numel()};
      const int64_t expert = model::expert_of_tensor(info.name);
      if (expert >= 0) expert_tensors_.push_back({&info, static_cast<int>(expert / El)});
      if (expert >= 0 && (expert < first || expert >= end)) continue;  // another block's
      append_merged(owned_, r);
      (expert >= 0 ? mine_ : shared_).push_back(r);
      if (!pieces_.empty() && pieces_.back().expert == (expert >= 0) && pieces_.back().arena.end == r.begin)
        pieces_.back().arena.end = r.end;
      else
        pieces_.push_back({r, at, expert >= 0});
      at += r.size();
    }
    owned_grads_.resize(static_cast<size_t>(at));
  }

  std::string name() const override { return "expert parallel (shared all-reduce, experts over their replicas)"; }

  Exchanged exchange(const model::LossSum& local) override {
    const std::span<const float> grads = model_.trainable().grads;
    for (const OwnedPiece& p : pieces_) {
      std::copy(grads.begin() + p.arena.begin, grads.begin() + p.arena.end, owned_grads_.data() + p.at);
      const std::span<float> part = piece(p);
      if (!p.expert)
        data_.all_reduce_gradient_part(part);
      else if (replicas_)
        replicas_->all_reduce_gradient_part(part);
    }
    ++exchanges_;
    const model::LossSum global = data_.all_reduce_loss(local);
    return {global, global.num_tokens};
  }

  std::vector<ArenaRange> owned() const override { return owned_; }
  std::span<float> owned_grads() override { return owned_grads_.span(); }
  bool sharded() const override { return true; }

  double grad_sum_squares() override {
    double shared = 0.0, experts = 0.0;
    for (const OwnedPiece& p : pieces_) {
      const std::span<float> part = piece(p);
      (p.expert ? experts : shared) += kernels::sum_squares(part.data(), static_cast<int64_t>(part.size()));
    }
    experts_.ep_group().all_reduce(comm::MutView(std::span<double>(&experts, 1)), comm::ReduceOp::sum,
                                   {.name = "expert gradient norm"});
    return shared + experts;
  }

  std::vector<ArenaRange> sole_owned() const override {
    // The shared tensors in equal parts over the data group; a block of experts from its
    // replica of dp index 0.
    const int64_t total = model_.trainable().table.total_numel();
    const int rank = data_.rank(), world = data_.world();
    const ArenaRange cut{total * rank / world, total * (rank + 1) / world};
    std::vector<ArenaRange> out;
    const bool writes_experts = !replicas_ || replicas_->rank() == 0;
    auto s = shared_.begin(), m = mine_.begin();
    while (s != shared_.end() || m != mine_.end()) {
      if (m == mine_.end() || (s != shared_.end() && s->begin < m->begin)) {
        append_merged(out, {std::max(s->begin, cut.begin), std::min(s->end, cut.end)});
        ++s;
      } else {
        if (writes_experts) append_merged(out, *m);
        ++m;
      }
    }
    return out;
  }

  void take_owned(std::span<const float> whole, std::span<float> owned) const override {
    float* out = owned.data();
    for (const ArenaRange& r : owned_) {
      std::copy(whole.begin() + r.begin, whole.begin() + r.end, out);
      out += r.size();
    }
  }

  // Full fine-tuning: this rank holds its own experts only, and the final model is written
  // through the pass below. LoRA: every rank holds every expert's adapters (they are small
  // beside the experts), but updates only its own; complete_weights brings the others'.
  bool weights_sharded() const override { return !model_.base_frozen(); }

  void complete_weights() override {
    if (!model_.base_frozen()) return;
    const std::span<float> params = model_.trainable().params;
    for (const auto& [info, owner] : expert_tensors_)
      experts_.ep_group().broadcast(
          comm::MutView(params.subspan(static_cast<size_t>(info->offset), static_cast<size_t>(info->numel))), owner,
          {.name = "expert adapters"});
  }

  void gather_weights_through(int64_t offset) override {
    release_received();
    for (const auto& [info, owner] : expert_tensors_) {
      if (info->offset != offset || owner == experts_.ep_rank()) continue;
      const std::span<float> w =
          model_.trainable().params.subspan(static_cast<size_t>(info->offset), static_cast<size_t>(info->numel));
      experts_.ep_group().recv(comm::MutView(w), owner, kExpertModelWriteTag, {.name = "expert model write"});
      received_ = w;
      return;
    }
  }

  void end_weight_pass() override {
    release_received();
    // Rank 0 of the world (dp 0, ep 0) writes; the other ep ranks of dp index 0 send theirs.
    if ((replicas_ && replicas_->rank() != 0) || experts_.ep_rank() == 0) return;
    const model::Llama::Trainable t = model_.trainable();
    for (const model::ParamInfo& info : t.table.params()) {
      if (model::expert_of_tensor(info.name) < 0 || !model_.holds(info)) continue;
      const std::span<const float> w =
          t.params.subspan(static_cast<size_t>(info.offset), static_cast<size_t>(info.numel));
      experts_.ep_group().send(comm::ConstView(w), 0, kExpertModelWriteTag, {.name = "expert model write"});
    }
  }

  int64_t bytes_sent() const override {
    return data_.gradient_bytes_sent() + (replicas_ ? replicas_->gradient_bytes_sent() : 0);
  }
  int64_t exchanges() const override { return exchanges_; }

 private:
  std::span<float> piece(const OwnedPiece& p) {
    return owned_grads_.span().subspan(static_cast<size_t>(p.at), static_cast<size_t>(p.arena.size()));
  }
  void release_received() {
    if (!received_.empty()) release_zeroed(received_.data(), received_.size_bytes());
    received_ = {};
  }

  struct ExpertTensor {
    const model::ParamInfo* info;
    int owner;  // the ep rank holding it
  };

  DataParallel& data_;
  ExpertParallel& experts_;
  std::optional<DataParallel> replicas_;   // the dp group: this block's replicas (none when dp = 1)
  std::vector<ArenaRange> owned_;          // shared and own experts, merged, ascending
  std::vector<ArenaRange> shared_, mine_;  // per tensor, ascending
  std::vector<OwnedPiece> pieces_;         // owned_ by kind, in arena order
  std::vector<ExpertTensor> expert_tensors_;  // every expert's tensors with their ep rank, in layout order
  Buffer<float> owned_grads_;              // (sum of owned_ sizes) the owned gradients, concatenated
  std::span<float> received_;              // the final model's write: another block's tensor, until the next
  int64_t exchanges_ = 0;
};

}  // namespace

std::unique_ptr<GradientSync> make_expert_sync(model::Llama& model, DataParallel& data, ExpertParallel& experts) {
  auto sync = std::make_unique<ExpertSync>(model, data, experts);
  data.check_same("gradient sync settings", sync->signature());
  return sync;
}

}  // namespace flotilla::parallel
