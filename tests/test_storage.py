"""The spectra HDF5 file: round trips, appends, atomicity, refusals and forward compatibility."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_cli.checkpoint_analysis import CheckpointAnalysis
from hessian_cli.engine.alignment import alignment_scores
from hessian_cli.engine.density import spectral_density
from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.engine.trace import stochastic_trace
from hessian_cli.errors import UserError
from hessian_cli.report import analysis_to_dict
from hessian_cli.storage import (
    FORMAT_NAME,
    FORMAT_VERSION,
    check_writable,
    group_names,
    hdf5,
    read_analyses,
    read_eigenvectors,
    read_file_info,
    write_analyses,
)


@pytest.fixture(scope="module")
def full() -> CheckpointAnalysis:
    """One checkpoint analysed by the real engine: eigenpairs, trace, density and alignment."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add synchronisation cost
    try:
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        x = torch.randn(24, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (24,), generator=g)
        op = HessianOperator(model, F.cross_entropy, [(x[:12], y[:12]), (x[12:], y[12:])])
        eig = eigenpairs(op, 3)
        provenance = {
            "checkpoint": "run/ckpt_100.pt",
            "sha256": "ab" * 32,
            "model": "mlp",
            "params": op.n,
            "step": 100,
            "epoch": 1,
            "device": "cpu",
            "hvps": 999,
            "grad_equivalents": 1998.0,
            "wall_seconds": 1.5,
            "param_globs": ["0.*", "2.weight"],
            "trusted": False,
            "note": None,
        }
        return CheckpointAnalysis(
            name="run/ckpt_100.pt",
            provenance=provenance,
            space=op.space,
            loss=op.loss(),
            eigen=eig,
            trace=stochastic_trace(op, 12, seed=0, known=eig),
            density=spectral_density(op, 3, 10, seed=0, known=eig),
            alignment=alignment_scores(op, eig.eigenvalues, eig.eigenvectors, minibatches=2),
        )
    finally:
        torch.set_num_threads(threads)


def variant(a: CheckpointAnalysis, name: str, step: int | None, scale: float = 1.0):
    """A copy of ``a`` under another name and step, eigenvalues scaled (a fake trajectory): a
    checkpoint of its own (its sha256)."""
    prov = {k: v for k, v in a.provenance.items() if k != "step"}
    prov["sha256"] = hashlib.sha256(name.encode(errors="surrogatepass")).hexdigest()
    if step is not None:
        prov["step"] = step
    eigen = dataclasses.replace(a.eigen, eigenvalues=a.eigen.eigenvalues * scale)
    return dataclasses.replace(a, name=name, provenance=prov, eigen=eigen)


def as_json(a: CheckpointAnalysis) -> dict:
    return json.loads(json.dumps(analysis_to_dict(a), allow_nan=False))


def raw(value) -> tuple:
    """A value's dtype, shape and bytes (the strings themselves for variable-length strings)."""
    a = np.asarray(value)
    return a.dtype.str, a.shape, a.tolist() if a.dtype.kind == "O" else a.tobytes()


def snapshot(obj: h5py.Group) -> dict:
    """Every attribute and dataset under ``obj``, bit for bit, for comparisons."""
    out = {"attrs": {k: raw(v) for k, v in obj.attrs.items()}}

    def visit(name: str, item: h5py.HLObject) -> None:
        attrs = {k: raw(v) for k, v in item.attrs.items()}
        out[name] = (attrs, raw(item[()]) if isinstance(item, h5py.Dataset) else None)

    obj.visititems(visit)
    return out


def test_report_keys_and_strict_json(full):
    d = analysis_to_dict(full)
    assert list(d) == [
        "name",
        "provenance",
        "loss",
        "eigen",
        "trace",
        "density",
        "alignment",
        "cost",
    ]
    assert "note" not in d["provenance"]  # None values are dropped
    assert d["cost"] == {"hvps": 999, "grad_equivalents": 1998.0, "seconds": 1.5, "device": "cpu"}
    assert len(d["alignment"]["minibatch"]["values"]) == 2
    assert "eigenvectors" not in json.dumps(d)
    t = d["trace"]  # rebuilt from its parts
    assert t["num_samples"] == len(full.trace.samples) == 10  # 12 - 2 * (12 // 3 - 3)
    assert t["known_eigenpairs"] == 3
    assert t["estimate"] == pytest.approx(t["sketch_trace"] + float(full.trace.samples.mean()))
    json.dumps(d, allow_nan=False)


def test_round_trip_equals_report(full, tmp_path):
    path = tmp_path / "spectra.h5"
    second = variant(full, "second", 200)
    assert write_analyses(path, [full, second], command_line="hessian-cli analyze x") == [
        "run_ckpt_100.pt",
        "second",
    ]
    assert read_analyses(path) == [as_json(full), as_json(second)]
    info = read_file_info(path)
    assert info["format"] == FORMAT_NAME and info["format_version"] == FORMAT_VERSION
    assert info["command_line"] == "hessian-cli analyze x"
    assert {"tool_version", "torch_version", "created"} <= set(info)


def test_layout_is_the_spec(full, tmp_path):
    """DESIGN.md's datasets per checkpoint group, read with plain h5py: `trace` is a dataset
    holding the estimate, with its error and cost as attributes."""
    path = tmp_path / "spectra.h5"
    (name,) = write_analyses(path, [full], command_line="x", save_eigenvectors=True)
    with h5py.File(path) as f:
        assert f.attrs["format"] == FORMAT_NAME and f.attrs["format_version"] == FORMAT_VERSION
        g = f["checkpoints"][name]
        for key in ("eigenvalues", "residuals", "trace", "density/nodes", "density/weights"):
            assert isinstance(g[key], h5py.Dataset), key
        for key in ("eigenvectors", "density/grid", "density/values", "alignment/alignment"):
            assert isinstance(g[key], h5py.Dataset), key
        assert g["trace"][()] == pytest.approx(full.trace.estimate, rel=1e-12)
        assert g["trace"].attrs["stderr"] == pytest.approx(full.trace.stderr, rel=1e-12)
        assert g["trace"].attrs["num_probes"] == 12
        np.testing.assert_allclose(g["trace_samples"][()], full.trace.samples.numpy())


