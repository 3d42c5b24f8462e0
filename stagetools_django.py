"""stagetools_django: Django settings defaults and entry points of a stagetools installation.

Import it only where Django (4.2 LTS or newer) is installed. It imports Django
lazily, so ``import stagetools_django`` stays cheap until a setting is read.

- settings: in ``stagetools_project/settings.py``::

      from stagetools_django import settings_defaults
      globals().update(settings_defaults())   # the database stagetools.ini declares

- entry points (each imports ``aaa_env_setup`` first)::

      python -m stagetools_django migrate                        # manage.py
      uvicorn stagetools_django:asgi_application                 # also hypercorn
      gunicorn stagetools_django:wsgi_application
"""

import importlib.util
import os
import sys

import stagetools

# The entry points asgi_application and wsgi_application are left out: a star import
# would build Django's application.
__all__ = ["adopt", "check_settings", "csrf_failure", "manage", "settings_defaults"]


class StagetoolsShadowedError(ImportError):
    """Something else than stagetools.py was imported as ``stagetools``."""


# Error paths must work even when ``stagetools`` is not the module (a folder of that name
# on sys.path shadows it): catch its error class only if it has one.
_SETUP_ERRORS = (StagetoolsShadowedError,) + tuple(
    error for error in [getattr(stagetools, "StagetoolsError", None)] if error is not None)


def _check_not_shadowed():
    """Refuse, naming the culprit, if ``import stagetools`` found something else (a folder
    named stagetools without __init__.py is a namespace package that hides the module)."""
    if hasattr(stagetools, "get_actual_system_from_name"):
        return
    where = getattr(stagetools, "__file__", None) or ", ".join(
        getattr(stagetools, "__path__", None) or ["an unknown location"])
    raise StagetoolsShadowedError(
        f"'import stagetools' found {where} (a folder or module named stagetools that comes "
        f"first on sys.path), not stagetools.py: rename it, or run from another directory "
        f"(python {sys.executable})")

# Production (QUAL and PROD) runs behind a TLS-terminating nginx on the same host
# that redirects HTTP to HTTPS and sets X-Forwarded-Proto (see the README).
_SILENCED_IN_PRODUCTION = [
    "security.W004",  # HSTS is the site owner's decision: mistakes are irreversible
    "security.W008",  # nginx redirects HTTP to HTTPS; Django would loop without the proxy
]
_ENV_SETUP_HELP = """create aaa_env_setup.py at the top of your repo (next to stagetools_project/), \
importable by the server and by manage, with:
    import os
    from stagetools import get_actual_system_from_name
    SYSTEM = get_actual_system_from_name()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", SYSTEM.django_settings)"""


def _env_setup():
    """Import aaa_env_setup first, as every entry point must; return the installation's system."""
    _check_not_shadowed()
    try:
        module = importlib.import_module("aaa_env_setup")
    except ModuleNotFoundError as error:
        if error.name != "aaa_env_setup":
            raise
        raise stagetools.StagetoolsError(
            f"cannot import aaa_env_setup (python {sys.executable})", _ENV_SETUP_HELP) from None
    system = getattr(module, "SYSTEM", None)
    return system if isinstance(system, stagetools.System) else \
        stagetools.get_actual_system_from_name()


