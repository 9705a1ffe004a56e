"""Data: files -> tokenised samples with supervision masks -> deterministic per-rank micro-batches.

`build_dataset` (dataset.py) loads and tokenises; `DistributedBatches` (batches.py) orders and
collates into typed `Batch`es (batch.py); `DataError` is raised for any bad input, naming the key or `file:line`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ftcluster.data.errors import DataError

if TYPE_CHECKING:
    from ftcluster.data.batch import IGNORE_INDEX, Batch
    from ftcluster.data.batches import DistributedBatches
    from ftcluster.data.dataset import DataStats, TokenizedData, build_dataset, check_enough_samples

# Loaded on first use (PEP 562): torch and datasets take seconds to import, and the driver's checks
# (ftcluster.data.sources, .formats, .errors) must not pay for them before it can report a bad path.
_LAZY = {"IGNORE_INDEX": "batch", "Batch": "batch", "DistributedBatches": "batches", "DataStats": "dataset",
         "TokenizedData": "dataset", "build_dataset": "dataset", "check_enough_samples": "dataset"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"ftcluster.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ftcluster.data' has no attribute {name!r}")


__all__ = ["Batch", "DataError", "DataStats", "DistributedBatches", "IGNORE_INDEX", "TokenizedData", "build_dataset",
           "check_enough_samples"]
