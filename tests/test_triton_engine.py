"""The whole engine on the Triton kernels: the same greedy tokens as on the torch reference.

`test_kernels.py` checks each kernel alone. Here every op of whole engine runs (ragged batches,
chunked prefill over several pages, a prefix-cache hit, decode) is sent to Triton, and the
tokens and log-probabilities must be those of the same runs on the reference ops.

Which tests run is decided by TRITON_INTERPRET (set to 1 below unless already set) and the GPU:

* TRITON_INTERPRET=1 (the default here): the Triton interpreter on CPU tensors; the CUDA tests
  skip, since the interpreter on CUDA tensors measures nothing we ship.
* TRITON_INTERPRET=0 with a GPU: compiled kernels on CUDA tensors (Triton vs torch reference,
  fp32 and bf16; CUDA-graph vs eager decode); the interpreter test skips. Run
  `TRITON_INTERPRET=0 pytest tests/test_triton_engine.py tests/test_kernels.py`.
"""

from tests.triton_mode import interpreting  # first: it sets TRITON_INTERPRET

import gc  # noqa: E402
import json  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.cuda_graphs import DecodeGraphs  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402
from engine.quantize import main as quantize  # noqa: E402
from kernels import reference, triton_attention, triton_moe, triton_ops  # noqa: E402
from kernels import triton_quant  # noqa: E402
from tests.conftest import write_tiny_tokenizer  # noqa: E402
from tests.test_model_families import FAMILIES, write_checkpoint  # noqa: E402


INTERPRET = interpreting()
HAS_CUDA = torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="runs the Triton interpreter on CPU tensors; TRITON_INTERPRET=0 is set")
needs_cuda = pytest.mark.skipif(
    INTERPRET or not HAS_CUDA,
    reason="needs a CUDA device" if not HAS_CUDA else
    "TRITON_INTERPRET=1: compiled kernels on the GPU need TRITON_INTERPRET=0")

# Every op the model dispatches, by the module function each path ends in.
TRITON_FUNCS = [(triton_ops, "rms_norm"), (triton_ops, "rotary_embedding"),
                (triton_ops, "silu_and_mul"), (triton_ops, "write_kv"),
                (triton_attention, "paged_prefill_attention"),
                (triton_attention, "paged_decode_attention"), (triton_moe, "fused_moe")]
REFERENCE_FUNCS = [(reference, "rms_norm"), (reference, "rotary_embedding"),
                   (reference, "silu_and_mul"), (reference, "write_kv"),
                   (reference, "paged_attention"), (reference, "fused_moe")]


def reached(funcs: list[tuple], moe: bool) -> set[str]:
    """The names of `funcs` a whole run must reach: all, but fused_moe in MoE models only."""
    return {name for _, name in funcs if moe or name != "fused_moe"}


