// tessera::decode_attention: one new query per row over that row's paged K/V, read in place.
// torch's path gathers each layer's context out of the pool, converts it to fp32 and calls SDPA:
// three passes over the context and three ops per layer, which cost a one-request SmolLM2 step
// on two AVX2 cores more than its attention's arithmetic. Here each (row, KV head) reads its
// keys and values once, straight from their pages, for all the query heads that share them.
// Built at run time by kernels/cpu_extension.py, into one library with int_gemv_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "avx2_vec.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

using tessera_avx2::hsum;
using tessera_avx2::load8;

// e^x for x <= 0 (a score less its row's max): 2^n * p(r) with r = x - n ln2, |r| <= ln2 / 2,
// and p the degree-6 Taylor polynomial (relative error ~1e-7). Below -87, e^-87 ~ 1.6e-38.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950409f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2's high part
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606820309417e-06f), r);     // and the rest
  __m256 p = _mm256_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) {
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  }
  const __m256i two_n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// The token-heads (`[page, slot, head]` flattened) of the keys first .. last - 1 of KV head
// `head`, walking the row's pages (a division per key would cost more than its dot products).
void token_heads(const int64_t* pages, int64_t first, int64_t last, int64_t page_size,
                 int64_t kv_heads, int64_t head, int64_t* out) {
  int64_t page = first / page_size, slot = first % page_size;
  for (int64_t t = first; t < last; ++t) {
    *out++ = (pages[page] * page_size + slot) * kv_heads + head;
    if (++slot == page_size) {
      slot = 0;
      ++page;
    }
  }
}

// scores[g][i] = q[g] . k_i for `G` query heads over the `n` keys at token-heads `rows`, two
// keys at a time: each key's 8 channels are converted once for all G heads, in 2G independent
// chains. Quantized keys (int8, fp8) are codes times their token-head's scale.
template <int G, typename T>
void score_keys(const T* k_pool, const c10::BFloat16* k_scales, const int64_t* rows, int64_t n,
                const float* q, int64_t dim, float* scores) {
  for (int64_t i = 0; i < n; i += 2) {
    const int keys = i + 1 < n ? 2 : 1;
    const T* k[2] = {k_pool + rows[i] * dim, k_pool + rows[i + keys - 1] * dim};
    __m256 acc[G][2];
    for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; d += 8) {
      const __m256 k0 = load8(k[0] + d), k1 = load8(k[1] + d);
      for (int g = 0; g < G; ++g) {
        const __m256 qd = load8(q + g * dim + d);
        acc[g][0] = _mm256_fmadd_ps(qd, k0, acc[g][0]);
        acc[g][1] = _mm256_fmadd_ps(qd, k1, acc[g][1]);
      }
    }
    for (int j = 0; j < keys; ++j) {
      const float key_scale = k_scales ? static_cast<float>(k_scales[rows[i + j]]) : 1.0f;
      for (int g = 0; g < G; ++g) scores[g * n + i + j] = hsum(acc[g][j]) * key_scale;
    }
  }
}

// out[g][d0 .. d0 + 15] = sum_i p[g][i] v_i[d0 ..] for `G` query heads (a quantized value's
// scale already folded into p): each value's channels converted once for all of them, the sums
// in registers across keys.
template <int G, typename T>
void weigh_values(const T* v_pool, const int64_t* rows, int64_t n, const float* p, int64_t d0,
                  int64_t dim, float* out) {
  __m256 acc[G][2];
  for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const T* v = v_pool + rows[i] * dim + d0;
    const __m256 v0 = load8(v), v1 = load8(v + 8);
    for (int g = 0; g < G; ++g) {
      const __m256 pg = _mm256_broadcast_ss(p + g * n + i);
      acc[g][0] = _mm256_fmadd_ps(pg, v0, acc[g][0]);
      acc[g][1] = _mm256_fmadd_ps(pg, v1, acc[g][1]);
    }
  }
  for (int g = 0; g < G; ++g) {
    _mm256_storeu_ps(out + g * dim + d0, acc[g][0]);
    _mm256_storeu_ps(out + g * dim + d0 + 8, acc[g][1]);
  }
}

// Each row of `scores[rows][n]` soft-capped (where softcap > 0) and turned into its softmax.
void softmax_rows(float* scores, int64_t rows, int64_t n, float softcap) {
  for (int64_t g = 0; g < rows; ++g) {
    float* s = scores + g * n;
    if (softcap > 0.0f) {
      for (int64_t i = 0; i < n; ++i) s[i] = softcap * std::tanh(s[i] / softcap);
    }
    const __m256 max = _mm256_set1_ps(*std::max_element(s, s + n));
    __m256 vsum = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + i), max));
      _mm256_storeu_ps(s + i, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (; i < n; ++i) {
      s[i] = std::exp(s[i] - _mm256_cvtss_f32(max));
      sum += s[i];
    }
    const float inv = 1.0f / sum;
    for (i = 0; i < n; ++i) s[i] *= inv;
  }
}

