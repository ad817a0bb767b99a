// CUDA kernels of instance_norm_act (no torch headers: the wrapper is instance_norm_act_cuda.cpp).
//
// fp16/bf16/fp32 planes up to 128x128 (every ResNet-9 layer but the 256x256 ones) take the
// one-pass kernels (section "One pass" below): one kernel per direction, each value read once
// into registers. fp64 and larger planes take the split kernels described next.
// FASTCGAN_ONE_PASS=0 (also false / off / no; read once per process, at the first launch) turns
// the one-pass kernels off here and in the Triton backend: every plane takes the split kernels.
// Why: on channels_last at batch 1 make_plan halves the block's channels to 1 or 2 (1x128x128x128,
// 1x256x64x64) to fill the grid, so a warp's loads are C elements apart -- one useful bf16 value
// per 32-byte sector -- where the split kernels read 32 channels side by side. bench/gpu_check.sh
// (stage 3) times those rows both ways; the default stays until a GPU says otherwise.
//
// Larger planes: a (n, c) plane (NCHW), or a tile of 32 channels of one image (NHWC), is cut into
// S contiguous pixel chunks, one 256-thread block per (plane or tile, chunk), so that even
// N*C = 64 planes of 256x256 fill all SMs. Each op is two kernels:
//   forward : stats (per-chunk mean and M2, two-pass over the chunk, which is then in L2; the
//             means are offsets from the plane's first value, see "Offsets" below)
//             -> apply (every block merges its plane's S chunk statistics with Chan's formula,
//                then writes its chunk of the padded output: each interior value is stored to its
//                own position and to every border position that mirrors it; no second pass).
//   backward: sums (per-chunk sum(gz), sum(gz*xhat); dresidual) -> dx (merge the sums, write dx).
// Chunk partials go to a small workspace. The second kernel merges a plane's S partials inline
// while S <= kInlineMerge; beyond that (channels_last at batch 1: S = 64..256 chunks, which
// every one of the S second-kernel blocks would re-read, O(S^2) loads per plane) a small merge
// kernel reduces them once per plane first, one warp per plane. Merges run in a fixed order, so
// results are deterministic (no atomics). Reductions are warp shuffles + shared memory in fp32
// (fp64 input: double). fp16/bf16 load/store through conversions, arithmetic in fp32.
//
// Offsets: every statistic is of x - x0, x0 the plane's first value (a broadcast load), and only
// the mean that is written out adds x0 back. A plane far from zero relative to its spread (x =
// 1000 + 0.01 * noise) otherwise loses its mean to fp32 rounding twice: sums of raw values
// (constant planes' means 3-7 ulp off), and M2 taken around a mean rounded at 1000's ulp (6e-5,
// 0.6% of the spread), which biased chunk M2s and Chan's merge term: rstd 1e-5..6e-5 off and dx
// 2-6x the reference's error on split planes. Deviations from x0 are exact there (Sterbenz).
//
// NCHW indexing: plane base offsets are 64-bit; positions inside a (padded) plane fit in 32 bits
// (the wrapper checks (H+2p)*(W+2p) < 2^31). NCHW without padding uses 16-byte vector loads and
// stores when HW is a multiple of the vector width and the pointers are 16-byte aligned.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "instance_norm_act_kernels.h"

namespace fastcgan {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSplits = 256;
constexpr int kInlineMerge = 32;

// ---- conversions ---------------------------------------------------------------------------
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct From;
template <>
struct From<float> {
  static __device__ __forceinline__ float cvt(float v) { return v; }
};
template <>
struct From<double> {
  static __device__ __forceinline__ double cvt(double v) { return v; }
};
template <>
struct From<__half> {
  static __device__ __forceinline__ __half cvt(float v) { return __float2half_rn(v); }
};
template <>
struct From<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T>
struct VecOf {
  static constexpr int V = 16 / sizeof(T);
  struct alignas(16) Pack {
    T v[V];
  };
};

template <Activation ACT, typename A>
__device__ __forceinline__ A act_fwd(A z, A slope) {
  // !(z <= 0), not z > 0: a NaN passes through, as torch.relu's (z > 0 ? z : 0 made it 0 and
  // hid a diverged plane behind a plane of zeros).
  if constexpr (ACT == Activation::RELU) return !(z <= A(0)) ? z : A(0);
  if constexpr (ACT == Activation::LEAKY_RELU) return z > A(0) ? z : z * slope;
  return z;
}
template <Activation ACT, typename A>
__device__ __forceinline__ A act_bwd(A z, A g, A slope) {
  if constexpr (ACT == Activation::RELU) return !(z <= A(0)) ? g : A(0);  // torch's threshold_backward at NaN
  if constexpr (ACT == Activation::LEAKY_RELU) return z > A(0) ? g : g * slope;
  return g;
}

// Run-time activation for the one-pass backward (one binary for all three activations: fewer
// instantiations keep the build time down; the forward keeps ACT as a template parameter, whose
// tighter code spilled far less under the 128-register cap). Same values as act_bwd.
template <typename A>
__device__ __forceinline__ A act_bwd_rt(Activation act, A z, A g, A slope) {
  if (act == Activation::RELU) return !(z <= A(0)) ? g : A(0);
  return z > A(0) || act == Activation::NONE ? g : g * slope;
}

// ---- reductions ----------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of (a, b) over the 256-thread block, returned to every thread.
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b) {
  __shared__ A sa[kWarps], sb[kWarps];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // earlier readers of sa/sb are done
  if (lane == 0) sa[wid] = a, sb[wid] = b;
  __syncthreads();
  A ta = 0, tb = 0;
#pragma unroll
  for (int k = 0; k < kWarps; ++k) ta += sa[k], tb += sb[k];  // same order in every thread
  a = ta;
  b = tb;
}

// Chan et al. merge of (nb, mb, m2b) into (na, ma, m2a); either side may be empty.
template <typename A>
__device__ __forceinline__ void chan_merge(A& na, A& ma, A& m2a, A nb, A mb, A m2b) {
  if (nb == A(0)) return;
  if (na == A(0)) {
    na = nb, ma = mb, m2a = m2b;
    return;
  }
  const A n = na + nb, d = mb - ma;
  ma += d * (nb / n);
  m2a += m2b + d * d * (na / n) * nb;
  na = n;
}

// Geometry of one launch.
struct Geo {
  int64_t HW;        // pixels per plane
  int H, W, pad, Hp, Wp;
  int64_t C;
  int S;             // chunks per plane / tile
  int64_t cs;        // pixels per chunk (multiple of 8), chunk k = [k*cs, min(HW, (k+1)*cs))
  int Sp;            // partials per plane that the second kernel reads: S, or 1 once merged
  int64_t csp;       // pixels per partial: cs, or HW once merged
  float invW;
};

