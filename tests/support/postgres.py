"""A throwaway PostgreSQL cluster, for the test suite (tests/conftest.py) and for `make soak SERVERS=2` when no
DATABASE_URL is given: initdb and the server in a fresh temporary folder, reached only through a Unix socket in
that folder (no TCP port, so nothing to collide with), stopped and removed at the end. Each user gets a database
of its own (CREATE DATABASE takes milliseconds).

The server refuses to run as root, and CI runs as root: as root, initdb and the server run as the unprivileged
`nobody` (else `postgres`; Python's subprocess switches the user: no sudo, no login shell). The server is the
calling process's own child, not pg_ctl's daemon, and is told to stop if that process dies without stopping it.
pytest-postgresql was considered, but it runs pg_ctl as the calling user with no way to choose another one,
so it cannot start a server as root.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Where the binaries are when PG_BINDIR does not name their folder: Debian's and Ubuntu's packages, then PATH.
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
NO_BINARIES = (
    "PostgreSQL's server binaries (initdb, postgres) are not installed, or not in PG_BINDIR: `make test` installs "
    "Debian's postgresql package; PG_BINDIR names another folder of them"
)
# The account the server runs as when the tests run as root: the first that exists.
UNPRIVILEGED_USERS = ("nobody", "postgres")
# A throwaway cluster only: durability traded for speed; no TCP, only the socket in its own folder.
SERVER_SETTINGS = {
    "listen_addresses": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


def find_bindir() -> Path | None:
    """The folder of initdb and postgres: PG_BINDIR when set (and then only it), else the newest Debian-packaged
    version, else PATH's."""
    if os.environ.get("PG_BINDIR"):
        candidates = [os.environ["PG_BINDIR"]]
    else:
        versions = glob.glob(DEBIAN_BINDIRS)
        candidates = sorted(versions, key=lambda p: int(v) if (v := Path(p).parent.name).isdigit() else -1)[::-1]
        candidates.append(str(Path(shutil.which("initdb") or "/nonexistent").parent))
    for folder in candidates:
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return Path(folder)
    return None


class PostgresCluster:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        # The socket's path must fit in 107 bytes: under /tmp when TMPDIR is a long path.
        self.folder = Path(tempfile.mkdtemp(prefix="vps-pg-", dir=None if len(tempfile.gettempdir()) < 60 else "/tmp"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.server: subprocess.Popen | None = None
        self._names = itertools.count(1)
        self._as = {}
        if os.geteuid() == 0:
            account = next(filter(None, map(_account, UNPRIVILEGED_USERS)), None)
            if account is None:
                raise RuntimeError(f"PostgreSQL does not run as root, and none of {UNPRIVILEGED_USERS} exists")
            os.chown(self.folder, account.pw_uid, account.pw_gid)
            self._as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def start(self, timeout: float = 60) -> None:
        initdb = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync"]  # fmt: skip
        done = subprocess.run(initdb, cwd=self.folder, capture_output=True, text=True, timeout=120, **self._as)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(initdb)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        self.resume(timeout)

    def resume(self, timeout: float = 60) -> None:
        """Run the server on the cluster's data (again, after pause()) until it accepts connections. Call it from a
        thread that outlives the server (the main one): the kernel stops the server when the thread that started it
        ends (PR_SET_PDEATHSIG, see _stop_with_parent, is per thread)."""
        settings = [f"--{name}={value}" for name, value in SERVER_SETTINGS.items()]
        command = [str(self.bindir / "postgres"), "-D", str(self.data), "-k", str(self.folder), *settings]
        with open(self.log, "ab") as log:
            self.server = subprocess.Popen(command, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                           preexec_fn=_stop_with_parent, **self._as)  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self._accepts_connections():
            if self.server.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the throwaway PostgreSQL server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def _accepts_connections(self) -> bool:
        import psycopg

        try:
            psycopg.connect(host=str(self.folder), user="postgres", dbname="postgres", connect_timeout=5).close()
        except psycopg.OperationalError:
            return False
        return True

    def pause(self) -> None:
        """Stop the server, as an outage would ("fast" shutdown: the sessions still open are ended), keeping the
        data: resume() starts it again."""
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGINT)
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()

    def stop(self) -> None:
        try:
            self.pause()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of one of the cluster's databases, through its socket."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.folder}"

    def _admin(self, *statements: str, parameters: tuple = ()) -> None:
        import psycopg

        with psycopg.connect(host=str(self.folder), user="postgres", dbname="postgres", autocommit=True) as admin:
            for statement in statements:
                admin.execute(statement, parameters if "%s" in statement else None)

    def create_database(self, template: str = "template1", prefix: str = "test") -> str:
        """A new database (a copy of `template`), by name. A template must have no other sessions: any left
        (pools of stores a test has finished with) are closed first."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self._admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            f'CREATE DATABASE "{name}" TEMPLATE "{template}"',
            parameters=(template,),
        )
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _account(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """Run in the server's process between fork and exec, after the switch of user (which would clear it): when
    the process that started it dies, the kernel sends the server SIGQUIT, its immediate shutdown."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGQUIT)
