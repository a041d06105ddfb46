// heterospec's GPU kernels, compiled at run time with NVRTC.
//
// Every kernel computes each output row from that row's inputs alone, in a
// fixed order: a token's result does not depend on which other tokens share
// the launch or where its row falls in a tile. That is what keeps tree
// verification token-identical to plain decoding on the GPU, as on the CPU
// (a library GEMM picks its algorithm by the number of rows, so a row's
// rounding would change with the batch).
//
// Layouts match the CPU path: activations are row-major (tokens, features);
// weights (out, in), bf16 for the GEMMs; paged K/V per layer (slots,
// kv_heads * head_dim). The GEMMs use the tensor cores (mma.sync, sm_80+).

#define TILE_M 64
#define TILE_N 64
#define TILE_K 32
// Halves per shared-memory tile row: 80 bytes, so that the eight row groups
// of a fragment load fall on distinct banks.
#define TILE_STRIDE (TILE_K + 8)
#define GEMM_THREADS 256
#define ROW_THREADS 256
#define ATTN_THREADS 256
// The tile loads share one loop, the 8 warps cover a 64 x 64 tile as 4 x 2
// warp tiles of 16 x 32, and block_sum/block_max halve the block: the
// launches (mod.rs, `Grid`) use 256 threads for every kernel.
static_assert(TILE_M == TILE_N, "square GEMM tiles");
static_assert(GEMM_THREADS == 256 && ROW_THREADS == 256 && ATTN_THREADS == 256, "power-of-two blocks of 256");
static_assert(TILE_K % 16 == 0, "whole MMA steps per tile");

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// bf16 bits of `x`, rounded to nearest even (NaN stays NaN); the host
// rounds weights the same way (`half::bf16::from_f32`).
__device__ unsigned short bf16_bits(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// Two adjacent bf16 of a shared tile row as one MMA register (the lower
// column in the low half).
__device__ unsigned bf16_pair(const unsigned short* p) {
    return (unsigned)p[0] | ((unsigned)p[1] << 16);
}

#ifndef HETEROSPEC_EMULATOR
// d (16 x 8, f32) += a (16 x 16, bf16, row-major) . b (16 x 8, bf16,
// column-major), one warp, PTX's m16n8k16 fragments: with g = lane / 4 and
// t = lane % 4, a holds rows g and g + 8 at columns 2t, 2t + 1 (a[0], a[1])
// and 2t + 8, 2t + 9 (a[2], a[3]); b holds column g at rows 2t, 2t + 1 and
// 2t + 8, 2t + 9; d holds rows g, g + 8 at columns 2t, 2t + 1.
// (The emulator supplies its own, emulator/emu.h.)
__device__ void mma_bf16_16816(float* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// c (m, n) = a (m, k) . w (n, k)^T, or c += that when `accumulate` (the
// residual add: c + sum, as the CPU adds a finished product). `a` is f32
// and rounded to bf16 as it is staged; `w` is bf16; the tensor cores sum
// in f32. One block per 64 x 64 output tile, whatever m is: every output
// goes through the same MMA steps over k = 0, 16, 32, ... in order (the
// tail padded with zeros), so a row's result does not depend on how many
// rows share the launch or where it falls in a tile. A decode step's few
// rows leave most of the tile's rows empty; it is bound by reading `w`.
//
// k is summed in chunks of `k_chunk` (chosen from n, k and the device, never
// from m): each chunk's sum starts at zero, and the chunks' sums are added
// in order. Either the grid splits them (gridDim.z > 1, so that a decode's
// few column tiles still cover every SM): block z writes chunk z's sums to
// `part` (z, m, n) and `reduce_splits` adds them; or each block runs every
// chunk itself (a launch with rows enough to fill the device). Both make
// the same f32 operations in the same order, so a row's sums stay the same
// in any batch.
extern "C" __global__ void matmul_bf16(const float* __restrict__ a, const unsigned short* __restrict__ w,
                                       float* __restrict__ c, float* __restrict__ part, int m, int n, int k,
                                       int k_chunk, int accumulate) {
    __shared__ __align__(16) unsigned short as[TILE_M][TILE_STRIDE];
    __shared__ __align__(16) unsigned short ws[TILE_N][TILE_STRIDE];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int g = lane / 4, t = lane % 4;
    const int wm = warp % 4 * 16;  // the warp's rows in the tile: wm .. wm + 15
    const int wn = warp / 4 * 32;  // its columns: wn .. wn + 31, four MMA tiles of 8
    const int m0 = blockIdx.y * TILE_M;
    const int n0 = blockIdx.x * TILE_N;
    const int split = gridDim.z > 1;
    const int z_first = split ? blockIdx.z : 0;
    const int z_last = split ? blockIdx.z + 1 : (k + k_chunk - 1) / k_chunk;
    float total[4][4];
    for (int z = z_first; z < max(z_last, z_first + 1); ++z) {
        float acc[4][4];
        for (int j = 0; j < 4; ++j)
            for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
        const int k_begin = z * k_chunk;
        const int k_end = min(k, k_begin + k_chunk);
        for (int k0 = k_begin; k0 < k_end; k0 += TILE_K) {
            for (int e = tid; e < TILE_M * TILE_K; e += GEMM_THREADS) {
                const int r = e / TILE_K, kk = e % TILE_K;
                const int gk = k0 + kk;
                const int gr = m0 + r, gn = n0 + r;
                as[r][kk] = (gr < m && gk < k_end) ? bf16_bits(a[(size_t)gr * k + gk]) : (unsigned short)0;
                ws[r][kk] = (gn < n && gk < k_end) ? w[(size_t)gn * k + gk] : (unsigned short)0;
            }
            __syncthreads();
            for (int ks = 0; ks < TILE_K; ks += 16) {
                const unsigned af[4] = {
                    bf16_pair(&as[wm + g][ks + 2 * t]),
                    bf16_pair(&as[wm + g + 8][ks + 2 * t]),
                    bf16_pair(&as[wm + g][ks + 2 * t + 8]),
                    bf16_pair(&as[wm + g + 8][ks + 2 * t + 8]),
                };
                for (int j = 0; j < 4; ++j) {
                    const unsigned short* col = ws[wn + 8 * j + g];
                    const unsigned bf[2] = {bf16_pair(col + ks + 2 * t), bf16_pair(col + ks + 2 * t + 8)};
                    mma_bf16_16816(acc[j], af, bf);
                }
            }
            __syncthreads();
        }
        for (int j = 0; j < 4; ++j)
            for (int i = 0; i < 4; ++i) total[j][i] = z == z_first ? acc[j][i] : total[j][i] + acc[j][i];
    }
    for (int j = 0; j < 4; ++j) {
        for (int i = 0; i < 4; ++i) {
            const int r = m0 + wm + g + 8 * (i / 2);
            const int col = n0 + wn + 8 * j + 2 * t + i % 2;
            if (r >= m || col >= n) continue;
            if (split) {
                part[((size_t)blockIdx.z * m + r) * n + col] = total[j][i];
            } else {
                float* out = c + (size_t)r * n + col;
                *out = accumulate ? *out + total[j][i] : total[j][i];
            }
        }
    }
}

// c = the sum of `splits` partial products (splits, len), added in split
// order, or c += that sum when `accumulate`. One thread per element.
extern "C" __global__ void reduce_splits(const float* __restrict__ part, float* __restrict__ c, int len,
                                         int splits, int accumulate) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float s = part[i];
    for (int z = 1; z < splits; ++z) s += part[(size_t)z * len + i];
    c[i] = accumulate ? c[i] + s : s;
}

// Synthetic weights (`bench forward --synthetic`: a model's shapes with no
// file): out[i] = bf16 of scale * u, with u in [-1, 1) from a hash of
// (seed, i), so the values do not depend on the launch; the host computes
// the same (`cuda::synthetic::value`). A grid-stride loop covers any n.
__device__ float synthetic_unit(unsigned long long seed, unsigned long long i) {
    unsigned long long x = seed * 0x9E3779B97F4A7C15ull + i;
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return (float)(unsigned)(x >> 40) * (1.0f / 8388608.0f) - 1.0f;
}

extern "C" __global__ void fill_synthetic_bf16(unsigned short* __restrict__ out, unsigned long long n,
                                               unsigned long long seed, float scale) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = bf16_bits(scale * synthetic_unit(seed, i));
}

