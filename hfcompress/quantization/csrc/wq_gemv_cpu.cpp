// Weight-only quantized matmuls for a few rows (decoding) on x86 CPUs with AVX2 and FMA: uniform grids
// (`wq_matmul`), scalar k-means codebooks (`lut_matmul`) and vector codebooks (`vq_matmul`). At 4 bits, calls of
// one or two rows take AVX-512F loops where the CPU has it (`has_avx512`), chosen by the caller; so do passes of up
// to four rows of vector codebooks of 2 weights per 4-bit index. 4-bit uniform grids also have int8 loops
// (`wq_matmul_int8`: inputs rounded to int8 per block of 32, int8 dot products; AVX-512 VNNI, or AVX2), taken
// when asked for. Prompts (many rows) multiply tiles of decoded weights with torch's matmul (`wq_matmul_tiled`,
// `codebook_matmul_tiled`). Dense float32 or bfloat16 layers have their own loop for a few rows (`dense_matmul`).
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

#include <algorithm>
#include <cmath>
#include <vector>

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

// Dequantize rows [begin, end) of a uniform-grid layer into `dst` (row stride `in`): w = (code - zero) * scale,
// as float32 or rounded to bfloat16 (nearest, ties to even). Used a tile at a time for calls of many rows.
inline void store8(float* dst, __m256 w) { _mm256_storeu_ps(dst, w); }

inline void store8(at::BFloat16* dst, __m256 w) {
  __m256i bits = _mm256_castps_si256(w);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
}

template <typename T>
void dequantize_rows(const int32_t* packed, int64_t words_per_row, const float* scale, const float* zero, int bits,
                     int64_t n_groups, int64_t group, int64_t in, T* dst, int64_t begin, int64_t end) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(15);
  const int64_t words_per_8 = bits / 4, steps = group / 8;
  for (int64_t o = begin; o < end; ++o) {
    const int32_t* row = packed + o * words_per_row;
    T* out = dst + (o - begin) * in;
    for (int64_t g = 0; g < n_groups; ++g) {
      const __m256 s = _mm256_set1_ps(scale[o * n_groups + g]), z = _mm256_set1_ps(zero[o * n_groups + g]);
      const int32_t* words = row + g * steps * words_per_8;
      for (int64_t t = 0; t < steps; ++t) {
        const __m256 code = unpack8(words, t * words_per_8, bits, shifts, mask);
        store8(out + g * group + 8 * t, _mm256_mul_ps(_mm256_sub_ps(code, z), s));
      }
    }
  }
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

// AVX-512F, 4 bits: the same matmul 16 codes a step, for passes of 1 or 2 rows on CPUs that have it
// (`has_avx512`; the file is built for AVX2, these functions alone for AVX-512F) and groups that are multiples of
// 16. There unpacking the codes is the work, and one step unpacks twice the codes for the same instructions:
// 1.15-1.4x the AVX2 loop on 4096x4096, 11008x4096 and 4096x11008 layers (2-core AMD EPYC). From 3 rows the
// multiply-adds dominate, which AMD's AVX-512 does at AVX2's rate, and it was no faster (0.8-1.1x); at 8 bits
// neither. Each group's dot product is scaled in the vector accumulator, so a row takes one horizontal sum in
// all; the zero-point terms (scale * zero * the group's input sum) are summed apart.
constexpr int kAvx512MaxRows = 2;
#define HFC_AVX512 __attribute__((target("avx512f")))

HFC_AVX512 inline __m512i codes16(const int32_t* words, int64_t k) {
  // 16 consecutive 4-bit codes in the low 4 bits of each lane (higher codes above them): words k and k+1, each
  // spread over 8 lanes (the constants are hoisted out of the callers' loops once inlined)
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512i pair = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(words + k)));
  return _mm512_srlv_epi32(_mm512_permutexvar_epi32(spread, pair), shifts);
}

HFC_AVX512 inline __m512 unpack16(const int32_t* words, int64_t k) {
  return _mm512_cvtepi32_ps(_mm512_and_si512(codes16(words, k), _mm512_set1_epi32(15)));
}

template <int ROWS>
HFC_AVX512 void gemv4_rows512(const float* x, int64_t x_stride, const int32_t* packed, int64_t words_per_row,
                              const float* scale, const float* zero, const float* xsum, int64_t n_groups,
                              int64_t group, float* y, int64_t y_stride, int64_t out_begin, int64_t out_end) {
  constexpr int NACC = ROWS == 1 ? 4 : 2;
  const int64_t steps = group / 16;  // 16-code steps (2 words) per group
  for (int64_t o = out_begin; o < out_end; ++o) {
    const int32_t* row = packed + o * words_per_row;
    __m512 total[ROWS];
    float offset[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      total[r] = _mm512_setzero_ps();
      offset[r] = 0.0f;
    }
    for (int64_t g = 0; g < n_groups; ++g) {
      __m512 acc[ROWS][NACC];
      for (int r = 0; r < ROWS; ++r)
        for (int a = 0; a < NACC; ++a) acc[r][a] = _mm512_setzero_ps();
      const int32_t* words = row + g * steps * 2;
      const float* xg = x + g * group;
      int64_t t = 0;
      for (; t + NACC <= steps; t += NACC) {
        for (int a = 0; a < NACC; ++a) {
          const __m512 w = unpack16(words, (t + a) * 2);
          for (int r = 0; r < ROWS; ++r)
            acc[r][a] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xg + r * x_stride + 16 * (t + a)), acc[r][a]);
        }
      }
      for (; t < steps; ++t) {
        const __m512 w = unpack16(words, t * 2);
        for (int r = 0; r < ROWS; ++r)
          acc[r][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xg + r * x_stride + 16 * t), acc[r][0]);
      }
      const float s = scale[o * n_groups + g], z = zero[o * n_groups + g];
      const __m512 sv = _mm512_set1_ps(s);
      for (int r = 0; r < ROWS; ++r) {
        __m512 sum = acc[r][0];
        for (int a = 1; a < NACC; ++a) sum = _mm512_add_ps(sum, acc[r][a]);
        total[r] = _mm512_fmadd_ps(sum, sv, total[r]);
        offset[r] += s * z * xsum[r * n_groups + g];
      }
    }
    for (int r = 0; r < ROWS; ++r) y[r * y_stride + o] = _mm512_reduce_add_ps(total[r]) - offset[r];
  }
}

HFC_AVX512 void gemv4_pass512(int rows, const float* x, int64_t x_stride, const int32_t* packed,
                              int64_t words_per_row, const float* scale, const float* zero, const float* xsum,
                              int64_t n_groups, int64_t group, float* y, int64_t y_stride, int64_t begin, int64_t end) {
  if (rows == 1)
    gemv4_rows512<1>(x, x_stride, packed, words_per_row, scale, zero, xsum, n_groups, group, y, y_stride, begin, end);
  else
    gemv4_rows512<2>(x, x_stride, packed, words_per_row, scale, zero, xsum, n_groups, group, y, y_stride, begin, end);
}

bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f"); }

