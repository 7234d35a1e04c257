// What reading a float tensor that holds NaN or Inf does (io::TensorStore::check_finite).
#pragma once

namespace flotilla::io {

// warn: a line naming the tensor, and the load goes on (the default: the user decides, and
// a run that diverges from such weights stops on its own); refuse: an InputError (--strict).
enum class NonFinitePolicy { warn, refuse };

}  // namespace flotilla::io
