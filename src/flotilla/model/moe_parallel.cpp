// Expert parallelism inside an MoE layer (model/expert_exchange.hpp): the experts' part
// of moe_forward and moe_backward when this rank holds only its block of the experts.
// Vocabulary as model/moe.hpp's; a *block* is the rows one source rank sent for one local
// expert: received rows are ordered by source rank, then by local expert (the order each
// source's dispatch put them in), so block (s, j) is a contiguous run and each expert runs
// on its blocks one by one. Every row's result is the one a single rank would compute for
// it; only the sums over rows of a weight gradient run in another order.
#include <numeric>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/model/llama.hpp"

namespace flotilla::model {

namespace {

// What one dispatch sends: per (rank, local expert) and per rank.
struct SendCounts {
  std::vector<int64_t> per_expert;  // (ep, El) = (E)
  std::vector<int64_t> per_rank;    // (ep)
};

SendCounts send_counts(const moe::Dispatch& d, int ep) {
  const int64_t E = d.num_experts, El = E / ep;
  SendCounts s;
  s.per_expert.resize(static_cast<size_t>(E));
  s.per_rank.assign(static_cast<size_t>(ep), 0);
  for (int64_t e = 0; e < E; ++e) {
    s.per_expert[static_cast<size_t>(e)] = d.rows(e);
    s.per_rank[static_cast<size_t>(e / El)] += d.rows(e);
  }
  return s;
}

std::vector<int64_t> per_rank(std::span<const int64_t> per_expert, int ep) {
  const size_t El = per_expert.size() / static_cast<size_t>(ep);
  std::vector<int64_t> out(static_cast<size_t>(ep), 0);
  for (size_t i = 0; i < per_expert.size(); ++i) out[i / El] += per_expert[i];
  return out;
}

// fn(j, r, n) for each block of received rows, in their order (by source rank, then local
// expert): local expert j's n > 0 rows [r, r + n).
template <class Fn>
void for_each_block(const std::vector<int64_t>& recv_counts, int ep, Fn&& fn) {
  const int64_t El = static_cast<int64_t>(recv_counts.size()) / ep;
  int64_t r = 0;
  for (int src = 0; src < ep; ++src)
    for (int64_t j = 0; j < El; ++j) {
      const int64_t n = recv_counts[static_cast<size_t>(src * El + j)];
      if (n == 0) continue;
      fn(j, r, n);
      r += n;
    }
}

template <class T>
T* sized(std::vector<T>& v, int64_t n) {
  if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  return v.data();
}

}  // namespace

void Llama::set_expert_exchange(ExpertExchange* exchange) {
  if (exchange && exchange->ep_size() > 1) {
    if (!cfg_.is_moe())
      throw InputError("model", fmt::format("--parallel ep={}: expert parallelism applies to mixture-of-experts "
                                            "models, and this {} model has no experts",
                                            exchange->ep_size(), architecture_name(cfg_.arch)));
    if (cfg_.moe.num_experts % exchange->ep_size() != 0)
      throw InputError("model", fmt::format("--parallel ep={}: the model's {} experts per layer do not divide among "
                                            "{} expert-parallel ranks (ep must divide the number of experts)",
                                            exchange->ep_size(), cfg_.moe.num_experts, exchange->ep_size()));
  }
  experts_ = exchange;
  if (held_.experts && exchange) {
    // This rank runs exactly the experts it holds: any other would read weights never loaded.
    const auto [first, end] = local_experts();
    if (first != held_.experts->begin || end != held_.experts->end)
      throw Error("model", fmt::format("the model holds experts [{}, {}) but expert rank {} of {} runs [{}, {})",
                                       held_.experts->begin, held_.experts->end, exchange->ep_rank(),
                                       exchange->ep_size(), first, end));
  }
  ep_shards_.assign(static_cast<size_t>(cfg_.n_layers), {});
}

std::pair<int64_t, int64_t> Llama::local_experts() const {
  const int64_t E = cfg_.moe.num_experts;
  if (!experts_ || experts_->ep_size() <= 1) return {0, E};
  const int64_t El = E / experts_->ep_size();
  return {experts_->ep_rank() * El, (experts_->ep_rank() + 1) * El};
}

void Llama::ep_experts_forward(int64_t l, const moe::Dispatch& d, const float* rows, float* expert_out,
                               const BlockContext& ctx) const {
  ExpertExchange& x = *experts_;
  const int ep = x.ep_size();
  const int64_t C = cfg_.dim, Fe = cfg_.moe.expert_ffn_dim, E = cfg_.moe.num_experts, El = E / ep;
  const int64_t first = x.ep_rank() * El;
  const LayerParams& w = layout_.layers[static_cast<size_t>(l)];
  ExpertShard& s = ep_shards_[static_cast<size_t>(l)];
  // Counts first: how many rows each rank sends for each of this rank's experts.
  const SendCounts send = send_counts(d, ep);
  s.recv_counts.assign(static_cast<size_t>(E), 0);
  x.exchange_counts(send.per_expert, s.recv_counts);
  const std::vector<int64_t> recv_rows = per_rank(s.recv_counts, ep);
  const int64_t R = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0});
  x.check_conserved(static_cast<int64_t>(d.token.size()), R);
  s.rows.resize(static_cast<size_t>(R * C));
  s.gate.resize(static_cast<size_t>(R * Fe));
  s.up.resize(static_cast<size_t>(R * Fe));
  x.exchange_rows(rows, send.per_rank, s.rows.data(), recv_rows, C);
  // This rank's experts on their blocks: out = down(silu(gate(rows)) * up(rows))
  float* act = sized(ep_act_, R * Fe);
  float* out = sized(ep_out_, R * C);
  for_each_block(s.recv_counts, ep, [&](int64_t j, int64_t r, int64_t n) {
    expert_forward(w.experts[static_cast<size_t>(first + j)],
                   {s.rows.data() + r * C, s.gate.data() + r * Fe, s.up.data() + r * Fe, n}, act + r * Fe,
                   out + r * C, {l, first + j, r, ctx.lora, ctx.dropout_step});
  });
  // Combine's half: every output back to the rank its token lives on, in dispatch order.
  x.exchange_rows(out, recv_rows, expert_out, send.per_rank, C);
}

