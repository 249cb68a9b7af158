"""What crosses process boundaries: typed messages and page hashes that mean the same
everywhere."""
import os
import subprocess
import sys

import msgspec
import pytest

from engine.messages import (AddRequest, EngineStep, RequestOutput, StepStats, TokenLogprobs,
                             WireError, decode, encode)
from engine.sampling_params import SamplingParams, StructuredOutput
from scheduler.block_manager import page_hash


def test_messages_round_trip_with_their_types():
    add = AddRequest("r", [1, 2], SamplingParams(
        temperature=0.5, seed=7, logit_bias={3: 1.5},
        structured_output=StructuredOutput("regex", "a+")), 1.0)
    assert decode(encode(add)) == add
    step = EngineStep([RequestOutput("r", [5], "stop", [TokenLogprobs(-0.1, 1, [(5, -0.1)])])],
                      StepStats(*range(10)))
    assert decode(encode(step)) == step


@pytest.mark.parametrize("data, why", [
    (b"\x80\x04junk", "not a tessera/1 message"),
    (encode(AddRequest("r", [1], SamplingParams(), 0.0)).replace(b"tessera/1", b"tessera/9"),
     "not a tessera/1 message"),
    (b"tessera/1 " + msgspec.msgpack.encode({"type": "Shutdown"}), "malformed"),
    (b"tessera/1 " + msgspec.msgpack.encode(
        {"type": "AddRequest", "request_id": "x", "prompt_token_ids": [1],
         "sampling_params": {"temperature": -1}, "arrival_time": 0}), "temperature must be"),
])
def test_a_bad_message_is_a_wire_error(data, why):
    with pytest.raises(WireError, match=why):
        decode(data)


def test_page_hashes_are_the_same_in_every_process():
    """Python's `hash()` of a tuple holding `None` is salted per process; a page's name is
    not."""
    code = ("from scheduler.block_manager import page_hash;"
            "print(page_hash(page_hash(None, (1, 2, 3)), (4, 5)))")
    names = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
             for seed in ("1", "2")}
    assert names == {f"{page_hash(page_hash(None, (1, 2, 3)), (4, 5))}\n"}
    assert page_hash(None, (1, 2)) != page_hash(None, (2, 1))
    assert page_hash(None, (1, 2)) != page_hash(page_hash(None, (0,)), (1, 2))
