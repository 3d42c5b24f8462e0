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

# Only os and sys at import time: everything else is imported where it is used, so
# that importing stagetools and resolving a system costs next to nothing (bench/).
import os
import sys

__version__ = "1.0.0"
__all__ = sorted([
    "DATABASES", "DEBUG_STAGES", "ENV_NAME", "FRAMEWORKS", "NAME_MAX_LENGTH", "SERVERS",
    "STAGES", "STAGE_DEV", "STAGE_INT", "STAGE_PROD", "STAGE_QUAL",
    "Stage", "StagetoolsError", "System",
    "get_actual_system_from_name", "get_expected_system_from_name",
    "check_installation", "database_url", "flask_config", "main", "parse_name", "read_secret_key",
    "starlette_config",
])

# ---------------------------------------------------------------- constants


class Stage(int):
    """The stage of an installation: an int with the levels of the original stagetools.

    Its four values are ``Stage.PROD`` (0), ``QUAL`` (1), ``INT`` (2) and ``DEV`` (3).
    """

    __slots__ = ()

    @property
    def label(self):
        """'prod', 'qual', 'int' or 'dev': the stage's name in JSON and in tables."""
        return _STAGE_LABELS[self]

    @property
    def name(self):
        return self.label.upper()

    def __repr__(self):
        return f"Stage.{self.name}"


_STAGE_LABELS = ("prod", "qual", "int", "dev")
Stage.PROD, Stage.QUAL, Stage.INT, Stage.DEV = (Stage(level) for level in range(4))
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
DATABASES = ("sqlite", "postgresql")
# The servers each framework runs on, the default first: Flask is WSGI, Starlette ASGI.
_SERVERS_OF = {"django": SERVERS, "flask": ("gunicorn",),
               "starlette": ("uvicorn", "hypercorn")}
_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_EXAMPLE_NAME = "shop_prod"
_USE_NAME_CHARACTERS = "use a-z, 0-9 and _ only"
_SECRET_KEY_MIN_LENGTH = 50
_STEP_TIMEOUT = 1800  # seconds for one step of `new`: pip may download for a while


# ---------------------------------------------------------------- errors


class StagetoolsError(ValueError):
    """Every refusal of stagetools: the message names the input, the rule and the fix."""


def _refuse_name(name, rule, fix=f"for example {_EXAMPLE_NAME!r}"):
    error = StagetoolsError(f"invalid installation name {name!r}: {rule}; {fix}")
    error.rule = rule  # for listing what each name source held
    raise error


# ---------------------------------------------------------------- the system


def parse_name(name):
    """Split an installation name into (configuration, stage_name, stage), or refuse it."""
    if not isinstance(name, str):
        _refuse_name(name, "a name is a string")
    if not name:
        _refuse_name(name, "the name is empty",
                     f"give <configuration>_<stage_name>, for example {_EXAMPLE_NAME!r}")
    if len(name) > NAME_MAX_LENGTH:
        _refuse_name(name, f"it has {len(name)} characters, more than the {NAME_MAX_LENGTH} "
                     "a Unix user name allows", "shorten the configuration or the stage name")
    if not name.isascii():
        _refuse_name(name, "it has non-ASCII characters; a name is also a Unix user and a "
                     "PostgreSQL role", _USE_NAME_CHARACTERS)
    if any(char.isspace() for char in name):
        _refuse_name(name, "it has whitespace", _USE_NAME_CHARACTERS)
    if any(char in "/\\.:" for char in name):
        _refuse_name(name, "it has path characters (/ \\ . :)", _USE_NAME_CHARACTERS)
    if name.lower() != name:
        _refuse_name(name, "it has uppercase letters; Unix user names are lowercase",
                     f"use {name.lower()!r}")
    bad = sorted(set(name) - _NAME_CHARACTERS)
    if bad:
        _refuse_name(name, f"it has the characters {''.join(bad)!r}", _USE_NAME_CHARACTERS)
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
        _refuse_name(name, "it must start with a letter")
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


class System:
    """An installation: everything that follows from its name. Immutable.

    Path attributes are ``pathlib.Path`` objects, made on first access so that
    resolving a system costs no pathlib import. ``user`` and ``group`` given as
    None are this process's, looked up on first use: pwd and grp cost more than
    the rest of resolving, and settings never need them. Holds no secret: the
    secret key stays in the file at ``secret_key_path``.
    """

    def __init__(self, **values):
        if set(values) != set(_FIELDS):
            raise TypeError(f"System needs exactly the fields {', '.join(_FIELDS)}")
        object.__setattr__(self, "_values", values)

    def _complete(self):
        values = self._values
        if values["user"] is None:
            values["user"], values["group"] = _process_user_and_group()
        return values

    def __getattr__(self, name):
        if name.startswith("_"):  # copy and pickle look for hooks before _values exists
            raise AttributeError(name)
        try:
            value = (self._complete() if name in ("user", "group") else self._values)[name]
        except KeyError:
            raise AttributeError(f"System has no attribute {name!r}") from None
        if name in _PATH_FIELDS:
            from pathlib import Path
            value = Path(value)
            object.__setattr__(self, name, value)
        return value

    def __setattr__(self, name, value):
        raise AttributeError(f"System is immutable: cannot set {name!r}")

    __delattr__ = __setattr__

    def __eq__(self, other):
        return isinstance(other, System) and self._complete() == other._complete()

    def __hash__(self):
        values = self._complete()
        return hash(tuple(values[name] for name in _FIELDS))

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_FIELDS))

    def __repr__(self):
        return (f"System(name={self.name!r}, stage={self.stage.label}, user={self.user!r}, "
                f"base_dir={self._values['base_dir']!r}, source={self.name_source!r})")

    @property
    def services(self):
        """The files an installation needs outside its repo: absolute path -> text."""
        return _render_services(self)

    def as_dict(self):
        """A JSON-ready dict: paths as strings, the stage as 'prod', 'qual', 'int' or 'dev'."""
        values = self._complete()
        result = {name: values[name] for name in _FIELDS}
        result["stage"] = self.stage.label
        result["services"] = self.services
        return result

    def differences(self, other, ignore=("name_source",)):
        """The fields where ``other`` differs: a list of (field, this value, other value),
        the values as in ``as_dict()`` (paths as strings) but the stage a ``Stage``."""
        mine, theirs = self._complete(), other._complete()
        return [(name, mine[name], theirs[name]) for name in _FIELDS
                if name not in ignore and mine[name] != theirs[name]]


