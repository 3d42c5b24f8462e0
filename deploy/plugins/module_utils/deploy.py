# -*- coding: utf-8 -*-
# Copyright: stagetools contributors
# MIT License (see LICENSE)
"""The steps of the stagetools.deploy modules on a host: commands bounded in time, an
installation's commands as its user in a sandbox, pages asked through a Unix socket, files
that root writes. Only root runs this code; what an installation's processes print is data
(kept as text, shown in messages, never acted on)."""

import os
import re
import socket
import stat
import subprocess
import time

COMMAND_TIMEOUT = 1800  # seconds: pip may build and download for a while
TAIL_LINES = 15  # the end of a command's output: where Python and pip say why
TAIL_CHARACTERS = 3000
# The parts of the virtualenv and the repo that a release brings: built in releases/next
# beside the running ones, then renamed into place (see README: "Where releases live").
RELEASE_PARTS = ("bin", "lib", "src", "static")
WEB_GROUP = "www-data"
UNIT_DIR = "/etc/systemd/system"
# What an installation's user may pass to pip: environment variable names, one-line values.
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
# systemd 252 (Debian 12) writes a transient unit's command with ';' and '$' escaped inside
# words, and a daemon-reload (another installation's units, meanwhile) reads them back with
# the backslash kept: "import sys; ..." became "import sys\; ...". Commands of transient
# units have neither: code is written with newlines, a script is Python, not sh.
TRANSIENT_UNSAFE = frozenset(";$")


class StepFailed(Exception):
    """A step that failed; its message ends with the cause."""


def tail(text):
    """The last lines of a command's output, printable, at most TAIL_CHARACTERS."""
    lines = [line.rstrip() for line in (text or "").strip().splitlines() if line.strip()]
    shown = "\n".join(lines[-TAIL_LINES:])[-TAIL_CHARACTERS:]
    return "".join(char if char.isprintable() or char == "\n" else "?" for char in shown)


def run(argv, what, timeout=COMMAND_TIMEOUT, check=True, **kwargs):
    """Run a command of the host (root's, with its own arguments): CompletedProcess with text
    output; StepFailed naming ``what`` and the end of its output if it fails."""
    try:
        result = subprocess.run(argv, stdin=kwargs.pop("stdin", subprocess.DEVNULL),
                                capture_output=True, text=True, errors="replace",
                                timeout=timeout, check=False, **kwargs)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"{what}: no answer within {timeout} s") from None
    except OSError as error:
        raise StepFailed(f"{what}: {argv[0]} did not start: {error.strerror}") from None
    if check and result.returncode != 0:
        output = tail(result.stdout + "\n" + result.stderr)
        raise StepFailed(f"{what}: exited {result.returncode}" + (f":\n{output}" if output else ""))
    return result


def valid_pip_env(env):
    """The environment for pip, checked: names of environment variables, one-line values."""
    for key, value in env.items():
        if not (_ENV_NAME.match(str(key)) and isinstance(value, str) and value.isprintable()):
            raise StepFailed(f"pip_env {key!r}: a name of A-Z, 0-9 and _, and a one-line text")
    return env


def as_user(system, argv, what, binds=(), umask="0022", env=None, timeout=COMMAND_TIMEOUT):
    """Run ``argv`` as the installation's user in a sandbox of systemd's: the file system
    read-only but for its base dir, no other home, its own /tmp, no new privileges; ``binds``
    (source, target) mount a release over the live paths."""
    unsafe = [word for word in argv if TRANSIENT_UNSAFE & set(str(word))]
    if unsafe:
        raise StepFailed(f"{what}: {unsafe[0]!r} has ';' or '$', which a transient unit of "
                         "systemd 252 does not keep across a daemon-reload")
    properties = [f"User={system.user}", f"Group={system.group}", "WorkingDirectory=/",
                  f"UMask={umask}", "ProtectSystem=strict", "ProtectHome=tmpfs",
                  f"BindPaths={system.base_dir}", "PrivateTmp=yes", "NoNewPrivileges=yes",
                  f"RuntimeMaxSec={timeout}"]
    properties += [f"BindPaths={source}:{target}" for source, target in binds]
    variables = dict(env or {}, HOME=str(system.base_dir), LANG="C.UTF-8",
                     PATH="/usr/bin:/bin")
    # Not --quiet: when it fails, systemd-run's last lines say how the process ended
    # ("Main processes terminated with: code=killed, status=9/KILL").
    command = ["systemd-run", "--wait", "--pipe", "--collect", "--no-ask-password",
               "--service-type=exec"] + [f"--property={p}" for p in properties] + [
        f"--setenv={key}={value}" for key, value in variables.items()] + [
        # env looks the program up inside the sandbox: systemd-run, outside, would not see a
        # release's bin/ at the live path
        "--", "/usr/bin/env", *argv]
    return run(command, what, timeout=timeout + 60)


