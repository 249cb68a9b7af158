"""All KV page accounting: free pages, ref counts, and the prefix cache over full pages.

A full page is named by a hash chained from its parent page's hash and its own token ids, so
two requests with the same prefix map it to the same page. The hash is BLAKE2b of those bytes,
not Python's `hash()` (salted per process for strings, and of `None` per process), so one prefix
has one name in every process and on every host: routers match prefixes across engines by it.
A page whose ref count drops to 0 goes to the back of the free queue but keeps its hash: until
it is handed out again (oldest first, LRU), a later request with that prefix takes it back
without recomputing it.

Under a sliding window every layer reads only a request's recent tokens, so the pages wholly
before the window go back to the pool as the request advances (`release_before`). Their table
entries become `RELEASED`; the other tokens keep their slots, so a slot is still a position.
"""
import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from scheduler.request import HeldKV, Request

RELEASED = -1  # a page-table entry whose page went back to the pool: no query reads it again


def page_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """The stable 64-bit name of a full page holding `token_ids` after the page `parent`."""
    digest = hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=8,
                             key=(parent or 0).to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little", signed=True)


@dataclass
class Page:
    page_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # checked on a hit, so a hash collision cannot alias


@dataclass
class KVCompaction:
    """What the engine does to carry out an eviction, before the step writes: copy whole pages
    (`(src, dst)` page ids, every layer), then move tokens: all of a token's layers and heads
    (`moves`, `(src, dst)` flat slots), or one layer's head (`head_moves`, arrays of rows
    layer, head, src slot, dst slot)."""
    page_copies: list[tuple[int, int]] = field(default_factory=list)
    moves: list[tuple[int, int]] = field(default_factory=list)
    head_moves: list[np.ndarray] = field(default_factory=list)

    def extend(self, other: "KVCompaction") -> None:
        self.page_copies += other.page_copies
        self.moves += other.moves
        self.head_moves += other.head_moves


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pages = [Page(i) for i in range(num_pages)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self.cached: dict[int, int] = {}  # hash -> page id
        self.page_hashes: dict[str, list[int]] = {}  # request id -> hashes of its full pages

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    @property
    def num_free_pages(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1 - self.num_free_pages / self.num_pages

    def _page_hashes(self, token_ids: list[int], num_pages: int, parent: int | None = None):
        ps = self.page_size
        for i in range(num_pages):
            chunk = tuple(token_ids[i * ps:(i + 1) * ps])
            parent = page_hash(parent, chunk)
            yield parent, chunk

    def match_prefix(self, request: Request) -> list[int]:
        """Cached pages holding the longest prefix of the request's tokens.

        At most `num_tokens - 1` tokens are matched: the last one is always recomputed so the
        step has a position to sample from. A request that skips reading the cache (it needs
        every prompt position's logits) matches nothing, but its pages are still cached. Under
        a kv_policy at most what the policy keeps is matched, so nothing is evicted before the
        first step.
        """
        if not self.enable_prefix_caching or request.skip_reading_prefix_cache:
            return []
        hits = []
        limit = request.num_tokens - 1
        if request.kv_policy:
            limit = min(limit, request.kv_policy.prefix_hit_limit(request.num_prompt_tokens))
        max_pages = limit // self.page_size
        for h, chunk in self._page_hashes(request.all_token_ids, max_pages):
            page_id = self.cached.get(h)
            if page_id is None or self.pages[page_id].token_ids != chunk:
                break
            hits.append(page_id)
        return hits

    def prefix_chain(self, request: Request, num_pages: int) -> list[tuple[int, tuple]]:
        """`(hash, token ids)` of the request's first `num_pages` full pages."""
        return list(self._page_hashes(request.all_token_ids, num_pages))

    def match_window(self, chain: list[tuple[int, tuple]], first_page: int) -> list[int] | None:
        """A prefix hit in a pool whose heads read only a window (a model's sliding layers):
        the cached pages of `chain[first_page:]`, after `first_page` RELEASED entries; None
        when one of them is not cached."""
        hits = [RELEASED] * first_page
        for h, chunk in chain[first_page:]:
            page_id = self.cached.get(h)
            if page_id is None or self.pages[page_id].token_ids != chunk:
                return None
            hits.append(page_id)
        return hits

    def allocate(self, request: Request | HeldKV, num_new_tokens: int,
                 hit_pages: list[int] = ()) -> bool:
        """Give the request (or its second hold) pages for `num_new_tokens` more tokens
        (taking `hit_pages` first, RELEASED ones as they are).

        All or nothing: returns False and changes nothing when the free pages do not suffice.
        """
        total = len(request.page_ids) + len(hit_pages)
        needed = -(-(request.num_kv_tokens + num_new_tokens) // self.page_size) - total
        taken = [p for p in hit_pages if p != RELEASED]
        free_hits = sum(1 for p in taken if self.pages[p].ref_count == 0)
        if max(needed, 0) + free_hits > self.num_free_pages:
            return False
        for page_id in taken:
            self._take(page_id)
        request.page_ids.extend(hit_pages)
        for _ in range(needed):
            page_id = next(iter(self.free_queue))
            self._forget(page_id)
            self._take(page_id)
            request.page_ids.append(page_id)
        return True

    def release_unheld(self, request: Request | HeldKV) -> None:
        """Give back the pages past the tokens it holds (an allocation taken back)."""
        self._truncate(request, request.num_kv_tokens)

    def release_before(self, request: Request | HeldKV, slot: int) -> None:
        """Give back the pages holding only slots below `slot` (no query will read them again);
        pages released before stop the walk down, so a step costs what it releases."""
        index = min(slot // self.page_size, len(request.page_ids)) - 1
        while index >= 0 and request.page_ids[index] != RELEASED:
            self._release(request.page_ids[index])
            request.page_ids[index] = RELEASED
            index -= 1

    def evict(self, request: Request | HeldKV, slots: list[int]) -> KVCompaction | None:
        """Drop the tokens in KV `slots` (indices into the request's held tokens).

        The last kept tokens move into the emptied slots below the new length and the pages
        past it are released, so only as many tokens move as are evicted from below it. A
        page that receives a token while other requests hold it too (a prefix hit, `n > 1`) is
        copied first and the request takes the copy; a page it alone holds that receives one
        leaves the prefix cache, its hash no longer naming what it holds. Returns the copies
        and moves for the engine, to run before the step's writes, or None (nothing changed)
        when no free page is left for a copy.
        """
        ps, old_len = self.page_size, request.num_kv_tokens
        new_len = old_len - len(slots)
        evicted = set(slots)
        holes = sorted(s for s in evicted if s < new_len)
        sources = [s for s in range(new_len, old_len) if s not in evicted]
        plan = self._own_pages_written(request, {h // ps for h in holes})
        if plan is None:
            return None

        def slot(s: int) -> int:
            return request.page_ids[s // ps] * ps + s % ps

        plan.moves = [(slot(src), slot(dst)) for src, dst in zip(sources, holes)]
        request.kv_positions[..., holes] = request.kv_positions[..., sources]
        self._truncate(request, new_len)
        return plan

    def evict_heads(self, request: Request, keep: np.ndarray) -> KVCompaction | None:
        """Keep, in each layer's KV head, only the held slots `keep[L, KvH, m]` names (m alike
        for all): `evict` per head, one page table for all. The request's positions (then per
        head) and attention scores move with their tokens."""
        ps, old_len, new_len = self.page_size, request.num_kv_tokens, keep.shape[-1]
        kept = np.zeros(keep.shape[:2] + (old_len,), dtype=bool)
        np.put_along_axis(kept, keep, True, -1)
        # Per (layer, head) the holes below new_len and the kept slots past it are as many;
        # nonzero walks both in (layer, head, slot) order, so they pair up.
        hole_l, hole_h, holes = np.nonzero(~kept[..., :new_len])
        sources = np.nonzero(kept[..., new_len:])[2] + new_len
        plan = self._own_pages_written(request, set((holes // ps).tolist()))
        if plan is None:
            return None
        pages = np.asarray(request.page_ids)
        plan.head_moves.append(np.stack([hole_l, hole_h, pages[sources // ps] * ps + sources % ps,
                                         pages[holes // ps] * ps + holes % ps]))
        request.kv_positions = np.broadcast_to(request.kv_positions, kept.shape).copy()
        for per_slot in (request.kv_positions, request.attention_scores):
            if per_slot is not None:
                per_slot[hole_l, hole_h, holes] = per_slot[hole_l, hole_h, sources]
        if request.attention_scores is not None:
            request.attention_scores = request.attention_scores[..., :new_len]
        self._truncate(request, new_len)
        return plan

    def _own_pages_written(self, request: Request | HeldKV,
                           indices: set[int]) -> KVCompaction | None:
        """Before tokens are moved into the request's pages at `indices`: each one another
        request also holds is swapped for a copy (the plan's page copies), each it alone holds
        leaves the prefix cache. None, and nothing changed, when the free pages do not suffice."""
        shared = sorted(i for i in indices if self.pages[request.page_ids[i]].ref_count > 1)
        if len(shared) > self.num_free_pages:
            return None
        plan = KVCompaction()
        for index in shared:
            old = request.page_ids[index]
            new = next(iter(self.free_queue))
            self._forget(new)
            self._take(new)
            self._release(old)
            request.page_ids[index] = new
            plan.page_copies.append((old, new))
        for index in indices - set(shared):
            self._forget(request.page_ids[index])
        return plan

    def _truncate(self, request: Request | HeldKV, new_len: int) -> None:
        """The request holds `new_len` tokens: pages past them are released."""
        num_pages = -(-new_len // self.page_size)
        for page_id in request.page_ids[num_pages:]:
            self._release(page_id)
        del request.page_ids[num_pages:]
        request.kv_positions = request.kv_positions[..., :new_len]
        request.num_kv_tokens = new_len

    def _forget(self, page_id: int) -> None:
        """The page leaves the prefix cache."""
        page = self.pages[page_id]
        if page.hash is not None:
            del self.cached[page.hash]
            page.hash, page.token_ids = None, ()

    def _release(self, page_id: int) -> None:
        page = self.pages[page_id]
        page.ref_count -= 1
        if page.ref_count == 0:
            self.free_queue[page_id] = None

    def _take(self, page_id: int) -> None:
        page = self.pages[page_id]
        if page.ref_count == 0:
            del self.free_queue[page_id]
        page.ref_count += 1

    def cache_full_pages(self, request: Request) -> list[tuple[int, int, tuple]]:
        """Name the request's pages that its computed tokens have filled, for later hits, and
        return them as `(index, hash, token ids)` (a second pool names its own pages alike,
        `name_pages`); once it has evicted tokens, its pages no longer hold a prefix and none
        is named."""
        if not self.enable_prefix_caching or request.num_evicted_tokens:
            return []
        hashes = self.page_hashes.setdefault(request.request_id, [])
        num_full = request.num_computed_tokens // self.page_size
        if num_full <= len(hashes):
            return []
        parent = hashes[-1] if hashes else None
        start = len(hashes) * self.page_size
        tokens = request.token_ids(start, num_full * self.page_size)
        named = [(len(hashes) + i, h, chunk) for i, (h, chunk) in enumerate(
            self._page_hashes(tokens, num_full - len(hashes), parent))]
        hashes += [h for _, h, _ in named]
        self.name_pages(request, named)
        return named

    def name_pages(self, request: Request | HeldKV, named: list[tuple[int, int, tuple]]) -> None:
        """Cache the request's page at each `(index, hash, token ids)`, unless it was released
        before (nothing to hit) or another page holds that prefix already."""
        for index, h, chunk in named:
            page_id = request.page_ids[index]
            if page_id == RELEASED:
                continue
            page = self.pages[page_id]
            if page.hash is None and h not in self.cached:
                page.hash, page.token_ids = h, chunk
                self.cached[h] = page_id

    def free(self, request: Request | HeldKV) -> None:
        """Release the request's pages; pages left unreferenced join the free queue's tail."""
        for page_id in reversed(request.page_ids):
            if page_id != RELEASED:
                self._release(page_id)
        request.page_ids = []
        self.page_hashes.pop(request.request_id, None)
