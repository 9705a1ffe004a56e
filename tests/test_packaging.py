"""The installed package must carry every subpackage, the YAML groups and the embedded assets
(a non-editable `pip install .` runs from any directory)."""
from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject() -> None:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ftcluster").rglob("__init__.py")}
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert cfg["package-dir"]["ftcluster.conf"] == "conf"


def test_package_data_covers_shipped_files() -> None:
    conf_groups = {p.parent.name for p in (REPO / "conf").glob("*/*.yaml")}
    assert {"model", "data", "peft", "parallel", "launcher", "logger"} <= conf_groups
    assets = REPO / "ftcluster" / "assets"
    for name in ("tiny-llama/config.json", "tiny-llama/model.safetensors", "tiny-llama/tokenizer.json",
                 "tiny-llama/tokenizer_config.json", "data/sample_chat.jsonl"):
        assert (assets / name).is_file(), name
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "tiny-llama/*" in data["ftcluster.assets"] and "data/*" in data["ftcluster.assets"]
    assert "*/*.yaml" in data["ftcluster.conf"]
