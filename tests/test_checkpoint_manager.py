"""The checkpoint manager on its own (testing layer 1): one process, no process group, a real
filesystem under tmp_path. `barrier()` is a no-op without torch.distributed, so rank 0 of a world
of one runs the whole commit protocol. The engine is a tiny real one (a tensor written with
torch.save), not a mock of the manager."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from ftcluster import checkpoint as ckpt_mod
from ftcluster.checkpoint import CheckpointManager, Loaded, RNGState, committed_checkpoints, read_meta
from ftcluster.config import CheckpointConfig
from ftcluster.distributed import Dist

CPU = torch.device("cpu")
ONE = Dist(rank=0, world_size=1, local_rank=0, device=CPU)
CONFIG_YAML = "run:\n  name: unit\n"


class TensorEngine:
    """The smallest real engine: one tensor, saved into and loaded from the directory it is given."""

    def __init__(self, value: float = 0.0) -> None:
        self.weight = torch.full((3,), value)

    def save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"weight": self.weight}, directory / "weight.pt")

    def load_state(self, directory: Path) -> None:
        self.weight = torch.load(directory / "weight.pt", weights_only=True)["weight"]


class Progress:
    """A global Stateful of plain types (what the loop's train progress looks like)."""

    def __init__(self, step: int = 0, tokens: int = 0) -> None:
        self.step, self.tokens = step, tokens

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = state["step"], state["tokens"]


class Position:
    """A per-rank Stateful holding a tensor (rank_<r>.pt must carry tensors, loaded weights_only)."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = torch.tensor([offset])

    def state_dict(self) -> dict[str, Any]:
        return {"offset": self.offset.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.offset = state["offset"]


def manager(run_dir: Path, *, keep_last: int = 2, every_steps: int = 5, enabled: bool = True,
            dist_info: Dist = ONE) -> CheckpointManager:
    cfg = CheckpointConfig(every_steps=every_steps, keep_last=keep_last, enabled=enabled)
    return CheckpointManager(run_dir, cfg=cfg, dist_info=dist_info)


def save(m: CheckpointManager, step: int, *, value: float | None = None, before_commit=None) -> float:  # type: ignore[no-untyped-def]
    """Save `step` with an engine whose tensor is `value` (default: the step) and progress = step."""
    engine = TensorEngine(float(step if value is None else value))
    return m.save(step=step, engine=engine, state={"progress": Progress(step, 100 * step)},
                  rank_state={"position": Position(step)}, config_yaml=CONFIG_YAML, before_commit=before_commit)


def saved_weight(path: Path) -> torch.Tensor:
    e = TensorEngine()
    e.load_state(path / "engine")
    return e.weight


def names(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").iterdir()}


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under a checkpoint directory, by relative path, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class Boom(Exception):
    """Stands for a crash (kill -9, a dead node) at the point it is raised: nothing after it runs."""


def crash() -> None:
    """A `before_commit` hook: the process dies between the last write and the commit."""
    raise Boom("killed between the last write and the commit")


# --- cadence ----------------------------------------------------------------------------------------

def test_due_every_n_steps_and_the_last_one(tmp_path: Path) -> None:
    m = manager(tmp_path, every_steps=3)
    assert [s for s in range(1, 11) if m.due(s, last=False)] == [3, 6, 9]
    assert m.due(10, last=True) and m.due(7, last=True)
    only_end = manager(tmp_path, every_steps=0)
    assert not any(only_end.due(s, last=False) for s in range(1, 20))
    assert only_end.due(20, last=True)


def test_never_due_when_disabled(tmp_path: Path) -> None:
    m = manager(tmp_path, every_steps=1, enabled=False)
    assert not any(m.due(s, last=last) for s in range(1, 5) for last in (False, True))


# --- commit -----------------------------------------------------------------------------------------

def test_commit_layout(tmp_path: Path) -> None:
    m = manager(tmp_path)
    seconds = save(m, 5)
    assert isinstance(seconds, float) and seconds >= 0
    step5 = tmp_path / "checkpoints" / "step_5"
    assert names(tmp_path) == {"step_5"}, "no .tmp-* directory may be left after a commit"
    meta = json.loads((step5 / "meta.json").read_text())
    assert meta["step"] == 5 and meta["world_size"] == 1
    assert meta["progress"] == {"step": 5, "tokens": 500}
    assert read_meta(step5) == meta
    assert (step5 / "config.yaml").read_text() == CONFIG_YAML
    rank0 = torch.load(step5 / "rank_0.pt", weights_only=True)
    assert set(rank0) == {"position"} and torch.equal(rank0["position"]["offset"], torch.tensor([5]))
    assert torch.equal(saved_weight(step5), torch.full((3,), 5.0))
    assert not list(step5.rglob("*.part")), "rank files are written to a .part file and renamed"
    assert m.committed() == [step5] == committed_checkpoints(tmp_path)
    assert m.latest() == step5


def test_round_trip_restores_state_engine_and_rng(tmp_path: Path) -> None:
    m = manager(tmp_path)
    engine, progress, position, rng = TensorEngine(1.5), Progress(7, 700), Position(3), RNGState()
    torch.manual_seed(1234)
    m.save(step=7, engine=engine, state={"progress": progress}, rank_state={"position": position, "rng": rng},
           config_yaml=CONFIG_YAML)
    after_save = torch.rand(4)  # what the run draws next, had it continued

    # The process goes on (or a new one starts) and everything drifts.
    engine.weight = torch.zeros(3)
    progress.step, progress.tokens = 99, 9900
    position.offset = torch.tensor([42])
    torch.manual_seed(999)
    torch.rand(10)

    loaded = m.load(m.latest(), engine=engine, state={"progress": progress},
                    rank_state={"position": position, "rng": rng})
    assert loaded == Loaded(path=tmp_path / "checkpoints" / "step_7", step=7, world_size=1, rank_state_restored=True)
    assert torch.equal(engine.weight, torch.full((3,), 1.5))
    assert (progress.step, progress.tokens) == (7, 700)
    assert torch.equal(position.offset, torch.tensor([3]))
    assert torch.equal(torch.rand(4), after_save), "the RNG continues exactly where the saved run was"


def test_load_at_another_world_size_skips_rank_state(tmp_path: Path) -> None:
    save(manager(tmp_path), 4)
    two = Dist(rank=0, world_size=2, local_rank=0, device=CPU)
    engine, progress, position = TensorEngine(), Progress(), Position(77)
    loaded = manager(tmp_path, dist_info=two).load(tmp_path / "checkpoints" / "step_4", engine=engine,
                                                   state={"progress": progress}, rank_state={"position": position})
    assert (loaded.step, loaded.world_size, loaded.rank_state_restored) == (4, 1, False)
    assert torch.equal(position.offset, torch.tensor([77])), "another world size's rank state is not applied"
    assert (progress.step, progress.tokens) == (4, 400)
    assert torch.equal(engine.weight, torch.full((3,), 4.0))


# --- retention and lookup ---------------------------------------------------------------------------

def test_keep_last_two_of_four(tmp_path: Path) -> None:
    m = manager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        save(m, step)
    ck = tmp_path / "checkpoints"
    assert m.committed() == [ck / "step_3", ck / "step_4"]
    assert names(tmp_path) == {"step_3", "step_4"}, "pruned checkpoints are deleted, not left as leftovers"
    assert torch.equal(saved_weight(ck / "step_4"), torch.full((3,), 4.0))


def test_steps_sort_numerically(tmp_path: Path) -> None:
    m = manager(tmp_path, keep_last=3)
    for step in (9, 10, 100):
        save(m, step)
    ck = tmp_path / "checkpoints"
    assert m.committed() == [ck / "step_9", ck / "step_10", ck / "step_100"]
    assert m.latest() == ck / "step_100"
    save(m, 101)
    assert m.committed() == [ck / "step_10", ck / "step_100", ck / "step_101"], "the oldest by step is pruned"


def test_resolve(tmp_path: Path) -> None:
    m = manager(tmp_path, keep_last=3)
    assert m.resolve("auto") is None and m.latest() is None and committed_checkpoints(tmp_path) == []
    for step in (2, 4):
        save(m, step)
    ck = tmp_path / "checkpoints"
    assert m.resolve("auto") == ck / "step_4"
    assert m.resolve("never") is None
    assert m.resolve(str(ck / "step_2")) == ck / "step_2"
    (ck / "step_6").mkdir()  # a directory named like a checkpoint, without meta.json
    for bad in (ck / "step_6", ck / "step_8", tmp_path):
        with pytest.raises(ValueError, match="not a committed checkpoint"):
            m.resolve(str(bad))


def test_partial_directories_are_not_committed_and_leftovers_are_removed(tmp_path: Path) -> None:
    m = manager(tmp_path, keep_last=3)
    save(m, 5)
    ck = tmp_path / "checkpoints"
    leftover = ck / ".tmp-step_9"  # a crash after the shards were written, before the commit
    (leftover / "engine").mkdir(parents=True)
    (leftover / "meta.json").write_text(json.dumps({"step": 9, "world_size": 1}))
    (ck / "step_10").mkdir()  # named like a checkpoint, never completed (no meta.json)
    (ck / "step_10" / "rank_0.pt").write_bytes(b"partial")

    assert m.committed() == [ck / "step_5"] == committed_checkpoints(tmp_path)
    assert m.latest() == ck / "step_5" == m.resolve("auto")
    save(m, 6)
    assert not leftover.exists(), "the next save removes a crashed save's .tmp- leftover"
    assert m.latest() == ck / "step_6"
    assert m.committed() == [ck / "step_5", ck / "step_6"]


def test_leftover_of_the_same_step_is_replaced(tmp_path: Path) -> None:
    m = manager(tmp_path)
    stale = tmp_path / "checkpoints" / ".tmp-step_3"
    stale.mkdir(parents=True)
    (stale / "stale.bin").write_bytes(b"x")
    save(m, 3)
    step3 = tmp_path / "checkpoints" / "step_3"
    assert not (step3 / "stale.bin").exists() and names(tmp_path) == {"step_3"}


# --- crashes and failures ---------------------------------------------------------------------------

def test_crash_before_commit_leaves_previous_checkpoints_untouched(tmp_path: Path) -> None:
    m = manager(tmp_path, keep_last=2)
    save(m, 1)
    save(m, 2)
    ck = tmp_path / "checkpoints"
    before = {p.name: snapshot(p) for p in m.committed()}
    with pytest.raises(Boom):
        save(m, 3, before_commit=crash)
    assert m.committed() == [ck / "step_1", ck / "step_2"], "no new committed checkpoint, none pruned"
    assert {p.name: snapshot(p) for p in m.committed()} == before, "previous checkpoints byte-identical"
    assert m.resolve("auto") == ck / "step_2"
    assert not (ck / "step_3").exists()

    save(m, 3)  # the restarted run saves again: it commits, and the leftover is gone
    assert names(tmp_path) == {"step_2", "step_3"}


def _failing_rmtree(monkeypatch: pytest.MonkeyPatch, doomed_suffix: str) -> list[str]:
    """A filesystem whose delete of one directory fails part-way (an NFS `.nfsXXXX` file still open,
    EACCES, EBUSY): the real rmtree removes `engine/`, then meta.json cannot be removed. The failure
    is reported the way shutil.rmtree reports it: raised, or swallowed under ignore_errors=True,
    or passed to onexc/onerror. Every other path gets the real rmtree. Returns the paths tried."""
    real_rmtree = shutil.rmtree
    tried: list[str] = []

    def rmtree(path, ignore_errors=False, onerror=None, **kw):  # type: ignore[no-untyped-def]
        p = Path(path)
        if not p.name.endswith(doomed_suffix) or not p.exists():
            return real_rmtree(path, ignore_errors, onerror, **kw)
        tried.append(p.name)
        if (p / "engine").exists():
            real_rmtree(p / "engine")
        err = OSError(16, "Device or resource busy", str(p / "meta.json"))
        if ignore_errors:
            return None
        if kw.get("onexc") is not None:  # Python >= 3.12
            return kw["onexc"](os.unlink, str(p / "meta.json"), err)
        if onerror is not None:
            return onerror(os.unlink, str(p / "meta.json"), (OSError, err, None))
        raise err

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", rmtree)
    return tried


def test_failing_delete_during_retention_commits_the_new_and_uncommits_the_pruned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = manager(tmp_path, keep_last=1)
    save(m, 1)
    ck = tmp_path / "checkpoints"
    tried = _failing_rmtree(monkeypatch, "step_1")
    save(m, 2)  # must not raise: the new checkpoint is committed before retention runs
    assert tried, "the failing delete was exercised"
    assert m.committed() == [ck / "step_2"], "a half-deleted checkpoint must not stay in the committed namespace"
    assert m.resolve("auto") == ck / "step_2"
    engine, progress = TensorEngine(), Progress()
    loaded = m.load(ck / "step_2", engine=engine, state={"progress": progress}, rank_state={"position": Position()})
    assert loaded.step == 2 and torch.equal(engine.weight, torch.full((3,), 2.0)) and progress.step == 2

    monkeypatch.undo()  # the filesystem recovers: the next save cleans the leftover up
    save(m, 3)
    assert names(tmp_path) == {"step_3"}


def test_resave_of_an_existing_step_replaces_it(tmp_path: Path) -> None:
    m = manager(tmp_path, keep_last=2)
    save(m, 2)
    save(m, 3, value=30.0)
    ck = tmp_path / "checkpoints"
    seen_during: list[bool] = []

    def check_old_still_committed() -> None:
        seen_during.append(torch.equal(saved_weight(ck / "step_3"), torch.full((3,), 30.0)))

    save(m, 3, value=31.0, before_commit=check_old_still_committed)
    assert seen_during == [True], "until the new one is complete the old step_3 stays committed"
    assert m.committed() == [ck / "step_2", ck / "step_3"]
    assert torch.equal(saved_weight(ck / "step_3"), torch.full((3,), 31.0))
    assert names(tmp_path) == {"step_2", "step_3"}, "the replaced copy is deleted"

    with pytest.raises(Boom):  # a crash before the swap: the old copy is kept as it was
        save(m, 3, value=32.0, before_commit=crash)
    assert torch.equal(saved_weight(ck / "step_3"), torch.full((3,), 31.0))
    assert m.committed() == [ck / "step_2", ck / "step_3"]


def test_resave_crash_during_the_swap_keeps_step_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash at any instant of re-saving step N leaves a committed step N (old or new): with
    keep_last=1 it is the only checkpoint of the run. The crash is injected at each os.rename the
    save makes (a kill -9 cannot be timed to one syscall here), and the run dir is then inspected as
    a restarted run would."""
    real_rename = os.rename
    for crash_at in (1, 2):  # the swap is two renames: step_5 -> .tmp-old-step_5, .tmp-step_5 -> step_5
        run = tmp_path / f"crash{crash_at}"
        m = manager(run, keep_last=1)
        save(m, 5, value=50.0)
        calls = 0

        def rename(src, dst, _crash_at=crash_at):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == _crash_at:
                raise Boom(f"killed at rename {calls}: {Path(src).name} -> {Path(dst).name}")
            return real_rename(src, dst)

        with monkeypatch.context() as patched:
            patched.setattr(ckpt_mod.os, "rename", rename)
            with pytest.raises(Boom):
                save(m, 5, value=51.0)
        latest = manager(run, keep_last=1).resolve("auto")
        assert latest == run / "checkpoints" / "step_5", (
            f"a crash at rename #{crash_at} while re-saving step_5 left no committed checkpoint; "
            f"the run dir holds {sorted(names(run))}")
        assert saved_weight(latest)[0].item() in (50.0, 51.0)
