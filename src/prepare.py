"""Write webdataset shards (png/jpg + cls, the layout of timm's imagenet-1k-wds).

    python src/prepare.py digits OUT          # sklearn's digits, 1437 train / 360 valid
    python src/prepare.py folder SRC OUT      # an ImageFolder tree SRC/<class>/<image>
"""

import argparse

from deit.data.prepare import prepare_digits, prepare_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    digits = sub.add_parser("digits", help="sklearn's 8x8 digits as 32x32 RGB png shards (1437 train, 360 valid)")
    digits.add_argument("out", help="output folder")
    digits.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    folder = sub.add_parser("folder", help="an ImageFolder tree SRC/<class>/<image> -> shuffled shards + class index")
    folder.add_argument("src", help="folder with one subfolder per class")
    folder.add_argument("out", help="output folder")
    folder.add_argument("--prefix", default=None, help="shard name prefix (default: SRC's folder name)")
    folder.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    folder.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding")
    folder.add_argument("--classes", default=None,
                        help="existing class index JSON to reuse (e.g. train's, for a validation folder)")
    folder.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.command == "digits":
        train, valid = prepare_digits(args.out, shard_size=args.shard_size)
        print(f"train shards: {train}\nvalid shards: {valid}")
    elif args.command == "folder":
        spec, classes = prepare_folder(args.src, args.out, prefix=args.prefix, shard_size=args.shard_size,
                                       seed=args.seed, classes=args.classes, progress=not args.no_progress)
        print(f"shards: {spec}\nclasses: {len(classes)}")


if __name__ == "__main__":
    main()
