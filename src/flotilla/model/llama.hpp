// The Llama-family decoder (llama, mistral, qwen2): forward to logits and loss, backward
// to every parameter's gradient, in the llm.c style — activations live in one buffer
// planned for the step shape (B, T) and carved into views; nothing is allocated per op.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "flotilla/base/buffer.hpp"
#include "flotilla/io/non_finite.hpp"
#include "flotilla/kernels/gemm.hpp"
#include "flotilla/model/config.hpp"
#include "flotilla/model/expert_exchange.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/model/moe.hpp"
#include "flotilla/model/parallel_context.hpp"
#include "flotilla/model/params.hpp"
#include "flotilla/model/tensor_parallel.hpp"
#include "flotilla/tensor/quant.hpp"

namespace flotilla::model {

inline constexpr int32_t kIgnoreIndex = -100;  // targets to skip, as PyTorch's default

// Per-layer activations kept from forward for backward. Cheap ones (the RMSNorm outputs
// and the SwiGLU product) are recomputed in backward instead of stored. With gradient
// checkpointing only resid_in is per layer; the other views of every layer point at one
// shared set, recomputed in backward.
struct LayerActivations {
  float* resid_in;   // (B, T, C)   layer input, the residual stream
  float* ln1_rstd;   // (B, T)
  float* q;          // (B, T, NH, hd)  after rope
  float* k;          // (B, T, NKV, hd) after rope
  float* v;          // (B, T, NKV, hd)
  float* probs;      // (B, NH, T, T)   attention weights
  float* attn_out;   // (B, T, NH, hd)  before o_proj
  float* resid_mid;  // (B, T, C)   after the attention residual
  float* ln2_rstd;   // (B, T)
  float* gate;       // (B, T, F)   F = cfg.dense_mlp_dim(l): the dense MLP or the shared expert
  float* up;         // (B, T, F)
  // Mixture-of-experts layers (model/moe.hpp's vocabulary); null in dense layers.
  float* router_probs;   // (B*T, E)      softmax of the router logits
  float* expert_gate;    // (B*T*K, Fe)   the gathered rows' gate_proj outputs, in dispatch order
  float* expert_up;      // (B*T*K, Fe)
  float* expert_out;     // (B*T*K, C)    each row's expert output, before its combine weight
  float* shared_out;     // (B*T, C)      the shared expert's output, before its gate (Qwen2-MoE)
  float* shared_gate;    // (B*T)         the shared expert gate's logit
  // LoRA: scale * dropout(x) A^T per adapted linear layer, (B, T, rank); null if not adapted.
  std::array<float*, kNumLoraTargets> lora_u{};
};

// What differs between the two uses of one decoder block (Llama::block_forward): training
// runs it on a whole sequence whose queries attend over their own keys and keeps every
// activation for backward; KV-cache decoding runs it on the new positions only, writes
// their keys and values into the cache after the ones already there, attends over the
// whole cache, and keeps nothing. The block reads its inputs and writes its outputs
// through a LayerActivations; this says what its attention sees and where its scratch is.
struct BlockContext {
  int64_t B = 0, T = 0;        // queries (B, T)
  int64_t Tk = 0;              // keys per row the queries attend over (T in training)
  // (B, Tk, NKV, hd) the keys and values attended over, which the block's own k and v
  // (its LayerActivations') are part of; null: only the block's own (training).
  const float* keys = nullptr;
  const float* values = nullptr;
  const float* rope_cos = nullptr;     // (T, hd/2)  rotary tables of the queries' positions
  const float* rope_sin = nullptr;     // (T, hd/2)
  const int32_t* positions = nullptr;  // (B, T) rows packing several examples: positions in them; or null
  const int32_t* key_start = nullptr;  // (B, T) the first key each query may attend to; or null
  float* ln = nullptr;                 // (B, T, C)  scratch: an RMSNorm output
  float* act = nullptr;                // (B*T*max(F, K*Fe))  scratch: silu(gate) * up
  float* moe_rows = nullptr;           // (B*T*K, C)  scratch: MoE layers' gathered rows
  // MoE layers run this rank's experts only and exchange rows (Llama::set_expert_exchange):
  // training forwards under ep > 1. KV-cache decoding runs every expert itself.
  bool expert_parallel = false;
  // Training forwards with an expert capacity (Llama::set_expert_capacity): at most this
  // many of a sequence's assignments per expert (moe::Capacity); 0: dropless.
  int64_t expert_capacity = 0;
  float* lora_xd = nullptr;            // (B, T, max(C, F, Fs))  scratch: LoRA's dropped-out input
  const LoraAdapters* lora = nullptr;  // applied on the fly; null: none
  // LoRA dropout's training-forward count (see lora_dropout_seed); none: no dropout.
  std::optional<uint64_t> dropout_step;
  // Sequence parallelism (training under tensor parallelism; null: none): the block's
  // input and output, resid_in and resid_mid are this rank's token rows (seq->rows, C), ln
  // the gathered rows (seq->padded(), C), seq_slice (seq->rows, C) scratch for a norm's slice.
  const SequenceShard* seq = nullptr;
  float* seq_slice = nullptr;
};

// One allocation for all activations and backward scratch of a step shape.
struct ActivationPlan {
  int64_t B = 0, T = 0;
  Buffer<float> memory;
  std::vector<LayerActivations> layers;
  float* resid_out;  // (B, T, C)  output of the last block
  float* lnf;        // (B, T, C)  final norm output
  float* lnf_rstd;   // (B, T)
  float* logits;     // (B, T, V)  becomes dlogits in backward
  float* losses;     // (B, T)
  float* rope_cos;   // (T, hd/2)
  float* rope_sin;   // (T, hd/2)
  // Scratch, shared by all layers.
  float* ln;         // (B, T, C)   an RMSNorm output being used
  float* dresid;     // (B, T, C)   gradient of the residual stream
  float* dln;        // (B, T, C)
  float* dq;         // (B, T, NH, hd)
  float* dk;         // (B, T, NKV, hd)
  float* dv;         // (B, T, NKV, hd)
  float* dattn_out;  // (B, T, NH, hd)
  float* dprobs;     // (B, NH, T, T)
  float* act;        // (B*T*Fa)   silu(gate) * up; Fa = max(F, K*Fe) over the layers
  float* dact;       // (B*T*Fa)
  float* dgate;      // (B*T*Fa)
  float* dup;        // (B*T*Fa)
  float* moe_rows;   // (B*T*K, C)  MoE: the gathered rows
  float* drows;      // (B*T*K, C)  MoE: their gradients
  float* drouter;    // (B*T, E)    MoE: gradient of the router probs, then of its logits
  float* dweights;   // (B*T*K)     MoE: gradient of the combine weights
  float* lora_g;     // (B, T, rank)       LoRA: gradient of the low-rank activation
  float* lora_xd;    // (B, T, max(C, F))  LoRA: the dropped-out input, regenerated in backward
  float* lora_dxd;   // (B, T, max(C, F))
  // Sequence parallelism (Llama::set_sequence_parallel): the rows of the residual stream
  // this rank holds; resid_in, resid_mid, resid_out and the rstds are (seq.rows, C) or
  // (seq.rows), and ln, lnf, dresid, dln (seq.padded(), C) to hold every rank's rows.
  SequenceShard seq;
  float* seq_slice = nullptr;       // (seq.rows, C)  a norm's output or d(ln), this rank's rows
  float* seq_dresid = nullptr;      // (seq.rows, C)  d(residual stream), this rank's rows
  float* seq_norm_grads = nullptr;  // (2, C)  this rank's share of ln1's and ln2's (or lnf's) dweight
  std::vector<int32_t> tokens, targets;  // (B, T) copies of the batch
  // Tensor parallelism's cross-entropy over the vocabulary slices: each row's max over the
  // whole vocabulary (B, T), then its sum of exp and the target's logit, (2, B, T).
  std::vector<float> logit_max, logit_sums;
  // (B, T) for packed rows: where each token's example starts in its row (the first key
  // it may attend to) and its position within the example. Empty for plain rows.
  std::vector<int32_t> key_start, positions;
};

struct LossSum {
  double sum = 0.0;        // sum of per-token losses
  int64_t num_tokens = 0;  // tokens with a target (not kIgnoreIndex)
  double mean() const { return num_tokens > 0 ? sum / static_cast<double>(num_tokens) : 0.0; }
};

class Llama {
 public:
  // Layers [begin, end): a pipeline stage's (set_layer_range, hold_only).
  struct LayerRange {
    int64_t begin = 0, end = 0;
  };
  // Experts [begin, end) of every MoE layer: an expert-parallel rank's block (local_experts).
  struct ExpertRange {
    int64_t begin = 0, end = 0;
  };
  // The part of the model a rank holds (hold_only): the tensors of `layers` (a pipeline
  // stage's; none: every layer), and of every MoE layer's experts only those in `experts`
  // (an expert-parallel rank's block; none: all of them).
  struct HeldPart {
    std::optional<LayerRange> layers;
    std::optional<ExpertRange> experts;
  };
  // Which of the held tensors held_ranges lists: all, the experts', or all but the experts'.
  enum class TensorGroup : uint8_t { all, experts, non_experts };

