// Flash-style attention (forward and backward) in bf16 or fp32 on x86 CPUs with AVX-512 BF16, for the UNet's shapes.
//
// Why it exists: PyTorch's CPU flash attention reaches about a third of this CPU's bf16 matmul peak for SD's head
// sizes (40, 80, 160), because its blocks go through a general GEMM whose inner dimension is the head size.
// Here every product runs through one register-blocked kernel built on vdpbf16ps (two bf16 products summed into
// an fp32 lane), with the operands packed once per head. bench/README.md has the measurements.
//
// The math is the usual one (scale = 1/sqrt(d)):
//   forward:  S = scale·Q·Kᵀ,  P = softmax(S) computed block by block with a running max m and sum l,
//             O = P·V,  lse = m + log(l) kept for backward
//   backward: P = exp(scale·Q·Kᵀ − lse),  dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ∘ (dP − rowsum(dO ∘ O)),
//             dQ = scale·dS·K,  dK = scale·dSᵀ·Q
// In bf16, products take bf16 operands and accumulate in fp32; P and dS are rounded to bf16 before their products,
// as PyTorch's flash kernels do. In fp32 the same blocks run on FMA (about 1.2x PyTorch's; both near the fp32 peak).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using bf16 = uint16_t;
constexpr int kLanes = 16;   // fp32 lanes in a zmm register
constexpr int kBlockQ = 64;  // queries per block (even: backward pairs up query rows)
constexpr int kBlockK = 128; // keys per block (a multiple of kLanes)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A mask of the first `count` of 16 lanes (none for count ≤ 0, all for count ≥ 16).
inline __mmask16 first_lanes(int64_t count) {
  return count >= kLanes ? 0xFFFF : count <= 0 ? 0 : static_cast<__mmask16>((1u << count) - 1);
}

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// Elements are bf16 (two per 32-bit unit: products summed in pairs by vdpbf16ps) or fp32 (one per unit: FMA).
template <typename T> constexpr int kPack = 2;
template <> constexpr int kPack<float> = 1;


// C[r, 16n + l] (+)= Σ_p  A[r·lda + p·pstride + {0,1}] · B[n·bstride + 16p + l][{0,1}]   (bf16: pairs)
// C[r, 16n + l] (+)= Σ_p  A[r·lda + p·pstride] · B[n·bstride + 16p + l]                  (fp32)
// A holds one 32-bit unit per step p (pstride elements apart); B is packed in units, 16 output columns per group.
// R·N accumulators stay in registers for the whole sum.
template <typename T, int R, int N, bool Acc>
inline void micro(const T* A, int64_t lda, int64_t pstride, const uint32_t* B, int64_t bstride, int64_t units,
                  float* C, int64_t ldc) {
  // The unroll pragmas let GCC keep acc in registers; without them it shuttles acc through the stack around the
  // loop, which costs a third of the speed at the UNet's short sums (20 pairs for head size 40).
  __m512 acc[R][N];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n)
      acc[r][n] = Acc ? _mm512_loadu_ps(C + r * ldc + n * kLanes) : _mm512_setzero_ps();
  for (int64_t p = 0; p < units; ++p) {
    __m512i b[N];
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n) b[n] = _mm512_loadu_si512(B + n * bstride + p * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t unit;
      std::memcpy(&unit, A + r * lda + p * pstride, sizeof(unit));
      const __m512i a = _mm512_set1_epi32(unit);
#pragma GCC unroll 4
      for (int n = 0; n < N; ++n) {
        if constexpr (kPack<T> == 2) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], as_bh(a), as_bh(b[n]));
        else acc[r][n] = _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b[n]), acc[r][n]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n) _mm512_storeu_ps(C + r * ldc + n * kLanes, acc[r][n]);
}

template <typename T, int N, bool Acc>
inline void micro_rows(int rows, const T* A, int64_t lda, int64_t pstride, const uint32_t* B, int64_t bstride,
                       int64_t units, float* C, int64_t ldc) {
  switch (rows) {
    case 1: micro<T, 1, N, Acc>(A, lda, pstride, B, bstride, units, C, ldc); break;
    case 2: micro<T, 2, N, Acc>(A, lda, pstride, B, bstride, units, C, ldc); break;
    case 3: micro<T, 3, N, Acc>(A, lda, pstride, B, bstride, units, C, ldc); break;
    case 4: micro<T, 4, N, Acc>(A, lda, pstride, B, bstride, units, C, ldc); break;
    case 5: micro<T, 5, N, Acc>(A, lda, pstride, B, bstride, units, C, ldc); break;
    case 6: micro<T, 6, N, Acc>(A, lda, pstride, B, bstride, units, C, ldc); break;
    case 7: micro<T, 7, N, Acc>(A, lda, pstride, B, bstride, units, C, ldc); break;
    default: micro<T, 8, N, Acc>(A, lda, pstride, B, bstride, units, C, ldc); break;
  }
}

