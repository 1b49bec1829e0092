// Fused shared-prefix attention on CPU, forward and backward; semantics: ltuning/kernels/reference.py.
//
//   S = scale * q . [s * bank_k[idx[b]] ; k_b]^T (masked -> -inf),  lse = logsumexp(S),  o = softmax(S) [s * bank_v ; v_b]
//
// With prefix_lengths (N,), sequence b sees only the first prefix_lengths[idx[b]] keys of its entry: the rest
// of the prefix block is masked exactly like padded sequence keys (per-row visible-column counts). With
// prefix_bias (N, P), prefix column j's logit gains bias[idx[b], j] (a constant: no gradient), in the forward
// and in the backward's recomputed probabilities alike.
// Layout: a tile is BM "rows" = (query position i, query head of one KV group) pairs, position-major, so
// GQA reads each KV head once and never copies it per query head. Every matmul is an ATen brgemm tile
// (oneDNN ukernel: AVX512-BF16 / AMX for bf16 with fp32 accumulation; oneDNN fp32 otherwise).
//
// Forward: first every (bank entry n, KV head h) block that some sequence reads is packed ONCE per call into
// GEMM operand layouts (K^T and V, zero past the entry's length; entries no sequence uses are skipped), in
// parallel over the (n, h) pairs. Then one task per (sequence b, KV head h, chunk of row tiles): online
// softmax over the prefix block (its entry's packed block, read in place, scaled per column by s) and then
// over KB-key blocks of k_b. Packing per task instead costs more than the products when many short
// sequences share one long entry (one-pass label scoring: N = 1, P ~ 900, ~14 query rows per sequence).
// Extra memory of the forward: the packed bank, N_used x Hkv x (Dp x P16 + Pp x Dp) elements of the input
// dtype (each block rounded up to 64 elements), N_used = the number of distinct entries in prefix_idx,
// freed at the end of the call.
// Backward, one task per (KV head h, group of sequences using bank entry n): for each row tile the
// prefix block then the sequence blocks, recomputing p from lse. d(bank_n) is accumulated by brgemm with
// the reduction over all query rows of the group (fixed order); the few group partials of an entry are
// summed in a fixed order: deterministic, and the bank or its gradient is never copied per sequence.
// Tasks are scheduled over OpenMP threads (dynamic, largest first); every output element has one writer.
#include <ATen/ATen.h>
#include <torch/python.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::BFloat16;
namespace cpublas = at::native::cpublas;

constexpr int64_t BM = 64;          // rows per tile
constexpr int64_t KB = 64;          // sequence keys per block
constexpr int64_t TILES_PER_TASK = 4;
constexpr int64_t ROWS_PER_GROUP = 1024;  // backward: a bank entry's query rows are split into groups of
constexpr int64_t MAX_GROUPS = 8;         // about this many rows, at most MAX_GROUPS groups

int64_t up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t cdiv(int64_t x, int64_t m) { return (x + m - 1) / m; }
int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return std::min(std::max(x, lo), hi); }

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---------------------------------------------------------------------------------------------------
// GEMM tiles: C[M,N] (+)= A[M,K] (row-major, lda) . B[K,N] with B in "B layout" (ldb): row-major, or for
// bf16 with the oneDNN ukernel VNNI pairs (element (k, n) at ((k/2)*ldb + n)*2 + k%2, K even).

