"""Checkpoint loading is safe, tolerant of common layouts, and explains what does not fit."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hessian_cli.errors import UserError
from hessian_cli.specs import (
    CHECKPOINT_FORMAT,
    apply_weights,
    checkpoint_order_key,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


DEEPSPEED_STATES = "mp_rank_00_model_states.pt"


def small_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in small_model().state_dict().items()}


class MakeDir:
    """A hostile pickle payload: unpickling it creates a directory."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.mark.parametrize("zip_format", [True, False])
def test_bare_state_dict_both_torch_formats(tmp_path: Path, zip_format: bool) -> None:
    state = small_state()
    path = tmp_path / "bare.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    ckpt = load_checkpoint(path)
    assert ckpt.format == ("torch-zip" if zip_format else "torch-legacy")
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ckpt.metadata == {}
    assert set(ckpt.state_dict) == set(state)
    assert all(torch.equal(ckpt.state_dict[k], state[k]) for k in state)


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_legacy_torch_file_of_a_newer_pickle_protocol_is_not_taken_for_a_plain_pickle(
    tmp_path: Path, protocol: int
) -> None:
    """Its magic number follows a frame header; safe loading cannot read the frame, so it needs
    trust, and then loads as torch's (it was called a plain pickle and failed)."""
    state = small_state()
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    with pytest.raises(UserError, match=f"protocol {protocol}, whose framing torch's safe"):
        load_checkpoint(path)
    ckpt = load_checkpoint(path, trust=True)
    assert ckpt.format == "torch-legacy"
    assert all(torch.equal(ckpt.state_dict[k], state[k]) for k in state)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "net"])
def test_nested_state_dicts(tmp_path: Path, key: str) -> None:
    state = small_state()
    path = tmp_path / "nested.pt"
    torch.save({key: state, "epoch": 4, "optimizer": {"lr": 0.1}}, path)
    ckpt = load_checkpoint(path)
    assert set(ckpt.state_dict) == set(state)
    assert ckpt.raw["epoch"] == 4 and ckpt.raw["optimizer"] == {"lr": 0.1}


def test_the_one_state_dict_beside_a_model_configuration_is_the_weights(tmp_path: Path) -> None:
    """{"model": config, "weights": state_dict}: the usual key "model" was looked in alone,
    and the file refused for its entry 'name' being a str (--weights-key asked for)."""
    state = small_state()
    config = {"name": "resnet", "depth": 20, "widths": {"stage": [16, 32]}}
    torch.save({"model": config, "weights": state, "epoch": 3}, tmp_path / "config.pt")
    assert _equal(_loaded(tmp_path / "config.pt"), state)


def test_prefixes_are_stripped_repeatedly(tmp_path: Path) -> None:
    state = small_state()
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module._orig_mod.module.{k}": v for k, v in state.items()}}, path)
    assert set(load_checkpoint(path).state_dict) == set(state)


def test_prefix_kept_when_not_every_key_has_it(tmp_path: Path) -> None:
    path = tmp_path / "partial.pt"
    torch.save({"module.w": torch.ones(1), "head.w": torch.ones(1)}, path)
    assert set(load_checkpoint(path).state_dict) == {"module.w", "head.w"}


def test_a_model_whose_own_names_carry_the_prefix_loads_its_weights(tmp_path: Path) -> None:
    class Wrapper(nn.Module):  # as nn.DataParallel names its model: every key "module.*"
        def __init__(self) -> None:
            super().__init__()
            self.module = small_model()

    saved = Wrapper()
    with torch.no_grad():
        saved.module[0].weight.add_(1.0)
    path = tmp_path / "wrapper.pt"
    torch.save(saved.state_dict(), path)
    model = Wrapper()
    apply_weights(model, load_checkpoint(path).state_dict)  # loading stripped "module."
    assert torch.equal(model.module[0].weight, saved.module[0].weight)


def test_safetensors_with_header_metadata(tmp_path: Path) -> None:
    state = small_state()
    path = tmp_path / "weights.safetensors"
    meta = {"model": "mlp", "step": 7}
    save_file(
        {f"module.{k}": v for k, v in state.items()},
        str(path),
        metadata={"hessian_cli": json.dumps(meta)},
    )
    ckpt = load_checkpoint(path)
    assert ckpt.format == "safetensors"
    assert ckpt.metadata == meta
    assert all(torch.equal(ckpt.state_dict[k], state[k]) for k in state)


