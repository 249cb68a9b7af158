"""Quantized checkpoints: `tessera quantize` writes compressed-tensors files that the library
itself reads back to Tessera's weights; Tessera serves them near the dense model; AWQ and GPTQ
layouts of the same weights load to the same weights and tokens.

The packing orders are checked against fixed words from the formats' descriptions, not
against this file's packers: AutoAWQ packs 8 output columns per int32 with nibble i holding
column [0, 2, 4, 6, 1, 3, 5, 7][i] (`awq/utils/packing_utils.py`, vLLM's AWQ dequantizer
undoes it with [0, 4, 1, 5, 2, 6, 3, 7]); GPTQ packs 8 consecutive input rows per int32, row
8j + i in nibble i, and v1 files store each zero point minus one; compressed-tensors packs 8
consecutive values along the last dimension, value + 8 in nibble i.
"""
import contextlib
import io
import json
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine import loader
from engine.config import ModelConfig
from engine.layers.linear import Linear
from engine.layers.quantization import get_linear_method
from engine.layers.quantization.checkpoint import (AWQ_PACK_ORDER, Int4Weight, assemble,
                                                   checkpoint_scheme, pack_nibbles,
                                                   unpack_nibbles)
from engine.quantize import main as quantize
from engine.tokenizer import default_model_path
from tests import oracle

pytestmark = pytest.mark.timeout(900)

# Calibration kept small so the suite stays short; the figures in the README use the defaults.
CALIBRATION = ["--calibration-tokens", "1024", "--sequence-length", "256"]
PROMPTS = ["The GNU General Public License is a", "Write one sentence about the sea."]
MAX_TOKENS = 24
# Largest and mean log-prob gap, under the dense model, between its own greedy choice and the
# token the quantized model chose, teacher-forced (nats). Measured 2026-12-02 with the
# calibration above (48 tokens each), sequential: w8a8 max 0.63 mean 0.017, w4a16 max 2.25
# mean 0.22 (symmetric; with zero points, the default since 2026-12-03, it stays within),
# fp8 max 0.86 mean 0.04.
MARGINS = {"w8a8": (1.5, 0.1), "w4a16": (4.5, 0.5), "fp8": (2.0, 0.15)}


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    """The default model as an HF safetensors directory (the path an 8B model takes: read
    tensor by tensor), written from transformers' reading of the GGUF, in fp32: the weights
    `tessera quantize` reads from the GGUF itself, without parsing it again per checkpoint."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    source = tmp_path_factory.mktemp("hf")
    model = oracle.hf_model()
    save_file({name: t.contiguous() for name, t in model.state_dict().items()
               if name != "lm_head.weight"}, str(source / "model.safetensors"))  # tied
    config = model.config.to_dict()
    del config["quantization_config"]  # transformers' note that it came from a GGUF
    config |= {"architectures": ["LlamaForCausalLM"], "dtype": "float32"}
    (source / "config.json").write_text(json.dumps(config))
    path = default_model_path()
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(
        str(source))
    return source


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, hf_directory):
    """Round-to-nearest w4a16 straight from the GGUF; the others from the same weights in
    `hf_directory`. `w4a16-symmetric` (no zero points) is round-to-nearest too: its format is
    what is checked."""
    rtn = ["--scheme", "w4a16", "--no-search", "--no-gptq"]
    out = {}
    for name, source, args in (
            ("w4a16", hf_directory, ["--scheme", "w4a16"]),
            ("w8a8", hf_directory, ["--scheme", "w8a8"]),
            ("w4a16-rtn", default_model_path(), rtn),
            ("w4a16-symmetric", hf_directory, [*rtn, "--symmetric"]),
            ("fp8", hf_directory, ["--scheme", "fp8"])):
        out[name] = tmp_path_factory.mktemp(name)
        quantize([str(source), *args, "--out", str(out[name]), *CALIBRATION])
    return out


def tessera_weights(path) -> dict:
    """What Tessera's loader makes of a checkpoint's tensors, by HF name."""
    weights, _ = loader._safetensors_weights(path)
    scheme = checkpoint_scheme(json.loads((path / "config.json").read_text()))
    return dict(assemble(weights, scheme))


def dequantized(w) -> torch.Tensor:
    if isinstance(w, Int4Weight):
        return w.dequantize()
    return w.codes.float() * w.scales[:, None]


def test_pack_orders_match_the_format_descriptions():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    values = torch.arange(8, dtype=torch.uint8)
    awq_word, sequential_word = 0x75316420, 0x76543210
    assert unpack_nibbles(torch.tensor([[awq_word]], dtype=torch.int32),
                          AWQ_PACK_ORDER)[0].tolist() == values.tolist()
    assert unpack_nibbles(torch.tensor([[sequential_word]], dtype=torch.int32))[0].tolist() \
        == values.tolist()
    library = pack_to_int32(values[None].to(torch.int8) - 8, 4)  # signed values, stored + 8
    assert library.tolist() == [[sequential_word]]
    assert pack_nibbles(values[None]).tolist() == [[sequential_word]]
    # a word whose top nibble is 8..15 is a negative int32: still unpacked as unsigned codes
    high = torch.tensor([[0xF0000000 - (1 << 32)]], dtype=torch.int32)
    assert unpack_nibbles(high)[0].tolist() == [0] * 7 + [15]


def library_reads_back(path) -> dict:
    """Tessera's linears of a checkpoint, by HF name, each checked to equal what the
    compressed-tensors library decompresses it to."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    library = AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=CompressedTensorsConfig(run_compressed=False),
        dtype=torch.bfloat16).state_dict()
    ours = tessera_weights(path)
    linears = {n: w for n, w in ours.items() if not isinstance(w, torch.Tensor)}
    for name, w in linears.items():
        assert torch.equal(dequantized(w).to(library[name].dtype), library[name]), name
    return linears


