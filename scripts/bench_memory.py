"""Where a process's memory goes (issue 25): ``python -m scripts.bench_memory [--quick|--full]``.

Four parts, each in fresh processes, memory read from ``/proc/PID/smaps_rollup`` (RSS; PSS,
which splits shared pages among the processes mapping them; USS, the private pages):

- **light roles**: start time and peak RSS of the roles that do not train (``--help`` of
  the launcher, the mobility controller, the certificate command, the namespace testbed);
- **device breakdown**, per model of the zoo and per ``training.malloc``: one process
  doing what a device does, stage by stage (interpreter, torch and the device's modules,
  data shard, model and optimizer, steady training steps), then ``malloc_trim(0)`` to
  show how much of it is free memory malloc keeps (allocator overhead);
- **device probe**, per ``training.malloc``: a real VGG-5 device of a testbed (TLS, one
  edge) read from the inside as each stage ends (``scripts.memprobe``), beside an
  interpreter that only imported torch: every stage's USS (they sum to the device's
  steady figure), what is known in each (data, the round's tensors, what malloc keeps),
  the mappings they lie in, and a step's own peak (its activations and gradients);
- **roles**: a real testbed (1 central, 2 edges, 2 devices, VGG-5) per ``training.malloc``,
  each process sampled while it trains (at any instant: a sample may fall in a step).

Figures only; the goals are in BENCHMARKS.md ("Memory").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from scripts import benchlib, memprobe
from scripts.smaps import rollup as smaps_rollup

MALLOCS = ("system", "tuned", "lean")
LIGHT = ("central.launch", "central.mobility", "scripts.certs", "scripts.netns_testbed")
# model -> the split layer its device runs up to (VGG-5's is FedFly's)
ZOO = {"vgg5": 3, "resnet18": 1, "mobilenetv2": 2}
SCALES = {"tiny": {"samples": 200, "epochs": 2, "models": ("vgg5",), "role_runs": False},
          "quick": {"samples": 500, "epochs": 3, "models": tuple(ZOO), "role_runs": True},
          "full": {"samples": 1000, "epochs": 5, "models": tuple(ZOO), "role_runs": True}}
BATCH = 100


# One device's work in one process, stage by stage (no link: that part is the roles').
STAGES = r"""
import ctypes, json, sys
from scripts.smaps import rollup as smaps_rollup
model, split, malloc, samples, epochs, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
out = {"interpreter": smaps_rollup()}
import torch
out["torch imported"] = smaps_rollup()
import device.client, common.transport, common.security, common.data
from common.training import set_threads, tune_malloc, warm_up, make_optimizer, round_batches, LOSS
from common.footprint import backward
set_threads(1); tune_malloc(malloc); warm_up()
out["device modules, warm-up"] = smaps_rollup()
from common.data import DataSpec, load_train_shard
x, y = load_train_shard(DataSpec(dataset="synthetic", samples_per_device=samples, seed=1),
                        devices=["device1"], device="device1")
out["data shard"] = smaps_rollup()
from common.models import device_part
part = device_part(model, split, seed=1)
opt = make_optimizer(part.parameters(), lr=0.01, momentum=0.9)
out["model and optimizer"] = smaps_rollup()
peak = 0.0
for r in range(epochs):
    for b in round_batches(len(y), batch, local_epochs=1, seed=1, device="device1", round=r):
        a = part(x[b])
        opt.zero_grad()
        backward(a, torch.ones_like(a) / a.numel())  # a gradient at the cut, as the edge's, as the device does
        opt.step()
        del a
        peak = max(peak, smaps_rollup()["uss"])
out["steady steps"] = smaps_rollup()
out["steady steps"]["peak_uss"] = peak
ctypes.CDLL(None).malloc_trim(0)
out["after malloc_trim(0)"] = smaps_rollup()
print(json.dumps(out))
"""


def breakdown(model: str, malloc: str, samples: int, epochs: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", STAGES, model, str(ZOO[model]), malloc, str(samples), str(epochs),
                           str(BATCH)], cwd=benchlib.ROOT, env=benchlib._env(), capture_output=True, text=True,
                          timeout=1800, check=True)
    stages = json.loads(proc.stdout)
    base = stages["torch imported"]["uss"]
    steady = stages["steady steps"]["uss"]
    names = list(stages)
    parts = {names[i]: stages[names[i]]["uss"] - stages[names[i - 1]]["uss"] for i in range(2, 5)}
    parts["a step's buffers and malloc's kept memory"] = steady - stages["model and optimizer"]["uss"]
    parts["of which malloc kept (malloc_trim frees it)"] = steady - stages["after malloc_trim(0)"]["uss"]
    return {"model": model, "malloc": malloc, "stages": stages, "added_over_torch_uss": steady - base,
            "parts_uss": parts}


# On the path of every process of a probed testbed; only the device installs the probe.
SITECUSTOMIZE = """import os
if os.environ.get("MEMPROBE_OUT"):
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().split(b"\\0")
    if b"-m" in argv and argv[argv.index(b"-m") + 1:][:1] == [b"device"]:
        from scripts import memprobe
        memprobe.install()
