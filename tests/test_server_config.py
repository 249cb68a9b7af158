"""`tessera serve` configuration: code defaults < YAML preset < command-line flags."""
import argparse
from pathlib import Path

import pytest

from engine.config import CacheConfig, SchedulerConfig
from server.config import add_serve_flags, parse_serve_args, resolve

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


@pytest.mark.parametrize("name", ["smollm2-cpu", "smollm2-disagg-cpu", "llama3-8b-gpu"])
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
    assert "argument --gpu-memory-utilization: must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [
    ("--port", "0"), ("--port", "70000"), ("--max-num-seqs", "0"),
    ("--max-num-batched-tokens", "-1"), ("--page-size", "0"), ("--block-size", "0"),
    ("--num-kv-pages", "0"), ("--kv-cache-memory", "0"), ("--max-model-len", "0"),
    ("--device", "tpu"), ("--kv-transfer-timeout", "0"), ("--kv-lease-timeout", "-1"),
    ("--cpus-per-engine", "-1")])
def test_a_value_out_of_range_is_a_usage_error_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        configs([flag, value])
    canonical = "--page-size" if flag == "--block-size" else flag
    assert exit_.value.code == 2
    assert f"error: argument {canonical}: must be" in capsys.readouterr().err


def test_a_preset_value_is_checked_like_the_flag(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("kv-cache-memory: lots\n")
    with pytest.raises(SystemExit):
        configs(["--config", str(preset)])
    assert "kv-cache-memory: expected a size such as 2GiB" in capsys.readouterr().err


def test_prefill_engines_without_decode_engines_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        configs(["--prefill-engines", "1"])
    assert "argument --prefill-engines: and --decode-engines go together" in (
        capsys.readouterr().err)
    _, server = configs(["--prefill-engines", "2", "--decode-engines", "1"])
    assert (server.prefill_engines, server.decode_engines) == (2, 1)


@pytest.mark.parametrize("line, flag", [
    ('max-num-seqs: "lots"', "--max-num-seqs"),
    ("max-num-seqs: 3.5", "--max-num-seqs"),
    ("max-num-seqs: true", "--max-num-seqs"),  # bool is an int to Python, not to us
    ("max_model_len: [1]", "--max-model-len"),
    ("max-num-batched-tokens: {a: 1}", "--max-num-batched-tokens"),
    ("num-kv-pages: 1.0", "--num-kv-pages"),
    ("page-size: null", "--page-size"),
    ("seed: 0.5", "--seed"),
    ("gpu-memory-utilization: [0.5]", "--gpu-memory-utilization"),
    ("gpu-memory-utilization: false", "--gpu-memory-utilization"),
    ("device: 0", "--device"),
    ("model: [a.gguf]", "--model"),
    ("host: 127", "--host"),
    ("port: 80.5", "--port"),
    ("served-model-name: 7", "--served-model-name"),
    ("api-key: 12345", "--api-key"),
    ("allowed-origins: [1, 2]", "--allowed-origins"),
    ('enable-prefix-caching: "false"', "enable-prefix-caching"),  # would be truthy
    ("log-prompts: 1", "log-prompts"),
    ("dtype: 16", "dtype"),
])
def test_a_preset_value_of_the_wrong_type_is_a_usage_error_naming_the_key(line, flag, tmp_path,
                                                                          capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text(line + "\n")
    with pytest.raises(SystemExit) as exit_:
        parse_serve_args(["--config", str(preset)])
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("line, field, value", [
    ("gpu-memory-utilization: 1", "gpu_memory_utilization", 1),  # an int is a number
    ("max-model-len: null", "max_model_len", None),
    ("max-num-seqs: '8'", "max_num_seqs", 8),  # a string goes through the flag's type
    ("allowed-origins: [a, b]", "allowed_origins", ["a", "b"])])
def test_a_preset_value_of_a_compatible_type_is_accepted(line, field, value, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(line + "\n")
    engine, server = configs(["--config", str(preset)])
    sections = (engine.model, engine.cache, engine.scheduler, server)
    assert [getattr(s, field) for s in sections if hasattr(s, field)] == [value]


def test_the_engine_config_checks_types_for_the_offline_api_too():
    with pytest.raises(ValueError, match="max_num_seqs must be an integer, got 'lots'"):
        SchedulerConfig(max_num_seqs="lots")


def test_an_unknown_kv_cache_dtype_is_refused_with_the_list(capsys):
    """At the CLI and in the offline API alike, never a KeyError when the engine builds its
    cache; the quantized formats are accepted."""
    with pytest.raises(SystemExit):
        parse_serve_args(["--kv-cache-dtype", "fp4"])
    assert ("invalid choice: 'fp4' (choose from 'auto', 'float32', 'bfloat16', 'float16', "
            "'fp8', 'int8', 'int4')") in capsys.readouterr().err
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, "
                                         "bfloat16, float16, fp8, int8, int4, got 'q4_0'"):
        CacheConfig(kv_cache_dtype="q4_0")
    for name in ("fp8", "int8", "int4"):
        assert configs(["--kv-cache-dtype", name])[0].cache.kv_cache_dtype == name


def test_the_model_is_positional_as_in_vllm():
    assert configs(["m.gguf"]) == configs(["--model", "m.gguf"])
    assert configs(["m.gguf", "--model", "m.gguf"])[0].model.model == "m.gguf"


def test_two_different_models_are_an_error(capsys):
    with pytest.raises(SystemExit):
        configs(["a.gguf", "--model", "b.gguf"])
    assert "the model is given twice" in capsys.readouterr().err


def test_block_size_is_page_size(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("block-size: 32\n")
    assert (configs(["--block-size", "32"]) == configs(["--page-size", "32"])
            == configs(["--config", str(preset)]))
    assert configs(["--block-size", "32"])[0].cache.page_size == 32


@pytest.mark.parametrize("argv, yaml_text", [
    (["--no-enable-prefix-caching"], "enable-prefix-caching: false"),
    (["--no-prefix-caching"], "no-prefix-caching: true"),
    (["--enable-prefix-caching", "--no-prefix-caching"], "no-enable-prefix-caching: true")])
def test_prefix_caching_switches_of_vllm_and_ours_agree(argv, yaml_text, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml_text + "\n")
    for engine, _ in (configs(argv), configs(["--config", str(preset)])):
        assert engine.cache.enable_prefix_caching is False
    assert configs(["--enable-prefix-caching"])[0].cache.enable_prefix_caching is True


def test_seed_seeds_sampling_and_dummy_weights_have_their_own():
    engine, _ = configs(["--seed", "7", "--dummy-weights-seed", "3"])
    assert (engine.model.seed, engine.model.dummy_weights_seed) == (7, 3)
    assert configs([])[0].model.seed == 0


def test_trust_remote_code_is_accepted_and_changes_nothing():
    assert configs(["--trust-remote-code"]) == configs([])


def test_tokenizer_and_chat_template_reach_the_configs(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    engine, server = configs(["--tokenizer", "tok-dir", "--chat-template", str(template)])
    assert engine.model.tokenizer_path == "tok-dir" and server.chat_template == template.read_text()
    assert configs(["m.gguf"])[0].model.tokenizer_path == "m.gguf"


def test_a_chat_template_that_is_not_jinja_is_a_usage_error(tmp_path, capsys):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}")
    with pytest.raises(SystemExit):
        configs(["--chat-template", str(template)])
    assert "argument --chat-template:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["/no/such.gguf"], "argument MODEL/--model: model not found"),
    (["--model", str(ROOT / "configs" / "tiny-llama")], "holds no *.safetensors"),
    ([str(ROOT / "README.md")], "neither a .gguf file nor"),
    (["--tokenizer", "/no/such/dir"], "argument --tokenizer: no such file")])
def test_paths_are_checked_before_the_server_starts(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_serve_args(argv)
    assert message in capsys.readouterr().err


def test_max_request_body_size_takes_a_byte_size_and_defaults_to_8_mib(tmp_path, capsys):
    assert configs([])[1].max_request_body_size == 8 * 2**20
    assert configs(["--max-request-body-size", "16MiB"])[1].max_request_body_size == 16 * 2**20
    preset = tmp_path / "p.yaml"
    preset.write_text("max-request-body-size: 1MB\n")
    assert configs(["--config", str(preset)])[1].max_request_body_size == 10**6
    for value in ("0", "inf"):
        with pytest.raises(SystemExit):
            configs(["--max-request-body-size", value])
    assert "argument --max-request-body-size: must be at least 1 byte" in capsys.readouterr().err