def test_save_checkpoint_round_trip_loads_weights_only(tmp_path: Path) -> None:
    state = small_state()
    meta = {"model": "mlp", "model_kwargs": "{}", "step": 120, "epoch": 3, "input_shape": [1, 8, 8]}
    opt = torch.optim.SGD(small_model().parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "run" / "ckpt.pt"
    save_checkpoint(path, state_dict=state, metadata=meta, extra={"optimizer": opt.state_dict()})
    plain = torch.load(path, map_location="cpu", weights_only=True)
    assert plain["format"] == CHECKPOINT_FORMAT and plain["version"] == 1
    ckpt = load_checkpoint(path)
    assert ckpt.metadata == meta
    assert ckpt.raw["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert all(torch.equal(ckpt.state_dict[k], state[k]) for k in state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no temp files left


class OnAnotherDevice(torch.Tensor):
    """A tensor that says it lies on a GPU, to follow the CPU copies a checkpoint makes of one."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)

    def cpu(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).clone()


def test_save_checkpoint_writes_tensors_of_a_gpu_on_the_cpu(tmp_path: Path) -> None:
    """A run trained on a GPU saved CUDA tensors, which a plain torch.load refuses on a machine
    without one; a view saved twice (tied weights) is copied once."""
    weight = torch.randn(3, 4).as_subclass(OnAnotherDevice)
    momentum = torch.randn(3, 4).as_subclass(OnAnotherDevice)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(
        path,
        state_dict={"embed": weight, "head": weight, "bias": torch.zeros(3)},
        metadata={"step": 1},
        extra={"optimizer": {"state": {0: {"momentum_buffer": momentum}}, "groups": [momentum]}},
    )
    plain = torch.load(path, weights_only=True)
    model, state = plain["model"], plain["optimizer"]
    tensors = [*model.values(), state["state"][0]["momentum_buffer"], *state["groups"]]
    assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors)
    assert torch.equal(model["embed"], weight.as_subclass(torch.Tensor))
    assert model["embed"].data_ptr() == model["head"].data_ptr()  # one copy, stored once
    assert state["groups"][0].data_ptr() == state["state"][0]["momentum_buffer"].data_ptr()


def test_save_checkpoint_safetensors_round_trip(tmp_path: Path) -> None:
    state = small_state()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, state_dict=state, metadata={"step": 5, "model": "cnn"})
    ckpt = load_checkpoint(path)
    assert ckpt.format == "safetensors" and ckpt.metadata == {"step": 5, "model": "cnn"}
    assert all(torch.equal(ckpt.state_dict[k], state[k]) for k in state)


def test_save_checkpoint_refuses_unsafe_content_and_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, state_dict=small_state(), metadata={"step": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="object"):
        save_checkpoint(path, state_dict=small_state(), metadata={"step": object()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.parametrize("zip_format", [True, False])
def test_hostile_pickle_never_runs_without_trust(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pt"
    torch.save(
        {"state_dict": small_state(), "payload": MakeDir(marker)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    assert "arbitrary code execution" in str(info.value)
    assert "--trust-checkpoint" in str(info.value)
    assert not marker.exists()
    # The same file with trust does run the payload: the check above can fail.
    ckpt = load_checkpoint(path, trust=True)
    assert marker.is_dir()
    assert set(ckpt.state_dict) == set(small_state())


@pytest.mark.parametrize("as_arrays", [False, True])
def test_a_plain_pickle_loads_only_with_trust(tmp_path: Path, as_arrays: bool) -> None:
    """pickle.dump files (tensors, or NumPy arrays from outside torch) cannot be read by
    torch.load; unpickling runs code, so only a trusted one is read."""
    state = small_state()
    marker = tmp_path / "pwned"
    content = {k: v.numpy() if as_arrays else v for k, v in state.items()}
    path = tmp_path / "plain.pkl"
    with path.open("wb") as fh:
        pickle.dump({"model": content, "payload": MakeDir(marker)}, fh)
    with pytest.raises(UserError, match="is a plain pickle.*--trust-checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    ckpt = load_checkpoint(path, trust=True)
    assert marker.is_dir() and ckpt.format == "pickle"
    assert set(ckpt.state_dict) == set(state)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in state.items())
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(UserError, match="corrupt or truncated pickle"):
        load_checkpoint(path, trust=True)


def test_custom_class_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(small_model(), path)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(path)
    assert set(load_checkpoint(path, trust=True).state_dict) == set(small_state())


@pytest.mark.parametrize("whole", [True, False])
def test_a_lazy_modules_uninitialized_weights_are_refused(tmp_path: Path, whole: bool) -> None:
    """A trusted checkpoint of a model with lazy modules saved before its first forward (the
    model, or its state dict) ended analyze in torch's words as an unexpected ValueError or
    RuntimeError."""
    model = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 2))
    path = tmp_path / "lazy.pt"
    torch.save(model if whole else model.state_dict(), path)
    with pytest.raises(UserError, match="holds '0.weight' uninitialized, a lazy module's"):
        load_checkpoint(path, trust=True)


def test_a_torchscript_archive_is_named_and_read_only_with_trust(tmp_path: Path) -> None:
    """torch.jit.save's archives were refused as 'corrupt, truncated or not a torch file'."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(small_model()), str(path))
    with pytest.raises(UserError, match="TorchScript archive.*--trust-checkpoint"):
        load_checkpoint(path)
    state = load_checkpoint(path, trust=True).state_dict
    assert all(torch.equal(state[k], v) for k, v in small_state().items())


def test_a_zip_that_is_no_torch_file_is_named_without_asking_for_trust(tmp_path: Path) -> None:
    """An empty zip archive was told to pass --trust-checkpoint (and with it was 'corrupt or not
    a torch file'); a truncated torch file 'not a torch, safetensors or pickle file'."""
    with zipfile.ZipFile(tmp_path / "empty.pt", "w"):
        pass
    with (tmp_path / "arrays.pt").open("wb") as fh:  # weights saved by NumPy
        np.savez(fh, w=np.ones(3))
    for name in ("empty.pt", "arrays.pt"):
        for trust in (False, True):
            with pytest.raises(UserError, match="zip archive without torch's data.pkl") as info:
                load_checkpoint(tmp_path / name, trust=trust)
            assert "--trust-checkpoint" not in str(info.value)
    torch.save(small_state(), tmp_path / "good.pt")
    cut = (tmp_path / "good.pt").read_bytes()[:-100]
    (tmp_path / "cut.pt").write_bytes(cut)
    with pytest.raises(UserError, match="truncated or damaged zip archive"):
        load_checkpoint(tmp_path / "cut.pt")


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(small_state(), good)
    cases = {
        "truncated.pt": good.read_bytes()[: good.stat().st_size // 2],
        "garbage.pkl": b"this is not a checkpoint" * 20,
        "empty.pth": b"",
        "bad.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
    }
    legacy = tmp_path / "legacy.pt"
    torch.save(small_state(), legacy, _use_new_zipfile_serialization=False)
    cases["truncated_legacy.pt"] = legacy.read_bytes()[:-40]
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(UserError, match=name):
            load_checkpoint(tmp_path / name)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="directory"):
        load_checkpoint(tmp_path)


def test_non_tensor_content_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(UserError, match="list"):
        load_checkpoint(path)
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(UserError, match="no state dict.*'epoch'"):
        load_checkpoint(path)


def test_apply_weights_loads_values() -> None:
    state = small_state()
    state["0.weight"] = torch.full_like(state["0.weight"], 0.5)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    apply_weights(model, state)
    assert torch.equal(model[0].weight, state["0.weight"])


def test_apply_weights_tolerates_missing_batchnorm_counter() -> None:
    state = {k: v for k, v in small_state().items() if not k.endswith("num_batches_tracked")}
    model = small_model()
    apply_weights(model, state)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert int(loaded["1.num_batches_tracked"]) == 0  # left as the model had it


def test_apply_weights_takes_a_batchnorm_counter_stored_as_a_float() -> None:
    """A step count that a converter made a float was refused as a dtype mismatch
    (model int64 vs checkpoint float32); it is a counter, taken as the integer it holds."""
    state = small_state()
    state["1.num_batches_tracked"] = torch.tensor(1234.0)
    model = small_model()
    apply_weights(model, state)
    counter = model.state_dict()["1.num_batches_tracked"]
    assert counter.dtype == torch.int64 and int(counter) == 1234


def test_apply_weights_drops_a_saved_copy_of_a_buffer_the_model_does_not_save() -> None:
    """Older Hugging Face models saved position_ids, which newer ones keep out of their state
    dict: the checkpoint was refused for '1 unexpected key (position_ids)'."""
    model = small_model()
    model.register_buffer("position_ids", torch.arange(4)[None], persistent=False)
    state = small_state()
    for saved in (
        {**state, "position_ids": torch.arange(4)[None]},
        {f"model.{k}": v for k, v in {**state, "position_ids": torch.arange(4)[None]}.items()},
    ):
        model[0].weight.data.zero_()
        apply_weights(model, saved)
        assert torch.equal(model[0].weight, state["0.weight"])
    # Other values than the model's own are not dropped unsaid.
    with pytest.raises(UserError, match=r"1 unexpected key \(position_ids\)"):
        apply_weights(model, {**state, "position_ids": torch.arange(1, 5)[None]})


def test_apply_weights_names_missing_unexpected_and_shapes() -> None:
    state = small_state()
    del state["2.bias"]
    state["extra.weight"] = torch.ones(1)
    state["0.weight"] = torch.ones(5, 4)
    with pytest.raises(UserError) as info:
        apply_weights(small_model(), state)
    message = str(info.value)
    assert "1 missing key (2.bias)" in message
    assert "1 unexpected key (extra.weight)" in message
    assert "0.weight (model (3, 4) vs checkpoint (5, 4))" in message
    assert "\n" not in message


def test_apply_weights_lists_first_keys_with_counts() -> None:
    wrong = {f"layer{i}.weight": torch.ones(1) for i in range(9)}
    with pytest.raises(
        UserError, match=r"8 missing keys .*9 unexpected keys \(layer0.weight.*4 more"
    ):
        apply_weights(small_model(), wrong)


def test_apply_weights_refuses_non_finite() -> None:
    state = small_state()
    state["2.weight"][0, 0] = float("nan")
    with pytest.raises(UserError, match="'2.weight'"):
        apply_weights(small_model(), state)
    state = small_state()
    state["1.running_var"][1] = float("inf")
    with pytest.raises(UserError, match="1.running_var"):
        apply_weights(small_model(), state)


def test_apply_weights_refuses_values_that_loading_would_change() -> None:
    state = small_state()
    state["0.weight"] = state["0.weight"].round().long()  # integers into a float weight
    state["2.bias"] = torch.complex(state["2.bias"], state["2.bias"])  # imaginary parts dropped
    with pytest.raises(UserError, match=r"2 mismatches") as info:
        apply_weights(small_model(), state)
    assert "0.weight (model float32 vs checkpoint int64)" in str(info.value)
    assert "2.bias (model float32 vs checkpoint complex64)" in str(info.value)
    state = small_state()
    state["0.weight"] = state["0.weight"].half()  # another precision: only rounding
    apply_weights(small_model(), state)


def test_apply_weights_checks_every_float_format_for_non_finite_values() -> None:
    for convert in (lambda t: t.to(torch.float8_e4m3fn), lambda t: t.to(torch.bfloat16)):
        state = small_state()
        state["2.weight"][0, 0] = float("nan")  # float8_e4m3fn has no inf
        state["2.weight"] = convert(state["2.weight"])
        with pytest.raises(UserError, match="non-finite values .*'2.weight'"):
            apply_weights(small_model(), state)


def test_apply_weights_refuses_two_values_for_tied_weights() -> None:
    def tied() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
        model[1].weight = model[0].weight
        return model

    state = {k: v.clone() for k, v in tied().state_dict().items()}
    apply_weights(tied(), state)  # one value under both names: fine
    state["1.weight"] += 1.0
    with pytest.raises(UserError, match="different values for 0.weight, 1.weight"):
        apply_weights(tied(), state)


def test_a_name_with_a_superscript_digit_is_listed_not_a_crash(tmp_path: Path) -> None:
    """A "²" is a digit to str.isdigit but not to int(): listing a folder holding step1².pt
    raised a ValueError from the natural sort."""
    for name in ["step1².pt", "step2.pt", "step10.pt"]:
        torch.save(small_state(), tmp_path / name)
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step1².pt", "step2.pt", "step10.pt"]


def test_order_key_prefers_metadata_then_natural_names(tmp_path: Path) -> None:
    for step, name in [(300, "a.pt"), (20, "z.pt"), (100, "m.pt")]:
        save_checkpoint(
            tmp_path / name, state_dict=small_state(), metadata={"step": step, "epoch": 1}
        )
    loaded = sorted(
        (load_checkpoint(p) for p in list_checkpoints(tmp_path)), key=checkpoint_order_key
    )
    assert [c.metadata["step"] for c in loaded] == [20, 100, 300]
    names = tmp_path / "names"
    names.mkdir()
    for name in ["ckpt10.pt", "ckpt2.pt", "ckpt1.pth", ".ckpt3.pt.tmp", "notes.txt", "final.pkl"]:
        torch.save(small_state(), names / name)
    found = list_checkpoints(names)
    assert [p.name for p in found] == ["ckpt1.pth", "ckpt2.pt", "ckpt10.pt", "final.pkl"]
    ordered = sorted((load_checkpoint(p) for p in found), key=checkpoint_order_key)
    assert [c.path.name for c in ordered] == ["ckpt1.pth", "ckpt2.pt", "ckpt10.pt", "final.pkl"]
    # Without steps, a run's start and end by name: init.pt came after final.pt and ckpt10.pt.
    torch.save(small_state(), names / "init.pt")
    save_checkpoint(names / "ckpt5.pt", state_dict=small_state(), metadata={"step": 5})
    ordered = sorted(
        (load_checkpoint(p) for p in list_checkpoints(names)), key=checkpoint_order_key
    )
    assert [c.path.name for c in ordered] == [
        "init.pt",
        "ckpt5.pt",  # its recorded step before the names
        "ckpt1.pth",
        "ckpt2.pt",
        "ckpt10.pt",
        "final.pkl",
    ]
    with pytest.raises(UserError, match="not a directory"):
        list_checkpoints(names / "ckpt2.pt")
    # A link that leads nowhere is listed (it was skipped silently), so that reading it fails.
    (names / "ckpt3.pt").symlink_to(tmp_path / "gone.pt")
    (names / "notes.md").symlink_to(tmp_path / "gone.md")
    assert "ckpt3.pt" in [p.name for p in list_checkpoints(names)]
    assert "notes.md" not in [p.name for p in list_checkpoints(names)]
    with pytest.raises(UserError, match="symbolic link that leads nowhere"):
        load_checkpoint(names / "ckpt3.pt")


def test_a_series_is_ordered_by_epoch_then_step_as_its_file(tmp_path: Path) -> None:
    """a.pt recording step 100 and b.pt epoch 1 alone were analysed [b, a] and stored [a, b]
    (test_storage's); a step counted within each epoch put epoch 2's step 10 before epoch 1's
    step 50."""
    for name, meta in [
        ("a.pt", {"step": 100}),
        ("e2.pt", {"epoch": 2, "step": 10}),
        ("b.pt", {"epoch": 1}),
        ("e1.pt", {"epoch": 1, "step": 50}),
    ]:
        save_checkpoint(tmp_path / name, state_dict=small_state(), metadata=meta)
    loaded = (load_checkpoint(p) for p in list_checkpoints(tmp_path))
    ordered = sorted(loaded, key=checkpoint_order_key)
    assert [c.name for c in ordered] == ["e1", "b", "e2", "a"]


def test_a_series_of_other_tools_is_read_whole_once_and_in_their_order(tmp_path: Path) -> None:
    """.pth.tar was skipped unsaid; Lightning's last.ckpt (a link to another) was a point of
    its own (then left out unsaid); their recorded epoch and step were ignored, so ``best`` sorted
    by name. Not .bin: Hugging Face's training_args.bin, a pickled object, stopped the series it sat
    in."""
    lightning = {"state_dict": small_state(), "pytorch-lightning_version": "2.4.0"}
    torch.save({**lightning, "epoch": 7, "global_step": 700}, tmp_path / "ckpt_best.ckpt")
    torch.save({**lightning, "epoch": 11, "global_step": 1100}, tmp_path / "ckpt_11.ckpt")
    torch.save({"state_dict": small_state(), "epoch": 2}, tmp_path / "checkpoint.pth.tar")
    torch.save(small_state(), tmp_path / "training_args.bin")
    (tmp_path / "last.ckpt").symlink_to(tmp_path / "ckpt_11.ckpt")
    (tmp_path / "elsewhere.ckpt").symlink_to(tmp_path.parent / "missing.ckpt")
    (tmp_path / "notes.tar").write_text("not a checkpoint")
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == [
        "checkpoint.pth.tar",
        "ckpt_11.ckpt",
        "ckpt_best.ckpt",
        "elsewhere.ckpt",  # leads nowhere: listed, so that reading it fails
        "last.ckpt",  # a link to another: listed, for analyze to name as left out
    ]
    found = [p for p in list_checkpoints(tmp_path) if not p.is_symlink()]
    ordered = sorted((load_checkpoint(p) for p in found), key=checkpoint_order_key)
    assert [(c.path.name, c.metadata) for c in ordered] == [
        ("checkpoint.pth.tar", {"epoch": 2}),  # epoch 2: before those of epochs 7, 11
        ("ckpt_best.ckpt", {"step": 700, "epoch": 7}),
        ("ckpt_11.ckpt", {"step": 1100, "epoch": 11}),
    ]
    # Named without the whole suffix (it was 'checkpoint.pth'), and messages name the file.
    assert (ordered[0].name, ordered[0].label) == ("checkpoint", "checkpoint.pth.tar")
    torch.save({"model": small_state(), "epoch": 3.5, "step": True}, tmp_path / "odd.pt")
    assert load_checkpoint(tmp_path / "odd.pt").metadata == {}  # not whole numbers
    odd = {"epoch": torch.tensor([1, 2]), "step": np.bool_(True), "iteration": torch.tensor(2.0)}
    torch.save({"model": small_state(), **odd}, tmp_path / "odd.pt")
    assert load_checkpoint(tmp_path / "odd.pt").metadata == {}


def test_a_series_counted_by_numpy_or_tensors_is_ordered_by_them(tmp_path: Path) -> None:
    """Scripts that count epochs with NumPy or keep them as tensors (``torch.tensor(epoch)``)
    left their series unordered: only a Python int was read, so ckpt_best came after ckpt_9."""
    counts = {
        "ckpt_9.pt": {"epoch": np.int64(9), "iter": torch.tensor(900)},
        "ckpt_best.pt": {"epoch": torch.tensor(4, dtype=torch.int32), "global_step": np.uint16(40)},
        "ckpt_10.pt": {"epoch": np.int32(10)},
    }
    for name, count in counts.items():
        torch.save({"state_dict": small_state(), **count}, tmp_path / name)
    loaded = (load_checkpoint(p) for p in list_checkpoints(tmp_path))
    ordered = sorted(loaded, key=checkpoint_order_key)
    assert [(c.path.name, c.metadata) for c in ordered] == [
        ("ckpt_best.pt", {"step": 40, "epoch": 4}),
        ("ckpt_9.pt", {"step": 900, "epoch": 9}),
        ("ckpt_10.pt", {"epoch": 10}),
    ]
    assert all(type(v) is int for c in ordered for v in c.metadata.values())  # JSON, HDF5
    # Read from their bytes, no code of NumPy's run: either byte order; a number whose bytes
    # do not fit its dtype, or of another kind, stands for itself unread.
    from hessian_cli.specs.checkpoints import NumPyValue, _numpy_scalar, _NumPyDtype

    def dtype(code: str, order: str) -> _NumPyDtype:
        d = _NumPyDtype(code, False, True)
        d.__setstate__((3, order, None, None, None, -1, -1, 0))
        return d

    assert _numpy_scalar(dtype("i4", ">"), (-7).to_bytes(4, "big", signed=True)) == -7
    assert _numpy_scalar(dtype("u1", "|"), bytes([200])) == 200
    for odd in [
        (dtype("i8", "<"), b"\x01\x02\x03"),
        (dtype("i1", "<"), b"\x01"),
        (dtype("f8", "<"), bytes(8)),
        (dtype("b1", "|"), b"\x01"),
        (NumPyValue(), bytes(8)),
        (dtype("i8", "<"), "12345678"),
    ]:
        assert isinstance(_numpy_scalar(*odd), NumPyValue)
    loaded = load_checkpoint(tmp_path / "ckpt_9.pt").raw
    assert loaded["epoch"] == 9 and type(loaded["epoch"]) is int


def test_a_series_of_th_files_is_read(tmp_path: Path) -> None:
    """akamaster/pytorch_resnet_cifar10's trainer saves .th files (as its published ResNets
    are named): a directory of them held "no checkpoint files"."""
    for epoch in (20, 100):
        saved = {"epoch": epoch, "state_dict": small_state(), "best_prec1": 91.7}
        torch.save(saved, tmp_path / f"checkpoint_{epoch}.th")
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["checkpoint_20.th", "checkpoint_100.th"]


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_weights_that_hold_no_dense_values_are_named(kind) -> None:
    """torch's "Error(s) in loading state_dict for Sequential:" was all the sentence said."""
    state = small_model().state_dict()
    weight = state["0.weight"]
    state["0.weight"] = weight.to_sparse() if kind == "sparse" else weight.to("meta")
    with pytest.raises(UserError, match=f"the checkpoint's '0.weight' is (a )?{kind}"):
        apply_weights(small_model(), state)


def _other_state(shift: float) -> dict[str, torch.Tensor]:
    return {k: v + shift if v.is_floating_point() else v for k, v in small_state().items()}


def _loaded(path: Path, **kwargs) -> dict[str, torch.Tensor]:
    model = small_model()
    apply_weights(model, load_checkpoint(path, **kwargs).state_dict)
    return model.state_dict()


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_layouts_of_other_tools_load_their_weights(tmp_path: Path) -> None:
    """Each was refused with a list of keys, or a sentence calling its weights no state dict."""
    trained = _other_state(0.5)

    def under(head: str) -> dict[str, torch.Tensor]:
        return {f"{head}.{k}": v for k, v in trained.items()}

    layouts = {
        "lightning.ckpt": {"state_dict": under("model"), "epoch": 3, "global_step": 30},
        "compiled.ckpt": {"state_dict": under("net._orig_mod"), "loss_weights": {}},
        "with_a_criterion.ckpt": {
            "state_dict": {**under("model"), "criterion.weight": torch.ones(2)}
        },
        "deepspeed.pt": {"module": trained, "buffer_names": [], "global_steps": 5},
        "meta_then_model.pt": {"state_dict": {"lr": 0.1}, "model": trained},
        "thop.pt": {**trained, "total_ops": torch.zeros(1), "0.total_params": torch.zeros(1)},
        "swa.pt": {**{f"module.{k}": v for k, v in trained.items()}, "n_averaged": torch.tensor(3)},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        assert _equal(_loaded(tmp_path / name), trained), name
    # DeepSpeed's step count orders a series and goes with the results (it was left unread).
    assert load_checkpoint(tmp_path / "deepspeed.pt").metadata == {"step": 5}

    # A weight the model ties to another, stored once (safetensors.torch.save_model).
    def tied() -> nn.Module:
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
        model[1].weight = model[0].weight
        return model

    state = {k: v + 1 for k, v in tied().state_dict().items() if k != "1.weight"}
    model = tied()
    apply_weights(model, state)
    assert torch.equal(model[1].weight, state["0.weight"])


def test_weights_under_several_names_fit_a_model_by_their_shapes_too(tmp_path: Path) -> None:
    # An MLP's two Linear layers under '1.' and '3.' both have a Linear's names: they were
    # said to "each fit" a Linear(64, 10) whose shapes neither has.
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(UserError, match="missing key") as refused:
        apply_weights(nn.Linear(64, 10), mlp.state_dict())
    assert "each fit" not in str(refused.value)
    # The one of the model's shapes is the one taken, as a single head that fits is.
    model = nn.Linear(32, 10)
    assert apply_weights(model, mlp.state_dict()) == "3"
    assert torch.equal(model.weight, mlp[3].weight)


def test_a_file_of_several_weight_sets_is_read_for_the_one_asked(tmp_path: Path) -> None:
    trained, ema = _other_state(0.5), _other_state(-0.25)
    path = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": trained, "state_dict_ema": ema, "epoch": 9}, path)
    assert _equal(_loaded(path), trained)  # the trained weights unless told
    assert _equal(_loaded(path, weights_key="state_dict_ema"), ema)
    assert load_checkpoint(path, weights_key="state_dict_ema").weights_key == "state_dict_ema"
    # Two usual entries that differ: it took one of them unsaid.
    torch.save({"model": trained, "state_dict": ema}, path)
    with pytest.raises(UserError, match="different weights under 'state_dict' and 'model'"):
        load_checkpoint(path)
    assert _equal(_loaded(path, weights_key="model"), trained)
    # Keys under two leading names that both fit (a LightningModule with an EMA copy).
    both = {
        **{f"model.{k}": v for k, v in trained.items()},
        **{f"ema.{k}": v for k, v in ema.items()},
    }
    torch.save({"state_dict": both}, path)
    with pytest.raises(
        UserError, match=r"under 'ema\.' and 'model\.' each fit: pick one with --weights-key"
    ):
        _loaded(path)
    assert _equal(_loaded(path, weights_key="ema"), ema)
    save_file(both, tmp_path / "both.safetensors")
    assert _equal(_loaded(tmp_path / "both.safetensors", weights_key="model"), trained)
    with pytest.raises(UserError, match="no entry 'emma' .* and no weights named 'emma.\\*'"):
        load_checkpoint(path, weights_key="emma")
    # Weights where no usual entry is: named, and how to point at them.
    torch.save({"network": trained, "ema": ema, "args": {"lr": 0.1}}, path)
    with pytest.raises(UserError, match="entry 'network' is a dict; .*with --weights-key"):
        load_checkpoint(path)
    assert _equal(_loaded(path, weights_key="network"), trained)


def test_what_training_scripts_save_beside_weights_loads_without_trust(tmp_path: Path) -> None:
    """timm's argparse.Namespace and a path: each needed --trust-checkpoint, the flag that lets a
    file run code; so did a NumPy number or array beside the weights (a best accuracy, an RNG
    state), which loads as a placeholder (a whole number as an int), no code of NumPy's run (a
    dtype's state is not checked: a crafted number crashed the process). Weights that are NumPy
    arrays still need the flag, and trusted, they are tensors (they were refused)."""
    import argparse

    import numpy as np

    extras = {"args": argparse.Namespace(model="resnet20", lr=0.1), "log_dir": Path("/runs/1")}
    torch.save({"state_dict": small_state(), **extras}, tmp_path / "timm.pth.tar")
    loaded = load_checkpoint(tmp_path / "timm.pth.tar")
    assert loaded.raw["args"].model == "resnet20" and loaded.raw["log_dir"] == Path("/runs/1")
    numbers = {"best_acc1": np.float64(0.9), "rng": np.random.get_state(), "top": [np.int64(1)]}
    torch.save({"state_dict": small_state(), **numbers, "epoch": 3}, tmp_path / "n.pt")
    loaded = load_checkpoint(tmp_path / "n.pt")
    assert _equal(loaded.state_dict, small_state()) and loaded.metadata == {"epoch": 3}
    assert repr(loaded.raw["best_acc1"]) == "<a NumPy value, not read>" and loaded.raw["top"] == [1]
    arrays = {k: v.numpy() for k, v in small_state().items()}
    torch.save(arrays, tmp_path / "numpy.pt")
    with pytest.raises(UserError, match="weights as NumPy arrays, .*pass --trust-checkpoint only"):
        load_checkpoint(tmp_path / "numpy.pt")
    torch.save({"model": arrays, "epoch": 3}, tmp_path / "numpy.pt")
    with pytest.raises(UserError, match="holds its weights as NumPy arrays, which safe loading"):
        load_checkpoint(tmp_path / "numpy.pt")
    # Another reason for no weights is still told as itself, beside a NumPy number.
    torch.save(
        {"state_dict": small_state(), "model": _other_state(0.5), **numbers}, tmp_path / "n.pt"
    )
    with pytest.raises(UserError, match="holds different weights under 'state_dict' and 'model'"):
        load_checkpoint(tmp_path / "n.pt")
    assert _equal(_loaded(tmp_path / "numpy.pt", trust=True), small_state())
    # Code is still refused, and a whole model whose classes cannot be imported is named so.
    torch.save(
        {"state_dict": small_state(), "hook": MakeDir(tmp_path / "pwned")}, tmp_path / "h.pt"
    )
    with pytest.raises(UserError, match="needs arbitrary code execution"):
        load_checkpoint(tmp_path / "h.pt")
    assert not (tmp_path / "pwned").exists()
    module = tmp_path / "gone_module.py"
    module.write_text("import torch.nn as nn\nclass Net(nn.Linear):\n    pass\n")
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import gone_module; "
        "torch.save(gone_module.Net(4, 3), sys.argv[2])"
    )
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(tmp_path / "whole.pt")], check=True
    )
    module.unlink()
    with pytest.raises(UserError, match="pickles code that cannot be imported here .*gone_module"):
        load_checkpoint(tmp_path / "whole.pt", trust=True)


