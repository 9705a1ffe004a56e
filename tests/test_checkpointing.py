"""Activation checkpointing modes (train.activation_checkpointing: none / selective / full /
offload) and per-layer torch.compile (model.compile), on the embedded tiny Llama (4 decoder layers)
in fp32 on CPU.

On a CPU there is no pinned memory or side stream: `offload` runs with its CPU stand-in
(ftcluster/model/checkpointing.py `_HostStandIn`, a plain host copy), so the autograd structure,
the copy counts and the prefetch order are the real ones; the CUDA copies are measured on the GPU
(bench/ac_modes_check.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from conftest import compose_job, explain, lm_batch, losses, run_cli

MODES = ("none", "selective", "full", "offload")


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """The tiny model's steps take milliseconds on one thread and seconds with threads fighting over
    this box's shared cores (what OMP_NUM_THREADS=1 does for the CLI runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(mode: str, peft: str, *extra: str):  # type: ignore[no-untyped-def]
    from ftcluster.model import build_module, materialize

    job = compose_job("train.dtype=fp32", f"train.activation_checkpointing={mode}",
                      "train.activation_checkpointing_every=2", f"peft={peft}", "peft.rank=4", "peft.dropout=0.1", *extra)
    built = build_module(job)
    materialize(built.module, cfg=job.model, seed=0, device=torch.device("cpu"))
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for n, p in built.module.named_parameters():
            if "lora_B" in n:  # B starts at zero: adapters that change the output, so every grad is non-trivial
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return built


def step(built, ids):  # type: ignore[no-untyped-def]
    """One forward + backward: the loss and every trainable gradient. Fixed RNG: LoRA dropout is on."""
    torch.manual_seed(0)
    loss = built.module(lm_batch(ids))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in built.module.named_parameters() if p.requires_grad}


IDS = torch.randint(6, 1000, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("peft", ["none", "lora", "qlora", "longlora"])
def test_modes_give_the_same_loss_and_gradients(peft: str) -> None:
    """Recompute (and the offloaded copy) changes nothing numerically: the loss and every trainable
    gradient equal the no-checkpointing run, with LoRA dropout on (the recompute replays the RNG);
    for a full fine-tune, LoRA, QLoRA (NF4 base dequantised again in the recompute) and LongLoRA
    (S2-Attn: shifted groups, trainable embeddings and norms)."""
    want_loss, want = step(build("none", peft), IDS)
    assert len(want) > 10 and all(g.abs().sum() > 0 for g in want.values())
    for mode in MODES[1:]:
        loss, grads = step(build(mode, peft), IDS)
        assert torch.equal(loss, want_loss), mode
        assert grads.keys() == want.keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, want[n], rtol=1e-6, atol=1e-7, msg=lambda m: f"{mode} {n}: {m}")


