"""Prompt logprobs through the chunked, paged engine against the transformers oracle, with and
without a shared prefix, and `tessera bench perplexity` (CPU, fp32, the default model)."""
import json
import math
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.bench_perplexity import DEFAULT_FILE
from engine.messages import TokenLogprobs
from server import cli
from tests import oracle

TEXT = ("Here is a list of the planets of the solar system, starting from the Sun and moving "
        "outwards, with a short note about each one of them and why astronomers find it "
        "interesting to study. Mercury is the smallest planet and the closest to the Sun. Venus "
        "is the hottest planet because of its thick atmosphere.")
CHUNK = 16


@pytest.fixture(scope="module")
def llm():
    return LLM(enforce_eager=True, dtype="float32", quantization="none", page_size=16,
               max_num_batched_tokens=CHUNK, max_model_len=512)


def assert_matches_oracle(ids: list[int], prompt_logprobs: list[TokenLogprobs | None],
                          num_top: int) -> None:
    reference = oracle.logits(ids).log_softmax(-1)
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for p, lp in enumerate(prompt_logprobs[1:]):
        row, target = reference[p], reference[p, ids[p + 1]]
        assert abs(lp.logprob - target.item()) < 1e-3, p
        # Ranks agree up to near-ties within the tolerance.
        assert (row > target + 1e-3).sum() < lp.rank <= (row > target - 1e-3).sum() + 1, p
        top = torch.tensor([v for _, v in lp.top])
        torch.testing.assert_close(top, row.topk(num_top).values, atol=1e-3, rtol=0)


def test_prompt_logprobs_over_several_chunks_equal_the_oracle(llm):
    ids = llm.tokenizer.encode(TEXT)
    assert len(ids) > 3 * CHUNK
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5))[0]
    assert_matches_oracle(ids, out.prompt_logprobs, 5)
    assert out.outputs[0].logprobs is None  # prompt logprobs do not switch on output logprobs


def test_prompt_logprobs_bypass_the_prefix_cache_and_others_still_hit_it(llm):
    prefix = llm.tokenizer.encode(TEXT)[:48]
    params = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([prefix + [28, 253]], params)  # caches the three full pages of the prefix
    ids = prefix + [42, 1012, 30]
    asking = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1,
                                                prompt_logprobs=0))[0]
    assert asking.num_cached_tokens == 0
    assert_matches_oracle(ids, asking.prompt_logprobs, 0)
    plain = llm.generate([prefix + [335, 3]], params)[0]
    assert plain.num_cached_tokens == 48 and plain.prompt_logprobs is None
    assert llm.engine.block_manager.num_free_pages == llm.engine.block_manager.num_pages


@pytest.mark.skipif(not Path(DEFAULT_FILE).exists(), reason=f"{DEFAULT_FILE} not installed")
def test_bench_perplexity_json_equals_the_oracle_perplexity(llm, capsys):
    cli.main(["bench", "perplexity", "--max-tokens", "256", "--json", "--dtype", "float32",
              "--quantization", "none",
              "--max-num-batched-tokens", "64"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens_evaluated"] == 256 and result["windows"] == 1
    ids = llm.tokenizer.encode(Path(DEFAULT_FILE).read_text())[:257]
    logprobs = oracle.logits(ids).log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
    assert math.isclose(result["ppl"], math.exp(-logprobs.mean().item()), rel_tol=1e-4)
    assert 1 < result["ppl"] < 100
