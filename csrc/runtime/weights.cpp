// safetensors, from the format's definition: an 8-byte little-endian header length N, N bytes of
// JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then
// the tensor bytes (offsets relative to the end of the header, little-endian, row-major).
#include "weights.h"

#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "file_io.h"
#include "json.h"

namespace mblm::runtime {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; this reader copies bytes as they are");

struct DtypeName {
  const char* name;
  at::ScalarType type;
};

constexpr std::array<DtypeName, 10> kDtypes{{
    {"F64", at::kDouble},
    {"F32", at::kFloat},
    {"F16", at::kHalf},
    {"BF16", at::kBFloat16},
    {"I64", at::kLong},
    {"I32", at::kInt},
    {"I16", at::kShort},
    {"I8", at::kChar},
    {"U8", at::kByte},
    {"BOOL", at::kBool},
}};

// Defined by the format but not read by this runtime.
constexpr std::array<const char*, 7> kOtherDtypes{"U16",     "U32",     "U64", "F8_E4M3",
                                                  "F8_E5M2", "F8_E8M0", "F4"};

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference implementation's limit

std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

struct Entry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

class HeaderError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

at::ScalarType parse_dtype(const json::Value& value, const std::string& name) {
  if (!value.is_string()) throw HeaderError("tensor '" + name + "': dtype must be a string");
  for (const DtypeName& d : kDtypes) {
    if (value.text == d.name) return d.type;
  }
  for (const char* other : kOtherDtypes) {
    if (value.text == other) {
      throw HeaderError("tensor '" + name + "': dtype " + value.text +
                        " is not supported (supported: F64, F32, F16, BF16, I64, I32, I16, I8, "
                        "U8, BOOL)");
    }
  }
  throw HeaderError("tensor '" + name + "': unknown dtype '" + value.text + "'");
}

uint64_t non_negative(const json::Value& value, const std::string& what) {
  int64_t n = 0;
  if (!value.to_int64(n) || n < 0) {
    throw HeaderError(what + " must be a non-negative integer, got " +
                      (value.type == json::Value::Type::kNumber ? value.text : value.type_name()));
  }
  return static_cast<uint64_t>(n);
}

Entry parse_entry(const std::string& name, const json::Value& info, uint64_t buffer_bytes) {
  if (!info.is_object()) throw HeaderError("tensor '" + name + "': expected an object");
  const json::Value* dtype = nullptr;
  const json::Value* shape = nullptr;
  const json::Value* offsets = nullptr;
  for (const auto& [key, v] : info.members) {
    if (key == "dtype") dtype = &v;
    if (key == "shape") shape = &v;
    if (key == "data_offsets") offsets = &v;
  }
  for (const auto& [key, ptr] :
       {std::pair{"dtype", dtype}, std::pair{"shape", shape}, std::pair{"data_offsets", offsets}}) {
    if (ptr == nullptr) throw HeaderError("tensor '" + name + "': no " + key + " entry");
  }
  Entry e{name, parse_dtype(*dtype, name)};
  if (!shape->is_array()) throw HeaderError("tensor '" + name + "': shape must be an array");
  uint64_t numel = 1;
  for (const json::Value& dim : shape->items) {
    const uint64_t d = non_negative(dim, "tensor '" + name + "': every shape entry");
    if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      throw HeaderError("tensor '" + name + "': shape entry too large");
    }
    if (d != 0 && numel > std::numeric_limits<uint64_t>::max() / d / 8) {
      throw HeaderError("tensor '" + name + "': shape " + shape_str(e.shape) + "... is too large");
    }
    numel *= d;
    e.shape.push_back(static_cast<int64_t>(d));
  }
  if (!offsets->is_array() || offsets->items.size() != 2) {
    throw HeaderError("tensor '" + name + "': data_offsets must be [begin, end]");
  }
  e.begin = non_negative(offsets->items[0], "tensor '" + name + "': data_offsets[0]");
  e.end = non_negative(offsets->items[1], "tensor '" + name + "': data_offsets[1]");
  if (e.end < e.begin) {
    throw HeaderError("tensor '" + name + "': data_offsets [" + std::to_string(e.begin) + ", " +
                      std::to_string(e.end) + "] end before they begin");
  }
  const uint64_t expected = numel * c10::elementSize(e.dtype);
  if (e.end - e.begin != expected) {
    throw HeaderError("tensor '" + name + "': data_offsets [" + std::to_string(e.begin) + ", " +
                      std::to_string(e.end) + "] span " + std::to_string(e.end - e.begin) +
                      " bytes, but shape " + shape_str(e.shape) + " of " + dtype->text + " needs " +
                      std::to_string(expected));
  }
  if (e.end > buffer_bytes) {
    throw HeaderError("tensor '" + name + "': data_offsets [" + std::to_string(e.begin) + ", " +
                      std::to_string(e.end) + "] reach beyond the data buffer (" +
                      std::to_string(buffer_bytes) + " bytes; is the file truncated?)");
  }
  return e;
}

