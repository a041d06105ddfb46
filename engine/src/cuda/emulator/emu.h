// CUDA's kernel language on a CPU, enough for kernels.cu (tests only).
//
// A launch runs the grid's blocks one after another on blockDim real
// threads (kept between launches); __syncthreads is a barrier across them
// and __shared__ arrays are function statics, shared by the block's
// threads, as on a GPU.
// Warps are the block's threads in groups of 32 (linear thread order);
// mma_bf16_16816, the tensor-core step, gathers its warp's fragments,
// multiplies the whole tiles, and hands each lane its part back.
#pragma once
#define HETEROSPEC_EMULATOR 1
#include <algorithm>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

static dim3 gridDim, blockDim;
static thread_local dim3 threadIdx, blockIdx;
static thread_local unsigned lane_id, warp_id;
static std::barrier<>* block_barrier = nullptr;

#define __global__
#define __device__ static inline
#define __shared__ static
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))

inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
using std::max;
using std::min;

// One warp's m16n8k16 step (the fragment layout of PTX's mma.sync
// .m16n8k16.row.col, as kernels.cu documents it): each lane leaves its
// fragments here and arrives; the last to arrive computes the tiles
// (d = c + a . b, summed with fmaf in k order from c), then all lanes
// take their results. Every lane of a warp must call it equally often.
struct WarpMma {
    unsigned a[32][4];
    unsigned b[32][2];
    float d[32][4];
    void operator()() noexcept {
        auto bf = [](unsigned pair, int high) { return __uint_as_float(high ? pair & 0xffff0000u : pair << 16); };
        float A[16][16], B[16][8], C[16][8];
        for (int lane = 0; lane < 32; ++lane) {
            const int g = lane / 4, t = lane % 4;
            for (int h = 0; h < 2; ++h) {
                A[g][2 * t + h] = bf(a[lane][0], h);
                A[g + 8][2 * t + h] = bf(a[lane][1], h);
                A[g][2 * t + 8 + h] = bf(a[lane][2], h);
                A[g + 8][2 * t + 8 + h] = bf(a[lane][3], h);
                B[2 * t + h][g] = bf(b[lane][0], h);
                B[2 * t + 8 + h][g] = bf(b[lane][1], h);
                C[g][2 * t + h] = d[lane][h];
                C[g + 8][2 * t + h] = d[lane][2 + h];
            }
        }
        for (int lane = 0; lane < 32; ++lane) {
            const int g = lane / 4, t = lane % 4;
            for (int i = 0; i < 4; ++i) {
                const int r = g + 8 * (i / 2), col = 2 * t + i % 2;
                float s = C[r][col];
                for (int kk = 0; kk < 16; ++kk) s = std::fma(A[r][kk], B[kk][col], s);
                d[lane][i] = s;
            }
        }
    }
};

struct WarpMmaStep {
    WarpMma* mma;
    void operator()() noexcept { (*mma)(); }
};

static std::vector<WarpMma>* warp_mmas = nullptr;
static std::vector<std::barrier<WarpMmaStep>*>* warp_barriers = nullptr;

inline void mma_bf16_16816(float* d, const unsigned* a, const unsigned* b) {
    WarpMma& w = (*warp_mmas)[warp_id];
    std::memcpy(w.a[lane_id], a, sizeof w.a[0]);
    std::memcpy(w.b[lane_id], b, sizeof w.b[0]);
    std::memcpy(w.d[lane_id], d, sizeof w.d[0]);
    (*warp_barriers)[warp_id]->arrive_and_wait();
    std::memcpy(d, w.d[lane_id], sizeof w.d[0]);
}

// Threads kept for every launch (making 256 threads per launch cost more
// than most kernels): worker t runs thread index t of each launch that has
// more than t threads. Leaked on purpose: the workers wait forever.
struct Workers {
    std::mutex mu;
    std::condition_variable start, done;
    unsigned spawned = 0, active = 0, remaining = 0;
    unsigned long generation = 0;
    std::function<void(unsigned)> body;

    // Runs body(t) for t < n on the workers; returns when all are done.
    void run(unsigned n, std::function<void(unsigned)> f) {
        std::unique_lock<std::mutex> lock(mu);
        for (; spawned < n; ++spawned) std::thread([this, t = spawned] { serve(t); }).detach();
        body = std::move(f);
        active = remaining = n;
        ++generation;
        start.notify_all();
        done.wait(lock, [&] { return remaining == 0; });
    }

    void serve(unsigned t) {
        unsigned long seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(mu);
                start.wait(lock, [&] { return generation != seen; });
                seen = generation;
                if (t >= active) continue;
            }
            body(t);
            std::lock_guard<std::mutex> lock(mu);
            if (--remaining == 0) done.notify_one();
        }
    }
};

// Runs `kernel()` for every block of `grid`, on `block` threads.
template <class F>
void launch(dim3 grid, dim3 block, F kernel) {
    static Workers* workers = new Workers;
    const unsigned threads = block.x * block.y * block.z;
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    gridDim = grid;
    blockDim = block;
    // A warp of up to 32 threads; the last one may be short.
    const unsigned warps = (threads + 31) / 32;
    std::vector<WarpMma> mmas(warps);
    std::vector<std::unique_ptr<std::barrier<WarpMmaStep>>> warp_bars;
    std::vector<std::barrier<WarpMmaStep>*> bars;
    for (unsigned w = 0; w < warps; ++w) {
        warp_bars.push_back(std::make_unique<std::barrier<WarpMmaStep>>(std::min(32u, threads - 32 * w),
                                                                         WarpMmaStep{&mmas[w]}));
        bars.push_back(warp_bars.back().get());
    }
    warp_mmas = &mmas;
    warp_barriers = &bars;
    workers->run(threads, [&](unsigned t) {
        threadIdx = dim3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
        lane_id = t % 32;
        warp_id = t / 32;
        for (unsigned z = 0; z < grid.z; ++z)
            for (unsigned y = 0; y < grid.y; ++y)
                for (unsigned x = 0; x < grid.x; ++x) {
                    blockIdx = dim3{x, y, z};
                    kernel();
                    barrier.arrive_and_wait();  // the block is done before the next reuses shared memory
                }
    });
}
