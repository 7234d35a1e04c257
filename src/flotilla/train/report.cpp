#include "flotilla/train/report.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "flotilla/base/file.hpp"

namespace flotilla::train {
namespace {

// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `target` ticks.
double tick_step(double span, int target) {
  if (!(span > 0.0)) return 1.0;
  const double raw = span / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (raw <= m * mag) return m * mag;
  return 10.0 * mag;
}

std::string polyline(const std::vector<std::pair<double, double>>& pts, const auto& to_x, const auto& to_y) {
  std::string out;
  for (const auto& [x, y] : pts) out += fmt::format("{:.1f},{:.1f} ", to_x(x), to_y(y));
  return out;
}

}  // namespace

std::string line_chart_svg(const LineChart& chart, int width, int height) {
  const double left = 64, right = 16, top = 32, bottom = 48;
  double x0 = 0, x1 = 1, y0 = 1e300, y1 = -1e300;
  bool any = false;
  for (const ChartSeries& series : chart.series) {
    for (const auto& [x, y] : series.points) {
      if (!std::isfinite(y)) continue;
      x1 = std::max(x1, x);
      y0 = std::min(y0, y);
      y1 = std::max(y1, y);
      any = true;
    }
  }
  if (!any) y0 = 0, y1 = 1;
  if (chart.y_from_zero) y0 = std::min(y0, 0.0);
  if (y1 - y0 < 1e-9) y0 -= 0.5, y1 += 0.5;
  const double ystep = tick_step(y1 - y0, 6), xstep = tick_step(x1 - x0, 8);
  y0 = std::floor(y0 / ystep) * ystep;
  y1 = std::ceil(y1 / ystep) * ystep;
  const double pw = width - left - right, ph = height - top - bottom;
  auto to_x = [&](double x) { return left + (x - x0) / (x1 - x0) * pw; };
  auto to_y = [&](double y) { return top + (1.0 - (y - y0) / (y1 - y0)) * ph; };

  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" "
      "font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      width, height);
  svg += fmt::format("<text x=\"{}\" y=\"20\" font-size=\"14\">{}</text>\n", left, chart.title);
  for (double y = y0; y <= y1 + ystep / 2; y += ystep) {
    svg += fmt::format("<line x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#ddd\"/>\n", left,
                       left + pw, to_y(y), to_y(y));
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{:g}</text>\n", left - 6, to_y(y) + 4, y);
  }
  for (double x = x0; x <= x1 + xstep / 2; x += xstep)
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{:g}</text>\n", to_x(x),
                       top + ph + 18, x);
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", left + pw / 2, height - 8,
                     chart.x_label);
  if (!chart.y_label.empty())
    svg += fmt::format("<text x=\"14\" y=\"{0:.1f}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {0:.1f})\">{1}</text>\n",
                       top + ph / 2, chart.y_label);
  svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"none\" stroke=\"#888\"/>\n",
                     left, top, pw, ph);
  for (const ChartSeries& series : chart.series) {
    if (series.points.empty()) continue;
    svg += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"{:g}\"{} points=\"{}\"/>\n", series.color,
                       series.stroke_width, series.dashed ? " stroke-dasharray=\"6,4\"" : "",
                       polyline(series.points, to_x, to_y));
    if (series.markers)
      for (const auto& [x, y] : series.points)
        svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", to_x(x), to_y(y),
                           series.color);
  }
  const double lx = chart.legend_left ? left + 12 : left + pw - 190;
  for (size_t i = 0; i < chart.series.size(); ++i) {
    const ChartSeries& series = chart.series[i];
    const double ly = top + 16 + 18.0 * static_cast<double>(i);
    svg += fmt::format("<line x1=\"{0:.1f}\" x2=\"{1:.1f}\" y1=\"{2:.1f}\" y2=\"{2:.1f}\" stroke=\"{3}\" stroke-width=\"2\"{4}/>"
                       "<text x=\"{5:.1f}\" y=\"{6:.1f}\">{7}</text>\n",
                       lx, lx + 24, ly, series.color, series.dashed ? " stroke-dasharray=\"6,4\"" : "", lx + 30, ly + 4,
                       series.name);
  }
  svg += "</svg>\n";
  return svg;
}

std::string loss_chart_svg(const LossCurves& curves, int width, int height, const std::string& run_name) {
  LineChart chart;
  chart.title = run_name.empty() ? "Loss" : "Loss: " + run_name;
  chart.x_label = "step";
  chart.y_label = "loss";
  chart.series.push_back({"training", "#1f77b4", curves.train, false, 1.5, false});
  chart.series.push_back({"validation", "#d62728", curves.valid, true, 2.0, false});
  return line_chart_svg(chart, width, height);
}

void write_run_report(const std::filesystem::path& dir, const nlohmann::json& summary, const LossCurves& curves) {
  nlohmann::json report = summary;
  // Steps are counts: written as integers, not 12.0.
  const auto with_integer_steps = [](const std::vector<std::pair<double, double>>& points) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& [step, loss] : points) out.push_back({static_cast<int64_t>(std::llround(step)), loss});
    return out;
  };
  report["train_loss"] = with_integer_steps(curves.train);
  report["valid_loss"] = with_integer_steps(curves.valid);
  write_file_atomic(dir / "report.json", report.dump(2) + "\n");
  const std::string name = std::filesystem::weakly_canonical(dir).filename().string();
  write_file_atomic(dir / "loss.svg", loss_chart_svg(curves, 720, 400, name));
}

}  // namespace flotilla::train
