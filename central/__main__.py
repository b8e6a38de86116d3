"""``python -m central --config FILE``: run the central server (FedAvg, evaluation, results)."""

from __future__ import annotations

import os
import time

from common.cli import base_parser, data_spec, run_main, exit_process
from common.events import EventLog
from common.training import set_threads


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("fedfly-central", "FedFly central server: rounds, FedAvg, evaluation, results",
                         name_required=False)

    def body(args, cfg) -> int:
        from central.server import CentralServer
        from common.data import load_test_set, shard_sizes
        set_threads(cfg.training["threads"])
        key = cfg.key()
        run_name = cfg.run["name"] or time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.mode}"
        run_dir = os.path.join(cfg.run["out"], run_name)
        test_set = load_test_set(data_spec(cfg))
        shards = shard_sizes(data_spec(cfg), devices=cfg.device_names)
        events = EventLog(process="central", role="central")
        events.open(run_dir)
        try:
            return CentralServer(cfg, key=key, events=events, run_name=run_name, run_dir=run_dir,
                                 test_set=test_set, shard_samples=shards).run()
        finally:
            events.close()

    return run_main(argv, parser, body)


def entry() -> None:
    """Console-script entry point."""
    exit_process(main())


if __name__ == "__main__":
    entry()
