"""`ftcluster export CKPT OUT [--merge] [--dtype bf16]`: a checkpoint as a Hugging Face model or adapter.

Output:
  * adapter runs (lora, qlora, longlora), default: a PEFT adapter (`adapter_config.json` +
    `adapter_model.safetensors`, loadable with `peft.PeftModel.from_pretrained`) whose
    `base_model_name_or_path` is the run's local base directory (`model.path`). A run that started
    from random weights has no base directory: the export writes the base too, regenerated from the
    seed with the training init rules (`ftcluster.model._init_full`), under `OUT/base`, and points
    the adapter there. LongLoRA's fully trained modules (`peft.trainable_modules`) go in as peft
    `modules_to_save`.
  * `--merge` (and every full fine-tune): the merged model in safetensors shards
    (`model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`) with its config, generation
    config and tokenizer (loadable with `AutoModelForCausalLM.from_pretrained`). A QLoRA merge goes
    into the DE-QUANTISED NF4 base (the weights the adapters were trained against), and says so.

Streaming: the export never holds the model. Output shards are planned from shapes alone; for each
shard the tensors it needs (trained weights from the checkpoint, one batched read; base weights
one at a time from `model.path` via `SafetensorsSlices`, or regenerated from the seed) are made,
merged, written and freed before the next. Peak memory is about one output shard
(`--max-shard-size`, default 5GB) plus the largest single tensor.

What a checkpoint holds is read through one seam, `open_engine_state(engine_dir, backend)`: an
`EngineState` maps the trained module's parameter names to (shape, dtype) and reads a list of
them. FSDP2 (torch.distributed.checkpoint) is read offline, without a process group, one batch of
keys per call (`dcp.load(..., no_dist=True)` reads only the chunks of the requested keys).
DeepSpeed ZeRO checkpoints are read with DeepSpeed's own zero_to_fp32 in lazy mode (fp32 master
weights, one tensor at a time). Frozen weights absent from the checkpoint (`checkpoint.adapter_only`)
come from the run's model source, exactly as when resuming.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ftcluster.config import JobConfig
from ftcluster.parallel import CheckpointFormatError, EngineState

log = logging.getLogger("ftcluster")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ADAPTER = "default"  # peft's adapter name in the trained module


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message says why and what to do."""


# --- what a checkpoint holds: the reader seam -------------------------------------------------------

def open_engine_state(directory: Path, *, backend: str) -> EngineState:
    """The reader for the `engine/` directory a `parallel.backend` wrote (the backend table's)."""
    from ftcluster.parallel import backend_for

    from ftcluster.safe_load import UnsafeCheckpointError

    try:
        return backend_for(backend).CheckpointReader(directory)
    except (CheckpointFormatError, UnsafeCheckpointError) as e:
        raise ExportError(str(e)) from None


# --- the run a checkpoint came from -----------------------------------------------------------------

@dataclass(kw_only=True)
class Source:
    checkpoint: Path
    job: JobConfig
    meta: dict


def resolve_checkpoint(path: Path) -> Path:
    """A committed checkpoint directory, or a run directory (its newest committed checkpoint)."""
    from ftcluster.checkpoint import is_committed

    if is_committed(path):
        return path
    ck = path / "checkpoints"
    found = sorted((p for p in ck.iterdir() if is_committed(p)), key=lambda p: int(p.name.split("_")[1])) if ck.is_dir() else []
    if found:
        return found[-1]
    raise ExportError(f"{path}: not a committed checkpoint (no meta.json) nor a run directory holding one")


def load_source(path: Path, *, trust_remote_code: bool = False) -> Source:
    """The checkpoint and the run's config. `trust_remote_code` is the exporter's decision, not the
    run's: a checkpoint from elsewhere must not run its model directory's code unless asked."""
    from ftcluster.compose import load_saved_job
    from ftcluster.config import ConfigError

    from ftcluster.checkpoint_integrity import CorruptCheckpointError, verify_or_raise

    ckpt = resolve_checkpoint(path)
    try:  # a checkpoint that fails verification is never exported (legacy ones, no manifest: a warning)
        verify_or_raise(ckpt)
    except CorruptCheckpointError as e:
        raise ExportError(f"refusing to export: {e}") from None
    cfg_file = ckpt / "config.yaml"
    if not (cfg_file.is_file() and cfg_file.read_text().strip()):
        raise ExportError(f"{ckpt}: no config.yaml (the run's resolved config); cannot tell the model it trained")
    try:  # the typed tree only: the run's paths (resume, data) need not exist any more
        job = load_saved_job(cfg_file, driver_checks=False)
    except ConfigError as e:
        raise ExportError(f"{cfg_file}: {e}") from None
    job = dataclasses.replace(job, model=dataclasses.replace(job.model, trust_remote_code=trust_remote_code))
    return Source(checkpoint=ckpt, job=job, meta=json.loads((ckpt / "meta.json").read_text()))


