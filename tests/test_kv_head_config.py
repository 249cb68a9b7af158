"""Head-wise KV budgets (scheduler/head_config.py): heads a head config names streaming keep
sinks + window in a pool of their own. The log-probs equal transformers masking exactly those
heads to sinks + window at the original positions, the memory a request holds falls by what
the narrower pages save, and both pools return to all-free (CPU, fp32)."""
import json

import httpx
import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.messages import AddRequest
from tests import oracle
from tests.test_kv_eviction import CHUNK, PAGE, SINKS, TEXT, WINDOW, streaming_visible

LAYERS, KV_HEADS = 30, 3
# Most layers stream two of their three KV heads, a different choice per layer; layers 0, 12
# and 24 stream all three and layers 1 and 2 none (so each pool has layers without heads).
STREAMING = [(layer, head) for layer in range(LAYERS) for head in range(KV_HEADS)
             if layer not in (1, 2)
             and ((layer + head) % 3 != 0 or (layer % 4 == 0 and head == layer % 3))]


def write_config(path, streaming, sinks=SINKS, window=WINDOW) -> str:
    path.write_text(json.dumps({"sinks": sinks, "window": window,
                                "streaming": [list(h) for h in streaming]}))
    return str(path)


@pytest.fixture(scope="module")
def head_config(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("heads") / "heads.json", STREAMING)


@pytest.fixture(scope="module")
def llm(head_config):
    return LLM(enforce_eager=True, dtype="float32", quantization="none", page_size=PAGE,
               max_num_batched_tokens=CHUNK, max_num_seqs=4, max_model_len=256,
               kv_head_config=head_config)


def pools(llm):
    return llm.engine.block_manager, llm.engine.scheduler.streaming.block_manager


def test_log_probs_equal_a_reference_masking_the_streaming_heads(llm):
    ids = llm.tokenizer.encode(TEXT)
    assert len(ids) > 2 * (SINKS + WINDOW)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=10, logprobs=0,
                                             prompt_logprobs=0))[0]
    generated = out.outputs[0].token_ids
    full = ids + generated
    length = len(full) - 1
    starts = list(range(0, len(ids), CHUNK)) + list(range(len(ids), length))
    visible = torch.ones(length, length, dtype=torch.bool).tril().repeat(LAYERS, KV_HEADS, 1, 1)
    for layer, head in STREAMING:
        visible[layer, head] = streaming_visible(starts, length)
    reference = oracle.head_masked_logits(full[:-1], visible).log_softmax(-1)
    expected = reference.gather(1, torch.tensor(full[1:])[:, None]).squeeze(1)
    engine = [lp.logprob for lp in out.prompt_logprobs[1:]] + \
             [lp.logprob for lp in out.outputs[0].logprobs]
    torch.testing.assert_close(torch.tensor(engine), expected, atol=2e-3, rtol=0)
    assert generated == reference[len(ids) - 1:].argmax(-1).tolist()
    # The streaming heads' masks mattered: the dense model's log-probs differ.
    dense = oracle.logits(full[:-1]).log_softmax(-1)
    assert (dense.gather(1, torch.tensor(full[1:])[:, None]).squeeze(1)
            - expected).abs().max() > 0.1
    assert all(bm.num_free_pages == bm.num_pages for bm in pools(llm))


