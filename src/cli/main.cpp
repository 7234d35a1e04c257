// flotilla: fine-tune and train Llama-family models on one machine or many.
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <unistd.h>

#include <CLI/CLI.hpp>

#include "cli/commands.hpp"
#include "cli/yaml_config.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/log.hpp"
#include "flotilla/base/threads.hpp"
#include "flotilla/comm/mpi/mpi_runtime.hpp"
#include "flotilla/comm/world.hpp"

namespace {

// MPI_Init waits for every rank of the job, with no deadline of its own: a rank stopped or
// lost before it gets there would hold all the others for ever. Start-up gets the deadline
// the collectives get, `--timeout` (train, bench), read from the command line before MPI
// starts (a -c config file is parsed later; then the default applies), else 300 s.
double startup_timeout_s(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const char* value = nullptr;
    if (arg == "--timeout" && i + 1 < argc) value = argv[i + 1];
    else if (arg.starts_with("--timeout=")) value = argv[i] + std::string_view("--timeout=").size();
    if (!value) continue;
    char* end = nullptr;
    const double s = std::strtod(value, &end);
    if (end != value && *end == '\0' && std::isfinite(s) && s > 0.0) return s;
  }
  return 300.0;
}

// Ends the process with one line when MPI start-up has not finished within the deadline.
// main's own code, not the library's: nothing else can interrupt MPI_Init.
class StartupWatchdog {
 public:
  explicit StartupWatchdog(double timeout_s)
      : thread_([this, timeout_s] {
          std::unique_lock lock(mutex_);
          if (done_cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [this] { return done_; })) return;
          std::fprintf(stderr,
                       "flotilla: error: [comm/mpi] MPI start-up did not finish within %g s: a rank of the job is "
                       "stopped, slow to start or unreachable (--timeout sets the limit)\n",
                       timeout_s);
          std::fflush(stderr);
          ::_exit(1);
        }) {}
  ~StartupWatchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    done_cv_.notify_one();
    thread_.join();
  }
  StartupWatchdog(const StartupWatchdog&) = delete;
  StartupWatchdog& operator=(const StartupWatchdog&) = delete;

 private:
  std::mutex mutex_;
  std::condition_variable done_cv_;
  bool done_ = false;
  std::thread thread_;  // last: starts once the members above exist
};

std::unique_ptr<flotilla::comm::MpiRuntime> start_mpi_with_deadline(int* argc, char*** argv) {
  if (!flotilla::comm::launched_under_mpi()) return nullptr;
  StartupWatchdog watchdog(startup_timeout_s(*argc, *argv));
  return flotilla::comm::MpiRuntime::start_if_launched(argc, argv);
}

}  // namespace

namespace {

// --help without CLI11's notation for a negatable flag's value ("--pack,--no-pack{false}"):
// the names alone, then the default as for any other flag ("--pack,--no-pack=true").
class PlainFlagFormatter : public CLI::Formatter {
 public:
  std::string make_option_name(const CLI::Option* opt, bool is_positional) const override {
    std::string name = CLI::Formatter::make_option_name(opt, is_positional);
    for (size_t open = name.find('{'); open != std::string::npos; open = name.find('{', open)) {
      const size_t close = name.find('}', open);
      if (close == std::string::npos) break;
      name.erase(open, close - open + 1);
    }
    return name;
  }
};

}  // namespace

namespace {

// The deepest subcommand the command line chose (flotilla data prepare -> "prepare").
const CLI::App* chosen_command(const CLI::App& app) {
  for (const CLI::App* sub : app.get_subcommands())
    if (sub->parsed()) return chosen_command(*sub);
  return &app;
}

// The first argument left over by parsing that looks like a flag ("--iter" of --iter=5).
std::string first_unknown_flag(const CLI::App& app) {
  for (const std::string& arg : app.remaining(true))
    if (arg.starts_with("-") && arg.size() > 1 && !std::isdigit(static_cast<unsigned char>(arg[1])))
      return arg.substr(0, arg.find('='));
  return {};
}

// " (did you mean --iters?)" for an unknown flag close to one the command knows, else "".
std::string nearest_flag_hint(const CLI::App& app) {
  const std::string unknown = first_unknown_flag(app);
  if (unknown.empty()) return {};
  std::string best;
  size_t best_distance = std::string::npos;
  for (const CLI::App* cmd = chosen_command(app); cmd; cmd = cmd->get_parent())
    for (const CLI::Option* op : cmd->get_options()) {
      std::vector<std::string> names;
      for (const std::string& n : op->get_lnames()) names.push_back("--" + n);
      for (const std::string& n : op->get_snames()) names.push_back("-" + n);
      for (const std::string& n : names)
        if (const size_t d = flotilla::cli::edit_distance(unknown, n); d < best_distance) best_distance = d, best = n;
    }
  // Close means a typo or a near spelling (--iter, --learning_rate), not any flag at all.
  if (best.empty() || best_distance > std::max<size_t>(2, unknown.size() / 3)) return {};
  return " (did you mean " + best + "?)";
}

}  // namespace

