// OpenVINO extension: the op effvit.WindowAttention (opset "effvit") running window_attention.cpp, for
// IR files and for ONNX files whose node is in the ONNX domain "effvit". Load it with
// ov.Core().add_extension(path) (effvit.kernels.cpu.extension_path() builds it).
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>
#include <vector>

#include "window_attention.hpp"

namespace effvit {

class WindowAttention : public ov::op::Op {
public:
    OPENVINO_OP("WindowAttention", "effvit");

    WindowAttention() = default;

    WindowAttention(const ov::OutputVector& args, int64_t window, std::vector<int64_t> kernels, int64_t skip)
        : Op(args), m_window(window), m_kernels(std::move(kernels)), m_skip(skip) {
        constructor_validate_and_infer_types();
    }

    // inputs: x (B, C, H, W), qkv_w (h, d, 2kd+d), qkv_b (h, 2kd+d), q_w (h, K, K, kd), q_b (h, kd),
    // table (h, r*r), proj_w (h*d, C), proj_b (C)
    void validate_and_infer_types() override {
        NODE_VALIDATION_CHECK(this, get_input_size() == 8, "WindowAttention takes 8 inputs, got ", get_input_size());
        for (size_t i = 0; i < 8; ++i)
            NODE_VALIDATION_CHECK(this, get_input_element_type(i) == ov::element::f32 ||
                                            get_input_element_type(i).is_dynamic(),
                                  "WindowAttention is fp32 only; input ", i, " is ", get_input_element_type(i));
        static const int64_t ranks[8] = {4, 3, 2, 4, 2, 2, 2, 1};
        for (size_t i = 0; i < 8; ++i) {
            const auto& shape = get_input_partial_shape(i);
            NODE_VALIDATION_CHECK(this, shape.rank().is_dynamic() || shape.rank().get_length() == ranks[i],
                                  "WindowAttention input ", i, " must have rank ", ranks[i], ", got ", shape);
        }
        NODE_VALIDATION_CHECK(this, m_window >= 1, "WindowAttention window must be >= 1, got ", m_window);
        set_output_type(0, ov::element::f32, get_input_partial_shape(0));
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& new_args) const override {
        return std::make_shared<WindowAttention>(new_args, m_window, m_kernels, m_skip);
    }

    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("window", m_window);
        visitor.on_attribute("kernels", m_kernels);
        visitor.on_attribute("skip", m_skip);
        return true;
    }

    bool has_evaluate() const override { return true; }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        const ov::Shape xs = inputs[0].get_shape(), qkv = inputs[1].get_shape(), qw = inputs[3].get_shape();
        OPENVINO_ASSERT(qkv[0] == m_kernels.size(), "WindowAttention: ", qkv[0], " heads but ", m_kernels.size(),
                        " kernel sizes");
        WindowAttentionArgs a;
        a.batch = xs[0], a.channels = xs[1], a.height = xs[2], a.width = xs[3];
        a.heads = qkv[0], a.val_dim = qkv[1], a.key_dim = (qkv[2] - qkv[1]) / 2;
        a.window = m_window, a.kmax = qw[1], a.kernels = m_kernels.data(), a.skip = m_skip != 0;
        OPENVINO_ASSERT(a.heads * a.val_dim == a.channels, "WindowAttention: ", a.heads, " heads of ", a.val_dim,
                        " channels do not make the input's ", a.channels);
        OPENVINO_ASSERT(inputs[5].get_shape()[1] == static_cast<size_t>(m_window * m_window),
                        "WindowAttention: bias table of ", inputs[5].get_shape()[1], " entries for window ", m_window);
        OPENVINO_ASSERT(a.key_dim > 0 && a.key_dim % 16 == 0, "WindowAttention: key_dim ", a.key_dim,
                        " is not a multiple of 16");
        for (int64_t k : m_kernels)
            OPENVINO_ASSERT(k % 2 == 1 && k <= a.kmax, "WindowAttention: q kernel ", k, " is not odd and <= ", a.kmax);
        a.x = inputs[0].data<const float>();
        a.qkv_w = inputs[1].data<const float>();
        a.qkv_b = inputs[2].data<const float>();
        a.q_w = inputs[3].data<const float>();
        a.q_b = inputs[4].data<const float>();
        a.table = inputs[5].data<const float>();
        a.proj_w = inputs[6].data<const float>();
        a.proj_b = inputs[7].data<const float>();
        outputs[0].set_shape(xs);
        a.out = outputs[0].data<float>();

        const std::shared_ptr<const std::vector<float>> held = bias_for(a, inputs[5].get_size());
        const std::vector<float>& bias = *held;
        const int64_t items = work_items(a);
        const int threads = tbb::this_task_arena::max_concurrency();
        if (threads <= 1 || items <= 1) {
            run_windows(a, bias.data(), 0, items);
            return true;
        }
        // the caller's arena: OpenVINO's CPU plugin runs inference in INFERENCE_NUM_THREADS threads; one
        // contiguous share of the windows per thread
        const int64_t parts = std::min<int64_t>(threads, items);
        tbb::parallel_for(int64_t(0), parts, [&](int64_t p) {
            run_windows(a, bias.data(), items * p / parts, items * (p + 1) / parts);
        });
        return true;
    }

private:
    // The dense bias of a map size, built once (about 30 us for a 7x7 window) and kept with the table it
    // came from: a new table (an input that is not a constant) rebuilds it.
    std::shared_ptr<const std::vector<float>> bias_for(const WindowAttentionArgs& a, size_t table_size) const {
        std::lock_guard<std::mutex> lock(m_mutex);
        const std::vector<float> table(a.table, a.table + table_size);
        const auto key = std::make_pair(a.height, a.width);
        auto it = m_bias.find(key);
        if (it != m_bias.end() && it->second.first == table) return it->second.second;
        const WindowGrid g = window_grid(a.height, a.width, a.window);
        auto bias = std::make_shared<std::vector<float>>(a.heads * g.tokens() * g.padded());
        window_bias(a, bias->data());
        m_bias[key] = {table, bias};
        return bias;
    }

    mutable std::mutex m_mutex;
    mutable std::map<std::pair<int64_t, int64_t>,
                     std::pair<std::vector<float>, std::shared_ptr<const std::vector<float>>>> m_bias;
    int64_t m_window = 7;
    std::vector<int64_t> m_kernels;
    int64_t m_skip = 0;
};

}  // namespace effvit

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<effvit::WindowAttention>>(),
     std::make_shared<ov::frontend::onnx::OpExtension<effvit::WindowAttention>>("WindowAttention", "effvit")}));
