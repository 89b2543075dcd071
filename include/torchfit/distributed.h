#pragma once
/// \file
/// Data-parallel training on torch.distributed's c10d.
///
///     auto group = torchfit::distributed::init_from_env();   // torchrun's variables
///     trainer.set_process_group(group);
///     trainer.fit(x, y, options);   // each rank trains on its shard; rank 0 writes checkpoints
///
/// Start N local processes with examples/launch.sh, or set RANK, WORLD_SIZE,
/// MASTER_ADDR and MASTER_PORT yourself on each host.

#include <chrono>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace torchfit::distributed {

/// Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and validates LOCAL_RANK) as
/// torchrun sets them, builds a TCPStore (served by rank 0) and a Gloo process group.
/// Collectives that wait longer than `timeout` (a dead peer) fail with a
/// `torchfit::Error`. Throws `ValueError` naming a missing or bad variable.
c10::intrusive_ptr<c10d::ProcessGroup> init_from_env(std::chrono::milliseconds timeout = std::chrono::seconds(60));

}  // namespace torchfit::distributed
