"""The training loop as a library: exact resume, metrics.h5, checkpoints, bad input, divergence."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eigensam.config import ADDED_FIELDS
from eigensam.determinism import restore_rng
from eigensam.refresh import DEFAULT_MAX_HVPS
from eigensam.refresh import DEFAULT_TOL as REFRESH_TOL
from eigensam.tracking import TRACK_TOL, Measurement
from eigensam.training import (
    EpochDone,
    RunStarted,
    StepDone,
    TrainConfig,
    latest_checkpoint,
    train,
)
from eigensam.training import load_config as load_saved_config
from hessian_cli.engine.distributed import PeerLost
from hessian_cli.errors import Terminated, UserError
from hessian_cli.specs import build_model, load_checkpoint
from hessian_cli.storage import read_metrics
from hessian_cli.storage.metrics import COLUMNS

# 96 samples in batches of 16: 6 steps per epoch, 18 in 3 epochs.
DATA = "synthetic:16:3:96"
STEPS_PER_EPOCH = 6
BN_CNN = {
    "model": "cnn",
    "data": "synthetic:1x6x6:3:64",
    "model_kwargs": {"widths": [4], "batchnorm": True},
}


def config(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    base = dict(
        model="mlp",
        model_kwargs={"hidden": [8]},
        data=DATA,
        batch_size=16,
        epochs=3,
        eig_every=4,
        track_every=5,
        out=str(tmp_path / name),
        device="cpu",  # runs compared bit for bit: cuDNN's kernels need not repeat theirs
    )
    base.update(overrides)
    return TrainConfig(**base)


def load_config(run_dir: Path) -> TrainConfig:
    """A run's saved configuration, on the CPU as :func:`config` pins it: the device is a
    run-time field, not saved, so a resume would take `auto` (CUDA where there is a GPU) and be
    compared bit for bit with a run made on the CPU."""
    return dataclasses.replace(load_saved_config(run_dir), device="cpu")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def assert_same_metrics(a: Path, b: Path) -> None:
    """Identical rows, except the wall-clock seconds of each epoch."""
    ma, mb = read_metrics(a / "metrics.h5"), read_metrics(b / "metrics.h5")
    assert ma.keys() == mb.keys()
    for group, columns in ma.items():
        for name, values in columns.items():
            if name != "seconds":
                assert np.array_equal(values, mb[group][name], equal_nan=True), (group, name)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(BN_CNN | {"optimizer": "eigensam"}, id="eigensam-bn-cnn"),
        pytest.param({"optimizer": "sgd", "base_optimizer": "adamw"}, id="adamw"),
    ],
)
def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path, overrides):
    whole = train(config(tmp_path, "whole", **overrides))
    first = train(config(tmp_path, "split", max_steps=8, **overrides))
    assert not first.finished and first.step == 8 and first.checkpoint.name == "step0000008.pt"
    resumed = train(load_config(tmp_path / "split"), resume_dir=tmp_path / "split")
    assert resumed.finished and resumed.step == whole.step and resumed.steps_run == whole.step - 8
    assert_same_weights(whole.checkpoint, resumed.checkpoint)
    assert_same_metrics(tmp_path / "whole", tmp_path / "split")
    opt_a = load_checkpoint(whole.checkpoint).raw["optimizer"]
    opt_b = load_checkpoint(resumed.checkpoint).raw["optimizer"]
    assert opt_a.get("eigensam") == opt_b.get("eigensam")


def test_should_stop_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    whole = train(config(tmp_path, "whole"))
    polls = iter(range(100))
    events: list = []
    stopped = train(
        config(tmp_path, "stopped"),
        progress=events.append,
        should_stop=lambda: next(polls) == 11,  # asked before step 11: mid-epoch 2
    )
    assert stopped.interrupted and not stopped.finished and stopped.step == 11
    assert latest_checkpoint(tmp_path / "stopped") == stopped.checkpoint
    assert isinstance(events[0], RunStarted) and events[0].total_steps == 18
    assert [e.step for e in events if isinstance(e, StepDone)] == list(range(11))
    assert [e.epoch for e in events if isinstance(e, EpochDone)] == [1]
    resumed = train(load_config(tmp_path / "stopped"), resume_dir=tmp_path / "stopped")
    assert_same_weights(whole.checkpoint, resumed.checkpoint)
    assert_same_metrics(tmp_path / "whole", tmp_path / "stopped")
    # A finished run resumes to nothing.
    again = train(load_config(tmp_path / "stopped"), resume_dir=tmp_path / "stopped")
    assert again.finished and again.steps_run == 0 and len(again.epochs) == 3


@pytest.mark.parametrize("stop", ["max_steps", "signal"])
def test_a_stop_at_an_epoch_s_end_writes_its_checkpoint_once(tmp_path, monkeypatch, stop):
    """A stop right after an epoch's end (--max-steps a multiple of the epoch, or a Ctrl-C during
    its evaluation or checkpoint) wrote the checkpoint that epoch's end had just written again,
    the same weights and state, and looked at the held-out loss again; it resumes exactly."""
    import eigensam.training as training

    written: list[str] = []
    save = training.save_checkpoint
    monkeypatch.setattr(
        training,
        "save_checkpoint",
        lambda path, **kw: (written.append(path.name), save(path, **kw)),
    )
    whole = train(config(tmp_path, "whole"))
    written.clear()
    events: list = []
    stopped = train(
        config(tmp_path, "stopped", max_steps=STEPS_PER_EPOCH if stop == "max_steps" else None),
        progress=events.append,
        should_stop=lambda: stop == "signal" and any(isinstance(e, EpochDone) for e in events),
    )
    assert stopped.step == STEPS_PER_EPOCH and stopped.checkpoint.name == "step0000006.pt"
    assert written == ["step0000006.pt"]
    resumed = train(load_config(tmp_path / "stopped"), resume_dir=tmp_path / "stopped")
    assert_same_weights(whole.checkpoint, resumed.checkpoint)
    assert_same_metrics(tmp_path / "whole", tmp_path / "stopped")


def test_options_the_optimizer_does_not_use_are_not_recorded_and_old_records_still_resume(
    tmp_path,
):
    """A SAM run recorded alpha 0.2 and eig_every 100 in config.json, the metrics file and its
    checkpoints, as if used. They are left out now; a run recorded with them still resumes."""
    sam = config(tmp_path, "sam", optimizer="sam", eig_every=100, max_steps=5)
    train(sam)
    run = tmp_path / "sam"
    saved = json.loads((run / "config.json").read_text())
    assert "alpha" not in saved["config"] and "eig_every" not in saved["config"]
    assert saved["config"]["rho"] == sam.rho and saved["config"]["momentum"] == sam.momentum
    meta = load_checkpoint(latest_checkpoint(run)).metadata
    assert "alpha" not in json.loads(meta["config"])
    saved["config"].update(alpha=0.2, eig_every=100)  # as a run of an earlier version has it
    (run / "config.json").write_text(json.dumps(saved))
    path = latest_checkpoint(run)
    raw = torch.load(path, weights_only=True)
    raw["hessian_cli"]["config"] = json.dumps(saved["config"], sort_keys=True)
    torch.save(raw, path)
    resumed = train(dataclasses.replace(load_config(run), max_steps=8), resume_dir=run)
    assert resumed.step == 8


def test_a_run_records_its_built_in_model_s_defaults_and_old_records_still_resume(tmp_path):
    """Runs recorded only the model arguments given ({} for the defaults), so a change of a
    built-in's defaults (mlp's hidden was [64, 128, 128]) rebuilt their checkpoints as another
    model. The defaults are recorded now; a run recorded without them still resumes, also
    given a configuration that names them, or one that leaves them out."""
    cfg = config(tmp_path, model_kwargs=None, max_steps=5)
    train(cfg)
    run = tmp_path / "run"
    built = {"hidden": [128, 128], "activation": "tanh"}
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["model_kwargs"] == built
    meta = load_checkpoint(latest_checkpoint(run)).metadata
    assert json.loads(meta["model_kwargs"]) == built
    assert json.loads(meta["config"])["model_kwargs"] == built
    # A caller's configuration that leaves the defaults out is the same run.
    assert train(dataclasses.replace(cfg, max_steps=6), resume_dir=run).step == 6
    saved["config"]["model_kwargs"] = None  # as a run of an earlier version has it
    (run / "config.json").write_text(json.dumps(saved))
    path = latest_checkpoint(run)
    raw = torch.load(path, weights_only=True)
    raw["hessian_cli"]["model_kwargs"] = "{}"
    raw["hessian_cli"]["config"] = json.dumps(saved["config"], sort_keys=True)
    torch.save(raw, path)
    assert train(dataclasses.replace(load_config(run), max_steps=7), resume_dir=run).step == 7
    named = dataclasses.replace(load_config(run), model_kwargs=built, max_steps=8)
    assert train(named, resume_dir=run).step == 8


def test_eig_hvps_bounds_each_warm_refresh_and_the_cold_one_takes_at_least_its_own(tmp_path):
    """--eig-hvps is the warm refreshes' budget (6 by default, the library's); the first, from
    no vector, may spend COLD_MAX_HVPS or the budget, whichever is more."""
    assert TrainConfig(model="", data="").eig_hvps == DEFAULT_MAX_HVPS == ADDED_FIELDS["eig_hvps"]
    spent = {}
    for budget in (2, 25):
        train(config(tmp_path, f"hvps{budget}", eig_every=1, eig_hvps=budget, max_steps=5))
        m = read_metrics(tmp_path / f"hvps{budget}" / "metrics.h5")
        spent[budget] = m["refresh"]["hvps"].tolist()
        assert len(spent[budget]) == 5 and max(spent[budget][1:]) <= budget
    assert spent[2][0] > 2  # the cold refresh was not held to 2
    assert max(spent[25][1:]) > DEFAULT_MAX_HVPS  # warm ones went past the default where due


def test_a_run_recorded_before_eig_hvps_resumes_with_its_budget_and_not_with_another(tmp_path):
    """Runs before 2026-12-02 recorded no eig_hvps: they resume at the 6 they ran with; a
    resume that names another budget is another run's course, refused."""
    train(config(tmp_path, max_steps=5))
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["eig_hvps"] == 6
    del saved["config"]["eig_hvps"]  # as a run of an earlier version has it
    (run / "config.json").write_text(json.dumps(saved))
    path = latest_checkpoint(run)
    raw = torch.load(path, weights_only=True)
    raw["hessian_cli"]["config"] = json.dumps(saved["config"], sort_keys=True)
    torch.save(raw, path)
    other = dataclasses.replace(load_config(run), eig_hvps=9, max_steps=7)
    with pytest.raises(UserError, match="--eig-hvps differs"):
        train(other, resume_dir=run)
    assert train(dataclasses.replace(load_config(run), max_steps=7), resume_dir=run).step == 7


