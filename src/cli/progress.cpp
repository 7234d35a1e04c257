#include "cli/progress.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace flotilla::cli {

namespace {

// Under a launcher (mpirun, srun, hydra): its rank variables are set.
bool launched_by_mpi() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"})
    if (std::getenv(var) != nullptr) return true;
  return false;
}

// A bar on a terminal, lines otherwise. mpirun gives each rank a pseudo-terminal even when
// its output goes to a file or a pipe, so under a launcher progress is lines too.
// FLOTILLA_PROGRESS=lines|bar overrides both.
bool draw_bar() {
  const char* mode = std::getenv("FLOTILLA_PROGRESS");
  if (mode != nullptr && std::string_view(mode) == "lines") return false;
  if (mode != nullptr && std::string_view(mode) == "bar") return true;
  return !launched_by_mpi() && ::isatty(STDOUT_FILENO) == 1;
}

// Time left at the pace so far, as "eta 1:05" or "eta 1:02:03".
std::string eta(const train::StepMetrics& m) {
  if (m.step <= 0 || m.total_steps <= m.step) return "eta 0:00";
  const auto left_s = static_cast<int64_t>(m.elapsed_s / static_cast<double>(m.step) *
                                           static_cast<double>(m.total_steps - m.step) + 0.5);
  if (left_s >= 3600) return fmt::format("eta {}:{:02}:{:02}", left_s / 3600, left_s / 60 % 60, left_s % 60);
  return fmt::format("eta {}:{:02}", left_s / 60, left_s % 60);
}

}  // namespace

ProgressPrinter::ProgressPrinter(int64_t log_every) : tty_(draw_bar()), log_every_(log_every > 0 ? log_every : 1) {}

void ProgressPrinter::step(const train::StepMetrics& m) {
  const std::string stats =
      fmt::format("step {:>5}/{:<5} loss {:.4f}  lr {:.2e}  |g| {:.3f}  {:>7.0f} tok/s  {:>7.1f}s  {}", m.step,
                  m.total_steps, m.loss, m.lr, m.grad_norm, m.tokens_per_s, m.elapsed_s, eta(m)) +
      (m.router_aux_loss ? fmt::format("  aux {:.4f}", *m.router_aux_loss) : std::string()) +
      (m.expert_dropped && *m.expert_dropped > 0.0 ? fmt::format("  dropped {:.1f}%", 100.0 * *m.expert_dropped)
                                                   : std::string());
  if (tty_) {
    constexpr int kWidth = 24;
    const int filled = m.total_steps > 0 ? static_cast<int>(kWidth * m.step / m.total_steps) : kWidth;
    fmt::print("\r[{}{}] {}", std::string(static_cast<size_t>(filled), '#'),
               std::string(static_cast<size_t>(kWidth - filled), '.'), stats);
    bar_open_ = true;
    if (m.step % log_every_ == 0 || m.step == m.total_steps) {
      fmt::print("\n");
      bar_open_ = false;
    }
  } else if (m.step % log_every_ == 0 || m.step == 1 || m.step == m.total_steps) {
    fmt::print("{}\n", stats);
  }
  std::fflush(stdout);
}

void ProgressPrinter::eval(const train::EvalMetrics& e) {
  if (bar_open_) fmt::print("\n");
  bar_open_ = false;
  fmt::print("step {:>5} validation loss {:.4f} ({} tokens)\n", e.step, e.loss, e.tokens);
  std::fflush(stdout);
}

void ProgressPrinter::finish() {
  if (bar_open_) fmt::print("\n");
  bar_open_ = false;
  std::fflush(stdout);
}

}  // namespace flotilla::cli
