// The steps of a mixture-of-experts MLP (Mixtral, Qwen2-MoE), forward and backward, on
// buffers. Vocabulary used throughout:
// - the *router* scores each of N tokens against E experts: logits (N, E), softmax in
//   float32 to *probs*;
// - each token picks its top K experts (an *assignment*, index n*K + k), with a combine
//   *weight* each: the picked probs, renormalised to sum 1 where the config says so;
// - *dispatch* orders the N*K assignments by expert (then by token) and gathers the
//   tokens' rows into that order: expert e's *rows* are [offsets[e], offsets[e+1]);
// - each expert runs its SwiGLU MLP on its rows (Llama::moe_forward, through the model's
//   linear layers);
// - *combine* scatter-adds each row's output, times its weight, back to its token.
// Dispatch and combine are separate steps so that expert parallelism can later send the
// rows of experts held elsewhere with an all-to-all between them, and run only its own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace flotilla::model::moe {

// probs (N, E) = softmax(logits) row by row; may be done in place.
void router_softmax(float* probs, const float* logits, int64_t N, int64_t E);
// dlogits (N, E) = the softmax's backward: p * (dp - sum(p * dp)). Overwrites dlogits.
void router_softmax_backward(float* dlogits, const float* dprobs, const float* probs, int64_t N, int64_t E);

// Top-K of each token's probs: experts (N, K) in descending order of prob (ties: the lower
// expert index first; torch.topk leaves the order of equal values unspecified), weights
// (N, K) the picked probs, divided by their sum when `renormalise`.
void route_top_k(int32_t* experts, float* weights, const float* probs, int64_t N, int64_t E, int64_t K,
                 bool renormalise);
// dprobs (N, E) = the gradient of the weights (N, K) through route_top_k, for the picked
// experts (others 0); the choice itself is not differentiated. Overwrites dprobs.
void route_top_k_backward(float* dprobs, const float* dweights, const int32_t* experts, const float* weights,
                          const float* probs, int64_t N, int64_t E, int64_t K, bool renormalise);

// An expert's capacity (train --expert-capacity F): at most `per_expert` =
// ceil(F x T x K / E) assignments of one sequence of T tokens go to one expert; the rest
// are dropped (their token gets nothing from that expert, as in the Switch Transformer).
// A sequence's first choices come before its second ones, each in token order. Counted per
// sequence, never per micro-batch, so the same tokens are dropped however the rows of a
// batch are cut among ranks. per_expert 0: dropless (every assignment kept).
struct Capacity {
  int64_t per_expert = 0;
  int64_t seq_len = 0;  // T: tokens n of sequence n / T
  static Capacity of(double factor, int64_t T, int64_t K, int64_t E);
};
// keep (N * K): 1 where assignment n * K + k is within its expert's capacity (all 1 when
// dropless). Returns how many were dropped.
int64_t keep_within_capacity(uint8_t* keep, const int32_t* experts, int64_t N, int64_t K, int64_t E, Capacity cap);

// Which gathered row holds which assignment.
struct Dispatch {
  int64_t num_experts = 0;
  int64_t assignments = 0;          // N * K, kept or dropped
  int64_t dropped = 0;              // over capacity: in no row
  std::vector<int64_t> offsets;     // (E + 1) expert e's rows are [offsets[e], offsets[e + 1])
  std::vector<int32_t> token;       // (N * K - dropped) the token of each row
  std::vector<int32_t> assignment;  // (N * K - dropped) the assignment (n * K + k) of each row
  int64_t rows(int64_t e) const { return offsets[static_cast<size_t>(e) + 1] - offsets[static_cast<size_t>(e)]; }
};
// A stable counting sort of the kept assignments by expert. Every assignment lands in
// exactly one row or is dropped (tokens are conserved: N * K = rows + dropped).
Dispatch plan_dispatch(const int32_t* experts, int64_t N, int64_t K, int64_t E, Capacity cap = {});

// rows (N*K, C): row r = x[token[r]].
void dispatch_gather(float* rows, const float* x, const Dispatch& d, int64_t C);
// dx (N, C) += the rows' gradients (N*K, C) scattered back to their tokens.
void dispatch_gather_backward(float* dx, const float* drows, const Dispatch& d, int64_t C);
// out (N, C) += weights[assignment[r]] * expert_out[r] for every row r.
void combine(float* out, const float* expert_out, const float* weights, const Dispatch& d, int64_t C);
// drows (rows, C) = weight * dout[token] (overwritten); dweights (N*K) = dout[token] . expert_out[r]
// (overwritten, in assignment order; 0 for a dropped assignment).
void combine_backward(float* drows, float* dweights, const float* dout, const float* expert_out,
                      const float* weights, const Dispatch& d, int64_t C);

// The Switch Transformer load-balancing loss as transformers' load_balancing_loss_func
// computes it (no attention mask: every token counts) over the router outputs of all MoE
// layers together, R = layers x N rows of probs:
//   aux = E * sum_e f_e * P_e,  f_e = (number of rows that picked e) / R,  P_e = mean prob of e.
// Accumulate each layer with add_layer, then read loss(); d aux / d probs[row, e] = E f_e / R
// (f is piecewise constant: the choice is not differentiated).
class LoadBalancing {
 public:
  void reset(int64_t num_experts);
  void add_layer(const float* probs, const int32_t* experts, int64_t N, int64_t K);
  // A layer's assignments over capacity (not part of the loss: f counts the router's picks).
  void add_dropped(int64_t dropped, int64_t assignments);
  double loss() const;
  // Of the assignments added, the share dropped over capacity (0 when dropless).
  double dropped_fraction() const { return assignments_ > 0 ? dropped_ / assignments_ : 0.0; }
  // dprobs (N, E) += scale * d aux / d probs for one layer's rows.
  void backward(float* dprobs, int64_t N, float scale) const;
  int64_t rows() const { return rows_; }
  // picks (E), prob sums (E), rows, dropped, assignments: what the loss (and the dropped
  // share) is made of, to be summed over ranks
  // (each rank's tokens' statistics add up to those of all the tokens together).
  std::vector<double> statistics() const;
  void set_statistics(std::span<const double> stats);

 private:
  int64_t num_experts_ = 0;
  int64_t rows_ = 0;
  std::vector<double> picks_;      // (E) rows that picked each expert
  std::vector<double> prob_sums_;  // (E) sum of each expert's probs
  double dropped_ = 0.0, assignments_ = 0.0;
};

}  // namespace flotilla::model::moe
