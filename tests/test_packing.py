"""Sequence packing (data.packing): rows, exactness against unpacked training, isolation between
samples, S2-Attn per sample, determinism across world sizes, resume, over-length policy, mixing."""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_job, events, explain, records, run_cli, train_ok
from ftcluster.attention import s2_attention_packed
from ftcluster.config import DataConfig
from ftcluster.data import IGNORE_INDEX, DataError, DataStats, build_dataset
from ftcluster.data.batches import collate
from ftcluster.data.mixing import MixedData, mix_counts
from ftcluster.data.packing import PackedBatches, collate_packed, first_fit_decreasing, resolve_packing
from ftcluster.model import build_module, materialize
from ftcluster.model.packed import PACKED_SDPA, document_mask
from test_s2_attention import s2_attention_reference

torch.set_num_threads(1)


class Lengths:
    """Samples of given lengths (ids from a seeded stream, every token supervised)."""

    def __init__(self, lengths: list[int], vocab: int = 100, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.items = [(rng.integers(0, vocab, size=n).astype(np.int64), np.ones(n, dtype=bool)) for n in lengths]
        n, t = len(lengths), int(sum(lengths))
        self.stats = DataStats(rows_read=n, kept=n, dropped_overlength=0, dropped_no_supervision=0, truncated=0,
                               tokens=t, supervised_tokens=t - n)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return self.items[i]

    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids, _ in self.items], dtype=np.int64)

    def where(self, i: int) -> str:
        return f"sample {i}"


# --- rows -----------------------------------------------------------------------------------------

def test_first_fit_decreasing_places_every_sample_once_within_capacity() -> None:
    lengths = np.random.default_rng(1).integers(1, 65, size=500)
    rows = first_fit_decreasing(lengths, capacity=64, window=100)
    placed = np.sort(np.concatenate(rows))
    assert np.array_equal(placed, np.arange(500))
    assert all(lengths[r].sum() <= 64 for r in rows)
    assert all(r.min() // 100 == r.max() // 100 for r in rows)  # never across a window
    fill = lengths.sum() / (len(rows) * 64)
    assert fill > 0.9, fill  # FFD wastes little (one sample per row would fill ~0.5)
    assert [r.tolist() for r in rows] == [r.tolist() for r in first_fit_decreasing(lengths, capacity=64, window=100)]


def test_packed_batch_layout() -> None:
    data = Lengths([3, 1, 4])
    b = collate_packed([[data[0], data[1]], [data[2]]], max_seq_len=8, pad_id=0)
    assert b.input_ids.shape == (2, 8) and b.num_tokens == 8  # width: always max_seq_len
    assert b.position_ids[0].tolist() == [0, 1, 2, 0, 0, 1, 2, 3]  # restart per sample, then the tail
    assert b.segment_ids[0].tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    ids = data[0][0]
    # each sample's last position predicts nothing (never the next sample's first token)
    assert b.labels[0].tolist() == [ids[1], ids[2], IGNORE_INDEX] + [IGNORE_INDEX] * 5
    assert b.num_supervised == 2 + 0 + 3
    assert b.cu_seqlens.tolist() == [0, 3, 4, 8, 12, 16] and b.seq_lens == ((3, 1), (4,))


def test_auto_packs_only_when_samples_are_shorter() -> None:
    assert resolve_packing(DataConfig(path="x", max_seq_len=8), Lengths([3, 8]))[0]
    assert not resolve_packing(DataConfig(path="x", max_seq_len=8), Lengths([8, 8]))[0]
    assert not resolve_packing(DataConfig(format="synthetic", max_seq_len=8), Lengths([3]))[0]
    assert not resolve_packing(DataConfig(path="x", max_seq_len=8, packing="false"), Lengths([3]))[0]


# --- exactness: packed == each sample alone ------------------------------------------------------

def _tiny(packed: bool, *overrides: str):  # type: ignore[no-untyped-def]
    job = compose_job("peft=none", "data.max_seq_len=32", *overrides)
    module = build_module(job, packed=packed).module
    materialize(module, cfg=job.model, seed=0, device=torch.device("cpu"))
    return module


MIXED = [32, 1, 7, 12, 20, 5, 3, 9]  # one of exactly max_seq_len, one of length 1


def _packed_rows(data: Lengths, cap: int = 32) -> list[list]:
    return [[data[int(i)] for i in r] for r in first_fit_decreasing(data.lengths(), capacity=cap, window=64)]


def test_packed_losses_and_gradients_equal_each_sample_alone() -> None:
    data = Lengths(MIXED, vocab=200)
    packed_model, plain = _tiny(True), _tiny(False)
    assert packed_model.hf_model.config._attn_implementation == PACKED_SDPA
    rows = _packed_rows(data)
    assert len(rows) < len(MIXED)  # samples really share rows
    batch = collate_packed(rows, max_seq_len=32, pad_id=0)
    # Per-sample losses in the packed batch: the labels of one sample only.
    per_sample_packed = {}
    for b, row in enumerate(rows):
        t = 0
        for ids, _ in row:
            keep = torch.full_like(batch.labels, IGNORE_INDEX)
            keep[b, t:t + len(ids)] = batch.labels[b, t:t + len(ids)]
            one = collate_packed(rows, max_seq_len=32, pad_id=0)
            one = type(one)(**{**one.__dict__, "labels": keep})
            per_sample_packed[tuple(ids.tolist())] = float(packed_model(one).detach())
            t += len(ids)
    for i in range(len(data)):
        alone = collate([data[i]], indices=[i], pad_id=0, max_seq_len=32)
        assert math.isclose(float(plain(alone)), per_sample_packed[tuple(data[i][0].tolist())], rel_tol=1e-5, abs_tol=1e-5)
    # Gradients of the summed loss: packed == sum over samples trained alone.
    packed_model(batch).backward()
    for i in range(len(data)):
        plain(collate([data[i]], indices=[i], pad_id=0, max_seq_len=32)).backward()
    grads = dict(plain.named_parameters())
    for name, p in packed_model.named_parameters():
        # atol scales with the tensor: the embedding gradient sums many tokens' rows (up to ~54
        # here) in another order, 7e-5 apart on an AMX CPU; a leak across samples moves it by O(1).
        want = grads[name].grad
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)