// True when the bf16 brgemm ukernel runs here; it wants B in VNNI pairs (checked on a tiny product).
bool bf16_vnni_supported() {
  static const bool ok = [] {
    try {
      // A = [1 2], B = [[1 2], [3 4]] -> [7 10]; VNNI memory of B is [1 3 2 4].
      BFloat16 a[2] = {1.f, 2.f}, b[4] = {1.f, 3.f, 2.f, 4.f};
      float c[2] = {0.f, 0.f};
      cpublas::brgemm(1, 2, 2, 2, 2, 2, false, a, b, c, true);
      cpublas::brgemm_release(true);
      return c[0] == 7.f && c[1] == 10.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

inline void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float* c, int64_t ldc, bool add, bool) {
  cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c, false);
}
inline void gemm(int64_t M, int64_t N, int64_t K, const BFloat16* a, int64_t lda, const BFloat16* b, int64_t ldb,
                 float* c, int64_t ldc, bool add, bool vnni) {
  cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c, vnni);
}
// float64 (gradcheck) has no brgemm: plain loops.
inline void gemm(int64_t M, int64_t N, int64_t K, const double* a, int64_t lda, const double* b, int64_t ldb,
                 double* c, int64_t ldc, bool add, bool) {
  for (int64_t i = 0; i < M; ++i) {
    double* ci = c + i * ldc;
    if (!add) std::fill(ci, ci + N, 0.0);
    for (int64_t kk = 0; kk < K; ++kk) {
      const double aik = a[i * lda + kk];
      const double* bk = b + kk * ldb;
      for (int64_t j = 0; j < N; ++j) ci[j] += aik * bk[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Element conversion and vector helpers.

inline uint16_t bf16_bits(float f) {  // round to nearest even (inputs here are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// dst[0:n] = src[0:n] * mul, converted to T.
inline void store(float* dst, const float* src, int64_t n, float mul) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * mul;
}
inline void store(double* dst, const double* src, int64_t n, double mul) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * mul;
}
inline void store(BFloat16* dst, const float* src, int64_t n, float mul) {
  auto* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_bits(src[i] * mul);
}

// B layout by rows from an accumulator tile X (M x N, ld, M even): dst row pairs (VNNI) or a plain copy.
inline const float* b_rows(float*, const float* x, int64_t, int64_t, int64_t, bool) { return x; }
inline const double* b_rows(double*, const double* x, int64_t, int64_t, int64_t, bool) { return x; }
inline const BFloat16* b_rows(BFloat16* dst, const float* x, int64_t M, int64_t N, int64_t ld, bool vnni) {
  if (!vnni) {
    for (int64_t r = 0; r < M; ++r) store(dst + r * ld, x + r * ld, N, 1.f);
    return dst;
  }
  for (int64_t r = 0; r < M; r += 2) {
    auto* d = reinterpret_cast<uint32_t*>(dst + r * ld);
    const float* x0 = x + r * ld;
    const float* x1 = x0 + ld;
    for (int64_t c = 0; c < N; ++c) d[c] = bf16_bits(x0[c]) | (static_cast<uint32_t>(bf16_bits(x1[c])) << 16);
  }
  return dst;
}
// A operand (row-major T) from an accumulator tile: a no-op when T is the accumulator type.
inline const float* a_rows(float*, const float* x, int64_t, int64_t, int64_t) { return x; }
inline const double* a_rows(double*, const double* x, int64_t, int64_t, int64_t) { return x; }
inline const BFloat16* a_rows(BFloat16* dst, const float* x, int64_t M, int64_t N, int64_t ld) {
  for (int64_t r = 0; r < M; ++r) store(dst + r * ld, x + r * ld, N, 1.f);
  return dst;
}

inline at::vec::Vectorized<float> vexp(const at::vec::Vectorized<float>& x) { return x.exp_u20(); }
inline at::vec::Vectorized<double> vexp(const at::vec::Vectorized<double>& x) { return x.exp(); }

// ---------------------------------------------------------------------------------------------------
// Geometry: dense (B, H, L, D) views or packed varlen (T, H, D) views with token offsets cu.

template <typename T>
struct View {
  T* p = nullptr;
  int64_t sb = 0, sh = 0, sr = 0;
  const int64_t* cu = nullptr;
  T* row(int64_t b, int64_t h, int64_t i) const { return p + (cu ? cu[b] * sr : b * sb) + h * sh + i * sr; }
};

template <typename T>
View<T> view(const at::Tensor& t, const int64_t* cu) {
  View<T> v;
  v.p = static_cast<T*>(t.data_ptr());
  v.cu = cu;
  if (cu) {
    v.sr = t.stride(0);
    v.sh = t.stride(1);
  } else {
    v.sb = t.stride(0);
    v.sh = t.stride(1);
    v.sr = t.stride(2);
  }
  return v;
}

template <typename T>
struct Problem {
  using A = acc_t<T>;
  // Dp = D and Pp = P rounded up to 2 (GEMM K dims, VNNI pairs); P16 = P rounded up to 16 (GEMM N dim).
  int64_t B = 0, Hq = 0, Hkv = 0, g = 1, D = 0, Dp = 0, P = 0, Pp = 0, P16 = 0, N = 0, SL = 0, Lq = 0, Lk = 0;
  int64_t Lk_max = 0;
  const int64_t* cu = nullptr;
  bool causal = false, vnni = false;
  A scale = 1;
  const int64_t* idx = nullptr;
  const bool* mask = nullptr;
  const A* ps = nullptr;
  const int64_t* plen = nullptr;  // (N,) real length of each bank entry, or null: all P
  const A* pbias = nullptr;       // (N, P16) additive logit of each bank token (zero past P), or null
  const T* bank_k = nullptr;
  const T* bank_v = nullptr;
  View<const T> q, k, v;

  int64_t lq(int64_t b) const { return cu ? cu[b + 1] - cu[b] : Lq; }
  int64_t lk(int64_t b) const { return cu ? cu[b + 1] - cu[b] : Lk; }
  int64_t rows(int64_t b) const { return lq(b) * g; }
  // Prefix keys sequence b sees: the real length of its bank entry (the rest of a right-padded entry is masked).
  int64_t prefix_len(int64_t b) const { return plen ? plen[idx[b]] : P; }
  // The prefix logits' additive bias of sequence b's entry (P16 readable values), or null.
  const A* prefix_bias(int64_t b) const { return pbias ? pbias + idx[b] * P16 : nullptr; }
  // Number of sequence keys visible to query position i (causal: bottom-right aligned).
  int64_t visible(int64_t b, int64_t i) const { return causal ? clamp(i + lk(b) - lq(b) + 1, 0, lk(b)) : lk(b); }
  // ... to every row of a tile ending before row r_end.
  int64_t keys_upto(int64_t b, int64_t r_end) const { return visible(b, (r_end - 1) / g); }
  const T* bank_row(const T* bank, int64_t n, int64_t h, int64_t j) const { return bank + ((n * Hkv + h) * P + j) * D; }
};

// A row tile of sequence b, KV head h: rows r0 + r = (position pos[r], query head head[r]) for r < m, padded
// with zero rows to Mg = m rounded up to 2 (the K dim of the backward's VNNI products must be even). Not to 16:
// a short sequence's tile (one-pass label scoring: ~12 positions x 3 grouped heads = 36 rows against ~970
// bank keys) would compute a third more rows than it has.
struct Tile {
  int64_t b, m, Mg;
  int64_t pos[BM], head[BM];
  template <typename T>
  Tile(const Problem<T>& pb, int64_t b_, int64_t h, int64_t r0) : b(b_) {
    m = std::min(BM, pb.rows(b) - r0);
    Mg = up(m, 2);
    int64_t i = r0 / pb.g, j = r0 % pb.g;
    for (int64_t r = 0; r < m; ++r) {
      pos[r] = i, head[r] = h * pb.g + j;
      if (++j == pb.g) j = 0, ++i;
    }
  }
  template <typename U>
  U* row(const View<U>& x, int64_t r) const { return x.row(b, head[r], pos[r]); }
};

// Bump allocator over one per-thread workspace; constructed on nullptr it only measures.
struct Arena {
  char* base;
  int64_t used = 0;
  template <typename U>
  U* take(int64_t n) {
    U* r = reinterpret_cast<U*>(base + used);
    used += up(n * static_cast<int64_t>(sizeof(U)), 64);
    return r;
  }
};


// Runs body(task, workspace) for every task on the OpenMP pool, largest tasks first.
template <typename F>
void run_tasks(const std::vector<int64_t>& order, int64_t ws_bytes, bool vnni, const F& body) {
  const int64_t n = static_cast<int64_t>(order.size());
  if (n == 0) return;
  const int nt = static_cast<int>(std::min<int64_t>(at::get_num_threads(), n));
#pragma omp parallel num_threads(nt)
  {
    // per-thread workspace, kept between calls (OpenMP threads persist) to avoid fresh pages every call
    thread_local std::unique_ptr<char[]> ws;
    thread_local int64_t ws_size = 0;
    if (ws_size < ws_bytes + 64) ws.reset(new char[ws_size = ws_bytes + 64]);
    char* mem = ws.get() + (64 - reinterpret_cast<uintptr_t>(ws.get()) % 64) % 64;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n; ++t) body(order[t], mem);
    if (vnni) cpublas::brgemm_release(true);
  }
}

std::vector<int64_t> largest_first(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  return order;
}

// ---------------------------------------------------------------------------------------------------
// Packing: gather strided rows, then transpose / interleave into GEMM operand layouts.

// dst (N x M, ldd) = src (M x N, lds)^T.
inline void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t M, int64_t N) {
#if defined(CPU_CAPABILITY_AVX512)
  at::vec::transpose_mxn<float>(src, lds, dst, ldd, static_cast<int>(M), static_cast<int>(N));
#else
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) dst[j * ldd + i] = src[i * lds + j];
#endif
}
inline void transpose(const BFloat16* src, int64_t lds, BFloat16* dst, int64_t ldd, int64_t M, int64_t N) {
#if defined(CPU_CAPABILITY_AVX512)
  for (int64_t i = 0; i < M; i += 32)
    for (int64_t j = 0; j < N; j += 32)
      at::vec::transpose_mxn<BFloat16>(src + i * lds + j, lds, dst + j * ldd + i, ldd,
                                       static_cast<int>(std::min<int64_t>(32, M - i)),
                                       static_cast<int>(std::min<int64_t>(32, N - j)));
#else
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) dst[j * ldd + i] = src[i * lds + j];
#endif
}
inline void transpose(const double* src, int64_t lds, double* dst, int64_t ldd, int64_t M, int64_t N) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) dst[j * ldd + i] = src[i * lds + j];
}

// dst[0:n] = src[0:n] (short rows: explicit vector copies beat a memcpy call).
template <typename T>
inline void copy_row(T* dst, const T* src, int64_t n) {
  using V = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) V::loadu(src + i).store(dst + i);
  if (i < n) V::loadu(src + i, n - i).store(dst + i, n - i);
}

