// The ways flotilla can spread a workload over n ranks, and what each costs per rank:
// bytes exchanged, time on the link, replicated (serial) work, and memory.
//
// Everything is per *user step*: one optimizer step of the user's own configuration on
// one rank (B x T x A tokens). A strategy that synchronises less often (accumulation over
// more micro-batches, local SGD) is charged its exchange divided by how many user steps
// share it, so every strategy's step time compares with every other's.
//
// Exchanges (payloads in bytes; G = trainable floats, n = ranks; ring costs in link.hpp):
//   all_reduce     gradients, fp32:                 all-reduce of 4G
//   accumulate xK  the same, once per K user steps:  all-reduce of 4G, / K
//   fp16           gradients in fp16 or bf16:        all-reduce of 2G
//   topk           k = density * G values + int32 indices per rank, all-gathered:
//                  all-gather of n * 8k (sparse sums cannot be ring-reduced in place);
//                  with --compression-dtype bf16|fp16 an entry costs min(4, 2 + 1/(8 d))
//                  bytes (offset words or a bitmap), int8 min(2, 1/(8 d)) + 1 + 1/16
//   powersgd r     per matrix (m, c): P (m, r) and Q (c, r), two all-reduces of
//                  4 * sum(m r) + 4 * (1-D floats, sent as they are) and 4 * sum(c r);
//                  a value costs 2 bytes in bf16/fp16, 1 + 1/16 in int8
//   local_sgd H    parameters, fp32, every H steps:   all-reduce of 4G, / H
//   zero1, zero2   reduce-scatter gradients + all-gather parameters = the bytes of an
//                  all-reduce of 4G (the < n floats past the last whole chunk are
//                  all-reduced: the same total); the optimizer update runs on 1/n of the
//                  parameters; the global gradient norm (clipping) is an 8-byte all-reduce
//   zero3          + parameters all-gathered again for backward: 3 (n-1)/n 4G (LoRA: the
//                  frozen base is gathered twice too, only the adapters reduced), and
//                  3 collectives per layer, so 3 L (n-1) latencies
//   hierarchical   the all-reduce of 4G in three stages over S ranks per host and H hosts:
//                  reduce-scatter inside each host (shared memory), an all-reduce of each
//                  4G/S chunk across hosts (S rings side by side, sharing the host's
//                  network link: 2(H-1)/H 4G leave each host), all-gather inside the host:
//                    2(S-1)/S 4G / B_local + 2(S-1) a_local + 2(H-1)/H 4G / B_net + 2(H-1) a_net
//                  where a flat ring over all H S ranks pays 2(HS-1)/(HS) 4G / B_net and
//                  2(HS-1) network latencies
// Every strategy also sums the loss and token count (16 bytes) once per optimizer step.
//
// Memory (memory_cost), per rank, Ψ = G trainable floats; ZeRO cuts the arena into units
// (train's fusion buckets, --bucket-mb) and each unit into n chunks plus a tail of fewer
// than n floats that every rank keeps, so a shard is about Ψ/n (parallel/zero.hpp):
//   plain          weights 4Ψ, gradients 4Ψ, AdamW 8Ψ                        = 16Ψ
//   zero1          AdamW for the shard only                                 = 8Ψ + 8Ψ/n
//                  and the buffer the reduce-scatter writes the shard into: + 4Ψ/n
//   zero2          each unit's gradient released once reduced: between steps the
//                  reduced shard is the only gradient                       = 4Ψ + 12Ψ/n
//                  and during backward the units not yet reduced (two of them; the
//                  whole gradient, so zero1's peak, with --bucket-mb 0 or one bucket)
//   zero3          weights too                                              = 16Ψ/n
//                  + the other ranks' chunks ((n-1)/n) of the groups gathered at once:
//                  two adjacent groups (the one computing, the next arriving), and a
//                  tied embedding with the last block and the head; in backward also the
//                  gradients of two adjacent groups not yet reduce-scattered and a tied
//                  embedding's whole gradient (parallel/zero3.hpp). One rank: plain.
// Under --dtype bf16 every strategy's weights add the bf16 copies of the tensors products
// read (2 bytes a float of Workload::bf16_copy_floats; ZeRO-3: of the groups in flight),
// and the buffers add the rounded inputs' scratch (Workload::bf16_scratch_bytes);
// and for every strategy the activations and exchange buffers; where several ranks share a
// host, also the parts of the host's shared-memory arena (comm/algorithms/host_shm.hpp) a
// rank touches: on one host, ZeRO's reduce-scatters and all-gathers go through its
// scatter slots, 2S MiB for S ranks a host; every other strategy's all-reduce through its
// all-reduce slots, S/2 MiB at the leader (measured: 4.0 and 8.0 MiB resident per ZeRO-3
// rank at S = 2 and 4, 1.0 and 2.0 MiB at plain data parallelism's leader).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/comm/compression/gradient_codec.hpp"
#include "flotilla/plan/link.hpp"
#include "flotilla/plan/workload.hpp"

