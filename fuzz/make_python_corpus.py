#!/usr/bin/python3
"""Writes checkpoints saved by Python's torch into OUT_DIR, as seeds for the
reader fuzzer and as cases for the test that reads torch.save files:

    /usr/bin/python3 fuzz/make_python_corpus.py fuzz/corpus/python

Run it with Debian's interpreter (python3-torch, torch 1.13); the output is
deterministic, so rerunning it rewrites the same bytes.

OUT_DIR/manifest.tsv has one line per case, tab-separated:

    <file> <expect> <key> <note>

expect is `load` or `refuse`; key is the entry of the file's top-level dict to
read the state dict from, or `-` for the whole file; note is free text, and for
a refusal a lowercase substring the error message must contain. A file whose
selected object is a dict of tensors (a plain dict or an OrderedDict) loads;
legacy (non-zip) files, TorchScript archives, lists and dicts holding anything
but tensors are refused.

Each `load` case also has <file>.expected, one line per tensor, sorted by name:

    <name> <dtype> <shape> <hex>

dtype is torch's name without `torch.` (float32, bfloat16, bool ...), shape the
sizes joined with commas (`-` for a 0-dim tensor) and hex the tensor's elements
in row-major order, little-endian as stored (`-` when it has none).
"""

import io
import os
import pickle
import pickletools
import struct
import sys

import torch
import torch.nn as nn

try:
    import numpy as np
except ImportError:  # the numpy case is then left out
    np = None

INF = float("inf")
NAN = float("nan")


def small_state_dict():
    return {"weight": torch.tensor([[1.0, -2.0], [0.5, 4.25]]), "bias": torch.tensor([0.125, -8.0])}


def linear_state_dict():
    torch.manual_seed(0)
    return nn.Linear(3, 2).state_dict()  # an OrderedDict with _metadata


def nested_parts():
    """A model's state dict and an Adam optimizer's after one step (so it has
    step/exp_avg/exp_avg_sq tensors, and betas tuples in param_groups)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    loss = model(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])).pow(2).sum()
    loss.backward()
    adam.step()
    return model.state_dict(), adam.state_dict()


def dtype_cases():
    floats = [0.5, -1.25, 3.0, -0.0, INF, NAN]
    return [
        ("dtype_float32", torch.tensor(floats, dtype=torch.float32)),
        ("dtype_float64", torch.tensor([0.1, -2.5, 1e300, -0.0, INF, NAN], dtype=torch.float64)),
        ("dtype_float16", torch.tensor(floats + [65504.0, 6e-8], dtype=torch.float16)),
        ("dtype_bfloat16", torch.tensor(floats + [1e38, 3.0e-39], dtype=torch.bfloat16)),
        ("dtype_int64", torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)], dtype=torch.int64)),
        ("dtype_int32", torch.tensor([0, 1, -1, 2**31 - 1, -(2**31)], dtype=torch.int32)),
        ("dtype_int16", torch.tensor([0, 1, -1, 2**15 - 1, -(2**15)], dtype=torch.int16)),
        ("dtype_int8", torch.tensor([0, 1, -1, 127, -128], dtype=torch.int8)),
        ("dtype_uint8", torch.tensor([0, 1, 128, 255], dtype=torch.uint8)),
        ("dtype_bool", torch.tensor([[True, False, True], [False, False, True]])),
    ]


def legacy_bytes(obj):
    """torch.save's pre-1.6 format. It names storages by their address and
    writes them in the order of those names, so obj must hold one storage,
    whose name is rewritten to "0" to keep the output deterministic. The
    pickles are protocol 2, without frames, and nothing in the file records an
    offset, so only the string's length prefix changes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    stream = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        pickle.load(stream)
    for _ in pickletools.genops(stream):  # skip the object's pickle, up to its STOP
        pass
    keys = pickle.load(stream)  # sorted storage names
    assert len(keys) == 1, keys
    old = b"X" + struct.pack("<I", len(keys[0])) + keys[0].encode()
    assert data.count(old) >= 2, data.count(old)  # the persistent ids and the key list
    return data.replace(old, b"X" + struct.pack("<I", 1) + b"0")


def legacy_state_dict():
    """Two tensors in one storage, the second at an offset."""
    storage = torch.tensor([1.0, -2.0, 0.5, 4.25, 0.125, -8.0])
    return {"weight": storage[:4].view(2, 2), "bias": storage[4:]}


def torchscript_bytes():
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), buffer)
    return buffer.getvalue()


