"""seg_core: the pure PyTorch/NumPy heart of rayseg.

It never imports ray, s3fs or boto3 and never touches the network; I/O here is bytes in, arrays out,
plus the local model-artifact directory.  Import submodules directly, e.g.
``from seg_core.model import UNet``.
"""
__version__ = "0.1.0"
