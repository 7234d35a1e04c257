// Thread counts: OpenMP and OpenBLAS share one pool (we link OpenBLAS's OpenMP build), so
// one number sets both.
#pragma once

namespace flotilla {

// Sets the OpenMP and OpenBLAS thread count; n <= 0 keeps the default (OMP_NUM_THREADS or
// the number of cores).
void set_num_threads(int n);
int num_threads();

}  // namespace flotilla
