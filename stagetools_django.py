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
    password); ``database`` given here overrides it. When the deploy placed the database
    on a database host (root's topology file says which), PostgreSQL is reached there by
    TLS with the installation's client certificate, and uploads are kept there too, by
    django-storages' SFTP storage (the repo requires ``django-storages[sftp]``).
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
        ] + ([system.core_app] if _importable(system.core_app) else []),
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
        # Beyond one host: uploads on the database host, which every app host writes to by
        # SFTP (django-storages) and whose nginx serves them; else in media_dir here.
        **({"STORAGES": {
            "default": {"BACKEND": "storages.backends.sftpstorage.SFTPStorage",
                        "OPTIONS": stagetools._shared_media_storage(system)},
            "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
        }} if system.database_host else {}),
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


def _importable(module):
    """Whether a module (a dotted path too) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


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
    from django.apps import apps
    # The modules of the installed apps: 'catalog' for 'catalog.apps.CatalogConfig'.
    if system.core_app not in {config.name for config in apps.get_app_configs()}:
        problems.append(Warning(
            f"the core app {system.core_app!r} of {system.name!r} is not in INSTALLED_APPS"
            + ("" if _importable(system.core_app) else
               f" (no package {system.core_app!r} is importable)"),
            hint=f"declare your main app in the repo's {stagetools.DECLARATION_FILE}: "
                 "core_app = yourapp (its module, as INSTALLED_APPS names it: "
                 "mysite.articles); add further apps with INSTALLED_APPS += [\"other\"]",
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


def _build_application(interface):
    """Django's own ASGI or WSGI application, after aaa_env_setup, refused if the settings
    are unsafe. With DEBUG on it serves static files as runserver does (from the apps'
    static/ folders, through staticfiles' handler); with DEBUG off nginx serves them."""
    from django.apps import apps
    from django.conf import settings
    from django.contrib.staticfiles import handlers
    from django.core.exceptions import ImproperlyConfigured
    if interface == "asgi":
        from django.core.asgi import get_asgi_application as get_application
        static_handler = handlers.ASGIStaticFilesHandler
    else:
        from django.core.wsgi import get_wsgi_application as get_application
        static_handler = handlers.StaticFilesHandler
    _env_setup()
    application = get_application()
    for problem in check_settings():
        if problem.is_serious():
            raise ImproperlyConfigured(f"{problem.msg}: {problem.hint} ({problem.id})")
    if settings.DEBUG and apps.is_installed("django.contrib.staticfiles"):
        application = static_handler(application)
    return application


class _LazyASGIApplication:
    """Django's ASGI application, built at the server's lifespan start-up (or on the first
    request if the server has lifespan off): never while a settings module imports us."""

    def __init__(self):
        self._application = None

    def _get(self):
        if self._application is None:  # one event loop per process: no race
            self._application = _build_application("asgi")
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
        value = _build_application("wsgi")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
    globals()[attribute] = value
    return value


def manage(argv=None):
    """What manage.py does, after aaa_env_setup: ``python -m stagetools_django migrate``."""
    argv = argv or sys.argv
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
        from django.core.management import execute_from_command_line
    except ModuleNotFoundError as error:
        if error.name != "django":
            raise
        print(f"stagetools: error: cannot import Django (python {sys.executable}): "
              f"{_where_django_is(argv)}", file=sys.stderr)
        return 2
    try:
        _env_setup()
        settings.INSTALLED_APPS  # loaded here: Django's command runner hides its errors
    except _SETUP_ERRORS + (ImproperlyConfigured,) as error:
        print(f"stagetools: error: {error}", file=sys.stderr)
        return 2
    execute_from_command_line(argv)
    return 0


def _where_django_is(argv):
    """What to run when this Python has no Django: the installation's Python, its pip, or
    (outside an installation) what to install."""
    import shlex
    try:
        system = _env_setup()
    except _SETUP_ERRORS:
        return (f"stagetools_django needs Django 4.2 or newer; install it: {sys.executable} -m "
                "pip install 'stagetools[django]' (or 'Django>=4.2')")
    if os.path.normpath(sys.prefix) == os.fspath(system.base_dir):
        return (f"install the repo into the virtualenv of {system.name}: {system.pip_path} "
                f"install --editable {system.core_repo_dir}")
    return (f"Django is in the virtualenv of {system.name}: run {system.python_path} -m "
            f"stagetools_django {shlex.join(argv[1:])}".rstrip())


# ---------------------------------------------------------------- adopting an existing project
#
# adopt turns a project made by django-admin startproject into a stagetools repo, in place, or
# refuses before it changes anything. Only what every installation names moves: the settings
# module and the root URLconf, into stagetools_project/. Everything else keeps its import path,
# so apps inside the old settings package keep their modules, app labels and migrations, and
# an existing database its rows.

# Settings that stagetools derives from the installation: adopt removes them from settings.py.
_ADOPT_DERIVED_SETTINGS = ("SECRET_KEY", "DEBUG", "DATABASES", "ROOT_URLCONF", "WSGI_APPLICATION",
                           "STATIC_URL", "STATIC_ROOT", "MEDIA_URL", "MEDIA_ROOT")
# The lines adopt puts at the top of settings.py.
_ADOPT_SETTINGS_HEAD = ("from stagetools_django import settings_defaults\n\n"
                        "globals().update(settings_defaults())")
# The modules of the settings package that move to stagetools_project/, and its entry points,
# which go: stagetools_django's serve every installation.
_ADOPT_MOVED = ("settings.py", "urls.py")
_ADOPT_ENTRY_POINTS = ("wsgi.py", "asgi.py")
# What a startproject wsgi.py or asgi.py holds besides its docstring: then it may go.
_ADOPT_ENTRY_POINT_CODE = {"import os", "from django.core.wsgi import get_wsgi_application",
                           "from django.core.asgi import get_asgi_application",
                           "application = get_wsgi_application()",
                           "application = get_asgi_application()"}
# BASE_DIR as startproject writes it: the same directory from stagetools_project/settings.py.
_ADOPT_BASE_DIR_FORMS = {"Path(__file__).resolve().parent.parent",
                         "os.path.dirname(os.path.dirname(os.path.abspath(__file__)))"}
# Files besides Python modules that name a settings module (pytest-django, tox, dotenv).
_ADOPT_CONFIG_FILES = ("pytest.ini", "tox.ini", "setup.cfg", "pyproject.toml", ".env")
# Packaging that a project may have already, and the lines that make each file packaging.
_ADOPT_PACKAGING = {"setup.py": r"", "pyproject.toml": r"^\[(project|build-system|tool\.poetry)\]",
                    "setup.cfg": r"^\[(metadata|options)\]"}
# requirements.txt options that install_requires cannot hold: refused, never dropped.
_ADOPT_PIP_ONLY_OPTIONS = ("-e", "--editable", "-i", "--index-url", "--extra-index-url", "-f",
                           "--find-links")
_ADOPT_FILE_LIMIT = 1 << 22  # bytes: more than any settings module or requirements file
_ADOPT_FIX_LINK = "make it a regular file of the project (not a link), then adopt"


def _adopt_refuse(directory, rule, fix):
    raise stagetools.StagetoolsError(f"cannot adopt '{directory}'", rule, fix)


def _adopt_read(directory, relative):
    """The text of a file of the project, or None if there is none. It is looked at before
    it is read: a link (also one on the way to it), a FIFO or a device is refused."""
    path = os.path.join(directory, relative)
    if os.path.realpath(path) != os.path.normpath(path) and os.path.lexists(path):
        _adopt_refuse(directory, f"{relative} is, or lies below, a symbolic link", _ADOPT_FIX_LINK)
    try:
        return stagetools._read_regular_file(path, f"cannot adopt '{directory}': {relative}",
                                             _ADOPT_FILE_LIMIT, _ADOPT_FIX_LINK)
    except FileNotFoundError:
        return None


def _adopt_parse(directory, relative, source):
    import ast
    try:
        return ast.parse(source)
    except SyntaxError as error:
        _adopt_refuse(directory, f"{relative} does not parse ({error.msg}, line {error.lineno})",
                      "fix it so that Django can load it, then adopt")


def adopt(directory, database=None, core_repo=None, core_app=None):
    """Adopt a Django project made by django-admin startproject, in place (``stagetools
    adopt DIR``), or refuse before changing anything. The settings module and the root URLconf
    move to stagetools_project/; apps (those inside the old settings package too) keep their
    modules and labels. It writes manage.py, the aaa modules, setup.py, both stagetools modules
    and the declaration (stagetools.ini: core app, server, database), says each change, then
    prints the commands that make the project's DEV installation."""
    from pathlib import Path
    directory = Path(os.path.realpath(directory))
    package = _adopt_settings_package(directory)
    core_repo = core_repo or directory.name
    if not (core_repo.isidentifier() and core_repo.isascii()):
        _adopt_refuse(directory, f"its name {core_repo!r} is not a Python identifier, and "
                      "the repo's name below src/ is the configuration of its installations",
                      "give --core-repo NAME (letters, digits, _), for example --core-repo shop")
    dev_name = f"{core_repo.lower()}_dev"
    try:
        stagetools.parse_name(dev_name)
    except stagetools.StagetoolsError as error:
        _adopt_refuse(directory, f"its DEV installation would be {dev_name}: {error.rule}",
                      "give --core-repo NAME, the name of its installations before _dev")
    sources = {name: _adopt_read(directory, f"{package}/{name}")
               for name in _ADOPT_MOVED + _ADOPT_ENTRY_POINTS + ("__init__.py",)}
    settings_module = _adopt_parse(directory, f"{package}/settings.py", sources["settings.py"])
    assignments = _adopt_assignments(directory, package, settings_module)
    apps = _adopt_installed_apps(directory, assignments)
    core_app = _adopt_core_app(directory, core_app, apps)
    database, database_file = _adopt_database(directory, database, assignments)
    root_urlconf = assignments.get("ROOT_URLCONF")
    if root_urlconf is not None and _adopt_literal(root_urlconf.value) != f"{package}.urls" \
            or sources["urls.py"] is None:
        _adopt_refuse(directory, f"its root URLconf is not {package}/urls.py, as startproject "
                      "makes it", f"make {package}/urls.py the root URLconf (ROOT_URLCONF = "
                      f"'{package}.urls'), then adopt")
    moved = {name: _adopt_moved_module(directory, package, name, sources[name])
             for name in _ADOPT_MOVED}
    for name in _ADOPT_ENTRY_POINTS:
        _adopt_check_entry_point(directory, package, name, sources[name])
    package_goes = _adopt_package_goes(directory, package, sources["__init__.py"], apps)
    requirements = _adopt_requirements(directory, database)
    written = ["aaa_env_setup.py", "aaa_script_setup.py", "stagetools.py",
               "stagetools_django.py", stagetools.DECLARATION_FILE, "setup.py"]
    _adopt_refuse_what_is_in_the_way(directory, written)
    references = _adopt_references(directory, package, package_goes, _adopt_project_texts(
        directory, {f"{package}/{name}" for name in sources} | {"manage.py"}))
    if not os.access(directory, os.W_OK) or not os.access(directory / package, os.W_OK):
        _adopt_refuse(directory, f"this user cannot write to it or to {package}/",
                      "run adopt as the user who owns the project")
    moved["settings.py"], removed, notes = _adopt_settings(moved["settings.py"], database)
    moved.update(_adopt_references(directory, package, package_goes, moved))

    # The project's DEV installation, in this user's home; the starter written for it declares
    # the core app in stagetools.ini, which both the installation and the deploy side read.
    system = stagetools.get_expected_system_from_name(
        dev_name, base_dir=Path.home() / dev_name, core_repo=core_repo, database=database,
        declared={"core_app": core_app})
    try:
        starter = stagetools.render_starter(stagetools.get_expected_system_from_name(
            dev_name, base_dir=system.base_dir, core_repo=core_repo, database=database,
            declared={}), requirements)
    except OSError as error:
        raise stagetools.StagetoolsError("cannot read stagetools_django.py next to "
                                         f"stagetools.py ({error.strerror})", "adopt copies "
                                         "both into the project", "keep them side by side")
    files = {name: starter[name] for name in written}
    database_line = f"database = {system.database}\n"  # the core app follows the choices
    files[stagetools.DECLARATION_FILE] = files[stagetools.DECLARATION_FILE].replace(
        database_line, f"{database_line}core_app = {core_app}\n", 1)

    # Everything is known and checked: now change the tree.
    try:
        _adopt_apply(directory, package, package_goes, moved, removed, notes, references,
                     starter["manage.py"], files)
    except OSError as error:
        raise stagetools.StagetoolsError(f"adopting '{directory}' stopped", f"{error}; "
                                         "every file is whole, but the steps printed above "
                                         "are all that was done", "undo them (git checkout) "
                                         "or finish by hand") from None
    print(f"declared in {stagetools.DECLARATION_FILE}: core_app = {core_app}, server = "
          f"{system.server}, database = {system.database}")
    print("\n".join(_adopt_next_steps(directory, system, database_file)))
    return 0


def _adopt_settings_package(directory):
    """The package that manage.py names as DJANGO_SETTINGS_MODULE, or a refusal."""
    import re
    import stat
    manage_py = _adopt_read(directory, "manage.py")
    if manage_py is None:
        _adopt_refuse(directory, "it has no manage.py", "give the directory of your Django "
                      "project's manage.py (the top of the repo)")
    if os.path.lexists(directory / stagetools.DJANGO_PROJECT):
        _adopt_refuse(directory, f"it has {stagetools.DJANGO_PROJECT}/ already: it is adopted",
                      f"nothing to adopt; its core app is core_app in "
                      f"{stagetools.DECLARATION_FILE}, its tests run with: python -m "
                      "stagetools_django test")
    found = re.search(r"""DJANGO_SETTINGS_MODULE['"]\s*,\s*['"]([A-Za-z_][\w.]*)['"]""",
                      manage_py)
    if not found:
        _adopt_refuse(directory, "its manage.py does not set DJANGO_SETTINGS_MODULE as "
                      "django-admin startproject writes it",
                      "adopt by hand: see docs/guides/adoption.md, 'By hand'")
    settings, package = found.group(1), found.group(1).split(".")[0]
    path = directory / package
    if os.path.islink(path):
        _adopt_refuse(directory, f"its settings package {package}/ is a symbolic link",
                      "make it a directory of the project, then adopt")
    split = sorted(name for name in (os.listdir(path / "settings") if os.path.isdir(
        path / "settings") and not os.path.islink(path / "settings") else [])
        if name.endswith(".py"))
    if split or settings.startswith(f"{package}.settings."):
        _adopt_refuse(directory, f"its settings are split ({settings}"
                      + (f": {package}/settings/{', '.join(split)}" if split else "") + "), "
                      "but an installation has one settings module, whose stage its name "
                      "gives", _ADOPT_FIX_SPLIT.format(package=package))
    if settings != f"{package}.settings":
        _adopt_refuse(directory, f"its manage.py names {settings}, not PACKAGE.settings as "
                      "django-admin startproject writes it",
                      "adopt by hand: see docs/guides/adoption.md, 'By hand'")
    try:
        info = os.lstat(path / "settings.py")
    except OSError:
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        _adopt_refuse(directory, f"manage.py names {settings}, but {package}/settings.py is "
                      "not a file", f"make {package}/settings.py the settings module, then adopt")
    return package


_ADOPT_FIX_SPLIT = ("make them one module, {package}/settings.py: the base settings, then what "
                    "the others set besides DEBUG, SECRET_KEY, ALLOWED_HOSTS, DATABASES and "
                    "the STATIC_ and MEDIA_ settings (stagetools derives those from the "
                    "installation's name); name it in manage.py ('{package}.settings'), then "
                    "adopt")


def _adopt_assignments(directory, package, module):
    """The settings module's top-level assignments, {name: statement}; a star import at the
    top (split settings) is refused. INSTALLED_APPS += [...] counts too."""
    import ast
    assignments = {}
    for statement in module.body:
        if isinstance(statement, ast.ImportFrom) and any(
                alias.name == "*" for alias in statement.names):
            _adopt_refuse(directory, f"{package}/settings.py imports other settings (line "
                          f"{statement.lineno}): its settings are split",
                          _ADOPT_FIX_SPLIT.format(package=package))
        targets = statement.targets if isinstance(statement, ast.Assign) else \
            [statement.target] if isinstance(statement, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            if isinstance(target, ast.Name) and isinstance(statement, ast.AugAssign):
                assignments.setdefault(f"{target.id}+=", []).append(statement)
            elif isinstance(target, ast.Name):
                assignments[target.id] = statement
    return assignments


def _adopt_literal(node, assignments=None, following=()):
    """The value of a literal (a list of strings: INSTALLED_APPS), following names bound to
    literals and + between lists; None if it is not that simple."""
    import ast
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = (_adopt_literal(side, assignments, following)
                       for side in (node.left, node.right))
        return left + right if isinstance(left, list) and isinstance(right, list) else None
    if isinstance(node, ast.Name) and assignments and node.id in assignments:
        return None if node.id in following else _adopt_literal(
            assignments[node.id].value, assignments, (*following, node.id))
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return list(value) if isinstance(value, tuple) else value


def _adopt_installed_apps(directory, assignments):
    """The modules of the project's own apps in INSTALLED_APPS, in order: 'mysite.articles'
    for 'mysite.articles.apps.ArticlesConfig' (the deepest folder of the repo it names);
    None if INSTALLED_APPS is not a list adopt can read."""
    statement = assignments.get("INSTALLED_APPS")
    apps = _adopt_literal(statement.value, assignments) if statement else []
    for extra in assignments.get("INSTALLED_APPS+=", []):
        more = _adopt_literal(extra.value, assignments)
        apps = apps + more if isinstance(apps, list) and isinstance(more, list) else None
    if not isinstance(apps, list) or not all(isinstance(app, str) for app in apps):
        return None
    modules = []
    for app in apps:
        parts = app.split(".")
        depth = 0
        while depth < len(parts) and (directory.joinpath(*parts[:depth + 1])).is_dir():
            depth += 1
        if depth and ".".join(parts[:depth]) not in modules:
            modules.append(".".join(parts[:depth]))
    return modules


def _adopt_core_app(directory, given, apps):
    """The core app: given (one of the project's apps), else its first app in INSTALLED_APPS."""
    if given is not None:
        try:
            stagetools._valid_module("core_app", given)
        except stagetools.StagetoolsError as error:
            _adopt_refuse(directory, f"--core-app {given}: {error.rule}", "give the module "
                          "of your main app as INSTALLED_APPS names it, e.g. --core-app catalog")
        if apps is None or given in apps:
            return given
        _adopt_refuse(directory, f"--core-app {given} is none of the project's apps in "
                      f"INSTALLED_APPS ({', '.join(apps) or 'it names none'})",
                      f"give one of them as written there, e.g. --core-app "
                      f"{(apps or ['catalog'])[0]}")
    if apps is None:
        _adopt_refuse(directory, "its INSTALLED_APPS is not a list of names adopt can read, so "
                      "it cannot tell the core app", "give it: --core-app MODULE (your main "
                      "app, as INSTALLED_APPS names it)")
    if not apps:
        _adopt_refuse(directory, "INSTALLED_APPS names no app of the project (a folder of "
                      "the repo), and every installation declares one as its core app",
                      "make one (python manage.py startapp NAME), add it to INSTALLED_APPS, "
                      "then adopt")
    return apps[0]


def _adopt_database(directory, given, assignments):
    """(database, the SQLite file of the project's data or None): the database given, else
    SQLite if the project's is SQLite; a refusal if it is another and none was given."""
    import ast
    import stat
    statement = assignments.get("DATABASES")
    strings = [node.value for node in ast.walk(statement.value) if isinstance(
        node, ast.Constant) and isinstance(node.value, str)] if statement else []
    engines = [text for text in strings if text.startswith(("django.db.backends.", "sqlite:"))]
    if given is None and statement is not None and not (engines and all(
            text.endswith("sqlite3") or text.startswith("sqlite:") for text in engines)):
        _adopt_refuse(directory, f"settings.py's DATABASES (line {statement.lineno}) is not "
                      "SQLite, and an installation's database is SQLite or PostgreSQL, "
                      "named after it", "choose: --database postgresql (the database and role "
                      "named like each installation, peer authentication) or --database "
                      "sqlite (a new SQLite file per installation)")
    database = given or "sqlite"
    if database != "sqlite" or statement is None:
        return database, None
    for text in strings:  # BASE_DIR / 'db.sqlite3': a file of the repo
        relative = os.path.normpath(text)
        try:
            info = os.lstat(directory / relative)
        except (OSError, ValueError):
            continue
        if not (os.path.isabs(relative) or relative.startswith("..")) \
                and stat.S_ISREG(info.st_mode):
            return database, relative
    return database, None


def _adopt_moved_module(directory, package, name, source):
    """The text of a module that moves from the settings package to stagetools_project/:
    its relative imports made absolute (they stay in the package). ``__file__`` may only
    make BASE_DIR as startproject does: anything else would point elsewhere once moved."""
    import ast
    import re
    relative = f"{package}/{name}"
    module = _adopt_parse(directory, relative, source)
    lines = source.splitlines(keepends=True)
    allowed = {id(node) for statement in module.body if isinstance(statement, ast.Assign)
               and ast.unparse(statement.value) in _ADOPT_BASE_DIR_FORMS
               for node in ast.walk(statement.value)}
    for node in ast.walk(module):
        if isinstance(node, ast.Name) and node.id == "__file__" and id(node) not in allowed:
            _adopt_refuse(directory, f"{relative} uses __file__ on line {node.lineno}, which "
                          f"points into {stagetools.DJANGO_PROJECT}/ once the module moves "
                          f"there", f"write that path from BASE_DIR (BASE_DIR / '{package}' / "
                          "...), then adopt")
    imports = [node for node in ast.walk(module) if isinstance(node, ast.ImportFrom)]
    for node in sorted(imports, key=lambda node: (node.lineno, -node.col_offset)):
        if node.level:  # rewritten from the right, so that columns to the left still hold
            line = lines[node.lineno - 1]
            head = re.compile(r"from(\s+)\.(?!\.)(\s*)").match(line, node.col_offset)
            if node.level > 1 or head is None:
                _adopt_refuse(directory, f"{relative} line {node.lineno} imports from outside "
                              f"its package", f"write it as an absolute import (from "
                              f"{package}.x import y), then adopt")
            absolute = f"from{head.group(1)}{package}" + ("." if node.module else " ")
            lines[node.lineno - 1] = line[:head.start()] + absolute + line[head.end():]
    return "".join(lines)


def _adopt_check_entry_point(directory, package, name, source):
    """Refuse a wsgi.py or asgi.py that does more than startproject's: the installations
    are served by stagetools_django's entry points, which would leave out what it adds."""
    import ast
    if source is None:
        return
    for statement in _adopt_parse(directory, f"{package}/{name}", source).body:
        code = ast.unparse(statement)
        if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
                or code in _ADOPT_ENTRY_POINT_CODE
                or code.startswith("os.environ.setdefault('DJANGO_SETTINGS_MODULE'")):
            _adopt_refuse(directory, f"{package}/{name} does more than startproject's (line "
                          f"{statement.lineno}: {code.splitlines()[0][:60]}), and every "
                          f"installation is served by stagetools_django:{name[:4]}_application",
                          "move what it adds into settings.py or a middleware, delete it, "
                          "then adopt")


def _adopt_package_goes(directory, package, init_source, apps):
    """Whether the settings package is empty once its settings and URLs moved and its entry
    points went (then it goes too): not if it is an app, holds anything else, or its
    __init__.py does something."""
    import ast
    if package in (apps or []) or (init_source and [
            statement for statement in _adopt_parse(directory, f"{package}/__init__.py",
                                                    init_source).body
            if not (isinstance(statement, ast.Expr) and isinstance(statement.value,
                                                                    ast.Constant))]):
        return False
    known = set(_ADOPT_MOVED + _ADOPT_ENTRY_POINTS) | {"__init__.py", "__pycache__"}
    return not set(os.listdir(directory / package)) - known


def _adopt_requirements(directory, database):
    """The requirements of setup.py: the project's requirements.txt (and the files it
    includes with -r, each looked at first), then those of the starter that the project does
    not name. A Django that stagetools_django does not support is refused, and so is an option
    that install_requires cannot hold."""
    import re
    own, seen = [], set()

    def name(requirement):
        return re.split(r"[\s<>=!~;@\[]", requirement)[0].lower().replace("_", "-")

    def read(relative, included_by):
        if os.path.isabs(relative) or relative.startswith("..") or relative in seen \
                or len(seen) > 32:
            _adopt_refuse(directory, f"{included_by} includes {relative}, outside the repo or "
                          "twice", "include each requirements file of the repo once")
        seen.add(relative)
        text = _adopt_read(directory, relative)
        if text is None and included_by:
            _adopt_refuse(directory, f"{included_by} includes {relative}, which is missing",
                          "fix the -r line, then adopt")
        # pip's format: a trailing \ continues a line, # starts a comment at a line's start
        # or after a space; options start with - (alone, or after a requirement).
        for number, line in enumerate((text or "").replace("\\\n", " ").splitlines(), 1):
            line = re.split(r"(?:^|\s)#", line)[0].strip()
            option = re.match(r"(--[\w-]+|-\w)\s*=?\s*(.*)", line)
            if option and option.group(1) in ("-r", "--requirement"):
                read(os.path.normpath(os.path.join(os.path.dirname(relative),
                                                   option.group(2))), f"{relative}:{number}")
            elif option and option.group(1) in _ADOPT_PIP_ONLY_OPTIONS or "://" in line and \
                    " @ " not in line:
                _adopt_refuse(directory, f"{relative} line {number} ({line}) is for pip only: "
                              "setup.py's install_requires cannot hold it", "adopt by hand "
                              "(docs/guides/adoption.md, 'By hand'), or write it as 'name @ "
                              "URL'")
            elif line and not option:  # other options (-c, --hash, --pre) are pip's own
                own.append((re.split(r"\s--?[A-Za-z]", line)[0].strip(),
                            f"{relative} line {number}"))

    read("requirements.txt", None)
    floor = stagetools.FRAMEWORKS["django"]["requirements"][0]  # Django>=4.2
    for requirement, where in own:
        if name(requirement) == "django" and not _adopt_allows(requirement, floor):
            _adopt_refuse(directory, f"{where} requires {requirement}, but stagetools_django "
                          f"needs {floor} (4.2 LTS or newer)", "upgrade the project to "
                          "Django 4.2 LTS or newer (Django~=4.2, say), run its tests, then "
                          "adopt")
    names = {name(requirement) for requirement, _ in own}
    return [requirement for requirement, _ in own] + [
        requirement for requirement in stagetools.FRAMEWORKS["django"]["requirements"]
        + stagetools.DATABASES[database]["requirements"] if name(requirement) not in names]


def _adopt_allows(requirement, floor):
    """Whether a requirement ('Django==4.0.1', 'django>=3.2,<5') allows some version at or
    above the floor's ('Django>=4.2'). Versions are compared by their numbers; pre-release
    tags are ignored."""
    import itertools
    import re

    def version(text):
        return tuple(int(part) for part in re.findall(r"\d+", text.split("*")[0])[:4])

    def holds(candidate, operator, wanted):
        width = max(len(candidate), len(wanted))
        a, b = (tuple(itertools.islice(itertools.chain(v, itertools.repeat(0)), width))
                for v in (candidate, wanted))
        prefix = candidate[:len(wanted)] == wanted
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "!=": a != b,
                "==": a == b, "===": a == b, "==*": prefix, "!=*": not prefix,
                "~=": a >= b and candidate[:len(wanted) - 1] == wanted[:-1]}[operator]

    specifier = re.split(r"[;@]", requirement)[0]
    clauses = [(operator + ("*" if text.endswith("*") and operator in ("==", "!=") else ""),
                version(text)) for operator, text in
               re.findall(r"(===|==|!=|~=|<=|>=|<|>)\s*([\w.*+!-]+)", specifier)]
    lowest = version(floor)
    candidates = {lowest, (9999,)} | {wanted for _, wanted in clauses} | {
        wanted + (1,) for _, wanted in clauses}
    return any(all(holds(candidate, operator, wanted) for operator, wanted in clauses)
               for candidate in candidates if candidate >= lowest)


