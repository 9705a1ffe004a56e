"""Config: every shipped YAML composes and validates; bad values fail naming their key, before any
process starts."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli_env, compose_job, run_cli
from ftcluster import driver
from ftcluster.launch import hosts
from omegaconf import OmegaConf

from ftcluster.compose import conf_dir, register_configs
from ftcluster.config import ConfigError

register_configs()


job = compose_job


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def test_default_composes_to_typed_tree() -> None:
    j = job()
    assert j.model.path and Path(j.model.path, "config.json").is_file()
    assert j.launcher.nproc_per_node == "auto" and j.parallel.backend == "fsdp2" and j.peft.method == "none"
    assert j.run.dir == "runs/default" and j.resume == "auto"


@pytest.mark.parametrize("group", ["model", "data", "peft", "parallel", "launcher", "logger"])
def test_every_shipped_option_composes_and_validates(group: str, tmp_path: Path) -> None:
    assert options(group), group
    for opt in options(group):
        extra = []
        if group == "model" and opt != "tiny":
            extra = ["data=synthetic"]  # shape-only models have no tokenizer
        if group == "model" and opt == "local":
            extra += ["model.path=" + job().model.path]  # the embedded tiny model's directory
        if group == "data" and opt == "jsonl":
            (tmp_path / "x.jsonl").write_text('{"messages": []}\n')  # data paths must exist (checked at compose)
            extra = [f"data.path={tmp_path / 'x.jsonl'}"]
        j = job(f"{group}={opt}", *extra)
        # The option's own scalar values reached the typed config (a group that composed but was
        # ignored, or a key renamed in one place only, would not).
        path = conf_dir() / group / f"{opt}.yaml"
        own = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if "@package _global_" in path.read_text():
            own = own.get(group, {})
        node = getattr(j, group)
        checked = [k for k, v in own.items() if k != "defaults" and isinstance(v, (str, int, float, bool))
                   and "${" not in str(v) and v != "???" and not any(e.startswith(f"{group}.{k}=") for e in extra)]
        assert checked, (group, opt)
        for k in checked:
            assert getattr(node, k) == own[k], (group, opt, k)


@pytest.mark.parametrize("override, key", [
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-4", "optim.lr"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("train.dtype=fp16", "train.dtype"),
    ("launcher.nproc_per_node=0", "launcher.nproc_per_node"),
    ("launcher.nproc_per_node=two", "launcher.nproc_per_node"),
    ("data.overlength=wrap", "data.overlength"),
    ("data.format=csv", "data.format"),
    ("data.max_seq_len=1", "data.max_seq_len"),
    ("peft.method=lora", None),  # valid
    ("resume=/nonexistent/step_3", "resume"),
    ("model.path=meta-llama/Llama-3.1-8B", "model.path"),
    ("seed=-1", "seed"),
    ("peft=lora", None),
])
def test_bad_values_name_their_key(override: str, key: str | None) -> None:
    if key is None:  # valid: the value is taken
        assert job(override).peft.method == "lora"
        return
    with pytest.raises(ConfigError) as e:
        job(override)
    assert str(e.value).startswith(f"{key}:"), str(e.value)


def test_lora_rank_checked_only_for_adapters() -> None:
    with pytest.raises(ConfigError, match=r"^peft.rank:"):
        job("peft=lora", "peft.rank=0")
    job("peft=none", "peft.rank=0")


def test_more_ranks_than_gpus_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mock: this machine has no GPU; pretend it is a host with 2 visible GPUs.
    monkeypatch.setattr(hosts, "visible_gpus", lambda: 2)
    with pytest.raises(ConfigError, match=r"^launcher.nproc_per_node: 3 ranks but only 2 visible GPUs"):
        driver.check_environment(job("launcher.nproc_per_node=3"))
    driver.check_environment(job("launcher.nproc_per_node=2"))
    assert hosts.local_world_size(job().launcher) == 2  # auto = one per GPU


def test_cpu_offload_needs_gpus() -> None:
    with pytest.raises(ConfigError, match=r"^parallel.cpu_offload: needs GPUs"):
        driver.check_environment(job("parallel.cpu_offload=true"))


def test_auto_is_one_rank_on_cpu() -> None:
    assert hosts.visible_gpus() == 0
    assert hosts.local_world_size(job().launcher) == 1


@pytest.mark.slow
def test_cli_errors_before_any_process(tmp_path: Path) -> None:
    """Through the real CLI: unknown key, wrong type and bad value exit non-zero naming the key, and
    no run directory is created (nothing started)."""
    # Hydra refuses unknown keys and wrong types while composing; our validation refuses bad values.
    # Both are usage errors: exit 2. Either way the message names the key and nothing started.
    for override, needle, code in [("optim.foo=1", "optim.foo", 2), ("train.grad_accum=x", "train.grad_accum", 2),
                                   ("optim.lr=0", "optim.lr: must be > 0", 2),
                                   ("checkpoint.keep_last=0", "checkpoint.keep_last", 2)]:
        p = run_cli("train", override, "run.dir=" + str(tmp_path / "r"), cwd=tmp_path, env=cli_env())
        assert p.returncode == code, (override, p.returncode, p.stderr[-2000:])
        assert needle in p.stderr + p.stdout, (override, p.stderr[-2000:])
        assert not (tmp_path / "r").exists()


def test_secret_names_are_redacted() -> None:
    from ftcluster.compose import redact

    out = redact({"logger": {"api_key": "abc", "project": "p"}, "hf_token": "t", "model": {"tokenizer": "/x"}})
    assert out == {"logger": {"api_key": "<redacted>", "project": "p"}, "hf_token": "<redacted>", "model": {"tokenizer": "/x"}}


@pytest.mark.slow
def test_cli_help_lists_groups_and_subcommands(tmp_path: Path) -> None:
    p = run_cli("--help", cwd=tmp_path)
    assert p.returncode == 0 and "train" in p.stdout and "export" in p.stdout
    p = run_cli("train", "--help", cwd=tmp_path)
    assert p.returncode == 0
    for g in ("model=", "data=", "peft=", "parallel=", "launcher=", "logger="):
        assert g in p.stdout, p.stdout


# --- the schema module stands alone; variants; saved-config reload; int-or-auto ----------------------

def test_config_module_imports_nothing_from_ftcluster_and_does_no_io() -> None:
    """config.py is the bottom of the import graph: importing it loads no other ftcluster module,
    and it imports nothing that reads files (the checks that do are compose.py's)."""
    import ast
    import subprocess
    import sys

    import ftcluster.config as config

    tree = ast.parse(Path(config.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "re", "dataclasses", "typing", "omegaconf"}, imported
    code = "import sys, ftcluster.config; print(sorted(m for m in sys.modules if m.startswith('ftcluster')))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["['ftcluster',", "'ftcluster.config']"], p.stdout


@pytest.mark.parametrize("overrides, key", [
    (["parallel=fsdp2", "parallel.overlap_comm=false"], "parallel.overlap_comm"),
    (["parallel=fsdp2", "+parallel.deepspeed_overrides.steps_per_print=10"], "parallel.deepspeed_overrides"),
    (["parallel=fsdp2", "+parallel.stage3_gather_per_layer=false"], "parallel.stage3_gather_per_layer"),
    (["parallel=zero3", "parallel.reshard_after_forward=true"], "parallel.reshard_after_forward"),
    (["parallel=zero2_offload", "+parallel.reshard_after_forward=false"], "parallel.reshard_after_forward"),
    (["+optim.foo=1"], "optim.foo"),
])
def test_other_variants_keys_fail_at_compose_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        job(*overrides)
    assert str(e.value).startswith(f"{key}:"), str(e.value)


def test_parallel_variants_have_their_own_schema() -> None:
    from ftcluster.config import FSDP2Config, ZeroConfig

    f, z = job().parallel, job("parallel=zero3", "parallel.overlap_comm=false").parallel
    assert isinstance(f, FSDP2Config) and f.reshard_after_forward and not hasattr(f, "overlap_comm")
    assert isinstance(z, ZeroConfig) and z.backend == "zero3" and not z.overlap_comm and not hasattr(z, "reshard_after_forward")
    assert job("parallel=zero2_offload").parallel.cpu_offload


@pytest.mark.parametrize("overrides", [
    [],
    ["parallel=zero3", "peft=lora", "launcher=ray", "launcher.num_workers=2", "launcher.gpus_per_worker=0"],
    ["parallel=zero2_offload", "launcher=slurm", "launcher.nodes=2", "+launcher.env.NCCL_SOCKET_IFNAME=ib0"],
    ["peft=longlora", "model.s2_group_size=64", "launcher.nproc_per_node=2"],
])
def test_saved_config_reloads_to_the_same_job(overrides: list[str], tmp_path: Path) -> None:
    """What the driver saves in the run dir (and every checkpoint) reloads, variants re-typed, to
    the JobConfig it was made from."""
    from ftcluster.compose import compose_config, load_saved_job, to_job

    cfg = compose_config(*overrides, f"run.dir={tmp_path / 'run'}")
    original = to_job(cfg)
    run_dir = driver.prepare_run_dir(original, cfg)
    assert load_saved_job(run_dir / "config.yaml") == original
    assert load_saved_job(run_dir / "config.yaml", driver_checks=False) == original


def test_saved_config_from_before_the_split_still_loads(tmp_path: Path) -> None:
    """A config saved when `parallel` carried both backends' keys and S2 settings sat under peft."""
    import yaml

    from ftcluster.compose import compose_config, load_saved_job, to_job
    from ftcluster.config import ZeroConfig

    cfg = compose_config("parallel=fsdp2", "peft=longlora", "model.s2_group_size_ratio=0.5", f"run.dir={tmp_path}")
    saved = yaml.safe_load((driver.prepare_run_dir(to_job(cfg), cfg) / "config.yaml").read_text())
    zero = {k: v for k, v in vars(ZeroConfig(backend="zero3")).items() if k != "backend"}
    saved["parallel"].update(zero)
    saved["peft"]["group_size_ratio"] = saved["model"].pop("s2_group_size_ratio")
    saved["peft"]["group_size"] = saved["model"].pop("s2_group_size")
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(saved))
    assert load_saved_job(old) == to_job(cfg)
    with pytest.raises(ConfigError, match=r"^parallel.backend:"):
        old.write_text(yaml.safe_dump({**saved, "parallel": {"backend": "zero9"}}))
        load_saved_job(old)


def test_int_or_auto_fields_give_ints() -> None:
    assert job("launcher.nproc_per_node=2").launcher.nproc_per_node == 2
    assert isinstance(job("launcher.nproc_per_node=2").launcher.nproc_per_node, int)
    assert job("launcher.nproc_per_node=auto").launcher.nproc_per_node == "auto"
    ray = job("launcher=ray", "launcher.num_workers=3", "launcher.gpus_per_worker=0").launcher
    assert (ray.num_workers, ray.gpus_per_worker) == (3, 0) and all(type(v) is int for v in (ray.num_workers, ray.gpus_per_worker))
    assert job("launcher=ray").launcher.num_workers == "auto"
    for override, key in [("launcher.nproc_per_node=1.5", "launcher.nproc_per_node"),
                          ("launcher.nproc_per_node=true", "launcher.nproc_per_node")]:
        with pytest.raises(ConfigError, match=f"^{key}:"):
            job(override)
    with pytest.raises(ConfigError, match=r"^launcher.gpus_per_worker: must be one of 0, 1 or 'auto'"):
        job("launcher=ray", "launcher.gpus_per_worker=2")
