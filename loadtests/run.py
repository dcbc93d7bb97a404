"""``make loadtest``: run a Locust scenario headless against tapsign and write a report.

Starts a server (SQLite and SoftHSM2 in a scratch directory, like ``make run``; with
``--database-url`` on PostgreSQL instead, in a scratch schema dropped afterwards) unless
``--url`` names one, runs Locust for a bounded time against it, samples the server's CPU
and resident memory every second, and writes into ``loadtests/reports/<timestamp>/``:
Locust's CSVs and HTML report, ``timings.csv`` (every transaction, exact),
``server.csv`` (the server's CPU seconds and resident bytes, every second), ``chart.png``
(transactions/s, p50/p95/p99 and the server's memory over time) and ``summary.json``.
Prints one summary line. See loadtests/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from loadtests import postgres
from loadtests.scrape import samples as samples_of

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> int:
    options = _options(argv)
    report = ROOT / "loadtests" / "reports" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report.mkdir(parents=True)
    urls: list[str] = []  # the other hosts, if several
    with contextlib.ExitStack() as stack:
        if options.url:
            url, access_key, pid = options.url.rstrip("/"), options.access_key, []
            database = None
            if not access_key:
                print("--url needs --access-key (or TAPSIGN_LOADTEST_ACCESS_KEY)", file=sys.stderr)
                return 2
        else:
            if options.hosts > 1 and options.database_url is None:
                print("several --hosts share PostgreSQL: give --database-url", file=sys.stderr)
                return 2
            database = stack.enter_context(scratch_schema(options.database_url))
            server, url, access_key = start_server(
                report / "server",
                options.server_workers,
                database_url=database,
                shared=options.hosts > 1,
            )
            stack.callback(_stop, server)
            pid = [server.pid]
            for number in range(1, options.hosts):
                other, other_url = start_host(
                    report / f"server-{number}",
                    options.server_workers,
                    database_url=database,
                    first=report / "server",
                )
                stack.callback(_stop, other)
                pid.append(other.pid)
                urls.append(other_url)
        # PostgreSQL's statistics are read outside the scratch schema, whose search path
        # hides pg_stat_statements' functions.
        measure = options.database_url if database is not None else None
        summary = _run(options, report, url, access_key, pid, urls, measure)
    (report / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{summary['scenario']}: {summary['transactions_per_second']:.0f} tx/s "
        f"(p50 {summary['latency_ms']['p50']:.0f} ms, p95 {summary['latency_ms']['p95']:.0f} ms, "
        f"p99 {summary['latency_ms']['p99']:.0f} ms), {summary['http_requests_per_second']:.0f} "
        f"HTTP req/s, {summary['failed_transactions']} failed transactions, "
        f"{summary['shed_transactions']} shed (503), "
        f"{summary['http_errors']} HTTP errors, "
        f"server CPU {summary['server']['cpu_cores_mean']:.2f} cores "
        f"(Locust {summary['locust_cpu_cores_mean']:.2f}), "
        f"RSS {summary['server']['rss_mib_max']:.0f} MiB -> {report.relative_to(ROOT)}"
    )
    each = summary.get("postgresql_per_transaction")
    if each:
        print(
            f"PostgreSQL per transaction ({summary['hosts']} hosts): "
            f"{each.get('statements', 'n/a')} statements, {each['commits']} commits, "
            f"{each['wal_bytes']:.0f} WAL bytes, {each['wal_flushes']} WAL flushes, "
            f"{each['cpu_ms']} ms CPU"
        )
    return 0 if summary["failed_transactions"] == 0 and summary["http_errors"] == 0 else 1


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)


@contextlib.contextmanager
def scratch_schema(database_url: str | None) -> Iterator[str | None]:
    """A PostgreSQL URL whose tables go to a new schema, dropped on the way out (the
    load test starts empty and leaves nothing behind); None (SQLite) stays None."""
    if database_url is None:
        yield None
        return
    schema = f"loadtest_{datetime.now(UTC):%Y%m%d%H%M%S}_{os.getpid()}"
    admin = sa.create_engine(database_url)
    with admin.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = sa.make_url(database_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario",
        default="mixed",
        choices=["mixed", "enrolment", "login", "payment", "consent", "decline"],
    )
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--spawn-rate", type=float, default=16)
    parser.add_argument("--duration", default="60s", help="Locust --run-time, e.g. 60s, 10m")
    parser.add_argument("--url", help="an existing server; none: start one")
    parser.add_argument("--access-key", default=os.environ.get("TAPSIGN_LOADTEST_ACCESS_KEY"))
    parser.add_argument(
        "--server-workers",
        type=int,
        default=0,
        help="workers of the started server (0, the server's default: one per core)",
    )
    parser.add_argument("--locust-processes", type=int, default=1, help="Locust worker processes")
    parser.add_argument(
        "--hosts",
        type=int,
        default=1,
        help="tapsign serve process groups on one PostgreSQL database, each in a directory "
        "of its own (sharing the first one's SoftHSM2 token); phones talk to another host "
        "than their relying party",
    )
    parser.add_argument(
        "--database-url",
        help="the started server's database, e.g. postgresql+psycopg://root@127.0.0.1/test "
        "(a scratch schema in it); none: SQLite in the scratch directory",
    )
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_server(
    directory: Path, workers: int, *, database_url: str | None = None, shared: bool = False
) -> tuple[subprocess.Popen[bytes], str, str]:
    """A server in ``directory`` with a new token and access key (``shared``: the first of
    several hosts)."""
    directory.mkdir()
    tapsign = str(BIN / "tapsign")
    environment = _server_environment(database_url, shared=shared)
    subprocess.run(  # noqa: S603 - our own scripts
        [str(ROOT / "softhsm-config" / "init-token.sh"), "var", tapsign],
        cwd=directory,
        env=environment,
        check=True,
        capture_output=True,
    )
    created = subprocess.run(  # noqa: S603
        [tapsign, "keys", "create", "--name", "loadtest", "--json"],
        cwd=directory,
        env=environment,
        check=True,
        capture_output=True,
        text=True,
    )
    access_key = json.loads(created.stdout)["accessKey"]
    port = free_port()
    command = [tapsign, "serve", "--port", str(port), "--workers", str(workers)]
    return launch(command, directory, environment, port), f"http://127.0.0.1:{port}", access_key


def shared_token(first: Path) -> str:
    """The ``[hsm]`` section of a host that uses the SoftHSM2 token set up in the directory
    ``first`` (as hosts share a network HSM)."""
    token = first / "var" / "softhsm"
    return (
        f'[hsm]\npin_file = "{token / "user.pin"}"\nsofthsm2_conf = "{token / "softhsm2.conf"}"\n'
    )


def start_host(
    directory: Path, workers: int, *, database_url: str | None, first: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """Another host of the first one's database, with its SoftHSM2 token and a directory
    of its own."""
    directory.mkdir()
    (directory / "tapsign.toml").write_text(shared_token(first))
    environment = _server_environment(database_url, shared=True)
    port = free_port()
    command = [str(BIN / "tapsign"), "serve", "--port", str(port), "--workers", str(workers)]
    return launch(command, directory, environment, port), f"http://127.0.0.1:{port}"


#: The one public URL of several hosts, as behind a load balancer: the issuer of the tokens
#: one host signs and another checks.
SHARED_PUBLIC_URL = "http://tapsign.loadtest"


def _server_environment(database_url: str | None, *, shared: bool) -> dict[str, str]:
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("TAPSIGN_", "SOFTHSM2_"))
    }
    if shared:
        environment["TAPSIGN_SERVER_PUBLIC_URL"] = SHARED_PUBLIC_URL
    # Every simulated phone comes from 127.0.0.1 and runs transactions back to back: the
    # device API's rate limits, meant for real phones, are off for the servers started here.
    environment["TAPSIGN_RATELIMIT_ADDRESS_PER_SECOND"] = "0"
    environment["TAPSIGN_RATELIMIT_DEVICE_PER_SECOND"] = "0"
    if database_url is not None:
        environment["TAPSIGN_DATABASE_URL"] = database_url
    return environment


def launch(
    command: list[str], directory: Path, environment: dict[str, str], port: int
) -> subprocess.Popen[bytes]:
    """Run the server ``command`` in ``directory``, its output appended to ``server.log``
    there, and return once ``/readyz`` on ``port`` says ready (the load tests and the
    end-to-end tests start their servers with it)."""
    with (directory / "server.log").open("ab") as log:  # the server keeps its own copy
        server = subprocess.Popen(  # noqa: S603 - our own executable
            command, cwd=directory, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/readyz"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            log_text = (directory / "server.log").read_text()
            raise RuntimeError(f"the server did not start:\n{log_text}")
        time.sleep(0.05)


def _process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def sample(pid: int) -> tuple[float, int]:
    """CPU seconds used so far and resident bytes, over ``pid`` and its descendants."""
    cpu, rss = 0.0, 0
    for member in _process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / TICKS
        rss += int(fields[21]) * PAGE
    return cpu, rss


def _run(
    options: argparse.Namespace,
    report: Path,
    url: str,
    access_key: str,
    pids: list[int],
    hosts: list[str],
    database_url: str | None,
) -> dict[str, Any]:
    environment = {
        **os.environ,
        "TAPSIGN_LOADTEST_ACCESS_KEY": access_key,
        "TAPSIGN_LOADTEST_SCENARIO": options.scenario,
        "TAPSIGN_LOADTEST_TIMINGS": str(report / "timings"),
        "TAPSIGN_LOADTEST_HOSTS": ",".join([url, *hosts]) if hosts else "",
    }
    command = [
        str(BIN / "locust"),
        "-f",
        str(ROOT / "loadtests" / "locustfile.py"),
        "--headless",
        "-u",
        str(options.users),
        "-r",
        str(options.spawn_rate),
        "--run-time",
        options.duration,
        "--host",
        url,
        "--csv",
        str(report / "locust"),
        "--html",
        str(report / "locust.html"),
        "--reset-stats",
        "--only-summary",
        "--stop-timeout",
        "15",
    ]
    if options.locust_processes > 1:
        command += ["--processes", str(options.locust_processes)]
    samples: list[tuple[float, float, int]] = []
    locust_cpu: list[tuple[float, float]] = []
    # Straight into a file: a pipe read only at the end fills up and stalls Locust.
    database = (
        postgres.measured(database_url, lambda pid: sample(pid)[0])
        if database_url
        else contextlib.nullcontext(None)
    )
    with (report / "locust.log").open("wb") as log, database as postgresql:
        locust = subprocess.Popen(  # noqa: S603 - our own command line
            command, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
        while locust.poll() is None:
            if pids:
                cpu, rss = zip(*(sample(pid) for pid in pids), strict=True)
                samples.append((time.time(), sum(cpu), sum(rss)))
            locust_cpu.append((time.time(), sample(locust.pid)[0]))
            time.sleep(1)
    timings = _merge_timings(report)
    if samples:
        with (report / "server.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["time", "cpu_seconds", "rss_bytes"])
            writer.writerows(samples)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text if _alive(url) else ""
    summary = _summary(options, report, timings, samples, metrics)
    summary["locust_cpu_cores_mean"] = _mean_rate(locust_cpu)
    summary["hosts"] = 1 + len(hosts)
    if postgresql is not None:
        summary["postgresql"] = postgresql
        summary["postgresql_per_transaction"] = postgres.per_transaction(
            postgresql, summary["transactions"]
        )
    return summary


def _alive(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


Timing = tuple[float, float, str, str]


def _merge_timings(report: Path) -> list[Timing]:
    """Every transaction: (started, seconds, scenario, outcome ``ok``/``failed``/``shed``)."""
    rows = []
    for part in sorted(report.glob("timings.*")):
        for started, seconds, name, outcome in csv.reader(part.read_text().splitlines()):
            rows.append((float(started), float(seconds), name, outcome))
        part.unlink()
    rows.sort()
    with (report / "timings.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["started", "seconds", "scenario", "outcome"])
        writer.writerows(rows)
    return rows


def _mean_rate(samples: list[tuple[float, float]]) -> float:
    """Mean of d(value)/d(time) over the samples: CPU seconds per second, i.e. cores."""
    rates = [
        (later[1] - earlier[1]) / (later[0] - earlier[0])
        for earlier, later in itertools.pairwise(samples)
        if later[0] > earlier[0]
    ]
    return sum(rates) / len(rates) if rates else 0.0


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def _summary(
    options: argparse.Namespace,
    report: Path,
    timings: list[Timing],
    samples: list[tuple[float, float, int]],
    metrics: str,
) -> dict[str, Any]:
    ok = [seconds * 1000 for _, seconds, _, outcome in timings if outcome == "ok"]
    failed = sum(1 for *_, outcome in timings if outcome == "failed")
    shed = sum(1 for *_, outcome in timings if outcome == "shed")
    window = (
        (max(s + d for s, d, _, _ in timings) - min(s for s, *_ in timings)) if timings else 1.0
    )
    http_requests, http_errors = 0, 0
    stats = report / "locust_stats.csv"
    if stats.exists():
        for row in csv.DictReader(stats.read_text().splitlines()):
            if row["Type"] not in ("SCA", "SHED", "") and row["Name"] != "Aggregated":
                http_requests += int(row["Request Count"])
                http_errors += int(row["Failure Count"])
    scraped = samples_of(metrics) if metrics else {}
    verifier = {
        name.removeprefix("tapsign_verifier_"): value
        for name, value in scraped.items()
        if name.startswith("tapsign_verifier_") and "batch_size_bucket" not in name
    }
    if verifier.get("batch_size_count"):
        verifier["mean_batch"] = verifier["batch_size_sum"] / verifier["batch_size_count"]
    _chart(report, timings, samples)
    by_scenario: dict[str, int] = {}
    for _, _, name, outcome in timings:
        by_scenario[name] = by_scenario.get(name, 0) + int(outcome == "ok")
    rss = [sample[2] / 2**20 for sample in samples]
    minute = max(1, min(60, len(rss) // 4))
    return {
        "scenario": options.scenario,
        "users": options.users,
        "duration": options.duration,
        "machine_cores": os.cpu_count(),
        # The started server's processes; None for a server given by --url.
        "server_workers": None if options.url else options.server_workers or os.cpu_count(),
        "database": "given by --url"
        if options.url
        else "postgresql"
        if options.database_url
        else "sqlite",
        "transactions": len(ok),
        "transactions_by_scenario": by_scenario,
        "failed_transactions": failed,
        "shed_transactions": shed,
        "shed_per_second": shed / window,
        "transactions_per_second": len(ok) / window,
        "latency_ms": {
            "p50": _percentile(ok, 0.50),
            "p95": _percentile(ok, 0.95),
            "p99": _percentile(ok, 0.99),
            "max": max(ok, default=0.0),
        },
        "http_requests": http_requests,
        "http_requests_per_second": http_requests / window,
        "http_errors": http_errors,
        "server": {
            "cpu_cores_mean": _mean_rate([(at, cpu) for at, cpu, _ in samples]),
            "rss_mib_max": max(rss, default=0.0),
            "rss_mib_last": rss[-1] if rss else 0.0,
            # Flat memory: the first and the last minute (or quarter) of the run.
            "rss_mib_mean_first_minute": sum(rss[:minute]) / minute if rss else 0.0,
            "rss_mib_mean_last_minute": sum(rss[-minute:]) / minute if rss else 0.0,
        },
        "verifier": verifier,
    }


def _chart(report: Path, timings: list[Timing], samples: list[tuple[float, float, int]]) -> None:
    if not timings:
        return
    import matplotlib  # only the report needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot

    start = timings[0][0]
    buckets: dict[int, list[float]] = {}
    shed: dict[int, int] = {}
    for started, seconds, _, outcome in timings:
        second = int(started + seconds - start)
        if outcome == "ok":
            buckets.setdefault(second, []).append(seconds * 1000)
        elif outcome == "shed":
            shed[second] = shed.get(second, 0) + 1
    seconds_axis = sorted(buckets)
    figure, (rate, latency, memory) = pyplot.subplots(3, 1, figsize=(10, 9), sharex=True)
    rate.plot(
        seconds_axis, [len(buckets[s]) for s in seconds_axis], color="tab:blue", label="completed"
    )
    if shed:
        rate.plot(
            seconds_axis, [shed.get(s, 0) for s in seconds_axis], color="tab:gray", label="shed"
        )
        rate.legend()
    rate.set_ylabel("transactions / s")
    rate.set_title("tapsign: complete SCA transactions")
    for fraction, colour in ((0.5, "tab:green"), (0.95, "tab:orange"), (0.99, "tab:red")):
        latency.plot(
            seconds_axis,
            [_percentile(buckets[s], fraction) for s in seconds_axis],
            label=f"p{round(fraction * 100)}",
            color=colour,
        )
    latency.set_ylabel("latency (ms)")
    latency.legend()
    if samples:
        memory.plot(
            [at - start for at, _, _ in samples],
            [rss / 2**20 for *_, rss in samples],
            color="tab:purple",
        )
    memory.set_ylabel("server RSS (MiB)")
    memory.set_xlabel("seconds since the measured phase began")
    figure.tight_layout()
    figure.savefig(report / "chart.png", dpi=100)
    pyplot.close(figure)


if __name__ == "__main__":
    sys.exit(main())
