"""stagetools: staged Python web installations that follow from their name.

An installation is named ``<configuration>_<stage_name>`` and split at the last
underscore; the first letter of the stage name is the stage. Everything else
follows from the name:

=====================  ===========================  ============================
attribute              ``shop_prod``                ``my_shop_dsven``
=====================  ===========================  ============================
configuration          ``shop``                     ``my_shop``
stage_name / stage     ``prod`` / PROD (0)          ``dsven`` / DEV (3)
is_debug               False                        True
base_dir (expected)    ``/home/shop_prod``          ``/home/my_shop_dsven``
core_repo_dir          ``<base_dir>/src/shop``      ``<base_dir>/src/my_shop``
database_sqlite_path   ``<base_dir>/shop.sqlite``   ``<base_dir>/my_shop.sqlite``
socket_path            ``/run/shop_prod/shop_prod.sock``
=====================  ===========================  ============================

``get_expected_system_from_name`` says what a deploy tool should build;
``get_actual_system_from_name`` says what this process runs in. Comparing the
two (``System.differences``) tells whether an installation was built right.
Standard library only: copy this file into a repo, symlink it, or pip install.
"""

import argparse
import enum
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

__version__ = "1.0.0"
__all__ = sorted([
    "DEBUG_STAGES", "ENV_NAME", "FRAMEWORKS", "NAME_MAX_LENGTH", "SERVERS",
    "STAGES", "STAGE_DEV", "STAGE_INT", "STAGE_PROD", "STAGE_QUAL",
    "Stage", "StagetoolsError", "System",
    "get_actual_system_from_name", "get_expected_system_from_name",
    "main", "parse_name", "read_secret_key",
])

# ---------------------------------------------------------------- constants


class Stage(enum.IntEnum):
    """The stage of an installation; the levels of the original stagetools."""

    PROD = 0
    QUAL = 1
    INT = 2
    DEV = 3

    @property
    def label(self):
        return self.name.lower()


STAGE_PROD, STAGE_QUAL, STAGE_INT, STAGE_DEV = Stage.PROD, Stage.QUAL, Stage.INT, Stage.DEV
STAGES = (STAGE_PROD, STAGE_QUAL, STAGE_INT, STAGE_DEV)
# SECURITY WARNING: only these stages may run with DEBUG on.
DEBUG_STAGES = (STAGE_INT, STAGE_DEV)
_STAGE_BY_LETTER = {stage.label[0]: stage for stage in STAGES}

# Unix user names (useradd) allow 32 characters; the name is also a user.
NAME_MAX_LENGTH = 32
# Containers have no virtualenv named like the installation: they set this.
ENV_NAME = "STAGETOOLS_NAME"
DJANGO_PROJECT = "stagetools_project"
FRAMEWORKS = ("django", "flask", "starlette")
SERVERS = ("gunicorn", "uvicorn", "hypercorn")
_DEFAULT_SERVER = {"django": "gunicorn", "flask": "gunicorn", "starlette": "uvicorn"}
_WSGI_FRAMEWORKS = ("flask",)
_ASGI_ONLY_SERVERS = ("uvicorn", "hypercorn")
_EXAMPLE_NAME = "shop_prod"
_SECRET_KEY_MIN_LENGTH = 50


# ---------------------------------------------------------------- errors


class StagetoolsError(ValueError):
    """Every refusal of stagetools: the message names the input, the rule and the fix."""


def _refuse_name(name, rule, fix="for example " + repr(_EXAMPLE_NAME)):
    raise StagetoolsError(f"invalid installation name {name!r}: {rule}; {fix}")


# ---------------------------------------------------------------- the system


