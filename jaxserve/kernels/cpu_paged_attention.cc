// Ragged paged attention (decode tokens and prompt chunks in one step) for XLA:CPU, through the
// XLA FFI (jax.ffi).
//
// Why a kernel: XLA:CPU lowers a gather to a loop over output elements that redoes the index
// arithmetic for every element, so gathering a request's pages alone ran 3-12x above the copy
// bandwidth's floor (docs/performance.md), and the jnp path's prefill, with its per-chunk
// gathers and selects, ran ~48x above its FLOP floor (benchmarks/decode_profile.py --prompt).
// This reads each page where it lies, in the cache's own layout [P, S, K, E], and does the
// online softmax as it goes.
//
// One call: the step's T tokens in query blocks (AttentionMetadata, kernels/metadata.py).
//   q            [T, H, E] f32   queries; head h = k * G + g (G = H / K)
//   k_cache      [P, S, K, E]    f32, or bfloat16 stored as its uint16 bits (kernels/storage.py)
//   v_cache      [P, S, K, E]    same dtype as k_cache
//   k_new        [T, K, E] f32   this step's keys and values (not yet in the cache)
//   v_new        [T, K, E] f32
//   table        [R, W] s32      each request's pages, in order
//   block_request, block_start, block_len  [N] s32: each query block's request, first token
//                                and tokens (0: a padding block)
//   kv_lens      [R] s32         each request's positions after this step
//   query_start  [R + 1] s32     each request's first token on T (a token's position: its
//                                request's cached slots before the step + its index among them)
//   attrs        sm_scale, soft_cap (0: none), window (0: none)
//   out          [T, H, E] f32   (zeros for padding tokens)
// Work items are query blocks (or, when there are few, (block, KV head) pairs), spread over
// XLA's intra-op thread pool; the calling thread takes items too, so the call finishes even
// when the pool has no free thread. Each item walks its request's pages in order, prefetching
// pages ahead (the pages lie anywhere in the pool, which the hardware prefetcher cannot
// guess), and per page, KV head and token computes its G heads' scores, one rescale, then the
// weighted values, in vectors of 8 floats, or 16 where AVX-512 has them (GCC vector
// extensions: AVX2 or AVX-512 under -march=native). A token's arithmetic is the same whatever
// the rest of its step holds (see Attend), so the synchronous and overlapped engines, and any
// chunking of a prompt, agree to the bit.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"

namespace ffi = xla::ffi;