def test_a_pickle_protocol_safe_loading_cannot_read_is_named(tmp_path: Path) -> None:
    """torch's weights_only unpickler stops at protocol 4's frames: "corrupt" was the guess (the
    legacy format's test is above)."""
    path = tmp_path / "p4.pt"
    torch.save(small_state(), path, pickle_protocol=4)
    with pytest.raises(UserError, match="saved with pickle protocol 4, whose framing"):
        load_checkpoint(path)
    assert _equal(_loaded(path, trust=True), small_state())


def test_whole_models_under_usual_and_other_entries_load_the_usual_one(tmp_path: Path) -> None:
    """{"model": nn.Module, "ema": nn.Module} (trusted): the model's, as before the layouts of
    other tools were read (the usual entry was then passed over for holding no dict)."""
    trained, ema = small_model(), small_model()
    trained.load_state_dict(_other_state(0.5))
    ema.load_state_dict(_other_state(-0.25))
    torch.save({"model": trained, "ema": ema}, tmp_path / "modules.pt")
    assert _equal(_loaded(tmp_path / "modules.pt", trust=True), _other_state(0.5))
    assert _equal(
        _loaded(tmp_path / "modules.pt", trust=True, weights_key="ema"), _other_state(-0.25)
    )


def test_a_file_of_shared_dicts_is_read_once_per_dict(tmp_path: Path) -> None:
    """Dicts that each hold the next twice: converting them copied 2**depth of them (a 1 KB
    file took 5.7 s and 618 MiB at depth 20, and depth 40 never ended)."""
    from hessian_cli.specs.checkpoints import _arrays_as_tensors

    inner: dict = {"w": torch.ones(1)}
    for _ in range(40):
        inner = {"a": inner, "b": inner}
    torch.save({"nested": inner}, tmp_path / "dag.pt")
    with pytest.raises(UserError, match="holds no state dict of tensors"):
        load_checkpoint(tmp_path / "dag.pt")
    converted = _arrays_as_tensors({"a": inner, "b": inner})
    assert converted["a"] is converted["b"]