def test_version_1_trace_group_still_reads(full, tmp_path):
    """Format version 1 kept the trace as a group (estimate as an attribute); such files still
    read, and appending to one upgrades the file's version without touching its groups."""
    path = tmp_path / "v1.h5"
    (name,) = write_analyses(path, [full], command_line="x")
    expected = as_json(full)["trace"]
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
        g = f["checkpoints"][name]
        attrs = dict(g["trace"].attrs)
        estimate, samples = g["trace"][()], g["trace_samples"][()]
        del g["trace"], g["trace_samples"]
        old = g.create_group("trace")
        old.attrs.update(attrs | {"estimate": estimate})
        old.create_dataset("samples", data=samples)
        before = snapshot(g)
    assert read_analyses(path)[0]["trace"] == expected
    write_analyses(path, [full], command_line="y")
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert snapshot(f["checkpoints"][name]) == before
    first, second = read_analyses(path)
    assert first["trace"] == second["trace"] == expected


def test_non_finite_numbers_are_null_and_round_trip(full, tmp_path):
    nan = float("nan")
    eigen = dataclasses.replace(
        full.eigen,
        eigenvalues=torch.tensor([1.0, nan, 0.5], dtype=torch.float64),
        residuals=torch.tensor([1e-9, float("inf"), 1e-3], dtype=torch.float64),
        converged=torch.tensor([True, False, False]),
    )
    a = dataclasses.replace(full, eigen=eigen, loss=nan)
    d = analysis_to_dict(a)
    assert d["loss"] is None
    assert d["eigen"]["eigenvalues"][1] is None and d["eigen"]["residuals"][1] is None
    path = tmp_path / "nan.h5"
    write_analyses(path, [a], command_line="x")
    assert read_analyses(path) == [as_json(a)]


def test_eigenvectors_round_trip_and_unflatten(full, tmp_path):
    path = tmp_path / "vectors.h5"
    (group,) = write_analyses(path, [full], command_line="x", save_eigenvectors=True)
    vectors, names, shapes, offsets = read_eigenvectors(path, group)
    assert vectors.dtype == torch.float64  # a float64 analysis: the vectors its residuals describe
    assert torch.equal(vectors, full.eigen.eigenvectors)
    single = dataclasses.replace(
        full, name="f32", eigen=dataclasses.replace(full.eigen, eigenvectors=vectors.float())
    )
    (other,) = write_analyses(path, [single], command_line="y", save_eigenvectors=True)
    assert torch.equal(read_eigenvectors(path, other)[0], vectors.float())
    assert names == list(full.space.names)
    assert shapes == [tuple(s) for s in full.space.shapes]
    assert offsets == list(full.space.offsets)
    for name, shape, offset, expected in zip(
        names, shapes, offsets, full.space.unflatten(vectors), strict=True
    ):
        part = vectors[:, offset : offset + int(np.prod(shape))].reshape(-1, *shape)
        assert torch.equal(part, expected), name
    # The report name finds the group too; the vectors are stored chunked and compressed.
    assert torch.equal(read_eigenvectors(path, full.name)[0], vectors)
    with h5py.File(path) as f:
        ds = f["checkpoints"][group]["eigenvectors"]
        assert ds.compression == "gzip" and ds.chunks is not None
    # Without --save-eigenvectors there are none, and asking says so.
    other = tmp_path / "novectors.h5"
    (group,) = write_analyses(other, [full], command_line="x")
    with pytest.raises(UserError, match="no saved eigenvectors"):
        read_eigenvectors(other, group)
    with pytest.raises(UserError, match="no single checkpoint"):
        read_eigenvectors(path, "missing")


def test_append_keeps_existing_groups_bit_for_bit(full, tmp_path):
    path = tmp_path / "spectra.h5"
    (first,) = write_analyses(path, [full], command_line="first", save_eigenvectors=True)
    with h5py.File(path) as f:
        before = snapshot(f["checkpoints"][first])
        created = f.attrs["created"]
    written = write_analyses(path, [full, variant(full, "b", 50)], command_line="second")
    assert written == ["run_ckpt_100.pt-2", "b"]  # same name again: never overwritten
    with h5py.File(path) as f:
        assert snapshot(f["checkpoints"][first]) == before
        assert f.attrs["created"] == created
    info = read_file_info(path)
    assert info["command_line"] == "second"
    assert [h["command_line"] for h in info["history"]] == ["first", "second"]
    assert info["history"][1]["groups"] == written
    assert len(read_analyses(path)) == 3


@pytest.mark.parametrize("directory_lock", [True, False])
def test_appends_at_the_same_time_keep_every_group(full, tmp_path, monkeypatch, directory_lock):
    """Writers that each copy the file and replace it would drop each other's groups: they take
    turns (threads here; the lock is a file lock, so processes take turns the same way). Where
    a directory cannot be locked, a lock file beside the output serves."""
    import fcntl
    import stat
    from concurrent.futures import ThreadPoolExecutor

    if not directory_lock:
        real = fcntl.flock

        def no_directories(fd: int, op: int) -> None:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError("directories cannot be locked here")
            real(fd, op)

        monkeypatch.setattr(fcntl, "flock", no_directories)
    path = tmp_path / "spectra.h5"
    write_analyses(path, [full], command_line="first")
    with ThreadPoolExecutor(6) as pool:
        done = list(
            pool.map(
                lambda i: write_analyses(path, [variant(full, f"c{i}", i)], command_line=f"w{i}"),
                range(6),
            )
        )
    assert sorted(name for names in done for name in names) == [f"c{i}" for i in range(6)]
    assert len(read_analyses(path)) == 7
    assert len(read_file_info(path)["history"]) == 7
    expected = ["spectra.h5"] if directory_lock else [".spectra.h5.lock", "spectra.h5"]
    assert sorted(os.listdir(tmp_path)) == expected


