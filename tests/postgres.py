"""The suite's throwaway PostgreSQL cluster lives in bench/postgres.py, which `make soak SERVERS=2` uses too (bench
must not import tests); re-exported here for the tests."""

from bench.postgres import DEBIAN_BINDIRS, NO_BINARIES, UNPRIVILEGED_USERS, PostgresCluster, find_bindir

__all__ = ["DEBIAN_BINDIRS", "NO_BINARIES", "UNPRIVILEGED_USERS", "PostgresCluster", "find_bindir"]