def forward_calls(built, ids) -> list[int]:  # type: ignore[no-untyped-def]
    """How many times each decoder layer's MLP started in one training step (the recompute calls the
    layer's `forward`, not its `__call__`, so a hook on the layer itself would not see it; a pre-hook,
    since the recompute stops early, inside the MLP, once the last saved tensor is rebuilt)."""
    counts = [0] * len(built.layers)
    for i, layer in enumerate(built.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    step(built, ids)
    return counts


def test_each_mode_recomputes_exactly_its_layers() -> None:
    """selective (every 2): layers 0 and 2 run twice (forward and recompute), 1 and 3 once; full and
    offload: every layer twice; none: once. Eval (no autograd) never recomputes."""
    from ftcluster.model.checkpointing import recomputed_layers

    assert recomputed_layers(num_layers=4, mode="selective", every=2) == [0, 2]
    assert recomputed_layers(num_layers=7, mode="selective", every=3) == [0, 3, 6]
    assert recomputed_layers(num_layers=4, mode="selective", every=1) == [0, 1, 2, 3]
    want = {"none": [1, 1, 1, 1], "selective": [2, 1, 2, 1], "full": [2, 2, 2, 2], "offload": [2, 2, 2, 2]}
    for mode in MODES:
        assert forward_calls(build(mode, "lora"), IDS) == want[mode], mode
    built = build("full", "lora", "train.activation_checkpointing_every=3")
    assert [bool(m.gradient_checkpointing) for m in built.layers] == [True] * 4  # every only matters to selective
    built = build("selective", "lora", "train.activation_checkpointing_every=3")
    assert forward_calls(built, IDS) == [2, 1, 1, 2]


def layer_inputs_alive_before_backward(built, ids) -> list[bool]:  # type: ignore[no-untyped-def]
    """After forward, before backward: is the memory of each layer's input hidden state still held?"""
    refs = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: refs.append(StorageWeakRef(args[0].untyped_storage())))
             for m in built.layers]
    torch.manual_seed(0)
    loss = built.module(lm_batch(ids))
    alive = [not r.expired() for r in refs]
    loss.backward()
    for h in hooks:
        h.remove()
    return alive


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_offload_moves_the_checkpoints_off_the_device(peft: str) -> None:
    """`full` keeps every layer's input (its checkpoint) in the device's memory until backward;
    `offload` has released them once forward is done: backward reads the host copies (CPU
    stand-in) -- one per layer of [batch, seq, hidden] fp32, each fetched back once in backward,
    all but the first fetched ahead (prefetch while the later layer recomputes)."""
    from ftcluster.model.checkpointing import OffloadingCheckpoint

    assert layer_inputs_alive_before_backward(build("full", peft), IDS)[1:] == [True] * 3
    built = build("offload", peft)
    offloader = built.layers[0]._gradient_checkpointing_func.offloader
    assert all(isinstance(m._gradient_checkpointing_func, OffloadingCheckpoint) for m in built.layers)
    alive = layer_inputs_alive_before_backward(built, IDS)
    # Layer 0's input is the embedding output: under LoRA (frozen embedding) transformers'
    # enable_input_require_grads makes it a leaf that needs grad, which autograd itself holds.
    assert alive[1:] == [False] * 3 and alive[0] == (peft == "lora")
    s = offloader.stats
    assert (s.offloaded, s.fetched, s.prefetched) == (4, 4, 3)
    assert s.offloaded_bytes == 4 * IDS.numel() * 128 * 4
    with torch.no_grad():  # evaluation: no checkpoint, nothing offloaded
        built.module.eval()
        built.module(lm_batch(IDS))
    assert s.offloaded == 4


def test_offload_fails_loudly_when_the_hidden_state_is_passed_by_keyword() -> None:
    """If the layer input never reached the saved-tensor hooks (a keyword argument), offload says so
    instead of silently keeping everything on the device."""
    from ftcluster.model.checkpointing import ActivationOffloader, OffloadingCheckpoint

    lin = torch.nn.Linear(4, 4)
    func = OffloadingCheckpoint(offloader=ActivationOffloader())
    x = torch.randn(2, 4, requires_grad=True)
    func(lin, x).sum().backward()  # positional: offloaded
    assert func.offloader.stats.offloaded == 1 and x.grad is not None
    with pytest.raises(RuntimeError, match="by keyword"):
        func(lambda: lin(x))


def test_frozen_reference_is_not_checkpointed() -> None:
    """DPO's frozen reference copy (build_module(frozen=True)) runs without autograd: no checkpointing."""
    from ftcluster.model import build_module

    built = build_module(compose_job("train.activation_checkpointing=offload"), frozen=True)
    assert not any(m.gradient_checkpointing for m in built.layers)


def test_bad_mode_names_the_key() -> None:
    from ftcluster.config import ConfigError

    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        compose_job("train.activation_checkpointing=bogus")
    with pytest.raises(ConfigError, match="train.activation_checkpointing_every"):
        compose_job("train.activation_checkpointing=selective", "train.activation_checkpointing_every=0")


