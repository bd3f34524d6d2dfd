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

if TYPE_CHECKING:
    from deepflow.engine.daemon.engine_server import EngineServer

DEFAULT_PORT = 8100
DEFAULT_DRAIN_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 65
"""Seconds an idle client connection stays open. A pooling client (the gateway) must drop idle
connections sooner, or a request it sends can meet the close (uvicorn's default is 5 s, the
same as httpx's pool expiry: a race)."""
_ENGINE_OPTIONS = ("max_num_seqs", "num_kv_blocks", "dtype", "device", "max_model_len")


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `deepflow serve` (also `python -m deepflow.engine.daemon`)."""
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"default {DEFAULT_PORT}; 0 picks a free port (the ready line and report say)",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients ask for (default: the folder's name)",
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=None, help="most sequences in one engine step"
    )
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=1024,
        help="requests queued without a first token above which new ones get 429",
    )
    parser.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="exact KV-cache size in blocks (default: from memory)",
    )
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, npu ... (default: best)")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help="seconds open requests get to finish after SIGTERM or /drain",
    )
    parser.add_argument(
        "--ready-fd",
        type=int,
        default=None,
        metavar="N",
        help="an inherited pipe: once serving, write one JSON line (url, host, port, pid, "
        "model) to it and close it; for launchers",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )


def run_from_args(args: argparse.Namespace) -> int:
    engine_kwargs = {k: getattr(args, k) for k in _ENGINE_OPTIONS if getattr(args, k) is not None}
    return run_daemon(
        args.model_dir,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        max_waiting=args.max_waiting,
        drain_timeout_s=args.drain_timeout,
        log_level=args.log_level,
        ready_fd=args.ready_fd,
        **engine_kwargs,
    )


def run_daemon(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    served_model_name: str | None = None,
    max_waiting: int = 1024,
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    log_level: str = "warning",
    ready_fd: int | None = None,
    **engine_kwargs: Any,
) -> int:
    """Serve until drained (exit status 0) or interrupted. ``engine_kwargs``: EngineConfig
    fields. ``ready_fd``: where to write the ``ReadyReport`` (see the module's docstring)."""
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
        app = build_app(engine, name, max_waiting=max_waiting)
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
    parser = argparse.ArgumentParser(
        prog="python -m deepflow.engine.daemon",
        description="FlowServe: one model behind OpenAI's API",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except Exception as exc:  # one line for people, as the deepflow CLI does
        message = " ".join((str(exc) or type(exc).__name__).split())
        print(f"flowserve: error: {message}", file=sys.stderr)
        return 1
