// Fused elementwise ops of a Llama-family block on CPU, forward and backward (Liger-Kernel style, in C++):
//
//   RMSNorm   y = w * (x * rstd),  rstd = 1 / sqrt(mean(x^2) + eps)       per row of x (N, d); rstd (N,) is saved
//   SwiGLU    o = silu(g) * u = g / (1 + exp(-g)) * u                      elementwise; backward recomputes silu
//   RoPE      q' = q * cos + rotate_half(q) * sin  (and k)                 q (B, Hq, L, D), k (B, Hkv, L, D),
//             rotate_half(x) = [-x2, x1]                                    cos/sin (B or 1, L, D), any row strides
//
// Semantics of the plain-PyTorch references in ltuning/kernels/cpu_fused_ops.py. One pass over memory per op:
// the row reductions and the elementwise chains stay in registers (at::vec::Vectorized, AVX-512 here), rows are
// split over threads with at::parallel_for. float32 and float64 compute in their own type, bfloat16 in float32
// (one rounding at the store). Every output element is written exactly once. The RMSNorm weight gradient is
// reduced over fixed row blocks (partials summed in a fixed order): deterministic for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/python.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using at::BFloat16;
using at::vec::Vectorized;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

int64_t cdiv(int64_t x, int64_t m) { return (x + m - 1) / m; }

// Loads / stores of W = Vectorized<acc_t<T>>::size() elements of T as a vector of acc_t<T>; the _n forms
// touch only the first n (< W) elements (the rest of a loaded vector is zero).
template <typename T>
struct IO {
  using A = T;
  using V = Vectorized<T>;
  static constexpr int64_t W = V::size();
  static V load(const T* p) { return V::loadu(p); }
  static V load(const T* p, int64_t n) { return V::loadu(p, n); }
  static void store(T* p, const V& v) { v.store(p); }
  static void store(T* p, const V& v, int64_t n) { v.store(p, n); }
};

template <>
struct IO<BFloat16> {
  using A = float;
  using V = Vectorized<float>;
  static constexpr int64_t W = V::size();
  static V load(const BFloat16* p) {
    V out;
    at::vec::load_fp32_from_bf16(p, out);
    return out;
  }
  static V load(const BFloat16* p, int64_t n) {
    float buf[W] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return V::loadu(buf);
  }
  static void store(BFloat16* p, const V& v) {
    at::vec::convert_from_float<BFloat16>(v, v).store(p, W);  // round to nearest even
  }
  static void store(BFloat16* p, const V& v, int64_t n) {
    float buf[W];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = BFloat16(buf[i]);
  }
};

// Apply f(offset, count) over [0, n) in full vectors then one tail (count < W).
template <int64_t W, typename F>
inline void for_vec(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + W <= n; i += W) f(i, W);
  if (i < n) f(i, n - i);
}

at::Tensor contig(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// Argument checks (before any kernel touches memory): one error naming the argument, a Python ValueError.
#define FO_CHECK(cond, op, ...) TORCH_CHECK_VALUE(cond, op, ": ", __VA_ARGS__)

void check_cpu(const at::Tensor& t, const char* op, const char* what) {
  FO_CHECK(t.defined(), op, what, " is undefined");
  FO_CHECK(t.device().is_cpu(), op, what, " must be a CPU tensor; got ", t.device());
}

void check_float(const at::Tensor& t, const char* op, const char* what) {
  check_cpu(t, op, what);
  const auto st = t.scalar_type();
  FO_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kDouble, op, what,
           " must be float32, bfloat16 or float64; got ", st);
}

// `t` is a CPU tensor of `like`'s dtype and of shape `sizes`.
void check_like(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef sizes, const char* op, const char* what,
                const char* like_name) {
  check_cpu(t, op, what);
  FO_CHECK(t.scalar_type() == like.scalar_type(), op, what, " must have ", like_name, "'s dtype ", like.scalar_type(),
           "; got ", t.scalar_type());
  FO_CHECK(t.sizes() == sizes, op, what, " must be ", sizes, "; got shape ", t.sizes());
}

// A gradient input: a floating CPU tensor of shape `sizes` (converted to the op's dtype by the caller).
void check_grad(const at::Tensor& t, at::IntArrayRef sizes, const char* op, const char* what) {
  check_cpu(t, op, what);
  FO_CHECK(t.is_floating_point(), op, what, " must be floating point; got ", t.scalar_type());
  FO_CHECK(t.sizes() == sizes, op, what, " must be ", sizes, "; got shape ", t.sizes());
}

