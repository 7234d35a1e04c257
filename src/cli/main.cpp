// flotilla: fine-tune and train Llama-family models on one machine or many.
#include <cstdio>
#include <exception>

#include <CLI/CLI.hpp>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/log.hpp"
#include "flotilla/base/threads.hpp"
#include "flotilla/comm/mpi/mpi_runtime.hpp"

int main(int argc, char** argv) {
  CLI::App app{"flotilla: train and fine-tune Llama-family language models on one machine or many"};
  app.require_subcommand(1);
  app.fallthrough();  // global flags may follow the subcommand: flotilla train --threads 2
  app.set_version_flag("--version", "flotilla 0.1.0");
  int threads = 0;
  bool verbose = false;
  app.add_option("--threads", threads, "OpenMP and OpenBLAS threads (default: OMP_NUM_THREADS or all cores)");
  app.add_flag("-v,--verbose", verbose, "Debug logging");
  app.parse_complete_callback([&] {
    flotilla::set_num_threads(threads);
    if (verbose) flotilla::log::set_level(flotilla::log::Level::debug);
  });
  flotilla::cli::add_init_command(app);
  flotilla::cli::add_train_command(app);
  flotilla::cli::add_generate_command(app);
  flotilla::cli::add_score_command(app);
  flotilla::cli::add_grads_command(app);
  flotilla::cli::add_fuse_command(app);
  flotilla::cli::add_eval_command(app);
  flotilla::cli::add_doctor_command(app);
  flotilla::cli::add_data_command(app);
  flotilla::cli::add_bench_command(app);
  flotilla::cli::add_plan_command(app);
  flotilla::cli::add_convert_command(app);
  try {
    // Under mpirun / srun: MPI starts before anything else and finalizes last.
    const auto mpi = flotilla::comm::MpiRuntime::start_if_launched(&argc, &argv);
    try {
      app.parse(argc, argv);
    } catch (const flotilla::Error& e) {
      if (mpi) {
        // One rank failing must end the job, not leave the others waiting: one line, then abort.
        std::fprintf(stderr, "flotilla: error: %s\n", e.what());
        flotilla::comm::MpiRuntime::abort(dynamic_cast<const flotilla::InputError*>(&e) ? 2 : 1);
      }
      throw;
    }
  } catch (const CLI::ParseError& e) {
    // --help and --version print and succeed; a bad flag is bad input like any other: one
    // line, exit 2.
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);
    std::fprintf(stderr, "flotilla: error: [cli] %s (see --help)\n", e.what());
    return 2;
  } catch (const flotilla::InputError& e) {
    std::fprintf(stderr, "flotilla: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flotilla: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
