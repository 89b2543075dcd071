#pragma once
// Path text, without touching the file system: what the engine and the callbacks need to name
// files, leaving every access to storage to CheckpointIO.

#include <algorithm>
#include <string>

namespace torchfit::detail {

/// "a/b" for "a/b/c.pt", "" for "c.pt", "/" for "/c.pt".
inline std::string parent_directory(const std::string& path) {
  const auto slash = path.rfind('/');
  if (slash == std::string::npos) return "";
  return slash == 0 ? "/" : path.substr(0, slash);
}

/// `directory` + "/" + `name`, or `name` alone for the working directory ("").
inline std::string join_path(const std::string& directory, const std::string& name) {
  if (directory.empty()) return name;
  return directory.back() == '/' ? directory + name : directory + "/" + name;
}

/// Whether a component of `path` is "..".
inline bool climbs(const std::string& path) {
  size_t start = 0;
  while (start <= path.size()) {
    const size_t end = std::min(path.find('/', start), path.size());
    if (path.compare(start, end - start, "..") == 0 && end - start == 2) return true;
    start = end + 1;
  }
  return false;
}

}  // namespace torchfit::detail
