"""One test host with installations of one Django repo, deployed by the collection: the
harness of the capacity tests (tests/deploy/test_capacity.py) and benchmark (bench/host.py).

The repo is the `new` starter of test_deploy.py with two more pages: /cpu/ computes for about
10 ms, /io/ sleeps (0.1 s, or ?s=SECONDS) as a view waiting on a slow query would.
Load comes from the machine (wrk) to the host's nginx over the veth.
"""
import http.client
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_deploy  # noqa: E402  (its repo maker, wheel list and playbook runner)
import testhosts  # noqa: E402

VIEWS = '''

import time


def cpu(request):
    """About 10 ms of Python: a CPU-bound page."""
    return JsonResponse({"sum": sum(i * i for i in range(60_000))})


def io(request):
    """A page that waits, as on a slow query: 0.1 s, or ?s=SECONDS."""
    seconds = min(float(request.GET.get("s", "0.1")), 30.0)
    time.sleep(seconds)
    return JsonResponse({"slept": seconds, "pid": os.getpid()})
'''
URLS = '\nurlpatterns += [path("cpu/", views.cpu), path("io/", views.io)]\n'


def shop_repo(workdir, declaration):
    """The shop repo (git) with the benchmark pages and ``declaration`` as its stagetools.ini."""
    repo = test_deploy.make_repo(workdir, "shop_dev", "django")
    with open(os.path.join(repo, "shop", "views.py"), "a") as f:
        f.write(VIEWS)
    with open(os.path.join(repo, "shop", "urls.py"), "a") as f:
        f.write(URLS)
    with open(os.path.join(repo, "stagetools.ini"), "w") as f:
        f.write(declaration)
    test_deploy.git(repo, "commit", "--quiet", "-am", "capacity pages and declaration")
    return repo


class Deployment:
    """One booted host with the named installations of the shop repo, deployed by the role."""

    def __init__(self, workdir, declaration, names, log=print):
        self.workdir, self.declaration, self.names, self.log = workdir, declaration, names, log
        self.times = {}

    def __enter__(self):
        started = time.monotonic()
        testhosts.build_image(log=self.log)
        self.testhosts = testhosts.TestHosts(os.path.join(self.workdir, "hosts"),
                                             wheelhouse=test_deploy.cached_wheelhouse(),
                                             log=self.log)
        self.testhosts.__enter__()
        try:
            self.host, = self.testhosts.boot(1)
            self.times["image and boot"] = time.monotonic() - started
            self.repo = shop_repo(self.workdir, self.declaration)
            self.collections = test_deploy.install_collection(self.workdir)
            self.inventory = self.testhosts.inventory(os.path.join(self.workdir, "inventory.ini"))
            started = time.monotonic()
            self.deploy()
            self.times["deploy of %d installations" % len(self.names)] = (
                time.monotonic() - started)
        except BaseException:
            self.testhosts.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc):
        return self.testhosts.__exit__(*exc)

    def deploy(self, *args):
        host_vars = os.path.join(self.workdir, "host_vars")
        os.makedirs(host_vars, exist_ok=True)
        listed = [{"name": name, "repo": self.repo, "version": "main"} for name in self.names]
        with open(os.path.join(host_vars, self.host.name + ".json"), "w") as f:
            json.dump({"installation_list": listed, "installation_pip_env": test_deploy.PIP_ENV},
                      f)
        rc, output, recap = test_deploy.playbook(self.workdir, self.collections, self.inventory,
                                                 *args, timeout=1800)
        if rc != 0:
            raise RuntimeError("deploy failed:\n" + output[-6000:])
        return recap

    # -- what the host does
    def get(self, name, path="/", timeout=60):
        """(status, seconds, body) of one GET through the host's nginx."""
        started = time.monotonic()
        connection = http.client.HTTPConnection(self.host.address, 80, timeout=timeout)
        try:
            connection.request("GET", path, headers={"Host": host_name(name)})
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        return response.status, time.monotonic() - started, body

    def active(self, unit):
        return self.host.run("systemctl is-active %s" % unit, check=False).stdout.strip()

    def main_pid(self, unit):
        return int(self.host.run("systemctl show -p MainPID --value %s" % unit).stdout)

    def processes(self, name):
        """PIDs of the installation's service and idle proxy: main processes and descendants."""
        mains = self.host.run("systemctl show -p MainPID --value %s.service %s-proxy.service"
                              % (name, name), check=False).stdout.split()
        found = {int(pid) for pid in mains if pid.isdigit() and pid != "0"}
        table = self.host.run("ps -e -o pid=,ppid=").stdout.split()
        parents = dict(zip(map(int, table[0::2]), map(int, table[1::2])))
        grew = True
        while grew:
            more = {pid for pid, ppid in parents.items() if ppid in found} - found
            found |= more
            grew = bool(more)
        return sorted(found)

    def rss_kib(self, names):
        """Sum of the resident set sizes of the installations' processes, KiB."""
        pids = [pid for name in names for pid in self.processes(name)]
        if not pids:
            return 0
        result = self.host.run("ps -o rss= -p %s" % ",".join(map(str, pids)), check=False)
        return sum(int(value) for value in result.stdout.split())

    def wait_until_stopped(self, name, timeout):
        """Seconds until NAME.service is inactive (idle stop), or None."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.active(name + ".service") in ("inactive", "failed"):
                return time.monotonic() - started
            time.sleep(0.5)
        return None


def host_name(name):
    return name.replace("_", "-") + ".localhost"


def wrk(address, name, path, seconds, connections, threads=2):
    """(requests per second, 99th percentile latency in ms, non-2xx or socket errors) of wrk
    against the host's nginx."""
    result = subprocess.run(
        ["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % seconds, "--latency",
         "--timeout", "30s", "-H", "Host: " + host_name(name),
         "http://%s%s" % (address, path)], capture_output=True, text=True,
        timeout=seconds + 60)
    out = result.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if result.returncode != 0 or not rps or not p99 or float(rps.group(1)) == 0:
        raise RuntimeError("wrk %s%s gave no rate and 99th percentile (exit %d): %s"
                           % (host_name(name), path, result.returncode,
                              (result.stderr or out).strip()[-500:]))
    rps = float(rps.group(1))
    value, unit = p99.groups()
    p99 = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)",
                    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"):
        match = re.search(pattern, out)
        if match:
            errors += sum(int(group) for group in match.groups())
    return rps, p99, errors
