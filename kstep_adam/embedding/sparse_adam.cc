// One SparseAdam step on the host's rows, in one pass: the same bits as the NumPy form in
// _optimizers.py (adam_moments, then adam_params), which makes about a dozen passes over the
// rows with a float64 temporary each. Built on first use by kstep_adam/_native.py and called
// through ctypes (the GIL released).
//
// The bits match because every operation is the same IEEE operation in the same order:
// float32 products and sums where NumPy computes in float32 (a Python float times a float32
// array is a float32 product), float64 elsewhere, correctly rounded division and square root,
// and no contraction of a product and a sum into one fused multiply-add (-ffp-contract=off
// -fno-fast-math, which _optimizers.py asks for; it also checks the bits once after loading).

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

struct AdamScalars {
  float b1f, b2f;
  double c1, c2, lr, bc1, bc2, lazy_scale, eps;
  int32_t exact;
};

// One row's step: dim parameters p, moments m and v, its gradient g.
inline void AdamRow(float* p, float* m_row, float* v_row, const float* g_row, int64_t dim,
                    const AdamScalars& s) {
  for (int64_t e = 0; e < dim; ++e) {
    const double g = static_cast<double>(g_row[e]);
    const float m32 = s.b1f * m_row[e] + 0.0f;
    const float v32 = s.b2f * v_row[e] + 0.0f;
    const double m = static_cast<double>(m32) + (s.c1 * g + 0.0);
    const double v = static_cast<double>(v32) + (s.c2 * g * g + 0.0);
    const double update = s.exact ? (m / s.bc1) / (std::sqrt(v / s.bc2) + s.eps)
                                  : s.lazy_scale * m / (std::sqrt(v) + s.eps);
    p[e] = static_cast<float>(static_cast<double>(p[e]) - (s.lr * update + 0.0));
    m_row[e] = static_cast<float>(m);
    v_row[e] = static_cast<float>(v);
  }
}

AdamScalars Scalars(double b1, double b2, double lr, double bc1, double bc2, double lazy_scale,
                    double eps, int32_t exact) {
  return {static_cast<float>(b1), static_cast<float>(b2), 1.0 - b1, 1.0 - b2, lr, bc1, bc2,
          lazy_scale, eps, exact};
}

}  // namespace

extern "C" {

// params [n, dim] and slots [n, 2 dim] (m then v) are float32 rows `params_stride` and
// `slots_stride` floats apart (a table's block holds both in one row: the same stride);
// grads [n, dim] is float32, contiguous. `exact` picks optax.adam's update (bias corrections
// bc1, bc2) over the lazy one (lazy_scale).
void KstepSparseAdamApply(float* params, int64_t params_stride, float* slots,
                          int64_t slots_stride, const float* grads, int64_t n, int64_t dim,
                          double b1, double b2, double lr, double bc1, double bc2,
                          double lazy_scale, double eps, int32_t exact) {
  const AdamScalars s = Scalars(b1, b2, lr, bc1, bc2, lazy_scale, eps, exact);
  for (int64_t r = 0; r < n; ++r) {
    float* m_row = slots + r * slots_stride;
    AdamRow(params + r * params_stride, m_row, m_row + dim, grads + r * dim, dim, s);
  }
}

// A table's push of step `step` to n cached rows, all or nothing. `table` holds rows of
// `width` = 1 + 3 dim floats (column 0: the int32 bits of last_step + 1, then the parameters,
// m and v); row r of the push is table row slots[r], its gradient grads[r] (float32 [n, dim]).
// Each row is copied to block[r] (room for [n, width]) and stepped there. Returns
//   -1 when an exact step finds a row that needs catching up first (last written before
//      step - 1): nothing is done;
//   k > 0 when k rows hold a value that is not finite: nothing is stored, block holds them;
//   0 when every row was stepped: column 0 set to step + 1, the rows stored, dirty[slot] = 1.
int64_t KstepSparseAdamPush(float* table, int64_t width, const int64_t* slots, int64_t n,
                            const float* grads, int64_t dim, float* block, uint8_t* dirty,
                            int32_t step, double b1, double b2, double lr, double bc1,
                            double bc2, double lazy_scale, double eps, int32_t exact) {
  if (exact) {
    for (int64_t r = 0; r < n; ++r) {
      int32_t stored;  // last_step + 1; 0: never written (a fresh row has zero moments)
      std::memcpy(&stored, table + slots[r] * width, sizeof stored);
      if (stored != 0 && stored != step) return -1;
    }
  }
  const AdamScalars s = Scalars(b1, b2, lr, bc1, bc2, lazy_scale, eps, exact);
  int64_t not_finite = 0;
  constexpr int64_t kAhead = 8;  // rows fetched ahead: the gather waits on memory, not math
  for (int64_t r = 0; r < n; ++r) {
    if (r + kAhead < n) {
      const char* ahead = reinterpret_cast<const char*>(table + slots[r + kAhead] * width);
      for (int64_t byte = 0; byte < width * 4; byte += 64) __builtin_prefetch(ahead + byte);
    }
    float* row = block + r * width;
    std::memcpy(row, table + slots[r] * width, width * sizeof(float));
    AdamRow(row + 1, row + 1 + dim, row + 1 + 2 * dim, grads + r * dim, dim, s);
    bool finite = true;
    for (int64_t e = 1; e < width; ++e) finite &= std::isfinite(row[e]);
    not_finite += !finite;
  }
  if (not_finite) return not_finite;
  const int32_t stored = step + 1;
  for (int64_t r = 0; r < n; ++r) {
    float* row = block + r * width;
    std::memcpy(row, &stored, sizeof stored);
    std::memcpy(table + slots[r] * width, row, width * sizeof(float));
    dirty[slots[r]] = 1;
  }
  return 0;
}

}  // extern "C"