// ---------------------------------------------------------------------------------------------------
// RMSNorm

// Sum of squares of a row, accumulated in float64: with float lanes, a row with a massive activation (SmolLM2
// has ~2.5e4 in a few channels, x^2 ~ 6e8) absorbs the other channels' squares, a coherent error of the whole
// row's rstd that was visible in the model's gradients.
template <typename T>
double sum_squares(const T* x, int64_t d) {
  using io = IO<T>;
  constexpr int64_t W = io::W;
  if constexpr (std::is_same_v<T, double>) {
    using V = Vectorized<double>;
    V acc0(0.0), acc1(0.0);
    int64_t i = 0;
    for (; i + 2 * W <= d; i += 2 * W) {
      const V a = V::loadu(x + i), b = V::loadu(x + i + W);
      acc0 = at::vec::fmadd(a, a, acc0);
      acc1 = at::vec::fmadd(b, b, acc1);
    }
    if (i < d) {
      const V a = i + W <= d ? V::loadu(x + i) : V::loadu(x + i, std::min<int64_t>(W, d - i));
      acc0 = at::vec::fmadd(a, a, acc0);
      i += W;
    }
    double s = at::vec::vec_reduce_all<double>([](V& p, V& q) { return p + q; }, acc0 + acc1);
    for (; i < d; ++i) s += x[i] * x[i];
    return s;
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    for_vec<W>(d, [&](int64_t o, int64_t n) {
      const __m512 v = n == W ? io::load(x + o) : io::load(x + o, n);
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
      a0 = _mm512_fmadd_pd(lo, lo, a0);
      a1 = _mm512_fmadd_pd(hi, hi, a1);
    });
    return _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
#else
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= d; i += 4) {
      const double a = static_cast<float>(x[i]), b = static_cast<float>(x[i + 1]);
      const double c = static_cast<float>(x[i + 2]), e = static_cast<float>(x[i + 3]);
      s0 += a * a; s1 += b * b; s2 += c * c; s3 += e * e;
    }
    for (; i < d; ++i) {
      const double a = static_cast<float>(x[i]);
      s0 += a * a;
    }
    return (s0 + s1) + (s2 + s3);
#endif
  }
}

template <typename T>
void rms_fwd_impl(const T* x, const T* w, T* y, acc_t<T>* rstd, int64_t N, int64_t d, double eps) {
  using io = IO<T>;
  using A = typename io::A;
  using V = typename io::V;
  constexpr int64_t W = io::W;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * d;
      T* yr = y + r * d;
      const double ss = sum_squares(xr, d);
      const A rs = static_cast<A>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
      rstd[r] = rs;
      const V vrs(rs);
      for_vec<W>(d, [&](int64_t o, int64_t n) {
        if (n == W) {
          io::store(yr + o, io::load(w + o) * (io::load(xr + o) * vrs));
        } else {
          io::store(yr + o, io::load(w + o, n) * (io::load(xr + o, n) * vrs), n);
        }
      });
    }
  });
}

