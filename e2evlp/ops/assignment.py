"""Batched exact linear sum assignment on CPU and CUDA: scipy's linear_sum_assignment for [B, N, M] costs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from e2evlp import _ext

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Status codes written by the kernels (csrc/lsap.h), with scipy's wording where scipy has one.
_STATUS_MESSAGES = {
    1: "matrix contains invalid numeric entries",
    2: "cost matrix is infeasible",
    3: "num_rows has a value outside [0, {N}]",
    4: "num_cols has a value outside [0, {M}]",
}

Counts = torch.Tensor | Sequence[int] | int | None


def _checked_counts(counts: Counts, name: str, batch: int, device: torch.device,
                    single: bool) -> torch.Tensor | None:
    """Shape and dtype checks here; the kernels check the values (a bad one becomes a ValueError)."""
    if counts is None:
        return None
    if isinstance(counts, torch.Tensor):
        if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {counts.dtype}")
        tensor = counts
    else:
        try:
            tensor = torch.as_tensor(counts, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be an int64 tensor or a sequence of ints, "
                            f"got {type(counts).__name__}") from exc
    if single and tensor.dim() == 0:
        tensor = tensor.reshape(1)
    if tensor.dim() != 1 or tensor.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one count per item of cost), got {tuple(tensor.shape)}")
    return tensor.to(device=device, dtype=torch.int64, non_blocking=True)


def status_message(code: int, rows: int, cols: int) -> str:
    """The words for a nonzero solver status code, for a batch of [rows, cols] problems."""
    return _STATUS_MESSAGES.get(code, f"unknown solver status {code}").format(N=rows, M=cols)


def raise_on_status(status: torch.Tensor, single: bool, rows: int, cols: int) -> None:
    """ValueError naming the first failed item of a returned status, if any (one host sync)."""
    if not bool(status.any()):
        return
    failed = torch.nonzero(status).flatten().tolist()
    item = failed[0]
    message = status_message(int(status[item]), rows, cols)
    if not single:
        message += f" (batch item {item}" + (f", and {len(failed) - 1} more)" if len(failed) > 1 else ")")
    raise ValueError(message)


def linear_sum_assignment(cost: torch.Tensor, *, num_rows: Counts = None, num_cols: Counts = None,
                          maximize: bool = False, check: bool = True, return_status: bool = False):
    """Solves min (or max) sum_i cost[b, i, assignment[b, i]] exactly for every item b of a batch.

    Args:
        cost: ``[B, N, M]`` or ``[N, M]``; float16/bfloat16/float32/float64; CPU or CUDA; any strides.
        num_rows, num_cols: optional ``[B]`` integer counts of valid rows/columns per item; entries
            outside the valid block are ignored whatever they hold.
        maximize: maximize the total instead of minimizing it.
        check: raise ``ValueError`` for invalid entries, infeasible problems and counts outside
            ``[0, N]``/``[0, M]``. This costs one host sync; with ``check=False`` no sync happens and a
            failed item's rows are all ``-1``.
        return_status: also return the int32 ``[B]`` (or ``[]``) status, 0 for a solved item, else the code
            that ``check`` turns into an error (``status_message`` words it); implies no check, so the
            call stays free of host syncs and can be traced into a graph.

    Returns:
        int64 ``[B, N]`` (or ``[N]``) on ``cost.device``: the column of each row, ``-1`` for an unassigned
        row; exactly ``min(n_valid, m_valid)`` rows per item are assigned. With ``return_status``, the pair
        ``(assignment, status)``. The total cost equals
        ``scipy.optimize.linear_sum_assignment``'s; indices may differ only where ties allow it.
    """
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cost must be float16, bfloat16, float32 or float64, got {cost.dtype}")
    if cost.dim() not in (2, 3):
        raise ValueError(f"cost must be [N, M] or [B, N, M]; expected a matrix, got shape {tuple(cost.shape)}")
    _ext.require(cost.device)
    single = cost.dim() == 2
    batch = cost.unsqueeze(0) if single else cost
    B, N, M = batch.shape
    rows = _checked_counts(num_rows, "num_rows", B, batch.device, single)
    cols = _checked_counts(num_cols, "num_cols", B, batch.device, single)
    assignment, status = torch.ops.e2evlp.linear_sum_assignment(batch, rows, cols, bool(maximize))
    if return_status:
        return (assignment[0], status[0]) if single else (assignment, status)
    if check and B > 0:
        raise_on_status(status, single, N, M)
    return assignment[0] if single else assignment


def assignment_to_indices(assignment: torch.Tensor):
    """Turns an assignment into ``(row_idx, col_idx)`` int64 pairs with rows ascending, on its device.

    ``[B, N]`` gives a list of B pairs; ``[N]`` gives one pair, like scipy's return value. One host sync.
    """
    if not isinstance(assignment, torch.Tensor) or assignment.dtype != torch.int64:
        raise TypeError("assignment must be an int64 tensor as returned by linear_sum_assignment")
    if assignment.dim() not in (1, 2):
        raise ValueError(f"assignment must be [N] or [B, N], got shape {tuple(assignment.shape)}")
    batch = assignment.unsqueeze(0) if assignment.dim() == 1 else assignment
    assigned = batch >= 0
    # A stable sort of the unassigned flag puts each item's assigned rows first, in ascending order.
    rows = torch.sort((~assigned).to(torch.uint8), dim=1, stable=True).indices  # [B, N]
    cols = torch.gather(batch, 1, rows)
    counts = assigned.sum(1).tolist()
    pairs = [(rows[b, :k], cols[b, :k]) for b, k in enumerate(counts)]
    return pairs[0] if assignment.dim() == 1 else pairs