# --- compile ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "selective", "offload"])
def test_compiled_layers_keep_names_and_losses(mode: str) -> None:
    """Per-layer compile in place (aot_eager: dynamo + AOTAutograd's traced forward/backward,
    without inductor's C++ build, which takes a minute on this CPU): the same parameter names and
    state-dict keys, every layer a compiled module, and the same loss and gradients as eager."""
    from ftcluster.model.compile import apply_compile

    eager = build(mode, "lora")
    want_loss, want = step(eager, IDS)
    built = build(mode, "lora")
    keys = list(built.module.state_dict())
    graphs = []

    def counting_aot_eager(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    apply_compile(built.layers, device_type="cpu", backend=counting_aot_eager)
    assert list(built.module.state_dict()) == keys
    if mode == "offload":  # the forward inside the checkpoint is compiled, the layer's __call__ is not
        assert all(m._gradient_checkpointing_func._backend is counting_aot_eager for m in built.layers)
    else:
        assert all(m._compiled_call_impl is not None for m in built.layers)
    loss, grads = step(built, IDS)
    # The layers' compute really went through dynamo (a graph break at the offload hooks would leave
    # the whole layer eager: no graph at all), and the 4 layers share graphs (selective: one for the
    # checkpointed layers, one for the others, plus a recompile on the first layer's guards).
    ops = [sum(n.op == "call_function" for m in g.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes)
           for g in graphs]  # the checkpoint's body is a subgraph of its higher-order op
    assert 1 <= len(graphs) <= 3 and min(ops) > 20, ops
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_compile_on_a_cpu_rank_stays_eager(caplog: pytest.LogCaptureFixture) -> None:
    """model.compile=true on CPU: one warning, the layers left eager (inductor's CPU build is not
    what a CPU run is for)."""
    from ftcluster.model import build_module

    with caplog.at_level("WARNING", logger="ftcluster"):
        built = build_module(compose_job("model.compile=true"))
    assert all(m._compiled_call_impl is None for m in built.layers)
    assert sum("model.compile" in r.getMessage() for r in caplog.records) == 1


# --- through the real CLI: 2 ranks over gloo ---------------------------------------------------

CLI = ["launcher.nproc_per_node=2", "peft=lora", "train.max_steps=3", "checkpoint.enabled=false", "logger=none",
       "eval.at_start=false", "eval.max_batches=1", "eval.num_prompts=0"]


def run_modes(cwd: Path, modes: dict[str, list[str]], *common: str) -> dict[str, dict[int, float]]:
    """Start one CLI run per entry at once (they share the 2 cores), wait for all; their losses."""
    import subprocess
    import sys

    from conftest import cli_env

    procs = {name: subprocess.Popen([sys.executable, "-m", "ftcluster", "train", *CLI, *common, *args,
                                     f"run.dir={cwd / name}"], cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name, args in modes.items()}
    for name, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}: exit {p.returncode}\n{out[-4000:]}"
    out = {name: losses(cwd / name) for name in modes}
    for name in modes:
        layout = [json.loads(line) for line in (cwd / name / "metrics.jsonl").read_text().splitlines()
                  if '"layout"' in line][0]
        assert layout["activation_checkpointing"] == name.split("_")[0]
    return out


@pytest.mark.slow
def test_fsdp2_two_ranks_offload_and_selective_match_none(tmp_path: Path) -> None:
    """FSDP2 (fully_shard per decoder layer, so the recompute runs on the layer's gathered
    parameters), LoRA on packed rows (the packed-attention mask as a layer keyword), bf16: offload
    and selective (every 2) give the losses of no checkpointing, step by step."""
    got = run_modes(tmp_path, {m: [f"train.activation_checkpointing={m}"] for m in ("none", "selective", "offload")},
                    "parallel=fsdp2")
    assert sorted(got["none"]) == [1, 2, 3]
    for mode in ("selective", "offload"):
        assert got[mode].keys() == got["none"].keys()
        for s, want in got["none"].items():
            assert got[mode][s] == pytest.approx(want, rel=1e-6, abs=1e-6), (mode, s)


@pytest.mark.slow
def test_zero3_two_ranks_offload_matches_none(tmp_path: Path) -> None:
    """DeepSpeed ZeRO-3 (parameters gathered by DeepSpeed's hooks, outside the checkpointed forward),
    full fine-tune and LoRA: offload gives the losses of no checkpointing."""
    got = run_modes(tmp_path, {"none": ["train.activation_checkpointing=none"],
                               "offload": ["train.activation_checkpointing=offload"],
                               "none_full": ["train.activation_checkpointing=none", "peft=none"],
                               "offload_full": ["train.activation_checkpointing=offload", "peft=none"]},
                    "parallel=zero3", "train.max_steps=2")
    for a, b in (("none", "offload"), ("none_full", "offload_full")):
        assert sorted(got[a]) == [1, 2] and got[b].keys() == got[a].keys()
        for s, want in got[a].items():
            assert got[b][s] == pytest.approx(want, rel=1e-6, abs=1e-6), (b, s)


COMPILE_FSDP2 = r'''
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from conftest import compose_job, lm_batch
from ftcluster.distributed import all_reduce_sum, init_distributed, shutdown
from ftcluster.model import build_module, materialize
from ftcluster.model.compile import apply_compile
from ftcluster.parallel import parallelize

d = init_distributed()
out = {}
graphs = []

def counting_aot_eager(gm, example_inputs):
    # ops traced, the checkpoint's body (a subgraph of its higher-order op) included
    graphs.append(sum(n.op == "call_function" for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
                      for n in m.graph.nodes))
    return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

for name, mode, backend in (("none", "none", None), ("selective", "selective", None), ("offload", "offload", None),
                            ("full_compiled", "full", counting_aot_eager), ("offload_compiled", "offload", counting_aot_eager)):
    graphs.clear()
    job = compose_job("parallel=fsdp2", "peft=lora", "peft.rank=4", "train.dtype=fp32", "train.micro_batch_size=2",
                      "train.grad_accum=1", f"train.activation_checkpointing={mode}", "launcher.nproc_per_node=2")
    built = build_module(job)
    if backend:  # compiled before sharding, as build_module does on a GPU (model.compile=true)
        apply_compile(built.layers, device_type="cpu", backend=backend)
    engine = parallelize(built.module, layers=built.layers, job=job, dist=d,
                         materialize=lambda m, dev, view: materialize(m, cfg=job.model, seed=0, device=dev, shard_view=view))
    built.module.train()
    g = torch.Generator().manual_seed(10 + d.rank)
    trace = []
    for step in range(3):
        ids = torch.randint(6, 1000, (2, 32), generator=g)
        loss = engine.forward(lm_batch(ids))
        engine.backward(loss / 64, last_micro=True)
        norm = engine.clip_grad_norm(1.0)
        engine.step(lr=1e-2, skip=torch.tensor(False))
        trace.append([(all_reduce_sum(loss.detach()) / 128).item(), norm.item()])
    out[name] = trace
    out[name + "_graphs"] = list(graphs)
if d.rank == 0:
    open(sys.argv[2], "w").write(json.dumps(out))
shutdown()
'''


def test_fsdp2_engine_two_ranks_modes_and_compiled_layers_match_none(tmp_path: Path) -> None:
    """FSDP2's engine (fully_shard per decoder layer), 2 ranks over gloo, fp32 LoRA, three steps:
    selective and offload, and per-layer compile (aot_eager, applied before fully_shard) with full
    and with offload checkpointing, give the eager, uncheckpointed losses and gradient norms (the
    FSDP2 hooks still gather for the recompute, the reduce-scatter still runs)."""
    import subprocess
    import sys

    from conftest import cli_env

    result = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--no-python", sys.executable, "-c", COMPILE_FSDP2, str(Path(__file__).resolve().parent),
                        str(result)], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, explain(p)
    out = json.loads(result.read_text())
    want = out["none"]
    assert len(want) == 3 and want[0][0] != want[2][0]  # it trained
    for mode in ("selective", "offload", "full_compiled", "offload_compiled"):
        if mode.endswith("compiled"):
            assert out[f"{mode}_graphs"] and max(out[f"{mode}_graphs"]) > 20, out[f"{mode}_graphs"]  # not eager
        for (loss, norm), (wl, wn) in zip(out[mode], want):
            assert loss == pytest.approx(wl, rel=1e-5) and norm == pytest.approx(wn, rel=1e-4), (mode, out[mode], want)