"""
TORCH_ONLY = "import sys, torch; print('ready', flush=True); sys.stdin.read()"


def device_probe(out: Path, malloc: str, samples: int, rounds: int = 4) -> dict[str, Any]:
    """A real VGG-5 device (TLS, 1 edge, ``rounds`` rounds) read stage by stage from the
    inside (``scripts.memprobe``), beside an interpreter that only imported torch."""
    site = out / "memprobe"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = out / f"memprobe-{malloc}.json"
    path.unlink(missing_ok=True)
    cfg = benchlib.write_config(out, f"probe-vgg5-{malloc}-{time.strftime('%H%M%S')}", edges=1, devices=1, rounds=rounds,
                                samples_per_device=samples, extra={
                                    "training": {"malloc": malloc},
                                    "security": {"mode": "tls", "certs": str(out / "certs")}})
    env = benchlib._env()
    env["PYTHONPATH"] = str(site) + os.pathsep + env["PYTHONPATH"]
    env[memprobe.OUT_ENV] = str(path)
    # Two torch-only interpreters: the baseline is read once the run has ended, and a
    # file page only one process maps counts as private (USS); the second keeps libtorch's
    # pages shared, as the run's edge and central kept them while the device was read.
    base, partner = (subprocess.Popen([sys.executable, "-c", TORCH_ONLY], cwd=benchlib.ROOT, env=benchlib._env(),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2))
    try:
        base.stdout.readline()
        partner.stdout.readline()
        with open(cfg.with_suffix(".out"), "w") as log:
            status = subprocess.run([sys.executable, "-m", "central.launch", "--config", str(cfg)], cwd=benchlib.ROOT,
                                    env=env, stdout=log, stderr=subprocess.STDOUT, timeout=1800).returncode
        torch_only = {**memprobe.rollup(base.pid), "mappings": memprobe.mappings(base.pid)}
    finally:
        for p in (base, partner):
            p.kill()
            p.wait()
    return {"malloc": malloc, "status": status, "samples": samples, "rounds": rounds, "torch": torch_only,
            **(json.loads(path.read_text()) if path.exists() else {"stages": {}, "steps": []})}


def probe_account(p: dict[str, Any]) -> dict[str, float]:
    """A probed device's private memory above the torch-only interpreter, MB: stage by
    stage (they sum to ``steady``), what each holds that is known, and the step's peak."""
    st, base = p["stages"], p["torch"]["uss"]
    steady_at = st["last round delivered"]["uss"]
    order = [("modules, threads, warm-up", "threads, malloc, warm-up"), ("credentials, data shard", "credentials, data shard"),
             ("client, link objects", "credentials, client, link objects"),
             ("join: TLS, link threads, control", "joined (TLS, link threads, control)"),
             ("rounds: model, optimizer, what steps leave", "last round delivered")]
    acc: dict[str, float] = {}
    prev = base
    for label, stage in order:
        acc[label] = st[stage]["uss"] - prev
        prev = st[stage]["uss"]
    acc["steady"] = steady_at - base
    acc["data tensors"] = p["data_mb"]
    acc["round's tensors"] = p["round_tensors_mb"]
    acc["malloc kept (malloc_trim frees)"] = steady_at - st["after malloc_trim(0)"]["uss"]
    acc["rest of the rounds"] = acc["rounds: model, optimizer, what steps leave"] - acc["round's tensors"] \
        - acc["malloc kept (malloc_trim frees)"]
    acc["threads"] = st["last round delivered"]["threads"]
    for kind, mb in st["last round delivered"]["mappings"].items():
        acc[f"mapping: {kind}"] = mb - p["torch"]["mappings"].get(kind, 0.0)
    last = [s["uss"] for s in p["steps"] if s["round"] == p["steps"][-1]["round"]]
    acc["step: USS rise while its activations are held, last round (max)"] = max(p["forward_live"][-len(last):]) - min(last)
    acc["step: peak RSS above its start (max)"] = max(p["step_peak_rss"])
    # a step's peak RSS over its start (new pages are private), on top of where it started
    acc["peak"] = max(s["uss"] + rise for s, rise in zip(p["steps"], p["step_peak_rss"])) - base
    return acc


def probe_accounts(result: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(malloc, ``probe_account``) of every device probe of ``result`` that ran to its end."""
    return [(p["malloc"], probe_account(p)) for p in result.get("probe", [])
            if p["status"] == 0 and "after malloc_trim(0)" in p["stages"]]


def light_role(module: str) -> dict[str, float]:
    """Wall time and peak RSS of ``python -m module --help``."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", module, "--help"], cwd=benchlib.ROOT, env=benchlib._env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": seconds, "max_rss_mb": usage.ru_maxrss / 1024, "status": proc.returncode}


