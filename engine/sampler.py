"""Batched sampling on tensors: logits processors, then greedy or random draws per row.

Random rows use the exponential-race form of sampling (argmax of p / E with E ~ Exp(1)), which
draws exactly from p. A seeded request's noise comes from a generator seeded by (seed, output
position), so its tokens do not depend on what else shares the batch.
"""
from dataclasses import dataclass

import torch

from engine.messages import TokenLogprobs
from engine.structured_output import apply_bitmask
from scheduler.request import Request


@dataclass
class SamplingBatch:
    """Per-row parameters of one step's sampled requests, as tensors (built once per step)."""
    temperature: torch.Tensor  # [B], 1 for greedy rows (they take the argmax)
    greedy_rows: torch.Tensor  # [B] bool
    top_k: torch.Tensor | None  # [B] int, vocab size for "off"
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    seeds: list[int | None]
    positions: list[int]  # output index of the token being sampled (seeds the noise)
    all_greedy: bool
    banned: list[list[int]]  # stop/EOS ids forbidden while below min_tokens
    logit_bias: list[dict[int, float]]
    penalties: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # presence, freq, rep
    output_ids: list[list[int]]
    prompt_ids: list[list[int]]
    num_logprobs: list[int] | None  # top alternatives per row, 0 if not asked; None: none asks
    bitmask: torch.Tensor | None = None  # structured output: allowed tokens per row

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: no processor, no draw, no logprobs (any device works)."""
        return (self.all_greedy and self.bitmask is None and self.penalties is None
                and self.num_logprobs is None and not any(self.logit_bias)
                and not any(self.banned))

    @classmethod
    def from_requests(cls, requests: list[Request], vocab_size: int,
                      bitmask: torch.Tensor | None = None) -> "SamplingBatch":
        ps = [r.sampling_params for r in requests]
        temps = torch.tensor([p.temperature for p in ps], dtype=torch.float32)
        need_k = any(p.top_k for p in ps)
        need_p = any(p.top_p < 1 for p in ps)
        need_min_p = any(p.min_p > 0 for p in ps)
        need_pen = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1
                       for p in ps)
        return cls(
            temperature=torch.where(temps == 0, 1.0, temps),
            greedy_rows=temps == 0,
            # Clamped: a top_k past int64 (a client's 1e30) would not even fit the tensor.
            top_k=torch.tensor([min(p.top_k, vocab_size) or vocab_size for p in ps])
            if need_k else None,
            top_p=torch.tensor([p.top_p for p in ps]) if need_p else None,
            min_p=torch.tensor([p.min_p for p in ps]) if need_min_p else None,
            seeds=[p.seed if p.temperature > 0 else None for p in ps],
            positions=[len(r.output_token_ids) for r in requests],
            all_greedy=all(p.temperature == 0 for p in ps),
            banned=[(list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids)))
                    if len(r.output_token_ids) < p.min_tokens else [] for p, r in
                    zip(ps, requests)],
            logit_bias=[p.logit_bias for p in ps],
            penalties=(torch.tensor([p.presence_penalty for p in ps]),
                       torch.tensor([p.frequency_penalty for p in ps]),
                       torch.tensor([p.repetition_penalty for p in ps])) if need_pen else None,
            output_ids=[r.output_token_ids for r in requests],
            prompt_ids=[r.prompt_token_ids for r in requests],
            num_logprobs=([p.logprobs or 0 for p in ps]
                          if any(p.logprobs is not None for p in ps) else None),
            bitmask=bitmask,
        )


def _token_mask(rows: list[list[int]], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row counts `[B, V]` of the listed token ids, and their presence mask."""
    counts = torch.zeros(len(rows), vocab_size)
    for i, ids in enumerate(rows):
        if ids:
            counts[i].index_add_(0, torch.tensor(ids), torch.ones(len(ids)))
    return counts, counts > 0


def apply_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Grammar mask, logit bias, min_tokens bans and penalties (OpenAI/vLLM semantics)."""
    if batch.bitmask is not None:
        apply_bitmask(logits, batch.bitmask)
    for i, (bias, banned) in enumerate(zip(batch.logit_bias, batch.banned)):
        if bias:
            logits[i, list(bias)] += torch.tensor(list(bias.values()))
        if banned:
            logits[i, banned] = -float("inf")
    if batch.penalties is not None:
        presence, frequency, repetition = batch.penalties
        counts, seen = _token_mask(batch.output_ids, logits.shape[1])
        _, in_prompt = _token_mask(batch.prompt_ids, logits.shape[1])
        rep = torch.where(seen | in_prompt, repetition[:, None], 1.0)
        logits.copy_(torch.where(logits > 0, logits / rep, logits * rep))
        logits -= frequency[:, None] * counts + presence[:, None] * seen
    return logits


def _truncate(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask tokens outside top-k, the top-p nucleus and the min-p floor with -inf."""
    if batch.top_k is None and batch.top_p is None and batch.min_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if batch.top_k is not None:
        ranks = torch.arange(logits.shape[1])
        drop |= ranks[None, :] >= batch.top_k[:, None]
    probs = sorted_logits.masked_fill(drop, -float("inf")).softmax(-1)
    if batch.top_p is not None:
        drop |= probs.cumsum(-1) - probs > batch.top_p[:, None]
    if batch.min_p is not None:
        drop |= probs < batch.min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, -float("inf")))


def _exponential_noise(batch: SamplingBatch, shape: torch.Size) -> torch.Tensor:
    """Each seeded row from its own generator, the other rows in one draw. A row is filled
    once: a full-vocabulary draw costs about 1 ms per row on CPU, and with `--seed` every
    sampled row is seeded."""
    noise = torch.empty(shape)
    unseeded = [i for i, seed in enumerate(batch.seeds) if seed is None]
    if len(unseeded) == len(batch.seeds):
        return noise.exponential_()
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), shape[1]).exponential_()
    for i, seed in enumerate(batch.seeds):
        if seed is not None:
            gen = torch.Generator().manual_seed((seed * 1_000_003 + batch.positions[i]) % 2**63)
            noise[i].exponential_(generator=gen)
    return noise


def sample(logits: torch.Tensor, batch: SamplingBatch
           ) -> tuple[list[int], list[TokenLogprobs] | None]:
    """Sampled token per row, and logprobs of the model's raw distribution when asked."""
    logits = logits.float()
    logprobs = logits.log_softmax(-1) if batch.num_logprobs is not None else None
    logits = apply_processors(logits, batch)
    greedy = logits.argmax(-1)
    if batch.all_greedy:
        tokens = greedy
    else:
        probs = _truncate(logits / batch.temperature[:, None], batch).softmax(-1)
        drawn = (probs / _exponential_noise(batch, probs.shape)).argmax(-1)
        tokens = torch.where(batch.greedy_rows, greedy, drawn)
    token_list = tokens.tolist()
    if logprobs is None:
        return token_list, None
    return token_list, gather_logprobs(logprobs, tokens, batch.num_logprobs)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]
                    ) -> list[TokenLogprobs]:
    """Row i's logprob of `token_ids[i]`, that token's rank (1 + the tokens strictly more
    likely) and row i's `num_top[i]` most likely tokens, from log-softmaxed rows `[N, vocab]`."""
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(-1) + 1
    top_vals, top_ids = logprobs.topk(max(num_top), dim=-1)
    return [TokenLogprobs(c, r, list(zip(i[:k], v[:k]))) for c, r, i, v, k in zip(
        chosen.squeeze(1).tolist(), ranks.tolist(), top_ids.tolist(), top_vals.tolist(), num_top)]
