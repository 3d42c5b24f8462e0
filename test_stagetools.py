"""Tests of stagetools: run with ``bash .ci/run`` (or pytest in a venv with the test extra).

Real components: virtualenvs, Django served by uvicorn, hypercorn and gunicorn,
a throwaway PostgreSQL cluster, systemd-analyze, nginx. Tests that need root or
a missing binary skip with the reason on a developer box; CI is root and has all.
"""

import contextlib
import copy
import glob
import grp
import http.client
import importlib.metadata
import json
import os
import pickle
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import stagetools

HERE = Path(__file__).resolve().parent
STAGETOOLS = HERE / "stagetools.py"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# .ci/run sets it as root: there nothing may skip, so a missing piece fails the run.
IN_CI = os.environ.get("STAGETOOLS_CI") == "1"
needs_root = pytest.mark.skipif(not (IS_ROOT or IN_CI), reason="needs root (CI runs as root)")
# Installations served as their own users need a Python those users may run.
SYSTEM_PYTHON = "/usr/bin/python3"
# Made by the shared_dir fixture: a copy of the modules that every user may read.
SHARED_DIR = Path(f"/tmp/stagetools-test-{os.getpid()}")
WAIT_SECONDS = 60


# ---------------------------------------------------------------- helpers


def skip(reason):
    """Skip on a developer box; in CI the test fails instead, with the reason."""
    if IN_CI:
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def clean_env(**extra):
    env = {key: value for key, value in os.environ.items()
           if key not in (stagetools.ENV_NAME, "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def run(command, check=True, **kwargs):
    """Run a command in its own session: on timeout its whole group is killed (pip under
    runuser under stagetools new, say), not just the command."""
    kwargs.setdefault("env", clean_env())
    process = subprocess.Popen([str(part) for part in command], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        stop_group(process, 9)
        raise AssertionError(f"{command} did not finish within 600 s") from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} exited {result.returncode}:\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


def cli(*args, python=sys.executable, script=STAGETOOLS, **kwargs):
    return run([python, script, *args], check=False, **kwargs)


def show_json(*args, **kwargs):
    """show --json: the system's attributes; the version that printed them is checked here."""
    result = cli("show", *args, "--json", **kwargs)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data.pop("stagetools_version") == stagetools.__version__
    return data


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(where, path, headers=None, method="GET", body=None):
    """One request to ('127.0.0.1', port) or a Unix socket path; returns (status, headers, body)."""
    if isinstance(where, tuple):
        connection = http.client.HTTPConnection(*where, timeout=10)
    else:
        connection = _UnixHTTPConnection(where)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(self.unix_path))


def wait_for_http(where, process, path="/", log=None):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}: {read_log(log)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            return http_get(where, path)
        time.sleep(0.2)
    raise AssertionError(f"server did not answer within {WAIT_SECONDS} s: {read_log(log)}")


def read_log(log):
    return Path(log).read_text(errors="replace")[-3000:] if log else ""


@contextlib.contextmanager
def serving(command, where, log, **kwargs):
    """Run a server until the block ends; it must answer at ``where`` first."""
    with open(log, "w") as output:
        process = subprocess.Popen([str(part) for part in command], stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    try:
        wait_for_http(where, process, log=log)
        yield process
    finally:
        stop_group(process)


def stop_group(process, signal=15):
    """Signal the session a process leads, SIGKILL after 15 s, and wait for the process."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait(timeout=15)


def other_workers_pages(where, path, cookie, first, rounds=20):
    """Pages answered with ``cookie`` by workers other than ``first``, which set it.

    Requests go out eight at a time, so that every worker of the server gets some.
    """
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:
        for _ in range(rounds):
            answers = pool.map(lambda _: http_get(where, path, {"Cookie": cookie}), range(8))
            pages = [json.loads(body) for status, _, body in answers if status == 200]
            others = [page for page in pages if page["pid"] != first]
            if others:
                return others
    raise AssertionError(f"{rounds} rounds of 8 requests all went to worker {first}")


def run_to_failure(command, log, **kwargs):
    """Run a server that must refuse to start; kill its whole group if it does not."""
    with open(log, "w") as output:
        process = subprocess.Popen([str(part) for part in command], stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        try:
            process.wait(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            stop_group(process, 9)
    return process.returncode, Path(log).read_text()


def new_installation(directory, *args, user=None, env=None):
    """Create an installation with the README's one-command start, under the common umask
    022 (new must keep the installation's files private all the same).

    As another user it runs the copy of stagetools.py in the shared directory: that user
    may not be able to read the checkout (a clone in a 0700 directory)."""
    command = [sys.executable, STAGETOOLS, "new", directory, *args]
    if user:
        command = ["runuser", "-u", user, "--", SYSTEM_PYTHON, SHARED_DIR / "stagetools.py",
                   "new", directory, "--python", SYSTEM_PYTHON, *args]
    result = run(["sh", "-c", 'umask 022 && exec "$@"', "sh", *command], check=False,
                 env=env or clean_env(), cwd="/")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# ---------------------------------------------------------------- the naming convention

SHOP_PROD = {
    "name": "shop_prod", "name_source": "argument", "user": "shop_prod", "group": "shop_prod",
    "container": "shop-prod", "configuration": "shop", "stage_name": "prod", "stage": "prod",
    "core_repo": "shop", "core_app": "shop", "is_debug": False, "framework": "django",
    "server": "gunicorn", "database": "sqlite", "host_names": [], "is_https": False,
    "base_dir": "/home/shop_prod", "venv_dir": "/home/shop_prod",
    "bin_dir": "/home/shop_prod/bin", "lib_dir": "/home/shop_prod/lib",
    "src_dir": "/home/shop_prod/src", "python_path": "/home/shop_prod/bin/python",
    "pip_path": "/home/shop_prod/bin/pip", "core_repo_dir": "/home/shop_prod/src/shop",
    "releases_dir": "/home/shop_prod/releases", "static_url": "static/", "static_dir": "/home/shop_prod/static",
    "media_url": "media/", "media_dir": "/home/shop_prod/media",
    "backups_dir": "/home/shop_prod/backups", "run_dir": "/run/shop_prod", "socket_path": "/run/shop_prod/shop_prod.sock",
    "secret_key_path": "/home/shop_prod/secret_key",
    "certificate_dir": "/etc/letsencrypt/live/shop_prod",
    "acme_challenge_dir": "/var/lib/stagetools/acme",
    "application_name": "application", "asgi_module": "stagetools_django",
    "asgi_application": "stagetools_django:asgi_application",
    "wsgi_module": "stagetools_django",
    "wsgi_application": "stagetools_django:wsgi_application",
    "django_project": "stagetools_project", "django_settings": "stagetools_project.settings",
    "django_rooturls": "stagetools_project.urls",
    "django_wsgi_application": "stagetools_django.wsgi_application",
    "manage_py_path": "/home/shop_prod/src/shop/manage.py",
    "database_name": "shop_prod", "database_user": "shop_prod",
    "database_sqlite_path": "/home/shop_prod/shop.sqlite",
    "database_socket_dir": "/var/run/postgresql",
    "database_host": "", "database_tls_dir": "/home/shop_prod/.postgresql",
    # PROD's rule for this machine's cores (test_capacity__... covers other core counts)
    "workers": min(2 * (os.cpu_count() or 1) + 1, 12), "threads": 4, "idle_stop": 0,
    # QUAL and PROD back up every night unless they declare otherwise
    "jobs": {}, "background_workers": {},
    "backup": {"calendar": "daily", "keep_count": 7, "keep_days": None,
               "service": "shop_prod-backup.service", "timer": "shop_prod-backup.timer"},
}


def expected_attributes(name, base_dir, configuration, stage_name, stage, core_repo,
                        core_app=None, **overrides):
    """SHOP_PROD's table, written out again for another name (no derivation code shared)."""
    core_app = core_app or core_repo
    b = base_dir
    values = {
        "name": name, "name_source": "argument", "user": name, "group": name,
        "container": name.replace("_", "-"), "configuration": configuration,
        "stage_name": stage_name, "stage": stage, "core_repo": core_repo, "core_app": core_app,
        "is_debug": stage in ("dev", "int"), "framework": "django", "server": "gunicorn",
        "base_dir": b, "venv_dir": b, "bin_dir": f"{b}/bin", "lib_dir": f"{b}/lib",
        "src_dir": f"{b}/src", "python_path": f"{b}/bin/python", "pip_path": f"{b}/bin/pip",
        "core_repo_dir": f"{b}/src/{core_repo}", "releases_dir": f"{b}/releases",
        "static_url": "static/",
        "static_dir": f"{b}/static", "media_url": "media/", "media_dir": f"{b}/media",
        "backups_dir": f"{b}/backups", "run_dir": f"/run/{name}", "socket_path": f"/run/{name}/{name}.sock",
        "secret_key_path": f"{b}/secret_key", "certificate_dir": f"/etc/letsencrypt/live/{name}",
        "manage_py_path": f"{b}/src/{core_repo}/manage.py",
        "database_name": name, "database_user": name,
        "database_sqlite_path": f"{b}/{core_repo}.sqlite",
        "database_tls_dir": f"{b}/.postgresql",
    }
    if stage in ("dev", "int"):  # one worker, stopped when idle, no backup
        values.update(workers=1, idle_stop=900, backup=None)
    else:
        values["backup"] = dict(SHOP_PROD["backup"], service=f"{name}-backup.service",
                                timer=f"{name}-backup.timer")
    values.update(overrides)
    return {**SHOP_PROD, **values}


def attributes(system):
    data = system.as_dict()
    del data["services"]
    return data


def test_shop_prod__every_attribute():
    system = stagetools.get_expected_system_from_name("shop_prod")
    assert attributes(system) == SHOP_PROD
    assert system.stage is stagetools.Stage.PROD == stagetools.STAGE_PROD == 0
    assert isinstance(system.base_dir, Path)


def test_my_shop_dsven__splits_at_the_last_underscore():
    system = stagetools.get_expected_system_from_name("my_shop_dsven")
    assert attributes(system) == expected_attributes(
        "my_shop_dsven", "/home/my_shop_dsven", "my_shop", "dsven", "dev", "my_shop")
    assert system.stage == stagetools.STAGE_DEV == 3 and system.is_debug


def test_acme_p2__core_repo_given():
    system = stagetools.get_expected_system_from_name("acme_p2", core_repo="shop")
    assert attributes(system) == expected_attributes(
        "acme_p2", "/home/acme_p2", "acme", "p2", "prod", "shop")
    assert not system.is_debug


def test_core_app_given_and_base_dir_given(tmp_path):
    system = stagetools.get_expected_system_from_name(
        "shop_int", base_dir=tmp_path / "shop_int", core_app="shopcore")
    assert attributes(system) == expected_attributes(
        "shop_int", f"{tmp_path}/shop_int", "shop", "int", "int", "shop", core_app="shopcore")
    assert system.is_debug and system.stage == stagetools.STAGE_INT == 2


def test_qual_is_not_debug():
    system = stagetools.get_expected_system_from_name("shop_qual")
    assert system.stage == stagetools.STAGE_QUAL == 1 and not system.is_debug


def test_module_constants_are_the_stage_levels():
    assert [int(stage) for stage in stagetools.STAGES] == [0, 1, 2, 3]
    assert (stagetools.STAGE_PROD, stagetools.STAGE_QUAL, stagetools.STAGE_INT,
            stagetools.STAGE_DEV) == (0, 1, 2, 3)
    assert set(stagetools.DEBUG_STAGES) == {stagetools.STAGE_DEV, stagetools.STAGE_INT}


BAD_NAMES = {
    "": "the name is empty",
    "shop": "no underscore",
    "_prod": "the configuration before the last underscore is empty",
    "shop_": "the stage name after the last underscore is empty",
    "shop_xprod": "does not start with a stage letter",
    "shop_2prod": "does not start with a stage letter",
    "Shop_prod": "uppercase",
    "shop prod_dev": "whitespace",
    "shop_prod ": "whitespace",
    "shöp_prod": "non-ASCII",
    "../shop_prod": "path characters",
    "shop/x_prod": "path characters",
    "shop-x_prod": "the characters '-'",
    "1shop_prod": "must start with a letter",
    "a" * 28 + "_prod": "more than the 32",
    "pg_prod": "PostgreSQL reserves role names that start with 'pg_'",
}


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_name__refused_with_the_rule(name):
    with pytest.raises(stagetools.StagetoolsError) as raised:
        stagetools.get_expected_system_from_name(name)
    message = str(raised.value)
    assert repr(name) in message and BAD_NAMES[name] in message
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_name__exit_2_one_line_no_traceback(name):
    result = cli("show", name, "--expected")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert repr(name) in result.stderr and BAD_NAMES[name] in result.stderr


def test_32_characters_are_fine():
    assert stagetools.parse_name("a" * 27 + "_prod")[2] is stagetools.Stage.PROD


@pytest.mark.parametrize("args", [["show", "shop_prod", "--bogus"], ["frobnicate"], [],
                                  ["show", "shop_prod", "--base-dir", "/x"],
                                  ["show", "shop_prod", "--expected", "--base-dir", "rel"],
                                  ["show", "shop_prod", "--expected", "--core-repo", "a/b"],
                                  ["show", "shop_prod", "--expected", "--framework", "rails"]])
def test_bad_options__exit_2(args):
    result = cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("stagetools: error: ") and result.stderr.count("\n") == 1


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="abdipqz_09Z -/.\u00e9", max_size=40)))
def test_any_string__a_system_or_our_error(name):
    try:
        system = stagetools.get_expected_system_from_name(name)
    except stagetools.StagetoolsError as error:
        assert repr(name) in str(error)
    else:
        assert system.name == name and system.configuration + "_" + system.stage_name == name
        assert len(name) <= 32 and system.stage_name[0] in "pqid"


# ---------------------------------------------------------------- values that reach rendered files

HOSTILE_BASE_DIRS = {
    # An nginx location of its own: passed `nginx -t` and served /etc/passwd when rendered.
    "/srv/x/;}location ~ ^/leak/(.*)$ {alias /etc/$1;}location ~ ^/z {alias /srv/x":
        "the characters ' $()*;^{}~'",
    "/srv/shop prod": "the characters ' '",  # a space splits BindPaths=
    "/srv/%h": "the characters '%'",  # systemd expands specifiers
    "/srv/${HOME}": "the characters '${}'",  # and environment variables
    "/srv/x\nExecStartPre=/bin/sh": "the characters '\\n='",  # a line of its own
    "/srv/\u0161hop": "the characters '\u0161'",
    "srv/x": "it must be an absolute path",
    "/srv/../etc": "it is not normalised",
    "/srv/x/": "it is not normalised",
    "//srv/x": "it is not normalised",
    "/srv/./x": "it is not normalised",
    "/": "it is the root directory",
}


@pytest.mark.parametrize("base_dir", HOSTILE_BASE_DIRS)
def test_base_dir__hostile_or_unclear__refused_exit_2(base_dir):
    result = cli("show", "x_prod", "--expected", "--json", "--base-dir", base_dir)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert repr(base_dir) in result.stderr and HOSTILE_BASE_DIRS[base_dir] in result.stderr


# The rules as the README states them, written here independently of the module.
SAFE_BASE_DIR = re.compile(r"(/[A-Za-z0-9._-]+)+")
SAFE_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PLACEHOLDERS = {"base_dir": "/srv/zz9placeholder", "core_repo": "zz9placeholder",
                "core_app": "zz9placeholder", "host_names": "zz9placeholder.test"}
