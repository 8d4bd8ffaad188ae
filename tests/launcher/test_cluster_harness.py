"""Tests of the two-host harness itself (tests/launcher/cluster.py): network namespaces and a
real two-node Slurm cluster. Root only; elsewhere every test here is skipped with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import cluster as harness
from .cluster import (
    HOSTS_MARKER,
    NETNS_DIR,
    REQUEUE_DELAY_S,
    netns_pair,
    pids_in_netns,
    slurm_cluster,
)

PORT = 47123
# Listens on every address of its namespace, so that a connection that fails shows that the
# address is not this namespace's (not that the server only listens on one address).
SERVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT}))
s.listen()
print("ready", flush=True)
while True:
    c, (peer, _) = s.accept()
    c.sendall(("hello from kilnA to " + peer).encode())
    c.close()
"""
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        print(c.recv(200).decode())
except OSError as e:
    print("ERROR", type(e).__name__, e)
    sys.exit(3)
"""


def _gone(pids) -> list[int]:
    """The pids in ``pids`` that still run (zombies do not count: PID 1 reaps them later)."""
    return [p for p in pids if harness._alive(p)]


def _wait_for(predicate, timeout: float, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(every)


# ---------------------------------------------------------------------------------------------
# netns_pair
# ---------------------------------------------------------------------------------------------


def test_netns_pair_tcp_between_hosts_and_loopback_is_private():
    with netns_pair() as net:
        assert net.hosts == [("kilnA", "10.99.0.1", "vethkA"), ("kilnB", "10.99.0.2", "vethkB")]
        server = net.run_in(
            "kilnA", [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout.readline().strip() == "ready"

            def connect(ns: str, addr: str) -> subprocess.CompletedProcess:
                return net.run(ns, [sys.executable, "-c", CLIENT, addr, str(PORT)], timeout=30)

            # kilnB reaches kilnA over the veth pair, from its own address.
            across = connect("kilnB", "10.99.0.1")
            assert across.returncode == 0, across.stdout + across.stderr
            assert across.stdout.strip() == "hello from kilnA to 10.99.0.2"
            # kilnA's loopback is up (and is where its 127.0.0.1 goes)...
            local = connect("kilnA", "127.0.0.1")
            assert local.stdout.strip() == "hello from kilnA to 127.0.0.1", local.stdout
            # ... but kilnB's 127.0.0.1 is kilnB's own: kilnA's server is not there.
            loop_b = connect("kilnB", "127.0.0.1")
            assert loop_b.returncode == 3, loop_b.stdout
            assert "ConnectionRefused" in loop_b.stdout
            # Each namespace has its own interfaces; the root namespace has neither veth end.
            assert "10.99.0.2/24" in net.run("kilnB", ["ip", "-o", "addr"]).stdout
            assert not Path("/sys/class/net/vethkA").exists()
            assert not Path("/sys/class/net/vethkB").exists()
        finally:
            server.kill()
            server.wait()
    assert not (NETNS_DIR / "kilnA").exists()
    assert not (NETNS_DIR / "kilnB").exists()


def test_netns_pair_removed_when_body_raises_and_kills_what_runs_inside():
    with pytest.raises(RuntimeError, match="boom"), netns_pair() as net:
        sleeper = net.run_in("kilnB", ["sleep", "300"])
        assert sleeper.pid in pids_in_netns("kilnB")
        raise RuntimeError("boom")
    assert sleeper.wait(timeout=10) == -15  # SIGTERM from the teardown
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "kilnA" not in names and "kilnB" not in names


def test_netns_pair_cleans_leftovers_of_a_crashed_run():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    # What a run killed half-way leaves: a namespace with a process in it, a veth end. (Made
    # under the harness's lock, not to disturb a cluster that another process may be running.)
    leftover = None
    try:
        with harness._exclusive(harness.LOCK_FILE):
            subprocess.run(["ip", "netns", "del", "kilnA"], capture_output=True)
            made = subprocess.run(["ip", "netns", "add", "kilnA"], capture_output=True, text=True)
            if made.returncode != 0:
                pytest.skip(f"cannot create a namespace: {made.stderr}")
            veth = ["ip", "link", "add", "vethkB", "type", "veth", "peer", "name", "vethkX"]
            subprocess.run(veth, check=True)
            leftover = subprocess.Popen(["nsenter", "--net=/run/netns/kilnA", "sleep", "300"])
            _wait_for(lambda: leftover.pid in pids_in_netns("kilnA"), 10)
        with netns_pair() as net:
            assert leftover.wait(timeout=10) == -15
            assert net.run("kilnB", ["ip", "-o", "addr", "show", "vethkB"]).returncode == 0
        assert not Path("/sys/class/net/vethkX").exists()
    finally:
        if leftover is not None and leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def test_netns_pair_skips_with_the_reason_when_it_cannot(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="need root"), netns_pair():
        pass
    with pytest.raises(pytest.skip.Exception, match="needs root"), slurm_cluster(Path("/x")):
        pass


def test_netns_pair_skip_reason_carries_the_commands_stderr(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    # An interface name longer than IFNAMSIZ: `ip link add` refuses it.
    bad = "vethk-name-too-long-for-linux"
    monkeypatch.setattr(
        harness, "HOSTS", [("kilnA", "10.99.0.1", bad), ("kilnB", "10.99.0.2", "vethkB")]
    )
    with pytest.raises(pytest.skip.Exception) as skipped, netns_pair():
        pass
    reason = str(skipped.value)
    assert "ip link add" in reason and bad in reason, reason
    assert "exit " in reason, reason  # the exit status and stderr follow it
    assert not (NETNS_DIR / "kilnA").exists()


# ---------------------------------------------------------------------------------------------
# slurm_cluster
# ---------------------------------------------------------------------------------------------


def _snapshot(cluster) -> dict:
    """What must be gone after the cluster's exit: every pid it started or that runs in its
    namespaces (daemons, slurmstepd, job processes), and its munged if it started one."""
    pids = set(cluster.daemon_pids().values())
    for ns in cluster.nodes:
        pids.update(pids_in_netns(ns))
    if cluster.munged_pid is not None:
        pids.add(cluster.munged_pid)
    return {"pids": pids, "conf": str(cluster.conf), "munged_pid": cluster.munged_pid}


def _assert_nothing_left(snap: dict, hosts_before: str) -> None:
    assert not _gone(snap["pids"]), _ps()
    ps = _ps()
    assert snap["conf"] not in ps, ps  # no slurmctld/slurmd with our slurm.conf
    for ns in ("kilnA", "kilnB"):
        assert not (NETNS_DIR / ns).exists()
        assert not Path(f"/var/run/slurmd-{ns}.pid").exists()
        assert not Path(f"/var/spool/slurmd/{ns}").exists()
    hosts = Path("/etc/hosts").read_text()
    assert HOSTS_MARKER not in hosts
    assert hosts == hosts_before
    assert not harness.MUNGED_MARK.exists() or snap["munged_pid"] is None


def _hosts_now() -> str:
    """/etc/hosts without what a crashed earlier run may have left (the harness removes it)."""
    lines = Path("/etc/hosts").read_text().splitlines(keepends=True)
    return "".join(line for line in lines if HOSTS_MARKER not in line)


def _ps() -> str:
    return subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_two_node_batch_job_and_cancel(tmp_path):
    hosts_before = _hosts_now()
    t0 = time.monotonic()
    with slurm_cluster(tmp_path) as cluster:
        started = time.monotonic() - t0
        assert cluster.hosts == [
            ("kilnA", "10.99.0.1", "vethkA"),
            ("kilnB", "10.99.0.2", "vethkB"),
        ]
        assert cluster.sinfo() == {"kilnA": "idle", "kilnB": "idle"}
        assert "/etc/slurm" not in cluster.conf.as_posix()

        script = tmp_path / "hostname.sbatch"
        script.write_text("#!/bin/bash\n#SBATCH -N 2 --ntasks-per-node=1\nsrun hostname\n")
        out = tmp_path / "hostname.out"
        t1 = time.monotonic()
        job = cluster.sbatch(script, "-o", str(out))
        info = cluster.wait(job, timeout=60)
        ran = time.monotonic() - t1
        assert info["JobState"] == "COMPLETED", (info, out.read_text(), cluster.logs())
        assert info["ExitCode"] == "0:0"
        assert sorted(out.read_text().split()) == ["kilnA", "kilnB"], out.read_text()

        # squeue / scancel, and a job left running for the teardown to clean up.
        sleeper = tmp_path / "sleep.sbatch"
        sleeper.write_text("#!/bin/bash\nsrun sleep 300\n")
        a = cluster.sbatch(sleeper, "-o", str(tmp_path / "a.out"))
        b = cluster.sbatch(sleeper, "-o", str(tmp_path / "b.out"))
        cluster.wait(a, {"RUNNING"}, timeout=30)
        cluster.wait(b, {"RUNNING"}, timeout=30)  # one CPU each: one job per node
        assert cluster.squeue(a) == "RUNNING"
        cluster.scancel(str(a))
        assert cluster.wait(a, timeout=30)["JobState"] == "CANCELLED"
        _wait_for(lambda: cluster.squeue(a) is None, timeout=30)
        assert cluster.squeue(987654) is None
        snap = _snapshot(cluster)
        assert any("sleep 300" in harness._cmdline(p) for p in snap["pids"]), snap
    stopped = time.monotonic() - t0 - started
    _assert_nothing_left(snap, hosts_before)
    print(f"\ncluster start {started:.1f} s, 2-node job {ran:.1f} s, teardown ~{stopped:.1f} s")


@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_requeue_restarts_the_job_with_restart_count(tmp_path):
    hosts_before = _hosts_now()
    with slurm_cluster(tmp_path) as cluster:
        script = tmp_path / "requeue.sbatch"
        script.write_text(
            "#!/bin/bash\n"
            "#SBATCH -N 2 --ntasks-per-node=1 --requeue --open-mode=append\n"
            'echo "run SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} on $(hostname)"\n'
            'if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then srun hostname; exit 0; fi\n'
            "srun sleep 300\n"
        )
        out = tmp_path / "requeue.out"
        job = cluster.sbatch(script, "-o", str(out))
        cluster.wait(job, {"RUNNING"}, timeout=60)
        _wait_for(lambda: out.exists() and "SLURM_RESTART_COUNT=0" in out.read_text(), 30)

        def sleeps() -> dict[str, list[int]]:
            return {
                ns: [p for p in pids_in_netns(ns) if "sleep 300" in harness._cmdline(p)]
                for ns in cluster.nodes
            }

        _wait_for(lambda: all(sleeps().values()), 30)  # `srun sleep 300` runs on both nodes
        first_run = sleeps()
        first_pids = [p for pids in first_run.values() for p in pids]

        t0 = time.monotonic()
        cluster.scontrol("requeue", str(job))
        _wait_for(lambda: "SLURM_RESTART_COUNT=1" in out.read_text(), REQUEUE_DELAY_S + 60)
        restarted = time.monotonic() - t0
        info = cluster.wait(job, timeout=60, restarts=1)
        assert info["JobState"] == "COMPLETED", (info, out.read_text())
        assert info["Restarts"] == "1"
        text = out.read_text()
        assert text.count("run SLURM_RESTART_COUNT=") == 2, text
        assert "DUE TO JOB REQUEUE" in text
        second_run = text.split("SLURM_RESTART_COUNT=1", 1)[1].splitlines()[1:]
        assert sorted(line for line in second_run if line.startswith("kiln")) == [
            "kilnA",
            "kilnB",
        ], text
        # The first run's processes (srun sleep 300 on both nodes) were ended by the requeue.
        assert not _gone(first_pids), _ps()
        snap = _snapshot(cluster)
    _assert_nothing_left(snap, hosts_before)
    # Slurm holds a requeued job for AuthInfo=cred_expire seconds (the harness sets it to
    # REQUEUE_DELAY_S; Slurm's default is 120) before it is eligible.
    print(f"\nrequeue -> running again after {restarted:.1f} s (hold {REQUEUE_DELAY_S} s)")
    assert REQUEUE_DELAY_S - 1 <= restarted < REQUEUE_DELAY_S + 30


# ---------------------------------------------------------------------------------------------
# Pieces that need no root
# ---------------------------------------------------------------------------------------------


def test_etc_hosts_lines_removed_exactly_and_leftovers_cleaned(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    original = "127.0.0.1 localhost\n::1 ip6-localhost\n127.0.0.1 vm"  # no final newline
    hosts.write_text(original)
    monkeypatch.setattr(harness, "HOSTS_FILE", hosts)
    with harness._etc_hosts([("10.99.0.1", "kilnA"), ("10.99.0.2", "kilnB")]):
        lines = hosts.read_text().splitlines()
        assert lines == [
            *original.splitlines(),
            f"10.99.0.1 kilnA {HOSTS_MARKER}",
            f"10.99.0.2 kilnB {HOSTS_MARKER}",
        ]
    assert hosts.read_text() == original  # byte for byte
    # A crashed run's line is removed first; a line someone appends after ours is kept.
    hosts.write_text(original + f"\n10.99.0.1 kilnA {HOSTS_MARKER}\n")
    with pytest.raises(RuntimeError), harness._etc_hosts([("10.99.0.1", "kilnA")]):
        assert hosts.read_text().count("kilnA") == 1
        hosts.write_text(hosts.read_text() + "10.0.0.9 other\n")
        raise RuntimeError
    assert hosts.read_text() == original + "\n10.0.0.9 other\n"


def test_ensure_slurm_installed_updates_only_when_install_fails(monkeypatch):
    calls: list[list[str]] = []
    results = iter([1, 0, 0])  # install fails, update works, install works

    def fake_run(argv, timeout=30, **kwargs):
        calls.append(list(argv))
        assert kwargs["env"]["DEBIAN_FRONTEND"] == "noninteractive"
        return subprocess.CompletedProcess(argv, next(results), "", "E: Unable to locate")

    installed = {"done": False}
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        harness,
        "_which",
        lambda name: "/usr/bin/" + name if name == "apt-get" or installed["done"] else None,
    )

    def run_and_install(argv, timeout=30, **kwargs):
        done = fake_run(argv, timeout, **kwargs)
        if argv[:2] == ["apt-get", "install"] and done.returncode == 0:
            installed["done"] = True
        return done

    monkeypatch.setattr(harness, "_run", run_and_install)
    harness.ensure_slurm_installed()
    install = ["apt-get", "install", "-y", "slurm-wlm", "munge"]
    assert calls == [install, ["apt-get", "update"], install]


def test_ensure_slurm_installed_skips_with_apt_stderr(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        harness, "_which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None
    )
    monkeypatch.setattr(
        harness,
        "_run",
        lambda argv, timeout=30, **kw: subprocess.CompletedProcess(
            argv, 100, "", "E: Could not get lock /var/lib/dpkg/lock-frontend"
        ),
    )
    with pytest.raises(pytest.skip.Exception, match="Could not get lock"):
        harness.ensure_slurm_installed()


def test_requeue_delay_below_slurms_minimum_is_refused(tmp_path):
    # Slurm would log "AuthInfo=cred_expire=4 invalid" and silently hold requeues for 120 s.
    with pytest.raises(ValueError, match=">= 5"), slurm_cluster(tmp_path, requeue_delay=4):
        pass