def test_two_usual_entries_of_one_weight_set_are_not_told_apart(tmp_path: Path) -> None:
    """The same state dict under both (NaN in it) was "different weights"; meta tensors there
    ended in NotImplementedError; each is named as what it is again."""
    state = small_state()
    state["0.weight"][0, 0] = float("nan")
    torch.save({"state_dict": state, "model": state}, tmp_path / "nan.pt")
    with pytest.raises(UserError, match="non-finite values"):
        _loaded(tmp_path / "nan.pt")
    meta = {k: torch.empty_like(v, device="meta") for k, v in small_state().items()}
    copy = {k: torch.empty_like(v, device="meta") for k, v in small_state().items()}
    with pytest.raises(UserError, match="is a meta tensor"):
        apply_weights(small_model(), _state_in_file({"state_dict": meta, "model": copy}))
    # float8 has no comparisons: two different sets were taken for one (the first, unsaid).
    low = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in state.items()}
    other = {k: v + 1 if v.is_floating_point() else v for k, v in small_state().items()}
    high = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in other.items()}
    with pytest.raises(UserError, match="holds different weights under"):
        _state_in_file({"state_dict": low, "model": high})


def _state_in_file(obj: dict) -> dict[str, torch.Tensor]:
    from hessian_cli.specs.checkpoints import _unwrap

    return _unwrap(obj, Path("x.pt"))[0]


