"""The documentation's examples, run against what the code does today (with Sybil).

- ```` ```console ```` blocks: each ``$ command`` is run, and what it prints (stdout and
  stderr, in order) must be the lines below it, up to the next ``$``. ``...`` stands for any
  text, as in doctest's ELLIPSIS: the part of an output a page leaves out. A command may go
  on over lines that end in ``\\``.
- ```` ```python ```` blocks that start with ``>>>`` are doctests; other Python blocks are
  files to read (settings.py, an app), not run.
- ``<!-- example-host: commands -->`` runs commands on the page's host without showing them
  (a file the next example needs); they must succeed.
- ``<!-- example-requires: root -->``: the page's examples from here on skip when not run as
  root (they fail instead in CI, which is root). In the user namespace of another user, the
  machine's own files (``/`` among them) belong to nobody, and ``new`` rightly refuses to
  build below a directory that someone else owns.

Every page has its own host: a Linux machine as a newcomer's is when stagetools has built
nothing yet. Commands run in a user and mount namespace (``unshare``, no root needed) as
its root, with the checkout read-only at ``/home/ann/src/stagetools`` (the working
directory), their own ``/home``, ``/tmp`` and ``/run``, an ``/etc/passwd`` of root,
www-data, nobody and ann, and empty ``/etc/systemd/system`` and
``/etc/nginx``: so what they print does not depend on the machine's users or files, and
they change nothing outside the page's host. ``python3`` is Debian's ``/usr/bin/python3``.
The network is the machine's (``new`` installs from PyPI).
"""

import doctest
import difflib
import os
import shlex
import shutil
import subprocess
import tempfile

import pytest
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer
from sybil.parsers.myst import CodeBlockParser, PythonCodeBlockParser

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKOUT_ON_HOST = "/home/ann/src/stagetools"
STEP_TIMEOUT = 900  # seconds for one block: `new` installs Django and three servers
MARK = "\x1e-- docs example, command {} --"  # between the outputs of a block's commands

_PASSWD = """\
root:x:0:0:root:/root:/bin/bash
www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin
ann:x:1000:1000:Ann:/home/ann:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
_GROUP = "root:x:0:\nwww-data:x:33:\nann:x:1000:\nnogroup:x:65534:\n"
# Run by bash as root of the new namespaces: the page's host over the machine's.
_ENTER = """\
set -eu
host=$1
# The checkout first, into the host's /home: it may itself be below /home or /tmp.
mount --bind -o ro "$2" "$host/home/ann/src/stagetools"
mount --bind "$host/passwd" /etc/passwd
mount --bind "$host/group" /etc/group
mount --rbind "$host/home" /home
for dir in /etc/systemd/system /etc/nginx /etc/letsencrypt /var/lib/stagetools; do
    if [ -d "$dir" ]; then mount -t tmpfs -o mode=755 tmpfs "$dir"; fi
done
mount -t tmpfs -o mode=755 tmpfs /run
mount --bind "$host/tmp" /tmp
cd /home/ann/src/stagetools
exec bash -c "$3"
"""


class Host:
    """One page's host: a directory of the files its commands see and change."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="stagetools-docs-host-")
        os.makedirs(os.path.join(self.dir, "home", "ann", "src", "stagetools"))
        os.mkdir(os.path.join(self.dir, "tmp"))
        os.chmod(os.path.join(self.dir, "tmp"), 0o1777)
        for name, text in (("passwd", _PASSWD), ("group", _GROUP), ("enter", _ENTER)):
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(text)

    def run(self, script):
        """Run a bash script on the host: (exit code, what it printed)."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/root", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "TERM": "dumb",
               "COLUMNS": "100"}
        env.update((key, value) for key, value in os.environ.items() if key.startswith("PIP_"))
        command = ["unshare", "--user", "--map-root-user", "--mount", "--propagation",
                   "private", "bash", os.path.join(self.dir, "enter"), self.dir, CHECKOUT,
                   script]
        try:
            result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env, timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired as error:
            return None, f"timed out after {STEP_TIMEOUT} s: {error.output!r}"
        return result.returncode, result.stdout.decode("utf-8", "replace")

    def remove(self):
        def writable(function, path, _):  # a 0500 dir that a command left
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700) if os.path.isdir(path) else None
            function(path)
        shutil.rmtree(self.dir, onerror=writable)


def sandbox_problem():
    """Why the examples cannot run on this machine, or None."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return f"user namespaces are not available: {result.stderr.strip()}"
    if subprocess.run(["/usr/bin/python3", "-c", "import ensurepip"],
                      capture_output=True).returncode != 0:
        return "/usr/bin/python3 has no venv module (apt-get install python3-venv)"
    return None


