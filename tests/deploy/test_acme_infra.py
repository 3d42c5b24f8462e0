"""The HTTPS test support on this machine alone: pebble issues a certificate to certbot for a
site that a temporary nginx serves on a loopback address, and Chromium logs in to it.

Needs root (ports 80 and 443) and the Debian packages pebble, certbot, nginx-light, chromium,
libnss3-tools, openssl, and the pip package playwright; without them the test skips, except in
CI (STAGETOOLS_CI=1), where a skip is a failure.

    python -m pytest -s tests/deploy/test_acme_infra.py
"""
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import acme  # noqa: E402
import browser  # noqa: E402

NAME = "acme-infra.test"
PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


def _missing():
    if os.geteuid() != 0:
        return "needs root (ports 80 and 443)"
    for tool in ("pebble", "pebble-challtestsrv", "certbot", "nginx", "certutil", "openssl",
                 browser.CHROMIUM):
        if not shutil.which(tool):
            return "needs %s on PATH" % tool
    if importlib.util.find_spec("playwright") is None:
        return "needs the pip package playwright"
    return None


if _missing():
    if os.environ.get("STAGETOOLS_CI") == "1":
        raise RuntimeError("CI must run the ACME tests: " + _missing())
    pytest.skip(_missing(), allow_module_level=True)


def free_loopback_address():
    """The first of 127.0.0.1-9 where ports 80 and 443 are free (pebble validates on 80)."""
    for last in range(1, 10):
        address = "127.0.0.%d" % last
        try:
            for port in (80, 443):
                with socket.socket() as probe:
                    # As servers do: connections of an earlier run in TIME_WAIT do not count.
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind((address, port))
        except OSError:
            continue
        return address
    pytest.skip("ports 80 and 443 are taken on 127.0.0.1 to 127.0.0.9")


LOGIN_PAGE = """<!DOCTYPE html>
<html><head><title>Log in | Django site admin</title></head><body>
<form method="post" action="/admin/login/" id="login-form">
<input type="text" name="username" id="id_username">
<input type="password" name="password" id="id_password">
<input type="submit" value="Log in">
</form></body></html>
"""
INDEX_PAGE = """<!DOCTYPE html>
<html><head><title>Site administration | Django site admin</title></head><body>
<h1>Site administration</h1></body></html>
"""
# Django's admin in miniature: /admin/ sends a visitor without a session to the login form; the
# form's POST sets the session cookie and goes back to /admin/.
NGINX_CONFIG = """\
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
worker_processes 1;
events {{}}
http {{
    access_log {dir}/nginx-access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {address}:80;
        location /.well-known/acme-challenge/ {{ root {dir}/webroot; }}
    }}
    {https}
}}
"""
NGINX_HTTPS = """server {{
        listen {address}:443 ssl;
        ssl_certificate {live}/fullchain.pem;
        ssl_certificate_key {live}/privkey.pem;
        root {dir}/site;
        location = /admin/login/ {{
            if ($request_method = POST) {{
                add_header Set-Cookie "sessionid=test; Path=/; Secure; HttpOnly; SameSite=Lax";
                return 302 /admin/;
            }}
            try_files /login.html =404;
        }}
        location = /admin/ {{
            if ($cookie_sessionid = "") {{ return 302 /admin/login/?next=/admin/; }}
            try_files /index.html =404;
        }}
    }}"""


