"""The benchmarks run: ``python bench/bench_queries.py --quick`` exits 0 and prints its table,
``bench/walkers_inproc.py`` measures the example game, ``bench/run.py --quick`` plays.

No timing is asserted here (CI machines vary); the benchmark's full run checks the 2x claim.
They run whole benchmarks in processes of their own: marked ``slow``.
"""

from __future__ import annotations

import importlib.util
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


def test_walkers_in_process_benchmark_runs(tmp_path):
    """``bench/walkers_inproc.py``: the example game's own cost over a few zones, with and without fog."""
    for fog in ("0", "8"):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "walkers_inproc.py"), "4", fog],
                              cwd=ROOT, capture_output=True, text=True, timeout=scaled(120))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"4 zones x 50 players, fog radius {fog}: CPU a tick median" in proc.stdout, proc.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_malloc_reads_benchmark_runs():
    """``bench/malloc_reads.py``: a socket read's cost with glibc's default and with a threshold."""
    for arg in ([], ["4194304"]):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "malloc_reads.py"), *arg],
                              cwd=ROOT, capture_output=True, text=True, timeout=scaled(120))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "send + recv(256 KiB)" in proc.stdout and (arg[0] if arg else "glibc default") in proc.stdout


def test_load_benchmark_quick_smoke(tmp_path):
    """``bench/run.py --quick``: a real server process, thin drivers, every client served.

    A smoke run only: it proves the benchmark machinery works end to end (40 players,
    a small world, the baseline fan-out), not that anything is fast.
    """
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--out", str(tmp_path),
                           "--scenario", "grid-walk", "--scenario", "world", "--scenario", "baseline",
                           "--scenario", "memory", "--soak", "0.1", "--journal", "both"],
                          cwd=ROOT, capture_output=True, text=True, timeout=scaled(420))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    walks = json.loads((tmp_path / "grid-walk.json").read_text())["rows"]
    assert [w["journal"] for w in walks] == ["off", "replay"]  # --journal both: the journal's cost, same run
    for walk in walks:
        assert walk["clients"] == walk["connected"] == walk["alive"] == 40, walk
        assert walk["ticks"] >= 2 and walk["ticks_received_pct"] >= 90, walk
        assert walk["intents_accepted"] > 0 and walk["latency_p50_ms"] is not None, walk
        assert walk["jitter_p99_ms"] is not None, walk
    # latency from the tick's start: the journal has each tick's start, so only with it on
    assert walks[0]["start_latency_p50_ms"] is None, walks[0]
    assert walks[1]["start_latency_p50_ms"] is not None and walks[1]["start_latency_p99_ms"] is not None, walks[1]
    world = json.loads((tmp_path / "world.json").read_text())["rows"][0]
    assert world["entities"] == 1000 and world["ticks"] >= 2 and world["flushes"] >= 1, world
    base = json.loads((tmp_path / "baseline.json").read_text())["rows"][0]
    assert base["connected"] == 40 and base["ticks_received_pct"] >= 90, base
    assert base["start_latency_p50_ms"] is not None and base["jitter_p99_ms"] is not None, base
    assert "grid-walk" in proc.stdout and "baseline" in proc.stdout

    # memory: gridserver and the baseline at 20 and 40 players, the last count as a short soak
    *runs, summary = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [(r["server"], r["clients"]) for r in runs] == [("gridserver", 20), ("baseline", 20),
                                                            ("gridserver", 40), ("baseline", 40)]
    for r in runs:
        assert r["alive"] == r["clients"] and 0 < r["rss_start_mib"] <= r["rss_max_mib"], r
        assert r["rss_end_mib"] <= r["rss_max_mib"], r
    for r in runs[2:]:  # the soak: windows back to back, each with its figures
        assert r["soak_s"] == 6 and len(r["series"]) == 2, r
        assert all(w["ticks"] >= 2 and w["rss_mib"] > 0 for w in r["series"]), r
    assert summary["scenario"] == "memory" and set(summary) >= {"gridserver", "baseline"}, summary
    assert "MiB per 1,000 players" in proc.stdout


def _bench_run():
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "bench", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(scenario: str, clients: int, **extra) -> dict:
    row = {"scenario": scenario, "clients": clients, "server_cpu_s_per_s": clients / 10_000, "rss_mib": 50.0,
           "start_latency_p50_ms": 20.0, "start_latency_p99_ms": 40.0, "jitter_p99_ms": 5.0,
           "lateness_p99_ms": None}
    row.update(extra)
    return row


def test_plot_lines_pair_gridserver_with_its_baseline():
    """``--plot``'s lines, without drawing: grid-walk without fog, one line per journal mode
    and event loop in the run, and the baseline, each in order of players."""
    run = _bench_run()
    walk = [_row("grid-walk", 6000, journal="replay", loop="asyncio"),
            _row("grid-walk", 2000, journal="replay", loop="asyncio"),
            _row("grid-walk-fog", 2000, journal="replay", loop="asyncio", fog_radius=8)]
    base = [_row("baseline", 6000), _row("baseline", 2000)]
    lines = run.plot_series(walk, base)
    assert list(lines) == ["gridserver", "baseline fan-out"]
    assert [r["clients"] for r in lines["gridserver"]] == [2000, 6000]
    assert [r["clients"] for r in lines["baseline fan-out"]] == [2000, 6000]
    walk.append(_row("grid-walk", 2000, journal="off", loop="asyncio"))
    assert list(run.plot_series(walk, [])) == ["gridserver (journal off, asyncio)",
                                               "gridserver (journal replay, asyncio)"]


def test_plot_draws_the_rows_of_a_run(tmp_path):
    """``bench/run.py --plot FILE --no-run`` draws the rows already written into a PNG."""
    pytest.importorskip("matplotlib", reason="matplotlib is the [bench] extra (pip install -e '.[bench]'), "
                                             "not installed here: the drawing is not tested")
    machine = {"cpus": 2, "python": "3.11.7", "time": "2026-01-01T00:00:00Z"}
    walk = [_row("grid-walk", n, journal="replay", loop="asyncio", lateness_p99_ms=2.0) for n in (2000, 6000)]
    (tmp_path / "grid-walk.json").write_text(json.dumps({"machine": machine, "rows": walk}))
    (tmp_path / "baseline.json").write_text(json.dumps({"machine": machine, "rows": [_row("baseline", 2000)]}))
    out = tmp_path / "knee.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--no-run", "--plot", str(out),
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=scaled(120))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
