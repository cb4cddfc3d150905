// The model's projections at decode sizes, for XLA:CPU through the XLA FFI (jax.ffi):
//
//   jaxserve_matmul       y [M, N] f32 = x [M, K] . w [K, N]     x, w float32 or bfloat16
//   jaxserve_matmul_rows  y [M, N] f32 = x [M, K] . w [N, K]^T   both bfloat16 (a tied head)
//
// with w in the model's own layout (llama.py's einsums all contract x's trailing axes with w's
// leading ones, so every projection is the first after free reshapes; a tied head reads the
// embedding table [V, D] as stored). bf16 arrays come as bf16 and are read as their bits: a
// bitcast to uint16 in the program is a copy of the whole weight on XLA:CPU.
//
// Why a kernel: XLA:CPU's dot runs decode's few-row projections well below the machine
// (docs/performance.md): at 1-4 rows it converts whole bf16 weights to float32 first, and on
// AVX2 its 32-row dots took 2.4-2.8x the time of one large matmul at the same FLOP rate. Two
// regimes:
//
// - M <= kStreamRows (batch-1 to 4 decode): bound by reading W. W is split by rows of K into one
//   contiguous stretch per worker, read front to back (the hardware prefetchers' best case);
//   each stretch adds x[:, k] * W[k, :] into a partial y of its own, kept in L1/L2, and the
//   partials are summed at the end in a fixed order (the result does not depend on which
//   thread took which stretch).
// - larger M: bound by FMAs. Column blocks of whole strips go to the workers; each packs a
//   slice of rows of its block into a panel that fits L2 (converting bf16 once), and runs
//   register tiles over every row of x: 8 rows x 48 columns under AVX-512 (24 accumulators of
//   the 32 registers), 4 x 24 on AVX2 (12 of 16).
//
// bf16 x with bf16 w, where the CPU has AVX512_BF16, runs both regimes on VDPBF16PS (two
// products of bf16 pairs per float lane, twice the FMA rate) over (k, k + 1) pairs of rows: see
// MatmulDot. Measured on 2 Zen 3 cores (AVX2) and 2 Zen 5 cores (AVX-512, AVX512_BF16):
// docs/performance.md.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "cpu_simd.h"

namespace ffi = xla::ffi;

namespace {

using V = jaxserve::VW;  // 16 floats under AVX-512, else 8
constexpr int64_t kLanes = jaxserve::kWideLanes;
inline V Load(const float* p) { return jaxserve::LoadW(p); }
inline V Load(const uint16_t* p) { return jaxserve::LoadW(p); }
inline V Splat(float x) { return jaxserve::SplatW(x); }
inline void Store(float* p, V v) { jaxserve::StoreW(p, v); }

constexpr int64_t kStreamRows = 4;  // M up to this streams W; above it, packed tiles
// Register tile: kMR rows x kNV vectors: kMR x kNV accumulators + kNV loads + a broadcast in
// registers (AVX-512 has 32, AVX2 16).
constexpr int64_t kMR = kLanes == 16 ? 8 : 4;
constexpr int64_t kNV = 3;
constexpr int64_t kNR = kNV * kLanes;  // a strip: 48 columns (AVX-512) or 24
constexpr int64_t kMaxBlock = 384;  // columns per work item, at most (when there are enough)
// Rows of K summed as one chain (a panel's depth): both regimes add x[m, k] w[k, n] over each
// chunk in k order from zero, then the chunks' sums in chunk order, so a row's result is the
// same bits whatever M, the regime and the threads (a request's numbers do not depend on the
// batch it shares).
constexpr int64_t kChunk = 128;

int64_t Workers(ffi::ThreadPool& pool, int64_t weight_bytes) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::clamp<int64_t>(weight_bytes / jaxserve::kBytesPerWorker, 1, threads);
}

// parts[c - c0] [MR, N] = the sum over chunk c of x[:, k] w[k, :], for chunks [c0, c1): RK
// rows of w at a time, each read once, front to back; FMAs in k order from zero per chunk.
template <int MR, typename T>
void StreamChunks(const float* x, int64_t K, const T* w, int64_t N, int64_t c0, int64_t c1,
                  float* parts) {
  constexpr int RK = MR <= 2 ? 4 : 2;  // broadcasts RK x MR + RK rows + 1 sum: in registers
  for (int64_t c = c0; c < c1; ++c) {
    float* part = parts + (c - c0) * MR * N;
    std::fill(part, part + MR * N, 0.0f);
    const int64_t end = std::min(K, (c + 1) * kChunk);
    int64_t k = c * kChunk;
    for (; k + RK <= end; k += RK) {
      V xs[RK][MR];
      for (int kk = 0; kk < RK; ++kk) {
        for (int m = 0; m < MR; ++m) xs[kk][m] = Splat(x[m * K + k + kk]);
      }
      const T* row = w + k * N;
      for (int64_t n = 0; n < N; n += kLanes) {
        V v[RK];
        for (int kk = 0; kk < RK; ++kk) v[kk] = Load(row + kk * N + n);
        for (int m = 0; m < MR; ++m) {
          V a = Load(part + m * N + n);
          for (int kk = 0; kk < RK; ++kk) a += xs[kk][m] * v[kk];
          Store(part + m * N + n, a);
        }
      }
    }
    for (; k < end; ++k) {
      V xs[MR];
      for (int m = 0; m < MR; ++m) xs[m] = Splat(x[m * K + k]);
      const T* row = w + k * N;
      for (int64_t n = 0; n < N; n += kLanes) {
        const V v = Load(row + n);
        for (int m = 0; m < MR; ++m) Store(part + m * N + n, Load(part + m * N + n) + xs[m] * v);
      }
    }
  }
}