def write_tiny_llama(path, *, vocab: int = 512, hidden: int = 160, intermediate: int = 352,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 64,
                     max_len: int = 256) -> str:
    """A Llama 3 style config.json (GQA, llama3 rope scaling, untied embeddings) in `path`.

    Hidden and intermediate sizes that are not powers of two leave masked tails in the
    row kernels' blocks; `original_max_position_embeddings` below the prompt lengths makes
    the scaled low frequencies matter.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": max_len,
        "tie_word_embeddings": False, "eos_token_id": 1,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}))
    return str(path)


def force_kernels(monkeypatch, use_triton: bool, tiles: dict[str, dict] | None = None
                  ) -> Counter:
    """Send every op to Triton (or to the reference); the other path raises if reached.

    `tiles` adds keyword arguments to Triton functions by name (e.g. smaller attention tiles).
    Returns live call counts of the chosen path's functions, so a test can show each ran.
    """
    monkeypatch.setattr(kernels, "uses_triton", lambda x: use_triton)
    calls = Counter()
    used, banned = (TRITON_FUNCS, REFERENCE_FUNCS) if use_triton else (REFERENCE_FUNCS,
                                                                        TRITON_FUNCS)
    for module, name in used:
        fn, extra = getattr(module, name), (tiles or {}).get(name, {})
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _n=name, _x=extra, **kw:
                            calls.update([_n]) or _fn(*a, **kw, **_x))
    for module, name in banned:
        def refuse(*a, _n=f"{module.__name__}.{name}", **kw):
            raise AssertionError(f"{_n} ran although every op was forced to the other path")
        monkeypatch.setattr(module, name, refuse)
    return calls


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # of each chosen token
    top_ids: list[list[int]]  # the top alternatives at each position, best first
    top_logprobs: list[list[float]]
    num_cached_tokens: int
    finish_reason: str | None


def run_calls(llm: LLM, calls: list[tuple[list[list[int]], list[SamplingParams]]]
              ) -> list[Completion]:
    """Each call's `generate`, one after the other (a later call can hit an earlier one's
    pages); every page must be free again after each call."""
    results = []
    for prompts, params in calls:
        for out in llm.generate(prompts, params):
            c = out.outputs[0]
            lps = c.logprobs or []
            results.append(Completion(
                list(c.token_ids), [lp.logprob for lp in lps],
                [[t for t, _ in lp.top] for lp in lps], [[v for _, v in lp.top] for lp in lps],
                out.num_cached_tokens, c.finish_reason))
        bm = llm.engine.block_manager
        assert bm.num_free_pages == bm.num_pages, "pages leaked after generate()"
    return results


def assert_same_completions(got: list[Completion], want: list[Completion], atol: float) -> None:
    """Identical tokens; chosen and top-k log-probs within `atol` (the top-k values are
    compared sorted, so two near-equal alternatives swapping ranks is not a failure)."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if g.token_ids != w.token_ids:
            n = next((j for j, (a, b) in enumerate(zip(g.token_ids, w.token_ids)) if a != b),
                     min(len(g.token_ids), len(w.token_ids)))
            gap = (f"; the reference's best two there are "
                   f"{w.top_logprobs[n][0] - w.top_logprobs[n][1]:.2e} nats apart"
                   if n < len(w.top_logprobs) else "")
            pytest.fail(f"request {i}: tokens differ from position {n} on{gap}\n"
                        f"got  {g.token_ids}\nwant {w.token_ids}")
        assert g.num_cached_tokens == w.num_cached_tokens, f"request {i}"
        assert g.finish_reason == w.finish_reason, f"request {i}"
        if w.logprobs:
            torch.testing.assert_close(torch.tensor(g.logprobs, dtype=torch.float64),
                                       torch.tensor(w.logprobs, dtype=torch.float64),
                                       atol=atol, rtol=0, msg=lambda m: f"request {i}: {m}")
            torch.testing.assert_close(torch.tensor(g.top_logprobs, dtype=torch.float64),
                                       torch.tensor(w.top_logprobs, dtype=torch.float64),
                                       atol=atol, rtol=0, msg=lambda m: f"request {i}: {m}")


def assert_agree_until_near_tie(got: list[Completion], want: list[Completion], atol: float,
                                tie: float) -> int:
    """The bf16 rule. Two correct bf16 implementations round differently, so where the
    reference's best two tokens are within rounding of each other either may win, and after
    that the two runs continue different texts. So: each request's tokens must be identical
    up to its first difference; up to and including that position (same context in both
    runs) the log-probs must agree within `atol`; at that position the reference's top two
    must be within `tie` nats and the other run must have picked one of them. Returns the
    number of requests that agreed all the way."""
    assert len(got) == len(want)
    identical = 0
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.num_cached_tokens == w.num_cached_tokens, f"request {i}"
        assert len(g.token_ids) == len(w.token_ids), f"request {i}"
        n = next((j for j, (a, b) in enumerate(zip(g.token_ids, w.token_ids)) if a != b),
                 len(w.token_ids))
        identical += n == len(w.token_ids)
        torch.testing.assert_close(torch.tensor(g.logprobs[:n], dtype=torch.float64),
                                   torch.tensor(w.logprobs[:n], dtype=torch.float64),
                                   atol=atol, rtol=0, msg=lambda m: f"request {i}: {m}")
        last = min(n + 1, len(w.token_ids))
        torch.testing.assert_close(torch.tensor(g.top_logprobs[:last], dtype=torch.float64),
                                   torch.tensor(w.top_logprobs[:last], dtype=torch.float64),
                                   atol=atol, rtol=0, msg=lambda m: f"request {i}: {m}")
        if n < len(w.token_ids):
            gap = w.top_logprobs[n][0] - w.top_logprobs[n][1]
            assert gap <= tie, (f"request {i} leaves the reference at token {n}, where the "
                                f"reference's best two are {gap:.4f} nats apart (> {tie})")
            assert g.token_ids[n] in w.top_ids[n][:2], f"request {i}, token {n}"
    return identical


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]