// Sum of `v` over the block's threads, in a fixed tree order; every thread
// gets the result. `scratch` holds ROW_THREADS floats.
__device__ float block_sum(float v, float* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) scratch[threadIdx.x] += scratch[threadIdx.x + o];
        __syncthreads();
    }
    const float total = scratch[0];
    __syncthreads();
    return total;
}

__device__ float block_max(float v, float* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) scratch[threadIdx.x] = fmaxf(scratch[threadIdx.x], scratch[threadIdx.x + o]);
        __syncthreads();
    }
    const float total = scratch[0];
    __syncthreads();
    return total;
}

// The block's largest (value, index) pair, the lower index first among
// equal values (a thread with none offers -inf at an index past every
// real one), left in scratch[0] and where[0].
__device__ void block_argmax(float value, int index, float* scratch, int* where) {
    const int tid = threadIdx.x;
    scratch[tid] = value;
    where[tid] = index;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (tid < o) {
            const float v = scratch[tid + o];
            const int i = where[tid + o];
            if (v > scratch[tid] || (v == scratch[tid] && i < where[tid])) {
                scratch[tid] = v;
                where[tid] = i;
            }
        }
        __syncthreads();
    }
}

// Greedy verification on the device, one block per logits row (vocab
// wide): ids[r] = the first index of the row's largest value (as the host's
// argmax), logprobs[r] = that value minus the row's log-sum-exp (its
// maximum plus the log of the exponentials' sum, in a fixed order).
extern "C" __global__ void greedy_rows(const float* __restrict__ logits, int vocab, int* __restrict__ ids,
                                       float* __restrict__ logprobs) {
    __shared__ float scratch[ROW_THREADS];
    __shared__ int where[ROW_THREADS];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const int tid = threadIdx.x;
    float best = -INFINITY;
    int at = vocab;  // none yet (every logit NaN or -inf)
    for (int i = tid; i < vocab; i += blockDim.x)
        if (row[i] > best || (at == vocab && row[i] == best)) {
            best = row[i];
            at = i;
        }
    block_argmax(best, at, scratch, where);
    const float top = scratch[0];
    const int arg = where[0] < vocab ? where[0] : 0;
    __syncthreads();
    float part = 0.0f;
    for (int i = tid; i < vocab; i += blockDim.x) part += expf(row[i] - top);
    const float total = block_sum(part, scratch);
    if (tid == 0) {
        ids[blockIdx.x] = arg;
        logprobs[blockIdx.x] = row[arg] - (top + logf(total));
    }
}

