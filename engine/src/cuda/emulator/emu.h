// CUDA's kernel language on a CPU, enough for kernels.cu (tests only).
//
// A launch runs the grid's blocks one after another on blockDim real
// threads; __syncthreads is a barrier across them and __shared__ arrays
// are function statics, shared by the block's threads, as on a GPU.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

static dim3 gridDim, blockDim;
static thread_local dim3 threadIdx, blockIdx;
static std::barrier<>* block_barrier = nullptr;

#define __global__
#define __device__ static inline
#define __shared__ static
#define __restrict__ __restrict

inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
using std::max;
using std::min;

// Runs `kernel()` for every block of `grid`, on `block` threads.
template <class F>
void launch(dim3 grid, dim3 block, F kernel) {
    const unsigned threads = block.x * block.y * block.z;
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    gridDim = grid;
    blockDim = block;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx = dim3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        blockIdx = dim3{x, y, z};
                        kernel();
                        barrier.arrive_and_wait();  // the block is done before the next reuses shared memory
                    }
        });
    }
    for (auto& th : pool) th.join();
}