  explicit Llama(const ModelConfig& cfg);  // parameters zero; call init_random or load

  // Reads config.json and the safetensors weights (one file or shards) of a HF directory.
  // A quantized directory (MLX layout: P.weight packed, P.scales, P.biases and config
  // "quantization") stays packed: its quantized weights are views into the mapped files,
  // which the model keeps open; only norms and other float tensors are copied.
  // A float weight (or a quantized weight's scales and biases) holding NaN or Inf is
  // reported naming the tensor: a warning, or an InputError with NonFinitePolicy::refuse.
  // `held` (a pipeline stage's layers, an expert-parallel rank's experts): only the tensors
  // of that part are read (see hold_only); the others are never touched, so they cost no
  // memory. Ranged: only `ranges` of params() (ascending, disjoint: the same ranges
  // init_random takes; empty: all) inside the held tensors are filled, each from the bytes
  // of the file that hold it, converted span by span. The other floats stay zero and their
  // pages, and the files' pages of other elements, are never touched: a ZeRO-3 rank passes
  // its shard (parallel::zero3_owned_ranges). Ranges may cut tensors anywhere. The
  // non-finite check covers what is read.
  static Llama load(const std::filesystem::path& dir, io::NonFinitePolicy non_finite = io::NonFinitePolicy::warn,
                    const HeldPart& held = {}, std::span<const ElementRange> ranges = {});
  // Writes config.json and model.safetensors (or shards above max_shard_bytes) that
  // transformers reads as the same model. Does not write a tokenizer. A quantized model
  // is written in MLX's layout (see model_writer.hpp).
  void save(const std::filesystem::path& dir, int64_t max_shard_bytes = int64_t{5} << 30) const;