def test_metrics_file_layout(tmp_path):
    summary = train(config(tmp_path, epochs=2, eig_every=4, track_every=5))
    total = 2 * STEPS_PER_EPOCH
    with h5py.File(tmp_path / "run" / "metrics.h5", "r") as f:
        assert f.attrs["format"] == "hessian-cli-metrics" and f.attrs["format_version"] == 1
        # The root attributes a spectra file has (DESIGN.md), under the same names.
        assert {"tool_version", "torch_version", "created", "modified", "command_line"} <= set(
            f.attrs
        )
        assert json.loads(f.attrs["config"])["optimizer"] == "eigensam"
        assert set(f) == {"steps", "epochs", "refresh", "track"}
        for name, group in f.items():
            lengths = {len(ds) for ds in group.values()}
            assert len(lengths) == 1
            assert all(ds.maxshape == (None,) for ds in group.values())
            assert list(group) == list(COLUMNS[name])  # in the documented order, not a-z
        # What the curvature rows' residuals are to be read against.
        assert f["refresh"].attrs["tol"] == REFRESH_TOL and f["track"].attrs["tol"] == TRACK_TOL
        assert "tol" not in f["steps"].attrs
    m = read_metrics(tmp_path / "run" / "metrics.h5")
    assert m["steps"]["step"].tolist() == list(range(total))
    lr = m["steps"]["lr"]
    assert lr[0] == pytest.approx(0.1) and np.all(np.diff(lr) < 0)  # cosine, per global step
    assert lr[6] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 6 / total)))
    assert np.all(np.isfinite(m["steps"]["loss"])) and np.all(m["steps"]["accuracy"] <= 1)
    # Refreshes are counted on the global step, across epoch boundaries.
    assert m["refresh"]["step"].tolist() == [0, 4, 8]
    assert np.all((m["refresh"]["alignment"] >= 0) & (m["refresh"]["alignment"] <= 1))
    assert np.all(m["refresh"]["hvps"] > 0) and np.all(m["refresh"]["eigenvalue"] > 0)
    # Tracking every 5 steps, and the final weights.
    assert m["track"]["step"].tolist() == [0, 5, 10, total]
    assert np.all(m["track"]["residual"] <= 1e-3)
    assert summary.lambda_max == pytest.approx(m["track"]["lambda_max"][-1])
    epochs = m["epochs"]
    assert epochs["epoch"].tolist() == [1, 2]
    assert np.all(np.isfinite(epochs["test_accuracy"])) and np.all(epochs["seconds"] > 0)
    assert [e.epoch for e in summary.epochs] == [1, 2]


def test_the_device_s_queued_steps_are_step_time_awaited_once_where_it_is_read(
    tmp_path, monkeypatch
):
    """On CUDA a step's kernels run after it returns: an epoch's last steps ran in its
    evaluation (or a measurement) and were not in its step time. A fake device that still
    needs 1 s whenever it is waited on: each epoch's time holds it, waited on once an epoch and
    before each measurement, not at every step."""
    waits = []

    def queued(device: torch.device) -> float:
        waits.append(device)
        return 1.0

    monkeypatch.setattr("eigensam.training.queued_seconds", queued, raising=False)
    run = config(tmp_path, optimizer="sgd", epochs=2, track_every=4)
    summary = train(dataclasses.replace(run, max_steps=11))
    # Tracks after steps 4 and 8, the epochs' ends (steps 6 and 12), the stop at 11.
    assert len(waits) == 4
    epochs = read_metrics(tmp_path / "run" / "metrics.h5")["epochs"]
    assert epochs["epoch"].tolist() == [1] and 2.0 <= epochs["seconds"][0] < 3.0
    assert 4.0 <= summary.step_seconds < 5.0
    resumed = train(run, resume_dir=tmp_path / "run")
    # The second epoch's: those before the stop (at 8 and 11, kept in its checkpoint), then
    # the track at 12 and its end.
    assert len(waits) == 6
    seconds = read_metrics(tmp_path / "run" / "metrics.h5")["epochs"]["seconds"]
    assert 4.0 <= seconds[1] < 5.0 and 2.0 <= resumed.step_seconds < 3.0


def test_a_wait_for_the_device_is_on_cuda_only(monkeypatch):
    """The CPU's work is done when a call returns: no wait (torch without CUDA has none)."""
    from eigensam.step_time import queued_seconds

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: synced.append(device))
    assert queued_seconds(torch.device("cpu")) == 0.0 and synced == []
    assert queued_seconds(torch.device("cuda", 1)) >= 0.0 and synced == [torch.device("cuda", 1)]


def test_each_epoch_line_holds_the_lambda_max_of_its_last_weights(tmp_path):
    """The track due at an epoch's last step ran after the epoch's event was built: the lines
    printed as the run went showed an earlier value than the table at its end."""
    events: list = []
    summary = train(config(tmp_path, track_every=3), progress=events.append)
    m = read_metrics(tmp_path / "run" / "metrics.h5")
    assert m["track"]["step"].tolist() == [0, 3, 6, 9, 12, 15, 18]
    tracked = dict(zip(m["track"]["step"], m["track"]["lambda_max"], strict=True))
    at_ends = [tracked[e * STEPS_PER_EPOCH] for e in (1, 2, 3)]
    live = [e.lambda_max for e in events if isinstance(e, EpochDone)]
    assert live == [e.lambda_max for e in summary.epochs] == at_ends


def test_a_stop_where_a_track_is_due_resumes_without_a_second_or_a_missing_one(tmp_path):
    whole = train(config(tmp_path, "whole"))
    first = train(config(tmp_path, "split", max_steps=10))  # tracks every 5 steps
    assert read_metrics(tmp_path / "split" / "metrics.h5")["track"]["step"].tolist() == [0, 5, 10]
    resumed = train(load_config(tmp_path / "split"), resume_dir=tmp_path / "split")
    assert first.step == 10 and resumed.finished
    assert_same_weights(whole.checkpoint, resumed.checkpoint)
    assert_same_metrics(tmp_path / "whole", tmp_path / "split")


def test_a_resume_measures_a_due_step_its_checkpoint_was_saved_before(tmp_path):
    """Runs before 2026-11-30 saved a checkpoint at a due step before measuring it (at the start
    of the next step); resumed, the measurement at that step was lost for good."""
    train(config(tmp_path, "split", max_steps=10))  # tracks every 5 steps
    with h5py.File(tmp_path / "split" / "metrics.h5", "r+") as f:  # as such a run left it
        for name in list(f["track"]):
            values = f["track"][name][()]
            del f["track"][name]
            f["track"].create_dataset(name, data=values[:-1], maxshape=(None,))
    train(load_config(tmp_path / "split"), resume_dir=tmp_path / "split")
    steps = read_metrics(tmp_path / "split" / "metrics.h5")["track"]["step"]
    assert steps.tolist() == [0, 5, 10, 15, 18]


def test_a_resume_without_a_checkpoint_repeats_the_run_from_its_start(tmp_path):
    """Metrics written, no checkpoint (a kill -9 between an epoch's metrics and the checkpoint
    of a later epoch, or a second Ctrl-C): the kept step-0 track row skipped the step-0 solve,
    so the tracker started cold and every later lambda_max differed in its last digits."""
    whole = train(config(tmp_path, "whole"))
    train(config(tmp_path, "restarted"))
    run_dir = tmp_path / "restarted"
    for ckpt in (run_dir / "checkpoints").iterdir():
        ckpt.unlink()  # only the metrics of the run are left
    resumed = train(load_config(run_dir), resume_dir=run_dir)
    assert resumed.finished
    assert_same_weights(whole.checkpoint, resumed.checkpoint)
    assert_same_metrics(tmp_path / "whole", run_dir)


def test_a_resume_removes_what_a_killed_process_left_half_written(tmp_path):
    """kill -9 during an atomic write leaves its temporary file (a checkpoint's is as large as
    a checkpoint), which no resume removed."""
    train(config(tmp_path, "split", max_steps=10))
    run_dir = tmp_path / "split"
    leftovers = [
        run_dir / "checkpoints" / ".step0000010.pt.0123456789ab.tmp",
        run_dir / ".metrics.h5.abcdef012345.tmp",
    ]
    others = [
        run_dir / ".notes.tmp",  # not one of ours
        run_dir / ".spectra.h5.abcdef012345.tmp",  # an analyze --out into the run, writing
    ]
    for path in (*leftovers, *others):
        path.write_bytes(b"half")
    train(load_config(run_dir), resume_dir=run_dir)
    assert not any(path.exists() for path in leftovers) and all(p.exists() for p in others)


