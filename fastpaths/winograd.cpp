// 3x3 convolutions (stride 1, zero padding 1) in float32 by Winograd's minimal filtering F(4x4, 3x3).
//
// Each 4x4 block of outputs needs a 6x6 patch of input. In the transformed domain the 3x3 filter and the patch
// become 6x6 arrays whose elementwise product, transformed back, is the 4x4 output block:
//     Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A
// Summed over input channels, each of the 36 positions of that product is an ordinary matrix product
//     M[p] = U[p] · V[p]      U[p]: (out channels × in channels),  V[p]: (in channels × tiles)
// so the work is 36 GEMMs with 36/16 = 2.25 multiplies per output instead of 9: 4x fewer. The transforms are
// additions with small constants (points 0, ±1, ±2, ∞). Rounding grows by about 10x over a direct fp32 conv
// (tests/test_winograd.py measures it); that is still about 1000x below bf16's.
//
// Layout: tiles are numbered image by image, row by row, and go in chunks of whole tile rows; output channels go
// in blocks. The transformed tiles of a chunk ([36][C][chunk]), the transformed filters of a block
// ([36][block][C]) and their products stay a few MB each, so that they come back from the allocator's heap
// rather than as fresh pages (each 4 KiB page faulted in costs more than the arithmetic on it).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int kTile = 4;   // outputs per tile side
constexpr int kPatch = 6;  // inputs per tile side
constexpr int kPos = kPatch * kPatch;

// Bᵀ·d for one column of six values (d0..d5), over n tiles at once; the rows of Bᵀ are those of F(4x4, 3x3)
// with points 0, ±1, ±2. Plain loops over contiguous arrays, which the compiler vectorizes.
inline void input_1d(const float* d0, const float* d1, const float* d2, const float* d3, const float* d4,
                     const float* d5, float* const* out, int64_t n) {
  float *o0 = out[0], *o1 = out[1], *o2 = out[2], *o3 = out[3], *o4 = out[4], *o5 = out[5];
  for (int64_t j = 0; j < n; ++j) {
    const float a = d1[j], b = d2[j], c = d3[j], e = d4[j];
    o0[j] = 4 * d0[j] - 5 * b + e;
    o1[j] = -4 * (a + b) + c + e;
    o2[j] = 4 * (a - b) - c + e;
    o3[j] = 2 * (c - a) - b + e;
    o4[j] = 2 * (a - c) - b + e;
    o5[j] = 4 * a - 5 * c + d5[j];
  }
}

// G·g for one column of three filter taps.
inline void filter_1d(float g0, float g1, float g2, float* u) {
  u[0] = g0 * 0.25f;
  u[1] = -(g0 + g1 + g2) * (1.f / 6);
  u[2] = -(g0 - g1 + g2) * (1.f / 6);
  u[3] = g0 * (1.f / 24) + g1 * (1.f / 12) + g2 * (1.f / 6);
  u[4] = g0 * (1.f / 24) - g1 * (1.f / 12) + g2 * (1.f / 6);
  u[5] = g2;
}

// Aᵀ·m for one column of six values, over n tiles at once (vectorizes along the tiles).
inline void output_1d(const float* m0, const float* m1, const float* m2, const float* m3, const float* m4,
                      const float* m5, float* y0, float* y1, float* y2, float* y3, int n, float bias) {
  for (int j = 0; j < n; ++j) {
    const float p12 = m1[j] + m2[j], d12 = m1[j] - m2[j], p34 = m3[j] + m4[j], d34 = m3[j] - m4[j];
    y0[j] = m0[j] + p12 + p34 + bias;
    y1[j] = d12 + 2 * d34 + bias;
    y2[j] = p12 + 4 * p34 + bias;
    y3[j] = d12 + 8 * d34 + m5[j] + bias;
  }
}

