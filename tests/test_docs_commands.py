"""Commands the docs show that the other docs tests do not run, run exactly as written in a folder laid out
like the checkout (examples/ and the environment beside it). The two whole runs, the quickstart and the
private recipe, run at the same time, each with one torch thread (OMP_NUM_THREADS=1) in a checkout of its own."""
import json
import os
import re
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_DATA, read_log
from fedlora.plots import figure, read_run
from fedlora.simulator import Simulator
from test_fedsb_init import README_COMM

PLOT = ".venv/bin/fedlora plot runs/fedsb-s0 runs/fedsb-s1 runs/ffa-s0 runs/ffa-s1 --out runs/compare.png"
PARETO = ".venv/bin/fedlora plot --pareto runs/fedsb-s0 runs/fedsb-s1 runs/ffa-s0 runs/ffa-s1 --out runs/pareto.png"
FLOWER_INIT = ('FEDLORA_DATA_DIR=$PWD/../shared/data .venv/bin/fedlora flower init my-app examples/quickstart.toml '
               '--out "$PWD/runs/flower-quickstart"')
QUICKSTART = "FEDLORA_DATA_DIR=../shared/data .venv/bin/fedlora run examples/quickstart.toml --out runs/quickstart"
PRIVATE_RECIPE = "FEDLORA_DATA_DIR=../shared/data .venv/bin/fedlora run examples/sst2_dp.toml --out runs/sst2-dp"
USER_DP_RECIPE = ("FEDLORA_DATA_DIR=../shared/data .venv/bin/fedlora run examples/sst2_user_dp.toml "
                  "--out runs/sst2-user-dp")
SIM_ENGINE = """cat >> ~/.flwr/config.toml <<'TOML'
[superlink.local-sim]
address = ":local:"
options.num-supernodes = 10
TOML
.venv/bin/fedlora flower run my-app local-sim --run-config 'fedlora.federation.rounds=2'"""
TUNE = ("FEDLORA_DATA_DIR=../shared/data .venv/bin/fedlora tune examples/quickstart.toml --grid train.lr=3e-3,1e-2 "
        "--set federation.rounds=5 --out runs/tune-quickstart")
THREE_PARTIES = ".venv/bin/fedlora run examples/deploy/three_parties.toml --out runs/three-parties"
THREE_PARTIES_DEPLOYED = ("examples/deploy/loopback.sh examples/deploy/three_parties.toml runs/deploy-three-parties "
                          "examples/deploy/data")
FAST_TIER = 'OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m "not slow and not live and not docs"'
SHOWN = {"running.md": [PLOT, PARETO, TUNE], "flower.md": [FLOWER_INIT, SIM_ENGINE, THREE_PARTIES, THREE_PARTIES_DEPLOYED], "privacy.md": [PRIVATE_RECIPE, USER_DP_RECIPE],
         "../README.md": [QUICKSTART, PRIVATE_RECIPE, USER_DP_RECIPE]}
# the recipe's FFA-LoRA runs ended at 0.7534 to 0.7695 (docs/privacy.md); the majority class is at 0.5092
PRIVATE_RECIPE_FLOOR = 0.70
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} not found")


def make_checkout(parent) -> Path:
    folder = parent / "work"
    folder.mkdir()
    shutil.copytree(ROOT / "examples", folder / "examples")
    (folder / ".venv").symlink_to(ROOT / ".venv")
    (parent / "shared").symlink_to(SHARED_DATA.parent)
    return folder


@pytest.fixture
def checkout(tmp_path):
    return make_checkout(tmp_path)