def test_sgd_and_sam_are_tracked_and_never_refresh(tmp_path):
    for optimizer in ("sgd", "sam"):
        train(config(tmp_path, optimizer, optimizer=optimizer, epochs=1, track_every=3))
        m = read_metrics(tmp_path / optimizer / "metrics.h5")
        assert "refresh" not in m
        assert m["track"]["step"].tolist() == [0, 3, STEPS_PER_EPOCH]


def test_checkpoints_are_self_describing_and_load_safely(tmp_path):
    summary = train(config(tmp_path, epochs=2, optimizer="sam"))
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["final.pt", "step0000006.pt"]
    raw = torch.load(summary.checkpoint, weights_only=True)
    assert raw["format"] == "hessian-cli-checkpoint"
    meta = raw["hessian_cli"]
    for key in ("model", "model_kwargs", "data", "data_root", "loss", "input_shape",
                "num_classes", "step", "epoch", "optimizer"):  # fmt: skip
        assert key in meta, key
    assert (meta["model"], meta["data"], meta["loss"], meta["optimizer"]) == (
        "mlp",
        DATA,
        "ce",
        "sam",
    )
    assert json.loads(meta["model_kwargs"]) == {"hidden": [8], "activation": "tanh"}
    assert (meta["step"], meta["epoch"], meta["input_shape"], meta["num_classes"]) == (
        12,
        2,
        [16],
        3,
    )
    assert {"optimizer", "scheduler", "rng", "data_order", "training"} <= raw.keys()
    assert raw["rng"]["torch"].dtype == torch.uint8 and raw["data_order"].dtype == torch.uint8


def test_batchnorm_statistics_move_once_per_step(tmp_path):
    train(config(tmp_path, optimizer="sam", epochs=1, batch_size=16, **BN_CNN))
    state = weights(tmp_path / "run" / "checkpoints" / "final.pt")
    assert int(state["features.1.num_batches_tracked"]) == 4  # 64 samples / 16


def test_the_metrics_say_how_many_layers_train_by_the_minibatch_s_statistics(tmp_path):
    """With BatchNorm the tracked lambda_max (running statistics) and a refresh's (the batch's)
    are of two losses, 100x apart; without it of one kind: the metrics did not say which, so
    `plot` and `show` hedged for every model. A resume of a file without it writes it."""
    train(config(tmp_path, "bn", epochs=1, max_steps=2, **BN_CNN))
    train(config(tmp_path, "plain", epochs=1, max_steps=2))
    for name, layers in (("bn", 1), ("plain", 0)):
        with h5py.File(tmp_path / name / "metrics.h5", "r") as f:
            assert f.attrs["batchnorm_layers"] == layers, name
    run = _stopped_run(tmp_path, "old", **BN_CNN)
    with h5py.File(run / "metrics.h5", "a") as f:  # as a file before 2026-12-02
        del f.attrs["batchnorm_layers"]
    train(dataclasses.replace(load_config(run), max_steps=9), resume_dir=run)
    with h5py.File(run / "metrics.h5", "r") as f:
        assert f.attrs["batchnorm_layers"] == 1


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_layers_counted_as_training_by_the_batch_s_statistics():
    """Those whose eval mode (tracking's) takes other statistics than training: BatchNorm and
    InstanceNorm that keep running ones, also scripted, not those that keep none or are frozen."""
    from torch import nn

    from hessian_cli.engine.model_mode import batch_statistics_layers

    model = nn.Sequential(
        nn.BatchNorm1d(4),
        nn.InstanceNorm1d(2, track_running_stats=True),
        torch.jit.script(nn.BatchNorm1d(4)),
        nn.BatchNorm1d(4, track_running_stats=False),  # the batch's in eval mode too
        nn.InstanceNorm1d(2),
        nn.LayerNorm(4),
    )
    assert batch_statistics_layers(model.train()) == 3
    model[0].eval()  # frozen statistics: the running ones also in training
    assert batch_statistics_layers(model) == 2
    assert batch_statistics_layers(model.eval()) == 0


def test_alpha_zero_eigensam_trains_exactly_like_sam(tmp_path):
    sam = train(config(tmp_path, "sam", optimizer="sam", epochs=1, track_every=0))
    eig = train(config(tmp_path, "eig", optimizer="eigensam", alpha=0.0, epochs=1, track_every=0))
    assert_same_weights(sam.checkpoint, eig.checkpoint)


def test_existing_run_is_refused_and_untouched(tmp_path):
    train(config(tmp_path, epochs=1))
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds a finished training run"):
        train(config(tmp_path, epochs=1))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        train(config(tmp_path, "other"))
    # Resuming with a different configuration is refused.
    changed = load_config(run)
    changed.lr = 0.5
    with pytest.raises(UserError, match="--lr differ"):
        train(changed, resume_dir=run)


def test_a_run_saved_on_more_gpus_than_there_are_now_resumes_on_those_there_are(monkeypatch):
    """The saved CUDA generators past the last visible device are left: torch's
    set_rng_state_all raised IndexError there (a checkpoint of 2 GPUs resumed on 1)."""
    set_states: list[tuple[int, torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: set_states.append((i, s)))
    saved = [torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)]
    cpu = torch.get_rng_state()
    restore_rng({"torch": cpu, "cuda": saved})
    assert [(i, int(s[0])) for i, s in set_states] == [(0, 1)]
    assert torch.equal(torch.get_rng_state(), cpu)


def test_resume_with_max_steps_the_run_has_reached_is_refused(tmp_path):
    train(config(tmp_path, max_steps=5))
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for limit in (5, 2):  # it rewrote the checkpoint and said "Stopped (--max-steps)"
        resumed = dataclasses.replace(load_config(run), max_steps=limit)
        with pytest.raises(
            UserError, match=f"already at step 5, so --max-steps {limit} leaves nothing to do"
        ):
            train(resumed, resume_dir=run)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # A finished run is finished whatever the limit (it was told --max-steps left nothing).
    train(config(tmp_path, "done", epochs=1))
    done = tmp_path / "done"
    before = {p: p.read_bytes() for p in done.rglob("*") if p.is_file()}
    summary = train(dataclasses.replace(load_config(done), max_steps=1), resume_dir=done)
    assert summary.finished and summary.steps_run == 0
    assert {p: p.read_bytes() for p in done.rglob("*") if p.is_file()} == before


def test_steps_past_a_thousand_are_counted_with_separators_as_the_command_line_counts_them(
    tmp_path,
):
    """A resume was refused as "already at step 1000, so --max-steps 5" where the stop line
    before it said "at step 1,000 of 1,008"; its divergence, write failure and out-of-memory
    lines alike."""
    fast = dict(optimizer="sgd", batch_size=2, epochs=21, track_every=0, checkpoint_every=0)
    train(config(tmp_path, max_steps=1000, **fast))
    resumed = dataclasses.replace(load_config(tmp_path / "run"), max_steps=5)
    with pytest.raises(UserError, match="already at step 1,000, so --max-steps 5 leaves"):
        train(resumed, resume_dir=tmp_path / "run")


def test_a_data_root_for_data_that_reads_none_is_refused_in_the_library_too(tmp_path):
    """Only the command line refused it: train(config) ran as if it were used."""
    for extra in ({"data_root": str(tmp_path)}, {"download": True}):
        with pytest.raises(UserError, match="is read only for the torchvision datasets"):
            train(config(tmp_path, **extra))
    assert not (tmp_path / "run").exists()


def test_resume_of_a_path_that_is_not_there_says_so(tmp_path):
    """A mistyped --resume was said to be 'not a directory', as though something were there."""
    with pytest.raises(UserError, match=r"'.*nope' does not exist, so there is no training run"):
        load_config(tmp_path / "nope")
    (tmp_path / "link").symlink_to(tmp_path / "nope")
    with pytest.raises(UserError, match=r"'.*link' is a symbolic link that leads nowhere, so"):
        load_config(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"'.*file' is not a directory, so it is not a training"):
        load_config(tmp_path / "file")


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="not a training run"):
        load_config(tmp_path)
    (tmp_path / "config.json").mkdir()
    with pytest.raises(UserError, match="config.json' is not a regular file"):
        load_config(tmp_path)
    (tmp_path / "config.json").rmdir()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "nosuchmodel"}, "unknown model"),
        ({"data": "synthetic:nope"}, "not of the form"),
        ({"model_kwargs": {"input_size": 5}}, "does not fit the model"),
        ({"optimizer": "adam"}, "unknown optimizer 'adam': use eigensam, sam, sgd \\(AdamW is a"),
        ({"optimizer": "foo"}, "unknown optimizer 'foo': use eigensam, sam, sgd.$"),
        ({"lr": -1.0}, "--lr must be a finite positive number, not -1"),
        ({"lr": math.inf}, "--lr must be a finite positive number, not inf"),
        ({"eig_every": 0}, "--eig-every must be at least 1"),
        ({"eig_hvps": 0}, "--eig-hvps must be at least 1"),
        ({"rho": -0.1}, "--rho must be a finite number of at least 0, not -0.1"),
        (
            {"weight_decay": math.inf},
            "--weight-decay must be a finite number of at least 0, not inf",
        ),
        ({"alpha": math.nan}, "--alpha must be a finite number of at least 0, not nan"),
        ({"momentum": math.nan}, "--momentum must be in \\[0, 1\\), not nan"),
        ({"lr": "abc"}, "--lr must be a number, not 'abc'"),
        ({"epochs": True}, "--epochs must be a whole number, not True"),
        ({"model_kwargs": [8]}, "--model-kwargs must be a JSON object, not \\[8\\]"),
        ({"data": "synthetic-regression:16:3:96", "loss": "ce"}, "--loss mse for regression"),
    ],
)
def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train(config(tmp_path, **overrides))
    assert not (tmp_path / "run").exists()