def settings_defaults(database=None, system=None):
    """Django settings for the installation: ``globals().update(settings_defaults())``.

    The database is the one the repo declares in its stagetools.ini (``database =
    sqlite``, the file ``database_sqlite_path``, or ``postgresql``: database and role
    named after the installation, peer authentication over the local socket, no
    password); ``database`` given here overrides it.
    """
    system = system or _env_setup()
    database_settings = stagetools.django_database(system, database)
    # Registered here, because every stagetools settings module comes through here.
    from django.core import checks
    checks.register(check_settings)
    production = not system.is_debug
    project_dir = _project_dir(system)
    settings = {
        "STAGETOOLS_NAME": system.name,
        # Django's meaning: the directory of manage.py. The installation's own paths are the
        # system's attributes (base_dir, static_dir, ...), never BASE_DIR.
        "BASE_DIR": project_dir,
        # SECURITY WARNING: DEBUG is off in QUAL and PROD, and a check refuses it there.
        "DEBUG": system.is_debug,
        # SECURITY WARNING: the key lives in a 0600 file of the installation, not in the repo.
        "SECRET_KEY": stagetools.read_secret_key(system),
        # The repo's declared host_names (stagetools.ini), then the local names that the
        # health checks and a developer use.
        "ALLOWED_HOSTS": [*system.host_names, f"{system.container}.localhost", "localhost",
                          "127.0.0.1", "[::1]"],
        "CSRF_TRUSTED_ORIGINS": [f"{'https' if system.is_https else 'http'}://{name}"
                                 for name in system.host_names],
        "INSTALLED_APPS": [
            "django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
            "django.contrib.sessions", "django.contrib.messages", "django.contrib.staticfiles",
        ] + ([system.core_app] if importlib.util.find_spec(system.core_app) else []),
        "MIDDLEWARE": [
            "django.middleware.security.SecurityMiddleware",
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
            "django.middleware.clickjacking.XFrameOptionsMiddleware",
        ],
        "ROOT_URLCONF": system.django_rooturls,
        "WSGI_APPLICATION": system.django_wsgi_application,
        "TEMPLATES": [{
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            # A project's own templates folder, as most projects have it; Django skips a
            # folder that does not exist.
            "DIRS": [project_dir / "templates"], "APP_DIRS": True,
            "OPTIONS": {"context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]},
        }],
        "DATABASES": {"default": database_settings},
        "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
        "USE_TZ": True,
        "TIME_ZONE": "UTC",
        "STATIC_URL": system.static_url,
        "STATIC_ROOT": system.static_dir,
        "MEDIA_URL": system.media_url,
        "MEDIA_ROOT": system.media_dir,
        # nginx serves uploads: readable by it whatever the service's UMask=0077 (only its
        # group www-data may enter media/).
        "FILE_UPLOAD_PERMISSIONS": 0o644,
        "FILE_UPLOAD_DIRECTORY_PERMISSIONS": 0o755,
        # Installations that share a domain must not read each other's cookies or cache.
        "SESSION_COOKIE_NAME": f"{system.name}_sessionid",
        "CSRF_COOKIE_NAME": f"{system.name}_csrftoken",
        "LANGUAGE_COOKIE_NAME": f"{system.name}_language",
        "CACHES": {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                               "KEY_PREFIX": system.name}},
        # Production: HTTPS ends at nginx on this host, which sets X-Forwarded-Proto.
        "SESSION_COOKIE_SECURE": production,
        "CSRF_COOKIE_SECURE": production,
        "SECURE_PROXY_SSL_HEADER": ("HTTP_X_FORWARDED_PROTO", "https") if production else None,
        "SILENCED_SYSTEM_CHECKS": list(_SILENCED_IN_PRODUCTION) if production else [],
        # Says why a form fails in QUAL/PROD over plain HTTP: the cookies need HTTPS.
        "CSRF_FAILURE_VIEW": "stagetools_django.csrf_failure",
        # Finds the project's tests from any working directory (Django's looks in ".").
        "TEST_RUNNER": "stagetools_django.TestRunner",
    }
    return settings


def _project_dir(system):
    """The directory that holds the settings package (and manage.py): Django's BASE_DIR."""
    from pathlib import Path
    spec = importlib.util.find_spec(system.django_project)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]).resolve().parent if locations else system.core_repo_dir


