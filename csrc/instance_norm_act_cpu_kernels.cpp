// CPU kernels of instance_norm_act (no ATen: pointers in, pointers out; see the header).
//
// This file is compiled twice: once for the baseline ISA (namespace cpu_default) and once with
// -mavx2 -mfma -mf16c (namespace cpu_avx2, FASTCGAN_CPU_AVX2 defined); the wrapper picks one at
// run time. The arithmetic loops are plain loops over float/double rows written so that the
// compiler vectorises them (`omp simd` for reductions, -fopenmp-simd; no fast-math).
//
// NCHW: one task per (n, c) plane; loops vectorise along the row; fp32/fp64 rows are read and
// written in place, fp16/bf16 rows go through small fp32 buffers.
// NHWC: every pass streams whole rows of W*C contiguous values; loops vectorise along C with
// per-channel accumulators; statistics are per (n, pixel chunk) partials merged afterwards.
//
// Numerics: statistics are a chunked two-pass (mean of a chunk, then squared deviations from it,
// the chunk still in cache), chunks merged with Chan's parallel formula in double; the variance
// is biased and never formed as E[x^2] - E[x]^2. fp16/bf16 compute in fp32, fp64 in double.
#include "instance_norm_act_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include <c10/util/Half.h>

#if defined(FASTCGAN_CPU_AVX2)
#include <immintrin.h>
#define FASTCGAN_CPU_NS cpu_avx2
#else
#define FASTCGAN_CPU_NS cpu_default
#endif