def release_binds(system, release):
    """The binds that show ``release`` (a directory of releases/) at the live paths."""
    return [(os.path.join(system.releases_dir, release, part), os.path.join(system.base_dir, part))
            for part in RELEASE_PARTS]


def get_page(socket_path, page, host, scheme, timeout=10):
    """(status, None) of ``GET page`` through a Unix socket, as nginx asks it (``scheme`` in
    X-Forwarded-Proto), or (None, why not)."""
    request = (f"GET {page} HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-Proto: {scheme}\r\n"
               "Connection: close\r\n\r\n").encode("ascii")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(str(socket_path))
            connection.sendall(request)
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                head += chunk
    except OSError as error:
        return None, error.strerror or str(error)
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    return (int(match.group(1)), None) if match else (None, "no HTTP answer")


def wait_for_page(socket_path, page, host, scheme, seconds, gone):
    """(status, why) of the first answer within ``seconds``: the server may still start,
    unless ``gone()`` says why it will not (systemd's word on its units), or None."""
    deadline = time.monotonic() + seconds
    while True:
        # a server that accepted no connection yet: the socket queues it, nobody answers
        status, why = get_page(socket_path, page, host, scheme,
                               timeout=max(1, min(10, deadline - time.monotonic())))
        if status is not None or time.monotonic() > deadline:
            return status, why
        reason = gone()
        if reason:
            return None, reason
        time.sleep(0.2)


def failed(unit):
    """Why systemd gave ``unit`` up ('UNIT failed'), or None."""
    return f"{unit} failed" if unit_state(unit)["ActiveState"] == "failed" else None


def journal(unit, invocation=None, lines=TAIL_LINES):
    """The last journal lines of a unit (of one invocation of it), as text."""
    match = [f"_SYSTEMD_INVOCATION_ID={invocation}"] if invocation else ["--unit", unit]
    result = run(["journalctl", "--no-pager", "--output=cat", f"--lines={lines}", *match],
                 f"journalctl {unit}", timeout=30, check=False)
    return tail(result.stdout)


