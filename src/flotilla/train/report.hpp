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

// One line of a chart: (x, y) points, drawn in `color`, with a dot at each point if `markers`.
struct ChartSeries {
  std::string name;  // the legend's label
  std::string color;  // an SVG colour, "#1f77b4"
  std::vector<std::pair<double, double>> points;
  bool markers = false;
  double stroke_width = 1.5;
  bool dashed = false;
};

struct LineChart {
  std::string title;
  std::string x_label;
  std::string y_label;              // written up the left edge; "" for none
  std::vector<ChartSeries> series;  // every one gets a legend entry
  bool y_from_zero = false;         // else the y axis spans the data
  bool legend_left = false;         // top-left corner (rising curves); else top-right
};

// A self-contained SVG line chart (axes, ticks, legend), width x height pixels; the plot
// area is (64 .. width-16) x (32 .. height-48). The x axis runs from 0.
std::string line_chart_svg(const LineChart& chart, int width = 720, int height = 400);

// The loss chart: training (blue) and validation (red, dotted with markers) against the step,
// titled "Loss: <run name>" when a name is given; axes labelled "step" and "loss".
std::string loss_chart_svg(const LossCurves& curves, int width = 720, int height = 400,
                           const std::string& run_name = "");

// Writes dir/report.json (`summary` plus the curves, steps as integers) and dir/loss.svg
// (named after the folder), atomically.
void write_run_report(const std::filesystem::path& dir, const nlohmann::json& summary, const LossCurves& curves);

}  // namespace flotilla::train
