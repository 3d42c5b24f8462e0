"""The benchmarks: what stagetools costs next to the alternatives.

Run it through ``bash bench/run [--smoke]``, which makes the venv bench/.venv
with the pinned requirements.txt. Every candidate run is paired with a run of
its baseline right next to it (the pair's order alternating), after one
unmeasured warm-up pair. The table gives both medians, and the median of the
per-pair ratios and differences with a 95% bootstrap interval: on a shared VM
the speed drifts over seconds, and pairing takes the drift out.

1. start-up: ``python -c CODE`` that imports a library and reads one setting,
   against ``python -c pass``; wall time and peak memory (VmHWM).
2. Django start-up: ``manage.py check`` of a project on the stagetools entry
   points and settings defaults, against the same project in plain Django files.
3. serving: requests per second of one small view under uvicorn, through
   ``stagetools_django:asgi_application`` against Django's ``get_asgi_application``,
   same settings, a fresh server each run, loaded from this process over
   loopback for a fixed time.
4. scale: resolving and comparing N expected systems, time per system.

Where valgrind is installed, 1 to 3 are also counted in instructions
(callgrind): the same count for the same work whatever else the machine does,
so a difference of a few percent that wall time cannot resolve shows there.

The fixture projects are written into a temporary directory, with copies of
the repo's stagetools.py and stagetools_django.py, and removed at the end.
Exits non-zero if anything breaks; a missed goal is shown in the table only.
"""

import argparse
import asyncio
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import stagetools  # noqa: E402 (the repo's own module: standard library only)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = sys.executable
NAME = "shop_prod"
TIMEOUT = 120  # seconds: the bound of every child process and wait

# Peak memory: the child prints its own high-water mark. os.wait4's ru_maxrss
# does not work here: Linux keeps the parent's RSS at fork in the child's
# maxrss across exec, so every child would look as large as this driver.
PROBE = "\nprint(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
STARTUP = {  # the same minimal read of one setting, STAGETOOLS_NAME=shop_prod
    "bare python": "pass",
    "stagetools": "import stagetools\n"
                  "assert stagetools.get_actual_system_from_name().name == 'shop_prod'",
    "python-decouple": "from decouple import config\n"
                       "assert config('STAGETOOLS_NAME') == 'shop_prod'",
    "django-environ": "import environ\n"
                      "assert environ.Env().str('STAGETOOLS_NAME') == 'shop_prod'",
    "dynaconf": "from dynaconf import Dynaconf\n"
                "assert Dynaconf(envvar_prefix='STAGETOOLS').get('NAME') == 'shop_prod'",
    "pydantic-settings": "from pydantic_settings import BaseSettings\n"
                         "class Settings(BaseSettings):\n"
                         "    stagetools_name: str = ''\n"
                         "assert Settings().stagetools_name == 'shop_prod'",
}
VERSIONS = {"Django": "django", "uvicorn": "uvicorn", "python-decouple": "python-decouple",
            "django-environ": "django-environ", "dynaconf": "dynaconf",
            "pydantic-settings": "pydantic-settings"}

# ---------------------------------------------------------------- fixtures

APP = {  # the same small app in both Django projects
    "shop/__init__.py": "",
    "shop/models.py": "from django.db import models\n\n\n"
                      "class Note(models.Model):\n    text = models.CharField(max_length=200)\n",
    "shop/views.py": "from django.http import JsonResponse\n\n\n"
                     "def ping(request):\n    return JsonResponse({'pong': True})\n",
    "shop/urls.py": "from django.urls import path\n\nfrom . import views\n\n"
                    "urlpatterns = [path('ping/', views.ping)]\n",
}
URLS = """\
from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path

urlpatterns = [path("admin/", admin.site.urls), path("", include("shop.urls"))]
urlpatterns += staticfiles_urlpatterns()
"""
# Benchmark 3's baseline: Django's own entry point on the same settings.
PLAIN_ASGI = {"plain_asgi.py": "import os\n\nfrom django.core.asgi import get_asgi_application\n\n"
                               "os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
                               "'stagetools_project.settings')\n"
                               "application = get_asgi_application()\n"}
