"""Plots save throughput against state size from save_bench's JSON.

    /usr/bin/python3 bench/plot.py bench_out/save_bench.json docs/save_throughput.png

Uses Debian's python3-matplotlib.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = [
    ("memcpy_s", "memcpy (in memory)"),
    ("async_block_s", "async save: training thread blocked"),
    ("raw_write_fsync_s", "raw write() + fsync"),
    ("sync_weights_s", "torchfit sync, weights only"),
    ("async_durable_s", "torchfit async, until durable"),
    ("sync_full_s", "torchfit sync, full"),
    ("torch_save_s", "torch::save(module)"),
    ("python_torch_save_s", "Python torch.save(state_dict)"),
]


def main():
    source, target = sys.argv[1], sys.argv[2]
    rows = [r for r in json.load(open(source)) if r["state"].endswith("MiB")]
    rows.sort(key=lambda r: r["bytes"])
    sizes = [r["bytes"] / 2**20 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label in SERIES:
        points = [(s, r["bytes"] / r[key] / 1e9) for s, r in zip(sizes, rows) if r.get(key, 0) > 0]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("state size (MiB)")
    ax.set_ylabel("throughput (GB/s, higher is better)")
    ax.set_title("Checkpoint save throughput (2 cores, page cache + fsync)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main()
