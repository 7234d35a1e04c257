// What the planner plans for: one model trained at one shape (per-rank micro-batch B x T,
// accumulation A), full or LoRA, and what a step of it costs one rank — measured here or
// estimated from FLOPs — and the machines it could run on.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "flotilla/kernels/gemm.hpp"
#include "flotilla/model/config.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/model/params.hpp"
#include "flotilla/plan/link.hpp"

namespace flotilla::plan {

struct Workload {
  model::ModelConfig model;
  bool lora = false;
  model::LoraConfig lora_config;
  int64_t batch_size = 4;   // B, sequences per micro-batch per rank (train's --batch-size)
  int64_t seq_len = 128;    // T
  int64_t grad_accum = 1;   // micro-batches per optimizer step per rank
  bool grad_checkpoint = false;  // train --grad-checkpoint: blocks recomputed in backward
  // train --dtype: the matrix products' inputs in float32, or bf16 (float32 accumulation).
  // Under bf16 the model keeps a bf16 copy of every dense tensor a product reads, beside
  // the float32 weights (model::Llama::set_matmul_input): 2 bytes each of bf16_copy_floats.
  kernels::GemmInput dtype = kernels::GemmInput::f32;
  double bucket_mb = 25.0;       // train --bucket-mb: fusion buckets, ZeRO's units (0: one unit)

  // Derived by describe_workload from the config, exactly as the model lays them out.
  // The weights' flat buffer (16-float aligned tensors); a quantized base's in 4-byte
  // words, its packed matrices with their scales and biases (so are zero3_group_floats).
  int64_t model_floats = 0;
  int64_t trainable_floats = 0;  // what gets gradients, optimizer state and the all-reduce
  // Of trainable_floats, the experts' tensors (full) or their adapters (LoRA), each to the
  // next tensor's offset: what expert parallelism sums over a block's replicas only.
  int64_t trainable_expert_floats = 0;
  // Trainable 2-D tensors as (rows, cols): PowerSGD compresses these; 1-D ones go as they are.
  std::vector<std::pair<int64_t, int64_t>> trainable_matrices;
  int64_t trainable_vector_floats = 0;
  int64_t largest_trainable_floats = 0;  // the largest trainable tensor (a bucket of its own if larger)
  int64_t largest_layer_floats = 0;  // one block's weights, or the embedding if larger (ZeRO-3)
  // ZeRO-3's gather groups in forward order (parallel/zero3.hpp): the embedding, each
  // block, the head (final norm and an untied lm_head), each up to the next's offset.
  std::vector<int64_t> zero3_group_floats;
  bool tied_embeddings = false;  // the head reads the embedding: gathered with it
  int64_t bf16_copy_floats = 0;  // floats of the tensors bf16 products read (bf16_copy_floats())
  int64_t activation_bytes = 0;      // Llama::activation_bytes(B, T), adapters and checkpointing included