# A DNS name as RFC 1123 has it, lowercase, two labels or more, the last not all digits.
SAFE_HOST_NAME = re.compile(r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
                            r"(?![0-9]+$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
ANY_VALUE = st.one_of(st.text(), st.text(alphabet="/ab_9.-%${};~\n\\'\"# \u00e9", max_size=30),
                      # values the rules accept, so that the rendering is checked too
                      st.from_regex(r"(/[A-Za-z0-9._-]{1,8}){1,4}", fullmatch=True),
                      st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
                      st.from_regex(r"[a-z0-9-]{1,8}(\.[a-z0-9-]{1,8}){1,3}", fullmatch=True),
                      st.sampled_from(["gunicorn", "uvicorn", "hypercorn", "flask",
                                       "starlette"]))


def obeys_the_rules(field, value):
    """The README's rule for a base dir, an identifier or a host name, written here
    independently."""
    import keyword
    if field == "host_names":  # and no local name: NAME-with-dashes.localhost is each site's
        return SAFE_HOST_NAME.fullmatch(value) is not None and \
            value.rsplit(".", 1)[-1] != "localhost"
    if field == "base_dir":
        return (SAFE_BASE_DIR.fullmatch(value) is not None and "/./" not in value + "/"
                and "/../" not in value + "/")
    if field == "core_app":  # a module: identifiers joined by dots
        return all(SAFE_IDENTIFIER.fullmatch(part) is not None and not keyword.iskeyword(part)
                   for part in value.split("."))
    return SAFE_IDENTIFIER.fullmatch(value) is not None and not keyword.iskeyword(value)


@settings(max_examples=500, deadline=None)
@given(field=st.sampled_from(sorted(PLACEHOLDERS)), value=ANY_VALUE)
def test_any_value__refused_or_rendered_on_its_own_lines_only(field, value):
    assume(value != "")  # the same as not given: the default
    # Host names come from the declaration (given ones only repeat it): its parser's value.
    given = (lambda value: {"declared": {"host_names": stagetools._DECLARED["host_names"](value)}}
             if field == "host_names" else {field: value})
    assume(field != "host_names" or not any(char.isspace() for char in value))  # 2 names
    try:
        files = stagetools.get_expected_system_from_name("x_prod", **given(value)).services
    except stagetools.StagetoolsError as error:
        assert repr(value) in str(error) and "\n" not in str(error)
        assert not obeys_the_rules(field, value), error  # only what the rules refuse
        return
    assert obeys_the_rules(field, value)
    placeholder = PLACEHOLDERS[field]
    reference = stagetools.get_expected_system_from_name("x_prod", **given(placeholder))
    assert sorted(files) == sorted(path.replace(placeholder, value)
                                   for path in reference.services)
    for path, text in reference.services.items():
        lines = files[path.replace(placeholder, value)].splitlines()
        # Line for line the reference with the value in the placeholder's place: no new
        # line, no other directive, nothing around the value changed.
        assert lines == [line.replace(placeholder, value) for line in text.splitlines()]


@settings(max_examples=150, deadline=None)
@given(option=st.sampled_from(["--base-dir", "--core-repo", "--core-app", "--server",
                               "--framework", "--host-name"]), value=ANY_VALUE)
def test_any_option_value__exit_2_one_line_or_json(option, value):
    import io
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            returncode = stagetools.main(["show", "x_prod", "--expected", "--json",
                                          f"{option}={value}"])
        except SystemExit as exit:  # argparse's own exits (none expected)
            returncode = exit.code
    if returncode == 0:
        assert json.loads(stdout.getvalue())["name"] == "x_prod" and stderr.getvalue() == ""
    else:
        assert returncode == 2 and stdout.getvalue() == ""
        assert stderr.getvalue().startswith("stagetools: error: ")
        assert stderr.getvalue().count("\n") == 1


# ---------------------------------------------------------------- the declaration of a repo

BAD_DECLARATIONS = {
    "[stagetools]\nframework = rails\n":
        "line 2: framework = 'rails' is none of the choices; choose one of django, flask",
    "[stagetools]\nframework: flask\n": "line 2 is not 'key = value' in a section",
    "framework = flask\n": "line 1 is not 'key = value' in a section",
    "[stagetools]\nport = 8000\n": "line 2: 'port' is no choice",
    "[stagetools]\nworkers = 0\n": "line 2: workers = '0': not a whole number from 1 to 64",
    "[stagetools]\nthreads = four\n": "threads = 'four': not a whole number from 1 to 64",
    "[stagetools]\nidle_stop = soon\n": "idle_stop = 'soon': neither never nor seconds",
    "[prod]\nidle_stop = 60\n": "idle_stop = 60 for PROD: QUAL and PROD never stop",
    "[stagetools]\nserver = uvicorn\nthreads = 2\n": "threads = 2: uvicorn has no threads",
    "[other]\nframework = flask\n": "line 1: the section [other] is unknown",
    "[prod]\n[prod]\n": "line 2: the section [prod] is there twice",
    "[stagetools]\nserver = gunicorn\nserver = uvicorn\n": "line 3: 'server' is declared twice",
    "[stagetools]\nframework = flask\nserver = uvicorn\n": "server = uvicorn is not a server for flask",
}


def test_declaration__read_by_show_and_by_the_installation_flags_cannot_contradict(tmp_path):
    venv = tmp_path / "shop_prod"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    repo = venv / "src" / "shop"
    repo.mkdir(parents=True)
    declaration = repo / "stagetools.ini"
    declaration.write_text("# ours\n[stagetools]\nframework = starlette\n; the default server\n"
                           "database = postgresql\n")
    expected = show_json("shop_prod", "--expected", "--base-dir", venv)
    actual = show_json(python=venv / "bin" / "python")  # the installation's own Python
    for data in (expected, actual):
        assert (data["framework"], data["server"], data["database"]) == (
            "starlette", "uvicorn", "postgresql")
        assert data["asgi_application"] == "shop:application"
    assert show_json("shop_prod", "--expected", "--base-dir", venv, "--database",
                     "postgresql") == expected  # a flag that agrees is fine
    result = cli("show", "shop_prod", "--expected", "--base-dir", venv, "--framework", "flask")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert (f"framework 'flask': the repo declares framework = starlette in '{declaration}'; "
            "leave the framework out") in result.stderr
    import configparser  # the same file is INI to everybody else, and reads the same
    parser = configparser.ConfigParser()
    parser.read(declaration)
    assert dict(parser["stagetools"]) == stagetools.read_declaration(repo) == {
        "framework": "starlette", "database": "postgresql"}
    for text, rule in BAD_DECLARATIONS.items():
        declaration.write_text(text)
        result = cli("show", "shop_prod", "--expected", "--base-dir", venv)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, text
        assert rule in result.stderr and "Traceback" not in result.stderr, result.stderr
    # A deploy tool's copy of the version it deploys wins over the repo on disk.
    (tmp_path / "next.ini").write_text("[stagetools]\nframework = flask\n")
    assert show_json("shop_prod", "--expected", "--base-dir", venv, "--declaration",
                     tmp_path / "next.ini")["framework"] == "flask"
    result = cli("show", "shop_prod", "--expected", "--declaration", tmp_path / "none.ini")
    assert result.returncode == 2 and "there is no such file" in result.stderr
    # One repo, several installations: a stage's section, then an installation's, win.
    declaration.write_text("[stagetools]\nserver = gunicorn\n[prod]\ndatabase = postgresql\n"
                           "[shop_dev]\nserver = uvicorn\n")
    choices = {name: show_json(name, "--expected", "--base-dir", tmp_path / name / "x" / name,
                               "--declaration", declaration)
               for name in ("shop_prod", "acme_prod", "shop_dev", "shop_qual")}
    assert {name: (data["server"], data["database"]) for name, data in choices.items()} == {
        "shop_prod": ("gunicorn", "postgresql"), "acme_prod": ("gunicorn", "postgresql"),
        "shop_dev": ("uvicorn", "sqlite"), "shop_qual": ("gunicorn", "sqlite")}
    declaration.unlink()
    (tmp_path / "elsewhere.ini").write_text("[stagetools]\nframework = flask\n")
    declaration.symlink_to(tmp_path / "elsewhere.ini")
    result = cli("show", "shop_prod", "--expected", "--base-dir", venv)
    assert result.returncode == 2 and "is a symbolic link" in result.stderr


def test_declaration__core_app_a_module_declared_once(tmp_path):
    """A core app not named like the repo is declared where both sides read it: a module path
    (an app inside the settings package is 'mysite.articles'); a given one may only repeat it."""
    text = "[stagetools]\nframework = flask\ncore_app = books\n[shop_dev]\ncore_app = mysite.articles\n"
    assert stagetools.parse_declaration(text, "shop_prod") == {"framework": "flask",
                                                               "core_app": "books"}
    prod = stagetools.get_expected_system_from_name(
        "shop_prod", declared=stagetools.parse_declaration(text, "shop_prod"))
    assert (prod.core_app, prod.wsgi_application, prod.core_repo) == (
        "books", "books:application", "shop")
    dev = stagetools.get_expected_system_from_name(
        "shop_dev", declared=stagetools.parse_declaration(text, "shop_dev"))
    assert dev.core_app == "mysite.articles"
    assert stagetools.get_expected_system_from_name(
        "shop_prod", core_app="books", declared={"core_app": "books"}).core_app == "books"
    with pytest.raises(stagetools.StagetoolsError, match="the repo declares core_app = books"):
        stagetools.get_expected_system_from_name("shop_prod", core_app="other",
                                                 declared={"core_app": "books"})
    for value in ("books-1", "mysite..articles", "class", "mysite.class", "bücher"):
        with pytest.raises(stagetools.StagetoolsError, match="line 2: invalid core_app"):
            stagetools.parse_declaration(f"[stagetools]\ncore_app = {value}\n", "shop_prod",
                                         "the declaration")
    # new writes a core app of its own into the declaration, not into aaa_env_setup.py
    files = stagetools.render_starter(stagetools.get_expected_system_from_name(
        "library_dev", core_app="books", framework="flask", declared={}))
    assert "core_app = books\n" in files["stagetools.ini"]
    assert "core_app" not in files["aaa_env_setup.py"] and "books/__init__.py" in files
    result = cli("new", tmp_path / "library_dev", "--core-app", "library.books")
    assert result.returncode == 2 and "give a name without dots" in result.stderr


RECORD = {"name": "shop_qual", "commit": "a" * 40, "repo": "/srv/git/shop", "version": "v2",
          "core_repo": "shop", "declaration": "[stagetools]\nserver = gunicorn\n",
          "previous": None, "deployed_at": "2026-12-01T12:00:00Z"}


@contextlib.contextmanager
def recorded(record, directory):
    """Root's record of a deployment, written to ``directory`` (stagetools' _RECORD_DIR for
    the time being) as the collection writes it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stagetools, "_RECORD_DIR", str(directory))
        stagetools._write_record(record)
        yield directory / f"{record['name']}.json"


@pytest.mark.skipif(not IS_ROOT and not IN_CI, reason="the record is root's: needs root")
def test_record__root_s_alone_of_a_record_s_shape(tmp_path):
    with recorded(RECORD, tmp_path) as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.stat().st_uid == 0
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(stagetools, "_RECORD_DIR", str(tmp_path))
            assert stagetools._read_record("shop_qual") == RECORD
            assert stagetools._read_record("shop_dev") is None
            expected = stagetools._expected_from_record(RECORD)
            assert (expected.server, expected.core_repo) == ("gunicorn", "shop")
            with pytest.raises(stagetools.StagetoolsError, match="deployed with core_repo"):
                stagetools._expected_from_record(RECORD, core_repo="other")
            claimed = dict(RECORD, commit=None, declaration=None)  # made, never served
            assert stagetools._expected_from_record(claimed).server == "gunicorn"
            for broken, rule in ((lambda: path.chmod(0o666), "it is not root's alone"),
                                 (lambda: os.chown(path, 65534, 0), "it is not root's alone"),
                                 (lambda: path.write_text("{}"), "it is not a record"),
                                 (lambda: path.write_text(json.dumps(dict(RECORD, commit="x"))),
                                  "it is not a record"),
                                 (lambda: path.write_text("["), "it is not JSON")):
                stagetools._write_record(RECORD)
                broken()
                with pytest.raises(stagetools.StagetoolsError, match=rule):
                    stagetools._read_record("shop_qual")
            path.unlink()
            path.symlink_to(tmp_path / "elsewhere.json")
            with pytest.raises(stagetools.StagetoolsError, match="it is a symbolic link"):
                stagetools._read_record("shop_qual")
            with pytest.raises(stagetools.StagetoolsError, match="invalid installation name"):
                stagetools._read_record("../etc")


# ---------------------------------------------------------------- a database on another host

POSTGRESQL = {"database": "postgresql"}


def test_topology__the_database_host_from_root_s_file(tmp_path, monkeypatch):
    """The deploy writes which host serves an installation's database; the installation's
    own system reads it: its DATABASES and URL go there by TLS with its certificate."""
    monkeypatch.setattr(stagetools, "_TOPOLOGY_DIR", str(tmp_path))
    local = stagetools.get_expected_system_from_name("shop_prod", declared=POSTGRESQL)
    assert local.database_host == "" and local.database_tls_dir.name == ".postgresql"
    assert stagetools.django_database(local)["HOST"] == "/var/run/postgresql"
    assert stagetools._write_topology("shop_prod", "db1.example.com") is True
    assert stagetools._write_topology("shop_prod", "db1.example.com") is False
    system = stagetools.get_expected_system_from_name("shop_prod", declared=POSTGRESQL)
    assert system.database_host == "db1.example.com"
    tls = "/home/shop_prod/.postgresql"
    assert stagetools.django_database(system) == {
        "ENGINE": "django.db.backends.postgresql", "NAME": "shop_prod", "USER": "shop_prod",
        "PASSWORD": "", "HOST": "db1.example.com", "PORT": "5432",
        "OPTIONS": {"sslmode": "verify-full", "sslrootcert": f"{tls}/root.crt",
                    "sslcert": f"{tls}/postgresql.crt", "sslkey": f"{tls}/postgresql.key"}}
    assert stagetools.database_url(system) == (
        "postgresql://shop_prod@db1.example.com:5432/shop_prod?sslmode=verify-full&"
        f"sslrootcert={tls}/root.crt&sslcert={tls}/postgresql.crt&sslkey={tls}/postgresql.key")
    storage = stagetools._shared_media_storage(system)
    assert (storage["host"], storage["root_path"], storage["params"]["username"]) == (
        "db1.example.com", "/media", "shop_prod")
    assert stagetools._shared_media_storage(local) is None
    # given by a deploy tool about to write it, the file is not read
    assert stagetools.get_expected_system_from_name(
        "shop_prod", declared=POSTGRESQL, database_host="").database_host == ""
    # no database host: the file goes
    assert stagetools._write_topology("shop_prod", "") is True
    assert not (tmp_path / "shop_prod.json").exists()


def test_topology__refusals(tmp_path, monkeypatch):
    monkeypatch.setattr(stagetools, "_TOPOLOGY_DIR", str(tmp_path))
    with pytest.raises(stagetools.StagetoolsError, match="only PostgreSQL is served by another"):
        stagetools.get_expected_system_from_name("shop_prod", declared={},
                                                 database_host="db1.example.com")
    with pytest.raises(stagetools.StagetoolsError, match="invalid database host 'db1;'"):
        stagetools.get_expected_system_from_name("shop_prod", declared=POSTGRESQL,
                                                 database_host="db1;")
    path = tmp_path / "shop_prod.json"
    for text, rule in (("[", "it is not JSON"), ("{}", "it is not a topology file"),
                       (json.dumps({"name": "shop_qual", "database_host": "db1.example.com"}),
                        "it is not a topology file"),
                       (json.dumps({"name": "shop_prod", "database_host": "db 1"}),
                        "invalid database host")):
        path.write_text(text)
        path.chmod(0o644)
        with pytest.raises(stagetools.StagetoolsError, match=rule):
            stagetools.get_expected_system_from_name("shop_prod", declared=POSTGRESQL)
    path.write_text(json.dumps({"name": "shop_prod", "database_host": "db1.example.com"}))
    path.chmod(0o666)  # writable by others: they could point the database elsewhere
    with pytest.raises(stagetools.StagetoolsError, match="its installation or others could"):
        stagetools._read_topology("shop_prod")
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(stagetools.StagetoolsError, match="it is a symbolic link"):
        stagetools._read_topology("shop_prod")


@pytest.mark.skipif(not IS_ROOT and not IN_CI, reason="a file the process's user cannot "
                    "change: needs root to make one of another user's")
def test_topology__a_file_its_installation_owns_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(stagetools, "_TOPOLOGY_DIR", str(tmp_path))
    stagetools._write_topology("shop_prod", "db1.example.com")
    assert stagetools._read_topology("shop_prod")["database_host"] == "db1.example.com"
    os.chown(tmp_path / "shop_prod.json", 65534, 65534)  # nobody's: root's as a unit sees it
    assert stagetools._read_topology("shop_prod")["database_host"] == "db1.example.com"
    monkeypatch.setattr(os, "geteuid", lambda: 65534)  # as the file's owner reads it
    with pytest.raises(stagetools.StagetoolsError, match="its installation or others could"):
        stagetools._read_topology("shop_prod")


def test_media_site__the_database_host_serves_uploads_only():
    system = stagetools.get_expected_system_from_name("shop_prod", declared=POSTGRESQL)
    site = stagetools._render_media_site(system)
    assert "server_name shop-prod.localhost;" in site and "proxy_pass" not in site
    assert "alias /home/shop_prod/media/;" in site and "return 404;" in site
    # the same media location as the installation's own site
    assert stagetools._media_location(system) in site
    assert stagetools._media_location(system) in system.services[
        "/etc/nginx/sites-available/shop_prod.conf"]


# ---------------------------------------------------------------- host names and HTTPS

BAD_HOST_NAMES = {
    "Shop.example.com": "it has uppercase letters; write 'shop.example.com'",
    "shop.example.com.": "it has an empty label",
    "shop": "it has no dot",
    "*.example.com": "it has the characters '*'",
    "shop_1.example.com": "it has the characters '_'",
    "shop.example.com;": "it has the characters ';'",
    "-shop.example.com": "a label starts or ends with -",
    "10.0.0.1": "it is an IP address",
    "bücher.example": "it is not ASCII; give its IDNA form",
    "a" * 64 + ".example.com": "a label is longer than 63 characters",
    # Every site answers NAME-with-dashes.localhost by itself: another's local name is not one.
    "shop-dev.localhost": "it is a local name (.localhost)",
}


def test_host_names__declared_given_or_refused(tmp_path):
    repo = tmp_path / "src" / "shop"
    repo.mkdir(parents=True)
    declaration = repo / "stagetools.ini"
    declaration.write_text("[shop_prod]\nhost_names = shop.example.com www.shop.example.com\n"
                           "[dev]\nhost_names = dev.shop.example.com\n")
    expected = {name: stagetools.get_expected_system_from_name(name, base_dir=tmp_path)
                for name in ("shop_prod", "shop_dev", "shop_qual")}
    assert {name: (system.host_names, system.is_https) for name, system in expected.items()} == {
        "shop_prod": (("shop.example.com", "www.shop.example.com"), True),
        "shop_dev": (("dev.shop.example.com",), False),  # DEV and INT: plain HTTP
        "shop_qual": ((), False)}
    assert expected["shop_prod"].as_dict()["host_names"] == ["shop.example.com",
                                                            "www.shop.example.com"]
    # Given again (a deploy tool's inventory): the same names in any order are fine; others,
    # or names the repo does not declare, are refused: the installation would not know them.
    again = stagetools.get_expected_system_from_name(
        "shop_prod", base_dir=tmp_path, host_names=["www.shop.example.com", "shop.example.com"])
    assert again == expected["shop_prod"]
    with pytest.raises(stagetools.StagetoolsError, match="the repo declares host_names = "
                       "shop.example.com www.shop.example.com in"):
        stagetools.get_expected_system_from_name("shop_prod", base_dir=tmp_path,
                                                 host_names=["shop.example.com"])
    result = cli("show", "shop_qual", "--expected", "--base-dir", tmp_path, "--host-name",
                 "shop.example.com")
    assert result.returncode == 2 and "shop.example.com: the repo declares none in" \
        in result.stderr and "declare them there" in result.stderr, result.stderr
    for name, rule in BAD_HOST_NAMES.items():
        result = cli("show", "shop_qual", "--expected", "--host-name", "ok.example.com",
                     f"--host-name={name}")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, name
        assert f"invalid host name {name!r}: {rule}" in result.stderr, result.stderr
        declaration.write_text(f"[stagetools]\nhost_names = ok.example.com {name}\n")
        result = cli("show", "shop_qual", "--expected", "--base-dir", tmp_path)
        assert result.returncode == 2 and f"line 2: invalid host name {name!r}: {rule}" \
            in result.stderr, result.stderr
    for text, rule in {"host_names =": "no host names", "host_names = a.example a.example":
                       "it is given twice"}.items():
        declaration.write_text(f"[stagetools]\n{text}\n")
        result = cli("show", "shop_qual", "--expected", "--base-dir", tmp_path)
        assert result.returncode == 2 and rule in result.stderr, result.stderr


def test_sites__https_for_qual_and_prod_with_names_a_default_site_for_the_rest():
    names = ("shop.example.com", "www.shop.example.com")
    prod = stagetools.get_expected_system_from_name("shop_prod", declared={"host_names": names})
    dev = stagetools.get_expected_system_from_name("shop_dev",
                                                   declared={"host_names": names[:1]})
    plain = stagetools.get_expected_system_from_name("shop_qual", declared={})
    site = {system.name: system.services[f"/etc/nginx/sites-available/{system.name}.conf"]
            for system in (prod, dev, plain)}
    https = site["shop_prod"]
    assert https.count("server_name shop.example.com www.shop.example.com;") == 2
    assert "listen 443 ssl;" in https and "shop-prod.localhost" not in https
    assert "ssl_certificate /etc/letsencrypt/live/shop_prod/fullchain.pem;" in https
    assert "ssl_certificate_key /etc/letsencrypt/live/shop_prod/privkey.pem;" in https
    redirect = https[:https.index("listen 443")]
    assert "return 301 https://$host$request_uri;" in redirect and "proxy_pass" not in redirect
    assert "location /.well-known/acme-challenge/ {\n        root /var/lib/stagetools/acme;" \
        in redirect
    assert https.count("proxy_pass http://shop_prod;") == 1
    assert "443" not in site["shop_dev"] and "443" not in site["shop_qual"]
    assert "server_name shop-dev.localhost shop.example.com;" in site["shop_dev"]
    assert "server_name shop-qual.localhost;" in site["shop_qual"]
    default = "/etc/nginx/sites-available/stagetools-default.conf"
    assert prod.services[default] == dev.services[default] == plain.services[default]
    assert "listen 443 ssl default_server;\n    listen [::]:443 ssl default_server;\n" \
           "    server_name _;\n    ssl_reject_handshake on;" in prod.services[default]
    assert prod.services[default].count("return 444;") == 2


def make_certificate(directory, names, days=30):
    """A self-signed certificate by the openssl command: (path of the PEM, its key)."""
    directory.mkdir(parents=True, exist_ok=True)
    san = ",".join(f"DNS:{name}" for name in names) + ",IP:10.0.0.1"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", str(days), "-subj", f"/CN={names[0]}", "-addext",
         f"subjectAltName={san}", "-keyout", directory / "privkey.pem",
         "-out", directory / "cert.pem"])
    return directory / "cert.pem"


def test_certificate_fields__as_the_ssl_module_reads_them(tmp_path):
    import ssl
    for index, (names, days) in enumerate([(["a.example"], 1), (["b.example", "c.example"], 90),
                                           (["d.example"], 20000)]):  # a GeneralizedTime
        path = make_certificate(tmp_path / str(index), names, days)
        oracle = ssl._ssl._test_decode_cert(str(path))  # CPython's own test helper
        not_after, found = stagetools._certificate_expiry_and_names(path.read_text())
        assert not_after == ssl.cert_time_to_seconds(oracle["notAfter"])
        assert found == [value for kind, value in oracle["subjectAltName"] if kind == "DNS"]
    for text in ("", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
                 path.read_text()[:200] + "\n-----END CERTIFICATE-----\n"):
        with pytest.raises(ValueError):
            stagetools._certificate_expiry_and_names(text)
    # A UTCTime year of 50 to 99 is 19YY (RFC 5280): such a certificate expired long ago.
    der = ssl.PEM_cert_to_DER_cert(make_certificate(tmp_path / "u", ["u.example"]).read_text())
    not_after = time.strftime("%y%m%d%H%M", time.gmtime(
        stagetools._certificate_expiry_and_names(ssl.DER_cert_to_PEM_cert(der))[0]))
    assert der.count(not_after.encode()) == 1  # notBefore is 30 days earlier
    old = ssl.DER_cert_to_PEM_cert(der.replace(not_after.encode(), b"5001010000"))
    assert time.gmtime(stagetools._certificate_expiry_and_names(old)[0])[:5] == (
        1950, 1, 1, 0, 0)


@needs_root  # certbot keeps its certificates to root: check reads them as root only
def test_check__certificate_missing_expiring_or_not_covering_a_name(tmp_path, monkeypatch):
    import time as time_module
    monkeypatch.setattr(stagetools, "_CERTIFICATE_DIR", str(tmp_path / "live"))
    system = stagetools.get_expected_system_from_name(
        "shop_prod", declared={"host_names": ("shop.example.com", "www.shop.example.com")})
    live = Path(system.certificate_dir)
    what = f"certificate {live}/fullchain.pem"

    def facts():
        return {fact[0]: fact[2] for fact in stagetools._check_certificate(system)
                if fact[1] != fact[2]}

    assert facts() == {what: "missing"}
    # certbot's layout: live/NAME/fullchain.pem links into archive/NAME/
    archive = tmp_path / "archive" / "shop_prod"
    make_certificate(archive, ["shop.example.com", "www.shop.example.com"])
    live.mkdir(parents=True)
    (live / "fullchain.pem").symlink_to(archive / "cert.pem")
    assert facts() == {} and len(stagetools._check_certificate(system)) == 2
    make_certificate(archive, ["shop.example.com"])
    assert facts() == {f"{what} names": "lacks www.shop.example.com"}
    make_certificate(archive, ["*.example.com"])  # one label per wildcard
    assert facts() == {f"{what} names": "lacks www.shop.example.com"}
    make_certificate(archive, ["shop.example.com", "www.shop.example.com"], days=10)
    assert list(facts()) == [f"{what} expiry"]  # renewal should have happened by now
    assert facts()[f"{what} expiry"].startswith("expires ")
    real_time = time_module.time
    monkeypatch.setattr(time_module, "time", lambda: real_time() + 11 * 86400)
    assert facts()[f"{what} expiry"].startswith("expired ")
    monkeypatch.undo()
    monkeypatch.setattr(stagetools, "_CERTIFICATE_DIR", str(tmp_path / "live"))
    (archive / "cert.pem").unlink()
    os.mkfifo(archive / "cert.pem")  # looked at, never waited on
    assert facts() == {what: "it is not a regular file"}
    (archive / "cert.pem").unlink()
    (archive / "cert.pem").write_text("not a certificate")
    assert facts() == {what: "no PEM certificate in it"}
    plain = stagetools.get_expected_system_from_name(
        "shop_dev", declared={"host_names": ("x.example.com",)})
    assert stagetools._check_certificate(plain) == []  # no HTTPS, no certificate


@pytest.mark.django
def test_settings_defaults__allowed_hosts_and_trusted_origins_follow_the_names(tmp_path):
    import stagetools_django
    names = ["shop.example.com", "www.shop.example.com"]
    for name, scheme in (("shop_prod", "https"), ("shop_dev", "http")):
        system = stagetools.get_expected_system_from_name(
            name, base_dir=tmp_path / name, declared={"host_names": tuple(names)})
        system.base_dir.mkdir()
        settings = stagetools_django.settings_defaults("sqlite", system=system)
        assert settings["ALLOWED_HOSTS"][:2] == names
        assert f"{system.container}.localhost" in settings["ALLOWED_HOSTS"]
        assert settings["CSRF_TRUSTED_ORIGINS"] == [f"{scheme}://{n}" for n in names]


def test_show_into_a_closed_pipe__no_traceback():
    # The reader is gone before the child writes (as `show | head` once head has enough).
    process = subprocess.Popen([sys.executable, STAGETOOLS, "show", "shop_prod", "--expected",
                                "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=clean_env())
    process.stdout.close()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and stderr == b""


def test_json_and_table_of_show():
    assert {k: v for k, v in show_json("shop_prod", "--expected").items()
            if k != "services"} == SHOP_PROD
    table = cli("show", "shop_prod", "--expected").stdout
    assert re.search(r"^database_sqlite_path\s+/home/shop_prod/shop.sqlite$", table, re.M)
    assert re.search(r"^stage\s+prod$", table, re.M)


def test_python_dash_m_behaves_the_same():
    as_script = cli("show", "acme_p2", "--expected", "--core-repo", "shop", "--json")
    as_module = run([sys.executable, "-m", "stagetools", "show", "acme_p2", "--expected",
                     "--core-repo", "shop", "--json"], cwd=HERE)
    assert as_script.stdout == as_module.stdout and json.loads(as_module.stdout)["core_repo"] == "shop"


def test_differences_are_listed_field_by_field():
    expected = stagetools.get_expected_system_from_name("shop_prod")
    other = stagetools.get_expected_system_from_name("shop_prod", base_dir="/srv/shop_prod")
    assert expected.differences(expected) == []
    names = [field for field, _, _ in expected.differences(other)]
    assert names == ["base_dir", "venv_dir", "bin_dir", "lib_dir", "src_dir", "python_path",
                     "pip_path", "core_repo_dir", "releases_dir", "static_dir", "media_dir",
                     "backups_dir", "secret_key_path",
                     "manage_py_path", "database_sqlite_path", "database_tls_dir"]
    assert ("base_dir", "/home/shop_prod", "/srv/shop_prod") in expected.differences(other)


def test_system_is_immutable_and_repr_is_short():
    system = stagetools.get_expected_system_from_name("shop_prod")
    with pytest.raises(AttributeError):
        system.name = "shop_dev"
    assert repr(system) == ("System(name='shop_prod', stage=prod, user='shop_prod', "
                            "base_dir='/home/shop_prod', source='argument')")
    system.base_dir  # a Path made on first access travels with the copies
    for twin in (copy.copy(system), copy.deepcopy(system), pickle.loads(pickle.dumps(system))):
        assert twin == system and twin.base_dir == Path("/home/shop_prod")


def test_expected_name_defaults_to_the_login_name():
    login = pwd.getpwuid(os.geteuid()).pw_name
    code = "import stagetools; print(stagetools.get_expected_system_from_name().name)"
    try:
        stagetools.parse_name(login)
    except stagetools.StagetoolsError:
        result = run([sys.executable, "-c", code], cwd=HERE, check=False)
        assert result.returncode != 0 and repr(login) in result.stderr
        assert "login name of this process" in result.stderr
    else:
        assert run([sys.executable, "-c", code], cwd=HERE).stdout.strip() == login


# ---------------------------------------------------------------- the actual system


def test_actual__from_the_argument():
    system = stagetools.get_actual_system_from_name("shop_dev")
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert (system.name, system.name_source, system.user) == ("shop_dev", "argument", user)
    assert system.base_dir == Path(sys.prefix)


def test_actual__user_and_group_looked_up_on_first_use():
    # Settings read name and paths only; pwd and grp are the dearest part of resolving.
    code = ("import sys, stagetools; s = stagetools.get_actual_system_from_name('shop_dev'); "
            "s.base_dir, s.database_name, s.secret_key_path, s.stage; "
            "looked_up = sorted({'pwd', 'grp'} & set(sys.modules)); "
            "print(looked_up, s.user, s.group, s.as_dict()['user'], s == s, "
            "s.differences(stagetools.get_actual_system_from_name('shop_dev')))")
    result = run([sys.executable, "-I", "-S", "-c",
                  f"import sys; sys.path.insert(0, {str(HERE)!r}); " + code])
    user, group = pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name
    assert result.stdout.split() == ["[]", user, group, user, "True", "[]"]


def test_actual__from_the_environment():
    data = show_json(env=clean_env(STAGETOOLS_NAME="acme_qual"))
    assert (data["name"], data["name_source"]) == ("acme_qual", "environment STAGETOOLS_NAME")
    assert data["user"] == pwd.getpwuid(os.geteuid()).pw_name
    assert data["stage"] == "qual" and data["is_debug"] is False


def test_actual__bad_environment_value__names_the_variable():
    result = cli("show", env=clean_env(STAGETOOLS_NAME="Acme"))
    assert result.returncode == 2 and "STAGETOOLS_NAME" in result.stderr
    assert "'Acme'" in result.stderr


def test_actual__from_a_real_virtualenv(tmp_path):
    venv = tmp_path / "shop_qual"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    data = show_json(python=venv / "bin" / "python")
    assert data["name_source"] == f"virtualenv {venv}"
    assert {k: v for k, v in data.items() if k not in ("services", "user", "group")} == {
        k: v for k, v in expected_attributes(
            "shop_qual", str(venv), "shop", "qual", "qual", "shop",
            name_source=f"virtualenv {venv}").items() if k not in ("user", "group")}
    assert data["user"] == pwd.getpwuid(os.geteuid()).pw_name


def test_actual__from_the_directories_above_the_module(tmp_path):
    repo = tmp_path / "acme_int" / "src" / "shop"
    repo.mkdir(parents=True)
    (tmp_path / "acme_int" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    shutil.copy(STAGETOOLS, repo / "stagetools.py")
    data = show_json("--core-repo", "shop", script=repo / "stagetools.py")
    assert data["name_source"] == f"module path {tmp_path / 'acme_int'}"
    assert (data["name"], data["base_dir"], data["core_repo_dir"]) == (
        "acme_int", str(tmp_path / "acme_int"), str(repo))


def test_actual__a_directory_above_the_module_counts_only_as_a_virtualenv(tmp_path):
    app = tmp_path / "my_django" / "app"  # named like an installation, but no virtualenv
    app.mkdir(parents=True)
    shutil.copy(STAGETOOLS, app / "stagetools.py")
    result = cli("show", script=app / "stagetools.py")
    assert result.returncode == 2 and "no virtualenv above it is named like an installation" \
        in result.stderr
    (tmp_path / "my_django" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    assert show_json(script=app / "stagetools.py")["name"] == "my_django"


def test_actual__environment_contradicting_the_virtualenv__refused(tmp_path):
    venv = tmp_path / "shop_prod"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    result = cli("show", "--json", python=python, env=clean_env(STAGETOOLS_NAME="shop_dev"))
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert ("STAGETOOLS_NAME='shop_dev': it contradicts the virtualenv "
            f"'{venv}' of the installation 'shop_prod'") in result.stderr
    agreeing = show_json(python=python, env=clean_env(STAGETOOLS_NAME="shop_prod"))
    assert (agreeing["name"], agreeing["is_debug"]) == ("shop_prod", False)
    result = cli("show", "shop_dev", python=python)  # the same, as an argument
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert (f"the name 'shop_dev': it contradicts the virtualenv '{venv}' of the installation "
            "'shop_prod'; give 'shop_prod' or no name") in result.stderr


def test_actual__nothing_fits__every_source_listed(tmp_path):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(STAGETOOLS, lonely / "stagetools.py")
    result = cli("show", script=lonely / "stagetools.py")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    for source in ("argument: not given", "environment STAGETOOLS_NAME: not set",
                   f"virtualenv (sys.prefix) '{sys.prefix}'", f"module path '{lonely}'",
                   "set STAGETOOLS_NAME=shop_dev"):
        assert source in result.stderr


def test_copied_alone_and_symlinked__same_result_and_real_file_wins(tmp_path):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(STAGETOOLS, fresh / "stagetools.py")
    real_repo = tmp_path / "shop_dev" / "src" / "shop"
    real_repo.mkdir(parents=True)
    (tmp_path / "shop_dev" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    shutil.copy(STAGETOOLS, real_repo / "stagetools.py")
    deploy = tmp_path / "ideploy_prod"  # a name that parses: the link must not be used
    deploy.mkdir()
    (deploy / "stagetools.py").symlink_to(real_repo / "stagetools.py")
    reference = show_json("shop_prod", "--expected")
    for script in (fresh / "stagetools.py", deploy / "stagetools.py"):
        assert show_json("shop_prod", "--expected", script=script) == reference
        imported = run([sys.executable, "-c", "import stagetools; print(stagetools.__version__)"],
                       cwd=script.parent)
        assert imported.stdout.strip() == stagetools.__version__
    assert show_json(script=deploy / "stagetools.py")["name"] == "shop_dev"
    by_import = run([sys.executable, "-c", "import stagetools; "
                     "print(stagetools.get_actual_system_from_name().name_source)"], cwd=deploy)
    assert by_import.stdout.strip() == f"module path {tmp_path / 'shop_dev'}"


def test_imports_only_the_standard_library():
    code = ("import sys; before = set(sys.modules); import stagetools; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(m for m in new - {'stagetools'} if m not in sys.stdlib_module_names))")
    result = run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); "
                  + code])
    assert result.stdout.strip() == "[]"


def test_works_without_pwd_and_grp(tmp_path):
    # As on Windows: no pwd, no grp; getpass finds the user in the environment.
    code = ("import sys; sys.modules['pwd'] = None; sys.modules['grp'] = None; "
            "import stagetools; s = stagetools.get_actual_system_from_name('shop_dev'); "
            "e = stagetools.get_expected_system_from_name(); print(s.user, repr(s.group), e.name)")
    result = run([sys.executable, "-c", code], cwd=HERE, env=clean_env(USERNAME="dev_dsven",
                                                                      LOGNAME="dev_dsven"))
    assert result.stdout.split() == ["dev_dsven", "''", "dev_dsven"]


def test_import_runs_nothing_platform_specific():
    code = ("import os, sys; sys.modules['pwd'] = None; sys.modules['grp'] = None; "
            "del os.geteuid; import stagetools; print('imported')")
    assert run([sys.executable, "-c", code], cwd=HERE).stdout.strip() == "imported"


# ---------------------------------------------------------------- the secret key


def test_secret_key__created_once_0600_never_shown(tmp_path):
    system = stagetools.get_expected_system_from_name("shop_prod", base_dir=tmp_path)
    key = stagetools.read_secret_key(system)
    assert len(key) >= 50 and len(set(key)) >= 5 and not key.startswith("$")
    assert stat.S_IMODE(system.secret_key_path.stat().st_mode) == 0o600
    assert stagetools.read_secret_key(system) == key
    assert key not in repr(system) and key not in json.dumps(system.as_dict())
    assert key not in cli("show", "shop_prod", "--expected", "--base-dir", tmp_path).stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret_key"]


def test_secret_key__many_processes_at_once_get_one_key(tmp_path):
    start = time.time() + 2
    code = ("import sys, time, stagetools; time.sleep(max(0, float(sys.argv[1]) - time.time())); "
            "s = stagetools.get_expected_system_from_name('shop_prod', base_dir=sys.argv[2]); "
            "print(stagetools.read_secret_key(s))")
    processes = [subprocess.Popen([sys.executable, "-c", code, str(start), str(tmp_path)],
                                  cwd=HERE, stdout=subprocess.PIPE, text=True)
                 for _ in range(24)]
    try:
        keys = {process.communicate(timeout=60)[0].strip() for process in processes}
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=15)
    assert all(process.returncode == 0 for process in processes)
    assert len(keys) == 1 and len(keys.pop()) >= 50
    assert stat.S_IMODE((tmp_path / "secret_key").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret_key"]  # no temporary left


def test_secret_key__readable_by_others__refused(tmp_path):
    system = stagetools.get_expected_system_from_name("shop_prod", base_dir=tmp_path)
    stagetools.read_secret_key(system)
    system.secret_key_path.chmod(0o644)
    with pytest.raises(stagetools.StagetoolsError, match=r"mode 644.*chmod 600"):
        stagetools.read_secret_key(system)


def test_secret_key__unreadable_or_short__refused(tmp_path):
    system = stagetools.get_expected_system_from_name("shop_prod", base_dir=tmp_path)
    system.secret_key_path.mkdir()  # unreadable as a file, even for root
    with pytest.raises(stagetools.StagetoolsError, match="is not a regular file"):
        stagetools.read_secret_key(system)
    system.secret_key_path.rmdir()
    system.secret_key_path.write_text("short")
    system.secret_key_path.chmod(0o600)
    with pytest.raises(stagetools.StagetoolsError, match="fewer than 50"):
        stagetools.read_secret_key(system)


def read_key_in_child(base_dir, limits=()):
    """read_secret_key in a child bounded in time and memory: (exit code, printed lines)."""
    code = ("import sys, stagetools\n"
            "s = stagetools.get_expected_system_from_name('shop_prod', base_dir=sys.argv[1])\n"
            "try:\n    print('key', len(stagetools.read_secret_key(s)))\n"
            "except stagetools.StagetoolsError as error:\n    print('refused', error)\n")

    def bounded():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        for limit, value in limits:
            resource.setrlimit(limit, (value, value))
    process = subprocess.Popen([sys.executable, "-c", code, str(base_dir)], cwd=HERE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=bounded, start_new_session=True)
    try:
        output = process.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        stop_group(process, 9)
        return None, ["no answer within 20 s"]
    return process.returncode, output.splitlines()


def test_secret_key__never_opens_what_is_not_its_regular_file(tmp_path):
    key = tmp_path / "secret_key"
    os.mkfifo(key)  # opening a FIFO for reading waits for a writer: forever
    assert read_key_in_child(tmp_path)[1][-1].endswith("is not a regular file; remove it "
                                                       f"(rm -- '{key}'): a new key is made")
    key.unlink()
    key.symlink_to("/dev/zero")  # reading it never ends
    returncode, lines = read_key_in_child(tmp_path)
    assert returncode == 0 and "is a symbolic link" in lines[-1], lines
    advice = list(lines)
    key.unlink()
    elsewhere = tmp_path / "elsewhere"  # a well-formed key the link points to
    elsewhere.write_text("k" * 60)
    elsewhere.chmod(0o600)
    key.symlink_to(elsewhere)
    returncode, lines = read_key_in_child(tmp_path)
    assert returncode == 0 and lines[-1].startswith("refused") and "is a symbolic link" in lines[-1]
    advice += lines
    key.unlink()
    key.write_bytes(b"k" * 1_000_000)
    key.chmod(0o600)
    returncode, lines = read_key_in_child(tmp_path)
    assert returncode == 0 and "more than 4096 bytes" in lines[-1], lines
    key.write_bytes(b"\xff" * 60)
    assert "not UTF-8" in read_key_in_child(tmp_path)[1][-1]
    # As root, chown or chmod on a link would act on what it points to.
    assert "chown" not in " ".join(advice) and "chmod" not in " ".join(advice)


def test_secret_key__full_disk__our_error_no_traceback_no_temporary(tmp_path):
    import resource
    returncode, lines = read_key_in_child(tmp_path, limits=[(resource.RLIMIT_FSIZE, 10)])
    assert returncode == 0 and lines[-1].startswith("refused cannot create the secret key file")
    assert "File too large" in lines[-1] and list(tmp_path.iterdir()) == []


@needs_root
def test_secret_key__owned_by_another_user__refused_with_no_link_following_advice(tmp_path):
    system = stagetools.get_expected_system_from_name("shop_prod", base_dir=tmp_path)
    stagetools.read_secret_key(system)
    os.chown(system.secret_key_path, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(stagetools.StagetoolsError) as raised:
        stagetools.read_secret_key(system)
    assert "belongs to 'nobody', not to 'root'" in str(raised.value)
    assert "chown" not in str(raised.value)


def test_secret_key__missing_base_dir__clear_error(tmp_path):
    system = stagetools.get_expected_system_from_name("shop_prod", base_dir=tmp_path / "gone")
    with pytest.raises(stagetools.StagetoolsError, match="must exist and be writable"):
        stagetools.read_secret_key(system)


# ---------------------------------------------------------------- Django: one-command start, servers


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A directory every user may read: the modules and pip's cache for installations."""
    directory = SHARED_DIR
    directory.mkdir(mode=0o755)
    for module in ("stagetools.py", "stagetools_django.py"):
        shutil.copy(HERE / module, directory / module)
    cache = directory / "pip-cache"
    cache.mkdir()
    cache.chmod(0o1777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def installation_env(shared_dir, **extra):
    return clean_env(PIP_CACHE_DIR=str(shared_dir / "pip-cache"), PIP_DISABLE_PIP_VERSION_CHECK="1",
                     **extra)


def serve_commands(new_output, port):
    """The serve commands that `new` printed, moved to a free port."""
    lines = [line.strip() for line in new_output.splitlines() if "127.0.0.1:8000" in line
             or "--port 8000" in line]
    return {Path(line.split()[0]).name: line.replace("8000", str(port)).split() for line in lines}


@pytest.fixture(scope="session")
def dev_installation(tmp_path_factory, shared_dir):
    directory = tmp_path_factory.mktemp("dev") / "shop_dev"
    result = new_installation(directory, env=installation_env(shared_dir))
    return directory, result.stdout


def run_job(expected, job, env, user=True):
    """Run a job's command as its rendered unit does (ExecStart, WorkingDirectory, User)."""
    unit = expected["services"][f"/etc/systemd/system/{expected['name']}-job-{job}.service"]
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line)
    command = shlex.split(lines["ExecStart"])
    if user:
        command = ["runuser", "-u", lines["User"], "--", *command]
    return run(command, cwd=lines["WorkingDirectory"], env=env)


@pytest.mark.django
def test_dev_installation__the_starters_job_runs_as_its_unit_says(dev_installation,
                                                                  shared_dir):
    directory, _ = dev_installation
    expected = show_json("shop_dev", "--expected", "--base-dir", directory)
    assert expected["jobs"]["clearsessions"]["command"] == "manage clearsessions"
    assert run_job(expected, "clearsessions", installation_env(shared_dir),
                   user=False).returncode == 0


@pytest.mark.django
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "gunicorn"])
def test_dev_installation__served_by_each_server(dev_installation, server, tmp_path):
    directory, new_output = dev_installation
    port = free_port()
    command = serve_commands(new_output, port)[server]
    assert command[0] == str(directory / "bin" / server)
    with serving(command, ("127.0.0.1", port), tmp_path / "server.log", cwd=tmp_path,
                 env=clean_env()):
        status, _, body = http_get(("127.0.0.1", port), "/admin/login/")
        assert status == 200 and b"csrfmiddlewaretoken" in body
        status, _, body = http_get(("127.0.0.1", port), "/static/admin/css/base.css")
        assert status == 200 and b"body" in body
        status, _, body = http_get(("127.0.0.1", port), "/")
        assert json.loads(body) == {"name": "shop_dev", "stage": "dev", "debug": True,
                                    "database": "sqlite",
                                    "database_name": str(directory / "shop.sqlite")}