PLAIN_PROJECT = {  # what django-admin startproject makes; settings.py is written out below
    "manage.py": "import os\nimport sys\n\n\ndef main():\n"
                 "    os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'plain_project.settings')\n"
                 "    from django.core.management import execute_from_command_line\n"
                 "    execute_from_command_line(sys.argv)\n\n\n"
                 "if __name__ == '__main__':\n    main()\n",
    "plain_project/__init__.py": "",
    "plain_project/urls.py": URLS,
}
# Writes the stagetools settings' values out literally, as a plain settings.py.
WRITE_PLAIN_SETTINGS = """\
import importlib, aaa_env_setup
module = importlib.import_module(aaa_env_setup.SYSTEM.django_settings)
# stagetools' own hooks (its CSRF failure view and test runner) stay out of plain Django
values = {k: v for k, v in vars(module).items() if k.isupper()
          and k not in ('STAGETOOLS_NAME', 'CSRF_FAILURE_VIEW', 'TEST_RUNNER')}
values.update(ROOT_URLCONF='plain_project.urls', WSGI_APPLICATION='plain_project.wsgi.application')
print('from pathlib import PosixPath\\n')
for key, value in values.items():
    print(f'{key} = {value!r}')
"""


def write_files(root, files):
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def make_fixtures(tmp):
    """<tmp>/shop_prod/src/shop: the starter repo that `stagetools new` writes, with the
    benchmark's app in it; <tmp>/plain: the same app in plain Django files."""
    system = stagetools.get_expected_system_from_name(NAME, base_dir=tmp / NAME)
    project = system.core_repo_dir
    write_files(project, {**stagetools.render_starter(system), **APP, **PLAIN_ASGI})
    plain = tmp / "plain"
    write_files(plain, {**PLAIN_PROJECT, **APP})
    settings = run([PYTHON, "-c", WRITE_PLAIN_SETTINGS], project)[2]
    (plain / "plain_project" / "settings.py").write_text(settings, encoding="utf-8")
    return project, plain


# ---------------------------------------------------------------- helpers


class BenchError(Exception):
    pass


def child_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON") and k != "DJANGO_SETTINGS_MODULE"}
    env["STAGETOOLS_NAME"] = NAME
    env.update(extra)
    return env


