// effx_run: load an effx TensorRT build bundle (manifest.json + engines) and time it.
//
//   effx_run BUNDLE_DIR [--batch B] [--seq N] [--steps S] [--warmup W] [--iters I] [--plugins LIB.so]...
//
// Encoders (and decoders without a cache plan): I timed forward passes after W warm-ups.
// Decoders: prefill N tokens, then S greedy decode steps following manifest.kv_cache (contiguous, paged, ring,
// state, multiscale): the host allocates the contiguous (capacity = N + S slots), ring (window slots) and paged
// buffers, which the prefill takes too; every present.* output is fed back as the matching past.* input of the
// next step (two device buffers per cache tensor, ping-pong: TensorRT does not write an input in place, so the
// graphs' `aliases` are not used here), past_lengths / new_lengths / block_table are computed on
// the host as effx.core.protocol.DecodeDriver does (the one Python driver of the protocol: effx/core/protocol.py),
// and the next token is the argmax of the last logits (effx.core.protocol.greedy).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "effx/bundle.h"
#include "effx/engine.h"

namespace {

using effx::Dims64;
using effx::Error;
using nvinfer1::DataType;

// ---- command line ---------------------------------------------------------------------------------------

struct Options {
    std::string dir;
    int64_t batch = 1;
    int64_t seq = 128;
    int64_t steps = 32;
    int warmup = 3;
    int iters = 10;
    std::vector<std::string> plugins;
    int device = 0;
    uint64_t seed = 0;
    bool force = false;
    bool verbose = false;
};

const char* kUsage =
    "usage: effx_run BUNDLE_DIR [--batch B] [--seq N] [--steps S] [--warmup W] [--iters I]\n"
    "                [--plugins LIB.so]... [--device GPU] [--seed X] [--force] [--verbose]\n"
    "\n"
    "  BUNDLE_DIR   folder written by `effx build -t <gpu target>` (manifest.json + .engine files), or a device\n"
    "               kit after its build_on_device.sh wrote the engines\n"
    "  --batch B    sequences per batch (default 1)\n"
    "  --seq N      encoder: tokens per sequence; decoder: prompt tokens for prefill (default 128)\n"
    "  --steps S    decoder: greedy decode steps after the prefill (default 32)\n"
    "  --warmup W   untimed runs first (default 3)\n"
    "  --iters I    timed runs (default 10); a decoder run is a prefill + S steps\n"
    "  --plugins    TensorRT plugin library to load before deserializing (repeatable)\n"
    "  --force      downgrade the TensorRT-version / GPU-architecture / dtype checks to warnings\n"
    "  --verbose    TensorRT info messages\n";

int64_t parse_int(const std::string& flag, const char* value, int64_t min) {
    if (!value) throw Error(flag + " needs a value");
    char* end = nullptr;
    long long v = std::strtoll(value, &end, 10);
    if (!end || *end || v < min) throw Error(flag + " wants an integer >= " + std::to_string(min) + ", got '" + value + "'");
    return v;
}

Options parse_args(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        const char* next = i + 1 < argc ? argv[i + 1] : nullptr;
        auto take = [&](int64_t min) { ++i; return parse_int(a, next, min); };
        if (a == "-h" || a == "--help") {
            std::cout << kUsage;
            std::exit(0);
        } else if (a == "--batch") o.batch = take(1);
        else if (a == "--seq") o.seq = take(1);
        else if (a == "--steps") o.steps = take(0);
        else if (a == "--warmup") o.warmup = static_cast<int>(take(0));
        else if (a == "--iters") o.iters = static_cast<int>(take(1));
        else if (a == "--device") o.device = static_cast<int>(take(0));
        else if (a == "--seed") o.seed = static_cast<uint64_t>(take(0));
        else if (a == "--plugins") {
            if (!next) throw Error("--plugins needs a library path");
            o.plugins.push_back(next);
            ++i;
        } else if (a == "--force") o.force = true;
        else if (a == "--verbose") o.verbose = true;
        else if (!a.empty() && a[0] == '-') throw Error("unknown option " + a);
        else if (o.dir.empty()) o.dir = a;
        else throw Error("one bundle folder only (got '" + o.dir + "' and '" + a + "')");
    }
    if (o.dir.empty()) throw Error("no bundle folder given");
    return o;
}