// V[p][c][t] for tile rows [r0, r1) of the batch (tile row r = image r / th, row r % th), t counted from r0.
void transform_input(const float* x, int64_t C, int64_t H, int64_t W, int64_t r0, int64_t r1, float* V) {
  const int64_t th = (H + kTile - 1) / kTile, tw = (W + kTile - 1) / kTile, T = (r1 - r0) * tw;
  at::parallel_for(0, C * (r1 - r0), 1, [&](int64_t b0, int64_t b1) {
    // phase[k][j] = padded row at 4j + k (k < 4, j <= tw): tile j reads phases 0-3 at j and 0-1 at j + 1
    std::vector<float> phase(kTile * (tw + 1)), mixed(kPatch * kPatch * tw);  // mixed[r][q][j]
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c = b / (r1 - r0), tr = r0 + b % (r1 - r0), n = tr / th, i = tr % th;
      const float* plane = x + (n * C + c) * H * W;
      // along each of the six input rows this tile row reads: the six columns of every tile
      for (int r = 0; r < kPatch; ++r) {
        const int64_t src = kTile * i + r - 1;
        std::fill(phase.begin(), phase.end(), 0.f);
        if (src >= 0 && src < H) {
          const float* row = plane + src * W;
          for (int64_t col = 0; col < W; ++col) {  // padded position col + 1
            const int64_t at = col + 1;
            phase[(at % kTile) * (tw + 1) + at / kTile] = row[col];
          }
        }
        const float* ph = phase.data();
        const int64_t s1 = tw + 1;
        float* out[kPatch];
        for (int q = 0; q < kPatch; ++q) out[q] = mixed.data() + (r * kPatch + q) * tw;
        input_1d(ph, ph + s1, ph + 2 * s1, ph + 3 * s1, ph + 1, ph + s1 + 1, out, tw);
      }
      // down the columns: the six rows, into the 36 planes
      const int64_t base = (tr - r0) * tw;
      for (int q = 0; q < kPatch; ++q) {
        const float* m = mixed.data() + q * tw;
        const int64_t s6 = kPatch * tw;
        float* out[kPatch];
        for (int p = 0; p < kPatch; ++p) out[p] = V + ((p * kPatch + q) * C + c) * T + base;
        input_1d(m, m + s6, m + 2 * s6, m + 3 * s6, m + 4 * s6, m + 5 * s6, out, tw);
      }
    }
  });
}

// U[p][k - k0][c] for output channels [k0, k1). `transposed`: the filter of the backward pass, w[c][k] flipped.
void transform_filters(const float* w, int64_t K, int64_t C, int64_t k0, int64_t k1, bool transposed, float* U) {
  const int64_t block = k1 - k0;
  at::parallel_for(0, block, 1, [&](int64_t a0, int64_t a1) {
    std::vector<float> planes(kPos * C);  // planes[p][c] for one output channel, copied out row by row
    for (int64_t a = a0; a < a1; ++a) {
      const int64_t k = k0 + a;
      for (int64_t c = 0; c < C; ++c) {
        float g[9];
        if (!transposed) {
          std::copy(w + (k * C + c) * 9, w + (k * C + c) * 9 + 9, g);
        } else {  // weight stored as [C_out_fwd = c][C_in_fwd = k]: take it rotated by 180 degrees
          const float* src = w + (c * K + k) * 9;
          for (int t = 0; t < 9; ++t) g[t] = src[8 - t];
        }
        float cols[3][kPatch];  // G·g, column by column
        for (int s = 0; s < 3; ++s) filter_1d(g[s], g[3 + s], g[6 + s], cols[s]);
        for (int p = 0; p < kPatch; ++p) {
          float u[kPatch];
          filter_1d(cols[0][p], cols[1][p], cols[2][p], u);
          for (int q = 0; q < kPatch; ++q) planes[(p * kPatch + q) * C + c] = u[q];
        }
      }
      for (int pq = 0; pq < kPos; ++pq)
        std::copy(planes.data() + pq * C, planes.data() + (pq + 1) * C, U + (pq * block + a) * C);
    }
  });
}

