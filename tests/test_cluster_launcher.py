"""The cluster launcher path for real: ``ray up`` / ``ray submit`` / ``ray down`` of the shipped
cluster.local.yaml over ssh to 127.0.0.1, and the shipped launcher configs' safety settings.

The ssh server is OpenSSH run as this user, one ``sshd -i`` per connection through ssh's
``ProxyCommand`` (nothing listens for ssh). When sshd or rsync is not installed, their Debian
packages are fetched with ``apt-get download`` and unpacked (no root needed) into pytest's cache.
On the "head", ``ray`` is wrapped so that ``ray stop`` (run by ``ray up`` and ``ray down``) ends
only this cluster's processes, never the test suite's own Ray or anyone else's.
"""

from __future__ import annotations

import fcntl
import fnmatch
import getpass
import glob
import hashlib
import inspect
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

import manifests
from manifests.validate import validate
from tests.test_ray_cluster import free_port, is_loopback, listening_addresses

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("cluster.local.yaml", "cluster.example.yaml")
VENV_BIN = Path(sys.executable).parent  # not resolved: a venv's python is a symlink
MARK = "CONTROLFORGE_TEST_CLUSTER"  # set by the test's sshd in every session: Ray inherits it
DEBS = {"sshd": ("openssh-server", "libwrap0"), "rsync": ("rsync", "libpopt0"),
        "ssh": ("openssh-client",), "ssh-keygen": ("openssh-client",)}


# ---------------------------------------------------------------- the shipped configs (quick)

def rsync_sent(source: Path, excludes: list[str], merge_files: list[str]) -> list[Path]:
    """The files rsync would send from ``source`` with Ray's ``--exclude``/``dir-merge`` filters
    (rsync's rules for these patterns: no slash matches a name at any depth, a leading slash
    anchors at the transfer root, a trailing slash matches folders only)."""
    def excluded(rel: str, is_dir: bool, patterns: list[tuple[str, str]]) -> bool:
        for base, pattern in patterns:
            if not rel.startswith(base):
                continue
            if pattern.endswith("/"):
                if not is_dir:
                    continue
                pattern = pattern.rstrip("/")
            sub = rel[len(base):]
            if pattern.startswith("/"):
                if fnmatch.fnmatchcase(sub, pattern[1:]):
                    return True
            elif fnmatch.fnmatchcase(sub.rsplit("/", 1)[-1], pattern):
                return True
        return False

    if source.is_file():
        return [source]
    sent, patterns = [], [("", p) for p in excludes]
    for dirpath, dirnames, filenames in os.walk(source):
        rel_dir = os.path.relpath(dirpath, source)
        base = "" if rel_dir == "." else rel_dir + "/"
        for name in merge_files:  # rsync_filter: per-folder files of exclude rules
            if (Path(dirpath) / name).is_file():
                lines = (Path(dirpath) / name).read_text().splitlines()
                patterns += [(base, ln.strip()) for ln in lines if ln.strip() and not ln.startswith("#")]
        dirnames[:] = [d for d in dirnames if not excluded(base + d, True, patterns)]
        sent += [Path(dirpath, f) for f in filenames if not excluded(base + f, False, patterns)]
    return sent


