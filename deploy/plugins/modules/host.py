#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: stagetools contributors
# MIT License (see LICENSE)

DOCUMENTATION = r"""
module: host
short_description: Prepare a host for stagetools installations
description:
  - Checks that the host has what every installation needs (systemd, git, nginx, OpenSSL,
    Python 3 with venv) and says what to install when it does not, before anything changes.
  - Writes the host's nginx default site, rendered by the collection's own stagetools, which
    answers names no site serves with no page and no certificate and serves ACME challenges;
    disables Debian's C(default) site, which also claims C(default_server); makes the ACME
    challenge directory and the directory of root's records.
  - Writes root's copy of the collection's stagetools.py to
    C(/usr/local/lib/stagetools/stagetools.py). The installations' backup units run it as
    each installation's user; operators run it as root, for C(check --all) and
    C(run NAME JOB).
  - Reloading nginx is the caller's (the role's handler).
version_added: "0.2.0"
author: stagetools contributors (!UNKNOWN)
options: {}
attributes:
  check_mode:
    description: Reports what would change, and changes nothing.
    support: full
  diff_mode:
    description: Shows the files that change (and for the code, the commit) before and after.
    support: full
"""

EXAMPLES = r"""
- name: Prepare the host
  stagetools.deploy.host:
  notify: Reload nginx
"""

RETURN = r"""
changes:
  description: What changed, or would change in check mode, in words.
  returned: always
  type: list
  elements: str
"""

import os
import shutil

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.stagetools.deploy.plugins.module_utils import stagetools
from ansible_collections.stagetools.deploy.plugins.module_utils.deploy import (
    StepFailed, install_root_copy, read_file, remove_file, run, write_file)

# What every installation needs of the host: a command, and the Debian package that has it.
COMMANDS = {"git": "git", "systemd-run": "systemd", "journalctl": "systemd",
            "runuser": "util-linux", "openssl": "openssl", "nginx": "nginx-light"}
DEFAULT_SITE = f"{stagetools._NGINX_DIR}/{stagetools._DEFAULT_SITE}.conf"


def prerequisites():
    """The Debian packages the host lacks, by what every installation needs."""
    lacking = {package for command, package in COMMANDS.items()
               if not shutil.which(command, path="/usr/sbin:/usr/bin:/sbin:/bin")}
    venv = run(["/usr/bin/python3", "-m", "ensurepip", "--version"], "python3 -m ensurepip",
               check=False) if os.path.exists("/usr/bin/python3") else None
    if venv is None or venv.returncode != 0:
        lacking.add("python3-venv")
    return sorted(lacking)


def main():
    module = AnsibleModule(argument_spec={}, supports_check_mode=True)
    lacking = prerequisites()
    if lacking:
        module.fail_json(msg=f"the host lacks what stagetools installations need: apt-get "
                             f"install {' '.join(lacking)}", changes=[])
    text = stagetools._render_default_site()
    changes, diff = [], []
    try:
        before = read_file(DEFAULT_SITE)
        if before != text:
            changes.append(f"file {DEFAULT_SITE}")
            diff.append({"before_header": DEFAULT_SITE, "after_header": DEFAULT_SITE,
                         "before": before or "", "after": text})
            if not module.check_mode:
                write_file(DEFAULT_SITE, text)
        enabled = "/etc/nginx/sites-enabled/stagetools-default.conf"
        if not (os.path.islink(enabled) and os.readlink(enabled) == DEFAULT_SITE):
            changes.append(f"site {enabled}")
            if not module.check_mode:
                remove_file(enabled)
                os.symlink(DEFAULT_SITE, enabled)
        if os.path.lexists("/etc/nginx/sites-enabled/default"):
            changes.append("Debian's default site disabled (it claims default_server too)")
            if not module.check_mode:
                remove_file("/etc/nginx/sites-enabled/default")
        copied = install_root_copy(stagetools, module.check_mode)
        if copied:
            changes.append(copied)
        for directory in (stagetools._ACME_CHALLENGE_DIR, stagetools._RECORD_DIR):
            if not os.path.isdir(directory):
                changes.append(f"directory {directory}")
                if not module.check_mode:
                    os.makedirs(directory, mode=0o755)
    except (OSError, StepFailed) as error:
        module.fail_json(msg=f"preparing the host: {error}", changes=changes)
    module.exit_json(changed=bool(changes), changes=changes, diff=diff)


if __name__ == "__main__":
    main()
