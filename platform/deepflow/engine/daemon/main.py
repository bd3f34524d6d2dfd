"""``deepflow serve MODEL_DIR`` / ``python -m deepflow.engine.daemon MODEL_DIR``: load the
engine, serve it with uvicorn, say it is ready, and drain on SIGTERM.

Ready: once the engine is loaded and the socket listens, the daemon prints a line for
people and, given ``--ready-fd N`` (a pipe its launcher passed down), writes one JSON line,
a ``ReadyReport`` (url, host, port, pid, model), to that descriptor and closes it. That
pipe is how a launcher learns the address and readiness: nothing parses the printed line.
A daemon that dies first closes the pipe by dying, so its launcher hears end-of-file at
once. A launcher that is gone first (the write fails) leaves nobody who knows the address:
the daemon then exits 1 rather than serve unseen.

Draining: SIGTERM (or ``POST /drain``) stops admission (new requests get 503 ``draining``),
lets open requests finish for up to ``--drain-timeout`` seconds, aborts the rest and exits 0.
The listening socket stays open meanwhile, so late clients hear 503 rather than a refused
connection. SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepflow.engine.daemon.options import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_HOST,
    DEFAULT_MAX_WAITING,
    DEFAULT_PORT,
    engine_options,
    parse_args,
)

if TYPE_CHECKING:
    from deepflow.engine.daemon.engine_server import EngineServer

KEEP_ALIVE_S = 65
"""Seconds an idle client connection stays open. A pooling client (the gateway) must drop idle
connections sooner, or a request it sends can meet the close (uvicorn's default is 5 s, the
same as httpx's pool expiry: a race)."""


@dataclass(frozen=True, slots=True)
class ReadyReport:
    """What a daemon tells its launcher through ``--ready-fd``, as one line of JSON."""

    url: str
    host: str
    port: int
    """The port it listens on: the one the system picked for ``--port 0``."""
    pid: int
    model: str
    """The model id clients ask for."""

    def to_line(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> ReadyReport:
        """Raises ValueError on anything but one JSON object with every field (extra keys,
        from a newer daemon, are ignored)."""
        try:
            data = json.loads(line)
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not a ready report ({exc!r}): {line[:200]!r}") from None


def run_from_args(args: argparse.Namespace) -> int:
    """Serve what ``options.parse_args`` read."""
    names = args.served_model_name or [None]
    return run_daemon(
        args.model,
        host=args.host,
        port=args.port,
        served_model_name=names[0],
        aliases=names[1:],
        api_keys=args.api_key or (),
        max_waiting=args.max_waiting,
        drain_timeout_s=args.drain_timeout,
        log_level=args.log_level,
        ready_fd=args.ready_fd,
        **engine_options(args),
    )


def run_daemon(
    model_dir: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    served_model_name: str | None = None,
    aliases: Sequence[str] = (),
    api_keys: Sequence[str] = (),
    max_waiting: int = DEFAULT_MAX_WAITING,
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    log_level: str = "warning",
    ready_fd: int | None = None,
    **engine_kwargs: Any,
) -> int:
    """Serve until drained (exit status 0) or interrupted. ``engine_kwargs``: EngineConfig
    fields. ``aliases``: further model ids clients may ask for. ``api_keys``: any one of them
    opens the /v1 routes and /drain (none: all open). ``ready_fd``: where to write the
    ``ReadyReport`` (see the module's docstring)."""
    if ready_fd is not None:
        _keep_to_self(ready_fd)
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    if max_waiting < 1:
        raise ValueError("--max-waiting must be at least 1")

    import uvicorn

    from deepflow.engine.async_engine import AsyncLLMEngine
    from deepflow.engine.daemon.app import build_app

    name = served_model_name or folder.resolve().name
    engine = AsyncLLMEngine.from_model(str(folder), **engine_kwargs)
    try:
        app = build_app(engine, name, max_waiting=max_waiting, aliases=aliases, api_keys=api_keys)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
        flowserve = app.state.flowserve
        server = _make_server(config, flowserve)
        asyncio.run(_serve(server, flowserve, host, name, drain_timeout_s, ready_fd))
    finally:
        engine.shutdown()
    return 0


def _make_server(config: Any, flowserve: EngineServer) -> Any:
    """uvicorn's Server with our signals: SIGTERM drains, SIGINT stops (twice: at once)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, flowserve.begin_drain)
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
            try:
                yield
            finally:
                loop.remove_signal_handler(signal.SIGTERM)
                loop.remove_signal_handler(signal.SIGINT)

        def _interrupt(self) -> None:
            self.force_exit = self.should_exit
            self.should_exit = True

    return Server(config)


def _keep_to_self(fd: int) -> None:
    """Programs this daemon starts must not hold the ready pipe open: its launcher counts on
    end-of-file when the daemon dies. (Close-on-exec; the TP workers are spawned, not forked.)"""
    try:
        os.set_inheritable(fd, False)
    except OSError:
        raise ValueError(f"--ready-fd {fd} is not an open file descriptor") from None


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _report_ready(fd: int, report: ReadyReport) -> None:
    try:
        os.write(fd, report.to_line())  # one write under PIPE_BUF: the reader sees it whole
    finally:
        os.close(fd)


async def _serve(
    server: Any,
    flowserve: EngineServer,
    host: str,
    name: str,
    drain_timeout_s: float,
    ready_fd: int | None = None,
) -> None:
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving
            return
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    report = ReadyReport(url=_url(host, port), host=host, port=port, pid=os.getpid(), model=name)
    print(f"FlowServe ready on {report.url} model={name}", flush=True)
    if ready_fd is not None:
        try:
            _report_ready(ready_fd, report)
        except BrokenPipeError:
            server.should_exit = True
            await serving
            raise RuntimeError(
                "the launcher closed --ready-fd before the daemon was ready; "
                "nobody knows this daemon's address"
            ) from None
    drain = asyncio.create_task(flowserve.wait_drain_requested())
    await asyncio.wait({serving, drain}, return_when=asyncio.FIRST_COMPLETED)
    if drain.done():
        await flowserve.drain(drain_timeout_s)
        server.should_exit = True
    else:
        drain.cancel()
    await serving


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, prog="python -m deepflow.engine.daemon")
    try:
        return run_from_args(args)
    except Exception as exc:  # one line for people, as the deepflow CLI does
        message = " ".join((str(exc) or type(exc).__name__).split())
        print(f"flowserve: error: {message}", file=sys.stderr)
        return 1
