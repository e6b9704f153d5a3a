#include "memory.h"

#include <cstdio>
#include <cstring>
#include <string>

#include "error.h"

namespace fmoe {

size_t available_memory_bytes() {
#ifdef __linux__
  std::FILE* f = std::fopen("/proc/meminfo", "r");
  if (!f) return 0;
  char line[256];
  size_t avail_kb = 0, swap_kb = 0;
  while (std::fgets(line, sizeof line, f)) {
    unsigned long long v;
    if (std::sscanf(line, "MemAvailable: %llu kB", &v) == 1)
      avail_kb = size_t(v);
    else if (std::sscanf(line, "SwapFree: %llu kB", &v) == 1)
      swap_kb = size_t(v);
  }
  std::fclose(f);
  return (avail_kb + swap_kb) * 1024;
#else
  return 0;
#endif
}

void check_memory_available(size_t bytes, const char* what, const char* hint) {
  const size_t avail = available_memory_bytes();
  if (avail != 0 && bytes > avail)
    fail(ErrorCode::OutOfMemory,
         std::string(what) + " needs " + std::to_string(bytes >> 20) + " MiB but only " + std::to_string(avail >> 20) +
             " MiB are available; " +
             (hint ? hint : "use 16-bit weights, fewer experts, or a machine with more memory"));
}

}  // namespace fmoe
