"""Stop requests with real signals sent to this process and a real request file: the handler only
records the request, the strongest wins, the request file is rank 0's, agreement without a process
group is the local request, the acknowledgement file is replaced atomically, handlers are restored."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch

from ftcluster.preemption import (NONE, PREEMPT, PREEMPT_REQUEST_ENV, PREEMPT_SAVED_ENV, TERMINATE, StopReason,
                                  StopRequests, exit_code)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def previous_handler(signum, frame):  # type: ignore[no-untyped-def]
    raise AssertionError(f"the handler in place before StopRequests ran for signal {signum}")


@pytest.fixture
def handlers() -> Iterator[None]:
    """Install a known handler for SIGUSR1/SIGTERM, so that restoring can be checked; put back
    whatever pytest had afterwards."""
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, previous_handler)
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.fixture
def requests(handlers: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[StopRequests]:
    monkeypatch.delenv(PREEMPT_REQUEST_ENV, raising=False)
    r = StopRequests(is_main=True)
    yield r
    r.close()


def send(sig: signal.Signals) -> None:
    """A real signal to this process. CPython runs the Python-level handler in the main thread
    before the next bytecode, so the flag is set when os.kill returns."""
    os.kill(os.getpid(), sig)


def test_no_request_by_default(requests: StopRequests) -> None:
    assert requests.local() == NONE


def test_sigusr1_is_a_preempt_request_and_nothing_else(requests: StopRequests) -> None:
    send(signal.SIGUSR1)
    assert requests.local() == PREEMPT  # and this process is alive, in this very test


def test_sigterm_is_a_terminate_request_not_an_exit(requests: StopRequests) -> None:
    send(signal.SIGTERM)  # the default action would kill the test process
    assert requests.local() == TERMINATE


@pytest.mark.parametrize("order", [(signal.SIGUSR1, signal.SIGTERM), (signal.SIGTERM, signal.SIGUSR1)])
def test_strongest_request_wins(requests: StopRequests, order: tuple[signal.Signals, signal.Signals]) -> None:
    for sig in order:
        send(sig)
    assert requests.local() == TERMINATE


def test_close_restores_the_previous_handlers(handlers: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PREEMPT_REQUEST_ENV, raising=False)
    r = StopRequests(is_main=True)
    assert all(signal.getsignal(s) not in (previous_handler, signal.SIG_DFL) for s in SIGNALS), "installed its own"
    r.close()
    assert [signal.getsignal(s) for s in SIGNALS] == [previous_handler, previous_handler]
    r.close()  # twice is harmless
    assert [signal.getsignal(s) for s in SIGNALS] == [previous_handler, previous_handler]


def test_off_the_main_thread_no_handler_is_installed(handlers: None, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """Ray Train runs train() in a worker thread, where Python cannot install signal handlers."""
    flag = tmp_path / "preempt"
    monkeypatch.setenv(PREEMPT_REQUEST_ENV, str(flag))
    out: dict[str, object] = {}

    def body() -> None:
        try:
            r = StopRequests(is_main=True)
            flag.touch()
            out["local"] = r.local()
            r.close()
        except BaseException as e:  # noqa: BLE001 - carried to the main thread and asserted there
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert "error" not in out, out.get("error")
    assert out["local"] == PREEMPT, "the request file still works off the main thread"
    assert [signal.getsignal(s) for s in SIGNALS] == [previous_handler, previous_handler]


def test_request_file_is_seen_by_the_main_rank_only(handlers: None, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    flag = tmp_path / "preempt-request"
    monkeypatch.setenv(PREEMPT_REQUEST_ENV, str(flag))
    other = StopRequests(is_main=False)
    try:
        flag.touch()
        assert other.local() == NONE, "only rank 0 looks at the request file"
    finally:
        other.close()
    flag.unlink()
    main = StopRequests(is_main=True)  # one instance at a time: the newest owns the signal handlers
    try:
        assert main.local() == NONE, "the file does not exist yet"
        flag.touch()
        assert main.local() == PREEMPT
        flag.unlink()
        assert main.local() == PREEMPT, "a request, once seen, stays"
        send(signal.SIGTERM)
        assert main.local() == TERMINATE, "a stronger signal still wins over the file"
    finally:
        main.close()


def test_agreed_without_a_process_group_is_the_local_request(requests: StopRequests) -> None:
    assert not torch.distributed.is_initialized()
    t = requests.agreed(torch.device("cpu"))
    assert t.dim() == 0 and not t.is_floating_point() and t.device.type == "cpu" and t.item() == NONE
    send(signal.SIGUSR1)
    assert requests.agreed(torch.device("cpu")).item() == PREEMPT
    send(signal.SIGTERM)
    assert requests.agreed(torch.device("cpu")).item() == TERMINATE


def test_acknowledge_replaces_the_saved_file_atomically(requests: StopRequests, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    saved = tmp_path / "preempt-saved"
    saved.write_text("an older acknowledgement\n")
    old_inode = saved.stat().st_ino
    monkeypatch.setenv(PREEMPT_SAVED_ENV, str(saved))
    requests.acknowledge(step=12, checkpoint=tmp_path / "checkpoints" / "step_12")
    text = saved.read_text()
    assert text.split() == ["step", "12", str(tmp_path / "checkpoints" / "step_12")]
    assert saved.stat().st_ino != old_inode, "written to a new file and renamed over the old one, not rewritten in place"
    assert [p.name for p in tmp_path.iterdir()] == ["preempt-saved"], "no temporary file left behind"
    requests.acknowledge(step=13, checkpoint=None)
    assert saved.read_text().startswith("step 13 ")


def test_acknowledge_only_on_the_main_rank_and_only_when_asked(handlers: None, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.delenv(PREEMPT_REQUEST_ENV, raising=False)
    saved = tmp_path / "preempt-saved"
    monkeypatch.setenv(PREEMPT_SAVED_ENV, str(saved))
    other = StopRequests(is_main=False)
    try:
        other.acknowledge(step=3, checkpoint=tmp_path)
    finally:
        other.close()
    assert not saved.exists()
    monkeypatch.delenv(PREEMPT_SAVED_ENV)
    main = StopRequests(is_main=True)
    try:
        main.acknowledge(step=3, checkpoint=tmp_path)  # no file named: nothing to write, nothing raised
    finally:
        main.close()
    assert list(tmp_path.iterdir()) == []


def test_exit_codes() -> None:
    assert exit_code(StopReason.FINISHED) == 0
    assert exit_code(StopReason.PREEMPTED) == 0, "a preempted run stops cleanly (the job script requeues it)"
    assert exit_code(StopReason.TERMINATED) == 128 + signal.SIGTERM == 143
    assert StopReason(PREEMPT) is StopReason.PREEMPTED and StopReason(TERMINATE) is StopReason.TERMINATED
