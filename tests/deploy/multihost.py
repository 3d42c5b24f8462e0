"""Four test hosts on one network of their own, for one PROD installation beyond one host: a
balancer (HAProxy), two app hosts, a database host. The harness of test_hosts.py and of the
benchmark bench/hosts.py.

Each host resolves the others by name (its /etc/hosts, as a company's DNS would); the
machine reaches each by its address on the bridge. The market code is `new`'s Django
starter on PostgreSQL with uploads (django-storages' SFTP storage) and two pages for load:
/wait/ waits 50 ms as on a slow query, /compute/ computes for a few milliseconds.
"""
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_deploy  # noqa: E402  (the harness: repos, collection, playbook, wheels)
import testhosts  # noqa: E402

DOMAIN = "multi.test"
ROLES = ("balancer", "app1", "app2", "db")
NAME = "market_prod"
# A second installation on the same database host (app1 only): its certificate must not
# open market_prod's database.
OTHER = "market_qual"
DECLARATION = "[stagetools]\nframework = django\nserver = gunicorn\ndatabase = postgresql\n"
# Uploads through django-storages' SFTP storage (paramiko) on the database host.
WHEELS = test_deploy.WHEELS + ["django-storages[sftp]"]
# HAProxy and what it needs that the image lacks: installed as a user would (apt-get),
# from packages downloaded once on the machine (the hosts have no network).
BALANCER_DEBS = ["haproxy", "liblua5.3-0", "libopentracing-c-wrapper0", "libopentracing1"]
# The market code's uploads (saved and read back through Django's storage, on any app host),
# a page that waits and one that computes.
VIEWS = """

import hashlib
import time

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt


@csrf_exempt
def upload(request):
    saved = default_storage.save("uploads/" + request.GET["name"],
                                 ContentFile(request.body))
    return JsonResponse({"name": saved, "url": default_storage.url(saved)})


def uploaded(request, name):
    with default_storage.open("uploads/" + name) as file:
        return HttpResponse(file.read(), content_type="application/octet-stream")


def wait(request):
    time.sleep(0.05)  # a slow query, a call to another service
    return JsonResponse({"waited": 0.05})


def compute(request):
    digest = b""
    for _ in range(20000):
        digest = hashlib.sha256(digest).digest()
    return JsonResponse({"digest": digest.hex()})
"""
URLS = """    path("upload/", views.upload),
    path("uploads/<str:name>", views.uploaded),
    path("wait/", views.wait),
    path("compute/", views.compute),
]
"""


def fqdn(role):
    return "%s.%s" % (role, DOMAIN)


def debs():
    """HAProxy's Debian packages, downloaded once on the machine."""
    key = testhosts.hashlib.sha256("\n".join(BALANCER_DEBS).encode()).hexdigest()[:16]
    path = os.path.join(testhosts.CACHE_DIR, "debs-" + key)
    if not os.path.exists(os.path.join(path, "complete")):
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        download = ["apt-get", "download", "-o", "APT::Sandbox::User=root"] + BALANCER_DEBS
        if testhosts.run(download, cwd=path, check=False, timeout=300).returncode != 0:
            test_deploy.sh(["apt-get", "update", "-q"])  # a fresh machine has no lists yet
            test_deploy.sh(download, cwd=path)
        open(os.path.join(path, "complete"), "w").close()
    return path


def market_repo(workdir):
    """The market code (a git repository): `new`'s Django starter, declared on PostgreSQL,
    with uploads and the load pages."""
    test_deploy.DECLARATIONS.setdefault("market", DECLARATION)
    path = test_deploy.make_repo(workdir, "market_dev", "django")
    setup = os.path.join(path, "setup.py")
    with open(setup) as f:
        text = f.read()
    with open(setup, "w") as f:
        f.write(text.replace('"hypercorn"]',
                             '"hypercorn", "psycopg[binary]", "django-storages[sftp]"]'))
    with open(os.path.join(path, "market", "views.py"), "a") as f:
        f.write(VIEWS)
    urls = os.path.join(path, "market", "urls.py")
    with open(urls) as f:
        text = f.read()
    with open(urls, "w") as f:
        f.write(text.replace("]\n", URLS))
    test_deploy.git(path, "commit", "--quiet", "-am", "PostgreSQL's driver; uploads; a "
                    "waiting and a computing page")
    return path


