"""The query benchmark runs: ``python bench/bench_queries.py --quick`` exits 0 and prints its table.

No timing is asserted here (CI machines vary); the benchmark's full run checks the 2x claim.
Both run whole benchmarks in processes of their own: marked ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, scaled

pytestmark = pytest.mark.slow


def test_bench_queries_quick_runs_and_prints_the_table(tmp_path):
    out = tmp_path / "queries.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_queries.py"), "--quick",
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = [i for i, line in enumerate(lines) if "entities" in line and "area us/q" in line and "overlap us/q" in line]
    assert header, proc.stdout
    rows = [line.split() for line in lines[header[0] + 2:header[0] + 4]]
    assert [r[0] for r in rows] == ["1000", "100000"], proc.stdout
    for r in rows:
        assert float(r[4]) > 0 and float(r[5]) > 0, proc.stdout       # us per area / overlap query
    assert any(line.startswith("ratio 100k/1k:") for line in lines), proc.stdout

    result = json.loads(out.read_text())
    assert [z["entities"] for z in result["zones"]] == [1000, 100000]
    assert result["zones"][0]["entities_per_bucket"] == result["zones"][1]["entities_per_bucket"]
    assert set(result["ratio_large_to_small"]) == {"area", "overlap"}


def test_load_benchmark_quick_smoke(tmp_path):
    """``bench/run.py --quick``: a real server process, thin drivers, every client served.

    A smoke run only: it proves the benchmark machinery works end to end (40 players,
    a small world, the baseline fan-out), not that anything is fast.
    """
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--out", str(tmp_path),
                           "--scenario", "grid-walk", "--scenario", "world", "--scenario", "baseline",
                           "--journal", "both"],
                          cwd=ROOT, capture_output=True, text=True, timeout=scaled(300))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    walks = json.loads((tmp_path / "grid-walk.json").read_text())["rows"]
    assert [w["journal"] for w in walks] == ["off", "replay"]  # --journal both: the journal's cost, same run
    for walk in walks:
        assert walk["clients"] == walk["connected"] == walk["alive"] == 40, walk
        assert walk["ticks"] >= 2 and walk["ticks_received_pct"] >= 90, walk
        assert walk["intents_accepted"] > 0 and walk["latency_p50_ms"] is not None, walk
    world = json.loads((tmp_path / "world.json").read_text())["rows"][0]
    assert world["entities"] == 1000 and world["ticks"] >= 2 and world["flushes"] >= 1, world
    base = json.loads((tmp_path / "baseline.json").read_text())["rows"][0]
    assert base["connected"] == 40 and base["ticks_received_pct"] >= 90, base
    assert "grid-walk" in proc.stdout and "baseline" in proc.stdout


def test_cluster_benchmark_quick_smoke(tmp_path):
    """``bench/cluster.py --quick --scenario remote``: its own nats-server and two real nodes,
    40 players connected to the node that ticks their zone, then to the other one."""
    import shutil
    if not (shutil.which("nats-server") or os.path.exists("/usr/sbin/nats-server")):
        if os.environ.get("GRIDSERVER_REQUIRE_NATS"):
            pytest.fail("nats-server is not installed (GRIDSERVER_REQUIRE_NATS is set)")
        pytest.skip("nats-server is not installed")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cluster.py"), "--quick", "--out", str(tmp_path),
                           "--scenario", "remote"], cwd=ROOT, capture_output=True, text=True, timeout=scaled(300))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "cluster-remote.json").read_text())["rows"]
    assert [r["placement"] for r in rows] == ["local", "remote"]
    for row in rows:
        assert row["nodes"] == 2 and row["clients"] == row["alive"] == 40, row
        assert row["ticks_received_pct"] >= 90, row
    assert rows[0]["relay_messages_per_s"] == 0 < rows[1]["relay_messages_per_s"]  # remote players: relayed
    assert "remote / local cost per player-tick" in proc.stdout
