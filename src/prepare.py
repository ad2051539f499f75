"""Write webdataset shards: `python src/prepare.py digits OUT`."""

import argparse

from deit.data import prepare_digits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    digits = sub.add_parser("digits", help="sklearn's 8x8 digits as 32x32 RGB png shards (1437 train, 360 valid)")
    digits.add_argument("out", help="output folder")
    digits.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    args = parser.parse_args(argv)
    if args.command == "digits":
        train, valid = prepare_digits(args.out, shard_size=args.shard_size)
        print(f"train shards: {train}\nvalid shards: {valid}")


if __name__ == "__main__":
    main()
