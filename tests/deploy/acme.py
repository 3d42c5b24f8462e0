"""A real ACME server for tests: Debian's pebble, with pebble-challtestsrv as its DNS.

Both run on the machine (its own network namespace), bound to one address. Clients on test
hosts reach pebble's API at ``directory_url`` and trust its HTTPS certificate through
``api_ca_path`` (certbot: ``REQUESTS_CA_BUNDLE``); pebble validates HTTP-01 challenges on port 80
of the address that challtestsrv answers for the name (``dns_answers``, ``add_a``). What issued
certificates chain to is ``root_ca_pem()``: pebble makes a new root at every start.

    with AcmeServer("/tmp/acme", "10.213.0.1", {"shop.test": "10.213.0.2"}) as acme:
        acme.directory_url, acme.api_ca_path, acme.root_ca_pem()

Needs the Debian packages pebble (2.4.0 in bookworm) and openssl.
"""
import atexit
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

API_PORT = 14000
MANAGEMENT_PORT = 15000
DNS_PORT = 8053
CHALLTESTSRV_PORT = 8055  # challtestsrv's own management API (plain HTTP)
START_TIMEOUT = 30
STOP_TIMEOUT = 10
# The servers are on this machine: an http(s)_proxy of the environment must not be asked.
NO_PROXY = urllib.request.ProxyHandler({})

