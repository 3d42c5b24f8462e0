"""Jobs, workers and backups on a test host that boots systemd, deployed by the collection.

One host, two installations of the `jobs` repo (the Django starter with a job that stamps
what it sees, a job that fails on purpose on a branch, a worker that beats): jobs_prod on
PostgreSQL and jobs_qual on SQLite, both backed up. Needs what test_deploy.py needs; in CI
(STAGETOOLS_CI=1) a missing tool is a failure.

    STAGETOOLS_CI=1 .venv-deploy/bin/python -m pytest tests/deploy/test_jobs.py
"""
import json
import os
import re
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_deploy  # noqa: E402  (skips, or fails in CI, without the tools)
import testhosts  # noqa: E402
from test_deploy import Load, commit_on_branch, git, playbook, timed  # noqa: E402

TIMES = test_deploy.TIMES  # printed at the end of the session (conftest.py)
NAMES = ("jobs_prod", "jobs_qual")
ROOT_COPY = "/usr/local/lib/stagetools/stagetools.py"  # written by the host module
DECLARATION = """\
[stagetools]
framework = django
server = gunicorn
database = sqlite
job clearsessions = manage clearsessions @ daily
job stamp = module jobs.stamp --from-job @ *:*:0/20
worker tasks = module jobs.worker
backup = keep 3 @ daily
[prod]
database = postgresql
"""
# What the stamp job writes, a JSON line per run, from inside its sandbox.
STAMP = '''\
import json, os, sys, time

from aaa_env_setup import SYSTEM
from django.apps import apps


def can_write(path):
    try:
        with open(path, "w") as file:
            file.write("x")
        os.unlink(path)
        return True
    except OSError:
        return False


line = {"time": time.time(), "uid": os.getuid(), "argv": sys.argv[1:],
        "script_setup_first": "aaa_script_setup" in sys.modules, "django_ready": apps.ready,
        "etc_writable": can_write("/etc/stagetools-job-test"),
        "src_writable": can_write(os.path.join(os.path.dirname(__file__), "job-test")),
        "other_home_visible": os.path.exists("/home/jobs_qual" if SYSTEM.name == "jobs_prod"
                                             else "/home/jobs_prod")}
with open(SYSTEM.base_dir / "job-stamps.jsonl", "a") as file:
    file.write(json.dumps(line) + "\\n")
'''
WORKER = '''\
import os, signal, sys, time

from aaa_env_setup import SYSTEM

VERSION = "main"
LOG = SYSTEM.base_dir / "worker.log"


def stop(signum, frame):
    with open(LOG, "a") as file:
        file.write(f"{os.getpid()} {VERSION} stopped by signal {signum}\\n")
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
with open(LOG, "a") as file:
    file.write(f"{os.getpid()} {VERSION} started\\n")
while True:
    (SYSTEM.base_dir / "worker-heartbeat").write_text(f"{os.getpid()} {VERSION} {time.time()}")
    time.sleep(1)
'''
BROKEN = 'raise SystemExit("this job fails on purpose")\n'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One booted host, the collection installed, the jobs repo with its branches."""
    workdir = str(tmp_path_factory.mktemp("jobs"))
    with timed("jobs: image and boot of one host"):
        testhosts.build_image()
        hosts = testhosts.TestHosts(os.path.join(workdir, "hosts"),
                                    wheelhouse=test_deploy.cached_wheelhouse())
        hosts.__enter__()
    try:
        host, = hosts.boot(1)
        separate_uids(host)
        repo = jobs_repo(workdir)
        branches = {"broken": commit_on_branch(repo, "broken", "main", {
            "stagetools.ini": DECLARATION.replace(
                "worker tasks", "job broken = module jobs.broken @ daily\nworker tasks"),
            "jobs/broken.py": BROKEN,
            "jobs/worker.py": WORKER.replace('VERSION = "main"', 'VERSION = "broken"')},
            "A job that fails, and a worker of another version")}
        yield dict(host=host, repo=repo, branches=branches, workdir=workdir,
                   collections=test_deploy.install_collection(workdir),
                   inventory=hosts.inventory(os.path.join(workdir, "inventory.ini")))
    finally:
        hosts.__exit__(*sys.exc_info())


def separate_uids(host):
    """The host shares the machine's kernel without a user namespace: a uid there is the same
    uid here, and a test on the machine that kills its own user's processes (pkill -u) kills
    an installation's of the same uid on the host. Accounts made on the host get uids no
    machine account has (useradd and groupadd follow login.defs)."""
    host.run("sed -i -e 's/^UID_MIN.*/UID_MIN 47000/' -e 's/^GID_MIN.*/GID_MIN 47000/' "
             "/etc/login.defs && grep -q '^UID_MIN 47000' /etc/login.defs")


def jobs_repo(workdir):
    """The Django starter as the jobs repo: its declaration, the stamp job, the worker."""
    test_deploy.DECLARATIONS["jobs"] = DECLARATION
    repo = test_deploy.make_repo(workdir, "jobs_dev", "django")
    for path, text in (("jobs/stamp.py", STAMP), ("jobs/worker.py", WORKER)):
        with open(os.path.join(repo, path), "w") as file:
            file.write(text)
    with open(os.path.join(repo, "setup.py")) as file:
        setup = file.read()
    with open(os.path.join(repo, "setup.py"), "w") as file:  # jobs_prod runs on PostgreSQL
        file.write(setup.replace('"hypercorn"]', '"hypercorn", "psycopg[binary]"]'))
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "the stamp job and the worker")
    return repo


def deploy(setup, version="main", *args, name="deploy"):
    host_vars = os.path.join(setup["workdir"], "host_vars")
    os.makedirs(host_vars, exist_ok=True)
    with open(os.path.join(host_vars, setup["host"].name + ".json"), "w") as file:
        json.dump({"installation_list": [{"name": name_, "repo": setup["repo"],
                                          "version": version} for name_ in NAMES],
                   "installation_pip_env": test_deploy.PIP_ENV}, file)
    return playbook(setup["workdir"], setup["collections"], setup["inventory"], *args,
                    name=name, timeout=1800)


@pytest.fixture(scope="module")
def deployed(setup):
    with timed("jobs: first deploy of two installations"):
        rc, output, recap = deploy(setup)
    assert rc == 0, output[-6000:]
    return setup


def on_host(setup, command, timeout=120, check=True):
    return setup["host"].run(command, timeout=timeout, check=check)


def check(setup, name):
    """(exit code, report) of check NAME as root with root's copy of stagetools."""
    result = on_host(setup, f"/usr/bin/python3 -I {ROOT_COPY} check {name} --json", check=False)
    return result.returncode, result.stdout + result.stderr