_FIELDS = (
    # identity
    "name", "name_source", "user", "group", "container", "configuration", "stage_name",
    "stage", "core_repo", "core_app", "is_debug", "framework", "server",
    # paths
    "base_dir", "venv_dir", "bin_dir", "lib_dir", "src_dir", "python_path", "pip_path",
    "core_repo_dir", "static_url", "static_dir", "media_url", "media_dir", "run_dir",
    "socket_path", "secret_key_path",
    # entry points
    "application_name", "asgi_module", "asgi_application", "wsgi_module", "wsgi_application",
    # Django
    "django_project", "django_settings", "django_rooturls", "django_wsgi_application",
    "manage_py_path",
    # database
    "database_name", "database_user", "database_sqlite_path", "database_socket_dir",
)
_PATH_FIELDS = frozenset(name for name in _FIELDS if name.endswith(("_dir", "_path")))


def _build_system(name, name_source, base_dir, user, group,
                  core_repo=None, core_app=None, framework=None, server=None):
    configuration, stage_name, stage = parse_name(name)
    core_repo = _check_identifier("core_repo", core_repo or configuration)
    core_app = _check_identifier("core_app", core_app or core_repo)
    framework = _check_choice("framework", framework or "django", FRAMEWORKS)
    server = _check_choice(f"server for {framework}", server or _SERVERS_OF[framework][0],
                           _SERVERS_OF[framework])
    base_dir = os.fspath(base_dir)
    if not os.path.isabs(base_dir):
        raise StagetoolsError(f"invalid base_dir {base_dir!r}: it must be an absolute path, "
                              f"for example '/home/{name}'")
    base_dir = os.path.normpath(base_dir)
    join = os.path.join
    bin_dir, src_dir, run_dir = join(base_dir, "bin"), join(base_dir, "src"), f"/run/{name}"
    core_repo_dir = join(src_dir, core_repo)
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
        base_dir=base_dir, venv_dir=base_dir, bin_dir=bin_dir, lib_dir=join(base_dir, "lib"),
        src_dir=src_dir, python_path=join(bin_dir, "python"), pip_path=join(bin_dir, "pip"),
        core_repo_dir=core_repo_dir, static_url="static/",
        static_dir=join(base_dir, "static"), media_url="media/",
        media_dir=join(base_dir, "media"), run_dir=run_dir,
        socket_path=f"{run_dir}/{name}.sock", secret_key_path=join(base_dir, "secret_key"),
        application_name="application", asgi_module=entry_module,
        asgi_application=asgi_application, wsgi_module=entry_module,
        wsgi_application=wsgi_application, django_project=DJANGO_PROJECT,
        django_settings=f"{DJANGO_PROJECT}.settings", django_rooturls=f"{DJANGO_PROJECT}.urls",
        django_wsgi_application=wsgi_application.replace(":", "."),
        manage_py_path=join(core_repo_dir, "manage.py"),
        database_name=name, database_user=name,
        database_sqlite_path=join(base_dir, f"{core_repo}.sqlite"),
        # Debian's libpq default; psycopg wheels were built with /tmp (psycopg2#521).
        database_socket_dir="/var/run/postgresql",
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
    gid = os.getegid()
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return _user_name(pwd, os.geteuid()), group


