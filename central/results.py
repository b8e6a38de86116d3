"""The run folder: ``summary.json`` (the contract benchmarks and users rely on),
``rounds.csv`` (one row per round, for plotting with any tool), the final weights, and
the progress lines and table printed as the run goes."""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Collection, Iterable

import torch

from common.atomic import write_text_atomic
from common.config import Config
from common.limits import Backoff, retry
from common.models import state_sha256
from common.tensorfile import write_tensors
from common.text import printable_fields

if TYPE_CHECKING:
    from central.rounds import Dropped
    from common.messages import DeviceUpdate

log = logging.getLogger("central")
WRITE_TRIES = 5           # about 1.5 s
WRITE_TRIES_FINAL = 60    # about a minute (out of descriptors: other threads may free some)
# The wait after a failed write, doubled on each one in a row, at most the cap.
WRITE_FIRST_S = 0.05
WRITE_MAX_S = 1.0
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

SUMMARY = "summary.json"
ROUNDS_CSV = "rounds.csv"
# rounds.csv: the round's own fields, then what its migrations cost (summed over them)
CSV_FIELDS = ["round", "seconds", "eval_seconds", "test_accuracy", "test_loss", "samples", "devices", "missing",
              "dropped", "samples_lost", "migrations", "migration_bytes", "migration_pause_ms"]
FINAL_WEIGHTS = "final_model.safetensors"