namespace fastcgan {
namespace FASTCGAN_CPU_NS {
namespace {

struct Half {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

constexpr int64_t kStatChunk = 4096;  // NCHW elements per statistics chunk (fits L1)

// ---- dtype conversion of contiguous runs -----------------------------------------------------
inline void load(const float* s, float* d, int64_t n) { std::memcpy(d, s, sizeof(float) * n); }
inline void load(const double* s, double* d, int64_t n) { std::memcpy(d, s, sizeof(double) * n); }
inline void load(const BF16* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {  // bf16 is the top half of an fp32: exact widening
    const uint32_t b = uint32_t(s[i].bits) << 16;
    std::memcpy(d + i, &b, sizeof(b));
  }
}
inline void load(const Half* s, float* d, int64_t n) {
  int64_t i = 0;
#if defined(FASTCGAN_CPU_AVX2)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) d[i] = c10::detail::fp16_ieee_to_fp32_value(s[i].bits);
}

inline void store(const float* s, float* d, int64_t n) { std::memcpy(d, s, sizeof(float) * n); }
inline void store(const double* s, double* d, int64_t n) { std::memcpy(d, s, sizeof(double) * n); }
inline void store(const float* s, BF16* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {  // round to nearest even, NaN stays NaN (as c10::BFloat16)
    uint32_t u;
    std::memcpy(&u, s + i, sizeof(u));
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    d[i].bits = uint16_t((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
  }
}
inline void store(const float* s, Half* d, int64_t n) {
  int64_t i = 0;
#if defined(FASTCGAN_CPU_AVX2)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) d[i].bits = c10::detail::fp16_ieee_from_fp32_value(s[i]);
}

// fp32/fp64 need no conversion: compute straight from/into the tensors; else via `buf`.
template <typename T, typename A>
inline const A* view(const T* src, int64_t n, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    load(src, buf, n);
    return buf;
  }
}
template <typename T, typename A>
inline A* out_ptr(T* dst, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return dst;
  } else {
    return buf;
  }
}
template <typename T, typename A>
inline void flush(const A* buf, int64_t n, T* dst) {
  if constexpr (!std::is_same_v<T, A>) store(buf, dst, n);
}

// Scratch rows carved from one allocation, staggered so that they do not share 4 KiB-aliased
// offsets (a load from one row right after a store to another at the same offset mod 4096 stalls).
template <typename A>
struct Scratch {
  std::vector<A> mem;
  std::vector<A*> rows;
  explicit Scratch(std::initializer_list<int64_t> sizes) {
    const int64_t slack = 16 * int64_t(sizes.size());  // row i starts 16 * i values into its slot
    int64_t total = 0;
    for (int64_t n : sizes) total += n + slack;
    mem.assign(total, A(0));
    int64_t off = 0, i = 0;
    for (int64_t n : sizes) {
      rows.push_back(mem.data() + off + 16 * i++);
      off += n + slack;
    }
  }
  A* operator[](size_t i) { return rows[i]; }
};

// ---- activation ----------------------------------------------------------------------------
template <Activation ACT, typename A>
inline A act_fwd(A z, A slope) {
  // !(z <= 0), not z > 0: a NaN passes through, as torch.relu's (z > 0 ? z : 0 made it 0 and
  // hid a diverged plane behind a plane of zeros).
  if constexpr (ACT == Activation::RELU) return !(z <= A(0)) ? z : A(0);
  if constexpr (ACT == Activation::LEAKY_RELU) return z > A(0) ? z : z * slope;
  return z;
}
template <Activation ACT, typename A>
inline A act_bwd(A z, A g, A slope) {  // act'(z) * g, the derivative at 0 taken as for z < 0
  if constexpr (ACT == Activation::RELU) return !(z <= A(0)) ? g : A(0);  // torch's threshold_backward at NaN
  if constexpr (ACT == Activation::LEAKY_RELU) return z > A(0) ? g : g * slope;
  return g;
}

// Chan et al.: merge (count nb, mean mb, m2b) into a running (na, ma, m2a).
inline void chan_merge(double na, double& ma, double& m2a, double nb, double mb, double m2b) {
  if (na == 0) {  // the first chunk: its statistics (d * d * 0 was inf * 0 = NaN for |mean| > 1.3e154)
    ma = mb, m2a = m2b;
    return;
  }
  const double n = na + nb, d = mb - ma;
  ma += d * (nb / n);
  m2a += m2b + d * d * (na * nb / n);
}

// ================================================================================================
// NCHW: one (n, c) plane per task, all loops along the row with scalar per-plane parameters.
// ================================================================================================
template <typename T, Activation ACT>
void nchw_fwd(const FwdParams& p, int64_t begin, int64_t end) {
  using A = typename AccOf<T>::type;
  const int64_t C = p.C, H = p.H, W = p.W, pad = p.pad, HW = H * W;
  const int64_t Wp = W + 2 * pad, HWp = (H + 2 * pad) * Wp;
  const A slope = A(p.slope);
  const A* Wt = static_cast<const A*>(p.weight);
  const A* Bs = static_cast<const A*>(p.bias);
  const int64_t chunk = std::min(HW, kStatChunk);
  const int64_t span = pad > 0 ? W : chunk;  // pixels per output step: a row when padding
  Scratch<A> buf({chunk, span, span, span + 2 * pad});
  A *sbuf = buf[0], *xbuf = buf[1], *rbuf = buf[2], *ybuf = buf[3];

  for (int64_t t = begin; t < end; ++t) {
    const int64_t c = t % C;
    const T* xb = static_cast<const T*>(p.x) + t * HW;
    const T* rb = p.residual ? static_cast<const T*>(p.residual) + t * HW : nullptr;
    T* yb = static_cast<T*>(p.y) + t * HWp;

    double cnt = 0, mu = 0, m2 = 0;
    for (int64_t q0 = 0; q0 < HW; q0 += chunk) {
      const int64_t k = std::min(chunk, HW - q0);
      const A* v = view(xb + q0, k, sbuf);
      // Statistics of deviations from the chunk's first value: a plane far from 0 relative to its
      // spread (x = 1000 + 0.01 * noise) keeps its mean to the spread's precision, not 1000's,
      // and its M2 is not taken around a mean rounded at 1000's ulp (0.6% of the spread).
      const A shift = v[0];
      A s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < k; ++i) s += v[i] - shift;
      const A off = A(double(s) / double(k));
      const double cmd = double(shift) + double(off);
      A sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < k; ++i) sq += ((v[i] - shift) - off) * ((v[i] - shift) - off);
      chan_merge(cnt, mu, m2, double(k), cmd, double(sq));
      cnt += double(k);
    }
    const double rstd = 1.0 / std::sqrt(m2 / double(HW) + p.eps);
    static_cast<A*>(p.mean)[t] = A(mu);
    static_cast<A*>(p.rstd)[t] = A(rstd);
    const A m = A(mu), r = A(rstd), w = Wt ? Wt[c] : A(1), b = Bs ? Bs[c] : A(0);