def check_settings(app_configs=None, **kwargs):
    """Django system check: the settings must not contradict the installation."""
    from django.conf import settings
    from django.core.checks import Error, Warning

    # Judged against the system this process runs in, never against a setting that a
    # settings file may delete or change.
    system = _env_setup()
    problems = []
    if settings.DEBUG and not system.is_debug:
        problems.append(Error(
            f"DEBUG is on in the {system.stage.name} installation {system.name!r}",
            hint="remove DEBUG = True from your settings: DEBUG is for DEV and INT only",
            id="stagetools.E001"))
    name = getattr(settings, "STAGETOOLS_NAME", None)
    if name is not None and name != system.name:
        problems.append(Warning(
            f"settings were made for {name!r} but this process runs in {system.name!r}",
            hint="do not copy settings between installations; let stagetools fill them in",
            id="stagetools.W002"))
    database = settings.DATABASES.get("default", {})
    expected = stagetools.django_database(system)  # the database the repo declares
    wanted = expected["NAME"] if database.get("ENGINE") == expected["ENGINE"] else None
    if wanted is not None and str(database.get("NAME")) != wanted:
        problems.append(Warning(
            f"the default database is {database.get('NAME')!r}, not the installation's "
            f"{wanted!r}", hint="remove the NAME override from DATABASES in your settings",
            id="stagetools.W003"))
    installed = {entry.split(".")[0] for entry in settings.INSTALLED_APPS}
    if system.core_app not in installed:
        problems.append(Warning(
            f"the core app {system.core_app!r} of {system.name!r} is not in INSTALLED_APPS"
            + ("" if importlib.util.find_spec(system.core_app) else
               f" (no package {system.core_app!r} is importable)"),
            hint="name your app in aaa_env_setup.py: get_actual_system_from_name("
                 "core_app=\"yourapp\"); add further apps with INSTALLED_APPS += [\"other\"]",
            id="stagetools.W004"))
    return problems


def csrf_failure(request, reason=""):
    """Django's CSRF failure view, which also says, and logs, when the cause is plain HTTP in
    QUAL or PROD: browsers keep Secure cookies for HTTPS, so every form fails with 403."""
    from django.conf import settings
    from django.views.csrf import csrf_failure as django_csrf_failure
    if not (settings.CSRF_COOKIE_SECURE and not request.is_secure()):
        return django_csrf_failure(request, reason)
    import logging
    from django.http import HttpResponseForbidden
    name = getattr(settings, "STAGETOOLS_NAME", "this installation")
    # repr: a path may hold any character once decoded, and the line goes to the log.
    message = (f"stagetools: 403 on {request.method} {request.path!r} ({reason}): this "
               f"request came over plain HTTP, but {name} sets Secure cookies (QUAL and "
               "PROD), which browsers send over HTTPS only. Serve it behind the "
               "TLS-terminating nginx that sets X-Forwarded-Proto "
               "(see the README), or use a DEV or INT installation for plain HTTP")
    logging.getLogger("stagetools_django").warning(message)
    return HttpResponseForbidden(message + "\n", content_type="text/plain; charset=utf-8")


def _build_application(get_application):
    """Django's own application, after aaa_env_setup, refused if the settings are unsafe."""
    from django.core.exceptions import ImproperlyConfigured
    _env_setup()
    application = get_application()
    for problem in check_settings():
        if problem.is_serious():
            raise ImproperlyConfigured(f"{problem.msg}: {problem.hint} ({problem.id})")
    return application