def build_skeleton(job: JobConfig) -> tuple[nn.Module, nn.Module]:
    """(trained module, HF model) exactly as training built them (`build_module`), on the meta
    device: the same parameter names, shapes and PEFT wrapping (QLoRA's NF4 layers included)."""
    from ftcluster.model import build_module

    # GPU kernels change no parameter; the FP8 base (a compute format of the frozen weights) is
    # not exported: adapters merge into the original weights.
    job = dataclasses.replace(job, model=dataclasses.replace(job.model, liger=False),
                              peft=dataclasses.replace(job.peft, fp8_base=False))
    built = build_module(job)
    return built.module, built.hf_model


# --- tensors of the export --------------------------------------------------------------------------

@dataclass(kw_only=True)
class Entry:
    """One tensor of the exported HF model."""
    hf_name: str
    param: str
    """The trained module's parameter it comes from (an NF4 state for QLoRA's quantised linears)."""
    shape: torch.Size
    lora: tuple[str, str, float] | None = None
    """(lora_A name, lora_B name, scaling) merged into it, if any."""


def plan_entries(module: nn.Module) -> list[Entry]:
    """Every tensor of the HF model, in module order, with where it comes from."""
    from ftcluster.model import hf_key, is_adapter_param
    from ftcluster.quant import is_nf4_param, nf4_module, nf4_weight_name

    loras: dict[str, tuple[str, str, float]] = {}
    for mname, m in module.named_modules():
        lora_a = getattr(m, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and ADAPTER in lora_a:
            if getattr(m, "use_dora", {}).get(ADAPTER, False):
                raise ExportError("DoRA adapters are not supported by the export")
            ab = (f"{mname}.lora_A.{ADAPTER}.weight", f"{mname}.lora_B.{ADAPTER}.weight", float(m.scaling[ADAPTER]))
            loras[f"{mname}.base_layer.weight"] = ab
            loras[f"{mname}.base_layer.nf4"] = ab
    out = []
    for name, p in module.named_parameters():
        if is_adapter_param(name):
            continue
        if is_nf4_param(name):
            lin = nf4_module(module, name)
            out.append(Entry(hf_name=hf_key(nf4_weight_name(name)), param=name,
                             shape=torch.Size((lin.out_features, lin.in_features)), lora=loras.get(name)))
        else:
            out.append(Entry(hf_name=hf_key(name), param=name, shape=p.shape, lora=loras.get(name)))
    return out


class BaseWeights:
    """Full-precision values of trained-module parameters, one at a time: from the checkpoint when
    it holds them, else from the run's model source (`model.path` safetensors, or the seeded init on
    the device type the run used). An NF4 state is returned de-quantised (fp32): re-quantised
    from the source exactly as training did, or decoded from the checkpoint's saved NF4 bytes."""

    def __init__(self, *, source: Source, module: nn.Module, state: EngineState, device: torch.device) -> None:
        from ftcluster.model import SafetensorsSlices

        self.job, self.module, self.state, self.device = source.job, module, state, device
        cfg = source.job.model
        self.reader = SafetensorsSlices(Path(cfg.path)) if cfg.init == "pretrained" else None
        self.std = float(getattr(module.hf_model.config, "initializer_range", 0.02))

    def full(self, name: str, *, from_ckpt: dict[str, torch.Tensor]) -> torch.Tensor:
        from ftcluster.model import quantized_full
        from ftcluster.quant import dequantize_nf4, is_nf4_param, nf4_module

        if is_nf4_param(name):
            flat = from_ckpt.get(name)
            if flat is None:
                flat = quantized_full(self.module, name, reader=self.reader, seed=self.job.seed, std=self.std,
                                device=self.device, storage_dtype=torch.float32)
            return dequantize_nf4(flat.to(self.device), nf4_module(self.module, name).layout, dtype=torch.float32).cpu()
        if name in from_ckpt:
            return from_ckpt[name].float()
        return self._source(name, self.module.get_parameter(name).shape).cpu()

    def _source(self, name: str, shape: torch.Size) -> torch.Tensor:
        from ftcluster.model import source_weight

        return source_weight(name, shape, reader=self.reader, hf_config=self.module.hf_model.config,
                             seed=self.job.seed, std=self.std, device=self.device).float()


def _exact_rebuild(job, state, entries) -> bool:  # type: ignore[no-untyped-def]
    """Whether weights missing from the checkpoint must be rebuilt on the device type training made
    them on: seeded weights (CPU and CUDA random streams differ) and a QLoRA base (NF4 quantisation
    on CUDA and on CPU can round differently; the adapters were trained against the CUDA one)."""
    missing = any(e.param not in state.names() for e in entries)
    return missing and (job.model.init == "random" or job.peft.method == "qlora")


def _init_device(meta: dict, *, needed: bool) -> torch.device:
    """The device type that made the run's weights (see _exact_rebuild); CPU when it is not needed
    and no GPU is here."""
    kind = meta.get("model", meta).get("init_device", "cpu")  # older checkpoints: at the top level
    if kind == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if needed:
            raise ExportError("this run's base weights were generated from the seed or quantised on a GPU; run the "
                              "export on a machine with a GPU to rebuild exactly the weights it trained against")
    return torch.device("cpu")


# --- writers ----------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ExportError(f"--max-shard-size: expected a size like 5GB or 500MB; got {text!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def shard_plan(entries: list[Entry], *, dtype: torch.dtype, max_bytes: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = math.prod(e.shape) * dtype.itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _progress(total: int, what: str):  # type: ignore[no-untyped-def]
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                    TimeElapsedColumn(), console=console, disable=not console.is_terminal)


