// The training step as a specification: gradient accumulation gives the gradient of the
// window's mean token loss whatever the split into micro-batches, clipping scales by the
// reported pre-clip norm, and a seed makes a run repeatable bit for bit.
#include "flotilla/train/trainer.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/data/text_dataset.hpp"
#include "flotilla/model/llama.hpp"
#include "../test_seed.hpp"
#include "small_model.hpp"

namespace flotilla::train {
namespace {

using test_models::small_config;

using model::kIgnoreIndex;

using ::flotilla::testing::test_seed;

constexpr int kT = 12;

// Fixed rows handed out in order, B at a time, so that two trainers with different
// micro-batch shapes see exactly the same sequences.
class ReplaySource final : public data::BatchSource {
 public:
  struct Row {
    std::vector<int32_t> tokens, targets;  // (T) each
  };
  explicit ReplaySource(std::vector<Row> rows) : rows_(std::move(rows)) {}
  using data::BatchSource::next_batch;
  void next_batch(int32_t* tokens, int32_t* targets, int B, int T) override {
    for (int b = 0; b < B; ++b) {
      const Row& r = rows_[next_++ % rows_.size()];
      ASSERT_EQ(static_cast<int>(r.tokens.size()), T);
      std::memcpy(tokens + b * T, r.tokens.data(), sizeof(int32_t) * static_cast<size_t>(T));
      std::memcpy(targets + b * T, r.targets.data(), sizeof(int32_t) * static_cast<size_t>(T));
    }
  }
  nlohmann::json state() const override { return {{"kind", "replay"}, {"next", next_}}; }
  void set_state(const nlohmann::json& s) override { next_ = s.at("next").get<size_t>(); }

 private:
  std::vector<Row> rows_;
  size_t next_ = 0;
};

// O(1) parameters, so that gradients are far from float noise.
model::Llama random_model(Rng& rng) {
  model::Llama m(small_config());
  rng.fill_uniform(m.params(), -0.3f, 0.3f);
  return m;
}

model::Llama copy_of(const model::Llama& m) {
  model::Llama c(m.config());
  std::copy(m.params().begin(), m.params().end(), c.params().begin());
  return c;
}

std::vector<ReplaySource::Row> random_rows(Rng& rng, int n, int64_t vocab) {
  std::vector<ReplaySource::Row> rows(static_cast<size_t>(n));
  for (auto& r : rows) {
    r.tokens.resize(kT);
    r.targets.resize(kT);
    for (auto& t : r.tokens) t = static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab)));
    for (auto& t : r.targets) t = static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab)));
  }
  return rows;
}

// Gradient of the mean token loss over `rows`, as one batch on a copy of `m`.
std::vector<float> mean_loss_gradient(const model::Llama& m, const std::vector<ReplaySource::Row>& rows) {
  model::Llama c = copy_of(m);
  const int B = static_cast<int>(rows.size());
  std::vector<int32_t> tokens, targets;
  for (const auto& r : rows) {
    tokens.insert(tokens.end(), r.tokens.begin(), r.tokens.end());
    targets.insert(targets.end(), r.targets.begin(), r.targets.end());
  }
  c.zero_grads();
  const model::LossSum loss = c.forward(tokens.data(), targets.data(), B, kT);
  c.backward(1.0f / static_cast<float>(loss.num_tokens));
  return {c.grads().begin(), c.grads().end()};
}

