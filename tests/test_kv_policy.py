"""KV eviction decisions without a model: the policy rule, the block manager's compaction
(moves, copies on write, released pages, the prefix cache) and the scheduler driving them."""
import numpy as np
import pytest

from scheduler.block_manager import BlockManager
from scheduler.kv_policy import SnapKVPolicy, StreamingPolicy, parse_kv_policy
from tests.test_scheduler import fake_step, make, request


def test_parse_kv_policy():
    assert parse_kv_policy(None) is None and parse_kv_policy("none") is None
    assert parse_kv_policy("streaming") == StreamingPolicy()
    assert parse_kv_policy("streaming:sinks=0,window=64") == StreamingPolicy(0, 64)
    for bad, words in [("h3o", "one of streaming"), ("streaming:sink=4", "takes sinks, window"),
                       ("streaming:window=x", "window must be an integer"),
                       ("streaming:window=0", "window must be >= 1"),
                       ("streaming:sinks=-1", "sinks must be >= 0"),
                       ("snapkv", "one of budget"), ("snapkv:budget=8,percent=5", "one of budget"),
                       ("snapkv:percent=101", "percent must be <= 100"),
                       ("snapkv:percent=25,pool=4", "pool odd")]:
        with pytest.raises(ValueError, match=words):
            parse_kv_policy(bad)


def test_streaming_evicts_all_but_the_sinks_and_the_window():
    policy = StreamingPolicy(sinks=2, window=3)
    positions = np.array([0, 1, 9, 3, 4, 5, 6, 7, 8])  # slot order need not be position order
    assert policy.slots_to_evict(positions, 10) == [3, 4, 5, 6]  # positions 3..6
    assert policy.slots_to_evict(np.arange(5), 5) == []


