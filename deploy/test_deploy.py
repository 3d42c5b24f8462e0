"""The Ansible collection, run for real against two Debian hosts that boot systemd.

Needs root, systemd-nspawn, mmdebstrap and ansible-playbook; without them the tests skip, except
in CI (STAGETOOLS_CI=1), where a skip is a failure.

    STAGETOOLS_CI=1 python -m pytest deploy/test_deploy.py
"""
import json
import os
import re
import shutil
import signal
import http.client
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import testhosts  # noqa: E402

# What the hosts' pip may install: downloaded once on the machine (the hosts have no network).
WHEELS = ["Django", "gunicorn", "uvicorn", "hypercorn", "Flask", "starlette", "itsdangerous",
          "psycopg[binary]", "setuptools", "wheel",
          # for test_local_connection: ansible-core run on a host itself
          "ansible-core>=2.15,<2.19"]
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


# -- the harness

def traces(where):
    """Our namespaces, interfaces, mounts below ``where`` on the machine, nspawn processes."""
    netns = run_text(["ip", "netns", "list"])
    links = [line for line in run_text(["ip", "-o", "link"]).splitlines() if ": stt" in line]
    with open("/proc/self/mountinfo") as f:
        mounts = [line for line in f if str(where) in line]
    nspawn = run_text(["pgrep", "-a", "systemd-nspawn"], check=False)
    return netns, links, mounts, nspawn


def run_text(args, check=True):
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30).stdout


def test_hosts_leave_nothing_behind(tmp_path, wheelhouse):
    """A host that boots, and one whose start fails: afterwards nothing of either is left."""
    before = traces(tmp_path)
    with pytest.raises(RuntimeError, match="systemd-nspawn exited"):
        # nspawn refuses a bind mount of a missing directory: the start fails.
        with testhosts.TestHosts(str(tmp_path / "broken"), wheelhouse=str(tmp_path / "no")) as th:
            th.boot(1)
    assert traces(tmp_path) == before
    assert not (tmp_path / "broken").exists()
    with testhosts.TestHosts(str(tmp_path / "one"), wheelhouse=wheelhouse) as th:
        host, = th.boot(1)
        assert host.run("systemctl is-system-running").stdout.strip() == "running"
        assert host.run("hostname").stdout.strip() == "host1"
        assert traces(tmp_path) != before
    assert traces(tmp_path) == before
    assert not (tmp_path / "one").exists()


# -- the code to deploy: starter repos made by `stagetools.py new`, as git repositories

# What each repo declares: the shop code runs its PROD installations on PostgreSQL and its
# DEV on uvicorn; the feed code runs on hypercorn.
DECLARATIONS = {
    "shop": "[stagetools]\nframework = django\nserver = gunicorn\ndatabase = sqlite\n"
            "[prod]\ndatabase = postgresql\n[dev]\nserver = uvicorn\n",
    "blog": "[stagetools]\nframework = flask\n",
    "feed": "[stagetools]\nframework = starlette\nserver = hypercorn\n",
}


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
    with open(os.path.join(repo, "stagetools.ini"), "w") as f:
        f.write(DECLARATIONS[configuration])
    if configuration == "shop":
        # The shop code says it is the shop repo, so a customer configuration (acme_prod)
        # running it resolves the same core_repo as its deployment.
        env_setup = os.path.join(repo, "aaa_env_setup.py")
        with open(env_setup) as f:
            text = f.read()
        assert "get_actual_system_from_name()" in text, text
        with open(env_setup, "w") as f:
            f.write(text.replace("get_actual_system_from_name()",
                                 'get_actual_system_from_name(core_repo="shop")'))
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
        # a customer configuration running the shop code
        {"name": "acme_prod", "repo": "shop", "core_repo": "shop", "framework": "django",
         "server": "gunicorn", "database": "postgresql"},
    ],
}


