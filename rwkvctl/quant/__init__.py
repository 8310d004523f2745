"""Weight quantization: schemes, which tensors they apply to, the quantized file format, packed run-time layers.

- `schemes`: the registry; a scheme registers encode / decode / matmul under a name (`PackedWeight` is one weight
  in a scheme's stored form).
- `groupwise`: the default scheme, "group-affine" (group-wise min/max codes with a per-group range search).
- `policy`: which tensors are quantized at which bits (`QuantSpec`), and quantizing a state dict.
- `format`: the quantized `.safetensors` layout, written and read in that one module.
- `linear`: `QuantLinear`, a Linear layer whose weight stays packed at run time.

Nothing is imported here, so each module pulls in only what it needs.
"""