// Int8 activations, 4 bits, on CPUs with AVX-512 VNNI (opt-in: `wq_matmul_int8`, chosen by the caller). Each input
// row is rounded to int8 per block of 32 inputs (scale: the block's largest magnitude / 127, as llama.cpp's Q8_0;
// `quantize_int8_blocks`) and the codes' products with it are summed in int32 by `vpdpbusd`, 64 unsigned codes
// against 64 signed activations an instruction, where the float loops convert and multiply 16. A step takes 128
// inputs (one 64-byte load of codes: low nibbles are the even inputs, high nibbles the odd ones, so the activations
// are stored split the same way) and leaves 16 int32 lanes of 8 inputs each, which are scaled in float:
// lane sum = s_w * (s_a * codes . a  -  zero * s_a * sum a). Groups must be 32, 64 or a multiple of 128 inputs (a
// lane never spans two groups) and the input size a multiple of 128.
#define HFC_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// Rows ahead whose codes are prefetched: the loop is bound by reading the layer from memory, and prefetching 4 rows
// ahead took 24 blocks of a 0.47B Llama's layers (one row each) from 6.2 to 4.4-5.0 ms (1, 2 and 8 rows: 5.2-5.9).
constexpr int64_t kPrefetchRows = 4;

// Ask for an output row's codes (and its scales) before the loop reaches them.
inline void prefetch_row(const uint8_t* row, int64_t bytes, const void* scales) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(row + b), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(scales), _MM_HINT_T0);
}

struct Int8Blocks {
  std::vector<int8_t> even, odd;  // the even and odd inputs, 64 of each per 128 inputs
  std::vector<float> scale, sum;  // per lane of 8 inputs: its block's scale, and scale * the lane's int8 sum
};

// Block b's 4 lanes of 8 inputs: its scale, and the scale times each lane's sum of int8 values `a`.
template <typename T>
inline void store_lanes(const T* a, float s, int64_t b, Int8Blocks& q) {
  for (int k = 0; k < 4; ++k) {
    int total = 0;
    for (int i = 0; i < 8; ++i) total += a[8 * k + i];
    q.scale[4 * b + k] = s, q.sum[4 * b + k] = s * static_cast<float>(total);
  }
}

// The block's int8 values: x * (127 / the largest magnitude), rounded to nearest (ties to even), 16 at a time.
HFC_VNNI void quantize_int8_blocks(const float* x, int64_t in, Int8Blocks& q) {
  q.even.resize(in / 2), q.odd.resize(in / 2), q.scale.resize(in / 8), q.sum.resize(in / 8);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  for (int64_t b = 0; b < in / 32; ++b) {
    const __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float s = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m512 iv = _mm512_set1_ps(inv);
    const int rounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i a0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x0, iv), rounding);
    const __m512i a1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x1, iv), rounding);
    // 32 values -> 16 even and 16 odd int8s (|a| <= 127: the narrowing keeps them)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q.even.data() + 16 * b),
                     _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(a0, evens, a1)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q.odd.data() + 16 * b),
                     _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(a0, odds, a1)));
    alignas(64) int32_t a[32];
    _mm512_store_si512(a, a0), _mm512_store_si512(a + 16, a1);
    store_lanes(a, s, b, q);
  }
}

// A step's group scales (or zero points), one per lane: the `n` values from `p` (mask), spread by `spread`.
HFC_VNNI inline __m512 group_lanes(const float* p, __mmask16 mask, __m512i spread) {
  return _mm512_permutexvar_ps(spread, _mm512_maskz_loadu_ps(mask, p));
}

HFC_VNNI inline __m512 group_lanes(const at::Half* p, __mmask16 mask, __m512i spread) {
  const __m128i half = _mm_maskz_loadu_epi16(static_cast<__mmask8>(mask), p);
  return _mm512_permutexvar_ps(spread, _mm512_cvtph_ps(_mm256_castsi128_si256(half)));
}

// One step of 128 inputs of an output row against input row `a`, added to `acc`: 16 lanes of 8 inputs.
template <bool CONST_ZERO, typename S>
HFC_VNNI inline __m512 int8_step(const Int8Blocks& a, const uint8_t* row, const S* s, const float* z,
                                 __m512 zero_all, __m512i spread, __mmask16 mask, int64_t group, int64_t c,
                                 __m512 acc) {
  const __m512i low = _mm512_set1_epi8(15);
  const __m512i w = _mm512_loadu_si512(row + 64 * c);
  const __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
  __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(a.even.data() + 64 * c));
  d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(a.odd.data() + 64 * c));
  const int64_t g = c * 128 / group;
  const __m512 sw = group_lanes(s + g, mask, spread);
  const __m512 zw = CONST_ZERO ? zero_all : group_lanes(z + g, mask, spread);
  const __m512 lane = _mm512_fmsub_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(a.scale.data() + 16 * c),
                                      _mm512_mul_ps(zw, _mm512_loadu_ps(a.sum.data() + 16 * c)));
  return _mm512_fmadd_ps(lane, sw, acc);
}

// Outputs [begin, end) for `rows` input rows; each output row's codes are read once from memory for all of them.
template <bool CONST_ZERO, typename S>
HFC_VNNI void gemv4_int8_rows(int rows, const Int8Blocks* q, const uint8_t* packed, int64_t bytes_per_row,
                              const S* scale, const float* zero, float zero_value, int64_t n_groups,
                              int64_t group, int64_t chunks, float* y, int64_t y_stride, int64_t begin, int64_t end) {
  const int lanes_per_group = group >= 128 ? 16 : static_cast<int>(group / 8);
  alignas(64) int32_t lane_group[16];
  for (int l = 0; l < 16; ++l) lane_group[l] = l / lanes_per_group;
  const __m512i spread = _mm512_load_si512(lane_group);
  const __mmask16 mask = static_cast<__mmask16>((1 << (16 / lanes_per_group)) - 1);
  const __m512 zero_all = _mm512_set1_ps(zero_value);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = packed + o * bytes_per_row;
    if (o + kPrefetchRows < end)
      prefetch_row(row + kPrefetchRows * bytes_per_row, bytes_per_row, scale + (o + kPrefetchRows) * n_groups);
    const S* s = scale + o * n_groups;
    const float* z = zero + o * n_groups;
    for (int r = 0; r < rows; ++r) {
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      int64_t c = 0;
      for (; c + 2 <= chunks; c += 2) {
        acc0 = int8_step<CONST_ZERO, S>(q[r], row, s, z, zero_all, spread, mask, group, c, acc0);
        acc1 = int8_step<CONST_ZERO, S>(q[r], row, s, z, zero_all, spread, mask, group, c + 1, acc1);
      }
      if (c < chunks) acc0 = int8_step<CONST_ZERO, S>(q[r], row, s, z, zero_all, spread, mask, group, c, acc0);
      y[r * y_stride + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
  }
}

// CPUs without AVX-512 VNNI: the same int8 loop in AVX2, a 128-input step in two halves of 64. `vpmaddubsw`
// multiplies the unsigned codes by the signed activations and sums adjacent pairs to int16 (at most 2 * 15 * 127:
// no saturation), `vpmaddwd` by ones sums those to int32 lanes of 8 inputs, laid out as in the VNNI loop. The
// rounding of the inputs is the same (`quantize_int8_blocks_scalar` computes what `quantize_int8_blocks` does).
void quantize_int8_blocks_scalar(const float* x, int64_t in, Int8Blocks& q) {
  q.even.resize(in / 2), q.odd.resize(in / 2), q.scale.resize(in / 8), q.sum.resize(in / 8);
  for (int64_t b = 0; b < in / 32; ++b) {
    const float* xb = x + 32 * b;
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float s = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int8_t a[32];
    for (int i = 0; i < 32; ++i) a[i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
    for (int i = 0; i < 16; ++i) q.even[16 * b + i] = a[2 * i], q.odd[16 * b + i] = a[2 * i + 1];
    store_lanes(a, s, b, q);
  }
}

inline float value_at(const float* p, int64_t i) { return p[i]; }
inline float value_at(const at::Half* p, int64_t i) { return static_cast<float>(p[i]); }

// Half h (64 inputs, lanes 8h..8h+7) of an output row against input row `a`, added to `acc`. Its first 4 lanes
// are in group h * 64 / group, its last 4 in the next one at groups of 32, else in the same one.
template <bool CONST_ZERO, typename S>
inline __m256 int8_half_avx2(const Int8Blocks& a, const uint8_t* row, const S* s, const float* z, __m256 zero_all,
                             int64_t group, int64_t h, __m256 acc) {
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * h));
  const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
  const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.even.data() + 32 * h));
  const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.odd.data() + 32 * h));
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
  const __m256i d = _mm256_madd_epi16(pairs, ones);
  const int64_t g = h * 64 / group, next = group == 32 ? g + 1 : g;
  const __m256 sw = _mm256_set_m128(_mm_set1_ps(value_at(s, next)), _mm_set1_ps(value_at(s, g)));
  const __m256 zw = CONST_ZERO ? zero_all : _mm256_set_m128(_mm_set1_ps(z[next]), _mm_set1_ps(z[g]));
  const __m256 lane = _mm256_fmsub_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(a.scale.data() + 8 * h),
                                      _mm256_mul_ps(zw, _mm256_loadu_ps(a.sum.data() + 8 * h)));
  return _mm256_fmadd_ps(lane, sw, acc);
}

