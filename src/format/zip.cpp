#include "format/zip.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cerrno>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>

#include "format/byte_sink.h"
#include "format/zip_layout.h"
#include "torchfit/error.h"

namespace torchfit::detail {

void read_parallel(const FileReader& file, const std::vector<ReadJob>& jobs) {
  uint64_t total = 0;
  for (const auto& job : jobs) total += job.span.size;
  // Cut the byte stream in two halves, splitting the job that straddles the middle.
  std::vector<ReadJob> halves[2];
  uint64_t seen = 0, middle = total < kParallelThreshold ? total : total / 2;
  for (const auto& job : jobs) {
    uint64_t begin = seen, end = seen + job.span.size;
    seen = end;
    if (end <= middle) {
      halves[0].push_back(job);
    } else if (begin >= middle) {
      halves[1].push_back(job);
    } else {
      uint64_t head = middle - begin;
      halves[0].push_back({{job.span.offset, head}, job.destination});
      halves[1].push_back({{job.span.offset + head, job.span.size - head}, static_cast<char*>(job.destination) + head});
    }
  }
  auto run = [&file](const std::vector<ReadJob>& part) {
    for (const auto& job : part) file.read_at(job.span.offset, job.destination, job.span.size);
  };
  if (halves[1].empty()) return run(halves[0]);
  run_pair([&] { run(halves[0]); }, [&] { run(halves[1]); });
}

Trailer read_trailer(const FileReader& file) {
  using Status = Integrity::Status;
  const uint64_t size = file.size();
  if (size == 0) return {{Status::Corrupt, "the file is empty"}};
  const std::string head = file.read_at(0, std::min<uint64_t>(size, 4));
  if (size < 4 || get32(reinterpret_cast<const unsigned char*>(head.data())) != kLocalHeaderSig) {
    if (static_cast<unsigned char>(head[0]) == 0x80) {
      return {{Status::Corrupt,
               "it is in torch.save's legacy format (a bare pickle, not a zip archive): re-save it with a current "
               "torch.save"}};
    }
    return {{Status::Corrupt, "not a checkpoint: the file does not start with a zip record"}};
  }
  const size_t trailer = kEndSize + kCommentSize;
  const uint64_t tail_size = std::min<uint64_t>(size, trailer);
  std::string storage;
  const std::string_view tail = file.bytes_at(size - tail_size, tail_size, storage);
  auto* t = reinterpret_cast<const unsigned char*>(tail.data());
  bool has_comment = tail.size() == trailer && get32(t) == kEndSig && get16(t + 20) == kCommentSize &&
                     std::memcmp(t + kEndSize, kCommentPrefix, std::strlen(kCommentPrefix)) == 0;
  if (!has_comment) {
    // A plain end record with no comment, as other tools write it; a comment
    // length that runs past the end means the file was cut.
    const unsigned char* plain = tail.size() >= kEndSize ? t + tail.size() - kEndSize : nullptr;
    if (plain != nullptr && get32(plain) == kEndSig && get16(plain + 20) == 0) {
      return {{Status::NoChecksum, "the file carries no torchfit checksum (written by another tool)"}};
    }
    return {{Status::Corrupt,
             fmt::format("truncated or damaged: no end-of-archive record in the last bytes of {} bytes", size)}};
  }
  std::string stored(reinterpret_cast<const char*>(t + kEndSize + std::strlen(kCommentPrefix)), 8);
  if (!std::all_of(stored.begin(), stored.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); })) {
    return {{Status::Corrupt, "its checksum comment is not hexadecimal"}};
  }
  auto checksum = static_cast<uint32_t>(std::strtoul(stored.c_str(), nullptr, 16));
  return {{Status::Intact, ""}, checksum, size - kCommentSize};
}

CheckpointError damaged_checkpoint(const std::string& path, const std::string& what) {
  return CheckpointError(fmt::format("Checkpoint {} is damaged: {}", path, what));
}

Integrity checksum_mismatch(uint32_t stored, uint32_t computed) {
  return {Integrity::Status::Corrupt,
          fmt::format("checksum mismatch (stored {:08x}, computed {:08x}): the content is corrupt", stored, computed)};
}

Integrity check_integrity(const FileReader& file) {
  auto trailer = read_trailer(file);
  if (trailer.integrity.status != Integrity::Status::Intact) return trailer.integrity;
  uint32_t computed = read_once(file, {}, trailer.covered);  // every byte into scratch, on two threads from 2 MiB
  if (computed != trailer.checksum) return checksum_mismatch(trailer.checksum, computed);
  return trailer.integrity;
}

