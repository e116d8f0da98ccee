// DLRM's pair interaction on a CPU: the dot products of every pair of an example's N vectors,
// and their gradient, as two XLA FFI handlers (kstep_adam/ctr/train/_interaction.py builds
// this file on first use and registers them).
//
//   KstepPairDots:             v [..., N, D]                 -> z [..., N (N - 1) / 2]
//   KstepPairDotsGrad:         v [..., N, D], dz [..., K]    -> dv [..., N, D]
//   KstepDlrmInteraction:      h [..., D], e [..., F, D]     -> [h, pair dots of (h, e)]
//   KstepDlrmInteractionGrad:  h, e, dz [..., D + K]         -> dh [..., D], de [..., F, D]
//
// z holds the pairs i < j in row-major upper-triangle order (numpy.triu_indices(N, 1)), and
// dv_i = sum_{j != i} dz(i, j) v_j. The leading dimensions are one batch of examples.
//
// XLA's CPU batched matmul forms an example's whole N x N Gram matrix with N x D times D x N
// products too small to fill a vector unit. Here a vector holds one number of kLanes examples
// instead: a block of kLanes examples is transposed so that lane l is example l, and each pair
// costs D fused multiply-adds for all kLanes examples at once, with only the N (N - 1) / 2
// pairs computed. The batch is cut into tasks of kGrain examples, run on the calling thread
// and on XLA's intra-op thread pool. Each example is summed in the same order whichever
// thread runs it, so the results do not depend on the threads.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;        // examples per vector
constexpr int64_t kGrain = 64;   // examples per task
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

