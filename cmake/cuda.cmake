# The CUDA backend: libfused_moe_cuda.so, a plain shared library with the C ABI of
# csrc/cuda/fused_moe_cuda.h. The addon opens it at run time (dlopen) only when a CUDA device is asked
# for, so the CPU build never depends on CUDA. The CUDA runtime is linked statically, and only the
# fmoe_cuda_* symbols are exported.
#
# Inputs (optional): FMOE_SOURCE_DIR (repository root; default: the parent of this file's folder),
# FMOE_OUTPUT_DIR (where the library goes, beside the addon; default: CMAKE_LIBRARY_OUTPUT_DIRECTORY if
# set, else CMAKE_BINARY_DIR),
# FMOE_CUDA_ARCHITECTURES (default: sm_80, sm_89, sm_90 binaries plus compute_90 PTX for newer GPUs).

if(NOT DEFINED FMOE_SOURCE_DIR)
  get_filename_component(FMOE_SOURCE_DIR "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
endif()
if(NOT DEFINED FMOE_OUTPUT_DIR)
  if(CMAKE_LIBRARY_OUTPUT_DIRECTORY)  # cmake-js puts the addon there (build/Release)
    set(FMOE_OUTPUT_DIR "${CMAKE_LIBRARY_OUTPUT_DIRECTORY}")
  else()
    set(FMOE_OUTPUT_DIR "${CMAKE_BINARY_DIR}")
  endif()
endif()
set(FMOE_CUDA_ARCHITECTURES "80-real;89-real;90-real;90-virtual" CACHE STRING
    "CUDA architectures of libfused_moe_cuda.so")

# enable_language(CUDA) needs an architecture list its compiler accepts (CUDA 13 dropped the old default).
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES "${FMOE_CUDA_ARCHITECTURES}")
endif()
get_property(_fmoe_languages GLOBAL PROPERTY ENABLED_LANGUAGES)
if(NOT "CUDA" IN_LIST _fmoe_languages)
  enable_language(CUDA)
endif()

# The pipeline stages; the self-test below compiles them too, to test each one on its own.
set(_fmoe_cuda_stages
  "${FMOE_SOURCE_DIR}/csrc/cuda/gating.cu"
  "${FMOE_SOURCE_DIR}/csrc/cuda/dispatch.cu"
  "${FMOE_SOURCE_DIR}/csrc/cuda/expert_ffn.cu"
  "${FMOE_SOURCE_DIR}/csrc/cuda/combine.cu")
add_library(fused_moe_cuda SHARED ${_fmoe_cuda_stages} "${FMOE_SOURCE_DIR}/csrc/cuda/layer.cu")
target_include_directories(fused_moe_cuda PRIVATE "${FMOE_SOURCE_DIR}/csrc/cuda")

# Only the C ABI leaves the library: hidden by default in our code, and a version script that also
# keeps the statically linked CUDA runtime's symbols local.
set(_fmoe_cuda_map "${CMAKE_CURRENT_BINARY_DIR}/fused_moe_cuda.map")
file(WRITE "${_fmoe_cuda_map}" "{\n  global: fmoe_cuda_*;\n  local: *;\n};\n")

set_target_properties(fused_moe_cuda PROPERTIES
  OUTPUT_NAME fused_moe_cuda
  PREFIX "lib"
  SUFFIX ".so"
  CUDA_ARCHITECTURES "${FMOE_CUDA_ARCHITECTURES}"
  CUDA_RUNTIME_LIBRARY Static
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CXX_STANDARD 17
  CXX_STANDARD_REQUIRED ON
  CUDA_VISIBILITY_PRESET hidden
  CXX_VISIBILITY_PRESET hidden
  VISIBILITY_INLINES_HIDDEN ON
  POSITION_INDEPENDENT_CODE ON
  # $<1:...> keeps multi-config generators from appending a per-configuration folder.
  LIBRARY_OUTPUT_DIRECTORY "$<1:${FMOE_OUTPUT_DIR}>"
  LINK_DEPENDS "${_fmoe_cuda_map}")
