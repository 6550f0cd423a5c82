// The fused model's whole window attention on the CPU, fp32: window partition with zero padding, the
// cascade of heads (q/k/v projection of chunk_i + out_{i-1}, depthwise conv on q, scores plus the
// relative-position bias, softmax, times v), ReLU, the output projection, window reverse and the skip.
// Runtime-independent: the OpenVINO extension (openvino_extension.cpp) wraps it.
#pragma once

#include <cstdint>

namespace effvit {

// Shapes and operands of one attention block; every pointer is dense fp32 in the layout given.
struct WindowAttentionArgs {
    int64_t batch = 0, channels = 0, height = 0, width = 0;  // x and out: (B, C, H, W)
    int64_t heads = 0, key_dim = 0, val_dim = 0;              // C = heads * val_dim
    int64_t window = 0;                                       // r: the bias table's side
    int64_t kmax = 0;                                         // side of q_w's kernels (the largest)
    const int64_t* kernels = nullptr;                         // per head: its q kernel size (odd, <= kmax)
    bool skip = false;                                        // add x to the output
    const float* x = nullptr;
    const float* qkv_w = nullptr;   // (heads, d, 2 kd + d): input-major, columns q, k, v
    const float* qkv_b = nullptr;   // (heads, 2 kd + d)
    const float* q_w = nullptr;     // (heads, kmax, kmax, kd): centred, the scale folded in
    const float* q_b = nullptr;     // (heads, kd)
    const float* table = nullptr;   // (heads, r * r): bias of offset (|dy|, |dx|) at |dy| * r + |dx|
    const float* proj_w = nullptr;  // (heads * d, C): input-major
    const float* proj_b = nullptr;  // (C)
    float* out = nullptr;
};

// The windows of a map: one of the map's own size when it fits the window, else r x r windows over the
// map padded bottom/right with zeros to multiples of r.
struct WindowGrid {
    int64_t wh, ww, nh, nw;
    int64_t tokens() const { return wh * ww; }
    int64_t padded() const { return (wh * ww + 15) / 16 * 16; }  // key axis rounded up to a vector
};

WindowGrid window_grid(int64_t height, int64_t width, int64_t window);

// Number of independent work items (batch x windows): run_windows may take any split of them.
int64_t work_items(const WindowAttentionArgs& a);

// The dense bias (heads, N, P) of the grid's windows, -inf in key columns N..P: size heads * N * P.
void window_bias(const WindowAttentionArgs& a, float* bias);

// Work items [begin, end): each reads its window of x and writes its tokens of out.
void run_windows(const WindowAttentionArgs& a, const float* bias, int64_t begin, int64_t end);

}  // namespace effvit