def cases():
    """(file stem, object or bytes, [(expect, key, note)])."""
    out = []

    def add(stem, obj, *lines):
        out.append((stem, obj, list(lines)))

    add("flat_dict", {"a": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "b": torch.tensor([7, -8, 9])},
        ("load", "-", "plain dict of tensors"))
    add("ordered_dict_linear", linear_state_dict(), ("load", "-", "nn.Linear(3,2).state_dict(), OrderedDict with _metadata"))
    for stem, tensor in dtype_cases():
        add(stem, {"t": tensor}, ("load", "-", stem[len("dtype_"):]))
    add("zero_dim", {"scalar": torch.tensor(2.5), "count": torch.tensor(7)}, ("load", "-", "0-dim tensors"))
    add("empty_0", {"e": torch.empty(0)}, ("load", "-", "torch.empty(0), empty storage"))
    add("empty_0x3", {"e": torch.empty(0, 3)}, ("load", "-", "torch.empty(0, 3)"))
    add("empty_2x0x4", {"z": torch.zeros(2, 0, 4)}, ("load", "-", "torch.zeros(2, 0, 4)"))

    add("transpose", {"t": torch.arange(6.0).reshape(2, 3).t()}, ("load", "-", "transposed, strides (1, 3)"))
    x = torch.arange(12.0).reshape(3, 4)
    add("strided_slice", {"s": x[:, ::2]}, ("load", "-", "x[:, ::2], strides (4, 2)"))
    big = torch.arange(10.0)
    add("storage_offset", {"v": big[3:7]}, ("load", "-", "big[3:7], storage_offset 3"))
    a = torch.tensor([10, 20, 30, 40, 50], dtype=torch.int32)
    add("shared_storage", {"a": a, "tail": a[1:]}, ("load", "-", "a and a[1:] share a storage"))
    same = torch.tensor([1.5, -1.5, 2.5])
    add("same_tensor", {"x": same, "y": same}, ("load", "-", "one tensor under two names (memo)"))

    torch.manual_seed(0)
    add("parameters", {"weight": nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]])),
                       "bias": nn.Parameter(torch.tensor([-1.0, 0.25]))},
        ("load", "-", "nn.Parameter values (_rebuild_parameter)"))

    for protocol in (2, 3, 4, 5):
        add(f"protocol_{protocol}", ("protocol", protocol, small_state_dict()),
            ("load", "-", f"pickle protocol {protocol}"))

    model, optimizer = nested_parts()
    add("nested_checkpoint", {"epoch": 3, "model": model, "optimizer": optimizer},
        ("load", "model", "model state dict inside a training checkpoint"),
        ("refuse", "-", "keys"),
        ("refuse", "optimizer", "not a tensor"))
    add("nested_state_dict", {"epoch": 3, "state_dict": model},
        ("load", "state_dict", "lightning-style state_dict key"))
    add("nested_model_state_dict", {"epoch": 3, "model_state_dict": model, "optimizer_state_dict": optimizer},
        ("load", "model_state_dict", "model_state_dict key"))

    add("legacy", legacy_bytes(legacy_state_dict()), ("refuse", "-", "legacy"))
    add("torchscript", torchscript_bytes(), ("load", "-", "TorchScript module archive: parameters by name"))
    if np is not None:
        add("numpy_scalar", {"w": torch.ones(2), "n": np.float64(1.5)}, ("refuse", "-", "numpy"))
    add("python_set", {"w": torch.ones(2), "s": {1, 2}}, ("refuse", "-", "not a tensor"))
    add("tensor_list", [torch.ones(2), torch.zeros(3)], ("refuse", "-", "not a dict"))
    return out


def expected_lines(state_dict):
    lines = []
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        dtype = str(t.dtype)[len("torch."):]
        shape = ",".join(str(s) for s in t.shape) or "-"
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        # Cross-check against a fresh storage's bytes.
        storage = t.contiguous().clone().storage()
        untyped = storage.untyped() if hasattr(storage, "untyped") else storage._untyped()
        assert raw == bytes(untyped), name
        lines.append(f"{name} {dtype} {shape} {raw.hex() or '-'}\n")
    return "".join(lines)


def select(obj, key):
    return obj if key == "-" else obj[key]


def is_state_dict(obj):
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    if os.environ.get("PYTHONHASHSEED") != "0":
        # TorchScript writes a module's constants in set order: fix str hashing.
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # drop cases a previous version wrote
        if name.endswith((".pt", ".pt.expected")) or name == "manifest.tsv":
            os.remove(os.path.join(out_dir, name))

    manifest = []
    for stem, obj, lines in cases():
        file = f"{stem}.pt"
        path = os.path.join(out_dir, file)
        if isinstance(obj, bytes):
            with open(path, "wb") as f:
                f.write(obj)
        elif isinstance(obj, tuple) and obj[0] == "protocol":
            torch.save(obj[2], path, pickle_protocol=obj[1])
            obj = obj[2]
        else:
            torch.save(obj, path)
        for expect, key, note in lines:
            manifest.append(f"{file}\t{expect}\t{key}\t{note}\n")
            if expect != "load":
                if not isinstance(obj, bytes):
                    assert not is_state_dict(select(obj, key) if isinstance(obj, dict) else obj), (file, key)
                continue
            if isinstance(obj, bytes):
                # A TorchScript archive: its parameters, from the module itself.
                module = torch.jit.load(path)
                with open(path + ".expected", "w") as f:
                    f.write(expected_lines(dict(module.state_dict())))
                continue
            selected = select(obj, key)
            assert is_state_dict(selected), (file, key)
            expected = expected_lines(selected)
            with open(path + ".expected", "w") as f:
                f.write(expected)
            # The file must round-trip through torch.load to the same lines.
            assert expected_lines(select(torch.load(path), key)) == expected, file
    with open(os.path.join(out_dir, "manifest.tsv"), "w") as f:
        f.writelines(manifest)
    total = sum(os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir))
    print(f"wrote {len(manifest)} manifest lines, {total} bytes, to {out_dir}")


if __name__ == "__main__":
    main()