def write_host_vars(workdir, repos, versions=None, extra=()):
    """host_vars/<host>.json: each host's installations, at `versions[name]` or main;
    `extra` adds installations to host1."""
    host_vars = os.path.join(workdir, "host_vars")
    os.makedirs(host_vars, exist_ok=True)
    for host, installations in INSTALLATIONS.items():
        installations = installations + (list(extra) if host == "host1" else [])
        # The repos declare framework, server and database: the inventory says none of them.
        listed = [dict({key: value for key, value in i.items()
                        if key not in ("framework", "server", "database")},
                       repo=repos[i["repo"]], version=(versions or {}).get(i["name"], "main"))
                  for i in installations]
        with open(os.path.join(host_vars, host + ".json"), "w") as f:
            json.dump({"stagetools_installations": listed,
                       "stagetools_pip_env": {"PIP_NO_INDEX": "1",
                                              "PIP_FIND_LINKS": "/opt/wheelhouse"}}, f)


@pytest.fixture(scope="session")
def inventory(workdir, hosts, repos):
    write_host_vars(workdir, repos)
    return hosts.inventory(os.path.join(workdir, "inventory.ini"))


def playbook(workdir, collections, inventory, *args, timeout=900, name="deploy"):
    """Run one of the collection's playbooks; returns (returncode, output, recap per host)."""
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections, ANSIBLE_PIPELINING="1",
               ANSIBLE_FORKS="10", ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_NOCOLOR="1",
               ANSIBLE_RETRY_FILES_ENABLED="0")
    # Its own session: on a timeout its forked workers go too, not only ansible-playbook.
    process = subprocess.Popen(["ansible-playbook", "-i", inventory, "stagetools.deploy." + name]
                               + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, cwd=workdir, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
        raise
    recap = {}
    for host, stats in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.M):
        recap[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", stats)}
    return process.returncode, output, recap


@pytest.fixture(scope="session")
def deployed(workdir, collections, inventory):
    with timed("first deploy (5 installations, 2 hosts)"):
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
    assert set(recap) == {"host1", "host2"}, output[-3000:]
    for host, stats in recap.items():
        assert stats["changed"] == 0, (host, stats, changed)


def test_check_holds_for_each(deployed, hosts):
    for host in hosts.hosts:
        for installation in INSTALLATIONS[host.name]:
            name = installation["name"]
            repo_stagetools = "/home/%s/src/%s/stagetools.py" % (name, installation["repo"])
            options = " --core-repo shop" if "core_repo" in installation else ""
            result = host.run("/usr/bin/python3 -I %s check %s --json%s"
                              % (repo_stagetools, name, options), check=False)
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


def check_json(host, name, repo):
    """check NAME with no other flag: the repo declares the rest."""
    result = host.run("/usr/bin/python3 -I /home/%s/src/%s/stagetools.py check %s --json"
                      % (name, repo, name), check=False)
    return result.returncode, result.stdout + result.stderr


def test_check_mode_reports_nothing_to_change(deployed, workdir, collections, inventory):
    rc, output, recap = playbook(workdir, collections, inventory, "--check", "--diff")
    assert rc == 0, output[-6000:]
    assert set(recap) == {"host1", "host2"}, output[-3000:]
    for host, stats in recap.items():
        assert stats["changed"] == 0, (host, stats, re.findall(r"^changed: .*$", output, re.M))


# -- upgrades of shop_prod: new commits on branches of the shop repo

MIGRATION_0002 = """from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]
    operations = [
        migrations.CreateModel(name="Tag", fields=[
            ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                       verbose_name="ID")),
            ("name", models.CharField(max_length=50)),
        ]),
    ]
"""

# Not atomic: the table it makes first stays when it fails, as a half-applied migration's
# would; only the role's restore of the backup takes it away again.
MIGRATION_0003_FAILS = """from django.db import migrations, models


def fail(apps, schema_editor):
    raise RuntimeError("this migration fails on purpose")


class Migration(migrations.Migration):
    atomic = False
    dependencies = [("shop", "0002_tag")]
    operations = [
        migrations.CreateModel(name="Leftover", fields=[
            ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                       verbose_name="ID")),
        ]),
        migrations.RunPython(fail),
    ]
"""


def commit_on_branch(repo, branch, base, files, message):
    git(repo, "checkout", "--quiet", "-b", branch, base)
    for path, text in files.items():
        with open(os.path.join(repo, path), "a" if path.endswith("models.py") else "w") as f:
            f.write(text)
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", message)
    commit = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "--quiet", "main")
    return commit


