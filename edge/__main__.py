"""``python -m edge --config FILE --name EDGE``: run one edge server."""

from __future__ import annotations

from common.cli import base_parser, run_main, exit_process
from common.events import EventLog
from common.security import Identity
from common.training import set_threads, tune_malloc, warm_up


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("fedfly-edge", "FedFly edge server: split training for its devices", name_required=True)

    def body(args, cfg) -> int:
        from edge.server import EdgeServer
        cfg.require("edge", args.name)
        set_threads(cfg.training.threads)
        tune_malloc(cfg.training.malloc)
        warm_up()
        events = EventLog(process=args.name, role="edge")
        try:
            return EdgeServer(cfg, args.name, creds=cfg.credentials(Identity("edge", args.name)), events=events).run()
        finally:
            events.close()

    return run_main(argv, parser, body)


def entry() -> None:
    """Console-script entry point."""
    exit_process(main())


if __name__ == "__main__":
    entry()
