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
#include <cstring>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using tessera_avx2::hmax;
using tessera_avx2::hsum;
using tessera_avx2::load8;
using tessera_avx2::sums8;

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

// int4 codes, two per byte: channel 2i in the low nibble, 2i + 1 in the high one.
struct Nibbles {
  uint8_t bits;
};

template <typename T>
constexpr int64_t kChannelsPerCode = std::is_same_v<T, Nibbles> ? 2 : 1;

// Channels d .. d + 7 of a token-head's codes.
template <typename T>
inline __m256 channels8(const T* codes, int64_t d) {
  return load8(codes + d);
}

template <>
inline __m256 channels8(const Nibbles* codes, int64_t d) {
  int32_t four;
  std::memcpy(&four, codes + d / 2, sizeof four);
  const __m128i bytes = _mm_cvtsi32_si128(four), low = _mm_set1_epi8(0x0f);
  const __m128i even = _mm_and_si128(bytes, low);
  const __m128i odd = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(even, odd)));
}

// How many keys ahead of the one being read the kernels prefetch: a row's pages lie anywhere in
// the pool, and the hardware's stride prefetcher starts over on each one.
constexpr int64_t kPrefetchAhead = 8;

// A pool's codes and, quantized, per token-head and group of `dim / groups` channels a scale
// and (int4) a zero point: a channel reads as code * scale + zero. Plain pools have neither.
template <typename T>
struct Pool {
  const T* codes;
  const c10::BFloat16* scales;
  const c10::BFloat16* zeros;
  int64_t groups;

  const T* token_head(int64_t th, int64_t dim) const {
    return codes + th * (dim / kChannelsPerCode<T>);
  }
  float scale(int64_t th, int64_t group) const {
    return scales ? static_cast<float>(scales[th * groups + group]) : 1.0f;
  }
  float zero(int64_t th, int64_t group) const {
    return zeros ? static_cast<float>(zeros[th * groups + group]) : 0.0f;
  }
  void prefetch(int64_t th, int64_t dim) const {
    const char* bytes = reinterpret_cast<const char*>(token_head(th, dim));
    for (int64_t b = 0; b < dim / kChannelsPerCode<T> * int64_t{sizeof(T)}; b += 64) {
      _mm_prefetch(bytes + b, _MM_HINT_T0);
    }
  }
};

// [x, y, x, y, x, y, x, y]: a value per key of a pair, in the lanes (2g + j) of `score_keys`.
inline __m256 pair_lanes(float x, float y) {
  return _mm256_unpacklo_ps(_mm256_set1_ps(x), _mm256_set1_ps(y));
}

// scores[g][i] = q[g] . k_i for `G` <= 4 query heads over the `n` keys at token-heads `rows`,
// two keys at a time: each key's 8 channels are converted once for all G heads, into 2G
// independent sums that `sums8` reduces together. A quantized key group adds
// scale * (q . codes) + zero * sum(q). The values of the keys ahead are fetched too.
template <int G, typename T>
void score_keys(const Pool<T>& k, const Pool<T>& v, const int64_t* rows, int64_t n,
                const float* q, int64_t dim, float* scores) {
  const int64_t width = dim / k.groups;
  std::vector<float> q_sums;  // [group][2g + j]: the sum of head g's channels in the group
  if (k.zeros) {
    q_sums.assign(k.groups * 8, 0.0f);
    for (int64_t group = 0; group < k.groups; ++group) {
      for (int g = 0; g < G; ++g) {
        const float* channels = q + g * dim + group * width;
        q_sums[group * 8 + 2 * g] = q_sums[group * 8 + 2 * g + 1] =
            std::accumulate(channels, channels + width, 0.0f);
      }
    }
  }
  for (int64_t i = 0; i < n; i += 2) {
    const int64_t pair[2] = {rows[i], rows[std::min(i + 1, n - 1)]};  // odd n: the last twice
    for (int64_t j = i + kPrefetchAhead; j < std::min(i + kPrefetchAhead + 2, n); ++j) {
      k.prefetch(rows[j], dim);
      v.prefetch(rows[j], dim);
    }
    const T* key[2] = {k.token_head(pair[0], dim), k.token_head(pair[1], dim)};
    __m256 total = _mm256_setzero_ps();  // lane 2g + j: head g, key i + j
    for (int64_t group = 0; group < k.groups; ++group) {
      __m256 acc[8];
      for (__m256& a : acc) a = _mm256_setzero_ps();
      for (int64_t d = group * width; d < (group + 1) * width; d += 8) {
        const __m256 k0 = channels8(key[0], d), k1 = channels8(key[1], d);
        for (int g = 0; g < G; ++g) {
          const __m256 qd = load8(q + g * dim + d);
          acc[2 * g] = _mm256_fmadd_ps(qd, k0, acc[2 * g]);
          acc[2 * g + 1] = _mm256_fmadd_ps(qd, k1, acc[2 * g + 1]);
        }
      }
      __m256 dots = sums8(acc);
      if (k.scales) {
        dots = _mm256_mul_ps(dots, pair_lanes(k.scale(pair[0], group), k.scale(pair[1], group)));
      }
      if (k.zeros) {
        dots = _mm256_fmadd_ps(pair_lanes(k.zero(pair[0], group), k.zero(pair[1], group)),
                               _mm256_loadu_ps(q_sums.data() + group * 8), dots);
      }
      total = _mm256_add_ps(total, dots);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, total);
    for (int g = 0; g < G; ++g) {
      scores[g * n + i] = lanes[2 * g];
      if (i + 1 < n) scores[g * n + i + 1] = lanes[2 * g + 1];
    }
  }
}

