// Native CPU kernels of `interchange`, `hidden_loss` and `interchange_hidden_loss`
// (iit_fast/ops/interchange.py, impl="native").
//
// Plain C ABI, no torch headers: built by iit_fast.ops._native.load_native (torch.utils.cpp_extension.load,
// is_python_module=False) in a few seconds and called through ctypes. Every tensor is contiguous; the
// states are (B, S, D), token t = b * S + s. OpenMP over tokens, in dynamic chunks of 16 tokens (every
// token costs about the same, but on a shared machine a preempted thread would stall a static split), and
// `#pragma omp simd` over the hidden dims. Each kernel has a float (fp32 storage, fp32 accumulation)
// and a double (fp64, for gradcheck) instance.
//
// interchange: out[b, s] = x[b, s] except, for s in the base span [bs_b, bs_b + k_b),
//     out[b, s, d0:d1] = x[pi_b, ss_b + s - bs_b, d0:d1].
// Its backward is written as a gather, so it is conflict free for any pi (not only permutations):
//     gx[r, p]        = g[r, p] with dims d0:d1 zeroed if p is in r's base span
//     gx[r, p, d0:d1] += g[i, bs_i + p - ss_i, d0:d1]  for every i with pi_i = r and p in i's source span
// The rows i with pi_i = r are given as CSR (src_off: (B + 1,), src_rows: (B,), rows sorted by pi).
//
// hidden_loss, per token with weight w = mask / n_masked (w = 0: loss 0, gradient 0, s and t not read):
//     cos: l = 1 - c, c = <s, t> / (max(|s|, eps) max(|t|, eps)),
//          dl/ds = -(t / (|s| |t|) - c s / |s|^2)             (norms clamped at eps as in the reference)
//     mse: l = mean_d (s - t)^2,  dl/ds = 2 (s - t) / D
// The kernels write w * l per token (the caller sums) and grad = w * dl/ds (the loss is the last op).
#include <cmath>
#include <cstdint>

namespace {

template <typename T>
inline void copy_row(T* __restrict dst, const T* __restrict src, int64_t n) {
  // a plain vectorised loop: glibc's memcpy takes `rep movsb` at these sizes (1.5 - 3 KB rows), which ran
  // ~1.5x slower than this loop here
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

template <typename T>
inline bool in_span(int64_t p, int64_t start, int64_t len) { return p >= start && p < start + len; }

// Counterfactual token (b, s) into out_row.
template <typename T>
inline void interchange_token(const T* x, T* out_row, const int64_t* pi, const int64_t* bs, const int64_t* ss,
                              const int64_t* k, int64_t b, int64_t s, int64_t S, int64_t D, int64_t d0,
                              int64_t d1) {
  const T* row = x + (b * S + s) * D;
  if (in_span<T>(s, bs[b], k[b])) {
    const T* src = x + (pi[b] * S + ss[b] + s - bs[b]) * D;
    if (d0 > 0) copy_row(out_row, row, d0);
    copy_row(out_row + d0, src + d0, d1 - d0);
    if (d1 < D) copy_row(out_row + d1, row + d1, D - d1);
  } else {
    copy_row(out_row, row, D);
  }
}

// Per-token loss and gradient; returns w * l.
template <typename T, typename A>
inline A hidden_loss_token(const T* __restrict s, const T* __restrict t, T* __restrict g, A w, int64_t D,
                           int kind_cos) {
  if (w == A(0)) {
    for (int64_t d = 0; d < D; ++d) g[d] = T(0);
    return A(0);
  }
  if (kind_cos) {
    A st = 0, ss = 0, tt = 0;
#pragma omp simd reduction(+ : st, ss, tt)
    for (int64_t d = 0; d < D; ++d) {
      const A a = A(s[d]), b = A(t[d]);
      st += a * b;
      ss += a * a;
      tt += b * b;
    }
    const A eps = A(1e-8);
    const A ns = std::fmax(std::sqrt(ss), eps), nt = std::fmax(std::sqrt(tt), eps);
    const A c = st / (ns * nt);
    // dl/ds = -(t / (ns nt) - c s / ns^2)
    const A ct = -w / (ns * nt), cs = w * c / (ns * ns);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) g[d] = T(ct * A(t[d]) + cs * A(s[d]));
    return w * (A(1) - c);
  }
  A acc = 0;
  const A c2 = A(2) * w / A(D);
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) {
    const A diff = A(s[d]) - A(t[d]);
    acc += diff * diff;
    g[d] = T(c2 * diff);
  }
  return w * acc / A(D);
}

template <typename T>
void interchange_fwd(const T* x, T* out, const int64_t* pi, const int64_t* bs, const int64_t* ss,
                     const int64_t* k, int64_t B, int64_t S, int64_t D, int64_t d0, int64_t d1, int nthreads) {
  const int64_t N = B * S;
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
  for (int64_t tok = 0; tok < N; ++tok) {
    const int64_t b = tok / S, s = tok % S;
    interchange_token(x, out + tok * D, pi, bs, ss, k, b, s, S, D, d0, d1);
  }
}

