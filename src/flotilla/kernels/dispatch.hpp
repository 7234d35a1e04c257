// Private to kernels/: run-time choice of instruction set for flotilla's own hot loops.
//
// The default build targets any x86-64 with AVX2 and FMA (x86-64-v3), so one binary runs on
// every machine of a fleet. A function marked FLOTILLA_KERNEL is compiled twice by GCC
// (target_clones): once for that baseline and once for x86-64-v4 (AVX-512 F/BW/CD/DQ/VL);
// the dynamic loader picks one per function when the program starts (an ifunc resolver
// asking the CPU), so calls cost what they cost before. OpenMP regions inside a marked
// function are outlined into functions that are cloned and chosen the same way, and
// inline helpers (detail::exp_approx) are compiled into each variant.
//
// The loops are plain C++ written so that GCC vectorises them; no intrinsics, so both
// variants compute the same float operations and differ only in vector width (sums whose
// order follows the vector width may differ in the last bits).
//
// When the baseline already has AVX-512 (-DFLOTILLA_NATIVE=ON on such a CPU) there is
// nothing to choose and the mark is empty. Other architectures: empty as well.
#pragma once

#if defined(__x86_64__) && !defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#define FLOTILLA_KERNEL_CLONES 1
#define FLOTILLA_KERNEL __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define FLOTILLA_KERNEL_CLONES 0
#define FLOTILLA_KERNEL
#endif
