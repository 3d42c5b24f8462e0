#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: stagetools contributors
# MIT License (see LICENSE)

DOCUMENTATION = r"""
module: restore
short_description: Restore a backup of a stagetools installation while its requests wait
description:
  - Restores one of the installation's backups into it, as root's record of its deployment
    says the installation is. The database is restored (PostgreSQL's dropped and made again,
    then C(pg_restore); SQLite's file by SQLite's online backup), and C(media/) if the backup
    holds it. The files are restored by the installation's user with root's copy of
    stagetools.
  - While the backup is restored the service, its workers and its jobs are stopped, and
    requests that come meanwhile wait in the socket (systemd holds it); they are answered
    when the service starts again, after the restore. The workers start again then.
  - The backups are those in the installation's backups dir (C(<base_dir>/backups)), named
    C(STAMP-LABEL), made by its backup timer, by C(stagetools run NAME backup), or before a
    migration.
version_added: "0.3.0"
author: stagetools contributors (!UNKNOWN)
options:
  name:
    description: The installation's name, e.g. C(shop_prod); it must be deployed on the host.
    type: str
    required: true
  backup:
    description: The backup to restore, by its name (C(20261201T030012Z-scheduled)), or
      C(latest).
    type: str
    default: latest
attributes:
  check_mode:
    description: Says which backup it would restore, and changes nothing.
    support: full
  diff_mode:
    description: A restore has no diff to show.
    support: none
requirements:
  - systemd and root's copy of stagetools (the host module writes it); PostgreSQL's
    client programs for an installation on PostgreSQL.
"""

EXAMPLES = r"""
- name: Restore the latest backup of shop_prod
  stagetools.deploy.restore:
    name: shop_prod

- name: Restore a backup by name
  stagetools.deploy.restore:
    name: shop_prod
    backup: 20261201T030012Z-scheduled
"""

RETURN = r"""
backup:
  description: The backup restored (or that would be, in check mode).
  returned: success
  type: str
seconds:
  description: How long requests waited while it was restored, in seconds.
  returned: success
  type: float
backups:
  description: The installation's backups, newest first.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.stagetools.deploy.plugins.module_utils import stagetools
from ansible_collections.stagetools.deploy.plugins.module_utils.deploy import (
    StepFailed, backups, restore)


def chosen(system, wanted):
    """(the backup to restore, every backup of the installation)."""
    found = backups(stagetools, system)
    backup = found[0] if wanted == "latest" and found else wanted
    if backup not in found:
        raise StepFailed(f"there is no backup {backup!r} in {system.backups_dir}; there are "
                         f"{', '.join(found[:5]) or 'none'}")
    return backup, found


def main():
    module = AnsibleModule(argument_spec=dict(name=dict(type="str", required=True),
                                              backup=dict(type="str", default="latest")),
                           supports_check_mode=True)
    name, found = module.params["name"], []
    try:
        record = stagetools._read_record(name)
        if record is None or record["commit"] is None:
            raise StepFailed(f"it is not deployed on this host (no record in "
                             f"{stagetools._RECORD_DIR})")
        system = stagetools._expected_from_record(record)
        backup, found = chosen(system, module.params["backup"])
        seconds = 0.0 if module.check_mode else restore(stagetools, system, backup)
    except (StepFailed, stagetools.StagetoolsError, OSError) as error:
        module.fail_json(msg=f"{name}: restoring failed: {error}", backups=found)
    module.exit_json(changed=True, backup=backup, seconds=round(seconds, 2), backups=found,
                     msg=f"{name}: {backup} restored; requests waited {seconds:.1f} s")


if __name__ == "__main__":
    main()