// ---- statistics -------------------------------------------------------------------------------------------

struct Stats {
    std::vector<double> ms;
    void add(double v) { ms.push_back(v); }
    double mean() const { return ms.empty() ? 0 : std::accumulate(ms.begin(), ms.end(), 0.0) / ms.size(); }
    double sum() const { return std::accumulate(ms.begin(), ms.end(), 0.0); }
    double pct(double p) const {  // nearest rank
        if (ms.empty()) return 0;
        std::vector<double> s = ms;
        std::sort(s.begin(), s.end());
        size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * s.size()));
        return s[std::min(s.size(), std::max<size_t>(rank, 1)) - 1];
    }
};

void print_header() {
    std::printf("  %-34s %9s %9s %9s %9s %7s\n", "latency (ms)", "mean", "p50", "p90", "p99", "n");
}
void print_row(const std::string& name, const Stats& s) {
    std::printf("  %-34s %9.3f %9.3f %9.3f %9.3f %7zu\n", name.c_str(), s.mean(), s.pct(50), s.pct(90), s.pct(99),
                s.ms.size());
}

// ---- host <-> device helpers ----------------------------------------------------------------------------

float half_to_float(uint16_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
    if (exp == 0) {
        if (mant == 0) bits = sign;
        else {  // subnormal
            exp = 127 - 15 + 1;
            while (!(mant & 0x400u)) { mant <<= 1; --exp; }
            bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) bits = sign | 0x7f800000u | (mant << 13);
    else bits = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

float bf16_to_float(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Host staging for one input: integers converted to the engine's type, uploaded asynchronously.
void upload(const std::vector<int64_t>& values, DataType t, effx::DeviceBuffer& dst, std::vector<char>& staging,
            cudaStream_t stream, const std::string& name) {
    const size_t es = effx::dtype_size(t);
    staging.resize(std::max<size_t>(values.size() * es, 1));
    for (size_t i = 0; i < values.size(); ++i) {
        char* p = staging.data() + i * es;
        const int64_t v = values[i];
        switch (t) {
            case DataType::kINT64: std::memcpy(p, &v, 8); break;
            case DataType::kINT32: { int32_t x = static_cast<int32_t>(v); std::memcpy(p, &x, 4); break; }
            case DataType::kBOOL:
            case DataType::kINT8:
            case DataType::kUINT8: { int8_t x = static_cast<int8_t>(v); std::memcpy(p, &x, 1); break; }
            case DataType::kFLOAT: { float x = static_cast<float>(v); std::memcpy(p, &x, 4); break; }
            default: throw Error("input '" + name + "': cannot write integers into a " + effx::dtype_name(t) + " tensor");
        }
    }
    dst.ensure(values.size() * es);
    effx::cuda_check(cudaMemcpyAsync(dst.get(), staging.data(), values.size() * es, cudaMemcpyHostToDevice, stream),
                     ("upload of " + name).c_str());
}

// Greedy tokens: argmax over the vocabulary of the last position of logits [B, n, V] (copies B rows of V).
std::vector<int64_t> argmax_last(const effx::DeviceBuffer& logits, const Dims64& shape, DataType t,
                                 std::vector<char>& host, cudaStream_t stream) {
    if (shape.size() != 3) throw Error("logits have shape " + effx::shape_str(shape) + ", expected [batch, sequence, vocab]");
    const int64_t b = shape[0], n = shape[1], v = shape[2];
    const size_t es = effx::dtype_size(t), row = static_cast<size_t>(v) * es;
    host.resize(static_cast<size_t>(b) * row);
    const char* src = static_cast<const char*>(logits.get()) + static_cast<size_t>(n - 1) * row;
    effx::cuda_check(cudaMemcpy2DAsync(host.data(), row, src, static_cast<size_t>(n) * row, row, static_cast<size_t>(b),
                                       cudaMemcpyDeviceToHost, stream),
                     "copy of the last logits");
    effx::cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    std::vector<int64_t> tokens(static_cast<size_t>(b));
    for (int64_t i = 0; i < b; ++i) {
        const char* r = host.data() + static_cast<size_t>(i) * row;
        float best = -INFINITY;
        int64_t arg = 0;
        for (int64_t j = 0; j < v; ++j) {
            float x;
            if (t == DataType::kFLOAT) std::memcpy(&x, r + j * 4, 4);
            else {
                uint16_t h;
                std::memcpy(&h, r + j * 2, 2);
                x = t == DataType::kHALF ? half_to_float(h) : t == DataType::kBF16 ? bf16_to_float(h) : NAN;
                if (std::isnan(x) && t != DataType::kHALF && t != DataType::kBF16)
                    throw Error("logits of type " + effx::dtype_name(t) + " are not supported");
            }
            if (x > best) { best = x; arg = j; }
        }
        tokens[static_cast<size_t>(i)] = arg;
    }
    return tokens;
}

// ---- shapes -------------------------------------------------------------------------------------------------

using Env = std::map<std::string, int64_t>;

// A manifest shape with every symbolic dim in env; nullopt when one is an expression or unknown.
std::optional<Dims64> resolve(const effx::Shape& s, const Env& env) {
    Dims64 out;
    for (const auto& d : s) {
        if (d.fixed) { out.push_back(d.value); continue; }
        auto it = env.find(d.symbol);
        if (it == env.end()) return std::nullopt;
        out.push_back(it->second);
    }
    return out;
}

// Upper bound of a shape's volume for allocation: names in env, anything else (cache lengths, expressions
// such as "past_sequence + sequence") is at most `tokens`, the number of tokens a whole run sees.
int64_t volume_bound(const effx::Shape& s, const Env& env, int64_t tokens) {
    int64_t v = 1;
    for (const auto& d : s) {
        if (d.fixed) v *= d.value;
        else {
            auto it = env.find(d.symbol);
            v *= it == env.end() ? tokens : it->second;
        }
    }
    return v;
}

std::string shape_of(const effx::Shape& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + s[i].str();
    return out + "]";
}

void check_range(const effx::GraphSpec& g, const std::string& dim, int64_t value, const std::string& what) {
    if (const effx::DimRange* r = g.dim(dim); r && (value < r->min || value > r->max))
        throw Error(what + " = " + std::to_string(value) + " is outside graph '" + g.name + "' " + dim + " range " +
                    std::to_string(r->min) + ".." + std::to_string(r->max) + " (the engine's optimization profile)");
}

// ---- CUDA events ------------------------------------------------------------------------------------------

struct Timer {
    cudaEvent_t start{}, stop{};
    Timer() {
        effx::cuda_check(cudaEventCreate(&start), "cudaEventCreate");
        effx::cuda_check(cudaEventCreate(&stop), "cudaEventCreate");
    }
    ~Timer() {
        cudaEventDestroy(start);
        cudaEventDestroy(stop);
    }
    Timer(const Timer&) = delete;
    Timer& operator=(const Timer&) = delete;
    float elapsed_ms() const {
        float ms = 0;
        effx::cuda_check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
        return ms;
    }
};

double host_ms(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

std::vector<int64_t> random_tokens(size_t n, int64_t vocab, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int64_t> dist(0, std::max<int64_t>(vocab, 1) - 1);
    std::vector<int64_t> t(n);
    for (auto& x : t) x = dist(rng);
    return t;
}

int64_t vocab_of(const effx::Bundle& b, const effx::GraphSpec& g) {
    if (b.vocab_size > 0) return b.vocab_size;
    if (const effx::TensorSpec* l = g.output("logits"); l && !l->shape.empty() && l->shape.back().fixed)
        return l->shape.back().value;
    return 1000;
}

// ---- encoder / single forward graph ------------------------------------------------------------------------

int run_forward(const effx::Bundle& bundle, effx::Engine& eng, const Options& o, cudaStream_t stream) {
    const effx::GraphSpec& g = eng.spec();
    check_range(g, "batch", o.batch, "--batch");
    check_range(g, "sequence", o.seq, "--seq");
    const Env env{{"batch", o.batch}, {"sequence", o.seq}};
    std::map<std::string, effx::DeviceBuffer> buffers;
    std::vector<char> staging;
    const int64_t vocab = vocab_of(bundle, g);

    for (const auto& io : eng.io()) {
        if (!io.is_input) continue;
        auto shape = resolve(io.spec->shape, env);
        if (!shape)
            throw Error("input '" + io.name + "' has shape " + shape_of(io.spec->shape) +
                        ": effx_run knows only the dims batch and sequence for forward graphs");
        std::vector<int64_t> values(static_cast<size_t>(effx::volume(*shape)), 0);
        if (io.name == "input_ids") values = random_tokens(values.size(), vocab, o.seed);
        else if (io.name == "attention_mask") std::fill(values.begin(), values.end(), 1);
        else if (io.name == "position_ids")
            for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<int64_t>(i % static_cast<size_t>(o.seq));
        else if (io.name != "token_type_ids")
            std::cerr << "effx_run: note: input '" << io.name << "' filled with zeros\n";
        if (io.dtype == DataType::kFLOAT || io.dtype == DataType::kHALF || io.dtype == DataType::kBF16) {
            buffers[io.name].ensure(values.size() * effx::dtype_size(io.dtype));
            effx::cuda_check(cudaMemsetAsync(buffers[io.name].get(), 0, values.size() * effx::dtype_size(io.dtype), stream),
                             "cudaMemsetAsync");
        } else {
            upload(values, io.dtype, buffers[io.name], staging, stream, io.name);
        }
        eng.set_input_shape(io.name, *shape);
        eng.bind(io.name, buffers[io.name].get());
        effx::cuda_check(cudaStreamSynchronize(stream), "upload");
    }
    std::string outputs;
    for (const auto& io : eng.io()) {
        if (io.is_input) continue;
        Dims64 shape = eng.shape(io.name);
        if (effx::volume(shape) < 0)
            throw Error("output '" + io.name + "' has a data-dependent shape; effx_run does not support those");
        buffers[io.name].ensure(static_cast<size_t>(effx::volume(shape)) * effx::dtype_size(io.dtype));
        eng.bind(io.name, buffers[io.name].get());
        outputs += (outputs.empty() ? "" : ", ") + io.name + effx::shape_str(shape);
    }

    Timer ev;
    Stats gpu, host;
    for (int i = 0; i < o.warmup + o.iters; ++i) {
        auto t0 = std::chrono::steady_clock::now();
        effx::cuda_check(cudaEventRecord(ev.start, stream), "cudaEventRecord");
        eng.enqueue(stream);
        effx::cuda_check(cudaEventRecord(ev.stop, stream), "cudaEventRecord");
        effx::cuda_check(cudaStreamSynchronize(stream), "forward");
        if (i >= o.warmup) {
            gpu.add(ev.elapsed_ms());
            host.add(host_ms(t0));
        }
    }
    std::printf("%s forward: batch %lld, sequence %lld -> %s; %d warm-up + %d timed runs\n",
                g.role == "encoder" ? "encoder" : "single-graph", static_cast<long long>(o.batch),
                static_cast<long long>(o.seq), outputs.c_str(), o.warmup, o.iters);
    print_header();
    print_row("forward (GPU, cudaEvent)", gpu);
    print_row("forward (host, enqueue+sync)", host);
    std::printf("  throughput: %.1f sequences/s, %.1f tokens/s (mean GPU time)\n", 1e3 * o.batch / gpu.mean(),
                1e3 * o.batch * o.seq / gpu.mean());
    return 0;
}

// ---- decoder: prefill + decode steps following the cache plan ------------------------------------------------

struct CacheSlot {
    const effx::CacheTensor* plan = nullptr;
    effx::DeviceBuffer buf[2];
    int cur = 0;  // buf[cur] holds the state fed as past.* to the next step
    Dims64 shape;
};

class Decoder {
public:
    // fine: an hourglass's decode_fine engine (nullptr when the bundle has none), run for a step of one token
    // that completes no group of the first shortening, as effx.core.protocol.DecodeDriver.graph_for does.
    Decoder(const effx::Bundle& b, effx::Engine& prefill, effx::Engine& decode, effx::Engine* fine, const Options& o,
            cudaStream_t s)
        : bundle_(b), plan_(*b.kv_cache), prefill_(prefill), decode_(decode), o_(o), stream_(s) {
        tokens_total_ = o.seq + o.steps;
        if (fine) {
            first_ratio_ = plan_.first_ratio();
            if (first_ratio_ < 2)
                throw Error("the bundle has a decode_fine graph but its kv_cache plan has no params.first_ratio >= 2 "
                            "(the step condition); rebuild it with this effx");
            fine_ = fine;
        }
        check_range(prefill.spec(), "batch", o.batch, "--batch");
        check_range(prefill.spec(), "sequence", o.seq, "--seq");
        if (o.steps > 0) {
            for (effx::Engine* e : step_engines()) {
                check_range(e->spec(), "batch", o.batch, "--batch");
                if (plan_.has_past_sequence())
                    check_range(e->spec(), "past_sequence", tokens_total_ - 1, "--seq + --steps - 1 (cached tokens)");
            }
        }
        sizes_ = plan_.buffer_sizes(tokens_total_);  // the host's buffers: contiguous capacity, ring slots
        if (plan_.has_capacity()) check_range(prefill.spec(), "capacity", tokens_total_, "--seq + --steps (cache capacity)");
        if (bundle_.max_seq_len > 0 && tokens_total_ > bundle_.max_seq_len)
            throw Error("--seq + --steps = " + std::to_string(tokens_total_) + " exceeds the model's max_seq_len " +
                        std::to_string(bundle_.max_seq_len));
        vocab_ = vocab_of(b, prefill.spec());
        prompt_ = random_tokens(static_cast<size_t>(o.batch * o.seq), vocab_, o.seed);
        if (plan_.paged()) make_block_table();
        for (const auto& t : plan_.tensors) {
            CacheSlot s;
            s.plan = &t;
            slots_.push_back(std::move(s));
        }
        // Allocate everything for the longest step up front (no cudaMalloc inside the timed loop).
        for (auto& s : slots_) {
            size_t bytes = 0;
            std::vector<effx::Engine*> engines = step_engines();
            engines.push_back(&prefill_);
            for (effx::Engine* e : engines) {
                const effx::Engine::IO* io = e->find(s.plan->output);
                if (!io) continue;
                Env env{{"batch", o.batch}, {"sequence", e == &prefill_ ? o.seq : 1}};
                env.insert(sizes_.begin(), sizes_.end());
                bytes = std::max(bytes, static_cast<size_t>(volume_bound(io->spec->shape, env, tokens_total_)) *
                                            effx::dtype_size(io->dtype));
            }
            s.buf[0].ensure(bytes);
            s.buf[1].ensure(bytes);
        }
    }

    struct Result {
        double prefill_gpu = 0, prefill_host = 0;
        std::vector<double> step_gpu, step_host;
        std::vector<int64_t> first_sequence;  // tokens generated for sequence 0
    };

    Result generate() {
        Result r;
        Timer ev;
        // Fresh state: zeros in the buffers a first step reads (the paged pools for prefill).
        for (auto& s : slots_) {
            s.cur = 0;
            s.shape.clear();
            effx::cuda_check(cudaMemsetAsync(s.buf[0].get(), 0, s.buf[0].bytes(), stream_), "cudaMemsetAsync");
        }
        effx::cuda_check(cudaStreamSynchronize(stream_), "cache reset");
        auto t0 = std::chrono::steady_clock::now();
        std::vector<int64_t> next = step(prefill_, prompt_, o_.seq, 0, ev);
        r.prefill_gpu = ev.elapsed_ms();
        r.prefill_host = host_ms(t0);
        r.first_sequence.push_back(next[0]);
        for (int64_t t = 0; t < o_.steps; ++t) {
            t0 = std::chrono::steady_clock::now();
            next = step(engine_for_step(o_.seq + t), next, 1, o_.seq + t, ev);
            r.step_gpu.push_back(ev.elapsed_ms());
            r.step_host.push_back(host_ms(t0));
            r.first_sequence.push_back(next[0]);
        }
        return r;
    }

    int64_t vocab() const { return vocab_; }
    const std::vector<int64_t>& block_row0() const { return table_; }

private:
    std::vector<effx::Engine*> step_engines() {
        std::vector<effx::Engine*> e{&decode_};
        if (fine_) e.push_back(fine_);
        return e;
    }

    // The engine for a step of one token after `past` cached tokens: decode_fine where that token completes no
    // group of the first shortening (past % first_ratio != 0), else decode.
    effx::Engine& engine_for_step(int64_t past) { return fine_ && past % first_ratio_ != 0 ? *fine_ : decode_; }

    // One graph call: `ids` [B, n] new tokens, `past` tokens already cached. Returns the greedy next tokens.
    std::vector<int64_t> step(effx::Engine& e, const std::vector<int64_t>& ids, int64_t n, int64_t past, Timer& ev) {
        const int64_t B = o_.batch;
        Env env{{"batch", B}, {"sequence", n}};
        env.insert(sizes_.begin(), sizes_.end());
        for (const auto& io : e.io()) {
            if (!io.is_input) continue;
            if (io.name == "input_ids") {
                feed(e, io, {B, n}, ids);
            } else if (io.name == "past_lengths") {
                feed(e, io, {B}, std::vector<int64_t>(static_cast<size_t>(B), past));
            } else if (io.name == "new_lengths") {
                feed(e, io, {B}, std::vector<int64_t>(static_cast<size_t>(B), n));
            } else if (io.name == "block_table") {
                feed(e, io, {B, max_blocks_}, table_);
            } else if (io.name == "attention_mask") {
                feed(e, io, {B, past + n}, std::vector<int64_t>(static_cast<size_t>(B * (past + n)), 1));
            } else if (const effx::CacheTensor* ct = plan_.by_input(io.name)) {
                CacheSlot& s = slot(*ct);
                if (s.shape.empty()) {  // first use: the plan's initial shape (zeros)
                    auto shape = resolve(ct->shape, env);
                    if (!shape)
                        throw Error("cache input '" + io.name + "' has initial shape " + shape_of(ct->shape) +
                                    " that effx_run cannot resolve (it knows batch, capacity and ring_{i})");
                    s.shape = *shape;
                    const size_t need = static_cast<size_t>(effx::volume(s.shape)) * effx::dtype_size(io.dtype);
                    if (need > s.buf[s.cur].bytes()) {
                        s.buf[s.cur].ensure(need);
                        effx::cuda_check(cudaMemsetAsync(s.buf[s.cur].get(), 0, need, stream_), "cudaMemsetAsync");
                    }
                }
                e.set_input_shape(io.name, s.shape);
                e.bind(io.name, s.buf[s.cur].get());
            } else {
                const effx::ControlInput* c = plan_.control(io.name);
                throw Error("graph '" + e.spec().name + "' input '" + io.name + "'" +
                            (c ? " (" + c->meaning + ")" : std::string()) + ": effx_run does not know how to fill it");
            }
        }
        const effx::Engine::IO* logits = nullptr;
        Dims64 logits_shape;
        for (const auto& io : e.io()) {
            if (io.is_input) continue;
            Dims64 shape = e.shape(io.name);
            if (effx::volume(shape) < 0)
                throw Error("output '" + io.name + "' has a data-dependent shape " + effx::shape_str(shape) +
                            "; effx_run does not support those");
            const size_t bytes = static_cast<size_t>(effx::volume(shape)) * effx::dtype_size(io.dtype);
            effx::DeviceBuffer* dst;
            if (const effx::CacheTensor* ct = plan_.by_output(io.name)) {
                CacheSlot& s = slot(*ct);
                dst = &s.buf[1 - s.cur];  // never the buffer bound as past.* in this call
            } else {
                dst = &scratch_[io.name];
                if (io.name == "logits" || logits == nullptr) { logits = &io; logits_shape = shape; }
            }
            dst->ensure(bytes);
            e.bind(io.name, dst->get());
        }
        if (!logits) throw Error("graph '" + e.spec().name + "' has no logits output");

        effx::cuda_check(cudaEventRecord(ev.start, stream_), "cudaEventRecord");
        e.enqueue(stream_);
        effx::cuda_check(cudaEventRecord(ev.stop, stream_), "cudaEventRecord");
        std::vector<int64_t> next = argmax_last(scratch_[logits->name], logits_shape, logits->dtype, host_, stream_);

        for (auto& s : slots_) {  // present.* of this call is the past.* of the next one
            if (!e.find(s.plan->output)) continue;
            s.shape = e.shape(s.plan->output);
            s.cur = 1 - s.cur;
        }
        return next;
    }

    void feed(effx::Engine& e, const effx::Engine::IO& io, const Dims64& shape, const std::vector<int64_t>& values) {
        if (static_cast<int64_t>(values.size()) != effx::volume(shape))
            throw Error("internal: " + io.name + " has " + std::to_string(values.size()) + " values for shape " +
                        effx::shape_str(shape));
        upload(values, io.dtype, scratch_[io.name], staging_[io.name], stream_, io.name);
        e.set_input_shape(io.name, shape);
        e.bind(io.name, scratch_[io.name].get());
    }

    CacheSlot& slot(const effx::CacheTensor& ct) {
        for (auto& s : slots_)
            if (s.plan == &ct) return s;
        throw Error("internal: no cache slot for " + ct.input);
    }

    // Every sequence gets its own consecutive physical blocks, enough for all tokens of the run
    // (effx.core.protocol.block_table_for, what DecodeDriver allocates for paged caches).
    void make_block_table() {
        auto bs = plan_.int_params.find("block_size"), nb = plan_.int_params.find("num_blocks");
        const effx::ControlInput* c = plan_.control("block_table");
        if (bs == plan_.int_params.end() || nb == plan_.int_params.end() || !c || c->shape.size() != 2 ||
            !c->shape[1].fixed)
            throw Error("paged cache plan without params.block_size/num_blocks or a [batch, max_blocks] block_table");
        const int64_t block = bs->second, blocks = nb->second;
        max_blocks_ = c->shape[1].value;
        const int64_t need = (tokens_total_ + block - 1) / block;
        if (need > max_blocks_)
            throw Error("--seq + --steps = " + std::to_string(tokens_total_) + " tokens need " + std::to_string(need) +
                        " blocks of " + std::to_string(block) + " per sequence; the block table holds " +
                        std::to_string(max_blocks_));
        if (need * o_.batch > blocks)
            throw Error(std::to_string(o_.batch) + " sequences x " + std::to_string(need) + " blocks = " +
                        std::to_string(need * o_.batch) + " paged blocks, the pool has " + std::to_string(blocks) +
                        "; use a smaller --batch, --seq or --steps");
        table_.assign(static_cast<size_t>(o_.batch * max_blocks_), 0);
        for (int64_t b = 0; b < o_.batch; ++b)
            for (int64_t i = 0; i < need; ++i) table_[static_cast<size_t>(b * max_blocks_ + i)] = b * need + i;
    }

    const effx::Bundle& bundle_;
    const effx::CachePlan& plan_;
    effx::Engine& prefill_;
    effx::Engine& decode_;
    effx::Engine* fine_ = nullptr;
    int64_t first_ratio_ = 0;
    const Options& o_;
    cudaStream_t stream_;
    int64_t tokens_total_ = 0, vocab_ = 0, max_blocks_ = 0;
    std::vector<int64_t> prompt_, table_;
    std::vector<CacheSlot> slots_;
    std::map<std::string, effx::DeviceBuffer> scratch_;
    std::map<std::string, std::vector<char>> staging_;
    std::vector<char> host_;
    std::map<std::string, int64_t> sizes_;  // buffer dims: capacity, ring_{i}
};

int run_decoder(const effx::Bundle& bundle, effx::Engine& prefill, effx::Engine& decode, effx::Engine* fine,
                const Options& o, cudaStream_t stream) {
    Decoder dec(bundle, prefill, decode, fine, o, stream);
    Stats pre_gpu, pre_host, step_gpu, step_host;
    Decoder::Result last;
    for (int i = 0; i < o.warmup + o.iters; ++i) {
        Decoder::Result r = dec.generate();
        if (i < o.warmup) continue;
        pre_gpu.add(r.prefill_gpu);
        pre_host.add(r.prefill_host);
        for (double v : r.step_gpu) step_gpu.add(v);
        for (double v : r.step_host) step_host.add(v);
        last = std::move(r);
    }
    const effx::CachePlan& plan = *bundle.kv_cache;
    std::printf("decoder, kv-cache %s%s: batch %lld, prompt %lld tokens, %lld decode steps; %d warm-up + %d timed runs\n",
                plan.layout.c_str(), plan.grows ? " (grows)" : "", static_cast<long long>(o.batch),
                static_cast<long long>(o.seq), static_cast<long long>(o.steps), o.warmup, o.iters);
    print_header();
    print_row("prefill (GPU, cudaEvent)", pre_gpu);
    print_row("prefill (host, incl. argmax)", pre_host);
    if (o.steps > 0) {
        print_row("decode step (GPU, cudaEvent)", step_gpu);
        print_row("decode step (host, incl. argmax)", step_host);
    }
    std::printf("  prefill: %.1f tokens/s", 1e3 * o.batch * o.seq / pre_gpu.mean());
    if (o.steps > 0)
        std::printf("; decode: %.1f tokens/s (batch x steps / host step time)", 1e3 * o.batch * step_host.ms.size() /
                                                                                  step_host.sum());
    std::printf("\n  greedy tokens of sequence 0:");
    for (size_t i = 0; i < last.first_sequence.size() && i < 16; ++i) std::printf(" %lld", static_cast<long long>(last.first_sequence[i]));
    std::printf("%s\n", last.first_sequence.size() > 16 ? " ..." : "");
    return 0;
}

int run(const Options& o) {
    if (o.verbose) effx::logger().set_shown(nvinfer1::ILogger::Severity::kINFO);
    effx::Bundle bundle = effx::load_bundle(o.dir);
    const effx::BuildInfo& info = *bundle.build;
    effx::Platform platform = effx::query_platform(o.device);
    effx::check_tensorrt_version(info, platform, o.force);
    effx::check_gpu_arch(info, platform, o.force);

    std::printf("effx_run %s: %s %s, target %s (sm_%s, TensorRT %s), %s\n", o.dir.c_str(), bundle.family.c_str(),
                bundle.engines_from_kit ? "device kit with trtexec engines" : "bundle", info.target.c_str(),
                info.sm ? std::to_string(*info.sm).c_str() : "?",
                info.tensorrt_version ? info.tensorrt_version->c_str() : "?", info.precision.c_str());
    std::printf("running on %s\n", platform.describe().c_str());

    effx::TrtPtr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(effx::logger()));
    if (!runtime) throw Error("createInferRuntime failed");
    effx::load_plugins(*runtime, o.plugins);

    cudaStream_t stream{};
    effx::cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    struct StreamGuard {
        cudaStream_t s;
        ~StreamGuard() { cudaStreamDestroy(s); }
    } guard{stream};

    // decode_fine (an hourglass's step that completes no group) has the decode role too: take both by name
    auto by_name = [&info](const char* name) -> const effx::GraphSpec* {
        auto it = info.graphs.find(name);
        return it != info.graphs.end() ? &it->second : nullptr;
    };
    const effx::GraphSpec* prefill = bundle.graph_by_role("prefill");
    const effx::GraphSpec* decode = by_name("decode");
    const effx::GraphSpec* fine = by_name("decode_fine");
    if (bundle.family == "decoder" && bundle.kv_cache && prefill && decode) {
        effx::Engine pe(*runtime, bundle.path(prefill->file), *prefill, info.plugins, o.force);
        effx::Engine de(*runtime, bundle.path(decode->file), *decode, info.plugins, o.force);
        std::optional<effx::Engine> fe;
        if (fine) fe.emplace(*runtime, bundle.path(fine->file), *fine, info.plugins, o.force);
        return run_decoder(bundle, pe, de, fe ? &*fe : nullptr, o, stream);
    }
    const effx::GraphSpec* single = bundle.graph_by_role("encoder");
    if (!single) {
        auto it = info.graphs.find("model");
        single = it != info.graphs.end() ? &it->second : info.graphs.size() == 1 ? &info.graphs.begin()->second : nullptr;
    }
    if (!single) throw Error(o.dir + ": no encoder graph, and no prefill + decode pair with a kv_cache plan");
    effx::Engine eng(*runtime, bundle.path(single->file), *single, info.plugins, o.force);
    return run_forward(bundle, eng, o, stream);
}

}  // namespace

int main(int argc, char** argv) {
    Options o;
    try {
        o = parse_args(argc, argv);
    } catch (const Error& e) {
        std::cerr << "effx_run: " << e.what() << "\n\n" << kUsage;
        return 2;
    }
    try {
        return run(o);
    } catch (const Error& e) {
        std::cerr << "effx_run: error: " << e.what() << "\n";
    } catch (const std::exception& e) {
        std::cerr << "effx_run: error: " << e.what() << "\n";
    }
    return 1;
}
