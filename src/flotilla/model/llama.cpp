#include "flotilla/model/llama.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include <cstring>
#include <initializer_list>
#include <new>
#include <utility>

#include "flotilla/base/error.hpp"
#include "flotilla/base/log.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/kernels/quant.hpp"

namespace flotilla::model {
namespace k = flotilla::kernels;

namespace {
// The float32 parameters of a model: refused with the sizes when they exceed this machine's
// memory (an allocation that succeeds on overcommit would be killed while being zeroed).
Buffer<float> allocate_parameters(int64_t numel) {
  const double gib = static_cast<double>(numel) * 4.0 / (1 << 30);
  const int64_t memory = physical_memory_bytes();
  if (memory > 0 && numel > memory / 4)
    throw InputError("model", fmt::format("a model of {} parameters needs {:.1f} GiB for its float32 weights, more "
                                          "than this machine's {:.1f} GiB of memory",
                                          numel, gib, static_cast<double>(memory) / (1 << 30)));
  try {
    return Buffer<float>(static_cast<size_t>(numel));
  } catch (const std::bad_alloc&) {
    throw InputError("model", fmt::format("cannot allocate {:.1f} GiB for the float32 weights of a model of {} "
                                          "parameters", gib, numel));
  }
}

// The layer a tensor's name holds ("model.layers.7.mlp..." -> 7), or -1 for the embedding
// and the head.
int64_t layer_of_tensor(std::string_view name) {
  const size_t at = name.find("layers.");
  if (at == std::string_view::npos) return -1;
  int64_t layer = 0;
  size_t i = at + 7;
  if (i >= name.size() || name[i] < '0' || name[i] > '9') return -1;
  for (; i < name.size() && name[i] >= '0' && name[i] <= '9'; ++i) layer = layer * 10 + (name[i] - '0');
  return layer;
}
}  // namespace

Llama::Llama(const ModelConfig& cfg)
    : cfg_(cfg), layout_(cfg), params_(allocate_parameters(layout_.total_numel())), range_{0, cfg.n_layers} {}

Llama::Llama(const ModelConfig& cfg, const std::set<std::string>& quantized)
    : cfg_(cfg),
      layout_(cfg, quantized),
      params_(allocate_parameters(layout_.total_numel())),
      range_{0, cfg.n_layers} {}

void Llama::set_matmul_input(kernels::GemmInput input) {
  matmul_input_ = input;
  if (input == kernels::GemmInput::f32) {
    bf16_weights_ = Buffer<uint16_t>();  // not needed any more
    bf16_tensors_.clear();
    bf16_made_.clear();
  }
}

const uint16_t* Llama::bf16_weight(int64_t offset, int64_t numel) const {
  if (bf16_weights_.size() != params_.size()) {
    bf16_weights_ = Buffer<uint16_t>(params_.size());  // mapped: not resident until written
    bf16_tensors_.clear();
    for (const ParamInfo& info : layout_.params())
      if (!info.quantized && info.numel > 0) bf16_tensors_.push_back({info.offset, info.offset + info.numel});
    std::sort(bf16_tensors_.begin(), bf16_tensors_.end(),
              [](const ElementRange& a, const ElementRange& b) { return a.begin < b.begin; });
    bf16_made_.assign(bf16_tensors_.size(), 0);
  }
  // Every tensor the range touches (one, unless a product reads neighbours as one matrix).
  auto it = std::partition_point(bf16_tensors_.begin(), bf16_tensors_.end(),
                                 [&](const ElementRange& t) { return t.end <= offset; });
  for (; it != bf16_tensors_.end() && it->begin < offset + numel; ++it) {
    uint64_t& made = bf16_made_[static_cast<size_t>(it - bf16_tensors_.begin())];
    if (made == bf16_generation_) continue;
    // Elementwise (round to nearest even): tensor by tensor gives the bits the whole
    // arena's conversion gives.
    k::convert_to_bf16(params_.data() + it->begin, it->end - it->begin, bf16_weights_.data() + it->begin);
    made = bf16_generation_;
  }
  return bf16_weights_.data() + offset;
}

void Llama::drop_bf16(ElementRange range, bool poison) {
  if (bf16_weights_.size() != params_.size() || range.end <= range.begin) return;
  auto it = std::partition_point(bf16_tensors_.begin(), bf16_tensors_.end(),
                                 [&](const ElementRange& t) { return t.end <= range.begin; });
  for (; it != bf16_tensors_.end() && it->begin < range.end; ++it) bf16_made_[static_cast<size_t>(it - bf16_tensors_.begin())] = 0;
  uint16_t* copy = bf16_weights_.data();
  if (poison) {
    std::fill(copy + range.begin, copy + range.end, uint16_t{0x7FC0});  // bf16 quiet NaN
    return;
  }
  // Zeroed, its whole pages handed back: what a sharded model does not hold between uses
  // is not resident in bf16 either.
  release_zeroed(copy + range.begin, static_cast<size_t>(range.end - range.begin) * sizeof(uint16_t));
}

void Llama::linear_forward(float* out, const float* inp, const WeightRef& weight, const float* bias, int64_t N,
                           int64_t C, int64_t OC) const {
  if (weight.is_quantized())
    return k::qmatmul_forward(out, inp, quantized_weight(weight), bias, N, matmul_input_);
  if (matmul_input_ == kernels::GemmInput::bf16)
    return k::matmul_forward_bf16(out, inp, bf16_weight(weight.offset(), C * OC), bias, N, C, OC);
  k::matmul_forward(out, inp, p(weight), bias, N, C, OC);
}

void Llama::linear_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                            const WeightRef& weight, int64_t N, int64_t C, int64_t OC) const {
  if (weight.is_quantized()) {
    // A quantized base is always frozen (training it is refused before this point).
    if (dweight || dbias) throw Error("model", "a quantized weight has no gradient: it is frozen");
    return k::qmatmul_backward_input(dinp, dout, quantized_weight(weight), N, matmul_input_);
  }
  if (matmul_input_ == kernels::GemmInput::bf16)
    return k::matmul_backward_bf16(dinp, dweight, dbias, dout, inp, bf16_weight(weight.offset(), C * OC), N, C,
                                    OC);
  k::matmul_backward(dinp, dweight, dbias, dout, inp, p(weight), N, C, OC);
}

void Llama::embedding_forward(float* out, const int32_t* tokens, int64_t N) const {
  if (tp_) {
    // Vocabulary-parallel: this rank's rows, zeros for the tokens other ranks hold; the sum
    // over the ranks is every token's row (one nonzero term each: exact).
    embedding_forward_rows(out, tokens, N);
    tp_->all_reduce_sum({out, static_cast<size_t>(N * cfg_.dim)}, "tp embedding");
    return;
  }
  if (layout_.embed.is_quantized()) return k::qembedding_forward(out, tokens, quantized_weight(layout_.embed), N);
  k::embedding_forward(out, tokens, p(layout_.embed), N, cfg_.dim);
}

void Llama::embedding_forward_rows(float* out, const int32_t* tokens, int64_t N) const {
  if (layout_.embed.is_quantized())
    return k::qembedding_forward_rows(out, tokens, quantized_weight(layout_.embed), N, vocab_.begin, vocab_.end);
  k::embedding_forward_rows(out, tokens, p(layout_.embed), N, cfg_.dim, vocab_.begin, vocab_.end);
}

void Llama::init_random(uint64_t seed) { init_random(seed, held_ranges()); }

void Llama::init_random(uint64_t seed, std::span<const ElementRange> owned) {
  if (quantized()) throw Error("model", "init_random on a quantized model");
  int64_t at = 0;
  for (const ElementRange& r : owned) {
    if (r.begin < at || r.end < r.begin || r.end > static_cast<int64_t>(params_.size()))
      throw Error("model", "init_random: owned ranges must be ascending, disjoint and inside the parameters");
    at = r.end;
  }
  invalidate_bf16();
  Rng rng(seed);
  auto range = owned.begin();  // the first owned range not wholly below the tensor
  for (const ParamInfo& info : layout_.params()) {
    const int64_t begin = info.offset, end = info.offset + info.numel;
    const bool is_norm = info.name.ends_with("norm.weight");
    const bool is_bias = info.name.ends_with(".bias");
    while (range != owned.end() && range->end <= begin) ++range;
    int64_t drawn = begin;  // the stream stands at this float of the tensor
    for (auto r = range; r != owned.end() && r->begin < end; ++r) {
      const int64_t b = std::max(r->begin, begin), e = std::min(r->end, end);
      if (b >= e) continue;
      std::span<float> w(params_.data() + b, static_cast<size_t>(e - b));
      if (is_norm) {
        std::fill(w.begin(), w.end(), 1.0f);
      } else if (is_bias) {
        std::fill(w.begin(), w.end(), 0.0f);
      } else {
        rng.discard(2 * static_cast<uint64_t>(b - drawn));  // normal() draws two words
        rng.fill_normal(w, 0.0f, cfg_.initializer_range);
        drawn = e;
      }
    }
    if (!is_norm && !is_bias) rng.discard(2 * static_cast<uint64_t>(end - drawn));
  }
}

std::span<float> Llama::grads() {
  if (grads_.empty()) grads_.resize(params_.size());
  return grads_.span();
}

void Llama::zero_grads() {
  if (lora_) {
    lora_->zero_grads();
    return;
  }
  if (grads_.empty()) {
    grads_.resize(params_.size());
  } else if (!holds_all()) {
    // Only the held tensors' gradients are ever written (a stage's backward): zeroing the
    // rest would make their pages resident.
    for (const auto& [begin, end] : held_ranges()) k::zero_fill(grads_.data() + begin, end - begin);
  } else {
    k::zero_fill(grads_.data(), static_cast<int64_t>(grads_.size()));
  }
}