void Llama::ep_experts_backward(int64_t l, const moe::Dispatch& d, float* drows, float* g) {
  ExpertExchange& x = *experts_;
  const int ep = x.ep_size();
  const int64_t C = cfg_.dim, Fe = cfg_.moe.expert_ffn_dim, E = cfg_.moe.num_experts, El = E / ep;
  const int64_t first = x.ep_rank() * El;
  const LayerParams& w = layout_.layers[static_cast<size_t>(l)];
  ExpertShard& s = ep_shards_[static_cast<size_t>(l)];
  const SendCounts send = send_counts(d, ep);
  const std::vector<int64_t> recv_rows = per_rank(s.recv_counts, ep);
  const int64_t R = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0});
  // d(expert_out) of every row to the rank that ran its expert (the reverse of combine's half).
  float* dout = sized(ep_dout_, R * C);
  x.exchange_rows(drows, send.per_rank, dout, recv_rows, C);
  float* act = sized(ep_act_, R * Fe);
  float* dact = sized(ep_dact_, R * Fe);
  float* dgate = sized(ep_dgate_, R * Fe);
  float* dup = sized(ep_dup_, R * Fe);
  float* dx = sized(ep_out_, R * C);
  for_each_block(s.recv_counts, ep, [&](int64_t j, int64_t r, int64_t n) {
    expert_backward(w.experts[static_cast<size_t>(first + j)],
                    {s.rows.data() + r * C, s.gate.data() + r * Fe, s.up.data() + r * Fe, n}, dout + r * C,
                    dx + r * C, g, {act + r * Fe, dact + r * Fe, dgate + r * Fe, dup + r * Fe},
                    backward_run(l, first + j, r));
  });
  // The rows' gradients back to their tokens' ranks (the reverse of dispatch), into drows.
  x.exchange_rows(dx, recv_rows, drows, send.per_rank, C);
}

}  // namespace flotilla::model