def greedy(max_tokens: int, logprobs: int | None = 5) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                          logprobs=logprobs)


def engine_workload(vocab: int, lengths: list[int], max_tokens: list[int], shared: int,
                    tail: int, seed: int = 0, logprobs: int | None = 5):
    """Two `generate` calls. The first runs ragged prompts together (the first one longest, so
    a small token budget chunks it across pages) with ragged output lengths, so steps mix
    prefill chunks with decode rows and later run decode only at shrinking batch sizes. The
    second, after the first has finished, repeats the first prompt's leading `shared` tokens
    plus `tail` new ones (a prefix-cache hit read by a prefill chunk whose context is on
    cached pages) next to a fresh prompt."""
    first = random_prompts(lengths, vocab, seed)
    hit, fresh = random_prompts([tail, 9], vocab, seed + 1)
    return [(first, [greedy(n, logprobs) for n in max_tokens]),
            ([first[0][:shared] + hit, fresh], [greedy(6, logprobs), greedy(5, logprobs)])]


def sharpen_attention(llm: LLM, factor: float = 4.0) -> LLM:
    """Scale every layer's q and k projections by `factor` (in place, so captured CUDA graphs
    see it). Dummy weights of N(0, 0.02) give scores of about 0.05, attention close to a
    plain average, under which a wrong mask, scale or page hardly moves the output; at 16x
    the scores spread over a few units and such a bug changes the log-probs visibly."""
    with torch.inference_mode():  # allowed on normal and on inference tensors alike
        for layer in llm.engine.runner.model.layers:
            attn = layer.self_attn
            attn.qkv_proj.weight[:attn.q_size + attn.kv_size].mul_(factor)
    return llm


def release(llm: LLM) -> None:
    del llm.engine
    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# CPU: the Triton interpreter runs every op of the engine.

CPU_PAGE = 8
CPU_LENGTHS, CPU_MAX_TOKENS = [45, 5, 23, 13], [6, 9, 4, 7]
CPU_SHARED = 42  # 5 full pages of the first prompt (the 6th is only partly shared)


def _cpu_llm(model: str, sharpen: bool = True, **kw) -> LLM:
    # A 24-token budget prefills the 45-token prompt in two chunks over six 8-token pages.
    args = dict(model=model, load_format="dummy", device="cpu", dtype="float32",
                page_size=CPU_PAGE, max_num_seqs=8, max_num_batched_tokens=24, num_kv_pages=48,
                max_model_len=128, enable_prefix_caching=True, dummy_weights_seed=0,
                enforce_eager=True)
    llm = LLM(**(args | kw))
    return sharpen_attention(llm) if sharpen else llm


def _cpu_model(tmp_path, family: str) -> dict:
    """`_cpu_llm`'s arguments: the tiny Llama on dummy weights, or a family's random checkpoint
    written by transformers (tests/test_model_families.py) with a tokenizer, as one is served."""
    if family == "llama":
        return dict(model=write_tiny_llama(tmp_path / "tiny-llama"))
    return dict(model=str(write_checkpoint(tmp_path / family, *FAMILIES[family])),
                load_format="auto", tokenizer=str(write_tiny_tokenizer(tmp_path / "tokenizer")))