template <bool CONST_ZERO, typename S>
void gemv4_int8_rows_avx2(int rows, const Int8Blocks* q, const uint8_t* packed, int64_t bytes_per_row,
                          const S* scale, const float* zero, float zero_value, int64_t n_groups, int64_t group,
                          int64_t chunks, float* y, int64_t y_stride, int64_t begin, int64_t end) {
  const __m256 zero_all = _mm256_set1_ps(zero_value);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = packed + o * bytes_per_row;
    if (o + kPrefetchRows < end)
      prefetch_row(row + kPrefetchRows * bytes_per_row, bytes_per_row, scale + (o + kPrefetchRows) * n_groups);
    const S* s = scale + o * n_groups;
    const float* z = zero + o * n_groups;
    for (int r = 0; r < rows; ++r) {
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (int64_t h = 0; h < 2 * chunks; h += 2) {
        acc0 = int8_half_avx2<CONST_ZERO, S>(q[r], row, s, z, zero_all, group, h, acc0);
        acc1 = int8_half_avx2<CONST_ZERO, S>(q[r], row, s, z, zero_all, group, h + 1, acc1);
      }
      y[r * y_stride + o] = hsum(_mm256_add_ps(acc0, acc1));
    }
  }
}

bool cpu_has_avx512_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

// Scalar k-means: y[m, o] = sum_j x[m, j] * table[o, code[o, j]], one table of 2^BITS levels per output row.
// 8 codes become 8 weights by table lookup in registers: 2 bits one permute, 4 bits two permutes and a blend on
// the index's bit 3, 8 bits a gather.
template <int BITS>
inline __m256 lookup8(const int32_t* words, int64_t t, const float* table, __m256 lo, __m256 hi) {
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  if (BITS == 4) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(words[t]), shifts), mask);
    const __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // sign bit: the index is 8..15
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), high);
  }
  if (BITS == 2) {
    const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const int32_t half = static_cast<int32_t>(static_cast<uint32_t>(words[t / 2]) >> (16 * (t % 2)));
    return _mm256_permutevar8x32_ps(lo, _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(half), shifts), mask));
  }
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(words + 2 * t)));
  return _mm256_i32gather_ps(table, idx, 4);
}

template <int BITS, int ROWS>
void lut_rows(const float* x, int64_t x_stride, const int32_t* packed, int64_t words_per_row, const float* tables,
              int64_t in, float* y, int64_t y_stride, int64_t out_begin, int64_t out_end) {
  constexpr int NACC = ROWS == 1 ? 4 : 2;
  constexpr int LEVELS = 1 << BITS;
  const int64_t steps = in / 8;
  for (int64_t o = out_begin; o < out_end; ++o) {
    const int32_t* words = packed + o * words_per_row;
    const float* table = tables + o * LEVELS;
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    if (BITS == 2) lo = _mm256_castps128_ps256(_mm_loadu_ps(table));
    if (BITS == 4) lo = _mm256_loadu_ps(table), hi = _mm256_loadu_ps(table + 8);
    __m256 acc[ROWS][NACC];
    for (int r = 0; r < ROWS; ++r)
      for (int a = 0; a < NACC; ++a) acc[r][a] = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + NACC <= steps; t += NACC) {
      for (int a = 0; a < NACC; ++a) {
        const __m256 w = lookup8<BITS>(words, t + a, table, lo, hi);
        for (int r = 0; r < ROWS; ++r)
          acc[r][a] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * x_stride + 8 * (t + a)), acc[r][a]);
      }
    }
    for (; t < steps; ++t) {
      const __m256 w = lookup8<BITS>(words, t, table, lo, hi);
      for (int r = 0; r < ROWS; ++r) acc[r][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * x_stride + 8 * t), acc[r][0]);
    }
    for (int r = 0; r < ROWS; ++r) {
      __m256 sum = acc[r][0];
      for (int a = 1; a < NACC; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
      y[r * y_stride + o] = hsum(sum);
    }
  }
}

template <int BITS>
void lut_pass(int rows, const float* x, int64_t x_stride, const int32_t* packed, int64_t words_per_row,
              const float* tables, int64_t in, float* y, int64_t y_stride, int64_t begin, int64_t end) {
  switch (rows) {
    case 1: lut_rows<BITS, 1>(x, x_stride, packed, words_per_row, tables, in, y, y_stride, begin, end); break;
    case 2: lut_rows<BITS, 2>(x, x_stride, packed, words_per_row, tables, in, y, y_stride, begin, end); break;
    case 3: lut_rows<BITS, 3>(x, x_stride, packed, words_per_row, tables, in, y, y_stride, begin, end); break;
    default: lut_rows<BITS, 4>(x, x_stride, packed, words_per_row, tables, in, y, y_stride, begin, end); break;
  }
}

// AVX-512F, 4-bit k-means: the row's 16 levels fill one register and 16 codes become 16 weights in one permute
// (which reads only each lane's low 4 bits: no mask), against AVX2's two permutes and a blend per 8. Taken for
// passes of one or two rows where the CPU has AVX-512F and the input size is a multiple of 16: 1.2-1.8x the AVX2
// loop at one row, 0.9-1.6x at two, 0.86-1.12x from three (4096x4096, 11008x4096, 4096x11008; 2-core AMD EPYC).
constexpr int kLut512MaxRows = 2;

// One output row's dot products with ROWS input rows, 16 weights a step: `weights(t)` gives step t's 16 weights
// (the codebook loops differ only in it). One horizontal sum per row, into y[r * y_stride].
template <int ROWS, typename Weights>
HFC_AVX512 inline void dot16_rows(const float* x, int64_t x_stride, int64_t steps, const Weights& weights, float* y,
                                  int64_t y_stride) {
  constexpr int NACC = ROWS == 1 ? 4 : 2;
  __m512 acc[ROWS][NACC];
  for (int r = 0; r < ROWS; ++r)
    for (int a = 0; a < NACC; ++a) acc[r][a] = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + NACC <= steps; t += NACC) {  // constant register indices: the accumulators stay in registers
    for (int a = 0; a < NACC; ++a) {
      const __m512 w = weights(t + a);
      for (int r = 0; r < ROWS; ++r)
        acc[r][a] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + r * x_stride + 16 * (t + a)), acc[r][a]);
    }
  }
  for (; t < steps; ++t) {
    const __m512 w = weights(t);
    for (int r = 0; r < ROWS; ++r) acc[r][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + r * x_stride + 16 * t), acc[r][0]);
  }
  for (int r = 0; r < ROWS; ++r) {
    __m512 sum = acc[r][0];
    for (int a = 1; a < NACC; ++a) sum = _mm512_add_ps(sum, acc[r][a]);
    y[r * y_stride] = _mm512_reduce_add_ps(sum);
  }
}