def test_series_order_by_step_then_insertion(full, tmp_path):
    path = tmp_path / "series.h5"
    write_analyses(
        path,
        [variant(full, "s300", 300), variant(full, "nostep", None), variant(full, "s100", 100)],
        command_line="x",
        series=True,
    )
    write_analyses(path, [variant(full, "s200", 200)], command_line="y")
    expected = ["s100", "s200", "s300", "nostep"]
    assert group_names(path) == expected
    assert [d["name"] for d in read_analyses(path)] == expected
    assert read_file_info(path)["trajectory"] is True


def test_checkpoints_appended_one_by_one_are_ordered_by_name_as_the_loader_does(full, tmp_path):
    """A shell loop over ckpt_*.pt that record no step appends ckpt_1, ckpt_10, ckpt_2, which
    the file kept so (`analyze DIR` stores ckpt_1, ckpt_2, ckpt_10); one analysed again stays
    after the first."""
    path = tmp_path / "series.h5"
    for name in ("ckpt_1", "ckpt_10", "ckpt_2", "ckpt_2"):
        write_analyses(path, [variant(full, name, None)], command_line="x")
    assert group_names(path) == ["ckpt_1", "ckpt_2", "ckpt_2-2", "ckpt_10"]
    assert [d["name"] for d in read_analyses(path)] == ["ckpt_1", "ckpt_2", "ckpt_2", "ckpt_10"]
    write_analyses(path, [variant(full, "ckpt_1²", None)], command_line="x")  # no int("²")
    assert group_names(path)[:2] == ["ckpt_1", "ckpt_1²"]


def test_a_series_start_and_end_that_record_no_step_are_placed_by_their_names(full, tmp_path):
    """init.pt beside checkpoints that record their steps was stored after them (analyze
    showed it first, show and plot last: the plot's file-order axis drew it at the end)."""
    path = tmp_path / "series.h5"

    def unstepped(name: str) -> CheckpointAnalysis:
        a = variant(full, name, None)
        return dataclasses.replace(a, provenance={**a.provenance, "epoch": None})

    written = [unstepped("init"), variant(full, "s100", 100), unstepped("final")]
    write_analyses(path, [*written, unstepped("extra")], command_line="x", series=True)
    assert group_names(path) == ["init", "s100", "extra", "final"]


def test_the_file_orders_a_series_as_its_analysis_did(full, tmp_path):
    """a.pt recording step 100 and b.pt epoch 1 alone were analysed [b, a] and stored [a, b];
    a step counted within each epoch (epoch 2's step 10 after epoch 1's step 50) was stored
    before the epoch it followed. The loader's order (test_specs_checkpoints) is kept."""
    path = tmp_path / "series.h5"

    def at(name: str, step: int | None, epoch: int | None) -> CheckpointAnalysis:
        a = variant(full, name, step)
        return dataclasses.replace(a, provenance={**a.provenance, "epoch": epoch})

    written = [at("a", 100, None), at("e2", 10, 2), at("b", None, 1), at("e1", 50, 1)]
    write_analyses(path, written, command_line="x", series=True)
    assert group_names(path) == ["e1", "b", "e2", "a"]


class Boom(RuntimeError):
    pass


def _fail_on_boom(monkeypatch):
    """Writing the analysis named ``boom`` fails after its group was created."""
    original = hdf5._write_group

    def failing(group, a, **kw):
        if a.name == "boom":
            raise Boom("disk on fire")
        original(group, a, **kw)

    monkeypatch.setattr(hdf5, "_write_group", failing)


def test_failure_mid_write_leaves_original_and_no_temp(full, tmp_path, monkeypatch):
    path = tmp_path / "spectra.h5"
    write_analyses(path, [full], command_line="first")
    original = path.read_bytes()
    listing = sorted(os.listdir(tmp_path))
    _fail_on_boom(monkeypatch)
    with pytest.raises(Boom):
        write_analyses(path, [variant(full, "a", 1), variant(full, "boom", 2)], command_line="x")
    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == listing
    # A new file that fails is not created at all.
    with pytest.raises(Boom):
        write_analyses(tmp_path / "new.h5", [full, variant(full, "boom", 2)], command_line="x")
    assert sorted(os.listdir(tmp_path)) == listing


