// Training progress on stdout: a bar redrawn in place on a terminal, plain lines otherwise.
#pragma once

#include <cstdint>

#include "flotilla/train/trainer.hpp"

namespace flotilla::cli {

class ProgressPrinter {
 public:
  explicit ProgressPrinter(int64_t log_every);
  // Ends an open bar's line, so an error printed while unwinding starts a line of its own.
  ~ProgressPrinter() { finish(); }
  ProgressPrinter(const ProgressPrinter&) = delete;
  ProgressPrinter& operator=(const ProgressPrinter&) = delete;
  void step(const train::StepMetrics& m);
  void eval(const train::EvalMetrics& e);
  void finish();

 private:
  bool tty_;
  int64_t log_every_;
  bool bar_open_ = false;
};

}  // namespace flotilla::cli
