#pragma once
// c10d's differences between LibTorch versions (see libtorch.h).

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

namespace torchfit::compat {

/// TCPStore options that work on every build: 2.4 and later default to libuv, which Debian's 2.6
/// is built without, so the store is asked for the classic server (the only one up to 2.3).
c10d::TCPStoreOptions tcp_store_options();

/// A Gloo process group: ProcessGroupGloo is itself a ProcessGroup up to 1.13; from 2.0 it is a
/// c10d::Backend that a ProcessGroup dispatches to.
c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_group(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                       int size,
                                                       c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> options);

}  // namespace torchfit::compat