// dst (rows x Dp, row-major): rows r < n are xrow(r)[0:D] zero-padded to Dp, later rows zero.
template <typename T, typename RowFn>
void gather(T* dst, const RowFn& xrow, int64_t n, int64_t rows, int64_t D, int64_t Dp) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dst + r * Dp;
    if (r < n) {
      copy_row(d, xrow(r), D);
      if (Dp > D) d[D] = T(0);
    } else {
      std::fill(d, d + Dp, T(0));
    }
  }
}
// B layout of X^T (K = Dp, N = Nb, ldb = ld) from gathered X (Nb x Dp). In VNNI the (d, d+1) pairs of a
// row of X are one 32-bit word, so it is a 32-bit transpose.
template <typename T>
void b_trans(T* dst, int64_t ld, const T* x, int64_t Nb, int64_t Dp, bool vnni) {
  if (vnni)
    transpose(reinterpret_cast<const float*>(x), Dp / 2, reinterpret_cast<float*>(dst), ld, Nb, Dp / 2);
  else
    transpose(x, Dp, dst, ld, Nb, Dp);
}
// B layout of X (K = Nb, N = Dp, ldb = Dp) from gathered X (Nb x Dp, Nb even).
template <typename T>
void b_plain(T* dst, const T* x, int64_t Nb, int64_t Dp, bool vnni) {
  if (!vnni) {
    std::memcpy(dst, x, Nb * Dp * sizeof(T));
    return;
  }
  for (int64_t c = 0; c < Nb; c += 2) {
    const auto* x0 = reinterpret_cast<const uint16_t*>(x + c * Dp);
    const auto* x1 = x0 + Dp;
    auto* d = reinterpret_cast<uint32_t*>(dst + c * Dp);
    for (int64_t e = 0; e < Dp; ++e) d[e] = x0[e] | (static_cast<uint32_t>(x1[e]) << 16);
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward.

// Logits of a score block (rows r < Mg, ld), in place: z = scale * s[c] * x[c] + bias[c] for c < cnt[r] and
// -inf for cnt[r] <= c < Nv (Nv a multiple of 16). zmax[r] = max_c z.
template <typename A>
void logits(A* x, int64_t ld, int64_t Mg, int64_t Nv, const int64_t* cnt, A scale, const A* s, const A* bias, A* zmax) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  const V ninf(-std::numeric_limits<A>::infinity());
  for (int64_t r = 0; r < Mg; ++r) {
    A* xr = x + r * ld;
    V vmax = ninf;
    for (int64_t c = 0; c < Nv; c += W) {
      const int64_t left = cnt[r] - c;
      if (left <= 0) {
        ninf.store(xr + c);
        continue;
      }
      V z = V::loadu(xr + c) * V(scale);
      if (s) z = z * V::loadu(s + c);
      if (bias) z = z + V::loadu(bias + c);
      if (left < W) z = V::set(ninf, z, left);
      z.store(xr + c);
      vmax = at::vec::maximum(vmax, z);
    }
    zmax[r] = at::vec::vec_reduce_all<A>([](V& u, V& w) { return at::vec::maximum(u, w); }, vmax);
  }
}

// Online-softmax step over one block: x holds raw scores q.k and becomes the PV weights p * s (0 where
// masked); (mx, l) are the running row max / sum, O (ld Dp) the unnormalised output, rescaled here.
template <typename A>
void softmax_block(A* x, int64_t ld, int64_t Mg, int64_t Nv, const int64_t* cnt, A scale, const A* s,
                   const A* bias, A* mx, A* l, A* O, int64_t Dp, A* alpha) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  const V ninf(-std::numeric_limits<A>::infinity());
  logits(x, ld, Mg, Nv, cnt, scale, s, bias, alpha);
  for (int64_t r = 0; r < Mg; r += W) {  // alpha = exp(mx_old - mx_new), 1 while nothing is visible
    const int64_t w = std::min(W, Mg - r);  // Mg is even, not a multiple of W: rows past Mg are not touched
    const V mo = V::loadu(mx + r, w), mn = at::vec::maximum(mo, V::loadu(alpha + r, w));
    vexp(V::blendv(mo - mn, V(A(0)), mn == ninf)).store(alpha + r, w);
    mn.store(mx + r, w);
  }
  for (int64_t r = 0; r < Mg; ++r) {
    A* xr = x + r * ld;
    if (mx[r] == -std::numeric_limits<A>::infinity()) {
      std::fill(xr, xr + Nv, A(0));
      continue;
    }
    V vsum(A(0));
    for (int64_t c = 0; c < Nv; c += W) {
      V p = vexp(V::loadu(xr + c) - V(mx[r]));
      vsum = vsum + p;
      if (s) p = p * V::loadu(s + c);
      p.store(xr + c);
    }
    const A a = alpha[r];
    if (a != A(1) && l[r] != A(0))
      for (int64_t d = 0; d < Dp; d += W) {
        const int64_t w = std::min(W, Dp - d);
        (V::loadu(O + r * Dp + d, w) * V(a)).store(O + r * Dp + d, w);
      }
    l[r] = l[r] * a + at::vec::vec_reduce_all<A>([](V& u, V& w) { return u + w; }, vsum);
  }
}

