"""The step plan: what every model worker computes in one step, as compact serializable data.

The scheduler's output holds its live `Request` objects; a worker in another process must not
read those. Each step the engine core turns the output into a `StepPlan` (vLLM v1's
scheduler-output shape): per scheduled request the step's token ids and positions, and its page
table as a diff (the pages added since the workers last saw it, or the whole table when it
changed otherwise: first step, resumed after preemption, compacted by eviction), and under a
head config the same for its streaming heads' own page table. Workers keep each request's page
tables from plan to plan (`PageTables`) and drop finished requests.
"""
from collections.abc import Container

import msgspec

from scheduler.scheduler import SchedulerOutput


class StreamingTable(msgspec.Struct, array_like=True, frozen=True):
    """A request's streaming heads' page table (scheduler/head_config.py), as a diff."""
    kv_start: int  # the tokens they hold before the step's
    pages: list[int]
    reset: bool = False


class PlannedRequest(msgspec.Struct, array_like=True, frozen=True):
    request_id: str
    token_ids: list[int]  # this step's tokens
    start: int  # the position of the first of them
    kv_start: int  # the tokens the request holds in KV before them
    pages: list[int]  # appended to the request's page table; its whole table with `reset`
    reset: bool = False
    streaming: StreamingTable | None = None


class StepPlan(msgspec.Struct, array_like=True, frozen=True):
    requests: list[PlannedRequest]
    finished: list[str]  # requests whose page tables the workers drop
    sample_rows: list[int]  # flat-batch rows whose logits are sampled
    # rows whose logits give prompt logprobs, in the order the engine core reads them
    prompt_rows: list[int]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StepPlan)


def encode_plan(plan: StepPlan) -> bytes:
    return _encoder.encode(plan)


def decode_plan(data: bytes) -> StepPlan:
    return _decoder.decode(data)


class PageTables:
    """A worker's page table per request, kept up to date by the plans."""

    def __init__(self):
        self.tables: dict[str, list[int]] = {}
        self.streaming: dict[str, list[int]] = {}

    def apply(self, plan: StepPlan) -> list[list[int]]:
        """Take in a plan's page diffs; the page table of each of its requests, in order (the
        streaming heads' ones then come from `streaming_rows`)."""
        for request_id in plan.finished:
            self.tables.pop(request_id, None)
            self.streaming.pop(request_id, None)
        for p in plan.requests:
            if p.streaming is not None:
                _update(self.streaming, p.request_id, p.streaming.pages, p.streaming.reset)
        return [_update(self.tables, p.request_id, p.pages, p.reset) for p in plan.requests]

    def streaming_rows(self, plan: StepPlan) -> list[list[int]]:
        return [self.streaming[p.request_id] for p in plan.requests]


def _update(tables: dict[str, list[int]], request_id: str, pages: list[int],
            reset: bool) -> list[int]:
    table = tables.setdefault(request_id, [])
    if reset:
        table.clear()
    table.extend(pages)
    return table


class StepPlanner:
    """The engine core's side: turns scheduler outputs into plans, remembering what the workers
    were told of each request's page table."""

    def __init__(self):
        self.sent: dict[str, list[int]] = {}
        self.sent_streaming: dict[str, list[int]] = {}

    def plan(self, out: SchedulerOutput, live: Container[str]) -> StepPlan:
        """The plan of `out`; `live` holds the requests the engine still has (the others are
        finished, aborted or handed off)."""
        finished = [rid for rid in self.sent if rid not in live]
        for rid in finished:
            del self.sent[rid]
            self.sent_streaming.pop(rid, None)
        requests, sample_rows, prompt_rows, offset = [], [], [], 0
        for s in out.scheduled:
            r, start = s.request, s.request.num_computed_tokens
            streaming = None
            if (held := r.streaming) is not None:
                streaming = StreamingTable(held.num_kv_tokens,
                                           *_diff(self.sent_streaming, r.request_id,
                                                  held.page_ids))
            requests.append(PlannedRequest(
                r.request_id, r.token_ids(start, start + s.num_new_tokens), start,
                r.num_kv_tokens, *_diff(self.sent, r.request_id, r.page_ids), streaming))
            if s.samples:
                sample_rows.append(offset + s.num_new_tokens - 1)
            if positions := s.prompt_logprob_positions:
                base = offset - start
                prompt_rows.extend(range(base + positions.start, base + positions.stop))
            offset += s.num_new_tokens
        return StepPlan(requests, finished, sample_rows, prompt_rows)


def _diff(sent: dict[str, list[int]], request_id: str, pages: list[int]
          ) -> tuple[list[int], bool]:
    """The pages to send for a table the workers last saw as `sent[request_id]`, and whether
    they replace it; remembers what they will now hold."""
    old = sent.get(request_id)
    reset = old is None or pages[:len(old)] != old
    sent[request_id] = list(pages)
    return list(pages if reset else pages[len(old):]), reset