@pytest.mark.django
def test_dev_installation__starter_layout(dev_installation):
    directory, _ = dev_installation
    repo = directory / "src" / "shop"
    for relative in ("setup.py", "aaa_env_setup.py", "aaa_script_setup.py", "manage.py",
                     "stagetools.py", "stagetools_django.py", "stagetools_project/settings.py",
                     "stagetools_project/urls.py", "shop/models.py", "shop/migrations"):
        assert (repo / relative).exists(), relative
    assert (directory / "shop.sqlite").stat().st_size > 0
    assert stat.S_IMODE((directory / "secret_key").stat().st_mode) == 0o600
    # The repo declares what the name cannot say; INI to configparser too.
    import configparser
    declaration = configparser.ConfigParser()
    declaration.read(repo / "stagetools.ini")
    assert dict(declaration["stagetools"]) == {
        "framework": "django", "server": "gunicorn", "database": "sqlite",
        "job clearsessions": "manage clearsessions @ daily"}
    # Made under umask 022, private all the same: database, uploads and key.
    assert stat.S_IMODE((directory / "shop.sqlite").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "media").stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "static").stat().st_mode) == 0o755
    script = ("import aaa_script_setup, django; from django.conf import settings; "
              "print(settings.DEBUG, django.get_version())")
    debug, version = run([directory / "bin" / "python", "-c", script], cwd="/").stdout.split()
    assert debug == "True"
    # The same Django as these tests: .ci/run's Django 4.2 step pins both to 4.2.
    assert version.split(".")[:2] == importlib.metadata.version("Django").split(".")[:2]


def test_new__refuses_a_bad_name_and_a_full_directory_and_cleans_up(tmp_path):
    result = cli("new", tmp_path / "Shop_dev")
    assert result.returncode == 2 and "'Shop_dev'" in result.stderr
    full = tmp_path / "shop_dev"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    result = cli("new", full)
    assert result.returncode == 2 and "is not an empty directory" in result.stderr
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "shop_prod"  # a file where the installation would go
    a_file.write_text("mine")
    result = cli("new", a_file)
    assert result.returncode == 2 and "is not an empty directory" in result.stderr
    assert "Traceback" not in result.stderr and a_file.read_text() == "mine"
    result = cli("new", tmp_path / "nowhere" / "shop_int")  # new makes no parents
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"'{tmp_path / 'nowhere'}': cannot look at it: No such file" in result.stderr
    result = cli("new", tmp_path / "shop_int", "--python", "/nonexistent/python3")
    assert result.returncode == 2 and "creating the virtualenv failed" in result.stderr
    assert not (tmp_path / "shop_int").exists()
    empty = tmp_path / "shop_qual"  # made by the deploy tool, owned by the user: it stays
    empty.mkdir()
    result = cli("new", empty, "--python", sys.executable, env=clean_env(
        PIP_INDEX_URL="http://127.0.0.1:9/", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path)))
    assert result.returncode == 2 and "installing the starter repo" in result.stderr
    assert empty.is_dir() and list(empty.iterdir()) == []


@needs_root
def test_new__refuses_a_directory_another_user_could_swap():
    top = Path(tempfile.mkdtemp(prefix="stagetools-squat-", dir="/tmp"))
    try:
        top.chmod(0o755)
        sticky = top / "sticky"  # like /tmp: others may write, not rename what is not theirs
        sticky.mkdir(mode=0o755)
        sticky.chmod(0o1777)
        squatted = sticky / "x_dev"
        run(["runuser", "-u", "nobody", "--", "mkdir", squatted], cwd="/")
        result = cli("new", squatted)
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert f"'{squatted}': it belongs to 'nobody', not to 'root'" in result.stderr
        assert list(squatted.iterdir()) == []
        open_dir = top / "open"  # others may rename what is in it
        open_dir.mkdir()
        open_dir.chmod(0o777)
        result = cli("new", open_dir / "y_dev")
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert f"'{open_dir}': it is writable by others" in result.stderr
        assert not (open_dir / "y_dev").exists()
    finally:
        shutil.rmtree(top)


