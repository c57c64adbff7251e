#include "effx/engine.h"

#include <NvInferVersion.h>
#ifdef EFFX_WITH_NVINFER_PLUGIN
#include <NvInferPlugin.h>
#endif

#include <dlfcn.h>

#include <algorithm>

#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>

namespace effx {

// ---- logging / CUDA -----------------------------------------------------------------------------------

void Logger::log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept {
    if (severity > shown_) return;
    const char* tag = severity <= Severity::kERROR ? "error" : severity == Severity::kWARNING ? "warning" : "info";
    std::cerr << "[TensorRT " << tag << "] " << msg << "\n";
}

Logger& logger() {
    static Logger instance;
    return instance;
}

void cuda_check(cudaError_t status, const char* what) {
    if (status != cudaSuccess)
        throw Error(std::string(what) + ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

DeviceBuffer::~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
        if (ptr_) cudaFree(ptr_);
        ptr_ = o.ptr_;
        bytes_ = o.bytes_;
        o.ptr_ = nullptr;
        o.bytes_ = 0;
    }
    return *this;
}

void DeviceBuffer::ensure(size_t bytes) {
    bytes = std::max<size_t>(bytes, 256);
    if (ptr_ && bytes <= bytes_) return;
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    cuda_check(cudaMalloc(&ptr_, bytes), ("cudaMalloc of " + std::to_string(bytes) + " bytes").c_str());
    bytes_ = bytes;
}

// ---- platform checks ----------------------------------------------------------------------------------

std::string Platform::describe() const {
    std::ostringstream s;
    s << gpu_name << " (sm_" << sm << "), TensorRT " << trt_major << "." << trt_minor << "." << trt_patch;
    return s.str();
}

Platform query_platform(int device) {
    Platform p;
    p.trt_major = getInferLibMajorVersion();
    p.trt_minor = getInferLibMinorVersion();
    p.trt_patch = getInferLibPatchVersion();
    int count = 0;
    cuda_check(cudaGetDeviceCount(&count), "cudaGetDeviceCount (is a CUDA GPU visible to this process?)");
    if (device < 0 || device >= count)
        throw Error("GPU " + std::to_string(device) + " does not exist (" + std::to_string(count) + " visible)");
    cuda_check(cudaSetDevice(device), "cudaSetDevice");
    cudaDeviceProp prop{};
    cuda_check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    p.device = device;
    p.sm = prop.major * 10 + prop.minor;
    p.gpu_name = prop.name;
    return p;
}

namespace {
bool fail(const std::string& msg, bool warn_only) {
    if (!warn_only) throw Error(msg);
    std::cerr << "effx_run: warning: " << msg << " (continuing: --force)\n";
    return false;
}
}  // namespace

bool check_tensorrt_version(const BuildInfo& build, const Platform& p, bool warn_only) {
    const std::string headers = std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR);
    const std::string library = std::to_string(p.trt_major) + "." + std::to_string(p.trt_minor);
    if (p.trt_major != NV_TENSORRT_MAJOR)  // not overridable: another C++ ABI
        throw Error("effx_run was compiled with TensorRT " + headers + " headers but loaded libnvinfer " + library +
                    ": rebuild effx_run against this TensorRT (-DTensorRT_ROOT)");
    if (p.trt_minor != NV_TENSORRT_MINOR)
        std::cerr << "effx_run: warning: compiled with TensorRT " << headers << " headers, running libnvinfer " << library
                  << "; rebuild effx_run against this TensorRT if anything fails\n";
    if (!build.tensorrt_version) {
        std::cerr << "effx_run: warning: the manifest does not record build.tensorrt_version; not checked\n";
        return true;
    }
    auto [major, minor] = major_minor(*build.tensorrt_version);
    if (major != p.trt_major || minor != p.trt_minor)
        return fail("engine built with TensorRT " + *build.tensorrt_version + ", this machine has TensorRT " +
                        std::to_string(p.trt_major) + "." + std::to_string(p.trt_minor) + "." +
                        std::to_string(p.trt_patch) +
                        ": engines are tied to the TensorRT version; rebuild on this device (bash build_on_device.sh)",
                    warn_only);
    return true;
}

bool check_gpu_arch(const BuildInfo& build, const Platform& p, bool warn_only) {
    if (!build.sm) {
        std::cerr << "effx_run: warning: the manifest does not record build.sm; GPU architecture not checked\n";
        return true;
    }
    if (*build.sm != p.sm)
        return fail("engine built for sm_" + std::to_string(*build.sm) + " (target " + build.target + "), this GPU is " +
                        p.gpu_name + " (sm_" + std::to_string(p.sm) +
                        "): engines do not move between GPU architectures; rebuild on this device",
                    warn_only);
    return true;
}

void load_plugins(nvinfer1::IRuntime& runtime, const std::vector<std::string>& libraries) {
#ifdef EFFX_WITH_NVINFER_PLUGIN
    initLibNvInferPlugins(&logger(), "");
#endif
    for (const auto& lib : libraries) {
        if (runtime.getPluginRegistry().loadLibrary(lib.c_str()) != nullptr) continue;
        // Libraries that register creators from static initialisers (REGISTER_TENSORRT_PLUGIN) and export no
        // getCreators/getPluginCreators: loading them is enough.
        if (dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
            const char* why = dlerror();
            throw Error("cannot load plugin library " + lib + ": " + (why ? why : "unknown dlopen error"));
        }
    }
}

// ---- data types -----------------------------------------------------------------------------------------

