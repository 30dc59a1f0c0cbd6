"""The data layer: input files -> validated, padded per-query tensors -> batches.

Split along its seams: :mod:`.tables` (tables and batches), :mod:`.embeddings`,
:mod:`.rljson` (RL data parsing), :mod:`.cache` (the prepared form) and :mod:`.load`.
It never discovers plugins: the reward registry is handed in by the caller.
"""

from __future__ import annotations

from .cache import CACHE_FORMAT, CACHE_SUFFIX, TABLE_FIELDS, cache_path_for, options_key
from .embeddings import (
    TABLE_FORMAT,
    TABLE_TENSOR,
    Embeddings,
    check_ids_in_range,
    embedding_warnings,
    format_ids,
    listed_items,
    load_embedding_table,
    load_embeddings,
    parse_ids,
    read_tensor_file,
    table_bytes,
)
from .load import file_fingerprint, load_rl_data, load_verified, plugin_members
from .pools import PoolBatch, PoolTable, check_pool_ids, iter_pools, load_pools, pool_batches
from .rljson import POINTER_FIELDS, DataOptions, LoadReport, build_table, parse_rl_members
from .tables import Batch, QueryTable, gather_groups, iter_batches, make_batch, split_train_val

__all__ = [
    "CACHE_FORMAT",
    "CACHE_SUFFIX",
    "POINTER_FIELDS",
    "TABLE_FIELDS",
    "TABLE_FORMAT",
    "TABLE_TENSOR",
    "Batch",
    "DataOptions",
    "Embeddings",
    "LoadReport",
    "PoolBatch",
    "PoolTable",
    "QueryTable",
    "build_table",
    "cache_path_for",
    "check_ids_in_range",
    "check_pool_ids",
    "embedding_warnings",
    "file_fingerprint",
    "format_ids",
    "gather_groups",
    "iter_batches",
    "iter_pools",
    "listed_items",
    "load_embedding_table",
    "load_embeddings",
    "load_pools",
    "load_rl_data",
    "load_verified",
    "make_batch",
    "options_key",
    "parse_ids",
    "parse_rl_members",
    "plugin_members",
    "pool_batches",
    "read_tensor_file",
    "split_train_val",
    "table_bytes",
]
