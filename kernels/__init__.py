"""Triton kernels of fasttrain (shipped as ``fasttrain.kernels``). No autograd, no modules.

Imported as the top-level ``kernels`` instead, this folder is in the way of another package:
``python -m ...`` or ``python -c ...`` in a checkout puts the checkout's root first on sys.path,
where this folder hides Hugging Face's ``kernels`` package (transformers >= 5.25 imports it).
Then the name goes to that package when it is installed.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(  # the checkout under any spelling: not it
        __name__, [p for p in sys.path if os.path.realpath(p or os.curdir) != _root])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