def test_model_kwargs_that_cannot_be_recorded_are_one_sentence_and_write_nothing(tmp_path):
    """A library caller's factory may take a class; the run failed with a bare TypeError once
    its directory was made, and the same out was then refused as a run that had stopped."""
    user = tmp_path / "user_code.py"
    user.write_text(
        "import torch\n"
        "def net(act=torch.nn.ReLU, **kwargs):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 3), act())\n"
    )
    with pytest.raises(UserError, match="--model-kwargs must hold JSON values only"):
        train(config(tmp_path, model=f"{user}:net", model_kwargs={"act": torch.nn.Tanh}))
    assert not (tmp_path / "run").exists()


def test_a_model_or_loss_that_does_not_fit_is_one_sentence_and_writes_nothing(tmp_path):
    user = tmp_path / "user_code.py"
    user.write_text(
        "import torch\n"
        "class Pair(torch.nn.Module):\n"
        "    def __init__(self, **kwargs):\n        super().__init__()\n"
        "        self.l = torch.nn.Linear(16, 3)\n"
        "    def forward(self, x):\n        return self.l(x.flatten(1)), 0\n"
        "def constant(out, y):\n    return torch.tensor(1.0)\n"
    )
    for overrides, message in (
        ({"model": f"{user}:Pair", "model_kwargs": {}}, "the model returns a tuple, not a tensor"),
        ({"loss": f"{user}:constant"}, "the loss does not depend on the model's outputs"),
    ):
        with pytest.raises(UserError, match=message):
            train(config(tmp_path, **overrides))
        assert not (tmp_path / "run").exists()


def test_a_label_beyond_the_counted_classes_stops_with_one_sentence(tmp_path, monkeypatch):
    """A user dataset's classes are counted from its first samples; a later, larger label is
    named when a batch holds it (cross-entropy would fail with an index error)."""
    monkeypatch.setattr("hessian_cli.specs.data._SCAN_LIMIT", 30)
    (tmp_path / "items.py").write_text(
        "import torch\n"
        "class Items(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n        return 40\n"
        "    def __getitem__(self, i):\n"
        "        return torch.full((4,), float(i)), 5 if i == 35 else i % 3\n"
        "def make():\n    return Items()\n"
    )
    cfg = config(tmp_path, data=f"{tmp_path}/items.py:make", epochs=1, eig_every=1)
    with pytest.raises(UserError, match="label 5 is out of range for 3 classes"):
        train(cfg)


def test_a_nan_in_a_user_dataset_stops_as_bad_data_not_as_divergence(tmp_path):
    """A dataset from code is met a minibatch at a time (a tensor set is checked before the
    run): a NaN in sample 50 stopped the run at step 4 as "training diverged ... with a lower
    --lr"; it is named as the data's, the steps before it written."""
    (tmp_path / "items.py").write_text(
        "import torch\n"
        "class Items(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n        return 96\n"
        "    def __getitem__(self, i):\n"
        "        return torch.full((16,), float('nan') if i == 50 else i / 96), i % 3\n"
        "def make():\n    return Items()\n"
    )
    cfg = config(tmp_path, data=f"{tmp_path}/items.py:make", optimizer="sgd", track_every=0)
    with pytest.raises(UserError, match="^the training data's inputs hold NaN or infinite values"):
        train(cfg)
    steps = read_metrics(tmp_path / "run" / "metrics.h5")["steps"]
    assert np.isfinite(steps["loss"]).all() and 0 < len(steps["loss"]) < STEPS_PER_EPOCH


def test_a_batch_of_one_for_a_batchnorm_model_is_refused_before_the_run(tmp_path):
    (tmp_path / "bn.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), "
        "nn.Linear(8, 3))\n"
    )
    cfg = config(tmp_path, model=f"{tmp_path}/bn.py:make", model_kwargs={}, batch_size=1)
    with pytest.raises(UserError, match="a batch of one sample cannot train this model"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    cfg.batch_size, cfg.max_steps = 2, 2  # two samples have statistics
    assert train(cfg).step == 2
    # A set of one sample is a batch of one at any --batch-size (it crashed in the first step
    # and left a run directory without a checkpoint).
    one = config(
        tmp_path, "one", model=cfg.model, model_kwargs={}, data="synthetic:16:3:1", batch_size=8
    )
    with pytest.raises(UserError, match="a batch of one sample.*; use data of 2 samples or more"):
        train(one)
    assert not (tmp_path / "one").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    "norm",
    [
        "nn.BatchNorm1d(8)",
        "nn.Unflatten(1, (2, 4)), nn.InstanceNorm1d(2, track_running_stats=True), nn.Flatten()",
    ],
)
def test_eigensam_on_a_scripted_norm_model_is_refused_before_the_run(tmp_path, norm):
    """The refresh cannot take a TorchScript BatchNorm, or InstanceNorm with running statistics,
    by batch statistics: refused at the first refresh, in words of `analyze` (--bn), a run
    directory without a checkpoint left behind (an InstanceNorm layer's, before 2026-12-01)."""
    (tmp_path / "bn.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "def make():\n"
        "    return torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), "
        f"{norm}, nn.Linear(8, 3)))\n"
    )
    cfg = config(tmp_path, model=f"{tmp_path}/bn.py:make", model_kwargs={}, max_steps=2)
    with pytest.raises(UserError, match="TorchScript module's cannot do: train the eager model"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    cfg.optimizer = "sam"  # no refresh
    assert train(cfg).step == 2


def _failing_step(monkeypatch, at: int, error: BaseException):
    """Make training step ``at`` raise ``error``; returns the real step, to put back."""
    from eigensam import training as training_module

    real_step = training_module._Run._step

    def step(self, batch):
        if self.step == at:
            raise error
        return real_step(self, batch)

    monkeypatch.setattr(training_module._Run, "_step", step)
    return real_step


def test_out_of_gpu_memory_stops_with_a_message_and_the_run_resumes(tmp_path, monkeypatch):
    from eigensam import training as training_module

    # in epoch 2, after epoch 1's checkpoint
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    real_step = _failing_step(monkeypatch, STEPS_PER_EPOCH + 2, oom)
    cfg = config(tmp_path, epochs=2, track_every=0)
    with pytest.raises(UserError, match="ran out of memory at step") as err:
        train(cfg)
    run = tmp_path / "run"
    assert "--batch-size" in str(err.value) and f"--resume {run}" in str(err.value)
    m = read_metrics(run / "metrics.h5")  # the steps done are on disk
    assert m["steps"]["step"].tolist() == list(range(STEPS_PER_EPOCH + 2))
    monkeypatch.setattr(training_module._Run, "_step", real_step)
    assert train(load_config(run), resume_dir=run).finished


@pytest.mark.parametrize("stop", [Terminated, KeyboardInterrupt, PeerLost])
def test_whatever_stops_a_run_the_steps_done_are_written(tmp_path, monkeypatch, stop):
    """SIGTERM, a second Ctrl-C or a lost rank mid-epoch: the exception goes on as it is, and
    the metrics of the steps done are on disk (they are otherwise written per epoch)."""
    _failing_step(monkeypatch, STEPS_PER_EPOCH + 2, stop("stopped by the test"))
    with pytest.raises(stop):
        train(config(tmp_path, epochs=2, track_every=0))
    m = read_metrics(tmp_path / "run" / "metrics.h5")
    assert m["steps"]["step"].tolist() == list(range(STEPS_PER_EPOCH + 2))


def test_divergence_stops_with_a_message_and_nothing_corrupt(tmp_path):
    with pytest.raises(UserError, match="diverged at step"):
        train(config(tmp_path, optimizer="sgd", lr=1e12, momentum=0.0, epochs=3, track_every=0))
    run = tmp_path / "run"
    assert not (run / "checkpoints" / "final.pt").exists()
    for path in (run / "checkpoints").iterdir():  # whatever was saved holds finite weights
        assert all(torch.isfinite(t).all() for t in weights(path).values() if t.is_floating_point())
    m = read_metrics(run / "metrics.h5")
    assert m["steps"]["step"].tolist() == list(range(len(m["steps"]["step"])))


def _stopped_run(tmp_path: Path, name: str = "run", **overrides) -> Path:
    """A run stopped by --max-steps at step 8 (mid-epoch 2); returns its directory."""
    train(config(tmp_path, name, max_steps=8, **overrides))
    return tmp_path / name


def _edit_checkpoint(path: Path, edit) -> None:
    raw = torch.load(path, weights_only=False)
    edit(raw)
    torch.save(raw, path)


def test_metrics_are_written_before_each_checkpoint(tmp_path, monkeypatch):
    """A kill between the two writes must never leave a checkpoint ahead of the metrics."""
    from eigensam import training as training_module

    real_save, seen = training_module.save_checkpoint, []

    def save(path, **kwargs):
        rows = len(read_metrics(path.parent.parent / "metrics.h5")["steps"]["step"])
        seen.append((kwargs["extra"]["training"]["step"], rows))
        real_save(path, **kwargs)

    monkeypatch.setattr(training_module, "save_checkpoint", save)
    train(config(tmp_path, max_steps=8))
    train(load_config(tmp_path / "run"), resume_dir=tmp_path / "run")
    assert seen == [(6, 6), (8, 8), (12, 12), (18, 18)]  # epoch ends, the stop, the end


def test_a_resume_with_other_data_or_processes_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.normal(size=(96, 16)).astype(np.float32), y=rng.integers(0, 3, 96))
    run = _stopped_run(tmp_path, data=str(data))
    np.savez(data, x=rng.normal(size=(160, 16)).astype(np.float32), y=rng.integers(0, 3, 160))
    before = (run / "metrics.h5").read_bytes()
    with pytest.raises(UserError, match="trained on 96 samples, but its data .* now has 160"):
        train(load_config(run), resume_dir=run)
    checkpoint = run / "checkpoints" / "step0000008.pt"
    _edit_checkpoint(checkpoint, lambda raw: raw["training"].update(processes=2, samples=160))
    # By world size: "--nproc-per-node 2" was wrong for a job of 2 nodes of 1 process each.
    with pytest.raises(
        UserError,
        match=r"trained by 2 processes, not 1: resume it with as many \(a torchrun job of world "
        r"size 2: --nnodes times --nproc-per-node\)",
    ):
        train(load_config(run), resume_dir=run)
    # A checkpoint from before these were recorded: its schedule says the same.
    _edit_checkpoint(
        checkpoint,
        lambda raw: [raw["training"].pop(k) for k in ("processes", "samples", "data_sha256")],
    )
    with pytest.raises(UserError, match="planned as 18 steps, but .* now make 30"):
        train(load_config(run), resume_dir=run)
    assert (run / "metrics.h5").read_bytes() == before
    # A finished run of 2 processes resumed by 1: done, not to be resumed by 2 (as it said).
    train(config(tmp_path, "done", epochs=1))
    final = tmp_path / "done" / "checkpoints" / "final.pt"
    _edit_checkpoint(final, lambda raw: raw["training"].update(processes=2))
    with pytest.raises(UserError, match=r"already finished \(step 6 of 6\)"):
        train(load_config(tmp_path / "done"), resume_dir=tmp_path / "done")


