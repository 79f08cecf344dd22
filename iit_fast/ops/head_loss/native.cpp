// Native CPU inner step of `distill_head_loss` (iit_fast/ops/head_loss.py, impl="native"):
// per-row temperature softmax / KL / CE of one chunk of logits and their gradient, written in place over the
// student logits. The matmuls stay in the BLAS (torch.addmm); this is only the part between.
//
// The other divergences (reverse KL, jsd, skew KL, skew reverse KL, TVD) are row_step_div below, a 4th
// pass per row; forward KL's row_step is unchanged by them. The op's passes over vocabulary slices
// (slices.py) use slice_step / slice_step_div (the backward) and fold_row (forward KL's forward).
//
// Plain C ABI, no torch headers: built by iit_fast/ops/_native.py (torch.utils.cpp_extension.load with
// `-O3 -fopenmp`, no -march=native, no -ffast-math) and called through ctypes. OpenMP over rows; each row
// (V fp32 of z_s and of z_t, ~240 KB at V=30522) stays in L2 across the passes.
//
// Vector code without -march=native: the row step is compiled three times (target_clones: AVX-512, AVX2+FMA,
// baseline x86-64) and the loader picks the one this CPU runs, so a build cache shared by different machines
// stays correct. exp is hand-written (exp_f32 below), plain arithmetic that `omp simd` vectorises, so no
// -ffast-math (which would also let the compiler reorder the sums) and no libmvec are needed.
//
// Math of one row, temperature T, a_s = z_s/T, a_t = z_t/T:
//   lse_s = logsumexp(a_s), lse_t = logsumexp(a_t), lse_1 = logsumexp(z_s)
//   p_s = softmax(a_s), p_t = softmax(a_t), p_1 = softmax(z_s), u = log(p_s / p_t)
//   KL(p_t || p_s) = sum_v p_t (e^u - 1 - u)     (every term >= 0: no cancellation, never negative)
//   CE(z_s, y)     = lse_1 - z_s[y]
//   dL/dz_s = g_kd T (p_s - p_t) + g_lab (p_1 - onehot(y))      (T^2 of the KL times 1/T)
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define IIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IIT_CLONES
#endif

