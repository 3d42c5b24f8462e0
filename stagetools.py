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

The file reads top to bottom: constants and the naming rules, errors, the
System, resolvers and the secret key; then the rest, which a running installation
never needs and Python compiles on first use (see _load_rest): root's record of a
deployment, jobs, workers and backups, renderers, checks, the command line, and
last the templates of every file stagetools writes or renders.
"""

# Only os and sys at import time (and _thread, built in and loaded before any module):
# everything else is imported where it is used, so that importing stagetools and resolving
# a system costs next to nothing (bench/).
import _thread
import os
import sys

__version__ = "1.0.0"
__all__ = sorted([
    "DATABASES", "DEBUG_STAGES", "ENV_NAME", "FRAMEWORKS", "NAME_MAX_LENGTH", "SERVERS",
    "STAGES", "STAGE_DEV", "STAGE_INT", "STAGE_PROD", "STAGE_QUAL",
    "Stage", "StagetoolsError", "System",
    "get_actual_system_from_name", "get_expected_system_from_name",
    "check_installation", "database_url", "django_database", "flask_config", "main",
    "parse_name", "read_secret_key", "render_starter", "starlette_config",
])


# ---------------------------------------------------------------- constants and the naming rules


class Stage(int):
    """The stage of an installation, an int: ``Stage.PROD`` (0), ``QUAL`` (1), ``INT`` (2)
    and ``DEV`` (3)."""

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
_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_EXAMPLE_NAME = "shop_prod"
_USE_NAME_CHARACTERS = "use a-z, 0-9 and _ only"
# Characters a base dir may have: none of them means anything to systemd (% $ space \)
# or to nginx (; { } $ quotes), so a base dir is written into units and sites as it is.
_PATH_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                             "0123456789/._-")
# Containers have no virtualenv named like the installation: they set this.
ENV_NAME = "STAGETOOLS_NAME"
DJANGO_PROJECT = "stagetools_project"

# The frameworks: the servers each runs on (the default first) and what its repo installs.
FRAMEWORKS = {
    "django": {"servers": ("gunicorn", "uvicorn", "hypercorn"),
               "requirements": ["Django>=4.2", "gunicorn", "uvicorn", "hypercorn"]},
    "flask": {"servers": ("gunicorn",), "requirements": ["Flask", "gunicorn"]},
    "starlette": {"servers": ("uvicorn", "hypercorn"),
                  "requirements": ["starlette", "itsdangerous", "uvicorn", "hypercorn"]},
}
# The servers: the interface they serve, how systemd knows they are ready, and how each
# is told to listen on systemd's socket (fd 3) or on a host and port.
SERVERS = {
    "gunicorn": {"interface": "wsgi", "service_type": "notify",  # it tells systemd itself
                 "on_socket": [],  # it takes LISTEN_FDS by itself
                 "on_port": ["--bind", "{host}:{port}"],
                 # --threads above 1 is gunicorn's gthread worker
                 "capacity": ["--workers", "{workers}", "--threads", "{threads}"]},
    "uvicorn": {"interface": "asgi", "service_type": "exec",
                "on_socket": ["--fd", "3"], "on_port": ["--host", "{host}", "--port", "{port}"],
                "capacity": ["--workers", "{workers}"]},
    "hypercorn": {"interface": "asgi", "service_type": "exec",
                  "on_socket": ["--bind", "fd://3"], "on_port": ["--bind", "{host}:{port}"],
                  "capacity": ["--workers", "{workers}"]},
}
# The databases: Django's engine for each and what a repo on it installs.
DATABASES = {
    "sqlite": {"django_engine": "django.db.backends.sqlite3", "requirements": []},
    "postgresql": {"django_engine": "django.db.backends.postgresql",
                   "requirements": ["psycopg[binary]"]},
}
# Capacity by stage, on a host of `cores` CPUs (os.cpu_count()). PROD and QUAL take
# gunicorn's rule, 2 * cores + 1 worker processes (while one waits on the database another
# computes), at most 12 (gunicorn's docs: 4 to 12 serve thousands of requests a second, and a
# host runs several installations); gunicorn's workers get threads, so a slow request (an
# upload, a slow query) holds up no other. DEV and INT serve a few people: one worker, and
# they stop after idle_stop seconds without a request (0: never), to start again on the next.
# The README's capacity section has the measurements behind these numbers.
_CAPACITY = {  # stage: workers per core, plus, at most; threads; idle_stop
    STAGE_PROD: {"workers": (2, 1, 12), "threads": 4, "idle_stop": 0},
    STAGE_QUAL: {"workers": (2, 1, 12), "threads": 4, "idle_stop": 0},
    STAGE_INT: {"workers": (0, 1, 1), "threads": 4, "idle_stop": 900},
    STAGE_DEV: {"workers": (0, 1, 1), "threads": 4, "idle_stop": 900},
}
_MAX_WORKERS = _MAX_THREADS = 64
_MAX_IDLE_STOP = 86400  # a day


def _declared_number(key, largest):
    """The validator of a declared count: text -> int in 1..largest."""
    def valid(value):
        if not (value.isascii() and value.isdigit() and 1 <= int(value) <= largest):
            raise StagetoolsError(f"{key} = {value!r}", f"not a whole number from 1 to "
                                  f"{largest}", f"for example {key} = 4")
        return int(value)
    return valid


def _declared_idle_stop(value):
    """idle_stop = seconds without a request before a DEV or INT stops, or never (0, as the
    field says it): int, 0 never."""
    if value in ("never", "0"):
        return 0
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= _MAX_IDLE_STOP):
        raise StagetoolsError(f"idle_stop = {value!r}", "neither never nor seconds from 1 to "
                              f"{_MAX_IDLE_STOP}", "for example idle_stop = 900")
    return int(value)


# What a repo may declare in its stagetools.ini: each key's table of choices, or the
# function that makes its value of the text (refusing what is not valid).
_DECLARED = {"framework": FRAMEWORKS, "server": SERVERS, "database": DATABASES,
             "core_app": lambda text: _valid_module("core_app", text),
             "host_names": lambda text: _valid_host_names(text.split()),
             "workers": _declared_number("workers", _MAX_WORKERS),
             "threads": _declared_number("threads", _MAX_THREADS),
             "idle_stop": _declared_idle_stop}
# What runs besides the web server, declared as ``job NAME = COMMAND @ CALENDAR``,
# ``worker NAME = COMMAND`` and ``backup = keep COUNT @ CALENDAR`` (or ``off``): only the
# deploy side uses them (units, show, check). They are kept as declared and validated where
# they are used (_scheduled), so that no installation's process pays for them at its start.
_LATER_KEYS = ("job", "worker", "backup")

# The file of a repo that declares what the name cannot say, read by the deploy side
# (show --expected, check) and by the installation itself.
DECLARATION_FILE = "stagetools.ini"
_DECLARATION_MAX_BYTES = 65536
_DECLARATION_EXAMPLE = "[stagetools] then framework = django"
_SECRET_KEY_MIN_LENGTH = 50
_SECRET_KEY_MAX_BYTES = 4096  # a key is about 90; more is not a key
_SYSTEM_UNIT_DIR = "/etc/systemd/system"
_NGINX_DIR = "/etc/nginx/sites-available"
# The host-wide nginx site that answers names no installation serves: never a name (a dash).
_DEFAULT_SITE = "stagetools-default"
# HTTP-01 challenges: certbot writes them, nginx serves them, no installation can touch them.
_ACME_CHALLENGE_DIR = "/var/lib/stagetools/acme"
_CERTIFICATE_DIR = "/etc/letsencrypt/live"  # certbot's, one directory per --cert-name
_HOST_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")
_CERTIFICATE_MAX_BYTES = 1 << 16  # a chain of a few certificates is ~5 KiB
# certbot renews 30 days before a 90-day certificate expires (a third of shorter ones' life):
# fewer days left means renewal has failed for a while.
_CERTIFICATE_DAYS_LEFT = 14
# The group of the web server: it alone, besides root, may connect to the sockets.
_WEB_GROUP = "www-data"
_STEP_TIMEOUT = 1800  # seconds for one step of `new`: pip may download for a while
_PROBE_OUTPUT_LIMIT = 1 << 20  # bytes an installation may print to `check`; an answer is ~10 KiB
_PROBE_TIMEOUT = 60  # seconds
# Root's record of what a deploy tool deployed, a file per installation (see _read_record):
# `check` takes the declaration from there, never from the checkout its user could change.
_RECORD_DIR = "/var/lib/stagetools/deployed"
# Beyond one host: root's file per installation that names the host of its database, written
# by the deploy from its inventory (see _read_topology). Without one, the database is local.
_TOPOLOGY_DIR = "/var/lib/stagetools/topology"
# PostgreSQL on this host: Debian's libpq default; psycopg wheels were built with /tmp
# (psycopg2#521).
_DATABASE_SOCKET_DIR = "/var/run/postgresql"
_TOPOLOGY_MAX_BYTES = 4096
_DATABASE_PORT = 5432
# libpq's own names for them in ~/.postgresql: the deployment's CA that signed the database
# host's certificate, the installation's client certificate and its key.
_DATABASE_TLS_FILES = {"sslrootcert": "root.crt", "sslcert": "postgresql.crt",
                       "sslkey": "postgresql.key"}
# Beyond one host, uploads live on the database host: the app hosts write them by SFTP as
# the installation's account there (chrooted to its home, so media/ is /media there), with
# the key and that host's known key in <base_dir>/.ssh, OpenSSH's names.
_MEDIA_SSH_DIR = ".ssh"
_MEDIA_SSH_FILES = {"key": "id_ed25519", "known_hosts": "known_hosts"}
_MEDIA_SFTP_ROOT = "/media"
_RECORD_MAX_BYTES = 1 << 20
_COMMIT_CHARACTERS = frozenset("0123456789abcdef")


def parse_name(name):
    """Split an installation name into (configuration, stage_name, stage), or refuse it."""
    def refuse(rule, fix=f"for example {_EXAMPLE_NAME!r}"):
        raise StagetoolsError(f"invalid installation name {name!r}", rule, fix)

    if not isinstance(name, str):
        refuse("a name is a string")
    if not name:
        refuse("the name is empty", f"give <configuration>_<stage_name>, for example "
               f"{_EXAMPLE_NAME!r}")
    if len(name) > NAME_MAX_LENGTH:
        refuse(f"it has {len(name)} characters, more than the {NAME_MAX_LENGTH} a Unix user "
               "name allows", "shorten the configuration or the stage name")
    problem = _name_character_problem(name)
    if problem:
        refuse(*problem)
    if name.startswith("pg_"):
        refuse("PostgreSQL reserves role names that start with 'pg_'",
               f"for example {'my' + name!r}")
    configuration, underscore, stage_name = name.rpartition("_")
    if not underscore:
        refuse("it has no underscore between configuration and stage name",
               f"for example {name + '_dev'!r}")
    if not stage_name:
        refuse("the stage name after the last underscore is empty",
               f"for example {name + 'prod'!r}")
    if not configuration.strip("_"):
        refuse("the configuration before the last underscore is empty",
               f"for example {'shop_' + stage_name!r}")
    if not name[0].isalpha():
        refuse("it must start with a letter")
    stage = _STAGE_BY_LETTER.get(stage_name[0])
    if stage is None:
        refuse(f"the stage name {stage_name!r} does not start with a stage letter "
               "(p prod, q qual, i int, d dev)", f"for example {configuration + '_prod'!r}")
    return configuration, stage_name, stage


def _name_character_problem(name):
    """(rule, fix) of a name with characters a name may not have, or None."""
    if not name.isascii():
        return ("it has non-ASCII characters; a name is also a Unix user and a PostgreSQL "
                "role", _USE_NAME_CHARACTERS)
    if any(char.isspace() for char in name):
        return "it has whitespace", _USE_NAME_CHARACTERS
    if any(char in "/\\.:" for char in name):
        return "it has path characters (/ \\ . :)", _USE_NAME_CHARACTERS
    if name.lower() != name:
        return "it has uppercase letters; Unix user names are lowercase", f"use {name.lower()!r}"
    bad = sorted(set(name) - _NAME_CHARACTERS)
    if bad:
        return f"it has the characters {''.join(bad)!r}", _USE_NAME_CHARACTERS
    return None


def _valid_identifier(kind, value, name):
    import keyword
    if not (isinstance(value, str) and value.isidentifier() and value.isascii()
            and not keyword.iskeyword(value)):
        raise StagetoolsError(f"invalid {kind} {value!r} of the installation {name!r}",
                              "it must be a Python identifier (a-z, A-Z, 0-9, _; not a "
                              "keyword)", f"give another {kind}, for example 'shop'")
    return value


def _valid_module(kind, value):
    """A Python module path as ``python -m`` and INSTALLED_APPS take it: identifiers joined
    by dots ('books', 'mysite.articles'); or a refusal."""
    import keyword
    if not (isinstance(value, str) and value.isascii() and all(
            part.isidentifier() and not keyword.iskeyword(part) for part in value.split("."))):
        raise StagetoolsError(f"invalid {kind} {value!r}", "it must be a Python module: "
                              "identifiers (a-z, A-Z, 0-9, _; not a keyword) joined by dots",
                              f"for example {kind} = books")
    return value


def _valid_base_dir(base_dir, name):
    """The base dir as it is written into units and sites, or a refusal."""
    base_dir = os.fspath(base_dir)
    if os.name != "posix":  # Windows is for development: nothing there is rendered for use
        rule = None if os.path.isabs(base_dir) else "it must be an absolute path"
    elif set(base_dir) - _PATH_CHARACTERS:
        rule = (f"it has the characters {''.join(sorted(set(base_dir) - _PATH_CHARACTERS))!r}; "
                "a base dir has a-z, A-Z, 0-9, / . _ - only, as it is written into units and "
                "the nginx site")
    elif not base_dir.startswith("/"):
        rule = "it must be an absolute path"
    elif base_dir == "/":
        rule = "it is the root directory"
    elif base_dir != os.path.normpath(base_dir) or base_dir.startswith("//"):
        rule = f"it is not normalised: write {os.path.normpath(base_dir).replace('//', '/')!r}"
    else:
        return base_dir
    raise StagetoolsError(f"invalid base_dir {base_dir!r}", rule, f"for example '/home/{name}'")


def _valid_host_names(names, kind="host name"):
    """Public host names as nginx and certbot are given them: a tuple of lowercase DNS
    names of two labels or more, each label a-z, 0-9 and inner dashes; or a refusal."""
    names = tuple(names)
    if not names:
        raise StagetoolsError(f"no {kind}s", "give at least one", "or leave host_names out")
    for name in names:
        labels = name.split(".")
        bad = sorted(set(name) - _HOST_NAME_CHARACTERS)
        if not name.isascii():
            rule, fix = "it is not ASCII", "give its IDNA form ('xn--...')"
        elif name.lower() != name:
            rule, fix = "it has uppercase letters", f"write {name.lower()!r}"
        elif bad:
            rule, fix = f"it has the characters {''.join(bad)!r}", "use a-z, 0-9, - and ."
        elif len(labels) < 2:
            rule, fix = "it has no dot", "give the public name, e.g. 'shop.example.com'"
        elif labels[-1] == "localhost":  # NAME-with-dashes.localhost: every site's local name
            rule, fix = "it is a local name (.localhost)", "give the public name, e.g. " \
                "'shop.example.com'; each site answers NAME-with-dashes.localhost by itself"
        elif not all(labels):
            rule, fix = "it has an empty label", "give the name without a trailing dot"
        elif len(name) > 253 or max(len(label) for label in labels) > 63:
            rule, fix = "a label is longer than 63 characters, or the name than 253", \
                "give the name as DNS knows it"
        elif any(label[0] == "-" or label[-1] == "-" for label in labels):
            rule, fix = "a label starts or ends with -", "give the name as DNS knows it"
        elif labels[-1].isdigit():
            rule, fix = "it is an IP address", "give a host name; certificates are for names"
        elif names.count(name) > 1:
            rule, fix = "it is given twice", "give each name once"
        else:
            continue
        raise StagetoolsError(f"invalid {kind} {name!r}", rule, fix)
    return names


def _declared_host_names(given, declared, repo_dir):
    """The declared host names; given ones only repeat them (in any order): the installation
    itself reads the declaration, for Django's ALLOWED_HOSTS."""
    declared_names = declared.get("host_names", ())
    if given is not None and set(_valid_host_names(given)) != set(declared_names):
        raise StagetoolsError(
            f"host names {' '.join(given)}", f"the repo declares "
            f"{'host_names = ' + ' '.join(declared_names) if declared_names else 'none'} in "
            f"'{os.path.join(repo_dir, DECLARATION_FILE)}'", "declare them there (the "
            "installation reads them too), then give the same or none")
    return declared_names


def _valid_choice(kind, value, choices):
    if value not in choices:
        raise StagetoolsError(f"invalid {kind} {value!r}", f"choose one of {', '.join(choices)}")
    return value


def _chosen(kind, given, declared, default, repo_dir, choices, label=None):
    """A choice: given or declared (the two may not disagree), else the default."""
    path = os.path.join(repo_dir, DECLARATION_FILE)
    if given is not None and kind in declared and given != declared[kind]:
        raise StagetoolsError(f"{kind} {given!r}", f"the repo declares {kind} = "
                              f"{declared[kind]} in '{path}'",
                              f"leave the {kind} out: the declaration says it")
    if given is None and declared.get(kind, default) not in choices:  # server = uvicorn, Flask
        raise _BadDeclaration(f"the declaration '{path}'", f"{kind} = {declared[kind]} is not "
                              f"a {label or kind}", f"choose one of {', '.join(choices)}")
    return _valid_choice(label or kind, given or declared.get(kind) or default, choices)


def read_declaration(repo_dir, name=None, path=None):
    """The choices a repo declares in its ``stagetools.ini`` (or the file at ``path``) for
    the installation ``name``: ``{key: value}``, empty without one. The file is looked at
    before it is read (no link, FIFO or device); see ``parse_declaration``."""
    path = path or os.path.join(repo_dir, DECLARATION_FILE)
    if not os.path.lexists(path):  # cheaper than the exception below, at every start
        return {}
    given = f"the declaration '{path}'"
    try:
        text = _read_regular_file(path, given, _DECLARATION_MAX_BYTES,
                                  "make it a file of the repo (see the README)")
    except FileNotFoundError:
        return {}
    except StagetoolsError as error:
        raise _BadDeclaration(error.given, error.rule, error.fix) from None
    return parse_declaration(text, name, given)