__host__ __device__ __forceinline__ int64_t span_count(int64_t HW, int64_t size, int k) {
  const int64_t s = int64_t(k) * size;
  return (HW < s + size ? HW : s + size) - s;
}
__device__ __forceinline__ int64_t chunk_count(const Geo& g, int k) { return span_count(g.HW, g.cs, k); }
__device__ __forceinline__ int64_t partial_count(const Geo& g, int k) { return span_count(g.HW, g.csp, k); }

// Merge of one plane's S (mean, M2) partials (row[2j], row[2j+1], j-th covering span_count(HW,
// span, j) pixels) by a whole warp: lanes stride over j, then a shuffle tree; lane 0 ends with
// the total (the other lanes' values are partial).
template <typename A>
__device__ __forceinline__ void warp_merge_stats(const A* row, int S, int64_t HW, int64_t span, A& n, A& mu,
                                                 A& m2) {
  const int lane = threadIdx.x & 31;
  n = 0, mu = 0, m2 = 0;
  for (int j = lane; j < S; j += 32) chan_merge(n, mu, m2, A(span_count(HW, span, j)), row[2 * j], row[2 * j + 1]);
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const A nb = __shfl_down_sync(0xffffffffu, n, o), mb = __shfl_down_sync(0xffffffffu, mu, o),
            m2b = __shfl_down_sync(0xffffffffu, m2, o);
    if ((lane & (2 * o - 1)) == 0) chan_merge(n, mu, m2, nb, mb, m2b);
  }
}

// Sums of one plane's S (a, b) partials by a whole warp, the totals in every lane.
template <typename A>
__device__ __forceinline__ void warp_sum_partials(const A* row, int S, A& a, A& b) {
  a = 0, b = 0;
  for (int j = threadIdx.x & 31; j < S; j += 32) a += row[2 * j], b += row[2 * j + 1];
  a = warp_sum(a);
  b = warp_sum(b);
}

// The merge kernels: one warp per (n, c) plane, (rows, S) partials -> (rows, 1) in `out`
// (stats: mean and M2 over the whole plane; sums: the two totals). Grid ceil(rows / kWarps).
template <typename A>
__global__ void __launch_bounds__(kThreads) merge_stats(const A* __restrict__ part, A* __restrict__ out, Geo g,
                                                        int64_t rows) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps exit together
  A n, mu, m2;
  warp_merge_stats(part + row * g.S * 2, g.S, g.HW, g.cs, n, mu, m2);
  if ((threadIdx.x & 31) == 0) out[row * 2] = mu, out[row * 2 + 1] = m2;
}

template <typename A>
__global__ void __launch_bounds__(kThreads) merge_sums(const A* __restrict__ part, A* __restrict__ out, Geo g,
                                                       int64_t rows) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  A a, b;
  warp_sum_partials(part + row * g.S * 2, g.S, a, b);
  if ((threadIdx.x & 31) == 0) out[row * 2] = a, out[row * 2 + 1] = b;
}

// i -> (h, w) with a float reciprocal and an exact correction (no integer division).
__device__ __forceinline__ void split_hw(int i, const Geo& g, int& h, int& w) {
  h = __float2int_rz(float(i) * g.invW);
  w = i - h * g.W;
  while (w < 0) --h, w += g.W;
  while (w >= g.W) ++h, w -= g.W;
}

// The padded rows (or columns) that hold a copy of interior row h: h + pad itself, and the
// reflections in the top/bottom border (-1 when none). reflect(hp - pad) == h for each.
__device__ __forceinline__ void mirrors(int h, int H, int pad, int out[3]) {
  out[0] = h + pad;
  out[1] = (h >= 1 && h <= pad) ? pad - h : -1;
  out[2] = (h >= H - 1 - pad && h <= H - 2) ? 2 * H - 2 + pad - h : -1;
}

// Element q of a plane (flat interior index) sits at q * ps from the plane's base: ps = 1 (NCHW)
// or C (NHWC). I, the offset type: int where the caller knows the padded plane's span fits in
// 32 bits (NCHW: checked by the wrapper; the one-pass plan checks NHWC), else int64_t.
// g = dy folded by reflection at interior pixel q: the sum over every padded position that
// copies it (dyp: the padded plane's base).
template <typename T, bool PAD, typename I>
__device__ __forceinline__ typename AccOf<T>::type gather_folded(const T* dyp, int q, I ps, const Geo& g) {
  if (!PAD) return to_acc(dyp[I(q) * ps]);
  int h, wc, rows[3], cols[3];
  split_hw(q, g, h, wc);
  mirrors(h, g.H, g.pad, rows);
  mirrors(wc, g.W, g.pad, cols);
  typename AccOf<T>::type s = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    if (rows[a] < 0) continue;
#pragma unroll
    for (int bb = 0; bb < 3; ++bb)
      if (cols[bb] >= 0) s += to_acc(dyp[(I(rows[a]) * g.Wp + cols[bb]) * ps]);
  }
  return s;
}

// The transpose: interior pixel q's output value stored at its own padded position and at every
// border position that mirrors it (yp: the padded plane's base). Only pixels within `pad` of an
// edge have mirrors; that rare branch keeps the common path to one store (and few registers).
template <typename T, bool PAD, typename I>
__device__ __forceinline__ void store_padded(T* yp, int q, I ps, T v, const Geo& g) {
  if (!PAD) {
    yp[I(q) * ps] = v;
    return;
  }
  int h, wc;
  split_hw(q, g, h, wc);
  yp[(I(h + g.pad) * g.Wp + wc + g.pad) * ps] = v;
  if (h > g.pad && h < g.H - 1 - g.pad && wc > g.pad && wc < g.W - 1 - g.pad) return;
  int rows[3], cols[3];
  mirrors(h, g.H, g.pad, rows);
  mirrors(wc, g.W, g.pad, cols);
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    if (rows[a] < 0) continue;
#pragma unroll
    for (int bb = 0; bb < 3; ++bb)
      if ((a | bb) != 0 && cols[bb] >= 0) yp[(I(rows[a]) * g.Wp + cols[bb]) * ps] = v;
  }
}

