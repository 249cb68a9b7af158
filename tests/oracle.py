"""The transformers oracle on the same GGUF weights (fp32, CPU), for token-exact comparisons."""
from functools import lru_cache

import torch

from engine.tokenizer import default_model_path


@lru_cache(maxsize=1)
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def greedy_tokens(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF greedy continuation; attention_mask passed so <|im_end|> (= pad id) is not masked."""
    ids = torch.tensor([prompt_ids])
    out = hf_model().generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              eos_token_id=None, pad_token_id=2)
    return out[0, len(prompt_ids):].tolist()


@torch.inference_mode()
def logits(token_ids: list[int]) -> torch.Tensor:
    """Logits `[len, vocab]` of the HF model over a full token sequence."""
    return hf_model()(torch.tensor([token_ids])).logits[0].float()


@torch.inference_mode()
def masked_logits(token_ids: list[int], visible: torch.Tensor) -> torch.Tensor:
    """Logits `[len, vocab]` when query i attends to key j only where `visible[i, j]` (a bool
    `[len, len]` mask, at the tokens' original positions): the reference for KV eviction."""
    ids = torch.tensor([token_ids])
    return hf_model()(ids, attention_mask=visible[None, None],
                      position_ids=torch.arange(len(token_ids))[None]).logits[0].float()


@torch.inference_mode()
def head_masked_logits(token_ids: list[int], visible: torch.Tensor) -> torch.Tensor:
    """`masked_logits` with a mask per layer and KV head, `visible[layers, kv_heads, len, len]`
    (each KV head's mask applies to its group of query heads), swapped into each layer's
    attention by a hook."""
    model = hf_model()
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    hooks = []
    for layer, mask in zip(model.model.layers, visible.repeat_interleave(group, 1)):
        def swap(module, args, kwargs, mask=mask):
            return args, {**kwargs, "attention_mask": mask[None]}
        hooks.append(layer.self_attn.register_forward_pre_hook(swap, with_kwargs=True))
    try:
        return masked_logits(token_ids, visible[0, 0])
    finally:
        for hook in hooks:
            hook.remove()
