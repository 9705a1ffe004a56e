"""`ftcluster train --help`: every config group with its options, and every key with its type,
default and the first line of its docstring, read from the schema (ftcluster/config.py), so the
help cannot drift from the code. (Hydra's own help, `--hydra-help`, stays available.)"""
from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

from omegaconf import MISSING

from ftcluster import config as schema

HEADER = """ftcluster train: fine-tune a causal LM. Compose the job from config groups (group=option) and
override any key (key=value). With no arguments it fine-tunes the embedded tiny model on the
sample chat data (a minute on a laptop CPU).

usage: ftcluster train [group=option ...] [key=value ...] [--verbose]
       ftcluster train -m key=a,b [key2=x,y ...]      a sweep (Hydra multirun): one run per combination,
                                                      in <run.dir>/0, <run.dir>/1, ...

Fine-tune a real model (a local Hugging Face directory; nothing is downloaded), LoRA on 8 GPUs:
  ftcluster train model=local model.path=/models/Llama-3.1-8B-Instruct \\
    data=jsonl data.path=/data/train.jsonl peft=lora launcher.nproc_per_node=8 run.name=llama8b-lora

Size it first (per-rank GPU/host memory and the layout `auto` picks; no GPU needed, same overrides):
  ftcluster plan model=llama3_70b peft=qlora --nodes 1,2,4 --gpu-gib 80,141 [--json]

A value with a comma is a list to Hydra: quote it, e.g. 'data.path="/d/a.jsonl,/d/b.jsonl"'.
--verbose (log.level=debug) shows third-party output on the console; --cfg job prints the composed
config; --version the installed version."""

GROUP_VARIANTS = {
    "parallel": (schema.FSDP2Config, schema.ZeroConfig),
    "launcher": (schema.LocalLauncherConfig, schema.RayLauncherConfig, schema.SlurmLauncherConfig),
}
"""Groups whose schema is one of several classes (the option picks it)."""


def _first_sentence(doc: str) -> str:
    """A docstring's first sentence (its first line, continued to the sentence's end)."""
    para = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    return para[: para.index(". ") + 1] if ". " in para else para


def field_docs(cls: type) -> dict[str, str]:
    """The first sentence of each field's attribute docstring (the string literal after it)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = _first_sentence(nxt.value.value)
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if value is MISSING:
        return "???"
    return repr(value) if isinstance(value, str) else str(value)


def _key_lines(cls: type, prefix: str) -> list[str]:
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if callable(f.default_factory) else None):  # nested group
            lines += _key_lines(f.default_factory, f"{prefix}{f.name}.")  # type: ignore[arg-type]
            continue
        lines.append(f"  {prefix}{f.name}: {f.type} = {_default(f)}\n      {docs.get(f.name, '')}")
    return lines


def _options(conf_dir: Path, group: str) -> list[str]:
    d = conf_dir / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _defaults(conf_dir: Path) -> dict[str, str]:
    import yaml

    out = {}
    for entry in yaml.safe_load((conf_dir / "config.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict):
            (k, v), = entry.items()
            out[k] = v
    return out


def train_help(conf_dir: Path) -> str:
    """The whole text of `ftcluster train --help`."""
    defaults, docs = _defaults(conf_dir), field_docs(schema.JobConfig)
    out = [HEADER, "", "== Config groups (group=option; * marks the default) =="]
    for f in dataclasses.fields(schema.JobConfig):
        opts = _options(conf_dir, f.name)
        if opts:
            marked = " | ".join(o + ("*" if defaults.get(f.name) == o else "") for o in opts)
            out.append(f"  {f.name}={marked}\n      {docs.get(f.name, '')}")
    out += ["", "== Keys (key: type = schema default; a group option may set other values) =="]
    fields = dataclasses.fields(schema.JobConfig)
    # Top-level scalar keys first, then one section per group.
    fields = [f for f in fields if f.type in ("int", "str")] + [f for f in fields if f.type not in ("int", "str")]
    for f in fields:
        classes = GROUP_VARIANTS.get(f.name)
        if classes:
            for cls in classes:
                out += [f"{f.name} ({cls.__name__}):", *_key_lines(cls, f"{f.name}.")]
        elif callable(f.default_factory) and dataclasses.is_dataclass(f.default_factory):
            out += [f"{f.name}: {docs.get(f.name, '')}", *_key_lines(f.default_factory, f"{f.name}.")]
        elif f.name == "model":
            out += [f"model: {docs.get('model', '')}", *_key_lines(schema.ModelConfig, "model.")]
        else:
            out.append(f"  {f.name}: {f.type} = {_default(f)}\n      {docs.get(f.name, '')}")
    return "\n".join(out)
