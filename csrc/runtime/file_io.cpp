#include "file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace mblm::runtime {
namespace {

std::string errno_text() { return std::strerror(errno); }

std::filesystem::path directory_of(const std::string& path) {
  const std::filesystem::path p(path);
  return p.has_parent_path() ? p.parent_path() : std::filesystem::path(".");
}

}  // namespace

std::string read_file(const std::string& path, const std::string& what) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw std::runtime_error(what + " " + path + " does not exist or is not a file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(what + " " + path + " cannot be read: " + errno_text());
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error(what + " " + path + " cannot be read");
  return bytes;
}

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  const std::filesystem::path target(path_);
  tmp_ = (directory_of(path_) / ("." + target.filename().string() + ".XXXXXX")).string();
  fd_ = ::mkstemp(tmp_.data());
  if (fd_ < 0) {
    throw std::runtime_error("cannot create a temporary file for " + path_ + ": " + errno_text());
  }
  ::fchmod(fd_, 0644);  // mkstemp makes the file private to its owner
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd_, p, bytes);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("writing " + path_ + " failed: " + errno_text());
    }
    p += n;
    bytes -= static_cast<size_t>(n);
  }
}

void AtomicFile::commit() {
  const bool synced = ::fsync(fd_) == 0;
  const bool closed = ::close(fd_) == 0;
  fd_ = -1;
  if (!synced || !closed) throw std::runtime_error("writing " + path_ + " failed: " + errno_text());
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    throw std::runtime_error("renaming " + tmp_ + " to " + path_ + " failed: " + errno_text());
  }
  committed_ = true;
  const int dir = ::open(directory_of(path_).c_str(), O_RDONLY | O_DIRECTORY);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

void write_file_atomically(const std::string& path, const std::string& bytes) {
  AtomicFile file(path);
  file.write(bytes.data(), bytes.size());
  file.commit();
}

}  // namespace mblm::runtime
