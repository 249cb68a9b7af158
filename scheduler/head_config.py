"""Head-wise KV budgets (DuoAttention, RazorAttention): which KV heads need the whole context.

The rule: a head config names, per layer, the KV heads that stream. A streaming head keeps the
first `sinks` positions and the last `window` computed ones (StreamingLLM's rule,
`kv_policy.StreamingPolicy`, evicted before each step), in a page pool of its own with a page
table per request; every other head (a retrieval head) keeps the whole context in the main
pool, which then holds only those heads. The saving is real memory: a long request holds its
full-context pages at the retrieval heads' width and a bounded window at the streaming heads'.

The file (`--kv-head-config`, written by `tessera calibrate heads`) is JSON:
`{"sinks": 4, "window": 1020, "streaming": [[layer, kv_head], ...], "scores": [[...], ...]}`,
`scores` (each head's need for the whole context, per layer) being informative only.
"""
import json
from dataclasses import dataclass

import numpy as np

from scheduler.kv_policy import StreamingPolicy


@dataclass(frozen=True)
class HeadConfig:
    sinks: int
    window: int
    streaming: frozenset[tuple[int, int]]  # (layer, kv_head)

    @property
    def policy(self) -> StreamingPolicy:
        return StreamingPolicy(self.sinks, self.window)

    def streaming_mask(self, num_layers: int, num_kv_heads: int) -> np.ndarray:
        """`[layers, kv_heads]`: True where the head streams. Heads the model does not have
        are refused."""
        mask = np.zeros((num_layers, num_kv_heads), dtype=bool)
        for layer, head in self.streaming:
            if not (0 <= layer < num_layers and 0 <= head < num_kv_heads):
                raise ValueError(f"kv head config: the model has {num_layers} layers of "
                                 f"{num_kv_heads} KV heads, no ({layer}, {head})")
            mask[layer, head] = True
        return mask


def load_head_config(path: str) -> HeadConfig:
    """Read and check a head config file; errors name the file and what is wrong."""
    try:
        with open(path) as f:
            data = json.load(f)
        streaming = frozenset((int(layer), int(head)) for layer, head in data["streaming"])
        config = HeadConfig(int(data["sinks"]), int(data["window"]), streaming)
        config.policy  # checks sinks and window
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--kv-head-config {path}: {e}") from None
    return config


def write_head_config(path: str, sinks: int, window: int, streaming: list[tuple[int, int]],
                      scores: np.ndarray) -> None:
    fields = {"sinks": sinks, "window": window,
              "streaming": [list(map(int, h)) for h in sorted(streaming)],
              "scores": np.round(scores, 4).tolist()}
    with open(path, "w") as f:  # a line per field (and per layer's scores)
        f.write("{\n" + ",\n".join(
            f' "{k}": ' + (json.dumps(v) if k != "scores" else
                           "[\n  " + ",\n  ".join(map(json.dumps, v)) + "\n ]")
            for k, v in fields.items()) + "\n}\n")
