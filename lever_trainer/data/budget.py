"""The memory guard of padded pools: every query's pool is padded to the largest one.

Without ``--max-pool`` the pools are kept whole, so the largest pool in the file sets
the width of every padded tensor. A file where one query's pool is enormous (a pool
that lists the whole corpus) would make the padded tables and batches too large for the
machine; the guard refuses such a run before anything is padded, naming ``--max-pool``
(and ``--batch-size``) and its estimate.

The budget is half the memory of the device that holds the tensors (the machine's
physical memory for the tables and a CPU run's batches, the GPU's memory for a CUDA
run's batches), or :data:`FALLBACK_BUDGET` where the size cannot be read.
"""

from __future__ import annotations

import os

from ..errors import LeverError

#: The budget where the machine's memory cannot be read (8 GiB).
FALLBACK_BUDGET = 8 * 2**30
#: Share of a device's memory the padded pool tensors may take.
BUDGET_SHARE = 0.5
#: A batch's pool tensors are its candidate embeddings [B, K, d] and a score per item
#: and decoding step [B, G, S, K] (float32); the policy's activations and their
#: gradients are counted as this many copies of them (a rough, generous allowance).
ACTIVATION_COPIES = 8


def machine_memory() -> int:
    """This machine's physical memory in bytes (:data:`FALLBACK_BUDGET` * 2 if unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 2 * FALLBACK_BUDGET


def memory_budget(device: str = "cpu") -> int:
    """Bytes the padded pool tensors on ``device`` may take (see the module docstring)."""
    if device.startswith("cuda"):
        import torch

        try:
            total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        except (RuntimeError, AssertionError, ValueError):
            return FALLBACK_BUDGET
        return int(total * BUDGET_SHARE)
    return int(machine_memory() * BUDGET_SHARE)


def table_bytes(n_queries: int, max_pool: int) -> int:
    """The padded pool-id table [Q, K] (int64) and its mask (bool)."""
    return n_queries * max_pool * (8 + 1)


def batch_bytes(batch_size: int, max_pool: int, dim: int, candidates: int, steps: int) -> int:
    """One batch's pool tensors (float32) with :data:`ACTIVATION_COPIES` for the policy."""
    per_item = dim + candidates * steps + 1
    return batch_size * max_pool * per_item * 4 * ACTIVATION_COPIES


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_table(n_queries: int, max_pool: int, where: str, budget: int | None = None) -> None:
    """Refuse padding ``n_queries`` pools to ``max_pool`` ids beyond the budget."""
    need = table_bytes(n_queries, max_pool)
    limit = memory_budget("cpu") if budget is None else budget
    if need > limit:
        raise LeverError(
            f"{where}: the largest pool holds {max_pool:,} ids; padding all {n_queries:,} "
            f"pools to it needs about {_gib(need)}, more than the {_gib(limit)} allowed "
            f"(half this machine's memory); cut the pools with --max-pool N"
        )


def check_batches(
    batch_size: int,
    max_pool: int,
    dim: int,
    candidates: int,
    steps: int,
    device: str,
    budget: int | None = None,
) -> None:
    """Refuse batches of ``batch_size`` pools of ``max_pool`` ids beyond the budget of
    ``device`` (``candidates``: logged sequences per query, ``steps``: their length)."""
    need = batch_bytes(batch_size, max_pool, dim, candidates, steps)
    limit = memory_budget(device) if budget is None else budget
    if need > limit:
        raise LeverError(
            f"--max-pool / --batch-size: a batch of {batch_size} queries with pools of "
            f"{max_pool:,} ids (d = {dim}) needs about {_gib(need)} on {device}, more than "
            f"the {_gib(limit)} allowed (half its memory); cut the pools with --max-pool N "
            f"or lower --batch-size"
        )


__all__ = [
    "ACTIVATION_COPIES",
    "BUDGET_SHARE",
    "FALLBACK_BUDGET",
    "batch_bytes",
    "check_batches",
    "check_table",
    "memory_budget",
    "table_bytes",
]
