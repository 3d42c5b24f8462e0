# -*- coding: utf-8 -*-
# Copyright: stagetools contributors
# MIT License (see LICENSE)
"""The filter stagetools.deploy.placements: where the inventory places each installation."""

from ansible.errors import AnsibleFilterError


def placements(hostvars, hosts):
    """By installation name, from the ``installation_list`` of each of ``hosts``:
    ``{"app_hosts": [...], "database_host": str or None, "balancer_host": str or None}``.
    The keys must agree wherever an installation is listed."""
    found = {}
    for host in hosts:
        for entry in hostvars[host].get("installation_list") or []:
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str):
                raise AnsibleFilterError(f"installation_list of {host}: an entry without a name")
            keys = {key: entry.get(key) or None for key in ("database_host", "balancer_host")}
            place = found.setdefault(name, dict(keys, app_hosts=[]))
            for key, value in keys.items():
                if place[key] != value:
                    raise AnsibleFilterError(
                        f"{name}: {key} is {place[key] or 'none'} on {place['app_hosts'][0]} "
                        f"but {value or 'none'} on {host}; give every app host of an "
                        "installation the same entry (group_vars of its group)")
            place["app_hosts"].append(host)
    for name, place in found.items():
        for key in ("database_host", "balancer_host"):
            if place[key] and place[key] not in hostvars:
                raise AnsibleFilterError(f"{name}: its {key} {place[key]} is no host of the "
                                         "inventory; add it, the deployment configures it")
    return found


class FilterModule:
    def filters(self):
        return {"placements": placements}
