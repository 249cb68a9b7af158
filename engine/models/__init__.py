"""Model classes by architecture: config.json's `architectures[0]` (or its `model_type`), or a
GGUF's `general.architecture`. Anything else is refused at start, before a weight is read."""
from torch import nn

from engine.models.gemma import GemmaForCausalLM
from engine.models.llama import LlamaForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
}
# A config without `architectures` names its model_type; a GGUF names its own architecture.
_ALIASES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
            "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
            "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "qwen3moe": "Qwen3MoeForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def model_class(architecture: str) -> type[nn.Module]:
    name = _ALIASES.get(architecture, architecture)
    if name not in MODELS:
        raise ValueError(f"unsupported model architecture {architecture!r}; Tessera serves "
                         f"{', '.join(MODELS)}")
    return MODELS[name]
