"""flashfuse::rms_norm and flashfuse::add_rms_norm: x * rsqrt(mean(x*x) + eps) over the last dim in fp32,
optional per-element weight/bias; the add_ variant also returns h = x + residual."""
from flashfuse.kernels.norms.ops import define_norm_ops

rms_norm, add_rms_norm = define_norm_ops("rms_norm", is_rms=True)