# The directory's add_compile_options() are host-compiler flags (-Wall, -fno-math-errno, sanitizers) that
# nvcc rejects: this target starts from its own list.
set_property(TARGET fused_moe_cuda PROPERTY COMPILE_OPTIONS "")
target_compile_options(fused_moe_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 -Xcompiler=-Wall -Xcompiler=-Wextra>)
target_link_options(fused_moe_cuda PRIVATE
  "LINKER:--version-script=${_fmoe_cuda_map}"
  "LINKER:--exclude-libs,ALL"
  "LINKER:--no-undefined")

# ---- self-test (not part of the package) ----------------------------------------------------------------
# fmoe_cuda_selftest: every stage of the pipeline (the launchers of moe_cuda.cuh, compiled into the test
# itself) and the whole library (opened with dlopen, as the addon does) against a float64 CPU reference,
# plus the Mixtral-size benchmark (bench/gpu/run.sh). Registered with ctest when testing is enabled; on a
# machine with no CUDA device it exits with 77 and ctest reports it as skipped. The npm package leaves
# csrc/tests out, and cmake-js builds never need it.
set(_fmoe_selftest_dir "${FMOE_SOURCE_DIR}/csrc/tests/cuda")
set(_fmoe_selftest_src
  "${_fmoe_selftest_dir}/main.cpp"
  "${_fmoe_selftest_dir}/harness.cpp"
  "${_fmoe_selftest_dir}/data.cpp"
  "${_fmoe_selftest_dir}/reference.cpp"
  "${_fmoe_selftest_dir}/stage_tests.cpp"
  "${_fmoe_selftest_dir}/layer_tests.cpp"
  "${_fmoe_selftest_dir}/family_tests.cpp"
  "${_fmoe_selftest_dir}/bench.cpp"
  "${_fmoe_selftest_dir}/report.cpp")
if(NOT CMAKE_JS_VERSION AND EXISTS "${_fmoe_selftest_dir}/main.cpp")
  find_package(Threads REQUIRED)
  add_executable(fmoe_cuda_selftest ${_fmoe_selftest_src} ${_fmoe_cuda_stages})
  target_include_directories(fmoe_cuda_selftest PRIVATE "${FMOE_SOURCE_DIR}/csrc/cuda"
                             ${CMAKE_CUDA_TOOLKIT_INCLUDE_DIRECTORIES})
  set_target_properties(fmoe_cuda_selftest PROPERTIES
    CUDA_ARCHITECTURES "${FMOE_CUDA_ARCHITECTURES}"
    CUDA_RUNTIME_LIBRARY Static
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    CXX_STANDARD 17
    CXX_STANDARD_REQUIRED ON
    RUNTIME_OUTPUT_DIRECTORY "$<1:${CMAKE_BINARY_DIR}>")
  set_property(TARGET fmoe_cuda_selftest PROPERTY COMPILE_OPTIONS "")
  target_compile_options(fmoe_cuda_selftest PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-O3>
    $<$<COMPILE_LANGUAGE:CXX>:-O2 -Wall -Wextra>)
  target_link_libraries(fmoe_cuda_selftest PRIVATE Threads::Threads ${CMAKE_DL_LIBS})
  add_dependencies(fmoe_cuda_selftest fused_moe_cuda)  # the test opens the library at run time
  add_test(NAME cuda_selftest
           COMMAND fmoe_cuda_selftest --lib "$<TARGET_FILE:fused_moe_cuda>" --no-bench)
  set_tests_properties(cuda_selftest PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 300)
endif()

# The FFN tile sweep (bench/gpu/ffn_tiles.cu): a tuning aid, built only when asked for by name.
if(NOT CMAKE_JS_VERSION AND EXISTS "${FMOE_SOURCE_DIR}/bench/gpu/ffn_tiles.cu")
  add_executable(fmoe_ffn_tiles EXCLUDE_FROM_ALL "${FMOE_SOURCE_DIR}/bench/gpu/ffn_tiles.cu")
  set_target_properties(fmoe_ffn_tiles PROPERTIES
    CUDA_ARCHITECTURES "${FMOE_CUDA_ARCHITECTURES}"
    CUDA_RUNTIME_LIBRARY Static
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    RUNTIME_OUTPUT_DIRECTORY "$<1:${CMAKE_BINARY_DIR}>")
  target_compile_options(fmoe_ffn_tiles PRIVATE -O3)
endif()