    auto apply = [&](const A* x, const A* res, int64_t k, A* y) {
      if (res) {
#pragma omp simd
        for (int64_t i = 0; i < k; ++i) y[i] = act_fwd<ACT>((x[i] - m) * r * w + b, slope) + res[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < k; ++i) y[i] = act_fwd<ACT>((x[i] - m) * r * w + b, slope);
      }
    };
    if (pad == 0) {
      for (int64_t q0 = 0; q0 < HW; q0 += span) {
        const int64_t k = std::min(span, HW - q0);
        A* y = out_ptr(yb + q0, ybuf);
        apply(view(xb + q0, k, xbuf), rb ? view(rb + q0, k, rbuf) : nullptr, k, y);
        flush(y, k, yb + q0);
      }
      continue;
    }
    // Interior rows with their reflected left/right borders, then the top/bottom border rows
    // copied from the finished rows they mirror (the same values as padding after rounding).
    for (int64_t h = 0; h < H; ++h) {
      T* yrow = yb + (h + pad) * Wp;
      A* y = out_ptr(yrow, ybuf);
      apply(view(xb + h * W, W, xbuf), rb ? view(rb + h * W, W, rbuf) : nullptr, W, y + pad);
      for (int64_t k = 1; k <= pad; ++k) {
        y[pad - k] = y[pad + k];
        y[pad + W - 1 + k] = y[pad + W - 1 - k];
      }
      flush(y, Wp, yrow);
    }
    for (int64_t k = 1; k <= pad; ++k) {
      std::memcpy(yb + (pad - k) * Wp, yb + (pad + k) * Wp, sizeof(T) * Wp);
      std::memcpy(yb + (pad + H - 1 + k) * Wp, yb + (pad + H - 1 - k) * Wp, sizeof(T) * Wp);
    }
  }
}

template <typename T, Activation ACT>
void nchw_bwd(const BwdParams& p, int64_t begin, int64_t end) {
  using A = typename AccOf<T>::type;
  const int64_t C = p.C, H = p.H, W = p.W, pad = p.pad, HW = H * W;
  const int64_t Wp = W + 2 * pad, HWp = (H + 2 * pad) * Wp;
  const A slope = A(p.slope);
  const A* Wt = static_cast<const A*>(p.weight);
  const A* Bs = static_cast<const A*>(p.bias);
  const int64_t span = pad > 0 ? W : std::min(HW, kStatChunk);
  const int64_t steps = pad > 0 ? H : (HW + span - 1) / span;
  Scratch<A> buf({span + 2 * pad, span, span, span});
  A *dbuf = buf[0], *gbuf = buf[1], *xbuf = buf[2], *obuf = buf[3];

  for (int64_t t = begin; t < end; ++t) {
    const int64_t c = t % C;
    const T* dyb = static_cast<const T*>(p.dy) + t * HWp;
    const T* xb = static_cast<const T*>(p.x) + t * HW;
    T* dxb = static_cast<T*>(p.dx) + t * HW;
    T* drb = p.dres ? static_cast<T*>(p.dres) + t * HW : nullptr;
    const A m = static_cast<const A*>(p.mean)[t], r = static_cast<const A*>(p.rstd)[t];
    const A w = Wt ? Wt[c] : A(1), b = Bs ? Bs[c] : A(0);

    // g = dL/d(act + residual) on step s (a span of pixels, or interior row s when padded): dy,
    // or dy folded by reflection, the adjoint of the padding: every padded position adds into the
    // interior pixel it copies.
    auto get_g = [&](int64_t s, int64_t q0, int64_t k) -> const A* {
      if (pad == 0) return view(dyb + q0, k, gbuf);
      const int64_t h = s;
      auto fold_row = [&](int64_t row, bool first) {
        const A* d = view(dyb + row * Wp, Wp, dbuf);
        if (first) {
          std::memcpy(gbuf, d + pad, sizeof(A) * W);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < W; ++i) gbuf[i] += d[pad + i];
        }
        for (int64_t k2 = 1; k2 <= pad; ++k2) {
          gbuf[k2] += d[pad - k2];
          gbuf[W - 1 - k2] += d[pad + W - 1 + k2];
        }
      };
      fold_row(h + pad, true);
      if (h >= 1 && h <= pad) fold_row(pad - h, false);                          // the top border
      if (h >= H - 1 - pad && h <= H - 2) fold_row(2 * H - 2 + pad - h, false);  // the bottom border
      return gbuf;
    };

    double sg = 0, sgx = 0;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t q0 = s * span, k = std::min(span, HW - q0);
      const A* g = get_g(s, q0, k);
      const A* x = view(xb + q0, k, xbuf);
      A a = 0, cc = 0;
#pragma omp simd reduction(+ : a, cc)
      for (int64_t i = 0; i < k; ++i) {
        const A xh = (x[i] - m) * r;
        const A gz = act_bwd<ACT>(xh * w + b, g[i], slope);
        a += gz;
        cc += gz * xh;
      }
      sg += double(a);
      sgx += double(cc);
      if (drb) store(g, drb + q0, k);
    }
    if (p.sum_gz) static_cast<A*>(p.sum_gz)[t] = A(sg);
    if (p.sum_gzx) static_cast<A*>(p.sum_gzx)[t] = A(sgx);
    if (HW == 1) {  // y = act(b) whatever x is, so dx is exactly 0. Computed, leaky_relu's slope * g,
      const A zero = A(0);  // taken again below and contracted into the subtraction, left rstd x its
      store(&zero, dxb, 1);  // rounding.
      continue;
    }
    // dx = rstd * (w * (gz - mean(gz)) - xhat * c2), c2 = w * mean(gz * xhat). Not rstd * (w * gz -
    // w * mean(gz) ...): compilers contract that to fma(w, gz, -c1), whose unrounded product left a
    // 1x1 plane (gz == mean(gz)) a dx of rstd * one rounding of w * gz (1e-3 at eps 1e-8), not 0.
    // (rstd * w folded into one factor would round once more: 1.5 ulp of a dx of 1e4 scale.)
    const A m1 = A(sg / double(HW)), c2 = A(double(w) * sgx / double(HW));
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t q0 = s * span, k = std::min(span, HW - q0);
      const A* g = get_g(s, q0, k);
      const A* x = view(xb + q0, k, xbuf);
      A* dx = out_ptr(dxb + q0, obuf);
#pragma omp simd
      for (int64_t i = 0; i < k; ++i) {
        const A xh = (x[i] - m) * r;
        const A gz = act_bwd<ACT>(xh * w + b, g[i], slope);
        dx[i] = r * (w * (gz - m1) - xh * c2);
      }
      flush(dx, k, dxb + q0);
    }
  }
}