  // ---- quantized weights
  bool quantized() const { return layout_.num_quantized() > 0; }
  // The packed matrix behind a quantized reference.
  const QuantMatrix& quantized_weight(const WeightRef& ref) const {
    return qweights_[static_cast<size_t>(ref.slot())];
  }
  // The quantized matrices in one arena of their own (ZeRO-3 shards it, parallel/zero3.hpp).
  // Where slot s's bytes lie in it, in floats (4-byte words): its packed words, then its
  // scales, then its biases, each from a word boundary; slots ascending and contiguous.
  std::vector<ElementRange> packed_places() const;
  // Copies the quantized matrices into that arena (packed_places().back().end floats),
  // only the words inside `ranges` (ascending, disjoint; empty: all): the rest stays zero,
  // its pages and the source's pages of it (a mapped file's) untouched. Every quantized
  // matrix then points into the arena, and what they viewed before (the mapped model
  // files, or an in-memory quantization's buffers) is let go. Returns the arena, which
  // lives as long as the model.
  std::span<float> own_quantized(std::span<const ElementRange> ranges);
  // The float tensor behind a dense reference; null for an absent one (a missing bias).
  const float* dense_weight(const WeightRef& ref) const {
    return ref.present() ? params_.data() + ref.offset() : nullptr;
  }
  // A model of `cfg` whose weights named in `quantized` are stored quantized (the others
  // zero, as Llama(cfg)): their matrices are then given one by one, in layout order, by
  // add_quantized_matrix (a tensor-parallel rank's slices: model/tensor_parallel.hpp).
  static Llama with_quantized(const ModelConfig& cfg, const std::set<std::string>& quantized);
  // The next quantized slot's matrix (its shape must be the layout's); `keep_alive` owns
  // the bytes it views (null where another argument's owner already does), `mapped`: they
  // lie in a mapped model file (own_quantized then hands those pages back). A pipeline
  // stage's model may give a tensor it does not hold (hold_only) with null bytes.
  void add_quantized_matrix(const QuantMatrix& m, std::shared_ptr<const void> keep_alive, bool mapped);
  // Tp rank `at`'s local model of this whole model (tensor_parallel_config's shape): the
  // float slices copied, a quantized matrix's rows (column-parallel, vocabulary) viewed in
  // place in this model's bytes (kept alive with them), its input columns (row-parallel:
  // o, down) copied group by group (InputError when they do not fall on whole groups).
  Llama tensor_parallel_slice(TpRank at) const;
  // A float32 copy of tensor `info` (dequantized when stored quantized); out (numel of shape).
  void weight_f32(const ParamInfo& info, std::span<float> out) const;
  // This float model with its Linear and embedding weights quantized in memory, exactly as
  // `flotilla convert --quantize` writes them (InputError if a dimension does not divide
  // into groups).
  Llama quantize(QuantFormat format, DType scale_dtype) const;

  // ---- the linear layers: every product with a weight goes through these, which pick the
  // float GEMM or the blockwise-dequantizing one, as `weight` (from layout()) says.
  // out (N, OC) = inp (N, C) @ W^T + bias
  void linear_forward(float* out, const float* inp, const WeightRef& weight, const float* bias, int64_t N, int64_t C,
                      int64_t OC) const;
  // dinp += dout @ W; dweight, dbias += ... (must be nullptr for a quantized, frozen W).
  void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                       const WeightRef& weight, int64_t N, int64_t C, int64_t OC) const;
  // Number format of the linear layers' products (lm_head and the 4-bit base's included;
  // attention's QK^T and PV products and their backward too, except decoding steps: see
  // kernels::attention_forward; LoRA's adapters: adapter_input()): f32, or bf16 inputs
  // with float32 accumulation. The weights stay float32; a bf16 copy of each tensor is
  // made when a product first reads it and again after every forward that may follow an
  // update of the base (a trained base: once per forward; a frozen one: once) or a
  // drop_bf16 of its range (ZeRO-3, after each release). Set the
  // format a machine supports (model/matmul_dtype.hpp resolves it).
  void set_matmul_input(kernels::GemmInput input);
  // The bf16 copy of `range` of params() is no longer needed (ZeRO-3 released those
  // weights): it is marked stale, so the next product converts the weights again, and its
  // pages go back to the system; with `poison` it reads NaN instead (ZeRO-3's test mode).
  void drop_bf16(ElementRange range, bool poison);
  kernels::GemmInput matmul_input() const { return matmul_input_; }
  // Number format of LoRA's rank-r products: float32 whatever matmul_input() is. They are
  // bound by memory, not arithmetic (2 * rank FLOPs per element of their (N, in) and
  // (N, out) sides, read or written once), so bf16 inputs only add a rounding pass over
  // those sides, three per adapter and step, and buy nothing (bench/lora_throughput
  // --breakdown prints both formats; bench/RESULTS.md "W3 in bf16").
  kernels::GemmInput adapter_input() const { return kernels::GemmInput::f32; }
  // out (N, C) = embed_tokens[tokens]
  void embedding_forward(float* out, const int32_t* tokens, int64_t N) const;
  // out (N, C) = this rank's vocabulary rows' part of it (vocab_rows(): zeros for the
  // tokens other tp ranks hold), from the float or the quantized table.
  void embedding_forward_rows(float* out, const int32_t* tokens, int64_t N) const;

