"""Beyond one host: one PROD installation on two app hosts, its database on a database host
(PostgreSQL by TLS with client certificates), deployed by one ansible-playbook on four Debian
hosts that boot systemd, on one network of their own (a bridge of the test's).

Needs root, systemd-nspawn, mmdebstrap and ansible-playbook with community.crypto (the
`ansible` package); without them the tests skip, except in CI (STAGETOOLS_CI=1).

    STAGETOOLS_CI=1 python -m pytest tests/deploy/test_hosts.py
"""
import csv
import http.client
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multihost  # noqa: E402
import test_deploy  # noqa: E402  (the harness: repos, collection, playbook, wheels)
from multihost import NAME, OTHER, ROLES, fqdn, write_inventory  # noqa: E402
from test_deploy import TIMES, install_collection, playbook, timed  # noqa: E402


def _missing():
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, network namespaces)"
    for tool in ("systemd-nspawn", "mmdebstrap", "ansible-playbook", "ansible-galaxy"):
        if not shutil.which(tool):
            return "needs %s on PATH" % tool
    found = subprocess.run(["ansible-galaxy", "collection", "list", "community.crypto"],
                           capture_output=True, text=True, check=False)
    if "community.crypto" not in found.stdout:
        return "needs community.crypto (pip install 'ansible>=12,<13')"
    return None


if _missing():
    if os.environ.get("STAGETOOLS_CI") == "1":
        raise RuntimeError("CI must run the several-hosts tests: " + _missing())
    pytest.skip(_missing(), allow_module_level=True)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hosts"))


@pytest.fixture(scope="session")
def repo(workdir):
    return multihost.market_repo(workdir)


@pytest.fixture(scope="session")
def hosts(workdir):
    with timed("image and boot of four hosts"):
        booted = multihost.boot(workdir)
    try:
        yield booted
    finally:
        booted.__exit__(None, None, None)


@pytest.fixture(scope="session")
def collections(workdir):
    return install_collection(workdir)


@pytest.fixture(scope="session")
def inventory(workdir, hosts, repo):
    return write_inventory(workdir, hosts, repo)


@pytest.fixture(scope="session")
def deployed(workdir, collections, inventory):
    with timed("first deploy (4 hosts)"):
        rc, output, recap = playbook(workdir, collections, inventory, timeout=1500)
    assert rc == 0, output[-8000:]
    return recap


def test_first_deploy_changes_each_host(deployed):
    assert set(deployed) == {fqdn(role) for role in ROLES}, deployed
    for host, stats in deployed.items():
        assert stats["failed"] == 0 and stats["unreachable"] == 0, (host, stats)
    for role in ("app1", "app2", "db"):
        assert deployed[fqdn(role)]["changed"] > 0, (role, deployed)


def test_second_run_changes_nothing(deployed, workdir, collections, inventory):
    with timed("no-op run (4 hosts)"):
        rc, output, recap = playbook(workdir, collections, inventory, timeout=900)
    assert rc == 0, output[-6000:]
    changed = re.findall(r"^changed: .*$", output, re.M)
    for host, stats in recap.items():
        assert stats["changed"] == 0, (host, stats, changed)


def app_hosts(hosts):
    return [hosts.by_role["app1"], hosts.by_role["app2"]]


def test_check_on_each_app_host_proves_the_database_by_certificate(deployed, hosts):
    for host in app_hosts(hosts):
        returncode, output = _check(host, NAME)
        assert returncode == 0 and json.loads(output)["ok"] is True, (host, output)
    # The same check with the database host's PostgreSQL stopped names the database.
    db = hosts.by_role["db"]
    db.run("systemctl stop postgresql@15-main")
    try:
        returncode, output = _check(hosts.by_role["app2"], NAME)
    finally:
        db.run("systemctl start postgresql@15-main")
    differences = json.loads(output)["differences"]
    assert returncode == 1 and [difference["what"] for difference in differences] == [
        "database %s on %s" % (NAME, fqdn("db"))], output


def _check(host, name):
    """check NAME as root with the collection's copy of stagetools on the host."""
    path = "/usr/local/lib/stagetools/stagetools.py"
    os.makedirs(os.path.join(host.root, os.path.dirname(path[1:])), exist_ok=True)
    shutil.copyfile(os.path.join(test_deploy.COLLECTION, "plugins", "module_utils",
                                 "stagetools.py"), os.path.join(host.root, path[1:]))
    result = host.run("/usr/bin/python3 -I %s check %s --json" % (path, name), check=False)
    return result.returncode, result.stdout + result.stderr