def run(argv, cwd, env=None):
    """Run a child to its end: (wall seconds, CPU seconds, stdout, stderr), or BenchError."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, cwd=cwd, env=env or child_env(), stdout=out, stderr=err)
        timer = threading.Timer(TIMEOUT, child.kill)
        timer.start()
        try:  # os.wait4, not wait(): the child's own CPU time (user + system)
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
        if child.returncode != 0:
            how = (f"was killed after {TIMEOUT} s" if wall >= TIMEOUT
                   else f"exited {child.returncode}")
            raise BenchError(f"{' '.join(map(str, argv))} (in {cwd}) {how}:\n{stderr[-3000:]}")
        return wall, usage.ru_utime + usage.ru_stime, stdout, stderr


def paired(baseline, candidates, runs, measure):
    """measure(variant) for each candidate and, right next to it, for the baseline, after a
    warm-up round; the order is AB in one round and BA in the next, and each two rounds are
    averaged into one pair, so that going first or second cancels out:
    {candidate: [(baseline value, candidate value) per two rounds]}."""
    rounds = {candidate: [] for candidate in candidates}
    for round_ in range(-1, runs):
        for candidate in candidates:
            order = (baseline, candidate) if round_ % 2 else (candidate, baseline)
            values = {variant: measure(variant) for variant in order}
            if round_ >= 0:
                rounds[candidate].append((values[baseline], values[candidate]))
    return {candidate: [(mean(base, base_2), mean(cand, cand_2))
                        for (base, cand), (base_2, cand_2) in zip(values[::2], values[1::2])]
            for candidate, values in rounds.items()}


def mean(first, second):
    """The mean of two values, or of two tuples of values element by element."""
    if isinstance(first, tuple):
        return tuple(mean(*both) for both in zip(first, second))
    return (first + second) / 2


def column(pairs, index):
    """Pairs of one measure, from pairs of tuples of measures."""
    return [(base[index], cand[index]) for base, cand in pairs]


def median(values):
    return statistics.median(values)


def paired_statistic(pairs, statistic, resamples=2000):
    """The median of statistic(baseline, candidate) over the pairs, and its 95% bootstrap
    interval (a fixed seed: the same pairs give the same interval)."""
    values = [statistic(base, cand) for base, cand in pairs]
    rng = random.Random(0)
    medians = sorted(median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return median(values), (medians[int(0.025 * resamples)], medians[int(0.975 * resamples)])


GOALS = {  # text: (paired statistic it is about, test)
    "≤ +2 ms": ("delta", lambda value: value <= 2),
    "≤ +1 MiB": ("delta", lambda value: value <= 1),
    "ratio ≤ 1.02": ("ratio", lambda value: value <= 1.02),
    "ratio ≥ 0.98": ("ratio", lambda value: value >= 0.98),
    "flat: ratio ≤ 1.25": ("ratio", lambda value: value <= 1.25),
}


def row(bench, measure, baseline, candidate, pairs, unit, goal=""):
    """A table row from paired values. A goal is met ("yes") if its whole interval meets it,
    "within noise" if the interval straddles the limit, "**no**" if no part meets it."""
    ratio = paired_statistic(pairs, lambda base, cand: cand / base)
    delta = paired_statistic(pairs, lambda base, cand: cand - base)
    met = ""
    if goal:
        kind, test = GOALS[goal]
        value, (low, high) = ratio if kind == "ratio" else delta
        results = {test(value), test(low), test(high)}
        met = "yes" if results == {True} else "**no**" if results == {False} else "within noise"
    return dict(bench=bench, measure=measure, baseline=baseline, candidate=candidate,
                base=median(base for base, _ in pairs), cand=median(c for _, c in pairs),
                ratio=ratio, delta=delta, unit=unit, goal=goal, met=met, pairs=len(pairs))


def instructions(argv, cwd, seed):
    """Instructions a child runs, counted by valgrind's callgrind: repeatable where time is
    not. The hash seed is fixed, as it changes the count by about 0.2%."""
    _, _, _, stderr = run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
                          + argv, cwd, child_env(PYTHONHASHSEED=str(seed)))
    match = re.search(r"Collected : (\d+)", stderr)
    if not match:
        raise BenchError(f"no instruction count from valgrind:\n{stderr[-3000:]}")
    return int(match.group(1)) / 1e6  # millions


def instruction_row(bench, measure, baseline, candidate, counts, goal="", unit="M"):
    """counts: {variant: [instructions per seed]}; seeds pair the runs."""
    return row(bench, f"{measure}, instructions", baseline, candidate,
               list(zip(counts[baseline], counts[candidate])), unit, goal)


# ---------------------------------------------------------------- 1 start-up


def bench_startup(cwd, runs, seeds, smoke):
    def measure(variant):
        wall, cpu, output, _ = run([PYTHON, "-c", STARTUP[variant] + PROBE], cwd)
        return wall * 1000, cpu * 1000, int(output.split()[-1]) / 1024  # ms, ms, MiB

    bare, libraries = "bare python", [variant for variant in STARTUP if variant != "bare python"]
    pairs = paired(bare, libraries, runs, measure)
    rows = []
    for variant in libraries:
        goals = variant == "stagetools"
        rows.append(row("1 start-up", "wall", bare, variant, column(pairs[variant], 0), "ms",
                        "≤ +2 ms" if goals else ""))
        if goals:  # CPU time: less disturbed by whatever else the machine runs
            rows.append(row("1 start-up", "CPU (user+sys)", bare, variant,
                            column(pairs[variant], 1), "ms"))
        rows.append(row("1 start-up", "peak memory", bare, variant, column(pairs[variant], 2),
                        "MiB", "≤ +1 MiB" if goals else ""))
    if seeds:
        counted = ["stagetools"] if smoke else libraries  # the others take a minute
        counts = {variant: [instructions([PYTHON, "-c", STARTUP[variant]], cwd, seed)
                            for seed in seeds] for variant in [bare] + counted}
        rows += [instruction_row("1 start-up", "python -c", bare, variant, counts)
                 for variant in counted]
    return rows


SPLIT = """\
import time
start = time.perf_counter()
import stagetools
imported = time.perf_counter()
system = stagetools.get_actual_system_from_name()
resolved = time.perf_counter()
system.user
looked_up = time.perf_counter()
print(*((end - begin) * 1000 for begin, end in
        ((start, imported), (imported, resolved), (resolved, looked_up))))