def test_a_data_file_rewritten_with_as_many_samples_is_other_data_to_a_resume(tmp_path):
    """Only the sample count was compared: x + 1 under the same name resumed without a word."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    x, y = rng.normal(size=(96, 16)).astype(np.float32), rng.integers(0, 3, 96)
    np.savez(data, x=x, y=y)
    run = _stopped_run(tmp_path, data=str(data))
    np.savez(data, x=x + 1, y=y)
    with pytest.raises(UserError, match="has changed since this run was trained on it"):
        train(load_config(run), resume_dir=run)
    np.savez(data, x=x, y=y)  # the same arrays again: the same file
    assert train(load_config(run), resume_dir=run).finished


@pytest.mark.parametrize("edit", [lambda x: x * 100, lambda x: x[::-1]])
def test_data_from_code_that_gives_other_samples_is_other_data_to_a_resume(tmp_path, edit):
    """Data from code was compared by its sample count alone: a factory whose file it reads was
    rewritten with the inputs scaled 100-fold, or in another order, resumed without a word."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 16)).astype(np.float32)
    np.save(tmp_path / "inputs.npy", x)
    code = tmp_path / "items.py"
    code.write_text(
        "from pathlib import Path\n\nimport numpy as np\nimport torch\n\n\ndef make():\n"
        "    x = torch.from_numpy(np.load(Path(__file__).parent / 'inputs.npy'))\n"
        "    return torch.utils.data.TensorDataset(x, torch.arange(96) % 3)\n"
    )
    run = _stopped_run(tmp_path, data=f"{code}:make")
    np.save(tmp_path / "inputs.npy", np.ascontiguousarray(edit(x)))
    with pytest.raises(UserError, match="gives other samples than this run was trained on"):
        train(load_config(run), resume_dir=run)
    np.save(tmp_path / "inputs.npy", x)  # the same samples again
    assert train(load_config(run), resume_dir=run).finished


def test_data_augmented_at_random_still_resumes(tmp_path):
    """Its samples differ at every fetch, so no digest of them is kept to be compared."""
    code = tmp_path / "noisy.py"
    code.write_text(
        "import numpy as np\nimport torch\n\n\nclass Noisy(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n        return 96\n\n"
        "    def __getitem__(self, i):\n"
        "        x = torch.full((16,), float(i)) + torch.from_numpy(np.random.normal(size=16))\n"
        "        return x.float(), i % 3\n\n\ndef make():\n    return Noisy()\n"
    )
    run = _stopped_run(tmp_path, data=f"{code}:make")
    assert train(load_config(run), resume_dir=run).finished


def test_files_a_run_names_are_found_from_any_working_directory(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    (tmp_path / "here").mkdir()
    np.savez(
        tmp_path / "here" / "data.npz",
        x=rng.normal(size=(96, 16)).astype(np.float32),
        y=rng.integers(0, 3, 96),
    )
    monkeypatch.chdir(tmp_path / "here")
    train(config(tmp_path, data="data.npz", max_steps=4))
    saved = load_config(tmp_path / "run")
    assert saved.data == str(tmp_path / "here" / "data.npz")
    # The library caller's own configuration, relative path and all, is the same run.
    assert not train(
        config(tmp_path, data="data.npz", max_steps=8), resume_dir=tmp_path / "run"
    ).finished
    monkeypatch.chdir(tmp_path)  # elsewhere
    assert train(saved, resume_dir=tmp_path / "run").finished


def test_a_data_root_given_through_a_symbolic_link_is_recorded_as_given(tmp_path, monkeypatch):
    """The checkpoints name the data root as config.json does, link and all: resolving the link
    recorded where it pointed then, which an analysis would follow after it is re-pointed."""
    import hessian_cli.specs.data

    # Only torchvision's datasets read a root (refused for others), and it is optional.
    monkeypatch.setattr(hessian_cli.specs.data, "check_root_options", lambda *a, **k: None)
    (tmp_path / "datasets").mkdir()
    link = tmp_path / "data"
    link.symlink_to(tmp_path / "datasets", target_is_directory=True)
    summary = train(config(tmp_path, epochs=1, track_every=0, data_root=str(link)))
    recorded = load_checkpoint(summary.checkpoint).metadata["data_root"]
    assert recorded == load_config(tmp_path / "run").data_root == str(link)


def test_a_run_is_trained_by_one_process_at_a_time(tmp_path):
    from eigensam.run_dir import write_config
    from hessian_cli.storage.files import held

    run = _stopped_run(tmp_path)
    with held(run / "config.json", "held by the test"):  # as a second process would
        with pytest.raises(UserError, match="being trained by another process"):
            train(load_config(run), resume_dir=run)
    # Two new runs that both found --out free: the second to write its config gives way.
    with pytest.raises(UserError, match="another run started in .* meanwhile"):
        write_config(run, load_config(run))
    assert train(load_config(run), resume_dir=run).finished


def test_a_resume_keeps_what_it_does_not_write_in_the_metrics(tmp_path):
    run = _stopped_run(tmp_path)
    with h5py.File(run / "metrics.h5", "a") as f:
        f.create_group("mine").create_dataset("step", data=np.arange(3))
        f.attrs["note"] = "kept"
    train(load_config(run), resume_dir=run)
    with h5py.File(run / "metrics.h5") as f:
        assert f.attrs["note"] == "kept" and list(f["mine/step"][()]) == [0, 1, 2]
        assert len(f["steps/step"]) == 18
        # A column of its own groups that it does not know is refused, not dropped.
        f.close()
    with h5py.File(run / "metrics.h5", "a") as f:
        f["steps"].create_dataset("grad_norm", data=np.ones(18))
    (run / "checkpoints" / "final.pt").unlink()
    with pytest.raises(UserError, match=r"columns this version does not write \(steps/grad_norm\)"):
        train(load_config(run), resume_dir=run)


def test_a_resume_refuses_metrics_of_a_newer_format_version(tmp_path):
    """A resume rewrote a newer version's metrics.h5 as version 1, which may misread it."""
    run = _stopped_run(tmp_path)
    with h5py.File(run / "metrics.h5", "a") as f:
        f.attrs["format_version"] = 2
    before = (run / "metrics.h5").read_bytes()
    with pytest.raises(UserError, match=r"written by a newer hessian-cli \(format version 2\)"):
        train(load_config(run), resume_dir=run)
    assert (run / "metrics.h5").read_bytes() == before


def test_a_resume_refuses_metrics_that_stop_short_of_the_checkpoint(tmp_path):
    run = _stopped_run(tmp_path)
    with h5py.File(run / "metrics.h5", "a") as f:  # as a crash between the two writes left it
        for name in list(f["steps"]):
            values = f["steps"][name][()]
            del f["steps"][name]
            f["steps"].create_dataset(name, data=values[:6], maxshape=(None,))
    with pytest.raises(UserError, match="records 6 steps, but its checkpoint is at step 8"):
        train(load_config(run), resume_dir=run)
    (run / "metrics.h5").unlink()
    with pytest.raises(UserError, match="metrics.h5 is missing"):
        train(load_config(run), resume_dir=run)


@pytest.mark.parametrize(
    "edit",
    [
        lambda raw: raw["training"].pop("step"),
        lambda raw: raw["training"].update(batch=99),
        lambda raw: raw.update(data_order=torch.zeros(3, dtype=torch.uint8)),
        lambda raw: raw["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
        lambda raw: raw["hessian_cli"].update(config="not json"),
        lambda raw: raw["training"]["epoch_sums"].pop("loss"),  # a KeyError at the epoch's end
        # Raw TypeErrors and ValueErrors (exit 1), or a NaN in the metrics, before:
        lambda raw: raw["training"].update(batch="2"),
        lambda raw: raw["training"].update(step=8.0),
        lambda raw: raw["training"].update(processes="2"),
        lambda raw: raw["training"]["epoch_sums"].update(loss="nan"),
    ],
    ids=[
        "no-step",
        "batch-out-of-range",
        "data-order",
        "rng",
        "config",
        "epoch-sums",
        "batch-text",
        "step-float",
        "processes-text",
        "epoch-sums-nan",
    ],
)
def test_a_checkpoint_with_a_damaged_training_state_is_one_sentence(tmp_path, edit):
    run = _stopped_run(tmp_path)
    _edit_checkpoint(run / "checkpoints" / "step0000008.pt", edit)
    with pytest.raises(UserError, match="is damaged"):
        train(load_config(run), resume_dir=run)
    assert not (run / "checkpoints" / "final.pt").exists()


def test_a_minibatch_of_padding_only_makes_no_update_and_the_run_goes_on(tmp_path):
    """A minibatch whose labels were all -100 stopped the run ("a batch of the data holds no
    label but -100") at step 0 of texts a quarter of which are unlabelled at --batch-size 2,
    and a resume met the same batch again: it makes no update (no step of weight decay or
    momentum either, nor of BatchNorm's running statistics: num_batches_tracked went 0 to 1 and
    running_mean moved by 0.076), and Eigen-SAM's refresh due there is made at the next step."""
    (tmp_path / "tokens.py").write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "class Texts(torch.utils.data.Dataset):\n"
        "    def __init__(self):\n"
        "        g = torch.Generator().manual_seed(0)\n"
        "        self.x = torch.randint(0, 5, (40, 6), generator=g)\n"
        "        self.y = torch.randint(0, 5, (40, 6), generator=g)\n"
        "        self.y[::4] = -100  # every 4th text has no label\n\n"
        "    def __len__(self):\n"
        "        return len(self.x)\n\n"
        "    def __getitem__(self, i):\n"
        "        return self.x[i], self.y[i]\n\n\n"
        "def data():\n"
        "    return Texts()\n\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb, self.bn = nn.Embedding(5, 4), nn.BatchNorm1d(4)\n"
        "        self.out = nn.Linear(4, 5)\n\n"
        "    def forward(self, x):\n"
        "        h = self.bn(self.emb(x).transpose(1, 2)).transpose(1, 2)\n"
        "        return self.out(torch.tanh(h))\n\n\n"
        "def make():\n"
        "    return Net()\n"
    )
    texts = dict(
        model=f"{tmp_path}/tokens.py:make",
        model_kwargs=None,
        data=f"{tmp_path}/tokens.py:data",
        batch_size=2,
        epochs=1,
        eig_every=3,
        track_every=0,
    )  # the first step's batch, and the 13th's, are unlabelled texts
    start = train(config(tmp_path, "start", max_steps=0, **texts))
    one = train(config(tmp_path, "one", max_steps=1, **texts))
    assert_same_weights(start.checkpoint, one.checkpoint)
    whole = train(config(tmp_path, "whole", **texts))
    assert whole.finished and whole.unlabelled_steps == 2
    metrics = read_metrics(tmp_path / "whole" / "metrics.h5")
    assert np.isnan(metrics["steps"]["loss"]).nonzero()[0].tolist() == [0, 12]
    assert metrics["refresh"]["step"].tolist() == [1, 3, 6, 9, 13, 15, 18]
    assert np.isfinite(metrics["epochs"]["train_loss"]).all()


def test_a_loss_that_cannot_train_or_numbers_out_of_range_are_one_sentence(tmp_path):
    # Probabilities over one class (real targets of another kind are refused before: see
    # test_specs_losses), for a model of one output: a softmax over one class.
    one_class = tmp_path / "one_class.npz"
    np.savez(one_class, x=np.random.default_rng(0).normal(size=(96, 16)), y=np.ones((96, 1)))
    single = {"data": str(one_class), "loss": "ce"}
    for overrides, message in (
        (single, "cross-entropy over a single output is 0 whatever the weights"),
        ({"seed": 10**23}, "`seed` must be an integer between -2\\*\\*63 and 2\\*\\*64 - 1"),
        ({"lr": 1e39}, "--lr is too large for float32"),
    ):
        with pytest.raises(UserError, match=message):
            train(config(tmp_path, **overrides))
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("optimizer", "track_every"), [("sgd", 0), ("sgd", 5), ("eigensam", 0)])
def test_a_loss_not_finite_before_any_step_does_not_blame_the_learning_rate(
    tmp_path, optimizer, track_every
):
    """NaN at the initial weights: no step was taken, so --lr and --rho played no part (the
    message used to tell the user to lower them). Where the run takes Hessian products, the
    check before them said "on the analysed data: check the weights", as if analyze's."""
    (tmp_path / "nanloss.py").write_text(
        "def nan(out, y):\n    return (out * float('nan')).sum()\n"
    )
    cfg = config(tmp_path, optimizer=optimizer, momentum=0.0, track_every=track_every)
    cfg.loss = f"{tmp_path}/nanloss.py:nan"
    with pytest.raises(UserError, match="at the initial weights, before any step") as err:
        train(cfg)
    assert "--lr" not in str(err.value)