// The streamed regime's frame: chunks_fn(c0, c1, parts) writes chunks [c0, c1)'s partial y
// [M, N] each, one contiguous stretch of chunks per worker; then y = the partials summed in
// chunk order.
template <typename ChunksFn>
void Stream(ffi::ThreadPool& pool, int64_t M, int64_t K, int64_t N, int64_t weight_bytes,
            float* y, const ChunksFn& chunks_fn) {
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  const int64_t stretches = std::min(chunks, Workers(pool, weight_bytes));
  std::vector<float> parts(chunks * M * N);
  jaxserve::ParallelFor(pool, stretches, stretches, [&](int64_t i) {
    const int64_t c0 = chunks * i / stretches, c1 = chunks * (i + 1) / stretches;
    chunks_fn(c0, c1, parts.data() + c0 * M * N);
  }, /*warm=*/true);
  for (int64_t i = 0; i < M * N; i += kLanes) {
    V sum = Load(parts.data() + i);
    for (int64_t c = 1; c < chunks; ++c) sum += Load(parts.data() + c * M * N + i);
    Store(y + i, sum);
  }
}

template <typename T>
void Stream(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, const T* w, int64_t N,
            float* y) {
  Stream(pool, M, K, N, K * N * int64_t(sizeof(T)), y, [&](int64_t c0, int64_t c1, float* out) {
    switch (M) {
      case 1: StreamChunks<1>(x, K, w, N, c0, c1, out); break;
      case 2: StreamChunks<2>(x, K, w, N, c0, c1, out); break;
      case 3: StreamChunks<3>(x, K, w, N, c0, c1, out); break;
      default: StreamChunks<4>(x, K, w, N, c0, c1, out); break;
    }
  });
}

// Rows [k0, k0 + kc) and columns [n0, n0 + nb) of w into panel, as float32 strips of kNR
// columns (each strip [kc, width] contiguous; only the last may be narrower).
template <typename T>
void Pack(const T* w, int64_t N, int64_t k0, int64_t kc, int64_t n0, int64_t nb, float* panel) {
  for (int64_t k = 0; k < kc; ++k) {
    const T* row = w + (k0 + k) * N + n0;
    for (int64_t s = 0; s * kNR < nb; ++s) {
      const int64_t width = std::min(kNR, nb - s * kNR);
      float* dst = panel + s * kNR * kc + k * width;
      for (int64_t c = 0; c < width; c += kLanes) Store(dst + c, Load(row + s * kNR + c));
    }
  }
}