"""


def startup_split(cwd, repeats=30):
    """Where stagetools' start-up goes, timed inside fresh processes: medians in ms."""
    samples = [run([PYTHON, "-c", SPLIT], cwd)[2].split() for _ in range(repeats)]
    return [(part, median(float(sample[i]) for sample in samples)) for i, part in
            enumerate(("import stagetools", "get_actual_system_from_name()",
                       "first .user (pwd and grp, only when asked for)"))]


# ---------------------------------------------------------------- 2 Django check


def bench_check(project, plain, runs, seeds):
    dirs = {"plain Django": plain, "stagetools": project}

    def measure(variant):
        wall, cpu, output, _ = run([PYTHON, "manage.py", "check"], dirs[variant])
        if "no issues" not in output:
            raise BenchError(f"manage.py check of {variant}: {output}")
        return wall * 1000, cpu * 1000

    pairs = paired("plain Django", ["stagetools"], runs, measure)["stagetools"]
    rows = [row("2 Django start-up", "manage.py check, wall", "plain Django", "stagetools",
                column(pairs, 0), "ms", "ratio ≤ 1.02"),
            row("2 Django start-up", "manage.py check, CPU", "plain Django", "stagetools",
                column(pairs, 1), "ms")]
    if seeds:
        counts = {variant: [instructions([PYTHON, "manage.py", "check"], path, seed)
                            for seed in seeds] for variant, path in dirs.items()}
        rows.append(instruction_row("2 Django start-up", "manage.py check", "plain Django",
                                    "stagetools", counts, "ratio ≤ 1.02"))
    return rows


# ---------------------------------------------------------------- 3 serving


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(app, cwd):
    port = free_port()
    argv = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log", app]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(argv, cwd=cwd, env=child_env(), start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if server.poll() is not None:
                    log.seek(0)
                    raise BenchError(f"uvicorn {app} exited {server.returncode}:\n"
                                     f"{log.read().decode()[-3000:]}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return server, port
                except OSError:
                    time.sleep(0.05)
            raise BenchError(f"uvicorn {app} did not listen on port {port} within 30 s")
        except BaseException:  # Ctrl-C too: the server is in a session of its own
            stop_server(server)
            raise


def stop_server(server):
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
    except ProcessLookupError:
        pass


async def load(port, seconds, connections=8, path="/ping/"):
    """Requests per second: `connections` keep-alive clients, each sending one
    request after the other until `seconds` are over; each request bounded to 10 s."""
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    async def client():
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), 10)
        done = 0
        try:
            while loop.time() < deadline:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if not head.startswith(b"HTTP/1.1 200 ") or not length:
                    raise BenchError(f"unexpected response: {head[:300]!r}")
                await asyncio.wait_for(reader.readexactly(int(length.group(1))), 10)
                done += 1
        finally:
            writer.close()
        return done

    start = loop.time()
    deadline = start + seconds
    try:
        counts = await asyncio.gather(*[client() for _ in range(connections)])
    except asyncio.TimeoutError:
        raise BenchError(f"no response from 127.0.0.1:{port} within 10 s") from None
    return sum(counts) / (loop.time() - start)