namespace {

#define IIT_INLINE inline __attribute__((always_inline))

// Horner's rule, highest power first: c[0] x^(N-1) + c[1] x^(N-2) + ... + c[N-1] (the series below; inlined and
// unrolled, it is the same arithmetic as the chain written out)
template <int N>
IIT_INLINE float horner(float x, const float (&c)[N]) {
  float p = c[0];
  for (int k = 1; k < N; ++k) p = p * x + c[k];
  return p;
}

// exp(x) for x <= 88: 2^n e^r, n = rint(x log2 e), r = x - n ln 2 (Cody-Waite, two-part ln 2), e^r by its
// Taylor series to r^7 (|r| <= ln2/2: truncation < 3e-9 relative; ~2 ulp in all). Below -87.3 the result is
// 0, not a denormal: such a probability is < 2^-126 of every row sum it enters.
inline float exp_f32(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float shift = 12582912.0f;                 // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504f + shift) - shift;
  float r = xc - n * 0.693359375f;                 // ln 2 high part: n * it is exact
  r = r - n * -2.12194440e-4f;                     // ln 2 low part
  const float p = horner(r, {1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f,
                             1.0f});
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

// p_t (e^u - 1 - u), u = log(p_s / p_t): the series sum_{k>=2} u^k / k! for |u| < 1 (Horner to k = 13,
// truncation < 1e-10 relative), else p_s - p_t (1 + u), which has no cancellation there.
inline float kl_term(float p_s, float p_t, float u) {
  const float h = horner(u, {1.0f / 6227020800.0f, 1.0f / 479001600.0f, 1.0f / 39916800.0f,   // 1/13!, ...
                             1.0f / 3628800.0f, 1.0f / 362880.0f, 1.0f / 40320.0f, 1.0f / 5040.0f,
                             1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f});
  const float series = p_t * (h * u * u);
  const float direct = p_s - p_t * (1.0f + u);
  return std::fabs(u) < 1.0f ? series : direct;
}

// Row sums (of exps, of KL terms) run in fp32 over blocks of BLOCK elements and add the blocks in double:
// a double vector reduction is ~4x slower (and does not vectorise below AVX-512 with the KL's selects); the
// terms are all >= 0, so the relative error stays below ~1e-6 however small the sum or the KL is.
constexpr int64_t BLOCK = 512;

// The per-row statistics a vocabulary slice of the backward needs (slice_step below): what pass 3 of the
// row step reads, as it reads them. NSTATS floats a row: m_s, m_t, r_s, r_t, c (= lse_s - lse_t), m_1, r_1, S.
constexpr int64_t NSTATS = 8;
inline void store_stats(float* st, float m_s, float m_t, float r_s, float r_t, float c, float m_1, float r_1,
                        float S) {
  st[0] = m_s; st[1] = m_t; st[2] = r_s; st[3] = r_t; st[4] = c; st[5] = m_1; st[6] = r_1; st[7] = S;
}

// Passes 1 and 2 of a row (row_step and row_step_div): the maxima, then the sums of exps in fp32 blocks
// added in double. m_s = max(z_s) / T, m_t = max(z_t) / T, m_1 = max(z_s); d_s = sum exp(a_s - m_s),
// d_t = sum exp(a_t - m_t), d_1 = sum exp(z_s - m_1) (0 without labels: the CE is not wanted); r_s = 1 / d_s,
// r_t = 1 / d_t, c = lse_s - lse_t.
struct RowSums {
  float m_s, m_t, m_1;
  double d_s, d_t, d_1;
  float r_s, r_t, c;
};

// Its own target clones (not inlined: an always_inline callee of a cloned function keeps the default
// target's vector width, so its sums would round differently from the cloned row steps' own loops).
IIT_CLONES
RowSums row_sums(const float* s, const float* t, int64_t V, float inv_T, bool has_labels) {
  // pass 1: maxima (T > 0, so max(a) = max(z) / T)
  float ms = s[0], mt = t[0];
#pragma omp simd reduction(max : ms, mt)
  for (int64_t v = 0; v < V; ++v) {
    ms = s[v] > ms ? s[v] : ms;
    mt = t[v] > mt ? t[v] : mt;
  }
  const float m_s = ms * inv_T, m_t = mt * inv_T, m_1 = ms;
  // pass 2: d_s = sum exp(a_s - m_s), d_t = sum exp(a_t - m_t), d_1 = sum exp(z_s - m_1)
  double d_s = 0.0, d_t = 0.0, d_1 = 0.0;
  for (int64_t v0 = 0; v0 < V; v0 += BLOCK) {
    const int64_t v1 = v0 + BLOCK < V ? v0 + BLOCK : V;
    float bs = 0.f, bt = 0.f, b1 = 0.f;
    if (has_labels) {
#pragma omp simd reduction(+ : bs, bt, b1)
      for (int64_t v = v0; v < v1; ++v) {
        bs += exp_f32(s[v] * inv_T - m_s);
        bt += exp_f32(t[v] * inv_T - m_t);
        b1 += exp_f32(s[v] - m_1);
      }
    } else {
#pragma omp simd reduction(+ : bs, bt)
      for (int64_t v = v0; v < v1; ++v) {
        bs += exp_f32(s[v] * inv_T - m_s);
        bt += exp_f32(t[v] * inv_T - m_t);
      }
    }
    d_s += bs;
    d_t += bt;
    d_1 += b1;
  }
  // p = exp(a - m) / d, not exp(a - lse): a rounded lse would put eps * |lse| into every p, and p_s - p_t is
  // small when teacher ~= student
  const float r_s = (float)(1.0 / d_s), r_t = (float)(1.0 / d_t);
  // lse_s - lse_t without rounding either lse (u is small when p_s ~ p_t)
  const float c = (float)(((double)m_s - (double)m_t) + std::log(d_s / d_t));
  return {m_s, m_t, m_1, d_s, d_t, d_1, r_s, r_t, c};
}

// Pass 3 of the forward-KL row step over n logits (a whole row, or a vocabulary slice of it), from the
// statistics (m_s, m_t, r_s, r_t, c; m_1, r_1 with LABELS): with KL, the sum of the KL terms
// p_t (e^u - 1 - u), u = (z_s - z_t) / T - c, in fp32 blocks added in double (else 0); with DZ,
// dz = gk (p_s - p_t) (+ gl p_1 with LABELS) written over s, element for element the same wherever it runs
// (row_step, slice_step). One template for the three callers: row_step (KL, DZ), slice_step (DZ), the
// forward's fold_row (KL). Its own target clones, as row_sums (its sums must round as the clones' loops).
template <bool LABELS, bool KL, bool DZ>
IIT_CLONES
double pass3(float* s, const float* t, int64_t n, float inv_T, float m_s, float m_t, float r_s, float r_t,
             float c, float gk, float gl, float m_1, float r_1) {
  // the loop body: dz of element v (DZ), and its KL term added to `acc` (KL)
#define IIT_PASS3_BODY(acc)                                                                                \
  const float z = s[v], zt = t[v];                                                                         \
  const float p_s = exp_f32(z * inv_T - m_s) * r_s, p_t = exp_f32(zt * inv_T - m_t) * r_t;                 \
  if (KL) acc += kl_term(p_s, p_t, (z - zt) * inv_T - c);                                                  \
  if (DZ) s[v] = LABELS ? gk * (p_s - p_t) + gl * (exp_f32(z - m_1) * r_1) : gk * (p_s - p_t);
  if (!KL) {  // one loop, no blocks: a blocked loop's vector epilogues round the last elements differently
    float unused = 0.f;
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) { IIT_PASS3_BODY(unused) }
    return 0.0;
  }
  double kl = 0.0;
  for (int64_t v0 = 0; v0 < n; v0 += BLOCK) {
    const int64_t v1 = v0 + BLOCK < n ? v0 + BLOCK : n;
    float kl_block = 0.f;
#pragma omp simd reduction(+ : kl_block)
    for (int64_t v = v0; v < v1; ++v) { IIT_PASS3_BODY(kl_block) }
    kl += kl_block;
  }
#undef IIT_PASS3_BODY
  return kl;
}

// The CE part of a row, from its sums (both row steps): has (a label in [0, V)), gl (g_lab where it has one,
// else 0), r_1 = 1 / d_1 (0 without labels), and with labels CE = lse_1 - z_s[y] (0 without a label) into
// ce_out, read before pass 3 overwrites z_s.
struct RowLabel {
  bool has;
  float gl, r_1;
};
inline RowLabel row_label(const RowSums& rs, const float* s, int64_t V, bool has_labels, int64_t y, float g_lab,
                          float* ce_out) {
  const bool has = has_labels && y >= 0 && y < V;
  if (has_labels) *ce_out = has ? (float)((double)rs.m_1 + std::log(rs.d_1)) - s[y] : 0.f;
  return {has, has ? g_lab : 0.f, has_labels ? (float)(1.0 / rs.d_1) : 0.f};
}

IIT_CLONES
void row_step(float* s, const float* t, int64_t V, float T, float g_kd, bool has_labels, int64_t y,
              float g_lab, float* kl_out, float* ce_out, float* st) {
  const float inv_T = 1.0f / T, gk = g_kd * T;
  const RowSums rs = row_sums(s, t, V, inv_T, has_labels);
  const RowLabel lb = row_label(rs, s, V, has_labels, y, g_lab, ce_out);
  if (st) store_stats(st, rs.m_s, rs.m_t, rs.r_s, rs.r_t, rs.c, rs.m_1, lb.r_1, 0.f);
  // pass 3: KL terms and the gradient over z_s
  const double kl =
      has_labels ? pass3<true, true, true>(s, t, V, inv_T, rs.m_s, rs.m_t, rs.r_s, rs.r_t, rs.c, gk, lb.gl, rs.m_1,
                                           lb.r_1)
                 : pass3<false, true, true>(s, t, V, inv_T, rs.m_s, rs.m_t, rs.r_s, rs.r_t, rs.c, gk, 0.f, 0.f, 0.f);
  if (lb.has) s[y] -= lb.gl;  // - g_lab onehot(y)
  *kl_out = (float)kl;
}

// The gradient over one vocabulary slice [v0, v0 + Vs) of a row, from the row's statistics (store_stats):
// pass 3 of row_step without its KL sum, so dz is the row step's, element for element. s, t: the slice's
// student / teacher logits; s is overwritten with dz. y: the row's label (global id), V: the vocabulary.
void slice_step(float* s, const float* t, int64_t Vs, int64_t v0, int64_t V, float T, float g_kd,
                bool has_labels, int64_t y, float g_lab, const float* st) {
  const float inv_T = 1.0f / T;
  const float m_s = st[0], m_t = st[1], r_s = st[2], r_t = st[3], m_1 = st[5], r_1 = st[6];
  const float gk = g_kd * T;
  const bool has = has_labels && y >= 0 && y < V;
  const float gl = has ? g_lab : 0.f;
  if (has_labels)
    pass3<true, false, true>(s, t, Vs, inv_T, m_s, m_t, r_s, r_t, 0.f, gk, gl, m_1, r_1);
  else
    pass3<false, false, true>(s, t, Vs, inv_T, m_s, m_t, r_s, r_t, 0.f, gk, 0.f, 0.f, 0.f);
  if (has && y >= v0 && y < v0 + Vs) s[y - v0] -= gl;  // - g_lab onehot(y)
}

// ---- The forward over vocabulary slices (forward KL; slices.py): a row's logits come one slice
// [v0, v0 + Vs) at a time, each folded into the row's running state, so each weight slice is cast once per
// call and no row is whole. A slice's own softmaxes (row_sums over it) give its log-sum-exps and the KL of
// its conditional distributions (pass3); the KL's chain rule over a partition of the vocabulary, with P_j,
// Q_j the teacher's / student's mass of part j,
//   KL(p_t || p_s) = sum_j P_j KL(p_t|j || p_s|j) + sum_j P_j (e^u_j - 1 - u_j),   u_j = log(Q_j / P_j),
// keeps every term >= 0 (no cancellation, as in the row step); it is applied to two parts at a time: the
// ids so far and the new slice. State, NFOLD doubles a row: the maxima so far m_s, m_t, m_1 (floats, as
// row_sums takes them), the log-sum-exps L_s, L_t, L_1 over the ids so far, K (their KL), z_s[y].
constexpr int64_t NFOLD = 8;

// P (e^u - 1 - u) in double, Q = P e^u: (u^2 / 2)(1 + u/3 (1 + u/4 (...))) to u^19 for |u| < 1 (truncation
// < 1e-17 relative), else Q - P (1 + u) (no cancellation there)
inline double kl_part(double P, double Q, double u) {
  double h = 1.0;
  for (int k = 19; k >= 3; --k) h = 1.0 + h * u / k;
  return std::fabs(u) < 1.0 ? P * (0.5 * u * u * h) : Q - P * (1.0 + u);
}

inline double log_add(double a, double b) {
  const double m = a > b ? a : b;
  return m + std::log1p(std::exp(-std::fabs(a - b)));
}

IIT_CLONES
void fold_row(const float* s, const float* t, int64_t Vs, int64_t v0, float inv_T, bool has_labels, int64_t y,
              double* st) {
  const RowSums rs = row_sums(s, t, Vs, inv_T, has_labels);
  const double kl = pass3<false, true, false>(const_cast<float*>(s), t, Vs, inv_T, rs.m_s, rs.m_t, rs.r_s,
                                              rs.r_t, rs.c, 0.f, 0.f, 0.f, 0.f);
  const double l_s = (double)rs.m_s + std::log(rs.d_s), l_t = (double)rs.m_t + std::log(rs.d_t);
  const double l_1 = has_labels ? (double)rs.m_1 + std::log(rs.d_1) : 0.0;
  const double z_y = has_labels && y >= v0 && y < v0 + Vs ? (double)s[y - v0] : (v0 == 0 ? 0.0 : st[7]);
  if (v0 == 0) {
    st[0] = rs.m_s; st[1] = rs.m_t; st[2] = rs.m_1; st[3] = l_s; st[4] = l_t; st[5] = l_1; st[6] = kl;
    st[7] = z_y;
    return;
  }
  const double L_s = log_add(st[3], l_s), L_t = log_add(st[4], l_t);
  // the two parts' masses (P: teacher, Q: student) and u = log(Q / P), from the log-sum-exps
  const double P_u = std::exp(st[4] - L_t), P_j = std::exp(l_t - L_t);
  const double Q_u = std::exp(st[3] - L_s), Q_j = std::exp(l_s - L_s);
  const double u_u = (st[3] - L_s) - (st[4] - L_t), u_j = (l_s - L_s) - (l_t - L_t);
  st[6] = (P_u * st[6] + P_j * kl) + (kl_part(P_u, Q_u, u_u) + kl_part(P_j, Q_j, u_j));
  st[0] = st[0] > rs.m_s ? st[0] : rs.m_s;
  st[1] = st[1] > rs.m_t ? st[1] : rs.m_t;
  st[2] = st[2] > rs.m_1 ? st[2] : rs.m_1;
  st[3] = L_s;
  st[4] = L_t;
  if (has_labels) st[5] = log_add(st[5], l_1);
  st[7] = z_y;
}

// ---- Divergences other than forward KL (iit_fast/ops/head_loss/divergence.py has the math and its
// derivation). kind: 1 reverse_kl, 2 jsd (c = beta), 3 skew_kl (c = alpha), 4 skew_reverse_kl (c = alpha),
// 5 tvd. Per element, from p (student), q (teacher), u = log(p / q) (from the logits, finite):
//   term >= 0 (D = sum term),  g (dD/dp up to a constant),  s (S = sum s = sum_v p_v g_v);
// dD/da_v = p_v (g_v - S). S is known only after the whole row, so pass 3 stores A = gk p g + gl p_1 over
// the teacher logits and B = gk p over the student logits, and pass 4 writes dz = A - S B.

// IIT_INLINE (always inlined): a call left in an `omp simd` loop keeps it scalar.

// e^x - 1 for x <= 0: its series for x > -1/2 (to x^9 / 9!: truncation < 3e-10 relative), else
// exp_f32(x) - 1 (>= 0.39 in size there: no cancellation)
IIT_INLINE float expm1_neg(float x) {
  const float p = horner(x, {1.0f / 362880.0f, 1.0f / 40320.0f, 1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f,
                             1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f});
  const float series = p * x, direct = exp_f32(x) - 1.0f;   // both computed: a select, no branch
  return x > -0.5f ? series : direct;
}

// log(x) for a normal x > 0: x = 2^e m, m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m - 1) / (m + 1),
// |s| < 0.172, its series to s^11 (truncation < 1e-10 relative); ln 2 in two parts. Plain arithmetic that
// `omp simd` vectorises (no libm call).
IIT_INLINE float log_f32(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 127;
  const int32_t mbits = (bits & 0x7fffff) | 0x3f800000;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool big = m > 1.41421356f;
  const float half = 0.5f * m;
  m = big ? half : m;
  e = big ? e + 1 : e;
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const float t = horner(s2, {1.0f / 11.0f, 1.0f / 9.0f, 1.0f / 7.0f, 1.0f / 5.0f, 1.0f / 3.0f, 1.0f});
  const float fe = (float)e;
  return fe * 0.693359375f + (fe * -2.12194440e-4f + 2.0f * s * t);
}

// log(1 + y) for y in (-1, 0]: log(w) y / (w - 1), w = 1 + y (Goldberg: the rounding of w cancels)
IIT_INLINE float log1p_f32(float y) {
  const float w = 1.0f + y;
  const bool one = w == 1.0f;
  // the division outside the select: GCC does not if-convert a possibly trapping division (no -ffast-math),
  // and a branch in the loop stops its vectorisation
  const float r = log_f32(w) * (y / (one ? 1.0f : w - 1.0f));
  return one ? y : r;
}

// log((1 - lam) + lam e^x), lam in (0, 1): log1p(lam expm1(x)) for x <= 0, x + log1p((1 - lam) expm1(-x))
// for x > 0 (no overflow; accurate near x = 0, where the divergences are small)
IIT_INLINE float mixlog(float lam, float x) {
  const bool neg = x <= 0.0f;
  const float l = neg ? lam : 1.0f - lam;
  return log1p_f32(l * expm1_neg(neg ? x : -x)) + (neg ? 0.0f : x);
}

template <int KIND>
IIT_INLINE void div_elem(float p, float q, float u, float c, float& term, float& g, float& s) {
  if (KIND == 1) {                        // reverse_kl: KL(p || q), g = u, S = D
    term = kl_term(q, p, -u);
    g = u;
    s = term;
  } else if (KIND == 2) {                 // jsd: M = c q + (1 - c) p, lm = log(M / p)
    const float lm = mixlog(c, -u), m = c * q + (1.0f - c) * p;
    const float kp = kl_term(m, p, lm);   // KL(p || M) term
    term = c * kl_term(m, q, lm + u) + (1.0f - c) * kp;
    g = -(1.0f - c) * lm;
    s = (1.0f - c) * kp;
  } else if (KIND == 3) {                 // skew_kl: KL(q || M), M = c q + (1 - c) p, lq = log(M / q)
    const float lq = mixlog(1.0f - c, u);
    term = kl_term(c * q + (1.0f - c) * p, q, lq);
    g = -(1.0f - c) * exp_f32(-lq);       // -(1 - c) q / M
    s = p * g;
  } else if (KIND == 4) {                 // skew_reverse_kl: KL(p || M), M = c p + (1 - c) q, lm = log(M / p)
    const float lm = mixlog(1.0f - c, -u), r = exp_f32(-lm);   // r = p / M
    term = kl_term(c * p + (1.0f - c) * q, p, lm);
    g = -lm - c * r;
    s = term - c * p * r;
  } else {                                // tvd: |p - q| / 2, g = sign(u) / 2
    term = 0.5f * std::fabs(p - q);
    g = u > 0.0f ? 0.5f : (u < 0.0f ? -0.5f : 0.0f);
    s = p * g;
  }
}

template <int KIND>
IIT_CLONES
void row_step_div(float* s, float* t, int64_t V, float T, float c, float g_kd, bool has_labels, int64_t y,
                  float g_lab, float* d_out, float* ce_out, float* st) {
  const float inv_T = 1.0f / T, gk = g_kd * T;
  // passes 1 and 2, and the CE: as row_step
  const RowSums rs = row_sums(s, t, V, inv_T, has_labels);
  const RowLabel lb = row_label(rs, s, V, has_labels, y, g_lab, ce_out);
  const float m_s = rs.m_s, m_t = rs.m_t, m_1 = rs.m_1, r_s = rs.r_s, r_t = rs.r_t, cst = rs.c;
  const bool has = lb.has;
  const float gl = lb.gl, r_1 = lb.r_1;
  // pass 3: the terms, S, and A (over t), B (over s)
  double D = 0.0, S = 0.0;
  for (int64_t v0 = 0; v0 < V; v0 += BLOCK) {
    const int64_t v1 = v0 + BLOCK < V ? v0 + BLOCK : V;
    float d_block = 0.f, s_block = 0.f;
#pragma omp simd reduction(+ : d_block, s_block)
    for (int64_t v = v0; v < v1; ++v) {
      const float z = s[v], zt = t[v];
      const float p = exp_f32(z * inv_T - m_s) * r_s, q = exp_f32(zt * inv_T - m_t) * r_t;
      float term, g, st;
      div_elem<KIND>(p, q, (z - zt) * inv_T - cst, c, term, g, st);
      d_block += term;
      s_block += st;
      t[v] = gk * (p * g) + gl * (exp_f32(z - m_1) * r_1);
      s[v] = gk * p;
    }
    D += d_block;
    S += s_block;
  }
  // pass 4: dz = A - S B
  const float Sf = (float)S;
  if (st) store_stats(st, m_s, m_t, r_s, r_t, cst, m_1, r_1, Sf);
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) s[v] = t[v] - Sf * s[v];
  if (has) s[y] -= gl;  // - g_lab onehot(y)
  *d_out = (float)D;
}

