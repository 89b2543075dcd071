"""Python's torch.save on a state dict of given tensor sizes; prints JSON timings.

Run with Debian's interpreter (/usr/bin/python3), which imports python3-torch.
"""
import argparse
import json
import os
import statistics
import time

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--numels", required=True, help="comma-separated float32 tensor sizes")
    parser.add_argument("--path", required=True)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    state = {f"p{i}": torch.randn(int(n)) for i, n in enumerate(args.numels.split(","))}

    def timed(save):
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            save()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def save_fsync():
        with open(args.path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    plain = timed(lambda: torch.save(state, args.path))
    durable = timed(save_fsync)
    os.remove(args.path)
    print(json.dumps({"save_s": plain, "save_fsync_s": durable, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