  int64_t tokens_per_step() const { return batch_size * seq_len * grad_accum; }  // per rank
  // The bf16 copies of the weights under --dtype bf16 (0 in float32), for a rank holding
  // the whole model; `share` of them where it holds part (ZeRO-3's gathered groups).
  double bf16_copy_bytes(double share = 1.0) const {
    return dtype == kernels::GemmInput::bf16 ? 2.0 * share * static_cast<double>(bf16_copy_floats) : 0.0;
  }
  // Under --dtype bf16 also the float inputs of the products rounded into two scratch
  // buffers that keep their largest size (kernels/matmul.cpp, Bf16Scratch): one holds the
  // widest of a micro-batch's B T rows a product reads or whose gradient it takes (the
  // lm_head's logits gradient, V wide), the other the widest input a weight gradient reads.
  double bf16_scratch_bytes() const;
};

// What tensor p of a model of `cfg` holds in 4-byte words: its floats, or where the config
// quantizes it, its packed words and its f16 scales and biases (as model_floats counts).
int64_t weight_words(const model::ModelConfig& cfg, const model::ParamInfo& p);
// The whole model's weights in 4-byte words (model_floats; a tensor-parallel rank's local
// config gives what that rank holds of them).
int64_t model_words(const model::ModelConfig& cfg);
// The floats of the weights a bf16 product reads, each of which gets a bf16 copy: every
// 2-D float tensor but an untied input embedding (a lookup): q, k, v, o, the MLP's (and
// experts' and router's) matrices, lm_head or the tied embedding it reads. Not the norms
// and biases, not a quantized tensor (its tiles are dequantized per product), not LoRA's
// adapters (float32 products: Llama::adapter_input).
int64_t bf16_copy_floats(const model::ModelConfig& cfg);

Workload describe_workload(const model::ModelConfig& cfg, bool lora, const model::LoraConfig& lora_config,
                           int64_t batch_size, int64_t seq_len, int64_t grad_accum, bool grad_checkpoint = false);

// One optimizer step of the workload on one rank with nothing to synchronise: the time
// in each phase of Trainer::step. Measured (median of timed steps) or estimated.
struct StepCost {
  double data_s = 0.0;     // drawing the micro-batches
  double compute_s = 0.0;  // forward + backward of grad_accum micro-batches
  double update_s = 0.0;   // gradient scaling, clipping, AdamW
  int threads = 1;         // OpenMP / OpenBLAS threads it ran with
  std::string source;      // how it was obtained, for the report
  int64_t peak_rss_bytes = 0;  // of the measured run (0: not measured)
  // Per timed step, data + compute: how much a rank's step varies. The all-reduce waits
  // for the slowest of n ranks, so n ranks see the tail of this distribution (scaling.hpp).
  // Empty when estimated.
  std::vector<double> work_samples_s;
  // Ranks sharing one host slow each other (memory bandwidth, caches) even with a core
  // each: the per-rank slow-down measured with `contention_ranks` ranks training at once
  // on this host (plan under mpirun), 1 where not measured.
  double contention = 1.0;
  int contention_ranks = 1;
  double total_s() const { return data_s + compute_s + update_s; }
};

// The machines: `hosts` alike, each running up to `slots` ranks on `cores` cores, joined
// by `network`; ranks on one host talk over `local` (shared memory).
struct Cluster {
  int hosts = 1;
  int slots = 1;         // ranks per host
  int cores = 1;         // per host
  int64_t memory_bytes = 0;  // per host
  std::string memory_source = "assumed";  // "--memory-per-host", "MemTotal of this machine"
  Link network;  // between hosts: TCP
  Link local;    // shared memory
  // The hosts are network namespaces of one machine (an emulated cluster such as
  // ../shared/netcluster): every rank, on whichever host, shares that machine's `cores`.
  bool one_machine = false;
  int max_ranks() const { return hosts * slots; }
  // Ranks of n that compete for one machine's cores.
  int ranks_sharing_cores(int ranks) const { return one_machine ? ranks : ranks_per_host(ranks); }
  // n ranks fill the hosts in order, `slots` per host.
  int hosts_used(int ranks) const { return (ranks + slots - 1) / slots; }
  int ranks_per_host(int ranks) const { return ranks < slots ? ranks : slots; }
  // The link a ring over n ranks is limited by: the network as soon as it spans hosts.
  const Link& link_for(int ranks) const { return hosts_used(ranks) > 1 ? network : local; }
};

// MemTotal of /proc/meminfo in bytes (0 if unreadable).
int64_t machine_memory_bytes();
// A memory size: "24GiB", "24G" (binary, as Slurm and free read them), "16GB" (decimal),
// "512MiB", "1.5TiB", "34359738368" (bytes); case and spaces do not matter. InputError
// naming `flag` for anything else or a size that is not positive.
int64_t parse_memory_bytes(std::string_view text, std::string_view flag = "--memory-per-host");

}  // namespace flotilla::plan
