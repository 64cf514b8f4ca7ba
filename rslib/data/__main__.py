"""Command line: ``python -m rslib.data synthrs ...``, ``python -m rslib.data convert ...`` and
``python -m rslib.data conditions ...``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    parser = argparse.ArgumentParser(prog="python -m rslib.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthrs", help="generate a SynthRS split")
    p.add_argument("--out", required=True, help="output folder (the split folder)")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--size", type=int, default=64, help="image size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--workers", type=int, default=0, help="processes (0 = one per core)")
    p.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("convert", help="convert a real data set to the record format")
    c.add_argument("--format", required=True, choices=["rsicd", "fmow", "dior", "dior-rsvg", "dota"])
    c.add_argument("--src", required=True, help="the data set's folder, as published")
    c.add_argument("--out", required=True, help="output folder (gets train/ val/ test/ splits)")
    c.add_argument("--overwrite", action="store_true")

    m = sub.add_parser("conditions", help="compute the condition maps and content images of a converted data set")
    m.add_argument("--root", required=True, help="the converted data set (its train/ val/ test/ splits)")
    for kind in ("road", "depth", "segmentation"):
        m.add_argument(f"--{kind}-model", help=f"local transformers folder or TorchScript file for the {kind} maps")
    m.add_argument("--skip-missing", action="store_true", help="leave out the maps whose model is not given")
    m.add_argument("--workers", type=int, default=1, help="processes (0 = one per core)")

    args = parser.parse_args(argv)
    if args.command == "synthrs":
        from rslib.data.synthrs import write_split

        path = write_split(args.out, n=args.n, size=args.size, seed=args.seed, split=args.split,
                           workers=args.workers, overwrite=args.overwrite)
        print(f"wrote {args.n} SynthRS images to {path}")
    elif args.command == "conditions":
        from rslib.data.condition_maps import compute_condition_maps

        done = compute_condition_maps(args.root, args.road_model, args.depth_model, args.segmentation_model,
                                      skip_missing=args.skip_missing, workers=args.workers)
        for split, summary in done.items():
            left_out = f"; left out: {', '.join(summary['missing'])}" if summary["missing"] else ""
            print(f"{split}: {summary['records']} records with {', '.join(summary['maps'])} and content{left_out}")
    else:
        from rslib.data.formats import convert

        paths = convert(args.format, args.src, args.out, overwrite=args.overwrite)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