double norm(std::span<const float> v) {
  double s = 0.0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

// A single step at lr = 1 with no decay, no clipping and eps comparable to the gradients.
// Adam's first step is lr * g / (|g| + eps): with the default eps = 1e-8 it is lr * sign(g)
// and hides the gradient's size, so a wrong weighting of micro-batches would change
// almost nothing. With eps near the gradients' RMS the update is a smooth, strictly
// monotone function of g, and the parameters show the gradient itself.
TrainConfig probe_config(int64_t batch_size, int64_t grad_accum, float eps, float grad_clip = 0.0f) {
  TrainConfig cfg;
  cfg.batch_size = batch_size;
  cfg.seq_len = kT;
  cfg.grad_accum = grad_accum;
  cfg.steps = 1;
  cfg.lr = 1.0f;
  cfg.min_lr = 0.0f;
  cfg.warmup_steps = 0;  // lr_at(0) = peak
  cfg.grad_clip = grad_clip;
  cfg.adamw.weight_decay = 0.0f;
  cfg.adamw.eps = eps;
  return cfg;
}

float rms(const std::vector<float>& g) { return static_cast<float>(norm(g) / std::sqrt(static_cast<double>(g.size()))); }

// The parameters after one probe step from `start`, fed `rows`.
std::vector<float> params_after_one_step(const model::Llama& start, const std::vector<ReplaySource::Row>& rows,
                                         const TrainConfig& cfg, StepMetrics* metrics = nullptr) {
  model::Llama m = copy_of(start);
  ReplaySource source(rows);
  Trainer trainer(m, cfg);
  const StepMetrics s = trainer.step(source);
  if (metrics) *metrics = s;
  return {m.params().begin(), m.params().end()};
}

// AdamW's first step at lr = 1, no decay: p - g / (|g| + eps), in double.
std::vector<double> expected_first_step(const model::Llama& start, const std::vector<float>& g, float eps) {
  std::vector<double> p(g.size());
  for (size_t i = 0; i < g.size(); ++i)
    p[i] = start.params()[i] - static_cast<double>(g[i]) / (std::fabs(static_cast<double>(g[i])) + eps);
  return p;
}

// The update is at most 1 per element (lr = 1); float rounding of the gradient
// (~1e-6 relative: sums over B*T rows in a different order) and of p moves it by ~1e-6.
// 1e-5 is ten times that. A mis-weighted gradient differs by tens of percent (checked
// where it matters), which moves updates by ~0.1.
constexpr double kUpdateTol = 1e-5;

void expect_params_near(std::span<const float> got, std::span<const float> want, const model::ParamLayout& layout) {
  for (const model::ParamInfo& info : layout.params())
    for (int64_t j = 0; j < info.numel; ++j) {
      const size_t i = static_cast<size_t>(info.offset + j);
      ASSERT_NEAR(got[i], want[i], kUpdateTol) << info.name << "[" << j << "]";
    }
}

void expect_params_near(std::span<const float> got, const std::vector<double>& want, const model::ParamLayout& layout) {
  for (const model::ParamInfo& info : layout.params())
    for (int64_t j = 0; j < info.numel; ++j) {
      const size_t i = static_cast<size_t>(info.offset + j);
      ASSERT_NEAR(got[i], want[i], kUpdateTol) << info.name << "[" << j << "]";
    }
}

TEST(Trainer, AccumulatingTwoMicroBatchesOfTwoEqualsOneBatchOfFour) {
  Rng rng(test_seed());
  const model::Llama start = random_model(rng);
  const auto rows = random_rows(rng, 4, start.config().vocab_size);
  const float eps = rms(mean_loss_gradient(start, rows));
  // Not bit-exact: the weight gradients of 4 rows are summed in one GEMM in one case and
  // in two GEMMs added together in the other, a different float summation order.
  const auto one_batch = params_after_one_step(start, rows, probe_config(4, 1, eps));
  const auto accumulated = params_after_one_step(start, rows, probe_config(2, 2, eps));
  expect_params_near(accumulated, one_batch, start.layout());
  // And the step did move the parameters (else the comparison proves nothing).
  double moved = 0.0;
  for (size_t i = 0; i < one_batch.size(); ++i) moved = std::max(moved, std::fabs(double(one_batch[i]) - start.params()[i]));
  EXPECT_GT(moved, 0.1);
}

TEST(Trainer, AccumulationWeightsEveryTargetTokenEquallyWhenMicroBatchesDiffer) {
  Rng rng(test_seed());
  const model::Llama start = random_model(rng);
  auto rows = random_rows(rng, 4, start.config().vocab_size);
  // The first micro-batch (rows 0, 1) keeps 3 targets of 24, the second all 24: averaging
  // the two micro-batches' mean losses would weight each of those 3 tokens 8x too much.
  for (int r = 0; r < 2; ++r)
    for (int t = 0; t < kT; ++t)
      if (!(r == 0 && (t == 2 || t == 7)) && !(r == 1 && t == 11)) rows[static_cast<size_t>(r)].targets[static_cast<size_t>(t)] = kIgnoreIndex;

  const std::vector<float> g = mean_loss_gradient(start, rows);
  const float eps = rms(g);

  // The wrong answer this test must tell apart: the mean of the micro-batch means.
  const std::vector<ReplaySource::Row> first(rows.begin(), rows.begin() + 2), second(rows.begin() + 2, rows.end());
  const std::vector<float> g1 = mean_loss_gradient(start, first), g2 = mean_loss_gradient(start, second);
  std::vector<float> mean_of_means(g.size());
  for (size_t i = 0; i < g.size(); ++i) mean_of_means[i] = 0.5f * (g1[i] + g2[i]);
  std::vector<float> diff(g.size());
  for (size_t i = 0; i < g.size(); ++i) diff[i] = g[i] - mean_of_means[i];
  ASSERT_GT(norm(diff), 0.2 * norm(g)) << "the two weightings are too alike to tell apart";

  const auto accumulated = params_after_one_step(start, rows, probe_config(2, 2, eps));
  expect_params_near(accumulated, expected_first_step(start, g, eps), start.layout());
  const auto one_batch = params_after_one_step(start, rows, probe_config(4, 1, eps));
  expect_params_near(accumulated, one_batch, start.layout());
}

TEST(Trainer, ReportedGradNormIsTheNormOfTheMeanLossGradient) {
  Rng rng(test_seed());
  const model::Llama start = random_model(rng);
  const auto rows = random_rows(rng, 4, start.config().vocab_size);
  const double expected = norm(mean_loss_gradient(start, rows));
  StepMetrics metrics;
  params_after_one_step(start, rows, probe_config(2, 2, 1e-8f, /*grad_clip=*/1e-3f), &metrics);
  // Reported before clipping (the clip is far below the norm). The norm is summed in double
  // from float gradients that differ by ~1e-6 relative between the two summation orders.
  EXPECT_NEAR(metrics.grad_norm, expected, 1e-5 * expected);
  EXPECT_GT(expected, 1e-2);
  // The loss is the window's mean token loss: ~ln(48) = 3.9 for a near-uniform guess,
  // larger for these O(1) random weights; certainly positive and finite.
  EXPECT_TRUE(std::isfinite(metrics.loss));
  EXPECT_GT(metrics.loss, 0.0);
  EXPECT_EQ(metrics.tokens, 2 * kT * 2);
  EXPECT_EQ(metrics.step, 1);
}

TEST(Trainer, ClippingScalesTheGradientToTheClipNorm) {
  Rng rng(test_seed());
  const model::Llama start = random_model(rng);
  const auto rows = random_rows(rng, 4, start.config().vocab_size);
  const std::vector<float> g = mean_loss_gradient(start, rows);
  const double g_norm = norm(g);
  const float clip = static_cast<float>(0.25 * g_norm);
  std::vector<float> clipped(g.size());
  for (size_t i = 0; i < g.size(); ++i) clipped[i] = static_cast<float>(g[i] * (clip / g_norm));
  // eps at the clipped gradient's scale, so the update shows that scale (see probe_config).
  const float eps = rms(clipped);

  StepMetrics metrics;
  const auto got = params_after_one_step(start, rows, probe_config(4, 1, eps, clip), &metrics);
  EXPECT_NEAR(metrics.grad_norm, g_norm, 1e-5 * g_norm);  // the norm before clipping
  expect_params_near(got, expected_first_step(start, clipped, eps), start.layout());
  // Without clipping the same step lands elsewhere, so the check above has teeth.
  const auto unclipped = expected_first_step(start, g, eps);
  double apart = 0.0;
  for (size_t i = 0; i < got.size(); ++i) apart = std::max(apart, std::fabs(got[i] - unclipped[i]));
  EXPECT_GT(apart, 100 * kUpdateTol);
}

// A global batch without one target token (every example's targets past the row) has no
// gradient: it is skipped and counted, and the step is taken on the next batch, as if the
// empty one had never been drawn. (Stepping on it would spend a step of the schedule on
// a zero gradient and report a loss of 0.)
TEST(Trainer, BatchWithoutTargetsIsSkippedNotSteppedOn) {
  const uint64_t seed = test_seed();
  Rng rng(seed);
  const model::Llama start = random_model(rng);
  std::vector<ReplaySource::Row> rows = random_rows(rng, 2, small_config().vocab_size);
  std::fill(rows[0].targets.begin(), rows[0].targets.end(), kIgnoreIndex);  // nothing to learn
  const TrainConfig cfg = probe_config(1, 1, 1e-3f);
  StepMetrics m;
  const std::vector<float> got = params_after_one_step(start, rows, cfg, &m);
  const std::vector<float> want = params_after_one_step(start, {rows[1]}, cfg);
  EXPECT_EQ(m.skipped_batches, 1);
  EXPECT_EQ(m.step, 1);
  EXPECT_GT(m.loss, 0.0);
  expect_params_near(got, want, start.layout());
}

// A source with no target at all fails with a message, never loops forever.
TEST(Trainer, OnlyBatchesWithoutTargetsIsAnInputErrorNotAHang) {
  Rng rng(test_seed());
  model::Llama m = random_model(rng);
  std::vector<ReplaySource::Row> rows = random_rows(rng, 1, small_config().vocab_size);
  std::fill(rows[0].targets.begin(), rows[0].targets.end(), kIgnoreIndex);
  ReplaySource source(rows);
  Trainer trainer(m, probe_config(1, 1, 1e-3f));
  try {
    trainer.step(source);
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("no target token"), std::string::npos) << e.what();
  }
  EXPECT_EQ(trainer.steps_done(), 0);
}

