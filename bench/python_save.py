"""Python's torch.save on a state dict of given tensor sizes, for save_bench.

Prints "ready", then saves once per line read from stdin ("save", or
"save_fsync" for a save followed by fsync) and answers each with the seconds
that save took, so save_bench runs Python's saves in the same rounds as its
own. Run with Debian's interpreter (/usr/bin/python3), which imports
python3-torch.
"""
import argparse
import os
import sys
import time

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--numels", required=True, help="comma-separated float32 tensor sizes")
    parser.add_argument("--path", required=True)
    args = parser.parse_args()
    state = {f"p{i}": torch.randn(int(n)) for i, n in enumerate(args.numels.split(","))}

    def save_fsync():
        with open(args.path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    saves = {"save": lambda: torch.save(state, args.path), "save_fsync": save_fsync}
    print("ready", flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        saves[line.strip()]()
        print(time.perf_counter() - start, flush=True)
    if os.path.exists(args.path):
        os.remove(args.path)


if __name__ == "__main__":
    main()
