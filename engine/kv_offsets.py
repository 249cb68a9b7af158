"""Key offsets: a constant per layer, KV head and channel that int4 pages subtract from keys.

Keys carry large per-channel offsets that hardly change from token to token. In an int4 page
every channel of a token-head group shares one step, set by the group's range, and the offset
widens that range without telling one token from another. Subtracting a constant from every
key changes no attention output: a query's scores all move by q . mu, which its softmax
ignores (engine/layers/attention.CenteredKV). Not under a score softcap (Gemma 2), where tanh
is not shift-invariant. Figures in kernels/kv_format.py.

The offsets are the mean key of one seeded prefill of random token ids at start-up, its first
token (an attention sink, far from the rest) left out: no text, no tokenizer, and the same
offsets on every engine of a model (a prefill engine's pages mean the same to its decode
engines). Random ids gave the perplexity 2,048 tokens of natural text gave. The mean key
depends on the positions it is taken over (rotary turns each channel pair with position), and
256 tokens made int4's perplexity hang on the seed: over GPL-3's first 8192 tokens in windows
of 1024, seeds 0, 1, 2 gave +3.2%, +5.6%, +5.2%; 1,024 tokens gave +4.2%, +4.3%, +4.5%.
"""
import torch

from engine.kv_cache import KVCache, KVCacheSpec
from engine.layers.attention import AttentionMetadata

CALIBRATION_TOKENS = 1024
SEED = 0


@torch.inference_mode()
def calibrate(model: torch.nn.Module, spec: KVCacheSpec, vocab_size: int, max_model_len: int,
              device: torch.device) -> list[torch.Tensor]:
    """Each layer's mean key, `[num_kv_heads, head_dim]` in `spec.dtype`, of a prefill written
    to a scratch cache of plain pages (every KV head, whatever the engine's pools)."""
    n = min(CALIBRATION_TOKENS, max_model_len)
    pages = -(-n // spec.page_size)
    plain = KVCacheSpec(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.page_size,
                        spec.dtype)
    scratch = KVCache(plain, pages, device)
    ids = torch.randint(vocab_size, (n,), generator=torch.Generator().manual_seed(SEED))
    positions, meta = AttentionMetadata.for_batch(
        torch.zeros(1, dtype=torch.int64, device=device), torch.tensor([n], device=device),
        torch.arange(pages, device=device).view(1, pages), spec.page_size, n, n)
    model(ids.to(device), positions, scratch.layers, meta)
    return [keys.flatten(0, 1)[1:n].float().mean(0).to(spec.dtype)
            for keys, _ in scratch.layers]