// y[n][k] for output channels [k0, k1) and tile rows [r0, r1), from M[p][k - k0][t].
void transform_output(const float* M, const float* bias, int64_t K, int64_t H, int64_t W, int64_t k0, int64_t k1,
                      int64_t r0, int64_t r1, float* y) {
  const int64_t th = (H + kTile - 1) / kTile, tw = (W + kTile - 1) / kTile, T = (r1 - r0) * tw;
  const int64_t block = k1 - k0, nrows = r1 - r0;
  at::parallel_for(0, block * nrows, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> half(kTile * kPatch * tw), out(kTile * tw);  // half[s][q][j]: Aᵀ applied down the columns
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t a = b / nrows, tr = r0 + b % nrows, n = tr / th, i = tr % th, k = k0 + a;
      const float bv = bias ? bias[k] : 0.f;
      float* plane = y + (n * K + k) * H * W;
      const int64_t base = (tr - r0) * tw;
      for (int q = 0; q < kPatch; ++q) {
        const float* m[kPatch];
        for (int p = 0; p < kPatch; ++p) m[p] = M + ((p * kPatch + q) * block + a) * T + base;
        float* h = half.data() + q * tw;
        const int64_t s = kPatch * tw;
        output_1d(m[0], m[1], m[2], m[3], m[4], m[5], h, h + s, h + 2 * s, h + 3 * s, tw, 0.f);
      }
      for (int s = 0; s < kTile; ++s) {
        const int64_t r = kTile * i + s;
        if (r >= H) break;
        const float* h = half.data() + s * kPatch * tw;
        float* o = out.data();
        output_1d(h, h + tw, h + 2 * tw, h + 3 * tw, h + 4 * tw, h + 5 * tw, o, o + tw, o + 2 * tw, o + 3 * tw, tw,
                  bv);
        float* dst = plane + r * W;
        const float *o0 = out.data(), *o1 = o0 + tw, *o2 = o1 + tw, *o3 = o2 + tw;
        const int64_t whole = W / kTile;
        for (int64_t j = 0; j < whole; ++j) {
          dst[4 * j] = o0[j];
          dst[4 * j + 1] = o1[j];
          dst[4 * j + 2] = o2[j];
          dst[4 * j + 3] = o3[j];
        }
        for (int64_t col = kTile * whole; col < W; ++col) dst[col] = out[(col % kTile) * tw + whole];
      }
    }
  });
}

}  // namespace

// conv2d(x, w, bias, stride=1, padding=1) for float32 x [N, C, H, W] and w [K, C, 3, 3]; with transposed=true,
// w is [C, K, 3, 3] and the result is the input gradient of that conv (conv_transpose2d(x, w, padding=1)).
// `budget`: floats per buffer, which sets the tile chunk and the output-channel block.
torch::Tensor conv3x3(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, bool transposed,
                      int64_t budget) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3, "conv3x3: 4-d input, 3x3 filters");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "conv3x3: float32 only");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = transposed ? w.size(1) : w.size(0);
  TORCH_CHECK((transposed ? w.size(0) : w.size(1)) == C, "conv3x3: filter and input channels differ");
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == K, "conv3x3: one bias per output channel");
    bp = b.data_ptr<float>();
  }
  auto y = at::empty({N, K, H, W}, x.options());
  if (y.numel() == 0) return y;
  const int64_t th = (H + kTile - 1) / kTile, tw = (W + kTile - 1) / kTile, rows = N * th;
  const int64_t chunk = std::clamp<int64_t>(budget / (kPos * C * tw), 1, rows);  // tile rows per chunk
  const int64_t block = std::min(K, std::max<int64_t>(32, budget / (kPos * C)));  // output channels per block
  auto V = at::empty({kPos * C * chunk * tw}, x.options());
  auto U = at::empty({kPos * block * C}, x.options());
  auto M = at::empty({kPos * block * chunk * tw}, x.options());
  // With one block the filters are transformed once; with several, each block's are redone per chunk of tiles.
  const bool one_block = block == K;
  if (one_block) transform_filters(w.data_ptr<float>(), K, C, 0, K, transposed, U.data_ptr<float>());
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t r1 = std::min(rows, r0 + chunk), T = (r1 - r0) * tw;
    transform_input(x.data_ptr<float>(), C, H, W, r0, r1, V.data_ptr<float>());
    auto v = V.narrow(0, 0, kPos * C * T).view({kPos, C, T});
    for (int64_t k0 = 0; k0 < K; k0 += block) {
      const int64_t k1 = std::min(K, k0 + block), nb = k1 - k0;
      auto u = U.narrow(0, 0, kPos * nb * C).view({kPos, nb, C});
      auto m = M.narrow(0, 0, kPos * nb * T).view({kPos, nb, T});
      if (!one_block) transform_filters(w.data_ptr<float>(), K, C, k0, k1, transposed, u.data_ptr<float>());
      at::bmm_out(m, u, v);
      transform_output(m.data_ptr<float>(), bp, K, H, W, k0, k1, r0, r1, y.data_ptr<float>());
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv3x3", &conv3x3, "3x3 stride-1 zero-padded conv (or its input gradient) by Winograd F(4x4, 3x3)");
}
