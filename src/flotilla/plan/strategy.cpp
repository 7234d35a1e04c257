#include "flotilla/plan/strategy.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "flotilla/comm/algorithms/host_shm.hpp"
#include "flotilla/comm/wire_bytes.hpp"

namespace flotilla::plan {
namespace {

constexpr double kLossBytes = 16.0;  // (loss sum, token count) as two doubles
// ZeRO: each rank holds only its shard of the gradient, so the global norm that clipping
// needs is a sum of squares (one double) all-reduced.
constexpr double kNormBytes = 8.0;

// What an exact exchange keeps beside the gradient it reduces in place: the ring's window of
// segments (8 x 256 KiB on one host, 16 x 60 KiB across hosts) and MPI's own buffers
// (comm/algorithms); the host arena's slots are charged apart (host_arena_bytes). Measured
// (bench/zero, W1): two ranks peak 2 MiB above one.
constexpr double kExchangeScratchBytes = 2.0 * (1 << 20);

// ZeRO-2 during backward: the unit backward is writing and the one the communication
// thread is reducing.
constexpr double kZero2UnitsInFlight = 2.0;

// ZeRO-3 (parallel/zero3.hpp): the most floats of other ranks' chunks a rank holds at once,
// as floats of whole groups. Weights: the group computing and the next one arriving (forward
// or backward: adjacent groups), and a tied embedding with the head and the block before
// it. Gradients in backward: the group being written and the one before it, not yet
// reduce-scattered, and a tied embedding's whole gradient, which the head's backward
// writes first and the embedding's backward finishes last.
double zero3_adjacent_peak_floats(const Workload& w) {
  const std::vector<int64_t>& g = w.zero3_group_floats;
  double most = 0.0;
  for (size_t i = 0; i + 1 < g.size(); ++i) most = std::max(most, static_cast<double>(g[i] + g[i + 1]));
  return most;
}
double zero3_gathered_floats(const Workload& w) {
  const std::vector<int64_t>& g = w.zero3_group_floats;
  if (g.size() < 2) return static_cast<double>(w.model_floats);
  double most = zero3_adjacent_peak_floats(w);
  if (w.tied_embeddings && g.size() >= 3)
    most = std::max(most, static_cast<double>(g.front() + g[g.size() - 2] + g.back()));
  return most;
}
double zero3_grads_in_flight_floats(const Workload& w) {
  const std::vector<int64_t>& g = w.zero3_group_floats;
  if (g.size() < 2) return static_cast<double>(w.trainable_floats);
  return zero3_adjacent_peak_floats(w) + (w.tied_embeddings ? static_cast<double>(g.front()) : 0.0);
}

}  // namespace

std::string_view strategy_kind_name(StrategyKind k) {
  switch (k) {
    case StrategyKind::all_reduce: return "all_reduce";
    case StrategyKind::hierarchical: return "hierarchical";
    case StrategyKind::accumulate: return "accumulate";
    case StrategyKind::fp16: return "fp16";
    case StrategyKind::topk: return "topk";
    case StrategyKind::powersgd: return "powersgd";
    case StrategyKind::local_sgd: return "local_sgd";
    case StrategyKind::zero1: return "zero1";
    case StrategyKind::zero2: return "zero2";
    case StrategyKind::zero3: return "zero3";
  }
  return "?";
}

namespace {

// Bytes of one value on the wire (comm/compression/wire_sum.hpp): int8 adds a float scale
// per 64 values.
double value_bytes(comm::WireDtype d) {
  switch (d) {
    case comm::WireDtype::f32: return 4.0;
    case comm::WireDtype::bf16:
    case comm::WireDtype::fp16: return 2.0;
    case comm::WireDtype::int8: return 1.0 + 4.0 / 64.0;
  }
  return 4.0;
}

// Bytes of one top-k entry (topk_codec.cpp): f32 (uint32 index, float); narrower, the
// cheaper of 16-bit offsets and a bitmap of the block (1/8 byte an element, 1/(8 d) an
// entry), plus the value.
double topk_entry_bytes(const Strategy& s) {
  if (s.dtype == comm::WireDtype::f32) return 8.0;
  const double bitmap = 1.0 / (8.0 * std::max(s.density, 1e-12));
  if (s.dtype == comm::WireDtype::int8) return std::min(2.0, bitmap) + value_bytes(s.dtype);
  return std::min(4.0, bitmap + 2.0);  // halves: (offset, half) words, or bitmap + half
}

}  // namespace

std::vector<Strategy> all_strategies(const StrategyKnobs& knobs, const Workload& w, int accumulate) {
  std::vector<Strategy> out;
  const comm::WireDtype f32 = comm::WireDtype::f32;
  out.push_back({StrategyKind::all_reduce, 1, 0.0, true, f32, "all-reduce", ""});
  out.push_back({StrategyKind::hierarchical, 1, 0.0, true, f32, "hierarchical", "--allreduce hier"});
  const int K = std::max(2, accumulate);
  // Accumulation multiplies the user's own --grad-accum: the global batch grows K-fold.
  out.push_back({StrategyKind::accumulate, K, 0.0, true, f32, fmt::format("accumulate x{}", K),
                 fmt::format("--grad-accum {}", w.grad_accum * K)});
  out.push_back({StrategyKind::fp16, 1, 0.0, true, f32, "fp16 gradients", "--compression fp16"});
  const comm::WireDtype dt = knobs.compression_dtype;
  const std::string in_dtype = dt == comm::WireDtype::f32 ? "" : fmt::format(" {}", comm::wire_dtype_name(dt));
  const std::string dtype_flag =
      dt == comm::WireDtype::f32 ? "" : fmt::format(" --compression-dtype {}", comm::wire_dtype_name(dt));
  out.push_back({StrategyKind::topk, 1, knobs.topk_density, true, dt,
                 fmt::format("top-k {:g}%{}", 100 * knobs.topk_density, in_dtype),
                 fmt::format("--compression topk --topk-density {:g}{}", knobs.topk_density, dtype_flag)});
  out.push_back({StrategyKind::powersgd, knobs.powersgd_rank, 0.0, true, dt,
                 fmt::format("PowerSGD r={}{}", knobs.powersgd_rank, in_dtype),
                 fmt::format("--compression powersgd --powersgd-rank {}{}", knobs.powersgd_rank, dtype_flag)});
  out.push_back({StrategyKind::local_sgd, knobs.local_sgd_every, 0.0, true, f32,
                 fmt::format("local SGD H={}", knobs.local_sgd_every), fmt::format("--sync-every {}", knobs.local_sgd_every)});
  out.push_back({StrategyKind::zero1, 1, 0.0, true, f32, "ZeRO-1", "--zero 1"});
  out.push_back({StrategyKind::zero2, 1, 0.0, true, f32, "ZeRO-2", "--zero 2"});
  // ZeRO-3 with LoRA shards the frozen base, a float one or a 4-bit one (its packed words).
  out.push_back({StrategyKind::zero3, 1, 0.0, true, f32, "ZeRO-3", "--zero 3"});
  return out;
}

CommCost comm_cost(const Strategy& s, const Workload& w, int n, const Link& link) {
  CommCost c;
  if (n <= 1) return c;
  const double G = static_cast<double>(w.trainable_floats);
  const double loss_s = ring_all_reduce_s(kLossBytes, n, link);
  const double loss_wire = ring_all_reduce_wire_bytes(kLossBytes, n);
  switch (s.kind) {
    case StrategyKind::all_reduce:
    case StrategyKind::hierarchical:  // on one link, it is the flat ring
      c.payload_bytes = 4 * G;
      c.wire_bytes = ring_all_reduce_wire_bytes(c.payload_bytes, n) + loss_wire;
      c.seconds = ring_all_reduce_s(c.payload_bytes, n, link) + loss_s;
      break;
    case StrategyKind::zero1:
    case StrategyKind::zero2: {
      // A reduce-scatter of the gradients and an all-gather of the updated weights, which
      // is how a ring all-reduce runs; and the gradient norm. ZeRO-2 reduce-scatters after
      // every micro-batch (it keeps no whole gradient to accumulate into).
      const double scatters = s.kind == StrategyKind::zero2 ? static_cast<double>(std::max<int64_t>(1, w.grad_accum)) : 1.0;
      c.payload_bytes = 4 * G;
      const double f = comm::scatter_gather_wire_fraction(n);
      c.wire_bytes = (scatters + 1) * f * c.payload_bytes + ring_all_reduce_wire_bytes(kNormBytes, n) + loss_wire;
      c.seconds = scatters * ring_reduce_scatter_s(c.payload_bytes, n, link) + ring_all_gather_s(c.payload_bytes, n, link) +
                  ring_all_reduce_s(kNormBytes, n, link) + loss_s;
      break;
    }
    case StrategyKind::accumulate:
    case StrategyKind::local_sgd:
      c.payload_bytes = 4 * G;
      c.wire_bytes = (ring_all_reduce_wire_bytes(c.payload_bytes, n) + loss_wire) / s.factor;
      c.seconds = (ring_all_reduce_s(c.payload_bytes, n, link) + loss_s) / s.factor;
      break;
    case StrategyKind::fp16:
      c.payload_bytes = 2 * G;
      c.wire_bytes = ring_all_reduce_wire_bytes(c.payload_bytes, n) + loss_wire;
      c.seconds = ring_all_reduce_s(c.payload_bytes, n, link) + loss_s;
      break;
    case StrategyKind::topk: {
      const double k = std::max(1.0, s.density * G);
      c.payload_bytes = topk_entry_bytes(s) * k;
      const double gathered = n * c.payload_bytes;
      c.wire_bytes = comm::scatter_gather_wire_fraction(n) * gathered + loss_wire;
      c.seconds = ring_all_gather_s(gathered, n, link) + loss_s;
      break;
    }
    case StrategyKind::powersgd: {
      double p_floats = static_cast<double>(w.trainable_vector_floats), q_floats = 0;
      for (const auto& [rows, cols] : w.trainable_matrices) {
        const double r = std::min<double>(s.factor, std::min(rows, cols));
        if (r * (rows + cols) >= rows * cols) {  // nothing to gain: flotilla sends it whole
          p_floats += rows * cols;
          continue;
        }
        p_floats += rows * r;
        q_floats += cols * r;
      }
      const double v = value_bytes(s.dtype);
      c.payload_bytes = v * (p_floats + q_floats);
      c.wire_bytes = ring_all_reduce_wire_bytes(v * p_floats, n) + ring_all_reduce_wire_bytes(v * q_floats, n) + loss_wire;
      c.seconds = ring_all_reduce_s(v * p_floats, n, link) + ring_all_reduce_s(v * q_floats, n, link) + loss_s;
      break;
    }
    case StrategyKind::zero3: {
      const double f = comm::scatter_gather_wire_fraction(n);
      const double collectives = 3.0 * static_cast<double>(w.model.n_layers);
      if (w.lora) {
        // The frozen base gathered for forward and again for backward (at most: backward
        // stops in the lowest adapted block); the adapters' gradients all-reduced whole.
        const double base = 4 * static_cast<double>(w.model_floats);
        c.payload_bytes = 4 * G;
        c.wire_bytes = f * 2 * base + ring_all_reduce_wire_bytes(c.payload_bytes, n) + loss_wire;
        c.seconds = f * 2 * base / link.bandwidth_bytes_per_s +
                    collectives * comm::scatter_gather_ring_steps(n) * link.latency_s +
                    ring_all_reduce_s(c.payload_bytes, n, link) + loss_s;
        break;
      }
      // Every weight is gathered for forward and again for backward; the gradients are
      // reduce-scattered.
      const double gathered = 4 * static_cast<double>(w.model_floats);
      c.payload_bytes = 4 * G;
      c.wire_bytes = f * (2 * gathered + c.payload_bytes) + ring_all_reduce_wire_bytes(kNormBytes, n) + loss_wire;
      c.seconds = f * (2 * gathered + c.payload_bytes) / link.bandwidth_bytes_per_s +
                  collectives * comm::scatter_gather_ring_steps(n) * link.latency_s +
                  ring_all_reduce_s(kNormBytes, n, link) + loss_s;
      break;
    }
  }
  return c;
}

CommCost comm_cost(const Strategy& s, const Workload& w, int n, const Cluster& cluster) {
  const int S = cluster.ranks_per_host(n), H = cluster.hosts_used(n);
  if (s.kind != StrategyKind::hierarchical || S == 1 || H == 1) return comm_cost(s, w, n, cluster.link_for(n));
  CommCost c;
  c.payload_bytes = 4.0 * static_cast<double>(w.trainable_floats);
  const double P = c.payload_bytes, loss = kLossBytes;
  const Link &local = cluster.local, &net = cluster.network;
  // An all-reduce inside each host, then one between hosts of each rank's 1/S part.
  const auto stages = [&](double bytes) { return ring_all_reduce_s(bytes, S, local) + ring_all_reduce_s(bytes, H, net); };
  c.seconds = stages(P) + stages(loss);
  c.wire_bytes = ring_all_reduce_wire_bytes(P + loss, S) + ring_all_reduce_wire_bytes((P + loss) / S, H);
  return c;
}

double update_share(const Strategy& s, int n) {
  switch (s.kind) {
    case StrategyKind::accumulate: return 1.0 / s.factor;
    case StrategyKind::zero1:
    case StrategyKind::zero2:
    case StrategyKind::zero3: return 1.0 / std::max(1, n);
    default: return 1.0;
  }
}

double zero_unit_floats(const Workload& w) {
  const double G = static_cast<double>(w.trainable_floats);
  if (!(w.bucket_mb > 0)) return G;
  const double bucket = w.bucket_mb * (1 << 20) / 4;
  return std::min(G, std::max(bucket, static_cast<double>(w.largest_trainable_floats)));
}

double zero_shard_floats(int64_t trainable_floats, int n) {
  const int64_t ranks = std::max(1, n);
  return static_cast<double>(trainable_floats / ranks + trainable_floats % ranks);
}

namespace {

// Everything but the host arena.
MemoryCost memory_without_arena(const Strategy& s, const Workload& w, int n) {
  MemoryCost m;
  const double G = static_cast<double>(w.trainable_floats);
  const double base = static_cast<double>(w.model_floats);
  const double shard = zero_shard_floats(w.trainable_floats, n);
  // LoRA: the frozen base has no gradient and no optimizer state; the adapters have both.
  m.weights = 4 * (base + (w.lora ? G : 0.0));
  m.grads = 4 * G;
  m.optimizer = 8 * G;  // AdamW m and v
  m.activations = static_cast<double>(w.activation_bytes);
  const double scratch = n > 1 ? kExchangeScratchBytes : 0.0;
  // ZeRO-1/2 reduce-scatter the gradient unit by unit (the fusion buckets) into a shard
  // buffer of their own, which the optimizer reads; one rank alone is plain training.
  const double reduced_shard = n > 1 ? 4 * shard : 0.0;
  // The reduce-scatter and all-gather run in place (comm/algorithms: the ring's halves or
  // the host arena), so nothing else is charged. (Open MPI 4.1's own, under
  // `--allreduce mpi`, allocates one or two copies of the unit on some ranks: bench/RESULTS.md,
  // "ZeRO memory".)
  switch (s.kind) {
    case StrategyKind::all_reduce:
    case StrategyKind::hierarchical:
    case StrategyKind::accumulate:
    case StrategyKind::local_sgd:
      m.buffers = scratch;
      break;
    case StrategyKind::fp16:
      m.buffers = 2 * G + scratch;  // the fp16 copy of the gradients
      break;
    case StrategyKind::topk:
      // The error-feedback residual (what was not sent) is a full fp32 gradient.
      m.buffers = 4 * G + n * topk_entry_bytes(s) * std::max(1.0, s.density * G);
      break;
    case StrategyKind::powersgd: {
      double pq = static_cast<double>(w.trainable_vector_floats);
      for (const auto& [rows, cols] : w.trainable_matrices)
        pq += (rows + cols) * std::min<double>(s.factor, std::min(rows, cols));
      m.buffers = 4 * G + 4 * pq;  // residual + P and Q
      break;
    }
    case StrategyKind::zero1:
    case StrategyKind::zero2:
      m.optimizer = 8 * shard;
      m.buffers = scratch;
      if (s.kind == StrategyKind::zero1 || n == 1) {
        m.buffers += reduced_shard;
      } else {
        // Each unit's part of the gradient arena goes back to the OS once it is reduced (and
        // pages never written cost nothing: base/buffer.hpp), so between steps the reduced
        // shard is all the gradient there is; during backward the units written and not yet
        // reduced come on top: one being written, one on the communication thread (the whole
        // arena with --bucket-mb 0).
        m.grads = 4 * shard;
        m.grads_in_backward = m.grads + std::min(4 * G, kZero2UnitsInFlight * 4 * zero_unit_floats(w));
      }
      break;
    case StrategyKind::zero3: {
      if (n == 1) {  // one rank alone trains as plain training
        m.buffers = scratch;
        break;
      }
      // Each rank's shard of the weights, gradients and moments (16Ψ/n), and the other ranks'
      // chunks of the groups gathered at once ((n-1)/n of them; this rank's own chunk is in
      // the shard). Gradients: the reduced shard between steps, and in backward the groups
      // written and not yet reduce-scattered (parallel/zero3.hpp).
      const double others = static_cast<double>(n - 1) / n;
      m.buffers = scratch;
      if (w.lora) {
        // The frozen base's shard and the groups gathered at once; the adapters whole, with
        // their gradients and moments (parallel/zero3.hpp).
        m.weights = 4 * (zero_shard_floats(w.model_floats, n) + others * zero3_gathered_floats(w) + G);
        break;
      }
      m.optimizer = 8 * shard;
      m.grads = 4 * shard;
      m.grads_in_backward = m.grads + std::min(4 * G, 4 * zero3_grads_in_flight_floats(w));
      m.weights = 4 * shard + others * 4 * zero3_gathered_floats(w);
      break;
    }
  }
  // --dtype bf16: the bf16 copies of the weights products read. ZeRO-3 converts a group when
  // it is gathered and drops the copy with the group (Llama::drop_bf16): copies of the
  // groups in flight only, as the dense share of their floats.
  if (s.kind == StrategyKind::zero3 && n > 1 && w.model_floats > 0)
    m.weights += w.bf16_copy_bytes(zero3_gathered_floats(w) / static_cast<double>(w.model_floats));
  else
    m.weights += w.bf16_copy_bytes();
  m.buffers += w.bf16_scratch_bytes();
  m.grads_in_backward = std::max(m.grads_in_backward, m.grads);
  return m;
}

}  // namespace

double host_arena_bytes(const Strategy& s, int ranks_per_host, int hosts) {
  if (ranks_per_host < 2) return 0.0;  // no arena: alone on the host
  switch (s.kind) {
    case StrategyKind::zero1:
    case StrategyKind::zero2:
    case StrategyKind::zero3:
      // On one host through the scatter slots; across hosts the ring's halves (comm's
      // AllReducer::shard_algorithm), which leave the arena untouched.
      return hosts == 1 ? static_cast<double>(comm::HostShm::scatter_bytes(ranks_per_host)) : 0.0;
    default:
      return static_cast<double>(comm::HostShm::all_reduce_bytes(ranks_per_host));
  }
}

MemoryCost memory_cost(const Strategy& s, const Workload& w, int n, int ranks_per_host, int hosts) {
  MemoryCost m = memory_without_arena(s, w, n);
  if (n > 1) m.buffers += host_arena_bytes(s, ranks_per_host, hosts);
  return m;
}


}  // namespace flotilla::plan
