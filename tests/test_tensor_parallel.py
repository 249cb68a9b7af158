"""Tensor parallelism over gloo on CPU: the ranks together compute what one process does.

The default model (9 query heads, 3 KV heads) under TP=3 gives TP=1's greedy tokens in fp32
through chunked prefill, a prefix hit and preemption; a 4-head, 1-KV-head model under TP=2
(the KV head replicated) likewise; each rank holds a third of the weights; sizes that do not
divide the heads are refused with the reason.
"""
import json

import pytest
import torch

from engine.executor import LocalWorkers, RayWorkers
from engine.layers.linear import Linear
from engine.layers.quantization.checkpoint import ChannelWeight, Int4Weight
from engine.layers.quantization.dense import DenseMethod
from engine.layers.quantization.gguf import QuantizedWeight
from engine.llm import LLM
from engine.messages import AddRequest
from engine.parallel import Shard, TensorParallel
from engine.sampling_params import SamplingParams
from engine.step_plan import PageTables, StepPlanner
from scheduler.request import Request
from scheduler.scheduler import ScheduledRequest, SchedulerOutput
from server.local_server import TINY_MODEL

PROMPTS = ["The capital of France is", "List three colors, then explain why the sky is blue:",
           "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
SHARED = ("You are a careful assistant. Answer briefly and exactly. The question follows. "
          "Question: ")
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def _run(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], int, int]:
    """Greedy tokens of each prompt, run together, with the preemptions and prefix-cached
    tokens the engine reported."""
    engine = llm.engine
    for i, ids in enumerate(prompts):
        engine.add_request(AddRequest(f"r{i}", ids, GREEDY, 0.0))
    tokens, preemptions, cached = {f"r{i}": [] for i in range(len(prompts))}, 0, 0
    while engine.has_unfinished():
        step = engine.step()
        preemptions += step.stats.num_preemptions
        for o in step.outputs:
            tokens[o.request_id] += o.new_token_ids
            cached += o.num_cached_tokens if o.finish_reason else 0
    return [tokens[f"r{i}"] for i in range(len(prompts))], preemptions, cached


def _serve_default(tensor_parallel_size: int):
    """Greedy tokens of two rounds on a small KV pool (chunks of 16, preemptions), the second
    round sharing a prefix cached by the first; the ranks' weight bytes."""
    llm = LLM(dtype="float32", quantization="none", enforce_eager=True, max_model_len=96,
              max_num_batched_tokens=16, num_kv_pages=14, page_size=8,
              tensor_parallel_size=tensor_parallel_size)
    try:
        encode = llm.tokenizer.encode
        first = _run(llm, [encode(SHARED + p) for p in PROMPTS])
        second = _run(llm, [encode(SHARED + p[::-1]) for p in PROMPTS[:2]])
        bm = llm.engine.block_manager
        assert bm.num_free_pages == bm.num_pages
        return first, second, llm.engine.executor.weight_bytes
    finally:
        llm.engine.executor.shutdown()


@pytest.fixture(scope="module")
def default_runs():
    return _serve_default(1), _serve_default(3)


def test_tp3_default_model_equals_tp1_through_chunks_prefix_hit_and_preemption(default_runs):
    (first1, second1, _), (first3, second3, _) = default_runs
    assert first3[0] == first1[0] and second3[0] == second1[0]
    assert first1[1] > 0 and first3[1] > 0  # preempted
    assert second1[2] > 0 and second3[2] > 0  # the shared prefix was a cache hit


def test_tp3_rank_holds_a_third_of_the_weights(default_runs):
    (_, _, (whole,)), (_, _, ranks) = default_runs
    assert len(ranks) == 3
    for rank_bytes in ranks:
        # Only the norms (576 floats each) are held whole by every rank.
        assert abs(rank_bytes / whole - 1 / 3) < 0.01, (rank_bytes, whole)


