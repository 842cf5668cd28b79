"""A run ends on the right model: the run directory's lock, the final epoch's write order,
resume refusing a changed run, --extend, options checked before work, non-finite losses, a
full disk while checkpointing, and a SIGKILL of a real training process."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import run_cli, small_run, synthetic_image

from kdcache.cli.shards import ShardWriter
from kdcache.errors import KdcacheError
from kdcache.lock import lock_path, output_lock
from kdcache.runtime import resolve_device
from kdcache.train import fit, trainer

pytestmark = pytest.mark.faults

STUDENT = "kdcache:tiny_cnn"


cfg = small_run  # the shared two-epoch hard-label run (conftest)


def lines(out, name: str) -> list[dict]:
    path = os.path.join(str(out), name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load(out, name: str):
    return torch.load(os.path.join(str(out), name), map_location="cpu", weights_only=False)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def temp_files(out) -> list[str]:
    return [n for n in os.listdir(str(out)) if ".tmp" in n]


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def straight(tmp_path_factory, train_dir, val_dir, one_torch_thread) -> str:
    """An uninterrupted 2-epoch hard-label run."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    fit(cfg(train_dir, val_dir, out))
    return out


# -- the lock ----------------------------------------------------------------------------------


def test_lock_is_taken_released_and_says_who_holds_it(tmp_path):
    out = str(tmp_path / "run")
    with output_lock(out, "run directory") as lock:
        assert lock == out + ".lock" == lock_path(out + "/")
        with open(lock) as f:
            holder = json.load(f)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert {"started", "command"} <= holder.keys()
        with pytest.raises(KdcacheError) as e, output_lock(out, "run directory"):
            pass
        message = str(e.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert holder["started"] in message and f"remove {lock}" in message
        assert os.path.exists(lock)  # a refused job leaves the holder's lock alone
    assert not os.path.exists(lock)
    for stop in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(stop), output_lock(out, "cache"):
            raise stop()
        assert not os.path.exists(lock)


def test_stale_and_foreign_locks(tmp_path, caplog):
    out = str(tmp_path / "cache.zarr")
    lock = lock_path(out)
    stale = {"host": socket.gethostname(), "pid": dead_pid(), "started": "then", "command": "x"}
    with open(lock, "w") as f:
        json.dump(stale, f)
    with caplog.at_level(logging.WARNING, logger="kdcache"), output_lock(out, "cache"):
        assert lines(tmp_path, os.path.basename(lock))[0]["pid"] == os.getpid()
    assert "stale" in caplog.text and not os.path.exists(lock)
    foreign = {"host": "elsewhere", "pid": stale["pid"], "started": "2024-01-01", "command": "y"}
    with open(lock, "w") as f:
        json.dump(foreign, f)
    refused = pytest.raises(KdcacheError, match="on host elsewhere, started 2024-01-01.*remove")
    with refused, output_lock(out, "cache"):
        pass
    os.unlink(lock)
    with open(lock, "w") as f:  # torn: created, killed before it was written
        f.write('{"host": ')
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with output_lock(out, "cache"):
        pass
    assert not os.path.exists(lock)


def test_urls_and_other_ranks_are_not_locked(tmp_path):
    with output_lock("s3://bucket/cache.zarr", "cache") as lock:
        assert lock is None
    with output_lock(str(tmp_path / "run"), "run directory", enabled=False) as lock:
        assert lock is None
    assert os.listdir(tmp_path) == []


def test_a_second_training_on_one_out_is_refused(tmp_path, train_dir, val_dir, one_torch_thread):
    out = str(tmp_path / "run")
    fit(cfg(train_dir, val_dir, out, epochs=1))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"host": socket.gethostname(), "pid": holder.pid, "started": "now", "command": ""}
        with open(lock_path(out), "w") as f:
            json.dump(record, f)
        code, _, err = run_cli(*_argv(train_dir, val_dir, out, epochs=1), "--resume")
    finally:
        holder.kill()
        holder.wait()
    assert code == 2, err
    assert f"pid {holder.pid}" in err and "in use by another kdcache job" in err
    assert len(err.strip().splitlines()) == 1


# -- the final epoch's writes ----------------------------------------------------------------

# (file, when): die before the write, half way through it (a temp file left), or after it.
KILL_POINTS = [
    ("model.pt", "before"),  # metrics.jsonl and steps.jsonl appended already
    ("model.pt", "during"),
    ("model.pt", "after"),
    ("checkpoint.pt", "during"),
    ("checkpoint.pt", "after"),
]


