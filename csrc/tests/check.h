// The check macro of the C++ test programs: a failed condition is printed with its place and counted,
// and the program goes on, so one run reports every failure; main() returns 1 when `failures` > 0.
#pragma once
#include <cstdio>

static int failures = 0;
#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      failures++;                                                                   \
    }                                                                               \
  } while (0)
