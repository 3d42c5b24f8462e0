"""Deploy times of the collection on one test host with 20 installations (issue 20), the way
an operator meets them: `ansible-playbook` over SSH with pipelining, from a warm wheelhouse.

    bash bench/run --deploy          # about 4 minutes on 2 cores
    bash bench/run --deploy --smoke  # 2 + 4 installations: CI's smoke run

One host: shop_prod (Django, PostgreSQL) and blog_prod (Flask) first, then 18 more Flask
installations on SQLite (6 DEV, 6 QUAL, 6 INT), timed; then the run that changes nothing,
with all 20; then the audit playbook and `check --all` on the host. Needs root, like the
deploy tests.
"""
import argparse
import json
import os
import re
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, "tests", "deploy"))
import test_deploy  # noqa: E402  (repos, wheelhouse, collection, playbook runner)
import testhosts  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="4 more installations, not 18")
    args = parser.parse_args(argv)
    many = [f"blog_{stage}{number}" for stage in "dqi" for number in range(1, 7)]
    many = many[:4] if args.smoke else many
    with tempfile.TemporaryDirectory(prefix="stagetools-bench-deploy-") as workdir:
        times = run(workdir, many)
    width = max(len(label) for label in times)
    print(f"\nstagetools.deploy on one test host ({os.cpu_count()} cores), "
          f"{len(many) + 2} installations:")
    for label, value in times.items():
        print(f"  {label:<{width}}  {value}")
    return 0


def run(workdir, many):
    """Boot a host, deploy, and time each run; returns label -> measured value."""
    times = {}
    testhosts.build_image()
    wheelhouse = test_deploy.cached_wheelhouse()
    repos = {name: test_deploy.make_repo(workdir, name + "_dev", framework)
             for name, framework in (("shop", "django"), ("blog", "flask"))}
    # No host names: no certificate to ask of an ACME server the host cannot reach.
    with open(os.path.join(repos["shop"], "stagetools.ini"), "w") as f:
        f.write("[stagetools]\nframework = django\n[prod]\ndatabase = postgresql\n")
    test_deploy.git(repos["shop"], "commit", "--quiet", "-am", "PROD on PostgreSQL, no names")
    collections = test_deploy.install_collection(workdir)
    with testhosts.TestHosts(os.path.join(workdir, "hosts"), wheelhouse=wheelhouse) as hosts:
        host, = hosts.boot(1)
        inventory = hosts.inventory(os.path.join(workdir, "inventory.ini"))
        first = [{"name": "shop_prod", "repo": repos["shop"]},
                 {"name": "blog_prod", "repo": repos["blog"]}]
        everyone = first + [{"name": name, "repo": repos["blog"]} for name in many]
        times["first deploy of shop_prod and blog_prod"] = timed(
            workdir, collections, inventory, host, first)
        times[f"first deploy of {len(many)} more (SQLite, warm wheelhouse)"] = timed(
            workdir, collections, inventory, host, everyone)
        times[f"no-op run, {len(everyone)} installations"] = timed(
            workdir, collections, inventory, host, everyone, changed=0)
        started = time.monotonic()
        rc, output, _ = test_deploy.playbook(workdir, collections, inventory, name="audit")
        assert rc == 0, output[-4000:]
        times["audit playbook"] = f"{time.monotonic() - started:.1f} s"
        check = ("/usr/bin/python3 -I /usr/local/lib/stagetools/stagetools.py check --all")
        os.makedirs(os.path.join(host.root, "usr/local/lib/stagetools"), exist_ok=True)
        with open(os.path.join(TOP, "stagetools.py")) as source, open(os.path.join(
                host.root, "usr/local/lib/stagetools/stagetools.py"), "w") as copy:
            copy.write(source.read())
        started = time.monotonic()
        lines = host.run(check).stdout.splitlines()
        times[f"check --all on the host ({len(lines)} installations)"] = \
            f"{time.monotonic() - started:.1f} s"
    return times


def timed(workdir, collections, inventory, host, installations, changed=None):
    """Seconds of one deploy run of ``installations``, as text; it must pass."""
    host_vars = os.path.join(workdir, "host_vars")
    os.makedirs(host_vars, exist_ok=True)
    with open(os.path.join(host_vars, host.name + ".json"), "w") as f:
        json.dump({"installation_list": [dict(entry, version="main") for entry in installations],
                   "installation_pip_env": test_deploy.PIP_ENV}, f)
    started = time.monotonic()
    rc, output, recap = test_deploy.playbook(workdir, collections, inventory, timeout=1800)
    seconds = time.monotonic() - started
    assert rc == 0, output[-4000:]
    if changed is not None:
        assert recap[host.name]["changed"] == changed, re.findall(r"^changed: .*$", output, re.M)
    return f"{seconds:.1f} s"


if __name__ == "__main__":
    sys.exit(main())
