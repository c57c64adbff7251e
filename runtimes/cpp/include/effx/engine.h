// TensorRT (10+) engine loading for effx bundles: RAII wrappers, version/architecture checks, plugin
// loading, device buffers and the name-based I/O API (setInputShape / setTensorAddress / enqueueV3).
#pragma once

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "effx/bundle.h"

namespace effx {

// TensorRT 10+ objects are released with `delete` (destroy() is gone).
struct TrtDelete {
    template <class T>
    void operator()(T* p) const noexcept { delete p; }
};
template <class T>
using TrtPtr = std::unique_ptr<T, TrtDelete>;

class Logger : public nvinfer1::ILogger {
public:
    explicit Logger(Severity shown = Severity::kWARNING) : shown_(shown) {}
    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override;
    void set_shown(Severity s) { shown_ = s; }

private:
    Severity shown_;
};
Logger& logger();

// Throws Error("<what>: <cuda error string>") when status is not cudaSuccess.
void cuda_check(cudaError_t status, const char* what);

// Device memory that grows on demand (contents are lost when it grows).
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t bytes) { ensure(bytes); }
    ~DeviceBuffer();
    DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; o.bytes_ = 0; }
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;

    void ensure(size_t bytes);  // at least `bytes` (never null: at least 256 bytes)
    void* get() const { return ptr_; }
    size_t bytes() const { return bytes_; }

private:
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
};

// Versions and the GPU this process runs on.
struct Platform {
    int trt_major = 0, trt_minor = 0, trt_patch = 0;  // libnvinfer loaded at run time
    int device = 0;
    int sm = 0;  // compute capability major*10+minor
    std::string gpu_name;
    std::string describe() const;  // "NVIDIA Orin (sm_87), TensorRT 10.3.0"
};
Platform query_platform(int device = 0);

// One-line checks; throw Error (or, with `warn_only`, print a warning to stderr and return false).
// * effx_run's headers vs libnvinfer (NV_TENSORRT_MAJOR vs getInferLibMajorVersion)
// * the bundle's build.tensorrt_version major.minor vs libnvinfer
// * the bundle's build.sm vs the GPU's compute capability
bool check_tensorrt_version(const BuildInfo& build, const Platform& p, bool warn_only);
bool check_gpu_arch(const BuildInfo& build, const Platform& p, bool warn_only);

// TensorRT's own plugins (when linked with nvinfer_plugin) and plugin libraries given by the user.
// Each library is loaded with IPluginRegistry::loadLibrary (libraries exporting getCreators /
// getPluginCreators), else dlopen(RTLD_GLOBAL) for libraries that register themselves statically.
void load_plugins(nvinfer1::IRuntime& runtime, const std::vector<std::string>& libraries);

nvinfer1::DataType dtype_from_string(const std::string& dtype);  // manifest dtype -> TensorRT
std::string dtype_name(nvinfer1::DataType t);                    // TensorRT -> manifest name
size_t dtype_size(nvinfer1::DataType t);

using Dims64 = std::vector<int64_t>;
int64_t volume(const Dims64& d);
std::string shape_str(const Dims64& d);

// A deserialized engine with one execution context, checked against its manifest GraphSpec.
class Engine {
public:
    struct IO {
        std::string name;
        bool is_input = false;
        nvinfer1::DataType dtype{};
        const TensorSpec* spec = nullptr;  // the manifest's description
    };

    // Throws Error when the file cannot be deserialized or its I/O differs from the manifest (names, dtypes;
    // a dtype difference only warns when `lenient`).
    Engine(nvinfer1::IRuntime& runtime, const std::string& path, const GraphSpec& spec,
           const std::vector<std::string>& plugins_hint, bool lenient);

    const GraphSpec& spec() const { return *spec_; }
    const std::vector<IO>& io() const { return io_; }
    const IO* find(const std::string& name) const;
    nvinfer1::ICudaEngine& engine() { return *engine_; }
    nvinfer1::IExecutionContext& context() { return *context_; }

    void set_input_shape(const std::string& name, const Dims64& shape);
    void bind(const std::string& name, void* address);
    Dims64 shape(const std::string& name) const;  // context shape (outputs: after all input shapes are set)
    void enqueue(cudaStream_t stream);

private:
    const GraphSpec* spec_;
    TrtPtr<nvinfer1::ICudaEngine> engine_;
    TrtPtr<nvinfer1::IExecutionContext> context_;
    std::vector<IO> io_;
};

}  // namespace effx
