"""A VGG-5 device's memory on aarch64, under qemu (issue 25 item 2, indicative):
``python -m scripts.bench_memory_arm64 [--samples N] [--rounds R] [--malloc M]``.

Needs the arm64 image (``python -m scripts.containers build --arch arm64``) and a
qemu-aarch64 binfmt handler. The central and one edge run on this machine (its torch);
the device runs in the arm64 image (its torch, the one a Pi gets), TLS, with
``scripts.memprobe`` installed by a ``sitecustomize`` as in ``bench_memory.device_probe``.
Beside it, two arm64 containers that only ``import torch`` and sleep: the baseline, and a
partner that keeps libtorch's file pages shared while the baseline is read.

Under qemu user-mode the process this machine sees is qemu running the guest: its
``/proc/PID/smaps_rollup`` holds the guest's memory and qemu's own (translated code, its
heap). The guest reads ``/proc/self/smaps_rollup`` through to the host's file (qemu emulates
``maps``, not that one), so the probe's figures include qemu too. To split them, each
emulated process writes its own ``/proc/self/maps`` (which qemu does emulate: the guest's
mappings only) and this script sums the host's private pages inside and outside those
ranges. The same ``import torch`` natively on this machine is printed for comparison
(another torch build: not qemu's cost alone).

The device's figures are given as USS and as anonymous memory: no other process maps the
image's shared libraries, so the pages of them only the device touches count as its
private memory here, where in a testbed on one machine they are shared with the edges'
(``bench_memory``'s figures). ``--arch amd64`` runs the same with this machine's image
(no qemu: a reference for the method).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts import bench_memory, benchlib, containers
from scripts.smaps import rollup

NAME = "ffmemarm64"
# After import torch (and, in the device, after the last round): the guest's own maps
# and the host's smaps_rollup as the guest reads it, then wait for the host's read.
TORCH_ONLY = r"""import json, os, sys, time
import torch
from scripts.smaps import rollup
out = sys.argv[1]
with open(out + ".tmp", "w") as f:
    json.dump({"maps": open("/proc/self/maps").read(), "inside": rollup(), "torch": torch.__version__}, f)
os.replace(out + ".tmp", out)
time.sleep(1e6)
"""
SITECUSTOMIZE = bench_memory.SITECUSTOMIZE + """        import time, device.client
        _fin = device.client.DeviceClient._finish
        def _finish(self, rnd):
            out = _fin(self, rnd)
            if rnd.round == self.cfg.training.rounds - 1:
                path = os.environ["MEMPROBE_OUT"] + ".maps"
                with open(path + ".tmp", "w") as f:
                    f.write(open("/proc/self/maps").read())
                os.replace(path + ".tmp", path)
                for _ in range(100):  # the host reads its smaps meanwhile
                    if os.path.exists(path + ".read"):
                        break
                    time.sleep(0.1)
            return out
        device.client.DeviceClient._finish = _finish
"""


def podman(*args: str, timeout: float = 120) -> str:
    return containers.podman(*args, timeout=timeout).stdout.strip()


def qemu_split(pid: int, guest_maps: str) -> dict[str, float]:
    """MiB of host process ``pid``: private in the guest's mappings (``guest``; of it
    anonymous, ``guest anon``) and private outside them (``qemu``, qemu's own)."""
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in guest_maps.splitlines() if line]
    kb = {"guest": 0, "guest anon": 0, "qemu": 0}
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":") and "-" in parts[0]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                inside = any(a < hi and lo < b for a, b in ranges)
            elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
                kb["guest" if inside else "qemu"] += int(parts[1])
            elif parts[0] == "Anonymous:" and inside:
                kb["guest anon"] += int(parts[1])
    return {k: v / 1024 for k, v in kb.items()}


def wait_for(path: Path, what: str, timeout: float, alive=None) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout or (alive and not alive()):
            raise RuntimeError(f"{what}: nothing at {path} after {time.monotonic() - t0:.0f} s")
        time.sleep(0.2)