// 4-bit k-means: 16 codes (two words) looked up in the row's 16 levels
struct Levels16 {
  const int32_t* words;
  __m512 table;
  HFC_AVX512 __m512 operator()(int64_t t) const { return _mm512_permutexvar_ps(codes16(words, 2 * t), table); }
};

template <int ROWS>
HFC_AVX512 void lut4_rows512(const float* x, int64_t x_stride, const int32_t* packed, int64_t words_per_row,
                             const float* tables, int64_t in, float* y, int64_t y_stride, int64_t out_begin,
                             int64_t out_end) {
  for (int64_t o = out_begin; o < out_end; ++o) {
    const Levels16 weights{packed + o * words_per_row, _mm512_loadu_ps(tables + o * 16)};
    dot16_rows<ROWS>(x, x_stride, in / 16, weights, y + o, y_stride);
  }
}

HFC_AVX512 void lut4_pass512(int rows, const float* x, int64_t x_stride, const int32_t* packed, int64_t words_per_row,
                             const float* tables, int64_t in, float* y, int64_t y_stride, int64_t begin, int64_t end) {
  if (rows == 1)
    lut4_rows512<1>(x, x_stride, packed, words_per_row, tables, in, y, y_stride, begin, end);
  else
    lut4_rows512<2>(x, x_stride, packed, words_per_row, tables, in, y, y_stride, begin, end);
}

// Vector codebooks: index j of row o (IBITS bits) selects DIM consecutive weights of its book's entry,
// y[m, o] = sum_j sum_d x[m, DIM j + d] * book[o / rows_per_book][index][d]. 8 weights per step: 2 entries of 4
// (two 128-bit loads), 4 entries of 2 from a 16-entry book (in registers, `pairs8`) or from a 256-entry one (one
// gather of 64-bit pairs).
template <int IBITS>
inline int32_t index_at(const int32_t* words, int64_t j) {
  const int64_t bit = j * IBITS;
  return static_cast<int32_t>((static_cast<uint32_t>(words[bit / 32]) >> (bit % 32)) & ((1u << IBITS) - 1));
}

// 2 weights per 4-bit index: the book's 32 floats in 4 registers, 8 weights by 4 permutes and 3 blends.
struct Book32 {
  __m256 r[4];
};

inline __m256 pairs8(const int32_t* words, int64_t step, const Book32& book) {
  const int32_t half = static_cast<int32_t>(static_cast<uint32_t>(words[step / 2]) >> (16 * (step % 2)));
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(half), _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12)),
                                       _mm256_set1_epi32(15));
  const __m256i t = _mm256_add_epi32(_mm256_slli_epi32(idx, 1), _mm256_setr_epi32(0, 1, 0, 1, 0, 1, 0, 1));  // 0..31
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(t, 28)), bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(t, 27));
  const __m256 low = _mm256_blendv_ps(_mm256_permutevar8x32_ps(book.r[0], t), _mm256_permutevar8x32_ps(book.r[1], t), bit3);
  const __m256 high = _mm256_blendv_ps(_mm256_permutevar8x32_ps(book.r[2], t), _mm256_permutevar8x32_ps(book.r[3], t), bit3);
  return _mm256_blendv_ps(low, high, bit4);
}

template <int DIM, int IBITS>
inline __m256 entries8(const int32_t* words, int64_t step, const float* book) {
  if (DIM == 4) {
    const int64_t j = 2 * step;
    const __m128 a = _mm_loadu_ps(book + 4 * index_at<IBITS>(words, j));
    const __m128 b = _mm_loadu_ps(book + 4 * index_at<IBITS>(words, j + 1));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(a), b, 1);
  }
  const int64_t j = 4 * step;
  const __m128i idx = _mm_setr_epi32(index_at<IBITS>(words, j), index_at<IBITS>(words, j + 1),
                                     index_at<IBITS>(words, j + 2), index_at<IBITS>(words, j + 3));
  return _mm256_castpd_ps(_mm256_i32gather_pd(reinterpret_cast<const double*>(book), idx, 8));
}

template <int DIM, int IBITS, int ROWS>
void vq_rows(const float* x, int64_t x_stride, const int32_t* packed, int64_t words_per_row, const float* books,
             int64_t rows_per_book, int64_t in, float* y, int64_t y_stride, int64_t out_begin, int64_t out_end) {
  constexpr int NACC = ROWS == 1 ? 4 : 2;
  const int64_t steps = in / 8;
  for (int64_t o = out_begin; o < out_end; ++o) {
    const int32_t* words = packed + o * words_per_row;
    const float* book = books + (o / rows_per_book) * (int64_t(1) << IBITS) * DIM;
    __m256 acc[ROWS][NACC];
    for (int r = 0; r < ROWS; ++r)
      for (int a = 0; a < NACC; ++a) acc[r][a] = _mm256_setzero_ps();
    Book32 registers;
    if (DIM == 2 && IBITS == 4)
      for (int k = 0; k < 4; ++k) registers.r[k] = _mm256_loadu_ps(book + 8 * k);
    int64_t t = 0;
    for (; t + NACC <= steps; t += NACC) {  // constant register indices: the accumulators stay in registers
      for (int a = 0; a < NACC; ++a) {
        const __m256 w = DIM == 2 && IBITS == 4 ? pairs8(words, t + a, registers) : entries8<DIM, IBITS>(words, t + a, book);
        for (int r = 0; r < ROWS; ++r)
          acc[r][a] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * x_stride + 8 * (t + a)), acc[r][a]);
      }
    }
    for (; t < steps; ++t) {
      const __m256 w = DIM == 2 && IBITS == 4 ? pairs8(words, t, registers) : entries8<DIM, IBITS>(words, t, book);
      for (int r = 0; r < ROWS; ++r) acc[r][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * x_stride + 8 * t), acc[r][0]);
    }
    for (int r = 0; r < ROWS; ++r) {
      __m256 sum = acc[r][0];
      for (int a = 1; a < NACC; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
      y[r * y_stride + o] = hsum(sum);
    }
  }
}

template <int DIM, int IBITS>
void vq_pass(int rows, const float* x, int64_t x_stride, const int32_t* packed, int64_t words_per_row,
             const float* books, int64_t rows_per_book, int64_t in, float* y, int64_t y_stride, int64_t begin,
             int64_t end) {
  switch (rows) {
    case 1: vq_rows<DIM, IBITS, 1>(x, x_stride, packed, words_per_row, books, rows_per_book, in, y, y_stride, begin, end); break;
    case 2: vq_rows<DIM, IBITS, 2>(x, x_stride, packed, words_per_row, books, rows_per_book, in, y, y_stride, begin, end); break;
    case 3: vq_rows<DIM, IBITS, 3>(x, x_stride, packed, words_per_row, books, rows_per_book, in, y, y_stride, begin, end); break;
    default: vq_rows<DIM, IBITS, 4>(x, x_stride, packed, words_per_row, books, rows_per_book, in, y, y_stride, begin, end); break;
  }
}

