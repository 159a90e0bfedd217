"""The norm family: flashfuse::layer_norm, add_layer_norm, rms_norm, add_rms_norm, norm_backward."""
from flashfuse.kernels.norms import layer_norm, rms_norm  # noqa: F401  (registers the ops)
