"""A handoff's KV pages arrive byte for byte in their own format: copied out of the sender's
shared pool (one host) or carried as frames (across hosts), plain and quantized pages alike,
with prefix-hit pages left out, onto scattered pages, and with layers that hold different
heads (a head config's or sliding layers' pools)."""
import pytest
import torch

from engine.kv_cache import KVCache, KVCacheSpec
from kernels import kv_format

LAYERS, PAGES = 5, 12
SOURCE, DEST, SKIP = [2, 3, 4, 7, 8, 0], [9, 10, 11, 1, 2, 5], 2


def _tensors(cache: KVCache, layer: int) -> list[torch.Tensor]:
    """A layer's K and V tensors (codes, scales, zeros) as raw bytes per page."""
    return [t.flatten(1).view(torch.uint8) for pool in cache.layers[layer]
            for t in (pool if isinstance(pool, kv_format.QuantizedPages) else (pool,))
            if t is not None]


@pytest.mark.parametrize("layer_heads", [None, (3, 0, 0, 3, 2)], ids=["uniform", "per-layer"])
@pytest.mark.parametrize("storage", ["bfloat16", *kv_format.FORMATS])
def test_handed_over_pages_hold_the_senders_bytes(storage, layer_heads):
    spec = KVCacheSpec(LAYERS, 3, 64, 4, torch.bfloat16, kv_format.FORMATS.get(storage),
                       layer_heads)
    sender = KVCache(spec, PAGES, "cpu", shared=True)
    gen = torch.Generator().manual_seed(0)
    for t in sender.stacks:
        raw = t.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, generator=gen, dtype=torch.uint8))

    via_shm, via_frames = KVCache(spec, PAGES, "cpu"), KVCache(spec, PAGES, "cpu")
    source = KVCache.attach(spec, PAGES, sender.shared_path)
    copied = via_shm.copy_pages_from(source, SOURCE[SKIP:], DEST[SKIP:])
    frames = sender.read_pages(SOURCE)
    assert len(frames) == len(sender.stacks)  # one frame per stack, not per layer
    via_frames.write_pages(DEST[SKIP:], frames, SKIP)

    assert copied == (len(SOURCE) - SKIP) * spec.page_bytes
    untouched = [p for p in range(PAGES) if p not in DEST[SKIP:]]
    for cache in via_shm, via_frames:
        for layer in range(LAYERS):
            for got, sent in zip(_tensors(cache, layer), _tensors(sender, layer), strict=True):
                assert torch.equal(got[DEST[SKIP:]], sent[SOURCE[SKIP:]])
                assert not got[untouched].any()


def test_frames_of_another_format_are_refused_before_anything_is_written():
    spec = KVCacheSpec(LAYERS, 3, 64, 4, torch.bfloat16, kv_format.FORMATS["int4"])
    frames = KVCache(spec, PAGES, "cpu").read_pages(SOURCE)
    receiver = KVCache(KVCacheSpec(LAYERS, 3, 64, 4, torch.bfloat16,
                                   kv_format.FORMATS["int8"]), PAGES, "cpu")
    with pytest.raises(ValueError, match="KV frame"):
        receiver.write_pages(DEST, frames[:len(receiver.stacks)])
    with pytest.raises(ValueError, match="frames for"):
        receiver.write_pages(DEST, frames)
    assert not any(t.view(torch.uint8).any() for t in receiver.stacks)


def test_each_layers_pages_have_a_storage_of_their_own():
    """torch.compile'd CPU steps copy the whole storage of aliasing inputs they write: were
    the layers views of one stack, every step would copy every layer's pages."""
    spec = KVCacheSpec(LAYERS, 3, 64, 4, torch.bfloat16, kv_format.FORMATS["int4"])
    for cache in KVCache(spec, PAGES, "cpu"), KVCache(spec, PAGES, "cpu", shared=True):
        storages = [id(t.untyped_storage()) for layer in range(LAYERS)
                    for t in _tensors(cache, layer)]
        assert len(set(storages)) == len(storages)

