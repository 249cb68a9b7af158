"""Admission control: bounded waiting work, so overload is an answer rather than a wait.

The engine runs at most `max_num_seqs` requests at once; everything beyond that waits. The
API process counts the engine requests it has sent and not seen finish (a call with several
prompts or `n` > 1 is several), and the prompt tokens of those still without a first token.
A call that would take either past its bound is refused whole, before anything reaches the
engine: 429 with `Retry-After`; while the server drains, 503. One call may never start more
than `max_choices_per_request` engine requests (prompts x n), whatever the load.

A slot is released when its request finishes, and also when it is dropped unused (a stream
whose client left before the first byte never runs its generator), so the count cannot leak.
"""
import weakref
from dataclasses import dataclass

from server.errors import APIError, EngineUnavailable

# The waiting client retries after this long; short, since the queue moves every step.
RETRY_AFTER_S = 1


@dataclass
class AdmissionLimits:
    max_waiting_requests: int
    max_queued_prompt_tokens: int
    max_choices_per_request: int


class Overloaded(APIError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=429, code="server_overloaded",
                         headers={"Retry-After": str(RETRY_AFTER_S)})


class Slot:
    """One engine request's share of the bounds: its prompt counts as queued until `started`."""

    def __init__(self, admission: "Admission", prompt_tokens: int) -> None:
        self.admission, self.prompt_tokens = admission, prompt_tokens
        self._queued = [True]  # shared with the finalizer, which must not hold the slot
        self._release = weakref.finalize(self, admission._release, prompt_tokens, self._queued)

    def started(self) -> None:
        if self._queued[0]:
            self._queued[0] = False
            self.admission.queued_prompt_tokens -= self.prompt_tokens

    def release(self) -> None:
        self._release()


class Admission:
    def __init__(self, max_num_seqs: int, limits: AdmissionLimits,
                 on_reject=lambda reason: None) -> None:
        self.max_in_flight = max_num_seqs + limits.max_waiting_requests
        self.limits = limits
        self.on_reject = on_reject
        self.in_flight = 0
        self.queued_prompt_tokens = 0
        self.draining = False

    def admit(self, prompt_lens: list[int]) -> list[Slot]:
        """Slots for a call's engine requests (one per prompt and choice), or raise."""
        count, tokens = len(prompt_lens), sum(prompt_lens)
        if count > self.limits.max_choices_per_request:
            self.on_reject("too_many_choices")
            raise APIError(f"this call asks for {count} completions (prompts x n); at most "
                           f"{self.limits.max_choices_per_request} are allowed", param="n")
        if self.draining:
            self.on_reject("draining")
            raise EngineUnavailable("the server is shutting down")
        if self.in_flight and self.in_flight + count > self.max_in_flight:
            self.on_reject("waiting_requests")
            raise Overloaded(f"the server is at capacity ({self.in_flight} requests in "
                             f"flight); retry after {RETRY_AFTER_S} s")
        if self.queued_prompt_tokens and (self.queued_prompt_tokens + tokens
                                          > self.limits.max_queued_prompt_tokens):
            self.on_reject("queued_prompt_tokens")
            raise Overloaded(f"the server is at capacity ({self.queued_prompt_tokens} prompt "
                             f"tokens queued); retry after {RETRY_AFTER_S} s")
        self.in_flight += count
        self.queued_prompt_tokens += tokens
        return [Slot(self, n) for n in prompt_lens]

    def _release(self, prompt_tokens: int, queued: list[bool]) -> None:
        self.in_flight -= 1
        if queued[0]:
            queued[0] = False
            self.queued_prompt_tokens -= prompt_tokens
