"""pytest-benchmark timings of e2evlp's ops on the CPU, for regression tracking (not part of `make test`).

    pytest benchmarks --benchmark-autosave        # keeps this run under .benchmarks/
    pytest benchmarks --benchmark-compare         # against the last saved run

Inputs come from the benchmark scripts (same shapes and generators); the comparisons with peers live there.
"""

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install -e '.[bench]')")

from benchmarks import bench_boxes, bench_lsap, bench_matcher  # noqa: E402
from e2evlp import nn as enn  # noqa: E402
from e2evlp import ops  # noqa: E402
from e2evlp.ops.dispatch import attention_backend_override  # noqa: E402


@pytest.mark.parametrize("batch", [8, 64])
def test_linear_sum_assignment(benchmark, batch):
    benchmark.group = "linear_sum_assignment N=100 M~U[0,50]"
    cost, _, num_cols, _ = bench_lsap.make_case(batch, 100, "U[0,50]", "cpu")
    benchmark(ops.linear_sum_assignment, cost, num_cols=num_cols)


@pytest.mark.parametrize("batch", [8, 64])
def test_matching_cost(benchmark, batch):
    benchmark.group = "matching_cost Q=100 C=91 T~U[0,50]"
    b = bench_boxes.make_batch(batch, "cpu")
    benchmark(ops.matching_cost, b.logits, b.boxes, b.labels, b.tgt_boxes, b.num_targets, **bench_boxes.WEIGHTS,
              validate=False)


@pytest.mark.parametrize("batch", [8, 64])
def test_box_losses_fwd_bwd(benchmark, batch):
    benchmark.group = "box_losses fwd+bwd, the matched pairs of Q=100 T~U[0,50]"
    pred, target = bench_boxes.matched_pairs(bench_boxes.make_batch(batch, "cpu"))
    benchmark(bench_boxes.loss_and_grad, bench_boxes.LOSSES["e2evlp"], pred, target)


@pytest.mark.parametrize("batch", [8, 64])
def test_hungarian_matcher(benchmark, batch):
    benchmark.group = "HungarianMatcher Q=100 C=91 T~U[0,50]"
    outputs, targets = bench_matcher.make_batch(batch, 100, 1, "cpu")
    del outputs["aux_outputs"]
    benchmark(enn.HungarianMatcher(**bench_matcher.WEIGHTS), outputs, targets)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_attention_fwd_bwd(benchmark, backend):
    """Small padded self-attention; "triton" is the kernels in Triton's interpreter, slow by design, so few rounds."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on the CPU only in the interpreter (TRITON_INTERPRET=1, set without a GPU)")
    benchmark.group = "attention fwd+bwd B=2 H=2 L<=64 D=32 key padding"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 32, generator=gen).requires_grad_() for _ in range(3))
    key_padding_mask = torch.arange(64) >= torch.tensor([64, 40])[:, None]
    dout = torch.randn(2, 2, 64, 32, generator=gen)

    def fwd_bwd():
        with attention_backend_override(backend):
            out = ops.attention(q, k, v, key_padding_mask=key_padding_mask)
            return torch.autograd.grad(out, (q, k, v), dout)

    if backend == "triton":
        benchmark.pedantic(fwd_bwd, rounds=3, warmup_rounds=1)
    else:
        benchmark(fwd_bwd)