// The gradient over one vocabulary slice of a row for a divergence other than forward KL, from the row's
// statistics (S included): passes 3 and 4 of row_step_div in one, dz = A - S B element for element.
template <int KIND>
IIT_CLONES
void slice_step_div(float* s, const float* t, int64_t Vs, int64_t v0, int64_t V, float T, float c, float g_kd,
                    bool has_labels, int64_t y, float g_lab, const float* st) {
  const float inv_T = 1.0f / T;
  const float m_s = st[0], m_t = st[1], r_s = st[2], r_t = st[3], cst = st[4], m_1 = st[5], r_1 = st[6];
  const float Sf = st[7];
  const float gk = g_kd * T;
  const bool has = has_labels && y >= 0 && y < V;
  const float gl = has ? g_lab : 0.f;
#pragma omp simd
  for (int64_t v = 0; v < Vs; ++v) {
    const float z = s[v], zt = t[v];
    const float p = exp_f32(z * inv_T - m_s) * r_s, q = exp_f32(zt * inv_T - m_t) * r_t;
    float term, g, sv;
    div_elem<KIND>(p, q, (z - zt) * inv_T - cst, c, term, g, sv);
    const float A = gk * (p * g) + gl * (exp_f32(z - m_1) * r_1);
    const float B = gk * p;
    s[v] = A - Sf * B;
  }
  if (has && y >= v0 && y < v0 + Vs) s[y - v0] -= gl;  // - g_lab onehot(y)
}

}  // namespace