def parse_declaration(text, name=None, given="the declaration"):
    """The choices of a declaration's text for the installation ``name``: ``{key: value}``.

    ``[stagetools]`` holds the choices of every installation of the repo; a section named
    after a stage (``[prod]``, ``[qual]``, ``[int]``, ``[dev]``) those of its stage; one
    named after an installation (``[shop_dev]``) its own. The narrower section wins. A
    strict subset of INI (configparser reads it too): ``key = value`` lines, ``#`` or
    ``;`` comments. Parsed here, because every process start reads it and configparser's
    import alone costs more than resolving. ``given`` names the text in a refusal."""
    sections, section = {}, None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = _declaration_section(line[1:-1].strip(), sections, given, number)
            sections[section] = {}
        elif section is None or "=" not in line:
            raise _BadDeclaration(given, f"line {number} is not 'key = value' in a section",
                                  f"for example: {_DECLARATION_EXAMPLE}")
        else:
            key, value = line.split("=", 1)
            key, value = " ".join(key.split()), value.strip()  # "job  x" is "job x"
            sections[section][key] = _declared_value(key, value, sections[section], given,
                                                     number)
    declared = dict(sections.get("stagetools", {}))
    if name is not None:
        declared.update(sections.get(parse_name(name)[2].label, {}))
        declared.update(sections.get(name, {}))
    return declared


def _declaration_section(section, sections, given, number):
    """A section's name, or the refusal of one that is unknown or there twice."""
    if section in sections or not (section == "stagetools" or section in _STAGE_LABELS
                                   or _name_problem(section) is None):
        raise _BadDeclaration(given, f"line {number}: the section [{section}] is "
                              f"{'there twice' if section in sections else 'unknown'}",
                              "use [stagetools], [prod], [qual], [int], [dev] or [NAME] of an "
                              "installation, once each")
    return section


def _declared_value(key, value, section, given, number):
    """The value of ``key = value`` on line ``number``: one of the key's choices, or what its
    validator makes of the text; or the refusal."""
    if key.partition(" ")[0] in _LATER_KEYS and key not in section:
        return (given, number, value)  # validated where it is used: _scheduled
    if key not in _DECLARED or key in section:
        raise _BadDeclaration(given, f"line {number}: {key!r} is "
                              f"{'declared twice' if key in section else 'no choice'}",
                              f"declare each of {', '.join(_DECLARED)}, job NAME, worker "
                              "NAME and backup once per section")
    if callable(_DECLARED[key]):
        try:
            return _DECLARED[key](value)
        except StagetoolsError as error:
            raise _BadDeclaration(given, f"line {number}: {error.given}: {error.rule}",
                                  error.fix) from None
    if value not in _DECLARED[key]:
        raise _BadDeclaration(given, f"line {number}: {key} = {value!r} is none of the "
                              "choices", f"choose one of {', '.join(_DECLARED[key])}")
    return value


# ---------------------------------------------------------------- errors


class StagetoolsError(ValueError):
    """Every refusal of stagetools: what was given, the rule it breaks, and the fix."""

    def __init__(self, given, rule, fix=None):
        super().__init__(given, rule, fix)
        self.given, self.rule, self.fix = given, rule, fix

    def __str__(self):
        return f"{self.given}: {self.rule}" + (f"; {self.fix}" if self.fix else "")


class _CouldNotCheck(StagetoolsError):
    """The installation gave no usable answer: exit code 3, not "bad input"."""


class _BadDeclaration(StagetoolsError):
    """A repo's stagetools.ini that cannot be read: bad input to show, an installation
    that could not be checked to check."""


# ---------------------------------------------------------------- the system


class System:
    """An installation: everything that follows from its name. Immutable.

    Its attributes are the keys of ``System.FIELDS``, in order, each with what it
    means. Those ending in ``_dir`` or ``_path`` are ``pathlib.Path`` objects, made on
    first read (no pathlib import before). ``user`` and ``group`` given as None are
    this process's, looked up on first read: pwd and grp cost more than the rest of
    resolving, and settings never need them. Holds no secret: the secret key stays in
    the file at ``secret_key_path``.
    """

    FIELDS = {
        # identity
        "name": "the installation's name, e.g. 'shop_prod'",
        "name_source": "where the name came from: 'argument', 'virtualenv /home/shop_prod', ...",
        "user": "the Unix user the installation runs as",
        "group": "the Unix group of that user",
        "container": "the name with - for _, for host and container names: 'shop-prod'",
        "configuration": "the name before its last underscore: 'shop'",
        "stage_name": "the name after its last underscore: 'prod', 'p2', 'dsven'",
        "stage": "the Stage: the stage name's first letter",
        "core_repo": "the repo below src/: the configuration unless given",
        "core_app": "the main Python package: the core repo unless given",
        "is_debug": "whether DEBUG is on: DEV and INT only",
        "framework": "'django', 'flask' or 'starlette'",
        "server": "'gunicorn', 'uvicorn' or 'hypercorn'",
        "database": "'sqlite' or 'postgresql'",
        "host_names": "the public host names of its site, as declared: ['shop.example.com']",
        "is_https": "whether its site serves HTTPS: QUAL and PROD with host names",
        # paths
        "base_dir": "the installation's directory, its virtualenv: /home/shop_prod",
        "venv_dir": "the virtualenv: the base dir (for your code; stagetools reads base_dir)",
        "bin_dir": "the virtualenv's bin/",
        "lib_dir": "the virtualenv's lib/ (for your code)",
        "src_dir": "src/, where the repos are",
        "python_path": "the virtualenv's Python",
        "pip_path": "the virtualenv's pip",
        "core_repo_dir": "the repo: src/<core_repo>",
        "releases_dir": "where a deploy builds the next release beside the running one, and "
                        "keeps the previous one: <base_dir>/releases",
        "static_url": "the URL prefix of static files: 'static/'",
        "static_dir": "where collectstatic puts static files; nginx serves them",
        "media_url": "the URL prefix of uploads: 'media/'",
        "media_dir": "where uploads go; nginx serves them to the web, nobody else reads them",
        "backups_dir": "where backups go, the user's alone (0700, files 0600): <base_dir>/backups",
        "run_dir": "/run/<name>, the directory of the socket: root's, made by systemd",
        "socket_path": "the Unix socket nginx connects to, held by systemd",
        "secret_key_path": "the file of the secret key, the user's alone",
        "certificate_dir": "certbot's directory of its certificate (fullchain.pem, privkey.pem)"
                           ": /etc/letsencrypt/live/<name>; used when is_https",
        "acme_challenge_dir": "where certbot puts HTTP-01 challenges and nginx serves them, "
                              "outside every installation: /var/lib/stagetools/acme",
        # entry points
        "application_name": "the entry points' attribute name: 'application' (for your code)",
        "asgi_module": "the module of the ASGI entry point (for your code)",
        "asgi_application": "the ASGI entry point: 'module:attribute'",
        "wsgi_module": "the module of the WSGI entry point (for your code)",
        "wsgi_application": "the WSGI entry point: 'module:attribute'",
        # Django
        "django_project": "the settings package: 'stagetools_project' (for your code)",
        "django_settings": "DJANGO_SETTINGS_MODULE",
        "django_rooturls": "ROOT_URLCONF",
        "django_wsgi_application": "WSGI_APPLICATION, in Django's dotted form",
        "manage_py_path": "the repo's manage.py",
        # database
        "database_name": "the PostgreSQL database: the name",
        "database_user": "the PostgreSQL role: the name",
        "database_sqlite_path": "the SQLite database: <base_dir>/<core_repo>.sqlite",
        "database_socket_dir": "PostgreSQL's socket directory",
        "database_host": "the host of its PostgreSQL when another host serves it, reached "
                         "by TLS with a client certificate ('': this host's socket); root's "
                         "file /var/lib/stagetools/topology/<name>.json says it",
        "database_tls_dir": "<base_dir>/.postgresql: root.crt (the deployment's CA), "
                            "postgresql.crt and postgresql.key (its client certificate)",
        # capacity
        "workers": "worker processes of the server: by stage and the host's cores, or declared",
        "threads": "threads per worker (gunicorn's gthread; 1 for uvicorn and hypercorn)",
        "idle_stop": "seconds without a request before a DEV or INT stops (0: never)",
        # what runs besides the web server (declared; see _scheduled)
        "jobs": "the scheduled jobs: {name: {command, calendar, service, timer}}",
        "background_workers": "long-running processes besides the server (queue workers): "
                              "{name: {command, service}}",
        "backup": "the scheduled backup, QUAL and PROD unless declared: {calendar, keep_count, "
                  "keep_days, service, timer}; None: none",
    }
    # Looked up or validated on first read, not at start-up (see _complete).
    _LATER_FIELDS = ("user", "group", "jobs", "background_workers", "backup")

    def __init__(self, **values):
        if set(values) != set(self.FIELDS):
            raise TypeError(f"System needs exactly the fields {', '.join(self.FIELDS)}")
        object.__setattr__(self, "_values", values)

    def _complete(self, name=None):
        """The values, with those read on first use filled in: all, or the field ``name``'s."""
        values = self._values
        if values["user"] is None and name in (None, "user", "group"):
            values["user"], values["group"] = _process_user_and_group()
        if isinstance(values["jobs"], _Later) and name not in ("user", "group"):
            values.update(_load_rest()["_scheduled"](values, values["jobs"]))  # as declared
        return values

    def __getattr__(self, name):
        if name not in self.FIELDS:  # also copy's and pickle's hooks, before _values exists
            raise AttributeError(f"System has no attribute {name!r}")
        value = (self._complete(name) if name in self._LATER_FIELDS else self._values)[name]
        if name.endswith(("_dir", "_path")):
            from pathlib import Path
            value = self.__dict__[name] = Path(value)  # read once
        return value

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self.FIELDS))

    def __setattr__(self, name, value):
        raise AttributeError(f"System is immutable: cannot set {name!r}")

    __delattr__ = __setattr__

    def __eq__(self, other):
        return isinstance(other, System) and self._complete() == other._complete()

    def __hash__(self):
        values = self._complete()
        return hash(tuple(values[name] for name in self.FIELDS if not isinstance(
            values[name], (dict, type(None)))))

    def __getstate__(self):
        return self._complete()

    def __setstate__(self, values):
        object.__setattr__(self, "_values", values)

    def __repr__(self):
        return (f"System(name={self.name!r}, stage={self.stage.label}, user={self.user!r}, "
                f"base_dir={self._values['base_dir']!r}, source={self.name_source!r})")

    @property
    def services(self):
        """The files an installation needs outside its repo: absolute path -> text."""
        return _load_rest()["_render_services"](self)

    def as_dict(self):
        """A JSON-ready dict: paths as strings, the stage as 'prod', 'qual', 'int' or 'dev'."""
        values = self._complete()
        result = {name: values[name] for name in self.FIELDS}
        result["stage"] = self.stage.label
        result["host_names"] = list(values["host_names"])
        result["services"] = self.services
        return result

    def differences(self, other, ignore=("name_source",)):
        """The fields where ``other`` differs: a list of (field, this value, other value),
        the values as in ``as_dict()`` (paths as strings) but the stage a ``Stage``."""
        mine, theirs = self._complete(), other._complete()
        return [(name, mine[name], theirs[name]) for name in self.FIELDS
                if name not in ignore and mine[name] != theirs[name]]


class _Later(dict):
    """The declared jobs, workers and backup of a system, as declared: ``{key: (given, line
    number, value)}``; made into the fields jobs, workers and backup on first read."""


def _build_system(name, name_source, base_dir, user, group, core_repo=None, core_app=None,
                  framework=None, server=None, database=None, host_names=None, declared=None,
                  database_host=None):
    configuration, stage_name, stage = parse_name(name)
    core_repo = _valid_identifier("core_repo", core_repo or configuration, name)
    base_dir = _valid_base_dir(base_dir, name)
    join = os.path.join
    bin_dir, src_dir, run_dir = join(base_dir, "bin"), join(base_dir, "src"), f"/run/{name}"
    core_repo_dir = join(src_dir, core_repo)
    chosen = _choices(stage, core_repo, core_repo_dir, declared if declared is not None else
                      read_declaration(core_repo_dir, name), core_app=core_app,
                      framework=framework, server=server, database=database,
                      host_names=host_names)
    entry_module = "stagetools_django" if chosen["framework"] == "django" else chosen["core_app"]
    asgi_application, wsgi_application = (
        (f"{entry_module}:asgi_application", f"{entry_module}:wsgi_application")
        if chosen["framework"] == "django" else (f"{entry_module}:application",) * 2)
    return System(
        name=name, name_source=name_source, user=user, group=group,
        container=name.replace("_", "-"), configuration=configuration,
        stage_name=stage_name, stage=stage, core_repo=core_repo, is_debug=stage in DEBUG_STAGES,
        is_https=stage not in DEBUG_STAGES and bool(chosen["host_names"]),
        base_dir=base_dir, venv_dir=base_dir, bin_dir=bin_dir, lib_dir=join(base_dir, "lib"),
        src_dir=src_dir, python_path=join(bin_dir, "python"), pip_path=join(bin_dir, "pip"),
        core_repo_dir=core_repo_dir, releases_dir=join(base_dir, "releases"),
        static_url="static/", static_dir=join(base_dir, "static"), media_url="media/",
        media_dir=join(base_dir, "media"), backups_dir=join(base_dir, "backups"),
        run_dir=run_dir, socket_path=f"{run_dir}/{name}.sock",
        secret_key_path=join(base_dir, "secret_key"),
        certificate_dir=f"{_CERTIFICATE_DIR}/{name}", acme_challenge_dir=_ACME_CHALLENGE_DIR,
        application_name="application", asgi_module=entry_module,
        asgi_application=asgi_application, wsgi_module=entry_module,
        wsgi_application=wsgi_application, django_project=DJANGO_PROJECT,
        django_settings=f"{DJANGO_PROJECT}.settings", django_rooturls=f"{DJANGO_PROJECT}.urls",
        django_wsgi_application=wsgi_application.replace(":", "."), manage_py_path=join(
            core_repo_dir, "manage.py"),
        database_name=name, database_user=name, database_sqlite_path=join(
            base_dir, f"{core_repo}.sqlite"),
        database_socket_dir=_DATABASE_SOCKET_DIR, database_tls_dir=join(base_dir, ".postgresql"),
        database_host=_chosen_database_host(name, database_host, chosen["database"]), **chosen)


def _read_topology(name):
    """Root's topology file of the installation: ``{"name", "database_host"}``, the host of
    its database as the deploy's inventory places it; ``database_host`` '' without a file.
    The installation's own process reads it too (its unit maps root to nobody), so the rule
    is that the installation's user cannot change it: a regular file it does not own, that
    no group or other may write."""
    parse_name(name)
    path = os.path.join(_TOPOLOGY_DIR, f"{name}.json")
    given, fix = f"the topology file '{path}'", "deploy the installation again; it writes the file"

    def not_the_installations(info):
        if os.name == "posix" and (info.st_mode & 0o022 or info.st_uid == os.geteuid() != 0):
            raise StagetoolsError(given, "its installation or others could change it", fix)

    try:
        text = _read_regular_file(path, given, _TOPOLOGY_MAX_BYTES, fix, not_the_installations)
    except FileNotFoundError:
        return {"name": name, "database_host": ""}
    import json  # only where there is a file: on one host, an installation's start skips it
    try:
        topology = json.loads(text)
    except ValueError:
        raise StagetoolsError(given, "it is not JSON", fix) from None
    if not (isinstance(topology, dict) and set(topology) == {"name", "database_host"}
            and topology["name"] == name and isinstance(topology["database_host"], str)):
        raise StagetoolsError(given, "it is not a topology file of stagetools", fix)
    return topology


def _chosen_database_host(name, given, database):
    """The database host: given (a deploy tool that is about to write it), else root's
    topology file; only for PostgreSQL."""
    host = _read_topology(name)["database_host"] if given is None else given
    if host and database != "postgresql":
        raise StagetoolsError(f"database host {host!r} of {name}", f"its database is {database}"
                              ", and only PostgreSQL is served by another host",
                              "declare database = postgresql, or place it on no database host")
    return _valid_host_names([host], "database host")[0] if host else ""


def _choices(stage, core_repo, repo_dir, declared, core_app, framework, server, database,
             host_names):
    """What the name cannot say: given (which may only repeat the declaration), declared,
    else the defaults; core_app, framework, server, database, host names, capacity."""
    framework = _chosen("framework", framework, declared, "django", repo_dir, FRAMEWORKS)
    servers = FRAMEWORKS[framework]["servers"]
    server = _chosen("server", server, declared, servers[0], repo_dir, servers,
                     f"server for {framework}")
    workers, threads, idle_stop = _capacity(stage, server, declared, repo_dir)
    later = _Later((key, value) for key, value in declared.items()
                   if key.partition(" ")[0] in _LATER_KEYS)
    return dict(core_app=_declared_core_app(core_app, declared, core_repo, repo_dir),
                framework=framework, server=server,
                database=_chosen("database", database, declared, "sqlite", repo_dir, DATABASES),
                host_names=_declared_host_names(host_names, declared, repo_dir),
                workers=workers, threads=threads, idle_stop=idle_stop,
                jobs=later, background_workers=later, backup=later)


def _declared_core_app(given, declared, core_repo, repo_dir):
    """The core app: given or declared (the two may not disagree), else the core repo."""
    if given is not None and "core_app" in declared and given != declared["core_app"]:
        raise StagetoolsError(f"core_app {given!r}", f"the repo declares core_app = "
                              f"{declared['core_app']} in "
                              f"'{os.path.join(repo_dir, DECLARATION_FILE)}'",
                              "give the same core_app or none: the declaration says it")
    return _valid_module("core_app", given or declared.get("core_app") or core_repo)


def _host_cores():
    """The CPUs of the host. Not the affinity of this process (taskset, a cpuset): the deploy
    run, ``check`` and the installation's own probe must resolve the same number, and the
    server runs with systemd's affinity, not theirs."""
    return os.cpu_count() or 1


def _capacity(stage, server, declared, repo_dir):
    """(workers, threads, idle_stop): declared, else the stage's rule (_CAPACITY)."""
    rule, given = _CAPACITY[stage], f"the declaration '{os.path.join(repo_dir, DECLARATION_FILE)}'"
    per_core, plus, most = rule["workers"]
    workers = declared.get("workers") or min(per_core * _host_cores() + plus, most)
    has_threads = "{threads}" in SERVERS[server]["capacity"]
    threads = declared.get("threads") or (rule["threads"] if has_threads else 1)
    if threads != 1 and not has_threads:
        raise _BadDeclaration(given, f"threads = {threads}: {server} has no threads",
                              "leave threads out, or serve with gunicorn")
    idle_stop = declared.get("idle_stop", rule["idle_stop"])
    if idle_stop and not rule["idle_stop"]:
        raise _BadDeclaration(given, f"idle_stop = {idle_stop} for {stage.label.upper()}: QUAL "
                              "and PROD never stop for idleness", "declare it in [dev] or [int]")
    return workers, threads, idle_stop