def unit_state(unit):
    """What systemd says of a unit: UnitFileState, ActiveState and InvocationID ('' if none)."""
    result = run(["systemctl", "show", "--property=UnitFileState,ActiveState,InvocationID",
                  "--", unit], f"systemctl show {unit}", timeout=30, check=False)
    state = dict.fromkeys(("UnitFileState", "ActiveState", "InvocationID"), "")
    state.update(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return state


def read_file(path):
    """The text of a regular file (no link followed), or None if there is none."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StepFailed(f"{path}: cannot open it: {error.strerror}") from None
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise StepFailed(f"{path}: it is not a regular file")
        return file.read().decode("utf-8", "replace")


def write_file(path, text, mode=0o644):
    """Write a file of root's (a unit, a site) in one step; the directory is root's."""
    temporary = f"{path}.stagetools-{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def remove_file(path):
    """Remove a file or link of root's if it is there; True if it was."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def user_dir(base_fd, name, uid, gid, mode, check_mode):
    """Make or put right the directory ``name`` in the base dir (open as ``base_fd``): of
    ``uid``:``gid`` with ``mode``. By descriptor, never through a link the user may have put
    there: a link is refused. Returns what changed, or ''."""
    try:
        info = os.lstat(name, dir_fd=base_fd)
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISDIR(info.st_mode):
        raise StepFailed(f"{name} in the base dir: it is not a directory (a link?); remove it, "
                         "the next run makes it")
    if info is not None and (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == \
            (uid, gid, mode):
        return ""
    if check_mode:
        return f"{name}: would be made {mode:o}"
    if info is None:
        os.mkdir(name, 0o700, dir_fd=base_fd)
    descriptor = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=base_fd)
    try:
        os.fchown(descriptor, uid, gid)
        os.fchmod(descriptor, mode)
    finally:
        os.close(descriptor)
    return f"{name}: {mode:o}"


def private_file(base_fd, name, uid, check_mode):
    """The file ``name`` in the base dir (open as ``base_fd``), if it is a regular file of
    ``uid``, made unreadable by others (0600): a secret key or a database that someone made
    readable. By descriptor; a link or anything else is left alone (check reports it)."""
    try:
        info = os.lstat(name, dir_fd=base_fd)
    except FileNotFoundError:
        return ""
    if not stat.S_ISREG(info.st_mode) or info.st_uid != uid or not info.st_mode & 0o077:
        return ""
    if not check_mode:
        descriptor = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=base_fd)
        try:
            if os.fstat(descriptor).st_ino == info.st_ino:
                os.fchmod(descriptor, stat.S_IMODE(info.st_mode) & 0o700)
        finally:
            os.close(descriptor)
    return f"{name}: {stat.S_IMODE(info.st_mode) & 0o700:o} (was {stat.S_IMODE(info.st_mode):o})"


# -- root's copy of stagetools, backups and restores (installations, restore and host)

# The collection's stagetools.py on the host: the backup units run it as each installation's
# user, operators as root (check, run); the host module writes it.
ROOT_COPY = "/usr/local/lib/stagetools/stagetools.py"
# Run by root in a unit of its own that the service is ordered after: while it runs, the
# service is stopped and requests wait in the socket. Its arguments: the name, the backup,
# root's copy of stagetools, "postgresql" or "sqlite", then the workers, the jobs' timers and
# the jobs: stopped too (those there are), and a job stopped here has not failed. Python,
# not sh: no ';' and no '$' (see TRANSIENT_UNSAFE).
RESTORE_CODE = """\
import os, subprocess, sys
name, backup, copy, database = sys.argv[1:5]
others = sys.argv[5:]


def run(*argv, check=True):
    subprocess.run(argv, check=check, stdin=subprocess.DEVNULL)


run("systemctl", "stop", name + ".service")
if others:
    run("systemctl", "stop", *others, check=False)
    run("systemctl", "reset-failed", *others, check=False)
if database == "postgresql":
    run("runuser", "-u", "postgres", "--", "dropdb", "--force", name)
    run("runuser", "-u", "postgres", "--", "createdb", "--owner", name, name)
    run("runuser", "-u", "postgres", "--", "psql", "-XqAt", "-c",
        "REVOKE CONNECT, TEMPORARY ON DATABASE " + name + " FROM PUBLIC")
os.umask(0o077)
run("runuser", "-u", name, "--", "/usr/bin/python3", "-I", copy, "restore", name, backup)
"""


# Run as the installation's user: SQLite's own check of a backup, before a restore.
SQLITE_CHECK_CODE = """\
import sqlite3, sys
try:
    rows = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True).execute(
        "PRAGMA quick_check").fetchall()
except sqlite3.DatabaseError as error:
    rows = [str(error)]
sys.exit(0 if rows == [("ok",)] else "SQLite cannot restore it: " + str(rows[:3]))
"""


def stagetools_source(stagetools):
    """The text of the collection's stagetools.py, wherever Ansible put it (a file, a zip)."""
    loader = getattr(stagetools, "__loader__", None)
    source = loader.get_source(stagetools.__name__) if loader is not None else None
    if source is None:
        with open(stagetools.__file__, encoding="utf-8") as file:
            source = file.read()
    return source


