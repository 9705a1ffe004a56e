"""Sharded loading from a local Hugging Face directory, through the real FSDP2 path on 2 ranks
(gloo): it equals transformers' single-process load bit for bit (single-file and sharded-index
checkpoints), a rank's host memory grows by about its share, not by a full copy, and QLoRA's NF4
state loads sharded too."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli_env

pytestmark = pytest.mark.slow  # end to end: the real CLI / multi-rank process groups

TINY = REPO / "ftcluster/assets/tiny-llama"
WORKER = REPO / "tests/sharded_load_worker.py"


def run_worker(tmp: Path, *tasks: str, nproc: int = 2) -> list[dict[str, dict]]:
    """Run `MODE:DIR` tasks in one 2-rank process group; per rank, task -> result."""
    out = tmp / "worker.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(out), *tasks]
    p = subprocess.run(cmd, cwd=tmp, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return [{r["task"]: r for r in json.loads((tmp / f"worker.rank{rank}.json").read_text())} for rank in range(nproc)]


@pytest.fixture(scope="module")
def loads(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, dict]], dict]:
    """One torchrun, three kinds of load: the host-memory measurement first (nothing else allocated
    yet), then the bit-for-bit comparisons, then QLoRA's sharded NF4 load."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("loads")
    # The shipped tiny model is one model.safetensors; a copy re-saved in ~1 MB shards uses the index.
    sharded = tmp / "sharded"
    AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).save_pretrained(sharded, max_shard_size="1MB")
    info = {"big_bytes": _write_big_model(tmp / "big"), "sharded": str(sharded),
            "n_shards": len(list(sharded.glob("model-*.safetensors")))}
    tasks = [f"rss:{tmp / 'big'}", f"compare:{TINY}", f"compare:{sharded}", f"qlora:{TINY}", f"qlora32:{TINY}"]
    return run_worker(tmp, *tasks), info


def test_two_rank_sharded_load_equals_single_process_load(loads) -> None:  # type: ignore[no-untyped-def]
    ranks, info = loads
    assert info["n_shards"] >= 3
    for d in (str(TINY), info["sharded"]):
        res = ranks[0][f"compare:{d}"]
        assert res["compared"] == 39, res
        assert res["keys_only_ours"] == [] and res["keys_only_ref"] == [], res
        assert res["mismatched"] == [], res
        # Each rank held only its half of the parameters.
        mine, other = res["local_param_bytes"], ranks[1][f"compare:{d}"]["local_param_bytes"]
        assert abs(mine - other) < 0.05 * (mine + other)


def _write_big_model(directory: Path) -> int:
    """A ~250 MB fp32 Llama (no tensor over 10% of it) with random weights."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=8000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                      num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    directory.mkdir()
    cfg.save_pretrained(directory)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    nbytes = sum(t.numel() * 4 for t in tensors.values())
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return nbytes


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc for VmRSS/VmHWM")
def test_sharded_load_host_memory_below_one_copy(loads) -> None:  # type: ignore[no-untyped-def]
    ranks, info = loads
    model_bytes = info["big_bytes"]
    assert model_bytes > 200e6
    for rank in ranks:
        (res,) = [r for t, r in rank.items() if t.startswith("rss:")]
        grew = (res["rss_peak_gib"] - res["rss_before_gib"]) * 2**30
        # Its own half of the parameters (fp32, held in host memory on CPU ranks) plus one
        # tensor's read buffer; a full copy per rank (a plain from_pretrained on every rank, or
        # memory-mapped slice reads, whose touched pages stay resident) is >= model_bytes.
        assert res["local_param_bytes"] == pytest.approx(model_bytes / 2, rel=0.05)
        assert grew < 0.65 * model_bytes, (grew / 2**20, model_bytes / 2**20, res)
        print(f"rank {res['rank']}: host RSS +{grew / 2**20:.0f} MiB while loading a {model_bytes / 2**20:.0f} MiB "
              f"model (shard {res['local_param_bytes'] / 2**20:.0f} MiB)")


@pytest.mark.parametrize("mode", ["qlora", "qlora32"])
def test_qlora_nf4_state_loads_sharded_and_trains_like_unsharded(loads, mode: str) -> None:  # type: ignore[no-untyped-def]
    """peft=qlora on 2 ranks: every NF4 state (codes, absmax, nested absmax, offset; typed as the
    compute dtype) is split in half, the gathered halves are bit for bit what quantising each full
    weight in one process gives, and one batch's loss and every LoRA gradient equal those of the
    same module unsharded in one process (qlora: bf16; qlora32: fp32 with activation
    checkpointing, so the NF4 layers are recomputed in backward)."""
    ranks, _ = loads
    res0, res1 = (r[f"{mode}:{TINY}"] for r in ranks)
    assert res0["nf4_params"] == 28  # 7 linears x 4 layers, all NF4
    assert res0["nf4_dtypes"] == (["torch.float32"] if mode == "qlora32" else ["torch.bfloat16"])
    for r in (res0, res1):
        assert r["share_min"] == r["share_max"] == 0.5
    assert res0["nf4_mismatched"] == []
    assert res0["loss_sharded"] == pytest.approx(res0["loss_single"], rel=1e-6)
    assert res0["grads_compared"] == 56 and res0["grad_a_norm"] > 0  # lora_A and lora_B of 28 linears
    assert res0["grad_rel_err_max"] < 1e-5
