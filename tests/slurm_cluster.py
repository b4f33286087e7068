"""A real single-node Slurm cluster (Debian's slurm-wlm + munge) that lives in one directory and one `with` block.

`SlurmCluster(root)` writes a slurm.conf under `root`, starts munged, slurmctld and slurmd as child processes in
the foreground (so they are ours to stop, by pid), waits until the node is idle, and on exit stops them and checks
that none is left. Client commands (sbatch, squeue, scancel, scontrol) find the cluster through SLURM_CONF, which
`env()` supplies. Nothing outside `root` is touched: own munge key and socket, own state, spool and log files,
free TCP ports.

The node declares 16 CPUs, 128 GB and one `gpu` GRES, whatever the host has (`SlurmdParameters=config_overrides`):
a GPU cluster node as the SLURM profile expects one, so the profile's requests (`--gpus=1`, 16 CPUs, 96 GB) are
accepted and recorded as they are, not stripped. The GRES is backed by /dev/null (Slurm 22.05 drains a node whose
gpu GRES has no File=), so a job that got it sees CUDA_VISIBLE_DEVICES=0, torch finds no CUDA device and the job
runs on the CPU. Nothing is enforced (task/none, proctrack/linuxproc: the containers CI runs in have no cgroup
delegation), so the node is oversubscribed: 16 "CPUs" on the host's 2 cores.

Job records: no slurmdbd (the executor plugin does not need it: it polls job states with squeue when told to,
which needs MinJobAge well above its polling interval (3600 s here). The same setting keeps every job's record (state,
partition, CPUs, memory, time limit, GPUs, comment) in `scontrol show job` for the length of a test: `jobs()`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = {"cpus": 16, "mem_mb": 128000, "gpus": 1}


def missing_tools() -> list[str]:
    tools = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol"]
    return [t for t in tools if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "etc/slurm.conf"
        self.munge_socket = self.root / "munge/munge.socket"

    # -- configuration ------------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        for d in ("etc", "munge", "state", "spool", "log", "bin"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o755)  # munged wants its socket directory reachable
        key = self.root / "munge/munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        ctld_port, d_port = _free_ports(2)
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        r = self.root
        self.conf.write_text(f"""\
ClusterName=dhs
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/state/slurmctld.pid
SlurmdPidFile={r}/spool/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
KillWait=5
InactiveLimit=0
GresTypes=gpu
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={NODE['cpus']} RealMemory={NODE['mem_mb']} Gres=gpu:{NODE['gpus']} State=UNKNOWN
PartitionName=cpu Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={self.host} MaxTime=INFINITE State=UP
""")
        # a count-only GPU GRES: no File=, no autodetection (there is no device to detect)
        (self.root / "etc/gres.conf").write_text(f"AutoDetect=off\nNodeName={self.host} Name=gpu Count={NODE['gpus']} File=/dev/null\n")
        # slurmd 22.05 loads a cgroup plugin even when no cgroup is used (task/none, proctrack/linuxproc)
        (self.root / "etc/cgroup.conf").write_text("CgroupPlugin=autodetect\n")

        # snakemake-executor-plugin-slurm-jobstep 0.6.1 starts each rule with a nested `srun` after removing every
        # SLURM_* variable but the job's identity, SLURM_CONF included: on a cluster whose slurm.conf is not at the
        # compiled-in /etc/slurm/slurm.conf (this one, or any site that exports SLURM_CONF) that srun finds no
        # configuration ("srun: fatal: Could not establish a configuration source"). This `srun` on PATH puts it back.
        srun = self.root / "bin/srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {shutil.which("srun") or "/usr/bin/srun"} "$@"\n')
        os.chmod(srun, 0o755)

    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf),
                "PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"log/{name}.out", "ab")
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            start_new_session=True)
        log.close()

    def _wait(self, what: str, ok, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n{self.logs()}")
            if ok():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def start(self) -> "SlurmCluster":
        self._write_config()
        r = self.root
        self._start("munged", [_sbin("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={r}/munge/munge.key", f"--pid-file={r}/munge/munged.pid",
                               f"--seed-file={r}/munge/munged.seed", f"--log-file={r}/log/munged.log"])
        self._wait("munged", self.munge_socket.exists)
        self._start("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0)
        self._start("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        self._wait("an idle node", lambda: set(self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split())
                   == {"idle"})
        return self

    def stop(self) -> None:
        for name in reversed(DAEMONS):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        # job steps (slurmstepd) run in their own sessions: none may outlive the cluster
        for pidfile in (self.root / "spool").rglob("*.pid"):
            pidfile.unlink(missing_ok=True)

    def alive(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is None]

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- client side --------------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, check=check, timeout=60)

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def jobs(self) -> list[dict]:
        """Every job slurmctld knows (all of a test's, MinJobAge keeps them): `scontrol show job -o` parsed, with
        the allocated TRES (cpu, mem, gres/gpu) split out under "tres"."""
        out = self.run("scontrol", "show", "job", "-o", check=False).stdout
        records = []
        for line in out.splitlines():
            if not line.startswith("JobId="):
                continue
            fields = dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", line))
            tres = dict(kv.split("=", 1) for kv in fields.get("TRES", "").split(",") if "=" in kv)
            records.append({**fields, "tres": tres})
        return records