#ifdef __AVX__
// Transposes the 8 x 8 block held in r[0..7], one row per register.
inline void Transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int p = 0; p < 4; ++p) {
    t[2 * p] = _mm256_unpacklo_ps(r[2 * p], r[2 * p + 1]);
    t[2 * p + 1] = _mm256_unpackhi_ps(r[2 * p], r[2 * p + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int q = 0; q < 4; ++q) {
    r[q] = _mm256_permute2f128_ps(u[q], u[q + 4], 0x20);
    r[q + 4] = _mm256_permute2f128_ps(u[q], u[q + 4], 0x31);
  }
}
#endif

// dst[c * kLanes + l] = src[l * stride + c] for c < cols; lanes >= `lanes` are zero.
void ToLanes(const float* src, int64_t stride, int64_t lanes, int64_t cols, float* dst) {
  int64_t c = 0;
#ifdef __AVX__
  if (lanes == kLanes) {
    for (; c + 8 <= cols; c += 8) {
      __m256 r[8];
      for (int l = 0; l < 8; ++l) r[l] = _mm256_loadu_ps(src + l * stride + c);
      Transpose8(r);
      for (int q = 0; q < 8; ++q) _mm256_storeu_ps(dst + (c + q) * kLanes, r[q]);
    }
  }
#endif
  for (; c < cols; ++c) {
    for (int l = 0; l < kLanes; ++l) dst[c * kLanes + l] = l < lanes ? src[l * stride + c] : 0.0f;
  }
}

// dst[l * stride + c] = src[c * kLanes + l] for l < lanes, c < cols.
void FromLanes(const float* src, int64_t lanes, int64_t cols, float* dst, int64_t stride) {
  int64_t c = 0;
#ifdef __AVX__
  if (lanes == kLanes) {
    for (; c + 8 <= cols; c += 8) {
      __m256 r[8];
      for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(src + (c + q) * kLanes);
      Transpose8(r);
      for (int l = 0; l < 8; ++l) _mm256_storeu_ps(dst + l * stride + c, r[l]);
    }
  }
#endif
  for (int64_t l = 0; l < lanes; ++l) {
    for (int64_t cc = c; cc < cols; ++cc) dst[l * stride + cc] = src[cc * kLanes + l];
  }
}

// z[q] = <x_i, x_(j0 + q)> for q < Q, every lane at once; x in lanes, [N][D][kLanes].
template <int Q>
inline void Dots(const float* xt, int64_t d, int64_t i, int64_t j0, float* z) {
  Vec acc[Q] = {};
  for (int64_t e = 0; e < d; ++e) {
    const Vec a = Load(xt + (i * d + e) * kLanes);
    for (int q = 0; q < Q; ++q) acc[q] += a * Load(xt + ((j0 + q) * d + e) * kLanes);
  }
  for (int q = 0; q < Q; ++q) Store(z + q * kLanes, acc[q]);
}

// The pair dots of examples [b0, b1), kLanes at a time: load(b, lanes, xt) puts the vectors
// of examples b .. b + lanes in lanes ([N][D][kLanes]), store(b, lanes, zt) takes their dots.
template <typename Load, typename Store>
void PairDots(int64_t b0, int64_t b1, int64_t n, int64_t d, const Load& load, const Store& store) {
  const int64_t k = n * (n - 1) / 2;
  thread_local std::vector<float> xt, zt;
  xt.resize(n * d * kLanes);
  zt.resize(k * kLanes);
  for (int64_t b = b0; b < b1; b += kLanes) {
    const int64_t lanes = std::min<int64_t>(kLanes, b1 - b);
    load(b, lanes, xt.data());
    float* z = zt.data();
    for (int64_t i = 0; i + 1 < n; ++i) {
      int64_t j = i + 1;  // eight accumulators at a time, then what is left
      for (; j + 8 <= n; j += 8, z += 8 * kLanes) Dots<8>(xt.data(), d, i, j, z);
      if (j + 4 <= n) Dots<4>(xt.data(), d, i, j, z), j += 4, z += 4 * kLanes;
      if (j + 2 <= n) Dots<2>(xt.data(), d, i, j, z), j += 2, z += 2 * kLanes;
      if (j < n) Dots<1>(xt.data(), d, i, j, z), z += kLanes;
    }
    store(b, lanes, zt.data());
  }
}

// dv_i[e0 + q] = sum_{j != i} dz(i, j) x_j[e0 + q] for q < Q, every lane at once.
template <int Q>
inline void GradRow(const float* gt, const int32_t* pair_i, const float* xt, int64_t n, int64_t d,
                    int64_t i, int64_t e0, float* dvt) {
  Vec acc[Q] = {};
  for (int64_t j = 0; j < n; ++j) {
    if (j == i) continue;
    const Vec s = Load(gt + pair_i[j] * kLanes);
    const float* xj = xt + (j * d + e0) * kLanes;
    for (int q = 0; q < Q; ++q) acc[q] += s * Load(xj + q * kLanes);
  }
  for (int q = 0; q < Q; ++q) Store(dvt + (i * d + e0 + q) * kLanes, acc[q]);
}

// The gradient of examples [b0, b1), kLanes at a time: load as for PairDots, load_dz(b, lanes,
// gt) puts their dots' cotangents in lanes ([K][kLanes]), store(b, lanes, dvt) takes dv.
template <typename LoadV, typename LoadDz, typename StoreDv>
void PairDotsGrad(int64_t b0, int64_t b1, int64_t n, int64_t d, const LoadV& load,
                  const LoadDz& load_dz, const StoreDv& store) {
  const int64_t k = n * (n - 1) / 2;
  thread_local std::vector<int32_t> pair;  // pair[i * n + j]: the index of pair {i, j}
  thread_local std::vector<float> xt, gt, dvt;
  pair.assign(n * n, 0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i + 1; j < n; ++j) {
      pair[i * n + j] = pair[j * n + i] = static_cast<int32_t>(i * n - i * (i + 1) / 2 + j - i - 1);
    }
  }
  xt.resize(n * d * kLanes);
  gt.resize(k * kLanes);
  dvt.resize(n * d * kLanes);
  for (int64_t b = b0; b < b1; b += kLanes) {
    const int64_t lanes = std::min<int64_t>(kLanes, b1 - b);
    load(b, lanes, xt.data());
    load_dz(b, lanes, gt.data());
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* p = pair.data() + i * n;
      int64_t e = 0;
      for (; e + 8 <= d; e += 8) GradRow<8>(gt.data(), p, xt.data(), n, d, i, e, dvt.data());
      if (e + 4 <= d) GradRow<4>(gt.data(), p, xt.data(), n, d, i, e, dvt.data()), e += 4;
      if (e + 2 <= d) GradRow<2>(gt.data(), p, xt.data(), n, d, i, e, dvt.data()), e += 2;
      if (e < d) GradRow<1>(gt.data(), p, xt.data(), n, d, i, e, dvt.data());
    }
    store(b, lanes, dvt.data());
  }
}

