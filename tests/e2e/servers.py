"""Throwaway Redis and RabbitMQ servers, started for one test (or a session), always removed.

Fault tests restart these instead of the shared servers (Redis on 6379, RabbitMQ on
5672), which other tests keep using and which are never touched here:

- ``throwaway_redis``: a ``redis-server`` child process on a free port with its own data
  folder (AOF with ``appendfsync always`` by default), which a test may ``kill()``,
  ``stop()`` and ``start()`` again on the same port and folder;
- ``throwaway_rabbitmq``: a separate RabbitMQ node (its own node name, AMQP,
  distribution and epmd ports, data, logs, Erlang cookie, an empty plugin list), whose
  ``rabbit`` application a test may ``stop_app()`` and ``start_app()``;
- ``throwaway_rabbitmq_cluster``: three such nodes joined into one cluster (one Erlang
  cookie, one epmd);
- ``session_servers``: the servers every test uses, when nothing answers at the configured
  URLs: a throwaway Redis and RabbitMQ node started for the whole pytest session.

Clean-up runs whatever happens (errors, cancellation, a failed start): shielded from
cancellation and bounded in time, it stops the server, SIGKILLs what is left of it and
deletes its data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import aiormq
import anyio
import pytest
import redis.asyncio as redis
from anyio.abc import Process
from anyio.from_thread import start_blocking_portal

from tests.conftest import eventually

REDIS_READY_SECONDS = 10.0
REDIS_STOP_SECONDS = 10.0
RABBITMQ_READY_SECONDS = 60.0
RABBITMQ_APP_SECONDS = 30.0
RABBITMQ_CTL_SECONDS = 30.0
CLEANUP_SECONDS = 20.0

# The Debian package's /usr/sbin/rabbitmq-* are wrappers that switch to the rabbitmq user
# and write the *shared* node's startup log: run the real scripts instead.
RABBITMQ_BIN = Path(os.environ.get("TASKQ_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """``count`` different free ports (held together while they are chosen)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


async def port_accepts(port: int, *, within: float = 1.0) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with anyio.fail_after(within):
            stream = await anyio.connect_tcp("127.0.0.1", port)
    except (OSError, TimeoutError):
        return False
    await stream.aclose()
    return True


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return f"--- last lines of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


async def _spawn(
    command: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None
) -> Process:
    """Start ``command`` in a session of its own, stdout and stderr appended to ``log``."""
    with log.open("ab") as output:
        return await anyio.open_process(
            list(command),
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def _reap(process: Process, *, within: float) -> None:
    """SIGKILL ``process``'s whole process group and wait (bounded) for it to exit."""
    # Not ``process.kill()``: Popen polls first and may reap the child behind asyncio's
    # child watcher, which then logs "Unknown child process" and reports 255.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # its own session: pgid == pid
    with anyio.move_on_after(within):
        await process.wait()


# --- Redis --------------------------------------------------------------------------------


class RedisServer:
    """A ``redis-server`` child process that a test may stop, kill and start again."""

    def __init__(self, directory: Path, port: int, *, appendonly: bool) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.log = directory / "redis.log"
        self.port = port
        self.appendonly = appendonly
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def command(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.appendonly
            else ["--appendonly", "no"]
        )
        return [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data),
            "--daemonize", "no",
            "--logfile", "",  # stdout, which goes to self.log
            "--save", "",  # no RDB snapshots: the AOF (when on) is the only persistence
            *persistence,
        ]  # fmt: skip

    async def start(self) -> None:
        """Start the server (again: same port, same data) and wait until it answers PING."""
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.data.mkdir(parents=True, exist_ok=True)
        self.process = await _spawn(self.command(), log=self.log)
        await self._wait_for_ping()

    async def _wait_for_ping(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        try:
            with anyio.move_on_after(REDIS_READY_SECONDS):
                while self.running:
                    try:
                        if await client.ping():  # pyright: ignore[reportUnknownMemberType]
                            return
                    except redis.RedisError:  # refused, or LOADING the AOF
                        pass
                    await anyio.sleep(0.05)
        finally:
            await client.aclose()
        state = "exited" if not self.running else f"did not answer PING in {REDIS_READY_SECONDS}s"
        raise RuntimeError(f"redis-server on port {self.port} {state}\n{_tail(self.log)}")

    async def stop(self) -> None:
        """Graceful stop (SIGTERM: Redis flushes the AOF and exits), SIGKILL if it lingers."""
        if not self.running:
            return
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGTERM)  # not reaped yet, so still this process
        with anyio.move_on_after(REDIS_STOP_SECONDS):
            await self.process.wait()
            return
        await _reap(self.process, within=5)

    async def kill(self) -> None:
        """SIGKILL: no chance to write anything more."""
        if self.process is not None:
            await _reap(self.process, within=5)

    async def close(self) -> None:
        """Kill the server and delete its data (shielded, bounded)."""
        with anyio.CancelScope(shield=True):
            if self.process is not None:
                await _reap(self.process, within=5)
            shutil.rmtree(self.directory, ignore_errors=True)