def shell(command: str, folder, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    return done


def test_the_commands_are_the_documented_ones():
    for page, commands in SHOWN.items():
        text = (ROOT / "docs" / page).read_text()
        missing = [c for c in commands if "".join(f"    {line}\n" for line in c.splitlines()) not in text]
        assert not missing, f"not in docs/{page}: {missing}"
    # test_fedsb_init runs these `fedlora comm` commands: the page must show them and their output as run
    shown = "".join(f"    {line}\n" for line in README_COMM.splitlines())
    assert shown in (ROOT / "docs" / "running.md").read_text()


def test_ci_sets_up_and_tests_exactly_as_the_readme_says():
    """The README's set-up and test commands are the ones CI (.ci/run, on a fresh clone) runs, and only they."""
    readme = (ROOT / "README.md").read_text()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == ["bash setup.sh", ".venv/bin/python -m pytest -q"]
    for command in ci:
        assert f"\n    {command}\n" in readme, command


def test_the_readmes_test_tiers_are_the_registered_markers():
    """The README's fast tier leaves out registered markers, and its list of markers is pyproject.toml's."""
    readme = (ROOT / "README.md").read_text()
    assert f"\n    {FAST_TIER}\n" in readme
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    registered = {marker.split(":")[0] for marker in markers}
    assert set(re.findall(r"not (\w+)", FAST_TIER)) <= registered
    development = readme.split("\n## Development\n")[1].split("\n## ")[0]
    assert set(re.findall(r"^- `(\w+)`:", development, re.M)) == registered


def collected(command: str) -> set[str]:
    """The test ids a pytest command line selects (run with --collect-only added through PYTEST_ADDOPTS)."""
    done = shell(f"PYTEST_ADDOPTS=--collect-only {command}", ROOT, timeout=600)
    return {line for line in done.stdout.splitlines() if "::" in line}


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
def test_the_fast_tier_as_documented():
    """The README's fast tier, exactly as written, in the checkout, selects every test that is not slow, live
    or docs, and leaves out this one. Whether those tests pass is what the whole suite checks; running them a
    second time here would add minutes to it and check nothing more."""
    fast = collected(FAST_TIER)
    rest = collected('.venv/bin/python -m pytest -q -m "slow or live or docs"')
    everything = collected(".venv/bin/python -m pytest -q")
    assert fast and not fast & rest and fast | rest == everything, (len(fast), len(rest), len(everything))
    assert "tests/test_docs_commands.py::test_the_fast_tier_as_documented" in rest - fast


@pytest.mark.docs
@pytest.mark.live
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
    assert shell(PARETO, checkout).stdout == "wrote runs/pareto.png\n"
    assert (checkout / "runs/pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.docs
@pytest.mark.live
def test_fedlora_flower_init_as_documented(checkout):
    pytest.importorskip("flwr")
    shell(FLOWER_INIT, checkout)
    app = tomllib.loads((checkout / "my-app/pyproject.toml").read_text())
    config = app["tool"]["flwr"]["app"]["config"]
    assert config["out"] == str(checkout / "runs/flower-quickstart")
    assert config["fedlora.data.root"] == str((checkout.parent / "shared/data").resolve())
    assert config["fedlora.federation.rounds"] == 20 and config["fedlora.adapter.rank"] == 32  # the quickstart's


def final_line(done: subprocess.CompletedProcess) -> str:
    return done.stdout.strip().splitlines()[-1]


WHOLE_RUNS = {"test_the_quickstart_as_documented": QUICKSTART, "test_the_private_recipe_as_documented": PRIVATE_RECIPE,
              "test_fedlora_tune_as_documented": TUNE}


@pytest.fixture(scope="module")
def whole_runs(request, tmp_path_factory):
    """The whole runs of the tests selected in this session, started together: {command: (process, checkout)}."""
    started = {}
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    for item in request.session.items:
        command = WHOLE_RUNS.get(getattr(item, "originalname", None))
        if command and command not in started:
            folder = make_checkout(tmp_path_factory.mktemp("docs"))
            with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
                started[command] = (subprocess.Popen(["bash", "-c", command], cwd=folder, env=env, stdout=out,
                                                     stderr=err, start_new_session=True), folder)
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def finished(whole_runs, command: str, timeout: float) -> tuple[Path, subprocess.CompletedProcess]:
    """Wait for a whole run: its checkout and its outcome."""
    process, folder = whole_runs[command]
    process.wait(timeout=timeout)
    done = subprocess.CompletedProcess(command, process.returncode, (folder / "stdout").read_text(),
                                       (folder / "stderr").read_text())
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    return folder, done


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
@needs_shared
def test_the_quickstart_as_documented(whole_runs):
    """The README's main command: Fed-SB learns well above the majority class, with the documented bytes
    (byte counts do not depend on the machine; accuracy does, a little)."""
    checkout, done = finished(whole_runs, QUICKSTART, timeout=3600)
    summary = json.loads((checkout / "runs/quickstart/summary.json").read_text())
    assert summary["final_eval"]["accuracy"] > 0.75, final_line(done)
    assert (summary["bytes_up_total"], summary["bytes_down_total"]) == (98_510_400, 118_785_600)
    assert "bytes up" in final_line(done) and "(chance 0.5000, majority class 0.5092)" in final_line(done)


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
@needs_shared
def test_fedlora_tune_as_documented(whole_runs):
    """docs/running.md's tuning: both learning rates run on held-out training rows (SST-2's dev file is never
    evaluated on), the better mean chosen and written back with the command's other settings."""
    checkout, done = finished(whole_runs, TUNE, timeout=3600)
    folder = checkout / "runs/tune-quickstart"
    record = json.loads((folder / "tuning.json").read_text())
    assert [t["setting"]["train.lr"] for t in record["trials"]] == [3e-3, 1e-2] and record["holdout_fraction"] == 0.1
    best = max(record["scores"], key=lambda row: row["mean"])["setting"]["train.lr"]
    chosen = tomllib.loads((folder / "best.toml").read_text())
    assert chosen["train"]["lr"] == best and chosen["federation"]["rounds"] == 5
    assert "trial 1/2 (train.lr=0.003, seed 0): accuracy" in done.stderr and "trial 2/2" in done.stderr
    assert final_line(done).startswith(f"best: train.lr={best}: accuracy ")
    for trial in record["trials"]:  # evaluated on a tenth of SST-2's 67,349 training rows, not the 872 of dev
        summary = json.loads((folder / trial["folder"] / "summary.json").read_text())
        assert summary["config"]["data"]["holdout_fraction"] == 0.1 and sum(summary["client_sizes"]) == 60614


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
@needs_shared
def test_the_private_recipe_as_documented(whole_runs):
    """docs/privacy.md's recipe: epsilon 3 spent, not exceeded, and a model clearly off the majority class
    (its noise is secret, so every run differs: the bound is below the lowest of the measured seeds)."""
    checkout, done = finished(whole_runs, PRIVATE_RECIPE, timeout=3600)
    summary = json.loads((checkout / "runs/sst2-dp/summary.json").read_text())
    assert 2.9 < summary["privacy"]["epsilon_max"] <= 3.0
    assert summary["final_eval"]["accuracy"] > PRIVATE_RECIPE_FLOOR, final_line(done)
    assert (summary["bytes_up_total"], summary["bytes_down_total"]) == (7_114_816, 7_114_816)


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
@needs_shared
def test_the_client_level_recipe_trains_as_documented(checkout):
    """The client-level DP recipe, run as written until its first round is logged (its whole run takes tens of
    minutes; docs/privacy.md reports it): a Poisson cohort of about 200, the clipping bound and an epsilon
    below the target."""
    from test_docs_scripts import Shown, run_until_it_works

    run_until_it_works(USER_DP_RECIPE, checkout, Shown("privacy.md", "rounds:runs/sst2-user-dp"), timeout=1200)
    row = read_log(checkout / "runs/sst2-user-dp")[1]
    assert 0 < row["epsilon"] < 8 and row["client_clip"] > 0 and 120 < len(row["clients"]) < 280, row


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
@needs_shared
def test_flowers_simulation_engine_as_documented(checkout, tmp_path):
    """docs/flower.md (a): the app of `fedlora flower init`, run on Flower's simulation engine (10 virtual
    SuperNodes as Ray actors) through a `:local:` connection in ~/.flwr, exactly as written."""
    pytest.importorskip("ray", reason="Flower's simulation engine (the 'flower' extra) is not installed")
    if not package_index_reachable():
        pytest.skip("Flower's simulation engine builds each run's environment with uv from the package index, "
                    "which cannot be reached from here")
    home = tmp_path / "home"
    (home / ".flwr").mkdir(parents=True)
    env = dict(os.environ, HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("FLWR_HOME", None)
    try:
        for command in (FLOWER_INIT, SIM_ENGINE):
            done = subprocess.run(["bash", "-c", command], cwd=checkout, env=env, capture_output=True, text=True,
                                  timeout=3600)
            assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    finally:
        stop_processes_of(home)
    assert "fedlora round 2/2: 10 clients" in done.stdout and "completed" in done.stdout
    run = checkout / "runs" / "flower-quickstart"
    assert [row["round"] for row in read_log(run)] == [0, 1, 2]
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2


def stop_processes_of(home) -> None:
    """Stop what the run left behind (the local SuperLink flwr keeps for later runs): every process whose
    environment has this HOME."""
    marker = f"HOME={home}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGTERM)
        except (OSError, ProcessLookupError):
            continue


def package_index_reachable() -> bool:
    """Whether uv's package index (UV_DEFAULT_INDEX / UV_INDEX_URL, else PyPI) answers, through any proxy set."""
    import urllib.request

    index = os.environ.get("UV_DEFAULT_INDEX") or os.environ.get("UV_INDEX_URL") or "https://pypi.org/simple"
    try:
        with urllib.request.urlopen(index.rstrip("/") + "/uv/", timeout=10):
            return True
    except (OSError, ValueError):
        return False


@pytest.mark.docs
@pytest.mark.live
@pytest.mark.slow
def test_the_three_party_example_as_documented(checkout):
    """docs/flower.md's three parties: simulated, then deployed on loopback by the deployment script with every
    SuperNode on its own training and evaluation file; the stream ends with each party's accuracy, and the
    deployed per-client evaluations are the simulated ones."""
    pytest.importorskip("flwr", reason="flwr (the 'flower' extra of fedlora) is not installed")
    env = "OMP_NUM_THREADS=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0 "
    simulated = shell(env + THREE_PARTIES, checkout, timeout=900)
    deployed = shell(env + THREE_PARTIES_DEPLOYED, checkout, timeout=1500)
    for c, examples in enumerate((80, 60, 50)):
        assert re.search(rf"client {c}: accuracy [\d.]+, loss [\d.]+ \({examples} examples\)", simulated.stdout)
        assert re.search(rf"fedlora final evaluation, client {c}: accuracy [\d.]+, loss [\d.]+ \({examples} "
                         r"examples\)", deployed.stdout), deployed.stdout[-3000:]
    assert "clients' mean, weighted by examples: accuracy" in deployed.stdout
    ours, theirs = read_log(checkout / "runs/three-parties"), read_log(checkout / "runs/deploy-three-parties/run")
    assert [r["round"] for r in ours] == [r["round"] for r in theirs] == [0, 1, 2, 3, 4]
    for a, b in zip(ours, theirs):
        assert (a.get("client_eval") is None) == (b.get("client_eval") is None) == (a["round"] % 2 == 1)
        if a.get("client_eval"):
            for c, metrics in a["client_eval"]["clients"].items():
                assert metrics == pytest.approx(b["client_eval"]["clients"][c], abs=1e-4), (a["round"], c)
            assert a["eval"] is None and b["eval"] is None  # the server holds no labelled data