def run_container(name: str, image: str, out: Path, argv: list[str], env: dict[str, str], cpu: str = "") -> int:
    """Start ``argv`` in ``image`` (root inside: the key files are this user's), on the host
    network, ``out`` mounted at the same path; the host PID of its process."""
    envs = [x for k, v in {**env, **({"QEMU_CPU": cpu} if cpu else {})}.items() for x in ("--env", f"{k}={v}")]
    podman("run", "-d", "--name", name, "--network", "host", "--user", "0:0", "--workdir", "/app",
           "--volume", f"{out}:{out}", *envs, image, *argv)
    return int(podman("inspect", name, "--format", "{{.State.Pid}}"))


def torch_only(out: Path, image: str, tag: str, cpu: str) -> dict[str, Any]:
    path = out / f"torch-{tag}.json"
    path.unlink(missing_ok=True)
    pid = run_container(f"{NAME}-{tag}", image, out, ["python", "-c", TORCH_ONLY, str(path)], {}, cpu)
    return {"pid": pid, "path": path}


def native_torch(out: Path) -> dict[str, float]:
    """``import torch`` on this machine, beside a partner (shared file pages): USS MiB."""
    procs = [subprocess.Popen([sys.executable, "-c", TORCH_ONLY, str(out / f"native-{i}.json")], cwd=benchlib.ROOT,
                              env=benchlib._env()) for i in range(2)]
    try:
        for i, p in enumerate(procs):
            wait_for(out / f"native-{i}.json", "native import torch", 300, lambda p=p: p.poll() is None)
        return {**rollup(procs[0].pid), "torch": json.loads((out / "native-0.json").read_text())["torch"]}
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run(out: Path, samples: int, rounds: int, malloc: str, arch: str = "arm64", cpu: str = "") -> dict[str, Any]:
    image = containers.image_tag(arch)
    if not containers.image_exists(image):
        raise SystemExit(f"no {image}: python -m scripts.containers build --arch {arch}")
    out.mkdir(parents=True, exist_ok=True)
    site = out / "memprobe"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    probe = out / "memprobe.json"
    for p in (probe, Path(f"{probe}.maps"), Path(f"{probe}.maps.read")):
        p.unlink(missing_ok=True)
    cfg = benchlib.write_config(out, f"arm64-{time.strftime('%H%M%S')}", edges=1, devices=1, rounds=rounds,
                                samples_per_device=samples, extra={
                                    "training": {"malloc": malloc},
                                    "security": {"mode": "tls", "certs": str(out / "certs")},
                                    # emulation is 10-50x slower: room for late heartbeats
                                    "faults": {"heartbeat_s": 2.0, "dead_after_s": 60.0, "device_grace_s": 120.0}})
    env = benchlib._env()
    subprocess.run([sys.executable, "-m", "scripts.certs", "--config", str(cfg)], cwd=benchlib.ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    result: dict[str, Any] = {"arch": arch, "qemu cpu": cpu or "qemu's default", "samples": samples, "rounds": rounds,
                              "malloc": malloc,
                              "native": native_torch(out)}
    roles, names = [], []
    try:
        base, partner = torch_only(out, image, "base", cpu), torch_only(out, image, "partner", cpu)
        names += [f"{NAME}-base", f"{NAME}-partner"]
        for t in (base, partner):
            wait_for(t["path"], "arm64 import torch", 1200)
        for name in ("central", "edge"):
            cmd = [sys.executable, "-m", name, "--config", str(cfg)] + (["--name", "edge1"] if name == "edge" else [])
            log = open(out / f"{name}.log", "w")
            roles.append(subprocess.Popen(cmd, cwd=benchlib.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        pid = run_container(f"{NAME}-device", image, out, ["python", "-m", "device", "--config", str(cfg),
                                                           "--name", "device1"],
                            {"PYTHONPATH": f"{site}:/app", "MEMPROBE_OUT": str(probe), "PYTHONUNBUFFERED": "1"}, cpu)
        names.append(f"{NAME}-device")
        sampled, split = [], None
        maps = Path(f"{probe}.maps")
        while roles[0].poll() is None:
            try:
                sampled.append(rollup(pid)["uss"])
                if split is None and maps.exists():
                    split = qemu_split(pid, maps.read_text())
                    Path(f"{probe}.maps.read").touch()
            except OSError:
                break
            time.sleep(0.25)
        roles[0].wait(timeout=600)
        result["central status"] = roles[0].returncode
        result["device status"] = int(podman("wait", f"{NAME}-device", timeout=600))
        b = json.loads(base["path"].read_text())
        result["torch"] = {**rollup(base["pid"]), "inside": b["inside"], "version": b["torch"],
                           "split": qemu_split(base["pid"], b["maps"])}
        result["device"] = {"probe": json.loads(probe.read_text()) if probe.exists() else {},
                            "host samples max": max(sampled, default=0.0), "split": split}
    finally:
        for p in roles:
            if p.poll() is None:
                benchlib.kill_tree(p.pid)
            p.wait()
        for n in names:
            logs = containers.podman("logs", n, check=False, timeout=120)
            (out / f"{n}.log").write_text(logs.stdout + logs.stderr)
            containers.podman("rm", "-f", "-t", "0", n, check=False, timeout=120)
    return result


def report(r: dict[str, Any]) -> str:
    t, p = r["torch"], r["device"]["probe"]
    base, anon = t["uss"], t["anon"]
    lines = [f"{r['arch']} image (qemu cpu: {r['qemu cpu']}), torch {t['version']}, malloc {r['malloc']}, "
             f"{r['rounds']} rounds of {r['samples']} samples, batch {bench_memory.BATCH}; central status "
             f"{r['central status']}, device status {r['device status']}",
             f"(a) import torch in the image: USS {base:.1f} MiB, anonymous {anon:.1f} (read inside: USS "
             f"{t['inside']['uss']:.1f}); in the guest's mappings {t['split']['guest']:.1f}, outside them (qemu's "
             f"own) {t['split']['qemu']:.1f}",
             f"    import torch on this machine ({r['native']['torch']}): USS {r['native']['uss']:.1f} MiB, "
             f"anonymous {r['native']['anon']:.1f}"]
    steps = p.get("steps", [])
    if "last round delivered" in p.get("stages", {}):
        last = p["stages"]["last round delivered"]
        for what, key, ref in (("USS", "uss", base), ("anonymous", "anon", anon)):
            peaks = [s[key] + rise - ref for s, rise in zip(steps, p["step_peak_rss"])]
            lines.append(f"(b) device above (a), {what} MiB: between steps {last[key] - ref:.1f}; a step's peak: first "
                         f"{peaks[0]:.1f}, after the first median {statistics.median(peaks[1:]):.1f}, largest "
                         f"{max(peaks[1:]):.1f}")
        lines.append(f"    host samples' largest USS {r['device']['host samples max'] - base:.1f} above (a); "
                     f"malloc_trim(0) frees {last['uss'] - p['stages']['after malloc_trim(0)']['uss']:.1f}; data "
                     f"shard {p['data_mb']:.1f}; {len(steps)} steps; stages (USS above (a)): " + ", ".join(
                         f"{k} {v['uss'] - base:+.1f}" for k, v in p["stages"].items()))
    if r["device"]["split"]:
        s, a = r["device"]["split"], t["split"]
        lines.append(f"    after the last round: in the guest's mappings {s['guest']:.1f} "
                     f"({s['guest'] - a['guest']:+.1f} over (a); anonymous {s['guest anon'] - a['guest anon']:+.1f}), "
                     f"qemu's own {s['qemu']:.1f} ({s['qemu'] - a['qemu']:+.1f} over (a))")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=300, help="samples a device (default 300: 3 steps a round)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--malloc", default="lean", help="training.malloc (default lean: what auto gives a Pi)")
    ap.add_argument("--arch", choices=sorted(containers.MACHINES), default="arm64",
                    help="the image's (default arm64, under qemu; this machine's own: the same without qemu)")
    ap.add_argument("--qemu-cpu", default="", metavar="MODEL",
                    help="QEMU_CPU for the emulated processes, e.g. cortex-a72 (a Pi 4's); default qemu's own (max)")
    ap.add_argument("--out", type=Path, default=None, help="default bench-results/memory-ARCH")
    args = ap.parse_args(argv)
    args.out = (args.out or benchlib.DEFAULT_OUT / f"memory-{args.arch}").resolve()
    result = run(args.out, args.samples, args.rounds, args.malloc, args.arch, args.qemu_cpu)
    (args.out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print(report(result))
    return 0 if result["central status"] == 0 and result["device status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