namespace {
constexpr uint64_t kReadChunk = 1 << 20;
constexpr uint64_t kDirectRead = 64 << 10;  // smaller jobs are copied out of shared reads
constexpr uint64_t kStretch = 256 << 10;

}  // namespace


namespace {

/// read_once over bytes [begin, end), jobs sorted by offset.
uint32_t read_range_once(const FileReader& file, const std::vector<ReadJob>& jobs, uint64_t begin, uint64_t end) {
  // Large and filled jobs take their bytes in place; small ones are copied out of shared reads.
  auto in_place = [](const ReadJob& job) { return job.filled || job.span.size >= kDirectRead; };
  std::vector<char> scratch;
  uint32_t crc = 0;
  size_t j = 0;
  for (uint64_t pos = begin; pos < end;) {
    while (j < jobs.size() && jobs[j].span.offset + jobs[j].span.size <= pos) ++j;
    if (j < jobs.size() && in_place(jobs[j]) && jobs[j].span.offset <= pos) {
      const auto& job = jobs[j];
      uint64_t n = std::min({job.span.offset + job.span.size, end, pos + kReadChunk}) - pos;
      char* destination = static_cast<char*>(job.destination) + (pos - job.span.offset);
      if (!job.filled) file.read_at(pos, destination, n);
      crc = crc32_of(destination, n, crc);  // while the bytes are in cache
      pos += n;
      continue;
    }
    uint64_t stop = std::min(end, pos + kReadChunk);
    for (size_t k = j; k < jobs.size() && jobs[k].span.offset < stop; ++k) {
      if (in_place(jobs[k])) stop = std::max(pos + 1, std::min(stop, jobs[k].span.offset));
    }
    scratch.resize(stop - pos);
    file.read_at(pos, scratch.data(), scratch.size());
    crc = crc32_of(scratch.data(), scratch.size(), crc);
    for (size_t k = j; k < jobs.size() && jobs[k].span.offset < stop; ++k) {
      const auto& job = jobs[k];
      if (in_place(job)) continue;
      uint64_t from = std::max(pos, job.span.offset), to = std::min(stop, job.span.offset + job.span.size);
      if (from < to) {
        std::memcpy(static_cast<char*>(job.destination) + (from - job.span.offset), scratch.data() + (from - pos),
                    to - from);
      }
    }
    pos = stop;
  }
  return crc;
}

}  // namespace

void expect_read_once(uint64_t size) {
  if (size >= kHelpedRead) expect_run_pair();
}

/// Bytes [0, size) of a file in stretches that two threads take in turn, each stretch
/// checksummed on its own: at most 64 CRCs to combine, stretches of 256 KiB and more, so that
/// the two threads end within about 0.05 ms of each other (with 1 MiB ones, one waited
/// 0.1-0.2 ms for the other at 8 MiB).
struct ReadStretches {
  ReadStretches(const FileReader& file, std::vector<ReadJob> jobs, uint64_t size)
      : file(file), jobs(std::move(jobs)), size(size), stretch(std::max<uint64_t>(kStretch, (size + 63) / 64)),
        crcs(static_cast<size_t>((size + stretch - 1) / stretch)) {}

  /// Reads stretches until none is left; after an error the other thread takes no more.
  void read() {
    try {
      for (size_t i; (i = next.fetch_add(1)) < crcs.size();) {
        crcs[i] = read_range_once(file, jobs, i * stretch, std::min(size, (i + 1) * stretch));
      }
    } catch (...) {
      stop();
      throw;
    }
  }
  void stop() { next = crcs.size(); }
  uint32_t crc() const {
    uint32_t out = crcs.empty() ? 0 : crcs[0];
    for (size_t i = 1; i < crcs.size(); ++i) {
      const uint64_t length = std::min(size, (i + 1) * stretch) - i * stretch;
      out = static_cast<uint32_t>(crc32_combine(out, crcs[i], static_cast<z_off_t>(length)));
    }
    return out;
  }

  const FileReader& file;
  const std::vector<ReadJob> jobs;  // sorted by offset
  const uint64_t size, stretch;
  std::vector<uint32_t> crcs;
  std::atomic<size_t> next{0};
};