@asynccontextmanager
async def throwaway_redis(
    tmp_path: Path, *, appendonly: bool = True
) -> AsyncGenerator[RedisServer]:
    """A ``redis-server`` of its own on a free port, removed on exit whatever happens."""
    port = free_port()
    server = RedisServer(tmp_path / f"redis-{port}", port, appendonly=appendonly)
    try:
        await server.start()
        yield server
    finally:
        await server.close()


# --- RabbitMQ -----------------------------------------------------------------------------


class RabbitNode:
    """A RabbitMQ node of its own, a child process of the test."""

    def __init__(
        self,
        base: Path,
        *,
        name: str,
        port: int,
        dist_port: int,
        epmd_port: int,
        cookie: str | None = None,
    ) -> None:
        self.base = base
        self.name = name
        self.port = port
        self.dist_port = dist_port
        self.epmd_port = epmd_port
        """Of an epmd of its own, which the node starts and ``close`` stops (nodes of one
        cluster share one: whichever starts it)."""
        self.cookie = cookie
        """The Erlang cookie nodes of one cluster share (``None``: one made up at start)."""
        self.log = base / "server.log"
        self.pid_file = base / f"{name}.pid"
        self.process: Process | None = None
        self.started_in: float | None = None
        """Seconds from starting the node to its first AMQP connection."""
        self.beam: int | None = None
        """The pid of the node's Erlang VM once it is ready."""

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def env(self) -> dict[str, str]:
        """The environment of the node and of ``rabbitmqctl`` talking to it."""
        # Nothing inherited may point at the shared node (its config, env file, cookie).
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update(
            {
                "HOME": str(self.base / "home"),  # the node's own Erlang cookie, for both
                "RABBITMQ_NODENAME": self.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.base / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(self.pid_file),
                "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "ERL_EPMD_PORT": str(self.epmd_port),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                    "-kernel inet_dist_use_interface {127,0,0,1}"
                ),
            }
        )
        return env

    def _prepare(self) -> None:
        for folder in ("home", "mnesia", "log"):
            (self.base / folder).mkdir(parents=True, exist_ok=True)
        if self.cookie is not None:
            cookie_file = self.base / "home" / ".erlang.cookie"
            cookie_file.write_text(self.cookie)
            cookie_file.chmod(0o400)  # Erlang refuses a cookie others may read
        # An empty plugin list: no management listener to clash with the shared node's.
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "log.file.level = info\n"
        )

    async def start(self) -> None:
        """Start the node and wait until it accepts an AMQP connection."""
        if self.running:
            raise RuntimeError(f"RabbitMQ node {self.name} is already running")
        self._prepare()
        began = anyio.current_time()
        self.process = await _spawn(
            [str(RABBITMQ_BIN / "rabbitmq-server")], log=self.log, env=self.env()
        )
        await self._wait_for_amqp(RABBITMQ_READY_SECONDS)
        self.started_in = anyio.current_time() - began
        self.beam = self._beam_pid()

    async def ctl(self, *args: str, within: float = RABBITMQ_CTL_SECONDS) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` (bounded); its output, or an error."""
        command = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args]
        with anyio.fail_after(within):
            result = await anyio.run_process(command, env=self.env(), check=False)
        output = (result.stdout + result.stderr).decode(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} exited {result.returncode}:\n{output}"
            )
        return output

    async def stop_app(self) -> None:
        """Stop the ``rabbit`` application (connections closed, port refused); the VM stays."""
        await self.ctl("stop_app")
        await eventually(self._refuses_connections, within=RABBITMQ_APP_SECONDS, every=0.05)

    async def _refuses_connections(self) -> bool:
        return not await port_accepts(self.port)

    async def start_app(self) -> None:
        """Start the ``rabbit`` application again and wait until AMQP logins work."""
        await self.ctl("start_app")
        await self._wait_for_amqp(RABBITMQ_APP_SECONDS)

    async def _wait_for_amqp(self, within: float) -> None:
        last_error: BaseException | None = None
        with anyio.move_on_after(within):
            while self.running:
                if not await port_accepts(self.port):  # spares aiormq's error log
                    await anyio.sleep(0.1)
                    continue
                try:
                    with anyio.fail_after(5):
                        connection = await aiormq.connect(self.url)
                    with anyio.move_on_after(5, shield=True):
                        await connection.close()
                    return
                except Exception as exc:  # refused, reset, EOF, login refused while booting
                    last_error = exc
                await anyio.sleep(0.1)
        state = "exited" if not self.running else f"refused AMQP logins for {within:g} s"
        raise RuntimeError(
            f"RabbitMQ node {self.name} {state} (last error: {last_error!r})\n{_tail(self.log)}"
        )

    def _beam_pid(self) -> int | None:
        """The node's VM from its pid file, if it is running."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._is_ours(pid) else None

    def _is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is a live process of this node (never another's, or a reused pid)."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return f"RABBITMQ_NODENAME={self.name}".encode() in environ.split(b"\0")

    def _processes(self) -> list[int]:
        """Every live process of this node: its VM, the VM's helpers, its epmd."""
        pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
        return [pid for pid in pids if self._is_ours(pid)]

    async def close(self) -> None:
        """Stop the node, SIGKILL whatever is left of it (its epmd too), delete its data
        (shielded, bounded)."""
        with anyio.CancelScope(shield=True):
            if self.running:
                with anyio.move_on_after(CLEANUP_SECONDS), contextlib.suppress(RuntimeError):
                    await self.ctl("stop", within=CLEANUP_SECONDS)
            leftovers = self._processes()
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if self.process is not None:
                await _reap(self.process, within=5)
            with contextlib.suppress(TimeoutError):
                await eventually(
                    lambda: not any(map(process_alive, leftovers)), within=5, every=0.05
                )
            shutil.rmtree(self.base, ignore_errors=True)


@asynccontextmanager
async def throwaway_rabbitmq(tmp_path: Path) -> AsyncGenerator[RabbitNode]:
    """A RabbitMQ node of its own (name, ports, data), removed on exit whatever happens."""
    port, dist_port, epmd_port = free_ports(3)
    name = f"taskq-{uuid.uuid4().hex[:10]}@localhost"
    node = RabbitNode(
        tmp_path / f"rabbitmq-{port}",
        name=name,
        port=port,
        dist_port=dist_port,
        epmd_port=epmd_port,
    )
    try:
        await node.start()
        print(f"RabbitMQ node {name} on port {port} ready in {node.started_in:.1f} s")
        yield node
    finally:
        await node.close()


@asynccontextmanager
async def throwaway_rabbitmq_cluster(
    tmp_path: Path, *, size: int = 3
) -> AsyncGenerator[list[RabbitNode]]:
    """``size`` RabbitMQ nodes of their own joined into one cluster (the first node's),
    removed on exit whatever happens."""
    cookie = uuid.uuid4().hex.upper()
    epmd_port = free_port()
    nodes: list[RabbitNode] = []
    for number in range(size):
        port, dist_port = free_ports(2)
        nodes.append(
            RabbitNode(
                tmp_path / f"rabbitmq-cluster-{number}-{port}",
                name=f"taskq-{uuid.uuid4().hex[:10]}-{number}@localhost",
                port=port,
                dist_port=dist_port,
                epmd_port=epmd_port,
                cookie=cookie,
            )
        )
    try:
        began = anyio.current_time()
        async with anyio.create_task_group() as group:
            for node in nodes:
                group.start_soon(node.start)
        first, *others = nodes
        for node in others:
            await node.ctl("stop_app")
            await node.ctl("join_cluster", first.name)
        async with anyio.create_task_group() as group:
            for node in others:
                group.start_soon(node.start_app)
        status = json.loads(await first.ctl("--quiet", "cluster_status", "--formatter", "json"))
        if sorted(status["running_nodes"]) != sorted(node.name for node in nodes):
            raise RuntimeError(f"the cluster did not form: {status}")
        ports = ", ".join(str(node.port) for node in nodes)
        took = anyio.current_time() - began
        print(f"RabbitMQ cluster of {size} (ports {ports}) ready in {took:.1f} s")
        yield nodes
    finally:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as group:
                for node in nodes:
                    group.start_soon(node.close)


# --- The servers of a test session -------------------------------------------------------

PROBE_SECONDS = 0.2
"""How long a configured server may take to accept a connection before it counts as absent."""
DEFAULT_PORTS = {"redis": 6379, "rediss": 6380, "amqp": 5672, "amqps": 5671}
INSTALL_HINT = (
    "install them (`apt-get install redis-server rabbitmq-server`) so that the tests start"
    " throwaway servers, or start the servers (`docker compose up -d`), or point"
    " TASKQ_TEST_REDIS_URL / TASKQ_TEST_AMQP_URL at running ones"
)


class SessionServers(NamedTuple):
    """Where a test session finds Redis and RabbitMQ."""

    redis_url: str
    amqp_url: str
    rabbitmq_node: RabbitNode | None = None
    """The session's throwaway RabbitMQ node, if it started one (``rabbitmqctl`` must name it)."""


def answers(url: str, *, within: float = PROBE_SECONDS) -> bool:
    """Whether something accepts TCP connections at ``url``'s host and port."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.scheme not in DEFAULT_PORTS:
        return True  # a socket path or another scheme: the tests will say what they find
    address = (parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme])
    try:
        with socket.create_connection(address, timeout=within):
            return True
    except OSError:
        return False


def missing_programs(*, redis_server: bool, rabbitmq: bool) -> list[str]:
    """What starting the servers asked for needs and cannot find."""
    rabbitmq_server = RABBITMQ_BIN / "rabbitmq-server"
    missing = {
        "redis-server": redis_server and shutil.which("redis-server") is None,
        f"{rabbitmq_server} (or set TASKQ_TEST_RABBITMQ_BIN)": (
            rabbitmq and not os.access(rabbitmq_server, os.X_OK)
        ),
        "erl (Erlang, which runs RabbitMQ)": rabbitmq and shutil.which("erl") is None,
    }
    return [program for program, absent in missing.items() if absent]


@asynccontextmanager
async def throwaway_servers(
    base: Path, *, redis_server: bool, rabbitmq: bool
) -> AsyncGenerator[tuple[RedisServer | None, RabbitNode | None]]:
    """The throwaway servers asked for, started concurrently, removed on exit."""
    async with AsyncExitStack() as stack:
        redis_started: list[RedisServer] = []
        rabbitmq_started: list[RabbitNode] = []

        async def start_redis() -> None:
            server = throwaway_redis(base, appendonly=False)  # the shared one has no AOF either
            redis_started.append(await stack.enter_async_context(server))

        async def start_rabbitmq() -> None:
            rabbitmq_started.append(await stack.enter_async_context(throwaway_rabbitmq(base)))

        async with anyio.create_task_group() as group:
            if redis_server:
                group.start_soon(start_redis)
            if rabbitmq:
                group.start_soon(start_rabbitmq)
        yield next(iter(redis_started), None), next(iter(rabbitmq_started), None)


def session_servers(config: pytest.Config, redis_url: str, amqp_url: str) -> SessionServers:
    """The servers a test session uses: those at the URLs given where they answer; otherwise
    throwaway ones, started now and removed when pytest ends.

    Without the programs to start one, pytest stops at once with one line saying what to
    install or start.
    """
    need_redis, need_rabbitmq = not answers(redis_url), not answers(amqp_url)
    if not (need_redis or need_rabbitmq):
        return SessionServers(redis_url, amqp_url)
    absent = [url for url, need in ((redis_url, need_redis), (amqp_url, need_rabbitmq)) if need]
    nothing_at = f"nothing answers at {' nor '.join(absent)}"
    missing = missing_programs(redis_server=need_redis, rabbitmq=need_rabbitmq)
    if missing:
        pytest.exit(
            f"{nothing_at}, and {', '.join(missing)} cannot be found: {INSTALL_HINT}",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
    with ExitStack() as stack:
        base = Path(tempfile.mkdtemp(prefix="taskq-test-servers-"))
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        portal = stack.enter_context(start_blocking_portal())
        servers = throwaway_servers(base, redis_server=need_redis, rabbitmq=need_rabbitmq)
        try:
            redis_server, rabbit_node = stack.enter_context(
                portal.wrap_async_context_manager(servers)
            )
        except Exception as exc:
            errors = exc.exceptions if isinstance(exc, ExceptionGroup) else [exc]
            reasons = "\n".join(str(error) for error in errors)
            pytest.exit(f"{nothing_at}, and starting a throwaway server failed:\n{reasons}")
        config.add_cleanup(stack.pop_all().close)
    return SessionServers(
        redis_url if redis_server is None else redis_server.url,
        amqp_url if rabbit_node is None else rabbit_node.url,
        rabbit_node,
    )
