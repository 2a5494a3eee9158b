// Weight-only quantized matmul for a few rows (decoding) on x86 CPUs with AVX2 and FMA.
//
// y[m, o] = sum_g scale[o, g] * (sum_{j in g} x[m, j] * code[o, j]  -  zero[o, g] * sum_{j in g} x[m, j])
//
// `packed` holds hfcompress's codes: int32 [out, in * bits / 32], code j of a row in bits
// (j * bits) % 32 of word (j * bits) / 32 (4 bits: 8 codes per word; 8 bits: 4 codes per word). Groups are
// contiguous runs of `group` input columns (act-order layers are permuted to that layout once, at load).
// The weight is read once per call for up to 8 rows at a time; rows are independent, outputs split across
// threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int kRowsPerPass = 4;

inline __m256 unpack8(const int32_t* words, int64_t k, int bits, __m256i shifts, __m256i mask) {
  // 8 consecutive codes as floats: word k at 4 bits, words k and k+1 at 8 bits
  if (bits == 4)
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(words[k]), shifts), mask));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(words + k))));
}

inline float hsum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_hadd_ps(sum, sum);
  return _mm_cvtss_f32(_mm_hadd_ps(sum, sum));
}

// NACC independent accumulators per row hide the FMA latency (one row alone would wait on each FMA).
template <int BITS, int ROWS>
void gemv_rows(const float* x, int64_t x_stride, const int32_t* packed, int64_t words_per_row, const float* scale,
               const float* zero, const float* xsum, int64_t n_groups, int64_t group, float* y, int64_t y_stride,
               int64_t out_begin, int64_t out_end) {
  constexpr int NACC = ROWS == 1 ? 4 : 2;
  constexpr int kWordsPer8 = BITS / 4;  // words holding 8 codes
  const int64_t steps = group / 8;      // 8-code steps per group
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(15);
  for (int64_t o = out_begin; o < out_end; ++o) {
    const int32_t* row = packed + o * words_per_row;
    float total[ROWS] = {0};
    for (int64_t g = 0; g < n_groups; ++g) {
      __m256 acc[ROWS][NACC];
      for (int r = 0; r < ROWS; ++r)
        for (int a = 0; a < NACC; ++a) acc[r][a] = _mm256_setzero_ps();
      const int32_t* words = row + g * steps * kWordsPer8;
      const float* xg = x + g * group;
      int64_t t = 0;
      for (; t + NACC <= steps; t += NACC) {
        for (int a = 0; a < NACC; ++a) {
          __m256 w = unpack8(words, (t + a) * kWordsPer8, BITS, shifts, mask);
          for (int r = 0; r < ROWS; ++r)
            acc[r][a] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xg + r * x_stride + 8 * (t + a)), acc[r][a]);
        }
      }
      for (; t < steps; ++t) {
        __m256 w = unpack8(words, t * kWordsPer8, BITS, shifts, mask);
        for (int r = 0; r < ROWS; ++r)
          acc[r][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xg + r * x_stride + 8 * t), acc[r][0]);
      }
      const float s = scale[o * n_groups + g], z = zero[o * n_groups + g];
      for (int r = 0; r < ROWS; ++r) {
        __m256 sum = acc[r][0];
        for (int a = 1; a < NACC; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
        total[r] += s * (hsum(sum) - z * xsum[r * n_groups + g]);
      }
    }
    for (int r = 0; r < ROWS; ++r) y[r * y_stride + o] = total[r];
  }
}

template <int BITS>
void gemv_pass(int rows, const float* x, int64_t x_stride, const int32_t* packed, int64_t words_per_row,
               const float* scale, const float* zero, const float* xsum, int64_t n_groups, int64_t group, float* y,
               int64_t y_stride, int64_t begin, int64_t end) {
  switch (rows) {
    case 1: gemv_rows<BITS, 1>(x, x_stride, packed, words_per_row, scale, zero, xsum, n_groups, group, y, y_stride, begin, end); break;
    case 2: gemv_rows<BITS, 2>(x, x_stride, packed, words_per_row, scale, zero, xsum, n_groups, group, y, y_stride, begin, end); break;
    case 3: gemv_rows<BITS, 3>(x, x_stride, packed, words_per_row, scale, zero, xsum, n_groups, group, y, y_stride, begin, end); break;
    default: gemv_rows<BITS, 4>(x, x_stride, packed, words_per_row, scale, zero, xsum, n_groups, group, y, y_stride, begin, end); break;
  }
}

}  // namespace

// x: float32 [m, in] (contiguous), packed: int32 [out, in * bits / 32], scale/zero: float32 [out, n_groups].
torch::Tensor wq_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t bits,
                        int64_t group) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [m, in]");
  TORCH_CHECK(packed.scalar_type() == torch::kInt32 && packed.is_contiguous(), "packed must be contiguous int32");
  const int64_t m = x.size(0), in = x.size(1), out = packed.size(0);
  TORCH_CHECK(in % group == 0 && group % 8 == 0, "group ", group, " must divide ", in, " and be a multiple of 8");
  TORCH_CHECK(packed.size(1) * 32 / bits == in, "packed width does not match the input size");
  const int64_t n_groups = in / group;
  TORCH_CHECK(scale.size(0) == out && scale.size(1) == n_groups && zero.sizes() == scale.sizes(), "scale/zero shape");
  auto scale_c = scale.contiguous(), zero_c = zero.contiguous();
  auto xsum = x.view({m, n_groups, group}).sum(-1).contiguous();  // [m, n_groups]
  auto y = torch::empty({m, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const int32_t* wp = packed.data_ptr<int32_t>();
  const float* sp = scale_c.data_ptr<float>();
  const float* zp = zero_c.data_ptr<float>();
  const float* xsp = xsum.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t words_per_row = packed.size(1);
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < m; r0 += kRowsPerPass) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowsPerPass, m - r0));
      if (bits == 4)
        gemv_pass<4>(rows, xp + r0 * in, in, wp, words_per_row, sp, zp, xsp + r0 * n_groups, n_groups, group, yp + r0 * out, out, begin, end);
      else
        gemv_pass<8>(rows, xp + r0 * in, in, wp, words_per_row, sp, zp, xsp + r0 * n_groups, n_groups, group, yp + r0 * out, out, begin, end);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wq_matmul", &wq_matmul, "weight-only 4/8-bit matmul for a few rows (AVX2)");
}
