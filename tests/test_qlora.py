"""QLoRA (`peft=qlora`): bitsandbytes NF4 with double quantisation, every byte of it sharded by
FSDP2 (2 ranks over gloo, bitsandbytes' CPU backend), bf16 compute, fp32 LoRA master weights,
activation checkpointing; killed with SIGKILL and resumed with identical losses through the real CLI."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import LIGHT_EVAL, cli_env, committed_steps, compose_job, events, explain, losses, run_cli

QLORA = ["peft=qlora", "launcher.nproc_per_node=2", "train.activation_checkpointing=true", "train.max_steps=6",
         "checkpoint.every_steps=2", "peft.rank=8", "peft.alpha=16", *LIGHT_EVAL]


def test_nf4_linear_matches_bitsandbytes() -> None:
    """Our flat NF4 state decodes to exactly what bitsandbytes' own Linear4bit (nf4, double quant,
    blocksize 64) holds, in either storage dtype, and the layer's gradients are those of x @ W^T."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    from ftcluster.quant import NF4Layout, NF4Linear, dequantize_nf4, quantize_nf4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 130, generator=g) * 0.02  # 12480 elements: a partial last 64-block
    lay = NF4Layout(out_features=96, in_features=130)
    ref = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")._quantize("cpu")
    want = BF.dequantize_4bit(ref.data, ref.quant_state)
    for storage in (torch.bfloat16, torch.float32):
        flat = quantize_nf4(w, storage_dtype=storage)
        assert flat.dtype == storage and flat.numel() == lay.storage_numel(storage)
        assert torch.equal(dequantize_nf4(flat, lay, dtype=torch.float32), want)
        layer = NF4Linear(in_features=130, out_features=96, bias=True, storage_dtype=storage)
        layer.nf4.data.copy_(flat)
        layer.bias.data.normal_(generator=g)
        x = torch.randn(3, 130, generator=g, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        layer(x).square().sum().backward()
        (x2 @ want.t() + layer.bias).square().sum().backward()
        assert torch.allclose(x.grad, x2.grad, atol=1e-6)
        assert not layer.nf4.requires_grad and layer.nf4.grad is None


@pytest.fixture(scope="module")
def qruns(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Started together: the reference run to the end, and the same job SIGKILLed (whole process
    group, like kill -9 of the job) right after step 4 commits."""
    cwd = tmp_path_factory.mktemp("qlora")
    ref, killed = cwd / "ref", cwd / "killed"
    procs = {
        "ref": subprocess.Popen([sys.executable, "-m", "ftcluster", "train", *QLORA, f"run.dir={ref}"], cwd=cwd,
                                env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        "killed": subprocess.Popen([sys.executable, "-m", "ftcluster", "train", *QLORA, f"run.dir={killed}",
                                    "debug.kill_at_step=4"], cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True),
    }
    outs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    assert procs["ref"].returncode == 0, outs["ref"][-4000:]
    assert procs["killed"].returncode == -signal.SIGKILL, outs["killed"][-4000:]
    return {"ref": ref, "killed": killed, "cwd": cwd}


@pytest.mark.slow
def test_qlora_trains_with_adapter_only_checkpoints(qruns: dict[str, Path]) -> None:
    run = qruns["ref"]
    got = losses(run)
    assert sorted(got) == list(range(1, 7)) and all(math.isfinite(v) for v in got.values())
    assert got[6] < got[1]
    start = events(run, "start")[0]
    assert start["trainable"] < start["params"] / 5
    assert start["host_rss_peak_gib"] > 0 and len(start["host_rss_peak_gib_per_rank"]) == 2
    assert events(run, "end")[0]["host_rss_peak_gib"] >= start["host_rss_peak_gib"]
    from torch.distributed.checkpoint import FileSystemReader

    ck = run / "checkpoints/step_6"
    keys = [k for k in FileSystemReader(str(ck / "engine")).read_metadata().state_dict_metadata if k.startswith("model.")]
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys[:5]  # no base, no NF4 state
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["model"]["adapter_only"] is True and meta["model"]["init_device"] == "cpu"


@pytest.mark.slow
def test_qlora_kill_9_and_resume_is_bit_identical(qruns: dict[str, Path]) -> None:
    run = qruns["killed"]
    assert committed_steps(run) == [2, 4]
    p = run_cli("train", *QLORA, f"run.dir={run}", cwd=qruns["cwd"])  # the same command again
    assert p.returncode == 0, explain(p)
    assert events(run, "resume")[0]["step"] == 4
    ref, got = losses(qruns["ref"]), losses(run)
    assert [got[s] for s in range(1, 7)] == [ref[s] for s in range(1, 7)]
    assert committed_steps(run) == [4, 6]


def test_qlora_config_rules() -> None:
    from ftcluster.config import ConfigError

    job = compose_job("peft=qlora")
    assert job.peft.method == "qlora" and job.checkpoint.adapter_only
    for backend in ("zero2", "zero3"):  # refused, naming the backend to use instead
        with pytest.raises(ConfigError, match=r"^parallel.backend: QLoRA .* use parallel=fsdp2"):
            compose_job("peft=qlora", f"parallel={backend}")
    with pytest.raises(ConfigError, match="^checkpoint.adapter_only"):  # DeepSpeed would ignore it
        compose_job("peft=lora", "parallel=zero2", "checkpoint.adapter_only=false")
