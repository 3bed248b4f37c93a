"""Soak run of the fault suite: ``python bench/soak.py [--rounds N] [--fuzz-examples N] [-k EXPR]``.

Runs the fault suite, ``tests/test_faults*.py`` (real server processes attacked over real
sockets: crashes, outages, fuzzing, connection abuse, and the limits on what one player or
address can do), with more than CI gives it: ``--fuzz-examples`` REST fuzzing cases per
backend (CI: 1000), and ``--rounds`` times the SIGKILL cycles (CI: 3), the connection-abuse
waves (CI: 2), the subscribe floods, the reconnecting intent floods and the login floods.
The figures it measured are printed at the end (``fault suite figures``). Needs PostgreSQL as
the test suite does (``GRIDSERVER_TEST_PG_DSN``); every process it starts is stopped before
it exits.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="multiplier of crash cycles and abuse waves")
    parser.add_argument("--fuzz-examples", type=int, default=20000, help="REST fuzzing cases per backend")
    parser.add_argument("-k", dest="select", default=None, help="only the tests matching this pytest expression")
    args = parser.parse_args()
    env = dict(os.environ, GRIDSERVER_SOAK_ROUNDS=str(args.rounds), GRIDSERVER_FUZZ_EXAMPLES=str(args.fuzz_examples))
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "test_faults*.py")))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(os.path.relpath(f, ROOT) for f in files)]
    if args.select:
        cmd += ["-k", args.select]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