// Runs fn(begin, end) over [0, n) in tasks of kGrain, on the calling thread and on the pool's
// threads. The caller waits only for tasks some thread has claimed: a helper that starts after
// every task is claimed (the pool busy with other ops) finds none and touches only `state`.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  const int64_t tasks = (n + kGrain - 1) / kGrain;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  if (helpers <= 0) {
    fn(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, tasks, n, &fn] {
    for (int64_t t; (t = state->next.fetch_add(1)) < tasks;) {
      fn(t * kGrain, std::min(n, (t + 1) * kGrain));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

// The batch size, N and D of v [..., N, D].
ffi::Error Shape(ffi::Span<const int64_t> dims, int64_t* batch, int64_t* n, int64_t* d) {
  if (dims.size() < 2) return ffi::Error::InvalidArgument("pair dots: v must be [..., N, D]");
  *n = dims[dims.size() - 2];
  *d = dims[dims.size() - 1];
  *batch = 1;
  for (size_t a = 0; a + 2 < dims.size(); ++a) *batch *= dims[a];
  return ffi::Error::Success();
}

ffi::Error PairDotsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> v,
                        ffi::ResultBuffer<ffi::F32> z) {
  int64_t batch, n, d;
  if (ffi::Error error = Shape(v.dimensions(), &batch, &n, &d); error.failure()) return error;
  const int64_t k = n * (n - 1) / 2;
  if (static_cast<int64_t>(z->element_count()) != batch * k) {
    return ffi::Error::InvalidArgument("pair dots: z must be [..., N (N - 1) / 2]");
  }
  const float* x = v.typed_data();
  float* y = z->typed_data();
  ParallelFor(pool, batch, [&](int64_t b0, int64_t b1) {
    PairDots(
        b0, b1, n, d,
        [&](int64_t b, int64_t lanes, float* xt) { ToLanes(x + b * n * d, n * d, lanes, n * d, xt); },
        [&](int64_t b, int64_t lanes, const float* zt) { FromLanes(zt, lanes, k, y + b * k, k); });
  });
  return ffi::Error::Success();
}

ffi::Error PairDotsGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> dv) {
  int64_t batch, n, d;
  if (ffi::Error error = Shape(v.dimensions(), &batch, &n, &d); error.failure()) return error;
  const int64_t k = n * (n - 1) / 2;
  if (static_cast<int64_t>(dz.element_count()) != batch * k ||
      static_cast<int64_t>(dv->element_count()) != batch * n * d) {
    return ffi::Error::InvalidArgument("pair dots: dz must be [..., N (N - 1) / 2], dv like v");
  }
  const float* x = v.typed_data();
  const float* g = dz.typed_data();
  float* y = dv->typed_data();
  ParallelFor(pool, batch, [&](int64_t b0, int64_t b1) {
    PairDotsGrad(
        b0, b1, n, d,
        [&](int64_t b, int64_t lanes, float* xt) { ToLanes(x + b * n * d, n * d, lanes, n * d, xt); },
        [&](int64_t b, int64_t lanes, float* gt) { ToLanes(g + b * k, k, lanes, k, gt); },
        [&](int64_t b, int64_t lanes, const float* dvt) {
          FromLanes(dvt, lanes, n * d, y + b * n * d, n * d);
        });
  });
  return ffi::Error::Success();
}