std::map<std::string, std::string> parse_metadata(const json::Value& value) {
  if (!value.is_object()) throw HeaderError("__metadata__ must be an object of strings");
  std::map<std::string, std::string> metadata;
  for (const auto& [key, v] : value.members) {
    if (!v.is_string()) {
      throw HeaderError("__metadata__['" + key + "'] must be a string, got " + v.type_name());
    }
    if (!metadata.emplace(key, v.text).second) {
      throw HeaderError("__metadata__ has the key '" + key + "' twice");
    }
  }
  return metadata;
}

void check_no_overlap(std::vector<Entry>& entries) {
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  const Entry* previous = nullptr;
  for (const Entry& e : entries) {
    if (e.begin == e.end) continue;
    if (previous != nullptr && e.begin < previous->end) {
      throw HeaderError("tensors '" + previous->name + "' and '" + e.name +
                        "' overlap in the data buffer");
    }
    previous = &e;
  }
}

void read_exact(std::ifstream& file, char* out, uint64_t bytes, uint64_t offset) {
  file.seekg(static_cast<std::streamoff>(offset));
  file.read(out, static_cast<std::streamsize>(bytes));
  if (!file || static_cast<uint64_t>(file.gcount()) != bytes) {
    throw HeaderError("could not read " + std::to_string(bytes) + " bytes at offset " +
                      std::to_string(offset) + " (is the file truncated?)");
  }
}

Weights load(const std::string& path) {
  std::error_code ec;
  const uint64_t file_bytes = std::filesystem::file_size(path, ec);
  if (ec) throw HeaderError("cannot open the file: " + ec.message());
  std::ifstream file(path, std::ios::binary);
  if (!file) throw HeaderError("cannot open the file: " + std::string(std::strerror(errno)));
  if (file_bytes < 8) {
    throw HeaderError("the file has " + std::to_string(file_bytes) +
                      " bytes, fewer than the 8-byte header length");
  }
  unsigned char length_bytes[8];
  read_exact(file, reinterpret_cast<char*>(length_bytes), 8, 0);
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | length_bytes[i];
  if (header_bytes > file_bytes - 8) {
    throw HeaderError("the header length " + std::to_string(header_bytes) +
                      " reaches beyond the end of the file (" + std::to_string(file_bytes) +
                      " bytes; truncated, or not a safetensors file)");
  }
  if (header_bytes > kMaxHeaderBytes) {
    throw HeaderError("the header length " + std::to_string(header_bytes) + " exceeds " +
                      std::to_string(kMaxHeaderBytes) + " bytes");
  }
  std::string header(header_bytes, '\0');
  read_exact(file, header.data(), header_bytes, 8);
  json::Value root;
  try {
    root = json::parse(header);
  } catch (const std::invalid_argument& err) {
    throw HeaderError(std::string("the header is not valid JSON: ") + err.what());
  }
  if (!root.is_object()) throw HeaderError("the header is not a JSON object");

  const uint64_t buffer_bytes = file_bytes - 8 - header_bytes;
  std::map<std::string, std::string> metadata;
  std::vector<Entry> entries;
  std::set<std::string> names;
  bool seen_metadata = false;
  for (const auto& [name, info] : root.members) {
    if (name == "__metadata__") {
      if (seen_metadata) throw HeaderError("__metadata__ appears twice");
      seen_metadata = true;
      metadata = parse_metadata(info);
      continue;
    }
    if (!names.insert(name).second) throw HeaderError("tensor '" + name + "' appears twice");
    entries.push_back(parse_entry(name, info, buffer_bytes));
  }
  check_no_overlap(entries);

  std::map<std::string, at::Tensor> tensors;
  const uint64_t data_start = 8 + header_bytes;
  for (const Entry& e : entries) {
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype));
    char* data = static_cast<char*>(t.data_ptr());
    read_exact(file, data, e.end - e.begin, data_start + e.begin);
    if (e.dtype == at::kBool) {
      for (uint64_t i = 0; i < e.end - e.begin; ++i) {
        if (data[i] != 0 && data[i] != 1) {
          throw HeaderError("tensor '" + e.name + "': BOOL byte " + std::to_string(i) +
                            " is neither 0 nor 1");
        }
      }
    }
    tensors.emplace(e.name, std::move(t));
  }
  return Weights::from_map(std::move(tensors), std::move(metadata));
}

