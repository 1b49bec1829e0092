"""C++ CPU kernels, compiled at first use and cached (:mod:`.build`).

:mod:`.prefix_attention`: fused shared-prefix attention (``csrc/prefix_attention.cpp``), the ``"cpu"`` backend of
:func:`ltuning.kernels.prefix_attention`. :mod:`.fused_ops`: fused RMSNorm, SwiGLU and rotary embedding of
Llama-family blocks (``csrc/fused_llama_ops.cpp``), patched into a model by :mod:`ltuning.models.fused_ops`.
"""
