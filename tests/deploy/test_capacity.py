"""Capacity on a real host (issue 15): workers by stage, a slow request that holds up no other,
DEV installations that stop when idle and answer the next request, PROD that never stops.

One test host (systemd-nspawn, tests/deploy/testhosts.py) with four installations of one Django
repo, deployed by the collection. Needs what tests/deploy/test_deploy.py needs, and skips likewise.

    STAGETOOLS_CI=1 python -m pytest tests/deploy/test_capacity.py
"""
import json
import os
import re
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hostbench  # noqa: E402  (imports test_deploy: the same skip when tools are missing)

IDLE_STOP = 5  # seconds: DEV's idle_stop here (900 by default)
DECLARATION = f"""[stagetools]
framework = django
server = gunicorn
[dev]
idle_stop = {IDLE_STOP}
[shop_p2]
server = uvicorn
[shop_p3]
server = hypercorn
"""
SERVER_OF = {"shop_prod": "gunicorn", "shop_p2": "uvicorn", "shop_p3": "hypercorn",
             "shop_dev": "gunicorn"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("capacity"))
    with hostbench.Deployment(workdir, DECLARATION, list(SERVER_OF)) as deployment:
        yield deployment


def cores(site):
    return int(site.host.run("/usr/bin/python3 -c 'import os; print(os.cpu_count())'").stdout)


def started_in_threads(count, ask):
    """``count`` threads each calling ``ask()``; join() gives each answer, or its exception,
    and fails if a thread is still running after the bound."""
    answers = []

    def keep():
        try:
            answers.append(ask())
        except Exception as error:  # shown by the assertion, not lost in the thread
            answers.append(error)

    threads = [threading.Thread(target=keep, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()

    def join(seconds=60):
        deadline = time.monotonic() + seconds
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in threads), "a request did not return"
        return answers
    return join


def test_check_holds_and_units_carry_the_workers(site):
    """Each of the three servers runs its workers on systemd's socket; check holds."""
    prod_workers = min(2 * cores(site) + 1, 12)
    for name, server in SERVER_OF.items():
        result = site.host.run("/usr/bin/python3 -I /home/%s/src/shop/stagetools.py check %s "
                               "--json" % (name, name), check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["ok"]
        status, _, body = site.get(name, "/")
        assert status == 200 and json.loads(body)["name"] == name
        unit = site.host.run("cat /etc/systemd/system/%s.service" % name).stdout
        workers = prod_workers if name != "shop_dev" else 1
        assert re.search(r"^ExecStart=/home/%s/bin/%s .*--workers %d\b" % (name, server, workers),
                         unit, re.M), unit
        # the server's own processes: a master or supervisor and its workers
        assert len(site.processes(name)) >= workers + (workers > 1), (name, site.processes(name))


def test_slow_request_on_prod_holds_up_no_fast_one(site):
    """While slow requests wait 5 s, one in every worker, another is answered at once
    (gunicorn, PROD defaults: its threads): sync workers, or one, would hold it up."""
    workers = min(2 * cores(site) + 1, 12)
    join = started_in_threads(workers, lambda: site.get("shop_prod", "/io/?s=5"))
    time.sleep(0.5)  # the slow ones are in the workers now
    status, seconds, _ = site.get("shop_prod", "/")
    slow = join(30)
    assert status == 200 and seconds < 1.0, seconds
    assert all(not isinstance(answer, Exception) and answer[0] == 200 and answer[1] >= 5
               for answer in slow), slow


# What systemd says inside an nspawn container only: no loopback setup for PrivateNetwork=,
# no kill through the container's cgroup; the units work all the same.
CONTAINER_ONLY = re.compile(r"Failed to configure loopback network device|"
                            r"Failed to kill control group")


def journal_problems(site, since):
    result = site.host.run("journalctl -q --no-pager --since @%d -u 'shop_dev*' "
                           "-u 'shop_prod*'" % since, check=False)
    problems = [line for line in result.stdout.splitlines()
                if re.search(r"error|fail|traceback", line, re.I)
                and not CONTAINER_ONLY.search(line)]
    nginx = site.host.run("cat /var/log/nginx/error.log", check=False).stdout
    return "\n".join(problems), nginx.strip()


def test_idle_dev_stops_and_answers_the_next_request_prod_never_stops(site):
    started = int(time.time())
    prod_pid = site.main_pid("shop_prod.service")
    status, _, _ = site.get("shop_dev", "/")
    assert status == 200 and site.active("shop_dev.service") == "active"
    waited = site.wait_until_stopped("shop_dev", IDLE_STOP + 30)
    assert waited is not None, "shop_dev did not stop when idle"
    assert site.active("shop_dev-proxy.service") == "inactive", site.host.run(
        "systemctl status shop_dev-proxy.service; journalctl -q --no-pager -n 30 "
        "-u shop_dev-proxy.service -u shop_dev.service", check=False).stdout
    assert site.active("shop_dev.socket") == "active"  # nginx's socket stays with systemd
    status, seconds, body = site.get("shop_dev", "/")
    assert status == 200 and json.loads(body)["name"] == "shop_dev", body
    print("first request after the idle stop: %.2f s" % seconds)
    assert site.active("shop_dev.service") == "active"
    # PROD, idle as long, still runs the same process.
    time.sleep(2)
    assert site.active("shop_prod.service") == "active"
    assert site.main_pid("shop_prod.service") == prod_pid
    journal, nginx_errors = journal_problems(site, started)
    assert nginx_errors == "", nginx_errors
    assert journal == "", journal


def test_many_first_requests_at_once_are_all_answered(site):
    """Requests that arrive while a stopped DEV starts: each waits in the socket, none drops."""
    assert site.wait_until_stopped("shop_dev", IDLE_STOP + 30) is not None
    answers = started_in_threads(8, lambda: site.get("shop_dev", "/notes/"))(60)
    assert [answer if isinstance(answer, Exception) else answer[0]
            for answer in answers] == [200] * 8


def test_second_run_changes_nothing(site):
    recap = site.deploy()
    assert recap[site.host.name]["changed"] == 0, recap
