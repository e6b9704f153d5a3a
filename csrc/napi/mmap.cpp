// File mappings for the safetensors reader (lib/safetensors/map.ts). An OS binding only: no
// parsing and no math here.
//
//   mapFile(path, offset?, length?) -> ArrayBuffer            maps; pages are read on first touch
//   mapFileAsync(path, offset?, length?) -> Promise<ArrayBuffer>
//       maps and brings every page in on a worker thread, so a caller that reads it all next (packing
//       a layer) neither reads the disk nor takes page faults on the event loop
//   dropPages(view) -> boolean
//       gives back the resident pages of a mapping made here, whose copy the caller has made: the
//       mapping stays valid and reads the file again where touched. Anything else is left alone (false)
//
// JS may write into any ArrayBuffer, so regions are mapped PROT_READ|PROT_WRITE with MAP_PRIVATE: a
// write makes a private copy of its page that never reaches the file. The mapping is unmapped by the
// ArrayBuffer's finalizer, once the buffer and every view of it are garbage-collected.
#include <napi.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

#ifndef _WIN32
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace fmoe_napi {

// Every failure is an Error with code ERR_MOE_CHECKPOINT naming the path; the facade adds the tensor.
static Napi::Error checkpoint_error(Napi::Env env, const std::string& path, const std::string& why) {
  Napi::Error err = Napi::Error::New(env, "cannot map '" + path + "': " + why);
  err.Value().Set("code", Napi::String::New(env, "ERR_MOE_CHECKPOINT"));
  return err;
}

// A non-negative integer argument below 2^53, or `fallback` (-1: absent) when undefined.
static double get_size(const Napi::CallbackInfo& info, size_t i, double fallback, const char* name) {
  if (info.Length() <= i || info[i].IsUndefined()) return fallback;
  if (!info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a number");
  const double d = info[i].As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 9007199254740991.0) || d != double(uint64_t(d)))
    throw Napi::RangeError::New(info.Env(), std::string(name) + " must be a non-negative integer");
  return d;
}

static std::string get_path(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsString())
    throw Napi::TypeError::New(info.Env(), "mapFile(path) expects a string path");
  return info[0].As<Napi::String>().Utf8Value();
}

#ifndef _WIN32

// Node 18 and 20 refuse external buffers over 4 GiB (buffer.constants.MAX_LENGTH), and a refused one
// has its finalizer run twice on the way out; so larger regions are refused here, before mmap. The
// facade maps one tensor at a time, and no tensor of the models this package runs comes near it.
static constexpr double kMaxMapping = 4294967296.0;

struct Region {
  void* base = nullptr;  // what mmap returned (page-aligned); null for an empty region
  size_t mapped = 0;     // bytes mapped from base
  size_t gap = 0;        // base + gap is the requested offset
  size_t length = 0;     // requested bytes
};

static std::string errno_text(int e) {
  const char* name = e == ENOENT ? " (ENOENT)" : e == EACCES ? " (EACCES)" : e == EISDIR ? " (EISDIR)" : "";
  return std::strerror(e) + std::string(name);
}

// Maps [offset, offset + length) of a regular file (length < 0: to its end). No Node-API: runs on
// worker threads too. On failure returns false with the reason in *why.
static bool map_region(const std::string& path, double offset, double length, Region* r, std::string* why) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return *why = errno_text(errno), false;
  struct stat st;
  if (fstat(fd, &st) != 0) {
    *why = errno_text(errno);
    close(fd);
    return false;
  }
  if (!S_ISREG(st.st_mode)) {
    *why = S_ISDIR(st.st_mode) ? errno_text(EISDIR) : "not a regular file";
    close(fd);
    return false;
  }
  // Checked against the file's size now: touching pages past the end of a file raises SIGBUS.
  const double size = double(st.st_size);
  if (length < 0) length = size > offset ? size - offset : 0;
  if (offset + length > size) {
    *why = "the range [" + std::to_string(uint64_t(offset)) + ", " + std::to_string(uint64_t(offset + length)) +
           ") passes the end of the file (" + std::to_string(uint64_t(size)) + " bytes)";
    close(fd);
    return false;
  }
  if (length > kMaxMapping) {
    *why =
        "a region of " + std::to_string(uint64_t(length)) + " bytes is more than one ArrayBuffer may hold here (4 GiB)";
    close(fd);
    return false;
  }
  if (length == 0) {  // mmap refuses empty mappings
    close(fd);
    *r = Region();
    return true;
  }
  // mmap wants a page-aligned file offset: map from the page below and point the buffer past the gap.
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  const uint64_t off = uint64_t(offset), aligned = off - off % page;
  r->gap = size_t(off - aligned);
  r->length = size_t(length);
  r->mapped = r->length + r->gap;
  r->base = mmap(nullptr, r->mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, off_t(aligned));
  const int e = errno;
  close(fd);  // the mapping keeps the file open
  if (r->base == MAP_FAILED) {
    r->base = nullptr;
    *why = "mmap failed: " + errno_text(e);
    return false;
  }
  return true;
}

// Brings every page of the region in, read-only, so that later reads neither block on the disk nor
// fault. MAP_POPULATE would not do: on a private writable mapping it copies every page.
static bool populate(const Region& r, std::string* why) {
  if (!r.base) return true;
#ifdef MADV_POPULATE_READ
  if (madvise(r.base, r.mapped, MADV_POPULATE_READ) == 0) return true;
  if (errno != EINVAL) {  // EFAULT/EIO: the file shrank or could not be read; touching would SIGBUS
    *why = "cannot read the file: " + errno_text(errno);
    return false;
  }
#endif
  // Kernels before 5.14: touch one byte per page (the size was checked against the file just before).
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const volatile unsigned char* p = static_cast<const unsigned char*>(r.base);
  unsigned char sink = 0;
  for (size_t i = 0; i < r.mapped; i += page) sink ^= p[i];
  (void)sink;
  return true;
}

