"""KV eviction in the engine (scheduler/kv_policy.py): the log-probs under a policy equal a
transformers reference that masks the evicted tokens at their original positions, pages shared
with other requests are copied before a write, and page counts return to zero (CPU, fp32)."""
import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.messages import AddRequest
from scheduler.kv_policy import H2OPolicy, SnapKVPolicy
from tests import oracle

SINKS, WINDOW, CHUNK, PAGE = 4, 16, 8, 4
POLICY = f"streaming:sinks={SINKS},window={WINDOW}"
TEXT = ("The lighthouse keeper climbed the stairs every evening at dusk, counting the steps as "
        "his father had taught him, and lit the great lamp that warned the fishing boats away "
        "from the rocks below the cliff, where the sea had broken many hulls.")


@pytest.fixture(scope="module")
def llm():
    return LLM(enforce_eager=True, dtype="float32", quantization="none", page_size=PAGE,
               max_num_batched_tokens=CHUNK, max_model_len=256)


def streaming_visible(chunk_starts: list[int], length: int) -> torch.Tensor:
    """Query p of a step whose chunk starts at c sees the sinks, the last WINDOW tokens
    before c, and its chunk up to itself."""
    visible = torch.zeros(length, length, dtype=torch.bool)
    bounds = chunk_starts + [length]
    for c, end in zip(bounds, bounds[1:]):
        for p in range(c, end):
            visible[p, :min(SINKS, p + 1)] = True
            visible[p, max(c - WINDOW, 0):p + 1] = True
    return visible


def test_streaming_log_probs_equal_a_masked_reference(llm):
    ids = llm.tokenizer.encode(TEXT)
    assert len(ids) > 2 * (SINKS + WINDOW)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, logprobs=0,
                                             prompt_logprobs=0, kv_policy=POLICY))[0]
    generated = out.outputs[0].token_ids
    full = ids + generated
    # Prompt chunks of CHUNK tokens, then one step per generated token after the first.
    starts = list(range(0, len(ids), CHUNK)) + list(range(len(ids), len(full) - 1))
    reference = oracle.masked_logits(full[:-1], streaming_visible(starts, len(full) - 1))
    reference = reference.log_softmax(-1)
    engine = [lp.logprob for lp in out.prompt_logprobs[1:]] + \
             [lp.logprob for lp in out.outputs[0].logprobs]
    expected = reference.gather(1, torch.tensor(full[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(engine), expected, atol=2e-3, rtol=0)
    assert generated == reference[len(ids) - 1:].argmax(-1).tolist()
    # The evicted count: all computed tokens but the sinks, the window and the last token.
    assert out.kv_evicted_tokens == len(full) - 1 - SINKS - WINDOW - 1
    # Without eviction the same prompt's log-probs differ: the mask mattered.
    dense = oracle.logits(full[:-1]).log_softmax(-1)
    assert (dense.gather(1, torch.tensor(full[1:])[:, None]).squeeze(1)
            - expected).abs().max() > 0.1
    assert llm.engine.block_manager.num_free_pages == llm.engine.block_manager.num_pages


def test_snapkv_with_given_keep_sets_equals_a_per_head_masked_reference(llm, monkeypatch):
    """The policy's choice replaced by fixed random keep-sets, a different one per layer and KV
    head: decoding after the eviction equals transformers masking each head to its set."""
    ids = llm.tokenizer.encode(TEXT)[:45]
    n, budget, window = len(ids), 20, 4
    layers, kv_heads = 30, 3
    gen = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.randperm(n, generator=gen)[:budget].sort().values
                        for _ in range(layers * kv_heads)]).view(layers, kv_heads, budget)
    seen = []

    def given_keep(self, scores, positions, num_computed, num_prompt):
        if scores is None or num_computed < num_prompt:
            return None
        seen.append(scores.copy())  # the eviction moves them in place
        return keep.numpy()

    monkeypatch.setattr(SnapKVPolicy, "head_keep", given_keep)
    out = llm.generate([ids], SamplingParams(
        temperature=0, max_tokens=8, logprobs=0,
        kv_policy=f"snapkv:budget={budget},window={window}"))[0]
    # The engine scored the window's queries: each query's probabilities sum to 1 per query
    # head, so each KV head's row sums to window x its 3 query heads.
    (scores,) = seen
    assert scores.shape == (layers, kv_heads, n)
    torch.testing.assert_close(torch.from_numpy(scores).sum(-1),
                               torch.full((layers, kv_heads), 3.0 * window), rtol=1e-4, atol=0)
    full = ids + out.outputs[0].token_ids
    length = len(full) - 1
    visible = torch.ones(length, length, dtype=torch.bool).tril().repeat(layers, kv_heads, 1, 1)
    held = torch.zeros(layers, kv_heads, n, dtype=torch.bool).scatter_(-1, keep, True)
    visible[:, :, n:, :n] = held[:, :, None, :]  # decode steps after the eviction
    reference = oracle.head_masked_logits(full[:-1], visible).log_softmax(-1)
    expected = reference[n - 1:].gather(1, torch.tensor(full[n:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in out.outputs[0].logprobs]),
                               expected, atol=2e-3, rtol=0)
    assert out.kv_evicted_tokens == n - budget
    assert llm.engine.block_manager.num_free_pages == llm.engine.block_manager.num_pages