def parse_name(name):
    """Split an installation name into (configuration, stage_name, stage), or refuse it."""
    if not isinstance(name, str):
        raise StagetoolsError(f"invalid installation name {name!r}: a name is a string, "
                              f"for example {_EXAMPLE_NAME!r}")
    if not name:
        _refuse_name(name, "the name is empty", "give <configuration>_<stage_name>, "
                     f"for example {_EXAMPLE_NAME!r}")
    if len(name) > NAME_MAX_LENGTH:
        _refuse_name(name, f"it has {len(name)} characters, more than the {NAME_MAX_LENGTH} "
                     "a Unix user name allows", "shorten the configuration or the stage name")
    if not name.isascii():
        _refuse_name(name, "it has non-ASCII characters; a name is also a Unix user and a "
                     "PostgreSQL role", "use a-z, 0-9 and _ only")
    if any(char.isspace() for char in name):
        _refuse_name(name, "it has whitespace", "use a-z, 0-9 and _ only")
    if any(char in "/\\.:" for char in name):
        _refuse_name(name, "it has path characters (/ \\ . :)", "use a-z, 0-9 and _ only")
    if name.lower() != name:
        _refuse_name(name, "it has uppercase letters; Unix user names are lowercase",
                     f"use {name.lower()!r}")
    bad = sorted(set(re.sub(r"[a-z0-9_]", "", name)))
    if bad:
        _refuse_name(name, f"it has the characters {''.join(bad)!r}", "use a-z, 0-9 and _ only")
    configuration, underscore, stage_name = name.rpartition("_")
    if not underscore:
        _refuse_name(name, "it has no underscore between configuration and stage name",
                     f"for example {name + '_dev'!r}")
    if not stage_name:
        _refuse_name(name, "the stage name after the last underscore is empty",
                     f"for example {name + 'prod'!r}")
    if not configuration.strip("_"):
        _refuse_name(name, "the configuration before the last underscore is empty",
                     f"for example {'shop_' + stage_name!r}")
    if not name[0].isalpha():
        _refuse_name(name, "it must start with a letter", f"for example {_EXAMPLE_NAME!r}")
    stage = _STAGE_BY_LETTER.get(stage_name[0])
    if stage is None:
        _refuse_name(name, f"the stage name {stage_name!r} does not start with a stage letter "
                     "(p prod, q qual, i int, d dev)", f"for example {configuration + '_prod'!r}")
    return configuration, stage_name, stage


def _check_identifier(kind, value):
    if not (isinstance(value, str) and value.isidentifier() and value.isascii()):
        raise StagetoolsError(f"invalid {kind} {value!r}: it must be a Python identifier "
                              f"(letters, digits, _), for example 'shop'")
    return value


