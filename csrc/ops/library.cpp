// The one TORCH_LIBRARY block of the namespace; each op family adds its schemas with
// TORCH_LIBRARY_FRAGMENT in csrc/ops/<family>.cpp.
#include <torch/library.h>

TORCH_LIBRARY(mblm, m) {}
