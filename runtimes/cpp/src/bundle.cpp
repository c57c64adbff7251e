#include "effx/bundle.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <sys/stat.h>

namespace effx {

using json = nlohmann::json;

namespace {

constexpr int kSchemaVersion = 1;
constexpr const char* kManifestName = "manifest.json";

bool is_file(const std::string& p, uint64_t* size = nullptr) {
    struct stat st {};
    if (::stat(p.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
    if (size) *size = static_cast<uint64_t>(st.st_size);
    return true;
}

std::string join(const std::string& dir, const std::string& rel) {
    if (dir.empty() || (!rel.empty() && rel.front() == '/')) return rel;
    return dir.back() == '/' ? dir + rel : dir + "/" + rel;
}

// Field access with errors that name the JSON path.
const json& at(const json& j, const char* key, const std::string& where) {
    auto it = j.find(key);
    if (it == j.end()) throw Error(where + ": missing field '" + key + "'");
    return *it;
}

template <class T>
T get(const json& j, const char* key, const std::string& where) {
    const json& v = at(j, key, where);
    try {
        return v.get<T>();
    } catch (const json::exception& e) {
        throw Error(where + "." + key + ": unexpected type (" + v.type_name() + ")");
    }
}

template <class T>
T get_or(const json& j, const char* key, T fallback, const std::string& where) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return fallback;
    return get<T>(j, key, where);
}

Shape parse_shape(const json& j, const std::string& where) {
    if (!j.is_array()) throw Error(where + ": shape is not a list");
    Shape shape;
    for (const auto& d : j) {
        Dim dim;
        if (d.is_number_integer()) {
            dim.fixed = true;
            dim.value = d.get<int64_t>();
        } else if (d.is_string()) {
            dim.fixed = false;
            dim.symbol = d.get<std::string>();
        } else {
            throw Error(where + ": a dimension is neither an int nor a name");
        }
        shape.push_back(std::move(dim));
    }
    return shape;
}

TensorSpec parse_tensor(const json& j, const std::string& where) {
    TensorSpec t;
    t.name = get<std::string>(j, "name", where);
    t.dtype = get<std::string>(j, "dtype", where + "." + t.name);
    t.shape = parse_shape(at(j, "shape", where + "." + t.name), where + "." + t.name + ".shape");
    return t;
}

GraphSpec parse_graph(const std::string& name, const json& j, const std::string& where) {
    GraphSpec g;
    g.name = name;
    g.file = get<std::string>(j, "file", where);
    g.role = get<std::string>(j, "role", where);
    for (const auto& t : at(j, "inputs", where)) g.inputs.push_back(parse_tensor(t, where + ".inputs"));
    for (const auto& t : at(j, "outputs", where)) g.outputs.push_back(parse_tensor(t, where + ".outputs"));
    auto dims = j.find("dims");
    if (dims != j.end() && dims->is_object()) {
        for (auto it = dims->begin(); it != dims->end(); ++it) {
            const std::string w = where + ".dims." + it.key();
            g.dims[it.key()] = DimRange{get<int64_t>(*it, "min", w), get<int64_t>(*it, "opt", w), get<int64_t>(*it, "max", w)};
        }
    }
    return g;
}

std::map<std::string, GraphSpec> parse_graphs(const json& j, const std::string& where) {
    std::map<std::string, GraphSpec> out;
    if (!j.is_object()) throw Error(where + ": not an object");
    for (auto it = j.begin(); it != j.end(); ++it) out[it.key()] = parse_graph(it.key(), *it, where + "." + it.key());
    return out;
}

CachePlan parse_cache(const json& j) {
    const std::string w = "kv_cache";
    CachePlan p;
    p.layout = get<std::string>(j, "layout", w);
    p.dtype = get<std::string>(j, "dtype", w);
    p.grows = get<bool>(j, "grows", w);
    for (const auto& t : at(j, "tensors", w)) {
        CacheTensor c;
        c.input = get<std::string>(t, "input", w + ".tensors");
        c.output = get<std::string>(t, "output", w + ".tensors");
        c.dtype = get<std::string>(t, "dtype", w + ".tensors." + c.input);
        c.shape = parse_shape(at(t, "shape", w + ".tensors." + c.input), w + ".tensors." + c.input + ".shape");
        c.init = get_or<std::string>(t, "init", "zeros", w + ".tensors." + c.input);
        p.tensors.push_back(std::move(c));
    }
    if (auto it = j.find("controls"); it != j.end()) {
        for (const auto& c : *it) {
            ControlInput ci;
            ci.name = get<std::string>(c, "name", w + ".controls");
            ci.dtype = get<std::string>(c, "dtype", w + ".controls." + ci.name);
            ci.shape = parse_shape(at(c, "shape", w + ".controls." + ci.name), w + ".controls." + ci.name + ".shape");
            ci.meaning = get_or<std::string>(c, "meaning", "", w + ".controls." + ci.name);
            p.controls.push_back(std::move(ci));
        }
    }
    if (auto it = j.find("params"); it != j.end() && it->is_object()) {
        for (auto kv = it->begin(); kv != it->end(); ++kv)
            if (kv->is_number_integer()) p.int_params[kv.key()] = kv->get<int64_t>();
    }
    if (auto it = j.find("protocol"); it != j.end() && it->is_array()) {
        for (const auto& s : *it)
            if (s.is_string()) p.protocol.push_back(s.get<std::string>());
    }
    if (auto it = j.find("layers"); it != j.end() && it->is_array()) {
        for (const auto& l : *it) {
            LayerCache lc;
            lc.index = get<int64_t>(l, "index", w + ".layers");
            const std::string lw = w + ".layers." + std::to_string(lc.index);
            lc.kind = get<std::string>(l, "kind", lw);
            lc.layout = get<std::string>(l, "layout", lw);
            lc.grows = get<bool>(l, "grows", lw);
            for (const auto& t : at(l, "tensors", lw))
                if (t.is_string()) lc.tensors.push_back(t.get<std::string>());
            if (auto pit = l.find("params"); pit != l.end() && pit->is_object())
                for (auto kv = pit->begin(); kv != pit->end(); ++kv)
                    if (kv->is_number_integer()) lc.int_params[kv.key()] = kv->get<int64_t>();
            p.layers.push_back(std::move(lc));
        }
    }
    return p;
}

BuildInfo parse_build(const json& j) {
    const std::string w = "build";
    BuildInfo b;
    b.target = get<std::string>(j, "target", w);
    b.backend = get<std::string>(j, "backend", w);
    b.precision = get<std::string>(j, "precision", w);
    b.engine_built = get<bool>(j, "engine_built", w);
    b.reason = get_or<std::string>(j, "reason", "", w);
    if (auto it = j.find("sm"); it != j.end() && it->is_number_integer()) b.sm = it->get<int>();
    if (auto it = j.find("tensorrt_version"); it != j.end() && it->is_string()) b.tensorrt_version = it->get<std::string>();
    if (auto it = j.find("graphs"); it != j.end()) b.graphs = parse_graphs(*it, w + ".graphs");
    if (auto it = j.find("plugins"); it != j.end() && it->is_array()) {
        for (const auto& p : *it) {
            auto name = p.find("plugin");
            if (name != p.end() && name->is_string()) b.plugins.push_back(name->get<std::string>());
        }
    }
    return b;
}

}  // namespace

const TensorSpec* GraphSpec::input(const std::string& n) const {
    for (const auto& t : inputs)
        if (t.name == n) return &t;
    return nullptr;
}
const TensorSpec* GraphSpec::output(const std::string& n) const {
    for (const auto& t : outputs)
        if (t.name == n) return &t;
    return nullptr;
}
const DimRange* GraphSpec::dim(const std::string& n) const {
    auto it = dims.find(n);
    return it == dims.end() ? nullptr : &it->second;
}

bool CachePlan::paged() const {
    if (layout == "paged") return true;
    for (const auto& l : layers)
        if (l.layout == "paged") return true;
    return false;
}

bool CachePlan::has_past_sequence() const {
    if (layers.empty()) return layout == "multiscale";
    for (const auto& l : layers)
        if (l.layout == "multiscale") return true;
    return false;
}

bool CachePlan::has_capacity() const {
    // contiguous layers, and the factor-1 layers of a multiscale (hourglass) cache, hold `capacity` slots
    for (const auto& t : tensors)
        for (const auto& d : t.shape)
            if (!d.fixed && d.symbol == "capacity") return true;
    return false;
}

int64_t CachePlan::first_ratio() const {
    auto it = int_params.find("first_ratio");
    return it != int_params.end() ? it->second : 0;
}

std::map<std::string, int64_t> CachePlan::buffer_sizes(int64_t tokens) const {
    std::map<std::string, int64_t> sizes{{"capacity", tokens}};
    for (const auto& l : layers)
        if (l.layout == "ring")
            if (auto it = l.int_params.find("window"); it != l.int_params.end())
                sizes["ring_" + std::to_string(l.index)] = it->second;  // one token per step: window slots
    return sizes;
}

const CacheTensor* CachePlan::by_input(const std::string& n) const {
    for (const auto& t : tensors)
        if (t.input == n) return &t;
    return nullptr;
}
const CacheTensor* CachePlan::by_output(const std::string& n) const {
    for (const auto& t : tensors)
        if (t.output == n) return &t;
    return nullptr;
}
const ControlInput* CachePlan::control(const std::string& n) const {
    for (const auto& c : controls)
        if (c.name == n) return &c;
    return nullptr;
}

std::string Bundle::path(const std::string& relative) const { return join(dir, relative); }

const GraphSpec* Bundle::graph_by_role(const std::string& role) const {
    if (!build) return nullptr;
    for (const auto& [name, g] : build->graphs)
        if (g.role == role) return &g;
    return nullptr;
}

size_t dtype_bytes(const std::string& dtype) {
    if (dtype == "float32" || dtype == "int32") return 4;
    if (dtype == "float16" || dtype == "bfloat16") return 2;
    if (dtype == "int64") return 8;
    if (dtype == "bool" || dtype == "int8" || dtype == "uint8") return 1;
    throw Error("unknown dtype '" + dtype + "' (effx manifests use float32, float16, bfloat16, int64, int32, bool)");
}

std::pair<int, int> major_minor(const std::string& version) {
    int major = 0, minor = 0;
    char dot = 0;
    std::istringstream in(version);
    if (!(in >> major >> dot >> minor) || dot != '.')
        throw Error("cannot read a major.minor TensorRT version from '" + version + "'");
    return {major, minor};
}

std::string kit_engine_name(const std::string& graph, int sm, const std::string& tensorrt_version) {
    auto [major, minor] = major_minor(tensorrt_version);
    return graph + ".sm" + std::to_string(sm) + ".trt" + std::to_string(major) + "." + std::to_string(minor) + ".engine";
}

Bundle parse_manifest(const std::string& json_text, const std::string& dir) {
    json j;
    try {
        j = json::parse(json_text);
    } catch (const json::parse_error& e) {
        throw Error(join(dir, kManifestName) + ": not valid JSON (" + e.what() + "); re-run the stage that wrote it");
    }
    if (!j.is_object()) throw Error(join(dir, kManifestName) + ": not a JSON object");
    Bundle b;
    b.dir = dir;
    b.schema_version = get_or<int>(j, "schema_version", 0, "manifest");
    b.stage = get<std::string>(j, "stage", "manifest");
    b.family = get<std::string>(j, "family", "manifest");
    if (auto spec = j.find("spec"); spec != j.end() && spec->is_object()) {
        if (auto model = spec->find("model"); model != spec->end() && model->is_object()) {
            b.vocab_size = get_or<int64_t>(*model, "vocab_size", 0, "spec.model");
            b.max_seq_len = get_or<int64_t>(*model, "max_seq_len", 0, "spec.model");
        }
    }
    b.graphs = parse_graphs(at(j, "graphs", "manifest"), "graphs");
    if (auto it = j.find("kv_cache"); it != j.end() && !it->is_null()) b.kv_cache = parse_cache(*it);
    if (auto it = j.find("build"); it != j.end() && !it->is_null()) b.build = parse_build(*it);
    if (auto it = j.find("files"); it != j.end() && it->is_object()) {
        for (auto f = it->begin(); f != it->end(); ++f)
            b.files[f.key()] = FileEntry{get_or<std::string>(*f, "sha256", "", "files." + f.key()),
                                         get_or<uint64_t>(*f, "bytes", 0, "files." + f.key())};
    }
    return b;
}

Bundle load_bundle(const std::string& dir) {
    const std::string manifest = join(dir, kManifestName);
    std::ifstream in(manifest, std::ios::binary);
    if (!in) throw Error(dir + ": no " + kManifestName + "; point at a folder written by `effx build -t <gpu target>`");
    std::stringstream text;
    text << in.rdbuf();
    Bundle b = parse_manifest(text.str(), dir);

    if (b.schema_version != kSchemaVersion)
        throw Error(manifest + ": manifest schema_version " + std::to_string(b.schema_version) + ", effx_run reads " +
                    std::to_string(kSchemaVersion) + "; rebuild the bundle with a matching effx, or rebuild effx_run");
    if (b.stage != "build" || !b.build)
        throw Error(manifest + ": an `effx export` folder (stage '" + b.stage +
                    "'), not a build; run `effx build " + dir + " -t <gpu target>` first");
    BuildInfo& info = *b.build;
    if (info.backend != "tensorrt")
        throw Error(manifest + ": ORT bundle (backend '" + info.backend + "', target " + info.target +
                    "): use onnxruntime (effx run / python), effx_run runs TensorRT engines");
    if (info.graphs.empty()) throw Error(manifest + ": build.graphs is empty");

    if (!info.engine_built) {
        // A device kit. build_on_device.sh either ran `effx build . -o engine` (a new bundle in engine/) or
        // trtexec, which writes <graph>.sm<sm>.trt<M>.<m>.engine next to the manifest and leaves it as is.
        bool all = info.sm && info.tensorrt_version;
        std::map<std::string, std::string> engines;
        for (const auto& [name, g] : info.graphs) {
            if (!all) break;
            std::string file = kit_engine_name(name, *info.sm, *info.tensorrt_version);
            if (is_file(join(dir, file))) engines[name] = file;
            else all = false;
        }
        if (all) {
            for (auto& [name, g] : info.graphs) g.file = engines[name];
            b.engines_from_kit = true;
        } else if (is_file(join(join(dir, "engine"), kManifestName))) {
            throw Error(dir + ": a device kit; its engines were built into " + join(dir, "engine") +
                        ": run effx_run " + join(dir, "engine"));
        } else {
            throw Error(dir + ": this is a device kit (engine_built false): run build_on_device.sh first" +
                        (info.reason.empty() ? std::string() : " (" + info.reason + ")"));
        }
    }

    for (const auto& [name, g] : info.graphs) {
        uint64_t size = 0;
        const std::string p = join(dir, g.file);
        if (!is_file(p, &size))
            throw Error(p + ": engine of graph '" + name + "' listed in " + kManifestName + " but missing");
        auto f = b.files.find(g.file);
        if (f != b.files.end() && f->second.bytes != 0 && f->second.bytes != size)
            throw Error(p + ": " + std::to_string(size) + " bytes, " + kManifestName + " says " +
                        std::to_string(f->second.bytes) + "; the file was changed after the build");
    }
    if (b.family == "decoder" && b.kv_cache && !b.graph_by_role("decode"))
        throw Error(manifest + ": a decoder with a kv_cache plan but no decode graph in build.graphs");
    return b;
}

}  // namespace effx