// Calls f.template operator()<G>() for G = min(4, group - g0) over group's chunks of 4 heads.
template <typename F>
void by_head_chunks(int64_t group, F&& f) {
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    switch (std::min<int64_t>(4, group - g0)) {
      case 1: f.template operator()<1>(g0); break;
      case 2: f.template operator()<2>(g0); break;
      case 3: f.template operator()<3>(g0); break;
      default: f.template operator()<4>(g0); break;
    }
  }
}

// A pool's codes and, quantized, a scale per token-head (null for a plain pool).
template <typename T>
struct Pool {
  const T* codes;
  const c10::BFloat16* scales;
};

// The `group` query heads `q[group, dim]` (scaled) that share one KV head, over the `n` keys
// and values at token-heads `rows`: softmax(q k^T) v into `out[group, dim]`; `scores` holds
// group * n.
template <typename T>
void attend(Pool<T> k, Pool<T> v, const int64_t* rows, int64_t n, int64_t group, int64_t dim,
            const float* q, float softcap, float* scores, float* out) {
  by_head_chunks(group, [&]<int G>(int64_t g0) {
    score_keys<G>(k.codes, k.scales, rows, n, q + g0 * dim, dim, scores + g0 * n);
  });
  softmax_rows(scores, group, n, softcap);
  if (v.scales) {  // sum_i p_i (s_i c_i) = sum_i (p_i s_i) c_i
    for (int64_t i = 0; i < n; ++i) {
      const float value_scale = static_cast<float>(v.scales[rows[i]]);
      for (int64_t g = 0; g < group; ++g) scores[g * n + i] *= value_scale;
    }
  }
  by_head_chunks(group, [&]<int G>(int64_t g0) {
    for (int64_t d0 = 0; d0 < dim; d0 += 16) {
      weigh_values<G>(v.codes, rows, n, scores + g0 * n, d0, dim, out + g0 * dim);
    }
  });
}

template <typename Q, typename T>
void decode_rows(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                 const c10::BFloat16* k_scales, const c10::BFloat16* v_scales,
                 const at::Tensor& block_table, const at::Tensor& seq_lens, float scale,
                 int64_t window, float softcap, at::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t page_size = k_pool.size(1), kv_heads = k_pool.size(2);
  const int64_t group = heads / kv_heads, table_width = block_table.size(1);
  const Q* qp = q.data_ptr<Q>();
  const Pool<T> k{k_pool.data_ptr<T>(), k_scales}, v{v_pool.data_ptr<T>(), v_scales};
  const int64_t* tp = block_table.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  Q* op = out.data_ptr<Q>();
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(group * dim), result(group * dim), scores;
    std::vector<int64_t> keys;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / kv_heads, head = item % kv_heads, len = lp[row];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0, n = len - first;
      const int64_t at = (row * heads + head * group) * dim;
      if (n == 0) {  // a padding row: nothing to attend to
        std::fill(op + at, op + at + group * dim, Q(0.0f));
        continue;
      }
      keys.resize(n);
      token_heads(tp + row * table_width, first, len, page_size, kv_heads, head, keys.data());
      for (int64_t i = 0; i < group * dim; ++i) scaled[i] = static_cast<float>(qp[at + i]) * scale;
      scores.resize(group * n);
      attend(k, v, keys.data(), n, group, dim, scaled.data(), softcap, scores.data(),
             result.data());
      for (int64_t i = 0; i < group * dim; ++i) op[at + i] = static_cast<Q>(result[i]);
    }
  });
}

// Every page a row reads lies inside the pool: a bad table fails here, never reads elsewhere.
void check_pages(const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t page_size,
                 int64_t num_pages) {
  const int64_t* tp = block_table.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  const int64_t width = block_table.size(1);
  for (int64_t row = 0; row < seq_lens.size(0); ++row) {
    const int64_t pages = (lp[row] + page_size - 1) / page_size;
    TORCH_CHECK(lp[row] >= 0 && pages <= width, "decode_attention: row ", row, "'s ", lp[row],
                " tokens exceed its block table's ", width, " pages");
    for (int64_t p = 0; p < pages; ++p) {
      TORCH_CHECK(tp[row * width + p] >= 0 && tp[row * width + p] < num_pages,
                  "decode_attention: page ", tp[row * width + p], " is not in the pool");
    }
  }
}

