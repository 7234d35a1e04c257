// The run report (JSON + SVG loss chart) and flotilla eval's job.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "flotilla/base/error.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/text/byte_tokenizer.hpp"
#include "flotilla/train/eval_job.hpp"
#include "flotilla/train/report.hpp"

namespace flotilla::train {
namespace {

std::filesystem::path temp_dir(const char* tag) {
  std::random_device rd;
  auto dir = std::filesystem::temp_directory_path() / (std::string("flotilla_") + tag + "_" + std::to_string(rd()));
  std::filesystem::create_directories(dir);
  return dir;
}

TEST(Report, ChartDrawsBothCurvesInsideThePlot) {
  LossCurves curves;
  for (int s = 1; s <= 50; ++s) curves.train.emplace_back(s, 6.0 - 0.05 * s);
  curves.valid = {{25, 4.9}, {50, 3.7}};
  const std::string svg = loss_chart_svg(curves, 720, 400);
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  // One polyline per curve; the training one has a point per step.
  const size_t first = svg.find("<polyline"), second = svg.find("<polyline", first + 1);
  ASSERT_NE(first, std::string::npos);
  ASSERT_NE(second, std::string::npos);
  const std::string points = svg.substr(svg.find("points=\"", first) + 8);
  EXPECT_EQ(std::count(points.begin(), points.begin() + static_cast<std::ptrdiff_t>(points.find('"')), ','), 50);
  // Every coordinate lies in the plot area (64..704 x 32..352).
  std::istringstream in(points.substr(0, points.find('"')));
  std::string pt;
  while (in >> pt) {
    const double x = std::stod(pt.substr(0, pt.find(','))), y = std::stod(pt.substr(pt.find(',') + 1));
    EXPECT_GE(x, 63.9);
    EXPECT_LE(x, 704.1);
    EXPECT_GE(y, 31.9);
    EXPECT_LE(y, 352.1);
  }
}

TEST(Report, WritesJsonAndSvg) {
  const auto dir = temp_dir("report");
  write_run_report(dir, {{"steps", 2}}, LossCurves{{{1, 2.0}, {2, 1.5}}, {{2, 1.7}}});
  EXPECT_TRUE(std::filesystem::is_regular_file(dir / "loss.svg"));
  std::ifstream in(dir / "report.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j["steps"], 2);
  EXPECT_EQ(j["train_loss"].size(), 2u);
  EXPECT_DOUBLE_EQ(j["valid_loss"][0][1].get<double>(), 1.7);
  std::filesystem::remove_all(dir);
}

TEST(EvalJob, ScoresTheWholeTextAndGivesPerplexity) {
  const auto dir = temp_dir("eval");
  model::Llama model(model::preset_config("tiny"));
  model.init_random(4);
  model.save(dir / "model");
  text::ByteTokenizer().save(dir / "model");
  {
    std::ofstream text(dir / "text.txt");
    for (int i = 0; i < 40; ++i) text << "The captain sails the sea, and the crew sings.\n\n";
  }
  EvalJob job;
  job.model_dir = dir / "model";
  job.data = dir / "text.txt";
  job.batch_size = 2;
  job.seq_len = 32;
  const EvalResult r = run_eval_job(job);
  EXPECT_GT(r.tokens, 0);
  EXPECT_NEAR(r.perplexity, std::exp(r.loss), 1e-9 * r.perplexity);
  // A random tiny model is near uniform over its 512 ids.
  EXPECT_NEAR(r.loss, std::log(512.0), 0.5);
  job.split = "valid";
  job.data = dir / "missing";
  EXPECT_THROW(run_eval_job(job), InputError);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace flotilla::train