// ================================================================================================
// NCHW
// ================================================================================================
template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_stats_nchw(const T* __restrict__ x, typename AccOf<T>::type* part,
                                                          Geo g, bool vec) {
  using A = typename AccOf<T>::type;
  constexpr int V = VecOf<T>::V;
  using Pack = typename VecOf<T>::Pack;
  const int64_t plane = blockIdx.x;
  const int k = blockIdx.y;
  const int start = int(int64_t(k) * g.cs), end = start + int(chunk_count(g, k));
  const T* xp = x + plane * g.HW;
  const A shift = to_acc(xp[0]);  // the plane's first value (see "Offsets")
  A s = 0, unused = 0;
  if (vec) {
    for (int i = start + threadIdx.x * V; i < end; i += kThreads * V) {
      const Pack pk = *reinterpret_cast<const Pack*>(xp + i);
#pragma unroll
      for (int j = 0; j < V; ++j) s += to_acc(pk.v[j]) - shift;
    }
  } else {
    for (int i = start + threadIdx.x; i < end; i += kThreads) s += to_acc(xp[i]) - shift;
  }
  block_sum2(s, unused);
  const A off = end > start ? s / A(end - start) : A(0);  // the chunk's mean - shift
  A q = 0;
  if (vec) {
    for (int i = start + threadIdx.x * V; i < end; i += kThreads * V) {
      const Pack pk = *reinterpret_cast<const Pack*>(xp + i);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A d = (to_acc(pk.v[j]) - shift) - off;
        q += d * d;
      }
    }
  } else {
    for (int i = start + threadIdx.x; i < end; i += kThreads) {
      const A d = (to_acc(xp[i]) - shift) - off;
      q += d * d;
    }
  }
  unused = 0;
  block_sum2(q, unused);
  if (threadIdx.x == 0) {
    part[(plane * g.S + k) * 2] = off;
    part[(plane * g.S + k) * 2 + 1] = q;
  }
}

template <typename T, Activation ACT, bool PAD>
__global__ void __launch_bounds__(kThreads)
    fwd_apply_nchw(const T* __restrict__ x, const T* __restrict__ res, const typename AccOf<T>::type* __restrict__ wt,
                   const typename AccOf<T>::type* __restrict__ bs, T* __restrict__ y,
                   typename AccOf<T>::type* __restrict__ mean_out, typename AccOf<T>::type* __restrict__ rstd_out,
                   const typename AccOf<T>::type* __restrict__ part, Geo g, double eps, double slope_d, bool vec) {
  using A = typename AccOf<T>::type;
  constexpr int V = VecOf<T>::V;
  using Pack = typename VecOf<T>::Pack;
  const int64_t plane = blockIdx.x;
  const int k = blockIdx.y;
  __shared__ A sm[2];
  const T* xp = x + plane * g.HW;
  if (threadIdx.x < 32) {  // warp 0 merges the plane's chunk statistics (offsets from xp[0])
    A n, mu, m2;
    warp_merge_stats(part + plane * g.Sp * 2, g.Sp, g.HW, g.csp, n, mu, m2);
    if (threadIdx.x == 0) {
      const A rstd = A(1) / sqrt(m2 / A(g.HW) + A(eps));
      mu += to_acc(xp[0]);
      sm[0] = mu;
      sm[1] = rstd;
      if (k == 0) {
        mean_out[plane] = mu;
        rstd_out[plane] = rstd;
      }
    }
  }
  __syncthreads();
  const int64_t c = plane % g.C;
  const A m = sm[0], r = sm[1], w = wt ? wt[c] : A(1), b = bs ? bs[c] : A(0), slope = A(slope_d);
  const int start = int(int64_t(k) * g.cs), end = start + int(chunk_count(g, k));
  const T* rp = res ? res + plane * g.HW : nullptr;
  T* yp = y + plane * int64_t(g.Hp) * g.Wp;
  if (!PAD && vec) {
    for (int i = start + threadIdx.x * V; i < end; i += kThreads * V) {
      const Pack xv = *reinterpret_cast<const Pack*>(xp + i);
      Pack rv, yv;
      if (rp) rv = *reinterpret_cast<const Pack*>(rp + i);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        A v = act_fwd<ACT>((to_acc(xv.v[j]) - m) * r * w + b, slope);
        if (rp) v += to_acc(rv.v[j]);
        yv.v[j] = From<T>::cvt(v);
      }
      *reinterpret_cast<Pack*>(yp + i) = yv;
    }
    return;
  }
  for (int i = start + threadIdx.x; i < end; i += kThreads) {
    A v = act_fwd<ACT>((to_acc(xp[i]) - m) * r * w + b, slope);
    if (rp) v += to_acc(rp[i]);
    store_padded<T, PAD>(yp, i, 1, From<T>::cvt(v), g);
  }
}

template <typename T, Activation ACT, bool PAD>
__global__ void __launch_bounds__(kThreads)
    bwd_sums_nchw(const T* __restrict__ dy, const T* __restrict__ x, const typename AccOf<T>::type* __restrict__ wt,
                  const typename AccOf<T>::type* __restrict__ bs, const typename AccOf<T>::type* __restrict__ mean,
                  const typename AccOf<T>::type* __restrict__ rstd, T* __restrict__ dres,
                  typename AccOf<T>::type* __restrict__ part,
                  Geo g, double slope_d, bool vec) {
  using A = typename AccOf<T>::type;
  constexpr int V = VecOf<T>::V;
  using Pack = typename VecOf<T>::Pack;
  const int64_t plane = blockIdx.x;
  const int k = blockIdx.y;
  const int64_t c = plane % g.C;
  const A m = mean[plane], r = rstd[plane], w = wt ? wt[c] : A(1), b = bs ? bs[c] : A(0), slope = A(slope_d);
  const int start = int(int64_t(k) * g.cs), end = start + int(chunk_count(g, k));
  const T* xp = x + plane * g.HW;
  const T* dyp = dy + plane * int64_t(g.Hp) * g.Wp;
  T* drp = dres ? dres + plane * g.HW : nullptr;
  A s1 = 0, s2 = 0;
  if (!PAD && vec) {
    for (int i = start + threadIdx.x * V; i < end; i += kThreads * V) {
      const Pack xv = *reinterpret_cast<const Pack*>(xp + i);
      const Pack gv = *reinterpret_cast<const Pack*>(dyp + i);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A xh = (to_acc(xv.v[j]) - m) * r;
        const A gz = act_bwd<ACT>(xh * w + b, to_acc(gv.v[j]), slope);
        s1 += gz;
        s2 += gz * xh;
      }
      if (drp) *reinterpret_cast<Pack*>(drp + i) = gv;
    }
  } else {
    for (int i = start + threadIdx.x; i < end; i += kThreads) {
      const A gi = gather_folded<T, PAD>(dyp, i, 1, g);
      const A xh = (to_acc(xp[i]) - m) * r;
      const A gz = act_bwd<ACT>(xh * w + b, gi, slope);
      s1 += gz;
      s2 += gz * xh;
      if (drp) drp[i] = From<T>::cvt(gi);
    }
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    part[(plane * g.S + k) * 2] = s1;
    part[(plane * g.S + k) * 2 + 1] = s2;
  }
}