def test_a_long_request_holds_the_memory_the_narrower_pages_save(llm):
    """Mid-way through a long request: the full-context pool holds every token at the width
    of the heads that are not streaming, the streaming pool sinks + window + the step's."""
    engine, (full, streaming) = llm.engine, pools(llm)
    ids = llm.tokenizer.encode(TEXT * 3)[:150]
    engine.add_request(AddRequest("long", ids, SamplingParams(temperature=0, max_tokens=4), 0.))
    engine.step()
    request = engine.scheduler.running[0]
    while request.num_computed_tokens < len(ids) - CHUNK:
        engine.step()
    n, held = request.num_computed_tokens, request.streaming.num_kv_tokens
    assert held == SINKS + WINDOW + CHUNK  # the last step's chunk is evicted before the next
    assert full.num_pages - full.num_free_pages == -(-n // PAGE)
    assert streaming.num_pages - streaming.num_free_pages == -(-held // PAGE)
    runner, num_streaming = engine.runner, len(STREAMING)
    per_head_token = 2 * runner.arch.head_dim * 4  # K and V, fp32
    assert runner.kv_spec.token_bytes == (LAYERS * KV_HEADS - num_streaming) * per_head_token
    assert runner.streaming_cache.spec.token_bytes == num_streaming * per_head_token
    used = (-(-n // PAGE) * runner.kv_spec.page_bytes
            + -(-held // PAGE) * runner.streaming_cache.spec.page_bytes)
    dense = -(-n // PAGE) * PAGE * LAYERS * KV_HEADS * per_head_token
    assert 1 - used / dense > 0.5  # 59 of 90 heads hold 28 of ~140 tokens
    stats = engine.idle_stats().stats  # what the metrics show: both pools' pages
    assert stats.num_kv_pages_total == full.num_pages + streaming.num_pages
    assert stats.num_kv_pages_used == -(-n // PAGE) + -(-held // PAGE)
    while engine.has_unfinished():
        engine.step()
    assert all(bm.num_free_pages == bm.num_pages for bm in pools(llm))


def test_pages_return_after_preemption_and_abort(head_config):
    llm = LLM(enforce_eager=True, dtype="float32", quantization="none", page_size=PAGE,
              max_num_batched_tokens=12, num_kv_pages=12, max_num_seqs=4, max_model_len=48,
              kv_head_config=head_config)
    engine, bms = llm.engine, pools(llm)
    ids = llm.tokenizer.encode(TEXT)[:30]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = llm.generate([ids[:20]], params)[0].outputs[0].token_ids
    for i in range(2):
        engine.add_request(AddRequest(f"p{i}", ids[:20], params, 0.0))
    preemptions, outputs = 0, {}
    while engine.has_unfinished():
        step = engine.step()
        preemptions += step.stats.num_preemptions
        for o in step.outputs:
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
    # Recomputed after preemption, every request still decodes as it does alone.
    assert preemptions > 0 and all(tokens == alone for tokens in outputs.values())
    assert all(bm.num_free_pages == bm.num_pages for bm in bms)
    for i in range(3):
        engine.add_request(AddRequest(f"a{i}", ids, params, 0.0))
    for _ in range(4):
        engine.step()
    engine.abort(["a0", "a1", "a2"])
    assert all(bm.num_free_pages == bm.num_pages for bm in bms)


def test_bad_configs_and_combinations_are_refused(tmp_path, head_config):
    every = [(layer, head) for layer in range(LAYERS) for head in range(KV_HEADS)]
    with pytest.raises(ValueError, match="but not all"):
        LLM(dtype="float32", quantization="none", max_model_len=256,
            kv_head_config=write_config(tmp_path / "all.json", every))
    with pytest.raises(ValueError, match=r"no \(30, 0\)"):
        LLM(dtype="float32", quantization="none", max_model_len=256,
            kv_head_config=write_config(tmp_path / "past.json", [(30, 0)]))
    with pytest.raises(ValueError, match="kv-head-config .*missing.json"):
        LLM(dtype="float32", quantization="none", kv_head_config=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="kv_policy must be none"):
        LLM(dtype="float32", quantization="none", kv_head_config=head_config,
            kv_policy="streaming:sinks=4,window=16")


def test_a_request_naming_a_kv_policy_is_refused(llm):
    with pytest.raises(ValueError, match="cannot be combined"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, kv_policy="h2o:budget=8"))
    assert np.all([bm.num_free_pages == bm.num_pages for bm in pools(llm)])


def test_calibrate_heads_streams_the_heads_that_look_least_at_the_needle(tmp_path, capsys):
    """A bounded `tessera calibrate heads`: the file loads as a head config, and the heads it
    streams are the half whose retrieving queries paid the needle the least attention."""
    from engine import calibrate_heads
    from scheduler.head_config import load_head_config

    path = tmp_path / "heads.json"
    calibrate_heads.main(["--out", str(path), "--length", "160", "--prompts", "2",
                          "--window", "60", "--queries", "4", "--dtype", "float32"])
    config = load_head_config(str(path))
    assert (config.sinks, config.window, len(config.streaming)) == (4, 60, 45)
    scores = np.array(json.loads(path.read_text())["scores"])
    streams = config.streaming_mask(LAYERS, KV_HEADS)
    assert scores.shape == (LAYERS, KV_HEADS) and 0 <= scores.min() < scores.max() <= 1
    assert scores[streams].max() <= scores[~streams].min()
    assert "45 of 90 KV heads stream" in capsys.readouterr().out


def test_a_server_with_a_head_config_serves_and_answers_a_kv_policy_with_a_400(tmp_path):
    """A real server on the tiny model (2 layers of 2 KV heads, one streaming in each) driven
    by the openai client: a completion longer than sinks + window runs, a request naming a
    kv_policy is a 400 naming it, and no page stays used."""
    import openai

    from tests.conftest import metric_value, start_tiny_server, stop_server

    config = write_config(tmp_path / "heads.json", [(0, 1), (1, 0)], sinks=2, window=8)
    server = start_tiny_server(tmp_path, ["--kv-head-config", config, "--max-model-len", "64"])
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt="hello there", max_tokens=24,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 24
        # Each streaming head holds sinks + window + the last step's token of what was computed.
        computed = out.usage.prompt_tokens + 24 - 1
        assert out.usage.kv_evicted_tokens == computed - (2 + 8 + 1)
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=model, prompt="hi", max_tokens=2,
                                      extra_body={"kv_policy": "streaming:sinks=4,window=16"})
        assert refused.value.body["param"] == "kv_policy"
        metrics = httpx.get(f"{server.base_url}/metrics").text
        assert metric_value(metrics, "tessera:kv_cache_usage_perc") == 0
    finally:
        stop_server(server)