def test_foreign_and_missing_files_are_refused(full, tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5\n")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    metrics = tmp_path / "metrics.h5"
    with h5py.File(metrics, "w") as f:
        f.attrs["format"] = "hessian-cli-metrics"
    for foreign in (text, plain, metrics):
        before = foreign.read_bytes()
        with pytest.raises(UserError):
            write_analyses(foreign, [full], command_line="x")
        with pytest.raises(UserError):
            read_analyses(foreign)
        assert foreign.read_bytes() == before
    with pytest.raises(UserError, match="does not exist"):
        read_analyses(tmp_path / "missing.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.h5", "notes.h5", "plain.h5"]


def test_newer_major_file_is_not_appended_to(full, tmp_path):
    path = tmp_path / "future.h5"
    write_analyses(path, [full], command_line="x")
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(UserError, match="newer hessian-cli"):
        write_analyses(path, [full], command_line="x")
    assert len(read_analyses(path)) == 1  # but it still reads


def test_an_empty_file_at_the_output_path_is_written_as_a_new_file(full, tmp_path):
    """`mktemp --suffix .h5` makes an empty file: it was refused as "not an HDF5 file"."""
    empty = tmp_path / "tmp.h5"
    empty.touch()
    check_writable(empty)
    write_analyses(empty, [full], command_line="x")
    assert [d["name"] for d in read_analyses(empty)] == [full.name]
    named = tmp_path / "results.json"
    named.touch()
    with pytest.raises(UserError, match="names a .json file"):  # nothing there to append to
        hdf5.check_output_name(named)


def test_unwritable_output_is_one_user_error(full, tmp_path, monkeypatch):
    # Missing directories are made, as train makes its run directory (they were refused).
    write_analyses(tmp_path / "new" / "dir" / "out.h5", [full], command_line="x")
    assert [d["name"] for d in read_analyses(tmp_path / "new" / "dir" / "out.h5")] == [full.name]
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is not a directory"):
        write_analyses(blocker / "out.h5", [full], command_line="x")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:  # root ignores chmod, so simulate the refusal
        m.setattr(os, "open", denied)
        with pytest.raises(UserError, match="cannot write to the directory .*permission denied"):
            write_analyses(tmp_path / "out.h5", [full], command_line="x")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # a real read-only directory, where the OS enforces it
        with pytest.raises(UserError, match="cannot write"):
            write_analyses(locked / "out.h5", [full], command_line="x")
    assert not list(locked.iterdir())


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_directory_that_takes_no_new_files_is_not_said_to_be_missing(full, capsys, tmp_path):
    """`analyze --out /proc/x.h5` said "cannot write to the directory /proc: no such file or
    directory", of a directory that is there."""
    from cli_runner import one_sentence, run

    said = "cannot write to the directory /proc: it takes no new files."
    with pytest.raises(UserError, match=said):
        write_analyses(Path("/proc/x.h5"), [full], command_line="x")
    written = tmp_path / "spectra.h5"
    write_analyses(written, [full], command_line="x")
    for out in ("/proc/x.png", "/proc/new/x.png"):  # made by atomic_path, probed before drawing
        code, _, err = run(capsys, "plot", written, "-o", out)
        assert code == 2 and one_sentence(err) == f"error: {said}"


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))
sys.argv = ["hessian-cli", *sys.argv[1:]]
from hessian_cli.cli import main
main()
"""


def test_an_append_removes_the_copy_a_killed_writer_of_the_file_left(full, tmp_path):
    """kill -9 during an append leaves the original intact and a copy as large as it, which
    every later append left there."""
    path = tmp_path / "spectra.h5"
    write_analyses(path, [variant(full, "a", 1)], command_line="x")
    killed = tmp_path / ".spectra.h5.0123456789ab.tmp"  # atomic_path's name for it
    killed.write_bytes(path.read_bytes())
    others = [tmp_path / ".other.h5.0123456789ab.tmp", tmp_path / ".spectra.h5.notours.tmp"]
    for other in others:
        other.write_bytes(b"another file's")
    write_analyses(path, [variant(full, "b", 2)], command_line="y")
    assert not killed.exists()
    assert all(other.exists() for other in others)
    assert group_names(path) == ["a", "b"]


def test_text_utf8_cannot_hold_is_stored_escaped(full, tmp_path):
    """A file name that is not UTF-8 (lone surrogates in Python) and NUL failed the write."""
    from hessian_cli.storage.files import storable_text

    assert storable_text(os.fsdecode(b"run\xff.pt")) == "run\\xff.pt"
    assert storable_text("mlp\x00") == "mlp\\x00"
    assert storable_text("ok é") == "ok é"
    odd = dataclasses.replace(
        variant(full, os.fsdecode(b"n\xff"), 1),
        provenance={**full.provenance, "model": "mlp\x00", "params_glob": ["a\udcff"]},
    )
    path = tmp_path / "spectra.h5"
    write_analyses(path, [odd], command_line=os.fsdecode(b"hessian-cli analyze \xff.pt"))
    (read,) = read_analyses(path)
    assert read["name"] == "n\\xff" and read["provenance"]["model"] == "mlp\\x00"
    assert read_file_info(path)["command_line"] == "hessian-cli analyze \\xff.pt"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX file size limits")
@pytest.mark.parametrize("command", ["train", "analyze"])
def test_a_full_disk_is_one_sentence_and_leaves_no_temporary_file(tmp_path, command):
    """HDF5 writing straight to a file that cannot grow crashed the process (segfault) or
    raised RuntimeErrors; the file size limit fails writes the way a full disk does."""
    example = Path(__file__).resolve().parents[1] / "checkpoints_example" / "digits_mlp.pt"
    args = {
        "train": ["train", "--model", "mlp", "--data", "digits", "--max-steps", "2"],
        "analyze": ["analyze", example, "-k", "2", "--save-eigenvectors"],
    }[command]
    out = tmp_path / ("run" if command == "train" else "spectra.h5")
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *map(str, args), "--out", str(out), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    written = out / "metrics.h5" if command == "train" else out
    assert done.returncode == 2, done.stderr
    stopped = "; stopped at step 2, no checkpoint was written" if command == "train" else ""
    assert done.stderr.strip() == f"error: could not write {written}: file too large{stopped}."
    assert not written.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX file size limits")
@pytest.mark.parametrize("command", ["train", "analyze"])
def test_a_disk_already_full_is_refused_before_the_work(tmp_path, command):
    """A disk with no byte free still let an empty file be made, the check before the work:
    the work ran (an epoch, a whole series) and its results were then refused."""
    example = Path(__file__).resolve().parents[1] / "checkpoints_example" / "digits_mlp.pt"
    args = {
        "train": ["train", "--model", "mlp", "--data", "digits", "--max-steps", "2"],
        "analyze": ["analyze", example, "-k", "2"],
    }[command]
    out = tmp_path / ("run" if command == "train" else "spectra.h5")
    full = FULL_DISK.replace("(4000, 4000)", "(0, 0)")
    done = subprocess.run(
        [sys.executable, "-c", full, *map(str, args), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip() == f"error: cannot write to the directory {tmp_path}: file too large."
    )
    assert done.stdout == ""  # no epoch, no table: nothing was run
    assert not out.exists()


def test_a_rewritten_file_keeps_its_permissions(full, tmp_path):
    """Appends kept them; a file replaced whole got the umask's (0600 became 0644)."""
    from hessian_cli.storage.metrics import MetricsLog

    path = tmp_path / "spectra.h5"
    write_analyses(path, [full], command_line="first")
    path.chmod(0o600)
    write_analyses(path, [variant(full, "b", 50)], command_line="second")
    assert path.stat().st_mode & 0o777 == 0o600
    empty = tmp_path / "tmp.h5"  # mktemp's: 0600, and written as a new file (it became 0644)
    empty.touch(mode=0o600)
    write_analyses(empty, [full], command_line="x")
    assert empty.stat().st_mode & 0o777 == 0o600
    log = MetricsLog(tmp_path / "metrics.h5", {"model": "mlp"})  # rewritten by every flush
    log.flush()
    log.path.chmod(0o600)
    log.flush()
    assert log.path.stat().st_mode & 0o777 == 0o600