// dx = rstd * (dy*w - xhat * mean(dy*w*xhat)), xhat = x * rstd;  dw = sum_rows dy * xhat
template <typename T>
void rms_bwd_impl(const T* dy, const T* x, const T* w, const acc_t<T>* rstd, T* dx, T* dw, int64_t N, int64_t d) {
  using io = IO<T>;
  using A = typename io::A;
  using V = typename io::V;
  constexpr int64_t W = io::W;
  // Weight-gradient partials over fixed row blocks (independent of the thread count).
  const int64_t rows_per_block = std::max<int64_t>(64, cdiv(N, 256));
  const int64_t nblk = dw ? cdiv(N, rows_per_block) : 0;
  std::vector<A> part(dw ? static_cast<size_t>(nblk * d) : 0, A(0));
  const int64_t nb = dw ? nblk : cdiv(N, rows_per_block);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      A* pw = dw ? part.data() + blk * d : nullptr;
      const int64_t r_end = std::min(N, (blk + 1) * rows_per_block);
      for (int64_t r = blk * rows_per_block; r < r_end; ++r) {
        const T* xr = x + r * d;
        const T* gr = dy + r * d;
        const V vrs(rstd[r]);
        if (dx) {
          V acc(A(0));
          for_vec<W>(d, [&](int64_t o, int64_t n) {
            const V xh = (n == W ? io::load(xr + o) : io::load(xr + o, n)) * vrs;
            const V g = (n == W ? io::load(gr + o) : io::load(gr + o, n)) *
                        (n == W ? io::load(w + o) : io::load(w + o, n));
            acc = at::vec::fmadd(g, xh, acc);
          });
          const A c = at::vec::vec_reduce_all<A>([](V& p, V& q) { return p + q; }, acc) / A(d);
          const V vc(c);
          T* dxr = dx + r * d;
          for_vec<W>(d, [&](int64_t o, int64_t n) {
            if (n == W) {
              const V xh = io::load(xr + o) * vrs;
              const V g = io::load(gr + o) * io::load(w + o);
              io::store(dxr + o, vrs * (g - xh * vc));
            } else {
              const V xh = io::load(xr + o, n) * vrs;
              const V g = io::load(gr + o, n) * io::load(w + o, n);
              io::store(dxr + o, vrs * (g - xh * vc), n);
            }
          });
        }
        if (pw) {
          for_vec<W>(d, [&](int64_t o, int64_t n) {
            if (n == W) {
              at::vec::fmadd(io::load(gr + o), io::load(xr + o) * vrs, V::loadu(pw + o)).store(pw + o);
            } else {
              at::vec::fmadd(io::load(gr + o, n), io::load(xr + o, n) * vrs, V::loadu(pw + o, n)).store(pw + o, n);
            }
          });
        }
      }
    }
  });
  if (dw) {
    at::parallel_for(0, d, 256, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        A s = 0;
        for (int64_t b = 0; b < nblk; ++b) s += part[b * d + c];
        dw[c] = static_cast<T>(s);
      }
    });
  }
}

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  constexpr const char* op = "fused_rms_norm_fwd";
  check_float(x_, op, "x");
  FO_CHECK(x_.dim() >= 1, op, "x must have at least 1 dim; got a scalar");
  FO_CHECK(std::isfinite(eps) && eps >= 0, op, "eps must be finite and >= 0; got ", eps);
  const int64_t d = x_.size(-1);
  check_like(w_, x_, {d}, op, "weight", "x");
  const at::Tensor x = contig(x_), w = contig(w_);
  const int64_t N = d ? x.numel() / d : 0;
  at::Tensor y = at::empty(x.sizes(), x.options());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm_fwd", [&] {
    rms_fwd_impl<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                           rstd.data_ptr<acc_t<scalar_t>>(), N, d, eps);
  });
  return {y, rstd};
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w_,
                                     const at::Tensor& rstd_, bool need_dx, bool need_dw) {
  constexpr const char* op = "fused_rms_norm_bwd";
  check_float(x_, op, "x");
  FO_CHECK(x_.dim() >= 1, op, "x must have at least 1 dim; got a scalar");
  check_grad(dy_, x_.sizes(), op, "dy");
  check_like(w_, x_, {x_.size(-1)}, op, "weight", "x");
  check_grad(rstd_, x_.sizes().slice(0, x_.dim() - 1), op, "rstd");
  const at::Tensor x = contig(x_), w = contig(w_), dy = contig(dy_.to(x_.scalar_type()));
  const int64_t d = x.size(-1);
  const int64_t N = d ? x.numel() / d : 0;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor rstd = contig(rstd_.to(acc));
  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor dw = need_dw ? at::empty({d}, x.options()) : at::empty({0}, x.options());
  if (!need_dx && !need_dw) return {dx, dw};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm_bwd", [&] {
    rms_bwd_impl<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                           rstd.data_ptr<acc_t<scalar_t>>(), need_dx ? dx.data_ptr<scalar_t>() : nullptr,
                           need_dw ? dw.data_ptr<scalar_t>() : nullptr, N, d);
  });
  return {dx, dw};
}

// ---------------------------------------------------------------------------------------------------
// SwiGLU

constexpr int64_t EW_GRAIN = 16384;  // elements per parallel chunk

template <typename T>
void swiglu_fwd_impl(const T* g, const T* u, T* o, int64_t n) {
  using io = IO<T>;
  using A = typename io::A;
  using V = typename io::V;
  constexpr int64_t W = io::W;
  const V one(A(1));
  at::parallel_for(0, n, EW_GRAIN, [&](int64_t i0, int64_t i1) {
    for_vec<W>(i1 - i0, [&](int64_t off, int64_t c) {
      const int64_t o_ = i0 + off;
      if (c == W) {
        const V gv = io::load(g + o_);
        io::store(o + o_, gv / (one + gv.neg().exp()) * io::load(u + o_));
      } else {
        const V gv = io::load(g + o_, c);
        io::store(o + o_, gv / (one + gv.neg().exp()) * io::load(u + o_, c), c);
      }
    });
  });
}

