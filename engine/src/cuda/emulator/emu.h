// CUDA's kernel language on a CPU, enough for kernels.cu (tests only).
//
// A launch runs the grid's blocks one after another; a block's threads are
// fibers (ucontext) on the launching thread, each running until it waits
// at a barrier and handing over to the next, so __syncthreads costs a
// context switch per thread, not a wake-up of 256 OS threads. __shared__
// arrays are function statics, shared by the block's threads, as on a GPU.
// Warps are the block's threads in groups of 32 (linear thread order);
// mma_bf16_16816, the tensor-core step, gathers its warp's fragments,
// multiplies the whole tiles, and hands each lane its part back.
#pragma once
#define HETEROSPEC_EMULATOR 1
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

static dim3 gridDim, blockDim, threadIdx, blockIdx;
static unsigned lane_id, warp_id;

// The running block's threads: one fiber each, and the launch's own
// context that resumes them in turn.
struct Fibers {
    std::vector<ucontext_t> contexts;
    std::vector<std::unique_ptr<char[]>> stacks;
    std::vector<char> finished;
    ucontext_t launcher;
    unsigned current = 0;
    std::function<void()> kernel;
};
static Fibers fibers;
static constexpr size_t FIBER_STACK = 256 << 10;

// Hands over to the launcher, which resumes the next unfinished thread.
inline void yield_thread() {
    swapcontext(&fibers.contexts[fibers.current], &fibers.launcher);
    // Another thread ran meanwhile: nothing read before is still known.
    asm volatile("" ::: "memory");
}

// A barrier of `expected` threads: the last to arrive runs `complete`,
// then every waiter goes on.
struct Barrier {
    unsigned expected = 0, arrived = 0;
    unsigned long generation = 0;
    template <class F>
    void arrive_and_wait(F complete) {
        const unsigned long mine = generation;
        if (++arrived == expected) {
            arrived = 0;
            complete();
            ++generation;
            return;
        }
        while (generation == mine) yield_thread();
    }
};
static Barrier block_barrier;

#define __global__
#define __device__ static inline
#define __shared__ static
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))

inline void __syncthreads() {
    block_barrier.arrive_and_wait([] {});
}
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

static std::vector<WarpMma>* warp_mmas = nullptr;
static std::vector<Barrier>* warp_barriers = nullptr;

inline void mma_bf16_16816(float* d, const unsigned* a, const unsigned* b) {
    WarpMma& w = (*warp_mmas)[warp_id];
    std::memcpy(w.a[lane_id], a, sizeof w.a[0]);
    std::memcpy(w.b[lane_id], b, sizeof w.b[0]);
    std::memcpy(w.d[lane_id], d, sizeof w.d[0]);
    (*warp_barriers)[warp_id].arrive_and_wait([&w] { w(); });
    std::memcpy(d, w.d[lane_id], sizeof w.d[0]);
}

// How often every barrier of the launch has opened so far.
static unsigned long barrier_generations(const std::vector<Barrier>& warps) {
    unsigned long n = block_barrier.generation;
    for (const Barrier& b : warps) n += b.generation;
    return n;
}

static void run_thread() {
    fibers.kernel();
    fibers.finished[fibers.current] = 1;
}  // returning resumes the launcher (uc_link)

// Runs `kernel()` for every block of `grid`, on `block` threads.
template <class F>
void launch(dim3 grid, dim3 block, F kernel) {
    const unsigned threads = block.x * block.y * block.z;
    gridDim = grid;
    blockDim = block;
    block_barrier = Barrier{threads};
    // A warp of up to 32 threads; the last one may be short.
    const unsigned warps = (threads + 31) / 32;
    std::vector<WarpMma> mmas(warps);
    std::vector<Barrier> bars(warps);
    for (unsigned w = 0; w < warps; ++w) bars[w].expected = std::min(32u, threads - 32 * w);
    warp_mmas = &mmas;
    warp_barriers = &bars;
    fibers.kernel = kernel;
    fibers.contexts.resize(std::max<size_t>(fibers.contexts.size(), threads));
    fibers.finished.assign(threads, 0);
    while (fibers.stacks.size() < threads) fibers.stacks.emplace_back(new char[FIBER_STACK]);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = dim3{x, y, z};
                for (unsigned t = 0; t < threads; ++t) {
                    ucontext_t& c = fibers.contexts[t];
                    if (getcontext(&c) != 0) std::abort();
                    c.uc_stack.ss_sp = fibers.stacks[t].get();
                    c.uc_stack.ss_size = FIBER_STACK;
                    c.uc_link = &fibers.launcher;
                    makecontext(&c, run_thread, 0);
                    fibers.finished[t] = 0;
                }
                // Round robin until every thread has returned; a pass in
                // which no thread returns and no barrier opens is a kernel
                // that leaves some thread short of a barrier: stop there.
                for (unsigned left = threads; left > 0;) {
                    const unsigned long opened = barrier_generations(bars);
                    const unsigned before = left;
                    for (unsigned t = 0; t < threads; ++t) {
                        if (fibers.finished[t]) continue;
                        fibers.current = t;
                        threadIdx = dim3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
                        lane_id = t % 32;
                        warp_id = t / 32;
                        swapcontext(&fibers.launcher, &fibers.contexts[t]);
                        left -= fibers.finished[t];
                    }
                    if (left == before && barrier_generations(bars) == opened) {
                        std::fprintf(stderr, "emulated kernel deadlocked: a thread never reached a barrier\n");
                        std::abort();
                    }
                }
            }
}