namespace flotilla::plan {

enum class StrategyKind { all_reduce, hierarchical, accumulate, fp16, topk, powersgd, local_sgd, zero1, zero2, zero3 };

struct StrategyKnobs {
  int accumulate = 0;            // K for `accumulate`; 0: the planner picks (see pick_accumulation)
  double topk_density = 0.01;    // share of gradient entries top-k sends
  int powersgd_rank = 4;
  comm::WireDtype compression_dtype = comm::WireDtype::f32;  // top-k's values, PowerSGD's factors
  int local_sgd_every = 8;       // H
};

struct Strategy {
  StrategyKind kind = StrategyKind::all_reduce;
  int factor = 1;           // K (accumulate), H (local SGD), r (PowerSGD); else 1
  double density = 0.0;     // top-k
  bool available = false;   // flotilla train runs it today
  comm::WireDtype dtype = comm::WireDtype::f32;  // top-k, PowerSGD: what values travel as
  std::string name;         // "all-reduce", "accumulate x8", "fp16", "top-k 1%", ...
  std::string train_flags;  // what to add to `flotilla train` ("--grad-accum 8", "--compression fp16")
};

// The strategies, in the order the report lists them. `available` is true for what
// flotilla train runs in this build: all of them.
std::vector<Strategy> all_strategies(const StrategyKnobs& knobs, const Workload& w, int accumulate);

struct CommCost {
  double payload_bytes = 0.0;  // per exchange, the buffer each rank contributes
  double wire_bytes = 0.0;     // per user step, bytes one rank sends
  double seconds = 0.0;        // per user step, on the link
};
CommCost comm_cost(const Strategy& s, const Workload& w, int ranks, const Link& link);
// On a cluster: `hierarchical` uses both links as above; every other strategy runs one
// flat ring at the speed of cluster.link_for(ranks).
CommCost comm_cost(const Strategy& s, const Workload& w, int ranks, const Cluster& cluster);

// The optimizer update a rank runs per user step, as a share of the unsharded update:
// 1/n under ZeRO, 1/K under accumulation, else 1.
double update_share(const Strategy& s, int ranks);

struct MemoryCost {
  // Resident between steps: after the update, before the next forward.
  double weights = 0, grads = 0, optimizer = 0, activations = 0, buffers = 0;
  // The gradients while backward runs. More than `grads` where a strategy releases them
  // after the exchange (ZeRO-2); else equal.
  double grads_in_backward = 0;
  double steady() const { return weights + grads + optimizer + activations + buffers; }
  // The most a rank holds during a step: what has to fit, and what peak RSS measures.
  double peak() const { return steady() - grads + std::max(grads, grads_in_backward); }
};
// Bytes per rank (fp32 weights, gradients and AdamW's two moments; the activation plan;
// communication and compression buffers). Process overhead (code, tokenizer, data) is not
// counted: compare with the measured run's peak RSS.
// `ranks_per_host` ranks on each of `hosts` hosts (the defaults: no arena).
MemoryCost memory_cost(const Strategy& s, const Workload& w, int ranks, int ranks_per_host = 1, int hosts = 1);
// The bytes of the host arena one rank of strategy `s` touches (0 for a rank alone on its host).
double host_arena_bytes(const Strategy& s, int ranks_per_host, int hosts);

// Floats of the flat trainable arena whose gradients and moments one rank keeps under
// ZeRO: its chunk floor(G/n) and the tail G mod n that every rank updates alike (as if the
// arena were one unit: each unit's tail adds fewer than n floats).
double zero_shard_floats(int64_t trainable_floats, int ranks);
// The largest unit ZeRO reduce-scatters at once: a fusion bucket, a larger tensor alone, or
// the whole arena when --bucket-mb is 0.
double zero_unit_floats(const Workload& w);

std::string_view strategy_kind_name(StrategyKind k);  // "all_reduce", "zero3", ...

}  // namespace flotilla::plan
