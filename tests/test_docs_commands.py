"""Commands the docs show that the other docs tests do not run, run exactly as written in a folder laid out
like the checkout (examples/ and the environment beside it)."""
import os
import shutil
import subprocess
import tomllib

import pytest

from conftest import ROOT
from fedlora.plots import figure, read_run
from fedlora.simulator import Simulator
from test_fedsb_init import README_COMM

PLOT = ".venv/bin/fedlora plot runs/fedsb-s0 runs/fedsb-s1 runs/ffa-s0 runs/ffa-s1 --out runs/compare.png"
FLOWER_INIT = ('FEDLORA_DATA_DIR=$PWD/../shared/data .venv/bin/fedlora flower init my-app examples/quickstart.toml '
               '--out "$PWD/runs/flower-quickstart"')
SHOWN = {"running.md": [PLOT], "flower.md": [FLOWER_INIT]}


@pytest.fixture
def checkout(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    shutil.copytree(ROOT / "examples", folder / "examples")
    (folder / ".venv").symlink_to(ROOT / ".venv")
    return folder


def shell(command: str, folder) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    return done


def test_the_commands_are_the_documented_ones():
    for page, commands in SHOWN.items():
        text = (ROOT / "docs" / page).read_text()
        missing = [c for c in commands if f"    {c}\n" not in text]
        assert not missing, f"not in docs/{page}: {missing}"
    # test_fedsb_init runs these `fedlora comm` commands: the page must show them and their output as run
    shown = "".join(f"    {line}\n" for line in README_COMM.splitlines())
    assert shown in (ROOT / "docs" / "running.md").read_text()


def test_fedlora_plot_as_documented(checkout, sim_config):
    pytest.importorskip("matplotlib")
    for method in ("fedsb", "ffa"):
        for seed in (0, 1):
            Simulator(sim_config(method={"name": method}, seed=seed), checkout / f"runs/{method}-s{seed}",
                      progress=False).run()
    done = shell(PLOT, checkout)
    assert done.stdout == "wrote runs/compare.png\n"
    assert (checkout / "runs/compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = [read_run(checkout / f"runs/{name}") for name in ("fedsb-s0", "fedsb-s1", "ffa-s0", "ffa-s1")]
    labels = {line.get_label() for line in figure(runs).axes[0].get_lines()}
    majority = runs[0].baselines["majority"]  # the toy evaluation file's larger class
    assert labels == {"fedsb r=4", "ffa r=4", "chance 0.50", f"majority class {majority:.2f}"}


def test_fedlora_flower_init_as_documented(checkout):
    pytest.importorskip("flwr")
    shell(FLOWER_INIT, checkout)
    app = tomllib.loads((checkout / "my-app/pyproject.toml").read_text())
    config = app["tool"]["flwr"]["app"]["config"]
    assert config["out"] == str(checkout / "runs/flower-quickstart")
    assert config["fedlora.data.root"] == str(checkout.parent / "shared/data")
    assert config["fedlora.federation.rounds"] == 20 and config["fedlora.adapter.rank"] == 32  # the quickstart's
