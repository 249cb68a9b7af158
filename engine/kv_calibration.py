"""Key calibration for int4 pages: an offset per layer, KV head and channel that keys lose, and
a reflection per layer and KV head that takes the queries' mean direction to the one direction
an int4 key group stores exactly.

Keys carry large per-channel offsets that hardly change from token to token. In an int4 page
every channel of a token-head group shares one step, set by the group's range, and the offset
widens that range without telling one token from another. Subtracting a constant from every
key changes no attention output: a query's scores all move by q . mu, which its softmax
ignores. Not under a score softcap (Gemma 2), where tanh is not shift-invariant: there the
offsets are zero, and the reflections alone apply.

Queries share a large common part: their mean holds about half of their energy (SmolLM2: 47%
to 56% in layer 10's KV heads, the next direction 3% to 4%). A key's rounding error reaches
a score as q . error, so most of it comes through that one direction. An int4 key group keeps
its mean exactly (`kernels.kv_format._mean_exact`): its rounding error is orthogonal to the
all-ones direction of the rotated page. A Householder reflection of queries and keys alike
(orthogonal: no score changes) takes the queries' mean direction to the direction that the
Hadamard rotation then turns into all-ones, so the queries' common part sees no rounding.

Both come from one seeded prefill of random token ids at start-up: the offsets are its mean
key, its first token (an attention sink, far from the rest) left out; the reflections follow
its mean query. No text, no tokenizer, and the same calibration on every engine of a model (a
prefill engine's pages mean the same to its decode engines). Random ids gave the perplexity
2,048 tokens of natural text gave. The mean key depends on the positions it is taken over
(rotary turns each channel pair with position), and 256 tokens made int4's perplexity hang on
the seed: over GPL-3's first 8192 tokens in windows of 1024, seeds 0, 1, 2 gave +3.2%, +5.6%,
+5.2%; 1,024 tokens gave +4.2%, +4.3%, +4.5%. Figures in kernels/kv_format.py.
"""
import torch

import kernels
from engine.kv_cache import KVCache, KVCacheSpec
from engine.layers.attention import AttentionMetadata, CalibratedKV, QueryProbe
from kernels.kv_format import rotatable

CALIBRATION_TOKENS = 1024
SEED = 0


@torch.inference_mode()
def calibrate(model: torch.nn.Module, spec: KVCacheSpec, layers: list, vocab_size: int,
              max_model_len: int, device: torch.device, centre: bool) -> list[CalibratedKV]:
    """`layers` (each layer's pools or `HeadSplit`) as `CalibratedKV`, calibrated by a prefill
    written to a scratch cache of plain pages (every KV head, whatever the engine's pools);
    their offsets zero unless `centre`."""
    n = min(CALIBRATION_TOKENS, max_model_len)
    pages = -(-n // spec.page_size)
    plain = KVCacheSpec(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.page_size,
                        spec.dtype)
    probes = [QueryProbe(pools) for pools in KVCache(plain, pages, device).layers]
    ids = torch.randint(vocab_size, (n,), generator=torch.Generator().manual_seed(SEED))
    positions, meta = AttentionMetadata.for_batch(
        torch.zeros(1, dtype=torch.int64, device=device), torch.tensor([n], device=device),
        torch.arange(pages, device=device).view(1, pages), spec.page_size, n, n)
    model(ids.to(device), positions, probes, meta)
    target = exact_direction(spec.head_dim, device)
    calibrated = []
    for inner, probe in zip(layers, probes):
        offset = probe.inner[0].flatten(0, 1)[1:n].float().mean(0)
        query = probe.query_means[0].view(spec.num_kv_heads, -1, spec.head_dim).mean(1)
        calibrated.append(CalibratedKV(inner, (offset if centre else 0 * offset).to(spec.dtype),
                                       _reflector(query, target)))
    return calibrated


def exact_direction(head_dim: int, device: torch.device) -> torch.Tensor:
    """The unit vector that a page's rotation (`paged_attention`) turns into all-ones / sqrt(D),
    which int4 key groups store exactly: the rotation is a symmetric orthonormal matrix."""
    ones = torch.ones(head_dim, device=device)
    return (kernels.rotate(ones, head_dim) if rotatable(head_dim) else ones) / head_dim ** 0.5


def _reflector(u: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Unit vectors r `[KvH, D]` whose reflections `x - 2 (x . r) r` take the directions of
    `u[KvH, D]` to `target`; zero (no reflection) where they are `target` already."""
    d = u / u.norm(dim=-1, keepdim=True) - target
    norm = d.norm(dim=-1, keepdim=True)
    return torch.where(norm > 1e-6, d / norm.clamp(min=1e-12), torch.zeros_like(d))