@pytest.mark.parametrize("scheme", ["w4a16", "w4a16-symmetric", "w8a8", "fp8"])
def test_compressed_tensors_library_reads_back_tesseras_weights(checkpoints, scheme):
    linears = library_reads_back(checkpoints[scheme])
    assert len(linears) == 30 * 7
    if scheme.startswith("w4a16"):  # zero points by default; the symmetric 8 without
        symmetric = [bool((w.zero_points == 8).all()) for w in linears.values()]
        assert set(symmetric) == {scheme == "w4a16-symmetric"}


def margins(prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Per generated token: the dense model's best log-prob minus the token's, teacher-forced."""
    logprobs = torch.log_softmax(oracle.logits(prompt_ids + tokens), -1)[len(prompt_ids) - 1:-1]
    return logprobs.max(-1).values - logprobs[torch.arange(len(tokens)), tokens]


@pytest.mark.parametrize("scheme", ["w4a16", "w8a8", "fp8"])
def test_served_tokens_stay_near_the_dense_model(checkpoints, scheme):
    path = checkpoints[scheme]
    llm = LLM(model=str(path), enforce_eager=True, num_kv_pages=64,
              max_model_len=512)
    tokenizer = llm.tokenizer
    gaps = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        out = llm.generate([ids], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                 ignore_eos=True))[0]
        gaps.append(margins(ids, out.outputs[0].token_ids))
    gaps = torch.cat(gaps)
    max_gap, mean_gap = MARGINS[scheme]
    assert gaps.max() <= max_gap and gaps.mean() <= mean_gap, (gaps.max(), gaps.mean())
    assert llm.engine.scheduler.block_manager.num_free_pages == 64


def _awq_files(w: Int4Weight) -> dict:
    """AWQ GEMM tensors of a weight: `[K, N]` codes packed along N in AWQ's column order."""
    def pack(t):  # [R, N] uint8 -> [R, N / 8] int32, nibble i = column AWQ_PACK_ORDER[i]
        t = t.to(torch.int32).unflatten(-1, (-1, 8))[..., list(AWQ_PACK_ORDER)]
        return sum(t[..., i] << (4 * i) for i in range(8)).to(torch.int32)
    return {"qweight": pack(w.codes.t()), "qzeros": pack(w.zero_points.t()),
            "scales": w.scales.t().to(torch.float16)}


def _gptq_files(w: Int4Weight, g_idx: torch.Tensor) -> dict:
    """GPTQ v1 tensors: codes `[K, N]` packed along K in order, zeros minus one along N."""
    def pack_rows(t):  # [K, N] -> [K / 8, N], row 8j + i in nibble i
        t = t.to(torch.int32).unflatten(0, (-1, 8))
        return sum(t[:, i] << (4 * i) for i in range(8)).to(torch.int32)
    zeros = ((w.zero_points.to(torch.int32) - 1) & 0xF).t()  # [G, N]
    return {"qweight": pack_rows(w.codes.t()), "qzeros": pack_rows(zeros.t()).t().contiguous(),
            "scales": w.scales.t().to(torch.float16), "g_idx": g_idx.to(torch.int32)}


def test_awq_layout_loads_the_same_weights_and_tokens(checkpoints, tmp_path):
    from safetensors.torch import save_file

    source = checkpoints["w4a16"]
    tensors = {}
    for name, w in tessera_weights(source).items():
        if isinstance(w, Int4Weight):
            module = name.removesuffix(".weight")
            tensors |= {f"{module}.{k}": v for k, v in _awq_files(w).items()}
        else:
            tensors[name] = w
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    for f in source.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 64,
                                     "version": "gemm", "zero_point": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours, awq = tessera_weights(source), tessera_weights(tmp_path)
    assert ours.keys() == awq.keys()
    for name, w in ours.items():
        if isinstance(w, Int4Weight):
            assert torch.equal(awq[name].codes, w.codes)
            assert torch.equal(awq[name].zero_points, w.zero_points)
            assert torch.equal(awq[name].scales, w.scales)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    tokens = [LLM(model=str(p), enforce_eager=True, num_kv_pages=32,
                  max_model_len=512).generate(
        PROMPTS, params)[1].outputs[0].token_ids for p in (source, tmp_path)]
    assert tokens[0] == tokens[1]


def test_asymmetric_compressed_tensors_groups_load_as_the_library_decompresses_them():
    """Zero points packed along N (`pack_to_int32(..., packed_dim=0)`), by the library."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = preset_name_to_scheme("W4A16_ASYM", ["Linear"])
    scheme.weights.group_size = 32
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(5))
    groups = w.view(24, 3, 32)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    files = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale, "weight_zero_point": zero}, scheme)
    library = PackedQuantizationCompressor.decompress(files, scheme)["weight"]
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "config_groups": {"g": scheme.model_dump(mode="json")}}
    (_, ours), = assemble(((f"l.{k}", v) for k, v in files.items()),
                          checkpoint_scheme({"quantization_config": config}))
    assert not (ours.zero_points == 8).all()
    assert torch.equal(ours.dequantize(), library.float())


def test_gptq_act_order_weight_computes_its_formula():
    torch.manual_seed(0)
    n, k, group = 16, 128, 32
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // group), dtype=torch.uint8)
    scales = torch.rand(n, k // group) / 10 + 0.01
    g_idx = torch.randperm(k) % (k // group)  # act-order: column k belongs to group g_idx[k]
    expected = (codes.float() - zeros[:, g_idx].float()) * scales.half().float()[:, g_idx]
    files = _gptq_files(Int4Weight(codes, scales, zeros, group), g_idx)
    scheme = checkpoint_scheme({"quantization_config": {"quant_method": "gptq", "bits": 4,
                                                        "group_size": group,
                                                        "desc_act": True}})
    (_, w), = assemble(((f"l.{k}", v) for k, v in files.items()), scheme)
    assert w.perm is not None
    assert torch.equal(w.dequantize(), expected)
    layer = Linear(k, n, method=get_linear_method("w4a16"))
    layer.weight.weight_loader(layer.weight, w)
    layer.method.process_weights_after_loading(layer)
    x = torch.randn(3, k)
    torch.testing.assert_close(layer(x), x @ expected.T, atol=0.05, rtol=0.02)


def test_clip_search_and_gptq_beat_round_to_nearest(checkpoints):
    """The text's first 1024 tokens, windows of 511 (the README has the whole-text figures)."""
    rtn, searched = perplexity(checkpoints["w4a16-rtn"]), perplexity(checkpoints["w4a16"])
    assert searched < rtn, (searched, rtn)


def perplexity(path) -> float:
    from engine.bench_perplexity import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--model", str(path), "--max-tokens", "1024", "--max-model-len", "512", "--json",
              "--dtype", "bfloat16"])
    return json.loads(out.getvalue().strip().splitlines()[-1])["ppl"]


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4, "strategy": "group",
                                          "group_size": 128},
                              "input_activations": {"type": "int", "num_bits": 8,
                                                    "strategy": "token", "dynamic": True}}}},
     "format='pack-quantized' weights=int4/group activations=int8"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
])
def test_unsupported_schemes_are_refused_by_name(config, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        checkpoint_scheme({"quantization_config": config})


def test_a_checkpoint_takes_only_its_own_method(checkpoints):
    with pytest.raises(ValueError, match="w4a16 checkpoint: quantization must be auto or "
                                         "w4a16, got 'int8'"):
        LLM(model=str(checkpoints["w4a16"]), quantization="int8")
    with pytest.raises(ValueError, match="declares no quantization_config"):
        LLM(quantization="w8a8")
    assert loader.checkpoint_method(ModelConfig(model=str(checkpoints["w8a8"]))) == "w8a8"