def _kill_at(monkeypatch, name: str, when: str, nth: int) -> None:
    real = trainer._save_atomic
    seen = {"n": 0}

    def save(obj, path):
        if os.path.basename(path) == name:
            seen["n"] += 1
            if seen["n"] == nth:
                if when == "before":
                    raise _Killed
                if when == "during":
                    with open(f"{path}.tmp{dead_pid()}", "wb") as f:
                        f.write(b"PK\x03\x04 half a file")
                    raise _Killed
                real(obj, path)
                raise _Killed
        real(obj, path)

    monkeypatch.setattr(trainer, "_save_atomic", save)


@pytest.mark.parametrize("name,when", KILL_POINTS, ids=[f"{n}:{w}" for n, w in KILL_POINTS])
def test_a_kill_at_each_write_of_the_final_epoch(
    tmp_path, train_dir, val_dir, straight, monkeypatch, name, when
):
    out = tmp_path / "run"
    _kill_at(monkeypatch, name, when, nth=2)  # epoch 2 of 2
    with pytest.raises(_Killed):
        fit(cfg(train_dir, val_dir, out))
    monkeypatch.undo()
    assert os.path.exists(lock_path(str(out))) is False  # released on the way out
    fit(cfg(train_dir, val_dir, out, resume=True))
    checkpoint = load(out, "checkpoint.pt")
    assert checkpoint["epoch"] == 2
    assert same_weights(load(out, "model.pt"), checkpoint["model"])
    assert same_weights(load(out, "model.pt"), load(straight, "model.pt"))
    assert [m["epoch"] for m in lines(out, "metrics.jsonl")] == [1, 2]
    assert lines(out, "steps.jsonl") == lines(straight, "steps.jsonl")
    assert temp_files(out) == []


@pytest.mark.parametrize("resume", [True, False])
def test_a_restart_from_scratch_trims_the_logs(
    tmp_path, train_dir, val_dir, straight, monkeypatch, resume
):
    out = tmp_path / "run"
    _kill_at(monkeypatch, "checkpoint.pt", "during", nth=1)  # epoch 1: no checkpoint yet
    with pytest.raises(_Killed):
        fit(cfg(train_dir, val_dir, out))
    monkeypatch.undo()
    assert [m["epoch"] for m in lines(out, "metrics.jsonl")] == [1]
    fit(cfg(train_dir, val_dir, out, resume=resume))
    assert [m["epoch"] for m in lines(out, "metrics.jsonl")] == [1, 2]
    assert lines(out, "steps.jsonl") == lines(straight, "steps.jsonl")
    assert same_weights(load(out, "model.pt"), load(straight, "model.pt"))
    assert temp_files(out) == []


def test_nothing_to_do_still_ends_on_the_checkpoints_model(tmp_path, train_dir, val_dir, straight):
    out = tmp_path / "run"
    fit(cfg(train_dir, val_dir, out))
    model = os.path.join(out, "model.pt")
    torch.save({"stale": torch.zeros(1)}, model)  # as a pre-fix kill could leave it
    fit(cfg(train_dir, val_dir, out, resume=True))
    assert same_weights(load(out, "model.pt"), load(out, "checkpoint.pt")["model"])


# -- resume with other options ---------------------------------------------------------------


def _argv(train_dir, val_dir, out, **kw) -> list[str]:
    opts = {
        "epochs": 2,
        "batch-size": 8,
        "seed": 3,
        **{k.replace("_", "-"): v for k, v in kw.items()},
    }
    argv = ["train", "--data", train_dir, "--val", val_dir, "--student", STUDENT, "--out", out,
            "--teacher-mode", "none", "--image-size", "16", "--workers", "0", "--device", "cpu",
            "-q"]  # fmt: skip
    for key, value in opts.items():
        argv += [f"--{key}", str(value)]
    return argv


def test_resume_refuses_a_changed_run_and_keeps_its_config(
    tmp_path, train_dir, val_dir, one_torch_thread
):
    out = tmp_path / "run"
    fit(cfg(train_dir, val_dir, out, epochs=1))
    with open(os.path.join(out, "config.json"), "rb") as f:
        config = f.read()
    with pytest.raises(KdcacheError) as e:
        fit(cfg(train_dir, val_dir, out, epochs=1, resume=True, batch_size=4, seed=4, lr=2e-3))
    message = str(e.value)
    for part in ("--batch-size 4 (the run has 8)", "--seed 4 (the run has 3)",
                 "--lr 0.002 (the run has 0.001)"):  # fmt: skip
        assert part in message, message
    code, _, err = run_cli(*_argv(train_dir, val_dir, str(out), epochs=1, student_mean="0.5"),
                           "--resume")  # fmt: skip
    assert code == 2 and "--student-mean 0.5,0.5,0.5 (the run has unset)" in err, err
    # What may change: workers, device, checkpoint_every, strict, command.
    fit(cfg(train_dir, val_dir, out, epochs=1, resume=True, checkpoint_every=1, strict=True,
            device="auto", command="another"))  # fmt: skip
    with open(os.path.join(out, "config.json"), "rb") as f:
        assert f.read() == config  # never rewritten on resume
    with pytest.raises(KdcacheError, match=r"--epochs 2 \(the run has 1: pass --extend"):
        fit(cfg(train_dir, val_dir, out, epochs=2, resume=True))
    assert [m["epoch"] for m in lines(out, "metrics.jsonl")] == [1]


