"""Longer fuzz runs than the suite's: the frame decoder and the message handlers.

    python -m scripts.fuzz --seconds 60                 # decoder and handlers, 60 s
    python -m scripts.fuzz --inputs 1000000 --target decoder --seed 7
    python -m scripts.fuzz --atheris --seconds 600      # coverage-guided, if atheris is installed

Same generators and invariants as ``tests/test_fuzz.py`` (``scripts/fuzzlib.py``,
``scripts/fuzzhandlers.py``). Prints inputs per second per target and every distinct
failure with a reproducer (for the decoder: the input's hex; for a handler: seed and
input index, replayed with ``--replay``). Exit status 1 if anything failed.
atheris is optional and not a dependency: without it the built-in mutator runs.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time

from scripts import fuzzhandlers, fuzzlib

TARGETS = ["decoder", "edge", "central", "device"]
# Share of inputs per target when all run: the decoder is far cheaper than a handler
# (BENCHMARKS.md, section 10).
WEIGHTS = {"decoder": 0.85, "device": 0.08, "edge": 0.04, "central": 0.03}
# A handler's state is rebuilt this often, so the early paths (start-up, first attach) get inputs too.
RESET_EVERY = 200


class Run:
    def __init__(self, target: str, seed: int) -> None:
        self.target, self.seed = target, seed
        self.rng = random.Random(f"{target}:{seed}")
        self.inputs = 0
        self.seconds = 0.0
        self.failures: dict[str, str] = {}
        if target == "decoder":
            self.corpus = fuzzlib.seed_frames(self.rng)
        else:
            self.harness = fuzzhandlers.HARNESSES[target](self.rng)

    def one(self) -> None:
        t0 = time.perf_counter()
        i = self.inputs
        try:
            if self.target == "decoder":
                data = fuzzlib.hostile_input(self.rng, self.corpus)
                fuzzlib.decode_target(data, self.rng)
            else:
                if i and i % RESET_EVERY == 0:
                    self.harness = fuzzhandlers.HARNESSES[self.target](self.rng)
                self.harness.step(self.rng)
        except fuzzlib.FuzzFailure as exc:
            key = str(exc).split("\n")[0][:160]
            if key not in self.failures:
                repro = (f"input hex: {exc.data.hex()}" if exc.data is not None
                         else f"replay: python -m scripts.fuzz --target {self.target} --seed {self.seed} "
                              f"--inputs {i + 1}")
                self.failures[key] = repro
                print(f"FAIL {self.target} seed {self.seed} input {i}: {key}\n  {repro}", flush=True)
            if self.target != "decoder":
                self.harness = fuzzhandlers.HARNESSES[self.target](self.rng)  # its state may be broken
        self.inputs += 1
        self.seconds += time.perf_counter() - t0


def run(*, targets: list[str], seed: int, seconds: float | None, inputs: int | None, report_s: float = 10.0) -> int:
    """Fuzz until ``seconds`` pass or ``inputs`` were fed; returns the number of distinct failures."""
    logging.disable(logging.CRITICAL)  # the edge core logs every refusal with a traceback
    runs = [Run(t, seed) for t in targets]
    weights = [WEIGHTS[t] for t in targets]
    pick = random.Random(seed)
    start = last = time.monotonic()
    total = 0
    while True:
        now = time.monotonic()
        if (seconds is not None and now - start >= seconds) or (inputs is not None and total >= inputs):
            break
        pick.choices(runs, weights)[0].one()
        total += 1
        if now - last >= report_s:
            last = now
            print(f"{now - start:6.0f} s  {total} inputs  {total / (now - start):.0f}/s", flush=True)
    elapsed = max(time.monotonic() - start, 1e-9)
    print(f"{total} inputs in {elapsed:.1f} s: {total / elapsed:.0f} inputs/s")
    for r in runs:
        rate = r.inputs / r.seconds if r.seconds else 0.0
        print(f"  {r.target:8s} {r.inputs:9d} inputs  {rate:9.0f}/s  {len(r.failures)} failures")
    return sum(len(r.failures) for r in runs)


def run_atheris(seconds: float | None, inputs: int | None) -> int:
    import atheris  # optional: pip install atheris

    rng = random.Random(0)
    corpus = fuzzlib.seed_frames(rng)

    def test_one(data: bytes) -> None:
        fuzzlib.atheris_decode(data)

    args = [sys.argv[0]]
    if seconds is not None:
        args.append(f"-max_total_time={int(seconds)}")
    if inputs is not None:
        args.append(f"-runs={inputs}")
    import os
    import tempfile
    seeds = tempfile.mkdtemp(prefix="fuzz-corpus-")
    for i, frame in enumerate(corpus):
        with open(os.path.join(seeds, f"seed{i}"), "wb") as f:
            f.write(frame)
    args.append(seeds)
    atheris.instrument_all()
    atheris.Setup(args, test_one)
    atheris.Fuzz()  # exits the process; a crash prints the input
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, help="run this long")
    ap.add_argument("--inputs", type=int, help="feed this many inputs")
    ap.add_argument("--target", choices=TARGETS + ["all"], default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--atheris", action="store_true", help="coverage-guided decoder fuzzing with atheris")
    args = ap.parse_args(argv)
    if args.seconds is None and args.inputs is None:
        args.seconds = 60.0
    if args.atheris:
        try:
            return run_atheris(args.seconds, args.inputs)
        except ImportError:
            print("atheris is not installed: running the built-in mutator", file=sys.stderr)
    targets = TARGETS if args.target == "all" else [args.target]
    failures = run(targets=targets, seed=args.seed, seconds=args.seconds, inputs=args.inputs)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
