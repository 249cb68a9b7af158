// x[M, K] @ W^T for small M on AVX2's integer dot products, the activations quantized to int8
// per 32-block (llama.cpp's Q8_1 scheme):
// - tessera::q4_linear: 4-bit weights in 32-wide blocks (GGUF Q4_1's layout). torch's int4
//   kernel dequantizes each weight to a float and runs ~4 GB/s of weights on two AVX2 cores;
//   summing u4 x s8 pairs with vpmaddubsw takes half the instructions per weight.
// - tessera::i8_linear: int8 weights with an fp32 scale per row (an LM head): SmolLM2's head of
//   one row in 1.8 ms where torch's W8A16, which converts every weight to a float, takes 4.5.
// Built at run time by kernels/cpu_extension.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "avx2_vec.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using tessera_avx2::abs8;
using tessera_avx2::hmax;
using tessera_avx2::hsum;
using tessera_avx2::load8;
using tessera_avx2::pack_int8;
using tessera_avx2::round_to_int;

constexpr int64_t kBlock = 32;
constexpr int64_t kBlockBytes = 20;  // fp16 scale d, fp16 min m, 16 bytes of nibbles
constexpr int kRowTile = 4;          // activation rows that share one read of a weight block
constexpr int64_t kWeightRows = 16;  // weight rows that each tile of activation rows passes over

// Each 32-block of x as int8 codes q, its scale d = max|x| / 127 and d * sum(q): the weight's
// min m multiplies the block's sum of activations, which d * sum(q) stands for.
template <typename T>
void quantize_blocks(const T* x, int64_t blocks, int8_t* q, float* d, float* dsum) {
  for (int64_t b = 0; b < blocks; ++b) {
    const T* xb = x + b * kBlock;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = load8(xb + 8 * i);
      amax = _mm256_max_ps(amax, abs8(v[i]));
    }
    const float scale = hmax(amax) / 127.0f;
    const __m256 inv = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    __m256i ints[4];
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      ints[i] = round_to_int(_mm256_mul_ps(v[i], inv));
      sum = _mm256_add_epi32(sum, ints[i]);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), pack_int8(ints));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    d[b] = scale;
    dsum[b] = scale * static_cast<float>(_mm_cvtsi128_si32(s));
  }
}

// Weight rows [row_begin, row_end) against `Rows` activation rows starting at `m0`.
template <int Rows, typename T>
void dot_rows(const uint8_t* w, int64_t groups, const int8_t* q, const float* d,
              const float* dsum, int64_t m0, int64_t row_begin, int64_t row_end,
              int64_t out_features, T* y) {
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = row_begin; n < row_end; ++n) {
    const uint8_t* row = w + n * groups * kBlockBytes;
    __m256 acc[Rows];
    float min_terms[Rows];
    for (int r = 0; r < Rows; ++r) {
      acc[r] = _mm256_setzero_ps();
      min_terms[r] = 0.0f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* block = row + g * kBlockBytes;
      uint16_t halves[2];
      std::memcpy(halves, block, sizeof(halves));
      const float wd = _cvtsh_ss(halves[0]);
      const float wm = _cvtsh_ss(halves[1]);
      const __m128i nibbles = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4));
      const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(nibbles, 4), low),
                                             _mm_and_si128(nibbles, low));
      for (int r = 0; r < Rows; ++r) {
        const int64_t xb = (m0 + r) * groups + g;
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + xb * kBlock));
        const __m256i pairs = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xq), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pairs), _mm256_set1_ps(wd * d[xb]), acc[r]);
        min_terms[r] += wm * dsum[xb];
      }
    }
    for (int r = 0; r < Rows; ++r) {
      y[(m0 + r) * out_features + n] = static_cast<T>(hsum(acc[r]) + min_terms[r]);
    }
  }
}

// int8 weight rows [row_begin, row_end) (scale per row) against `Rows` activation rows from
// `m0`: vpmaddubsw takes |w| as its unsigned operand and x with w's sign as its signed one.
template <int Rows>
void dot_rows_i8(const int8_t* w, const float* w_scale, int64_t groups, const int8_t* q,
                 const float* d, int64_t m0, int64_t row_begin, int64_t row_end,
                 int64_t out_features, float* y) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = row_begin; n < row_end; ++n) {
    const int8_t* row = w + n * groups * kBlock;
    __m256 acc[Rows];
    for (int r = 0; r < Rows; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + g * kBlock));
      const __m256i magnitudes = _mm256_sign_epi8(codes, codes);
      for (int r = 0; r < Rows; ++r) {
        const int64_t xb = (m0 + r) * groups + g;
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + xb * kBlock));
        const __m256i pairs = _mm256_madd_epi16(
            _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(xq, codes)), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pairs), _mm256_set1_ps(d[xb]), acc[r]);
      }
    }
    for (int r = 0; r < Rows; ++r) y[(m0 + r) * out_features + n] = hsum(acc[r]) * w_scale[n];
  }
}