def test_the_app_hosts_keep_their_keys_private(deployed, hosts):
    for host in app_hosts(hosts):
        listing = host.run("stat -c '%%a %%U %%n' /home/%s/.postgresql "
                           "/home/%s/.postgresql/*" % (NAME, NAME)).stdout.split("\n")
        modes = {line.split()[2]: line.split()[:2] for line in listing if line}
        assert modes["/home/%s/.postgresql" % NAME] == ["700", NAME], modes
        assert modes["/home/%s/.postgresql/postgresql.key" % NAME] == ["600", NAME], modes
    assert json.loads(hosts.by_role["app1"].run(
        "cat /var/lib/stagetools/topology/%s.json" % NAME).stdout)["database_host"] == fqdn("db")


def test_django_reads_its_database_host_from_the_system(deployed, hosts):
    """settings_defaults: no password, no DSN typed anywhere; the installation's own
    manage.py finds its database host and certificate."""
    app1 = hosts.by_role["app1"]
    out = app1.run("runuser -u %s -- /home/%s/bin/python -m stagetools_django shell -c "
                   "\"from django.db import connection; connection.ensure_connection(); "
                   "print(connection.settings_dict['HOST'], "
                   "connection.settings_dict['OPTIONS']['sslmode'], "
                   "connection.settings_dict['PASSWORD'] == '')\"" % (NAME, NAME),
                   check=False)
    lines = out.stdout.strip().splitlines()  # Django 5.2's shell first says what it imported
    assert lines and lines[-1].split() == [fqdn("db"), "verify-full", "True"], \
        out.stdout + out.stderr


# -- the database host refuses whatever is not the installation's own certificate

def psql_as(host, conninfo, user="root", password=None):
    env = "PGPASSWORD=%s " % password if password else ""
    result = host.run("cd / && %srunuser -u %s -- psql -XqAt -c 'select current_user' '%s'"
                      % (env, user, conninfo), check=False)
    return result.returncode, (result.stdout + result.stderr).strip()


def conninfo(name, database=NAME, sslmode="verify-full", certificate=True):
    tls = "/home/%s/.postgresql" % name
    parts = ["host=%s" % fqdn("db"), "dbname=%s" % database, "user=%s" % database,
             "sslmode=%s" % sslmode, "sslrootcert=%s/root.crt" % tls]
    if certificate:
        parts += ["sslcert=%s/postgresql.crt" % tls, "sslkey=%s/postgresql.key" % tls]
    else:  # libpq would take ~/.postgresql/postgresql.crt by itself
        parts += ["sslcert=/nonexistent", "sslkey=/nonexistent"]
    return " ".join(parts)


def test_the_installation_connects_with_its_certificate(deployed, hosts):
    app1 = hosts.by_role["app1"]
    assert psql_as(app1, conninfo(NAME), user=NAME) == (0, NAME)


def test_database_host_refuses_no_certificate(deployed, hosts):
    code, output = psql_as(hosts.by_role["app1"], conninfo(NAME, certificate=False), user=NAME)
    assert code != 0 and "certificate" in output, output


def test_database_host_refuses_another_installations_certificate(deployed, hosts):
    app1 = hosts.by_role["app1"]
    # market_qual's certificate (its user reads its own key) for market_prod's role
    code, output = psql_as(app1, conninfo(OTHER, database=NAME), user=OTHER)
    assert code != 0 and 'certificate authentication failed for user "%s"' % NAME in output, \
        output
    # and market_qual's own role may not reach market_prod's database either
    code, output = psql_as(app1, conninfo(OTHER, database=NAME).replace(
        "user=%s" % NAME, "user=%s" % OTHER), user=OTHER)
    assert code != 0 and "pg_hba.conf rejects connection" in output, output
    assert psql_as(app1, conninfo(OTHER, database=OTHER), user=OTHER) == (0, OTHER)


def test_database_host_refuses_a_password(deployed, hosts):
    """Even a role that has a password is not let in by it: cert is the only method."""
    db = hosts.by_role["db"]
    db.run("runuser -u postgres -- psql -XqAt -c \"ALTER ROLE %s PASSWORD 'guessed'\"" % NAME)
    try:
        code, output = psql_as(hosts.by_role["app1"], conninfo(NAME, certificate=False),
                               user=NAME, password="guessed")
    finally:
        db.run("runuser -u postgres -- psql -XqAt -c 'ALTER ROLE %s PASSWORD NULL'" % NAME)
    assert code != 0 and "certificate" in output, output