def test_h2o_log_probs_equal_a_reference_masking_what_each_head_kept(llm, monkeypatch):
    """H2O's own choices, step by step (prompt chunks, then decode): every log-prob equals
    transformers masking each layer's KV head to the positions it held at that step."""
    ids = llm.tokenizer.encode(TEXT)[:40]
    n, budget = len(ids), 16
    decisions = {}  # computed tokens at the decision -> positions kept [L, KvH, budget]
    choose = H2OPolicy.head_keep

    def recorded(self, scores, positions, num_computed, num_prompt):
        keep = choose(self, scores, positions, num_computed, num_prompt)
        if keep is not None:
            decisions[num_computed] = np.take_along_axis(
                np.broadcast_to(positions, scores.shape), keep, -1)
        return keep

    monkeypatch.setattr(H2OPolicy, "head_keep", recorded)
    out = llm.generate([ids], SamplingParams(
        temperature=0, max_tokens=10, logprobs=0, prompt_logprobs=0,
        kv_policy=f"h2o:budget={budget},recent=4"))[0]
    full = ids + out.outputs[0].token_ids
    length = len(full) - 1
    starts = list(range(0, n, CHUNK)) + list(range(n, length))
    assert set(decisions) <= set(starts) and len(decisions) >= 3
    visible = torch.zeros(30, 3, length, length, dtype=torch.bool)
    held = torch.zeros(30, 3, length, dtype=torch.bool)
    for c, end in zip(starts, starts[1:] + [length]):
        if c in decisions:
            held = torch.zeros_like(held).scatter_(-1, torch.from_numpy(decisions[c]), True)
        for p in range(c, end):
            held[..., p] = True
            visible[:, :, p] = held
    reference = oracle.head_masked_logits(full[:-1], visible).log_softmax(-1)
    expected = reference.gather(1, torch.tensor(full[1:])[:, None]).squeeze(1)
    engine = [lp.logprob for lp in out.prompt_logprobs[1:]] + \
             [lp.logprob for lp in out.outputs[0].logprobs]
    torch.testing.assert_close(torch.tensor(engine), expected, atol=2e-3, rtol=0)
    assert out.kv_evicted_tokens == length - budget - 1
    assert llm.engine.block_manager.num_free_pages == llm.engine.block_manager.num_pages


def test_a_request_sharing_pages_with_an_evicting_one_is_unchanged(llm):
    """The evicting request hits the other's cached prompt pages and moves tokens into them:
    it must copy them first. A third request then hits the pages the evicting one left cached
    and must see what their hashes name."""
    ids = llm.tokenizer.encode(TEXT)[:40]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    alone = llm.generate([ids], greedy)[0].outputs[0].token_ids
    bm = llm.engine.block_manager
    assert bm.num_free_pages == bm.num_pages
    # Both at once: the plain one first, the evicting one hitting its pages.
    outs = llm.generate([ids, ids], [greedy, SamplingParams(temperature=0, max_tokens=24,
                                                            kv_policy=POLICY)])
    assert outs[0].outputs[0].token_ids == alone
    assert outs[1].kv_evicted_tokens > 0
    assert bm.num_free_pages == bm.num_pages
    later = llm.generate([ids + alone[:8]], SamplingParams(temperature=0, max_tokens=8))[0]
    assert later.num_cached_tokens > 0
    assert later.outputs[0].token_ids == alone[8:16]


def test_pages_return_after_preemption_and_abort_of_evicting_requests():
    llm = LLM(enforce_eager=True, dtype="float32", quantization="none", page_size=PAGE,
              max_num_batched_tokens=12, num_kv_pages=12, max_model_len=48, kv_policy=POLICY)
    engine, bm = llm.engine, llm.engine.block_manager
    ids = llm.tokenizer.encode(TEXT)[:30]
    params = SamplingParams(temperature=0, max_tokens=18, ignore_eos=True)
    for i in range(4):
        engine.add_request(AddRequest(f"p{i}", ids[i:], params, 0.0))
    preemptions, evicted, peak = 0, {}, 0
    while engine.has_unfinished():
        step = engine.step()
        preemptions += step.stats.num_preemptions
        peak = max(peak, step.stats.num_kv_pages_used)
        evicted |= {o.request_id: o.num_evicted_tokens for o in step.outputs if o.finish_reason}
    assert preemptions > 0 and len(evicted) == 4 and all(evicted.values())
    assert bm.num_free_pages == bm.num_pages
    # Aborted mid-way, running (having evicted) or waiting after a preemption.
    for i in range(3):
        engine.add_request(AddRequest(f"a{i}", ids, params, 0.0))
    for _ in range(12):
        engine.step()
    assert any(r.num_evicted_tokens for r in engine.scheduler.running)
    engine.abort(["a0", "a1", "a2"])
    assert bm.num_free_pages == bm.num_pages
