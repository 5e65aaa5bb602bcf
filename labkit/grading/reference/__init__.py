"""labkit's reference implementations that the homework's graded tests compare against, for
the parts whose library code lives on other branches today.

    kv_int8.py   int8 KV quantization per (token, head), asymmetric, and the quantizing store
    int4.py      int4 group quantization, nibble packing, the AWQ scale search

Each is written plainly in float32 PyTorch, following the formulas in the homework stubs
(homework/a3_kv_int8.py, homework/a4_int4_awq.py). When labkit's own KV quantization
(kernels/kv_quant.py, lesson 08) and W4A16 (labkit/quant/, kernels/w4a16.py, lesson 09) land,
the graded tests should compare against those instead and these files shrink to adapters;
the formulas there may differ in layout (packing order, where scale and zero live), which the
adapters then translate.
"""
