"""A real two-host setup on one machine, for multi-node tests (a harness, not a test file).

``netns_pair()`` makes two network namespaces joined by a veth pair, two "hosts" with their own
addresses and their own loopback. ``slurm_cluster(tmp_path)`` runs a real two-node Slurm cluster
on them (slurmctld + one slurmd per namespace, munge for authentication), with a private
slurm.conf so that the machine's /etc/slurm is never touched.

Both need root. When the machine cannot provide them (not root, no ``ip``/``nsenter``, no
permission, Slurm cannot be installed, the daemons do not come up) they call ``pytest.skip``
with the reason (the failing command's stderr, the daemons' logs): never a silent pass.

Names are fixed (``kilnA``/``kilnB``), so one process at a time holds them: a lock file
serialises concurrent users, and leftovers of a crashed earlier run (namespaces, processes in
them, /etc/hosts lines) are removed before anything is created.

Usage::

    with slurm_cluster(tmp_path) as cluster:
        job = cluster.sbatch(script, "-N", "2", "--ntasks-per-node=1", "-o", str(out))
        info = cluster.wait(job, timeout=60)
        assert info["JobState"] == "COMPLETED"
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# (namespace, address, interface): the two "hosts".
HOSTS: list[tuple[str, str, str]] = [
    ("kilnA", "10.99.0.1", "vethkA"),
    ("kilnB", "10.99.0.2", "vethkB"),
]
PREFIX_LEN = 24
NETNS_DIR = Path("/run/netns")
LOCK_FILE = Path("/run/kiln-netns.lock")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARKER = "# kiln-test-cluster"
SLURMD_SPOOL = "/var/spool/slurmd/%n"
SLURMD_PIDFILE = "/var/run/slurmd-%n.pid"
MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_PIDFILE = MUNGE_RUN_DIR / "munged.pid"
MUNGED_MARK = Path("/run/kiln-munged.pid")  # the munged this harness started
# System tools live in sbin; a test's PATH (a venv, a user shell) may not have it.
SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Seconds a requeued job is held before it may start again. Slurm sets the requeued job's
# begin time to now + AuthInfo=cred_expire (default 120 s, slurm.conf(5): "This also controls
# how long a requeued job must wait before starting again"); the smallest value it accepts
# is 5 (see slurm_cluster()).
REQUEUE_DELAY_S = 5
# Job states after which `scontrol show job` will not change any more (COMPLETING is not one:
# the job's processes and output files are still being cleaned up).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "SPECIAL_EXIT",
        "REQUEUE_HOLD",
    }
)


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PATH"] = env.get("PATH", "") + ":" + SYS_PATH
    return env


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SYS_PATH)


def _run(argv: Sequence[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", _env())
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


def _skip(what: str, done: subprocess.CompletedProcess | None = None, extra: str = "") -> None:
    reason = what
    if done is not None:
        reason += f" (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}"
    if extra:
        reason += "\n" + extra
    pytest.skip(reason)


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _stop(pids: Iterable[int], grace: float = 10.0) -> None:
    """SIGTERM each pid, wait up to ``grace`` seconds, then SIGKILL what is left."""
    pids = [p for p in set(pids) if p > 1 and p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def pids_in_netns(ns: str) -> list[int]:
    """Every live process whose network namespace is ``ns`` (empty if ``ns`` does not exist)."""
    try:
        target = os.stat(NETNS_DIR / ns)
    except OSError:
        return []
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(entry / "ns" / "net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino) and _alive(int(entry.name)):
            out.append(int(entry.name))
    return out


# ---------------------------------------------------------------------------------------------
# Two network namespaces
# ---------------------------------------------------------------------------------------------


@dataclass
class NetnsPair:
    """Two "hosts": ``hosts[i] = (namespace, address, interface)``."""

    hosts: list[tuple[str, str, str]] = field(default_factory=lambda: list(HOSTS))

    def argv_in(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside namespace ``ns`` (network only: /sys, /proc, the
        filesystem and the hostname stay the machine's; ``ip netns exec`` would remount /sys,
        which slurmd does not survive)."""
        self._check(ns)
        return ["nsenter", f"--net={NETNS_DIR / ns}", *map(str, argv)]

    def run_in(self, ns: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` inside namespace ``ns``; keyword arguments go to ``subprocess.Popen``
        (``env`` defaults to this process's environment with /usr/sbin on PATH). Returns once
        the process is in the namespace (or has exited)."""
        popen_kwargs.setdefault("env", _env())
        proc = subprocess.Popen(self.argv_in(ns, argv), **popen_kwargs)
        # Return once it is inside (nsenter has called setns), so that the namespace's
        # teardown, which stops what runs in it, cannot miss it.
        deadline = time.monotonic() + 10
        while (
            proc.pid not in pids_in_netns(ns)
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        return proc

    def run(
        self, ns: str, argv: Sequence[str], timeout: float = 60, **run_kwargs
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``ns`` to completion (text output captured, no check)."""
        return _run(self.argv_in(ns, argv), timeout=timeout, **run_kwargs)

    def address(self, ns: str) -> str:
        return next(addr for name, addr, _ in self.hosts if name == ns)

    def interface(self, ns: str) -> str:
        return next(dev for name, _, dev in self.hosts if name == ns)

    def _check(self, ns: str) -> None:
        if ns not in {h[0] for h in self.hosts}:
            raise ValueError(f"unknown namespace {ns!r}; have {[h[0] for h in self.hosts]}")


@contextlib.contextmanager
def _exclusive(lock_path: Path, timeout: float = 900) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` (released by the kernel if we die)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.skip(f"{lock_path} held by another process for {timeout:.0f} s")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _delete_netns(hosts: Sequence[tuple[str, str, str]]) -> None:
    """Kill what still runs in the namespaces, delete them and any stray veth end."""
    pids = [p for ns, _, _ in hosts for p in pids_in_netns(ns)]
    if pids:
        _stop(pids, grace=5)
    for ns, _, dev in hosts:
        if (NETNS_DIR / ns).exists():
            _run(["ip", "netns", "del", ns])
        # A veth end left in the root namespace by a run that died half-way.
        if Path(f"/sys/class/net/{dev}").exists():
            _run(["ip", "link", "del", dev])


@contextlib.contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    """Namespaces kilnA (10.99.0.1/24 on vethkA) and kilnB (10.99.0.2/24 on vethkB) joined by
    a veth pair, loopback up in both; deleted on exit, also when the body raises (processes
    still running inside them are stopped first). Skips the test when they cannot be made."""
    if os.geteuid() != 0:
        pytest.skip(f"network namespaces need root (euid {os.geteuid()})")
    for tool in ("ip", "nsenter"):
        if _which(tool) is None:
            pytest.skip(f"`{tool}` not found (needed for network namespaces)")
    pair = NetnsPair()
    (ns_a, _, dev_a), (ns_b, _, dev_b) = pair.hosts
    with _exclusive(LOCK_FILE):
        _delete_netns(pair.hosts)  # leftovers of a crashed earlier run
        try:
            steps = [
                ["ip", "netns", "add", ns_a],
                ["ip", "netns", "add", ns_b],
                ["ip", "link", "add", dev_a, "type", "veth", "peer", "name", dev_b],
                ["ip", "link", "set", dev_a, "netns", ns_a],
                ["ip", "link", "set", dev_b, "netns", ns_b],
            ]
            for ns, addr, dev in pair.hosts:
                steps += [
                    ["ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", dev],
                    ["ip", "-n", ns, "link", "set", "lo", "up"],
                    ["ip", "-n", ns, "link", "set", dev, "up"],
                ]
            for argv in steps:
                done = _run(argv)
                if done.returncode != 0:
                    _skip(f"cannot create network namespaces: `{' '.join(argv)}` failed", done)
            yield pair
        finally:
            _delete_netns(pair.hosts)


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------


def ensure_slurm_installed() -> None:
    """Install ``slurm-wlm munge`` with apt-get if ``slurmctld`` is missing (``apt-get update``
    only when a first install fails); skip the test when that is not possible."""
    if _which("slurmctld") and _which("munged"):
        return
    if os.geteuid() != 0:
        pytest.skip(f"Slurm is not installed and installing it needs root (euid {os.geteuid()})")
    if _which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    install = ["apt-get", "install", "-y", "slurm-wlm", "munge"]
    env = _env({"DEBIAN_FRONTEND": "noninteractive"})
    done = _run(install, timeout=900, env=env)
    if done.returncode != 0:
        update = _run(["apt-get", "update"], timeout=600, env=env)
        if update.returncode != 0:
            _skip("cannot install Slurm: `apt-get update` failed", update)
        done = _run(install, timeout=900, env=env)
    if done.returncode != 0 or not _which("slurmctld"):
        _skip("cannot install Slurm: `apt-get install -y slurm-wlm munge` failed", done)


def _munge_works() -> bool:
    if not (_which("munge") and _which("unmunge")):
        return False
    try:
        encoded = _run(["munge", "-n"], timeout=10)
        if encoded.returncode != 0:
            return False
        return _run(["unmunge"], timeout=10, input=encoded.stdout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@contextlib.contextmanager
def _munged() -> Iterator[int | None]:
    """A working munged for the duration. One that already answers is reused (yields None) and
    left running, unless this harness started it in a run that died before stopping it (its
    pid is in MUNGED_MARK): that one, or a new one, is stopped on exit (yields its pid)."""
    ours = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(MUNGED_MARK.read_text().split()[0])
        if _alive(pid) and "munged" in _cmdline(pid):
            ours = pid
    done = None
    try:
        if not _munge_works():
            if ours is not None:  # ours but not answering: start afresh
                _stop([ours])
                ours = None
            key = Path("/etc/munge/munge.key")
            if not key.exists():
                for argv in (["mungekey", "--create"], ["create-munge-key"]):
                    if _which(argv[0]):
                        _run(argv)
                        break
                if not key.exists():
                    pytest.skip(f"no munge key at {key} and none could be created")
                with contextlib.suppress(OSError, LookupError):
                    shutil.chown(key, "munge", "munge")
                    key.chmod(0o400)
            MUNGE_RUN_DIR.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError, LookupError):
                shutil.chown(MUNGE_RUN_DIR, "munge", "munge")
            done = _run(["munged", "--force"])  # daemonizes, writes its pid file
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not _munge_works():
                time.sleep(0.1)
            with contextlib.suppress(OSError, ValueError, IndexError):
                ours = int(MUNGE_PIDFILE.read_text().split()[0])
                MUNGED_MARK.write_text(f"{ours}\n")
            if not _munge_works():
                _skip("munged did not start", done)
        yield ours
    finally:
        if ours is not None and "munged" in _cmdline(ours):
            _stop([ours])
        if ours is not None:
            MUNGED_MARK.unlink(missing_ok=True)


@contextlib.contextmanager
def _etc_hosts(entries: Sequence[tuple[str, str]]) -> Iterator[None]:
    """Append ``address name`` lines (marked) to /etc/hosts and remove them on exit, leaving
    the rest byte for byte as it was. Rewritten in place: the file may be a bind mount."""

    def strip_marked() -> str:
        text = HOSTS_FILE.read_text()
        lines = text.splitlines(keepends=True)
        kept = [line for line in lines if not line.rstrip("\n").endswith(HOSTS_MARKER)]
        if kept != lines:
            text = "".join(kept)
            HOSTS_FILE.write_text(text)
        return text

    before = strip_marked()  # leftovers of a crashed earlier run
    added = ("\n" if before and not before.endswith("\n") else "") + "".join(
        f"{addr} {name} {HOSTS_MARKER}\n" for addr, name in entries
    )
    HOSTS_FILE.write_text(before + added)
    try:
        yield
    finally:
        now = HOSTS_FILE.read_text()
        if now.endswith(added):
            HOSTS_FILE.write_text(now[: len(now) - len(added)])
        else:  # someone appended after us
            strip_marked()


def _parse_fields(line: str) -> dict[str, str]:
    """``Key=value Key2=value with spaces ...`` (one line of ``scontrol show -o``) -> dict."""
    return {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s[A-Za-z][\w:/]*=|$)", line)
    }