// y[0:MR, 0:NV*8] (row stride ldy) = (or +=, when add) x[0:MR, 0:kc] (row stride ldx) . panel
// strip [kc, NV*8].
template <int MR, int NV>
void Tile(const float* x, int64_t ldx, const float* strip, int64_t kc, float* y, int64_t ldy,
          bool add) {
  V acc[MR][NV] = {};
  for (int64_t k = 0; k < kc; ++k) {
    V b[NV];
    for (int j = 0; j < NV; ++j) {
      b[j] = Load(strip + (k * NV + j) * kLanes);
      jaxserve::InRegister(b[j]);
    }
    for (int r = 0; r < MR; ++r) {
      const V a = Splat(x[r * ldx + k]);
      for (int j = 0; j < NV; ++j) acc[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NV; ++j) {
      float* out = y + r * ldy + j * kLanes;
      Store(out, add ? Load(out) + acc[r][j] : acc[r][j]);
    }
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool);

template <int MR>
constexpr TileFn TileFor(int64_t nv) {
  return nv == 3 ? Tile<MR, 3> : nv == 2 ? Tile<MR, 2> : Tile<MR, 1>;
}

TileFn TileFor(int64_t mr, int64_t nv) {
  switch (mr) {
    case 8: return TileFor<8>(nv);
    case 7: return TileFor<7>(nv);
    case 6: return TileFor<6>(nv);
    case 5: return TileFor<5>(nv);
    case 4: return TileFor<4>(nv);
    case 3: return TileFor<3>(nv);
    case 2: return TileFor<2>(nv);
    default: return TileFor<1>(nv);
  }
}

// The tiled regime's frame: column blocks of whole strips, as many as workers (or a multiple,
// keeping blocks <= kMaxBlock wide: wide blocks read long runs of each row of w);
// block_fn(n0, nb, per) computes y's columns [n0, n0 + nb), `per` strips wide at most.
template <typename BlockFn>
void Packed(ffi::ThreadPool& pool, int64_t N, int64_t weight_bytes, const BlockFn& block_fn) {
  const int64_t strips = (N + kNR - 1) / kNR, workers = Workers(pool, weight_bytes);
  int64_t blocks = std::min(workers, strips);
  while ((strips + blocks - 1) / blocks * kNR > kMaxBlock && blocks + workers <= strips) {
    blocks += workers;
  }
  const int64_t per = (strips + blocks - 1) / blocks;  // strips per block
  blocks = (strips + per - 1) / per;
  jaxserve::ParallelFor(pool, blocks, workers, [&](int64_t block) {
    const int64_t n0 = block * per * kNR;
    block_fn(n0, std::min(per * kNR, N - n0), per);
  });
}

template <typename T>
void Packed(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, const T* w, int64_t N,
            float* y) {
  Packed(pool, N, K * N * int64_t(sizeof(T)), [&](int64_t n0, int64_t nb, int64_t per) {
    thread_local std::vector<float> panel;
    panel.resize(kChunk * per * kNR);
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t kc = std::min(kChunk, K - k0);
      Pack(w, N, k0, kc, n0, nb, panel.data());
      for (int64_t s = 0; s * kNR < nb; ++s) {
        const int64_t nv = std::min(kNR, nb - s * kNR) / kLanes;
        const float* strip = panel.data() + s * kNR * kc;
        for (int64_t m0 = 0; m0 < M; m0 += kMR) {
          const int64_t mr = std::min(kMR, M - m0);
          TileFor(mr, nv)(x + m0 * K + k0, K, strip, kc, y + m0 * N + n0 + s * kNR, N, k0 > 0);
        }
      }
    }
  });
}

#if defined(__AVX512BF16__)
// bf16 x and bf16 w: VDPBF16PS adds two products of bfloat16 pairs into each float32 lane,
// twice the FMAs' rate. Its operands are (k, k + 1) pairs: x [M, K] as pairs (one 32-bit
// broadcast), w's rows k and k + 1 interleaved column by column (16 columns per vector). The
// products of two bfloat16 are exact in float32, so this differs from the float32 path only in
// summation order (k + 1 then k within a pair) and flushing subnormals; both regimes use it,
// so rows stay batch-invariant. A pair past an odd K is (x[K-1], 0) with a zero row of w.

// Columns [0, 16) of rows a and b of w (bf16 bits) as 16 (a, b) pairs.
inline __m512i Interleave(const uint16_t* a, const uint16_t* b) {
  alignas(64) static constexpr uint16_t kOrder[32] = {
      0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i both = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
  return _mm512_permutexvar_epi16(_mm512_load_si512(kOrder), both);
}

// (Accumulators are kept as V, not __m512: GCC 12 stored an array of the may_alias __m512 to
// memory on every step of the loop.)
// Columns [0, 32) of rows a and b as (a, b) pairs: columns 0-15 in lo, 16-31 in hi.
inline void Interleave32(const uint16_t* a, const uint16_t* b, __m512i& lo, __m512i& hi) {
  alignas(64) static constexpr uint16_t kLo[32] = {
      0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {
      16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
      24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i va = _mm512_loadu_si512(a), vb = _mm512_loadu_si512(b);
  lo = _mm512_permutex2var_epi16(va, _mm512_load_si512(kLo), vb);
  hi = _mm512_permutex2var_epi16(va, _mm512_load_si512(kHi), vb);
}

inline __m512bh Pairs(__m512i v) { return (__m512bh)v; }
inline V Dot(V acc, __m512bh a, __m512bh b) { return (V)_mm512_dpbf16_ps((__m512)acc, a, b); }
inline __m512bh Broadcast(uint32_t pair) { return Pairs(_mm512_set1_epi32(int32_t(pair))); }

// Row k of w, or the zero row past K (a pair's second row when K is odd).
inline const uint16_t* RowOrZero(const uint16_t* w, int64_t N, int64_t k, int64_t K,
                                 const uint16_t* zero) {
  return k < K ? w + k * N : zero;
}

// As StreamChunks, over pairs: xp [MR, P] the pairs of x (P = ceil(K / 2)).
template <int MR>
void StreamChunksDot(const uint32_t* xp, int64_t P, int64_t K, const uint16_t* w, int64_t N,
                     const uint16_t* zero, int64_t c0, int64_t c1, float* parts) {
  for (int64_t c = c0; c < c1; ++c) {
    float* part = parts + (c - c0) * MR * N;
    std::fill(part, part + MR * N, 0.0f);
    const int64_t end = std::min(K, (c + 1) * kChunk);
    int64_t k = c * kChunk;
    // Two pairs (four rows of w) a pass, 32 columns a step: half the partial's loads and
    // stores, and one two-source permute per 16 pairs (one pair a pass with a 16-wide insert
    // and permute read bf16 weights at 18-24 GB/s against float32's 35-42).
    for (; k + 4 <= end; k += 4) {
      __m512bh xs[2][MR];
      for (int m = 0; m < MR; ++m) {
        xs[0][m] = Broadcast(xp[m * P + k / 2]);
        xs[1][m] = Broadcast(xp[m * P + k / 2 + 1]);
      }
      const uint16_t* row = w + k * N;
      int64_t n = 0;
      for (; n + 32 <= N; n += 32) {
        __m512i lo[2], hi[2];
        for (int i = 0; i < 2; ++i) {
          Interleave32(row + 2 * i * N + n, row + (2 * i + 1) * N + n, lo[i], hi[i]);
        }
        for (int m = 0; m < MR; ++m) {
          float* out = part + m * N + n;
          Store(out, Dot(Dot(Load(out), xs[0][m], Pairs(lo[0])), xs[1][m], Pairs(lo[1])));
          Store(out + 16, Dot(Dot(Load(out + 16), xs[0][m], Pairs(hi[0])), xs[1][m], Pairs(hi[1])));
        }
      }
      for (; n < N; n += 16) {
        const __m512bh v0 = Pairs(Interleave(row + n, row + N + n));
        const __m512bh v1 = Pairs(Interleave(row + 2 * N + n, row + 3 * N + n));
        for (int m = 0; m < MR; ++m) {
          float* out = part + m * N + n;
          Store(out, Dot(Dot(Load(out), xs[0][m], v0), xs[1][m], v1));
        }
      }
    }
    for (; k < end; k += 2) {  // a last pair; its second row past an odd K is zero
      __m512bh xs[MR];
      for (int m = 0; m < MR; ++m) xs[m] = Broadcast(xp[m * P + k / 2]);
      const uint16_t* a = w + k * N;
      const uint16_t* b = RowOrZero(w, N, k + 1, K, zero);
      for (int64_t n = 0; n < N; n += 16) {
        const __m512bh v = Pairs(Interleave(a + n, b + n));
        for (int m = 0; m < MR; ++m) {
          float* out = part + m * N + n;
          Store(out, Dot(Load(out), xs[m], v));
        }
      }
    }
  }
}

// As Tile, over pairs: strip [pairs, NV * 16] of w's pairs.
template <int MR, int NV>
void TileDot(const uint32_t* xp, int64_t ldx, const uint32_t* strip, int64_t pairs, float* y,
             int64_t ldy, bool add) {
  V acc[MR][NV] = {};
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh b[NV];
    for (int j = 0; j < NV; ++j) {
      b[j] = Pairs(_mm512_loadu_si512(strip + (p * NV + j) * 16));
      jaxserve::InRegister(b[j]);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = Broadcast(xp[r * ldx + p]);
      for (int j = 0; j < NV; ++j) acc[r][j] = Dot(acc[r][j], a, b[j]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NV; ++j) {
      float* out = y + r * ldy + j * 16;
      Store(out, add ? Load(out) + acc[r][j] : acc[r][j]);
    }
  }
}

using TileDotFn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, float*, int64_t,
                           bool);

template <int MR>
constexpr TileDotFn TileDotFor(int64_t nv) {
  return nv == 3 ? TileDot<MR, 3> : nv == 2 ? TileDot<MR, 2> : TileDot<MR, 1>;
}

TileDotFn TileDotFor(int64_t mr, int64_t nv) {
  switch (mr) {
    case 8: return TileDotFor<8>(nv);
    case 7: return TileDotFor<7>(nv);
    case 6: return TileDotFor<6>(nv);
    case 5: return TileDotFor<5>(nv);
    case 4: return TileDotFor<4>(nv);
    case 3: return TileDotFor<3>(nv);
    case 2: return TileDotFor<2>(nv);
    default: return TileDotFor<1>(nv);
  }
}

void MatmulDot(ffi::ThreadPool& pool, const uint16_t* x, int64_t M, int64_t K, const uint16_t* w,
               int64_t N, float* y) {
  const int64_t P = (K + 1) / 2;
  std::vector<uint32_t> xp(M * P, 0);  // x's (k, k + 1) pairs, the last one zero-padded
  for (int64_t m = 0; m < M; ++m) std::memcpy(xp.data() + m * P, x + m * K, K * sizeof *x);
  const std::vector<uint16_t> zero(N, 0);
  if (M <= kStreamRows) {
    Stream(pool, M, K, N, K * N * 2, y, [&](int64_t c0, int64_t c1, float* out) {
      switch (M) {
        case 1: StreamChunksDot<1>(xp.data(), P, K, w, N, zero.data(), c0, c1, out); break;
        case 2: StreamChunksDot<2>(xp.data(), P, K, w, N, zero.data(), c0, c1, out); break;
        case 3: StreamChunksDot<3>(xp.data(), P, K, w, N, zero.data(), c0, c1, out); break;
        default: StreamChunksDot<4>(xp.data(), P, K, w, N, zero.data(), c0, c1, out); break;
      }
    });
    return;
  }
  Packed(pool, N, K * N * 2, [&](int64_t n0, int64_t nb, int64_t per) {
    thread_local std::vector<uint32_t> panel;
    panel.resize(kChunk / 2 * per * kNR);
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t pairs = (std::min(kChunk, K - k0) + 1) / 2;
      for (int64_t p = 0; p < pairs; ++p) {  // pack: strip s is [pairs, width] pairs
        const uint16_t* a = w + (k0 + 2 * p) * N + n0;
        const uint16_t* b = RowOrZero(w, N, k0 + 2 * p + 1, K, zero.data()) + n0;
        for (int64_t s = 0; s * kNR < nb; ++s) {
          const int64_t width = std::min(kNR, nb - s * kNR);
          uint32_t* dst = panel.data() + s * kNR * pairs + p * width;
          for (int64_t c = 0; c < width; c += 16) {
            _mm512_storeu_si512(dst + c, Interleave(a + s * kNR + c, b + s * kNR + c));
          }
        }
      }
      for (int64_t s = 0; s * kNR < nb; ++s) {
        const int64_t nv = std::min(kNR, nb - s * kNR) / 16;
        const uint32_t* strip = panel.data() + s * kNR * pairs;
        for (int64_t m0 = 0; m0 < M; m0 += kMR) {
          const int64_t mr = std::min(kMR, M - m0);
          TileDotFor(mr, nv)(xp.data() + m0 * P + k0 / 2, P, strip, pairs,
                             y + m0 * N + n0 + s * kNR, N, k0 > 0);
        }
      }
    }
  });
}

// y [M, N] = x [M, K] . w [N, K]^T, both bf16: a tied head (the embedding table [V, D]). Rows of
// w are already (k, k + 1) pairs in memory, so each y[m, n] is one vector chain over K (32
// bfloat16 a step, the last one masked) reduced across lanes at the end: MRxNR tiles keep
// NR rows of w in L1 while every group of MR rows of x passes. The same chain whatever M, so
// rows are batch-invariant here too.
// The sums of 16 vectors' lanes as the 16 lanes of one (vector i's sum in lane i), by a
// transposing reduction: 45 operations where 16 horizontal sums took 128, a third of a 4 x 4
// tile's time at K = 576. Each sum's order is fixed by its own lanes alone (pairs 0+2 and
// 1+3 within each 128-bit quarter, then those two, then quarters 0+1, 2+3, then the halves),
// so a result does not depend on the other 15 vectors.
inline __m512 Sums16(const __m512* v) {
  __m512 t[8], s[4];
  for (int i = 0; i < 8; ++i) {  // per quarter [a0+a2, b0+b2, a1+a3, b1+b3]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per quarter the sums of its lanes of 4 vectors
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    s[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // quarters 0+1 and 2+3 of s[0], s[1] (then s[2], s[3]), then the two halves
  const __m512 p0 = _mm512_add_ps(_mm512_shuffle_f32x4(s[0], s[1], 0x88), _mm512_shuffle_f32x4(s[0], s[1], 0xDD));
  const __m512 p1 = _mm512_add_ps(_mm512_shuffle_f32x4(s[2], s[3], 0x88), _mm512_shuffle_f32x4(s[2], s[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(p0, p1, 0x88), _mm512_shuffle_f32x4(p0, p1, 0xDD));
}

template <int MR, int NR>
void TileRows(const uint16_t* x, const uint16_t* w, int64_t K, float* y, int64_t ldy) {
  V acc[MR][NR] = {};
  // Full steps, then the masked tail apart (GCC 12 kept every accumulator in memory when the
  // mask was computed in the loop, or the step was a lambda).
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh a[MR], b[NR];
    for (int r = 0; r < MR; ++r) a[r] = Pairs(_mm512_loadu_si512(x + r * K + k));
    for (int j = 0; j < NR; ++j) b[j] = Pairs(_mm512_loadu_si512(w + j * K + k));
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < NR; ++j) acc[r][j] = Dot(acc[r][j], a[r], b[j]);
    }
  }
  if (k < K) {
    const __mmask32 mask = (__mmask32(1) << (K - k)) - 1;
    __m512bh a[MR], b[NR];
    for (int r = 0; r < MR; ++r) a[r] = Pairs(_mm512_maskz_loadu_epi16(mask, x + r * K + k));
    for (int j = 0; j < NR; ++j) b[j] = Pairs(_mm512_maskz_loadu_epi16(mask, w + j * K + k));
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < NR; ++j) acc[r][j] = Dot(acc[r][j], a[r], b[j]);
    }
  }
  static_assert(MR <= 4 && NR <= 4, "one Sums16 per tile");
  __m512 v[16];
  for (int i = 0; i < 16; ++i) {
    v[i] = i / 4 < MR && i % 4 < NR ? (__m512)acc[i / 4][i % 4] : _mm512_setzero_ps();
  }
  alignas(64) float sums[16];
  _mm512_store_ps(sums, Sums16(v));
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) y[r * ldy + j] = sums[r * 4 + j];
  }
}

