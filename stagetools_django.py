"""stagetools_django: Django settings defaults and entry points of a stagetools installation.

Import it only where Django (4.2 LTS or newer) is installed. It imports Django
lazily, so ``import stagetools_django`` stays cheap until a setting is read.

- settings: in ``stagetools_project/settings.py``::

      from stagetools_django import settings_defaults
      globals().update(settings_defaults())   # SQLite; settings_defaults("postgresql")

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
__all__ = ["check_settings", "csrf_failure", "manage", "settings_defaults"]


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
            f"cannot import aaa_env_setup (python {sys.executable}): {_ENV_SETUP_HELP}") from None
    system = getattr(module, "SYSTEM", None)
    return system if isinstance(system, stagetools.System) else \
        stagetools.get_actual_system_from_name()


def settings_defaults(database="sqlite", system=None):
    """Django settings for the installation: ``globals().update(settings_defaults())``.

    ``database`` is "sqlite" (the file ``database_sqlite_path``) or "postgresql"
    (database and role named after the installation, peer authentication over
    the local socket, no password).
    """
    system = system or _env_setup()
    stagetools._check_choice("database", database, stagetools.DATABASES)
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
        # Add your domain in settings.py: ALLOWED_HOSTS += ["shop.example.com"].
        "ALLOWED_HOSTS": [f"{system.container}.localhost", "localhost", "127.0.0.1", "[::1]"],
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
        "DATABASES": {"default": _databases(system)[database]},
        "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
        "USE_TZ": True,
        "TIME_ZONE": "UTC",
        "STATIC_URL": system.static_url,
        "STATIC_ROOT": system.static_dir,
        "MEDIA_URL": system.media_url,
        "MEDIA_ROOT": system.media_dir,
        # nginx serves uploads: readable by it whatever the service's UMask=0027.
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


def _databases(system):
    """The DATABASES entry of each choice in stagetools.DATABASES."""
    return {
        "sqlite": {"ENGINE": "django.db.backends.sqlite3",
                   "NAME": str(system.database_sqlite_path)},
        "postgresql": {"ENGINE": "django.db.backends.postgresql",
                       "NAME": system.database_name, "USER": system.database_user,
                       "PASSWORD": "", "HOST": stagetools._database_host(system),
                       "PORT": ""},
    }


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
    expected = {entry["ENGINE"]: entry["NAME"] for entry in _databases(system).values()}
    wanted = expected.get(database.get("ENGINE"))
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
               "PROD), which browsers send over HTTPS only. Serve it behind the TLS-terminating nginx that sets X-Forwarded-Proto "
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
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line
    try:
        _env_setup()
        # Load settings here: Django's own command runner hides errors in them.
        settings.INSTALLED_APPS
    except _SETUP_ERRORS + (ImproperlyConfigured,) as error:
        print(f"stagetools: error: {error}", file=sys.stderr)
        return 2
    execute_from_command_line(argv or sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(manage())