# The engine's attention tiles (64 keys; one 512-key decode partition) leave these short
# contexts in one masked tile; 16-key tiles and 32-key partitions also run the unmasked tile
# loops and merge up to two decode partitions per request, as long contexts do on a GPU.
SMALL_TILES = {"paged_prefill_attention": dict(block_m=16, block_n=16),
               "paged_decode_attention": dict(partition=32, block_n=16)}


# A dense family at the engine's tiles and at small ones; a mixture of experts (Qwen3-MoE: top 2
# of 4 experts in its first layer, a dense MLP in its second) at the engine's.
@needs_interpreter
@pytest.mark.parametrize("family,tiles", [("llama", None), ("llama", SMALL_TILES),
                                          ("qwen3-moe", None)],
                         ids=["llama-engine-tiles", "llama-small-tiles", "qwen3-moe"])
def test_engine_on_interpreted_triton_matches_reference(tmp_path, monkeypatch, family, tiles):
    model = _cpu_model(tmp_path, family)
    calls = engine_workload(512, CPU_LENGTHS, CPU_MAX_TOKENS, CPU_SHARED, tail=6)
    with monkeypatch.context() as m:
        ref_calls = force_kernels(m, use_triton=False)
        want = run_calls(_cpu_llm(**model), calls)
    with monkeypatch.context() as m:
        triton_calls = force_kernels(m, use_triton=True, tiles=tiles)
        got = run_calls(_cpu_llm(**model), calls)

    moe = family == "qwen3-moe"
    assert set(triton_calls) == reached(TRITON_FUNCS, moe), triton_calls
    assert set(ref_calls) == reached(REFERENCE_FUNCS, moe), ref_calls
    assert [len(c.token_ids) for c in want] == CPU_MAX_TOKENS + [6, 5]
    assert all(c.finish_reason == "length" for c in want)
    assert want[len(CPU_LENGTHS)].num_cached_tokens == CPU_SHARED // CPU_PAGE * CPU_PAGE
    assert_same_completions(got, want, atol=2e-5)  # measured: Llama <= 5e-7, Qwen3-MoE 5e-6


def _norm_then_quantize(x, weight, eps, residual=None):
    """The twin of the fused RMSNorm int8 quantizer: Triton's norm, then the torch quantizer."""
    out, residual = triton_ops.rms_norm(x, weight, eps, residual)
    return *reference.quantize_per_token_int8(out.reshape(-1, out.shape[-1])), residual


# The Triton functions each scheme's linears run, with their twins.
QUANTIZED_GEMMS = {"w4a16": {"w4a16_linear": reference.w4a16_linear},
                   "w8a8": {"w8a8_linear": reference.w8a8_linear,
                            "w8a8_gemm": reference.w8a8_gemm,
                            "rms_norm_quant_int8": _norm_then_quantize},
                   "fp8": {"fp8_linear": reference.fp8_linear}}


@pytest.fixture(scope="module")
def quantization_source(tmp_path_factory):
    """The random Llama checkpoint and calibration text every scheme below quantizes, written
    once for the module."""
    root = tmp_path_factory.mktemp("quantization-source")
    source = write_checkpoint(root / "llama", *FAMILIES["llama"])
    write_tiny_tokenizer(source)
    text = root / "calibration.txt"
    gen = torch.Generator().manual_seed(2)
    text.write_text(" ".join(f"w{i}" for i in torch.randint(0, 300, (512,), generator=gen)))
    return source, text