using TileRowsFn = void (*)(const uint16_t*, const uint16_t*, int64_t, float*, int64_t);
constexpr int64_t kRowsMR = 4, kRowsNR = 4;

template <int MR>
constexpr TileRowsFn TileRowsFor(int64_t nr) {
  return nr == 4 ? TileRows<MR, 4> : nr == 3 ? TileRows<MR, 3> : nr == 2 ? TileRows<MR, 2>
                                                                          : TileRows<MR, 1>;
}

TileRowsFn TileRowsFor(int64_t mr, int64_t nr) {
  return mr == 4 ? TileRowsFor<4>(nr) : mr == 3 ? TileRowsFor<3>(nr) : mr == 2 ? TileRowsFor<2>(nr)
                                                                                : TileRowsFor<1>(nr);
}

void MatmulRows(ffi::ThreadPool& pool, const uint16_t* x, int64_t M, int64_t K, const uint16_t* w,
                int64_t N, float* y) {
  const int64_t workers = Workers(pool, K * N * 2);
  const int64_t groups = (N + kRowsNR - 1) / kRowsNR;  // of NR rows of w
  const int64_t items = std::min(groups, workers * 8);  // a few items per worker: balance
  jaxserve::ParallelFor(pool, items, workers, [&](int64_t item) {
    for (int64_t g = groups * item / items; g < groups * (item + 1) / items; ++g) {
      const int64_t n0 = g * kRowsNR, nr = std::min(kRowsNR, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kRowsMR) {
        TileRowsFor(std::min(kRowsMR, M - m0), nr)(x + m0 * K, w + n0 * K, K, y + m0 * N + n0, N);
      }
    }
  });
}
// y [M, N] = x [M, K] . w where w was packed once for this kernel (cpu_matmul.pack): its
// (k, k + 1) pairs of rows interleaved column by column, as uint32 [N / 16, K / 2, 16]: strip
// s holds columns [16 s, 16 s + 16) for every pair, contiguous. So the weights are read as
// they lie, with no permutes and no per-call packing (MatmulDot's interleaving and panels),
// and each y[m, n] is one VDPBF16PS chain over the pairs in order from zero, in registers:
// the same bits whatever M, the tile and the threads. Tiles: MR rows x NV strips.
// Pairs ahead (a 64-byte line each) prefetched in every strip a tile reads: a strip is only
// K / 2 lines (288 for K = 576), short for the hardware prefetcher to ramp up on. The tied
// head [49152, 576], three rounds alternating, ms against the 4 x 4 row tiles in the same
// process: 8 rows 0.61-0.65 of their time -> 0.43-0.56, 32 rows 0.65-0.68 -> 0.58-0.60; the
// projections' 1- and 32-row chains within noise.
constexpr int64_t kPrefetch = 24;

