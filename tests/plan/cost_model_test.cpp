// The cost model on a config small enough to count by hand: ModelConfig's defaults
// (vocab 256, dim 64, 2 layers of 4 heads of 16, ffn 128, untied embeddings).
//
//   embed 256*64 = 16384, lm_head 16384, final norm 64,
//   per layer: 4 attention matrices 4*4096 + 3 MLP matrices 3*8192 + 2 norms 2*64 = 41088
//   total 16384 + 16384 + 64 + 2 * 41088 = 115008 floats, every tensor 16-float aligned.
#include <gtest/gtest.h>

#include <cmath>

#include "flotilla/comm/algorithms/host_shm.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/plan/flops.hpp"
#include "flotilla/plan/scaling.hpp"
#include "flotilla/plan/strategy.hpp"
#include "flotilla/plan/workload.hpp"

namespace flotilla::plan {
namespace {

constexpr int64_t kFloats = 115008;

Workload small_full() { return describe_workload(model::ModelConfig{}, false, {}, 2, 16, 1); }

Strategy find(StrategyKind kind, const Workload& w, int accumulate = 4) {
  for (const Strategy& s : all_strategies(StrategyKnobs{}, w, accumulate))
    if (s.kind == kind) return s;
  throw std::runtime_error("missing strategy");
}

TEST(Workload, CountsTheConfigByHand) {
  const Workload w = small_full();
  EXPECT_EQ(model::ModelConfig{}.num_params(), kFloats);
  EXPECT_EQ(w.model_floats, kFloats);
  EXPECT_EQ(w.trainable_floats, kFloats);
  EXPECT_EQ(w.trainable_matrices.size(), 2u + 2u * 7u);
  EXPECT_EQ(w.trainable_vector_floats, 5 * 64);          // 2 norms per layer + the final norm
  EXPECT_EQ(w.largest_layer_floats, 41088);               // a block beats the 16384-float embedding
  model::Llama llama(model::ModelConfig{});
  EXPECT_EQ(w.activation_bytes, llama.activation_bytes(2, 16));
}

// plan --grad-checkpoint: the memory the checkpointed model plans, and the recomputed
// forward of one block (the last is not recomputed): 2 * (4*4096 + 3*8192) matmul FLOPs +
// 4 * 4 heads * 16 dims * T=16 for attention = 81920 + 4096 per token.
TEST(Workload, GradCheckpointPlansLessMemoryAndOneMoreBlockForward) {
  const Workload w = describe_workload(model::ModelConfig{}, false, {}, 2, 16, 1, true);
  EXPECT_TRUE(w.grad_checkpoint);
  model::Llama llama(model::ModelConfig{});
  llama.set_grad_checkpoint(true);
  EXPECT_EQ(w.activation_bytes, llama.activation_bytes(2, 16));
  EXPECT_LT(w.activation_bytes, small_full().activation_bytes);
  EXPECT_DOUBLE_EQ(recompute_flops_per_token(model::ModelConfig{}, 16), 81920.0 + 4096.0);
}

TEST(Workload, LoraTrainsOnlyTheAdapters) {
  model::LoraConfig lc;  // rank 8 on q and v of both layers
  const Workload w = describe_workload(model::ModelConfig{}, true, lc, 2, 16, 1);
  // Per adapted layer A (8, 64) + B (64, 8) = 1024 floats; 2 targets x 2 layers.
  EXPECT_EQ(w.trainable_floats, 4096);
  EXPECT_EQ(w.model_floats, kFloats);
}

TEST(Strategy, BytesPerStepByHand) {
  const Workload w = small_full();
  const Link fast{1e9, 0.0, ""};
  EXPECT_DOUBLE_EQ(comm_cost(find(StrategyKind::all_reduce, w), w, 2, fast).payload_bytes, 4.0 * kFloats);
  EXPECT_DOUBLE_EQ(comm_cost(find(StrategyKind::fp16, w), w, 2, fast).payload_bytes, 2.0 * kFloats);
  // top-k 1%: 1150.08 entries of a float value and an int32 index.
  EXPECT_NEAR(comm_cost(find(StrategyKind::topk, w), w, 2, fast).payload_bytes, 8 * 1150.08, 1e-6);
  // PowerSGD r=4: rows sum 2*256 + 2*(4*64 + 128 + 128 + 64) = 1664, columns 2*64 + 2*(4*64 + 64 + 64 + 128)
  // = 1152; 320 norm floats as they are: 4 * (320 + 4*1664 + 4*1152) bytes.
  EXPECT_DOUBLE_EQ(comm_cost(find(StrategyKind::powersgd, w), w, 2, fast).payload_bytes, 4.0 * (320 + 6656 + 4608));
  // Two ranks, no latency: each sends the payload once, plus the 16-byte loss.
  const CommCost plain = comm_cost(find(StrategyKind::all_reduce, w), w, 2, fast);
  EXPECT_DOUBLE_EQ(plain.wire_bytes, 4.0 * kFloats + 16);
  EXPECT_NEAR(plain.seconds, (4.0 * kFloats + 16) / 1e9, 1e-15);
  // Accumulating over 4 micro-batches and local SGD every 8 steps: a quarter, an eighth.
  EXPECT_NEAR(comm_cost(find(StrategyKind::accumulate, w), w, 2, fast).seconds, plain.seconds / 4, 1e-15);
  EXPECT_NEAR(comm_cost(find(StrategyKind::local_sgd, w), w, 2, fast).seconds, plain.seconds / 8, 1e-15);
  // ZeRO-1/2 move an all-reduce's bytes (a reduce-scatter and an all-gather, 3/4 of 4G
  // each on 4 ranks), plus the 8-byte gradient norm; ZeRO-3 half as much again. (ZeRO-2
  // reduce-scatters every micro-batch: ZeroTwoReducesEveryMicroBatch.)
  const double norm = 2 * 0.75 * 8, loss4 = 2 * 0.75 * 16;
  for (const StrategyKind k : {StrategyKind::zero1, StrategyKind::zero2}) {
    const CommCost z = comm_cost(find(k, w), w, 4, fast);
    EXPECT_DOUBLE_EQ(z.payload_bytes, 4.0 * kFloats);
    EXPECT_NEAR(z.wire_bytes, 2 * 0.75 * 4.0 * kFloats + norm + loss4, 1e-6);
    EXPECT_NEAR(z.wire_bytes - norm, comm_cost(find(StrategyKind::all_reduce, w), w, 4, fast).wire_bytes, 1e-6);
  }
  EXPECT_NEAR(comm_cost(find(StrategyKind::zero3, w), w, 4, fast).wire_bytes, 3 * 0.75 * 4.0 * kFloats + norm + loss4,
              1e-6);
  // ZeRO-3 with LoRA gathers the frozen base twice and all-reduces the 4096 adapter floats.
  const Workload lora = describe_workload(model::ModelConfig{}, true, {}, 2, 16, 1);
  EXPECT_NEAR(comm_cost(find(StrategyKind::zero3, lora), lora, 4, fast).wire_bytes,
              0.75 * 4.0 * (2 * kFloats + 2 * 4096) + loss4, 1e-6);
}

TEST(Strategy, ZeroTwoReducesEveryMicroBatch) {
  const Workload w = describe_workload(model::ModelConfig{}, false, {}, 2, 16, 4);  // --grad-accum 4
  const Link fast{1e9, 0.0, ""};
  const double f = 0.5, G4 = 4.0 * kFloats, small = 2 * 0.5 * (8 + 16);
  EXPECT_NEAR(comm_cost(find(StrategyKind::zero1, w), w, 2, fast).wire_bytes, 2 * f * G4 + small, 1e-6);
  EXPECT_NEAR(comm_cost(find(StrategyKind::zero2, w), w, 2, fast).wire_bytes, (4 + 1) * f * G4 + small, 1e-6);
}

TEST(Strategy, NarrowDtypesShrinkTopKAndPowerSgdByHand) {
  const Workload w = small_full();
  const Link fast{1e9, 0.0, ""};
  const auto payload = [&](StrategyKind kind, double density, comm::WireDtype dtype) {
    StrategyKnobs knobs;
    knobs.topk_density = density;
    knobs.compression_dtype = dtype;
    for (const Strategy& s : all_strategies(knobs, w, 4))
      if (s.kind == kind) return comm_cost(s, w, 2, fast).payload_bytes;
    throw std::runtime_error("missing strategy");
  };
  const double k1 = 0.01 * kFloats, k50 = 0.5 * kFloats;
  // top-k, halves: offset words (4 bytes) at 1%; at 50% a bitmap (1/8 byte an element, 1/4
  // an entry) and a half. int8: 16-bit offsets at 1% (2 bytes), the bitmap at 50%, then a
  // byte and 1/64 of a float scale.
  EXPECT_NEAR(payload(StrategyKind::topk, 0.01, comm::WireDtype::bf16), 4 * k1, 1e-6);
  EXPECT_NEAR(payload(StrategyKind::topk, 0.5, comm::WireDtype::bf16), 2.25 * k50, 1e-6);
  EXPECT_NEAR(payload(StrategyKind::topk, 0.01, comm::WireDtype::int8), (2 + 1.0625) * k1, 1e-6);
  EXPECT_NEAR(payload(StrategyKind::topk, 0.5, comm::WireDtype::int8), (0.25 + 1.0625) * k50, 1e-6);
  // PowerSGD r=4 (the floats of BytesPerStepByHand): 2 bytes a value in halves, 1 + 1/16 in int8.
  const double floats = 320 + 6656 + 4608;
  EXPECT_DOUBLE_EQ(payload(StrategyKind::powersgd, 0.01, comm::WireDtype::fp16), 2 * floats);
  EXPECT_DOUBLE_EQ(payload(StrategyKind::powersgd, 0.01, comm::WireDtype::int8), 1.0625 * floats);
  // What to add to flotilla train names the dtype.
  StrategyKnobs knobs;
  knobs.compression_dtype = comm::WireDtype::int8;
  for (const Strategy& s : all_strategies(knobs, w, 4))
    if (s.kind == StrategyKind::topk || s.kind == StrategyKind::powersgd)
      EXPECT_NE(s.train_flags.find("--compression-dtype int8"), std::string::npos) << s.train_flags;
}

TEST(Strategy, LatencyCountsPerCollective) {
  const Workload w = small_full();
  const Link slow{1e30, 1e-3, ""};  // bandwidth out of the picture
  // all-reduce of the gradients + the loss: 2 * 2(n-1) latencies.
  EXPECT_NEAR(comm_cost(find(StrategyKind::all_reduce, w), w, 4, slow).seconds, 2 * 6 * 1e-3, 1e-12);
  // ZeRO-1/2: a reduce-scatter and an all-gather of (n-1) steps each, the norm and the loss.
  EXPECT_NEAR(comm_cost(find(StrategyKind::zero1, w), w, 4, slow).seconds, 2 * 3 * 1e-3 + 2 * 6e-3, 1e-12);
  // ZeRO-3: 3 collectives of (n-1) steps per layer, plus the norm and the loss.
  EXPECT_NEAR(comm_cost(find(StrategyKind::zero3, w), w, 4, slow).seconds, 3 * 2 * 3 * 1e-3 + 2 * 6e-3, 1e-12);
}

TEST(Strategy, HierarchicalReducesInsideHostsFirst) {
  const Workload w = small_full();
  Cluster c;
  c.hosts = 2;
  c.slots = 4;
  c.local = {10e9, 0.0, ""};
  c.network = {1e9, 0.0, ""};
  const double P = 4.0 * kFloats + 16;  // gradients and the loss
  // 8 ranks, 4 per host: 2*3/4 P over shared memory, then 2*1/2 P over the network.
  const CommCost hier = comm_cost(find(StrategyKind::hierarchical, w), w, 8, c);
  EXPECT_NEAR(hier.seconds, 1.5 * P / 10e9 + 1.0 * P / 1e9, 1e-12);
  // The flat ring pays 2*7/8 P at the network's speed.
  const CommCost flat = comm_cost(find(StrategyKind::all_reduce, w), w, 8, c);
  EXPECT_NEAR(flat.seconds, 1.75 * P / 1e9, 1e-12);
  // Inside one host, or one rank per host, the two are the same ring.
  EXPECT_DOUBLE_EQ(comm_cost(find(StrategyKind::hierarchical, w), w, 4, c).seconds,
                   comm_cost(find(StrategyKind::all_reduce, w), w, 4, c).seconds);
  c.slots = 1;
  EXPECT_DOUBLE_EQ(comm_cost(find(StrategyKind::hierarchical, w), w, 2, c).seconds,
                   comm_cost(find(StrategyKind::all_reduce, w), w, 2, c).seconds);
}

TEST(Memory, TotalsByHand) {
  const Workload w = small_full();
  const double act = static_cast<double>(w.activation_bytes);
  const MemoryCost one = memory_cost(find(StrategyKind::all_reduce, w), w, 1);
  EXPECT_DOUBLE_EQ(one.weights, 4.0 * kFloats);
  EXPECT_DOUBLE_EQ(one.grads, 4.0 * kFloats);
  EXPECT_DOUBLE_EQ(one.optimizer, 8.0 * kFloats);
  EXPECT_DOUBLE_EQ(one.buffers, 0.0);
  EXPECT_DOUBLE_EQ(one.steady(), 16.0 * kFloats + act);
  EXPECT_DOUBLE_EQ(one.peak(), one.steady());
  // ZeRO-3 on 4 ranks: weights, gradients and moments in quarters (115008 = 4 x 28752, no
  // tail); its groups are the 16384-float embedding, two blocks of 41088 and the head (a
  // 64-float norm and the 16384-float lm_head, 16-float aligned). The weights gathered at
  // once are the two blocks, of which 3/4 are other ranks' chunks; so are the gradients
  // backward holds before their reduce-scatter.
  EXPECT_EQ(w.zero3_group_floats, (std::vector<int64_t>{16384, 41088, 41088, 16448}));
  const MemoryCost z3 = memory_cost(find(StrategyKind::zero3, w), w, 4);
  EXPECT_DOUBLE_EQ(z3.weights, kFloats + 0.75 * 4 * 2 * 41088);
  EXPECT_DOUBLE_EQ(z3.grads, kFloats);
  EXPECT_DOUBLE_EQ(z3.grads_in_backward, kFloats + 4 * 2 * 41088);
  EXPECT_DOUBLE_EQ(z3.optimizer, 2.0 * kFloats);
  EXPECT_DOUBLE_EQ(z3.buffers, 2 * (1 << 20));
  // Tied: the embedding is gathered with the last block and the head, and its gradient is
  // whole through backward.
  model::ModelConfig tied_cfg;
  tied_cfg.tie_embeddings = true;
  const Workload tied = describe_workload(tied_cfg, false, {}, 2, 16, 1);
  const MemoryCost t3 = memory_cost(find(StrategyKind::zero3, tied), tied, 4);
  const double tied_floats = static_cast<double>(tied.model_floats);
  const double tied_shard = zero_shard_floats(tied.model_floats, 4);
  // (the head is the 64-float norm alone; the two blocks still outweigh embedding + block + head)
  EXPECT_DOUBLE_EQ(t3.weights, 4 * tied_shard + 0.75 * 4 * std::max(2 * 41088, 16384 + 41088 + 64));
  EXPECT_DOUBLE_EQ(t3.grads_in_backward, 4 * tied_shard + 4 * (2 * 41088 + 16384));
  EXPECT_LT(tied_floats, kFloats);
}

// Ranks sharing a host share a memory arena (comm/algorithms/host_shm.hpp), and a rank's
// resident memory counts the part of it the rank touches: on one host ZeRO's scatter slots
// (2 MiB a rank of the host; measured 4.0 / 8.0 MiB per ZeRO-3 rank at 2 / 4 ranks, W1),
// the all-reduce slots for the rest (at the leader 0.5 MiB a rank: measured 1.0 / 2.0 MiB).
// Nothing for a rank alone on its host, and ZeRO across hosts takes the ring (no arena).
TEST(Memory, RanksSharingAHostPayForTheArenaTheyTouch) {
  const Workload w = small_full();
  const double MiB = 1 << 20;
  const auto extra = [&](StrategyKind k, int n, int per_host, int hosts) {
    return memory_cost(find(k, w), w, n, per_host, hosts).buffers - memory_cost(find(k, w), w, n).buffers;
  };
  for (const StrategyKind k : {StrategyKind::zero1, StrategyKind::zero2, StrategyKind::zero3}) {
    EXPECT_DOUBLE_EQ(extra(k, 2, 2, 1), 4 * MiB);
    EXPECT_DOUBLE_EQ(extra(k, 4, 4, 1), 8 * MiB);
    EXPECT_DOUBLE_EQ(extra(k, 4, 2, 2), 0.0);
    EXPECT_DOUBLE_EQ(extra(k, 2, 1, 2), 0.0);
  }
  EXPECT_DOUBLE_EQ(extra(StrategyKind::all_reduce, 2, 2, 1), 1 * MiB);
  EXPECT_DOUBLE_EQ(extra(StrategyKind::all_reduce, 4, 4, 1), 2 * MiB);
  EXPECT_DOUBLE_EQ(extra(StrategyKind::hierarchical, 8, 4, 2), 2 * MiB);
  EXPECT_DOUBLE_EQ(extra(StrategyKind::all_reduce, 4, 1, 4), 0.0);
  // One rank alone: no exchange, no arena.
  EXPECT_DOUBLE_EQ(extra(StrategyKind::zero3, 1, 1, 1), 0.0);
  // The arena's own size: what every rank maps (what is touched is within it); each rank
  // of the host adds two 256 KiB slots and two 1 MiB scatter slots.
  EXPECT_EQ(comm::HostShm::arena_bytes(3) - comm::HostShm::arena_bytes(2), 2 * (256u << 10) + 2 * (1u << 20));
  EXPECT_LE(comm::HostShm::scatter_bytes(4) + comm::HostShm::all_reduce_bytes(4), comm::HostShm::arena_bytes(4));
}

// The per-rank model state, Ψ = 115008 floats, on n ranks: plain 16Ψ, ZeRO-1
// 8Ψ + 8Ψ/n, ZeRO-2 4Ψ + 12Ψ/n between steps, ZeRO-3 16Ψ/n; and next to it what
// flotilla's ZeRO adds: ZeRO-1's reduced shard (4Ψ/n; ZeRO-2's is its gradient) and the
// exchange's 2 MiB of segments; the reduce-scatter itself runs in place.
TEST(Memory, ZeroStagesFollowTheFormulas) {
  const Workload w = small_full();
  const double P = kFloats, scratch = 2 * (1 << 20);
  ASSERT_DOUBLE_EQ(zero_unit_floats(w), P);
  const auto state = [](const MemoryCost& m) { return m.weights + m.grads + m.optimizer; };
  for (const int n : {2, 4}) {
    SCOPED_TRACE(n);
    EXPECT_DOUBLE_EQ(state(memory_cost(find(StrategyKind::all_reduce, w), w, n)), 16 * P);
    EXPECT_DOUBLE_EQ(memory_cost(find(StrategyKind::all_reduce, w), w, n).buffers, scratch);
    const MemoryCost z1 = memory_cost(find(StrategyKind::zero1, w), w, n);
    EXPECT_DOUBLE_EQ(state(z1), 8 * P + 8 * P / n);
    EXPECT_DOUBLE_EQ(z1.buffers, 4 * P / n + scratch);
    EXPECT_DOUBLE_EQ(z1.peak(), z1.steady());
    const MemoryCost z2 = memory_cost(find(StrategyKind::zero2, w), w, n);
    EXPECT_DOUBLE_EQ(state(z2), 4 * P + 12 * P / n);
    EXPECT_DOUBLE_EQ(z2.buffers, scratch);
    // Backward holds the units not yet reduced; here one unit is the whole arena, so
    // ZeRO-2's peak is ZeRO-1's.
    EXPECT_DOUBLE_EQ(z2.grads_in_backward, 4 * P + 4 * P / n);
    EXPECT_DOUBLE_EQ(z2.peak(), z1.peak());
    EXPECT_DOUBLE_EQ(z1.steady() - z2.steady(), 4 * P);
    // ZeRO-3: 16Ψ/n, and the other ranks' chunks of the two blocks gathered at once.
    EXPECT_DOUBLE_EQ(state(memory_cost(find(StrategyKind::zero3, w), w, n)),
                     16 * P / n + (n - 1.0) / n * 4 * 2 * 41088);
  }
  // One rank alone under ZeRO holds what plain training does: nothing to exchange.
  EXPECT_DOUBLE_EQ(memory_cost(find(StrategyKind::zero1, w), w, 1).peak(),
                   memory_cost(find(StrategyKind::all_reduce, w), w, 1).peak());
  EXPECT_DOUBLE_EQ(memory_cost(find(StrategyKind::zero2, w), w, 1).steady(),
                   memory_cost(find(StrategyKind::all_reduce, w), w, 1).steady());
}

// A unit is a fusion bucket of --bucket-mb, a larger tensor alone (the 16384-float
// embedding), or the whole arena without buckets; ZeRO-2's units in flight follow it.
TEST(Memory, ZeroUnitsFollowTheBuckets) {
  Workload w = small_full();
  EXPECT_EQ(w.largest_trainable_floats, 16384);
  w.bucket_mb = 0.01;  // 2621 floats: the embedding is larger
  EXPECT_DOUBLE_EQ(zero_unit_floats(w), 16384);
  w.bucket_mb = 0.1;  // 26214.4 floats
  EXPECT_DOUBLE_EQ(zero_unit_floats(w), 0.1 * (1 << 20) / 4);
  // ZeRO-2 during backward: its shard and two units in flight, below ZeRO-1's peak.
  const MemoryCost z2 = memory_cost(find(StrategyKind::zero2, w), w, 2);
  EXPECT_DOUBLE_EQ(z2.grads_in_backward, 4 * (kFloats / 2) + 2 * 4 * (0.1 * (1 << 20) / 4));
  EXPECT_LT(z2.peak(), memory_cost(find(StrategyKind::zero1, w), w, 2).peak());
  w.bucket_mb = 0;
  EXPECT_DOUBLE_EQ(zero_unit_floats(w), kFloats);
  EXPECT_DOUBLE_EQ(memory_cost(find(StrategyKind::zero2, w), w, 2).peak(),
                   memory_cost(find(StrategyKind::zero1, w), w, 2).peak());
}

// 115008 floats over 5 ranks: chunks of 23001 and a tail of 3 that every rank keeps.
TEST(Memory, ZeroShardKeepsTheTail) {
  EXPECT_DOUBLE_EQ(zero_shard_floats(kFloats, 5), 23001 + 3);
  EXPECT_DOUBLE_EQ(zero_shard_floats(kFloats, 1), kFloats);
  EXPECT_DOUBLE_EQ(zero_shard_floats(10, 3), 3 + 1);
  const Workload w = small_full();
  EXPECT_DOUBLE_EQ(memory_cost(find(StrategyKind::zero1, w), w, 5).optimizer, 8.0 * (23001 + 3));
  EXPECT_DOUBLE_EQ(memory_cost(find(StrategyKind::zero2, w), w, 5).grads, 4.0 * (23001 + 3));
}

TEST(Strategy, ZeroStagesRunToday) {
  const Workload w = small_full();
  EXPECT_TRUE(find(StrategyKind::zero1, w).available);
  EXPECT_EQ(find(StrategyKind::zero1, w).train_flags, "--zero 1");
  EXPECT_TRUE(find(StrategyKind::zero2, w).available);
  EXPECT_EQ(find(StrategyKind::zero2, w).train_flags, "--zero 2");
  EXPECT_TRUE(find(StrategyKind::zero3, w).available);
  EXPECT_EQ(find(StrategyKind::zero3, w).train_flags, "--zero 3");
  Workload lora = describe_workload(model::ModelConfig{}, true, {}, 2, 16, 1);
  EXPECT_TRUE(find(StrategyKind::zero3, lora).available);
  model::ModelConfig q4;
  q4.quantization = model::QuantizationConfig{};  // a packed base: its words sharded
  EXPECT_TRUE(find(StrategyKind::zero3, describe_workload(q4, true, {}, 2, 16, 1)).available);
}

// A 4-bit base (group 64, f16 scales and biases) costs 9/64 of a word per quantized weight:
// n/8 packed words and n/64 of scales and biases (Llama::packed_places); its norms stay
// float. Per block 40960 quantized weights (q, k, v, o 64x64; gate, up, down 128x64) and 128
// norm floats: 5888 words; the embedding 2304; the head 2304 + 64. ZeRO-3 with LoRA shards
// these words.
TEST(Memory, FourBitBaseCountsItsPackedWords) {
  model::ModelConfig q4;
  q4.quantization = model::QuantizationConfig{};
  const Workload w = describe_workload(q4, true, {}, 2, 16, 1);
  EXPECT_EQ(w.model_floats, 16448);
  EXPECT_EQ(w.zero3_group_floats, (std::vector<int64_t>{2304, 5888, 5888, 2368}));
  const MemoryCost m = memory_cost(find(StrategyKind::zero3, w), w, 4);
  EXPECT_DOUBLE_EQ(m.weights, 4 * (16448.0 / 4 + 3.0 / 4 * 2 * 5888 + 4096));
}

TEST(Memory, LoraHasNoBaseGradientsOrMoments) {
  const Workload w = describe_workload(model::ModelConfig{}, true, {}, 2, 16, 1);
  const MemoryCost m = memory_cost(find(StrategyKind::all_reduce, w), w, 1);
  EXPECT_DOUBLE_EQ(m.weights, 4.0 * (kFloats + 4096));
  EXPECT_DOUBLE_EQ(m.grads, 4.0 * 4096);
  EXPECT_DOUBLE_EQ(m.optimizer, 8.0 * 4096);
}

// ZeRO-3 with LoRA: the frozen base's shard and the other ranks' chunks of the two blocks
// gathered at once; the 4096 adapter floats whole, with their gradients and moments.
TEST(Memory, ZeroThreeWithLoraShardsOnlyTheBase) {
  const Workload w = describe_workload(model::ModelConfig{}, true, {}, 2, 16, 1);
  const double P = kFloats;
  for (const int n : {2, 4}) {
    SCOPED_TRACE(n);
    const MemoryCost m = memory_cost(find(StrategyKind::zero3, w), w, n);
    EXPECT_DOUBLE_EQ(m.weights, 4 * (P / n + (n - 1.0) / n * 2 * 41088 + 4096));
    EXPECT_DOUBLE_EQ(m.grads, 4.0 * 4096);
    EXPECT_DOUBLE_EQ(m.grads_in_backward, 4.0 * 4096);
    EXPECT_DOUBLE_EQ(m.optimizer, 8.0 * 4096);
  }
}

TEST(Amdahl, ClosedForms) {
  EXPECT_DOUBLE_EQ(amdahl_speedup(0.0, 8), 8.0);
  EXPECT_DOUBLE_EQ(amdahl_speedup(1.0, 8), 1.0);
  EXPECT_NEAR(amdahl_speedup(0.1, 10), 1.0 / 0.19, 1e-12);
  // The bound: 1/s however many ranks.
  EXPECT_LT(amdahl_speedup(0.05, 1000000), 20.0);
  EXPECT_GT(amdahl_speedup(0.05, 1000000), 19.99);
  EXPECT_DOUBLE_EQ(strong_speedup(0.1, 10, 0.0), amdahl_speedup(0.1, 10));
  EXPECT_NEAR(strong_speedup(0.1, 10, 0.05), 1.0 / 0.24, 1e-12);
}

TEST(Scaling, WeakScalingByHand) {
  const Workload w = small_full();
  StepCost cost;
  cost.compute_s = 1.0;
  cost.update_s = 0.1;
  Cluster c;
  c.hosts = 4;
  c.cores = 8;
  c.network = {1e9, 0.0, ""};
  const Strategy plain = find(StrategyKind::all_reduce, w);
  const Prediction one = predict_weak(plain, w, cost, c, 1);
  EXPECT_DOUBLE_EQ(one.step_s, 1.1);
  EXPECT_DOUBLE_EQ(one.speedup, 1.0);
  const Prediction two = predict_weak(plain, w, cost, c, 2);
  const double comm = (4.0 * kFloats + 16) / 1e9;
  EXPECT_NEAR(two.step_s, 1.1 + comm, 1e-12);
  EXPECT_NEAR(two.speedup, 2 * 1.1 / (1.1 + comm), 1e-12);
  EXPECT_NEAR(two.efficiency, 1.1 / (1.1 + comm), 1e-12);
  // Strong scaling: compute splits, the optimizer does not.
  const Prediction strong = predict_strong(plain, w, cost, c, 2);
  EXPECT_NEAR(strong.step_s, 0.5 + 0.1 + comm, 1e-12);
  EXPECT_NEAR(strong.speedup, strong_speedup(serial_fraction(cost), 2, comm / 1.1), 1e-12);
  // ZeRO shards the optimizer update.
  EXPECT_NEAR(predict_weak(find(StrategyKind::zero1, w), w, cost, c, 2).serial_s, 0.05, 1e-12);
}

TEST(Scaling, RanksSharingCoresSlowDown) {
  Cluster c;
  c.hosts = 1;
  c.slots = 4;
  c.cores = 2;
  EXPECT_DOUBLE_EQ(oversubscription(c, 1, 1), 1.0);
  EXPECT_DOUBLE_EQ(oversubscription(c, 2, 1), 1.0);
  EXPECT_DOUBLE_EQ(oversubscription(c, 4, 1), 2.0);
  EXPECT_DOUBLE_EQ(oversubscription(c, 2, 2), 2.0);
  // Emulated hosts (namespaces of one machine): ranks on every host share its cores.
  Cluster emulated;
  emulated.hosts = 4;
  emulated.slots = 1;
  emulated.cores = 2;
  EXPECT_DOUBLE_EQ(oversubscription(emulated, 4, 1), 1.0);
  emulated.one_machine = true;
  EXPECT_DOUBLE_EQ(oversubscription(emulated, 2, 1), 1.0);
  EXPECT_DOUBLE_EQ(oversubscription(emulated, 4, 1), 2.0);
  // Ranks fill hosts in order; a ring that spans hosts runs at the network's speed.
  c.hosts = 3;
  c.slots = 2;
  c.local.bandwidth_bytes_per_s = 5e9;
  c.network.bandwidth_bytes_per_s = 1e8;
  EXPECT_EQ(c.hosts_used(2), 1);
  EXPECT_EQ(c.hosts_used(5), 3);
  EXPECT_EQ(c.link_for(2).bandwidth_bytes_per_s, 5e9);
  EXPECT_EQ(c.link_for(3).bandwidth_bytes_per_s, 1e8);
}

TEST(Scaling, StragglersAreTheMedianOfTheSlowestOfN) {
  std::vector<double> samples;
  for (int i = 100; i >= 0; --i) samples.push_back(i);  // 0..100, any order
  EXPECT_EQ(straggler_wait_s(samples, 1), 0.0);
  // The slowest of 2 has median at the 1/sqrt(2) quantile: 70.71 against the median 50.
  EXPECT_NEAR(straggler_wait_s(samples, 2), 100 * std::sqrt(0.5) - 50, 1e-9);
  EXPECT_NEAR(straggler_wait_s(samples, 4), 100 * std::pow(0.5, 0.25) - 50, 1e-9);
  // Capped at the slowest sample; no spread, no wait.
  EXPECT_LE(straggler_wait_s(samples, 1000000), 50.0);
  EXPECT_EQ(straggler_wait_s(std::vector<double>(10, 3.0), 8), 0.0);
  // It enters the step: a rank that waits for others' slow steps.
  const Workload w = small_full();
  StepCost cost;
  cost.compute_s = 1.0;
  cost.work_samples_s = {0.9, 1.0, 1.1};
  Cluster c;
  c.hosts = 2;
  c.cores = 8;
  c.network = {1e30, 0.0, ""};
  const Prediction two = predict_weak(find(StrategyKind::all_reduce, w), w, cost, c, 2);
  EXPECT_NEAR(two.wait_s, straggler_wait_s(cost.work_samples_s, 2), 1e-12);
  EXPECT_NEAR(two.step_s, 1.0 + two.wait_s, 1e-9);
}

TEST(Scaling, ContentionAppliesOnlyToRanksSharingAHost) {
  const Workload w = small_full();
  StepCost cost;
  cost.compute_s = 1.0;
  cost.contention = 1.2;
  cost.contention_ranks = 2;
  Cluster c;
  c.hosts = 2;
  c.slots = 2;
  c.cores = 2;
  c.network = c.local = {1e30, 0.0, ""};
  const Strategy plain = find(StrategyKind::all_reduce, w);
  EXPECT_NEAR(predict_weak(plain, w, cost, c, 2).compute_s, 1.2, 1e-12);  // 2 ranks on host 1
  c.slots = 1;
  EXPECT_NEAR(predict_weak(plain, w, cost, c, 2).compute_s, 1.0, 1e-12);  // one rank per host
}

TEST(Scaling, AccumulationIsPickedToHideTheExchange) {
  const Workload w = small_full();
  StepCost cost;
  cost.compute_s = 1e-3;
  Cluster c;
  c.hosts = 2;
  c.network = {(4.0 * kFloats) / 5e-3, 0.0, ""};  // the all-reduce takes ~5 ms, 5 steps' compute
  // 5 ms / K <= 0.1 ms needs K = 64 (the cap); at 10x the bandwidth, K = 8 (0.5 ms / 8 < 0.1 ms).
  EXPECT_EQ(pick_accumulation(w, cost, c, 2), 64);
  c.network.bandwidth_bytes_per_s *= 10;
  EXPECT_EQ(pick_accumulation(w, cost, c, 2), 8);
}

TEST(Flops, SixNPerTokenPlusAttention) {
  const model::ModelConfig c;
  // Matmul parameters: 2 * (4*4096 + 3*8192) + 256*64 (lm_head) = 98304; attention 12*2*4*16*T.
  EXPECT_DOUBLE_EQ(flops_per_token(c, 16), 6.0 * 98304 + 12.0 * 2 * 4 * 16 * 16);
  EXPECT_LT(lora_flops_per_token(c, 16, 4096), flops_per_token(c, 16));
}

TEST(Flops, SgemmRateIsPositive) {
  const SgemmRate r = measure_sgemm({{64, 64, 64}, {128, 32, 64}}, 2);
  ASSERT_EQ(r.per_shape.size(), 2u);
  EXPECT_GT(r.best_gflops, 0.0);
}

TEST(Scaling, TableRanks) {
  EXPECT_EQ(table_ranks(1), std::vector<int>({1}));
  EXPECT_EQ(table_ranks(4), std::vector<int>({1, 2, 3, 4}));
  EXPECT_EQ(table_ranks(100), std::vector<int>({1, 2, 4, 8, 16, 32, 64, 100}));
}

}  // namespace
}  // namespace flotilla::plan