def test_evict_fills_holes_from_the_tail_and_releases_pages():
    sched, bm = make(num_pages=16, page_size=4, budget=64)
    r = request("a", 14)
    r.kv_policy = StreamingPolicy(sinks=2, window=4)
    sched.add_request(r)
    fake_step(sched)  # the whole prompt in one step: 14 tokens held on 4 pages
    assert r.num_kv_tokens == 14 and len(r.page_ids) == 4 and bm.num_free_pages == 12
    pages_before = list(r.page_ids)
    plan = bm.evict(r, r.kv_policy.slots_to_evict(r.kv_positions[0, 0], r.num_computed_tokens))
    # Positions 2..9 go: slots 2..5 are holes below the new length 6, and the tail's positions
    # 10..13 (slots 10..13) move into them; pages 2 and 3 are released.
    assert r.num_kv_tokens == 6 and r.kv_positions.tolist() == [[[0, 1, 10, 11, 12, 13]]]
    slot = lambda s: pages_before[s // 4] * 4 + s % 4  # noqa: E731
    assert plan.moves == [(slot(10), slot(2)), (slot(11), slot(3)), (slot(12), slot(4)),
                          (slot(13), slot(5))]
    assert plan.page_copies == [] and r.page_ids == pages_before[:2]
    assert bm.num_free_pages == 14 and r.num_evicted_tokens == 8


def test_evict_copies_a_shared_page_before_writing_and_forgets_rewritten_hashes():
    bm = BlockManager(16, 4)
    a, b = request("a", 12, first_token=0), request("b", 12, first_token=0)
    for r in (a, b):
        r.kv_policy = StreamingPolicy(sinks=1, window=8) if r is b else None
        hits = bm.match_prefix(r)
        r.set_computed(len(hits) * 4)
        assert bm.allocate(r, 12 - r.num_computed_tokens, hits)
        r.advance(12 - r.num_computed_tokens)
        bm.cache_full_pages(r)
    shared = list(b.page_ids[:2])  # b hit a's first two pages (its policy keeps 9 tokens)
    assert a.page_ids[:2] == shared and all(bm.pages[p].ref_count == 2 for p in shared)
    b_tail = b.page_ids[2]
    plan = bm.evict(b, b.kv_policy.slots_to_evict(b.kv_positions[0, 0], 12))  # keep 0, 4..11
    assert b.num_kv_tokens == 9 and b.kv_positions.tolist() == [[[0, 9, 10, 11, 4, 5, 6, 7, 8]]]
    # Page 0 receives positions 9..11: b takes a copy; page 1 is only read and stays shared.
    copy = b.page_ids[0]
    assert plan.page_copies == [(shared[0], copy)] and b.page_ids[1:] == [shared[1], b_tail]
    assert plan.moves == [(b_tail * 4 + i, copy * 4 + i) for i in (1, 2, 3)]
    assert [bm.pages[p].ref_count for p in a.page_ids[:2]] == [1, 2]
    assert bm.pages[shared[0]].hash is not None  # a's page still holds what its hash names
    assert bm.pages[copy].hash is None and bm.pages[b_tail].hash is None
    bm.cache_full_pages(b)  # an evicting request names no page
    assert bm.pages[copy].hash is None and bm.pages[b_tail].hash is None
    bm.free(a)
    bm.free(b)
    assert bm.num_free_pages == bm.num_pages


def test_evict_fails_without_a_page_for_the_copy_and_changes_nothing():
    bm = BlockManager(3, 4)
    a, b = request("a", 8, first_token=0), request("b", 8, first_token=0)
    for r in (a, b):
        hits = bm.match_prefix(r)
        r.set_computed(len(hits) * 4)
        assert bm.allocate(r, 8 - r.num_computed_tokens, hits)
        r.advance(8 - r.num_computed_tokens)
        bm.cache_full_pages(r)
    b.kv_policy = StreamingPolicy(sinks=1, window=2)
    b.kv_positions = np.arange(8)[None, None]
    bm.allocate(request("c", 4), 4)  # the last free page
    before = (list(b.page_ids), b.num_kv_tokens, b.kv_positions.tolist())
    assert bm.evict(b, [1, 2, 3, 4, 5]) is None
    assert (b.page_ids, b.num_kv_tokens, b.kv_positions.tolist()) == before


def test_scheduler_keeps_an_evicting_request_within_its_budget():
    sched, bm = make(num_pages=64, page_size=4, budget=8)
    r = request("a", 30, max_tokens=40)
    r.kv_policy = StreamingPolicy(sinks=2, window=6)
    sched.add_request(r)
    while sched.has_unfinished():
        out, _ = fake_step(sched)
        if r.status.value == "running":
            # after the step: what the policy keeps plus this step's tokens
            assert r.num_kv_tokens <= 2 + 6 + out.scheduled[0].num_new_tokens
            assert len(r.page_ids) == -(-r.num_kv_tokens // 4)
            recent = set(range(r.num_computed_tokens - out.scheduled[0].num_new_tokens - 6,
                               r.num_computed_tokens))
            assert set(r.kv_positions.flatten().tolist()) <= {0, 1} | recent
    assert bm.num_free_pages == bm.num_pages and r.num_evicted_tokens > 0


def test_snapkv_keeps_the_window_and_the_best_pooled_scores_per_head():
    policy = SnapKVPolicy(budget=4, window=2, pool=3)
    scores = np.zeros((1, 2, 12))
    scores[0, 0, 3] = 5.0  # pooled over 3 neighbours: 2, 3 and 4 score 5
    scores[0, 1, [0, 7]] = [1.0, 9.0]  # head 1: 6, 7 and 8 score 9, then 0 and 1 score 1
    positions = np.arange(12)[None, None]
    assert policy.head_keep(scores, positions, 11, 12) is None  # the prompt is not whole yet
    keep = policy.head_keep(scores, positions, 12, 12)
    assert keep.shape == (1, 2, 4)
    assert keep[0, 0, 2:].tolist() == [10, 11] and set(keep[0, 0, :2]) <= {2, 3, 4}
    assert keep[0, 1, 2:].tolist() == [10, 11] and set(keep[0, 1, :2]) <= {6, 7, 8}
    assert list(policy.scored_queries(12, 0, 8)) == [] and \
        list(policy.scored_queries(12, 8, 4)) == [10, 11]
    assert SnapKVPolicy(percent=25).kept(400) == 100 and SnapKVPolicy(percent=1).kept(400) == 32


def test_evict_heads_moves_each_heads_kept_tokens_below_the_new_length():
    bm = BlockManager(8, 4)
    r = request("a", 10)
    r.kv_policy = SnapKVPolicy(budget=4, window=1)
    r.set_computed(0)
    assert bm.allocate(r, 10)
    r.advance(10)
    pages = list(r.page_ids)
    keep = np.array([[[0, 1, 2, 3], [2, 5, 8, 9]]])  # layer 0: head 0 keeps its first four
    plan = bm.evict_heads(r, keep)
    slot = lambda s: pages[s // 4] * 4 + s % 4  # noqa: E731
    # head 1: holes 0, 1, 3 take 5, 8, 9; head 0 moves nothing
    (moves,) = plan.head_moves
    assert moves.T.tolist() == [[0, 1, slot(5), slot(0)], [0, 1, slot(8), slot(1)],
                                [0, 1, slot(9), slot(3)]]
    assert r.num_kv_tokens == 4 and r.page_ids == pages[:1] and bm.num_free_pages == 7
    assert r.kv_positions.tolist() == [[[0, 1, 2, 3], [5, 8, 2, 9]]]  # per head now


def test_h2o_keeps_the_recent_and_the_most_attended_per_head():
    policy = parse_kv_policy("h2o:budget=4,recent=2")
    positions = np.array([[[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]])
    scores = np.array([[[9.0, 1, 8, 2, 0, 0], [0.0, 7, 1, 6, 0, 0]]])
    assert policy.head_keep(scores[..., :4], positions[..., :4], 4, 3) is None  # within budget
    keep = policy.head_keep(scores, positions, 6, 3)
    assert keep.tolist() == [[[0, 2, 4, 5], [1, 3, 4, 5]]]
    assert list(policy.scored_queries(3, 5, 2)) == [5, 6] and policy.prefix_hit_limit(9) == 0


def test_scheduler_moves_h2o_scores_and_positions_with_their_tokens():
    sched, bm = make(num_pages=64, page_size=4, budget=8)
    r = request("a", 12, max_tokens=10)
    r.kv_policy = parse_kv_policy("h2o:budget=6,recent=2")
    sched.add_request(r)
    while sched.has_unfinished():
        out = sched.schedule()
        scores = {}
        for s in out.scheduled:  # each head favours positions p with p % 3 == its own number
            req, n = s.request, s.request.num_kv_tokens + s.num_new_tokens
            new = np.arange(req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens)
            pos = np.concatenate([np.broadcast_to(req.kv_positions, (2, 2, req.num_kv_tokens)),
                                  np.broadcast_to(new, (2, 2, len(new)))], -1)
            scores[req.request_id] = (pos % 3 == np.arange(4).reshape(2, 2, 1) % 3) * 1.0
        sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples}, scores)
        if r.status.value == "running":
            positions = np.broadcast_to(r.kv_positions, (2, 2, r.num_kv_tokens))
            # each slot's score is still its own position's: they moved together
            assert (r.attention_scores > 0).tolist() == \
                (positions % 3 == np.arange(4).reshape(2, 2, 1) % 3).tolist()
    assert r.num_evicted_tokens > 0 and bm.num_free_pages == bm.num_pages