// C[rows × 16·groups] (+)= A · B over `units` steps, tiled into register blocks of (≤ 8 or 6 rows) × (≤ 4 groups).
template <typename T, bool Acc>
void gemm(int64_t rows, int64_t groups, const T* A, int64_t lda, int64_t pstride, const uint32_t* B,
          int64_t bstride, int64_t units, float* C, int64_t ldc) {
  for (int64_t g = 0; g < groups;) {
    const int n = static_cast<int>(std::min<int64_t>(4, groups - g));
    const int rmax = n == 4 ? 6 : 8;  // 24 accumulators + n operands + 1 broadcast fit in 32 registers
    for (int64_t r = 0; r < rows; r += rmax) {
      const int rr = static_cast<int>(std::min<int64_t>(rmax, rows - r));
      const T* a = A + r * lda;
      const uint32_t* b = B + g * bstride;
      float* c = C + r * ldc + g * kLanes;
      switch (n) {
        case 1: micro_rows<T, 1, Acc>(rr, a, lda, pstride, b, bstride, units, c, ldc); break;
        case 2: micro_rows<T, 2, Acc>(rr, a, lda, pstride, b, bstride, units, c, ldc); break;
        case 3: micro_rows<T, 3, Acc>(rr, a, lda, pstride, b, bstride, units, c, ldc); break;
        default: micro_rows<T, 4, Acc>(rr, a, lda, pstride, b, bstride, units, c, ldc); break;
      }
    }
    g += n;
  }
}

// X [n rows × d] (row stride ld) as the right operand of X·Zᵀ products (rows become output columns):
// out[g][p][l] = unit p of row 16g+l (elements p·kPack ...); rows past n are zero. Size: round_up(n,16) · d/kPack.
template <typename T>
void pack_rows(const T* X, int64_t n, int64_t d, int64_t ld, uint32_t* out) {
  const int64_t groups = round_up(n, kLanes) / kLanes, units = d / kPack<T>;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t row = g * kLanes + l;
      uint32_t* dst = out + g * units * kLanes + l;
      if (row < n) {
        const T* src = X + row * ld;
        for (int64_t p = 0; p < units; ++p) std::memcpy(dst + p * kLanes, src + p * kPack<T>, sizeof(uint32_t));
      } else {
        for (int64_t p = 0; p < units; ++p) dst[p * kLanes] = 0;
      }
    }
}

// 16 columns of a row (the first as many as the mask has; zeros after, or everywhere for a missing row) as
// 32-bit lanes.
inline __m512i lanes_of(const bf16* row, __mmask16 k) {
  return row ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, row)) : _mm512_setzero_si512();
}
inline __m512i lanes_of(const float* row, __mmask16 k) {
  return row ? _mm512_castps_si512(_mm512_maskz_loadu_ps(k, row)) : _mm512_setzero_si512();
}

// X [n rows × d] (row stride ld) as the right operand of Z·X products (rows are summed over): unit p of column c
// holds rows p·kPack ... of it: out[g][p][l] for column 16g+l, p < npad/kPack; zero past n rows or d columns.
template <typename T>
void pack_cols(const T* X, int64_t n, int64_t d, int64_t ld, int64_t npad, uint32_t* out) {
  const int64_t groups = round_up(d, kLanes) / kLanes, units = npad / kPack<T>;
  for (int64_t p = 0; p < units; ++p) {
    const T* r0 = kPack<T> * p < n ? X + kPack<T> * p * ld : nullptr;
    const T* r1 = kPack<T> == 2 && 2 * p + 1 < n ? X + (2 * p + 1) * ld : nullptr;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c = g * kLanes;
      const __mmask16 k = first_lanes(d - c);
      __m512i u = lanes_of(r0 ? r0 + c : nullptr, k);
      if constexpr (kPack<T> == 2) u = _mm512_or_si512(u, _mm512_slli_epi32(lanes_of(r1 ? r1 + c : nullptr, k), 16));
      _mm512_storeu_si512(out + g * units * kLanes + p * kLanes, u);
    }
  }
}

