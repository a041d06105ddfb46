// The kernels of kernels.cu behind C entry points that take a launch's
// grid and block as three unsigned each (tests only).
#include "emu.h"
#include "../kernels.cu"

static dim3 d3(const unsigned* v) { return dim3{v[0], v[1], v[2]}; }

#define ENTRY(name, params, args)                                             \
    extern "C" void emu_##name(const unsigned* grid, const unsigned* block, \
                               EXPAND params) {                             \
        launch(d3(grid), d3(block), [=] { name args; });                    \
    }
#define EXPAND(...) __VA_ARGS__

ENTRY(matmul_bf16,
      (const float* a, const unsigned short* w, float* c, float* part, int m, int n, int k, int k_chunk, int acc),
      (a, w, c, part, m, n, k, k_chunk, acc))
ENTRY(reduce_splits, (const float* part, float* c, int len, int splits, int acc), (part, c, len, splits, acc))
ENTRY(rms_norm, (const float* x, const float* w, float* out, int dim, float eps), (x, w, out, dim, eps))
ENTRY(rope, (float* x, const float* c, const float* s, int tokens, int heads, int half),
      (x, c, s, tokens, heads, half))
ENTRY(silu_mul, (float* gate, const float* up, int len), (gate, up, len))
ENTRY(gather_rows, (const float* x, const int* rows, float* out, int count, int dim), (x, rows, out, count, dim))
ENTRY(scatter_rows, (float* cache, const float* rows, const int* slots, int count, int dim),
      (cache, rows, slots, count, dim))
ENTRY(paged_attention,
      (const float* q, const float* k, const float* v, float* out, const int* keys, const int* tables,
       const int* lists, const int* run_slots, int heads, int kv_heads, int head_dim, int block_size, float scale),
      (q, k, v, out, keys, tables, lists, run_slots, heads, kv_heads, head_dim, block_size, scale))
ENTRY(fill_synthetic_bf16, (unsigned short* out, unsigned long long n, unsigned long long seed, float scale),
      (out, n, seed, scale))
ENTRY(embed_rows, (const unsigned short* table, const int* ids, float* out, int count, int dim),
      (table, ids, out, count, dim))
ENTRY(greedy_rows, (const float* logits, int vocab, int* ids, float* logprobs), (logits, vocab, ids, logprobs))
ENTRY(top_rows, (const float* logits, int vocab, int m, int* ids, float* logprobs),
      (logits, vocab, m, ids, logprobs))
