"""Sliding windows give back the pages before the window (scheduler/block_manager.py,
`release_before`): on Mistral (every layer sliding) a request's pages in the main pool, on
Gemma 3 (a sliding layer and a global one) those of the sliding layers' own pool. A long
request holds a bounded number of such pages at every step, its tokens equal transformers'
greedy output, a prefix hit takes only the pages the window reads, and the pools return to
all-free after finishing, preemption and abort (CPU, fp32, tiny random checkpoints)."""
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
FAMILIES = {
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": WINDOW,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
}


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    config_class, overrides = FAMILIES[request.param]
    return write_checkpoint(tmp_path_factory.mktemp(request.param), config_class, overrides)


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


def windowed(llm, request):
    """The pool whose pages the window releases, and the request's hold there."""
    streaming = llm.engine.scheduler.streaming
    if streaming is None:
        return llm.engine.block_manager, request
    return streaming.block_manager, request.streaming


def pools(llm):
    streaming = llm.engine.scheduler.streaming
    return [llm.engine.block_manager] + ([streaming.block_manager] if streaming else [])


def held_pages(hold) -> int:
    return sum(p != RELEASED for p in hold.page_ids)


def test_a_long_request_holds_only_its_window_and_stays_exact(llm, checkpoint):
    oracle = transformers.AutoModelForCausalLM.from_pretrained(checkpoint,
                                                               dtype=torch.float32).eval()
    ids = prompt(150)
    engine = llm.engine
    engine.add_request(AddRequest("long", ids, PARAMS, 0.0))
    engine.step()
    request = engine.scheduler.running[0]
    bm, hold = windowed(llm, request)
    most, tokens = 0, []
    while engine.has_unfinished():
        start = request.num_computed_tokens  # the step's first query, which reads from
        step = engine.step()                 # start + 1 - WINDOW on
        tokens += [t for o in step.outputs for t in o.new_token_ids]
        if hold.page_ids:
            # The pool's count agrees with the request's table: released pages are free.
            assert bm.num_pages - bm.num_free_pages == held_pages(hold)
            assert all(p == RELEASED for p in hold.page_ids[:max(start + 1 - WINDOW, 0) // PAGE])
            most = max(most, held_pages(hold))
            if hold is not request:  # the global layers' pool keeps every token
                assert held_pages(request) == -(-request.num_computed_tokens // PAGE)
    # 174 tokens would take 44 pages; the window keeps a handful.
    assert 1 < most <= MOST_PAGES
    assert all(pool.num_free_pages == pool.num_pages for pool in pools(llm))
    assert tokens == oracle_greedy(oracle, ids)


def test_a_prefix_hit_takes_the_pages_the_window_reads(llm, checkpoint):
    """The second request shares 61 tokens with the first: it hits 15 pages, holds in the
    windowed pool only those its first query's window reads, and decodes as it does with no
    cache."""
    shared = prompt(61, seed=1)
    first, second = shared + prompt(9, seed=2), shared + prompt(12, seed=3)
    engine = llm.engine
    engine.add_request(AddRequest("first", first, PARAMS, 0.0))
    while engine.has_unfinished():
        engine.step()
    engine.add_request(AddRequest("second", second, PARAMS, 0.0))
    step = engine.step()
    request = engine.scheduler.running[0]
    assert step.stats.prefix_cache_hits == 60
    _, hold = windowed(llm, request)
    released = (60 + 1 - WINDOW) // PAGE  # pages wholly before the 61st token's window
    assert hold.page_ids[:released] == [RELEASED] * released
    tokens = [t for o in step.outputs for t in o.new_token_ids]
    while engine.has_unfinished():
        tokens += [t for o in engine.step().outputs for t in o.new_token_ids]
    uncached = engine_llm(checkpoint, num_kv_pages=64, max_model_len=256,
                          enable_prefix_caching=False)
    assert tokens == uncached.generate([second], PARAMS)[0].outputs[0].token_ids
    assert all(pool.num_free_pages == pool.num_pages for pool in pools(llm))


def test_pages_return_after_preemption_and_abort(checkpoint, llm):
    """Three long requests on 12 pages preempt each other and still decode as they do in a
    roomy pool; aborted mid-prompt and mid-decode, they leave the pools all free."""
    small = engine_llm(checkpoint, num_kv_pages=12, max_model_len=48)
    engine = small.engine
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
    assert all(pool.num_free_pages == pool.num_pages for pool in pools(small))
    for i, ids in enumerate(prompts):
        engine.add_request(AddRequest(f"a{i}", ids, PARAMS, 0.0))
    for _ in range(6):
        engine.step()
    assert any(windowed(small, r)[1].page_ids[0] == RELEASED for r in engine.scheduler.running)
    engine.abort(["a0", "a1", "a2"])
    assert all(pool.num_free_pages == pool.num_pages for pool in pools(small))
