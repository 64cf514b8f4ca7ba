"""Command line: ``python -m rslib.data synthrs ...``, ``python -m rslib.data convert ...`` and
``python -m rslib.data conditions ...``.

A mistake in the command (a bad value, a missing source folder, an output folder in the way) prints one line
and exits with status 2; a problem in the data set's files prints one line naming the file and line and exits
with status 1.
"""
from __future__ import annotations

import sys

from rslib.utils import OneLineArgumentParser, int_at_least


def _parser() -> OneLineArgumentParser:
    from rslib.data.synthrs import MIN_SIZE

    parser = OneLineArgumentParser(prog="python -m rslib.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthrs", help="generate a SynthRS split")
    p.add_argument("--out", required=True, help="output folder (the split folder)")
    p.add_argument("--n", type=int_at_least(1), required=True, help="number of images")
    p.add_argument("--size", type=int_at_least(MIN_SIZE), default=64, help=f"image size in pixels (at least {MIN_SIZE})")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--workers", type=int_at_least(0), default=0, help="processes (0 = one per core)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a data set this command wrote (never another folder)")

    c = sub.add_parser("convert", help="convert a real data set to the record format")
    c.add_argument("--format", required=True, choices=["rsicd", "fmow", "dior", "dior-rsvg", "dota"])
    c.add_argument("--src", required=True, help="the data set's folder, as published")
    c.add_argument("--out", required=True, help="output folder (gets train/ val/ test/ splits)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a data set this command wrote (never another folder)")
    c.add_argument("--skip-invalid", action="store_true",
                   help="drop objects and images with invalid values (counted per reason) instead of stopping")
    c.add_argument("--split", choices=["train", "val", "test"],
                   help="dota only: the split of a single split folder (default: its name, else train)")
    c.add_argument("--dior-r", metavar="DIR",
                   help="dior-rsvg only: the DIOR-R folder whose oriented boxes are joined to the boxes by image id "
                        "(default: Annotations/Oriented Bounding Boxes/ inside --src, when there)")
    c.add_argument("--tile", type=int_at_least(1), metavar="PX",
                   help="dota only: cut the images into PX x PX tiles named after their origin (CC-Diff: 512)")
    c.add_argument("--gap", type=int_at_least(0), metavar="PX",
                   help="dota only, with --tile: pixels neighbouring tiles share (default 100)")

    m = sub.add_parser("conditions", help="compute the condition maps and content images of a converted data set")
    m.add_argument("--root", required=True, help="the converted data set (its train/ val/ test/ splits)")
    for kind in ("road", "depth", "segmentation"):
        m.add_argument(f"--{kind}-model", help=f"local transformers folder or TorchScript file for the {kind} maps")
    m.add_argument("--skip-missing", action="store_true", help="leave out the maps whose model is not given")
    m.add_argument("--workers", type=int_at_least(0), default=1, help="processes (0 = one per core)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns the exit status."""
    from rslib.data.records import DataFormatError, UsageError

    parser = _parser()
    args = parser.parse_args(argv)
    try:
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
                print(f"{split}: {summary['records']} records with {', '.join(summary['maps'])} and content"
                      f"{left_out}")
        else:
            from rslib.data.converters import convert
            from rslib.data.records import dataset_info

            paths = convert(args.format, args.src, args.out, overwrite=args.overwrite,
                            skip_invalid=args.skip_invalid, split=args.split, dior_r=args.dior_r, tile=args.tile,
                            gap=args.gap)
            print("wrote " + ", ".join(str(p) for p in paths))
            info = dataset_info(args.out)
            if "dior_r" in info:
                joined = info["dior_r"]
                print(f"joined {joined['joined']} of {joined['boxes']} boxes to DIOR-R oriented boxes from "
                      f"{joined['folder']}")
            for drop in info.get("skipped", []):
                print(f"skipped {drop['count']} {drop['dropped']}{'s' if drop['count'] != 1 else ''}: "
                      f"{drop['reason']}")
    except DataFormatError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (UsageError, FileExistsError, FileNotFoundError) as e:  # FileNotFoundError: a model file not given/found
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