@dataclass
class SlurmCluster:
    """A running two-node cluster; every command runs in the controller's namespace (kilnA)
    with ``SLURM_CONF`` pointing at the private slurm.conf."""

    net: NetnsPair
    conf: Path  # the private slurm.conf
    workdir: Path  # tmp_path: default cwd of sbatch, holds state/ and logs/
    log_dir: Path
    munged_pid: int | None = None  # the munged this cluster started (None: one was running)
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def hosts(self) -> list[tuple[str, str, str]]:
        return self.net.hosts

    @property
    def controller(self) -> str:
        return self.net.hosts[0][0]

    @property
    def nodes(self) -> list[str]:
        return [ns for ns, _, _ in self.net.hosts]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """os.environ + ``extra`` + ``SLURM_CONF`` (what every command here runs with)."""
        return _env({**(extra or {}), "SLURM_CONF": str(self.conf)})

    def run_in_controller(
        self,
        argv: Sequence[str],
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
        **run_kwargs,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion in the controller's namespace (text output captured, no
        check); ``env`` adds variables to os.environ."""
        return self.net.run(self.controller, argv, timeout=timeout, env=self.env(env), **run_kwargs)

    def _checked(self, argv: Sequence[str], check: bool, timeout: float = 60) -> str:
        done = self.run_in_controller(argv, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(map(str, argv))}` failed (exit {done.returncode}): "
                f"{done.stderr.strip()}\n{self.logs()}"
            )
        return done.stdout

    def sbatch(
        self,
        script_path: str | os.PathLike,
        *args: str,
        env: Mapping[str, str] | None = None,
        script_args: Sequence[str] = (),
        cwd: str | os.PathLike | None = None,
    ) -> int:
        """``sbatch --parsable *args script_path *script_args`` -> the job id. ``args`` are
        sbatch options (they go before the script); ``env`` adds variables to os.environ (the
        job gets them: sbatch exports the submitting environment); ``cwd`` (default: the
        cluster's workdir) is the job's working directory."""
        argv = ["sbatch", "--parsable", *args, str(script_path), *script_args]
        done = self.run_in_controller(argv, env=env, cwd=str(cwd or self.workdir))
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed (exit {done.returncode}): {done.stderr.strip()}")
        return int(done.stdout.strip().split(";")[0])

    def scontrol(self, *args: str, check: bool = True) -> str:
        """``scontrol *args`` -> stdout (RuntimeError with stderr and daemon logs on failure
        when ``check``)."""
        return self._checked(["scontrol", *map(str, args)], check)

    def scancel(self, *args: str, check: bool = True) -> str:
        return self._checked(["scancel", *map(str, args)], check)

    def squeue(self, job_id: int | str) -> str | None:
        """The job's state as squeue prints it (PENDING, RUNNING, COMPLETING, ...), or None
        once squeue no longer lists it."""
        done = self.run_in_controller(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
        state = done.stdout.strip()
        if done.returncode != 0 or not state:
            return None
        return state

    def job(self, job_id: int | str) -> dict[str, str] | None:
        """``scontrol show job <id> -o`` as a dict (JobState, Restarts, NodeList, ExitCode,
        StdOut, ...), or None when slurmctld does not know the job (any more)."""
        done = self.run_in_controller(["scontrol", "show", "job", str(job_id), "-o"])
        if done.returncode != 0 or not done.stdout.strip():
            return None
        return _parse_fields(done.stdout.strip().splitlines()[0])

    def wait(
        self,
        job_id: int | str,
        states: Iterable[str] = TERMINAL_STATES,
        timeout: float = 120,
        restarts: int | None = None,
        every: float = 0.25,
    ) -> dict[str, str]:
        """Poll ``scontrol show job`` until JobState is one of ``states`` (and, if given,
        Restarts >= ``restarts``); return the job's fields. TimeoutError (with the last
        fields and the daemons' logs) otherwise."""
        states = set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] | None = None
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if (
                info is not None
                and info.get("JobState") in states
                and (restarts is None or int(info.get("Restarts", 0)) >= restarts)
            ):
                return info
            time.sleep(every)
        raise TimeoutError(
            f"job {job_id} not in {sorted(states)}"
            + (f" with Restarts>={restarts}" if restarts is not None else "")
            + f" after {timeout} s; last: {info}\n{self.logs()}"
        )

    def sinfo(self) -> dict[str, str]:
        """node -> state (idle, alloc, mix, down*, ...)."""
        done = self.run_in_controller(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=20)
        out = {}
        for line in done.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out

    def daemon_pids(self) -> dict[str, int]:
        """name (slurmctld, slurmd-kilnA, ...) -> pid, for the daemons still alive."""
        return {n: p.pid for n, p in self.daemons.items() if p.poll() is None}

    def logs(self, tail: int = 3000) -> str:
        """The last ``tail`` characters of every daemon log (for failure messages)."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} ---\n{text[-tail:]}")
        return "\n".join(parts)


def _slurm_conf(
    workdir: Path,
    hosts: Sequence[tuple[str, str, str]],
    requeue_delay: int,
    kill_wait: int,
    extra: Mapping[str, str | None],
) -> str:
    log_dir = workdir / "logs"
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    settings = {
        "ClusterName": "kiln",
        "SlurmctldHost": f"{hosts[0][0]}({hosts[0][1]})",
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        # Also the hold of a requeued job before it is eligible again (slurm.conf(5)).
        "AuthInfo": f"cred_expire={requeue_delay}",
        "MpiDefault": "none",
        "MailProg": "/bin/true",  # the default /usr/bin/mail is absent: an error in every log
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core",
        "SchedulerType": "sched/backfill",
        # Look at pending jobs every second (defaults 60 s / 30 s): a requeued job becomes
        # eligible with no event that would wake the scheduler.
        "SchedulerParameters": "sched_interval=1,bf_interval=1",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "ReturnToService": "2",
        "JobRequeue": "1",
        "MinJobAge": "600",
        "KillWait": str(kill_wait),
        "SlurmctldTimeout": "30",
        "SlurmdTimeout": "60",
        "StateSaveLocation": str(workdir / "state"),
        "SlurmctldPidFile": str(workdir / "slurmctld.pid"),
        "SlurmctldLogFile": str(log_dir / "slurmctld.log"),
        "SlurmdSpoolDir": SLURMD_SPOOL,
        "SlurmdPidFile": SLURMD_PIDFILE,
        "SlurmdLogFile": str(log_dir / "slurmd-%n.log"),
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
        **extra,
    }
    lines = [f"{k}={v}" for k, v in settings.items() if v is not None]
    lines += [
        f"NodeName={ns} NodeAddr={addr} CPUs=1 RealMemory={min(8000, mem_mb)} State=UNKNOWN"
        for ns, addr, _ in hosts
    ]
    lines.append(
        f"PartitionName=debug Nodes={','.join(h[0] for h in hosts)} "
        "Default=YES MaxTime=INFINITE State=UP"
    )
    return "\n".join(lines) + "\n"


def _node_path(template: str, node: str) -> Path:
    return Path(template.replace("%n", node))


def _stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel every job, stop the daemons (their Popen pids, which are also in the pid
    files), then whatever the daemons left (slurmstepd, job processes) is killed with the
    namespaces by netns_pair's exit."""
    if "slurmctld" in cluster.daemon_pids():
        with contextlib.suppress(Exception):
            jobs = cluster.run_in_controller(["squeue", "-h", "-o", "%i"], timeout=10).stdout
            ids = jobs.split()
            if ids:
                cluster.run_in_controller(["scancel", *ids], timeout=10)
                deadline = time.monotonic() + 5
                while (
                    time.monotonic() < deadline
                    and cluster.run_in_controller(
                        ["squeue", "-h", "-o", "%i"], timeout=10
                    ).stdout.strip()
                ):
                    time.sleep(0.2)
    pids = set(cluster.daemon_pids().values())
    for pidfile in [cluster.workdir / "slurmctld.pid"] + [
        _node_path(SLURMD_PIDFILE, n) for n in cluster.nodes
    ]:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().split()[0])
            if "slurm" in _cmdline(pid):
                pids.add(pid)
    _stop(pids, grace=10)
    for proc in cluster.daemons.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    for node in cluster.nodes:
        _node_path(SLURMD_PIDFILE, node).unlink(missing_ok=True)
        shutil.rmtree(_node_path(SLURMD_SPOOL, node), ignore_errors=True)


