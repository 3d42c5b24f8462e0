"""Test hosts that boot systemd: Debian roots in systemd-nspawn, one network namespace each.

The image is built once with mmdebstrap and cached under CACHE_DIR/<hash of the package list>.
Each host gets its own root (an overlay of the image, or a copy where overlayfs is missing),
its own hostname, its own cgroup (its systemd's tree, shared with no other container), a network
namespace we make with a veth pair to the machine (the machine end and the host end are our own
/30), and sshd that takes a per-run key for root.

Everything started here is stopped by the same object: containers, mounts, veths, namespaces,
cgroups, processes; also on an exception, on SIGINT/SIGTERM (turned into exceptions) and at exit.
systemd is only ever run by `systemd-nspawn -D <a separate root>`, never on the machine.

    python3 tests/deploy/testhosts.py build             # build or reuse the image, print its path
    python3 tests/deploy/testhosts.py boot 2 DIR        # boot two hosts, write DIR/inventory.ini,
                                                  # stay up until Ctrl-C
        [--wheelhouse WH] [--copy] [--exit]       # WH at /opt/wheelhouse inside; copies, not
                                                  # overlays; stop again at once (timing)
Measured here (2 cores): image 24-28 s, two hosts booted in 3.5-4 s with overlays (14 s with
copies), stopped in under 1 s.
"""
import atexit
import fcntl
import hashlib
import ipaddress
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

SUITE = "bookworm"
# What an installation needs on a host. Change it and the image is built again.
PACKAGES = sorted([
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv",
    "nginx-light", "postgresql", "curl", "iproute2", "sudo", "procps", "git", "acl",
    "certbot",  # HTTPS: certificates by the webroot method, renewed by its timer
])
# Bump when the customize steps below change: part of the cache key too.
IMAGE_RECIPE = "3"
CACHE_DIR = os.environ.get("STAGETOOLS_TESTHOSTS_CACHE", "/var/cache/stagetools-testhosts")
# Our own addresses: a /30 per host out of this range, machine end .1, host end .2.
NETWORK = ipaddress.ip_network("10.213.0.0/16")
BOOT_TIMEOUT = 90
STOP_TIMEOUT = 30


def run(args, timeout=120, check=True, **kwargs):
    """Run a command with a bound on its time; its output is captured as text."""
    return subprocess.run(args, timeout=timeout, check=check, capture_output=True, text=True,
                          **kwargs)


def image_key():
    text = "\n".join([SUITE, IMAGE_RECIPE] + PACKAGES)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_image(log=print):
    """The image root, built once per package list (a lock keeps parallel runs from racing)."""
    os.makedirs(CACHE_DIR, exist_ok=True)
    path = os.path.join(CACHE_DIR, image_key())
    root = os.path.join(path, "root")
    with open(os.path.join(CACHE_DIR, "lock"), "w") as lock:
        deadline = time.monotonic() + 1800  # another run may be building: wait, bounded
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the image lock in %s is held for 30 minutes" % CACHE_DIR)
                time.sleep(1)
        if os.path.exists(os.path.join(path, "complete")):
            return root
        # Images of other package lists are out of date: only the current one is kept.
        for entry in os.listdir(CACHE_DIR):
            if len(entry) == 16 and entry != image_key() and all(c in "0123456789abcdef" for c in entry):
                _remove_tree(os.path.join(CACHE_DIR, entry))
        _remove_tree(path)
        os.makedirs(path)
        started = time.monotonic()
        # The hooks run on the machine with $1 the new root: no systemd is started by them.
        hooks = [
            # sshd host keys are made per host at boot of each copy, not shared.
            'rm -f "$1"/etc/ssh/ssh_host_*',
            # A container has no console getty to wait for, and nspawn mounts the root itself:
            # remounting it failed now and then, leaving the host "degraded".
            'chroot "$1" systemctl mask getty@tty1.service console-getty.service'
            ' systemd-remount-fs.service',
            'mkdir -p "$1"/root/.ssh && chmod 700 "$1"/root/.ssh',
        ]
        args = ["mmdebstrap", "--mode=root", "--variant=minbase",
                "--include=" + ",".join(PACKAGES)]
        args += ["--customize-hook=" + hook for hook in hooks]
        args += [SUITE, root]
        # Its own session, so that a timeout or Ctrl-C stops it and its children; then its
        # mounts (proc, sys, dev in the new root) go before the half-built tree does.
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=900)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
            _remove_tree(path)
            raise
        if process.returncode != 0:
            _remove_tree(path)
            raise RuntimeError("mmdebstrap failed:\n" + output[-3000:])
        with open(os.path.join(path, "packages"), "w") as f:
            f.write("\n".join(PACKAGES) + "\n")
        with open(os.path.join(path, "complete"), "w") as f:
            f.write("%.1f s\n" % (time.monotonic() - started))
        log("image built in %.1f s: %s" % (time.monotonic() - started, root))
        return root