// DLRM's interaction layer: z = [h, the pair dots of v = (h, e_1, ..., e_F)], with v never
// formed: h [..., D] and e [..., F, D] go into the lanes from where they are, and the dots into
// z [..., D + K] after h. The same dots, in the same order, as KstepPairDots of v.
ffi::Error Interaction(ffi::Buffer<ffi::F32>& h, ffi::Buffer<ffi::F32>& e, int64_t* batch,
                       int64_t* n, int64_t* d) {
  if (ffi::Error error = Shape(e.dimensions(), batch, n, d); error.failure()) return error;
  *n += 1;
  if (static_cast<int64_t>(h.element_count()) != *batch * *d) {
    return ffi::Error::InvalidArgument("interaction: h must be [..., D] for e [..., F, D]");
  }
  return ffi::Error::Success();
}

// The vectors (h, e_1, ..., e_F) of examples b .. b + lanes in lanes, as ToLanes puts v's.
void InteractionToLanes(const float* h, const float* e, int64_t f, int64_t d, int64_t b,
                        int64_t lanes, float* xt) {
  ToLanes(h + b * d, d, lanes, d, xt);
  ToLanes(e + b * f * d, f * d, lanes, f * d, xt + d * kLanes);
}

ffi::Error InteractionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> e,
                           ffi::ResultBuffer<ffi::F32> z) {
  int64_t batch, n, d;
  if (ffi::Error error = Interaction(h, e, &batch, &n, &d); error.failure()) return error;
  const int64_t k = n * (n - 1) / 2, f = n - 1, width = d + k;
  if (static_cast<int64_t>(z->element_count()) != batch * width) {
    return ffi::Error::InvalidArgument("interaction: z must be [..., D + N (N - 1) / 2]");
  }
  const float* hx = h.typed_data();
  const float* ex = e.typed_data();
  float* y = z->typed_data();
  ParallelFor(pool, batch, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) std::memcpy(y + b * width, hx + b * d, d * sizeof(float));
    PairDots(
        b0, b1, n, d,
        [&](int64_t b, int64_t lanes, float* xt) { InteractionToLanes(hx, ex, f, d, b, lanes, xt); },
        [&](int64_t b, int64_t lanes, const float* zt) {
          FromLanes(zt, lanes, k, y + b * width + d, width);
        });
  });
  return ffi::Error::Success();
}

// Its gradient: dh = dz[:, :D] + dv_0 and de = (dv_1, ..., dv_F), dv as KstepPairDotsGrad's.
ffi::Error InteractionGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h,
                               ffi::Buffer<ffi::F32> e, ffi::Buffer<ffi::F32> dz,
                               ffi::ResultBuffer<ffi::F32> dh, ffi::ResultBuffer<ffi::F32> de) {
  int64_t batch, n, d;
  if (ffi::Error error = Interaction(h, e, &batch, &n, &d); error.failure()) return error;
  const int64_t k = n * (n - 1) / 2, f = n - 1, width = d + k;
  if (static_cast<int64_t>(dz.element_count()) != batch * width ||
      static_cast<int64_t>(dh->element_count()) != batch * d ||
      static_cast<int64_t>(de->element_count()) != batch * f * d) {
    return ffi::Error::InvalidArgument("interaction: dz must be like z, dh like h, de like e");
  }
  const float* hx = h.typed_data();
  const float* ex = e.typed_data();
  const float* g = dz.typed_data();
  float* dhy = dh->typed_data();
  float* dey = de->typed_data();
  ParallelFor(pool, batch, [&](int64_t b0, int64_t b1) {
    PairDotsGrad(
        b0, b1, n, d,
        [&](int64_t b, int64_t lanes, float* xt) { InteractionToLanes(hx, ex, f, d, b, lanes, xt); },
        [&](int64_t b, int64_t lanes, float* gt) { ToLanes(g + b * width + d, width, lanes, k, gt); },
        [&](int64_t b, int64_t lanes, const float* dvt) {
          FromLanes(dvt, lanes, d, dhy + b * d, d);
          for (int64_t l = 0; l < lanes; ++l) {
            for (int64_t c = 0; c < d; ++c) dhy[(b + l) * d + c] += g[(b + l) * width + c];
          }
          FromLanes(dvt + d * kLanes, lanes, f * d, dey + b * f * d, f * d);
        });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KstepPairDots, PairDotsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KstepPairDotsGrad, PairDotsGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KstepDlrmInteraction, InteractionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KstepDlrmInteractionGrad, InteractionGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