def differences(output):
    return [difference["what"] for difference in json.loads(output)["differences"]]


def wait_for(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"{what}: not within {seconds} s")


def test_first_deploy_enables_the_timers_and_starts_the_workers(deployed):
    timers = on_host(deployed, "systemctl list-timers --all --no-legend 'jobs_*'").stdout
    for name in NAMES:
        for timer in ("job-clearsessions", "job-stamp", "backup"):
            assert f"{name}-{timer}.timer" in timers, timers
        assert on_host(deployed, f"systemctl is-active {name}-worker-tasks.service").stdout \
            .strip() == "active"
        returncode, output = check(deployed, name)
        assert returncode == 0, output


def test_show_expected_lists_jobs_workers_and_their_units(deployed):
    shown = json.loads(on_host(deployed, f"/usr/bin/python3 -I {ROOT_COPY} show jobs_prod "
                                         "--expected --json").stdout)
    assert shown["jobs"]["stamp"] == {
        "command": "module jobs.stamp --from-job", "calendar": "*:*:0/20",
        "service": "jobs_prod-job-stamp.service", "timer": "jobs_prod-job-stamp.timer"}
    assert shown["background_workers"] == {"tasks": {
        "command": "module jobs.worker", "service": "jobs_prod-worker-tasks.service"}}
    assert shown["backup"]["keep_count"] == 3
    for unit in ("job-stamp.service", "job-stamp.timer", "worker-tasks.service",
                 "backup.service", "backup.timer"):
        path = f"/etc/systemd/system/jobs_prod-{unit}"
        assert on_host(deployed, f"cat {path}").stdout == shown["services"][path]


