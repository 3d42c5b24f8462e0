#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: stagetools contributors
# MIT License (see LICENSE)

DOCUMENTATION = r"""
module: installations
short_description: Converge the stagetools installations of a host from their names and code
description:
  - Builds, upgrades and serves each installation of I(installations), as the collection's own
    copy of stagetools renders it from the installation's name and the C(stagetools.ini) of
    the commit being deployed. Root runs only this collection's code; a repo's code runs as
    its installation's user in a sandbox of systemd's.
  - A new commit is built in C(releases/next) beside the running release, migrated (after a
    backup), started as a candidate on a socket of its own and asked for its health page;
    only then are its directories renamed into place and the service restarted. A failure
    leaves the running release serving; a failed migration is restored while requests wait.
  - Installations are built several at once (as many as the host has cores, at most four);
    changes to what the host shares (accounts, units, certificates, nginx sites) one at a
    time. One installation's failure does not stop the others; the module fails at the end
    naming each that failed.
  - The nginx sites are written and checked with C(nginx -t); reloading nginx is the
    caller's (the role's handler).
  - When an installation's I(repo) is a path on the controller, the action plugin of this
    module sends its commit to the host as a git bundle, only when the host's mirror lacks it.
version_added: "0.2.0"
author: stagetools contributors (!UNKNOWN)
options:
  installations:
    description: The installations to converge.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: The installation's name, e.g. C(shop_prod); it says everything else.
        type: str
        required: true
      repo:
        description:
          - Where the code comes from. An absolute path is a git repository on the controller;
            anything else is a git URL the host fetches.
        type: str
        required: true
      version:
        description: The branch, tag or commit to deploy.
        type: str
        default: HEAD
      core_repo:
        description: The repo's directory below C(src/), for a customer configuration that runs
          another configuration's code (C(acme_prod) running C(shop)). Default the
          configuration.
        type: str
      core_app:
        description: Only to repeat the repo's declaration (C(core_app) in C(stagetools.ini)).
        type: str
      framework:
        description: Only to repeat the repo's declaration.
        type: str
        choices: [django, flask, starlette]
      server:
        description: Only to repeat the repo's declaration.
        type: str
        choices: [gunicorn, uvicorn, hypercorn]
      database:
        description: Only to repeat the repo's declaration.
        type: str
        choices: [sqlite, postgresql]
      host_names:
        description: Only to repeat the repo's declaration (C(host_names)), in any order.
        type: list
        elements: str
      health_path:
        description: The page that must answer 200, asked of the candidate and of the service.
        type: str
        default: /
      database_host:
        description:
          - The host that serves its PostgreSQL database (its name in DNS and in that host's
            certificate), when that is another host; reached by TLS with the client
            certificate of I(credentials). Root's topology file tells the installation.
          - Default none; the database is this host's.
        type: str
      balancer_host:
        description: The host whose HAProxy balances its requests among its app hosts; the
          balancer's play reads it, this module does not.
        type: str
  credentials:
    description:
      - Set by the role, not by users; by name, the files the deployment hands an
        installation on a database host - C(ca_certificate), C(certificate) and C(key) (PEM),
        written into its C(database_tls_dir); C(secret_key), the key every app host of the
        installation shares, written into its C(secret_key_path) (0600).
    type: dict
    default: {}
  database_backups:
    description: Set by the role, not by users; by name, the backup that the rolling upgrade
      took on the database host before this run (then this module takes none of its own).
    type: dict
    default: {}
  pip_env:
    description: >-
      Environment for pip, e.g. C({PIP_NO_INDEX: "1", PIP_FIND_LINKS: /srv/wheels}).
    type: dict
    default: {}
  acme_server:
    description: The ACME directory URL that certifies QUAL and PROD host names.
    type: str
    default: https://acme-v02.api.letsencrypt.org/directory
  acme_email:
    description: The address the ACME server may write to about expiring certificates.
    type: str
    default: ""
  mirror_dir:
    description: Root's store of fetched code on the host, one bare mirror per installation.
    type: path
    default: /var/lib/stagetools-deploy
  commits:
    description: Set by the action plugin, not by users; the commit of each installation whose
      repo is on the controller.
    type: dict
    default: {}
  bundles:
    description: Set by the action plugin, not by users; git bundles on the host, by name.
    type: dict
    default: {}
  declarations:
    description: Set by the action plugin in check mode, not by users; the C(stagetools.ini)
      of commits the host does not have yet, by name.
    type: dict
    default: {}
attributes:
  check_mode:
    description: Reports what would change, and changes nothing.
    support: full
  diff_mode:
    description: Shows the files that change (and for the code, the commit) before and after.
    support: full
requirements:
  - systemd, git, nginx, OpenSSL and Python 3 with venv on the host; PostgreSQL for
    installations on it, certbot for HTTPS.
"""

EXAMPLES = r"""
- name: Converge shop_prod at tag v2.4 and shop_dev at main
  stagetools.deploy.installations:
    installations:
      - {name: shop_prod, repo: /srv/git/shop, version: v2.4}
      - {name: shop_dev, repo: /srv/git/shop, version: main}
"""