// s = sigmoid(g);  du = dout * g * s;  dg = dout * u * s * (1 + g * (1 - s))
template <typename T>
void swiglu_bwd_impl(const T* dout, const T* g, const T* u, T* dg, T* du, int64_t n) {
  using io = IO<T>;
  using A = typename io::A;
  using V = typename io::V;
  constexpr int64_t W = io::W;
  const V one(A(1));
  at::parallel_for(0, n, EW_GRAIN, [&](int64_t i0, int64_t i1) {
    for_vec<W>(i1 - i0, [&](int64_t off, int64_t c) {
      const int64_t o_ = i0 + off;
      const bool full = c == W;
      const V gv = full ? io::load(g + o_) : io::load(g + o_, c);
      const V dv = full ? io::load(dout + o_) : io::load(dout + o_, c);
      const V s = one / (one + gv.neg().exp());
      if (du) {
        const V r = dv * (gv * s);
        full ? io::store(du + o_, r) : io::store(du + o_, r, c);
      }
      if (dg) {
        const V uv = full ? io::load(u + o_) : io::load(u + o_, c);
        const V r = dv * uv * s * (one + gv * (one - s));
        full ? io::store(dg + o_, r) : io::store(dg + o_, r, c);
      }
    });
  });
}

at::Tensor swiglu_fwd(const at::Tensor& g_, const at::Tensor& u_) {
  constexpr const char* op = "fused_swiglu_fwd";
  check_float(g_, op, "gate");
  check_like(u_, g_, g_.sizes(), op, "up", "gate");
  const at::Tensor g = contig(g_), u = contig(u_);
  at::Tensor o = at::empty(g.sizes(), g.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "swiglu_fwd", [&] {
    swiglu_fwd_impl<scalar_t>(g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), g.numel());
  });
  return o;
}

std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dout_, const at::Tensor& g_, const at::Tensor& u_,
                                   bool need_dg, bool need_du) {
  constexpr const char* op = "fused_swiglu_bwd";
  check_float(g_, op, "gate");
  check_like(u_, g_, g_.sizes(), op, "up", "gate");
  check_grad(dout_, g_.sizes(), op, "dout");
  const at::Tensor g = contig(g_), u = contig(u_), dout = contig(dout_.to(g_.scalar_type()));
  at::Tensor dg = need_dg ? at::empty(g.sizes(), g.options()) : at::empty({0}, g.options());
  at::Tensor du = need_du ? at::empty(g.sizes(), g.options()) : at::empty({0}, g.options());
  if (!need_dg && !need_du) return {dg, du};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "swiglu_bwd", [&] {
    swiglu_bwd_impl<scalar_t>(dout.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                              need_dg ? dg.data_ptr<scalar_t>() : nullptr, need_du ? du.data_ptr<scalar_t>() : nullptr,
                              g.numel());
  });
  return {dg, du};
}

// ---------------------------------------------------------------------------------------------------
// Rotary position embedding (rotate_half convention). Forward, per row x = [x1, x2] (halves of D):
//   y1 = x1 * c1 - x2 * s1,  y2 = x2 * c2 + x1 * s2
// Backward (the transpose):  dx1 = dy1 * c1 + dy2 * s2,  dx2 = dy2 * c2 - dy1 * s1