class MockCudaStream:
    """MOCK of a CUDA stream and its events (this box has no GPU): records the calls made on it,
    so the order of the offload's stream operations can be checked."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: "MockCudaStream") -> None:
        self.log.append(f"{self.name} waits {other.name}")

    def record_event(self) -> str:
        self.log.append(f"{self.name} records event")
        return f"event@{self.name}"

    def wait_event(self, event: str) -> None:
        self.log.append(f"{self.name} waits {event}")


def test_cuda_copies_order_their_stream_operations(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_CudaCopies` with CUDA streams, events and pinned memory MOCKED (no GPU here): in forward the
    side stream waits for the compute stream before copying the layer input out, and the input is
    marked used by the side stream (record_stream) so its memory is not reused before the copy; in
    backward the device buffer is allocated on the compute stream, the side stream waits for it
    before copying in, and the compute stream (not the host) waits on the copy's event. No call
    that blocks the host is made (every copy non_blocking)."""
    import contextlib

    from ftcluster.model import checkpointing as ck

    log: list = []
    compute, streams = MockCudaStream("compute", log), []
    current = [compute]

    def new_stream(device):  # type: ignore[no-untyped-def]
        streams.append(MockCudaStream("side", log))
        return streams[-1]

    @contextlib.contextmanager
    def on(stream):  # type: ignore[no-untyped-def]
        current.append(stream)
        yield
        current.pop()

    real_empty = torch.empty

    def empty(shape, *, dtype, device=None, pin_memory=False):  # type: ignore[no-untyped-def]
        log.append(f"alloc {'pinned host' if pin_memory else device} on {current[-1].name}")
        return real_empty(shape, dtype=dtype)

    real_copy = torch.Tensor.copy_

    def copy_(self, src, non_blocking=False):  # type: ignore[no-untyped-def]
        log.append(f"copy on {current[-1].name} non_blocking={non_blocking}")
        return real_copy(self, src)

    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(ck.torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: log.append(f"input used by {s.name}"))
    copies = ck._CudaCopies(torch.device("cuda", 0))
    x = torch.randn(2, 3)
    host = copies.to_host(x)
    assert log == ["side waits compute", "alloc pinned host on side", "copy on side non_blocking=True",
                   "input used by side"]
    log.clear()
    dev, ready = copies.to_device(host, torch.device("cuda", 0))
    copies.wait(ready)
    assert log == ["alloc cuda:0 on compute", "side waits compute", "copy on side non_blocking=True",
                   "side records event", "compute waits event@side"]
    assert torch.equal(dev, x) and len(streams) == 1


