"""The `flashfuse::` torch.library ops. Importing this package registers all of them."""
from flashfuse.kernels.attention import op as _attention_op  # noqa: F401
from flashfuse.kernels import pointwise as _pointwise_op  # noqa: F401
from flashfuse.kernels import bias_gelu as _bias_gelu_op  # noqa: F401
from flashfuse.kernels import prelu as _prelu_op  # noqa: F401
from flashfuse.kernels import norms as _norm_ops  # noqa: F401