def _adopt_refuse_what_is_in_the_way(directory, written):
    """Refuse files that adopt would write, and packaging of the project's own."""
    import re
    for name, marker in _ADOPT_PACKAGING.items():
        text = _adopt_read(directory, name)
        if text is not None and re.search(marker, text, re.M):
            _adopt_refuse(directory, f"it has its own packaging ({name}), and adopt writes "
                          "setup.py with the modules it adds and your requirements.txt",
                          f"move its requirements into requirements.txt and remove "
                          f"{'it' if name == 'setup.py' else 'the packaging from it'}, then "
                          "adopt; or adopt by hand (docs/guides/adoption.md)")
    in_the_way = [name for name in written if os.path.lexists(directory / name)]
    if in_the_way:
        _adopt_refuse(directory, f"it has {', '.join(in_the_way)} already, which adopt would "
                      "write", "adopt a project that has none of them, or adopt by hand "
                      "(docs/guides/adoption.md)")


def _adopt_project_texts(directory, skipped):
    """{path: text} of the project's Python files and the configuration files at its top
    that may name its settings module; virtualenvs, hidden folders and links are not the
    project's, and the files of ``skipped`` adopt writes itself."""
    texts = {}
    for folder, subfolders, names in os.walk(directory):
        subfolders[:] = sorted(entry for entry in subfolders if not entry.startswith(".")
                               and entry not in ("node_modules", "__pycache__")
                               and not os.path.exists(os.path.join(folder, entry, "pyvenv.cfg")))
        for entry in sorted(names):
            relative = os.path.relpath(os.path.join(folder, entry), directory)
            if relative not in skipped and not os.path.islink(os.path.join(folder, entry)) and (
                    entry.endswith(".py") or folder == str(directory)
                    and entry in _ADOPT_CONFIG_FILES):
                texts[relative] = _adopt_read(directory, relative)
    return texts