// Per row of logits (rows, vocab): its `m` largest values, largest first
// (of equal values the lower index first, as the host's ranking), as
// ids[r * m + j] and their logprobs; one block per row. Pick j is the
// largest (value, -index) below pick j - 1, so no list of picks is kept;
// ids of picks past the row's end are -1.
extern "C" __global__ void top_rows(const float* __restrict__ logits, int vocab, int m, int* __restrict__ ids,
                                    float* __restrict__ logprobs) {
    __shared__ float scratch[ROW_THREADS];
    __shared__ int where[ROW_THREADS];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const int tid = threadIdx.x;
    float top = -INFINITY;
    for (int i = tid; i < vocab; i += blockDim.x) top = fmaxf(top, row[i]);
    top = block_max(top, scratch);
    float part = 0.0f;
    for (int i = tid; i < vocab; i += blockDim.x) part += expf(row[i] - top);
    const float lse = top + logf(block_sum(part, scratch));
    float prev = INFINITY;
    int prev_at = -1;
    for (int j = 0; j < m; ++j) {
        float best = -INFINITY;
        int at = vocab;  // none yet
        for (int i = tid; i < vocab; i += blockDim.x) {
            const float v = row[i];
            const bool below = v < prev || (v == prev && i > prev_at);
            if (below && (v > best || (at == vocab && v == best))) {
                best = v;
                at = i;
            }
        }
        __syncthreads();
        block_argmax(best, at, scratch, where);
        prev = scratch[0];
        prev_at = where[0];
        if (tid == 0) {
            const size_t out = (size_t)blockIdx.x * m + j;
            ids[out] = prev_at < vocab ? prev_at : -1;
            logprobs[out] = prev - lse;
        }
    }
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight; one block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ weight,
                                    float* __restrict__ out, int dim, float eps) {
    __shared__ float scratch[ROW_THREADS];
    const float* row = x + (size_t)blockIdx.x * dim;
    float partial = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) partial = fmaf(row[i], row[i], partial);
    const float scale = rsqrtf(block_sum(partial, scratch) / (float)dim + eps);
    float* o = out + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = row[i] * scale * weight[i];
}

// Rotates adjacent pairs (x[2i], x[2i+1]) of every head of every token,
// x laid out (tokens, heads, 2 * half); cos/sin are (tokens, half).
extern "C" __global__ void rope(float* __restrict__ x, const float* __restrict__ cos_t,
                                const float* __restrict__ sin_t, int tokens, int heads, int half) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= tokens * heads * half) return;
    const int i = idx % half;
    const int t = idx / (heads * half);
    float* pair = x + (size_t)idx * 2;
    const float c = cos_t[t * half + i], s = sin_t[t * half + i];
    const float a = pair[0], b = pair[1];
    pair[0] = a * c - b * s;
    pair[1] = a * s + b * c;
}

// gate <- silu(gate) * up.
extern "C" __global__ void silu_mul(float* __restrict__ gate, const float* __restrict__ up, int len) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= len) return;
    const float g = gate[idx];
    gate[idx] = g / (1.0f + expf(-g)) * up[idx];
}