TEST(Trainer, SameSeedGivesBitIdenticalParameters) {
  const uint64_t seed = test_seed();
  Rng rng(seed);
  std::vector<int32_t> stream(3000);
  for (auto& t : stream) t = static_cast<int32_t>(rng.below(small_config().vocab_size));
  auto run = [&](std::vector<double>* losses) {
    model::Llama m(small_config());
    m.init_random(seed);
    data::RandomWindowSource source(stream, seed);
    TrainConfig cfg;
    cfg.batch_size = 3;
    cfg.seq_len = 16;
    cfg.grad_accum = 2;
    cfg.steps = 4;
    cfg.lr = 1e-2f;
    cfg.warmup_steps = 1;
    Trainer trainer(m, cfg);
    trainer.run(source, nullptr, [&](const StepMetrics& s) { losses->push_back(s.loss); }, {});
    EXPECT_EQ(trainer.steps_done(), 4);
    return std::vector<float>(m.params().begin(), m.params().end());
  };
  std::vector<double> losses_a, losses_b;
  const auto a = run(&losses_a);
  const auto b = run(&losses_b);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "parameters differ";
  EXPECT_EQ(losses_a, losses_b);
  // Training did change the parameters: a run that never stepped would pass the above.
  model::Llama init(small_config());
  init.init_random(seed);
  EXPECT_NE(std::memcmp(a.data(), init.params().data(), a.size() * sizeof(float)), 0);
}


