"""Reference twin of e2evlp.ops.linear_sum_assignment: scipy on the host, one problem at a time (DETR's way)."""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch


def linear_sum_assignment(cost: torch.Tensor, *, num_rows=None, num_cols=None, maximize: bool = False) -> torch.Tensor:
    """Same contract as e2evlp.ops.linear_sum_assignment, solved by a Python loop over scipy in float64.

    Copies the costs to the host (as DETR's matcher does) and raises scipy's ValueErrors unchanged.
    """
    single = cost.dim() == 2
    batch = cost.unsqueeze(0) if single else cost
    B, N, M = batch.shape
    host = batch.detach().to("cpu", torch.float64).numpy()
    rows = [N] * B if num_rows is None else torch.as_tensor(num_rows).reshape(-1).tolist()
    cols = [M] * B if num_cols is None else torch.as_tensor(num_cols).reshape(-1).tolist()
    out = np.full((B, N), -1, dtype=np.int64)
    for b in range(B):
        row_ind, col_ind = scipy.optimize.linear_sum_assignment(host[b, : rows[b], : cols[b]], maximize=maximize)
        out[b, row_ind] = col_ind
    result = torch.from_numpy(out).to(cost.device)
    return result[0] if single else result