# One process calls an ASGI application directly: lifespan start-up, then `requests`
# GET /ping/ one after the other. Counted twice with different numbers of requests,
# the difference is the instructions of the extra requests: start-up cancels out.
REQUESTS = """\
import asyncio, importlib, sys
module, _, attribute = sys.argv[1].partition(":")
application = getattr(importlib.import_module(module), attribute)
SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
         "scheme": "http", "path": "/ping/", "raw_path": b"/ping/", "query_string": b"",
         "root_path": "", "headers": [(b"host", b"127.0.0.1")],
         "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}

async def call(scope, first_message, sent):
    inbox = [first_message]
    async def receive():
        return inbox.pop() if inbox else await asyncio.get_running_loop().create_future()
    async def send(message):
        sent.append(message)
    await application(scope, receive, send)

async def main():
    # Lifespan runs as long as the server; Django's own handler refuses it at once.
    started = []
    lifespan = asyncio.create_task(call({"type": "lifespan", "asgi": {"version": "3.0"}},
                                        {"type": "lifespan.startup"}, started))
    while not started and not lifespan.done():
        await asyncio.sleep(0)
    if lifespan.done():
        assert isinstance(lifespan.exception(), ValueError), lifespan
    assert started in ([], [{"type": "lifespan.startup.complete"}]), started
    for _ in range(int(sys.argv[2])):
        sent = []
        await call(SCOPE, {"type": "http.request", "body": b"", "more_body": False}, sent)
        assert sent[0]["status"] == 200, sent

asyncio.run(main())
"""


def bench_serving(project, runs, seconds, seeds, requests):
    """A fresh server for every run, so no one process's luck decides the ratio."""
    apps = {"get_asgi_application": "plain_asgi:application",
            "stagetools": "stagetools_django:asgi_application"}

    def measure(variant):
        server, port = start_server(apps[variant], project)
        try:
            asyncio.run(load(port, min(seconds, 0.5)))  # warm-up
            return asyncio.run(load(port, seconds))
        finally:
            stop_server(server)

    pairs = paired("get_asgi_application", ["stagetools"], runs, measure)["stagetools"]
    rows = [row("3 serving", f"uvicorn, 8 connections, {seconds:g} s", "get_asgi_application",
                "stagetools_django:asgi_application", pairs, "req/s", "ratio ≥ 0.98")]
    if seeds:
        def per_request(app, seed):
            few, many = (instructions([PYTHON, "-c", REQUESTS, app, str(count)], project, seed)
                         for count in requests)
            return (many - few) / (requests[1] - requests[0]) * 1000  # thousands

        counts = {variant: [per_request(app, seed) for seed in seeds[:1]]
                  for variant, app in apps.items()}
        # Fewer instructions per request is faster: the goal is ≤ 1.02, not ≥ 0.98.
        rows.append(instruction_row("3 serving", "one request in-process",
                                    "get_asgi_application", "stagetools", counts,
                                    "ratio ≤ 1.02", unit="k"))
    return rows


# ---------------------------------------------------------------- 4 scale


