// The JSON and text files the self-test leaves in its output folder (bench/gpu/run.sh returns them).
#pragma once
#include <string>
#include <vector>

#include "bench.h"
#include "data.h"
#include "fused_moe_cuda.h"

namespace fmoe_selftest {

std::string json_escape(const std::string& s);
void write_file(const std::string& path, const std::string& text);

// The lines every JSON file opens with: device, compute capability, driver and runtime versions.
std::string json_device_head(const fmoe_cuda_device_props& props, int driver, int runtime);

// cuda_selftest.json (the seed, the counts and every check) and cuda_selftest.txt (the log so far).
void write_selftest_results(const std::string& out_dir, const std::string& head);

// cuda_bench.json (the timings of `rows` for layer case c, its weights' source and the copy ceiling) and
// cuda_bench.txt (`log`).
void write_bench_results(const std::string& out_dir, const std::string& head, const std::string& source, const Case& c,
                         double ceiling_gbps, const std::vector<BenchRow>& rows, const std::string& log);

}  // namespace fmoe_selftest
