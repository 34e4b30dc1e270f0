"""What `e2evlp bench` prints: medians with their spread, and speed-ups within the spread flagged as noise."""

from benchmarks.suite import versus_best_peer, within_noise


def record(impl, ms, ms_min, ms_max, case="B=8"):
    return {"bench": "lsap", "impl": impl, "case": case, "pass": None, "device": "cpu", "ms": ms, "ms_min": ms_min,
            "ms_max": ms_max}


def test_spread_is_printed_and_noise_is_flagged():
    records = [record("e2evlp", 1.00, 0.95, 1.40), record("scipy-loop", 1.10, 1.05, 1.20),
               record("e2evlp", 1.00, 0.98, 1.02, case="B=64"), record("scipy-loop", 3.00, 2.90, 3.10, case="B=64")]
    rows = {line.split(" | ")[1]: line for line in versus_best_peer(records).splitlines() if line.startswith("| lsap")}
    assert "1.000 (0.950–1.400)" in rows["B=8"] and "1.100 (1.050–1.200)" in rows["B=8"]
    assert rows["B=8"].endswith("1.10x (noise) |")  # 0.1 ms apart, 0.45 ms of spread
    assert rows["B=64"].endswith("3.00x |")


def test_noise_needs_a_recorded_spread():
    assert not within_noise({"ms": 1.0}, {"ms": 1.01})
    assert within_noise(record("e2evlp", 1.0, 1.0, 1.0), record("peer", 1.01, 0.9, 1.2))
    assert not within_noise(record("e2evlp", 1.0, 1.0, 1.0), record("peer", 1.5, 1.4, 1.6))