  // One decoder block of layer l, the only place it is written: from la.resid_in (B, T, C)
  // into out (B, T, C), which may be la.resid_in itself; the other views of `la` receive
  // the block's activations (q, k, v after rope; probs (B, NH, T, Tk); ...).
  //   h   = x + o_proj(attention(rope(q_proj(ln1(x))), rope(k_proj(.)), v_proj(.)))
  //   out = h + down(silu(gate(ln2(h))) * up(ln2(h)))
  void block_forward(int64_t l, const LayerActivations& la, float* out, const BlockContext& ctx) const;

  // HF's initialisation: Linear and Embedding ~ N(0, initializer_range), norms = 1,
  // biases = 0: one stream over the tensors in layout order. Only the tensors the model
  // holds are written (hold_only), each with the values a whole model's would have.
  void init_random(uint64_t seed);
  // The same values, written only inside `owned` (ascending, disjoint ranges of params()):
  // every other float is left as it was, and its pages untouched (a ZeRO-3 rank builds only
  // its shard: pages never written cost no memory, base/buffer.hpp). Bit for bit what
  // init_random(seed) writes there: the stream is skipped, not redrawn, outside `owned`.
  void init_random(uint64_t seed, std::span<const ElementRange> owned);

  // The model holds only the tensors of `part`. Layers: a pipeline stage holds the tensors
  // of its layers, the embedding on the first stage (and on the last when tied to lm_head),
  // the final norm and lm_head on the last. Experts: an expert-parallel rank holds, of
  // every MoE layer, the experts of its block only (router, attention, norms, shared
  // expert: all). Nothing of this model then writes the other tensors' weights, gradients
  // or bf16 copies (init_random, zero_grads, load skip them), and their pages, released
  // here, are never resident: a rank costs the memory of its own tensors only. Call before
  // init_random or right after load; forward and backward must stay inside the part (a
  // stage's layers; under expert parallelism, set_expert_exchange with the same block).
  void hold_only(const HeldPart& part);
  void hold_only(LayerRange stage) { hold_only(HeldPart{.layers = stage, .experts = std::nullopt}); }
  const HeldPart& held_part() const { return held_; }
  // Whether the model holds tensor `info` (every tensor unless hold_only was called).
  bool holds(const ParamInfo& info) const;
  // [begin, end) of params() the model holds, of `group`'s tensors, ascending, neighbours merged.
  std::vector<ElementRange> held_ranges(TensorGroup group = TensorGroup::all) const;
  bool holds_all() const { return !held_.layers && !held_.experts; }
  bool holds_all_experts() const { return !held_.experts; }

  const ModelConfig& config() const { return cfg_; }
  const ParamLayout& layout() const { return layout_; }
  std::span<float> params() {
    invalidate_bf16();  // the caller may change them
    return params_.span();
  }
  std::span<const float> params() const { return params_.span(); }
  // Gradient buffer in the same layout as params(); allocated on first use.
  std::span<float> grads();
  // Zeroes the gradients of what is trained: the base's, or only the adapters'.
  void zero_grads();

  // LoRA: adapters the model applies from now on (not owned; nullptr detaches). Attaching
  // freezes the base: backward computes no base gradient (none is allocated) and stops at
  // the first adapted layer.
  void attach_lora(LoraAdapters* adapters);
  LoraAdapters* lora() { return lora_; }
  bool base_frozen() const { return lora_ != nullptr; }
  // Whether a gradient buffer for the base exists (never, in a LoRA-only run).
  bool base_grads_allocated() const { return !grads_.empty(); }
  // Dropout (LoRA's) is active only in training forwards.
  void set_training(bool training) { training_ = training; }
  // Counts training forwards: with the adapters' seed it decides the dropout masks, so a
  // checkpoint saves it as the RNG state.
  uint64_t dropout_step() const { return dropout_step_; }
  void set_dropout_step(uint64_t step) { dropout_step_ = step; }

  // What an optimizer updates: the adapters when attached, else every parameter.
  struct Trainable {
    const ParamTable& table;
    std::span<float> params;
    std::span<float> grads;
  };
  Trainable trainable();

  // Training forward on tokens (B, T). With targets (B, T) (kIgnoreIndex to skip) also
  // computes per-token losses and returns their sum and count; targets == nullptr only
  // computes logits. Throws InputError for ids outside [0, vocab).
  // doc_start (B, T) or nullptr: for rows that pack several examples, doc_start[b*T + t]
  // is the index in row b where token t's example begins. Tokens then attend only within
  // their example and their rotary positions restart at 0, so a packed row computes
  // exactly what its examples would compute in rows of their own.
  LossSum forward(const int32_t* tokens, const int32_t* targets, int64_t B, int64_t T,
                  const int32_t* doc_start = nullptr);
  // (B, T, V) logits of the last forward; invalid after backward. Under tensor parallelism
  // this rank's columns of them only (vocab_rows()), (B, T, V / tp).
  std::span<const float> logits() const;
  // Mixture of experts: the load-balancing (Switch) loss of the last forward, over its MoE
  // layers and tokens (moe::LoadBalancing); 0 for a dense model. When the config's
  // output_router_logits is set, backward(s) adds the gradient of
  // s * num_tokens * router_aux_loss_coef * this, num_tokens being the forward's target
  // tokens: backward(1 / num_tokens) is then the gradient of mean loss + coef * aux, as in
  // transformers, and a trainer that sums micro-batches and divides by all their tokens
  // gets coef times the token-weighted mean of their aux losses.
  double router_aux_loss() const { return load_balancing_.loss(); }
  // Training with an expert capacity factor F (train --expert-capacity; 0, the default,
  // is dropless): each expert takes at most ceil(F T K / E) of a sequence's assignments in a
  // training forward and backward (moe::Capacity); evaluation, scoring and generation stay
  // dropless. InputError unless F is finite and >= 0, or for a dense model with F > 0.
  void set_expert_capacity(double factor);
  // The share of the last training forward's assignments dropped over capacity, over every
  // rank's tokens under expert or data parallelism, as the aux loss.
  double expert_dropped_fraction() const { return load_balancing_.dropped_fraction(); }
  // (B*T, E) the router probs of MoE layer l in the last forward (the last layer's only,
  // under gradient checkpointing, where the layers share one set of views).
  std::span<const float> router_probs(int64_t l) const;
  // (B, T) per-token losses of the last forward with targets (0 where ignored).
  std::span<const float> token_losses() const {
    return {acts_.losses, static_cast<size_t>(acts_.B * acts_.T)};
  }
  // grads += d(dloss_scale * loss_sum)/dparams, for the last forward (which had targets).
  // dloss_scale = 1/num_tokens gives the gradient of the mean loss.
  void backward(float dloss_scale);