extern "C" {

// zs: (C, V) fp32, row stride zs_stride, overwritten with dL/dz_s
// zt: (C, V) fp32, row stride zt_stride, read only
// labels: (C,) int64 MLM targets (-100 = none) or nullptr (no CE: the iit pass, or lm_weight = 0)
// g_kd, g_lab: (C,) fp32 per-row gradient weights (g_lab ignored without labels)
// kl, ce: (C,) fp32 outputs, per-row KL and CE (0 without a label); ce ignored without labels
// stats: (C, NSTATS) fp32 out, the rows' statistics for slice steps, or nullptr
// nthreads: OpenMP threads
void iit_distill_head_loss_chunk_f32(float* zs, int64_t zs_stride, const float* zt, int64_t zt_stride,
                                     const int64_t* labels, const float* g_kd, const float* g_lab,
                                     float* kl, float* ce, float* stats, int64_t C, int64_t V, float T,
                                     int nthreads) {
  const bool has_labels = labels != nullptr;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t r = 0; r < C; ++r) {
    row_step(zs + r * zs_stride, zt + r * zt_stride, V, T, g_kd[r], has_labels, has_labels ? labels[r] : -1,
             has_labels ? g_lab[r] : 0.f, kl + r, has_labels ? ce + r : nullptr,
             stats ? stats + r * NSTATS : nullptr);
  }
}

