"""The FedFly image, built with podman on a machine that reaches no image registry.

    python -m scripts.containers check [--arch ARCH]     # can this machine build and run it?
    python -m scripts.containers build [--arch ARCH] [--mirror URL]

``build`` makes, or finds in its caches, three things, and prints the image's tag:

1. **The base**: Debian bookworm ``minbase`` with python3, its venv module and CA
   certificates, made with ``debootstrap`` and turned into an image with ``podman import``
   (``localhost/fedfly-base:bookworm-ARCH``). Kept while that tag exists; debootstrap's
   package cache is kept too, so a base made again downloads nothing.
2. **The wheels**: torch and torchvision (the Dockerfile's pins for ARCH), the other
   dependencies and the build backend, fetched by this host's pip (its index, find-links
   and certificates) for CPython 3.11 on ARCH into ``~/.cache/fedfly/wheels/ARCH``.
3. **The image**: ``docker/Dockerfile`` with ``BASE`` the base above and the wheels folder
   bind-mounted at build time (``WHEELS``), so the build needs no network at all.
   podman's layer cache keeps the torch layer, so a changed source tree rebuilds only the
   small layers after ``COPY``. Tagged ``localhost/fedfly-testbed:ARCH``, and ``:latest``
   for this machine's own architecture (the tag the compose file and the manifests use).

A foreign ARCH (arm64 on an x86_64 host) runs under ``qemu-user-static`` through binfmt_misc;
``check --arch arm64`` says whether that is set up (and, as root, sets it up).

podman reads ``docker/containers.conf`` (runc, cgroupfs, limits within this machine's hard
limits, netavark) unless ``CONTAINERS_CONF`` is already set.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CONTAINERS_CONF = ROOT / "docker" / "containers.conf"
IMAGE = "localhost/fedfly-testbed"
BASE_IMAGE = "localhost/fedfly-base"
SUITE = "bookworm"                  # Debian 12: Python 3.11, as the official python:3.11-slim
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
PYTHON_VERSION = "3.11"             # the base's python3; the wheels are for this CPython
GLIBC_MINOR = 36                    # bookworm's glibc 2.36: the newest manylinux tag it runs
# What the Dockerfile installs beside torch (as setup.cfg asks), and the build backend of
# pyproject.toml, which pip needs to install /app with no index.
REQUIREMENTS = ("numpy", "msgpack>=1.0", "psutil", "cryptography>=41", "setuptools>=64")
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}   # Docker's name -> uname -m and wheel tags

# Limits on the external commands, so that nothing here can hang a caller (the tests).
INFO_TIMEOUT_S = 60
DEBOOTSTRAP_TIMEOUT_S = 3600        # far above a native run; a foreign arch's second stage runs under qemu
PIP_TIMEOUT_S = 1800
BUILD_TIMEOUT_S = 7200              # far above a native build (unpacking torch); much longer under qemu


class ContainerError(RuntimeError):
    """A step of making the image failed; the message says which and how."""


def native_arch() -> str:
    machine = platform.machine()
    for arch, m in MACHINES.items():
        if m == machine:
            return arch
    return machine


def podman_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with CONTAINERS_CONF set to docker/containers.conf
    unless it is set already."""
    env = dict(os.environ if env is None else env)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(*args: str, timeout: float = INFO_TIMEOUT_S, check: bool = True,
           capture: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``podman ARGS`` with :func:`podman_env`; raises ``ContainerError`` on failure if ``check``."""
    try:
        r = subprocess.run(["podman", *args], env=podman_env(), timeout=timeout, text=True,
                           capture_output=capture, **kw)
    except subprocess.TimeoutExpired as exc:
        raise ContainerError(f"podman {' '.join(args[:3])}: no answer within {timeout:.0f} s") from exc
    if check and r.returncode != 0:
        tail = r.stderr.strip()[-2000:] if isinstance(r.stderr, str) else ""
        raise ContainerError(f"podman {' '.join(args[:3])} failed ({r.returncode}): {tail}")
    return r


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


# -- can this machine do it? ----------------------------------------------------------------

def probe(arch: str | None = None) -> str | None:
    """None if podman can build and run ARCH's image here, else why not (and how to fix it)."""
    if sys.platform != "linux":
        return "podman containers need Linux"
    if os.geteuid() != 0:
        return "needs root: rootless podman needs subordinate uid ranges, not set up here"
    missing = [c for c in ("podman", "runc") if shutil.which(c) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed (apt-get install podman runc catatonit netavark "
                f"aardvark-dns iptables podman-compose debootstrap)")
    try:
        r = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}} {{.Host.NetworkBackend}}"],
                           env=podman_env(), capture_output=True, text=True, timeout=INFO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"`podman info` did not answer within {INFO_TIMEOUT_S} s"
    if r.returncode != 0:
        return f"`podman info` failed: {r.stderr.strip()[-500:]}"
    if arch and arch != native_arch():
        return probe_foreign(arch)
    return None


