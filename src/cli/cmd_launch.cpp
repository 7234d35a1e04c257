// flotilla launch: the flags of the supervisor in train/launcher.hpp, and the train
// command's flags resolved the way train resolves them.
#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <cctype>
#include <filesystem>
#include <string>
#include <vector>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/subprocess.hpp"
#include "flotilla/train/launcher.hpp"

namespace flotilla::cli {
namespace {

constexpr const char* kCmdLaunchComponent = "launch";

std::vector<std::string> split_words(const std::string& s) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
    const size_t b = i;
    while (i < s.size() && !std::isspace(static_cast<unsigned char>(s[i]))) ++i;
    if (i > b) out.push_back(s.substr(b, i - b));
  }
  return out;
}

// The train command's flags as train resolves them (`train ... --print-config`), -c files
// and defaults included. A command train refuses stops here, with train's own line.
void resolve_train(train::LaunchConfig& config) {
  std::vector<std::string> argv = {config.self};
  argv.insert(argv.end(), config.train_args.begin(), config.train_args.end());
  argv.emplace_back("--print-config");
  std::string yaml;
  const int status = run_capture(argv, 120.0, &yaml, /*silence_stderr=*/false);
  if (status != 0) throw RunStopped(kCmdLaunchComponent, "the train command is not valid", status == 2 ? 2 : 1, /*quiet=*/true);
  try {
    const YAML::Node cfg = YAML::Load(yaml);
    config.out = cfg["out"].as<std::string>();
    config.batch_size = cfg["batch_size"].as<int64_t>();
    config.grad_accum = cfg["grad_accum"].as<int64_t>();
    config.save_every = cfg["save_every"].as<int64_t>();
    if (cfg["deterministic"] && cfg["deterministic"].as<bool>() && cfg["deterministic_group"])
      config.deterministic_group = cfg["deterministic_group"].as<int64_t>();
    if (cfg["checkpoint_dir"]) config.checkpoint_dir = cfg["checkpoint_dir"].as<std::string>();
    if (cfg["checkpoint_replicas"]) config.checkpoint_replicas = cfg["checkpoint_replicas"].as<int>();
  } catch (const YAML::Exception& e) {
    throw Error(kCmdLaunchComponent, fmt::format("cannot read train --print-config's output: {}", e.what()));
  }
}

}  // namespace

void add_launch_command(CLI::App& app) {
  auto opt = std::make_shared<train::LaunchConfig>();
  auto mpirun_args = std::make_shared<std::string>();
  opt->probe = "ssh -o BatchMode=yes -o ConnectTimeout=5 {host} true";
  CLI::App* cmd = app.add_subcommand(
      "launch", "Run a training job under mpirun and restart it on the hosts that answer when a rank or host is lost");
  cmd->add_option("--hostfile", opt->hostfile, "Hosts, one `host slots=N` line each (read again before every attempt)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--discover", opt->discover,
                  "A shell command printing the hosts available now, as `host slots=N` lines (instead of --hostfile)");
  cmd->add_option("--probe", opt->probe,
                  "Shell command that succeeds when {host} answers; this machine is not probed ('' : no probe)")
      ->capture_default_str();
  cmd->add_option("--min-hosts", opt->min_hosts, "Fewest answering hosts to (re)start on")->capture_default_str();
  cmd->add_option("--max-hosts", opt->max_hosts, "Most hosts to use (0: all that answer)")->capture_default_str();
  cmd->add_option("--max-restarts", opt->max_restarts, "Restarts after failures before giving up")->capture_default_str();
  cmd->add_option("--grace", opt->grace_s,
                  "Seconds mpirun may take to end the job after a rank's first error before the launcher ends it")
      ->capture_default_str();
  cmd->add_option("--rescan", opt->rescan_s,
                  "Seconds between looks for more hosts while the job runs; when a larger world answers, the job "
                  "stops at a step boundary and relaunches on it (0: only at restarts)")
      ->capture_default_str();
  cmd->add_option("--mpirun", opt->mpirun, "The mpirun to run")->capture_default_str();
  cmd->add_option("--mpirun-args", *mpirun_args,
                  "More mpirun arguments, split at spaces (e.g. \"--allow-run-as-root -x OMP_NUM_THREADS=1\")");
  cmd->add_option("job", opt->train_args, "-- train ARGS: the training job (needs --out and --save-every)")
      ->expected(-1);
  cmd->callback([opt, mpirun_args] {
    train::LaunchConfig config = *opt;
    config.mpirun_args = split_words(*mpirun_args);
    std::error_code ec;
    config.self = std::filesystem::read_symlink("/proc/self/exe", ec).string();
    if (ec) throw Error(kCmdLaunchComponent, "cannot find flotilla's own binary (/proc/self/exe)");
    if (!config.train_args.empty() && config.train_args.front() == "train") resolve_train(config);
    const int status = train::run_launch(config);
    if (status != 0) throw RunStopped(kCmdLaunchComponent, "the job was stopped", status);
  });
}

}  // namespace flotilla::cli