def test_a_read_only_file_is_refused_not_appended_to(full, tmp_path):
    """chmod a-w protects a spectra file, but the rename that replaces it asks only the
    directory: an append went ahead unsaid."""
    path = tmp_path / "spectra.h5"
    write_analyses(path, [full], command_line="first")
    path.chmod(0o444)
    before = path.read_bytes()
    refused = f"{path} is read-only; refusing to write to it"
    with pytest.raises(UserError, match=refused):  # before the work
        check_writable(path)
    with pytest.raises(UserError, match=refused):
        write_analyses(path, [variant(full, "b", 50)], command_line="second")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spectra.h5"]


def test_a_read_only_metrics_file_is_refused_when_its_run_resumes(tmp_path):
    """Refused by the flush that would replace it (since it respects chmod a-w), which comes
    after the resumed run's first steps: it is refused as the rows are read instead."""
    from hessian_cli.storage.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.h5", {"model": "mlp"})
    log.append("steps", step=0, loss=1.0, accuracy=0.5, lr=0.1)
    log.flush()
    log.path.chmod(0o444)
    resumed = MetricsLog(log.path, {"model": "mlp"})
    with pytest.raises(UserError, match="metrics.h5 is read-only; refusing to write to it"):
        resumed.load(before_step=1, before_epoch=0)


def test_a_resumed_run_without_its_metrics_file_says_so_as_other_storage_errors():
    """It said "error: the run's metrics.h5 is missing": the three messages of a resumed run's
    metrics file began in lower case, the 13 other storage messages that begin with a word
    in upper case."""
    from hessian_cli.storage.metrics import MetricsLog

    resumed = MetricsLog(Path("gone") / "metrics.h5", {"model": "mlp"})
    with pytest.raises(UserError, match=r"^the run's metrics.h5 is missing, so the rows of its"):
        resumed.load(before_step=3, before_epoch=0)


def test_a_large_file_is_written_on_disk_where_there_is_room(full, tmp_path, monkeypatch):
    from hessian_cli.storage import files

    monkeypatch.setattr(files, "IN_MEMORY_BYTES", 0)
    path = tmp_path / "spectra.h5"
    write_analyses(path, [full], command_line="first", save_eigenvectors=True)
    write_analyses(path, [variant(full, "b", 50)], command_line="second")
    assert sorted(r["name"] for r in read_analyses(path)) == ["b", "run/ckpt_100.pt"]
    before = path.read_bytes()
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: SimpleNamespace(free=1 << 20))
    with pytest.raises(UserError, match=r"needs about \d+ MiB and the disk has 1 MiB free"):
        write_analyses(path, [variant(full, "c", 60)], command_line="third")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spectra.h5"]


def test_reading_tolerates_missing_parts_and_unknown_extras(full, tmp_path):
    path = tmp_path / "evolved.h5"
    (group,) = write_analyses(path, [full], command_line="x")
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
        f.attrs["new_root_attr"] = "whatever"
        g = f["checkpoints"][group]
        g.attrs["new_provenance"] = 7
        g["eigenvalues"].attrs["new_solver_attr"] = 1.0
        g.create_group("hessian_diagonal").create_dataset("values", data=np.ones(3))
        del g["trace"], g["residuals"], g["converged"], g["alignment/minibatch_std"]
        del g["eigenvalue_errors"], g["eigenvalues"].attrs["criterion"]
        del g["eigenvalues"].attrs["tol"]
        del f["series"], f["history"]
        old = f["checkpoints"].create_group("old")  # as a minimal older writer might leave it
        old.create_dataset("eigenvalues", data=np.array([2.0, 1.0]))
    by_name = {d["name"]: d for d in read_analyses(path)}
    first, second = by_name[full.name], by_name["old"]
    expected = as_json(full)
    assert first["provenance"] == expected["provenance"] | {"new_provenance": 7}
    assert first["trace"] is None
    assert first["eigen"]["eigenvalues"] == expected["eigen"]["eigenvalues"]
    assert first["eigen"]["residuals"] == [None] * 3
    assert first["eigen"]["converged"] == [False] * 3  # unknown never reads as converged
    assert first["eigen"]["errors"] == [None] * 3
    assert first["eigen"]["criterion"] == "residual"  # what files before the option meant
    assert first["eigen"]["tol"] is None
    assert first["alignment"]["minibatch"]["std"] == []
    assert first["density"] == expected["density"]
    assert second["name"] == "old" and second["loss"] is None
    assert second["eigen"]["eigenvalues"] == [2.0, 1.0]
    assert second["trace"] is second["density"] is second["alignment"] is None


def damage_attributes(path, group: str) -> None:
    """Overwrite bytes of ``group``'s attribute index (a B-tree leaf, whose checksum then fails)."""
    with h5py.File(path, "r") as f:
        address = h5py.h5o.get_info(f[group].id).addr
    data = bytearray(path.read_bytes())
    at = data.find(b"BTLF", address)
    assert at > 0, "no attribute index: the group keeps its attributes in its header"
    data[at + 8 : at + 16] = b"\xff" * 8
    path.write_bytes(bytes(data))


def test_a_damaged_group_is_named_and_never_appended_to(full, tmp_path):
    path = tmp_path / "spectra.h5"
    write_analyses(path, [variant(full, "a", 1), variant(full, "b", 2)], command_line="x")
    damage_attributes(path, "checkpoints/a")
    before = path.read_bytes()
    with pytest.raises(UserError, match="its checkpoint group 'a' is damaged"):
        read_analyses(path)
    with pytest.raises(UserError, match="is damaged .*choose another --out"):
        check_writable(path)  # before the work whose results could not be read back
    with pytest.raises(UserError, match="is damaged"):
        write_analyses(path, [variant(full, "c", 3)], command_line="y")
    assert path.read_bytes() == before


def damage_header(path, name: str) -> None:
    """Overwrite the start of object ``name``'s header: h5py can no longer open it."""
    with h5py.File(path, "r") as f:
        address = h5py.h5o.get_info(f[name].id).addr
    data = bytearray(path.read_bytes())
    data[address : address + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["checkpoints/b", "checkpoints/b/trace"])
