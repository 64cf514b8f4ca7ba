"""Train one stage from the command line (also under ``accelerate launch`` for several GPUs or nodes).

    python -m rslib.train stage_one --preset gpu
    accelerate launch --num_processes 4 -m rslib.train crs_diff --preset gpu --set crs.steps=20000
    python -m rslib.train cc_diff --preset cpu --mode no_bridge

Each stage reads the artifacts of the stages before it from ``runs/<preset>/`` and writes its own there; an
interrupted run resumes from its last checkpoint when started again with the same settings.
"""
from __future__ import annotations

import argparse
import ast
import sys

STAGES = ("text_encoder", "autoencoder", "stage_one", "crs_diff", "cc_diff", "segmenter", "detector")


def _value(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a plain string, e.g. a path


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: parse, resolve the preset, run the stage, print the saved folder."""
    p = argparse.ArgumentParser(prog="python -m rslib.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--preset", default="cpu", help="smoke | cpu | gpu | paper")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="preset overrides with dotted keys, e.g. unet.steps=2000 data.root=data/rsicd")
    p.add_argument("--force", action="store_true", help="train again even if a finished run exists")
    p.add_argument("--mode", help="cc_diff only: cc_diff | no_bridge | gligen")
    p.add_argument("--fusion", help="crs_diff only: aff | ff | sum")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            p.error(f"--set takes KEY=VALUE pairs, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = _value(value)

    from rslib.config import get_preset

    cfg = get_preset(args.preset, **overrides)
    if args.stage == "text_encoder":
        from rslib.train.text_encoder import train_text_encoder as fn
    elif args.stage == "autoencoder":
        from rslib.train.autoencoder import train_autoencoder as fn
    elif args.stage == "stage_one":
        from rslib.train.stage_one import train_stage_one as fn
    elif args.stage == "crs_diff":
        from rslib.train.crs_diff import train_crs_diff

        def fn(cfg, force):  # noqa: E306
            return train_crs_diff(cfg, fusion=args.fusion, force=force)
    elif args.stage == "cc_diff":
        from rslib.train.cc_diff import train_cc_diff

        def fn(cfg, force):  # noqa: E306
            return train_cc_diff(cfg, mode=args.mode, force=force)
    elif args.stage == "segmenter":
        from rslib.eval.segmenter import train_segmenter as fn
    else:
        from rslib.eval.detector import train_detector as fn
    print(fn(cfg, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
