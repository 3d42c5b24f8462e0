"""The Ansible collection, run for real against two Debian hosts that boot systemd.

Needs root, systemd-nspawn, mmdebstrap and ansible-playbook; without them the tests skip, except
in CI (STAGETOOLS_CI=1), where a skip is a failure.

    STAGETOOLS_CI=1 python -m pytest tests/deploy/test_deploy.py
"""
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import http.client
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
COLLECTION = os.path.join(TOP, "deploy")
sys.path.insert(0, HERE)
import acme  # noqa: E402
import browser  # noqa: E402
import testhosts  # noqa: E402

# What the hosts' pip may install: downloaded once on the machine (the hosts have no network).
WHEELS = ["Django", "gunicorn", "uvicorn", "hypercorn", "Flask", "starlette", "itsdangerous",
          "psycopg[binary]", "setuptools", "wheel",
          # for test_local_connection: ansible-core run on a host itself
          "ansible-core>=2.19,<2.20"]
TIMES = {}  # measured durations, printed at the end of the session


def _missing():
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, network namespaces)"
    for tool in ("systemd-nspawn", "mmdebstrap", "ansible-playbook", "ansible-galaxy",
                 "pebble", "pebble-challtestsrv", "openssl", "certutil", browser.CHROMIUM):
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
# DEV on uvicorn; the feed code runs on hypercorn. Host names: shop_prod and feed_qual serve
# HTTPS with certificates from pebble; shop_dev, a DEV, keeps plain HTTP with its name.
DECLARATIONS = {
    "shop": "[stagetools]\nframework = django\nserver = gunicorn\ndatabase = sqlite\n"
            "[prod]\ndatabase = postgresql\n[qual]\ndatabase = postgresql\n"
            "[dev]\nserver = uvicorn\n"
            "[shop_prod]\nhost_names = shop.test www.shop.test\n"
            "[shop_dev]\nhost_names = dev.shop.test\n",
    "blog": "[stagetools]\nframework = flask\n",
    "feed": "[stagetools]\nframework = starlette\nserver = hypercorn\n"
            "[feed_qual]\nhost_names = feed.test\n",
    "evil": "[stagetools]\nframework = flask\n",
    "library": "[stagetools]\nframework = flask\ncore_app = books\n",
}
HOST_NAMES = {"shop_prod": ["shop.test", "www.shop.test"], "shop_dev": ["dev.shop.test"],
              "feed_qual": ["feed.test"]}
HTTPS = {"shop_prod", "feed_qual"}
# Set by the acme fixture: the ACME server for the hosts' inventory, pebble's root.
ACME = {}


# A repo that tries to act as root: its stagetools.py and aaa_env_setup.py, whenever they are
# imported, write a marker named by the uid that runs them and try to write to /etc; its
# stagetools.py renders the unit with User=root and resolves static_dir to /etc.
HOSTILE_STAGETOOLS = """

def _hostile(what):
    for path in ("/etc/stagetools-%s" % what,
                 "/home/evil_prod/marker-%s-%d" % (what, os.geteuid())):
        try:
            with open(path, "w") as file:
                file.write("x")
        except OSError:
            pass


_hostile("stagetools")
# The unit's template is in the text of the part compiled on first use (_REST).
_REST = _REST.replace("${identity}", "User=root\\n${identity}")
_original_build_system = _build_system


def _build_system(*args, **kwargs):
    system = _original_build_system(*args, **kwargs)
    return System(**dict(system._complete(), static_dir="/etc"))
"""
HOSTILE_ENV_SETUP = """
import stagetools  # noqa: E402
stagetools._hostile("aaa_env_setup")
"""


def git(repo, *args):
    return sh(["git", "-C", repo, "-c", "user.name=test", "-c", "user.email=test@localhost"]
              + list(args)).stdout.strip()


