"""`tessera` as scripts, Docker and systemd see it: exit codes, help and one-line causes."""
import struct
import subprocess
import sys
import time

from engine.logs import Progress
from tests.conftest import BASE_ARGS, ROOT, _free_port, write_tiny_tokenizer


def tessera(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_missing_model_exits_2_naming_the_flag_before_binding_the_port():
    start = time.monotonic()
    out = tessera("serve", "/no/such/model.gguf", "--port", str(_free_port()))
    assert out.returncode == 2
    assert "tessera serve: error: argument MODEL/--model:" in out.stderr
    assert "/no/such/model.gguf" in out.stderr
    assert "Uvicorn" not in out.stderr + out.stdout  # the HTTP stack never started
    assert time.monotonic() - start < 5  # no model, tokenizer or torch was loaded


def test_an_engine_that_dies_before_ready_exits_1_with_the_cause_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.gguf"  # the magic passes the early check; the rest is noise
    garbage.write_bytes(b"GGUF" + struct.pack("<I", 3) + bytes(range(256)) * 4)
    tokenizer = write_tiny_tokenizer(tmp_path / "tokenizer")
    out = tessera("serve", str(garbage), "--tokenizer", str(tokenizer), "--port",
                  str(_free_port()), *BASE_ARGS)
    log = out.stdout + out.stderr
    assert out.returncode == 1, log
    [cause] = [line for line in log.splitlines() if "start-up failed" in line]
    assert "engine core: " in cause and "Error" in cause
    assert "Traceback" not in log


def test_bad_values_name_the_flag_and_never_an_internal_function():
    out = tessera("serve", "--kv-cache-memory", "abc")
    assert out.returncode == 2
    assert "argument --kv-cache-memory: expected a size such as 2GiB" in out.stderr
    assert "_byte_size" not in out.stderr and "byte_size" not in out.stderr


def test_bench_help_lists_the_benchmarks_and_exits_0():
    out = tessera("bench", "--help")
    assert out.returncode == 0, out.stderr
    assert all(name in out.stdout for name in ("serve", "throughput", "kernels"))
    assert tessera("bench", "serve", "--help").returncode == 0


def test_version_flag_prints_the_version():
    out = tessera("--version")
    assert out.returncode == 0 and out.stdout.startswith("tessera ")



def test_progress_lines_come_at_most_every_interval_and_stop_when_done():
    lines = []
    progress = Progress(4, "requests done", lines.append, interval_s=0)
    for done in (1, 4):
        progress.update(done)
    assert len(lines) == 1 and lines[0].startswith("1/4 requests done (25%), ")
    Progress(4, "x", lines.append, interval_s=3600).update(1)
    assert len(lines) == 1