def test_the_models_own_names_beside_a_copy_under_a_leading_name_are_its_own(
    tmp_path: Path,
) -> None:
    """A module holding its EMA as `model_ema`: the copy, the one leading name that fit, was
    taken unsaid, though the file's own names were the model's."""
    trained, ema = _other_state(0.5), _other_state(-0.25)
    both = {**trained, **{f"model_ema.{k}": v for k, v in ema.items()}}
    torch.save({"state_dict": both}, tmp_path / "own.ckpt")
    model = small_model()
    assert apply_weights(model, load_checkpoint(tmp_path / "own.ckpt").state_dict) is None
    assert _equal(model.state_dict(), trained)
    assert _equal(_loaded(tmp_path / "own.ckpt", weights_key="model_ema"), ema)
    # Names beside the model's that are no copy of it are still unexpected.
    torch.save({"state_dict": {**trained, "other.weight": torch.ones(2)}}, tmp_path / "x.ckpt")
    with pytest.raises(UserError, match=r"1 unexpected key \(other.weight\)"):
        _loaded(tmp_path / "x.ckpt")


def test_trainer_folders_are_listed_by_their_weights_and_ordered_by_their_step(tmp_path):
    """checkpoint-N folders count by their weights file; the step comes from trainer_state.json
    where it is readable, and the folder's name orders the rest and names them all."""
    weights = small_model().state_dict()
    for name, state in (
        ("checkpoint-20", {"global_step": 20}),
        ("checkpoint-3", "not json"),  # unreadable: no step, named by its folder
        ("checkpoint-100", {"global_step": -1}),  # not a count
    ):
        (tmp_path / name).mkdir()
        torch.save(weights, tmp_path / name / "pytorch_model.bin")
        (tmp_path / name / "optimizer.pt").write_bytes(b"not weights")
        text = state if isinstance(state, str) else json.dumps(state)
        (tmp_path / name / "trainer_state.json").write_text(text)
    (tmp_path / "logs").mkdir()  # a folder without weights is not a checkpoint
    (tmp_path / ".hidden").mkdir()
    torch.save(weights, tmp_path / ".hidden" / "pytorch_model.bin")
    found = list_checkpoints(tmp_path)
    assert [p.parent.name for p in found] == ["checkpoint-3", "checkpoint-20", "checkpoint-100"]
    loaded = [load_checkpoint(p) for p in found]
    assert [c.metadata.get("step") for c in loaded] == [None, 20, None]
    assert [c.name for c in loaded] == ["checkpoint-3", "checkpoint-20", "checkpoint-100"]
    assert loaded[1].label == "checkpoint-20/pytorch_model.bin"
    # A folder is its weights alone; the step (self-described) orders before names.
    assert list_checkpoints(tmp_path / "checkpoint-20") == [found[1]]
    ordered = sorted(loaded, key=checkpoint_order_key)
    assert [c.name for c in ordered] == ["checkpoint-20", "checkpoint-3", "checkpoint-100"]


def test_a_trainer_output_directory_is_its_final_weights_and_its_checkpoint_folders(tmp_path):
    """Its final weights (save_model) beside the checkpoint-N folders were the series alone."""
    weights = small_model().state_dict()
    for step in (10, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file(weights, tmp_path / f"checkpoint-{step}" / "model.safetensors")
        torch.save({}, tmp_path / f"checkpoint-{step}" / "optimizer.pt")
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "training_args.bin").write_bytes(b"a pickled settings object")
    found = list_checkpoints(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "checkpoint-10/model.safetensors",
        "checkpoint-20/model.safetensors",
        "model.safetensors",
    ]


def test_fsdp_full_state_dict_folders_are_their_weights(tmp_path):
    """accelerate's save_state of an FSDP model (a Trainer's checkpoint-N under FSDP too) keeps
    its full state dict as pytorch_model_fsdp.bin: a Trainer's checkpoint folders were skipped
    unsaid (the series was its final weights alone), and a save_state folder was its
    random_states_0.pkl, refused as needing --trust-checkpoint."""
    for step in (10, 20):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        torch.save(small_state(), folder / "pytorch_model_fsdp.bin")
        torch.save({"step": step}, folder / "rng_state_0.pth")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file(small_state(), tmp_path / "model.safetensors")
    found = list_checkpoints(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "checkpoint-10/pytorch_model_fsdp.bin",
        "checkpoint-20/pytorch_model_fsdp.bin",
        "model.safetensors",
    ]
    loaded = load_checkpoint(found[1])
    assert (loaded.name, loaded.label, loaded.metadata) == (
        "checkpoint-20",
        "checkpoint-20/pytorch_model_fsdp.bin",
        {"step": 20},
    )
    folder = tmp_path / "checkpoint_0"  # save_state's
    folder.mkdir()
    torch.save(small_state(), folder / "pytorch_model_fsdp.bin")
    torch.save({"random_state": np.random.get_state()}, folder / "random_states_0.pkl")
    assert list_checkpoints(folder) == [folder / "pytorch_model_fsdp.bin"]