// One vocabulary slice [v0, v0 + Vs) of C rows: zs (C, Vs) student logits, overwritten with dz; zt (C, Vs)
// teacher logits, read only; labels (C,) global ids or nullptr; stats (C, NSTATS) from the chunk step.
// kind 0 = forward KL, 1..5 = the divergences (param = beta or alpha).
void iit_head_loss_slice_f32(float* zs, int64_t zs_stride, const float* zt, int64_t zt_stride,
                             const int64_t* labels, const float* g_kd, const float* g_lab, const float* stats,
                             int64_t C, int64_t Vs, int64_t v0, int64_t V, float T, int kind, float param,
                             int nthreads) {
  const bool has_labels = labels != nullptr;
  using Step = void (*)(float*, const float*, int64_t, int64_t, int64_t, float, float, float, bool, int64_t,
                        float, const float*);
  const Step steps[] = {nullptr, slice_step_div<1>, slice_step_div<2>, slice_step_div<3>, slice_step_div<4>,
                        slice_step_div<5>};
  if (kind < 0 || kind > 5) return;  // the Python side passes only these
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t r = 0; r < C; ++r) {
    float* s = zs + r * zs_stride;
    const float* t = zt + r * zt_stride;
    const int64_t y = has_labels ? labels[r] : -1;
    const float gl = has_labels ? g_lab[r] : 0.f;
    if (kind == 0)
      slice_step(s, t, Vs, v0, V, T, g_kd[r], has_labels, y, gl, stats + r * NSTATS);
    else
      steps[kind](s, t, Vs, v0, V, T, param, g_kd[r], has_labels, y, gl, stats + r * NSTATS);
  }
}


