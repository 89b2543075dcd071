#pragma once
// A libFuzzer custom mutator that edits checkpoint files as structures, so inputs get past the
// first check: records of the zip (their bytes, names, order, duplicates), data.pkl opcode by
// opcode (drop, repeat, insert, move, and arguments that are names, dtypes, type tags and edge
// integers), and fields of the central directory, local headers and end record. Rebuilt
// archives carry consistent zip CRC32s and, when the input had one, torchfit's checksum; edited
// fields are resealed with the checksum only. Anything that is not a zip is mutated byte-wise.

#include <cstddef>
#include <cstdint>

namespace torchfit::fuzz {

/// Mutates the `size` bytes at `data` in place (at most `max_size`); returns the new size.
size_t mutate_checkpoint(uint8_t* data, size_t size, size_t max_size, unsigned seed);

}  // namespace torchfit::fuzz
