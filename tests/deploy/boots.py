"""Boot test hosts again and again, optionally on a loaded machine, and count the boots that fail.

    python3 tests/deploy/boots.py ROUNDS [--hosts 2] [--parallel P] [--burn N] [--dir DIR]

Each round boots --hosts hosts with testhosts.py and stops them again. --parallel runs P such
sequences at once (P processes of this script, each with its own work directory, names and
addresses); --burn keeps N CPU burners spinning for the whole run. Every failed boot's error (the
failed units, their journal, the console) is written to DIR/failures/; the last line printed is
the counts, e.g. `boots 40 ok 40 degraded 0 other 0 in 187 s`. Exit code 0 when no boot failed.

Every burner and worker is this script's own child and is stopped at the end, also on Ctrl-C.

Measured here (2 cores, other engineers' hosts running too), `boots.py 15 --parallel 2 --burn 2`:
7 and 3 of 30 boots degraded while every container shared nspawn's "payload" cgroup
(219/CGROUP: "Failed to attach to cgroup /system.slice/..."), 0 of 30 twice with a cgroup per host.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testhosts  # noqa: E402

# A CPU burner: spins until its parent stops it (SIGTERM), or goes with the parent; a Ctrl-C at
# the terminal is the parent's to handle.
BURNER = """
import os, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent = os.getppid()
while os.getppid() == parent:
    for _ in range(1000000):
        pass
"""


def boot_rounds(rounds, hosts, workdir, failures, log):
    """Boot `hosts` hosts `rounds` times in a row; the counts by outcome."""
    counts = {"ok": 0, "degraded": 0, "other": 0}
    for number in range(1, rounds + 1):
        started = time.monotonic()
        roundir = os.path.join(workdir, "round%d" % number)
        try:
            with testhosts.TestHosts(roundir, log=log) as th:
                th.boot(hosts)
            outcome, error = "ok", None
        except RuntimeError as failure:
            outcome = "degraded" if " booted degraded:" in str(failure) else "other"
            error = str(failure)
        except TimeoutError as failure:  # raised by testhosts on a bounded wait
            outcome, error = "other", str(failure)
        counts[outcome] += 1
        log("round %d: %s in %.1f s" % (number, outcome, time.monotonic() - started))
        if error:
            path = os.path.join(failures, "%d-round%d.txt" % (os.getpid(), number))
            with open(path, "w") as f:
                f.write(error)
            log("  " + error.splitlines()[0] + " -> " + path)
    return counts


def stop(processes, timeout=60):
    """Stop our own children: SIGTERM, then SIGKILL whoever is left after `timeout` seconds."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rounds", type=int)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--burn", type=int, default=0)
    parser.add_argument("--dir", help="work directory (default: a new one under /tmp)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    base = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="boots-"))
    failures = os.path.join(base, "failures")
    os.makedirs(failures, exist_ok=True)

    if args.worker:  # one sequence of rounds; its counts go to a file for the parent
        workdir = tempfile.mkdtemp(prefix="worker-", dir=base)
        try:
            counts = boot_rounds(args.rounds, args.hosts, workdir, failures,
                                 lambda text: print("[%d] %s" % (os.getpid(), text), flush=True))
        except KeyboardInterrupt:
            return 130
        finally:
            shutil.rmtree(workdir, ignore_errors=True)  # each round's TestHosts emptied it
        with open(os.path.join(base, "counts-%d" % os.getpid()), "w") as f:
            json.dump(counts, f)
        return 0

    testhosts.build_image()  # once, before workers race for its lock
    started = time.monotonic()
    burners, workers = [], []
    totals = {"ok": 0, "degraded": 0, "other": 0}
    try:
        for _ in range(args.burn):
            burners.append(subprocess.Popen([sys.executable, "-c", BURNER]))
        command = [sys.executable, os.path.abspath(__file__), str(args.rounds), "--worker",
                   "--hosts", str(args.hosts), "--dir", base]
        for _ in range(args.parallel):
            workers.append(subprocess.Popen(command))
        # Every wait of a round is bounded by testhosts; this bounds the whole sequence.
        deadline = started + args.rounds * (testhosts.BOOT_TIMEOUT + 2 * testhosts.STOP_TIMEOUT)
        for worker in workers:
            worker.wait(max(1, deadline - time.monotonic()))
            with open(os.path.join(base, "counts-%d" % worker.pid)) as f:
                for outcome, number in json.load(f).items():
                    totals[outcome] += number
    except KeyboardInterrupt:
        return 130
    finally:
        stop(workers)  # they stop their hosts on SIGTERM, as on Ctrl-C
        stop(burners, timeout=5)
    totals["boots"] = sum(totals.values())
    print("boots %d ok %d degraded %d other %d in %.0f s (hosts %d, parallel %d, burn %d); "
          "failures in %s" % (totals["boots"], totals["ok"], totals["degraded"], totals["other"],
                              time.monotonic() - started, args.hosts, args.parallel, args.burn,
                              failures))
    return 0 if totals["ok"] == totals["boots"] else 1


if __name__ == "__main__":
    sys.exit(main())