// The forward over vocabulary slices (forward KL): the slice [v0, v0 + Vs) of C rows folded into state
// (C, NFOLD) fp64 (written afresh when v0 == 0). zs, zt: (C, Vs) fp32 logits, read only; labels (C,) global
// ids or nullptr (no CE).
void iit_head_loss_fold_f32(const float* zs, int64_t zs_stride, const float* zt, int64_t zt_stride,
                            const int64_t* labels, double* state, int64_t C, int64_t Vs, int64_t v0, float T,
                            int nthreads) {
  const bool has_labels = labels != nullptr;
  const float inv_T = 1.0f / T;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t r = 0; r < C; ++r)
    fold_row(zs + r * zs_stride, zt + r * zt_stride, Vs, v0, inv_T, has_labels, has_labels ? labels[r] : -1,
             state + r * NFOLD);
}

// The rows' KL and CE (as row_step writes them) and statistics (store_stats, for the backward's slices) from
// their state after the last slice; labels (C,) or nullptr, V the vocabulary.
void iit_head_loss_fold_finish(const double* state, const int64_t* labels, float* kl, float* ce, float* stats,
                               int64_t C, int64_t V) {
  for (int64_t r = 0; r < C; ++r) {
    const double* st = state + r * NFOLD;
    const float m_s = (float)st[0], m_t = (float)st[1], m_1 = (float)st[2];
    kl[r] = (float)st[6];
    if (labels) {
      const bool has = labels[r] >= 0 && labels[r] < V;
      ce[r] = has ? (float)st[5] - (float)st[7] : 0.f;
    }
    store_stats(stats + r * NSTATS, m_s, m_t, (float)std::exp((double)m_s - st[3]),
                (float)std::exp((double)m_t - st[4]), (float)(st[3] - st[4]), m_1,
                labels ? (float)std::exp((double)m_1 - st[5]) : 0.f, 0.f);
  }
}