// ================================================================================================
// NHWC: rows of W pixels x C channels, contiguous; loops vectorise along C.
// ================================================================================================
// Per-channel parameters of one n in the acc type (built per task; C values).
template <typename A>
struct ChannelParams {
  std::vector<A> m, r, w, b;
  explicit ChannelParams(int64_t C) : m(C), r(C), w(C), b(C) {}
  void fill_wb(const A* Wt, const A* Bs, int64_t C) {
    for (int64_t c = 0; c < C; ++c) {
      w[c] = Wt ? Wt[c] : A(1);
      b[c] = Bs ? Bs[c] : A(0);
    }
  }
};

// Phase 0: (mean, m2) of chunk `ci` of image n, per channel, into scratch.
template <typename T>
void nhwc_fwd_stats(const FwdParams& p, const CpuPlan& plan, double* scratch, int64_t begin, int64_t end) {
  using A = typename AccOf<T>::type;
  const int64_t C = p.C, HW = p.H * p.W, cp = plan.chunk_pixels;
  Scratch<A> buf({cp * C, C, C});
  A *cbuf = buf[0], *s = buf[1], *sq = buf[2];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / plan.num_chunks, ci = t % plan.num_chunks;
    const int64_t q0 = ci * cp, k = std::min(cp, HW - q0);
    const A* v = view(static_cast<const T*>(p.x) + (n * HW + q0) * C, k * C, cbuf);
    // Deviations from the chunk's first pixel are summed (one accumulator per channel runs over
    // every pixel, so a plain sum of x = 1000 + 0.01 * noise lost its mean to rounding: y was 12x
    // further from the truth than the reference's); the chunk mean is then formed in double.
    double* out = scratch + 2 * (n * plan.num_chunks + ci) * C;
    std::fill(s, s + C, A(0));
    std::fill(sq, sq + C, A(0));
    for (int64_t q = 0; q < k; ++q)
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) s[c] += v[q * C + c] - v[c];
    for (int64_t c = 0; c < C; ++c) {
      s[c] = A(double(s[c]) / double(k));  // now the offset of the chunk's mean from its first pixel
      out[c] = double(v[c]) + double(s[c]);
    }
    // M2 around the offset, not around a mean rounded at the plane's magnitude (see the NCHW pass).
    for (int64_t q = 0; q < k; ++q)
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A d = (v[q * C + c] - v[c]) - s[c];
        sq[c] += d * d;
      }
    for (int64_t c = 0; c < C; ++c) out[C + c] = double(sq[c]);
  }
}

