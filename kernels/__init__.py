"""The `flashfuse::` torch.library ops. Importing this package registers all of them."""
from flashfuse.kernels.attention import op as _attention_op  # noqa: F401