RETURN = r"""
installations:
  description: What happened to each installation, by name.
  returned: always
  type: dict
  contains:
    changed:
      description: Whether the installation changed (or would, in check mode).
      type: bool
    changes:
      description: What changed, or would change in check mode, in words.
      type: list
      elements: str
    failed:
      description: Whether converging it failed.
      type: bool
    msg:
      description: Why it failed, ending with the cause and saying what serves now.
      type: str
    commit:
      description: The commit deployed (or that would be).
      type: str
    backup:
      description: The database backup taken before migrating, if any.
      type: str
    previous:
      description: The commit that served before this run (root's record), if any.
      type: str
    server_names:
      description: The names its nginx site answers (C(NAME-with-dashes.localhost) and its
        host names), for a balancer in front of the host.
      type: list
      elements: str
needs_commits:
  description: Only to the action plugin, the commits the host's mirrors lack, by name.
  returned: when the action plugin must send code
  type: dict
"""

import datetime
import grp
import os
import pwd
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.stagetools.deploy.plugins.module_utils import stagetools
from ansible_collections.stagetools.deploy.plugins.module_utils.deploy import (
    RELEASE_PARTS, UNIT_DIR, WEB_GROUP, StepFailed, as_user, back_up, failed, journal,
    read_file, release_binds, private_file, remove_file, restore, run, unit_state, user_dir,
    valid_pip_env, wait_for_page, write_file)
from ansible_collections.stagetools.deploy.plugins.module_utils.hosts import (
    client_files, psql, role_and_database)

CANDIDATE_SECONDS = 120  # a new release's first answer, imports and all
HEALTH_SECONDS = 60
SITES_ENABLED = "/etc/nginx/sites-enabled"
LETSENCRYPT = "/etc/letsencrypt"
CERTIFICATE_RENEW_DAYS = 30  # certbot's own: a certificate due within 30 days is renewed
# Files of an installation that earlier versions of stagetools rendered: removed when the
# rendering no longer has them.
FORMER_FILES = ("/etc/tmpfiles.d/{name}.conf",)
UNIT_SUFFIXES = (".socket", ".service", "-app.socket", "-proxy.service")
# Run as the installation's user (the repo's own stagetools): its secret key, made private.
SECRET_KEY_CODE = ("import sys, stagetools\nstagetools.read_secret_key("
                   "stagetools.get_expected_system_from_name(sys.argv[1], core_repo=sys.argv[2]))")
# Run as the installation's user: the live dirs a release replaces, and releases/next empty
# but for them (a build that failed before is gone).
RELEASE_DIRS_CODE = """\
import os, shutil, sys
base, parts = sys.argv[1], sys.argv[2:]
for part in ["releases", *parts]:
    os.makedirs(os.path.join(base, part), exist_ok=True)
next_release = os.path.join(base, "releases", "next")
shutil.rmtree(next_release, ignore_errors=True)
for part in ["", *parts]:
    os.mkdir(os.path.join(next_release, part))
"""
# Run as the installation's user: the next release into place, the running one to previous
# (or, rolling back, the reverse). Renames only: no file of a release changes.
SWITCH_CODE = """\
import os, shutil, sys
base, into, out = sys.argv[1:4]
releases = os.path.join(base, "releases")
shutil.rmtree(os.path.join(releases, out), ignore_errors=True)
os.mkdir(os.path.join(releases, out))
for part in sys.argv[4:]:
    live = os.path.join(base, part)
    if os.path.lexists(live):
        os.rename(live, os.path.join(releases, out, part))
    os.rename(os.path.join(releases, into, part), live)
os.rmdir(os.path.join(releases, into))
"""