// Phase 1: merge the chunks of image n; (mean, rstd) in double into scratch and, in the acc
// dtype, to p.mean/rstd.
inline void nhwc_fwd_merge(const FwdParams& p, const CpuPlan& plan, double* scratch, int64_t begin, int64_t end) {
  const int64_t C = p.C, HW = p.H * p.W, cp = plan.chunk_pixels, nch = plan.num_chunks;
  double* stats = scratch + 2 * p.N * nch * C;
  for (int64_t n = begin; n < end; ++n) {
    double* mu = stats + 2 * n * C;
    double* m2 = mu + C;
    const double* part = scratch + 2 * n * nch * C;
    std::copy(part, part + 2 * C, mu);  // chunk 0 (mean row then m2 row: the same layout)
    double cnt = double(std::min(cp, HW));
    for (int64_t ci = 1; ci < nch; ++ci) {
      const double nb = double(std::min(cp, HW - ci * cp));
      const double* pc = part + 2 * ci * C;
      for (int64_t c = 0; c < C; ++c) chan_merge(cnt, mu[c], m2[c], nb, pc[c], pc[C + c]);
      cnt += nb;
    }
    for (int64_t c = 0; c < C; ++c) {
      m2[c] = 1.0 / std::sqrt(m2[c] / double(HW) + p.eps);  // now rstd
      if (p.dtype == DType::Float64) {
        static_cast<double*>(p.mean)[n * C + c] = mu[c];
        static_cast<double*>(p.rstd)[n * C + c] = m2[c];
      } else {
        static_cast<float*>(p.mean)[n * C + c] = float(mu[c]);
        static_cast<float*>(p.rstd)[n * C + c] = float(m2[c]);
      }
    }
  }
}

