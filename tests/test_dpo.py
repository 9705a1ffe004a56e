"""objective=dpo, pure logic (no process group): the losses and their gradients against each
paper's formula written out here, response log-probs, the adapters-disabled reference, preference
data (formats, truncation, bad rows naming file:line, pairs kept whole across ranks), config checks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_job
from ftcluster.compose import ASSETS_DIR
from ftcluster.config import ConfigError, DataConfig, DPOObjectiveConfig
from ftcluster.data.batch import IGNORE_INDEX
from ftcluster.data.errors import DataError
from ftcluster.data.preference import (PairCollator, PreferenceBatches, build_preference_dataset, fit_pair)
from ftcluster.objectives.dpo import DPO, preference_losses, sequence_logps

PC = [-10.0, -22.5, -7.25, -31.0]   # policy log-probs of chosen responses (sums)
PR = [-12.0, -20.0, -9.5, -30.0]    # ... of rejected
RC = [-11.0, -21.0, -8.0, -30.5]    # reference, chosen
RR = [-11.5, -21.5, -9.0, -29.0]    # reference, rejected
NC = [5, 9, 3, 12]                  # response tokens
NR = [6, 8, 4, 10]


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _paper(loss: str, i: int, *, beta: float, ls: float, gamma: float) -> tuple[float, float, float]:
    """(loss, d loss / d policy_chosen, d loss / d policy_rejected) for pair i, by hand."""
    pc, pr, rc, rr, nc, nr = PC[i], PR[i], RC[i], RR[i], NC[i], NR[i]
    if loss == "sigmoid":  # DPO, Rafailov et al. 2023 eq. 7 (+ conservative label smoothing)
        z = beta * ((pc - rc) - (pr - rr))
        val = -(1 - ls) * math.log(_sig(z)) - ls * math.log(_sig(-z))
        g = -(1 - ls) * (1 - _sig(z)) * beta + ls * _sig(z) * beta
        return val, g, -g
    if loss == "ipo":  # IPO, Azar et al. 2023 eq. 17 (mean log-probs)
        h = (pc - rc) / nc - (pr - rr) / nr
        val = (h - 1 / (2 * beta)) ** 2
        return val, 2 * (h - 1 / (2 * beta)) / nc, -2 * (h - 1 / (2 * beta)) / nr
    z = beta * (pc / nc - pr / nr) - gamma  # SimPO, Meng et al. 2024 eq. 6
    val = -(1 - ls) * math.log(_sig(z)) - ls * math.log(_sig(-z))
    dz = -(1 - ls) * (1 - _sig(z)) + ls * _sig(z)
    return val, dz * beta / nc, -dz * beta / nr


@pytest.mark.parametrize("loss,beta,ls", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                          ("simpo", 2.0, 0.0), ("simpo", 2.5, 0.1)])
def test_losses_and_gradients_match_the_papers(loss: str, beta: float, ls: float) -> None:
    cfg = DPOObjectiveConfig(loss=loss, beta=beta, label_smoothing=ls, simpo_gamma=0.7)
    pc = torch.tensor(PC, dtype=torch.float64, requires_grad=True)
    pr = torch.tensor(PR, dtype=torch.float64, requires_grad=True)
    out = preference_losses(policy_chosen=pc, policy_rejected=pr, ref_chosen=torch.tensor(RC, dtype=torch.float64),
                            ref_rejected=torch.tensor(RR, dtype=torch.float64), chosen_tokens=torch.tensor(NC),
                            rejected_tokens=torch.tensor(NR), cfg=cfg)
    out.losses.sum().backward()
    for i in range(4):
        val, gc, gr = _paper(loss, i, beta=beta, ls=ls, gamma=0.7)
        assert out.losses[i].item() == pytest.approx(val, rel=1e-12, abs=1e-12)
        assert pc.grad[i].item() == pytest.approx(gc, rel=1e-10, abs=1e-12)
        assert pr.grad[i].item() == pytest.approx(gr, rel=1e-10, abs=1e-12)
    if loss == "sigmoid":  # rewards: beta x (policy - reference)
        assert out.chosen_rewards.tolist() == pytest.approx([beta * (a - b) for a, b in zip(PC, RC)])
    if loss == "simpo":  # reference-free: the reference is never read
        again = preference_losses(policy_chosen=pc, policy_rejected=pr, ref_chosen=None, ref_rejected=None,
                                  chosen_tokens=torch.tensor(NC), rejected_tokens=torch.tensor(NR), cfg=cfg)
        assert torch.equal(again.losses, out.losses)


def test_sequence_logps_match_log_softmax_in_every_chunking() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 10, 8, generator=g), torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 50, (6, 10), generator=g)
    labels[:, :3] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # a row with nothing supervised
    lp = torch.log_softmax(hidden @ weight.T, dim=-1)
    want = torch.where(labels != IGNORE_INDEX, lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0).sum(-1)
    for chunk in (1, 10, 25, 1000):
        got, counts = sequence_logps(hidden, weight, labels, chunk_size=chunk)
        assert torch.allclose(got, want, atol=1e-5) and counts.tolist() == [7, 7, 0, 7, 7, 7]


def test_adapters_disabled_reference_equals_the_base_model_bit_for_bit() -> None:
    """The embedded tiny model with LoRA (built by build_module, weights from the asset): the
    reference the module computes with its adapters disabled equals the plain transformers
    model's log-probs bit for bit, while the policy (adapters on) differs."""
    from transformers import AutoModelForCausalLM

    from ftcluster.data.preference import PreferenceBatch
    from ftcluster.model import build_module, materialize

    job = compose_job("objective=dpo", "peft=lora", "peft.rank=4")
    seen = {}

    class Recording(DPO):
        def head(self, hidden, weight, batch):  # type: ignore[no-untyped-def]
            seen["ref"], seen["policy"] = batch.ref_logps, sequence_logps(hidden, weight, batch.labels, chunk_size=64)[0]
            return super().head(hidden, weight, batch)

    built = build_module(job, objective=Recording(cfg=job.objective, peft_method="lora", chunk_size=64))
    materialize(built.module, cfg=job.model, seed=0, device=torch.device("cpu"))
    module = built.module
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.normal_()  # adapters that change the output (B starts at zero)
    base = AutoModelForCausalLM.from_pretrained(ASSETS_DIR / "tiny-llama", local_files_only=True, dtype=torch.float32)
    ids = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 5:11] = ids[:, 6:12]
    batch = PreferenceBatch(input_ids=ids, labels=labels, num_tokens=48, num_supervised=24, num_pairs=2, keys=(0, 1))
    loss = module(batch)
    with torch.no_grad():
        hidden = base.model(input_ids=ids).last_hidden_state
        want = sequence_logps(hidden, base.lm_head.weight, labels, chunk_size=64)[0]
    assert torch.equal(seen["ref"], want)  # bit for bit
    assert not torch.allclose(seen["policy"], want)  # the adapters were on for the policy
    loss.backward()
    assert any(p.grad is not None for n, p in module.named_parameters() if "lora_" in n)