def test_an_object_that_cannot_be_opened_is_refused_not_left_out(full, tmp_path, damaged):
    """h5py's items() and get() give None for it: show and plot dropped the checkpoint (or read
    its trace as never estimated) and exited 0."""
    path = tmp_path / "spectra.h5"
    write_analyses(path, [variant(full, "a", 1), variant(full, "b", 2)], command_line="x")
    damage_header(path, damaged)
    with pytest.raises(UserError, match="its checkpoint group 'b' is damaged"):
        read_analyses(path)
    for args in (["show"], ["show", "--json"], ["plot", "-o", str(tmp_path / "fig.png")]):
        result = _cli(*args, str(path))
        assert isinstance(result.exception, UserError), (args, result.output)


def test_links_to_nothing_are_no_checkpoints_and_no_columns(full, tmp_path):
    """A soft or external link whose target is gone is not damage: refusing it refused files
    that read before."""
    path = tmp_path / "spectra.h5"
    write_analyses(path, [variant(full, "a", 1)], command_line="x")
    with h5py.File(path, "r+") as f:
        f["checkpoints/gone"] = h5py.SoftLink("/nowhere")
        f["checkpoints/away"] = h5py.ExternalLink(str(tmp_path / "missing.h5"), "/g")
        del f["checkpoints/a/alignment"]
        f["checkpoints/a/alignment"] = h5py.SoftLink("/nowhere")  # a section: none
    (read,) = read_analyses(path)
    assert read["name"] == "a" and read["alignment"] is None and read["trace"] is not None
    metrics = tmp_path / "metrics.h5"
    metrics_file(metrics, {"steps/step": np.arange(3), "steps/loss": np.ones(3)})
    with h5py.File(metrics, "r+") as f:
        f["steps/gone"] = h5py.SoftLink("/nowhere")
        f["gone"] = h5py.ExternalLink(str(tmp_path / "missing.h5"), "/g")
    from hessian_cli.storage import read_metrics

    assert list(read_metrics(metrics)) == ["steps"]
    assert sorted(read_metrics(metrics)["steps"]) == ["loss", "step"]