// Phase 2: padded output row hp of image n, computed from interior row reflect(hp - pad).
template <typename T, Activation ACT>
void nhwc_fwd_rows(const FwdParams& p, const CpuPlan& plan, const double* scratch, int64_t begin, int64_t end) {
  using A = typename AccOf<T>::type;
  const int64_t C = p.C, H = p.H, W = p.W, pad = p.pad, Hp = H + 2 * pad, Wp = W + 2 * pad;
  const A slope = A(p.slope);
  const double* stats = scratch + 2 * p.N * plan.num_chunks * C;
  Scratch<A> buf({W * C, W * C, Wp * C});
  A *xbuf = buf[0], *rbuf = buf[1], *ybuf = buf[2];
  ChannelParams<A> cpar(C);
  cpar.fill_wb(static_cast<const A*>(p.weight), static_cast<const A*>(p.bias), C);
  const A *w = cpar.w.data(), *b = cpar.b.data();
  int64_t cur_n = -1;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / Hp, hp = t % Hp;
    if (n != cur_n) {
      for (int64_t c = 0; c < C; ++c) {
        cpar.m[c] = A(stats[2 * n * C + c]);
        cpar.r[c] = A(stats[2 * n * C + C + c]);
      }
      cur_n = n;
    }
    const A *m = cpar.m.data(), *r = cpar.r.data();
    int64_t h = hp - pad;
    if (h < 0) h = -h;
    if (h >= H) h = 2 * (H - 1) - h;
    const int64_t in_off = (n * H + h) * W * C;
    const A* x = view(static_cast<const T*>(p.x) + in_off, W * C, xbuf);
    const A* res = p.residual ? view(static_cast<const T*>(p.residual) + in_off, W * C, rbuf) : nullptr;
    T* yrow = static_cast<T*>(p.y) + (n * Hp + hp) * Wp * C;
    A* y = out_ptr(yrow, ybuf);
    A* yi = y + pad * C;
    for (int64_t q = 0; q < W; ++q) {
      const A* xq = x + q * C;
      A* yq = yi + q * C;
      if (res) {
        const A* rq = res + q * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) yq[c] = act_fwd<ACT>((xq[c] - m[c]) * r[c] * w[c] + b[c], slope) + rq[c];
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) yq[c] = act_fwd<ACT>((xq[c] - m[c]) * r[c] * w[c] + b[c], slope);
      }
    }
    for (int64_t k = 1; k <= pad; ++k) {
      std::memcpy(y + (pad - k) * C, y + (pad + k) * C, sizeof(A) * C);
      std::memcpy(y + (pad + W - 1 + k) * C, y + (pad + W - 1 - k) * C, sizeof(A) * C);
    }
    flush(y, Wp * C, yrow);
  }
}

// g for interior row h of image n: padded dy rows folded by reflection (rows and columns).
template <typename T, typename A>
inline const A* nhwc_fold_g(const BwdParams& p, int64_t n, int64_t h, A* dbuf, A* gbuf) {
  const int64_t C = p.C, H = p.H, W = p.W, pad = p.pad, Hp = H + 2 * pad, Wp = W + 2 * pad;
  const T* dy = static_cast<const T*>(p.dy) + n * Hp * Wp * C;
  if (pad == 0) return view(dy + h * W * C, W * C, gbuf);
  auto fold_row = [&](int64_t row, bool first) {
    const A* d = view(dy + row * Wp * C, Wp * C, dbuf);
    if (first) {
      std::memcpy(gbuf, d + pad * C, sizeof(A) * W * C);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < W * C; ++i) gbuf[i] += d[pad * C + i];
    }
    for (int64_t k = 1; k <= pad; ++k) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) gbuf[k * C + c] += d[(pad - k) * C + c];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) gbuf[(W - 1 - k) * C + c] += d[(pad + W - 1 + k) * C + c];
    }
  };
  fold_row(h + pad, true);
  if (h >= 1 && h <= pad) fold_row(pad - h, false);
  if (h >= H - 1 - pad && h <= H - 2) fold_row(2 * H - 2 + pad - h, false);
  return gbuf;
}

template <typename A>
inline void load_channel_stats(const BwdParams& p, int64_t n, ChannelParams<A>& cp) {
  for (int64_t c = 0; c < p.C; ++c) {
    cp.m[c] = static_cast<const A*>(p.mean)[n * p.C + c];
    cp.r[c] = static_cast<const A*>(p.rstd)[n * p.C + c];
  }
}