class _LazyASGIApplication:
    """Django's ASGI application, built at the server's lifespan start-up (or on the first
    request if the server has lifespan off): never while a settings module imports us."""

    def __init__(self):
        self._application = None

    def _get(self):
        if self._application is None:  # one event loop per process: no race
            from django.core.asgi import get_asgi_application
            self._application = _build_application(get_asgi_application)
        return self._application

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self._get()(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._get()
                except Exception as error:
                    await send({"type": "lifespan.startup.failed",
                                "message": f"stagetools: {error}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


asgi_application = _LazyASGIApplication()


def _make_test_runner():
    """Django's DiscoverRunner that, given no test labels, discovers the tests of the project
    (BASE_DIR) instead of the working directory, and refuses when it has no project."""
    from django.conf import settings
    from django.core.management.base import CommandError
    from django.test.runner import DiscoverRunner

    class TestRunner(DiscoverRunner):
        def build_suite(self, test_labels=None, *args, **kwargs):
            if not test_labels:
                project_dir = getattr(settings, "BASE_DIR", None)
                if project_dir is None or not os.path.isdir(project_dir):
                    raise CommandError(  # one line from Django, no traceback
                        f"no project directory to find tests in (BASE_DIR {project_dir!r}); "
                        "give test labels, for example: python -m stagetools_django test "
                        "yourapp")
                test_labels = [str(project_dir)]
            return super().build_suite(test_labels, *args, **kwargs)

    TestRunner.__module__ = __name__
    return TestRunner


def __getattr__(attribute):
    """``wsgi_application``, built when a WSGI server looks it up (PEP 562), so that a
    broken installation fails at start-up: WSGI has no lifespan to do it in. ``TestRunner``
    (the TEST_RUNNER setting), so that importing this module imports no Django."""
    if attribute == "TestRunner":
        value = _make_test_runner()
    elif attribute == "wsgi_application":
        from django.core.wsgi import get_wsgi_application
        value = _build_application(get_wsgi_application)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
    globals()[attribute] = value
    return value


def manage(argv=None):
    """What manage.py does, after aaa_env_setup: ``python -m stagetools_django migrate``."""
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
        from django.core.management import execute_from_command_line
    except ModuleNotFoundError as error:
        if error.name != "django":
            raise
        print(f"stagetools: error: cannot import Django (python {sys.executable}): "
              "stagetools_django needs Django 4.2 or newer; install it: "
              f"{sys.executable} -m pip install 'stagetools[django]' (or 'Django>=4.2')",
              file=sys.stderr)
        return 2
    try:
        _env_setup()
        # Load settings here: Django's own command runner hides errors in them.
        settings.INSTALLED_APPS
    except _SETUP_ERRORS + (ImproperlyConfigured,) as error:
        print(f"stagetools: error: {error}", file=sys.stderr)
        return 2
    execute_from_command_line(argv or sys.argv)
    return 0


# ---------------------------------------------------------------- adopting an existing project



# Settings that stagetools derives from the installation: adopt removes them from settings.py.
_ADOPT_DERIVED_SETTINGS = ("SECRET_KEY", "DEBUG", "DATABASES", "ROOT_URLCONF", "WSGI_APPLICATION",
                           "STATIC_URL", "STATIC_ROOT", "MEDIA_URL", "MEDIA_ROOT")
# The lines adopt puts at the top of settings.py.
_ADOPT_SETTINGS_HEAD = ("from stagetools_django import settings_defaults\n\n"
                        "globals().update(settings_defaults())")
# What a startproject wsgi.py or asgi.py holds besides its docstring: then it may go.
_ADOPT_ENTRY_POINT_CODE = {"import os", "from django.core.wsgi import get_wsgi_application",
                           "from django.core.asgi import get_asgi_application",
                           "application = get_wsgi_application()",
                           "application = get_asgi_application()"}


def _adopt_refuse(directory, rule, fix):
    raise stagetools.StagetoolsError(f"cannot adopt '{directory}'", rule, fix)


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
                         "localhost names and the declared host_names: declare your domains "
                         "in stagetools.ini (host_names = shop.example.com)")
        elif name not in _ADOPT_DERIVED_SETTINGS:
            continue
        if name == "DATABASES" and "sqlite3" not in value:
            notes.append("settings.py had a DATABASES other than SQLite: for PostgreSQL "
                         "declare database = postgresql in stagetools.ini (peer "
                         "authentication, see the README)")
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
            result.append("\n" + _ADOPT_SETTINGS_HEAD + "\n")
    if head == 0:
        result.insert(0, _ADOPT_SETTINGS_HEAD + "\n\n")
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
    # pip's format: a trailing \ continues a line, # starts a comment at a line's start or
    # after a space (not in a URL), options start with - (alone, or after a requirement).
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    lines = [re.split(r"(?:^|\s)#|\s--?[A-Za-z]", line)[0].strip()
             for line in text.replace("\\\n", " ").splitlines()]
    own = [line for line in lines if line and not line.startswith("-")]
    names = {name(requirement) for requirement in own}
    return own + [requirement for requirement in
                  stagetools.FRAMEWORKS["django"]["requirements"]
                  + stagetools.DATABASES[database]["requirements"]
                  if name(requirement) not in names]


def _adopt_write(path, text):
    """Write a file whole or not at all, keeping its mode (manage.py stays executable): a
    new temporary file (never one planted there) renamed into place."""
    import stat
    import tempfile
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _adopt_apply(directory, package, settings_text, removed, manage_text, removable, files,
                 database):
    """Change the tree as _cmd_adopt decided, saying each step."""
    os.rename(directory / package, directory / stagetools.DJANGO_PROJECT)
    print(f"renamed {package}/ to {stagetools.DJANGO_PROJECT}/ (the settings package of every "
          "stagetools installation)")
    _adopt_write(directory / stagetools.DJANGO_PROJECT / "settings.py", settings_text)
    print(f"rewrote {stagetools.DJANGO_PROJECT}/settings.py: settings_defaults() "
          f"first; removed {', '.join(removed) or 'nothing'} (stagetools derives them)")
    _adopt_write(directory / "manage.py", manage_text)
    print(f"replaced manage.py (it set DJANGO_SETTINGS_MODULE to {package}.settings) with "
          "one that calls stagetools_django.manage()")
    for path in removable:
        (directory / stagetools.DJANGO_PROJECT / path.name).unlink()
    if removable:
        names = ", ".join(f"{stagetools.DJANGO_PROJECT}/{path.name}" for path in removable)
        print(f"removed {names} (the entry points are stagetools_django:wsgi_application "
              "and :asgi_application)")
    for name, text in files.items():
        _adopt_write(directory / name, text)
    print(f"wrote {', '.join(files)}")


def _adopt_mentions(directory, package, modules, skipped):
    """'path:line' of each line of the project's Python files that names the old package
    or one of its modules; virtualenvs and hidden folders are not the project's."""
    import re
    import stat
    name = re.escape(package)
    pattern = re.compile(rf"\b(import|from) {name}\b|\b{name}\.({'|'.join(modules)})\b")
    mentions = []
    for folder, subfolders, names in os.walk(directory):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith(".")
                               and name not in ("node_modules", "__pycache__")
                               and not os.path.exists(os.path.join(folder, name, "pyvenv.cfg")))
        for name in sorted(names):
            path = os.path.join(folder, name)
            if (not name.endswith(".py") or os.path.relpath(path, directory) in skipped
                    or not stat.S_ISREG(os.lstat(path).st_mode)):  # no link, no FIFO
                continue
            with open(path, encoding="utf-8", errors="replace") as file:
                for number, line in enumerate(file, 1):
                    if pattern.search(line):
                        mentions.append(f"{os.path.relpath(path, directory)}:{number}")
    return mentions


def adopt(directory, database=None, core_repo=None, core_app=None):
    """Adopt a Django project made by django-admin startproject, in place (``stagetools
    adopt DIR``): the settings package becomes stagetools_project, the aaa modules,
    manage.py, the packaging file and both stagetools modules are written; it prints each
    change and what is left to do by hand. Refuses, changing nothing, a tree it does not
    know."""
    import json
    import re
    from pathlib import Path
    directory = Path(directory).absolute()
    package = _adopt_settings_package(directory)
    settings_py = directory / package / "settings.py"
    core_repo = core_repo or directory.name
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
    core_app = core_app or (local_apps[0] if local_apps else core_repo)
    # The DEV installation of the project; it declares nothing yet (adopt writes that).
    system = stagetools.get_expected_system_from_name(
        f"{core_repo.lower()}_dev", core_repo=core_repo, core_app=core_app, database=database,
        declared={})
    if not os.access(directory, os.W_OK) or not os.access(directory / package, os.W_OK):
        _adopt_refuse(directory, f"this user cannot write to it or to {package}/",
                      "run adopt as the user who owns the project")
    requirements = _adopt_requirements(directory, system.database)
    try:
        starter = stagetools.render_starter(system, requirements)
    except OSError as error:
        raise stagetools.StagetoolsError("cannot read stagetools_django.py next to "
                                         f"stagetools.py ({error.strerror})", "adopt copies "
                                         "both into the project", "keep them side by side")
    written = ["aaa_env_setup.py", "aaa_script_setup.py", "stagetools.py",
               "stagetools_django.py", stagetools.DECLARATION_FILE]
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
        files["setup.py"] = starter["setup.py"]
    settings_text, removed, notes = _adopt_settings(module, source, system.database)
    entry_points = [directory / package / name for name in ("wsgi.py", "asgi.py")
                    if (directory / package / name).is_file()]
    removable = [path for path in entry_points if _adopt_is_startproject_entry_point(path)]
    modules = sorted(re.escape(os.path.splitext(name)[0]) for name in
                     os.listdir(directory / package) if not name.startswith((".", "__")))

    # Everything is known and checked: now change the tree.
    try:
        _adopt_apply(directory, package, settings_text, removed, starter["manage.py"],
                     removable, files, system.database)
    except OSError as error:
        raise stagetools.StagetoolsError(f"adopting '{directory}' stopped", f"{error}; "
                                         "every file is whole, but the steps printed above "
                                         "are all that was done", "undo them (git checkout) "
                                         "or finish by hand") from None
    print("\nLeft to do by hand:")
    todo = _adopt_left_to_do(directory, system, package, apps, notes, packaging, py_modules,
                             sorted(set(entry_points) - set(removable)),
                             _adopt_mentions(directory, package, modules, set(written)))
    for number, item in enumerate(todo, 1):
        print(f"  {number}. {item}")
    return 0


def _adopt_settings_package(directory):
    """The package that manage.py names as DJANGO_SETTINGS_MODULE, or a refusal."""
    import re
    manage_py = directory / "manage.py"
    if not manage_py.is_file():
        _adopt_refuse(directory, "it has no manage.py", "give the directory of your Django "
                      "project's manage.py (the top of the repo)")
    if (directory / stagetools.DJANGO_PROJECT).exists():
        _adopt_refuse(directory, f"it has {stagetools.DJANGO_PROJECT}/ already: it is adopted",
                      "nothing to adopt; run its tests with: python -m stagetools_django test")
    found = re.search(r"""DJANGO_SETTINGS_MODULE['"]\s*,\s*['"]([A-Za-z_][\w.]*)\.settings['"]""",
                      manage_py.read_text(encoding="utf-8", errors="replace"))
    if not found or "." in found.group(1):
        _adopt_refuse(directory, "its manage.py does not set DJANGO_SETTINGS_MODULE to "
                      "'PACKAGE.settings' as django-admin startproject writes it",
                      "adopt by hand: see the README, 'Adopting stagetools in an existing "
                      "Django project'")
    package = found.group(1)
    if not (directory / package / "settings.py").is_file():
        _adopt_refuse(directory, f"manage.py names {package}.settings, but "
                      f"{package}/settings.py is not a file", "adopt by hand (see the README)")
    return package


def _adopt_left_to_do(directory, system, package, apps, notes, packaging, py_modules,
                      kept_entry_points, mentions):
    """What adopt leaves to the user, in the order to do it."""
    core_app = system.core_app
    todo = list(notes)
    for path in kept_entry_points:
        todo.append(f"{stagetools.DJANGO_PROJECT}/{path.name} does more than startproject's: "
                    "move what it adds into settings or middleware, then delete it (the entry "
                    "points are stagetools_django:wsgi_application and :asgi_application)")
    if packaging:
        todo.append(f"add to your {packaging[0]}: py_modules {py_modules} and the packages "
                    f"{stagetools.DJANGO_PROJECT} and {core_app} (the README shows a whole "
                    "setup.py)")
    if mentions:
        todo.append(f"these lines name {package}, which is {stagetools.DJANGO_PROJECT} now: "
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
    return todo



if __name__ == "__main__":
    sys.exit(manage())