  // Gradient checkpointing (mlx_lm's --grad-checkpoint): forward keeps only each block's
  // input; backward recomputes a block's activations from it, into one set of buffers
  // shared by all layers, just before that block's backward. Costs one more forward of
  // every block but the last; the gradients are bit for bit the same.
  void set_grad_checkpoint(bool on);
  bool grad_checkpoint() const { return grad_checkpoint_; }

  // Bytes of the activation plan for a step shape (what forward(B, T) will allocate).
  int64_t activation_bytes(int64_t B, int64_t T) const;
  // The same without a model (whose constructor allocates every weight): for a model of
  // `cfg` with these adapters attached (nullptr: none). What the planner uses.
  // InputError for a shape so large that no machine could hold it (or that overflows).
  // `sequence_parallel`: the tp ranks the residual stream is sharded over (1: none).
  static int64_t activation_bytes(const ModelConfig& cfg, const LoraAdapters* lora, int64_t B, int64_t T,
                                  bool grad_checkpoint = false, int64_t sequence_parallel = 1);
  // What a pipeline stage of layers [stage.begin, stage.end) writes of that plan (the rest
  // of its buffer is never touched, so never resident): its layers' views, the next
  // layer's input it passes on, the head's only on the last stage, and the scratch every
  // stage uses. The whole range gives activation_bytes.
  static int64_t stage_activation_bytes(const ModelConfig& cfg, const LoraAdapters* lora, int64_t B, int64_t T,
                                        bool grad_checkpoint, LayerRange stage, int64_t sequence_parallel = 1);
  // InputError when the activation plan of (B, T) is larger than this machine's memory,
  // naming the shape and both sizes: a batch that cannot fit is refused before the first
  // step, rather than found by an allocation failure (or the OOM killer) inside it.
  void check_activation_memory(int64_t B, int64_t T) const;

  // ---- parallel schemes (parallel/ implements them; see parallel_context.hpp)
  // The context whose hooks forward and backward call (not owned; nullptr: none). Its
  // grad_ready ranges are those of trainable().grads: set it after attach_lora.
  void set_parallel_context(ParallelContext* context);
  // Expert parallelism and the load-balancing loss over several ranks (not owned; nullptr:
  // none). With an exchange of ep_size() > 1, training forwards and backwards run only
  // this rank's block of every MoE layer's experts (local_experts()) on the rows every
  // rank routes to them (model/expert_exchange.hpp); the other experts' weights are not
  // read and get no gradient here. With any exchange, the load-balancing loss of a
  // forward with targets is the formula over the tokens of every rank's forward together
  // (its statistics summed by sum_over_data), weighted by their target tokens together:
  // then any split of a batch over ranks gives the gradient and aux loss of one rank
  // with the whole batch. InputError when ep does not divide the experts, or the model
  // has none. Every rank calls forward and backward alike while one is set.
  void set_expert_exchange(ExpertExchange* exchange);
  // Tensor parallelism (model/tensor_parallel.hpp; not owned; nullptr: none): this model is
  // a tp rank's local model of `full` (built from tensor_parallel_config(full, tp)), and each
  // block all-reduces over `group` where its row-parallel layers end (forward) and where its
  // column-parallel layers start (backward). Every rank of the group calls forward and
  // backward alike. InputError when this model is not tensor_parallel_config(full, tp), or
  // is quantized.
  void set_tensor_parallel(TensorParallelGroup* group, const ModelConfig& full);
  TensorParallelGroup* tensor_parallel() const { return tp_; }
  // Sequence parallelism on top of tensor parallelism (model/tensor_parallel.hpp's
  // SequenceShard): the residual stream, the norms and the residual adds run on this
  // rank's 1/tp of the token rows; the all-reduces become an all-gather before each
  // column-parallel region and a reduce-scatter after each row-parallel one (backward: the
  // other way round, plus the all-gather of the norm's output again, which is recomputed
  // from the slice); the norms' weight gradients are summed over the tp group. A no-op
  // without tensor parallelism; every rank of the group sets it alike.
  void set_sequence_parallel(bool on);
  bool sequence_parallel() const { return sequence_parallel_ && tp_; }
  // The config of the model this one is a slice of (its own without tensor parallelism).
  const ModelConfig& full_config() const { return tp_ ? tp_full_ : cfg_; }
  // The squared L2 norm of the full model's gradient (trainable().grads): under tensor
  // parallelism the split tensors' squares summed over the tp group, the replicated ones'
  // counted once.
  double grad_sum_squares_tensor_parallel();
  // Under tensor parallelism, the ranges of the trainable arena (the model's, or LoRA's)
  // that hold this rank's slices of split tensors, ascending and merged; the rest
  // (norms, a row-parallel layer's LoRA B, ...) is alike on every tp rank. Empty without tp.
  std::vector<ElementRange> tensor_parallel_split_ranges() const;
  // The vocabulary rows this model's embedding and lm_head hold: [0, vocab_size) but under
  // tensor parallelism (vocab_shard); logits() are these columns.
  VocabShard vocab_rows() const { return tp_ ? vocab_ : VocabShard{0, cfg_.vocab_size}; }
  // [first, end) of the experts this rank runs: all of them without expert parallelism.
  std::pair<int64_t, int64_t> local_experts() const;
  using GradSpan = model::GradSpan;
  // Every range grad_ready reports, in the order backward reports them: the head (final
  // norm, an untied lm_head), then each layer from the last down, then the embedding.
  // Ranges run from a tensor's offset to the next tensor's (alignment padding included),
  // so neighbours touch.
  std::vector<GradSpan> grad_ready_order() const;