def _remove_tree(path):
    """Remove a directory tree after unmounting whatever is mounted below it: a killed
    mmdebstrap leaves /proc, /sys and /dev mounted in its root, and rmtree must not go there."""
    prefix = os.path.realpath(path) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        run(["umount", "--lazy", point], check=False)
    shutil.rmtree(path, ignore_errors=True)


def _is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _cgroup_trees():
    """This process's own cgroup, as a directory, in each hierarchy that systemd keeps its tree
    in: the unified one (cgroup2) and, on a legacy or hybrid machine, name=systemd."""
    with open("/proc/self/cgroup") as f:  # "0::/path", "9:name=systemd:/path"
        ours = dict(line.rstrip("\n").split(":", 2)[1:] for line in f)
    trees = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            root, point = fields[3], fields[4]
            after = fields[fields.index("-") + 1:]  # file system type, source, options
            if after[0] == "cgroup2":
                key = ""
            elif after[0] == "cgroup" and "name=systemd" in after[2].split(","):
                key = "name=systemd"
            else:
                continue
            if key in ours and key not in trees:
                path = os.path.relpath(ours[key], root)
                trees[key] = os.path.normpath(os.path.join(point, path))
    return list(trees.values())


class Host:
    def __init__(self, name, root, address, netns, veth):
        self.name, self.root, self.address, self.netns, self.veth = (
            name, root, address, netns, veth)
        self.process = None
        self.leader = None

    def __repr__(self):
        return "Host(%s, %s)" % (self.name, self.address)

    def run(self, command, timeout=120, check=True):
        """Run a shell command inside the host, as root, in all its namespaces."""
        return run(["nsenter", "-t", str(self.leader), "-a", "/bin/sh", "-c", command],
                   timeout=timeout, check=check)