@pytest.mark.django
def test_missing_aaa_env_setup__says_what_to_create(tmp_path):
    shutil.copy(HERE / "stagetools.py", tmp_path / "stagetools.py")
    shutil.copy(HERE / "stagetools_django.py", tmp_path / "stagetools_django.py")
    env = clean_env(PYTHONPATH=str(tmp_path))
    result = run([sys.executable, "-m", "stagetools_django", "check"], check=False, cwd=tmp_path,
                 env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot import aaa_env_setup" in result.stderr
    assert "create aaa_env_setup.py" in result.stderr and "SYSTEM.django_settings" in result.stderr
    returncode, output = run_to_failure([sys.executable, "-m", "uvicorn", "--port", free_port(),
                                         "stagetools_django:asgi_application"],
                                        tmp_path / "uvicorn.log", cwd=tmp_path, env=env)
    assert returncode != 0 and "create aaa_env_setup.py" in output
    left = {p.name for p in tmp_path.iterdir()} - {"__pycache__", "uvicorn.log"}
    assert left == {"stagetools.py", "stagetools_django.py"}


# ---------------------------------------------------------------- Django: production


@pytest.fixture(scope="session")
def prod_installation(tmp_path_factory, shared_dir):
    directory = tmp_path_factory.mktemp("prod") / "shop_prod"
    new_installation(directory, env=installation_env(shared_dir))
    return directory


def manage(directory, *args, check=False):
    return run([directory / "bin" / "python", directory / "src" / "shop" / "manage.py", *args],
               check=check, cwd="/")


@contextlib.contextmanager
def settings_with(directory, line):
    """The installation's settings.py with ``line`` appended, for the block only."""
    settings_py = directory / "src" / "shop" / "stagetools_project" / "settings.py"
    original = settings_py.read_text()
    settings_py.write_text(original + line + "\n")
    try:
        yield
    finally:
        settings_py.write_text(original)


@pytest.mark.django
def test_prod__check_deploy_is_clean(prod_installation):
    result = manage(prod_installation, "check", "--deploy", "--fail-level", "DEBUG")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (2 silenced)." in result.stdout
    silenced = run([prod_installation / "bin" / "python", "-c",
                    "import aaa_script_setup; from django.conf import settings; "
                    "print(settings.SILENCED_SYSTEM_CHECKS, settings.DEBUG)"], cwd="/")
    assert silenced.stdout.strip() == "['security.W004', 'security.W008'] False"


@pytest.mark.django
def test_prod__secret_file_0600_outside_the_repo(prod_installation):
    secret = prod_installation / "secret_key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    repo = prod_installation / "src" / "shop"
    assert repo not in secret.parents
    key = secret.read_text().strip()
    for path in repo.rglob("*"):
        if path.is_file():
            assert key not in path.read_text(errors="replace"), path


@pytest.mark.django
def test_prod__four_gunicorn_workers_share_one_key(prod_installation, tmp_path):
    port = free_port()
    command = [prod_installation / "bin" / "gunicorn", "--workers", "4", "--bind",
               f"127.0.0.1:{port}", "stagetools_django:wsgi_application"]
    with serving(command, ("127.0.0.1", port), tmp_path / "gunicorn.log", cwd="/",
                 env=clean_env()):
        status, _, body = http_get(("127.0.0.1", port), "/")
        assert status == 200 and json.loads(body)["debug"] is False
        status, headers, body = http_get(("127.0.0.1", port), "/visits/")
        cookie = headers["Set-Cookie"].split(";")[0]
        assert cookie.startswith("shop_prod_sessionid=") and "Secure" in headers["Set-Cookie"]
        pages = other_workers_pages(("127.0.0.1", port), "/visits/", cookie,
                                    json.loads(body)["pid"])
        # A session another worker did not accept would start again at 1 visit.
        assert all(page["visits"] >= 2 for page in pages), pages
        status, _, body = http_get(("127.0.0.1", port), "/no-such-page/")
        assert status == 404 and b"Traceback" not in body and b"DEBUG" not in body


@pytest.mark.django
def test_prod__debug_on_in_settings__refused(prod_installation, tmp_path):
    with settings_with(prod_installation, "DEBUG = True"):
        result = manage(prod_installation, "check")
        assert result.returncode == 1 and "stagetools.E001" in result.stderr
        assert "DEBUG is on in the PROD installation 'shop_prod'" in result.stderr
        port = free_port()
        for command in ([prod_installation / "bin" / "uvicorn", "--port", port,
                         "stagetools_django:asgi_application"],
                        [prod_installation / "bin" / "hypercorn", "--bind", f"127.0.0.1:{port}",
                         "stagetools_django:asgi_application"],
                        [prod_installation / "bin" / "gunicorn", "--bind", f"127.0.0.1:{port}",
                         "stagetools_django:wsgi_application"]):
            returncode, output = run_to_failure(command, tmp_path / "server.log", cwd="/",
                                                env=clean_env())
            # The server exited by itself (killed after the wait it would be negative);
            # hypercorn exits 0 after a failed lifespan start-up, having served nothing.
            lowest = 0 if command[0].name == "hypercorn" else 1
            assert returncode >= lowest and "stagetools.E001" in output, (command[0], returncode)


@pytest.mark.django
def test_prod__database_override__warned(prod_installation):
    override = "DATABASES['default']['NAME'] = '/tmp/other.sqlite'"
    with settings_with(prod_installation, override):
        result = manage(prod_installation, "check")
        assert "stagetools.W003" in result.stderr and "'/tmp/other.sqlite'" in result.stderr


@pytest.mark.django
def test_prod__bad_secret_file__clear_message_nothing_written(prod_installation):
    secret = prod_installation / "secret_key"
    before = sorted(p.name for p in prod_installation.iterdir())
    secret.chmod(0o644)
    try:
        result = manage(prod_installation, "check")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"chmod 600 '{secret}'" in result.stderr
    finally:
        secret.chmod(0o600)
    assert sorted(p.name for p in prod_installation.iterdir()) == before


# ---------------------------------------------------------------- Django on PostgreSQL, peer auth


@contextlib.contextmanager
def os_user(name, base_dir=None):
    """A throwaway OS user and group named like an installation, with an empty base dir."""
    base_dir = Path(base_dir or f"/home/{name}")
    try:
        pwd.getpwnam(name)
    except KeyError:
        pass
    else:
        skip(f"user {name} exists on this machine; the test will not touch it")
    if base_dir.exists():
        skip(f"{base_dir} exists on this machine; the test will not touch it")
    run(["useradd", "--no-create-home", "--home-dir", base_dir, "--shell", "/usr/sbin/nologin",
         "--user-group", name])
    try:
        base_dir.mkdir(mode=0o750)
        shutil.chown(base_dir, name, name)
        yield base_dir
    finally:
        kill_processes_of(name)
        run(["userdel", name], check=False)
        shutil.rmtree(base_dir, ignore_errors=True)


def kill_processes_of(name):
    """SIGKILL the test user's processes on this machine: only those of this PID namespace,
    not a test host's (systemd-nspawn's hosts share the machine's uids: `pkill -u` would kill
    another user's processes there that happen to have the same number)."""
    import signal
    uid, ours = pwd.getpwnam(name).pw_uid, os.readlink("/proc/self/ns/pid")
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid and \
                    os.readlink(f"/proc/{entry}/ns/pid") == ours:
                os.kill(int(entry), signal.SIGKILL)
        except OSError:  # gone meanwhile
            pass


class Postgres:
    """A throwaway PostgreSQL cluster: peer auth on its own socket dir, no TCP."""

    def __init__(self, root):
        initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not initdb or not IS_ROOT:
            skip("needs root and Debian's postgresql (CI installs it)")
        self.bin_dir = Path(initdb[-1]).parent
        self.root = root
        self.socket_dir = root / "socket"
        self.port = free_port()
        for directory in (root, self.socket_dir):
            directory.mkdir(mode=0o755)
            shutil.chown(directory, "postgres", "postgres")

    def as_postgres(self, *command, **kwargs):
        return run(["runuser", "-u", "postgres", "--", *command], cwd=self.root, **kwargs)

    def start(self):
        self.as_postgres(self.bin_dir / "initdb", "-D", self.root / "data", "-U", "postgres",
                         "--auth-local=peer", "--auth-host=reject", "--no-sync")
        self.as_postgres(self.bin_dir / "pg_ctl", "-D", self.root / "data", "-l",
                         self.root / "log", "-w", "-t", "60", "-o",
                         f"-k {self.socket_dir} -p {self.port} -c listen_addresses=''", "start")

    def stop(self):
        self.as_postgres(self.bin_dir / "pg_ctl", "-D", self.root / "data", "-m", "immediate",
                         "-w", "-t", "60", "stop", check=False)

    def sql(self, statement, user="postgres", database="postgres"):
        return run(["runuser", "-u", user, "--", self.bin_dir / "psql", "-h", self.socket_dir,
                    "-p", self.port, "-d", database, "-v", "ON_ERROR_STOP=1", "-tAc",
                    statement], cwd="/").stdout.strip()

    def env(self):
        return {"PGHOST": str(self.socket_dir), "PGPORT": str(self.port)}

    def create_database(self, name):
        """Role and database named after the installation, as the README's deploy steps."""
        self.sql(f"CREATE ROLE {name} LOGIN")
        self.sql(f"CREATE DATABASE {name} OWNER {name}")


@pytest.fixture(scope="session")
def postgres(shared_dir):
    cluster = Postgres(shared_dir / "postgres")
    try:
        cluster.start()
        yield cluster
    finally:  # also after a start that timed out half-way
        cluster.stop()


def csrf_post(where, path, fields, cookie_name):
    status, headers, _ = http_get(where, "/")
    token = re.search(cookie_name + r"=([^;]+)", headers["Set-Cookie"]).group(1)
    return http_get(where, path, method="POST", body=urllib.parse.urlencode(fields), headers={
        "Cookie": f"{cookie_name}={token}", "X-CSRFToken": token,
        "Content-Type": "application/x-www-form-urlencoded"})


@pytest.mark.django
@needs_root
def test_postgresql_installation__peer_auth_migrate_write_read(postgres, shared_dir, tmp_path):
    name = "pgshop_dev"
    with os_user(name) as base_dir:
        postgres.create_database(name)
        env = installation_env(shared_dir, HOME=str(base_dir), **postgres.env())
        # `new` migrates as the installation's user: peer authentication, no password.
        new_installation(base_dir, "--database", "postgresql", user=name, env=env)
        assert "pgshop_note" in postgres.sql("SELECT tablename FROM pg_tables", name, name)
        port = free_port()
        command = ["runuser", "-u", name, "--", base_dir / "bin" / "gunicorn", "--bind",
                   f"127.0.0.1:{port}", "stagetools_django:wsgi_application"]
        where = ("127.0.0.1", port)
        with serving(command, where, tmp_path / "gunicorn.log", cwd="/", env=env):
            status, _, body = http_get(where, "/")
            assert json.loads(body)["database"] == "postgresql"
            assert json.loads(body)["database_name"] == name
            status, _, body = csrf_post(where, "/notes/", {"text": "written by the app"},
                                        f"{name}_csrftoken")
            assert status == 200, body
            status, _, body = http_get(where, "/notes/")
            assert json.loads(body) == {"notes": ["written by the app"]}
        assert postgres.sql("SELECT text FROM pgshop_note", name, name) == "written by the app"
        settings_py = base_dir / "src" / "pgshop" / "stagetools_project" / "settings.py"
        assert "PASSWORD" not in settings_py.read_text()
        # What Django connects with: the installation's user on PostgreSQL's socket, no password.
        code = ("import aaa_script_setup; from django.conf import settings; "
                "d = settings.DATABASES['default']; "
                "print(repr((d['USER'], d['PASSWORD'], d['HOST'])))")
        printed = run(["runuser", "-u", name, "--", base_dir / "bin" / "python", "-c", code],
                      env=env, cwd="/").stdout.strip()
        assert printed == repr((name, "", env["PGHOST"]))


@pytest.mark.django
def test_settings_defaults__per_installation_and_stage(tmp_path, monkeypatch):
    import stagetools_django
    monkeypatch.delenv("PGHOST", raising=False)
    prod = stagetools.get_expected_system_from_name("shop_prod", base_dir=tmp_path / "shop_prod")
    dev = stagetools.get_expected_system_from_name("shop_dev", base_dir=tmp_path / "shop_dev")
    for system in (prod, dev):
        system.base_dir.mkdir()
    p = stagetools_django.settings_defaults("postgresql", system=prod)
    d = stagetools_django.settings_defaults("sqlite", system=dev)
    assert p["DATABASES"]["default"] == {
        "ENGINE": "django.db.backends.postgresql", "NAME": "shop_prod", "USER": "shop_prod",
        "PASSWORD": "", "HOST": "/var/run/postgresql", "PORT": ""}
    assert d["DATABASES"]["default"] == {"ENGINE": "django.db.backends.sqlite3",
                                         "NAME": str(tmp_path / "shop_dev" / "shop.sqlite")}
    assert (p["DEBUG"], d["DEBUG"]) == (False, True)
    assert (p["TIME_ZONE"], p["USE_TZ"], p["FILE_UPLOAD_DIRECTORY_PERMISSIONS"]) == (
        "UTC", True, 0o755)
    assert (p["SESSION_COOKIE_NAME"], d["CSRF_COOKIE_NAME"]) == ("shop_prod_sessionid",
                                                                 "shop_dev_csrftoken")
    assert p["CACHES"]["default"]["KEY_PREFIX"] == "shop_prod"
    assert p["SESSION_COOKIE_SECURE"] and p["CSRF_COOKIE_SECURE"] and not d["CSRF_COOKIE_SECURE"]
    assert p["SECURE_PROXY_SSL_HEADER"] == ("HTTP_X_FORWARDED_PROTO", "https")
    assert p["SECRET_KEY"] != d["SECRET_KEY"]
    with pytest.raises(stagetools.StagetoolsError, match="'mysql'"):
        stagetools_django.settings_defaults("mysql", system=dev)


# ---------------------------------------------------------------- deployment: units, nginx, check

SERVER_OF = {"shop_dev": "uvicorn", "shop_qual": "hypercorn", "shop_prod": "gunicorn"}
DATABASE_OF = {"shop_dev": "sqlite", "shop_qual": "sqlite", "shop_prod": "postgresql"}
needs_deploy_tools = pytest.mark.skipif(
    not IN_CI and not (IS_ROOT and shutil.which("systemd-analyze")
                       and os.path.exists("/usr/sbin/nginx") and os.path.exists(SYSTEM_PYTHON)),
    reason="needs root, systemd-analyze, nginx and /usr/bin/python3 "
           "(CI installs them)")


def construct(name, shared_dir, postgres, stack, server, framework="django",
              database="sqlite"):
    """Build an installation from its expected system, as the README's deploy steps do."""
    expected = show_json(name, "--expected", "--server", server, "--framework", framework)
    base_dir = Path(expected["base_dir"])
    stack.enter_context(os_user(name, base_dir))
    env = installation_env(shared_dir, HOME=str(base_dir))
    if database == "postgresql":
        postgres.create_database(name)
        env.update(postgres.env())
    new_installation(base_dir, "--database", database, "--framework", framework, "--server",
                     server, user=name,
                     env=env)
    if framework == "django":
        run(["runuser", "-u", name, "--", expected["python_path"], expected["manage_py_path"],
             "collectstatic", "--no-input"], env=env, cwd="/")
    # Now as its repo declares it (its example job, its database), as a deploy tool reads it.
    expected = show_json(name, "--expected", "--server", server, "--framework", framework)
    install_services(expected, stack)
    return expected, env


def install_services(expected, stack):
    """What the deploy does after the repo is in: the units and sites of the expected system,
    the base dir's and media/'s modes, the socket's directory (each undone by ``stack``)."""
    name, base_dir = expected["name"], Path(expected["base_dir"])
    base_dir.chmod(0o711)  # nginx passes to static/ and media/; nobody lists the home
    for path, text in expected["services"].items():
        if not path.startswith(str(base_dir)):
            existed = os.path.lexists(path)  # the default site: shared, left to who made it
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
            if not existed:
                stack.callback(Path(path).unlink, missing_ok=True)
        if "/sites-available/" in path:
            link = Path(path.replace("/sites-available/", "/sites-enabled/"))
            existed = os.path.lexists(link)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(path)
            if not existed:
                stack.callback(link.unlink, missing_ok=True)
    # As the deploy does: media/ for nginx's group alone; the socket's dir, as systemd makes it.
    os.chown(base_dir / "media", pwd.getpwnam(name).pw_uid, grp.getgrnam("www-data").gr_gid)
    (base_dir / "media").chmod(0o2750)
    stack.callback(shutil.rmtree, expected["run_dir"], True)
    Path(expected["run_dir"]).mkdir(mode=0o755, exist_ok=True)


@pytest.fixture(scope="session")
def three_installations(shared_dir, postgres):
    with contextlib.ExitStack() as stack:
        yield {name: construct(name, shared_dir, postgres, stack, server,
                               database=DATABASE_OF[name])
               for name, server in SERVER_OF.items()}


def listing(name):
    """Every file of an installation with its mode, owner, size and time."""
    roots = [Path(f"/home/{name}"), Path(f"/run/{name}")] + [
        Path(p) for p in glob.glob(f"/etc/systemd/system/{name}.*")
]
    entries = []
    for root in roots:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            info = path.lstat()
            entries.append((str(path), info.st_mode, info.st_uid, info.st_gid, info.st_size,
                            info.st_mtime_ns))
    return sorted(entries)


def check(name, *args):
    result = cli("check", name, "--json", *args)  # the repo's declaration says the rest
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    return result.returncode, {d["what"]: d for d in report["differences"]}


@needs_deploy_tools
def test_units__verify_and_security_exposure(three_installations, tmp_path):
    for name, (expected, _) in three_installations.items():
        units = [f"/etc/systemd/system/{name}.socket", f"/etc/systemd/system/{name}.service"]
        result = run(["systemd-analyze", "verify", *units], check=False)
        assert result.returncode == 0, result.stderr
        assert name not in result.stdout + result.stderr, result.stderr
        result = run(["systemd-analyze", "security", "--offline=true", "--threshold=20",
                      units[1]], check=False)
        exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        assert result.returncode == 0 and float(exposure.group(1)) <= 2.0, result.stdout
        assert f"User={name}\n" in expected["services"][units[1]]
        user_units = [path for path in expected["services"] if "/.config/systemd/user/" in path]
        user_dir = tmp_path / name
        user_dir.mkdir()
        for path in user_units:
            (user_dir / Path(path).name).write_text(expected["services"][path])
        runtime = tmp_path / f"runtime-{name}"
        runtime.mkdir()
        result = run(["systemd-analyze", "--user", "verify", *sorted(user_dir.iterdir())],
                     check=False, env=clean_env(XDG_RUNTIME_DIR=str(runtime)))
        assert result.returncode == 0, result.stderr


@needs_deploy_tools
def test_check__constructed_installation_holds(three_installations, shared_dir):
    for name in three_installations:
        before = listing(name)
        returncode, differences = check(name)
        assert (returncode, differences) == (0, {})
        assert listing(name) == before
        # The expected system's name defaults to the login name of the process.
        as_user = run(["runuser", "-u", name, "--", SYSTEM_PYTHON, shared_dir / "stagetools.py",
                       "show", "--expected", "--json"], cwd="/")
        assert json.loads(as_user.stdout)["name_source"] == "login name"
        assert json.loads(as_user.stdout)["name"] == name
    table = cli("check", "shop_dev")  # no flags: the repo declares uvicorn
    assert table.returncode == 0 and re.match(r"shop_dev: all \d+ checks hold", table.stdout)
    started = time.monotonic()
    audit = cli("check", "--all")
    seconds = time.monotonic() - started
    assert audit.returncode == 0, audit.stdout + audit.stderr
    for name in three_installations:
        assert re.search(rf"^{name} +all \d+ checks hold$", audit.stdout, re.M), audit.stdout
    print(f"check --all: {len(audit.stdout.splitlines())} installations in {seconds:.2f} s")
    report = json.loads(cli("check", "--all", "--json").stdout)
    assert report["ok"] and {r["name"] for r in report["installations"]} >= set(SERVER_OF)


@needs_deploy_tools
def test_check__follows_root_s_record_not_the_checkout(three_installations, tmp_path):
    """An installation a deploy tool recorded is checked as its deployed commit declares,
    whatever its checkout says, and check --all lists it even if its pyvenv.cfg is a link."""
    record = dict(RECORD, declaration="[stagetools]\nserver = gunicorn\n")  # not hypercorn
    with recorded(record, tmp_path), pytest.MonkeyPatch.context() as patch:
        patch.setattr(stagetools, "_RECORD_DIR", str(tmp_path))
        report = stagetools._check_report(stagetools._expected_on_this_host("shop_qual", None))
        assert "file /etc/systemd/system/shop_qual.service" in [
            difference["what"] for difference in report["differences"]], report
        pyvenv = Path("/home/shop_qual/pyvenv.cfg")
        with fault(lambda: (pyvenv.rename("/home/shop_qual/pyvenv.away"),
                            pyvenv.symlink_to("/home/shop_qual/pyvenv.away")),
                   lambda: (pyvenv.unlink(), Path("/home/shop_qual/pyvenv.away").rename(pyvenv))):
            found = stagetools._installations_on_this_host()
            assert found["shop_qual"] is None  # from the record, not from its files
    assert stagetools._installations_on_this_host()["shop_qual"] == "/home/shop_qual"
    assert check("shop_qual") == (0, {})


@contextlib.contextmanager
def fault(break_it, repair):
    break_it()
    try:
        yield
    finally:
        repair()


@needs_deploy_tools
def test_check__each_fault_by_name(three_installations):
    name = "shop_qual"
    base = Path("/home/shop_qual")
    info = pwd.getpwnam(name)
    wrapper = "#!/bin/sh\nSTAGETOOLS_NAME=shop_dev exec /usr/bin/python3 \"$@\"\n"
    python = base / "bin" / "python"
    python_target = os.readlink(python)
    unit = Path(f"/etc/systemd/system/{name}.service")
    unit_text = unit.read_text()
    key, database, media = base / "secret_key", base / "shop.sqlite", base / "media"
    static, pyvenv = base / "static", base / "pyvenv.cfg"
    media_mode = stat.S_IMODE(media.stat().st_mode)
    faults = {
        "base_dir owner": (lambda: os.chown(base, 0, 0),
                           lambda: os.chown(base, info.pw_uid, info.pw_gid)),
        f"{base}/media": (lambda: (base / "media").rename(base / "media.away"),
                          lambda: (base / "media.away").rename(base / "media")),
        "secret_key_path mode": (lambda: (base / "secret_key").chmod(0o644),
                                 lambda: (base / "secret_key").chmod(0o600)),
        # Root would run, as shop_qual, a Python that others may have replaced: not asked.
        "actual system": (lambda: base.chmod(0o777), lambda: base.chmod(0o711)),
        # Others could read the sessions in the database, the uploads, the key.
        "database_sqlite_path mode": (lambda: database.chmod(0o644),
                                      lambda: database.chmod(0o600)),
        "media_dir mode": (lambda: media.chmod(0o755), lambda: media.chmod(media_mode)),
        "secret_key_path": (lambda: (key.rename(base / "away"), key.symlink_to(base / "away")),
                            lambda: (key.unlink(), (base / "away").rename(key))),
        "python_path": (lambda: (python.unlink(), python.mkdir()),  # a directory is no program
                        lambda: (python.rmdir(), python.symlink_to(python_target))),
        # A link where a directory or pyvenv.cfg should be: another user's files could stand
        # behind it (nginx would serve them; check --all would not find the installation).
        "static_dir": (lambda: (static.rename(base / "static.away"),
                                static.symlink_to(base / "static.away")),
                       lambda: (static.unlink(), (base / "static.away").rename(static))),
        str(pyvenv): (lambda: (pyvenv.rename(base / "pyvenv.away"),
                               pyvenv.symlink_to(base / "pyvenv.away")),
                      lambda: (pyvenv.unlink(), (base / "pyvenv.away").rename(pyvenv))),
        f"file {unit}": (lambda: unit.write_text(unit_text.replace("NoNewPrivileges=yes\n", "")),
                         lambda: unit.write_text(unit_text)),
        "user": (lambda: run(["userdel", name]),
                 lambda: (run(["groupadd", "--gid", info.pw_gid, name]),
                          run(["useradd", "--no-create-home", "--home-dir", base, "--uid",
                               info.pw_uid, "--gid", info.pw_gid, "--shell",
                               "/usr/sbin/nologin", name]))),
    }
    for what, (break_it, repair) in faults.items():
        with fault(break_it, repair):
            before = listing(name)
            returncode, differences = check(name)
            assert returncode == 1 and what in differences, (what, differences)
            assert listing(name) == before, what
        assert check(name) == (0, {}), f"not repaired: {what}"
    # A Python that names another installation than its virtualenv is refused there.
    with fault(lambda: (python.unlink(), python.write_text(wrapper), python.chmod(0o755)),
               lambda: (python.unlink(), python.symlink_to(python_target))):
        result = cli("check", name)
        assert result.returncode == 3 and "STAGETOOLS_NAME='shop_dev': it contradicts" in \
            result.stderr, result.stderr
    with fault(lambda: (base / "secret_key").chmod(0o400),  # stricter is fine, as for
               lambda: (base / "secret_key").chmod(0o600)):  # read_secret_key
        assert check(name) == (0, {})
    _, differences = check("shop_dev", "--server", "uvicorn")
    assert differences == {}
    table = cli("check", name, "--server", "hypercorn", "--core-repo", "other")
    assert table.returncode == 1 and "core_repo_dir" in table.stdout


@contextlib.contextmanager
def printed_at_start_up(name, data):
    """The installation's Python prints ``data`` (bytes, or the Python expression that makes
    them) and exits 0 before anything else runs: a .pth file in its virtualenv, as any
    package the installation installs could add."""
    site = Path(glob.glob(f"/home/{name}/lib/python3*/site-packages")[0])
    pth = site / "zz_stagetools_test.pth"
    expression = f"bytes.fromhex('{data.hex()}')" if isinstance(data, bytes) else data
    pth.write_text(f"import os, sys; sys.stdout.buffer.write({expression}); "
                   "sys.stdout.flush(); os._exit(0)\n")
    try:
        yield
    finally:
        pth.unlink()


def probe_answer(system=None, version=None, writable=None):
    """What the probe prints for shop_qual, with ``system``, ``version`` or ``writable``
    instead of the real ones."""
    real = show_json("shop_qual", "--expected", "--server", "hypercorn")
    real.pop("services")
    return json.dumps({"version": stagetools.__version__ if version is None else version,
                       "system": real if system is None else system(real),
                       "writable": {real[key]: True for key in ("static_dir", "media_dir")}
                       if writable is None else writable}).encode()


def hostile_answers():
    """Answers shaped almost like the probe's, but not like a system: exit 3."""
    return [probe_answer(writable={}), probe_answer(writable={"/x": True}),
            probe_answer(version=1), probe_answer(version=None) + b" trailing",
            probe_answer(system=lambda real: dict(real, services={"/etc/x": 1})),
            probe_answer(system=lambda real: dict(real, host_names=[1])),
            b'{"system": {}, "writable": {}}', b"\xff\xfe{}", b"[1, 2]", b"null", b"",
            b"[" * 200_000]  # nested deeper than json may go


@needs_deploy_tools
@settings(max_examples=25, deadline=None)
@given(printed=st.binary(max_size=300))
def test_check__whatever_the_installation_prints__exit_1_or_3_one_line(three_installations,
                                                                      printed):
    assert_could_not_check(printed)


@needs_deploy_tools
@pytest.mark.parametrize("index", range(12))
def test_check__answers_almost_like_the_probes__exit_3_one_line(three_installations, index):
    assert_could_not_check(hostile_answers()[index])


def assert_could_not_check(printed):
    with printed_at_start_up("shop_qual", printed):
        result = cli("check", "shop_qual", "--server", "hypercorn")
    assert result.returncode == 3, (printed, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "could not check shop_qual" in result.stderr
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", result.stdout + result.stderr)


@needs_deploy_tools
def test_check__a_system_that_differs_by_field_or_type__exit_1_naming_it(three_installations):
    # Another version of stagetools may have other fields: a missing one differs, an unknown
    # one is not compared; a value of another type differs (the version is told).
    for system, what in ((lambda real: dict(real, is_debug="no"), "actual is_debug"),
                         (lambda real: {k: v for k, v in real.items() if k != "database_name"},
                          "actual database_name"),
                         (lambda real: dict(real, core_app="books"), "actual core_app")):
        with printed_at_start_up("shop_qual", probe_answer(system, version="0.9")):
            returncode, differences = check("shop_qual", "--server", "hypercorn")
        assert returncode == 1 and list(differences) == [what], differences
        assert "(it runs stagetools 0.9, this check" in differences[what]["actual"] or \
            differences[what]["actual"] == "missing"
    with printed_at_start_up("shop_qual", probe_answer(lambda real: dict(real, later="x"))):
        assert check("shop_qual", "--server", "hypercorn") == (0, {})


@needs_deploy_tools
def test_check__what_the_installation_says_is_escaped_and_bounded(three_installations):
    painted = probe_answer(system=lambda real: dict(real, core_app="\x1b[2J\x1b[31mowned"))
    with printed_at_start_up("shop_qual", painted):
        table = cli("check", "shop_qual", "--server", "hypercorn")
        as_json = cli("check", "shop_qual", "--server", "hypercorn", "--json")
    assert table.returncode == 1 and "actual core_app" in table.stdout
    assert "\x1b" not in table.stdout and "\\x1b[2J" in table.stdout
    assert as_json.returncode == 1 and "\x1b" not in as_json.stdout
    # The peak of this process alone: VmHWM starts afresh at exec, unlike ru_maxrss.
    measure = ("import re, sys, stagetools\n"
               "code = stagetools.main(['check', 'shop_qual', '--server', 'hypercorn'])\n"
               "status = open('/proc/self/status').read()\n"
               "print(re.search(r'VmHWM:\\s+(\\d+)', status).group(1), file=sys.stderr)\n"
               "sys.exit(code)\n")
    with printed_at_start_up("shop_qual", "b'x' * (150 << 20)"):
        started = time.monotonic()
        result = run([sys.executable, "-c", measure], check=False, cwd=HERE)
        seconds = time.monotonic() - started
    *message, peak_kib = result.stderr.splitlines()
    assert result.returncode == 3 and "printed more than" in message[-1]
    assert int(peak_kib) < 100_000 and seconds < 30, (peak_kib, seconds)


def socket_activated(expected, env, log, stack):
    """Start the server as systemd would: ExecStart of the unit, its user, the socket on fd 3."""
    service = expected["services"][f"/etc/systemd/system/{expected['name']}.service"]
    exec_start = shlex.split(re.search(r"^ExecStart=(.*)$", service, re.M).group(1))
    workdir = re.search(r"^WorkingDirectory=(.*)$", service, re.M).group(1)
    path = Path(expected["socket_path"])
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    unit = expected["services"][f"/etc/systemd/system/{expected['name']}.socket"]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    # What systemd does with the .socket unit's settings (the test asserts the results).
    shutil.chown(path, "root", re.search(r"^SocketGroup=(.*)$", unit, re.M).group(1))
    path.chmod(int(re.search(r"^SocketMode=(.*)$", unit, re.M).group(1), 8))
    listener.listen(64)
    stack.callback(listener.close)
    handoff = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
               "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
               "os.execv(sys.argv[2], sys.argv[2:])")
    command = [SYSTEM_PYTHON, "-c", handoff, str(listener.fileno()), *exec_start]
    return stack.enter_context(serving(
        command, str(path), log, cwd=workdir, env=env, pass_fds=[listener.fileno()],
        user=expected["user"], group=expected["group"], extra_groups=[]))


def nginx_in_front(sites, port, tmp_path, stack):
    """The host's nginx as the deploy configures it, with the sites in ``sites``, on
    127.0.0.1:``port``, until ``stack`` closes."""
    conf = tmp_path / "nginx.conf"
    temp = "\n".join(f"  {kind}_temp_path {tmp_path}/{kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"""user www-data;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
  include /etc/nginx/mime.types;
  access_log {tmp_path}/access.log;
{temp}
  include {sites}/*.conf;
}}
""")
    assert run(["/usr/sbin/nginx", "-t", "-c", conf], check=False).returncode == 0
    stack.enter_context(serving(["/usr/sbin/nginx", "-c", conf, "-g", "daemon off;"],
                                ("127.0.0.1", port), tmp_path / "nginx.out"))


@needs_deploy_tools
def test_three_installations_behind_one_nginx(three_installations, tmp_path):
    port = free_port()
    sites = tmp_path / "sites"
    sites.mkdir()
    with contextlib.ExitStack() as stack:
        for name, (expected, env) in three_installations.items():
            socket_activated(expected, env, tmp_path / f"{name}.log", stack)
            site = expected["services"][f"/etc/nginx/sites-available/{name}.conf"]
            (sites / f"{name}.conf").write_text(site.replace("listen 80;",
                                                             f"listen 127.0.0.1:{port};"))
            mode = Path(expected["socket_path"]).stat()
            assert (stat.S_IMODE(mode.st_mode), mode.st_gid) == (0o660, pwd.getpwnam(
                "www-data").pw_gid)
        nginx_in_front(sites, port, tmp_path, stack)
        for name, (expected, _) in three_installations.items():
            host = {"Host": f"{expected['container']}.localhost"}
            status, headers, body = http_get(("127.0.0.1", port), "/", host)
            assert status == 200, body
            page = json.loads(body)
            assert (page["name"], page["stage"], page["debug"]) == (
                name, expected["stage"], expected["is_debug"])
            assert page["database"] == DATABASE_OF[name]
            assert page["database_name"] == (name if DATABASE_OF[name] == "postgresql"
                                             else expected["database_sqlite_path"])
            status, headers, body = http_get(("127.0.0.1", port), "/static/admin/css/base.css",
                                             host)
            assert status == 200 and headers["Server"].startswith("nginx")
            assert "X-Frame-Options" not in headers, "static file came from Django, not nginx"
            # An upload as Django writes it (0644 in media/, which the deploy made 2750
            # NAME:www-data): nginx serves it, as a sandbox that runs no script.
            upload = Path(expected["media_dir"]) / "page.html"
            run(["runuser", "-u", name, "--", "sh", "-c", "umask 077 && printf '<script>x()"
                 "</script>' > \"$0\" && chmod 644 \"$0\"", upload], cwd="/")
            status, headers, body = http_get(("127.0.0.1", port), "/media/page.html", host)
            assert status == 200 and "sandbox" in headers["Content-Security-Policy"], headers
            assert headers["X-Content-Type-Options"] == "nosniff"
            nobody = run(["runuser", "-u", "nobody", "--", "cat", upload], check=False, cwd="/")
            assert nobody.returncode != 0 and "Permission denied" in nobody.stderr
            upload.unlink()
        # Only root and the web server's group may connect to an installation's socket.
        nobody = run(["runuser", "-u", "nobody", "--", SYSTEM_PYTHON, "-c",
                      "import socket; s = socket.socket(socket.AF_UNIX); "
                      "s.connect('/run/shop_prod/shop_prod.sock')"], check=False)
        assert nobody.returncode != 0 and "PermissionError" in nobody.stderr



# ---------------------------------------------------------------- Flask and Starlette


def test_flask_and_starlette_config(tmp_path, monkeypatch):
    from starlette.config import Config
    monkeypatch.delenv("PGHOST", raising=False)
    dev = stagetools.get_expected_system_from_name("blog_dev", base_dir=tmp_path / "blog_dev",
                                                   framework="flask")
    prod = stagetools.get_expected_system_from_name("feed_prod", base_dir=tmp_path / "feed_prod",
                                                    framework="starlette")
    for system in (dev, prod):
        system.base_dir.mkdir()
    flask = stagetools.flask_config(dev)
    assert flask == {
        "DEBUG": True, "SECRET_KEY": stagetools.read_secret_key(dev),
        "DATABASE_URL": f"sqlite:///{tmp_path}/blog_dev/blog.sqlite",
        "STATIC_FOLDER": f"{tmp_path}/blog_dev/static", "MEDIA_FOLDER": f"{tmp_path}/blog_dev/media",
        "SESSION_COOKIE_NAME": "blog_dev_session", "SESSION_COOKIE_SECURE": False,
        "PREFERRED_URL_SCHEME": "http"}
    config = Config(environ=stagetools.starlette_config(prod, "postgresql"))
    assert config("DEBUG", cast=bool) is False and config("SESSION_COOKIE_SECURE", cast=bool)
    assert config("DATABASE_URL") == \
        "postgresql://feed_prod@/feed_prod?host=/var/run/postgresql"
    assert config("SECRET_KEY") == stagetools.read_secret_key(prod) != flask["SECRET_KEY"]
    assert (prod.asgi_application, prod.server) == ("feed:application", "uvicorn")
    assert (dev.wsgi_application, dev.server) == ("blog:application", "gunicorn")
    with pytest.raises(stagetools.StagetoolsError, match="server for flask 'uvicorn'"):
        stagetools.get_expected_system_from_name("blog_dev", framework="flask", server="uvicorn")


def test_flask_and_starlette_units_follow_from_the_system():
    flask = show_json("blog_dev", "--expected", "--framework", "flask")["services"]
    starlette = show_json("feed_prod", "--expected", "--framework", "starlette", "--server",
                          "hypercorn")["services"]
    workers = min(2 * os.cpu_count() + 1, 12)  # PROD's rule (see test_capacity__...)
    assert "ExecStart=/home/blog_dev/bin/gunicorn --workers 1 --threads 4 blog:application\n" \
        in flask["/etc/systemd/system/blog_dev.service"]
    assert (f"ExecStart=/home/feed_prod/bin/hypercorn --bind fd://3 --workers {workers} "
            "feed:application\n") in starlette["/etc/systemd/system/feed_prod.service"]
    assert "Type=exec\n" in starlette["/etc/systemd/system/feed_prod.service"]


@needs_deploy_tools
def test_flask_dev_and_starlette_prod__served_from_their_units(shared_dir, postgres, tmp_path):
    with contextlib.ExitStack() as stack:
        blog, blog_env = construct("blog_dev", shared_dir, postgres, stack, "gunicorn",
                                   framework="flask")
        feed, feed_env = construct("feed_prod", shared_dir, postgres, stack, "uvicorn",
                                   framework="starlette", database="postgresql")
        # A second gunicorn worker (DEV has one), to show it accepts the first one's cookie.
        unit = "/etc/systemd/system/blog_dev.service"
        blog["services"][unit] = blog["services"][unit].replace("--workers 1 ", "--workers 2 ")
        socket_activated(blog, blog_env, tmp_path / "blog.log", stack)
        socket_activated(feed, feed_env, tmp_path / "feed.log", stack)
        status, _, body = http_get(blog["socket_path"], "/")
        assert json.loads(body) == {"name": "blog_dev", "stage": "dev", "debug": True,
                                    "database": "sqlite"}
        status, _, body = http_get(feed["socket_path"], "/")
        assert json.loads(body) == {"name": "feed_prod", "stage": "prod", "debug": False,
                                    "database": "postgresql"}
        status, headers, body = http_get(blog["socket_path"], "/visits/")
        cookie = headers["Set-Cookie"].split(";")[0]
        assert cookie.startswith("blog_dev_session=")
        # The cookie holds the session, signed with the installation's key by one worker.
        pages = other_workers_pages(blog["socket_path"], "/visits/", cookie,
                                    json.loads(body)["pid"])
        assert all(page["visits"] == 2 for page in pages), pages
        status, _, body = http_get(blog["socket_path"], "/notes/", method="POST",
                                   body="text=flask+note", headers={
                                       "Content-Type": "application/x-www-form-urlencoded"})
        assert json.loads(body) == {"notes": ["flask note"]}
        status, _, body = http_get(feed["socket_path"], "/notes/", method="POST",
                                   body=json.dumps({"text": "starlette note"}),
                                   headers={"Content-Type": "application/json"})
        assert json.loads(body) == {"notes": ["starlette note"]}
        assert postgres.sql("SELECT text FROM notes", "feed_prod", "feed_prod") == "starlette note"
        sqlite = run(["runuser", "-u", "blog_dev", "--", SYSTEM_PYTHON, "-c",
                      "import sqlite3; print(sqlite3.connect('/home/blog_dev/blog.sqlite')"
                      ".execute('SELECT text FROM notes').fetchall())"], cwd="/")
        assert sqlite.stdout.strip() == "[('flask note',)]"
        for name, server in (("blog_dev", "gunicorn"), ("feed_prod", "uvicorn")):
            framework = "flask" if name == "blog_dev" else "starlette"
            result = cli("check", name, "--framework", framework, "--server", server)
            assert result.returncode == 0, result.stdout
        # The starters' example job, as its unit runs it: the user's, after aaa_script_setup.
        for name, env in (("blog_dev", blog_env), ("feed_prod", feed_env)):
            expected = show_json(name, "--expected")  # as its repo declares it now
            assert run_job(expected, "notes-report", env).stdout == "1 notes\n"


# ---------------------------------------------------------------- adopting an existing Django project
#
# Real projects written here, each with models, migrations, a login page, static files, tests
# and data in its SQLite database from before adoption: startproject's layout (the library)
# and apps inside the settings package (the blog). Each is adopted by `stagetools adopt`
# alone; then the commands it printed run as printed.

# A project as Django's tutorials make it: startproject, an app with a model, views and its
# own tests, templates in the root templates/ folder, django.contrib.auth's login page.
LIBRARY_FILES = {
    "catalog/models.py": """\
from django.db import models


class Book(models.Model):
    title = models.CharField(max_length=200)
    author = models.CharField(max_length=100)

    def __str__(self):
        return f"{self.title} ({self.author})"
""",
    "catalog/views.py": """\
from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from .models import Book


def index(request):
    return render(request, "catalog/index.html", {"books": Book.objects.order_by("title")})


@login_required
def shelf(request):
    return render(request, "catalog/shelf.html")
""",
    "catalog/urls.py": """\
from django.urls import path

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("shelf/", views.shelf, name="shelf"),
]
""",
    "catalog/tests.py": """\
from django.contrib.auth.models import User
from django.test import TestCase

from .models import Book


class CatalogTests(TestCase):
    def test_book_names_title_and_author(self):
        self.assertEqual(str(Book(title="Dune", author="Herbert")), "Dune (Herbert)")

    def test_index_lists_the_books(self):
        Book.objects.create(title="Dune", author="Herbert")
        response = self.client.get("/")
        self.assertContains(response, "Dune (Herbert)")
        self.assertTemplateUsed(response, "catalog/index.html")

    def test_login_page_is_the_projects_own(self):
        response = self.client.get("/accounts/login/")
        self.assertContains(response, "Log in to the library")
        self.assertTemplateUsed(response, "registration/login.html")

    def test_shelf_needs_a_login(self):
        self.assertRedirects(self.client.get("/shelf/"), "/accounts/login/?next=/shelf/")

    def test_login_then_shelf(self):
        User.objects.create_user("ann", password="a-long-library-password")
        response = self.client.post("/accounts/login/", {
            "username": "ann", "password": "a-long-library-password"})
        self.assertRedirects(response, "/")
        self.assertContains(self.client.get("/shelf/"), "Shelf of ann")
""",
    "catalog/static/catalog/library.css": "h1 { font-variant: small-caps; }\n",
    "templates/base.html": """\
{% load static %}<!doctype html>
<title>Local library</title><link rel="stylesheet" href="{% static 'catalog/library.css' %}">
{% block content %}{% endblock %}
""",
    "templates/catalog/index.html": """\
{% extends "base.html" %}
{% block content %}<h1>Local library catalog</h1>
<ul>{% for book in books %}<li>{{ book }}</li>{% endfor %}</ul>{% endblock %}
""",
    "templates/catalog/shelf.html": """\
{% extends "base.html" %}
{% block content %}<h1>Shelf of {{ user.username }}</h1>{% endblock %}
""",
    "templates/registration/login.html": """\
{% extends "base.html" %}
{% block content %}<h1>Log in to the library</h1>
<form method="post">{% csrf_token %}{{ form.as_p }}<button>Log in</button></form>{% endblock %}
""",
    ".gitignore": "db.sqlite3\n__pycache__/\n",
}
LIBRARY_PASSWORD = "a-long-library-password"

def app_config(module, label=None):
    """An app's apps.py as startapp writes it, named by its module (and a label of its own)."""
    return (f"from django.apps import AppConfig\n\n\nclass {module.split('.')[-1].title()}"
            f"Config(AppConfig):\n    default_auto_field = \"django.db.models.BigAutoField\"\n"
            f"    name = \"{module}\"\n" + (f"    label = \"{label}\"\n" if label else ""))


# The layout of issue 21: three apps inside the settings package (mysite/settings.py beside
# mysite/accounts/, mysite/articles/, mysite/comments/), named mysite.accounts and so on, one
# with an app label of its own; a sign-in page of its own; relative imports in urls.py; a
# developer's local settings imported if present; requirements in an included file.
BLOG_FILES = {
    "mysite/accounts/__init__.py": "",
    "mysite/accounts/apps.py": app_config("mysite.accounts"),
    "mysite/accounts/models.py": """\
from django.conf import settings
from django.db import models


class Profile(models.Model):
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    bio = models.TextField(blank=True)
""",
    "mysite/accounts/views.py": """\
from django.contrib.auth.views import LoginView


class SignInView(LoginView):
    template_name = "accounts/sign_in.html"
""",
    "mysite/accounts/templates/accounts/sign_in.html": """\
{% extends "base.html" %}
{% block content %}<h1>Sign in to the blog</h1>
<form method="post">{% csrf_token %}{{ form.as_p }}<button>Sign in</button></form>{% endblock %}
""",
    "mysite/accounts/tests.py": """\
from django.contrib.auth.models import User
from django.test import TestCase

from mysite.accounts.models import Profile


class SignInTests(TestCase):
    def test_sign_in_page_is_the_blogs_own(self):
        response = self.client.get("/sign-in/")
        self.assertContains(response, "Sign in to the blog")
        self.assertTemplateUsed(response, "accounts/sign_in.html")

    def test_sign_in_then_home(self):
        User.objects.create_user("ann", password="a-long-blog-password")
        response = self.client.post("/sign-in/", {"username": "ann",
                                                  "password": "a-long-blog-password"})
        self.assertRedirects(response, "/")

    def test_wrong_password_stays(self):
        User.objects.create_user("ann", password="a-long-blog-password")
        response = self.client.post("/sign-in/", {"username": "ann", "password": "wrong"})
        self.assertEqual(response.status_code, 200)

    def test_profile_belongs_to_a_user(self):
        user = User.objects.create_user("bob")
        self.assertEqual(Profile.objects.create(user=user, bio="hi").user, user)
""",
    "mysite/articles/__init__.py": "",
    "mysite/articles/apps.py": app_config("mysite.articles", label="blog_articles"),
    "mysite/articles/models.py": """\
from django.conf import settings
from django.db import models


class Article(models.Model):
    title = models.CharField(max_length=200)
    slug = models.SlugField(unique=True)
    body = models.TextField()
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)

    def __str__(self):
        return self.title
""",
    "mysite/articles/views.py": """\
from django.shortcuts import get_object_or_404, render

from .models import Article


def article_list(request):
    return render(request, "articles/list.html", {"articles": Article.objects.order_by("title")})


def article_detail(request, slug):
    return render(request, "articles/detail.html",
                  {"article": get_object_or_404(Article, slug=slug)})
""",
    "mysite/articles/urls.py": """\
from django.urls import path

from . import views

urlpatterns = [
    path("", views.article_list, name="article-list"),
    path("articles/<slug:slug>/", views.article_detail, name="article-detail"),
]
""",
    "mysite/articles/templates/articles/list.html": """\
{% extends "base.html" %}
{% block content %}<h1>Articles</h1>
<ul>{% for article in articles %}<li><a href="{% url 'article-detail' article.slug %}">\
{{ article }}</a></li>{% endfor %}</ul>{% endblock %}
""",
    "mysite/articles/templates/articles/detail.html": """\
{% extends "base.html" %}
{% block content %}<h1>{{ article.title }}</h1><p>{{ article.body }}</p>
<ul>{% for comment in article.comment_set.all %}<li>{{ comment.text }}</li>{% endfor %}</ul>
{% if user.is_authenticated %}<form method="post" action="{% url 'comment-add' article.slug %}">
{% csrf_token %}<textarea name="text"></textarea><button>Comment</button></form>{% endif %}
{% endblock %}
""",
    "mysite/articles/static/articles/blog.css": "body { font-family: serif; }\n",
    "mysite/articles/tests.py": """\
from django.contrib.auth.models import User
from django.test import TestCase

from mysite.articles.models import Article


class ArticleTests(TestCase):
    def setUp(self):
        self.ann = User.objects.create_user("ann")
        Article.objects.create(title="Second", slug="second", body="Two", author=self.ann)
        Article.objects.create(title="First", slug="first", body="One", author=self.ann)

    def test_list_in_title_order(self):
        response = self.client.get("/")
        self.assertEqual([a.title for a in response.context["articles"]], ["First", "Second"])

    def test_detail(self):
        self.assertContains(self.client.get("/articles/first/"), "One")

    def test_missing_article_404(self):
        self.assertEqual(self.client.get("/articles/none/").status_code, 404)

    def test_tables_have_the_apps_label(self):
        self.assertEqual(Article._meta.db_table, "blog_articles_article")
""",
    "mysite/comments/__init__.py": "",
    "mysite/comments/apps.py": app_config("mysite.comments"),
    "mysite/comments/models.py": """\
from django.conf import settings
from django.db import models

from mysite.articles.models import Article


class Comment(models.Model):
    article = models.ForeignKey(Article, on_delete=models.CASCADE)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    text = models.TextField()
""",
    "mysite/comments/views.py": """\
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.http import require_POST

from mysite.articles.models import Article

from .models import Comment


@login_required
@require_POST
def add_comment(request, slug):
    article = get_object_or_404(Article, slug=slug)
    Comment.objects.create(article=article, author=request.user, text=request.POST["text"])
    return redirect("article-detail", slug=slug)
""",
    "mysite/comments/tests.py": """\
from django.contrib.auth.models import User
from django.test import TestCase

from mysite.articles.models import Article
from mysite.comments.models import Comment


class CommentTests(TestCase):
    def setUp(self):
        self.ann = User.objects.create_user("ann", password="a-long-blog-password")
        Article.objects.create(title="First", slug="first", body="One", author=self.ann)

    def test_anonymous_comment_goes_to_sign_in(self):
        response = self.client.post("/articles/first/comments/", {"text": "hi"})
        self.assertRedirects(response, "/sign-in/?next=/articles/first/comments/")

    def test_comment_shown_on_the_article(self):
        self.client.login(username="ann", password="a-long-blog-password")
        self.client.post("/articles/first/comments/", {"text": "Nice one"})
        self.assertEqual(Comment.objects.get().text, "Nice one")
        self.assertContains(self.client.get("/articles/first/"), "Nice one")
""",
    "mysite/templates/base.html": """\
{% load static %}<!doctype html>
<title>Blog</title><link rel="stylesheet" href="{% static 'articles/blog.css' %}">
{% block content %}{% endblock %}
""",
    "mysite/urls.py": """\
from django.contrib import admin
from django.urls import include, path

from .accounts.views import SignInView
from .comments import views as comment_views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("sign-in/", SignInView.as_view(), name="sign-in"),
    path("articles/<slug:slug>/comments/", comment_views.add_comment, name="comment-add"),
    path("", include("mysite.articles.urls")),
]
""",
    "requirements.txt": "-r requirements/base.txt\n",
    "requirements/base.txt": "Django>=4.2  # the LTS or newer\n",
    ".gitignore": "db.sqlite3\n__pycache__/\nmysite/local_settings.py\n",
}
BLOG_PASSWORD = "a-long-blog-password"




def edit(path, *replacements):
    text = path.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)


def with_data_committed(directory, apps, data):
    """The project's migrations, its database (db.sqlite3, made with Django's own manage.py)
    with the rows that ``data`` (code for manage.py shell) makes, and a git commit."""
    run([sys.executable, "manage.py", "makemigrations", *apps], cwd=directory)
    run([sys.executable, "manage.py", "migrate", "--no-input"], cwd=directory)
    run([sys.executable, "manage.py", "shell", "-c", data], cwd=directory)
    git(directory, "init", "--quiet")
    git(directory, "add", "--all")
    git(directory, "commit", "--quiet", "--message", "the project before stagetools")


def make_library_project(directory):
    """django-admin startproject locallibrary, startapp catalog, and the edits its user made."""
    directory.mkdir()
    run([sys.executable, "-m", "django", "startproject", "locallibrary", directory])
    run([sys.executable, "manage.py", "startapp", "catalog"], cwd=directory)
    for relative, text in LIBRARY_FILES.items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_text(text)
    edit(directory / "locallibrary" / "settings.py",
         ("'django.contrib.staticfiles',\n",
          "'django.contrib.staticfiles',\n    'catalog.apps.CatalogConfig',\n"),
         ("'DIRS': [],", "'DIRS': [BASE_DIR / 'templates'],"),
         ("USE_TZ = True\n", "USE_TZ = True\n\nLOGIN_REDIRECT_URL = '/'\n"))
    edit(directory / "locallibrary" / "urls.py",
         ("from django.urls import path", "from django.urls import include, path"),
         ("    path('admin/', admin.site.urls),\n",
          "    path('admin/', admin.site.urls),\n"
          "    path('accounts/', include('django.contrib.auth.urls')),\n"
          "    path('', include('catalog.urls')),\n"))
    with_data_committed(directory, ["catalog"], (
        "from django.contrib.auth.models import User; from catalog.models import Book; "
        f"User.objects.create_user('ann', password='{LIBRARY_PASSWORD}'); "
        "Book.objects.create(title='Dune', author='Herbert')"))


def make_blog_project(directory):
    """The apps-inside-the-settings-package layout: startproject mysite, its apps in mysite/."""
    directory.mkdir()
    run([sys.executable, "-m", "django", "startproject", "mysite", directory])
    for relative, text in BLOG_FILES.items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_text(text)
    edit(directory / "mysite" / "settings.py",
         ("'django.contrib.staticfiles',\n",
          "'django.contrib.staticfiles',\n    'mysite.accounts',\n"
          "    'mysite.articles.apps.ArticlesConfig',\n    'mysite.comments',\n"),
         ("'DIRS': [],", "'DIRS': [BASE_DIR / 'mysite' / 'templates'],"),
         ("USE_TZ = True\n", "USE_TZ = True\n\nLOGIN_URL = 'sign-in'\nLOGIN_REDIRECT_URL = '/'\n"
          "\ntry:\n    from .local_settings import *  # noqa: F403 (a developer's own)\n"
          "except ImportError:\n    pass\n"))
    with_data_committed(directory, ["accounts", "blog_articles", "comments"], (
        "from django.contrib.auth.models import User; "
        "from mysite.articles.models import Article; from mysite.comments.models import Comment; "
        f"ann = User.objects.create_user('ann', password='{BLOG_PASSWORD}'); "
        "article = Article.objects.create(title='Hello adoption', slug='hello', "
        "body='Written before stagetools', author=ann); "
        "Comment.objects.create(article=article, author=ann, text='First comment')"))


# What each adopted project serves: a page with its data from before adoption, its login
# page (and who logs in), its own static file.
ADOPTED_SITES = {
    "library": {"make": make_library_project, "repo": "locallibrary", "tests": "Ran 5 tests",
                "data": ("/", b"Dune (Herbert)"), "login": ("/accounts/login/",
                                                            b"Log in to the library"),
                "password": LIBRARY_PASSWORD, "static": "/static/catalog/library.css"},
    "blog": {"make": make_blog_project, "repo": "stblog", "tests": "Ran 10 tests",
             "data": ("/articles/hello/", b"First comment"),
             "login": ("/sign-in/", b"Sign in to the blog"), "password": BLOG_PASSWORD,
             "static": "/static/articles/blog.css"},
}


def git(directory, *args):
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
               cwd=directory).stdout


def lines_changed(directory):
    """(files, added, removed) of the working tree against the last commit, without the
    two stagetools modules (copied, not written by the user): git's own count."""
    git(directory, "add", "--all")
    numstat = git(directory, "diff", "--cached", "--numstat", "--find-renames", "--",
                  ".", ":!stagetools.py", ":!stagetools_django.py")
    print(f"\ngit diff --numstat of the adoption in {directory}:\n{numstat}")
    rows = [line.split("\t") for line in numstat.splitlines()]
    return len(rows), sum(int(row[0]) for row in rows), sum(int(row[1]) for row in rows)


def runner_counts(output):
    """('Ran 5 tests', 'OK') from the output of Django's test runner."""
    ran = re.search(r"^Ran \d+ tests?", output, re.M)
    outcome = re.search(r"^(OK|FAILED).*$", output, re.M)
    return (ran and ran.group(0), outcome and outcome.group(0))


# What adopt says it did: every line it prints is one of these, a heading of commands, or a
# command (indented) that the tests run as printed.
ADOPT_DONE = ("moved ", "rewrote ", "removed ", "kept ", "replaced ", "wrote ", "declared ",
              "ALLOWED_HOSTS = ")


def printed_commands(output):
    """The commands adopt printed, by heading: {heading: [command, ...]}; every other line
    must say what adopt did."""
    commands, heading = {}, None
    for line in output.splitlines():
        if line.startswith("  "):
            commands[heading].append(line.strip())
        elif line.endswith(":") and line[:1].isupper():
            heading = line
            commands[heading] = []
        else:
            assert not line or line.startswith(ADOPT_DONE), f"neither done nor a command: {line}"
    assert len(commands) in (2, 3) and all(commands.values()), output
    return list(commands.values())[-2:]


def adopted_site(root, site, shared_dir):
    """A project of ADOPTED_SITES, its tests run by Django before, adopted by `stagetools
    adopt` alone; then the commands it printed to make its DEV installation, run as printed
    (HOME is root/home)."""
    project, home = root / ADOPTED_SITES[site]["repo"], root / "home"
    ADOPTED_SITES[site]["make"](project)
    home.mkdir()
    before = run([sys.executable, "manage.py", "test"], cwd=project, check=False)
    adoption = cli("adopt", project, env=clean_env(HOME=str(home)))
    assert adoption.returncode == 0, adoption.stdout + adoption.stderr
    changed = lines_changed(project)
    make, then = printed_commands(adoption.stdout)
    run(["sh", "-e", "-c", "\n".join(make)], env=installation_env(shared_dir, HOME=str(home)),
        cwd="/")
    venv = home / f"{project.name}_dev"
    return {"root": root, "project": project, "venv": venv, "repo": venv / "src" / project.name,
            "before": runner_counts(before.stderr), "output": adoption.stdout, "make": make,
            "then": then, "changed": changed}


@pytest.fixture(scope="session")
def adopted_library(tmp_path_factory, shared_dir):
    return adopted_site(tmp_path_factory.mktemp("adopt"), "library", shared_dir)


@pytest.fixture(scope="session")
def adopted_blog(tmp_path_factory, shared_dir):
    return adopted_site(tmp_path_factory.mktemp("adopt"), "blog", shared_dir)


def log_in(where, path, name, password, cookie_prefix, headers=None):
    """The project's login form, filled in as a browser would: (status, headers)."""
    status, answer, body = http_get(where, path, headers)
    assert status == 200, body[-2000:]
    token = re.search(rf"{cookie_prefix}_csrftoken=([^;]+)", answer["Set-Cookie"]).group(1)
    status, answer, _ = http_get(where, path, method="POST", headers={
        **(headers or {}), "Cookie": f"{cookie_prefix}_csrftoken={token}",
        "Content-Type": "application/x-www-form-urlencoded"}, body=urllib.parse.urlencode(
        {"username": name, "password": password, "csrfmiddlewaretoken": token}))
    return status, answer


@pytest.mark.django
@pytest.mark.parametrize("site", ADOPTED_SITES)
def test_adopt__same_tests_from_anywhere_data_pages_and_static_served(site, request, tmp_path):
    adopted, expected = request.getfixturevalue(f"adopted_{site}"), ADOPTED_SITES[site]
    venv, repo, name = adopted["venv"], adopted["repo"], f"{expected['repo']}_dev"
    assert adopted["before"] == (expected["tests"], "OK")
    # The tests it printed, from the repo, another directory and /: as before adoption.
    test_command = shlex.split(adopted["then"][0])
    for where in (repo, tmp_path, "/"):
        after = run(test_command, cwd=where, check=False)
        assert runner_counts(after.stderr) == adopted["before"], (where, after.stderr)
    # The core app is declared, where the installation reads it: Django's check is clean.
    check = run([venv / "bin" / "python", "-m", "stagetools_django", "check"], cwd="/")
    assert "no issues (0 silenced)" in check.stdout and not check.stderr, check.stderr
    # The repo is where the system says; the data from before, in a database of its own alone.
    system = json.loads(run([venv / "bin" / "python", STAGETOOLS, "show", "--json"],
                            cwd="/").stdout)
    assert (system["core_repo_dir"], system["base_dir"]) == (str(repo), str(venv))
    database = Path(system["database_sqlite_path"])
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert not (repo / "db.sqlite3").exists()
    settings_py = (repo / "stagetools_project" / "settings.py").read_text()
    for gone in ("SECRET_KEY", "DATABASES", "# Database", "# Static files", "Quick-start"):
        assert gone not in settings_py, gone
    # The server it advises is the one it declared.
    serve = shlex.split(adopted["then"][1])
    assert serve[0] == str(venv / "bin" / system["server"]) and system["server"] == "gunicorn"
    port = free_port()
    commands = {"printed": [part.replace("8000", str(port)) for part in serve],
                "uvicorn": [venv / "bin" / "uvicorn", "--port", port,
                            "stagetools_django:asgi_application"]}
    where = ("127.0.0.1", port)
    for server, command in commands.items():
        with serving(command, where, tmp_path / f"{server}.log", cwd="/", env=clean_env()):
            path, text = expected["data"]
            status, _, body = http_get(where, path)
            assert status == 200 and text in body, (server, status, body[-2000:])
            for static in (expected["static"], "/static/admin/css/base.css"):
                status, _, body = http_get(where, static)
                assert status == 200 and body, (server, static, status)
            status, headers = log_in(where, expected["login"][0], "ann", expected["password"],
                                     name)
            assert status == 302 and headers["Location"] == "/", (server, status, headers)


@pytest.mark.django
def test_adopt__output_and_changes_of_the_startproject_layout(adopted_library):
    project, output = adopted_library["project"], adopted_library["output"]
    files, added, removed = adopted_library["changed"]
    print(f"\nadopt changed {files} files, +{added} -{removed} lines (without the two "
          f"copied modules); lines the user changes by hand: 0\n{output}")
    import django
    guide = (HERE / "docs" / "guides" / "adoption.md").read_text()
    if django.VERSION[:2] == (5, 2):  # startproject's files differ between Django versions
        assert f"adopt changes {files} files, +{added} \u2212{removed} lines" in guide
    assert not project.exists()  # moved into the installation, as printed
    repo = adopted_library["repo"]
    assert not (repo / "locallibrary").exists()  # nothing was left in it
    declaration = (repo / "stagetools.ini").read_text()
    assert "server = gunicorn\ndatabase = sqlite\ncore_app = catalog\n" in declaration
    assert declaration.endswith("job clearsessions = manage clearsessions @ daily\n")
    assert "core_app" not in (repo / "aaa_env_setup.py").read_text()
    assert "kept locallibrary/" not in output and "removed locallibrary/ (nothing else" in output


@pytest.mark.django
def test_adopt__apps_inside_the_settings_package_keep_their_modules_and_labels(adopted_blog):
    repo, venv, output = adopted_blog["repo"], adopted_blog["venv"], adopted_blog["output"]
    print(f"\n{output}")
    assert "kept mysite/ (__init__.py, accounts, articles, comments, templates)" in output
    assert sorted(p.name for p in (repo / "stagetools_project").iterdir()
                  if p.name != "__pycache__") == ["__init__.py", "settings.py", "urls.py"]
    assert "from mysite.accounts.views import SignInView" in (
        repo / "stagetools_project" / "urls.py").read_text()
    assert "core_app = mysite.accounts\n" in (repo / "stagetools.ini").read_text()
    # The database made before adoption: every migration applied once, under the old labels.
    shown = run([venv / "bin" / "python", "-m", "stagetools_django", "showmigrations",
                 "accounts", "blog_articles", "comments"], cwd="/").stdout
    assert shown.count("[X]") == 3 and "[ ]" not in shown, shown
    plan = run([venv / "bin" / "python", "-m", "stagetools_django", "migrate", "--plan"],
               cwd="/").stdout
    assert "No planned migration operations" in plan, plan
    # Its requirements, from the file requirements.txt includes, are setup.py's.
    assert 'install_requires=["Django>=4.2", "gunicorn", "uvicorn", "hypercorn"]' in (
        repo / "setup.py").read_text()


@pytest.mark.django
def test_adopt__manage_py_without_its_virtualenv_says_which_python(adopted_blog):
    # -S: no site-packages, so no Django, whatever this Python has installed.
    python = SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else sys.executable
    result = run([python, "-S", adopted_blog["repo"] / "manage.py", "check"], check=False,
                 cwd="/")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot import Django" in result.stderr and "Traceback" not in result.stderr
    assert f"run {adopted_blog['venv'] / 'bin' / 'python'} -m stagetools_django check" in \
        result.stderr, result.stderr


def installed_copy(base_dir, repo, shared_dir, user=None):
    """An installation of an adopted repo as the deploy makes it: a virtualenv at base_dir
    (named like the installation) under umask 077, the repo copied to src/, installed,
    migrated, its static files collected, a user ann; as ``user`` if given. Returns the
    expected system."""
    expected = show_json(base_dir.name, "--expected", "--base-dir", base_dir, "--declaration",
                         repo / "stagetools.ini")
    as_user = ["runuser", "-u", user, "--"] if user else []
    env = installation_env(shared_dir, HOME=str(base_dir))

    def step(*command):
        run([*as_user, "sh", "-c", 'umask 077 && exec "$@"', "sh", *command], env=env, cwd="/")

    step(SYSTEM_PYTHON if user else sys.executable, "-m", "venv", base_dir)
    step("mkdir", "-m", "755", expected["static_dir"])  # nginx's; media/ is the deploy's
    step("mkdir", expected["media_dir"])
    shutil.copytree(repo, expected["core_repo_dir"], symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if user:
        run(["chown", "-R", f"{user}:{user}", base_dir / "src"])
    step(expected["pip_path"], "install", "--quiet", "--editable", expected["core_repo_dir"])
    step(expected["python_path"], "-m", "stagetools_django", "migrate", "--no-input")
    step(expected["python_path"], "-m", "stagetools_django", "collectstatic", "--no-input")
    step(expected["python_path"], "-m", "stagetools_django", "shell", "-c",
         "from django.contrib.auth.models import User; "
         f"User.objects.create_user('ann', password={PRODUCTION_PASSWORD!r})")
    return expected


PRODUCTION_PASSWORD = "a-long-production-password"


@pytest.mark.django
def test_adopt__prod_check_deploy_clean_and_plain_http_403_says_why(adopted_library, shared_dir,
                                                                     tmp_path):
    expected = installed_copy(tmp_path / "locallibrary_prod", adopted_library["repo"],
                              shared_dir)
    python = expected["python_path"]
    deploy = run([python, "-m", "stagetools_django", "check", "--deploy", "--fail-level",
                  "DEBUG"], cwd="/", check=False)
    assert deploy.returncode == 0 and "no issues (2 silenced)" in deploy.stdout, \
        deploy.stdout + deploy.stderr
    port = free_port()
    where = ("127.0.0.1", port)
    command = [expected["bin_dir"] + "/gunicorn", "--bind", f"127.0.0.1:{port}",
               "stagetools_django:wsgi_application"]
    log = tmp_path / "gunicorn.log"
    with serving(command, where, log, cwd="/", env=clean_env()):
        status, headers, body = http_get(where, "/accounts/login/")
        assert status == 200 and b"Log in to the library" in body
        cookie = headers["Set-Cookie"]
        assert "Secure" in cookie
        token = re.search(r"locallibrary_prod_csrftoken=([^;]+)", cookie).group(1)
        form = urllib.parse.urlencode({"username": "ann", "password": PRODUCTION_PASSWORD,
                                       "csrfmiddlewaretoken": token})
        # A browser keeps a Secure cookie from plain HTTP to itself: the form comes without.
        status, _, body = http_get(where, "/accounts/login/", method="POST", body=form,
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 403 and b"plain HTTP" in body and b"HTTPS" in body, body
        time.sleep(0.5)
        assert "plain HTTP" in read_log(log)
        # Behind the TLS proxy (it sets X-Forwarded-Proto) the same login works.
        status, headers, _ = http_get(where, "/accounts/login/", method="POST", body=form,
                                      headers={
            "Content-Type": "application/x-www-form-urlencoded", "X-Forwarded-Proto": "https",
            "Origin": f"https://127.0.0.1:{port}",
            "Cookie": f"locallibrary_prod_csrftoken={token}"})
        assert status == 302 and headers["Location"] == "/", (status, headers)
        # DEBUG is off: nginx serves static files, Django does not.
        assert http_get(where, "/static/admin/css/base.css")[0] == 404


@needs_deploy_tools
@pytest.mark.django
@pytest.mark.parametrize("site", ADOPTED_SITES)
def test_adopt__prod_behind_nginx_as_its_own_user_check_holds(site, request, shared_dir,
                                                               tmp_path):
    adopted, expected_site = request.getfixturevalue(f"adopted_{site}"), ADOPTED_SITES[site]
    name = f"{expected_site['repo']}_prod"
    with contextlib.ExitStack() as stack:
        stack.enter_context(os_user(name))
        expected = installed_copy(Path("/home") / name, adopted["repo"], shared_dir,
                                  user=name)
        install_services(expected, stack)
        deploy = run(["runuser", "-u", name, "--", expected["python_path"], "-m",
                      "stagetools_django", "check", "--deploy", "--fail-level", "DEBUG"],
                     cwd="/", check=False)
        assert deploy.returncode == 0 and "no issues (2 silenced)" in deploy.stdout, \
            deploy.stdout + deploy.stderr
        # The deploy side's check: the repo where core_repo_dir is, the installation
        # resolving what the declaration says (core app, server, database), every file.
        returncode, differences = check(name)
        assert (returncode, differences) == (0, {}), differences
        env = installation_env(shared_dir, HOME=expected["base_dir"])
        socket_activated(expected, env, tmp_path / "server.log", stack)
        sites = tmp_path / "sites"
        sites.mkdir()
        port = free_port()
        (sites / f"{name}.conf").write_text(expected["services"][
            f"/etc/nginx/sites-available/{name}.conf"].replace("listen 80;",
                                                                f"listen 127.0.0.1:{port};"))
        nginx_in_front(sites, port, tmp_path, stack)
        where, host = ("127.0.0.1", port), {"Host": f"{expected['container']}.localhost"}
        status, _, body = http_get(where, "/", host)
        assert status == 200 and b"<!doctype html>" in body, body[-2000:]
        status, headers, _ = http_get(where, expected_site["static"], host)
        assert status == 200 and headers["Server"].startswith("nginx")
        assert "X-Frame-Options" not in headers, "static file came from Django, not nginx"
        status, headers = log_in(where, expected_site["login"][0], "ann", PRODUCTION_PASSWORD,
                                 name, host)
        assert status == 302 and headers["Location"] == "/", (status, headers)


@pytest.mark.django
def test_adopt__stagetools_shadowed_by_a_folder__one_line(adopted_library, tmp_path):
    checkout = tmp_path / "stagetools"  # the parent directory of a stagetools checkout
    checkout.mkdir()
    shutil.copy(HERE / "stagetools.py", checkout / "stagetools.py")
    venv = adopted_library["venv"]
    result = run([venv / "bin" / "python", "-m", "stagetools_django", "check"], cwd=tmp_path,
                 check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and str(checkout) in result.stderr, result.stderr
    assert "rename it, or run from another directory" in result.stderr


@pytest.mark.django
def test_adopt__core_app_not_installed__warned_by_name(adopted_blog):
    declaration = adopted_blog["repo"] / "stagetools.ini"
    original = declaration.read_text()
    declaration.write_text(original.replace("core_app = mysite.accounts", "core_app = articles"))
    try:
        result = run([adopted_blog["venv"] / "bin" / "python", "-m", "stagetools_django",
                      "check"], cwd="/", check=False)
    finally:
        declaration.write_text(original)
    assert "stagetools.W004" in result.stderr, result.stderr
    assert "the core app 'articles' of 'stblog_dev' is not in INSTALLED_APPS (no package " \
        "'articles' is importable)" in result.stderr
    assert "core_app = yourapp" in result.stderr and "stagetools.ini" in result.stderr


def file_tree(directory):
    """Every entry below ``directory``: a file's bytes, a link's target, None for a folder."""
    return {str(path.relative_to(directory)): os.readlink(path) if path.is_symlink() else
            path.read_bytes() if path.is_file() else None for path in directory.rglob("*")}


def refused_unchanged(directory, *options, message, home=None):
    """adopt refuses ``directory``, with exit 2, one line naming ``message``, and changes
    nothing (in the tree, or in HOME)."""
    before = file_tree(directory)
    result = cli("adopt", directory, *options, env=clean_env(HOME=str(home or directory)))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not result.stdout and file_tree(directory) == before
    return result.stderr


def startproject_with_app(directory, package="mysite", app="orders"):
    """startproject and startapp, the app in INSTALLED_APPS: the smallest project adopt takes."""
    directory.mkdir()
    run([sys.executable, "-m", "django", "startproject", package, directory])
    run([sys.executable, "manage.py", "startapp", app], cwd=directory)
    edit(directory / package / "settings.py", ("'django.contrib.staticfiles',\n",
                                                f"'django.contrib.staticfiles',\n    '{app}',\n"))
    return directory


@pytest.mark.django
def test_adopt__refuses_what_it_does_not_expect_and_changes_nothing(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    refused_unchanged(bare, message="it has no manage.py")
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "manage.py").write_text("import os\nos.environ['X'] = 'y'\n")
    refused_unchanged(custom, message="does not set DJANGO_SETTINGS_MODULE")
    blocked = startproject_with_app(tmp_path / "blocked")
    (blocked / "aaa_env_setup.py").write_text("# mine\n")
    refused_unchanged(blocked, message="it has aaa_env_setup.py already")
    unnamed = startproject_with_app(tmp_path / "my-site")
    refused_unchanged(unnamed, message="give --core-repo NAME")
    no_app = tmp_path / "noapp"
    no_app.mkdir()
    run([sys.executable, "-m", "django", "startproject", "noapp", no_app])
    refused_unchanged(no_app, message="INSTALLED_APPS names no app of the project")
    star = startproject_with_app(tmp_path / "star")
    with open(star / "mysite" / "settings.py", "a") as settings_py:
        settings_py.write("from .local import *\n")
    refused_unchanged(star, message="settings.py imports other settings (line")
    # Split settings, as many projects have them: a settings package, manage.py naming one.
    split = startproject_with_app(tmp_path / "split")
    (split / "mysite" / "settings").mkdir()
    (split / "mysite" / "settings.py").rename(split / "mysite" / "settings" / "base.py")
    (split / "mysite" / "settings" / "__init__.py").write_text("")
    (split / "mysite" / "settings" / "production.py").write_text(
        "from .base import *  # noqa\n\nDEBUG = False\nALLOWED_HOSTS = ['example.com']\n")
    edit(split / "manage.py", ("'mysite.settings'", "'mysite.settings.production'"))
    message = refused_unchanged(split, message="its settings are split "
                                "(mysite.settings.production: mysite/settings/__init__.py, "
                                "base.py, production.py)")
    assert "make them one module, mysite/settings.py" in message
    # Code that adopt cannot carry over.
    wsgi = startproject_with_app(tmp_path / "wsgi")
    with open(wsgi / "mysite" / "wsgi.py", "a") as wsgi_py:
        wsgi_py.write("from whitenoise import WhiteNoise\napplication = WhiteNoise(application)\n")
    refused_unchanged(wsgi, message="mysite/wsgi.py does more than startproject's (line")
    packaged = startproject_with_app(tmp_path / "packaged")
    (packaged / "pyproject.toml").write_text("[project]\nname = 'packaged'\n")
    refused_unchanged(packaged, message="it has its own packaging (pyproject.toml)")
    pg_dev = startproject_with_app(tmp_path / "pg")
    refused_unchanged(pg_dev, message="its DEV installation would be pg_dev: PostgreSQL "
                      "reserves role names that start with 'pg_'; give --core-repo NAME")
    postgres = startproject_with_app(tmp_path / "pgshop")
    edit(postgres / "mysite" / "settings.py", ("django.db.backends.sqlite3",
                                               "django.db.backends.postgresql"))
    refused_unchanged(postgres, message="choose: --database postgresql")
    # A core app given must be one of the project's apps, as INSTALLED_APPS names it.
    chosen = startproject_with_app(tmp_path / "chosen")
    refused_unchanged(chosen, "--core-app", "order", message="--core-app order is none of the "
                      "project's apps in INSTALLED_APPS (orders)")
    # Adopted once, adopted: a second run refuses and says where the core app is.
    result = cli("adopt", chosen, "--core-app", "orders", env=clean_env(HOME=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    refused_unchanged(chosen, "--core-app", "orders", message="stagetools_project/ already: "
                      "it is adopted; nothing to adopt; its core app is core_app in "
                      "stagetools.ini")


@pytest.mark.django
def test_adopt__a_django_below_4_2_is_refused_with_the_fix(tmp_path):
    project = startproject_with_app(tmp_path / "oldshop")
    (project / "requirements.txt").write_text("requests\ndjango==4.0.1\n")
    message = refused_unchanged(project, message="requirements.txt line 2 requires "
                                "django==4.0.1, but stagetools_django needs Django>=4.2")
    assert "upgrade the project to Django 4.2 LTS or newer (Django~=4.2, say)" in message


@pytest.mark.parametrize("requirement, allowed", [
    ("Django", True), ("Django>=4.2", True), ("django==4.0.1", False), ("Django<4", False),
    ("Django>=3.2,<4.1", False), ("Django>=3.2,<5", True), ("Django~=4.2.0", True),
    ("Django~=4.0", True), ("Django~=4.0.0", False), ("Django==4.2.*", True),
    ("Django==4.1.*", False), ("Django!=4.2.*,>=4.2", True), ("Django>4.2", True),
    ("Django<=4.2", True), ("Django<4.2", False), ("Django[argon2]==5.2.1", True),
    ("django==3.2.25 ; python_version < '3.10'", False)])
def test_adopt__django_requirements_below_the_floor(requirement, allowed):
    import stagetools_django
    assert stagetools_django._adopt_allows(requirement, "Django>=4.2") is allowed


@pytest.mark.django
def test_adopt__links_are_refused_unopened(tmp_path):
    """Issue 20: adopt opens no file it has not looked at."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "requirements.txt").write_text("secret-package==1\n")
    (outside / "base.txt").write_text("secret-package==1\n")
    linked = startproject_with_app(tmp_path / "linked")
    (linked / "requirements.txt").symlink_to(outside / "requirements.txt")
    refused_unchanged(linked, message="requirements.txt is, or lies below, a symbolic link")
    included = startproject_with_app(tmp_path / "included")
    (included / "requirements.txt").write_text("-r reqs/base.txt\n")
    (included / "reqs").symlink_to(outside)
    refused_unchanged(included, message="reqs/base.txt is, or lies below, a symbolic link")
    absolute = startproject_with_app(tmp_path / "absolute")
    (absolute / "requirements.txt").write_text(f"-r {outside / 'base.txt'}\n")
    refused_unchanged(absolute, message=f"requirements.txt:1 includes {outside / 'base.txt'}, "
                      "outside the repo")
    package = startproject_with_app(tmp_path / "package")
    (package / "mysite").rename(outside / "mysite")
    (package / "mysite").symlink_to(outside / "mysite")
    refused_unchanged(package, message="its settings package mysite/ is a symbolic link")
    settings = startproject_with_app(tmp_path / "settings")
    (settings / "mysite" / "settings.py").rename(outside / "settings.py")
    (settings / "mysite" / "settings.py").symlink_to(outside / "settings.py")
    refused_unchanged(settings, message="mysite/settings.py is not a file")


@pytest.mark.django
def test_adopt__own_requirements_hosts_and_old_names_carried_over(tmp_path):
    project = startproject_with_app(tmp_path / "shop", package="shop")
    (project / "requirements.txt").write_text(
        "requests>=2\n# pinned\n-r more.txt\nDjango==5.2 \\\n    --hash=sha256:0123\n"
        "-c constraints.txt\n")
    (project / "more.txt").write_text("whitenoise  # static files\n")
    edit(project / "shop" / "settings.py",
         ("ALLOWED_HOSTS = []", "ALLOWED_HOSTS = ['shop.example.com']"))
    (project / "jobs.py").write_text("from shop import urls\nHOST = 'shop.example.com'\n"
                                     "SETTINGS = 'shop.settings'\n")
    (project / "pytest.ini").write_text("[pytest]\nDJANGO_SETTINGS_MODULE = shop.settings\n")
    manage_mode = (project / "manage.py").stat().st_mode
    result = cli("adopt", project, "--database", "postgresql",
                 env=clean_env(HOME=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    printed_commands(result.stdout)
    assert "\n  runuser -u postgres -- createdb --owner shop_dev shop_dev\n" in result.stdout
    assert (project / "manage.py").stat().st_mode == manage_mode  # still executable
    setup_py = (project / "setup.py").read_text()
    assert ('install_requires=["requests>=2", "whitenoise", "Django==5.2", "gunicorn", '
            '"uvicorn", "hypercorn", "psycopg[binary]"]') in setup_py
    settings = (project / "stagetools_project" / "settings.py").read_text()
    assert "ALLOWED_HOSTS += ['shop.example.com']" in settings
    assert "globals().update(settings_defaults())" in settings
    assert "database = postgresql\ncore_app = orders\n" in (project / "stagetools.ini").read_text()
    # The settings module and the root URLs are named by their new module; a domain that
    # starts like the old package is not touched.
    assert (project / "jobs.py").read_text() == (
        "from stagetools_project import urls\nHOST = 'shop.example.com'\n"
        "SETTINGS = 'stagetools_project.settings'\n")
    assert (project / "pytest.ini").read_text().endswith(
        "DJANGO_SETTINGS_MODULE = stagetools_project.settings\n")
    assert "rewrote jobs.py, pytest.ini:" in result.stdout
    assert not (project / "shop").exists()


def guide_adoption_blocks():
    """The Python, TOML and INI code blocks of the adoption guide, dedented, in order."""
    import textwrap
    guide = (HERE / "docs" / "guides" / "adoption.md").read_text()
    section = guide.split("## By hand")[1]
    return [textwrap.dedent(block) for block in
            re.findall(r"^( *)```(?:python|toml|ini)\n(.*?)^\1```", section, re.M | re.S)
            for block in [block[1]]]


@pytest.mark.django
@pytest.mark.parametrize("packaging", ["setup.py", "pyproject.toml"])
def test_adopt__by_hand_following_the_guide(packaging, tmp_path, shared_dir):
    project = tmp_path / "locallibrary"
    make_library_project(project)
    before = runner_counts(run([sys.executable, "manage.py", "test"], cwd=project).stderr)
    # Steps 1 and 2: rename the package, delete its entry points, copy the modules.
    (project / "locallibrary").rename(project / "stagetools_project")
    for name in ("wsgi.py", "asgi.py"):
        (project / "stagetools_project" / name).unlink()
    for module in ("stagetools.py", "stagetools_django.py"):
        shutil.copy(HERE / module, project / module)
    # Steps 3 to 7: each file as the guide's block that names it in its first line; of
    # the two packaging files, the one this run tries.
    written = []
    for block in guide_adoption_blocks():
        first = block.splitlines()[0]
        path = "manage.py" if first.startswith("#!") else first[2:] if re.fullmatch(
            r"# [\w/]+\.(py|toml|ini)", first) else None
        if path and path not in {"setup.py", "pyproject.toml"} - {packaging}:
            (project / path).write_text(block)
            written.append(path)
    assert sorted(written) == sorted(["aaa_env_setup.py", "aaa_script_setup.py", "manage.py",
                                      packaging, "stagetools.ini",
                                      "stagetools_project/settings.py"])
    files, added, removed = lines_changed(project)
    print(f"\nby hand: {files} files, +{added} -{removed} lines (without the two modules)")
    guide = (HERE / "docs" / "guides" / "adoption.md").read_text()
    import django
    # The guide's count is of the setup.py way with Django 5.2: startproject's files differ
    # between Django versions.
    if django.VERSION[:2] == (5, 2) and packaging == "setup.py":
        assert (f"the user adds or changes {added} lines and removes {removed} in {files} "
                "files") in guide
    # Step 8: the repo in src/ of a virtualenv named like an installation; from outside the
    # repo, the same tests with the same result.
    expected = installed_copy(tmp_path / "locallibrary_int", project, shared_dir)
    python = expected["python_path"]
    after = run([python, "-m", "stagetools_django", "test"], cwd="/", check=False)
    assert runner_counts(after.stderr) == before == ("Ran 5 tests", "OK"), after.stderr
    check = run([python, "-m", "stagetools_django", "check"], cwd="/")
    assert "no issues" in check.stdout and not check.stderr, check.stdout + check.stderr


@pytest.mark.django
def test_adopt__nginx_caches_hashed_static_names(tmp_path):
    nginx = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if not nginx:
        skip("needs nginx (CI installs nginx-light)")
    system = stagetools.get_expected_system_from_name("shop_prod", base_dir=tmp_path / "shop_prod")
    system.static_dir.mkdir(parents=True)
    (system.static_dir / "app.0123456789ab.css").write_text("hashed")
    (system.static_dir / "app.css").write_text("plain")
    port = free_port()
    site = system.services[f"/etc/nginx/sites-available/{system.name}.conf"]
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    temporary = tmp_path / "nginx"
    temporary.mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {temporary}/pid;\n"
        f"error_log {temporary}/error.log;\nevents {{}}\nhttp {{\naccess_log off;\n"
        + "".join(f"{kind}_temp_path {temporary}/{kind};\n"
                  for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + site + "}\n")
    with serving([nginx, "-p", temporary, "-c", conf], ("127.0.0.1", port),
                 tmp_path / "nginx.log"):
        host = {"Host": f"{system.container}.localhost"}
        status, headers, body = http_get(("127.0.0.1", port), "/static/app.0123456789ab.css",
                                         host)
        assert (status, body) == (200, b"hashed")
        assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
        status, headers, body = http_get(("127.0.0.1", port), "/static/app.css", host)
        assert (status, body) == (200, b"plain") and "Cache-Control" not in headers


@pytest.mark.django
def test_prod__debug_on_and_stagetools_name_deleted__still_refused(prod_installation):
    with settings_with(prod_installation, "DEBUG = True\ndel STAGETOOLS_NAME"):
        result = manage(prod_installation, "check")
    assert result.returncode == 1 and "stagetools.E001" in result.stderr, result.stderr



# ---------------------------------------------------------------- capacity (issue 15)
#
# Workers and threads by stage and the host's cores, or declared; DEV and INT stop when idle
# through systemd-socket-proxyd. On a real host: deploy/test_capacity.py and bench/host.py.

def expected_with(name, declaration, tmp_path, server=None):
    path = tmp_path / f"{name}.ini"
    path.write_text(declaration)
    return stagetools.get_expected_system_from_name(
        name, declared=stagetools.read_declaration(None, name, str(path)), server=server)


@pytest.mark.parametrize("cores, prod_workers", [(1, 3), (2, 5), (4, 9), (5, 11), (64, 12)])
def test_capacity__workers_follow_the_stage_and_the_cores(monkeypatch, cores, prod_workers):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    for name, workers, threads, idle_stop in [("shop_prod", prod_workers, 4, 0),
                                              ("shop_qual", prod_workers, 4, 0),
                                              ("shop_int", 1, 4, 900), ("shop_dev", 1, 4, 900)]:
        system = stagetools.get_expected_system_from_name(name, declared={})
        assert (system.workers, system.threads, system.idle_stop) == (workers, threads, idle_stop)
        service = system.services[f"/etc/systemd/system/{name}.service"]
        assert (f"ExecStart=/home/{name}/bin/gunicorn --workers {workers} --threads {threads} "
                "stagetools_django:wsgi_application\n") in service
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one core
    assert stagetools.get_expected_system_from_name("shop_prod", declared={}).workers == 3


def test_capacity__every_server_on_the_socket_with_its_workers(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    commands = {server: stagetools._server_command(stagetools.get_expected_system_from_name(
        "shop_prod", declared={}, server=server))[1:] for server in stagetools.SERVERS}
    assert commands == {
        "gunicorn": ["--workers", "5", "--threads", "4", "stagetools_django:wsgi_application"],
        "uvicorn": ["--fd", "3", "--workers", "5", "stagetools_django:asgi_application"],
        "hypercorn": ["--bind", "fd://3", "--workers", "5",
                      "stagetools_django:asgi_application"]}
    for server in stagetools.SERVERS:  # no port anywhere: systemd holds the socket
        system = stagetools.get_expected_system_from_name("shop_prod", declared={},
                                                          server=server)
        assert "--port" not in system.services["/etc/systemd/system/shop_prod.service"]
        assert system.threads == (4 if server == "gunicorn" else 1)


def test_capacity__declared_numbers_win_where_declared(tmp_path):
    declaration = ("[stagetools]\nworkers = 3\n[prod]\nworkers = 7\nthreads = 1\n"
                   "[dev]\nidle_stop = 60\n[shop_dsven]\nidle_stop = never\n")
    prod, dev, dsven, qual = (expected_with(name, declaration, tmp_path)
                              for name in ("shop_prod", "shop_dev", "shop_dsven", "shop_qual"))
    assert (prod.workers, prod.threads, prod.idle_stop) == (7, 1, 0)
    assert "gunicorn --workers 7 --threads 1 " in prod.services[
        "/etc/systemd/system/shop_prod.service"]
    assert (dev.workers, dev.threads, dev.idle_stop) == (3, 4, 60)
    assert (dsven.idle_stop, qual.workers) == (0, 3)
    assert "--exit-idle-time=60s " in dev.services["/etc/systemd/system/shop_dev-proxy.service"]
    assert not any("-proxy" in path for path in dsven.services)  # never: no proxy
    # as in the JSON a deploy tool reads, and the numbers differ where check compares them
    assert show_json("shop_dev", "--expected", "--declaration",
                     tmp_path / "shop_dev.ini")["idle_stop"] == 60
    assert ("workers", 7, 3) in prod.differences(qual)


def test_capacity__idle_stop_units_of_dev_and_int_only(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for name in ("shop_prod", "shop_qual"):
        services = stagetools.get_expected_system_from_name(name, declared={}).services
        units = sorted(path for path in services if path.startswith("/etc/systemd")
                       and "-backup." not in path)  # QUAL's and PROD's backup
        assert units == [f"/etc/systemd/system/{name}.service",
                         f"/etc/systemd/system/{name}.socket"]
        assert "StopWhenUnneeded" not in services[units[0]] and "Service=" not in services[units[1]]
    dev = stagetools.get_expected_system_from_name("shop_dev", declared={})
    unit = "/etc/systemd/system/shop_dev"
    services = dev.services
    # nginx's socket is where it always was, and starts the idle proxy
    assert f"ListenStream={dev.socket_path}\n" in services[f"{unit}.socket"]
    assert "Service=shop_dev-proxy.service\nSocketGroup" not in services[f"{unit}.socket"]
    assert "\nService=shop_dev-proxy.service\n" in services[f"{unit}.socket"]
    proxy = services[f"{unit}-proxy.service"]
    assert ("ExecStart=/usr/lib/systemd/systemd-socket-proxyd --exit-idle-time=900s "
            "/run/shop_dev/app.sock\n") in proxy
    assert "Requires=shop_dev.service shop_dev.socket\n" in proxy
    assert "User=shop_dev\n" in proxy and "PrivateNetwork=yes\n" in proxy
    assert "RestrictAddressFamilies=AF_UNIX\n" in proxy and "BindPaths" not in proxy
    app_socket = services[f"{unit}-app.socket"]
    assert "ListenStream=/run/shop_dev/app.sock\nSocketUser=shop_dev\n" in app_socket
    assert "SocketMode=0600\nService=shop_dev.service\n" in app_socket
    app = services[f"{unit}.service"]
    assert "Requires=shop_dev-app.socket\n" in app and "StopWhenUnneeded=yes\n" in app
    assert stagetools._fill(stagetools._HARDENING, base_dir=dev.base_dir) in app
    # the user units (a developer's own systemd) stay as they were: no proxy there
    user_service = services["/home/shop_dev/.config/systemd/user/shop_dev.service"]
    assert "Requires=shop_dev.socket\n" in user_service and "StopWhenUnneeded" not in user_service


@needs_deploy_tools
def test_capacity__idle_units_verify_and_their_exposure(tmp_path):
    system = stagetools.get_expected_system_from_name("shop_dev", declared={})
    for path, text in system.services.items():
        if path.startswith("/etc/systemd/system/"):
            (tmp_path / Path(path).name).write_text(text)
    result = run(["systemd-analyze", "verify", *sorted(tmp_path.iterdir())], check=False)
    # the only complaint: the venv's server is not on this machine
    problems = [line for line in result.stderr.splitlines()
                if "/home/shop_dev/bin/gunicorn is not executable" not in line]
    assert problems == [], result.stderr
    result = run(["systemd-analyze", "security", "--offline=true", "--threshold=20",
                  tmp_path / "shop_dev-proxy.service"], check=False)
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert result.returncode == 0 and float(exposure.group(1)) <= 1.0, result.stdout


def test_capacity__the_actual_system_resolves_the_same_numbers(tmp_path, monkeypatch):
    """The installation's own process reads the same declaration and the same host: the
    probe of check answers what the expected system says."""
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    monkeypatch.setenv("STAGETOOLS_NAME", "shop_qual")
    repo = tmp_path / "shop_qual" / "src" / "shop"
    repo.mkdir(parents=True)
    (repo / "stagetools.ini").write_text("[qual]\nthreads = 2\n")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "shop_qual"))
    actual = stagetools.get_actual_system_from_name()
    expected = stagetools.get_expected_system_from_name("shop_qual",
                                                        base_dir=str(tmp_path / "shop_qual"))
    assert (actual.workers, actual.threads) == (expected.workers, expected.threads) == (7, 2)
    assert actual.differences(expected, ignore=("name_source", "user", "group")) == []


# ---------------------------------------------------------------- jobs, workers and backups

JOBS = """\
[stagetools]
job clearsessions = manage clearsessions @ daily
job report = module shop.report --since=1d @ Mon..Fri 06:30
worker tasks = script rq worker --url=unix:///run/shop/redis.sock default
[prod]
job report = off
backup = keep 30d @ *-*-* 03:00
[shop_dev]
backup = keep 2 @ hourly
"""


def declared_jobs(name, text, framework="django"):
    """The expected system of ``name`` with ``text`` as its repo's declaration."""
    return stagetools.get_expected_system_from_name(
        name, framework=framework, declared=stagetools.parse_declaration(text, name))


def test_jobs__declared_once_the_narrowest_section_wins_backups_by_stage():
    prod, qual, dev = (declared_jobs(name, JOBS) for name in ("shop_prod", "shop_qual",
                                                              "shop_dev"))
    assert list(prod.jobs) == ["clearsessions"]
    assert list(qual.jobs) == ["clearsessions", "report"]
    assert qual.jobs["report"] == {
        "command": "module shop.report --since=1d", "calendar": "Mon..Fri 06:30",
        "service": "shop_qual-job-report.service", "timer": "shop_qual-job-report.timer"}
    assert prod.background_workers == {"tasks": {
        "command": "script rq worker --url=unix:///run/shop/redis.sock default",
        "service": "shop_prod-worker-tasks.service"}}
    assert (prod.backup["keep_days"], prod.backup["keep_count"]) == (30, None)
    assert (qual.backup["calendar"], qual.backup["keep_count"]) == ("daily", 7)  # by default
    assert (dev.backup["calendar"], dev.backup["keep_count"]) == ("hourly", 2)  # declared
    assert declared_jobs("shop_int", JOBS).backup is None  # DEV and INT: none by default
    assert declared_jobs("shop_prod", "[prod]\nbackup = off\n").backup is None


def test_jobs__show_expected_json_lists_them_and_their_units(tmp_path):
    declaration = tmp_path / "stagetools.ini"
    declaration.write_text(JOBS)
    shown = show_json("shop_qual", "--expected", "--declaration", declaration)
    assert set(shown["jobs"]) == {"clearsessions", "report"}
    units = [path for path in shown["services"] if path.startswith("/etc/systemd/system/")]
    assert sorted(units) == [f"/etc/systemd/system/shop_qual{unit}" for unit in (
        "-backup.service", "-backup.timer", "-job-clearsessions.service",
        "-job-clearsessions.timer", "-job-report.service", "-job-report.timer",
        "-worker-tasks.service", ".service", ".socket")]
    table = cli("show", "shop_qual", "--expected", "--declaration", declaration).stdout
    assert re.search(r"^jobs\s+clearsessions: manage clearsessions @ daily; report: module "
                     r"shop.report --since=1d @ Mon..Fri 06:30$", table, re.M), table
    assert re.search(r"^background_workers\s+tasks: script rq worker", table, re.M), table
    assert re.search(r"^backup\s+keep 7 @ daily$", table, re.M), table


def test_jobs__units_run_the_command_after_aaa_script_setup_as_the_user_sandboxed():
    system = declared_jobs("shop_qual", JOBS)
    services, unit = system.services, "/etc/systemd/system/shop_qual"
    web_hardening = stagetools._fill(stagetools._HARDENING, base_dir=system.base_dir)
    for path in (f"{unit}-job-report.service", f"{unit}-worker-tasks.service",
                 f"{unit}-backup.service"):
        assert "User=shop_qual\nGroup=shop_qual\n" in services[path]
        assert web_hardening in services[path], path  # the web process's sandbox
    assert shlex.split(services[f"{unit}-job-report.service"].split("ExecStart=")[1]
                       .splitlines()[0]) == [
        "/home/shop_qual/bin/python", "-c", 'import aaa_script_setup, runpy, sys; '
        'runpy.run_module("shop.report", run_name="__main__", alter_sys=True)', "--since=1d"]
    assert shlex.split(services[f"{unit}-job-clearsessions.service"].split("ExecStart=")[1]
                       .splitlines()[0])[2:] == [
        'import aaa_script_setup, runpy, sys; sys.exit(__import__("stagetools_django").manage('
        '["manage"] + sys.argv[1:]))', "clearsessions"]
    assert 'runpy.run_path("/home/shop_qual/bin/rq", run_name="__main__")' in \
        services[f"{unit}-worker-tasks.service"]
    assert "Type=oneshot\n" in services[f"{unit}-job-report.service"]
    assert "Restart=on-failure\n" in services[f"{unit}-worker-tasks.service"]
    assert "ExecStart=/usr/bin/python3 -I /usr/local/lib/stagetools/stagetools.py backup " \
        "shop_qual\n" in services[f"{unit}-backup.service"]
    timer = services[f"{unit}-job-report.timer"]
    assert "OnCalendar=Mon..Fri 06:30\nPersistent=true\nRandomizedDelaySec=30s\n" in timer
    assert "Unit=shop_qual-job-report.service\n" in timer and "WantedBy=timers.target" in timer


HOSTILE_JOBS = {
    # names
    "job ../../etc = module shop.x @ daily": "job name '../../etc': a job name has a-z",
    "job Report = module shop.x @ daily": "job name 'Report'",
    "job a b = module shop.x @ daily": "job name 'a b'",
    "job = module shop.x @ daily": "job name ''",
    "job backup = module shop.x @ daily": "job name 'backup'",
    "worker x;id = module shop.x": "worker name 'x;id'",
    f"job {'x' * 33} = module shop.x @ daily": "has at most 32 characters",
    # commands
    "job x = module shop.x; id @ daily": "invalid module 'shop.x;'",
    "job x = module shop.x --to=$HOME @ daily": "argument '--to=$HOME': it has the characters '$'",
    "job x = module shop.x `id` @ daily": "argument '`id`': it has the characters '`'",
    "job x = module shop.x %h @ daily": "argument '%h': it has the characters '%'",
    "job x = module shop.x a|b @ daily": "argument 'a|b': it has the characters '|'",
    "job x = module shop.x && rm @ daily": "argument '&&': it has the characters '&'",
    "job x = module shop.x >/etc/passwd @ daily": "it has the characters '>'",
    "job x = module shop.x 'quoted' @ daily": "it has the characters",
    "job x = module os.system('id') @ daily": "invalid module \"os.system('id')\"",
    "job x = script ../../../bin/sh @ daily": "script '../../../bin/sh': a script is a name",
    "job x = script /bin/sh @ daily": "script '/bin/sh'",
    "job x = python -m shop.x @ daily": "it is not module, script or manage, then what to run",
    "job x = module @ daily": "it is not module, script or manage, then what to run",
    "worker x = sh -c id": "command 'sh -c id': it is not module, script or manage",
    # calendars
    "job x = module shop.x @ 0 3 * * *": "calendar '0 3 * * *': it is not [weekdays] [date]",
    "job x = module shop.x @ daily; id": "calendar 'daily; id': it has the characters ';'",
    "job x = module shop.x @ *-*-* 25:00": "the hour '25' is not * or values from 0 to 23",
    "job x = module shop.x @ *-*-* 03:00 Europe/Berlin":
        "it is not [weekdays] [date] [time] [UTC], nor a shorthand such as daily",
    "job x = module shop.x @ $(date)": "it has the characters",
    "job x = module shop.x": "a job is 'COMMAND @ CALENDAR'",
    # backups
    "backup = keep 0 @ daily": "a backup is 'keep COUNT @ CALENDAR'",
    "backup = keep lots @ daily": "a backup is 'keep COUNT @ CALENDAR'",
    "backup = keep 7": "a backup is 'keep COUNT @ CALENDAR'",
    "backup = keep 7 @ whenever": "calendar 'whenever'",
    "backup nightly = keep 7 @ daily": "backup nightly: a backup has no name",
}


@pytest.mark.parametrize("line", HOSTILE_JOBS)
def test_jobs__hostile_names_commands_and_calendars_refused_in_one_line(line, tmp_path):
    """Refused before anything is rendered: show prints no JSON, one line names the line
    and the rule, exit 2."""
    declaration = tmp_path / "stagetools.ini"
    declaration.write_text(f"[stagetools]\nframework = django\n{line}\n")
    result = cli("show", "shop_prod", "--expected", "--declaration", declaration, "--json")
    assert result.returncode == 2 and result.stdout == "", result.stdout[:300]
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"stagetools: error: the declaration '{declaration}': line "
                                    "3: "), result.stderr
    assert HOSTILE_JOBS[line] in result.stderr, result.stderr


def test_jobs__manage_is_for_django_and_off_needs_a_valid_name():
    with pytest.raises(stagetools.StagetoolsError, match="manage runs Django's commands; the "
                                                         "framework is flask"):
        declared_jobs("shop_prod", "[stagetools]\njob x = manage clearsessions @ daily\n",
                      framework="flask").jobs
    with pytest.raises(stagetools.StagetoolsError, match="job name 'A'"):
        declared_jobs("shop_prod", "[stagetools]\njob A = off\n").jobs


# The calendars of the refusal table and some more, as systemd-analyze judges them.
CALENDARS = ["daily", "Daily", "hourly", "minutely", "weekly", "quarterly", "semiannually",
             "annually", "Mon *-*-* 03:00", "Mon..Fri 06:30", "Mon,Fri 06:30", "*-*-01 03:00",
             "*:0/15", "*/15", "*:*/15", "*:0..30/10", "*-02~03", "*-02~03 04:00",
             "2026-12-01 03:00:00", "03:00", "3:0", "*:*:0/20", "*-*-* *:*:00",
             "*-*-* 25:00", "Mon", "Monday 03:00", "mon 03:00", "*-*-* 03:00 UTC",
             "12-24 03:00", "*-*-* 03:00:05.5", "*-1,15 0:0", "00/2:00", "now",
             "2020..2030-*-* 00:00", "*-*-* 3:60", "Mon~Fri", "1970-01-01", "2199-12-31",
             "2200-01-01", "0 3 * * *", "*:0,30", "Sat,Sun *-*-* 10:00", "Mon..Wed,Fri 05:00",
             "*-*-1..7 Mon 03:00", "Mon *-*-1..7 03:00", "*-*-0 00:00", "*-13-01",
             "Mon..Fri..Sun", "*-*-* 00:00:00:00", "*-*-*-* 00:00", "-01-01", "*-*-* :00",
             "1..5:00", "03:00 Mon", "*-*-* 0/0:00", "*~02", "02~03", "*-*~03",
             "Fri..Mon", "Sun..Sat", "Mon..Sun", "10..5:00", "*-12..1-*", "*-*~31", "*-*~28",
             "UTC"]
# What systemd takes and stagetools does not: zones other than UTC, and times since 1970.
SYSTEMD_ONLY = ["*-*-* 03:00 Europe/Berlin", "@1234"]


@pytest.mark.skipif(not (IN_CI or shutil.which("systemd-analyze")),
                    reason="needs systemd-analyze (CI installs systemd)")
def test_jobs__every_calendar_taken_is_systemds_and_no_other_but_two_kinds():
    """The calendars stagetools takes are those systemd takes, but for two kinds it refuses
    on purpose (a zone other than UTC, @seconds)."""
    for calendar in CALENDARS + SYSTEMD_ONLY:
        ours = stagetools._calendar_problem(calendar) is None
        systemd = run(["systemd-analyze", "calendar", calendar], check=False,
                      env=clean_env(TZ="UTC")).returncode == 0
        assert ours == (systemd and calendar not in SYSTEMD_ONLY), calendar
    assert stagetools._calendar_period("daily") == 86400
    assert stagetools._calendar_period("Mon,Fri 06:00") == 4 * 86400
    assert stagetools._calendar_period("2026-01-01 00:00") == float("inf")  # past: never


@needs_deploy_tools
def test_jobs__units_verify_and_are_no_more_exposed_than_the_web_unit(tmp_path):
    """systemd-analyze verify takes every unit; security rates each no worse than the web
    process's."""
    base_dir = tmp_path / "shop_qual"
    (base_dir / "bin").mkdir(parents=True)
    for program in ("python", "gunicorn"):
        (base_dir / "bin" / program).symlink_to(SYSTEM_PYTHON)
    system = stagetools.get_expected_system_from_name(
        "shop_qual", base_dir=str(base_dir), declared=stagetools.parse_declaration(
            JOBS, "shop_qual"))
    units = tmp_path / "units"
    units.mkdir()
    for path, text in system.services.items():
        if path.startswith("/etc/systemd/system/"):
            (units / Path(path).name).write_text(text)
    result = run(["systemd-analyze", "verify", *sorted(units.iterdir())], check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    exposure = {}
    for unit in ("shop_qual.service", "shop_qual-job-report.service",
                 "shop_qual-worker-tasks.service", "shop_qual-backup.service"):
        result = run(["systemd-analyze", "security", "--offline=true", "--threshold=20",
                      units / unit], check=False)
        exposure[unit] = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)",
                                         result.stdout).group(1))
    assert max(exposure.values()) <= exposure["shop_qual.service"], exposure