def roles(out: Path, malloc: str, samples: int, *, edges: int = 2, devices: int = 2,
          model: str = "vgg5") -> dict[str, Any]:
    """A real testbed run; for each process the sample with the largest USS while it ran."""
    cfg = benchlib.write_config(out, f"roles-{model}-{malloc}-{edges}x{devices}", edges=edges, devices=devices,
                                rounds=3, samples_per_device=samples, extra={
                                    "training": {"malloc": malloc},
                                    "model": {"name": model, "split_layer": ZOO[model]}})
    cmd = [sys.executable, "-m", "central.launch", "--config", str(cfg)]
    peak: dict[str, dict[str, float]] = {}
    with open(cfg.with_suffix(".out"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=benchlib.ROOT, env=benchlib._env(), stdout=log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        try:
            while proc.poll() is None and time.monotonic() - t0 < 1200:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        argv = child.cmdline()
                        name = argv[argv.index("--name") + 1] if "--name" in argv else argv[argv.index("-m") + 1]
                        mem = smaps_rollup(child.pid)
                    except (psutil.Error, ValueError, IndexError, OSError):
                        continue
                    if mem["uss"] > peak.get(name, {}).get("uss", 0.0):
                        peak[name] = mem
                launcher = smaps_rollup(proc.pid)
                if launcher["uss"] > peak.get("launcher", {}).get("uss", 0.0):
                    peak["launcher"] = launcher
                time.sleep(0.5)
        except (psutil.Error, OSError):
            pass
        finally:
            if proc.poll() is None:
                benchlib.kill_tree(proc.pid)
            proc.wait()
    return {"malloc": malloc, "status": proc.returncode, "processes": peak}


def describe(scale: str) -> dict[str, Any]:
    s = SCALES[scale]
    return {"mallocs": MALLOCS, "models": s["models"], "samples per device": s["samples"],
            "epochs (breakdown)": s["epochs"], "batch": BATCH, "threads": 1,
            "device probe": f"VGG-5, TLS, 1 edge, 4 rounds of {2 * s['samples']} samples, read inside the device",
            "role runs": "VGG-5, 1 central, 2 edges, 2 devices, 3 rounds" if s["role_runs"] else "none"}


def run(out: Path, scale: str) -> dict[str, Any]:
    s = SCALES[scale]
    result: dict[str, Any] = {"light": {m: light_role(m) for m in LIGHT}, "breakdown": [], "roles": []}
    for model in s["models"]:
        for malloc in MALLOCS:
            result["breakdown"].append(breakdown(model, malloc, s["samples"], s["epochs"]))
            print(f"   breakdown {model} {malloc}: done", flush=True)
    result["probe"] = []
    for malloc in MALLOCS:
        result["probe"].append(device_probe(out, malloc, s["samples"] * 2))
        print(f"   device probe {malloc}: status {result['probe'][-1]['status']}", flush=True)
    if s["role_runs"]:
        for malloc in MALLOCS:
            result["roles"].append(roles(out, malloc, s["samples"]))
            print(f"   roles {malloc}: status {result['roles'][-1]['status']}", flush=True)
    return result


def report(result: dict[str, Any]) -> str:
    lines = ["== memory: roles that do not train (python -m X --help)"]
    lines.append(benchlib.table(["module", "start s", "peak RSS MB"],
                                [[m, r["seconds"], r["max_rss_mb"]] for m, r in result["light"].items()], floatfmt=".2f"))
    lines.append("== memory: one device's work, USS added by each stage (MB), threads 1, batch 100")
    rows = []
    for b in result["breakdown"]:
        st = b["stages"]
        rows.append([b["model"], b["malloc"], st["torch imported"]["uss"], *b["parts_uss"].values(),
                     b["added_over_torch_uss"], st["steady steps"]["peak_uss"] - st["torch imported"]["uss"],
                     st["steady steps"]["rss"]])
    lines.append(benchlib.table(["model", "malloc", "torch", "modules+warm-up", "data", "model+opt",
                                 "steps+kept", "kept by malloc", "added", "peak added", "RSS"], rows, floatfmt=".0f"))
    probes = probe_accounts(result)
    if probes:
        lines.append("== memory: a real VGG-5 device (TLS, 1 edge), private MB above an interpreter that imported "
                     f"torch ({result['probe'][0]['torch']['uss']:.0f} MB), batch 100")
        lines.append(benchlib.table(["", *(m for m, _ in probes)], [[k, *(a[k] for _, a in probes)] for k in probes[0][1]],
                                    floatfmt=".1f"))
    for r in result["roles"]:
        lines.append(f"== memory: a VGG-5 testbed, malloc {r['malloc']} (status {r['status']}): peak per process, MB")
        lines.append(benchlib.table(["process", "RSS", "PSS", "USS"],
                                    [[n, p["rss"], p["pss"], p["uss"]] for n, p in sorted(r["processes"].items())],
                                    floatfmt=".0f"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(benchlib.standalone("memory", describe, run, report))