@contextlib.contextmanager
def slurm_cluster(
    tmp_path: Path,
    *,
    requeue_delay: int = REQUEUE_DELAY_S,
    kill_wait: int = 10,
    extra_conf: Mapping[str, str | None] | None = None,
    start_timeout: float = 60,
) -> Iterator[SlurmCluster]:
    """A two-node Slurm cluster (controller and node kilnA, node kilnB, one CPU each, partition
    ``debug``) on ``netns_pair()``; everything it started is stopped on exit.

    ``requeue_delay`` is ``AuthInfo=cred_expire``: the seconds a requeued job waits before it
    may run again (Slurm's default 120; it refuses values below 5), which is also the lifetime
    of a job step's credential (a step must launch within it). ``kill_wait`` is ``KillWait``
    (SIGTERM -> SIGKILL at a time limit, cancel or requeue; Slurm's default 30).
    ``extra_conf`` overrides or adds global slurm.conf keys (None removes one). Skips when
    root, Slurm or the namespaces are missing, or when both nodes are not idle within
    ``start_timeout`` s."""
    if requeue_delay < 5:
        # Slurm would log "AuthInfo=cred_expire=N invalid" and silently use 120 s.
        raise ValueError(f"requeue_delay must be >= 5 (Slurm's minimum), not {requeue_delay}")
    if os.geteuid() != 0:
        pytest.skip(f"a Slurm cluster needs root (euid {os.geteuid()})")
    ensure_slurm_installed()
    tmp_path = Path(tmp_path)
    log_dir = tmp_path / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    (tmp_path / "state").mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        # The namespaces first: their lock also keeps a concurrent cluster from stopping
        # the munged this one relies on.
        net = stack.enter_context(netns_pair())
        munged_pid = stack.enter_context(_munged())
        stack.enter_context(_etc_hosts([(addr, ns) for ns, addr, _ in net.hosts]))
        conf = tmp_path / "slurm.conf"
        conf.write_text(
            _slurm_conf(tmp_path, net.hosts, requeue_delay, kill_wait, extra_conf or {})
        )
        cluster = SlurmCluster(
            net=net, conf=conf, workdir=tmp_path, log_dir=log_dir, munged_pid=munged_pid
        )
        for node in cluster.nodes:
            spool = _node_path(SLURMD_SPOOL, node)
            shutil.rmtree(spool, ignore_errors=True)  # state of an earlier cluster
            spool.mkdir(parents=True)
            _node_path(SLURMD_PIDFILE, node).unlink(missing_ok=True)
        stack.callback(_stop_cluster, cluster)

        def start(name: str, ns: str, daemon: list[str]) -> None:
            # Own UTS namespace so that `hostname` is the node name (slurmctld checks it
            # against SlurmctldHost; jobs see it). Foreground (-D): the Popen is the daemon.
            out = open(log_dir / f"{name}.stdout.log", "w")  # noqa: SIM115
            stack.callback(out.close)
            cluster.daemons[name] = net.run_in(
                ns,
                ["unshare", "--uts", "sh", "-c", f"hostname {ns} && exec {shlex.join(daemon)}"],
                env=cluster.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=tmp_path,
            )

        start("slurmctld", cluster.controller, ["slurmctld", "-D", "-f", str(conf)])
        for node in cluster.nodes:
            start(f"slurmd-{node}", node, ["slurmd", "-D", "-f", str(conf), "-N", node])

        deadline = time.monotonic() + start_timeout
        nodes: dict[str, str] = {}
        while True:
            dead = [n for n, p in cluster.daemons.items() if p.poll() is not None]
            if dead:
                _skip(f"Slurm daemon(s) {dead} exited at start", extra=cluster.logs())
            nodes = cluster.sinfo()
            if all(nodes.get(n) == "idle" for n in cluster.nodes):
                break
            if time.monotonic() > deadline:
                _skip(
                    f"Slurm nodes not idle after {start_timeout} s (sinfo: {nodes})",
                    extra=cluster.logs(),
                )
            time.sleep(0.25)
        yield cluster
