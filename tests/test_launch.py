"""The launchers' shared rank logic, without a process group: what train()'s result becomes."""
from __future__ import annotations

from pathlib import Path

import pytest

import ftcluster.train
from ftcluster.launch.runner import train_rank
from ftcluster.preemption import TERMINATED_EXIT_CODE, StopReason


@pytest.mark.parametrize("result, code", [(None, 0), (StopReason.FINISHED, 0), (StopReason.PREEMPTED, 0),
                                          (StopReason.TERMINATED, TERMINATED_EXIT_CODE)])
def test_stop_reason_becomes_the_exit_code(result: StopReason | None, code: int, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    # Stand-in for train(): the real one needs a model and a process group (tests/test_train_e2e.py).
    monkeypatch.setattr(ftcluster.train, "train", lambda job, run_dir, *, on_log=None: result)
    assert train_rank(None, tmp_path) == code  # type: ignore[arg-type]


def test_a_train_that_raises_sigterms_exit_code_is_a_terminated_stop(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    def old_train(job, run_dir, *, on_log=None):  # type: ignore[no-untyped-def] - before StopReason
        raise SystemExit(TERMINATED_EXIT_CODE)

    monkeypatch.setattr(ftcluster.train, "train", old_train)
    assert train_rank(None, tmp_path) == TERMINATED_EXIT_CODE  # type: ignore[arg-type]

    def failing_train(job, run_dir, *, on_log=None):  # type: ignore[no-untyped-def]
        raise SystemExit(3)

    monkeypatch.setattr(ftcluster.train, "train", failing_train)
    with pytest.raises(SystemExit) as e:
        train_rank(None, tmp_path)  # type: ignore[arg-type]
    assert e.value.code == 3


def test_launch_never_imports_the_driver() -> None:
    """DESIGN.md: launch/ sits below the driver (cli -> driver -> launch)."""
    root = Path(ftcluster.train.__file__).parent / "launch"
    offenders = [str(p) for p in root.rglob("*.py") if "ftcluster.driver" in p.read_text()
                 or "from ftcluster import driver" in p.read_text()]
    assert offenders == []
