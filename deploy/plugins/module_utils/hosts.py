# -*- coding: utf-8 -*-
# Copyright: stagetools contributors
# MIT License (see LICENSE)
"""Beyond one host: an installation's database on a database host, reached by TLS with a
client certificate of the deployment's own CA. What the database host and the app hosts do
with PostgreSQL and with the files the deployment hands an installation (its certificates,
keys and secret key). Only root runs this code."""

import os
import stat

from ansible_collections.stagetools.deploy.plugins.module_utils import stagetools
from ansible_collections.stagetools.deploy.plugins.module_utils.deploy import (
    StepFailed, read_file, run, user_dir, write_file)

# The database host's TLS files, PostgreSQL's alone: its certificate and key, and the CA
# whose certificates it accepts from clients.
SERVER_TLS_DIR = "/etc/postgresql/stagetools"
SERVER_TLS_FILES = {"ssl_ca_file": "root.crt", "ssl_cert_file": "server.crt",
                    "ssl_key_file": "server.key"}
HBA_BEGIN = "# BEGIN stagetools.deploy"
HBA_END = "# END stagetools.deploy"
# Each installation's role to its own database only, by TLS with a certificate of the
# deployment's CA whose name is the role (cert: no password is ever asked or taken); nothing
# else from the network. Lines before these (Debian's: the local socket, 127.0.0.1, ::1)
# stay as they were.
HBA_INSTALLATION = "hostssl {name} {name} all cert\n"
HBA_REST = "host all all all reject\n"
SERVER_CONFIGURATION = """\
# stagetools.deploy: the databases of installations on other hosts, served by TLS only;
# see pg_hba.conf's block of stagetools.deploy for who may connect.
listen_addresses = '*'
ssl = on
ssl_cert_file = '{tls_dir}/server.crt'
ssl_key_file = '{tls_dir}/server.key'
ssl_ca_file = '{tls_dir}/root.crt'
ssl_min_protocol_version = 'TLSv1.2'
"""


def psql(sql, database=None):
    """SQL as PostgreSQL's superuser on this host, by the local socket: its output."""
    return run(["runuser", "-u", "postgres", "--", "psql", "-XqAt", *(
        ["--dbname", database] if database else []), "-c", sql], "psql as postgres",
        cwd="/").stdout.strip()


def role_and_database(name, check_mode, change):
    """The installation's role (no password) and its database, which no other role may
    connect to. ``change(what)`` is told each change."""
    found = psql(
        f"select 'role' from pg_roles where rolname = '{name}' union all "
        f"select 'db' from pg_database where datname = '{name}' union all "
        f"select 'public' from pg_database d, aclexplode(coalesce(d.datacl, "
        f"acldefault('d', d.datdba))) a where d.datname = '{name}' and a.grantee = 0 "
        f"and a.privilege_type in ('CONNECT', 'TEMPORARY')").split()
    for missing, command, what in (
            ("role" not in found, ["createuser", name], f"PostgreSQL role {name}"),
            ("db" not in found, ["createdb", "--owner", name, name], f"database {name}")):
        if missing:
            change(what)
            if not check_mode:
                run(["runuser", "-u", "postgres", "--", *command], command[0], cwd="/")
    if "public" in found or "db" not in found:
        change(f"REVOKE CONNECT, TEMPORARY ON DATABASE {name} FROM PUBLIC")
        if not check_mode:
            psql(f"REVOKE CONNECT, TEMPORARY ON DATABASE {name} FROM PUBLIC")


def cluster():
    """(its systemd unit, configuration dir) of this host's PostgreSQL cluster on port 5432,
    Debian's layout (/etc/postgresql/VERSION/CLUSTER)."""
    listed = run(["pg_lsclusters", "--no-header"], "pg_lsclusters", check=False).stdout
    for line in listed.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "5432":
            return (f"postgresql@{fields[0]}-{fields[1]}.service",
                    f"/etc/postgresql/{fields[0]}/{fields[1]}")
    raise StepFailed("no PostgreSQL cluster on port 5432: apt-get install postgresql")


def hba_text(text, names):
    """pg_hba.conf with the block of stagetools.deploy (at its end) for ``names``."""
    block = "".join([HBA_BEGIN + "\n"] + [HBA_INSTALLATION.format(name=name)
                                          for name in sorted(names)] + [HBA_REST, HBA_END + "\n"])
    return with_block(text, HBA_BEGIN, HBA_END, block)