struct Strided4 {  // (B, H, L, D) with unit last stride
  int64_t sb, sh, sl;
};
Strided4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T>
void rope_impl(const T* const* src, T* const* dst, const Strided4* ss, const Strided4* ds, const int64_t* H,
               int ntens, const T* cos, const T* sin, int64_t cb, int64_t cl, int64_t sb_, int64_t sl_, int64_t B,
               int64_t L, int64_t D, bool backward) {
  using io = IO<T>;
  using A = typename io::A;
  using V = typename io::V;
  constexpr int64_t W = io::W;
  const int64_t h2 = D / 2;
  int64_t heads = 0;
  for (int t = 0; t < ntens; ++t) heads += H[t];
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(heads * D, 1));
  at::parallel_for(0, B * L, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / L, l = p % L;
      const T* cr = cos + b * cb + l * cl;
      const T* sr = sin + b * sb_ + l * sl_;
      for (int t = 0; t < ntens; ++t) {
        for (int64_t h = 0; h < H[t]; ++h) {
          const T* x = src[t] + b * ss[t].sb + h * ss[t].sh + l * ss[t].sl;
          T* y = dst[t] + b * ds[t].sb + h * ds[t].sh + l * ds[t].sl;
          for_vec<W>(h2, [&](int64_t o, int64_t n) {
            const bool full = n == W;
            auto ld = [&](const T* q) { return full ? io::load(q + o) : io::load(q + o, n); };
            const V x1 = ld(x), x2 = ld(x + h2);
            const V c1 = ld(cr), c2 = ld(cr + h2), s1 = ld(sr), s2 = ld(sr + h2);
            V y1, y2;
            if (!backward) {
              y1 = x1 * c1 - x2 * s1;
              y2 = x2 * c2 + x1 * s2;
            } else {
              y1 = x1 * c1 + x2 * s2;
              y2 = x2 * c2 - x1 * s1;
            }
            if (full) {
              io::store(y + o, y1);
              io::store(y + h2 + o, y2);
            } else {
              io::store(y + o, y1, n);
              io::store(y + h2 + o, y2, n);
            }
          });
        }
      }
    }
  });
}

at::Tensor last_contig(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// q (B, Hq, L, D), k (B, Hkv, L, D), cos/sin (B or 1, L, D). Outputs keep the layout of the (last-dim contiguous)
// inputs (empty_like), so the transposed views transformers passes stay views of (B, L, H, D) memory.
std::vector<at::Tensor> rope(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& cos_, const at::Tensor& sin_,
                             bool backward) {
  constexpr const char* op = "fused_rotary";
  check_float(q_, op, "q");
  FO_CHECK(q_.dim() == 4, op, "q must be 4-D (B, Hq, L, D); got shape ", q_.sizes());
  check_cpu(k_, op, "k");
  FO_CHECK(k_.scalar_type() == q_.scalar_type(), op, "k must have q's dtype ", q_.scalar_type(), "; got ",
           k_.scalar_type());
  const int64_t B = q_.size(0), L = q_.size(2), D = q_.size(3);
  FO_CHECK(k_.dim() == 4 && k_.size(0) == B && k_.size(2) == L && k_.size(3) == D, op, "k must be (B=", B,
           ", Hkv, L=", L, ", D=", D, "); got shape ", k_.sizes());
  FO_CHECK(D % 2 == 0, op, "q's head dim must be even; got D=", D);
  check_cpu(cos_, op, "cos");
  FO_CHECK(cos_.scalar_type() == q_.scalar_type(), op, "cos must have q's dtype ", q_.scalar_type(), "; got ",
           cos_.scalar_type());
  FO_CHECK(cos_.dim() == 3 && cos_.size(1) == L && cos_.size(2) == D && (cos_.size(0) == B || cos_.size(0) == 1), op,
           "cos must be (B=", B, " or 1, L=", L, ", D=", D, "); got shape ", cos_.sizes());
  check_like(sin_, cos_, cos_.sizes(), op, "sin", "cos");
  const at::Tensor q = last_contig(q_), k = last_contig(k_), c = last_contig(cos_), s = last_contig(sin_);
  at::Tensor qo = at::empty_like(q), ko = at::empty_like(k);
  const int64_t cb = c.size(0) == 1 ? 0 : c.stride(0), sb = s.size(0) == 1 ? 0 : s.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "rope", [&] {
    const scalar_t* src[2] = {q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>()};
    scalar_t* dst[2] = {qo.data_ptr<scalar_t>(), ko.data_ptr<scalar_t>()};
    const Strided4 ss[2] = {strides4(q), strides4(k)}, ds[2] = {strides4(qo), strides4(ko)};
    const int64_t H[2] = {q.size(1), k.size(1)};
    rope_impl<scalar_t>(src, dst, ss, ds, H, 2, c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), cb, c.stride(1), sb,
                        s.stride(1), B, L, D, backward);
  });
  return {qo, ko};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_fwd", &rms_norm_fwd, "RMSNorm forward -> (y, rstd)");
  m.def("rms_norm_bwd", &rms_norm_bwd, "RMSNorm backward -> (dx, dweight); empty when not requested");
  m.def("swiglu_fwd", &swiglu_fwd, "silu(gate) * up");
  m.def("swiglu_bwd", &swiglu_bwd, "SwiGLU backward -> (dgate, dup); empty when not requested");
  m.def("rope", &rope, "rotary embedding of q and k (backward=True: its transpose)");
}
