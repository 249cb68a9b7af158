// tessera::packed_expert_gemm: the W8A8 GEMMs of a mixture-of-experts layer's pairs, sorted by
// expert, over experts packed for oneDNN (kernels/reference.py's Int8Experts, pack_int8). Each
// expert's run of rows goes to oneDNN's matmul on its packed weight: the loop that
// reference.py's expert_gemm would run in Python, where slicing, selecting and calling cost
// ~200 us per layer call on two Zen 4 cores, about what two experts' GEMMs take at decode.
// Built at run time by kernels/cpu_extension.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace {

// onednn::qlinear_pointwise, called with its kernel's own signature (tensors by value): uint8
// activations with zero point 128, per-channel weight scales and no weight zero point; fp32
// output, no post-op.
at::Tensor qlinear(const at::Tensor& shifted, const at::Tensor& packed, const at::Tensor& scale,
                   const at::Tensor& no_zero_point) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("onednn::qlinear_pointwise", "")
          .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor,
                            std::optional<at::Tensor>, double, int64_t,
                            std::optional<at::ScalarType>, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, c10::string_view)>();
  return op.call(shifted, 1.0, 128, packed, scale, no_zero_point, std::nullopt, 1.0, 0,
                 at::kFloat, "none", c10::List<std::optional<at::Scalar>>(), "");
}

// fp32 `codes[P, K] @ W_e^T * scales[e]` for int8 `codes`, the pairs' rows sorted by expert
// (`counts[E]` of them each), `packed[E]` (pack_int8) and fp32 `scales[E, N]`.
at::Tensor packed_expert_gemm(const at::Tensor& codes, const at::Tensor& counts,
                              at::TensorList packed, const at::Tensor& scales) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar,
              "packed_expert_gemm: codes are int8 [P, K]");
  TORCH_CHECK(counts.dim() == 1 && counts.scalar_type() == at::kLong &&
                  counts.size(0) == static_cast<int64_t>(packed.size()) &&
                  scales.dim() == 2 && scales.size(0) == counts.size(0),
              "packed_expert_gemm: counts [E] (int64), E packed experts, scales [E, N]");
  const at::Tensor count = counts.contiguous();
  const int64_t* n = count.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t e = 0; e < count.size(0); ++e) {
    TORCH_CHECK(n[e] >= 0, "packed_expert_gemm: negative count");
    total += n[e];
  }
  TORCH_CHECK(total == codes.size(0), "packed_expert_gemm: counts sum to ", total,
              " pairs, codes have ", codes.size(0));
  // Flipping the sign bit adds 128: oneDNN's uint8 activations, its zero point taken off
  // exactly (its int8 activations take a slow path).
  const at::Tensor shifted = codes.view(at::kByte).bitwise_xor(128);
  const at::Tensor no_zero_point = at::zeros({1}, codes.options().dtype(at::kLong));
  std::vector<at::Tensor> products;
  int64_t start = 0;
  for (int64_t e = 0; e < count.size(0); ++e) {
    if (n[e] > 0) {
      products.push_back(
          qlinear(shifted.narrow(0, start, n[e]), packed[e], scales[e], no_zero_point));
    }
    start += n[e];
  }
  if (products.empty()) return at::empty({0, scales.size(1)}, codes.options().dtype(at::kFloat));
  return products.size() == 1 ? products[0] : at::cat(products);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tessera, lib) {
  lib.def("packed_expert_gemm(Tensor codes, Tensor counts, Tensor[] packed, Tensor scales) -> "
          "Tensor");
}

// The packed experts are oneDNN tensors (MkldnnCPU), which pick the kernel; CPU for the checks
// on empty lists.
TORCH_LIBRARY_IMPL(tessera, MkldnnCPU, lib) {
  lib.impl("packed_expert_gemm", &packed_expert_gemm);
}
TORCH_LIBRARY_IMPL(tessera, CPU, lib) { lib.impl("packed_expert_gemm", &packed_expert_gemm); }