def test_perturbing_one_sample_leaves_the_others_logits_unchanged() -> None:
    data = Lengths([10, 6, 9, 5], vocab=200)
    model = _tiny(True)
    rows = [[data[0], data[1], data[2], data[3]]]
    hf = model.hf_model

    def logits(rows):  # type: ignore[no-untyped-def]
        from ftcluster.model.packed import packed_hidden

        b = collate_packed(rows, max_seq_len=32, pad_id=0)
        with torch.no_grad():
            return hf.lm_head(packed_hidden(hf.get_decoder(), b, attn_implementation=PACKED_SDPA))[0]

    before = logits(rows)
    changed = (np.asarray((data[1][0] + 7) % 200), data[1][1])
    after = logits([[data[0], changed, data[2], data[3]]])
    assert not torch.allclose(before[10:16], after[10:16])  # the perturbed sample itself changes
    torch.testing.assert_close(before[:10], after[:10], rtol=0, atol=1e-6)  # before it (causal anyway)
    torch.testing.assert_close(before[16:30], after[16:30], rtol=0, atol=1e-6)  # after it: no leak
    alone = logits([[data[2]]])  # and a later sample's logits are those of the sample alone
    torch.testing.assert_close(before[16:25], alone[:9], rtol=1e-5, atol=1e-5)


def test_document_mask_is_block_diagonal_causal() -> None:
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = document_mask(seg)[0, 0]
    assert m[3].tolist() == [False, False, True, True, False, False]
    assert m[1].tolist() == [True, True, False, False, False, False]


# --- S2-Attn per sample ----------------------------------------------------------------------------

def test_s2_attention_packed_matches_per_sample_float64_reference() -> None:
    G, Hq, Hkv, D = 8, 4, 2, 8
    lens = [[20, 5, 8, 3], [9, 17, 1]]  # longer and shorter than a group, exactly one group, length 1
    width = 36
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, Hq, width, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, Hkv, width, D, generator=g, dtype=torch.float64)
    v = torch.randn(2, Hkv, width, D, generator=g, dtype=torch.float64)
    segments = []
    for row in lens:
        spans, t = [], 0
        for n in row:
            spans.append((t, t + n))
            t += n
        spans.append((t, width))
        segments.append(tuple(spans))
    out = s2_attention_packed(q, k, v, segments=tuple(segments), group_size=G)  # [B, N, Hq, D]
    for b, spans in enumerate(segments):
        for a, c in spans[:-1]:
            qs, ks, vs = q[b:b + 1, :, a:c], k[b:b + 1, :, a:c], v[b:b + 1, :, a:c]
            if c - a > G:
                ref = s2_attention_reference(qs, ks, vs, group_size=G)
            else:  # shorter than a group: full causal attention, as the spec says
                ref = F.scaled_dot_product_attention(qs, ks.repeat_interleave(2, 1), vs.repeat_interleave(2, 1),
                                                     is_causal=True)
            torch.testing.assert_close(out[b, a:c].transpose(0, 1), ref[0], rtol=1e-10, atol=1e-10)