uint32_t read_once(const FileReader& file, std::vector<ReadJob> jobs, uint64_t size,
                   const std::function<void()>& alongside) {
  std::sort(jobs.begin(), jobs.end(), [](const ReadJob& a, const ReadJob& b) { return a.span.offset < b.span.offset; });
  if (size < kHelpedRead) {
    if (alongside) alongside();
    return read_range_once(file, jobs, 0, size);
  }
  // The calling thread joins as soon as `alongside` is done (a pickle of a few tensors at once,
  // one of thousands after the helper read most of the file).
  ReadStretches stretches(file, std::move(jobs), size);
  run_pair(
      [&] {
        if (alongside) {
          try {
            alongside();
          } catch (...) {
            stretches.stop();
            throw;
          }
        }
        stretches.read();
      },
      [&] { stretches.read(); });
  return stretches.crc();
}

BackgroundRead::BackgroundRead(const FileReader& file, void* destination, uint64_t size)
    : stretches_(std::make_unique<ReadStretches>(file, std::vector<ReadJob>{{RecordSpan{0, size}, destination}}, size)),
      helper_(std::make_unique<HelperRun>([this] { stretches_->read(); })) {}

BackgroundRead::~BackgroundRead() { stretches_->stop(); }  // then helper_ waits for the helper

uint32_t BackgroundRead::finish() {
  stretches_->read();  // after an error here, the destructor waits for the helper
  helper_->join();
  return stretches_->crc();
}

Integrity check_integrity(const std::string& path) { return check_integrity(FileReader(path)); }

namespace {

constexpr uint32_t kEnd64Sig = 0x06064b50;
constexpr uint32_t kEnd64LocatorSig = 0x07064b50;
constexpr size_t kCentralHeaderSize = 46;
constexpr uint32_t kMax32 = 0xffffffff;

uint64_t get64(const unsigned char* p) { return get32(p) | (static_cast<uint64_t>(get32(p + 4)) << 32); }

/// Where end-of-central-directory records start in the file's last bytes `tail` (at
/// `tail_offset`): those whose comment ends the file, last first. More than one means a record
/// planted in another's comment, and readers disagree on which counts.
std::vector<uint64_t> find_end_records(std::string_view tail, uint64_t tail_offset) {
  std::vector<uint64_t> out;
  auto* t = reinterpret_cast<const unsigned char*>(tail.data());
  // Each record starts with 'P': memrchr skips what lies between (a byte-by-byte scan of the
  // 64 KiB took 45 µs, a tenth of a cached 8 MiB read).
  for (size_t limit = tail.size() - kEndSize + 1; limit > 0;) {
    const auto* candidate = static_cast<const unsigned char*>(memrchr(t, 'P', limit));
    if (candidate == nullptr) break;
    const size_t at = static_cast<size_t>(candidate - t);
    if (get32(t + at) == kEndSig && at + kEndSize + get16(t + at + 20) == tail.size()) out.push_back(tail_offset + at);
    limit = at;
  }
  return out;
}

}  // namespace

DirectoryLocation locate_directory(const FileReader& file) {
  const uint64_t size = file.size();
  auto damaged = [&](const std::string& what) { return damaged_checkpoint(file.path(), what); };
  if (size < kEndSize) throw damaged(fmt::format("{} bytes are too few for a zip archive", size));
  // The end record sits in the last kEndSize bytes plus its comment (up to 64 KiB), all of which
  // is searched: a second record in there is refused, not resolved.
  const uint64_t tail_size = std::min<uint64_t>(size, kEndSize + 0xffff);
  static_assert(kKeptTail >= kEndSize + 0xffff, "the end record's search is served from the kept tail");
  std::string tail_storage;
  const std::string_view tail = file.bytes_at(size - tail_size, tail_size, tail_storage);
  const auto end_records = find_end_records(tail, size - tail_size);
  if (end_records.empty()) throw damaged("no zip end-of-directory record");
  if (end_records.size() > 1) {
    throw damaged(fmt::format("{} zip end-of-directory records end the file (at {} and {}): one is planted in the "
                              "other's comment",
                              end_records.size(), end_records.back(), end_records.front()));
  }
  const uint64_t end_offset = end_records.front();
  auto* end = reinterpret_cast<const unsigned char*>(tail.data() + (end_offset - (size - tail_size)));
  uint64_t count = get16(end + 10), directory_size = get32(end + 12), directory_offset = get32(end + 16);
  if (count == 0xffff || directory_size == kMax32 || directory_offset == kMax32) {
    // zip64: a locator right before the end record points at the zip64 end record.
    if (end_offset < 20) throw damaged("the zip64 locator is missing");
    std::string locator = file.read_at(end_offset - 20, 20);
    auto* l = reinterpret_cast<const unsigned char*>(locator.data());
    uint64_t end64_offset = get64(l + 8);
    if (get32(l) != kEnd64LocatorSig || end64_offset > end_offset || end_offset - end64_offset < 56) {
      throw damaged("the zip64 end record is missing");
    }
    std::string end64 = file.read_at(end64_offset, 56);
    auto* e = reinterpret_cast<const unsigned char*>(end64.data());
    if (get32(e) != kEnd64Sig) throw damaged("the zip64 end record is missing");
    count = get64(e + 32);
    directory_size = get64(e + 40);
    directory_offset = get64(e + 48);
  }
  if (directory_offset > end_offset || directory_size > end_offset - directory_offset ||
      count > directory_size / kCentralHeaderSize) {
    throw damaged(fmt::format("its zip directory ({} records, {} bytes at {}) does not fit in {} bytes", count,
                              directory_size, directory_offset, size));
  }
  return {count, directory_size, directory_offset};
}

