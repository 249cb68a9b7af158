"""The batched sampler on synthetic logits: it draws from the right distribution."""
import torch

from engine.sampler import SamplingBatch, sample
from engine.sampling_params import SamplingParams
from scheduler.request import Request


def batch_of(params: list[SamplingParams], vocab: int, outputs=None) -> SamplingBatch:
    reqs = [Request(str(i), [1, 2], p, output_token_ids=list(outputs[i]) if outputs else [])
            for i, p in enumerate(params)]
    return SamplingBatch.from_requests(reqs, vocab)


def test_random_draws_follow_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    params = [SamplingParams(temperature=1.0)] * 4000
    tokens, _ = sample(logits, batch_of(params, 4))
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.03)


def test_top_k_top_p_min_p_truncate():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(3, 1)
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=1.0, min_p=0.3)]
    seen = [set() for _ in params]
    for _ in range(200):
        tokens, _ = sample(logits.clone(), batch_of(params, 5))
        for s, t in zip(seen, tokens):
            s.add(t)
    assert seen[0] == {0, 1}
    assert seen[1] == {0}  # p(0) = 0.64 alone covers 0.5
    assert seen[2] == {0, 1}  # p(1) = 0.24 > 0.3 * 0.64, p(2) = 0.09 is not


def test_a_top_k_past_the_vocabulary_keeps_every_token_even_past_int64():
    logits = torch.tensor([[3.0, 2.0, 1.0]]).repeat(4, 1)
    params = [SamplingParams(temperature=1.0, top_k=k) for k in (3, 10**6, 2**70)]
    seen = set()
    for _ in range(100):
        seen.update(sample(logits.clone(), batch_of(params + [
            SamplingParams(temperature=1.0, top_k=1)], 3))[0][:3])
    assert seen == {0, 1, 2}


def test_greedy_rows_mixed_with_random_rows():
    logits = torch.tensor([[0.0, 5.0, 0.0], [1.0, 1.0, 1.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7)]
    tokens, _ = sample(logits.clone(), batch_of(params, 3))
    again, _ = sample(logits.clone(), batch_of(params, 3))
    assert tokens[0] == 1 and tokens == again


def test_logit_bias_penalties_and_min_tokens_ban():
    logits = torch.zeros(3, 4)
    params = [SamplingParams(temperature=0, logit_bias={3: 100.0}),
              SamplingParams(temperature=0, frequency_penalty=1.0),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[0])]
    logits[1, 2] = 0.5  # token 2 leads, but was generated twice: 0.5 - 2 * 1.0
    logits[2, 0] = 9.0  # stop token 0 is banned until 2 tokens are out
    tokens, _ = sample(logits, batch_of(params, 4, outputs=[[], [2, 2], [1]]))
    assert tokens[0] == 3 and tokens[1] != 2 and tokens[2] != 0


def test_logprobs_are_raw_log_softmax_sorted():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    tokens, lps = sample(logits.clone(), batch_of([SamplingParams(temperature=0, logprobs=3)], 4))
    expected = logits.log_softmax(-1)[0]
    assert tokens == [1]
    assert abs(lps[0].logprob - expected[1].item()) < 1e-6
    assert [t for t, _ in lps[0].top] == [1, 2, 0]