def test_tp2_replicates_a_single_kv_head(tmp_path):
    config = json.loads((TINY_MODEL / "config.json").read_text())
    config |= {"num_attention_heads": 4, "num_key_value_heads": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    prompts = [[5, 17, 99, 3, 42, 7, 250, 11], [300, 2, 2, 8], list(range(20, 61))]
    runs = []
    for size in (1, 2):
        llm = LLM(model=str(tmp_path), load_format="dummy", dtype="float32",
                  max_num_batched_tokens=16, tensor_parallel_size=size)
        try:
            runs.append(_run(llm, prompts)[0])
            assert llm.engine.runner.kv_spec.num_kv_heads == 1
        finally:
            llm.engine.executor.shutdown()
    assert runs[0] == runs[1]


def test_size_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(ValueError, match=r"does not divide the attention heads \(9\)"):
        LLM(dtype="float32", quantization="none", max_model_len=256, tensor_parallel_size=2)


def test_step_plan_sends_page_diffs_and_whole_tables_after_a_reset():
    planner, tables = StepPlanner(), PageTables()
    r = Request("a", list(range(10)), GREEDY)
    r.page_ids = [4, 5]

    def step(num_new):
        out = SchedulerOutput([ScheduledRequest.of(r, num_new)])
        plan = planner.plan(out, {"a"})
        r.num_computed_tokens += num_new
        return plan, tables.apply(plan)

    plan, rows = step(6)
    assert plan.requests[0].reset and rows == [[4, 5]]
    r.page_ids = [4, 5, 9]
    plan, rows = step(4)
    assert plan.requests[0].pages == [9] and not plan.requests[0].reset
    assert plan.sample_rows == [3] and rows == [[4, 5, 9]]
    r.page_ids, r.num_computed_tokens = [7], 0  # preempted, then resumed on other pages
    plan, rows = step(4)
    assert plan.requests[0].reset and rows == [[7]]
    assert planner.plan(SchedulerOutput(), set()).finished == ["a"]


def test_a_killed_worker_fails_the_step_instead_of_hanging():
    llm = LLM(model=str(TINY_MODEL), load_format="dummy", dtype="float32",
              tensor_parallel_size=2)
    try:
        engine = llm.engine
        engine.add_request(AddRequest("a", [5, 6, 7], GREEDY, 0.0))
        engine.step()
        engine.executor.workers.processes[0].kill()
        with pytest.raises(RuntimeError):  # gloo: the peer closed its connection
            while engine.has_unfinished():
                engine.step()
    finally:
        llm.engine.executor.shutdown()


def test_ray_placed_ranks_equal_local_ranks():
    """Under `distributed_executor_backend="ray"` rank 1 is a Ray actor in the engine's
    placement group, reached over TCP; the tokens are the local ranks'."""
    ray = pytest.importorskip("ray")
    prompts = [[5, 17, 99, 3, 42, 7, 250, 11], list(range(20, 61))]
    runs = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for backend in ("mp", "ray"):
            llm = LLM(model=str(TINY_MODEL), load_format="dummy", dtype="float32",
                      max_num_batched_tokens=16, tensor_parallel_size=2,
                      distributed_executor_backend=backend)
            try:
                runs[backend] = _run(llm, prompts)[0]
                executor = llm.engine.executor
                assert isinstance(executor.workers, RayWorkers if backend == "ray"
                                  else LocalWorkers)
                assert len(executor.weight_bytes) == 2  # rank 1 reported in
            finally:
                llm.engine.executor.shutdown()
    finally:
        ray.shutdown()
    assert runs["ray"] == runs["mp"]


def test_quantized_weights_narrow_to_their_dequantized_values():
    """A rank's share of a GGUF Q4 block weight, an int4 group weight or an int8 channel
    weight holds exactly the values of that share of the whole; a share that cuts a group
    is refused."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (6, 32), dtype=torch.uint8)
    q4 = QuantizedWeight(codes, torch.rand(6, 4), torch.rand(6, 4), 8)
    int4 = Int4Weight(codes, torch.rand(6, 4), torch.randint(0, 16, (6, 4), dtype=torch.uint8), 8)
    channel = ChannelWeight(torch.randint(-127, 128, (6, 32), dtype=torch.int8), torch.rand(6))

    def values(w):
        return w.codes.float() * w.scales[:, None] if isinstance(w, ChannelWeight) \
            else w.dequantize()

    for weight in (q4, int4, channel):
        for dim, start, length in ((0, 2, 3), (1, 8, 16)):
            assert torch.equal(values(weight.narrow(dim, start, length)),
                               values(weight).narrow(dim, start, length))
    for weight in (q4, int4):
        with pytest.raises(ValueError, match="cuts the quantization groups"):
            weight.narrow(1, 4, 8)


def test_a_fused_checkpoint_tensor_loads_each_parts_share():
    """Phi-3 stores q|k|v whole: rank 1 of 2 keeps the same rows as from q, k, v apart."""
    tp = TensorParallel(rank=1, size=2)
    q, kv = Shard(4, 4, 8), Shard(2, 2, 4)
    parts = [torch.randn(8, 6), torch.randn(4, 6), torch.randn(4, 6)]
    apart, whole = (Linear(6, 16, method=DenseMethod(), output_sizes=[8, 4, 4],
                           output_shards=[q, kv, kv], tp=tp) for _ in range(2))
    for i, part in enumerate(parts):
        apart.weight.weight_loader(apart.weight, part, i)
    whole.weight.weight_loader(whole.weight, torch.cat(parts))
    expected = torch.cat([parts[0][4:8], parts[1][2:4], parts[2][2:4]])
    assert torch.equal(apart.weight, expected) and torch.equal(whole.weight, expected)
