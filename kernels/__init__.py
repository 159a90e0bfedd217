"""The `flashfuse::` torch.library ops. Importing this package registers all of them."""