def test_divergence_seen_by_tracking_is_named_as_divergence(tmp_path):
    """Finite weights (about 1e36) whose loss is not: the held-out batch's Hessian sees it."""
    cfg = config(tmp_path, optimizer="sgd", lr=1e37, momentum=0.0, weight_decay=0.0)
    cfg.track_every = 1
    with pytest.raises(UserError, match="training diverged at step") as err:
        train(cfg)
    # sgd reads no --rho (which train refuses for it): only --lr is named.
    # Another --out: this one holds the stopped run, which a new run there is refused beside.
    assert str(err.value).endswith("start a new run, in another --out, with a lower --lr.")


def test_a_divergence_seen_at_the_final_checkpoint_names_the_last_epoch(tmp_path):
    """Weights made infinite by the last step, with no test split to see it, are seen by the
    final checkpoint's check: the run "diverged at step 18 (epoch 4)" of 3 epochs."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.normal(size=(96, 16)), y=rng.integers(0, 3, 96))
    (tmp_path / "user.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Breaking(nn.Linear):\n"
        "    steps = 0\n"
        "    def forward(self, x):\n"
        "        out = super().forward(x)\n"
        "        self.steps += self.training\n"
        "        if self.steps == 18:  # its last step's update moves the bias from inf\n"
        "            with torch.no_grad():\n"
        "                self.bias.fill_(float('inf'))\n"
        "        return out\n"
        "def model():\n"
        "    return Breaking(16, 3)\n"
    )
    cfg = config(
        tmp_path,
        model=f"{tmp_path / 'user.py'}:model",
        model_kwargs=None,
        data=str(tmp_path / "train.npz"),
        optimizer="sgd",
        track_every=0,
    )
    with pytest.raises(UserError, match=r"^training diverged at step 18 \(epoch 3\): "):
        train(cfg)


@pytest.mark.parametrize("optimizer", ["sam", "eigensam"])
def test_a_loss_not_finite_at_the_perturbed_weights_is_the_divergence_of_its_step(
    tmp_path, optimizer
):
    """A NaN loss at w + e: its gradient made the weights NaN, and the run was said to have
    diverged at the next step, whose loss at those weights was the first NaN seen."""
    (tmp_path / "user.py").write_text(
        "from torch import nn\n"
        "class Breaking(nn.Linear):\n"
        "    passes = 0\n"
        "    def forward(self, x):\n"
        "        out = super().forward(x)\n"
        "        self.passes += self.training\n"
        "        return out * float('nan') if self.passes == 8 else out  # step 3's second\n"
        "def model():\n"
        "    return Breaking(16, 3)\n"
    )
    cfg = config(
        tmp_path,
        model=f"{tmp_path / 'user.py'}:model",
        model_kwargs=None,
        optimizer=optimizer,
        eig_every=100,
        track_every=0,
    )
    with pytest.raises(UserError, match=r"^training diverged at step 3 \(epoch 1\): "):
        train(cfg)
    assert read_metrics(tmp_path / "run" / "metrics.h5")["steps"]["step"].tolist() == [0, 1, 2]


def test_a_loss_that_grew_without_becoming_nan_is_a_divergence(tmp_path):
    """--lr 100 took the loss from 1.1 to 57 and the run ended as done: nothing is NaN."""
    grown = train(config(tmp_path, "grown", optimizer="sgd", lr=100.0, track_every=0))
    metrics = read_metrics(tmp_path / "grown" / "metrics.h5")
    first, last = metrics["steps"]["loss"][0], metrics["epochs"]["train_loss"][-1]
    assert np.isfinite(last) and last > 4 * first
    assert grown.finished and grown.loss_growth == pytest.approx((first, last))
    assert grown.divergence_knobs == "--lr"
    healthy = train(config(tmp_path, "healthy", optimizer="sam", track_every=0))
    assert healthy.finished and healthy.loss_growth is None


def test_a_divergence_from_weight_decay_names_it(tmp_path):
    """lr * weight decay of 1 or more overshoots by itself: the advice named only --lr and
    --rho."""
    cfg = config(tmp_path, optimizer="sam", lr=0.1, weight_decay=1e30, track_every=0)
    with pytest.raises(UserError, match="training diverged") as err:
        train(cfg)
    assert str(err.value).endswith("a lower --lr, --rho or --weight-decay.")


def test_a_divergence_from_a_huge_alpha_names_it(tmp_path):
    """Eigen-SAM's perturbation is rho * d, |d| up to sqrt(1 + alpha^2): the advice was to lower
    --lr or --rho, which did not help."""
    cfg = config(tmp_path, optimizer="eigensam", alpha=3.4e38, eig_every=1, track_every=0)
    cfg.model_kwargs = {"hidden": [8], "activation": "relu"}
    with pytest.raises(UserError, match="training diverged") as err:
        train(cfg)
    assert str(err.value).endswith("a lower --lr, --rho or --alpha.")


def test_a_test_split_holding_nan_is_refused_before_the_run_starts(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 16)).astype(np.float32), rng.integers(0, 3, 96)
    x_test = x[:10].copy()
    x_test[3, 2] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x_test, y_test=y[:10])
    with pytest.raises(UserError, match="the test data's inputs hold NaN"):
        train(config(tmp_path, data=str(tmp_path / "d.npz")))
    assert not (tmp_path / "run").exists()


def test_divergence_seen_by_the_test_split_is_named_as_divergence(tmp_path):
    """The last update of an epoch can leave finite weights whose loss is not; only the test
    split sees them before the checkpoint."""
    cfg = config(tmp_path, optimizer="sgd", lr=8e36, momentum=0.0, weight_decay=0.0, epochs=1)
    cfg.data, cfg.batch_size, cfg.track_every = "digits", 2048, 0  # one step, then the test split
    cfg.model_kwargs = {"hidden": [64]}
    with pytest.raises(UserError, match="training diverged at step 1 "):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints" / "final.pt").exists()
    # Without a test split, the checkpoint's own check on the held-out batch sees it.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(256, 64)), rng.normal(size=(256, 10))
    np.savez(tmp_path / "r.npz", x=x.astype(np.float32), y=y.astype(np.float32))
    cfg.data, cfg.out, cfg.lr, cfg.loss = str(tmp_path / "r.npz"), str(tmp_path / "b"), 1e20, "mse"
    with pytest.raises(UserError, match="training diverged at step 1 "):
        train(cfg)
    assert not (tmp_path / "b" / "checkpoints" / "final.pt").exists()


def test_checkpoints_are_created_as_the_umask_says(tmp_path):
    previous = os.umask(0o022)
    try:
        train(config(tmp_path, max_steps=2))
    finally:
        os.umask(previous)
    mode = (tmp_path / "run" / "checkpoints" / "step0000002.pt").stat().st_mode & 0o777
    assert mode == 0o644  # readable by whoever may read the metrics (mkstemp made 0o600)


def test_a_checkpoint_that_cannot_be_written_says_where_the_run_can_go_on(tmp_path, monkeypatch):
    from hessian_cli.specs import checkpoints

    run = _stopped_run(tmp_path)

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 141184")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    with pytest.raises(UserError, match="no space left on device; stopped at step 12") as err:
        train(load_config(run), resume_dir=run)
    assert "the last checkpoint is" in str(err.value) and "step0000008.pt" in str(err.value)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_metrics_that_cannot_be_written_say_where_the_run_can_go_on(tmp_path, monkeypatch):
    """A full disk at the metrics (written before each checkpoint) said only "Could not write
    metrics.h5", not that the run stopped nor where it can go on from, as a checkpoint's does."""
    from hessian_cli.storage import files

    run = _stopped_run(tmp_path)
    fsync = os.fsync

    def full_disk(fd):
        if "metrics.h5" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(UserError, match="metrics.h5: no space left on device; stopped at step"):
        train(load_config(run), resume_dir=run)
    assert read_metrics(run / "metrics.h5")["steps"]["step"].size == 8  # as it was
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_an_unreadable_latest_checkpoint_names_the_one_before_it(tmp_path):
    run = _stopped_run(tmp_path)  # checkpoints at steps 6 (epoch 1) and 8
    latest = run / "checkpoints" / "step0000008.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(
        UserError, match="move it aside to resume from the one before it, step0000006"
    ):
        train(load_config(run), resume_dir=run)
    torch.save({"x": _Hostile()}, latest)
    with pytest.raises(UserError, match="holds code that loading it would run, so it was refused"):
        train(load_config(run), resume_dir=run)


