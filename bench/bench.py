"""The benchmarks of issue 7: what stagetools costs next to the alternatives.

Run it through ``bash bench/run [--smoke]``, which makes the venv bench/.venv
with the pinned requirements.txt. Every benchmark measures its baseline in the
same run, interleaved with the candidate run by run (the order rotates each
round), after one unmeasured warm-up round, and prints medians:

1. start-up: ``python -c CODE`` that imports a library and reads one setting,
   against ``python -c pass``; wall time and peak memory (VmHWM).
2. Django start-up: ``manage.py check`` of a project on the stagetools entry
   points and settings defaults, against the same project in plain Django files.
3. serving: requests per second of one small view under uvicorn, through
   ``stagetools_django:asgi_application`` against Django's ``get_asgi_application``,
   same settings, a fresh server each run, loaded from this process over
   loopback for a fixed time.
4. scale: resolving and comparing N expected systems, time per system.

The fixture projects are written into a temporary directory, with copies of
the repo's stagetools.py and stagetools_django.py, and removed at the end.
Exits non-zero if anything breaks; a missed goal is shown in the table only.
"""

import argparse
import asyncio
import os
import platform
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
STAGETOOLS_PROJECT = {  # the starter files of `stagetools new`
    "aaa_env_setup.py": "import os\n\nfrom stagetools import get_actual_system_from_name\n\n"
                        "SYSTEM = get_actual_system_from_name()\n"
                        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', SYSTEM.django_settings)\n",
    "manage.py": "import sys\n\nimport stagetools_django\n\nsys.exit(stagetools_django.manage())\n",
    "stagetools_project/__init__.py": "",
    "stagetools_project/settings.py": "from stagetools_django import settings_defaults\n\n"
                                      "globals().update(settings_defaults('sqlite'))\n",
    "stagetools_project/urls.py": URLS,
    # benchmark 3's baseline: Django's own entry point on the same settings
    "plain_asgi.py": "import os\n\nfrom django.core.asgi import get_asgi_application\n\n"
                     "os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
                     "'stagetools_project.settings')\napplication = get_asgi_application()\n",
}
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
values = {k: v for k, v in vars(module).items() if k.isupper() and k != 'STAGETOOLS_NAME'}
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
    """<tmp>/shop_prod/src/shop: a stagetools installation; <tmp>/plain: plain Django."""
    project = tmp / NAME / "src" / "shop"
    for module in ("stagetools.py", "stagetools_django.py"):
        project.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / module, project / module)
    write_files(project, {**STAGETOOLS_PROJECT, **APP})
    plain = tmp / "plain"
    write_files(plain, {**PLAIN_PROJECT, **APP})
    _, _, settings = run([PYTHON, "-c", WRITE_PLAIN_SETTINGS], project)
    (plain / "plain_project" / "settings.py").write_text(settings, encoding="utf-8")
    return project, plain


# ---------------------------------------------------------------- helpers


class BenchError(Exception):
    pass


def child_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON") and k != "DJANGO_SETTINGS_MODULE"}
    env["STAGETOOLS_NAME"] = NAME
    return env