// dim 2, 4-bit indices on CPUs with AVX-512F: the 16-entry book's 32 floats in two registers, one word's 8 indices
// (16 weights) by one two-source permute (AVX2: 4 permutes and 3 blends per 8 weights). Decoding is dominated by
// those permutes, so this loop wins at every pass: 3.6x the AVX2 loop at one row, 2.7-2.9x at two, 1.6-1.7x at
// four (4096x4096, 11008x4096, 4096x11008; 2-core AMD EPYC).
constexpr int kVq512MaxRows = 4;
HFC_AVX512 inline __m512 pairs16(const int32_t* words, int64_t step, __m512 low, __m512 high) {
  const __m512i shifts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i odd = _mm512_setr_epi32(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1);
  // lane l: 2 * index[l / 2] + l % 2 in its low 5 bits (the permute reads no others)
  const __m512i lanes = _mm512_or_si512(_mm512_slli_epi32(_mm512_srlv_epi32(_mm512_set1_epi32(words[step]), shifts), 1), odd);
  return _mm512_permutex2var_ps(low, lanes, high);
}

// 2 weights per 4-bit index: one word's 8 indices (16 weights) from the book's 32 floats
struct Pairs16 {
  const int32_t* words;
  __m512 low, high;
  HFC_AVX512 __m512 operator()(int64_t t) const { return pairs16(words, t, low, high); }
};

template <int ROWS>
HFC_AVX512 void vq2_rows512(const float* x, int64_t x_stride, const int32_t* packed, int64_t words_per_row,
                            const float* books, int64_t rows_per_book, int64_t in, float* y, int64_t y_stride,
                            int64_t out_begin, int64_t out_end) {
  for (int64_t o = out_begin; o < out_end; ++o) {
    const float* book = books + (o / rows_per_book) * 32;
    const Pairs16 weights{packed + o * words_per_row, _mm512_loadu_ps(book), _mm512_loadu_ps(book + 16)};
    dot16_rows<ROWS>(x, x_stride, in / 16, weights, y + o, y_stride);  // one word a step
  }
}

HFC_AVX512 void vq2_pass512(int rows, const float* x, int64_t x_stride, const int32_t* packed, int64_t words_per_row,
                            const float* books, int64_t rows_per_book, int64_t in, float* y, int64_t y_stride,
                            int64_t begin, int64_t end) {
  switch (rows) {
    case 1: vq2_rows512<1>(x, x_stride, packed, words_per_row, books, rows_per_book, in, y, y_stride, begin, end); break;
    case 2: vq2_rows512<2>(x, x_stride, packed, words_per_row, books, rows_per_book, in, y, y_stride, begin, end); break;
    case 3: vq2_rows512<3>(x, x_stride, packed, words_per_row, books, rows_per_book, in, y, y_stride, begin, end); break;
    default: vq2_rows512<4>(x, x_stride, packed, words_per_row, books, rows_per_book, in, y, y_stride, begin, end); break;
  }
}

// Dense weights (the layers a compressed model keeps whole: its output layer above all), float32 or bfloat16, for a
// few rows of float32 inputs. torch's matmul took 2-4x the time of one read of the weight here at 1-4 rows
// (32000x1024, 2-core AMD EPYC: 4.3 ms at one row in float32, where summing its 131 MB takes 1.1 ms), so decoding
// reads each weight row once, for every input row in passes of up to kRowsPerPass, while it is in L1. AVX-512F where
// the CPU has it (16 weights a step, chosen by the caller), else AVX2; bfloat16 weights widen exactly to float32
// (16 bits up); products and sums in float32; the input size needs no alignment (the last inputs are summed one by
// one).
inline __m256 dense8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 dense8(const at::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

template <int ROWS, typename T>
void dense_rows(const float* x, int64_t in, const T* row, float* y, int64_t y_stride) {
  constexpr int NACC = ROWS == 1 ? 4 : 2;
  __m256 acc[ROWS][NACC];
  for (int r = 0; r < ROWS; ++r)
    for (int a = 0; a < NACC; ++a) acc[r][a] = _mm256_setzero_ps();
  const int64_t steps = in / 8;
  int64_t t = 0;
  for (; t + NACC <= steps; t += NACC) {
    for (int a = 0; a < NACC; ++a) {
      const __m256 w = dense8(row + 8 * (t + a));
      for (int r = 0; r < ROWS; ++r)
        acc[r][a] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * in + 8 * (t + a)), acc[r][a]);
    }
  }
  for (; t < steps; ++t) {
    const __m256 w = dense8(row + 8 * t);
    for (int r = 0; r < ROWS; ++r) acc[r][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * in + 8 * t), acc[r][0]);
  }
  for (int r = 0; r < ROWS; ++r) {
    __m256 sum = acc[r][0];
    for (int a = 1; a < NACC; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
    float total = hsum(sum);
    for (int64_t j = 8 * steps; j < in; ++j) total += x[r * in + j] * static_cast<float>(row[j]);
    y[r * y_stride] = total;
  }
}

// 16 weights a step from a dense row
template <typename T>
struct Dense16;

template <>
struct Dense16<float> {
  const float* row;
  HFC_AVX512 __m512 operator()(int64_t t) const { return _mm512_loadu_ps(row + 16 * t); }
};

template <>
struct Dense16<at::BFloat16> {
  const at::BFloat16* row;
  HFC_AVX512 __m512 operator()(int64_t t) const {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * t));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
};

template <int ROWS, typename T>
HFC_AVX512 void dense_rows512(const float* x, int64_t in, const T* row, float* y, int64_t y_stride) {
  dot16_rows<ROWS>(x, in, in / 16, Dense16<T>{row}, y, y_stride);
  for (int r = 0; r < ROWS; ++r)
    for (int64_t j = in - in % 16; j < in; ++j) y[r * y_stride] += x[r * in + j] * static_cast<float>(row[j]);
}

// A pass of ROWS input rows against one weight row
template <int ROWS, bool WIDE, typename T>
inline void dense_pass(const float* x, int64_t in, const T* row, float* y, int64_t y_stride) {
  if constexpr (WIDE) dense_rows512<ROWS>(x, in, row, y, y_stride);
  else dense_rows<ROWS>(x, in, row, y, y_stride);
}

// Outputs [begin, end) for all m input rows: output row o's weights are read from memory once.
template <bool WIDE, typename T>
void dense_outputs(int64_t m, const float* x, int64_t in, const T* w, float* y, int64_t out, int64_t begin,
                   int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    const T* row = w + o * in;
    for (int64_t r0 = 0; r0 < m; r0 += kRowsPerPass) {
      const float* xr = x + r0 * in;
      float* yr = y + r0 * out + o;
      switch (std::min<int64_t>(kRowsPerPass, m - r0)) {
        case 1: dense_pass<1, WIDE>(xr, in, row, yr, out); break;
        case 2: dense_pass<2, WIDE>(xr, in, row, yr, out); break;
        case 3: dense_pass<3, WIDE>(xr, in, row, yr, out); break;
        default: dense_pass<4, WIDE>(xr, in, row, yr, out); break;
      }
    }
  }
}

template <typename T>
void dense_outputs(bool avx512, int64_t m, const float* x, int64_t in, const T* w, float* y, int64_t out,
                   int64_t begin, int64_t end) {
  if (avx512) dense_outputs<true>(m, x, in, w, y, out, begin, end);
  else dense_outputs<false>(m, x, in, w, y, out, begin, end);
}