const char* dtype_name(at::ScalarType type, const std::string& tensor) {
  for (const DtypeName& d : kDtypes) {
    if (d.type == type) return d.name;
  }
  throw std::invalid_argument("save_safetensors: tensor '" + tensor + "' has dtype " +
                              std::string(c10::toString(type)) +
                              ", which safetensors files of this runtime cannot hold");
}

}  // namespace

Weights Weights::load_safetensors(const std::string& path) {
  try {
    return load(path);
  } catch (const HeaderError& err) {
    throw std::runtime_error("safetensors file " + path + ": " + err.what());
  }
}

Weights Weights::from_map(std::map<std::string, at::Tensor> tensors,
                          std::map<std::string, std::string> metadata) {
  Weights w;
  w.tensors_ = std::move(tensors);
  w.metadata_ = std::move(metadata);
  return w;
}

bool Weights::contains(const std::string& name) const { return tensors_.count(name) != 0; }

const at::Tensor& Weights::get(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) throw std::invalid_argument("missing tensor '" + name + "'");
  used_.insert(name);
  return it->second;
}

const at::Tensor& Weights::get(const std::string& name, at::IntArrayRef shape) const {
  const at::Tensor& t = get(name);
  if (t.sizes() != shape) {
    throw std::invalid_argument("tensor '" + name + "' has shape " + shape_str(t.sizes()) +
                                ", expected " + shape_str(shape));
  }
  return t;
}

std::vector<std::string> Weights::unused() const {
  std::vector<std::string> names;
  for (const auto& [name, tensor] : tensors_) {
    if (used_.count(name) == 0) names.push_back(name);
  }
  return names;
}

void Weights::to(const at::TensorOptions& options) {
  for (auto& [name, tensor] : tensors_) {
    at::TensorOptions target = at::TensorOptions().device(options.device());
    if (options.has_dtype() && tensor.is_floating_point()) target = target.dtype(options.dtype());
    tensor = tensor.to(target);
  }
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, at::Tensor>> contiguous;
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [key, value] : metadata) {
      header += (first ? "" : ",") + json::quote(key) + ":" + json::quote(value);
      first = false;
    }
    header += "}";
  }
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__") {
      throw std::invalid_argument("save_safetensors: '__metadata__' cannot name a tensor");
    }
    if (!tensor.defined()) {
      throw std::invalid_argument("save_safetensors: tensor '" + name + "' is undefined");
    }
    const char* dtype = dtype_name(tensor.scalar_type(), name);
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header += (header.size() > 1 ? "," : "") + json::quote(name) + ":{\"dtype\":\"" + dtype +
              "\",\"shape\":" + shape_str(t.sizes()) + ",\"data_offsets\":[" +
              std::to_string(offset) + "," + std::to_string(offset + bytes) + "]}";
    offset += bytes;
    contiguous.emplace_back(name, std::move(t));
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');  // the data starts 8-byte aligned

  AtomicFile file(path);
  unsigned char length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(header.size() >> (8 * i));
  file.write(length, 8);
  file.write(header.data(), header.size());
  for (const auto& [name, t] : contiguous) {
    file.write(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
  }
  file.commit();
}

}  // namespace mblm::runtime