void Llama::hold_only(const HeldPart& part) {
  if (const auto& stage = part.layers;
      stage && (stage->begin < 0 || stage->begin >= stage->end || stage->end > cfg_.n_layers))
    throw Error("model", fmt::format("layer range [{}, {}) is not a non-empty range of the model's {} layers",
                                     stage->begin, stage->end, cfg_.n_layers));
  if (const auto& experts = part.experts;
      experts && (experts->begin < 0 || experts->begin >= experts->end || experts->end > cfg_.moe.num_experts))
    throw Error("model", fmt::format("expert range [{}, {}) is not a non-empty range of the model's {} experts",
                                     experts->begin, experts->end, cfg_.moe.num_experts));
  held_ = part;
  invalidate_bf16();
  // What a load or an earlier init wrote of the other tensors goes back to the system.
  for (const ParamInfo& info : layout_.params()) {
    if (info.quantized || holds(info)) continue;
    release_zeroed(params_.data() + info.offset, static_cast<size_t>(info.numel) * sizeof(float));
    if (!grads_.empty())
      release_zeroed(grads_.data() + info.offset, static_cast<size_t>(info.numel) * sizeof(float));
  }
}

bool Llama::holds(const ParamInfo& info) const {
  if (held_.experts) {
    const int64_t expert = expert_of_tensor(info.name);
    if (expert >= 0 && (expert < held_.experts->begin || expert >= held_.experts->end)) return false;
  }
  if (!held_.layers) return true;
  const LayerRange s = *held_.layers;
  const int64_t layer = layer_of_tensor(info.name);
  if (layer >= 0) return layer >= s.begin && layer < s.end;
  const bool first = s.begin == 0, last = s.end == cfg_.n_layers;
  if (info.name == "model.embed_tokens.weight") return first || (last && cfg_.tie_embeddings);
  return last;  // the final norm, lm_head
}

std::vector<ElementRange> Llama::held_ranges(TensorGroup group) const {
  std::vector<ElementRange> ranges;
  for (const ParamInfo& info : layout_.params()) {
    if (info.quantized || !holds(info)) continue;
    const bool expert = expert_of_tensor(info.name) >= 0;
    if ((group == TensorGroup::experts && !expert) || (group == TensorGroup::non_experts && expert)) continue;
    const int64_t begin = info.offset, end = info.offset + info.numel;
    if (!ranges.empty() && ranges.back().end == begin)
      ranges.back().end = end;
    else
      ranges.push_back({begin, end});
  }
  return ranges;  // ascending: the layout's offsets are
}

void Llama::attach_lora(LoraAdapters* adapters) {
  lora_ = adapters;
  acts_ = ActivationPlan();  // the plan holds per-adapter buffers: rebuild on next forward
  logits_valid_ = false;
  have_targets_ = false;
  stage_forward_done_ = false;
  if (parallel_) ready_groups_ = grad_groups();
}

Llama::Trainable Llama::trainable() {
  if (!lora_ && quantized())
    throw InputError("model", "a quantized model cannot be fully fine-tuned: de-quantize first "
                              "(flotilla fuse --de-quantize, or flotilla convert without --quantize), or train LoRA adapters");
  if (lora_) return Trainable{lora_->table(), lora_->params(), lora_->grads()};
  invalidate_bf16();  // the caller will update them
  return Trainable{layout_, params_.span(), grads()};
}

namespace {
// One view of the activation plan and its size in floats.
struct PlanEntry {
  float** view;
  int64_t numel;
};

// The activation table of a step shape: each view and its element count, laid out in
// this order in one buffer.
std::vector<PlanEntry> plan_table(ActivationPlan& a, const ModelConfig& cfg, const LoraAdapters* lora, int64_t B,
                                  int64_t T, bool checkpoint, int64_t sequence_parallel) {
  const int64_t N = B * T, C = cfg.dim, F = cfg.ffn_dim, V = cfg.vocab_size;
  // Sequence parallelism: the residual stream's rows this rank holds (Ns), and the rows of
  // a buffer gathered from every rank (Np >= N: the last slices may be padded).
  const int64_t Ns = (N + sequence_parallel - 1) / sequence_parallel, Np = Ns * sequence_parallel;
  const int64_t Dq = cfg.q_dim(), Dkv = cfg.kv_dim(), NH = cfg.n_heads, hd = cfg.head_dim;
  const int64_t E = cfg.moe.num_experts, K = cfg.moe.top_k, Fe = cfg.moe.expert_ffn_dim;
  // Under checkpointing the one shared set of views must hold any layer: the widest dense
  // MLP and, if any layer has them, the MoE views.
  int64_t widest_dense = 0;
  bool any_moe = false;
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    widest_dense = std::max(widest_dense, cfg.dense_mlp_dim(l));
    any_moe = any_moe || cfg.moe_layer(l);
  }
  const int64_t widest_act = std::max(widest_dense, any_moe ? K * Fe : 0);  // rows x width of act
  a.layers.assign(static_cast<size_t>(cfg.n_layers), LayerActivations{});
  std::vector<PlanEntry> table;
  for (size_t l = 0; l < a.layers.size(); ++l) {
    LayerActivations& la = a.layers[l];
    table.push_back({&la.resid_in, Ns * C});
    // Checkpointing: layers above 0 share layer 0's views (Llama::plan points them there).
    if (checkpoint && &la != &a.layers[0]) continue;
    table.push_back({&la.ln1_rstd, Ns});
    table.push_back({&la.q, N * Dq});
    table.push_back({&la.k, N * Dkv});
    table.push_back({&la.v, N * Dkv});
    table.push_back({&la.probs, B * NH * T * T});
    table.push_back({&la.attn_out, N * Dq});
    table.push_back({&la.resid_mid, Ns * C});
    table.push_back({&la.ln2_rstd, Ns});
    const int64_t Fl = checkpoint ? widest_dense : cfg.dense_mlp_dim(static_cast<int64_t>(l));
    if (Fl > 0) {
      table.push_back({&la.gate, N * Fl});
      table.push_back({&la.up, N * Fl});
    }
    if (checkpoint ? any_moe : cfg.moe_layer(static_cast<int64_t>(l))) {
      table.push_back({&la.router_probs, N * E});
      table.push_back({&la.expert_gate, N * K * Fe});
      table.push_back({&la.expert_up, N * K * Fe});
      table.push_back({&la.expert_out, N * K * C});
      if (cfg.moe.shared_expert_ffn_dim > 0) {
        table.push_back({&la.shared_out, N * C});
        table.push_back({&la.shared_gate, N});
      }
    }
  }
  if (lora) {
    const int64_t r = lora->config().rank;
    // Under checkpointing layer 0's views serve every layer: one for a target any layer adapts.
    auto adapted = [&](int64_t l, int t) {
      if (!checkpoint) return lora->slot(l, static_cast<LoraTarget>(t)).active();
      bool any = false;
      for (int64_t m = lora->first_layer(); m < cfg.n_layers; ++m) any = any || lora->slot(m, static_cast<LoraTarget>(t)).active();
      return l == 0 && any;
    };
    for (int64_t l = 0; l < cfg.n_layers; ++l)
      for (int t = 0; t < kNumLoraTargets; ++t)
        if (adapted(l, t)) table.push_back({&a.layers[static_cast<size_t>(l)].lora_u[static_cast<size_t>(t)], N * r});
    table.push_back({&a.lora_g, N * r});
    const int64_t widest = lora->config().dropout > 0.0f ? N * std::max({C, F, widest_dense}) : 0;
    table.push_back({&a.lora_xd, widest});
    table.push_back({&a.lora_dxd, widest});
  }
  table.push_back({&a.resid_out, Ns * C});
  table.push_back({&a.lnf, Np * C});
  table.push_back({&a.lnf_rstd, Ns});
  table.push_back({&a.logits, N * V});
  table.push_back({&a.losses, N});
  table.push_back({&a.rope_cos, T * hd / 2});
  table.push_back({&a.rope_sin, T * hd / 2});
  table.push_back({&a.ln, Np * C});
  table.push_back({&a.dresid, Np * C});
  table.push_back({&a.dln, Np * C});
  if (sequence_parallel > 1) {
    table.push_back({&a.seq_slice, Ns * C});
    table.push_back({&a.seq_dresid, Ns * C});
    table.push_back({&a.seq_norm_grads, 2 * C});
  }
  table.push_back({&a.dq, N * Dq});
  table.push_back({&a.dk, N * Dkv});
  table.push_back({&a.dv, N * Dkv});
  table.push_back({&a.dattn_out, N * Dq});
  table.push_back({&a.dprobs, B * NH * T * T});
  table.push_back({&a.act, N * widest_act});
  table.push_back({&a.dact, N * widest_act});
  table.push_back({&a.dgate, N * widest_act});
  table.push_back({&a.dup, N * widest_act});
  if (any_moe) {
    table.push_back({&a.moe_rows, N * K * C});
    table.push_back({&a.drows, N * K * C});
    table.push_back({&a.drouter, N * E});
    table.push_back({&a.dweights, N * K});
  }
  return table;
}

// Each view starts on a 64-byte boundary.
int64_t padded(int64_t numel) { return (numel + 15) / 16 * 16; }
}  // namespace

int64_t Llama::activation_bytes(int64_t B, int64_t T) const {
  return activation_bytes(cfg_, lora_, B, T, grad_checkpoint_, sequence_parallel() ? tp_->tp_size() : 1);
}