def probe_foreign(arch: str) -> str | None:
    """None if binaries of ARCH run here through qemu-user-static and binfmt_misc. As root,
    mounts binfmt_misc and enables the qemu handler if they are installed but off."""
    machine = MACHINES.get(arch)
    if machine is None:
        return f"unknown architecture {arch!r} (known: {', '.join(MACHINES)})"
    qemu = shutil.which(f"qemu-{machine}-static")
    if qemu is None:
        return f"qemu-{machine}-static not installed (apt-get install qemu-user-static binfmt-support)"
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)], capture_output=True, timeout=30)
    handler = misc / f"qemu-{machine}"
    if not handler.exists() or "enabled" not in handler.read_text():
        if shutil.which("update-binfmts"):
            subprocess.run(["update-binfmts", "--enable", f"qemu-{machine}"], capture_output=True, timeout=30)
    if not handler.exists() or "enabled" not in handler.read_text():
        return f"binfmt_misc has no enabled handler qemu-{machine} (mount binfmt_misc; update-binfmts --enable qemu-{machine})"
    # The F flag makes the kernel open the interpreter now, so it works inside containers too.
    if "flags: " in (text := handler.read_text()) and "F" not in text.split("flags: ", 1)[1].split()[0]:
        return f"binfmt handler qemu-{machine} lacks the F (fix binary) flag: containers cannot use it"
    return None


# -- the three parts ------------------------------------------------------------------------

def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedfly"


def base_tag(arch: str) -> str:
    return f"{BASE_IMAGE}:{SUITE}-{arch}"


