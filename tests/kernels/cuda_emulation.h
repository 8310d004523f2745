// Runs CUDA device code on the CPU for the emulation tests (wkv5_cuda_emulation.cpp, qmm_cuda_emulation.cpp):
// each CUDA thread of a block is a std::thread, __syncthreads() is a std::barrier, __shared__ arrays are function
// statics (blocks run one after another, so they never overlap). Include it before the kernel header.
#pragma once

#include <barrier>
#include <thread>
#include <vector>

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local EmuDim3 threadIdx, blockIdx, gridDim;
thread_local std::barrier<>* emu_block_barrier = nullptr;
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(n)
#define __shared__ static

// kernel() once per CUDA thread of every block of a (grid_x, grid_y, grid_z) grid of `threads`-thread blocks
template <class Kernel>
void emu_launch(unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned threads, const Kernel& kernel) {
  for (unsigned bz = 0; bz < grid_z; ++bz) {
    for (unsigned by = 0; by < grid_y; ++by) {
      for (unsigned bx = 0; bx < grid_x; ++bx) {
        std::barrier<> barrier(threads);
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx.x = t;
            blockIdx = EmuDim3{bx, by, bz};
            gridDim = EmuDim3{grid_x, grid_y, grid_z};
            emu_block_barrier = &barrier;
            kernel();
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
}