@needs_interpreter
@pytest.mark.parametrize("scheme", list(QUANTIZED_GEMMS))
def test_quantized_checkpoint_on_interpreted_triton_matches_the_twin_gemm(
        tmp_path, monkeypatch, quantization_source, scheme):
    """A `tessera quantize` checkpoint served on the Triton path, in the weight layout the
    linear method builds for it, with every op interpreted: the quantized GEMM against its
    torch twin on the same tensors, the rest on Triton both times."""
    source, text = quantization_source
    out = tmp_path / scheme
    quantize([str(source), "--scheme", scheme, "--out", str(out), "--group-size", "32",
              "--calibration-file", str(text), "--calibration-tokens", "256",
              "--sequence-length", "64"])
    calls = engine_workload(512, CPU_LENGTHS, CPU_MAX_TOKENS, CPU_SHARED, tail=6)
    twins = QUANTIZED_GEMMS[scheme]
    with monkeypatch.context() as m:
        force_kernels(m, use_triton=True)
        for name, twin in twins.items():
            m.setattr(triton_quant, name, twin)
        want = run_calls(_cpu_llm(str(out), sharpen=False, load_format="auto"), calls)
    with monkeypatch.context() as m:
        force_kernels(m, use_triton=True)
        ran = Counter()
        for name in twins:
            fn = getattr(triton_quant, name)
            m.setattr(triton_quant, name,
                      lambda *a, _fn=fn, _n=name, **kw: ran.update([_n]) or _fn(*a, **kw))
        got = run_calls(_cpu_llm(str(out), sharpen=False, load_format="auto"), calls)
    assert set(ran) == set(twins), ran  # w8a8: the fused norm quantizer feeds q|k|v, gate|up
    # fp8's GEMM writes bf16: its fp32 sums, in another order than the twin's, can round an
    # output to the next bf16 (measured 1.5e-4 on an AMX Xeon, <= 2e-5 on Zen 4)
    assert_same_completions(got, want, atol=1e-3 if scheme == "fp8" else 2e-5)


class EagerReplayGraphs(DecodeGraphs):
    """`DecodeGraphs` whose "graphs" rerun the captured forward on the static buffers.

    On CPU this runs everything around the capture itself: the bucket choice, the padding
    rows (slot -1, one key of page 0), stale block-table columns, and the split-KV grid sized
    for `max_model_len` while eager steps size it for the batch. CUDA's capture and replay
    are the GPU test's (`test_cuda_graph_decode_matches_eager`)."""

    def _capture(self, device):
        self.replays = Counter()
        for size in self.sizes:
            self.outputs[size] = self._forward(size)
            self.graphs[size] = SimpleNamespace(replay=lambda s=size: self.replays.update([s])
                                                or self.outputs[s].copy_(self._forward(s)))