template <int MR, int NV>
void TilePacked(const uint32_t* xp, int64_t P, const uint32_t* w, float* y, int64_t N) {
  V acc[MR][NV] = {};
  for (int64_t p = 0; p < P; ++p) {
    __m512bh b[NV];
    for (int j = 0; j < NV; ++j) {
      __builtin_prefetch(w + (j * P + p + kPrefetch) * 16, 0, 3);
      b[j] = Pairs(_mm512_loadu_si512(w + (j * P + p) * 16));
      jaxserve::InRegister(b[j]);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = Broadcast(xp[r * P + p]);
      for (int j = 0; j < NV; ++j) acc[r][j] = Dot(acc[r][j], a, b[j]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NV; ++j) Store(y + r * N + j * 16, acc[r][j]);
  }
}

using TilePackedFn = void (*)(const uint32_t*, int64_t, const uint32_t*, float*, int64_t);

template <int MR>
constexpr TilePackedFn TilePackedFor(int64_t nv) {
  return nv == 3 ? TilePacked<MR, 3> : nv == 2 ? TilePacked<MR, 2> : TilePacked<MR, 1>;
}

TilePackedFn TilePackedFor(int64_t mr, int64_t nv) {
  switch (mr) {
    case 8: return TilePackedFor<8>(nv);
    case 7: return TilePackedFor<7>(nv);
    case 6: return TilePackedFor<6>(nv);
    case 5: return TilePackedFor<5>(nv);
    case 4: return TilePackedFor<4>(nv);
    case 3: return TilePackedFor<3>(nv);
    case 2: return TilePackedFor<2>(nv);
    default: return TilePackedFor<1>(nv);
  }
}

// Few rows: wider tiles (more strips per pass, fewer passes over x).
template <int MR>
void TilesFew(const uint32_t* xp, int64_t P, const uint32_t* w, float* y, int64_t N, int64_t s0,
              int64_t s1) {
  constexpr int NV = 4;
  int64_t s = s0;
  for (; s + NV <= s1; s += NV) TilePacked<MR, NV>(xp, P, w + s * P * 16, y + s * 16, N);
  for (; s < s1; ++s) TilePacked<MR, 1>(xp, P, w + s * P * 16, y + s * 16, N);
}

void MatmulPacked(ffi::ThreadPool& pool, const uint32_t* xp, int64_t M, int64_t P,
                  const uint32_t* w, int64_t N, float* y) {
  const int64_t strips = N / 16, workers = Workers(pool, P * N * 4);
  // items of a few strips each, taken in order from a shared counter
  const int64_t per = M <= 4 ? 4 : kNV, items = (strips + per - 1) / per;
  jaxserve::ParallelFor(pool, items, workers, [&](int64_t item) {
    const int64_t s0 = item * per, s1 = std::min(strips, s0 + per);
    if (M <= 4) {
      switch (M) {
        case 1: TilesFew<1>(xp, P, w, y, N, s0, s1); break;
        case 2: TilesFew<2>(xp, P, w, y, N, s0, s1); break;
        case 3: TilesFew<3>(xp, P, w, y, N, s0, s1); break;
        default: TilesFew<4>(xp, P, w, y, N, s0, s1); break;
      }
      return;
    }
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int64_t mr = std::min(kMR, M - m0);
      for (int64_t s = s0; s < s1; s += kNV) {
        const int64_t nv = std::min<int64_t>(kNV, s1 - s);
        TilePackedFor(mr, nv)(xp + m0 * P, P, w + s * P * 16, y + m0 * N + s * 16, N);
      }
    }
  }, M <= kStreamRows);
}
// SwiGLU in the epilogue of the packed gate_up matmul: out [M, F] bf16 = silu(gate) * up, with
// gate, up = x . w's first and second F columns (w packed from [K, 2, F]: gate's strips, then
// up's). It rounds where the model's jnp path does (llama.MLP: gate_up to bf16, silu in
// float32 rounded once, the product rounded), so the two differ only in e^x's last bits; it
// saves that path's float32 [M, 2F] round trip through memory and its fusions (8.3 ms of a
// 256-token bf16 prefill step). Tiles: MR rows x NG strips of gate and the NG matching ones of
// up; each output's chains are those of TilePacked, so rows stay batch-invariant.
template <int MR, int NG>
void TileSwiglu(const uint32_t* xp, int64_t P, const uint32_t* gate, const uint32_t* up,
                uint16_t* out, int64_t F) {
  V g[MR][NG] = {}, u[MR][NG] = {};
  for (int64_t p = 0; p < P; ++p) {
    __m512bh bg[NG], bu[NG];
    for (int j = 0; j < NG; ++j) {
      bg[j] = Pairs(_mm512_loadu_si512(gate + (j * P + p) * 16));
      bu[j] = Pairs(_mm512_loadu_si512(up + (j * P + p) * 16));
      jaxserve::InRegister(bg[j]);
      jaxserve::InRegister(bu[j]);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = Broadcast(xp[r * P + p]);
      for (int j = 0; j < NG; ++j) {
        g[r][j] = Dot(g[r][j], a, bg[j]);
        u[r][j] = Dot(u[r][j], a, bu[j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NG; ++j) {
      const V gate_r = jaxserve::RoundToBf16(g[r][j]);
      const V act = jaxserve::RoundToBf16(gate_r / (1.0f + jaxserve::Exp(-gate_r)));
      const V y = jaxserve::RoundToBf16(act * jaxserve::RoundToBf16(u[r][j]));
      using U = uint32_t __attribute__((vector_size(kLanes * 4)));
      U bits;
      std::memcpy(&bits, &y, sizeof bits);
      const __m256i half = _mm512_cvtepi32_epi16(_mm512_srli_epi32((__m512i)bits, 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * F + j * 16), half);
    }
  }
}

template <int MR>
void SwigluStrips(const uint32_t* xp, int64_t P, const uint32_t* w, uint16_t* out, int64_t F,
                  int64_t s0, int64_t s1) {
  const int64_t half = F / 16;  // up's strips follow gate's
  int64_t s = s0;
  for (; s + 2 <= s1; s += 2) {
    TileSwiglu<MR, 2>(xp, P, w + s * P * 16, w + (half + s) * P * 16, out + s * 16, F);
  }
  for (; s < s1; ++s) {
    TileSwiglu<MR, 1>(xp, P, w + s * P * 16, w + (half + s) * P * 16, out + s * 16, F);
  }
}

void MatmulPackedSwiglu(ffi::ThreadPool& pool, const uint32_t* xp, int64_t M, int64_t P,
                        const uint32_t* w, int64_t F, uint16_t* out) {
  constexpr int64_t kRows = 6, kPer = 2;  // 6 rows x (2 + 2) strips: 24 accumulators
  const int64_t strips = F / 16, workers = Workers(pool, P * 2 * F * 4);
  const int64_t items = (strips + kPer - 1) / kPer;
  jaxserve::ParallelFor(pool, items, workers, [&](int64_t item) {
    const int64_t s0 = item * kPer, s1 = std::min(strips, s0 + kPer);
    int64_t m0 = 0;
    for (; m0 + kRows <= M; m0 += kRows) {
      SwigluStrips<kRows>(xp + m0 * P, P, w, out + m0 * F, F, s0, s1);
    }
    const uint32_t* x = xp + m0 * P;
    uint16_t* o = out + m0 * F;
    switch (M - m0) {
      case 5: SwigluStrips<5>(x, P, w, o, F, s0, s1); break;
      case 4: SwigluStrips<4>(x, P, w, o, F, s0, s1); break;
      case 3: SwigluStrips<3>(x, P, w, o, F, s0, s1); break;
      case 2: SwigluStrips<2>(x, P, w, o, F, s0, s1); break;
      case 1: SwigluStrips<1>(x, P, w, o, F, s0, s1); break;
      default: break;
    }
  }, M <= kStreamRows);
}
#endif  // __AVX512BF16__

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("matmul: x [M, K] and w [K, N] expected");
  }
  const auto xtype = x.element_type(), wtype = w.element_type();
  const auto is_float = [](ffi::DataType t) {
    return t == ffi::DataType::F32 || t == ffi::DataType::BF16;
  };
  if (!is_float(xtype) || !is_float(wtype)) {
    return ffi::Error::InvalidArgument("matmul: x and w must be f32 or bf16");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  if (N % kLanes != 0) {
    return ffi::Error::InvalidArgument("matmul: N must be a multiple of " + std::to_string(kLanes));
  }
  if (M == 0 || N == 0) return ffi::Error::Success();
  float* out = y->typed_data();
  if (K == 0) {
    std::fill(out, out + M * N, 0.0f);
    return ffi::Error::Success();
  }
  // bf16 arrays are read as their bits (Load, Interleave).
  const auto* xbits = static_cast<const uint16_t*>(x.untyped_data());
  const auto* wbits = static_cast<const uint16_t*>(w.untyped_data());
#if defined(__AVX512BF16__)
  if (xtype == ffi::DataType::BF16 && wtype == ffi::DataType::BF16) {
    MatmulDot(pool, xbits, M, K, wbits, N, out);
    return ffi::Error::Success();
  }
#endif
  std::vector<float> widened;
  const float* xs = static_cast<const float*>(x.untyped_data());
  if (xtype == ffi::DataType::BF16) {
    widened.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) {
      const uint32_t bits = uint32_t(xbits[i]) << 16;
      std::memcpy(&widened[i], &bits, sizeof bits);
    }
    xs = widened.data();
  }
  if (wtype == ffi::DataType::BF16) {
    M <= kStreamRows ? Stream(pool, xs, M, K, wbits, N, out) : Packed(pool, xs, M, K, wbits, N, out);
  } else {
    const auto* ws = static_cast<const float*>(w.untyped_data());
    M <= kStreamRows ? Stream(pool, xs, M, K, ws, N, out) : Packed(pool, xs, M, K, ws, N, out);
  }
  return ffi::Error::Success();
}

ffi::Error MatmulRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                          ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("matmul_rows: x [M, K] and w [N, K] expected");
  }
