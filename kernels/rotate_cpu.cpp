// tessera::rotate: x[..., K] times the block-diagonal rotation of kernels/reference.py's
// `hadamard(block)` (the Sylvester Hadamard matrix of the block's power-of-two factor P,
// Kronecker the Hartley transform of its odd factor n, over sqrt(block)), in fp32, computed as
// a fast Walsh-Hadamard transform: log2(P) passes of sums and differences over each P-chunk,
// then one n x n product across the chunks. torch's two small matmuls do P + n multiply-adds
// per value where this does log2(P) adds and n multiply-adds: rotating a 32-token step's
// activations is a fraction of a layer's GEMM rather than a tenth of it. Each row stays in L1.
// Built at run time by kernels/cpu_extension.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "avx2_vec.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using tessera_avx2::load8;

// The Walsh-Hadamard transform of 8 values (v @ H_8) in registers: three passes of sums and
// differences between lanes 1, 2 and 4 apart.
inline __m256 walsh_hadamard8(__m256 v) {
  __m256 swapped = _mm256_permute_ps(v, 0xB1);  // lanes 1 apart traded
  v = _mm256_blend_ps(_mm256_add_ps(v, swapped), _mm256_sub_ps(swapped, v), 0xAA);
  swapped = _mm256_permute_ps(v, 0x4E);  // 2 apart
  v = _mm256_blend_ps(_mm256_add_ps(v, swapped), _mm256_sub_ps(swapped, v), 0xCC);
  swapped = _mm256_permute2f128_ps(v, v, 0x01);  // 4 apart
  return _mm256_blend_ps(_mm256_add_ps(v, swapped), _mm256_sub_ps(swapped, v), 0xF0);
}

// The Walsh-Hadamard transform of v[0, p) in place (natural order: v @ H_p, unnormalized),
// from pass `h` on: where p >= 8, the caller has done the first three (walsh_hadamard8).
void walsh_hadamard(float* v, int64_t p, int64_t h) {
  for (; h < p && h < 8; h *= 2) {
    for (int64_t i = 0; i < p; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
    }
  }
  for (; 4 * h <= p; h *= 4) {  // two passes at once: 4 vectors, h apart, in registers
    for (int64_t i = 0; i < p; i += 4 * h) {
      for (int64_t j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + h);
        const __m256 c = _mm256_loadu_ps(v + j + 2 * h), d = _mm256_loadu_ps(v + j + 3 * h);
        const __m256 ab = _mm256_add_ps(a, b), a_b = _mm256_sub_ps(a, b);
        const __m256 cd = _mm256_add_ps(c, d), c_d = _mm256_sub_ps(c, d);
        _mm256_storeu_ps(v + j, _mm256_add_ps(ab, cd));
        _mm256_storeu_ps(v + j + h, _mm256_add_ps(a_b, c_d));
        _mm256_storeu_ps(v + j + 2 * h, _mm256_sub_ps(ab, cd));
        _mm256_storeu_ps(v + j + 3 * h, _mm256_sub_ps(a_b, c_d));
      }
    }
  }
  for (; h < p; h *= 2) {
    for (int64_t i = 0; i < p; i += 2 * h) {
      for (int64_t j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + h);
        _mm256_storeu_ps(v + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, b));
      }
    }
  }
}

