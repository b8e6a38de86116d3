"""``python -m central --config FILE``: run the central server (FedAvg, evaluation, results)."""

from __future__ import annotations

import os
import sys

from central import runstatus
from common.cli import base_parser, data_spec, run_main, exit_process
from common.errors import ConfigError, TestbedError
from common.events import EventLog
from common.security import CENTRAL
from central.rundir import new_run_dir


def main(argv: list[str] | None = None) -> int:
    # first of all, before torch is imported: a signal at any moment from here on ends the
    # run with a summary.json that says so (central.runstatus)
    runstatus.install()
    parser = base_parser("fedfly-central", "FedFly central server: rounds, FedAvg, evaluation, results",
                         name_required=False)
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="go on with the run in RUN_DIR from its last completed round (after a crash)")

    def body(args, cfg) -> int:
        if args.resume:
            run_dir = os.path.abspath(args.resume)
            run_name = os.path.basename(run_dir.rstrip(os.sep))
        else:
            run_name, run_dir = new_run_dir(cfg)
        try:
            return serve(args, cfg, run_name, run_dir)
        except runstatus.RunStopped as exc:  # before the server's own loop could say it
            try:
                runstatus.settle(run_dir, "stopped", f"{exc.signame} before round 1 started",
                                 {"run_name": run_name, "mode": cfg.mode, "config": cfg.path})
            except OSError as err:
                print(f"fedfly-central: error: summary.json cannot be written in {run_dir}: {err}", file=sys.stderr)
            print(f"fedfly-central: stopped by {exc.signame} before round 1 started; results: {run_dir}",
                  file=sys.stderr)
            return runstatus.exit_code("stopped", exc.signame)

    return run_main(argv, parser, body)


def serve(args, cfg, run_name: str, run_dir: str) -> int:
    """Load what the run needs and run it (torch is imported here, not before)."""
    from central import checkpoint
    from central.server import CentralServer
    from common.data import load_test_set, shard_sizes
    from common.training import set_threads, tune_malloc
    set_threads(cfg.training.threads)
    tune_malloc(cfg.training.malloc)
    creds = cfg.credentials(CENTRAL)
    resume = None
    if args.resume:
        resume = checkpoint.load(run_dir)
        check_resumable(cfg, resume.summary, run_dir)
    test_set = load_test_set(data_spec(cfg))
    shards = shard_sizes(data_spec(cfg), devices=cfg.device_names)
    events = EventLog(process="central", role="central")
    events.open(run_dir)
    try:
        return CentralServer(cfg, creds=creds, events=events, run_name=run_name, run_dir=run_dir,
                             test_set=test_set, shard_samples=shards, resume=resume).run()
    finally:
        events.close()


def check_resumable(cfg, summary: dict, run_dir: str) -> None:
    """The config must be the run's: the same mode, model, data and seed (else the
    resumed run would be another experiment under the old name)."""
    if summary.get("status") == "finished":
        raise TestbedError(f"{run_dir} has finished: nothing to resume")
    same = {"run.mode": (summary.get("mode"), cfg.mode), "run.seed": (summary.get("seed"), cfg.run.seed),
            "model.name": (summary.get("model"), cfg.model.name),
            "model.split_layer": (summary.get("split_layer"), cfg.model.split_layer),
            "data.dataset": (summary.get("dataset"), cfg.data.dataset)}
    for key, (was, now) in same.items():
        if was != now:
            raise ConfigError(key, f"is {now!r}, the run in {run_dir} used {was!r}",
                              "resume with the run's own config file")


def entry() -> None:
    """Console-script entry point."""
    exit_process(main())


if __name__ == "__main__":
    entry()