def metrics_file(path, columns: dict) -> None:
    """A metrics file (format version 1) holding ``columns``, named ``group/column``."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "hessian-cli-metrics"
        f.attrs["format_version"] = 1
        for name, values in columns.items():
            f[name] = values


def test_a_metrics_column_that_cannot_be_opened_is_refused_not_left_out(tmp_path):
    from hessian_cli.storage import read_metrics

    path = tmp_path / "metrics.h5"
    columns = {"steps/step": np.arange(6), "steps/loss": np.ones(6)}
    metrics_file(path, columns | {"epochs/epoch": np.arange(2), "epochs/test_loss": np.ones(2)})
    damage_header(path, "epochs/test_loss")
    with pytest.raises(UserError, match="damaged"):
        read_metrics(path)


def test_groups_missing_from_the_series_list_follow_their_steps(full, tmp_path):
    path = tmp_path / "spectra.h5"
    steps = (1, 10, 2, 100)
    write_analyses(path, [variant(full, f"ckpt_{s}", s) for s in steps], command_line="x")
    with h5py.File(path, "r+") as f:  # as a foreign or older writer leaves it
        del f["series"]
    assert group_names(path) == ["ckpt_1", "ckpt_2", "ckpt_10", "ckpt_100"]


def test_a_group_listed_twice_in_the_series_is_read_once(full, tmp_path):
    path = tmp_path / "spectra.h5"
    write_analyses(path, [variant(full, f"ckpt_{s}", s) for s in (1, 2)], command_line="x")
    with h5py.File(path, "r+") as f:  # as a foreign writer may leave it
        hdf5._append_strings(f, "series", ["ckpt_1"])
    assert group_names(path) == ["ckpt_1", "ckpt_2"]
    assert [a["name"] for a in read_analyses(path)] == ["ckpt_1", "ckpt_2"]


def test_a_history_entry_that_is_not_json_is_kept_as_text(full, tmp_path):
    path = tmp_path / "spectra.h5"
    write_analyses(path, [full], command_line="x")
    with h5py.File(path, "r+") as f:
        hdf5._append_strings(f, "history", ["checked by hand, 2026-11-29"])
    history = read_file_info(path)["history"]
    assert history[0]["command_line"] == "x" and history[1] == "checked by hand, 2026-11-29"


def test_a_series_list_that_cannot_grow_is_refused_before_the_work(full, tmp_path):
    path = tmp_path / "spectra.h5"
    write_analyses(path, [full], command_line="x")
    with h5py.File(path, "r+") as f:
        names = list(f["series"].asstr()[()])
        del f["series"]
        f.create_dataset("series", data=names, dtype=h5py.string_dtype())  # fixed size
    with pytest.raises(UserError, match="/series cannot grow"):
        check_writable(path)


def _checkpoints_dataset(f: h5py.File) -> None:
    del f["checkpoints"]
    f["checkpoints"] = np.arange(3)


def _numbers_list(name: str, dtype: type) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:  # resizable, as ours are, but not strings
        del f[name]
        f.create_dataset(name, shape=(1,), maxshape=(None,), dtype=dtype)

    return change


def _version(value: object) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        f.attrs["format_version"] = value

    return change


def _external_link(f: h5py.File) -> None:
    f["checkpoints/elsewhere"] = h5py.ExternalLink(f.filename + ".other", "/x")


def _text_eigenvalues(f: h5py.File) -> None:
    g = next(iter(f["checkpoints"].values()))
    del g["eigenvalues"]
    g["eigenvalues"] = [b"a", b"b", b"c"]


@pytest.mark.parametrize(
    "change, why",
    [
        (_checkpoints_dataset, "/checkpoints is not a group"),
        (_numbers_list("series", np.int64), "/series does not hold strings"),
        (_numbers_list("history", np.float64), "/history does not hold strings"),
        (_version("two"), "its format_version is not an integer"),
        (_version(np.array([2, 2])), "its format_version is not an integer"),
        # Edited in memory, HDF5 opened the link's target through the same buffer, and the
        # appended file could come out truncated.
        (_external_link, "/checkpoints/elsewhere is a link to another file"),
        (_text_eigenvalues, "could not convert string to float"),  # what `show` refuses
    ],
)
def test_a_foreign_layout_is_refused_before_the_work(full, tmp_path, change, why):
    """Each failed only once the analysis had run (its results lost), or broke the file."""
    path = tmp_path / "spectra.h5"
    write_analyses(path, [full], command_line="x")
    with h5py.File(path, "r+") as f:
        change(f)
    before = path.read_bytes()
    with pytest.raises(UserError, match="not laid out as docs/hdf5.md says") as refused:
        check_writable(path)
    assert why in str(refused.value) and "refusing to add to it" in str(refused.value)
    with pytest.raises(UserError, match="not laid out as docs/hdf5.md says"):
        write_analyses(path, [variant(full, "b", 2)], command_line="y")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spectra.h5"]


def _replace(name: str, data: object) -> Callable[[h5py.Group], None]:
    def change(g: h5py.Group) -> None:
        attrs = dict(g[name].attrs)
        del g[name]
        g[name] = data
        g[name].attrs.update(attrs)

    return change


def _attrs(**values: object) -> Callable[[h5py.Group], None]:
    def change(g: h5py.Group) -> None:
        g.attrs.update(values)

    return change


def _delete(name: str) -> Callable[[h5py.Group], None]:
    def change(g: h5py.Group) -> None:
        del g[name]

    return change


def _cli(*args: str):
    """``hessian-cli ARGS`` in this process; a UserError is what the CLI prints with status 2."""
    from typer.testing import CliRunner

    import hessian_cli.cli.commands  # noqa: F401  (registers the commands)
    from hessian_cli.cli.app import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    "change, why",
    [
        (_replace("name", np.array([b"a", b"b"])), "name has shape (2,), not a single string"),
        (_replace("eigenvalues", np.ones((2, 3))), "eigenvalues has shape (2, 3)"),
        (_replace("eigenvalues", np.arange(5.0)), "residuals has length 3, eigenvalues 5"),
        (_replace("converged", [b"yes", b"no", b"yes"]), "converged holds text, not 0 and 1"),
        # What the table formats as numbers: refused for --json and plot as well.
        (_attrs(hvps="x"), "invalid literal for int()"),
        (_attrs(wall_seconds="slow"), "could not convert string to float"),
        (_attrs(precision="bf16", hvp_rel_error="small"), "could not convert string to float"),
        (_delete("density/values"), "density/grid and density/values have shapes"),
        (_replace("alignment/minibatch", np.ones(3)), "alignment/minibatch has shape (3,)"),
    ],
)
def test_a_malformed_group_is_refused_alike_by_show_json_and_plot(full, tmp_path, change, why):
    path = tmp_path / "spectra.h5"
    (group,) = write_analyses(path, [full], command_line="x")
    with h5py.File(path, "r+") as f:
        change(f["checkpoints"][group])
    with pytest.raises(UserError, match="not laid out as docs/hdf5.md says") as refused:
        read_analyses(path)
    assert why in str(refused.value)
    for args in (["show"], ["show", "--json"], ["plot", "-o", str(tmp_path / "fig.png")]):
        result = _cli(*args, str(path))
        assert isinstance(result.exception, UserError), (args, result.output)
        assert why in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spectra.h5"]


def test_a_file_whose_checkpoints_are_not_a_group_is_not_read_as_empty(full, tmp_path):
    path = tmp_path / "spectra.h5"
    write_analyses(path, [full], command_line="x")
    with h5py.File(path, "r+") as f:
        del f["checkpoints"]
        f["checkpoints"] = [1, 2, 3]
    with pytest.raises(UserError, match=r"not laid out as docs/hdf5.md says \(/checkpoints is"):
        read_analyses(path)  # "0 checkpoints" was shown, exit 0


def test_only_an_exact_one_reads_as_converged(full, tmp_path):
    """docs/hdf5.md: an unknown convergence is never reported as converged."""
    path = tmp_path / "spectra.h5"
    (group,) = write_analyses(path, [full], command_line="x")
    with h5py.File(path, "r+") as f:
        _replace("converged", [0.5, np.nan, 1.0])(f["checkpoints"][group])
    assert read_analyses(path)[0]["eigen"]["converged"] == [False, False, True]
    with h5py.File(path, "r+") as f:
        _replace("converged", np.array([2, 1, 0], dtype=np.uint8))(f["checkpoints"][group])
    assert read_analyses(path)[0]["eigen"]["converged"] == [False, True, False]
    # A pair marked converged whose value or residual is not finite is not (it was shown so).
    with h5py.File(path, "r+") as f:
        g = f["checkpoints"][group]
        _replace("converged", np.array([1, 1, 1], dtype=np.uint8))(g)
        _replace("eigenvalues", np.array([np.nan, *g["eigenvalues"][1:]]))(g)
        _replace("residuals", np.array([*g["residuals"][:2], np.inf]))(g)
    assert read_analyses(path)[0]["eigen"]["converged"] == [False, True, False]


def test_a_step_that_is_not_a_number_reads_alike_everywhere(full, tmp_path):
    """Provenance is free-form: a step of text is shown as it is, ordered as unknown, and the
    plot falls back to the epochs, in all three of show, show --json and plot."""
    path = tmp_path / "spectra.h5"
    write_analyses(path, [variant(full, "a", 5), variant(full, "b", None)], command_line="x")
    with h5py.File(path, "r+") as f:
        f["checkpoints/b"].attrs["step"] = "ten"
    assert read_analyses(path)[1]["provenance"]["step"] == "ten"
    for args in (["show"], ["show", "--json"], ["plot", "-o", str(tmp_path / "fig.png")]):
        result = _cli(*args, str(path))
        assert result.exit_code == 0, (args, result.output)


@pytest.mark.parametrize("step", ["ten", "nan", "inf", np.nan])
def test_a_step_that_is_not_a_finite_number_is_ordered_as_unknown(full, tmp_path, step):
    """A foreign step of "nan" read as the float NaN, which compares false with everything:
    the series order came out as written, not by step."""
    path = tmp_path / "spectra.h5"
    write_analyses(path, [variant(full, "a", 5), variant(full, "b", 7)], command_line="x")
    with h5py.File(path, "r+") as f:
        f["checkpoints/b"].attrs["step"] = step
    write_analyses(path, [variant(full, "c", 1), variant(full, "d", 3)], command_line="x")
    assert group_names(path) == ["c", "d", "a", "b"]


def test_metrics_columns_of_different_lengths_are_refused(tmp_path):
    """A short column would be drawn against the wrong steps (read_metrics' promise)."""
    from hessian_cli.storage import read_metrics

    path = tmp_path / "metrics.h5"
    columns = {"steps/step": np.arange(6), "steps/loss": np.ones(6)}
    # rows of two
    metrics_file(path, columns | {"refresh/step": [0, 3], "refresh/eigenvalue": np.ones((2, 2))})
    assert read_metrics(path)["refresh"]["eigenvalue"].shape == (2, 2)
    with h5py.File(path, "r+") as f:
        del f["steps/loss"]
        f["steps/loss"] = np.ones(3)
    with pytest.raises(UserError, match=r"columns of /steps differ in length \(loss 3, step 6\)"):
        read_metrics(path)
    for args in (["show"], ["show", "--json"], ["plot", "-o", str(tmp_path / "fig.png")]):
        result = _cli(*args, str(path))
        assert isinstance(result.exception, UserError), (args, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.h5"]


def test_undefined_scores_are_stored_as_nan_attributes(full, tmp_path):
    """docs/hdf5.md: an undefined score (curvature_ratio where lambda_1 <= 0, sam_sharpness
    where the perturbed loss overflows) is NaN in the file, read back as null; the attribute
    was left out, so a plain h5py reader of the documented layout found no such key."""
    nan = float("nan")
    alignment = dataclasses.replace(full.alignment, curvature_ratio=nan, sam_sharpness=nan)
    trace = dataclasses.replace(full.trace, stderr=nan)
    eigen = dataclasses.replace(full.eigen, scale=float("inf"))
    a = dataclasses.replace(full, alignment=alignment, trace=trace, eigen=eigen)
    path = tmp_path / "undefined.h5"
    (name,) = write_analyses(path, [a], command_line="x")
    with h5py.File(path) as f:
        g = f["checkpoints"][name]
        assert np.isnan(g["alignment"].attrs["curvature_ratio"])
        assert np.isnan(g["alignment"].attrs["sam_sharpness"])
        assert np.isnan(g["trace"].attrs["stderr"])
        assert np.isnan(g["eigenvalues"].attrs["scale"])
    (read,) = read_analyses(path)
    assert read == as_json(a)
    assert read["alignment"]["sam_sharpness"] is None and read["trace"]["stderr"] is None


def test_no_minibatch_alignment_is_stored_as_zero_rows_of_k(full, tmp_path):
    """docs/hdf5.md: alignment/minibatch is [M, k]; with M = 0 (--minibatches 0) it was stored
    as shape (0,), which a reader indexing its columns could not take."""
    k = len(full.alignment.alignment)
    none = full.alignment.minibatch_alignment[:0]
    a = dataclasses.replace(
        full, alignment=dataclasses.replace(full.alignment, minibatch_alignment=none)
    )
    path = tmp_path / "no_minibatch.h5"
    (name,) = write_analyses(path, [a], command_line="x")
    with h5py.File(path) as f:
        assert f["checkpoints"][name]["alignment/minibatch"].shape == (0, k)
    assert read_analyses(path) == [as_json(a)]


def test_a_name_the_file_system_takes_is_written_however_long(full, capsys, tmp_path):
    """A 250-byte name is valid (255 is the most), but the temporary file beside it, the name
    and 18 more, was not: `plot -o` and `analyze --out` said "file name too long" of it."""
    from cli_runner import run

    longest = os.pathconf(tmp_path, "PC_NAME_MAX")
    spectra = tmp_path / ("s" * (longest - 3) + ".h5")
    write_analyses(spectra, [full], command_line="x")
    write_analyses(spectra, [variant(full, "b", 50)], command_line="y")  # appended to
    assert sorted(d["name"] for d in read_analyses(spectra)) == ["b", full.name]
    figure = tmp_path / ("é" * ((longest - 4) // 2) + ".png")  # two bytes a letter
    code, out, err = run(capsys, "plot", spectra, "-c", "b", "-o", figure)
    assert code == 0 and out == f"wrote {figure}\n", err
    assert sorted(tmp_path.iterdir()) == sorted([spectra, figure])


def test_show_reads_no_package_metadata(full, tmp_path):
    """Both storage modules read the version at import, twice each: `show` read the package
    metadata four times (5-20 ms each) to write nothing."""
    spectra = tmp_path / "spectra.h5"
    write_analyses(spectra, [full], command_line="x")
    from hessian_cli.storage.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.h5", {"model": "mlp"})
    log.flush()
    code = (
        "import importlib.metadata, sys\n"
        "def refused(name): raise SystemExit('the package metadata was read')\n"
        "importlib.metadata.version = refused\n"
        "sys.argv = ['hessian-cli', *sys.argv[1:]]\n"
        "from hessian_cli.cli import main\n"
        "main()\n"
    )
    for file in (spectra, log.path):
        done = subprocess.run(
            [sys.executable, "-c", code, "show", str(file)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr


def test_an_append_removes_the_copy_a_killed_writer_of_a_long_named_file_left(full, tmp_path):
    """The temporary name of a file named near the file system's limit is cut short, which the
    leftover's pattern (the whole name) never matched: every kill -9 left a copy for good."""
    longest = os.pathconf(tmp_path, "PC_NAME_MAX")
    path = tmp_path / ("s" * (longest - 3) + ".h5")
    write_analyses(path, [variant(full, "a", 1)], command_line="x")
    killed = tmp_path / f".{'s' * (longest - 18)}.0123456789ab.tmp"  # atomic_path's name for it
    killed.write_bytes(path.read_bytes())
    other = tmp_path / f".{'s' * (longest - 19)}t.0123456789ab.tmp"  # another file's
    other.write_bytes(b"another file's")
    write_analyses(path, [variant(full, "b", 2)], command_line="y")
    assert sorted(tmp_path.iterdir()) == sorted([other, path])
