"""The offline API, as vLLM users know it: `LLM(...).generate(prompts, params)`."""
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig,
                           SchedulerConfig)
from engine.core import EngineCore
from engine.messages import AddRequest, TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.tokenizer import load_tokenizer
from engine.detokenizer import IncrementalDetokenizer, StopStringChecker


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = True
    # With `SamplingParams(prompt_logprobs=N)`: one entry per prompt token, None for the first.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    kv_evicted_tokens: int | None = None  # under a kv_policy: tokens evicted from its KV


@dataclass
class _Pending:
    prompt_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    kv_evicted_tokens: int | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopStringChecker | None = None


class LLM:
    def __init__(self, model: str | None = None, load_format: str = "auto", device: str = "cpu",
                 dtype: str = "auto", page_size: int = 16, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, num_kv_pages: int | None = None,
                 kv_cache_memory: int | None = None, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, seed: int = 0,
                 quantization: str = "auto", enforce_eager: bool = False,
                 gpu_memory_utilization: float = 0.9, tokenizer: str | None = None,
                 dummy_weights_seed: int = 0, kv_cache_dtype: str = "auto",
                 kv_policy: str = "none", kv_head_config: str | None = None,
                 tensor_parallel_size: int = 1,
                 distributed_executor_backend: str = "mp"):
        self.config = EngineConfig(
            ModelConfig(model=model, load_format=load_format, dtype=dtype,
                        max_model_len=max_model_len, seed=seed,
                        dummy_weights_seed=dummy_weights_seed, quantization=quantization,
                        enforce_eager=enforce_eager, tokenizer=tokenizer),
            CacheConfig(page_size=page_size, num_kv_pages=num_kv_pages,
                        kv_cache_memory=kv_cache_memory,
                        gpu_memory_utilization=gpu_memory_utilization,
                        kv_cache_dtype=kv_cache_dtype,
                        enable_prefix_caching=enable_prefix_caching, kv_policy=kv_policy,
                        kv_head_config=kv_head_config),
            SchedulerConfig(max_num_seqs, max_num_batched_tokens), device,
            parallel=ParallelConfig(tensor_parallel_size,
                                    distributed_executor_backend=distributed_executor_backend))
        self.engine = EngineCore(self.config)
        self.tokenizer = (None if load_format == "dummy" and tokenizer is None
                          else load_tokenizer(self.config.model.tokenizer_path))

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token-id lists")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; outputs in input order.
        `progress` is called after each step with the number of requests finished so far."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        pending: dict[str, _Pending] = {}
        for prompt, p in zip(prompts, params_list):
            rid = uuid.uuid4().hex
            ids = self._encode(prompt)
            try:
                self.engine.add_request(AddRequest(rid, ids, p, time.time()))
            except ValueError:
                self.engine.abort(list(pending))  # all or nothing: drop this call's requests
                raise
            pending[rid] = _Pending(ids, p)
            if self.tokenizer is not None:
                pending[rid].detokenizer = IncrementalDetokenizer(self.tokenizer, ids)
                pending[rid].stops = StopStringChecker(p.stop, p.include_stop_str_in_output)
        while self.engine.has_unfinished():
            for out in self.engine.step().outputs:
                self._absorb(pending[out.request_id], out)
                if pending[out.request_id].finish_reason and not out.finish_reason:
                    self.engine.abort([out.request_id])  # a stop string matched
            if progress is not None:
                progress(sum(p.finish_reason is not None for p in pending.values()))
        return [RequestOutput(rid, p.prompt_ids, [CompletionOutput(
            0, p.text, p.token_ids, p.finish_reason, p.logprobs or None)], p.num_cached_tokens,
            prompt_logprobs=p.prompt_logprobs, kv_evicted_tokens=p.kv_evicted_tokens)
            for rid, p in pending.items()]

    def _absorb(self, p: _Pending, out) -> None:
        p.num_cached_tokens = out.num_cached_tokens
        p.kv_evicted_tokens = out.num_evicted_tokens
        if out.prompt_logprobs is not None:
            p.prompt_logprobs = [None, *out.prompt_logprobs]
        if p.finish_reason:
            return
        p.token_ids.extend(out.new_token_ids)
        p.logprobs.extend(out.new_logprobs or [])
        p.finish_reason = out.finish_reason
        if p.detokenizer is not None:
            done = out.finish_reason is not None
            match = p.stops.add(p.detokenizer.add(out.new_token_ids, done), done)
            p.text += match.text
            if match.stopped:
                p.finish_reason = "stop"

    def chat(self, messages: list[dict] | list[list[dict]],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the model's chat template, then generate."""
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True,
                                                      tokenize=False) for c in conversations]
        return self.generate([self._encode_chat(p) for p in prompts], params)

    def _encode_chat(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)
