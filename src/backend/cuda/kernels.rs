//! The kernel sources in `kernels/`, embedded in the binary so it runs from anywhere (and can be
//! carried to a GPU machine alone). `common.cuh` is prepended in place of its `#include`.

/// Shared helpers, included by every kernel.
pub const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// One kernel file: its name, source, and the functions it exports.
pub struct KernelSource {
    pub file: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
}

pub const KERNELS: &[KernelSource] = &[
    KernelSource {
        file: "embedding_layernorm.cu",
        source: include_str!("../../../kernels/embedding_layernorm.cu"),
        functions: &[
            "embedding_layernorm_f16",
            "embedding_layernorm_bf16",
            "embedding_layernorm_vec1_f16",
            "embedding_layernorm_vec2_f16",
            "embedding_layernorm_vec4_f16",
            "embedding_layernorm_vec1_bf16",
            "embedding_layernorm_vec2_bf16",
            "embedding_layernorm_vec4_bf16",
        ],
    },
    KernelSource {
        file: "add_layernorm.cu",
        source: include_str!("../../../kernels/add_layernorm.cu"),
        functions: &[
            "add_layernorm_f16",
            "add_layernorm_bf16",
            "add_layernorm_vec1_f16",
            "add_layernorm_vec2_f16",
            "add_layernorm_vec4_f16",
            "add_layernorm_vec1_bf16",
            "add_layernorm_vec2_bf16",
            "add_layernorm_vec4_bf16",
        ],
    },
    KernelSource {
        file: "alibi_attention.cu",
        source: include_str!("../../../kernels/alibi_attention.cu"),
        functions: &["alibi_attention_f16", "alibi_attention_bf16"],
    },
    KernelSource {
        file: "alibi_attention_tc.cu",
        source: include_str!("../../../kernels/alibi_attention_tc.cu"),
        functions: &["alibi_attention_tc_f16", "alibi_attention_tc_bf16"],
    },
    KernelSource {
        file: "alibi_attention_mma.cu",
        source: include_str!("../../../kernels/alibi_attention_mma.cu"),
        functions: &[
            "alibi_attention_mma_d16_f16",
            "alibi_attention_mma_d16_bf16",
            "alibi_attention_mma_d64_f16",
            "alibi_attention_mma_d64_bf16",
            "alibi_attention_mma_d80_f16",
            "alibi_attention_mma_d80_bf16",
            "alibi_attention_mma_d96_f16",
            "alibi_attention_mma_d96_bf16",
            "alibi_attention_mma_d128_f16",
            "alibi_attention_mma_d128_bf16",
        ],
    },
    KernelSource {
        file: "alibi_attention_mma2.cu",
        source: include_str!("../../../kernels/alibi_attention_mma2.cu"),
        functions: &[
            "alibi_attention_mma2_d16_r64_f16",
            "alibi_attention_mma2_d16_r64_bf16",
            "alibi_attention_mma2_d16_r128_f16",
            "alibi_attention_mma2_d16_r128_bf16",
            "alibi_attention_mma2_d64_r64_f16",
            "alibi_attention_mma2_d64_r64_bf16",
            "alibi_attention_mma2_d64_r128_f16",
            "alibi_attention_mma2_d64_r128_bf16",
            "alibi_attention_mma2_d80_r64_f16",
            "alibi_attention_mma2_d80_r64_bf16",
            "alibi_attention_mma2_d80_r128_f16",
            "alibi_attention_mma2_d80_r128_bf16",
            "alibi_attention_mma2_d96_r64_f16",
            "alibi_attention_mma2_d96_r64_bf16",
            "alibi_attention_mma2_d96_r128_f16",
            "alibi_attention_mma2_d96_r128_bf16",
            "alibi_attention_mma2_d128_r64_f16",
            "alibi_attention_mma2_d128_r64_bf16",
            "alibi_attention_mma2_d128_r128_f16",
            "alibi_attention_mma2_d128_r128_bf16",
        ],
    },
    KernelSource {
        file: "bias_gelu.cu",
        source: include_str!("../../../kernels/bias_gelu.cu"),
        functions: &[
            "bias_gelu_f16",
            "bias_gelu_bf16",
            "bias_gelu_vec_f16",
            "bias_gelu_vec_bf16",
        ],
    },
    KernelSource {
        file: "final_norm_pool.cu",
        source: include_str!("../../../kernels/final_norm_pool.cu"),
        functions: &[
            "final_norm_stats_f16",
            "final_norm_stats_bf16",
            "final_pool_f16",
            "final_pool_bf16",
            "final_norm_stats_vec1_f16",
            "final_norm_stats_vec2_f16",
            "final_norm_stats_vec4_f16",
            "final_norm_stats_vec1_bf16",
            "final_norm_stats_vec2_bf16",
            "final_norm_stats_vec4_bf16",
            "final_pool_vec_f16",
            "final_pool_vec_bf16",
        ],
    },
    KernelSource {
        file: "skinny_gemm.cu",
        source: include_str!("../../../kernels/skinny_gemm.cu"),
        functions: &[
            "skinny_gemm_f16",
            "skinny_gemm_bf16",
            "skinny_reduce_f16",
            "skinny_reduce_bf16",
        ],
    },
    KernelSource {
        file: "fp8_quantize.cu",
        source: include_str!("../../../kernels/fp8_quantize.cu"),
        functions: &[
            "fp8_quantize_rows_f32",
            "fp8_quantize_rows_f16",
            "fp8_quantize_rows_bf16",
            "fp8_gelu_quantize_rows1",
            "fp8_gelu_quantize_rows2",
            "fp8_gelu_quantize_rows4",
            "fp8_gelu_quantize_rows8",
        ],
    },
    KernelSource {
        file: "fp8_epilogue.cu",
        source: include_str!("../../../kernels/fp8_epilogue.cu"),
        functions: &[
            "fp8_epilogue_f16",
            "fp8_epilogue_bf16",
            "fp8_epilogue_add_layernorm1_f16",
            "fp8_epilogue_add_layernorm2_f16",
            "fp8_epilogue_add_layernorm4_f16",
            "fp8_epilogue_add_layernorm1_bf16",
            "fp8_epilogue_add_layernorm2_bf16",
            "fp8_epilogue_add_layernorm4_bf16",
        ],
    },
    KernelSource {
        file: "convert.cu",
        source: include_str!("../../../kernels/convert.cu"),
        functions: &[
            "convert_f32_f16",
            "convert_f32_bf16",
            "convert_f16_bf16",
            "convert_bf16_f16",
            "convert_f16_f32",
            "convert_bf16_f32",
        ],
    },
];

impl KernelSource {
    /// The source as NVRTC compiles it: `common.cuh` pasted where it is included.
    pub fn full_source(&self) -> String {
        self.source.replace("#include \"common.cuh\"", COMMON)
    }
}
