"""Triton kernels of fasttrain (shipped as ``fasttrain.kernels``). No autograd, no modules."""