class RunResults:
    def __init__(self, *, run_dir: str, header: dict[str, Any]) -> None:
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.summary: dict[str, Any] = {**header, "status": "running", "rounds": [], "devices": {},
                                        "migrations": [], "failures": [], "faults": [],
                                        "final_model_sha256": None}
        self.started = time.monotonic()

    def resumed(self, summary: dict[str, Any], after_round: int) -> float:
        """Go on from a checkpoint's ``summary``: the results as they stood after its round
        (``after_round``), running again, the resume recorded. Returns how long the run was
        down (since summary.json was last written; 0 if it cannot be told)."""
        summary = dict(summary)
        summary["status"] = "running"
        summary["final_model_sha256"] = None
        self.summary = summary
        try:
            down = max(0.0, time.time() - os.path.getmtime(os.path.join(self.run_dir, SUMMARY)))
        except OSError:
            down = 0.0
        summary.setdefault("resumed", []).append({"after_round": after_round,
                                                  "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return down

    # Records quote what peers sent (names, details, reasons): kept ``printable``, so that
    # whoever prints summary.json later prints no peer's escape sequence.

    def add_migration(self, rec: dict[str, Any]) -> None:
        self.summary["migrations"].append(printable_fields(rec))

    def add_round(self, rec: dict[str, Any], device_records: dict[str, dict[str, Any]]) -> None:
        self.summary["rounds"].append(rec)
        for dev, info in device_records.items():
            d = self.summary["devices"].setdefault(dev, {"samples": info["samples"], "round_seconds": [],
                                                         "steps": [], "edges": []})
            d["samples"] = info["samples"]
            d["round_seconds"].append(info["train_seconds"])
            d["steps"].append(info["steps"])
            d["edges"].append(info["edge"])
        self.write()

    def add_failure(self, rec: dict[str, Any]) -> None:
        self.summary["failures"].append(printable_fields(rec))

    def add_fault(self, rec: dict[str, Any]) -> None:
        self.summary["faults"].append(printable_fields(rec))

    def finish(self, weights: dict[str, torch.Tensor] | None, *, status: str, reason: str = "") -> str | None:
        """The run's end: the final weights (None: there are none, e.g. stopped before the
        model was built) and summary.json with ``status`` ("finished", "stopped",
        "failed") and ``reason``. Returns the weights' SHA-256. Raises ``OSError`` when
        summary.json cannot be written; the final weights failing to be written is
        recorded in it (``final_model_error``; a "finished" run is then "failed") and the
        summary still written."""
        sha = state_sha256(weights) if weights is not None else None
        if weights is not None:
            try:
                write_tensors(os.path.join(self.run_dir, FINAL_WEIGHTS), weights, {"sha256": sha})
            except OSError as exc:
                self.summary["final_model_error"] = f"{FINAL_WEIGHTS} not written: {exc}"
                if status == "finished":  # every round done, but its model is lost
                    status, reason = "failed", self.summary["final_model_error"]
        self.summary["final_model_sha256"] = sha
        self.summary["status"] = status
        self.summary["reason"] = reason
        self.summary["total_seconds"] = round(time.monotonic() - self.started, 3)
        self.write(final=True)
        return sha

    def write(self, *, final: bool = False) -> None:
        """summary.json and rounds.csv, each whole (``common.atomic``). A file system short
        of descriptors is tried again for a while (``common.limits.retry``); a full disk is
        not waited for (it does not free itself) beyond ``WRITE_TRIES``. A round's write
        that still fails is skipped (the previous summary.json stays whole; the next write
        holds everything); the final one, or one that found no space, raises the
        ``OSError``: a run whose results cannot be kept is not run on for nothing."""
        path = os.path.join(self.run_dir, SUMMARY)
        csv_path = os.path.join(self.run_dir, ROUNDS_CSV)  # rounds.csv, the same way
        errors: list[OSError] = []

        def attempt() -> bool | None:
            try:
                write_text_atomic(path, json.dumps(self.summary, indent=2))
                write_text_atomic(csv_path, rounds_csv(self.summary))
                return True
            except OSError as exc:
                errors.append(exc)
                if exc.errno in NO_SPACE and len(errors) >= WRITE_TRIES:
                    raise
                return None

        if retry(attempt, tries=WRITE_TRIES_FINAL if final else WRITE_TRIES,
                 backoff=Backoff(WRITE_FIRST_S, WRITE_MAX_S)):
            return
        if final:
            raise errors[-1]
        log.warning("summary.json not written this round: %s", errors[-1])


def run_header(cfg: Config, *, run_name: str, handover: str, strategy: dict[str, Any],
               auto: dict[str, Any]) -> dict[str, Any]:
    """What summary.json says of the run before any round: its settings as run, the cuts
    (``auto``: those chosen at start) and the strategy (``Strategy.describe``)."""
    t = cfg.training
    return {
        "run_name": run_name, "mode": cfg.mode, "config": cfg.path, "seed": cfg.run.seed,
        # how a moving device's session follows it (``edge.handover``)
        "handover": handover,
        "model": cfg.model.name, "model_key": cfg.model_key, "split_layer": cfg.model.split_layer,
        "dataset": cfg.data.dataset,
        "strategy": strategy,
        "cuts": {d: auto[d]["cut"] if d in auto else cfg.split_of(d) for d in cfg.device_names},
        "auto_split": auto,
        "mobility": {**cfg.mobility.as_dict(), **({"waypoint": cfg.waypoint.as_dict()} if cfg.waypoint else {}),
                     "timed_moves": len(cfg.timed_moves)},
        "distribution": cfg.data.distribution, "training": t.as_dict(), "threads": t.threads,
        "faults_settings": cfg.faults.as_dict(),
        "device_settings": {n: {"edge": d.edge, "slowdown": d.slowdown, "threads": cfg.device_threads(n)}
                            for n, d in sorted(cfg.devices.items())},
        "edges": sorted(cfg.edges), "torch": torch.__version__,
        "scheduled_moves": [vars(mv) for mv in cfg.moves]}


def round_record(r: int, *, seconds: float, eval_started: float, accuracy: float, loss: float,
                 updates: dict[str, DeviceUpdate], devices: Iterable[str], dropped: Collection[Dropped],
                 absent: list[str], refused: list[dict[str, Any]], shard_samples: dict[str, int],
                 ratio_max: float | None) -> dict[str, Any]:
    """Round ``r``'s record in summary.json (and its row in rounds.csv): what was summed
    (``updates``), what was lost and why: devices ``dropped`` from the round, ``absent``
    when it started, updates ``refused`` (``central.judge``). ``eval_started``: when the
    evaluation began (``time.monotonic``)."""
    lost = [{"device": x.device, "reason": x.reason, "samples": x.samples}
            for x in sorted(dropped, key=lambda x: x.device)]
    lost += [{"device": d, "reason": "attached to no edge when the round started",
              "samples": shard_samples.get(d, 0)} for d in absent]
    lost += refused
    return {"round": r, "seconds": round(seconds, 4), "eval_seconds": round(time.monotonic() - eval_started, 4),
            "test_accuracy": accuracy, "test_loss": loss, "samples": sum(u.samples for u in updates.values()),
            "devices": sorted(updates), "missing": sorted(set(devices) - set(updates)), "dropped": lost,
            "samples_lost": sum(x["samples"] for x in lost),
            "refused": sorted([x.device for x in dropped if x.refused] + [x["device"] for x in refused]),
            "update_ratio_max": ratio_max}


def rounds_csv(summary: dict[str, Any]) -> str:
    """One row per round of ``summary``: ``CSV_FIELDS``; lists are counted (devices,
    missing, dropped), migrations summed per round."""
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for rec in summary.get("rounds", []):
        migs = [mv for mv in summary.get("migrations", []) if mv.get("round") == rec.get("round")]
        row = {k: (len(v) if isinstance(v, list) else v) for k, v in rec.items()}
        row.update(migrations=len(migs), migration_bytes=sum(mv.get("state_bytes", 0) for mv in migs),
                   migration_pause_ms=round(sum(mv.get("pause_ms", 0.0) for mv in migs), 3))
        w.writerow(row)
    return out.getvalue()


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(rec: dict[str, Any], total_rounds: int, eta_s: float, moves: int) -> str:
    line = (f"round {rec['round']}/{total_rounds}  {rec['seconds']:.2f} s  acc {rec['test_accuracy']:.3f}  "
            f"loss {rec['test_loss']:.3f}  samples {rec['samples']}  ETA {fmt_seconds(eta_s)}")
    if moves:
        line += f"  migrations {moves}"
    return line


def migration_line(rec: dict[str, Any]) -> str:
    return (f"  move: {rec['device']} {rec['from']} -> {rec['to']}  round {rec['round']} step {rec['step']}  "
            f"pause {rec['pause_ms']:.1f} ms  {rec['state_bytes'] / 1e6:.2f} MB  transfer {rec['transfer_ms']:.1f} ms"
            f"  [{rec['mode']}{', ' + rec['how'] if rec.get('how') else ''}]")


def fault_line(rec: dict[str, Any]) -> str:
    where = f" round {rec['round']} step {rec.get('step', 0)}" if rec.get("round") else ""
    parts = [f"  fault: {rec['kind']} {rec.get('process', '?')} -> {rec.get('peer', '?')}{where}"]
    if rec.get("detected_s"):
        parts.append(f"detected after {rec['detected_s']:.2f} s")
    if rec.get("down_s"):
        parts.append(f"down {rec['down_s']:.2f} s")
    if rec.get("replayed"):
        parts.append(f"{rec['replayed']} steps again")
    if rec.get("recovery"):
        parts.append(f"recovery: {rec['recovery']}")
    if rec.get("samples_lost"):
        parts.append(f"{rec['samples_lost']} samples lost")
    if rec.get("detail"):
        parts.append(f"({rec['detail'][:120]})")
    return "  ".join(parts)


def final_table(summary: dict[str, Any]) -> str:
    rows = ["", f"run {summary['run_name']}  mode {summary['mode']}  status {summary['status']}",
            f"{'round':>5} {'seconds':>9} {'accuracy':>9} {'loss':>8} {'samples':>8} {'moves':>6}"]
    for r in summary["rounds"]:
        n = sum(1 for mv in summary["migrations"] if mv["round"] == r["round"])
        rows.append(f"{r['round']:>5} {r['seconds']:>9.2f} {r['test_accuracy']:>9.3f} {r['test_loss']:>8.3f} "
                    f"{r['samples']:>8} {n:>6}")
    if summary["migrations"]:
        rows.append("migrations:")
        rows.extend(migration_line(mv) for mv in summary["migrations"])
    if summary.get("faults"):
        rows.append("faults:")
        rows.extend(fault_line(f) for f in summary["faults"])
    rows.append(f"final model sha256 {summary['final_model_sha256']}")
    return "\n".join(rows)