def test_deepspeed_folders_are_listed_by_their_model_states(tmp_path):
    """DeepSpeed's save_checkpoint directory (global_stepN folders and a ``latest`` file) held
    "no checkpoint files"; a folder given alone was read for its optimizer's shard."""
    for step in (5, 10):
        folder = tmp_path / f"global_step{step}"
        folder.mkdir()
        torch.save(
            {"module": small_state(), "global_steps": step}, folder / "mp_rank_00_model_states.pt"
        )
        torch.save(
            {"optimizer_state_dict": {}}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        )
    (tmp_path / "latest").write_text("global_step10")
    found = list_checkpoints(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "global_step5/mp_rank_00_model_states.pt",
        "global_step10/mp_rank_00_model_states.pt",
    ]
    # The weights zero_to_fp32.py writes beside them are one more.
    torch.save(small_state(), tmp_path / "pytorch_model.bin")
    assert list_checkpoints(tmp_path) == [*found, tmp_path / "pytorch_model.bin"]
    loaded = load_checkpoint(found[1])
    assert (loaded.name, loaded.metadata) == ("global_step10", {"step": 10})
    assert _equal(loaded.state_dict, small_state())
    assert list_checkpoints(tmp_path / "global_step5") == [found[0]]
    # A Trainer checkpoint folder's global_stepN, under DeepSpeed, is its own weights again.
    trainer = tmp_path / "checkpoint-10"
    trainer.mkdir()
    save_file(small_state(), trainer / "model.safetensors")
    (trainer / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    (tmp_path / "global_step10").rename(trainer / "global_step10")
    assert list_checkpoints(trainer) == [trainer / "model.safetensors"]


def test_deepspeed_model_parallel_slices_are_refused_in_one_sentence(tmp_path):
    """Under model parallelism each rank saves its slice of the weights (mp_rank_00_...,
    mp_rank_01_...): rank 0's was read as the model's (a series of slices, or mismatches)."""
    folder = tmp_path / "global_step10"
    folder.mkdir()
    for rank in (0, 1):
        torch.save({"module": small_state()}, folder / f"mp_rank_0{rank}_model_states.pt")
    match = r"one of 2 model-parallel ranks' slices .*\(mp_rank_00_model_states.pt to mp_rank_01"
    for where in (tmp_path, folder):
        with pytest.raises(UserError, match=match):
            list_checkpoints(where)
    with pytest.raises(UserError, match=match):
        load_checkpoint(folder / "mp_rank_01_model_states.pt")
    # A Trainer checkpoint folder's global_stepN is left out for its gathered weights.
    trainer = tmp_path / "checkpoint-10"
    trainer.mkdir()
    save_file(small_state(), trainer / "model.safetensors")
    (trainer / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    folder.rename(trainer / "global_step10")
    assert list_checkpoints(trainer) == [trainer / "model.safetensors"]


def test_deepspeed_pipeline_parallel_layers_are_refused_in_one_sentence(tmp_path):
    """A PipelineModule's weights are one file per layer beside model states whose ``module``
    is None: those were told to name their weights with --weights-key, which no entry holds,
    and a layer given alone was refused as missing the others' keys."""
    folder = tmp_path / "global_step10"
    folder.mkdir()
    torch.save({"module": None, "global_steps": 10}, folder / "mp_rank_00_model_states.pt")
    for idx, layer in ((0, nn.Linear(4, 3)), (2, nn.Linear(3, 2))):
        torch.save(layer.state_dict(), folder / f"layer_0{idx}-model_states.pt")
    match = r"pipeline-parallel model, .*\(layer_00-model_states.pt to layer_02-model_states.pt\)"
    for where in (tmp_path, folder):
        with pytest.raises(UserError, match=match):
            list_checkpoints(where)
    for name in ("mp_rank_00_model_states.pt", "layer_02-model_states.pt"):
        with pytest.raises(UserError, match=match):
            load_checkpoint(folder / name)


def test_deepspeed_zero3_placeholders_are_refused_in_one_sentence(tmp_path):
    """ZeRO-3 saves empty tensors where the weights are, which were refused as mismatches."""
    shapes = [{k: v.shape for k, v in small_model().named_parameters()}]
    placeholders = {k: torch.empty(0) for k in shapes[0]}
    buffers = {k: v for k, v in small_state().items() if k not in shapes[0]}
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {**placeholders, **buffers}, "param_shapes": shapes}, path)
    with pytest.raises(UserError, match="holds DeepSpeed ZeRO-3's placeholders .* zero_to_fp32"):
        load_checkpoint(path)
    # ZeRO-1 and 2 save the weights whole.
    torch.save({"module": small_state(), "param_shapes": shapes}, path)
    assert _equal(load_checkpoint(path).state_dict, small_state())