template <typename T>
void forward_impl(const Problem<T>& pb, View<T> out, View<acc_t<T>> lse) {
  using A = acc_t<T>;
  const int64_t Dp = pb.Dp, Pp = pb.Pp, P16 = pb.P16, SL = pb.SL, D = pb.D, P = pb.P;
  const int64_t nblk_max = cdiv(pb.Lk_max, KB);
  const A ninf = -std::numeric_limits<A>::infinity();
  const bool vnni = pb.vnni;

  auto layout = [&](Arena& ar) {
    struct {
      T *kt, *vn, *qt, *pt, *tmp;
      A *bias, *s, *S, *O, *mx, *l, *alpha;
      int64_t *lim, *cnt;
    } w;
    w.tmp = ar.take<T>(KB * Dp);
    w.kt = ar.take<T>(nblk_max * Dp * KB);
    w.vn = ar.take<T>(nblk_max * KB * Dp);
    w.bias = ar.take<A>(nblk_max * KB);
    w.s = ar.take<A>(SL);
    w.qt = ar.take<T>(BM * Dp);
    w.S = ar.take<A>(BM * SL);
    w.pt = std::is_same_v<T, A> ? nullptr : ar.take<T>(BM * SL);
    w.O = ar.take<A>(BM * Dp);
    w.mx = ar.take<A>(BM);
    w.l = ar.take<A>(BM);
    w.alpha = ar.take<A>(BM);
    w.lim = ar.take<int64_t>(BM);
    w.cnt = ar.take<int64_t>(BM);
    return w;
  };
  Arena probe{nullptr};
  layout(probe);

  // The packed bank: one block per (used entry, KV head), K^T in B layout with ldb P16 (as b_trans makes it),
  // then V in B layout with ldb Dp (as b_plain makes it), zero-filled past the entry's length exactly as a
  // per-task packing would be: the tasks' brgemm calls read the same bytes.
  const int64_t kblk = up(Dp * P16, 64), blk_elems = kblk + up(Pp * Dp, 64);
  std::vector<int64_t> slot(P ? pb.N : 0, -1), used;  // slot[n]: index of entry n's blocks, -1 when unused
  for (int64_t b = 0; P && b < pb.B; ++b)
    if (slot[pb.idx[b]] < 0) slot[pb.idx[b]] = static_cast<int64_t>(used.size()), used.push_back(pb.idx[b]);
  const int64_t npack = static_cast<int64_t>(used.size()) * pb.Hkv;
  at::Tensor packed_buf;
  T* packed = nullptr;
  if (npack) {
    packed_buf = at::empty({npack * blk_elems * static_cast<int64_t>(sizeof(T))}, at::kByte);  // 64-byte aligned
    packed = reinterpret_cast<T*>(packed_buf.data_ptr());
    std::vector<int64_t> order(npack);
    std::iota(order.begin(), order.end(), 0);
    run_tasks(order, up(P16 * Dp * static_cast<int64_t>(sizeof(T)), 64), vnni, [&](int64_t u, char* mem) {
      T* tmp = reinterpret_cast<T*>(mem);
      const int64_t n = used[u / pb.Hkv], h = u % pb.Hkv;
      const int64_t pl = pb.plen ? pb.plen[n] : P;  // rows past the entry's length are never read (zero-filled)
      T* dst = packed + u * blk_elems;
      gather(tmp, [&](int64_t j) { return pb.bank_row(pb.bank_k, n, h, j); }, pl, P16, D, Dp);
      b_trans(dst, P16, tmp, P16, Dp, vnni);
      gather(tmp, [&](int64_t j) { return pb.bank_row(pb.bank_v, n, h, j); }, pl, Pp, D, Dp);
      b_plain(dst + kblk, tmp, Pp, Dp, vnni);
    });
  }

  // tasks: (b, h, chunk of TILES_PER_TASK row tiles)
  std::vector<int64_t> tb, th, tt, cost;
  for (int64_t b = 0; b < pb.B; ++b) {
    const int64_t nt = cdiv(pb.rows(b), BM);
    for (int64_t h = 0; h < pb.Hkv; ++h)
      for (int64_t t = 0; t < nt; t += TILES_PER_TASK) {
        tb.push_back(b), th.push_back(h), tt.push_back(t);
        const int64_t r_end = std::min(pb.rows(b), (t + TILES_PER_TASK) * BM);
        cost.push_back((r_end - t * BM) * (P + pb.keys_upto(b, r_end)));
      }
  }

  run_tasks(largest_first(cost), probe.used, vnni, [&](int64_t task, char* mem) {
    Arena ar{mem};
    auto w = layout(ar);
    const int64_t b = tb[task], h = th[task], R = pb.rows(b);
    const int64_t t0 = tt[task], t1 = std::min(cdiv(R, BM), t0 + TILES_PER_TASK);
    const int64_t nk = pb.keys_upto(b, std::min(R, t1 * BM));
    for (int64_t c0 = 0; c0 < nk; c0 += KB) {
      const int64_t nv = std::min(KB, nk - c0), Nb = up(nv, 16), blk = c0 / KB;
      auto krow = [&](int64_t c) { return pb.k.row(b, h, c0 + c); };
      auto vrow = [&](int64_t c) { return pb.v.row(b, h, c0 + c); };
      gather(w.tmp, krow, nv, Nb, D, Dp);
      b_trans(w.kt + blk * Dp * KB, KB, w.tmp, Nb, Dp, vnni);
      gather(w.tmp, vrow, nv, Nb, D, Dp);
      b_plain(w.vn + blk * KB * Dp, w.tmp, Nb, Dp, vnni);
      if (pb.mask)
        for (int64_t c = 0; c < nv; ++c) w.bias[c0 + c] = pb.mask[b * pb.Lk + c0 + c] ? A(0) : ninf;
    }
    const T *ktb = nullptr, *vnb = nullptr;  // this sequence's entry, KV head h: packed K^T and V
    if (P) {
      ktb = packed + (slot[pb.idx[b]] * pb.Hkv + h) * blk_elems;
      vnb = ktb + kblk;
      std::fill(w.s, w.s + SL, A(1));
      if (pb.ps) std::copy_n(pb.ps + b * P, P, w.s);
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * BM;
      const Tile tl(pb, b, h, r0);
      const int64_t m = tl.m, Mg = tl.Mg;
      gather(w.qt, [&](int64_t r) { return tl.row(pb.q, r); }, m, Mg, D, Dp);
      for (int64_t r = 0; r < Mg; ++r) {
        w.mx[r] = ninf, w.l[r] = 0;
        w.lim[r] = r < m ? pb.visible(b, tl.pos[r]) : 0;
      }
      const T* pt;
      bool fresh = true;  // the first PV product writes O (nothing is rescaled before it: l == 0)
      if (P) {
        gemm(Mg, P16, Dp, w.qt, Dp, ktb, P16, w.S, SL, false, vnni);
        for (int64_t r = 0; r < Mg; ++r) w.cnt[r] = r < m ? pb.prefix_len(b) : 0;
        softmax_block(w.S, SL, Mg, P16, w.cnt, pb.scale, pb.ps ? w.s : nullptr, pb.prefix_bias(b), w.mx, w.l,
                      w.O, Dp, w.alpha);
        pt = a_rows(w.pt, w.S, Mg, Pp, SL);
        gemm(Mg, Dp, Pp, pt, SL, vnb, Dp, w.O, Dp, !fresh, vnni);
        fresh = false;
      }
      const int64_t nkt = pb.keys_upto(b, r0 + m);
      for (int64_t c0 = 0; c0 < nkt; c0 += KB) {
        const int64_t nv = std::min(KB, nkt - c0), Nb = up(nv, 16), blk = c0 / KB;
        gemm(Mg, Nb, Dp, w.qt, Dp, w.kt + blk * Dp * KB, KB, w.S, SL, false, vnni);
        for (int64_t r = 0; r < Mg; ++r) w.cnt[r] = clamp(w.lim[r] - c0, 0, nv);
        softmax_block(w.S, SL, Mg, Nb, w.cnt, pb.scale, (const A*)nullptr, pb.mask ? w.bias + c0 : nullptr, w.mx,
                      w.l, w.O, Dp, w.alpha);
        pt = a_rows(w.pt, w.S, Mg, Nb, SL);
        gemm(Mg, Dp, Nb, pt, SL, w.vn + blk * KB * Dp, Dp, w.O, Dp, !fresh, vnni);
        fresh = false;
      }
      for (int64_t r = 0; r < m; ++r) {
        T* o = tl.row(out, r);
        A* ls = tl.row(lse, r);
        if (w.l[r] > 0) {
          store(o, w.O + r * Dp, D, A(1) / w.l[r]);
          *ls = w.mx[r] + std::log(w.l[r]);
        } else {
          std::fill(o, o + D, T(0));
          *ls = ninf;
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Backward.  With z = scale * s * q.k (+ mask), p = exp(z - lse), delta = sum_c p s dO.v - dlse:
//   dz = p * (s * dO.v - delta),  dq += scale * dz * s k,  dk += scale * dz * s q,  dv += p * s dO,
//   ds += dz * scale * q.k + p * dO.v  (per sequence and prefix column).
// delta is summed from the fp32 p and dO.v of every block of the row tile (a first pass), not from the
// rounded output o, so it stays exact for bf16 and o is not needed at all.

// Pass 1 over one column block (rows r < Mg, ld; Nv a multiple of 16): x = q.k becomes p (0 where
// c >= cnt[r]); rows of racc (one vector each) accumulate p * s * y with y = dO.v.
template <typename A>
void bwd_probs(A* x, const A* y, int64_t ld, int64_t Mg, int64_t Nv, const int64_t* cnt, A scale, const A* s,
               const A* bias, const A* lse, A* racc) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  const V ninf(-std::numeric_limits<A>::infinity()), zero(A(0));
  for (int64_t r = 0; r < Mg; ++r) {
    A* xr = x + r * ld;
    V acc = V::loadu(racc + r * W);
    for (int64_t c = 0; c < Nv; c += W) {
      const int64_t left = cnt[r] - c;
      if (left <= 0) {
        zero.store(xr + c);
        continue;
      }
      const V vs = s ? V::loadu(s + c) : V(A(1));
      V z = V::loadu(xr + c) * V(scale) * vs;
      if (bias) z = z + V::loadu(bias + c);
      if (left < W) z = V::set(ninf, z, left);
      const V p = vexp(z - V(lse[r]));
      p.store(xr + c);
      acc = at::vec::fmadd(p * vs, V::loadu(y + r * ld + c), acc);
    }
    acc.store(racc + r * W);
  }
}

// Pass 2 over one column block: x = p, y = dO.v on entry; on exit x = p * s (dV weights) and
// y = scale * s * dz (dQ / dK weights). With ds: ds += dz * scale * xraw + p * y (xraw = q.k).
template <typename A>
void bwd_grads(A* x, A* y, int64_t ld, int64_t Mg, int64_t Nv, A scale, const A* s, const A* delta, A* ds,
               const A* xraw) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  for (int64_t r = 0; r < Mg; ++r) {
    A* xr = x + r * ld;
    A* yr = y + r * ld;
    for (int64_t c = 0; c < Nv; c += W) {
      const V p = V::loadu(xr + c), vy = V::loadu(yr + c);
      const V vs = s ? V::loadu(s + c) : V(A(1));
      const V dz = p * (vs * vy - V(delta[r]));
      if (ds) (V::loadu(ds + c) + dz * V(scale) * V::loadu(xraw + r * ld + c) + p * vy).store(ds + c);
      (p * vs).store(xr + c);
      (dz * V(scale) * vs).store(yr + c);
    }
  }
}

template <typename T>
struct Grad {
  using A = acc_t<T>;
  View<const T> dout;
  View<const A> lse, dlse;  // in the accumulator dtype; dlse.p may be null
  View<T> dq, dk, dv;
};

// Tasks are (KV head h, group of sequences that use one bank entry n). A task runs the whole backward of
// its (b, h) pairs, one row tile at a time: the prefix block, then the sequence blocks. d(bank_n, h) is
// accumulated by brgemm over all query rows of the group in a fixed order (the GEMM reduction runs over
// rows), and the few group partials of an entry are summed in a fixed order at the end: deterministic,
// with no per-sequence copy of the bank or of its gradient.
template <typename T>
void backward_impl(const Problem<T>& pb, const Grad<T>& gr, T* dbank_k, T* dbank_v, acc_t<T>* dps) {
  using A = acc_t<T>;
  const int64_t Dp = pb.Dp, Pp = pb.Pp, P16 = pb.P16, SL = pb.SL, D = pb.D, P = pb.P, Hkv = pb.Hkv;
  const int64_t nkeys = cdiv(pb.Lk_max, KB) * KB, nblk = 1 + nkeys / KB;
  const A ninf = -std::numeric_limits<A>::infinity();
  const bool vnni = pb.vnni;
  constexpr int64_t W = at::vec::Vectorized<A>::size();

  auto layout = [&](Arena& ar) {
    struct {
      T *kt, *vt, *kn, *ktb, *vtb, *knb, *qt, *qtt, *dot, *dott, *bp, *bd, *ad, *tmp;
      A *bias, *s, *S, *dP, *xraw, *racc, *dq, *lse, *delta, *dsacc, *dkt, *dvt, *tmpf;
      int64_t *lim, *cnt;
    } w;
    w.tmp = ar.take<T>(std::max(KB, P16) * Dp);
    w.tmpf = ar.take<A>(KB * Dp);
    w.kt = ar.take<T>(Dp * nkeys);
    w.vt = ar.take<T>(Dp * nkeys);
    w.kn = ar.take<T>(nkeys * Dp);
    w.ktb = ar.take<T>(Dp * P16);
    w.vtb = ar.take<T>(Dp * P16);
    w.knb = ar.take<T>(Pp * Dp);
    w.bias = ar.take<A>(nkeys);
    w.s = ar.take<A>(SL);
    w.dsacc = ar.take<A>(SL);
    w.dkt = ar.take<A>(Dp * nkeys);
    w.dvt = ar.take<A>(Dp * nkeys);
    w.qt = ar.take<T>(BM * Dp);
    w.dot = ar.take<T>(BM * Dp);
    w.qtt = ar.take<T>(Dp * BM);
    w.dott = ar.take<T>(Dp * BM);
    w.S = ar.take<A>(nblk * BM * SL);  // q.k and dO.v of every column block of a row tile
    w.dP = ar.take<A>(nblk * BM * SL);
    w.xraw = ar.take<A>(BM * SL);
    w.racc = ar.take<A>(BM * W);
    w.bp = ar.take<T>(BM * SL);
    w.bd = ar.take<T>(BM * SL);
    w.ad = ar.take<T>(BM * SL);
    w.dq = ar.take<A>(BM * Dp);
    w.lse = ar.take<A>(BM);
    w.delta = ar.take<A>(BM);
    w.lim = ar.take<int64_t>(BM);
    w.cnt = ar.take<int64_t>(BM);
    return w;
  };
  Arena probe{nullptr};
  layout(probe);

  // Task list: sequences ordered by bank entry; an entry's rows split into at most MAX_GROUPS groups.
  std::vector<int64_t> seqs, th, tn, ts0, ts1, cost;
  for (int64_t n = 0; n < std::max<int64_t>(pb.N, 1); ++n) {
    const int64_t first = static_cast<int64_t>(seqs.size());
    int64_t rows_n = 0;
    for (int64_t b = 0; b < pb.B; ++b)
      if (!P || pb.idx[b] == n) seqs.push_back(b), rows_n += pb.rows(b);
    const int64_t cnt = static_cast<int64_t>(seqs.size()) - first;
    if (cnt == 0) continue;
    const int64_t G = P ? clamp(cdiv(rows_n, ROWS_PER_GROUP), 1, std::min(cnt, MAX_GROUPS)) : cnt;
    std::vector<int64_t> bounds{first};
    int64_t acc = 0;
    for (int64_t i = first; i < first + cnt; ++i) {
      acc += pb.rows(seqs[i]);
      const int64_t made = static_cast<int64_t>(bounds.size());
      if (made < G && i + 1 < first + cnt && acc * G >= rows_n * made) bounds.push_back(i + 1);
    }
    bounds.push_back(first + cnt);
    for (size_t q = 0; q + 1 < bounds.size(); ++q) {
      int64_t c = 0;
      for (int64_t i = bounds[q]; i < bounds[q + 1]; ++i) c += pb.rows(seqs[i]) * (P16 + pb.lk(seqs[i]) + 1);
      for (int64_t h = 0; h < Hkv; ++h) {
        th.push_back(h), tn.push_back(n), ts0.push_back(bounds[q]), ts1.push_back(bounds[q + 1]);
        cost.push_back(c);
      }
    }
  }
  std::vector<A> part(P ? th.size() * 2 * Dp * P16 : 0);  // per task: d(bank_k)^T, d(bank_v)^T
  std::vector<A> dsp(dps ? pb.B * Hkv * P : 0);

  run_tasks(largest_first(cost), probe.used, vnni, [&](int64_t task, char* mem) {
    Arena ar{mem};
    auto w = layout(ar);
    const int64_t h = th[task], n = tn[task];
    A* dkb = P ? part.data() + task * 2 * Dp * P16 : nullptr;
    A* dvb = P ? dkb + Dp * P16 : nullptr;
    if (P) {
      const int64_t pl = pb.plen ? pb.plen[n] : P;  // rows past the entry's length are never read
      gather(w.tmp, [&](int64_t j) { return pb.bank_row(pb.bank_k, n, h, j); }, pl, P16, D, Dp);
      b_trans(w.ktb, P16, w.tmp, P16, Dp, vnni);
      b_plain(w.knb, w.tmp, Pp, Dp, vnni);
      gather(w.tmp, [&](int64_t j) { return pb.bank_row(pb.bank_v, n, h, j); }, pl, P16, D, Dp);
      b_trans(w.vtb, P16, w.tmp, P16, Dp, vnni);
    }
    for (int64_t i = ts0[task]; i < ts1[task]; ++i) {
      const int64_t b = seqs[i], R = pb.rows(b), Lk = pb.lk(b), nk = pb.keys_upto(b, R);
      for (int64_t c0 = 0; c0 < nk; c0 += KB) {
        const int64_t nv = std::min(KB, nk - c0), Nb = up(nv, 16);
        gather(w.tmp, [&](int64_t c) { return pb.k.row(b, h, c0 + c); }, nv, Nb, D, Dp);
        b_trans(w.kt + c0 * Dp, KB, w.tmp, Nb, Dp, vnni);
        b_plain(w.kn + c0 * Dp, w.tmp, Nb, Dp, vnni);
        gather(w.tmp, [&](int64_t c) { return pb.v.row(b, h, c0 + c); }, nv, Nb, D, Dp);
        b_trans(w.vt + c0 * Dp, KB, w.tmp, Nb, Dp, vnni);
        if (pb.mask)
          for (int64_t c = 0; c < nv; ++c) w.bias[c0 + c] = pb.mask[b * pb.Lk + c0 + c] ? A(0) : ninf;
      }
      std::fill(w.dkt, w.dkt + up(nk, KB) * Dp, A(0));
      std::fill(w.dvt, w.dvt + up(nk, KB) * Dp, A(0));
      if (P) {
        std::fill(w.s, w.s + SL, A(1));
        if (pb.ps) std::copy_n(pb.ps + b * P, P, w.s);
        std::fill(w.dsacc, w.dsacc + SL, A(0));
      }
      for (int64_t r0 = 0; r0 < R; r0 += BM) {
        const Tile tl(pb, b, h, r0);
        const int64_t m = tl.m, Mg = tl.Mg;
        // query side: q, dO (row-major and transposed), lse, visible keys
        gather(w.qt, [&](int64_t r) { return tl.row(pb.q, r); }, m, Mg, D, Dp);
        transpose(w.qt, Dp, w.qtt, BM, Mg, Dp);
        gather(w.dot, [&](int64_t r) { return tl.row(gr.dout, r); }, m, Mg, D, Dp);
        transpose(w.dot, Dp, w.dott, BM, Mg, Dp);
        for (int64_t r = 0; r < Mg; ++r) {
          w.lim[r] = -1, w.lse[r] = 0;
          if (r >= m || *tl.row(gr.lse, r) == ninf) continue;
          w.lse[r] = *tl.row(gr.lse, r);
          w.lim[r] = pb.visible(b, tl.pos[r]);
        }
        // pass 1: scores, p, and delta = sum_c p s dO.v - dlse for every column block of the tile
        const int64_t nkt = pb.keys_upto(b, r0 + m);
        std::fill(w.racc, w.racc + Mg * W, A(0));
        if (P) {
          gemm(Mg, P16, Dp, w.qt, Dp, w.ktb, P16, w.S, SL, false, vnni);
          gemm(Mg, P16, Dp, w.dot, Dp, w.vtb, P16, w.dP, SL, false, vnni);
          if (dps) std::copy_n(w.S, Mg * SL, w.xraw);
          for (int64_t r = 0; r < Mg; ++r) w.cnt[r] = w.lim[r] < 0 ? 0 : pb.prefix_len(b);
          bwd_probs(w.S, w.dP, SL, Mg, P16, w.cnt, pb.scale, pb.ps ? w.s : nullptr, pb.prefix_bias(b), w.lse,
                    w.racc);
        }
        for (int64_t c0 = 0; c0 < nkt; c0 += KB) {
          const int64_t nv = std::min(KB, nkt - c0), Nb = up(nv, 16), j = 1 + c0 / KB;
          gemm(Mg, Nb, Dp, w.qt, Dp, w.kt + c0 * Dp, KB, w.S + j * BM * SL, SL, false, vnni);
          gemm(Mg, Nb, Dp, w.dot, Dp, w.vt + c0 * Dp, KB, w.dP + j * BM * SL, SL, false, vnni);
          for (int64_t r = 0; r < Mg; ++r) w.cnt[r] = w.lim[r] < 0 ? 0 : clamp(w.lim[r] - c0, 0, nv);
          bwd_probs(w.S + j * BM * SL, w.dP + j * BM * SL, SL, Mg, Nb, w.cnt, pb.scale, (const A*)nullptr,
                    pb.mask ? w.bias + c0 : nullptr, w.lse, w.racc);
        }
        for (int64_t r = 0; r < Mg; ++r) {
          const auto acc = at::vec::Vectorized<A>::loadu(w.racc + r * W);
          w.delta[r] = at::vec::vec_reduce_all<A>([](auto& u, auto& v) { return u + v; }, acc) -
                       (gr.dlse.p && r < m ? *tl.row(gr.dlse, r) : A(0));
        }
        // pass 2: dz, then dV^T, dK^T (reduction over the tile's rows) and dQ products per block
        if (P) {  // prefix block: d(bank) accumulates into this task's partial
          bwd_grads(w.S, w.dP, SL, Mg, P16, pb.scale, pb.ps ? w.s : nullptr, w.delta, dps ? w.dsacc : nullptr,
                    w.xraw);
          gemm(Dp, P16, Mg, w.dott, BM, b_rows(w.bp, w.S, Mg, P16, SL, vnni), SL, dvb, P16, true, vnni);
          gemm(Dp, P16, Mg, w.qtt, BM, b_rows(w.bd, w.dP, Mg, P16, SL, vnni), SL, dkb, P16, true, vnni);
          gemm(Mg, Dp, Pp, a_rows(w.ad, w.dP, Mg, Pp, SL), SL, w.knb, Dp, w.dq, Dp, false, vnni);
        } else {
          std::fill(w.dq, w.dq + Mg * Dp, A(0));
        }
        for (int64_t c0 = 0; c0 < nkt; c0 += KB) {  // sequence blocks
          const int64_t nv = std::min(KB, nkt - c0), Nb = up(nv, 16);
          A* Sj = w.S + (1 + c0 / KB) * BM * SL;
          A* dPj = w.dP + (1 + c0 / KB) * BM * SL;
          bwd_grads(Sj, dPj, SL, Mg, Nb, pb.scale, (const A*)nullptr, w.delta, (A*)nullptr, (const A*)nullptr);
          gemm(Dp, Nb, Mg, w.dott, BM, b_rows(w.bp, Sj, Mg, Nb, SL, vnni), SL, w.dvt + c0 * Dp, KB, true, vnni);
          gemm(Dp, Nb, Mg, w.qtt, BM, b_rows(w.bd, dPj, Mg, Nb, SL, vnni), SL, w.dkt + c0 * Dp, KB, true, vnni);
          gemm(Mg, Dp, Nb, a_rows(w.ad, dPj, Mg, Nb, SL), SL, w.kn + c0 * Dp, Dp, w.dq, Dp, true, vnni);
        }
        for (int64_t r = 0; r < m; ++r) store(tl.row(gr.dq, r), w.dq + r * Dp, D, A(1));
      }
      for (int64_t c = nk; c < Lk; ++c) {
        std::fill(gr.dk.row(b, h, c), gr.dk.row(b, h, c) + D, T(0));
        std::fill(gr.dv.row(b, h, c), gr.dv.row(b, h, c) + D, T(0));
      }
      for (int64_t c0 = 0; c0 < nk; c0 += KB) {
        const int64_t nv = std::min(KB, nk - c0);
        for (int pass = 0; pass < 2; ++pass) {
          transpose((pass ? w.dvt : w.dkt) + c0 * Dp, KB, w.tmpf, Dp, Dp, nv);
          const View<T>& out = pass ? gr.dv : gr.dk;
          for (int64_t c = 0; c < nv; ++c) store(out.row(b, h, c0 + c), w.tmpf + c * Dp, D, A(1));
        }
      }
      if (dps) std::copy_n(w.dsacc, P, dsp.data() + (b * Hkv + h) * P);
    }
  });

  // d(bank): the group partials of each (n, h) summed in a fixed order; d(prefix_scale): sum over KV heads.
  if (P) {
    std::vector<A> acc(2 * Dp * P16);
    for (int64_t n = 0; n < pb.N; ++n)
      for (int64_t h = 0; h < Hkv; ++h) {
        std::fill(acc.begin(), acc.end(), A(0));
        for (size_t u = 0; u < th.size(); ++u)
          if (tn[u] == n && th[u] == h)
            for (int64_t e = 0; e < 2 * Dp * P16; ++e) acc[e] += part[u * 2 * Dp * P16 + e];
        for (int64_t j = 0; j < P; ++j)
          for (int64_t d = 0; d < D; ++d) {
            const int64_t o = ((n * Hkv + h) * P + j) * D + d;
            dbank_k[o] = static_cast<T>(acc[d * P16 + j]);
            dbank_v[o] = static_cast<T>(acc[Dp * P16 + d * P16 + j]);
          }
      }
  }
  if (dps)
    for (int64_t b = 0; b < pb.B; ++b)
      for (int64_t j = 0; j < P; ++j) {
        A s = 0;
        for (int64_t h = 0; h < Hkv; ++h) s += dsp[(b * Hkv + h) * P + j];
        dps[b * P + j] = s;
      }
}

// ---------------------------------------------------------------------------------------------------
// Entry points.

struct Inputs {
  at::Tensor q, k, v, bank_k, bank_v, idx, mask, cu, ps, plen, pbias;
  bool causal;
  double scale;
};

at::Tensor last_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Argument checks: every shape, dtype, device and index value the kernels rely on is checked here, before any
// kernel touches memory, with one error naming the argument (TORCH_CHECK_VALUE: a Python ValueError). Index
// ranges are an O(B + N) scan of the (converted, contiguous) index tensors.
#define PA_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "prefix_attention_cpu: ", __VA_ARGS__)

void check_cpu(const at::Tensor& t, const char* name) {
  PA_CHECK(t.defined(), name, " is undefined");
  PA_CHECK(t.device().is_cpu(), name, " must be a CPU tensor; got ", t.device());
}

bool is_index_dtype(const at::Tensor& t) { return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong; }

// int64, contiguous copy (or view) of an int32/int64 index tensor of `n` elements.
at::Tensor index_tensor(const at::Tensor& t, const char* name, int64_t n, const char* expect) {
  check_cpu(t, name);
  PA_CHECK(is_index_dtype(t), name, " must be int32 or int64; got ", t.scalar_type());
  PA_CHECK(t.dim() == 1 && t.size(0) == n, name, " must be ", expect, "; got shape ", t.sizes());
  return t.to(at::kLong).contiguous();
}

// [lo, hi] of an int64 tensor (0 elements: {0, 0}).
std::pair<int64_t, int64_t> min_max(const at::Tensor& t) {
  const int64_t* p = t.data_ptr<int64_t>();
  const int64_t n = t.numel();
  if (n == 0) return {0, 0};
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 1; i < n; ++i) lo = std::min(lo, p[i]), hi = std::max(hi, p[i]);
  return {lo, hi};
}

Inputs normalize(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& bank_k,
                 const c10::optional<at::Tensor>& bank_v, const c10::optional<at::Tensor>& idx,
                 const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& cu,
                 const c10::optional<at::Tensor>& ps, bool causal, double scale,
                 const c10::optional<at::Tensor>& plen, const c10::optional<at::Tensor>& pbias) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  check_cpu(v, "v");
  const auto dt = q.scalar_type();
  PA_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble, "q must be float32, bfloat16 or float64; got ",
           dt);
  PA_CHECK(k.scalar_type() == dt, "k must have q's dtype ", dt, "; got ", k.scalar_type());
  PA_CHECK(v.scalar_type() == dt, "v must have q's dtype ", dt, "; got ", v.scalar_type());
  const bool varlen = cu.has_value();
  const int64_t rank = varlen ? 3 : 4;
  PA_CHECK(q.dim() == rank, "q must be ", rank, "-D ", varlen ? "(T, Hq, D)" : "(B, Hq, Lq, D)", "; got shape ",
           q.sizes());
  PA_CHECK(k.dim() == rank, "k must be ", rank, "-D ", varlen ? "(T, Hkv, D)" : "(B, Hkv, Lk, D)", "; got shape ",
           k.sizes());
  PA_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), "; got ", v.sizes());
  const int64_t D = q.size(-1), Hq = q.size(1), Hkv = k.size(1);
  PA_CHECK(k.size(0) == q.size(0) && k.size(-1) == D, "k must be ", varlen ? "(T=" : "(B=", q.size(0),
           varlen ? ", Hkv, D=" : ", Hkv, Lk, D=", D, "); got shape ", k.sizes());
  PA_CHECK(Hq >= 1 && Hkv >= 1 && D >= 1, "head counts and head dim must be >= 1; got Hq=", Hq, ", Hkv=", Hkv,
           ", D=", D);
  PA_CHECK(Hq % Hkv == 0, "q's head count Hq=", Hq, " must be a multiple of k's head count Hkv=", Hkv);
  PA_CHECK(std::isfinite(scale), "softmax_scale must be finite; got ", scale);
  Inputs in{last_contiguous(q), last_contiguous(k), last_contiguous(v)};
  int64_t B = q.size(0);
  const int64_t Lk = varlen ? 0 : k.size(2);
  if (varlen) {
    const at::Tensor& c = *cu;
    check_cpu(c, "cu_seqlens");
    PA_CHECK(is_index_dtype(c), "cu_seqlens must be int32 or int64; got ", c.scalar_type());
    PA_CHECK(c.dim() == 1 && c.numel() >= 1, "cu_seqlens must be a 1-D (B+1,) tensor; got shape ", c.sizes());
    PA_CHECK(!mask.has_value(), "key_padding_mask is not taken by the packed form (cu_seqlens delimits sequences)");
    in.cu = c.to(at::kLong).contiguous();
    const int64_t* p = in.cu.data_ptr<int64_t>();
    const int64_t n = in.cu.numel();
    bool monotone = true;
    for (int64_t i = 1; i < n; ++i) monotone = monotone && p[i] >= p[i - 1];
    PA_CHECK(p[0] == 0 && p[n - 1] == q.size(0) && monotone, "cu_seqlens must start at 0, never decrease and end at T=",
             q.size(0), "; got first ", p[0], ", last ", p[n - 1], monotone ? "" : ", decreasing");
    B = n - 1;
  }
  PA_CHECK(!bank_v.has_value() || bank_k.has_value(), "bank_v given without bank_k");
  int64_t N = 0, P = 0;
  if (bank_k.has_value()) {
    const at::Tensor& bk = *bank_k;
    check_cpu(bk, "bank_k");
    PA_CHECK(bank_v.has_value(), "bank_k given without bank_v");
    const at::Tensor& bv = *bank_v;
    check_cpu(bv, "bank_v");
    PA_CHECK(bk.dim() == 4 && bk.size(1) == Hkv && bk.size(3) == D, "bank_k must be (N, Hkv=", Hkv, ", P, D=", D,
             "); got shape ", bk.sizes());
    PA_CHECK(bv.sizes() == bk.sizes(), "bank_v must have bank_k's shape ", bk.sizes(), "; got ", bv.sizes());
    PA_CHECK(bk.scalar_type() == dt, "bank_k must have q's dtype ", dt, "; got ", bk.scalar_type());
    PA_CHECK(bv.scalar_type() == dt, "bank_v must have q's dtype ", dt, "; got ", bv.scalar_type());
    N = bk.size(0);
    P = bk.size(2);
    PA_CHECK(idx.has_value(), "prefix_idx is required with a bank (a (B=", B, ",) int32/int64 tensor)");
    const at::Tensor ix = index_tensor(*idx, "prefix_idx", B, "a (B,) tensor with B = the number of sequences");
    const auto [lo, hi] = min_max(ix);
    PA_CHECK(B == 0 || (lo >= 0 && hi < N), "prefix_idx values must be in [0, N=", N, ") (bank entries); got min ", lo,
             ", max ", hi);
    if (P > 0) {
      in.bank_k = bk.contiguous();
      in.bank_v = bv.contiguous();
      in.idx = ix;
    }
  }
  if (plen.has_value()) {
    const at::Tensor pl = index_tensor(*plen, "prefix_lengths", N, "(N,) with N = the bank entries");
    const auto [lo, hi] = min_max(pl);
    PA_CHECK(N == 0 || (lo >= 0 && hi <= P), "prefix_lengths values must be in [0, P=", P, "] (bank tokens); got min ",
             lo, ", max ", hi);
    if (P > 0) in.plen = pl;
  }
  if (pbias.has_value()) {
    const at::Tensor& pbt = *pbias;
    check_cpu(pbt, "prefix_bias");
    PA_CHECK(pbt.is_floating_point(), "prefix_bias must be floating point; got ", pbt.scalar_type());
    PA_CHECK(pbt.dim() == 2 && pbt.size(0) == N && pbt.size(1) == P, "prefix_bias must be (N=", N, ", P=", P,
             "); got shape ", pbt.sizes());
    PA_CHECK(at::isfinite(pbt).all().item<bool>(), "prefix_bias values must be finite");
    if (P > 0) {  // (N, P16) in the accumulation type, zero past P: the logits read whole 16-column vectors
      const int64_t P16 = (P + 15) / 16 * 16;
      in.pbias = at::zeros({N, P16}, pbt.options().dtype(dt == at::kDouble ? at::kDouble : at::kFloat));
      in.pbias.narrow(1, 0, P).copy_(pbt);
    }
  }
  if (ps.has_value()) {
    const at::Tensor& s = *ps;
    check_cpu(s, "prefix_scale");
    PA_CHECK(s.is_floating_point(), "prefix_scale must be floating point; got ", s.scalar_type());
    PA_CHECK(s.dim() == 2 && s.size(0) == B && s.size(1) == P, "prefix_scale must be (B=", B, ", P=", P,
             "); got shape ", s.sizes());
    if (P > 0) in.ps = s.to(dt == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  }
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_cpu(m, "key_padding_mask");
    PA_CHECK(m.scalar_type() == at::kBool || at::isIntegralType(m.scalar_type(), false),
             "key_padding_mask must be bool (True = real key) or integer; got ", m.scalar_type());
    PA_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == Lk, "key_padding_mask must be (B=", B, ", Lk=", Lk,
             "); got shape ", m.sizes());
    in.mask = m.to(at::kBool).contiguous();
  }
  in.causal = causal;
  in.scale = scale;
  return in;
}