def bench_scale(project, runs, sizes):
    sys.path.insert(0, str(project))
    import stagetools

    expected = stagetools.get_expected_system_from_name

    def measure(size):
        names = [f"shop{i}_prod" for i in range(size)]
        repeats = max(1, 1000 // size)  # small sizes too last long enough for the clock
        start = time.perf_counter()
        for _ in range(repeats):
            systems = [expected(name) for name in names]
            others = [expected(name, base_dir=f"/srv/{name}") for name in names]
            differences = [a.differences(b) for a, b in zip(systems, others)]
        seconds = time.perf_counter() - start
        if not all(differences):
            raise BenchError("differences() found no difference between base dirs")
        return seconds / (size * repeats) * 1e6  # µs per system

    results = {size: [] for size in sizes}
    for round_ in range(-1, runs):  # all sizes in each round, the order rotating
        shift = max(round_, 0) % len(sizes)
        for size in sizes[shift:] + sizes[:shift]:
            value = measure(size)
            if round_ >= 0:
                results[size].append(value)
    return [row("4 scale", "resolve 2 + compare, per system", f"N={sizes[0]:,}",
                f"N={size:,}", list(zip(results[sizes[0]], results[size])), "µs",
                "flat: ratio ≤ 1.25")
            for size in sizes[1:]]


# ---------------------------------------------------------------- report


def number(value):
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 \
        else f"{value:.2f}"


def table(rows):
    """Markdown: medians, then the paired ratio and difference with their 95% interval
    (left out for counted instructions, which hardly vary)."""
    lines = ["| benchmark | measure | baseline | baseline median | candidate | "
             "candidate median | ratio | delta | goal | met |",
             "|---|---|---|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        (ratio, (ratio_low, ratio_high)), (delta, (delta_low, delta_high)) = r["ratio"], r["delta"]
        unit = r["unit"]
        ratio_text, delta_text = f"{ratio:.3f}", f"{signed(delta)} {unit}"
        if r["pairs"] >= 10:
            ratio_text += f" ({ratio_low:.3f}–{ratio_high:.3f})"
            delta_text += f" ({signed(delta_low)} to {signed(delta_high)})"
        lines.append(f"| {r['bench']} | {r['measure']} | {r['baseline']} | "
                     f"{number(r['base'])} {unit} | {r['candidate']} | "
                     f"{number(r['cand'])} {unit} | {ratio_text} | {delta_text} | "
                     f"{r['goal']} | {r['met']} |")
    return "\n".join(lines)


def signed(value):
    return f"{'+' if value >= 0 else '−'}{number(abs(value))}"


def machine():
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "?")
    from importlib.metadata import version
    versions = ", ".join(f"{name} {version(dist)}" for name, dist in VERSIONS.items())
    return (f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; {versions}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a few iterations of everything: does it still work?")
    parser.add_argument("--runs", type=int,
                        help="measured runs of each variant, made even: two make one pair "
                             "(default 20; smoke 4)")
    parser.add_argument("--seconds", type=float,
                        help="length of one serving run (default 3; smoke 0.5)")
    parser.add_argument("--seeds", type=int,
                        help="instruction counts per variant, each with its own hash seed "
                             "(default 3; smoke 1; 0: none)")
    parser.add_argument("--only", type=int, choices=(1, 2, 3, 4), action="append",
                        help="run only this benchmark (repeatable)")
    args = parser.parse_args(argv)
    runs = args.runs or (4 if args.smoke else 20)
    runs += runs % 2
    seconds = args.seconds or (0.5 if args.smoke else 3)
    seeds = tuple(range(args.seeds if args.seeds is not None else 1 if args.smoke else 3))
    requests = (2, 6) if args.smoke else (50, 250)
    only = set(args.only or (1, 2, 3, 4))
    sizes = (10, 100, 1000) if args.smoke else (10, 100, 1000, 10000)
    started = time.monotonic()
    print(f"# stagetools benchmarks: {runs} runs of each variant, {runs // 2} pairs"
          f"{' (smoke: numbers mean nothing)' if args.smoke else ''}", flush=True)
    print(f"machine: {machine()}", flush=True)
    if seeds and not shutil.which("valgrind"):
        print("no instruction counts: valgrind is not installed (apt-get install valgrind)")
        seeds = ()
    print(flush=True)
    # A job killed with SIGTERM still runs the finally below: no temp dir, no server left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="stagetools-bench-"))
    rows = []
    try:
        project, plain = make_fixtures(tmp)
        steps = {1: lambda: bench_startup(project, runs, seeds, args.smoke),
                 2: lambda: bench_check(project, plain, runs, seeds),
                 3: lambda: bench_serving(project, runs, seconds, seeds, requests),
                 4: lambda: bench_scale(project, runs, sizes)}
        for number_ in sorted(only):
            step_start = time.monotonic()
            rows += steps[number_]()
            print(f"benchmark {number_} done in {time.monotonic() - step_start:.0f} s",
                  file=sys.stderr, flush=True)
        print(table(rows))
        if 1 in only:
            print("\nWhere stagetools' start-up goes, timed inside fresh processes "
                  "(medians of 30):\n")
            for part, milliseconds in startup_split(project):
                print(f"    {milliseconds:6.2f} ms  {part}")
    except (BenchError, subprocess.SubprocessError, OSError) as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'smoke ' if args.smoke else ''}run finished in "
          f"{time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
