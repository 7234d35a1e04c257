#include "flotilla/base/stop_signal.hpp"

#include <atomic>
#include <csignal>

#include <fcntl.h>
#include <unistd.h>

#include "flotilla/base/error.hpp"

namespace flotilla {
namespace {

// Lock-free atomics are async-signal-safe; the handler touches nothing else but write(2),
// open(2), dup2(2), close(2), getppid(2) and _exit(2), which are too.
std::atomic<int> g_received{0};
std::atomic<bool> g_installed{false};
std::atomic<bool> g_parent_stops_reading{false};
struct sigaction g_previous_int, g_previous_term, g_previous_usr1;
static_assert(std::atomic<int>::is_always_lock_free);

void write_stderr(const char* text, size_t bytes) {
  while (bytes > 0) {
    const ssize_t n = ::write(STDERR_FILENO, text, bytes);
    if (n <= 0) return;
    text += n;
    bytes -= static_cast<size_t>(n);
  }
}

// The launcher aborting the job signalled us and reads our output no more: point stdout
// and stderr at /dev/null (open, dup2 and close are async-signal-safe).
bool silence_output_if_parent_sent(const siginfo_t* info) {
  if (!g_parent_stops_reading.load() || info == nullptr || info->si_code != SI_USER || info->si_pid != ::getppid())
    return false;
  const int null_fd = ::open("/dev/null", O_WRONLY);
  if (null_fd < 0) return false;
  ::dup2(null_fd, STDOUT_FILENO);
  ::dup2(null_fd, STDERR_FILENO);
  if (null_fd > STDERR_FILENO) ::close(null_fd);
  return true;
}

void on_stop_signal(int signal, siginfo_t* info, void* /*context*/) {
  int expected = 0;
  if (g_received.compare_exchange_strong(expected, signal)) {
    // SIGUSR1 is a launcher's request passed on by mpirun, which goes on reading.
    if (signal != SIGUSR1 && silence_output_if_parent_sent(info)) return;
    static constexpr char kNotice[] =
        "\nflotilla: stopping after the current step and writing a checkpoint (signal again to quit at once)\n";
    write_stderr(kNotice, sizeof kNotice - 1);
    return;
  }
  static constexpr char kQuit[] = "\nflotilla: second signal: quitting at once, without a checkpoint\n";
  write_stderr(kQuit, sizeof kQuit - 1);
  ::_exit(128 + signal);
}

}  // namespace

StopSignals::StopSignals(ParentOutput parent) {
  if (g_installed.exchange(true)) throw Error("base/stop_signal", "a StopSignals is already installed");
  g_received.store(0);
  g_parent_stops_reading.store(parent == ParentOutput::stops_reading_on_signal);
  struct sigaction action {};
  action.sa_sigaction = on_stop_signal;
  sigemptyset(&action.sa_mask);
  // Restarted system calls: a signal must not fail a read or a collective's poll midway.
  action.sa_flags = SA_RESTART | SA_SIGINFO;
  if (::sigaction(SIGINT, &action, &g_previous_int) != 0 || ::sigaction(SIGTERM, &action, &g_previous_term) != 0 ||
      ::sigaction(SIGUSR1, &action, &g_previous_usr1) != 0) {
    g_installed.store(false);
    throw_errno("base/stop_signal", "sigaction");
  }
}

StopSignals::~StopSignals() {
  ::sigaction(SIGINT, &g_previous_int, nullptr);
  ::sigaction(SIGTERM, &g_previous_term, nullptr);
  ::sigaction(SIGUSR1, &g_previous_usr1, nullptr);
  g_installed.store(false);
}

int stop_signal_received() { return g_received.load(); }

const char* stop_signal_name(int signal) {
  switch (signal) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    case SIGUSR1: return "SIGUSR1";
    default: return "a signal";
  }
}

}  // namespace flotilla