# --- data -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama", local_files_only=True)


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _chat(q: str, good: str, bad: str) -> dict:
    return {"messages": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}]}


def test_chat_pairs_supervise_only_the_responses_and_stay_whole(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = [_chat(f"What is {i} plus 1?", f"{i} plus 1 is {i + 1}.", f"{i + 1} is 1 plus {i}") for i in range(10)]
    data = build_preference_dataset(DataConfig(path=_write(tmp_path / "p.jsonl", rows), format="messages"),
                                    tokenizer=tokenizer)
    assert len(data) == 10 and data.key(3) == 3 and data.where(3).endswith("p.jsonl:4")
    prompt, chosen, rejected = data[0]
    want_prompt = tokenizer.apply_chat_template(rows[0]["messages"], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(prompt) == want_prompt
    assert tokenizer.decode(chosen).startswith("0 plus 1 is 1.") and chosen[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    collator = PairCollator(data=data, pad_id=0, max_seq_len=64)
    # 2 ranks x 2 pairs: every micro-batch holds whole pairs, chosen rows then the same pairs' rejected rows.
    seen = []
    for rank in range(2):
        b = PreferenceBatches(data, collator=collator, micro_batch_size=2, rank=rank, world_size=2, seed=0, shuffle=True)
        for _ in range(2):
            mb = b.next_microbatch()
            assert mb.input_ids.shape[0] == 4 and mb.num_pairs == 2 and b.consumed % 4 == 0
            for j, key in enumerate(mb.keys):
                p, c, r = data[key]
                n = len(p)
                assert mb.input_ids[j, :n + len(c)].tolist() == list(p) + list(c)
                assert mb.input_ids[2 + j, :n + len(r)].tolist() == list(p) + list(r)
                sup = (mb.labels[j] != IGNORE_INDEX).nonzero().flatten().tolist()
                assert sup == list(range(n - 1, n + len(c) - 1))  # response tokens only (shifted)
            seen.append(mb.keys)
    one = PreferenceBatches(data, collator=collator, micro_batch_size=4, rank=0, world_size=1, seed=0, shuffle=True)
    global_order = [k for _ in range(2) for k in one.next_microbatch().keys]
    assert [k for step in range(2) for k in seen[step] + seen[2 + step]] == global_order  # same order at any world size


def test_prompt_string_format_and_truncation(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = [{"q": "word " * 40 + "end", "good": "yes", "bad": "no"}]
    cfg = DataConfig(path=_write(tmp_path / "p.jsonl", rows), format="prompt_completion", prompt_field="q",
                     chosen_field="good", rejected_field="bad", max_seq_len=16)
    data = build_preference_dataset(cfg, tokenizer=tokenizer)
    prompt, chosen, rejected = data[0]
    assert len(prompt) + max(len(chosen), len(rejected)) <= 16
    assert tokenizer.decode(prompt).endswith("end")  # the prompt's end is kept
    assert chosen[-1] == tokenizer.eos_token_id and tokenizer.decode(chosen[:-1]) == "yes"
    assert fit_pair([1, 2, 3, 4], [5] * 10, [6] * 3, max_seq_len=8) == ([4], [5] * 7, [6] * 3)  # then responses
    with pytest.raises(DataError, match=r"p\.jsonl:1: .*data\.max_seq_len=16"):
        build_preference_dataset(DataConfig(path=cfg.path, format="prompt_completion", prompt_field="q",
                                            chosen_field="good", rejected_field="bad", max_seq_len=16,
                                            overlength="error"), tokenizer=tokenizer)


@pytest.mark.parametrize("bad,message", [
    ({"messages": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}]},
     r"bad\.jsonl:2: missing field 'rejected'"),
    (_chat("q", "same", "same"), r"bad\.jsonl:2: chosen and rejected responses are identical"),
    (_chat("q", "   ", "b"), r"bad\.jsonl:2: field 'chosen' is an empty response"),
])
def test_bad_rows_name_file_and_line(tokenizer, tmp_path: Path, bad: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path / "bad.jsonl", [_chat("q", "a", "b"), bad, _chat("r", "c", "d")])
    with pytest.raises(DataError, match=message):
        build_preference_dataset(DataConfig(path=path, format="messages"), tokenizer=tokenizer)


def test_missing_column_names_the_key(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: missing field 'rejected' \(data\.rejected_field\)"):
        build_preference_dataset(DataConfig(path=path, format="prompt_completion"), tokenizer=tokenizer)


# --- config -----------------------------------------------------------------------------------------

def test_objective_config_checks_name_the_key() -> None:
    job = compose_job("objective=dpo")
    assert job.objective.kind == "dpo" and job.data.path.endswith("sample_preferences.jsonl")
    assert job.objective.reference_source(job.peft.method) == "precompute"
    assert compose_job("objective=dpo", "peft=lora").objective.reference_source("lora") == "adapters"
    assert compose_job().objective.kind == "sft"
    for overrides, key in [(["objective.loss=kto"], "objective.loss"), (["objective.beta=0"], "objective.beta"),
                           (["objective.reference=adapters"], "objective.reference"),
                           (["objective.label_smoothing=0.5"], "objective.label_smoothing"),
                           (["data.format=text"], "data.format")]:
        with pytest.raises(ConfigError, match=rf"^{key}:"):
            compose_job("objective=dpo", *overrides)
    with pytest.raises(ConfigError, match="objective.beta"):
        compose_job("objective.beta=0.1")  # an SFT run has no beta


def test_reference_lookup_orders_chosen_then_rejected() -> None:
    from ftcluster.objectives.reference import ReferenceLogps

    table = ReferenceLogps(keys=np.array([7, 3, 9]), values=np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32))
    assert table.lookup((9, 7)).tolist() == [5.0, 1.0, 6.0, 2.0]