// y[a * p + j] = sum over a' of v[a' * p + j] * mix[a'][a], for the n chunks of a block.
void mix_chunks(float* v, int64_t p, int64_t n, const float* mix) {
  constexpr int kMaxOdd = 15;
  int64_t j = 0;
  for (; j + 8 <= p; j += 8) {
    __m256 in[kMaxOdd];
    for (int64_t a = 0; a < n; ++a) in[a] = _mm256_loadu_ps(v + a * p + j);
    for (int64_t a = 0; a < n; ++a) {
      __m256 acc = _mm256_mul_ps(in[0], _mm256_set1_ps(mix[a]));
      for (int64_t b = 1; b < n; ++b) {
        acc = _mm256_fmadd_ps(in[b], _mm256_set1_ps(mix[b * n + a]), acc);
      }
      _mm256_storeu_ps(v + a * p + j, acc);
    }
  }
  for (; j < p; ++j) {
    float in[kMaxOdd];
    for (int64_t a = 0; a < n; ++a) in[a] = v[a * p + j];
    for (int64_t a = 0; a < n; ++a) {
      float acc = 0.0f;
      for (int64_t b = 0; b < n; ++b) acc += in[b] * mix[b * n + a];
      v[a * p + j] = acc;
    }
  }
}

// The Hartley transform of n points, cas(2 pi a b / n), for each odd factor 1 .. 15: built
// once, not on every step's call.
const float* hartley(int64_t n) {
  static const std::vector<std::vector<float>> tables = [] {
    std::vector<std::vector<float>> all(16);
    for (int64_t m = 1; m < 16; m += 2) {
      for (int64_t a = 0; a < m; ++a) {
        for (int64_t b = 0; b < m; ++b) {
          const double angle = 2.0 * M_PI * static_cast<double>(a * b) / static_cast<double>(m);
          all[m].push_back(static_cast<float>(std::cos(angle) + std::sin(angle)));
        }
      }
    }
    return all;
  }();
  return tables[n].data();
}

template <typename T>
void rotate_rows(const T* x, float* y, int64_t rows, int64_t k, int64_t p, int64_t n) {
  const int64_t block = p * n;
  const float scale = 1.0f / std::sqrt(static_cast<float>(block));
  const float* mix = hartley(n);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / k), [&](int64_t begin, int64_t end) {
    const __m256 scale8 = _mm256_set1_ps(scale);
    for (int64_t r = begin; r < end; ++r) {
      const T* in = x + r * k;
      float* out = y + r * k;
      int64_t i = 0;
      if (p >= 8) {  // k is a multiple of 8
        for (; i < k; i += 8) {
          _mm256_storeu_ps(out + i, walsh_hadamard8(_mm256_mul_ps(load8(in + i), scale8)));
        }
      }
      for (; i < k; ++i) out[i] = static_cast<float>(in[i]) * scale;
      for (int64_t start = 0; start < k; start += block) {
        for (int64_t chunk = 0; chunk < n; ++chunk) {
          walsh_hadamard(out + start + chunk * p, p, p >= 8 ? 8 : 1);
        }
        if (n > 1) mix_chunks(out + start, p, n, mix);
      }
    }
  });
}

// fp32, bf16 or fp16 x[..., K], K a multiple of `block` (its odd factor at most 15) -> fp32.
at::Tensor rotate(const at::Tensor& x, int64_t block) {
  TORCH_CHECK(x.dim() >= 1 && block >= 1 && x.size(-1) % block == 0,
              "rotate: the last dimension is a multiple of block");
  const int64_t odd = block / (block & -block);
  TORCH_CHECK(odd <= 15, "rotate: a block's odd factor is at most 15, got ", odd);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const int64_t k = x.size(-1), rows = k == 0 ? 0 : xc.numel() / k;
  float* out = y.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat:
      rotate_rows(xc.data_ptr<float>(), out, rows, k, block / odd, odd);
      break;
    case at::kBFloat16:
      rotate_rows(xc.data_ptr<c10::BFloat16>(), out, rows, k, block / odd, odd);
      break;
    case at::kHalf:
      rotate_rows(xc.data_ptr<c10::Half>(), out, rows, k, block / odd, odd);
      break;
    default:
      TORCH_CHECK(false, "rotate: x is fp32, bf16 or fp16, got ", x.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera, lib) { lib.def("rotate(Tensor x, int block) -> Tensor"); }

TORCH_LIBRARY_IMPL(tessera, CPU, lib) { lib.impl("rotate", &rotate); }