namespace {

using jaxserve::kLanes;
using jaxserve::Load8;
using jaxserve::RoundToBf16;
using jaxserve::Splat;
using jaxserve::Store8;
using jaxserve::V8;
constexpr int64_t kMaxPage = 64;  // page sizes up to this (scratch sizes)
constexpr int64_t kMaxDim = 256;  // head dims up to this, a multiple of kLanes
constexpr int64_t kMaxGroup = 16;  // query heads per KV head up to this
// Pages prefetched ahead of the one being read, a row for each row read (DotRows). Measured
// on one thread, batch 32 with 1024 cached tokens (50 MB of float32 K/V, Zen 3): no prefetch
// 10.4-11.3 ms; a whole page at a time, 2 pages ahead, 9.7 ms (the burst stalls the loads);
// row by row 7.6-8.3 ms at 1, 2 or 4 pages ahead (2 kept), 8.4-10 at 3 or 6. The same bytes
// ahead for bf16, 4 pages (2 Zen 5 cores, benchmarks/decode_attention.py, batch 32, 1024
// tokens: 2.0 ms against 2.3-2.8 at 2 pages; float32 even at 2 and 4).
template <typename T>
constexpr int64_t kAhead = 8 / sizeof(T);

inline V8 Max(V8 a, V8 b) { return a > b ? a : b; }
// Within each 128-bit half: [a0+a1, a2+a3, b0+b1, b2+b3] (x86's hadd).
inline V8 PairSums(V8 a, V8 b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
// The sums of 8 vectors, as the 8 lanes of one (a transposing reduction: 21 operations
// instead of 8 horizontal sums of ~10 each).
inline V8 Sums8(const V8* d) {
  const V8 h0 = PairSums(PairSums(d[0], d[1]), PairSums(d[2], d[3]));
  const V8 h1 = PairSums(PairSums(d[4], d[5]), PairSums(d[6], d[7]));
  return __builtin_shufflevector(h0, h1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(h0, h1, 4, 5, 6, 7, 12, 13, 14, 15);
}
inline float Sum8(V8 v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}
inline float Max8(V8 v) {
  v = Max(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = Max(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  v = Max(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
  return v[0];
}

struct Problem {
  const float* q;
  const void* k_cache;
  const void* v_cache;
  const float* k_new;
  const float* v_new;
  const int32_t* table;
  const int32_t* block_request;
  const int32_t* block_start;
  const int32_t* block_len;
  const int32_t* kv_lens;
  const int32_t* query_start;
  float* out;
  int64_t num_pages, page_size, kv_heads, head_dim, group, table_width, num_tokens, num_requests;
  float sm_scale, soft_cap;
  int64_t window;
};

// Softmax state of one query head: running max, running sum, weighted values (E floats).
struct Head {
  float m, l;
  alignas(32) float acc[kMaxDim];
};

inline float Capped(const Problem& p, float dot) {
  const float s = dot * p.sm_scale;
  return p.soft_cap > 0 ? p.soft_cap * std::tanh(s / p.soft_cap) : s;
}

template <typename T>
void Prefetch(const Problem& p, const T* cache, int64_t page, int64_t k0, int64_t k1) {
  const int64_t S = p.page_size, K = p.kv_heads, E = p.head_dim;
  const int64_t bytes = (k1 - k0) * E * int64_t(sizeof(T));
  for (int64_t j = 0; j < S; ++j) {
    const char* row = reinterpret_cast<const char*>(cache + ((page * S + j) * K + k0) * E);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
  }
}

// Scores of GB query heads (GB fixed: the accumulators stay in registers) against the key
// rows, left as 8-lane partial sums: dots[g][j] (reduced 8 rows at a time by Sums8). Under
// AVX-512 (head dims a multiple of 16) the products run 16 floats a step and fold to 8 lanes
// at the end of a row: 10-25% off the kernel (2026-12-03, docs/kernels.md).
// ahead_k, ahead_v: the same head's rows of a page read later, prefetched a row per row read
// (or null): a steady trickle the load unit absorbs, where a page's worth at once stalled it.
template <int GB, int NV, typename T>
inline void DotRows(const T* key, int64_t stride, int64_t count, const float* q, int64_t runtime_nv,
                    V8 (*dots)[kMaxPage], const T* ahead_k, const T* ahead_v) {
  const int64_t nv = NV > 0 ? NV : runtime_nv;  // a fixed NV unrolls the loop over E
  for (int64_t j = 0; j < count; ++j, key += stride) {
    if (ahead_k != nullptr) {
      const char* ak = reinterpret_cast<const char*>(ahead_k + j * stride);
      const char* av = reinterpret_cast<const char*>(ahead_v + j * stride);
      for (int64_t b = 0; b < nv * kLanes * int64_t(sizeof(T)); b += 64) {
        __builtin_prefetch(ak + b, 0, 3);
        __builtin_prefetch(av + b, 0, 3);
      }
    }
#if defined(__AVX512F__)
    if (nv % 2 == 0) {  // 16 floats a step (lane l sums dims l + 16 i), folded to 8 lanes
      jaxserve::VW wide[GB] = {};
      for (int64_t i = 0; i < nv; i += 2) {
        const jaxserve::VW kv = jaxserve::LoadW(key + i * kLanes);
        for (int g = 0; g < GB; ++g) wide[g] += jaxserve::LoadW(q + (g * nv + i) * kLanes) * kv;
      }
      for (int g = 0; g < GB; ++g) {
        dots[g][j] = __builtin_shufflevector(wide[g], wide[g], 0, 1, 2, 3, 4, 5, 6, 7) +
                     __builtin_shufflevector(wide[g], wide[g], 8, 9, 10, 11, 12, 13, 14, 15);
      }
      continue;
    }
#endif
    V8 dot[GB] = {};
    for (int64_t i = 0; i < nv; ++i) {
      const V8 kv = Load8(key + i * kLanes);
      for (int g = 0; g < GB; ++g) dot[g] += Load8(q + (g * nv + i) * kLanes) * kv;
    }
    for (int g = 0; g < GB; ++g) dots[g][j] = dot[g];
  }
}

// acc[g] += sum_j w[g][j] value_j for GB heads over W vectors of E (both fixed: GB * W sums in
// registers, each value vector loaded, and converted, once for all GB heads).
template <int GB, int W, typename T>
inline void WeightRows(const T* value, int64_t stride, int64_t count, float (*w)[kMaxPage],
                       Head* state, int64_t offset) {
  V8 a[GB][W];
  for (int g = 0; g < GB; ++g) {
    for (int i = 0; i < W; ++i) a[g][i] = Load8(state[g].acc + offset + i * kLanes);
  }
  for (int64_t j = 0; j < count; ++j, value += stride) {
    V8 v[W];
    for (int i = 0; i < W; ++i) v[i] = Load8(value + i * kLanes);
    for (int g = 0; g < GB; ++g) {
      const V8 wj = Splat(w[g][j]);
      for (int i = 0; i < W; ++i) a[g][i] += wj * v[i];
    }
  }
  for (int g = 0; g < GB; ++g) {
    for (int i = 0; i < W; ++i) Store8(state[g].acc + offset + i * kLanes, a[g][i]);
  }
}

#if defined(__AVX512F__)
// WeightRows over W vectors of 16 floats: each element's sum is the same sequence of FMAs as
// with 8, so the same bits.
template <int GB, int W, typename T>
inline void WeightRowsWide(const T* value, int64_t stride, int64_t count, float (*w)[kMaxPage],
                           Head* state, int64_t offset) {
  using jaxserve::VW;
  VW a[GB][W];
  for (int g = 0; g < GB; ++g) {
    for (int i = 0; i < W; ++i) a[g][i] = jaxserve::LoadW(state[g].acc + offset + i * 16);
  }
  for (int64_t j = 0; j < count; ++j, value += stride) {
    VW v[W];
    for (int i = 0; i < W; ++i) v[i] = jaxserve::LoadW(value + i * 16);
    for (int g = 0; g < GB; ++g) {
      const VW wj = jaxserve::SplatW(w[g][j]);
      for (int i = 0; i < W; ++i) a[g][i] += wj * v[i];
    }
  }
  for (int g = 0; g < GB; ++g) {
    for (int i = 0; i < W; ++i) jaxserve::StoreW(state[g].acc + offset + i * 16, a[g][i]);
  }
}
#endif

template <int GB, typename T>
inline void WeightAll(const T* value, int64_t stride, int64_t count, float (*w)[kMaxPage],
                      Head* state, int64_t nv) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 8 <= nv; i += 8) {
    WeightRowsWide<GB, 4>(value + i * kLanes, stride, count, w, state, i * kLanes);
  }
  for (; i + 2 <= nv; i += 2) {
    WeightRowsWide<GB, 1>(value + i * kLanes, stride, count, w, state, i * kLanes);
  }
#endif
  for (; i + 4 <= nv; i += 4) WeightRows<GB, 4>(value + i * kLanes, stride, count, w, state, i * kLanes);
  for (; i < nv; ++i) WeightRows<GB, 1>(value + i * kLanes, stride, count, w, state, i * kLanes);
}

// `count` consecutive positions of one page (key, value: their first row of KV head k, rows
// `stride` elements apart) for the G query heads of one token (q: [G, E] floats, state: G
// heads): the scores (up to 4 heads per pass over the key rows), one rescale of each head's
// state, then the weighted values (up to 3 heads per pass over the value rows). ahead_k,
// ahead_v: rows of a page to prefetch meanwhile (or null).
template <typename T>
void Page(const Problem& p, const T* key, const T* value, int64_t stride, int64_t count,
          const float* q, Head* state, const T* ahead_k, const T* ahead_v) {
  const int64_t E = p.head_dim, G = p.group, nv = E / kLanes;
  const int64_t padded = (count + kLanes - 1) / kLanes * kLanes;
  alignas(32) V8 dots[kMaxGroup][kMaxPage];
  alignas(32) float s[kMaxGroup][kMaxPage];
  for (int64_t g = 0; g < G; g += 4) {
    const float* qg = q + g * E;
    const int64_t gb = std::min<int64_t>(4, G - g);
    const T* ak = g == 0 ? ahead_k : nullptr;
    const T* av = g == 0 ? ahead_v : nullptr;
    if (nv == 8) {  // head dim 64
      switch (gb) {
        case 4: DotRows<4, 8>(key, stride, count, qg, nv, dots + g, ak, av); break;
        case 3: DotRows<3, 8>(key, stride, count, qg, nv, dots + g, ak, av); break;
        case 2: DotRows<2, 8>(key, stride, count, qg, nv, dots + g, ak, av); break;
        default: DotRows<1, 8>(key, stride, count, qg, nv, dots + g, ak, av); break;
      }
    } else if (nv == 16) {  // head dim 128
      switch (gb) {
        case 4: DotRows<4, 16>(key, stride, count, qg, nv, dots + g, ak, av); break;
        case 3: DotRows<3, 16>(key, stride, count, qg, nv, dots + g, ak, av); break;
        case 2: DotRows<2, 16>(key, stride, count, qg, nv, dots + g, ak, av); break;
        default: DotRows<1, 16>(key, stride, count, qg, nv, dots + g, ak, av); break;
      }
    } else {
      switch (gb) {
        case 4: DotRows<4, 0>(key, stride, count, qg, nv, dots + g, ak, av); break;
        case 3: DotRows<3, 0>(key, stride, count, qg, nv, dots + g, ak, av); break;
        case 2: DotRows<2, 0>(key, stride, count, qg, nv, dots + g, ak, av); break;
        default: DotRows<1, 0>(key, stride, count, qg, nv, dots + g, ak, av); break;
      }
    }
  }
  const V8 scale = Splat(p.sm_scale), minus_inf = Splat(-INFINITY);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t j = count; j < padded; ++j) dots[g][j] = V8{};
    V8 mx = Splat(state[g].m);
    for (int64_t j = 0; j < padded; j += kLanes) {
      V8 x = Sums8(&dots[g][j]) * scale;
      if (p.soft_cap > 0) {
        for (int i = 0; i < kLanes; ++i) x[i] = p.soft_cap * std::tanh(x[i] / p.soft_cap);
      }
      const V8 lane = Splat(float(j)) + V8{0, 1, 2, 3, 4, 5, 6, 7};
      x = lane < Splat(float(count)) ? x : minus_inf;  // past the page's slots: weight 0
      Store8(&s[g][j], x);
      mx = Max(mx, x);
    }
    const float m = Max8(mx);
    V8 sum{};
    for (int64_t j = 0; j < padded; j += kLanes) {
      const V8 w = jaxserve::Exp(Load8(&s[g][j]) - m);
      // A bf16 cache weighs its values by probabilities rounded to bf16, as the jnp path and
      // the Pallas kernels do (p cast to V's dtype for the PV product); the sum keeps float32.
      Store8(&s[g][j], std::is_same_v<T, uint16_t> ? RoundToBf16(w) : w);
      sum += w;
    }
    if (m > state[g].m) {
      const float correction = jaxserve::Exp(Splat(state[g].m - m))[0];
      state[g].l *= correction;
      const V8 c = Splat(correction);
      for (int64_t i = 0; i < nv; ++i) Store8(state[g].acc + i * kLanes, Load8(state[g].acc + i * kLanes) * c);
      state[g].m = m;
    }
    // (each lane past the slots adds e^-87 ~ 2e-38 to a sum that is >= 1: nothing)
    state[g].l += Sum8(sum);
  }
  for (int64_t g = 0; g < G; g += 3) {
    switch (std::min<int64_t>(3, G - g)) {
      case 3: WeightAll<3>(value, stride, count, s + g, state + g, nv); break;
      case 2: WeightAll<2>(value, stride, count, s + g, state + g, nv); break;
      default: WeightAll<1>(value, stride, count, s + g, state + g, nv); break;
    }
  }
}

inline void ToStorage(const float* x, int64_t n, float* out) { std::memcpy(out, x, n * sizeof(float)); }
inline void ToStorage(const float* x, int64_t n, uint16_t* out) {  // to bf16, ties to even
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    out[i] = uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  }
}

// One work item: query block b (consecutive tokens of one request), KV heads [k0, k1).
// Every token runs the same sequence whatever else the step holds, so a token's result does
// not depend on how its prompt was chunked or what it was batched with: its own key first,
// then positions [begin, position) page by page, each page's slots in one pass (Page). A
// page's slots come from the cache where cached before this step, else (this step's earlier
// tokens of the request) from k_new / v_new, copied into a page-shaped scratch in the cache's
// dtype, so those pages too are read in one pass. The block's tokens share each page while
// it is in cache; the first kAhead pages are prefetched at once, the later ones row by row as
// earlier ones are read.
template <typename T>
void Attend(const Problem& p, int64_t b, int64_t k0, int64_t k1, Head* heads, T* scratch) {
  const int64_t S = p.page_size, K = p.kv_heads, E = p.head_dim, G = p.group, nv = E / kLanes;
  const int64_t H = K * G, nk = k1 - k0;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const int64_t r = std::clamp<int64_t>(p.block_request[b], 0, p.num_requests - 1);
  const int64_t t0 = p.block_start[b];
  const int64_t len = std::min<int64_t>(p.block_len[b], p.num_tokens - t0);
  const int32_t* pages = p.table + r * p.table_width;
  const int64_t q_start = p.query_start[r];
  const int64_t cached = p.kv_lens[r] - (p.query_start[r + 1] - q_start);  // before this step
  auto page_at = [&](int64_t index) {  // clamped: a bad table reads a wrong page, never faults
    return std::clamp<int64_t>(pages[std::min(index, p.table_width - 1)], 0, p.num_pages - 1);
  };
  auto new_row = [&](int64_t pos) {  // this step's token at position pos (>= cached) on T
    return std::clamp<int64_t>(q_start + pos - cached, 0, p.num_tokens - 1);
  };
  auto begin_of = [&](int64_t pos) {
    return p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
  };
  // A token's position counts its request's slots (the page table's, which sparse attention
  // compacts: kernels/sparse.py); padding blocks never get here.
  auto position = [&](int64_t t) { return cached + (t - q_start); };
  const int64_t lo_pos = begin_of(position(t0));  // positions [lo_pos, hi_pos) the block reads
  const int64_t hi_pos = position(t0 + len - 1);
  const int64_t first = lo_pos / S, last = (hi_pos + S - 1) / S;  // pages [first, last)
  auto is_cached = [&](int64_t i) { return std::min((i + 1) * S, hi_pos) <= cached; };
  for (int64_t i = first; i < std::min(first + kAhead<T>, last); ++i) {
    if (!is_cached(i)) break;
    Prefetch(p, kc, page_at(i), k0, k1);
    Prefetch(p, vc, page_at(i), k0, k1);
  }
  for (int64_t t = 0; t < len; ++t) {  // the token attending to itself starts each head
    for (int64_t k = k0; k < k1; ++k) {
      Head* state = heads + (t * nk + k - k0) * G;
      const float* own_k = p.k_new + ((t0 + t) * K + k) * E;
      const float* own_v = p.v_new + ((t0 + t) * K + k) * E;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = p.q + ((t0 + t) * H + k * G + g) * E;
        V8 dot{};
        for (int64_t i = 0; i < nv; ++i) dot += Load8(qg + i * kLanes) * Load8(own_k + i * kLanes);
        state[g].m = Capped(p, Sum8(dot));
        state[g].l = 1;
        std::memcpy(state[g].acc, own_v, E * sizeof(float));
      }
    }
  }
  T* sk = scratch;
  T* sv = scratch + S * E;
  for (int64_t i = first; i < last; ++i) {
    const bool from_cache = is_cached(i);
    const int64_t ahead_index = i + kAhead<T>;
    const int64_t ahead = ahead_index < last && is_cached(ahead_index) ? page_at(ahead_index) : -1;
    for (int64_t k = k0; k < k1; ++k) {
      const T* key = kc + (page_at(i) * S * K + k) * E;
      const T* value = vc + (page_at(i) * S * K + k) * E;
      int64_t stride = K * E;
      if (!from_cache) {  // slots before `cached` from the cache, later ones from this step
        for (int64_t j = 0; j < S && i * S + j < hi_pos; ++j) {
          const int64_t pos = i * S + j;
          if (pos < cached) {
            std::memcpy(sk + j * E, key + j * stride, E * sizeof(T));
            std::memcpy(sv + j * E, value + j * stride, E * sizeof(T));
          } else {
            ToStorage(p.k_new + (new_row(pos) * K + k) * E, E, sk + j * E);
            ToStorage(p.v_new + (new_row(pos) * K + k) * E, E, sv + j * E);
          }
        }
        key = sk;
        value = sv;
        stride = E;
      }
      const T* ak = ahead >= 0 ? kc + (ahead * S * K + k) * E : nullptr;
      const T* av = ahead >= 0 ? vc + (ahead * S * K + k) * E : nullptr;
      for (int64_t t = 0; t < len; ++t) {
        const int64_t pos = position(t0 + t);
        const int64_t lo = std::max(begin_of(pos), i * S), hi = std::min(pos, (i + 1) * S);
        if (hi <= lo) continue;
        Page(p, key + (lo - i * S) * stride, value + (lo - i * S) * stride, stride, hi - lo,
             p.q + ((t0 + t) * H + k * G) * E, heads + (t * nk + k - k0) * G, ak, av);
        ak = av = nullptr;  // the first token's pass prefetches the page ahead
      }
    }
  }
  for (int64_t t = 0; t < len; ++t) {
    for (int64_t k = k0; k < k1; ++k) {
      const Head* state = heads + (t * nk + k - k0) * G;
      for (int64_t g = 0; g < G; ++g) {
        float* out = p.out + ((t0 + t) * H + k * G + g) * E;
        const V8 inv = Splat(1.0f / state[g].l);
        for (int64_t i = 0; i < nv; ++i) Store8(out + i * kLanes, Load8(state[g].acc + i * kLanes) * inv);
      }
    }
  }
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                              ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                              ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> block_request,
                              ffi::Buffer<ffi::S32> block_start, ffi::Buffer<ffi::S32> block_len,
                              ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> query_start,
                              float sm_scale, float soft_cap,
                              int64_t window, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), cd = k_cache.dimensions(), td = table.dimensions();
  if (qd.size() != 3 || cd.size() != 4 || td.size() != 2) {
    return ffi::Error::InvalidArgument("paged_attention: q [T, H, E], caches [P, S, K, E], "
                                       "table [R, W] expected");
  }
  const auto dtype = k_cache.element_type();
  if (v_cache.element_type() != dtype ||
      (dtype != ffi::DataType::F32 && dtype != ffi::DataType::U16)) {
    return ffi::Error::InvalidArgument("paged_attention: caches must both be f32 or u16 (bf16 bits)");
  }
  const int64_t t = qd[0], h = qd[1], e = qd[2], kh = cd[2], r = td[0];
  const int64_t n = block_request.element_count();
  if (cd[3] != e || kh == 0 || h % kh != 0 || kv_lens.element_count() != r ||
      query_start.element_count() != r + 1 ||
      block_start.element_count() != n || block_len.element_count() != n || r == 0) {
    return ffi::Error::InvalidArgument("paged_attention: mismatched shapes");
  }
  if (e % kLanes != 0 || e > kMaxDim || cd[1] > kMaxPage || h / kh > kMaxGroup) {
    return ffi::Error::InvalidArgument("paged_attention: head dim must be a multiple of 8 up "
                                       "to 256, pages up to 64 slots, groups up to 16 heads");
  }
  const Problem p{q.typed_data(), k_cache.untyped_data(), v_cache.untyped_data(),
                  k_new.typed_data(), v_new.typed_data(), table.typed_data(),
                  block_request.typed_data(), block_start.typed_data(), block_len.typed_data(),
                  kv_lens.typed_data(), query_start.typed_data(),
                  out->typed_data(), cd[0], cd[1], kh, e, h / kh, td[1], t, r,
                  sm_scale, soft_cap, window};
  // Tokens no block covers (the bucket's padding, after the last request's) get zeros.
  const int64_t used = std::clamp<int64_t>(p.query_start[r], 0, t);
  std::memset(p.out + used * h * e, 0, (t - used) * h * e * sizeof(float));
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Whole blocks (each page read front to back) when there are enough of them to share out;
  // (block, KV head) pairs for few blocks.
  const int64_t per = n < 4 * threads ? 1 : kh;
  const bool bits = dtype == ffi::DataType::U16;
  // Helpers only for enough work to share: waking a pool thread costs more than reading a few
  // hundred KB (one request of 256 positions, SmolLM2's shape: 0.13 ms a layer with a helper).
  // A block's work is its context's bytes once per token.
  int64_t work = 0, max_len = 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = std::clamp<int64_t>(p.block_len[i], 0, t);
    max_len = std::max(max_len, len);
    if (len > 0) work += len * std::clamp<int64_t>(p.kv_lens[std::clamp<int64_t>(p.block_request[i], 0, r - 1)], 0, INT32_MAX);
  }
  work *= 2 * kh * e * (bits ? 2 : 4);
  const int64_t workers = std::clamp<int64_t>(work / jaxserve::kBytesPerWorker, 1, threads);
  jaxserve::ParallelFor(pool, n * (kh / per), workers, [&](int64_t i) {
    thread_local std::vector<Head> heads;
    thread_local std::vector<float> scratch;  // a page of K and of V of one KV head
    heads.resize(max_len * per * p.group);
    scratch.resize(2 * p.page_size * e);
    const int64_t block = i / (kh / per), k0 = i % (kh / per) * per;
    if (p.block_len[block] <= 0 || p.block_start[block] < 0 || p.block_start[block] >= t) return;
    if (bits) {
      Attend<uint16_t>(p, block, k0, k0 + per, heads.data(),
                       reinterpret_cast<uint16_t*>(scratch.data()));
    } else {
      Attend<float>(p, block, k0, k0 + per, heads.data(), scratch.data());
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k_cache
                                  .Arg<ffi::AnyBuffer>()  // v_cache
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_new
                                  .Arg<ffi::Buffer<ffi::S32>>()  // table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_request
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_len
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // query_start
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
