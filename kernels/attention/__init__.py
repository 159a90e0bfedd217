"""flashfuse::attention: op definition (op.py), captured score modification (score_mod.py), PyTorch
reference (reference.py) and the generated Triton kernels (triton_impl.py and friends)."""
