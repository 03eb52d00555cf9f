// ABI between the simulator runtime (runtime.cpp, built with system headers) and compiled kernels
// (built with -nostdinc against msl_compat.h). Builtin types only: kernels cannot see system headers.
#pragma once

struct ZsimIds {
  unsigned thread_position_in_grid[3], thread_position_in_threadgroup[3], threadgroup_position_in_grid[3];
  unsigned threadgroups_per_grid[3], threads_per_grid[3], threads_per_threadgroup[3];
  unsigned dispatch_threads_per_threadgroup[3], grid_origin[3], grid_size[3];
  unsigned thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  unsigned simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup;
  unsigned thread_execution_width, threads_per_simdgroup;
  unsigned quadgroup_index_in_threadgroup, thread_index_in_quadgroup, quadgroups_per_threadgroup;
  unsigned dispatch_quadgroups_per_threadgroup;
};

extern "C" {
// Blocks until the SIMD-group's active lanes at this call site have arrived; fills `all` with every
// lane's value (n bytes each, poison for inactive lanes) and returns the active-lane mask.
unsigned zsim_simd_sync(int site, const void* value, int n, void* all);
unsigned zsim_lane(void);
void zsim_barrier(int site);
// Threadgroup storage declared by a kernel (made static by the build); poisoned once per threadgroup.
void zsim_tg_register(void* p, unsigned long n);
void zsim_fail(const char* message);
}
