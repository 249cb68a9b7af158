"""`tessera quantize MODEL --scheme w8a8|w4a16|fp8 --out DIR`: a compressed-tensors checkpoint
(what llm-compressor writes and vLLM and Tessera load) from a float model or a GGUF.

Calibration runs a text (default GPL-3, read at run time) through the model one decoder layer
at a time, so a model needs only one layer's weights and the calibration activations in
memory besides what its source holds: an HF directory is read tensor by tensor (an 8B model
quantizes in a few GiB), a GGUF is dequantized whole by transformers first (GGUFs are small).
Each layer is calibrated on what the layers before it give once quantized (GPTQ's sequential
calibration: SmolLM2 w4a16 perplexity 19.95 against 20.45 on the dense model's activations;
calibrating each group of linears after the groups before it in the layer, 20.07, was no
better); per layer:
- w8a8: SmoothQuant. Per input channel `s = max|X|^a / max|W|^(1-a)`, folded into the RMSNorm
  before q|k|v and before gate|up and into up_proj's rows before down_proj, then int8 per
  output channel; activations are int8 per token at run time. The strength `a` is
  `--smoothing-strength`, or by default, per activation, the one of `SMOOTHING_STRENGTHS` (or
  none) whose W8A8 output error is least on a sample of the calibration rows.
- w4a16: int4 in groups of `--group-size` input columns with a zero point each (the range
  from the group's min to its max: SmolLM2 perplexity +1.74% over dense, against +4.03% with
  `--symmetric`), each group's range clipped to the ratio whose rounding error costs the
  layer's output least on the calibration activations (`--no-search`: full ranges). AWQ's activation-aware scaling, tried as well,
  made SmolLM2 worse (perplexity 21.10 vs 20.96 with GPTQ, 24.19 vs 23.31 without) and is not
  done.
- fp8: e4m3 per output channel, dynamic per-token activations; needs no calibration.
Both integer schemes then round column by column with GPTQ's error compensation over the
layer's input Hessian `X^T X`, in act-order with static groups unless `--no-act-order`
(SmolLM2 w4a16 perplexity 20.45 vs 20.96 in order), unless `--no-gptq` (each weight to its
nearest code):
`--no-search --no-gptq` is plain round-to-nearest (SmoothQuant at 0.5 for w8a8)
(engine/quant_math.py).
Token embedding, LM head and norms stay in `--dtype`. The output is sharded one file per layer
with an index, so it is written as it goes.

Llama-family decoders only (Llama, Mistral, Qwen2, Qwen3); the layer forward is transformers'
own, on CPU in fp32.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from engine.quant_math import (INT4, INT4_ASYMMETRIC, INT8, fp8_per_channel, gptq_factor,
                               quantize_groups, smooth_factors, smoothing_errors)
from engine.tokenizer import load_tokenizer

DEFAULT_CALIBRATION = "/usr/share/common-licenses/GPL-3"
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# SmoothQuant strengths tried per activation (beside no smoothing) when --smoothing-strength
# is not given; SmolLM2 w8a8 perplexity +0.84% searched, +1.7% at 0.5 (GPL-3, README).
SMOOTHING_STRENGTHS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_SMOOTHING = 0.5  # with --no-search
SAMPLE_ROWS = 1024  # calibration rows the search multiplies, per activation
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The linears of a decoder layer by the activation they read: (linears, the norm before them).
# The last group's smoothing folds into up_proj's rows instead of a norm.
_INPUTS = ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
           (("self_attn.o_proj",), None),
           (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
           (("mlp.down_proj",), "mlp.up_proj"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tessera quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF model directory (safetensors) or GGUF file")
    p.add_argument("--scheme", required=True, choices=["w8a8", "w4a16", "fp8"])
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--group-size", type=int, default=64,
                   help="w4a16: input columns per scale (default %(default)s)")
    p.add_argument("--symmetric", action="store_true",
                   help="w4a16: no zero points, each group's range symmetric about 0 "
                        "(compressed-tensors' W4A16; by default W4A16_ASYM, a zero point per "
                        "group and the range from the group's min to its max)")
    p.add_argument("--no-search", dest="search", action="store_false",
                   help="w4a16: no clip search (groups scaled to their full range); w8a8: no "
                        "smoothing-strength search (0.5 unless --smoothing-strength)")
    p.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="GPTQ in input order, each group's scale chosen as it begins, instead "
                        "of columns by decreasing input energy with every scale chosen first")
    p.add_argument("--no-gptq", dest="gptq", action="store_false",
                   help="w8a8, w4a16: round each weight to its nearest code, without GPTQ's "
                        "error compensation")
    p.add_argument("--smoothing-strength", type=float, default=None,
                   help="w8a8: SmoothQuant migration strength alpha (default: searched per "
                        "activation)")
    p.add_argument("--calibration-file", default=DEFAULT_CALIBRATION,
                   help="text the activations are taken from (default %(default)s)")
    # SmolLM2 w4a16 perplexity 19.67 with 8192 (all of GPL-3's 7658), 19.95 with 4096.
    p.add_argument("--calibration-tokens", type=int, default=8192,
                   help="tokens of it used (default %(default)s)")
    p.add_argument("--sequence-length", type=int, default=512,
                   help="tokens per calibration sequence (default %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES),
                   help="dtype of what stays float, and of w4a16 scales (default %(default)s)")
    args = p.parse_args(argv)
    if not Path(args.model).exists():
        p.error(f"model not found: {args.model}")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} exists and is not empty")
    if args.group_size not in (32, 64, 128):
        p.error("--group-size must be 32, 64 or 128")
    if args.smoothing_strength is not None and not 0 <= args.smoothing_strength <= 1:
        p.error("--smoothing-strength must be within 0..1")
    if args.calibration_tokens < args.sequence_length or args.sequence_length < 2:
        p.error("need --calibration-tokens >= --sequence-length >= 2")
    return args


class Source:
    """The model being quantized: its transformers config, tokenizer and tensors by HF name."""

    def __init__(self, path: Path):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.tokenizer = load_tokenizer(str(path))  # the serving engine's cached conversion
        self.path = path
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32)
            self.config, self.generation_config = model.config, model.generation_config
            self._tensors = dict(model.state_dict())
            self._files = {}
        else:
            from safetensors import safe_open

            self.config, self.generation_config = AutoConfig.from_pretrained(str(path)), None
            self._tensors, self._files = {}, {}
            for f in sorted(path.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as st:
                    self._files |= dict.fromkeys(st.keys(), f)
        self.config.architectures = self.config.architectures or [
            f"{type(self.config).__name__.removesuffix('Config')}ForCausalLM"]

    def names(self) -> list[str]:
        return list(self._tensors or self._files)

    def tensor(self, name: str) -> torch.Tensor:
        if name in self._tensors:
            return self._tensors.pop(name)  # each is read once: free it as it goes
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt") as st:
            return st.get_tensor(name).float()

    def save_extras(self, out: Path) -> None:
        """Tokenizer files and the generation config beside the weights."""
        self.tokenizer.save_pretrained(str(out))
        if self.generation_config is not None:
            self.generation_config.save_pretrained(str(out))
        elif (self.path / "generation_config.json").exists():
            shutil.copy(self.path / "generation_config.json", out)


def calibration_batch(tokenizer, file: str, num_tokens: int, seq_len: int) -> torch.Tensor:
    """The file's first `num_tokens` tokens (fewer if it is shorter) as `[B, seq_len]`."""
    ids = tokenizer(Path(file).read_text(), add_special_tokens=False)["input_ids"][:num_tokens]
    rows = len(ids) // seq_len
    if rows == 0:
        raise SystemExit(f"tessera quantize: {file} has {len(ids)} tokens, fewer than "
                         f"--sequence-length {seq_len}")
    return torch.tensor(ids[:rows * seq_len]).view(rows, seq_len)


