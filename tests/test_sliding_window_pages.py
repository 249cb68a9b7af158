"""Sliding-window models give back the pages before the window (scheduler/block_manager.py,
`release_before`): a long request holds a bounded number of pages at every step, its tokens
stay equal to transformers' sliding-window greedy output, and the pool returns to all-free
after finishing, preemption and abort (CPU, fp32, a tiny random Mistral)."""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.messages import AddRequest
from scheduler.block_manager import RELEASED
from server.local_server import write_tiny_tokenizer
from tests.test_model_families import oracle_greedy, write_checkpoint

transformers = pytest.importorskip("transformers")

WINDOW, PAGE, CHUNK = 24, 4, 16
# The step's first query reads WINDOW - 1 tokens before it; with the step's own tokens they
# span at most this many pages.
MOST_PAGES = -(-(WINDOW - 1 + CHUNK) // PAGE) + 1
PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("mistral"), "MistralConfig",
                            {"sliding_window": WINDOW})


def engine_llm(checkpoint, **kwargs) -> LLM:
    return LLM(model=str(checkpoint), tokenizer=str(write_tiny_tokenizer(checkpoint.parent)),
               dtype="float32", quantization="none", page_size=PAGE,
               max_num_batched_tokens=CHUNK, enforce_eager=True, **kwargs)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return engine_llm(checkpoint, num_kv_pages=64, max_model_len=256)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(4, 300, (n,),  # words the tiny tokenizer has
                         generator=torch.Generator().manual_seed(seed)).tolist()


def held_pages(request) -> int:
    return sum(p != RELEASED for p in request.page_ids)


def test_a_long_request_holds_only_its_window_and_stays_exact(llm, checkpoint):
    oracle = transformers.AutoModelForCausalLM.from_pretrained(checkpoint,
                                                               dtype=torch.float32).eval()
    ids = prompt(150)
    engine, bm = llm.engine, llm.engine.block_manager
    engine.add_request(AddRequest("long", ids, PARAMS, 0.0))
    engine.step()
    request, most = engine.scheduler.running[0], 0
    tokens = []
    while engine.has_unfinished():
        start = request.num_computed_tokens  # the step's first query, which reads from
        step = engine.step()                 # start + 1 - WINDOW on
        tokens += [t for o in step.outputs for t in o.new_token_ids]
        if request.page_ids:
            # The pool's count agrees with the request's table: released pages are free.
            assert bm.num_pages - bm.num_free_pages == held_pages(request)
            assert all(p == RELEASED for p in request.page_ids[:max(start + 1 - WINDOW, 0) // PAGE])
            most = max(most, held_pages(request))
    # 174 tokens would take 44 pages; the window keeps a handful.
    assert 1 < most <= MOST_PAGES
    assert bm.num_free_pages == bm.num_pages
    assert tokens == oracle_greedy(oracle, ids)


def test_pages_return_after_preemption_and_abort(checkpoint, llm):
    """Three long requests on 12 pages preempt each other and still decode as they do in a roomy pool;
    aborted mid-prompt and mid-decode, they leave the pool all free."""
    small = engine_llm(checkpoint, num_kv_pages=12, max_model_len=48)
    engine, bm = small.engine, small.engine.block_manager
    prompts = [prompt(24, seed) for seed in range(3)]
    roomy = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]
    preemptions = 0
    for i, ids in enumerate(prompts):
        engine.add_request(AddRequest(f"p{i}", ids, PARAMS, 0.0))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        step = engine.step()
        preemptions += step.stats.num_preemptions
        for o in step.outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert preemptions > 0
    assert [tokens[f"p{i}"] for i in range(3)] == roomy
    assert bm.num_free_pages == bm.num_pages
    for i, ids in enumerate(prompts):
        engine.add_request(AddRequest(f"a{i}", ids, PARAMS, 0.0))
    for _ in range(6):
        engine.step()
    assert any(r.page_ids[0] == RELEASED for r in engine.scheduler.running)
    engine.abort(["a0", "a1", "a2"])
    assert bm.num_free_pages == bm.num_pages