// Each row of `scores[rows][n]` soft-capped (where softcap > 0), less its max and
// exponentiated in place: softmax's numerators, whose total's inverse goes to `norm[row]`.
void exponentiate_rows(float* scores, int64_t rows, int64_t n, float softcap, float* norm) {
  for (int64_t g = 0; g < rows; ++g) {
    float* s = scores + g * n;
    if (softcap > 0.0f) {
      for (int64_t i = 0; i < n; ++i) s[i] = softcap * std::tanh(s[i] / softcap);
    }
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + i));
    float max = hmax(vmax);
    for (; i < n; ++i) max = std::max(max, s[i]);
    vmax = _mm256_set1_ps(max);
    __m256 vsum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + i), vmax));
      _mm256_storeu_ps(s + i, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (; i < n; ++i) {
      s[i] = std::exp(s[i] - max);
      sum += s[i];
    }
    norm[g] = 1.0f / sum;
  }
}

// sum_i a[i] * b[i]
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(load8(a + i), load8(b + i), acc);
  float sum = hsum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// What the values' codes in channel group `group` are weighed by: the numerators `e[heads][n]`
// times each value's scale (plain pools: `e` itself); `bias[h]` gets the numerators times the
// values' zero points, summed: what the zeros add to each of the group's channels. `scales`
// and `zeros` hold n floats each.
template <typename T>
const float* value_weights(const Pool<T>& v, const int64_t* rows, int64_t n, int64_t heads,
                           int64_t group, const float* e, float* scales, float* zeros,
                           float* weights, float* bias) {
  std::fill(bias, bias + heads, 0.0f);
  if (!v.scales) return e;
  for (int64_t i = 0; i < n; ++i) {
    scales[i] = v.scale(rows[i], group);
    zeros[i] = v.zero(rows[i], group);
  }
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < n; ++i) weights[h * n + i] = e[h * n + i] * scales[i];
    if (v.zeros) bias[h] = dot(e + h * n, zeros, n);
  }
  return weights;
}

