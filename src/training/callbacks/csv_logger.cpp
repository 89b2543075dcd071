#include "torchfit/callbacks/csv_logger.h"

#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "io/atomic_file.h"
#include "sys/paths.h"
#include "sys/posix_file.h"
#include "training/rank_policy.h"
#include "torchfit/error.h"
#include "torchfit/training_context.h"

namespace torchfit {

CSVLogger::CSVLogger(std::string filename, char separator, bool append)
    : filename_(std::move(filename)), separator_(separator), append_(append) {
  if (filename_.empty()) throw ValueError("CSVLogger: filename must not be empty");
}

namespace {

/// Removes the rows of epochs `epoch` and later (a resumed run writes them again).
void drop_rows_from(const std::string& filename, int64_t epoch, char separator) {
  std::ifstream in(filename);
  if (!in) return;
  std::string line, kept;
  bool dropped = false, header = true;
  while (std::getline(in, line)) {
    if (!header) {
      const char* first = line.c_str();
      char* end = nullptr;
      long long row = std::strtoll(first, &end, 10);
      if (end != first && *end == separator && row >= epoch) {
        dropped = true;
        continue;
      }
    }
    header = false;
    kept += line + '\n';
  }
  if (!dropped) return;
  detail::AtomicFile out(filename, /*fsync=*/false);
  out.write(kept.data(), kept.size());
  out.commit();
}

}  // namespace

void CSVLogger::on_train_begin(const Logs&) {
  enabled_ = context_ == nullptr || context_->is_main_process();  // one writer when data-parallel
  const auto directory = detail::parent_directory(filename_);
  if (context_ != nullptr) {
    detail::check_on_main(*context_, [&] { detail::check_writable_directory(directory, "CSVLogger"); });
  } else {
    detail::check_writable_directory(directory, "CSVLogger");
  }
  if (!enabled_) return;
  detail::create_parent_directories(filename_);
  // A run resumed by load_checkpoint or BackupAndRestore continues its file, as
  // with `append`, less the rows of the epochs it runs again.
  const bool resumed = context_ != nullptr && !context_->resumed_from().empty() &&
                       (context_->state().epoch > 0 || context_->state().batch_in_epoch > 0);
  const bool append = append_ || resumed;
  if (resumed) drop_rows_from(filename_, context_->state().epoch, separator_);
  // As Keras: appending to a non-empty file keeps its header and columns.
  write_header_ = !(append && detail::file_size_or_zero(filename_) > 0);
  keys_.clear();
  if (!write_header_) {
    std::ifstream in(filename_);
    std::string header;
    std::getline(in, header);
    size_t start = header.find(separator_);  // skip the "epoch" column
    while (start != std::string::npos) {
      size_t end = header.find(separator_, start + 1);
      keys_.push_back(header.substr(start + 1, end == std::string::npos ? std::string::npos : end - start - 1));
      start = end;
    }
  }
  file_.open(filename_, append ? std::ios::app : std::ios::trunc);
  if (!file_) {
    throw Error(fmt::format("CSVLogger: failed opening {} for writing: {}", filename_, std::strerror(errno)));
  }
}

void CSVLogger::on_epoch_end(int64_t epoch, const Logs& logs) {
  if (!enabled_) return;
  if (keys_.empty()) {
    for (const auto& entry : logs) keys_.push_back(entry.first);  // Logs are sorted by key
  }
  if (write_header_) {
    file_ << "epoch";
    for (const auto& key : keys_) file_ << separator_ << key;
    file_ << '\n';
    write_header_ = false;
  }
  file_ << epoch;
  for (const auto& key : keys_) {
    auto it = logs.find(key);
    file_ << separator_ << (it == logs.end() ? std::string("NA") : fmt::format("{}", it->second));
  }
  file_ << '\n';
  file_.flush();
  if (!file_) throw Error(fmt::format("CSVLogger: failed writing {}: {}", filename_, std::strerror(errno)));
}

void CSVLogger::on_train_end(const Logs&) { file_.close(); }

}  // namespace torchfit
