import importlib


def test_packages_import_without_gpu():
    import kernels
    import lvd

    assert callable(kernels.attention) and callable(kernels.group_norm)
    assert lvd.__version__


def test_our_kernels_package_is_not_huggingface_kernels():
    # diffusers would try to load hub kernels through `kernels` if it believed ours was HF's.
    import diffusers.utils

    importlib.import_module("kernels")
    assert diffusers.utils.is_kernels_available() is False