// Σ x[c]·y[c] over c < d, in fp32.
template <typename T>
inline float dot(const T* x, const T* y, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += kLanes) {
    const __mmask16 k = first_lanes(d - c);
    __m512i xi = lanes_of(x + c, k), yi = lanes_of(y + c, k);
    if constexpr (kPack<T> == 2) xi = _mm512_slli_epi32(xi, 16), yi = _mm512_slli_epi32(yi, 16);  // bf16 -> fp32
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(xi), _mm512_castsi512_ps(yi), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// 2^x for x ≤ 0, split into an integer power (scalef) and a polynomial on [-0.5, 0.5]. For bf16, degree 4
// (within 4e-6 of 2^x, far below the rounding P gets before its products); for fp32, degree 6 (within 3e-9).
// Masked scores are a large finite negative (kMasked), not −inf, so that n and x − n stay finite and scalef
// returns 0 without a clamp.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMasked = -1e30f;

template <typename T>
inline __m512 exp2_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p;
  if constexpr (kPack<T> == 2) {
    p = _mm512_set1_ps(9.6760371e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5922036e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022107e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9312103e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001f));
  } else {
    p = _mm512_set1_ps(1.5469732e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3400432e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6180256e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503272e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314721e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  }
  return _mm512_scalef_ps(p, n);
}

inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// Round two fp32 vectors to bf16 and interleave them: lane i of the result is (lo[i], hi[i]).
inline __m512i pair_bf16(__m512 lo, __m512 hi) {
  const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo in elements 0-15, hi in 16-31
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, halves);
}

// 16 values (the first `count`) into a row of T.
inline void store16(bf16* dst, __m512 v, int64_t count = kLanes) {
  if (count >= kLanes) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), to_bf16(v));
  else _mm256_mask_storeu_epi16(dst, first_lanes(count), to_bf16(v));
}
inline void store16(float* dst, __m512 v, int64_t count = kLanes) {
  if (count >= kLanes) _mm512_storeu_ps(dst, v);
  else _mm512_mask_storeu_ps(dst, first_lanes(count), v);
}

// Rows r and r+1 of a block (hi absent: zeros) into a buffer of units whose unit p, column c is at p·kBlockK + c:
// bf16 pairs them up into one unit, fp32 keeps them as two rows.
inline void store_row_pair(uint32_t* base, int64_t r, int64_t c, __m512 lo, __m512 hi, bool two, bf16) {
  _mm512_storeu_si512(base + r / 2 * kBlockK + c, pair_bf16(lo, hi));
}
inline void store_row_pair(uint32_t* base, int64_t r, int64_t c, __m512 lo, __m512 hi, bool two, float) {
  float* rows = reinterpret_cast<float*>(base);
  _mm512_storeu_ps(rows + r * kBlockK + c, lo);
  if (two) _mm512_storeu_ps(rows + (r + 1) * kBlockK + c, hi);
}

template <typename T>
inline void store_row(const float* src, int64_t n, float mul, T* dst) {
  const __m512 m = _mm512_set1_ps(mul);
  for (int64_t c = 0; c < n; c += kLanes) {
    store16(dst + c, _mm512_mul_ps(_mm512_maskz_loadu_ps(first_lanes(n - c), src + c), m), n - c);
  }
}

template <typename T>
struct Layout {  // a [B, H, L, D] tensor with unit stride along D
  const T* data;
  int64_t sb, sh, sl;
  const T* at(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

template <typename T>
const T* ptr(const at::Tensor& t) {
  if constexpr (kPack<T> == 2) return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>());
  else return t.data_ptr<float>();
}
template <typename T>
T* mutable_ptr(at::Tensor& t) { return const_cast<T*>(ptr<T>(t)); }

template <typename T>
Layout<T> layout_of(const at::Tensor& t) { return {ptr<T>(t), t.stride(0), t.stride(1), t.stride(2)}; }

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat) &&
              t.scalar_type() == like.scalar_type() && t.dim() == 4 && t.stride(3) == 1, name,
              ": expected a CPU bfloat16 or float32 [B, H, L, D] tensor (all of one dtype) with unit stride along D");
}