// out[r] = x[rows[r]], rows of `dim` floats.
extern "C" __global__ void gather_rows(const float* __restrict__ x, const int* __restrict__ rows,
                                       float* __restrict__ out, int count, int dim) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= count * dim) return;
    const int r = idx / dim, i = idx % dim;
    out[idx] = x[(size_t)rows[r] * dim + i];
}

// out[r] = table[ids[r]] widened from bf16: the token embeddings of a
// forward's new tokens, gathered on the device.
extern "C" __global__ void embed_rows(const unsigned short* __restrict__ table, const int* __restrict__ ids,
                                      float* __restrict__ out, int count, int dim) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= count * dim) return;
    const int r = idx / dim, i = idx % dim;
    out[idx] = __uint_as_float((unsigned)table[(size_t)ids[r] * dim + i] << 16);
}

// cache[slots[r]] = rows[r], rows of `dim` floats (one layer's K or V); a row
// whose slot is negative is a padding row and is written nowhere.
extern "C" __global__ void scatter_rows(float* __restrict__ cache, const float* __restrict__ rows,
                                        const int* __restrict__ slots, int count, int dim) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= count * dim) return;
    const int r = idx / dim, i = idx % dim;
    if (slots[r] < 0) return;
    cache[(size_t)slots[r] * dim + i] = rows[idx];
}

// Attention of one (query head, token) per block over the token's visible
// keys, which `keys` describes per token as 6 ints:
//   num_cached, table_offset, list_offset, list_count, run_offset, run_count
// Visible key v is, in order: the cached position v through the block table
// (tables[table_offset + v / block_size]), then lists[list_offset + ...]
// (a draft node's ancestors and the masked run tokens it sees), then
// run_slots[run_offset + ...] (a causal run's tokens up to itself).
// Keys go through an online softmax ATTN_THREADS at a time: scores, the
// chunk's maximum, one rescale, the weights, then thread d adds the
// weighted values of dimension d in key order.
extern "C" __global__ void paged_attention(const float* __restrict__ q, const float* __restrict__ kcache,
                                           const float* __restrict__ vcache, float* __restrict__ out,
                                           const int* __restrict__ keys, const int* __restrict__ tables,
                                           const int* __restrict__ lists, const int* __restrict__ run_slots,
                                           int num_heads, int num_kv_heads, int head_dim, int block_size,
                                           float scale) {
    __shared__ float qs[ATTN_THREADS];
    __shared__ float weights[ATTN_THREADS];
    __shared__ int slots[ATTN_THREADS];
    __shared__ float scratch[ATTN_THREADS];
    const int head = blockIdx.x, t = blockIdx.y, tid = threadIdx.x;
    const int* d = keys + (size_t)t * 6;
    const int num_cached = d[0], table_offset = d[1], list_offset = d[2], list_count = d[3];
    const int run_offset = d[4], run_count = d[5];
    const int total = num_cached + list_count + run_count;
    const int kv_head = head / (num_heads / num_kv_heads);
    const int kv_size = num_kv_heads * head_dim;
    const size_t row = ((size_t)t * num_heads + head) * head_dim;
    if (tid < head_dim) qs[tid] = q[row + tid];
    __syncthreads();
    float running_max = -INFINITY, denom = 0.0f, acc = 0.0f;
    for (int c0 = 0; c0 < total; c0 += ATTN_THREADS) {
        const int count = min(ATTN_THREADS, total - c0);
        float score = -INFINITY;
        if (tid < count) {
            const int v = c0 + tid;
            int slot;
            if (v < num_cached) {
                slot = tables[table_offset + v / block_size] * block_size + v % block_size;
            } else if (v < num_cached + list_count) {
                slot = lists[list_offset + v - num_cached];
            } else {
                slot = run_slots[run_offset + v - num_cached - list_count];
            }
            slots[tid] = slot;
            const float* key = kcache + (size_t)slot * kv_size + kv_head * head_dim;
            float dot = 0.0f;
            for (int i = 0; i < head_dim; ++i) dot = fmaf(qs[i], key[i], dot);
            score = dot * scale;
        }
        const float new_max = fmaxf(running_max, block_max(score, scratch));
        const float w = tid < count ? expf(score - new_max) : 0.0f;
        weights[tid] = w;
        const float chunk_sum = block_sum(w, scratch);  // also publishes weights[]
        const float rescale = expf(running_max - new_max);
        denom = denom * rescale + chunk_sum;
        if (tid < head_dim) {
            float a = acc * rescale;
            for (int j = 0; j < count; ++j)
                a = fmaf(weights[j], vcache[(size_t)slots[j] * kv_size + kv_head * head_dim + tid], a);
            acc = a;
        }
        running_max = new_max;
        __syncthreads();  // weights[] and slots[] are rewritten by the next chunk
    }
    if (tid < head_dim) out[row + tid] = total > 0 ? acc / denom : 0.0f;
}