class Nginx:
    """nginx in the foreground with its own config and pid file, a child of this process."""

    def __init__(self, directory, config, ports):
        path = os.path.join(directory, "nginx.conf")
        with open(path, "w") as f:
            f.write(config)
        # -e: its error log before the config is read is ours too, not the machine's.
        command = ["nginx", "-c", path, "-e", os.path.join(directory, "nginx-start.log")]
        subprocess.run(command + ["-t"], check=True, capture_output=True, timeout=30)
        self.process = subprocess.Popen(command, start_new_session=True,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        try:
            self._wait(ports, time.monotonic() + 10)
        except BaseException:
            self.stop()
            raise

    def _wait(self, ports, deadline):
        for address, port in ports:
            while True:
                try:
                    socket.create_connection((address, port), timeout=1).close()
                    break
                except OSError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("nginx did not listen on %s:%d" % (address, port))
                    time.sleep(0.05)

    def stop(self):
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def subreaper():
    """This process adopts the orphans of whatever it starts (nginx, pebble, Chromium and its
    helpers): at the end, every process the test left running is one of its descendants."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.fail("prctl(PR_SET_CHILD_SUBREAPER): " + os.strerror(ctypes.get_errno()))
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def descendants():
    """Pids of the live (not zombie) processes below this one."""
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/stat" % pid) as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:  # gone meanwhile
            continue
        if state != "Z":
            children.setdefault(int(parent), []).append(int(pid))
    found, todo = [], [os.getpid()]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def reap():
    """Collect the exit status of adopted orphans, so that none stays a zombie."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def test_certificate_and_browser_login(subreaper):
    address = free_loopback_address()
    top = tempfile.mkdtemp(prefix="stagetools-acme-")
    os.chmod(top, 0o755)  # nginx's workers (nobody) read the challenge files below it
    for sub in ("webroot", "site", "certbot"):
        os.makedirs(os.path.join(top, sub))
    with open(os.path.join(top, "site", "login.html"), "w") as f:
        f.write(LOGIN_PAGE)
    with open(os.path.join(top, "site", "index.html"), "w") as f:
        f.write(INDEX_PAGE)
    times = {}
    nginx = None
    try:
        started = time.monotonic()
        with acme.AcmeServer(os.path.join(top, "acme"), address, {NAME: address}) as server:
            times["pebble start"] = time.monotonic() - started
            nginx = Nginx(top, NGINX_CONFIG.format(dir=top, address=address, https=""),
                          [(address, 80)])
            certbot = os.path.join(top, "certbot")
            started = time.monotonic()
            result = subprocess.run(
                ["certbot", "certonly", "--webroot", "-w", os.path.join(top, "webroot"),
                 "--server", server.directory_url, "--config-dir", certbot + "/config",
                 "--work-dir", certbot + "/work", "--logs-dir", certbot + "/logs",
                 "--agree-tos", "--register-unsafely-without-email", "--non-interactive",
                 "-d", NAME],
                env=dict(os.environ, REQUESTS_CA_BUNDLE=server.api_ca_path),
                capture_output=True, text=True, timeout=120)
            times["certbot certonly"] = time.monotonic() - started
            assert result.returncode == 0, result.stdout + result.stderr
            nginx.stop()
            live = os.path.join(certbot, "config", "live", NAME)
            https = NGINX_HTTPS.format(dir=top, address=address, live=live)
            nginx = Nginx(top, NGINX_CONFIG.format(dir=top, address=address, https=https),
                          [(address, 80), (address, 443)])

            root_pem = server.root_ca_pem()
            context = ssl.create_default_context(cadata=root_pem)
            with socket.create_connection((address, 443), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=NAME) as tls:
                    names = tls.getpeercert()["subjectAltName"]
            assert names == (("DNS", NAME),)
            # The API's own CA must not be what makes the site's certificate valid.
            with pytest.raises(ssl.SSLCertVerificationError):
                other = ssl.create_default_context(cafile=server.api_ca_path)
                with socket.create_connection((address, 443), timeout=10) as raw:
                    other.wrap_socket(raw, server_hostname=NAME).close()

            root_path = os.path.join(top, "pebble-root.pem")
            with open(root_path, "w") as f:
                f.write(root_pem)
            screenshot = os.path.join(top, "admin.png")
            started = time.monotonic()
            page = browser.login_screenshot(
                "https://%s/admin/" % NAME, "admin", "not-a-secret", root_path,
                {NAME: address}, screenshot, timeout=60)
            times["browser login"] = time.monotonic() - started
            print(page)
            assert page["url"] == "https://%s/admin/" % NAME
            assert page["title"].startswith("Site administration")
            assert os.path.getsize(screenshot) > 0
            with open(screenshot, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
            assert {"name": "sessionid", "domain": NAME, "path": "/", "secure": True,
                    "httpOnly": True, "sameSite": "Lax"} in page["cookies"]
            # Chromium checks the certificate: trusting another CA, it refuses the site.
            with pytest.raises(Exception, match="ERR_CERT_AUTHORITY_INVALID"):
                browser.login_screenshot(
                    "https://%s/admin/" % NAME, "admin", "not-a-secret", server.api_ca_path,
                    {NAME: address}, screenshot, timeout=60)
    finally:
        if nginx is not None and nginx.process.poll() is None:
            nginx.stop()
        print("times: " + ", ".join("%s %.1f s" % item for item in times.items()))
        # Chromium's helpers may take a moment to follow the browser out.
        deadline = time.monotonic() + 5
        while descendants() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid: _command(pid) for pid in descendants()}
        for pid in left:  # reported below; not left running either way
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        reap()
        shutil.rmtree(top, ignore_errors=True)
    assert left == {}, "processes left running: %s" % left


def _command(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"