def test_second_deploy_changes_nothing(deployed):
    rc, output, recap = deploy(deployed)
    assert rc == 0, output[-6000:]
    assert recap[deployed["host"].name]["changed"] == 0, re.findall(r"^changed: .*$", output,
                                                                    re.M)


def stamps(setup, name):
    text = on_host(setup, f"cat /home/{name}/job-stamps.jsonl", check=False).stdout
    return [json.loads(line) for line in text.splitlines()]


def test_a_job_fires_from_its_timer_as_its_user_in_the_sandbox(deployed):
    """The stamp job (every 20 s, a fixed random delay of up to 30 s) runs from its timer:
    as the installation's user, aaa_script_setup and Django set up first, unable to write
    /etc or its code, blind to the other installation's home."""
    lines = wait_for(lambda: stamps(deployed, "jobs_prod"), 120, "a stamp from the timer")
    trigger = on_host(deployed, "systemctl show -P LastTriggerUSec jobs_prod-job-stamp.timer")
    assert trigger.stdout.strip() not in ("", "n/a"), trigger.stdout  # the timer started it
    timer_started = int(on_host(deployed, "systemctl show -P ActiveEnterTimestampMonotonic "
                                          "jobs_prod-job-stamp.timer").stdout)
    uptime = float(on_host(deployed, "cut -d' ' -f1 /proc/uptime").stdout)
    TIMES["jobs: first run after its timer started (s)"] = (
        lines[0]["time"] - (time.time() - uptime + timer_started / 1e6))
    uid = int(on_host(deployed, "id -u jobs_prod").stdout)
    assert lines[0] == dict(lines[0], uid=uid, argv=["--from-job"], script_setup_first=True,
                            django_ready=True, etc_writable=False, src_writable=False,
                            other_home_visible=False), lines[0]
    # No worse a sandbox than the web process's, as systemd rates it.
    exposure = {}
    for unit in ("jobs_prod.service", "jobs_prod-job-stamp.service",
                 "jobs_prod-worker-tasks.service", "jobs_prod-backup.service"):
        rated = on_host(deployed, f"systemd-analyze security {unit} | tail -1").stdout
        exposure[unit] = float(re.search(r"exposure level for \S+: (\d+\.\d+)", rated).group(1))
    TIMES["jobs: exposure web / job / worker / backup"] = " / ".join(map(str, exposure.values()))
    assert max(exposure.values()) <= exposure["jobs_prod.service"], exposure