@pytest.mark.parametrize("name", CONFIGS)
def test_launcher_config_uploads_sources_only_uses_a_token_and_a_loopback_dashboard(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(config))  # Ray's own schema for cluster configs

    # Upload: rsync excludes the venv, data, runs, git and caches; what `ray up` hashes and
    # sends (every file under the local side of file_mounts) is the sources, a few MB.
    assert {".venv", ".git", "__pycache__", "/data/", "/runs/"} <= set(config["rsync_exclude"])
    token_mounts, sent = [], []
    for remote, local in config["file_mounts"].items():
        if local.startswith("~"):
            token_mounts.append(remote)
            continue
        sent += rsync_sent(ROOT / local, config["rsync_exclude"], config["rsync_filter"])
    sent_if_whole_tree = rsync_sent(ROOT, config["rsync_exclude"], config["rsync_filter"])  # mount "."
    for path in sent + sent_if_whole_tree:
        parts = path.relative_to(ROOT).parts
        assert parts[0] not in {".venv", "data", "runs", ".git"}, path
        assert "__pycache__" not in parts and path.suffix != ".pyc", path
    assert {"pipeline", "manifests", "annotators"} <= {p.relative_to(ROOT).parts[0] for p in sent}
    sources = [ROOT / local for local in config["file_mounts"].values() if not local.startswith("~")]
    hashed = sum(p.stat().st_size for s in sources for p in ([s] if s.is_file() else s.rglob("*")) if p.is_file())
    assert hashed < 50e6, f"ray up would read {hashed / 1e6:.0f} MB of file mounts"

    # Token authentication on every node, the token shipped as a file the start commands name.
    starts = {"head": " ".join(config["head_start_ray_commands"])}
    if config.get("worker_start_ray_commands"):
        starts["worker"] = " ".join(config["worker_start_ray_commands"])
    for kind, command in starts.items():
        assert "RAY_AUTH_MODE=token" in command, kind
        path = command.split("RAY_AUTH_TOKEN_PATH=", 1)[1].split()[0].replace("$HOME", "~")
        remote_mounts = {m.replace(f"/home/{config['auth']['ssh_user']}", "~") for m in token_mounts}
        assert path in remote_mounts, f"{kind}: the token file {path} is not in file_mounts"
    head = starts["head"]
    assert "--dashboard-host 127.0.0.1" in head and "0.0.0.0" not in head
    if config["provider"]["type"] == "local":
        assert config["provider"]["head_ip"] == "127.0.0.1" and not config["provider"]["worker_ips"]
        assert "--node-ip-address 127.0.0.1" in head and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in head


# ---------------------------------------------------------------- sshd and rsync for the test

def _apt_download(packages: list[str], dest: Path) -> None:
    """``apt-get download`` into ``dest``; without readable package lists (a fresh image), fetch
    the lists into a private folder first (no root needed)."""
    if shutil.which("apt-get") is None:
        pytest.skip("no sshd/rsync here and no apt-get to fetch Debian's openssh-server and rsync")
    done = subprocess.run(["apt-get", "download", *packages], cwd=dest, capture_output=True, text=True)
    if done.returncode == 0:
        return
    lists, cache = dest / "apt" / "lists", dest / "apt" / "cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    private = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}", "-o", "Debug::NoLocking=1"]
    update = subprocess.run(["apt-get", *private, "update"], capture_output=True, text=True)
    done = subprocess.run(["apt-get", *private, "download", *packages], cwd=dest, capture_output=True, text=True)
    assert done.returncode == 0, f"apt-get download {packages} failed:\n{update.stderr}\n{done.stderr}"