// Output tensors are laid out [B, L, H, D] and returned as [B, H, L, D] views, so that merging the heads
// afterwards ("b h n d -> b n (h d)") is free.
at::Tensor heads_last_like(const at::Tensor& like, int64_t B, int64_t H, int64_t L, int64_t D) {
  return at::empty({B, L, H, D}, like.options()).permute({0, 2, 1, 3});
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  constexpr int64_t U = kPack<T>;  // elements per 32-bit unit
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK(D % U == 0 && k.size(3) == D && v.size(3) == D && v.size(2) == Lk && k.size(0) == B &&
              v.size(0) == B && k.size(1) == H && v.size(1) == H, "attention: mismatched q/k/v shapes");
  const int64_t Lkp = round_up(Lk, kLanes), Dp = round_up(D, kLanes);
  const Layout<T> Q = layout_of<T>(q), K = layout_of<T>(k), V = layout_of<T>(v);
  at::Tensor out = heads_last_like(q, B, H, Lq, D);
  at::Tensor lse = at::empty({B, H, Lq}, at::TensorOptions().dtype(at::kFloat));
  T* O = mutable_ptr<T>(out);
  float* LSE = lse.data_ptr<float>();
  const int64_t so_b = out.stride(0), so_h = out.stride(1), so_l = out.stride(2);

  // Pack K (for S = Q·Kᵀ) and V (for O = P·V) once per head.
  const int64_t kpack = Lkp * D / U, vpack = Lkp / U * Dp;
  std::vector<uint32_t> packed(static_cast<size_t>(B * H * (kpack + vpack)));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      uint32_t* base = packed.data() + bh * (kpack + vpack);
      pack_rows(K.at(b, h), Lk, D, K.sl, base);
      pack_cols(V.at(b, h), Lk, D, V.sl, Lkp, base + kpack);
    }
  });

  const int64_t qblocks = (Lq + kBlockQ - 1) / kBlockQ;
  const float sc2 = static_cast<float>(scale) * kLog2e;
  at::parallel_for(0, B * H * qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(kBlockQ * kBlockK), acc(kBlockQ * Dp), m(kBlockQ), l(kBlockQ);
    std::vector<T> P(kBlockQ * kBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / qblocks, i0 = (task % qblocks) * kBlockQ, b = bh / H, h = bh % H;
      const int64_t bq = std::min<int64_t>(kBlockQ, Lq - i0);
      const uint32_t* Kp = packed.data() + bh * (kpack + vpack);
      const uint32_t* Vp = Kp + kpack;
      const T* q_rows = Q.at(b, h) + i0 * Q.sl;
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j0 = 0; j0 < Lkp; j0 += kBlockK) {
        const int64_t bk = std::min<int64_t>(kBlockK, Lkp - j0), valid = std::min<int64_t>(bk, Lk - j0);
        gemm<T, false>(bq, bk / kLanes, q_rows, Q.sl, U, Kp + j0 * D / U, D / U * kLanes, D / U, S.data(), kBlockK);
        // Online softmax in base 2: m is the running max of scale·log2(e)·S, l the running sum of 2^(·−m).
        const __m512 vsc = _mm512_set1_ps(sc2);
        for (int64_t r = 0; r < bq; ++r) {
          float* s = S.data() + r * kBlockK;
          for (int64_t c = valid; c < bk; ++c) s[c] = kMasked;
          __m512 mx = _mm512_loadu_ps(s);
          for (int64_t c = kLanes; c < bk; c += kLanes) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + c));
          const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx) * sc2);
          const __m512 shift = _mm512_set1_ps(m_new);
          __m512 sum = _mm512_setzero_ps();
          for (int64_t c = 0; c < bk; c += kLanes) {
            const __m512 p = exp2_ps<T>(_mm512_fmsub_ps(_mm512_loadu_ps(s + c), vsc, shift));
            sum = _mm512_add_ps(sum, p);
            store16(P.data() + r * kBlockK + c, p);
          }
          const float alpha = std::exp2(m[r] - m_new);
          l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
          m[r] = m_new;
          if (alpha != 1.0f) {
            const __m512 a = _mm512_set1_ps(alpha);
            for (int64_t c = 0; c < Dp; c += kLanes)
              _mm512_storeu_ps(acc.data() + r * Dp + c, _mm512_mul_ps(_mm512_loadu_ps(acc.data() + r * Dp + c), a));
          }
        }
        gemm<T, true>(bq, Dp / kLanes, P.data(), kBlockK, U, Vp + j0 / U * kLanes, Lkp / U * kLanes, bk / U,
                      acc.data(), Dp);
      }
      for (int64_t r = 0; r < bq; ++r) {
        store_row(acc.data() + r * Dp, D, 1.0f / l[r], O + b * so_b + h * so_h + (i0 + r) * so_l);
        LSE[bh * Lq + i0 + r] = m[r] / kLog2e + std::log(l[r]);  // natural log, as PyTorch's
      }
    }
  });
  return {out, lse};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& o, const at::Tensor& lse_t, const at::Tensor& dout,
                                      double scale) {
  constexpr int64_t U = kPack<T>;
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const int64_t Lkp = round_up(Lk, kLanes), Lqp = round_up(Lq, U), Dp = round_up(D, kLanes);
  const Layout<T> Q = layout_of<T>(q), K = layout_of<T>(k), V = layout_of<T>(v), O = layout_of<T>(o),
                  dO = layout_of<T>(dout);
  const at::Tensor lse_c = lse_t.contiguous();
  const float* LSE = lse_c.data_ptr<float>();
  at::Tensor dq = heads_last_like(q, B, H, Lq, D), dk = heads_last_like(q, B, H, Lk, D),
             dv = heads_last_like(q, B, H, Lk, D);
  T *dQ = mutable_ptr<T>(dq), *dK = mutable_ptr<T>(dk), *dV = mutable_ptr<T>(dv);
  const float sc = static_cast<float>(scale);
  const __m512 vsc = _mm512_set1_ps(sc * kLog2e);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // Per head: K and V for the X·Zᵀ products (S, dP), K, Q and dO for the summing products (dQ, dK, dV).
    std::vector<uint32_t> Kr(Lkp * D / U), Vr(Lkp * D / U), Kc(Lkp / U * Dp), Qc(Lqp / U * Dp), dOc(Lqp / U * Dp);
    std::vector<float> rowdot(Lq), dq_acc(Lq * Dp), dk_acc(kBlockK * Dp), dv_acc(kBlockK * Dp);
    std::vector<float> S(kBlockQ * kBlockK), dP(kBlockQ * kBlockK);
    std::vector<uint32_t> Ppairs(kBlockQ / U * kBlockK), dSpairs(kBlockQ / U * kBlockK);
    std::vector<T> dS(kBlockQ * kBlockK);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T *q_h = Q.at(b, h), *do_h = dO.at(b, h), *o_h = O.at(b, h);
      pack_rows(K.at(b, h), Lk, D, K.sl, Kr.data());
      pack_rows(V.at(b, h), Lk, D, V.sl, Vr.data());
      pack_cols(K.at(b, h), Lk, D, K.sl, Lkp, Kc.data());
      pack_cols(q_h, Lq, D, Q.sl, Lqp, Qc.data());
      pack_cols(do_h, Lq, D, dO.sl, Lqp, dOc.data());
      for (int64_t i = 0; i < Lq; ++i) rowdot[i] = dot(do_h + i * dO.sl, o_h + i * O.sl, D);  // rowsum(dO ∘ O)
      std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
      const float* lse_h = LSE + bh * Lq;

      for (int64_t j0 = 0; j0 < Lkp; j0 += kBlockK) {
        const int64_t bk = std::min<int64_t>(kBlockK, Lkp - j0), valid = std::min<int64_t>(bk, Lk - j0);
        std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
        for (int64_t i0 = 0; i0 < Lq; i0 += kBlockQ) {
          const int64_t bq = std::min<int64_t>(kBlockQ, Lq - i0), bqu = round_up(bq, U);
          // S = Q·Kᵀ and dP = dO·Vᵀ, then one pass over pairs of rows: P = 2^(scale·log2(e)·S − lse·log2(e)),
          // dS = P ∘ (dP − rowdot), stored as rows of dS and (bf16: paired along the queries) as P and dS for the
          // products summed over queries (Pᵀ·dO, dSᵀ·Q).
          gemm<T, false>(bq, bk / kLanes, q_h + i0 * Q.sl, Q.sl, U, Kr.data() + j0 * D / U, D / U * kLanes, D / U,
                         S.data(), kBlockK);
          gemm<T, false>(bq, bk / kLanes, do_h + i0 * dO.sl, dO.sl, U, Vr.data() + j0 * D / U, D / U * kLanes, D / U,
                         dP.data(), kBlockK);
          for (int64_t r = 0; r < bq; r += 2) {
            const bool two = r + 1 < bq;
            const float* s0 = S.data() + r * kBlockK;
            const float* dp0 = dP.data() + r * kBlockK;
            const __m512 shift0 = _mm512_set1_ps(lse_h[i0 + r] * kLog2e), rd0 = _mm512_set1_ps(rowdot[i0 + r]);
            const __m512 shift1 = _mm512_set1_ps(two ? lse_h[i0 + r + 1] * kLog2e : 0.0f);
            const __m512 rd1 = _mm512_set1_ps(two ? rowdot[i0 + r + 1] : 0.0f);
            for (int64_t c = 0; c < bk; c += kLanes) {
              const __mmask16 keys = first_lanes(valid - c);
              const __mmask16 keys1 = two ? keys : 0;
              const __m512 p0 =
                  _mm512_maskz_mov_ps(keys, exp2_ps<T>(_mm512_fmsub_ps(_mm512_loadu_ps(s0 + c), vsc, shift0)));
              const __m512 p1 = _mm512_maskz_mov_ps(
                  keys1, exp2_ps<T>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(keys1, s0 + kBlockK + c), vsc, shift1)));
              const __m512 ds0 = _mm512_mul_ps(p0, _mm512_sub_ps(_mm512_loadu_ps(dp0 + c), rd0));
              const __m512 ds1 = _mm512_mul_ps(p1, _mm512_sub_ps(_mm512_maskz_loadu_ps(keys1, dp0 + kBlockK + c), rd1));
              store_row_pair(Ppairs.data(), r, c, p0, p1, two, T());
              store_row_pair(dSpairs.data(), r, c, ds0, ds1, two, T());
              store16(dS.data() + r * kBlockK + c, ds0);
              if (two) store16(dS.data() + (r + 1) * kBlockK + c, ds1);
            }
          }
          gemm<T, true>(bk, Dp / kLanes, reinterpret_cast<const T*>(Ppairs.data()), U, U * kBlockK,
                        dOc.data() + i0 / U * kLanes, Lqp / U * kLanes, bqu / U, dv_acc.data(), Dp);
          gemm<T, true>(bk, Dp / kLanes, reinterpret_cast<const T*>(dSpairs.data()), U, U * kBlockK,
                        Qc.data() + i0 / U * kLanes, Lqp / U * kLanes, bqu / U, dk_acc.data(), Dp);
          gemm<T, true>(bq, Dp / kLanes, dS.data(), kBlockK, U, Kc.data() + j0 / U * kLanes, Lkp / U * kLanes,
                        bk / U, dq_acc.data() + i0 * Dp, Dp);
        }
        for (int64_t c = 0; c < valid; ++c) {
          store_row(dk_acc.data() + c * Dp, D, sc, dK + b * dk.stride(0) + h * dk.stride(1) + (j0 + c) * dk.stride(2));
          store_row(dv_acc.data() + c * Dp, D, 1.0f,
                    dV + b * dv.stride(0) + h * dv.stride(1) + (j0 + c) * dv.stride(2));
        }
      }
      for (int64_t i = 0; i < Lq; ++i)
        store_row(dq_acc.data() + i * Dp, D, sc, dQ + b * dq.stride(0) + h * dq.stride(1) + i * dq.stride(2));
    }
  });
  return {dq, dk, dv};
}

}  // namespace

std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check(q, q, "q"); check(k, q, "k"); check(v, q, "v");
  return q.scalar_type() == at::kFloat ? forward_impl<float>(q, k, v, scale) : forward_impl<bf16>(q, k, v, scale);
}

std::vector<at::Tensor> attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& o, const at::Tensor& lse, const at::Tensor& dout,
                                           double scale) {
  check(q, q, "q"); check(k, q, "k"); check(v, q, "v"); check(o, q, "out"); check(dout, q, "grad_out");
  return q.scalar_type() == at::kFloat ? backward_impl<float>(q, k, v, o, lse, dout, scale)
                                       : backward_impl<bf16>(q, k, v, o, lse, dout, scale);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &attention_forward, "attention forward (bf16 or fp32): (out, logsumexp)");
  m.def("backward", &attention_backward, "attention backward (bf16 or fp32): (dq, dk, dv)");
}