int64_t Llama::activation_bytes(const ModelConfig& cfg, const LoraAdapters* lora, int64_t B, int64_t T,
                                bool grad_checkpoint, int64_t sequence_parallel) {
  return stage_activation_bytes(cfg, lora, B, T, grad_checkpoint, {0, cfg.n_layers}, sequence_parallel);
}

int64_t Llama::stage_activation_bytes(const ModelConfig& cfg, const LoraAdapters* lora, int64_t B, int64_t T,
                                      bool grad_checkpoint, LayerRange stage, int64_t sequence_parallel) {
  if (B <= 0 || T <= 0) throw InputError("model", fmt::format("empty batch (B={}, T={})", B, T));
  // Bounds under which every product of the plan table fits in int64 (the largest is the
  // attention probabilities, B * heads * T * T per layer); far past any machine's memory.
  const double tokens = static_cast<double>(B) * static_cast<double>(T);
  const double probs = tokens * static_cast<double>(T) * static_cast<double>(cfg.n_heads) *
                       static_cast<double>(cfg.n_layers);
  if (tokens > 0x1p31 || probs > 0x1p58)
    throw InputError("model", fmt::format("a micro-batch of B={} x T={} ({:.3g} tokens) is beyond what any machine "
                                          "can hold the activations of: lower the batch size or the sequence length",
                                          B, T, tokens));
  ActivationPlan scratch;
  const std::vector<PlanEntry> table =
      plan_table(scratch, cfg, lora, B, T, grad_checkpoint, std::max<int64_t>(1, sequence_parallel));
  const bool last = stage.end == cfg.n_layers;
  const std::array<float* const*, 5> head = {&scratch.resid_out, &scratch.lnf, &scratch.lnf_rstd, &scratch.logits,
                                             &scratch.losses};
  int64_t total = 0;
  for (const PlanEntry& e : table) {
    bool touched = true;
    // A layer's views: its own stage's (and the input of the layer after it, which the
    // stage's last block writes); under checkpointing layer 0's views serve every layer.
    const auto at = std::find_if(scratch.layers.begin(), scratch.layers.end(), [&](const LayerActivations& la) {
      const auto* view = reinterpret_cast<const char*>(e.view);
      return view >= reinterpret_cast<const char*>(&la) && view < reinterpret_cast<const char*>(&la + 1);
    });
    if (at != scratch.layers.end()) {
      const auto l = static_cast<int64_t>(at - scratch.layers.begin());
      const bool input = e.view == &at->resid_in;
      touched = (l >= stage.begin && (l < stage.end || (input && l == stage.end))) ||
                (!input && grad_checkpoint && l == 0);
    } else if (std::find(head.begin(), head.end(), e.view) != head.end()) {
      touched = last;
    }
    if (touched) total += padded(e.numel);
  }
  return total * static_cast<int64_t>(sizeof(float));
}

void Llama::check_activation_memory(int64_t B, int64_t T) const {
  const int64_t bytes = activation_bytes(B, T);
  const int64_t memory = physical_memory_bytes();
  if (memory > 0 && bytes > memory)
    throw InputError("model", fmt::format("activations for a micro-batch of B={} x T={} need {:.1f} GiB, more than "
                                          "this machine's {:.1f} GiB of memory: lower the batch size or the "
                                          "sequence length",
                                          B, T, static_cast<double>(bytes) / (1 << 30),
                                          static_cast<double>(memory) / (1 << 30)));
}

void Llama::plan(int64_t B, int64_t T) {
  if (acts_.B == B && acts_.T == T && !acts_.memory.empty()) return;
  check_activation_memory(B, T);
  const int64_t N = B * T, hd = cfg_.head_dim;
  ActivationPlan& a = acts_;
  a.B = B;
  a.T = T;
  const int64_t sp = sequence_parallel() ? tp_->tp_size() : 1;
  a.seq = sp > 1 ? sequence_shard(N, {tp_->tp_rank(), static_cast<int>(sp)}) : SequenceShard{1, N, 0, N};
  const std::vector<PlanEntry> table = plan_table(a, cfg_, lora_, B, T, grad_checkpoint_, sp);
  int64_t total = 0;
  for (const auto& e : table) total += padded(e.numel);
  a.memory = Buffer<float>();  // release the old plan before allocating the new one
  try {
    a.memory.resize(static_cast<size_t>(total));
  } catch (const std::bad_alloc&) {
    acts_ = ActivationPlan();
    throw InputError("model", fmt::format("cannot allocate {:.1f} GiB for the activations of a micro-batch of B={} x "
                                          "T={}: lower the batch size or the sequence length",
                                          static_cast<double>(total) * 4.0 / (1 << 30), B, T));
  }
  int64_t offset = 0;
  for (const auto& e : table) {
    *e.view = a.memory.data() + offset;
    offset += padded(e.numel);
  }
  if (grad_checkpoint_) {
    for (size_t l = 1; l < a.layers.size(); ++l) {
      float* own_input = a.layers[l].resid_in;
      a.layers[l] = a.layers[0];
      a.layers[l].resid_in = own_input;
    }
  }
  a.tokens.assign(static_cast<size_t>(N), 0);
  a.targets.assign(static_cast<size_t>(N), kIgnoreIndex);

  std::vector<float> inv_freq(static_cast<size_t>(hd / 2));
  k::rope_inv_freq(inv_freq.data(), hd, cfg_.rope_theta, cfg_.rope_scaling);
  k::rope_table(a.rope_cos, a.rope_sin, inv_freq.data(), 0, T, hd);
  log::debug("[model] activation plan B={} T={}: {:.1f} MiB", B, T,
             static_cast<double>(total) * 4.0 / (1 << 20));
}

void Llama::drop_activation_plan() {
  acts_.memory = Buffer<float>();
  acts_.B = acts_.T = 0;
  logits_valid_ = have_targets_ = false;
}

void Llama::set_grad_checkpoint(bool on) {
  if (on == grad_checkpoint_) return;
  grad_checkpoint_ = on;
  drop_activation_plan();
}

uint64_t Llama::dropout_seed(int64_t layer, LoraTarget t) const {
  return lora_dropout_seed(forward_dropout_, layer, t);
}

void Llama::set_expert_capacity(double factor) {
  if (!std::isfinite(factor) || factor < 0.0)
    throw InputError("model", fmt::format("an expert capacity factor must be a finite number >= 0 (0: dropless), "
                                          "not {}", factor));
  if (factor > 0.0 && !cfg_.is_moe())
    throw InputError("model", "an expert capacity factor needs a mixture-of-experts model; this one has no experts");
  expert_capacity_factor_ = factor;
}

moe::Capacity Llama::expert_capacity(int64_t T) const {
  if (!training_ || !cfg_.is_moe()) return {};
  return moe::Capacity::of(expert_capacity_factor_, T, cfg_.moe.top_k, cfg_.moe.num_experts);
}

BlockContext Llama::training_context() const {
  const ActivationPlan& a = acts_;
  BlockContext ctx;
  ctx.B = a.B;
  ctx.T = a.T;
  ctx.Tk = a.T;
  ctx.rope_cos = a.rope_cos;
  ctx.rope_sin = a.rope_sin;
  ctx.positions = a.positions.empty() ? nullptr : a.positions.data();
  ctx.key_start = a.key_start.empty() ? nullptr : a.key_start.data();
  ctx.ln = a.ln;
  ctx.act = a.act;
  ctx.moe_rows = a.moe_rows;
  ctx.expert_parallel = experts_ != nullptr && experts_->ep_size() > 1;
  ctx.expert_capacity = expert_capacity(a.T).per_expert;
  ctx.lora_xd = a.lora_xd;
  ctx.lora = lora_;
  if (lora_ && training_ && lora_->config().dropout > 0.0f) ctx.dropout_step = forward_dropout_;
  if (sequence_parallel()) {
    ctx.seq = &a.seq;
    ctx.seq_slice = a.seq_slice;
  }
  return ctx;
}

void Llama::adapter_forward(int64_t l, LoraTarget t, float* y, const float* x, const LayerActivations& la,
                            const BlockContext& ctx) const {
  if (!ctx.lora) return;
  std::optional<uint64_t> seed;
  if (ctx.dropout_step) seed = lora_dropout_seed(*ctx.dropout_step, l, t);
  float* u = la.lora_u[static_cast<size_t>(t)];
  const int64_t N = ctx.B * ctx.T;
  if (tp_ && lora_row_parallel(t))
    lora_row_parallel_forward(l, t, y, x, u, ctx.lora_xd, N, seed, *ctx.lora);
  else
    ctx.lora->forward(l, t, y, x, u, ctx.lora_xd, N, seed, adapter_input());
}

