"""flashfuse::layer_norm and flashfuse::add_layer_norm: LayerNorm over the last dim, fp32 statistics,
biased variance, optional per-element weight/bias; the add_ variant also returns h = x + residual."""
from flashfuse.kernels.norms.ops import define_norm_ops

layer_norm, add_layer_norm = define_norm_ops("layer_norm", is_rms=False)
