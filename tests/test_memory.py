"""KV pool sizing and the start-up refusal when a full-length request could never fit."""
import pytest

from engine import LLM
from engine.cuda_graphs import capture_sizes
from engine.kv_cache import check_fits, gpu_kv_budget

GiB = 2**30


def test_gpu_budget_is_utilization_minus_everything_already_used_and_the_peak():
    # 80 GiB card at 0.9: 72 GiB allowed; 16 GiB weights + 1 GiB context in use, 3 GiB peak.
    assert gpu_kv_budget(80 * GiB, 17 * GiB, 3 * GiB, 0.9) == int(72 * GiB) - 20 * GiB
    # Another process already holds most of the card: nothing is left, never a negative pool.
    assert gpu_kv_budget(80 * GiB, 75 * GiB, 3 * GiB, 0.9) < 0


def test_no_room_for_a_single_page_says_to_raise_utilization():
    with pytest.raises(ValueError, match="No available memory for the cache blocks"):
        check_fits(0, 16, 1024)


def test_max_model_len_beyond_the_pool_is_vllms_error():
    check_fits(64, 16, 1024)  # exactly full: accepted
    with pytest.raises(ValueError, match=r"max seq len \(1025\) is larger than the maximum "
                                         r"number of tokens that can be stored in KV cache "
                                         r"\(1024\)"):
        check_fits(64, 16, 1025)


def test_engine_refuses_to_start_when_max_model_len_cannot_fit():
    with pytest.raises(ValueError, match=r"max seq len \(2048\).*\(64\).*decreasing "
                                         r"`max_model_len`"):
        LLM(dtype="float32", quantization="none", num_kv_pages=4, max_model_len=2048,
            enforce_eager=True)


@pytest.mark.parametrize("max_batch, sizes", [
    (1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (12, [1, 2, 4, 8, 12]),
    (64, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64])])
def test_decode_graph_buckets_cover_every_batch_size_up_to_the_largest(max_batch, sizes):
    assert capture_sizes(max_batch) == sizes
    assert all(any(s >= n for s in sizes) for n in range(1, max_batch + 1))
