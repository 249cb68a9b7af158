"""Scheduler and block manager on their own, with a fake model runner (no torch model)."""
import subprocess
import sys
from pathlib import Path

from engine.config import SchedulerConfig
from engine.sampling_params import SamplingParams
from scheduler.block_manager import BlockManager
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import Scheduler


def make(num_pages=64, page_size=4, budget=16, max_seqs=8, prefix=True):
    bm = BlockManager(num_pages, page_size, prefix)
    return Scheduler(SchedulerConfig(max_seqs, budget), bm), bm


def request(rid, n, max_tokens=4, first_token=None):
    """Prompt tokens distinct per request id unless `first_token` makes them overlap."""
    first_token = 1000 * ord(rid[0]) if first_token is None else first_token
    return Request(rid, list(range(first_token, first_token + n)),
                   SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                   max_tokens=max_tokens)


def fake_step(sched: Scheduler, token=7):
    """Schedule, 'run' the model (every sampling request emits `token`) and update."""
    out = sched.schedule()
    sampled = {s.request.request_id: token for s in out.scheduled if s.samples}
    finished = sched.update(out, sampled)
    return out, finished


def plan(out):
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def test_chunked_prefill_under_token_budget():
    sched, _ = make(budget=16)
    sched.add_request(request("a", 40))
    assert plan(fake_step(sched)[0]) == [("a", 16)]
    assert plan(fake_step(sched)[0]) == [("a", 16)]
    out, _ = fake_step(sched)
    assert plan(out) == [("a", 8)] and out.scheduled[0].samples
    assert sched.requests["a"].output_token_ids == [7]


def test_decodes_go_first_then_waiting_prompts_fcfs():
    sched, _ = make(budget=10)
    sched.add_request(request("a", 6))
    fake_step(sched)  # a prefilled, sampled its first token
    sched.add_request(request("b", 12))
    sched.add_request(request("c", 3))
    out, _ = fake_step(sched)
    assert plan(out) == [("a", 1), ("b", 9)]  # c waits behind b (FCFS)
    out, _ = fake_step(sched)
    assert plan(out) == [("a", 1), ("b", 3), ("c", 3)]


def test_max_num_seqs_caps_running_requests():
    sched, _ = make(budget=100, max_seqs=2)
    for rid in "abc":
        sched.add_request(request(rid, 5))
    out, _ = fake_step(sched)
    assert plan(out) == [("a", 5), ("b", 5)]
    assert [r.request_id for r in sched.waiting] == ["c"]


def test_preempts_most_recent_and_resumes_with_same_tokens():
    sched, bm = make(num_pages=5, page_size=4, budget=64, prefix=False)
    sched.add_request(request("a", 7, max_tokens=8))  # 2 pages, grows to 4
    sched.add_request(request("b", 7, max_tokens=8))
    fake_step(sched)
    assert bm.num_free_pages == 1
    preempted = []
    for _ in range(30):
        out, _ = fake_step(sched)
        preempted.append(out.num_preemptions)
        if not sched.has_unfinished():
            break
    assert sum(preempted) >= 1
    assert not sched.has_unfinished()
    assert bm.num_free_pages == 5


def test_preemption_victim_is_latest_admitted():
    sched, _ = make(num_pages=4, page_size=4, budget=64, prefix=False)
    sched.add_request(request("a", 8, max_tokens=8))
    sched.add_request(request("b", 8, max_tokens=8))
    fake_step(sched)  # each holds 2 pages, pool exhausted
    out, _ = fake_step(sched)  # a needs a third page: b is preempted
    assert out.num_preemptions == 1
    assert sched.waiting[0].request_id == "b"
    assert sched.waiting[0].status is RequestStatus.PREEMPTED
    assert sched.waiting[0].num_computed_tokens == 0
    assert plan(out) == [("a", 1)]


def test_prefix_hit_skips_cached_pages_and_keeps_last_token():
    sched, bm = make(num_pages=16, page_size=4, budget=64)
    sched.add_request(request("a", 10, max_tokens=1, first_token=0))
    fake_step(sched)
    assert bm.num_free_pages == 16  # finished; its full pages stay cached but free
    sched.add_request(request("b", 12, max_tokens=1, first_token=0))  # shares tokens 0..9
    out, _ = fake_step(sched)
    assert plan(out) == [("b", 4)]  # two cached pages (8 tokens) skipped
    assert out.prefix_cache_hits == 8 and out.prefix_cache_queries == 12
    sched.add_request(request("c", 8, max_tokens=1, first_token=0))  # all-hit prompt: last token recomputed
    out, _ = fake_step(sched)
    assert plan(out) == [("c", 4)]


def test_prompt_logprob_requests_skip_prefix_hits_and_others_still_hit():
    sched, _ = make(num_pages=16, page_size=4, budget=64)
    sched.add_request(request("a", 10, max_tokens=1, first_token=0))
    fake_step(sched)
    wants = request("b", 12, max_tokens=1, first_token=0)
    wants.sampling_params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    sched.add_request(wants)
    out, _ = fake_step(sched)
    assert plan(out) == [("b", 12)] and out.prefix_cache_hits == 0
    assert out.scheduled[0].prompt_logprob_positions == range(0, 11)
    sched.add_request(request("c", 12, max_tokens=1, first_token=0))
    assert plan(fake_step(sched)[0]) == [("c", 4)]  # b's pages were cached for it


def test_prompt_logprob_positions_cover_the_prompt_once_across_preemption():
    """Position p gives token p + 1's logprob: 0 .. P-2 once each, chunk by chunk, even when a
    preempted request recomputes its chunks."""
    sched, _ = make(num_pages=6, page_size=4, budget=8, prefix=False)
    wants = request("a", 20, max_tokens=2)
    wants.sampling_params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True,
                                           prompt_logprobs=0)
    sched.add_request(request("b", 4, max_tokens=8))  # admitted first: a is the victim
    sched.add_request(wants)
    given, preemptions = [], 0
    while sched.has_unfinished():
        out, _ = fake_step(sched)
        preemptions += out.num_preemptions
        given += [p for s in out.scheduled for p in s.prompt_logprob_positions]
    assert preemptions >= 1
    assert given == list(range(19))


def test_abort_frees_pages_at_once():
    sched, bm = make()
    sched.add_request(request("a", 30))
    sched.add_request(request("b", 3))
    fake_step(sched)
    assert bm.num_free_pages < bm.num_pages
    sched.abort("a")
    sched.abort("b")
    assert bm.num_free_pages == bm.num_pages and not sched.has_unfinished()


def test_evicted_cached_page_is_not_hit():
    bm = BlockManager(num_pages=2, page_size=4)
    a = request("a", 5, first_token=0)
    assert bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_pages(a)
    bm.free(a)
    c = request("c", 8, first_token=100)  # takes both pages, evicting a's cached page
    assert bm.allocate(c, 8)
    bm.free(c)
    assert bm.match_prefix(request("a2", 5, first_token=0)) == []


def test_token_ids_slices_across_prompt_and_output():
    r = request("a", 3, first_token=10)
    r.output_token_ids = [90, 91]
    for start, end in [(0, 5), (1, 4), (3, 5), (4, 5), (0, 2)]:
        assert r.token_ids(start, end) == r.all_token_ids[start:end]


def test_the_scheduler_imports_nothing_of_the_engine():
    """engine/ imports scheduler/, never the other way round (no import circle)."""
    code = ("import sys, scheduler.scheduler, scheduler.head_config; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'engine'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