# ---------------------------------------------------------------- resolvers and the secret key


def _process_user_and_group():
    """User and group names of this process; Windows has no pwd/grp."""
    try:
        import grp
    except ImportError:
        import getpass
        return getpass.getuser(), ""
    gid = os.getegid()
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return _user_name(os.geteuid()), group


def _user_name(uid):
    import pwd
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


def _venv_named_like_an_installation(directory):
    """Only a virtualenv is an installation: /srv/my_django/app is not one. (Asked first:
    a directory without pyvenv.cfg is refused before its name is parsed.)"""
    return (os.path.isfile(os.path.join(directory, "pyvenv.cfg"))
            and _name_problem(os.path.basename(directory)) is None)


def get_actual_system_from_name(name=None, core_repo=None, core_app=None,
                                framework=None, server=None, database=None, host_names=None):
    """The system this process runs in.

    The name comes from, in order: the argument, the environment variable
    ``STAGETOOLS_NAME``, the directory of the running virtualenv (``sys.prefix``),
    the nearest virtualenv above this file named like an installation. The
    ``name_source`` attribute says which one was used. A name given (argument or
    variable) that contradicts the virtualenv it runs in is refused: a DEV name in a
    PROD virtualenv would turn DEBUG on next to PROD's data. Framework, server,
    database and host names are what the repo declares in its stagetools.ini, unless
    given.
    """
    prefix = os.path.normpath(sys.prefix)
    place = _installation_where_this_runs(prefix)  # (name, kind, directory) or None
    if name is not None:
        parse_name(name)
        given, source, fix = f"the name {name!r}", "argument", "give {!r} or no name"
    elif os.environ.get(ENV_NAME) is not None:
        name = os.environ[ENV_NAME]
        try:
            parse_name(name)
        except StagetoolsError as error:
            raise StagetoolsError(f"environment variable {ENV_NAME}: {error.given}", error.rule,
                                  error.fix) from None
        given, source = f"{ENV_NAME}={name!r}", f"environment {ENV_NAME}"
        fix = f"unset {ENV_NAME} or set it to {{!r}}"
    elif place is not None:
        name, source, given = place[0], f"{place[1]} {place[2]}", None
    else:
        _refuse_unknown_name(prefix)
    if given and place and place[0] != name:
        raise StagetoolsError(given, f"it contradicts the {place[1]} '{place[2]}' of the "
                              f"installation {place[0]!r}", fix.format(place[0]))
    # The virtualenv of the name, where this runs; else (a container) sys.prefix.
    base_dir = place[2] if place and place[0] == name else prefix
    return _build_system(name, source, base_dir, None, None,
                         core_repo, core_app, framework, server, database, host_names)


def _installation_where_this_runs(prefix):
    """(name, 'virtualenv' or 'module path', directory) of the running virtualenv, or of
    the nearest virtualenv above this file, if one is named like an installation."""
    if _name_problem(os.path.basename(prefix)) is None:
        return os.path.basename(prefix), "virtualenv", prefix
    for directory in _module_dirs():
        if _venv_named_like_an_installation(directory):
            return os.path.basename(directory), "module path", directory
    return None


def _refuse_unknown_name(prefix):
    """The refusal when no source gives a name: every source and what it held."""
    venv_name = os.path.basename(prefix)
    tried = ["argument: not given", f"environment {ENV_NAME}: not set",
             f"virtualenv (sys.prefix) '{prefix}': {venv_name!r} is not a name "
             f"({_name_problem(venv_name)})",
             f"module path '{_module_dirs()[0]}': no virtualenv above it is named like an "
             "installation"]
    raise StagetoolsError("cannot tell the installation name", "tried " + "; ".join(tried),
                          f"set {ENV_NAME}=shop_dev, or run from a virtualenv whose directory "
                          "is named like the installation (/home/shop_dev)")


def get_expected_system_from_name(name=None, base_dir=None, core_repo=None, core_app=None,
                                  framework=None, server=None, database=None, host_names=None,
                                  declared=None, database_host=None):
    """The system a deploy tool should build: user and group are the name,
    base_dir ``/home/<name>`` unless given; the name defaults to the login name.
    Framework, server, database and host names are what the repo declares in its
    stagetools.ini (once it is in place), unless given; ``declared`` replaces that file's choices
    for a tool that holds the repo elsewhere (``{}``: none). The database host is root's
    topology file's unless given (a deploy tool about to write it; ``""``: this host)."""
    source = "argument"
    if name is None:
        name = _process_user_and_group()[0]
        source = "login name"
        try:
            parse_name(name)
        except StagetoolsError as error:
            raise StagetoolsError(f"the login name of this process: {error.given}", error.rule,
                                  "give the installation name") from None
    return _build_system(name, source, f"/home/{name}" if base_dir is None else base_dir,
                         name, name, core_repo, core_app, framework, server, database,
                         host_names, declared, database_host)


def read_secret_key(system):
    """The installation's secret key, created on first use (random, 0600, atomically).

    Every process that starts at once gets the same key: a finished key file is
    hard-linked into place, and a process that loses the race reads the winner's.
    The key file must be a regular file of this process's user that no one else
    can read; anything else (a link, a FIFO, a device) is refused unopened.
    """
    path = os.fspath(system.secret_key_path)
    try:
        return _read_secret_file(path)
    except FileNotFoundError:
        _create_secret_file(path)
        return _read_secret_file(path)


def _read_secret_file(path):
    given = f"the secret key file '{path}'"
    remove = f"remove it (rm -- '{path}'): a new key is made"

    def private(info):
        if os.name == "posix" and info.st_uid != os.geteuid():
            raise StagetoolsError(given, f"it belongs to {_user_name(info.st_uid)!r}, not to "
                                  f"{_user_name(os.geteuid())!r}",
                                  f"run as the installation's user, or {remove}")
        if os.name == "posix" and info.st_mode & 0o077:
            raise StagetoolsError(given, f"it has mode {info.st_mode & 0o777:o}: other users can "
                                  "read it", f"as its owner: chmod 600 '{path}'")

    text = _read_regular_file(path, given, _SECRET_KEY_MAX_BYTES, remove, private)
    key = text.strip()
    if len(key) < _SECRET_KEY_MIN_LENGTH:
        raise StagetoolsError(given, f"it holds {len(key)} characters, fewer than "
                              f"{_SECRET_KEY_MIN_LENGTH}", remove)
    return key