@pytest.fixture(scope="session")
def ssh_tools(request) -> dict:
    """Paths of sshd, ssh, ssh-keygen and rsync, and a bin folder of wrappers that put the
    unpacked ones (with their libraries) on PATH."""
    found = {name: shutil.which(name) for name in DEBS}
    found["sshd"] = found["sshd"] or next((p for p in ("/usr/sbin/sshd",) if os.access(p, os.X_OK)), None)
    missing = sorted({deb for name, debs in DEBS.items() if not found[name] for deb in debs})
    bin_dir = Path(tempfile.mkdtemp(prefix="cf-sshbin-"))
    request.addfinalizer(lambda: shutil.rmtree(bin_dir, ignore_errors=True))
    libs = ""
    if missing:
        cache = (Path(request.config.cache.mkdir("cluster_launcher_debs")) if hasattr(request.config, "cache")
                 else Path(tempfile.gettempdir(), f"controlforge-debs-{os.getuid()}"))  # -p no:cacheprovider
        cache.mkdir(parents=True, exist_ok=True)
        unpacked = cache / "root"
        stamp = cache / ("done-" + "-".join(missing))
        with open(cache / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions sharing the cache unpack once
            if not stamp.exists():
                debs = cache / "debs"
                shutil.rmtree(debs, ignore_errors=True)
                debs.mkdir()
                _apt_download(missing, debs)
                for deb in sorted(debs.glob("*.deb")):
                    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
                stamp.touch()
        libs = ":".join(glob.glob(f"{unpacked}/usr/lib/*-linux-gnu") + glob.glob(f"{unpacked}/lib/*-linux-gnu"))
        for name in DEBS:
            if not found[name]:
                real = unpacked / ("usr/sbin" if name == "sshd" else "usr/bin") / name
                wrapper = bin_dir / name
                wrapper.write_text(f"#!/bin/sh\nLD_LIBRARY_PATH={libs} exec {real} \"$@\"\n")
                wrapper.chmod(0o755)
                found[name] = str(wrapper)
    return {**found, "bin": str(bin_dir)}


def cluster_processes(mark: str, temp_dir: str, spare: frozenset = frozenset()) -> list:
    """This cluster's processes: every process started from its ssh sessions (they carry the
    marker variable) or naming its Ray temp dir, and their children; never those in ``spare``."""
    import psutil

    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid in spare:
            continue
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or []) or proc.environ().get(
                    "CONTROLFORGE_TEST_CLUSTER") == mark:
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    found = {p.pid: p for p in roots}
    for proc in roots:
        try:
            found.update({c.pid: c for c in proc.children(recursive=True) if c.pid not in spare})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def launcher_processes(control_dir: Path, sshd_log: Path) -> list:
    """The launcher side's lingering processes: ssh's shared connections (ControlPersist) and
    the ``sshd -i`` behind each. Both retitle themselves (which also overwrites their environment):
    the masters are named after their socket, the sshd processes hold the log file open."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(control_dir) in a for a in proc.info["cmdline"] or []) or any(
                    f.path == str(sshd_log) for f in proc.open_files()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def stop_processes(procs: list, grace: float = 10) -> None:
    import psutil

    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


# `ray stop` on the test's head: this cluster's processes only, never the session running it.
RAY_STOP = f"""import sys
{inspect.getsource(cluster_processes)}
{inspect.getsource(stop_processes)}
import psutil
me = psutil.Process()
spare = frozenset([me.pid] + [p.pid for p in me.parents()])
victims = cluster_processes(sys.argv[1], sys.argv[2], spare)
stop_processes(victims)
print(f"ray stop (test wrapper): stopped {{len(victims)}} processes of this cluster")
"""


def private_sshd(tools: dict, home: Path, head_home: Path, work: Path, mark: str, temp_dir: str) -> str:
    """Keys, an sshd config and the ProxyCommand that runs ``sshd -i`` for one connection; the
    sessions get ``head_home`` as HOME, PATH with the wrappers, this venv and rsync, and ``mark``."""
    user = getpass.getuser()
    for key in (home / ".ssh" / "id_ed25519", work / "host_key"):
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    shutil.copy(home / ".ssh" / "id_ed25519.pub", work / "authorized_keys")

    head_bin = head_home / "bin"
    head_bin.mkdir(parents=True)
    (work / "ray_stop.py").write_text(RAY_STOP)
    (head_bin / "ray").write_text(
        "#!/bin/sh\n# test double: `ray stop` ends this cluster's processes only\n"
        f'if [ "$1" = stop ]; then exec {sys.executable} {work / "ray_stop.py"} {mark} {temp_dir}; fi\n'
        f'exec {VENV_BIN / "ray"} "$@"\n')
    (head_bin / "ray").chmod(0o755)
    path = f"{head_bin}:{VENV_BIN}:{tools['bin']}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    # The node's own login environment ("provisioning"): this checkout's venv first on PATH.
    (head_home / ".bashrc").write_text(f"export PATH={path}\nunset PYTHONDONTWRITEBYTECODE\n")

    (work / "sshd_config").write_text("\n".join([
        "ListenAddress 127.0.0.1", f"HostKey {work / 'host_key'}",
        f"AuthorizedKeysFile {work / 'authorized_keys'}", f"AllowUsers {user}",
        "PidFile none", "UsePAM no", "StrictModes no", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "PrintMotd no", "X11Forwarding no",
        f'SetEnv "HOME={head_home}" "PATH={path}" "TMPDIR={temp_dir}" "{MARK}={mark}"', ""]))
    sshd = [tools["sshd"], "-i", "-f", str(work / "sshd_config"), "-E", str(work / "sshd.log")]
    if os.geteuid() == 0:
        # As root sshd insists on its privilege-separation user and /run/sshd: give it both in
        # a private mount namespace (a passwd copy with `sshd`, this user's home = head_home).
        passwd = []
        for line in Path("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user:
                fields[5] = str(head_home)
            if fields[0] != "sshd":
                passwd.append(":".join(fields))
        passwd.append("sshd:x:65534:65534:sshd privsep:/run/sshd:/usr/sbin/nologin")
        (work / "passwd").write_text("\n".join(passwd) + "\n")
        inner = ('mount --bind "$0" /etc/passwd && mount -t tmpfs -o mode=755 tmpfs /run && '
                 'mkdir /run/sshd && exec "$@"')
        sshd = ["unshare", "-m", "sh", "-c", inner, str(work / "passwd"), *sshd]
    proxy = work / "proxy"
    proxy.write_text("#!/bin/sh\nexec " + shlex.join(sshd) + "\n")
    proxy.chmod(0o755)
    return str(proxy)


# ---------------------------------------------------------------- ray up / submit / down

def launcher(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``ray ARGS`` from the repository root; past ``timeout`` a failed result with its output."""
    cmd = [str(VENV_BIN / "ray"), *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else b or ""  # noqa: E731
        return subprocess.CompletedProcess(cmd, -9, text(e.stdout), text(e.stderr) + f"\n(timed out after {timeout} s)")


def tail(done: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"rc={done.returncode}\n--- stdout\n{done.stdout[-n:]}\n--- stderr\n{done.stderr[-n:]}"


def is_ray_daemon(proc: psutil.Process) -> bool:
    """Whether ``proc`` is a Ray GCS server or raylet (a worker may exit at any time)."""
    try:
        return any(name in " ".join(proc.cmdline()) for name in ("gcs_server", "raylet"))
    except psutil.Error:
        return False


def http_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.cluster
def test_ray_up_submit_down_of_the_shipped_local_cluster(ssh_tools, local_ray, demo_collection, tmp_path):
    """The shipped cluster.local.yaml, changed only where this test must (its own sshd, ports,
    cluster name and temp dir): ``ray up`` starts a token-auth head on 127.0.0.1, ``ray submit``
    runs the annotation job from the mounted copy, ``ray down`` leaves nothing running and the
    suite's own Ray untouched."""
    import ray

    from pipeline import ray_runtime

    # The suite's Ray daemons (not its workers: Ray reaps idle workers whenever it likes).
    suite_ray = [p for p in psutil.Process().children(recursive=True) if is_ray_daemon(p)]
    assert suite_ray, "the suite's local Ray should be running"
    mark = uuid.uuid4().hex
    temp_dir = tempfile.mkdtemp(prefix="raycl", dir="/tmp")  # short: Ray's socket paths are capped
    home, head_home, work = tmp_path / "laptop", tmp_path / "head", tmp_path / "sshd"
    work.mkdir()
    proxy = private_sshd(ssh_tools, home, head_home, work, mark, temp_dir)
    token = secrets.token_hex(32)
    (home / ".controlforge").mkdir(parents=True)
    (home / ".controlforge" / "ray_token").write_text(token)

    config = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
    name = f"cf-test-{mark[:8]}"
    gcs, dashboard = free_port(), free_port()
    config["cluster_name"] = name
    # ssh itself reads `-i ~/...` from the passwd home, not $HOME: the key by its full path.
    key = home / ".ssh" / "id_ed25519"
    config["auth"].update(ssh_user=getpass.getuser(), ssh_private_key=str(key), ssh_proxy_command=proxy)
    # Ports of its own (the suite's local Ray holds Ray's defaults) and its own temp dir.
    ports = {"--port": gcs, "--dashboard-port": dashboard, **{flag: free_port() for flag in (
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
        "--metrics-export-port", "--ray-client-server-port")}}
    extra = " ".join(f"{flag} {port}" for flag, port in ports.items()) + f" --temp-dir {temp_dir}"
    starts = config["head_start_ray_commands"]
    assert sum("ray start --head" in c for c in starts) == 1
    config["head_start_ray_commands"] = [f"{c} {extra}" if "ray start --head" in c else c for c in starts]
    setup = config["setup_commands"]
    assert sum("RAY_ADDRESS=127.0.0.1:6379" in c for c in setup) == 1  # the driver joins this head
    config["setup_commands"] = [c.replace("127.0.0.1:6379", f"127.0.0.1:{gcs}") for c in setup]
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(config))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", MARK)}
    # TMPDIR: the launcher's cluster state and config caches go to this cluster's temp dir too.
    env.update(HOME=str(home), PATH=f"{ssh_tools['bin']}:{VENV_BIN}:{env['PATH']}", TMPDIR=temp_dir,
               RAY_USAGE_STATS_ENABLED="0")
    mount = head_home / "controlforge-head"
    try:
        # One session as Ray opens them (with a pty: Ray's login shells need one), failing fast.
        reach = subprocess.run(
            [ssh_tools["ssh"], "-tt", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", f"ProxyCommand={proxy}",
             f"{getpass.getuser()}@127.0.0.1", "echo $HOME"], env=env, capture_output=True, text=True, timeout=60)
        log = (work / "sshd.log").read_text() if (work / "sshd.log").exists() else ""
        if reach.returncode != 0 and os.geteuid() != 0 and "chown(/dev/pts" in log:
            pytest.skip("sshd run as this (non-root) user cannot hand it a pty here (/dev/pts is mounted "
                        "without gid=5), and Ray's launcher opens every session with a pty")
        assert reach.stdout.strip() == str(head_home), tail(reach) + "\n--- sshd.log\n" + log[-2000:]
        started = time.monotonic()
        up = launcher(["up", "-y", "--no-config-cache", str(config_file)], env, timeout=240)
        log = (work / "sshd.log").read_text() if (work / "sshd.log").exists() else ""
        assert up.returncode == 0, tail(up) + "\n--- sshd.log\n" + log[-2000:]
        assert f"controlforge from {mount.resolve()}" in up.stdout + up.stderr, tail(up)
        assert {p.name for p in mount.iterdir()} == {"annotators", "manifests", "pipeline", "train"}
        compiled = mount / "pipeline" / "__pycache__" / Path(ray_runtime.__cached__).name
        assert not compiled.exists()  # rsync left the checkout's caches out
        up_s = time.monotonic() - started

        out = tmp_path / "manifest"
        submit_started = time.time()
        submit = launcher(["submit", "--no-config-cache", str(config_file), "pipeline/annotate.py", "--",
                           "--address", "auto", "--input", str(demo_collection), "--output", str(out),
                           "--shard-size", "8"], env, timeout=300)
        assert submit.returncode == 0, tail(submit)
        assert "18 ok" in submit.stdout, tail(submit)
        assert validate(str(out), progress=False) == []
        summary = manifests.read_manifest_json(str(out))
        assert summary["run"]["ray"]["mode"] == "cluster" and summary["counts"]["rows"] == 20
        # The driver imported the mounted copy, not this checkout (whose __pycache__ exists).
        assert compiled.exists() and compiled.stat().st_mtime >= submit_started - 1

        # Every listening socket of the cluster is on 127.0.0.1.
        procs = cluster_processes(mark, temp_dir)
        sockets = listening_addresses({p.pid for p in procs})
        assert len(sockets) >= 3, f"expected the GCS, raylet and dashboard to listen; saw {sockets}"
        exposed = [s for s in sockets if not is_loopback(s[0])]
        assert not exposed, f"the cluster listens beyond loopback: {exposed}"
        assert ("127.0.0.1", dashboard) in {(ip, port) for ip, port, _ in sockets}

        # Token authentication: the job API refuses a client without the token.
        jobs = f"http://127.0.0.1:{dashboard}/api/jobs/"
        assert http_status(jobs, None) == 401
        assert http_status(jobs, "not-the-token") == 403
        assert http_status(jobs, token) == 200
        no_token = {**env, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)}
        refused = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
             "--no-wait", "--", "echo", "hi"], env=no_token, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "Unauthorized" in refused.stdout + refused.stderr, tail(refused)

        down = launcher(["down", "-y", str(config_file)], env, timeout=120)
        assert down.returncode == 0, tail(down)
        assert "stopped" in down.stdout + down.stderr, tail(down)  # our `ray stop` ran on the head
        deadline = time.monotonic() + 20
        while (left := cluster_processes(mark, temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, [(p.pid, p.cmdline()) for p in left if p.is_running()]
        # `ray down` ran `ray stop`, which did not touch the test suite's local Ray.
        assert all(p.is_running() for p in suite_ray)
        assert ray.get(ray.remote(lambda: 41).remote(), timeout=120) + 1 == 42
        print(f"ray up {up_s:.0f} s, whole test {time.monotonic() - started:.0f} s")
    finally:
        stop_processes(cluster_processes(mark, temp_dir))
        # Ray's ssh sockets for this cluster (as Ray names them) and the connections behind them.
        control = Path("/tmp") / f"ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}"
        sockets_dir = control / hashlib.sha256(name.encode()).hexdigest()[:10]
        stop_processes(launcher_processes(sockets_dir, work / "sshd.log"))
        shutil.rmtree(sockets_dir, ignore_errors=True)
        try:
            control.rmdir()  # Ray's ssh sockets folder of this user, if no other cluster uses it
        except OSError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)