// The divergences other than forward KL (kind 1..5, param = beta or alpha; see div_elem): 4 passes per row,
// the teacher logits overwritten too (pass 3 stores A there). d: (C,) fp32 out, the per-row divergence.
void iit_distill_head_loss_div_chunk_f32(float* zs, int64_t zs_stride, float* zt, int64_t zt_stride,
                                         const int64_t* labels, const float* g_kd, const float* g_lab, float* d,
                                         float* ce, float* stats, int64_t C, int64_t V, float T, int kind,
                                         float param, int nthreads) {
  const bool has_labels = labels != nullptr;
  using Step = void (*)(float*, float*, int64_t, float, float, float, bool, int64_t, float, float*, float*, float*);
  const Step steps[] = {nullptr, row_step_div<1>, row_step_div<2>, row_step_div<3>, row_step_div<4>,
                        row_step_div<5>};
  if (kind < 1 || kind > 5) return;  // the Python side passes only these
  const Step step = steps[kind];
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t r = 0; r < C; ++r) {
    step(zs + r * zs_stride, zt + r * zt_stride, V, T, param, g_kd[r], has_labels, has_labels ? labels[r] : -1,
         has_labels ? g_lab[r] : 0.f, d + r, has_labels ? ce + r : nullptr, stats ? stats + r * NSTATS : nullptr);
  }
}

}  // extern "C"