def backed_up_system(tmp_path, declaration="[stagetools]\nbackup = keep 3 @ daily\n"):
    """A SQLite installation in ``tmp_path`` with a database of notes and files in media/."""
    import sqlite3
    base_dir = tmp_path / "shop_qual"
    (base_dir / "media" / "photos").mkdir(parents=True)
    system = stagetools.get_expected_system_from_name(
        "shop_qual", base_dir=str(base_dir),
        declared=stagetools.parse_declaration(declaration, "shop_qual"))
    with contextlib.closing(sqlite3.connect(system.database_sqlite_path)) as database:
        database.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        database.executemany("INSERT INTO notes (text) VALUES (?)",
                             [(f"note {i}",) for i in range(100)])
        database.commit()
    (system.media_dir / "photos" / "a.jpg").write_bytes(os.urandom(3000))
    (system.media_dir / "b.txt").write_text("b")
    return system


def sqlite_state(system):
    """(rows, a hash of their content, a hash of media/'s files)."""
    import hashlib
    import sqlite3
    with contextlib.closing(sqlite3.connect(system.database_sqlite_path)) as database:
        rows = database.execute("SELECT id, text FROM notes ORDER BY id").fetchall()
    media = sorted((str(path.relative_to(system.media_dir)), path.read_bytes())
                   for path in system.media_dir.rglob("*") if path.is_file())
    return (len(rows), hashlib.sha256(repr(rows).encode()).hexdigest(),
            hashlib.sha256(repr(media).encode()).hexdigest())