# The tiny Llama, and Gemma 3 (a sliding layer, whose pages live in a second pool, and a
# global one): the graphs take both pools' tables.
@needs_interpreter
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_padded_graph_decode_steps_match_eager_steps(tmp_path, monkeypatch, family):
    model = _cpu_model(tmp_path, family)
    # Then seven 3-token prompts prefilled in one step, whose decode batch shrinks by one a
    # step: 7, 6, 5 run padded to 8 and 3 padded to 4. Gemma's Triton steps are slower in the
    # interpreter: five prompts, the first past its 24-token window, decode 5, 4, ... 1 rows.
    calls = ([(random_prompts([45, 3, 3, 3, 3], 300, seed=5),
               [greedy(n) for n in (10, 3, 4, 5, 6)])] if family == "gemma3" else
             engine_workload(300, CPU_LENGTHS, CPU_MAX_TOKENS, CPU_SHARED, tail=6) + [
                 (random_prompts([3] * 7, 300, seed=5), [greedy(3 + i) for i in range(7)])])
    with monkeypatch.context() as m:
        force_kernels(m, use_triton=True, tiles=SMALL_TILES)
        eager = _cpu_llm(**model)
        want = run_calls(eager, calls)
        llm = _cpu_llm(**model)
        runner = llm.engine.runner
        assert (runner.streaming_cache is not None) == (family == "gemma3")
        graphs = runner.graphs = EagerReplayGraphs(
            runner.model, runner.kv_layers, max_batch=8,
            max_pages=-(-runner.max_model_len // CPU_PAGE), max_model_len=runner.max_model_len,
            device=runner.device, second_pool=runner.streaming_cache is not None)
        got = run_calls(llm, calls)
    assert set(graphs.replays) == {1, 2, 4, 8}, graphs.replays
    assert_same_completions(got, want, atol=2e-5)
    # Same schedule, same pages: padding rows must not have written a single KV slot.
    for cache, cache_want in [(runner.kv_cache, eager.engine.runner.kv_cache),
                              (runner.streaming_cache, eager.engine.runner.streaming_cache)]:
        for (k, v), (k_want, v_want) in zip(*(c.layers if c else [] for c in (cache,
                                                                             cache_want))):
            torch.testing.assert_close(k, k_want, atol=1e-5, rtol=0)
            torch.testing.assert_close(v, v_want, atol=1e-5, rtol=0)


@needs_interpreter
def test_memory_profiling_warm_up_steps_run_on_the_triton_path(tmp_path, monkeypatch):
    """The CUDA KV sizing profiles two synthetic steps (`ModelRunner._warm_up`): a full token
    budget of prefill as requests of at most max_model_len tokens, and a decode step of
    max_num_seqs rows over the grid of max_model_len. Their metadata must be what the kernels
    accept: every prefill token lands in its own slot of the scratch cache."""
    with monkeypatch.context() as m:
        calls = force_kernels(m, use_triton=True)
        runner = _cpu_llm(write_tiny_llama(tmp_path / "tiny-llama")).engine.runner
        lens, width = [50, 50, 28], -(-50 // CPU_PAGE)  # 128 tokens of budget, 50 per request
        scratch = KVCache(runner.kv_spec, len(lens) * width, "cpu")
        runner._warm_up(scratch, lens, width)
        written = scratch.layers[0][0].flatten(0, 1).ne(0).any(-1).any(-1)
        assert written.sum() == sum(lens)
        runner._warm_up(scratch, [1] * 8, width)
    assert calls["paged_prefill_attention"] == calls["paged_decode_attention"] == 2  # 2 layers


# ---------------------------------------------------------------------------------------------
# CUDA: compiled kernels (TRITON_INTERPRET=0).

GPU_PAGE = 16
GPU_LENGTHS, GPU_MAX_TOKENS = [1100, 7, 300, 33, 64, 129, 1], [40, 24, 32, 17, 9, 30, 12]
GPU_SHARED = 600  # 37 full pages of the first prompt
# Log-prob tolerances. fp32: both paths compute in fp32 and differ in summation order only
# (the CPU test above measures <= 5e-7). bf16: logits are bf16, so log-probs move in steps of
# a logit's ulp (2^-7 at 1..2); two correct bf16 implementations of the ops (torch reference vs
# fp32-internal, simulated on CPU over this workload) differed by up to 0.046 nats and left
# each other only at top-two gaps <= 0.031. The bounds give about 3x that; the tie bound is
# twice the log-prob bound, as a flip needs the two runs' errors to cover the gap together.
FP32_ATOL, BF16_ATOL, BF16_TIE = 2e-4, 0.125, 0.25
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _gpu_model(tmp_path, head_dim: int) -> str:
    # Eight query heads on two KV heads; a hidden size that is not a power of two.
    return write_tiny_llama(tmp_path / f"llama-hd{head_dim}", vocab=2048, hidden=576,
                            intermediate=1376, layers=4, heads=8, kv_heads=2,
                            head_dim=head_dim, max_len=2048)


def _gpu_llm(model: str, dtype: str, enforce_eager: bool, **kw) -> LLM:
    # num_kv_pages is explicit: a pool sized from free memory (gpu_memory_utilization) would
    # take most of the GPU and depend on what earlier tests left allocated.
    args = dict(model=model, load_format="dummy", device="cuda", dtype=dtype,
                page_size=GPU_PAGE, max_num_seqs=32, max_num_batched_tokens=256,
                num_kv_pages=512, max_model_len=2048, enable_prefix_caching=True,
                dummy_weights_seed=0, enforce_eager=enforce_eager)
    return sharpen_attention(LLM(**(args | kw)))


@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_engine_on_triton_matches_torch_reference_on_cuda(tmp_path, monkeypatch, dtype,
                                                          head_dim):
    """Compiled Triton kernels vs the torch reference ops on the same CUDA tensors, with the
    same weights and scheduling: a 1100-token prompt prefilled in 5 chunks and decoded over
    three 512-key partitions, ragged prompts (one of a single token), ragged output lengths,
    then a prefix-cache hit of 592 tokens. Eager on both sides: the reference ops synchronize
    with the host and cannot be captured, and graphs have their own test below."""
    model = _gpu_model(tmp_path, head_dim)
    calls = engine_workload(2048, GPU_LENGTHS, GPU_MAX_TOKENS, GPU_SHARED, tail=20)
    with monkeypatch.context() as m:
        ref_calls = force_kernels(m, use_triton=False)
        llm = _gpu_llm(model, DTYPES[dtype], enforce_eager=True)
        want = run_calls(llm, calls)
        release(llm)
    with monkeypatch.context() as m:
        triton_calls = force_kernels(m, use_triton=True)
        llm = _gpu_llm(model, DTYPES[dtype], enforce_eager=True)
        got = run_calls(llm, calls)
        release(llm)

    assert set(triton_calls) == reached(TRITON_FUNCS, moe=False), triton_calls
    assert set(ref_calls) == reached(REFERENCE_FUNCS, moe=False), ref_calls
    assert [len(c.token_ids) for c in want] == GPU_MAX_TOKENS + [6, 5]
    assert want[len(GPU_LENGTHS)].num_cached_tokens == GPU_SHARED // GPU_PAGE * GPU_PAGE
    if dtype == "fp32":
        assert_same_completions(got, want, atol=FP32_ATOL)
    else:
        assert_agree_until_near_tie(got, want, atol=BF16_ATOL, tie=BF16_TIE)


BATCH_SIZES = [1, 3, 5, 17]


def _graph_workload(vocab: int, logprobs: int | None):
    """One `generate` per batch size, each with its own prompts (no prefix hits between
    calls). Output lengths 4, 7, 10, ... make a call's decode batch shrink one request at a
    time, so decode steps run at every size from n down to 1, mostly padded up to a captured
    size; the last request of the 17 has a 1000-token prompt whose decode crosses 1024 keys
    (a third 512-key partition)."""
    calls = []
    for n in BATCH_SIZES:
        lengths = [(97 * i + 5) % 400 + 1 for i in range(n)]
        if n == 17:
            lengths[-1] = 1000
        prompts = random_prompts(lengths, vocab, seed=n)
        calls.append((prompts, [greedy(4 + 3 * i, logprobs) for i in range(n)]))
    return calls


@needs_cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cuda_graph_decode_matches_eager(tmp_path, monkeypatch, dtype):
    """Decode steps replayed from CUDA graphs (inputs padded up to a captured batch size)
    give the tokens of the same engine run eagerly. fp32 runs plain greedy (argmax on the
    device, the serving default) and must agree exactly; bf16 asks for log-probs and follows
    the near-tie rule, since padded batches may take other matmul kernels."""
    model = _gpu_model(tmp_path, 128)
    calls = _graph_workload(2048, logprobs=None if dtype == "fp32" else 5)
    replays = Counter()
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay",
                        lambda self: replays.update(["replay"]) or replay(self))
    results = {}
    for eager in (True, False):
        replays.clear()
        llm = _gpu_llm(model, DTYPES[dtype], enforce_eager=eager, max_num_batched_tokens=512)
        results[eager] = run_calls(llm, calls)
        release(llm)
        if eager:
            assert replays["replay"] == 0, "enforce_eager=True replayed CUDA graphs"
        else:
            assert replays["replay"] > 0, "enforce_eager=False never replayed a CUDA graph"
    want, got = results[True], results[False]
    assert [len(c.token_ids) for c in want] == [4 + 3 * i for n in BATCH_SIZES for i in range(n)]
    if dtype == "fp32":
        assert_same_completions(got, want, atol=FP32_ATOL)
    else:
        assert_agree_until_near_tie(got, want, atol=BF16_ATOL, tie=BF16_TIE)