def test_run_now_runs_a_job_as_its_timer_would(deployed):
    result = on_host(deployed, f"/usr/bin/python3 -I {ROOT_COPY} run jobs_qual clearsessions")
    assert re.match(r"jobs_qual job clearsessions: succeeded in [\d.]+ s "
                    r"\(jobs_qual-job-clearsessions.service\)$", result.stdout.strip()), \
        result.stdout
    refused = on_host(deployed, f"/usr/bin/python3 -I {ROOT_COPY} run jobs_qual nosuch",
                      check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "jobs_qual job nosuch: it is not declared; run one of: job clearsessions, job " \
        "stamp, backup" in refused.stderr
    # An installation not deployed here: systemd shows its unknown unit as a success.
    unknown = on_host(deployed, f"/usr/bin/python3 -I {ROOT_COPY} run nosuch_prod backup",
                      check=False)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert "systemd does not know nosuch_prod-backup.service" in unknown.stderr


def test_a_worker_killed_comes_back(deployed):
    unit = "jobs_prod-worker-tasks.service"
    before = int(on_host(deployed, f"systemctl show -P MainPID {unit}").stdout)
    on_host(deployed, f"kill -9 {before}")
    started = time.monotonic()
    after = wait_for(lambda: int(on_host(deployed, f"systemctl show -P MainPID {unit}").stdout)
                     not in (0, before) and on_host(deployed, f"systemctl is-active {unit}",
                                                    check=False).stdout.strip() == "active",
                     30, "the worker back")
    TIMES["jobs: worker back after kill -9 (s)"] = time.monotonic() - started
    assert after
    beat = wait_for(lambda: on_host(deployed, "cat /home/jobs_prod/worker-heartbeat",
                                    check=False).stdout.split()[:1] not in ([], [str(before)]),
                    30, "a heartbeat of the new worker")
    assert beat


def test_a_failing_job_makes_check_and_the_audit_fail_naming_it(deployed):
    """The broken branch declares a job that fails (and a worker of its own version): run
    now, it fails; check exits 1 naming it; the audit shows one line naming it."""
    rc, output, recap = deploy(deployed, "broken")
    assert rc == 0, output[-6000:]
    log = on_host(deployed, "cat /home/jobs_prod/worker.log").stdout.splitlines()
    assert re.match(r"\d+ main stopped by signal 15$", log[-2]) and \
        re.match(r"\d+ broken started$", log[-1]), log  # stopped cleanly, started on new code
    failed = on_host(deployed, f"/usr/bin/python3 -I {ROOT_COPY} run jobs_prod broken",
                     check=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "this job fails on purpose" in failed.stdout
    assert "jobs_prod job broken: failed (exit-code, exit status 1)" in failed.stdout
    returncode, output = check(deployed, "jobs_prod")
    assert returncode == 1 and differences(output) == ["job broken"], output
    rc, output, recap = playbook(deployed["workdir"], deployed["collections"],
                                 deployed["inventory"], name="audit")
    assert rc != 0
    line = re.search(r'"(jobs_prod\s+1 of \d+ checks differ: job broken)"', output)
    assert line, output[-3000:]
    TIMES["jobs: the audit line of a failed job"] = line.group(1)
    assert re.search(r'"jobs_prod job broken: daily, last never, next \w{3} \d{4}-', output) \
        or "jobs_prod job broken: daily" in output, output[-3000:]


def test_removing_a_job_removes_its_units(deployed):
    rc, output, recap = deploy(deployed, "main")
    assert rc == 0, output[-6000:]
    gone = on_host(deployed, "ls /etc/systemd/system/jobs_prod-job-broken.service "
                             "/etc/systemd/system/jobs_prod-job-broken.timer", check=False)
    assert gone.returncode != 0
    assert "jobs_prod-job-broken" not in on_host(deployed, "systemctl --failed --no-legend; "
                                                           "systemctl list-timers --all").stdout
    for name in NAMES:
        returncode, output = check(deployed, name)
        assert returncode == 0, output


def snapshot(setup, name):
    """(rows, a hash of their content, a hash of media/) of an installation."""
    code = ("import hashlib; from jobs.models import Note; rows = list(Note.objects.order_by"
            "('id').values_list('id', 'text')); print(len(rows), hashlib.sha256(repr(rows)"
            ".encode()).hexdigest())")
    rows = manage(setup, name, "shell", "-c", f'"{code}"').split()
    media = on_host(setup, f"cd /home/{name}/media && find . -type f | sort | xargs -r "
                           "sha256sum | sha256sum").stdout.split()[0]
    return int(rows[0]), rows[1], media


def manage(setup, name, *args):
    return on_host(setup, f"cd / && runuser -u {name} -- env HOME=/home/{name} "
                          f"/home/{name}/bin/python /home/{name}/src/jobs/manage.py "
                          + " ".join(args)).stdout


def write(setup, name, label, count):
    """``count`` notes and a file in media/, written as the installation's user."""
    manage(setup, name, "shell", "-c", f'"from jobs.models import Note; Note.objects.bulk_create('
                                       f"[Note(text='{label} %d' % i) for i in range({count})])\"")
    on_host(setup, f"runuser -u {name} -- sh -c 'echo {label} > /home/{name}/media/{label}.txt'")


def latest_backup(setup, name):
    return on_host(setup, f"ls /home/{name}/backups | sort | tail -1").stdout.strip().split(".")[0]


@pytest.mark.parametrize("name", NAMES)
def test_restore_drill_under_load(deployed, name):
    """Backup A, more data after it, the restore playbook restores A while 8 clients ask:
    the data are A's (rows and a hash of them, media/), no request fails."""
    write(deployed, name, "before", 50)
    result = on_host(deployed, f"/usr/bin/python3 -I {ROOT_COPY} run {name} backup")
    assert "succeeded" in result.stdout, result.stdout
    backup, at_a = latest_backup(deployed, name), snapshot(deployed, name)
    write(deployed, name, "after", 20)
    on_host(deployed, f"rm /home/{name}/media/before.txt")
    assert snapshot(deployed, name) != at_a
    with Load(deployed["host"], name, path="/notes/", clients=8) as load:
        time.sleep(1)
        with timed(f"jobs: restore drill of {name}"):
            rc, output, recap = playbook(deployed["workdir"], deployed["collections"],
                                         deployed["inventory"], "-e", f"restore_name={name}",
                                         name="restore")
        time.sleep(1)
    TIMES[f"jobs: restore of {name}: requests / failed / longest (s)"] = "%d / %d / %.2f" % (
        load.requests, load.failed, load.longest)
    assert rc == 0, output[-6000:]
    assert f"{name}: {backup} restored" in output, output[-3000:]
    TIMES[f"jobs: restore of {name}: the service stopped (s)"] = float(re.search(
        r"requests waited ([\d.]+) s", output).group(1))
    assert load.requests > 50 and load.failed == 0, (load.failed, load.errors[:5])
    assert snapshot(deployed, name) == at_a
    returncode, output = check(deployed, name)
    assert returncode == 0, output


def test_retention_keeps_what_was_declared(deployed):
    """keep 3: after five more backups of the timer's, its three newest are left, private to
    the user; those made before migrations are counted apart, three at most."""
    made = []
    for _ in range(5):
        on_host(deployed, f"/usr/bin/python3 -I {ROOT_COPY} run jobs_qual backup")
        made.append(latest_backup(deployed, "jobs_qual"))
    listed = on_host(deployed, "stat -c '%a %U %n' /home/jobs_qual/backups "
                               "/home/jobs_qual/backups/*").stdout.splitlines()
    assert listed[0] == "700 jobs_qual /home/jobs_qual/backups", listed
    assert all(line.startswith("600 jobs_qual ") for line in listed[1:]), listed
    stems = sorted({line.rsplit("/", 1)[1].split(".")[0] for line in listed[1:]})
    assert [stem for stem in stems if stem.endswith("-scheduled")] == made[-3:], (stems, made)
    assert len([stem for stem in stems if not stem.endswith("-scheduled")]) <= 3, stems


def test_a_damaged_backup_is_refused_before_anything_stops(deployed):
    """A backup whose database SQLite cannot read: the restore refuses it before it stops
    the service or the timers, and the installation serves as before."""
    # The five backups just before reached systemd's start limit (5 starts in 10 s).
    on_host(deployed, "systemctl reset-failed jobs_qual-backup.service")
    on_host(deployed, f"/usr/bin/python3 -I {ROOT_COPY} run jobs_qual backup")
    damaged = latest_backup(deployed, "jobs_qual")
    on_host(deployed, f"echo damaged > /home/jobs_qual/backups/{damaged}.sqlite")
    before = snapshot(deployed, "jobs_qual")
    rc, output, recap = playbook(deployed["workdir"], deployed["collections"],
                                 deployed["inventory"], "-e", "restore_name=jobs_qual",
                                 "-e", f"restore_backup={damaged}", name="restore")
    assert rc != 0 and "SQLite cannot restore it: ['file is not a database']" in output, \
        output[-3000:]
    assert on_host(deployed, "systemctl is-active jobs_qual.socket jobs_qual-backup.timer "
                             "jobs_qual-job-stamp.timer").stdout.split() == ["active"] * 3
    assert snapshot(deployed, "jobs_qual") == before
    assert check(deployed, "jobs_qual")[0] == 0
