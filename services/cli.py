"""`fleet`: run LLM Fleet.

fleet up                 embedded NATS + PostgreSQL (unless NATS_URL / DATABASE_URL are
                         set) and the five services; Ctrl-C stops everything
fleet up --demo          the same, with sync and benchmark using `fleet demo`'s servers
fleet up --replicas 3 --nats-cluster 3
                         scaled out: a three-node JetStream cluster (streams on three
                         nodes) and three processes of each service
fleet run <service>      one service in the foreground (what a container runs)
fleet migrate [service]  apply database migrations and exit (a deployment's migration job)
fleet declare            create the streams and every durable consumer and exit (deploy job)
fleet status             the services of a running `fleet up`, their health and URLs
fleet token --user U     a development bearer token for U (--operator: with that role)
fleet nats-config        the NATS server configuration: each service's user and permissions
fleet demo run           demo data and live traffic through the running stack (seed, reset)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from typing import Any, Literal

from services.demo import cli as demo_cli
from services.stack import SERVICES, AlreadyRunning, Stack, fleet_home, read_state, status_table


def service_spec(name: str) -> Any:
    return importlib.import_module(f"services.{name}.app").build()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the stack the way Ctrl-C does


def cmd_up(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    env = {**demo_cli.stack_env(args.demo), **os.environ}  # variables set win
    stack = Stack(fleet_home(), env=env, replicas=args.replicas, nats_cluster=args.nats_cluster)
    print(f"LLM Fleet: starting from {stack.home}")
    code = 0
    try:
        stack.up()
        print(demo_cli.HINT, flush=True)
        stack.wait()
    except AlreadyRunning as exc:
        print(exc, file=sys.stderr)
        return 1  # nothing of ours to stop
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"start failed: {exc}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.down()
    return code


def cmd_run(args: argparse.Namespace) -> int:
    from services.runtime.service import serve

    serve(service_spec(args.service))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from services.runtime.db import RUNTIME_MIGRATIONS, load_migrations, migrate
    from services.runtime.service import login_of

    async def run() -> None:
        for name in args.services or list(SERVICES):
            spec = service_spec(name)
            dirs = [RUNTIME_MIGRATIONS] + ([spec.migrations] if spec.migrations else [])
            login = login_of(name, spec.settings)
            applied = await migrate(
                spec.settings.database_url, name, load_migrations(*dirs), login.user, login.password
            )
            print(f"{name}: {len(applied)} migration(s) applied")

    asyncio.run(run())
    return 0


def cmd_declare(_: argparse.Namespace) -> int:
    """Create the catalog's streams and every service's durable consumers, then exit: a
    deployment's job, so an autoscaler reading a consumer's pending messages never finds it
    missing. NATS_URL, NATS_USER and NATS_PASSWORD say where and as whom (the admin user:
    a service's own user may declare only its own consumers)."""
    from services.runtime.config import RuntimeSettings
    from services.runtime.consumer import declare
    from services.runtime.messaging import connect_nats, ensure_streams

    async def run() -> None:
        settings = RuntimeSettings()
        password = settings.nats_password.get_secret_value() if settings.nats_password else None
        nc = await connect_nats(settings.nats_url, "declare", settings.nats_user, password)
        try:
            js = nc.jetstream()
            await ensure_streams(js)
            for name in SERVICES:
                for consumer in service_spec(name).consumers:
                    await declare(js, consumer, settings.consumer_ack_wait_s)
                    print(f"{name}: {consumer.name}")
        finally:
            await nc.close()

    asyncio.run(run())
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    state = read_state(fleet_home())
    if state is None:
        print(f"LLM Fleet is not running from {fleet_home()} (start it with `make up`)")
        return 1
    urls: dict[str, str] = state["services"]  # type: ignore[assignment]
    print(status_table(urls, str(state["nats_url"]), str(state["database_url"])))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from services.benchmark.cli import main as bench_main

    return bench_main(args.args)


def cmd_nats_config(args: argparse.Namespace) -> int:
    """The NATS server configuration of the fleet's users (services, agent, ui, admin) with
    their permissions; passwords from FLEET_HOME/secrets/nats-users.json (made when missing),
    or with --from-env references to the server's environment (<USER>_NATS_PASSWORD)."""
    from services.runtime import nats_users

    users = nats_users.fleet_users()
    if args.from_env:
        print(nats_users.server_config(users))
        return 0
    secrets = nats_users.passwords(fleet_home(), users)
    print(nats_users.server_config(users, secrets))
    print(f"passwords: {fleet_home() / nats_users.USERS_FILE}", file=sys.stderr)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """A development token, signed with the secret under FLEET_HOME that `fleet up`'s
    services verify with (or AUTH_JWT_SECRET when set, as they would)."""
    from services.runtime.auth import development_secret, mint

    secret = os.environ.get("AUTH_JWT_SECRET") or development_secret()
    role: Literal["user", "operator"] = "operator" if args.operator else "user"
    print(mint(secret, args.user, role, ttl_s=args.hours * 3600))
    return 0


def _count_1_to_9(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 9:
        raise argparse.ArgumentTypeError("a number from 1 to 9")
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the whole system")
    up.add_argument(
        "--replicas", type=_count_1_to_9, default=1, help="processes of each service (default 1)"
    )
    up.add_argument(
        "--nats-cluster",
        type=_count_1_to_9,
        default=1,
        help="embedded nats-server processes; more than 1 form a JetStream cluster whose "
        "streams are stored on up to 3 of them (default 1)",
    )
    up.add_argument(
        "--demo",
        action="store_true",
        help="sync and benchmark use the servers `fleet demo` runs (make up does this)",
    )
    up.set_defaults(func=cmd_up)
    demo_cli.arguments(sub.add_parser("demo", help="demo data and live traffic (fleet demo -h)"))
    run = sub.add_parser("run", help="run one service")
    run.add_argument("service", choices=list(SERVICES))
    run.set_defaults(func=cmd_run)
    mig = sub.add_parser("migrate", help="apply migrations and exit")
    mig.add_argument("services", nargs="*", choices=[[], *SERVICES], metavar="service")
    mig.set_defaults(func=cmd_migrate)
    sub.add_parser(
        "declare", help="create the streams and every durable consumer and exit"
    ).set_defaults(func=cmd_declare)
    sub.add_parser("status", help="health and URLs of a running stack").set_defaults(
        func=cmd_status
    )
    token = sub.add_parser(
        "token",
        help='print a development bearer token (curl -H "Authorization: Bearer $(fleet token'
        ' --user alice)" ...)',
    )
    token.add_argument("--user", required=True, help="the user id (the token's sub)")
    token.add_argument("--operator", action="store_true", help="with the operator role")
    token.add_argument("--hours", type=float, default=12.0, help="valid for (default 12)")
    token.set_defaults(func=cmd_token)
    nats_config = sub.add_parser(
        "nats-config", help="print the NATS server configuration of the fleet's users"
    )
    nats_config.add_argument(
        "--from-env",
        action="store_true",
        help="passwords as references to the server's environment (deploy/nats/users.conf)",
    )
    nats_config.set_defaults(func=cmd_nats_config)
    bench = sub.add_parser(
        "bench",
        help="submit a benchmark and show its results (fleet bench run --help)",
        add_help=False,
    )
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