def owned_file(base_fd, name, text, uid, gid, mode, check_mode):
    """The file ``name`` in the directory open as ``base_fd`` holds ``text``, of
    ``uid``:``gid`` with ``mode``; written by descriptor, never through a link (one is
    replaced). Returns what changed, or ''."""
    try:
        info = os.lstat(name, dir_fd=base_fd)
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISREG(info.st_mode) and \
            (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, gid, mode):
        descriptor = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=base_fd)
        with os.fdopen(descriptor, "rb") as file:
            if file.read().decode("utf-8", "replace") == text:
                return ""
    if check_mode:
        return f"{name}: would be written"
    temporary = f".{name}.stagetools-{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                         dir_fd=base_fd)
    try:
        os.fchown(descriptor, uid, gid)
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, name, src_dir_fd=base_fd, dst_dir_fd=base_fd)
    except BaseException:
        try:
            os.unlink(temporary, dir_fd=base_fd)
        except FileNotFoundError:
            pass
        raise
    return f"{name}: written ({mode:o})"


def owned_files(directory, files, uid, gid, check_mode, directory_mode=0o700):
    """``directory`` (made below its parent, of uid:gid with ``directory_mode``) holding
    ``files``: {name: (text, mode)}. Returns what changed."""
    parent, base = os.path.split(directory)
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        changed = [user_dir(parent_fd, base, uid, gid, directory_mode, check_mode)]
        if check_mode and changed[0]:
            return changed + [f"{name}: would be written" for name in sorted(files)]
        directory_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                               dir_fd=parent_fd)
    finally:
        os.close(parent_fd)
    try:
        changed += [owned_file(directory_fd, name, text, uid, gid, mode, check_mode)
                    for name, (text, mode) in sorted(files.items())]
    finally:
        os.close(directory_fd)
    return [what for what in changed if what]


def server_configuration(tls_dir=SERVER_TLS_DIR):
    return SERVER_CONFIGURATION.format(tls_dir=tls_dir)


def configure_server(names, tls, check_mode, change):
    """This host's PostgreSQL serves ``names`` to the network by TLS with client
    certificates (``tls``: ca_certificate, certificate, key, PEM): its TLS files, a
    configuration file in conf.d, pg_hba.conf's block. Restarted when the configuration
    changes (listen_addresses), reloaded when only pg_hba.conf or a certificate does."""
    import pwd
    postgres = pwd.getpwnam("postgres")
    unit, configuration_dir = cluster()
    files = {SERVER_TLS_FILES["ssl_ca_file"]: (tls["ca_certificate"], 0o644),
             SERVER_TLS_FILES["ssl_cert_file"]: (tls["certificate"], 0o644),
             SERVER_TLS_FILES["ssl_key_file"]: (tls["key"], 0o600)}
    tls_changed = owned_files(SERVER_TLS_DIR, files, postgres.pw_uid, postgres.pw_gid,
                              check_mode, 0o750)
    for what in tls_changed:
        change(f"{SERVER_TLS_DIR}/{what}")
    conf_path = f"{configuration_dir}/conf.d/stagetools.conf"
    hba_path = f"{configuration_dir}/pg_hba.conf"
    conf_before, hba_before = read_file(conf_path), read_file(hba_path) or ""
    conf, hba = server_configuration(), hba_text(hba_before, names)
    restart = conf_before != conf
    reload = hba_before != hba or bool(tls_changed)
    if restart:
        change(f"file {conf_path}", conf_before, conf)
    if hba_before != hba:
        change(f"file {hba_path}", hba_before, hba)
    if check_mode or not (restart or reload):
        return
    if restart:
        os.makedirs(os.path.dirname(conf_path), mode=0o755, exist_ok=True)
        write_file(conf_path, conf)
    if hba_before != hba:
        info = os.stat(hba_path)
        write_file(hba_path, hba, mode=0o640)
        os.chown(hba_path, info.st_uid, info.st_gid)
    run(["systemctl", "restart" if restart else "reload", unit], f"{unit}: restart or reload")
    run(["pg_isready", "--quiet", "--timeout=30"], "pg_isready", timeout=60)


