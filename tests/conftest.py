"""Shared helpers: run the real CLI in a subprocess and read what a run left behind."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ftcluster.compose import compose_job  # noqa: F401 - tests import it from here

REPO = Path(__file__).resolve().parent.parent

# Scheduling under pytest-xdist (the README's `-n 2 --dist loadgroup`): a file whose module-scoped fixture
# trains real runs (or builds engines) is one xdist group, so the fixture is built once, not once per worker;
# the tests that start a Ray cluster or submit to the one-node Slurm share one group, so they take turns on
# those services instead of running on both workers at once (two Ray clusters on one host could collide on
# Ray's default ports, the dashboard agent's 52365); every other test, the pure-logic and config-error tests
# of the cluster files included, is dealt to whichever worker is free (with one group per file, CI took 56
# minutes against 45 before, 2026-12-02; the likely cause: a long file holds one worker while the other
# idles). A cluster test is one that requests the Ray test cluster (`ray_env`) or the Slurm (`slurm`), or is
# marked `cluster` (a sweep that starts its own Ray): 13 tests, the longest group, on one worker; its
# pure-logic neighbours (37 tests, 2026-12-03) fill the other worker instead of queueing behind it. xdist
# deals the groups with the most tests first (loadscope reorder), so the groups start before the single tests.
# tryfirst: xdist's own collection hook turns xdist_group markers into node ids, so ours must add them before
# it runs (without it, found 2026-12-02, no test was grouped: `-v` showed no `@<group>` suffix).
CLUSTER_TEST_FILES = frozenset({"test_ray.py", "test_slurm.py", "test_sweep.py"})
CLUSTER_FIXTURES = frozenset({"ray_env", "slurm"})
TRAINED_FIXTURE_FILES = frozenset({"test_checkpoint_integrity.py", "test_deepspeed.py", "test_export.py",
                                   "test_qlora.py", "test_shard_frozen.py", "test_sharded_load.py",
                                   "test_train_e2e.py"})


def _is_cluster_test(item: pytest.Item) -> bool:
    return item.get_closest_marker("cluster") is not None or \
        bool(CLUSTER_FIXTURES.intersection(getattr(item, "fixturenames", ())))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = item.path.name
        if _is_cluster_test(item):
            assert name in CLUSTER_TEST_FILES, f"{item.nodeid}: a cluster test outside {sorted(CLUSTER_TEST_FILES)}"
            item.add_marker(pytest.mark.xdist_group("cluster"))
        elif name in TRAINED_FIXTURE_FILES:
            item.add_marker(pytest.mark.xdist_group(name))


# For runs whose test reads only their training records and checkpoints: one held-out batch at the
# end and no generated samples, instead of every held-out batch at the start and at the end and two
# 64-token samples (a few seconds a run on 2 cores, more under ZeRO-3). Evaluation leaves training
# bit-identical (test_evaluation.py), so the steps' losses and the checkpoints are the same.
LIGHT_EVAL = ["eval.at_start=false", "eval.max_batches=1", "eval.num_prompts=0"]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None,
            new_session: bool = False) -> subprocess.CompletedProcess:
    """`python -m ftcluster <args>` as a user would run it (a new process, its own cwd)."""
    return subprocess.run([sys.executable, "-m", "ftcluster", *args], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout, start_new_session=new_session)


def train_ok(*args: str, run: Path, cwd: Path, env: dict[str, str] | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """`ftcluster train <args> run.dir=<run>`, which must succeed."""
    p = run_cli("train", *args, f"run.dir={run}", cwd=cwd, env=env, timeout=timeout)
    assert p.returncode == 0, explain(p)
    return p


@contextlib.contextmanager
def one_gloo_rank_engine(job, built):  # type: ignore[no-untyped-def]
    """`parallelize` of a built module on a one-process gloo group, in this process: the real
    engine of the job's backend with the seed's weights (used with FSDP2; DeepSpeed's engines are
    tested in subprocesses). The group is destroyed on exit."""
    import socket

    import torch
    import torch.distributed as dist

    from ftcluster.distributed import Dist
    from ftcluster.model import materialize
    from ftcluster.parallel import parallelize

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        yield parallelize(built.module, layers=built.layers, job=job, dist=d,
                          materialize=lambda m, dev, view: materialize(m, cfg=job.model, seed=job.seed, device=dev,
                                                                       shard_view=view))
    finally:
        dist.destroy_process_group()


def live_adapter_module(job):  # type: ignore[no-untyped-def]
    """`build_module(job).module` materialised on the CPU from the job's seed, with every LoRA B set
    to small seeded values (B starts at zero, which would make the adapters' update vanish and
    their A-gradients zero, so a broken update could not show)."""
    import torch

    from ftcluster.model import build_module, materialize

    module = build_module(job).module
    materialize(module, cfg=job.model, seed=job.seed, device=torch.device("cpu"))
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    return module


def lm_batch(ids, labels=None):  # type: ignore[no-untyped-def]
    """A typed Batch of token ids whose (already shifted) labels are `labels` (default: the ids)."""
    from ftcluster.data import IGNORE_INDEX, Batch

    labels = ids if labels is None else labels
    return Batch(input_ids=ids, labels=labels, num_tokens=int(ids.numel()),
                 num_supervised=int((labels != IGNORE_INDEX).sum()))


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (a resumed run re-doing it) keeps the last value."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in records(run_dir) if r.get("event") == name]


def committed_steps(run_dir: Path) -> list[int]:
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in ck.iterdir()
                  if p.name.startswith("step_") and (p / "meta.json").is_file())


# A console line that is not ours (issue 16): a Python warning, a logger's level tag, a traceback,
# Ray's forwarded-output prefix or a C++ log line, colour codes, a tqdm bar, Slurm's step noise.
THIRD_PARTY = re.compile(r"Warning|WARNING|warnings\.warn|Traceback|\x1b\[|\(\w* ?pid=\d+|Failed to query|"
                         r"core_worker|examples/s|it/s\]|\d+%\||srun: error|CANCELLED")


def third_party_lines(text: str) -> list[str]:
    """The lines of a healthy run's console output that a library, not ftcluster, printed."""
    return [ln for ln in text.splitlines() if THIRD_PARTY.search(ln)]


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def pytest_configure(config: pytest.Config) -> None:
    """Tidy by default (issue 16): the session's temporary files, pytest's base temp and whatever
    the processes the tests start put in $TMPDIR (Ray's session dirs, torch elastic's run dirs),
    live under one fresh directory, removed when the session ends; nothing is left in the system
    temp dir. An explicit --basetemp, or FTC_KEEP_TMP=1 (to inspect a failure), keeps it."""
    if config.option.basetemp is not None or hasattr(config, "workerinput"):
        return
    root = Path(tempfile.mkdtemp(prefix="ftc-pytest-"))
    config.option.basetemp = str(root / "pytest")
    if "TMPDIR" not in os.environ:  # the user's own choice wins
        (root / "tmp").mkdir()
        os.environ["TMPDIR"] = str(root / "tmp")  # inherited by every subprocess a test starts
        tempfile.tempdir = None  # recomputed from TMPDIR on next use
    config.stash[_SESSION_TMP] = root


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(_SESSION_TMP, None)
    if root is not None and not os.environ.get("FTC_KEEP_TMP"):
        shutil.rmtree(root, ignore_errors=True)


_SESSION_TMP = pytest.StashKey[Path]()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
