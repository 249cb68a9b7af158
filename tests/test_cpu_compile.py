"""The torch.compile'd CPU decode step (engine/cpu_compile.py): it is what runs the decode
steps of a lone request and of batches of `MIN_BATCH` rows or more, and it computes what the
eager forward computes."""
import gc
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "configs" / "tiny-llama"


def check_compiled_decode() -> None:
    from engine import LLM, SamplingParams
    from engine.cpu_compile import MIN_BATCH, inductor_cache_dir
    from engine.layers.attention import AttentionMetadata

    llm = LLM(model=str(TINY_CONFIG), load_format="dummy", dtype="float32", num_kv_pages=32,
              max_model_len=256, max_num_seqs=MIN_BATCH + 1)
    runner = llm.engine.runner
    assert runner.compiled is not None
    # The graphs dynamo traced are gone once compiled (they held 41 MiB for SmolLM2). A cold
    # compile leaves one graph of its own: Inductor's cached placeholder `identity` (an input
    # and an output, torch/_inductor/loop_body.py), which its code generation reuses.
    assert not [o for o in gc.get_objects()
                if issubclass(type(o), torch.fx.GraphModule) and len(o.graph.nodes) > 2]
    # Inductor kept what it compiled in Tessera's cache, not torch's default
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(inductor_cache_dir())
    assert any(inductor_cache_dir().iterdir())
    compiled_steps, run = [], runner.compiled.run
    runner.compiled.run = (lambda *a: compiled_steps.append((a[2].max_seq_len, len(a[0])))
                           or run(*a))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    out = llm.generate([list(range(2, 40))], params)[0]
    assert len(out.outputs[0].token_ids) == 24
    # Every decode step but the first (the prefill samples it) ran compiled, across three
    # page boundaries, with no new graph.
    assert [context for context, _ in compiled_steps] == list(range(39, 39 + 23))
    llm.generate([[3, 4], [5, 6, 7]], params)  # a two-request batch stays eager
    assert len(compiled_steps) == 23
    # A batch of MIN_BATCH + 1 rows, its rows dropping out one by one, decodes compiled while
    # it holds MIN_BATCH rows or more (every step: its longest context spans two pages), with
    # no new graph, and gives the eager engine's tokens.
    batch = [list(range(2, 10 + 3 * i)) for i in range(MIN_BATCH + 1)]
    steps = [SamplingParams(temperature=0, max_tokens=24 - i, ignore_eos=True)
             for i in range(len(batch))]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = [o.outputs[0].token_ids for o in llm.generate(batch, steps)]
    # 6 rows make tokens 2..19 and 5 rows token 20; 4 to 2 rows run eagerly, and the last
    # row's last token (token 24) is a lone request's step again
    assert [rows for _, rows in compiled_steps[23:]] == [6] * 18 + [5, 1], compiled_steps
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert llm.engine.block_manager.num_free_pages == 32
    eager = LLM(model=str(TINY_CONFIG), load_format="dummy", dtype="float32", num_kv_pages=32,
                max_model_len=256, enforce_eager=True)
    assert [o.outputs[0].token_ids for o in eager.generate(batch, steps)] == got

    # The same step's hidden states, compiled and eager, at contexts ending mid-page and on
    # the page boundary, for one request and for a batch.
    for rows, context in ((1, 37), (1, 48), (1, 49), (MIN_BATCH + 1, 40)):
        pages = -(-context // 16)
        positions, meta = AttentionMetadata.for_batch(
            torch.arange(context - rows, context), torch.ones(rows, dtype=torch.int64),
            torch.arange(pages).expand(rows, pages), 16, 1, context)
        ids = torch.arange(7, 7 + rows)
        with torch.inference_mode():
            eager = runner.model(ids, positions, runner.kv_cache.layers, meta)
            compiled = run(ids, positions, meta)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compiled_decode_step_runs_lone_requests_and_matches_eager():
    """In a child process: once Inductor is loaded, the Triton interpreter that the kernel
    tests run in this process fails (`tl.sum` is no longer patched)."""
    out = subprocess.run([sys.executable, "-c", "from tests.test_cpu_compile import "
                          "check_compiled_decode; check_compiled_decode()"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


def test_inductor_cache_is_kept_per_instruction_set(tmp_path):
    """C++ that Inductor generated under a lowered capability (`ATEN_CPU_CAPABILITY=avx2`), found
    in its cache at full capability, was rebuilt for wider vectors and overran its buffers:
    each capability has a cache of its own, under Tessera's cache directory."""
    def inductor_dir(**env: str) -> str:
        out = subprocess.run([sys.executable, "-c", "from engine.cpu_compile import "
                              "inductor_cache_dir; print(inductor_cache_dir())"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "TESSERA_CACHE_DIR": str(tmp_path), **env})
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip()

    full, lowered = inductor_dir(), inductor_dir(ATEN_CPU_CAPABILITY="default")
    assert full != lowered
    assert {Path(full).parent, Path(lowered).parent} == {tmp_path / "inductor"}


def check_compiled_decode_of_the_default_gguf() -> None:
    """SmolLM2's own shapes and kernels (int4/int8, inputs rotated in blocks of 576 = 9 x 64):
    a lone request's greedy tokens, decoded compiled and eagerly."""
    from engine import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tokens = []
    for eager in (True, False):
        llm = LLM(max_model_len=256, max_num_seqs=4, enforce_eager=eager)  # no batch graphs
        assert (llm.engine.runner.compiled is None) == eager
        out = llm.generate(["The capital of France is"], params)[0]
        tokens.append(out.outputs[0].token_ids)
    assert tokens[0] == tokens[1], tokens


def test_compiled_decode_of_the_default_gguf_matches_eager():
    """In a child process, as heap corruption would kill it (it did, from an Inductor cache
    shared with AVX2-capped runs: engine.cpu_compile.inductor_cache_dir)."""
    out = subprocess.run([sys.executable, "-c", "from tests.test_cpu_compile import "
                          "check_compiled_decode_of_the_default_gguf as check; check()"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


def check_compiled_decode_with_a_second_pool(checkpoint: str, head_config: str | None) -> None:
    """The compiled step reads both pools, and a long request decodes as the eager forward
    does: a model's sliding layers (Gemma 3) or a head config's streaming heads in a pool of
    their own."""
    from engine import LLM, SamplingParams
    from server.local_server import write_tiny_tokenizer

    tokenizer = str(write_tiny_tokenizer(Path(checkpoint).parent / "tokenizer"))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt = torch.randint(4, 300, (50,), generator=torch.Generator().manual_seed(5)).tolist()
    outputs = []
    for eager in (True, False):
        llm = LLM(model=checkpoint, tokenizer=tokenizer, dtype="float32", quantization="none",
                  page_size=8, max_model_len=256, enforce_eager=eager,
                  kv_head_config=head_config, max_num_seqs=4)  # one request: no batch graphs
        runner = llm.engine.runner
        assert runner.streaming_cache is not None and (runner.compiled is None) == eager
        if not eager:
            compiled_steps, run = [], runner.compiled.run
            runner.compiled.run = lambda *a: compiled_steps.append(1) or run(*a)
        outputs.append(llm.generate([prompt], params)[0].outputs[0].token_ids)
    assert len(compiled_steps) == 39  # every decode step: both pools hold over a page
    assert outputs[0] == outputs[1]


def test_compiled_decode_reads_a_second_pool(tmp_path):
    from tests.test_kv_head_config import write_config
    from tests.test_model_families import write_checkpoint

    gemma = write_checkpoint(tmp_path / "gemma3" / "model", "Gemma3TextConfig", {
        "sliding_window": 24, "layer_types": ["sliding_attention", "full_attention"]})
    llama = write_checkpoint(tmp_path / "llama" / "model", "LlamaConfig", {})
    heads = write_config(tmp_path / "heads.json", [(0, 1), (1, 0)], sinks=2, window=20)
    out = subprocess.run([sys.executable, "-c", "from tests.test_cpu_compile import "
                          "check_compiled_decode_with_a_second_pool as check; "
                          f"check({str(gemma)!r}, None); check({str(llama)!r}, {heads!r})"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