def test_database_host_refuses_a_connection_without_tls(deployed, hosts):
    code, output = psql_as(hosts.by_role["app1"], conninfo(NAME, sslmode="disable"), user=NAME)
    assert code != 0 and "pg_hba.conf rejects connection" in output \
        and "no encryption" in output, output


def test_the_server_is_verified_by_its_name(deployed, hosts):
    """verify-full: the database host's certificate names it; by its address it is refused."""
    app1, db = hosts.by_role["app1"], hosts.by_role["db"]
    code, output = psql_as(app1, conninfo(NAME).replace(
        "host=%s" % fqdn("db"), "host=%s" % db.address), user=NAME)
    assert code != 0 and "does not match host name" in output, output


# -- two app hosts behind HAProxy: one secret key, one set of uploads, sessions on either

LOCAL_NAME = NAME.replace("_", "-") + ".localhost"


def request(host, method, path, body=None, headers=None, timeout=20):
    """(status, headers, body) of a request to a host's port 80 (nginx, or the balancer's
    HAProxy), by the installation's local name."""
    connection = http.client.HTTPConnection(host.address, 80, timeout=timeout)
    try:
        connection.request(method, path, body=body,
                           headers=dict({"Host": LOCAL_NAME}, **(headers or {})))
        response = connection.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        connection.close()


HAPROXY_ASK = ("import socket, sys; s = socket.socket(socket.AF_UNIX); "
               "s.connect('/run/haproxy/admin.sock'); s.sendall(sys.argv[1].encode() + b'\\n'); "
               "print(b''.join(iter(lambda: s.recv(65536), b'')).decode())")


def haproxy(balancer, command):
    """An answer of HAProxy's runtime API on the balancer."""
    return balancer.run("python3 -c %s %s" % (shlex.quote(HAPROXY_ASK),
                                              shlex.quote(command))).stdout


def servers(balancer, backend=NAME):
    """By server of ``backend``: its status and total sessions, as HAProxy counts them."""
    rows = csv.DictReader(haproxy(balancer, "show stat").lstrip("# ").splitlines())
    return {row["svname"]: {"status": row["status"], "sessions": int(row["stot"])}
            for row in rows if row["pxname"] == backend and row["svname"] not in
            ("FRONTEND", "BACKEND")}


def test_the_balancer_serves_from_both_app_hosts(deployed, hosts):
    balancer = hosts.by_role["balancer"]
    before = servers(balancer)
    for _ in range(20):
        status, _, body = request(balancer, "GET", "/")
        assert status == 200 and json.loads(body)["name"] == NAME, body
    after = servers(balancer)
    assert set(after) == {fqdn("app1"), fqdn("app2")}, after
    for server, state in after.items():
        assert state["status"] == "UP", after
        assert state["sessions"] - before[server]["sessions"] >= 5, (before, after)


def test_one_secret_key_on_every_app_host(deployed, hosts):
    digests = set()
    for host in app_hosts(hosts):
        mode, owner = host.run("stat -c '%%a %%U' /home/%s/secret_key" % NAME).stdout.split()
        assert (mode, owner) == ("600", NAME)
        digests.add(host.run("sha256sum /home/%s/secret_key" % NAME).stdout.split()[0])
    assert len(digests) == 1, digests


def cookies_of(headers):
    return {value.split("=", 1)[0]: value.split(";", 1)[0].split("=", 1)[1]
            for name, value in headers if name.lower() == "set-cookie"}


def cookie_header(cookies):
    return "; ".join("%s=%s" % item for item in cookies.items())