  // A pipeline stage: forward and backward run blocks [begin, end) only (default: all).
  // The stage that starts at 0 embeds the tokens, the one that ends at n_layers computes
  // logits and the loss; between stages the caller hands over the activations at the cut
  // (stage_output -> the next stage's stage_input) and their gradients (stage_input_grad
  // -> the previous stage's stage_output_grad). Each stage is its own Llama holding the
  // same weights; gradients land in its own buffer, only the stage's parameters' nonzero.
  // (A tied embedding gets its lm_head share in the last stage: a caller sums the two.)
  // (LayerRange: at the top of the class.)
  void set_layer_range(LayerRange range);
  LayerRange layer_range() const { return range_; }
  // (B, T, C) where the range's first block reads its input: for a stage above 0, fill it
  // before forward (this plans the step shape (B, T), which the forward must then use).
  // Under sequence parallelism this and the three below are this rank's token rows only
  // (SequenceShard: (seq.rows, C), the last slice padded with zero rows).
  std::span<float> stage_input(int64_t B, int64_t T);
  // (B, T, C) the output of the range's last block, after forward.
  std::span<const float> stage_output() const;
  // (B, T, C) for a stage below the last: d(loss)/d(stage_output), filled after forward
  // and before backward (which then starts from it instead of a loss).
  std::span<float> stage_output_grad();
  // (B, T, C) after backward of a stage above 0: d(loss)/d(stage_input). Empty when no
  // layer below the stage is trained (LoRA adapters all above it).
  std::span<const float> stage_input_grad() const;

  // Several micro-batches in flight on one stage (parallel/pipeline.hpp): what backward
  // needs of its forward (the activation plan, and the forward's flags and dropout step)
  // lives in a slot per micro-batch. The caller swaps a micro-batch's slot in before its
  // stage_input and forward, out after them, in again before its backward and out after;
  // while none is swapped in the model holds its own. An empty slot plans on first use,
  // so the slots a caller ever made are the most micro-batches it held at once.
  // What an MoE layer's expert side kept from forward under expert parallelism: the rows
  // it received and their gate and up outputs. Sizes vary with the routing (dropless).
  struct ExpertShard {
    std::vector<int64_t> recv_counts;  // (ep, El)  rows from each rank for each local expert
    std::vector<float> rows;           // (R, C)    by source rank, then local expert
    std::vector<float> gate, up;       // (R, Fe)
  };
  struct ForwardSlot {
    ActivationPlan acts;
    std::vector<ExpertShard> ep_shards;  // per layer, under expert parallelism
    bool have_targets = false, logits_valid = false, stage_forward_done = false;
    uint64_t forward_dropout = 0;
    moe::LoadBalancing load_balancing;  // a mixture's: its forward's statistics, then the totals
    int64_t aux_tokens = 0;
  };
  void swap_forward_slot(ForwardSlot& slot);

  // A mixture of experts in a pipeline: the load-balancing loss is one formula over the
  // MoE layers of every stage (moe::LoadBalancing: products of sums over all layers), so
  // its statistics travel with the activations and come back with their gradients.
  // Forward: a stage above the first adds the statistics of the stages below it
  // (add_upstream_router_statistics, before its forward), and router_statistics() after
  // forward is the sum through this stage, for the next; the last stage's forward sums them
  // over the data group with the target tokens (set_expert_exchange), as one rank's would.
  // Backward: router_totals() (those sums and the tokens, after the last stage's forward
  // or set_router_totals) go down with d(stage_output); a stage sets them before its
  // backward, so every stage's router gets the one-rank aux gradient.
  void add_upstream_router_statistics(std::span<const double> stats);
  std::vector<double> router_statistics() const { return load_balancing_.statistics(); }
  std::vector<double> router_totals() const;
  void set_router_totals(std::span<const double> totals);
  // The number of doubles in router_statistics() and router_totals().
  size_t router_statistics_size() const { return 2 * static_cast<size_t>(cfg_.moe.num_experts) + 3; }
  // The target tokens the aux loss was weighted by in the last forward (every data rank's).
  int64_t router_aux_tokens() const { return aux_tokens_; }