def _adopt_references(directory, package, package_goes, texts):
    """{path: new text} of those of ``texts`` that name the settings module or the root
    URLconf by the old package ('mysite.settings' becomes 'stagetools_project.settings'); a
    reference that cannot be rewritten (to an entry point or a package that goes) is refused."""
    import re
    name, moved = re.escape(package), {module[:-3] for module in _ADOPT_MOVED}
    dotted = re.compile(rf"(?<![\w.]){name}\.({'|'.join(sorted(moved))})\b")
    imported = re.compile(rf"\bfrom(\s+){name}(\s+import\s+\(?\s*)(\w+(?:\s*,\s*\w+)*)")
    gone = re.compile(rf"(?<![\w.]){name}\.(wsgi|asgi)\b" + (
        rf"|\b(import|from)\s+{name}\b" if package_goes else ""))
    changed = {}
    for relative, text in texts.items():
        def from_import(found):
            names = {part.strip() for part in found.group(3).split(",")}
            if names & moved and names - moved:
                _adopt_refuse(directory, f"{relative} imports {', '.join(sorted(names))} "
                              f"from {package} in one statement, and only some of them move "
                              f"to {stagetools.DJANGO_PROJECT}", "import them in separate "
                              "statements, then adopt")
            return found.group(0) if not names & moved else \
                f"from{found.group(1)}{stagetools.DJANGO_PROJECT}{found.group(2)}{found.group(3)}"

        new = imported.sub(from_import, dotted.sub(rf"{stagetools.DJANGO_PROJECT}.\1", text))
        leftover = gone.search(new)
        if leftover:
            line = new.count("\n", 0, leftover.start()) + 1
            _adopt_refuse(directory, f"{relative} line {line} names {leftover.group(0)}, "
                          "which adoption removes", "remove that reference (the entry points "
                          "are stagetools_django:wsgi_application and :asgi_application), "
                          "then adopt")
        if new != text:
            changed[relative] = new
    return changed


