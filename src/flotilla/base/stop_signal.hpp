// Ctrl-C (SIGINT) and SIGTERM as a request to stop at the next safe point, not at once.
//
// A training run that dies mid-step loses everything since its last checkpoint (all of
// it with the default --save-every 0). While a StopSignals lives, the first SIGINT or
// SIGTERM only records the request and prints one notice; the loop that polls
// stop_signal_received() finishes its step, saves and ends. A second signal ends the
// process at once with the shell's code, 128 + the signal.
//
// A signal handler can reach only process-wide state, so this is the one place where
// flotilla keeps some: one StopSignals at a time (a second while one lives throws).
#pragma once

namespace flotilla {

class StopSignals {
 public:
  StopSignals();   // installs the SIGINT and SIGTERM handlers; clears an earlier request
  ~StopSignals();  // puts back the handlers that were there before
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
};

// 0 while no stop was asked for under a StopSignals, else the first signal's number
// (SIGINT, SIGTERM). Stays set after the StopSignals ends, until the next one starts.
int stop_signal_received();

// "SIGINT", "SIGTERM", or "a signal".
const char* stop_signal_name(int signal);

}  // namespace flotilla