def make_repo(workdir, name, framework, *options):
    """`new` makes an installation on the machine; its src/<repo> becomes a git repository."""
    installation = os.path.join(workdir, "new", name)
    os.makedirs(os.path.dirname(installation), exist_ok=True)
    sh([sys.executable, os.path.join(TOP, "stagetools.py"), "new", installation,
        "--framework", framework, *options])
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
    if configuration == "evil":
        with open(os.path.join(repo, "stagetools.py"), "a") as f:
            f.write(HOSTILE_STAGETOOLS)
        with open(os.path.join(repo, "aaa_env_setup.py"), "a") as f:
            f.write(HOSTILE_ENV_SETUP)
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
            "feed": ("feed_dev", "starlette"), "evil": ("evil_dev", "flask"),
            # its package is not named like the repo: core_app = books, declared
            "library": ("library_dev", "flask", "--core-app", "books")}
    with ThreadPoolExecutor(3) as pool:
        futures = {k: pool.submit(make_repo, workdir, *v) for k, v in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def cached_wheelhouse(wheels=WHEELS):
    """Wheels for the hosts, cached on the machine while the list stays the same."""
    key = testhosts.hashlib.sha256("\n".join(wheels).encode()).hexdigest()[:16]
    path = os.path.join(testhosts.CACHE_DIR, "wheelhouse-" + key)
    if not os.path.exists(os.path.join(path, "complete")):
        shutil.rmtree(path, ignore_errors=True)
        sh([sys.executable, "-m", "pip", "download", "--quiet", "--dest", path] + wheels)
        open(os.path.join(path, "complete"), "w").close()
    return path


@pytest.fixture(scope="session")
def wheelhouse():
    return cached_wheelhouse()


@pytest.fixture(scope="session")
def hosts(workdir, wheelhouse):
    with timed("image (build or reuse)"):
        testhosts.build_image()
    with testhosts.TestHosts(os.path.join(workdir, "hosts"), wheelhouse=wheelhouse) as th:
        with timed("boot of two hosts"):
            th.boot(2)
        yield th


def install_collection(workdir):
    """The collection built and installed as users get it (a tarball: its stagetools.py is
    the file, not the link); returns the collections path."""
    built = os.path.join(workdir, "built")
    sh(["ansible-galaxy", "collection", "build", "--force", "--output-path", built, COLLECTION])
    tarball, = [os.path.join(built, name) for name in os.listdir(built)
                if name.endswith(".tar.gz")]
    path = os.path.join(workdir, "collections")
    sh(["ansible-galaxy", "collection", "install", "--force", "-p", path, tarball])
    return path


@pytest.fixture(scope="session")
def collections(workdir):
    return install_collection(workdir)


INSTALLATIONS = {
    "host1": [
        # The inventory may repeat the repo's host names (the role checks they agree).
        {"name": "shop_prod", "repo": "shop", "framework": "django", "server": "gunicorn",
         "database": "postgresql", "host_names": HOST_NAMES["shop_prod"]},
        {"name": "blog_prod", "repo": "blog", "framework": "flask", "server": "gunicorn"},
        # a second database on the host: neither role may connect to the other's
        {"name": "shop_qual", "repo": "shop", "framework": "django", "database": "postgresql"},
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
            json.dump({"installation_list": listed,
                       "installation_acme_server": ACME["directory_url"],
                       "installation_pip_env": PIP_ENV}, f)


# The hosts have no network: pip takes the wheels the machine downloaded (/opt/wheelhouse).
PIP_ENV = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/opt/wheelhouse"}


def machine_end(host):
    """The machine's address on the veth pair of ``host`` (the host's is one above)."""
    return str(ipaddress.ip_address(host.address) - 1)


@pytest.fixture(scope="session")
def acme_server(workdir, hosts):
    """pebble on the machine's end of host1's veth, resolving each host name to its host.
    The hosts trust its API's CA as a company trusts its own ACME server's; host2 reaches it
    through the machine."""
    host1, host2 = hosts.hosts
    answers = {name: (host1 if name in ("shop.test", "www.shop.test") else host2).address
               for names in HOST_NAMES.values() for name in names}
    with timed("pebble start"):
        server = acme.AcmeServer(os.path.join(workdir, "acme"), machine_end(host1), answers,
                                 log=lambda line: None)
        server.start()
    try:
        with open(server.api_ca_path) as f:
            ca = f.read()
        for host in hosts.hosts:
            with open(os.path.join(host.root, "usr/local/share/ca-certificates/test-acme.crt"),
                      "w") as f:
                f.write(ca)
            host.run("update-ca-certificates")
        host2.run("ip route add %s/32 via %s" % (server.address, machine_end(host2)))
        root = os.path.join(workdir, "acme", "root.pem")
        with open(root, "w") as f:
            f.write(server.root_ca_pem())
        ACME.update(directory_url=server.directory_url, root=root, server=server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def inventory(workdir, hosts, repos, acme_server):
    write_host_vars(workdir, repos)
    # check by hand, as root: root's own copy of stagetools (the collection's file), never
    # one in an installation's home
    for host in hosts.hosts:
        os.makedirs(os.path.join(host.root, os.path.dirname(ROOT_STAGETOOLS[1:])), exist_ok=True)
        shutil.copyfile(os.path.join(COLLECTION, "plugins", "module_utils", "stagetools.py"),
                        os.path.join(host.root, ROOT_STAGETOOLS[1:]))
    return hosts.inventory(os.path.join(workdir, "inventory.ini"))


ROOT_STAGETOOLS = "/usr/local/lib/stagetools/stagetools.py"


def check_json(host, name):
    """check NAME as root with root's copy and no flag: root's record says the rest."""
    result = host.run("/usr/bin/python3 -I %s check %s --json" % (ROOT_STAGETOOLS, name),
                      check=False)
    return result.returncode, result.stdout + result.stderr


def record(host, name):
    """Root's record of a deployment on a host."""
    return json.loads(host.run("cat /var/lib/stagetools/deployed/%s.json" % name).stdout)


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
            returncode, output = check_json(host, installation["name"])
            assert returncode == 0 and json.loads(output)["ok"] is True, (host, output)
    # Root's mirror holds branches and tags only; root's record is outside it and the homes.
    refs = hosts.hosts[0].run("git --git-dir /var/lib/stagetools-deploy/shop_prod.git "
                              "for-each-ref --format='%(refname)'").stdout.split()
    assert refs and all(ref.startswith(("refs/heads/", "refs/tags/")) for ref in refs), refs
    assert record(hosts.hosts[1], "acme_prod")["core_repo"] == "shop"


class SiteConnection(http.client.HTTPSConnection):
    """HTTPS to a test host's address, with the host name for SNI and for verifying the
    certificate against pebble's root (the machine has no DNS for the test names)."""

    def __init__(self, address, host_name, timeout=20):
        super().__init__(host_name, 443, timeout=timeout,
                         context=ssl.create_default_context(cafile=ACME["root"]))
        self.address = address

    def connect(self):
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def site(host, name):
    """(connection, Host header) to an installation through nginx as a visitor reaches it:
    HTTPS by its first host name, or HTTP by NAME-with-dashes.localhost."""
    if name in HTTPS:
        return SiteConnection(host.address, HOST_NAMES[name][0]), HOST_NAMES[name][0]
    return (http.client.HTTPConnection(host.address, 80, timeout=20),
            "%s.localhost" % name.replace("_", "-"))


def get(host, name, path="/", host_header=None):
    """(status, headers, body) of a GET through nginx."""
    connection, default_host = site(host, name)
    try:
        connection.request("GET", path, headers={"Host": host_header or default_host})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def test_each_answers_through_nginx(deployed, hosts):
    """From the machine to each host's own address, as a visitor reaches each installation."""
    for host in hosts.hosts:
        for installation in INSTALLATIONS[host.name]:
            name = installation["name"]
            status, _, body = get(host, name)
            assert status == 200 and json.loads(body)["name"] == name, body


def test_shop_prod_uses_postgresql_by_peer_auth(deployed, hosts):
    host1 = hosts.hosts[0]
    result = host1.run("runuser -u postgres -- psql -XtAc \"select count(*) from pg_tables "
                       "where tableowner = 'shop_prod'\" shop_prod")
    assert int(result.stdout) > 5  # Django's and the app's tables, made by migrate
    # Another installation's role may not even connect (REVOKE CONNECT ... FROM PUBLIC).
    for user, database in (("shop_qual", "shop_prod"), ("shop_prod", "shop_qual")):
        result = host1.run("cd / && runuser -u %s -- psql -XtAc 'select 1' %s"
                           % (user, database), check=False)
        assert result.returncode != 0 and 'permission denied for database "%s"' % database \
            in result.stderr, result.stderr


def test_private_files(deployed, hosts):
    host2 = hosts.hosts[1]
    result = host2.run("stat -c '%a %U' /home/shop_dev/secret_key /home/shop_dev/shop.sqlite "
                       "/home/feed_qual/secret_key /home/feed_qual/feed.sqlite")
    assert result.stdout.split("\n")[:4] == ["600 shop_dev", "600 shop_dev", "600 feed_qual",
                                             "600 feed_qual"], result.stdout
    # The socket's directory is root's: the user cannot swap the socket for a link there.
    assert host2.run("stat -c '%U %a' /run/shop_dev").stdout.split() == ["root", "755"]


def test_nginx_serves_no_link_to_anothers_files(deployed, hosts):
    """A link the user puts in static/ or media/ to a file of another owner is not served."""
    host2 = hosts.hosts[1]
    host2.run("runuser -u shop_dev -- ln -sf /etc/passwd /home/shop_dev/static/passwd && "
              "runuser -u shop_dev -- ln -sf /etc/hostname /home/shop_dev/media/hostname")
    try:
        for path in ("/static/passwd", "/media/hostname"):
            status, _, body = get(host2, "shop_dev", path)
            assert status == 403 and "root:" not in body, (path, status, body[:200])
    finally:
        host2.run("rm -f /home/shop_dev/static/passwd /home/shop_dev/media/hostname")


# -- HTTPS: certificates from pebble by certbot's webroot method; a default site that
# answers no name it does not serve

ARTIFACTS = os.environ.get("STAGETOOLS_ARTIFACTS", os.path.join(TOP, "artifacts"))


def handshake(address, server_name):
    """The serial number of the certificate a TLS handshake with ``server_name`` (SNI;
    None: none) gets, verified against pebble's root; ssl.SSLError if it is refused."""
    context = ssl.create_default_context(cafile=ACME["root"])
    context.check_hostname = server_name is not None
    with socket.create_connection((address, 443), 20) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            return tls.getpeercert()["serialNumber"]


def test_https_by_each_host_name_and_http_redirects(deployed, hosts):
    host1, host2 = hosts.hosts
    for host, name in ((host1, "shop_prod"), (host2, "feed_qual")):
        for host_name in HOST_NAMES[name]:
            connection = SiteConnection(host.address, host_name)  # verified against pebble
            connection.request("GET", "/", headers={"Host": host_name})
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["name"] == name
            connection.close()
            plain = http.client.HTTPConnection(host.address, 80, timeout=20)
            plain.request("GET", "/admin/?next=/", headers={"Host": host_name})
            response = plain.getresponse()
            assert (response.status, response.getheader("Location")) == (
                301, "https://%s/admin/?next=/" % host_name)
            plain.close()
    # A DEV with a host name: plain HTTP by it, and no TLS site.
    status, _, body = get(host2, "shop_dev", host_header="dev.shop.test")
    assert status == 200 and json.loads(body)["name"] == "shop_dev"
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        handshake(host2.address, "dev.shop.test")


def test_unknown_names_get_no_certificate_and_no_page(deployed, hosts):
    host1 = hosts.hosts[0]
    for server_name in ("unknown.test", None):  # a name no site serves; the address alone
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            handshake(host1.address, server_name)
    # Over shop.test's TLS connection, a Host no site serves; on port 80 likewise: nginx
    # closes the connection without a page.
    for connection in (SiteConnection(host1.address, "shop.test"),
                       http.client.HTTPConnection(host1.address, 80, timeout=20)):
        connection.request("GET", "/", headers={"Host": "unknown.test"})
        with pytest.raises(http.client.RemoteDisconnected):
            connection.getresponse()
        connection.close()


def test_an_invalid_host_name_is_refused_by_name(deployed, workdir, collections, inventory,
                                                 repos):
    bad = [{"name": "shop_prod", "repo": repos["shop"], "version": "main",
            "host_names": ["shop.test", "shop.test;evil"]}]
    rc, output, _ = playbook(workdir, collections, inventory, "--limit", "host1", "-e",
                             json.dumps({"installation_list": bad}))
    assert rc != 0
    assert "invalid host name 'shop.test;evil': it has the characters ';'" in output, \
        output[-3000:]


def test_check_reports_a_missing_certificate(deployed, hosts):
    host1 = hosts.hosts[0]
    live = "/etc/letsencrypt/live/shop_prod"
    host1.run("mv %s %s.away" % (live, live))
    try:
        rc, output = check_json(host1, "shop_prod")
    finally:
        host1.run("mv %s.away %s" % (live, live))
    assert rc == 1, output
    assert [(d["what"], d["actual"]) for d in json.loads(output)["differences"]] == [
        ("certificate %s/fullchain.pem" % live, "missing")]


def test_django_check_deploy_on_prod_behind_the_site(deployed, hosts):
    result = hosts.hosts[0].run(
        "cd / && runuser -u shop_prod -- env HOME=/home/shop_prod /home/shop_prod/bin/python "
        "/home/shop_prod/src/shop/manage.py check --deploy --fail-level WARNING")
    assert "System check identified no issues" in result.stdout, result.stdout + result.stderr


def test_browser_logs_in_to_the_prod_admin_over_https(deployed, hosts):
    import secrets
    host1 = hosts.hosts[0]
    password = secrets.token_urlsafe(16)
    host1.run("cd / && runuser -u shop_prod -- env HOME=/home/shop_prod "
              "DJANGO_SUPERUSER_PASSWORD=%s /home/shop_prod/bin/python "
              "/home/shop_prod/src/shop/manage.py createsuperuser --no-input "
              "--username admin --email admin@shop.test" % password)
    os.makedirs(ARTIFACTS, exist_ok=True)
    screenshot = os.path.join(ARTIFACTS, "shop_prod-admin-over-https.png")
    with timed("browser: HTTPS login to the PROD admin"):
        page = browser.login_screenshot("https://shop.test/admin/", "admin", password,
                                        ACME["root"], {"shop.test": host1.address}, screenshot)
    assert page["url"] == "https://shop.test/admin/" and \
        page["title"].startswith("Site administration"), page
    cookies = {cookie["name"]: cookie for cookie in page["cookies"]}
    assert cookies["shop_prod_sessionid"]["secure"] and cookies["shop_prod_sessionid"]["httpOnly"]
    assert cookies["shop_prod_csrftoken"]["secure"]
    assert os.path.getsize(screenshot) > 10000
    TIMES["screenshot of the admin index"] = screenshot


def test_forced_renewal_reloads_nginx_under_load(deployed, hosts):
    host1 = hosts.hosts[0]
    before = handshake(host1.address, "shop.test")
    with Load(host1, "shop_prod", path="/") as load:
        time.sleep(1)
        with timed("forced certificate renewal under load"):
            host1.run("certbot renew --force-renewal --cert-name shop_prod "
                      "--no-random-sleep-on-renew", timeout=180)
        time.sleep(1)
    TIMES["renewal: requests / failed / longest (s)"] = "%d / %d / %.2f" % (
        load.requests, load.failed, load.longest)
    assert load.requests > 20 and load.failed == 0, (load.failed, load.errors[:5])
    assert handshake(host1.address, "shop.test") != before  # nginx serves the new one
    assert check_json(host1, "shop_prod")[0] == 0
    timer = host1.run("systemctl is-enabled certbot.timer; systemctl is-active certbot.timer")
    assert timer.stdout.split() == ["enabled", "active"]


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
    bad_start = commit_on_branch(shop, "bad-start", "v2", {
        "stagetools_project/settings.py": open(os.path.join(shop, "stagetools_project",
                                                            "settings.py")).read()
        + "\nMIDDLEWARE += ['shop.nonexistent.Middleware']  # fails to import on purpose\n"},
        "A middleware that fails to import")
    return {"v2": v2, "bad-migration": bad_migration, "bad-health": bad_health,
            "bad-start": bad_start}


class Load:
    """N clients asking one installation through nginx, counting failed requests."""

    def __init__(self, host, name, path="/notes/", clients=8):
        self.host, self.name, self.path, self.clients = host, name, path, clients
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.requests = self.failed = 0
        self.longest = 0.0
        self.errors = []

    def client(self):
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                connection, host_header = site(self.host, self.name)
                try:
                    connection.request("GET", self.path, headers={"Host": host_header})
                    response = connection.getresponse()
                    response.read()
                finally:
                    connection.close()
                ok, error = response.status == 200, "status %d" % response.status
            except Exception as exc:  # any failure counts, none ends a client unseen
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
        assert not any(thread.is_alive() for thread in self.threads), "a client hangs"


def deployed_commit(host, name):
    """The commit root's record says serves."""
    return record(host, name)["commit"]


def test_upgrade_under_load(deployed, workdir, collections, inventory, repos, versions, hosts):
    host1 = hosts.hosts[0]
    before = deployed_commit(host1, "shop_prod")
    write_host_vars(workdir, repos, {"shop_prod": "v2"})
    with Load(host1, "shop_prod") as load:
        time.sleep(1)
        with timed("upgrade of shop_prod under load (8 clients)"):
            rc, output, recap = playbook(workdir, collections, inventory, "--limit", "host1")
        time.sleep(1)
    TIMES["upgrade: requests / failed / longest (s)"] = "%d / %d / %.2f" % (
        load.requests, load.failed, load.longest)
    assert rc == 0, output[-6000:]
    assert load.requests > 50, load.requests
    assert load.failed == 0, (load.failed, load.requests, load.errors[:5])
    assert deployed_commit(host1, "shop_prod") == versions["v2"]
    assert record(host1, "shop_prod")["previous"]["commit"] == before  # for a rollback
    tables = host1.run("runuser -u postgres -- psql -XtAc \"select count(*) from pg_tables "
                       "where tablename = 'shop_tag'\" shop_prod").stdout.strip()
    assert tables == "1"
    backups = host1.run("stat -c '%a %U %n' /home/shop_prod/backups /home/shop_prod/backups/*")
    lines = backups.stdout.splitlines()
    # The backup before migrating, labelled with the commit that served (PROD's nightly
    # backup may have made others: test_jobs.py tests those)
    labelled = [line for line in lines[1:] if f"-{before[:12]}." in line]
    assert lines[0].startswith("700 shop_prod ") and len(labelled) == 1, lines
    assert labelled[0].endswith(".pgdump") and all(line.startswith("600 shop_prod ")
                                                   for line in lines[1:]), lines
    assert check_json(host1, "shop_prod")[0] == 0


@pytest.mark.parametrize("branch, step, cause", [
    ("bad-start", "candidate: GET /", "No module named 'shop.nonexistent'"),
    ("bad-health", "candidate: GET /", "the new release answered 500"),
    ("bad-migration", "migrate (restoring the backup)",
     "RuntimeError: this migration fails on purpose")])
def test_a_release_that_fails_never_reaches_users(branch, step, cause, deployed, workdir,
                                                  collections, inventory, repos, versions,
                                                  hosts):
    """Under 8 clients for the whole run: no request fails; the previous release serves;
    the play fails naming the step and the cause; a failed migration is restored while
    requests wait; the other installations of the host are deployed and checked."""
    host1 = hosts.hosts[0]
    write_host_vars(workdir, repos, {"shop_prod": "v2"})
    rc, output, recap = playbook(workdir, collections, inventory, "--limit", "host1")
    assert rc == 0, output[-6000:]  # v2 serves (after test_upgrade_under_load, or now)
    write_host_vars(workdir, repos, {"shop_prod": branch})
    try:
        with Load(host1, "shop_prod") as load:
            time.sleep(1)
            with timed("failed upgrade (%s)" % branch):
                rc, output, recap = playbook(workdir, collections, inventory, "--limit", "host1")
            time.sleep(1)
    finally:
        write_host_vars(workdir, repos, {"shop_prod": "v2"})
    TIMES["%s: requests / failed / longest (s)" % branch] = "%d / %d / %.2f" % (
        load.requests, load.failed, load.longest)
    assert rc != 0
    assert load.requests > 50 and load.failed == 0, (load.failed, load.errors[:5])
    assert "shop_prod: deploying %s (%s) failed at step '%s'" % (
        branch, versions[branch][:12], step) in output, output[-6000:]
    assert cause in output, output[-6000:]
    assert "shop_prod: %s serves as before" % versions["v2"][:12] in output, output[-6000:]
    assert deployed_commit(host1, "shop_prod") == versions["v2"]
    status, _, body = get(host1, "shop_prod")
    assert status == 200 and json.loads(body)["name"] == "shop_prod", body
    assert check_json(host1, "shop_prod")[0] == 0
    migrations = host1.run("runuser -u postgres -- psql -XtAc \"select name from "
                           "django_migrations where app = 'shop' order by name\" shop_prod")
    assert migrations.stdout.split() == ["0001_initial", "0002_tag"]
    leftover = host1.run("runuser -u postgres -- psql -XtAc \"select count(*) from pg_tables "
                         "where tablename = 'shop_leftover'\" shop_prod")
    assert leftover.stdout.strip() == "0"  # the backup was restored, not only the code
    # The others of the host were deployed and checked; the last task names shop_prod only.
    last = output.split("TASK [stagetools.deploy.installation : Every installation is deployed")[-1]
    assert "shop_prod: deploying" in last and "blog_prod" not in last, last[-3000:]
    assert re.search(r"^ok: \[host1\]", output.split("Check each installation")[-1], re.M)


def test_one_failure_leaves_the_others_served(deployed, workdir, collections, inventory,
                                              repos, versions, hosts):
    """A new installation deployed beside a release that fails: it serves through nginx (its
    site is reloaded although another installation failed), and the play names the failure."""
    host1 = hosts.hosts[0]
    rc, output, _ = deploy_only(workdir, collections, inventory, host1, [
        {"name": "blog_q9", "repo": repos["blog"], "version": "main"},
        {"name": "shop_prod", "repo": repos["shop"], "version": "bad-start"}])
    assert rc != 0 and "shop_prod: deploying bad-start" in output, output[-4000:]
    status, _, body = get(host1, "blog_q9")
    assert status == 200 and json.loads(body)["name"] == "blog_q9", (status, body)
    assert check_json(host1, "blog_q9")[0] == 0


def test_faults_are_repaired(deployed, workdir, collections, inventory, repos, hosts):
    """A unit edited, the key file made readable, the socket disabled: one run repairs all."""
    host2 = hosts.hosts[1]
    write_host_vars(workdir, repos)
    host2.run("sed -i 's/^Restart=on-failure/Restart=no/' /etc/systemd/system/shop_dev.service"
              " && chmod 644 /home/shop_dev/secret_key"
              " && systemctl disable --now feed_qual.socket feed_qual.service"
              " && systemctl daemon-reload")
    assert check_json(host2, "shop_dev")[0] == 1
    rc, output, recap = playbook(workdir, collections, inventory, "--limit", "host2")
    assert rc == 0, output[-6000:]
    assert recap["host2"]["changed"] > 0
    assert check_json(host2, "shop_dev")[0] == 0
    assert check_json(host2, "feed_qual")[0] == 0
    assert host2.run("systemctl is-enabled feed_qual.socket").stdout.strip() == "enabled"
    for name in ("shop_dev", "feed_qual"):
        status, _, body = get(host2, name)
        assert status == 200 and json.loads(body)["name"] == name, body


def test_a_stopped_or_disabled_socket_is_a_difference(deployed, hosts):
    """The site answers 502 without its socket: check says so, naming the unit."""
    host2 = hosts.hosts[1]
    try:
        for break_it in ("systemctl stop shop_dev.socket shop_dev.service",
                         "systemctl disable shop_dev.socket"):
            host2.run(break_it)
            returncode, output = check_json(host2, "shop_dev")
            assert returncode == 1, output
            assert [d["what"] for d in json.loads(output)["differences"]] == [
                "unit shop_dev.socket"], output
    finally:
        host2.run("systemctl enable --now shop_dev.socket")
    assert check_json(host2, "shop_dev")[0] == 0


def test_local_connection(deployed, hosts, repos, collections, wheelhouse):
    """The same playbook, run on a host by itself with ansible_connection=local, with the code
    from a git URL."""
    host2 = hosts.hosts[1]
    shutil.copytree(os.path.join(collections, "ansible_collections"),
                    os.path.join(host2.root, "opt/collections/ansible_collections"))
    shutil.copytree(repos["blog"], os.path.join(host2.root, "srv/git/blog"))
    with open(os.path.join(host2.root, "srv/installations.json"), "w") as f:
        json.dump({"installation_list": [
            # a URL the host fetches itself (a path would be sent from the "controller")
            {"name": "blog_dev", "repo": "file:///srv/git/blog", "version": "main",
             "framework": "flask", "server": "gunicorn"}],
            "installation_pip_env": PIP_ENV}, f)
    host2.run("python3 -m venv /opt/ansible && /opt/ansible/bin/pip install --quiet --no-index"
              " --find-links /opt/wheelhouse 'ansible-core>=2.19,<2.20'", timeout=300)
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
    # The audit by hand, on the host: `check --all` with root's copy of stagetools.
    started = time.monotonic()
    result = host1.run("/usr/bin/python3 -I %s check --all" % ROOT_STAGETOOLS, check=False)
    TIMES["check --all on the host (%d installations)" % len(result.stdout.splitlines())] = (
        time.monotonic() - started)
    assert result.returncode == 0, result.stdout + result.stderr
    # A fault shows as one line that names it, and the audit fails; an installation whose
    # pyvenv.cfg its user swapped for a link is still listed (root's record lists it).
    host1.run("chmod 644 /home/blog_d1/secret_key && cd /home/blog_d2 && "
              "mv pyvenv.cfg pyvenv.away && ln -s pyvenv.away pyvenv.cfg")
    try:
        rc, output, recap = playbook(workdir, collections, inventory, "--limit", "host1",
                                     name="audit")
    finally:
        host1.run("chmod 600 /home/blog_d1/secret_key && cd /home/blog_d2 && "
                  "rm pyvenv.cfg && mv pyvenv.away pyvenv.cfg")
    assert rc != 0
    assert re.search(r'"blog_d1\s+1 of \d+ checks differ: secret_key_path mode', output), \
        output[-3000:]
    assert re.search(r'"blog_d2\s+1 of \d+ checks differ: /home/blog_d2/pyvenv.cfg"', output), \
        output[-3000:]


def test_names_added_taken_and_removed(deployed, workdir, collections, inventory, repos, hosts):
    """blog_prod, on HTTP so far, declares a name: HTTPS at the first deploy; a name another
    site serves: refused before nginx changes, rolled back; no names again: HTTP, and no
    certificate kept."""
    host1 = hosts.hosts[0]
    ACME["server"].add_a("blog.test", host1.address)
    blog = repos["blog"]
    base = git(blog, "rev-parse", "main")

    def deploy(branch, names):
        declaration = DECLARATIONS["blog"] + ("[blog_prod]\nhost_names = %s\n" % names
                                              if names else "# blog_prod: no host names\n")
        commit_on_branch(blog, branch, base, {"stagetools.ini": declaration},
                         "blog_prod: host names %s" % names)
        only_blog = [{"name": "blog_prod", "repo": blog, "version": branch}]
        return playbook(workdir, collections, inventory, "--limit", "host1", "-e",
                        json.dumps({"installation_list": only_blog}))

    rc, output, _ = deploy("named", "blog.test")
    assert rc == 0, output[-6000:]
    connection = SiteConnection(host1.address, "blog.test")  # verified against pebble's root
    connection.request("GET", "/", headers={"Host": "blog.test"})
    assert json.loads(connection.getresponse().read())["name"] == "blog_prod"
    assert check_json(host1, "blog_prod")[0] == 0

    rc, output, _ = deploy("taken", "shop.test")
    assert rc != 0
    assert "another nginx site serves its names: /etc/nginx/sites-enabled/shop_prod.conf " \
        "serves shop.test" in output, output[-3000:]
    assert "blog_prod: %s serves as before" % record(host1, "blog_prod")["commit"][:12] \
        in output, output[-3000:]
    assert handshake(host1.address, "blog.test") and handshake(host1.address, "shop.test")
    status, _, body = get(host1, "shop_prod")
    assert status == 200 and json.loads(body)["name"] == "shop_prod"

    rc, output, _ = deploy("unnamed", "")
    assert rc == 0, output[-6000:]
    status, _, body = get(host1, "blog_prod")
    assert status == 200 and json.loads(body)["name"] == "blog_prod"
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        handshake(host1.address, "blog.test")
    assert host1.run("ls /etc/letsencrypt/renewal").stdout.split() == ["shop_prod.conf"]
    assert check_json(host1, "blog_prod")[0] == 0


# -- the trust boundary: root runs only the collection's code

def deploy_only(workdir, collections, inventory, host, installations, *args):
    """The playbook for ``installations`` alone on ``host`` (the others stay as they are)."""
    return playbook(workdir, collections, inventory, "--limit", host.name, "-e",
                    json.dumps({"installation_list": installations}), *args)


def test_a_hostile_repo_changes_nothing_outside_its_installation(deployed, workdir, collections,
                                                                 inventory, repos, hosts):
    """The evil repo's stagetools.py and aaa_env_setup.py try to act as root (markers by
    uid, files in /etc, a unit with User=root, static_dir at /etc): they run, as the user
    only; root renders and writes from the collection's copy; check names the difference the
    installation resolves."""
    host2 = hosts.hosts[1]
    evil = [{"name": "evil_prod", "repo": repos["evil"], "version": "main"}]
    rc, output, _ = deploy_only(workdir, collections, inventory, host2, evil)
    assert rc != 0 and "evil_prod  1 of" in output and "actual static_dir" in output, \
        output[-4000:]
    uid = host2.run("id -u evil_prod").stdout.strip()
    markers = host2.run("ls /home/evil_prod").stdout.split()
    # The code did run (as the user), and never as root.
    assert {"marker-stagetools-%s" % uid, "marker-aaa_env_setup-%s" % uid} <= set(markers), \
        markers
    assert not [marker for marker in markers if marker.endswith("-0")], markers
    assert host2.run("ls /etc/stagetools-stagetools /etc/stagetools-aaa_env_setup",
                     check=False).returncode != 0
    unit = host2.run("cat /etc/systemd/system/evil_prod.service").stdout
    assert "User=evil_prod\n" in unit and "User=root" not in unit, unit
    site = host2.run("cat /etc/nginx/sites-available/evil_prod.conf").stdout
    assert "alias /home/evil_prod/static/;" in site and "/etc" not in site.split("upstream")[1]
    assert host2.run("cat /etc/nginx/sites-available/stagetools-default.conf").stdout == \
        stagetools_module()._render_default_site()
    # What the repo declares is data, validated: a key that is no choice is refused.
    commit_on_branch(repos["evil"], "declares-etc", "main", {
        "stagetools.ini": DECLARATIONS["evil"] + "static_dir = /etc\n"}, "static_dir = /etc")
    evil[0]["version"] = "declares-etc"
    rc, output, _ = deploy_only(workdir, collections, inventory, host2, evil)
    assert rc != 0 and "line 3: 'static_dir' is no choice" in output, output[-3000:]


def stagetools_module():
    sys.path.insert(0, TOP)
    import stagetools
    return stagetools


def test_an_app_not_named_like_its_repo(deployed, workdir, collections, inventory, repos,
                                        hosts):
    """library declares core_app = books: it deploys, its second run changes nothing, and an
    installation that resolves another core_app than its deployed commit declares differs."""
    host2 = hosts.hosts[1]
    library = [{"name": "library_prod", "repo": repos["library"], "version": "main"}]
    rc, output, _ = deploy_only(workdir, collections, inventory, host2, library)
    assert rc == 0, output[-6000:]
    rc, output, recap = deploy_only(workdir, collections, inventory, host2, library)
    assert rc == 0 and recap["host2"]["changed"] == 0, output[-4000:]
    assert check_json(host2, "library_prod")[0] == 0
    declaration = "/home/library_prod/src/library/stagetools.ini"
    host2.run("cp %s /tmp/library.ini && sed -i 's/core_app = books/core_app = library/' %s"
              % (declaration, declaration))
    try:
        returncode, output = check_json(host2, "library_prod")
    finally:
        host2.run("cp /tmp/library.ini %s" % declaration)
    assert returncode == 1, output
    differences = {d["what"]: d for d in json.loads(output)["differences"]}
    assert (differences["actual core_app"]["expected"],
            differences["actual core_app"]["actual"]) == ("books", "library"), output
    assert all(what.startswith("actual ") for what in differences), output  # nothing else


def test_an_account_the_collection_did_not_make_is_refused(deployed, workdir, collections,
                                                           inventory, repos, hosts):
    host2 = hosts.hosts[1]
    host2.run("useradd --no-create-home ops_prod")
    try:
        rc, output, _ = deploy_only(workdir, collections, inventory, host2, [
            {"name": "ops_prod", "repo": repos["blog"], "version": "main"}])
        assert rc != 0 and "an account or PostgreSQL role named ops_prod exists that " \
            "stagetools.deploy did not make" in output, output[-3000:]
        assert host2.run("ls /home/ops_prod /var/lib/stagetools/deployed/ops_prod.json",
                         check=False).returncode != 0
    finally:
        host2.run("userdel ops_prod")


def test_check_mode_with_new_code_changes_nothing(deployed, workdir, collections, inventory,
                                                  repos, hosts):
    """--check --diff with a commit the host does not have: what would change, and no
    change (nothing sent, built or recorded)."""
    host1 = hosts.hosts[0]
    commit = commit_on_branch(repos["blog"], "check-mode", "main", {
        "blog/extra.py": "ANSWER = 42\n"}, "a commit only check mode sees")
    before = (record(host1, "blog_prod"), host1.run("ls -la --time-style=full-iso "
                                                    "/home/blog_prod /home/blog_prod/src/blog "
                                                    "/etc/systemd/system").stdout)
    rc, output, recap = deploy_only(workdir, collections, inventory, host1, [
        {"name": "blog_prod", "repo": repos["blog"], "version": "check-mode"}], "--check",
        "--diff")
    assert rc == 0, output[-4000:]
    assert recap["host1"]["changed"] >= 1, output[-4000:]
    assert "commit: %s" % commit in output, output[-4000:]
    assert (record(host1, "blog_prod"), host1.run(
        "ls -la --time-style=full-iso /home/blog_prod /home/blog_prod/src/blog "
        "/etc/systemd/system").stdout) == before
    assert host1.run("git --git-dir /var/lib/stagetools-deploy/blog_prod.git cat-file -e %s"
                     % commit, check=False).returncode != 0