def client_files(system, credentials, check_mode, change):
    """On an app host: the installation's TLS files in its ``database_tls_dir`` (0700, the
    user's; the key 0600), libpq's names, and root's topology file that names its database
    host (stagetools reads it, so the installation's own process knows where its database
    is). With no database host, the topology file goes."""
    import pwd
    if not system.database_host:
        if stagetools._read_topology(system.name)["database_host"]:
            change(f"{system.name}: its database on this host again")
            if not check_mode:
                stagetools._write_topology(system.name, "")
        return
    lacking = sorted({"ca_certificate", "certificate", "key"} - set(credentials or {}))
    if lacking:
        raise StepFailed(f"database host {system.database_host}: the deployment gave no "
                         f"{', '.join(lacking)} for {system.name} (the role makes them)")
    user = pwd.getpwnam(system.user) if not check_mode or stagetools._exists(
        pwd.getpwnam, system.user) else None
    names = stagetools._DATABASE_TLS_FILES
    files = {names["sslrootcert"]: (credentials["ca_certificate"], 0o644),
             names["sslcert"]: (credentials["certificate"], 0o644),
             names["sslkey"]: (credentials["key"], 0o600)}
    files = {name: (text if text.endswith("\n") else text + "\n", mode)
             for name, (text, mode) in files.items()}
    if user is None:
        change(f"{system.database_tls_dir}: would be made")
    else:
        for what in owned_files(str(system.database_tls_dir), files, user.pw_uid, user.pw_gid,
                                check_mode):
            change(f"{system.database_tls_dir}/{what}")
        ssh = {stagetools._MEDIA_SSH_FILES["key"]: (credentials.get("ssh_key", ""), 0o600),
               stagetools._MEDIA_SSH_FILES["known_hosts"]: (credentials.get("known_hosts", ""),
                                                            0o644)}
        if all(text for text, mode in ssh.values()):  # uploads on the database host
            ssh = {name: (text.strip() + "\n", mode) for name, (text, mode) in ssh.items()}
            directory = os.path.join(system.base_dir, stagetools._MEDIA_SSH_DIR)
            for what in owned_files(directory, ssh, user.pw_uid, user.pw_gid, check_mode):
                change(f"{directory}/{what}")
        if credentials.get("secret_key"):  # the same on every app host: made once, handed out
            base_fd = os.open(system.base_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                what = owned_file(base_fd, system.secret_key_path.name,
                                  credentials["secret_key"].strip() + "\n", user.pw_uid,
                                  user.pw_gid, 0o600, check_mode)
            finally:
                os.close(base_fd)
            if what:
                change("the installation's shared secret key (0600)")
    if stagetools._read_topology(system.name)["database_host"] != system.database_host:
        change(f"its database on {system.database_host}")
        if not check_mode:
            stagetools._write_topology(system.name, system.database_host)


# -- uploads on the database host: an account per installation that may only use SFTP,
# chrooted to its home (root's), with media/ its own; nginx serves media/.
SFTP_GROUP = "stagetools-sftp"
SFTP_KEYS_DIR = "/etc/ssh/stagetools-keys"  # root's: an installation cannot add a key
SSHD_CONFIG = "/etc/ssh/sshd_config"
SSHD_BEGIN = "# BEGIN stagetools.deploy"
SSHD_END = "# END stagetools.deploy"
# At the end of sshd_config: a Match block ends only where the file does.
SSHD_BLOCK = f"""{SSHD_BEGIN}
# Installations write their uploads here by SFTP only, each chrooted to its home (root's),
# with the key the deployment made for it (root's file).
Match Group {SFTP_GROUP}
    AuthorizedKeysFile {SFTP_KEYS_DIR}/%u
    ChrootDirectory %h
    ForceCommand internal-sftp -d {stagetools._MEDIA_SFTP_ROOT}
    AllowTcpForwarding no
    AllowAgentForwarding no
    X11Forwarding no
    PermitTTY no
    PasswordAuthentication no
{SSHD_END}
"""


def with_block(text, begin, end, block):
    """``text`` with the block from ``begin`` to ``end`` (lines) replaced by ``block``, or
    ``block`` appended."""
    lines = text.splitlines(keepends=True)
    if begin + "\n" in lines and end + "\n" in lines:
        first, last = lines.index(begin + "\n"), lines.index(end + "\n")
        lines = lines[:first] + lines[last + 1:]
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return "".join(lines) + block


def upload_accounts(keys, check_mode, change):
    """For each installation of ``keys`` (name: its OpenSSH public key): the SFTP account,
    its home (root's, 0755: sshd's chroot), media/ (its own, nginx's group, 2750), its key
    (root's file, restricted), sshd's Match block, and nginx's site for media/. Returns
    whether nginx's sites changed (the caller reloads it)."""
    import grp
    import pwd
    sites = False
    if keys and not stagetools._exists(grp.getgrnam, SFTP_GROUP):
        change(f"group {SFTP_GROUP}")
        if not check_mode:
            run(["groupadd", "--system", SFTP_GROUP], "groupadd")
    for name, key in sorted(keys.items()):
        system = stagetools.get_expected_system_from_name(name, declared={})
        key = key.strip()
        if not (key.startswith("ssh-ed25519 ") and key.isprintable() and len(key) < 1000):
            raise StepFailed(f"{name}: its upload key is not one line of an ed25519 public key")
        if stagetools._exists(pwd.getpwnam, name):
            if name not in grp.getgrnam(SFTP_GROUP).gr_mem:
                raise StepFailed(f"an account named {name} exists that stagetools.deploy did "
                                 f"not make (it is not in {SFTP_GROUP}): an account is never "
                                 "taken over")
        else:
            change(f"SFTP account {name}")
            if not check_mode:
                run(["useradd", "--user-group", "--groups", SFTP_GROUP, "--no-create-home",
                     "--home-dir", str(system.base_dir), "--shell", "/usr/sbin/nologin", name],
                    "useradd")
        if check_mode and not stagetools._exists(pwd.getpwnam, name):
            continue
        user = pwd.getpwnam(name)
        for what in owned_files(str(system.base_dir), {}, 0, 0, check_mode, 0o755):
            change(f"{system.base_dir}: {what}")
        if check_mode and not os.path.isdir(system.base_dir):
            continue
        base_fd = os.open(system.base_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            what = user_dir(base_fd, "media", user.pw_uid, grp.getgrnam("www-data").gr_gid,
                            0o2750, check_mode)
        finally:
            os.close(base_fd)
        if what:
            change(f"{system.base_dir}/{what}")
        for what in owned_files(SFTP_KEYS_DIR, {name: (f"restrict {key}\n", 0o644)}, 0, 0,
                                check_mode, 0o755):
            change(f"{SFTP_KEYS_DIR}/{what}")
        site = f"{stagetools._NGINX_DIR}/{name}-media.conf"
        link = f"/etc/nginx/sites-enabled/{name}-media.conf"
        text, before = stagetools._render_media_site(system), read_file(site)
        if before != text or not os.path.islink(link):
            change(f"file {site}", before, text)
            sites = True
            if not check_mode:
                write_file(site, text)
                if not os.path.islink(link):
                    os.symlink(site, link)
    before = read_file(SSHD_CONFIG) or ""
    after = with_block(before, SSHD_BEGIN, SSHD_END, SSHD_BLOCK if keys else "")
    if before != after:
        change(f"file {SSHD_CONFIG}", before, after)
        if not check_mode:
            write_file(f"{SSHD_CONFIG}.stagetools-new", after)
            tested = run(["sshd", "-t", "-f", f"{SSHD_CONFIG}.stagetools-new"], "sshd -t",
                         check=False)
            if tested.returncode != 0:
                os.unlink(f"{SSHD_CONFIG}.stagetools-new")
                raise StepFailed(f"sshd -t refuses the configuration: {tested.stderr.strip()}")
            os.replace(f"{SSHD_CONFIG}.stagetools-new", SSHD_CONFIG)
            run(["systemctl", "reload", "ssh.service"], "reload sshd")
    return sites


# -- backups on the database host, before a rolling upgrade migrates
BACKUP_DIR = "/var/backups/stagetools"  # PostgreSQL's, 0700; a directory per installation


def back_up(name, commit):
    """A backup of the installation's database on this host, by PostgreSQL's superuser
    (pg_dump's custom format, 0600), before ``commit`` is deployed: its path."""
    import datetime
    now = datetime.datetime.now(datetime.timezone.utc)
    directory = os.path.join(BACKUP_DIR, name)
    path = os.path.join(directory, f"{now:%Y%m%dT%H%M%SZ}-before-{commit[:12]}.pgdump")
    run(["install", "-d", "-m", "0700", "-o", "postgres", "-g", "postgres", BACKUP_DIR,
         directory], "backup directory")
    run(["runuser", "-u", "postgres", "--", "sh", "-c", 'umask 077 && exec pg_dump '
         '--format=custom --file "$1" "$2"', "sh", path, name], "pg_dump", cwd="/")
    return path


def restore(name, path):
    """The installation's database as ``path`` (a backup of back_up) has it: dropped,
    made again for its role, restored as that role (so it owns what it owned)."""
    if not (os.path.dirname(path) == os.path.join(BACKUP_DIR, name) and path.endswith(".pgdump")
            and os.path.isfile(path) and not os.path.islink(path)):
        raise StepFailed(f"restore {name} from {path}: not a backup of {name} in {BACKUP_DIR}")
    run(["runuser", "-u", "postgres", "--", "dropdb", "--force", name], "dropdb", cwd="/")
    run(["runuser", "-u", "postgres", "--", "createdb", "--owner", name, name], "createdb",
        cwd="/")
    psql(f"REVOKE CONNECT, TEMPORARY ON DATABASE {name} FROM PUBLIC")
    run(["runuser", "-u", "postgres", "--", "pg_restore", "--no-owner", "--role", name,
         "--exit-on-error", "--dbname", name, path], "pg_restore", cwd="/")
