"""Several app hosts behind HAProxy (issue 24): requests per second and 99th-percentile latency
through the balancer with one app host and with two, in one run.

    bash bench/run --hosts            # about 10 minutes on 2 cores
    bash bench/run --hosts --smoke    # short runs: CI's smoke run

Four test hosts (tests/deploy/multihost.py): a balancer, two app hosts, a database host,
deployed by the collection. First market_prod is placed on app1 alone, measured, then on
app1 and app2 (the same playbook: app2 is added, the balancer's backend gets it), measured
again. Two pages: /wait/ waits 50 ms as on a slow query or another service, /compute/
computes for a few milliseconds. Load comes from the machine (wrk) to HAProxy over the
bridge.

What this can show: all four hosts are containers on this machine's cores, so a second app
host adds workers, not CPUs. A page that waits is bounded by how many requests are served at
once (each app host: 2 x cores + 1 workers x 4 threads), so it scales with app hosts here as
on real ones; a page that computes is bounded by the cores, which both app hosts share here:
no gain can show (the ratio stays near 1 or below, HAProxy and the database host take their
share of the same cores). On real hosts, each with its own cores, a CPU-bound page scales
about with the number of app hosts until the database host or the balancer is the limit.
"""
import argparse
import os
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, "tests", "deploy"))
import hostbench  # noqa: E402
import multihost  # noqa: E402
import test_deploy  # noqa: E402

PAGES = {"/wait/": 64, "/compute/": 16}  # page: wrk connections


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 s runs, no warm-up")
    parser.add_argument("--seconds", type=int, help="length of each wrk run")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench/hosts.py: needs root (test hosts: systemd-nspawn, network namespaces)")
    seconds = args.seconds or (2 if args.smoke else 15)
    log = (lambda *a: None) if args.smoke else print
    with tempfile.TemporaryDirectory(prefix="stagetools-bench-hosts-") as workdir:
        started = time.monotonic()
        hosts = multihost.boot(workdir, log=log)
        try:
            repo = multihost.market_repo(workdir)
            collections = test_deploy.install_collection(workdir)
            booted = time.monotonic() - started
            results = {}
            for count in (1, 2):
                inventory = multihost.write_inventory(
                    workdir, hosts, repo, app_hosts=("app1", "app2")[:count], other=False)
                started = time.monotonic()
                rc, output, _ = test_deploy.playbook(workdir, collections, inventory,
                                                     timeout=1800)
                if rc != 0:
                    sys.exit("deploy on %d app hosts failed:\n%s" % (count, output[-6000:]))
                log("deployed on %d app hosts in %.0f s" % (count, time.monotonic() - started))
                balancer = hosts.by_role["balancer"].address
                for page, connections in PAGES.items():
                    if not args.smoke:  # every worker has imported Django, opened the database
                        hostbench.wrk(balancer, multihost.NAME, page, 3, connections)
                    results[count, page] = hostbench.wrk(balancer, multihost.NAME, page,
                                                         seconds, connections)
        finally:
            hosts.__exit__(None, None, None)
    report(results, seconds, booted, args.smoke)
    return 1 if any(result[2] for result in results.values()) else 0


def report(results, seconds, booted, smoke):
    print("# stagetools beyond one host, %s: HAProxy and 1 or 2 app hosts (PROD default: "
          "2 x cores + 1 gunicorn workers x 4 threads each), database on a third host; all "
          "on this machine's %d cores; hosts booted in %.0f s; wrk -d%ds per cell"
          % ("smoke run" if smoke else "full run", os.cpu_count(), booted, seconds))
    print()
    print("| page (wrk connections) | 1 app host: req/s | p99 | 2 app hosts: req/s | p99 "
          "| ratio req/s | ratio p99 |")
    print("|---|---|---|---|---|---|---|")
    for page, connections in PAGES.items():
        (rps1, p99_1, errors1), (rps2, p99_2, errors2) = results[1, page], results[2, page]
        print("| %s (%d) | %.0f | %.0f ms | %.0f | %.0f ms | x%.2f | x%.2f |%s"
              % (page, connections, rps1, p99_1, rps2, p99_2, rps2 / rps1, p99_2 / p99_1,
                 " %d errors" % (errors1 + errors2) if errors1 + errors2 else ""))
    print()
    print("/wait/ is bounded by requests served at once: a second app host doubles them. "
          "/compute/ is bounded by cores, which every test host shares here: expect x1 or "
          "less here, about x2 on two real hosts. Other engineers' tests on this machine make "
          "single numbers noisy; the ratios are of one run.")


if __name__ == "__main__":
    sys.exit(main())