def log_in(host, user, password):
    """The admin's login form on ``host``, as a browser fills it in: its cookies."""
    status, headers, body = request(host, "GET", "/admin/login/")
    assert status == 200, body[:500]
    cookies = cookies_of(headers)
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body).group(1).decode()
    form = "csrfmiddlewaretoken=%s&username=%s&password=%s&next=/admin/" % (token, user,
                                                                           password)
    status, headers, body = request(host, "POST", "/admin/login/", body=form, headers={
        "Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie_header(cookies)})
    assert status == 302, body[:2000]
    cookies.update(cookies_of(headers))
    return cookies


def test_a_login_on_one_app_host_is_valid_on_the_other(deployed, hosts):
    app1, app2 = app_hosts(hosts)
    app1.run("cd / && DJANGO_SUPERUSER_PASSWORD=multi-host-secret runuser -u %s "
             "--whitelist-environment=DJANGO_SUPERUSER_PASSWORD -- /home/%s/bin/python -m "
             "stagetools_django createsuperuser --noinput --username admin "
             "--email admin@multi.test" % (NAME, NAME), check=False)
    cookies = log_in(app1, "admin", "multi-host-secret")
    assert "%s_sessionid" % NAME in cookies, cookies
    for host in (app2, app1, hosts.by_role["balancer"]):
        status, _, body = request(host, "GET", "/admin/",
                                  headers={"Cookie": cookie_header(cookies)})
        assert status == 200 and b"Site administration" in body, (host, status, body[:300])


def test_an_upload_through_one_is_served_through_the_other(deployed, hosts):
    app1, app2 = app_hosts(hosts)
    data = os.urandom(50000)
    status, _, body = request(app1, "POST", "/upload/?name=picture.bin", body=data,
                              headers={"Content-Type": "application/octet-stream"})
    assert status == 200, body[:2000]
    saved = json.loads(body)
    assert saved["url"] == "/media/" + saved["name"], saved
    # the other app host reads it through the storage
    status, _, body = request(app2, "GET", "/uploads/" + saved["name"].split("/", 1)[1])
    assert status == 200 and body == data
    # browsers get it from the database host's nginx through the balancer, not from Python
    status, headers, body = request(hosts.by_role["balancer"], "GET", saved["url"])
    assert status == 200 and body == data
    # HAProxy passes header names in lowercase (HTTP/1.1 lets it)
    assert {key.lower(): value for key, value in headers}.get(
        "x-content-type-options") == "nosniff", headers
    db = hosts.by_role["db"]
    listing = db.run("stat -c '%%a %%U' /home/%s/media/%s" % (NAME, saved["name"])).stdout
    assert listing.split() == ["644", NAME], listing
    for host in app_hosts(hosts):
        assert host.run("ls /home/%s/media" % NAME).stdout.strip() == ""


def test_an_upload_account_may_only_use_sftp(deployed, hosts):
    """The key of market_prod's uploads opens SFTP in its chroot on the database host, and
    nothing else: no shell, no command, no forwarding."""
    app1 = hosts.by_role["app1"]
    ssh = ("runuser -u %s -- ssh -i /home/%s/.ssh/id_ed25519 -o BatchMode=yes "
           "-o UserKnownHostsFile=/home/%s/.ssh/known_hosts %s@%s " % (
               NAME, NAME, NAME, NAME, fqdn("db")))
    result = app1.run(ssh + "cat /etc/passwd", check=False)
    assert "root:" not in result.stdout, result.stdout
    result = app1.run("cd / && echo 'ls /' | runuser -u %s -- sftp -b - -i "
                      "/home/%s/.ssh/id_ed25519 -o UserKnownHostsFile=/home/%s/.ssh/known_hosts"
                      " %s@%s" % (NAME, NAME, NAME, NAME, fqdn("db")), check=False)
    assert result.returncode == 0 and "/media" in result.stdout, result.stdout + result.stderr


# -- the audit: each host of each installation

def test_the_audit_reports_each_host_of_the_installation(deployed, workdir, collections,
                                                         inventory, hosts):
    rc, output, recap = playbook(workdir, collections, inventory, name="audit")
    assert rc == 0, output[-6000:]
    for role in ("app1", "app2"):
        assert re.search(r"%s  app host %s: all \d+ checks hold" % (NAME, fqdn(role)), output), \
            output[-4000:]
    assert "%s  database host %s: as deployed" % (NAME, fqdn("db")) in output, output[-4000:]
    # a database host whose key others could read differs, by name
    db = hosts.by_role["db"]
    db.run("chmod 640 /etc/postgresql/stagetools/server.key")
    try:
        rc, output, recap = playbook(workdir, collections, inventory, name="audit")
    finally:
        db.run("chmod 600 /etc/postgresql/stagetools/server.key")
    assert rc != 0 and recap[fqdn("db")]["failed"] == 1, output[-4000:]
    assert "%s  database host %s: differs: /etc/postgresql/stagetools/server.key" % (
        NAME, fqdn("db")) in output, output[-4000:]


# -- the rolling upgrade, under load through the balancer

MIGRATION_0002 = test_deploy.MIGRATION_0002.replace('("shop", ', '("market", ')
# The second app host's health fails on this commit, the first one's does not.
FAILS_ON_APP2 = """

import socket as _socket

_home = home


def home(request):  # noqa: F811
    if _socket.gethostname() == "%s":
        raise RuntimeError("this host's release is broken on purpose")
    return _home(request)
"""


@pytest.fixture(scope="session")
def versions(repo, hosts):
    v2 = test_deploy.commit_on_branch(repo, "v2", "main", {
        "market/models.py": "\n\nclass Tag(models.Model):\n"
                            "    name = models.CharField(max_length=50)\n",
        "market/migrations/0002_tag.py": MIGRATION_0002}, "Tags, with their migration")
    broken = test_deploy.commit_on_branch(repo, "broken-on-app2", "v2", {
        "market/views.py": open(os.path.join(repo, "market", "views.py")).read()
        + FAILS_ON_APP2 % hosts.by_role["app2"].name}, "A release that fails on app2")
    return {"v2": v2, "broken-on-app2": broken}


def deployed_commits(hosts):
    return {host.name: json.loads(host.run("cat /var/lib/stagetools/deployed/%s.json"
                                           % NAME).stdout)["commit"]
            for host in app_hosts(hosts)}


def test_rolling_upgrade_with_a_migration_fails_no_request(deployed, workdir, collections,
                                                            repo, versions, hosts):
    inventory = write_inventory(workdir, hosts, repo, {NAME: "v2"})
    with test_deploy.Load(hosts.by_role["balancer"], NAME, path="/notes/") as load:
        time.sleep(2)
        with timed("rolling upgrade with a migration (2 app hosts)"):
            rc, output, recap = playbook(workdir, collections, inventory, timeout=1500)
        time.sleep(2)
    assert rc == 0, output[-6000:]
    TIMES["rolling upgrade: requests, failed, longest"] = "%d, %d, %.1f s" % (
        load.requests, load.failed, load.longest)
    assert load.requests > 50 and load.failed == 0, (load.requests, load.errors[:5])
    assert set(deployed_commits(hosts).values()) == {versions["v2"]}
    # each app host was drained, then put back, one after the other
    drained = re.findall(r"^TASK \[stagetools.deploy.installation : Drain this host.*\n"
                         r"(?:.*\n)*?changed: \[(\S+) -> ", output, re.M)
    assert drained == [fqdn("app1"), fqdn("app2")], output[-6000:]
    # the backup on the database host, before the first app host migrated
    backups = hosts.by_role["db"].run("ls /var/backups/stagetools/%s" % NAME).stdout.split()
    assert len(backups) == 1 and backups[0].endswith("-before-%s.pgdump" % versions["v2"][:12]), \
        backups
    assert hosts.by_role["db"].run(
        "runuser -u postgres -- psql -XqAt -d %s -c \"select count(*) from django_migrations "
        "where app = 'market' and name = '0002_tag'\"" % NAME).stdout.strip() == "1"


def test_a_failure_on_one_app_host_stops_the_roll_out_and_rolls_back(
        deployed, workdir, collections, repo, versions, hosts):
    inventory = write_inventory(workdir, hosts, repo, {NAME: "broken-on-app2"})
    with test_deploy.Load(hosts.by_role["balancer"], NAME, path="/notes/") as load:
        rc, output, recap = playbook(workdir, collections, inventory, timeout=1500)
        time.sleep(2)
    assert rc != 0, output[-6000:]
    assert "failed at step 'candidate: GET /'" in output, output[-6000:]
    TIMES["failed roll-out: requests, failed"] = "%d, %d" % (load.requests, load.failed)
    assert load.failed == 0, load.errors[:5]
    # app1 had switched: rolled back; app2 never switched
    assert set(deployed_commits(hosts).values()) == {versions["v2"]}, output[-6000:]
    assert "Roll back, on the app hosts before this one" in output
    write_inventory(workdir, hosts, repo, {NAME: "v2"})


# -- certificates due: issued again, served on, no request failed

def test_certificates_due_are_issued_again_under_load(deployed, workdir, collections,
                                                      inventory, hosts):
    """A run that finds the certificates within tls_renew_days of their end (here: all of
    them, 400 > their 365 days) issues them again; the database host reloads, the app hosts
    take their new client certificates, the CA stays. Then a run changes nothing."""
    app1, db = hosts.by_role["app1"], hosts.by_role["db"]
    files = {app1: "/home/%s/.postgresql/postgresql.crt" % NAME,
             db: "/etc/postgresql/stagetools/server.crt"}
    ca = "/home/%s/.postgresql/root.crt" % NAME

    def digest(host, path):
        return host.run("sha256sum %s" % path).stdout.split()[0]

    before = {host: digest(host, path) for host, path in files.items()}
    ca_before = digest(app1, ca)
    with test_deploy.Load(hosts.by_role["balancer"], NAME, path="/notes/") as load:
        with timed("certificates issued again (4 hosts)"):
            rc, output, recap = playbook(workdir, collections, inventory, "-e",
                                         "tls_renew_days=400", timeout=1500)
        time.sleep(2)
    assert rc == 0, output[-6000:]
    TIMES["certificates issued again: requests, failed"] = "%d, %d" % (load.requests,
                                                                      load.failed)
    assert load.requests > 50 and load.failed == 0, (load.requests, load.errors[:5])
    for host, path in files.items():
        assert digest(host, path) != before[host], (host.name, path)
    assert digest(app1, ca) == ca_before
    for host in app_hosts(hosts):  # each reaches its database with its new certificate
        returncode, output = _check(host, NAME)
        assert returncode == 0, output
    rc, output, recap = playbook(workdir, collections, inventory, timeout=900)
    assert rc == 0 and all(stats["changed"] == 0 for stats in recap.values()), recap


# -- losing an app host: powered off under load

def test_an_app_host_powered_off_under_load(deployed, hosts):
    balancer, app2 = hosts.by_role["balancer"], hosts.by_role["app2"]
    assert all(state["status"] == "UP" for state in servers(balancer).values())
    with test_deploy.Load(balancer, NAME, path="/notes/") as load:
        time.sleep(3)
        before = load.requests
        powered_off = time.monotonic()
        app2.run("systemctl poweroff --no-block", check=False)
        out_after = None
        while time.monotonic() - powered_off < 30:
            state = servers(balancer)[fqdn("app2")]["status"]
            if not state.startswith("UP"):
                out_after = time.monotonic() - powered_off
                break
            time.sleep(0.1)
        time.sleep(5)
    TIMES["app host powered off: requests, failed, until out"] = "%d, %d, %s" % (
        load.requests, load.failed, "%.1f s" % out_after if out_after else "never")
    assert out_after is not None and out_after <= 3.5, out_after
    assert load.requests - before > 50
    assert load.failed <= load.clients, load.errors


# -- an operator's restore on the database host (the backup the rolling upgrade took)

def test_an_operator_restores_the_backup_on_the_database_host(deployed, workdir, collections,
                                                              inventory, versions, hosts):
    db = hosts.by_role["db"]
    directory = "/var/backups/stagetools/%s" % NAME
    before_v2 = [name for name in db.run("ls %s" % directory).stdout.split()
                 if name.endswith("-before-%s.pgdump" % versions["v2"][:12])]
    assert len(before_v2) == 1, before_v2  # taken by the rolling upgrade, before 0002 ran
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections, ANSIBLE_NOCOLOR="1",
               ANSIBLE_HOST_KEY_CHECKING="False")
    arguments = {"names": [NAME], "restore": {NAME: "%s/%s" % (directory, before_v2[0])}}
    result = subprocess.run(["ansible", "-i", inventory, fqdn("db"), "-m",
                             "stagetools.deploy.database", "-a", json.dumps(arguments)],
                            capture_output=True, text=True, env=env, cwd=workdir, timeout=300,
                            check=False)
    assert result.returncode == 0 and "CHANGED" in result.stdout, result.stdout + result.stderr
    migrations = "select count(*) from django_migrations where app = 'market' and name = '%s'"
    ask = "runuser -u postgres -- psql -XqAt -d %s -c \"%s\"" % (NAME, migrations)
    assert db.run(ask % "0001_initial").stdout.strip() == "1"
    assert db.run(ask % "0002_tag").stdout.strip() == "0"  # as before the upgrade
    # the role still owns what it owned, and only it may connect
    owners = db.run("runuser -u postgres -- psql -XqAt -d %s -c \"select distinct tableowner "
                    "from pg_tables where schemaname = 'public'\"" % NAME).stdout.split()
    assert owners == [NAME], owners
    # a path outside the installation's backups is refused, nothing dropped
    arguments["restore"][NAME] = "/etc/passwd"
    result = subprocess.run(["ansible", "-i", inventory, fqdn("db"), "-m",
                             "stagetools.deploy.database", "-a", json.dumps(arguments)],
                            capture_output=True, text=True, env=env, cwd=workdir, timeout=300,
                            check=False)
    assert result.returncode != 0 and "not a backup of %s" % NAME in result.stdout, \
        result.stdout
    assert db.run(ask % "0001_initial").stdout.strip() == "1"