def write_model(out: Path, *, entries: list[Entry], base: BaseWeights, state: EngineState, dtype: torch.dtype,
                max_bytes: int, merge: bool, what: str) -> dict:
    """Write `entries` as HF safetensors shards + index, one shard at a time (merging LoRA when
    `merge`). Returns the index."""
    from safetensors.torch import save_file

    held = state.names()
    shards = shard_plan(entries, dtype=dtype, max_bytes=max_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    with _progress(n, what) as bar:
        task = bar.add_task(what, total=n)
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            wanted = [e.param for e in shard if e.param in held]
            if merge:
                wanted += [x for e in shard if e.lora for x in e.lora[:2]]
            got = state.read(sorted(set(wanted)))
            tensors: dict[str, torch.Tensor] = {}
            for e in shard:
                tensors[e.hf_name] = _value(e, base, got, merge=merge).to(dtype).contiguous()
                weight_map[e.hf_name] = fname
                total += tensors[e.hf_name].numel() * dtype.itemsize
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            del tensors, got
            bar.update(task, advance=1)
            if not bar.console.is_terminal:
                print(f"{what}: shard {i}/{n} written ({fname})", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index


def write_hf_extras(out: Path, *, source: Source, hf_model: nn.Module, dtype: torch.dtype) -> list[str]:
    """config.json (full attention, no S2 keys, the trained RoPE), generation config, tokenizer."""
    from ftcluster.longlora import hf_config_for_export

    job = source.job
    cfg = hf_config_for_export(hf_model.config)
    cfg.use_cache = True
    cfg.architectures = [type(hf_model).__name__]
    cfg.dtype = dtype
    cfg.save_pretrained(str(out))
    written = ["config.json"]
    if job.model.path and (Path(job.model.path) / "generation_config.json").is_file():
        shutil.copy2(Path(job.model.path) / "generation_config.json", out / "generation_config.json")
        written.append("generation_config.json")
    if save_tokenizer(job, out):
        written.append("tokenizer")
    return written


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def save_tokenizer(job: JobConfig, out: Path) -> bool:
    """Copy the run's tokenizer (model.tokenizer, else model.path) into `out`, if it has one."""
    tok_dir = job.model.tokenizer or job.model.path
    if not tok_dir or not any((Path(tok_dir) / f).is_file() for f in TOKENIZER_FILES):
        return False
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=job.model.trust_remote_code, local_files_only=True)
    tok.save_pretrained(str(out))
    return True


def peft_adapter_key(name: str) -> str:
    """Trained-module name -> key in a PEFT adapter file: no loss-head prefix, no adapter name."""
    key = name.removeprefix("model.")
    return key.replace(f".{ADAPTER}.", ".")


def write_adapter(out: Path, *, source: Source, module: nn.Module, state: EngineState, base_dir: str,
                  dtype: torch.dtype) -> int:
    from safetensors.torch import save_file

    from ftcluster.model import is_adapter_param

    peft_model = module.model
    held = state.names()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n not in held]
    if missing:
        raise ExportError(f"{source.checkpoint}: the checkpoint lacks trained parameters, e.g. {missing[0]}")
    tensors = {peft_adapter_key(n): t.to(dtype).contiguous() for n, t in state.read(trainable).items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = dataclasses.replace(peft_model.peft_config[ADAPTER])
    cfg.base_model_name_or_path = base_dir
    cfg.inference_mode = True
    full = [n for n in trainable if not is_adapter_param(n)]
    if full:  # LongLoRA+: embeddings / norms trained in full travel as modules_to_save
        cfg.modules_to_save = list(source.job.peft.trainable_modules)
    cfg.save_pretrained(str(out))
    return len(tensors)


# --- the command ------------------------------------------------------------------------------------

def export(checkpoint: Path, out: Path, *, merge: bool = False, dtype: str = "bf16", max_shard_size: str = "5GB",
           trust_remote_code: bool = False) -> dict:
    """Export a checkpoint (or a run dir's newest one) to `out` (created; must not hold files).
    Everything is written into a temporary sibling directory renamed to `out` at the end, so an
    interrupted export never leaves a half-written model under that name. Returns a summary (also
    written to `out/ftcluster_export.json`)."""
    out = Path(os.path.abspath(out))
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty; choose a new output directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = _export(checkpoint, tmp, final=out, merge=merge, dtype=dtype, max_shard_size=max_shard_size,
                          trust_remote_code=trust_remote_code)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _usual_modes(tmp)
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.rename(tmp, out)
    return summary


def _usual_modes(root: Path) -> None:
    """Give every exported file and folder the mode a newly created one gets here (0644 / 0755
    under the usual umask 022): some writers (safetensors' shard writer) create files 0600, which
    the rest of a shared cluster's group could not read while the json files beside them can."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _export(checkpoint: Path, out: Path, *, final: Path, merge: bool, dtype: str, max_shard_size: str,
            trust_remote_code: bool) -> dict:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype: one of {', '.join(DTYPES)}; got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    source = load_source(checkpoint, trust_remote_code=trust_remote_code)
    job = source.job
    method = job.peft.method
    if job.model.init == "pretrained" and not (job.model.path and Path(job.model.path).is_dir()):
        raise ExportError(f"model.path: the run's base model directory {job.model.path} is gone; it is needed for the "
                          "weights the checkpoint does not hold")
    state = open_engine_state(source.checkpoint / "engine", backend=job.parallel.backend)
    module, hf_model = build_skeleton(job)
    entries = plan_entries(module)
    merged = merge or method == "none"
    device = _init_device(source.meta, needed=_exact_rebuild(job, state, entries))
    base = BaseWeights(source=source, module=module, state=state, device=device)
    out.mkdir(parents=True, exist_ok=True)
    tdtype = DTYPES[dtype]
    summary: dict = {"checkpoint": str(source.checkpoint), "step": source.meta.get("step"), "peft": method,
                     "backend": job.parallel.backend, "dtype": dtype}
    notes = []
    if method == "qlora":
        notes.append("QLoRA: the base is the de-quantised NF4 base (bitsandbytes nf4, blocksize 64, double "
                     "quantisation) the adapters were trained against" if merged else
                     "QLoRA: the adapters were trained against the base quantised to NF4 (bitsandbytes nf4, blocksize "
                     "64, double quantisation); load the base with BitsAndBytesConfig(load_in_4bit=True, "
                     "bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True) to get the same quantised weights")
    if merged:
        what = "merge" if method != "none" else "export"
        index = write_model(out, entries=entries, base=base, state=state, dtype=tdtype, max_bytes=max_bytes,
                            merge=method != "none", what=what)
        summary.update(kind="merged" if method != "none" else "full", shards=len(set(index["weight_map"].values())),
                       files=write_hf_extras(out, source=source, hf_model=hf_model, dtype=tdtype))
        if method == "none" and not merge:
            notes.append("a full fine-tune has no adapter: wrote the whole model")
    else:
        if job.model.init == "random":
            base_dir = out / "base"
            base_dir.mkdir()
            base_entries = plan_entries(module)
            for e in base_entries:
                e.lora = None
            # The base as initialised (QLoRA: before quantisation, as model.path would hold it).
            unquantised = BaseWeights(source=source, module=module, state=_Empty(), device=device)
            if method == "qlora":
                unquantised.full = _unquantised_full(unquantised)  # type: ignore[method-assign]
            write_model(base_dir, entries=base_entries, base=unquantised, state=_Empty(), dtype=tdtype,
                        max_bytes=max_bytes, merge=False, what="base")
            write_hf_extras(base_dir, source=source, hf_model=hf_model, dtype=tdtype)
            base_ref = str(final / "base")  # where it will be once the export is renamed into place
            notes.append(f"the run started from random weights (seed {job.seed}): wrote them to {base_ref}")
        else:
            base_ref = str(Path(job.model.path).resolve())
        n = write_adapter(out, source=source, module=module, state=state, base_dir=base_ref, dtype=tdtype)
        summary.update(kind="adapter", tensors=n, base_model_name_or_path=base_ref)
        save_tokenizer(job, out)
    summary["notes"] = notes
    (out / "ftcluster_export.json").write_text(json.dumps(summary, indent=1))
    return summary


class _Empty:
    """An EngineState holding nothing (the base of a random-init run comes from the seed only)."""

    def names(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        return {}

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {}


def _unquantised_full(base: BaseWeights):  # type: ignore[no-untyped-def]
    """BaseWeights.full returning the full-precision source of NF4 states (not de-quantised)."""
    from ftcluster.quant import is_nf4_param, nf4_module, nf4_weight_name

    plain = base.full

    def full(name: str, *, from_ckpt: dict[str, torch.Tensor]) -> torch.Tensor:
        if is_nf4_param(name):
            lin = nf4_module(base.module, name)
            return base._source(nf4_weight_name(name), torch.Size((lin.out_features, lin.in_features))).cpu()
        return plain(name, from_ckpt=from_ckpt)

    return full


def export_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ftcluster export", description=(
        "Write a checkpoint as a Hugging Face PEFT adapter (default for adapter runs) or, with --merge, "
        "a merged model in safetensors shards with config and tokenizer. CHECKPOINT is a committed "
        "checkpoint directory (run.dir/checkpoints/step_N) or a run directory (its newest checkpoint)."))
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path, help="output directory (created; must be empty)")
    p.add_argument("--merge", action="store_true", help="merge the adapters into the base and write the whole model")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of written weights (default bf16)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the base model directory's own Python code run (off by default, whatever the run "
                        "used). Checkpoint files themselves never run code: their pickles load with weights_only=True "
                        "and an allowlist (ftcluster/safe_load.py)")
    p.add_argument("--best", action="store_true",
                   help="CHECKPOINT is a run directory: export its best checkpoint (checkpoint.keep_best, "
                        "recorded in best.json) instead of the newest")
    args = p.parse_args(argv)
    if args.best:
        from ftcluster.checkpoint import BEST_FILE, best_checkpoint

        best = best_checkpoint(args.checkpoint)
        if best is None:
            print(f"ftcluster export: --best: {args.checkpoint / BEST_FILE} names no committed checkpoint (was the run "
                  "trained with checkpoint.keep_best=true and held-out data?)", file=sys.stderr)
            return 2
        args.checkpoint = best
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        summary = export(args.checkpoint, args.out, merge=args.merge, dtype=args.dtype, max_shard_size=args.max_shard_size,
                         trust_remote_code=args.trust_remote_code)
    except ExportError as e:
        print(f"ftcluster export: {e}", file=sys.stderr)
        return 2
    print(f"ftcluster export: wrote {summary['kind']} ({summary['peft']}, step {summary['step']}, {summary['dtype']}) "
          f"to {args.out}")
    for note in summary["notes"]:
        print(f"  note: {note}")
    return 0


def _value(e: Entry, base: BaseWeights, got: dict[str, torch.Tensor], *, merge: bool) -> torch.Tensor:
    """One exported weight in fp32: the base (or fully trained) value, plus scaling x B @ A when merging."""
    w = base.full(e.param, from_ckpt=got)
    if merge and e.lora:
        a, b, scaling = e.lora
        w = w + scaling * (got[b].float() @ got[a].float())
    return w


def iter_hf_tensors(checkpoint: Path, *, merge: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, fp32 tensor) of a checkpoint's model, one tensor at a time (merged by default):
    the export's streaming path without writing files."""
    source = load_source(checkpoint)
    state = open_engine_state(source.checkpoint / "engine", backend=source.job.parallel.backend)
    module, _ = build_skeleton(source.job)
    entries = plan_entries(module)
    device = _init_device(source.meta, needed=_exact_rebuild(source.job, state, entries))
    base = BaseWeights(source=source, module=module, state=state, device=device)
    held = state.names()
    for e in entries:
        wanted = ([e.param] if e.param in held else []) + (list(e.lora[:2]) if merge and e.lora else [])
        yield e.hf_name, _value(e, base, state.read(wanted), merge=merge)