def _user_name(pwd, uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # containers run uids that /etc/passwd does not know
        return str(uid)


def _name_problem(candidate):
    try:
        parse_name(candidate)
    except StagetoolsError as error:
        return error.rule
    return None


def _module_dirs():
    """The directories above this file, nearest first, following symlinks to the real file."""
    directories = [os.path.dirname(os.path.realpath(__file__))]
    while os.path.dirname(directories[-1]) != directories[-1]:
        directories.append(os.path.dirname(directories[-1]))
    return directories


def get_actual_system_from_name(name=None, core_repo=None, core_app=None,
                                framework=None, server=None):
    """The system this process runs in.

    The name comes from, in order: the argument, the environment variable
    ``STAGETOOLS_NAME``, the directory of the running virtualenv (``sys.prefix``),
    the nearest directory above this file named like an installation. The
    ``name_source`` attribute says which one was used.
    """
    prefix = os.path.normpath(sys.prefix)
    basename = os.path.basename
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
        problem = _name_problem(basename(prefix))
        if problem is None:
            name, source = basename(prefix), f"virtualenv {prefix}"
        else:
            tried.append(f"virtualenv (sys.prefix) '{prefix}': {basename(prefix)!r} is not a "
                         f"name ({problem})")
            module_dirs = _module_dirs()
            for directory in module_dirs:
                if _name_problem(basename(directory)) is None:
                    name, source = basename(directory), f"module path {directory}"
                    break
            else:
                tried.append(f"module path '{module_dirs[0]}': no directory above it is "
                             "named like an installation")
    if name is None:
        raise StagetoolsError("cannot tell the installation name; tried " + "; ".join(tried)
                              + f". Fix: set {ENV_NAME}=shop_dev, or run from a virtualenv "
                              "whose directory is named like the installation (/home/shop_dev)")
    base_dir = prefix if basename(prefix) == name else \
        next((d for d in _module_dirs() if basename(d) == name), prefix)
    return _build_system(name, source, base_dir, None, None,
                         core_repo, core_app, framework, server)


def get_expected_system_from_name(name=None, base_dir=None, core_repo=None, core_app=None,
                                  framework=None, server=None):
    """The system a deploy tool should build: user and group are the name,
    base_dir ``/home/<name>`` unless given; the name defaults to the login name."""
    source = "argument"
    if name is None:
        name, _ = _process_user_and_group()
        source = "login name"
        try:
            parse_name(name)
        except StagetoolsError as error:
            raise StagetoolsError(f"login name of this process: {error}; or give the "
                                  "installation name") from None
    return _build_system(name, source, base_dir or f"/home/{name}", name, name,
                         core_repo, core_app, framework, server)


def read_secret_key(system):
    """The installation's secret key, created on first use (random, 0600, atomically).

    Every process that starts at once gets the same key: a finished key file is
    hard-linked into place, and a process that loses the race reads the winner's.
    """
    path = os.fspath(system.secret_key_path)
    if not os.path.exists(path):
        _create_secret_file(path)
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as file:
            key = file.read().strip()
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
    import secrets
    # token_urlsafe never starts a key with '$' (django-environ#98) and has 64 symbols.
    key = secrets.token_urlsafe(64)
    directory, filename = os.path.split(path)
    temporary = os.path.join(directory, f".{filename}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        raise StagetoolsError(f"cannot create the secret key file '{path}': {error}; the "
                              f"directory '{directory}' must exist and be writable") from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(key + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made the key first; everybody uses that one
        except OSError as error:
            raise StagetoolsError(f"cannot create the secret key file '{path}': {error}; its "
                                  "file system must support hard links") from None
    finally:
        os.unlink(temporary)


def database_url(system, database="sqlite"):
    """The database URL of the installation, for apps that take one (Flask, Starlette)."""
    if _check_choice("database", database, DATABASES) == "sqlite":
        return f"sqlite:///{system.database_sqlite_path}"
    # Peer authentication over the local socket: a user, no password, no TCP host.
    return (f"postgresql://{system.database_user}@/{system.database_name}"
            f"?host={_database_host(system)}")


def _database_host(system):
    """PostgreSQL's socket directory: libpq's compiled-in default differs between builds,
    so name it, unless libpq's own PGHOST says otherwise."""
    return os.environ.get("PGHOST") or str(system.database_socket_dir)


def flask_config(system, database="sqlite"):
    """The ``app.config`` of a Flask app of the installation: ``app.config.update(...)``."""
    production = not system.is_debug
    return {
        "DEBUG": system.is_debug,
        "SECRET_KEY": read_secret_key(system),
        "DATABASE_URL": database_url(system, database),
        "STATIC_FOLDER": str(system.static_dir),
        "MEDIA_FOLDER": str(system.media_dir),
        # Installations that share a domain must not read each other's cookies.
        "SESSION_COOKIE_NAME": f"{system.name}_session",
        "SESSION_COOKIE_SECURE": production,
        "PREFERRED_URL_SCHEME": "https" if production else "http",
    }


def starlette_config(system, database="sqlite"):
    """The mapping ``starlette.config.Config(environ=...)`` reads: the same keys, as strings."""
    return {key: str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in flask_config(system, database).items()}


# ---------------------------------------------------------------- renderers


_SYSTEM_UNIT_DIR = "/etc/systemd/system"
_TMPFILES_DIR = "/etc/tmpfiles.d"
_NGINX_DIR = "/etc/nginx/sites-available"
# The group of the web server: it alone, besides root, may connect to the sockets.
_WEB_GROUP = "www-data"
# Each line is explained in the README's table "Hardening of the system unit".
_HARDENING = """\
UMask=0027
ProtectSystem=strict
ProtectHome=tmpfs
BindPaths={base_dir}
ReadOnlyPaths=-{base_dir}/bin -{base_dir}/lib -{base_dir}/src
PrivateTmp=yes
PrivateDevices=yes
DevicePolicy=closed
PrivateMounts=yes
PrivateUsers=yes
ProtectProc=invisible
RemoveIPC=yes
KeyringMode=private
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
"""
# Valid in user units too: the rest needs namespaces a user manager may not have.
_USER_UNIT_DIRECTIVES = {"UMask", "NoNewPrivileges", "LockPersonality", "RestrictRealtime",
                         "RestrictSUIDSGID", "RestrictNamespaces", "RestrictAddressFamilies",
                         "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber"}
_USER_HARDENING = "".join(line + "\n" for line in _HARDENING.splitlines()
                          if line.partition("=")[0] in _USER_UNIT_DIRECTIVES)


def _server_command(system, bind):
    """The command that serves the installation; bind is host:port or fd://N (systemd)."""
    server = system.bin_dir / system.server
    application = system.wsgi_application if system.server == "gunicorn" \
        else system.asgi_application
    if bind.startswith("fd://"):
        where = {"gunicorn": [],  # gunicorn takes systemd's LISTEN_FDS by itself
                 "uvicorn": ["--fd", bind[len("fd://"):]], "hypercorn": ["--bind", bind]}
    else:
        host, _, port = bind.rpartition(":")
        where = {"gunicorn": ["--bind", bind], "uvicorn": ["--host", host, "--port", port],
                 "hypercorn": ["--bind", bind]}
    return [str(server)] + where[system.server] + [application]


def _render_units(system, user_unit):
    import shlex
    socket_path = "%t/{0}/{0}.sock".format(system.name) if user_unit else system.socket_path
    socket_access = "SocketMode=0600\nDirectoryMode=0700" if user_unit else \
        f"SocketGroup={_WEB_GROUP}\nSocketMode=0660\nDirectoryMode=0755"
    # DirectoryMode only matters if tmpfiles has not made the dir (0750 NAME:www-data)
    # first; the socket's own mode 0660 keeps other users out either way.
    socket = (f"[Unit]\nDescription={system.name} socket (stagetools)\n\n"
              f"[Socket]\nListenStream={socket_path}\n{socket_access}\n\n"
              "[Install]\nWantedBy=sockets.target\n")
    # gunicorn tells systemd when it is ready; uvicorn and hypercorn cannot.
    service_type = "notify" if system.server == "gunicorn" else "exec"
    identity = "" if user_unit else f"User={system.user}\nGroup={system.group}\n"
    hardening = _USER_HARDENING if user_unit else _HARDENING.format(base_dir=system.base_dir)
    service = (
        f"[Unit]\nDescription={system.name} ({system.server}, stagetools)\n"
        f"Requires={system.name}.socket\nAfter=network.target {system.name}.socket\n\n"
        f"[Service]\nType={service_type}\n{identity}"
        f"WorkingDirectory={system.core_repo_dir}\n"
        f"ExecStart={shlex.join(_server_command(system, 'fd://3'))}\n"
        "KillMode=mixed\nRestart=on-failure\n"
        f"{hardening}\n[Install]\nWantedBy={'default' if user_unit else 'multi-user'}.target\n")
    return socket, service


def _render_nginx(system):
    return f"""\
# nginx site of {system.name}; TLS and your domain: see the README.
upstream {system.name} {{
    server unix:{system.socket_path} fail_timeout=0;
}}

server {{
    listen 80;
    server_name {system.container}.localhost;
    client_max_body_size 20m;

    location /{system.static_url} {{
        alias {system.static_dir}/;
        # Names with a content hash (Django's ManifestStaticFilesStorage) never change.
        location ~ "\\.[0-9a-f]{{12}}\\.[^/]+$" {{
            add_header Cache-Control "public, max-age=31536000, immutable";
        }}
    }}
    location /{system.media_url} {{
        alias {system.media_dir}/;
    }}
    location / {{
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        # Django trusts this header in QUAL and PROD: nginx must always set it.
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_redirect off;
        proxy_pass http://{system.name};
    }}
}}
"""


def _render_services(system):
    """The files of an installation outside its repo: absolute path -> text."""
    socket, service = _render_units(system, user_unit=False)
    user_socket, user_service = _render_units(system, user_unit=True)
    name = system.name
    user_dir = os.path.join(system.base_dir, ".config", "systemd", "user")
    return {
        f"{_SYSTEM_UNIT_DIR}/{name}.socket": socket,
        f"{_SYSTEM_UNIT_DIR}/{name}.service": service,
        # The socket dir: the user may write there, nginx may pass, nobody else.
        f"{_TMPFILES_DIR}/{name}.conf": f"d {system.run_dir} 0750 {system.user} {_WEB_GROUP} -\n",
        f"{_NGINX_DIR}/{name}.conf": _render_nginx(system),
        os.path.join(user_dir, f"{name}.socket"): user_socket,
        os.path.join(user_dir, f"{name}.service"): user_service,
    }


_STARTER_SETUP = """\
from setuptools import find_packages, setup

setup(
    name="$core_repo",
    version="0.1.0",
    py_modules=$py_modules,
    packages=find_packages(),
    install_requires=$requirements,
)
"""
_STARTER_ENV_SETUP = """\
${imports}from stagetools import get_actual_system_from_name

SYSTEM = get_actual_system_from_name($system_arguments)
$settings_line"""
_DJANGO_STARTER = {
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
# Flask and Starlette keep their notes in a table of their own, on DATABASE_URL.
_STARTER_DB = '''\
"""The notes table on the database URL that stagetools gives: SQLite or PostgreSQL."""
import sqlite3


def _execute(url, sql, parameters=()):
    if url.startswith("sqlite:///"):
        connection = sqlite3.connect(url[len("sqlite:///"):])
        sql = sql.replace("%s", "?")
    else:
        import psycopg
        connection = psycopg.connect(url)
    try:
        cursor = connection.execute(sql, parameters)
        rows = cursor.fetchall() if sql.startswith("SELECT") else None
        connection.commit()
        return rows
    finally:
        connection.close()


def create_tables(url):
    _execute(url, "CREATE TABLE IF NOT EXISTS notes (text VARCHAR(200) NOT NULL)")


def add_note(url, text):
    _execute(url, "INSERT INTO notes (text) VALUES (%s)", (text,))


def list_notes(url):
    return [text for (text,) in _execute(url, "SELECT text FROM notes")]
'''
# python -m CORE_APP: what migrate is to Django.
_STARTER_MAIN = '''\
from . import DATABASE_URL, db

db.create_tables(DATABASE_URL)
'''
_FLASK_STARTER = {
    "$core_app/__init__.py": '''\
import os

import aaa_env_setup  # first: it resolves the installation
import stagetools
from flask import Flask, jsonify, request, session

from . import db

SYSTEM = aaa_env_setup.SYSTEM
application = Flask(__name__, static_folder=str(SYSTEM.static_dir),
                    static_url_path="/" + SYSTEM.static_url.rstrip("/"))
application.config.update(stagetools.flask_config(SYSTEM, "$database"))
DATABASE_URL = application.config["DATABASE_URL"]


@application.get("/")
def home():
    return jsonify(name=SYSTEM.name, stage=SYSTEM.stage.label, debug=application.debug,
                   database=DATABASE_URL.split(":")[0])


@application.route("/notes/", methods=["GET", "POST"])
def notes():
    if request.method == "POST":
        db.add_note(DATABASE_URL, request.form["text"])
    return jsonify(notes=db.list_notes(DATABASE_URL))


@application.get("/visits/")
def visits():
    session["visits"] = session.get("visits", 0) + 1
    return jsonify(visits=session["visits"], pid=os.getpid())
''',
    "$core_app/db.py": _STARTER_DB,
    "$core_app/__main__.py": _STARTER_MAIN,
}
_STARLETTE_STARTER = {
    "$core_app/__init__.py": '''\
import os

import aaa_env_setup  # first: it resolves the installation
import stagetools
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.config import Config
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import db

SYSTEM = aaa_env_setup.SYSTEM
config = Config(environ=stagetools.starlette_config(SYSTEM, "$database"))
DEBUG = config("DEBUG", cast=bool)
DATABASE_URL = config("DATABASE_URL")


async def home(request):
    return JSONResponse({"name": SYSTEM.name, "stage": SYSTEM.stage.label, "debug": DEBUG,
                         "database": DATABASE_URL.split(":")[0]})


async def notes(request):
    if request.method == "POST":
        text = (await request.json())["text"]
        await run_in_threadpool(db.add_note, DATABASE_URL, text)
    return JSONResponse({"notes": await run_in_threadpool(db.list_notes, DATABASE_URL)})


async def visits(request):
    request.session["visits"] = request.session.get("visits", 0) + 1
    return JSONResponse({"visits": request.session["visits"], "pid": os.getpid()})


application = Starlette(
    debug=DEBUG,
    routes=[
        Route("/", home),
        Route("/notes/", notes, methods=["GET", "POST"]),
        Route("/visits/", visits),
        Mount("/" + SYSTEM.static_url.rstrip("/"), StaticFiles(directory=SYSTEM.static_dir)),
    ],
    middleware=[Middleware(SessionMiddleware, secret_key=config("SECRET_KEY"),
                           session_cookie=config("SESSION_COOKIE_NAME"),
                           https_only=config("SESSION_COOKIE_SECURE", cast=bool))],
)
''',
    "$core_app/db.py": _STARTER_DB,
    "$core_app/__main__.py": _STARTER_MAIN,
}
_STARTERS = {"django": _DJANGO_STARTER, "flask": _FLASK_STARTER,
             "starlette": _STARLETTE_STARTER}
_REQUIREMENTS = {"django": ["Django>=4.2", "gunicorn", "uvicorn", "hypercorn"],
                 "flask": ["Flask", "gunicorn"],
                 "starlette": ["starlette", "itsdangerous", "uvicorn", "hypercorn"]}
_DATABASE_REQUIREMENTS = dict(zip(DATABASES, ([], ["psycopg[binary]"])))


def _render_starter(system, database):
    """The files of a new repo in the seed's layout: relative path -> text."""
    import json
    import string
    django = system.framework == "django"
    modules = ["stagetools.py"] + (["stagetools_django.py"] if django else [])
    arguments = [f"{key}={json.dumps(value)}" for key, value, default in [
        ("core_repo", system.core_repo, system.configuration),
        ("core_app", system.core_app, system.core_repo),
        ("framework", system.framework, "django")] if value != default]
    values = dict(
        core_repo=system.core_repo, core_app=system.core_app, database=database,
        requirements=json.dumps(_REQUIREMENTS[system.framework]
                                + _DATABASE_REQUIREMENTS[database]),
        py_modules=json.dumps(["aaa_env_setup"] + (["aaa_script_setup"] if django else [])
                              + [module[:-3] for module in modules]),
        system_arguments=", ".join(arguments),
        imports="import os\n\n" if django else "",
        settings_line='os.environ.setdefault("DJANGO_SETTINGS_MODULE", SYSTEM.django_settings)\n'
        if django else "")
    templates = {"setup.py": _STARTER_SETUP, "aaa_env_setup.py": _STARTER_ENV_SETUP,
                 **_STARTERS[system.framework]}
    files = {string.Template(path).substitute(values): string.Template(text).substitute(values)
             for path, text in templates.items()}
    here = os.path.dirname(os.path.realpath(__file__))
    for module in modules:
        with open(os.path.join(here, module), encoding="utf-8") as file:
            files[module] = file.read()
    return files


# ---------------------------------------------------------------- checks

# Run by the installation's own Python as its user: what that process resolves.
_PROBE = """\
import json, os, sys
options = json.loads(sys.argv[1])
sys.path.insert(0, options.pop("repo"))
import stagetools
paths = options.pop("paths")
system = stagetools.get_actual_system_from_name(**options)
print(json.dumps({"system": system.as_dict(),
                  "writable": {path: os.access(path, os.W_OK) for path in paths}}))
"""


def _probe_actual_system(expected):
    """The actual system as the installation's Python, run as its user, resolves it."""
    import json
    import subprocess
    options = {"repo": str(expected.core_repo_dir), "core_repo": expected.core_repo,
               "core_app": expected.core_app, "framework": expected.framework,
               "server": expected.server,
               "paths": [str(expected.static_dir), str(expected.media_dir),
                         str(expected.run_dir)]}
    switch = {}
    if _process_user_and_group()[0] != expected.user:
        if os.geteuid() != 0:
            raise StagetoolsError(f"check {expected.name} runs the installation's Python as "
                                  f"its user: run it as root or as {expected.user}")
        switch = dict(user=expected.user, group=expected.group, extra_groups=[])
    env = {"PATH": "/usr/bin:/bin", "HOME": str(expected.base_dir), "LANG": "C.UTF-8"}
    try:
        result = subprocess.run(
            [str(expected.python_path), "-B", "-I", "-c", _PROBE, json.dumps(options)],
            capture_output=True, text=True, env=env, cwd="/", timeout=60, **switch)
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"cannot run: {error}"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit {result.returncode}"]
        return None, lines[-1]
    try:
        return json.loads(result.stdout), None
    except ValueError:
        return None, f"printed something else than the system: {result.stdout[:200]!r}"


def _unit_difference(path, text):
    try:
        with open(path, encoding="utf-8") as file:
            actual = file.read()
    except OSError as error:
        return error.strerror.lower()
    if actual == text:
        return None
    for number, (want, have) in enumerate(zip(text.splitlines() + [""],
                                              actual.splitlines() + [""]), 1):
        if want != have:
            return f"differs at line {number}: {have!r}"
    return "differs"


def check_installation(expected):
    """Compare an installation on disk with its expected system; change nothing.

    Returns ``(number of checks, differences)``, each difference a tuple
    ``(what, expected, actual)``.
    """
    import grp
    import pwd
    differences, checks = [], 0

    def fact(what, want, have):
        nonlocal checks
        checks += 1
        if want != have:
            differences.append((what, want, have))

    def owner(path):
        return _user_name(pwd, path.stat().st_uid)

    try:
        pwd.getpwnam(expected.user)
        user_exists = True
    except KeyError:
        user_exists = False
    fact("user", expected.user, expected.user if user_exists else "missing")
    try:
        grp.getgrnam(expected.group)
        group_exists = True
    except KeyError:
        group_exists = False
    fact("group", expected.group, expected.group if group_exists else "missing")
    base = expected.base_dir
    if base.is_dir():
        fact("base_dir owner", expected.user, owner(base))
        mode = base.stat().st_mode & 0o777
        fact("base_dir mode", "not world-writable",
             "not world-writable" if not mode & 0o002 else f"{mode:o}")
    else:
        fact("base_dir", "a directory", "missing")
    fact("python_path", "executable",
         "executable" if os.access(expected.python_path, os.X_OK) else "missing")
    fact("core_repo_dir", "a directory",
         "a directory" if expected.core_repo_dir.is_dir() else "missing")
    secret = expected.secret_key_path
    if secret.is_file():
        mode = secret.stat().st_mode & 0o777
        fact("secret_key_path mode", "no access for group and others",
             f"{mode:o}" if mode & 0o077 else "no access for group and others")
        fact("secret_key_path owner", expected.user, owner(secret))
    else:
        fact("secret_key_path", "a file", "missing")
    for path, text in expected.services.items():
        if path.startswith((_SYSTEM_UNIT_DIR, _TMPFILES_DIR)):
            fact(f"unit {path}", "as rendered", _unit_difference(path, text) or "as rendered")
    probe, problem = (_probe_actual_system(expected) if user_exists and group_exists
                      else (None, "its user or group is missing"))
    fact("actual system", "resolved by the installation's Python", problem
         or "resolved by the installation's Python")
    if probe is not None:
        wanted = expected.as_dict()
        for key, value in probe["system"].items():
            if key != "name_source":
                fact(f"actual {key}", wanted.get(key), value)
        for path, writable in probe["writable"].items():
            fact(f"{path}", "a directory writable by the user",
                 "a directory writable by the user" if os.path.isdir(path) and writable
                 else "missing" if not os.path.exists(path) else "not writable by the user")
    return checks, differences


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


def _parser():
    import argparse

    class _ArgumentParser(argparse.ArgumentParser):
        def error(self, message):  # bad options: our one-line message and exit code 2
            raise StagetoolsError(f"{message} (see {self.prog} --help)")

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
    new.add_argument("--database", choices=DATABASES, default="sqlite")
    new.add_argument("--core-repo", help="repo below src/ (default: the configuration)")
    new.add_argument("--core-app", help="main Python package (default: the core repo)")
    new.add_argument("--python", default=sys.executable,
                     help="the Python of the venv; its user must be able to run it "
                     "(default: this one)")
    adopt = commands.add_parser("adopt", help="adopt a Django project made by django-admin "
                                "startproject, in place; prints what is left to do by hand")
    adopt.add_argument("directory", help="the project's top directory, with manage.py")
    adopt.add_argument("--database", choices=DATABASES, default="sqlite")
    adopt.add_argument("--core-repo", help="the repo's name below src/ in installations, "
                       "their configuration (default: the directory's name)")
    adopt.add_argument("--core-app", help="the project's main app (default: the first of its "
                       "own apps in INSTALLED_APPS)")
    check = commands.add_parser("check", help="compare an installation on disk with its "
                                "expected system; exit 1 on any difference")
    _add_system_options(check)
    check.add_argument("--base-dir", help="base dir of the installation (default /home/NAME)")
    return parser


def _cmd_show(args):
    import json
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
    import shlex
    import subprocess
    print("+ " + shlex.join(str(part) for part in command), flush=True)
    try:
        returncode = subprocess.run(command, timeout=_STEP_TIMEOUT).returncode
    except subprocess.TimeoutExpired:
        raise StagetoolsError(f"{what} did not finish within {_STEP_TIMEOUT} s (command "
                              "above); check the network and the package index, then run "
                              "again") from None
    except OSError as error:
        returncode = error
    if returncode != 0:
        raise StagetoolsError(f"{what} failed (command above: {returncode}); fix its error "
                              "and run again")


def _cmd_new(args):
    import shlex
    from pathlib import Path
    directory = Path(args.directory).absolute()
    system = get_expected_system_from_name(directory.name, base_dir=directory,
                                           core_repo=args.core_repo, core_app=args.core_app,
                                           framework=args.framework)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise StagetoolsError(f"'{directory}' exists and is not an empty directory; choose a "
                              "new directory or remove this one")
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
        if system.framework == "django":
            manage = [system.python_path, system.manage_py_path]
            _run(manage + ["makemigrations", system.core_app], "making the first migration")
            _run(manage + ["migrate", "--no-input"], "migrating the database")
        else:
            _run([system.python_path, "-m", system.core_app], "creating the tables")
    except BaseException:  # leave nothing half-written: the directory as it was
        import shutil
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            for child in directory.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink()
        raise
    print(f"\nCreated {system.name} ({system.stage.label}, {args.database}) in {directory}. "
          "Serve it with one of:")
    for server in _SERVERS_OF[system.framework]:
        serving = get_expected_system_from_name(
            system.name, base_dir=directory, core_repo=system.core_repo,
            core_app=system.core_app, framework=system.framework, server=server)
        print("  " + shlex.join(_server_command(serving, "127.0.0.1:8000")))
    return 0


# Settings that stagetools derives from the installation: adopt removes them from settings.py.
_ADOPT_DERIVED_SETTINGS = ("SECRET_KEY", "DEBUG", "DATABASES", "ROOT_URLCONF", "WSGI_APPLICATION",
                           "STATIC_URL", "STATIC_ROOT", "MEDIA_URL", "MEDIA_ROOT")
# What a startproject wsgi.py or asgi.py holds besides its docstring: then it may go.
_ADOPT_ENTRY_POINT_CODE = {"import os", "from django.core.wsgi import get_wsgi_application",
                           "from django.core.asgi import get_asgi_application",
                           "application = get_wsgi_application()",
                           "application = get_asgi_application()"}


def _adopt_refuse(directory, rule, fix):
    raise StagetoolsError(f"cannot adopt '{directory}': {rule}; {fix}")


def _adopt_parse_settings(directory, source, package):
    """The settings module's syntax tree and its INSTALLED_APPS (a list of strings)."""
    import ast
    try:
        module = ast.parse(source)
    except SyntaxError as error:
        _adopt_refuse(directory, f"{package}/settings.py does not parse ({error.msg}, line "
                      f"{error.lineno})", "fix it so that Django can load it, then adopt")
    apps = []
    for statement in module.body:
        if isinstance(statement, ast.ImportFrom) and (statement.level or any(
                alias.name == "*" for alias in statement.names)):
            _adopt_refuse(directory, f"{package}/settings.py imports other settings (line "
                          f"{statement.lineno}), unlike startproject's",
                          "adopt by hand (see the README)")
        if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)
                and statement.targets[0].id == "INSTALLED_APPS"):
            try:
                apps = [app for app in ast.literal_eval(statement.value) if isinstance(app, str)]
            except (ValueError, TypeError, SyntaxError):
                apps = []
    return module, apps


def _adopt_settings(module, source, database):
    """settings.py rewritten to start from settings_defaults(): (text, removed, notes)."""
    import ast
    lines = source.splitlines(keepends=True)
    drop, removed, notes, replacements = set(), [], [], {}
    for statement in module.body:
        targets = statement.targets if isinstance(statement, ast.Assign) else \
            [statement.target] if isinstance(statement, ast.AnnAssign) else []
        names = [target.id for target in targets if isinstance(target, ast.Name)]
        if len(names) != 1 or len(targets) != 1:
            continue
        name, first, last = names[0], statement.lineno - 1, statement.end_lineno
        value = ast.get_source_segment(source, statement.value) if statement.value else ""
        if name == "ALLOWED_HOSTS" and isinstance(statement.value, ast.List):
            if statement.value.elts:  # the project's own domains, added to stagetools' own
                replacements[first] = (last, f"ALLOWED_HOSTS += {value}\n")
                continue
        elif name == "ALLOWED_HOSTS":
            notes.append(f"settings.py set ALLOWED_HOSTS = {value}; stagetools sets "
                         "localhost names: add your domains with ALLOWED_HOSTS += [...]")
        elif name not in _ADOPT_DERIVED_SETTINGS:
            continue
        if name == "DATABASES" and "sqlite3" not in value:
            notes.append("settings.py had a DATABASES other than SQLite: for PostgreSQL use "
                         'settings_defaults("postgresql") (peer authentication, see the README)')
        removed.append(name)
        while first > 0 and lines[first - 1].lstrip().startswith("#"):
            first -= 1  # the comment that explained the removed setting goes with it
        drop.update(range(first, last))
    head = 0
    for statement in module.body:  # after the leading imports, before the first setting
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            head = statement.end_lineno
        elif not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)):
            break
    result = []
    for number, line in enumerate(lines):
        if number in replacements:
            last, text = replacements[number]
            result.append(text)
            drop.update(range(number + 1, last))
        elif number not in drop:
            result.append(line)
        if number == head - 1:
            result.append(f'\nfrom stagetools_django import settings_defaults\n\n'
                          f'globals().update(settings_defaults("{database}"))\n')
    if head == 0:
        result.insert(0, f'from stagetools_django import settings_defaults\n\n'
                         f'globals().update(settings_defaults("{database}"))\n\n')
    text = "".join(result)
    while "\n\n\n\n" in text:
        text = text.replace("\n\n\n\n", "\n\n\n")
    return text, removed, notes