// Backward-only arguments: the output gradient and the forward's lse (and its gradient) in q's geometry.
void check_backward(const at::Tensor& dout, const c10::optional<at::Tensor>& dlse, const at::Tensor& q,
                    const at::Tensor& lse) {
  check_cpu(dout, "grad_o");
  PA_CHECK(dout.is_floating_point(), "grad_o must be floating point; got ", dout.scalar_type());
  PA_CHECK(dout.sizes() == q.sizes(), "grad_o must have q's shape ", q.sizes(), "; got ", dout.sizes());
  const auto rows = q.sizes().slice(0, q.dim() - 1);
  check_cpu(lse, "lse");
  PA_CHECK(lse.is_floating_point(), "lse must be floating point; got ", lse.scalar_type());
  PA_CHECK(lse.sizes() == rows, "lse must be ", rows, " (q's shape without D); got ", lse.sizes());
  if (dlse.has_value()) {
    check_cpu(*dlse, "grad_lse");
    PA_CHECK(dlse->is_floating_point(), "grad_lse must be floating point; got ", dlse->scalar_type());
    PA_CHECK(dlse->sizes() == rows, "grad_lse must be ", rows, " (q's shape without D); got ", dlse->sizes());
  }
}

template <typename T>
Problem<T> problem(const Inputs& in) {
  Problem<T> pb;
  const bool varlen = in.cu.defined();
  pb.cu = varlen ? in.cu.data_ptr<int64_t>() : nullptr;
  pb.B = varlen ? in.cu.numel() - 1 : in.q.size(0);
  pb.Hq = in.q.size(1);
  pb.Hkv = in.k.size(1);
  pb.g = pb.Hq / pb.Hkv;
  pb.D = in.q.size(-1);
  pb.Dp = up(pb.D, 2);
  if (varlen) {
    for (int64_t b = 0; b < pb.B; ++b) pb.Lk_max = std::max(pb.Lk_max, pb.cu[b + 1] - pb.cu[b]);
  } else {
    pb.Lq = in.q.size(2);
    pb.Lk = pb.Lk_max = in.k.size(2);
  }
  if (in.bank_k.defined()) {
    pb.N = in.bank_k.size(0);
    pb.P = in.bank_k.size(2);
    pb.bank_k = in.bank_k.data_ptr<T>();
    pb.bank_v = in.bank_v.data_ptr<T>();
    pb.idx = in.idx.data_ptr<int64_t>();
    if (in.ps.defined()) pb.ps = in.ps.data_ptr<acc_t<T>>();
    if (in.plen.defined()) pb.plen = in.plen.data_ptr<int64_t>();
  }
  pb.Pp = up(pb.P, 2);
  pb.P16 = up(pb.P, 16);
  if (in.pbias.defined()) pb.pbias = in.pbias.data_ptr<acc_t<T>>();  // rows of P16 values
  pb.SL = std::max(KB, pb.P16);
  pb.causal = in.causal;
  pb.scale = static_cast<acc_t<T>>(in.scale);
  pb.vnni = std::is_same_v<T, BFloat16> && at::globalContext().userEnabledMkldnn() && bf16_vnni_supported();
  if (in.mask.defined()) pb.mask = in.mask.data_ptr<bool>();
  pb.q = view<const T>(in.q, pb.cu);
  pb.k = view<const T>(in.k, pb.cu);
  pb.v = view<const T>(in.v, pb.cu);
  return pb;
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& bank_k, const c10::optional<at::Tensor>& bank_v,
                                const c10::optional<at::Tensor>& idx, const c10::optional<at::Tensor>& mask,
                                const c10::optional<at::Tensor>& cu, const c10::optional<at::Tensor>& ps, bool causal,
                                double scale, const c10::optional<at::Tensor>& plen,
                                const c10::optional<at::Tensor>& pbias) {
  const Inputs in = normalize(q, k, v, bank_k, bank_v, idx, mask, cu, ps, causal, scale, plen, pbias);
  at::Tensor o = at::empty_like(in.q);
  const auto acc = in.q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty(in.q.sizes().slice(0, in.q.dim() - 1), in.q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.q.scalar_type(), "prefix_attention_fwd", [&] {
    const auto pb = problem<scalar_t>(in);
    forward_impl<scalar_t>(pb, view<scalar_t>(o, pb.cu), view<acc_t<scalar_t>>(lse, pb.cu));
  });
  return {o, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& dout, const c10::optional<at::Tensor>& dlse, const at::Tensor& q,
                                 const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& bank_k,
                                 const c10::optional<at::Tensor>& bank_v, const c10::optional<at::Tensor>& idx,
                                 const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& cu,
                                 const c10::optional<at::Tensor>& ps, const at::Tensor& lse, bool causal,
                                 double scale, const c10::optional<at::Tensor>& plen,
                                const c10::optional<at::Tensor>& pbias) {
  const Inputs in = normalize(q, k, v, bank_k, bank_v, idx, mask, cu, ps, causal, scale, plen, pbias);
  check_backward(dout, dlse, q, lse);
  const at::Tensor do_ = last_contiguous(dout.to(q.scalar_type()));
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lse_ = lse.to(acc).contiguous();
  const at::Tensor dlse_ = dlse.has_value() ? dlse->to(acc).contiguous() : at::Tensor();
  at::Tensor dq = at::empty_like(in.q), dk = at::empty_like(in.k), dv = at::empty_like(in.v);
  at::Tensor dbk, dbv, dps;
  if (in.bank_k.defined()) {
    dbk = at::zeros_like(in.bank_k);
    dbv = at::zeros_like(in.bank_v);
  }
  if (in.ps.defined()) dps = at::zeros_like(in.ps);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.q.scalar_type(), "prefix_attention_bwd", [&] {
    using A = acc_t<scalar_t>;
    const auto pb = problem<scalar_t>(in);
    Grad<scalar_t> gr;
    gr.dout = view<const scalar_t>(do_, pb.cu);
    gr.lse = view<const A>(lse_, pb.cu);
    if (dlse_.defined()) gr.dlse = view<const A>(dlse_, pb.cu);
    gr.dq = view<scalar_t>(dq, pb.cu);
    gr.dk = view<scalar_t>(dk, pb.cu);
    gr.dv = view<scalar_t>(dv, pb.cu);
    backward_impl<scalar_t>(pb, gr, dbk.defined() ? dbk.data_ptr<scalar_t>() : nullptr,
                            dbv.defined() ? dbv.data_ptr<scalar_t>() : nullptr,
                            dps.defined() ? dps.data_ptr<A>() : nullptr);
  });
  return {dq, dk, dv, dbk, dbv, dps};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "shared-prefix attention forward -> (o, lse)");
  m.def("backward", &backward, "shared-prefix attention backward -> (dq, dk, dv, dbank_k, dbank_v, dprefix_scale)");
}
