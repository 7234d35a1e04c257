// The run report a person opens after training: the numbers as JSON and the loss curves
// (training and validation against the step) as a self-contained SVG chart.
#pragma once

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace flotilla::train {

struct LossCurves {
  std::vector<std::pair<double, double>> train;  // (step, loss)
  std::vector<std::pair<double, double>> valid;  // (step, loss)
};

// An SVG line chart of the curves (axes, ticks, legend), width x height pixels.
std::string loss_chart_svg(const LossCurves& curves, int width = 720, int height = 400);

// Writes dir/report.json (`summary` plus the curves) and dir/loss.svg, atomically.
void write_run_report(const std::filesystem::path& dir, const nlohmann::json& summary, const LossCurves& curves);

}  // namespace flotilla::train
