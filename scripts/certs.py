"""Make the testbed's CA and one key and certificate per process, and say where each goes.

    python -m scripts.certs --config testbed.toml [--out DIR] [--force]

Writes into ``security.certs`` (default ``certs/`` beside the config file); files already
there are kept (``--force``: a new CA and all of them again). ``ca.key`` signs
certificates: it stays on this machine. Each host gets ``ca.crt`` and the ``.crt`` and
``.key`` of the processes it runs (``scripts.remote`` copies them itself).
"""

from __future__ import annotations

import argparse
import os
import sys

from common import pki
from common.cli import run_main
from common.config import Config
from common.security import tls_files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.certs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the testbed's TOML file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument("--out", help="folder to write into (default: security.certs of the config, or certs/)")
    ap.add_argument("--force", action="store_true", help="make a new CA and every certificate again")
    return run_main(argv, ap, _body)


def _body(args: argparse.Namespace, cfg: Config) -> int:
    made = pki.ensure(cfg, args.out, force=args.force)
    out = args.out or cfg.certs_dir()
    print(f"certificates in {out}: made {len(made)}, kept {len(cfg.identities()) - len(made)}")
    print(f"copy to each host, into the folder security.certs names there ({cfg.security.certs or 'certs'}, "
          "beside its testbed file); ca.key stays here:")
    for who in cfg.identities():
        files = tls_files(out, who)
        print(f"  {str(who):<20} {pki.where(cfg, who):<40} ca.crt {os.path.basename(files['cert'])} "
              f"{os.path.basename(files['key'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
