// What the CPU kernels (cpu_paged_attention.cc, cpu_matmul.cc) share: vectors of 8 floats, vectors
// as wide as the target's registers, and a parallel loop over XLA's intra-op thread pool.
//
// Vectors are GCC vector extensions, so one source compiles to AVX2 or AVX-512 under
// -march=native, and to plain scalar code anywhere else. V8 runs in ymm registers on both;
// VW is 16 floats (a zmm register) where the target has AVX-512, else 8.

#ifndef JAXSERVE_KERNELS_CPU_SIMD_H_
#define JAXSERVE_KERNELS_CPU_SIMD_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

typedef float V8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
typedef uint16_t U8 __attribute__((vector_size(16)));
typedef uint32_t W8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

inline V8 Splat(float x) { return V8{x, x, x, x, x, x, x, x}; }
// A vector V of floats from memory, or from bfloat16 bits (Bits: as many uint16, Words: as many
// uint32): the float's high half.
template <typename V>
inline V LoadFloats(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V, typename Bits, typename Words>
inline V LoadBf16(const uint16_t* p) {
  Bits u;
  std::memcpy(&u, p, sizeof u);
  const Words w = __builtin_convertvector(u, Words) << 16;
  V v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline V8 Load8(const float* p) { return LoadFloats<V8>(p); }
// (GCC 12 turns LoadBf16's generic widening into two 4-lane widenings, a shift and an insert;
// one VPMOVZXWD does all 8: bf16 loads were a sixth of the attention kernel's time, `perf`)
inline V8 Load8(const uint16_t* p) {
#if defined(__AVX2__)
  const __m256i bits = _mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  V8 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#else
  return LoadBf16<V8, U8, W8>(p);
#endif
}
inline void Store8(float* p, V8 v) { std::memcpy(p, &v, sizeof v); }

#if defined(__AVX512F__)
constexpr int64_t kWideLanes = 16;
#else
constexpr int64_t kWideLanes = 8;
#endif
typedef float VW __attribute__((vector_size(kWideLanes * 4)));
typedef uint16_t UW __attribute__((vector_size(kWideLanes * 2)));
typedef uint32_t WW __attribute__((vector_size(kWideLanes * 4)));

inline VW SplatW(float x) {  // (VW{} + x adds 0.0f to x first, an instruction per splat)
#if defined(__AVX512F__)
  return VW{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#else
  return VW{x, x, x, x, x, x, x, x};
#endif
}
inline VW LoadW(const float* p) { return LoadFloats<VW>(p); }
inline VW LoadW(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m512i bits = _mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  VW v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#elif defined(__AVX2__)
  return Load8(p);
#else
  return LoadBf16<VW, UW, WW>(p);
#endif
}
inline void StoreW(float* p, VW v) { std::memcpy(p, &v, sizeof v); }

// Every lane x, for a vector of 8 floats or of the widest width (the same type without AVX-512).
template <typename V>
inline V SplatAs(float x) {
  if constexpr (sizeof(V) == sizeof(V8)) {
    return Splat(x);
  } else {
    return SplatW(x);
  }
}

// The integer vectors as wide as a float vector of `Bytes` (GCC takes no dependent vector_size).
template <size_t Bytes>
struct IntLanes;
template <>
struct IntLanes<32> {
  typedef int32_t I __attribute__((vector_size(32)));
  typedef uint32_t U __attribute__((vector_size(32)));
};
template <>
struct IntLanes<64> {
  typedef int32_t I __attribute__((vector_size(64)));
  typedef uint32_t U __attribute__((vector_size(64)));
};

// To the nearest bfloat16, ties to even (finite x), as a float: XLA's convert, lane by lane.
template <typename V>
inline V RoundToBf16(V x) {
  using U = typename IntLanes<sizeof(V)>::U;
  U bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000u;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// e^x lane by lane, Cephes' expf: x = n ln2 + r, e^r by a degree-6 polynomial, 2^n through the
// exponent bits; relative error ~1e-7 (x is clamped to [-87, 88]: the attention kernel's
// scores minus their max are <= 0, and e^-87 is 0 for every sum there).
template <typename V>
inline V Exp(V x) {
  using I = typename IntLanes<sizeof(V)>::I;
  const V lo = SplatAs<V>(-87.0f), hi = SplatAs<V>(88.0f);
  x = x > lo ? x : lo;
  x = x < hi ? x : hi;
  V fx = x * 1.44269504088896341f + 0.5f;
  V n = __builtin_convertvector(__builtin_convertvector(fx, I), V);
  n = n > fx ? n - 1.0f : n;  // floor (the conversion truncates toward zero)
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  const V z = x * x;
  V y = SplatAs<V>(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// Keeps v in a register: GCC otherwise folds a vector reused by several FMAs back into each as
// a memory operand (a load per FMA), which halved a 4 x 24 matmul tile's rate. ("v": any of
// AVX-512's 32 vector registers; "x" would allow only the first 16.)
template <typename V>
inline void InRegister(V& v) {
#if defined(__x86_64__) && defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__x86_64__)
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
}

// fn(item) for every item in [0, items), on the calling thread and up to max_workers - 1 pool
// tasks (the first through a task kept awake, when one is: kWarm), which take items from a
// shared counter. The caller waits only for items already taken, so a task the pool starts
// late (or never: a busy pool) holds nothing up, and a task that starts after the loop ended
// finds no item left and never touches fn. The wait spins (yielding) for up to kSpin, then
// sleeps until the last item ends: sleeping at once cost a wake-up of ~0.1 ms a call (a
// float32 576 x 576 projection at one row, 30 layers: 5.7 ms in XLA, 9.4 with the kernel),
// and spinning without end would hold a core that another process on a shared machine needs.
constexpr std::chrono::microseconds kSpin{500};
// Less data than this per worker (weights, KV): fewer workers, as waking one costs more.
constexpr int64_t kBytesPerWorker = 1 << 18;

// Keeping a helper awake between short calls. A decode step at a few rows makes ~150 kernel
// calls of 10-100 us each, and the pool thread a call wakes started on average 6.9 us after
// it (counted in ParallelFor: the default model, bf16, batch 1), a third of a small
// projection. So after a call that asks for it (`warm`), one pool task stays awake for kWarm,
// spinning (and yielding) on a slot where the next call leaves its helper's part, instead of
// going through the pool's queue and a sleeping thread's wake-up. bf16 decode steps of the
// default model through the engine, with and without, in alternating rounds of one process
// (medians, Zen 5, 2 cores, 2026-12-03): batch 1 7.87 / 8.86 and 8.47 / 8.97 ms, batch 2
// 9.08 / 9.42, batch 4 10.20 / 10.43. At 8 rows it cost 16.47 / 15.09 (XLA's own
// multi-threaded ops then want every pool thread), so the kernels ask for it only at <= 4
// rows. 1000 us spun no better than 300. Whoever takes the slot's job runs it like any helper
// task (it may find no item left; a job left there when the task gave up is run, finding
// none, by the next task or never).
constexpr std::chrono::microseconds kWarm{300};

struct Warm {
  std::atomic<int> awake{0};  // keep-warm tasks scheduled and not yet given up
  std::atomic<std::function<void()>*> slot{nullptr};
};
inline Warm warm_helper;

inline void RunLeftJob() {
  if (auto* job = warm_helper.slot.exchange(nullptr, std::memory_order_acq_rel)) {
    (*job)();
    delete job;
  }
}

inline void StayWarm() {
  auto until = std::chrono::steady_clock::now() + kWarm;
  for (int n = 1;; ++n) {
    if (warm_helper.slot.load(std::memory_order_acquire) != nullptr) {
      RunLeftJob();
      until = std::chrono::steady_clock::now() + kWarm;
    } else if (n % 64 == 0) {  // a clock read and a yield every 64 pauses (~2-4 us)
      if (std::chrono::steady_clock::now() > until) break;
      std::this_thread::yield();
    } else {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
  }
  warm_helper.awake.fetch_sub(1, std::memory_order_acq_rel);
  RunLeftJob();  // one left between the last look and giving up
}

template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, int64_t max_workers, const Fn& fn,
                 bool warm = false) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable all_done;
  };
  auto counters = std::make_shared<Counters>();
  auto run = [counters, items, &fn] {
    for (int64_t i; (i = counters->next.fetch_add(1)) < items;) {
      fn(i);
      if (counters->done.fetch_add(1, std::memory_order_acq_rel) + 1 == items) {
        std::lock_guard<std::mutex> lock(counters->mutex);
        counters->all_done.notify_all();
      }
    }
  };
  const int64_t helpers = std::min({std::max<int64_t>(1, pool.num_threads()), items,
                                    std::max<int64_t>(1, max_workers)}) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    if (i == 0 && warm && warm_helper.awake.load(std::memory_order_acquire) > 0) {
      auto* job = new std::function<void()>(run);
      std::function<void()>* empty = nullptr;
      if (warm_helper.slot.compare_exchange_strong(empty, job, std::memory_order_acq_rel)) continue;
      delete job;
    }
    pool.Schedule([run] { run(); });
  }
  run();
  auto finished = [&] { return counters->done.load(std::memory_order_acquire) >= items; };
  const auto start = std::chrono::steady_clock::now();
  while (!finished() && std::chrono::steady_clock::now() - start < kSpin) std::this_thread::yield();
  if (!finished()) {
    std::unique_lock<std::mutex> lock(counters->mutex);
    counters->all_done.wait(lock, finished);
  }
  int none = 0;  // keep one task awake, unless one already is
  if (warm && helpers > 0 && warm_helper.awake.compare_exchange_strong(none, 1)) {
    pool.Schedule([] { StayWarm(); });
  }
}

}  // namespace jaxserve

#endif  // JAXSERVE_KERNELS_CPU_SIMD_H_