// Phase 0: per-channel (sum gz, sum gz*xhat) of interior row h of image n into scratch; dres.
template <typename T, Activation ACT>
void nhwc_bwd_sums(const BwdParams& p, double* scratch, int64_t begin, int64_t end) {
  using A = typename AccOf<T>::type;
  const int64_t C = p.C, H = p.H, W = p.W, Wp = W + 2 * p.pad;
  const A slope = A(p.slope);
  Scratch<A> buf({Wp * C, W * C, W * C, C, C});
  A *dbuf = buf[0], *gbuf = buf[1], *xbuf = buf[2], *s1 = buf[3], *s2 = buf[4];
  ChannelParams<A> cpar(C);
  cpar.fill_wb(static_cast<const A*>(p.weight), static_cast<const A*>(p.bias), C);
  const A *w = cpar.w.data(), *b = cpar.b.data(), *m = cpar.m.data(), *r = cpar.r.data();
  int64_t cur_n = -1;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / H, h = t % H;
    if (n != cur_n) load_channel_stats(p, n, cpar), cur_n = n;
    const A* g = nhwc_fold_g<T>(p, n, h, dbuf, gbuf);
    const int64_t off = (n * H + h) * W * C;
    const A* x = view(static_cast<const T*>(p.x) + off, W * C, xbuf);
    std::fill(s1, s1 + C, A(0));
    std::fill(s2, s2 + C, A(0));
    for (int64_t q = 0; q < W; ++q) {
      const A *xq = x + q * C, *gq = g + q * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A xh = (xq[c] - m[c]) * r[c];
        const A gz = act_bwd<ACT>(xh * w[c] + b[c], gq[c], slope);
        s1[c] += gz;
        s2[c] += gz * xh;
      }
    }
    double* out = scratch + 2 * t * C;
    for (int64_t c = 0; c < C; ++c) {
      out[c] = double(s1[c]);
      out[C + c] = double(s2[c]);
    }
    if (p.dres) store(g, static_cast<T*>(p.dres) + off, W * C);
  }
}

// Phase 1: sum the rows of image n (in order: deterministic); outputs, mean(gz) and c2 = w * mean(gz * xhat).
template <typename A>
void nhwc_bwd_merge(const BwdParams& p, double* scratch, int64_t begin, int64_t end) {
  const int64_t C = p.C, H = p.H, HW = p.H * p.W;
  double* coef = scratch + 2 * p.N * H * C;
  for (int64_t n = begin; n < end; ++n) {
    double* sg = coef + 2 * n * C;
    double* sgx = sg + C;
    std::fill(sg, sg + 2 * C, 0.0);
    for (int64_t h = 0; h < H; ++h) {
      const double* part = scratch + 2 * (n * H + h) * C;
      for (int64_t c = 0; c < C; ++c) {
        sg[c] += part[c];
        sgx[c] += part[C + c];
      }
    }
    const A* Wt = static_cast<const A*>(p.weight);
    for (int64_t c = 0; c < C; ++c) {
      if (p.sum_gz) static_cast<A*>(p.sum_gz)[n * C + c] = A(sg[c]);
      if (p.sum_gzx) static_cast<A*>(p.sum_gzx)[n * C + c] = A(sgx[c]);
      sg[c] /= double(HW);  // now mean(gz)
      sgx[c] = (Wt ? double(Wt[c]) : 1.0) * sgx[c] / double(HW);  // now c2 = w * mean(gz * xhat)
    }
  }
}

// Phase 2: dx for interior row h of image n.
template <typename T, Activation ACT>
void nhwc_bwd_rows(const BwdParams& p, const double* scratch, int64_t begin, int64_t end) {
  using A = typename AccOf<T>::type;
  const int64_t C = p.C, H = p.H, W = p.W, Wp = W + 2 * p.pad;
  const A slope = A(p.slope);
  const double* coef = scratch + 2 * p.N * H * C;
  Scratch<A> buf({Wp * C, W * C, W * C, W * C, C, C});
  A *dbuf = buf[0], *gbuf = buf[1], *xbuf = buf[2], *obuf = buf[3], *m1 = buf[4], *c2 = buf[5];
  ChannelParams<A> cpar(C);
  cpar.fill_wb(static_cast<const A*>(p.weight), static_cast<const A*>(p.bias), C);
  const A *w = cpar.w.data(), *b = cpar.b.data(), *m = cpar.m.data(), *r = cpar.r.data();
  int64_t cur_n = -1;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / H, h = t % H;
    if (n != cur_n) {
      load_channel_stats(p, n, cpar);
      for (int64_t c = 0; c < C; ++c) {
        m1[c] = A(coef[2 * n * C + c]);
        c2[c] = A(coef[2 * n * C + C + c]);
      }
      cur_n = n;
    }
    const A* g = nhwc_fold_g<T>(p, n, h, dbuf, gbuf);
    const int64_t off = (n * H + h) * W * C;
    const A* x = view(static_cast<const T*>(p.x) + off, W * C, xbuf);
    T* dxrow = static_cast<T*>(p.dx) + off;
    A* dx = out_ptr(dxrow, obuf);
    if (H * W == 1) {  // 1x1 planes: dx exactly 0 (the NCHW pass says why)
      std::fill(dx, dx + C, A(0));
      flush(dx, C, dxrow);
      continue;
    }
    for (int64_t q = 0; q < W; ++q) {
      const A *xq = x + q * C, *gq = g + q * C;
      A* dq = dx + q * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A xh = (xq[c] - m[c]) * r[c];
        const A gz = act_bwd<ACT>(xh * w[c] + b[c], gq[c], slope);
        dq[c] = r[c] * (w[c] * (gz - m1[c]) - xh * c2[c]);  // the NCHW pass says why this order
      }
    }
    flush(dx, W * C, dxrow);
  }
}

