// flotilla launch: runs a training job under mpirun and keeps it going when a rank or a
// host is lost, in the manner of torchrun's elastic agent and horovodrun's host discovery.
//
// Each attempt: read the hosts (hostfile or discovery script), keep those that answer
// (a probe command; this machine always answers), choose the world and the cut of the
// global batch (train/elastic.hpp), run mpirun, and watch it. When a rank fails, flotilla's
// own fault detection ends its peers within --timeout; the launcher gives mpirun --grace
// seconds after the first error line to exit, then ends it. Unless the job ended on an
// input error, it starts the next attempt from the newest complete checkpoint, resharded to
// the new world. Events go to stderr as they happen, to OUT/metrics.jsonl (one line each,
// with an "event" key) and, at the end, as a timeline.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/train/checkpoint.hpp"
#include "flotilla/train/elastic.hpp"

namespace flotilla::cli {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
constexpr const char* kComponent = "launch";

std::atomic<int> g_stop_signal{0};
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

// A process started with fork/exec in its own process group, its stdout and stderr read
// through pipes (or left as ours).
class Child {
 public:
  Child(const std::vector<std::string>& argv, bool capture_stdout, bool capture_stderr, bool silence_stderr = false) {
    int out[2] = {-1, -1}, err[2] = {-1, -1};
    if ((capture_stdout && ::pipe2(out, O_CLOEXEC) != 0) || (capture_stderr && ::pipe2(err, O_CLOEXEC) != 0))
      throw Error(kComponent, fmt::format("pipe: {}", std::strerror(errno)));
    pid_ = ::fork();
    if (pid_ < 0) throw Error(kComponent, fmt::format("fork: {}", std::strerror(errno)));
    if (pid_ == 0) {
      ::setpgid(0, 0);
      if (capture_stdout) ::dup2(out[1], STDOUT_FILENO);
      if (capture_stderr) ::dup2(err[1], STDERR_FILENO);
      if (silence_stderr) {
        const int null = ::open("/dev/null", O_WRONLY);
        if (null >= 0) ::dup2(null, STDERR_FILENO);
      }
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      std::fprintf(stderr, "flotilla: error: [launch] cannot run %s: %s\n", args[0], std::strerror(errno));
      ::_exit(127);
    }
    ::setpgid(pid_, pid_);  // also here: no race with a signal sent right after fork
    if (capture_stdout) {
      ::close(out[1]);
      out_fd_ = out[0];
    }
    if (capture_stderr) {
      ::close(err[1]);
      err_fd_ = err[0];
    }
  }
  ~Child() {
    if (pid_ > 0 && !status_) {
      ::kill(-pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (out_fd_ >= 0) ::close(out_fd_);
    if (err_fd_ >= 0) ::close(err_fd_);
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  int out_fd() const { return out_fd_; }
  int err_fd() const { return err_fd_; }
  void close_out() { ::close(std::exchange(out_fd_, -1)); }
  void close_err() { ::close(std::exchange(err_fd_, -1)); }
  void signal_group(int sig) const { ::kill(-pid_, sig); }
  // The exit status as a shell reports it (128 + signal when killed), once it has ended.
  std::optional<int> poll_exit() {
    if (status_) return status_;
    int st = 0;
    if (::waitpid(pid_, &st, WNOHANG) == pid_)
      status_ = WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? 128 + WTERMSIG(st) : 1;
    return status_;
  }

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1, err_fd_ = -1;
  std::optional<int> status_;
};

// Runs a short command to its end (killed after `timeout_s`): its exit status and stdout.
// Its stderr is ours, or silenced.
int run_capture(const std::vector<std::string>& argv, double timeout_s, std::string* out, bool silence_stderr) {
  Child child(argv, /*capture_stdout=*/true, /*capture_stderr=*/false, silence_stderr);
  const Clock::time_point t0 = Clock::now();
  char buf[4096];
  while (child.out_fd() >= 0) {
    pollfd p{child.out_fd(), POLLIN, 0};
    const int left_ms = static_cast<int>((timeout_s - seconds_since(t0)) * 1000);
    if (left_ms <= 0) break;
    if (::poll(&p, 1, std::min(left_ms, 200)) <= 0) continue;
    const ssize_t n = ::read(child.out_fd(), buf, sizeof buf);
    if (n <= 0) {
      child.close_out();
      break;
    }
    out->append(buf, static_cast<size_t>(n));
  }
  while (!child.poll_exit()) {
    if (seconds_since(t0) > timeout_s) {
      child.signal_group(SIGKILL);
      while (!child.poll_exit()) ::usleep(10000);
      return 124;
    }
    ::usleep(10000);
  }
  return *child.poll_exit();
}

// The train command's flags as train resolves them (`train ... --print-config`).
struct ResolvedTrain {
  std::string out;
  int64_t batch_size = 0, grad_accum = 0, save_every = 0;
};

ResolvedTrain resolve_train(const std::string& self, const std::vector<std::string>& train_args) {
  std::vector<std::string> argv = {self};
  argv.insert(argv.end(), train_args.begin(), train_args.end());
  argv.emplace_back("--print-config");
  std::string yaml;
  const int status = run_capture(argv, 120.0, &yaml, /*silence_stderr=*/false);
  // train said what is wrong, in one line: nothing to add to it.
  if (status != 0) throw RunStopped(kComponent, "the train command is not valid", status == 2 ? 2 : 1, /*quiet=*/true);
  ResolvedTrain r;
  try {
    const YAML::Node cfg = YAML::Load(yaml);
    r.out = cfg["out"].as<std::string>();
    r.batch_size = cfg["batch_size"].as<int64_t>();
    r.grad_accum = cfg["grad_accum"].as<int64_t>();
    r.save_every = cfg["save_every"].as<int64_t>();
  } catch (const YAML::Exception& e) {
    throw Error(kComponent, fmt::format("cannot read train --print-config's output: {}", e.what()));
  }
  return r;
}

// train's arguments split into those every attempt passes as they are and those the
// launcher sets per attempt: the batch cut (replaced), and --resume and --force (the first
// attempt passes the user's; later ones resume the run's own folder).
struct TrainArgs {
  std::vector<std::string> kept;
  std::vector<std::string> first_only;  // the user's --resume [DIR] and --force
};

TrainArgs split_train_args(const std::vector<std::string>& args) {
  static const std::set<std::string, std::less<>> batch = {"--batch-size", "--grad-accum",
                                                          "--grad-accumulation-steps"};
  TrainArgs out;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    const bool inline_value = a.find('=') != std::string::npos;
    const std::string name = a.substr(0, a.find('='));
    if (batch.contains(name)) {
      if (!inline_value) ++i;  // its value is the next word
    } else if (name == "--resume") {
      out.first_only.push_back(a);
      // `--resume DIR`: a value that is not the next flag.
      if (!inline_value && i + 1 < args.size() && !args[i + 1].starts_with("-")) out.first_only.push_back(args[++i]);
    } else if (a == "--force") {
      out.first_only.push_back(a);
    } else {
      out.kept.push_back(a);
    }
  }
  return out;
}

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

std::string replace_all(std::string s, std::string_view what, std::string_view with) {
  for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + with.size()))
    s.replace(at, what.size(), with);
  return s;
}

struct Options {
  std::string hostfile, discover, probe = "ssh -o BatchMode=yes -o ConnectTimeout=5 {host} true";
  std::string mpirun = "mpirun", mpirun_args;
  int min_hosts = 1, max_hosts = 0, max_restarts = 3;
  double grace_s = 30.0, probe_timeout_s = 15.0, rescan_s = 60.0;
  std::vector<std::string> command;
};

// One attempt's mpirun, watched: its output passes through; the first error line starts
// the grace period, after which the job's remains are ended.
struct AttemptEnd {
  int status = 0;
  bool stopped_by_user = false;
  bool stopped_to_grow = false;         // more slots answered: stopped at a step, to relaunch larger
  std::string first_error;              // the first error line any rank printed
  std::optional<double> fault_s;        // when it appeared (launcher clock)
  std::optional<double> first_step_s;   // when this attempt printed its first step line
  int64_t last_step = -1;               // the last step line's step
};

// `grow`, asked every `rescan_s` seconds once training runs: whether a larger world
// answers now; if so the job is stopped at a step boundary (SIGTERM: flotilla finishes the
// step, checkpoints and exits) so that the next attempt takes the hosts in.
AttemptEnd supervise(const std::vector<std::string>& argv, double grace_s, double rescan_s,
                     const std::function<bool()>& grow, Clock::time_point t0) {
  Child child(argv, /*capture_stdout=*/true, /*capture_stderr=*/true);
  AttemptEnd end;
  Clock::time_point last_scan = Clock::now();
  std::string line_out, line_err;
  std::optional<Clock::time_point> fault_at, term_sent;
  int forwarded_signal = 0;
  const auto scan = [&](std::string& pending, bool is_err) {
    size_t nl;
    while ((nl = pending.find('\n')) != std::string::npos) {
      const std::string line = pending.substr(0, nl);
      pending.erase(0, nl + 1);
      if (!is_err) {
        long long step = 0;
        if (std::sscanf(line.c_str(), "step %lld/", &step) == 1) {
          if (!end.first_step_s) end.first_step_s = seconds_since(t0);
          end.last_step = step;
        }
        continue;
      }
      const bool error = line.find("flotilla: error:") != std::string::npos ||
                         line.find("mpirun noticed that process") != std::string::npos ||
                         line.find("ORTE has lost communication") != std::string::npos ||
                         line.find("mpirun has exited due to process") != std::string::npos;
      if (error && !fault_at) {
        fault_at = Clock::now();
        end.fault_s = seconds_since(t0);
        end.first_error = line;
      }
    }
  };
  char buf[8192];
  while (true) {
    std::vector<pollfd> fds;
    if (child.out_fd() >= 0) fds.push_back({child.out_fd(), POLLIN, 0});
    if (child.err_fd() >= 0) fds.push_back({child.err_fd(), POLLIN, 0});
    if (!fds.empty() && ::poll(fds.data(), fds.size(), 200) > 0) {
      for (const pollfd& p : fds) {
        if (!(p.revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const ssize_t n = ::read(p.fd, buf, sizeof buf);
        const bool is_err = p.fd == child.err_fd();
        if (n <= 0) {
          is_err ? child.close_err() : child.close_out();
          continue;
        }
        std::fwrite(buf, 1, static_cast<size_t>(n), is_err ? stderr : stdout);
        std::fflush(is_err ? stderr : stdout);
        std::string& pending = is_err ? line_err : line_out;
        pending.append(buf, static_cast<size_t>(n));
        scan(pending, is_err);
      }
    } else if (fds.empty()) {
      ::usleep(50000);
    }
    if (const std::optional<int> status = child.poll_exit(); status && fds.empty()) {
      end.status = *status;
      break;
    } else if (status && child.out_fd() < 0 && child.err_fd() < 0) {
      end.status = *status;
      break;
    }
    // The user's Ctrl-C or SIGTERM: passed on once (flotilla stops at a step boundary and
    // says so), then the job ends as it ends; no restart.
    if (const int sig = g_stop_signal.load(); sig != 0 && forwarded_signal == 0) {
      forwarded_signal = sig;
      end.stopped_by_user = true;
      child.signal_group(SIGTERM);
    }
    if (rescan_s > 0 && end.first_step_s && !fault_at && forwarded_signal == 0 &&
        seconds_since(last_scan) > rescan_s) {
      last_scan = Clock::now();
      if (grow()) {
        forwarded_signal = SIGTERM;
        end.stopped_to_grow = true;
        child.signal_group(SIGTERM);
      }
    }
    // A rank failed: the others follow within flotilla's --timeout; mpirun gets the grace
    // period to end them and exit, then its remains are ended.
    if (fault_at && std::chrono::duration<double>(Clock::now() - *fault_at).count() > grace_s) {
      if (!term_sent) {
        std::fprintf(stderr, "launch: the job has not ended %.0f s after its first error: ending it\n", grace_s);
        child.signal_group(SIGTERM);
        term_sent = Clock::now();
      } else if (std::chrono::duration<double>(Clock::now() - *term_sent).count() > 5.0) {
        child.signal_group(SIGKILL);
      }
    }
  }
  if (!end.fault_s && end.status != 0) end.fault_s = seconds_since(t0);
  return end;
}

class Timeline {
 public:
  Timeline(fs::path metrics, Clock::time_point t0) : metrics_(std::move(metrics)), t0_(t0) {}

  void add(nlohmann::json event, const std::string& text) {
    const double t = seconds_since(t0_);
    event["seq"] = static_cast<int64_t>(events_.size());
    event["t_s"] = std::round(t * 1000.0) / 1000.0;
    event["time"] = utc_now();
    events_.push_back(event);
    lines_.push_back(fmt::format("{:>9.1f} s  {}", t, text));
    std::fprintf(stderr, "launch: %s\n", text.c_str());
    std::fflush(stderr);
  }

  // Appends to metrics.jsonl the events it does not hold yet (a fresh restart rewrites the
  // file; a resumed one keeps the event lines, train/job_record.cpp).
  void flush() const {
    if (!fs::is_directory(metrics_.parent_path())) fs::create_directories(metrics_.parent_path());
    std::set<int64_t> present;
    if (fs::is_regular_file(metrics_)) {
      const std::string text = read_text_file(metrics_);
      size_t begin = 0;
      while (begin < text.size()) {
        size_t end = text.find('\n', begin);
        if (end == std::string::npos) end = text.size();
        const nlohmann::json j = nlohmann::json::parse(text.substr(begin, end - begin), nullptr, false);
        if (j.is_object() && j.contains("event") && j.contains("seq") && j["seq"].is_number_integer())
          present.insert(j["seq"].get<int64_t>());
        begin = end + 1;
      }
    }
    std::string add;
    for (const nlohmann::json& e : events_)
      if (!present.contains(e["seq"].get<int64_t>())) add += e.dump() + "\n";
    if (add.empty()) return;
    std::FILE* f = std::fopen(metrics_.c_str(), "a");
    if (!f) throw Error(kComponent, fmt::format("{}: cannot append: {}", metrics_.string(), std::strerror(errno)));
    std::fwrite(add.data(), 1, add.size(), f);
    std::fclose(f);
  }

  void print() const {
    std::fprintf(stderr, "launch: timeline\n");
    for (const std::string& l : lines_) std::fprintf(stderr, "  %s\n", l.c_str());
  }

 private:
  fs::path metrics_;
  Clock::time_point t0_;
  std::vector<nlohmann::json> events_;
  std::vector<std::string> lines_;
};

// The hosts of this attempt that answer, and those that do not.
// `timeline` null: a rescan while the job runs, which records nothing.
std::vector<train::HostSlots> answering_hosts(const Options& opt, Timeline* timeline, int attempt) {
  std::vector<train::HostSlots> listed;
  if (!opt.discover.empty()) {
    std::string out;
    const int status = run_capture({"/bin/sh", "-c", opt.discover}, opt.probe_timeout_s, &out, false);
    if (status != 0)
      throw InputError(kComponent, fmt::format("--discover: `{}` exited with status {}", opt.discover, status));
    listed = train::parse_hostfile(out, "--discover output");
  } else {
    listed = train::parse_hostfile(read_text_file(opt.hostfile), opt.hostfile);
  }
  std::vector<train::HostSlots> alive;
  for (const train::HostSlots& h : listed) {
    if (train::is_local_host(h.host) || opt.probe.empty()) {
      alive.push_back(h);
      continue;
    }
    std::string ignored;
    const std::string cmd = replace_all(opt.probe, "{host}", h.host);
    if (run_capture({"/bin/sh", "-c", cmd}, opt.probe_timeout_s, &ignored, /*silence_stderr=*/true) == 0) {
      alive.push_back(h);
    } else if (timeline) {
      timeline->add({{"event", "host_unreachable"}, {"attempt", attempt}, {"host", h.host}},
                   fmt::format("host {} does not answer (`{}`): left out", h.host, cmd));
    }
  }
  return alive;
}

int run_launch(const Options& opt) {
  if (opt.command.empty() || opt.command.front() != "train")
    throw InputError(kComponent, "give the job after `--`: flotilla launch [options] -- train --out DIR ...");
  if (opt.hostfile.empty() == opt.discover.empty())
    throw InputError(kComponent, "give the hosts with --hostfile FILE or --discover COMMAND (one of them)");
  if (opt.min_hosts < 1 || opt.max_hosts < 0 || opt.max_restarts < 0 || !(opt.grace_s >= 0))
    throw InputError(kComponent, "--min-hosts must be at least 1; --max-hosts, --max-restarts and --grace at least 0");
  if (opt.max_hosts > 0 && opt.max_hosts < opt.min_hosts)
    throw InputError(kComponent, fmt::format("--max-hosts {} is below --min-hosts {}", opt.max_hosts, opt.min_hosts));
  std::error_code ec;
  const std::string self = fs::read_symlink("/proc/self/exe", ec).string();
  if (ec) throw Error(kComponent, "cannot find flotilla's own binary (/proc/self/exe)");

  const ResolvedTrain train = resolve_train(self, opt.command);
  if (train.save_every <= 0)
    throw InputError(kComponent, "the job needs --save-every N: a restart resumes from the newest checkpoint, and "
                                 "without checkpoints it would start over");
  const TrainArgs args = split_train_args(opt.command);

  ::signal(SIGINT, on_stop_signal);
  ::signal(SIGTERM, on_stop_signal);
  const Clock::time_point t0 = Clock::now();
  Timeline timeline(fs::path(train.out) / "metrics.jsonl", t0);
  int64_t global_rows = 0;
  std::optional<double> fault_s;
  int64_t fault_step = -1;
  int failures = 0;
  for (int attempt = 1;; ++attempt) {
    const std::vector<train::HostSlots> alive = answering_hosts(opt, &timeline, attempt);
    if (static_cast<int>(alive.size()) < opt.min_hosts) {
      timeline.add({{"event", "gave_up"}, {"attempt", attempt}, {"hosts", alive.size()}},
                   fmt::format("{} host{} answer, --min-hosts is {}: stopping", alive.size(),
                               alive.size() == 1 ? "" : "s", opt.min_hosts));
      if (attempt > 1) timeline.flush();
      timeline.print();
      throw Error(kComponent, fmt::format("only {} host{} answer (--min-hosts {}); the newest checkpoint in {} resumes "
                                          "with flotilla launch ... -- train ... once enough are back",
                                          alive.size(), alive.size() == 1 ? "" : "s", opt.min_hosts, train.out));
    }
    if (global_rows == 0) {
      // The first attempt fixes the global batch: every slot offered, at the flags' cut.
      int64_t slots = 0;
      const size_t usable = opt.max_hosts > 0 ? std::min(alive.size(), static_cast<size_t>(opt.max_hosts)) : alive.size();
      for (size_t i = 0; i < usable; ++i) slots += alive[i].slots;
      global_rows = train.batch_size * train.grad_accum * slots;
    }
    const std::optional<train::ElasticShape> shape =
        train::plan_elastic_shape(alive, opt.max_hosts, global_rows, train.batch_size);
    // Resume: the run's newest complete checkpoint, if it has one (the first attempt does
    // what the user asked).
    std::vector<std::string> run_args = args.kept;
    std::string from = "from the start";
    int64_t resume_step = 0;
    if (attempt == 1) {
      run_args.insert(run_args.end(), args.first_only.begin(), args.first_only.end());
      for (const std::string& a : args.first_only)
        if (a.starts_with("--resume")) from = "resuming as asked";
    } else {
      try {
        const io::ResumePoint point = train::find_resume_point(train.out);
        run_args.emplace_back("--resume");
        resume_step = point.step;
        from = fmt::format("from checkpoint step {}", point.step);
      } catch (const InputError&) {
        run_args.emplace_back("--force");  // the run's own folder, written by the attempt before
        from = "from the start (no complete checkpoint yet)";
      }
    }
    run_args.insert(run_args.end(), {"--batch-size", std::to_string(shape->batch_size), "--grad-accum",
                                     std::to_string(shape->grad_accum)});
    std::vector<std::string> argv = {opt.mpirun};
    for (const std::string& w : split_words(opt.mpirun_args)) argv.push_back(w);
    std::string host_list;
    for (const train::HostSlots& h : shape->hosts) host_list += fmt::format("{}{}:{}", host_list.empty() ? "" : ",", h.host, h.slots);
    argv.insert(argv.end(), {"-np", std::to_string(shape->world), "--host", host_list, self});
    argv.insert(argv.end(), run_args.begin(), run_args.end());

    nlohmann::json hosts_json = nlohmann::json::array();
    for (const train::HostSlots& h : shape->hosts) hosts_json.push_back({{"host", h.host}, {"slots", h.slots}});
    timeline.add({{"event", "attempt_start"},
                  {"attempt", attempt},
                  {"world", shape->world},
                  {"hosts", hosts_json},
                  {"batch_size", shape->batch_size},
                  {"grad_accum", shape->grad_accum},
                  {"resume_step", resume_step}},
                 fmt::format("attempt {}: {}, {}", attempt, shape->describe(), from));
    const auto grow = [&] {
      const std::optional<train::ElasticShape> now =
          train::plan_elastic_shape(answering_hosts(opt, nullptr, attempt), opt.max_hosts, global_rows, train.batch_size);
      if (!now || now->world <= shape->world) return false;
      timeline.add({{"event", "grow"}, {"attempt", attempt}, {"world", now->world}},
                   fmt::format("{} ranks answer now ({} run): stopping at the next step to take them in", now->world,
                               shape->world));
      return true;
    };
    const AttemptEnd end = supervise(argv, opt.grace_s, opt.rescan_s, grow, t0);
    if (fault_s && end.first_step_s) {
      const double recovery = *end.first_step_s - *fault_s;
      timeline.add({{"event", "training_again"},
                    {"attempt", attempt},
                    {"recovery_s", std::round(recovery * 1000.0) / 1000.0},
                    {"steps_repeated", std::max<int64_t>(0, fault_step - resume_step)}},
                   fmt::format("training again {:.1f} s after the fault ({} step{} repeated)", recovery,
                               std::max<int64_t>(0, fault_step - resume_step),
                               std::max<int64_t>(0, fault_step - resume_step) == 1 ? "" : "s"));
      fault_s.reset();
    }
    if (end.status == 0) {
      timeline.add({{"event", "complete"}, {"attempt", attempt}}, fmt::format("attempt {}: the job completed", attempt));
      timeline.flush();
      timeline.print();
      return 0;
    }
    if (end.stopped_to_grow && end.status != 0) {
      timeline.add({{"event", "stopped_to_grow"}, {"attempt", attempt}, {"status", end.status}, {"last_step", end.last_step}},
                   fmt::format("attempt {} stopped after step {} to grow", attempt, std::max<int64_t>(0, end.last_step)));
      timeline.flush();
      continue;  // not a failure: no restart is used
    }
    const std::string why = end.first_error.empty() ? fmt::format("exit status {}", end.status) : end.first_error;
    timeline.add({{"event", "attempt_failed"},
                  {"attempt", attempt},
                  {"status", end.status},
                  {"last_step", end.last_step},
                  {"error", end.first_error}},
                 fmt::format("attempt {} ended (status {}) after step {}: {}", attempt, end.status,
                             std::max<int64_t>(0, end.last_step), why));
    timeline.flush();
    if (end.stopped_by_user) {
      timeline.print();
      return end.status;
    }
    // flotilla exits 2 on an input error: the same job would fail the same way again.
    if (end.status == 2) {
      timeline.print();
      throw Error(kComponent, "the job stopped on an input error (above): not restarting it");
    }
    if (++failures > opt.max_restarts) {
      timeline.print();
      throw Error(kComponent, fmt::format("the job failed {} time{}; --max-restarts {} reached", failures,
                                          failures == 1 ? "" : "s", opt.max_restarts));
    }
    fault_s = end.fault_s;
    fault_step = end.last_step;
  }
}

}  // namespace

void add_launch_command(CLI::App& app) {
  auto opt = std::make_shared<Options>();
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
  cmd->add_option("--mpirun-args", opt->mpirun_args,
                  "More mpirun arguments, split at spaces (e.g. \"--allow-run-as-root -x OMP_NUM_THREADS=1\")");
  cmd->add_option("job", opt->command, "-- train ARGS: the training job (needs --out and --save-every)")
      ->expected(-1);
  cmd->callback([opt] {
    const int status = run_launch(*opt);
    if (status != 0) throw RunStopped(kComponent, "the job was stopped", status);
  });
}

}  // namespace flotilla::cli
