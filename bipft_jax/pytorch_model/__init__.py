"""The PyTorch BiPFT model that `bipft convert to-pytorch` ships beside exported weights.

`modeling_bipft.py` depends only on torch and transformers: it is copied verbatim into each
export and loaded there by `trust_remote_code=True`.
"""