class _InputStats:
    """Per-channel max |x|, the Hessian `X^T X` and a sample of the rows of one linear's
    input."""

    def __init__(self, hessian: bool, sample_rows: int):
        self.absmax = None
        self.hessian = 0 if hessian else None
        self.sample_rows, self.samples = sample_rows, []

    def __call__(self, module, args) -> None:
        x = args[0].detach().float().flatten(0, -2)
        absmax = x.abs().amax(0)
        self.absmax = absmax if self.absmax is None else torch.maximum(self.absmax, absmax)
        if self.hessian is not None:
            self.hessian = self.hessian + x.T @ x
        if self.sample_rows:
            self.samples.append(x[::max(1, x.shape[0] // self.sample_rows)])


def _module(layer: torch.nn.Module, name: str) -> torch.nn.Module:
    return layer.get_submodule(name)


def _smoothing(stat: _InputStats, weights: list[torch.Tensor], args) -> torch.Tensor:
    """SmoothQuant's factor per input channel (inputs `/ s`, weights `* s`): at
    `--smoothing-strength`, or by default at the strength of `SMOOTHING_STRENGTHS` (or none)
    whose W8A8 output error is least on a sample of the calibration rows."""
    if not _searches(args):
        alpha = args.smoothing_strength
        return smooth_factors(stat.absmax, weights, DEFAULT_SMOOTHING if alpha is None else alpha)
    x = torch.cat(stat.samples)
    candidates = [torch.ones_like(stat.absmax)] + [
        smooth_factors(stat.absmax, weights, a) for a in SMOOTHING_STRENGTHS]
    errors = smoothing_errors(x, weights, candidates)
    return candidates[errors.index(min(errors))]


def _smooth(layer: torch.nn.Module, stats: dict, args) -> None:
    """Fold SmoothQuant factors into each activation's producer (a norm or up_proj) and its
    readers' weights, and rescale the activation's Hessian to the smoothed one."""
    for linears, producer in _INPUTS:
        if producer is None:
            continue
        weights = [_module(layer, n).weight.data for n in linears]
        stat = stats[linears[0]]
        s = _smoothing(stat, weights, args)
        for w in weights:
            w.mul_(s)
        target = _module(layer, producer)
        if producer.endswith("norm"):
            target.weight.data.div_(s)
        else:
            target.weight.data.div_(s[:, None])  # up_proj's output rows feed down_proj
        if stat.hessian is not None:
            stat.hessian = stat.hessian / (s[:, None] * s[None, :])


def _compressed(w: torch.Tensor, args, hessian: torch.Tensor | None,
                factor: torch.Tensor | None, order: torch.Tensor | None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One linear's checkpoint tensors, by suffix (`factor`: GPTQ's, of `hessian` in
    `order`), and the weight they stand for."""
    if args.scheme == "fp8":
        codes, scale = fp8_per_channel(w)
        return {"weight": codes, "weight_scale": scale}, codes.float() * scale
    if args.scheme == "w8a8":
        codes, scale, _ = quantize_groups(w, INT8, w.shape[1], hessian, gptq_factor=factor,
                                       clip_search=False, scale_dtype=torch.float32,
                                       order=order)
        return {"weight": codes, "weight_scale": scale}, codes.float() * scale
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    fmt = INT4 if args.symmetric else INT4_ASYMMETRIC
    codes, scales, zeros = quantize_groups(w, fmt, args.group_size, hessian, gptq_factor=factor,
                                           clip_search=args.search,
                                           scale_dtype=_DTYPES[args.dtype], order=order)
    tensors = {"weight_packed": pack_to_int32(codes, 4), "weight_scale": scales,
               "weight_shape": torch.tensor(w.shape)}
    if zeros is not None:
        tensors["weight_zero_point"] = pack_to_int32(zeros, 4, packed_dim=0)
        codes = codes.float() - zeros.float().repeat_interleave(args.group_size, 1)
    return tensors, codes.float() * scales.float().repeat_interleave(args.group_size, 1)


def _searches(args) -> bool:
    """Whether w8a8's smoothing strength is searched."""
    return args.scheme == "w8a8" and args.search and args.smoothing_strength is None


def quantize_layer(layer: torch.nn.Module, hidden: torch.Tensor, position_embeddings,
                   args) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A decoder layer's checkpoint tensors (local names), and its output on `hidden` with the
    quantized weights. `hidden` is what the quantized layers before this one give (GPTQ's
    sequential calibration), so each layer's error compensation covers theirs too."""
    linears = [n for names, _ in _INPUTS for n in names]
    for n in linears:
        k = _module(layer, n).in_features
        if args.scheme == "w4a16" and k % args.group_size:
            raise SystemExit(f"tessera quantize: {n} has {k} input columns, not a multiple of "
                             f"--group-size {args.group_size}")
    stats = {}
    hooks = []
    if args.scheme != "fp8":
        hessian = args.gptq or (args.scheme == "w4a16" and args.search)
        for names, _ in _INPUTS:
            stats[names[0]] = _InputStats(hessian, SAMPLE_ROWS if _searches(args) else 0)
            hooks.append(_module(layer, names[0]).register_forward_pre_hook(stats[names[0]]))
    with torch.inference_mode():
        layer(hidden, position_embeddings=position_embeddings)
    for hook in hooks:
        hook.remove()
    if args.scheme == "w8a8":
        _smooth(layer, stats, args)
    tensors = {}
    for names, _ in _INPUTS:
        hessian = stats[names[0]].hessian if names[0] in stats else None
        factor = order = None
        if args.gptq and hessian is not None:
            if args.act_order:  # columns by how much input they see, most first
                order = torch.argsort(hessian.diagonal(), descending=True)
                factor = gptq_factor(hessian[order][:, order])
            else:
                factor = gptq_factor(hessian)
        for n in names:
            w = _module(layer, n).weight.data
            compressed, dequantized = _compressed(w, args, hessian, factor, order)
            tensors |= {f"{n}.{suffix}": t for suffix, t in compressed.items()}
            w.copy_(dequantized)
    dtype = _DTYPES[args.dtype]
    for name, t in layer.state_dict().items():
        if name.removesuffix(".weight") not in linears:
            tensors[name] = t.to(dtype)
    with torch.inference_mode():  # the next layer calibrates on what this one will give
        out = layer(hidden, position_embeddings=position_embeddings)
    return tensors, out


def quantization_config(args) -> dict:
    """config.json's `quantization_config`, built with compressed-tensors' own models."""
    import compressed_tensors
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme,
                                                 preset_name_to_scheme)

    preset = {"w8a8": "W8A8", "w4a16": "W4A16" if args.symmetric else "W4A16_ASYM",
              "fp8": "FP8_DYNAMIC"}[args.scheme]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if args.scheme == "w4a16":
        scheme.weights.group_size = args.group_size
    fmt = {"w8a8": "int-quantized", "w4a16": "pack-quantized", "fp8": "float-quantized"}
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme.model_validate(
        scheme.model_dump())}, format=fmt[args.scheme], ignore=["lm_head"],
        quantization_status="compressed")
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            **config.model_dump(exclude=["quant_method"], mode="json")}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM

    start = time.monotonic()
    qconfig = quantization_config(args)  # first: a library mismatch fails before any work
    source = Source(Path(args.model))
    config = source.config
    if config.model_type not in MODEL_TYPES or getattr(config, "num_local_experts", None):
        raise SystemExit(f"tessera quantize: {config.model_type} models are not supported "
                         f"(supported: {', '.join(MODEL_TYPES)}, without experts)")
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rotary = type(skeleton.model.rotary_emb)(config=config)
    ids = calibration_batch(source.tokenizer, args.calibration_file, args.calibration_tokens,
                            args.sequence_length)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    n_layers = config.num_hidden_layers
    weight_map = {}

    def write(tensors: dict[str, torch.Tensor], index: int) -> None:
        name = f"model-{index:05d}-of-{n_layers + 1:05d}.safetensors"
        _save(tensors, out / name)
        weight_map.update(dict.fromkeys(tensors, name))

    embed = source.tensor("model.embed_tokens.weight")
    top = {"model.embed_tokens.weight": embed}
    hidden = torch.nn.functional.embedding(ids, embed)
    position_embeddings = rotary(hidden, torch.arange(ids.shape[1]).expand(ids.shape))
    for i in range(n_layers):
        layer = skeleton.model.layers[i].to_empty(device="cpu")
        prefix = f"model.layers.{i}."
        layer.load_state_dict({k: source.tensor(prefix + k) for k in layer.state_dict()})
        tensors, hidden = quantize_layer(layer, hidden, position_embeddings, args)
        write({prefix + k: v for k, v in tensors.items()}, i + 1)
        skeleton.model.layers[i] = torch.nn.Identity()  # frees the layer
        print(f"tessera quantize: {i + 1}/{n_layers} layers ({time.monotonic() - start:.0f} s)",
              file=sys.stderr, flush=True)
    dtype = _DTYPES[args.dtype]
    for name in source.names():
        tied = name == "lm_head.weight" and config.tie_word_embeddings
        if not name.startswith("model.layers.") and "rotary_emb" not in name \
                and name not in top and not tied:
            top[name] = source.tensor(name)
    write({k: v.to(dtype) for k, v in top.items()}, n_layers + 1)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}, indent=2))
    config_dict = config.to_dict()
    config_dict.pop("_attn_implementation_autoset", None)
    config_dict |= {"dtype": args.dtype, "torch_dtype": args.dtype,
                    "quantization_config": qconfig}
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    source.save_extras(out)
    print(f"tessera quantize: wrote {args.scheme} checkpoint to {out} in "
          f"{time.monotonic() - start:.0f} s", file=sys.stderr)

