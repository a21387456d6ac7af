// im2col and its adjoint for 3x3 convolutions with zero padding 1 and stride 1, bf16 or float32, on CPU.
//
// unfold3x3(x):   x (n, c, h, w) -> cols (c*9, n*h*w), cols[c*9 + 3*i + j][b*h*w + y*w + x] = x[b, c, y+i-1, x+j-1]
//                 (0 outside the image): the row order of F.unfold, with the batch laid along the columns so that
//                 one matrix product W (out, c*9) @ cols serves the whole batch.
// fold3x3(cols):  the adjoint (what autograd needs for the input gradient): every column entry is added back to the
//                 pixel it was read from. The nine contributions to a pixel are summed in float32 and rounded once.
//                 `cols` may be either layout a matrix product leaves (row- or column-major): strides are honoured.
//
// PyTorch's own unfold/fold for bf16 run a generic loop per element and, in fold, round after every addition;
// SD's low-resolution convs (1280-2560 channels at 4x4-8x8), which run as one product on CPU, spend more in
// them than in the product's overhead (bench/README.md).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

template <typename T>
void unfold_channels(const T* x, T* cols, int64_t n, int64_t c, int64_t h, int64_t w, int64_t c0, int64_t c1) {
  const int64_t hw = h * w, width = n * hw;
  for (int64_t ch = c0; ch < c1; ++ch) {
    for (int64_t i = 0; i < 3; ++i) {
      for (int64_t j = 0; j < 3; ++j) {
        T* row = cols + (ch * 9 + i * 3 + j) * width;
        // Output columns [lo, hi) of an image row read inside the image; the one column left or right is padding.
        const int64_t lo = j == 0 ? 1 : 0, hi = j == 2 ? w - 1 : w;
        for (int64_t b = 0; b < n; ++b) {
          const T* image = x + (b * c + ch) * hw;
          for (int64_t y = 0; y < h; ++y) {
            T* out = row + b * hw + y * w;
            const int64_t sy = y + i - 1;
            if (sy < 0 || sy >= h) {
              std::fill(out, out + w, T(0));
              continue;
            }
            const T* in = image + sy * w + (j - 1);
            for (int64_t p = 0; p < lo; ++p) out[p] = T(0);
            std::copy(in + lo, in + hi, out + lo);
            for (int64_t p = std::max(hi, lo); p < w; ++p) out[p] = T(0);
          }
        }
      }
    }
  }
}

template <typename T>
void fold_channels(const T* cols, int64_t row_stride, int64_t col_stride, T* x, int64_t n, int64_t c, int64_t h,
                   int64_t w, int64_t c0, int64_t c1) {
  const int64_t hw = h * w;
  std::vector<float> sum(n * hw);
  for (int64_t ch = c0; ch < c1; ++ch) {
    std::fill(sum.begin(), sum.end(), 0.f);
    for (int64_t i = 0; i < 3; ++i) {
      for (int64_t j = 0; j < 3; ++j) {
        const T* row = cols + (ch * 9 + i * 3 + j) * row_stride;
        const int64_t lo = j == 0 ? 1 : 0, hi = j == 2 ? w - 1 : w;
        for (int64_t b = 0; b < n; ++b) {
          for (int64_t y = 0; y < h; ++y) {
            const int64_t sy = y + i - 1;  // the image row that output row y read through this tap
            if (sy < 0 || sy >= h) continue;
            const T* in = row + (b * hw + y * w) * col_stride;
            float* acc = sum.data() + b * hw + sy * w + (j - 1);
            for (int64_t p = lo; p < hi; ++p) acc[p] += static_cast<float>(in[p * col_stride]);
          }
        }
      }
    }
    for (int64_t b = 0; b < n; ++b) {
      T* out = x + (b * c + ch) * hw;
      const float* acc = sum.data() + b * hw;
      for (int64_t p = 0; p < hw; ++p) out[p] = static_cast<T>(acc[p]);
    }
  }
}

void check_dtype(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": a CPU tensor is needed");
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat, what,
              ": bfloat16 or float32 is needed, got ", t.scalar_type());
}

}  // namespace

torch::Tensor unfold3x3(const torch::Tensor& input) {
  check_dtype(input, "unfold3x3");
  TORCH_CHECK(input.dim() == 4, "unfold3x3: x must be (n, c, h, w)");
  const auto x = input.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  auto cols = at::empty({c * 9, n * h * w}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "unfold3x3", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = cols.data_ptr<scalar_t>();
    at::parallel_for(0, c, 16, [&](int64_t c0, int64_t c1) { unfold_channels(src, dst, n, c, h, w, c0, c1); });
  });
  return cols;
}

torch::Tensor fold3x3(const torch::Tensor& cols, int64_t n, int64_t h, int64_t w) {
  check_dtype(cols, "fold3x3");
  TORCH_CHECK(cols.dim() == 2 && cols.size(0) % 9 == 0 && cols.size(1) == n * h * w,
              "fold3x3: cols must be (c*9, n*h*w)");
  const int64_t c = cols.size(0) / 9;
  auto x = at::empty({n, c, h, w}, cols.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, cols.scalar_type(), "fold3x3", [&] {
    const scalar_t* src = cols.data_ptr<scalar_t>();
    scalar_t* dst = x.data_ptr<scalar_t>();
    const int64_t rs = cols.stride(0), cs = cols.stride(1);
    at::parallel_for(0, c, 16, [&](int64_t c0, int64_t c1) { fold_channels(src, rs, cs, dst, n, c, h, w, c0, c1); });
  });
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("unfold3x3", &unfold3x3, "im2col for a 3x3 conv, padding 1: (n, c, h, w) -> (c*9, n*h*w)");
  m.def("fold3x3", &fold3x3, "the adjoint of unfold3x3, summed in float32: (c*9, n*h*w) -> (n, c, h, w)");
}