def test_extend_recomputes_the_schedule_from_the_current_step(
    tmp_path, train_dir, val_dir, monkeypatch, caplog, one_torch_thread
):
    lrs: list[float] = []
    real = torch.optim.AdamW.step

    def step(self, *a, **kw):
        lrs.append(self.param_groups[0]["lr"])
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out, reference = tmp_path / "run", tmp_path / "reference"
    fit(cfg(train_dir, val_dir, reference, epochs=2, warmup=0.0))
    straight_lrs = list(lrs)
    steps = len(straight_lrs) // 2
    fit(cfg(train_dir, val_dir, out, epochs=1, warmup=0.0))
    del lrs[:]
    with caplog.at_level(logging.INFO, logger="kdcache"):
        fit(cfg(train_dir, val_dir, out, epochs=2, warmup=0.0, resume=True, extend=True))
    # Epoch 2 runs on the 2-epoch curve from step `steps` on, as a 2-epoch run does.
    assert lrs == pytest.approx(straight_lrs[steps:], rel=1e-12)
    assert lrs[0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert "--extend: 1 -> 2 epochs" in caplog.text
    assert [m["epoch"] for m in lines(out, "metrics.jsonl")] == [1, 2]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["epochs"] == 1  # the original config
    # Resumed again with the extended length: accepted (the checkpoint records it).
    fit(cfg(train_dir, val_dir, out, epochs=2, warmup=0.0, resume=True))


def test_extend_during_warmup_equals_a_straight_run(tmp_path, train_dir, val_dir, straight):
    out = tmp_path / "run"
    fit(cfg(train_dir, val_dir, out, epochs=1))  # warm-up: the whole first epoch
    fit(cfg(train_dir, val_dir, out, epochs=2, resume=True, extend=True))
    assert lines(out, "steps.jsonl") == lines(straight, "steps.jsonl")
    assert same_weights(load(out, "model.pt"), load(straight, "model.pt"))


# -- options checked before any work ---------------------------------------------------------


@pytest.mark.parametrize(
    "option,value,needle",
    [
        ("lr", math.nan, "--lr must be a finite number"),
        ("lr", math.inf, "--lr must be a finite number"),
        ("lr", -1.0, "--lr must be positive"),
        ("lr", 0.0, "--lr must be positive"),
        ("weight_decay", math.nan, "--weight-decay must be a finite"),
        ("warmup", math.inf, "--warmup must be a finite"),
        ("clip_grad", -1.0, "--clip-grad must be at least 0"),
        ("temperature", math.nan, "--temperature must be a finite"),
        ("seed", -1, "--seed must be at least 0"),
        ("plan_seed", -1, "--plan-seed must be at least 0"),
        ("device", "bogus", "--device must be auto, cpu, cuda, cuda:N or mps, got 'bogus'"),
        ("device", "cuda:x", "--device must be"),
    ],
)
def test_options_are_checked_before_work(tmp_path, train_dir, val_dir, option, value, needle):
    out = tmp_path / "run"
    with pytest.raises(KdcacheError, match=needle.replace("(", r"\(")):
        fit(cfg(train_dir, val_dir, out, **{option: value}))
    assert not os.path.exists(out)


def test_options_through_the_cli_are_one_line(tmp_path, train_dir, val_dir):
    for option, value in (("lr", "nan"), ("lr", "-1"), ("seed", "-1"), ("device", "bogus"),
                          ("image-size", "0"), ("image-size", "1")):  # fmt: skip
        code, _, err = run_cli(*_argv(train_dir, val_dir, str(tmp_path / "r"), **{option: value}))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "internal" not in err, err


def test_resolve_device_says_what_is_wrong():
    with pytest.raises(KdcacheError, match="got 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(KdcacheError, match="no CUDA device"):
            resolve_device("cuda:3")
    else:
        with pytest.raises(KdcacheError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert resolve_device("cpu") == torch.device("cpu")


# -- a non-finite loss, a full disk ----------------------------------------------------------


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, train_dir, val_dir, monkeypatch, checkpoint_every, one_torch_thread
):
    real = trainer._loss
    calls = {"n": 0}

    def loss(*a):
        calls["n"] += 1
        value = real(*a)
        return value * math.nan if calls["n"] == 5 else value  # epoch 2, step 2 of 3

    monkeypatch.setattr(trainer, "_loss", loss)
    out = tmp_path / "run"
    with pytest.raises(KdcacheError, match="a loss of nan at epoch 2, step 2; nothing was saved"):
        fit(cfg(train_dir, val_dir, out, checkpoint_every=checkpoint_every))
    checkpoint = load(out, "checkpoint.pt")
    assert checkpoint["position"]["epoch"] == 1
    assert checkpoint["position"]["step"] == (1 if checkpoint_every else 0)
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert [m["epoch"] for m in lines(out, "metrics.jsonl")] == [1]
    assert all(math.isfinite(s["loss"]) for s in lines(out, "steps.jsonl"))
    assert temp_files(out) == []


@pytest.mark.parametrize("error", ["ENOSPC", "zip writer"])
def test_a_full_disk_while_checkpointing(
    tmp_path, train_dir, val_dir, straight, monkeypatch, error
):
    real = torch.save
    calls = {"n": 0}

    def save(obj, path, *a, **kw):
        if ".tmp" in str(path) and os.path.basename(str(path)).startswith("checkpoint.pt"):
            calls["n"] += 1
            if calls["n"] == 2:  # epoch 2's checkpoint
                with open(path, "wb") as f:
                    f.write(b"PK\x03\x04 a part")
                if error == "ENOSPC":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed "
                    "writing file data/3: file write failed"
                )
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    reason = "No space left on device" if error == "ENOSPC" else "file write failed"
    with pytest.raises(KdcacheError, match=f"cannot write .*checkpoint.pt: .*{reason}"):
        fit(cfg(train_dir, val_dir, out))
    assert temp_files(out) == []
    assert load(out, "checkpoint.pt")["epoch"] == 1  # the previous checkpoint, intact
    monkeypatch.undo()
    fit(cfg(train_dir, val_dir, out, resume=True))
    assert same_weights(load(out, "model.pt"), load(straight, "model.pt"))


# -- hard labels: the class count ------------------------------------------------------------


def _labelled(tmp_path, labels: list[int]) -> str:
    out = tmp_path / "stray"
    rng = np.random.default_rng(0)
    writer = ShardWriter(str(out), "train", 16)
    try:
        for n, label in enumerate(labels):
            writer.write(f"s-{n:03d}", synthetic_image(rng, label % 10, (20, 20)), "png", label)
    finally:
        writer.close()
    return str(out)


@pytest.mark.parametrize("stray", [99999, 40])
def test_a_stray_label_does_not_make_a_huge_student(tmp_path, stray, one_torch_thread):
    data = _labelled(tmp_path, [n % 5 for n in range(11)] + [stray])
    with pytest.raises(KdcacheError) as e:
        fit(cfg(data, data, tmp_path / "run", epochs=1))
    message = str(e.value)
    assert f"largest label is {stray}" in message and "only 6 distinct labels" in message
    assert f"--num-classes {stray + 1}" in message
    if stray == 40:  # said so: trained
        fit(cfg(data, data, tmp_path / "run", epochs=1, num_classes=41))
        weights = load(tmp_path / "run", "model.pt")
        assert list(weights.values())[-1].shape[0] == 41  # the head's bias


# -- a real SIGKILL ---------------------------------------------------------------------------


def test_sigkill_of_a_training_process_then_resume(tmp_path, train_dir, val_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = lambda out: [  # noqa: E731
        sys.executable, "-m", "kdcache",
        *_argv(train_dir, val_dir, str(out), epochs=3, batch_size=2, checkpoint_every=1),
    ]  # fmt: skip
    out, reference = tmp_path / "killed", tmp_path / "reference"
    job = subprocess.Popen(argv(out), env=env, stderr=subprocess.PIPE)
    ckpt = os.path.join(out, "checkpoint.pt")
    deadline = time.monotonic() + 60
    while not os.path.exists(ckpt) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert job.poll() is None, job.stderr.read().decode()
    # While it runs, a second job on the same --out is refused, naming the holder.
    job.send_signal(signal.SIGSTOP)
    code, _, err = run_cli(*argv(out)[3:], "--resume")
    assert code == 2 and f"pid {job.pid}" in err, err
    job.send_signal(signal.SIGKILL)
    job.wait()
    job.stderr.close()
    assert job.returncode == -signal.SIGKILL
    assert os.path.exists(lock_path(str(out)))  # left behind by the kill: stale now
    done = subprocess.run([*argv(out), "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    straight = subprocess.run(argv(reference), env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    assert [m["epoch"] for m in lines(out, "metrics.jsonl")] == [1, 2, 3]
    assert lines(out, "steps.jsonl") == lines(reference, "steps.jsonl")
    assert same_weights(load(out, "model.pt"), load(reference, "model.pt"))
    assert not os.path.exists(lock_path(str(out))) and temp_files(out) == []
