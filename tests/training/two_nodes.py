"""Two "nodes" on one machine for the multi-node launch test: a private sshd on 127.0.0.1 and 127.0.0.2, and pdsh.

Everything lives in one folder: host and client keys, ``sshd_config``, an ssh client config with the host keys
pinned, the hostfile and DeepSpeed's environment file (``DS_ENV_FILE``). ``sshd`` and ``pdsh`` are the
system's when installed. Otherwise their Debian packages are fetched with ``apt-get download`` (apt's cache, and
its lists when the system has none, redirected into the folder) and unpacked there with ``dpkg-deb -x``;
nothing is installed. As root, sshd wants its privilege-separation user and ``/run/sshd``, and pdsh loads
modules only from its compiled-in folder: such a process then runs in a private mount namespace (``unshare
--mount``) where an overlay adds what is missing, seen by that process and its children only. Where none of
this is possible the test is skipped with one line saying why.

Every process started through the harness, on either "node", carries ``MVPTR_TEST_NODES=<folder>`` in its
environment (DeepSpeed exports the env file to every node); :meth:`Nodes.stop` kills each of them by pid, then
sshd.
"""
from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import psutil
import pytest

from conftest import REPO, clean_env, free_port

ADDRESSES = ("127.0.0.1", "127.0.0.2")
MARK = "MVPTR_TEST_NODES"
SSHD_PACKAGES = ("openssh-server", "libwrap0")
PDSH_PACKAGES = ("pdsh", "libgenders0")


class Unavailable(Exception):
    """The machine cannot provide sshd or pdsh; the message is the skip reason."""