void Llama::block_forward(int64_t l, const LayerActivations& la, float* out, const BlockContext& ctx) const {
  const int64_t B = ctx.B, T = ctx.T, N = B * T, C = cfg_.dim, F = cfg_.ffn_dim;
  const int64_t Dq = cfg_.q_dim(), Dkv = cfg_.kv_dim(), NH = cfg_.n_heads, NKV = cfg_.n_kv_heads;
  const int64_t hd = cfg_.head_dim;
  const LayerParams& w = layout_.layers[static_cast<size_t>(l)];
  auto lora = [&](LoraTarget t, float* y, const float* x) { adapter_forward(l, t, y, x, la, ctx); };
  float* ln = ctx.ln;
  // Sequence parallel: the residual stream is this rank's rows (Nr of them); a norm's
  // output is gathered whole before the column-parallel layers, and the row-parallel
  // layers' partial sums go into ln (free by then) and are reduce-scattered into the rows.
  const SequenceShard* seq = ctx.seq;
  const int64_t Nr = seq ? seq->real : N;
  // Attention block: h = x + o_proj(attn(rope(q_proj(ln1(x))), rope(k_proj(.)), v_proj(.)))
  if (seq)
    sequence_norm_gather(ln, ctx.seq_slice, la.ln1_rstd, la.resid_in, w.ln1, *seq, "sp attention input");
  else
    k::rmsnorm_forward(ln, la.ln1_rstd, la.resid_in, p(w.ln1), N, C, cfg_.rms_norm_eps);
  linear_forward(la.q, ln, w.q_proj, dense_weight(w.q_bias), N, C, Dq);
  linear_forward(la.k, ln, w.k_proj, dense_weight(w.k_bias), N, C, Dkv);
  linear_forward(la.v, ln, w.v_proj, dense_weight(w.v_bias), N, C, Dkv);
  lora(LoraTarget::q, la.q, ln);
  lora(LoraTarget::k, la.k, ln);
  lora(LoraTarget::v, la.v, ln);
  k::rope_forward(la.q, ctx.rope_cos, ctx.rope_sin, B, T, NH, hd, ctx.positions);
  k::rope_forward(la.k, ctx.rope_cos, ctx.rope_sin, B, T, NKV, hd, ctx.positions);
  const float* keys = ctx.keys ? ctx.keys : la.k;
  const float* values = ctx.values ? ctx.values : la.v;
  k::attention_forward(la.attn_out, la.probs, la.q, keys, values, B, T, ctx.Tk, NH, NKV, hd, ctx.key_start,
                       matmul_input_);
  float* o_out = seq ? ln : la.resid_mid;
  linear_forward(o_out, la.attn_out, w.o_proj, nullptr, N, Dq, C);
  lora(LoraTarget::o, o_out, la.attn_out);
  // Tensor parallel: o is row-parallel, each rank's product a partial sum over its heads (g).
  if (seq)
    sequence_reduce_scatter(ln, la.resid_mid, *seq, "sp attention output");
  else if (tp_)
    tp_->all_reduce_sum({la.resid_mid, static_cast<size_t>(N * C)}, "tp attention output");
  k::add_inplace(la.resid_mid, la.resid_in, Nr * C);
  // MLP block: out = h + down(silu(gate(ln2(h))) * up(ln2(h))), or a mixture of experts
  if (seq)
    sequence_norm_gather(ln, ctx.seq_slice, la.ln2_rstd, la.resid_mid, w.ln2, *seq, "sp MLP input");
  else
    k::rmsnorm_forward(ln, la.ln2_rstd, la.resid_mid, p(w.ln2), N, C, cfg_.rms_norm_eps);
  if (cfg_.moe_layer(l)) {
    // Tensor parallel: each rank's experts (and shared expert) hold their slices of every
    // expert's width, so the combined output is a partial sum, added as the dense MLP's
    // (g). Sequence parallel: the partial sums go into ln (moe_forward reads it first)
    // and are reduce-scattered into this rank's rows.
    float* moe_out = seq ? ln : out;
    moe_forward(l, la, moe_out, ln, ctx);
    if (seq)
      sequence_reduce_scatter(ln, out, *seq, "sp MoE output");
    else if (tp_)
      tp_->all_reduce_sum({out, static_cast<size_t>(N * C)}, "tp MoE output");
    k::add_inplace(out, la.resid_mid, Nr * C);
    return;
  }
  linear_forward(la.gate, ln, w.gate_proj, nullptr, N, C, F);
  linear_forward(la.up, ln, w.up_proj, nullptr, N, C, F);
  lora(LoraTarget::gate, la.gate, ln);
  lora(LoraTarget::up, la.up, ln);
  k::swiglu_forward(ctx.act, la.gate, la.up, N, F);
  float* down_out = seq ? ln : out;
  linear_forward(down_out, ctx.act, w.down_proj, nullptr, N, F, C);
  lora(LoraTarget::down, down_out, ctx.act);
  if (seq)  // down is row-parallel
    sequence_reduce_scatter(ln, out, *seq, "sp MLP output");
  else if (tp_)
    tp_->all_reduce_sum({out, static_cast<size_t>(N * C)}, "tp MLP output");
  k::add_inplace(out, la.resid_mid, Nr * C);
}

void Llama::sequence_norm_gather(float* whole, float* slice, float* rstd, const float* x, const WeightRef& weight,
                                 const SequenceShard& seq, const char* what) const {
  const int64_t C = cfg_.dim;
  k::rmsnorm_forward(slice, rstd, x, p(weight), seq.real, C, cfg_.rms_norm_eps);
  std::fill(slice + seq.real * C, slice + seq.rows * C, 0.0f);  // padding rows
  tp_->all_gather({slice, static_cast<size_t>(seq.rows * C)}, {whole, static_cast<size_t>(seq.padded() * C)}, what);
}

void Llama::sequence_reduce_scatter(float* whole, float* slice, const SequenceShard& seq, const char* what) const {
  const int64_t C = cfg_.dim, N = acts_.B * acts_.T;
  std::fill(whole + N * C, whole + seq.padded() * C, 0.0f);  // padding rows
  tp_->reduce_scatter_sum({whole, static_cast<size_t>(seq.padded() * C)}, {slice, static_cast<size_t>(seq.rows * C)},
                          what);
}

LossSum Llama::forward(const int32_t* tokens, const int32_t* targets, int64_t B, int64_t T,
                       const int32_t* doc_start) {
  if (B <= 0 || T <= 0) throw InputError("model", fmt::format("empty batch (B={}, T={})", B, T));
  if (T > cfg_.max_position)
    log::debug("[model] sequence length {} exceeds max_position_embeddings {}", T, cfg_.max_position);
  plan(B, T);
  // V: the columns of the logits (this rank's vocabulary slice under tensor parallelism);
  // ids are of the whole vocabulary.
  const int64_t N = B * T, C = cfg_.dim, V = cfg_.vocab_size, Vfull = full_config().vocab_size;
  ActivationPlan& a = acts_;
  for (int64_t i = 0; i < N; ++i) {
    if (tokens[i] < 0 || tokens[i] >= Vfull)
      throw InputError("model", fmt::format("token id {} at position {} is outside the vocabulary [0, {})",
                                            tokens[i], i, Vfull));
    if (targets && targets[i] != kIgnoreIndex && (targets[i] < 0 || targets[i] >= Vfull))
      throw InputError("model", fmt::format("target id {} at position {} is outside the vocabulary [0, {})",
                                            targets[i], i, Vfull));
  }
  std::memcpy(a.tokens.data(), tokens, static_cast<size_t>(N) * sizeof(int32_t));
  if (targets) std::memcpy(a.targets.data(), targets, static_cast<size_t>(N) * sizeof(int32_t));
  a.key_start.clear();
  a.positions.clear();
  if (doc_start) {
    a.key_start.assign(doc_start, doc_start + N);
    a.positions.resize(static_cast<size_t>(N));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < T; ++t) {
        const int32_t start = doc_start[b * T + t];
        const int32_t prev = t > 0 ? doc_start[b * T + t - 1] : 0;
        // Starts never decrease along a row and never point past the token itself.
        if (start < prev || start > t)
          throw InputError("model", fmt::format("doc_start[{}][{}] = {} is not a valid example start", b, t, start));
        a.positions[static_cast<size_t>(b * T + t)] = static_cast<int32_t>(t - start);
      }
    }
  }
  // A stage below the last has no targets; its forwards in training count as the step's.
  if (training_ && (targets || !last_stage())) forward_dropout_ = dropout_step_++;
  // A trained base may have been updated since the last forward (the optimizer writes
  // through trainable().params): its bf16 copy is made again, once per forward. A
  // parallel context that overwrites weights between uses (ZeRO-3's gathers) marks their
  // copies stale itself when it releases them (drop_bf16).
  if (!base_frozen()) invalidate_bf16();
  if (first_stage()) {
    if (parallel_) parallel_->before_group_forward(ParamGroup::embedding());
    if (sequence_parallel()) {  // vocabulary-parallel partial rows, reduce-scattered into this rank's
      embedding_forward_rows(a.ln, tokens, N);
      sequence_reduce_scatter(a.ln, a.layers[0].resid_in, a.seq, "sp embedding");
    } else {
      embedding_forward(a.layers[0].resid_in, tokens, N);
    }
  }
  const BlockContext ctx = training_context();
  load_balancing_.reset(cfg_.moe.num_experts);
  forward_tokens_ = 0;
  std::vector<int32_t> experts;
  std::vector<float> weights;
  std::vector<uint8_t> keep;
  for (int64_t l = range_.begin; l < range_.end; ++l) {
    if (parallel_) parallel_->before_group_forward(ParamGroup::block(l));
    const LayerActivations& la = a.layers[static_cast<size_t>(l)];
    block_forward(l, la, l + 1 < cfg_.n_layers ? a.layers[static_cast<size_t>(l + 1)].resid_in : a.resid_out, ctx);
    if (cfg_.moe_layer(l)) {
      // The load-balancing loss counts every MoE layer's choices (taken again from its probs,
      // which checkpointing shares between layers).
      const int64_t K = cfg_.moe.top_k;
      experts.resize(static_cast<size_t>(N * K));
      weights.resize(static_cast<size_t>(N * K));
      moe::route_top_k(experts.data(), weights.data(), la.router_probs, N, cfg_.moe.num_experts, K, false);
      load_balancing_.add_layer(la.router_probs, experts.data(), N, K);
      keep.resize(static_cast<size_t>(N * K));
      load_balancing_.add_dropped(moe::keep_within_capacity(keep.data(), experts.data(), N, K, cfg_.moe.num_experts,
                                                            {ctx.expert_capacity, T}),
                                  N * K);
    }
  }
  if (!upstream_router_stats_.empty()) {  // the stages' below (add_upstream_router_statistics)
    std::vector<double> stats = load_balancing_.statistics();
    for (size_t i = 0; i < stats.size(); ++i) stats[i] += upstream_router_stats_[i];
    load_balancing_.set_statistics(stats);
    upstream_router_stats_.clear();
  }
  if (!last_stage()) {
    logits_valid_ = have_targets_ = false;
    stage_forward_done_ = true;
    return {};
  }
  if (parallel_) parallel_->before_group_forward(ParamGroup::head());
  if (sequence_parallel())
    sequence_norm_gather(a.lnf, a.seq_slice, a.lnf_rstd, a.resid_out, layout_.final_norm, a.seq, "sp lm_head input");
  else
    k::rmsnorm_forward(a.lnf, a.lnf_rstd, a.resid_out, p(layout_.final_norm), N, C, cfg_.rms_norm_eps);
  linear_forward(a.logits, a.lnf, layout_.lm_head, nullptr, N, C, V);
  logits_valid_ = true;
  have_targets_ = targets != nullptr;
  LossSum result;
  if (targets) {
    result.num_tokens = tp_ ? vocab_parallel_cross_entropy(targets, N)
                            : k::cross_entropy_forward(a.losses, a.logits, targets, N, V, kIgnoreIndex);
    for (int64_t i = 0; i < N; ++i) result.sum += a.losses[i];
    forward_tokens_ = aux_tokens_ = result.num_tokens;
    if (experts_ && cfg_.is_moe()) {
      // The load-balancing loss over every rank's tokens: its statistics and the target
      // tokens that weight it, summed (set_expert_exchange).
      std::vector<double> stats = load_balancing_.statistics();
      stats.push_back(static_cast<double>(result.num_tokens));
      experts_->sum_over_data(stats);
      aux_tokens_ = static_cast<int64_t>(stats.back());
      stats.pop_back();
      load_balancing_.set_statistics(stats);
    }
  }
  return result;
}