namespace {

// The error as the user reads it: the library's "[component] " prefix (which says where in
// flotilla it arose, for a developer) is left out of the line the user sees.
const char* user_message(const std::exception& e) {
  const char* what = e.what();
  if (what[0] != '[') return what;
  const char* end = std::strstr(what, "] ");
  return end != nullptr ? end + 2 : what;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"flotilla: train and fine-tune Llama-family language models on one machine or many"};
  app.formatter(std::make_shared<PlainFlagFormatter>());  // subcommands inherit it
  app.require_subcommand(1);
  app.fallthrough();  // global flags may follow the subcommand: flotilla train --threads 2
  app.set_version_flag("--version", std::string("flotilla ") + flotilla::cli::kFlotillaVersion);
  int threads = 0;
  bool verbose = false;
  app.add_option("--threads", threads, "OpenMP threads, oneDNN's matrix products included (default: OMP_NUM_THREADS or all cores)");
  app.add_flag("-v,--verbose", verbose, "Debug logging");
  app.parse_complete_callback([&] {
    flotilla::set_num_threads(threads);
    if (verbose) flotilla::log::set_level(flotilla::log::Level::debug);
  });
  flotilla::cli::add_init_command(app);
  flotilla::cli::add_train_command(app);
  flotilla::cli::add_generate_command(app);
  flotilla::cli::add_chat_command(app);
  flotilla::cli::add_score_command(app);
  flotilla::cli::add_grads_command(app);
  flotilla::cli::add_fuse_command(app);
  flotilla::cli::add_eval_command(app);
  flotilla::cli::add_doctor_command(app);
  flotilla::cli::add_data_command(app);
  flotilla::cli::add_bench_command(app);
  flotilla::cli::add_plan_command(app);
  flotilla::cli::add_convert_command(app);
  flotilla::cli::add_launch_command(app);
  try {
    // Under mpirun / srun: MPI starts before anything else and finalizes last.
    const auto mpi = start_mpi_with_deadline(&argc, &argv);
    try {
      app.parse(argc, argv);
    } catch (const flotilla::RunStopped& e) {
      // Every rank stops at the same step and MPI finalizes normally. The line goes out
      // before MPI_Finalize: once a rank has exited non-zero, mpirun kills the others.
      std::fflush(stdout);
      if (!e.quiet()) std::fprintf(stderr, "flotilla: error: %s\n", e.what());
      std::fflush(stderr);
      return e.exit_code();
    } catch (const flotilla::Error& e) {
      if (mpi) {
        // One rank failing must end the job, not leave the others waiting: one line, then abort.
        std::fprintf(stderr, "flotilla: error: %s\n", user_message(e));
        flotilla::comm::MpiRuntime::abort(dynamic_cast<const flotilla::InputError*>(&e) ? 2 : 1);
      }
      throw;
    }
  } catch (const CLI::ParseError& e) {
    // --help and --version print and succeed; a bad flag is bad input like any other: one
    // line, exit 2.
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);
    // An unknown flag is the likelier fault behind "--model is required" when --modl was typed.
    if (const std::string hint = nearest_flag_hint(app); !hint.empty()) {
      std::fprintf(stderr, "flotilla: error: unknown flag %s%s (see --help)\n", first_unknown_flag(app).c_str(),
                   hint.c_str());
      return 2;
    }
    std::fprintf(stderr, "flotilla: error: %s (see --help)\n", e.what());
    return 2;
  } catch (const flotilla::InputError& e) {
    std::fprintf(stderr, "flotilla: error: %s\n", user_message(e));
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flotilla: error: %s\n", user_message(e));
    return 1;
  }
  return 0;
}
