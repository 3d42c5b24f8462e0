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
import sys

import stagetools

# The entry points asgi_application and wsgi_application are left out: a star import
# would build Django's application.
__all__ = ["check_settings", "manage", "settings_defaults"]

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


def settings_defaults(database="sqlite", system=None):
    """Django settings for the installation: ``globals().update(settings_defaults())``.

    ``database`` is "sqlite" (the file ``database_sqlite_path``) or "postgresql"
    (database and role named after the installation, peer authentication over
    the local socket, no password).
    """
    system = system or _env_setup()
    database_settings = stagetools.django_database(system, database)
    # Registered here, because every stagetools settings module comes through here.
    from django.core import checks
    checks.register(check_settings)
    production = not system.is_debug
    settings = {
        "STAGETOOLS_NAME": system.name,
        "BASE_DIR": system.base_dir,
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
            "DIRS": [], "APP_DIRS": True,
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
    }
    return settings


def check_settings(app_configs=None, **kwargs):
    """Django system check: the settings must not contradict the installation."""
    from django.conf import settings
    from django.core.checks import Error, Warning

    name = getattr(settings, "STAGETOOLS_NAME", None)
    if name is None:
        return []
    system = _env_setup()
    problems = []
    if settings.DEBUG and not system.is_debug:
        problems.append(Error(
            f"DEBUG is on in the {system.stage.name} installation {system.name!r}",
            hint="remove DEBUG = True from your settings: DEBUG is for DEV and INT only",
            id="stagetools.E001"))
    if name != system.name:
        problems.append(Warning(
            f"settings were made for {name!r} but this process runs in {system.name!r}",
            hint="do not copy settings between installations; let stagetools fill them in",
            id="stagetools.W002"))
    database = settings.DATABASES.get("default", {})
    expected = {entry["ENGINE"]: entry["NAME"] for entry in
                (stagetools.django_database(system, choice) for choice in stagetools.DATABASES)}
    wanted = expected.get(database.get("ENGINE"))
    if wanted is not None and str(database.get("NAME")) != wanted:
        problems.append(Warning(
            f"the default database is {database.get('NAME')!r}, not the installation's "
            f"{wanted!r}", hint="remove the NAME override from DATABASES in your settings",
            id="stagetools.W003"))
    return problems


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


def __getattr__(attribute):
    """``wsgi_application``, built when a WSGI server looks it up (PEP 562), so that a
    broken installation fails at start-up: WSGI has no lifespan to do it in."""
    if attribute != "wsgi_application":
        raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
    from django.core.wsgi import get_wsgi_application
    application = _build_application(get_wsgi_application)
    globals()[attribute] = application
    return application


def manage(argv=None):
    """What manage.py does, after aaa_env_setup: ``python -m stagetools_django migrate``."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line
    try:
        _env_setup()
        # Load settings here: Django's own command runner hides errors in them.
        settings.INSTALLED_APPS
    except (stagetools.StagetoolsError, ImproperlyConfigured) as error:
        print(f"stagetools: error: {error}", file=sys.stderr)
        return 2
    execute_from_command_line(argv or sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(manage())