def ensure_base(arch: str, *, mirror: str | None = None, log=print) -> str:
    """The base image's tag: made with debootstrap unless it exists."""
    tag = base_tag(arch)
    if image_exists(tag):
        return tag
    if shutil.which("debootstrap") is None:
        raise ContainerError(f"no image {tag} and no debootstrap to make it (apt-get install debootstrap)")
    cache = cache_dir()
    rootfs = cache / f"rootfs-{arch}"
    debs = cache / f"debootstrap-{arch}"
    debs.mkdir(parents=True, exist_ok=True)
    if rootfs.exists():
        shutil.rmtree(rootfs)
    t0 = time.monotonic()
    log(f"base: debootstrap {SUITE} ({arch}) into {rootfs}")
    cmd = ["debootstrap", "--variant=minbase", f"--arch={arch}", f"--include={','.join(BASE_PACKAGES)}",
           f"--cache-dir={debs}", SUITE, str(rootfs)]
    if mirror:
        cmd.append(mirror)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT_S)
        if r.returncode != 0:
            raise ContainerError(f"debootstrap failed ({r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
        # What apt downloaded is in debootstrap's cache, not the image.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (rootfs / sub).glob("*"):
                if f.is_file():
                    f.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        try:
            podman("import", "--arch", arch, "--change", 'CMD ["/bin/bash"]', "-", tag,
                   stdin=tar.stdout, timeout=600, capture=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finally:
            tar.stdout.close()
            tar.wait(timeout=600)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    log(f"base: {tag} in {time.monotonic() - t0:.0f} s")
    return tag


def torch_pins(arch: str) -> list[str]:
    """The torch and torchvision pins the Dockerfile installs on ARCH."""
    pins = dict(re.findall(r'^\s+(\w+)\) torch="([^"]+)"', DOCKERFILE.read_text(), re.M))
    if arch not in pins:
        raise ContainerError(f"docker/Dockerfile pins no torch for {arch}")
    return pins[arch].split()


def platform_tags(arch: str) -> list[str]:
    """Every manylinux tag a bookworm of ARCH runs, newest first (pip download takes only
    the tags it is given, not the older ones they imply)."""
    m = MACHINES[arch]
    tags = [f"manylinux_2_{minor}_{m}" for minor in range(GLIBC_MINOR, 16, -1)] + [f"manylinux2014_{m}"]
    if arch == "amd64":
        tags += [f"manylinux_2_{minor}_{m}" for minor in range(16, 4, -1)]
        tags += [f"manylinux2010_{m}", f"manylinux1_{m}"]
    return tags


def ensure_wheels(arch: str, *, log=print) -> Path:
    """The folder of wheels for ARCH's image (downloaded once; a stamp file names what it holds)."""
    wanted = [*torch_pins(arch), *REQUIREMENTS]
    folder = cache_dir() / "wheels" / arch
    stamp = folder / ".requirements"
    if stamp.exists() and stamp.read_text().split("\n") == wanted:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log(f"wheels: pip download {' '.join(wanted)} for cp{PYTHON_VERSION.replace('.', '')} on {arch}")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(folder), "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp",
           "--abi", f"cp{PYTHON_VERSION.replace('.', '')}", "--abi", "abi3", "--abi", "none"]
    for tag in platform_tags(arch):
        cmd += ["--platform", tag]
    try:
        r = subprocess.run([*cmd, *wanted], capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise ContainerError(f"pip download took longer than {PIP_TIMEOUT_S} s") from exc
    if r.returncode != 0:
        errors = [line for line in r.stderr.splitlines() if "is ignored" not in line]
        raise ContainerError(f"pip download failed ({r.returncode}): {chr(10).join(errors)[-2000:]}")
    stamp.write_text("\n".join(wanted))
    log(f"wheels: {folder} in {time.monotonic() - t0:.0f} s")
    return folder


def image_tag(arch: str) -> str:
    return f"{IMAGE}:{arch}"


def build_image(arch: str | None = None, *, mirror: str | None = None, log=print) -> str:
    """Build (or find in podman's layer cache) ARCH's image; its tag. For this machine's own
    architecture it is tagged ``:latest`` too."""
    arch = arch or native_arch()
    base = ensure_base(arch, mirror=mirror, log=log)
    wheels = ensure_wheels(arch, log=log)
    tag = image_tag(arch)
    before = podman("image", "inspect", tag, "--format", "{{.Id}}", check=False).stdout.strip()
    t0 = time.monotonic()
    log(f"image: podman build {tag} from {base}")
    with open(cache_dir() / f"build-{arch}.log", "w") as out:
        r = podman("build", "-f", str(DOCKERFILE), "-t", tag, "--platform", f"linux/{arch}",
                   "--build-arg", f"TARGETARCH={arch}", "--build-arg", f"BASE={base}",
                   "--build-arg", "WHEELS=/wheels", "--volume", f"{wheels}:/wheels:ro", str(ROOT),
                   timeout=BUILD_TIMEOUT_S, check=False, capture=False, stdout=out, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise ContainerError(f"podman build failed ({r.returncode}); its output: {out.name}\n"
                             + Path(out.name).read_text()[-3000:])
    if arch == native_arch():
        podman("tag", tag, f"{IMAGE}:latest")
    # The image this build replaced, now without a tag (its layers that the new one shares
    # stay); kept if a container still uses it.
    after = podman("image", "inspect", tag, "--format", "{{.Id}}").stdout.strip()
    if before and before != after:
        podman("rmi", before, check=False)
    log(f"image: {tag} in {time.monotonic() - t0:.0f} s")
    return tag


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="containers", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pc = sub.add_parser("check", help="can this machine build and run the image?")
    pb = sub.add_parser("build", help="make the base, the wheels and the image (cached); print the tag")
    for p in (pc, pb):
        p.add_argument("--arch", choices=sorted(MACHINES), default=native_arch(),
                       help="the image's architecture (default: this machine's)")
    pb.add_argument("--mirror", help="the Debian mirror debootstrap uses (default: debootstrap's)")
    args = ap.parse_args(argv)
    reason = probe(args.arch)
    if args.cmd == "check":
        print(reason or f"ok: podman can build and run {args.arch} images here")
        return 1 if reason else 0
    if reason:
        print(f"containers: {reason}", file=sys.stderr)
        return 1
    try:
        tag = build_image(args.arch, mirror=args.mirror, log=lambda m: print(m, file=sys.stderr))
    except ContainerError as exc:
        print(f"containers: {exc}", file=sys.stderr)
        return 1
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