// Codebook rows [begin, end) as float32 weights (for prompts): index j of row o (IBITS bits, LSB first) becomes the
// DIM floats of its entry in row o's book (scalar k-means: a book per row, DIM 1).
template <int DIM, int IBITS>
void decode_codebook_rows(const int32_t* packed, int64_t words_per_row, const float* books, int64_t rows_per_book,
                          int64_t in, float* dst, int64_t begin, int64_t end) {
  constexpr int kPerWord = 32 / IBITS;
  constexpr uint32_t kMask = (1u << IBITS) - 1;
  const int64_t indices = in / DIM;
  for (int64_t o = begin; o < end; ++o) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(packed + o * words_per_row);
    const float* book = books + (o / rows_per_book) * (int64_t(1) << IBITS) * DIM;
    float* w = dst + (o - begin) * in;
    if constexpr (IBITS == 4 && DIM <= 2) {  // 8 weights a step by the decoding loops' lookups in registers
      if (in % 8 == 0) {
        Book32 registers;
        for (int k = 0; k < 2 * DIM; ++k) registers.r[k] = _mm256_loadu_ps(book + 8 * k);
        for (int64_t t = 0; t < in / 8; ++t)
          store8(w + 8 * t, DIM == 1 ? lookup8<4>(packed + o * words_per_row, t, book, registers.r[0], registers.r[1])
                                     : pairs8(packed + o * words_per_row, t, registers));
        continue;
      }
    }
    for (int64_t j0 = 0; j0 < indices; j0 += kPerWord) {
      uint32_t word = words[j0 / kPerWord];
      const int64_t n = std::min<int64_t>(kPerWord, indices - j0);
      for (int64_t j = 0; j < n; ++j, word >>= IBITS) {
        const float* entry = book + (word & kMask) * DIM;
        for (int d = 0; d < DIM; ++d) w[(j0 + j) * DIM + d] = entry[d];
      }
    }
  }
}

}  // namespace

// Split the outputs across threads; each thread runs `pass(rows, r0, begin, end)` over the input rows, at most
// kRowsPerPass at a time from row r0, for its outputs [begin, end).
template <typename Pass>
void for_row_passes(int64_t m, int64_t out, const Pass& pass) {
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < m; r0 += kRowsPerPass)
      pass(static_cast<int>(std::min<int64_t>(kRowsPerPass, m - r0)), r0, begin, end);
  });
}

// The uniform grid's tensors for `in` inputs: packed int32 [out, in * bits / 32], scale/zero [out, in / group].
// Returns the number of groups.
static int64_t check_grid(const torch::Tensor& packed, const torch::Tensor& scale, const torch::Tensor& zero,
                          int64_t bits, int64_t group, int64_t in) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(packed.scalar_type() == torch::kInt32 && packed.is_contiguous(), "packed must be contiguous int32");
  TORCH_CHECK(in % group == 0 && group % 8 == 0, "group ", group, " must divide ", in, " and be a multiple of 8");
  TORCH_CHECK(packed.size(1) * 32 / bits == in, "packed width does not match the input size");
  const int64_t n_groups = in / group;
  TORCH_CHECK(scale.size(0) == packed.size(0) && scale.size(1) == n_groups && zero.sizes() == scale.sizes(),
              "scale/zero shape");
  return n_groups;
}

// x: float32 [m, in] (contiguous), packed: int32 [out, in * bits / 32], scale/zero: float32 [out, n_groups].
// `avx512`: 4-bit passes of up to kAvx512MaxRows rows take the AVX-512F loop where the group is a multiple of 16
// (the CPU must have AVX-512F); everything else the AVX2 one.
torch::Tensor wq_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t bits,
                        int64_t group, bool avx512) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [m, in]");
  const int64_t m = x.size(0), in = x.size(1), out = packed.size(0);
  const int64_t n_groups = check_grid(packed, scale, zero, bits, group, in);
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
  TORCH_CHECK(!avx512 || cpu_has_avx512(), "the AVX-512 loop needs a CPU with AVX-512F; this one has none");
  const bool wide = avx512 && bits == 4 && group % 16 == 0;
  for_row_passes(m, out, [&](int rows, int64_t r0, int64_t begin, int64_t end) {
    if (wide && rows <= kAvx512MaxRows)
      gemv4_pass512(rows, xp + r0 * in, in, wp, words_per_row, sp, zp, xsp + r0 * n_groups, n_groups, group, yp + r0 * out, out, begin, end);
    else if (bits == 4)
      gemv_pass<4>(rows, xp + r0 * in, in, wp, words_per_row, sp, zp, xsp + r0 * n_groups, n_groups, group, yp + r0 * out, out, begin, end);
    else
      gemv_pass<8>(rows, xp + r0 * in, in, wp, words_per_row, sp, zp, xsp + r0 * n_groups, n_groups, group, yp + r0 * out, out, begin, end);
  });
  return y;
}

// x: float32 [m, in] (contiguous), packed: int32 [out, in / 8] (4-bit codes), scale: float32 or float16 [out,
// n_groups], zero: float32 of scale's shape, or of one element that is every group's zero point (symmetric grids).
// Each input row is rounded to int8 per block of 32 inputs (`quantize_int8_blocks`), so the result differs from
// `wq_matmul`'s by that rounding. `vnni`: the AVX-512 VNNI loop (the CPU must have it), else the AVX2 one. Needs an
// input size that is a multiple of 128 and groups of 32, 64 or a multiple of 128.
torch::Tensor wq_matmul_int8(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero,
                             int64_t group, bool vnni) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [m, in]");
  TORCH_CHECK(!vnni || cpu_has_avx512_vnni(), "the VNNI loop needs a CPU with AVX-512 VNNI; this one has none");
  const int64_t m = x.size(0), in = x.size(1), out = packed.size(0);
  TORCH_CHECK(in % 128 == 0, "the int8 loop needs an input size that is a multiple of 128, got ", in);
  TORCH_CHECK(group == 32 || group == 64 || group % 128 == 0, "the int8 loop needs groups of 32, 64 or a multiple of 128, got ", group);
  TORCH_CHECK(packed.scalar_type() == torch::kInt32 && packed.is_contiguous() && packed.size(1) * 8 == in,
              "packed must be contiguous int32 [out, in / 8]");
  const int64_t n_groups = in / group;
  auto scale_c = scale.contiguous(), zero_c = zero.contiguous();
  const bool half = scale_c.scalar_type() == torch::kHalf;
  TORCH_CHECK((half || scale_c.scalar_type() == torch::kFloat32) && scale_c.size(0) == out && scale_c.size(1) == n_groups,
              "scale must be float32 or float16 [out, in / group]");
  const bool one_zero = zero_c.numel() == 1;
  TORCH_CHECK(zero_c.scalar_type() == torch::kFloat32 && (one_zero || zero_c.sizes() == scale_c.sizes()),
              "zero must be float32 of one element or scale's shape");
  std::vector<Int8Blocks> q(m);
  const float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) {
    if (vnni) quantize_int8_blocks(xp + r * in, in, q[r]);
    else quantize_int8_blocks_scalar(xp + r * in, in, q[r]);
  }
  auto y = torch::empty({m, out}, x.options());
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>());
  const float* zp = zero_c.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int rows = static_cast<int>(m);
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    auto run = [&](auto* sp) {
      if (vnni && one_zero)
        gemv4_int8_rows<true>(rows, q.data(), wp, in / 2, sp, zp, zp[0], n_groups, group, in / 128, yp, out, begin, end);
      else if (vnni)
        gemv4_int8_rows<false>(rows, q.data(), wp, in / 2, sp, zp, 0.0f, n_groups, group, in / 128, yp, out, begin, end);
      else if (one_zero)
        gemv4_int8_rows_avx2<true>(rows, q.data(), wp, in / 2, sp, zp, zp[0], n_groups, group, in / 128, yp, out, begin, end);
      else
        gemv4_int8_rows_avx2<false>(rows, q.data(), wp, in / 2, sp, zp, 0.0f, n_groups, group, in / 128, yp, out, begin, end);
    };
    if (half) run(scale_c.data_ptr<at::Half>());
    else run(scale_c.data_ptr<float>());
  });
  return y;
}

