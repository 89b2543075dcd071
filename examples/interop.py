"""Python side of the interop example (run with Debian's /usr/bin/python3).

    python3 interop.py evaluate <dir>   evaluates <dir>/from_cpp.pt, written by `interop train`
    python3 interop.py train <dir>      trains in Python; writes <dir>/from_python.pt for C++
"""
import collections
import gzip
import os
import sys

import torch

DATA = "/usr/share/datasets/fashion-mnist"


def read_idx(name, offset):
    with gzip.open(os.path.join(DATA, name + ".gz"), "rb") as f:
        return torch.frombuffer(bytearray(f.read()[offset:]), dtype=torch.uint8)


def load(kind):
    images = read_idx(f"{kind}-images-idx3-ubyte", 16).view(-1, 784).float() / 255.0
    labels = read_idx(f"{kind}-labels-idx1-ubyte", 8).long()
    return images, labels


def make_net():
    # The same names as the C++ example's Net, so the state dicts match.
    return torch.nn.Sequential(collections.OrderedDict(
        fc1=torch.nn.Linear(784, 256), relu=torch.nn.ReLU(), fc2=torch.nn.Linear(256, 10)))


def accuracy(net, images, labels):
    net.eval()
    with torch.no_grad():
        return (net(images).argmax(1) == labels).float().mean().item()


def main():
    mode, directory = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    net = make_net()
    test_images, test_labels = load("t10k")
    if mode == "evaluate":
        net.load_state_dict(torch.load(os.path.join(directory, "from_cpp.pt")))
        result = accuracy(net, test_images, test_labels)
        print(f"Python evaluated C++'s model: test accuracy {result:.4f}")
    else:
        images, labels = load("train")
        images, labels = images[:10000], labels[:10000]
        optimizer = torch.optim.Adam(net.parameters(), 1e-3)
        for _ in range(2):
            for start in range(0, len(images), 64):
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(images[start:start + 64]), labels[start:start + 64])
                loss.backward()
                optimizer.step()
        torch.save(net.state_dict(), os.path.join(directory, "from_python.pt"))
        result = accuracy(net, test_images, test_labels)
        print(f"Python trained: test accuracy {result:.4f}")
    sys.exit(0 if result > 0.7 else 1)


if __name__ == "__main__":
    main()