def _skip_or_fail(problem):
    if os.environ.get("STAGETOOLS_CI") == "1":
        pytest.fail(f"the documentation's examples cannot run in CI: {problem}")
    pytest.skip(problem)


def console_steps(text):
    """[(command, expected output)] of a console block."""
    steps = []
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command += "\n" + next(lines)
            steps.append((command, []))
        elif not steps:
            raise ValueError(f"a console block starts with output, not '$ ': {line!r}")
        else:
            steps[-1][1].append(line)
    return [(command, "\n".join(output)) for command, output in steps]


def _matches(expected, actual):
    expected = "\n".join(line.rstrip() for line in expected.strip("\n").splitlines())
    actual = "\n".join(line.rstrip() for line in actual.strip("\n").splitlines())
    return expected == actual or doctest.OutputChecker().check_output(
        expected + "\n", actual + "\n", doctest.ELLIPSIS)


def _host(example):
    problem = sandbox_problem_once() or example.namespace.get("requires")
    if problem:
        _skip_or_fail(problem)
    namespace = example.namespace
    if "host" not in namespace:
        namespace["host"] = Host()
    return namespace["host"]


_SANDBOX = []


def sandbox_problem_once():
    if not _SANDBOX:
        _SANDBOX.append(sandbox_problem())
    return _SANDBOX[0]


class ConsoleParser(CodeBlockParser):
    """```console blocks: commands and what they print."""

    language = "console"

    def evaluate(self, example):
        steps = console_steps(example.parsed)
        script = ["exec 2>&1"]
        for number, (command, _) in enumerate(steps):
            # The mark keeps $? for a following `echo $?`.
            script.append(f"__rc=$?; printf '\\n%s\\n' {shlex.quote(MARK.format(number))}; "
                          f"(exit $__rc); {command}")
        returncode, output = _host(example).run("\n".join(script))
        if returncode is None:
            return output
        outputs = output.split("\n" + MARK.format(0) + "\n", 1)[-1]
        for number, (command, expected) in enumerate(steps):
            parts = outputs.split("\n" + MARK.format(number + 1) + "\n", 1)
            actual, outputs = parts[0], parts[1] if len(parts) > 1 else ""
            if not _matches(expected, actual):
                diff = "\n".join(difflib.unified_diff(
                    expected.strip("\n").splitlines(), actual.strip("\n").splitlines(),
                    "the page", "the tool today", lineterm=""))
                return f"$ {command}\nprints something else than the page says:\n{diff}"
        return None


class HostSetupParser:
    """<!-- example-host: commands -->: run on the page's host, not shown."""

    def __init__(self):
        self.lexer = DirectiveInHTMLCommentLexer(directive="example-host")

    def __call__(self, document):
        for region in self.lexer(document):
            # <!-- example-host: one command --> or the commands on the lines below
            region.parsed = f"{region.lexemes['arguments']}\n{region.lexemes['source']}"
            region.evaluator = self.evaluate
            yield region

    @staticmethod
    def evaluate(example):
        returncode, output = _host(example).run(example.parsed)
        if returncode != 0:
            return f"the page's host setup failed ({returncode}):\n{example.parsed}\n{output}"
        return None


class RequiresParser:
    """<!-- example-requires: root -->: the page's later examples need root."""

    def __init__(self):
        self.lexer = DirectiveInHTMLCommentLexer(directive="example-requires", arguments="root")

    def __call__(self, document):
        for region in self.lexer(document):
            region.parsed = region.lexemes["arguments"]
            region.evaluator = self.evaluate
            yield region

    @staticmethod
    def evaluate(example):
        if os.geteuid() != 0:
            example.namespace["requires"] = (
                "needs root: in a user namespace of another user / belongs to nobody, and new "
                "refuses to build below a directory someone else owns")
        return None


class DocTestParser(PythonCodeBlockParser):
    """```python blocks that are doctests (>>>); the others are files to read."""

    def __call__(self, document):
        for region in self.codeblock_parser(document):
            source = region.parsed
            if source.startswith(">>>"):
                for doctest_region in self.doctest_parser(source, document.path):
                    doctest_region.adjust(region, source)
                    yield doctest_region


def teardown(namespace):
    host = namespace.pop("host", None)
    if host is not None:
        host.remove()