def _read_regular_file(path, given, limit, fix, look=None):
    """The UTF-8 text of a regular file of at most ``limit`` bytes, looked at before it is
    read: no link is followed, no FIFO waited on, no device read; ``look(stat)`` may refuse
    it too. FileNotFoundError if there is none; any other problem a StagetoolsError."""
    import errno
    import stat
    flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_NOCTTY", 0))
    try:
        descriptor = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError) as error:  # nothing there: one answer
        raise FileNotFoundError(error.errno, error.strerror, path) from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise StagetoolsError(given, "it is a symbolic link", fix) from None
        raise StagetoolsError(given, f"cannot open it: {error.strerror}",
                              "run as the installation's user") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise StagetoolsError(given, "it is not a regular file", fix)
        if look:
            look(info)
        data = b""
        while len(data) <= limit:
            chunk = os.read(descriptor, limit + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as error:
        raise StagetoolsError(given, f"cannot read it: {error.strerror}",
                              "run as the installation's user") from None
    finally:
        os.close(descriptor)
    if len(data) > limit:
        raise StagetoolsError(given, f"it holds more than {limit} bytes", fix)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise StagetoolsError(given, "it is not UTF-8 text", fix) from None


def _create_secret_file(path):
    import secrets
    # token_urlsafe never starts a key with '$' (django-environ#98) and has 64 symbols.
    key = secrets.token_urlsafe(64)
    directory, filename = os.path.split(path)
    temporary = os.path.join(directory, f".{filename}.{os.getpid()}.{secrets.token_hex(4)}")
    given = f"cannot create the secret key file '{path}'"
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        raise StagetoolsError(given, error.strerror,
                              f"the directory '{directory}' must exist and be writable") from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(key + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, path)
    except FileExistsError:
        pass  # another process made the key first; everybody uses that one
    except OSError as error:  # a full disk, a file system without hard links
        raise StagetoolsError(given, error.strerror, "its file system must have space and "
                              "support hard links") from None
    finally:
        os.unlink(temporary)


def database_url(system, database=None):
    """The database URL of the installation, for apps that take one (Flask, Starlette);
    ``database`` defaults to the system's (the declared one)."""
    if _database(system, database) == "sqlite":
        return f"sqlite:///{system.database_sqlite_path}"
    if system.database_host:  # TLS both ways: the server verified, a client certificate
        options = "&".join(f"{key}={value}" for key, value in _database_tls(system).items())
        return (f"postgresql://{system.database_user}@{system.database_host}:{_DATABASE_PORT}"
                f"/{system.database_name}?{options}")
    # Peer authentication over the local socket: a user, no password, no TCP host.
    return (f"postgresql://{system.database_user}@/{system.database_name}"
            f"?host={_database_host(system)}")


def django_database(system, database=None):
    """Django's ``DATABASES["default"]`` for the installation: SQLite's file, or PostgreSQL
    with the installation's database and role by peer authentication (no password), or, on
    a database host, by TLS with its client certificate (no password either);
    ``database`` defaults to the system's (the declared one)."""
    database = _database(system, database)
    engine = DATABASES[database]["django_engine"]
    if database == "sqlite":
        return {"ENGINE": engine, "NAME": str(system.database_sqlite_path)}
    if system.database_host:
        return {"ENGINE": engine, "NAME": system.database_name, "USER": system.database_user,
                "PASSWORD": "", "HOST": system.database_host, "PORT": str(_DATABASE_PORT),
                "OPTIONS": _database_tls(system)}
    return {"ENGINE": engine, "NAME": system.database_name, "USER": system.database_user,
            "PASSWORD": "", "HOST": _database_host(system), "PORT": ""}


def _shared_media_storage(system):
    """django-storages' SFTP storage of the uploads on the database host (its OPTIONS), or
    None on one host."""
    if not system.database_host:
        return None
    ssh = os.path.join(system.base_dir, _MEDIA_SSH_DIR)
    return {"host": system.database_host, "root_path": _MEDIA_SFTP_ROOT,
            "params": {"username": system.user, "look_for_keys": False, "allow_agent": False,
                       "key_filename": os.path.join(ssh, _MEDIA_SSH_FILES["key"]),
                       "timeout": 10},
            "known_host_file": os.path.join(ssh, _MEDIA_SSH_FILES["known_hosts"]),
            # nginx on the database host serves them: readable by its group
            "file_mode": 0o644, "dir_mode": 0o755, "base_url": f"/{system.media_url}"}


def _database_tls(system):
    """libpq's TLS options for a database host: the server's certificate checked against the
    deployment's CA and its name (verify-full), the installation's certificate presented."""
    return {"sslmode": "verify-full", **{key: os.path.join(system.database_tls_dir, file)
                                         for key, file in _DATABASE_TLS_FILES.items()}}


def _database(system, database):
    """The system's database, or the one given if the repo does not declare another."""
    if database is None or database == system.database:
        return system.database
    return _chosen("database", database, read_declaration(system.core_repo_dir, system.name),
                   system.database, system.core_repo_dir, DATABASES)


def _database_host(system):
    """PostgreSQL's socket directory: libpq's compiled-in default differs between builds,
    so name it, unless libpq's own PGHOST says otherwise."""
    return os.environ.get("PGHOST") or str(system.database_socket_dir)


def flask_config(system, database=None):
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


def starlette_config(system, database=None):
    """The mapping ``starlette.config.Config(environ=...)`` reads: the same keys, as strings."""
    return {key: str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in flask_config(system, database).items()}


# ---------------------------------------------------------------- the rest, on first use
#
# A running installation needs only what is above: its name, its system, its declaration's
# choices, its secret key and its database. The rest of the module (root's record, jobs and
# backups, renderers, checks, the command line and the templates) is the text _REST, which
# Python keeps as it is, and which _load_rest compiles and runs into the module on first
# use: a module attribute that is not above, System.services, a field of jobs, or the
# command line. So a process that imports stagetools and resolves its system does not
# unmarshal code it never calls (bench/: start-up), and stagetools stays one file to copy.
# Tracebacks and coverage name the file's own lines. A program that uses the rest from
# several threads loads it before they start (as the collection does): a thread that meets
# a name of the rest while another is still loading it could call it before its neighbours
# are there.

_REST_LOCK = _thread.allocate_lock()


def _load_rest():
    """The module's namespace, with _REST compiled and run into it (once). _REST goes only
    when the whole rest is there: a thread that asks meanwhile waits for the lock."""
    namespace = globals()
    with _REST_LOCK:
        if "_REST" in namespace:
            code = compile("\n" * (_REST_LINE - 1) + namespace["_REST"], __file__, "exec")
            exec(code, namespace)  # this file's own text
            del namespace["_REST"]
    return namespace


def __getattr__(name):
    """PEP 562: a name of the rest of the module, loaded on first use."""
    if name.startswith("__"):  # importlib's probes: not ours
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    namespace = _load_rest()
    if name not in namespace:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return namespace[name]


_REST_LINE = sys._getframe().f_lineno + 1  # the line where _REST starts (its first is empty)
_REST = r'''
# ---------------------------------------------------------------- root's record of a deployment


def _read_record(name):
    """Root's record of the installation ``name``, or None: ``{"name", "commit" (None until
    a commit serves), "repo", "version", "core_repo", "declaration" (the text of that
    commit's stagetools.ini, or None), "previous" (the same keys of the commit before, or
    None), "deployed_at"}``. A record that is not root's, or not of that shape, is refused."""
    import json
    parse_name(name)  # a name, before it becomes a path
    path = os.path.join(_RECORD_DIR, f"{name}.json")
    given, fix = f"the record '{path}'", "deploy the installation again; it writes the record"

    def roots(info):
        if info.st_uid != 0 or info.st_mode & 0o022:
            raise StagetoolsError(given, "it is not root's alone", fix)

    try:
        record = json.loads(_read_regular_file(path, given, _RECORD_MAX_BYTES, fix, roots))
    except FileNotFoundError:
        return None
    except ValueError as error:  # also JSON's
        raise StagetoolsError(given, getattr(error, "rule", "it is not JSON"), fix) from None
    if not (_is_deployment(record) and record["name"] == name
            and (record["previous"] is None or _is_deployment(record["previous"]))):
        raise StagetoolsError(given, "it is not a record of stagetools", fix)
    return record


def _is_deployment(record):
    """Whether a record (or its previous deployment) has the record's shape."""
    fields = {"name": str, "commit": (str, type(None)), "repo": str, "version": str,
              "core_repo": str, "declaration": (str, type(None)),
              "previous": (dict, type(None)), "deployed_at": str}
    commit = record.get("commit") if isinstance(record, dict) else None
    return (isinstance(record, dict) and set(record) == set(fields)
            and all(isinstance(record[key], kind) for key, kind in fields.items())
            and (commit is None or len(commit) == 40 and set(commit) <= _COMMIT_CHARACTERS)
            and _name_problem(record["name"]) is None and record["core_repo"].isidentifier())


def _write_record(record):
    """Write root's record of an installation (the shape of _read_record) in one step."""
    import json
    if not _is_deployment(record):
        raise StagetoolsError("the record", "it does not have a record's shape", None)
    os.makedirs(_RECORD_DIR, mode=0o755, exist_ok=True)
    path = os.path.join(_RECORD_DIR, f"{record['name']}.json")
    temporary = f"{path}.{os.getpid()}"
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                      0o644), "w", encoding="utf-8") as file:
        json.dump(record, file, indent=2)
        file.write("\n")
    os.replace(temporary, path)


def _write_topology(name, database_host):
    """Write (or, for no database host, remove) root's topology file of an installation.
    True if it changed."""
    import json
    parse_name(name)
    if database_host:
        _valid_host_names([database_host], "database host")
    path = os.path.join(_TOPOLOGY_DIR, f"{name}.json")
    if _read_topology(name)["database_host"] == database_host:
        return False
    if not database_host:
        os.unlink(path)
        return True
    os.makedirs(_TOPOLOGY_DIR, mode=0o755, exist_ok=True)
    temporary = f"{path}.{os.getpid()}"
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                      0o644), "w", encoding="utf-8") as file:
        json.dump({"name": name, "database_host": database_host}, file)
        file.write("\n")
    os.replace(temporary, path)
    return True


def _expected_from_record(record, core_repo=None, **given):
    """The expected system of a recorded installation: its deployed commit's declaration
    (as root kept it) and core repo; ``given`` choices may only repeat them."""
    name, commit = record["name"], (record["commit"] or "none yet")[:12]
    if core_repo not in (None, record["core_repo"]):
        raise StagetoolsError(f"core_repo {core_repo!r}", f"{name} was deployed with "
                              f"core_repo {record['core_repo']!r} (root's record)",
                              "leave --core-repo out")
    declared = parse_declaration(record["declaration"] or "", name,
                                 f"the declaration of {name}'s deployed commit {commit}")
    return get_expected_system_from_name(name, core_repo=record["core_repo"],
                                         declared=declared, **given)


# ---------------------------------------------------------------- jobs, workers and backups
#
# What an installation runs besides its web server, as its repo declares it (_LATER_KEYS):
# validated here when a deploy tool, show or check first reads the fields, never at an
# installation's start.

_JOB_KINDS = ("module", "script", "manage")  # python -m MODULE, bin/SCRIPT, manage.py COMMAND
_JOB_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_JOB_NAME_MAX_LENGTH = 32
# A command runs without a shell, and none of these means anything to systemd (% $ \ quotes).
_ARGUMENT_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                 "0123456789_.,:=/@+-")
_COMMAND_MAX_WORDS, _COMMAND_MAX_LENGTH = 32, 400
_COMMAND_EXAMPLE = "module shop.report, script shop-sync or manage clearsessions"
# systemd's OnCalendar=, the subset stagetools takes: its shorthands, or [weekdays] [date]
# [time] [UTC]; each part of the date and time *, or values, ranges V..V and repetitions V/R.
_CALENDAR_SHORTHANDS = ("minutely", "hourly", "daily", "weekly", "monthly", "quarterly",
                        "semiannually", "yearly", "annually")
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun", "monday", "tuesday",
             "wednesday", "thursday", "friday", "saturday", "sunday")
_CALENDAR_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                 "0123456789*,./:~- ")
_CALENDAR_RANGES = {"year": (1970, 2199), "month": (1, 12), "day": (1, 31), "hour": (0, 23),
                    "minute": (0, 59), "second": (0, 59), "day from the month's end": (1, 28)}
_CALENDAR_EXAMPLE = "daily, hourly, Mon..Fri 06:30, *-*-01 03:00 or *:0/15 (systemd's OnCalendar=)"
_CALENDAR_MAX_LENGTH = 100
# QUAL and PROD back up unless they declare otherwise: the 7 newest, every night.
_DEFAULT_BACKUP = "keep 7 @ daily"
_BACKUP_EXAMPLE = "backup = keep 7 @ daily, keep 30d @ daily (an age in days), or off"
_BACKUP_MAX_KEEP = 1000
# A backup is the files STAMP-LABEL.<database suffix> and STAMP-LABEL.media.tar in backups_dir.
_BACKUP_SUFFIXES = {"postgresql": ".pgdump", "sqlite": ".sqlite"}
_MEDIA_SUFFIX = ".media.tar"
_BACKUP_STAMP = "%Y%m%dT%H%M%SZ"
_BACKUP_LABEL_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_BACKUP_TIMEOUT = 6 * 3600  # seconds of pg_dump or pg_restore
# Root's copy of this file on a host, written by the deploy tool: the backup unit runs it as
# the installation's user, and operators run it as root (check, run).
_ROOT_COPY = "/usr/local/lib/stagetools/stagetools.py"


def _scheduled(values, later):
    """The fields jobs, background_workers and backup of a system's ``values``, from what its
    repo declares (``later``, as declared; see _Later): validated, or refused naming the line."""
    name, framework = values["name"], values["framework"]
    jobs, workers = {}, {}
    backup = _valid_backup(_DEFAULT_BACKUP) if values["stage"] in (STAGE_PROD, STAGE_QUAL) \
        else None
    for key, (given, number, text) in later.items():
        family, item = key.partition(" ")[::2]
        try:
            if family == "backup":
                backup = _valid_backup(text, item)
            elif _valid_job_name(family, item) and text == "off":  # a broader section's, not here
                continue
            elif family == "job":
                jobs[item] = _valid_job(text, framework)
            else:
                workers[item] = {"command": _valid_command(text, framework)}
        except StagetoolsError as error:
            raise _BadDeclaration(given, f"line {number}: {key}: {error.given}: {error.rule}",
                                  error.fix) from None
    for item, job in jobs.items():
        job.update(service=f"{name}-job-{item}.service", timer=f"{name}-job-{item}.timer")
    for item, worker in workers.items():
        worker["service"] = f"{name}-worker-{item}.service"
    if backup:
        backup.update(service=f"{name}-backup.service", timer=f"{name}-backup.timer")
    return {"jobs": dict(sorted(jobs.items())), "background_workers": dict(sorted(
        workers.items())), "backup": backup}


def _valid_job_name(family, name):
    """The name of a job or worker, as its units are named: NAME-job-<name>.service."""
    if not (name and len(name) <= _JOB_NAME_MAX_LENGTH and "a" <= name[0] <= "z"
            and set(name) <= _JOB_NAME_CHARACTERS) or family == "job" and name == "backup":
        raise StagetoolsError(f"{family} name {name!r}", f"a {family} name has a-z, 0-9 and - "
                              f"only, starts with a letter, has at most {_JOB_NAME_MAX_LENGTH} "
                              "characters and is not backup (it names the units)",
                              f"for example {family} clearsessions = ...")
    return name


def _valid_job(text, framework):
    """``COMMAND @ CALENDAR``: {command, calendar}."""
    command, separator, calendar = text.rpartition(" @ ")
    if not separator:
        raise StagetoolsError(f"{text!r}", "a job is 'COMMAND @ CALENDAR'",
                              "for example job clearsessions = manage clearsessions @ daily")
    return {"command": _valid_command(command, framework), "calendar": _valid_calendar(calendar)}


def _valid_command(text, framework):
    """What a job or worker runs, words of a small safe set (no shell runs it): ``module
    MODULE ARGS`` (python -m), ``script NAME ARGS`` (a console script of the virtualenv) or
    ``manage COMMAND ARGS`` (Django's); the words joined by one space."""
    words = text.split()
    if not words or words[0] not in _JOB_KINDS or len(words) < 2:
        raise StagetoolsError(f"command {text!r}", "it is not module, script or manage, then "
                              "what to run", f"for example {_COMMAND_EXAMPLE}")
    kind, target = words[:2]
    if kind == "module":
        _valid_module("module", target)
    elif kind == "manage" and framework != "django":
        raise StagetoolsError(f"command {text!r}", f"manage runs Django's commands; the "
                              f"framework is {framework}", "use module or script")
    elif target[0] in ".-" or set(target) - _ARGUMENT_CHARACTERS or "/" in target:
        raise StagetoolsError(f"{kind} {target!r}", f"a {kind} is a name of bin/ or Django's "
                              "command: a-z, A-Z, 0-9, _ . - (not first: . -)",
                              f"for example {_COMMAND_EXAMPLE}")
    for word in words[2:]:
        bad = sorted(set(word) - _ARGUMENT_CHARACTERS)
        if bad:
            raise StagetoolsError(f"argument {word!r}", f"it has the characters "
                                  f"{''.join(bad)!r}", "commands run without a shell: words of "
                                  "a-z, A-Z, 0-9 and _ . , : = / @ + - only")
    if len(words) > _COMMAND_MAX_WORDS or len(text) > _COMMAND_MAX_LENGTH:
        raise StagetoolsError(f"command {text[:40]!r}...", f"more than {_COMMAND_MAX_WORDS} "
                              f"words or {_COMMAND_MAX_LENGTH} characters",
                              "put the arguments into the module or script")
    return " ".join(words)


def _valid_calendar(text):
    """A calendar expression of systemd's OnCalendar= in stagetools' subset, its words joined
    by one space; or a refusal."""
    problem = _calendar_problem(text)
    if problem:
        raise StagetoolsError(f"calendar {text!r}", problem, f"for example {_CALENDAR_EXAMPLE}")
    return " ".join(text.split())


def _calendar_problem(text):
    """Why ``text`` is not a calendar of stagetools' subset, or None."""
    bad = sorted(set(text) - _CALENDAR_CHARACTERS)
    words = text.split()
    if bad:
        return f"it has the characters {''.join(bad)!r}"
    if not words or len(text) > _CALENDAR_MAX_LENGTH:
        return f"it is empty or longer than {_CALENDAR_MAX_LENGTH} characters"
    if len(words) == 1 and words[0].lower() in _CALENDAR_SHORTHANDS:
        return None
    words = words[:-1] if words[-1] == "UTC" else words
    if not words:
        return "UTC alone is no time: it follows one, as in 03:00 UTC"
    if words[0][0].isalpha():
        problem = _weekdays_problem(words.pop(0))
        if problem:
            return problem
    dates = [word for word in words if ":" not in word]
    times = [word for word in words if ":" in word]
    if len(dates) > 1 or len(times) > 1 or words != dates + times:
        return "it is not [weekdays] [date] [time] [UTC], nor a shorthand such as daily"
    parts = []
    for word, names in [(word, _date_parts(word)) for word in dates] + [
            (word, ("hour", "minute", "second")[:len(word.split(":"))]) for word in times]:
        values = word.replace("~", "-").split("-") if ":" not in word else word.split(":")
        if names is None or len(values) not in (2, 3) or len(values) != len(names):
            return f"{word!r} is not a date (YYYY-MM-DD, MM-DD) or a time (HH:MM, HH:MM:SS)"
        parts += zip(names, values)
    return next((problem for problem in (_calendar_part_problem(*part) for part in parts)
                 if problem), None)


def _weekdays_problem(word):
    """Why a calendar's first word is not weekdays (Mon, Mon..Fri, Sat,Sun), or None."""
    for item in word.split(","):
        days = item.lower().split("..")
        if len(days) > 2 or not all(day in _WEEKDAYS for day in days) or (
                _WEEKDAYS.index(days[0]) % 7 > _WEEKDAYS.index(days[-1]) % 7):
            return f"{word!r} is not weekdays such as Mon, Mon..Fri or Sat,Sun (Mon first)"
    return None


def _date_parts(word):
    """The names of a date's parts: year, month, day (YYYY-MM-DD, YYYY-MM~DD: the DDth last
    day) or month, day; None if it is neither."""
    count = word.count("-") + word.count("~")
    if word.count("~") > 1 or count not in (1, 2) or "-" in word.partition("~")[2]:
        return None  # a ~ stands between the month and the day only
    day = "day from the month's end" if "~" in word else "day"
    return ("year", "month", day)[3 - (count + 1):]


def _calendar_part_problem(name, text):
    """Why one part of a date or time is not *, values, ranges or repetitions in its range."""
    low, high = _CALENDAR_RANGES[name]
    if text == "*":
        return None
    for item in text.split(","):
        item, repeat = item.partition("/")[::2]
        values = item.split("..")
        if name == "second" and len(values) == 1 and item.count(".") == 1 and not repeat:
            values = [item.split(".")[0]] if item.split(".")[1].isdigit() else [""]
        if not (len(values) <= 2 and all(value.isascii() and value.isdigit() and low <= int(
                value) <= high for value in values) and int(values[0]) <= int(values[-1])
                and (not repeat or repeat.isascii() and repeat.isdigit() and int(repeat))):
            return (f"the {name} {text!r} is not * or values from {low} to {high} (V, V..V "
                    "from low to high, V/R)")
    return None


def _valid_backup(text, item=""):
    """``keep COUNT @ CALENDAR`` (the COUNT newest), ``keep DAYSd @ CALENDAR`` (those of the
    last DAYS days; the newest always stays) or ``off``: {calendar, keep_count, keep_days}
    or None."""
    keep, separator, calendar = text.rpartition(" @ ")
    words, fix = keep.split(), f"for example {_BACKUP_EXAMPLE}"
    if item:
        raise StagetoolsError(f"backup {item}", "a backup has no name", fix)
    if text == "off":
        return None
    number = words[1] if separator and len(words) == 2 and words[0] == "keep" else ""
    days = number.endswith("d")
    number = number[:-1] if days else number
    if not (number.isascii() and number.isdigit() and 1 <= int(number) <= _BACKUP_MAX_KEEP):
        raise StagetoolsError(f"{text!r}", f"a backup is 'keep COUNT @ CALENDAR' or 'keep DAYSd "
                              f"@ CALENDAR' (1 to {_BACKUP_MAX_KEEP}), or off", fix)
    return {"calendar": _valid_calendar(calendar), "keep_count": None if days else int(number),
            "keep_days": int(number) if days else None}


def _back_up(system, label="scheduled", media=True):
    """Back the installation up into backups_dir, as its user: the database (pg_dump
    --format=custom, or SQLite's online backup) and, with ``media``, media/ (a tar), each
    written under a temporary name and renamed when whole, 0600 in a 0700 directory; then the
    declared retention. Returns the backup's name, STAMP-LABEL; None if there was nothing."""
    import time
    if not (label and set(label) <= _BACKUP_LABEL_CHARACTERS and len(label) <= 40):
        raise StagetoolsError(f"backup label {label!r}", "a label has a-z, 0-9 and - only",
                              "for example scheduled")
    umask = os.umask(0o077)
    try:
        directory = _backups_directory(system)
        stem = f"{time.strftime(_BACKUP_STAMP, time.gmtime())}-{label}"
        while stem in _backup_sets(directory):  # one a second: the stamp orders them
            time.sleep(0.2)
            stem = f"{time.strftime(_BACKUP_STAMP, time.gmtime())}-{label}"
        path = os.path.join(directory, stem)
        written = [_back_up_database(system, path + _BACKUP_SUFFIXES[system.database])]
        if media and _file_kind(system.media_dir) == _DIRECTORY:
            written.append(_back_up_media(system, path + _MEDIA_SUFFIX))
    finally:
        os.umask(umask)
    _prune_backups(system, stem)
    return stem if any(written) else None


def _backups_directory(system):
    """backups_dir, made if missing: a directory (not a link) of this process's user, 0700."""
    directory = str(system.backups_dir)
    if not os.path.lexists(directory):
        os.mkdir(directory, 0o700)
    info = os.lstat(directory)
    if _file_kind(directory) != _DIRECTORY or info.st_uid != os.geteuid():
        raise StagetoolsError(f"'{directory}'", f"it is {_file_kind(directory)} of "
                              f"{_user_name(info.st_uid)!r}, not a directory of "
                              f"{_user_name(os.geteuid())!r}", "remove it; the next backup "
                              "makes it")
    os.chmod(directory, 0o700)
    return directory


def _write_whole(path, write):
    """``write(temporary path)``, then the file renamed to ``path``: none or all of it."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.partial")  # one per process
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
    return path


def _back_up_database(system, path):
    """The database into ``path``; None for a SQLite database not made yet."""
    if system.database == "postgresql":
        return _write_whole(path, lambda temporary: _run_database_tool(
            ["pg_dump", "--format=custom", "--file", temporary, "--host",
             _database_host(system), "--dbname", system.database_name], "pg_dump"))
    database = str(system.database_sqlite_path)
    if not os.path.isfile(database):
        return None

    def copy(temporary):
        import sqlite3
        source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        target = sqlite3.connect(temporary)
        try:
            source.backup(target)  # SQLite's online backup: a consistent copy, writers wait
        finally:
            target.close()
            source.close()
    return _write_whole(path, copy)


def _run_database_tool(command, what):
    """Run pg_dump or pg_restore; its last line of error in a refusal if it fails."""
    import subprocess
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                timeout=_BACKUP_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as error:
        raise StagetoolsError(what, f"it did not run: {error}", "install PostgreSQL's "
                              "client (apt-get install postgresql-client)") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no message"]
        raise StagetoolsError(what, f"it exited {result.returncode}: {lines[-1]}",
                              "see its message")


def _back_up_media(system, path):
    """media/ into the tar ``path``: its directories and regular files (no link: nginx would
    serve none, and a restore makes none; a second hard link of a file is a file of its own)."""
    import tarfile

    def regular(info):
        if info.islnk():  # tarfile's hard link: this name would come back as nothing
            info.type, info.linkname = tarfile.REGTYPE, ""
            info.size = os.lstat(os.path.join(system.media_dir, info.name)).st_size
        return info if info.isfile() or info.isdir() else None

    def write(temporary):
        with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as archive:
            for entry in sorted(os.listdir(system.media_dir)):
                archive.add(os.path.join(system.media_dir, entry), arcname=entry,
                            filter=regular)
    return _write_whole(path, write)


def _backup_sets(directory):
    """The backups in ``directory``, newest first: {STAMP-LABEL: [its file names]}."""
    sets = {}
    for entry in os.scandir(directory):
        stem, dot, suffix = entry.name.partition(".")
        if (_is_backup_stem(stem) and f".{suffix}" in (*_BACKUP_SUFFIXES.values(),
                                                       _MEDIA_SUFFIX)
                and entry.is_file(follow_symlinks=False)):
            sets.setdefault(stem, []).append(entry.name)
    return dict(sorted(sets.items(), reverse=True))


def _is_backup_stem(stem):
    """Whether ``stem`` is STAMP-LABEL, as _back_up names a backup, of a time there is."""
    import time
    if not (len(stem) > 17 and stem[:8].isdigit() and stem[8] == "T" and stem[9:15].isdigit()
            and stem[15:17] == "Z-" and stem.isascii()
            and set(stem[17:]) <= _BACKUP_LABEL_CHARACTERS):
        return False
    try:
        return bool(time.strptime(stem[:16], _BACKUP_STAMP))
    except ValueError:  # 20201399T...: no such day
        return False


def _prune_backups(system, made):
    """Remove the backups the declared retention does not keep, counting those of the
    backup timer (label scheduled) apart from the others (made before a migration): the one
    just ``made`` stays, whatever the others' stamps say. Returns the names of those removed."""
    backup, directory = system.backup, str(system.backups_dir)
    if not backup:
        return []
    sets = [item for item in _backup_sets(directory).items() if item[0] != made]
    scheduled = made.endswith("-scheduled")
    old = _beyond_retention(backup, [item for item in sets
                                     if item[0].endswith("-scheduled") == scheduled])
    for stem, names in old:
        for name in names:
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:  # another backup's retention, meanwhile
                pass
    return [stem for stem, names in old]


def _beyond_retention(backup, older):
    """Of the backups ``older`` (newest first) than the one just made, those its retention
    does not keep: beyond the COUNT newest (the one just made counts), or older than DAYS."""
    import calendar
    import time
    if backup["keep_count"]:
        return older[backup["keep_count"] - 1:]
    oldest = time.time() - backup["keep_days"] * 86400
    return [(stem, names) for stem, names in older
            if calendar.timegm(time.strptime(stem[:16], _BACKUP_STAMP)) < oldest]


def _restore_backup(system, stem):
    """Restore the backup ``stem`` into the installation, as its user, while its service
    is stopped (the deploy tool's restore does that, and gives PostgreSQL an empty database
    first): the database, and media/ if the backup holds it."""
    directory = str(system.backups_dir)
    sets = _backup_sets(directory) if os.path.isdir(directory) else {}
    if stem not in sets:
        raise StagetoolsError(f"backup {stem!r}", f"there is no such backup in '{directory}'",
                              "choose one of " + (", ".join(list(sets)[:5]) or "none: back up "
                                                  "first"))
    database = stem + _BACKUP_SUFFIXES[system.database]
    if database not in sets[stem] and any(not name.endswith(_MEDIA_SUFFIX)
                                          for name in sets[stem]):
        raise StagetoolsError(f"backup {stem!r}", "it is a backup of another kind of database "
                              f"than {system.database}", "choose a backup of this installation")
    umask = os.umask(0o077)
    try:
        if database in sets[stem]:
            _restore_database(system, os.path.join(directory, database))
        if stem + _MEDIA_SUFFIX in sets[stem]:
            _restore_media(system, os.path.join(directory, stem + _MEDIA_SUFFIX))
    finally:
        os.umask(umask)
    return sets[stem]


def _restore_database(system, path):
    """The database from ``path``: PostgreSQL's into its empty database, SQLite's file
    replaced page by page by SQLite's online backup."""
    if system.database == "postgresql":
        _run_database_tool(["pg_restore", "--no-owner", "--exit-on-error", "--host",
                            _database_host(system), "--dbname", system.database_name, path],
                           "pg_restore")
        return
    import sqlite3
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    target = sqlite3.connect(str(system.database_sqlite_path))
    try:
        source.backup(target)  # one step: a backup it cannot read changes nothing
    except sqlite3.DatabaseError as error:
        raise StagetoolsError(f"backup '{path}'", f"SQLite cannot read it ({error})",
                              "restore another backup") from None
    finally:
        target.close()
        source.close()


def _media_archive(path):
    """The tar ``path``, open; or a refusal if it is no tar."""
    import tarfile
    try:
        return tarfile.open(path)
    except tarfile.TarError as error:
        raise StagetoolsError(f"backup '{path}'", f"it is no tar ({error})",
                              "restore another backup") from None


def _restore_media(system, path):
    """media/ as the tar ``path`` holds it: what is there now goes, its directories and
    regular files come back, group-readable at most (media/ gives them nginx's group)."""
    import shutil
    import tarfile
    media = str(system.media_dir)
    umask = os.umask(0o027)
    try:
        with _media_archive(path) as archive:
            members = _media_members(archive, path)
            _empty_directory(media)
            for member in members:
                target = os.path.join(media, member.name)
                if member.isdir():  # mkdir keeps media/'s setgid group; chmod would not
                    os.makedirs(target, 0o750, exist_ok=True)
                    continue
                with archive.extractfile(member) as source, open(os.open(
                        target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640),
                        "wb") as file:
                    shutil.copyfileobj(source, file)
                os.chmod(target, member.mode & 0o750)
                os.utime(target, (member.mtime, member.mtime))
    finally:
        os.umask(umask)


def _media_members(archive, path):
    """The members of a media tar, refused unless each is a file or directory below media/."""
    members = archive.getmembers()
    for member in members:
        if member.name.startswith("/") or ".." in member.name.split("/") or not (
                member.isfile() or member.isdir()):
            raise StagetoolsError(f"'{path}'", f"it holds {member.name!r}, which is not a file "
                                  "or directory below media/", "choose another backup")
    return members


def _empty_directory(path):
    """Remove what is in a directory, links not followed."""
    import shutil
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


# ---------------------------------------------------------------- renderers


def _fill(template, **values):
    """A template of this module (the last section) with its ``$placeholders`` filled in;
    ``$$`` is a literal ``$``."""
    import string
    return string.Template(template).substitute(values)


def _server_command(system, host=None, port=None, server=None, workers=None):
    """The command that serves the installation with its server (or ``server``): on
    systemd's socket with its workers (or ``workers``) and threads, or on host:port with the
    server's own."""
    server = server or system.server
    application = system.wsgi_application if SERVERS[server]["interface"] == "wsgi" \
        else system.asgi_application
    where = [part.format(workers=workers or system.workers, threads=system.threads)
             for part in SERVERS[server]["on_socket"] + SERVERS[server]["capacity"]] \
        if host is None else \
        [part.format(host=host, port=port) for part in SERVERS[server]["on_port"]]
    return [str(system.bin_dir / server), *where, application]


def _render_units(system, user_unit):
    """The .socket and .service of a system unit, or of a user unit (no root, no nginx).
    With idle_stop, the system .socket (nginx's) starts the idle proxy instead, and the
    service has a socket of its own (see _render_idle_units)."""
    import shlex
    idle = system.idle_stop and not user_unit
    if user_unit:
        socket_path, socket_access = f"%t/{system.name}/{system.name}.sock", _USER_SOCKET_ACCESS
        identity, wanted_by = "", "default"
        hardening = _hardening(system, _USER_UNIT_DIRECTIVES.__contains__)
    else:
        socket_path, socket_access = system.socket_path, _fill(_SYSTEM_SOCKET_ACCESS,
                                                               web_group=_WEB_GROUP)
        identity, wanted_by = f"User={system.user}\nGroup={system.group}\n", "multi-user"
        hardening = _hardening(system)
    if idle:
        socket_access += _fill(_IDLE_SOCKET_SERVICE, name=system.name)
    socket = _fill(_SOCKET_UNIT, name=system.name, socket_path=socket_path,
                   socket_access=socket_access)
    service = _fill(_SERVICE_UNIT, name=system.name, server=system.server,
                    socket_unit=f"{system.name}{'-app' if idle else ''}.socket",
                    stop_when_unneeded="StopWhenUnneeded=yes\n" if idle else "",
                    service_type=SERVERS[system.server]["service_type"], identity=identity,
                    core_repo_dir=system.core_repo_dir,
                    exec_start=shlex.join(_server_command(system)), hardening=hardening,
                    wanted_by=wanted_by)
    return socket, service


def _hardening(system, keep=None):
    """_HARDENING filled in for the system: the lines whose directive ``keep`` takes, or all."""
    lines = _fill(_HARDENING, base_dir=system.base_dir).splitlines()
    return "".join(line + "\n" for line in lines if keep is None or keep(line.partition("=")[0]))


def _render_idle_units(system):
    """An installation that stops when idle: NAME.socket (nginx's) starts NAME-proxy.service,
    systemd-socket-proxyd, which requires NAME.service and passes each connection on to its
    own socket NAME-app.socket. The proxy exits after idle_stop seconds without a connection;
    then nothing needs NAME.service and systemd stops it (StopWhenUnneeded=yes). The next
    request waits in NAME.socket while both start: it is answered, not dropped."""
    name, backend = system.name, f"{system.run_dir}/app.sock"
    app_socket = _fill(_SOCKET_UNIT, name=f"{name} app", socket_path=backend,
                       socket_access=_fill(_APP_SOCKET_ACCESS, name=name, user=system.user,
                                           group=system.group))
    hardening = _hardening(system, lambda directive: directive not in _PROXY_REPLACES) \
        + _PROXY_HARDENING
    proxy = _fill(_PROXY_SERVICE_UNIT, name=name, idle_stop=system.idle_stop,
                  user=system.user, group=system.group, proxyd=_SOCKET_PROXYD,
                  backend=backend, hardening=hardening)
    return {f"{_SYSTEM_UNIT_DIR}/{name}-app.socket": app_socket,
            f"{_SYSTEM_UNIT_DIR}/{name}-proxy.service": proxy}


def _render_services(system):
    """The files of an installation outside its repo: absolute path -> text."""
    socket, service = _render_units(system, user_unit=False)
    user_socket, user_service = _render_units(system, user_unit=True)
    name = system.name
    user_dir = os.path.join(system.base_dir, ".config", "systemd", "user")
    return {
        f"{_SYSTEM_UNIT_DIR}/{name}.socket": socket,
        f"{_SYSTEM_UNIT_DIR}/{name}.service": service,
        **(_render_idle_units(system) if system.idle_stop else {}),
        **_render_scheduled_units(system),
        f"{_NGINX_DIR}/{name}.conf": _render_site(system),
        f"{_NGINX_DIR}/{_DEFAULT_SITE}.conf": _render_default_site(),
        os.path.join(user_dir, f"{name}.socket"): user_socket,
        os.path.join(user_dir, f"{name}.service"): user_service,
    }


def _render_scheduled_units(system):
    """The units of the jobs (a oneshot service and its timer each), the workers (a service
    each) and the backup (a oneshot service and its timer): the installation's user and the
    web process's sandbox, nothing as root."""
    units, identity = {}, dict(name=system.name, user=system.user, group=system.group,
                               hardening=_hardening(system))
    for job, declared in system.jobs.items():
        units.update(_render_job(system, identity, f"job {job}", declared["service"],
                                 declared["timer"], declared["calendar"],
                                 _job_command(system, declared["command"]),
                                 system.core_repo_dir))
    for worker, declared in system.background_workers.items():
        units[f"{_SYSTEM_UNIT_DIR}/{declared['service']}"] = _fill(
            _WORKER_SERVICE, worker=worker, core_repo_dir=system.core_repo_dir,
            exec_start=_job_command(system, declared["command"]), **identity)
    if system.backup:
        keep = system.backup["keep_count"] or f"{system.backup['keep_days']} days"
        units.update(_render_job(system, identity, f"backup (keep {keep})",
                                 system.backup["service"], system.backup["timer"],
                                 system.backup["calendar"], _backup_command(system),
                                 system.base_dir))
    return units


def _render_job(system, identity, what, service, timer, calendar, exec_start, directory):
    """A oneshot service and the timer that starts it: path -> text."""
    return {f"{_SYSTEM_UNIT_DIR}/{service}": _fill(_JOB_SERVICE, what=what,
                                                   working_directory=directory,
                                                   exec_start=exec_start, **identity),
            f"{_SYSTEM_UNIT_DIR}/{timer}": _fill(_JOB_TIMER, name=system.name, what=what,
                                                 calendar=calendar, service=service,
                                                 delay=_JOB_RANDOM_DELAY)}


def _job_command(system, command):
    """ExecStart= of a job's or worker's command (see _valid_command): the installation's
    Python imports aaa_script_setup first, as the seed says of scripts, then runs it."""
    import shlex
    kind, target, *arguments = command.split()
    if kind == "module":
        code = f'runpy.run_module("{target}", run_name="__main__", alter_sys=True)'
    elif kind == "script":
        code = f'runpy.run_path("{system.bin_dir}/{target}", run_name="__main__")'
    else:  # Django's command, as manage.py runs it
        code, arguments = ('sys.exit(__import__("stagetools_django").manage(["manage"] + '
                           'sys.argv[1:]))'), [target, *arguments]
    return shlex.join([str(system.python_path), "-c", f"import aaa_script_setup, runpy, sys; "
                       f"{code}", *arguments])


def _backup_command(system):
    """ExecStart= of the backup: root's copy of stagetools, run as the installation's user."""
    return f"/usr/bin/python3 -I {_ROOT_COPY} backup {system.name}"


def _render_default_site():
    """The host's nginx default site, the same for every installation."""
    return _fill(_NGINX_DEFAULT_SITE, acme_challenge_dir=_ACME_CHALLENGE_DIR)


def _render_site(system):
    """The nginx site: HTTPS on the host names with HTTP redirected to it (QUAL and PROD
    with host names), else HTTP on those and on NAME-with-dashes.localhost."""
    locations = _fill(_NGINX_LOCATIONS, name=system.name, static_url=system.static_url,
                      static_dir=system.static_dir, media_location=_media_location(system))
    if not system.is_https:
        return _fill(_NGINX_SITE, name=system.name, what=_NGINX_HTTP_WHAT,
                     socket_path=system.socket_path, port_80=locations, https_server="",
                     server_names=" ".join([f"{system.container}.localhost",
                                            *system.host_names]))
    names = " ".join(system.host_names)
    return _fill(_NGINX_SITE, name=system.name, what=_NGINX_HTTPS_WHAT,
                 socket_path=system.socket_path, server_names=names,
                 port_80=_fill(_NGINX_TO_HTTPS, acme_challenge_dir=system.acme_challenge_dir),
                 https_server=_fill(_NGINX_HTTPS_SERVER, server_names=names,
                                    certificate_dir=system.certificate_dir, locations=locations))


def _media_location(system):
    return _fill(_NGINX_MEDIA_LOCATION, media_url=system.media_url, media_dir=system.media_dir)


def _render_media_site(system):
    """The nginx site of the database host that keeps the installation's uploads: /media/
    only, by its local name (the balancer asks by that name)."""
    return _fill(_NGINX_MEDIA_SITE, name=system.name, media_url=system.media_url,
                 media_location=_media_location(system),
                 server_names=f"{system.container}.localhost")


def render_starter(system, requirements=None):
    """The files of a new repo for the installation, as ``new`` writes them below
    ``core_repo_dir``, its declaration (stagetools.ini) included: relative path -> text.
    ``requirements`` replaces those of the framework and database in setup.py (``adopt``
    keeps a project's own)."""
    import json
    django = system.framework == "django"
    modules = ["stagetools.py"] + (["stagetools_django.py"] if django else [])
    # A core repo is where the repo lives (the installation must know it to find its
    # declaration); a core app is declared, where the deploy side reads it too.
    arguments = [f"core_repo={json.dumps(system.core_repo)}"] \
        if system.core_repo != system.configuration else []
    values = dict(
        core_repo=system.core_repo, core_app=system.core_app, framework=system.framework,
        core_app_line=f"core_app = {system.core_app}\n"
        if system.core_app != system.core_repo else "",
        server=system.server, database=system.database,
        requirements=json.dumps(requirements or FRAMEWORKS[system.framework]["requirements"]
                                + DATABASES[system.database]["requirements"]),
        py_modules=json.dumps(["aaa_env_setup", "aaa_script_setup"]
                              + [module[:-3] for module in modules]),
        system_arguments=", ".join(arguments),
        job_line="job clearsessions = manage clearsessions @ daily" if django else
        f"job notes-report = module {system.core_app}.report @ daily",
        imports="import os\n\n" if django else "",
        settings_line='os.environ.setdefault("DJANGO_SETTINGS_MODULE", SYSTEM.django_settings)\n'
        if django else "")
    templates = {"setup.py": _STARTER_SETUP, "aaa_env_setup.py": _STARTER_ENV_SETUP,
                 DECLARATION_FILE: _STARTER_DECLARATION, **_STARTER_FILES[system.framework]}
    files = {_fill(path, **values): _fill(text, **values) for path, text in templates.items()}
    here = os.path.dirname(os.path.realpath(__file__))
    for module in modules:
        with open(os.path.join(here, module), encoding="utf-8") as file:
            files[module] = file.read()
    return files


# ---------------------------------------------------------------- checks
#
# Each check looks at one part of an installation and returns its facts, each fact a tuple
# (what, expected, actual); a fact holds when actual is expected. Checks change nothing.

_DIRECTORY, _REGULAR_FILE, _MISSING = "a directory", "a regular file", "missing"
# What the installation's own process must resolve as the deploy side did: every field but
# where its name came from (the rendered files are compared on disk) and what only the deploy
# side uses (its units run jobs, workers and backups; an older copy of stagetools in the repo
# does not know them).
_PROBED_FIELDS = [field for field in System.FIELDS if field not in (
    "name_source", "backups_dir", "jobs", "background_workers", "backup")]
_NO_ACCESS_FOR_GROUP_AND_OTHERS, _NO_ACCESS_FOR_OTHERS = \
    "no access for group and others", "no access for others"


def _fact(what, expected, holds, actual):
    return (what, expected, expected if holds else actual)


def _file_kind(path):
    """'a directory', 'a regular file', 'a symbolic link', ... or 'missing'; links not followed."""
    import stat
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return _MISSING
    for test, kind in ((stat.S_ISREG, _REGULAR_FILE), (stat.S_ISDIR, _DIRECTORY),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return kind
    return "a special file"


def _exists(lookup, name):
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _is_executable_file(path):
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _check_user_and_group(expected):
    """The installation's user and group exist."""
    import grp
    import pwd
    return [_fact("user", expected.user, _exists(pwd.getpwnam, expected.user), _MISSING),
            _fact("group", expected.group, _exists(grp.getgrnam, expected.group), _MISSING)]


def _check_base_dir(expected):
    """The base dir is the user's, and nobody else may write to it."""
    kind = _file_kind(expected.base_dir)
    if kind != _DIRECTORY:
        return [_fact("base_dir", _DIRECTORY, False, kind)]
    info = expected.base_dir.stat()
    return [_fact("base_dir owner", expected.user, _user_name(info.st_uid) == expected.user,
                  _user_name(info.st_uid)),
            _fact("base_dir mode", "not world-writable", not info.st_mode & 0o002,
                  f"{info.st_mode & 0o777:o}")]


def _check_code(expected):
    """The virtualenv's Python and the repo are there."""
    python, repo = expected.python_path, _file_kind(expected.core_repo_dir)
    return [_fact("python_path", "an executable file", _is_executable_file(python),
                  _file_kind(python)),
            _fact("core_repo_dir", _DIRECTORY, repo == _DIRECTORY, repo)]


def _check_layout(expected):
    """The virtualenv's and the installation's own directories are directories and
    pyvenv.cfg a file: none is a link, behind which another user's files could stand."""
    wanted = [(field, _DIRECTORY) for field in ("bin_dir", "lib_dir", "src_dir", "static_dir",
                                                "media_dir")]
    facts = [_fact(field, kind, _file_kind(getattr(expected, field)) == kind,
                   _file_kind(getattr(expected, field))) for field, kind in wanted]
    pyvenv = os.path.join(expected.venv_dir, "pyvenv.cfg")
    return facts + [_fact(pyvenv, _REGULAR_FILE, _file_kind(pyvenv) == _REGULAR_FILE,
                          _file_kind(pyvenv))]


def _check_units(expected):
    """Where systemd runs (a host booted with it): the socket is enabled and listening, the
    timers enabled and waiting, the workers enabled and running, and no other service of the
    installation has failed (a job's last run is _check_jobs')."""
    if not _systemd_runs():
        return []
    jobs = {job["service"] for job in _scheduled_jobs(expected).values()}
    units = [path.rpartition("/")[2] for path in expected.services
             if path.startswith(_SYSTEM_UNIT_DIR + "/") and path.rpartition("/")[2] not in jobs]
    try:
        states = _unit_states(units, "UnitFileState,ActiveState,SubState")
    except (OSError, ValueError) as error:
        return [_fact(f"unit {units[0]}", "known to systemd", False, f"systemctl: {error}")]
    workers = {worker["service"] for worker in expected.background_workers.values()}
    facts = []
    for unit, state in zip(units, states):
        actual = (f"{state.get('UnitFileState') or 'not installed'}, "
                  f"{state.get('ActiveState')} ({state.get('SubState')})")
        wanted = ("enabled, active (listening)" if unit == f"{expected.name}.socket" else
                  "enabled, active (waiting)" if unit.endswith(".timer") else
                  "enabled, active (running)" if unit in workers else None)
        running = wanted and wanted.replace("(listening)", "(running)").replace(
            "(waiting)", "(running)")  # a socket or timer that has started its service
        if wanted:
            facts.append(_fact(f"unit {unit}", wanted, actual in (wanted, running), actual))
        else:
            facts.append(_fact(f"unit {unit}", "not failed", state.get("ActiveState") != "failed",
                               actual))
    return facts


def _systemd_runs():
    """sd_booted(): whether systemd runs this host, so units have states to ask for."""
    return os.path.isdir("/run/systemd/system")


def _unit_states(units, properties):
    """What ``systemctl show`` says of each unit: a dict of ``properties`` (comma-separated)
    per unit, timestamps in UTC; OSError or ValueError if it cannot say."""
    import subprocess
    if not units:  # systemctl show without a unit shows the manager
        return []
    try:
        shown = subprocess.run(["systemctl", "show", f"--property=Id,{properties}", "--",
                                *units], capture_output=True, text=True, timeout=30, check=True,
                               env={"PATH": "/usr/bin:/bin", "TZ": "UTC", "LC_ALL": "C"}).stdout
    except subprocess.SubprocessError as error:
        raise ValueError(str(error)) from None
    states = [dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
              for block in shown.strip().split("\n\n")]
    if len(states) != len(units):
        raise ValueError(f"it told of {len(states)} units, not {len(units)}")
    return states


def _scheduled_jobs(expected):
    """The jobs and the backup of an installation: {'job NAME' or 'backup': declared}."""
    jobs = {f"job {name}": job for name, job in expected.jobs.items()}
    return dict(jobs, backup=expected.backup) if expected.backup else jobs


def _check_jobs(expected):
    """Where systemd runs: each job's and the backup's last run succeeded, and one ran within
    its period (since the timer started, for one that never ran): a job whose timer stopped,
    whose runs hang or that fails shows here, by name."""
    import time
    jobs = _scheduled_jobs(expected)
    if not (_systemd_runs() and jobs):
        return []
    try:
        services = _unit_states([job["service"] for job in jobs.values()],
                                "Result,ActiveState,ExecMainStatus,ExecMainStartTimestamp")
        timers = _unit_states([job["timer"] for job in jobs.values()],
                              "LastTriggerUSec,ActiveEnterTimestamp,ActiveState")
    except (OSError, ValueError) as error:
        return [_fact("jobs", "known to systemd", False, f"systemctl: {error}")]
    now = time.time()
    return [_job_fact(what, job, service, timer, now)
            for (what, job), service, timer in zip(jobs.items(), services, timers)]


def _job_fact(what, job, service, timer, now):
    """The fact of one job: its last run succeeded, and it ran within its period."""
    period = _calendar_period(job["calendar"])
    wanted = f"last run succeeded, one within {_duration(period)}"
    started = _timestamp(service.get("ExecMainStartTimestamp"))
    if service.get("Result") not in ("success", None) or service.get("ActiveState") == "failed":
        return _fact(what, wanted, False, f"last run failed ({service.get('Result')}, exit "
                     f"status {service.get('ExecMainStatus')}) at {_shown_time(started)}; see "
                     f"journalctl -u {job['service']}")
    since = _timestamp(timer.get("LastTriggerUSec")) or _timestamp(
        timer.get("ActiveEnterTimestamp"))
    if timer.get("ActiveState") == "active" and since and now - since > period + _JOB_LATE:
        running = service.get("ActiveState") == "activating"
        return _fact(what, wanted, False, f"{'running' if running else 'no run'} since "
                     f"{_shown_time(since)}")
    return _fact(what, wanted, True, None)


def _timestamp(text):
    """POSIX time of a timestamp systemctl shows in UTC ('Tue 2026-12-01 03:00:12 UTC'), or
    None for none."""
    import calendar
    import time
    try:
        return calendar.timegm(time.strptime(text or "", "%a %Y-%m-%d %H:%M:%S UTC"))
    except ValueError:
        return None


def _shown_time(seconds):
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds)) if seconds else "-"


def _duration(seconds):
    """'1 day', '6 h', '15 min', '30 s' or 'ever' (a calendar that elapses once)."""
    if seconds == float("inf"):
        return "ever"
    for unit, length in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            count = round(seconds / length, 1)
            return f"{count:g} {unit}{'s' if unit == 'day' and count != 1 else ''}"
    return f"{seconds:g} s"


def _calendar_period(calendar):
    """The longest time between two of the next elapses of a calendar, as systemd computes
    them (systemd-analyze calendar); infinity for one that elapses once or never."""
    import subprocess
    try:
        shown = subprocess.run(["systemd-analyze", "calendar", f"--iterations={_PERIOD_RUNS}",
                                "--", calendar], capture_output=True, text=True, timeout=30,
                               env={"PATH": "/usr/bin:/bin", "TZ": "UTC", "LC_ALL": "C"},
                               check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return float("inf")
    elapses = [_timestamp(line.split(": ", 1)[1].strip()) for line in shown.splitlines()
               if line.strip().startswith(("Next elapse:", "Iter. #"))]
    elapses = [elapse for elapse in elapses if elapse]
    return max((b - a for a, b in zip(elapses, elapses[1:])), default=float("inf"))


def _schedule_lines(expected):
    """A line per job, backup and worker of an installation, as systemd runs them: its
    calendar, its last run and how it went, its next run; a worker's state. For audits."""
    jobs, workers = _scheduled_jobs(expected), expected.background_workers
    if not (_systemd_runs() and (jobs or workers)):
        return []
    try:
        services = _unit_states([job["service"] for job in jobs.values()], "Result")
        timers = _unit_states([job["timer"] for job in jobs.values()],
                              "LastTriggerUSec,NextElapseUSecRealtime")
        running = _unit_states([worker["service"] for worker in workers.values()],
                               "ActiveState,SubState,NRestarts")
    except (OSError, ValueError) as error:
        return [f"{expected.name}: systemctl: {error}"]
    lines = [f"{expected.name} {what}: {job['calendar']}, last "
             f"{timer.get('LastTriggerUSec') or 'never'}"
             f"{' (' + service.get('Result', '') + ')' if timer.get('LastTriggerUSec') else ''}"
             f", next {timer.get('NextElapseUSecRealtime') or 'never'}"
             for (what, job), service, timer in zip(jobs.items(), services, timers)]
    return lines + [f"{expected.name} worker {worker}: {state.get('ActiveState')} "
                    f"({state.get('SubState')}), restarted {state.get('NRestarts')} times"
                    for worker, state in zip(workers, running)]


def _scheduled_unit_files(name):
    """The paths of the installation's units of jobs, workers and the backup in the system's
    unit directory: regular .service and .timer files (not an operator's drop-in dir)."""
    prefixes = tuple(f"{name}-{kind}" for kind in ("job-", "worker-", "backup."))
    try:
        return sorted(entry.path for entry in os.scandir(_SYSTEM_UNIT_DIR)
                      if entry.name.startswith(prefixes)
                      and entry.name.endswith((".service", ".timer"))
                      and entry.is_file(follow_symlinks=False))
    except OSError:
        return []


def _check_undeclared_units(expected):
    """No unit of a job, worker or backup that the installation no longer declares is left
    in the system's unit directory."""
    rendered = set(expected.services)
    return [_fact(f"file {path}", "not there: not declared", False, "there")
            for path in _scheduled_unit_files(expected.name) if path not in rendered]


def _check_backups(expected):
    """backups_dir, where it exists, and every file in it are the user's alone."""
    directory = str(expected.backups_dir)
    if not os.path.lexists(directory):
        return []
    if _file_kind(directory) != _DIRECTORY:
        return [_fact("backups_dir", _DIRECTORY, False, _file_kind(directory))]
    info = os.lstat(directory)
    exposed = sorted(entry.name for entry in os.scandir(directory)
                     if entry.stat(follow_symlinks=False).st_mode & 0o077
                     or _user_name(entry.stat(follow_symlinks=False).st_uid) != expected.user)
    return [_fact("backups_dir owner", expected.user, _user_name(info.st_uid) == expected.user,
                  _user_name(info.st_uid)),
            _fact("backups_dir mode", _NO_ACCESS_FOR_GROUP_AND_OTHERS, not info.st_mode & 0o077,
                  f"{info.st_mode & 0o777:o}"),
            _fact("backups_dir files", f"{expected.user}'s, {_NO_ACCESS_FOR_GROUP_AND_OTHERS}",
                  not exposed, f"not so: {' '.join(exposed[:5])}")]


def _private_file(what, path, user):
    """A regular file (not a link) of ``user`` that group and others cannot use."""
    kind = _file_kind(path)
    if kind != _REGULAR_FILE:
        return [_fact(what, _REGULAR_FILE, False, kind)]
    info = os.lstat(path)
    return [_fact(f"{what} owner", user, _user_name(info.st_uid) == user, _user_name(info.st_uid)),
            _fact(f"{what} mode", _NO_ACCESS_FOR_GROUP_AND_OTHERS, not info.st_mode & 0o077,
                  f"{info.st_mode & 0o777:o}")]


def _check_private_files(expected):
    """The secret key, the SQLite database (wherever its file exists: it holds the
    sessions) and the uploads are the user's; nginx's group may read uploads, nobody else."""
    facts = _private_file("secret_key_path", expected.secret_key_path, expected.user)
    if os.path.lexists(expected.database_sqlite_path):
        facts += _private_file("database_sqlite_path", expected.database_sqlite_path,
                               expected.user)
    if expected.database_host:  # its client certificate's key
        facts += _private_file("database key", os.path.join(
            expected.database_tls_dir, _DATABASE_TLS_FILES["sslkey"]), expected.user)
    if _file_kind(expected.media_dir) == _DIRECTORY:
        mode = expected.media_dir.stat().st_mode
        facts.append(_fact("media_dir mode", _NO_ACCESS_FOR_OTHERS, not mode & 0o007,
                           f"{mode & 0o7777:o}"))
    return facts


def _check_rendered_files(expected):
    """The units and the nginx sites are byte for byte as rendered, and
    the sites are enabled."""
    facts = []
    for path, text in expected.services.items():
        if path.startswith((_SYSTEM_UNIT_DIR, _NGINX_DIR)):
            difference = _text_difference(path, text)
            facts.append(_fact(f"file {path}", "as rendered", difference is None, difference))
        if path.startswith(_NGINX_DIR):
            link = path.replace("/sites-available/", "/sites-enabled/")
            enabled = os.path.islink(link) and os.path.realpath(link) == os.path.realpath(path)
            facts.append(_fact(f"site {link}", f"a link to {path}", enabled, _file_kind(link)))
    return facts


def _check_certificate(expected):
    """With HTTPS, as root (certbot keeps live/ to root): the certificate nginx serves is
    there, is not about to expire, and covers every host name."""
    import time
    if not expected.is_https or os.geteuid() != 0:
        return []
    path = expected.certificate_dir / "fullchain.pem"
    what, wanted = f"certificate {path}", "a certificate"
    try:  # certbot's live/ holds links into its archive/: the file, looked at, is read
        text = _read_regular_file(os.path.realpath(path), what, _CERTIFICATE_MAX_BYTES, None)
        not_after, names = _certificate_expiry_and_names(text)
    except FileNotFoundError:
        return [_fact(what, wanted, False, _MISSING)]
    except StagetoolsError as error:
        return [_fact(what, wanted, False, error.rule)]
    except ValueError:
        return [_fact(what, wanted, False, "no PEM certificate in it")]
    lacking = [name for name in expected.host_names if name not in names
               and f"*.{name.partition('.')[2]}" not in names]
    expiry = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_after))
    left = f"not expiring within {_CERTIFICATE_DAYS_LEFT} days"
    return [_fact(f"{what} expiry", left, not_after > time.time() + _CERTIFICATE_DAYS_LEFT * 86400,
                  f"expires {expiry}" if not_after > time.time() else f"expired {expiry}"),
            _fact(f"{what} names", f"covers {' '.join(expected.host_names)}", not lacking,
                  f"lacks {' '.join(lacking)}")]


def _certificate_expiry_and_names(pem):
    """(notAfter as POSIX time, DNS names of subjectAltName) of the first certificate in PEM
    text, as ``openssl x509`` reads them; ValueError if it reads none."""
    import calendar
    import subprocess
    import time
    try:
        result = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-ext",
                                 "subjectAltName"], input=pem, capture_output=True, text=True,
                                timeout=30, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                                check=False)
    except (OSError, subprocess.SubprocessError) as error:
        raise ValueError(f"openssl x509 did not run: {error}") from None
    lines = result.stdout.splitlines()
    if result.returncode != 0 or not lines or not lines[0].startswith("notAfter="):
        raise ValueError(f"openssl x509 read no certificate: {result.stderr.strip()[:200]}")
    # notAfter=Feb 28 12:00:00 2027 GMT; the names on the line after the extension's title
    not_after = calendar.timegm(time.strptime(lines[0][9:], "%b %d %H:%M:%S %Y GMT"))
    names = [entry.strip()[4:] for line in lines[2:3] for entry in line.split(",")
             if entry.strip().startswith("DNS:")] if len(lines) > 1 else []
    return not_after, names


def _text_difference(path, text):
    """None if the file at ``path`` holds ``text``, else what differs, in a few words."""
    if _file_kind(path) != _REGULAR_FILE:
        return _file_kind(path)
    try:
        with open(path, encoding="utf-8") as file:
            actual = file.read()
    except (OSError, UnicodeDecodeError) as error:
        return getattr(error, "strerror", None) or "not UTF-8 text"
    if actual == text:
        return None
    for number, (want, have) in enumerate(zip(text.splitlines() + [""],
                                              actual.splitlines() + [""]), 1):
        if want != have:
            return f"differs at line {number}: {have!r}"
    return "differs"


def _check_actual_system(expected):
    """The installation's own Python, run as its user, resolves the expected system (as its
    ``aaa_env_setup`` does) and may write its directories; raises _CouldNotCheck if it gives
    no usable answer."""
    import grp
    import pwd
    resolved = "resolved by the installation's Python"
    if not (_exists(pwd.getpwnam, expected.user) and _exists(grp.getgrnam, expected.group)
            and _is_executable_file(expected.python_path)):
        return [_fact("actual system", resolved, False,
                      "not asked: its user, group or Python is missing")]
    unsafe = _changeable_by_others(expected)
    if unsafe:  # root would run, as the user, what another user put there
        return [_fact("actual system", resolved, False, f"not asked: {unsafe}")]
    paths = [str(expected.static_dir), str(expected.media_dir)]
    answer = _probe_actual_system(expected, paths)
    wanted = expected.as_dict()
    versions = "" if answer["version"] == __version__ else \
        f" (it runs stagetools {answer['version']}, this check {__version__})"
    facts = [_fact("actual system", resolved, True, None)]
    for key in _PROBED_FIELDS:
        value = answer["system"].get(key, _MISSING)
        holds = type(value) is type(wanted[key]) and value == wanted[key]
        facts.append(_fact(f"actual {key}", wanted[key], holds,
                           value if value is _MISSING else f"{value}{versions}"))
    writable = "a directory writable by the user"
    return facts + [_fact(path, writable, os.path.isdir(path) and answer["writable"][path],
                          _MISSING if not os.path.exists(path) else "not writable by the user")
                    for path in paths]


def _changeable_by_others(expected):
    """Why another user than the installation's (or root) could change the Python that
    check runs, or None: the base dir, bin/ and the Python that bin/python leads to."""
    import pwd
    uid = pwd.getpwnam(expected.user).pw_uid
    for path, follow in ((expected.base_dir, False), (expected.bin_dir, False),
                         (expected.python_path, True)):
        try:
            info = os.stat(path) if follow else os.lstat(path)
        except OSError as error:
            return f"{path}: {error.strerror}"
        if info.st_uid not in (0, uid) or info.st_mode & 0o022:
            return (f"{os.path.realpath(path) if follow else path} belongs to "
                    f"{_user_name(info.st_uid)!r} with mode {info.st_mode & 0o777:o}: "
                    "others could change what check would run")
    return None


def _check_database_host(expected):
    """On a database host: the installation's user reaches its database by its certificate,
    over TLS, the server verified (Debian's psql, as the user, with what the installation
    itself uses; no code of the installation runs)."""
    import grp
    import pwd
    if not expected.database_host:
        return []
    what = f"database {expected.database_name} on {expected.database_host}"
    wanted = f"connected as {expected.database_user} by TLS, the server verified"
    if not (_exists(pwd.getpwnam, expected.user) and _exists(grp.getgrnam, expected.group)):
        return [_fact(what, wanted, False, "not asked: its user or group is missing")]
    switch = {} if _process_user_and_group()[0] == expected.user else dict(
        user=expected.user, group=expected.group, extra_groups=[])
    command = ["psql", "-XqAt", "-c", "select current_user, ssl from pg_stat_ssl "
               "where pid = pg_backend_pid()", database_url(expected)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(expected.base_dir), "LANG": "C.UTF-8"}
    try:
        returncode, stdout, stderr, problem = _run_bounded(command, env=env, cwd="/", **switch)
    except OSError as error:
        returncode, problem = None, f"psql did not start: {error.strerror}"
    answer = stdout.decode("utf-8", "replace").strip() if problem is None else ""
    if problem is None and returncode != 0:
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        problem = lines[-1] if lines else f"psql exited {returncode}"
    holds = problem is None and answer == f"{expected.database_user}|t"
    return [_fact(what, wanted, holds, _printable(problem or answer[:200]))]


_CHECKS = (_check_user_and_group, _check_base_dir, _check_code, _check_layout, _check_units,
           _check_private_files,
           _check_rendered_files, _check_certificate, _check_actual_system, _check_jobs,
           _check_undeclared_units, _check_backups, _check_database_host)
# Later than its period by more than this is late: the random delay, the timer's accuracy,
# and a long run.
_JOB_LATE = 300
_PERIOD_RUNS = 8  # elapses of a calendar looked at for its period


def check_installation(expected):
    """Compare an installation on disk with its expected system; change nothing.

    Returns ``(number of checks, differences, could_not_check)``: each difference a
    tuple ``(what, expected, actual)``; ``could_not_check`` None, or why the
    installation's own Python gave no usable answer (then the check is incomplete).
    """
    facts, could_not_check = [], None
    for check in _CHECKS:
        try:
            facts += check(expected)
        except _CouldNotCheck as error:
            could_not_check = error.rule
    return len(facts), [fact for fact in facts if fact[1] != fact[2]], could_not_check


def _probe_actual_system(expected, paths):
    """What the installation's Python, run as its user, answers the probe. Nothing it
    prints is trusted: an answer must have the probe's shape."""
    import json
    options = {"repo": str(expected.core_repo_dir), "paths": paths}
    switch = {}
    if _process_user_and_group()[0] != expected.user:
        if os.geteuid() != 0:
            raise StagetoolsError(f"check {expected.name}", "it runs the installation's Python "
                                  "as its user", f"run it as root or as {expected.user}")
        switch = dict(user=expected.user, group=expected.group, extra_groups=[])
    env = {"PATH": "/usr/bin:/bin", "HOME": str(expected.base_dir), "LANG": "C.UTF-8"}
    command = [str(expected.python_path), "-B", "-I", "-c", _PROBE, json.dumps(options)]
    try:
        returncode, stdout, stderr, problem = _run_bounded(command, env=env, cwd="/", **switch)
    except OSError as error:
        returncode, problem = None, f"did not start: {error.strerror}"
    if problem is None and returncode != 0:
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        problem = f"exited {returncode}: {lines[-1] if lines else 'no message'}"
    if problem is None:
        try:
            answer = json.loads(stdout.decode("utf-8"))
        except (ValueError, RecursionError):  # also UnicodeDecodeError; nested too deep
            answer = None
        if not _is_probe_answer(answer, paths):
            problem = f"printed something else than its system: {stdout[:80]!r}"
    if problem is not None:
        raise _CouldNotCheck(f"could not check {expected.name}", f"its Python {problem}",
                             "repair the installation (see why), then check again")
    return answer


def _is_probe_answer(answer, paths):
    """Whether ``answer`` has the shape of what the probe prints: a version, a system of
    JSON scalars, lists of text and objects of those (jobs: an older or newer stagetools may
    have other fields), and whether each path is writable."""
    if not (isinstance(answer, dict) and set(answer) == {"version", "system", "writable"}):
        return False
    system, writable = answer["system"], answer["writable"]
    return (isinstance(answer["version"], str) and isinstance(system, dict)
            and all(_is_probed_value(value, depth=3 if key in _SCHEDULED_FIELDS else 1)
                    for key, value in system.items())
            and isinstance(writable, dict) and set(writable) == set(paths)
            and all(isinstance(value, bool) for value in writable.values()))


# The fields whose values are objects (see _scheduled); in the probe's answer only these.
_SCHEDULED_FIELDS = ("jobs", "background_workers", "backup")


def _is_probed_value(value, depth):
    """A value of the probe's system: None, text, a number, a list of text, or an object of
    such values nested at most ``depth`` deep."""
    if isinstance(value, dict):
        return depth > 1 and all(isinstance(key, str) and _is_probed_value(item, depth - 1)
                                 for key, item in value.items())
    return value is None or isinstance(value, (str, int)) or isinstance(value, list) and all(
        isinstance(item, str) for item in value)


def _run_bounded(command, **kwargs):
    """Run an installation's command: ``(exit code, stdout, stderr, problem)``, each output
    at most _PROBE_OUTPUT_LIMIT bytes, within _PROBE_TIMEOUT seconds; ``problem`` says
    which bound it broke (its whole process group is then killed), or is None."""
    import selectors
    import signal
    import subprocess
    import time
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True, **kwargs)
    outputs = {process.stdout: bytearray(), process.stderr: bytearray()}
    deadline = time.monotonic() + _PROBE_TIMEOUT
    problem = None
    with process, selectors.DefaultSelector() as selector:
        for stream in outputs:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map() and problem is None:
            ready = selector.select(max(0.0, deadline - time.monotonic()))
            if not ready:
                problem = f"gave no answer within {_PROBE_TIMEOUT} s"
            for key, _events in ready:
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                outputs[key.fileobj] += chunk
                if len(outputs[key.fileobj]) > _PROBE_OUTPUT_LIMIT:
                    problem = f"printed more than {_PROBE_OUTPUT_LIMIT} bytes"
        if problem is None:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problem = f"did not exit within {_PROBE_TIMEOUT} s"
        if problem is not None:  # its children too: it may have started some
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass
    return (process.returncode, bytes(outputs[process.stdout]), bytes(outputs[process.stderr]),
            problem)


# ---------------------------------------------------------------- command line


def _say(text, stream=None):
    """A line of the command line's output, on stdout or ``stream``, written at once."""
    stream = stream or sys.stdout
    stream.write(f"{text}\n")
    stream.flush()


def _printable(value):
    """``value`` as text safe for a terminal: control characters shown as escapes."""
    text = str(value)
    return text if text.isprintable() else "".join(
        char if char.isprintable() else repr(char)[1:-1] for char in text)


def _show_table(system):
    rows = [(key, value) for key, value in system.as_dict().items() if key != "services"]
    width = max(len(key) for key, value in rows)
    lines = [f"{key:<{width}}  {_shown(value)}" for key, value in rows]
    lines.append(f"{'services':<{width}}  {', '.join(system.services) or '-'}")
    return "\n".join(lines)


def _shown(value):
    """A value of show's table as it is declared: jobs and workers as 'NAME: COMMAND @
    CALENDAR', the backup as 'keep 7 @ daily'; '-' for none."""
    if not isinstance(value, dict):
        return "-" if value is None else value
    if "keep_count" in value:
        keep = value["keep_count"] or f"{value['keep_days']}d"
        return f"keep {keep} @ {value['calendar']}"
    return "; ".join(f"{name}: {item['command']}" + (f" @ {item['calendar']}" if "calendar"
                                                     in item else "")
                     for name, item in value.items()) or "-"


# Every option of the command line, once; each command picks the ones it takes.
_OPTIONS = {
    "name": dict(nargs="?", help="installation name, e.g. shop_prod"),
    "--expected": dict(action="store_true", help="what a deploy tool should build"),
    "--base-dir": dict(help="base dir of the expected installation (default /home/NAME)"),
    "--core-repo": dict(help="repo below src/ (default: the configuration)"),
    "--core-app": dict(help="main Python package (default: the core repo)"),
    "--framework": dict(choices=FRAMEWORKS, help="default: django"),
    "--server": dict(choices=SERVERS, help="default: the framework's first (gunicorn; "
                     "uvicorn for starlette)"),
    "--database": dict(choices=DATABASES, help="default: sqlite"),
    "--host-name": dict(action="append", metavar="NAME", dest="host_names",
                        help="a public host name of the site (repeat for more); QUAL and PROD "
                        "with host names serve HTTPS (default: the repo's host_names)"),
    "--declaration": dict(metavar="FILE", help="the stagetools.ini to take the choices from, "
                          "instead of the repo's in src/ (a deploy tool's copy of the version "
                          "it deploys)"),
    "--python": dict(default=sys.executable, help="the Python of the venv; its user must be "
                     "able to run it (default: this one)"),
    "--json": dict(action="store_true", help="one JSON object, for machines"),
    "--all": dict(action="store_true", help="every installation of this host (users whose "
                  "home is a virtualenv named like them), a line each"),
    "--label": dict(default="scheduled", help="the backup's label, a-z, 0-9 and - "
                    "(default: scheduled)"),
    "--database-only": dict(action="store_true", help="the database without media/ (before "
                            "a migration)"),
}


def _parser():
    import argparse

    class _ArgumentParser(argparse.ArgumentParser):
        def error(self, message):  # bad options: our one-line message and exit code 2
            raise StagetoolsError(self.prog, message, f"see {self.prog} --help")

    def command(name, help, *options, positional=None):
        parser = commands.add_parser(name, help=help)
        for option in options:
            parser.add_argument(option, **_OPTIONS[option])
        if positional:  # after the name, if it takes one
            parser.add_argument(positional[0], **positional[1])
        return parser

    parser = _ArgumentParser(prog="stagetools", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    for name, (help, options, positional) in _COMMANDS.items():
        command(name, help, *options, positional=positional)
    return parser


_SYSTEM_OPTIONS = ("--core-repo", "--core-app", "--framework", "--server", "--database",
                   "--host-name", "--json")
# Each command: its help, its options (of _OPTIONS), and a positional argument of its own.
_COMMANDS = {
    "show": ("the actual system, or the expected one",
             ("name", "--expected", "--base-dir", "--declaration", *_SYSTEM_OPTIONS), None),
    "new": ("create an installation to start with: a venv named like the installation, a "
            "starter repo (with its declaration), its database",
            ("--framework", "--server", "--database", "--core-repo", "--core-app", "--python"),
            ("directory", dict(help="the new installation's dir, named like it: "
                                    "/tmp/shop_dev"))),
    "adopt": ("adopt a Django project made by django-admin startproject, in place, or refuse "
              "and change nothing; prints the commands that make its DEV installation",
              ("--database", "--core-repo", "--core-app"),
              ("directory", dict(help="the project's top directory, with manage.py"))),
    "check": ("compare an installation on disk with its expected system; exit 1 on any "
              "difference, 3 if it could not be checked",
              ("name", "--all", "--base-dir", "--declaration", *_SYSTEM_OPTIONS), None),
    "run": ("as root: run a job of a deployed installation now, as its user and the way its "
            "timer would (backup: its backup); exit 1 if it fails", ("name",),
            ("job", dict(help="the job's name, or backup"))),
    "backup": ("as the installation's user: back its database and media/ up into its "
               "backups dir, then keep what its declaration says (what its backup unit runs)",
               ("name", "--label", "--database-only"), None),
    "restore": ("as the installation's user, while its service is stopped (the deploy tool's "
                "restore does that): restore one of its backups", ("name",),
                ("backup", dict(help="the backup's name, STAMP-LABEL"))),
}


def _cmd_show(args):
    import json
    options = dict(core_repo=args.core_repo, core_app=args.core_app,
                   framework=args.framework, server=args.server, database=args.database,
                   host_names=args.host_names)
    if args.expected:
        system = get_expected_system_from_name(args.name, base_dir=args.base_dir,
                                               declared=_declared_in(args), **options)
    elif args.base_dir or args.declaration:
        raise StagetoolsError("--base-dir" if args.base_dir else "--declaration", "it needs "
                              "--expected: the actual system is what this process runs in",
                              "add --expected or leave it out")
    else:
        system = get_actual_system_from_name(args.name, **options)
    # The JSON carries the version that made it: a deploy tool's and an installation's
    # copies of stagetools may differ.
    _say(json.dumps(dict(system.as_dict(), stagetools_version=__version__), indent=2)
         if args.json else _show_table(system))
    return 0


def _declared_in(args):
    """The choices of --declaration FILE, or None: the repo's own."""
    if not args.declaration:
        return None
    if not os.path.lexists(args.declaration):
        raise StagetoolsError(f"--declaration '{args.declaration}'", "there is no such file",
                              "give the stagetools.ini of the version to deploy")
    return read_declaration(None, args.name, args.declaration)


def _run(command, what):
    import shlex
    import subprocess
    _say("+ " + shlex.join(str(part) for part in command))
    try:
        returncode = subprocess.run(command, timeout=_STEP_TIMEOUT, check=False).returncode
    except subprocess.TimeoutExpired:
        raise StagetoolsError(f"{what} did not finish", f"it ran longer than {_STEP_TIMEOUT} s "
                              "(command above)", "check the network and the package index, "
                              "then run again") from None
    except OSError as error:
        returncode = error
    if returncode != 0:
        raise StagetoolsError(f"{what} failed", f"the command above gave {returncode}",
                              "fix its error and run again")


def _cmd_new(args):
    import shlex
    from pathlib import Path
    # Resolved once, then only this path: a link in the given one could be re-pointed.
    directory = Path(os.path.realpath(args.directory))
    system = get_expected_system_from_name(directory.name, base_dir=directory,
                                           core_repo=args.core_repo, core_app=args.core_app,
                                           framework=args.framework, server=args.server,
                                           database=args.database)
    if "." in system.core_app:
        raise StagetoolsError(f"--core-app {system.core_app}", "new makes the core app a "
                              "package at the top of the repo", "give a name without dots")
    _refuse_a_directory_others_could_swap(directory)
    starter = render_starter(system)
    created = not os.path.lexists(directory)
    if created:  # made here, before anyone else can: in /tmp another user could be quicker
        try:
            os.mkdir(directory, 0o700)
        except OSError as error:
            raise StagetoolsError(f"cannot create '{directory}'", error.strerror,
                                  "choose a new directory") from None
    # Everything new makes is its user's alone (the database, the key, the venv); nginx
    # reads static/ only, and Django's storage gives the files there their own modes.
    umask = os.umask(0o077)
    try:
        _build_new_installation(system, starter, args.python)
    except BaseException as error:  # leave nothing half-written: the directory as it was
        _undo_new(directory, created)
        if isinstance(error, OSError):
            raise StagetoolsError(f"new {system.name}", f"{error.strerror}: "
                                  f"'{error.filename}'", "fix that, then run new again") from None
        raise
    finally:
        os.umask(umask)
    _say(f"\nCreated {system.name} ({system.stage.label}, {system.database}) in {directory}. "
         "Serve it with one of:")
    for server in FRAMEWORKS[system.framework]["servers"]:
        _say("  " + shlex.join(_server_command(system, "127.0.0.1", 8000, server)))
    return 0


def _build_new_installation(system, starter, python):
    """The steps of `new` in the installation's directory: venv, repo, install, database."""
    _run([python, "-m", "venv", system.base_dir], "creating the virtualenv")
    for relative, text in starter.items():
        target = system.core_repo_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    system.static_dir.mkdir(mode=0o755, exist_ok=True)
    system.static_dir.chmod(0o755)
    system.media_dir.mkdir(mode=0o700, exist_ok=True)
    _run([system.pip_path, "install", "--quiet", "--editable", system.core_repo_dir],
         "installing the starter repo and its requirements")
    if system.framework == "django":
        manage = [system.python_path, system.manage_py_path]
        _run(manage + ["makemigrations", system.core_app], "making the first migration")
        _run(manage + ["migrate", "--no-input"], "migrating the database")
    else:
        _run([system.python_path, "-m", system.core_app], "creating the tables")


def _undo_new(directory, created):
    """Remove what `new` made: the directory if it made it, else what is in it."""
    import shutil
    if created:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink()


def _refuse_a_directory_others_could_swap(directory):
    """`new` builds programs that its user (root, say) runs: refuse a directory that another
    user owns, or one in a directory where others may rename entries (no sticky bit)."""
    import stat
    me = os.geteuid()
    try:
        info = os.lstat(directory)
        full = stat.S_ISDIR(info.st_mode) and any(os.scandir(directory))
    except FileNotFoundError:
        info = None
    except OSError as error:
        raise StagetoolsError(f"'{directory}'", f"cannot look at it: {error.strerror}",
                              "choose a directory you can read") from None
    if info is not None and (not stat.S_ISDIR(info.st_mode) or full):
        raise StagetoolsError(f"'{directory}'", "it exists and is not an empty directory",
                              "choose a new directory or remove this one")
    if info is not None and info.st_uid != me:
        owner = _user_name(info.st_uid)
        raise StagetoolsError(f"'{directory}'", f"it belongs to {owner!r}, not to "
                              f"{_user_name(me)!r}, who runs new: {owner} could swap what new "
                              "builds there", f"remove it, or run new as {owner}")
    parent = os.path.dirname(os.path.realpath(directory))
    while True:
        try:
            info = os.stat(parent)
        except OSError as error:
            raise StagetoolsError(f"'{parent}'", f"cannot look at it: {error.strerror}",
                                  "new makes the installation's directory, not its "
                                  "parents: create them first") from None
        if info.st_uid not in (0, me):
            raise StagetoolsError(f"'{parent}'", f"it belongs to {_user_name(info.st_uid)!r}, "
                                  "who could swap what new builds below it",
                                  "choose a directory below your own or root's")
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise StagetoolsError(f"'{parent}'", "it is writable by others without the sticky "
                                  "bit: they could swap what new builds below it",
                                  f"choose another directory, or chmod go-w '{parent}'")
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


def _cmd_adopt(args):
    try:
        import stagetools_django  # Django-only code: next to this file, as new copies it
    except ImportError:
        raise StagetoolsError("adopt", "it needs stagetools_django.py next to stagetools.py",
                              "copy both modules") from None
    return stagetools_django.adopt(args.directory, args.database, args.core_repo,
                                   args.core_app)


def _cmd_check(args):
    import json
    if args.all:
        return _check_all(args)
    if not args.name:
        raise StagetoolsError("check", "it needs the installation's name, or --all",
                              "stagetools check shop_prod")
    given = dict(core_repo=args.core_repo, core_app=args.core_app, framework=args.framework,
                 server=args.server, database=args.database, host_names=args.host_names)
    # Root's record of a deployment says what was deployed, unless the deploy tool asks
    # about another version (--declaration) or another place (--base-dir).
    record = None if args.declaration or args.base_dir else _read_record(args.name)
    try:
        expected = _expected_from_record(record, **given) if record else \
            get_expected_system_from_name(args.name, base_dir=args.base_dir,
                                          declared=_declared_in(args), **given)
    except _BadDeclaration as error:
        raise _CouldNotCheck(f"could not check {args.name}", str(error)) from None
    report = _check_report(expected)
    if args.json:
        _say(json.dumps(report, indent=2))
    elif report["differences"]:
        _say(f"{expected.name}: {len(report['differences'])} of {report['checks']} checks differ")
        rows = [("what", "expected", "actual")] + [
            tuple(_printable(difference[key])[:200] for key in ("what", "expected", "actual"))
            for difference in report["differences"]]
        widths = [max(len(row[column]) for row in rows) for column in range(2)]
        for what, want, have in rows:
            _say(f"{what:<{widths[0]}}  {want:<{widths[1]}}  {have}")
    elif not report["could_not_check"]:
        _say(f"{expected.name}: all {report['checks']} checks hold")
    if report["could_not_check"]:
        raise _CouldNotCheck(f"could not check {expected.name}", report["could_not_check"])
    return 1 if report["differences"] else 0


def _installed_system(name, as_user=False):
    """The expected system of an installation of this host: as root's record of its
    deployment says, else from its name alone (installed by hand); with ``as_user``, refused
    unless this process runs as its user."""
    if not name:
        raise StagetoolsError("the command", "it needs the installation's name",
                              "for example: stagetools backup shop_prod")
    record = _read_record(name)
    system = _expected_from_record(record) if record else get_expected_system_from_name(name)
    me = _process_user_and_group()[0]
    if as_user and me != system.user:
        raise StagetoolsError(f"{me} for {name}", f"it runs as the installation's user "
                              f"{system.user}, in whose files it writes", "as root: systemctl "
                              f"start {name}-backup.service, or the restore playbook")
    return system


def _cmd_backup(args):
    system = _installed_system(args.name, as_user=True)
    stem = _back_up(system, args.label, media=not args.database_only)
    _say(f"{system.name}: {'backed up as ' + stem if stem else 'nothing to back up yet'} in "
         f"{system.backups_dir}")
    return 0


def _cmd_restore(args):
    system = _installed_system(args.name, as_user=True)
    restored = _restore_backup(system, args.backup)
    _say(f"{system.name}: restored {', '.join(restored)} from {system.backups_dir}")
    return 0


def _cmd_run(args):
    """Start a job's service as its timer would, wait for its end, say how it went."""
    import subprocess
    import time
    system = _installed_system(args.name)
    jobs = _scheduled_jobs(system)
    what = "backup" if args.job == "backup" else f"job {args.job}"
    if what not in jobs:
        raise StagetoolsError(f"{args.name} {what}", "it is not declared",
                              f"run one of: {', '.join(jobs) or 'none is declared'}")
    if os.geteuid() != 0 or not _systemd_runs():
        raise StagetoolsError(f"run {args.name} {args.job}", "it starts the job's unit as its "
                              "timer would", "run it as root on the host, where systemd runs")
    unit, started = jobs[what]["service"], time.monotonic()
    try:
        subprocess.run(["systemctl", "start", unit], stdin=subprocess.DEVNULL, check=False,
                       timeout=_BACKUP_TIMEOUT, capture_output=True)
    except subprocess.TimeoutExpired:
        raise StagetoolsError(f"run {args.name} {args.job}", f"{unit} did not end within "
                              f"{_BACKUP_TIMEOUT} s", f"see journalctl -u {unit}") from None
    try:
        state, = _unit_states([unit], "LoadState,Result,ExecMainStatus,InvocationID")
    except ValueError as error:
        raise StagetoolsError(f"run {args.name} {args.job}", f"systemd does not say how {unit} "
                              f"went: {error}", "see journalctl -u " + unit) from None
    if state.get("LoadState") != "loaded":  # systemd shows a unit it does not know as a success
        raise StagetoolsError(f"run {args.name} {args.job}", f"systemd does not know {unit}",
                              "deploy the installation first")
    seconds = time.monotonic() - started
    if state.get("Result") == "success":
        _say(f"{system.name} {what}: succeeded in {seconds:.1f} s ({unit})")
        return 0
    lines = subprocess.run(["journalctl", "--no-pager", "--output=cat", "--lines=10",
                            f"_SYSTEMD_INVOCATION_ID={state.get('InvocationID')}"],
                           capture_output=True, text=True, timeout=30, check=False).stdout
    for line in lines.splitlines():
        _say(f"  {_printable(line)[:300]}")
    _say(f"{system.name} {what}: failed ({state.get('Result')}, exit status "
         f"{state.get('ExecMainStatus')}) after {seconds:.1f} s; journalctl -u {unit}")
    return 1


def _check_report(expected):
    """check_installation as JSON: {name, ok, checks, could_not_check, differences}."""
    checks, differences, could_not_check = check_installation(expected)
    return {"name": expected.name, "ok": not differences and not could_not_check,
            "checks": checks, "could_not_check": could_not_check,
            "differences": [{"what": what, "expected": want, "actual": have}
                            for what, want, have in differences]}


def _check_all(args):
    """Every installation of this host, a line each (or one JSON object): 3 if one could
    not be checked, else 1 if one differs."""
    import json
    given = [option for option in ("name", "base_dir", "core_repo", "core_app", "framework",
                                   "server", "database", "host_names", "declaration")
             if getattr(args, option)]
    if given:
        raise StagetoolsError(f"check --all with {given[0]}", "each installation is checked "
                              "as its repo declares it", "leave the other options out")
    if os.geteuid() != 0:
        raise StagetoolsError("check --all", "it runs each installation's Python as its user",
                              "run it as root")
    reports = _check_reports(_installations_on_this_host())
    if args.json:
        _say(json.dumps({"ok": all(r["ok"] for r in reports), "installations": reports},
                        indent=2))
    else:
        _say("\n".join(_summary_lines(reports)) or "no installations on this host (none in "
             "root's records, no user whose home is a virtualenv named like it)")
    if any(r["could_not_check"] for r in reports):
        return 3
    return 1 if any(r["differences"] for r in reports) else 0


def _check_reports(installations):
    """The reports of check for ``installations`` (name -> base dir, None: root's record),
    several at once: the checks wait on the installations' Pythons."""
    from concurrent.futures import ThreadPoolExecutor

    def report(found):
        name, base_dir = found
        try:
            return _check_report(_expected_on_this_host(name, base_dir))
        except (StagetoolsError, OSError) as error:
            return {"name": name, "ok": False, "checks": 0, "could_not_check": str(error),
                    "differences": []}

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(report, installations.items()))


def _summary_lines(reports):
    """A line per installation's report, for people."""
    width = max([len(r["name"]) for r in reports] or [0])
    return [f"{r['name']:<{width}}  {_printable(_summary(r))[:300]}" for r in reports]


def _summary(report):
    """One installation's check in a few words."""
    if report["could_not_check"]:
        return f"could not check: {report['could_not_check']}"
    if report["differences"]:
        return (f"{len(report['differences'])} of {report['checks']} checks differ: "
                + ", ".join(difference["what"] for difference in report["differences"]))
    return f"all {report['checks']} checks hold"


def _installations_on_this_host():
    """name -> base dir of each installation of this host: those of root's records (what a
    deploy tool deployed; base dir None), and each other user named like an installation
    whose home is a virtualenv of that name (installed by hand)."""
    import pwd
    try:
        found = {entry.name[:-5]: None for entry in os.scandir(_RECORD_DIR)
                 if entry.name.endswith(".json") and _name_problem(entry.name[:-5]) is None}
    except FileNotFoundError:
        found = {}
    for entry in pwd.getpwall():
        home = os.path.normpath(entry.pw_dir or "/")
        if (entry.pw_name not in found and _name_problem(entry.pw_name) is None
                and os.path.basename(home) == entry.pw_name
                and _file_kind(os.path.join(home, "pyvenv.cfg")) == _REGULAR_FILE):
            found[entry.pw_name] = home
    return dict(sorted(found.items()))


def _expected_on_this_host(name, base_dir):
    """The expected system of an installation of this host: as root's record says, or for
    one installed by hand, its repo src/<the configuration>, or else the one repo in src/
    that holds stagetools.py."""
    if base_dir is None:
        return _expected_from_record(_read_record(name))
    configuration = parse_name(name)[0]
    src = os.path.join(base_dir, "src")
    if _file_kind(os.path.join(src, configuration)) == _DIRECTORY:
        return get_expected_system_from_name(name, base_dir=base_dir)
    try:
        repos = sorted(entry.name for entry in os.scandir(src) if entry.is_dir(
            follow_symlinks=False) and os.path.isfile(os.path.join(entry.path, "stagetools.py")))
    except OSError as error:
        raise StagetoolsError(f"'{src}'", f"cannot list it: {error.strerror}",
                              "run check as root") from None
    if len(repos) != 1:
        raise StagetoolsError(f"'{src}'", f"it holds {len(repos)} repos with stagetools.py, "
                              "not one", f"check it alone: stagetools check {name} --core-repo "
                              "REPO")
    return get_expected_system_from_name(name, base_dir=base_dir, core_repo=repos[0])


def main(argv=None):
    """The command line: returns the exit code (0 fine, 1 a difference, 2 bad input,
    3 an installation that could not be checked)."""
    command = None
    try:
        args = _parser().parse_args(argv)
        command = args.command
        if args.command not in ("show", "adopt") and os.name != "posix":
            raise StagetoolsError(args.command, "it works on Linux installations (users, venvs "
                                  "with bin/, systemd)", "run it on the server")
        return {"show": _cmd_show, "new": _cmd_new, "adopt": _cmd_adopt, "check": _cmd_check,
                "run": _cmd_run, "backup": _cmd_backup, "restore": _cmd_restore}[
            args.command](args)
    except _CouldNotCheck as error:
        _say(f"stagetools: {_printable(error)}", sys.stderr)
        return 3
    except StagetoolsError as error:
        _say(f"stagetools: error: {_printable(error)}", sys.stderr)
        return 2
    except BrokenPipeError:  # `stagetools show | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:  # what no step foresaw: still one line, never a traceback
        _say(f"stagetools: error: {_printable(error)}", sys.stderr)
        return 3 if command == "check" else 2


# ---------------------------------------------------------------- templates
#
# Every file stagetools renders or writes, file-shaped, with $placeholders that _fill
# fills in ($$ is a literal $). Values are checked before they get here (see the naming
# rules and _valid_base_dir): nothing is escaped into a file.

_SOCKET_UNIT = """\
[Unit]
Description=$name socket (stagetools)

[Socket]
ListenStream=$socket_path
$socket_access

[Install]
WantedBy=sockets.target
"""
# systemd makes the socket's directory, root's: the user cannot swap the socket for a link
# there while systemd's helper sets its owner by path. The socket's own mode keeps others out.
_SYSTEM_SOCKET_ACCESS = """\
SocketGroup=$web_group
SocketMode=0660
DirectoryMode=0755"""
_USER_SOCKET_ACCESS = """\
SocketMode=0600
DirectoryMode=0700"""
_SERVICE_UNIT = """\
[Unit]
Description=$name ($server, stagetools)
Requires=$socket_unit
After=network.target $socket_unit
${stop_when_unneeded}
[Service]
Type=$service_type
${identity}WorkingDirectory=$core_repo_dir
ExecStart=$exec_start
KillMode=mixed
Restart=on-failure
${hardening}
[Install]
WantedBy=$wanted_by.target
"""
# Each line is explained in the README's table "Hardening of the system unit".
_HARDENING = """\
UMask=0077
ProtectSystem=strict
ProtectHome=tmpfs
BindPaths=$base_dir
ReadOnlyPaths=-$base_dir/bin -$base_dir/lib -$base_dir/src -$base_dir/static -$base_dir/releases
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
# A job: its oneshot service (a start while it runs is no second run) and its timer.
_JOB_SERVICE = """\
[Unit]
Description=$name $what (stagetools)
After=network.target

[Service]
Type=oneshot
User=$user
Group=$group
WorkingDirectory=$working_directory
ExecStart=$exec_start
${hardening}"""
# Persistent: a run missed while the host was down comes at its start. The delay, fixed per
# unit and host, keeps the installations of a host from starting their jobs all at once.
_JOB_TIMER = """\
[Unit]
Description=$name $what: $calendar (stagetools)

[Timer]
OnCalendar=$calendar
Persistent=true
RandomizedDelaySec=$delay
FixedRandomDelay=true
AccuracySec=1s
Unit=$service

[Install]
WantedBy=timers.target
"""
_JOB_RANDOM_DELAY = "30s"
_WORKER_SERVICE = """\
[Unit]
Description=$name worker $worker (stagetools)
After=network.target

[Service]
Type=exec
User=$user
Group=$group
WorkingDirectory=$core_repo_dir
ExecStart=$exec_start
KillMode=mixed
Restart=on-failure
RestartSec=2s
${hardening}
[Install]
WantedBy=multi-user.target
"""
# The idle proxy (_render_idle_units): the installation's user, no network, no home.
_SOCKET_PROXYD = "/usr/lib/systemd/systemd-socket-proxyd"
_PROXY_SERVICE_UNIT = """\
[Unit]
Description=$name idle proxy: starts $name.service, stops it after $idle_stop s idle (stagetools)
Requires=$name.service $name.socket
After=$name.service $name.socket

[Service]
# exec: systemd-socket-proxyd (252) sends no READY=1; requests wait in the socket meanwhile
Type=exec
User=$user
Group=$group
ExecStart=$proxyd --exit-idle-time=${idle_stop}s $backend
${hardening}"""
# Only the proxy (the installation's user) may connect to the app's own socket.
_APP_SOCKET_ACCESS = """\
SocketUser=$user
SocketGroup=$group
SocketMode=0600
Service=$name.service"""
# nginx's socket of an installation that stops when idle starts the proxy, not the app.
_IDLE_SOCKET_SERVICE = """
Service=$name-proxy.service"""
_PROXY_REPLACES = {"ProtectHome", "BindPaths", "ReadOnlyPaths", "RestrictAddressFamilies"}
_PROXY_HARDENING = """\
ProtectHome=yes
PrivateNetwork=yes
RestrictAddressFamilies=AF_UNIX
"""
# Valid in user units too: the rest needs namespaces a user manager may not have.
_USER_UNIT_DIRECTIVES = {"UMask", "NoNewPrivileges", "LockPersonality", "RestrictRealtime",
                         "RestrictSUIDSGID", "RestrictNamespaces", "RestrictAddressFamilies",
                         "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber"}
# The site: on port 80 the locations (HTTP), or challenges and a redirect to the HTTPS
# server that follows (QUAL and PROD with host names; certbot's certificate, webroot method).
_NGINX_SITE = """\
# nginx site of $name (stagetools): $what
upstream $name {
    server unix:$socket_path fail_timeout=0;
}

server {
    listen 80;
    listen [::]:80;
    server_name $server_names;
$port_80}
$https_server"""
_NGINX_HTTP_WHAT = "HTTP. QUAL and PROD with host_names declared get HTTPS."
_NGINX_HTTPS_WHAT = "HTTPS, with certbot's certificate for its host names."
_NGINX_TO_HTTPS = """\
    location /.well-known/acme-challenge/ {
        root $acme_challenge_dir;
    }
    location / {
        return 301 https://$$host$$request_uri;
    }
"""
_NGINX_HTTPS_SERVER = """\

server {
    listen 443 ssl;
    listen [::]:443 ssl;
    server_name $server_names;
    ssl_certificate $certificate_dir/fullchain.pem;
    ssl_certificate_key $certificate_dir/privkey.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
$locations}
"""
_NGINX_LOCATIONS = """\
    client_max_body_size 20m;

    location /$static_url {
        alias $static_dir/;
        # A link in the installation's files is served only if it points to the user's own.
        disable_symlinks if_not_owner;
        # Names with a content hash (Django's ManifestStaticFilesStorage) never change.
        location ~ "\\.[0-9a-f]{12}\\.[^/]+$$" {
            add_header Cache-Control "public, max-age=31536000, immutable";
        }
    }
$media_location    location / {
        proxy_set_header Host $$host;
        proxy_set_header X-Forwarded-For $$proxy_add_x_forwarded_for;
        # Django trusts this header in QUAL and PROD: nginx must always set it.
        proxy_set_header X-Forwarded-Proto $$scheme;
        proxy_redirect off;
        proxy_pass http://$name;
    }
"""
# One per host, the same from every installation. Without it nginx answers a name it does
# not serve with its first site, and a TLS handshake with that site's certificate.
_NGINX_MEDIA_LOCATION = """\
    location /$media_url {
        alias $media_dir/;
        disable_symlinks if_not_owner;
        # Uploads come from users: never a page of this site that runs script.
        add_header X-Content-Type-Options nosniff;
        add_header Content-Security-Policy "default-src 'none'; sandbox";
    }
"""
# On the database host, which keeps the uploads of the installation's app hosts.
_NGINX_MEDIA_SITE = """\
# nginx site of $name's uploads (stagetools): its app hosts write them here by SFTP; its
# balancer sends requests for /$media_url here, by this name.
server {
    listen 80;
    listen [::]:80;
    server_name $server_names;
    location / {
        return 404;
    }
$media_location}
"""
_NGINX_DEFAULT_SITE = """\
# nginx default site of stagetools: no page and no certificate for a name no site serves.
server {
    listen 80 default_server;
    listen [::]:80 default_server;
    server_name _;
    # The first certificate of a name is asked for before its site exists.
    location /.well-known/acme-challenge/ {
        root $acme_challenge_dir;
    }
    location / {
        return 444;
    }
}

server {
    listen 443 ssl default_server;
    listen [::]:443 ssl default_server;
    server_name _;
    ssl_reject_handshake on;
    # A Host header that no site serves, sent over another site's TLS connection.
    return 444;
}
"""
# Run by the installation's own Python as its user, by `check`: what that process resolves,
# as its aaa_env_setup resolves it (else as stagetools does by itself), and what it may write.
_PROBE = """\
import importlib.util, json, os, sys
options = json.loads(sys.argv[1])
sys.path.insert(0, options["repo"])
import stagetools
if importlib.util.find_spec("aaa_env_setup"):
    import aaa_env_setup
    system = aaa_env_setup.SYSTEM
else:
    system = stagetools.get_actual_system_from_name()
print(json.dumps({"version": stagetools.__version__,
                  "system": {key: value for key, value in system.as_dict().items()
                             if key != "services"},
                  "writable": {path: os.access(path, os.W_OK) for path in options["paths"]}}))
"""
# The starter repo of `new`: the files of every framework, then each framework's own.
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
_STARTER_DECLARATION = """\
# What the installation's name cannot say, declared once: read by `stagetools show
# --expected` and `stagetools check` (the deploy side) and by the installation itself.
[stagetools]
${core_app_line}framework = $framework
server = $server
database = $database
# What runs besides the web server: job NAME = COMMAND @ CALENDAR (systemd's OnCalendar=),
# worker NAME = COMMAND; QUAL and PROD also back up (backup = keep 7 @ daily unless declared).
$job_line
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

globals().update(settings_defaults())

# Your settings below, for example: ALLOWED_HOSTS += ["shop.example.com"]
""",
    "stagetools_project/urls.py": """\
from django.contrib import admin
from django.urls import include, path

# Static files: with DEBUG on the entry points serve them, as runserver does; else nginx.
urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("$core_app.urls")),
]
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
_STARTER_DB = """\
# The notes table on the database URL that stagetools gives: SQLite or PostgreSQL.
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
"""
# python -m CORE_APP: what migrate is to Django.
_STARTER_MAIN = """\
from . import DATABASE_URL, db

db.create_tables(DATABASE_URL)
"""
_FLASK_STARTER = {
    "$core_app/__init__.py": """\
import os

import aaa_env_setup  # first: it resolves the installation
import stagetools
from flask import Flask, jsonify, request, session

from . import db

SYSTEM = aaa_env_setup.SYSTEM
application = Flask(__name__, static_folder=str(SYSTEM.static_dir),
                    static_url_path="/" + SYSTEM.static_url.rstrip("/"))
application.config.update(stagetools.flask_config(SYSTEM))
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
""",
    "$core_app/db.py": _STARTER_DB,
    "$core_app/__main__.py": _STARTER_MAIN,
}
_STARLETTE_STARTER = {
    "$core_app/__init__.py": """\
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
config = Config(environ=stagetools.starlette_config(SYSTEM))
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
""",
    "$core_app/db.py": _STARTER_DB,
    "$core_app/__main__.py": _STARTER_MAIN,
}
# The example job of Flask and Starlette (stagetools.ini): it prints to the journal.
_STARTER_REPORT = """\
from . import DATABASE_URL, db

print(f"{len(db.list_notes(DATABASE_URL))} notes")
"""
# What a job's process imports first; Django's also sets Django up.
_STARTER_SCRIPT_SETUP = """\
import aaa_env_setup  # noqa: F401 (it resolves the installation)
"""
_FLASK_STARTER.update({"$core_app/report.py": _STARTER_REPORT,
                       "aaa_script_setup.py": _STARTER_SCRIPT_SETUP})
_STARLETTE_STARTER.update({"$core_app/report.py": _STARTER_REPORT,
                           "aaa_script_setup.py": _STARTER_SCRIPT_SETUP})
_STARTER_FILES = {"django": _DJANGO_STARTER, "flask": _FLASK_STARTER,
                  "starlette": _STARLETTE_STARTER}
'''


if __name__ == "__main__":
    # One module, run or imported: stagetools_django imports it by name, and its errors
    # must be this module's StagetoolsError.
    sys.modules.setdefault("stagetools", sys.modules[__name__])
    raise SystemExit(_load_rest()["main"]())