def test_longlora_model_trains_on_packed_rows_with_per_sample_groups() -> None:
    """Through the model: a sample longer than the group gets the same loss packed as alone."""
    data = Lengths([20, 6, 4], vocab=200)
    model = _tiny(True, "peft=longlora", "model.s2_group_size=8")
    model.train()
    packed = collate_packed([[data[0], data[1], data[2]]], max_seq_len=32, pad_id=0)
    only_first = type(packed)(**{**packed.__dict__, "labels": torch.where(
        torch.arange(packed.width) < 20, packed.labels, torch.full_like(packed.labels, IGNORE_INDEX))})
    alone = collate([data[0]], indices=[0], pad_id=0, max_seq_len=32)
    assert math.isclose(float(model(only_first)), float(model(alone)), rel_tol=1e-5)
    model(packed).backward()  # differentiable through the per-sample path


# --- order: world-size free, resumable ---------------------------------------------------------------

def _batches(data, *, rank: int, world: int, mb: int) -> PackedBatches:  # type: ignore[no-untyped-def]
    return PackedBatches(data, micro_batch_size=mb, rank=rank, world_size=world, seed=5, shuffle=True, pad_id=0,
                         max_seq_len=32, window=16)


def _row_keys(batch) -> list[tuple]:  # type: ignore[no-untyped-def]
    """Each row's real tokens (the padded width depends on the other rows of the micro-batch)."""
    return [tuple(batch.input_ids[b, :sum(lens)].tolist()) for b, lens in enumerate(batch.seq_lens)]


def test_one_and_two_ranks_see_the_same_global_rows_and_resume_across_world_sizes() -> None:
    data = Lengths(list(np.random.default_rng(2).integers(1, 33, size=60)))
    one = _batches(data, rank=0, world=1, mb=4)
    two = [_batches(data, rank=r, world=2, mb=2) for r in range(2)]
    steps = 2 * len(one.plan(0)) // 4 + 1  # crosses into the next epoch (and its new order)
    for _ in range(steps):
        assert _row_keys(one.next_microbatch()) == sum((_row_keys(b.next_microbatch()) for b in two), [])
    # A 2-rank checkpoint resumed on 1 rank (and back) continues the same global sequence.
    state = two[0].state_dict()
    resumed = _batches(data, rank=0, world=1, mb=4)
    resumed.load_state_dict(state)
    assert _row_keys(resumed.next_microbatch()) == _row_keys(one.next_microbatch())
    assert state["epoch"] >= 1
    with pytest.raises(DataError, match="packing_window"):
        PackedBatches(data, micro_batch_size=4, rank=0, world_size=1, seed=5, shuffle=True, pad_id=0, max_seq_len=32,
                      window=8).load_state_dict(state)


def test_every_sample_trained_once_per_epoch() -> None:
    data = Lengths(list(np.random.default_rng(3).integers(1, 33, size=40)))
    b = _batches(data, rank=0, world=1, mb=1)
    rows = b.plan(0)
    assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(40))
    assert b.stats(0).samples == 40 and b.stats(0).fill > 0.8


def test_overlength_samples_follow_the_policy_before_packing(tmp_path: Path) -> None:
    from test_data import _byte_tokenizer, write_jsonl

    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a" * 40}, {"text": "bb"}, {"text": "c" * 30}])
    tok = _byte_tokenizer()
    cut = build_dataset(DataConfig(path=path, format="text", max_seq_len=20, overlength="truncate"), tokenizer=tok, seed=0)
    lengths = cut.lengths().tolist()
    assert lengths[0] == lengths[2] == 20 and lengths[1] < 10  # truncated samples fill a row of their own
    rows = _batches(cut, rank=0, world=1, mb=1).plan(0)
    assert sorted(len(r) for r in rows) == [1, 2] or sorted(len(r) for r in rows) == [1, 1, 1]
    b = PackedBatches(cut, micro_batch_size=3, rank=0, world_size=1, seed=0, shuffle=False, pad_id=0, max_seq_len=20,
                      window=8)
    assert all(sum(r) <= 20 for r in b.next_microbatch().seq_lens)
    drop = build_dataset(DataConfig(path=path, format="text", max_seq_len=20, overlength="drop"), tokenizer=tok, seed=0)
    assert drop.lengths().tolist() == [lengths[1]]
    with pytest.raises(DataError, match=r"t.jsonl:1"):
        build_dataset(DataConfig(path=path, format="text", max_seq_len=20, overlength="error"), tokenizer=tok, seed=0)


# --- mixing ----------------------------------------------------------------------------------------

