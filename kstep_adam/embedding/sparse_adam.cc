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

extern "C" {

// params [n, dim] and slots [n, 2 dim] (m then v) are float32 rows `params_stride` and
// `slots_stride` floats apart (a table's block holds both in one row: the same stride);
// grads [n, dim] is float32, contiguous. `exact` picks optax.adam's update (bias corrections
// bc1, bc2) over the lazy one (lazy_scale).
void KstepSparseAdamApply(float* params, int64_t params_stride, float* slots,
                          int64_t slots_stride, const float* grads, int64_t n, int64_t dim,
                          double b1, double b2, double lr, double bc1, double bc2,
                          double lazy_scale, double eps, int32_t exact) {
  const float b1f = static_cast<float>(b1), b2f = static_cast<float>(b2);
  const double c1 = 1.0 - b1, c2 = 1.0 - b2;
  for (int64_t r = 0; r < n; ++r) {
    float* p = params + r * params_stride;
    float* m_row = slots + r * slots_stride;
    float* v_row = m_row + dim;
    const float* g_row = grads + r * dim;
    for (int64_t e = 0; e < dim; ++e) {
      const double g = static_cast<double>(g_row[e]);
      const float m32 = b1f * m_row[e] + 0.0f;
      const float v32 = b2f * v_row[e] + 0.0f;
      const double m = static_cast<double>(m32) + (c1 * g + 0.0);
      const double v = static_cast<double>(v32) + (c2 * g * g + 0.0);
      const double update =
          exact ? (m / bc1) / (std::sqrt(v / bc2) + eps) : lazy_scale * m / (std::sqrt(v) + eps);
      p[e] = static_cast<float>(static_cast<double>(p[e]) - (lr * update + 0.0));
      m_row[e] = static_cast<float>(m);
      v_row[e] = static_cast<float>(v);
    }
  }
}

}  // extern "C"