def test_offload_host_blocks_are_powers_of_two_and_round_trip() -> None:
    """torch's pinned allocator rounds each block up to a power of two: one 3 GiB layer input (8B,
    393,216 tokens) took 4 GiB, and 32 of them asked 128 GiB of a 125 GiB host (one H200,
    2026-12-03: the rank was killed). The offloader cuts each input into power-of-two blocks, so
    the pinned total is the tensor's size. (Pinning needs a GPU; the blocks and copies run here.)"""
    from ftcluster.model.checkpointing import PINNED_MIN_CHUNK, device_copy, host_copy, pinned_chunks
    gib = 1 << 30
    assert pinned_chunks(3 * gib) == [(0, 2 * gib), (2 * gib, 3 * gib)]
    for n in (1, 4096, PINNED_MIN_CHUNK + 8, 3 * gib + 5 * PINNED_MIN_CHUNK + 12):
        chunks = pinned_chunks(n)
        assert chunks[0][0] == 0 and chunks[-1][1] == n and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        sizes = [b - a for a, b in chunks]
        assert all(s & (s - 1) == 0 or (s <= PINNED_MIN_CHUNK and i == len(sizes) - 1) for i, s in enumerate(sizes))
        assert sum(1 << (s - 1).bit_length() for s in sizes) <= n + PINNED_MIN_CHUNK  # what the allocator takes
    x = torch.randn(3, 5 * PINNED_MIN_CHUNK // 4 // 3 + 7, dtype=torch.float32)  # not a power of two
    blocks = host_copy(x, pin=False, non_blocking=False)
    assert len(blocks) > 1 and sum(b.numel() for b in blocks) == x.numel()
    assert all(b.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for b in blocks)
    assert torch.equal(device_copy(blocks, torch.empty_like(x), non_blocking=False), x)
