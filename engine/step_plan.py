"""The step plan: what every model worker computes in one step, as compact serializable data.

The scheduler's output holds its live `Request` objects; a worker in another process must not
read those. Each step the engine core turns the output into a `StepPlan` (vLLM v1's
scheduler-output shape): per scheduled request the step's token ids and positions, and its page
table as a diff (the pages added since the workers last saw it, or the whole table when it
changed otherwise: first step, resumed after preemption, compacted by eviction). Workers keep
each request's page table from plan to plan (`PageTables`) and drop finished requests.
"""
from collections.abc import Container

import msgspec

from scheduler.scheduler import SchedulerOutput


class PlannedRequest(msgspec.Struct, array_like=True, frozen=True):
    request_id: str
    token_ids: list[int]  # this step's tokens
    start: int  # the position of the first of them
    kv_start: int  # the tokens the request holds in KV before them
    pages: list[int]  # appended to the request's page table; its whole table with `reset`
    reset: bool = False


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

    def apply(self, plan: StepPlan) -> list[list[int]]:
        """Take in a plan's page diffs; the page table of each of its requests, in order."""
        for request_id in plan.finished:
            self.tables.pop(request_id, None)
        rows = []
        for p in plan.requests:
            table = self.tables.setdefault(p.request_id, [])
            if p.reset:
                table.clear()
            table.extend(p.pages)
            rows.append(table)
        return rows


class StepPlanner:
    """The engine core's side: turns scheduler outputs into plans, remembering what the workers
    were told of each request's page table."""

    def __init__(self):
        self.sent: dict[str, list[int]] = {}

    def plan(self, out: SchedulerOutput, live: Container[str]) -> StepPlan:
        """The plan of `out`; `live` holds the requests the engine still has (the others are
        finished, aborted or handed off)."""
        finished = [rid for rid in self.sent if rid not in live]
        for rid in finished:
            del self.sent[rid]
        requests, sample_rows, prompt_rows, offset = [], [], [], 0
        for s in out.scheduled:
            r, start = s.request, s.request.num_computed_tokens
            sent, pages = self.sent.get(r.request_id), r.page_ids
            reset = sent is None or pages[:len(sent)] != sent
            requests.append(PlannedRequest(
                r.request_id, r.token_ids(start, start + s.num_new_tokens), start,
                r.num_kv_tokens, list(pages if reset else pages[len(sent):]), reset))
            self.sent[r.request_id] = list(pages)
            if s.samples:
                sample_rows.append(offset + s.num_new_tokens - 1)
            if positions := s.prompt_logprob_positions:
                base = offset - start
                prompt_rows.extend(range(base + positions.start, base + positions.stop))
            offset += s.num_new_tokens
        return StepPlan(requests, finished, sample_rows, prompt_rows)