def test_a_resume_where_nothing_can_be_written_stops_before_training(tmp_path, monkeypatch):
    from hessian_cli.storage import files

    run = _stopped_run(tmp_path)

    def read_only(dir=None):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "TemporaryFile", read_only)
    before = (run / "metrics.h5").read_bytes()
    with pytest.raises(UserError, match="cannot write to the directory .*read-only file system"):
        train(load_config(run), resume_dir=run)
    assert (run / "metrics.h5").read_bytes() == before


class _Hostile:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_sigterm_while_the_metrics_are_written_waits_for_the_file(tmp_path, monkeypatch):
    """torchrun's SIGTERM to a rank that is writing its rows on the way out (another rank
    failed) cut the write short and left no metrics.h5; now the file is finished first."""
    import signal

    from hessian_cli.storage import metrics as metrics_module
    from hessian_cli.storage.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.h5", {"model": "mlp"})
    for step in range(5):
        log.append("steps", step=step, loss=1.0, accuracy=0.5, lr=0.1)
    real_asarray, sent = metrics_module.np.asarray, []

    def asarray(*args, **kwargs):  # the first column being written: the signal arrives
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_asarray(*args, **kwargs)

    def terminated(signum, frame):
        raise Terminated

    monkeypatch.setattr(metrics_module.np, "asarray", asarray)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        with pytest.raises(Terminated):
            log.flush()
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert sent and read_metrics(tmp_path / "metrics.h5")["steps"]["step"].tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_checkpoint_from_before_labels_were_counted_resumes_to_the_same_accuracy(tmp_path):
    """Checkpoints before 2026-11-30 keep no count of labels: one per sample, as they were."""
    train(config(tmp_path, "whole"))
    run = _stopped_run(tmp_path)
    checkpoint = run / "checkpoints" / "step0000008.pt"
    _edit_checkpoint(checkpoint, lambda raw: raw["training"]["epoch_sums"].pop("labelled"))
    train(load_config(run), resume_dir=run)
    resumed = read_metrics(run / "metrics.h5")["epochs"]["train_accuracy"]
    whole = read_metrics(tmp_path / "whole" / "metrics.h5")["epochs"]["train_accuracy"]
    np.testing.assert_array_equal(resumed, whole)


def test_a_model_of_one_parameter_trains_tracked_and_refreshed(tmp_path):
    # The refresh and the tracker hint their first solve with the gradient: on one parameter
    # the start row cancelled for one sign of it, and the run stopped in a RuntimeError.
    (tmp_path / "one.py").write_text(
        "import torch\n"
        "class One(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.w = torch.nn.Parameter(torch.tensor([0.5]))\n"
        "    def forward(self, x):\n"
        "        return x[:, :1] * self.w\n"
        "def net(**kwargs):\n"
        "    return One()\n"
    )
    x = torch.linspace(-1, 1, 32).reshape(-1, 1)
    torch.save({"x": x, "y": 2 * x}, tmp_path / "line.pt")
    for seed in range(2):
        summary = train(
            config(
                tmp_path,
                f"run{seed}",
                model=str(tmp_path / "one.py") + ":net",
                model_kwargs=None,
                data=str(tmp_path / "line.pt"),
                batch_size=8,
                epochs=1,
                eig_every=2,
                track_every=2,
                seed=seed,
            )
        )
        assert summary.finished
        refreshes = read_metrics(tmp_path / f"run{seed}" / "metrics.h5")["refresh"]
        assert len(refreshes["step"]) == 2 and (refreshes["eigenvalue"] > 0).all()


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_a_float64_model_trains_on_float64_batches(tmp_path, loss):
    """A factory's float64 model (small models whose Hessians are studied exactly) was given
    float32 batches and refused as not fitting its data; its batches now take its dtype, and
    a bfloat16 model is refused in one sentence."""
    (tmp_path / "nets.py").write_text(
        "import torch\n"
        "def net(dtype='float64', **kwargs):\n"
        "    torch.manual_seed(0)\n"
        "    layers = [torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(),\n"
        "              torch.nn.Linear(8, 3)]\n"
        "    return torch.nn.Sequential(*layers).to(getattr(torch, dtype))\n"
    )
    spec = str(tmp_path / "nets.py") + ":net"
    summary = train(config(tmp_path, model=spec, model_kwargs=None, loss=loss, epochs=1))
    assert summary.finished and np.isfinite(summary.lambda_max)
    saved = weights(tmp_path / "run" / "checkpoints" / "final.pt")
    assert {t.dtype for t in saved.values()} == {torch.float64}
    refreshes = read_metrics(tmp_path / "run" / "metrics.h5")["refresh"]
    assert len(refreshes["step"]) > 0 and (refreshes["eigenvalue"] > 0).all()
    with pytest.raises(UserError, match="bfloat16: train runs float32 or float64 models"):
        train(config(tmp_path, "bf16", model=spec, model_kwargs={"dtype": "bfloat16"}))


