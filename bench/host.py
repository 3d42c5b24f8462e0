"""Capacity of a deployed host (issue 15), measured the way users feel it: through nginx on a
test host (tests/deploy/testhosts.py), with load from this machine (wrk) over the veth.

    bash bench/run --host            # 10 installations; about 8 minutes on 2 cores
    bash bench/run --host --smoke    # 3 installations, short runs: CI's smoke run

One run, one host, one table: requests per second and 99th-percentile latency for a CPU-bound
page (/cpu/, ~10 ms of Python) and a page that waits (/io/, sleeps 0.1 s as on a slow query),
each as a ratio to today's unit (one sync worker: also gunicorn's own default, which
cookiecutter-django and Dokku keep with WEB_CONCURRENCY unset, and uvicorn's); then the memory
(sum of RSS) of the host's installations busy and idle, and the time a DEV stopped for
idleness takes to answer its first request. Needs root, like the deploy tests.
"""
import argparse
import os
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, "tests", "deploy"))
sys.path.insert(0, TOP)
import hostbench  # noqa: E402
import stagetools  # noqa: E402

# Each configuration is an installation of the same repo, declared in its stagetools.ini.
DECLARATION = """[stagetools]
framework = django
server = gunicorn
[dev]
idle_stop = {idle}
[int]
idle_stop = {idle}
[shop_p1]
workers = 1
threads = 1
[shop_p3]
threads = 1
[shop_p4]
server = uvicorn
workers = 1
[shop_p5]
server = uvicorn
"""
ROWS = [  # (installation, what it runs); the first is the baseline
    ("shop_p1", "today: gunicorn, 1 sync worker (also gunicorn's default, WEB_CONCURRENCY unset)"),
    ("shop_p3", "gunicorn's rule, sync: 2 x cores + 1 workers, 1 thread"),
    ("shop_prod", "new PROD default, gunicorn: 2 x cores + 1 workers x 4 threads"),
    ("shop_p4", "today on uvicorn: 1 worker (uvicorn's default)"),
    ("shop_p5", "new PROD default, uvicorn: 2 x cores + 1 workers"),
]
OTHERS = ["shop_qual", "shop_int", "shop_dev", "shop_d1", "shop_i1"]  # 10 in all
PAGES = ["/cpu/", "/io/"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="3 installations, 2 s runs")
    parser.add_argument("--seconds", type=int, help="length of each wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench/host.py: needs root (test hosts: systemd-nspawn, network namespaces)")
    smoke = args.smoke
    rows = ROWS[:1] + ROWS[2:3] if smoke else ROWS
    names = [name for name, _ in rows] + (["shop_dev"] if smoke else OTHERS)
    idle = 3 if smoke else 10
    seconds = args.seconds or (2 if smoke else 10)
    log = (lambda *a: None) if smoke else print
    with tempfile.TemporaryDirectory(prefix="stagetools-bench-") as workdir:
        with hostbench.Deployment(workdir, DECLARATION.format(idle=idle), names,
                                  log=log) as site:
            report(site, rows, names, seconds, args.connections, idle, smoke)
    return 0


def report(site, rows, names, seconds, connections, idle, smoke):
    cores = site.host.run("/usr/bin/python3 -c 'import os; print(os.cpu_count())'").stdout.strip()
    print("# stagetools capacity, %s: one test host (%s cores), %s; wrk -c%d -d%ds per cell"
          % ("smoke run" if smoke else "full run", cores, ", ".join(
              "%s %.0f s" % item for item in site.times.items()), connections, seconds))
    results = {}
    for name, _ in rows:
        for page in PAGES:
            if not smoke:  # warm: every worker has imported Django and opened the database
                hostbench.wrk(site.host.address, name, page, 2, connections)
            results[name, page] = hostbench.wrk(site.host.address, name, page, seconds,
                                                connections)
    base = rows[0][0]
    print()
    print("| configuration | /cpu/ req/s | /cpu/ p99 | /io/ req/s | /io/ p99 |")
    print("|---|---|---|---|---|")
    for name, label in rows:
        cells = []
        for page in PAGES:
            rps, p99, errors = results[name, page]
            base_rps, base_p99, _ = results[base, page]
            if name == base:
                cells += ["1.00 (%.0f/s)" % rps, "1.00 (%.0f ms)" % p99]
            else:
                cells += ["x%.2f" % (rps / base_rps), "x%.2f" % (p99 / base_p99)]
            if errors:
                cells[-1] += " (%d errors)" % errors
        print("| %s (`%s`) | %s |" % (label, name, " | ".join(cells)))
    errors = sum(result[2] for result in results.values())

    # Memory: every installation started (a request each), then the DEV and INT stopped.
    for name in names:
        assert site.get(name, "/")[0] == 200, name
    time.sleep(1)
    busy = {name: site.rss_kib([name]) for name in names}
    # Those that stop when idle, as the declaration above says (stagetools reads it).
    with tempfile.NamedTemporaryFile("w", suffix=".ini") as declaration:
        declaration.write(DECLARATION.format(idle=idle))
        declaration.flush()
        idlers = [name for name in names if stagetools.read_declaration(
            None, name, declaration.name).get("idle_stop")]
    for name in idlers:
        assert site.wait_until_stopped(name, idle + 60) is not None, name + " did not stop"
    idle_total = site.rss_kib(names)
    today = len(names) * busy[base]
    print()
    print("Memory, sum of RSS of the %d installations' processes: busy %.0f MiB, idle %.0f MiB "
          "(%d DEV/INT stopped); today's units, computed from one measured (1 worker each, "
          "always up: %d x %s's %.0f MiB): %.0f MiB, busy or idle."
          % (len(names), sum(busy.values()) / 1024, idle_total / 1024, len(idlers), len(names),
             base, busy[base] / 1024, today / 1024))
    print("Per installation, busy (MiB): " + ", ".join(
        "%s %.0f" % (name, kib / 1024) for name, kib in busy.items()))

    # The first request to a DEV stopped for idleness, against one to a running DEV.
    firsts = []
    for _ in range(1 if smoke else 3):
        assert site.wait_until_stopped("shop_dev", idle + 60) is not None
        status, took, _ = site.get("shop_dev", "/")
        assert status == 200
        firsts.append(took)
    warm = min(site.get("shop_dev", "/")[1] for _ in range(5))
    print("First request to shop_dev after its idle stop (idle_stop = %d s): %s s; "
          "to the running shop_dev: %.3f s." % (idle, ", ".join("%.2f" % t for t in firsts), warm))
    if errors:
        print("wrk saw %d failed requests" % errors)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