template <typename T, Activation ACT, bool PAD>
__global__ void __launch_bounds__(kThreads)
    bwd_dx_nchw(const T* __restrict__ dy, const T* __restrict__ x, const typename AccOf<T>::type* __restrict__ wt,
                const typename AccOf<T>::type* __restrict__ bs, const typename AccOf<T>::type* __restrict__ mean,
                const typename AccOf<T>::type* __restrict__ rstd, T* __restrict__ dx,
                const typename AccOf<T>::type* __restrict__ part,
                typename AccOf<T>::type* __restrict__ sum_gz, typename AccOf<T>::type* __restrict__ sum_gzx, Geo g,
                double slope_d, bool vec) {
  using A = typename AccOf<T>::type;
  constexpr int V = VecOf<T>::V;
  using Pack = typename VecOf<T>::Pack;
  const int64_t plane = blockIdx.x;
  const int k = blockIdx.y;
  const int64_t c = plane % g.C;
  const A m = mean[plane], r = rstd[plane], w = wt ? wt[c] : A(1), b = bs ? bs[c] : A(0), slope = A(slope_d);
  __shared__ A sm[2];
  if (threadIdx.x < 32) {
    A a, cc;
    warp_sum_partials(part + plane * g.Sp * 2, g.Sp, a, cc);
    if (threadIdx.x == 0) {
      if (k == 0 && sum_gz) sum_gz[plane] = a;
      if (k == 0 && sum_gzx) sum_gzx[plane] = cc;
      sm[0] = a / A(g.HW);       // mean(gz)
      sm[1] = w * cc / A(g.HW);  // c2 = w * mean(gz * xhat)
    }
  }
  __syncthreads();
  const A m1 = sm[0], c2 = sm[1];
  const int start = int(int64_t(k) * g.cs), end = start + int(chunk_count(g, k));
  const T* xp = x + plane * g.HW;
  const T* dyp = dy + plane * int64_t(g.Hp) * g.Wp;
  T* dxp = dx + plane * g.HW;
  if (!PAD && vec) {
    for (int i = start + threadIdx.x * V; i < end; i += kThreads * V) {
      const Pack xv = *reinterpret_cast<const Pack*>(xp + i);
      const Pack gv = *reinterpret_cast<const Pack*>(dyp + i);
      Pack ov;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A xh = (to_acc(xv.v[j]) - m) * r;
        const A gz = act_bwd<ACT>(xh * w + b, to_acc(gv.v[j]), slope);
        ov.v[j] = From<T>::cvt(r * (w * (gz - m1) - xh * c2));
      }
      *reinterpret_cast<Pack*>(dxp + i) = ov;
    }
    return;
  }
  for (int i = start + threadIdx.x; i < end; i += kThreads) {
    const A gi = gather_folded<T, PAD>(dyp, i, 1, g);
    const A xh = (to_acc(xp[i]) - m) * r;
    const A gz = act_bwd<ACT>(xh * w + b, gi, slope);
    dxp[i] = From<T>::cvt(r * (w * (gz - m1) - xh * c2));
  }
}

