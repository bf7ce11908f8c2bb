// Whole-file reads and atomic writes (a temporary file beside the target, fsync, rename).
#pragma once

#include <cstddef>
#include <string>

namespace mblm::runtime {

// The bytes of `path`; throws std::runtime_error naming `what` and the path when it cannot be read.
std::string read_file(const std::string& path, const std::string& what = "file");

class AtomicFile {
 public:
  // Creates the temporary file in the directory of `path`; throws std::runtime_error.
  explicit AtomicFile(std::string path);
  ~AtomicFile();  // removes the temporary file unless committed
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t bytes);
  // Flushes the data to disk and renames the temporary file to `path`.
  void commit();

 private:
  std::string path_;
  std::string tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

void write_file_atomically(const std::string& path, const std::string& bytes);

}  // namespace mblm::runtime
