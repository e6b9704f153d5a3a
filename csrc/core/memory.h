// How much memory the system can still give us, so a layer too big to pack is refused with
// ERR_MOE_OUT_OF_MEMORY instead of being killed by the kernel's OOM killer half-way through.
#pragma once
#include <cstddef>

namespace fmoe {
// Bytes available for new allocations (MemAvailable + free swap on Linux); 0 when unknown.
size_t available_memory_bytes();
// Throws MoeException(OutOfMemory) naming `what` when `bytes` exceeds what is available; `hint` says
// how to need less (the default speaks of weights).
void check_memory_available(size_t bytes, const char* what, const char* hint = nullptr);
}  // namespace fmoe
