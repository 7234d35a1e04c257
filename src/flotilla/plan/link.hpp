// A network link between ranks, as the planner sees it: a bandwidth and a per-message
// latency (the alpha-beta model), and the cost of the collectives flotilla runs over it.
//
// Vocabulary. A *payload* is the buffer one rank hands to the collective (the whole
// gradient for an all-reduce). Over a ring of n ranks the payload is cut into n *chunks*;
// each of the 2(n-1) ring steps sends one chunk to the next rank and waits for one.
//
//   ring all-reduce      time = 2(n-1)/n * payload / bandwidth + 2(n-1) * latency
//   ring reduce-scatter  time =  (n-1)/n * payload / bandwidth +  (n-1) * latency
//   ring all-gather      time =  (n-1)/n * payload / bandwidth +  (n-1) * latency
//                        (payload = the gathered whole, n chunks of one rank's part)
//
// A ring moves the fewest bytes any all-reduce can (each rank sends and receives
// 2(n-1)/n of the payload), so for large payloads it is what MPI_Allreduce, NCCL and
// gloo converge to; for small ones the latency term dominates. n = 1 costs nothing.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace flotilla::plan {

struct Link {
  double bandwidth_bytes_per_s = 125e6;  // 1 Gbit/s ethernet
  double latency_s = 50e-6;              // per message, one way
  std::string source = "assumed";        // "--bandwidth", "measured (mpirun -np 2)", ...
};

// Every collective the plan charges is flotilla's own (data parallelism's gradients, ZeRO's
// shards, tensor parallelism's activations: comm::AllReducer), at the link's whole
// bandwidth. The MPI library's own collectives (`--allreduce mpi`) are not modelled: Open MPI
// over TCP with its default settings runs a two-way exchange at about half the link
// (../shared/netcluster/README.md: MPI_Sendrecv 0.52 Gbit/s each way on 1 Gbit/s;
// bench/RESULTS.md, "Emulated hosts at 1 Gbit/s": MPI_Allreduce 0.36-0.53 Gbit/s bus
// bandwidth at 1-64 MiB on 2 and 4 hosts, where flotilla's ring reaches 0.93-0.95).

// The time of `collectives` of flotilla's own (comm::AllReducer: the ring, or the host's
// shared-memory arena) on `link` at its whole bandwidth, as data parallelism's ring is
// charged, each rank sending `wire_bytes` in all and every collective taking `steps` ring
// steps of one latency, plus one exchange of signatures before each (the mismatch check
// that every signed collective runs). Tensor parallelism's collectives.
double ring_collectives_s(double wire_bytes, double collectives, double steps, const Link& link);

// "1gbit", "10gbit", "100mbit", "25gbit/s", "1.25GB/s", "125MB/s", "800KB/s", "1e9" (bytes/s):
// bit units (bit, kbit, mbit, gbit, tbit) count bits, byte units (B, KB, MB, GB, TB,
// with or without "/s") count bytes; decimal prefixes. InputError naming the flag otherwise.
double parse_bandwidth(std::string_view text, std::string_view flag = "--bandwidth");
// "50us", "0.2ms", "1s", "500ns" (a bare number is seconds). InputError otherwise.
double parse_latency(std::string_view text, std::string_view flag = "--latency");

// "1.0 Gbit/s (125 MB/s)"
std::string format_bandwidth(double bytes_per_s);
// "3.2 ms", "45 us", "1.2 s", "2.5 h"
std::string format_seconds(double s);
// "1.5 GiB", "320 MiB", "12 KiB", "512 B"
std::string format_bytes(double bytes);

// The formulas above. payload_bytes >= 0, ranks >= 1.
double ring_all_reduce_s(double payload_bytes, int ranks, const Link& link);
double ring_reduce_scatter_s(double payload_bytes, int ranks, const Link& link);
double ring_all_gather_s(double payload_bytes, int ranks, const Link& link);
// Bytes one rank sends (and receives) in a ring all-reduce of the payload.
double ring_all_reduce_wire_bytes(double payload_bytes, int ranks);

}  // namespace flotilla::plan
