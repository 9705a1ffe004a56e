"""Checkpoint integrity (issue 15, items 1, 2, 7): manifest + verification with fallback, no code
from a checkpoint, I/O errors in words. Unit tests use the manager with a tiny real engine (as
test_checkpoint_manager.py); the slow ones run the real CLI (FSDP2, ZeRO-3) on the tiny model."""
from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import LIGHT_EVAL, events, explain, losses, run_cli, train_ok
from ftcluster.checkpoint_integrity import CheckpointIOError, CorruptCheckpointError, verify
from test_checkpoint_manager import CONFIG_YAML, Position, Progress, TensorEngine, manager, save, snapshot


class Marker:
    """A crafted pickle payload: unpickling it creates a file (stands for arbitrary code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.path}",))


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x40
    path.write_bytes(bytes(data))


# --- manifest and verification (unit) --------------------------------------------------------------

def test_manifest_lists_every_file(tmp_path: Path) -> None:
    m = manager(tmp_path)
    save(m, 1)
    ck = tmp_path / "checkpoints" / "step_1"
    man = json.loads((ck / "manifest.json").read_text())["files"]
    assert set(man) == {"engine/weight.pt", "rank_0.pt", "config.yaml"}
    assert man["rank_0.pt"]["size"] == (ck / "rank_0.pt").stat().st_size
    assert "manifest" in json.loads((ck / "meta.json").read_text())
    assert verify(ck).ok


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_rank"])
def test_damaged_checkpoint_is_skipped_by_auto_and_refused_by_path(tmp_path: Path, damage: str) -> None:
    m = manager(tmp_path, keep_last=3)
    save(m, 1)
    save(m, 2)
    ck = tmp_path / "checkpoints"
    bad = {"flip": "engine/weight.pt", "truncate": "engine/weight.pt", "delete_rank": "rank_0.pt"}[damage]
    f = ck / "step_2" / bad
    if damage == "flip":
        flip_byte(f)
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-7])
    else:
        f.unlink()
    assert m.resolve("auto") == ck / "step_1", "falls back to the newest checkpoint that verifies"
    assert [r.file for r in m.rejected] == [bad] and m.rejected[0].as_event()["file"] == str(f)
    with pytest.raises(CorruptCheckpointError, match=str(f)):
        m.resolve(str(ck / "step_2"))


def test_legacy_checkpoint_without_manifest_still_loads(tmp_path: Path) -> None:
    m = manager(tmp_path)
    save(m, 3)
    ck = tmp_path / "checkpoints" / "step_3"
    (ck / "manifest.json").unlink()
    meta = json.loads((ck / "meta.json").read_text())
    del meta["manifest"]
    (ck / "meta.json").write_text(json.dumps(meta))
    assert m.resolve("auto") == ck and m.rejected == []
    engine = TensorEngine()
    m.load(ck, engine=engine, state={"progress": Progress()}, rank_state={"position": Position()})
    assert torch.equal(engine.weight, torch.full((3,), 3.0))


def test_crafted_rank_file_runs_no_code(tmp_path: Path) -> None:
    m = manager(tmp_path)
    save(m, 1)
    ck = tmp_path / "checkpoints" / "step_1"
    marker = tmp_path / "PWNED"
    torch.save({"position": Marker(marker)}, ck / "rank_0.pt")
    with pytest.raises(Exception, match="rank_0.pt"):
        m.load(ck, engine=TensorEngine(), state={}, rank_state={"position": Position()})
    assert not marker.exists()


# --- I/O errors in words (real filesystems) ---------------------------------------------------------

def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = tmp_path / "fs"
    d.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d))
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


class BigEngine(TensorEngine):
    def __init__(self, mib: float) -> None:
        self.weight = torch.zeros(int(mib * (1 << 20) / 4))


def test_full_disk_says_no_space_left_and_keeps_previous(small_fs: Path) -> None:
    m = manager(small_fs, keep_last=2)
    m.save(step=1, engine=BigEngine(0.5), state={}, rank_state={}, config_yaml=CONFIG_YAML)
    before = snapshot(small_fs / "checkpoints" / "step_1")
    with pytest.raises(CheckpointIOError, match=r"no space left on device writing .*engine/weight\.pt") as e:
        m.save(step=2, engine=BigEngine(1.8), state={}, rank_state={}, config_yaml=CONFIG_YAML)
    assert e.value.errno == errno.ENOSPC
    assert m.resolve("auto") == small_fs / "checkpoints" / "step_1"
    assert snapshot(small_fs / "checkpoints" / "step_1") == before


def test_read_only_filesystem_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    m = manager(run)
    save(m, 1)
    ck = run / "checkpoints"
    try:
        _mount("--bind", str(ck), str(ck))
        _mount("-o", "remount,ro,bind", str(ck))
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("cannot bind-mount read-only here (needs root)")
    try:
        with pytest.raises(CheckpointIOError, match=r"read-only filesystem writing .*\.tmp-step_2"):
            save(m, 2)
        assert m.latest() == ck / "step_1" and verify(ck / "step_1").ok
    finally:
        subprocess.run(["umount", str(ck)], check=False)


def test_permission_denied_says_so(tmp_path: Path) -> None:
    """As an unprivileged user (root ignores modes): the checkpoints dir belongs to someone else."""
    run = tmp_path / "run"
    save(manager(run), 1)
    os.chmod(tmp_path, 0o755)
    script = (
        "import os, sys, pathlib; sys.path[:0] = [%r, %r]\n"
        "from test_checkpoint_manager import manager, save\n"
        "from ftcluster.checkpoint_integrity import CheckpointIOError\n"
        "import torch, json, shutil, zipfile, pickletools, hashlib, ftcluster.safe_load\n"
        "os.setgid(65534); os.setuid(65534)  # everything imported: the user only lacks write access\n"
        "try:\n    save(manager(__import__('pathlib').Path(%r)), 2)\n"
        "except CheckpointIOError as e:\n    print(e); sys.exit(3)\n"
    ) % (str(Path(__file__).parent), str(Path(__file__).parent.parent), str(run))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "permission denied" in p.stdout and str(run / "checkpoints") in p.stdout
    assert manager(run).latest() == run / "checkpoints" / "step_1"


# --- end to end through the CLI ---------------------------------------------------------------------

FSDP = ["launcher.nproc_per_node=1", "peft=lora", "train.max_steps=6", "checkpoint.every_steps=2",
        "checkpoint.keep_last=3", "logger=none", *LIGHT_EVAL]


@pytest.fixture(scope="module")
def fsdp_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("fsdp_ref")
    train_ok(*FSDP, run=cwd / "R", cwd=cwd)
    return cwd / "R"


def _copy_to(ref: Path, dst: Path, *, upto: int) -> Path:
    import shutil

    shutil.copytree(ref, dst)
    for p in (dst / "checkpoints").iterdir():
        if int(p.name.split("_")[1]) > upto:
            shutil.rmtree(p)
    return dst


@pytest.mark.slow
def test_fsdp_bit_flip_falls_back_with_identical_losses_and_export_refuses(fsdp_ref: Path, tmp_path: Path) -> None:
    ref = losses(fsdp_ref)
    run = _copy_to(fsdp_ref, tmp_path / "R", upto=4)
    shard = run / "checkpoints/step_4/engine/__0_0.distcp"
    flip_byte(shard)
    p = run_cli("export", str(run / "checkpoints/step_4"), str(tmp_path / "out"), cwd=tmp_path)
    assert p.returncode == 2 and "refusing to export" in p.stderr and str(shard) in p.stderr, explain(p)
    p = run_cli("train", *FSDP, f"run.dir={run}", f"resume={run}/checkpoints/step_4", cwd=tmp_path)
    assert p.returncode != 0 and str(shard) in p.stdout + p.stderr, explain(p)
    train_ok(*FSDP, run=run, cwd=tmp_path)  # resume=auto
    rej = events(run, "checkpoint_rejected")
    assert rej and rej[0]["file"] == str(shard)
    assert events(run, "resume")[-1]["step"] == 2
    got = losses(run)
    assert [got[s] for s in range(3, 7)] == [ref[s] for s in range(3, 7)]


@pytest.mark.slow
def test_fsdp_crafted_metadata_runs_no_code(fsdp_ref: Path, tmp_path: Path) -> None:
    run = _copy_to(fsdp_ref, tmp_path / "R", upto=6)
    marker = tmp_path / "PWNED"
    ck = run / "checkpoints/step_6"
    (ck / "engine/.metadata").write_bytes(pickle.dumps(Marker(marker)))
    _reseal(ck)  # a forger can write a matching manifest: only the safe loader stops it
    p = run_cli("export", str(ck), str(tmp_path / "out"), cwd=tmp_path)
    assert p.returncode == 2 and "refusing to load" in p.stderr and ".metadata" in p.stderr, explain(p)
    p = run_cli("train", *FSDP, f"run.dir={run}", "train.max_steps=8", cwd=tmp_path)
    assert p.returncode != 0 and "refusing to load" in p.stdout + p.stderr, explain(p)
    assert not marker.exists()


def _reseal(ck: Path) -> None:
    from ftcluster.checkpoint_integrity import build_manifest, write_manifest

    meta = json.loads((ck / "meta.json").read_text())
    meta["manifest"] = write_manifest(ck, build_manifest(ck, rank=0, world_size=1))
    (ck / "meta.json").write_text(json.dumps(meta))


ZERO3 = ["launcher.nproc_per_node=1", "parallel=zero3", "peft=lora", "train.max_steps=2", "checkpoint.every_steps=2",
         "logger=none", *LIGHT_EVAL]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model_states", "optim_states"])
def test_zero3_crafted_pt_runs_no_code(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, kind: str) -> None:
    import shutil

    base = tmp_path_factory.getbasetemp() / "zero3_base"
    if not base.exists():
        train_ok(*ZERO3, run=base, cwd=tmp_path)
    run = tmp_path / "R"
    shutil.copytree(base, run)
    ck = run / "checkpoints/step_2"
    target = next((ck / "engine/ds").glob(f"*{kind}.pt"))
    marker = tmp_path / "PWNED"
    torch.save({"x": Marker(marker)}, target)
    _reseal(ck)
    p = run_cli("export", str(ck), str(tmp_path / "out"), cwd=tmp_path)
    assert p.returncode == 2 and target.name in p.stderr and "refusing to load" in p.stderr, explain(p)
    p = run_cli("train", *ZERO3, f"run.dir={run}", "train.max_steps=4", cwd=tmp_path)
    assert p.returncode != 0 and "refusing to load" in p.stdout + p.stderr, explain(p)
    assert not marker.exists()


@pytest.mark.slow
def test_cli_full_disk_names_the_cause_in_console_and_rank_error(small_fs: Path, tmp_path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=7m", str(small_fs)], check=True)
    run = small_fs / "R"  # 2.6 MB per LoRA checkpoint: step_2, 4, 6 fit, step_8 does not
    p = run_cli("train", *FSDP, "train.max_steps=8", "checkpoint.keep_last=5", f"run.dir={run}", cwd=tmp_path)
    assert p.returncode != 0
    words = "checkpoint: no space left on device writing " + str(run / "checkpoints/.tmp-step_8/engine")
    assert words in p.stdout + p.stderr, explain(p)
    assert words in (run / "logs/rank0.error").read_text()
    assert [c.name for c in sorted((run / "checkpoints").glob("step_*"))] == ["step_2", "step_4", "step_6"]
    assert verify(run / "checkpoints/step_6").ok