def _tracked_under_a_larger_negative_eigenvalue() -> tuple[Measurement, torch.Tensor, torch.Tensor]:
    """A measurement of lambda_max 1 under an eigenvalue of -30: what the tracker returned, its
    vector and the Hessian."""
    from eigensam.tracking import LambdaMaxTracker

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(44, 44, generator=g, dtype=torch.float64))
    spectrum = [1.0, 0.97, 0.9, *torch.linspace(0.5, -0.5, 40).tolist(), -30.0]
    A = Q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ Q.T
    model = torch.nn.Linear(44, 1, bias=False).double()  # loss 0.5 w^T A w
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 44, generator=g, dtype=torch.float64))

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = model.weight[0]
        return 0.5 * w @ A @ w + 0 * out.sum()

    batch = (torch.zeros(2, 44, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    tracker = LambdaMaxTracker([batch], seed=0, device=torch.device("cpu"))
    return tracker.measure(model, loss), tracker.vector, A


def test_a_tracked_residual_is_relative_to_lambda_max():
    """Not to the largest |Ritz value|: under an eigenvalue of -30 the solve stopped at a
    residual up to tol times 30, reported as 6.6e-4 (within TRACK_TOL) for 2.0e-2."""
    measured, v, A = _tracked_under_a_larger_negative_eigenvalue()
    true = float((A @ v - measured.lambda_max * v).norm()) / abs(measured.lambda_max)
    assert measured.residual == pytest.approx(true, rel=1e-6)


def test_a_tracked_lambda_max_under_a_larger_negative_eigenvalue_meets_its_tolerance():
    """The solve stopped "converged" by its residual relative to 30 (2.0e-2 of lambda_max, 1.0),
    with products to spare: recorded above TRACK_TOL, and train said it stopped at its budget.
    It now goes on from its vector to TRACK_TOL of lambda_max."""
    measured, _, _ = _tracked_under_a_larger_negative_eigenvalue()
    assert measured.residual <= TRACK_TOL and measured.hvps < 200
    assert measured.lambda_max == pytest.approx(1.0, rel=TRACK_TOL)


def test_a_loss_module_with_dropout_is_in_eval_mode_where_the_held_out_data_is_measured(
    tmp_path,
):
    """A user's loss class with a dropout stayed in training mode for the test split: the test
    loss was a random draw (1.0422 for the eval-mode loss's 1.0441), and the held-out check at
    each checkpoint drew random numbers, so --checkpoint-every changed the training."""
    (tmp_path / "drop.py").write_text(
        "import torch\n"
        "class DropLoss(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.drop = torch.nn.Dropout(0.5)\n"
        "    def forward(self, out, y):\n"
        "        return torch.nn.functional.cross_entropy(self.drop(out), y)\n"
    )
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 16)).astype(np.float32), rng.integers(0, 3, 96)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:48], y_test=y[:48])
    common = dict(
        data=str(tmp_path / "d.npz"),
        loss=f"{tmp_path}/drop.py:DropLoss",
        optimizer="sgd",
        epochs=2,
        track_every=0,
    )
    every = train(config(tmp_path, "every", checkpoint_every=1, **common))
    final = train(config(tmp_path, "final", checkpoint_every=0, **common))
    assert_same_weights(every.checkpoint, final.checkpoint)
    model = build_model("mlp", input_shape=(16,), num_classes=3, kwargs={"hidden": [8]})
    model.load_state_dict(weights(every.checkpoint))
    with torch.no_grad():
        expected = F.cross_entropy(model(torch.tensor(x[:48])), torch.tensor(y[:48]))
    test_loss = read_metrics(tmp_path / "every" / "metrics.h5")["epochs"]["test_loss"][-1]
    assert test_loss == pytest.approx(float(expected), rel=1e-6)


def test_under_torchrun_each_rank_evaluates_its_share_of_the_test_batches(monkeypatch):
    """Every rank evaluated the whole test split at each epoch's end (the work of one process
    repeated on each); now each takes every world-th batch, and the ranks' sums, added, are one
    process's to the bit, so the test loss and accuracy are too."""
    from eigensam import tracking

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    batches = [(torch.randn(5, 3), torch.randint(0, 4, (5,))) for _ in range(5)]
    ran, rows = [], []
    model.register_forward_hook(lambda *_: ran.append(1))
    # the sums each rank gives the all-reduce, kept to be added here
    monkeypatch.setattr(tracking.distributed, "all_reduce_sum", lambda t: rows.append(t.clone()))

    def sums(rank: int, world: int) -> tuple[int, torch.Tensor]:
        ran.clear()
        monkeypatch.setattr(tracking.distributed, "world", lambda: (rank, world))
        tracking.evaluate(model, batches, F.cross_entropy, torch.device("cpu"), classify=True)
        return len(ran), rows.pop()

    one, alone = sums(0, 1)
    shares = [sums(rank, 2) for rank in (0, 1)]
    assert one == 5 and [n for n, _ in shares] == [3, 2]
    assert torch.equal(shares[0][1] + shares[1][1], alone)


@pytest.mark.parametrize(
    ("loss", "threshold"),
    [("bce", 0.0), ("mse", 0.5), ("torch.nn:BCEWithLogitsLoss", 0.0)],
)
def test_a_binary_classifier_of_one_output_has_its_accuracy(tmp_path, loss, threshold):
    """A model of one output on 0/1 labels (binary cross-entropy on its logit, or mse onto the
    labels) had no accuracy, train's or test's, where the same data with two outputs had one:
    label 1 is an output above 0 (a logit), or above 0.5 for mse. torch's BCEWithLogitsLoss
    takes the (batch,) integer labels too (it refused their shape)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 16)).astype(np.float32)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "binary.npz", x=x[:96], y=y[:96], x_test=x[96:], y_test=y[96:])
    (tmp_path / "losses.py").write_text(
        "import torch.nn.functional as F\n"
        "def bce(out, y):\n"
        "    return F.binary_cross_entropy_with_logits(out[:, 0], y.to(out.dtype))\n"
    )
    spec = f"{tmp_path / 'losses.py'}:bce" if loss == "bce" else loss
    overrides = {"model_kwargs": {"hidden": [8], "num_classes": 1}, "optimizer": "sgd"}
    cfg = config(tmp_path, data=str(tmp_path / "binary.npz"), loss=spec, epochs=1, **overrides)
    train(cfg)
    metrics = read_metrics(tmp_path / "run" / "metrics.h5")
    assert np.isfinite(metrics["steps"]["accuracy"]).all()
    model = build_model("mlp", input_shape=(16,), num_classes=1, kwargs=cfg.model_kwargs)
    model.load_state_dict(weights(tmp_path / "run" / "checkpoints" / "final.pt"))
    with torch.no_grad():
        picked = (model(torch.from_numpy(x[96:]))[:, 0] > threshold).numpy()
    assert metrics["epochs"]["test_accuracy"][0] == (picked == y[96:]).mean()


def binary_data(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """128 samples of 16 features, 0/1 labels of a linear rule: 96 to train, 32 to test."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 16)).astype(np.float32)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "binary.npz", x=x[:96], y=y[:96], x_test=x[96:], y_test=y[96:])
    return x, y


def test_a_sigmoid_output_is_scored_as_a_probability(tmp_path):
    """A model ending in a Sigmoid, trained with binary cross-entropy on its probability, picks
    label 1 above 0.5: scored above 0, as a logit, every output picked 1 and the accuracy was
    the share of label 1 at every epoch."""
    x, y = binary_data(tmp_path)
    (tmp_path / "user.py").write_text(
        "import torch.nn.functional as F\n"
        "from torch import nn\n"
        "def model():\n"
        "    return nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1), nn.Sigmoid())\n"
        "def bce(out, y):\n"
        "    return F.binary_cross_entropy(out[:, 0], y.to(out.dtype))\n"
    )
    user = tmp_path / "user.py"
    cfg = config(
        tmp_path,
        model=f"{user}:model",
        model_kwargs=None,
        data=str(tmp_path / "binary.npz"),
        loss=f"{user}:bce",
        optimizer="sgd",
        epochs=2,
    )
    train(cfg)
    metrics = read_metrics(tmp_path / "run" / "metrics.h5")
    model = build_model(f"{user}:model", input_shape=(16,), num_classes=2)
    model.load_state_dict(weights(tmp_path / "run" / "checkpoints" / "final.pt"))
    with torch.no_grad():
        p = model(torch.from_numpy(x[96:]))[:, 0].numpy()
    assert 0 < p.min() and p.max() < 1  # probabilities, none of them above 0 alone
    right = ((p > 0.5) == y[96:]).mean()
    assert metrics["epochs"]["test_accuracy"][-1] == right != y[96:].mean()


@pytest.mark.parametrize(
    ("loss", "threshold"),
    [
        (lambda out, y: F.binary_cross_entropy_with_logits(out[:, 0], y.float()), 0.0),
        (lambda out, y: F.binary_cross_entropy(out[:, 0].sigmoid(), y.float()), 0.0),
        (lambda out, y: F.binary_cross_entropy(out[:, 0].clamp(1e-6, 1 - 1e-6), y.float()), 0.5),
        (lambda out, y: F.mse_loss(out[:, 0], y.float()), 0.5),
        (lambda out, y: (1 - (2 * y - 1) * out[:, 0]).clamp(min=0).mean(), 0.0),  # a hinge
        (  # pos_weight: the labels weighed unequally, a logit all the same
            lambda out, y: F.binary_cross_entropy_with_logits(
                out[:, 0], y.float(), pos_weight=torch.tensor(3.0)
            ),
            0.0,
        ),
        # infinite for both labels at 0: no middle there
        (lambda out, y: (out[:, 0] ** -2 + (out[:, 0] - y.float()) ** 2).mean(), 0.5),
        (  # probabilities weighed unequally: no output weighs both labels alike
            lambda out, y: F.binary_cross_entropy(out[:, 0], y.float(), weight=1 + 2 * y),
            math.nan,
        ),
    ],
)
def test_the_binary_threshold_is_where_the_loss_weighs_both_labels_alike(loss, threshold):
    """What a binary classifier's one output is scored against follows from its loss: 0 for a
    logit, 0.5 for a probability or a regression onto 0/1, None (no accuracy) where it is not
    known (NaN: no accuracy)."""
    from eigensam.tracking import binary_threshold, correct_count

    model = torch.nn.Linear(4, 1)
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    cpu = torch.device("cpu")
    found = binary_threshold(model, loss, batch, cpu, num_classes=2)
    assert found == threshold or math.isnan(found) and math.isnan(threshold)
    assert binary_threshold(model, loss, batch, cpu, num_classes=3) is None
    counted = correct_count(model(batch[0]), batch[1], classify=True, threshold=found)
    assert counted == ((0, 0) if math.isnan(threshold) else (counted[0], 8))