// A quantized pool's scales: bf16, one per token-head of `pool` ([pages, size, heads, 1]).
const c10::BFloat16* token_head_scales(const std::optional<at::Tensor>& scales,
                                       const at::Tensor& pool) {
  TORCH_CHECK(scales.has_value(), "decode_attention: an int8 or fp8 pool needs its scales");
  TORCH_CHECK(scales->scalar_type() == at::kBFloat16 && scales->is_contiguous()
              && scales->dim() == 4 && scales->size(3) == 1
              && scales->sizes().slice(0, 3) == pool.sizes().slice(0, 3),
              "decode_attention: scales are bf16 [pages, size, heads, 1], contiguous");
  return scales->data_ptr<c10::BFloat16>();
}

// q[B, H, D]; pools [pages, page_size, KvH, D] (bf16, fp16 or fp32; or int8 or fp8 codes with
// bf16 scales [pages, page_size, KvH, 1]); block_table[>= B, W]; seq_lens[B]. Row b attends to
// its keys max(0, len - window) .. len - 1 (all of them where window is 0), scores soft-capped
// where softcap > 0. The result has q's dtype.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_pool,
                            const at::Tensor& v_pool, const at::Tensor& block_table,
                            const at::Tensor& seq_lens, double scale, int64_t window,
                            double softcap, const std::optional<at::Tensor>& k_scales,
                            const std::optional<at::Tensor>& v_scales) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes(),
              "decode_attention: q is [rows, heads, dim], the pools [pages, size, heads, dim]");
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type() && k_pool.is_contiguous()
              && v_pool.is_contiguous(), "decode_attention: pools of one dtype, contiguous");
  const int64_t dim = q.size(2), kv_heads = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == dim && dim % 16 == 0 && q.size(1) % kv_heads == 0,
              "decode_attention: head dims must match and be a multiple of 16");
  TORCH_CHECK(seq_lens.size(0) == q.size(0) && block_table.dim() == 2
              && block_table.size(0) >= q.size(0), "decode_attention: one table row per query");
  const at::Tensor qc = q.contiguous();
  const at::Tensor table = block_table.to(at::kLong).contiguous();
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  check_pages(table, lens, k_pool.size(1), k_pool.size(0));
  at::Tensor out = at::empty_like(qc);
  const auto s = static_cast<float>(scale);
  const auto cap = static_cast<float>(softcap);
  auto with_pools = [&]<typename Q>() {
    auto run = [&]<typename T>(const c10::BFloat16* ks, const c10::BFloat16* vs) {
      decode_rows<Q, T>(qc, k_pool, v_pool, ks, vs, table, lens, s, window, cap, out);
    };
    const bool quantized = k_pool.scalar_type() == at::kChar
        || k_pool.scalar_type() == at::kFloat8_e4m3fn;
    TORCH_CHECK(quantized || (!k_scales && !v_scales),
                "decode_attention: scales belong to int8 or fp8 pools only");
    const c10::BFloat16* ks = quantized ? token_head_scales(k_scales, k_pool) : nullptr;
    const c10::BFloat16* vs = quantized ? token_head_scales(v_scales, v_pool) : nullptr;
    switch (k_pool.scalar_type()) {
      case at::kBFloat16: return run.template operator()<c10::BFloat16>(ks, vs);
      case at::kHalf: return run.template operator()<c10::Half>(ks, vs);
      case at::kFloat: return run.template operator()<float>(ks, vs);
      case at::kChar: return run.template operator()<int8_t>(ks, vs);
      case at::kFloat8_e4m3fn: return run.template operator()<c10::Float8_e4m3fn>(ks, vs);
      default:
        TORCH_CHECK(false, "decode_attention: pools of bf16, fp16, fp32, int8 or fp8, not ",
                    k_pool.scalar_type());
    }
  };
  switch (q.scalar_type()) {
    case at::kBFloat16: with_pools.template operator()<c10::BFloat16>(); break;
    case at::kHalf: with_pools.template operator()<c10::Half>(); break;
    case at::kFloat: with_pools.template operator()<float>(); break;
    default: TORCH_CHECK(false, "decode_attention: q of bf16, fp16 or fp32, not ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera, lib) {
  lib.def("decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_table, "
          "Tensor seq_lens, float scale, int window, float softcap, Tensor? k_scales=None, "
          "Tensor? v_scales=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tessera, CPU, lib) { lib.impl("decode_attention", &decode_attention); }
