#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: stagetools contributors
# MIT License (see LICENSE)

DOCUMENTATION = r"""
module: database
short_description: Serve the databases of installations whose app hosts are other hosts
description:
  - On a database host, the PostgreSQL role (no password) and database of each installation
    of I(names), which no other role may connect to, served to the network by TLS only.
  - Writes the server's certificate, key and the deployment's CA into
    C(/etc/postgresql/stagetools) (PostgreSQL's; the key 0600), a configuration file in the
    cluster's C(conf.d) (C(listen_addresses), C(ssl) and those files), and a block at the end
    of C(pg_hba.conf) in which each installation's role may reach its own database only, by
    C(hostssl ... cert) (a client certificate of the CA whose name is the role; no password
    is asked or taken) and everything else from the network is rejected.
  - PostgreSQL is restarted when its configuration changes, reloaded when only C(pg_hba.conf)
    or a certificate does.
version_added: "0.4.0"
author: stagetools contributors (!UNKNOWN)
options:
  names:
    description: The installations whose databases this host serves, e.g. C([shop_prod]).
    type: list
    elements: str
    required: true
  ca_certificate:
    description: The deployment's CA certificate (PEM), which signs the clients'
      certificates. Without it (and I(certificate), I(key)), PostgreSQL's configuration is
      left as it is (a run that only backs up or restores).
    type: str
  certificate:
    description: This host's certificate (PEM) for its name, signed by the CA.
    type: str
  key:
    description: The key of I(certificate) (PEM).
    type: str
  upload_keys:
    description:
      - By installation name, the OpenSSH public key (ed25519) by which its app hosts write
        its uploads here. Each gets an account that may only use SFTP, chrooted to its home
        (root's) with C(media/) its own and nginx's group's; the key is root's file in
        C(/etc/ssh/stagetools-keys); a Match block at the end of C(sshd_config) says so.
      - nginx serves each one's C(media/) by C(NAME-with-dashes.localhost), the name the
        balancer asks by; reloading nginx is the caller's (I(reload_nginx)).
    type: dict
    default: {}
  back_up:
    description:
      - By installation name, the commit about to be deployed; each database is backed up
        into C(/var/backups/stagetools/NAME/) (PostgreSQL's, 0700) before its app hosts
        migrate it (the rolling upgrade's first step). The paths are returned in
        I(backups).
    type: dict
    default: {}
  restore:
    description: By installation name, a backup of I(back_up) to put back (the database
      dropped and restored as its role). It is the operator's call after a migration that
      failed and left changes, since the other app hosts still serve from it.
    type: dict
    default: {}
attributes:
  check_mode:
    description: Reports what would change, and changes nothing.
    support: full
  diff_mode:
    description: Shows the configuration files that change, before and after.
    support: full
requirements:
  - PostgreSQL (Debian's C(postgresql)) on the host.
"""

EXAMPLES = r"""
- name: Serve shop_prod's database to its app hosts
  stagetools.deploy.database:
    names: [shop_prod]
    ca_certificate: "{{ lookup('file', 'stagetools-ca/ca.crt') }}"
    certificate: "{{ lookup('file', 'stagetools-ca/servers/db1.example.com.crt') }}"
    key: "{{ lookup('file', 'stagetools-ca/servers/db1.example.com.key') }}"
"""

RETURN = r"""
backups:
  description: By installation name, the backup taken (I(back_up)).
  returned: always
  type: dict
reload_nginx:
  description: Whether an nginx site changed (the caller reloads nginx).
  returned: always
  type: bool
changes:
  description: What changed, or would change in check mode, in words.
  returned: always
  type: list
  elements: str
"""

import shutil

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.stagetools.deploy.plugins.module_utils import stagetools
from ansible_collections.stagetools.deploy.plugins.module_utils.deploy import StepFailed
from ansible_collections.stagetools.deploy.plugins.module_utils.hosts import (
    back_up, configure_server, restore, role_and_database, upload_accounts)


def main():
    module = AnsibleModule(
        argument_spec=dict(names=dict(type="list", elements="str", required=True),
                           ca_certificate=dict(type="str"), certificate=dict(type="str"),
                           key=dict(type="str", no_log=True),
                           upload_keys=dict(type="dict", default={}, no_log=False),
                           back_up=dict(type="dict", default={}),
                           restore=dict(type="dict", default={})),
        required_together=[("ca_certificate", "certificate", "key")],
        supports_check_mode=True)
    params = module.params
    changes, diff, sites, backups = [], [], False, {}

    def change(what, before=None, after=None):
        changes.append(what)
        if after is not None:
            diff.append({"before_header": what, "after_header": what, "before": before or "",
                         "after": after})

    try:
        for name in params["names"]:
            stagetools.parse_name(name)  # a name, before it is written into pg_hba.conf
        if not shutil.which("pg_lsclusters"):
            raise StepFailed("the host lacks PostgreSQL: apt-get install postgresql")
        if params["key"]:
            tls = {key: params[key] for key in ("ca_certificate", "certificate", "key")}
            tls = {key: value if value.endswith("\n") else value + "\n"
                   for key, value in tls.items()}
            configure_server(params["names"], tls, module.check_mode, change)
            for name in params["names"]:
                role_and_database(name, module.check_mode, change)
            unknown = sorted(set(params["upload_keys"]) - set(params["names"]))
            if unknown:
                raise StepFailed(f"upload keys of {', '.join(unknown)}, whose databases are "
                                 "not here: uploads are kept on the database host")
            sites = upload_accounts(params["upload_keys"], module.check_mode, change)
        for name, commit in sorted({**params["back_up"], **params["restore"]}.items()):
            if name not in params["names"]:
                raise StepFailed(f"{name}: its database is not on this host")
        for name, commit in sorted(params["back_up"].items()):
            if not module.check_mode:
                backups[name] = back_up(name, str(commit))
            change(f"backup of {name} before deploying {str(commit)[:12]}")
        for name, path in sorted(params["restore"].items()):
            change(f"{name} restored from {path}")
            if not module.check_mode:
                restore(name, path)
    except (StepFailed, stagetools.StagetoolsError, OSError) as error:
        module.fail_json(msg=f"database host: {error}", changes=changes, reload_nginx=sites,
                         backups=backups)
    module.exit_json(changed=bool(changes), changes=changes, diff=diff, reload_nginx=sites,
                     backups=backups)


if __name__ == "__main__":
    main()
