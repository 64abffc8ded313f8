"""Command line: `python -m service`, the production server (what `make serve` runs).

python -m service                          # host, port, workers and threads from config.toml
python -m service --port 8080              # another port
python -m service --no-access-log          # without a line per request on stderr
"""

from __future__ import annotations

import argparse
import sys

from indexer.config import ConfigError, load_settings
from service.server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, help="the port to listen on (default: service.port in config.toml)")
    parser.add_argument("--no-access-log", action="store_true", help="do not log a line per request")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve(settings, port=args.port, access_log=not args.no_access_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