def test_mix_counts_and_deterministic_pools() -> None:
    assert mix_counts([100, 50], weights=[3.0, 1.0], epochs=[None, None]) == [112, 38]
    assert mix_counts([100, 50], weights=[None, None], epochs=[0.5, 2.0]) == [50, 100]
    mix = MixedData(parts=[Lengths([4] * 10), Lengths([6] * 4, seed=1)], names=["a", "b"], weights=[None, None],
                    epochs=[0.5, 2.0])
    pool = mix.epoch_pool(seed=1, epoch=0)
    assert len(pool) == mix.epoch_size == 13
    assert np.array_equal(np.sort(pool[pool >= 10]), np.repeat(np.arange(10, 14), 2))  # every b sample twice
    assert len(set(pool[pool < 10].tolist())) == 5  # a seeded half of a
    assert np.array_equal(pool, mix.epoch_pool(seed=1, epoch=0))
    assert not np.array_equal(pool, mix.epoch_pool(seed=1, epoch=1))
    report = mix.mix_report(seed=1, epoch=0)
    assert [r["samples"] for r in report] == [5, 8] and [r["tokens"] for r in report] == [20, 48]
    rows = _batches(mix, rank=0, world=1, mb=1).plan(0)  # seed 5
    assert sorted(np.concatenate(rows).tolist()) == sorted(mix.epoch_pool(seed=5, epoch=0).tolist())  # packed together
    assert any(r.min() < 10 <= r.max() for r in rows)  # rows mix the sources


def test_sources_config_errors_name_the_key() -> None:
    from ftcluster.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight"):
        compose_job("data=jsonl", "data.path=", "+data.sources=[{path: a.jsonl, weight: 1, epochs: 2}]")
    with pytest.raises(ConfigError, match="data.packing"):
        compose_job("data.packing=maybe")


# --- end to end -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_packed_mix_two_ranks_kill9_resume_identical_losses(tmp_path: Path) -> None:
    """2 ranks, LoRA, a two-source mix packed together: SIGKILLed after step 3 commits, then
    resumed; the losses equal an uninterrupted run's; packing and mix statistics are recorded."""
    chat = Path(__file__).resolve().parent.parent / "ftcluster" / "assets" / "data" / "sample_chat.jsonl"
    rows = Path(chat).read_text().splitlines()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(rows[:300]) + "\n")
    b.write_text("\n".join(rows[300:400]) + "\n")
    args = ["launcher.nproc_per_node=2", "peft=lora", "train.max_steps=6", "train.micro_batch_size=2",
            "checkpoint.every_steps=3", "data.eval_path=null", "eval.every_steps=0", "data.path=",
            f"+data.sources=[{{path: {a}, weight: 1}}, {{path: {b}, epochs: 2}}]"]
    full = tmp_path / "full"
    train_ok(*args, run=full, cwd=tmp_path)
    killed = tmp_path / "killed"
    p = run_cli("train", *args, f"run.dir={killed}", "debug.kill_at_step=3", cwd=tmp_path, new_session=True)
    assert p.returncode == -signal.SIGKILL, explain(p)
    train_ok(*args, run=killed, cwd=tmp_path)
    trace = {r["step"]: r["loss"] for r in records(killed) if "loss" in r}
    assert trace == {r["step"]: r["loss"] for r in records(full) if "loss" in r} and len(trace) == 6
    assert [e["step"] for e in events(killed, "resume")] == [3]
    pack = events(full, "packing")[0]
    assert pack["samples"] == 300 + 200 and pack["fill"] > 0.9 and pack["samples_per_row"] > 2
    mix = events(full, "data_mix")[0]["sources"]
    assert [m["samples"] for m in mix] == [300, 200]
    steps = [r for r in records(full) if "loss" in r]
    assert all(0.9 < r["row_fill"] <= 1 for r in steps)
    assert json.loads(json.dumps(steps[0]))["tokens_per_s"] > 0


def test_flops_count_each_samples_own_attention_span() -> None:
    from ftcluster.metrics import FlopsModel

    plain = FlopsModel(n_frozen=100, n_trainable=10, n_layers=2, hidden=4, attended_span=lambda w: w)
    base = 4 * 100 + 6 * 10
    # two samples of 10 and 30 tokens in a 64-wide row attend 10 and 30 keys, not 64
    assert plain.per_token_packed([10, 30], 64) == base + 12 * 2 * 4 * (10 * 10 + 30 * 30) / 40
    assert plain.per_token(64) == base + 12 * 2 * 4 * 64  # unpacked: the padded width, as before
    s2 = FlopsModel(n_frozen=100, n_trainable=10, n_layers=2, hidden=4, attended_span=lambda w: 16)
    assert s2.per_token_packed([10, 30], 64) == base + 12 * 2 * 4 * (10 * 10 + 30 * 16) / 40  # capped at the group
