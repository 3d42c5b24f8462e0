# -*- coding: utf-8 -*-
# Copyright: stagetools contributors
# MIT License (see LICENSE)
"""The controller's part of stagetools.deploy.installations: a repo given as a path on the
controller is resolved there, and its code sent to the host as a git bundle only when the
host's mirror lacks the commit. Then the module runs on the host."""

import os
import shutil
import subprocess
import tempfile

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

MODULE = "stagetools.deploy.installations"


class ActionModule(ActionBase):

    TRANSFERS_FILES = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        local = {entry["name"]: entry for entry in args.get("installations") or []
                 if isinstance(entry, dict) and str(entry.get("repo", "")).startswith("/")}
        args["commits"] = {name: _git(entry["repo"], "rev-parse", "--verify", "--quiet",
                                      "--end-of-options",
                                      f"{entry.get('version') or 'HEAD'}^{{commit}}")
                           for name, entry in local.items()}
        answer = self._execute_module(MODULE, module_args=args, task_vars=task_vars)
        missing = answer.get("needs_commits") or {}
        if not missing:
            result.update(answer)
            return result
        if self._task.check_mode:  # nothing is sent: the module reads the declarations here
            args["declarations"] = {name: _declaration(local[name]["repo"], commit)
                                    for name, commit in missing.items()}
            result.update(self._execute_module(MODULE, module_args=args, task_vars=task_vars))
            return result
        directory = tempfile.mkdtemp(prefix="stagetools-bundle-")  # private, new each time
        try:
            remote = self._make_tmp_path()
            sent = {}  # one bundle per repo, whichever installations need it
            for name in missing:
                repo = local[name]["repo"]
                if repo not in sent:
                    bundle = os.path.join(directory, f"{len(sent)}.bundle")
                    _git(repo, "bundle", "create", "--quiet", bundle, "--branches", "--tags")
                    sent[repo] = self._connection._shell.join_path(remote, f"{len(sent)}.bundle")
                    self._transfer_file(bundle, sent[repo])
                    self._fixup_perms2((remote, sent[repo]))
            args["bundles"] = {name: sent[local[name]["repo"]] for name in missing}
            result.update(self._execute_module(MODULE, module_args=args, task_vars=task_vars))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result


def _git(repo, *args):
    """A git command in the controller's repository; its output, or the play fails."""
    try:
        done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                              timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AnsibleActionFail(f"git in {repo} on the controller: {error}") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip()[-500:] or "no such version"
        raise AnsibleActionFail(f"git {args[0]} in {repo} on the controller: {why}")
    return done.stdout.strip()


def _declaration(repo, commit):
    """The commit's stagetools.ini on the controller ('' without one), for check mode."""
    listed = _git(repo, "ls-tree", commit, "--", "stagetools.ini")
    return _git(repo, "show", f"{commit}:stagetools.ini") + "\n" if listed else ""