def run(argv, cwd):
    """Run a child to its end: (wall seconds, CPU seconds, stdout), or BenchError."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, cwd=cwd, env=child_env(), stdout=out, stderr=err)
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
        if child.returncode != 0:
            raise BenchError(f"{' '.join(map(str, argv))} (in {cwd}) exited "
                             f"{child.returncode}:\n{err.read().decode()[-3000:]}")
        return wall, usage.ru_utime + usage.ru_stime, out.read().decode()


def interleave(variants, runs, measure):
    """measure(variant) for every variant, runs rounds after a warm-up round,
    the order rotated each round: {variant: [value per round]}."""
    results = {variant: [] for variant in variants}
    for round_ in range(-1, runs):
        shift = max(round_, 0) % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            value = measure(variant)
            if round_ >= 0:
                results[variant].append(value)
    return results


def row(bench, measure, baseline, base, candidate, cand, unit, goal="", met=None):
    return dict(bench=bench, measure=measure, baseline=baseline, base=base,
                candidate=candidate, cand=cand, unit=unit, goal=goal, met=met)


def median(values):
    return statistics.median(values)


# ---------------------------------------------------------------- 1 start-up


def bench_startup(cwd, runs):
    def measure(variant):
        wall, cpu, output = run([PYTHON, "-c", STARTUP[variant] + PROBE], cwd)
        return wall * 1000, cpu * 1000, int(output.split()[-1]) / 1024  # ms, ms, MiB

    results = interleave(list(STARTUP), runs, measure)
    bare = [median([values[i] for values in results["bare python"]]) for i in range(3)]
    rows = []
    for variant, values in results.items():
        if variant == "bare python":
            continue
        wall, cpu, mib = [median([value[i] for value in values]) for i in range(3)]
        goals = variant == "stagetools"
        rows.append(row("1 start-up", "wall", "bare python", bare[0], variant, wall, "ms",
                        "≤ +2 ms" if goals else "", wall - bare[0] <= 2 if goals else None))
        if goals:  # CPU time: less disturbed by whatever else the machine runs
            rows.append(row("1 start-up", "CPU (user+sys)", "bare python", bare[1], variant,
                            cpu, "ms"))
        rows.append(row("1 start-up", "peak memory", "bare python", bare[2], variant, mib,
                        "MiB", "≤ +1 MiB" if goals else "",
                        mib - bare[2] <= 1 if goals else None))
    return rows


def importtime_profile(cwd, repeats=5):
    """stagetools' own imports by cumulative time, medians of python -X importtime."""
    samples = {}
    for _ in range(repeats):
        argv = [PYTHON, "-X", "importtime", "-c", STARTUP["stagetools"]]
        result = subprocess.run(argv, cwd=cwd, env=child_env(), capture_output=True,
                                text=True, timeout=TIMEOUT)
        children = []
        for line in result.stderr.splitlines():
            match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)", line)
            if not match:
                continue
            self_us, cumulative, indent, module = match.groups()
            if indent == "":
                if module == "stagetools":
                    children.append(("stagetools (module body)", int(self_us)))
                    children.append(("stagetools (total)", int(cumulative)))
                    break
                children = []
            elif indent == "  ":
                children.append((module, int(cumulative)))
        for module, microseconds in children:
            samples.setdefault(module, []).append(microseconds)
    return sorted(((median(v) / 1000, k) for k, v in samples.items()), reverse=True)


# ---------------------------------------------------------------- 2 Django check


def bench_check(project, plain, runs):
    dirs = {"plain Django": plain, "stagetools": project}

    def measure(variant):
        wall, cpu, output = run([PYTHON, "manage.py", "check"], dirs[variant])
        if "no issues" not in output:
            raise BenchError(f"manage.py check of {variant}: {output}")
        return wall * 1000, cpu * 1000

    results = interleave(list(dirs), runs, measure)
    (base, base_cpu), (cand, cand_cpu) = [
        [median([value[i] for value in results[variant]]) for i in range(2)]
        for variant in dirs]
    return [row("2 Django start-up", "manage.py check, wall", "plain Django", base,
                "stagetools", cand, "ms", "ratio ≤ 1.02", cand / base <= 1.02),
            row("2 Django start-up", "manage.py check, CPU", "plain Django", base_cpu,
                "stagetools", cand_cpu, "ms")]