class Installation:
    """One run of the module: the steps in order, what they changed, what serves."""

    def __init__(self, module, entry, shared):
        params = module.params
        name = entry["name"]
        self.params = dict(entry, pip_env=params["pip_env"], acme_server=params["acme_server"],
                           acme_email=params["acme_email"], mirror_dir=params["mirror_dir"],
                           commit=params["commits"].get(name), bundle=params["bundles"].get(name),
                           declaration=params["declarations"].get(name),
                           credentials=params["credentials"].get(name),
                           database_backup=params["database_backups"].get(name))
        self.check_mode, self.shared, self.name = module.check_mode, shared, name
        self.changes, self.diff = [], []
        self.step, self.commit, self.system, self.backup = "code", None, None, None
        self.record = self.previous_commit = self.backup_time = None
        self.switched = self.rolled_back = False
        self.old_units = {}

    # -- the run

    def converge(self):
        """The steps in order: what the host shares is changed by one installation at a
        time (``shared``, a lock), a release is built beside the others'."""
        declaration = self.source()
        self.expected(declaration)
        self.prerequisites()
        with self.shared:
            self.account()
            self.database()
            self.step = "nginx site"
            self.refuse_taken_names(self.system.services[self.site_path])
            if self.system.is_https:
                self.certificate()
        new_code = self.new_code()
        if new_code and not self.check_mode:
            self.build()
            self.migrate()
            if self.previous_commit:
                self.candidate()
            self.switch()
        with self.shared:
            restarted = self.units(restart=new_code)
        if restarted:
            self.health()
        if new_code and not self.check_mode:
            self.restart_workers()
        with self.shared:
            self.remember(declaration)
            self.site()

    def failure(self, error):
        """The message of a failed run: the step, the cause, and what serves now."""
        commit = f" ({self.commit[:12]})" if self.commit else ""
        previous = (self.previous_commit or "")[:12]
        if self.switched:
            now = (f"rolled back: {previous} serves again" if self.rolled_back else
                   f"the rollback to {previous} did not answer either; see its journal")
        elif previous:
            now = f"{previous} serves as before"
        else:
            now = "nothing served before, and nothing serves now"
        return (f"{self.name}: deploying {self.params['version']}{commit} failed at step "
                f"'{self.step}': {error}\n{self.name}: {now}")

    def change(self, what, before=None, after=None, header=None):
        self.changes.append(what)
        if after is not None:
            self.diff.append({"before_header": header or what, "after_header": header or what,
                              "before": before or "", "after": after})

    # -- the code and what it declares

    def source(self):
        """The commit to deploy in root's mirror; returns its declaration."""
        params = self.params
        stagetools.parse_name(self.name)
        self.record = stagetools._read_record(self.name)  # what serves, for a failure's message
        self.previous_commit = self.record and self.record["commit"]
        version = params["version"]
        if not version or version.startswith("-") or not version.isprintable() or " " in version:
            raise StepFailed(f"version {version!r}: a branch, tag or commit, not an option")
        self.mirror = os.path.join(params["mirror_dir"], f"{self.name}.git")
        # Root's mirror is the collection's own: one there before this run (collection 0.1.0
        # kept no record) means that the collection made the installation.
        self.mirror_existed = os.path.isdir(self.mirror)
        if not self.mirror_existed and not self.check_mode:
            os.makedirs(params["mirror_dir"], mode=0o755, exist_ok=True)
            run(["git", "init", "--quiet", "--bare", self.mirror], "git init of the mirror")
        refs = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]  # nothing else
        if params["bundle"]:
            self.git("fetch", "--quiet", "--no-tags", params["bundle"], *refs)
        elif not params["commit"] and os.path.isdir(self.mirror):  # a URL: the mirror is a cache
            self.git("fetch", "--quiet", "--prune", "--no-tags", "--end-of-options",
                     params["repo"], *refs)
        commit = params["commit"] or self.git("rev-parse", "--verify", "--quiet",
                                              "--end-of-options", f"{version}^{{commit}}")
        self.commit = commit
        if params["commit"] and not self.has_commit(commit):  # check mode: not sent
            if params["declaration"] is None:
                raise StepFailed(f"the host's mirror lacks {commit[:12]}")
            return params["declaration"]
        return self.declaration_of(commit)

    def git(self, *args):
        if not os.path.isdir(self.mirror):
            raise StepFailed(f"the mirror {self.mirror} is not there yet (check mode): run "
                             "without --check once")
        return run(["git", "--git-dir", self.mirror, *args],
                   f"git {args[0]} in {self.mirror}").stdout.strip()

    def has_commit(self, commit):
        return os.path.isdir(self.mirror) and run(
            ["git", "--git-dir", self.mirror, "cat-file", "-e", f"{commit}^{{commit}}"],
            "git cat-file", check=False).returncode == 0

    def declaration_of(self, commit):
        """The text of the commit's stagetools.ini ('' without one): a file of the commit,
        never one the user left in a checkout."""
        listed = self.git("ls-tree", commit, "--", stagetools.DECLARATION_FILE)
        if not listed:
            return ""
        mode, kind, blob = listed.split("\t")[0].split()
        if mode not in ("100644", "100755") or kind != "blob":
            raise StepFailed(f"{stagetools.DECLARATION_FILE} of {commit[:12]}: it is not a "
                             "regular file (a link?); make it a file of the repo")
        if int(self.git("cat-file", "-s", blob)) > 65536:
            raise StepFailed(f"{stagetools.DECLARATION_FILE} of {commit[:12]}: more than "
                             "64 KiB")
        return self.git("cat-file", "blob", blob) + "\n"

    def expected(self, declaration):
        """The expected system, from the collection's own stagetools."""
        self.step = "expected system"
        params = self.params
        declared = stagetools.parse_declaration(
            declaration, self.name, f"the declaration of {params['version']} ({self.commit[:12]})")
        self.system = stagetools.get_expected_system_from_name(
            self.name, core_repo=params["core_repo"], core_app=params["core_app"],
            framework=params["framework"], server=params["server"], database=params["database"],
            host_names=params["host_names"] or None, declared=declared,
            database_host=params["database_host"] or "")

    def prerequisites(self):
        """What this installation needs of the host besides what every one needs."""
        self.step = "prerequisites"
        needed = {"certbot": "certbot"} if self.system.is_https else {}
        if self.system.database_host:  # a client: PostgreSQL is another host's
            needed.update(psql="postgresql-client", pg_dump="postgresql-client",
                          pg_restore="postgresql-client")
        elif self.system.database == "postgresql":
            needed.update(psql="postgresql", pg_dump="postgresql", pg_restore="postgresql")
        lacking = sorted({package for command, package in needed.items()
                          if not shutil.which(command)})
        if lacking:
            raise StepFailed(f"the host lacks what {self.name} needs: apt-get install "
                             f"{' '.join(lacking)}")

    # -- the user, its directories, its database

    def account(self):
        """Root's record first (the collection makes only accounts it recorded), then the
        group, the user, the base dir and media/."""
        self.step = "account"
        system = self.system
        exists = (stagetools._exists(pwd.getpwnam, system.user)
                  or stagetools._exists(grp.getgrnam, system.group))
        if self.record is None:
            if (exists or self.postgresql_role_exists()) and not self.mirror_existed:
                raise StepFailed(f"an account or PostgreSQL role named {self.name} exists that "
                                 "stagetools.deploy did not make (it has no record in "
                                 f"{stagetools._RECORD_DIR}): choose another name; an "
                                 "account is never taken over")
            self.change(f"record {self.name} in {stagetools._RECORD_DIR}")
            if not self.check_mode:
                stagetools._write_record(self.record_of(None, None))
        if not stagetools._exists(grp.getgrnam, system.group):
            self.change(f"group {system.group}")
            if not self.check_mode:
                run(["groupadd", system.group], "groupadd")
        if not stagetools._exists(pwd.getpwnam, system.user):
            self.change(f"user {system.user}")
            if not self.check_mode:
                run(["useradd", "--gid", system.group, "--no-create-home", "--home-dir",
                     str(system.base_dir), "--shell", "/usr/sbin/nologin", system.user],
                    "useradd")
        if self.check_mode and not stagetools._exists(pwd.getpwnam, system.user):
            return
        self.directories()

    def directories(self):
        """The base dir (0711: nginx passes through to static/ and media/) and media/ (2750,
        nginx's group), by descriptor: never through a link."""
        system = self.system
        user = pwd.getpwnam(system.user)
        base = str(system.base_dir)
        parent = os.path.dirname(base)
        if not os.path.lexists(base):
            self.change(f"base dir {base}")
            if self.check_mode:
                return
            os.makedirs(parent, mode=0o755, exist_ok=True)
            os.mkdir(base, 0o700)
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            what = user_dir(parent_fd, os.path.basename(base), user.pw_uid, user.pw_gid, 0o711,
                            self.check_mode)
        finally:
            os.close(parent_fd)
        if what:
            self.change(f"base dir {what}")
        if self.check_mode and what:
            return
        self.run_dir()
        base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            what = [user_dir(base_fd, "media", user.pw_uid, grp.getgrnam(WEB_GROUP).gr_gid,
                             0o2750, self.check_mode)]
            what += [private_file(base_fd, os.path.basename(path), user.pw_uid,
                                  self.check_mode)
                     for path in (system.secret_key_path, system.database_sqlite_path)]
        finally:
            os.close(base_fd)
        for change in what:
            if change:
                self.change(change)

    def run_dir(self):
        """The socket's directory is root's (systemd makes it so); one that an older version
        gave the user is put right, by descriptor."""
        run_dir = str(self.system.run_dir)
        try:
            info = os.lstat(run_dir)
        except FileNotFoundError:
            return
        if (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (0, 0, 0o755):
            return
        self.change(f"{run_dir}: root's, 755")
        if self.check_mode:
            return
        descriptor = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchown(descriptor, 0, 0)
            os.fchmod(descriptor, 0o755)
        finally:
            os.close(descriptor)

    def postgresql_role_exists(self):
        if self.system.database != "postgresql" or self.system.database_host \
                or not shutil.which("psql"):
            return False
        return psql(f"select 1 from pg_roles where rolname = '{self.name}'") == "1"

    def database(self):
        """PostgreSQL: the installation's role and database (peer authentication, no
        password), which no other role may connect to; on a database host, the client's
        TLS files and root's topology file instead (the database host has the rest)."""
        self.step = "database"
        client_files(self.system, self.params["credentials"], self.check_mode, self.change)
        if self.system.database == "postgresql" and not self.system.database_host:
            role_and_database(self.name, self.check_mode, self.change)

    # -- a new release: built beside the running one, migrated, asked, switched

    def new_code(self):
        """Whether the commit must be built: another one is deployed, or the live release
        is not whole."""
        system = self.system
        whole = (os.path.isfile(system.python_path) and os.access(system.python_path, os.X_OK)
                 and stagetools._file_kind(system.core_repo_dir) == stagetools._DIRECTORY)
        if not whole:
            self.previous_commit = None  # nothing whole serves: nothing to ask or keep
        if self.record and self.record["commit"] == self.commit and whole:
            return False
        self.change(f"deploy {self.params['version']} ({self.commit[:12]})",
                    f"commit: {self.record and self.record['commit']}\n",
                    f"commit: {self.commit}\n", header="code")
        return True

    def build(self):
        """The release in releases/next, built as the user where the running one does not
        see it: the virtualenv, the repo at the commit, its packages, its byte code, its
        static files, the secret key."""
        system, binds = self.system, release_binds(self.system, "next")
        python = str(system.python_path)
        self.step = "release directories"
        as_user(system, ["/usr/bin/python3", "-I", "-c", RELEASE_DIRS_CODE,
                         str(system.base_dir), *RELEASE_PARTS], self.step)
        self.step = "virtualenv"
        as_user(system, ["/usr/bin/python3", "-m", "venv", str(system.venv_dir)], self.step,
                binds)
        self.step = "git checkout"
        upload_pack = "git -c safe.directory=* upload-pack"
        as_user(system, ["git", "clone", "--quiet", "--no-checkout", "--upload-pack",
                         upload_pack, f"file://{self.mirror}", str(system.core_repo_dir)],
                self.step, binds)
        as_user(system, ["git", "-C", str(system.core_repo_dir), "-c",
                         "advice.detachedHead=false", "checkout", "--quiet", "--detach",
                         self.commit], self.step, binds)
        self.step = "pip install"
        as_user(system, [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                         "--no-input", "--editable", str(system.core_repo_dir)], self.step,
                binds, env=valid_pip_env(self.params["pip_env"]))
        self.step = "compileall"  # the service may not write src/: byte code now
        as_user(system, [python, "-m", "compileall", "-q", str(system.src_dir)], self.step, binds)
        self.step = "secret key"
        as_user(system, [python, "-I", "-c", SECRET_KEY_CODE, self.name, system.core_repo],
                self.step, binds, umask="0077")
        if system.framework == "django":
            self.step = "collectstatic"
            as_user(system, [python, str(system.manage_py_path), "collectstatic", "--no-input"],
                    self.step, binds)

    def migrate(self):
        """Bring the database to the new code (Django's migrate, the starters' `python -m
        CORE_APP`) while the running release still serves; back it up first. A failed
        migration is restored, while requests wait."""
        system, binds = self.system, release_binds(self.system, "next")
        python = str(system.python_path)
        if system.framework == "django":
            self.step = "migrate --check"
            try:
                as_user(system, [python, str(system.manage_py_path), "migrate", "--check",
                                 "--no-input"], self.step, binds, umask="0077")
                return
            except StepFailed:
                pass  # unapplied migrations (or a database that is not there yet)
            command = [python, str(system.manage_py_path), "migrate", "--no-input"]
        else:
            command = [python, "-m", system.core_app]
        if self.previous_commit:
            self.step = "backup"
            self.backup = self.back_up()
        self.step = "migrate"
        try:
            as_user(system, command, self.step, binds, umask="0077")
        except StepFailed as error:
            if self.backup and self.params["database_backup"]:
                # Its other app hosts still serve from this database: a restore would break
                # them mid-request, so it is the operator's call (docs: several hosts).
                raise StepFailed(f"{error}\nNothing switched; the database host keeps the "
                                 f"backup {self.backup} taken before (restore it with "
                                 "stagetools.deploy.database if the migration left changes)"
                                 ) from None
            if self.backup:
                self.step = "migrate (restoring the backup)"
                waited = self.restore(self.backup)
                raise StepFailed(f"{error}\nThe database is restored from {self.backup} (requests "
                                 f"waited {waited:.1f} s); rows written since the backup "
                                 f"({self.backup_time}) are lost") from None
            raise
        self.change("migrate" if system.framework == "django" else f"python -m {system.core_app}")

    def back_up(self):
        """A backup of the database into the backups dir, made by the user as its backup
        unit makes one (see module_utils/deploy.py); None for a SQLite database not made
        yet."""
        if self.system.database_host and self.params["database_backup"]:
            return f"{self.system.database_host}:{self.params['database_backup']}"  # the play's
        self.backup_time = datetime.datetime.now(datetime.timezone.utc).strftime(
            "%H:%M:%S UTC")
        backup = back_up(self.system, self.previous_commit[:12])
        if backup:
            self.change(f"backup {backup} in {self.system.backups_dir}")
        return backup

    def restore(self, backup):
        """Restore the backup while requests wait (see module_utils/deploy.py): seconds."""
        return restore(stagetools, self.system, backup)

    def candidate(self):
        """The new release, started as the service would be (its unit's sandbox, one worker)
        on a socket of its own that only root may use, and asked for the health page."""
        self.step = f"candidate: GET {self.params['health_path']}"
        system, unit = self.system, f"{self.name}-candidate"
        socket_path = os.path.join(system.run_dir, "candidate.sock")
        run(["systemctl", "stop", f"{unit}.socket", f"{unit}.service"], "stop", check=False)
        run(["systemctl", "reset-failed", f"{unit}.socket", f"{unit}.service"], "reset",
            check=False)
        properties = [line for line in _service_lines(system) if not line.startswith(
            ("ExecStart=", "Restart=", "ReadOnlyPaths="))]
        properties += [f"BindReadOnlyPaths={source}:{target}"
                       for source, target in release_binds(system, "next")]
        command = stagetools._server_command(system, workers=1)
        # A server that fails is started once more for the request still waiting, and then
        # no more: the socket itself fails, so the wait below ends at once.
        run(["systemd-run", "--quiet", "--collect", f"--unit={unit}",
             f"--socket-property=ListenStream={socket_path}", "--socket-property=SocketMode=0600",
             "--socket-property=TriggerLimitIntervalSec=600s",
             "--socket-property=TriggerLimitBurst=2",
             *[f"--property={line}" for line in properties], "--", *command],
            "start the candidate", cwd="/")
        try:
            # A transient unit that failed is collected at once: a socket no longer active
            # means that the candidate is gone.
            status, why = wait_for_page(
                socket_path, self.params["health_path"], self.local_name, self.scheme,
                CANDIDATE_SECONDS, lambda: failed(f"{unit}.service") or (
                    None if unit_state(f"{unit}.socket")["ActiveState"] == "active"
                    else f"{unit}.socket gave up: the server failed as often as it was started"))
            invocation = unit_state(f"{unit}.service")["InvocationID"]
        finally:
            run(["systemctl", "stop", f"{unit}.socket", f"{unit}.service"], "stop", check=False)
        if status != 200:
            lines = journal(f"{unit}.service", invocation)
            raise StepFailed((f"the new release answered {status}" if status else
                              f"the new release did not answer: {why}")
                             + (f"; its journal:\n{lines}" if lines else ""))

    @property
    def local_name(self):
        return f"{self.system.container}.localhost"

    @property
    def scheme(self):
        return "https" if self.system.is_https else "http"

    def switch(self, into="next", out="previous"):
        """Rename the release ``into`` into place and the running one to ``out``, as the user:
        the running process keeps its own files (its unit mounts them where they were)."""
        self.step = "switch" if into == "next" else "rollback"
        as_user(self.system, ["/usr/bin/python3", "-I", "-c", SWITCH_CODE,
                              str(self.system.base_dir), into, out, *RELEASE_PARTS], self.step)
        self.switched = into == "next"

    # -- what systemd runs

    def units(self, restart):
        """The rendered units in place, stale ones gone, the socket enabled and listening, the
        service restarted on new code or a new unit; True if it started or restarted."""
        self.step = "units"
        system, name = self.system, self.name
        rendered = {path: text for path, text in system.services.items()
                    if path.startswith(UNIT_DIR + "/")}
        self.old_units = {path: read_file(path) for path in self.unit_paths(rendered)}
        changed = [path for path, text in rendered.items() if self.old_units[path] != text]
        stale = [path for path, text in self.old_units.items()
                 if path not in rendered and text is not None]
        stale += [path for path in (former.format(name=name) for former in FORMER_FILES)
                  if os.path.lexists(path)]
        for path in changed:
            self.change(f"file {path}", self.old_units[path], rendered[path], header=path)
        for path in stale:
            self.change(f"remove {path}", read_file(path), "", header=path)
        state = unit_state(f"{name}.socket")
        listening = (state["UnitFileState"], state["ActiveState"]) == ("enabled", "active")
        if not listening:
            self.change(f"{name}.socket enabled and listening (was {state['UnitFileState']}, "
                        f"{state['ActiveState']})")
        lagging = self.lagging(rendered)
        if self.check_mode or not (restart or changed or stale or not listening or lagging):
            return False
        for path in stale:
            if path.startswith(UNIT_DIR):
                run(["systemctl", "disable", "--now", os.path.basename(path)], "disable",
                    check=False)
                run(["systemctl", "reset-failed", os.path.basename(path)], "reset-failed",
                    check=False)  # a job that failed: no trace in systemctl --failed
            remove_file(path)
        for path in changed:
            write_file(path, rendered[path])
        if changed or stale:
            run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
        socket_changed = f"{UNIT_DIR}/{name}.socket" in changed
        run(["systemctl", "enable", "--quiet", "--no-reload", f"{name}.socket"],
            "enable the socket")
        run(["systemctl", "restart" if socket_changed else "start", f"{name}.socket"],
            "start the socket")
        if restart or changed:  # one that stops when idle runs only while its proxy does
            run(["systemctl", "try-restart" if system.idle_stop else "restart",
                 f"{name}.service"], "restart the service")
        if f"{UNIT_DIR}/{name}-proxy.service" in changed:
            run(["systemctl", "try-restart", f"{name}-proxy.service"], "restart the idle proxy")
        self.schedule(rendered, changed, lagging)
        return True

    def unit_paths(self, rendered):
        """The units rendered, those of a fixed name, and every job's, worker's and backup's
        unit of the installation there is: what is not rendered is stale."""
        scheduled = set(stagetools._scheduled_unit_files(self.name))
        return sorted(set(rendered) | scheduled | {f"{UNIT_DIR}/{self.name}{suffix}"
                                                   for suffix in UNIT_SUFFIXES})

    def scheduled_units(self, rendered):
        """The timers (of jobs and the backup) and the workers' services of the rendering:
        the units that are enabled and run."""
        return [os.path.basename(path) for path in sorted(rendered)
                if path.endswith(".timer") or f"{self.name}-worker-" in path]

    def lagging(self, rendered):
        """The timers and workers that are not enabled and active, each a change."""
        lagging = []
        for unit in self.scheduled_units(rendered):
            state = unit_state(unit)
            if (state["UnitFileState"], state["ActiveState"]) != ("enabled", "active"):
                was = f"{state['UnitFileState'] or 'not installed'}, {state['ActiveState']}"
                self.change(f"{unit} enabled and started (was {was})")
                lagging.append(unit)
        return lagging

    def schedule(self, rendered, changed, lagging):
        """Timers and workers enabled and started, those whose files changed restarted: a
        timer takes its new calendar, a worker its new unit (its new code waits for the
        health gate: restart_workers)."""
        if lagging:
            run(["systemctl", "enable", "--now", "--quiet", "--no-reload", *lagging],
                "enable and start the timers and workers")
        again = [unit for unit in self.scheduled_units(rendered)
                 if f"{UNIT_DIR}/{unit}" in changed and unit not in lagging]
        if again:
            run(["systemctl", "restart", *again], "restart the changed timers and workers")

    def restart_workers(self):
        """New code, after the health gate: each worker stopped cleanly, started on it."""
        workers = [worker["service"] for worker in self.system.background_workers.values()]
        if workers:
            self.step = "workers"
            run(["systemctl", "restart", *workers], "restart the workers")
            self.change(f"restart {' '.join(workers)}")

    def health(self):
        """The health gate: the service answers 200 through its socket. If it does not and a
        previous release served, that one is put back."""
        self.step = f"health gate: GET {self.params['health_path']}"
        system = self.system
        status, why = wait_for_page(system.socket_path, self.params["health_path"],
                                    self.local_name, self.scheme, HEALTH_SECONDS,
                                    lambda: failed(f"{self.name}.service"))
        if status == 200:
            return
        lines = journal(f"{self.name}.service",
                        unit_state(f"{self.name}.service")["InvocationID"])
        failure = StepFailed(f"GET {self.params['health_path']} through {system.socket_path} "
                             f"answered {status or why}" + (f"; the journal:\n{lines}"
                                                            if lines else ""))
        if not self.switched:
            raise failure
        self.switch(into="previous", out="next")
        with self.shared:
            for path, text in self.old_units.items():
                if text is not None:
                    write_file(path, text)
            run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
            run(["systemctl", "try-restart" if system.idle_stop else "restart",
                 f"{self.name}.service"], "restart the previous release")
        status, why = wait_for_page(system.socket_path, self.params["health_path"],
                                    self.local_name, self.scheme, HEALTH_SECONDS,
                                    lambda: failed(f"{self.name}.service"))
        self.rolled_back = status == 200
        raise failure

    # -- root's record, the site

    def record_of(self, commit, declaration):
        params = self.params
        return {"name": self.name, "commit": commit, "repo": params["repo"],
                "version": params["version"], "core_repo": self.system.core_repo,
                "declaration": declaration,
                "previous": None if commit is None or self.record is None
                or self.record["commit"] in (None, commit)
                else dict(self.record, previous=None),
                "deployed_at": datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%SZ")}

    def remember(self, declaration):
        """Root's record: what is deployed, and what was before (rollback, audit)."""
        record = self.record or {}
        if (record.get("commit"), record.get("declaration"), record.get("version")) == \
                (self.commit, declaration, self.params["version"]):
            return
        self.change(f"record {self.commit[:12]} as deployed")
        if not self.check_mode:
            stagetools._write_record(self.record_of(self.commit, declaration))

    @property
    def site_path(self):
        return f"/etc/nginx/sites-available/{self.name}.conf"

    def site(self):
        """The site written and enabled (after its certificate), and `nginx -t`; a site that
        nginx refuses is taken back. Reloading nginx is the handler's."""
        self.step = "nginx site"
        system, path = self.system, self.site_path
        link = f"{SITES_ENABLED}/{self.name}.conf"
        text = system.services[path]
        if not system.is_https and os.path.exists(f"{LETSENCRYPT}/renewal/{self.name}.conf"):
            self.change(f"certbot delete --cert-name {self.name}")
            if not self.check_mode:
                run(["certbot", "delete", "--cert-name", self.name, "--non-interactive"],
                    "certbot delete", cwd="/")
        before = read_file(path)
        linked = os.path.islink(link) and os.readlink(link) == path
        if before == text and linked:
            return
        if before != text:
            self.change(f"file {path}", before, text, header=path)
        if not linked:
            self.change(f"site {link}")
        if self.check_mode:
            return
        write_file(path, text)
        if not linked:
            remove_file(link)
            os.symlink(path, link)
        tested = run(["nginx", "-t", "-q"], "nginx -t", check=False)
        if tested.returncode != 0:
            if before is None:
                remove_file(path)
            else:
                write_file(path, before)
            if not linked:
                remove_file(link)
            raise StepFailed("nginx -t refuses the site (taken back): "
                             + (tested.stderr.strip() or tested.stdout.strip())[-1500:])

    def refuse_taken_names(self, text):
        """nginx would serve a name that two sites claim by the first it reads, with a
        warning only: another enabled site's server_name lines (as stagetools writes them)
        may not name this site's names."""
        names = set()
        for line in text.splitlines():
            if line.strip().startswith("server_name "):
                names.update(line.strip()[len("server_name "):].rstrip(";").split())
        taken = []
        for entry in sorted(os.listdir(SITES_ENABLED)) if os.path.isdir(SITES_ENABLED) else []:
            if entry in (f"{self.name}.conf", "stagetools-default.conf"):
                continue
            try:
                with open(os.path.join(SITES_ENABLED, entry), encoding="utf-8") as file:
                    other = file.read()
            except (OSError, UnicodeDecodeError):
                continue
            for line in other.splitlines():
                words = line.strip().rstrip(";").split()
                if words[:1] == ["server_name"]:
                    taken += [f"{SITES_ENABLED}/{entry} serves {name}"
                              for name in words[1:] if name in names]
        if taken:
            raise StepFailed("another nginx site serves its names: "
                             + "; ".join(sorted(set(taken))))

    def certificate(self):
        """certbot certonly by the webroot method, only for a certificate that is missing, due,
        for other names, or from another ACME server."""
        self.step = "certificate"
        system, params = self.system, self.params
        why = self.certificate_due()
        if not why:
            return
        self.change(f"certificate for {' '.join(system.host_names)} ({why})")
        if self.check_mode:
            return
        command = ["certbot", "certonly", "--webroot", "--webroot-path",
                   str(system.acme_challenge_dir), "--cert-name", self.name, "--server",
                   params["acme_server"], "--non-interactive", "--agree-tos",
                   "--keep-until-expiring", "--deploy-hook", "systemctl reload nginx"]
        command += ["--email", params["acme_email"]] if params["acme_email"] else \
            ["--register-unsafely-without-email"]
        command += ["--force-renewal"] if why.startswith("from") else []
        command += [f"--domain={name}" for name in system.host_names]
        run(command, "certbot certonly", cwd="/", timeout=600)

    def certificate_due(self):
        """Why certbot must ask for a certificate, or ''."""
        system = self.system
        renewal = read_file(f"{LETSENCRYPT}/renewal/{self.name}.conf") or ""
        server = [line.split("=", 1)[1].strip() for line in renewal.splitlines()
                  if line.replace(" ", "").startswith("server=")]
        if server and server[0] != self.params["acme_server"]:
            return f"from {server[0]}, not {self.params['acme_server']}"
        pem = os.path.join(system.certificate_dir, "fullchain.pem")
        try:
            with open(pem, encoding="ascii") as file:
                not_after, names = stagetools._certificate_expiry_and_names(file.read())
        except (OSError, ValueError):
            return "missing"
        lacking = set(system.host_names) - set(names)
        if lacking:
            return f"lacks {' '.join(sorted(lacking))}"
        days = (not_after - datetime.datetime.now().timestamp()) / 86400
        return f"expires in {days:.0f} days" if days < CERTIFICATE_RENEW_DAYS else ""


def _service_lines(system):
    """The [Service] lines of the installation's rendered unit, as systemd-run properties."""
    text = system.services[f"{UNIT_DIR}/{system.name}.service"]
    section = text.split("[Service]\n", 1)[1].split("\n[", 1)[0]
    return [line for line in section.splitlines() if "=" in line]


def server_names(system):
    """The names its nginx site answers, for a balancer in front of the host."""
    return [f"{system.container}.localhost", *system.host_names] if system else []


def missing_commits(module):
    """The commits the action plugin gave that the host's mirrors lack, by name."""
    missing = {}
    for name, commit in module.params["commits"].items():
        stagetools.parse_name(name)
        mirror = os.path.join(module.params["mirror_dir"], f"{name}.git")
        if name not in module.params["bundles"] and not (os.path.isdir(mirror) and run(
                ["git", "--git-dir", mirror, "cat-file", "-e", f"{commit}^{{commit}}"],
                "git cat-file", check=False).returncode == 0):
            missing[name] = commit
    return missing


def converge(module, entry, shared):
    """One installation's run: its result, whatever happened."""
    installation = Installation(module, entry, shared)
    path = entry["health_path"]
    result = {"changed": False, "changes": [], "failed": False, "msg": "", "commit": None,
              "backup": None}
    try:
        if not (path.startswith("/") and path.isascii() and path.isprintable()
                and " " not in path):
            raise StepFailed(f"health_path {path!r}: a path of this site, e.g. /")
        installation.converge()
    except (StepFailed, stagetools.StagetoolsError, OSError) as error:
        result.update(failed=True, msg=installation.failure(error))
    result.update(changed=bool(installation.changes), changes=installation.changes,
                  commit=installation.commit, backup=installation.backup,
                  previous=installation.record and installation.record["commit"],
                  server_names=server_names(installation.system))
    return result, installation.diff


def main():
    entry = dict(name=dict(type="str", required=True), repo=dict(type="str", required=True),
                 version=dict(type="str", default="HEAD"), core_repo=dict(type="str"),
                 core_app=dict(type="str"),
                 framework=dict(type="str", choices=["django", "flask", "starlette"]),
                 server=dict(type="str", choices=["gunicorn", "uvicorn", "hypercorn"]),
                 database=dict(type="str", choices=["sqlite", "postgresql"]),
                 host_names=dict(type="list", elements="str"),
                 health_path=dict(type="str", default="/"),
                 database_host=dict(type="str"), balancer_host=dict(type="str"))
    module = AnsibleModule(
        argument_spec=dict(
            installations=dict(type="list", elements="dict", required=True, options=entry),
            pip_env=dict(type="dict", default={}),
            acme_server=dict(type="str", default="https://acme-v02.api.letsencrypt.org/directory"),
            acme_email=dict(type="str", default=""),
            mirror_dir=dict(type="path", default="/var/lib/stagetools-deploy"),
            commits=dict(type="dict", default={}),
            bundles=dict(type="dict", default={}),
            declarations=dict(type="dict", default={}),
            credentials=dict(type="dict", default={}, no_log=True),
            database_backups=dict(type="dict", default={}),
        ),
        supports_check_mode=True,
    )
    names = [entry["name"] for entry in module.params["installations"]]
    if len(set(names)) != len(names):
        module.fail_json(msg=f"an installation is listed twice: {' '.join(sorted(names))}",
                         installations={})
    try:
        missing = missing_commits(module)
    except (StepFailed, stagetools.StagetoolsError) as error:
        module.fail_json(msg=str(error), installations={})
    if set(missing) - set(module.params["declarations"]):  # check mode: send declarations
        module.exit_json(changed=False, needs_commits=missing, installations={})
    shared = threading.Lock()  # accounts, units, certificates, nginx: one at a time
    stagetools._load_rest()  # the part compiled on first use, whole before the threads ask
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        done = list(pool.map(lambda entry: converge(module, entry, shared),
                             module.params["installations"]))
    results = {name: result for name, (result, changes) in zip(names, done)}
    diff = [change for result, changes in done for change in changes]
    failed = [result["msg"] for result in results.values() if result["failed"]]
    outcome = dict(changed=any(result["changed"] for result in results.values()),
                   installations=results, diff=diff)
    if failed:
        module.fail_json(msg="\n".join(failed), **outcome)
    module.exit_json(**outcome)


if __name__ == "__main__":
    main()