std::span<const float> Llama::logits() const {
  if (!logits_valid_) throw Error("model", "logits are not available: no forward since the last backward");
  return {acts_.logits, static_cast<size_t>(acts_.B * acts_.T * cfg_.vocab_size)};
}

void Llama::backward(float dloss_scale) {
  if (last_stage() ? !have_targets_ || !logits_valid_ : !stage_forward_done_)
    throw Error("model", "backward needs a forward with targets first");
  const int64_t B = acts_.B, T = acts_.T;
  const int64_t N = B * T, C = cfg_.dim, F = cfg_.ffn_dim, V = cfg_.vocab_size;
  const int64_t Dq = cfg_.q_dim(), Dkv = cfg_.kv_dim(), NH = cfg_.n_heads, NKV = cfg_.n_kv_heads;
  const int64_t hd = cfg_.head_dim;
  ActivationPlan& a = acts_;
  const int32_t* key_start = a.key_start.empty() ? nullptr : a.key_start.data();
  const int32_t* positions = a.positions.empty() ? nullptr : a.positions.data();
  // A frozen base has no gradient buffer: every base gradient pointer is null and the
  // kernels skip those products.
  const bool frozen = lora_ != nullptr;
  if (!frozen && quantized())
    throw InputError("model", "backward through a quantized base needs LoRA adapters (the base is frozen)");
  if (!frozen && grads_.empty()) grads_.resize(params_.size());
  float* g = frozen ? nullptr : grads_.data();
  // The gradient of a float tensor; null for an absent or quantized one, or a frozen base.
  auto gp = [&](const WeightRef& ref) { return ref.is_dense() && g ? g + ref.offset() : nullptr; };
  auto adapted = [&](int64_t l, LoraTarget t) { return lora_ && lora_->slot(l, t).active(); };
  const int64_t lowest_layer = frozen ? lora_->first_layer() : 0;
  const size_t bytes_NC = static_cast<size_t>(N * C) * sizeof(float);
  // Sequence parallel (model/tensor_parallel.hpp): d(residual) is this rank's rows,
  // a.seq_dresid, gathered whole into a.dresid where a row-parallel layer's backward needs
  // it; each d(ln) is reduce-scattered into a.seq_slice before the norm's backward on the
  // rows, whose dweight (a.seq_norm_grads, this rank's rows' share) is summed over the tp
  // group before it is added: the sum of all the slices', so replicated as without it.
  const bool sp = sequence_parallel();
  const SequenceShard& seq = a.seq;
  // (Below the last stage, a.seq_dresid holds d(stage_output)'s rows, handed over.)
  if (sp && last_stage()) std::fill(a.seq_dresid, a.seq_dresid + seq.rows * C, 0.0f);
  // dweight (C) of a norm: its share on this rank's rows, into part (C) of a.seq_norm_grads.
  auto seq_norm_backward = [&](float* part, const WeightRef& norm, const float* x, const float* rstd) {
    if (part) std::fill(part, part + C, 0.0f);
    k::rmsnorm_backward(a.seq_dresid, part, a.seq_slice, x, p(norm), rstd, seq.real, C);
  };
  // The parts' sum over the tp group, added into the norms' gradients (null: frozen).
  auto seq_norm_grads_sum = [&](std::initializer_list<std::pair<float*, const WeightRef*>> parts) {
    if (!g) return;
    tp_->all_reduce_sum({a.seq_norm_grads, parts.size() * static_cast<size_t>(C)}, "sp norm weight gradients");
    for (const auto& [part, norm] : parts) k::add_inplace(gp(*norm), part, C);
  };
  auto gather_dresid = [&](const char* what) {
    tp_->all_gather({a.seq_dresid, static_cast<size_t>(seq.rows * C)},
                    {a.dresid, static_cast<size_t>(seq.padded() * C)}, what);
  };

  if (last_stage()) {
    // logits = lnf @ lm_head^T;  lnf = rmsnorm(resid_out)
    if (parallel_) parallel_->before_group_backward(ParamGroup::head());
    if (tp_)
      vocab_parallel_cross_entropy_backward(dloss_scale);
    else
      k::cross_entropy_backward_inplace(a.logits, a.targets.data(), N, V, kIgnoreIndex, dloss_scale);
    logits_valid_ = false;
    std::memset(a.dln, 0, bytes_NC);
    linear_backward(a.dln, gp(layout_.lm_head), nullptr, a.logits, a.lnf, layout_.lm_head, N, C, V);
    // Tensor parallel: lm_head is split by vocabulary rows (column-parallel), so each rank
    // has its slice's share of d(lnf).
    if (sp) {
      sequence_reduce_scatter(a.dln, a.seq_slice, seq, "sp lm_head input gradient");
      seq_norm_backward(g ? a.seq_norm_grads : nullptr, layout_.final_norm, a.resid_out, a.lnf_rstd);
      seq_norm_grads_sum({{a.seq_norm_grads, &layout_.final_norm}});
    } else {
      if (tp_) tp_->all_reduce_sum({a.dln, static_cast<size_t>(N * C)}, "tp lm_head input gradient");
      std::memset(a.dresid, 0, bytes_NC);
      k::rmsnorm_backward(a.dresid, gp(layout_.final_norm), a.dln, a.resid_out, p(layout_.final_norm),
                          a.lnf_rstd, N, C);
    }
    report_ready(static_cast<size_t>(cfg_.n_layers));  // the head
  }
  // Otherwise a.dresid holds d(stage_output), handed over by the next stage.
  stage_forward_done_ = false;

  for (int64_t l = range_.end - 1; l >= std::max(lowest_layer, range_.begin); --l) {
    const LayerParams& w = layout_.layers[static_cast<size_t>(l)];
    LayerActivations& la = a.layers[static_cast<size_t>(l)];
    if (parallel_) parallel_->before_group_backward(ParamGroup::block(l));
    // Checkpointing: this block's activations again, from its kept input (the last block's
    // are still there from forward). Its output goes to a.dln, free until it is zeroed below.
    if (grad_checkpoint_ && l + 1 < cfg_.n_layers) block_forward(l, la, a.dln, training_context());
    // a.dresid holds d(out) of this block; the residual passes it to resid_mid unchanged.
    // out = resid_mid + act @ wdown^T;  act = silu(gate) * up (recomputed, not stored)
    if (cfg_.moe_layer(l)) {
      // ln2 = rmsnorm(resid_mid) (recomputed); the mixture adds d(out)/d(ln2) into a.dln.
      if (sp) {
        gather_dresid("sp MoE output gradient");  // d(out), whole: every token's rows
        sequence_norm_gather(a.ln, a.seq_slice, la.ln2_rstd, la.resid_mid, w.ln2, seq, "sp MoE input");
      } else {
        k::rmsnorm_forward(a.ln, la.ln2_rstd, la.resid_mid, p(w.ln2), N, C, cfg_.rms_norm_eps);
      }
      std::memset(a.dln, 0, bytes_NC);
      const float aux_scale = cfg_.moe.output_router_logits
                                  ? cfg_.moe.router_aux_loss_coef * dloss_scale * static_cast<float>(aux_tokens_)
                                  : 0.0f;
      moe_backward(l, la, a.dln, a.dresid, a.ln, g, aux_scale);
      // Tensor parallel: the experts' gate and up are column-parallel, so each rank has its
      // slices' share of d(ln2) (f's backward; the router's share is rank 0's alone).
      if (sp)
        sequence_reduce_scatter(a.dln, a.seq_slice, seq, "sp MoE input gradient");
      else if (tp_)
        tp_->all_reduce_sum({a.dln, static_cast<size_t>(N * C)}, "tp MoE input gradient");
    } else {
    if (sp) gather_dresid("sp MLP output gradient");  // d(out), whole, for down's backward
    // The recomputed inputs of a layer's products are read only by their weight gradients
    // and adapters: a frozen base with no adapter there (LoRA on q,k,v,o) skips them.
    if (g || adapted(l, LoraTarget::down)) k::swiglu_forward(a.act, la.gate, la.up, N, F);
    std::memset(a.dact, 0, static_cast<size_t>(N * F) * sizeof(float));
    linear_backward(a.dact, gp(w.down_proj), nullptr, a.dresid, a.act, w.down_proj, N, F, C);
    lora_backward(l, LoraTarget::down, a.dact, a.dresid, a.act);
    k::swiglu_backward(a.dgate, a.dup, a.dact, la.gate, la.up, N, F);
    // gate = ln2 @ wgate^T; up = ln2 @ wup^T;  ln2 = rmsnorm(resid_mid) (recomputed)
    if (sp)
      sequence_norm_gather(a.ln, a.seq_slice, la.ln2_rstd, la.resid_mid, w.ln2, seq, "sp MLP input");
    else if (g || adapted(l, LoraTarget::gate) || adapted(l, LoraTarget::up))
      k::rmsnorm_forward(a.ln, la.ln2_rstd, la.resid_mid, p(w.ln2), N, C, cfg_.rms_norm_eps);
    std::memset(a.dln, 0, bytes_NC);
    linear_backward(a.dln, gp(w.gate_proj), nullptr, a.dgate, a.ln, w.gate_proj, N, C, F);
    linear_backward(a.dln, gp(w.up_proj), nullptr, a.dup, a.ln, w.up_proj, N, C, F);
    lora_backward(l, LoraTarget::gate, a.dln, a.dgate, a.ln);
    lora_backward(l, LoraTarget::up, a.dln, a.dup, a.ln);
    // Tensor parallel: gate and up are column-parallel; each rank has its columns' share of
    // d(ln2) (f's backward).
    if (sp)
      sequence_reduce_scatter(a.dln, a.seq_slice, seq, "sp MLP input gradient");
    else if (tp_)
      tp_->all_reduce_sum({a.dln, static_cast<size_t>(N * C)}, "tp MLP input gradient");
    }
    float* ln1_part = sp && g ? a.seq_norm_grads : nullptr;
    float* ln2_part = sp && g ? a.seq_norm_grads + C : nullptr;
    if (sp) {
      seq_norm_backward(ln2_part, w.ln2, la.resid_mid, la.ln2_rstd);
      gather_dresid("sp attention output gradient");  // d(resid_mid), whole, for o's backward
    } else {
      k::rmsnorm_backward(a.dresid, gp(w.ln2), a.dln, la.resid_mid, p(w.ln2), la.ln2_rstd, N, C);
    }
    // a.dresid is now d(resid_mid). resid_mid = resid_in + attn_out @ wo^T
    std::memset(a.dattn_out, 0, static_cast<size_t>(N * Dq) * sizeof(float));
    linear_backward(a.dattn_out, gp(w.o_proj), nullptr, a.dresid, la.attn_out, w.o_proj, N, Dq, C);
    lora_backward(l, LoraTarget::o, a.dattn_out, a.dresid, la.attn_out);
    std::memset(a.dq, 0, static_cast<size_t>(N * Dq) * sizeof(float));
    std::memset(a.dk, 0, static_cast<size_t>(N * Dkv) * sizeof(float));
    std::memset(a.dv, 0, static_cast<size_t>(N * Dkv) * sizeof(float));
    k::attention_backward(a.dq, a.dk, a.dv, a.dprobs, a.dattn_out, la.q, la.k, la.v, la.probs, B, T, T,
                          NH, NKV, hd, key_start, matmul_input_);
    k::rope_backward(a.dq, a.rope_cos, a.rope_sin, B, T, NH, hd, positions);
    k::rope_backward(a.dk, a.rope_cos, a.rope_sin, B, T, NKV, hd, positions);
    // q = ln1 @ wq^T + bq (k, v alike);  ln1 = rmsnorm(resid_in) (recomputed)
    if (sp)
      sequence_norm_gather(a.ln, a.seq_slice, la.ln1_rstd, la.resid_in, w.ln1, seq, "sp attention input");
    else
      k::rmsnorm_forward(a.ln, la.ln1_rstd, la.resid_in, p(w.ln1), N, C, cfg_.rms_norm_eps);
    std::memset(a.dln, 0, bytes_NC);
    // Below the lowest trained layer nothing needs d(ln1): skip those products.
    float* dln1 = frozen && l == lowest_layer ? nullptr : a.dln;
    linear_backward(dln1, gp(w.q_proj), gp(w.q_bias), a.dq, a.ln, w.q_proj, N, C, Dq);
    linear_backward(dln1, gp(w.k_proj), gp(w.k_bias), a.dk, a.ln, w.k_proj, N, C, Dkv);
    linear_backward(dln1, gp(w.v_proj), gp(w.v_bias), a.dv, a.ln, w.v_proj, N, C, Dkv);
    lora_backward(l, LoraTarget::q, dln1, a.dq, a.ln);
    lora_backward(l, LoraTarget::k, dln1, a.dk, a.ln);
    lora_backward(l, LoraTarget::v, dln1, a.dv, a.ln);
    if (sp && dln1)
      sequence_reduce_scatter(dln1, a.seq_slice, seq, "sp attention input gradient");
    else if (tp_ && dln1)
      tp_->all_reduce_sum({dln1, static_cast<size_t>(N * C)}, "tp attention input gradient");
    if (l == lowest_layer && frozen) {  // nothing below is trained
      report_ready(static_cast<size_t>(l));
      break;
    }
    if (sp) {
      seq_norm_backward(ln1_part, w.ln1, la.resid_in, la.ln1_rstd);
      seq_norm_grads_sum({{ln1_part, &w.ln1}, {ln2_part, &w.ln2}});
    } else {
      k::rmsnorm_backward(a.dresid, gp(w.ln1), a.dln, la.resid_in, p(w.ln1), la.ln1_rstd, N, C);
    }
    report_ready(static_cast<size_t>(l));
    // a.dresid is now d(resid_in) = d(out) of the block below.
  }
  if (first_stage()) {
    // resid_in of layer 0 = embed_tokens[tokens]
    if (parallel_) parallel_->before_group_backward(ParamGroup::embedding());
    if (!frozen && sp) gather_dresid("sp embedding gradient");
    if (!frozen && tp_)  // this rank's vocabulary rows (a.dresid is the same on every rank)
      k::embedding_backward_rows(g + layout_.embed.offset(), a.dresid, a.tokens.data(), N, C, vocab_.begin,
                                 vocab_.end);
    else if (!frozen)
      k::embedding_backward(g + layout_.embed.offset(), a.dresid, a.tokens.data(), N, C);
    report_ready(static_cast<size_t>(cfg_.n_layers) + 1);  // the embedding
  }
  have_targets_ = false;
}