// The regions handed to JavaScript and not yet unmapped, by the address of their first requested byte
// (distinct while they live): the finalizers unmap from here, and dropPages() acts on these only. Every
// thread's environment shares it.
static std::mutex live_mutex;
static std::unordered_map<const void*, Region>& live_regions() {
  static auto* regions = new std::unordered_map<const void*, Region>();  // never destroyed: finalizers may run at exit
  return *regions;
}

static void unmap(Napi::Env, void* data) {
  Region r;
  {
    std::lock_guard<std::mutex> lock(live_mutex);
    auto it = live_regions().find(data);
    if (it == live_regions().end()) return;
    r = it->second;
    live_regions().erase(it);
  }
  munmap(r.base, r.mapped);
}

// Hands the region to an ArrayBuffer whose finalizer unmaps it.
static Napi::ArrayBuffer to_buffer(Napi::Env env, const Region& r) {
  if (!r.base) return Napi::ArrayBuffer::New(env, 0);
  void* data = static_cast<char*>(r.base) + r.gap;
  {
    std::lock_guard<std::mutex> lock(live_mutex);
    live_regions()[data] = r;
  }
  return Napi::ArrayBuffer::New(env, data, r.length, unmap);
}

// The loaders copy each tensor into the model and hold its mapping only until the garbage collector
// runs: until then its pages count in the process's resident memory, a second copy of the checkpoint.
// MADV_DONTNEED drops them now. On a private mapping a page read again comes from the file: a view
// stays valid and reads what it read before, unless JavaScript wrote to it (its copy is dropped too).
static Napi::Value DropPages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsTypedArray())
    throw Napi::TypeError::New(env, "dropPages(view) expects a typed array");
  Napi::TypedArray view = info[0].As<Napi::TypedArray>();
  if (view.ByteOffset() != 0) return Napi::Boolean::New(env, false);  // a mapping's views start at its start
  const void* data = view.ArrayBuffer().Data();
  Region r;
  {
    std::lock_guard<std::mutex> lock(live_mutex);
    auto it = live_regions().find(data);
    if (it == live_regions().end()) return Napi::Boolean::New(env, false);
    r = it->second;
  }
  return Napi::Boolean::New(env, madvise(r.base, r.mapped, MADV_DONTNEED) == 0);
}

static Napi::Value MapFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string path = get_path(info);
  const double offset = get_size(info, 1, 0, "offset"), length = get_size(info, 2, -1, "length");
  Region r;
  std::string why;
  if (!map_region(path, offset, length, &r, &why)) throw checkpoint_error(env, path, why);
  return to_buffer(env, r);
}

// Execute (worker thread, no Node-API): map and populate. OnOK/OnError (main thread): settle.
class MapWorker : public Napi::AsyncWorker {
 public:
  MapWorker(Napi::Env env, std::string path, double offset, double length)
      : Napi::AsyncWorker(env, "fusedMoeMapFile"),
        deferred_(Napi::Promise::Deferred::New(env)),
        path_(std::move(path)),
        offset_(offset),
        length_(length) {}
  ~MapWorker() override {
    if (region_.base) munmap(region_.base, region_.mapped);  // never handed to JS
  }
  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    if (!map_region(path_, offset_, length_, &region_, &why_) || !populate(region_, &why_)) {
      if (region_.base) munmap(region_.base, region_.mapped);
      region_ = Region();
      SetError(why_);
    }
  }
  void OnOK() override {
    Napi::ArrayBuffer buffer = to_buffer(Env(), region_);
    region_ = Region();  // the buffer owns it now
    deferred_.Resolve(buffer);
  }
  void OnError(const Napi::Error&) override { deferred_.Reject(checkpoint_error(Env(), path_, why_).Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::string path_;
  double offset_, length_;
  Region region_;
  std::string why_;
};

static Napi::Value MapFileAsync(const Napi::CallbackInfo& info) {
  const std::string path = get_path(info);
  const double offset = get_size(info, 1, 0, "offset"), length = get_size(info, 2, -1, "length");
  auto* worker = new MapWorker(info.Env(), path, offset, length);
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

#else

static Napi::Value DropPages(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), false); }

static Napi::Value MapFile(const Napi::CallbackInfo& info) {
  throw checkpoint_error(info.Env(), get_path(info), "memory-mapped checkpoints are not supported on Windows yet");
}

static Napi::Value MapFileAsync(const Napi::CallbackInfo& info) {
  auto deferred = Napi::Promise::Deferred::New(info.Env());
  deferred.Reject(
      checkpoint_error(info.Env(), get_path(info), "memory-mapped checkpoints are not supported on Windows yet")
          .Value());
  return deferred.Promise();
}

#endif

void register_mmap(Napi::Env env, Napi::Object exports) {
  exports.Set("mapFile", Napi::Function::New(env, MapFile, "mapFile"));
  exports.Set("mapFileAsync", Napi::Function::New(env, MapFileAsync, "mapFileAsync"));
  exports.Set("dropPages", Napi::Function::New(env, DropPages, "dropPages"));
}

}  // namespace fmoe_napi