@pytest.fixture(scope="session")
def versions(repos):
    shop = repos["shop"]
    v2 = commit_on_branch(shop, "v2", "main", {
        "shop/models.py": "\n\nclass Tag(models.Model):\n    name = models.CharField(max_length=50)\n",
        "shop/migrations/0002_tag.py": MIGRATION_0002}, "Tags, with their migration")
    bad_migration = commit_on_branch(shop, "bad-migration", "v2", {
        "shop/migrations/0003_fails.py": MIGRATION_0003_FAILS}, "A migration that fails")
    bad_health = commit_on_branch(shop, "bad-health", "v2", {
        "shop/views.py": open(os.path.join(shop, "shop", "views.py")).read()
        + "\n\ndef home(request):  # broken on purpose\n    raise RuntimeError('broken')\n"},
        "A home page that fails")
    return {"v2": v2, "bad-migration": bad_migration, "bad-health": bad_health}


class Load:
    """N clients asking one installation through nginx, counting failed requests."""

    def __init__(self, address, host_header, path="/notes/", clients=8):
        self.address, self.host_header, self.path, self.clients = (
            address, host_header, path, clients)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.requests = self.failed = 0
        self.longest = 0.0
        self.errors = []

    def client(self):
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                connection = http.client.HTTPConnection(self.address, 80, timeout=30)
                connection.request("GET", self.path, headers={"Host": self.host_header})
                response = connection.getresponse()
                response.read()
                connection.close()
                ok, error = response.status == 200, "status %d" % response.status
            except OSError as exc:
                ok, error = False, repr(exc)
            with self.lock:
                self.requests += 1
                self.longest = max(self.longest, time.monotonic() - started)
                if not ok:
                    self.failed += 1
                    self.errors.append(error)

    def __enter__(self):
        self.threads = [threading.Thread(target=self.client, daemon=True)
                        for _ in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def deployed_commit(host, name, repo):
    return host.run("git -c safe.directory='*' -C /home/%s/src/%s rev-parse HEAD"
                    % (name, repo)).stdout.strip()


def test_upgrade_under_load(deployed, workdir, collections, inventory, repos, versions, hosts):
    host1 = hosts.hosts[0]
    write_host_vars(workdir, repos, {"shop_prod": "v2"})
    with Load(host1.address, "shop-prod.localhost") as load:
        time.sleep(1)
        with timed("upgrade of shop_prod under load (8 clients)"):
            rc, output, recap = playbook(workdir, collections, inventory, "--limit", "host1")
        time.sleep(1)
    TIMES["upgrade: requests / failed / longest (s)"] = "%d / %d / %.2f" % (
        load.requests, load.failed, load.longest)
    assert rc == 0, output[-6000:]
    assert load.requests > 50, load.requests
    assert load.failed == 0, (load.failed, load.requests, load.errors[:5])
    assert deployed_commit(host1, "shop_prod", "shop") == versions["v2"]
    tables = host1.run("runuser -u postgres -- psql -XtAc \"select count(*) from pg_tables "
                       "where tablename = 'shop_tag'\" shop_prod").stdout.strip()
    assert tables == "1"
    backups = host1.run("stat -c '%a %U %n' /home/shop_prod/backups /home/shop_prod/backups/*")
    lines = backups.stdout.splitlines()
    assert lines[0].startswith("700 shop_prod ") and len(lines) == 2, lines
    assert lines[1].startswith("600 shop_prod ") and lines[1].endswith(".pgdump"), lines
    assert check_json(host1, "shop_prod", "shop")[0] == 0


@pytest.mark.parametrize("branch, step", [("bad-migration", "migrate"),
                                          ("bad-health", "health gate")])
def test_failed_upgrade_rolls_back(branch, step, deployed, workdir, collections, inventory,
                                   repos, versions, hosts):
    host1 = hosts.hosts[0]
    write_host_vars(workdir, repos, {"shop_prod": "v2"})
    rc, output, recap = playbook(workdir, collections, inventory, "--limit", "host1")
    assert rc == 0, output[-6000:]  # v2 serves (after test_upgrade_under_load, or now)
    write_host_vars(workdir, repos, {"shop_prod": branch})
    with timed("failed upgrade (%s) with rollback" % branch):
        rc, output, recap = playbook(workdir, collections, inventory, "--limit", "host1")
    write_host_vars(workdir, repos, {"shop_prod": "v2"})
    assert rc != 0
    assert re.search(r"shop_prod: deploying %s \(\w+\)\s+failed at step 'shop_prod: %s"
                     % (branch, step), output), output[-6000:]
    assert "rolled back to %s" % versions["v2"][:12] in output
    assert deployed_commit(host1, "shop_prod", "shop") == versions["v2"]
    answer = sh(["curl", "--silent", "--fail", "--max-time", "20", "--noproxy", "*",
                 "-H", "Host: shop-prod.localhost", "http://%s/" % host1.address])
    assert json.loads(answer.stdout)["name"] == "shop_prod"
    assert check_json(host1, "shop_prod", "shop")[0] == 0
    migrations = host1.run("runuser -u postgres -- psql -XtAc \"select name from "
                           "django_migrations where app = 'shop' order by name\" shop_prod")
    assert migrations.stdout.split() == ["0001_initial", "0002_tag"]
    leftover = host1.run("runuser -u postgres -- psql -XtAc \"select count(*) from pg_tables "
                         "where tablename = 'shop_leftover'\" shop_prod")
    assert leftover.stdout.strip() == "0"  # the backup was restored, not only the code


def test_faults_are_repaired(deployed, workdir, collections, inventory, repos, hosts):
    """A unit edited, the key file made readable, the socket disabled: one run repairs all."""
    host2 = hosts.hosts[1]
    write_host_vars(workdir, repos)
    host2.run("sed -i 's/^Restart=on-failure/Restart=no/' /etc/systemd/system/shop_dev.service"
              " && chmod 644 /home/shop_dev/secret_key"
              " && systemctl disable --now feed_qual.socket feed_qual.service"
              " && systemctl daemon-reload")
    assert check_json(host2, "shop_dev", "shop")[0] == 1
    rc, output, recap = playbook(workdir, collections, inventory, "--limit", "host2")
    assert rc == 0, output[-6000:]
    assert recap["host2"]["changed"] > 0
    assert check_json(host2, "shop_dev", "shop")[0] == 0
    assert check_json(host2, "feed_qual", "feed")[0] == 0
    assert host2.run("systemctl is-enabled feed_qual.socket").stdout.strip() == "enabled"
    for name in ("shop_dev", "feed_qual"):
        answer = sh(["curl", "--silent", "--fail", "--max-time", "20", "--noproxy", "*",
                     "-H", "Host: %s.localhost" % name.replace("_", "-"),
                     "http://%s/" % host2.address])
        assert json.loads(answer.stdout)["name"] == name


def test_local_connection(deployed, hosts, repos, collections, wheelhouse):
    """The same playbook, run on a host by itself with ansible_connection=local, with the code
    from a git URL."""
    host2 = hosts.hosts[1]
    shutil.copytree(os.path.join(collections, "ansible_collections"),
                    os.path.join(host2.root, "opt/collections/ansible_collections"))
    shutil.copytree(repos["blog"], os.path.join(host2.root, "srv/git/blog"))
    with open(os.path.join(host2.root, "srv/installations.json"), "w") as f:
        json.dump({"stagetools_installations": [
            # a URL the host fetches itself (a path would be sent from the "controller")
            {"name": "blog_dev", "repo": "file:///srv/git/blog", "version": "main",
             "framework": "flask", "server": "gunicorn"}],
            "stagetools_pip_env": {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/opt/wheelhouse"}}, f)
    host2.run("python3 -m venv /opt/ansible && /opt/ansible/bin/pip install --quiet --no-index"
              " --find-links /opt/wheelhouse 'ansible-core>=2.15,<2.19'", timeout=300)
    command = ("cd /srv && ANSIBLE_COLLECTIONS_PATH=/opt/collections ANSIBLE_NOCOLOR=1 "
               "/opt/ansible/bin/ansible-playbook -i localhost, -c local "
               "-e @/srv/installations.json stagetools.deploy.deploy")
    with timed("local connection: first deploy of blog_dev"):
        first = host2.run(command, timeout=600, check=False)
    assert first.returncode == 0, (first.stdout + first.stderr)[-6000:]
    second = host2.run(command, timeout=600, check=False)
    assert second.returncode == 0, (second.stdout + second.stderr)[-6000:]
    assert re.search(r"^localhost\s+: ok=\d+\s+changed=0 ", second.stdout, re.M), second.stdout[-3000:]
    answer = sh(["curl", "--silent", "--fail", "--max-time", "20", "--noproxy", "*",
                 "-H", "Host: blog-dev.localhost", "http://%s/" % host2.address])
    assert json.loads(answer.stdout)["name"] == "blog_dev"


# 18 more Flask installations beside shop_prod and blog_prod: a host with 20.
MANY = [{"name": "blog_%s%d" % (stage, number), "repo": "blog", "framework": "flask",
         "server": "gunicorn"} for stage in "dqi" for number in range(1, 7)]


def test_audit_of_a_host_with_20_installations(deployed, workdir, collections, inventory,
                                               repos, versions, hosts):
    host1 = hosts.hosts[0]
    write_host_vars(workdir, repos, {"shop_prod": "v2"}, extra=MANY)
    try:
        with timed("deploy of 18 more installations"):
            rc, output, recap = playbook(workdir, collections, inventory, "--limit", "host1",
                                         timeout=1800)
        assert rc == 0, output[-6000:]
    finally:
        write_host_vars(workdir, repos, {"shop_prod": "v2"})
    with timed("audit playbook, host of 20"):
        rc, output, recap = playbook(workdir, collections, inventory, "--limit", "host1",
                                     name="audit")
    assert rc == 0, output[-6000:]
    lines = re.findall(r'"(\S+)\s+all (\d+) checks hold', output)
    assert {name for name, _ in lines} >= {"shop_prod", "blog_prod"} | {m["name"] for m in MANY}
    assert len(lines) >= 20
    # The audit itself, on the host: `check --all` from root's mirror of a deployed commit.
    started = time.monotonic()
    result = host1.run("git --git-dir /var/lib/stagetools-deploy/shop_prod.git show "
                       "refs/stagetools/deployed:stagetools.py | /usr/bin/python3 -I - check --all",
                       check=False)
    TIMES["check --all on the host (%d installations)" % len(result.stdout.splitlines())] = (
        time.monotonic() - started)
    assert result.returncode == 0, result.stdout + result.stderr
    # A fault shows as one line that names it, and the audit fails.
    host1.run("chmod 644 /home/blog_d1/secret_key")
    try:
        rc, output, recap = playbook(workdir, collections, inventory, "--limit", "host1",
                                     name="audit")
    finally:
        host1.run("chmod 600 /home/blog_d1/secret_key")
    assert rc != 0
    assert re.search(r'"blog_d1\s+1 of \d+ checks differ: secret_key_path mode', output), \
        output[-3000:]