BOOT_ATTEMPTS = 3  # a container that boots "degraded" now and then (a unit's start raced)


def boot(workdir, log=print):
    """The four hosts booted (a TestHosts, entered: the caller leaves it), each resolving the
    others by name, HAProxy installed on the balancer; ``by_role`` names them. A boot that
    comes up degraded is tried again, all four hosts anew, at most BOOT_ATTEMPTS times."""
    wheelhouse = test_deploy.cached_wheelhouse(WHEELS)
    testhosts.build_image(log)
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        hosts = testhosts.TestHosts(os.path.join(workdir, "hosts%d" % attempt),
                                    wheelhouse=wheelhouse, shared_network=True, log=log)
        hosts.__enter__()
        try:
            booted = hosts.boot(len(ROLES), prefix="multi")
        except (RuntimeError, TimeoutError) as error:
            hosts.__exit__(*sys.exc_info())
            if attempt == BOOT_ATTEMPTS:
                raise
            log("boot attempt %d: %s" % (attempt, str(error).splitlines()[0]))
            continue
        break
    try:
        hosts.by_role = dict(zip(ROLES, booted))
        lines = "".join("%s %s\n" % (host.address, fqdn(role))
                        for role, host in hosts.by_role.items())
        for host in booted:
            host.run("printf '%s' >> /etc/hosts" % lines)
        balancer = hosts.by_role["balancer"]
        shutil.copytree(debs(), os.path.join(balancer.root, "opt/debs"))
        balancer.run("dpkg -i /opt/debs/*.deb", timeout=300)
        # the image has nginx; a balancer host runs HAProxy on port 80 instead
        balancer.run("systemctl disable --quiet --now nginx")
    except BaseException:
        hosts.__exit__(*sys.exc_info())
        raise
    return hosts


def entry(repo, version="main"):
    return {"name": NAME, "repo": repo, "version": version, "database_host": fqdn("db"),
            "balancer_host": fqdn("balancer")}


def write_inventory(workdir, hosts, repo, versions=None, app_hosts=("app1", "app2"),
                    other=True):
    """The three-host PROD as a user writes it (docs/deployment/several-hosts.md): the app
    hosts a group whose vars list the installation once, with its database host and its
    balancer; those two hosts of the inventory. ``other`` adds market_qual on app1 alone."""
    versions = versions or {}
    by_role = hosts.by_role
    market = entry(repo, versions.get(NAME, "main"))
    app_vars = {role: {"ansible_host": by_role[role].address, "installation_list": [market]}
                for role in app_hosts}
    if other:
        app_vars["app1"]["installation_list"].append(
            {"name": OTHER, "repo": repo, "version": versions.get(OTHER, "main"),
             "database_host": fqdn("db")})  # served by app1's nginx alone
    inventory = {"all": {
        "vars": {"ansible_user": "root", "ansible_ssh_private_key_file": hosts.key,
                 "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                 "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
                 "ansible_python_interpreter": "/usr/bin/python3",
                 "installation_pip_env": test_deploy.PIP_ENV,
                 "installation_ca_dir": os.path.join(workdir, "ca")},
        "hosts": {fqdn(role): {"ansible_host": by_role[role].address}
                  for role in ROLES if role not in app_hosts},
        "children": {"market_prod": {"hosts": {fqdn(role): app_vars[role]
                                               for role in app_hosts}}},
    }}
    path = os.path.join(workdir, "inventory.json")
    with open(path, "w") as f:
        json.dump(inventory, f, indent=2)
    return path