ZipDirectory read_directory(const FileReader& file, bool read_local_headers) {
  return read_directory(file, locate_directory(file), read_local_headers);
}

ZipDirectory read_directory(const FileReader& file, const DirectoryLocation& location, bool read_local_headers) {
  auto damaged = [&](const std::string& what) { return damaged_checkpoint(file.path(), what); };
  const auto [count, directory_size, directory_offset] = location;
  ScratchBytes directory_storage;
  const std::string_view directory = file.bytes_at(directory_offset, directory_size, directory_storage.get());
  auto* bytes = reinterpret_cast<const unsigned char*>(directory.data());
  struct Entry {
    std::string_view name;  // into `directory`
    RecordSpan span;        // offset still unknown: it depends on the local header
  };
  std::vector<Entry> entries;
  entries.reserve(count);
  uint64_t at = 0;
  for (uint64_t i = 0; i < count; ++i) {
    if (directory_size - at < kCentralHeaderSize || get32(bytes + at) != kCentralHeaderSig) {
      throw damaged(fmt::format("zip directory entry {} is broken", i));
    }
    const unsigned char* h = bytes + at;
    const size_t name_size = get16(h + 28), extra_size = get16(h + 30), comment_size = get16(h + 32);
    if (directory_size - at - kCentralHeaderSize < name_size + extra_size + comment_size) {
      throw damaged(fmt::format("zip directory entry {} runs past the directory", i));
    }
    const std::string_view name(reinterpret_cast<const char*>(h + kCentralHeaderSize), name_size);
    const uint16_t flags = get16(h + 8), method = get16(h + 10);
    if (flags & 0x0001) throw damaged(fmt::format("record {} is encrypted", name));
    if (method != 0 && method != 8) throw damaged(fmt::format("record {} uses compression method {}", name, method));
    uint64_t uncompressed = get32(h + 24), record_size = get32(h + 20), local = get32(h + 42);
    const uint32_t crc = get32(h + 16);
    // zip64 sizes and offsets live in extra field 0x0001, in this order, for the fields set to 0xffffffff.
    const unsigned char* extra = h + kCentralHeaderSize + name_size;
    for (size_t x = 0; x + 4 <= extra_size;) {
      const size_t field_size = get16(extra + x + 2);
      if (get16(extra + x) == 0x0001) {
        size_t f = x + 4, field_end = std::min(x + 4 + field_size, extra_size);
        auto take64 = [&](uint64_t& value) {
          if (value != kMax32) return;
          if (f + 8 > field_end) throw damaged(fmt::format("record {} has a short zip64 field", name));
          value = get64(extra + f);
          f += 8;
        };
        take64(uncompressed);
        take64(record_size);
        take64(local);
      }
      x += 4 + field_size;
    }
    // Every local header lies before the directory: readers size their buffers from the gaps
    // between headers and the directory, which must not run backwards.
    if (local > directory_offset || directory_offset - local < kLocalHeaderSize) {
      throw damaged(fmt::format("record {} starts at {}, not before the zip directory at {}", name, local,
                                directory_offset));
    }
    if (method == 0 && uncompressed != record_size) {
      throw damaged(fmt::format("record {} is stored but its sizes differ ({} and {})", name, record_size, uncompressed));
    }
    entries.push_back({name, {0, record_size, crc, method, uncompressed, local}});
    at += kCentralHeaderSize + name_size + extra_size + comment_size;
  }
  ZipDirectory out;
  out.directory_offset = directory_offset;
  if (read_local_headers) {
    // Local headers close to each other are read together: one read for many
    // small records instead of one per record.
    constexpr uint64_t kHeaderWindow = 256 << 10;
    std::vector<Entry*> by_offset;
    for (auto& entry : entries) by_offset.push_back(&entry);
    std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->span.local < b->span.local; });
    std::vector<char> window;
    for (size_t first = 0; first < by_offset.size();) {
      const uint64_t begin = by_offset[first]->span.local;
      size_t last = first;
      while (last + 1 < by_offset.size() && by_offset[last + 1]->span.local + kLocalHeaderSize - begin <= kHeaderWindow) {
        ++last;
      }
      window.resize(by_offset[last]->span.local + kLocalHeaderSize - begin);
      file.read_at(begin, window.data(), window.size());
      for (size_t k = first; k <= last; ++k) {
        Entry& entry = *by_offset[k];
        resolve_offset(file, entry.name, entry.span,
                       reinterpret_cast<const unsigned char*>(window.data() + (entry.span.local - begin)));
      }
      first = last + 1;
    }
  }
  out.records.reserve(entries.size());
  for (auto& entry : entries) {
    auto slash = entry.name.find('/');
    auto name = slash == std::string_view::npos ? entry.name : entry.name.substr(slash + 1);
    // Readers disagree on which copy of a repeated name counts (Python's the first): refused.
    if (!out.records.insert(name, entry.span)) throw damaged(fmt::format("record {} appears twice", name));
  }
  return out;
}