def test_deepspeed_zero3_folders_are_refused_in_one_sentence(tmp_path):
    """ZeRO-3's global_stepN folders (or a Trainer's checkpoint-N folders holding them), whose
    partitioned weights have no file of ours, were skipped unsaid: "no checkpoint files", or a
    series of the other checkpoints alone."""
    shapes = [{k: v.shape for k, v in small_model().named_parameters()}]
    trainer = tmp_path / "checkpoint-10"
    (trainer / "global_step10").mkdir(parents=True)
    torch.save(
        {"module": {k: torch.empty(0) for k in shapes[0]}, "param_shapes": shapes},
        trainer / "global_step10" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
    )
    (trainer / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    save_file(small_state(), tmp_path / "model.safetensors")
    for folder in (tmp_path, trainer, trainer / "global_step10"):
        with pytest.raises(UserError, match="ZeRO-3's weights partitioned .* zero_to_fp32"):
            list_checkpoints(folder)
    # With its weights gathered beside it (stage3_gather_16bit_weights_on_model_save), a
    # Trainer's checkpoint folder is those.
    save_file(small_state(), trainer / "model.safetensors")
    assert list_checkpoints(trainer) == [trainer / "model.safetensors"]
    assert len(list_checkpoints(tmp_path)) == 2


def test_a_peft_adapter_is_refused_in_one_sentence(tmp_path):
    """An adapter's folder (a Trainer's checkpoint-N of a PEFT model) was skipped unsaid, and its
    adapter_model.safetensors, changes to a base model's weights, read as the model's."""
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    save_file({"base_model.model.0.lora_A.weight": torch.zeros(2, 4)}, folder / "x.safetensors")
    (folder / "x.safetensors").rename(folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file(small_state(), tmp_path / "model.safetensors")
    for where in (tmp_path, folder):
        with pytest.raises(
            UserError, match="checkpoint-10' holds a PEFT adapter, .*merge_and_unload"
        ):
            list_checkpoints(where)
    with pytest.raises(UserError, match="adapter_model.safetensors' is a PEFT adapter, changes"):
        load_checkpoint(folder / "adapter_model.safetensors")


def test_accelerate_save_state_folders_are_their_weights_or_refused_where_sharded(tmp_path):
    """accelerate's save_state folder is its model.safetensors (not its random_states_0.pkl);
    with FSDP's sharded state dict in pytorch_model_fsdp_0/, its random_states_0.pkl was taken
    for the weights, and refused as needing --trust-checkpoint."""
    folder = tmp_path / "checkpoint_0"
    folder.mkdir()
    save_file(small_state(), folder / "model.safetensors")
    torch.save({"step": 0}, folder / "optimizer.bin")
    torch.save({"random_state": np.random.get_state()}, folder / "random_states_0.pkl")
    assert list_checkpoints(tmp_path) == list_checkpoints(folder) == [folder / "model.safetensors"]
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model_fsdp_0").mkdir()
    (folder / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"a shard")
    for where in (tmp_path, folder):
        with pytest.raises(UserError, match="FSDP's sharded weights .*accelerate merge-weights"):
            list_checkpoints(where)


def test_fsdp_local_state_dicts_are_refused_in_one_sentence(tmp_path):
    """FSDP's LOCAL_STATE_DICT writes each rank's shard of the flattened weights
    (pytorch_model_fsdp_rank0.bin, ...): their folder held "no checkpoint files", and one given
    alone was read as the model's weights."""
    folder = tmp_path / "checkpoint_0"
    folder.mkdir()
    for rank in (0, 1, 10):
        torch.save(small_state(), folder / f"pytorch_model_fsdp_rank{rank}.bin")
    torch.save({"random_state": np.random.get_state()}, folder / "random_states_0.pkl")
    match = r"local state dicts, .*\(pytorch_model_fsdp_rank0.bin to pytorch_model_fsdp_rank10.b"
    for where in (tmp_path, folder):
        with pytest.raises(UserError, match=match + r".*FULL_STATE_DICT"):
            list_checkpoints(where)
    with pytest.raises(UserError, match="is one FSDP rank's local state dict, .*FULL_STATE_DICT"):
        load_checkpoint(folder / "pytorch_model_fsdp_rank1.bin")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_a_torch_distributed_checkpoint_is_refused_with_how_to_join_it(tmp_path):
    """dcp.save's folders (FSDP2's, torchtitan's: .metadata beside .distcp shards) held "no
    checkpoint files", and a shard given alone was "corrupt, truncated or not a torch file";
    the file format_utils joins them into is read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = tmp_path / "step-10"
    with warnings.catch_warnings():  # (saving without a process group)
        warnings.simplefilter("ignore")
        dcp.save({"model": small_state(), "step": 10}, checkpoint_id=folder)
    match = "torch.distributed.checkpoint, .*format_utils dcp_to_torch .*step-10 OUT.pt`"
    for where in (tmp_path, folder):
        with pytest.raises(UserError, match=match):
            list_checkpoints(where)
    with pytest.raises(UserError, match="is one of the shards of a torch.distributed.checkpo"):
        load_checkpoint(next(folder.glob("*.distcp")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(folder, tmp_path / "joined.pt")
    assert _equal(load_checkpoint(tmp_path / "joined.pt").state_dict, small_state())
    # Beside weights, one is not them (accelerate's optimizer_0/ under FSDP's sharded state).
    save_file(small_state(), tmp_path / "model.safetensors")
    assert list_checkpoints(tmp_path) == [tmp_path / "model.safetensors"]


def test_an_accelerate_folder_under_deepspeed_is_its_model_states(tmp_path):
    """Under DeepSpeed, save_state writes the model's folder (pytorch_model/, DeepSpeed's)
    beside random_states_0.pkl, which was taken for a second checkpoint of the series, and
    stopped it asking for --trust-checkpoint."""
    (tmp_path / "pytorch_model").mkdir()
    weights = tmp_path / "pytorch_model" / "mp_rank_00_model_states.pt"
    torch.save({"module": small_state(), "global_steps": 7}, weights)
    torch.save({"random_state": np.random.get_state()}, tmp_path / "random_states_0.pkl")
    assert list_checkpoints(tmp_path) == [weights]
    # A second prepared model's folder, pytorch_model_1/, made the two models a run's series.
    (tmp_path / "pytorch_model_1").mkdir()
    torch.save({"module": small_state()}, tmp_path / "pytorch_model_1" / weights.name)
    with pytest.raises(UserError, match=r"of 2 models \(pytorch_model/mp_rank_00_model_st.*, as"):
        list_checkpoints(tmp_path)


def test_an_accelerate_projects_checkpoints_under_deepspeed_are_a_series(tmp_path):
    """accelerate's automatic checkpoint naming under DeepSpeed keeps each checkpoint's weights
    two folders down (checkpoints/checkpoint_3/pytorch_model/): the checkpoints folder held "no
    checkpoint files", and each checkpoint was named pytorch_model."""
    checkpoints = tmp_path / "checkpoints"
    for n in (10, 0, 1):
        folder = checkpoints / f"checkpoint_{n}" / "pytorch_model"
        folder.mkdir(parents=True)
        torch.save({"module": small_state(), "global_steps": n}, folder / DEEPSPEED_STATES)
        torch.save({"random_state": np.random.get_state()}, folder.parent / "random_states_0.pkl")
        # An object registered for checkpointing (a scheduler's state) stopped the series.
        torch.save({"last_epoch": n}, folder.parent / "custom_checkpoint_0.pkl")
    found = list_checkpoints(checkpoints)
    assert [p.relative_to(checkpoints).as_posix() for p in found] == [
        f"checkpoint_{n}/pytorch_model/{DEEPSPEED_STATES}" for n in (0, 1, 10)
    ]
    loaded = load_checkpoint(found[2])
    assert (loaded.name, loaded.label, loaded.metadata) == (
        "checkpoint_10",
        f"checkpoint_10/pytorch_model/{DEEPSPEED_STATES}",
        {"step": 10},
    )
    assert _equal(loaded.state_dict, small_state())
    # ZeRO-3's partitions there are refused as elsewhere; the weights zero_to_fp32.py gathered
    # beside them are the checkpoint, given in its folder too.
    found[0].rename(found[0].parent / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="checkpoint_0/pytorch_model' holds DeepSpeed ZeRO-3's"):
        list_checkpoints(checkpoints)
    gathered = checkpoints / "checkpoint_0" / "pytorch_model.bin"
    torch.save(small_state(), gathered)
    assert list_checkpoints(checkpoints) == [gathered, *found[1:]]
    assert list_checkpoints(gathered.parent) == [gathered]


def test_an_accelerate_folder_of_several_models_is_refused(tmp_path):
    """save_state writes model_1.safetensors (pytorch_model_1.bin) for a second prepared model
    (a GAN's discriminator, a distillation's teacher): the folder was its model.safetensors
    alone, the other model left out unsaid."""
    folder = tmp_path / "checkpoint_0"
    folder.mkdir()
    for name in ("model.safetensors", "model_1.safetensors", "model_ema.safetensors"):
        save_file(small_state(), folder / name)
    for where in (tmp_path, folder):
        with pytest.raises(
            UserError, match=r"of 2 models \(model.safetensors, model_1.safetensors\), as acc"
        ):
            list_checkpoints(where)
    assert load_checkpoint(folder / "model_1.safetensors").name == "model_1"  # given, it is read


def _sharded(folder: Path, index: str, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``state`` saved as save_pretrained shards a model, in two files listed by ``index``."""
    bin_ = index.startswith("pytorch_model")
    names = sorted(state)
    shards = [f"model-0000{i}-of-00002.{'bin' if bin_ else 'safetensors'}" for i in (1, 2)]
    weight_map = {n: shards[i % 2] for i, n in enumerate(names)}
    for shard in shards:
        part = {n: state[n].contiguous() for n in names if weight_map[n] == shard}
        (torch.save if bin_ else save_file)(part, folder / shard)
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


@pytest.mark.parametrize("index", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_sharded_weights_are_joined(tmp_path, index):
    """save_pretrained's shards (a model above its max_shard_size) were refused, "not joined"."""
    state = small_state()
    weight_map = _sharded(tmp_path, index, state)
    assert list_checkpoints(tmp_path) == [tmp_path / index]
    ckpt = load_checkpoint(tmp_path / index)
    assert _equal(ckpt.state_dict, state) and ckpt.name == tmp_path.name
    # The digest follows the shards' contents (a series tells copies by it).
    _sharded(tmp_path, index, _other_state(0.5))
    assert load_checkpoint(tmp_path / index).sha256 != ckpt.sha256
    shard = sorted(set(weight_map.values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(UserError, match=f"lists the shard '{shard}', which is not beside it"):
        load_checkpoint(tmp_path / index)
    first = sorted(set(weight_map.values()))[0]
    (tmp_path / index).write_text(json.dumps({"weight_map": dict.fromkeys(weight_map, first)}))
    lacking = sum(s != first for s in weight_map.values())
    with pytest.raises(
        UserError, match=f"{first}' lacks {lacking} weights .* {index} places in it"
    ):
        load_checkpoint(tmp_path / index)
    for bad in ({}, {"weight_map": {"0.weight": "../elsewhere.bin"}}, []):
        (tmp_path / index).write_text(json.dumps(bad))
        with pytest.raises(UserError, match="is no readable index of shards"):
            load_checkpoint(tmp_path / index)


def test_a_torch_file_named_safetensors_is_read_as_what_it_is(tmp_path):
    """torch.save(state, "model.safetensors") was "not a readable safetensors file"."""
    torch.save(small_state(), tmp_path / "model.safetensors")
    ckpt = load_checkpoint(tmp_path / "model.safetensors")
    assert _equal(ckpt.state_dict, small_state()) and ckpt.format == "torch-zip"
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(UserError, match="is not a readable safetensors file"):
        load_checkpoint(tmp_path / "cut.safetensors")


def test_a_shard_given_by_itself_is_refused_as_one(tmp_path):
    """Each shard given as a file (a glob's) was read alone: "2 missing keys" named no shards."""
    state = small_state()
    _sharded(tmp_path, "model.safetensors.index.json", state)
    with pytest.raises(UserError, match="is one of the shards of model.safetensors.index.json: g"):
        load_checkpoint(tmp_path / "model-00002-of-00002.safetensors")
    # A file the index does not list is read as any other.
    save_file(state, tmp_path / "other.safetensors")
    assert _equal(load_checkpoint(tmp_path / "other.safetensors").state_dict, state)


def test_a_shard_index_is_read_as_other_json_files_are(tmp_path, monkeypatch):
    """The index beside a checkpoint was read whole whatever its size (trainer_state.json
    stops at 64 MiB), and one nested deep ended the load in a RecursionError's traceback."""
    from hessian_cli.specs import checkpoints

    save_file(small_state(), tmp_path / "model-00001-of-00001.safetensors")
    shard = tmp_path / "model-00001-of-00001.safetensors"
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("[" * 100_000 + "]" * 100_000)
    assert _equal(load_checkpoint(shard).state_dict, small_state())
    index.write_text(json.dumps({"weight_map": {"0.weight": shard.name}}))
    with pytest.raises(UserError, match="is one of the shards"):
        load_checkpoint(shard)
    monkeypatch.setattr(checkpoints, "_JSON_CAP", index.stat().st_size - 1)
    assert _equal(load_checkpoint(shard).state_dict, small_state())  # no index of ours


def test_a_trainer_output_directory_of_sharded_checkpoint_folders_is_their_series(tmp_path):
    """Its sharded checkpoint-N folders were skipped unsaid (the directory held "no checkpoint
    folders", or its final weights alone were analysed), then refused as not joined."""
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    _sharded(folder, "model.safetensors.index.json", small_state())
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    save_file(small_state(), tmp_path / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    assert list_checkpoints(tmp_path) == [index, tmp_path / "model.safetensors"]
    assert load_checkpoint(index).metadata == {"step": 10}


def test_a_trusted_whole_model_is_kept_as_the_module_its_weights_are(tmp_path: Path) -> None:
    """A pickled model (torch.save(model)) is kept beside its weights, for analyze to use as the
    model: the model itself, the one a wrapper holds (nn.DataParallel's, whose ``module.`` is
    stripped), the entry or part --weights-key names; none for weights of a plain state dict."""
    trained, ema = small_model(), small_model()
    ema.load_state_dict(_other_state(-0.25))
    torch.save(trained, tmp_path / "whole.pt")
    assert isinstance(load_checkpoint(tmp_path / "whole.pt", trust=True).module, nn.Sequential)
    torch.save(nn.DataParallel(trained), tmp_path / "parallel.pt")
    ckpt = load_checkpoint(tmp_path / "parallel.pt", trust=True)
    assert isinstance(ckpt.module, nn.Sequential) and set(ckpt.state_dict) == set(small_state())
    torch.save({"model": trained, "ema": ema, "step": 3}, tmp_path / "modules.pt")
    for key, state in ((None, small_state()), ("ema", _other_state(-0.25))):
        ckpt = load_checkpoint(tmp_path / "modules.pt", trust=True, weights_key=key)
        assert _equal(ckpt.module.state_dict(), state)
    holder = nn.Module()
    holder.net = trained
    torch.save(holder, tmp_path / "holder.pt")
    assert load_checkpoint(tmp_path / "holder.pt", trust=True, weights_key="net").module is not None
    torch.save(small_state(), tmp_path / "state.pt")
    assert load_checkpoint(tmp_path / "state.pt", trust=True).module is None
    torch.jit.save(torch.jit.script(small_model()), tmp_path / "scripted.pt")
    scripted = load_checkpoint(tmp_path / "scripted.pt", trust=True).module
    assert isinstance(scripted, torch.jit.ScriptModule) and _equal(
        scripted.state_dict(), small_state()
    )


def test_the_specs_import_neither_h5py_nor_the_storage_package():
    """A checkpoint's digest and its atomic save came from the HDF5 storage package, whose
    import loads h5py, the HDF5 layout and the report (0.34 s of loading a model spec)."""
    script = (
        "import sys\n"
        "import hessian_cli.specs\n"
        "print(sorted(m for m in ('h5py', 'hessian_cli.storage', 'hessian_cli.report') "
        "if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert out.strip() == "[]"


def test_an_accelerate_folder_of_registered_objects_alone_names_them(tmp_path):
    """A model registered for checkpointing (register_for_checkpointing) rather than prepared
    has its weights in custom_checkpoint_0.pkl, which a listing never reads: the folder, and the
    project's checkpoints folder, were said to hold "no checkpoint files (..., .pkl, ...)"."""
    checkpoints = tmp_path / "checkpoints"
    for n in (1, 0):
        folder = checkpoints / f"checkpoint_{n}"
        folder.mkdir(parents=True)
        torch.save(small_state(), folder / "custom_checkpoint_0.pkl")
        torch.save({"random_state": np.random.get_state()}, folder / "random_states_0.pkl")
    message = (
        r"checkpoint_0' holds no model weights, only accelerate's objects registered for "
        r"checkpointing \(custom_checkpoint_0.pkl\), .* a glob such as "
        r"checkpoint_\*/custom_checkpoint_0.pkl\)\.$"
    )
    for where in (checkpoints, checkpoints / "checkpoint_0"):
        with pytest.raises(UserError, match=message):
            list_checkpoints(where)
    given = checkpoints / "checkpoint_1" / "custom_checkpoint_0.pkl"
    assert _equal(load_checkpoint(given).state_dict, small_state())  # given, it is read
    # Beside a model's weights, they are left out unsaid (the weights are the model's).
    save_file(small_state(), checkpoints / "checkpoint_0" / "model.safetensors")
    assert list_checkpoints(checkpoints / "checkpoint_0") == [
        checkpoints / "checkpoint_0" / "model.safetensors"
    ]


class _SavedOnWindows:
    """A WindowsPath as a script on Windows pickles it (one cannot be made here to save)."""

    def __reduce__(self) -> tuple:
        import pathlib

        return (pathlib.WindowsPath, ("C:\\runs", "exp1"))


@pytest.mark.skipif(os.name != "posix" or torch.__version__ < (2, 6), reason="POSIX, torch 2.6")
def test_a_path_of_another_system_or_python_is_read_without_trust(tmp_path: Path) -> None:
    """A checkpoint saved on Windows with its script's arguments (a WindowsPath among them)
    was "corrupt, truncated or not a torch file (NotImplementedError)" here, where no
    WindowsPath can be made; one saved by Python 3.13 (pathlib._local.PosixPath) needed
    --trust-checkpoint. Each is read, the path as it was saved."""
    import argparse
    import pathlib

    args = argparse.Namespace(output=_SavedOnWindows(), lr=0.1)
    torch.save({"state_dict": small_state(), "args": args}, tmp_path / "windows.pt")
    loaded = load_checkpoint(tmp_path / "windows.pt")
    assert loaded.raw["args"].output == pathlib.PureWindowsPath("C:/runs/exp1")
    assert _equal(loaded.state_dict, small_state())
    legacy = tmp_path / "py313.pt"  # a legacy file, whose pickle's GLOBALs can be renamed
    extras = {"log_dir": Path("/runs/1")}
    torch.save({"state_dict": small_state(), **extras}, legacy, _use_new_zipfile_serialization=False, pickle_protocol=2)  # fmt: skip
    saved = legacy.read_bytes()
    assert saved.count(b"cpathlib\nPosixPath\n") == 1
    legacy.write_bytes(saved.replace(b"cpathlib\n", b"cpathlib._local\n"))
    loaded = load_checkpoint(legacy)
    assert loaded.raw["log_dir"] == Path("/runs/1") and _equal(loaded.state_dict, small_state())


def test_files_of_one_name_in_numbered_folders_are_in_their_folders_order(tmp_path: Path) -> None:
    """A glob of runs/epoch_*/model.pt (files of one name, recording no step) came in the
    shell's order, epoch_10 before epoch_2: the series, its warm starts and its plots in it."""
    for n in (1, 2, 10):
        (tmp_path / f"epoch_{n}").mkdir()
        torch.save(small_state(), tmp_path / f"epoch_{n}" / "model.pt")
    globbed = sorted(tmp_path.glob("epoch_*/model.pt"))  # as the shell expands it
    assert [p.parent.name for p in globbed] == ["epoch_1", "epoch_10", "epoch_2"]
    ordered = sorted((load_checkpoint(p) for p in globbed), key=checkpoint_order_key)
    assert [c.path.parent.name for c in ordered] == ["epoch_1", "epoch_2", "epoch_10"]


def test_a_weights_key_naming_an_entry_without_weights_says_what_it_holds(tmp_path: Path) -> None:
    """--weights-key epoch (an entry of the file, but a number) was told only that the file
    "holds no state dict of tensors", as if it held none under any entry."""
    path = tmp_path / "ema.pt"
    ema = {k: v + 1 for k, v in small_state().items()}
    torch.save({"model": small_state(), "ema": ema, "epoch": 3, "args": {"lr": 0.1}}, path)
    for key, held in (("epoch", "an int"), ("args", "a dict")):
        with pytest.raises(
            UserError,
            match=rf"^checkpoint '.*ema.pt' holds {held} under '{key}', which --weights-key "
            r"names, not weights \(its entries: model, ema, epoch, args\)\.$",
        ):
            load_checkpoint(path, weights_key=key)
    assert _equal(_loaded(path, weights_key="ema"), ema)
