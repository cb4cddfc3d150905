// The model's projections at decode sizes, for XLA:CPU through the XLA FFI (jax.ffi):
//
//   y [M, N] f32 = x [M, K] f32 . w [K, N]     w float32 or bfloat16 (read as its bits)
//
// with w in the model's own [K, N] layout (llama.py's einsums all contract x's trailing axes
// with w's leading ones, so every projection is this after free reshapes). bf16 weights come
// as bf16: a bitcast to uint16 in the program is a copy of the whole weight on XLA:CPU.
//
// Why a kernel: XLA:CPU's dot runs decode's few-row projections well below the machine
// (docs/performance.md): at 32 rows the x . W form took 2.4-2.8x the time of one large matmul
// at the same FLOP rate, and at 1-4 rows it read bf16 weights at a few GB/s. Two regimes:
//
// - M <= kStreamRows (batch-1 to 4 decode): bound by reading W. W is split by rows of K into one
//   contiguous stretch per worker, read front to back (the hardware prefetchers' best case);
//   each stretch adds x[:, k] * W[k, :] into a partial y of its own, kept in L1/L2, and the
//   partials are summed at the end in a fixed order (the result does not depend on which
//   thread took which stretch).
// - larger M: bound by FMAs. Column blocks of whole 24-column strips go to the workers; each
//   packs a slice of rows of its block into a panel that fits L2 (converting bf16 once), and
//   runs 4 x 24 register tiles (12 accumulators; 3 loads and 4 broadcasts per 12 FMAs) over
//   every row of x.
//
// Measured on 2 Zen 3 cores (one tile, data in L1: 75 GFLOP/s a core; a prefetch of the next
// slice while packing, blocks of 48 or up to 384 columns and panels of 24-256 KB all measured
// within noise of each other): see docs/performance.md.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_simd.h"

namespace ffi = xla::ffi;

namespace {

using jaxserve::kLanes;
using jaxserve::Load8;
using jaxserve::Splat;
using jaxserve::Store8;
using jaxserve::V8;

constexpr int64_t kStreamRows = 4;  // M up to this streams W; above it, packed tiles
constexpr int64_t kMR = 4;  // register tile: kMR rows x kNV vectors of 8 columns
constexpr int64_t kNV = 3;
constexpr int64_t kNR = kNV * kLanes;  // a strip: 24 columns
constexpr int64_t kMaxBlock = 384;  // columns per work item, at most (when there are enough)
// Rows of K summed as one chain (a panel's depth): both regimes add x[m, k] w[k, n] over each
// chunk in k order from zero, then the chunks' sums in chunk order, so a row's result is the
// same bits whatever M, the regime and the threads (a request's numbers do not depend on the
// batch it shares).
constexpr int64_t kChunk = 128;
constexpr int64_t kBytesPerWorker = 1 << 18;  // less weight than this per worker: fewer workers

int64_t Workers(ffi::ThreadPool& pool, int64_t weight_bytes) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::clamp<int64_t>(weight_bytes / kBytesPerWorker, 1, threads);
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
      V8 xs[RK][MR];
      for (int kk = 0; kk < RK; ++kk) {
        for (int m = 0; m < MR; ++m) xs[kk][m] = Splat(x[m * K + k + kk]);
      }
      const T* row = w + k * N;
      for (int64_t n = 0; n < N; n += kLanes) {
        V8 v[RK];
        for (int kk = 0; kk < RK; ++kk) v[kk] = Load8(row + kk * N + n);
        for (int m = 0; m < MR; ++m) {
          V8 a = Load8(part + m * N + n);
          for (int kk = 0; kk < RK; ++kk) a += xs[kk][m] * v[kk];
          Store8(part + m * N + n, a);
        }
      }
    }
    for (; k < end; ++k) {
      V8 xs[MR];
      for (int m = 0; m < MR; ++m) xs[m] = Splat(x[m * K + k]);
      const T* row = w + k * N;
      for (int64_t n = 0; n < N; n += kLanes) {
        const V8 v = Load8(row + n);
        for (int m = 0; m < MR; ++m) Store8(part + m * N + n, Load8(part + m * N + n) + xs[m] * v);
      }
    }
  }
}