def _adopt_settings(source, database):
    """settings.py rewritten to start from settings_defaults(): (text, removed, notes).
    Each derived setting goes with the comment above it, and so does a comment heading
    ('# Database') left over a setting that went."""
    import ast
    module = ast.parse(source)
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
            notes.append(f"ALLOWED_HOSTS = {value} went: an installation allows its localhost "
                         f"names and the host_names of {stagetools.DECLARATION_FILE}")
        elif name not in _ADOPT_DERIVED_SETTINGS:
            continue
        removed.append(name)
        while first > 0 and lines[first - 1].lstrip().startswith("#"):
            first -= 1  # the comment that explained the removed setting goes with it
        drop.update(range(first, last))
    _adopt_drop_orphaned_comments(lines, drop)
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


def _adopt_drop_orphaned_comments(lines, drop):
    """Add to ``drop`` each comment block that headed settings that go ('# Database' and its
    link above DATABASES) and heads nothing once they went: the next line kept is a comment
    or the end."""
    def is_comment(number):
        return lines[number].lstrip().startswith("#")

    def next_line(number, skip):
        while number < len(lines) and (not lines[number].strip() or number in skip):
            number += 1
        return number

    blocks, number = [], 0
    while number < len(lines):
        if is_comment(number) and number not in drop:
            start = number
            while number < len(lines) and is_comment(number):
                number += 1
            blocks.append((start, number))
        number += 1
    changed = True
    while changed:
        changed = False
        for start, end in blocks:
            if start in drop or next_line(end, set()) not in drop:
                continue  # kept already, or it heads code that stays
            following = next_line(end, drop)
            if following == len(lines) or is_comment(following):
                drop.update(range(start, end))
                changed = True


