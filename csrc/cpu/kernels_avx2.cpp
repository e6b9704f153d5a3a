// avx2 kernel set: not written yet, so the set reports "not built".
#include "../core/kernels.h"

namespace fmoe {
const KernelSet* kernels_avx2() { return nullptr; }
}  // namespace fmoe