def _run(cmd, timeout=180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def fetch_packages(folder: Path, packages) -> Path:
    """Download ``packages`` (Debian) into ``folder/debs`` and unpack them into ``folder/root``; returns the root."""
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if not apt or not dpkg:
        raise Unavailable("sshd/pdsh not installed, and no apt-get/dpkg-deb to fetch them")
    debs, cache = folder / "debs", folder / "apt-cache"
    debs.mkdir(parents=True, exist_ok=True)
    (cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    opts = ["-q", "-o", f"Dir::Cache={cache}", "-o", "Debug::NoLocking=1"]
    if os.geteuid() == 0:
        opts += ["-o", "APT::Sandbox::User=root"]        # apt's _apt user cannot write into a private folder

    def download(options) -> Optional[subprocess.CompletedProcess]:
        for name in packages:
            if not list(debs.glob(f"{name}_*.deb")):
                proc = _run([apt, *options, "download", name], cwd=debs)
                if proc.returncode and name == packages[0]:
                    return proc
        return None

    failed = download(opts)
    if failed is not None:                                # no usable lists on the system: private ones
        lists = folder / "apt-lists"
        (lists / "partial").mkdir(parents=True, exist_ok=True)
        opts += ["-o", f"Dir::State::Lists={lists}"]
        update = _run([apt, *opts, "update"])
        if update.returncode:
            raise Unavailable(f"sshd/pdsh not installed and apt-get could not reach a mirror: {_last_line(update)}")
        failed = download(opts)
        if failed is not None:
            raise Unavailable(f"sshd/pdsh not installed and apt-get could not fetch {packages[0]}: "
                              f"{_last_line(failed)}")
    root = folder / "root"
    for deb in sorted(debs.glob("*.deb")):
        proc = _run([dpkg, "-x", deb, root])
        if proc.returncode:
            raise Unavailable(f"dpkg-deb could not unpack {deb.name}: {_last_line(proc)}")
    return root


def _lib_path(root: Path) -> str:
    return ":".join(sorted(glob.glob(str(root / "usr" / "lib" / "*-linux-gnu"))) + [str(root / "usr" / "lib")])


def _namespaced(mounts: List[str], argv: List[str]) -> List[str]:
    """``argv`` in a private mount namespace, after the shell commands ``mounts`` (root only)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", " && ".join(mounts + ['exec "$@"']),
            "sh"] + [str(a) for a in argv]


def _overlay(lower: str, upper: Path, work: Path) -> str:
    """Mount ``upper``'s entries over ``lower`` (both visible), without writing /etc/mtab or /run/mount."""
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    return f"mount -n -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} {lower}"


class Nodes:
    """A running private sshd and the files a launch needs (``start`` builds it)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.port = free_port()
        self.sshd: Optional[subprocess.Popen] = None
        self.path = os.environ.get("PATH", "")           # with a folder holding the pdsh to use first
        self.ssh_config = folder / "ssh_config"
        self.hostfile = folder / "hostfile"
        self.env_file = folder / "ds_env"

    # ------------------------------------------------------------------------------------------ setup
    def _sshd_command(self) -> List[str]:
        root = os.geteuid() == 0
        system = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if os.access(p, os.X_OK)), None)
        env_prefix: List[str] = []
        if system is None:
            pkg = fetch_packages(self.folder / "sshd", SSHD_PACKAGES)
            system = str(pkg / "usr" / "sbin" / "sshd")
            env_prefix = ["env", f"LD_LIBRARY_PATH={_lib_path(pkg)}"]
        argv = env_prefix + [system, "-D", "-e", "-f", str(self.folder / "sshd_config")]
        if not root:
            return argv                                   # an unprivileged sshd needs neither
        mounts = []
        if not os.path.isdir("/run/sshd"):
            run_upper = self.folder / "ns" / "run"
            (run_upper / "sshd").mkdir(parents=True, exist_ok=True)
            os.chmod(run_upper / "sshd", 0o755)
            mounts.append(_overlay("/run", run_upper, self.folder / "ns" / "run_work"))
        try:
            pwd.getpwnam("sshd")
        except KeyError:
            passwd = self.folder / "ns" / "passwd"
            passwd.parent.mkdir(parents=True, exist_ok=True)
            passwd.write_text(Path("/etc/passwd").read_text().rstrip("\n")
                              + "\nsshd:x:65534:65534:privilege separation:/run/sshd:/usr/sbin/nologin\n")
            mounts.append(f"mount -n --bind {passwd} /etc/passwd")
        return _namespaced(mounts, argv) if mounts else argv

    def _pdsh_on_path(self) -> None:
        if shutil.which("pdsh"):
            return
        pkg = fetch_packages(self.folder / "pdsh", PDSH_PACKAGES)
        modules = sorted(glob.glob(str(pkg / "usr" / "lib" / "*" / "pdsh")))
        if not modules:
            raise Unavailable("the pdsh package holds no module folder")
        real = self.folder / "libexec" / "pdsh"          # pdsh checks its own name
        real.parent.mkdir(parents=True, exist_ok=True)
        real.symlink_to(pkg / "usr" / "bin" / "pdsh.bin")
        argv = ["env", f"LD_LIBRARY_PATH={_lib_path(pkg)}", str(real)]
        if os.geteuid() == 0:                             # root: modules only from the compiled-in folder
            compiled = "/" + os.path.relpath(modules[0], pkg)          # /usr/lib/<triplet>/pdsh
            shutil.copytree(modules[0], self.folder / "ns" / "lib" / "pdsh")
            argv = _namespaced([_overlay(os.path.dirname(compiled), self.folder / "ns" / "lib",
                                         self.folder / "ns" / "lib_work")], argv)
        else:
            argv.insert(2, f"PDSH_MODULE_DIR={modules[0]}")
        wrapper = self.folder / "bin" / "pdsh"
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.join(argv)} "$@"\n')
        wrapper.chmod(0o755)
        self.path = f"{wrapper.parent}:{self.path}"

    def _keys_and_configs(self) -> None:
        f = self.folder
        for name in ("host_key", "client_key"):
            proc = _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f / name])
            assert proc.returncode == 0, proc.stderr
        (f / "authorized_keys").write_text((f / "client_key.pub").read_text())
        host_key = (f / "host_key.pub").read_text().split()[:2]
        (f / "known_hosts").write_text("".join(f"[{a}]:{self.port} {' '.join(host_key)}\n" for a in ADDRESSES))
        (f / "sshd_config").write_text("\n".join(
            [f"ListenAddress {a}:{self.port}" for a in ADDRESSES] +
            [f"HostKey {f / 'host_key'}", "PidFile none", f"AuthorizedKeysFile {f / 'authorized_keys'}",
             "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
             "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no", "PrintMotd no", ""]))
        self.ssh_config.write_text("\n".join([
            f"Host {' '.join(ADDRESSES)}", f"  Port {self.port}", f"  User {self.user}",
            f"  IdentityFile {f / 'client_key'}", "  IdentitiesOnly yes", f"  UserKnownHostsFile {f / 'known_hosts'}",
            "  StrictHostKeyChecking yes", "  BatchMode yes", "  LogLevel ERROR", ""]))
        self.hostfile.write_text("".join(f"{a} slots=1\n" for a in ADDRESSES))
        env = {MARK: str(f), "PATH": self.path, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "WANDB_MODE": "offline"}
        for key in ("TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR", "HOME"):
            if os.environ.get(key):
                env[key] = os.environ[key]
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))

    # ------------------------------------------------------------------------------------------ use
    def ssh(self, address: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return _run(["ssh", "-F", self.ssh_config, address, command], timeout=timeout)

    def launch(self, args: List[str], log: Path) -> subprocess.Popen:
        """``deepspeed --hostfile H --launcher pdsh --no_ssh_check ... mvptr_ds/run.py ARGS`` (output to ``log``)."""
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(self.hostfile),
               "--launcher", "pdsh", "--no_ssh_check", "--master_addr", ADDRESSES[0],
               "--master_port", str(free_port()), str(REPO / "mvptr_ds" / "run.py")] + list(args)
        env = clean_env(**{MARK: str(self.folder), "PATH": self.path, "DS_ENV_FILE": str(self.env_file),
                           "PDSH_SSH_ARGS_APPEND": f"-F {self.ssh_config}"})
        with open(log, "w") as out:
            return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def marked(self) -> List[int]:
        """Pids of the processes started through the harness (their environment carries the mark)."""
        want = f"{MARK}={self.folder}"
        pids = []
        for p in psutil.process_iter(["pid"]):
            if p.pid == os.getpid() or (self.sshd is not None and p.pid == self.sshd.pid):
                continue
            try:
                with open(f"/proc/{p.pid}/environ", "rb") as f:
                    if want.encode() in f.read().split(b"\0"):
                        pids.append(p.pid)
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        """Kill every marked process by pid, then sshd."""
        for pid in self.marked():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.terminate()
            try:
                self.sshd.wait(10)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait()


def start(folder: Path) -> Nodes:
    """Keys, configs and a private sshd on both addresses (skips the test with a reason where impossible)."""
    if not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.skip("no ssh client (openssh-client) on this machine")
    if os.geteuid() == 0 and _run(["unshare", "--mount", "--propagation", "private", "true"]).returncode:
        pytest.skip("running as root without the right to make a private mount namespace (unshare --mount)")
    nodes = Nodes(folder)
    try:
        command = nodes._sshd_command()
        nodes._pdsh_on_path()
    except (Unavailable, subprocess.TimeoutExpired) as e:
        pytest.skip(str(e) if isinstance(e, Unavailable) else f"fetching sshd/pdsh timed out ({e})")
    nodes._keys_and_configs()
    log = open(folder / "sshd.log", "w")
    nodes.sshd = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, MARK: str(folder)})
    deadline = time.time() + 30
    try:
        for address in ADDRESSES:
            while nodes.ssh(address, "true", timeout=10).returncode != 0:
                assert nodes.sshd.poll() is None and time.time() < deadline, \
                    f"private sshd did not accept {address}: {(folder / 'sshd.log').read_text()[-2000:]}"
                time.sleep(0.2)
    except BaseException:
        nodes.stop()
        raise
    return nodes
