"""`make bench-scale`: N synthetic products beside 10,000, imported, served on 127.0.0.1 and measured side by side;
writes bench/scale.json and bench/scale.png.

    python -m bench.scale --products 1000000 [--rerun-files 100000] [--out bench/scale.json] [--work-dir DIR]
"""

# The run (__main__) measures each catalog end to end (catalog): `indexer` commands (commands), HTTP probes
# (probes) whose answers are checked against the products' own data (products); then a folder of photos indexed
# again (rerun), and the report.

from __future__ import annotations

import sys

# The write API's key on the servers the run starts, and the k of every /similar and photo search.
KEY = "bench-scale-key"
K = 10


def log(message: str) -> None:
    print(f"bench-scale: {message}", file=sys.stderr, flush=True)