def _adopt_apply(directory, package, package_goes, moved, removed, notes, references,
                 manage_text, files):
    """Change the tree as adopt decided, saying each step."""
    import shutil
    old, new = directory / package, directory / stagetools.DJANGO_PROJECT
    os.mkdir(new)
    _adopt_write(new / "__init__.py", "")
    for name, text in moved.items():
        _adopt_write(new / name, text)
        (old / name).unlink()
    print(f"moved {package}/settings.py and {package}/urls.py to {stagetools.DJANGO_PROJECT}/ "
          "(every installation's settings module and root URLconf)")
    print(f"rewrote {stagetools.DJANGO_PROJECT}/settings.py: settings_defaults() first; "
          f"removed {', '.join(removed) or 'nothing'} (stagetools derives them) and the "
          f"comments over them")
    for note in notes:
        print(note)
    gone = [name for name in _ADOPT_ENTRY_POINTS if os.path.lexists(old / name)]
    for name in gone:
        (old / name).unlink()
    if gone:
        print(f"removed {', '.join(f'{package}/{name}' for name in gone)} (the entry points "
              "are stagetools_django:wsgi_application and :asgi_application)")
    if package_goes:
        if os.path.isdir(old / "__pycache__") and not os.path.islink(old / "__pycache__"):
            shutil.rmtree(old / "__pycache__")
        if os.path.lexists(old / "__init__.py"):
            (old / "__init__.py").unlink()
        os.rmdir(old)
        print(f"removed {package}/ (nothing else was in it)")
    else:
        kept = sorted(entry for entry in os.listdir(old) if entry != "__pycache__")
        print(f"kept {package}/ ({', '.join(kept)}): its modules and apps keep their import "
              "paths and app labels")
    for relative, text in references.items():
        _adopt_write(directory / relative, text)
    if references:
        print(f"rewrote {', '.join(references)}: {package}.settings and {package}.urls are "
              f"{stagetools.DJANGO_PROJECT}.settings and .urls now")
    _adopt_write(directory / "manage.py", manage_text)
    print(f"replaced manage.py (it named {package}.settings) with one that calls "
          "stagetools_django.manage()")
    for name, text in files.items():
        _adopt_write(directory / name, text)
    print(f"wrote {', '.join(files)}")


