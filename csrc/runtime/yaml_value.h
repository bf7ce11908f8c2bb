// Typed reading of YAML scalars as the Python package sees them: PyYAML's YAML 1.1 resolver
// (yaml.safe_load) followed by pydantic's lax coercion into int / float / bool / str fields.
// Errors are std::invalid_argument naming the field.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace YAML {
class Node;
}

namespace mblm::runtime::yaml_value {

// "a.b" / "a[1]" style paths: where + "." + field, or field alone when where is empty.
std::string join(const std::string& where, const std::string& field);

// A short description of a node for messages: 'text', null, a mapping, a list.
std::string describe(const YAML::Node& node);

bool is_null(const YAML::Node& node);  // YAML null (~, null, empty) or absent
int64_t to_int(const YAML::Node& node, const std::string& field);
double to_float(const YAML::Node& node, const std::string& field);
bool to_bool(const YAML::Node& node, const std::string& field);
std::string to_str(const YAML::Node& node, const std::string& field);
std::vector<int64_t> to_int_list(const YAML::Node& node, const std::string& field);

}  // namespace mblm::runtime::yaml_value