// out[g][d0 .. d0 + 15] += sum_i w[g][i] v_i[d0 ..] over keys i0 .. i1 - 1 for `G` query
// heads: each value's channels converted once for all of them, the sums in registers.
template <int G, typename T>
void weigh_values(const Pool<T>& v, const int64_t* rows, int64_t i0, int64_t i1, int64_t n,
                  const float* w, int64_t d0, int64_t dim, float* out) {
  __m256 acc[G][2];
  for (int g = 0; g < G; ++g) {
    acc[g][0] = _mm256_loadu_ps(out + g * dim + d0);
    acc[g][1] = _mm256_loadu_ps(out + g * dim + d0 + 8);
  }
  for (int64_t i = i0; i < i1; ++i) {
    const T* codes = v.token_head(rows[i], dim);
    const __m256 v0 = channels8(codes, d0), v1 = channels8(codes, d0 + 8);
    for (int g = 0; g < G; ++g) {
      const __m256 wg = _mm256_broadcast_ss(w + g * n + i);
      acc[g][0] = _mm256_fmadd_ps(wg, v0, acc[g][0]);
      acc[g][1] = _mm256_fmadd_ps(wg, v1, acc[g][1]);
    }
  }
  for (int g = 0; g < G; ++g) {
    _mm256_storeu_ps(out + g * dim + d0, acc[g][0]);
    _mm256_storeu_ps(out + g * dim + d0 + 8, acc[g][1]);
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

// One thread's buffers, sized for `group` query heads over `n` keys.
struct Scratch {
  std::vector<float> q, out, scores, weights, bias, norm, scales, zeros;
  std::vector<int64_t> keys;

  Scratch(int64_t group, int64_t dim)
      : q(group * dim), out(group * dim), bias(group), norm(group) {}
  void fit(int64_t group, int64_t n) {
    keys.resize(n);
    scales.resize(n);
    zeros.resize(n);
    scores.resize(group * n);
    weights.resize(group * n);
  }
};

// The `group` query heads `s.q[group, dim]` (scaled) that share one KV head, over the `n` keys
// and values at token-heads `s.keys`: softmax(q k^T) v into `s.out[group, dim]`.
template <typename T>
void attend(const Pool<T>& k, const Pool<T>& v, int64_t n, int64_t group, int64_t dim,
            float softcap, Scratch& s) {
  const int64_t* rows = s.keys.data();
  by_head_chunks(group, [&]<int G>(int64_t g0) {
    score_keys<G>(k, v, rows, n, s.q.data() + g0 * dim, dim, s.scores.data() + g0 * n);
  });
  exponentiate_rows(s.scores.data(), group, n, softcap, s.norm.data());
  std::fill(s.out.begin(), s.out.end(), 0.0f);
  const int64_t width = dim / v.groups;
  // Keys in blocks of ~16 KB of values, which stay in L1 over a block's passes of 16 channels.
  const int64_t block = std::max<int64_t>(16, 16384 * kChannelsPerCode<T> / (dim * sizeof(T)));
  for (int64_t vgroup = 0; vgroup < v.groups; ++vgroup) {
    const float* w = value_weights(v, rows, n, group, vgroup, s.scores.data(), s.scales.data(),
                                   s.zeros.data(), s.weights.data(), s.bias.data());
    for (int64_t i0 = 0; i0 < n; i0 += block) {
      by_head_chunks(group, [&]<int G>(int64_t g0) {
        for (int64_t d0 = vgroup * width; d0 < (vgroup + 1) * width; d0 += 16) {
          weigh_values<G>(v, rows, i0, std::min(i0 + block, n), n, w + g0 * n, d0, dim,
                          s.out.data() + g0 * dim);
        }
      });
    }
    for (int64_t h = 0; h < group; ++h) {
      float* channels = s.out.data() + h * dim + vgroup * width;
      for (int64_t c = 0; c < width; ++c) channels[c] = (channels[c] + s.bias[h]) * s.norm[h];
    }
  }
}

template <typename Q, typename T>
void decode_rows(const at::Tensor& q, const Pool<T>& k, const Pool<T>& v, int64_t page_size,
                 int64_t kv_heads, const at::Tensor& block_table, const at::Tensor& seq_lens,
                 float scale, int64_t window, float softcap, at::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t group = heads / kv_heads, table_width = block_table.size(1);
  const Q* qp = q.data_ptr<Q>();
  const int64_t* tp = block_table.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  Q* op = out.data_ptr<Q>();
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch s(group, dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / kv_heads, head = item % kv_heads, len = lp[row];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0, n = len - first;
      const int64_t at = (row * heads + head * group) * dim;
      if (n == 0) {  // a padding row: nothing to attend to
        std::fill(op + at, op + at + group * dim, Q(0.0f));
        continue;
      }
      s.fit(group, n);
      token_heads(tp + row * table_width, first, len, page_size, kv_heads, head, s.keys.data());
      for (int64_t i = 0; i < group * dim; ++i) s.q[i] = static_cast<float>(qp[at + i]) * scale;
      attend(k, v, n, group, dim, softcap, s);
      for (int64_t i = 0; i < group * dim; ++i) op[at + i] = static_cast<Q>(s.out[i]);
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

// A quantized pool's scales or zero points: bf16 `[pages, size, heads, groups]`, contiguous.
const c10::BFloat16* per_group(const at::Tensor& t, const at::Tensor& codes, int64_t groups) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.dim() == 4
              && t.sizes().slice(0, 3) == codes.sizes().slice(0, 3) && t.size(3) == groups,
              "decode_attention: scales and zero points are bf16 [pages, size, heads, groups], "
              "contiguous, the same for keys and values");
  return t.data_ptr<c10::BFloat16>();
}

// q[B, H, D]; pools [pages, page_size, KvH, D] of bf16, fp16 or fp32, or of quantized codes
// (kernels/kv_format.py) with their bf16 scales [pages, page_size, KvH, groups]: int8 or fp8
// (one group), or int4 ([..., D / 2] bytes of two codes, and zero points beside the scales).
// block_table[>= B, W]; seq_lens[B]. Row b attends to its keys max(0, len - window) .. len - 1
// (all of them where window is 0), scores soft-capped where softcap > 0. The result has q's
// dtype.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_pool,
                            const at::Tensor& v_pool, const at::Tensor& block_table,
                            const at::Tensor& seq_lens, double scale, int64_t window,
                            double softcap, const std::optional<at::Tensor>& k_scales,
                            const std::optional<at::Tensor>& v_scales,
                            const std::optional<at::Tensor>& k_zeros,
                            const std::optional<at::Tensor>& v_zeros) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes(),
              "decode_attention: q is [rows, heads, dim], the pools [pages, size, heads, dim]");
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type() && k_pool.is_contiguous()
              && v_pool.is_contiguous(), "decode_attention: pools of one dtype, contiguous");
  const at::ScalarType codes = k_pool.scalar_type();
  const bool int4 = codes == at::kByte;
  const bool quantized = int4 || codes == at::kChar || codes == at::kFloat8_e4m3fn;
  const int64_t dim = q.size(2), kv_heads = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) * (int4 ? 2 : 1) == dim && dim % 16 == 0
              && q.size(1) % kv_heads == 0,
              "decode_attention: head dims must match and be a multiple of 16");
  TORCH_CHECK(seq_lens.size(0) == q.size(0) && block_table.dim() == 2
              && block_table.size(0) >= q.size(0), "decode_attention: one table row per query");
  TORCH_CHECK(quantized == (k_scales && v_scales) && int4 == (k_zeros && v_zeros)
              && (int4 || !(k_zeros || v_zeros)) && (quantized || !(k_scales || v_scales)),
              "decode_attention: int8, fp8 and int4 pools come with their scales, int4 with its "
              "zero points too, plain pools with neither");
  const int64_t groups = quantized ? k_scales->size(-1) : 1;
  TORCH_CHECK(groups > 0 && dim % groups == 0 && (dim / groups) % 16 == 0
              && (int4 || groups == 1),
              "decode_attention: groups of a multiple of 16 channels (one but for int4)");
  const at::Tensor qc = q.contiguous();
  const at::Tensor table = block_table.to(at::kLong).contiguous();
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  check_pages(table, lens, k_pool.size(1), k_pool.size(0));
  at::Tensor out = at::empty_like(qc);
  const auto s = static_cast<float>(scale);
  const auto cap = static_cast<float>(softcap);
  auto with_pools = [&]<typename Q>() {
    auto run = [&]<typename T>() {
      auto pool = [&](const at::Tensor& codes, const std::optional<at::Tensor>& scales,
                      const std::optional<at::Tensor>& zeros) {
        return Pool<T>{static_cast<const T*>(codes.data_ptr()),
                       quantized ? per_group(*scales, codes, groups) : nullptr,
                       int4 ? per_group(*zeros, codes, groups) : nullptr, groups};
      };
      decode_rows<Q, T>(qc, pool(k_pool, k_scales, k_zeros), pool(v_pool, v_scales, v_zeros),
                        k_pool.size(1), kv_heads, table, lens, s, window, cap, out);
    };
    switch (codes) {
      case at::kBFloat16: return run.template operator()<c10::BFloat16>();
      case at::kHalf: return run.template operator()<c10::Half>();
      case at::kFloat: return run.template operator()<float>();
      case at::kChar: return run.template operator()<int8_t>();
      case at::kFloat8_e4m3fn: return run.template operator()<c10::Float8_e4m3fn>();
      case at::kByte: return run.template operator()<Nibbles>();
      default:
        TORCH_CHECK(false, "decode_attention: pools of bf16, fp16, fp32, int8, fp8 or int4 "
                    "(uint8), not ", codes);
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
          "Tensor? v_scales=None, Tensor? k_zeros=None, Tensor? v_zeros=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tessera, CPU, lib) { lib.impl("decode_attention", &decode_attention); }