void Llama::lora_backward(int64_t l, LoraTarget t, float* dx, const float* dout, const float* x) {
  if (!lora_) return;
  const LoraSlot& s = lora_->slot(l, t);
  if (!s.active()) return;
  ActivationPlan& a = acts_;
  const int64_t N = a.B * a.T;
  const bool dropout = lora_->config().dropout > 0.0f && training_;
  const int64_t r = lora_->config().rank;
  const float* adapters = lora_->params().data();
  float* lg = lora_->grads().data();
  const float* u = a.layers[static_cast<size_t>(l)].lora_u[static_cast<size_t>(t)];
  std::memset(a.lora_g, 0, static_cast<size_t>(N * r) * sizeof(float));
  k::matmul_backward(a.lora_g, lg + s.b, nullptr, dout, u, adapters + s.b, N, r, s.out, adapter_input());
  k::scale_inplace(a.lora_g, N * r, lora_->config().scale());
  // Tensor parallel, a column-parallel target: B holds this rank's output rows, so du is
  // this rank's share; d(x) takes the share (d(ln) is all-reduced after), and A, replicated,
  // takes du summed over the tp group. A row-parallel target (lora_row_parallel_forward):
  // du is whole, A and x this rank's columns: as on one rank.
  auto input_backward = [&](float* dinp, const float* xd) {
    if (!tp_ || lora_row_parallel(t)) {
      k::matmul_backward(dinp, lg + s.a, nullptr, a.lora_g, xd, adapters + s.a, N, s.in, r, adapter_input());
      return;
    }
    if (dinp) k::matmul_backward(dinp, nullptr, nullptr, a.lora_g, xd, adapters + s.a, N, s.in, r, adapter_input());
    tp_->all_reduce_sum({a.lora_g, static_cast<size_t>(N * r)}, "tp LoRA gradient");
    k::matmul_backward(nullptr, lg + s.a, nullptr, a.lora_g, xd, adapters + s.a, N, s.in, r, adapter_input());
  };
  if (!dropout || dx == nullptr) {
    const float* xd = x;
    if (dropout) {
      lora_dropout(*lora_, l, t, a.lora_xd, x, N, dropout_seed(l, t), false);
      xd = a.lora_xd;
    }
    input_backward(dx, xd);
    return;
  }
  lora_dropout(*lora_, l, t, a.lora_xd, x, N, dropout_seed(l, t), false);
  std::memset(a.lora_dxd, 0, static_cast<size_t>(N * s.in) * sizeof(float));
  input_backward(a.lora_dxd, a.lora_xd);
  lora_dropout(*lora_, l, t, dx, a.lora_dxd, N, dropout_seed(l, t), true);
}

