// Ctrl-C (SIGINT), SIGTERM and SIGUSR1 as a request to stop at the next safe point, not at
// once.
//
// A training run that dies mid-step loses everything since its last checkpoint (all of
// it with the default --save-every 0). While a StopSignals lives, the first SIGINT or
// SIGTERM only records the request and prints one notice; the loop that polls
// stop_signal_received() finishes its step, saves and ends. A second signal ends the
// process at once with the shell's code, 128 + the signal.
//
// SIGUSR1 is how `flotilla launch` asks the ranks to stop: mpirun passes SIGUSR1 on to every
// rank at once (one of the signals it forwards), whereas its answer to SIGINT or SIGTERM is
// to abort the job: SIGCONT, then SIGTERM to the ranks only after its kill timeout.
//
// A signal handler can reach only process-wide state, so this is the one place where
// flotilla keeps some: one StopSignals at a time (a second while one lives throws).
#pragma once

namespace flotilla {

// Under a launcher (mpirun, or its orted on another machine) the parent process signals
// the ranks when it aborts the job (mpirun's answer to Ctrl-C: SIGTERM, then SIGKILL after
// --mca odls_base_sigkill_timeout seconds) and from then on no longer reads their stdout
// and stderr. A rank that wrote a progress line into that full pipe would block there
// until the SIGKILL, and its checkpoint would never be written. With
// ParentOutput::stops_reading_on_signal, a stop signal sent by the parent process sends
// this process's stdout and stderr to /dev/null instead, so the step and the checkpoint
// finish within the launcher's grace period.
enum class ParentOutput { keeps_reading, stops_reading_on_signal };

class StopSignals {
 public:
  // Installs the SIGINT, SIGTERM and SIGUSR1 handlers; clears an earlier request.
  explicit StopSignals(ParentOutput parent = ParentOutput::keeps_reading);
  ~StopSignals();  // puts back the handlers that were there before
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
};

// 0 while no stop was asked for under a StopSignals, else the first signal's number
// (SIGINT, SIGTERM, SIGUSR1). Stays set after the StopSignals ends, until the next one starts.
int stop_signal_received();

// "SIGINT", "SIGTERM", "SIGUSR1", or "a signal".
const char* stop_signal_name(int signal);

}  // namespace flotilla