 private:
  void report_ready(size_t group) const;
  // The grad_ready ranges per group: indexed by layer, then n_layers = the head,
  // n_layers + 1 = the embedding.
  std::vector<std::vector<GradSpan>> grad_groups() const;
  bool first_stage() const { return range_.begin == 0; }
  size_t stage_floats() const;  // what stage_input/output and their gradients hold
  bool last_stage() const { return range_.end == cfg_.n_layers; }
  Llama(const ModelConfig& cfg, const std::set<std::string>& quantized);
  void plan(int64_t B, int64_t T);
  // Drops the activation plan (its shape or views changed): the next forward plans anew,
  // and nothing of the last forward may be read or run backward.
  void drop_activation_plan();
  // Sequence parallelism's two crossings (model/tensor_parallel.hpp), on the planned step:
  // whole (seq.padded(), C) = every rank's rmsnorm(x) (seq.rows, C), computed into slice;
  // and slice (seq.rows, C) = this rank's rows of the ranks' partial sums whole (N, C),
  // whose padding rows are zeroed first.
  void sequence_norm_gather(float* whole, float* slice, float* rstd, const float* x, const WeightRef& weight,
                            const SequenceShard& seq, const char* what) const;
  void sequence_reduce_scatter(float* whole, float* slice, const SequenceShard& seq, const char* what) const;
  // Tensor parallelism's cross-entropy (tensor_parallel.cpp): the losses of acts_.logits,
  // this rank's vocabulary slice, against `targets` over the whole vocabulary, the slices
  // never gathered (model/tensor_parallel.hpp); returns the target tokens. Its backward
  // turns the slice into dlogits.
  int64_t vocab_parallel_cross_entropy(const int32_t* targets, int64_t N);
  void vocab_parallel_cross_entropy_backward(float dloss_scale);
  uint64_t dropout_seed(int64_t layer, LoraTarget t) const;
  // The backward of layer l's own adapter on t (attention, dense MLP or shared expert) over
  // the planned step's N rows: given dout (N, out), the gradient of the layer's output, and
  // its input x (N, in), add into the adapter gradients and into dx (N, in) (null: not needed).
  //   forward: u = scale * xd A^T, out += u B^T  =>  dB += dout^T u;  du = dout B;
  //            dA += scale * du^T xd;  dxd = scale * du A;  dx += dropout'(dxd)
  void lora_backward(int64_t l, LoraTarget t, float* dx, const float* dout, const float* x);
  // Tensor parallel, LoRA on a row-parallel layer (o, down): x (N, in/tp) is this rank's
  // input columns and A (rank, in/tp) its columns of the whole A, so x A^T is a partial u;
  // the partial u's are summed over the tp group (an all-reduce of (N, rank)) and tp rank 0
  // alone adds u B^T (B whole on every rank) to its partial output, which the layer's own
  // all-reduce (or reduce-scatter) then sums: the adapter's delta is added exactly once.
  // Backward needs no collective: d(out) and u are whole and alike on every rank, so dB is
  // too (a replicated tensor); dA and d(x) are this rank's columns'.
  static bool lora_row_parallel(LoraTarget t) { return t == LoraTarget::o || t == LoraTarget::down; }
  void lora_row_parallel_forward(int64_t l, LoraTarget t, float* y, const float* x, float* u, float* xd, int64_t N,
                                 std::optional<uint64_t> dropout_seed, const LoraAdapters& lora) const;
  // Dropout of layer l's adapter input on t with the mask of `seed`, forward into out or
  // backward added into out: on a row-parallel layer's input columns under tp, the whole
  // input's mask for them (forward's and backward's one place for that choice).
  void lora_dropout(const LoraAdapters& lora, int64_t l, LoraTarget t, float* out, const float* x, int64_t N,
                    uint64_t seed, bool backward) const;
  // The training forward's context of every block, for the planned step shape.
  BlockContext training_context() const;
  // An MoE layer's MLP: from ln (N, C), the RMSNorm of resid_mid, into out (N, C)
  // (overwritten); keeps what backward needs in `la`.
  // Layer l's adapter on t, if the block runs any: y += its delta for input x ((B T, in) ->
  // (B T, out)), u kept in la for backward; row-parallel under tp (lora_row_parallel_forward).
  // One place for the dense block's and the mixture's shared expert's adapters.
  void adapter_forward(int64_t l, LoraTarget t, float* y, const float* x, const LayerActivations& la,
                       const BlockContext& ctx) const;
  void moe_forward(int64_t l, const LayerActivations& la, float* out, const float* ln, const BlockContext& ctx) const;
  // dln (N, C) += d(out)/d(ln) for dout (N, C); base gradients into g (null: frozen).
  // aux_scale: the load-balancing loss's weight in what is differentiated (0: not at all).
  void moe_backward(int64_t l, const LayerActivations& la, float* dln, const float* dout, const float* ln, float* g,
                    float aux_scale);
  // Expert parallelism (moe_parallel.cpp): rows (N*K, C) in dispatch order to this rank's
  // experts and their outputs back, into expert_out (N*K, C); and backward, drows (N*K, C)
  // d(expert_out) in, d(rows) out, this rank's experts' gradients into g (null: frozen).
  void ep_experts_forward(int64_t l, const moe::Dispatch& d, const float* rows, float* expert_out,
                          const BlockContext& ctx) const;
  void ep_experts_backward(int64_t l, const moe::Dispatch& d, float* drows, float* g);
  // One expert's SwiGLU MLP on its n rows (C wide): out = down(silu(gate(rows)) * up(rows)),
  // with gate and up (n, Fe) kept for backward and act (n, Fe) scratch. Both paths run each
  // expert through these, the local one on all experts and expert parallelism on its own.
  struct ExpertRows {
    const float* rows;  // (n, C) the expert's input rows
    float* gate;        // (n, Fe) gate(rows), kept from forward
    float* up;          // (n, Fe) up(rows), kept from forward
    int64_t n;
  };
  // Which expert runs, for its LoRA adapters (LoraAdapters::expert_slot): expert e of
  // layer l on rows starting at row `block` of their buffer (the dropout draw's); the
  // adapters and dropout step of the forward (null, none: no adapters, no dropout).
  struct ExpertRun {
    int64_t layer = 0, expert = 0, block = 0;
    const LoraAdapters* lora = nullptr;
    std::optional<uint64_t> dropout_step;
    std::optional<uint64_t> dropout_seed(ExpertProj p) const {
      if (!dropout_step) return std::nullopt;
      return lora_expert_dropout_seed(*dropout_step, layer, p, expert, block);
    }
  };
  void expert_forward(const ExpertParams& ew, const ExpertRows& x, float* act, float* out, const ExpertRun& run) const;
  // Its backward: d(out) (n, C) in; d(rows) into dx (n, C), overwritten, which may be dout
  // itself (dout is read first); weight gradients into g (null: frozen). dact, dgate, dup
  // and act (n, Fe) are scratch.
  struct ExpertScratch {
    float* act;
    float* dact;
    float* dgate;
    float* dup;
  };
  // The adapters are the attached ones (lora_), with the last training forward's dropout.
  void expert_backward(const ExpertParams& ew, const ExpertRows& x, const float* dout, float* dx, float* g,
                       const ExpertScratch& s, const ExpertRun& run);
  // The ExpertRun of expert e's rows from `block` in this layer's backward.
  ExpertRun backward_run(int64_t l, int64_t e, int64_t block) const;
  // The float tensor behind a dense reference, as p(w.offset) would be.
  float* p(const WeightRef& ref) { return params_.data() + ref.offset(); }
  const float* p(const WeightRef& ref) const { return params_.data() + ref.offset(); }
  // The bf16 copy of params_[offset, offset + numel) (the copy has params_'s layout), made
  // now, tensor by tensor, where it is not up to date: a linear layer converts the weights
  // it reads, when it reads them, so a model whose weights are partly absent (ZeRO-3's
  // released groups) converts only what it has.
  const uint16_t* bf16_weight(int64_t offset, int64_t numel) const;
  // Every tensor's bf16 copy is stale (the float weights may have changed): O(1).
  void invalidate_bf16() const { ++bf16_generation_; }