void Llama::lora_dropout(const LoraAdapters& lora, int64_t l, LoraTarget t, float* out, const float* x, int64_t N,
                         uint64_t seed, bool backward) const {
  const int64_t in = lora.slot(l, t).in;
  const float p = lora.config().dropout;
  if (tp_ && lora_row_parallel(t)) {
    const int64_t T = tp_->tp_size(), first = in * tp_->tp_rank();
    if (backward)
      k::dropout_backward_columns(out, x, N, in, in * T, first, p, seed);
    else
      k::dropout_forward_columns(out, x, N, in, in * T, first, p, seed);
  } else if (backward) {
    k::dropout_backward(out, x, N * in, p, seed);
  } else {
    k::dropout_forward(out, x, N * in, p, seed);
  }
}

void Llama::moe_forward(int64_t l, const LayerActivations& la, float* out, const float* ln,
                        const BlockContext& ctx) const {
  const int64_t N = ctx.B * ctx.T, C = cfg_.dim, E = cfg_.moe.num_experts, K = cfg_.moe.top_k;
  const int64_t Fe = cfg_.moe.expert_ffn_dim, Fs = cfg_.moe.shared_expert_ffn_dim;
  const LayerParams& w = layout_.layers[static_cast<size_t>(l)];
  // Route: probs = softmax(ln @ router^T) in float32; each token's top K and their weights.
  linear_forward(la.router_probs, ln, w.router, nullptr, N, C, E);
  moe::router_softmax(la.router_probs, la.router_probs, N, E);
  std::vector<int32_t> experts(static_cast<size_t>(N * K));
  std::vector<float> weights(static_cast<size_t>(N * K));
  moe::route_top_k(experts.data(), weights.data(), la.router_probs, N, E, K, cfg_.moe.norm_topk_prob);
  // Dispatch: the tokens' rows in expert order (those over capacity dropped).
  const moe::Dispatch d = moe::plan_dispatch(experts.data(), N, K, E, {ctx.expert_capacity, ctx.T});
  moe::dispatch_gather(ctx.moe_rows, ln, d, C);
  // Qwen2-MoE's shared expert: out += sigmoid(ln @ shared_expert_gate^T) * mlp(ln). Its
  // products that read ln come first: after them `out` may be ln itself (block_forward).
  auto lora = [&](LoraTarget t, float* y, const float* x) { adapter_forward(l, t, y, x, la, ctx); };
  if (Fs > 0) {
    linear_forward(la.gate, ln, w.gate_proj, nullptr, N, C, Fs);
    linear_forward(la.up, ln, w.up_proj, nullptr, N, C, Fs);
    lora(LoraTarget::gate, la.gate, ln);
    lora(LoraTarget::up, la.up, ln);
    linear_forward(la.shared_gate, ln, w.shared_expert_gate, nullptr, N, C, 1);
  }
  if (ctx.expert_parallel) {
    ep_experts_forward(l, d, ctx.moe_rows, la.expert_out, ctx);
  } else {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = d.rows(e), r = d.offsets[static_cast<size_t>(e)];
      if (n == 0) continue;
      expert_forward(w.experts[static_cast<size_t>(e)],
                     {ctx.moe_rows + r * C, la.expert_gate + r * Fe, la.expert_up + r * Fe, n}, ctx.act + r * Fe,
                     la.expert_out + r * C, {l, e, r, ctx.lora, ctx.dropout_step});
    }
  }
  // Combine: out[token] = sum of its rows' outputs times their weights.
  std::memset(out, 0, static_cast<size_t>(N * C) * sizeof(float));
  moe::combine(out, la.expert_out, weights.data(), d, C);
  if (Fs == 0) return;
  k::swiglu_forward(ctx.act, la.gate, la.up, N, Fs);
  linear_forward(la.shared_out, ctx.act, w.down_proj, nullptr, N, Fs, C);
  lora(LoraTarget::down, la.shared_out, ctx.act);
  for (int64_t i = 0; i < N; ++i) {
    const float s = 1.0f / (1.0f + std::exp(-la.shared_gate[i]));
    for (int64_t c = 0; c < C; ++c) out[i * C + c] += s * la.shared_out[i * C + c];
  }
}

void Llama::expert_forward(const ExpertParams& ew, const ExpertRows& x, float* act, float* out,
                           const ExpertRun& run) const {
  const int64_t C = cfg_.dim, Fe = cfg_.moe.expert_ffn_dim;
  auto lora = [&](ExpertProj p, float* y, const float* in) {
    if (run.lora)
      run.lora->expert_forward(run.layer, p, run.expert, y, in, x.n, run.dropout_seed(p), adapter_input(), tp_);
  };
  linear_forward(x.gate, x.rows, ew.gate_proj, nullptr, x.n, C, Fe);
  linear_forward(x.up, x.rows, ew.up_proj, nullptr, x.n, C, Fe);
  lora(ExpertProj::gate, x.gate, x.rows);
  lora(ExpertProj::up, x.up, x.rows);
  k::swiglu_forward(act, x.gate, x.up, x.n, Fe);
  linear_forward(out, act, ew.down_proj, nullptr, x.n, Fe, C);
  lora(ExpertProj::down, out, act);
}

Llama::ExpertRun Llama::backward_run(int64_t l, int64_t e, int64_t block) const {
  ExpertRun run{l, e, block, lora_, std::nullopt};
  if (lora_ && training_ && lora_->config().dropout > 0.0f) run.dropout_step = forward_dropout_;
  return run;
}

void Llama::expert_backward(const ExpertParams& ew, const ExpertRows& x, const float* dout, float* dx, float* g,
                            const ExpertScratch& s, const ExpertRun& run) {
  const int64_t C = cfg_.dim, Fe = cfg_.moe.expert_ffn_dim, n = x.n;
  auto gp = [&](const WeightRef& ref) { return ref.is_dense() && g ? g + ref.offset() : nullptr; };
  // The expert's adapters: d(their input) into din, their gradients into lora_'s.
  LoraAdapters* lora = run.lora ? lora_ : nullptr;
  auto lora_backward = [&](ExpertProj p, float* din, const float* d, const float* in) {
    if (lora) lora->expert_backward(run.layer, p, run.expert, din, d, in, n, run.dropout_seed(p), adapter_input(), tp_);
  };
  // out = act @ down^T (+ its adapter's);  act = silu(gate) * up (recomputed)
  k::swiglu_forward(s.act, x.gate, x.up, n, Fe);
  std::memset(s.dact, 0, static_cast<size_t>(n * Fe) * sizeof(float));
  linear_backward(s.dact, gp(ew.down_proj), nullptr, dout, s.act, ew.down_proj, n, Fe, C);
  lora_backward(ExpertProj::down, s.dact, dout, s.act);
  k::swiglu_backward(s.dgate, s.dup, s.dact, x.gate, x.up, n, Fe);
  // gate = rows @ gate_proj^T, up = rows @ up_proj^T (dout is spent: dx may be it)
  std::memset(dx, 0, static_cast<size_t>(n * C) * sizeof(float));
  linear_backward(dx, gp(ew.gate_proj), nullptr, s.dgate, x.rows, ew.gate_proj, n, C, Fe);
  linear_backward(dx, gp(ew.up_proj), nullptr, s.dup, x.rows, ew.up_proj, n, C, Fe);
  lora_backward(ExpertProj::gate, dx, s.dgate, x.rows);
  lora_backward(ExpertProj::up, dx, s.dup, x.rows);
}