// ---- dispatch --------------------------------------------------------------------------------
template <typename T, Activation ACT>
void fwd_t(const FwdParams& p, const CpuPlan& plan, double* scratch, int phase, int64_t b, int64_t e) {
  if (!p.channels_last) return nchw_fwd<T, ACT>(p, b, e);
  if (phase == 0) return nhwc_fwd_stats<T>(p, plan, scratch, b, e);
  if (phase == 1) return nhwc_fwd_merge(p, plan, scratch, b, e);
  return nhwc_fwd_rows<T, ACT>(p, plan, scratch, b, e);
}
template <typename T, Activation ACT>
void bwd_t(const BwdParams& p, double* scratch, int phase, int64_t b, int64_t e) {
  using A = typename AccOf<T>::type;
  if (!p.channels_last) return nchw_bwd<T, ACT>(p, b, e);
  if (phase == 0) return nhwc_bwd_sums<T, ACT>(p, scratch, b, e);
  if (phase == 1) return nhwc_bwd_merge<A>(p, scratch, b, e);
  return nhwc_bwd_rows<T, ACT>(p, scratch, b, e);
}
template <typename T>
void fwd_act(const FwdParams& p, const CpuPlan& plan, double* s, int phase, int64_t b, int64_t e) {
  switch (p.act) {
    case Activation::RELU: return fwd_t<T, Activation::RELU>(p, plan, s, phase, b, e);
    case Activation::LEAKY_RELU: return fwd_t<T, Activation::LEAKY_RELU>(p, plan, s, phase, b, e);
    case Activation::NONE: return fwd_t<T, Activation::NONE>(p, plan, s, phase, b, e);
  }
}
template <typename T>
void bwd_act(const BwdParams& p, double* s, int phase, int64_t b, int64_t e) {
  switch (p.act) {
    case Activation::RELU: return bwd_t<T, Activation::RELU>(p, s, phase, b, e);
    case Activation::LEAKY_RELU: return bwd_t<T, Activation::LEAKY_RELU>(p, s, phase, b, e);
    case Activation::NONE: return bwd_t<T, Activation::NONE>(p, s, phase, b, e);
  }
}

}  // namespace

void fwd(const FwdParams& p, const CpuPlan& plan, double* scratch, int phase, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case DType::Float32: return fwd_act<float>(p, plan, scratch, phase, begin, end);
    case DType::Float64: return fwd_act<double>(p, plan, scratch, phase, begin, end);
    case DType::Float16: return fwd_act<Half>(p, plan, scratch, phase, begin, end);
    case DType::BFloat16: return fwd_act<BF16>(p, plan, scratch, phase, begin, end);
  }
}

void bwd(const BwdParams& p, const CpuPlan& plan, double* scratch, int phase, int64_t begin, int64_t end) {
  (void)plan;
  switch (p.dtype) {
    case DType::Float32: return bwd_act<float>(p, scratch, phase, begin, end);
    case DType::Float64: return bwd_act<double>(p, scratch, phase, begin, end);
    case DType::Float16: return bwd_act<Half>(p, scratch, phase, begin, end);
    case DType::BFloat16: return bwd_act<BF16>(p, scratch, phase, begin, end);
  }
}

}  // namespace FASTCGAN_CPU_NS
}  // namespace fastcgan