// `dot.template operator()<R>(m0, begin, end)` for activation rows m0 .. m0 + R, R = `Rows`
// or fewer.
template <int Rows, typename Dot>
void dot_tile(const Dot& dot, int64_t m0, int64_t rows, int64_t begin, int64_t end) {
  if constexpr (Rows > 1) {
    if (rows < Rows) {
      dot_tile<Rows - 1>(dot, m0, rows, begin, end);
      return;
    }
  }
  dot.template operator()<Rows>(m0, begin, end);
}

// Every activation row against weight rows [begin, end): kWeightRows of them at a time, which
// stay in L1 while each tile of kRowTile activation rows passes over them.
template <typename Dot>
void dot_all_rows(const Dot& dot, int64_t m, int64_t begin, int64_t end) {
  for (int64_t n0 = begin; n0 < end; n0 += kWeightRows) {
    const int64_t n1 = std::min(end, n0 + kWeightRows);
    for (int64_t m0 = 0; m0 < m; m0 += kRowTile) {
      dot_tile<kRowTile>(dot, m0, std::min<int64_t>(kRowTile, m - m0), n0, n1);
    }
  }
}

struct QuantizedActivations {
  std::vector<int8_t> codes;
  std::vector<float> scale, scaled_sum;
};

template <typename T>
QuantizedActivations quantize(const at::Tensor& x) {
  const int64_t blocks = x.numel() / kBlock;
  QuantizedActivations a{std::vector<int8_t>(blocks * kBlock), std::vector<float>(blocks),
                         std::vector<float>(blocks)};
  quantize_blocks(x.data_ptr<T>(), blocks, a.codes.data(), a.scale.data(), a.scaled_sum.data());
  return a;
}

QuantizedActivations quantize_any(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? quantize<c10::BFloat16>(x) : quantize<float>(x);
}

template <typename T>
void q4_linear_impl(const QuantizedActivations& a, const at::Tensor& w, at::Tensor& y) {
  const int64_t m = y.size(0), n = y.size(1), groups = w.size(1);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    dot_all_rows([&]<int R>(int64_t m0, int64_t n0, int64_t n1) {
      dot_rows<R, T>(wp, groups, a.codes.data(), a.scale.data(), a.scaled_sum.data(), m0, n0, n1,
                     n, yp);
    }, m, begin, end);
  });
}

// x bf16 or fp32 [M, K] (anything else is taken as fp32).
at::Tensor activations(const at::Tensor& x_in, int64_t in_features, const char* op) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == in_features && in_features % kBlock == 0, op,
              ": x must be [M, K] with K the weight's and a multiple of 32");
  return (x_in.scalar_type() == at::kBFloat16 ? x_in : x_in.to(at::kFloat)).contiguous();
}

// y in x's dtype (fp32 or bf16), so a bf16 model's graph casts neither way.
at::Tensor q4_linear(const at::Tensor& x_in, const at::Tensor& blocks) {
  TORCH_CHECK(blocks.dtype() == at::kByte && blocks.dim() == 3 && blocks.size(2) == kBlockBytes,
              "q4_linear: blocks must be uint8 [N, K / 32, 20]");
  const at::Tensor x = activations(x_in, blocks.size(1) * kBlock, "q4_linear");
  const at::Tensor w = blocks.contiguous();
  const QuantizedActivations a = quantize_any(x);
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    q4_linear_impl<c10::BFloat16>(a, w, y);
  } else {
    q4_linear_impl<float>(a, w, y);
  }
  return y;
}

// fp32 y: an LM head's logits keep every bit until sampling.
at::Tensor i8_linear(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(weight.dtype() == at::kChar && weight.dim() == 2 && scales.dtype() == at::kFloat &&
                  scales.numel() == weight.size(0),
              "i8_linear: weight must be int8 [N, K] and scales fp32 [N]");
  const at::Tensor x = activations(x_in, weight.size(1), "i8_linear");
  const at::Tensor w = weight.contiguous(), s = scales.contiguous();
  const QuantizedActivations a = quantize_any(x);
  const int64_t m = x.size(0), n = w.size(0), groups = w.size(1) / kBlock;
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    dot_all_rows([&]<int R>(int64_t m0, int64_t n0, int64_t n1) {
      dot_rows_i8<R>(wp, sp, groups, a.codes.data(), a.scale.data(), m0, n0, n1, n, yp);
    }, m, begin, end);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera, lib) {
  lib.def("q4_linear(Tensor x, Tensor blocks) -> Tensor");
  lib.def("i8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(tessera, CPU, lib) {
  lib.impl("q4_linear", &q4_linear);
  lib.impl("i8_linear", &i8_linear);
}
