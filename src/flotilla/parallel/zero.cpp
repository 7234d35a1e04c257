#include "flotilla/parallel/zero.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>

#include "flotilla/base/buffer.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/comm/wire_bytes.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::parallel {
namespace {

constexpr int64_t kFloat = sizeof(float);

class ZeroSync final : public GradientSync {
 public:
  ZeroSync(model::Llama& model, DataParallel& dp, int stage)
      : GradientSync(model),
        dp_(dp),
        stage_(stage),
        arena_(static_cast<int64_t>(model.trainable().params.size())),
        world_(dp.world()),
        rank_(dp.rank()),
        chunk_(arena_ / world_),
        tail_(arena_ - chunk_ * world_),
        shard_grads_(static_cast<size_t>(chunk_ + tail_)) {}

  std::string name() const override { return fmt::format("ZeRO-{}", stage_); }

  void zero_grads() override {
    // Stage 2 released the arena after the last exchange: it reads as zero already.
    if (!released_) model_.zero_grads();
    released_ = false;
  }

  Exchanged exchange(const model::LossSum& local) override {
    comm::Communicator& comm = dp_.communicator();
    const std::span<float> grads = model_.trainable().grads;
    if (chunk_ > 0) {
      comm.reduce_scatter(grads.first(static_cast<size_t>(chunk_ * world_)),
                          std::span<float>(shard_grads_.data(), static_cast<size_t>(chunk_)), comm::ReduceOp::sum,
                          comm::Options{.name = "gradient shards"});
      bytes_ += comm::ring_reduce_scatter_bytes(chunk_ * world_ * kFloat, world_);
    }
    if (tail_ > 0) {
      const std::span<float> tail = grads.subspan(static_cast<size_t>(chunk_ * world_));
      comm.all_reduce(tail, comm::ReduceOp::sum, comm::Options{.name = "gradient tail"});
      std::copy(tail.begin(), tail.end(), shard_grads_.data() + chunk_);
      bytes_ += comm::ring_all_reduce_bytes(tail_ * kFloat, world_);
    }
    ++exchanges_;
    if (stage_ >= 2) {
      release_zeroed(grads.data(), grads.size_bytes());
      released_ = true;
    }
    const model::LossSum global = dp_.all_reduce_loss(local);
    return {global, global.num_tokens};
  }

  std::vector<ArenaRange> owned() const override {
    std::vector<ArenaRange> out;
    if (chunk_ > 0) out.push_back({rank_ * chunk_, (rank_ + 1) * chunk_});
    if (tail_ > 0) out.push_back({chunk_ * world_, arena_});
    return out;
  }
  std::span<float> owned_grads() override { return shard_grads_.span(); }
  bool sharded() const override { return world_ > 1; }

  // The shards' squared sums add over the ranks; the tail is the same on every rank.
  double grad_sum_squares() override {
    std::array<double, 1> shard = {kernels::sum_squares(shard_grads_.data(), chunk_)};
    dp_.communicator().all_reduce(shard, comm::ReduceOp::sum, comm::Options{.name = "gradient norm"});
    return shard[0] + kernels::sum_squares(shard_grads_.data() + chunk_, tail_);
  }

  // Every rank updated its shard; each takes the others'. The shard buffer (its gradients
  // are spent) carries this rank's part, as an all-gather's input must not overlap its output.
  void after_update(int64_t, bool) override {
    if (chunk_ == 0) return;
    const std::span<float> params = model_.trainable().params;
    std::copy_n(params.data() + rank_ * chunk_, chunk_, shard_grads_.data());
    dp_.communicator().all_gather(std::span<const float>(shard_grads_.data(), static_cast<size_t>(chunk_)),
                                  params.first(static_cast<size_t>(chunk_ * world_)),
                                  comm::Options{.name = "weight shards"});
    bytes_ += comm::ring_all_gather_bytes(chunk_ * kFloat, world_);
  }

  void gather_owned(std::span<const float> owned, std::span<float> whole) override {
    check_sizes(owned, whole);
    if (chunk_ > 0)
      dp_.communicator().all_gather(owned.first(static_cast<size_t>(chunk_)),
                                    whole.first(static_cast<size_t>(chunk_ * world_)),
                                    comm::Options{.name = "optimizer shards"});
    std::copy(owned.begin() + chunk_, owned.end(), whole.begin() + chunk_ * world_);
  }

  void take_owned(std::span<const float> whole, std::span<float> owned) const override {
    check_sizes(owned, whole);
    std::copy_n(whole.begin() + rank_ * chunk_, chunk_, owned.begin());
    std::copy_n(whole.begin() + chunk_ * world_, tail_, owned.begin() + chunk_);
  }

  int64_t bytes_sent() const override { return bytes_; }
  int64_t exchanges() const override { return exchanges_; }

 private:
  void check_sizes(std::span<const float> owned, std::span<const float> whole) const {
    if (static_cast<int64_t>(owned.size()) != chunk_ + tail_ || static_cast<int64_t>(whole.size()) != arena_)
      throw Error("parallel/zero", fmt::format("a shard of {} floats and a whole of {} were given; this rank owns {} "
                                               "of {}",
                                               owned.size(), whole.size(), chunk_ + tail_, arena_));
  }

  DataParallel& dp_;
  const int stage_;
  const int64_t arena_;   // P: floats in the trainable arena
  const int64_t world_;   // N
  const int64_t rank_;
  const int64_t chunk_;   // c = floor(P / N): each rank's shard
  const int64_t tail_;    // P - N c: owned by every rank
  Buffer<float> shard_grads_;  // (c + tail): this rank's summed gradients; all-gather scratch
  bool released_ = false;
  int64_t bytes_ = 0, exchanges_ = 0;
};

}  // namespace

std::unique_ptr<GradientSync> make_zero_sync(model::Llama& model, DataParallel& dp, int stage) {
  if (stage < 1 || stage > 2) throw InputError("parallel", fmt::format("--zero {}: stages 1 and 2 are built", stage));
  return std::make_unique<ZeroSync>(model, dp, stage);
}

}  // namespace flotilla::parallel