def test_backup__sqlite_and_media_round_trip_private(tmp_path):
    import sqlite3
    system = backed_up_system(tmp_path)
    before = sqlite_state(system)
    stem = stagetools._back_up(system)
    assert stagetools._is_backup_stem(stem) and stem.endswith("-scheduled")
    files = sorted(path.name for path in system.backups_dir.iterdir())
    assert files == [f"{stem}.media.tar", f"{stem}.sqlite"]
    assert stat.S_IMODE(system.backups_dir.stat().st_mode) == 0o700
    assert {stat.S_IMODE(path.stat().st_mode) for path in system.backups_dir.iterdir()} == \
        {0o600}
    with contextlib.closing(sqlite3.connect(system.database_sqlite_path)) as database:
        database.execute("INSERT INTO notes (text) VALUES ('after the backup')")
        database.execute("DELETE FROM notes WHERE id < 10")
        database.commit()
    (system.media_dir / "photos" / "a.jpg").unlink()
    (system.media_dir / "c.txt").write_text("after")
    assert sqlite_state(system) != before
    assert sorted(stagetools._restore_backup(system, stem)) == files
    assert sqlite_state(system) == before
    # uploads come back readable by their owner and nginx's group at most
    assert {stat.S_IMODE(path.stat().st_mode) & 0o027 for path in
            system.media_dir.rglob("*")} == {0}
    mine = stagetools.System(**dict(system._complete(), user=pwd.getpwuid(os.geteuid()).pw_name))
    assert [fact for fact in stagetools._check_backups(mine) if fact[1] != fact[2]] == []
    (system.backups_dir / f"{stem}.sqlite").chmod(0o640)
    assert stagetools._check_backups(mine)[2][2] == f"not so: {stem}.sqlite"