def _adopt_is_startproject_entry_point(path):
    """True if a wsgi.py/asgi.py does only what django-admin startproject's does."""
    import ast
    try:
        module = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError):
        return False
    for statement in module.body:
        code = ast.unparse(statement)
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # the docstring
        if code not in _ADOPT_ENTRY_POINT_CODE and not code.startswith(
                "os.environ.setdefault('DJANGO_SETTINGS_MODULE'"):
            return False
    return True


def _adopt_requirements(directory, database):
    """The requirements of the packaging file: the project's requirements.txt (plain
    requirement lines), then those of a starter that the project does not name."""
    import re

    def name(requirement):
        return re.split(r"[\s<>=!~;\[]", requirement)[0].lower()

    path = directory / "requirements.txt"
    lines = [line.split("#")[0].strip() for line in path.read_text(
        encoding="utf-8", errors="replace").splitlines()] if path.is_file() else []
    own = [line for line in lines if line and not line.startswith("-")]
    names = {name(requirement) for requirement in own}
    return own + [requirement for requirement in
                  _REQUIREMENTS["django"] + _DATABASE_REQUIREMENTS[database]
                  if name(requirement) not in names]


def _adopt_write(path, text):
    """Write a file whole or not at all: a temporary file renamed into place."""
    temporary = path.with_name(f".{path.name}.adopt-{os.getpid()}")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _adopt_apply(directory, package, settings_text, removed, manage_text, removable, files,
                 database):
    """Change the tree as _cmd_adopt decided, saying each step."""
    os.rename(directory / package, directory / DJANGO_PROJECT)
    print(f"renamed {package}/ to {DJANGO_PROJECT}/ (the settings package of every "
          "stagetools installation)")
    _adopt_write(directory / DJANGO_PROJECT / "settings.py", settings_text)
    print(f"rewrote {DJANGO_PROJECT}/settings.py: settings_defaults(\"{database}\") "
          f"first; removed {', '.join(removed) or 'nothing'} (stagetools derives them)")
    _adopt_write(directory / "manage.py", manage_text)
    print(f"replaced manage.py (it set DJANGO_SETTINGS_MODULE to {package}.settings) with "
          "one that calls stagetools_django.manage()")
    for path in removable:
        (directory / DJANGO_PROJECT / path.name).unlink()
    if removable:
        print(f"removed {', '.join(f'{DJANGO_PROJECT}/{p.name}' for p in removable)} (the "
              "entry points are stagetools_django:wsgi_application and :asgi_application)")
    for name, text in files.items():
        _adopt_write(directory / name, text)
    print(f"wrote {', '.join(files)}")


