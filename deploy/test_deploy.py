"""The Ansible collection, run for real against two Debian hosts that boot systemd.

Needs root, systemd-nspawn, mmdebstrap and ansible-playbook; without them the tests skip, except
in CI (STAGETOOLS_CI=1), where a skip is a failure.

    STAGETOOLS_CI=1 python -m pytest deploy/test_deploy.py
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import testhosts  # noqa: E402

# What the hosts' pip may install: downloaded once on the machine (the hosts have no network).
WHEELS = ["Django", "gunicorn", "uvicorn", "hypercorn", "Flask", "starlette", "itsdangerous",
          "psycopg[binary]", "setuptools", "wheel"]
TIMES = {}  # measured durations, printed at the end of the session


def _missing():
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, network namespaces)"
    for tool in ("systemd-nspawn", "mmdebstrap", "ansible-playbook", "ansible-galaxy"):
        if not shutil.which(tool):
            return "needs %s on PATH" % tool
    return None


if _missing():
    if os.environ.get("STAGETOOLS_CI") == "1":
        raise RuntimeError("CI must run the deploy tests: " + _missing())
    pytest.skip(_missing(), allow_module_level=True)


def timed(label):
    class Timer:
        def __enter__(self):
            self.started = time.monotonic()

        def __exit__(self, *exc):
            if exc[0] is None:
                TIMES[label] = time.monotonic() - self.started
    return Timer()


def sh(args, timeout=600, **kwargs):
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout,
                          **kwargs)


# -- the code to deploy: starter repos made by `stagetools.py new`, as git repositories

SHOP_SETTINGS = '''\
import aaa_env_setup
from stagetools_django import settings_defaults

# This project keeps QUAL and PROD on PostgreSQL and the other stages on SQLite.
globals().update(settings_defaults("sqlite" if aaa_env_setup.SYSTEM.is_debug else "postgresql"))
'''


def git(repo, *args):
    return sh(["git", "-C", repo, "-c", "user.name=test", "-c", "user.email=test@localhost"]
              + list(args)).stdout.strip()


def make_repo(workdir, name, framework):
    """`new` makes an installation on the machine; its src/<repo> becomes a git repository."""
    installation = os.path.join(workdir, "new", name)
    os.makedirs(os.path.dirname(installation), exist_ok=True)
    sh([sys.executable, os.path.join(TOP, "stagetools.py"), "new", installation,
        "--framework", framework])
    configuration = name.rsplit("_", 1)[0]
    repo = os.path.join(workdir, "repos", configuration)
    shutil.copytree(os.path.join(installation, "src", configuration), repo,
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    shutil.rmtree(installation)
    if configuration == "shop":
        with open(os.path.join(repo, "stagetools_project", "settings.py"), "w") as f:
            f.write(SHOP_SETTINGS)
        setup = os.path.join(repo, "setup.py")
        with open(setup) as f:
            text = f.read()
        with open(setup, "w") as f:
            f.write(text.replace('"hypercorn"]', '"hypercorn", "psycopg[binary]"]'))
    with open(os.path.join(repo, ".gitignore"), "w") as f:
        f.write("*.egg-info/\n__pycache__/\n")
    git(repo, "init", "--quiet", "--initial-branch=main")
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "starter of " + configuration)
    return repo


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="session")
def repos(workdir):
    jobs = {"shop": ("shop_dev", "django"), "blog": ("blog_dev", "flask"),
            "feed": ("feed_dev", "starlette")}
    with ThreadPoolExecutor(3) as pool:
        futures = {k: pool.submit(make_repo, workdir, *v) for k, v in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope="session")
def wheelhouse():
    """Wheels for the hosts, cached on the machine while the list stays the same."""
    key = testhosts.hashlib.sha256("\n".join(WHEELS).encode()).hexdigest()[:16]
    path = os.path.join(testhosts.CACHE_DIR, "wheelhouse-" + key)
    if not os.path.exists(os.path.join(path, "complete")):
        shutil.rmtree(path, ignore_errors=True)
        sh([sys.executable, "-m", "pip", "download", "--quiet", "--dest", path] + WHEELS)
        open(os.path.join(path, "complete"), "w").close()
    return path


@pytest.fixture(scope="session")
def hosts(workdir, wheelhouse):
    with timed("image (build or reuse)"):
        testhosts.build_image()
    with testhosts.TestHosts(os.path.join(workdir, "hosts"), wheelhouse=wheelhouse) as th:
        with timed("boot of two hosts"):
            th.boot(2)
        yield th


@pytest.fixture(scope="session")
def collections(workdir):
    """The collection installed as ansible-galaxy installs it (this also checks its layout)."""
    path = os.path.join(workdir, "collections")
    sh(["ansible-galaxy", "collection", "install", "--force", "-p", path, HERE])
    return path


INSTALLATIONS = {
    "host1": [
        {"name": "shop_prod", "repo": "shop", "framework": "django", "server": "gunicorn",
         "database": "postgresql"},
        {"name": "blog_prod", "repo": "blog", "framework": "flask", "server": "gunicorn"},
    ],
    "host2": [
        {"name": "shop_dev", "repo": "shop", "framework": "django", "server": "uvicorn"},
        {"name": "feed_qual", "repo": "feed", "framework": "starlette", "server": "hypercorn"},
    ],
}


@pytest.fixture(scope="session")
def inventory(workdir, hosts, repos):
    host_vars = os.path.join(workdir, "host_vars")
    os.makedirs(host_vars, exist_ok=True)
    for host, installations in INSTALLATIONS.items():
        listed = [dict(i, repo=repos[i["repo"]], version="main") for i in installations]
        with open(os.path.join(host_vars, host + ".json"), "w") as f:
            json.dump({"stagetools_installations": listed,
                       "stagetools_pip_env": {"PIP_NO_INDEX": "1",
                                              "PIP_FIND_LINKS": "/opt/wheelhouse"}}, f)
    return hosts.inventory(os.path.join(workdir, "inventory.ini"))


def playbook(workdir, collections, inventory, *args, timeout=900):
    """Run the collection's playbook; returns (returncode, output, recap per host)."""
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections, ANSIBLE_PIPELINING="1",
               ANSIBLE_FORKS="10", ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_NOCOLOR="1",
               ANSIBLE_RETRY_FILES_ENABLED="0")
    result = subprocess.run(["ansible-playbook", "-i", inventory, "stagetools.deploy.deploy"]
                            + list(args), capture_output=True, text=True, env=env,
                            timeout=timeout, cwd=workdir)
    output = result.stdout + result.stderr
    recap = {}
    for host, stats in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.M):
        recap[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", stats)}
    return result.returncode, output, recap


@pytest.fixture(scope="session")
def deployed(workdir, collections, inventory):
    with timed("first deploy (4 installations, 2 hosts)"):
        rc, output, recap = playbook(workdir, collections, inventory)
    assert rc == 0, output[-6000:]
    return recap


def test_first_deploy_changes_each_host(deployed):
    assert set(deployed) == {"host1", "host2"}
    for host, stats in deployed.items():
        assert stats["failed"] == 0 and stats["unreachable"] == 0, (host, stats)
        assert stats["changed"] > 0, (host, stats)


def test_second_run_changes_nothing(deployed, workdir, collections, inventory):
    with timed("no-op run"):
        rc, output, recap = playbook(workdir, collections, inventory)
    assert rc == 0, output[-6000:]
    changed = re.findall(r"^changed: .*$", output, re.M)
    for host, stats in recap.items():
        assert stats["changed"] == 0, (host, stats, changed)


def test_check_holds_for_each(deployed, hosts):
    for host in hosts.hosts:
        for installation in INSTALLATIONS[host.name]:
            name = installation["name"]
            repo_stagetools = "/home/%s/src/%s/stagetools.py" % (name, installation["repo"])
            result = host.run("/usr/bin/python3 -I %s check %s --json --framework %s --server %s"
                              % (repo_stagetools, name, installation["framework"],
                                 installation["server"]), check=False)
            assert result.returncode == 0, (host, name, result.stdout, result.stderr)
            assert json.loads(result.stdout)["ok"] is True


def test_each_answers_through_nginx(deployed, hosts):
    """From the machine to each host's own address, with the installation's Host name."""
    for host in hosts.hosts:
        for installation in INSTALLATIONS[host.name]:
            name = installation["name"]
            result = sh(["curl", "--silent", "--show-error", "--max-time", "20", "--noproxy", "*",
                         "-H", "Host: %s.localhost" % name.replace("_", "-"),
                         "http://%s/" % host.address])
            assert json.loads(result.stdout)["name"] == name, result.stdout


def test_shop_prod_uses_postgresql_by_peer_auth(deployed, hosts):
    host1 = hosts.hosts[0]
    result = host1.run("runuser -u postgres -- psql -XtAc \"select count(*) from pg_tables "
                       "where tableowner = 'shop_prod'\" shop_prod")
    assert int(result.stdout) > 5  # Django's and the app's tables, made by migrate


def test_private_files(deployed, hosts):
    host2 = hosts.hosts[1]
    result = host2.run("stat -c '%a %U' /home/shop_dev/secret_key /home/shop_dev/shop.sqlite "
                       "/home/feed_qual/secret_key /home/feed_qual/feed.sqlite")
    assert result.stdout.split("\n")[:4] == ["600 shop_dev", "600 shop_dev", "600 feed_qual",
                                             "600 feed_qual"], result.stdout


def test_zz_times(deployed):
    """Not a check: prints what was measured (pytest -s, or in the CI log with -rA)."""
    print()
    for label, seconds in TIMES.items():
        print("TIME %-45s %6.1f s" % (label, seconds))
