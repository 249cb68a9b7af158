"""The engine against the transformers oracle: exact greedy tokens, batch invariance,
prefix caching, page accounting and seeded sampling (CPU, fp32, the default model)."""
import pytest

from engine import LLM, SamplingParams
from tests import oracle
from tests.conftest import TINY_MODEL

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Translate to French: I like apples.",
    "1, 2, 3, 4,",
    "Here is a list of the planets of the solar system, starting from the Sun and moving "
    "outwards, with a short note about each one of them and why astronomers find it "
    "interesting to study. Mercury is the smallest planet and the closest to the Sun. Venus is "
    "the hottest planet because of its thick atmosphere. Earth is our home and the only planet "
    "known to support life. Mars is the red planet, with the tallest volcano in the solar "
    "system. Jupiter is the largest planet, a gas giant with a great red storm. Saturn",
    "Q: What is the boiling point of water at sea level?\nA:",
    "<|im_start|>user\nWrite a haiku about the moon.<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    # A 48-token chunk budget makes the long prompt (>100 tokens) prefill in several chunks.
    return LLM(dtype="float32", quantization="none", page_size=16, max_num_batched_tokens=48,
               max_model_len=2048, enforce_eager=True)


def prompt_ids(llm, prompt: str) -> list[int]:
    return llm.tokenizer.encode(prompt)


def test_greedy_matches_transformers(llm):
    assert len(prompt_ids(llm, PROMPTS[5])) > 100  # longer than the chunk, several pages
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        expected = oracle.greedy_tokens(prompt_ids(llm, prompt), 64)
        assert out.outputs[0].token_ids == expected, prompt


def test_batch_invariance_and_preemption(llm, caplog):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert together == alone
    small = LLM(dtype="float32", quantization="none", page_size=16, num_kv_pages=40,
                max_model_len=256, enable_prefix_caching=False, enforce_eager=True)
    with caplog.at_level("WARNING", logger="scheduler.scheduler"):
        squeezed = small.generate(prompts, params)
    assert any("preempted request" in r.message for r in caplog.records)
    assert [o.outputs[0].token_ids for o in squeezed] == alone
    assert all(o.outputs[0].finish_reason == "length" for o in squeezed)
    assert small.engine.block_manager.num_free_pages == 40


def test_prefix_cache_skips_shared_prefix(llm):
    bm = llm.engine.block_manager
    prefix = llm.tokenizer.encode(PROMPTS[5])[:100]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate([prefix + [28, 253, 1345]], params)
    second = llm.generate([prefix + [42, 1012, 30, 335, 3]], params)[0]
    assert second.num_cached_tokens == 96  # six full pages of 16 out of the 100 shared tokens
    uncached = LLM(dtype="float32", quantization="none", enable_prefix_caching=False,
                   enforce_eager=True)
    expected = uncached.generate([prefix + [42, 1012, 30, 335, 3]], params)[0]
    assert second.outputs[0].token_ids == expected.outputs[0].token_ids
    assert bm.num_free_pages == bm.num_pages


def test_pages_return_to_free_after_abort(llm):
    engine, bm = llm.engine, llm.engine.block_manager
    from engine.messages import AddRequest
    for i in range(4):
        engine.add_request(AddRequest(f"abort-{i}", prompt_ids(llm, PROMPTS[i]) * 3,
                                      SamplingParams(max_tokens=50), 0.0))
    engine.step()
    engine.step()
    assert bm.num_free_pages < bm.num_pages
    outs = engine.abort([f"abort-{i}" for i in range(4)])
    assert [o.finish_reason for o in outs] == ["abort"] * 4
    assert not engine.has_unfinished()
    assert bm.num_free_pages == bm.num_pages


def test_seeded_sampling_is_reproducible_alone_and_batched(llm):
    seeded = [SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=s, max_tokens=24,
                             ignore_eos=True) for s in (1, 2)]
    alone = [llm.generate([PROMPTS[2]], p)[0].outputs[0].token_ids for p in seeded]
    others = [SamplingParams(temperature=1.0, max_tokens=24)] * 3
    batch = llm.generate([PROMPTS[2], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]],
                         [seeded[0], others[0], seeded[1], others[1], others[2]])
    assert batch[0].outputs[0].token_ids == alone[0]
    assert batch[2].outputs[0].token_ids == alone[1]
    assert alone[0] != alone[1]


def test_the_engine_seed_makes_unseeded_sampling_reproducible_across_starts():
    """vLLM's --seed: the k-th sampled request without a seed samples alike on every engine
    started with the same seed (tiny dummy model: a start costs a fraction of a second)."""
    def run(seed: int) -> list[list[int]]:
        engine = LLM(model=str(TINY_MODEL), load_format="dummy", dtype="float32",
                     num_kv_pages=16, seed=seed, enforce_eager=True)
        params = SamplingParams(temperature=1.0, max_tokens=8)
        return [engine.generate([[5, 6, 7]], params)[0].outputs[0].token_ids for _ in range(2)]

    first, again = run(7), run(7)
    assert first == again and first[0] != first[1]
    assert run(8) != first


def test_stop_string_trims_text_and_ends_request(llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate([PROMPTS[4]], params)[0].outputs[0]
    stop = full.text[6:9]
    cut = llm.generate([PROMPTS[4]], SamplingParams(temperature=0, max_tokens=40,
                                                    ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert llm.engine.block_manager.num_free_pages == llm.engine.block_manager.num_pages


def test_out_of_vocabulary_ids_are_refused_not_crashing(llm):
    vocab = llm.engine.runner.arch.vocab_size
    for prompt, params in (([1, vocab], SamplingParams()),
                           ([1, -3], SamplingParams()),
                           ([1, 2], SamplingParams(stop_token_ids=[-1])),
                           ([1, 2], SamplingParams(logit_bias={vocab + 5: 1.0}))):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate([[5, 6, 7], prompt], [SamplingParams(), params])
    assert not llm.engine.has_unfinished()
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
