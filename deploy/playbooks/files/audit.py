"""Check every stagetools installation deployed on this host; one line each.

Runs on the host as root (Python 3.9+, stdlib only). An installation deployed by the role
`stagetools.deploy.installation` has a mirror in MIRRORS with the commit `check` last held for
(refs/stagetools/deployed) and the options it was deployed with (git config stagetools.*).
Exit status: 0 all hold, 1 some differ, 3 some could not be checked.
"""
import glob
import json
import os
import subprocess
import sys
import time

MIRRORS = sys.argv[1] if len(sys.argv) > 1 else "/var/lib/stagetools-deploy"


def git(mirror, *args):
    return subprocess.run(["git", "--git-dir", mirror] + list(args), capture_output=True,
                          text=True, timeout=30).stdout.strip()


def audit(mirror):
    name = os.path.basename(mirror)[:-len(".git")]
    options = git(mirror, "config", "stagetools.options").split()
    source = git(mirror, "show", "refs/stagetools/deployed:" + git(mirror, "config",
                                                                   "stagetools.path"))
    if not source:
        return 3, "%-24s cannot check: no deployed commit recorded" % name
    started = time.monotonic()
    # The deployed commit's stagetools.py, from root's mirror, isolated from the cwd.
    result = subprocess.run([sys.executable, "-I", "-", "check", name, "--json"] + options,
                            input=source, capture_output=True, text=True, timeout=120, cwd="/")
    ms = (time.monotonic() - started) * 1000
    try:
        report = json.loads(result.stdout)
    except ValueError:
        return 3, "%-24s cannot check: %s" % (name, (result.stderr.strip() or "no answer"))
    if report.get("ok"):
        return 0, "%-24s ok      %3d checks  %5.0f ms" % (name, report["checks"], ms)
    differences = "; ".join(d["what"] for d in report["differences"])
    return 1, "%-24s DIFFERS %3d of %d: %s" % (name, len(report["differences"]),
                                               report["checks"], differences)


def main():
    started = time.monotonic()
    worst = 0
    mirrors = sorted(glob.glob(os.path.join(MIRRORS, "*.git")))
    for mirror in mirrors:
        status, line = audit(mirror)
        worst = max(worst, status)
        print(line, flush=True)
    print("%d installations in %.1f s" % (len(mirrors), time.monotonic() - started))
    return worst


if __name__ == "__main__":
    sys.exit(main())