def _adopt_write(path, text):
    """Write a file whole or not at all, keeping its mode (manage.py stays executable): a
    new temporary file (never one planted there) renamed into place."""
    import stat
    import tempfile
    mode = stat.S_IMODE(os.lstat(path).st_mode) if os.path.lexists(path) else 0o644
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _adopt_next_steps(directory, system, database_file):
    """The commands that make the DEV installation of the adopted repo, as lines to print:
    its virtualenv, the repo at core_repo_dir (where the installation and the deploy side
    read its stagetools.ini), the project's SQLite data as its database, private (0600); for
    PostgreSQL first its role and database."""
    import shlex

    def command(*parts, private=False):  # private: under umask 077, in a subshell
        line = shlex.join(str(part) for part in parts)
        return f"  (umask 077 && {line})" if private else f"  {line}"

    repo, database = system.core_repo_dir, system.database_sqlite_path
    steps = [f"\nAs root, its PostgreSQL role and database (peer authentication lets the OS "
             f"user {system.name} in as the role {system.name}):",
             command("runuser", "-u", "postgres", "--", "createuser", system.database_user),
             command("runuser", "-u", "postgres", "--", "createdb", "--owner",
                     system.database_user, system.database_name),
             ] if system.database == "postgresql" else []
    steps += [f"\nMake its DEV installation {system.name} (its virtualenv, the repo in it, "
              "its database: yours alone), with:",
              command(sys.executable, "-m", "venv", system.base_dir, private=True)]
    if directory != repo:
        steps += [command("mkdir", "-p", system.src_dir), command("mv", directory, repo)]
    if database_file:
        steps += [command("mv", repo / database_file, database),
                  command("chmod", "600", database)]
    steps += [command(system.pip_path, "install", "--editable", repo),
              command(system.python_path, "-m", "stagetools_django", "migrate", private=True),
              "\nThen, from any directory, run its tests and serve it (DEBUG is on, so it "
              "serves the static files too):",
              command(system.python_path, "-m", "stagetools_django", "test"),
              command(*stagetools._server_command(system, "127.0.0.1", 8000))]
    return steps


if __name__ == "__main__":
    sys.exit(manage())