def _check_choice(kind, value, choices):
    if value not in choices:
        raise StagetoolsError(f"invalid {kind} {value!r}: choose one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class System:
    """An installation: everything that follows from its name. Immutable.

    Holds no secret: the secret key stays in the file at ``secret_key_path``.
    """

    # identity
    name: str
    name_source: str
    user: str
    group: str
    container: str
    configuration: str
    stage_name: str
    stage: Stage
    core_repo: str
    core_app: str
    is_debug: bool
    framework: str
    server: str
    # paths
    base_dir: Path
    venv_dir: Path
    bin_dir: Path
    lib_dir: Path
    src_dir: Path
    python_path: Path
    pip_path: Path
    core_repo_dir: Path
    static_url: str
    static_dir: Path
    media_url: str
    media_dir: Path
    run_dir: Path
    socket_path: Path
    secret_key_path: Path
    # entry points
    application_name: str
    asgi_module: str
    asgi_application: str
    wsgi_module: str
    wsgi_application: str
    # Django
    django_project: str
    django_settings: str
    django_rooturls: str
    django_wsgi_application: str
    manage_py_path: Path
    # database
    database_name: str
    database_user: str
    database_sqlite_path: Path
    database_socket_dir: Path

    def __repr__(self):
        return (f"System(name={self.name!r}, stage={self.stage.label}, user={self.user!r}, "
                f"base_dir='{self.base_dir}', source={self.name_source!r})")

    @property
    def services(self):
        """The files an installation needs outside its venv: file name -> text."""
        return _render_services(self)

    def as_dict(self):
        """A JSON-ready dict: paths as strings, the stage as 'prod', 'qual', 'int' or 'dev'."""
        result = {}
        for key, value in asdict(self).items():
            if isinstance(value, Stage):
                value = value.label
            elif isinstance(value, Path):
                value = str(value)
            result[key] = value
        result["services"] = self.services
        return result

    def differences(self, other, ignore=("name_source",)):
        """The fields where ``other`` differs: a list of (field, this value, other value)."""
        return [(field.name, getattr(self, field.name), getattr(other, field.name))
                for field in fields(self)
                if field.name not in ignore
                and getattr(self, field.name) != getattr(other, field.name)]


def _build_system(name, name_source, base_dir, user, group,
                  core_repo=None, core_app=None, framework=None, server=None):
    configuration, stage_name, stage = parse_name(name)
    core_repo = _check_identifier("core_repo", core_repo or configuration)
    core_app = _check_identifier("core_app", core_app or core_repo)
    framework = _check_choice("framework", framework or "django", FRAMEWORKS)
    server = _check_choice("server", server or _DEFAULT_SERVER[framework], SERVERS)
    if framework in _WSGI_FRAMEWORKS and server in _ASGI_ONLY_SERVERS:
        raise StagetoolsError(f"invalid server {server!r} for {framework}: {framework} is a "
                              "WSGI framework and needs gunicorn; use --server gunicorn")
    base_dir = Path(base_dir)
    if not base_dir.is_absolute():
        raise StagetoolsError(f"invalid base_dir '{base_dir}': it must be an absolute path, "
                              f"for example '/home/{name}'")
    bin_dir = base_dir / "bin"
    src_dir = base_dir / "src"
    run_dir = Path("/run") / name
    if framework == "django":
        entry_module = "stagetools_django"
        asgi_application = f"{entry_module}:asgi_application"
        wsgi_application = f"{entry_module}:wsgi_application"
    else:
        entry_module = core_app
        asgi_application = wsgi_application = f"{entry_module}:application"
    return System(
        name=name, name_source=name_source, user=user, group=group,
        container=name.replace("_", "-"), configuration=configuration,
        stage_name=stage_name, stage=stage, core_repo=core_repo, core_app=core_app,
        is_debug=stage in DEBUG_STAGES, framework=framework, server=server,
        base_dir=base_dir, venv_dir=base_dir, bin_dir=bin_dir, lib_dir=base_dir / "lib",
        src_dir=src_dir, python_path=bin_dir / "python", pip_path=bin_dir / "pip",
        core_repo_dir=src_dir / core_repo, static_url="static/",
        static_dir=base_dir / "static", media_url="media/", media_dir=base_dir / "media",
        run_dir=run_dir, socket_path=run_dir / f"{name}.sock",
        secret_key_path=base_dir / "secret_key",
        application_name="application", asgi_module=entry_module,
        asgi_application=asgi_application, wsgi_module=entry_module,
        wsgi_application=wsgi_application, django_project=DJANGO_PROJECT,
        django_settings=f"{DJANGO_PROJECT}.settings", django_rooturls=f"{DJANGO_PROJECT}.urls",
        django_wsgi_application=wsgi_application.replace(":", "."),
        manage_py_path=src_dir / core_repo / "manage.py",
        database_name=name, database_user=name,
        database_sqlite_path=base_dir / f"{core_repo}.sqlite",
        # Debian's libpq default; psycopg wheels were built with /tmp (psycopg2#521).
        database_socket_dir=Path("/var/run/postgresql"),
    )


# ---------------------------------------------------------------- resolvers


def _process_user_and_group():
    """User and group names of this process; Windows has no pwd/grp."""
    try:
        import grp
        import pwd
    except ImportError:
        import getpass
        return getpass.getuser(), ""
    uid, gid = os.geteuid(), os.getegid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:  # containers run uids that /etc/passwd does not know
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return user, group


def _name_problem(candidate):
    try:
        parse_name(candidate)
    except StagetoolsError as error:
        return str(error).split(": ", 1)[1].split(";")[0]
    return None


def _module_dirs():
    """The directories above this file, nearest first, following symlinks to the real file."""
    return list(Path(os.path.realpath(__file__)).parents)


def get_actual_system_from_name(name=None, core_repo=None, core_app=None,
                                framework=None, server=None):
    """The system this process runs in.

    The name comes from, in order: the argument, the environment variable
    ``STAGETOOLS_NAME``, the directory of the running virtualenv (``sys.prefix``),
    the nearest directory above this file named like an installation. The
    ``name_source`` attribute says which one was used.
    """
    prefix = Path(sys.prefix)
    module_dirs = _module_dirs()
    tried = []
    source = None
    if name is not None:
        parse_name(name)
        source = "argument"
    elif os.environ.get(ENV_NAME) is not None:
        name = os.environ[ENV_NAME]
        try:
            parse_name(name)
        except StagetoolsError as error:
            raise StagetoolsError(f"environment variable {ENV_NAME}: {error}") from None
        source = f"environment {ENV_NAME}"
    else:
        tried.append("argument: not given")
        tried.append(f"environment {ENV_NAME}: not set")
        problem = _name_problem(prefix.name)
        if problem is None:
            name, source = prefix.name, f"virtualenv {prefix}"
        else:
            tried.append(f"virtualenv (sys.prefix) '{prefix}': {prefix.name!r} is not a name "
                         f"({problem})")
            for directory in module_dirs:
                if _name_problem(directory.name) is None:
                    name, source = directory.name, f"module path {directory}"
                    break
            else:
                tried.append(f"module path '{module_dirs[0]}': no directory above it is "
                             "named like an installation")
    if name is None:
        raise StagetoolsError("cannot tell the installation name; tried " + "; ".join(tried)
                              + f". Fix: set {ENV_NAME}=shop_dev, or run from a virtualenv "
                              "whose directory is named like the installation (/home/shop_dev)")
    base_dir = next((d for d in [prefix] + module_dirs if d.name == name), prefix)
    user, group = _process_user_and_group()
    return _build_system(name, source, base_dir, user, group,
                         core_repo, core_app, framework, server)


def get_expected_system_from_name(name=None, base_dir=None, core_repo=None, core_app=None,
                                  framework=None, server=None):
    """The system a deploy tool should build: user and group are the name,
    base_dir ``/home/<name>`` unless given; the name defaults to the login name."""
    source = "argument"
    if name is None:
        name, _ = _process_user_and_group()
        source = "login name"
    return _build_system(name, source, base_dir or Path("/home") / name, name, name,
                         core_repo, core_app, framework, server)


def read_secret_key(system):
    """The installation's secret key, created on first use (random, 0600, atomically).

    Every process that starts at once gets the same key: a finished key file is
    hard-linked into place, and a process that loses the race reads the winner's.
    """
    path = system.secret_key_path
    if not path.exists():
        _create_secret_file(path)
    try:
        mode = path.stat().st_mode
        key = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise StagetoolsError(f"cannot read the secret key file '{path}': {error}; it must be "
                              f"readable by the installation's user {system.name!r}: "
                              f"chown {system.name} '{path}'") from None
    if os.name == "posix" and mode & 0o077:
        raise StagetoolsError(f"the secret key file '{path}' has mode {mode & 0o777:o}: other "
                              f"users can read it; fix: chmod 600 '{path}'")
    if len(key) < _SECRET_KEY_MIN_LENGTH:
        raise StagetoolsError(f"the secret key file '{path}' holds {len(key)} characters, fewer "
                              f"than {_SECRET_KEY_MIN_LENGTH}; remove it and a new key is made")
    return key


def _create_secret_file(path):
    # token_urlsafe never starts a key with '$' (django-environ#98) and has 64 symbols.
    key = secrets.token_urlsafe(64)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        raise StagetoolsError(f"cannot create the secret key file '{path}': {error}; the "
                              f"directory '{path.parent}' must exist and be writable") from None
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(key + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made the key first; everybody uses that one
    finally:
        os.unlink(temporary)


# ---------------------------------------------------------------- renderers


def _render_services(system):
    return {}


_DJANGO_STARTER = {
    "setup.py": """\
from setuptools import find_packages, setup

setup(
    name="$core_repo",
    version="0.1.0",
    py_modules=["aaa_env_setup", "aaa_script_setup", "stagetools", "stagetools_django"],
    packages=find_packages(),
    install_requires=$requirements,
)
""",
    "aaa_env_setup.py": """\
import os

from stagetools import get_actual_system_from_name

SYSTEM = get_actual_system_from_name()
os.environ.setdefault("DJANGO_SETTINGS_MODULE", SYSTEM.django_settings)
""",
    "aaa_script_setup.py": """\
import aaa_env_setup  # noqa: F401 (first: it names the settings module)
import django

django.setup()
""",
    "manage.py": """\
#!/usr/bin/env python
import sys

import stagetools_django

sys.exit(stagetools_django.manage())
""",
    "stagetools_project/__init__.py": "",
    "stagetools_project/settings.py": """\
from stagetools_django import settings_defaults

globals().update(settings_defaults("$database"))

# Your settings below, for example: ALLOWED_HOSTS += ["shop.example.com"]
""",
    "stagetools_project/urls.py": """\
from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("$core_app.urls")),
]
# Only with DEBUG on; in production nginx serves static files.
urlpatterns += staticfiles_urlpatterns()
""",
    "$core_app/__init__.py": "",
    "$core_app/models.py": """\
from django.db import models


class Note(models.Model):
    text = models.CharField(max_length=200)
""",
    "$core_app/urls.py": """\
from django.urls import path

from . import views

urlpatterns = [
    path("", views.home),
    path("notes/", views.notes),
    path("visits/", views.visits),
]
""",
    "$core_app/views.py": """\
import os

from aaa_env_setup import SYSTEM
from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.csrf import ensure_csrf_cookie

from .models import Note


@ensure_csrf_cookie
def home(request):
    return JsonResponse({"name": SYSTEM.name, "stage": SYSTEM.stage.label,
                         "debug": settings.DEBUG, "database": connection.vendor,
                         "database_name": str(settings.DATABASES["default"]["NAME"])})


def notes(request):
    if request.method == "POST":
        Note.objects.create(text=request.POST["text"])
    return JsonResponse({"notes": list(Note.objects.values_list("text", flat=True))})


def visits(request):
    request.session["visits"] = request.session.get("visits", 0) + 1
    return JsonResponse({"visits": request.session["visits"], "pid": os.getpid()})
""",
}
_REQUIREMENTS = {"django": ["Django>=4.2", "gunicorn", "uvicorn", "hypercorn"]}
_DATABASE_REQUIREMENTS = {"sqlite": [], "postgresql": ["psycopg[binary]"]}


def _render_starter(system, database):
    """The files of a new repo in the seed's layout: relative path -> text."""
    import string
    values = dict(core_repo=system.core_repo, core_app=system.core_app, database=database,
                  requirements=repr(_REQUIREMENTS[system.framework]
                                    + _DATABASE_REQUIREMENTS[database]))
    files = {string.Template(path).substitute(values): string.Template(text).substitute(values)
             for path, text in _DJANGO_STARTER.items()}
    here = Path(os.path.realpath(__file__)).parent
    for module in ("stagetools.py", "stagetools_django.py"):
        files[module] = (here / module).read_text(encoding="utf-8")
    return files


# ---------------------------------------------------------------- command line


def _show_table(system):
    rows = [(key, value) for key, value in system.as_dict().items() if key != "services"]
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    lines.append(f"{'services':<{width}}  {', '.join(system.services) or '-'}")
    return "\n".join(lines)


def _add_system_options(parser):
    parser.add_argument("name", nargs="?", help="installation name, e.g. shop_prod")
    parser.add_argument("--core-repo", help="repo below src/ (default: the configuration)")
    parser.add_argument("--core-app", help="main Python package (default: the core repo)")
    parser.add_argument("--framework", choices=FRAMEWORKS, help="default: django")
    parser.add_argument("--server", choices=SERVERS,
                        help="default: gunicorn (uvicorn for starlette)")
    parser.add_argument("--json", action="store_true", help="one JSON object, for machines")


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise StagetoolsError(f"{message} (see {self.prog} --help)")


def _parser():
    parser = _ArgumentParser(prog="stagetools", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    show = commands.add_parser("show", help="the actual system, or the expected one")
    _add_system_options(show)
    show.add_argument("--expected", action="store_true", help="what a deploy tool should build")
    show.add_argument("--base-dir", help="base dir of the expected system (default /home/NAME)")
    new = commands.add_parser("new", help="create an installation to start with: a venv named "
                              "like the installation, a starter repo, its database")
    new.add_argument("directory", help="the new installation's dir, named like it: /tmp/shop_dev")
    new.add_argument("--framework", choices=FRAMEWORKS, default="django")
    new.add_argument("--database", choices=tuple(_DATABASE_REQUIREMENTS), default="sqlite")
    new.add_argument("--core-repo", help="repo below src/ (default: the configuration)")
    new.add_argument("--core-app", help="main Python package (default: the core repo)")
    new.add_argument("--python", default=sys.executable,
                     help="the Python of the venv; its user must be able to run it "
                     "(default: this one)")
    return parser


def _cmd_show(args):
    options = dict(core_repo=args.core_repo, core_app=args.core_app,
                   framework=args.framework, server=args.server)
    if args.expected:
        system = get_expected_system_from_name(args.name, base_dir=args.base_dir, **options)
    elif args.base_dir:
        raise StagetoolsError("--base-dir needs --expected: the actual base dir is where the "
                              "running virtualenv is")
    else:
        system = get_actual_system_from_name(args.name, **options)
    print(json.dumps(system.as_dict(), indent=2) if args.json else _show_table(system))
    return 0


def _run(command, what):
    print("+ " + " ".join(shlex.quote(str(part)) for part in command), flush=True)
    try:
        returncode = subprocess.run(command).returncode
    except OSError as error:
        returncode = error
    if returncode != 0:
        raise StagetoolsError(f"{what} failed (command above: {returncode}); fix its error "
                              "and run again")


def _cmd_new(args):
    directory = Path(args.directory).absolute()
    system = get_expected_system_from_name(directory.name, base_dir=directory,
                                           core_repo=args.core_repo, core_app=args.core_app,
                                           framework=args.framework)
    if directory.exists() and any(directory.iterdir()):
        raise StagetoolsError(f"'{directory}' exists and is not empty; choose a new directory "
                              "or remove this one")
    starter = _render_starter(system, args.database)
    created = not directory.exists()
    try:
        _run([args.python, "-m", "venv", directory], "creating the virtualenv")
        for relative, text in starter.items():
            target = system.core_repo_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        for folder in (system.static_dir, system.media_dir):
            folder.mkdir(exist_ok=True)
        _run([system.pip_path, "install", "--quiet", "--editable", system.core_repo_dir],
             "installing the starter repo and its requirements")
        manage = [system.python_path, system.manage_py_path]
        _run(manage + ["makemigrations", system.core_app], "making the first migration")
        _run(manage + ["migrate", "--no-input"], "migrating the database")
    except BaseException:
        if created:
            import shutil
            shutil.rmtree(directory, ignore_errors=True)
        raise
    print(f"\nCreated {system.name} ({system.stage.label}, {args.database}) in {directory}. "
          "Serve it with one of:")
    for server in SERVERS:
        print("  " + " ".join(shlex.quote(part) for part in
                              _server_command(system, server, f"127.0.0.1:8000")))
    return 0


def _server_command(system, server, bind):
    """The command line that serves the installation: bind is host:port, unix:PATH or fd://N."""
    executable = str(system.bin_dir / server)
    if server == "gunicorn":
        return [executable, "--bind", bind, system.wsgi_application]
    if server == "hypercorn":
        return [executable, "--bind", bind, system.asgi_application]
    if bind.startswith("unix:"):
        where = ["--uds", bind[len("unix:"):]]
    elif bind.startswith("fd://"):
        where = ["--fd", bind[len("fd://"):]]
    else:
        host, _, port = bind.rpartition(":")
        where = ["--host", host, "--port", port]
    return [executable] + where + [system.asgi_application]


def main(argv=None):
    """The command line: returns the exit code (0 fine, 1 a difference, 2 bad input)."""
    try:
        args = _parser().parse_args(argv)
        return {"show": _cmd_show, "new": _cmd_new}[args.command](args)
    except StagetoolsError as error:
        print(f"stagetools: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
