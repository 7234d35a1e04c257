#include "flotilla/plan/plan.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/model/matmul_dtype.hpp"
#include "flotilla/train/report.hpp"

namespace flotilla::plan {
namespace {

constexpr double kHour = 3600.0;
// Plain data parallel is the answer while it keeps this share of linear speed-up.
constexpr double kGoodEfficiency = 0.75;
// Below this speed-up, distributing is not worth its setup.
constexpr double kWorthwhileSpeedup = 1.25;
// An available strategy is preferred to a planned one that is at most this much faster.
constexpr double kPreferAvailable = 0.9;

size_t index_of(const std::vector<int>& ranks, int n) {
  return static_cast<size_t>(std::find(ranks.begin(), ranks.end(), n) - ranks.begin());
}

std::string train_command(const PlanResult& p, const Strategy* s, int n, std::string_view extra_flags = {}) {
  const PlanRequest& r = p.request;
  std::string flags = r.train_args;
  if (!extra_flags.empty()) flags += " " + std::string(extra_flags);
  if (s && !s->train_flags.empty()) {
    // Accumulation replaces the user's own --grad-accum.
    if (s->kind == StrategyKind::accumulate) {
      const std::string own = fmt::format("--grad-accum {}", r.workload.grad_accum);
      const size_t at = flags.find(own);
      if (at != std::string::npos) flags.erase(at, own.size() + 1);
    }
    flags += " " + s->train_flags;
  }
  if (n <= 1) return fmt::format("flotilla train {} --out run", flags);
  const Cluster& c = r.cluster;
  std::string launch = fmt::format("mpirun -np {}", n);
  if (!r.hostfile.empty())
    launch += " --hostfile " + r.hostfile;
  else if (c.hosts_used(n) > 1)
    launch += " --hostfile hosts";  // one line per machine
  const int threads = std::max(1, c.cores / c.ranks_per_host(n));
  return fmt::format("{} -x OMP_NUM_THREADS={} flotilla train {} --out run", launch, threads, flags);
}

bool is_zero(StrategyKind k) {
  return k == StrategyKind::zero1 || k == StrategyKind::zero2 || k == StrategyKind::zero3;
}

// Model parallelism the recommender weighs when a replica does not fit: tp = T, pp = P
// and pp = P x tp = T, each with its step, its speed-up over one rank (the same rows) and
// the fullest machine's memory at the peak (ranks fill the machines in order, tp ranks
// adjacent, then the stages: parallel/mesh.hpp; world rank 0 also gathers the final model).
struct ModelParallel {
  Advice advice = Advice::tensor_parallel;
  std::string name;   // "tp=2", "pp=2", "pp=2,tp=2"
  std::string flags;  // for flotilla train
  int ranks = 1;
  double step_s = 0.0, speedup = 0.0;
  double host_peak_bytes = 0.0;
  std::string traffic;  // what it sends a step, for the reason line
};

// The fullest machine's bytes when `per_rank` (world rank order) fill machines of `slots`.
double fullest_host_bytes(const std::vector<double>& per_rank, int slots) {
  double most = 0.0;
  for (size_t h = 0; h < per_rank.size(); h += static_cast<size_t>(slots)) {
    double host = 0.0;
    for (size_t r = h; r < std::min(per_rank.size(), h + static_cast<size_t>(slots)); ++r) host += per_rank[r];
    most = std::max(most, host);
  }
  return most;
}

std::vector<ModelParallel> model_parallel_layouts(const PlanResult& p) {
  const int slots = std::max(1, p.request.cluster.slots);
  std::vector<ModelParallel> out;
  for (const TensorPlan& t : p.tensors) {
    std::vector<double> ranks(static_cast<size_t>(t.tp), t.memory_bytes);
    ranks[0] = t.rank0_memory_bytes;
    out.push_back({Advice::tensor_parallel, fmt::format("tp={}", t.tp), fmt::format("--parallel tp={}", t.tp), t.tp,
                   t.step_s, t.speedup, fullest_host_bytes(ranks, slots),
                   fmt::format("all-reducing {} of activations a step", format_bytes(t.all_reduce_bytes))});
    if (t.zero_dp < 2) continue;
    // ZeRO-3 over the replicas: every rank holds its shard of its slice; rank 0 also the final model.
    std::vector<double> mesh(static_cast<size_t>(t.tp * t.zero_dp), t.zero3.memory_bytes);
    mesh[0] = t.zero3.rank0_memory_bytes;
    out.push_back({Advice::tensor_parallel_sharded, fmt::format("dp={},tp={} ZeRO-3", t.zero_dp, t.tp),
                   fmt::format("--parallel dp={},tp={} --zero 3", t.zero_dp, t.tp), t.tp * t.zero_dp, t.zero3.step_s,
                   t.zero3.speedup, fullest_host_bytes(mesh, slots),
                   fmt::format("all-reducing {} of activations over tp and gathering and reduce-scattering {} of "
                               "its slices over dp a step from each rank",
                               format_bytes(t.all_reduce_bytes), format_bytes(t.zero3.dp_wire_bytes_per_rank))});
  }
  for (const PipelinePlan& pp : p.pipelines)
    out.push_back({Advice::pipeline_parallel, fmt::format("pp={}", pp.stages),
                   fmt::format("--parallel pp={} --micro-batches {}", pp.stages, pp.micro_batches), pp.stages, pp.step_s,
                   pp.speedup, fullest_host_bytes(pp.peak_bytes, slots),
                   fmt::format("sending {} point to point a step from the busiest rank (bubble {:.0f}%)",
                               format_bytes(pp.max_rank_send_bytes), 100 * pp.bubble)});
  for (const MeshPlan& m : p.meshes) {
    std::vector<double> ranks;
    for (size_t s = 0; s < m.peak_bytes.size(); ++s)
      for (int t = 0; t < m.tp; ++t)
        ranks.push_back(m.peak_bytes[s] - (s == 0 && t > 0 ? m.final_model_bytes : 0.0));
    double tp_wire = 0.0;
    for (const double b : m.tp_wire_bytes) tp_wire = std::max(tp_wire, b);
    out.push_back({Advice::pipeline_tensor_parallel, fmt::format("pp={},tp={}", m.pp, m.tp),
                   fmt::format("--parallel pp={},tp={} --micro-batches {}", m.pp, m.tp, m.stages.micro_batches),
                   m.pp * m.tp, m.step_s, m.speedup, fullest_host_bytes(ranks, slots),
                   fmt::format("all-reducing {} over tp and sending {} between stages a step from the busiest rank "
                               "(bubble {:.0f}%)",
                               format_bytes(tp_wire), format_bytes(m.stages.max_rank_send_bytes),
                               100 * m.stages.bubble)});
  }
  return out;
}

// The fastest layout of model_parallel_layouts whose fullest machine fits and whose
// throughput beats the ZeRO stage that fits (`zero`, null: none fits) by
// kModelParallelMargin, both against one rank (these ranks run the same rows, ZeRO's ranks
// more rows each); of two within 2%, the one on fewer ranks. The margin stands for what
// these models leave out: the norms and residual adds every tp rank repeats, products T
// times narrower (tp) or micro-batches M times shorter (pp) that run slower per flop
// (W2 at tp=2 on one machine ran at 1.81x of one rank, not 2). Empty when none does.
constexpr double kModelParallelMargin = 1.25;
// Each layout weighed goes into `walk`, one line.
std::optional<ModelParallel> faster_model_parallel(const PlanResult& p, const StrategyRow* zero,
                                                   std::vector<std::string>& walk) {
  const PlanRequest& r = p.request;
  const double usable = r.memory_headroom * static_cast<double>(r.cluster.memory_bytes);
  std::optional<ModelParallel> best;
  for (ModelParallel& m : model_parallel_layouts(p)) {
    if (m.ranks > p.ranks.back()) continue;
    const bool fits = r.cluster.memory_bytes <= 0 || m.host_peak_bytes <= usable;
    walk.push_back(fmt::format("{} on {} ranks: {:.2f}x one rank, {} on the fullest machine at its peak ({})", m.name,
                               m.ranks, m.speedup, format_bytes(m.host_peak_bytes), fits ? "fits" : "does not fit"));
    if (!fits) continue;
    if (zero) {
      // ZeRO's throughput on as many ranks as this uses, if it fits there, else where it first fits.
      size_t i = 1;
      while (i + 1 < p.ranks.size() && (p.ranks[i] < m.ranks || !zero->fits_at(i, r))) ++i;
      if (!(m.speedup > kModelParallelMargin * zero->weak[i].speedup)) continue;
    }
    const bool faster = !best || m.speedup > 1.02 * best->speedup;
    const bool level_and_fewer = best && m.speedup * 1.02 >= best->speedup && m.ranks < best->ranks;
    if (faster || level_and_fewer) best = std::move(m);
  }
  return best;
}

struct ShardingFit {
  const StrategyRow* row = nullptr;
  size_t at = 0;  // index into PlanResult::ranks
};

// The fewest ranks (more than one) on which a ZeRO stage fits, and at that count the lowest
// stage: a higher one costs more work or bytes (ZeRO-2 hands gradient pages back and faults
// them in again every step, and reduce-scatters every micro-batch). A stage flotilla train
// runs comes before a planned one, whatever their rank counts.
std::optional<ShardingFit> smallest_sharding(const PlanResult& p) {
  for (const bool available : {true, false})
    for (size_t i = 1; i < p.ranks.size(); ++i)
      for (const StrategyRow& row : p.rows)
        if (is_zero(row.strategy.kind) && row.strategy.available == available && row.fits_at(i, p.request))
          return ShardingFit{&row, i};
  return std::nullopt;
}

// One line: why a replica does not fit, what the chosen stage cuts, and what it needs.
std::string sharding_reason(const PlanResult& p, const StrategyRow& z, size_t i) {
  const PlanRequest& r = p.request;
  const MemoryCost& m = z.memory[i];
  std::string what;
  switch (z.strategy.kind) {
    case StrategyKind::zero1: what = "shards AdamW's moments"; break;
    case StrategyKind::zero2: what = "shards AdamW's moments and the gradients"; break;
    default: what = "shards the weights, gradients and moments, gathering a layer at a time"; break;
  }
  std::string need = fmt::format("{} per rank at the peak", format_bytes(m.peak()));
  if (m.steady() < m.peak()) need += fmt::format(" ({} between steps)", format_bytes(m.steady()));
  const int per_host = r.cluster.ranks_per_host(p.ranks[i]);
  if (per_host > 1) need += fmt::format(", {} for the {} ranks of a machine", format_bytes(z.host_peak_bytes(i, r)), per_host);
  return fmt::format("a replica needs {} at its peak and a machine has {} usable; {} {}: on {} ranks {}",
                     format_bytes(p.row(StrategyKind::all_reduce).host_peak_bytes(0, r)),
                     format_bytes(r.memory_headroom * static_cast<double>(r.cluster.memory_bytes)), z.strategy.name,
                     what, p.ranks[i], need);
}

}  // namespace

double StrategyRow::host_peak_bytes(size_t i, const PlanRequest& r) const {
  return r.cluster.ranks_per_host(weak[i].ranks) * memory[i].peak();
}

bool StrategyRow::fits_at(size_t i, const PlanRequest& r) const {
  return r.cluster.memory_bytes <= 0 ||
         host_peak_bytes(i, r) <= r.memory_headroom * static_cast<double>(r.cluster.memory_bytes);
}

const StrategyRow& PlanResult::row(StrategyKind kind) const {
  for (const StrategyRow& r : rows)
    if (r.strategy.kind == kind) return r;
  throw Error("plan", "no such strategy row");
}

std::string_view advice_name(Advice a) {
  switch (a) {
    case Advice::one_machine: return "stay on one machine";
    case Advice::data_parallel: return "basic data parallel";
    case Advice::accumulate_or_compress: return "data parallel with accumulation or compression";
    case Advice::local_sgd: return "local SGD";
    case Advice::sharding: return "sharding (ZeRO)";
    case Advice::tensor_parallel: return "tensor parallel";
    case Advice::tensor_parallel_sharded: return "tensor parallel with ZeRO-3 over its replicas";
    case Advice::pipeline_parallel: return "pipeline parallel";
    case Advice::pipeline_tensor_parallel: return "pipeline stages of tensor-parallel groups";
    case Advice::does_not_fit: return "does not fit";
  }
  return "?";
}

PlanResult make_plan(const PlanRequest& request) {
  PlanResult p;
  p.request = request;
  const Workload& w = request.workload;
  const Cluster& c = request.cluster;
  const int N = std::max(1, c.max_ranks());
  p.ranks = table_ranks(N);
  const int K = request.knobs.accumulate > 0 ? request.knobs.accumulate : pick_accumulation(w, request.cost, c, N);
  for (const Strategy& s : all_strategies(request.knobs, w, K)) {
    StrategyRow row;
    row.strategy = s;
    row.comm = comm_cost(s, w, N, c);
    for (const int n : p.ranks) {
      row.weak.push_back(predict_weak(s, w, request.cost, c, n));
      row.memory.push_back(memory_cost(s, w, n, c.ranks_per_host(n), c.hosts_used(n)));
    }
    p.rows.push_back(std::move(row));
  }
  const Strategy plain = p.row(StrategyKind::all_reduce).strategy;
  for (const int n : p.ranks) p.strong.push_back(predict_strong(plain, w, request.cost, c, n));
  p.serial_fraction = serial_fraction(request.cost);
  p.steps_per_epoch_one = request.rows_per_epoch / static_cast<double>(w.batch_size * w.grad_accum);
  p.epoch_s_one = p.steps_per_epoch_one * request.cost.total_s();
  p.run_s_one = request.epochs * p.epoch_s_one;
  // Model-parallel ranks that share a machine's cores compute slower, as data parallel's do.
  const auto slow = [&](int n) { return compute_slowdown(c, request.cost, n); };
  p.tensors = tensor_parallel_plans(w, request.cost, c, slow);
  for (int P = 2; P <= N && P <= w.model.n_layers; P *= 2) {
    int64_t M = request.micro_batches;
    if (M <= 0)
      for (int64_t m = 1; m <= w.batch_size && m <= 4 * P; ++m)
        if (w.batch_size % m == 0) M = m;
    p.pipelines.push_back(
        plan_pipeline(w, request.cost, P, M, parallel::PipelineSchedule::one_f_one_b, c.link_for(P), N / P, slow(P)));
  }
  for (const PipelinePlan& pp : p.pipelines)
    for (const TensorPlan& t : p.tensors)
      if (pp.stages * t.tp <= N)
        p.meshes.push_back(plan_mesh(w, request.cost, pp.stages, t.tp, pp.micro_batches, c.link_for(pp.stages * t.tp),
                                     c.link_for(t.tp), slow(pp.stages * t.tp)));
  p.experts = expert_parallel_plans(w, N);
  p.recommendation = recommend(p);
  return p;
}

Recommendation recommend(const PlanResult& p) {
  const PlanRequest& r = p.request;
  Recommendation rec;
  const int N = p.ranks.back();
  const StrategyRow& plain = p.row(StrategyKind::all_reduce);
  const double mem = static_cast<double>(r.cluster.memory_bytes);
  auto stay = [&](std::string reason) {
    rec.advice = Advice::one_machine;
    rec.ranks = 1;
    rec.strategy.clear();
    rec.reason = std::move(reason);
    rec.command = train_command(p, nullptr, 1);
    return rec;
  };

  // 1. Does it fit one machine? If not, only sharding (or a smaller trainable set) helps.
  const bool fits_one = plain.fits_at(0, r);
  rec.walk.push_back(fmt::format("Does one replica fit one machine's memory? {} ({} needed at the peak, {} x {:.0f}% usable)",
                                 fits_one ? "yes" : "no", format_bytes(plain.memory[0].peak()), format_bytes(mem),
                                 100 * r.memory_headroom));
  if (!fits_one) {
    const std::optional<ShardingFit> fit = smallest_sharding(p);
    if (const std::optional<ModelParallel> m = faster_model_parallel(p, fit ? fit->row : nullptr, rec.walk)) {
      rec.advice = m->advice;
      rec.strategy = m->name;
      rec.ranks = m->ranks;
      const int per_host = r.cluster.ranks_per_host(m->ranks);
      rec.reason = fmt::format("a replica needs {} at its peak and a machine has {} usable; {} holds {} on the fullest "
                               "machine ({} rank{}) and runs a step in {} ({:.2f}x one rank), {}{}",
                               format_bytes(plain.host_peak_bytes(0, r)), format_bytes(r.memory_headroom * mem), m->name,
                               format_bytes(m->host_peak_bytes), per_host, per_host == 1 ? "" : "s",
                               format_seconds(m->step_s), m->speedup, m->traffic,
                               fit ? fmt::format("; {} on {} ranks: {:.2f}x", fit->row->strategy.name,
                                                 p.ranks[fit->at], fit->row->weak[fit->at].speedup)
                                   : std::string("; no ZeRO stage fits"));
      rec.command = train_command(p, nullptr, m->ranks, m->flags);
      return rec;
    }
    if (fit) {
      const StrategyRow& z = *fit->row;
      rec.advice = Advice::sharding;
      rec.strategy = z.strategy.name;
      rec.ranks = p.ranks[fit->at];
      rec.planned = !z.strategy.available;
      rec.reason = sharding_reason(p, z, fit->at);
      rec.command = train_command(p, &z.strategy, rec.ranks);
      for (const StrategyRow& other : p.rows) {
        if (!is_zero(other.strategy.kind) || &other == &z) continue;
        size_t j = 1;
        while (j < p.ranks.size() && !other.fits_at(j, r)) ++j;
        const std::string name = other.strategy.name + (other.strategy.available ? "" : " (planned)");
        rec.walk.push_back(j < p.ranks.size()
                               ? fmt::format("{} fits on {} ranks ({} per rank at the peak)", name, p.ranks[j],
                                             format_bytes(other.memory[j].peak()))
                               : fmt::format("{} does not fit on {} ranks ({} per rank at the peak)", name, N,
                                             format_bytes(other.memory.back().peak())));
      }
      return rec;
    }
    rec.advice = Advice::does_not_fit;
    rec.ranks = N;
    rec.reason = fmt::format("even ZeRO-3 over {} machines needs {} each of {}: {}", N,
                             format_bytes(p.row(StrategyKind::zero3).host_peak_bytes(p.ranks.size() - 1, r)),
                             format_bytes(mem),
                             r.workload.lora ? "use more machines, a shorter --seq-len or a smaller --batch-size"
                                             : "try --fine-tune-type lora, a shorter --seq-len or a smaller --batch-size");
    return rec;
  }
  if (N == 1) return stay("there is one machine (give --hosts N or --hostfile to plan for more)");

  // 2. The flowchart's questions: is one run long, or will there be many?
  const double run_s = p.run_s_one, total_s = run_s * r.runs;
  const bool long_run = run_s >= kHour;
  rec.walk.push_back(fmt::format("Does one run take an hour or more on one machine? {} ({} for {:g} epoch{})",
                                 long_run ? "yes" : "no", format_seconds(run_s), r.epochs, r.epochs == 1 ? "" : "s"));
  const bool many = r.runs > 1 && total_s >= kHour;
  if (!long_run) {
    rec.walk.push_back(fmt::format("Will you train many times? {} (--runs {}: {} in all)", many ? "yes" : "no", r.runs,
                                   format_seconds(total_s)));
    if (!many)
      return stay(fmt::format("one run takes {} here ({} for all {} run{}): less than setting up machines costs",
                              format_seconds(run_s), format_seconds(total_s), r.runs, r.runs == 1 ? "" : "s"));
  }

  // 3. Amdahl: which strategy keeps the most of the speed-up, and at how many ranks.
  struct Best {
    const StrategyRow* row = nullptr;
    size_t at = 0;
    double speedup = 0;
  };
  auto best_of = [&](bool available_only) {
    Best b;
    for (const StrategyRow& row : p.rows) {
      if (available_only && !row.strategy.available) continue;
      for (size_t i = 1; i < p.ranks.size(); ++i) {  // more than one rank
        if (!row.fits_at(i, r)) continue;
        if (row.weak[i].speedup > b.speedup * 1.02) b = {&row, i, row.weak[i].speedup};
      }
    }
    return b;
  };
  const Prediction& plain_n = plain.weak.back();
  rec.walk.push_back(fmt::format("Plain all-reduce on {} ranks: step {} (compute {}, serial {}, exchange {}), "
                                 "{:.2f}x, {:.0f}% efficient",
                                 N, format_seconds(plain_n.step_s), format_seconds(plain_n.compute_s),
                                 format_seconds(plain_n.serial_s), format_seconds(plain_n.comm_s), plain_n.speedup,
                                 100 * plain_n.efficiency));
  Best plain_best;
  for (size_t i = 1; i < p.ranks.size(); ++i)
    if (plain.fits_at(i, r) && plain.weak[i].speedup > plain_best.speedup * 1.02)
      plain_best = {&plain, i, plain.weak[i].speedup};
  Best pick;
  // Efficiency against what the machines can hold: ranks that time-share a machine's
  // cores add no capacity, so they are not counted as waste either.
  const auto machine_efficiency = [&](const Prediction& pr) {
    const int per_machine = std::max(1, r.cluster.cores / std::max(1, r.cost.threads));
    return pr.speedup / std::min(pr.ranks, r.cluster.hosts_used(pr.ranks) * per_machine);
  };
  if (plain_best.row && plain_best.speedup >= kWorthwhileSpeedup &&
      machine_efficiency(plain.weak[plain_best.at]) >= kGoodEfficiency) {
    pick = plain_best;
    rec.advice = Advice::data_parallel;
  } else {
    const Best any = best_of(false), avail = best_of(true);
    pick = avail.row && avail.speedup >= kPreferAvailable * any.speedup ? avail : any;
    if (!pick.row || pick.speedup < kWorthwhileSpeedup)
      return stay(fmt::format("on {} machines the exchange eats the gain: the best strategy reaches {:.2f}x "
                              "(serial fraction {:.0f}%, all-reduce {} per step against {} of compute)",
                              N, pick.speedup, 100 * p.serial_fraction, format_seconds(plain_n.comm_s),
                              format_seconds(r.cost.compute_s)));
    switch (pick.row->strategy.kind) {
      case StrategyKind::all_reduce:
      case StrategyKind::hierarchical: rec.advice = Advice::data_parallel; break;
      case StrategyKind::local_sgd: rec.advice = Advice::local_sgd; break;
      case StrategyKind::zero1:
      case StrategyKind::zero2:
      case StrategyKind::zero3: rec.advice = Advice::sharding; break;
      default: rec.advice = Advice::accumulate_or_compress; break;
    }
  }
  const Prediction& at = pick.row->weak[pick.at];
  rec.strategy = pick.row->strategy.name;
  rec.ranks = at.ranks;
  rec.planned = !pick.row->strategy.available;
  const int machines = r.cluster.hosts_used(rec.ranks);
  rec.reason = fmt::format("one run takes {} here; {} on {} rank{} ({} machine{}) gives {:.2f}x ({:.0f}% efficient), "
                           "so a run takes about {}",
                           format_seconds(run_s), rec.strategy, rec.ranks, rec.ranks == 1 ? "" : "s", machines,
                           machines == 1 ? "" : "s", at.speedup, 100 * machine_efficiency(at),
                           format_seconds(run_s / at.speedup));
  if (rec.advice != Advice::data_parallel)
    rec.reason += fmt::format(" where plain all-reduce gives {:.2f}x", plain.weak[index_of(p.ranks, rec.ranks)].speedup);
  if (pick.row->strategy.kind == StrategyKind::accumulate)
    rec.reason += fmt::format("; the global batch grows {}-fold, so revisit --lr", pick.row->strategy.factor);
  rec.command = train_command(p, &pick.row->strategy, rec.ranks);
  return rec;
}

std::string render_text(const PlanResult& p) {
  const PlanRequest& r = p.request;
  const Workload& w = r.workload;
  const Cluster& c = r.cluster;
  const int N = p.ranks.back();
  std::string out;
  out += fmt::format("model: {} layers, dim {}, {:.2f}M parameters; {} ({:.3f}M trainable)\n", w.model.n_layers,
                     w.model.dim, static_cast<double>(w.model.num_params()) / 1e6,
                     w.lora ? "LoRA" : "full fine-tuning", static_cast<double>(w.trainable_floats) / 1e6);
  out += fmt::format("step: batch {} x seq {} x accum {} = {} tokens per rank\n", w.batch_size, w.seq_len,
                     w.grad_accum, w.tokens_per_step());
  if (w.dtype == kernels::GemmInput::bf16)
    out += fmt::format("products: bf16 inputs, float32 accumulation; the weights' bf16 copies {} on a whole replica\n",
                       format_bytes(w.bf16_copy_bytes()));
  out += fmt::format("data: {}\n", r.data_description);
  out += fmt::format("machines: {} host{} x {} rank{} each, {} cores, {} memory each [{}]\n", c.hosts,
                     c.hosts == 1 ? "" : "s", c.slots, c.slots == 1 ? "" : "s", c.cores,
                     format_bytes(static_cast<double>(c.memory_bytes)), c.memory_source);
  if (c.one_machine)
    out += fmt::format("  (emulated: the hosts plan ran on are namespaces of one machine, so every rank shares "
                       "its {} cores)\n", c.cores);
  out += fmt::format("network: {}, latency {} [{}]\n", format_bandwidth(c.network.bandwidth_bytes_per_s),
                     format_seconds(c.network.latency_s), c.network.source);
  if (c.slots > 1)
    out += fmt::format("within a host: {}, latency {} [{}]\n", format_bandwidth(c.local.bandwidth_bytes_per_s),
                       format_seconds(c.local.latency_s), c.local.source);
  const StepCost& s = r.cost;
  out += fmt::format("\none machine, one rank ({})\n", s.source);
  out += fmt::format("  step {}: compute {}, data {}, optimizer {}; serial fraction {:.1f}%\n",
                     format_seconds(s.total_s()), format_seconds(s.compute_s), format_seconds(s.data_s),
                     format_seconds(s.update_s), 100 * p.serial_fraction);
  if (s.work_samples_s.size() > 1)
    out += fmt::format("  a step varies: waiting for the slowest of {} ranks adds {} (median of the slowest)\n",
                       N, format_seconds(straggler_wait_s(s.work_samples_s, N)));
  if (s.contention_ranks > 1)
    out += fmt::format("  {} ranks training at once on this host each ran {:.2f}x slower than one alone "
                       "(memory bandwidth, caches; time slicing aside)\n",
                       s.contention_ranks, s.contention);
  if (static_cast<int64_t>(c.slots) * s.threads > c.cores)
    out += fmt::format("  note: {} ranks x {} threads exceed a machine's {} cores, so ranks time-share them; "
                       "measuring with --threads {} predicts them more sharply\n",
                       c.slots, s.threads, c.cores, std::max(1, c.cores / c.slots));
  out += fmt::format("  epoch: {:.0f} steps, {}; {:g} epoch{} x {} run{} = {}\n", std::ceil(p.steps_per_epoch_one),
                     format_seconds(p.epoch_s_one), r.epochs, r.epochs == 1 ? "" : "s", r.runs, r.runs == 1 ? "" : "s",
                     format_seconds(p.run_s_one * r.runs));

  out += fmt::format("\nstrategies on {} ranks (per rank, per step of your configuration; * = planned, not in "
                     "this build)\n", N);
  out += fmt::format("  {:<18} {:>11} {:>11} {:>10} {:>10} {:>8} {:>6} {:>11}  {}\n", "strategy", "payload", "sent/step",
                     "exchange", "step", "speedup", "eff", "peak mem", "fits");
  const size_t last = p.ranks.size() - 1;
  for (const StrategyRow& row : p.rows) {
    const Prediction& at = row.weak[last];
    out += fmt::format("  {:<18} {:>11} {:>11} {:>10} {:>10} {:>7.2f}x {:>5.0f}% {:>11}  {}\n",
                       row.strategy.name + (row.strategy.available ? "" : " *"), format_bytes(row.comm.payload_bytes),
                       format_bytes(row.comm.wire_bytes), format_seconds(row.comm.seconds), format_seconds(at.step_s),
                       at.speedup, 100 * at.efficiency, format_bytes(row.memory[last].peak()),
                       row.fits_at(last, r) ? "yes" : "NO");
  }

  out += "\nmemory per rank on " + std::to_string(N) + " ranks (between steps; peak: the most during a step)\n";
  out += fmt::format("  {:<18} {:>10} {:>10} {:>10} {:>11} {:>10} {:>10} {:>10}\n", "strategy", "weights", "grads",
                     "AdamW", "activations", "buffers", "total", "peak");
  bool peak_differs = false;
  for (const StrategyRow& row : p.rows) {
    const MemoryCost& m = row.memory[last];
    const bool differs = m.peak() > m.steady();
    peak_differs = peak_differs || differs;
    out += fmt::format("  {:<18} {:>10} {:>10} {:>10} {:>11} {:>10} {:>10} {:>10}\n", row.strategy.name,
                       format_bytes(m.weights), format_bytes(m.grads), format_bytes(m.optimizer),
                       format_bytes(m.activations), format_bytes(m.buffers), format_bytes(m.steady()),
                       differs ? format_bytes(m.peak()) : "same");
  }
  if (peak_differs)
    out += "  (ZeRO-2 hands each bucket's gradient back once it is reduced: between steps only its shard remains,\n"
           "   during backward the buckets written and not yet reduced come on top)\n";
  if (s.peak_rss_bytes > 0)
    out += fmt::format("  (the measured one-rank run peaked at {} resident, code and data included)\n",
                       format_bytes(static_cast<double>(s.peak_rss_bytes)));

  out += "\nscaling, plain all-reduce (weak: same --batch-size per rank; strong: one global batch split)\n";
  out += fmt::format("  {:>5} {:>10} {:>9} {:>10} {:>10} {:>8} {:>6} {:>11} {:>10} {:>8} {:>8}\n", "ranks", "compute",
                     "wait", "exchange", "step", "speedup", "eff", "epoch", "strong", "speedup", "Amdahl");
  const StrategyRow& plain = p.row(StrategyKind::all_reduce);
  for (size_t i = 0; i < p.ranks.size(); ++i) {
    const Prediction& wk = plain.weak[i];
    const Prediction& st = p.strong[i];
    out += fmt::format("  {:>5} {:>10} {:>9} {:>10} {:>10} {:>7.2f}x {:>5.0f}% {:>11} {:>10} {:>7.2f}x {:>7.2f}x\n",
                       wk.ranks, format_seconds(wk.compute_s), format_seconds(wk.wait_s), format_seconds(wk.comm_s), format_seconds(wk.step_s), wk.speedup,
                       100 * wk.efficiency, format_seconds(p.epoch_s_one / wk.speedup), format_seconds(st.step_s),
                       st.speedup, amdahl_speedup(p.serial_fraction, wk.ranks));
  }
  out += fmt::format("  Amdahl's bound for this step: {:.1f}x however many ranks (serial fraction {:.2f}%)\n",
                     p.serial_fraction > 0 ? 1.0 / p.serial_fraction : INFINITY, 100 * p.serial_fraction);

  for (const PipelinePlan& pp : p.pipelines) {
    if (&pp == &p.pipelines.front())
      out += "\npipeline parallel (--parallel pp=P, 1f1b; each stage holds only its layers)\n";
    std::string layers, memory;
    for (const parallel::StageRange& s : pp.ranges) layers += fmt::format("{}[{}, {})", layers.empty() ? "" : " ", s.begin, s.end);
    for (size_t i = 0; i < pp.activation_bytes.size(); ++i)
      memory += fmt::format("{}{} ({} state + {} activations)", memory.empty() ? "" : " / ", format_bytes(pp.memory_bytes[i]),
                            format_bytes(pp.state_bytes[i]), format_bytes(pp.activation_bytes[i]));
    out += fmt::format("  pp={} --micro-batches {}: layers {}; bubble {:.0f}%; point to point {} a step ({} across each "
                       "boundary), {} sent by the busiest rank in {}; step {} ({:.2f}x one rank); memory per "
                       "stage {}\n",
                       pp.stages, pp.micro_batches, layers, 100 * pp.bubble, format_bytes(pp.p2p_bytes),
                       format_bytes(pp.boundary_bytes), format_bytes(pp.max_rank_send_bytes), format_seconds(pp.comm_s),
                       format_seconds(pp.step_s), pp.speedup, memory);
    if (pp.final_write_bytes > 0)
      out += fmt::format("  pp={}: stage 0 peaks at {} writing the final model (each other stage's tensor received "
                         "in turn, the largest {})\n",
                         pp.stages, format_bytes(pp.peak_bytes[0]), format_bytes(pp.final_write_bytes));
    if (pp.zero_dp > 1) {
      std::string zero;
      for (const double b : pp.zero1_state_bytes) zero += fmt::format("{}{}", zero.empty() ? "" : " / ", format_bytes(b));
      out += fmt::format("  dp={},pp={} --zero 1: state per stage {}\n", pp.zero_dp, pp.stages, zero);
    }
  }

  for (const ExpertPlan& ep : p.experts) {
    if (&ep == &p.experts.front())
      out += fmt::format("\nexpert parallel (--parallel ep=E; each rank holds E/ep of the {} experts of {} MoE layers; "
                         "balanced routing)\n",
                         p.request.workload.model.moe.num_experts, ep.moe_layers);
    out += fmt::format("  ep={}: all-to-all {} a step per MoE layer (dispatch + combine, forward and backward) + {} of "
                       "counts; {} a step in all; gradients {} a step (all but the experts'); experts' state {} per "
                       "rank ({} on one rank)\n",
                       ep.ep, format_bytes(ep.all_to_all_bytes_per_layer), format_bytes(ep.count_bytes_per_layer),
                       format_bytes(ep.all_to_all_bytes), format_bytes(ep.gradient_bytes),
                       format_bytes(ep.expert_bytes_per_rank), format_bytes(ep.expert_bytes_one_rank));
  }

  for (const TensorPlan& t : p.tensors) {
    if (&t == &p.tensors.front())
      out += "\ntensor parallel (--parallel tp=T; the ranks split every layer and the vocabulary, run the same rows)\n";
    out += fmt::format("  tp={}: all-reduce {} a step per layer (2 forward, 2 backward), {} a step in all, {} on the "
                       "wire from each rank in {}; step {} ({:.2f}x one rank); per rank {:.2f}M of {:.2f}M "
                       "parameters, memory {} ({} state + {} activations)\n",
                       t.tp, format_bytes(t.all_reduce_bytes_per_layer), format_bytes(t.all_reduce_bytes),
                       format_bytes(t.wire_bytes_per_rank), format_seconds(t.comm_s), format_seconds(t.step_s),
                       t.speedup, static_cast<double>(t.params_per_rank) / 1e6,
                       static_cast<double>(p.request.workload.model.num_params()) / 1e6, format_bytes(t.memory_bytes),
                       format_bytes(t.state_bytes), format_bytes(t.activation_bytes));
    out += fmt::format("  tp={}: rank 0 peaks at {} gathering the final model ({} more)\n", t.tp,
                       format_bytes(t.rank0_memory_bytes), format_bytes(t.final_model_bytes));
    out += fmt::format("  tp={} --sequence-parallel: {} on the wire from each rank in {}; step {}; activations {} per "
                       "rank, memory {}\n",
                       t.tp, format_bytes(t.sequence.wire_bytes_per_rank), format_seconds(t.sequence.comm_s),
                       format_seconds(t.sequence.step_s), format_bytes(t.sequence.activation_bytes),
                       format_bytes(t.sequence.memory_bytes));
    if (t.zero_dp > 1) {
      out += fmt::format("  dp={},tp={} --zero 1 | 2: state {} | {} per rank (the replicas shard each slice's "
                         "optimizer state, and at stage 2 its gradients)\n",
                         t.zero_dp, t.tp, format_bytes(t.zero1_state_bytes), format_bytes(t.zero2_state_bytes));
      const TensorPlan::Zero3& z = t.zero3;
      out += fmt::format("  dp={},tp={} --zero 3: memory {} per rank at the peak ({} weights, {} gradients in "
                         "backward, {} moments, {} activations, {} buffers; rank 0 {} with the final model); "
                         "{} over dp on the wire from each rank in {} beside tp's {}; step {} ({:.2f}x one rank "
                         "with its {} replicas)\n",
                         t.zero_dp, t.tp, format_bytes(z.memory_bytes), format_bytes(z.weight_bytes),
                         format_bytes(z.grad_bytes), format_bytes(z.optimizer_bytes), format_bytes(z.activation_bytes),
                         format_bytes(z.buffer_bytes), format_bytes(z.rank0_memory_bytes),
                         format_bytes(z.dp_wire_bytes_per_rank), format_seconds(z.dp_comm_s),
                         format_seconds(t.comm_s), format_seconds(z.step_s), z.speedup, t.zero_dp);
    }
  }

  for (const MeshPlan& m : p.meshes) {
    if (&m == &p.meshes.front())
      out += "\npipeline stages of tensor-parallel groups (--parallel pp=P,tp=T; a stage's layers split over its tp "
             "ranks)\n";
    std::string memory, wire, sp_memory, sp_wire;
    const auto add = [](std::string& list, double bytes) { list += (list.empty() ? "" : " / ") + format_bytes(bytes); };
    for (size_t i = 0; i < m.stages.memory_bytes.size(); ++i) {
      add(memory, m.stages.memory_bytes[i]);
      add(wire, m.tp_wire_bytes[i]);
      add(sp_memory, m.sequence.memory_bytes[i]);
      add(sp_wire, m.sequence.tp_wire_bytes[i]);
    }
    out += fmt::format("  pp={},tp={} --micro-batches {}: point to point {} a step from the busiest rank; tp all-reduces "
                       "{} on the wire per rank by stage; step {} ({:.2f}x one rank); memory per rank by stage {} "
                       "(rank 0 peaks at {} with the final model)\n",
                       m.pp, m.tp, m.stages.micro_batches, format_bytes(m.stages.max_rank_send_bytes), wire,
                       format_seconds(m.step_s), m.speedup, memory, format_bytes(m.peak_bytes[0]));
    out += fmt::format("  pp={},tp={} --sequence-parallel: point to point {}; tp {} on the wire by stage; step {} "
                       "({:.2f}x); memory by stage {}\n",
                       m.pp, m.tp, format_bytes(m.sequence.max_rank_send_bytes), sp_wire,
                       format_seconds(m.sequence.step_s), m.sequence.speedup, sp_memory);
  }

  const Recommendation& rec = p.recommendation;
  out += "\nflowchart\n";
  for (const std::string& q : rec.walk) out += "  " + q + "\n";
  out += fmt::format("\nrecommendation: {}{}\n", advice_name(rec.advice),
                     rec.strategy.empty() ? "" : fmt::format(" ({}, {} ranks)", rec.strategy, rec.ranks));
  out += "  why: " + rec.reason + "\n";
  if (!rec.command.empty()) out += "  run: " + rec.command + "\n";
  if (rec.planned)
    out += fmt::format("  note: {} is planned, not in this build of flotilla train; its flag may differ when it lands\n",
                       rec.strategy);
  return out;
}

nlohmann::json plan_json(const PlanResult& p) {
  const PlanRequest& r = p.request;
  const Workload& w = r.workload;
  const Cluster& c = r.cluster;
  auto link_json = [](const Link& l) {
    return nlohmann::json{{"bandwidth_bytes_per_s", l.bandwidth_bytes_per_s}, {"latency_s", l.latency_s}, {"source", l.source}};
  };
  nlohmann::json j;
  j["workload"] = {{"params", w.model.num_params()},      {"model_floats", w.model_floats},
                   {"trainable_floats", w.trainable_floats}, {"lora", w.lora},
                   {"batch_size", w.batch_size},          {"seq_len", w.seq_len},
                   {"grad_accum", w.grad_accum},          {"activation_bytes", w.activation_bytes},
                   {"grad_checkpoint", w.grad_checkpoint},
                   {"dtype", model::matmul_dtype_name(w.dtype)},
                   {"bf16_copy_bytes", w.bf16_copy_bytes()}};
  j["cluster"] = {{"hosts", c.hosts},   {"slots", c.slots},  {"cores", c.cores}, {"one_machine", c.one_machine},
                  {"memory_bytes", c.memory_bytes}, {"memory_source", c.memory_source}, {"network", link_json(c.network)}, {"local", link_json(c.local)}};
  j["one_rank"] = {{"data_s", r.cost.data_s},       {"compute_s", r.cost.compute_s}, {"update_s", r.cost.update_s},
                   {"step_s", r.cost.total_s()},    {"threads", r.cost.threads},     {"source", r.cost.source},
                   {"peak_rss_bytes", r.cost.peak_rss_bytes}, {"serial_fraction", p.serial_fraction},
                   {"work_samples_s", r.cost.work_samples_s}, {"contention", r.cost.contention},
                   {"contention_ranks", r.cost.contention_ranks},
                   {"steps_per_epoch", p.steps_per_epoch_one}, {"epoch_s", p.epoch_s_one}, {"run_s", p.run_s_one}};
  j["runs"] = r.runs;
  j["epochs"] = r.epochs;
  j["ranks"] = p.ranks;
  nlohmann::json strategies = nlohmann::json::array();
  for (const StrategyRow& row : p.rows) {
    nlohmann::json per_n = nlohmann::json::array();
    for (size_t i = 0; i < p.ranks.size(); ++i) {
      const Prediction& pr = row.weak[i];
      const MemoryCost& m = row.memory[i];
      per_n.push_back({{"ranks", pr.ranks},       {"compute_s", pr.compute_s}, {"wait_s", pr.wait_s},
                       {"serial_s", pr.serial_s},
                       {"comm_s", pr.comm_s},     {"step_s", pr.step_s},       {"speedup", pr.speedup},
                       {"efficiency", pr.efficiency},
                       {"memory", {{"weights", m.weights}, {"grads", m.grads}, {"optimizer", m.optimizer},
                                   {"activations", m.activations}, {"buffers", m.buffers},
                                   {"grads_in_backward", m.grads_in_backward}, {"steady", m.steady()},
                                   {"peak", m.peak()}}},
                       {"fits", row.fits_at(i, r)}});
    }
    strategies.push_back({{"name", row.strategy.name},
                          {"kind", strategy_kind_name(row.strategy.kind)},
                          {"available", row.strategy.available},
                          {"train_flags", row.strategy.train_flags},
                          {"payload_bytes", row.comm.payload_bytes},
                          {"wire_bytes_per_step", row.comm.wire_bytes},
                          {"comm_s", row.comm.seconds},
                          {"predictions", per_n}});
  }
  j["strategies"] = strategies;
  nlohmann::json strong = nlohmann::json::array();
  for (const Prediction& pr : p.strong)
    strong.push_back({{"ranks", pr.ranks}, {"step_s", pr.step_s}, {"speedup", pr.speedup}, {"efficiency", pr.efficiency}});
  j["strong_scaling"] = strong;
  nlohmann::json pipelines = nlohmann::json::array();
  for (const PipelinePlan& pp : p.pipelines) pipelines.push_back(pipeline_json(pp));
  j["pipelines"] = pipelines;
  nlohmann::json experts = nlohmann::json::array();
  for (const ExpertPlan& ep : p.experts) experts.push_back(expert_json(ep));
  j["expert_parallel"] = experts;
  nlohmann::json tensors = nlohmann::json::array();
  for (const TensorPlan& t : p.tensors) tensors.push_back(tensor_json(t));
  j["tensor_parallel"] = tensors;
  nlohmann::json meshes = nlohmann::json::array();
  for (const MeshPlan& m : p.meshes) meshes.push_back(mesh_json(m));
  j["pipeline_tensor_parallel"] = meshes;
  const Recommendation& rec = p.recommendation;
  j["recommendation"] = {{"advice", advice_name(rec.advice)}, {"strategy", rec.strategy}, {"ranks", rec.ranks},
                         {"planned", rec.planned},            {"reason", rec.reason},     {"command", rec.command},
                         {"flowchart", rec.walk}};
  return j;
}

std::string speedup_chart_svg(const PlanResult& p) {
  static constexpr const char* kColors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                            "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  train::LineChart chart;
  chart.title = "Predicted speed-up (weak scaling) against ranks";
  chart.x_label = "ranks";
  chart.y_from_zero = true;
  chart.legend_left = true;  // speed-ups rise to the right
  train::ChartSeries ideal{"ideal (n)", "#bbbbbb", {}, false, 1.0, true};
  for (const int n : p.ranks) ideal.points.emplace_back(n, n);
  chart.series.push_back(ideal);
  size_t color = 0;
  for (const StrategyRow& row : p.rows) {
    // ZeRO-1/2 move the bytes of an all-reduce: their lines would hide plain all-reduce's.
    if (row.strategy.kind == StrategyKind::zero1 || row.strategy.kind == StrategyKind::zero2) continue;
    train::ChartSeries s{row.strategy.name + (row.strategy.available ? "" : " (planned)"),
                         kColors[color++ % std::size(kColors)], {}, true, 1.5, !row.strategy.available};
    for (const Prediction& pr : row.weak) s.points.emplace_back(pr.ranks, pr.speedup);
    chart.series.push_back(std::move(s));
  }
  return train::line_chart_svg(chart, 760, 460);
}

void write_plan(const std::filesystem::path& dir, const PlanResult& plan) {
  std::filesystem::create_directories(dir);
  write_file_atomic(dir / "plan.json", plan_json(plan).dump(2) + "\n");
  write_file_atomic(dir / "speedup.svg", speedup_chart_svg(plan));
  write_file_atomic(dir / "plan.txt", render_text(plan));
}

}  // namespace flotilla::plan
