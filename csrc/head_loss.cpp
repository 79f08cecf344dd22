// Native CPU inner step of `distill_head_loss` (iit_fast/ops/head_loss.py, impl="native"):
// per-row temperature softmax / log-softmax / KL / CE of one chunk of logits and their gradient, written in
// place over the student logits. The matmuls stay in the BLAS (torch.addmm); this is only the part between.
//
// Plain C ABI, no torch headers: built by torch.utils.cpp_extension.load(..., is_python_module=False)
// (module name iit_fast_head_loss_native) and called through ctypes, so it compiles in a couple of seconds.
// OpenMP over rows; each row (V fp32 of z_s and of z_t, ~240 KB at V=30522) stays in L2 across the passes.
//
// Math of one row, temperature T, a_s = z_s/T, a_t = z_t/T:
//   lse_s = logsumexp(a_s), lse_t = logsumexp(a_t), lse_1 = logsumexp(z_s)
//   KL(p_t || p_s) = sum_v p_t (a_t - a_s) - lse_t + lse_s            (sum_v p_t = 1)
//   CE(z_s, y)     = lse_1 - z_s[y]
//   dL/dz_s = w_kd T (p_s - p_t) + w_lab (p_1 - onehot(y))             (T^2 of the KL times 1/T)
// with p_s = exp(a_s - lse_s), p_t = exp(a_t - lse_t), p_1 = exp(z_s - lse_1).
#include <cmath>
#include <cstdint>

extern "C" {

// zs: (C, V) fp32, row stride zs_stride, overwritten with dL/dz_s
// zt: (C, V) fp32, row stride zt_stride, read only
// labels: (C,) int64 MLM targets (-100 = none) or nullptr (no CE: the iit pass)
// w_kd, w_lab: (C,) fp32 per-row weights (w_lab ignored without labels)
// kl, ce: (C,) fp32 outputs, per-row KL and CE (0 without a label); ce ignored without labels
// nthreads: OpenMP threads (torch.get_num_threads())
void iit_distill_head_loss_chunk_f32(float* zs, int64_t zs_stride, const float* zt, int64_t zt_stride,
                                     const int64_t* labels, const float* w_kd, const float* w_lab,
                                     float* kl, float* ce, int64_t C, int64_t V, float T, int nthreads) {
  const float inv_T = 1.0f / T;
  const bool has_labels = labels != nullptr;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t r = 0; r < C; ++r) {
    float* s = zs + r * zs_stride;
    const float* t = zt + r * zt_stride;
    // pass 1: maxima (T > 0, so max(a) = max(z) / T)
    float ms = s[0], mt = t[0];
#pragma omp simd reduction(max : ms, mt)
    for (int64_t v = 0; v < V; ++v) {
      ms = s[v] > ms ? s[v] : ms;
      mt = t[v] > mt ? t[v] : mt;
    }
    const float m_s = ms * inv_T, m_t = mt * inv_T, m_1 = ms;
    // pass 2: d_s = sum exp(a_s - m_s), d_t = sum e_t, x_t = sum e_t (a_t - a_s), d_1 = sum exp(z_s - m_1).
    // The row sums are accumulated in double: KL is a small difference of O(log V) terms when the two
    // distributions are close, so the sums' rounding would otherwise dominate its relative error.
    double d_s = 0.0, d_t = 0.0, x_t = 0.0, d_1 = 0.0;
    if (has_labels) {
#pragma omp simd reduction(+ : d_s, d_t, x_t, d_1)
      for (int64_t v = 0; v < V; ++v) {
        const float as = s[v] * inv_T, at = t[v] * inv_T;
        const float et = std::exp(at - m_t);
        d_s += std::exp(as - m_s);
        d_t += et;
        x_t += et * ((t[v] - s[v]) * inv_T);
        d_1 += std::exp(s[v] - m_1);
      }
    } else {
#pragma omp simd reduction(+ : d_s, d_t, x_t)
      for (int64_t v = 0; v < V; ++v) {
        const float as = s[v] * inv_T, at = t[v] * inv_T;
        const float et = std::exp(at - m_t);
        d_s += std::exp(as - m_s);
        d_t += et;
        x_t += et * ((t[v] - s[v]) * inv_T);
      }
    }
    const float lse_s = m_s + (float)std::log(d_s), lse_t = m_t + (float)std::log(d_t);
    // KL = sum p_t (a_t - a_s) - (lse_t - lse_s), the lse difference taken without rounding each lse
    kl[r] = (float)(x_t / d_t - ((double)m_t - (double)m_s) - std::log(d_t / d_s));
    const float g_kd = w_kd[r] * T;
    // pass 3: gradient over z_s
    if (has_labels) {
      const int64_t y = labels[r];
      const bool has = y >= 0 && y < V;
      const float lse_1 = m_1 + (float)std::log(d_1);
      ce[r] = has ? lse_1 - s[y] : 0.f;
      const float g_lab = has ? w_lab[r] : 0.f;
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) {
        const float z = s[v];
        const float p_s = std::exp(z * inv_T - lse_s), p_t = std::exp(t[v] * inv_T - lse_t);
        s[v] = g_kd * (p_s - p_t) + g_lab * std::exp(z - lse_1);
      }
      if (has) s[y] -= g_lab;  // - w_lab onehot(y)
    } else {
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) {
        const float p_s = std::exp(s[v] * inv_T - lse_s), p_t = std::exp(t[v] * inv_T - lse_t);
        s[v] = g_kd * (p_s - p_t);
      }
    }
  }
}

}  // extern "C"
