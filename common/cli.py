"""What every entry point shares: arguments, the config, logging, threads, exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from common.config import Config, load_config
from common.errors import ConfigError, TestbedError
from common.text import printable, printable_lines


def base_parser(prog: str, description: str, *, name_required: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="the testbed's TOML file")
    p.add_argument("--name", required=name_required, default=None, help="this process's name in the config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable); FEDFLY_SET in the environment is applied first")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


class PrintableFormatter(logging.Formatter):
    """Log lines quote what peers sent (an error's detail, a name): each message is made
    ``printable`` (one line, no escapes), and a traceback line by line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return printable_lines(super().formatException(ei))


def data_spec(cfg: Config):
    from common.data import DataSpec
    d = cfg.data
    return DataSpec(dataset=d.dataset, root=d.root, download=d.download, distribution=d.distribution,
                    alpha=d.alpha, samples_per_device=d.samples_per_device, test_samples=d.test_samples,
                    image_size=d.image_size, seed=cfg.run.seed)


def run_main(argv: list[str] | None, parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace, Config], int]) -> int:
    """Parse, load the config, run ``body``; a ``ConfigError`` or other deliberate error
    becomes one clear line on stderr and exit status 2 (config) or 1."""
    args = parser.parse_args(argv)
    fmt = f"%(asctime)s {parser.prog} %(levelname)s %(message)s"
    logging.basicConfig(level=args.log_level, format=fmt)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(PrintableFormatter(fmt))
    try:
        cfg = load_config(args.config, args.overrides)
        return body(args, cfg)
    except ConfigError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except TestbedError as exc:  # may quote a peer
        print(f"{parser.prog}: error: {printable(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def exit_process(status: int) -> None:
    """Leave without interpreter finalisation. Connection threads are daemons and may
    still sit in torch when Python tears down; torch's C++ thread pools then abort the
    process at exit (seen as SIGABRT, "terminate called without an active exception")
    after a run that went well. Every file was closed before this point."""
    import os
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
