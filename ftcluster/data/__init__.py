"""Data: files -> tokenised samples with supervision masks -> deterministic per-rank micro-batches.

`build_dataset` (dataset.py) loads and tokenises; `DistributedBatches` (batches.py) orders and
collates into typed `Batch`es (batch.py); `DataError` is raised for any bad input, naming the key or `file:line`.
"""
from ftcluster.data.batch import IGNORE_INDEX, Batch
from ftcluster.data.batches import DistributedBatches
from ftcluster.data.dataset import DataStats, TokenizedData, build_dataset, check_enough_samples
from ftcluster.data.errors import DataError

__all__ = ["Batch", "DataError", "DataStats", "DistributedBatches", "IGNORE_INDEX", "TokenizedData", "build_dataset",
           "check_enough_samples"]