// A model whose loss is NaN: one NaN weight in every tensor reaches every logit.
model::Llama nan_model(Rng& rng) {
  model::Llama m = random_model(rng);
  for (const model::ParamInfo& info : m.trainable().table.params())
    m.params()[static_cast<size_t>(info.offset)] = std::numeric_limits<float>::quiet_NaN();
  return m;
}

// A NaN model from a fresh seed, its parameters before any step, and four rows to replay.
struct NanRun {
  NanRun() : NanRun(Rng(test_seed())) {}
  explicit NanRun(Rng&& rng)
      : model(nan_model(rng)),
        before(model.params().begin(), model.params().end()),
        source(random_rows(rng, 4, model.config().vocab_size)) {}

  model::Llama model;
  const std::vector<float> before;
  ReplaySource source;
};

TEST(Trainer, NonFiniteLossStopsBeforeTheUpdate) {
  NanRun run;
  auto& [m, before, source] = run;
  TrainConfig cfg = probe_config(4, 1, 1e-8f, 0.0f);
  Trainer trainer(m, cfg);
  try {
    trainer.step(source);
    FAIL() << "no NonFiniteStep";
  } catch (const NonFiniteStep& e) {
    EXPECT_EQ(e.metrics().step, 1);
    EXPECT_TRUE(std::isnan(e.metrics().loss));
    EXPECT_NE(std::string(e.what()).find("step 1"), std::string::npos) << e.what();
  }
  EXPECT_EQ(trainer.steps_done(), 0);
  EXPECT_EQ(trainer.optimizer().steps_taken(), 0);
  EXPECT_EQ(std::memcmp(before.data(), m.params().data(), before.size() * sizeof(float)), 0);
  for (const float v : trainer.optimizer().m()) ASSERT_EQ(v, 0.0f) << "a NaN reached the moments";
}

