// How much memory Open MPI's own reduce-scatter and in-place all-gather take beside the
// buffers they are given (bench/RESULTS.md, "ZeRO memory"): VmHWM before and after
// MPI_Reduce_scatter_block and an in-place MPI_Allgather of BYTES of floats, per rank.
// Not part of the build (plain C against the MPI library):
//   mpicc -O2 bench/mpi_reduce_scatter_memory.c -o /tmp/rs
//   mpirun -np 4 --oversubscribe --bind-to none --mca btl self,vader,tcp /tmp/rs 268435456
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static long hwm_kb(void) {
  FILE* f = fopen("/proc/self/status", "r"); char line[256]; long v = 0;
  while (fgets(line, sizeof line, f)) if (!strncmp(line, "VmHWM:", 6)) v = atol(line + 6);
  fclose(f); return v;
}
int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank, size; MPI_Comm_rank(MPI_COMM_WORLD, &rank); MPI_Comm_size(MPI_COMM_WORLD, &size);
  const size_t total = (size_t)atol(argv[1]) / 4, chunk = total / size;
  float* in = malloc(chunk * size * 4); float* out = malloc(chunk * 4);
  for (size_t i = 0; i < chunk * size; ++i) in[i] = 1.0f;
  for (size_t i = 0; i < chunk; ++i) out[i] = 0.0f;
  MPI_Barrier(MPI_COMM_WORLD);
  long before = hwm_kb();
  MPI_Reduce_scatter_block(in, out, (int)chunk, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  long after_rs = hwm_kb();
  MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, in, (int)chunk, MPI_FLOAT, MPI_COMM_WORLD);
  long after_ag = hwm_kb();
  printf("rank %d of %d: buffer %zu MiB; VmHWM before %ld MiB, after reduce_scatter_block +%ld MiB, after in-place allgather +%ld MiB (out[0]=%g)\n",
         rank, size, chunk * size * 4 >> 20, before >> 10, (after_rs - before) >> 10, (after_ag - after_rs) >> 10, out[0]);
  MPI_Finalize();
}
