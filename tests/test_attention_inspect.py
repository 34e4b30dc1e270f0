"""`e2evlp kernels inspect` and the spill table: no offered autotune candidate spills registers.

The table (kernels/attention_spills.json) is ptxas's report on every candidate for sm_80 and sm_90, made by
`make kernels-inspect`; these tests check that the pruning follows it, that every pass keeps a candidate, and
recompile a subset here (Triton's real compiler, no GPU) to check the table against the installed Triton.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import needs_triton

pytestmark = needs_triton
HEAD_DIMS = (32, 64, 80, 96, 128)
FEATURES = ("kpm", "kpm-dropout", "varlen", "varlen-dropout", "mask")


def offered_and_fitting(kernel_pass, major, head_dim, dtype, features):
    from e2evlp.kernels import attention_configs as C
    from e2evlp.kernels import attention_inspect as AI

    flags = AI.flags_of(features, head_dim, False, dtype)
    usable = [c for c in C.generation_configs(kernel_pass, major) if C.usable(c, True, flags)]
    limit, size = AI.ARCHS[major * 10], AI.ELEMENT_SIZE[dtype]
    fitting = [c for c in usable if C.shared_bytes(kernel_pass, c, flags["D_PAD"], size, major)[0] <= limit]
    return C.admissible(usable, kernel_pass, major, limit, flags["D_PAD"], size, flags), fitting, flags


def test_the_table_covers_every_candidate():
    from e2evlp.kernels import attention_configs as C

    table = C.spill_table()["generations"]
    for major in (8, 9):
        swept = set(table[str(major)]["candidates"])
        keys = {C.candidate_key(p, c) for p in ("fwd", "dkdv", "dq") for c in C.generation_configs(p, major)
                if C.variant(c) != "tma-ws" or C.warp_specialization_compiles(dict(HAS_KPM=True, MASK_KIND=0))}
        assert keys <= swept, f"not in the sm_{major}0 spill table (run make kernels-inspect): {keys - swept}"
        assert set(table[str(major)]["features"]) == set(FEATURES)
        assert set(table[str(major)]["head_dims"]) >= set(HEAD_DIMS)


@pytest.mark.parametrize("major", [8, 9])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_no_offered_candidate_spills_and_every_pass_keeps_one(major, dtype):
    """Per the table: an offered candidate never spills, unless every candidate that fits does (then the one
    that spills least is kept, not a 16x16 fallback); and each pass keeps at least one candidate."""
    from e2evlp.kernels import attention_configs as C

    for features in FEATURES:
        for head_dim in HEAD_DIMS:
            for kernel_pass in ("fwd", "dkdv", "dq"):
                offered, fitting, flags = offered_and_fitting(kernel_pass, major, head_dim, dtype, features)
                assert offered, (kernel_pass, head_dim, features)
                spilled = {C.candidate_key(kernel_pass, c): C.spill_bytes(kernel_pass, c, major, flags["D_PAD"], flags)
                           for c in fitting}
                offered_spills = [C.candidate_key(kernel_pass, c) for c in offered
                                  if spilled[C.candidate_key(kernel_pass, c)]]
                if offered_spills:
                    assert len(offered) == 1 and all(spilled.values()), (kernel_pass, head_dim, features, spilled)
                    assert spilled[offered_spills[0]] == min(spilled.values())


def test_a_spill_rules_the_candidate_out(monkeypatch):
    from e2evlp.kernels import attention_configs as C

    flags = dict(HAS_KPM=True, MASK_KIND=0, IS_VARLEN=False, HAS_DROPOUT=False)
    configs = C.generation_configs("dq", 9)
    first = C.candidate_key("dq", configs[0])
    table = {"generations": {"9": {"d_pads": [64], "spills": {"kpm": {first: {"64": 8}}}}}}
    monkeypatch.setattr(C, "spill_table", lambda: table)
    kept = C.admissible(configs, "dq", 9, 227 * 1024, 64, 2, flags)
    assert first not in [C.candidate_key("dq", c) for c in kept] and kept
    assert C.spill_bytes("dq", configs[0], 9, 64, dict(flags, HAS_DROPOUT=True)) == 0  # another feature set
    assert C.spill_bytes("dq", configs[0], 9, 256, flags) == 8  # unswept head dim: the worst swept one


@pytest.mark.parametrize("arch", [90, 80])
def test_the_compiler_agrees_with_the_table(arch, tmp_path):
    """Compiles the offered candidates of every pass at head dim 128 with dropout and key padding (where
    registers run highest) through the CLI, and holds the records to the table and to the issue's keys."""
    import triton
    from e2evlp.kernels import attention_configs as C

    out = tmp_path / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "e2evlp", "kernels", "inspect", "--arch", str(arch),
                             "--head-dim", "128", "--features", "kpm-dropout", "--causal", "no", "--offered-only",
                             "--check", "--json", str(out), "--workers", "2"], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    rows = json.loads(out.read_text())
    keys = {"pass", "arch", "head_dim", "dtype", "causal", "block_m", "block_n", "num_warps", "num_stages",
            "registers", "spill_bytes", "shared_bytes", "wgmma", "tma", "offered"}
    assert rows and all(keys <= set(row) and row["offered"] for row in rows)
    assert {row["pass"] for row in rows} == {"fwd", "delta", "dkdv", "dq"}
    if arch == 90:
        tma_rows = [row for row in rows if row["variant"].startswith("tma")]
        assert tma_rows and all(row["tma"] > 0 and row["cp_async"] == 0 for row in tma_rows)
        assert all(row["wgmma"] > 0 for row in rows if row["pass"] != "delta")
    else:
        assert all(row["tma"] == 0 and row["wgmma"] == 0 for row in rows)
    generation = C.spill_table()["generations"][str(arch // 10)]
    if generation["triton"] != triton.__version__:
        pytest.skip(f"the table was made with Triton {generation['triton']}, this is {triton.__version__}: "
                    f"run make kernels-inspect")
    flags = dict(HAS_KPM=True, HAS_DROPOUT=True, MASK_KIND=0, IS_VARLEN=False)
    for row in rows:
        if row["pass"] == "delta":
            continue
        key = f"{row['pass']} {row['block_m']},{row['block_n']},{row['num_warps']},{row['num_stages']}"
        key = key if row["variant"] == "cp.async" else f"{key} {row['variant']}"
        recorded = generation["spills"].get("kpm-dropout", {}).get(key, {}).get("128", 0)
        assert (row["spill_bytes"] > 0) == (recorded > 0), (row, recorded)
    assert result.returncode == 0, result.stderr[-2000:]  # --check: no offered candidate spilled
