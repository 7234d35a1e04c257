// Thread counts: one OpenMP pool (libgomp) runs our kernels and oneDNN's matrix products
// (Debian's libdnnl is built with the OpenMP runtime), so one number sets both.
#pragma once

namespace flotilla {

// Sets the OpenMP thread count; n <= 0 keeps the default (OMP_NUM_THREADS or the number
// of cores).
void set_num_threads(int n);
int num_threads();

}  // namespace flotilla
