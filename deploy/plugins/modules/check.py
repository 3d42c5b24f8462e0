#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: stagetools contributors
# MIT License (see LICENSE)

DOCUMENTATION = r"""
module: check
short_description: Check stagetools installations against their expected systems
description:
  - Runs stagetools' C(check) for the named installations, or for every installation of the
    host, with the collection's own copy of stagetools. A deployed installation is checked as
    root's record of its deployment says (its commit's declaration), never as files its user
    could change say.
  - With I(through_nginx), also asks each installation's page through nginx, as a visitor
    would (HTTPS by its first host name, else HTTP by C(NAME-with-dashes.localhost)).
  - Changes nothing. Fails when an installation differs or could not be checked; the reports
    name each difference.
version_added: "0.2.0"
author: stagetools contributors (!UNKNOWN)
options:
  names:
    description: The installations to check.
    type: list
    elements: str
    default: []
  all:
    description: Check every installation of the host instead (root's records, and users
      whose home is a virtualenv named like them).
    type: bool
    default: false
  through_nginx:
    description: Also ask I(health_path) of each installation through nginx.
    type: bool
    default: false
  health_path:
    description: The page asked through nginx; it must answer 200.
    type: str
    default: /
attributes:
  check_mode:
    description: It changes nothing in any mode.
    support: full
  diff_mode:
    description: Nothing changes, nothing to show.
    support: none
"""

EXAMPLES = r"""
- name: Audit every installation of the host
  stagetools.deploy.check:
    all: true
"""

RETURN = r"""
ok:
  description: Whether every installation holds.
  returned: always
  type: bool
lines:
  description: One line per installation, as C(stagetools check --all) prints them.
  returned: always
  type: list
  elements: str
schedule:
  description: One line per job, backup and worker of the installations checked, as systemd
    runs them (calendar, last run and result, next run; a worker's state).
  returned: always
  type: list
  elements: str
installations:
  description: The report of C(stagetools check NAME --json) for each installation.
  returned: always
  type: list
  elements: dict
"""

import http.client
import socket
import ssl
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.stagetools.deploy.plugins.module_utils import stagetools

NGINX_SECONDS = 15  # a reload returns before nginx serves the new configuration


def through_nginx(system, page):
    """The status of ``page`` through nginx on this host, or why there is none, within
    NGINX_SECONDS."""
    deadline = time.monotonic() + NGINX_SECONDS
    while True:
        try:
            if system.is_https:  # by its first name (SNI); the certificate is check's job
                name = system.host_names[0]
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                connection = http.client.HTTPSConnection(name, 443, timeout=10, context=context)
                connection.sock = context.wrap_socket(
                    socket.create_connection(("127.0.0.1", 443), 10), server_hostname=name)
            else:
                name = f"{system.container}.localhost"
                connection = http.client.HTTPConnection("127.0.0.1", 80, timeout=10)
            connection.request("GET", page, headers={"Host": name})
            status = connection.getresponse().status
            connection.close()
        except (OSError, http.client.HTTPException) as error:
            status = f"no answer ({error})"
        if status == 200 or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def main():
    module = AnsibleModule(
        argument_spec=dict(names=dict(type="list", elements="str", default=[]),
                           all=dict(type="bool", default=False),
                           through_nginx=dict(type="bool", default=False),
                           health_path=dict(type="str", default="/")),
        mutually_exclusive=[("names", "all")],
        supports_check_mode=True,
    )
    params = module.params
    try:
        installations = stagetools._installations_on_this_host() if params["all"] else {
            name: None if stagetools._read_record(name) else f"/home/{name}"
            for name in params["names"]}
    except stagetools.StagetoolsError as error:
        module.fail_json(msg=str(error), ok=False, lines=[], installations=[], schedule=[])
    reports = stagetools._check_reports(installations)
    if params["through_nginx"]:
        for report in reports:
            if report["could_not_check"]:
                continue
            system = stagetools._expected_on_this_host(report["name"],
                                                       installations[report["name"]])
            status = through_nginx(system, params["health_path"])
            report["checks"] += 1
            if status != 200:
                report["ok"] = False
                report["differences"].append({"what": f"GET {params['health_path']} through "
                                                      "nginx", "expected": 200, "actual": status})
    lines = stagetools._summary_lines(reports)
    ok = all(report["ok"] for report in reports)
    schedule = [line for report in reports if report["checks"] for line in
                stagetools._schedule_lines(stagetools._expected_on_this_host(
                    report["name"], installations[report["name"]]))]
    result = dict(changed=False, ok=ok, lines=lines, installations=reports, schedule=schedule)
    if not ok:
        module.fail_json(msg="these installations differ or could not be checked: "
                         + "; ".join(line for line, report in zip(lines, reports)
                                     if not report["ok"]), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