// ================================================================================================
// NHWC: block = 8 warps; lane = channel within a 32-channel tile, warp = pixel lane (stride 8), so
// each warp touches 32 consecutive channels of one pixel (coalesced). Grid (N * tiles, S).
// ================================================================================================
template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_stats_nhwc(const T* __restrict__ x, typename AccOf<T>::type* part,
                                                          Geo g, int tiles) {
  using A = typename AccOf<T>::type;
  __shared__ A red[kWarps][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t n = blockIdx.x / tiles, c = int64_t(blockIdx.x % tiles) * 32 + tx;
  const bool valid = c < g.C;
  const int k = blockIdx.y;
  const int64_t start = int64_t(k) * g.cs, end = start + chunk_count(g, k);
  const T* xp = x + n * g.HW * g.C + c;
  const A shift = valid ? to_acc(xp[0]) : A(0);  // the plane's first pixel (see "Offsets")
  A s = 0;
  if (valid)
    for (int64_t q = start + ty; q < end; q += kWarps) s += to_acc(xp[q * g.C]) - shift;
  red[ty][tx] = s;
  __syncthreads();
  A tot = 0;
#pragma unroll
  for (int j = 0; j < kWarps; ++j) tot += red[j][tx];
  const A off = end > start ? tot / A(end - start) : A(0);  // the chunk's mean - shift
  __syncthreads();
  A q2 = 0;
  if (valid)
    for (int64_t q = start + ty; q < end; q += kWarps) {
      const A d = (to_acc(xp[q * g.C]) - shift) - off;
      q2 += d * d;
    }
  red[ty][tx] = q2;
  __syncthreads();
  if (ty == 0 && valid) {
    A m2 = 0;
#pragma unroll
    for (int j = 0; j < kWarps; ++j) m2 += red[j][tx];
    part[((n * g.C + c) * g.S + k) * 2] = off;
    part[((n * g.C + c) * g.S + k) * 2 + 1] = m2;
  }
}

template <typename T, Activation ACT, bool PAD>
__global__ void __launch_bounds__(kThreads)
    fwd_apply_nhwc(const T* __restrict__ x, const T* __restrict__ res, const typename AccOf<T>::type* __restrict__ wt,
                   const typename AccOf<T>::type* __restrict__ bs, T* __restrict__ y,
                   typename AccOf<T>::type* __restrict__ mean_out, typename AccOf<T>::type* __restrict__ rstd_out,
                   const typename AccOf<T>::type* __restrict__ part, Geo g, int tiles, double eps, double slope_d) {
  using A = typename AccOf<T>::type;
  __shared__ A sn[kWarps][33], smu[kWarps][33], sm2[kWarps][33];
  __shared__ A s_m[32], s_r[32];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t n = blockIdx.x / tiles, c = int64_t(blockIdx.x % tiles) * 32 + tx;
  const bool valid = c < g.C;
  const int k = blockIdx.y;
  {  // merge the chunk statistics (offsets from the first pixel) of channel c: warp ty takes chunks ty, ty + 8, ...
    A cn = 0, mu = 0, m2 = 0;
    if (valid)
      for (int j = ty; j < g.Sp; j += kWarps)
        chan_merge(cn, mu, m2, A(partial_count(g, j)), part[((n * g.C + c) * g.Sp + j) * 2],
                   part[((n * g.C + c) * g.Sp + j) * 2 + 1]);
    sn[ty][tx] = cn, smu[ty][tx] = mu, sm2[ty][tx] = m2;
    __syncthreads();
    if (ty == 0) {
      for (int j = 1; j < kWarps; ++j) chan_merge(cn, mu, m2, sn[j][tx], smu[j][tx], sm2[j][tx]);
      const A rstd = A(1) / sqrt(m2 / A(g.HW) + A(eps));
      if (valid) mu += to_acc(x[n * g.HW * g.C + c]);
      s_m[tx] = mu;
      s_r[tx] = rstd;
      if (k == 0 && valid) {
        mean_out[n * g.C + c] = mu;
        rstd_out[n * g.C + c] = rstd;
      }
    }
    __syncthreads();
  }
  if (!valid) return;
  const A m = s_m[tx], r = s_r[tx], w = wt ? wt[c] : A(1), b = bs ? bs[c] : A(0), slope = A(slope_d);
  const int64_t start = int64_t(k) * g.cs, end = start + chunk_count(g, k);
  const T* xp = x + n * g.HW * g.C + c;
  const T* rp = res ? res + n * g.HW * g.C + c : nullptr;
  T* yp = y + n * int64_t(g.Hp) * g.Wp * g.C + c;
  for (int64_t q = start + ty; q < end; q += kWarps) {
    A v = act_fwd<ACT>((to_acc(xp[q * g.C]) - m) * r * w + b, slope);
    if (rp) v += to_acc(rp[q * g.C]);
    store_padded<T, PAD>(yp, int(q), g.C, From<T>::cvt(v), g);
  }
}

template <typename T, Activation ACT, bool PAD>
__global__ void __launch_bounds__(kThreads)
    bwd_sums_nhwc(const T* __restrict__ dy, const T* __restrict__ x, const typename AccOf<T>::type* __restrict__ wt,
                  const typename AccOf<T>::type* __restrict__ bs, const typename AccOf<T>::type* __restrict__ mean,
                  const typename AccOf<T>::type* __restrict__ rstd, T* __restrict__ dres,
                  typename AccOf<T>::type* __restrict__ part,
                  Geo g, int tiles, double slope_d) {
  using A = typename AccOf<T>::type;
  __shared__ A r1[kWarps][33], r2[kWarps][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t n = blockIdx.x / tiles, c = int64_t(blockIdx.x % tiles) * 32 + tx;
  const bool valid = c < g.C;
  const int k = blockIdx.y;
  A s1 = 0, s2 = 0;
  if (valid) {
    const A m = mean[n * g.C + c], r = rstd[n * g.C + c], w = wt ? wt[c] : A(1), b = bs ? bs[c] : A(0),
            slope = A(slope_d);
    const int64_t start = int64_t(k) * g.cs, end = start + chunk_count(g, k);
    const T* xp = x + n * g.HW * g.C + c;
    const T* dyp = dy + n * int64_t(g.Hp) * g.Wp * g.C + c;
    T* drp = dres ? dres + n * g.HW * g.C + c : nullptr;
    for (int64_t q = start + ty; q < end; q += kWarps) {
      const A gi = gather_folded<T, PAD>(dyp, int(q), g.C, g);
      const A xh = (to_acc(xp[q * g.C]) - m) * r;
      const A gz = act_bwd<ACT>(xh * w + b, gi, slope);
      s1 += gz;
      s2 += gz * xh;
      if (drp) drp[q * g.C] = From<T>::cvt(gi);
    }
  }
  r1[ty][tx] = s1;
  r2[ty][tx] = s2;
  __syncthreads();
  if (ty == 0 && valid) {
    A a = 0, cc = 0;
#pragma unroll
    for (int j = 0; j < kWarps; ++j) a += r1[j][tx], cc += r2[j][tx];
    part[((n * g.C + c) * g.S + k) * 2] = a;
    part[((n * g.C + c) * g.S + k) * 2 + 1] = cc;
  }
}

template <typename T, Activation ACT, bool PAD>
__global__ void __launch_bounds__(kThreads)
    bwd_dx_nhwc(const T* __restrict__ dy, const T* __restrict__ x, const typename AccOf<T>::type* __restrict__ wt,
                const typename AccOf<T>::type* __restrict__ bs, const typename AccOf<T>::type* __restrict__ mean,
                const typename AccOf<T>::type* __restrict__ rstd, T* __restrict__ dx,
                const typename AccOf<T>::type* __restrict__ part,
                typename AccOf<T>::type* __restrict__ sum_gz, typename AccOf<T>::type* __restrict__ sum_gzx, Geo g,
                int tiles, double slope_d) {
  using A = typename AccOf<T>::type;
  __shared__ A r1[kWarps][33], r2[kWarps][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t n = blockIdx.x / tiles, c = int64_t(blockIdx.x % tiles) * 32 + tx;
  const bool valid = c < g.C;
  const int k = blockIdx.y;
  A a = 0, cc = 0;
  if (valid)
    for (int j = ty; j < g.Sp; j += kWarps) {
      a += part[((n * g.C + c) * g.Sp + j) * 2];
      cc += part[((n * g.C + c) * g.Sp + j) * 2 + 1];
    }
  r1[ty][tx] = a;
  r2[ty][tx] = cc;
  __syncthreads();
  if (!valid) return;  // no block-wide barrier below
  a = 0, cc = 0;
#pragma unroll
  for (int j = 0; j < kWarps; ++j) a += r1[j][tx], cc += r2[j][tx];  // same order in every warp
  const A m = mean[n * g.C + c], r = rstd[n * g.C + c], w = wt ? wt[c] : A(1), b = bs ? bs[c] : A(0),
          slope = A(slope_d);
  if (k == 0 && ty == 0) {
    if (sum_gz) sum_gz[n * g.C + c] = a;
    if (sum_gzx) sum_gzx[n * g.C + c] = cc;
  }
  const A m1 = a / A(g.HW), c2 = w * cc / A(g.HW);
  const int64_t start = int64_t(k) * g.cs, end = start + chunk_count(g, k);
  const T* xp = x + n * g.HW * g.C + c;
  const T* dyp = dy + n * int64_t(g.Hp) * g.Wp * g.C + c;
  T* dxp = dx + n * g.HW * g.C + c;
  for (int64_t q = start + ty; q < end; q += kWarps) {
    const A gi = gather_folded<T, PAD>(dyp, int(q), g.C, g);
    const A xh = (to_acc(xp[q * g.C]) - m) * r;
    const A gz = act_bwd<ACT>(xh * w + b, gi, slope);
    dxp[q * g.C] = From<T>::cvt(r * (w * (gz - m1) - xh * c2));
  }
}

// ================================================================================================
// One pass: planes of up to kOnePassItems * kOnePassThreads pixels (128x128). A block holds whole
// planes of TC channels in registers, kOnePassItems pixels per thread, so the forward reads x
// once and the backward reads x and dy once: one kernel each, no workspace.
// Thread t -> (channel lane cl, pixel row r), R rows per channel (a power of two), T = TC * R:
//   NCHW: cl = t / R, r = t % R  (a warp walks consecutive pixels of one plane);
//   NHWC: cl = t % TC, r = t / TC (a warp reads TC consecutive channels of 32 / TC pixels).
// Row r holds pixels q = r + j * R, j < kOnePassItems. Per-channel sums: a shared-memory tree
// over the R rows, the same order every time (deterministic).
// ================================================================================================
constexpr int kOnePassItems = 32;
constexpr int kOnePassThreads = 512;

struct OnePass {
  int TC, R;  // channels per block, pixel rows per channel
  int tiles;  // channel tiles per image, ceil(C / TC)
};

// Slot of (channel lane, row) in the block: the inverse of the thread mapping above.
template <bool CL>
__device__ __forceinline__ int one_pass_slot(int cl, int r, const OnePass& op) {
  return CL ? r * op.TC + cl : cl * op.R + r;
}

// Sums a and b over the R rows of each channel lane; every thread gets its channel's totals.
template <bool CL, typename A>
__device__ __forceinline__ void rows_sum2(A& a, A& b, int cl, int r, const OnePass& op, A* sa, A* sb) {
  const int t = threadIdx.x;  // == one_pass_slot(cl, r)
  sa[t] = a;
  sb[t] = b;
  __syncthreads();
  for (int half = op.R >> 1; half > 0; half >>= 1) {
    if (r < half) {
      const int o = one_pass_slot<CL>(cl, r + half, op);
      sa[t] += sa[o];
      sb[t] += sb[o];
    }
    __syncthreads();
  }
  const int root = one_pass_slot<CL>(cl, 0, op);
  a = sa[root];
  b = sb[root];
  __syncthreads();  // every thread has read the roots before sa/sb are reused
}

// What a one-pass thread works on: its channel lane and pixel row, the channel, and the bases of
// its plane in the interior tensors (x, residual, dx, dresidual) and the padded ones (y, dy).
// Plane bases are 64-bit; in-plane offsets q * ps are 32-bit (the plan checks the padded span).
struct OnePassLane {
  int cl, r, ps;
  int64_t n, c, base, pbase;
  bool valid;
};

template <bool CL>
__device__ __forceinline__ OnePassLane one_pass_lane(const Geo& g, const OnePass& op) {
  OnePassLane l;
  const int t = threadIdx.x;
  l.cl = CL ? t % op.TC : t / op.R;
  l.r = CL ? t / op.TC : t % op.R;
  l.n = blockIdx.x / op.tiles;
  l.c = int64_t(blockIdx.x % op.tiles) * op.TC + l.cl;
  l.valid = l.c < g.C;
  l.ps = CL ? int(g.C) : 1;
  l.base = CL ? l.n * g.HW * g.C + l.c : (l.n * g.C + l.c) * g.HW;
  l.pbase = CL ? l.n * int64_t(g.Hp) * g.Wp * g.C + l.c : (l.n * g.C + l.c) * int64_t(g.Hp) * g.Wp;
  return l;
}

template <typename T, Activation ACT, bool PAD, bool CL>
__global__ void __launch_bounds__(kOnePassThreads)
    one_pass_fwd(const T* __restrict__ x, const T* __restrict__ res, const typename AccOf<T>::type* __restrict__ wt,
                 const typename AccOf<T>::type* __restrict__ bs, T* __restrict__ y,
                 typename AccOf<T>::type* __restrict__ mean_out,
                 typename AccOf<T>::type* __restrict__ rstd_out, Geo g, OnePass op, double eps, double slope_d) {
  using A = typename AccOf<T>::type;
  __shared__ A sa[kOnePassThreads], sb[kOnePassThreads];
  const OnePassLane l = one_pass_lane<CL>(g, op);
  const int cl = l.cl, r = l.r, ps = l.ps;
  const int64_t n = l.n, c = l.c;
  const bool valid = l.valid;
  const T* xp = x + l.base;
  const T* rp = res ? res + l.base : nullptr;
  A v[kOnePassItems];
  A s = 0, none = 0;
  // Statistics of deviations from the plane's first value (see "Offsets"): raw per-thread fp32
  // sums had left a constant plane's mean 3-7 ulp off (y = bias + 1.5e-4 at rstd 316).
  const A shift = valid ? to_acc(xp[0]) : A(0);
#pragma unroll
  for (int j = 0; j < kOnePassItems; ++j) {
    const int q = r + j * op.R;
    const bool in = valid && q < g.HW;
    v[j] = in ? to_acc(xp[q * ps]) - shift : A(0);  // registers hold the deviations from here on
    s += v[j];
  }
  rows_sum2<CL>(s, none, cl, r, op, sa, sb);
  const A off = s / A(g.HW), mean = shift + off;
  A m2 = 0;
#pragma unroll
  for (int j = 0; j < kOnePassItems; ++j) {
    const A d = r + j * op.R < g.HW ? v[j] - off : A(0);
    m2 += d * d;
  }
  none = 0;
  rows_sum2<CL>(m2, none, cl, r, op, sa, sb);
  if (!valid) return;  // no barrier below
  const A rstd = A(1) / sqrt(m2 / A(g.HW) + A(eps));
  if (r == 0) {
    mean_out[n * g.C + c] = mean;
    rstd_out[n * g.C + c] = rstd;
  }
  const A w = wt ? wt[c] : A(1), b = bs ? bs[c] : A(0), slope = A(slope_d);
#pragma unroll
  for (int j = 0; j < kOnePassItems; ++j) {
    const int q = r + j * op.R;
    if (q >= g.HW) break;
    A o = act_fwd<ACT>((v[j] - off) * rstd * w + b, slope);
    if (rp) o += to_acc(rp[q * ps]);
    store_padded<T, PAD>(y + l.pbase, q, ps, From<T>::cvt(o), g);
  }
}

template <typename T, bool PAD, bool CL>
__global__ void __launch_bounds__(kOnePassThreads)
    one_pass_bwd(const T* __restrict__ dy, const T* __restrict__ x, const typename AccOf<T>::type* __restrict__ wt,
                 const typename AccOf<T>::type* __restrict__ bs, const typename AccOf<T>::type* __restrict__ mean,
                 const typename AccOf<T>::type* __restrict__ rstd, T* __restrict__ dx, T* __restrict__ dres,
                 typename AccOf<T>::type* __restrict__ sum_gz, typename AccOf<T>::type* __restrict__ sum_gzx, Geo g,
                 OnePass op, Activation act, double slope_d) {
  using A = typename AccOf<T>::type;
  __shared__ A sa[kOnePassThreads], sb[kOnePassThreads];
  const OnePassLane l = one_pass_lane<CL>(g, op);
  const int cl = l.cl, r = l.r, ps = l.ps;
  const int64_t n = l.n, c = l.c;
  const bool valid = l.valid;
  const T* xp = x + l.base;
  const T* dyp = dy + l.pbase;
  T* dxp = dx + l.base;
  T* drp = dres ? dres + l.base : nullptr;
  const A m = valid ? A(mean[n * g.C + c]) : A(0), rs = valid ? A(rstd[n * g.C + c]) : A(0);
  const A w = valid && wt ? wt[c] : A(1), b = valid && bs ? bs[c] : A(0), slope = A(slope_d);
  A xh[kOnePassItems], gz[kOnePassItems];
  A s1 = 0, s2 = 0;
#pragma unroll
  for (int j = 0; j < kOnePassItems; ++j) {
    const int q = r + j * op.R;
    xh[j] = 0, gz[j] = 0;
    if (valid && q < g.HW) {
      const A gi = gather_folded<T, PAD>(dyp, q, ps, g);
      xh[j] = (to_acc(xp[q * ps]) - m) * rs;
      gz[j] = act_bwd_rt(act, xh[j] * w + b, gi, slope);
      if (drp) drp[q * ps] = From<T>::cvt(gi);
      s1 += gz[j];
      s2 += gz[j] * xh[j];
    }
  }
  rows_sum2<CL>(s1, s2, cl, r, op, sa, sb);
  if (!valid) return;
  if (r == 0) {
    if (sum_gz) sum_gz[n * g.C + c] = s1;
    if (sum_gzx) sum_gzx[n * g.C + c] = s2;
  }
  // dx = rstd * (w * (gz - mean(gz)) - xhat * c2), c2 = w * mean(gz * xhat): rstd * (w * gz - c1 ...)
  // contracts to fma(w, gz, -c1), which leaves a 1x1 plane rstd x one rounding of w * gz, not 0.
  const A m1 = s1 / A(g.HW), c2 = w * s2 / A(g.HW);
#pragma unroll
  for (int j = 0; j < kOnePassItems; ++j) {
    const int q = r + j * op.R;
    if (q >= g.HW) break;
    dxp[q * ps] = From<T>::cvt(rs * (w * (gz[j] - m1) - xh[j] * c2));
  }
}

// ================================================================================================
// Host side
// ================================================================================================
int sm_count(int device) {
  static std::atomic<int> cache[64] = {};
  if (device < 0 || device >= 64) return 132;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v <= 0) {
      cudaGetLastError();  // clear the error; fall back to a typical count
      v = 132;
    }
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// FASTCGAN_ONE_PASS (see the top of this file): read once, on the first plan of the process.
bool one_pass_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FASTCGAN_ONE_PASS");
    std::string s;
    for (; v && *v; ++v)
      if (!std::isspace(static_cast<unsigned char>(*v))) s += char(std::tolower(static_cast<unsigned char>(*v)));
    return !(s == "0" || s == "false" || s == "off" || s == "no");
  }();
  return enabled;
}

struct Plan {
  Geo g;
  int64_t units;  // planes (NCHW) or channel tiles (NHWC) -> grid.x
  int tiles;      // NHWC channel tiles per image
  bool one_pass;  // planes fit the one-pass kernels: grid.x = N * op.tiles blocks of op.TC * op.R
  OnePass op;
};

// fp64 (tests, gradcheck) always takes the split kernels: 32 doubles per thread would spill, and
// fewer one-pass instantiations keep the build time down.
Plan make_plan(bool channels_last, DType dtype, int64_t N, int64_t C, int64_t H, int64_t W, int64_t pad, int device) {
  Plan p{};
  Geo& g = p.g;
  g.HW = H * W;
  g.H = int(H), g.W = int(W), g.pad = int(pad), g.Hp = int(H + 2 * pad), g.Wp = int(W + 2 * pad);
  g.C = C;
  g.invW = 1.0f / float(W);
  const int64_t span = int64_t(g.Hp) * g.Wp * (channels_last ? C : 1);  // one-pass offsets are 32-bit
  if (dtype != DType::Float64 && g.HW <= int64_t(kOnePassItems) * kOnePassThreads && span < (int64_t(1) << 31) &&
      one_pass_enabled()) {
    // Rows: enough for kOnePassItems pixels each. Channels per block: all that fit in
    // kOnePassThreads, halved while the grid is under ~4 blocks per SM (batch 1 has few planes).
    int R = 1;
    while (int64_t(R) * kOnePassItems < g.HW) R <<= 1;
    int64_t tc = 1;
    while (tc < C && tc * 2 * R <= kOnePassThreads) tc *= 2;
    const int64_t target = 4LL * sm_count(device);
    while (tc > 1 && N * ((C + tc - 1) / tc) < target) tc /= 2;
    p.one_pass = true;
    p.op = OnePass{int(tc), R, int((C + tc - 1) / tc)};
    p.units = N * p.op.tiles;
    g.S = g.Sp = 1, g.cs = g.csp = g.HW;
    return p;
  }
  p.tiles = int((C + 31) / 32);
  p.units = channels_last ? N * p.tiles : N * C;
  // About 8 resident 256-thread blocks per SM; chunks of at least 2048 values (NCHW) or 64
  // pixels x 32 channels (NHWC), so that small planes are not split at all.
  const int64_t target = 8LL * sm_count(device);
  const int64_t min_chunk = channels_last ? 64 : 2048;
  int64_t S = (target + p.units - 1) / p.units;
  S = std::min<int64_t>(S, std::max<int64_t>(1, g.HW / min_chunk));
  S = std::max<int64_t>(1, std::min<int64_t>(S, kMaxSplits));
  int64_t cs = (g.HW + S - 1) / S;
  cs = (cs + 7) / 8 * 8;  // a multiple of every vector width, so vector chunks stay aligned
  g.cs = cs;
  g.S = int((g.HW + cs - 1) / cs);  // every chunk non-empty
  g.Sp = g.S, g.csp = g.cs;         // the launcher sets 1 / HW when it merges first
  return p;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Workspace: the (N*C, S) chunk partials, then (N*C, 1) merged ones when S > kInlineMerge; none
// for the one-pass kernels.
int64_t workspace_elems(const Plan& plan, int64_t N, int64_t C) {
  if (plan.one_pass) return 0;
  const int64_t rows = N * C;
  return 2 * rows * int64_t(plan.g.S) + (plan.g.S > kInlineMerge ? 2 * rows : 0);
}

// After the first kernel: when S is large, merge the partials once per plane and hand the second
// kernel a geometry that reads one partial per plane. Returns the partials it should read.
template <typename A, bool STATS>
A* merge_if_many(A* part, int64_t rows, Geo& g, cudaStream_t stream) {
  if (g.S <= kInlineMerge) return part;
  A* merged = part + 2 * rows * int64_t(g.S);
  const unsigned blocks = unsigned((rows + kWarps - 1) / kWarps);
  if (STATS)
    merge_stats<A><<<blocks, kThreads, 0, stream>>>(part, merged, g, rows);
  else
    merge_sums<A><<<blocks, kThreads, 0, stream>>>(part, merged, g, rows);
  g.Sp = 1, g.csp = g.HW;
  return merged;
}

template <typename T, Activation ACT, bool PAD>
void launch_fwd(const FwdParams& p, void* workspace, cudaStream_t stream, const Plan& plan) {
  using A = typename AccOf<T>::type;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  const A* wt = static_cast<const A*>(p.weight);
  const A* bs = static_cast<const A*>(p.bias);
  A* mean = static_cast<A*>(p.mean);
  A* rstd = static_cast<A*>(p.rstd);
  if constexpr (!std::is_same_v<T, double>) {
    if (plan.one_pass) {
      const unsigned threads = unsigned(plan.op.TC * plan.op.R);
      if (p.channels_last)
        one_pass_fwd<T, ACT, PAD, true><<<unsigned(plan.units), threads, 0, stream>>>(
            x, res, wt, bs, y, mean, rstd, plan.g, plan.op, p.eps, p.slope);
      else
        one_pass_fwd<T, ACT, PAD, false><<<unsigned(plan.units), threads, 0, stream>>>(
            x, res, wt, bs, y, mean, rstd, plan.g, plan.op, p.eps, p.slope);
      return;
    }
  }
  A* part = static_cast<A*>(workspace);
  const dim3 grid(unsigned(plan.units), unsigned(plan.g.S));
  Geo g = plan.g;
  if (!p.channels_last) {
    const bool vin = g.HW % VecOf<T>::V == 0 && aligned16(x);
    const bool vall = vin && aligned16(y) && (!res || aligned16(res));
    fwd_stats_nchw<T><<<grid, kThreads, 0, stream>>>(x, part, g, vin);
    const A* merged = merge_if_many<A, true>(part, p.N * p.C, g, stream);
    fwd_apply_nchw<T, ACT, PAD><<<grid, kThreads, 0, stream>>>(x, res, wt, bs, y, mean, rstd, merged, g, p.eps,
                                                              p.slope, vall);
  } else {
    fwd_stats_nhwc<T><<<grid, kThreads, 0, stream>>>(x, part, g, plan.tiles);
    const A* merged = merge_if_many<A, true>(part, p.N * p.C, g, stream);
    fwd_apply_nhwc<T, ACT, PAD><<<grid, kThreads, 0, stream>>>(x, res, wt, bs, y, mean, rstd, merged, g,
                                                              plan.tiles, p.eps, p.slope);
  }
}

template <typename T, Activation ACT, bool PAD>
void launch_bwd(const BwdParams& p, void* workspace, cudaStream_t stream, const Plan& plan) {
  using A = typename AccOf<T>::type;
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.dx);
  T* dres = static_cast<T*>(p.dres);
  const A* wt = static_cast<const A*>(p.weight);
  const A* bs = static_cast<const A*>(p.bias);
  A* sg = static_cast<A*>(p.sum_gz);
  A* sgx = static_cast<A*>(p.sum_gzx);
  const A* mean = static_cast<const A*>(p.mean);
  const A* rstd = static_cast<const A*>(p.rstd);
  if constexpr (!std::is_same_v<T, double>) {
    if (plan.one_pass) {
      const unsigned threads = unsigned(plan.op.TC * plan.op.R);
      if (p.channels_last)
        one_pass_bwd<T, PAD, true><<<unsigned(plan.units), threads, 0, stream>>>(
            dy, x, wt, bs, mean, rstd, dx, dres, sg, sgx, plan.g, plan.op, ACT, p.slope);
      else
        one_pass_bwd<T, PAD, false><<<unsigned(plan.units), threads, 0, stream>>>(
            dy, x, wt, bs, mean, rstd, dx, dres, sg, sgx, plan.g, plan.op, ACT, p.slope);
      return;
    }
  }
  A* part = static_cast<A*>(workspace);
  const dim3 grid(unsigned(plan.units), unsigned(plan.g.S));
  Geo g = plan.g;
  if (!p.channels_last) {
    const bool vec = g.HW % VecOf<T>::V == 0 && aligned16(x) && aligned16(dy) && aligned16(dx) &&
                     (!dres || aligned16(dres));
    bwd_sums_nchw<T, ACT, PAD><<<grid, kThreads, 0, stream>>>(dy, x, wt, bs, mean, rstd, dres, part, g, p.slope,
                                                             vec);
    const A* merged = merge_if_many<A, false>(part, p.N * p.C, g, stream);
    bwd_dx_nchw<T, ACT, PAD><<<grid, kThreads, 0, stream>>>(dy, x, wt, bs, mean, rstd, dx, merged, sg, sgx, g,
                                                           p.slope, vec);
  } else {
    bwd_sums_nhwc<T, ACT, PAD><<<grid, kThreads, 0, stream>>>(dy, x, wt, bs, mean, rstd, dres, part, g,
                                                             plan.tiles, p.slope);
    const A* merged = merge_if_many<A, false>(part, p.N * p.C, g, stream);
    bwd_dx_nhwc<T, ACT, PAD><<<grid, kThreads, 0, stream>>>(dy, x, wt, bs, mean, rstd, dx, merged, sg, sgx, g,
                                                           plan.tiles, p.slope);
  }
}

struct FwdLaunch {
  const FwdParams& p;
  void* ws;
  cudaStream_t stream;
  const Plan& plan;
  template <typename T, Activation ACT, bool PAD>
  void run() const {
    launch_fwd<T, ACT, PAD>(p, ws, stream, plan);
  }
};
struct BwdLaunch {
  const BwdParams& p;
  void* ws;
  cudaStream_t stream;
  const Plan& plan;
  template <typename T, Activation ACT, bool PAD>
  void run() const {
    launch_bwd<T, ACT, PAD>(p, ws, stream, plan);
  }
};

template <typename T, typename Params, typename F>
void dispatch_act_pad(const Params& p, const F& f) {
  const bool pad = p.pad > 0;
  switch (p.act) {
    case Activation::RELU: return pad ? f.template run<T, Activation::RELU, true>() : f.template run<T, Activation::RELU, false>();
    case Activation::LEAKY_RELU:
      return pad ? f.template run<T, Activation::LEAKY_RELU, true>() : f.template run<T, Activation::LEAKY_RELU, false>();
    case Activation::NONE: return pad ? f.template run<T, Activation::NONE, true>() : f.template run<T, Activation::NONE, false>();
  }
}

template <typename Params, typename F>
void dispatch(const Params& p, const F& f) {
  switch (p.dtype) {
    case DType::Float32: return dispatch_act_pad<float>(p, f);
    case DType::Float64: return dispatch_act_pad<double>(p, f);
    case DType::Float16: return dispatch_act_pad<__half>(p, f);
    case DType::BFloat16: return dispatch_act_pad<__nv_bfloat16>(p, f);
  }
}

}  // namespace

int64_t cuda_fwd_workspace_elems(const FwdParams& p, int device) {
  return workspace_elems(make_plan(p.channels_last, p.dtype, p.N, p.C, p.H, p.W, p.pad, device), p.N, p.C);
}

int64_t cuda_bwd_workspace_elems(const BwdParams& p, int device) {
  return workspace_elems(make_plan(p.channels_last, p.dtype, p.N, p.C, p.H, p.W, p.pad, device), p.N, p.C);
}

int cuda_fwd(const FwdParams& p, void* workspace, int device, void* stream) {
  const Plan plan = make_plan(p.channels_last, p.dtype, p.N, p.C, p.H, p.W, p.pad, device);
  auto s = static_cast<cudaStream_t>(stream);
  dispatch(p, FwdLaunch{p, workspace, s, plan});
  return int(cudaGetLastError());
}

int cuda_bwd(const BwdParams& p, void* workspace, int device, void* stream) {
  const Plan plan = make_plan(p.channels_last, p.dtype, p.N, p.C, p.H, p.W, p.pad, device);
  auto s = static_cast<cudaStream_t>(stream);
  dispatch(p, BwdLaunch{p, workspace, s, plan});
  return int(cudaGetLastError());
}

const char* cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace fastcgan