// x: float32 [m, in] (contiguous), weight: float32 or bfloat16 [out, in] (contiguous): x @ weight.T in float32 for
// a few rows. `avx512`: the AVX-512F loop (the CPU must have it), else the AVX2 one.
torch::Tensor dense_matmul(torch::Tensor x, torch::Tensor weight, bool avx512) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [m, in]");
  const bool half = weight.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((half || weight.scalar_type() == torch::kFloat32) && weight.is_contiguous() && weight.dim() == 2 &&
              weight.size(1) == x.size(1), "weight must be contiguous float32 or bfloat16 [out, ", x.size(1), "]");
  TORCH_CHECK(!avx512 || cpu_has_avx512(), "the AVX-512 loop needs a CPU with AVX-512F; this one has none");
  const int64_t m = x.size(0), in = x.size(1), out = weight.size(0);
  auto y = torch::empty({m, out}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    if (half) dense_outputs(avx512, m, xp, in, weight.const_data_ptr<at::BFloat16>(), yp, out, begin, end);
    else dense_outputs(avx512, m, xp, in, weight.const_data_ptr<float>(), yp, out, begin, end);
  });
  return y;
}

// x: float32 [m, in] (contiguous), packed: int32 [out, in * bits / 32], tables: float32 [out, 2^bits].
// `avx512`: 4-bit passes of up to kLut512MaxRows rows take the AVX-512F loop where the input size is a multiple of
// 16 (the CPU must have AVX-512F); everything else the AVX2 one.
torch::Tensor lut_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor tables, int64_t bits, bool avx512) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8, got ", bits);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [m, in]");
  TORCH_CHECK(packed.scalar_type() == torch::kInt32 && packed.is_contiguous(), "packed must be contiguous int32");
  const int64_t m = x.size(0), in = x.size(1), out = packed.size(0);
  TORCH_CHECK(in % (bits == 2 ? 16 : 8) == 0, "the input size ", in, " must be a multiple of ", bits == 2 ? 16 : 8);
  TORCH_CHECK(packed.size(1) * 32 / bits == in, "packed width does not match the input size");
  TORCH_CHECK(tables.scalar_type() == torch::kFloat32 && tables.is_contiguous() && tables.size(0) == out &&
              tables.size(1) == (1 << bits), "tables must be contiguous float32 [out, 2^bits]");
  auto y = torch::empty({m, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const int32_t* wp = packed.data_ptr<int32_t>();
  const float* tp = tables.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t words_per_row = packed.size(1);
  TORCH_CHECK(!avx512 || cpu_has_avx512(), "the AVX-512 loop needs a CPU with AVX-512F; this one has none");
  const bool wide = avx512 && bits == 4 && in % 16 == 0;
  for_row_passes(m, out, [&](int rows, int64_t r0, int64_t begin, int64_t end) {
    const float* xr = xp + r0 * in;
    float* yr = yp + r0 * out;
    if (wide && rows <= kLut512MaxRows) lut4_pass512(rows, xr, in, wp, words_per_row, tp, in, yr, out, begin, end);
    else if (bits == 4) lut_pass<4>(rows, xr, in, wp, words_per_row, tp, in, yr, out, begin, end);
    else if (bits == 2) lut_pass<2>(rows, xr, in, wp, words_per_row, tp, in, yr, out, begin, end);
    else lut_pass<8>(rows, xr, in, wp, words_per_row, tp, in, yr, out, begin, end);
  });
  return y;
}

// x: float32 [m, in] (contiguous), packed: int32 [out, ceil((in / dim) * index_bits / 32)], books: float32
// [n_books, 2^index_bits, dim], each book serving out / n_books consecutive rows.
torch::Tensor vq_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor books, int64_t dim, int64_t index_bits,
                        bool avx512) {
  TORCH_CHECK((dim == 2 || dim == 4) && (index_bits == 4 || index_bits == 8), "dim 2 or 4 with 4- or 8-bit indices");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [m, in]");
  TORCH_CHECK(packed.scalar_type() == torch::kInt32 && packed.is_contiguous(), "packed must be contiguous int32");
  const int64_t m = x.size(0), in = x.size(1), out = packed.size(0);
  TORCH_CHECK(in % 8 == 0, "the input size ", in, " must be a multiple of 8");
  TORCH_CHECK(packed.size(1) == ((in / dim) * index_bits + 31) / 32, "packed width does not match the input size");
  TORCH_CHECK(books.scalar_type() == torch::kFloat32 && books.is_contiguous() && books.dim() == 3 &&
              books.size(1) == (int64_t(1) << index_bits) && books.size(2) == dim && out % books.size(0) == 0,
              "books must be contiguous float32 [n_books, 2^index_bits, dim] with n_books dividing the rows");
  const int64_t rows_per_book = out / books.size(0);
  auto y = torch::empty({m, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const int32_t* wp = packed.data_ptr<int32_t>();
  const float* bp = books.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t words_per_row = packed.size(1);
  TORCH_CHECK(!avx512 || cpu_has_avx512(), "the AVX-512 loop needs a CPU with AVX-512F; this one has none");
  const bool wide = avx512 && dim == 2 && index_bits == 4 && in % 16 == 0;
  for_row_passes(m, out, [&](int rows, int64_t r0, int64_t begin, int64_t end) {
    const float* xr = xp + r0 * in;
    float* yr = yp + r0 * out;
    if (wide && rows <= kVq512MaxRows) vq2_pass512(rows, xr, in, wp, words_per_row, bp, rows_per_book, in, yr, out, begin, end);
    else if (dim == 2 && index_bits == 4) vq_pass<2, 4>(rows, xr, in, wp, words_per_row, bp, rows_per_book, in, yr, out, begin, end);
    else if (dim == 2) vq_pass<2, 8>(rows, xr, in, wp, words_per_row, bp, rows_per_book, in, yr, out, begin, end);
    else if (index_bits == 4) vq_pass<4, 4>(rows, xr, in, wp, words_per_row, bp, rows_per_book, in, yr, out, begin, end);
    else vq_pass<4, 8>(rows, xr, in, wp, words_per_row, bp, rows_per_book, in, yr, out, begin, end);
  });
  return y;
}

// Many rows (prompts) of a codebook layer: decode `tile` output rows at a time into a buffer of x's dtype (float32,
// or bfloat16 where the CPU multiplies it natively: each row decoded in float32, then rounded) and multiply by
// torch's matmul (oneDNN/MKL); the dense weight never exists whole; the result is float32. x: float32 or bfloat16
// [m, in]; packed and books as for `vq_matmul` (scalar k-means: books [out, 2^bits, 1], dim 1).
torch::Tensor codebook_matmul_tiled(torch::Tensor x, torch::Tensor packed, torch::Tensor books, int64_t dim,
                                    int64_t index_bits, int64_t tile) {
  TORCH_CHECK((dim == 1 || dim == 2 || dim == 4) && (index_bits == 2 || index_bits == 4 || index_bits == 8),
              "dim 1, 2 or 4 with 2-, 4- or 8-bit indices, got dim ", dim, " and ", index_bits, "-bit indices");
  TORCH_CHECK((x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) && x.dim() == 2,
              "x must be float32 or bfloat16 [m, in]");
  TORCH_CHECK(packed.scalar_type() == torch::kInt32 && packed.is_contiguous(), "packed must be contiguous int32");
  TORCH_CHECK(tile > 0, "tile must be positive, got ", tile);
  const int64_t m = x.size(0), in = x.size(1), out = packed.size(0);
  TORCH_CHECK(in % dim == 0 && packed.size(1) == ((in / dim) * index_bits + 31) / 32,
              "packed width does not match the input size");
  TORCH_CHECK(books.scalar_type() == torch::kFloat32 && books.is_contiguous() && books.dim() == 3 &&
              books.size(1) == (int64_t(1) << index_bits) && books.size(2) == dim && out % books.size(0) == 0,
              "books must be contiguous float32 [n_books, 2^index_bits, dim] with n_books dividing the rows");
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(!bf16 || in % 8 == 0, "bfloat16 tiles need an input size of a multiple of 8, got ", in);
  const int64_t rows_per_book = out / books.size(0), words_per_row = packed.size(1);
  const int32_t* wp = packed.data_ptr<int32_t>();
  const float* bp = books.data_ptr<float>();
  const int64_t kind = dim * 16 + index_bits;
  auto decode = [&](float* dst, int64_t begin, int64_t end) {
    auto run = [&](auto rows) { rows(wp, words_per_row, bp, rows_per_book, in, dst, begin, end); };
    switch (kind) {
      case 16 + 2: run(decode_codebook_rows<1, 2>); break;
      case 16 + 4: run(decode_codebook_rows<1, 4>); break;
      case 16 + 8: run(decode_codebook_rows<1, 8>); break;
      case 32 + 2: run(decode_codebook_rows<2, 2>); break;
      case 32 + 4: run(decode_codebook_rows<2, 4>); break;
      case 32 + 8: run(decode_codebook_rows<2, 8>); break;
      case 64 + 2: run(decode_codebook_rows<4, 2>); break;
      case 64 + 4: run(decode_codebook_rows<4, 4>); break;
      default: run(decode_codebook_rows<4, 8>); break;
    }
  };
  auto y = torch::empty({m, out}, x.options().dtype(torch::kFloat32));
  auto buffer = torch::empty({std::min(tile, out), in}, x.options());
  for (int64_t o0 = 0; o0 < out; o0 += tile) {
    const int64_t rows = std::min(tile, out - o0);
    auto w = buffer.narrow(0, 0, rows);
    at::parallel_for(o0, o0 + rows, 8, [&](int64_t begin, int64_t end) {
      if (!bf16) return decode(w.data_ptr<float>() + (begin - o0) * in, begin, end);
      std::vector<float> row(in);
      at::BFloat16* dst = w.data_ptr<at::BFloat16>() + (begin - o0) * in;
      for (int64_t o = begin; o < end; ++o, dst += in) {
        decode(row.data(), o, o + 1);
        for (int64_t j = 0; j < in; j += 8) store8(dst + j, _mm256_loadu_ps(row.data() + j));
      }
    });
    if (rows == out && !bf16) at::mm_out(y, x, w.t());  // one tile: straight into the result
    else y.narrow(1, o0, rows).copy_(at::mm(x, w.t()));
  }
  return y;
}

// Many rows (prompts): dequantize `tile` output rows at a time into a buffer of x's dtype (float32, or bfloat16
// where the CPU multiplies it natively) and multiply by torch's matmul (oneDNN/MKL). The dense weight never
// exists whole; the result is float32.
torch::Tensor wq_matmul_tiled(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero,
                              int64_t bits, int64_t group, int64_t tile) {
  TORCH_CHECK((x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) && x.dim() == 2,
              "x must be float32 or bfloat16 [m, in]");
  TORCH_CHECK(tile > 0, "tile must be positive, got ", tile);
  const int64_t m = x.size(0), in = x.size(1), out = packed.size(0);
  const int64_t n_groups = check_grid(packed, scale, zero, bits, group, in);
  auto scale_c = scale.to(torch::kFloat32).contiguous(), zero_c = zero.to(torch::kFloat32).contiguous();
  const int32_t* wp = packed.data_ptr<int32_t>();
  const float* sp = scale_c.data_ptr<float>();
  const float* zp = zero_c.data_ptr<float>();
  const int64_t words_per_row = packed.size(1);
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  auto y = torch::empty({m, out}, x.options().dtype(torch::kFloat32));
  auto buffer = torch::empty({std::min(tile, out), in}, x.options());
  for (int64_t o0 = 0; o0 < out; o0 += tile) {
    const int64_t rows = std::min(tile, out - o0);
    auto w = buffer.narrow(0, 0, rows);
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      if (bf16)
        dequantize_rows(wp + o0 * words_per_row, words_per_row, sp + o0 * n_groups, zp + o0 * n_groups, bits, n_groups,
                        group, in, w.data_ptr<at::BFloat16>() + begin * in, begin, end);
      else
        dequantize_rows(wp + o0 * words_per_row, words_per_row, sp + o0 * n_groups, zp + o0 * n_groups, bits, n_groups,
                        group, in, w.data_ptr<float>() + begin * in, begin, end);
    });
    if (rows == out && !bf16) at::mm_out(y, x, w.t());  // one tile: straight into the result
    else y.narrow(1, o0, rows).copy_(at::mm(x, w.t()));
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wq_matmul", &wq_matmul, "weight-only 4/8-bit matmul for a few rows (AVX2; with avx512=True 4-bit passes of 1-2 rows in AVX-512F)",
        py::arg("x"), py::arg("packed"), py::arg("scale"), py::arg("zero"), py::arg("bits"), py::arg("group"),
        py::arg("avx512") = false);
  m.def("has_avx512", &cpu_has_avx512, "whether this CPU has AVX-512F");
  m.def("wq_matmul_int8", &wq_matmul_int8, "4-bit weight-only matmul with the inputs rounded to int8 per block of 32 "
        "(AVX2; with vnni=True AVX-512 VNNI)", py::arg("x"), py::arg("packed"), py::arg("scale"), py::arg("zero"), py::arg("group"), py::arg("vnni") = true);
  m.def("has_avx512_vnni", &cpu_has_avx512_vnni, "whether this CPU has AVX-512F, BW and VNNI");
  m.def("wq_matmul_tiled", &wq_matmul_tiled, "weight-only 4/8-bit matmul for many rows: dequantized tiles, torch's matmul");
  m.def("lut_matmul", &lut_matmul, "scalar k-means (per-row table) 2/4/8-bit matmul for a few rows (AVX2; with "
        "avx512=True 4 bits in AVX-512F)", py::arg("x"), py::arg("packed"), py::arg("tables"), py::arg("bits"),
        py::arg("avx512") = false);
  m.def("codebook_matmul_tiled", &codebook_matmul_tiled, "codebook (k-means or vector) matmul for many rows: decoded "
        "tiles, torch's matmul");
  m.def("dense_matmul", &dense_matmul, "dense float32 or bfloat16 weights times float32 inputs for a few rows (AVX2; with avx512=True AVX-512F)",
        py::arg("x"), py::arg("weight"), py::arg("avx512") = false);
  m.def("vq_matmul", &vq_matmul, "vector-codebook (dim 2 or 4, 4/8-bit indices) matmul for a few rows (AVX2; with "
        "avx512=True dim 2 with 4-bit indices in AVX-512F)", py::arg("x"), py::arg("packed"), py::arg("books"),
        py::arg("dim"), py::arg("index_bits"), py::arg("avx512") = false);
}
