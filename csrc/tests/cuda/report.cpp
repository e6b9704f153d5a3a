#include "report.h"

#include <cstdio>

#include "harness.h"

namespace fmoe_selftest {

std::string json_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    if ((unsigned char)ch < 0x20) continue;
    o += ch;
  }
  return o;
}

void write_file(const std::string& path, const std::string& text) {
  FILE* f = fopen(path.c_str(), "w");
  if (!f) return;
  fputs(text.c_str(), f);
  fclose(f);
}

std::string json_device_head(const fmoe_cuda_device_props& props, int driver, int runtime) {
  char head[1024];
  snprintf(head, sizeof head, "  \"device\": \"%s\",\n  \"sm\": \"%d.%d\",\n  \"driver\": %d,\n  \"runtime\": %d,\n",
           json_escape(props.name).c_str(), props.major, props.minor, driver, runtime);
  return head;
}

void write_selftest_results(const std::string& out_dir, const std::string& head) {
  char b[256];
  snprintf(b, sizeof b, "  \"seed\": %llu,\n  \"checks_total\": %d,\n  \"failures\": %d,\n", (unsigned long long)g_seed,
           g_checks, g_failures);
  write_file(out_dir + "/cuda_selftest.json",
             "{\n" + head + b + "  \"checks\": [\n    " + g_checks_json + "\n  ]\n}\n");
  write_file(out_dir + "/cuda_selftest.txt", g_report);
}

void write_bench_results(const std::string& out_dir, const std::string& head, const std::string& source, const Case& c,
                         double ceiling_gbps, const std::vector<BenchRow>& rows, const std::string& log) {
  std::string j = "{\n" + head;
  char b[2048];
  snprintf(
      b, sizeof b,
      "  \"weights\": \"%s\",\n  \"shape\": {\"H\": %lld, \"F\": %lld, \"E\": %lld, \"k\": %lld, \"dtype\": \"%s\"},\n"
      "  \"timing\": \"us: per forward, forwards queued back to back (enqueue_device) and waited for once, median of 5 "
      "batches; us_per_call: CUDA events around one forward_device call, which waits inside; device input and "
      "output\",\n"
      "  \"copy_GBps\": %.1f,\n  \"rows\": [",
      source.c_str(), (long long)c.H, (long long)c.F, (long long)c.E, (long long)c.k, dtype_name(c.dtype),
      ceiling_gbps);
  j += b;
  for (size_t i = 0; i < rows.size(); i++) {
    const BenchRow& r = rows[i];
    snprintf(
        b, sizeof b,
        "%s\n    {\"T\": %lld, \"iters\": %d, \"us\": %.2f, \"us_per_call\": %.2f, \"us_min\": %.2f, "
        "\"us_host_arrays\": %.2f, "
        "\"experts_used\": %zu, \"weight_GB\": %.4f, \"weight_GBps\": %.1f, \"frac_copy\": %.4f, \"TFLOPs\": %.3f}",
        i ? "," : "", (long long)r.T, r.iters, r.ms * 1e3, r.ms_call * 1e3, r.ms_min * 1e3, r.ms_host * 1e3,
        r.experts_used, r.weight_gb, r.gbps, r.gbps / ceiling_gbps, r.tflops);
    j += b;
  }
  j += "\n  ]\n}\n";
  write_file(out_dir + "/cuda_bench.json", j);
  write_file(out_dir + "/cuda_bench.txt", log);
}

}  // namespace fmoe_selftest