def install_root_copy(stagetools, check_mode):
    """ROOT_COPY as the collection's stagetools.py (root's, 0644); what changed, or ''."""
    text = stagetools_source(stagetools)
    if read_file(ROOT_COPY) == text:
        return ""
    if not check_mode:
        os.makedirs(os.path.dirname(ROOT_COPY), mode=0o755, exist_ok=True)
        write_file(ROOT_COPY, text)
    return f"file {ROOT_COPY} (stagetools {stagetools.__version__})"


def back_up(system, label, media=False):
    """A backup of the installation into its backups dir, made by its user with root's copy
    of stagetools (as its backup unit makes one): its name, or None if there was nothing to
    back up (a SQLite database not made yet)."""
    if read_file(ROOT_COPY) is None:
        raise StepFailed(f"{ROOT_COPY} is missing: run stagetools.deploy.host first")
    command = ["/usr/bin/python3", "-I", ROOT_COPY, "backup", system.name, "--label", label]
    printed = as_user(system, command + ([] if media else ["--database-only"]), "backup",
                      umask="0077").stdout
    words = printed.split()
    return words[words.index("as") + 1] if "as" in words else None


def backups(stagetools, system):
    """The names of the installation's backups, newest first."""
    directory = str(system.backups_dir)
    if stagetools._file_kind(directory) != stagetools._DIRECTORY:
        return []
    return list(stagetools._backup_sets(directory))


def restore(stagetools, system, backup):
    """Restore ``backup`` (a name of backups()) into the installation in a unit that stops its
    service, workers and jobs, and that the service is ordered after: requests that come
    meanwhile wait in the socket until the service starts again; then the workers and the
    jobs' timers start. Returns the seconds it took."""
    if backup not in backups(stagetools, system):
        raise StepFailed(f"{system.name} has no backup {backup!r}; it has "
                         f"{', '.join(backups(stagetools, system)[:5]) or 'none'}")
    # The units there are, not those declared: after a failed migration the running release's
    # (the new commit's units are not written yet).
    units = [os.path.basename(path) for path in stagetools._scheduled_unit_files(system.name)]
    worker = f"{system.name}-worker-"
    scheduled = [unit for unit in units if unit.endswith(".timer") or unit.startswith(worker)]
    verify_backup(stagetools, system, backup)
    started = time.monotonic()
    try:
        restore_in_unit(system, backup, scheduled,
                        [unit for unit in units if unit not in scheduled])
    finally:  # a failed restore too: the workers and timers (the backup's) run again
        if scheduled:  # those there are: a first deploy's failed migration has none yet
            run(["systemctl", "start", *scheduled], "start the workers and timers again",
                check=False)
    run(["systemctl", "start", f"{system.name}.service"], "start the service again")
    return time.monotonic() - started


def verify_backup(stagetools, system, backup):
    """The backup's database is one its tool reads (pg_restore --list, SQLite's quick
    check), asked as the user: before a restore stops or drops anything."""
    path = os.path.join(str(system.backups_dir),
                        backup + stagetools._BACKUP_SUFFIXES[system.database])
    if not os.path.isfile(path):  # a backup of media/ alone (SQLite not made yet)
        return
    as_user(system, ["pg_restore", "--list", path] if system.database == "postgresql" else
            ["/usr/bin/python3", "-I", "-c", SQLITE_CHECK_CODE, path], "verify the backup")


def restore_in_unit(system, backup, scheduled, jobs):
    """RESTORE_CODE in a unit the service is ordered after."""
    run(["systemd-run", "--quiet", "--wait", "--pipe", "--collect",
         f"--unit={system.name}-restore", "--property=Type=oneshot",
         f"--property=Before={system.name}.service", "--", "/usr/bin/python3", "-I", "-c",
         RESTORE_CODE, system.name, backup, ROOT_COPY, system.database, *scheduled, *jobs],
        "restore", cwd="/")