namespace {

/// The first of `records` (a RecordMap's vector) whose name is not before `name`.
template <typename Records>
auto first_not_before(Records& records, std::string_view name) {
  auto before = [](const auto& record, std::string_view name) { return RecordNameLess()(record.first, name); };
  return std::lower_bound(records.begin(), records.end(), name, before);
}

}  // namespace

RecordMap::const_iterator RecordMap::find(std::string_view name) const {
  auto it = first_not_before(records_, name);
  return it != records_.end() && it->first == name ? it : records_.end();
}

const RecordSpan& RecordMap::at(std::string_view name) const {
  auto it = find(name);
  if (it == end()) throw std::out_of_range(fmt::format("no zip record {}", name));
  return it->second;
}

bool RecordMap::insert(std::string_view name, const RecordSpan& span) {
  // Files list their records in this order (torchfit's and LibTorch's writers do): appended.
  auto at = records_.end();
  if (!records_.empty() && !RecordNameLess()(records_.back().first, name)) {
    at = first_not_before(records_, name);
    if (at->first == name) return false;
  }
  records_.emplace(at, std::string(name), span);
  return true;
}

void resolve_offset(const FileReader& file, std::string_view name, RecordSpan& span, const unsigned char* header) {
  if (get32(header) != kLocalHeaderSig) {
    throw CheckpointError(fmt::format("Checkpoint {} is damaged: record {} has no local header", file.path(), name));
  }
  const uint64_t data = span.local + kLocalHeaderSize + get16(header + 26) + get16(header + 28);
  if (data > file.size() || span.size > file.size() - data) {
    throw CheckpointError(fmt::format("Checkpoint {} is damaged: record {} ({} bytes at {}) runs past the end of the file",
                                      file.path(), name, span.size, data));
  }
  span.offset = data;
}

void resolve_offset(const FileReader& file, std::string_view name, RecordSpan& span) {
  unsigned char header[kLocalHeaderSize];
  file.read_at(span.local, header, sizeof header);
  resolve_offset(file, name, span, header);
}

void check_record_crc(const FileReader& file, const std::string& name, const RecordSpan& span, const void* data) {
  uint32_t computed = crc32_of(data, span.size);
  if (computed != span.crc) {
    throw CheckpointError(fmt::format("Checkpoint {} is damaged: record {} fails its zip CRC32 (stored {:08x}, "
                                      "computed {:08x})",
                                      file.path(), name, span.crc, computed));
  }
}

}  // namespace torchfit::detail