# Only the sections named by -extensions are used; the names of the API's certificate are
# added per server (an IP SAN: certbot on a host connects to the address).
OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
# The hosts trust it for the API's address alone, not for any name.
nameConstraints = critical, permitted;IP:%s/255.255.255.255
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:%s
"""


class AcmeServer:
    """pebble and pebble-challtestsrv on ``listen_address``, started on enter, stopped on exit.

    ``workdir`` receives the API's CA and certificate, pebble's config and both logs.
    ``dns_answers`` maps host names to IPv4 addresses, the targets of HTTP-01 validation.
    ``validity`` is the lifetime of issued certificates in seconds (90 days, as Let's Encrypt:
    certbot renews only below 30 days, so a fresh certificate is not due for renewal).
    ``log`` receives one line per start and stop. Without ``with``: ``start()``, ``stop()``.
    """

    def __init__(self, workdir, listen_address, dns_answers=None, log=print,
                 validity=90 * 86400):
        self.workdir = os.path.abspath(workdir)
        self.address = str(ipaddress.IPv4Address(listen_address))
        self.dns_answers = dict(dns_answers or {})
        self.log = log
        self.validity = validity
        self.api_ca_path = os.path.join(self.workdir, "api-ca.pem")
        self.directory_url = "https://%s:%d/dir" % (self.address, API_PORT)
        self.management_url = "https://%s:%d" % (self.address, MANAGEMENT_PORT)
        self._challtestsrv_url = "http://%s:%d" % (self.address, CHALLTESTSRV_PORT)
        self._processes = []

    def __repr__(self):
        return "AcmeServer(%s)" % self.directory_url

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        """Make the API's certificate, start challtestsrv and pebble, wait until both answer.

        On any failure, or Ctrl-C, what was started is stopped again before the error goes on.
        """
        self._check_ports()
        atexit.register(self.stop)  # also when the caller's interpreter exits without stop()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def stop(self):
        """Stop both servers and whatever they started (their process groups); bounded."""
        for name, process in reversed(self._processes):
            _kill_group(process)
            self.log("%s stopped (exit code %s)" % (name, process.returncode))
        self._processes = []
        atexit.unregister(self.stop)

    def add_a(self, name, address):
        """Let pebble resolve ``name`` to the IPv4 ``address`` (replacing earlier answers)."""
        address = str(ipaddress.IPv4Address(address))
        self._challtestsrv("POST", "/clear-a", {"host": name})
        self._challtestsrv("POST", "/add-a", {"host": name, "addresses": [address]})

    def root_ca_pem(self):
        """The PEM of pebble's current root: what clients trust to verify issued certificates."""
        return self._get(self.management_url + "/roots/0").decode()

    # -- helpers

    def _start(self):
        started = time.monotonic()
        os.makedirs(self.workdir, exist_ok=True)
        self._make_api_certificate()
        config = os.path.join(self.workdir, "pebble-config.json")
        with open(config, "w") as f:
            json.dump({"pebble": {
                "listenAddress": "%s:%d" % (self.address, API_PORT),
                "managementListenAddress": "%s:%d" % (self.address, MANAGEMENT_PORT),
                "certificate": os.path.join(self.workdir, "api.pem"),
                "privateKey": os.path.join(self.workdir, "api.key"),
                "httpPort": 80,
                "tlsPort": 443,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
                "certificateValidityPeriod": self.validity,
            }}, f, indent=2)
        dns = "%s:%d" % (self.address, DNS_PORT)
        # Only the DNS and the management API: its HTTP-01/HTTPS/TLS-ALPN responders would take
        # ports the sites under test need. No default answers: an unknown name must fail
        # validation rather than land on the machine's loopback.
        self._spawn("challtestsrv", [
            "pebble-challtestsrv", "-management", "%s:%d" % (self.address, CHALLTESTSRV_PORT),
            "-dns01", dns, "-http01", "", "-https01", "", "-tlsalpn01", "",
            "-defaultIPv4", "", "-defaultIPv6", ""])
        deadline = time.monotonic() + START_TIMEOUT
        self._wait_for(lambda: self._challtestsrv("GET", "/"), deadline, "challtestsrv")
        for name, address in self.dns_answers.items():
            self.add_a(name, address)
        env = dict(os.environ,
                   PEBBLE_VA_NOSLEEP="1",  # no random pause before each validation
                   PEBBLE_WFE_NONCEREJECT="0",  # no 5% of good nonces refused
                   PEBBLE_AUTHZREUSE="0")  # every order is validated again
        self._spawn("pebble", ["pebble", "-config", config, "-dnsserver", dns], env=env)
        self._wait_for(lambda: self._get(self.directory_url), deadline, "pebble's API")
        self._wait_for(lambda: self._get(self.management_url + "/roots/0"), deadline,
                       "pebble's management API")
        self.log("pebble up in %.1f s at %s" % (time.monotonic() - started, self.directory_url))

    def _check_ports(self):
        """Refuse an address that is not the machine's, or ports another server holds.

        challtestsrv keeps running when it cannot bind, and a connection to an address that is
        not local may be answered by whatever the network routes it to: the readiness probes
        alone would not notice either.
        """
        wanted = [(socket.SOCK_STREAM, port) for port in
                  (API_PORT, MANAGEMENT_PORT, DNS_PORT, CHALLTESTSRV_PORT)]
        for kind, port in wanted + [(socket.SOCK_DGRAM, DNS_PORT)]:
            with socket.socket(socket.AF_INET, kind) as probe:
                # As the servers do: connections of an earlier run in TIME_WAIT do not count.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((self.address, port))
                except OSError as error:
                    raise RuntimeError("cannot serve ACME on %s port %d: %s" % (
                        self.address, port, error.strerror)) from None

    def _make_api_certificate(self):
        """A throwaway CA and, signed by it, the API's certificate for the listen address."""
        config = os.path.join(self.workdir, "openssl.cnf")
        with open(config, "w") as f:
            f.write(OPENSSL_CONFIG % (self.address, self.address))
        common = ["openssl", "req", "-x509", "-config", config, "-nodes", "-days", "30",
                  "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        _run(common + ["-extensions", "ca", "-subj", "/CN=stagetools test ACME API CA",
                       "-keyout", os.path.join(self.workdir, "api-ca.key"),
                       "-out", self.api_ca_path])
        _run(common + ["-extensions", "server", "-subj", "/CN=" + self.address,
                       "-CA", self.api_ca_path, "-CAkey", os.path.join(self.workdir, "api-ca.key"),
                       "-keyout", os.path.join(self.workdir, "api.key"),
                       "-out", os.path.join(self.workdir, "api.pem")])
        os.remove(os.path.join(self.workdir, "api-ca.key"))  # it signs nothing more

    def _spawn(self, name, args, env=None):
        with open(os.path.join(self.workdir, name + ".log"), "ab") as log:
            # Its own process group, so that stop() reaches everything it started.
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env,
                                       start_new_session=True)
        self._processes.append((name, process))

    def _wait_for(self, probe, deadline, what):
        while True:
            for name, process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError("%s exited with %s during start, see %s" % (
                        name, process.returncode, os.path.join(self.workdir, name + ".log")))
            try:
                return probe()
            except (OSError, ssl.SSLError) as error:  # URLError is an OSError
                if time.monotonic() > deadline:
                    raise RuntimeError("%s did not answer within %d s: %s" % (
                        what, START_TIMEOUT, error)) from None
            time.sleep(0.1)

    def _get(self, url):
        context = ssl.create_default_context(cafile=self.api_ca_path)
        opener = urllib.request.build_opener(NO_PROXY, urllib.request.HTTPSHandler(
            context=context))
        with opener.open(url, timeout=5) as response:
            return response.read()

    def _challtestsrv(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._challtestsrv_url + path, data=data,
                                         method=method)
        try:
            with urllib.request.build_opener(NO_PROXY).open(request, timeout=5) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            if method == "GET":  # only a readiness probe: any answer means it listens
                return error.read()
            raise


def _run(args):
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


def _kill_group(process):
    """SIGTERM to the process group, SIGKILL if it has not gone after STOP_TIMEOUT."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            pass
