"""`tessera serve` configuration: code defaults < YAML preset < command-line flags."""
import argparse
from pathlib import Path

import pytest

from server.config import add_serve_flags, resolve

ROOT = Path(__file__).resolve().parent.parent


def configs(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    return resolve(parser.parse_args(argv), parser)


def test_defaults_serve_the_bundled_model_on_localhost_8000():
    engine, server = configs([])
    assert engine.model.model is None and engine.device == "cpu"
    assert (server.host, server.port, server.served_model_name) == (
        "127.0.0.1", 8000, "SmolLM2-135M-Instruct")


def test_flags_override_the_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("max-num-seqs: 8\nport: 9000\nkv-cache-memory: 1GiB\n"
                      "no-prefix-caching: true\n")
    engine, server = configs(["--config", str(preset), "--port", "9100"])
    assert engine.scheduler.max_num_seqs == 8 and server.port == 9100
    assert engine.cache.kv_cache_memory == 2**30 and not engine.cache.enable_prefix_caching


def test_unknown_preset_key_is_an_error(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("max-num-sequences: 8\n")
    with pytest.raises(SystemExit):
        configs(["--config", str(preset)])


@pytest.mark.parametrize("name", ["smollm2-cpu", "llama3-8b-gpu"])
def test_shipped_presets_load(name):
    engine, _ = configs(["--config", str(ROOT / "configs" / f"{name}.yaml")])
    assert engine.cache.page_size == 16


def test_gpu_flags_reach_the_engine_config(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("device: cuda\ngpu-memory-utilization: 0.8\nenforce-eager: true\n")
    engine, _ = configs(["--config", str(preset), "--gpu-memory-utilization", "0.75"])
    assert engine.device == "cuda" and engine.model.enforce_eager
    assert engine.cache.gpu_memory_utilization == 0.75
    assert not configs([])[0].model.enforce_eager


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_gpu_memory_utilization_outside_0_1_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit):
        configs(["--gpu-memory-utilization", value])
    assert "gpu_memory_utilization must be in (0, 1]" in capsys.readouterr().err