class TestHosts:
    """Boot hosts; `close()` (or leaving the `with`) stops all of them and removes every trace."""

    __test__ = False  # not a pytest class
    _count = 0

    def __init__(self, workdir, wheelhouse=None, copy=False, log=print, shared_network=False):
        self.workdir = os.path.abspath(workdir)
        # One network of their own: the hosts' veths on a bridge of ours, one subnet (the
        # machine's end on the bridge), so that the hosts reach each other; else a /30 each.
        self.shared_network = shared_network
        self.bridge = None
        self.wheelhouse = wheelhouse
        self.copy = copy
        self.log = log
        self.hosts = []
        self._cleanups = []  # callables, run in reverse order
        self._closed = False
        self.key = os.path.join(self.workdir, "id_ed25519")

    # -- cleanup registry: every start registers its undo before anything else can fail
    def _on_close(self, fn, *args):
        self._cleanups.append((fn, args))

    def close(self):
        if self._closed:
            return
        self._closed = True
        # A second Ctrl-C must not cut the cleanup short: everything is undone first.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        errors = []
        while self._cleanups:
            fn, args = self._cleanups.pop()
            try:
                fn(*args)
            except BaseException as error:  # keep going: the rest must be undone too
                errors.append("%s%r: %s" % (fn.__name__, args, error))
        if errors:
            self.log("cleanup problems:\n  " + "\n  ".join(errors))

    def __enter__(self):
        atexit.register(self.close)
        self._old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._signalled)
        return self

    def __exit__(self, *exc):
        try:
            self.close()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            atexit.unregister(self.close)

    def _signalled(self, signum, frame):
        # Unwind through every finally (and this object's close) as Ctrl-C would.
        raise KeyboardInterrupt("signal %d" % signum)

    # -- the pieces
    def _free_subnets(self, count, new_prefix=30):
        used = run(["ip", "-o", "-4", "addr", "show"]).stdout
        taken = set()
        for line in used.splitlines():
            address = ipaddress.ip_interface(line.split()[3])
            taken.add(address.network)
        found = []
        for subnet in NETWORK.subnets(new_prefix=new_prefix):
            if not any(subnet.overlaps(t) for t in taken):
                found.append(subnet)
                if len(found) == count:
                    return found
        raise RuntimeError("no free /30 in %s" % NETWORK)

    def _make_root(self, image, hostdir):
        root = os.path.join(hostdir, "root")
        if self.copy:
            run(["cp", "-a", "--reflink=auto", image, root], timeout=300)
        else:
            upper, work = os.path.join(hostdir, "upper"), os.path.join(hostdir, "work")
            for d in (root, upper, work):
                os.makedirs(d)
            try:
                run(["mount", "-t", "overlay", "overlay", "-o",
                     "lowerdir=%s,upperdir=%s,workdir=%s" % (image, upper, work), root])
            except subprocess.CalledProcessError as error:
                # e.g. the work dir itself on overlayfs: a copy is slower (14 s for two
                # hosts here, against 4 s) but works anywhere.
                self.log("overlay mount failed (%s); copying the image" % error.stderr.strip())
                os.rmdir(root)
                run(["cp", "-a", "--reflink=auto", image, root], timeout=300)
            else:
                self._on_close(self._umount, root)
        return root

    def _umount(self, path):
        if _is_mounted(path):
            result = run(["umount", path], check=False)
            if result.returncode != 0:  # still busy: detach it, it goes when the last user does
                run(["umount", "--lazy", path])

    def _make_bridge(self, subnet, tag):
        """The bridge of a shared network, the machine's address on it (the subnet's first)."""
        bridge = "stt%s-br" % tag
        self._on_close(lambda: run(["ip", "link", "delete", bridge], check=False))
        run(["ip", "link", "add", bridge, "type", "bridge"])
        run(["ip", "addr", "add", "%s/%d" % (next(subnet.hosts()), subnet.prefixlen), "dev",
             bridge])
        run(["ip", "link", "set", bridge, "up"])
        self.bridge = bridge

    def _make_netns(self, index, subnet, tag):
        netns = "stt%s-%d" % (tag, index)
        veth = "stt%s-%d" % (tag, index)  # machine end; the host end is renamed to eth0
        if self.bridge:  # the machine's end on the bridge; the hosts after the machine's
            return self._make_bridged_netns(netns, veth, list(subnet.hosts())[index], subnet)
        machine_ip, host_ip = list(subnet.hosts())
        # Each undo is registered before its start: an interrupt in between leaves nothing.
        self._on_close(lambda: run(["ip", "netns", "delete", netns], check=False))
        run(["ip", "netns", "add", netns])
        self._on_close(lambda: run(["ip", "link", "delete", veth], check=False))
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"])
        run(["ip", "link", "set", veth + "p", "netns", netns])
        run(["ip", "addr", "add", "%s/30" % machine_ip, "dev", veth])
        run(["ip", "link", "set", veth, "up"])
        inside = ["ip", "netns", "exec", netns]
        run(inside + ["ip", "link", "set", veth + "p", "name", "eth0"])
        run(inside + ["ip", "addr", "add", "%s/30" % host_ip, "dev", "eth0"])
        run(inside + ["ip", "link", "set", "eth0", "up"])
        run(inside + ["ip", "link", "set", "lo", "up"])
        return netns, veth, str(host_ip)

    def _make_bridged_netns(self, netns, veth, host_ip, subnet):
        self._on_close(lambda: run(["ip", "netns", "delete", netns], check=False))
        run(["ip", "netns", "add", netns])
        self._on_close(lambda: run(["ip", "link", "delete", veth], check=False))
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"])
        run(["ip", "link", "set", veth + "p", "netns", netns])
        run(["ip", "link", "set", veth, "master", self.bridge])
        run(["ip", "link", "set", veth, "up"])
        inside = ["ip", "netns", "exec", netns]
        run(inside + ["ip", "link", "set", veth + "p", "name", "eth0"])
        run(inside + ["ip", "addr", "add", "%s/%d" % (host_ip, subnet.prefixlen), "dev", "eth0"])
        run(inside + ["ip", "link", "set", "eth0", "up"])
        run(inside + ["ip", "link", "set", "lo", "up"])
        return netns, veth, str(host_ip)

    def _prepare_root(self, root, name):
        with open(os.path.join(root, "etc/hostname"), "w") as f:
            f.write(name + "\n")
        with open(os.path.join(root, "etc/hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n127.0.1.1 %s\n::1 localhost\n" % name)
        run(["ssh-keygen", "-A", "-f", root])  # this host's own sshd keys
        keys = os.path.join(root, "root/.ssh/authorized_keys")
        shutil.copyfile(self.key + ".pub", keys)
        os.chmod(keys, 0o600)

    def _start(self, host, log_path):
        args = ["systemd-nspawn", "-D", host.root, "--boot", "--register=no", "--keep-unit",
                "--console=passive", "--machine=" + host.name, "--hostname=" + host.name,
                "--network-namespace-path=/run/netns/" + host.netns]
        if self.wheelhouse:
            args.append("--bind-ro=%s:/opt/wheelhouse" % os.path.abspath(self.wheelhouse))
        # Each container in a cgroup of its own. With --keep-unit nspawn puts the container's
        # systemd in "payload" below nspawn's own cgroup: started from one cgroup, every
        # container of the machine would share one tree, each systemd removing the others'
        # unit cgroups while another starts a process in one ("Failed to attach to cgroup
        # /system.slice/postgresql.service: No such file or directory", 219/CGROUP, a failed
        # unit, a degraded boot; more often the more boots overlap and the slower they run).
        cgroups = [os.path.join(tree, "testhost-" + host.netns) for tree in _cgroup_trees()]
        self._on_close(self._remove_cgroups, cgroups)
        for cgroup in cgroups:
            os.mkdir(cgroup)
        enter = "".join("echo $$ > %s && " % shlex.quote(os.path.join(cgroup, "cgroup.procs"))
                        for cgroup in cgroups)
        args = ["sh", "-c", enter + 'exec "$@"', "sh"] + args  # then nspawn, in the same process
        log = open(log_path, "w")
        # Own session: a Ctrl-C at the terminal reaches us, and we stop the container cleanly.
        host.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._on_close(self._stop, host)

    def _stop(self, host):
        process = host.process
        if process.poll() is None and host.leader:
            # A clean poweroff, so PostgreSQL and the journal shut down as on a real host.
            try:
                run(["nsenter", "-t", str(host.leader), "-a", "systemctl", "poweroff",
                     "--no-block"], check=False, timeout=10)
            except subprocess.TimeoutExpired:
                pass  # it still goes down below: SIGTERM, then SIGKILL
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # nspawn turns SIGTERM into a container shutdown; SIGKILL the whole group last.
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)

    @staticmethod
    def _remove_cgroups(cgroups):
        """Remove a stopped host's cgroups, deepest first; what is left in them is the
        container's and is killed."""
        deadline = time.monotonic() + STOP_TIMEOUT
        for top in cgroups:
            for directory, _, _ in os.walk(top, topdown=False):
                while True:
                    try:
                        os.rmdir(directory)
                        break
                    except FileNotFoundError:
                        break
                    except OSError:  # busy: processes still exiting, or left over
                        if time.monotonic() > deadline:
                            raise
                    with open(os.path.join(directory, "cgroup.procs")) as f:
                        for pid in f.read().split():
                            try:
                                os.kill(int(pid), signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                    time.sleep(0.1)

    @staticmethod
    def _container_init(nspawn_pid):
        """The container's systemd: the child of systemd-nspawn that has exec'ed systemd.

        nspawn forks helpers first (still named systemd-nspawn); taking one of them would
        point nsenter at a process that is about to go.
        """
        try:
            with open("/proc/%d/task/%d/children" % (nspawn_pid, nspawn_pid)) as f:
                children = f.read().split()
            for child in children:
                with open("/proc/%s/comm" % child) as f:
                    if f.read().strip() == "systemd":
                        return int(child)
        except FileNotFoundError:
            pass
        return None

    def _wait_booted(self, host, deadline):
        while host.leader is None:
            if host.process.poll() is not None:
                raise RuntimeError("%s: systemd-nspawn exited with %s; see %s/nspawn.log"
                                   % (host.name, host.process.returncode, self.workdir))
            host.leader = self._container_init(host.process.pid)
            if host.leader:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("%s: no container init after %d s" % (host.name, BOOT_TIMEOUT))
            time.sleep(0.1)
        while True:
            state = run(["nsenter", "-t", str(host.leader), "-a", "systemctl",
                         "is-system-running"], check=False, timeout=10).stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("%s: system state %r after %d s" % (host.name, state,
                                                                       BOOT_TIMEOUT))
            time.sleep(0.2)
        if state == "degraded":
            raise RuntimeError("%s booted degraded:\n%s" % (host.name, self._failed_units(host)))
        while True:  # sshd answers on the host's own address
            try:
                with socket.create_connection((host.address, 22), timeout=2) as s:
                    if s.recv(4).startswith(b"SSH"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("%s: no sshd on %s:22" % (host.name, host.address))
            time.sleep(0.2)

    @staticmethod
    def _failed_units(host):
        """The failed units, with what systemd and the boot's journal say of each.

        A unit's own journal (-u) lacks what its process logged before it reached the unit's
        cgroup, e.g. "Failed to attach to cgroup ...": the boot's lines naming the unit follow.
        """
        def ask(command):
            try:
                result = host.run(command, timeout=10, check=False)
            except subprocess.TimeoutExpired:
                return "(%s: no answer in 10 s)\n" % command
            return result.stdout + result.stderr
        failed = ask("systemctl list-units --failed --plain --no-legend --full")
        boot = ask("journalctl -b --no-pager -o short-monotonic").splitlines()
        parts = [failed]
        for line in failed.splitlines():
            unit = line.split()[0]
            own = ask("journalctl -b --no-pager -o short-monotonic -n 40 -u " + shlex.quote(unit))
            # postgresql.service names its instances postgresql@15-main.service: the stem
            # finds both, and the lines of processes logging under the stem.
            stem = unit.rsplit(".", 1)[0]
            naming = [text for text in boot if stem in text and text not in own][-40:]
            parts += ["--- systemctl status %s\n" % unit,
                      ask("systemctl status --no-pager --full --lines=0 " + shlex.quote(unit)),
                      "--- journalctl -b -u %s\n" % unit, own,
                      "--- journalctl -b, other lines naming %s\n" % stem,
                      "".join(text + "\n" for text in naming)]
        return "".join(parts)

    def boot(self, count, prefix="host"):
        """Boot `count` hosts in parallel; return them when each is running with sshd up."""
        image = build_image(self.log)
        os.makedirs(self.workdir, exist_ok=True)
        self._on_close(self._remove_workdir)
        if not os.path.exists(self.key):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "testhosts", "-f",
                 self.key])
        # Names stay unique beside another run and another TestHosts of this process
        # (and short: an interface name has at most 15 characters).
        TestHosts._count += 1
        tag = "%x%d" % (os.getpid() % 0xffff, TestHosts._count % 100)
        if self.shared_network:  # one subnet for all, the machine's end first
            subnet, = self._free_subnets(1, new_prefix=28)
            self._make_bridge(subnet, tag)
            subnets = [subnet] * count
        else:
            subnets = self._free_subnets(count)
        for index in range(1, count + 1):
            name = "%s%d" % (prefix, index)
            hostdir = os.path.join(self.workdir, name)
            os.makedirs(hostdir)
            root = self._make_root(image, hostdir)
            netns, veth, address = self._make_netns(index, subnets[index - 1], tag)
            host = Host(name, root, address, netns, veth)
            self._prepare_root(root, name)
            self.hosts.append(host)
        for host in self.hosts:
            self._start(host, os.path.join(self.workdir, host.name, "nspawn.log"))
        deadline = time.monotonic() + BOOT_TIMEOUT
        for host in self.hosts:
            try:
                self._wait_booted(host, deadline)
            except (RuntimeError, TimeoutError) as error:
                # The container's console says why; the files go with the cleanup.
                with open(os.path.join(self.workdir, host.name, "nspawn.log"), errors="replace") as f:
                    console = f.read()[-3000:]
                raise RuntimeError("%s\n--- console of %s:\n%s" % (error, host.name, console)) from None
        return self.hosts

    def _remove_workdir(self):
        # Never delete through a mount that is still there (it would be the image's files).
        for host in self.hosts:
            if _is_mounted(host.root):
                raise RuntimeError("%s still mounted; left %s" % (host.root, self.workdir))
        shutil.rmtree(self.workdir, ignore_errors=True)

    def inventory(self, path, group="testhosts", extra=""):
        """An Ansible inventory of the hosts (root over SSH with this run's key)."""
        lines = ["[%s]" % group]
        for host in self.hosts:
            lines.append("%s ansible_host=%s" % (host.name, host.address))
        lines += [
            "", "[%s:vars]" % group, "ansible_user=root",
            "ansible_ssh_private_key_file=%s" % self.key,
            # Fresh host keys every run: nothing to remember about them.
            "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
            " -o LogLevel=ERROR'",
            "ansible_python_interpreter=/usr/bin/python3",
        ]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n" + extra)
        return path


def main(argv):
    if argv[:1] == ["build"]:
        print(build_image())
    elif argv[:1] == ["boot"] and len(argv) >= 3:
        copy = "--copy" in argv
        wheelhouse = argv[argv.index("--wheelhouse") + 1] if "--wheelhouse" in argv else None
        started = time.monotonic()
        with TestHosts(argv[2], wheelhouse=wheelhouse, copy=copy) as hosts:
            hosts.boot(int(argv[1]))
            print("booted %s in %.1f s" % (hosts.hosts, time.monotonic() - started), flush=True)
            print("inventory:", hosts.inventory(os.path.join(argv[2], "inventory.ini")),
                  flush=True)
            if "--exit" not in argv:
                try:
                    signal.pause()
                except KeyboardInterrupt:
                    pass
            stopping = time.monotonic()
        print("stopped in %.1f s" % (time.monotonic() - stopping))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