def _adopt_mentions(directory, package, modules, skipped):
    """'path:line' of each line of the project's Python files that names the old package
    or one of its modules; virtualenvs and hidden folders are not the project's."""
    import re
    name = re.escape(package)
    pattern = re.compile(rf"\b(import|from) {name}\b|\b{name}\.({'|'.join(modules)})\b")
    mentions = []
    for folder, subfolders, names in os.walk(directory):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith(".")
                               and name not in ("node_modules", "__pycache__")
                               and not os.path.exists(os.path.join(folder, name, "pyvenv.cfg")))
        for name in sorted(names):
            path = os.path.join(folder, name)
            if not name.endswith(".py") or os.path.relpath(path, directory) in skipped:
                continue
            with open(path, encoding="utf-8", errors="replace") as file:
                for number, line in enumerate(file, 1):
                    if pattern.search(line):
                        mentions.append(f"{os.path.relpath(path, directory)}:{number}")
    return mentions


def _cmd_adopt(args):
    """Adopt a Django project made by django-admin startproject, in place: the settings
    package becomes stagetools_project, the aaa modules, manage.py, the packaging file and
    both stagetools modules are written; it prints what is left to do by hand."""
    import json
    import re
    import string
    from pathlib import Path
    directory = Path(args.directory).absolute()
    manage_py = directory / "manage.py"
    if not manage_py.is_file():
        _adopt_refuse(directory, "it has no manage.py", "give the directory of your Django "
                      "project's manage.py (the top of the repo)")
    if (directory / DJANGO_PROJECT).exists():
        _adopt_refuse(directory, f"it has {DJANGO_PROJECT}/ already: it is adopted",
                      "nothing to adopt; run its tests with: python -m stagetools_django test")
    found = re.search(r"""DJANGO_SETTINGS_MODULE['"]\s*,\s*['"]([A-Za-z_][\w.]*)\.settings['"]""",
                      manage_py.read_text(encoding="utf-8", errors="replace"))
    if not found or "." in found.group(1):
        _adopt_refuse(directory, "its manage.py does not set DJANGO_SETTINGS_MODULE to "
                      "'PACKAGE.settings' as django-admin startproject writes it",
                      "adopt by hand: see the README, 'Adopting stagetools in an existing "
                      "Django project'")
    package = found.group(1)
    settings_py = directory / package / "settings.py"
    if not settings_py.is_file():
        _adopt_refuse(directory, f"manage.py names {package}.settings, but "
                      f"{package}/settings.py is not a file", "adopt by hand (see the README)")
    core_repo = args.core_repo or directory.name
    if not (core_repo.isidentifier() and core_repo.isascii()):
        _adopt_refuse(directory, f"its name {core_repo!r} is not a Python identifier, and "
                      "the repo's name below src/ is the configuration of its installations",
                      "give --core-repo NAME (letters, digits, _), for example --core-repo shop")
    try:
        source = settings_py.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        _adopt_refuse(directory, f"cannot read {package}/settings.py ({error})",
                      "make it a readable UTF-8 file")
    module, apps = _adopt_parse_settings(directory, source, package)
    local_apps = [app.split(".")[0] for app in apps
                  if (directory / app.split(".")[0]).is_dir() and app.split(".")[0] != package]
    core_app = args.core_app or (local_apps[0] if local_apps else core_repo)
    system = get_expected_system_from_name(f"{core_repo.lower()}_dev", core_repo=core_repo,
                                           core_app=core_app)
    if not os.access(directory, os.W_OK) or not os.access(directory / package, os.W_OK):
        _adopt_refuse(directory, f"this user cannot write to it or to {package}/",
                      "run adopt as the user who owns the project")
    try:
        starter = _render_starter(system, args.database)
    except OSError as error:
        raise StagetoolsError(f"cannot read stagetools_django.py next to stagetools.py "
                              f"({error}): adopt copies both into the project") from None
    written = ["aaa_env_setup.py", "aaa_script_setup.py", "stagetools.py",
               "stagetools_django.py"]
    in_the_way = [name for name in written if (directory / name).exists()]
    if in_the_way:
        _adopt_refuse(directory, f"it has {', '.join(in_the_way)} already, which adopt "
                      "would write", "adopt a project that has none of them, or finish by "
                      "hand (see the README)")
    packaging = [name for name in ("setup.py", "pyproject.toml", "setup.cfg")
                 if (directory / name).exists()]
    py_modules = json.loads(re.search(r"py_modules=(\[.*?\])", starter["setup.py"]).group(1))
    files = {name: starter[name] for name in written}
    if not packaging:
        requirements = _adopt_requirements(directory, args.database)
        files["setup.py"] = string.Template(_STARTER_SETUP).substitute(
            core_repo=core_repo, py_modules=json.dumps(py_modules),
            requirements=json.dumps(requirements))
    settings_text, removed, notes = _adopt_settings(module, source, args.database)
    entry_points = [directory / package / name for name in ("wsgi.py", "asgi.py")
                    if (directory / package / name).exists()]
    removable = [path for path in entry_points if _adopt_is_startproject_entry_point(path)]
    modules = sorted(re.escape(os.path.splitext(name)[0]) for name in
                     os.listdir(directory / package) if not name.startswith((".", "__")))

    # Everything is known and checked: now change the tree.
    try:
        _adopt_apply(directory, package, settings_text, removed, starter["manage.py"],
                     removable, files, args.database)
    except OSError as error:
        raise StagetoolsError(f"adopting '{directory}' stopped: {error}; every file is whole, "
                              "but the steps printed above are all that was done: undo "
                              "them (git checkout) or finish by hand") from None

    todo = list(notes)
    for path in sorted(set(entry_points) - set(removable)):
        todo.append(f"{DJANGO_PROJECT}/{path.name} does more than startproject's: move what "
                    "it adds into settings or middleware, then delete it (the entry points "
                    "are stagetools_django:wsgi_application and :asgi_application)")
    if packaging:
        todo.append(f"add to your {packaging[0]}: py_modules {py_modules} and the packages "
                    f"{DJANGO_PROJECT} and {core_app} (the README shows a whole setup.py)")
    mentions = _adopt_mentions(directory, package, modules, set(written))
    if mentions:
        todo.append(f"these lines name {package}, which is {DJANGO_PROJECT} now: "
                    f"{', '.join(mentions)}")
    if core_app not in [app.split(".")[0] for app in apps]:
        todo.append(f"the core app {core_app!r} is not in INSTALLED_APPS: give --core-app, or "
                    "edit core_app in aaa_env_setup.py")
    if (directory / "db.sqlite3").exists():
        todo.append("your data stays in db.sqlite3; an installation uses its own database "
                    f"({system.database_sqlite_path.name} in the virtualenv's directory): "
                    "copy it there if you want the data")
    todo.append(f"make a virtualenv named like an installation and install the repo into it: "
                f"python3 -m venv ~/{system.name} && ~/{system.name}/bin/pip install -e "
                f"{directory}")
    todo.append(f"then, from anywhere: ~/{system.name}/bin/python -m stagetools_django "
                f"migrate (and test, runserver, ...); serve with ~/{system.name}/bin/uvicorn "
                "stagetools_django:asgi_application")
    print("\nLeft to do by hand:")
    for number, item in enumerate(todo, 1):
        print(f"  {number}. {item}")
    return 0


