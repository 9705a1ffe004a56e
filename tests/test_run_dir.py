"""`prepare_run_dir(job, cfg)`, what the driver does once before any rank starts: resolve run.dir
(absolute, from the cwd), create it and logs/, save the resolved config with secrets redacted, and
refuse resume=never over a run that already has checkpoints. The config is composed by Hydra from
the shipped YAML, as the CLI does it (no process)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ftcluster import driver
from ftcluster.checkpoint import CheckpointManager
from ftcluster.compose import conf_dir, register_configs, to_job
from ftcluster.config import ConfigError
from ftcluster.distributed import Dist

SECRET = "s3cr3t-comet-key-value"
# DeepSpeed's own config has a secret-bearing key (its Comet monitor's api_key), and the typed
# tree passes DeepSpeed overrides through: a secret the saved config.yaml must not contain.
WITH_SECRET = ("parallel=zero2", f"+parallel.deepspeed_overrides.comet.api_key={SECRET}")


def compose(*overrides: str):  # type: ignore[no-untyped-def]
    """(JobConfig, DictConfig) as the CLI composes them (see conftest.compose_job)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    return to_job(cfg), cfg


def commit_a_checkpoint(run_dir: Path) -> None:
    class Engine:
        def save_state(self, directory: Path) -> None:
            directory.mkdir(parents=True)
            torch.save({"w": torch.zeros(1)}, directory / "w.pt")

    m = CheckpointManager(run_dir, cfg=compose()[0].checkpoint,
                          dist_info=Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    m.save(step=1, engine=Engine(), state={}, rank_state={}, config_yaml="")
    assert m.latest() is not None


def test_relative_run_dir_is_made_absolute_from_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job, cfg = compose("run.dir=runs/r1")
    run_dir = driver.prepare_run_dir(job, cfg)
    assert run_dir.is_absolute()
    assert run_dir == (tmp_path / "runs" / "r1").resolve()
    assert (run_dir / "logs").is_dir()
    assert (run_dir / "config.yaml").is_file()
    assert job.run.dir == "runs/r1", "the validated config is not mutated: the absolute dir is returned"


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    job, cfg = compose("run.dir='~/runs/r2'")  # quoted: Hydra's override grammar has no bare ~
    assert driver.prepare_run_dir(job, cfg) == (tmp_path / "home" / "runs" / "r2").resolve()
    assert not (tmp_path / "~").exists()


def test_saved_config_is_resolved_and_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job, cfg = compose(*WITH_SECRET, "run.dir=r", "train.max_steps=7")
    assert job.parallel.deepspeed_overrides == {"comet": {"api_key": SECRET}}, "the job itself keeps the secret"
    text = (driver.prepare_run_dir(job, cfg) / "config.yaml").read_text()
    assert SECRET not in text
    saved = yaml.safe_load(text)
    assert saved["parallel"]["deepspeed_overrides"] == {"comet": {"api_key": "<redacted>"}}
    assert saved["train"]["max_steps"] == 7 and saved["parallel"]["backend"] == "zero2"
    assert "hydra" not in saved
    assert "${" not in text, "interpolations (the embedded model's ${asset:...} path) are resolved"
    assert Path(saved["model"]["path"]).is_dir() and saved["model"]["path"] == job.model.path


def test_resume_never_over_committed_checkpoints_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    job, cfg = compose("run.dir=run", "resume=never")
    assert driver.prepare_run_dir(job, cfg) == run_dir.resolve(), "a fresh run dir is fine with resume=never"
    commit_a_checkpoint(run_dir)
    (run_dir / "config.yaml").write_text("the first run's config\n")
    with pytest.raises(ConfigError, match=r"^resume: "):
        driver.prepare_run_dir(job, cfg)
    assert (run_dir / "config.yaml").read_text() == "the first run's config\n", "refused before writing anything"
    job_auto, cfg_auto = compose("run.dir=run", "resume=auto")
    assert driver.prepare_run_dir(job_auto, cfg_auto) == run_dir.resolve(), "resume=auto continues it"