// gx = interchange_backward(g) + scale * gh; g or gh may be null (then that term is absent).
template <typename T>
void interchange_bwd(const T* g, const T* gh, T scale, T* gx, const int64_t* bs, const int64_t* ss,
                     const int64_t* k, const int64_t* src_off, const int64_t* src_rows, int64_t B, int64_t S,
                     int64_t D, int64_t d0, int64_t d1, int nthreads) {
  const int64_t N = B * S;
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
  for (int64_t tok = 0; tok < N; ++tok) {
    const int64_t r = tok / S, p = tok % S;
    T* __restrict o = gx + tok * D;
    if (g != nullptr) {
      const T* __restrict gr = g + tok * D;
      if (gh != nullptr) {
        const T* __restrict hr = gh + tok * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = gr[d] + scale * hr[d];
      } else {
        copy_row(o, gr, D);
      }
      if (in_span<T>(p, bs[r], k[r])) {  // these dims were overwritten: no gradient to x[r, p] through them
        if (gh != nullptr) {
          const T* __restrict hr = gh + tok * D;
#pragma omp simd
          for (int64_t d = d0; d < d1; ++d) o[d] = scale * hr[d];
        } else {
          for (int64_t d = d0; d < d1; ++d) o[d] = T(0);
        }
      }
      for (int64_t j = src_off[r]; j < src_off[r + 1]; ++j) {
        const int64_t i = src_rows[j];
        if (in_span<T>(p, ss[i], k[i])) {
          const T* __restrict gi = g + (i * S + bs[i] + p - ss[i]) * D;
#pragma omp simd
          for (int64_t d = d0; d < d1; ++d) o[d] += gi[d];
        }
      }
    } else {
      const T* __restrict hr = gh + tok * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = scale * hr[d];
    }
  }
}

template <typename T, typename A>
void hidden_loss_fwd(const T* s, const T* t, const A* w, T* grad, A* loss_tok, int64_t N, int64_t D,
                     int kind_cos, int nthreads) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
  for (int64_t tok = 0; tok < N; ++tok)
    loss_tok[tok] = hidden_loss_token<T, A>(s + tok * D, t + tok * D, grad + tok * D, w[tok], D, kind_cos);
}

template <typename T, typename A>
void interchange_hidden_loss_fwd(const T* x, const T* t, const A* w, T* out, T* grad, A* loss_tok,
                                 const int64_t* pi, const int64_t* bs, const int64_t* ss, const int64_t* k,
                                 int64_t B, int64_t S, int64_t D, int64_t d0, int64_t d1, int kind_cos,
                                 int nthreads) {
  const int64_t N = B * S;
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
  for (int64_t tok = 0; tok < N; ++tok) {
    const int64_t b = tok / S, s = tok % S;
    // the row of x is read once for both: copied into out, and reduced against the teacher (hot in L1)
    interchange_token(x, out + tok * D, pi, bs, ss, k, b, s, S, D, d0, d1);
    loss_tok[tok] = hidden_loss_token<T, A>(x + tok * D, t + tok * D, grad + tok * D, w[tok], D, kind_cos);
  }
}

}  // namespace

extern "C" {

#define IIT_INSTANCES(SUF, T, A)                                                                             \
  void iit_interchange_fwd_##SUF(const T* x, T* out, const int64_t* pi, const int64_t* bs, const int64_t* ss, \
                                 const int64_t* k, int64_t B, int64_t S, int64_t D, int64_t d0, int64_t d1,   \
                                 int nthreads) {                                                             \
    interchange_fwd<T>(x, out, pi, bs, ss, k, B, S, D, d0, d1, nthreads);                                    \
  }                                                                                                          \
  void iit_interchange_bwd_##SUF(const T* g, const T* gh, double scale, T* gx, const int64_t* bs,            \
                                 const int64_t* ss, const int64_t* k, const int64_t* src_off,                \
                                 const int64_t* src_rows, int64_t B, int64_t S, int64_t D, int64_t d0,       \
                                 int64_t d1, int nthreads) {                                                 \
    interchange_bwd<T>(g, gh, T(scale), gx, bs, ss, k, src_off, src_rows, B, S, D, d0, d1, nthreads);        \
  }                                                                                                          \
  void iit_hidden_loss_fwd_##SUF(const T* s, const T* t, const A* w, T* grad, A* loss_tok, int64_t N,        \
                                 int64_t D, int kind_cos, int nthreads) {                                    \
    hidden_loss_fwd<T, A>(s, t, w, grad, loss_tok, N, D, kind_cos, nthreads);                                \
  }                                                                                                          \
  void iit_interchange_hidden_loss_fwd_##SUF(const T* x, const T* t, const A* w, T* out, T* grad, A* loss_tok, \
                                             const int64_t* pi, const int64_t* bs, const int64_t* ss,        \
                                             const int64_t* k, int64_t B, int64_t S, int64_t D, int64_t d0,  \
                                             int64_t d1, int kind_cos, int nthreads) {                       \
    interchange_hidden_loss_fwd<T, A>(x, t, w, out, grad, loss_tok, pi, bs, ss, k, B, S, D, d0, d1, kind_cos, \
                                      nthreads);                                                             \
  }

IIT_INSTANCES(f32, float, float)
IIT_INSTANCES(f64, double, double)

}  // extern "C"