def _cmd_check(args):
    import json
    if not args.name:
        raise StagetoolsError("check needs the installation's name: stagetools check shop_prod")
    expected = get_expected_system_from_name(
        args.name, base_dir=args.base_dir, core_repo=args.core_repo, core_app=args.core_app,
        framework=args.framework, server=args.server)
    checks, differences = check_installation(expected)
    if args.json:
        print(json.dumps({"name": expected.name, "ok": not differences, "checks": checks,
                          "differences": [{"what": what, "expected": want, "actual": have}
                                          for what, want, have in differences]}, indent=2))
    elif not differences:
        print(f"{expected.name}: all {checks} checks hold")
    else:
        print(f"{expected.name}: {len(differences)} of {checks} checks differ")
        rows = [("what", "expected", "actual")] + [tuple(map(str, d)) for d in differences]
        widths = [max(len(row[column]) for row in rows) for column in range(2)]
        for what, want, have in rows:
            print(f"{what:<{widths[0]}}  {want:<{widths[1]}}  {have}")
    return 1 if differences else 0


def main(argv=None):
    """The command line: returns the exit code (0 fine, 1 a difference, 2 bad input)."""
    try:
        args = _parser().parse_args(argv)
        if args.command in ("new", "check") and os.name != "posix":
            raise StagetoolsError(f"{args.command} works on Linux installations (users, "
                                  "venvs with bin/, systemd): run it on the server")
        return {"show": _cmd_show, "new": _cmd_new, "adopt": _cmd_adopt,
                "check": _cmd_check}[args.command](args)
    except StagetoolsError as error:
        print(f"stagetools: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `stagetools show | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