  ModelConfig cfg_;
  ParamLayout layout_;
  Buffer<float> params_;
  Buffer<float> grads_;
  kernels::GemmInput matmul_input_ = kernels::GemmInput::f32;
  // bf16 copy of params_ for bf16 products, per tensor: tensor i's copy is current when it
  // was made in the current generation (bf16_made_[i] == bf16_generation_). Mutable: a
  // const forward (the KV-cache decoder's) makes it on first use, as a cache of params_.
  // The buffer is mapped whole but only the tensors converted are ever written (resident).
  mutable Buffer<uint16_t> bf16_weights_;
  mutable std::vector<ElementRange> bf16_tensors_;  // the dense tensors' ranges, ascending
  mutable std::vector<uint64_t> bf16_made_;         // per tensor: the generation its copy is of (0: none)
  mutable uint64_t bf16_generation_ = 1;
  // Quantized weights in layout order, and what keeps their bytes alive (the mapped
  // files of a loaded directory, or buffers of an in-memory quantization).
  std::vector<QuantMatrix> qweights_;
  std::vector<std::shared_ptr<const void>> qstorage_;
  bool qweights_mapped_ = false;  // qweights_ view mapped model files (Llama::load)
  ActivationPlan acts_;
  moe::LoadBalancing load_balancing_;  // of the last forward's MoE layers
  std::vector<double> upstream_router_stats_;  // the stages' below, for the next forward
  double expert_capacity_factor_ = 0.0;  // set_expert_capacity
  // The capacity of a training forward or backward over sequences of T tokens.
  moe::Capacity expert_capacity(int64_t T) const;
  int64_t forward_tokens_ = 0;         // target tokens of the last forward
  int64_t aux_tokens_ = 0;             // ... of every rank's forward together, with an expert exchange
  ExpertExchange* experts_ = nullptr;
  TensorParallelGroup* tp_ = nullptr;
  bool sequence_parallel_ = false;
  ModelConfig tp_full_;  // full_config() under tensor parallelism
  VocabShard vocab_;     // the vocabulary rows of the embedding and lm_head, under tensor parallelism
  mutable std::vector<ExpertShard> ep_shards_;  // per layer (a forward slot's, in a pipeline)
  // Scratch of the expert side, grown to the largest R seen.
  mutable std::vector<float> ep_act_, ep_out_;
  std::vector<float> ep_dout_, ep_dact_, ep_dgate_, ep_dup_;
  bool have_targets_ = false;
  bool logits_valid_ = false;
  LoraAdapters* lora_ = nullptr;
  bool training_ = true;
  uint64_t dropout_step_ = 0;     // training forwards so far
  uint64_t forward_dropout_ = 0;  // dropout_step_ of the last forward (backward reuses it)
  bool grad_checkpoint_ = false;
  ParallelContext* parallel_ = nullptr;
  std::vector<std::vector<GradSpan>> ready_groups_;  // grad_groups() of the context's trainable set
  LayerRange range_;
  HeldPart held_;  // hold_only's part; none of either: every tensor
  bool stage_forward_done_ = false;  // a forward of a stage below the last, not yet backward
};

}  // namespace flotilla::model
