// The correctness suites main runs, and the layer helpers the benchmark shares with them.
#pragma once
#include <cstdint>
#include <vector>

#include "data.h"
#include "fused_moe_cuda.h"

namespace fmoe_selftest {

void run_stage_tests();   // stage_tests.cpp
void run_layer_tests();   // layer_tests.cpp
void run_family_tests();  // family_tests.cpp

// A layer on device 0 with L's weights; a failure ends the program (exit status 2).
fmoe_cuda_layer* create(const HostLayer& L);
// Host forward into an output filled with NaN bytes first; a failure ends the program.
std::vector<float> forward(fmoe_cuda_layer* layer, const float* x, int64_t T, int64_t H);

}  // namespace fmoe_selftest
