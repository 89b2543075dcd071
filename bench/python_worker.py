"""Python's side of the benches: torch.save and torch.load + load_state_dict, timed in Python.

Prints "ready", then runs one request per line read from stdin and answers each with the
seconds it took, so the benches run Python's saves and loads in the same rounds as torchfit's:

  save | save_fsync              torch.save of a state dict of --numels float32 tensors to --path
                                 (save_fsync: then fsync)
  load PATH                      torch.load(PATH) (weights_only=True from 2.0) + load_state_dict into a
                                 module that already holds tensors of the file's names and shapes
  load_full PATH HIDDEN          a torchfit full checkpoint of fit_bench's MLP 784-HIDDEN-HIDDEN-10
                                 with Adam: torch.load (weights_only=True from 2.0) + the model's and Adam's load_state_dict

Each load target is made, and filled once, before its first timed load. Run with Debian's
interpreter (/usr/bin/python3), which imports python3-torch.
"""
import argparse
import os
import sys
import time

import torch

# Python 1.13's weights-only unpickler lacks opcodes torchfit's full checkpoints use (floats).
WEIGHTS_ONLY = int(torch.__version__.split(".")[0]) >= 2


class StateHolder(torch.nn.Module):
    """A module whose state dict has the given names and shapes (dotted names nest)."""

    def __init__(self, state):
        super().__init__()
        for name, tensor in state.items():
            owner = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, torch.nn.Parameter(torch.empty_like(tensor), requires_grad=False))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--numels", default="", help="comma-separated float32 tensor sizes, for saves")
    parser.add_argument("--path", default="", help="where saves go")
    args = parser.parse_args()
    state = {f"p{i}": torch.randn(int(n)) for i, n in enumerate(args.numels.split(",")) if n}
    targets = {}

    def save_fsync():
        with open(args.path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    def load(path):
        module = targets[path]
        module.load_state_dict(torch.load(path, weights_only=WEIGHTS_ONLY))

    def load_full(path, hidden):
        model, adam = targets[path]
        checkpoint = torch.load(path, weights_only=WEIGHTS_ONLY)
        model.load_state_dict(checkpoint["model"])
        adam.load_state_dict(checkpoint["optimizer"])

    def prepare(command, path, *rest):
        if path in targets:
            return
        if command == "load":
            targets[path] = StateHolder(torch.load(path, weights_only=WEIGHTS_ONLY))
        else:
            hidden = int(rest[0])
            model = torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                        torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
            targets[path] = (model, torch.optim.Adam(model.parameters()))
        requests[command](path, *rest)  # the target's state tensors exist before the first timed load

    requests = {"save": lambda: torch.save(state, args.path), "save_fsync": save_fsync, "load": load,
                "load_full": load_full}
    print("ready", flush=True)
    for line in sys.stdin:
        command, *operands = line.split()
        if command.startswith("load"):
            prepare(command, *operands)
        start = time.perf_counter()
        requests[command](*operands)
        print(time.perf_counter() - start, flush=True)
    if args.path and os.path.exists(args.path):
        os.remove(args.path)


if __name__ == "__main__":
    main()
