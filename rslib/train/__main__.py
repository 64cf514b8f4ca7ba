"""Train one stage from the command line (also under ``accelerate launch`` for several GPUs or nodes).

    python -m rslib.train stage_one --preset gpu
    accelerate launch --num_processes 4 -m rslib.train crs_diff --preset gpu --set crs.steps=20000
    python -m rslib.train cc_diff --preset cpu --set cc.mode=no_bridge
    python -m rslib.train text_encoder --print-config

The preset is ``--preset``, else ``$RSLIB_PRESET``, else cpu; every setting, the ablations' switches included
(``crs.fusion``, ``cc.mode``), is changed with ``--set``. Each stage reads the artifacts of the stages before
it from ``runs/<preset>/`` and writes its own there; an interrupted run resumes from its last checkpoint when started
again with the same settings, and is refused (nothing deleted) with other settings. A mistake in the command prints
one line and exits with status 2; a run that cannot go on (missing inputs, an unfinished run of other settings)
prints one line and exits with status 1.
"""
from __future__ import annotations

import json
import sys

from rslib.utils import OneLineArgumentParser

STAGES = ("text_encoder", "autoencoder", "stage_one", "crs_diff", "cc_diff", "segmenter", "detector")


def _parser() -> OneLineArgumentParser:
    import argparse

    p = OneLineArgumentParser(prog="python -m rslib.train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--preset", help="smoke | cpu | gpu | paper (default: $RSLIB_PRESET, else cpu)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="preset overrides with dotted keys, e.g. unet.steps=2000 data.root=data/rsicd")
    p.add_argument("--force", action="store_true",
                   help="train again from scratch, even over a finished run or an unfinished one of other settings")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: parse, resolve the preset, run the stage, print the saved folder."""
    p = _parser()
    args = p.parse_args(argv)
    from rslib.config import get_preset, parse_overrides

    try:
        cfg = get_preset(args.preset, **parse_overrides(args.set))  # None: $RSLIB_PRESET, else cpu
    except ValueError as e:
        p.error(str(e))
    if args.print_config:
        print(json.dumps({"stage": args.stage, "config": cfg.to_dict()}, indent=1, default=str))
        return 0
    from rslib.data.records import DataFormatError
    from rslib.train.stage import ResumeRefused

    try:
        print(_stage_function(args.stage)(cfg, force=args.force))
    except (ResumeRefused, DataFormatError, FileNotFoundError) as e:
        print(f"{p.prog} {args.stage}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _stage_function(stage: str):
    """``fn(cfg, force)`` that trains ``stage`` and returns its folder."""
    if stage == "text_encoder":
        from rslib.train.text_encoder import train_text_encoder as fn
    elif stage == "autoencoder":
        from rslib.train.autoencoder import train_autoencoder as fn
    elif stage == "stage_one":
        from rslib.train.stage_one import train_stage_one as fn
    elif stage == "crs_diff":
        from rslib.train.crs_diff import train_crs_diff as fn
    elif stage == "cc_diff":
        from rslib.train.cc_diff import train_cc_diff as fn
    elif stage == "segmenter":
        from rslib.train.segmenter import train_segmenter as fn
    else:
        from rslib.train.detector import train_detector as fn
    return fn


if __name__ == "__main__":
    sys.exit(main())
