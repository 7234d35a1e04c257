// Tests of bf16 matrix products run where oneDNN has them (AVX-512 and up) and are skipped,
// saying so, elsewhere: the one binary runs on AVX2-only machines of a fleet too, where
// `--dtype bf16` computes in float32 (ctest cli_fleet_binary checks that path under
// `qemu-x86_64 -cpu Haswell`, and GemmBf16.UnsupportedCpuIsAnErrorNotACrash the kernel's
// refusal there).
#pragma once

#include <gtest/gtest.h>

#include "flotilla/kernels/gemm.hpp"

#define SKIP_WITHOUT_BF16() \
  if (!::flotilla::kernels::gemm_bf16_supported()) GTEST_SKIP() << "oneDNN has no bf16 matmul on this CPU"
