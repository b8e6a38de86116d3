"""``python -m device --config FILE --name DEVICE``: run one device."""

from __future__ import annotations

from common.cli import base_parser, data_spec, run_main, exit_process
from common.events import EventLog
from common.security import Identity
from common.training import set_threads, tune_malloc, warm_up


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("fedfly-device", "FedFly device: local data, device-side training, moves",
                         name_required=True)

    def body(args, cfg) -> int:
        from common.data import load_train_shard
        from device.client import DeviceClient
        cfg.require("device", args.name)
        set_threads(cfg.device_threads(args.name))
        tune_malloc(cfg.training.malloc)
        warm_up()
        creds = cfg.credentials(Identity("device", args.name))
        data = load_train_shard(data_spec(cfg), devices=cfg.device_names, device=args.name)
        events = EventLog(process=args.name, role="device")
        events.emit("data_loaded", samples=len(data[1]), threads=cfg.device_threads(args.name),
                    slowdown=cfg.devices[args.name].slowdown)
        try:
            return DeviceClient(cfg, args.name, creds=creds, events=events, data=data).run()
        finally:
            events.close()

    return run_main(argv, parser, body)


def entry() -> None:
    """Console-script entry point."""
    exit_process(main())


if __name__ == "__main__":
    entry()