# ---------------------------------------------------------------- 3 serving


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(app, cwd):
    port = free_port()
    argv = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log", app]
    server = subprocess.Popen(argv, cwd=cwd, env=child_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise BenchError(f"uvicorn {app} exited {server.returncode}:\n"
                             f"{server.stderr.read()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            time.sleep(0.05)
    stop_server(server)
    raise BenchError(f"uvicorn {app} did not listen on port {port} within 30 s")


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
    counts = await asyncio.gather(*[client() for _ in range(connections)])
    return sum(counts) / (loop.time() - start)


def bench_serving(project, runs, seconds):
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

    results = interleave(list(apps), runs, measure)
    base, cand = median(results["get_asgi_application"]), median(results["stagetools"])
    return [row("3 serving", f"uvicorn, 8 connections, {seconds:g} s", "get_asgi_application",
                base, "stagetools_django:asgi_application", cand, "req/s", "ratio ≥ 0.98",
                cand / base >= 0.98)]


# ---------------------------------------------------------------- 4 scale


def bench_scale(project, runs, sizes):
    sys.path.insert(0, str(project))
    import stagetools

    expected = stagetools.get_expected_system_from_name

    def measure(size):
        names = [f"shop{i}_prod" for i in range(size)]
        start = time.perf_counter()
        systems = [expected(name) for name in names]
        others = [expected(name, base_dir=f"/srv/{name}") for name in names]
        differences = [a.differences(b) for a, b in zip(systems, others)]
        seconds = time.perf_counter() - start
        if not all(differences):
            raise BenchError("differences() found no difference between base dirs")
        return seconds / size * 1e6  # µs per system

    results = interleave(list(sizes), runs, measure)
    base = median(results[sizes[0]])
    return [row("4 scale", "resolve 2 + compare, per system", f"N={sizes[0]:,}", base,
                f"N={size:,}", median(results[size]), "µs", "flat: ratio ≤ 1.25",
                median(results[size]) / base <= 1.25)
            for size in sizes[1:]]


# ---------------------------------------------------------------- report


def number(value):
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 \
        else f"{value:.2f}"


def table(rows):
    lines = ["| benchmark | measure | baseline | baseline median | candidate | "
             "candidate median | ratio | delta | goal | met |",
             "|---|---|---|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        delta = r["cand"] - r["base"]
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(f"| {r['bench']} | {r['measure']} | {r['baseline']} | "
                     f"{number(r['base'])} {r['unit']} | {r['candidate']} | "
                     f"{number(r['cand'])} {r['unit']} | {r['cand'] / r['base']:.3f} | "
                     f"{'+' if delta >= 0 else '−'}{number(abs(delta))} {r['unit']} | "
                     f"{r['goal']} | {met} |")
    return "\n".join(lines)


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
    parser.add_argument("--runs", type=int, help="measured rounds (default 20; smoke 3)")
    parser.add_argument("--seconds", type=float,
                        help="length of one serving run (default 3; smoke 0.5)")
    parser.add_argument("--only", type=int, choices=(1, 2, 3, 4), action="append",
                        help="run only this benchmark (repeatable)")
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.smoke else 20)
    seconds = args.seconds or (0.5 if args.smoke else 3)
    only = set(args.only or (1, 2, 3, 4))
    sizes = (10, 100, 1000) if args.smoke else (10, 100, 1000, 10000)
    started = time.monotonic()
    print(f"# stagetools benchmarks: {runs} interleaved runs each"
          f"{' (smoke: numbers mean nothing)' if args.smoke else ''}", flush=True)
    print(f"machine: {machine()}\n", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="stagetools-bench-"))
    rows = []
    try:
        project, plain = make_fixtures(tmp)
        steps = {1: lambda: bench_startup(project, runs),
                 2: lambda: bench_check(project, plain, runs),
                 3: lambda: bench_serving(project, runs, seconds),
                 4: lambda: bench_scale(project, runs, sizes)}
        for number_ in sorted(only):
            step_start = time.monotonic()
            rows += steps[number_]()
            print(f"benchmark {number_} done in {time.monotonic() - step_start:.0f} s",
                  file=sys.stderr, flush=True)
        print(table(rows))
        if 1 in only:
            print("\nWhere stagetools' start-up goes (python -X importtime, median of 5; "
                  "each of its own imports with what that import pulls in first):\n")
            for milliseconds, module in importtime_profile(project):
                print(f"    {milliseconds:7.1f} ms  {module}")
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