template <typename T>
void Stream(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, const T* w, int64_t N,
            float* y) {
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  const int64_t stretches = std::min(chunks, Workers(pool, K * N * int64_t(sizeof(T))));
  std::vector<float> parts(chunks * M * N);
  jaxserve::ParallelFor(pool, stretches, stretches, [&](int64_t i) {
    const int64_t c0 = chunks * i / stretches, c1 = chunks * (i + 1) / stretches;
    float* out = parts.data() + c0 * M * N;
    switch (M) {
      case 1: StreamChunks<1>(x, K, w, N, c0, c1, out); break;
      case 2: StreamChunks<2>(x, K, w, N, c0, c1, out); break;
      case 3: StreamChunks<3>(x, K, w, N, c0, c1, out); break;
      default: StreamChunks<4>(x, K, w, N, c0, c1, out); break;
    }
  });
  for (int64_t i = 0; i < M * N; i += kLanes) {
    V8 sum = Load8(parts.data() + i);
    for (int64_t c = 1; c < chunks; ++c) sum += Load8(parts.data() + c * M * N + i);
    Store8(y + i, sum);
  }
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
      for (int64_t c = 0; c < width; c += kLanes) Store8(dst + c, Load8(row + s * kNR + c));
    }
  }
}

// y[0:MR, 0:NV*8] (row stride ldy) = (or +=, when add) x[0:MR, 0:kc] (row stride ldx) . panel
// strip [kc, NV*8].
template <int MR, int NV>
void Tile(const float* x, int64_t ldx, const float* strip, int64_t kc, float* y, int64_t ldy,
          bool add) {
  V8 acc[MR][NV] = {};
  for (int64_t k = 0; k < kc; ++k) {
    V8 b[NV];
    for (int j = 0; j < NV; ++j) {
      b[j] = Load8(strip + (k * NV + j) * kLanes);
      jaxserve::InRegister(b[j]);
    }
    for (int r = 0; r < MR; ++r) {
      const V8 a = Splat(x[r * ldx + k]);
      for (int j = 0; j < NV; ++j) acc[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NV; ++j) {
      float* out = y + r * ldy + j * kLanes;
      Store8(out, add ? Load8(out) + acc[r][j] : acc[r][j]);
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
    case 4: return TileFor<4>(nv);
    case 3: return TileFor<3>(nv);
    case 2: return TileFor<2>(nv);
    default: return TileFor<1>(nv);
  }
}

template <typename T>
void Packed(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, const T* w, int64_t N,
            float* y) {
  // Blocks of whole strips, as many as workers (or a multiple, keeping blocks <= kMaxBlock
  // wide): wide blocks read long runs of each row of w.
  const int64_t strips = (N + kNR - 1) / kNR, workers = Workers(pool, K * N * int64_t(sizeof(T)));
  int64_t blocks = std::min(workers, strips);
  while ((strips + blocks - 1) / blocks * kNR > kMaxBlock && blocks + workers <= strips) {
    blocks += workers;
  }
  const int64_t per = (strips + blocks - 1) / blocks;  // strips per block
  blocks = (strips + per - 1) / per;
  jaxserve::ParallelFor(pool, blocks, workers, [&](int64_t block) {
    thread_local std::vector<float> panel;
    panel.resize(kChunk * per * kNR);
    const int64_t n0 = block * per * kNR, nb = std::min(per * kNR, N - n0);
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

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("matmul: x [M, K] and w [K, N] expected");
  }
  const auto dtype = w.element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("matmul: w must be f32 or bf16");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  if (N % kLanes != 0) return ffi::Error::InvalidArgument("matmul: N must be a multiple of 8");
  if (M == 0 || N == 0) return ffi::Error::Success();
  float* out = y->typed_data();
  if (K == 0) {
    std::fill(out, out + M * N, 0.0f);
    return ffi::Error::Success();
  }
  const float* xs = x.typed_data();
  if (dtype == ffi::DataType::BF16) {  // read as its bits (cpu_simd.h's Load8)
    const auto* ws = static_cast<const uint16_t*>(w.untyped_data());
    M <= kStreamRows ? Stream(pool, xs, M, K, ws, N, out) : Packed(pool, xs, M, K, ws, N, out);
  } else {
    const auto* ws = static_cast<const float*>(w.untyped_data());
    M <= kStreamRows ? Stream(pool, xs, M, K, ws, N, out) : Packed(pool, xs, M, K, ws, N, out);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()  // w [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [M, N]