#if defined(__AVX512BF16__)
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  float* out = y->typed_data();
  if (K == 0) {
    std::fill(out, out + M * N, 0.0f);
  } else if (M > 0 && N > 0) {
    MatmulRows(pool, static_cast<const uint16_t*>(x.untyped_data()), M, K,
               static_cast<const uint16_t*>(w.untyped_data()), N, out);
  }
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "matmul_rows: built without AVX512_BF16");
#endif
}

ffi::Error MatmulPackedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                            ffi::Buffer<ffi::U32> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != 16 || xd[1] != 2 * wd[1]) {
    return ffi::Error::InvalidArgument("matmul_packed: x [M, 2P] and w [N / 16, P, 16] expected");
  }
#if defined(__AVX512BF16__)
  const int64_t M = xd[0], P = wd[1], N = wd[0] * 16;
  if (M > 0 && N > 0) {
    MatmulPacked(pool, static_cast<const uint32_t*>(x.untyped_data()), M, P,
                 w.typed_data(), N, y->typed_data());
  }
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "matmul_packed: built without AVX512_BF16");
#endif
}

ffi::Error MatmulPackedSwigluImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                                  ffi::Buffer<ffi::U32> w, ffi::ResultBuffer<ffi::BF16> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != 16 || xd[1] != 2 * wd[1] || wd[0] % 2 != 0) {
    return ffi::Error::InvalidArgument(
        "matmul_packed_swiglu: x [M, 2P] and w [2F / 16, P, 16] expected");
  }
#if defined(__AVX512BF16__)
  const int64_t M = xd[0], P = wd[1], F = wd[0] * 8;
  if (M > 0 && F > 0) {
    MatmulPackedSwiglu(pool, static_cast<const uint32_t*>(x.untyped_data()), M, P,
                       w.typed_data(), F, static_cast<uint16_t*>(y->untyped_data()));
  }
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "matmul_packed_swiglu: built without AVX512_BF16");
#endif
}

}  // namespace

// What the library was built with, for cpu_library.py (by ctypes): bit 0, vectors of 16 floats
// (AVX-512); bit 1, the bf16 dot-product path (AVX512_BF16).
extern "C" int JaxserveFeatures() {
  int features = kLanes == 16 ? 1 : 0;
#if defined(__AVX512BF16__)
  features |= 2;
#endif
  return features;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()  // w [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulRows, MatmulRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [N, K]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulPacked, MatmulPackedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::U32>>()  // w packed [N / 16, K / 2, 16]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulPackedSwiglu, MatmulPackedSwigluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::U32>>()  // w packed [2F / 16, K / 2, 16]
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // silu(gate) * up [M, F]