nvinfer1::DataType dtype_from_string(const std::string& d) {
    using nvinfer1::DataType;
    if (d == "float32") return DataType::kFLOAT;
    if (d == "float16") return DataType::kHALF;
    if (d == "bfloat16") return DataType::kBF16;
    if (d == "int64") return DataType::kINT64;
    if (d == "int32") return DataType::kINT32;
    if (d == "bool") return DataType::kBOOL;
    if (d == "int8") return DataType::kINT8;
    if (d == "uint8") return DataType::kUINT8;
    throw Error("dtype '" + d + "' has no TensorRT I/O type (effx uses float32, float16, bfloat16, int64, int32, bool)");
}

std::string dtype_name(nvinfer1::DataType t) {
    using nvinfer1::DataType;
    switch (t) {
        case DataType::kFLOAT: return "float32";
        case DataType::kHALF: return "float16";
        case DataType::kBF16: return "bfloat16";
        case DataType::kINT64: return "int64";
        case DataType::kINT32: return "int32";
        case DataType::kBOOL: return "bool";
        case DataType::kINT8: return "int8";
        case DataType::kUINT8: return "uint8";
        case DataType::kFP8: return "float8";
        default: return "TensorRT DataType " + std::to_string(static_cast<int>(t));
    }
}

size_t dtype_size(nvinfer1::DataType t) {
    using nvinfer1::DataType;
    switch (t) {
        case DataType::kFLOAT:
        case DataType::kINT32: return 4;
        case DataType::kHALF:
        case DataType::kBF16: return 2;
        case DataType::kINT64: return 8;
        case DataType::kBOOL:
        case DataType::kINT8:
        case DataType::kUINT8:
        case DataType::kFP8: return 1;
        default: throw Error("I/O tensors of " + dtype_name(t) + " are not supported by effx_run");
    }
}

int64_t volume(const Dims64& d) {
    int64_t v = 1;
    for (int64_t x : d) v *= x;
    return v;
}

std::string shape_str(const Dims64& d) {
    std::string s = "[";
    for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
    return s + "]";
}

// ---- engine -----------------------------------------------------------------------------------------------

Engine::Engine(nvinfer1::IRuntime& runtime, const std::string& path, const GraphSpec& spec,
               const std::vector<std::string>& plugins_hint, bool lenient)
    : spec_(&spec) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(path + ": cannot open the engine file");
    std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    engine_.reset(runtime.deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_) {
        std::string hint;
        for (const auto& p : plugins_hint) hint += (hint.empty() ? "" : ", ") + p;
        throw Error(path + ": TensorRT could not deserialize the engine (see its log above): built with another "
                           "TensorRT version or for another GPU, or it needs a plugin library (--plugins LIB.so)" +
                    (hint.empty() ? std::string() : "; the manifest lists plugins " + hint));
    }
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw Error(path + ": createExecutionContext failed (out of GPU memory?)");

    const int n = engine_->getNbIOTensors();
    for (int i = 0; i < n; ++i) {
        IO io;
        io.name = engine_->getIOTensorName(i);
        io.is_input = engine_->getTensorIOMode(io.name.c_str()) == nvinfer1::TensorIOMode::kINPUT;
        io.dtype = engine_->getTensorDataType(io.name.c_str());
        io.spec = io.is_input ? spec.input(io.name) : spec.output(io.name);
        if (!io.spec)
            throw Error(path + ": engine " + (io.is_input ? "input" : "output") + " '" + io.name +
                        "' is not in the manifest's graph '" + spec.name + "'; the engine was not built from this bundle");
        if (dtype_from_string(io.spec->dtype) != io.dtype) {
            const std::string msg = path + ": tensor '" + io.name + "' is " + dtype_name(io.dtype) +
                                    " in the engine, the manifest says " + io.spec->dtype;
            if (!lenient) throw Error(msg + " (--force runs with the engine's types)");
            std::cerr << "effx_run: warning: " << msg << "; using the engine's type\n";
        }
        io_.push_back(io);
    }
    for (const auto& t : spec.inputs)
        if (!find(t.name))
            std::cerr << "effx_run: warning: manifest input '" << t.name << "' of graph '" << spec.name
                      << "' is not an engine input (constant-folded?); ignored\n";
}

const Engine::IO* Engine::find(const std::string& name) const {
    for (const auto& io : io_)
        if (io.name == name) return &io;
    return nullptr;
}

void Engine::set_input_shape(const std::string& name, const Dims64& shape) {
    nvinfer1::Dims dims{};
    if (shape.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS)) throw Error(name + ": too many dimensions");
    dims.nbDims = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) dims.d[i] = shape[i];
    if (!context_->setInputShape(name.c_str(), dims))
        throw Error("graph '" + spec_->name + "': TensorRT refused shape " + shape_str(shape) + " for input '" + name +
                    "' (outside the engine's optimization profile? see graphs." + spec_->name + ".dims)");
}

void Engine::bind(const std::string& name, void* address) {
    if (!context_->setTensorAddress(name.c_str(), address))
        throw Error("graph '" + spec_->name + "': setTensorAddress failed for '" + name + "'");
}

Dims64 Engine::shape(const std::string& name) const {
    nvinfer1::Dims d = context_->getTensorShape(name.c_str());
    if (d.nbDims < 0) throw Error("graph '" + spec_->name + "': TensorRT reports no shape for '" + name + "'");
    return Dims64(d.d, d.d + d.nbDims);
}

void Engine::enqueue(cudaStream_t stream) {
    if (!context_->enqueueV3(stream))
        throw Error("graph '" + spec_->name + "': enqueueV3 failed (see the TensorRT log above)");
}

}  // namespace effx