TEST(Trainer, NonFiniteStepIsSkippedWhenAskedAndTheRunGoesOn) {
  NanRun run;
  auto& [m, before, source] = run;
  TrainConfig cfg = probe_config(4, 1, 1e-8f, 0.0f);
  cfg.steps = 3;
  cfg.on_nonfinite = NonFinitePolicy::skip;
  Trainer trainer(m, cfg);
  std::vector<StepMetrics> steps;
  trainer.run(source, nullptr, [&](const StepMetrics& s) { steps.push_back(s); }, {});
  ASSERT_EQ(steps.size(), 3u);
  for (const StepMetrics& s : steps) EXPECT_TRUE(s.skipped);
  EXPECT_EQ(trainer.steps_done(), 3);
  EXPECT_EQ(trainer.optimizer().steps_taken(), 0);
  EXPECT_EQ(std::memcmp(before.data(), m.params().data(), before.size() * sizeof(float)), 0);
}

TEST(Trainer, StopAfterEndsTheRunAfterThatStep) {
  Rng rng(test_seed());
  model::Llama m = random_model(rng);
  ReplaySource source(random_rows(rng, 4, m.config().vocab_size));
  TrainConfig cfg = probe_config(4, 1, 1e-8f, 0.0f);
  cfg.steps = 5;
  Trainer trainer(m, cfg);
  std::vector<int64_t> ended;
  trainer.run(source, nullptr, {}, {}, [&](int64_t step) { ended.push_back(step); },
              [](int64_t step) { return step == 2; });
  EXPECT_EQ(trainer.steps_done(), 2);
  EXPECT_EQ(ended, (std::vector<int64_t>{1, 2}));  // the checkpoint hook ran for the last step
}

TEST(Trainer, ConfigOutsideItsDomainIsRefusedNamingTheFlag) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  struct Bad {
    const char* flag;
    void (*set)(TrainConfig&, float);
    float value;
  };
  const Bad cases[] = {
      {"--lr", [](TrainConfig& c, float v) { c.lr = v; }, nan},
      {"--lr", [](TrainConfig& c, float v) { c.lr = v; }, inf},
      {"--lr", [](TrainConfig& c, float v) { c.lr = v; }, -1e-3f},
      {"--beta1", [](TrainConfig& c, float v) { c.adamw.beta1 = v; }, 1.0f},
      {"--beta2", [](TrainConfig& c, float v) { c.adamw.beta2 = v; }, 1.5f},
      {"--beta2", [](TrainConfig& c, float v) { c.adamw.beta2 = v; }, nan},
      {"--weight-decay", [](TrainConfig& c, float v) { c.adamw.weight_decay = v; }, nan},
      {"--grad-clip", [](TrainConfig& c, float v) { c.grad_clip = v; }, -1.0f},
      {"--warmup", [](TrainConfig& c, float v) { c.warmup_steps = static_cast<int64_t>(v); }, -2.0f},
  };
  for (const Bad& bad : cases) {
    TrainConfig cfg;
    bad.set(cfg, bad.value);
    try {
      validate_train_config(cfg);
      ADD_FAILURE() << bad.flag << " " << bad.value << " accepted";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(bad.flag), std::string::npos) << e.what();
    }
  }
  EXPECT_NO_THROW(validate_train_config(TrainConfig{}));
}

TEST(Trainer, ValidationOfAllBatchesReadsOnePassAndEnds) {
  Rng rng(test_seed());
  model::Llama m = random_model(rng);
  std::vector<int32_t> stream(1 + 10 * kT);  // exactly 10 windows of kT
  for (auto& t : stream) t = static_cast<int32_t>(rng.below(static_cast<uint64_t>(m.config().vocab_size)));
  data::SequentialWindowSource valid(stream);
  TrainConfig cfg;
  cfg.batch_size = 2;
  cfg.seq_len = kT;
  for (const int64_t requested : {0, -1, 1000}) {
    cfg.eval_batches = requested;
    Trainer trainer(m, cfg);
    EXPECT_EQ(trainer.evaluate(valid).tokens, 10 * kT) << "--eval-batches " << requested;  // one pass: 5 batches
  }
  EXPECT_EQ(bounded_eval_batches(valid, 2, kT, 3), 3);
  EXPECT_EQ(bounded_eval_batches(valid, 20, kT, 0), 1);  // fewer windows than one batch
}

}  // namespace
}  // namespace flotilla::train
