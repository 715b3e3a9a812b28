"""What users and peers hand a run: checkpoints that must not run code, uploads that must not halt it,
output folders that must not be corrupted."""
import errno
import io
import math
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fedlora import checkpoint, files, run_folder
from fedlora.client import make_optimizer
from fedlora.config import build_config
from fedlora.errors import FedloraError
from fedlora.validation import (adam_step_bound, check_gradient_sums, check_updates, payload_dtype, training_bound,
                                upload_problems)


class _Payload:
    """Unpickling this creates the file `marker`: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _malicious_bytes(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save({"round": 1, "evil": _Payload(marker)}, buffer)
    return buffer.getvalue()


# -- checkpoints ----------------------------------------------------------------------------------

def _adamw_state():
    p = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)
    for i in range(3):
        p.grad = torch.full_like(p, 0.5 - i)
        opt.step()
    return p, opt


def test_checkpoint_round_trip_keeps_types_keys_dtypes_and_values(tmp_path):
    base = torch.randn(5, 5)
    _, opt = _adamw_state()
    state = {"round": 3, "clients": {0: {"B": torch.randn(2, 3).to(torch.bfloat16)}, 7: [1, 2.5, None, "s", True]},
             "half": torch.ones(2, dtype=torch.float16), "ints": torch.arange(4), "mask": torch.tensor([True, False]),
             "bytes": torch.tensor([1, 255], dtype=torch.uint8), "scalar": torch.tensor(2.0), "empty": torch.zeros(0, 3),
             "view": base[1:3], "column": base[:, 1], "same": base, "again": base, "tuple": (1, (2.0, "x")),
             "nan": float("nan"), "inf": -math.inf, "optimizer": opt.state_dict(),
             "__tensor__": {"__items__": 1}, "rng": checkpoint.rng_state()}
    checkpoint.save(state, tmp_path / "c.safetensors")
    back = checkpoint.load(tmp_path / "c.safetensors")

    def same(a, b):
        assert type(a) is type(b), (a, b)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        elif isinstance(a, dict):
            assert list(a) == list(b) and all(type(k) is type(j) for k, j in zip(a, b))
            for k in a:
                same(a[k], b[k])
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                same(x, y)
        elif isinstance(a, float) and math.isnan(a):
            assert math.isnan(b)
        else:
            assert a == b
    same(state, back)
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temporary file left


def test_restored_optimizer_and_generators_continue_bit_identically(tmp_path):
    p, opt = _adamw_state()
    checkpoint.save({"optimizer": opt.state_dict(), "p": p.detach(), "rng": checkpoint.rng_state()},
                    tmp_path / "c.safetensors")
    p.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    grad = p.grad.clone()
    opt.step()
    draws = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    back = checkpoint.load(tmp_path / "c.safetensors")
    q = torch.nn.Parameter(back["p"].clone())
    again = torch.optim.AdamW([q], lr=0.1, weight_decay=0.01)
    again.load_state_dict(back["optimizer"])
    q.grad = grad
    again.step()
    assert torch.equal(p, q)
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    checkpoint.set_rng_state(back["rng"])
    redraws = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(draws[0], redraws[0]) and np.array_equal(draws[1], redraws[1]) and draws[2:] == redraws[2:]


def test_a_planted_pickle_runs_nothing_and_the_error_names_the_file(tmp_path):
    proof = tmp_path / "proof"
    control = tmp_path / "control"
    torch.load(io.BytesIO(_malicious_bytes(control)), weights_only=False)
    assert control.exists()  # the payload does run when unpickled

    for name in ("checkpoint.safetensors", "checkpoint.pt", "state.json"):
        path = tmp_path / name
        path.write_bytes(_malicious_bytes(proof))
        with pytest.raises(FedloraError, match=f"^{path}: not a fedlora checkpoint") as err:
            checkpoint.load(path)
        assert "\n" not in str(err.value)
    assert not proof.exists()


@pytest.mark.parametrize("kind", ["safetensors", "torch", "json", "half", "empty", "missing"])
def test_a_file_of_another_shape_is_one_line_naming_it(tmp_path, kind):
    path = tmp_path / "checkpoint.safetensors"
    if kind == "safetensors":
        save_file({"weight": torch.zeros(2)}, path)  # valid, but not fedlora's
    elif kind == "torch":
        torch.save({"round": 1, "method": {}}, path)
    elif kind == "json":
        path.write_text('{"round": 1}')
    elif kind == "half":
        checkpoint.save({"round": 1, "w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(FedloraError) as err:
        checkpoint.load(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_a_fedlora_file_without_a_runs_keys_is_refused(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    checkpoint.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(FedloraError, match=f"^{path}: not a checkpoint of a fedlora run \\(no round, method\\)"):
        checkpoint.require(checkpoint.load(path), ("round", "method"), path)


# -- uploads --------------------------------------------------------------------------------------

def _start():
    g = torch.Generator().manual_seed(1)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}


def _moved(start, size, seed):
    g = torch.Generator().manual_seed(seed)
    direction = {k: torch.randn(v.shape, generator=g) for k, v in start.items()}
    norm = math.sqrt(sum(d.pow(2).sum().item() for d in direction.values()))
    return {k: v + size / norm * direction[k] for k, v in start.items()}


def test_relative_rule_refuses_what_is_far_above_the_rounds_median():
    start = _start()
    sizes = [1.0, 1.3, 0.8, 9.0, 14.0, 1e30]
    payloads = [_moved(start, s, i) for i, s in enumerate(sizes)]
    payloads.append({"a": start["a"], "b": start["b"].clone().fill_(float("nan"))})
    reasons = upload_problems(payloads, [start] * len(payloads), factor=10.0)
    # the median of the six well-formed norms is (1.3 + 9) / 2 = 5.15: 14 < 51.5 is kept, 1e30 refused
    assert [r is None for r in reasons] == [True, True, True, True, True, False, False]
    assert "exceeds 10 x the round's median 5.15" in reasons[5] and "NaN" in reasons[6]
    # with fewer than 3 well-formed updates there is no median to trust
    assert upload_problems(payloads[4:], [start] * 3, factor=10.0)[1] is None
    # per-example norms: a sum over 100 examples may be 100 times larger
    sums = [_moved(start, s, i) for i, s in enumerate([1.0, 1.0, 1.0, 100.0])]
    assert upload_problems(sums, [start] * 4, factor=10.0, scales=[1, 1, 1, 100]) == [None] * 4
    assert upload_problems(sums, [start] * 4, factor=10.0)[3] is not None


def test_adams_step_bound_is_reached_by_the_worst_gradients():
    """The bound is attained (so it is the least): gradients growing as (b2/b1)^k make Cauchy-Schwarz an
    equality; real AdamW steps on them move a coordinate by lr x the bound at that step."""
    b1, b2, lr = 0.9, 0.999, 1e-3
    for t in (1, 5, 40):
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = torch.optim.AdamW([p], lr=lr, eps=0, weight_decay=0)
        for k in range(1, t + 1):
            before = p.detach().clone()
            p.grad = torch.tensor([(b2 / b1) ** k], dtype=torch.float64)
            opt.step()
        step = (before - p.detach()).abs().item()
        assert step == pytest.approx(lr * adam_step_bound((b1, b2), steps=t), rel=1e-9)
    assert adam_step_bound(steps=1) == pytest.approx(1.0)
    assert 7.2 < adam_step_bound() < 7.3  # AdamW's default betas, ever


@pytest.mark.parametrize("optimizer,extra", [("adamw", {}), ("adamw", {"weight_decay": 0.5}),
                                             ("sgd", {"max_grad_norm": 0.5, "momentum": 0.9})])
def test_no_honest_training_exceeds_the_training_bound(optimizer, extra):
    cfg = build_config({"train": {"optimizer": optimizer, "lr": 0.05, "local_steps": 6, **extra}})
    start = _start()
    bound = training_bound(cfg, start, private=False)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for trial in range(30):
        params = [torch.nn.Parameter(v.clone()) for v in start.values()]
        opt = make_optimizer(params, cfg.train)
        for step in range(cfg.train.local_steps):
            scale = 10.0 ** torch.randint(-8, 30, (1,), generator=g).item()
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * scale * (1.5 ** step if trial % 2 else 1)
            if cfg.train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            opt.step()
        moved = math.sqrt(sum((p.detach() - v).pow(2).sum().item() for p, v in zip(params, start.values())))
        worst = max(worst, moved)
    assert worst <= bound
    assert worst > bound / 20  # not vacuous
    assert training_bound(build_config({"train": {"optimizer": "sgd"}}), start, private=False) is None


def test_setting_selects_the_rule():
    start = _start()
    payloads = [_moved(start, s, i) for i, s in enumerate([0.01, 0.012, 0.011, 50.0])]
    refs = [start] * 4
    auto = check_updates(build_config({}), payloads, refs)
    assert auto[:3] == [None] * 3 and "server.max_update_norm = 'auto'" in auto[3]
    assert check_updates(build_config({"server": {"max_update_norm": "off"}}), payloads, refs) == [None] * 4
    fixed = check_updates(build_config({"server": {"max_update_norm": 0.0115}}), payloads, refs)
    assert [r is None for r in fixed] == [True, False, True, False]
    # two updates: no median, but nothing honest AdamW training can do reaches 50
    two = check_updates(build_config({"train": {"lr": 0.01, "local_steps": 2}}), payloads[2:], refs[2:])
    assert two[0] is None and "the most an honest client can reach" in two[1]


def test_gradient_sums_of_the_set_up_are_checked():
    zeros = {"l0": torch.zeros(4, 3), "l1": torch.zeros(2, 2)}
    g = torch.Generator().manual_seed(0)

    def clipped_sum(n, noise=0.0):  # n examples, each gradient of norm 1 over both layers, plus noise
        grads = [{k: torch.randn(v.shape, generator=g) for k, v in zeros.items()} for _ in range(n)]
        norms = [math.sqrt(sum(x.pow(2).sum().item() for x in e.values())) for e in grads]
        return {k: sum(e[k] / m for e, m in zip(grads, norms)) + noise * torch.randn(v.shape, generator=g)
                for k, v in zeros.items()}

    sums = [clipped_sum(n) for n in (10, 20, 30)]
    sums.append({"l0": torch.full((4, 3), float("nan")), "l1": torch.zeros(2, 2)})
    sums.append({"l0": torch.zeros(5, 3), "l1": torch.zeros(2, 2)})
    sums.append({k: v + 1e6 for k, v in zeros.items()})
    reasons = check_gradient_sums(build_config({}), sums, [zeros] * 6, [10, 20, 30, 10, 10, 10])
    assert reasons[:3] == [None] * 3
    assert "NaN" in reasons[3] and "has shape (5, 3)" in reasons[4] and "per example" in reasons[5]
    private = [clipped_sum(n, noise=1.0) for n in (10, 20, 1)] + [sums[5]]
    reasons = check_gradient_sums(build_config({"privacy": {"noise_multiplier": 1.0}}), private, [zeros] * 4,
                                  [10, 20, 1, 10], noise_multiplier=1.0)
    assert reasons[:3] == [None] * 3 and "the most an honest client can reach" in reasons[3]


@pytest.mark.parametrize("name", ["float32", "bfloat16", "int64", "bool"])
def test_allowed_dtype_names(name):
    assert payload_dtype(name) is getattr(torch, name)


@pytest.mark.parametrize("name", ["Tensor", "__class__", "load", "float32 ", "device", "", None])
def test_other_dtype_names_are_refused(name):
    with pytest.raises(ValueError, match="is not one of float64, float32"):
        payload_dtype(name)


# -- the output folder ----------------------------------------------------------------------------

def test_a_second_holder_of_a_folder_is_refused_naming_it_and_the_pid(tmp_path):
    with run_folder.locked(tmp_path):
        with pytest.raises(FedloraError, match=f"^{tmp_path} is in use by another fedlora run \\(pid {os.getpid()}\\)"):
            with run_folder.locked(tmp_path):
                pass
    with run_folder.locked(tmp_path):  # released at the end of the block
        pass


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(FedloraError, match=f"^{tmp_path / 'out'}: not a folder"):
        run_folder.prepare(tmp_path / "out")


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes were written, after writing what fits."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room["n"]:
            self.f.write(bytes(data)[:self.room["n"]])
            self.f.flush()
            self.room["n"] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room["n"] -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _full_disk(monkeypatch, room: int):
    left = {"n": room}
    monkeypatch.setattr(files, "open", lambda *a, **k: _FullDisk(open(*a, **k), left), raising=False)


def test_a_full_disk_loses_nothing_already_written(tmp_path, monkeypatch):
    log, target = tmp_path / "rounds.jsonl", tmp_path / "checkpoint.safetensors"
    run_folder.append_line(log, {"round": 0})
    checkpoint.save({"round": 0, "w": torch.ones(3)}, target)
    before_log, before_ckpt = log.read_bytes(), target.read_bytes()
    _full_disk(monkeypatch, 5)
    with pytest.raises(FedloraError, match=f"^{log}: cannot write \\(No space left on device\\)"):
        run_folder.append_line(log, {"round": 1, "clients": [0, 1, 2]})
    with pytest.raises(FedloraError, match=f"^{target}: cannot write \\(No space left on device\\)"):
        checkpoint.save({"round": 1, "w": torch.zeros(100)}, target)
    monkeypatch.undo()
    assert log.read_bytes() == before_log and target.read_bytes() == before_ckpt
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.safetensors", "rounds.jsonl"]


def make_folders_read_only(monkeypatch):
    """Every os.open that would write fails as on a read-only file system."""
    real = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)


def test_a_read_only_folder_is_one_line_naming_the_path(tmp_path, monkeypatch):
    make_folders_read_only(monkeypatch)
    with pytest.raises(FedloraError, match=f"^{tmp_path / '.lock'}: cannot write \\(Read-only file system\\)"):
        with run_folder.locked(tmp_path):
            pass


def test_a_torn_last_line_is_left_out_and_other_bad_lines_are_refused(tmp_path):
    log = tmp_path / "rounds.jsonl"
    log.write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "cli')
    assert run_folder.read_log(log) == [{"round": 0}, {"round": 1}]
    run_folder.repair_log(log, 1, {"round": 1, "from": "checkpoint"})
    assert log.read_text() == '{"round": 0}\n{"round": 1, "from": "checkpoint"}\n'
    log.write_text('{"round": 0}\nnot json\n{"round": 1}\n')
    with pytest.raises(FedloraError, match=f"^{log}, line 2: not a row of a fedlora log"):
        run_folder.read_log(log)


# -- whole runs -----------------------------------------------------------------------------------

from conftest import read_log, without_seconds  # noqa: E402

from fedlora.config import ConfigError  # noqa: E402
from fedlora.simulator import Simulator  # noqa: E402


def _same_state(a, b):
    sa, sb = a.method.eval_state(), b.method.eval_state()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _hostile_updates(sim, monkeypatch, client, hostile):
    real = sim.trainer.update

    def update(c, r, start, deadline=None, privacy=None, clip=None):
        u = real(c, r, start, deadline, privacy, clip)
        if c == client and u is not None:
            u.payload = hostile(dict(u.payload)) if hostile else None
            if u.payload is None:
                return None
        return u
    monkeypatch.setattr(sim.trainer, "update", update)


def _huge(payload):
    return {k: torch.full_like(v, 3e38) for k, v in payload.items()}


@pytest.mark.parametrize("hostile", [_huge, lambda p: {k: v + 1e3 for k, v in p.items()}])
def test_one_hostile_client_every_round_cannot_halt_a_run_with_the_defaults(sim_config, tmp_path, monkeypatch,
                                                                            hostile):
    cfg = sim_config(method={"name": "fedit"}, federation={"num_clients": 4, "clients_per_round": 4, "rounds": 3,
                                                            "parallel_clients": 1})
    assert cfg.server.max_update_norm == "auto"
    attacked = Simulator(cfg, tmp_path / "attacked", progress=False)
    _hostile_updates(attacked, monkeypatch, 2, hostile)
    summary = attacked.run()
    honest = Simulator(cfg, tmp_path / "honest", progress=False)
    _hostile_updates(honest, monkeypatch, 2, None)  # client 2 sends nothing at all
    honest.run()
    assert _same_state(attacked, honest)
    log = read_log(tmp_path / "attacked")
    assert all(r["clients"] == [0, 1, 3] and r["dropped"][0]["client"] == 2
               and "server.max_update_norm = 'auto'" in r["dropped"][0]["reason"] for r in log[1:])
    assert all(math.isfinite(v) for v in summary["final_eval"].values())


def test_switched_off_the_size_check_lets_the_hostile_update_through(sim_config, tmp_path, monkeypatch):
    cfg = sim_config(method={"name": "fedit"}, federation={"num_clients": 4, "clients_per_round": 4, "rounds": 1,
                                                            "parallel_clients": 1}, server={"max_update_norm": "off"})
    sim = Simulator(cfg, tmp_path, progress=False)
    _hostile_updates(sim, monkeypatch, 2, lambda p: {k: v + 1e3 for k, v in p.items()})
    sim.run()
    assert read_log(tmp_path)[1]["clients"] == [0, 1, 2, 3]


def _hostile_set_up(sim, monkeypatch, client, hostile):
    real = sim.trainer.set_up_reply

    def reply(c, request, privacy=None):
        out = real(c, request, privacy)
        return hostile(dict(out)) if c == client and hostile else out if c != client else None
    monkeypatch.setattr(sim.trainer, "set_up_reply", reply)


def _nan_sum(p):
    k = next(iter(p))
    return p | {k: torch.full_like(p[k], float("nan"))}


def _wrong_shape(p):
    k = next(iter(p))
    return p | {k: torch.zeros(p[k].shape[0] + 1, p[k].shape[1])}


@pytest.mark.parametrize("hostile,reason", [(_nan_sum, "NaN or infinite"), (_wrong_shape, "has shape"),
                                            (lambda p: {k: v * 1e6 for k, v in p.items()}, "per example")])
def test_a_hostile_set_up_upload_is_dropped_and_the_rest_make_the_set_up(sim_config, tmp_path, monkeypatch,
                                                                         hostile, reason):
    cfg = sim_config(method={"name": "fedsb"}, fedsb={"init": "dense"}, federation={
        "num_clients": 4, "clients_per_round": 4, "rounds": 1, "parallel_clients": 1})
    attacked = Simulator(cfg, tmp_path / "attacked", progress=False)
    _hostile_set_up(attacked, monkeypatch, 1, hostile)
    attacked.run()
    without = Simulator(cfg, tmp_path / "without", progress=False)
    _hostile_set_up(without, monkeypatch, 1, None)  # client 1 sends nothing in the set-up
    without.run()
    assert _same_state(attacked, without)
    record = read_log(tmp_path / "attacked")[0]
    assert 1 not in record["clients"] and record["dropped"][0]["client"] == 1
    assert reason in record["dropped"][0]["reason"]


# -- checkpoints and folders in whole runs ---------------------------------------------------------

class Killed(BaseException):
    """A crash: a BaseException, so that no `except Exception` of the code under test catches it."""


def _kill_at_checkpoint(sim, monkeypatch, r_kill):
    real = sim.server.save_checkpoint

    def save(r, runtime_state=None):
        if r == r_kill:
            raise Killed
        real(r, runtime_state)
    monkeypatch.setattr(sim.server, "save_checkpoint", save)


def test_a_planted_pickle_checkpoint_is_never_loaded(sim_config, tmp_path):
    proof = tmp_path / "proof"
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(_malicious_bytes(proof))
    cfg = sim_config(federation={"rounds": 1})
    with pytest.raises(FedloraError, match=f"^{out / 'checkpoint.pt'}: a checkpoint of an older fedlora"):
        Simulator(cfg, out, progress=False).run(resume=True)
    with pytest.raises(FedloraError, match=f"^{out} already holds a run \\(checkpoint.pt\\)"):
        Simulator(cfg, out, progress=False).run()
    (out / "checkpoint.safetensors").write_bytes(_malicious_bytes(proof))
    with pytest.raises(FedloraError, match=f"^{out / 'checkpoint.safetensors'}: not a fedlora checkpoint"):
        Simulator(cfg, out, progress=False).run(resume=True)
    save_file({"weight": torch.zeros(2)}, out / "checkpoint.safetensors")
    with pytest.raises(FedloraError, match=f"^{out / 'checkpoint.safetensors'}: not a fedlora checkpoint"):
        Simulator(cfg, out, progress=False).run(resume=True)
    checkpoint.save({"round": 1, "config": {}}, out / "checkpoint.safetensors")
    with pytest.raises(FedloraError, match="not a checkpoint of a fedlora run \\(no method, base_weights"):
        Simulator(cfg, out, progress=False).run(resume=True)
    assert not proof.exists()


def test_a_second_run_into_a_held_folder_is_refused_with_the_holders_pid(sim_config, tmp_path):
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()}\\n'.encode()); print('held', flush=True); "
        "time.sleep(60)"), str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FedloraError, match=f"^{tmp_path} is in use by another fedlora run \\(pid {holder.pid}\\)"):
            Simulator(sim_config(federation={"rounds": 1}), tmp_path, progress=False).run()
        assert not (tmp_path / "rounds.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    Simulator(sim_config(federation={"rounds": 1}), tmp_path, progress=False).run()  # free again


def test_killed_after_round_0_was_logged_but_before_its_checkpoint_resume_starts_cleanly(sim_config, tmp_path,
                                                                                        monkeypatch):
    cfg = sim_config(method={"name": "fedsb"}, federation={"rounds": 2})
    whole = Simulator(cfg, tmp_path / "whole", progress=False)
    whole.run()
    cut = Simulator(cfg, tmp_path / "cut", progress=False)
    _kill_at_checkpoint(cut, monkeypatch, 0)
    with pytest.raises(Killed):
        cut.run()
    assert [r["round"] for r in read_log(tmp_path / "cut")] == [0]
    resumed = Simulator(cfg, tmp_path / "cut", progress=False)
    resumed.run(resume=True)
    assert _same_state(resumed, whole)
    assert without_seconds(read_log(tmp_path / "cut")) == without_seconds(read_log(tmp_path / "whole"))


def test_fewer_rounds_than_finished_are_refused_with_the_numbers(sim_config, tmp_path):
    Simulator(sim_config(federation={"rounds": 3}), tmp_path, progress=False).run()
    with pytest.raises(ConfigError, match="federation.rounds = 2 is below the 3 rounds .*checkpoint.safetensors "
                                          "has finished: resume with federation.rounds >= 3"):
        Simulator(sim_config(federation={"rounds": 2}), tmp_path, progress=False).run(resume=True)


@pytest.mark.parametrize("torn_round", [2, 3])
def test_a_torn_last_log_line_is_repaired_from_the_checkpoint(sim_config, tmp_path, monkeypatch, torn_round):
    """Killed while appending round 3's row (checkpoint of round 2), or after round 3's checkpoint with its
    row torn (a crash of the machine before the row reached the disk)."""
    cfg = sim_config(federation={"rounds": 4})
    whole = Simulator(cfg, tmp_path / "whole", progress=False)
    whole.run()
    cut = Simulator(cfg, tmp_path / "cut", progress=False)
    _kill_at_checkpoint(cut, monkeypatch, torn_round + 1)
    with pytest.raises(Killed):
        cut.run()
    log = tmp_path / "cut" / "rounds.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    if torn_round == 2:  # round 3's row was being written
        log.write_bytes(b"".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
    else:
        lines = lines[:-1]  # round 4's row is logged before its checkpoint: gone with the crash
        log.write_bytes(b"".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
    with pytest.raises(ValueError):
        [__import__("json").loads(line) for line in log.read_text().splitlines()]  # torn indeed
    resumed = Simulator(cfg, tmp_path / "cut", progress=False)
    resumed.run(resume=True)
    assert _same_state(resumed, whole)
    assert without_seconds(read_log(tmp_path / "cut")) == without_seconds(read_log(tmp_path / "whole"))


@pytest.mark.parametrize("target", ["rounds.jsonl", "checkpoint.safetensors", "summary.json"])
def test_a_full_disk_is_one_line_naming_the_file_and_loses_nothing(sim_config, tmp_path, monkeypatch, target):
    cfg = sim_config(federation={"rounds": 2})
    whole = Simulator(cfg, tmp_path / "whole", progress=False)
    whole.run()
    out = tmp_path / "cut"
    cut = Simulator(cfg, out, progress=False)
    real_open = open
    kept = {}

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        name = os.path.basename(str(path)).removesuffix(".tmp")
        if name == target and "r" not in mode and len(read_log(out)) == 2 + (target == "summary.json"):
            kept.update({p: p.read_bytes() for p in out.iterdir()
                         if p.is_file() and p.name != ".lock" and p.suffix != ".tmp"})
            return _FullDisk(f, {"n": 7})
        return f
    monkeypatch.setattr(files, "open", full_open, raising=False)
    with pytest.raises(FedloraError) as err:
        cut.run()
    assert str(err.value).startswith(f"{out / target}: cannot write (No space left on device)")
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    assert kept and {p: p.read_bytes() for p in kept} == kept  # nothing already written was lost
    assert not list(out.glob("*.tmp"))
    Simulator(cfg, out, progress=False).run(resume=True)  # space again: the run continues
    assert without_seconds(read_log(out)) == without_seconds(read_log(tmp_path / "whole"))


def test_a_read_only_folder_and_foreign_files_are_one_line_naming_the_path(sim_config, tmp_path, monkeypatch):
    cfg = sim_config(federation={"rounds": 1})
    make_folders_read_only(monkeypatch)
    with pytest.raises(FedloraError, match=f"^{tmp_path / '.lock'}: cannot write \\(Read-only file system\\)"):
        Simulator(cfg, tmp_path, progress=False).run()
    monkeypatch.undo()

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FedloraError, match=f"^{tmp_path / 'a_file'}: not a folder"):
        Simulator(cfg, tmp_path / "a_file", progress=False).run()
    out = tmp_path / "run"
    Simulator(cfg, out, progress=False).run()
    log = out / "rounds.jsonl"
    log.write_text("a line of something else\n" + log.read_text())
    with pytest.raises(FedloraError, match=f"^{log}, line 1: not a row of a fedlora log"):
        Simulator(cfg, out, progress=False).run(resume=True)
    (out / "checkpoint.safetensors").unlink()
    (out / "checkpoint.safetensors").mkdir()
    with pytest.raises(FedloraError, match=f"^{out / 'checkpoint.safetensors'}: cannot read the checkpoint"):
        Simulator(cfg, out, progress=False).run(resume=True)
    (out / "checkpoint.safetensors").rmdir()
    log.write_text('{"round": 0}\n{"round": 1}\n')
    with pytest.raises(FedloraError, match=f"^{log} logs rounds up to 1, but there is no checkpoint.safetensors"):
        Simulator(cfg, out, progress=False).run(resume=True)
    assert log.read_text() == '{"round": 0}\n{"round": 1}\n'


@pytest.mark.parametrize("name", ["Tensor", "__class__", "load", "no_such_dtype"])
def test_a_peers_dtype_name_outside_the_allow_list_is_refused(name):
    pytest.importorskip("flwr")
    from flwr.app import Array, ArrayRecord

    from fedlora.flower.records import from_record, to_record

    record = ArrayRecord()
    record["x"] = Array(dtype=name, shape=(2,), stype="torch.raw", data=b"12345678")
    with pytest.raises(ValueError, match=f"dtype '{name}' is not one of float64, float32"):
        from_record(record)
    short = to_record({"x": torch.zeros(3)})
    short["x"] = Array(dtype="float32", shape=(3,), stype="torch.raw", data=b"1234")
    with pytest.raises(ValueError, match="'x' has 4 bytes, not those of shape \\(3,\\) in float32"):
        from_record(short)
    assert torch.equal(from_record(to_record({"y": torch.arange(3)}))["y"], torch.arange(3))
