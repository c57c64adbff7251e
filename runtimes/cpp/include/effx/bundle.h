// effx build bundle: the folder `effx build` writes, described by manifest.json (effx/core/manifest.py).
// The field names below are the public manifest format (schema_version 1).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace effx {

// Every error the runtime reports: one line, saying what to do.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// One dimension of a manifest shape: a fixed size, or a symbolic name/expression ("batch", "sequence",
// "past_sequence + sequence", ...).
struct Dim {
    bool fixed = true;
    int64_t value = 0;
    std::string symbol;
    std::string str() const { return fixed ? std::to_string(value) : symbol; }
};
using Shape = std::vector<Dim>;

struct TensorSpec {
    std::string name;
    std::string dtype;  // numpy names: float32, float16, bfloat16, int64, int32, bool
    Shape shape;
};

struct DimRange {
    int64_t min = 0, opt = 0, max = 0;
};

struct GraphSpec {
    std::string name;  // key in the manifest ("encoder"/"model", "prefill", "decode")
    std::string file;  // relative to the bundle folder: an .engine for TensorRT builds
    std::string role;  // encoder | prefill | decode
    std::vector<TensorSpec> inputs;
    std::vector<TensorSpec> outputs;
    std::map<std::string, DimRange> dims;

    const TensorSpec* input(const std::string& n) const;
    const TensorSpec* output(const std::string& n) const;
    const DimRange* dim(const std::string& n) const;
};

struct CacheTensor {
    std::string input;   // decode-graph input, e.g. "past.0.key"
    std::string output;  // prefill/decode output, e.g. "present.0.key"
    std::string dtype;
    Shape shape;  // before the first step
    std::string init = "zeros";
};

struct ControlInput {
    std::string name;
    std::string dtype;
    Shape shape;
    std::string meaning;
};

// One layer's part of the cache (models that mix attention kinds mix layouts: kv_cache.layers).
struct LayerCache {
    int64_t index = 0;
    std::string kind;    // the layer's attention kind
    std::string layout;  // contiguous | paged | ring | state | multiscale
    std::vector<std::string> tensors;  // its past.{index}.* inputs
    bool grows = false;
    std::map<std::string, int64_t> int_params;  // window (ring), factor (multiscale), block_size (paged)
};

struct CachePlan {
    std::string layout;  // contiguous | paged | ring | state | multiscale, or hybrid when layers differ
    std::string dtype;
    std::vector<CacheTensor> tensors;
    std::vector<ControlInput> controls;
    bool grows = false;
    std::map<std::string, int64_t> int_params;  // integer entries of params (block_size, num_blocks, window)
    std::vector<std::string> protocol;
    std::vector<LayerCache> layers;  // empty in manifests written before per-layer plans

    // Whether some layer is paged: the host then keeps one block table (and new_lengths) for them.
    bool paged() const;
    // Whether some layer's cache grows along the past_sequence axis (multiscale layers at full resolution).
    bool has_past_sequence() const;
    // Whether some layer holds a contiguous buffer of `capacity` slots (>= every token the host caches).
    bool has_capacity() const;
    // An hourglass's params.first_ratio (the first shortening factor; 0 when absent): a step of one token after p
    // cached tokens with p % first_ratio != 0 completes no group and may run the decode_fine graph.
    int64_t first_ratio() const;
    // The buffer dims a host sizes for a run of `tokens` tokens decoded one per step: capacity = tokens and,
    // per ring layer i, ring_{i} = its window (a step of S tokens would need window + S - 1 slots).
    std::map<std::string, int64_t> buffer_sizes(int64_t tokens) const;
    const CacheTensor* by_input(const std::string& n) const;
    const CacheTensor* by_output(const std::string& n) const;
    const ControlInput* control(const std::string& n) const;
};

struct FileEntry {
    std::string sha256;
    uint64_t bytes = 0;
};

struct BuildInfo {
    std::string target;
    std::string backend;  // ort | tensorrt
    std::string precision;
    bool engine_built = false;
    std::string reason;
    std::optional<int> sm;
    std::optional<std::string> tensorrt_version;  // "10.3" (kits) or "10.3.0.30" (engines built by effx)
    std::map<std::string, GraphSpec> graphs;
    std::vector<std::string> plugins;  // "namespace::name" of plugins the graphs may use
};

struct Bundle {
    std::string dir;
    int schema_version = 0;
    std::string stage;   // onnx | build
    std::string family;  // encoder | decoder
    int64_t vocab_size = 0;   // spec.model.vocab_size, 0 when absent
    int64_t max_seq_len = 0;  // spec.model.max_seq_len, 0 when absent
    std::map<std::string, GraphSpec> graphs;
    std::optional<CachePlan> kv_cache;
    std::optional<BuildInfo> build;
    std::map<std::string, FileEntry> files;
    // Engines found next to a device kit's manifest (built there by build_on_device.sh's trtexec lines).
    bool engines_from_kit = false;

    std::string path(const std::string& relative) const;
    // The graph with this role in build.graphs (nullptr when there is none).
    const GraphSpec* graph_by_role(const std::string& role) const;
};

// Parse manifest.json text; throws Error on malformed JSON or missing fields. No semantic checks.
Bundle parse_manifest(const std::string& json_text, const std::string& dir);

// Read DIR/manifest.json and check that it describes runnable TensorRT engines:
// schema_version 1, stage "build", backend "tensorrt", engines present (engine_built, or a device kit whose
// build_on_device.sh already wrote the engines next to it), engine files present with the recorded sizes.
Bundle load_bundle(const std::string& dir);

// "major.minor" of a version string ("10.3.0.30" -> {10, 3}); throws Error when it has no major.minor.
std::pair<int, int> major_minor(const std::string& version);

// Engine file name that device kits' build_on_device.sh writes: <graph>.sm<sm>.trt<major>.<minor>.engine
std::string kit_engine_name(const std::string& graph, int sm, const std::string& tensorrt_version);

// Bytes per element of a manifest dtype string; throws Error for an unknown dtype.
size_t dtype_bytes(const std::string& dtype);

}  // namespace effx