void Llama::moe_backward(int64_t l, const LayerActivations& la, float* dln, const float* dout, const float* ln,
                         float* g, float aux_scale) {
  ActivationPlan& a = acts_;
  const int64_t N = a.B * a.T, C = cfg_.dim, E = cfg_.moe.num_experts, K = cfg_.moe.top_k;
  const int64_t Fe = cfg_.moe.expert_ffn_dim, Fs = cfg_.moe.shared_expert_ffn_dim;
  const LayerParams& w = layout_.layers[static_cast<size_t>(l)];
  auto gp = [&](const WeightRef& ref) { return ref.is_dense() && g ? g + ref.offset() : nullptr; };
  // The routing and dispatch of forward again, from the kept probs.
  std::vector<int32_t> experts(static_cast<size_t>(N * K));
  std::vector<float> weights(static_cast<size_t>(N * K));
  moe::route_top_k(experts.data(), weights.data(), la.router_probs, N, E, K, cfg_.moe.norm_topk_prob);
  const moe::Dispatch d = moe::plan_dispatch(experts.data(), N, K, E, expert_capacity(a.T));
  moe::dispatch_gather(a.moe_rows, ln, d, C);
  // out = sum over rows of weight * expert_out  =>  drows, dweights
  moe::combine_backward(a.drows, a.dweights, dout, la.expert_out, weights.data(), d, C);
  // Tensor parallel: expert_out is this rank's partial sum, so dweights (dout . expert_out)
  // is its share: summed, every rank's router gets the one-rank gradient, bit for bit alike.
  if (tp_) tp_->all_reduce_sum({a.dweights, static_cast<size_t>(N * K)}, "tp MoE combine weights gradient");
  // The router's and the shared gate's (replicated) shares of d(ln), added on tp rank 0
  // only: the caller sums d(ln) over the tp group.
  float* dln_replicated = !tp_ || tp_->tp_rank() == 0 ? dln : nullptr;
  if (experts_ && experts_->ep_size() > 1) {
    ep_experts_backward(l, d, a.drows, g);
  } else {
    // Each expert's block of drows turns from d(expert_out) into d(rows) in place.
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = d.rows(e), r = d.offsets[static_cast<size_t>(e)];
      if (n == 0) continue;
      float* drows = a.drows + r * C;
      expert_backward(w.experts[static_cast<size_t>(e)],
                      {a.moe_rows + r * C, la.expert_gate + r * Fe, la.expert_up + r * Fe, n}, drows, drows, g,
                      {a.act + r * Fe, a.dact + r * Fe, a.dgate + r * Fe, a.dup + r * Fe}, backward_run(l, e, r));
    }
  }
  // rows = ln[token]
  moe::dispatch_gather_backward(dln, a.drows, d, C);
  // weights = top_k(probs) (renormalised), the aux loss reads probs; probs = softmax(logits);
  // logits = ln @ router^T
  moe::route_top_k_backward(a.drouter, a.dweights, experts.data(), weights.data(), la.router_probs, N, E, K,
                            cfg_.moe.norm_topk_prob);
  if (aux_scale != 0.0f) load_balancing_.backward(a.drouter, N, aux_scale);
  moe::router_softmax_backward(a.drouter, a.drouter, la.router_probs, N, E);
  linear_backward(dln_replicated, gp(w.router), nullptr, a.drouter, ln, w.router, N, C, E);
  if (Fs == 0) return;
  // out += s * shared_out, s = sigmoid(z), z = ln @ shared_expert_gate^T
  //   => dshared_out = s * dout (into drows, free again), dz = (dout . shared_out) s (1 - s)
  float* dshared = a.drows;
  float* dz = a.dweights;  // (N) of its N * K
  for (int64_t i = 0; i < N; ++i) {
    const float s = 1.0f / (1.0f + std::exp(-la.shared_gate[i]));
    double dot = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      dot += static_cast<double>(dout[i * C + c]) * la.shared_out[i * C + c];
      dshared[i * C + c] = s * dout[i * C + c];
    }
    dz[i] = static_cast<float>(dot) * s * (1.0f - s);
  }
  // Tensor parallel: shared_out is a partial sum, and so is dz (linear in it).
  if (tp_) tp_->all_reduce_sum({dz, static_cast<size_t>(N)}, "tp shared expert gate gradient");
  // shared_out = down(silu(gate(ln)) * up(ln)), as a dense MLP of width Fs
  k::swiglu_forward(a.act, la.gate, la.up, N, Fs);
  std::memset(a.dact, 0, static_cast<size_t>(N * Fs) * sizeof(float));
  linear_backward(a.dact, gp(w.down_proj), nullptr, dshared, a.act, w.down_proj, N, Fs, C);
  lora_backward(l, LoraTarget::down, a.dact, dshared, a.act);
  k::swiglu_backward(a.dgate, a.dup, a.dact, la.gate, la.up, N, Fs);
  linear_backward(dln, gp(w.gate_proj), nullptr, a.dgate, ln, w.gate_proj, N, C, Fs);
  linear_backward(dln, gp(w.up_proj), nullptr, a.dup, ln, w.up_proj, N, C, Fs);
  lora_backward(l, LoraTarget::gate, dln, a.dgate, ln);
  lora_backward(l, LoraTarget::up, dln, a.dup, ln);
  linear_backward(dln_replicated, gp(w.shared_expert_gate), nullptr, dz, ln, w.shared_expert_gate, N, C, 1);
}

std::span<const float> Llama::router_probs(int64_t l) const {
  if (!cfg_.moe_layer(l)) throw Error("model", fmt::format("layer {} is not a mixture-of-experts layer", l));
  return {acts_.layers[static_cast<size_t>(l)].router_probs,
          static_cast<size_t>(acts_.B * acts_.T * cfg_.moe.num_experts)};
}

void Llama::set_layer_range(LayerRange range) {
  if (range.begin < 0 || range.begin >= range.end || range.end > cfg_.n_layers)
    throw Error("model", fmt::format("layer range [{}, {}) is not a non-empty range of the model's {} layers",
                                     range.begin, range.end, cfg_.n_layers));
  range_ = range;
  logits_valid_ = have_targets_ = stage_forward_done_ = false;
}

// Under sequence parallelism the residual stream between stages is this rank's rows of it
// (acts_.seq.rows, C), and so is its gradient (a.seq_dresid): a stage hands over 1/tp.
size_t Llama::stage_floats() const {
  const int64_t rows = sequence_parallel() ? acts_.seq.rows : acts_.B * acts_.T;
  return static_cast<size_t>(rows * cfg_.dim);
}

std::span<float> Llama::stage_input(int64_t B, int64_t T) {
  if (B <= 0 || T <= 0) throw InputError("model", fmt::format("empty batch (B={}, T={})", B, T));
  plan(B, T);
  return {acts_.layers[static_cast<size_t>(range_.begin)].resid_in, stage_floats()};
}

std::span<const float> Llama::stage_output() const {
  const float* out = last_stage() ? acts_.resid_out : acts_.layers[static_cast<size_t>(range_.end)].resid_in;
  return {out, stage_floats()};
}

std::span<float> Llama::stage_output_grad() {
  if (last_stage()) throw Error("model", "the last stage computes its output's gradient from the loss");
  return {sequence_parallel() ? acts_.seq_dresid : acts_.dresid, stage_floats()};
}

std::span<const float> Llama::stage_input_grad() const {
  if (lora_ && lora_->first_layer() >= range_.begin) return {};
  return {sequence_parallel() ? acts_.seq_dresid : acts_.dresid, stage_floats()};
}

void Llama::swap_forward_slot(ForwardSlot& slot) {
  std::swap(acts_, slot.acts);
  std::swap(have_targets_, slot.have_targets);
  std::swap(logits_valid_, slot.logits_valid);
  std::swap(stage_forward_done_, slot.stage_forward_done);
  std::swap(forward_dropout_, slot.forward_dropout);
  std::swap(load_balancing_, slot.load_balancing);
  std::swap(aux_tokens_, slot.aux_tokens);
  std::swap(ep_shards_, slot.ep_shards);
  // A new slot's: one per layer (set_expert_exchange sized the model's own).
  if (experts_ && ep_shards_.size() != static_cast<size_t>(cfg_.n_layers))
    ep_shards_.assign(static_cast<size_t>(cfg_.n_layers), {});
}

void Llama::add_upstream_router_statistics(std::span<const double> stats) {
  if (stats.size() != router_statistics_size())
    throw Error("model", fmt::format("router statistics of {} values, not {}", stats.size(), router_statistics_size()));
  upstream_router_stats_.assign(stats.begin(), stats.end());
}

std::vector<double> Llama::router_totals() const {
  std::vector<double> totals = load_balancing_.statistics();
  totals.push_back(static_cast<double>(aux_tokens_));
  return totals;
}

void Llama::set_router_totals(std::span<const double> totals) {
  if (totals.size() != router_statistics_size() + 1)
    throw Error("model", fmt::format("router totals of {} values, not {}", totals.size(), router_statistics_size() + 1));
  load_balancing_.reset(cfg_.moe.num_experts);
  load_balancing_.set_statistics(totals.first(router_statistics_size()));
  aux_tokens_ = static_cast<int64_t>(totals.back());
}

void Llama::set_parallel_context(ParallelContext* context) {
  parallel_ = context;
  ready_groups_.clear();
  if (parallel_) ready_groups_ = grad_groups();
}

std::vector<std::vector<GradSpan>> Llama::grad_groups() const {
  if (!lora_ && quantized())
    throw InputError("model", "a quantized model cannot be fully fine-tuned: de-quantize first "
                              "(flotilla fuse --de-quantize, or flotilla convert without --quantize), or train LoRA adapters");
  std::vector<std::vector<GradSpan>> groups(static_cast<size_t>(cfg_.n_layers) + 2);
  // Group each trainable tensor by the layer its name holds ("...layers.7...."), else the
  // embedding or the head; each range reaches up to the next tensor in memory.
  const ParamTable& table = lora_ ? lora_->table() : static_cast<const ParamTable&>(layout_);
  std::vector<const ParamInfo*> by_offset;
  for (const ParamInfo& info : table.params()) by_offset.push_back(&info);
  std::sort(by_offset.begin(), by_offset.end(), [](const ParamInfo* a, const ParamInfo* b) { return a->offset < b->offset; });
  for (size_t i = 0; i < by_offset.size(); ++i) {
    const ParamInfo& info = *by_offset[i];
    const int64_t end = i + 1 < by_offset.size() ? by_offset[i + 1]->offset : table.total_numel();
    size_t group = static_cast<size_t>(cfg_.n_layers);  // the head
    if (const size_t at = info.name.find("layers."); at != std::string::npos) {
      group = static_cast<size_t>(std::stoll(info.name.substr(at + 7)));
    } else if (info.name == "model.embed_tokens.weight") {
      group = static_cast<size_t>(cfg_.n_layers) + 1;
    }
    groups[group].push_back({info.offset, end});
  }
  // Within a group, the highest offset first: buckets then grow downward in memory.
  for (auto& g : groups)
    std::sort(g.begin(), g.end(), [](const GradSpan& a, const GradSpan& b) { return a.begin > b.begin; });
  return groups;
}

std::vector<GradSpan> Llama::grad_ready_order() const {
  const std::vector<std::vector<GradSpan>> groups = grad_groups();
  std::vector<GradSpan> order;
  const size_t L = static_cast<size_t>(cfg_.n_layers);
  for (const GradSpan& s : groups[L]) order.push_back(s);
  for (size_t l = L; l-- > 0;)
    for (const GradSpan& s : groups[l]) order.push_back(s);
  for (const GradSpan& s : groups[L + 1]) order.push_back(s);
  return order;
}

void Llama::report_ready(size_t group) const {
  if (!parallel_) return;
  for (const GradSpan& s : ready_groups_[group]) parallel_->grad_ready(s);
}

}  // namespace flotilla::model