def test_backup__a_media_archive_with_links_or_escapes_is_refused(tmp_path):
    import tarfile
    system = backed_up_system(tmp_path)
    stem = stagetools._back_up(system)
    archive = system.backups_dir / f"{stem}.media.tar"
    archive.unlink()
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../../escape")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(stagetools.StagetoolsError, match="it holds '../../escape', which is "
                                                         "not a file or directory below media/"):
        stagetools._restore_backup(system, stem)
    assert (system.media_dir / "b.txt").read_text() == "b"  # refused before anything went


def test_backup__retention_by_count_and_by_age_keeps_the_newest(tmp_path):
    """The timer's backups are counted apart from those made before a migration; the one
    just made stays whatever the others' stamps say; a name of no real time is no backup."""
    system = backed_up_system(tmp_path)
    system.backups_dir.mkdir(mode=0o700)
    scheduled = ["20200101T000000Z-scheduled", "20200103T000000Z-scheduled",
                 "20200105T000000Z-scheduled"]
    others = ["20200102T000000Z-0123456789ab", "20200104T000000Z-manual"]
    for stem in scheduled + others + ["20201399T000000Z-scheduled"]:
        (system.backups_dir / f"{stem}.sqlite").write_text("")
    (system.backups_dir / "notes.txt").write_text("not a backup: left alone")
    newest = stagetools._back_up(system)  # keep 3: the one just made and the two before
    assert sorted(stagetools._backup_sets(str(system.backups_dir))) == sorted(
        scheduled[1:] + others + [newest])
    assert (system.backups_dir / "notes.txt").exists()
    assert (system.backups_dir / "20201399T000000Z-scheduled.sqlite").exists()
    # A stamp in the future (a clock that was wrong once) does not outlive the one just made.
    future = "20370101T000000Z-scheduled"
    (system.backups_dir / f"{future}.sqlite").write_text("")
    keep_one = stagetools.get_expected_system_from_name(
        "shop_qual", base_dir=str(system.base_dir), declared=stagetools.parse_declaration(
            "[stagetools]\nbackup = keep 1 @ daily\n", "shop_qual"))
    latest = stagetools._back_up(keep_one)
    assert sorted(stagetools._backup_sets(str(system.backups_dir))) == sorted(others + [latest])
    by_age = backed_up_system(tmp_path / "age", "[stagetools]\nbackup = keep 30d @ daily\n")
    by_age.backups_dir.mkdir(mode=0o700)
    for stem in scheduled + others:
        (by_age.backups_dir / f"{stem}.sqlite").write_text("")
    made = stagetools._back_up(by_age)  # those of the timer older than 30 days go
    assert sorted(stagetools._backup_sets(str(by_age.backups_dir))) == sorted(others + [made])


