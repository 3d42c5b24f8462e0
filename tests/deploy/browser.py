"""A real browser logs in to a Django admin over HTTPS: Debian's headless Chromium, driven by
Playwright for Python, trusting a test CA the way a user's browser trusts a root.

The CA goes into a fresh NSS database in a temporary HOME ($HOME/.pki/nssdb is where Chromium
on Linux reads local trust); no certificate error is ignored. Host names are mapped to test-host
addresses by Chromium's own resolver rules, so neither /etc/hosts nor DNS is touched.

Needs the Debian packages chromium and libnss3-tools (certutil), and the pip package
playwright (its bundled driver only: the browser is /usr/bin/chromium, never downloaded).
"""
import os
import shutil
import subprocess
import tempfile
import time

CHROMIUM = "/usr/bin/chromium"
# The machine's network is closed: nothing may wait on a connection Chromium makes on its own.
CHROMIUM_ARGS = ["--no-sandbox",  # as root Chromium refuses to start with its sandbox
                 "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync",
                 "--no-proxy-server"]  # test hosts are reached directly, whatever http_proxy says


def login_screenshot(url, username, password, ca_pem_path, resolve, screenshot_path,
                     timeout=60):
    """Log in through the Django admin login form at ``url``, screenshot the admin index.

    ``resolve`` maps host names to IP addresses; ``ca_pem_path`` is the CA that the site's
    certificate must chain to; ``timeout`` bounds the whole run in seconds. Returns
    ``{"url": final URL, "title": page title, "cookies": [{"name", "domain", "path", "secure",
    "httpOnly", "sameSite"}, ...]}`` (cookie values are left out: they are secrets). Raises
    RuntimeError when the login does not reach "Site administration", with the page's text;
    Playwright's errors as they come (``net::ERR_CERT_AUTHORITY_INVALID``, timeouts).
    """
    from playwright.sync_api import sync_playwright  # only the callers need playwright

    deadline = time.monotonic() + timeout

    def left_ms():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("login_screenshot took longer than %s s" % timeout)
        return remaining * 1000

    home = tempfile.mkdtemp(prefix="stagetools-browser-")
    try:
        _trust(home, ca_pem_path, deadline)
        # Every other name fails at once instead of waiting on a DNS that is not there.
        rules = ["MAP %s %s" % (name, address) for name, address in resolve.items()]
        rules.append("MAP * ~NOTFOUND")
        env = dict(os.environ, HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"),
                   XDG_CACHE_HOME=os.path.join(home, ".cache"))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, env=env, timeout=left_ms(),
                args=CHROMIUM_ARGS + ["--host-resolver-rules=" + ", ".join(rules)])
            try:
                context = browser.new_context()
                page = context.new_page()
                page.goto(url, timeout=left_ms())
                page.fill("#id_username", username, timeout=left_ms())
                page.fill("#id_password", password, timeout=left_ms())
                with page.expect_navigation(timeout=left_ms()):
                    page.click("input[type=submit], button[type=submit]", timeout=left_ms())
                title = page.title()
                if "Site administration" not in title:
                    # The page says why: a wrong password, a CSRF failure, a server error.
                    text = " ".join(page.inner_text("body", timeout=left_ms()).split())
                    raise RuntimeError("login at %s did not reach the admin index: %r at %s: %s"
                                       % (url, title, page.url, text[:500]))
                page.screenshot(path=screenshot_path, full_page=True, timeout=left_ms())
                cookies = [{key: cookie[key] for key in
                            ("name", "domain", "path", "secure", "httpOnly", "sameSite")}
                           for cookie in context.cookies()]
                return {"url": page.url, "title": title, "cookies": cookies}
            finally:
                browser.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _trust(home, ca_pem_path, deadline):
    """A new NSS database in ``home`` that trusts ``ca_pem_path`` to issue server certificates."""
    nssdb = "sql:" + os.path.join(home, ".pki", "nssdb")
    os.makedirs(os.path.join(home, ".pki", "nssdb"), mode=0o700)
    for args in (["-N", "--empty-password"],
                 ["-A", "-t", "C,,", "-n", "stagetools-test-ca", "-i", ca_pem_path]):
        subprocess.run(["certutil", "-d", nssdb] + args, check=True, capture_output=True,
                       text=True, timeout=max(1, deadline - time.monotonic()))
