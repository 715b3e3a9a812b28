"""The GPU suite's commands as docs/gpu.md shows them: the CPU dry run runs every step and writes to a
temporary folder; without CUDA the real run refuses and says how to dry-run. The TOML example is valid."""
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch

from fedlora import models
from fedlora.config import build_config
from fedlora.methods import METHODS

from conftest import ROOT, SHARED_DATA

DRY_RUN = "FEDLORA_DATA_DIR=../shared/data bash benchmarks/gpu_suite.sh --dry-run"
GPU_RUN = "FEDLORA_DATA_DIR=../shared/data bash benchmarks/gpu_suite.sh"
PAGE = (ROOT / "docs" / "gpu.md").read_text()


def shell(command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_the_commands_are_the_documented_ones():
    for command in (DRY_RUN, GPU_RUN):
        assert f"\n    {command}\n" in PAGE, command
    assert "**No GPU figures have been measured yet.**" in PAGE


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "gsm8k").is_dir(), reason="the GSM8K data of ../shared/data is missing")
def test_the_dry_run_runs_every_step_into_a_temporary_folder():
    results = {p: p.stat().st_mtime_ns for p in (ROOT / "results").iterdir()}
    done = shell(DRY_RUN)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = Path(re.search(r"all steps passed; results in (\S+)", done.stdout).group(1))
    assert out.parent != ROOT and out.name != "results"
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "results").iterdir()} == results  # results/ untouched
    for step in ("CUDA-marked tests", "B1 throughput", "B2 DP overhead", "vectorised clients", "quantised bases"):
        assert f"== {step}\n" in done.stdout
    written = {p.name: json.loads(p.read_text()) for p in out.glob("*_gpu.json")}
    assert set(written) == {"cuda_tests_gpu.json", "throughput_gpu.json", "dp_overhead_gpu.json",
                            "parallel_clients_gpu.json", "quantization_gpu.json"}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    assert [r["device"] for r in written.values()] == [device] * 5
    tests = written["cuda_tests_gpu.json"]
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]
    models_run = {(r["model"], r["method"]) for r in written["dp_overhead_gpu.json"]["rows"]}
    assert models_run == {(m, k) for m in ("smollm2-135m", "gemma3-270m") for k in ("fedit", "ffa", "fedsb")}
    assert [r["model"] for r in written["throughput_gpu.json"]["rows"]] == ["smollm2-135m", "gemma3-270m"]
    vectorised = written["parallel_clients_gpu.json"]["rows"]
    assert [(r["model"], r["device"]) for r in vectorised] == [("smollm2-135m", "cpu")]
    # the table prints a row per measurement, each figure from the files
    table = done.stdout[done.stdout.index("| what | setting | figure | value |"):]
    ratio = written["throughput_gpu.json"]["rows"][0]["fedlora_over_peft"]
    assert f"| B1 step time | smollm2-135m, 2 x 16, rank 16 | fedlora / PEFT; fedlora / floor | {ratio:.2f};" in table
    assert f"| vectorised / sequential round | {vectorised[0]['ratio']:.3f} |" in table
    quantised = {(r["model"], r["variant"]): r for r in written["quantization_gpu.json"]["rows"]}
    assert quantised[("gemma3-270m", "bf16")]["time_over_bf16"] == 1.0
    if not torch.cuda.is_available():
        assert quantised[("gemma3-270m", "4bit")]["skipped"] == "needs a CUDA device"
        assert "| quantised base | smollm2-135m, 8bit base | skipped | needs a CUDA device |" in table
    shutil.rmtree(out)


def test_every_cuda_marked_test_is_in_the_file_the_suite_runs():
    marker = re.compile(r"pytest\.mark\.cuda\b")
    marked = [p.name for p in (ROOT / "tests").glob("*.py") if marker.search(p.read_text())]
    assert marked == ["test_cuda.py"]


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_gpu_run_refuses_and_names_the_dry_run():
    done = shell(GPU_RUN)
    assert done.returncode == 2
    assert "no CUDA device here; 'bash benchmarks/gpu_suite.sh --dry-run'" in done.stderr
    assert done.stdout == ""


def test_the_documented_quantised_config_is_valid_for_its_method(monkeypatch):
    block = re.search(r"```toml\n(.*?)```", PAGE, re.S).group(1)
    cfg = build_config(tomllib.loads(block))
    assert (cfg.device, cfg.model.quantization, cfg.method.name) == ("cuda", "4bit", "ffa")
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())  # as if bitsandbytes were there
    models.check_quantization(cfg.model.quantization, METHODS[cfg.method.name], torch.device("cuda"))
