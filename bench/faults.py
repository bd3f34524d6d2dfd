"""The fault table, long form: ``tests/faults``' rig (``deepflow up`` on a PostgreSQL and a
Redis of its own, a second API process, a deployment of the tiny model, DAG jobs and
streaming chats as load), each fault injected ``--rounds`` times with a longer load around
it. Prints the table (one row per round) and exits non-zero if any request was lost or any
check failed.

    .venv/bin/python bench/faults.py [--rounds 3] [--before 5] [--after 20] [--only NAME]
                                     [--keep DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepflow.engine.testmodel import make_test_model  # noqa: E402
from tests.faults.faults import FAULTS  # noqa: E402
from tests.faults.rig import Rig, Row, table  # noqa: E402
from tests.faults.test_faults import DISK_BYTES  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each fault")
    parser.add_argument("--before", type=float, default=5.0, help="seconds of load before")
    parser.add_argument("--after", type=float, default=20.0, help="seconds of load after")
    parser.add_argument("--only", default=None, help="faults whose name contains this")
    parser.add_argument(
        "--keep", type=Path, default=None, help="run in DIR and keep it (logs, the home)"
    )
    args = parser.parse_args()
    faults = {n: f for n, f in FAULTS.items() if args.only is None or args.only in n}
    if not faults:
        parser.error(f"no fault's name contains {args.only!r}: {', '.join(FAULTS)}")
    with tempfile.TemporaryDirectory(prefix="deepflow-faults-") as tmp:
        root = args.keep or Path(tmp)
        folder = make_test_model(root / "model", "llama", "tiny")
        rig = Rig(root / "rig", folder, disk_bytes=DISK_BYTES)
        rows: list[Row] = []
        start = time.monotonic()
        try:
            rig.start()
            print(f"rig up in {time.monotonic() - start:.0f} s", flush=True)
            for n in range(args.rounds):
                for name, inject in faults.items():
                    if name == "fill the disk" and not rig.tmpfs:
                        print("skipping 'fill the disk': the home is not on a disk of its own")
                        continue
                    row = rig.round(name, inject, args.before, args.after)
                    rows.append(row)
                    print(
                        f"[round {n + 1}/{args.rounds}, {time.monotonic() - start:.0f} s] "
                        f"{name}: lost {row.requests_lost}, recovery {row.cells()[-1]} s "
                        f"({row.recovered}), "
                        f"problems {row.problems or 'none'}",
                        flush=True,
                    )
        finally:
            rig.stop()
    print()
    print(table(rows))
    bad = [r for r in rows if r.requests_lost or r.problems]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