def test_backup__a_file_with_two_names_in_media_comes_back_under_both(tmp_path):
    system = backed_up_system(tmp_path)
    os.link(system.media_dir / "b.txt", system.media_dir / "photos" / "b-again.txt")
    stem = stagetools._back_up(system)
    for path in (system.media_dir / "b.txt", system.media_dir / "photos" / "b-again.txt"):
        path.unlink()
    stagetools._restore_backup(system, stem)
    assert (system.media_dir / "photos" / "b-again.txt").read_text() == "b"
    assert (system.media_dir / "b.txt").read_text() == "b"


def test_backup__a_backup_that_cannot_be_read_is_refused_in_one_line(tmp_path):
    """A database backup SQLite cannot read, a media archive that is no tar: refusals that
    name the file, and the database as it was."""
    import sqlite3
    system = backed_up_system(tmp_path)
    stem = stagetools._back_up(system)
    (system.backups_dir / f"{stem}.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(stagetools.StagetoolsError, match=r"\.sqlite': SQLite cannot read it"):
        stagetools._restore_backup(system, stem)
    with contextlib.closing(sqlite3.connect(system.database_sqlite_path)) as database:
        assert database.execute("SELECT count(*) FROM notes").fetchone() == (100,)
    other = stagetools._back_up(system, label="manual")
    (system.backups_dir / f"{other}.media.tar").write_bytes(b"not a tar")
    with pytest.raises(stagetools.StagetoolsError, match=r"\.media\.tar': it is no tar"):
        stagetools._restore_backup(system, other)


def test_backup__restore_of_an_unknown_backup_names_those_there(tmp_path):
    system = backed_up_system(tmp_path)
    stem = stagetools._back_up(system)
    with pytest.raises(stagetools.StagetoolsError, match=f"backup 'nosuch': there is no such "
                                                         f"backup in .*; choose one of {stem}"):
        stagetools._restore_backup(system, "nosuch")


@needs_root
def test_backup__postgresql_round_trip_by_the_installations_user(postgres, shared_dir):
    """pg_dump --format=custom as the user, the database made again empty (as the restore of
    the deploy tool does), pg_restore as the user: the rows are those of the backup."""
    name = "pgjobs_prod"
    with contextlib.ExitStack() as stack:
        base_dir = stack.enter_context(os_user(name))
        repo = base_dir / "src" / "pgjobs"
        repo.mkdir(parents=True)
        (repo / "stagetools.ini").write_text("[stagetools]\ndatabase = postgresql\n")
        (base_dir / "media").mkdir()
        run(["chown", "-R", f"{name}:{name}", base_dir])
        postgres.create_database(name)
        postgres.sql("CREATE TABLE notes (id serial PRIMARY KEY, text text)", name, name)
        postgres.sql("INSERT INTO notes (text) SELECT 'note ' || i FROM generate_series(1, 500) "
                     "i", name, name)
        state = "SELECT count(*) || ' ' || md5(string_agg(text, ',' ORDER BY id)) FROM notes"
        before = postgres.sql(state, name, name)
        env = installation_env(shared_dir, HOME=str(base_dir), **postgres.env())
        as_user = ["runuser", "-u", name, "--", SYSTEM_PYTHON, "-I", shared_dir / "stagetools.py"]
        printed = run(as_user + ["backup", name, "--label", "manual"], env=env, cwd="/").stdout
        stem = printed.split(" as ")[1].split()[0]
        assert sorted(os.listdir(base_dir / "backups")) == [f"{stem}.media.tar",
                                                            f"{stem}.pgdump"]
        postgres.sql("INSERT INTO notes (text) VALUES ('after the backup')", name, name)
        postgres.sql(f"DROP DATABASE {name} WITH (FORCE)")
        postgres.sql(f"CREATE DATABASE {name} OWNER {name}")
        run(as_user + ["restore", name, stem], env=env, cwd="/")
        assert postgres.sql(state, name, name) == before
        refused = run(["runuser", "-u", "nobody", "--"] + as_user[4:] + ["backup", name],
                      env=env, cwd="/", check=False)
        assert refused.returncode == 2 and "it runs as the installation's user pgjobs_prod" \
            in refused.stderr, refused.stderr


def test_check__a_failed_or_late_job_is_named(monkeypatch):
    monkeypatch.setattr(stagetools, "_calendar_period", lambda calendar: 3600)
    job = {"calendar": "hourly", "service": "shop_prod-job-report.service"}
    now = 1_800_000_000
    ok = {"Result": "success", "ActiveState": "inactive",
          "ExecMainStartTimestamp": "Fri 2027-01-15 08:00:00 UTC", "ExecMainStatus": "0"}
    timer = {"LastTriggerUSec": stagetools._shown_time(now - 600).replace(
        "2027", "2027"), "ActiveState": "active"}
    timer["LastTriggerUSec"] = time.strftime("%a %Y-%m-%d %H:%M:%S UTC", time.gmtime(now - 600))
    assert stagetools._job_fact("job report", job, ok, timer, now)[1:] == (
        "last run succeeded, one within 1 h", "last run succeeded, one within 1 h")
    failed = dict(ok, Result="exit-code", ActiveState="failed", ExecMainStatus="1")
    what, wanted, actual = stagetools._job_fact("job report", job, failed, timer, now)
    assert actual.startswith("last run failed (exit-code, exit status 1) at 2027-01-15 "
                             "08:00:00 UTC; see journalctl -u shop_prod-job-report.service")
    late = dict(timer, LastTriggerUSec=time.strftime("%a %Y-%m-%d %H:%M:%S UTC",
                                                     time.gmtime(now - 3 * 3600)))
    assert stagetools._job_fact("job report", job, ok, late, now)[2].startswith("no run since ")


def test_check__units_no_longer_declared_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(stagetools, "_SYSTEM_UNIT_DIR", str(tmp_path))
    system = declared_jobs("shop_qual", JOBS)
    for name in ("shop_qual-job-old.timer", "shop_qual-job-report.timer", "shop_qualx.service",
                 "shop_qual-worker-gone.service"):
        (tmp_path / name).write_text("")
    assert stagetools._check_undeclared_units(system) == [
        (f"file {tmp_path}/shop_qual-job-old.timer", "not there: not declared", "there"),
        (f"file {tmp_path}/shop_qual-worker-gone.service", "not there: not declared", "there")]


def test_unit_states_of_no_unit_are_none():
    """systemctl show without a unit shows the manager: no unit, no question."""
    assert stagetools._unit_states([], "Result") == []


def test_run__outside_systemd_or_unknown_job__one_line_exit_2():
    result = cli("run", "jobless_qual", "nosuch")  # no such installation here: its defaults
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "jobless_qual job nosuch: it is not declared; run one of: backup" in result.stderr


def rest_of_stagetools():
    """The text of _REST, the part of stagetools.py compiled on first use."""
    import ast
    rest, = [node.value.value for node in ast.parse(STAGETOOLS.read_text()).body
             if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_REST"]
    return rest


def test_every_function_of_stagetools_is_at_most_40_lines():
    import ast
    trees = [ast.parse(STAGETOOLS.read_text()), ast.parse(rest_of_stagetools())]
    long = [(node.name, node.end_lineno - node.lineno + 1) for tree in trees
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno >= 40]
    assert long == []


def test_start_up_compiles_none_of_the_rest_which_comes_on_first_use_with_its_lines():
    """Importing stagetools and resolving a system leave the rest (renderers, checks, the
    command line) uncompiled; its first use compiles it, with the file's line numbers."""
    code = ("import stagetools, sys; s = stagetools.get_actual_system_from_name('shop_dev'); "
            "s.user, s.base_dir, s.stage; "
            "print('_REST' in vars(stagetools), '_render_units' in vars(stagetools)); "
            "s.services; print('_REST' in vars(stagetools), "
            "stagetools._render_units.__code__.co_firstlineno, stagetools.main.__module__)")
    printed = run([sys.executable, "-c", code], cwd=HERE, env=clean_env()).stdout.split()
    line = STAGETOOLS.read_text().splitlines().index("def _render_units(system, user_unit):")
    assert printed == ["True", "False", "False", str(line + 1), "stagetools"]
    assert all(hasattr(stagetools, name) for name in stagetools.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'nosuch'"):
        stagetools.nosuch
    assert not hasattr(stagetools, "__path__")  # importlib's probe: no load, no answer


def test_the_rest_loaded_from_many_threads_at_once_is_there_for_each():
    """Threads that ask for names of the rest at once (the collection converges several
    installations in threads) each get them: none is told the name is not there while
    another thread is loading it."""
    code = """if True:
        import sys, threading, stagetools
        names = ["_read_record", "main", "_render_units", "check_installation"] * 4
        barrier, errors = threading.Barrier(len(names)), []
        def ask(name):
            barrier.wait()
            try:
                getattr(stagetools, name)
            except AttributeError as error:
                errors.append(str(error))
        threads = [threading.Thread(target=ask, args=(name,)) for name in names]
        [thread.start() for thread in threads]
        [thread.join() for thread in threads]
        print(len(errors), errors[:1])
    """
    printed = [run([sys.executable, "-c", code], cwd=HERE, env=clean_env()).stdout.strip()
               for _ in range(5)]
    assert printed == ["0 []"] * 5


@pytest.mark.skipif(not (IN_CI or shutil.which("vermin", path=os.path.dirname(sys.executable))),
                    reason="needs vermin (the test extra)")
def test_the_rest_of_stagetools_keeps_the_python_floor(tmp_path):
    """vermin (as .ci/run runs it on the file) reads the rest too: it is text to it."""
    rest = tmp_path / "rest.py"
    rest.write_text(rest_of_stagetools())
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    result = run([vermin, "--target=3.9-", "--violations", "--no-tips", "--eval-annotations",
                  rest], check=False)
    assert result.returncode == 0, result.stdout + result.stderr
